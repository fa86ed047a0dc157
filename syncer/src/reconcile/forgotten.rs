//! Reservations Redis forgot: MySQL rows still `reserved` long after their payment window,
//! for orders Redis no longer knows (its keys were lost: a restart without persistence, a
//! failover, a deletion). The Redis sweeper cannot end them, since it walks only what Redis
//! holds; this sweep ends them in MySQL as `expired`, units back to MySQL's available stock
//! while the sale is open, lapsed once it has closed (lifecycle.lua's rule), through the
//! writer's own apply (one transaction per batch, order rows locked, idempotent).
//!
//! Redis decides while it knows an order: an order with a reservation or an end in Redis is
//! never touched here. An order is due when MySQL's `reserved_at` + the sale's
//! `payment_window_s` + a grace period has passed (the grace absorbs clock skew between Redis,
//! which stamps `reserved_at`, and this process).
//!
//! Why this runs beside the periodic reconcile (`serve --pipeline`) and not in the Redis
//! sweeper: an order Redis forgot may still have its confirm on the way through Kafka (Redis
//! ended it, relayed the event, then lost its keys). Ending the row first would make the writer
//! refuse the buyer's payment. So a pass checks Redis first, then reads the sale topic's high
//! watermarks, and ends nothing until the writer's group has committed past them: every event
//! about the order that existed when Redis was read has landed by then. Only the pipeline side
//! knows the topic and the writer's group; the Redis sweeper runs in every `serve`, broker or not.
//!
//! Bounded: goods whose MySQL `reserved` counter is above zero, at most [`SALES_PER_PASS_MAX`]
//! of them; per goods at most [`ROWS_PER_GOODS_MAX`] rows examined per pass by primary key from
//! where the last pass stopped (the orders table has no index on state, on purpose: inserts are
//! the hot path), so a large sale is covered over several passes.

use std::collections::HashMap;
use std::time::Duration;

use sqlx::Row;
use tokio_util::sync::CancellationToken;

use super::orders::{
    release_event, MysqlOrder, OrderRange, Placement, RedisEntries, Standing, PAGE_ORDERS,
};
use super::watermarks::{high_watermarks, writer_reached};
use super::Reconciler;
use crate::events::SaleEvent;
use crate::order::ReleaseReason;
use crate::writer::apply_events;

/// Sales looked at per pass: those with units reserved in MySQL.
pub const SALES_PER_PASS_MAX: u32 = 1_000;
/// Order rows examined per goods per pass (20 pages of [`PAGE_ORDERS`]).
pub const ROWS_PER_GOODS_MAX: usize = 20 * PAGE_ORDERS;
/// Rows ended per transaction.
const APPLY_BATCH: usize = 500;
/// How long a pass waits for the writer to apply what the topic held; then it tries again
/// next pass.
const CATCH_UP_WAIT: Duration = Duration::from_secs(5);
/// How often that wait looks at the writer's committed offsets: a poll, not a pause; the
/// wait ends at the first look that finds the writer caught up, or at `CATCH_UP_WAIT`.
const CATCH_UP_POLL: Duration = Duration::from_millis(200);

/// What one pass did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SweepPass {
    /// Rows ended with their units back on sale.
    pub expired: u64,
    /// Rows ended after their sale closed: units lapsed.
    pub lapsed: u64,
    /// Due rows the writer had moved on by the time of the transaction (nothing written).
    pub skipped: u64,
    /// Due rows found, but the writer had not caught up: left for the next pass.
    pub deferred: u64,
}

/// A sale with units reserved in MySQL.
struct ReservedSale {
    goods_id: String,
    payment_window_ms: i64,
    ends_at_ms: i64,
    /// A `redis_sharded` goods' shard count (its orders live on the shard that issued them).
    shards: Option<u32>,
}

pub struct ForgottenSweep {
    reconciler: Reconciler,
    grace: Duration,
    /// Per goods, the last order id examined: the next pass goes on from there.
    cursors: HashMap<String, String>,
}

impl ForgottenSweep {
    pub fn new(reconciler: Reconciler, grace: Duration) -> ForgottenSweep {
        ForgottenSweep {
            reconciler,
            grace,
            cursors: HashMap::new(),
        }
    }

    pub async fn pass(&mut self) -> anyhow::Result<SweepPass> {
        let mut outcome = SweepPass::default();
        let now_ms = chrono::Utc::now().timestamp_millis();
        let mut due: Vec<(ReservedSale, Vec<SaleEvent>)> = Vec::new();
        for sale in self.reserved_sales().await? {
            let events = self.due(&sale, now_ms).await?;
            if !events.is_empty() {
                due.push((sale, events));
            }
        }
        if due.is_empty() {
            return Ok(outcome);
        }
        if !self.writer_caught_up().await? {
            outcome.deferred = due.iter().map(|(_, e)| e.len() as u64).sum();
            return Ok(outcome);
        }
        for (sale, events) in &due {
            for chunk in events.chunks(APPLY_BATCH) {
                let batch: Vec<&SaleEvent> = chunk.iter().collect();
                match apply_events(&self.reconciler.mysql, &batch).await {
                    Ok((applied, refused)) => {
                        // One sale's events are all of one kind: its sale is open or closed.
                        let ended = applied.transitions as u64;
                        match chunk.first() {
                            Some(SaleEvent::Lapsed { .. }) => outcome.lapsed += ended,
                            _ => outcome.expired += ended,
                        }
                        outcome.skipped += (refused.len() + applied.duplicates) as u64;
                    }
                    Err(sqlx::Error::Database(e)) => {
                        // This sale's counters refuse it (drift): reconcile reports it; the
                        // other sales go on.
                        tracing::warn!(goods_id = %sale.goods_id, error = %e, "MySQL refused ending forgotten reservations");
                        metrics::counter!("seckill_forgotten_sweep_errors_total").increment(1);
                        break;
                    }
                    Err(e) => return Err(e.into()),
                }
            }
        }
        Ok(outcome)
    }

    async fn reserved_sales(&self) -> sqlx::Result<Vec<ReservedSale>> {
        let rows = sqlx::query(
            // Goods MySQL decides (db tier, fallback) are swept by the MySQL sweeper. A
            // redis_sharded goods' reservations are looked up on the shards that issued them.
            "SELECT goods_id, payment_window_s, ends_at, shards FROM sales WHERE reserved > 0 \
             AND tier <> 'db' AND mode = 'redis' \
             ORDER BY goods_id LIMIT ?",
        )
        .bind(SALES_PER_PASS_MAX)
        .fetch_all(&self.reconciler.mysql)
        .await?;
        rows.iter()
            .map(|row| {
                let window_s: u32 = row.try_get("payment_window_s")?;
                let ends_at: chrono::NaiveDateTime = row.try_get("ends_at")?;
                Ok(ReservedSale {
                    goods_id: row.try_get("goods_id")?,
                    payment_window_ms: i64::from(window_s) * 1_000,
                    ends_at_ms: ends_at.and_utc().timestamp_millis(),
                    shards: row.try_get::<Option<u8>, _>("shards")?.map(u32::from),
                })
            })
            .collect()
    }

    /// The events that end this sale's due rows that Redis does not know, from where the last
    /// pass stopped, at most [`ROWS_PER_GOODS_MAX`] rows on.
    async fn due(&mut self, sale: &ReservedSale, now_ms: i64) -> anyhow::Result<Vec<SaleEvent>> {
        let reconciler = &self.reconciler;
        // With a sale in Redis, only its round: earlier rounds' reservations were dropped by
        // a preheat, not forgotten. Without one, Redis knows no round at all.
        let epoch = match sale.shards {
            None => crate::preheat::live_stock(&reconciler.redis, &reconciler.keys, &sale.goods_id)
                .await?
                .map(|l| l.epoch),
            // Every shard is loaded under the goods' epoch; one that forgot is left out.
            Some(_) => {
                crate::preheat::live_shards(&reconciler.redis, &reconciler.keys, &sale.goods_id)
                    .await?
                    .and_then(|shards| shards.iter().map(|s| s.stock.epoch).max())
            }
        };
        let range = OrderRange::new(&sale.goods_id, epoch);
        let grace_ms = i64::try_from(self.grace.as_millis()).unwrap_or(i64::MAX);
        let due_before_ms = now_ms
            .saturating_sub(sale.payment_window_ms)
            .saturating_sub(grace_ms);
        let closed = now_ms >= sale.ends_at_ms;
        let mut after = self
            .cursors
            .get(&sale.goods_id)
            .filter(|cursor| range.contains(cursor))
            .cloned();
        let (mut examined, mut events) = (0, Vec::new());
        while examined < ROWS_PER_GOODS_MAX {
            let page = range.page(&reconciler.mysql, after.as_deref()).await?;
            examined += page.len();
            let due: Vec<&MysqlOrder> = page
                .iter()
                .filter(|row| {
                    row.standing == Some(Standing::Reserved) && row.reserved_at_ms < due_before_ms
                })
                .collect();
            let ids: Vec<&str> = due.iter().map(|r| r.identity.order_id.as_str()).collect();
            let known = self.known(sale, &ids).await?;
            for (i, row) in due.into_iter().enumerate() {
                if !known[i] {
                    // Expired; units back on sale unless the sale has closed (they lapse).
                    let (reason, returned) = (ReleaseReason::Expired, !closed);
                    events.push(release_event(
                        &row.identity,
                        &row.goods_id,
                        reason,
                        returned,
                        now_ms,
                    ));
                }
            }
            after = page.last().map(|r| r.identity.order_id.clone());
            if page.len() < PAGE_ORDERS {
                // The end of the range: the next pass starts over.
                after = None;
                break;
            }
        }
        match after {
            Some(cursor) => self.cursors.insert(sale.goods_id.clone(), cursor),
            None => self.cursors.remove(&sale.goods_id),
        };
        Ok(events)
    }

    /// Whether Redis knows each order (live or ended): on the goods' keys, or for a sharded
    /// goods on the keys of the shard that issued it. An id that names no shard is taken as
    /// known: nothing is ended that cannot be placed.
    async fn known(&self, sale: &ReservedSale, ids: &[&str]) -> anyhow::Result<Vec<bool>> {
        let reconciler = &self.reconciler;
        let placement = Placement {
            goods_id: sale.goods_id.clone(),
            shards: sale.shards,
        };
        let entries =
            RedisEntries::read_placed(&reconciler.redis, &reconciler.keys, &placement, ids).await?;
        Ok(ids
            .iter()
            .enumerate()
            .map(|(i, id)| placement.index_of(id).is_none() || entries.knows(i))
            .collect())
    }

    /// Waits (bounded) until the writer has applied everything the sale topic holds now.
    async fn writer_caught_up(&self) -> anyhow::Result<bool> {
        let kafka = self.reconciler.kafka.clone();
        let marks = tokio::task::spawn_blocking(move || high_watermarks(&kafka)).await??;
        let deadline = tokio::time::Instant::now() + CATCH_UP_WAIT;
        loop {
            let (kafka, at) = (self.reconciler.kafka.clone(), marks.clone());
            if tokio::task::spawn_blocking(move || writer_reached(&kafka, &at)).await?? {
                return Ok(true);
            }
            if tokio::time::Instant::now() >= deadline {
                return Ok(false);
            }
            tokio::time::sleep(CATCH_UP_POLL).await;
        }
    }
}

/// Runs a pass every `every` until `shutdown`, with its metrics.
pub async fn run_forgotten_sweeper(
    sweep: ForgottenSweep,
    every: Duration,
    shutdown: CancellationToken,
) {
    tracing::info!(?every, grace = ?sweep.grace, "MySQL sweep of forgotten reservations started");
    // One pass at a time holds the cursors; the lock is never contended.
    let sweep = tokio::sync::Mutex::new(sweep);
    crate::every_tick(every, &shutdown, || async {
        let result = sweep.lock().await.pass().await;
        metrics::counter!("seckill_forgotten_sweep_passes_total").increment(1);
        match result {
            Ok(pass) => {
                let counter = |outcome: &'static str, n: u64| {
                    metrics::counter!("seckill_forgotten_reservations_total", "outcome" => outcome)
                        .increment(n)
                };
                counter("expired", pass.expired);
                counter("lapsed", pass.lapsed);
                counter("deferred", pass.deferred);
                if pass.expired + pass.lapsed > 0 {
                    tracing::warn!(?pass, "ended reservations Redis had forgotten, in MySQL");
                }
            }
            Err(e) => {
                metrics::counter!("seckill_forgotten_sweep_errors_total").increment(1);
                tracing::warn!(error = %e, "MySQL sweep of forgotten reservations failed; retrying next tick");
            }
        }
    })
    .await;
}
