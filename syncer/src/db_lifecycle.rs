//! The end of a reservation MySQL decides (the `db` tier, and goods in fallback): confirm,
//! release, claim and sweep, by lifecycle.lua's rules, as conditional changes of the order row
//! and the sale's counters in one transaction under both rows' locks. Exactly once per order:
//! only a `reserved` row moves.

use chrono::{DateTime, NaiveDateTime, Utc};
use sqlx::mysql::MySqlRow;
use sqlx::{MySql, MySqlPool, QueryBuilder, Row, Transaction};

use crate::lifecycle::{LifecycleError, Settlement};
use crate::order::{OrderState, ReleaseReason};

/// Reservations one sweep releases per goods at most.
pub const SWEEP_BATCH_MAX: i64 = 500;
/// Order ids per claim statement.
const CLAIM_IDS_MAX: usize = 1_000;

/// What a confirm or release asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Confirm,
    Release(ReleaseReason),
}

fn mysql(e: sqlx::Error) -> LifecycleError {
    LifecycleError::Mysql(e.to_string())
}

/// One order with what its sale says about it, read under both rows' locks.
struct Locked {
    order_id: String,
    goods_id: String,
    quantity: i64,
    state: OrderState,
    reason: Option<String>,
    reserved_at: NaiveDateTime,
    window: chrono::Duration,
    ends_at: NaiveDateTime,
    /// Its units are in the sale's counters (its epoch is of the current round).
    counted: bool,
}

const LOCK_ORDER: &str = "SELECT o.order_id, o.goods_id, o.quantity, o.state, o.release_reason,
       o.reserved_at, s.payment_window_s, s.ends_at, s.round_epoch
     FROM orders o JOIN sales s ON s.goods_id = o.goods_id
     WHERE o.order_id = ? FOR UPDATE";

fn locked(row: &MySqlRow) -> sqlx::Result<Option<Locked>> {
    let order_id: String = row.try_get("order_id")?;
    let state: String = row.try_get("state")?;
    let Some(state) = OrderState::parse(&state) else {
        return Ok(None);
    };
    let round_epoch: u64 = row.try_get("round_epoch")?;
    let counted = crate::keys::order_parts(&order_id).is_some_and(|(_, e, _)| e > round_epoch);
    let quantity: u32 = row.try_get("quantity")?;
    let window_s: u32 = row.try_get("payment_window_s")?;
    Ok(Some(Locked {
        goods_id: row.try_get("goods_id")?,
        quantity: i64::from(quantity),
        state,
        reason: row.try_get("release_reason")?,
        reserved_at: row.try_get("reserved_at")?,
        window: chrono::Duration::seconds(i64::from(window_s)),
        ends_at: row.try_get("ends_at")?,
        counted,
        order_id,
    }))
}

/// Confirms or releases one order.
pub async fn settle(
    pool: &MySqlPool,
    order_id: &str,
    action: Action,
) -> Result<Settlement, LifecycleError> {
    let mut tx = pool.begin().await.map_err(mysql)?;
    let row = sqlx::query(LOCK_ORDER)
        .bind(order_id)
        .fetch_optional(&mut *tx)
        .await
        .map_err(mysql)?;
    let order = match row.as_ref().map(locked).transpose().map_err(mysql)? {
        Some(Some(order)) => order,
        _ => return Err(LifecycleError::UnknownOrder(order_id.to_owned())),
    };
    let now = Utc::now().naive_utc();
    if order.state != OrderState::Reserved {
        let reason = order.reason.as_deref().and_then(ReleaseReason::parse);
        return Ok(Settlement {
            order_id: order_id.to_owned(),
            state: order.state,
            reason,
            changed: false,
        });
    }
    let settlement = match action {
        Action::Confirm if now >= order.reserved_at + order.window => {
            // Paid too late: the window is exact, whether or not the sweeper got there first.
            release(&mut tx, &order, ReleaseReason::Expired, now).await?;
            Settlement {
                order_id: order_id.to_owned(),
                state: OrderState::Released,
                reason: Some(ReleaseReason::Expired),
                changed: false,
            }
        }
        Action::Confirm => {
            sqlx::query(
                "UPDATE orders SET state = 'confirmed', claim_by = NULL
                 WHERE order_id = ? AND state = 'reserved'",
            )
            .bind(&order.order_id)
            .execute(&mut *tx)
            .await
            .map_err(mysql)?;
            if order.counted {
                sqlx::query(
                    "UPDATE sales SET reserved = reserved - ?, sold = sold + ?
                     WHERE goods_id = ? AND reserved >= ?",
                )
                .bind(order.quantity)
                .bind(order.quantity)
                .bind(&order.goods_id)
                .bind(order.quantity)
                .execute(&mut *tx)
                .await
                .map_err(mysql)?;
            }
            Settlement {
                order_id: order_id.to_owned(),
                state: OrderState::Confirmed,
                reason: None,
                changed: true,
            }
        }
        Action::Release(reason) => {
            release(&mut tx, &order, reason, now).await?;
            Settlement {
                order_id: order_id.to_owned(),
                state: OrderState::Released,
                reason: Some(reason),
                changed: true,
            }
        }
    };
    tx.commit().await.map_err(mysql)?;
    Ok(settlement)
}

/// Ends a locked reserved order as released: its units go back on sale while the sale is
/// open, lapse once it has closed, and are left alone if they belong to another round.
async fn release(
    tx: &mut Transaction<'_, MySql>,
    order: &Locked,
    reason: ReleaseReason,
    now: NaiveDateTime,
) -> Result<(), LifecycleError> {
    let returned = order.counted && now < order.ends_at;
    sqlx::query(
        "UPDATE orders SET state = 'released', release_reason = ?, stock_returned = ?,
           claim_by = NULL
         WHERE order_id = ? AND state = 'reserved'",
    )
    .bind(reason.as_str())
    .bind(returned)
    .bind(&order.order_id)
    .execute(&mut **tx)
    .await
    .map_err(mysql)?;
    if order.counted {
        let counters = if returned {
            "UPDATE sales SET reserved = reserved - ?, stock = stock + ?
             WHERE goods_id = ? AND reserved >= ?"
        } else {
            "UPDATE sales SET reserved = reserved - ?, lapsed = lapsed + ?
             WHERE goods_id = ? AND reserved >= ?"
        };
        sqlx::query(counters)
            .bind(order.quantity)
            .bind(order.quantity)
            .bind(&order.goods_id)
            .bind(order.quantity)
            .execute(&mut **tx)
            .await
            .map_err(mysql)?;
    }
    Ok(())
}

/// Claims reservations of one goods the gate delivered: (claimed, late).
pub async fn claim(
    pool: &MySqlPool,
    goods_id: &str,
    order_ids: &[&String],
) -> Result<(u64, u64), LifecycleError> {
    let (mut claimed, mut late) = (0, 0);
    for chunk in order_ids.chunks(CLAIM_IDS_MAX) {
        let mut query = QueryBuilder::new(
            "UPDATE orders SET claim_by = NULL WHERE state = 'reserved' AND goods_id = ",
        );
        query.push_bind(goods_id).push(" AND order_id IN (");
        let mut list = query.separated(", ");
        for id in chunk {
            list.push_bind(id.as_str());
        }
        query.push(")");
        query.build().execute(pool).await.map_err(mysql)?;
        // Counted after: a reserved order is claimed (again, harmlessly), anything else late.
        let mut count = QueryBuilder::new(
            "SELECT COUNT(*) FROM orders WHERE state = 'reserved' AND goods_id = ",
        );
        count.push_bind(goods_id).push(" AND order_id IN (");
        let mut list = count.separated(", ");
        for id in chunk {
            list.push_bind(id.as_str());
        }
        count.push(")");
        let reserved: i64 = count
            .build_query_scalar()
            .fetch_one(pool)
            .await
            .map_err(mysql)?;
        let reserved = u64::try_from(reserved).unwrap_or(0);
        claimed += reserved;
        late += chunk.len() as u64 - reserved.min(chunk.len() as u64);
    }
    Ok((claimed, late))
}

/// Releases up to [`SWEEP_BATCH_MAX`] reservations of one goods whose time is up: `unclaimed`
/// when the gate never claimed it within the claim window, else `expired` after the payment
/// window. Returns how many were released.
pub async fn sweep_goods(pool: &MySqlPool, goods_id: &str) -> Result<u64, LifecycleError> {
    let now: DateTime<Utc> = Utc::now();
    let window_s: Option<u32> =
        sqlx::query_scalar("SELECT payment_window_s FROM sales WHERE goods_id = ?")
            .bind(goods_id)
            .fetch_optional(pool)
            .await
            .map_err(mysql)?;
    let Some(window_s) = window_s else {
        return Ok(0);
    };
    let paid_by = (now - chrono::Duration::seconds(i64::from(window_s))).naive_utc();
    let due: Vec<(String, Option<NaiveDateTime>)> = sqlx::query_as(
        "SELECT order_id, claim_by FROM orders
         WHERE goods_id = ? AND state = 'reserved' AND (claim_by <= ? OR reserved_at <= ?)
         LIMIT ?",
    )
    .bind(goods_id)
    .bind(now.naive_utc())
    .bind(paid_by)
    .bind(SWEEP_BATCH_MAX)
    .fetch_all(pool)
    .await
    .map_err(mysql)?;
    let mut released = 0;
    for (order_id, claim_by) in due {
        let reason = match claim_by {
            Some(by) if by <= now.naive_utc() => ReleaseReason::Unclaimed,
            _ => ReleaseReason::Expired,
        };
        // One transaction each: the order may have been settled since it was read, which
        // `settle` answers without a change.
        if settle(pool, &order_id, Action::Release(reason))
            .await?
            .changed
        {
            released += 1;
        }
    }
    Ok(released)
}
