//! The syncer notices on its own when Redis fails or forgets, sells through MySQL meanwhile and
//! goes back to Redis after a re-seed: private Redis (killed, restarted empty), Tansu and
//! MariaDB, relay and writer as processes, buyers on the syncer's deduct endpoint. Every buyer
//! told `won` is recorded: no order id twice, no more winners than units, each winner's row in
//! MySQL after the drain, reconcile clean.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use seckill_e2e::pipeline::{epoch_of, Pipeline};
use seckill_e2e::process::wait_for;
use seckill_e2e::stack::{pass_keys, EDGE_SECRET};
use seckill_e2e::syncer::sum_metric;
use serde_json::{json, Value};

const DRAIN: Duration = Duration::from_secs(120);
/// How long a buyer keeps retrying with the same request id through 503s.
const BUYER_PATIENCE: Duration = Duration::from_secs(30);

/// One buyer's attempt with retries on 503 (same request id); the final answer.
async fn buy(p: &Pipeline, goods: &str, user: &str) -> Value {
    let deadline = Instant::now() + BUYER_PATIENCE;
    loop {
        let response = p
            .http
            .post(format!("{}{}", p.api.url(), seckill_api::DEDUCT_PATH))
            .header(seckill_api::SECRET_HEADER, EDGE_SECRET)
            .json(&json!({"goods_id": goods, "user_id": user, "quantity": 1, "request_id": user}))
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        if status == 503 {
            assert_eq!(
                response.headers().get("retry-after").map(|v| v.as_bytes()),
                Some(&b"1"[..]),
                "a 503 says when to come back"
            );
        }
        let body: Value = response.json().await.unwrap();
        if status == 200 {
            return body;
        }
        assert_eq!(status, 503, "{body}");
        assert!(
            Instant::now() < deadline,
            "{user} got 503 for {BUYER_PATIENCE:?}: {body}"
        );
        // A poll inside the buyer's deadline: a 503 asks for a retry in a moment.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Buyers `{tag}-0..count`, 20 at a time; records every `won` (order id -> buyer), failing on
/// an order id told to two buyers. Returns how many won.
async fn sell(
    p: &Arc<Pipeline>,
    goods: &str,
    tag: &str,
    count: usize,
    issued: &mut HashMap<String, String>,
) -> usize {
    let mut won = 0;
    for chunk in (0..count).collect::<Vec<_>>().chunks(20) {
        let answers = futures::future::join_all(chunk.iter().map(|i| {
            let p = p.clone();
            let (goods, user) = (goods.to_owned(), format!("{tag}-{i}"));
            async move { (user.clone(), buy(&p, &goods, &user).await) }
        }))
        .await;
        for (user, answer) in answers {
            if answer["outcome"] == "won" {
                let order = answer["order_id"].as_str().unwrap().to_owned();
                // Whoever decided (Redis, or MySQL while Redis is down or forgot), the winner's
                // pass verifies and names this order and buyer.
                let now_s = (seckill_e2e::stack::now_ms() / 1000) as u64;
                let token = answer["pass"]
                    .as_str()
                    .unwrap_or_else(|| panic!("{answer}"));
                let pass = seckill_pass::verify(token, &pass_keys(), now_s).unwrap();
                assert_eq!(
                    (
                        pass.order_id.as_str(),
                        pass.goods_id.as_str(),
                        pass.user_id.as_str()
                    ),
                    (order.as_str(), goods, user.as_str())
                );
                if let Some(other) = issued.insert(order.clone(), user.clone()) {
                    assert_eq!(other, user, "order id {order} told to two buyers");
                }
                won += 1;
            }
        }
    }
    won
}

async fn mode(p: &Pipeline, goods: &str) -> (bool, u64) {
    let sale = p.admin().sale(goods).await.unwrap();
    (
        sale["definition"]["fallback"].as_bool().unwrap(),
        sale["definition"]["epoch"].as_u64().unwrap(),
    )
}

/// Waits until MySQL has every issued order, each naming its buyer, and reconcile is clean.
async fn drained_and_clean(p: &Pipeline, goods: &str, issued: &HashMap<String, String>) {
    p.wait_for_rows(goods, issued.len() as i64, DRAIN)
        .await
        .unwrap();
    let rows: Vec<(String, String)> =
        sqlx::query_as("SELECT order_id, user_id FROM orders WHERE goods_id = ?")
            .bind(goods)
            .fetch_all(&p.db.pool)
            .await
            .unwrap();
    for (order, user) in &rows {
        assert_eq!(issued.get(order), Some(user), "MySQL's row {order}");
    }
    p.wait_for_counters_to_match(goods, DRAIN).await.unwrap();
    let (code, report) = p.reconcile(&["--orders"]).unwrap();
    assert_eq!(code, 0, "reconcile is clean: {report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restarted_empty_is_caught_sold_around_and_reseeded() {
    let p = Pipeline::start("forgets").await.unwrap();
    let (_relay, _writer) = p.spawn_relay_and_writer(100, 20).await.unwrap();
    p.open_sale("g", 100, 1).await.unwrap();
    let p_arc = Arc::new(p);
    let mut issued = HashMap::new();
    assert_eq!(sell(&p_arc, "g", "a", 30, &mut issued).await, 30);
    p_arc
        .wait_for_rows("g", 30, DRAIN)
        .await
        .expect("the first 30 reach MySQL");
    let (_, first_epoch) = mode(&p_arc, "g").await;
    let mut p = Arc::into_inner(p_arc).expect("no other handle");
    p.redis.restart_empty().await.unwrap();
    let p = Arc::new(p);

    // The next buyers are decided by MySQL (Redis forgot the sale), then by Redis again once
    // the recoverer re-seeded it: either way nobody gets a unit or an id twice.
    assert_eq!(sell(&p, "g", "b", 30, &mut issued).await, 30);
    // Old buyers retrying get their own orders back, never a second unit.
    for i in 0..5 {
        let answer = buy(&p, "g", &format!("a-{i}")).await;
        assert_eq!(answer["outcome"], "won", "{answer}");
        assert_eq!(
            issued[answer["order_id"].as_str().unwrap()],
            format!("a-{i}")
        );
    }
    wait_for("the goods back in Redis", DRAIN, || async {
        Ok((!mode(&p, "g").await.0).then_some(()))
    })
    .await
    .expect("the goods goes back to Redis");
    let metrics = p.api.metrics().await.unwrap();
    assert!(
        sum_metric(&metrics, "seckill_redis_forgot_total") >= 1,
        "{metrics}"
    );
    assert!(sum_metric(&metrics, "seckill_fallback_exited_total") >= 1);
    assert_eq!(
        sell(&p, "g", "c", 60, &mut issued).await,
        40,
        "sold out at 100"
    );
    let epochs: std::collections::BTreeSet<u64> = issued.keys().map(|o| epoch_of(o)).collect();
    assert!(
        epochs.len() >= 3 && epochs.iter().all(|&e| e >= first_epoch),
        "Redis, MySQL and Redis again each sold under an epoch of their own: {epochs:?}"
    );
    drained_and_clean(&p, "g", &issued).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_down_mysql_sells_and_redis_takes_over_again() {
    let p = Pipeline::start("redis-down").await.unwrap();
    let (_relay, _writer) = p.spawn_relay_and_writer(100, 20).await.unwrap();
    p.open_sale("g", 50, 1).await.unwrap();
    let p_arc = Arc::new(p);
    let mut issued = HashMap::new();
    assert_eq!(sell(&p_arc, "g", "a", 10, &mut issued).await, 10);
    p_arc.wait_for_rows("g", 10, DRAIN).await.unwrap();
    let mut p = Arc::into_inner(p_arc).expect("no other handle");
    p.redis.kill();
    let p = Arc::new(p);
    // Redis is gone: the first calls fail (503), then the breaker opens and MySQL decides.
    assert_eq!(sell(&p, "g", "b", 20, &mut issued).await, 20);
    let (fallback, _) = mode(&p, "g").await;
    assert!(fallback, "MySQL decides while Redis is down");
    let metrics = p.api.metrics().await.unwrap();
    assert!(sum_metric(&metrics, "seckill_fallback_entered_total") >= 1);
    assert!(sum_metric(&metrics, "seckill_fallback_decisions_total") >= 20);
    // A MySQL order's lifecycle works in fallback.
    let b0 = issued
        .iter()
        .find(|(_, u)| u.as_str() == "b-0")
        .map(|(o, _)| o.clone())
        .unwrap();
    let (status, body) = p.settle(&b0, "confirm").await.unwrap();
    assert_eq!(status, 200, "{body}");
    let mut p = Arc::into_inner(p).expect("no other handle");
    p.redis.restart().await.unwrap();
    let p = Arc::new(p);
    wait_for("the goods back in Redis", DRAIN, || async {
        Ok((!mode(&p, "g").await.0).then_some(()))
    })
    .await
    .expect("the goods goes back to Redis");
    assert_eq!(
        sell(&p, "g", "c", 40, &mut issued).await,
        20,
        "sold out at 50"
    );
    // The order confirmed in MySQL stays confirmed through the switch.
    let (status, body) = p.settle(&b0, "confirm").await.unwrap();
    assert_eq!(
        (status, body["state"].as_str()),
        (200, Some("confirmed")),
        "{body}"
    );
    drained_and_clean(&p, "g", &issued).await;
}
