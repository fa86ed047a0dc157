//! The filter's request extraction, as `on_http_request_headers` runs it: the host's
//! serialized header map read in place (`input::parse_header_map`), then classified under a
//! configuration (`input::classify`: route, method, goods id, user id, quantity and request id
//! from the path, the query string and the headers), then answered. The first input byte
//! chooses the configuration (`seckill_fuzz::REQUEST_CONFIGS`); the rest is the header map,
//! or, when it is not one, `name:value` lines (one length wrong makes a map unreadable, so the
//! lines let mutations reach the classification too).
//!
//! Checked: nothing panics; a map re-serializes to what it was read as; forged `x-seckill-*`
//! headers change no decision; a valid purchase holds only ids and a quantity the
//! configuration allows, and makes a deduct body that reads back as itself; every refusal is a
//! well-formed local reply whose message is bounded and printable.

#![no_main]

use libfuzzer_sys::fuzz_target;
use seckill_api::{validate_id, DeductRequest};
use seckill_filter::input::{self, Classified, HeaderPair};
use seckill_filter::reply;
use seckill_fuzz::{assert_log_safe, assert_reply_well_formed, request_configs};

fuzz_target!(|data: &[u8]| {
    let Some((&choice, map)) = data.split_first() else {
        return;
    };
    let configs = request_configs();
    let config = &configs[usize::from(choice) % configs.len()];
    let headers = match input::parse_header_map(map) {
        Some(headers) => {
            let written = input::serialize_header_map(headers.iter().copied());
            assert_eq!(
                input::parse_header_map(&written).as_deref(),
                Some(&headers[..])
            );
            headers
        }
        None => header_lines(map),
    };

    let classified = input::classify(config, &headers);
    // The filter strips the gate's headers before it classifies; even unstripped, a forged
    // one must not change the decision.
    let unforged: Vec<_> = headers
        .iter()
        .copied()
        .filter(|h| !input::is_gate_header(h.name()))
        .collect();
    assert_eq!(input::classify(config, &unforged), classified);

    match classified {
        Classified::NotSale => {}
        Classified::Sale(Ok(purchase)) => {
            for id in [
                purchase.goods_id(),
                purchase.user_id(),
                purchase.request_id(),
            ] {
                assert_eq!(validate_id(id, config.id_len_max), Ok(()), "{id:?}");
            }
            assert!((1..=config.quantity.max).contains(&purchase.quantity()));
            let body = serde_json::to_vec(purchase.deduct_request()).expect("a deduct body");
            let read: DeductRequest = serde_json::from_slice(&body).expect("it reads back");
            assert_eq!(&read, purchase.deduct_request());
        }
        Classified::Sale(Err(bad)) => {
            assert_log_safe(&bad.message);
            assert_reply_well_formed(&reply::bad_request(&bad.message));
        }
        Classified::WrongMethod => {
            assert_reply_well_formed(&reply::method_not_allowed(&config.route.methods));
        }
        Classified::NearMiss => {
            assert_reply_well_formed(&reply::not_the_sale_path(config.route.template.as_str()));
        }
    }
});

/// `name:value` lines; a pseudo-header's name keeps its leading `:` (`:path:/a` is `:path`).
fn header_lines(text: &[u8]) -> Vec<(&[u8], &[u8])> {
    text.split(|b| *b == b'\n')
        .filter_map(|line| {
            let colon = line.iter().skip(1).position(|b| *b == b':')? + 1;
            Some((&line[..colon], &line[colon + 1..]))
        })
        .collect()
}
