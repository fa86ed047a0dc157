//! Promise 1 counted where it matters, at the shop, while a reservation ends early or an answer
//! is lost: a retry after every way an order ends, a shop slower than the route timeout, a
//! shop that cannot be reached, a Redis that stalls mid-storm, and a flood of invented goods
//! ids. Real Envoy (with the filter), syncer, redis-server and MariaDB; a stub shop that
//! records every request and the status it answered.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::join_all;
use futures::StreamExt;
use redis::AsyncCommands;
use seckill_e2e::envoy::{Envoy, LOCAL_TEMPLATE};
use seckill_e2e::process::{free_port, wait_for};
use seckill_e2e::stack::{now_ms, send, BuyResult, Stack, StackOptions};
use serde_json::json;

const SETTLE: Duration = Duration::from_secs(30);

/// The order ids the shop answered 2xx for `goods`, with how often each arrived.
fn accepted(stack: &Stack, goods: &str) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for order in stack.shop.accepted_order_ids() {
        if order.starts_with(&format!("{goods}.")) {
            *counts.entry(order).or_insert(0) += 1;
        }
    }
    counts
}

/// How often an order id reached the shop at all (any status).
fn arrivals(stack: &Stack, order_id: &str) -> usize {
    stack
        .shop
        .seen()
        .iter()
        .filter(|r| r.header(seckill_api::ORDER_ID_HEADER) == Some(order_id))
        .count()
}

/// Order ids whose reservation is open in Redis.
async fn live_orders(stack: &Stack, goods: &str) -> HashSet<String> {
    let mut conn = stack.redis().await.unwrap();
    let reservations: HashMap<String, String> = conn
        .hgetall(stack.goods_key(goods, "reservations"))
        .await
        .unwrap();
    reservations.into_keys().collect()
}

async fn settled(stack: &Stack, goods: &str, order_id: &str) -> Option<String> {
    let mut conn = stack.redis().await.unwrap();
    conn.hget(stack.goods_key(goods, "settled"), order_id)
        .await
        .unwrap()
}

/// The shop holds no more live orders than stock, and every order it accepted that is dead
/// now reached it exactly once (never again after it ended).
async fn assert_the_shop_holds_at_most_the_stock(stack: &Stack, goods: &str, stock: usize) {
    let live = live_orders(stack, goods).await;
    let at_shop = accepted(stack, goods);
    let live_at_shop: Vec<&String> = at_shop.keys().filter(|o| live.contains(*o)).collect();
    assert!(
        live_at_shop.len() <= stock,
        "{goods}: the shop holds {} live orders for {stock} units: {live_at_shop:?}",
        live_at_shop.len()
    );
    for (order, count) in &at_shop {
        if !live.contains(order)
            && settled(stack, goods, order).await.as_deref() != Some("confirmed")
        {
            assert_eq!(
                arrivals(stack, order),
                1,
                "{goods}: the ended order {order} reached the shop again"
            );
        }
        assert!(*count >= 1);
    }
}

fn order_of(r: &BuyResult) -> String {
    r.body["order_id"]
        .as_str()
        .map(str::to_owned)
        .unwrap_or_default()
}

/// The shop fails a winner (500), cancels another, lets a third lapse; each buyer retries
/// with the same request id, then others buy the units that came back. The shop never
/// receives a dead order id again and never holds more live orders than stock.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_released_order_is_never_forwarded_again() {
    let mut options = StackOptions::new("released-retry");
    options.syncer_env = vec![("SECKILL_SWEEP_EVERY_MS", "50".into())];
    let stack = Stack::start(options).await.unwrap();
    let shop_order = |goods: &str, user: &str| -> String {
        stack
            .shop
            .seen()
            .iter()
            .rev()
            .find(|r| {
                r.header(seckill_api::GOODS_ID_HEADER) == Some(goods)
                    && r.header(seckill_api::USER_ID_HEADER) == Some(user)
            })
            .and_then(|r| r.header(seckill_api::ORDER_ID_HEADER).map(str::to_owned))
            .expect("the winner reached the shop")
    };

    // 1. Upstream failure: released at once; the retry is a fresh attempt with a new order.
    stack.open_sale("fail", 3, 1).await.unwrap();
    stack.shop.set_status(500);
    let r = stack.buy("fail", "b0", 1, "r0").await.unwrap();
    assert_eq!(
        (r.status, r.outcome.as_str()),
        (500, "upstream_failed"),
        "{r:?}"
    );
    let failed = shop_order("fail", "b0");
    assert_eq!(stack.live("fail").await.unwrap()["available"], 3);
    stack.shop.set_status(200);
    let retry = stack.buy("fail", "b0", 1, "r0").await.unwrap();
    assert_eq!(
        (retry.status, retry.outcome.as_str()),
        (200, "won"),
        "{retry:?}"
    );
    assert_ne!(
        shop_order("fail", "b0"),
        failed,
        "never the released order id"
    );
    assert_eq!(arrivals(&stack, &failed), 1);
    for i in 1..6 {
        stack
            .buy("fail", &format!("b{i}"), 1, &format!("r{i}"))
            .await
            .unwrap();
    }
    assert_eq!(accepted(&stack, "fail").len(), 3);

    // 2. Cancelled: the retry is told `released`, and nothing reaches the shop.
    stack.open_sale("cancel", 2, 1).await.unwrap();
    let won = stack.buy("cancel", "b0", 1, "r0").await.unwrap();
    assert_eq!(won.outcome, "won");
    let cancelled = shop_order("cancel", "b0");
    let (status, _) = stack
        .admin()
        .unwrap()
        .settle(&cancelled, "cancel")
        .await
        .unwrap();
    assert_eq!(status, 200);
    let retry = stack.buy("cancel", "b0", 1, "r0").await.unwrap();
    assert_eq!(
        (retry.status, retry.outcome.as_str()),
        (409, "released"),
        "{retry:?}"
    );
    assert_eq!(
        (order_of(&retry), retry.body["reason"].as_str()),
        (cancelled.clone(), Some("cancelled"))
    );
    assert_eq!(arrivals(&stack, &cancelled), 1);
    for i in 1..5 {
        stack
            .buy("cancel", &format!("b{i}"), 1, &format!("r{i}"))
            .await
            .unwrap();
    }
    // The buyer who cancelled holds nothing live at the shop; two others hold the units.
    assert_eq!(accepted(&stack, "cancel").len(), 3);

    // 3. Expired: a one-second payment window; the retry is told `released` (expired).
    let now = now_ms();
    stack
        .admin()
        .unwrap()
        .define_sale("expire", 2, 1, (now - 60_000, now + 3_600_000), 1)
        .await
        .unwrap();
    stack.preheat("expire", false).await.unwrap();
    assert_eq!(
        stack.buy("expire", "b0", 1, "r0").await.unwrap().outcome,
        "won"
    );
    let lapsed = shop_order("expire", "b0");
    wait_for("the reservation to expire", SETTLE, || async {
        Ok(
            (settled(&stack, "expire", &lapsed).await.as_deref() == Some("released:expired"))
                .then_some(()),
        )
    })
    .await
    .unwrap();
    let retry = stack.buy("expire", "b0", 1, "r0").await.unwrap();
    assert_eq!(
        (retry.status, retry.outcome.as_str()),
        (409, "released"),
        "{retry:?}"
    );
    assert_eq!(retry.body["reason"], "expired");
    assert_eq!(arrivals(&stack, &lapsed), 1);
    for i in 1..4 {
        stack
            .buy("expire", &format!("b{i}"), 1, &format!("r{i}"))
            .await
            .unwrap();
    }

    for (goods, stock) in [("fail", 3), ("cancel", 2), ("expire", 2)] {
        assert_the_shop_holds_at_most_the_stock(&stack, goods, stock).await;
    }
    // Counted exactly: every live reservation is at the shop.
    for goods in ["fail", "cancel"] {
        let live = live_orders(&stack, goods).await;
        let at_shop: HashSet<String> = accepted(&stack, goods).into_keys().collect();
        assert!(live.is_subset(&at_shop), "{goods}: {live:?} vs {at_shop:?}");
    }
}

/// A shop slower than Envoy's route timeout may have created the order: the reservation is
/// kept (not released), the buyer is told so, and a retry carries the same order id, so
/// the shop never holds two orders for one unit. A shop that cannot be reached at all did
/// not create it: that reservation is released at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_timeout_is_not_a_failure_but_no_connection_is() {
    let mut options = StackOptions::new("shop-timeout");
    options.shop_timeout_ms = 300;
    let stack = Stack::start(options).await.unwrap();
    stack.open_sale("g", 1, 1).await.unwrap();
    stack.shop.set_delay(Duration::from_millis(1_500));
    let r = stack.buy("g", "b0", 1, "r0").await.unwrap();
    assert_eq!(
        (r.status, r.outcome.as_str()),
        (504, "upstream_unknown"),
        "{r:?}"
    );
    let live = stack.live("g").await.unwrap();
    assert_eq!(
        (live["available"].as_u64(), live["reserved"].as_u64()),
        (Some(0), Some(1)),
        "the unit stays reserved: {live}"
    );
    assert_eq!(stack.envoy.stat("seckill_release_sent").await.unwrap(), 0);
    assert_eq!(
        stack.envoy.stat("seckill_upstream_unknown").await.unwrap(),
        1
    );
    // Another buyer cannot take the unit; the retry gets the same order forwarded again.
    assert_eq!(
        stack.buy("g", "b1", 1, "r1").await.unwrap().outcome,
        "sold_out"
    );
    stack.shop.set_delay(Duration::ZERO);
    let retry = stack.buy("g", "b0", 1, "r0").await.unwrap();
    assert_eq!(
        (retry.status, retry.outcome.as_str()),
        (200, "won"),
        "{retry:?}"
    );
    let orders: HashSet<String> = stack
        .shop
        .seen()
        .iter()
        .filter_map(|s| s.header(seckill_api::ORDER_ID_HEADER).map(str::to_owned))
        .collect();
    assert_eq!(orders.len(), 1, "one order for one unit: {orders:?}");

    // The same gate in front of a shop that is not there: Envoy's 503 says the request
    // never left, and the unit comes back at once.
    stack.open_sale("h", 1, 1).await.unwrap();
    let mut values = stack.envoy_values();
    values.insert("SHOP_PORT", free_port().unwrap().to_string());
    let gone = Envoy::start(&stack.scratch.path, LOCAL_TEMPLATE, values, 1)
        .await
        .unwrap();
    let request = stack
        .http
        .post(format!("{}/seckill/h/buy", gone.url()))
        .header("x-user-id", "b0")
        .header("x-request-id", "r0");
    let r = send(request).await.unwrap();
    assert_eq!(
        (r.status, r.outcome.as_str()),
        (503, "upstream_failed"),
        "{r:?}"
    );
    let live = stack.live("h").await.unwrap();
    assert_eq!(
        (live["available"].as_u64(), live["reserved"].as_u64()),
        (Some(1), Some(0)),
        "{live}"
    );
}

/// Redis freezes for 5 s in the middle of a storm. Buyers told 503 learn the request id to
/// retry with; deducts the syncer gave up on grant nothing when Redis resumes; a unit won
/// by a buyer who never heard is back on sale within the claim window. At the end, counted
/// exactly: the reservations in Redis are the orders buyers were told `won`, which are the
/// orders at the shop.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_redis_stall_strands_no_unit_and_grants_nothing_late() {
    let mut options = StackOptions::new("redis-stall");
    options.workers = 2;
    options.plugin_config["deduct"]["timeout_ms"] = json!(500);
    options.plugin_config["sold_out_cache_ms"] = json!(0);
    // Without the MySQL fallback: this is what Redis's own deadlines do through a stall (with
    // the fallback, the stalled goods would be sold from MySQL: fallback.rs and
    // redis_forgets.rs).
    options.syncer_env = vec![
        ("SECKILL_CLAIM_WINDOW_MS", "5000".into()),
        ("SECKILL_SWEEP_EVERY_MS", "50".into()),
        ("SECKILL_FALLBACK_RATE", "0".into()),
    ];
    let stack = Arc::new(Stack::start(options).await.unwrap());
    const STOCK: u64 = 300;
    const BUYERS: usize = 900;
    stack.open_sale("g", STOCK, 1).await.unwrap();

    // 900 buyers over 3 s (one every 3.3 ms, whatever the answers); Redis stops at 0.5 s and
    // goes on at 5.5 s: the stall is the fault under test, so its length is fixed.
    let started = tokio::time::Instant::now();
    let sent_at_ms: Arc<Vec<AtomicI64>> =
        Arc::new((0..BUYERS).map(|_| AtomicI64::new(0)).collect());
    let storm = {
        let stack = stack.clone();
        let sent_at_ms = sent_at_ms.clone();
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(Duration::from_micros(3_333));
            let mut calls = Vec::with_capacity(BUYERS);
            for i in 0..BUYERS {
                ticks.tick().await;
                let stack = stack.clone();
                let sent_at_ms = sent_at_ms.clone();
                calls.push(tokio::spawn(async move {
                    sent_at_ms[i].store(now_ms(), Ordering::Relaxed);
                    let r = stack.buy("g", &format!("b{i}"), 1, &format!("r{i}")).await;
                    (i, r.unwrap())
                }));
            }
            let mut results = Vec::with_capacity(BUYERS);
            for call in calls {
                results.push(call.await.unwrap());
            }
            results
        })
    };
    tokio::time::sleep_until(started + Duration::from_millis(500)).await;
    stack.redis.pause().unwrap();
    tokio::time::sleep_until(started + Duration::from_millis(5_500)).await;
    stack.redis.resume().unwrap();
    let first = storm.await.unwrap();

    let told_won = |results: &[(usize, BuyResult)]| -> HashSet<usize> {
        results
            .iter()
            .filter(|(_, r)| r.outcome == "won")
            .map(|(i, _)| *i)
            .collect()
    };
    let unavailable: Vec<usize> = first
        .iter()
        .filter(|(_, r)| r.status == 503)
        .map(|(i, r)| {
            assert_eq!(
                r.body["request_id"],
                format!("r{i}"),
                "the 503 names the request id"
            );
            *i
        })
        .collect();
    assert!(
        unavailable.len() >= 100,
        "the stall was felt: {} buyers told 503",
        unavailable.len()
    );
    // Nothing is granted after the gate stopped waiting: every reservation was made within
    // the gate's patience of its request (at most 500 ms waiting for a callout slot plus the
    // 500 ms the syncer may take; 1 s of slack for a loaded machine). Without deadlines the
    // attempts queued in the stall are granted when Redis resumes, 2.5 to 5 s late.
    let mut conn = stack.redis().await.unwrap();
    let requests: HashMap<String, String> = conn
        .hgetall(stack.goods_key("g", "requests"))
        .await
        .unwrap();
    let reservations: HashMap<String, String> = conn
        .hgetall(stack.goods_key("g", "reservations"))
        .await
        .unwrap();
    for (request_id, record) in &requests {
        let order = record.rsplit('|').next().unwrap();
        let Some(reservation) = reservations.get(order) else {
            continue;
        };
        let reserved_at: i64 = reservation.rsplit('|').next().unwrap().parse().unwrap();
        let i: usize = request_id.trim_start_matches('r').parse().unwrap();
        let late_ms = reserved_at - sent_at_ms[i].load(Ordering::Relaxed);
        assert!(
            late_ms < 2_000,
            "{request_id} was granted {late_ms} ms after it was sent"
        );
    }
    // Every buyer told 503 retries once with the request id it was given.
    let retries = join_all(unavailable.iter().map(|&i| {
        let stack = stack.clone();
        async move {
            (
                i,
                stack
                    .buy("g", &format!("b{i}"), 1, &format!("r{i}"))
                    .await
                    .unwrap(),
            )
        }
    }))
    .await;
    let mut winners = told_won(&first);
    winners.extend(told_won(&retries));
    for (_, r) in first.iter().chain(&retries) {
        assert!(
            ["won", "sold_out", "unavailable", "upstream_failed"].contains(&r.outcome.as_str()),
            "{r:?}"
        );
    }

    // Within the claim window every unit is either held by a buyer told `won` or back.
    let winner_orders: HashSet<String> = stack.shop.accepted_order_ids().into_iter().collect();
    let settled_in_time = wait_for("unheard reservations to come back", SETTLE, || async {
        Ok((live_orders(&stack, "g").await == winner_orders).then_some(()))
    })
    .await;
    if let Err(e) = settled_in_time {
        let live = live_orders(&stack, "g").await;
        let mut conn = stack.redis().await.unwrap();
        let settled: HashMap<String, String> =
            conn.hgetall(stack.goods_key("g", "settled")).await.unwrap();
        let unheard: Vec<_> = live.difference(&winner_orders).collect();
        let lost: Vec<_> = winner_orders
            .difference(&live)
            .map(|o| (o, settled.get(o)))
            .collect();
        panic!("{e}: live but never told won: {unheard:?}; told won but not live: {lost:?}");
    }
    assert_eq!(
        winner_orders.len(),
        winners.len(),
        "one order per buyer told won"
    );
    let live = stack.live("g").await.unwrap();
    assert_eq!(
        live["available"].as_u64().unwrap() + live["reserved"].as_u64().unwrap(),
        STOCK,
        "{live}"
    );
    assert_eq!(live["reserved"].as_u64().unwrap(), winners.len() as u64);
    let users: HashSet<String> = stack
        .shop
        .seen()
        .iter()
        .filter_map(|s| s.header(seckill_api::USER_ID_HEADER).map(str::to_owned))
        .collect();
    assert_eq!(
        users.len(),
        winner_orders.len(),
        "no buyer holds two orders"
    );
}

/// 100,000 distinct invented goods ids: callouts stay within the unconfirmed bucket's budget
/// (burst + rate x time), no junk id takes a tracked slot, and real goods lose nothing to
/// 429 meanwhile: a configured one, one confirmed before the flood, and one first bought
/// after it (which needs a tracked slot the junk did not take).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn junk_goods_ids_cost_bounded_callouts_and_throttle_no_real_goods() {
    let mut options = StackOptions::new("junk-flood");
    options.workers = 2;
    options.plugin_config["rate_limit"] = json!({
        "default": { "per_second": 100000, "burst": 100000 },
        "goods": { "real": { "per_second": 400, "burst": 100 } },
        "unconfirmed": { "per_second": 50, "burst": 50 },
        "tracked_goods_max": 2
    });
    options.plugin_config["unknown_goods_cache_ms"] = json!(60_000);
    let stack = Arc::new(Stack::start(options).await.unwrap());
    for goods in ["real", "early", "late"] {
        stack.open_sale(goods, 1_000_000, 1_000_000).await.unwrap();
    }
    // "early" is confirmed (bought once) before the flood: it takes one of the two slots.
    assert_eq!(
        stack
            .buy("early", "u", 1, "early-first")
            .await
            .unwrap()
            .outcome,
        "won"
    );
    let unknown_before = unknown_goods_decisions(&stack).await;

    const JUNK: usize = 100_000;
    let started = Instant::now();
    let flood = {
        let stack = stack.clone();
        tokio::spawn(async move {
            let mut statuses: HashMap<u16, usize> = HashMap::new();
            let mut answers = futures::stream::iter(0..JUNK)
                .map(|i| {
                    let stack = stack.clone();
                    async move {
                        stack
                            .buy(&format!("junk-{i}"), "u", 1, &format!("j{i}"))
                            .await
                    }
                })
                .buffer_unordered(64);
            while let Some(answer) = answers.next().await {
                *statuses.entry(answer.unwrap().status).or_insert(0) += 1;
            }
            statuses
        })
    };
    // Real buyers at 100/s each while the flood runs.
    let mut real_outcomes: HashMap<String, usize> = HashMap::new();
    let mut ticks = tokio::time::interval(Duration::from_millis(10));
    let mut n = 0;
    while !flood.is_finished() {
        ticks.tick().await;
        for goods in ["real", "early"] {
            let r = stack
                .buy(goods, &format!("{goods}-u{n}"), 1, &format!("{goods}-{n}"))
                .await
                .unwrap();
            *real_outcomes
                .entry(format!("{goods}:{}", r.outcome))
                .or_insert(0) += 1;
        }
        n += 1;
    }
    let statuses = flood.await.unwrap();
    let elapsed = started.elapsed().as_secs_f64();
    assert_eq!(statuses.values().sum::<usize>(), JUNK);
    assert!(
        statuses.keys().all(|s| [404, 429].contains(s)),
        "junk gets 404 or 429: {statuses:?}"
    );
    assert!(n >= 10, "the real buyers ran during the flood ({n} rounds)");
    for (key, count) in &real_outcomes {
        assert!(
            key.ends_with(":won"),
            "a real goods lost requests: {real_outcomes:?} ({key}: {count})"
        );
    }

    // Callouts for junk: within the unconfirmed bucket's budget, whatever the flood's size.
    let junk_decided = unknown_goods_decisions(&stack).await - unknown_before;
    let budget = 50.0 + 50.0 * elapsed;
    assert!(
        junk_decided >= 1 && (junk_decided as f64) <= budget,
        "{junk_decided} junk ids reached the syncer in {elapsed:.1} s (budget {budget:.0})"
    );

    // "late" is first bought now: it still gets its own bucket (a slot was left), so a burst
    // far over the unconfirmed rate passes whole.
    wait_for("the first purchase of a new goods", SETTLE, || async {
        let r = stack.buy("late", "u", 1, "late-first").await?;
        Ok((r.outcome == "won").then_some(()))
    })
    .await
    .unwrap();
    let burst = join_all((0..200).map(|i| {
        let stack = stack.clone();
        async move {
            stack
                .buy("late", &format!("l{i}"), 1, &format!("late-{i}"))
                .await
                .unwrap()
        }
    }))
    .await;
    let refused = burst.iter().filter(|r| r.outcome != "won").count();
    assert_eq!(refused, 0, "the new goods has a bucket of its own");
}

/// `unknown_goods` decisions the syncer made so far.
async fn unknown_goods_decisions(stack: &Stack) -> u64 {
    let text = stack.syncer().unwrap().metrics().await.unwrap();
    seckill_e2e::syncer::sum_metric(&text, "seckill_deduct_total{outcome=\"unknown_goods\"}")
}

/// Winners arrive faster than one claim call a second could carry (1,024): every one of
/// them is claimed within a short claim window, none is released as unclaimed while the
/// shop holds its order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_burst_of_winners_is_claimed_in_time() {
    const WINNERS: usize = 8_000;
    let mut options = StackOptions::new("claim-burst");
    options.syncer_env = vec![
        ("SECKILL_CLAIM_WINDOW_MS", "2000".into()),
        ("SECKILL_SWEEP_EVERY_MS", "50".into()),
    ];
    let stack = Arc::new(Stack::start(options).await.unwrap());
    stack.open_sale("g", WINNERS as u64, 1).await.unwrap();
    let mut answers = futures::stream::iter(0..WINNERS)
        .map(|i| {
            let stack = stack.clone();
            async move { stack.buy("g", &format!("b{i}"), 1, &format!("r{i}")).await }
        })
        .buffer_unordered(64);
    let mut won = 0;
    while let Some(answer) = answers.next().await {
        won += usize::from(answer.unwrap().outcome == "won");
    }
    assert_eq!(won, WINNERS);
    // Every reservation leaves the unclaimed set, claimed or (the failure) released.
    wait_for(
        "every reservation to be claimed or released",
        SETTLE,
        || async {
            let mut conn = stack.redis().await?;
            let unclaimed: u64 = conn.zcard(stack.goods_key("g", "unclaimed")).await?;
            Ok((unclaimed == 0).then_some(()))
        },
    )
    .await
    .unwrap();
    let mut conn = stack.redis().await.unwrap();
    let settled: HashMap<String, String> =
        conn.hgetall(stack.goods_key("g", "settled")).await.unwrap();
    assert!(
        settled.is_empty(),
        "released while the shop held them: {}",
        settled.len()
    );
    assert_eq!(live_orders(&stack, "g").await.len(), WINNERS);
    assert_eq!(accepted(&stack, "g").len(), WINNERS);
}
