//! `seckill-syncer reseed`: a goods Redis forgot (killed with `kill -9`, started again empty)
//! is loaded back from MySQL, with the pipeline running against real Tansu and MariaDB.
//! Proves the re-seeded Redis holds MySQL's counters, buyers, idempotency records and open
//! reservations: old orders can still be confirmed and cancelled by id, a buyer at the limit
//! is still refused, a retry gets the same order id, new orders carry a new epoch and never
//! an id MySQL has, selling out sells exactly MySQL's available stock, and reconcile is clean.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use seckill_e2e::pipeline::{epoch_of, Pipeline};
use seckill_e2e::process::wait_for;
use seckill_e2e::syncer::Role;
use serde_json::Value;

const DRAIN: Duration = Duration::from_secs(120);
const STOCK: i64 = 30;

/// Runs `seckill-syncer reseed`; returns whether it succeeded and what it printed.
fn reseed(p: &Pipeline, goods: &str) -> (bool, String) {
    let output = p
        .command("reseed")
        .unwrap()
        .args(["--kafka-brokers", &p.broker.bootstrap()])
        .args(["--drain-timeout-s", "60"])
        .arg(goods)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

/// `POST /admin/sales/{goods}/reseed`, with or without the secret: (status, body).
async fn api_reseed(p: &Pipeline, goods: &str, with_secret: bool) -> (u16, Value) {
    let mut request = p
        .http
        .post(format!("{}/admin/sales/{goods}/reseed", p.api.url()));
    if with_secret {
        request = request.header(seckill_api::SECRET_HEADER, seckill_e2e::stack::ADMIN_SECRET);
    }
    let reply = request.send().await.unwrap();
    let status = reply.status().as_u16();
    (status, reply.json().await.unwrap_or(Value::Null))
}

async fn deduct_outcome(p: &Pipeline, goods: &str, user: &str, request: &str) -> Value {
    p.http
        .post(format!("{}{}", p.api.url(), seckill_api::DEDUCT_PATH))
        .header(seckill_api::SECRET_HEADER, seckill_e2e::stack::EDGE_SECRET)
        .json(&serde_json::json!({
            "goods_id": goods, "user_id": user, "quantity": 1, "request_id": request
        }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

async fn settle_ok(p: &Pipeline, order: &str, action: &str, state: &str) {
    let (status, body) = p.settle(order, action).await.unwrap();
    assert_eq!(status, 200, "{action} {order}: {body}");
    assert_eq!(body["state"], state, "{action} {order}: {body}");
    assert_eq!(body["changed"], true, "{action} {order}: {body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_goods_redis_forgot_is_reseeded_from_mysql() {
    // The operator's re-seed: no MySQL fallback, so nothing re-seeds on its own
    // (redis_forgets.rs covers the automatic path).
    let mut p = Pipeline::start_with("reseed", &[("SECKILL_FALLBACK_RATE", "0")])
        .await
        .expect("the fixture starts");
    let (_relay, _writer) = p.spawn_relay_and_writer(100, 20).await.unwrap();
    p.open_sale("g", STOCK as u64, 1).await.unwrap();
    let p_shared = Arc::new(p);
    // 20 buyers a-0..19 (request id = user id): 6 pay, 5 cancel, 9 stay reserved.
    let sold = p_shared.sell("g", "a", 20).await.unwrap();
    assert_eq!(sold.len(), 20);
    p = Arc::try_unwrap(p_shared)
        .ok()
        .expect("no sale holds the fixture");
    // Who holds which order: MySQL's rows say (the writer may still be applying them).
    p.wait_for_rows("g", 20, DRAIN).await.unwrap();
    let buyers: std::collections::HashMap<String, String> =
        sqlx::query_as("SELECT user_id, order_id FROM orders WHERE goods_id = 'g'")
            .fetch_all(&p.db.pool)
            .await
            .unwrap()
            .into_iter()
            .collect();
    let order_of = |user: &str| buyers[user].clone();
    for i in 0..6 {
        settle_ok(&p, &order_of(&format!("a-{i}")), "confirm", "confirmed").await;
    }
    for i in 6..11 {
        settle_ok(&p, &order_of(&format!("a-{i}")), "cancel", "released").await;
    }
    p.wait_for_counters_to_match("g", DRAIN).await.unwrap();
    let before = p.mysql_counters("g").await.unwrap();
    assert_eq!(before, (STOCK - 15, 9, 6, 0, STOCK));
    let old_ids = p.order_ids("g").await.unwrap();
    let newest_old_epoch = old_ids.iter().map(|o| epoch_of(o)).max().unwrap();

    p.redis.restart_empty().await.unwrap();
    p.api.wait_healthy(DRAIN).await.unwrap();
    // A Redis without the goods MySQL loaded into it forgot: nothing is sold from it.
    assert_eq!(
        deduct_outcome(&p, "g", "early", "early").await["error"],
        "unavailable"
    );

    let (ok, printed) = reseed(&p, "g");
    assert!(ok, "reseed: {printed}");
    // Counters equal MySQL's.
    assert_eq!(p.redis_counters("g").await.unwrap(), before, "{printed}");
    // Redis has the sale again: a second reseed is refused and changes nothing.
    let (ok, printed) = reseed(&p, "g");
    assert!(
        !ok && printed.contains("still loaded in Redis"),
        "{printed}"
    );
    assert_eq!(p.redis_counters("g").await.unwrap(), before);

    // A buyer at the per-user limit is still refused, whether paid or reserved.
    for user in ["a-0", "a-11"] {
        let reply = deduct_outcome(&p, "g", user, &format!("{user}-again")).await;
        assert_eq!(reply["outcome"], "duplicate", "{user}: {reply}");
    }
    // A retry of a live reservation's request gets the same order id.
    let reply = deduct_outcome(&p, "g", "a-12", "a-12").await;
    assert_eq!(reply["outcome"], "won", "{reply}");
    assert_eq!(reply["order_id"].as_str(), Some(order_of("a-12").as_str()));

    // Sell out: a cancelled buyer may buy again, new buyers get new-epoch ids never in MySQL.
    let mut winners = Vec::new();
    let reply = deduct_outcome(&p, "g", "a-6", "a-6-again").await;
    assert_eq!(reply["outcome"], "won", "{reply}");
    winners.push(reply["order_id"].as_str().unwrap().to_owned());
    for i in 0..40 {
        let user = format!("b-{i}");
        let reply = deduct_outcome(&p, "g", &user, &user).await;
        match reply["outcome"].as_str() {
            Some("won") => winners.push(reply["order_id"].as_str().unwrap().to_owned()),
            Some("sold_out") => {}
            other => panic!("{user}: {other:?} {reply}"),
        }
    }
    assert_eq!(
        winners.len() as i64,
        before.0,
        "exactly MySQL's available stock sold"
    );
    for order in &winners {
        assert!(epoch_of(order) > newest_old_epoch, "{order}");
        assert!(!old_ids.contains(order), "{order} was issued before");
    }
    let distinct: HashSet<&String> = winners.iter().collect();
    assert_eq!(distinct.len(), winners.len());
    // No oversell: units held across before and after are the whole stock.
    let (available, reserved, sold_units, lapsed, total) = p.redis_counters("g").await.unwrap();
    assert_eq!((available, lapsed), (0, 0));
    assert_eq!(reserved + sold_units, total);

    // Every reservation MySQL had can still be confirmed or cancelled by its order id.
    for i in 11..15 {
        settle_ok(&p, &order_of(&format!("a-{i}")), "confirm", "confirmed").await;
    }
    for i in 15..20 {
        settle_ok(&p, &order_of(&format!("a-{i}")), "cancel", "released").await;
    }
    // The cancelled units went back on sale (they are of the re-seeded round).
    assert_eq!(p.redis_counters("g").await.unwrap().0, 5);

    p.wait_for_counters_to_match("g", DRAIN).await.unwrap();
    let (code, report) = wait_for("reconcile to settle", DRAIN, || async {
        let (code, report) = p.reconcile(&["--orders"])?;
        Ok((report["settled"] == true).then_some((code, report)))
    })
    .await
    .unwrap();
    assert_eq!(code, 0, "clean after the re-seed: {report}");
    // A repair recomputes MySQL's counters from the whole re-seeded round, not only the
    // orders of the new epoch.
    let counters = p.redis_counters("g").await.unwrap();
    p.reconcile(&["--repair"]).unwrap();
    assert_eq!(p.mysql_counters("g").await.unwrap(), counters);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_reseed_waits_for_the_writer_and_an_empty_outbox() {
    let mut p = Pipeline::start_with("reseed-drain", &[("SECKILL_FALLBACK_RATE", "0")])
        .await
        .expect("the fixture starts");
    let (_relay, mut writer) = p.spawn_relay_and_writer(100, 20).await.unwrap();
    p.open_sale("h", 10, 1).await.unwrap();
    for i in 0..3 {
        let user = format!("a-{i}");
        assert!(p.buy("h", &user, &user).await.unwrap().is_some());
    }
    p.wait_for_rows("h", 3, DRAIN).await.unwrap();
    // The writer stops; two more sales reach Kafka (the relay empties the outbox) but not MySQL.
    writer.kill();
    for i in 3..5 {
        let user = format!("a-{i}");
        assert!(p.buy("h", &user, &user).await.unwrap().is_some());
    }
    wait_for("the relay to empty the outbox", DRAIN, || async {
        Ok((p.outbox_len("h").await? == 0).then_some(()))
    })
    .await
    .unwrap();
    let epoch: u64 = sqlx::query_scalar("SELECT epoch FROM sales WHERE goods_id = 'h'")
        .fetch_one(&p.db.pool)
        .await
        .unwrap();
    p.redis.restart_empty().await.unwrap();
    p.api.wait_healthy(DRAIN).await.unwrap();

    // MySQL lacks two orders that left Redis: the re-seed waits for them, and gives up.
    let output = p
        .command("reseed")
        .unwrap()
        .args(["--kafka-brokers", &p.broker.bootstrap()])
        .args(["--drain-timeout-s", "1", "h"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(stderr.contains("did not apply the sale topic"), "{stderr}");
    // Events left in an outbox (a Redis that kept its stream) are not read past either.
    let outbox = format!("{}:{{h}}:outbox", p.prefix);
    let mut conn = p.redis.connection().await.unwrap();
    let _: String = redis::cmd("XADD")
        .arg(&outbox)
        .arg("*")
        .arg("event")
        .arg("{}")
        .query_async(&mut conn)
        .await
        .unwrap();
    let (status, body) = api_reseed(&p, "h", true).await;
    assert_eq!(status, 409, "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("outbox still holds 1"),
        "{body}"
    );
    let _: u64 = redis::cmd("DEL")
        .arg(&outbox)
        .query_async(&mut conn)
        .await
        .unwrap();
    let after: u64 = sqlx::query_scalar("SELECT epoch FROM sales WHERE goods_id = 'h'")
        .fetch_one(&p.db.pool)
        .await
        .unwrap();
    assert_eq!(after, epoch, "a refused re-seed takes no epoch");
    let sale_exists: bool = redis::cmd("EXISTS")
        .arg(format!("{}:{{h}}:sale", p.prefix))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(!sale_exists, "Redis holds no sale");

    // With a writer again, the API's re-seed waits for it and loads all five orders.
    let _writer = p
        .spawn(
            Role::Write {
                batch_size: 100,
                batch_wait_ms: 20,
            },
            None,
            &[],
        )
        .await
        .unwrap();
    let (status, body) = api_reseed(&p, "h", true).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["orders"], 5, "{body}");
    assert_eq!(body["epoch"], epoch + 1, "{body}");
    assert_eq!(p.redis_counters("h").await.unwrap(), (5, 5, 0, 0, 10));
    assert_eq!(p.mysql_counters("h").await.unwrap(), (5, 5, 0, 0, 10));
    let reply = deduct_outcome(&p, "h", "a-4", "a-4").await;
    assert_eq!(
        reply["outcome"], "won",
        "a retry after the re-seed: {reply}"
    );
}
