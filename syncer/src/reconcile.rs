//! Reconciliation: compares Redis (the truth for who won) with MySQL (the durable record),
//! accounting for events still on their way (outbox entries not yet in Kafka, Kafka messages
//! not yet applied). At rest after a drain it must be clean.
//!
//! What it checks, cheapest first:
//! - each goods' totals (available, reserved, sold, lapsed) less what its outbox still
//!   carries; a goods with orders or moved units in MySQL but no sale in Redis (Redis forgot
//!   it) is reported, and the whole MySQL side counts as drift;
//! - the dead-letter topic: each message there is an event MySQL never applied;
//! - with `--orders`, the order digest ([`digest`]): each order's buyer, request id, quantity
//!   and state on both sides (a `redis_sharded` goods' on every shard).
//!
//! The metric loop of `serve --pipeline` runs the first two (the counters, the outboxes, a few
//! Kafka watermarks); the digest reads every order, so it is a command. [`repair`] repairs
//! MySQL towards Redis; [`forgotten`] ends MySQL reservations Redis forgot.

mod digest;
mod forgotten;
mod orders;
mod repair;
pub(crate) mod watermarks;

pub use digest::{Finding, Kind, OrderDigest};
pub use forgotten::{run_forgotten_sweeper, ForgottenSweep, SweepPass};
pub use orders::{Identity, MysqlOrder, RedisOrder, Standing};
pub use repair::{replay, Repaired};

use std::collections::BTreeSet;
use std::time::Duration;

use crate::RedisConn;
use redis::AsyncCommands;
use serde::Serialize;
use sqlx::{MySqlPool, Row};

use crate::events::{Effect, SaleEvent};
use crate::kafka::KafkaConfig;
use crate::keys::KeySpace;
use crate::preheat::live_stock;
use crate::sale::LiveStock;

const REDIS_TIMEOUT: Duration = Duration::from_secs(5);
/// Outbox entries read per call while summing what is in flight.
const OUTBOX_SCAN_PAGE: usize = 1_000;

/// MySQL's counters of one sale.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct StoredStock {
    pub total: i64,
    pub available: i64,
    pub reserved: i64,
    pub sold: i64,
    pub lapsed: i64,
}

/// Differences MySQL minus what Redis says MySQL should hold once in-flight events land.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Drift {
    pub available: i64,
    pub reserved: i64,
    pub sold: i64,
    pub lapsed: i64,
}

impl Drift {
    pub fn is_zero(&self) -> bool {
        *self == Drift::default()
    }

    pub fn magnitude(&self) -> i64 {
        self.available.abs() + self.reserved.abs() + self.sold.abs() + self.lapsed.abs()
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct GoodsReport {
    pub goods_id: String,
    pub redis: Option<LiveStock>,
    pub mysql: Option<StoredStock>,
    /// Events in the goods' outbox (not yet confirmed by Kafka) and what they will do to
    /// MySQL's counters once applied.
    pub outbox_events: u64,
    #[serde(skip)]
    pub in_flight: Effect,
    pub drift: Drift,
    /// Redis has no sale for the goods while MySQL has orders or moved units of it: Redis
    /// forgot it (say, restarted without persistence), and all of MySQL's side is unmatched.
    pub missing_from_redis: bool,
    /// Redis's own `total = available + reserved + sold`.
    pub redis_conserved: bool,
    /// MySQL's own `total_stock = stock + reserved + sold + lapsed`.
    pub mysql_conserved: bool,
    /// The order digest (`--orders`, `--repair`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub orders: Option<OrderDigest>,
    /// A `redis_sharded` goods: each shard's counters (each shard conserves its own total;
    /// the goods' figures above are their sum, units on their way between shards counted
    /// as available).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub shards: Vec<crate::shard::ShardStock>,
    /// What this report does not cover for the goods.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    /// A sharded goods MySQL decides: its fenced shards are a stale copy, compared with
    /// nothing (the note says so), and `--repair` refuses to write from them.
    #[serde(skip)]
    pub(crate) decided_by_mysql: bool,
}

impl GoodsReport {
    pub fn is_clean(&self) -> bool {
        self.drift.is_zero()
            && !self.missing_from_redis
            && self.redis_conserved
            && self.mysql_conserved
            && self.orders.as_ref().is_none_or(OrderDigest::is_clean)
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub goods: Vec<GoodsReport>,
    /// Messages in Kafka the writer has not committed yet (None: could not be read).
    pub kafka_lag: Option<i64>,
    /// Messages in the dead-letter topic: events MySQL never applied (None: could not be read).
    pub dead_letters: Option<i64>,
    /// Nothing in flight: the drift figures are final.
    pub settled: bool,
}

impl Report {
    pub fn total_drift(&self) -> i64 {
        self.goods.iter().map(|g| g.drift.magnitude()).sum()
    }

    /// Every goods clean, and no dead letter (or they could not be counted: not vouched for).
    pub fn is_clean(&self) -> bool {
        self.goods.iter().all(GoodsReport::is_clean) && self.dead_letters == Some(0)
    }

    /// Sets the reconcile gauges and each goods' Redis stock (the periodic loop of `serve
    /// --pipeline`); goods with something to show first when there are more goods than series.
    pub fn record_metrics(&self) {
        let now_ms = chrono::Utc::now().timestamp_millis();
        let needs_attention = |goods: &GoodsReport| {
            !goods.is_clean()
                || goods.outbox_events > 0
                || goods
                    .redis
                    .is_some_and(|r| r.reserved > 0 || r.end_ms > now_ms)
        };
        for goods in crate::telemetry::per_goods(&self.goods, needs_attention) {
            let id = goods.goods_id.clone();
            metrics::gauge!("seckill_reconcile_drift", "goods_id" => id.clone())
                .set(goods.drift.magnitude() as f64);
            metrics::gauge!("seckill_reconcile_missing_from_redis", "goods_id" => id.clone())
                .set(f64::from(u8::from(goods.missing_from_redis)));
            if let Some(redis) = &goods.redis {
                let states = [
                    ("available", redis.available),
                    ("reserved", redis.reserved),
                    ("sold", redis.sold),
                    ("lapsed", redis.lapsed),
                ];
                for (state, units) in states {
                    metrics::gauge!(crate::telemetry::REDIS_STOCK,
                        "goods_id" => id.clone(), "state" => state)
                    .set(units as f64);
                }
            }
        }
        metrics::gauge!("seckill_reconcile_settled").set(f64::from(u8::from(self.settled)));
        // -1: the dead-letter topic could not be read.
        metrics::gauge!("seckill_reconcile_dead_letters")
            .set(self.dead_letters.map_or(-1.0, |n| n as f64));
        metrics::gauge!("seckill_reconcile_clean").set(f64::from(u8::from(self.is_clean())));
    }
}

/// MySQL minus what it should hold: Redis's counters less the effect of the events still in
/// the outbox (which MySQL has not seen yet).
pub fn drift(redis: &LiveStock, in_flight: &Effect, mysql: &StoredStock) -> Drift {
    Drift {
        available: mysql.available - (redis.available as i64 - in_flight.available),
        reserved: mysql.reserved - (redis.reserved as i64 - in_flight.reserved),
        sold: mysql.sold - (redis.sold as i64 - in_flight.sold),
        lapsed: mysql.lapsed - (redis.lapsed as i64 - in_flight.lapsed),
    }
}

/// MySQL's drift when Redis has no sale at all: everything MySQL moved away from a fresh sale
/// is unmatched.
pub fn drift_without_redis(mysql: &StoredStock) -> Drift {
    Drift {
        available: mysql.available - mysql.total,
        reserved: mysql.reserved,
        sold: mysql.sold,
        lapsed: mysql.lapsed,
    }
}

#[derive(Clone)]
pub struct Reconciler {
    pub redis: RedisConn,
    pub keys: KeySpace,
    pub mysql: MySqlPool,
    pub kafka: KafkaConfig,
}

impl Reconciler {
    /// The totals of every goods (or `only` one), the Kafka figures, and with `orders` the
    /// order digest of each goods.
    pub async fn report(&self, only: Option<&str>, orders: bool) -> anyhow::Result<Report> {
        let mut goods_ids: BTreeSet<String> = BTreeSet::new();
        let mut conn = self.redis.clone();
        let indexed: Vec<String> =
            tokio::time::timeout(REDIS_TIMEOUT, conn.smembers(self.keys.sales_index())).await??;
        // A shard in the index stands for its goods: a goods is reconciled as a whole.
        goods_ids.extend(
            indexed
                .iter()
                .map(|id| crate::keys::base_goods(id).to_owned()),
        );
        // A db-tier goods has one record, MySQL's: nothing to reconcile.
        for row in sqlx::query("SELECT goods_id FROM sales WHERE tier <> 'db'")
            .fetch_all(&self.mysql)
            .await?
        {
            goods_ids.insert(row.try_get(0)?);
        }
        if let Some(only) = only {
            goods_ids.retain(|g| g == only);
        }
        let mut goods = Vec::with_capacity(goods_ids.len());
        for goods_id in goods_ids {
            let mut report = self.goods_report(&goods_id).await?;
            if orders && !report.decided_by_mysql {
                report.orders = Some(self.digest(&goods_id, &mut digest::CountOnly).await?);
            }
            goods.push(report);
        }
        let kafka = self.kafka.clone();
        let (kafka_lag, dead_letters) = tokio::task::spawn_blocking(move || {
            (
                watermarks::writer_lag(&kafka),
                watermarks::dead_letters(&kafka),
            )
        })
        .await?;
        let outbox_empty = goods.iter().all(|g| g.outbox_events == 0);
        Ok(Report {
            settled: outbox_empty && kafka_lag == Some(0),
            goods,
            kafka_lag,
            dead_letters,
        })
    }

    async fn goods_report(&self, goods_id: &str) -> anyhow::Result<GoodsReport> {
        let redis = live_stock(&self.redis, &self.keys, goods_id).await?;
        let mysql = stored_stock(&self.mysql, goods_id).await?;
        // A sharded goods: every shard's outbox, and each shard's own conservation.
        let shards = crate::preheat::live_shards(&self.redis, &self.keys, goods_id)
            .await?
            .unwrap_or_default();
        let key_ids: Vec<String> = if shards.is_empty() {
            vec![goods_id.to_owned()]
        } else {
            shards
                .iter()
                .map(|s| crate::keys::shard_id(goods_id, s.shard))
                .collect()
        };
        let mut in_flight = Effect::default();
        let mut outbox_events = 0;
        for key_id in &key_ids {
            outbox_events += self
                .for_each_outbox_event(key_id, usize::MAX, |event| {
                    // An entry the writer will not apply (a dead letter) moves nothing.
                    if let Some(event) = event {
                        in_flight += event.effect();
                    }
                })
                .await?;
        }
        // A sharded goods MySQL decides (its shards fenced until it is re-seeded) is MySQL's
        // alone: the shards' counters are a stale copy, not compared.
        let in_mysql: Option<String> = if shards.is_empty() {
            None
        } else {
            sqlx::query_scalar("SELECT mode FROM sales WHERE goods_id = ?")
                .bind(goods_id)
                .fetch_optional(&self.mysql)
                .await?
                .filter(|mode: &String| mode != "redis")
        };
        let (drift, missing_from_redis) = match (&redis, &mysql) {
            _ if in_mysql.is_some() => (Drift::default(), false),
            (Some(r), Some(m)) => (drift(r, &in_flight, m), false),
            // Defined on one side only: all of the other side's stock is drift.
            (Some(r), None) => (
                Drift {
                    available: -(r.available as i64),
                    reserved: -(r.reserved as i64),
                    sold: -(r.sold as i64),
                    lapsed: -(r.lapsed as i64),
                },
                false,
            ),
            (None, Some(m)) => {
                let drift = drift_without_redis(m);
                let has_orders = orders::OrderRange::new(goods_id, None)
                    .any_rows(&self.mysql)
                    .await?;
                (drift, has_orders || !drift.is_zero())
            }
            (None, None) => (Drift::default(), false),
        };
        let shards_conserved = shards.iter().all(|s| s.stock.is_conserved());
        Ok(GoodsReport {
            goods_id: goods_id.to_owned(),
            redis_conserved: redis.as_ref().is_none_or(LiveStock::is_conserved) && shards_conserved,
            mysql_conserved: mysql
                .as_ref()
                .is_none_or(|m| m.available + m.reserved + m.sold + m.lapsed == m.total),
            redis,
            mysql,
            outbox_events,
            in_flight,
            drift,
            missing_from_redis,
            orders: None,
            shards,
            decided_by_mysql: in_mysql.is_some(),
            note: in_mysql.map(|mode| {
                format!(
                    "mode {mode}: MySQL decides this sharded goods until it is re-seeded; its \
                     fenced shards are not compared (neither counters nor orders)"
                )
            }),
        })
    }

    /// Calls `each` with every event in a goods' outbox, oldest first (None for an entry that
    /// is no sale event: the writer will dead-letter it), up to `limit` events. Returns how
    /// many it read: more than `limit` means it stopped there.
    async fn for_each_outbox_event(
        &self,
        goods_id: &str,
        limit: usize,
        mut each: impl FnMut(Option<SaleEvent>),
    ) -> anyhow::Result<u64> {
        let stream = self.keys.goods(goods_id).outbox;
        let mut conn = self.redis.clone();
        let mut start = "-".to_owned();
        let mut events = 0u64;
        // Pages of the stream from its start; a short page is the last.
        loop {
            let page: redis::streams::StreamRangeReply = tokio::time::timeout(
                REDIS_TIMEOUT,
                conn.xrange_count(&stream, &start, "+", OUTBOX_SCAN_PAGE),
            )
            .await??;
            let Some(last) = page.ids.last().map(|e| e.id.clone()) else {
                break;
            };
            let full = page.ids.len() >= OUTBOX_SCAN_PAGE;
            for entry in page.ids {
                events += 1;
                if events > limit as u64 {
                    return Ok(events);
                }
                let event = crate::relay::outbox_event(entry).ok();
                each(event.as_deref().and_then(|e| SaleEvent::from_json(e).ok()));
            }
            if !full {
                break;
            }
            start = format!("({last}");
        }
        Ok(events)
    }
}

pub async fn stored_stock(mysql: &MySqlPool, goods_id: &str) -> sqlx::Result<Option<StoredStock>> {
    let row = sqlx::query(
        "SELECT CAST(total_stock AS SIGNED), stock, reserved, sold, lapsed FROM sales \
         WHERE goods_id = ?",
    )
    .bind(goods_id)
    .fetch_optional(mysql)
    .await?;
    row.map(|row| {
        Ok(StoredStock {
            total: row.try_get(0)?,
            available: row.try_get(1)?,
            reserved: row.try_get(2)?,
            sold: row.try_get(3)?,
            lapsed: row.try_get(4)?,
        })
    })
    .transpose()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn live(available: u64, reserved: u64, sold: u64) -> LiveStock {
        LiveStock {
            total: available + reserved + sold,
            available,
            reserved,
            sold,
            per_user_limit: 1,
            start_ms: 0,
            end_ms: 1,
            epoch: 1,
            lapsed: 0,
            window_ms: 1,
            pause_retry_ms: 0,
        }
    }

    #[test]
    fn in_flight_events_are_not_drift() {
        let redis = live(90, 8, 2);
        // MySQL has not seen 3 reservations and 2 confirmations yet.
        let mysql = StoredStock {
            total: 100,
            available: 93,
            reserved: 7,
            sold: 0,
            lapsed: 0,
        };
        let in_flight = Effect {
            available: -3,
            reserved: 1,
            sold: 2,
            lapsed: 0,
        };
        assert!(drift(&redis, &in_flight, &mysql).is_zero());
        let d = drift(&redis, &Effect::default(), &mysql);
        assert_eq!(
            d,
            Drift {
                available: 3,
                reserved: -1,
                sold: -2,
                lapsed: 0
            }
        );
        assert_eq!(d.magnitude(), 6);
    }

    /// Without a sale in Redis, a fresh sale in MySQL is no drift; anything it moved is.
    #[test]
    fn a_goods_redis_forgot_is_all_drift() {
        let fresh = StoredStock {
            total: 100,
            available: 100,
            reserved: 0,
            sold: 0,
            lapsed: 0,
        };
        assert!(drift_without_redis(&fresh).is_zero());
        let sold = StoredStock {
            available: 70,
            reserved: 20,
            sold: 8,
            lapsed: 2,
            ..fresh
        };
        let d = drift_without_redis(&sold);
        assert_eq!(
            d,
            Drift {
                available: -30,
                reserved: 20,
                sold: 8,
                lapsed: 2
            }
        );
        assert_eq!(d.magnitude(), 60);
    }
}
