//! When Redis fails or forgets, MySQL decides: the breaker that notices a failing Redis, the
//! watch that notices a Redis handing out an order id again, and the switch of a goods to
//! MySQL (`sales.mode = 'fallback'`). The way back (re-seed, then Redis again) is in
//! `recover.rs`.
//!
//! Units Redis may have sold whose events have not reached MySQL (still in Redis's outbox, or
//! on their way through Kafka) are held back: MySQL sells its stock less those units, counted
//! from the order ids this syncer saw Redis hand out that MySQL does not hold yet.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::RedisConn;
use sqlx::{MySqlPool, Row};

use crate::keys::KeySpace;
use crate::sale::Tier;

/// Consecutive failed Redis deduct calls that open the breaker.
pub const BREAKER_FAILURES: u32 = 3;
/// How long the breaker stays open before a batch tries Redis again.
pub const BREAKER_OPEN: Duration = Duration::from_secs(1);
/// Order sequence numbers remembered per goods (and goods watched at most).
const WATCH_SEQS_MAX: usize = 16_384;
const WATCH_GOODS_MAX: usize = 10_000;
const FENCE_TIMEOUT: Duration = Duration::from_millis(500);

/// Why a goods moved to MySQL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Why {
    /// Redis did not answer (the breaker is open).
    RedisDown,
    /// Redis no longer has the sale, or has an earlier epoch than MySQL loaded into it.
    Forgot,
    /// Redis handed out an order id it had handed out before (its sequence went back).
    Reissued,
}

impl Why {
    pub const ALL: [Why; 3] = [Why::RedisDown, Why::Forgot, Why::Reissued];

    pub fn as_str(self) -> &'static str {
        match self {
            Why::RedisDown => "redis_down",
            Why::Forgot => "forgot",
            Why::Reissued => "reissued",
        }
    }
}

/// Opens after [`BREAKER_FAILURES`] consecutive failures, for [`BREAKER_OPEN`]; then the next
/// call tries Redis, and one success closes it.
#[derive(Default)]
pub struct Breaker {
    failures: AtomicU32,
    open_until: Mutex<Option<Instant>>,
}

impl Breaker {
    /// Whether Redis should be skipped now.
    pub fn is_open(&self) -> bool {
        let until = self.open_until.lock().unwrap_or_else(|e| e.into_inner());
        until.is_some_and(|t| Instant::now() < t)
    }

    /// Whether the breaker has opened since the last success (open or trying again).
    pub fn tripped(&self) -> bool {
        self.failures.load(Ordering::Relaxed) >= BREAKER_FAILURES
    }

    /// Returns true when this success closed a tripped breaker.
    pub fn success(&self) -> bool {
        let was = self.failures.swap(0, Ordering::Relaxed) >= BREAKER_FAILURES;
        if was {
            *self.open_until.lock().unwrap_or_else(|e| e.into_inner()) = None;
            metrics::gauge!("seckill_breaker_open").set(0.0);
            tracing::info!("redis answers again: breaker closed");
        }
        was
    }

    pub fn failure(&self) {
        let failures = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
        if failures >= BREAKER_FAILURES {
            *self.open_until.lock().unwrap_or_else(|e| e.into_inner()) =
                Some(Instant::now() + BREAKER_OPEN);
            metrics::gauge!("seckill_breaker_open").set(1.0);
            if failures == BREAKER_FAILURES {
                tracing::warn!("redis failed {failures} calls in a row: breaker open");
            }
        }
    }
}

/// The order ids of one epoch this syncer saw Redis hand out: sequence -> units; and the
/// units of calls whose answer never came (a timeout, a broken connection): Redis may have
/// decided them.
#[derive(Debug, Default)]
struct Seen {
    epoch: u64,
    seqs: BTreeMap<u64, u64>,
    /// request id -> units: a buyer retrying through timeouts counts once.
    uncertain: HashMap<String, u64>,
    /// The highest sequence of `epoch` MySQL held when this process first met the epoch: a
    /// syncer started in front of a Redis that went back catches the repeat too.
    floor: u64,
}

/// What the watch makes of a batch's new order ids.
#[derive(Debug, PartialEq, Eq)]
pub enum Watched {
    Fresh,
    /// An id handed out before, or from an epoch behind the watch's: Redis went back.
    Reissued,
}

/// New order ids per goods, to catch a Redis whose sequence went back (an AOF tail lost, a
/// failover to a replica behind) before any buyer is told `won` with an id handed out before,
/// and to count the units the fallback holds back.
#[derive(Clone, Default)]
pub struct SeqWatch {
    goods: Arc<Mutex<HashMap<String, Seen>>>,
}

impl SeqWatch {
    /// Whether this process has met `epoch` of the goods (else its MySQL floor is wanted).
    pub fn knows(&self, goods_id: &str, epoch: u64) -> bool {
        let goods = self.goods.lock().unwrap_or_else(|e| e.into_inner());
        goods.get(goods_id).is_some_and(|s| s.epoch >= epoch)
    }

    /// Starts watching `epoch` of a goods, with the highest sequence MySQL holds of it.
    pub fn set_floor(&self, goods_id: &str, epoch: u64, floor: u64) {
        let mut goods = self.goods.lock().unwrap_or_else(|e| e.into_inner());
        if !goods.contains_key(goods_id) && goods.len() >= WATCH_GOODS_MAX {
            goods.clear();
        }
        let seen = goods.entry(goods_id.to_owned()).or_default();
        if epoch > seen.epoch {
            seen.epoch = epoch;
            seen.seqs.clear();
            seen.floor = floor;
        }
    }

    /// Records new orders `(epoch, seq, units)` of one goods; returns `Reissued` (and records
    /// nothing) if any was handed out before. Batches answered out of order are fine: only a
    /// repeat, an epoch behind, or a sequence below everything remembered counts.
    pub fn observe(&self, goods_id: &str, orders: &[(u64, u64, u64)]) -> Watched {
        let mut goods = self.goods.lock().unwrap_or_else(|e| e.into_inner());
        if !goods.contains_key(goods_id) && goods.len() >= WATCH_GOODS_MAX {
            // Bounded: forget the whole map rather than grow; a restart forgets too.
            goods.clear();
        }
        let seen = goods.entry(goods_id.to_owned()).or_default();
        for &(epoch, seq, _) in orders {
            if epoch < seen.epoch {
                return Watched::Reissued;
            }
            if epoch == seen.epoch {
                let full = seen.seqs.len() >= WATCH_SEQS_MAX;
                let below = seen.seqs.keys().next().is_some_and(|&min| seq < min);
                if seq <= seen.floor || seen.seqs.contains_key(&seq) || (full && below) {
                    return Watched::Reissued;
                }
            }
        }
        for &(epoch, seq, units) in orders {
            if epoch > seen.epoch {
                seen.epoch = epoch;
                seen.seqs.clear();
                seen.floor = 0;
            }
            seen.seqs.insert(seq, units);
            if seen.seqs.len() > WATCH_SEQS_MAX {
                seen.seqs.pop_first();
            }
        }
        Watched::Fresh
    }

    /// Records the attempts (request id, units) of a call whose answer never came: Redis may
    /// have sold them. Bounded: past [`WATCH_SEQS_MAX`] requests, further ones are not
    /// recorded (the breaker has long opened by then).
    pub fn uncertain<'a>(&self, goods_id: &str, attempts: impl Iterator<Item = (&'a str, u64)>) {
        let mut goods = self.goods.lock().unwrap_or_else(|e| e.into_inner());
        if !goods.contains_key(goods_id) && goods.len() >= WATCH_GOODS_MAX {
            goods.clear();
        }
        let seen = goods.entry(goods_id.to_owned()).or_default();
        for (request_id, units) in attempts {
            if seen.uncertain.len() < WATCH_SEQS_MAX {
                seen.uncertain.insert(request_id.to_owned(), units);
            }
        }
    }

    /// Units of `epoch` seen with a sequence above `mysql_max_seq` (MySQL has not seen them),
    /// and how many such orders.
    pub fn unseen(&self, goods_id: &str, epoch: u64, mysql_max_seq: u64) -> (u64, u64) {
        let goods = self.goods.lock().unwrap_or_else(|e| e.into_inner());
        match goods.get(goods_id) {
            Some(seen) if seen.epoch == epoch => seen
                .seqs
                .range(mysql_max_seq + 1..)
                .fold((0, 0), |(units, orders), (_, u)| (units + u, orders + 1)),
            _ => (0, 0),
        }
    }

    /// What the fallback holds back: units seen and not in MySQL, plus units of calls whose
    /// answer never came.
    pub fn holdback(&self, goods_id: &str, epoch: u64, mysql_max_seq: u64) -> u64 {
        let (units, _) = self.unseen(goods_id, epoch, mysql_max_seq);
        let goods = self.goods.lock().unwrap_or_else(|e| e.into_inner());
        let uncertain: u64 = goods
            .get(goods_id)
            .map_or(0, |s| s.uncertain.values().sum());
        units.saturating_add(uncertain)
    }

    /// Forgets a goods (it was re-seeded under a new epoch).
    pub fn forget(&self, goods_id: &str) {
        self.goods
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(goods_id);
    }
}

/// The highest sequence MySQL holds among the goods' orders of `epoch`.
pub async fn mysql_max_seq(
    executor: impl sqlx::MySqlExecutor<'_>,
    goods_id: &str,
    epoch: u64,
) -> sqlx::Result<u64> {
    mysql_max_seq_in(executor, goods_id, epoch, None).await
}

/// [`mysql_max_seq`] among the orders of one shard `(shard, shards)` of a `redis_sharded`
/// goods (its sequences are those `= shard (mod shards)`), or of the whole goods.
pub async fn mysql_max_seq_in(
    executor: impl sqlx::MySqlExecutor<'_>,
    goods_id: &str,
    epoch: u64,
    shard: Option<(u32, u32)>,
) -> sqlx::Result<u64> {
    // The primary-key range of the epoch's order ids ("!" escapes LIKE's wildcards).
    let prefix = format!("{goods_id}.{epoch}.")
        .replace('!', "!!")
        .replace('_', "!_")
        .replace('%', "!%");
    let (index, shards) = shard.unwrap_or((0, 1));
    let max: Option<u64> = sqlx::query_scalar(
        "SELECT MAX(CAST(SUBSTRING_INDEX(order_id, '.', -1) AS UNSIGNED)) FROM orders
         WHERE order_id LIKE ? ESCAPE '!'
           AND MOD(CAST(SUBSTRING_INDEX(order_id, '.', -1) AS UNSIGNED), ?) = ?",
    )
    .bind(format!("{prefix}%"))
    .bind(shards.max(1))
    .bind(index)
    .fetch_one(executor)
    .await?;
    Ok(max.unwrap_or(0))
}

/// Moves a goods to MySQL: in one transaction under the sale row's lock, takes a new epoch
/// (MySQL's own order ids), holds back the units this syncer saw Redis sell that MySQL does
/// not have yet, and sets `mode = 'fallback'`. Returns false when there is nothing to move (a
/// db goods, one already in fallback or switching, one never loaded into Redis).
///
/// A `redis_sharded` goods' shards are all fenced in `redis` (when given) once it moved: its
/// healthy shards must not sell beside MySQL, which counts their units as its own.
pub async fn enter(
    mysql: &MySqlPool,
    watch: &SeqWatch,
    goods_id: &str,
    why: Why,
    redis: Option<(&RedisConn, &KeySpace)>,
) -> sqlx::Result<bool> {
    let mut tx = mysql.begin().await?;
    let row = sqlx::query(
        "SELECT tier, mode, loaded_epoch, per_user_limit, stock, shards FROM sales
         WHERE goods_id = ? FOR UPDATE",
    )
    .bind(goods_id)
    .fetch_optional(&mut *tx)
    .await?;
    let Some(row) = row else { return Ok(false) };
    let tier: String = row.try_get("tier")?;
    let mode: String = row.try_get("mode")?;
    let loaded_epoch: u64 = row.try_get("loaded_epoch")?;
    if Tier::parse(&tier) == Some(Tier::Db) || mode != "redis" || loaded_epoch == 0 {
        return Ok(false);
    }
    // A sharded goods is watched per shard (`deduct.rs`): each shard's unseen units count.
    let shards = u32::from(row.try_get::<Option<u8>, _>("shards")?.unwrap_or(1)).max(1);
    let mut watched = vec![(goods_id.to_owned(), None)];
    if shards > 1 {
        watched
            .extend((0..shards).map(|s| (crate::keys::shard_id(goods_id, s), Some((s, shards)))));
    }
    let (mut orders, mut units) = (0, 0u64);
    for (key_id, shard) in watched {
        let max_seq = mysql_max_seq_in(&mut *tx, goods_id, loaded_epoch, shard).await?;
        orders += watch.unseen(&key_id, loaded_epoch, max_seq).1;
        units = units.saturating_add(watch.holdback(&key_id, loaded_epoch, max_seq));
    }
    sqlx::query(
        "UPDATE sales SET mode = 'fallback', epoch = epoch + 1, db_seq = 0,
           holdback = LEAST(GREATEST(stock, 0), ?)
         WHERE goods_id = ?",
    )
    .bind(units)
    .bind(goods_id)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    if let (true, Some((conn, keys))) = (shards > 1, redis) {
        for shard in 0..shards {
            fence(conn, keys, &crate::keys::shard_id(goods_id, shard)).await;
        }
    }
    metrics::counter!("seckill_fallback_entered_total", "why" => why.as_str()).increment(1);
    if why != Why::RedisDown {
        metrics::counter!("seckill_redis_forgot_total", "why" => why.as_str()).increment(1);
    }
    tracing::warn!(
        goods_id,
        why = why.as_str(),
        held_back_units = units,
        unseen_orders = orders,
        "goods moved to MySQL: Redis is not trusted for it until it is re-seeded"
    );
    Ok(true)
}

/// Tells every syncer at once to stop selling a goods from this Redis (the deduct script
/// refuses a fenced sale): for a Redis that answers but went back. Best effort: the epoch
/// check covers a fence that did not land.
pub async fn fence(redis: &RedisConn, keys: &KeySpace, goods_id: &str) {
    let mut conn = redis.clone();
    let sale = keys.goods(goods_id).sale;
    let mut hset = redis::cmd("HSET");
    hset.arg(&sale).arg("fenced").arg(1);
    let call = hset.query_async::<i64>(&mut conn);
    match tokio::time::timeout(FENCE_TIMEOUT, call).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => tracing::warn!(goods_id, error = %e, "could not fence the goods in Redis"),
        Err(_) => tracing::warn!(goods_id, "could not fence the goods in Redis: timeout"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_repeated_or_older_order_id_is_caught() {
        let watch = SeqWatch::default();
        assert_eq!(watch.observe("g", &[(1, 1, 1), (1, 2, 1)]), Watched::Fresh);
        // A batch answered out of order is not a repeat.
        assert_eq!(watch.observe("g", &[(1, 5, 1), (1, 6, 2)]), Watched::Fresh);
        assert_eq!(watch.observe("g", &[(1, 3, 1), (1, 4, 1)]), Watched::Fresh);
        assert_eq!(
            watch.observe("g", &[(1, 7, 1), (1, 2, 1)]),
            Watched::Reissued
        );
        // Nothing of a refused batch is recorded.
        assert_eq!(watch.observe("g", &[(1, 7, 1)]), Watched::Fresh);
        // A new epoch starts afresh; an older one is a Redis gone back.
        assert_eq!(watch.observe("g", &[(2, 1, 1)]), Watched::Fresh);
        assert_eq!(watch.observe("g", &[(1, 8, 1)]), Watched::Reissued);
        assert_eq!(watch.observe("other", &[(1, 1, 1)]), Watched::Fresh);
        // A process that meets an epoch MySQL already sold from starts above MySQL's highest.
        assert!(!watch.knows("new", 4));
        watch.set_floor("new", 4, 180);
        assert!(watch.knows("new", 4));
        assert_eq!(watch.observe("new", &[(4, 103, 1)]), Watched::Reissued);
        assert_eq!(watch.observe("new", &[(4, 181, 1)]), Watched::Fresh);
    }

    #[test]
    fn unseen_units_are_those_above_mysqls_highest_sequence() {
        let watch = SeqWatch::default();
        watch.observe("g", &[(3, 1, 1), (3, 2, 2), (3, 3, 1), (3, 4, 3)]);
        assert_eq!(watch.unseen("g", 3, 2), (4, 2));
        assert_eq!(watch.unseen("g", 3, 4), (0, 0));
        assert_eq!(watch.unseen("g", 2, 0), (0, 0));
        // A call that never answered may have sold its units: they are held back too.
        // A retry of the same request counts once.
        watch.uncertain("g", [("r1", 2), ("r2", 3), ("r1", 2)].into_iter());
        assert_eq!(watch.holdback("g", 3, 2), 9);
        watch.forget("g");
        assert_eq!(watch.unseen("g", 3, 0), (0, 0));
        assert_eq!(watch.holdback("g", 3, 0), 0);
    }

    #[test]
    fn the_breaker_opens_after_consecutive_failures_and_closes_on_success() {
        let breaker = Breaker::default();
        breaker.failure();
        breaker.failure();
        assert!(!breaker.is_open());
        breaker.success();
        breaker.failure();
        breaker.failure();
        assert!(!breaker.tripped());
        breaker.failure();
        assert!(breaker.is_open() && breaker.tripped());
        assert!(breaker.success());
        assert!(!breaker.is_open() && !breaker.tripped());
    }
}
