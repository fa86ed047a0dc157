//! Pause, resume and stop. Each is idempotent: a repeat finds MySQL as it wants it and writes
//! Redis again, which is how a control Redis missed is completed.
//!
//! - pause: nothing is decided until resume; buyers are told `paused` with the Retry-After
//!   the operator gave. Reservations already made live on: confirm, cancel and the sweeper
//!   work as before, and a winner's retry still gets its order.
//! - resume: decisions go on.
//! - stop: the sale ends now (its `ends_at` moves here, in MySQL and in Redis), so every
//!   end-of-sale rule applies from this moment: attempts are told `ended`, and a unit
//!   released after it lapses instead of going back on sale. A stopped sale does not resume.

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::redis_step::{self, RedisStep, Write};
use super::{lock, valid_goods, ControlError, Locked, Stores};
use crate::crashpoint::{crashpoint, CONTROL_AFTER_MYSQL};
use crate::sale::SaleState;

/// What a pause, resume or stop did.
#[derive(Debug, Clone, Serialize)]
pub struct Controlled {
    pub goods_id: String,
    /// Whether MySQL's record changed (false: it held this already; Redis was written again
    /// all the same).
    pub changed: bool,
    /// The sale's state after the control.
    pub state: SaleState,
    /// While paused: the Retry-After buyers are told, seconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pause_retry_s: Option<u32>,
    pub ends_at: DateTime<Utc>,
    pub redis: RedisStep,
}

#[derive(Debug, Clone, Copy)]
enum Flag {
    Pause { retry_after_s: u32 },
    Resume,
    Stop,
}

impl Flag {
    fn action(self) -> &'static str {
        match self {
            Flag::Pause { .. } => "pause",
            Flag::Resume => "resume",
            Flag::Stop => "stop",
        }
    }
}

/// Pauses a sale; buyers are told to come back after `retry_after_s` (1 to
/// [`crate::sale::PAUSE_RETRY_S_MAX`]). Pausing a paused sale sets the new Retry-After.
pub async fn pause(
    stores: Stores<'_>,
    goods_id: &str,
    retry_after_s: u32,
) -> Result<Controlled, ControlError> {
    crate::admin::check_pause_retry_s(retry_after_s).map_err(ControlError::BadRequest)?;
    control(stores, goods_id, Flag::Pause { retry_after_s }).await
}

/// Resumes a paused sale (a sale not paused is left as it is).
pub async fn resume(stores: Stores<'_>, goods_id: &str) -> Result<Controlled, ControlError> {
    control(stores, goods_id, Flag::Resume).await
}

/// Stops a sale: it ends now. A sale that has ended already is left as it is.
pub async fn stop(stores: Stores<'_>, goods_id: &str) -> Result<Controlled, ControlError> {
    control(stores, goods_id, Flag::Stop).await
}

async fn control(
    stores: Stores<'_>,
    goods_id: &str,
    flag: Flag,
) -> Result<Controlled, ControlError> {
    valid_goods(goods_id)?;
    // Millisecond precision, as MySQL's DATETIME(3) and Redis's end_ms keep it.
    let now = DateTime::from_timestamp_millis(Utc::now().timestamp_millis()).unwrap_or_default();
    let mut tx = stores.mysql.begin().await?;
    let mut locked = lock(&mut tx, goods_id).await?;
    let (changed, args) = record(&mut tx, goods_id, &mut locked, flag, now).await?;
    tx.commit().await?;
    crashpoint(CONTROL_AFTER_MYSQL);
    let redis = match locked.redis_keys(goods_id) {
        None => RedisStep::NotNeeded,
        Some(key_ids) => {
            let write = Write {
                goods_id,
                action: flag.action(),
                epoch: locked.epoch,
                calls: key_ids.into_iter().map(|k| (k, args.clone())).collect(),
            };
            redis_step::apply(stores, &write).await?
        }
    };
    tracing::info!(
        goods_id,
        action = flag.action(),
        changed,
        redis = ?redis,
        "sale control applied"
    );
    Ok(Controlled {
        goods_id: goods_id.to_owned(),
        changed,
        state: locked.state(now),
        pause_retry_s: locked.pause_retry_s,
        ends_at: locked.ends_at,
        redis,
    })
}

/// Records the control in MySQL (inside `tx`, which holds the row's lock) and in `locked`;
/// returns whether it changed anything and the script's arguments for it.
async fn record(
    tx: &mut sqlx::Transaction<'_, sqlx::MySql>,
    goods_id: &str,
    locked: &mut Locked,
    flag: Flag,
    now: DateTime<Utc>,
) -> Result<(bool, Vec<String>), ControlError> {
    if locked.stopped && !matches!(flag, Flag::Stop) {
        return Err(ControlError::Stopped(goods_id.to_owned(), flag.action()));
    }
    match flag {
        Flag::Pause { retry_after_s } => {
            if locked.ended(now) {
                return Err(ControlError::Ended(goods_id.to_owned(), "pause"));
            }
            sqlx::query(
                "UPDATE sales SET paused_at = COALESCE(paused_at, ?), pause_retry_s = ?
                 WHERE goods_id = ?",
            )
            .bind(now.naive_utc())
            .bind(retry_after_s)
            .bind(goods_id)
            .execute(&mut **tx)
            .await?;
            let changed = locked.pause_retry_s != Some(retry_after_s);
            locked.pause_retry_s = Some(retry_after_s);
            let retry_ms = super::retry_ms(locked.pause_retry_s);
            Ok((changed, vec![retry_ms.to_string()]))
        }
        Flag::Resume => {
            sqlx::query(
                "UPDATE sales SET paused_at = NULL, pause_retry_s = NULL WHERE goods_id = ?",
            )
            .bind(goods_id)
            .execute(&mut **tx)
            .await?;
            let changed = locked.pause_retry_s.take().is_some();
            Ok((changed, Vec::new()))
        }
        Flag::Stop => {
            let changed = !locked.ended(now);
            if changed {
                // The window closes now; a sale stopped before it opened ends with an empty
                // window, so it answers `ended`, not `not_started`. An ended sale is not
                // paused.
                sqlx::query(
                    "UPDATE sales SET stopped_at = ?, ends_at = ?, starts_at = LEAST(starts_at, ?),
                       paused_at = NULL, pause_retry_s = NULL
                     WHERE goods_id = ?",
                )
                .bind(now.naive_utc())
                .bind(now.naive_utc())
                .bind(now.naive_utc())
                .bind(goods_id)
                .execute(&mut **tx)
                .await?;
                locked.stopped = true;
                locked.ends_at = now;
                locked.starts_at = locked.starts_at.min(now);
                locked.pause_retry_s = None;
            }
            Ok((changed, vec![locked.ends_at.timestamp_millis().to_string()]))
        }
    }
}
