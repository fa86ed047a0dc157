//! Sale controls through the real gate (Envoy with the filter, the syncer with its whole
//! pipeline, a private Redis, a Tansu broker and a fresh MariaDB database), on every tier:
//!
//! - pause in the middle of a crowd: no attempt sent after the pause answered wins; every one
//!   is told `paused` (403, Retry-After as asked) by the stock service, never a sold-out from
//!   the gate's cache; confirm, cancel and a winner's retry work while paused; resume and the
//!   sale goes on; stop and every attempt after it is `ended`, a reservation cancelled after
//!   it lapses, a confirm still works; the counters are conserved and reconcile is clean;
//! - add stock to a sold-out goods: the gate's sold-out cache lets buyers through again within
//!   its bound, exactly the added units sell, and the same operation id again adds nothing;
//! - a goods MySQL decides because Redis is down: pause, resume and add stock there, and the
//!   pause and the units survive the re-seed that brings the goods back to Redis.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use seckill_e2e::process::wait_for;
use seckill_e2e::stack::{now_ms, BuyResult, Stack, StackOptions};
use serde_json::{json, Value};

/// Units of the goods the crowd is paused on: more than the paced crowd buys before the
/// stop, so that every phase meets a goods with stock (a sold-out one is answered from the
/// gate's cache, which is not what a pause is about).
const STOCK: u64 = 20_000;
/// Units of the goods that sells out and is restocked, and the units added.
const RESTOCK_FROM: u64 = 8;
const ADDED: u64 = 5;
/// Buyers in flight at once in a crowd, each sending attempt after attempt (a new buyer and
/// request id each), one every [`PACE`] at most: a crowd of at most 800 attempts a second.
const BUYERS: usize = 8;
const PACE: Duration = Duration::from_millis(10);
/// A crowd's attempts at most: bounds a crowd whose stop condition never comes.
const ATTEMPTS_MAX: u64 = 100_000;
/// The Retry-After a pause asks for.
const RETRY_AFTER_S: u32 = 7;
/// The gate's sold-out cache: a restocked goods must sell again within about this long.
const SOLD_OUT_CACHE_MS: u64 = 2_000;
/// Answers the tests look at after each control.
const ANSWERS_AFTER: usize = 30;
const PATIENCE: Duration = Duration::from_secs(60);
const DRAIN: Duration = Duration::from_secs(120);

/// What one buyer was told, and when the attempt was sent.
#[derive(Debug, Clone)]
struct Answer {
    sent: Instant,
    user: String,
    request_id: String,
    result: BuyResult,
}

impl Answer {
    fn won(&self) -> Option<&str> {
        (self.result.outcome == "won")
            .then_some(self.result.order_id.as_deref())
            .flatten()
    }
}

/// Buyers sending attempts through Envoy until stopped.
struct Crowd {
    stop: Arc<AtomicBool>,
    answers: Arc<Mutex<Vec<Answer>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Crowd {
    fn start(stack: &Arc<Stack>, goods: &str, tag: &str) -> Crowd {
        let stop = Arc::new(AtomicBool::new(false));
        let answers: Arc<Mutex<Vec<Answer>>> = Arc::default();
        let next = Arc::new(AtomicU64::new(0));
        let tasks = (0..BUYERS)
            .map(|_| {
                let (stack, stop, answers, next) =
                    (stack.clone(), stop.clone(), answers.clone(), next.clone());
                let (goods, tag) = (goods.to_owned(), tag.to_owned());
                tokio::spawn(async move {
                    let mut pace = tokio::time::interval(PACE);
                    pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    while !stop.load(Ordering::Relaxed) {
                        pace.tick().await;
                        let n = next.fetch_add(1, Ordering::Relaxed);
                        assert!(n < ATTEMPTS_MAX, "the crowd on {goods} never stopped");
                        let (user, request_id) = (format!("{tag}-u{n}"), format!("{tag}-r{n}"));
                        let sent = Instant::now();
                        let result = stack.buy(&goods, &user, 1, &request_id).await.unwrap();
                        answers.lock().unwrap().push(Answer {
                            sent,
                            user,
                            request_id,
                            result,
                        });
                    }
                })
            })
            .collect();
        Crowd {
            stop,
            answers,
            tasks,
        }
    }

    fn answers(&self) -> Vec<Answer> {
        self.answers.lock().unwrap().clone()
    }

    async fn wait_until(&self, what: &str, done: impl Fn(&[Answer]) -> bool) {
        wait_for(what, PATIENCE, || {
            let finished = done(&self.answers());
            async move { Ok(finished.then_some(())) }
        })
        .await
        .unwrap();
    }

    async fn stop(self) -> Vec<Answer> {
        self.stop.store(true, Ordering::Relaxed);
        for task in self.tasks {
            task.await.unwrap();
        }
        let answers = self.answers.lock().unwrap().clone();
        answers
    }
}

fn sent_after(answers: &[Answer], at: Instant) -> Vec<&Answer> {
    answers.iter().filter(|a| a.sent > at).collect()
}

fn order_ids(answers: &[Answer]) -> std::collections::BTreeSet<String> {
    answers
        .iter()
        .filter_map(|a| a.won().map(str::to_owned))
        .collect()
}

/// A stack with its pipeline, a short sold-out cache and generous rate limits.
async fn start(label: &str) -> Stack {
    let mut options = StackOptions::for_a_crowd(label);
    options.plugin_config["sold_out_cache_ms"] = json!(SOLD_OUT_CACHE_MS);
    Stack::start(options).await.expect("the stack starts")
}

/// Defines a sale of `tier` open from a minute ago for an hour with the CLI (`sale define`),
/// and preheats it.
async fn open(stack: &Stack, goods: &str, tier: &str, stock: u64) {
    let stock = stock.to_string();
    let mut args = vec![
        "define",
        goods,
        "--total-stock",
        &stock,
        "--per-user-limit",
        "1",
        "--starts-at",
        "now",
        "--ends-at",
        "now+1h",
        "--tier",
        tier,
    ];
    if tier == "redis_sharded" {
        args.extend(["--shards", "3"]);
    }
    let run = stack.sale_cli(&args, &[]).unwrap();
    assert_eq!(run.code, Some(0), "sale define {goods}: {run:?}");
    assert_eq!(run.json["tier"], tier, "{run:?}");
    stack.preheat(goods, false).await.unwrap();
}

/// The counters that decide the goods: Redis's (`live`), or MySQL's for a db goods.
async fn counters(stack: &Stack, goods: &str, tier: &str) -> (u64, u64, u64, u64, u64) {
    let sale = stack.admin().unwrap().sale(goods).await.unwrap();
    let n = |v: &Value| {
        v.as_u64()
            .unwrap_or_else(|| panic!("not a count: {v} in {sale}"))
    };
    if tier == "db" {
        let d = &sale["definition"];
        (
            n(&d["total_stock"]),
            n(&d["stock"]),
            n(&d["reserved"]),
            n(&d["sold"]),
            n(&d["lapsed"]),
        )
    } else {
        let l = &sale["live"];
        (
            n(&l["total"]),
            n(&l["available"]),
            n(&l["reserved"]),
            n(&l["sold"]),
            n(&l["lapsed"]),
        )
    }
}

/// What a control answers for the Redis half: a db goods has none.
fn redis_step(tier: &str) -> &'static str {
    if tier == "db" {
        "not_needed"
    } else {
        "applied"
    }
}

async fn settle(stack: &Stack, order_id: &str, action: &str) -> Value {
    let (status, body) = stack
        .admin()
        .unwrap()
        .settle(order_id, action)
        .await
        .unwrap();
    assert_eq!(status, 200, "{action} {order_id}: {body}");
    body
}

/// Waits until the pipeline has brought MySQL level with Redis: reconcile clean.
async fn reconcile_clean(stack: &Stack) {
    wait_for("reconcile to be clean", DRAIN, || async {
        let (code, report) = stack.reconcile(&[])?;
        Ok((code == 0).then_some(report))
    })
    .await
    .unwrap();
}

/// Pause mid-crowd, settle while paused, resume, stop; then the books.
async fn pause_resume_stop(stack: &Arc<Stack>, goods: &str, tier: &str) {
    open(stack, goods, tier, STOCK).await;
    let admin = stack.admin().unwrap();
    let crowd = Crowd::start(stack, goods, "p");
    crowd
        .wait_until("the crowd's first 5 winners", |a| order_ids(a).len() >= 5)
        .await;

    let (status, paused) = admin
        .control(
            goods,
            "pause",
            Some(&json!({ "retry_after_s": RETRY_AFTER_S })),
        )
        .await
        .unwrap();
    let paused_at = Instant::now();
    assert_eq!(status, 200, "{paused}");
    assert_eq!(
        (&paused["state"], &paused["redis"], &paused["changed"]),
        (&json!("paused"), &json!(redis_step(tier)), &json!(true)),
        "{paused}"
    );
    crowd
        .wait_until("answers to attempts sent after the pause", |a| {
            sent_after(a, paused_at).len() >= ANSWERS_AFTER
        })
        .await;
    // Reservations made before the pause live on: cancel, confirm, and a winner's retry.
    let before: Vec<Answer> = crowd
        .answers()
        .into_iter()
        .filter(|a| a.won().is_some())
        .collect();
    let cancelled = before[0].won().unwrap().to_owned();
    assert_eq!(
        settle(stack, &cancelled, "cancel").await["state"],
        "released"
    );
    let confirmed = before[1].won().unwrap().to_owned();
    assert_eq!(
        settle(stack, &confirmed, "confirm").await["state"],
        "confirmed"
    );
    let retry = stack
        .buy(goods, &before[2].user, 1, &before[2].request_id)
        .await
        .unwrap();
    assert_eq!(
        (
            retry.status,
            retry.outcome.as_str(),
            retry.order_id.as_deref()
        ),
        (200, "won", before[2].won()),
        "a winner's retry while paused: {retry:?}"
    );

    let resume_sent = Instant::now();
    let run = stack.sale_cli(&["resume", goods], &[]).unwrap();
    assert_eq!(run.code, Some(0), "{run:?}");
    assert_eq!(
        (&run.json["state"], &run.json["redis"]),
        (&json!("open"), &json!(redis_step(tier))),
        "{run:?}"
    );
    let resumed_at = Instant::now();
    crowd
        .wait_until("5 winners after the resume", |a| {
            order_ids(
                &sent_after(a, resumed_at)
                    .into_iter()
                    .cloned()
                    .collect::<Vec<_>>(),
            )
            .len()
                >= 5
        })
        .await;

    let stop_sent = Instant::now();
    let run = stack.sale_cli(&["stop", goods], &[]).unwrap();
    let stopped_at = Instant::now();
    assert_eq!(run.code, Some(0), "{run:?}");
    assert_eq!(run.json["state"], "stopped", "{run:?}");
    crowd
        .wait_until("answers to attempts sent after the stop", |a| {
            sent_after(a, stopped_at).len() >= ANSWERS_AFTER
        })
        .await;
    let answers = crowd.stop().await;

    // Paused: between the pause's answer and the resume, nobody won; everyone was told
    // to come back, by the stock service (a cached sold-out would say `sold_out`).
    let while_paused: Vec<&Answer> = answers
        .iter()
        .filter(|a| a.sent > paused_at && a.sent < resume_sent)
        .collect();
    assert!(while_paused.len() >= ANSWERS_AFTER);
    for a in &while_paused {
        let r = &a.result;
        assert_eq!(
            (r.status, r.outcome.as_str(), r.retry_after.as_deref()),
            (403, "paused", Some("7")),
            "an attempt sent while {goods} was paused: {r:?}"
        );
        assert_eq!(r.body["retry_after_ms"], 7_000, "{r:?}");
    }
    // Stopped: `ended`, which the gate then caches as a sold-out (and answers so itself).
    let after_stop = sent_after(&answers, stopped_at);
    for a in &after_stop {
        let r = &a.result;
        let ended = (r.status, r.outcome.as_str()) == (403, "ended");
        let cached =
            (r.status, r.outcome.as_str()) == (409, "sold_out") && r.body["remaining"] == 0;
        assert!(
            ended || cached,
            "an attempt sent after {goods} was stopped: {r:?}"
        );
    }
    assert!(
        sent_after(&answers, stop_sent)
            .iter()
            .any(|a| a.result.outcome == "ended"),
        "the stock service said ended"
    );

    // After the stop: a cancelled reservation lapses (the sale is over), a confirm works.
    let stock_before = counters(stack, goods, tier).await;
    let won = order_ids(&answers);
    let open_orders: Vec<&String> = won
        .iter()
        .filter(|o| **o != cancelled && **o != confirmed)
        .collect();
    assert_eq!(
        settle(stack, open_orders[0], "cancel").await["state"],
        "released"
    );
    assert_eq!(
        settle(stack, open_orders[1], "confirm").await["state"],
        "confirmed"
    );
    let (total, available, reserved, sold, lapsed) = counters(stack, goods, tier).await;
    assert_eq!(
        available, stock_before.1,
        "nothing went back on sale after the stop"
    );
    assert_eq!((total, sold, lapsed), (STOCK, 2, 1), "{goods}");
    // Every unit is somewhere: the one cancelled while paused went back on sale (and may
    // have sold again: it is then one of the winners).
    let won = won.len() as u64;
    assert!(
        won <= STOCK + 1,
        "{won} winners of {STOCK} units and one returned"
    );
    assert_eq!(available + reserved + sold + lapsed, total, "conserved");
    assert_eq!(
        reserved + sold + lapsed,
        won - 1,
        "every winner but the cancelled one"
    );
    let shop = stack
        .shop
        .accepted_order_ids()
        .into_iter()
        .collect::<std::collections::BTreeSet<_>>();
    assert_eq!(
        shop,
        order_ids(&answers),
        "the shop got exactly the winners"
    );
}

/// Sell out, add stock, sell exactly the added units.
async fn restock(stack: &Arc<Stack>, goods: &str, tier: &str) {
    open(stack, goods, tier, RESTOCK_FROM).await;
    let crowd = Crowd::start(stack, goods, "s");
    crowd
        .wait_until("the goods to sell out", |a| {
            a.iter().any(|x| x.result.outcome == "sold_out")
        })
        .await;
    let sold_before = order_ids(&crowd.stop().await);
    assert_eq!(sold_before.len() as u64, RESTOCK_FROM, "{goods}");

    let operation = format!("restock-{goods}");
    let added = ADDED.to_string();
    let add = [
        "add-stock",
        goods,
        "--quantity",
        &added,
        "--operation-id",
        &operation,
    ];
    let added_at = Instant::now();
    let run = stack.sale_cli(&add, &[]).unwrap();
    assert_eq!(run.code, Some(0), "{run:?}");
    assert_eq!(
        (
            &run.json["added_now"],
            &run.json["total_stock"],
            &run.json["redis"]
        ),
        (
            &json!(true),
            &json!(RESTOCK_FROM + ADDED),
            &json!(redis_step(tier))
        ),
        "{run:?}"
    );
    if tier == "redis_sharded" {
        assert_eq!(run.json["shard_units"], json!([2, 2, 1]), "{run:?}");
    }
    // The same operation again (a retry): nothing more; another quantity under it: refused.
    let again = stack.sale_cli(&add, &[]).unwrap();
    assert_eq!(
        (
            again.code,
            &again.json["added_now"],
            &again.json["total_stock"]
        ),
        (Some(0), &json!(false), &json!(RESTOCK_FROM + ADDED)),
        "{again:?}"
    );
    let (status, body) = stack
        .admin()
        .unwrap()
        .control(
            goods,
            "add-stock",
            Some(&json!({"quantity": 6, "operation_id": operation})),
        )
        .await
        .unwrap();
    assert_eq!(status, 409, "{body}");

    // The gate answered sold-out from its cache for at most its bound: then buyers win again.
    let reopened = wait_for("a win after the stock was added", PATIENCE, || async {
        let n = now_ms();
        let answer = stack
            .buy(goods, &format!("s-after-{n}"), 1, &format!("s-after-r{n}"))
            .await?;
        Ok((answer.outcome == "won").then_some(answer))
    })
    .await
    .unwrap();
    let waited = added_at.elapsed();
    assert!(
        waited < Duration::from_millis(SOLD_OUT_CACHE_MS) + Duration::from_secs(5),
        "the goods sold again only {waited:?} after the stock was added"
    );
    let crowd = Crowd::start(stack, goods, "t");
    crowd
        .wait_until("the goods to sell out again", |a| {
            a.iter().any(|x| x.result.outcome == "sold_out")
        })
        .await;
    let sold_after = order_ids(&crowd.stop().await).len() + 1;
    assert_eq!(
        sold_after as u64, ADDED,
        "exactly the added units sold; the first: {reopened:?}"
    );
    let (total, available, reserved, sold, lapsed) = counters(stack, goods, tier).await;
    assert_eq!(
        (total, available, reserved + sold + lapsed),
        (RESTOCK_FROM + ADDED, 0, RESTOCK_FROM + ADDED),
        "{goods}"
    );
}

/// The books of every goods of the stack: MySQL level with Redis (reconcile clean), and
/// MySQL's own conservation for the db goods.
async fn books(stack: &Stack, goods: &[&str]) {
    reconcile_clean(stack).await;
    for goods in goods {
        let sale = stack.admin().unwrap().sale(goods).await.unwrap();
        let d = &sale["definition"];
        let n = |f: &str| d[f].as_i64().unwrap();
        assert_eq!(
            n("stock") + n("reserved") + n("sold") + n("lapsed"),
            n("total_stock"),
            "MySQL's books of {goods}: {sale}"
        );
    }
}

async fn every_control(label: &str, tier: &str) {
    let stack = Arc::new(start(label).await);
    pause_resume_stop(&stack, "paused", tier).await;
    restock(&stack, "restocked", tier).await;
    books(&stack, &["paused", "restocked"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn controls_of_a_redis_sale() {
    every_control("controls-redis", "redis").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn controls_of_a_dual_write_sale() {
    every_control("controls-dw", "dual_write").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn controls_of_a_sharded_sale() {
    every_control("controls-sharded", "redis_sharded").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn controls_of_a_db_sale() {
    every_control("controls-db", "db").await;
}

/// Redis down: MySQL decides the goods (the fallback). Pause, resume and add stock are MySQL's
/// alone there (the CLI works without Redis), and the re-seed that brings the goods back to
/// Redis once it answers carries them: still paused, with the added units.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn controls_of_a_sale_mysql_decides_while_redis_is_down() {
    let mut stack = start("controls-fallback").await;
    let goods = "fb";
    open(&stack, goods, "redis", STOCK).await;
    let first = stack.buy(goods, "f-u0", 1, "f-r0").await.unwrap();
    assert_eq!(first.outcome, "won", "{first:?}");
    // Redis runs without persistence here: its sale reaches MySQL before Redis goes.
    wait_for("the first sale in MySQL", DRAIN, || async {
        let rows: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM orders WHERE goods_id = ?")
            .bind(goods)
            .fetch_one(&stack.db.pool)
            .await?;
        Ok((rows == 1).then_some(()))
    })
    .await
    .unwrap();

    stack.redis.kill();
    let next = AtomicU64::new(1);
    // A new buyer and request id each time.
    let fresh = || {
        let n = next.fetch_add(1, Ordering::Relaxed);
        (format!("f-u{n}"), format!("f-r{n}"))
    };
    let in_mysql = wait_for("MySQL to decide the goods", PATIENCE, || {
        let (user, request) = fresh();
        let stack = &stack;
        async move {
            // Failed attempts open the breaker, and the goods moves to MySQL.
            stack.buy(goods, &user, 1, &request).await?;
            Ok(stack.admin()?.fallback(goods).await?.then_some(()))
        }
    })
    .await;
    in_mysql.unwrap();

    let run = stack
        .sale_cli(&["pause", goods, "--retry-after-s", "7"], &[])
        .unwrap();
    assert_eq!(run.code, Some(0), "{run:?}");
    assert_eq!(
        (&run.json["state"], &run.json["redis"]),
        (&json!("paused"), &json!("not_needed")),
        "{run:?}"
    );
    assert!(run.stderr.contains("going on with MySQL alone"), "{run:?}");
    let (user, request) = fresh();
    let paused = stack.buy(goods, &user, 1, &request).await.unwrap();
    assert_eq!(
        (
            paused.status,
            paused.outcome.as_str(),
            paused.retry_after.as_deref()
        ),
        (403, "paused", Some("7")),
        "MySQL decides a paused goods as paused: {paused:?}"
    );
    let add = [
        "add-stock",
        goods,
        "--quantity",
        "5",
        "--operation-id",
        "fb-add",
    ];
    let run = stack.sale_cli(&add, &[]).unwrap();
    assert_eq!(run.code, Some(0), "{run:?}");
    assert_eq!(
        (&run.json["added_now"], &run.json["redis"]),
        (&json!(true), &json!("not_needed")),
        "{run:?}"
    );
    let admin = stack.admin().unwrap();
    let (status, resumed) = admin.control(goods, "resume", None).await.unwrap();
    assert_eq!(
        (status, &resumed["state"]),
        (200, &json!("open")),
        "{resumed}"
    );
    let (user, request) = fresh();
    let won = stack.buy(goods, &user, 1, &request).await.unwrap();
    assert_eq!(
        won.outcome, "won",
        "MySQL sells again after the resume: {won:?}"
    );
    let (status, paused) = admin
        .control(goods, "pause", Some(&json!({"retry_after_s": 7})))
        .await
        .unwrap();
    assert_eq!(
        (status, &paused["state"]),
        (200, &json!("paused")),
        "{paused}"
    );

    // Redis comes back empty; the goods is re-seeded from MySQL: paused, with the units.
    stack.redis.restart().await.unwrap();
    wait_for("the goods to be back in Redis", DRAIN, || async {
        Ok((!stack.admin()?.fallback(goods).await?).then_some(()))
    })
    .await
    .unwrap();
    let live = stack.live(goods).await.unwrap();
    assert_eq!(
        (&live["total"], &live["pause_retry_ms"]),
        (&json!(STOCK + 5), &json!(7_000)),
        "the re-seed carried the pause and the added units: {live}"
    );
    // The first call after Redis's restart may meet the syncer's deduct connection still
    // reconnecting: a 503 `unavailable` that says to retry with the same request id, as a
    // buyer would (bounded by DRAIN).
    let (user, request) = fresh();
    let paused = wait_for("Redis to answer for the re-seeded goods", DRAIN, || async {
        let answer = stack.buy(goods, &user, 1, &request).await?;
        Ok((answer.outcome != "unavailable").then_some(answer))
    })
    .await
    .unwrap();
    assert_eq!(
        (paused.status, paused.outcome.as_str()),
        (403, "paused"),
        "Redis decides the re-seeded goods as paused: {paused:?}"
    );
    let run = stack.sale_cli(&["resume", goods], &[]).unwrap();
    assert_eq!(
        (run.code, &run.json["redis"]),
        (Some(0), &json!("applied")),
        "{run:?}"
    );
    let (user, request) = fresh();
    let won = stack.buy(goods, &user, 1, &request).await.unwrap();
    assert_eq!(won.outcome, "won", "Redis sells after the resume: {won:?}");
    let (total, available, reserved, sold, lapsed) = counters(&stack, goods, "redis").await;
    assert_eq!(total, STOCK + 5);
    assert_eq!(available + reserved + sold + lapsed, total, "conserved");
    books(&stack, &[goods]).await;
}
