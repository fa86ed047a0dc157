//! The root context against a fake host: batches formed and dispatched, answers settled onto
//! the requests that waited, failures of every kind, and the claims.

use std::time::Duration;

use serde_json::json;

use super::fake::{batch_reply, header, lost, won, Call, FakeHost, Gate, Op, ROOT};
use super::{Flow, LogLevel, Root};
use crate::batch::CALLOUTS_IN_FLIGHT_MAX;
use crate::BAD_CONFIG_LOG_PREFIX;

/// The `(user_id, request_id)` of each attempt in a deduct call's body.
fn attempts(body: &serde_json::Value) -> Vec<(String, String)> {
    let attempts = body["attempts"].as_array().expect("attempts");
    attempts
        .iter()
        .map(|a| {
            let field = |name: &str| a[name].as_str().unwrap_or_default().to_string();
            (field("user_id"), field("request_id"))
        })
        .collect()
}

/// The attempts of the last call dispatched.
fn last_call_attempts(gate: &Gate) -> Vec<(String, String)> {
    let call = gate.dispatches().pop().expect("a call");
    attempts(call.body.as_ref().expect("a body"))
}

/// Fills every deduct call slot with a lone request (contexts 200..), so later arrivals wait.
fn fill_call_slots(gate: &mut Gate) -> Vec<super::SaleRequest<FakeHost>> {
    let mut requests = Vec::new();
    for i in 0..CALLOUTS_IN_FLIGHT_MAX as u32 {
        let (request, flow) = gate.buy(200 + i, "hot", &format!("filler-{i}"));
        assert_eq!(flow, Flow::Pause);
        gate.wake();
        requests.push(request);
    }
    assert_eq!(gate.dispatches().len(), CALLOUTS_IN_FLIGHT_MAX);
    requests
}

#[test]
fn a_lone_request_wakes_the_root_which_sends_it_at_once() {
    let mut gate = Gate::new(|_| {});
    let (_request, flow) = gate.buy(10, "hot", "alice");
    assert_eq!(flow, Flow::Pause, "the request waits for its decision");
    assert!(gate.dispatches().is_empty(), "only the root dispatches");
    gate.wake();
    let calls = gate.host.calls();
    let [Call::Dispatch {
        context,
        cluster,
        headers,
        body,
        timeout,
        ..
    }] = calls.as_slice()
    else {
        panic!("one deduct call expected: {calls:?}");
    };
    assert_eq!((*context, cluster.as_str()), (ROOT, "syncer"));
    assert_eq!(*timeout, Duration::from_millis(300));
    for (name, value) in [
        (":method", "POST"),
        (":path", "/v1/deduct/batch"),
        (":authority", "seckill-syncer"),
        ("content-type", "application/json"),
        ("x-seckill-secret", "s3cret"),
    ] {
        assert_eq!(header(headers, name), Some(value), "{name}");
    }
    let body: serde_json::Value = serde_json::from_slice(body.as_deref().unwrap()).unwrap();
    assert_eq!(
        body,
        json!({"attempts": [{"goods_id": "hot", "user_id": "alice", "quantity": 1,
                             "request_id": "r10"}],
               "timeout_ms": 300})
    );
    assert_eq!(gate.host.counter("seckill.callout.sent"), 1);
    assert_eq!(gate.host.counter("seckill.callout.attempts"), 1);
}

#[test]
fn arrivals_while_every_call_is_out_share_the_next_call_and_each_gets_its_own_answer() {
    let mut gate = Gate::new(|_| {});
    let _fillers = fill_call_slots(&mut gate);
    let mut waiting = Vec::new();
    for (context, user) in [(30, "ann"), (31, "bob"), (32, "cy")] {
        let (request, flow) = gate.buy(context, "hot", user);
        assert_eq!(flow, Flow::Pause);
        waiting.push(request);
    }
    gate.wake();
    assert_eq!(
        gate.dispatches().len(),
        CALLOUTS_IN_FLIGHT_MAX,
        "no slot free"
    );

    // The first call's answer settles its request and frees a slot: the three leave together.
    let first = gate.dispatches()[0].token;
    gate.answer(first, Some("200"), &batch_reply(&[won("hot.1.1", 9)]));
    assert_eq!(gate.resumed(), vec![200]);
    let next = gate.dispatches().pop().unwrap();
    assert_eq!(next.context, ROOT);
    let users: Vec<String> = attempts(next.body.as_ref().unwrap())
        .into_iter()
        .map(|(user, _)| user)
        .collect();
    assert_eq!(users, ["ann", "bob", "cy"]);
    assert_eq!(gate.host.counter("seckill.callout.attempts"), 11);

    // Answers pair with attempts by position.
    let items = [
        won("hot.1.2", 3),
        lost("limit_reached", Some(3)),
        lost("duplicate", Some(3)),
    ];
    gate.answer(next.token, Some("200"), &batch_reply(&items));
    assert_eq!(gate.resumed(), vec![200, 30]);
    let order = gate.host.request_headers(30);
    assert_eq!(header(&order, "x-seckill-order-id"), Some("hot.1.2"));
    let replies: Vec<(u32, u32, String)> = gate
        .replies()
        .into_iter()
        .map(|(context, status, outcome, _)| (context, status, outcome))
        .collect();
    assert_eq!(
        replies,
        [
            (31, 409, "limit_reached".to_string()),
            (32, 409, "duplicate".to_string())
        ]
    );
}

#[test]
fn a_call_without_an_answer_fails_its_whole_batch_closed_logged_once() {
    let mut gate = Gate::new(|_| {});
    let (_a, _) = gate.buy(10, "hot", "alice");
    let (_b, _) = gate.buy(11, "hot", "bob");
    gate.wake();
    let call = gate.dispatches().pop().unwrap();
    assert_eq!(attempts(call.body.as_ref().unwrap()).len(), 2);
    let logged = gate.host.logs().len();
    gate.answer(call.token, None, "");
    let replies = gate.replies();
    assert_eq!(replies.len(), 2);
    for ((context, status, outcome, body), expected) in replies.iter().zip([10, 11]) {
        assert_eq!(
            (*context, *status, outcome.as_str()),
            (expected, 503, "unavailable")
        );
        assert_eq!(
            body["request_id"],
            format!("r{expected}"),
            "says what to retry with"
        );
    }
    assert!(gate.resumed().is_empty());
    assert_eq!(gate.host.counter("seckill.callout.failed"), 2);
    assert_eq!(gate.host.counter("seckill.outcome.unavailable"), 2);
    let new_logs = &gate.host.logs()[logged..];
    assert_eq!(new_logs.len(), 1, "{new_logs:?}");
    assert!(
        new_logs[0].1.contains("for 2 attempts got no response"),
        "{new_logs:?}"
    );
}

#[test]
fn answers_the_gate_cannot_trust_fail_the_batch() {
    for (status, body, why) in [
        (Some("503"), String::new(), "answered with status 503"),
        (Some("200"), "<html>".to_string(), "unreadable body"),
        (
            Some("200"),
            batch_reply(&[won("hot.1.1", 1), won("hot.1.2", 0)]),
            "answered 2 attempts of a batch of 1",
        ),
        (
            Some("200"),
            batch_reply(&[json!({"outcome": "won"})]),
            "without a usable order id",
        ),
    ] {
        let mut gate = Gate::new(|_| {});
        let (_request, token) = gate.buy_and_send(10, "hot");
        gate.answer(token, status, &body);
        let (context, status, _) = gate.only_reply();
        assert_eq!((context, status), (10, 503), "{why}");
        assert!(gate.resumed().is_empty(), "{why}");
        let logs = gate.host.logs();
        assert!(
            logs.iter().any(|(_, line)| line.contains(why)),
            "{why}: {logs:?}"
        );
    }
}

#[test]
fn failure_mode_open_forwards_the_batch_unmarked() {
    let mut gate = Gate::new(|c| c["deduct"]["failure_mode"] = json!("open"));
    let (mut request, _) = gate.buy(10, "hot", "alice");
    gate.wake();
    let token = gate.dispatches()[0].token;
    gate.answer(token, Some("504"), "");
    assert_eq!(gate.resumed(), vec![10]);
    assert!(gate.replies().is_empty());
    let headers = gate.host.request_headers(10);
    assert_eq!(header(&headers, "x-seckill-gate"), Some("failed-open"));
    assert_eq!(header(&headers, "x-seckill-order-id"), None);
    assert_eq!(
        gate.shop_answers(&mut request, 10, "200", "via_upstream"),
        Flow::Continue
    );
    let response = gate.host.response_headers(10);
    assert_eq!(header(&response, "x-seckill-outcome"), Some("failed_open"));
    assert_eq!(gate.host.counter("seckill.outcome.failed_open"), 1);
}

#[test]
fn a_missing_cluster_is_said_once_and_its_buyers_told_plainly() {
    let mut gate = Gate::new(|_| {});
    // Envoy refuses a call to a cluster it does not have with BadArgument.
    gate.host.refuse(Op::Dispatch);
    let mut requests = Vec::new();
    for context in 10..13 {
        let (request, _) = gate.buy(context, "hot", &format!("buyer-{context}"));
        gate.wake();
        requests.push(request);
    }
    assert!(gate.dispatches().is_empty());
    let replies = gate.replies();
    assert_eq!(replies.len(), 3, "every buyer is answered at once");
    for (_, status, outcome, body) in &replies {
        assert_eq!((*status, outcome.as_str()), (503, "unavailable"));
        let message = body["message"].as_str().unwrap();
        assert!(message.contains("misconfigured"), "{message}");
    }
    let said = |gate: &Gate, needle: &str| {
        let logs = gate.host.logs();
        logs.iter().filter(|(_, l)| l.contains(needle)).count()
    };
    let line = "deduct.cluster \"syncer\" is not a cluster of this Envoy (dispatch_http_call: BadArgument)";
    assert_eq!(
        said(&gate, line),
        1,
        "once, naming the cluster: {:?}",
        gate.host.logs()
    );
    assert!(gate
        .host
        .logs()
        .iter()
        .any(|(level, l)| *level == LogLevel::Error && l.contains(line)));
    assert_eq!(said(&gate, "for 1 attempts"), 0, "no line per batch");
    assert_eq!(gate.host.counter("seckill.callout.failed"), 3);
    // The cluster arrives: the next call goes out, and the log says so.
    gate.host.allow(Op::Dispatch);
    let (_next, _) = gate.buy(20, "hot", "bob");
    gate.wake();
    assert_eq!(last_call_attempts(&gate), [("bob".into(), "r20".into())]);
    assert_eq!(
        said(&gate, "deduct.cluster \"syncer\" takes calls again"),
        1
    );
    // Gone again: news again.
    gate.host.refuse(Op::Dispatch);
    let (_later, _) = gate.buy(21, "hot", "carol");
    gate.wake();
    assert_eq!(said(&gate, line), 2);
}

#[test]
fn a_call_refused_for_another_reason_is_an_ordinary_failure() {
    let mut gate = Gate::new(|_| {});
    gate.host.refuse_with(Op::Dispatch, super::HostStatus(10)); // InternalFailure
    let (_request, _) = gate.buy(10, "hot", "alice");
    gate.wake();
    let replies = gate.replies();
    assert_eq!(replies.len(), 1);
    let (_, status, _, body) = &replies[0];
    assert_eq!(*status, 503);
    assert!(body["message"]
        .as_str()
        .unwrap()
        .contains("retry with the same request id"));
    let logs = gate.host.logs();
    assert!(
        logs.iter()
            .any(|(_, l)| l.contains("for 1 attempts could not be dispatched (InternalFailure)")),
        "{logs:?}"
    );
    assert!(!logs.iter().any(|(_, l)| l.contains("is not a cluster")));
    // Nothing of it stays in flight: the next request gets a call of its own.
    gate.host.allow(Op::Dispatch);
    let (_next, _) = gate.buy(11, "hot", "bob");
    gate.wake();
    assert_eq!(last_call_attempts(&gate), [("bob".into(), "r11".into())]);
}

#[test]
fn an_answer_nobody_waits_for_is_ignored() {
    let mut gate = Gate::new(|_| {});
    let (_request, token) = gate.buy_and_send(10, "hot");
    gate.answer(token + 50, Some("200"), &batch_reply(&[won("hot.1.1", 1)]));
    assert!(gate.resumed().is_empty() && gate.replies().is_empty());
    let logs = gate.host.logs();
    assert!(
        logs.iter()
            .any(|(level, l)| *level == LogLevel::Warn
                && l.contains(&format!("token {}", token + 50)))
    );
    // The real answer is delivered once; a second copy of it changes nothing.
    gate.answer(token, Some("200"), &batch_reply(&[won("hot.1.1", 1)]));
    gate.answer(
        token,
        Some("200"),
        &batch_reply(&[lost("sold_out", Some(0))]),
    );
    assert_eq!(gate.resumed(), vec![10]);
    assert!(gate.replies().is_empty());
}

#[test]
fn requests_that_wait_past_the_timeout_for_a_call_slot_fail_without_a_call() {
    let mut gate = Gate::new(|_| {});
    let _fillers = fill_call_slots(&mut gate);
    let (_late, flow) = gate.buy(30, "hot", "late");
    assert_eq!(flow, Flow::Pause);
    gate.host.advance(Duration::from_millis(299));
    gate.tick();
    assert!(gate.replies().is_empty(), "still within deduct.timeout_ms");
    gate.host.advance(Duration::from_millis(2));
    gate.tick();
    assert_eq!(gate.only_reply(), (30, 503, "unavailable".into()));
    assert_eq!(
        gate.dispatches().len(),
        CALLOUTS_IN_FLIGHT_MAX,
        "no call for it"
    );
    let logs = gate.host.logs();
    assert!(
        logs.iter().any(|(_, l)| l.contains("waited 301 ms")),
        "{logs:?}"
    );
}

#[test]
fn a_request_gone_before_its_answer_is_skipped_and_the_rest_are_served() {
    let mut gate = Gate::new(|_| {});
    let (_ended, _) = gate.buy(10, "hot", "alice");
    let (dropped, _) = gate.buy(11, "hot", "bob");
    let (_kept, _) = gate.buy(12, "hot", "cy");
    gate.wake();
    let token = gate.dispatches()[0].token;
    // Context 10 is gone at the host (making it effective fails); 11's context was dropped.
    gate.host.end(10);
    drop(dropped);
    let items = [
        won("hot.1.1", 2),
        won("hot.1.2", 1),
        lost("duplicate", Some(1)),
    ];
    gate.answer(token, Some("200"), &batch_reply(&items));
    assert!(gate.resumed().is_empty());
    assert_eq!(gate.only_reply(), (12, 409, "duplicate".into()));
    assert_eq!(gate.host.counter("seckill.outcome.won"), 0);
    // The root acts as itself again: the next call is its own, and nobody's order is claimed.
    let (_next, _) = gate.buy(13, "hot", "dee");
    gate.wake();
    gate.tick();
    let calls = gate.dispatches();
    assert_eq!(calls.len(), 2, "{calls:?}");
    assert_eq!(
        (calls[1].context, calls[1].path.as_str()),
        (ROOT, "/v1/deduct/batch")
    );
}

#[test]
fn a_request_that_ends_while_queued_leaves_the_queue() {
    let mut gate = Gate::new(|_| {});
    let _fillers = fill_call_slots(&mut gate);
    let (queued, _) = gate.buy(30, "hot", "gone");
    let (_stays, _) = gate.buy(31, "hot", "stays");
    drop(queued);
    let first = gate.dispatches()[0].token;
    gate.answer(
        first,
        Some("200"),
        &batch_reply(&[lost("duplicate", Some(5))]),
    );
    assert_eq!(last_call_attempts(&gate), [("stays".into(), "r31".into())]);
}

#[test]
fn a_wake_up_the_host_refuses_fails_the_request_in_its_own_callback() {
    let mut gate = Gate::new(|_| {});
    gate.host.refuse(Op::Enqueue);
    let (_request, flow) = gate.buy(10, "hot", "alice");
    assert_eq!(flow, Flow::Pause);
    assert_eq!(gate.only_reply(), (10, 503, "unavailable".into()));
    assert_eq!(gate.host.counter("seckill.callout.failed"), 1);
    gate.host.allow(Op::Enqueue);
    let (_next, _) = gate.buy(11, "hot", "bob");
    gate.wake();
    let only_bob = [("bob".to_string(), "r11".to_string())];
    assert_eq!(last_call_attempts(&gate), only_bob, "alice was withdrawn");
}

#[test]
fn forwarded_winners_are_claimed_and_a_failed_claim_call_is_sent_again() {
    let mut gate = Gate::new(|_| {});
    let _request = gate.decide(10, "hot", won("hot.1.1", 4));
    assert_eq!(
        gate.dispatches().len(),
        1,
        "not a full call: it waits for the tick"
    );
    let claim_of = |gate: &Gate| {
        let calls = gate.dispatches();
        let claim = calls.last().unwrap().clone();
        assert_eq!(claim.path, "/v1/claims");
        assert_eq!(claim.body, Some(json!({"order_ids": ["hot.1.1"]})));
        claim.token
    };
    gate.tick();
    let claim = claim_of(&gate);
    let timeouts: Vec<Duration> = gate
        .host
        .calls()
        .into_iter()
        .filter_map(|c| match c {
            Call::Dispatch { timeout, .. } => Some(timeout),
            _ => None,
        })
        .collect();
    assert_eq!(timeouts.last(), Some(&Duration::from_secs(5)));
    gate.answer(claim, Some("503"), "");
    assert_eq!(gate.host.counter("seckill.claim.failed"), 1);
    gate.tick();
    let again = claim_of(&gate);
    assert_ne!(again, claim);
    gate.answer(again, Some("200"), r#"{"claimed":1,"late":0}"#);
    let sent = gate.dispatches().len();
    gate.tick();
    assert_eq!(
        gate.dispatches().len(),
        sent,
        "claimed: nothing left to send"
    );
    assert_eq!(gate.host.counter("seckill.claim.sent"), 2);
    assert_eq!(gate.host.counter("seckill.claim.ids"), 2);
}

#[test]
fn a_claim_call_the_host_refuses_waits_for_the_next_tick() {
    let mut gate = Gate::new(|_| {});
    let _request = gate.decide(10, "hot", won("hot.1.1", 4));
    gate.host.refuse(Op::Dispatch);
    gate.tick();
    assert_eq!(gate.dispatches().len(), 1);
    assert_eq!(gate.host.counter("seckill.claim.failed"), 1);
    gate.host.allow(Op::Dispatch);
    gate.tick();
    let calls = gate.dispatches();
    assert_eq!(
        calls.last().unwrap().body,
        Some(json!({"order_ids": ["hot.1.1"]}))
    );
}

#[test]
fn a_goods_first_confirmed_by_an_answer_gets_a_bucket_of_its_own() {
    let mut gate = Gate::new(|_| {});
    let (_request, _) = gate.buy(10, "fresh", "alice");
    gate.wake();
    assert!(!gate
        .host
        .shared_keys()
        .contains(&"seckill.rl.fresh".to_string()));
    let token = gate.dispatches()[0].token;
    gate.answer(
        token,
        Some("200"),
        &batch_reply(&[lost("duplicate", Some(5))]),
    );
    let keys = gate.host.shared_keys();
    assert!(keys.contains(&"seckill.rl.fresh".to_string()), "{keys:?}");
    assert!(keys.contains(&"seckill.rl.tracked".to_string()), "{keys:?}");
}

#[test]
fn a_configuration_is_refused_with_one_line_and_no_requests_follow() {
    let host = FakeHost::default();
    let mut root = Root::new(host.clone(), ROOT);
    // No configuration at all, then one with a wrong field.
    assert!(!root.configure());
    let logs = host.logs();
    assert_eq!(logs.len(), 1);
    assert_eq!(logs[0].0, LogLevel::Error);
    assert!(logs[0].1.starts_with(BAD_CONFIG_LOG_PREFIX), "{logs:?}");
    assert!(root.new_request(10).is_none());

    let mut gate = Gate::new(|_| {});
    let lines = gate.host.logs().len();
    gate.host.refuse(Op::PluginConfiguration);
    assert!(!gate.root.configure());
    let logs = gate.host.logs();
    assert_eq!(logs.len(), lines + 1);
    assert!(logs[lines]
        .1
        .contains("cannot read the plugin configuration: BadArgument"));
}

#[test]
fn host_refusals_while_configuring_refuse_the_filter() {
    for op in [Op::DefineCounter, Op::RegisterQueue, Op::TickPeriod] {
        let host = FakeHost::default();
        host.set_config(&super::fake::config());
        host.refuse(op);
        let mut root = Root::new(host.clone(), ROOT);
        assert!(!root.configure(), "{op:?}");
        let logs = host.logs();
        assert_eq!(logs.len(), 1, "{op:?}: {logs:?}");
        assert!(logs[0].1.contains("BadArgument"), "{op:?}: {logs:?}");
        assert!(root.new_request(10).is_none(), "{op:?}");
    }
}
