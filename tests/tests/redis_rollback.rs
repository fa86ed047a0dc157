//! A Redis whose `appendfsync everysec` AOF lost its tail (a power loss, a failover to an
//! asynchronous replica), simulated for real: the private redis-server's data directory is
//! copied aside mid-sale, the sale goes on, Redis is killed (`kill -9`) and started again from
//! the older copy. Its sequence has gone back: the next deducts in it reuse order ids that
//! buyers already hold (and MySQL already has). The syncer must never answer `won` with such
//! an id, must decide the goods in MySQL meanwhile and re-seed it into Redis; the writer must
//! dead-letter the reused ids' events rather than apply them to another buyer, reconcile must
//! say so, and no unit is sold twice.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::join_all;
use seckill_e2e::pipeline::{epoch_of, Pipeline};
use seckill_e2e::process::wait_for;
use seckill_e2e::redis_server::AOF_EVERYSEC;
use seckill_e2e::stack::EDGE_SECRET;
use seckill_e2e::syncer::{sum_metric, Role};
use serde_json::{json, Value};

const GOODS: &str = "g";
const STOCK: u64 = 300;
/// Units sold before the copy, and after it (the tail the rolled-back Redis forgets).
const BEFORE_COPY: usize = 100;
const TAIL: usize = 80;
/// Buyers after the restart that meet the rolled-back Redis, before the re-seed.
const FIRST_AFTER: usize = 10;
/// Buyers in flight at once.
const CONCURRENCY: usize = 16;
const DRAIN: Duration = Duration::from_secs(90);

/// What one buyer was told by the deduct endpoint.
#[derive(Debug, Clone)]
struct Answer {
    user: String,
    status: u16,
    reply: Value,
}

impl Answer {
    fn won(&self) -> Option<&str> {
        (self.status == 200 && self.reply["outcome"] == "won")
            .then(|| self.reply["order_id"].as_str())
            .flatten()
    }
}

/// One purchase by `user` (its request id is its name) through the syncer's deduct endpoint.
async fn attempt(p: &Pipeline, user: String) -> Answer {
    let response = p
        .http
        .post(format!("{}{}", p.api.url(), seckill_api::DEDUCT_PATH))
        .header(seckill_api::SECRET_HEADER, EDGE_SECRET)
        .json(&json!({"goods_id": GOODS, "user_id": user, "quantity": 1, "request_id": user}))
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let reply = response.json().await.unwrap_or(Value::Null);
    Answer {
        user,
        status,
        reply,
    }
}

/// Purchases by buyers `{tag}-{from}..{to}`, CONCURRENCY at a time.
async fn attempts(p: &Pipeline, tag: &str, from: usize, to: usize) -> Vec<Answer> {
    let mut answers = Vec::with_capacity(to - from);
    let users: Vec<String> = (from..to).map(|i| format!("{tag}-{i}")).collect();
    for chunk in users.chunks(CONCURRENCY) {
        answers.extend(join_all(chunk.iter().map(|u| attempt(p, u.clone()))).await);
    }
    answers
}

/// Order id -> the one buyer told `won` with it; fails on an id told to two buyers.
fn record_wins(told: &mut HashMap<String, String>, answers: &[Answer]) {
    for answer in answers {
        if let Some(order) = answer.won() {
            if let Some(other) = told.insert(order.to_owned(), answer.user.clone()) {
                assert_eq!(
                    other, answer.user,
                    "order {order} was told won to {other} and to {}",
                    answer.user
                );
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_everysec_tail_rolled_back_reuses_no_order_id_and_oversells_nothing() {
    rolled_back("rollback", false).await;
}

/// The same with the syncer killed and started again along with Redis (one host lost power):
/// the new syncer never saw the tail's order ids, MySQL has them.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tail_rolled_back_under_a_restarted_syncer_reuses_no_order_id() {
    rolled_back("rollback_syncer", true).await;
}

/// Sells before and after a copy of Redis's data directory, restarts Redis from the copy (and
/// the syncer too, with `restart_syncer`), sells on until sold out; asserts what the module
/// says.
async fn rolled_back(label: &str, restart_syncer: bool) {
    // No automatic AOF rewrite: the copy and the files it stands for stay the same kind.
    let mut redis_args = AOF_EVERYSEC.to_vec();
    redis_args.extend(["--auto-aof-rewrite-percentage", "0"]);
    let mut p = Arc::new(
        Pipeline::start_custom(label, &redis_args, &[], &[])
            .await
            .expect("the fixture starts"),
    );
    let (_relay, writer) = p.spawn_relay_and_writer(100, 20).await.unwrap();
    p.open_sale(GOODS, STOCK, 1).await.unwrap();
    let mut told: HashMap<String, String> = HashMap::new();

    // Sold and in MySQL, then copied: what the restarted Redis will remember.
    let before = attempts(&p, "a", 0, BEFORE_COPY).await;
    record_wins(&mut told, &before);
    assert_eq!(told.len(), BEFORE_COPY, "every buyer before the copy won");
    let copy = p.scratch.path.join("redis-data-copy");
    p.redis.snapshot_data(&copy).unwrap();

    // The tail: sold after the copy and drained to MySQL, then Redis loses it.
    let tail = attempts(&p, "b", 0, TAIL).await;
    record_wins(&mut told, &tail);
    assert_eq!(
        told.len(),
        BEFORE_COPY + TAIL,
        "every buyer of the tail won"
    );
    p.wait_for_rows(GOODS, told.len() as i64, DRAIN)
        .await
        .unwrap();
    let highest_seq_told = told.keys().map(|o| seq_of(o)).max().unwrap();
    let fixture = Arc::get_mut(&mut p).expect("no sale in flight holds the fixture");
    if restart_syncer {
        fixture.api.kill();
    }
    fixture.redis.restart_from(&copy).await.unwrap();
    if restart_syncer {
        fixture.api = fixture
            .spawn(Role::Serve { pipeline: false }, None, &[])
            .await
            .unwrap();
    }
    p.api.wait_healthy(DRAIN).await.unwrap();
    let rolled_back_seq = redis_seq(&p).await;
    assert!(
        rolled_back_seq < highest_seq_told,
        "the restarted Redis forgot the tail: its sequence {rolled_back_seq}, {highest_seq_told} handed out"
    );

    // New buyers meet the rolled-back Redis: none is told won with an order id another buyer
    // holds (those attempts are refused or decided in MySQL), and the goods goes to fallback.
    let first_after = attempts(&p, "c", 0, FIRST_AFTER).await;
    record_wins(&mut told, &first_after);
    for answer in &first_after {
        assert!(answer.status == 200 || answer.status == 503, "{answer:?}");
    }
    let api_metrics = p.api.metrics().await.unwrap();
    assert!(
        sum_metric(&api_metrics, "seckill_redis_forgot_total") >= 1,
        "the syncer noticed that Redis forgot: {api_metrics}"
    );
    assert!(
        sum_metric(&api_metrics, "seckill_fallback_entered_total") >= 1,
        "{api_metrics}"
    );

    // Re-seeded from MySQL under a new epoch: Redis decides again.
    wait_for(
        "the goods to be re-seeded and decided by Redis again",
        DRAIN,
        || async {
            let exited = sum_metric(&p.api.metrics().await?, "seckill_fallback_exited_total");
            let fallback = p.admin().fallback(GOODS).await?;
            Ok((exited >= 1 && !fallback).then_some(()))
        },
    )
    .await
    .unwrap();
    let reseed_epoch: u64 = sqlx::query_scalar("SELECT epoch FROM sales WHERE goods_id = ?")
        .bind(GOODS)
        .fetch_one(&p.db.pool)
        .await
        .unwrap();
    assert!(reseed_epoch > 1, "the re-seed took a new epoch");

    // Sales go on, to new buyers, until the goods is sold out.
    let started = Instant::now();
    let mut after: Vec<Answer> = Vec::new();
    let mut next = 0;
    while !after.iter().any(|a| a.reply["outcome"] == "sold_out") {
        assert!(
            started.elapsed() < DRAIN,
            "the goods never sold out after the re-seed"
        );
        let round = attempts(&p, "d", next, next + CONCURRENCY).await;
        next += CONCURRENCY;
        after.extend(round);
    }
    record_wins(&mut told, &after);
    let won_after: Vec<&str> = after.iter().filter_map(Answer::won).collect();
    assert!(!won_after.is_empty(), "Redis sold again after the re-seed");
    assert!(
        won_after.iter().all(|o| epoch_of(o) >= reseed_epoch),
        "{won_after:?}"
    );
    for answer in &after {
        assert!(
            answer.won().is_some() || answer.reply["outcome"] == "sold_out",
            "after the re-seed every buyer is decided by Redis: {answer:?}"
        );
    }

    // Buyers from each phase pay: each confirm lands on that buyer's own order.
    let payers: Vec<(String, String)> = [&before, &tail, &after]
        .iter()
        .flat_map(|answers| {
            answers
                .iter()
                .filter_map(|a| Some((a.won()?.to_owned(), a.user.clone())))
                .take(5)
        })
        .collect();
    for (order, _) in &payers {
        let (status, body) = p.settle(order, "confirm").await.unwrap();
        assert_eq!(
            (status, body["state"].as_str()),
            (200, Some("confirmed")),
            "confirm {order}: {body}"
        );
    }

    // Drained: the outbox is empty and MySQL's counters equal Redis's.
    p.wait_for_counters_to_match(GOODS, DRAIN).await.unwrap();
    let rows: Vec<(String, String, String)> =
        sqlx::query_as("SELECT order_id, user_id, state FROM orders WHERE goods_id = ?")
            .bind(GOODS)
            .fetch_all(&p.db.pool)
            .await
            .unwrap();
    let by_order: HashMap<&str, (&str, &str)> = rows
        .iter()
        .map(|(o, u, s)| (o.as_str(), (u.as_str(), s.as_str())))
        .collect();
    // No MySQL row names a buyer other than the one told won on its order id; every buyer
    // told won has a row (the tail reached MySQL before Redis lost it); the payers' rows are
    // confirmed.
    for (order, (user, _)) in &by_order {
        if let Some(buyer) = told.get(*order) {
            assert_eq!(user, buyer, "MySQL's row of order {order}");
        }
    }
    for (order, buyer) in &told {
        assert_eq!(
            by_order.get(order.as_str()).map(|(u, _)| *u),
            Some(buyer.as_str()),
            "order {order} told won to {buyer}"
        );
    }
    for (order, buyer) in &payers {
        assert_eq!(
            by_order.get(order.as_str()),
            Some(&(buyer.as_str(), "confirmed")),
            "order {order} paid by {buyer}"
        );
    }

    // Nothing oversold: the buyers holding a live or paid order are at most the stock, and
    // MySQL's counters conserve.
    let holders: HashSet<&str> = by_order
        .values()
        .filter(|(_, state)| *state == "reserved" || *state == "confirmed")
        .map(|(user, _)| *user)
        .collect();
    assert!(
        holders.len() as u64 <= STOCK,
        "{} buyers hold {STOCK} units",
        holders.len()
    );
    let (stock, reserved, sold, lapsed, total) = p.mysql_counters(GOODS).await.unwrap();
    assert_eq!(total, STOCK as i64);
    assert_eq!(stock, 0, "sold out");
    assert_eq!(stock + reserved + sold + lapsed, total);
    assert_eq!(
        (reserved + sold) as usize,
        holders.len(),
        "one unit per live or paid order (per-user limit 1)"
    );

    // The reused ids' events were dead-lettered, and reconcile says so.
    let writer_metrics = writer.metrics().await.unwrap();
    let conflicts = sum_metric(&writer_metrics, "seckill_writer_conflicts_total");
    let (code, report) = wait_for("reconcile to settle", DRAIN, || async {
        let (code, report) = p.reconcile(&[])?;
        Ok((report["settled"] == true).then_some((code, report)))
    })
    .await
    .unwrap();
    let dead_letters = report["dead_letters"].as_i64().unwrap_or(0);
    assert!(
        conflicts > 0 || dead_letters > 0,
        "the rolled-back Redis's reused ids reached the writer as conflicts: {writer_metrics}"
    );
    assert_eq!(code, 2, "reconcile reports the dead letters: {report}");
    assert!(dead_letters > 0, "{report}");
    eprintln!(
        "sequence rolled back from {highest_seq_told} to {rolled_back_seq}; {} buyers told won, {} after the re-seed; {conflicts} conflicts, {dead_letters} dead letters",
        told.len(),
        won_after.len()
    );
}

/// The sequence in an order id `goods.epoch.sequence`.
fn seq_of(order_id: &str) -> u64 {
    order_id
        .rsplit('.')
        .next()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no sequence in {order_id}"))
}

/// The sequence the sale Redis holds last handed out.
async fn redis_seq(p: &Pipeline) -> u64 {
    let mut conn = p.redis.connection().await.unwrap();
    redis::cmd("HGET")
        .arg(format!("{}:{{{GOODS}}}:sale", p.prefix))
        .arg("seq")
        .query_async(&mut conn)
        .await
        .unwrap()
}
