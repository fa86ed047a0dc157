//! Adding stock to a sale: MySQL's `total_stock` and `stock` first, with a row in
//! `stock_additions` keyed by the operation id, in one transaction; then Redis's `total` and
//! `available` together, marked with the same id in the sale hash. Conservation holds on both
//! sides after each write (total = available + reserved + sold + lapsed), and an operation adds
//! once however often it is sent: MySQL finds its row, Redis its mark (or a load under a later
//! epoch, which read the units from MySQL).
//!
//! A `redis_sharded` goods gets the units split over its shards as its stock was at the
//! preheat ([`crate::shard::split_stock`]): every shard's buyers find units at home, where the
//! goods is hottest, instead of each of them moving units over from one shard.

use chrono::{NaiveDateTime, Utc};
use serde::Serialize;
use sqlx::MySqlPool;

use super::redis_step::{self, RedisStep, Write};
use super::{lock, valid_goods, ControlError, Stores};
use crate::admin::AddStock;
use crate::crashpoint::{crashpoint, CONTROL_AFTER_MYSQL};
use crate::sale::TOTAL_STOCK_MAX;

/// What an add-stock did.
#[derive(Debug, Clone, Serialize)]
pub struct Added {
    pub goods_id: String,
    pub operation_id: String,
    pub quantity: u64,
    /// Whether this call added the units (false: the operation had added them before, and
    /// this call only made sure Redis has them).
    pub added_now: bool,
    /// MySQL's total stock of the sale after the addition.
    pub total_stock: u64,
    /// A sharded goods: the units each shard got, by shard.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub shard_units: Vec<u64>,
    pub redis: RedisStep,
}

/// Adds `request.quantity` units to a sale that has not ended (a repeat of an operation id
/// completes it even after the end). Bad input, an unknown goods, an ended or stopped sale, or
/// an operation id already used for another quantity change nothing.
pub async fn add_stock(
    stores: Stores<'_>,
    goods_id: &str,
    request: &AddStock,
) -> Result<Added, ControlError> {
    valid_goods(goods_id)?;
    let AddStock {
        quantity,
        operation_id,
    } = request;
    let quantity = *quantity;
    request.check().map_err(ControlError::BadRequest)?;
    let mut tx = stores.mysql.begin().await?;
    let locked = lock(&mut tx, goods_id).await?;
    let prior: Option<(u64, u64)> = sqlx::query_as(
        "SELECT quantity, epoch FROM stock_additions
         WHERE goods_id = ? AND operation_id = ? FOR UPDATE",
    )
    .bind(goods_id)
    .bind(operation_id)
    .fetch_optional(&mut *tx)
    .await?;
    let redis_keys = locked.redis_keys(goods_id);
    let (epoch, added_now) = match prior {
        Some((recorded, _)) if recorded != quantity => {
            return Err(ControlError::OperationConflict {
                goods_id: goods_id.to_owned(),
                operation_id: operation_id.clone(),
                recorded,
                asked: quantity,
            })
        }
        Some((_, epoch)) => (epoch, false),
        None => {
            if locked.stopped {
                return Err(ControlError::Stopped(
                    goods_id.to_owned(),
                    "take more stock",
                ));
            }
            if locked.ended(Utc::now()) {
                return Err(ControlError::Ended(goods_id.to_owned(), "add stock to"));
            }
            let total = locked.total_stock.saturating_add(quantity);
            if total > TOTAL_STOCK_MAX {
                return Err(ControlError::BadRequest(format!(
                    "adding {quantity} units would take total_stock to {total}, above \
                     {TOTAL_STOCK_MAX}"
                )));
            }
            sqlx::query(
                "UPDATE sales SET total_stock = total_stock + ?, stock = stock + ?
                 WHERE goods_id = ?",
            )
            .bind(quantity)
            .bind(quantity)
            .bind(goods_id)
            .execute(&mut *tx)
            .await?;
            // Nothing for Redis to take (MySQL decides, or no load yet): done at once.
            let done = redis_keys.is_none().then(|| Utc::now().naive_utc());
            sqlx::query(
                "INSERT INTO stock_additions (goods_id, operation_id, quantity, epoch, redis_done_at)
                 VALUES (?, ?, ?, ?, ?)",
            )
            .bind(goods_id)
            .bind(operation_id)
            .bind(quantity)
            .bind(locked.epoch)
            .bind(done)
            .execute(&mut *tx)
            .await?;
            (locked.epoch, true)
        }
    };
    tx.commit().await?;
    crashpoint(CONTROL_AFTER_MYSQL);
    let total_stock = locked.total_stock + if added_now { quantity } else { 0 };
    let parts = crate::shard::split_stock(quantity, locked.shards);
    let shard_units = if locked.shards > 1 {
        parts.clone()
    } else {
        Vec::new()
    };
    // A repeat writes Redis again too: the marks make that a no-op where it landed before.
    let redis = match redis_keys {
        None => RedisStep::NotNeeded,
        Some(key_ids) => {
            let calls = key_ids
                .into_iter()
                .zip(parts)
                .filter(|(_, units)| *units > 0)
                .map(|(key_id, units)| (key_id, vec![operation_id.clone(), units.to_string()]))
                .collect();
            let write = Write {
                goods_id,
                action: "add",
                epoch,
                calls,
            };
            let step = redis_step::apply(stores, &write).await?;
            mark_done(stores.mysql, goods_id, operation_id).await;
            step
        }
    };
    tracing::info!(
        goods_id,
        operation_id,
        quantity,
        added_now,
        redis = ?redis,
        "stock added"
    );
    Ok(Added {
        goods_id: goods_id.to_owned(),
        operation_id: operation_id.clone(),
        quantity,
        added_now,
        total_stock,
        shard_units,
        redis,
    })
}

/// Records that Redis holds an addition. Only a note for operators (Redis's own marks keep
/// a repeat from adding twice): a failure here is logged and changes no answer.
async fn mark_done(mysql: &MySqlPool, goods_id: &str, operation_id: &str) {
    let marked = sqlx::query(
        "UPDATE stock_additions SET redis_done_at = COALESCE(redis_done_at, ?)
         WHERE goods_id = ? AND operation_id = ?",
    )
    .bind(Utc::now().naive_utc())
    .bind(goods_id)
    .bind(operation_id)
    .execute(mysql)
    .await;
    if let Err(e) = marked {
        tracing::warn!(goods_id, operation_id, error = %e, "could not note that Redis took a stock addition");
    }
}

/// Stock additions MySQL recorded that Redis has not taken yet, by operation id.
pub async fn pending(
    mysql: &MySqlPool,
    goods_id: &str,
) -> sqlx::Result<Vec<(String, u64, NaiveDateTime)>> {
    sqlx::query_as(
        "SELECT operation_id, quantity, created_at FROM stock_additions
         WHERE goods_id = ? AND redis_done_at IS NULL ORDER BY created_at LIMIT 100",
    )
    .bind(goods_id)
    .fetch_all(mysql)
    .await
}
