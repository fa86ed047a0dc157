//! One order as each store holds it, and the bounded reads that fetch orders: MySQL's rows by
//! id or in primary-key pages of one goods' round, Redis's live and settled entries by id, on
//! the keyspace that holds each ([`Placement`]). Shared by the order digest, `--repair` and the
//! MySQL sweep of forgotten reservations.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use crate::RedisConn;
use serde::{Serialize, Serializer};
use sqlx::mysql::MySqlRow;
use sqlx::{MySql, MySqlPool, QueryBuilder, Row};

use crate::events::SaleEvent;
use crate::keys::{order_parts, shard_id, shard_of_sequence, GoodsKeys, KeySpace};
use crate::order::{OrderState, ReleaseReason};

/// Orders per Redis page (HSCAN COUNT, HMGET fields) and per MySQL page or `IN (...)` list:
/// bounds the memory of every walk over a goods' orders.
pub const PAGE_ORDERS: usize = 1_000;
const REDIS_TIMEOUT: Duration = Duration::from_secs(5);

/// Where an order stands, as both stores can say it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standing {
    Reserved,
    Confirmed,
    /// Ended unpaid for `reason`; `returned`: its units went back on sale (else they lapsed).
    Released {
        reason: ReleaseReason,
        returned: bool,
    },
}

impl Standing {
    /// As Redis's settled hash says it, with whether the order is in the lapsed set.
    pub fn from_settled(text: &str, lapsed: bool) -> Option<Standing> {
        match crate::lifecycle::parse_final(text)? {
            (OrderState::Confirmed, _) => Some(Standing::Confirmed),
            (OrderState::Released, Some(reason)) => Some(Standing::Released {
                reason,
                returned: !lapsed,
            }),
            _ => None,
        }
    }

    /// As a MySQL row says it (`state`, `release_reason`, `stock_returned`); None for values
    /// this syncer does not write.
    pub fn from_row(state: &str, reason: Option<&str>, returned: Option<bool>) -> Option<Standing> {
        match OrderState::parse(state)? {
            OrderState::Reserved => Some(Standing::Reserved),
            OrderState::Confirmed => Some(Standing::Confirmed),
            OrderState::Released => Some(Standing::Released {
                reason: ReleaseReason::parse(reason?)?,
                returned: returned?,
            }),
        }
    }

    /// The event that brings a reserved order to this standing (None: it is reserved).
    pub fn end_event(self, order: &Identity, goods_id: &str, at_ms: i64) -> Option<SaleEvent> {
        match self {
            Standing::Reserved => None,
            Standing::Confirmed => Some(SaleEvent::Confirmed {
                order_id: order.order_id.clone(),
                goods_id: goods_id.to_owned(),
                user_id: order.user_id.clone(),
                quantity: order.quantity,
                at_ms,
            }),
            Standing::Released { reason, returned } => {
                Some(release_event(order, goods_id, reason, returned, at_ms))
            }
        }
    }
}

/// The event that releases a reserved order: `released` (units back on sale) or `lapsed`.
pub fn release_event(
    order: &Identity,
    goods_id: &str,
    reason: ReleaseReason,
    returned: bool,
    at_ms: i64,
) -> SaleEvent {
    let (order_id, goods_id) = (order.order_id.clone(), goods_id.to_owned());
    let (user_id, quantity) = (order.user_id.clone(), order.quantity);
    if returned {
        SaleEvent::Released {
            order_id,
            goods_id,
            user_id,
            quantity,
            reason,
            at_ms,
        }
    } else {
        SaleEvent::Lapsed {
            order_id,
            goods_id,
            user_id,
            quantity,
            reason,
            at_ms,
        }
    }
}

impl std::fmt::Display for Standing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Standing::Reserved => f.write_str("reserved"),
            Standing::Confirmed => f.write_str("confirmed"),
            Standing::Released {
                reason,
                returned: true,
            } => write!(f, "released:{reason}"),
            Standing::Released {
                reason,
                returned: false,
            } => write!(f, "released:{reason} (lapsed)"),
        }
    }
}

impl Serialize for Standing {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

/// Who an order belongs to: what the writer refuses to change once written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Identity {
    pub order_id: String,
    pub user_id: String,
    pub request_id: String,
    pub quantity: u32,
}

/// An order row of MySQL.
#[derive(Debug, Clone, Serialize)]
pub struct MysqlOrder {
    #[serde(flatten)]
    pub identity: Identity,
    pub goods_id: String,
    /// None when the row holds a state, reason or flag this syncer never writes.
    pub standing: Option<Standing>,
    pub reserved_at_ms: i64,
}

/// An order as Redis holds it. Redis may know only part of it: an order released for
/// `upstream_failed` or `unclaimed` whose request then won again is named by no request, so
/// only its final state is left.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RedisOrder {
    pub identity: Option<Identity>,
    /// None: Redis names the order but holds neither a reservation nor an end for it.
    pub standing: Option<Standing>,
    /// When it was reserved (live reservations only: the record is dropped when it ends).
    pub reserved_at_ms: Option<i64>,
}

const ROW_COLUMNS: &str = "SELECT order_id, goods_id, user_id, request_id, quantity, state, \
     release_reason, stock_returned, reserved_at FROM orders";

fn read_row(row: &MySqlRow) -> sqlx::Result<MysqlOrder> {
    let state: String = row.try_get("state")?;
    let reason: Option<String> = row.try_get("release_reason")?;
    let reserved_at: chrono::NaiveDateTime = row.try_get("reserved_at")?;
    Ok(MysqlOrder {
        identity: Identity {
            order_id: row.try_get("order_id")?,
            user_id: row.try_get("user_id")?,
            request_id: row.try_get("request_id")?,
            quantity: row.try_get("quantity")?,
        },
        goods_id: row.try_get("goods_id")?,
        standing: Standing::from_row(&state, reason.as_deref(), row.try_get("stock_returned")?),
        reserved_at_ms: reserved_at.and_utc().timestamp_millis(),
    })
}

/// MySQL's rows of these orders, by order id.
pub async fn rows_by_id(
    mysql: &MySqlPool,
    order_ids: &[&str],
) -> sqlx::Result<HashMap<String, MysqlOrder>> {
    let mut rows = HashMap::with_capacity(order_ids.len());
    for chunk in order_ids.chunks(PAGE_ORDERS) {
        let mut select = QueryBuilder::<MySql>::new(ROW_COLUMNS);
        select.push(" WHERE order_id IN (");
        let mut ids = select.separated(", ");
        for id in chunk {
            ids.push_bind(*id);
        }
        select.push(")");
        for row in select.build().fetch_all(mysql).await? {
            let order = read_row(&row)?;
            rows.insert(order.identity.order_id.clone(), order);
        }
    }
    Ok(rows)
}

/// The orders of one goods, of one round (epoch) or of all: one primary-key range, since an
/// order id is `goods.epoch.sequence` (the orders table has no secondary index, on purpose).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrderRange {
    pub goods_id: String,
    pub epoch: Option<u64>,
    /// Every order id of the range sorts after `from` and before `until`: '/' follows '.'.
    from: String,
    until: String,
}

impl OrderRange {
    pub fn new(goods_id: &str, epoch: Option<u64>) -> OrderRange {
        let base = match epoch {
            Some(epoch) => format!("{goods_id}.{epoch}"),
            None => goods_id.to_owned(),
        };
        OrderRange {
            goods_id: goods_id.to_owned(),
            epoch,
            from: format!("{base}."),
            until: format!("{base}/"),
        }
    }

    /// Bounds for `order_id > from AND order_id < until`.
    pub fn bounds(&self) -> (&str, &str) {
        (&self.from, &self.until)
    }

    pub fn contains(&self, order_id: &str) -> bool {
        order_parts(order_id).is_some_and(|(goods, epoch, _)| {
            goods == self.goods_id && self.epoch.is_none_or(|e| e == epoch)
        })
    }

    /// The next page of rows after `after` (None: from the start), in primary-key order. A
    /// goods whose id extends this one ("g.1" after "g") shares the key range; its rows are
    /// filtered out by `goods_id`.
    pub async fn page(
        &self,
        mysql: &MySqlPool,
        after: Option<&str>,
    ) -> sqlx::Result<Vec<MysqlOrder>> {
        let query = format!(
            "{ROW_COLUMNS} WHERE order_id > ? AND order_id < ? AND goods_id = ? \
             ORDER BY order_id LIMIT {PAGE_ORDERS}"
        );
        sqlx::query(&query)
            .bind(after.unwrap_or(&self.from))
            .bind(&self.until)
            .bind(&self.goods_id)
            .fetch_all(mysql)
            .await?
            .iter()
            .map(read_row)
            .collect()
    }

    /// Whether MySQL holds any row in the range.
    pub async fn any_rows(&self, mysql: &MySqlPool) -> sqlx::Result<bool> {
        let row = sqlx::query(
            "SELECT 1 FROM orders WHERE order_id > ? AND order_id < ? AND goods_id = ? LIMIT 1",
        )
        .bind(&self.from)
        .bind(&self.until)
        .bind(&self.goods_id)
        .fetch_optional(mysql)
        .await?;
        Ok(row.is_some())
    }
}

/// Where a goods' orders live in Redis: all in the goods' own keyspace, or, for a
/// `redis_sharded` goods, each in the keyspace of the shard that issued it, which its sequence
/// names (`local * shards + shard`, `keys::shard_of_sequence`). MySQL holds one goods either way.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    pub goods_id: String,
    /// The shard count of a `redis_sharded` goods.
    pub shards: Option<u32>,
}

impl Placement {
    /// How many keyspaces hold the goods' orders.
    pub fn keyspaces(&self) -> usize {
        self.shards.map_or(1, |shards| shards as usize)
    }

    /// The id keyspace `index` is keyed by: the goods, or its shard `index`.
    pub fn key_id(&self, index: usize) -> String {
        match self.shards {
            None => self.goods_id.clone(),
            Some(_) => shard_id(&self.goods_id, index as u32),
        }
    }

    /// The keyspace that holds an order; None for an id that names no shard.
    pub fn index_of(&self, order_id: &str) -> Option<usize> {
        match self.shards {
            None => Some(0),
            Some(shards) => order_parts(order_id)
                .map(|(_, _, sequence)| shard_of_sequence(sequence, shards) as usize),
        }
    }
}

/// What Redis holds for each of some orders of one goods, index for index.
#[derive(Debug, Default)]
pub struct RedisEntries {
    /// The reservations record (`user|quantity|reserved_at_ms`) of a live order.
    pub live: Vec<Option<String>>,
    /// The settled hash's value of an ended order.
    pub settled: Vec<Option<String>>,
    /// In the lapsed set.
    pub lapsed: Vec<bool>,
}

impl RedisEntries {
    /// Reads them in one round trip.
    pub async fn read(
        redis: &RedisConn,
        keys: &GoodsKeys,
        order_ids: &[&str],
    ) -> anyhow::Result<RedisEntries> {
        if order_ids.is_empty() {
            return Ok(RedisEntries::default());
        }
        let mut conn = redis.clone();
        let mut pipe = redis::pipe();
        pipe.cmd("HMGET").arg(&keys.reservations).arg(order_ids);
        pipe.cmd("HMGET").arg(&keys.settled).arg(order_ids);
        pipe.cmd("SMISMEMBER")
            .arg(&keys.lapsed_orders)
            .arg(order_ids);
        let (live, settled, lapsed) =
            tokio::time::timeout(REDIS_TIMEOUT, pipe.query_async(&mut conn)).await??;
        Ok(RedisEntries {
            live,
            settled,
            lapsed,
        })
    }

    /// Reads each order on the keyspace that holds it: one round trip per keyspace named. An
    /// order that names no keyspace has nothing.
    pub async fn read_placed(
        redis: &RedisConn,
        space: &KeySpace,
        placement: &Placement,
        order_ids: &[&str],
    ) -> anyhow::Result<RedisEntries> {
        let mut by_keyspace: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
        for (i, id) in order_ids.iter().enumerate() {
            if let Some(index) = placement.index_of(id) {
                by_keyspace.entry(index).or_default().push(i);
            }
        }
        let mut all = RedisEntries {
            live: vec![None; order_ids.len()],
            settled: vec![None; order_ids.len()],
            lapsed: vec![false; order_ids.len()],
        };
        for (index, positions) in by_keyspace {
            let keys = space.goods(&placement.key_id(index));
            let ids: Vec<&str> = positions.iter().map(|&i| order_ids[i]).collect();
            let mut found = RedisEntries::read(redis, &keys, &ids).await?;
            for (j, &i) in positions.iter().enumerate() {
                all.live[i] = found.live.get_mut(j).and_then(Option::take);
                all.settled[i] = found.settled.get_mut(j).and_then(Option::take);
                all.lapsed[i] = found.lapsed.get(j).copied().unwrap_or(false);
            }
        }
        Ok(all)
    }

    /// Redis knows order `i`: it is live or has ended.
    pub fn knows(&self, i: usize) -> bool {
        self.live.get(i).is_some_and(Option::is_some)
            || self.settled.get(i).is_some_and(Option::is_some)
    }

    /// Where order `i` stands and when it was reserved, as far as Redis says.
    pub fn standing(&self, i: usize) -> (Option<Standing>, Option<i64>) {
        if let Some(Some(record)) = self.live.get(i) {
            let reserved_at = crate::keys::Record::parse(record).and_then(|r| r.rest.parse().ok());
            return (Some(Standing::Reserved), reserved_at);
        }
        let settled = self.settled.get(i).and_then(Option::as_deref);
        let lapsed = self.lapsed.get(i).copied().unwrap_or(false);
        (
            settled.and_then(|s| Standing::from_settled(s, lapsed)),
            None,
        )
    }
}

/// The pages of a Redis hash, read with HSCAN (COUNT [`PAGE_ORDERS`]): every entry present
/// all along comes at least once (one may come twice while the hash grows).
pub struct HashPages {
    key: String,
    /// None once HSCAN has handed the cursor back as "0": the walk is over.
    cursor: Option<String>,
}

impl HashPages {
    pub fn new(key: &str) -> HashPages {
        HashPages {
            key: key.to_owned(),
            cursor: Some("0".to_owned()),
        }
    }

    /// The next page of (field, value) pairs; None after the last.
    pub async fn next(
        &mut self,
        redis: &RedisConn,
    ) -> anyhow::Result<Option<Vec<(String, String)>>> {
        let Some(cursor) = &self.cursor else {
            return Ok(None);
        };
        let mut conn = redis.clone();
        let (next, entries): (String, Vec<(String, String)>) = tokio::time::timeout(
            REDIS_TIMEOUT,
            redis::cmd("HSCAN")
                .arg(&self.key)
                .arg(cursor)
                .arg("COUNT")
                .arg(PAGE_ORDERS)
                .query_async(&mut conn),
        )
        .await??;
        self.cursor = (next != "0").then_some(next);
        Ok(Some(entries))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn standings_read_alike_from_both_stores() {
        let released = |reason, returned| Standing::Released { reason, returned };
        // (settled hash value, in the lapsed set, MySQL row) -> the same standing.
        let cases = [
            (
                "released:expired",
                false,
                ("released", Some("expired"), Some(true)),
                released(ReleaseReason::Expired, true),
            ),
            (
                "released:cancelled",
                true,
                ("released", Some("cancelled"), Some(false)),
                released(ReleaseReason::Cancelled, false),
            ),
            (
                "confirmed",
                false,
                ("confirmed", None, None),
                Standing::Confirmed,
            ),
        ];
        for (settled, lapsed, (state, reason, returned), standing) in cases {
            assert_eq!(Standing::from_settled(settled, lapsed), Some(standing));
            assert_eq!(Standing::from_row(state, reason, returned), Some(standing));
        }
        assert_eq!(
            Standing::from_row("reserved", None, None),
            Some(Standing::Reserved)
        );
        assert_eq!(Standing::from_row("released", None, Some(true)), None);
        assert_eq!(Standing::from_row("paid", None, None), None);
        let lapsed = released(ReleaseReason::Cancelled, false);
        assert_eq!(lapsed.to_string(), "released:cancelled (lapsed)");
    }

    #[test]
    fn each_end_has_its_event() {
        let order = Identity {
            order_id: "g.1.7".into(),
            user_id: "u1".into(),
            request_id: "r1".into(),
            quantity: 2,
        };
        let event = |s: Standing| s.end_event(&order, "g", 5);
        assert_eq!(event(Standing::Reserved), None);
        let confirmed = event(Standing::Confirmed).unwrap();
        assert_eq!(confirmed.order_state(), OrderState::Confirmed);
        for (returned, kind) in [(true, "released"), (false, "lapsed")] {
            let end = event(Standing::Released {
                reason: ReleaseReason::Unclaimed,
                returned,
            })
            .unwrap();
            assert_eq!(end.release(), Some((ReleaseReason::Unclaimed, returned)));
            let json = String::from_utf8(end.to_json()).unwrap();
            assert!(json.contains(&format!(r#""type":"{kind}""#)), "{json}");
        }
    }

    #[test]
    fn a_sharded_goods_places_each_order_on_the_shard_that_issued_it() {
        let one = Placement {
            goods_id: "g".into(),
            shards: None,
        };
        assert_eq!((one.keyspaces(), one.key_id(0)), (1, "g".to_owned()));
        assert_eq!(one.index_of("g.1.8"), Some(0));
        let three = Placement {
            goods_id: "g".into(),
            shards: Some(3),
        };
        assert_eq!(three.keyspaces(), 3);
        assert_eq!(three.key_id(2), shard_id("g", 2));
        // Shard 2 issues 2, 5, 8, ...; shard 0 issues 3, 6, ...
        assert_eq!(three.index_of("g.1.8"), Some(2));
        assert_eq!(three.index_of("g.1.6"), Some(0));
        assert_eq!(three.index_of("g.1.x"), None);
    }

    #[test]
    fn a_range_holds_one_goods_round() {
        let round = OrderRange::new("g", Some(1));
        assert!(round.contains("g.1.5"));
        assert!(!round.contains("g.10.5"));
        assert!(!round.contains("g.1.x.1.5"));
        assert!(!round.contains("h.1.5"));
        let all = OrderRange::new("g", None);
        assert!(all.contains("g.10.5") && !all.contains("g.x.1.5"));
        // The bounds sort around every id of the range, and not around a later epoch's.
        assert!(round.from.as_str() < "g.1.5" && "g.1.99" < round.until.as_str());
        assert!("g.10.1" > round.until.as_str());
    }
}
