//! The dispatcher against a fake host: every callback reaches the context it names, requests
//! of a root that has no configuration are refused, and a deleted request is never acted on.

use std::collections::HashSet;
use std::hash::{BuildHasher, BuildHasherDefault};

use serde_json::{json, Value};

use super::dispatch::{Contexts, IdHasher};
use super::fake::{batch_reply, config, header, won, Call, FakeHost, ROOT};
use super::Flow;

/// A VM with one configured root context.
fn vm() -> (FakeHost, Contexts<FakeHost>) {
    let host = FakeHost::default();
    host.set_config(&config());
    let mut contexts = Contexts::new(host.clone());
    host.enter(ROOT);
    contexts.create(ROOT, 0);
    assert!(contexts.configure(ROOT), "{:?}", host.logs());
    (host, contexts)
}

/// Request `context` of `root` arrives with these headers; its header callback's answer.
fn arrive(
    host: &FakeHost,
    contexts: &mut Contexts<FakeHost>,
    context: u32,
    root: u32,
    headers: &[(&str, &str)],
) -> Flow {
    host.arrive(context, headers);
    contexts.create(context, root);
    host.enter(context);
    contexts.request_headers(context)
}

fn buy(host: &FakeHost, contexts: &mut Contexts<FakeHost>, context: u32, user: &str) -> Flow {
    let request_id = format!("r{context}");
    let headers = [
        (":method", "POST"),
        (":path", "/seckill/hot/buy"),
        ("x-user-id", user),
        ("x-request-id", request_id.as_str()),
    ];
    arrive(host, contexts, context, ROOT, &headers)
}

fn replies(host: &FakeHost) -> Vec<(u32, u32)> {
    host.calls()
        .into_iter()
        .filter_map(|call| match call {
            Call::Reply {
                context, status, ..
            } => Some((context, status)),
            _ => None,
        })
        .collect()
}

fn resumed(host: &FakeHost) -> Vec<u32> {
    host.calls()
        .into_iter()
        .filter_map(|call| match call {
            Call::ContinueRequest { context } => Some(context),
            _ => None,
        })
        .collect()
}

/// Tokens of the callouts dispatched so far, with the context that made each.
fn dispatched(host: &FakeHost) -> Vec<(u32, u32)> {
    host.calls()
        .into_iter()
        .filter_map(|call| match call {
            Call::Dispatch { context, token, .. } => Some((context, token)),
            _ => None,
        })
        .collect()
}

/// The root wakes (its queue, the first the fake hands out) and sends what waits.
fn wake(host: &FakeHost, contexts: &mut Contexts<FakeHost>) {
    host.enter(ROOT);
    contexts.queue_ready(ROOT, 0);
}

/// The syncer's answer to deduct call `token` reaches the root.
fn answer(host: &FakeHost, contexts: &mut Contexts<FakeHost>, token: u32, items: &[Value]) {
    let body = batch_reply(items);
    host.set_call_response(Some("200"), &body);
    host.enter(ROOT);
    contexts.http_call_response(ROOT, token, 1, body.len());
}

#[test]
fn a_request_answered_locally_lives_until_its_delete() {
    let (host, mut contexts) = vm();
    let flow = arrive(
        &host,
        &mut contexts,
        10,
        ROOT,
        &[(":method", "POST"), (":path", "/seckill/hot/buy")],
    );
    assert_eq!(flow, Flow::Pause);
    assert_eq!(replies(&host), [(10, 400)]);
    // Envoy passes the local reply back through the filter's response callback.
    assert_eq!(contexts.response_headers(10), Flow::Continue);
    assert_eq!(contexts.requests(), 1);
    contexts.delete(10);
    assert_eq!((contexts.requests(), contexts.roots()), (0, 1));
}

#[test]
fn a_deduct_answer_reaches_the_root_and_decides_the_waiting_request() {
    let (host, mut contexts) = vm();
    assert_eq!(buy(&host, &mut contexts, 10, "ann"), Flow::Pause);
    assert_eq!(
        contexts.request_data(10),
        Flow::Pause,
        "body held while waiting"
    );
    wake(&host, &mut contexts);
    let [(ROOT, token)] = dispatched(&host)[..] else {
        panic!("one call by the root: {:?}", host.calls());
    };
    answer(&host, &mut contexts, token, &[won("hot.1.1", 5)]);
    assert_eq!(resumed(&host), [10]);
    assert_eq!(contexts.request_data(10), Flow::Continue);
    host.set_response(10, "200", "via_upstream");
    host.enter(10);
    assert_eq!(contexts.response_headers(10), Flow::Continue);
    let response = host.response_headers(10);
    assert_eq!(header(&response, "x-seckill-order-id"), Some("hot.1.1"));
}

/// Request 10 wins, the shop fails it, and the request calls for the release and waits:
/// the release call's token.
fn releasing_winner(host: &FakeHost, contexts: &mut Contexts<FakeHost>) -> u32 {
    buy(host, contexts, 10, "ann");
    wake(host, contexts);
    let token = dispatched(host)[0].1;
    answer(host, contexts, token, &[won("hot.1.1", 5)]);
    host.set_response(10, "503", "via_upstream");
    host.enter(10);
    assert_eq!(contexts.response_headers(10), Flow::Pause);
    let (context, release) = *dispatched(host).last().expect("a release call");
    assert_eq!(context, 10);
    release
}

/// Envoy delivers the release call's answer to the root, with the call's token.
fn release_answered(host: &FakeHost, contexts: &mut Contexts<FakeHost>, release: u32) {
    host.set_call_response(Some("200"), "");
    host.enter(ROOT);
    contexts.http_call_response(ROOT, release, 1, 0);
}

#[test]
fn a_release_answer_reaches_the_request_that_asked() {
    let (host, mut contexts) = vm();
    let release = releasing_winner(&host, &mut contexts);
    release_answered(&host, &mut contexts, release);
    assert!(host
        .calls()
        .contains(&Call::ContinueResponse { context: 10 }));
    assert!(host.logs().is_empty(), "nobody warned: {:?}", host.logs());
}

#[test]
fn a_release_answer_for_a_request_that_ended_is_dropped_quietly() {
    let (host, mut contexts) = vm();
    let release = releasing_winner(&host, &mut contexts);
    contexts.delete(10);
    release_answered(&host, &mut contexts, release);
    assert!(!host
        .calls()
        .iter()
        .any(|call| matches!(call, Call::ContinueResponse { .. })));
    assert!(
        host.logs().is_empty(),
        "not the root's answer: {:?}",
        host.logs()
    );
}

#[test]
fn a_request_deleted_while_it_waits_is_never_acted_on() {
    let (host, mut contexts) = vm();
    buy(&host, &mut contexts, 10, "ann");
    buy(&host, &mut contexts, 11, "bob");
    wake(&host, &mut contexts);
    let token = dispatched(&host)[0].1;
    // Request 10's client went away while the batch was out.
    contexts.delete(10);
    answer(
        &host,
        &mut contexts,
        token,
        &[won("hot.1.1", 5), won("hot.1.2", 4)],
    );
    assert_eq!(resumed(&host), [11]);
}

#[test]
fn requests_no_configured_root_owns_are_answered_503() {
    let (host, mut contexts) = vm();
    // A root whose configuration was refused.
    host.set_config(&json!({"route": "nonsense"}));
    host.enter(2);
    contexts.create(2, 0);
    assert!(!contexts.configure(2));
    let sale = [(":method", "POST"), (":path", "/seckill/hot/buy")];
    assert_eq!(arrive(&host, &mut contexts, 10, 2, &sale), Flow::Pause);
    // A parent this VM never heard of.
    assert_eq!(arrive(&host, &mut contexts, 11, 99, &sale), Flow::Pause);
    // A request this VM was never told about.
    host.enter(12);
    assert_eq!(contexts.request_headers(12), Flow::Pause);
    assert_eq!(replies(&host), [(10, 503), (11, 503), (12, 503)]);
    assert_eq!(contexts.request_data(10), Flow::Continue);
    assert_eq!(contexts.response_headers(12), Flow::Continue);
    assert!(!contexts.configure(99), "an unknown root refuses");
}

#[test]
fn a_deleted_root_is_gone_and_its_callbacks_do_nothing() {
    let (host, mut contexts) = vm();
    contexts.delete(ROOT);
    assert_eq!(contexts.roots(), 0);
    host.take_trace();
    contexts.tick(ROOT);
    contexts.queue_ready(ROOT, 0);
    contexts.http_call_response(ROOT, 100, 1, 0);
    assert!(
        host.take_trace().is_empty(),
        "no host call for a root that is gone"
    );
}

#[test]
fn context_ids_in_sequence_spread_over_the_hash_space() {
    // The map's probe groups key on the hash's top bits: ids in sequence must not share them.
    let hasher = BuildHasherDefault::<IdHasher>::default();
    let top_bits: HashSet<u64> = (1..=256u32).map(|id| hasher.hash_one(id) >> 57).collect();
    assert!(top_bits.len() > 100, "{} of 128", top_bits.len());
    let low_bits: HashSet<u64> = (1..=256u32).map(|id| hasher.hash_one(id) & 255).collect();
    assert!(low_bits.len() > 150, "{} of 256", low_bits.len());
}
