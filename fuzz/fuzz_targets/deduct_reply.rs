//! The filter's reading of the syncer's answers: a batch deduct reply
//! (`reply::read_batch_response`, then `reply::item_verdict` per buyer), a single deduct reply
//! (`DeductReply`, then `reply::verdict`) and a claim reply (`claims::read_claim_response`,
//! then `Claims::answered`). The input is the response body.
//!
//! Checked: nothing panics; a winner is forwarded only with an order id that is safe in a
//! header; every other answer becomes a well-formed local reply with its outcome's status; what
//! the filter logs about a bad answer is bounded and printable; a reply re-encodes to itself;
//! a claim reply puts back only ids its call carried.

#![no_main]

use libfuzzer_sys::fuzz_target;
use seckill_api::{BatchItem, DeductReply, Outcome, ID_LEN_MAX};
use seckill_filter::claims::{self, Claims, Retry};
use seckill_filter::reply::{self, CalloutFailure, Remember, Verdict, BATCH_REPLY_BYTES_MAX};
use seckill_fuzz::{assert_header_safe, assert_log_safe, assert_reply_well_formed, purchase};

const OK: Option<&[u8]> = Some(b"200");

fuzz_target!(|body: &[u8]| {
    batch(body);
    single(body);
    claim(body);
});

fn batch(body: &[u8]) {
    let items = match reply::read_batch_response(OK, Some(body), 1) {
        Ok(items) => items,
        // The same body for a batch of as many attempts as it answers.
        Err(CalloutFailure::Miscounted { sent: 1, answered }) => {
            reply::read_batch_response(OK, Some(body), answered).expect("the counted batch reads")
        }
        Err(failure @ (CalloutFailure::BadBody(_) | CalloutFailure::TooLarge(_))) => {
            assert_log_safe(&failure.to_string());
            return;
        }
        Err(other) => panic!("unexpected failure for a 200: {other:?}"),
    };
    for item in items {
        let encoded = serde_json::to_vec(&item).expect("an item encodes");
        let read: BatchItem = serde_json::from_slice(&encoded).expect("and reads back");
        assert_eq!(read, item);
        check(reply::item_verdict(purchase(), item));
    }
}

fn single(body: &[u8]) {
    let Ok(answer) = serde_json::from_slice::<DeductReply>(body) else {
        return;
    };
    let encoded = serde_json::to_vec(&answer).expect("a reply encodes");
    let read: DeductReply = serde_json::from_slice(&encoded).expect("and reads back");
    assert_eq!(read, answer);
    check(reply::verdict(purchase(), answer));
}

fn check(verdict: Result<Verdict, CalloutFailure>) {
    match verdict {
        Ok(Verdict::Forward(winner)) => {
            let order_id = &winner.order_id;
            assert!(!order_id.is_empty() && order_id.len() <= ID_LEN_MAX);
            assert!(
                order_id.bytes().all(|b| b.is_ascii_graphic()),
                "{order_id:?}"
            );
            for (name, value) in reply::winner_request_headers(purchase(), &winner) {
                assert_header_safe(name);
                assert_header_safe(&value);
            }
        }
        Ok(Verdict::Answer { reply, remember }) => {
            assert_reply_well_formed(&reply);
            let reply::GateOutcome::Decided(outcome) = reply.outcome else {
                panic!("an answer the stock service did not decide: {reply:?}");
            };
            assert_ne!(outcome, Outcome::Won);
            assert_eq!(reply.status, outcome.http_status());
            match remember {
                Remember::SoldOut => {
                    assert!(matches!(outcome, Outcome::SoldOut | Outcome::Ended))
                }
                Remember::UnknownGoods => assert_eq!(outcome, Outcome::UnknownGoods),
                Remember::Nothing => {}
            }
        }
        Err(failure) => assert_log_safe(&failure.to_string()),
    }
}

fn claim(body: &[u8]) {
    // The root reads no larger claim answer (`host/root.rs`).
    if body.len() > BATCH_REPLY_BYTES_MAX {
        return;
    }
    let retry = claims::read_claim_response(OK, Some(body));
    let sent = vec!["sku-1.1.1".to_owned(), "sku-1.1.2".to_owned()];
    let mut claims = Claims::default();
    claims.sent(7, sent.clone());
    let all = retry == Retry::All;
    claims.answered(7, retry);
    assert!(!claims.owns(7));
    let again = claims.next_call(true).unwrap_or_default();
    assert!(again.iter().all(|id| sent.contains(id)), "{again:?}");
    if all {
        assert_eq!(again, sent);
    }
}
