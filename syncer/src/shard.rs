//! The `redis_sharded` tier: one goods' stock split over K shards, each a full keyspace of
//! today's layout (`keys.rs`) under a hash tag of its own (`G~0` .. `G~K-1`), so on a Redis
//! Cluster the shards spread over the masters and one goods is decided by K Redis cores.
//!
//! - A buyer's attempts go to their home shard ([`keys::home_shard`]), which holds their
//!   per-user count and their request ids: the limit and retries stay exact, and the deduct
//!   and lifecycle scripts run per shard unchanged.
//! - Order ids stay `goods.epoch.sequence`; a shard hands out `local * K + shard`, so ids are
//!   distinct over the shards and name the shard that holds the order (lifecycle calls are
//!   routed by it), and events carry the goods id: MySQL, the writer and Kafka see one goods.
//! - When the home shard has too little left for an attempt, units move to it from the other
//!   shards ([`rebalance`]: at most K-1 donors, each a take on the donor and a give on the
//!   home shard, recorded by a transfer id; a move cut short between the two is completed by
//!   the sweeper, [`complete_pending`]). The answer is `sold_out` with nothing left only when
//!   every shard is empty and no units are on their way between shards.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::crashpoint::{crashpoint, SHARD_AFTER_TAKE};
use crate::durability::{self, CallError, Durability};
use crate::keys::{self, KeySpace, Record};
use crate::sale::LiveStock;
use crate::RedisConn;

/// Longest one transfer call may take.
const TRANSFER_TIMEOUT: Duration = Duration::from_millis(1_000);
/// A transfer record older than this is taken as cut short (its taker died between take and
/// give) and completed by the sweeper; a live taker finishes within [`TRANSFER_TIMEOUT`] x 3.
pub const PENDING_AGE: Duration = Duration::from_secs(5);
/// Records the sweeper completes per shard per tick at most.
const PENDING_MAX: u32 = 100;

/// Splits a goods' stock over its shards as evenly as can be: the first `total % shards`
/// get one more.
pub fn split_stock(total: u64, shards: u32) -> Vec<u64> {
    let shards = u64::from(shards.max(1));
    (0..shards)
        .map(|s| total / shards + u64::from(s < total % shards))
        .collect()
}

/// A transfer id: unique over processes and time (process id, start time, a counter), so two
/// syncers never reuse one and a repeated give is always the same move.
fn transfer_id(epoch: u64) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    static START: std::sync::OnceLock<u128> = std::sync::OnceLock::new();
    let start = START.get_or_init(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    });
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{epoch}-{}-{start}-{n}", std::process::id())
}

/// What moving units to a home shard came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rebalanced {
    /// This many units arrived at the home shard.
    Moved(u64),
    /// Every shard together holds this many units, fewer than the attempts want, and nothing
    /// moved between shards while they were read: the goods is sold out for them.
    Exhausted(u64),
    /// Units moved between shards while they were read, or some shard holds enough now: the
    /// attempts are to be decided again.
    Unsettled,
}

/// One shard's reply to a transfer call: `{status, units, figure}`.
type Reply = (String, u64, u64);

/// A shard of one goods, as the transfer script sees it.
struct ShardKeys {
    keys: keys::GoodsKeys,
    mark: String,
}

impl ShardKeys {
    fn new(space: &KeySpace, goods_id: &str, shard: u32) -> ShardKeys {
        let id = keys::shard_id(goods_id, shard);
        ShardKeys {
            keys: space.goods(&id),
            mark: space.durability_mark(&id),
        }
    }
}

/// Moves units between shards; every call under the deducter's durability setting, so a
/// give is sent only once its take is as durable as a sale.
pub struct Mover<'a> {
    pub conn: RedisConn,
    pub keys: &'a KeySpace,
    pub durability: Durability,
    pub script: &'a redis::Script,
}

impl Mover<'_> {
    async fn call<T: redis::FromRedisValue>(
        &self,
        shard: &ShardKeys,
        incoming: bool,
        args: &[String],
    ) -> Result<T, CallError> {
        let keys = if incoming {
            shard.keys.transfer_in_script_keys()
        } else {
            shard.keys.transfer_out_script_keys()
        };
        let mut invocation = crate::scripts::invocation(self.script, &keys);
        for arg in args {
            invocation.arg(arg);
        }
        let mut conn = self.conn.clone();
        let deadline = Instant::now() + TRANSFER_TIMEOUT;
        durability::invoke(
            self.durability,
            &mut conn,
            &invocation,
            &shard.mark,
            deadline,
        )
        .await
    }

    /// Gives `units` of transfer `id` to shard `to` (once, whoever calls), then forgets the
    /// donor's record. A stale receiver (it forgot the sale, or holds another epoch) gets
    /// nothing: the record stays, and the units with it, until the next preheat clears it
    /// (the goods has moved to MySQL by then, which counts those units as its own).
    async fn land(
        &self,
        goods_id: &str,
        from: u32,
        to: u32,
        id: &str,
        units: u64,
        epoch: u64,
    ) -> Result<bool, CallError> {
        let home = ShardKeys::new(self.keys, goods_id, to);
        let args = [
            "give".to_owned(),
            id.to_owned(),
            units.to_string(),
            epoch.to_string(),
        ];
        let (status, _, _): Reply = self.call(&home, true, &args).await?;
        if status == "stale" {
            return Ok(false);
        }
        let donor = ShardKeys::new(self.keys, goods_id, from);
        let _: Reply = self
            .call(&donor, false, &["done".to_owned(), id.to_owned()])
            .await?;
        Ok(true)
    }

    /// Moves at least `wanted` units (when the other shards have them) to shard `home` from
    /// the others in turn, at most `shards - 1` of them. When none has any, reads every shard
    /// twice: the goods is out for attempts of at least `least` units only if both reads find
    /// fewer in all, nothing on its way, and no shard's moves changed between them (so at the
    /// moment between the two reads no unit was anywhere else).
    pub async fn rebalance(
        &self,
        goods_id: &str,
        home: u32,
        shards: u32,
        epoch: u64,
        wanted: u64,
        least: u64,
    ) -> Result<Rebalanced, CallError> {
        let mut moved = 0u64;
        let mut unreachable = false;
        for step in 1..shards {
            let from = (home + step) % shards;
            let donor = ShardKeys::new(self.keys, goods_id, from);
            let id = transfer_id(epoch);
            let args = [
                "take".to_owned(),
                id.clone(),
                home.to_string(),
                (wanted - moved).to_string(),
                epoch.to_string(),
            ];
            // A donor that does not answer (its master down) is passed over: the others may
            // still have units; but then the goods cannot be found sold out this round.
            let (status, units, _): Reply = match self.call(&donor, false, &args).await {
                Ok(reply) => reply,
                Err(e) => {
                    tracing::debug!(goods_id, shard = from, error = %e, "a donor shard did not answer");
                    unreachable = true;
                    continue;
                }
            };
            // `empty`, or `stale`: a donor that forgot, whose stock the goods' fallback settles.
            if status == "taken" && units > 0 {
                crashpoint(SHARD_AFTER_TAKE);
                if self.land(goods_id, from, home, &id, units, epoch).await? {
                    moved += units;
                }
            }
            if moved >= wanted {
                break;
            }
        }
        if moved > 0 {
            return Ok(Rebalanced::Moved(moved));
        }
        if unreachable {
            return Ok(Rebalanced::Unsettled);
        }
        let first = self.peek_all(goods_id, shards).await?;
        let second = self.peek_all(goods_id, shards).await?;
        let still = first.iter().zip(&second).all(|(a, b)| a.1 == b.1);
        let in_transit = second.iter().any(|s| s.2 > 0);
        let left: u64 = second.iter().map(|s| s.0).sum();
        Ok(if still && !in_transit && left < least {
            Rebalanced::Exhausted(left)
        } else {
            Rebalanced::Unsettled
        })
    }

    /// Every shard's (available, moves, transfers out not yet done), all read at once.
    async fn peek_all(
        &self,
        goods_id: &str,
        shards: u32,
    ) -> Result<Vec<(u64, u64, u64)>, CallError> {
        // Reads: no durability wait (`replicas:N` would write its mark for each).
        let peeks = (0..shards).map(|shard| async move {
            let keys = ShardKeys::new(self.keys, goods_id, shard);
            let mut invocation =
                crate::scripts::invocation(self.script, &keys.keys.transfer_out_script_keys());
            invocation.arg("peek");
            let mut conn = self.conn.clone();
            tokio::time::timeout(TRANSFER_TIMEOUT, invocation.invoke_async(&mut conn))
                .await
                .map_err(|_| CallError::Timeout)?
                .map_err(|e| CallError::Redis(e.to_string()))
        });
        futures_util::future::join_all(peeks)
            .await
            .into_iter()
            .collect()
    }

    /// Completes the moves of shard `from` cut short between take and give (older than
    /// [`PENDING_AGE`]); returns how many it completed.
    pub async fn complete_pending(&self, goods_id: &str, from: u32) -> Result<u64, CallError> {
        let donor = ShardKeys::new(self.keys, goods_id, from);
        let age = u64::try_from(PENDING_AGE.as_millis()).unwrap_or(u64::MAX);
        let mut invocation =
            crate::scripts::invocation(self.script, &donor.keys.transfer_out_script_keys());
        invocation.arg("pending").arg(age).arg(PENDING_MAX);
        let mut conn = self.conn.clone();
        let entries: Vec<String> =
            tokio::time::timeout(TRANSFER_TIMEOUT, invocation.invoke_async(&mut conn))
                .await
                .map_err(|_| CallError::Timeout)?
                .map_err(|e| CallError::Redis(e.to_string()))?;
        if entries.is_empty() {
            return Ok(0);
        }
        let epoch: Option<u64> = {
            let mut command = redis::cmd("HGET");
            command.arg(&donor.keys.sale).arg("epoch");
            tokio::time::timeout(TRANSFER_TIMEOUT, command.query_async(&mut conn))
                .await
                .map_err(|_| CallError::Timeout)?
                .map_err(|e| CallError::Redis(e.to_string()))?
        };
        let Some(epoch) = epoch else { return Ok(0) };
        let mut completed = 0;
        for pair in entries.chunks(2) {
            let [id, record] = pair else { continue };
            let Some(record) = Record::parse(record) else {
                tracing::warn!(
                    goods_id,
                    id,
                    record,
                    "unreadable transfer record left alone"
                );
                continue;
            };
            let Ok(to) = record.user_id.parse::<u32>() else {
                tracing::warn!(goods_id, id, "transfer record without a shard left alone");
                continue;
            };
            if self
                .land(goods_id, from, to, id, u64::from(record.quantity), epoch)
                .await?
            {
                completed += 1;
                tracing::warn!(
                    goods_id,
                    id,
                    from,
                    to,
                    units = record.quantity,
                    "a move of units between shards was cut short; completed"
                );
            }
        }
        Ok(completed)
    }
}

/// How long [`another_answers`] waits for each of the other shards.
const PROBE_TIMEOUT: Duration = Duration::from_millis(250);

/// Whether any other shard of the goods answers now (a read of its sale), after a call on
/// `shard` failed. Shards stay apart in failure too: one shard's master down must not move
/// its goods (and, through the breaker that is one for all goods, every goods) to MySQL while
/// the other shards answer; only when none does is Redis failing for the goods.
pub async fn another_answers(
    conn: &RedisConn,
    space: &KeySpace,
    goods_id: &str,
    shard: u32,
    shards: u32,
) -> bool {
    let probes = (0..shards).filter(|&s| s != shard).map(|other| {
        let mut conn = conn.clone();
        let sale = space.goods(&keys::shard_id(goods_id, other)).sale;
        async move {
            let mut command = redis::cmd("HGET");
            command.arg(sale).arg("available");
            let read = command.query_async::<Option<i64>>(&mut conn);
            matches!(tokio::time::timeout(PROBE_TIMEOUT, read).await, Ok(Ok(_)))
        }
    });
    futures_util::future::join_all(probes)
        .await
        .into_iter()
        .any(|answered| answered)
}

/// One shard's live counters and the units it gave up that have not landed yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct ShardStock {
    pub shard: u32,
    #[serde(flatten)]
    pub stock: LiveStock,
    pub in_transit: u64,
}

/// The goods' counters from its shards: each shard's counters summed, the units on their
/// way between shards counted as available (they are, once landed).
pub fn aggregate(shards: &[ShardStock]) -> Option<LiveStock> {
    let first = shards.first()?.stock;
    let mut total = first;
    total.total = 0;
    total.available = 0;
    total.reserved = 0;
    total.sold = 0;
    total.lapsed = 0;
    for shard in shards {
        // The goods counts as paused while any shard is (a pause reaches them one by one).
        total.pause_retry_ms = total.pause_retry_ms.max(shard.stock.pause_retry_ms);
        total.total += shard.stock.total + shard.in_transit;
        total.available += shard.stock.available + shard.in_transit;
        total.reserved += shard.stock.reserved;
        total.sold += shard.stock.sold;
        total.lapsed += shard.stock.lapsed;
    }
    Some(total)
}

/// Units in the transfer records of one shard.
pub async fn in_transit(
    conn: &mut RedisConn,
    space: &KeySpace,
    goods_id: &str,
    shard: u32,
) -> redis::RedisResult<u64> {
    let keys = space.goods(&keys::shard_id(goods_id, shard));
    let records: Vec<String> = redis::cmd("HVALS")
        .arg(&keys.transfers_out)
        .query_async(conn)
        .await?;
    Ok(records
        .iter()
        .filter_map(|r| Record::parse(r))
        .map(|r| u64::from(r.quantity))
        .sum())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stock_splits_evenly_and_adds_up() {
        assert_eq!(split_stock(1_000, 3), vec![334, 333, 333]);
        assert_eq!(split_stock(3, 3), vec![1, 1, 1]);
        assert_eq!(split_stock(17, 16).iter().sum::<u64>(), 17);
        assert_eq!(split_stock(5, 1), vec![5]);
    }

    #[test]
    fn transfer_ids_do_not_repeat() {
        let ids: std::collections::HashSet<String> = (0..1_000).map(|_| transfer_id(3)).collect();
        assert_eq!(ids.len(), 1_000);
        assert!(ids.iter().all(|id| id.starts_with("3-")));
    }

    #[test]
    fn units_in_transit_count_as_available() {
        let stock = |total, available, reserved| LiveStock {
            total,
            available,
            reserved,
            sold: 0,
            per_user_limit: 1,
            start_ms: 0,
            end_ms: 1,
            epoch: 4,
            lapsed: 0,
            window_ms: 1,
            pause_retry_ms: 0,
        };
        let shards = [
            ShardStock {
                shard: 0,
                stock: stock(5, 2, 3),
                in_transit: 2,
            },
            ShardStock {
                shard: 1,
                stock: stock(3, 3, 0),
                in_transit: 0,
            },
        ];
        let all = aggregate(&shards).unwrap();
        assert_eq!((all.total, all.available, all.reserved), (10, 7, 3));
        assert!(all.is_conserved());
        assert_eq!(all.epoch, 4);
        assert_eq!(aggregate(&[]), None);
    }
}
