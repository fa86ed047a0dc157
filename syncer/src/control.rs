//! An operator's controls of a sale: define it, list sales, pause, resume and stop a live sale,
//! and add stock to it. The admin API (`http.rs`) and the `sale` subcommand of the binary call
//! the same functions here.
//!
//! MySQL is the record. Each control is written there first, in one transaction under the
//! sale row's lock, then into Redis: the sale hash of the goods, or of each shard of a
//! `redis_sharded` goods (`lua/control.lua`), the one hash the deduct script reads in its
//! atomic call, so an attempt is decided either wholly before a control or after it. A control
//! answers only once every deciding store holds it: after a pause answers, nothing is sold.
//!
//! - MySQL decides a `db` goods, and a goods in fallback, under the same row lock: there the
//!   MySQL write is the whole control. So it is for a sale never preheated (its first load
//!   reads MySQL).
//! - Every load of Redis (preheat, re-seed) reads the pause and the stock from MySQL, so a
//!   Redis that forgot comes back with the controls. A load that read MySQL before a control
//!   was recorded is waited for ([`redis_step`]): the control is recorded under the goods'
//!   epoch, and a load under that same epoch is the only one that can lack it.
//! - If Redis fails after MySQL took a control, the control answers 503 and nothing is lost:
//!   the same command again completes it (pause, resume and stop are idempotent; an
//!   add-stock is keyed by its operation id, so a retry never adds twice), and meanwhile
//!   reconcile shows MySQL's units that Redis lacks as drift.

mod add_stock;
mod define;
mod flags;
mod redis_step;
mod view;

pub use crate::admin::{AddStock, OPERATION_ID_LEN_MAX};
pub use add_stock::{add_stock, pending as pending_additions, Added};
pub use define::define;
pub use flags::{pause, resume, stop, Controlled};
pub use redis_step::RedisStep;
pub use view::{list, status, Listed, SaleList};

use chrono::{DateTime, NaiveDateTime, Utc};
use sqlx::{MySql, MySqlPool, Row, Transaction};

use crate::keys::KeySpace;
use crate::sale::{SaleState, Standing, Tier};
use crate::RedisConn;

/// The stores a control works on. Redis may be out of reach (the CLI started during an
/// outage): a goods MySQL decides (db tier, fallback) is controlled all the same, and one
/// Redis decides is recorded in MySQL and answered incomplete (the same command completes it
/// once Redis answers).
#[derive(Clone, Copy)]
pub struct Stores<'a> {
    pub redis: Option<&'a RedisConn>,
    pub mysql: &'a MySqlPool,
    pub keys: &'a KeySpace,
}

/// Why Redis is not there, for the messages that need it.
const NO_REDIS: &str = "Redis could not be reached when the command started";

impl Stores<'_> {
    /// Redis's live counters of a goods (None: it holds no sale of it), or why they could not
    /// be read.
    async fn live(&self, goods_id: &str) -> Result<Option<crate::sale::LiveStock>, String> {
        let redis = self.redis.ok_or_else(|| NO_REDIS.to_owned())?;
        crate::preheat::live_stock(redis, self.keys, goods_id)
            .await
            .map_err(|e| e.to_string())
    }
}

/// Why a control was refused or did not complete. Refusals change nothing.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("{0}")]
    BadRequest(String),
    #[error("no sale is defined for goods {0}")]
    NoSale(String),
    #[error("goods {0}: its sale has ended; there is nothing to {1}")]
    Ended(String, &'static str),
    #[error(
        "goods {0}: its sale was stopped; a stopped sale does not {1} (define a new round instead)"
    )]
    Stopped(String, &'static str),
    #[error(
        "goods {goods_id} has a live sale; it cannot be redefined until it ends (stop it first)"
    )]
    Live { goods_id: String },
    #[error(
        "operation {operation_id} already added {recorded} units to goods {goods_id}; the same \
         operation id cannot add {asked}"
    )]
    OperationConflict {
        goods_id: String,
        operation_id: String,
        recorded: u64,
        asked: u64,
    },
    /// MySQL holds the control; Redis does not yet. Nothing is lost: the same command again
    /// completes it.
    #[error(
        "goods {goods_id}: MySQL recorded the {action}, Redis did not take it ({why}); run the \
         same command again to complete it"
    )]
    Incomplete {
        goods_id: String,
        action: &'static str,
        why: String,
    },
    #[error(transparent)]
    SaleRow(#[from] crate::db::SaleRowError),
    /// Redis could not be read where a definition needs it (is the goods live there?).
    #[error("redis: {0}")]
    Redis(String),
    #[error("mysql: {0}")]
    Mysql(#[from] sqlx::Error),
}

/// Checks a goods id given to a control.
fn valid_goods(goods_id: &str) -> Result<(), ControlError> {
    seckill_api::validate_id(goods_id, seckill_api::ID_LEN_MAX)
        .map_err(|e| ControlError::BadRequest(format!("goods_id {e}")))
}

/// The sale row as a control needs it, read under its lock.
struct Locked {
    tier: Tier,
    mode: String,
    /// The last epoch handed out for the goods: a control is recorded under it.
    epoch: u64,
    shards: u32,
    starts_at: DateTime<Utc>,
    ends_at: DateTime<Utc>,
    total_stock: u64,
    pause_retry_s: Option<u32>,
    stopped: bool,
}

impl Locked {
    fn ended(&self, now: DateTime<Utc>) -> bool {
        self.stopped || now >= self.ends_at
    }

    fn state(&self, now: DateTime<Utc>) -> SaleState {
        let standing = Standing {
            starts_at: self.starts_at,
            ends_at: self.ends_at,
            preheated: self.epoch > 0,
            paused: self.pause_retry_s.is_some(),
            stopped: self.stopped,
        };
        standing.state(now)
    }

    /// Where the control must be written besides MySQL: None when MySQL decides the goods
    /// (`db` tier, fallback) or it was never preheated; else the sale hashes that decide it.
    fn redis_keys(&self, goods_id: &str) -> Option<Vec<String>> {
        if self.tier == Tier::Db || self.epoch == 0 || self.mode == "fallback" {
            return None;
        }
        Some(if self.shards > 1 {
            (0..self.shards)
                .map(|shard| crate::keys::shard_id(goods_id, shard))
                .collect()
        } else {
            vec![goods_id.to_owned()]
        })
    }
}

/// Locks the sale row until `tx` ends.
async fn lock(tx: &mut Transaction<'_, MySql>, goods_id: &str) -> Result<Locked, ControlError> {
    let utc = |t: NaiveDateTime| DateTime::<Utc>::from_naive_utc_and_offset(t, Utc);
    let row = sqlx::query(
        "SELECT tier, mode, epoch, shards, starts_at, ends_at, total_stock, pause_retry_s,
           stopped_at
         FROM sales WHERE goods_id = ? FOR UPDATE",
    )
    .bind(goods_id)
    .fetch_optional(&mut **tx)
    .await?
    .ok_or_else(|| ControlError::NoSale(goods_id.to_owned()))?;
    let tier: String = row.try_get("tier")?;
    Ok(Locked {
        tier: Tier::parse(&tier).unwrap_or_default(),
        mode: row.try_get("mode")?,
        epoch: row.try_get("epoch")?,
        shards: u32::from(row.try_get::<Option<u8>, _>("shards")?.unwrap_or(1)).max(1),
        starts_at: utc(row.try_get("starts_at")?),
        ends_at: utc(row.try_get("ends_at")?),
        total_stock: row.try_get("total_stock")?,
        pause_retry_s: row.try_get("pause_retry_s")?,
        stopped: row
            .try_get::<Option<NaiveDateTime>, _>("stopped_at")?
            .is_some(),
    })
}

/// A pause's Retry-After in ms as the scripts keep it (0: not paused).
pub fn retry_ms(pause_retry_s: Option<u32>) -> u64 {
    pause_retry_s.map_or(0, |s| u64::from(s) * 1000)
}

/// The pause MySQL holds for a goods, in ms (0: not paused, or no such sale): what a load of
/// Redis writes into the sale hash.
pub async fn pause_retry_ms(mysql: &MySqlPool, goods_id: &str) -> sqlx::Result<u64> {
    let row: Option<Option<u32>> =
        sqlx::query_scalar("SELECT pause_retry_s FROM sales WHERE goods_id = ?")
            .bind(goods_id)
            .fetch_optional(mysql)
            .await?;
    Ok(retry_ms(row.flatten()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn locked(tier: Tier, mode: &str, epoch: u64, shards: u32) -> Locked {
        let at = |t: &str| t.parse::<DateTime<Utc>>().unwrap();
        Locked {
            tier,
            mode: mode.to_owned(),
            epoch,
            shards,
            starts_at: at("2026-01-01T00:00:00Z"),
            ends_at: at("2026-01-01T01:00:00Z"),
            total_stock: 10,
            pause_retry_s: None,
            stopped: false,
        }
    }

    #[test]
    fn a_control_goes_to_every_sale_hash_that_decides_and_nowhere_else() {
        assert_eq!(
            locked(Tier::Redis, "redis", 3, 1).redis_keys("g"),
            Some(vec!["g".to_owned()])
        );
        assert_eq!(
            locked(Tier::DualWrite, "switching", 3, 1).redis_keys("g"),
            Some(vec!["g".to_owned()])
        );
        assert_eq!(
            locked(Tier::RedisSharded, "redis", 3, 3).redis_keys("g"),
            Some(vec!["g~0".to_owned(), "g~1".to_owned(), "g~2".to_owned()])
        );
        // MySQL decides, or no load happened yet: MySQL's record is the whole control.
        assert_eq!(locked(Tier::Db, "redis", 3, 1).redis_keys("g"), None);
        assert_eq!(locked(Tier::Redis, "fallback", 3, 1).redis_keys("g"), None);
        assert_eq!(
            locked(Tier::RedisSharded, "fallback", 3, 3).redis_keys("g"),
            None
        );
        assert_eq!(locked(Tier::Redis, "redis", 0, 1).redis_keys("g"), None);
    }

    #[test]
    fn a_stopped_or_closed_sale_has_ended() {
        let mut sale = locked(Tier::Redis, "redis", 3, 1);
        let during = "2026-01-01T00:30:00Z".parse().unwrap();
        assert!(!sale.ended(during));
        assert_eq!(sale.state(during), SaleState::Open);
        sale.pause_retry_s = Some(5);
        assert_eq!(sale.state(during), SaleState::Paused);
        sale.stopped = true;
        assert!(sale.ended(during));
        assert_eq!(sale.state(during), SaleState::Stopped);
        let after = "2026-01-01T01:00:00Z".parse().unwrap();
        assert!(locked(Tier::Redis, "redis", 3, 1).ended(after));
        assert_eq!(retry_ms(Some(7)), 7_000);
        assert_eq!(retry_ms(None), 0);
    }
}
