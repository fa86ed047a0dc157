//! Reconciliation: compares each goods' counters in Redis (the truth for who won) with MySQL
//! (the durable record), accounting for events still on their way (outbox entries not yet in
//! Kafka, Kafka messages not yet applied). At rest after a drain the drift must be zero.

use std::collections::BTreeSet;
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::TopicPartitionList;
use redis::aio::ConnectionManager;
use redis::AsyncCommands;
use serde::Serialize;
use sqlx::{MySqlPool, Row};

use crate::events::{Effect, SaleEvent, OUTBOX_FIELD};
use crate::kafka::KafkaConfig;
use crate::keys::{KeySpace, Record};
use crate::order::OrderState;
use crate::preheat::live_stock;
use crate::sale::LiveStock;

const KAFKA_TIMEOUT: Duration = Duration::from_secs(5);
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
    /// Redis's own `total = available + reserved + sold`.
    pub redis_conserved: bool,
    /// MySQL's own `total_stock = stock + reserved + sold + lapsed`.
    pub mysql_conserved: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub goods: Vec<GoodsReport>,
    /// Messages in Kafka the writer has not committed yet (None: could not be read).
    pub kafka_lag: Option<i64>,
    /// Nothing in flight: the drift figures are final.
    pub settled: bool,
}

impl Report {
    pub fn total_drift(&self) -> i64 {
        self.goods.iter().map(|g| g.drift.magnitude()).sum()
    }

    pub fn is_clean(&self) -> bool {
        self.goods
            .iter()
            .all(|g| g.drift.is_zero() && g.redis_conserved && g.mysql_conserved)
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

pub struct Reconciler {
    pub redis: ConnectionManager,
    pub keys: KeySpace,
    pub mysql: MySqlPool,
    pub kafka: KafkaConfig,
}

impl Reconciler {
    pub async fn report(&self, only: Option<&str>) -> anyhow::Result<Report> {
        let mut goods_ids: BTreeSet<String> = BTreeSet::new();
        let mut conn = self.redis.clone();
        let indexed: Vec<String> =
            tokio::time::timeout(REDIS_TIMEOUT, conn.smembers(self.keys.sales_index())).await??;
        goods_ids.extend(indexed);
        for row in sqlx::query("SELECT goods_id FROM sales")
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
            goods.push(self.goods_report(&goods_id).await?);
        }
        let kafka = self.kafka.clone();
        let kafka_lag = tokio::task::spawn_blocking(move || writer_lag(&kafka)).await?;
        let outbox_empty = goods.iter().all(|g| g.outbox_events == 0);
        Ok(Report {
            settled: outbox_empty && kafka_lag == Some(0),
            goods,
            kafka_lag,
        })
    }

    async fn goods_report(&self, goods_id: &str) -> anyhow::Result<GoodsReport> {
        let redis = live_stock(&self.redis, &self.keys, goods_id).await?;
        let mysql = stored_stock(&self.mysql, goods_id).await?;
        let (outbox_events, in_flight) = self.outbox_in_flight(goods_id).await?;
        let drift = match (&redis, &mysql) {
            (Some(r), Some(m)) => drift(r, &in_flight, m),
            // Defined on one side only: all of the other side's stock is drift.
            (Some(r), None) => Drift {
                available: -(r.available as i64),
                reserved: -(r.reserved as i64),
                sold: -(r.sold as i64),
                lapsed: -(r.lapsed as i64),
            },
            (None, _) => Drift::default(),
        };
        Ok(GoodsReport {
            goods_id: goods_id.to_owned(),
            redis_conserved: redis.as_ref().is_none_or(LiveStock::is_conserved),
            mysql_conserved: mysql
                .as_ref()
                .is_none_or(|m| m.available + m.reserved + m.sold + m.lapsed == m.total),
            redis,
            mysql,
            outbox_events,
            in_flight,
            drift,
        })
    }

    /// Events in a goods' outbox and their summed effect: done in Redis, not yet in MySQL.
    async fn outbox_in_flight(&self, goods_id: &str) -> anyhow::Result<(u64, Effect)> {
        let stream = self.keys.goods(goods_id).outbox;
        let mut conn = self.redis.clone();
        let mut start = "-".to_owned();
        let (mut events, mut effect) = (0u64, Effect::default());
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
                // An entry the writer will not apply (it becomes a dead letter) moves nothing.
                let event = crate::relay::outbox_event(entry).ok();
                if let Some(Ok(event)) = event.as_deref().map(SaleEvent::from_json) {
                    effect += event.effect();
                }
            }
            if !full {
                break;
            }
            start = format!("({last}");
        }
        Ok((events, effect))
    }
}

/// What `--repair` did.
#[derive(Debug, Default, Serialize)]
pub struct Repaired {
    /// Orders Redis granted that MySQL lacks, appended to the outbox again (the writer applies
    /// them once; it ignores any it already has).
    pub orders_resent: usize,
    /// Goods whose MySQL counters were recomputed from their order rows.
    pub counters_recomputed: usize,
}

impl Reconciler {
    /// Repairs MySQL towards Redis. Redis is the truth for who won, MySQL's order rows are the
    /// truth for what MySQL recorded: orders missing from MySQL are re-sent through the
    /// outbox, and each sale's counters are recomputed from its rows of the current epoch.
    /// Refuses to run while events are in flight, when the difference is not yet drift.
    pub async fn repair(&self, report: &Report) -> anyhow::Result<Repaired> {
        anyhow::ensure!(
            report.settled,
            "events are still in flight (outbox or Kafka lag); let the pipeline drain first"
        );
        let mut repaired = Repaired::default();
        for goods in &report.goods {
            let Some(live) = goods.redis else { continue };
            if goods.mysql.is_none() {
                continue;
            }
            repaired.orders_resent += self.resend_missing(&goods.goods_id).await?;
            let prefix = format!("{}.{}.%", goods.goods_id, live.epoch);
            sqlx::query(
                "UPDATE sales SET
                   reserved = (SELECT COALESCE(SUM(quantity), 0) FROM orders
                               WHERE goods_id = ? AND order_id LIKE ? AND state = ?),
                   sold = (SELECT COALESCE(SUM(quantity), 0) FROM orders
                           WHERE goods_id = ? AND order_id LIKE ? AND state = ?),
                   lapsed = (SELECT COALESCE(SUM(quantity), 0) FROM orders
                             WHERE goods_id = ? AND order_id LIKE ? AND state = ?
                               AND NOT stock_returned),
                   stock = CAST(total_stock AS SIGNED) - reserved - sold - lapsed
                 WHERE goods_id = ?",
            )
            .bind(&goods.goods_id)
            .bind(&prefix)
            .bind(OrderState::Reserved.as_str())
            .bind(&goods.goods_id)
            .bind(&prefix)
            .bind(OrderState::Confirmed.as_str())
            .bind(&goods.goods_id)
            .bind(&prefix)
            .bind(OrderState::Released.as_str())
            .bind(&goods.goods_id)
            .execute(&self.mysql)
            .await?;
            repaired.counters_recomputed += 1;
        }
        Ok(repaired)
    }

    async fn resend_missing(&self, goods_id: &str) -> anyhow::Result<usize> {
        let keys = self.keys.goods(goods_id);
        let mut conn = self.redis.clone();
        let granted: Vec<(String, String)> =
            tokio::time::timeout(REDIS_TIMEOUT, conn.hgetall(&keys.requests)).await??;
        let mut resent = 0;
        for chunk in granted.chunks(1_000) {
            // A request's record names its order: `user|quantity|order_id`.
            let parsed: Vec<(&str, Record)> = chunk
                .iter()
                .filter_map(|(request_id, record)| {
                    Some((request_id.as_str(), Record::parse(record)?))
                })
                .collect();
            if parsed.is_empty() {
                continue;
            }
            let mut select = sqlx::QueryBuilder::<sqlx::MySql>::new(
                "SELECT order_id FROM orders WHERE order_id IN (",
            );
            let mut ids = select.separated(", ");
            for (_, record) in &parsed {
                ids.push_bind(record.rest);
            }
            select.push(")");
            let present: BTreeSet<String> = select
                .build()
                .fetch_all(&self.mysql)
                .await?
                .iter()
                .filter_map(|row| row.try_get(0).ok())
                .collect();
            for (request_id, record) in parsed {
                if present.contains(record.rest) {
                    continue;
                }
                let event = SaleEvent::Reserved {
                    order_id: record.rest.to_owned(),
                    goods_id: goods_id.to_owned(),
                    user_id: record.user_id.to_owned(),
                    quantity: record.quantity,
                    request_id: request_id.to_owned(),
                    at_ms: chrono::Utc::now().timestamp_millis(),
                };
                let _: String = tokio::time::timeout(
                    REDIS_TIMEOUT,
                    conn.xadd(&keys.outbox, "*", &[(OUTBOX_FIELD, event.to_json())]),
                )
                .await??;
                resent += 1;
            }
        }
        Ok(resent)
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

/// Messages on the sale topic the writer's group has not committed (blocking calls).
fn writer_lag(kafka: &KafkaConfig) -> Option<i64> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &kafka.brokers)
        .set("group.id", &kafka.group)
        .set("enable.auto.commit", "false")
        .create()
        .ok()?;
    let metadata = consumer
        .fetch_metadata(Some(&kafka.topic), KAFKA_TIMEOUT)
        .ok()?;
    let topic = metadata.topics().iter().find(|t| t.name() == kafka.topic)?;
    let mut list = TopicPartitionList::new();
    for partition in topic.partitions() {
        list.add_partition(&kafka.topic, partition.id());
    }
    let committed = consumer.committed_offsets(list, KAFKA_TIMEOUT).ok()?;
    crate::kafka::uncommitted(&consumer, &committed, KAFKA_TIMEOUT)
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
}
