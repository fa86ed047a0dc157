//! Loads a sale from its MySQL definition into Redis under an epoch MySQL hands out, and reads
//! the live counters back.

use std::time::Duration;

use crate::RedisConn;
use redis::AsyncCommands;
use sqlx::MySqlPool;

use crate::crashpoint::{crashpoint, PREHEAT_AFTER_EPOCH};
use crate::db::{self, HistoryRule};
use crate::keys::KeySpace;
use crate::sale::{LiveStock, Sale, Tier};

const REDIS_ADMIN_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum PreheatError {
    #[error("goods {goods_id} has a live sale in Redis until {ends_at}; use --force (or ?force=true) to replace it")]
    Live { goods_id: String, ends_at: String },
    /// Another preheat of the same goods loaded a newer epoch between this one's epoch and
    /// its load; that newer load stands.
    #[error("goods {goods_id}: another preheat loaded epoch {loaded} while this one held epoch {epoch}; the newer load stands")]
    Superseded {
        goods_id: String,
        epoch: u64,
        loaded: u64,
    },
    /// MySQL refused the epoch: no such sale, or it has history (see [`db::SaleRowError`]).
    #[error(transparent)]
    Mysql(#[from] db::SaleRowError),
    #[error("redis did not answer within {REDIS_ADMIN_TIMEOUT:?}")]
    Timeout,
    #[error("redis error: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("preheat script replied {0:?}")]
    BadScriptReply(String),
}

/// A sale loaded into Redis.
#[derive(Debug, Clone)]
pub struct Preheated {
    /// Part of every order id of this load (`goods.epoch.sequence`).
    pub epoch: u64,
    /// The definition it was loaded from, as MySQL held it under the epoch's lock.
    pub sale: Sale,
}

/// Loads the sale MySQL defines for `goods_id` into Redis with its full stock. Refused when
/// MySQL already has history for the sale (forced or not: MySQL is asked, not Redis, which may
/// have forgotten), and when a sale that has not ended is live in Redis, unless `force`.
///
/// First the epoch: MySQL moves it forward and commits ([`db::take_epoch`]); then Redis is
/// loaded with it, and the script refuses an epoch lower than one it already loaded (two
/// preheats at once: the later epoch stands). A preheat that fails in between leaves a gap in
/// the epochs, never a repeat.
pub async fn preheat(
    redis: &RedisConn,
    mysql: &MySqlPool,
    keys: &KeySpace,
    goods_id: &str,
    force: bool,
) -> Result<Preheated, PreheatError> {
    let goods = keys.goods(goods_id);
    let mut conn = redis.clone();
    let row: Option<(String, Option<u8>)> =
        sqlx::query_as("SELECT tier, shards FROM sales WHERE goods_id = ?")
            .bind(goods_id)
            .fetch_optional(mysql)
            .await
            .map_err(db::SaleRowError::from)?;
    let (tier, shards) = row.unzip();
    if tier.as_deref() == Some(Tier::Db.as_str()) {
        // MySQL alone decides a db goods: its preheat is the epoch its order ids carry.
        let (epoch, sale) = db::take_epoch(mysql, goods_id, 0, HistoryRule::Refuse).await?;
        // An earlier round's sale left in Redis (the goods was redefined as db) would answer
        // for it until every syncer's directory has the new tier: it goes. Best effort: a
        // Redis that is down holds nothing that answers anyone.
        // Two commands, not one pipeline: the sale hash and the sales index are in different
        // slots, which a Redis Cluster refuses to see in one pipeline. The sale first, so
        // the index never names a goods whose sale was left behind.
        let remove = async {
            let () = conn.del(&goods.sale).await?;
            conn.srem(keys.sales_index(), goods_id).await
        };
        let stale: redis::RedisResult<()> = tokio::time::timeout(REDIS_ADMIN_TIMEOUT, remove)
            .await
            .unwrap_or(Ok(()));
        if let Err(e) = stale {
            tracing::warn!(goods_id, error = %e, "could not remove an earlier round from Redis");
        }
        return Ok(Preheated { epoch, sale });
    }
    let shards = match tier.as_deref() {
        Some(t) if t == Tier::RedisSharded.as_str() => {
            u32::from(shards.flatten().unwrap_or(1)).clamp(1, crate::sale::SHARDS_MAX)
        }
        _ => 1,
    };
    if !force {
        // Refused before MySQL moves, so a refusal changes nothing; the script checks again.
        if let Some(live) = live_stock(redis, keys, goods_id).await? {
            if chrono::Utc::now().timestamp_millis() < live.end_ms {
                return Err(live_error(goods_id, live.end_ms));
            }
        }
    }
    // One keyspace, or one per shard (`shard.rs`).
    let key_ids = crate::keys::key_ids(goods_id, shards);
    // The epoch this Redis last loaded, if it remembers one: a database from before durable
    // epochs may be behind it.
    let mut floor = 0;
    for key_id in &key_ids {
        let loaded: Option<u64> = bounded(conn.get(keys.goods(key_id).epoch)).await?;
        floor = floor.max(loaded.unwrap_or(0));
    }
    let (epoch, sale) = db::take_epoch(mysql, goods_id, floor, HistoryRule::Refuse).await?;
    crashpoint(PREHEAT_AFTER_EPOCH);
    // Read after the epoch was taken: a pause recorded later than this read is recorded
    // under this epoch, and waits for this load before it writes Redis (`control/`).
    let pause_retry_ms = crate::control::pause_retry_ms(mysql, goods_id)
        .await
        .map_err(db::SaleRowError::from)?;
    let script = redis::Script::new(crate::scripts::PREHEAT);
    // Each shard takes its part of the stock and of the fleet-wide rate.
    let stock = crate::shard::split_stock(sale.total_stock, shards);
    let rate = sale.fleet_rate.map(|r| r.per_shard(shards));
    let (interval, tolerance) = rate.map_or((0.0, 0.0), |r| r.gcra_ms());
    // Shard by shard: each is its own slot. A preheat that stops half way leaves MySQL's
    // loaded epoch behind, so no shard is trusted until a preheat loads them all.
    for (shard, key_id) in key_ids.iter().enumerate() {
        let goods = keys.goods(key_id);
        let mut invocation = crate::scripts::invocation(&script, &goods.preheat_script_keys());
        invocation
            .arg(stock[shard])
            .arg(sale.per_user_limit)
            .arg(sale.starts_at.timestamp_millis())
            .arg(sale.ends_at.timestamp_millis())
            .arg(if force { "1" } else { "0" })
            .arg(u64::from(sale.payment_window_s) * 1000)
            .arg(epoch)
            .arg(interval.to_string())
            .arg(tolerance.to_string())
            .arg(sale.tier.as_str())
            .arg(pause_retry_ms);
        if shards > 1 {
            invocation.arg(shards).arg(shard);
        }
        let (status, value): (String, i64) = bounded(invocation.invoke_async(&mut conn)).await?;
        match status.as_str() {
            "loaded" => {}
            "live" => return Err(live_error(goods_id, value)),
            "stale" => {
                return Err(PreheatError::Superseded {
                    goods_id: goods_id.to_owned(),
                    epoch,
                    loaded: value.max(0) as u64,
                })
            }
            other => return Err(PreheatError::BadScriptReply(other.to_owned())),
        }
    }
    // Redis holds this epoch now: from here a Redis without it has forgotten (a preheat
    // that dies before this line leaves the older mark, which is only laxer).
    sqlx::query(
        "UPDATE sales SET loaded_epoch = ?, mode = 'redis', holdback = 0
         WHERE goods_id = ? AND epoch = ?",
    )
    .bind(epoch)
    .bind(goods_id)
    .bind(epoch)
    .execute(mysql)
    .await
    .map_err(db::SaleRowError::from)?;
    // The index lives outside the goods' hash tag, so it cannot join the script; SADD is
    // idempotent and a stale member is harmless.
    let _: () = bounded(conn.sadd(keys.sales_index(), &key_ids)).await?;
    Ok(Preheated { epoch, sale })
}

fn live_error(goods_id: &str, end_ms: i64) -> PreheatError {
    PreheatError::Live {
        goods_id: goods_id.to_owned(),
        ends_at: chrono::DateTime::from_timestamp_millis(end_ms)
            .map(|t| t.to_rfc3339())
            .unwrap_or_else(|| end_ms.to_string()),
    }
}

/// One Redis call, bounded by [`REDIS_ADMIN_TIMEOUT`].
async fn bounded<T>(
    call: impl std::future::Future<Output = redis::RedisResult<T>>,
) -> Result<T, PreheatError> {
    Ok(tokio::time::timeout(REDIS_ADMIN_TIMEOUT, call)
        .await
        .map_err(|_| PreheatError::Timeout)??)
}

/// Reads a goods' live counters (a sharded goods': its shards' summed, see
/// [`crate::shard::aggregate`]); `None` when the sale was never preheated.
pub async fn live_stock(
    redis: &RedisConn,
    keys: &KeySpace,
    goods_id: &str,
) -> Result<Option<LiveStock>, PreheatError> {
    if let Some(live) = read_live(redis, &keys.goods(goods_id).sale).await? {
        return Ok(Some(live));
    }
    let shards = live_shards(redis, keys, goods_id).await?;
    Ok(shards.and_then(|shards| crate::shard::aggregate(&shards)))
}

/// The live counters of each shard of a `redis_sharded` goods, with the units each gave up
/// that have not landed yet; `None` when the goods has no shards in Redis. The shard count is
/// read from shard 0 (each shard's sale holds it).
pub async fn live_shards(
    redis: &RedisConn,
    keys: &KeySpace,
    goods_id: &str,
) -> Result<Option<Vec<crate::shard::ShardStock>>, PreheatError> {
    let mut conn = redis.clone();
    let first = keys.goods(&crate::keys::shard_id(goods_id, 0)).sale;
    let count: Option<u32> = bounded(conn.hget(&first, "shards")).await?;
    let Some(count) = count else { return Ok(None) };
    let mut shards = Vec::new();
    for shard in 0..count.min(crate::sale::SHARDS_MAX) {
        let key_id = crate::keys::shard_id(goods_id, shard);
        // A shard that forgot is left out: reconcile shows the drift.
        if let Some(stock) = read_live(redis, &keys.goods(&key_id).sale).await? {
            let in_transit =
                bounded(crate::shard::in_transit(&mut conn, keys, goods_id, shard)).await?;
            shards.push(crate::shard::ShardStock {
                shard,
                stock,
                in_transit,
            });
        }
    }
    Ok(Some(shards))
}

/// The counters of one sale hash.
async fn read_live(redis: &RedisConn, sale: &str) -> Result<Option<LiveStock>, PreheatError> {
    let mut conn = redis.clone();
    let fields: Vec<Option<i64>> = bounded(
        redis::cmd("HMGET")
            .arg(sale)
            .arg(&[
                "total",
                "available",
                "reserved",
                "sold",
                "limit",
                "start_ms",
                "end_ms",
                "epoch",
                "lapsed",
                "window_ms",
                "pause_retry_ms",
            ])
            .query_async(&mut conn),
    )
    .await?;
    let value = |i: usize| fields.get(i).copied().flatten();
    let Some(total) = value(0) else {
        return Ok(None);
    };
    let count = |i: usize| value(i).unwrap_or(0).max(0) as u64;
    Ok(Some(LiveStock {
        total: total.max(0) as u64,
        available: count(1),
        reserved: count(2),
        sold: count(3),
        per_user_limit: count(4) as u32,
        start_ms: value(5).unwrap_or(0),
        end_ms: value(6).unwrap_or(0),
        epoch: count(7),
        lapsed: count(8),
        window_ms: count(9),
        pause_retry_ms: count(10),
    }))
}
