//! Shadow mode against a fake host: every request is decided and counted as when enforced,
//! then goes on to the shop as the buyer sent it, stripped of gate headers and marked with
//! what the gate would have answered (`x-seckill-shadow`), never with a winner's headers.

use serde_json::json;

use super::fake::FakeHost;
use super::fake::{batch_reply, header, lost, won, Call, Gate};
use super::{Flow, SaleRequest};
use crate::reply::GateOutcome;

/// A gate whose every goods runs in shadow mode, with one goods of burst 1 to rate-limit.
fn shadow_gate() -> Gate {
    Gate::new(|c| {
        c["shadow"] = json!(true);
        c["rate_limit"]["goods"]["slow"] = json!({"per_second": 1, "burst": 1});
    })
}

/// Request `context` went on to the shop with exactly one gate header, the shadow mark
/// naming `outcome`, and the gate answered it nothing itself.
fn assert_forwarded_as(gate: &Gate, context: u32, outcome: &str) {
    let headers = gate.host.request_headers(context);
    let gate_headers: Vec<(String, String)> = headers
        .into_iter()
        .filter(|(name, _)| crate::input::is_gate_header(name))
        .collect();
    let mark = vec![("x-seckill-shadow".to_string(), outcome.to_string())];
    assert_eq!(gate_headers, mark, "request {context}");
    assert!(
        gate.replies().iter().all(|reply| reply.0 != context),
        "request {context} was answered by the gate"
    );
}

/// Counters by name, the zeros left out.
type Counts = Vec<(String, i64)>;

/// What the gate counted, as enforced (`seckill.outcome.*`) and as a dry run
/// (`seckill.shadow.*`).
fn counted(gate: &Gate) -> (Counts, Counts) {
    let count = |name: String| {
        let value = gate.host.counter(&name);
        (value != 0).then_some((name, value))
    };
    let outcomes = GateOutcome::ALL;
    let enforced = outcomes
        .iter()
        .filter_map(|o| count(o.stat_name()))
        .collect();
    let shadow = outcomes
        .iter()
        .filter_map(|o| count(o.shadow_stat_name()))
        .collect();
    (enforced, shadow)
}

#[test]
fn every_would_be_answer_goes_on_to_the_shop_marked_and_counted() {
    let mut gate = shadow_gate();
    let mut requests = Vec::new();
    // Every answer the syncer can give, each for a goods of its own (some are remembered).
    for (i, outcome) in seckill_api::Outcome::ALL.into_iter().enumerate() {
        let context = 10 + i as u32;
        let goods = format!("g-{}", outcome.as_str());
        let item = match outcome {
            seckill_api::Outcome::Won => won("g-won.1.1", 3),
            // Nothing left: remembered as sold out.
            seckill_api::Outcome::SoldOut => lost("sold_out", Some(0)),
            _ => lost(outcome.as_str(), None),
        };
        requests.push(gate.decide(context, &goods, item));
        assert_eq!(gate.resumed().last(), Some(&context), "{outcome:?}");
        assert_forwarded_as(&gate, context, outcome.as_str());
    }
    let calls = gate.dispatches().len();

    // The gate's own answers, decided in the request's own callback.
    let bad = [(":method", "POST"), (":path", "/seckill/hot/buy")];
    let wrong_method = [(":method", "GET"), (":path", "/seckill/hot/buy")];
    let near_miss = [(":method", "POST"), (":path", "/seckill/hot/buy/")];
    for (context, headers, outcome) in [
        (40, &bad, "bad_request"),
        (41, &wrong_method, "method_not_allowed"),
        (42, &near_miss, "bad_request"),
    ] {
        let (request, flow) = gate.request(context, headers);
        assert_eq!(flow, Flow::Continue, "{outcome}");
        assert_forwarded_as(&gate, context, outcome);
        requests.push(request);
    }
    // Remembered answers: a sold-out goods, a goods nobody sells, a full bucket.
    for (context, goods, outcome) in [
        (43, "g-sold_out", "sold_out"),
        (44, "g-unknown_goods", "unknown_goods"),
        (45, "slow", ""),
        (46, "slow", "rate_limited"),
    ] {
        let (request, flow) = gate.buy(context, goods, "bob");
        requests.push(request);
        if outcome.is_empty() {
            continue; // the bucket's one request: it waits for the syncer
        }
        assert_eq!(flow, Flow::Continue, "{outcome}");
        assert_forwarded_as(&gate, context, outcome);
    }
    gate.wake();
    assert_eq!(
        gate.dispatches().len(),
        calls + 1,
        "only the bucket's one request was asked about"
    );
    assert_eq!(gate.host.counter("seckill.soldout_cache.hit"), 1);
    assert_eq!(gate.host.counter("seckill.unknown_goods_cache.hit"), 1);
    // No answer from the syncer: what failure mode closed would have said.
    let token = gate.dispatches().last().unwrap().token;
    gate.answer(token, None, "");
    assert_eq!(gate.resumed().last(), Some(&45));
    assert_forwarded_as(&gate, 45, "unavailable");
    assert_eq!(gate.host.counter("seckill.callout.failed"), 1);
    assert!(gate.replies().is_empty(), "the gate answered nobody");

    let (enforced, shadow) = counted(&gate);
    assert_eq!(enforced, [], "nothing was enforced");
    let mut expected: Vec<(String, i64)> = seckill_api::Outcome::ALL
        .into_iter()
        .map(|o| {
            let again = matches!(
                o,
                seckill_api::Outcome::SoldOut | seckill_api::Outcome::UnknownGoods
            );
            (
                format!("seckill.shadow.{}", o.as_str()),
                1 + i64::from(again),
            )
        })
        .collect();
    expected.extend([
        ("seckill.shadow.rate_limited".to_string(), 1),
        ("seckill.shadow.bad_request".to_string(), 2),
        ("seckill.shadow.method_not_allowed".to_string(), 1),
        ("seckill.shadow.unavailable".to_string(), 1),
    ]);
    assert_eq!(shadow, expected);

    // The would-be winner's reservation is claimed like any other.
    gate.tick();
    let claim = gate.dispatches().pop().unwrap();
    assert_eq!(claim.path, "/v1/claims");
    assert_eq!(claim.body, Some(json!({"order_ids": ["g-won.1.1"]})));
}

#[test]
fn failure_mode_open_in_shadow_mode_is_marked_failed_open_not_failed_open_headers() {
    let mut gate = Gate::new(|c| {
        c["shadow"] = json!(true);
        c["deduct"]["failure_mode"] = json!("open");
    });
    let (mut request, _) = gate.buy(10, "hot", "alice");
    gate.wake();
    let token = gate.dispatches()[0].token;
    gate.answer(token, Some("504"), "");
    assert_eq!(gate.resumed(), [10]);
    assert_forwarded_as(&gate, 10, "failed_open");
    assert_eq!(
        gate.shop_answers(&mut request, 10, "200", "via_upstream"),
        Flow::Continue
    );
    assert_eq!(gate.host.response_headers(10).len(), 1, "only :status");
    let (enforced, shadow) = counted(&gate);
    assert_eq!(enforced, []);
    assert_eq!(shadow, [("seckill.shadow.failed_open".to_string(), 1)]);
}

/// A purchase of `hot` carrying forged gate headers, the shadow mark among them (with and
/// without a user id).
fn forged(gate: &mut Gate, context: u32, user: Option<&str>) -> (SaleRequest<FakeHost>, Flow) {
    let mut headers = vec![
        (":method", "POST"),
        (":path", "/seckill/hot/buy"),
        ("x-request-id", "r-forged"),
        ("x-seckill-shadow", "won"),
        ("x_seckill_shadow", "won"),
        ("x-seckill-order-id", "forged"),
    ];
    if let Some(user) = user {
        headers.push(("x-user-id", user));
    }
    gate.request(context, &headers)
}

#[test]
fn a_client_cannot_forge_the_shadow_mark() {
    let mut gate = shadow_gate();
    // Decided by the syncer: the gate's own mark replaces the forged one.
    let (_waiting, flow) = forged(&mut gate, 10, Some("alice"));
    assert_eq!(flow, Flow::Pause);
    gate.wake();
    let token = gate.dispatches()[0].token;
    gate.answer(
        token,
        Some("200"),
        &batch_reply(&[lost("sold_out", Some(0))]),
    );
    assert_forwarded_as(&gate, 10, "sold_out");
    // Decided in its own callback.
    let (_bad, flow) = forged(&mut gate, 11, None);
    assert_eq!(flow, Flow::Continue);
    assert_forwarded_as(&gate, 11, "bad_request");
    assert_eq!(gate.host.counter("seckill.headers_stripped"), 6);

    // Enforced: a forged mark is stripped like every gate header, and the winner carries
    // none.
    let mut gate = Gate::new(|_| {});
    let (_winner, _) = forged(&mut gate, 10, Some("alice"));
    gate.wake();
    let token = gate.dispatches()[0].token;
    gate.answer(token, Some("200"), &batch_reply(&[won("hot.1.1", 1)]));
    let headers = gate.host.request_headers(10);
    assert_eq!(header(&headers, "x-seckill-shadow"), None);
    assert_eq!(header(&headers, "x_seckill_shadow"), None);
    assert_eq!(header(&headers, "x-seckill-order-id"), Some("hot.1.1"));
}

#[test]
fn a_goods_overrides_the_filters_mode_both_ways() {
    // The filter in shadow mode, one goods enforced.
    let mut gate = Gate::new(|c| {
        c["shadow"] = json!(true);
        c["goods"] = json!({"live": {"shadow": false}});
    });
    let _live = gate.decide(10, "live", lost("sold_out", Some(0)));
    let _other = gate.decide(11, "other", lost("sold_out", Some(0)));
    assert_eq!(gate.only_reply(), (10, 409, "sold_out".into()));
    assert_forwarded_as(&gate, 11, "sold_out");
    let (_live_get, flow) = gate.request(12, &[(":method", "GET"), (":path", "/seckill/live/buy")]);
    assert_eq!(flow, Flow::Pause, "the enforced goods' 405");
    assert_eq!(gate.host.counter("seckill.outcome.sold_out"), 1);
    assert_eq!(gate.host.counter("seckill.shadow.sold_out"), 1);
    assert_eq!(gate.host.counter("seckill.outcome.method_not_allowed"), 1);

    // The filter enforced, one goods in shadow mode.
    let mut gate = Gate::new(|c| c["goods"] = json!({"dry": {"shadow": true}}));
    let _dry = gate.decide(10, "dry", lost("sold_out", Some(0)));
    let _other = gate.decide(11, "other", lost("sold_out", Some(0)));
    assert_eq!(gate.only_reply(), (11, 409, "sold_out".into()));
    assert_forwarded_as(&gate, 10, "sold_out");
    // Its bad requests and wrong methods are a dry run too, as far as its goods id can be
    // read; without a valid goods id the filter's own mode decides.
    let (_bad, flow) = gate.request(12, &[(":method", "POST"), (":path", "/seckill/dry/buy")]);
    assert_eq!(flow, Flow::Continue);
    assert_forwarded_as(&gate, 12, "bad_request");
    let (_get, flow) = gate.request(13, &[(":method", "GET"), (":path", "/seckill/dry/buy")]);
    assert_eq!(flow, Flow::Continue);
    assert_forwarded_as(&gate, 13, "method_not_allowed");
    let (_no_goods, flow) =
        gate.request(14, &[(":method", "POST"), (":path", "/seckill/dr%20y/buy")]);
    assert_eq!(flow, Flow::Pause);
    let (_near, flow) = gate.request(15, &[(":method", "POST"), (":path", "/seckill/dry/buy/")]);
    assert_eq!(flow, Flow::Pause);
    let answered: Vec<(u32, u32)> = gate.replies().iter().map(|r| (r.0, r.1)).collect();
    assert_eq!(answered, [(11, 409), (14, 400), (15, 400)]);
}

#[test]
fn a_shadow_winner_keeps_its_reservations_life_and_the_buyer_gets_the_shops_answer() {
    // The shop failed it: released as when enforced, but the response is not marked.
    let mut gate = shadow_gate();
    let mut request = gate.decide(10, "hot", won("hot.1.7", 4));
    assert_forwarded_as(&gate, 10, "won");
    let flow = gate.shop_answers(&mut request, 10, "503", "via_upstream");
    assert_eq!(flow, Flow::Pause, "the response waits for the release");
    let release = gate.dispatches().pop().unwrap();
    assert_eq!(
        (release.context, release.path.as_str()),
        (10, "/v1/orders/hot.1.7/release?reason=upstream_failed")
    );
    gate.release_answered(&mut request, 10, release.token, Some("200"));
    assert_eq!(
        gate.host.calls().last(),
        Some(&Call::ContinueResponse { context: 10 })
    );
    assert_eq!(gate.host.response_headers(10).len(), 1, "only :status");
    assert_eq!(gate.host.counter("seckill.release.sent"), 1);

    // The shop timed out: the reservation is kept, and the buyer hears the shop's answer.
    let mut gate = shadow_gate();
    let mut request = gate.decide(10, "hot", won("hot.1.7", 4));
    let flow = gate.shop_answers(&mut request, 10, "504", "upstream_response_timeout");
    assert_eq!(flow, Flow::Continue);
    assert_eq!(gate.dispatches().len(), 1, "no release");
    assert_eq!(gate.host.counter("seckill.upstream.unknown"), 1);
    assert_eq!(gate.host.response_headers(10).len(), 1, "only :status");

    // The shop took it: nothing to add to its answer.
    let mut gate = shadow_gate();
    let mut request = gate.decide(10, "hot", won("hot.1.7", 4));
    let flow = gate.shop_answers(&mut request, 10, "200", "via_upstream");
    assert_eq!(flow, Flow::Continue);
    assert_eq!(gate.host.response_headers(10).len(), 1, "only :status");
    assert_eq!(gate.host.counter("seckill.shadow.won"), 1);
    assert_eq!(gate.host.counter("seckill.outcome.won"), 0);
}
