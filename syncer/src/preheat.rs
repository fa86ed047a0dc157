//! Loads a sale from its MySQL definition into Redis, and reads the live counters back.

use std::time::Duration;

use redis::aio::ConnectionManager;
use redis::AsyncCommands;

use crate::keys::KeySpace;
use crate::sale::{LiveStock, Sale};

const REDIS_ADMIN_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum PreheatError {
    #[error("goods {goods_id} has a live sale in Redis until {ends_at}; use --force (or ?force=true) to replace it")]
    Live { goods_id: String, ends_at: String },
    #[error("redis did not answer within {REDIS_ADMIN_TIMEOUT:?}")]
    Timeout,
    #[error("redis error: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("preheat script replied {0:?}")]
    BadScriptReply(String),
}

/// Loads `sale` into Redis with its full stock. Refuses to replace a sale that has not ended
/// unless `force`. Returns the new epoch (part of every order id of this sale).
pub async fn preheat(
    redis: &ConnectionManager,
    keys: &KeySpace,
    sale: &Sale,
    force: bool,
) -> Result<u64, PreheatError> {
    let goods = keys.goods(&sale.goods_id);
    let script = redis::Script::new(crate::scripts::PREHEAT);
    let mut invocation = crate::scripts::invocation(&script, &goods.preheat_script_keys());
    invocation
        .arg(sale.total_stock)
        .arg(sale.per_user_limit)
        .arg(sale.starts_at.timestamp_millis())
        .arg(sale.ends_at.timestamp_millis())
        .arg(if force { "1" } else { "0" })
        .arg(u64::from(sale.payment_window_s) * 1000);
    let mut conn = redis.clone();
    let (status, value): (String, i64) =
        tokio::time::timeout(REDIS_ADMIN_TIMEOUT, invocation.invoke_async(&mut conn))
            .await
            .map_err(|_| PreheatError::Timeout)??;
    match status.as_str() {
        "loaded" => {
            // The index lives outside the goods' hash tag, so it cannot join the script;
            // SADD is idempotent and a stale member is harmless.
            let _: () = tokio::time::timeout(
                REDIS_ADMIN_TIMEOUT,
                conn.sadd(keys.sales_index(), &sale.goods_id),
            )
            .await
            .map_err(|_| PreheatError::Timeout)??;
            Ok(value.max(0) as u64)
        }
        "live" => Err(PreheatError::Live {
            goods_id: sale.goods_id.clone(),
            ends_at: chrono::DateTime::from_timestamp_millis(value)
                .map(|t| t.to_rfc3339())
                .unwrap_or_else(|| value.to_string()),
        }),
        other => Err(PreheatError::BadScriptReply(other.to_owned())),
    }
}

/// Reads a goods' live counters; `None` when the sale was never preheated.
pub async fn live_stock(
    redis: &ConnectionManager,
    keys: &KeySpace,
    goods_id: &str,
) -> Result<Option<LiveStock>, PreheatError> {
    let mut conn = redis.clone();
    let fields: Vec<Option<i64>> = tokio::time::timeout(
        REDIS_ADMIN_TIMEOUT,
        redis::cmd("HMGET")
            .arg(keys.goods(goods_id).sale)
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
            ])
            .query_async(&mut conn),
    )
    .await
    .map_err(|_| PreheatError::Timeout)??;
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
    }))
}
