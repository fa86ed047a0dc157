//! What the fuzz targets share: the plugin configurations the request target runs under, the
//! layout of its input, and the checks every local reply and log text must pass.
//!
//! The targets (`fuzz_targets/`) call the real parsers of the filter (`seckill-filter`) and the
//! syncer (`seckill-model`); `examples/make_seeds.rs` writes the seed corpora from the same
//! shapes.

use std::sync::OnceLock;

use seckill_filter::config::Config;
use seckill_filter::input::{self, Classified, Purchase};
use seckill_filter::reply::LocalReply;

/// Plugin configurations the request target classifies under, each a different way to read
/// the four inputs. The first is the tests' own (`tests/src/stack.rs`), the second the shipped
/// production one (`envoy/production.yaml`) with two methods, the third reads everything
/// from places the others do not.
pub const REQUEST_CONFIGS: [&str; 3] = [
    r#"{
        "route": { "methods": ["POST"], "path_template": "/seckill/{goods_id}/buy" },
        "goods_id": { "path": "goods_id" },
        "user_id": { "header": "x-user-id" },
        "quantity": { "source": { "query": "qty" }, "default": 1, "max": 5 },
        "request_id": { "header": "x-request-id" },
        "deduct": { "cluster": "seckill_syncer", "timeout_ms": 10000, "secret": "s" },
        "rate_limit": { "default": { "per_second": 1000000.0, "burst": 1000000 } },
        "sold_out_cache_ms": 60000
    }"#,
    r#"{
        "route": { "methods": ["POST", "PUT"], "path_template": "/api/seckill/{goods_id}/buy" },
        "goods_id": { "path": "goods_id" },
        "user_id": { "header": "x-user-id" },
        "quantity": { "source": { "query": "qty" }, "default": 1, "max": 2 },
        "request_id": { "header": "x-request-id" },
        "deduct": { "cluster": "seckill_syncer", "timeout_ms": 300, "secret": "s" },
        "rate_limit": { "default": { "per_second": 2000, "burst": 200 } }
    }"#,
    r#"{
        "route": { "path_template": "/v2/{shop}/orders/{request}" },
        "goods_id": { "query": "goods" },
        "user_id": { "header": "X-Buyer" },
        "quantity": { "source": { "header": "x-qty" }, "default": 2, "max": 1000 },
        "request_id": { "path": "request" },
        "id_len_max": 16,
        "deduct": { "cluster": "syncer", "secret": "s" },
        "rate_limit": { "default": { "per_second": 0.5, "burst": 1 } }
    }"#,
];

/// The compiled [`REQUEST_CONFIGS`], compiled once per process.
pub fn request_configs() -> &'static [Config] {
    static CONFIGS: OnceLock<Vec<Config>> = OnceLock::new();
    CONFIGS.get_or_init(|| {
        REQUEST_CONFIGS
            .iter()
            .map(|json| Config::from_json(Some(json.as_bytes())).expect("a valid configuration"))
            .collect()
    })
}

/// The request target's input: one byte choosing the configuration (modulo their count), then
/// the request headers as the host serializes them (what `input::parse_header_map` reads).
/// ([`request_lines`] writes the target's other form.)
pub fn request_input(config: u8, headers: &[(&str, &str)]) -> Vec<u8> {
    let pairs = headers
        .iter()
        .map(|(name, value)| (name.as_bytes(), value.as_bytes()));
    let mut input = vec![config];
    input.extend(input::serialize_header_map(pairs));
    input
}

/// The request target's input in its other form: `name:value` lines after the byte choosing
/// the configuration.
pub fn request_lines(config: u8, headers: &[(&str, &str)]) -> Vec<u8> {
    let lines: Vec<String> = headers
        .iter()
        .map(|(name, value)| format!("{name}:{value}"))
        .collect();
    let mut input = vec![config];
    input.extend(lines.join("\n").into_bytes());
    input
}

/// A valid purchase under the first configuration: what the deduct reply target's answers
/// are about.
pub fn purchase() -> &'static Purchase {
    static PURCHASE: OnceLock<Purchase> = OnceLock::new();
    PURCHASE.get_or_init(|| {
        let headers: [(&[u8], &[u8]); 4] = [
            (b":method", b"POST"),
            (b":path", b"/seckill/sku-1/buy?qty=2"),
            (b"x-user-id", b"u-42"),
            (b"x-request-id", b"r-7"),
        ];
        match input::classify(&request_configs()[0], &headers) {
            Classified::Sale(Ok(purchase)) => purchase,
            other => panic!("the fixture is not a valid sale: {other:?}"),
        }
    })
}

/// Longest text a parser may put in a log line, an error body or a dead letter's reason about
/// input it refused, whatever the input's size.
pub const LOG_TEXT_LEN_MAX: usize = 1024;

/// Text about untrusted input that goes to a log line: bounded, and no control character
/// that could forge a line of its own.
pub fn assert_log_safe(text: &str) {
    assert!(
        text.len() <= LOG_TEXT_LEN_MAX,
        "{} bytes of log text (at most {LOG_TEXT_LEN_MAX}): {:?}...",
        text.len(),
        text.chars().take(200).collect::<String>()
    );
    assert!(
        !text.chars().any(char::is_control),
        "a control character in log text: {text:?}"
    );
}

/// A header value the gate sets: visible ASCII and spaces only (no CR, LF or NUL).
pub fn assert_header_safe(value: &str) {
    assert!(
        value.bytes().all(|b| b == b' ' || b.is_ascii_graphic()),
        "not a safe header value: {value:?}"
    );
}

/// Every local reply the gate sends: a JSON body, safe headers, the status its outcome names.
pub fn assert_reply_well_formed(reply: &LocalReply) {
    serde_json::from_str::<serde_json::Value>(&reply.body)
        .unwrap_or_else(|e| panic!("the reply body is not JSON ({e}): {:?}", reply.body));
    assert!((400..=599).contains(&reply.status), "{reply:?}");
    for (name, value) in &reply.headers {
        assert_header_safe(name);
        assert_header_safe(value);
    }
    assert!(
        reply.body.len() <= 4 * LOG_TEXT_LEN_MAX,
        "a {}-byte reply body",
        reply.body.len()
    );
}
