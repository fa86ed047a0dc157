//! The reservation lifecycle against real Redis, Tansu, MariaDB (and Envoy where the edge is
//! involved): confirm, cancel, expiry and upstream failure each end a reservation exactly once,
//! and stock is conserved throughout.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::future::join_all;
use seckill_e2e::pipeline::{Pipeline, FAST_SWEEPER};
use seckill_e2e::process::wait_for;
use seckill_e2e::stack::{now_ms, Stack, StackOptions};
use serde_json::json;

const DRAIN: Duration = Duration::from_secs(120);

async fn pipeline(label: &str) -> Arc<Pipeline> {
    let p = Pipeline::start_with(label, FAST_SWEEPER)
        .await
        .expect("fixture starts");
    Arc::new(p)
}

/// Waits until MySQL's counters and order states equal Redis's and the outbox is empty.
async fn wait_for_mysql_to_match(p: &Pipeline, goods: &str) {
    p.wait_for_counters_to_match(goods, DRAIN).await.unwrap();
    let settled = p.settled_orders(goods).await.unwrap();
    let rows = p.mysql_orders(goods).await.unwrap();
    for (order, state) in &settled {
        let (row_state, reason) = &rows[order];
        let expected = match reason {
            Some(reason) => format!("{row_state}:{reason}"),
            None => row_state.clone(),
        };
        assert_eq!(&expected, state, "order {order}: MySQL and Redis agree");
    }
    let (stock, reserved, sold, lapsed, total) = p.mysql_counters(goods).await.unwrap();
    assert_eq!(
        stock + reserved + sold + lapsed,
        total,
        "MySQL conserves stock"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn confirm_cancel_and_expiry_race_to_one_outcome_per_order() {
    let p = pipeline("race").await;
    // A 2 s payment window: some attempts come before it ends, some after.
    p.define_sale("g", 300, 1, now_ms() + 3_600_000, 2)
        .await
        .unwrap();
    let _processes = p.spawn_relay_and_writer(1_000, 50).await.unwrap();
    let orders = p.sell("g", "u", 300).await.unwrap();
    assert_eq!(orders.len(), 300);

    // Conservation is sampled all through the race.
    let racing = Arc::new(AtomicBool::new(true));
    let sampler = {
        let (p, racing) = (p.clone(), racing.clone());
        tokio::spawn(async move {
            let mut samples = 0;
            while racing.load(Ordering::Relaxed) {
                let (available, reserved, sold, lapsed, total) =
                    p.redis_counters("g").await.unwrap();
                assert_eq!(
                    available + reserved + sold + lapsed,
                    total,
                    "Redis conserves stock"
                );
                assert_eq!(lapsed, 0, "the sale is open: nothing lapses");
                samples += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            samples
        })
    };

    // Each order gets three confirms and three cancels, spread over 0..3 s; every fifth order
    // gets them only after its window has ended, racing the sweeper.
    let attempts = orders.iter().enumerate().flat_map(|(i, order)| {
        (0..6).map(move |k| {
            let action = if k % 2 == 0 { "confirm" } else { "cancel" };
            let spread = if i % 5 == 0 {
                2_300 + (i * 37 + k * 101) % 700
            } else {
                (i * 37 + k * 401) % 3_000
            };
            let delay = Duration::from_millis(spread as u64);
            (order.clone(), action, delay)
        })
    });
    let results = join_all(attempts.map(|(order, action, delay)| {
        let p = p.clone();
        async move {
            tokio::time::sleep(delay).await;
            let (status, body) = p.settle(&order, action).await.unwrap();
            (order, action, status, body)
        }
    }))
    .await;
    wait_for("every reservation to end", DRAIN, || async {
        Ok((p.redis_counters("g").await?.1 == 0).then_some(()))
    })
    .await
    .unwrap();
    racing.store(false, Ordering::Relaxed);
    assert!(
        sampler.await.unwrap() > 10,
        "conservation was sampled during the race"
    );

    let settled = p.settled_orders("g").await.unwrap();
    assert_eq!(settled.len(), 300, "every order ended");
    let mut changed: HashMap<&str, usize> = HashMap::new();
    for (order, action, status, body) in &results {
        let fin = &settled[order];
        match (*action, *status) {
            ("confirm", 200) => assert_eq!(fin, "confirmed", "{order}: {body}"),
            // A cancel of an order already released answers how it was released.
            ("cancel", 200) => assert_eq!(
                fin,
                &format!("released:{}", body["reason"].as_str().unwrap_or_default()),
                "{order}: {body}"
            ),
            (_, 409) => assert!(
                (*action == "confirm" && fin.starts_with("released"))
                    || (*action == "cancel" && fin == "confirmed"),
                "{order}: {action} refused but the order is {fin}: {body}"
            ),
            other => panic!("{order}: unexpected answer {other:?}: {body}"),
        }
        if body["changed"] == json!(true) {
            *changed.entry(order.as_str()).or_default() += 1;
        }
    }
    for (order, fin) in &settled {
        let by_call = changed.get(order.as_str()).copied().unwrap_or(0);
        let expected = if fin == "released:expired" { 0 } else { 1 };
        assert!(by_call <= 1, "{order} changed by {by_call} calls");
        if fin != "released:expired" {
            assert_eq!(
                by_call, expected,
                "{order} ({fin}) was settled by exactly one call"
            );
        }
    }
    let confirmed = settled.values().filter(|s| *s == "confirmed").count() as i64;
    let (available, reserved, sold, lapsed, total) = p.redis_counters("g").await.unwrap();
    assert_eq!((reserved, sold, lapsed), (0, confirmed, 0));
    assert_eq!(
        available,
        total - confirmed,
        "every released unit went back on sale"
    );
    assert!(
        settled.values().any(|s| s == "released:expired"),
        "the window ran out for some"
    );
    wait_for_mysql_to_match(&p, "g").await;
    let (code, report) = p.reconcile(&[]).unwrap();
    assert_eq!(code, 0, "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn expiry_after_the_sale_closed_returns_nothing() {
    let p = pipeline("lapse").await;
    // The sale closes in 1.5 s; payment windows of 3 s end after it.
    p.define_sale("g", 10, 1, now_ms() + 1_500, 3)
        .await
        .unwrap();
    let _processes = p.spawn_relay_and_writer(1_000, 50).await.unwrap();
    let orders = p.sell("g", "u", 4).await.unwrap();
    assert_eq!(orders.len(), 4);
    wait_for(
        "the reservations to expire after the close",
        DRAIN,
        || async { Ok((p.redis_counters("g").await?.1 == 0).then_some(())) },
    )
    .await
    .unwrap();
    let (available, reserved, sold, lapsed, total) = p.redis_counters("g").await.unwrap();
    assert_eq!(
        (available, reserved, sold, lapsed, total),
        (6, 0, 0, 4, 10),
        "nothing came back"
    );
    let (status, body) = p.settle(&orders[0], "confirm").await.unwrap();
    assert_eq!(status, 409, "too late to pay: {body}");
    wait_for_mysql_to_match(&p, "g").await;
    let rows = p.mysql_orders("g").await.unwrap();
    assert!(rows
        .values()
        .all(|(state, reason)| state == "released" && reason.as_deref() == Some("expired")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lifecycle_calls_give_clear_idempotent_answers() {
    let p = pipeline("answers").await;
    p.open_sale("g", 5, 1).await.unwrap();
    let orders = p.sell("g", "u", 2).await.unwrap();
    let (status, first) = p.settle(&orders[0], "confirm").await.unwrap();
    assert_eq!(
        (status, first["state"].as_str(), first["changed"].as_bool()),
        (200, Some("confirmed"), Some(true))
    );
    let (status, again) = p.settle(&orders[0], "confirm").await.unwrap();
    assert_eq!(
        (status, again["changed"].as_bool()),
        (200, Some(false)),
        "a repeat is the same answer"
    );
    let (status, refused) = p.settle(&orders[0], "cancel").await.unwrap();
    assert_eq!(status, 409, "a paid order cannot be cancelled: {refused}");
    let (status, cancelled) = p.settle(&orders[1], "cancel").await.unwrap();
    assert_eq!(
        (status, cancelled["reason"].as_str()),
        (200, Some("cancelled"))
    );
    let (status, _) = p.settle(&orders[1], "confirm").await.unwrap();
    assert_eq!(status, 409, "a cancelled order cannot be paid");
    let (status, unknown) = p.settle("g.1.999", "confirm").await.unwrap();
    assert_eq!(status, 404, "{unknown}");
    let (status, bad) = p.settle("not-an-order", "cancel").await.unwrap();
    assert_eq!(status, 400, "{bad}");
    assert_eq!(p.redis_counters("g").await.unwrap(), (4, 0, 1, 0, 5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn released_stock_is_sold_again_through_envoy() {
    let mut options = StackOptions::new("resell");
    options.plugin_config["sold_out_cache_ms"] = json!(300);
    let stack = Arc::new(Stack::start(options).await.unwrap());
    stack.open_sale("g", 10, 1).await.unwrap();
    let mut winners = Vec::new();
    for i in 0..10 {
        let r = stack
            .buy("g", &format!("first-{i}"), 1, &format!("first-{i}"))
            .await
            .unwrap();
        assert_eq!(r.outcome, "won");
        winners.push(
            stack
                .shop
                .seen()
                .last()
                .unwrap()
                .header("x-seckill-order-id")
                .unwrap()
                .to_owned(),
        );
    }
    assert_eq!(
        stack.buy("g", "late", 1, "late").await.unwrap().outcome,
        "sold_out"
    );

    let syncer = stack.syncer().unwrap().url();
    for order in &winners[..4] {
        let response = stack
            .http
            .post(format!("{syncer}/v1/orders/{order}/cancel"))
            .header(seckill_api::SECRET_HEADER, seckill_e2e::stack::SHOP_SECRET)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
    }
    // Once the edge's sold-out mark expires, the returned units sell again, and no more.
    let mut round = 0;
    let resold = wait_for(
        "the returned units to sell again",
        Duration::from_secs(30),
        || {
            round += 1;
            let stack = stack.clone();
            async move {
                let attempts = (0..20).map(|i| {
                    let stack = stack.clone();
                    async move {
                        let user = format!("second-{round}-{i}");
                        stack.buy("g", &user, 1, &user).await.unwrap().outcome
                    }
                });
                let outcomes = join_all(attempts).await;
                let won = outcomes.iter().filter(|o| *o == "won").count();
                Ok((won > 0).then_some(won))
            }
        },
    )
    .await
    .unwrap();
    assert_eq!(resold, 4, "exactly the four returned units sold again");
    let seen = stack.shop.seen();
    let ids: std::collections::HashSet<_> = seen
        .iter()
        .filter_map(|s| s.header("x-seckill-order-id"))
        .collect();
    assert_eq!((seen.len(), ids.len()), (14, 14));
    let live = stack.live("g").await.unwrap();
    assert_eq!(
        (live["available"].as_u64(), live["reserved"].as_u64()),
        (Some(0), Some(10))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failing_shop_gives_the_winners_stock_back() {
    let mut options = StackOptions::new("upstream503");
    options.pipeline = true;
    let stack = Stack::start(options).await.unwrap();
    stack.open_sale("g", 10, 1).await.unwrap();
    stack.shop.set_status(503);
    for i in 0..5 {
        let r = stack
            .buy("g", &format!("u{i}"), 1, &format!("r{i}"))
            .await
            .unwrap();
        assert_eq!(r.status, 503, "the buyer sees the shop's failure: {r:?}");
    }
    let seen = stack.shop.seen();
    assert_eq!(seen.len(), 5, "the winners reached the shop");
    let live = stack.live("g").await.unwrap();
    assert_eq!(
        (live["available"].as_u64(), live["reserved"].as_u64()),
        (Some(10), Some(0)),
        "every failed winner's unit came back: {live}"
    );
    // MySQL shows the orders released with that reason.
    let order_ids: Vec<String> = seen
        .iter()
        .filter_map(|s| s.header("x-seckill-order-id").map(str::to_owned))
        .collect();
    wait_for("MySQL to record the releases", DRAIN, || async {
        let rows: Vec<(String, String, Option<String>)> = sqlx::query_as(
            "SELECT order_id, state, release_reason FROM orders WHERE goods_id = 'g'",
        )
        .fetch_all(&stack.db.pool)
        .await?;
        let released = rows
            .iter()
            .filter(|(id, state, reason)| {
                order_ids.contains(id)
                    && state == "released"
                    && reason.as_deref() == Some("upstream_failed")
            })
            .count();
        Ok((released == 5).then_some(()))
    })
    .await
    .unwrap();
    // With the shop healthy again the stock sells normally.
    stack.shop.set_status(200);
    let r = stack.buy("g", "u0", 1, "again").await.unwrap();
    assert_eq!(
        r.outcome, "won",
        "the buyer's count was given back too: {r:?}"
    );
}
