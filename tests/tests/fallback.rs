//! Degrade, don't stop (promise 7), end to end: a storm of buyers through real Envoy and the
//! filter while the private redis-server (AOF, `appendfsync always`) is killed (`kill -9`),
//! kept down for 20 s and started again from its AOF, with the syncer serving with
//! `--redis-durability aof --fallback-rate 100` and running the relay and the writer against
//! real Tansu and MariaDB. The sale goes on through MySQL within the rate, no more winners than
//! units across both switches, every winner reaches the shop once and MySQL once, and the goods
//! goes back to Redis (re-seeded) before Redis decides again.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use seckill_e2e::pipeline::epoch_of;
use seckill_e2e::process::wait_for;
use seckill_e2e::redis_server::AOF_ALWAYS;
use seckill_e2e::stack::{now_ms, send, BuyResult, Stack, StackOptions};
use seckill_e2e::syncer::{metric_sample, sum_metric};
use sqlx::Row;

const GOODS: &str = "hot";
/// Enough that the outage's sales (at most the rate times the time in fallback) and the sales
/// before and after it leave units over: Redis must be seen deciding again after the switch.
const STOCK: u64 = 6_000;
/// `--fallback-rate`: attempts per second MySQL decides while Redis is down.
const FALLBACK_RATE: u64 = 100;
/// How long Redis stays down.
const OUTAGE: Duration = Duration::from_secs(20);
/// Buyers in flight at once, each sending attempt after attempt (a new user and request id
/// each: the per-user limit is 1, so every attempt is a distinct buyer).
const BUYERS: usize = 16;
/// Wins before the kill: the storm is under way and Redis decides.
const WON_BEFORE_KILL: u64 = 300;
/// Wins Redis decides after the goods left the fallback, before the storm stops.
const WON_AFTER_SWITCH_BACK: u64 = 100;
const DRAIN: Duration = Duration::from_secs(90);

/// What one buyer was told, and when.
struct Answer {
    user: String,
    /// When the request was sent and when its answer arrived, from the test's start.
    sent: Duration,
    answered: Duration,
    result: Result<BuyResult, String>,
}

impl Answer {
    fn won(&self) -> Option<&str> {
        let r = self.result.as_ref().ok()?;
        (r.status == 200 && r.outcome == "won")
            .then_some(r.order_id.as_deref())
            .flatten()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_down_20_s_mid_storm_the_sale_goes_on_through_mysql() {
    let mut options = StackOptions::new("fallback");
    options.pipeline = true;
    options.redis_args = AOF_ALWAYS.to_vec();
    options.syncer_args = ["--redis-durability", "aof", "--fallback-rate"]
        .into_iter()
        .map(str::to_owned)
        .chain([FALLBACK_RATE.to_string()])
        .collect();
    // A reservation whose answer the kill cut off is never claimed: it stays reserved for
    // the whole test (in Redis and MySQL alike) instead of being released mid-drain.
    options
        .syncer_env
        .push(("SECKILL_CLAIM_WINDOW_MS", "3600000".into()));
    let mut stack = Stack::start(options).await.expect("the stack starts");
    let now = now_ms();
    stack
        .admin()
        .unwrap()
        .define_sale_tier(
            GOODS,
            STOCK,
            1,
            (now - 60_000, now + 3_600_000),
            900,
            Some("redis"),
        )
        .await
        .unwrap();
    stack.preheat(GOODS, false).await.unwrap();
    let first_epoch: u64 = mysql_epoch(&stack).await;

    let start = Instant::now();
    let answers: Arc<Mutex<Vec<Answer>>> = Arc::default();
    let won = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let next = Arc::new(AtomicU64::new(0));
    let mut storm = Vec::new();
    for _ in 0..BUYERS {
        let (http, url) = (stack.http.clone(), stack.envoy.url());
        let (answers, won, stop, next) = (answers.clone(), won.clone(), stop.clone(), next.clone());
        storm.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let n = next.fetch_add(1, Ordering::Relaxed);
                let user = format!("u{n}");
                let request = http
                    .post(format!("{url}/seckill/{GOODS}/buy?qty=1"))
                    .header("x-user-id", &user)
                    .header("x-request-id", format!("r{n}"));
                let sent = start.elapsed();
                let result = send(request).await.map_err(|e| format!("{e:#}"));
                let answer = Answer {
                    user,
                    sent,
                    answered: start.elapsed(),
                    result,
                };
                if answer.won().is_some() {
                    won.fetch_add(1, Ordering::Relaxed);
                }
                answers.lock().unwrap().push(answer);
            }
        }));
    }
    let wins = |at_least: u64| {
        let won = won.clone();
        move || {
            let count = won.load(Ordering::Relaxed);
            async move { Ok((count >= at_least).then_some(())) }
        }
    };
    wait_for(
        "wins before the kill",
        Duration::from_secs(60),
        wins(WON_BEFORE_KILL),
    )
    .await
    .unwrap();

    // Redis dies mid-storm and stays down for OUTAGE while the storm goes on. This wait is
    // the scenario itself (an outage of a given length), not a wait for something to be
    // ready: it is measured with a deadline, and meanwhile the admin API is asked whether
    // the goods is decided in MySQL.
    let killed = start.elapsed();
    stack.redis.kill();
    let fallback_seen = AtomicBool::new(false);
    wait_for("the outage to last", OUTAGE * 2, || {
        let over = start.elapsed() >= killed + OUTAGE;
        let (stack, seen) = (&stack, &fallback_seen);
        async move {
            let shown = async { stack.admin()?.fallback(GOODS).await };
            if shown.await.unwrap_or(false) {
                seen.store(true, Ordering::Relaxed);
            }
            Ok(over.then_some(()))
        }
    })
    .await
    .unwrap();
    let fallback_seen = fallback_seen.into_inner();
    let restarted_at = start.elapsed();
    stack.redis.restart().await.unwrap();

    // Storm on until the goods is decided by Redis again: out of fallback, and the switch
    // back counted.
    let syncer = stack.syncer().unwrap();
    wait_for(
        "the goods to be decided by Redis again",
        Duration::from_secs(60),
        || async {
            let exited = sum_metric(&syncer.metrics().await?, "seckill_fallback_exited_total");
            let fallback = stack.admin()?.fallback(GOODS).await?;
            Ok((exited >= 1 && !fallback).then_some(()))
        },
    )
    .await
    .unwrap();
    let switched_back = start.elapsed();
    let won_at_switch = won.load(Ordering::Relaxed);
    // Checked now too, so a fallback that outran its rate says so before it sold out.
    let metrics = syncer.metrics().await.unwrap();
    assert_within_rate(&metrics, start.elapsed() - killed);
    wait_for(
        "wins after the switch back",
        Duration::from_secs(60),
        wins(won_at_switch + WON_AFTER_SWITCH_BACK),
    )
    .await
    .unwrap();
    stop.store(true, Ordering::Relaxed);
    for buyer in storm {
        buyer.await.unwrap();
    }
    let answers = std::mem::take(&mut *answers.lock().unwrap());
    let metrics = syncer.metrics().await.unwrap();
    let metrics_read = start.elapsed();
    let window = (metrics_read - killed).as_secs_f64();

    // Every request through Envoy got an HTTP answer (Envoy and the syncer never went away).
    let errors: Vec<&String> = answers
        .iter()
        .filter_map(|a| a.result.as_ref().err())
        .collect();
    assert!(
        errors.is_empty(),
        "{} client errors: {:?}",
        errors.len(),
        &errors[..errors.len().min(5)]
    );

    // During the outage the admin API said the goods is decided in MySQL, and MySQL did decide:
    // buyers won while Redis was dead.
    assert!(
        fallback_seen,
        "GET /admin/sales/{GOODS} never showed fallback: true"
    );
    let won_in_outage = answers
        .iter()
        .filter(|a| a.sent >= killed && a.answered <= restarted_at)
        .filter(|a| a.won().is_some())
        .count();
    assert!(won_in_outage > 0, "nobody won while Redis was down");
    assert!(
        sum_metric(&metrics, "seckill_fallback_entered_total") >= 1,
        "{metrics}"
    );
    let fallback_won = metric_sample(
        &metrics,
        r#"seckill_fallback_decisions_total{outcome="won"}"#,
    );
    assert!(fallback_won as usize >= won_in_outage, "{metrics}");

    let decided = assert_within_rate(&metrics, metrics_read - killed);
    // The rest was refused, and said when to come back.
    assert!(
        sum_metric(&metrics, "seckill_fallback_refused_total") > 0,
        "{metrics}"
    );
    let refused: Vec<&BuyResult> = answers
        .iter()
        .filter(|a| a.sent >= killed && a.answered <= restarted_at)
        .filter_map(|a| a.result.as_ref().ok())
        .filter(|r| r.status == 503)
        .collect();
    assert!(!refused.is_empty(), "the storm outran the rate: some 503s");
    let without_hint: Vec<&&BuyResult> = refused
        .iter()
        .filter(|r| r.retry_after.as_deref() != Some("1"))
        .collect();
    assert!(
        without_hint.is_empty(),
        "{} of {} 503s during the outage had no `retry-after: 1`, e.g. {:?}",
        without_hint.len(),
        refused.len(),
        without_hint.first()
    );
    // Every answer is one the gate gives: won, a loser's outcome or a refusal.
    for a in &answers {
        let r = a.result.as_ref().unwrap();
        assert!(
            matches!(
                (r.status, r.outcome.as_str()),
                (200, "won") | (409, "sold_out") | (503, _)
            ),
            "unexpected answer {r:?}"
        );
    }

    // Redis decides again after the switch: the wins since carry the re-seeded epoch.
    let epoch_now = mysql_epoch(&stack).await;
    assert!(
        epoch_now > first_epoch,
        "the goods was re-seeded under a new epoch"
    );
    let late_wins: Vec<&str> = answers
        .iter()
        .filter(|a| a.sent >= switched_back)
        .filter_map(Answer::won)
        .collect();
    assert!(
        late_wins.len() as u64 >= WON_AFTER_SWITCH_BACK / 2,
        "{}",
        late_wins.len()
    );
    assert!(
        late_wins.iter().all(|o| epoch_of(o) == epoch_now),
        "wins after the switch back are Redis's, under the re-seed's epoch {epoch_now}: {:?}",
        late_wins.iter().find(|o| epoch_of(o) != epoch_now)
    );

    // The shop received each winner's order id exactly once, and nothing else; no more
    // winners than units, one per buyer.
    let winners: HashMap<&str, &str> = answers
        .iter()
        .filter_map(|a| Some((a.won()?, a.user.as_str())))
        .collect();
    let won_answers = answers.iter().filter(|a| a.won().is_some()).count();
    assert_eq!(
        winners.len(),
        won_answers,
        "an order id was answered won twice"
    );
    let mut at_shop: HashMap<String, usize> = HashMap::new();
    for order in stack.shop.accepted_order_ids() {
        *at_shop.entry(order).or_default() += 1;
    }
    for order in winners.keys() {
        assert_eq!(at_shop.get(*order), Some(&1), "order {order} at the shop");
    }
    assert_eq!(at_shop.len(), winners.len(), "the shop saw only winners");
    let buyers: HashSet<&str> = winners.values().copied().collect();
    assert_eq!(buyers.len(), winners.len(), "one unit per buyer");
    assert!(
        buyers.len() as u64 <= STOCK,
        "{} winners for {STOCK} units",
        buyers.len()
    );

    // Drained: MySQL's counters equal Redis's and the outbox is empty.
    wait_for("MySQL to catch up with Redis", DRAIN, || async {
        let redis = redis_counters(&stack).await?;
        let mysql = mysql_counters(&stack).await?;
        let outbox: u64 = redis::cmd("XLEN")
            .arg(stack.goods_key(GOODS, "outbox"))
            .query_async(&mut stack.redis().await?)
            .await?;
        Ok((outbox == 0 && redis == mysql).then_some(()))
    })
    .await
    .unwrap();

    // Every won order id has exactly one MySQL row, naming its buyer.
    let rows: Vec<(String, String)> =
        sqlx::query_as("SELECT order_id, user_id FROM orders WHERE goods_id = ?")
            .bind(GOODS)
            .fetch_all(&stack.db.pool)
            .await
            .unwrap();
    let mut by_order: HashMap<&str, Vec<&str>> = HashMap::new();
    for (order, user) in &rows {
        by_order.entry(order).or_default().push(user);
    }
    for (order, user) in &winners {
        assert_eq!(
            by_order.get(order).map(Vec::as_slice),
            Some(&[*user][..]),
            "MySQL's rows for order {order} (won by {user})"
        );
    }
    // MySQL conserves: total = stock + reserved + sold + lapsed, and every winner holds a unit.
    let (stock, reserved, sold, lapsed, total) = mysql_counters(&stack).await.unwrap();
    assert_eq!(total, STOCK as i64);
    assert_eq!(
        stock + reserved + sold + lapsed,
        total,
        "{:?}",
        (stock, reserved, sold, lapsed)
    );
    assert!(
        reserved + sold >= winners.len() as i64,
        "{reserved} + {sold} for {} winners",
        winners.len()
    );

    // The writer commits its offsets right after the database: reconcile is final once it
    // says nothing is in flight.
    let (code, report) = wait_for("reconcile to settle", DRAIN, || async {
        let (code, report) = stack.reconcile(&["--orders"])?;
        Ok((report["settled"] == true).then_some((code, report)))
    })
    .await
    .unwrap();
    assert_eq!(code, 0, "reconcile after the drain: {report}");
    eprintln!(
        "{} attempts, {} won ({won_in_outage} while Redis was down), MySQL decided {decided} in {window:.1} s, {} refused during the outage",
        answers.len(),
        winners.len(),
        refused.len()
    );
}

/// Asserts that MySQL decided at most FALLBACK_RATE attempts a second for `window`, the time
/// from just before the kill until `metrics` were read (an upper bound of the time the goods
/// could be decided in MySQL), plus one second's worth: the limiter starts full, with a burst
/// of one second of its rate (`governor::Quota::per_second`), as any token bucket of that rate
/// may. Returns how many MySQL decided.
fn assert_within_rate(metrics: &str, window: Duration) -> u64 {
    let decided = sum_metric(metrics, "seckill_fallback_decisions_total");
    let window = window.as_secs_f64();
    let bound = FALLBACK_RATE as f64 * (window + 1.0);
    assert!(
        (decided as f64) <= bound,
        "MySQL decided {decided} attempts in {window:.1} s, more than {FALLBACK_RATE}/s allows ({bound:.0})"
    );
    decided
}

/// The epoch MySQL last handed out for the goods.
async fn mysql_epoch(stack: &Stack) -> u64 {
    sqlx::query_scalar("SELECT epoch FROM sales WHERE goods_id = ?")
        .bind(GOODS)
        .fetch_one(&stack.db.pool)
        .await
        .unwrap()
}

/// Redis's (available, reserved, sold, lapsed, total) of the goods.
async fn redis_counters(stack: &Stack) -> anyhow::Result<(i64, i64, i64, i64, i64)> {
    let mut conn = stack.redis().await?;
    Ok(redis::cmd("HMGET")
        .arg(stack.goods_key(GOODS, "sale"))
        .arg(&["available", "reserved", "sold", "lapsed", "total"])
        .query_async(&mut conn)
        .await?)
}

/// MySQL's (stock, reserved, sold, lapsed, total) of the goods.
async fn mysql_counters(stack: &Stack) -> anyhow::Result<(i64, i64, i64, i64, i64)> {
    let row = sqlx::query(
        "SELECT stock, reserved, sold, lapsed, CAST(total_stock AS SIGNED) FROM sales WHERE goods_id = ?",
    )
    .bind(GOODS)
    .fetch_one(&stack.db.pool)
    .await?;
    Ok((
        row.try_get(0)?,
        row.try_get(1)?,
        row.try_get(2)?,
        row.try_get(3)?,
        row.try_get(4)?,
    ))
}
