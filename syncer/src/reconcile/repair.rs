//! `reconcile --repair`: brings MySQL to what Redis holds, order by order, without ever
//! writing over what MySQL recorded.
//!
//! Redis is the truth for who won and how each order ended; MySQL's rows are the truth for
//! what MySQL recorded. For each goods: first its counters are recomputed from its rows of the
//! current round (so rows and counters agree), then the order digest walks every order and
//! repair appends to the goods' outbox the events that bring MySQL to Redis's state:
//! - an order MySQL lacks gets its whole history: `reserved` (at its reservation time when
//!   Redis still has it), then how it ended (`confirmed`, `released` with its units back on
//!   sale, or `lapsed`, with its reason);
//! - an order MySQL holds as reserved that Redis ended gets its end.
//!
//! Nothing else is written: an order MySQL ended is never sent as reserved again (nor ended
//! twice), a row naming another buyer, request or quantity is a conflict for a person, and a
//! row Redis does not know stays. The relay publishes the events keyed by goods, so they reach
//! the writer in order on one partition, and the writer applies each once.
//!
//! A `redis_sharded` goods' events go to the outbox of the shard that issued each order, so
//! one order's events stay in order in one stream (the relay reads each shard's outbox on its
//! own). A sharded goods MySQL decides is refused: its fenced shards are a stale copy, not
//! the truth to repair towards.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Serialize;

use super::digest::{Finding, Kind, Sink};
use super::orders::{MysqlOrder, OrderRange, Placement, RedisOrder, Standing};
use super::{Reconciler, Report};
use crate::events::{SaleEvent, OUTBOX_FIELD};
use crate::order::OrderState;

/// Events appended to an outbox per round trip.
const OUTBOX_BATCH: usize = 500;
const REDIS_TIMEOUT: Duration = Duration::from_secs(5);

/// What `--repair` did.
#[derive(Debug, Default, Serialize)]
pub struct Repaired {
    /// Goods whose MySQL counters were recomputed from their order rows.
    pub counters_recomputed: u64,
    /// Orders MySQL lacked, replayed from their reservation to their current state.
    pub orders_replayed: u64,
    /// Orders MySQL held as reserved that Redis had ended: their end replayed.
    pub orders_ended: u64,
    /// Events appended to the outboxes for the writer.
    pub events_appended: u64,
    /// Findings repair does not write over: a row with another buyer, request or quantity,
    /// an order MySQL ended otherwise than Redis (or ended while Redis still holds it), a row
    /// Redis does not know.
    pub left_alone: u64,
    /// Orders MySQL lacks of which Redis keeps only the end (their request won again later):
    /// nothing to rebuild their row from.
    pub unreplayable: u64,
}

/// The events that bring MySQL's row (`mysql`, None: no row) to the state Redis holds, in the
/// order the writer must apply them. None when repair may write nothing: Redis does not know
/// enough, the row names another buyer, request or quantity, or MySQL has already ended the
/// order (an ended order is never made reserved again, nor ended twice).
pub fn replay(
    goods_id: &str,
    redis: &RedisOrder,
    mysql: Option<&MysqlOrder>,
    now_ms: i64,
) -> Option<Vec<SaleEvent>> {
    let identity = redis.identity.as_ref()?;
    let standing = redis.standing?;
    let mut events = Vec::with_capacity(2);
    match mysql {
        None => events.push(SaleEvent::Reserved {
            order_id: identity.order_id.clone(),
            goods_id: goods_id.to_owned(),
            user_id: identity.user_id.clone(),
            quantity: identity.quantity,
            request_id: identity.request_id.clone(),
            at_ms: redis.reserved_at_ms.unwrap_or(now_ms),
        }),
        Some(row) if row.identity == *identity && row.standing == Some(Standing::Reserved) => {}
        Some(_) => return None,
    }
    events.extend(standing.end_event(identity, goods_id, now_ms));
    (!events.is_empty()).then_some(events)
}

impl Reconciler {
    /// Repairs MySQL towards Redis (see the module). Refuses to run while events are in
    /// flight, when a difference is not yet drift.
    pub async fn repair(&self, report: &Report) -> anyhow::Result<Repaired> {
        anyhow::ensure!(
            report.settled,
            "events are still in flight (outbox or Kafka lag); let the pipeline drain first"
        );
        // Checked for every goods before anything is written.
        if let Some(fenced) = report.goods.iter().find(|g| g.decided_by_mysql) {
            anyhow::bail!(
                "goods {}: MySQL decides this sharded goods until its sale ends, and its fenced \
                 shards are a stale copy; nothing repaired (name the other goods with --goods)",
                fenced.goods_id
            );
        }
        let mut repaired = Repaired::default();
        let now_ms = chrono::Utc::now().timestamp_millis();
        for goods in &report.goods {
            let (Some(live), Some(_)) = (goods.redis, goods.mysql) else {
                continue;
            };
            let first_epoch = self.first_epoch(&goods.goods_id, live.epoch).await?;
            self.recompute_counters(&goods.goods_id, first_epoch, live.epoch)
                .await?;
            repaired.counters_recomputed += 1;
            let mut outbox = Replay {
                reconciler: self,
                placement: self.placement(&goods.goods_id).await?,
                pending: BTreeMap::new(),
                pending_events: 0,
                repaired: &mut repaired,
                now_ms,
            };
            let digest = self.digest(&goods.goods_id, &mut outbox).await?;
            outbox.flush().await?;
            repaired.unreplayable += digest.unreplayable;
        }
        Ok(repaired)
    }

    /// The first epoch whose orders the sale hash counts: a re-seed loads a round that spans
    /// the epochs `first_epoch..=epoch` (see `lua/reseed.lua`); a preheat only its own, and
    /// a sharded goods is never re-seeded (its goods' keys hold no sale: its epoch).
    async fn first_epoch(&self, goods_id: &str, epoch: u64) -> anyhow::Result<u64> {
        let mut conn = self.redis.clone();
        let first: Option<u64> = tokio::time::timeout(
            super::REDIS_TIMEOUT,
            redis::cmd("HGET")
                .arg(self.keys.goods(goods_id).sale)
                .arg("first_epoch")
                .query_async(&mut conn),
        )
        .await??;
        Ok(first.unwrap_or(epoch).min(epoch))
    }

    /// Sets a sale's counters to what its rows of the current round (epochs
    /// `first_epoch..=epoch`) say.
    async fn recompute_counters(
        &self,
        goods_id: &str,
        first_epoch: u64,
        epoch: u64,
    ) -> sqlx::Result<()> {
        let range = OrderRange::new(goods_id, (first_epoch == epoch).then_some(epoch));
        let (from, until) = range.bounds();
        let sum = |state: OrderState, lapsed_only: bool| {
            format!(
                "(SELECT COALESCE(SUM(quantity), 0) FROM orders WHERE order_id > ? \
                 AND order_id < ? AND goods_id = ? AND state = '{state}' \
                 AND CAST(SUBSTRING_INDEX(SUBSTRING_INDEX(order_id, '.', -2), '.', 1) \
                 AS UNSIGNED) BETWEEN ? AND ?{})",
                if lapsed_only {
                    " AND NOT stock_returned"
                } else {
                    ""
                }
            )
        };
        // MySQL assigns left to right, so `stock` sees the new reserved, sold and lapsed.
        let query = format!(
            "UPDATE sales SET reserved = {}, sold = {}, lapsed = {}, \
             stock = CAST(total_stock AS SIGNED) - reserved - sold - lapsed WHERE goods_id = ?",
            sum(OrderState::Reserved, false),
            sum(OrderState::Confirmed, false),
            sum(OrderState::Released, true),
        );
        let mut update = sqlx::query(&query);
        for _ in 0..3 {
            update = update
                .bind(from)
                .bind(until)
                .bind(goods_id)
                .bind(first_epoch)
                .bind(epoch);
        }
        update.bind(goods_id).execute(&self.mysql).await?;
        Ok(())
    }
}

/// The digest's sink during a repair: appends each order's replay to the outbox of the
/// keyspace that holds the order.
struct Replay<'a> {
    reconciler: &'a Reconciler,
    placement: Placement,
    /// Events to append, by keyspace (one pipeline each: a pipeline names one hash tag).
    pending: BTreeMap<usize, Vec<Vec<u8>>>,
    pending_events: usize,
    repaired: &'a mut Repaired,
    now_ms: i64,
}

impl Replay<'_> {
    async fn flush(&mut self) -> anyhow::Result<()> {
        for (index, events) in std::mem::take(&mut self.pending) {
            let outbox = self
                .reconciler
                .keys
                .goods(&self.placement.key_id(index))
                .outbox;
            let mut pipe = redis::pipe();
            for event in &events {
                pipe.cmd("XADD")
                    .arg(&outbox)
                    .arg("*")
                    .arg(OUTBOX_FIELD)
                    .arg(event)
                    .ignore();
            }
            let mut conn = self.reconciler.redis.clone();
            let () = tokio::time::timeout(REDIS_TIMEOUT, pipe.query_async(&mut conn)).await??;
            self.repaired.events_appended += events.len() as u64;
        }
        self.pending_events = 0;
        Ok(())
    }
}

impl Sink for Replay<'_> {
    async fn found(&mut self, goods_id: &str, finding: &Finding) -> anyhow::Result<()> {
        let events = match (finding.kind, &finding.redis) {
            (Kind::MissingFromMysql | Kind::StateDiffers, Some(redis)) => {
                replay(goods_id, redis, finding.mysql.as_ref(), self.now_ms)
            }
            _ => None,
        };
        let placed = self.placement.index_of(&finding.order_id);
        let (Some(events), Some(index)) = (events, placed) else {
            self.repaired.left_alone += 1;
            return Ok(());
        };
        match finding.mysql {
            None => self.repaired.orders_replayed += 1,
            Some(_) => self.repaired.orders_ended += 1,
        }
        self.pending_events += events.len();
        self.pending
            .entry(index)
            .or_default()
            .extend(events.iter().map(SaleEvent::to_json));
        if self.pending_events >= OUTBOX_BATCH {
            self.flush().await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::orders::Identity;
    use super::*;
    use crate::order::ReleaseReason;

    const REASON: ReleaseReason = ReleaseReason::UpstreamFailed;

    fn identity() -> Identity {
        Identity {
            order_id: "g.1.7".into(),
            user_id: "u1".into(),
            request_id: "r1".into(),
            quantity: 2,
        }
    }

    fn redis(standing: Standing) -> RedisOrder {
        RedisOrder {
            identity: Some(identity()),
            standing: Some(standing),
            reserved_at_ms: Some(1_000),
        }
    }

    fn row(standing: Standing) -> MysqlOrder {
        MysqlOrder {
            identity: identity(),
            goods_id: "g".into(),
            standing: Some(standing),
            reserved_at_ms: 1_000,
        }
    }

    /// What each event does to its order: its state and (reason, units returned).
    type Step = (OrderState, Option<(ReleaseReason, bool)>);

    fn kinds(events: Option<Vec<SaleEvent>>) -> Option<Vec<Step>> {
        events.map(|e| e.iter().map(|e| (e.order_state(), e.release())).collect())
    }

    const ENDS: [Standing; 3] = [
        Standing::Confirmed,
        Standing::Released {
            reason: REASON,
            returned: true,
        },
        Standing::Released {
            reason: REASON,
            returned: false,
        },
    ];

    /// A missing order gets its reservation (at its time) and then exactly its end.
    #[test]
    fn a_missing_order_gets_its_whole_history() {
        let events = replay("g", &redis(Standing::Reserved), None, 9).unwrap();
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].at_ms(), 1_000, "reserved at its own time");
        for end in ENDS {
            let history = kinds(replay("g", &redis(end), None, 9)).unwrap();
            assert_eq!(history.len(), 2, "{end}");
            assert_eq!(history[0], (OrderState::Reserved, None));
            let expected = Standing::from_row(
                history[1].0.as_str(),
                history[1].1.map(|(r, _)| r.as_str()),
                history[1].1.map(|(_, returned)| returned),
            );
            assert_eq!(expected, Some(end));
        }
    }

    /// An ended order in MySQL is never sent back to reserved, nor ended again.
    #[test]
    fn an_ended_row_is_never_reopened() {
        for mysql in ENDS {
            for redis_state in [Standing::Reserved].into_iter().chain(ENDS) {
                assert!(
                    replay("g", &redis(redis_state), Some(&row(mysql)), 9).is_none(),
                    "MySQL {mysql}, Redis {redis_state}"
                );
            }
        }
        // A reserved row Redis ended gets only its end; one Redis holds live gets nothing.
        for end in ENDS {
            let events = kinds(replay("g", &redis(end), Some(&row(Standing::Reserved)), 9));
            assert_eq!(events.map(|e| e.len()), Some(1), "{end}");
        }
        assert!(replay(
            "g",
            &redis(Standing::Reserved),
            Some(&row(Standing::Reserved)),
            9
        )
        .is_none());
    }

    /// Another buyer, request or quantity in MySQL, or a Redis that knows too little: nothing.
    #[test]
    fn conflicts_and_unknowns_are_left_alone() {
        let mut other = row(Standing::Reserved);
        other.identity.user_id = "intruder".into();
        assert!(replay("g", &redis(Standing::Confirmed), Some(&other), 9).is_none());
        let mut unknown = redis(Standing::Confirmed);
        unknown.identity = None;
        assert!(replay("g", &unknown, None, 9).is_none());
        let mut stateless = redis(Standing::Confirmed);
        stateless.standing = None;
        assert!(replay("g", &stateless, None, 9).is_none());
    }
}
