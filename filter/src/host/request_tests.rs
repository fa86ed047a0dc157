//! The request state machine against a fake host: local replies, the wait for a deduct
//! answer, the forwarded winner, and the shop's answer.

use std::time::Duration;

use serde_json::json;

use super::fake::{batch_reply, header, lost, won, Call, Gate, Op};
use super::{Flow, SaleRequest};
use crate::host::fake::FakeHost;

/// A winner of order `hot.1.7`, forwarded to the shop.
fn forwarded_winner(gate: &mut Gate) -> SaleRequest<FakeHost> {
    let request = gate.decide(10, "hot", won("hot.1.7", 4));
    assert_eq!(gate.resumed(), vec![10]);
    request
}

fn outcome_header(gate: &Gate, context: u32) -> Option<String> {
    let response = gate.host.response_headers(context);
    header(&response, "x-seckill-outcome").map(str::to_string)
}

#[test]
fn a_request_that_is_not_a_sale_passes_stripped_of_gate_headers() {
    let mut gate = Gate::new(|_| {});
    let (_request, flow) = gate.request(
        10,
        &[
            (":method", "GET"),
            (":path", "/catalog"),
            ("x-seckill-order-id", "forged"),
            ("x_seckill_user_id", "forged"),
            ("x-seckill-order-id", "forged-again"),
            ("x-other", "kept"),
        ],
    );
    assert_eq!(flow, Flow::Continue);
    let names: Vec<String> = gate
        .host
        .request_headers(10)
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert_eq!(names, [":method", ":path", "x-other"]);
    assert_eq!(gate.host.counter("seckill.passthrough"), 1);
    assert_eq!(gate.host.counter("seckill.headers_stripped"), 3);
    assert!(gate.host.calls().is_empty(), "no reply, no callout");
}

#[test]
fn bad_input_is_answered_400_and_spends_nothing() {
    let mut gate = Gate::new(|_| {});
    let (_request, flow) = gate.request(10, &[(":method", "POST"), (":path", "/seckill/hot/buy")]);
    assert_eq!(flow, Flow::Pause);
    let replies = gate.replies();
    let (context, status, outcome, body) = &replies[0];
    assert_eq!(
        (*context, *status, outcome.as_str()),
        (10, 400, "bad_request")
    );
    assert!(
        body["message"].as_str().unwrap().contains("user id"),
        "{body}"
    );
    gate.wake();
    assert!(gate.dispatches().is_empty(), "no callout");
    assert!(
        !gate
            .host
            .shared_keys()
            .iter()
            .any(|k| k.starts_with("seckill.rl.hot")),
        "no token spent"
    );
}

#[test]
fn the_sale_route_with_another_method_or_a_near_miss_path_is_refused() {
    let mut gate = Gate::new(|_| {});
    let (_get, flow) = gate.request(10, &[(":method", "GET"), (":path", "/seckill/hot/buy")]);
    assert_eq!(flow, Flow::Pause);
    let (_near, _) = gate.request(11, &[(":method", "POST"), (":path", "/seckill/hot/buy/")]);
    let calls = gate.host.calls();
    let Call::Reply {
        status, headers, ..
    } = &calls[0]
    else {
        panic!("{calls:?}")
    };
    assert_eq!((*status, header(headers, "allow")), (405, Some("POST")));
    let replies = gate.replies();
    assert_eq!((replies[1].0, replies[1].1), (11, 400));
    assert!(replies[1].3["message"]
        .as_str()
        .unwrap()
        .contains("resembles the sale route"));
}

#[test]
fn a_winner_waits_then_is_forwarded_with_its_order_and_no_forged_gate_headers() {
    let mut gate = Gate::new(|_| {});
    let (mut request, flow) = gate.request(
        10,
        &[
            (":method", "POST"),
            (":path", "/seckill/hot/buy"),
            ("x-user-id", "alice"),
            ("x-request-id", "r10"),
            ("x-seckill-order-id", "forged"),
            ("x-seckill-pass", "forged"),
            ("x-seckill-order-id", "forged"),
        ],
    );
    assert_eq!(flow, Flow::Pause);
    assert_eq!(
        request.on_request_data(),
        Flow::Pause,
        "body held while deciding"
    );
    gate.wake();
    let token = gate.dispatches()[0].token;
    let mut winner = won("hot.1.7", 4);
    winner["pass"] = "signed.by.syncer".into();
    gate.answer(token, Some("200"), &batch_reply(&[winner]));
    assert_eq!(gate.resumed(), vec![10]);
    assert_eq!(
        request.on_request_data(),
        Flow::Continue,
        "decided: the body may go"
    );
    let headers = gate.host.request_headers(10);
    for (name, value) in [
        ("x-seckill-order-id", "hot.1.7"),
        ("x-seckill-pass", "signed.by.syncer"),
        ("x-seckill-remaining", "4"),
        ("x-seckill-goods-id", "hot"),
        ("x-seckill-user-id", "alice"),
        ("x-seckill-quantity", "1"),
    ] {
        assert_eq!(header(&headers, name), Some(value), "{name}");
    }
    assert!(!headers.iter().any(|(_, v)| v == "forged"), "{headers:?}");
    // Added, not set (see `forward_winner`): one copy each, as the forged ones were stripped.
    let gate_headers = headers.iter().filter(|(n, _)| n.starts_with("x-seckill-"));
    assert_eq!(gate_headers.count(), 6, "{headers:?}");

    assert_eq!(
        gate.shop_answers(&mut request, 10, "201", "via_upstream"),
        Flow::Continue
    );
    let response = gate.host.response_headers(10);
    assert_eq!(header(&response, "x-seckill-outcome"), Some("won"));
    assert_eq!(header(&response, "x-seckill-order-id"), Some("hot.1.7"));
    assert_eq!(gate.host.counter("seckill.outcome.won"), 1);
    assert!(gate
        .dispatches()
        .iter()
        .all(|d| !d.path.contains("release")));
}

#[test]
fn a_definite_shop_failure_releases_the_reservation_before_the_buyer_hears() {
    for (release_status, failed) in [(Some("200"), 0), (Some("500"), 1), (None, 1)] {
        let mut gate = Gate::new(|_| {});
        let mut request = forwarded_winner(&mut gate);
        let flow = gate.shop_answers(&mut request, 10, "503", "via_upstream");
        assert_eq!(flow, Flow::Pause, "the response waits for the release");
        let release = gate.dispatches().pop().unwrap();
        assert_eq!(release.context, 10, "the request's own callout");
        assert_eq!(
            release.path,
            "/v1/orders/hot.1.7/release?reason=upstream_failed"
        );
        assert_eq!(release.body, None);
        let calls = gate.host.calls();
        let Some(Call::Dispatch { headers, .. }) = calls.last() else {
            panic!()
        };
        assert_eq!(header(headers, "x-seckill-secret"), Some("s3cret"));
        assert_eq!(header(headers, "content-type"), None);
        assert_eq!(
            outcome_header(&gate, 10).as_deref(),
            Some("upstream_failed")
        );
        assert_eq!(gate.host.counter("seckill.release.sent"), 1);

        gate.release_answered(&mut request, 10, release.token, release_status);
        let resumed = gate.host.calls().last().cloned();
        assert_eq!(resumed, Some(Call::ContinueResponse { context: 10 }));
        assert_eq!(
            gate.host.counter("seckill.release.failed"),
            failed,
            "{release_status:?}"
        );
    }
}

#[test]
fn a_timeout_or_a_reset_keeps_the_reservation() {
    for (status, details) in [
        ("504", "upstream_response_timeout"),
        (
            "503",
            "upstream_reset_before_response_started{remote_reset}",
        ),
        ("504", "via_upstream"),
    ] {
        let mut gate = Gate::new(|_| {});
        let mut request = forwarded_winner(&mut gate);
        assert_eq!(
            gate.shop_answers(&mut request, 10, status, details),
            Flow::Continue
        );
        assert_eq!(gate.dispatches().len(), 1, "no release for {details}");
        assert_eq!(
            outcome_header(&gate, 10).as_deref(),
            Some("upstream_unknown")
        );
        assert_eq!(gate.host.counter("seckill.upstream.unknown"), 1);
        // The buyer's retry must skip the native sold-out route: the cookie says so, beside
        // any cookie of the shop's.
        let cookies: Vec<_> = gate
            .host
            .response_headers(10)
            .into_iter()
            .filter(|(name, _)| name == "set-cookie")
            .map(|(_, value)| value)
            .collect();
        assert_eq!(cookies, [seckill_api::fast_path::RETRY_COOKIE_SET]);
    }
}

#[test]
fn an_answered_winner_gets_no_retry_cookie() {
    let mut gate = Gate::new(|_| {});
    let mut request = forwarded_winner(&mut gate);
    gate.shop_answers(&mut request, 10, "200", "via_upstream");
    let headers = gate.host.response_headers(10);
    assert!(
        !headers.iter().any(|(name, _)| name == "set-cookie"),
        "{headers:?}"
    );
}

#[test]
fn a_release_the_host_refuses_is_left_to_the_sweeper() {
    let mut gate = Gate::new(|_| {});
    let mut request = forwarded_winner(&mut gate);
    gate.host.refuse(Op::Dispatch);
    let flow = gate.shop_answers(&mut request, 10, "503", "no_healthy_upstream");
    assert_eq!(flow, Flow::Continue);
    assert_eq!(gate.dispatches().len(), 1);
    assert_eq!(
        outcome_header(&gate, 10).as_deref(),
        Some("upstream_failed")
    );
    assert_eq!(gate.host.counter("seckill.release.failed"), 1);
    // A stray answer for a token it does not hold changes nothing.
    gate.release_answered(&mut request, 10, 999, Some("200"));
    assert!(!gate
        .host
        .calls()
        .contains(&Call::ContinueResponse { context: 10 }));
}

#[test]
fn no_release_when_the_configuration_says_so() {
    let mut gate = Gate::new(|c| c["release_on_upstream_failure"] = json!(false));
    let mut request = forwarded_winner(&mut gate);
    let flow = gate.shop_answers(&mut request, 10, "502", "via_upstream");
    assert_eq!(flow, Flow::Continue);
    assert_eq!(gate.dispatches().len(), 1);
    assert_eq!(outcome_header(&gate, 10).as_deref(), Some("won"));
}

#[test]
fn a_sold_out_answer_is_cached_for_every_later_buyer_until_it_expires() {
    let mut gate = Gate::new(|_| {});
    let _first = gate.decide(10, "hot", lost("sold_out", Some(0)));
    assert_eq!(gate.replies()[0].1, 409);
    assert!(gate
        .host
        .shared_keys()
        .contains(&"seckill.soldout.hot".to_string()));
    let calls = gate.dispatches().len();

    let (_second, flow) = gate.buy(11, "hot", "bob");
    assert_eq!(flow, Flow::Pause);
    let (context, status, outcome, body) = gate.replies().pop().unwrap();
    assert_eq!((context, status, outcome.as_str()), (11, 409, "sold_out"));
    assert_eq!(body["remaining"], 0);
    gate.wake();
    assert_eq!(gate.dispatches().len(), calls, "answered without a callout");
    assert_eq!(gate.host.counter("seckill.soldout_cache.hit"), 1);
    assert_eq!(gate.host.counter("seckill.outcome.sold_out"), 2);

    // sold_out_cache_ms is 2000: past it the syncer is asked again.
    gate.host.advance(Duration::from_millis(2_001));
    let (_third, _) = gate.buy(12, "hot", "cy");
    gate.wake();
    assert_eq!(gate.dispatches().len(), calls + 1);
}

#[test]
fn a_buyer_told_to_retry_reaches_the_syncer_past_the_sold_out_cache() {
    let mut gate = Gate::new(|_| {});
    let (_first, _) = gate.buy(10, "hot", "alice");
    gate.wake();
    let token = gate.dispatches()[0].token;
    gate.answer(token, None, "");
    assert_eq!(gate.replies()[0].1, 503, "told to retry with r10");
    let _other = gate.decide(11, "hot", lost("sold_out", Some(0)));
    let calls = gate.dispatches().len();
    // The retry, on this worker, with the same request id.
    let (_retry, flow) = gate.request(
        20,
        &[
            (":method", "POST"),
            (":path", "/seckill/hot/buy"),
            ("x-user-id", "alice"),
            ("x-request-id", "r10"),
        ],
    );
    assert_eq!(flow, Flow::Pause);
    gate.wake();
    assert_eq!(
        gate.dispatches().len(),
        calls + 1,
        "the syncer decides the retry"
    );
    assert_eq!(gate.host.counter("seckill.soldout_cache.hit"), 0);
}

#[test]
fn unknown_goods_is_answered_by_this_worker_for_a_while() {
    let mut gate = Gate::new(|_| {});
    let _first = gate.decide(10, "nope", lost("unknown_goods", None));
    let calls = gate.dispatches().len();
    let (_second, _) = gate.buy(11, "nope", "bob");
    let (context, status, outcome, _) = gate.replies().pop().unwrap();
    assert_eq!(
        (context, status, outcome.as_str()),
        (11, 404, "unknown_goods")
    );
    gate.wake();
    assert_eq!(gate.dispatches().len(), calls);
    assert_eq!(gate.host.counter("seckill.unknown_goods_cache.hit"), 1);
    let keys = gate.host.shared_keys();
    assert!(
        !keys.iter().any(|k| k.ends_with(".nope")),
        "never in shared data: {keys:?}"
    );
}

#[test]
fn over_the_rate_is_answered_429_without_a_callout() {
    let mut gate = Gate::new(|c| {
        c["rate_limit"]["goods"]["hot"] = json!({"per_second": 1, "burst": 1});
    });
    let (_first, _) = gate.buy(10, "hot", "alice");
    let (_second, flow) = gate.buy(11, "hot", "bob");
    assert_eq!(flow, Flow::Pause);
    let calls = gate.host.calls();
    let Some(Call::Reply {
        context,
        status,
        headers,
        ..
    }) = calls.last()
    else {
        panic!("{calls:?}")
    };
    assert_eq!((*context, *status), (11, 429));
    assert_eq!(header(headers, "retry-after"), Some("1"));
    gate.wake();
    let call = gate.dispatches().pop().unwrap();
    assert_eq!(
        call.body.unwrap()["attempts"].as_array().unwrap().len(),
        1,
        "only alice"
    );
    assert_eq!(gate.host.counter("seckill.outcome.rate_limited"), 1);
}

#[test]
fn request_headers_the_host_will_not_give_are_answered_503() {
    let mut gate = Gate::new(|_| {});
    gate.host.refuse(Op::RequestHeaderMap);
    let (_request, flow) = gate.buy(10, "hot", "alice");
    assert_eq!(flow, Flow::Pause);
    assert_eq!(gate.only_reply(), (10, 503, "unavailable".into()));
    let logs = gate.host.logs();
    assert!(logs
        .iter()
        .any(|(_, l)| l.contains("cannot read the request headers")));
}

#[test]
fn shared_data_the_host_will_not_read_counts_as_absent() {
    let mut gate = Gate::new(|_| {});
    let _first = gate.decide(10, "hot", lost("sold_out", Some(0)));
    // This worker remembers the mark itself; a worker that does not (a new configuration
    // clears the memory) and cannot read shared data asks the syncer rather than trap.
    gate.host.enter(super::fake::ROOT);
    assert!(gate.root.configure());
    gate.host.refuse(Op::SharedGet);
    let (_second, flow) = gate.buy(11, "hot", "bob");
    assert_eq!(flow, Flow::Pause);
    gate.wake();
    assert_eq!(gate.dispatches().len(), 2);
    assert_eq!(gate.host.counter("seckill.soldout_cache.hit"), 0);
}

#[test]
fn a_clock_the_host_will_not_read_still_gates() {
    let mut gate = Gate::new(|_| {});
    gate.host.refuse(Op::Time);
    let (_request, flow) = gate.buy(10, "hot", "alice");
    assert_eq!(flow, Flow::Pause);
    gate.wake();
    assert_eq!(gate.dispatches().len(), 1);
}

#[test]
fn a_local_reply_the_host_refuses_ends_nothing_else() {
    let mut gate = Gate::new(|_| {});
    gate.host.refuse(Op::SendLocalReply);
    let (_request, flow) = gate.request(10, &[(":method", "POST"), (":path", "/seckill/hot/buy")]);
    assert_eq!(flow, Flow::Pause);
    assert!(gate.host.calls().is_empty());
    assert_eq!(gate.host.counter("seckill.outcome.bad_request"), 1);
}

/// The reject paths are the hot path of a sale. On a warm worker a sold-out goods costs the
/// header read, the clock, two counters and the reply; a rate-limited one the read of its
/// (absent) sold-out key instead of the cache-hit counter. Not one host call more.
#[test]
fn the_reject_paths_cost_no_more_host_calls_than_they_must() {
    let mut gate = Gate::new(|c| {
        c["rate_limit"]["goods"]["slow"] = json!({"per_second": 1, "burst": 1});
    });
    let _sold_out = gate.decide(10, "hot", lost("sold_out", Some(0)));
    let (_first, _) = gate.buy(11, "slow", "ann");
    let (_refused, _) = gate.buy(12, "slow", "bob");
    gate.host.take_trace();

    let (_cached, _) = gate.buy(13, "hot", "cy");
    let sold_out = [
        "request_header_map",
        "current_time_ns",
        "increment_counter",
        "increment_counter",
        "send_local_reply",
    ];
    assert_eq!(gate.host.take_trace(), sold_out);

    let (_limited, _) = gate.buy(14, "slow", "dee");
    let rate_limited = [
        "request_header_map",
        "current_time_ns",
        "shared_get",
        "increment_counter",
        "send_local_reply",
    ];
    assert_eq!(gate.host.take_trace(), rate_limited);
    let replies: Vec<(u32, u32)> = gate.replies().iter().map(|r| (r.0, r.1)).collect();
    assert_eq!(replies, [(10, 409), (12, 429), (13, 409), (14, 429)]);
}
