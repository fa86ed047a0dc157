//! The native sold-out fast path, end to end: real Envoy with the routes `seckill-syncer
//! fast-path-routes` prints, the real switch (`seckill-syncer fast-path`) reading a private
//! redis-server, the real syncer and filter, and a stub shop that records what reached it.
//! Each test tries to break a promise the route could break: answering a goods with units,
//! turning away a winner already decided, a retry the gate asked for, a forged header.

use std::time::{Duration, Instant};

use seckill_api::fast_path::{
    runtime_key, sold_out_body, ANSWERED_BY_HEADER, ANSWERED_BY_ROUTE, RETRY_COOKIE,
};
use seckill_e2e::deduct_stub::DeductStub;
use seckill_e2e::envoy::{Envoy, LOCAL_TEMPLATE};
use seckill_e2e::fast_path::{routes, runtime_value, FastPathSwitch};
use seckill_e2e::process::wait_for;
use seckill_e2e::stack::{send, BuyResult, Stack, StackOptions, SHOP_SECRET};
use serde_json::json;

/// The switch's round in these tests.
const ROUND: Duration = Duration::from_millis(50);
/// The filter's sold-out cache in these tests: the bound within which returned units must
/// sell again.
const SOLD_OUT_CACHE: Duration = Duration::from_millis(1_000);

async fn stack(label: &str, goods: &[&str]) -> Stack {
    let mut options = StackOptions::new(label);
    options.fast_path_goods = goods.iter().map(|g| g.to_string()).collect();
    options.plugin_config["sold_out_cache_ms"] = json!(SOLD_OUT_CACHE.as_millis() as u64);
    Stack::start(options).await.expect("the stack starts")
}

fn switch(stack: &Stack, goods: &[&str]) -> FastPathSwitch {
    let goods: Vec<String> = goods.iter().map(|g| g.to_string()).collect();
    FastPathSwitch::start(
        &stack.scratch.path,
        &stack.redis.url(),
        &stack.key_prefix,
        &[stack.envoy.admin_port],
        &goods,
        ROUND,
        None,
    )
    .expect("the switch starts")
}

/// Waits until the goods' runtime key on the stack's Envoy reads `value`.
async fn key_becomes(stack: &Stack, goods: &str, value: &str, within: Duration) {
    let key = runtime_key(goods);
    wait_for(&format!("{key} to be {value}"), within, || async {
        let now = runtime_value(&stack.http, stack.envoy.admin_port, &key).await?;
        Ok((now.as_deref() == Some(value)).then_some(()))
    })
    .await
    .unwrap();
}

/// One buy, with the header saying who answered it.
async fn buy(stack: &Stack, goods: &str, user: &str) -> (BuyResult, bool) {
    let response = stack
        .http
        .post(format!("{}/seckill/{goods}/buy", stack.envoy.url()))
        .header("x-user-id", user)
        .header("x-request-id", format!("r-{user}"))
        .send()
        .await
        .unwrap();
    let by_route = response.headers().get(ANSWERED_BY_HEADER).is_some();
    if by_route {
        // The filter's sold-out answer has these headers once each; so must the route's.
        for (name, value) in [
            ("content-type", "application/json"),
            ("cache-control", "no-store"),
            ("x-seckill-outcome", "sold_out"),
            (ANSWERED_BY_HEADER, ANSWERED_BY_ROUTE),
        ] {
            let values: Vec<_> = response.headers().get_all(name).iter().collect();
            assert_eq!(values, [value], "{name} on the route's answer");
        }
    }
    let status = response.status().as_u16();
    let outcome = response
        .headers()
        .get("x-seckill-outcome")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let order_id = response
        .headers()
        .get(seckill_api::ORDER_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let text = response.text().await.unwrap();
    let body = serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text));
    let result = BuyResult {
        status,
        outcome,
        retry_after: None,
        order_id,
        body,
    };
    (result, by_route)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sold_out_goods_is_answered_by_envoy_until_units_come_back() {
    let stack = stack("fast-sold-out", &["hot"]).await;
    stack.open_sale("hot", 3, 1).await.unwrap();
    let mut switch = switch(&stack, &["hot"]);
    // The switch says "not sold out" first: units are left.
    key_becomes(&stack, "hot", "0", Duration::from_secs(10)).await;

    let mut winners = Vec::new();
    for i in 0..3 {
        let (result, by_route) = buy(&stack, "hot", &format!("w{i}")).await;
        assert_eq!(result.outcome, "won", "{result:?}");
        assert!(!by_route);
        winners.push(result.order_id.unwrap());
    }
    key_becomes(&stack, "hot", "100", Duration::from_secs(10)).await;

    // Now Envoy answers: the filter's own answer, byte for byte, and neither the filter nor
    // the syncer sees the requests.
    let deducts = stack.syncer().unwrap().deduct_calls().await.unwrap();
    let filter_sold_out = stack.envoy.stat("seckill_outcome").await.unwrap();
    for i in 0..50 {
        let (result, by_route) = buy(&stack, "hot", &format!("late{i}")).await;
        assert!(by_route, "{result:?}");
        assert_eq!(result.status, 409);
        assert_eq!(result.outcome, "sold_out");
        let expected: serde_json::Value = serde_json::from_str(&sold_out_body("hot")).unwrap();
        assert_eq!(result.body, expected);
    }
    assert_eq!(
        stack.syncer().unwrap().deduct_calls().await.unwrap(),
        deducts
    );
    assert_eq!(
        stack.envoy.stat("seckill_outcome").await.unwrap(),
        filter_sold_out
    );

    // Another goods, not sold out, is the filter's as always.
    stack.open_sale("other", 5, 1).await.unwrap();
    let (result, by_route) = buy(&stack, "other", "o1").await;
    assert_eq!(result.outcome, "won");
    assert!(!by_route);

    // The shop cancels one order: its unit must sell again within the sold-out cache's bound
    // (the switch's round is well inside it), and only that one unit.
    let cancel = stack
        .http
        .post(format!(
            "{}/v1/orders/{}/cancel",
            stack.syncer().unwrap().url(),
            winners[0]
        ))
        .header(seckill_api::SECRET_HEADER, SHOP_SECRET)
        .send()
        .await
        .unwrap();
    assert_eq!(cancel.status(), 200);
    let cancelled = Instant::now();
    let mut round = 0;
    let resold = wait_for(
        "the returned unit to sell again",
        Duration::from_secs(10),
        || {
            round += 1;
            let stack = &stack;
            async move {
                let (result, by_route) = buy(stack, "hot", &format!("again{round}")).await;
                Ok((result.outcome == "won").then_some((result, by_route)))
            }
        },
    )
    .await
    .unwrap();
    let reopened_in = cancelled.elapsed();
    assert!(!resold.1, "a winner is the filter's");
    // The bound: the filter's own cache, plus a round of the switch and one buy's round trip
    // on a loaded machine.
    assert!(
        reopened_in < SOLD_OUT_CACHE + ROUND * 2 + Duration::from_millis(1_500),
        "reopened after {reopened_in:?}"
    );
    // Sold out again: Envoy answers again, and nothing more was sold.
    key_becomes(&stack, "hot", "100", Duration::from_secs(10)).await;
    let (result, by_route) = buy(&stack, "hot", "after").await;
    assert!(by_route && result.outcome == "sold_out", "{result:?}");
    let live = stack.live("hot").await.unwrap();
    assert_eq!(live["available"], 0, "{live}");
    assert_eq!(
        live["reserved"].as_u64().unwrap() + live["sold"].as_u64().unwrap(),
        3
    );
    // The shop saw the winners only: 3, the resold one, and the other goods' one.
    assert_eq!(stack.shop.seen().len(), 5);

    // A switch that stops hands the goods back to the filter.
    switch.terminate();
    key_becomes(&stack, "hot", "0", Duration::from_secs(10)).await;
    let (result, by_route) = buy(&stack, "hot", "handed-back").await;
    assert!(!by_route, "{result:?}");
    assert_eq!(result.outcome, "sold_out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn units_added_by_an_operator_reopen_the_goods_and_redis_down_hands_it_to_the_filter() {
    let mut stack = stack("fast-restock", &["hot"]).await;
    stack.open_sale("hot", 1, 1).await.unwrap();
    let _switch = switch(&stack, &["hot"]);
    assert_eq!(buy(&stack, "hot", "w0").await.0.outcome, "won");
    key_becomes(&stack, "hot", "100", Duration::from_secs(10)).await;

    // Stock added by the operator: the goods reopens.
    let added = stack
        .sale_cli(
            &[
                "add-stock",
                "hot",
                "--quantity",
                "2",
                "--operation-id",
                "op-1",
            ],
            &[],
        )
        .unwrap();
    assert_eq!(added.code, Some(0), "{}", added.stderr);
    key_becomes(&stack, "hot", "0", Duration::from_secs(10)).await;
    // The filter's own sold-out mark (from the last winner's `remaining: 0`) holds for its
    // bound; then both added units sell, to the filter's buyers, and no more.
    let deadline = Instant::now() + Duration::from_secs(10);
    let (mut won, mut round) = (0, 0);
    while won < 2 {
        assert!(
            Instant::now() < deadline,
            "only {won} of 2 added units sold"
        );
        round += 1;
        let (result, by_route) = buy(&stack, "hot", &format!("w{round}")).await;
        assert!(!by_route, "{result:?}");
        won += usize::from(result.outcome == "won");
    }
    key_becomes(&stack, "hot", "100", Duration::from_secs(10)).await;
    let live = stack.live("hot").await.unwrap();
    assert_eq!(
        (live["available"].as_u64(), live["reserved"].as_u64()),
        (Some(0), Some(3)),
        "{live}"
    );
    stack.redis.kill();
    key_becomes(&stack, "hot", "0", Duration::from_secs(10)).await;
    let (result, by_route) = buy(&stack, "hot", "during-outage").await;
    assert!(!by_route, "{result:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_envoy_that_lost_its_keys_gets_them_back() {
    let stack = stack("fast-reassert", &["hot"]).await;
    stack.open_sale("hot", 1, 1).await.unwrap();
    let _switch = switch(&stack, &["hot"]);
    assert_eq!(buy(&stack, "hot", "w0").await.0.outcome, "won");
    key_becomes(&stack, "hot", "100", Duration::from_secs(10)).await;
    // An Envoy restarted, or someone cleared the key: the safe default (the filter decides)
    // until the switch sets it again, within its re-assert period (1 s).
    let cleared = stack
        .http
        .post(format!(
            "http://127.0.0.1:{}/runtime_modify?{}=",
            stack.envoy.admin_port,
            runtime_key("hot")
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(cleared.status(), 200);
    assert_eq!(
        runtime_value(&stack.http, stack.envoy.admin_port, &runtime_key("hot"))
            .await
            .unwrap(),
        None
    );
    key_becomes(&stack, "hot", "100", Duration::from_secs(10)).await;
}

/// A winner whose deduct answer arrives after the key switched on still reaches the shop:
/// Envoy may pick the route again once the filter changed the request's headers, and the
/// route must not match a request the filter forwards. The stock service is a stub that holds
/// its answers, so the test decides when the answer comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_winner_decided_while_the_route_switched_on_still_reaches_the_shop() {
    let stack = stack("fast-in-flight", &[]).await;
    let stub = DeductStub::start_held().await.unwrap();
    let mut values = stack.envoy_values();
    values.insert("SYNCER_PORT", stub.addr.port().to_string());
    values.insert("FAST_ROUTES", routes(&["hot".to_string()]).unwrap());
    let gate = Envoy::start(&stack.scratch.path, LOCAL_TEMPLATE, values, 1)
        .await
        .unwrap();
    let buy_at = |user: &str, cookie: Option<&str>| {
        let mut request = stack
            .http
            .post(format!("{}/seckill/hot/buy", gate.url()))
            .header("x-user-id", user)
            .header("x-request-id", format!("r-{user}"));
        if let Some(cookie) = cookie {
            request = request.header("cookie", cookie);
        }
        send(request)
    };
    let waiting = tokio::spawn(buy_at("early", None));
    wait_for("the deduct call", Duration::from_secs(10), || async {
        Ok((stub.attempts() >= 1).then_some(()))
    })
    .await
    .unwrap();

    let set = stack
        .http
        .post(format!(
            "http://127.0.0.1:{}/runtime_modify?{}=100",
            gate.admin_port,
            runtime_key("hot")
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(set.status(), 200);
    // The route answers new buyers now...
    let late = buy_at("late", None).await.unwrap();
    assert_eq!((late.status, late.outcome.as_str()), (409, "sold_out"));
    // A retry the gate asked for (its cookie) skips the route: the filter takes it.
    let retry = tokio::spawn(buy_at("retrier", Some(&format!("a=b; {RETRY_COOKIE}=1"))));
    wait_for(
        "the retry to reach the filter's deduct call",
        Duration::from_secs(10),
        || async { Ok((stub.attempts() >= 2).then_some(())) },
    )
    .await
    .unwrap();
    // A forged order id skips the route too, and meets the filter, which strips it: whatever
    // this request gets, the shop never sees the forged id.
    let forged = {
        let request = stack
            .http
            .post(format!("{}/seckill/hot/buy", gate.url()))
            .header("x-user-id", "forger")
            .header("x-request-id", "r-forger")
            .header(seckill_api::ORDER_ID_HEADER, "hot.1.1");
        tokio::spawn(send(request))
    };
    wait_for(
        "the forged request to be answered or held",
        Duration::from_secs(10),
        || async { Ok((forged.is_finished() || stub.attempts() >= 3).then_some(())) },
    )
    .await
    .unwrap();

    stub.release();
    let early = waiting.await.unwrap().unwrap();
    assert_eq!(
        (early.status, early.outcome.as_str()),
        (200, "won"),
        "{early:?}"
    );
    let retried = retry.await.unwrap().unwrap();
    assert_eq!(retried.outcome, "won", "{retried:?}");
    let forged = forged.await.unwrap().unwrap();
    assert_ne!(forged.order_id.as_deref(), Some("hot.1.1"), "{forged:?}");
    let seen = stack.shop.seen();
    let users: Vec<_> = seen
        .iter()
        .filter_map(|r| r.header("x-seckill-user-id"))
        .collect();
    assert!(
        users.contains(&"early") && users.contains(&"retrier"),
        "{users:?}"
    );
    assert!(!users.contains(&"late"), "{users:?}");
    for request in &seen {
        let order_id = request.header(seckill_api::ORDER_ID_HEADER);
        assert!(order_id.is_some_and(|id| id != "hot.1.1"), "{order_id:?}");
    }
}
