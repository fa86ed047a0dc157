//! The filter's plugin configuration (`Config::from_json`, what `on_configure` runs): any
//! bytes either compile into a configuration whose every value is within its documented
//! bounds, or are refused with a message; never a panic (which would trap the VM).

#![no_main]

use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use seckill_api::{validate_id, ID_LEN_MAX, QUANTITY_MAX};
use seckill_filter::config::{
    Config, Source, SOLD_OUT_CACHE_MS_MAX, TIMEOUT_MS_MAX, TRACKED_GOODS_MAX_LIMIT,
};
use seckill_filter::gcra::{self, Rate};
use seckill_filter::input::is_gate_header;

fuzz_target!(|data: &[u8]| {
    match Config::from_json(Some(data)) {
        Ok(config) => check(&config),
        Err(e) => {
            assert!(!e.problem.is_empty(), "an error without a problem: {e:?}");
            let _ = e.to_string();
        }
    }
});

fn check(config: &Config) {
    // The route: upper-case methods, and a template some path matches.
    assert!(!config.route.methods.is_empty());
    for method in &config.route.methods {
        assert!((1..=32).contains(&method.len()), "{method:?}");
        assert!(method
            .bytes()
            .all(|b| b.is_ascii_uppercase() || b == b'-' || b == b'_'));
    }
    let template = &config.route.template;
    let path = example_path(template.as_str());
    let captures = template
        .matches(&path)
        .unwrap_or_else(|| panic!("{path:?} does not match its own template {template:?}"));
    assert!(captures.iter().all(|c| *c == "v"), "{captures:?}");

    // The sources.
    let sources = [&config.goods_id, &config.user_id, &config.request_id];
    for source in sources.into_iter().chain(config.quantity.source.as_ref()) {
        match source {
            Source::Header(name) => {
                assert!((1..=256).contains(&name.len()));
                assert_eq!(*name, name.to_ascii_lowercase());
                assert!(name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)));
                assert!(!is_gate_header(name), "a source the gate strips: {name}");
            }
            Source::Query(name) => assert!((1..=256).contains(&name.len())),
            Source::Path { name, index } => {
                assert_eq!(template.variable_index(name), Some(*index));
                assert!(*index < captures.len());
            }
        }
    }
    let quantity = &config.quantity;
    assert!(1 <= quantity.default && quantity.default <= quantity.max);
    assert!(quantity.max <= QUANTITY_MAX);
    assert!((1..=ID_LEN_MAX).contains(&config.id_len_max));

    // The deduct call: every text travels in a header.
    let deduct = &config.deduct;
    assert!(deduct.timeout >= Duration::from_millis(1));
    assert!(deduct.timeout <= Duration::from_millis(TIMEOUT_MS_MAX));
    for text in [&deduct.cluster, &deduct.authority, &deduct.secret] {
        assert!((1..=1024).contains(&text.len()));
        assert!(text.bytes().all(|b| b.is_ascii_graphic()), "{text:?}");
    }

    // Rates: each bucket admits a first request, and its arithmetic cannot overflow.
    let limits = &config.rate_limit;
    assert!((1..=TRACKED_GOODS_MAX_LIMIT).contains(&limits.tracked_goods_max));
    check_rate(limits.default);
    check_rate(limits.unconfirmed);
    for (goods_id, rate) in &limits.goods {
        assert_eq!(validate_id(goods_id, config.id_len_max), Ok(()));
        check_rate(*rate);
    }

    let cache_max = Duration::from_millis(SOLD_OUT_CACHE_MS_MAX);
    assert!(config.sold_out_cache <= cache_max);
    assert!(config.unknown_goods_cache <= cache_max);
}

fn check_rate(rate: Rate) {
    assert!(
        (1..=1_000_000_000_000).contains(&rate.interval_ns()),
        "{rate:?}"
    );
    let now_ns = 1_764_518_400_000_000_000;
    assert!(
        matches!(
            gcra::decide(None, now_ns, rate),
            gcra::Decision::Allow { .. }
        ),
        "a fresh bucket refuses: {rate:?}"
    );
    // A bucket at the end of time still decides without overflowing.
    let _ = gcra::decide(Some(u64::MAX), u64::MAX, rate);
}

/// A path the template must match: its text with every `{variable}` segment set to `v`.
fn example_path(template: &str) -> String {
    template
        .split('/')
        .map(|segment| {
            if segment.starts_with('{') {
                "v"
            } else {
                segment
            }
        })
        .collect::<Vec<_>>()
        .join("/")
}
