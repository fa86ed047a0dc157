//! The order-level digest: each order of a goods' current round as Redis holds it (buyer,
//! request id, quantity, state) against MySQL's row. The totals cannot see an order id that
//! names another buyer in MySQL, or a row in the wrong state; this can.
//!
//! Redis rebuilds an order from: `requests` (request id -> `user|quantity|order`: the order
//! each request won last), `reservations` (the live ones), `settled` (how the others ended) and
//! `lapsed_orders` (which releases let their units lapse). An order released for
//! `upstream_failed` or `unclaimed` whose request won again later is named by no request any
//! more: only its end is left, so MySQL missing it is counted (`unreplayable`) but it cannot be
//! rebuilt.
//!
//! A `redis_sharded` goods keeps its orders in K keyspaces, one per shard (`G~0`..`G~K-1`,
//! `shard.rs`), each of the layout above; MySQL holds one goods. The digest walks every shard's
//! hashes and looks each MySQL row up on the shard that issued it (its sequence names it:
//! [`Placement`]). Shards are loaded under the goods' epoch together; the round compared is
//! the highest epoch any shard holds (a shard that forgot its sale holds none: its rows are
//! missing from Redis).
//!
//! Three walks, each in pages of [`PAGE_ORDERS`]: the requests hash (HSCAN, each shard's in
//! turn) with one HMGET round trip and one MySQL `IN` lookup per page; the settled hash the
//! same way; MySQL's rows of the round by primary key, with one HMGET round trip per page and
//! shard. So it reads every order of the round on both sides, in memory bounded by a page plus
//! the goods' outboxes (see [`IN_FLIGHT_MAX`]); a million orders take seconds, which is why it
//! is a command (`reconcile --orders`, `--repair`) and not part of the metric loop.
//!
//! Events still in an outbox are not drift: an order with any is compared as MySQL should
//! hold it before them. Events in Kafka make the report unsettled, and its findings are final
//! only once it is settled. HSCAN may return an entry twice while its hash grows, so counts are
//! exact at rest. Orders issued after the digest began wait for the next: each keyspace's
//! sequence is read before its outbox, and an order is compared when its sequence is not above
//! the last one the keyspace that issued it had handed out (each shard counts its own).

use std::collections::HashMap;

use serde::Serialize;

use super::orders::{
    HashPages, Identity, MysqlOrder, OrderRange, Placement, RedisEntries, RedisOrder, Standing,
    PAGE_ORDERS,
};
use super::Reconciler;
use crate::events::SaleEvent;
use crate::keys::{last_issued, order_parts, GoodsKeys, Record};

/// Outbox events the digest holds in memory (order id -> whether the first is its
/// reservation); a goods with more in its outboxes (all its shards' together) is compared
/// once the relay has caught up.
pub const IN_FLIGHT_MAX: usize = 200_000;
/// Findings kept word for word per goods; all of them are counted.
const EXAMPLES_MAX: usize = 20;

/// What the digest found about one order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// Redis granted it; MySQL has no row.
    MissingFromMysql,
    /// MySQL has a row of the round that Redis neither holds live nor ended.
    MissingFromRedis,
    /// Both have it, with another buyer, request id or quantity: a reissued order id.
    IdentityDiffers,
    /// Both have it, in different states.
    StateDiffers,
}

#[derive(Debug, Clone, Serialize)]
pub struct Finding {
    pub kind: Kind,
    pub order_id: String,
    pub redis: Option<RedisOrder>,
    pub mysql: Option<MysqlOrder>,
}

/// Receives each finding as the walk makes it (the report ignores them; repair acts on them).
pub(crate) trait Sink {
    async fn found(&mut self, goods_id: &str, finding: &Finding) -> anyhow::Result<()>;
}

/// For the report: the counts and examples are enough.
pub(crate) struct CountOnly;

impl Sink for CountOnly {
    async fn found(&mut self, _goods_id: &str, _finding: &Finding) -> anyhow::Result<()> {
        Ok(())
    }
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct OrderDigest {
    /// The round compared (None: Redis has no sale, so every MySQL row is unmatched).
    pub epoch: Option<u64>,
    /// A `redis_sharded` goods: the shards walked, each order on the one that issued it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shards: Option<u32>,
    pub redis_live: u64,
    pub redis_settled: u64,
    pub mysql_rows: u64,
    /// Orders with events still in the outbox (compared as MySQL should hold them now).
    pub in_flight: u64,
    pub missing_from_mysql: u64,
    pub missing_from_redis: u64,
    pub identity_differs: u64,
    pub state_differs: u64,
    /// Of `missing_from_mysql`: ended orders of which Redis keeps only the end.
    pub unreplayable: u64,
    /// Why the goods was not compared this time.
    pub postponed: Option<String>,
    pub examples: Vec<Finding>,
}

impl OrderDigest {
    pub fn differences(&self) -> u64 {
        self.missing_from_mysql
            + self.missing_from_redis
            + self.identity_differs
            + self.state_differs
    }

    pub fn is_clean(&self) -> bool {
        self.differences() == 0 && self.postponed.is_none()
    }
}

impl Reconciler {
    /// Compares every order of the goods' current round; hands each finding to `sink`.
    pub(crate) async fn digest<S: Sink>(
        &self,
        goods_id: &str,
        sink: &mut S,
    ) -> anyhow::Result<OrderDigest> {
        let placement = self.placement(goods_id).await?;
        // Each keyspace's sequence first, then the outboxes: every order up to a keyspace's
        // sequence has its reservation event either in its outbox as read below, or already
        // past it.
        let mut sides = Vec::with_capacity(placement.keyspaces());
        let mut epoch = None;
        for index in 0..placement.keyspaces() {
            let keys = self.keys.goods(&placement.key_id(index));
            let mut conn = self.redis.clone();
            let (side_epoch, seq, shards, shard): (Option<u64>, Option<u64>, _, _) =
                tokio::time::timeout(
                    super::REDIS_TIMEOUT,
                    redis::cmd("HMGET")
                        .arg(&keys.sale)
                        .arg(&["epoch", "seq", "shards", "shard"])
                        .query_async(&mut conn),
                )
                .await??;
            epoch = epoch.max(side_epoch);
            sides.push(Side {
                keys,
                last_sequence: last_issued(seq.unwrap_or(0), shards, shard),
            });
        }
        let in_flight = match epoch {
            Some(_) => self.in_flight_orders(&placement).await?,
            None => Some(HashMap::new()),
        };
        let mut walk = Walk {
            reconciler: self,
            goods_id,
            range: OrderRange::new(goods_id, epoch),
            digest: OrderDigest {
                epoch,
                shards: placement.shards,
                ..OrderDigest::default()
            },
            placement,
            sides,
            in_flight: HashMap::new(),
            sink,
            settled_named_missing: 0,
            settled_missing: 0,
        };
        let Some(in_flight) = in_flight else {
            walk.digest.postponed = Some(format!(
                "its outbox holds more than {IN_FLIGHT_MAX} events; compare once it drains"
            ));
            return Ok(walk.digest);
        };
        walk.digest.in_flight = in_flight.len() as u64;
        walk.in_flight = in_flight;
        if epoch.is_some() {
            walk.requests().await?;
            walk.settled().await?;
        }
        walk.rows().await?;
        let unreplayable = walk
            .settled_missing
            .saturating_sub(walk.settled_named_missing);
        walk.digest.unreplayable = unreplayable;
        walk.digest.missing_from_mysql += unreplayable;
        Ok(walk.digest)
    }

    /// Where the goods' orders live. MySQL's definition says whether it is sharded (a shard
    /// count Redis keeps on every shard, so one that forgot cannot hide it); a goods MySQL
    /// does not define is sharded when its shard 0 says so.
    pub(crate) async fn placement(&self, goods_id: &str) -> anyhow::Result<Placement> {
        let defined: Option<(String, Option<u8>)> =
            sqlx::query_as("SELECT tier, shards FROM sales WHERE goods_id = ?")
                .bind(goods_id)
                .fetch_optional(&self.mysql)
                .await?;
        let shards = match defined {
            Some((tier, shards)) => shards.filter(|_| tier == "redis_sharded").map(u32::from),
            None => {
                let first = self.keys.goods(&crate::keys::shard_id(goods_id, 0)).sale;
                let mut conn = self.redis.clone();
                tokio::time::timeout(
                    super::REDIS_TIMEOUT,
                    redis::cmd("HGET")
                        .arg(&first)
                        .arg("shards")
                        .query_async::<Option<u32>>(&mut conn),
                )
                .await??
            }
        };
        Ok(Placement {
            goods_id: goods_id.to_owned(),
            // Bounds the walk over the shards whatever a store holds.
            shards: shards.map(|s| s.clamp(1, crate::sale::SHARDS_MAX)),
        })
    }

    /// Orders with events in the goods' outboxes (each shard's): whether the first is the
    /// reservation (MySQL should not have the order yet) or an end (MySQL should hold it
    /// reserved). None when they hold more than [`IN_FLIGHT_MAX`] events together.
    async fn in_flight_orders(
        &self,
        placement: &Placement,
    ) -> anyhow::Result<Option<HashMap<String, bool>>> {
        let mut orders = HashMap::new();
        let mut events = 0u64;
        for index in 0..placement.keyspaces() {
            let budget = IN_FLIGHT_MAX.saturating_sub(events as usize);
            events += self
                .for_each_outbox_event(&placement.key_id(index), budget, |event| {
                    if let Some(event) = event {
                        let reserved = matches!(event, SaleEvent::Reserved { .. });
                        orders
                            .entry(event.order_id().to_owned())
                            .or_insert(reserved);
                    }
                })
                .await?;
            if events > IN_FLIGHT_MAX as u64 {
                return Ok(None);
            }
        }
        Ok(Some(orders))
    }
}

/// One keyspace the digest walks: the goods' own, or one shard's.
struct Side {
    keys: GoodsKeys,
    /// The last sequence it had issued when the digest began.
    last_sequence: u64,
}

struct Walk<'a, S> {
    reconciler: &'a Reconciler,
    goods_id: &'a str,
    placement: Placement,
    /// Index for index with the placement's keyspaces.
    sides: Vec<Side>,
    range: OrderRange,
    in_flight: HashMap<String, bool>,
    digest: OrderDigest,
    sink: &'a mut S,
    /// Ended orders MySQL lacks, counted by the requests walk (named) and by the settled walk
    /// (all): the difference is the ones no request names.
    settled_named_missing: u64,
    settled_missing: u64,
}

impl<S: Sink> Walk<'_, S> {
    /// An order of the compared round, issued before the digest began by the keyspace that
    /// issued it.
    fn compared(&self, order_id: &str) -> bool {
        let issuer = self
            .placement
            .index_of(order_id)
            .and_then(|i| self.sides.get(i));
        self.range.contains(order_id)
            && order_parts(order_id).is_some_and(|(_, _, sequence)| {
                issuer.is_some_and(|side| sequence <= side.last_sequence)
            })
    }

    async fn found(
        &mut self,
        kind: Kind,
        order_id: &str,
        redis: Option<RedisOrder>,
        mysql: Option<MysqlOrder>,
    ) -> anyhow::Result<()> {
        let counter = match kind {
            Kind::MissingFromMysql => &mut self.digest.missing_from_mysql,
            Kind::MissingFromRedis => &mut self.digest.missing_from_redis,
            Kind::IdentityDiffers => &mut self.digest.identity_differs,
            Kind::StateDiffers => &mut self.digest.state_differs,
        };
        *counter += 1;
        let finding = Finding {
            kind,
            order_id: order_id.to_owned(),
            redis,
            mysql,
        };
        self.sink.found(self.goods_id, &finding).await?;
        if self.digest.examples.len() < EXAMPLES_MAX {
            self.digest.examples.push(finding);
        }
        Ok(())
    }

    /// Every order a request names, on each keyspace: identity, and the state of the live
    /// ones (ended ones are compared by the settled walk, which also sees those no request
    /// names). A request and its order live on one keyspace (a buyer's home shard issues
    /// their orders).
    async fn requests(&mut self) -> anyhow::Result<()> {
        for side in 0..self.sides.len() {
            self.requests_of(side).await?;
        }
        Ok(())
    }

    async fn requests_of(&mut self, side: usize) -> anyhow::Result<()> {
        let mut pages = HashPages::new(&self.sides[side].keys.requests);
        while let Some(entries) = pages.next(&self.reconciler.redis).await? {
            let named: Vec<Identity> = entries
                .iter()
                .filter_map(|(request_id, record)| {
                    let record = Record::parse(record)?;
                    self.compared(record.rest).then(|| Identity {
                        order_id: record.rest.to_owned(),
                        user_id: record.user_id.to_owned(),
                        request_id: request_id.clone(),
                        quantity: record.quantity,
                    })
                })
                .collect();
            self.named_page(side, named).await?;
        }
        Ok(())
    }

    async fn named_page(&mut self, side: usize, named: Vec<Identity>) -> anyhow::Result<()> {
        let ids: Vec<&str> = named.iter().map(|n| n.order_id.as_str()).collect();
        let keys = &self.sides[side].keys;
        let entries = RedisEntries::read(&self.reconciler.redis, keys, &ids).await?;
        let mut rows = super::orders::rows_by_id(&self.reconciler.mysql, &ids).await?;
        for (i, identity) in named.into_iter().enumerate() {
            let order_id = identity.order_id.clone();
            let (standing, reserved_at_ms) = entries.standing(i);
            let live = standing == Some(Standing::Reserved);
            self.digest.redis_live += u64::from(live);
            let in_flight = self.in_flight.get(&order_id).copied();
            if in_flight == Some(true) {
                // Its reservation is still on its way: MySQL must not have it yet.
                continue;
            }
            let redis = RedisOrder {
                identity: Some(identity),
                standing,
                reserved_at_ms,
            };
            let Some(row) = rows.remove(&order_id) else {
                if standing.is_some() && !live && in_flight.is_none() {
                    self.settled_named_missing += 1;
                }
                self.found(Kind::MissingFromMysql, &order_id, Some(redis), None)
                    .await?;
                continue;
            };
            let kind = if redis.identity.as_ref() != Some(&row.identity) {
                Some(Kind::IdentityDiffers)
            } else if standing.is_none()
                || (live && in_flight.is_none() && row.standing != standing)
            {
                Some(Kind::StateDiffers)
            } else {
                None
            };
            if let Some(kind) = kind {
                self.found(kind, &order_id, Some(redis), Some(row)).await?;
            }
        }
        Ok(())
    }

    /// Every ended order, on each keyspace: its state against MySQL's.
    async fn settled(&mut self) -> anyhow::Result<()> {
        for side in 0..self.sides.len() {
            let mut pages = HashPages::new(&self.sides[side].keys.settled);
            while let Some(entries) = pages.next(&self.reconciler.redis).await? {
                let ended: Vec<String> = entries
                    .into_iter()
                    .map(|(order_id, _)| order_id)
                    .filter(|order_id| self.compared(order_id))
                    .collect();
                self.settled_page(side, &ended).await?;
            }
        }
        Ok(())
    }

    async fn settled_page(&mut self, side: usize, ended: &[String]) -> anyhow::Result<()> {
        let ids: Vec<&str> = ended.iter().map(String::as_str).collect();
        let keys = &self.sides[side].keys;
        let entries = RedisEntries::read(&self.reconciler.redis, keys, &ids).await?;
        let rows = super::orders::rows_by_id(&self.reconciler.mysql, &ids).await?;
        // The buyer and quantity of each row's request as Redis holds them: a retried
        // request keeps both, so they hold for each order the request won.
        let requests: Vec<&str> = ids
            .iter()
            .filter_map(|id| rows.get(*id).map(|r| r.identity.request_id.as_str()))
            .collect();
        let records = self.request_records(side, &requests).await?;
        for (i, order_id) in ids.iter().enumerate() {
            let (standing, _) = entries.standing(i);
            if entries.settled.get(i).is_some_and(Option::is_some)
                && standing != Some(Standing::Reserved)
            {
                self.digest.redis_settled += 1;
            } else {
                continue; // live again, or ended between the scan and the read
            }
            if self.in_flight.contains_key(*order_id) {
                continue;
            }
            let Some(row) = rows.get(*order_id) else {
                self.settled_missing += 1;
                continue;
            };
            let identity = records.get(&row.identity.request_id).and_then(|record| {
                let record = Record::parse(record)?;
                Some(Identity {
                    order_id: row.identity.order_id.clone(),
                    user_id: record.user_id.to_owned(),
                    request_id: row.identity.request_id.clone(),
                    quantity: record.quantity,
                })
            });
            let named_here = records
                .get(&row.identity.request_id)
                .and_then(|r| Record::parse(r))
                .is_some_and(|r| r.rest == *order_id);
            let redis = RedisOrder {
                identity,
                standing,
                reserved_at_ms: None,
            };
            // A named order's identity was compared by the requests walk.
            let kind = if !named_here && redis.identity.as_ref().is_some_and(|i| *i != row.identity)
            {
                Some(Kind::IdentityDiffers)
            } else if row.standing != standing {
                Some(Kind::StateDiffers)
            } else {
                None
            };
            if let Some(kind) = kind {
                self.found(kind, order_id, Some(redis), Some(row.clone()))
                    .await?;
            }
        }
        Ok(())
    }

    async fn request_records(
        &self,
        side: usize,
        request_ids: &[&str],
    ) -> anyhow::Result<HashMap<String, String>> {
        if request_ids.is_empty() {
            return Ok(HashMap::new());
        }
        let mut conn = self.reconciler.redis.clone();
        let records: Vec<Option<String>> = tokio::time::timeout(
            super::REDIS_TIMEOUT,
            redis::cmd("HMGET")
                .arg(&self.sides[side].keys.requests)
                .arg(request_ids)
                .query_async(&mut conn),
        )
        .await??;
        Ok(request_ids
            .iter()
            .zip(records)
            .filter_map(|(id, record)| Some(((*id).to_owned(), record?)))
            .collect())
    }

    /// Every MySQL row of the round: Redis must know it, on the keyspace that issued it.
    async fn rows(&mut self) -> anyhow::Result<()> {
        let mut after: Option<String> = None;
        // Keyset pages by primary key: each page starts after the last; a short page is the last.
        loop {
            let page = self
                .range
                .page(&self.reconciler.mysql, after.as_deref())
                .await?;
            self.digest.mysql_rows += page.len() as u64;
            let ids: Vec<&str> = page.iter().map(|r| r.identity.order_id.as_str()).collect();
            let entries = RedisEntries::read_placed(
                &self.reconciler.redis,
                &self.reconciler.keys,
                &self.placement,
                &ids,
            )
            .await?;
            for (i, row) in page.iter().enumerate() {
                if !entries.knows(i) {
                    let order_id = row.identity.order_id.clone();
                    self.found(Kind::MissingFromRedis, &order_id, None, Some(row.clone()))
                        .await?;
                }
            }
            if page.len() < PAGE_ORDERS {
                return Ok(());
            }
            after = page.last().map(|r| r.identity.order_id.clone());
        }
    }
}
