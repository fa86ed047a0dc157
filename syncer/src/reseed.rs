//! Re-seeds a goods Redis forgot (it restarted empty) from what MySQL holds: first waits until
//! the writer has applied everything already on its way to MySQL, then takes a new epoch from
//! MySQL and, in the same transaction under the sale row's lock, reads the round's counters
//! and orders; then loads all of it into Redis in one script call. Redis is never trusted
//! after it forgot: MySQL is the record, and the new epoch keeps new order ids apart from
//! every id MySQL has.
//!
//! A `redis_sharded` goods is loaded shard by shard: each order goes to the shard its id names
//! (where lifecycle calls find it), each buyer's count and request ids to their home shard
//! (where their attempts are decided; `db_decide.rs` issues ids that name it, as the shards
//! do), and MySQL's available units are split evenly. No shard is trusted until all are
//! loaded: the goods stays `switching` until then, and a load cut short fences the shards it
//! reached.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::RedisConn;
use chrono::NaiveDateTime;
use redis::AsyncCommands;
use sqlx::{MySqlPool, Row};

use crate::directory::Mode;
use crate::kafka::KafkaConfig;
use crate::keys::KeySpace;
use crate::order::OrderState;
use crate::reconcile::watermarks;

const REDIS_ADMIN_TIMEOUT: Duration = Duration::from_secs(30);
/// How often the drain looks at the writer's committed offsets: a poll, not a pause; the drain
/// ends at the first look that finds the writer caught up, or at its timeout.
const DRAIN_POLL: Duration = Duration::from_millis(200);
/// The most orders one re-seed loads: they go to Redis in one script call, which blocks Redis
/// while it runs (about a second per few hundred thousand records).
pub const ORDERS_MAX: usize = 200_000;

#[derive(Debug, thiserror::Error)]
pub enum ReseedError {
    #[error("no sale is defined for goods {0}")]
    NoSale(String),
    #[error(
        "goods {0} is still loaded in Redis (Redis did not forget it); re-seed only a goods Redis \
         lost, and use reconcile --repair for a Redis that remembers"
    )]
    Live(String),
    #[error(
        "goods {goods_id}: its outbox still holds {pending} events MySQL may not have; start the \
         relay and re-seed once the outbox is empty"
    )]
    Outbox { goods_id: String, pending: u64 },
    #[error(
        "the writer did not apply the sale topic up to its high watermarks within {0:?}; is the \
         writer running? nothing was changed"
    )]
    DrainTimeout(Duration),
    #[error(
        "goods {goods_id} has {orders} orders in its round, above the {ORDERS_MAX} a re-seed loads"
    )]
    TooManyOrders { goods_id: String, orders: usize },
    #[error("goods {goods_id}: another load of epoch {loaded} reached Redis first; it stands")]
    Superseded { goods_id: String, loaded: u64 },
    #[error("kafka: {0}")]
    Kafka(String),
    #[error("mysql: {0}")]
    Mysql(#[from] sqlx::Error),
    #[error("redis did not answer within {REDIS_ADMIN_TIMEOUT:?}")]
    Timeout,
    #[error("redis error: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("reseed script replied {0:?}")]
    BadScriptReply(String),
    #[error(
        "goods {0} is a db-tier sale: MySQL alone decides it, there is nothing to load into Redis"
    )]
    DbTier(String),
    #[error(
        "goods {goods_id}: MySQL's counters ({counters}) disagree with its orders of the round \
         ({orders}); run reconcile, nothing was changed"
    )]
    Disagrees {
        goods_id: String,
        counters: String,
        orders: String,
    },
}

/// What a re-seed loaded.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Reseeded {
    pub epoch: u64,
    pub available: i64,
    pub reserved: i64,
    pub sold: i64,
    pub lapsed: i64,
    /// Order rows of the round loaded (idempotency records).
    pub orders: usize,
    /// Of those, open reservations.
    pub reservations: usize,
}

/// Re-seeds `goods_id`; `drain_timeout` bounds the wait for the writer.
pub async fn reseed(
    redis: &RedisConn,
    mysql: &MySqlPool,
    kafka: &KafkaConfig,
    keys: &KeySpace,
    goods_id: &str,
    drain_timeout: Duration,
) -> Result<Reseeded, ReseedError> {
    let mut conn = redis.clone();
    let modes: Option<(String, String, Option<u8>)> =
        sqlx::query_as("SELECT tier, mode, shards FROM sales WHERE goods_id = ?")
            .bind(goods_id)
            .fetch_optional(mysql)
            .await?;
    let (tier, mode, shards) = modes.ok_or_else(|| ReseedError::NoSale(goods_id.to_owned()))?;
    if tier == crate::sale::Tier::Db.as_str() {
        return Err(ReseedError::DbTier(goods_id.to_owned()));
    }
    let shards = if tier == crate::sale::Tier::RedisSharded.as_str() {
        u32::from(shards.unwrap_or(1)).clamp(1, crate::sale::SHARDS_MAX)
    } else {
        1
    };
    let key_ids = crate::keys::key_ids(goods_id, shards);
    // MySQL decided the goods meanwhile (fallback) or a re-seed stopped half way: whatever
    // Redis holds of it is stale and is replaced. Otherwise Redis must have forgotten it.
    let replace = mode != Mode::Redis.as_str();
    // Refused before anything moves (the script checks both again, atomically). With no sale
    // hash (or one nobody decides from, in fallback), nothing appends to this goods' outbox,
    // so an empty outbox stays empty.
    // (A sharded goods: every shard must have forgotten, and every outbox be empty.)
    let (mut pending, mut floor) = (0u64, 0u64);
    for key_id in &key_ids {
        let goods = keys.goods(key_id);
        if !replace && bounded(conn.exists(&goods.sale)).await? {
            return Err(ReseedError::Live(goods_id.to_owned()));
        }
        pending += bounded(conn.xlen::<_, u64>(&goods.outbox)).await?;
        floor = floor.max(
            bounded(conn.get::<_, Option<u64>>(&goods.epoch))
                .await?
                .unwrap_or(0),
        );
    }
    if pending > 0 {
        return Err(ReseedError::Outbox {
            goods_id: goods_id.to_owned(),
            pending,
        });
    }
    drain(kafka, drain_timeout).await?;
    let snapshot = read_round(mysql, goods_id, floor, shards).await?;
    // From here until the load is done or undone, the goods is `switching`: neither MySQL nor
    // Redis decides it, so nothing moves that the snapshot does not hold.
    let mut loaded = Ok(());
    let mut reached = Vec::new();
    for (key_id, part) in key_ids.iter().zip(&snapshot.parts) {
        loaded = load(&mut conn, &keys.goods(key_id), &snapshot, part, replace).await;
        if loaded.is_err() {
            break;
        }
        reached.push(key_id);
    }
    if loaded.is_err() && shards > 1 {
        // The shards loaded so far hold the new epoch: fenced, nobody sells from them before
        // a re-seed loads every shard (the epoch check covers a fence that does not land).
        for key_id in reached {
            crate::fallback::fence(&conn, keys, key_id).await;
        }
    }
    let finish = match &loaded {
        Ok(()) => sqlx::query(
            "UPDATE sales SET mode = 'redis', loaded_epoch = ?, holdback = 0
             WHERE goods_id = ? AND epoch = ? AND mode = 'switching'",
        )
        .bind(snapshot.epoch)
        .bind(goods_id)
        .bind(snapshot.epoch),
        // Undone: MySQL decides on (or, for a Redis that forgot, the next deduct finds out).
        Err(_) => sqlx::query(
            "UPDATE sales SET mode = ? WHERE goods_id = ? AND epoch = ? AND mode = 'switching'",
        )
        .bind(if mode == Mode::Switching.as_str() {
            Mode::Fallback.as_str()
        } else {
            mode.as_str()
        })
        .bind(goods_id)
        .bind(snapshot.epoch),
    };
    finish.execute(mysql).await?;
    loaded?;
    let _: () = bounded(conn.sadd(keys.sales_index(), &key_ids)).await?;
    Ok(Reseeded {
        epoch: snapshot.epoch,
        available: snapshot.counters.available,
        reserved: snapshot.counters.reserved,
        sold: snapshot.counters.sold,
        lapsed: snapshot.counters.lapsed,
        orders: snapshot
            .parts
            .iter()
            .map(|p| p.records.requests.len())
            .sum(),
        reservations: snapshot
            .parts
            .iter()
            .map(|p| p.records.reservations.len())
            .sum(),
    })
}

/// Loads a round (one shard's part of it, for a sharded goods) into Redis in one script call.
async fn load(
    conn: &mut RedisConn,
    goods: &crate::keys::GoodsKeys,
    snapshot: &Round,
    part: &Part,
    replace: bool,
) -> Result<(), ReseedError> {
    let goods_id = snapshot.goods_id.as_str();
    let script = redis::Script::new(crate::scripts::RESEED);
    let mut invocation = crate::scripts::invocation(&script, &goods.reseed_script_keys());
    invocation
        .arg(snapshot.epoch)
        .arg(snapshot.first_epoch)
        // An unsharded goods keeps its defined total; a shard's is what it holds.
        .arg(part.shard.map_or(snapshot.total, |_| part.counters.total()))
        .arg(part.counters.available)
        .arg(part.counters.reserved)
        .arg(part.counters.sold)
        .arg(part.counters.lapsed)
        .arg(snapshot.limit)
        .arg(snapshot.start_ms)
        .arg(snapshot.end_ms)
        .arg(snapshot.window_ms)
        .arg(part.records.to_json())
        .arg(if replace { "1" } else { "0" })
        .arg(snapshot.rate_ms.0.to_string())
        .arg(snapshot.rate_ms.1.to_string())
        .arg(snapshot.tier.as_str())
        .arg(snapshot.pause_retry_ms);
    if let Some(shard) = part.shard {
        invocation.arg(snapshot.parts.len()).arg(shard);
    }
    let (status, value): (String, i64) = bounded(invocation.invoke_async(conn)).await?;
    match status.as_str() {
        "loaded" => Ok(()),
        "stale" => Err(ReseedError::Superseded {
            goods_id: goods_id.to_owned(),
            loaded: value.max(0) as u64,
        }),
        "live" => Err(ReseedError::Live(goods_id.to_owned())),
        "outbox" => Err(ReseedError::Outbox {
            goods_id: goods_id.to_owned(),
            pending: value.max(0) as u64,
        }),
        other => Err(ReseedError::BadScriptReply(other.to_owned())),
    }
}

/// Waits until the writer's group has committed past the sale topic's high watermarks as they
/// are now: then MySQL holds every event that left Redis before this call.
async fn drain(kafka: &KafkaConfig, timeout: Duration) -> Result<(), ReseedError> {
    let config = kafka.clone();
    let marks = tokio::task::spawn_blocking(move || watermarks::high_watermarks(&config))
        .await
        .map_err(|e| ReseedError::Kafka(e.to_string()))?
        .map_err(|e| ReseedError::Kafka(e.to_string()))?;
    let deadline = Instant::now() + timeout;
    loop {
        let config = kafka.clone();
        let marks = marks.clone();
        let reached =
            tokio::task::spawn_blocking(move || watermarks::writer_reached(&config, &marks))
                .await
                .map_err(|e| ReseedError::Kafka(e.to_string()))?
                .map_err(|e| ReseedError::Kafka(e.to_string()))?;
        if reached {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(ReseedError::DrainTimeout(timeout));
        }
        tokio::time::sleep(DRAIN_POLL).await;
    }
}

/// A round as MySQL holds it, read under the sale row's lock with the epoch taken.
struct Round {
    goods_id: String,
    epoch: u64,
    first_epoch: u64,
    total: i64,
    /// MySQL's counters of the whole goods.
    counters: Counters,
    limit: u32,
    start_ms: i64,
    end_ms: i64,
    window_ms: u64,
    /// The fleet-wide rate's GCRA interval and tolerance, ms (0: none); a shard's part of it.
    rate_ms: (f64, f64),
    tier: crate::sale::Tier,
    /// What each keyspace loads: one, or one per shard in shard order.
    parts: Vec<Part>,
    /// The pause MySQL holds (0: not paused), loaded with the rest.
    pause_retry_ms: u64,
}

/// A sale's counters: `total = available + reserved + sold + lapsed`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Counters {
    available: i64,
    reserved: i64,
    sold: i64,
    lapsed: i64,
}

impl Counters {
    fn total(&self) -> i64 {
        self.available + self.reserved + self.sold + self.lapsed
    }
}

/// What one keyspace loads.
#[derive(Default)]
struct Part {
    /// The shard's index (`None`: an unsharded goods' one keyspace).
    shard: Option<u32>,
    counters: Counters,
    records: Records,
}

/// Splits a sharded goods' round over its shards: each order to the shard its id names,
/// each buyer's count and request ids to their home shard, MySQL's available units evenly.
/// The shards' reserved, sold and lapsed are their orders' units; they must add up to MySQL's
/// counters, or the goods is not loaded.
fn split_round(
    goods_id: &str,
    counters: Counters,
    orders: Vec<RoundOrder>,
    shards: u32,
) -> Result<Vec<Part>, ReseedError> {
    let mut parts: Vec<Part> = (0..shards)
        .map(|shard| Part {
            shard: (shards > 1).then_some(shard),
            ..Part::default()
        })
        .collect();
    if shards <= 1 {
        let part = &mut parts[0];
        part.counters = counters;
        for order in orders {
            part.records.add(order, &mut Counters::default());
        }
        return Ok(parts);
    }
    for order in orders {
        let home = crate::keys::home_shard(&order.user, shards) as usize;
        let issuer = crate::keys::shard_of_sequence(order.seq, shards) as usize;
        // Ids MySQL or a shard issued name the buyer's home shard; were they ever apart, the
        // count stays at home (where the limit is checked) and the order where it is ended.
        let held = order.held();
        parts[home].records.requests.push(order.request_record());
        if let Some(units) = held {
            *parts[home]
                .records
                .users
                .entry(order.user.clone())
                .or_default() += units;
        }
        let part = &mut parts[issuer];
        part.records.add_order(order, &mut part.counters);
    }
    let summed = parts.iter().fold(Counters::default(), |sum, p| Counters {
        reserved: sum.reserved + p.counters.reserved,
        sold: sum.sold + p.counters.sold,
        lapsed: sum.lapsed + p.counters.lapsed,
        ..sum
    });
    let expected = Counters {
        available: 0,
        ..counters
    };
    if summed != expected {
        return Err(ReseedError::Disagrees {
            goods_id: goods_id.to_owned(),
            counters: format!(
                "reserved {}, sold {}, lapsed {}",
                counters.reserved, counters.sold, counters.lapsed
            ),
            orders: format!(
                "reserved {}, sold {}, lapsed {}",
                summed.reserved, summed.sold, summed.lapsed
            ),
        });
    }
    let available =
        crate::shard::split_stock(u64::try_from(counters.available).unwrap_or(0), shards);
    for (part, units) in parts.iter_mut().zip(available) {
        part.counters.available = i64::try_from(units).unwrap_or(i64::MAX);
    }
    Ok(parts)
}

/// One order of the round as MySQL holds it.
struct RoundOrder {
    order_id: String,
    seq: u64,
    user: String,
    quantity: u32,
    request_id: String,
    state: RoundState,
}

enum RoundState {
    Reserved { at_ms: i64, deadline_ms: i64 },
    Confirmed,
    Released { reason: String, returned: bool },
}

impl RoundOrder {
    /// Units the buyer holds by this order (reserved or confirmed: what deduct_batch.lua
    /// counts and release gives back).
    fn held(&self) -> Option<u64> {
        match self.state {
            RoundState::Reserved { .. } | RoundState::Confirmed => Some(u64::from(self.quantity)),
            RoundState::Released { .. } => None,
        }
    }

    fn request_record(&self) -> (String, String) {
        (
            self.request_id.clone(),
            format!("{}|{}|{}", self.user, self.quantity, self.order_id),
        )
    }
}

/// The Redis records of a round's orders, as the scripts write them.
#[derive(Default)]
struct Records {
    /// user -> units held (reserved or confirmed: what deduct_batch.lua counts and release
    /// gives back).
    users: BTreeMap<String, u64>,
    /// (request id, "user|quantity|order_id") for every order.
    requests: Vec<(String, String)>,
    /// (order id, "user|quantity|reserved_at_ms", payment deadline ms).
    reservations: Vec<(String, String, String)>,
    /// (order id, "confirmed" | "released:<reason>").
    settled: Vec<(String, String)>,
    /// Released orders whose units did not go back on sale.
    lapsed: Vec<String>,
}

impl Records {
    /// All of an order's records (an unsharded goods': one keyspace holds them all).
    fn add(&mut self, order: RoundOrder, counters: &mut Counters) {
        self.requests.push(order.request_record());
        if let Some(units) = order.held() {
            *self.users.entry(order.user.clone()).or_default() += units;
        }
        self.add_order(order, counters);
    }

    /// The order's own records (where lifecycle calls find it), its units counted in
    /// `counters`.
    fn add_order(&mut self, order: RoundOrder, counters: &mut Counters) {
        let units = i64::from(order.quantity);
        match order.state {
            RoundState::Reserved { at_ms, deadline_ms } => {
                counters.reserved += units;
                self.reservations.push((
                    order.order_id,
                    format!("{}|{}|{at_ms}", order.user, order.quantity),
                    deadline_ms.to_string(),
                ));
            }
            RoundState::Confirmed => {
                counters.sold += units;
                self.settled.push((order.order_id, "confirmed".to_owned()));
            }
            RoundState::Released { reason, returned } => {
                self.settled
                    .push((order.order_id.clone(), format!("released:{reason}")));
                if !returned {
                    counters.lapsed += units;
                    self.lapsed.push(order.order_id);
                }
            }
        }
    }

    fn to_json(&self) -> String {
        let users: Vec<(&String, String)> =
            self.users.iter().map(|(u, n)| (u, n.to_string())).collect();
        serde_json::json!({
            "users": users,
            "requests": self.requests,
            "reservations": self.reservations,
            "settled": self.settled,
            "lapsed": self.lapsed,
        })
        .to_string()
    }
}

/// Takes the next epoch (past `floor`, allowed for a sale with history: that is the point) and
/// reads the round in the same transaction, so the writer cannot move anything in between.
async fn read_round(
    pool: &MySqlPool,
    goods_id: &str,
    floor: u64,
    shards: u32,
) -> Result<Round, ReseedError> {
    let mut tx = pool.begin().await?;
    let row = sqlx::query(
        "SELECT goods_id, total_stock, per_user_limit, starts_at, ends_at, payment_window_s, tier,
           fleet_rate_per_s, fleet_burst, shards, stock, reserved, sold, lapsed, epoch, round_epoch,
           pause_retry_s
         FROM sales WHERE goods_id = ? FOR UPDATE",
    )
    .bind(goods_id)
    .fetch_optional(&mut *tx)
    .await?
    .ok_or_else(|| ReseedError::NoSale(goods_id.to_owned()))?;
    let sale = crate::db::sale_of(&row)?;
    let round_epoch: u64 = row.try_get("round_epoch")?;
    let epoch = row.try_get::<u64, _>("epoch")?.max(floor) + 1;
    let window_ms = u64::from(sale.payment_window_s) * 1000;
    // Primary-key range of this goods, as db.rs reads history; the round's orders are those
    // whose epoch is above the round's start.
    let prefix = goods_id
        .replace('!', "!!")
        .replace('_', "!_")
        .replace('%', "!%");
    let rows = sqlx::query(
        "SELECT order_id, user_id, quantity, request_id, state, release_reason, stock_returned,
           reserved_at
         FROM orders
         WHERE order_id LIKE ? ESCAPE '!' AND goods_id = ?
           AND CAST(SUBSTRING_INDEX(SUBSTRING_INDEX(order_id, '.', -2), '.', 1) AS UNSIGNED) > ?
         LIMIT ?",
    )
    .bind(format!("{prefix}.%"))
    .bind(goods_id)
    .bind(round_epoch)
    .bind(ORDERS_MAX as u64 + 1)
    .fetch_all(&mut *tx)
    .await?;
    if rows.len() > ORDERS_MAX {
        return Err(ReseedError::TooManyOrders {
            goods_id: goods_id.to_owned(),
            orders: rows.len(),
        });
    }
    let mut orders = Vec::with_capacity(rows.len());
    for row in &rows {
        let order_id: String = row.try_get("order_id")?;
        let state: String = row.try_get("state")?;
        let state = match OrderState::parse(&state) {
            Some(OrderState::Reserved) => {
                let at: NaiveDateTime = row.try_get("reserved_at")?;
                let at_ms = at.and_utc().timestamp_millis();
                RoundState::Reserved {
                    at_ms,
                    deadline_ms: at_ms + window_ms as i64,
                }
            }
            Some(OrderState::Confirmed) => RoundState::Confirmed,
            Some(OrderState::Released) => {
                let reason: Option<String> = row.try_get("release_reason")?;
                let returned: Option<bool> = row.try_get("stock_returned")?;
                RoundState::Released {
                    reason: reason.unwrap_or_else(|| "ended".to_owned()),
                    returned: returned != Some(false),
                }
            }
            // The writer stores only the three states; a row it did not write is left out
            // (reconcile --orders reports it).
            None => {
                tracing::warn!(order_id, state, "order row in an unknown state; not loaded");
                continue;
            }
        };
        let seq = crate::keys::order_parts(&order_id).map_or(0, |(_, _, seq)| seq);
        orders.push(RoundOrder {
            seq,
            user: row.try_get("user_id")?,
            quantity: row.try_get("quantity")?,
            request_id: row.try_get("request_id")?,
            order_id,
            state,
        });
    }
    let counters = Counters {
        available: row.try_get("stock")?,
        reserved: row.try_get("reserved")?,
        sold: row.try_get("sold")?,
        lapsed: row.try_get("lapsed")?,
    };
    // Refused inside the transaction: dropped, it takes no epoch and changes no mode.
    let parts = split_round(goods_id, counters, orders, shards)?;
    sqlx::query("UPDATE sales SET mode = 'switching' WHERE goods_id = ?")
        .bind(goods_id)
        .execute(&mut *tx)
        .await?;
    crate::db::commit_epoch(tx, goods_id, epoch).await?;
    Ok(Round {
        goods_id: goods_id.to_owned(),
        epoch,
        first_epoch: round_epoch + 1,
        total: i64::try_from(sale.total_stock).unwrap_or(i64::MAX),
        counters,
        limit: sale.per_user_limit,
        start_ms: sale.starts_at.timestamp_millis(),
        end_ms: sale.ends_at.timestamp_millis(),
        window_ms,
        rate_ms: sale
            .fleet_rate
            .map_or((0.0, 0.0), |r| r.per_shard(shards).gcra_ms()),
        tier: sale.tier,
        parts,
        pause_retry_ms: crate::control::retry_ms(row.try_get("pause_retry_s")?),
    })
}

/// One Redis call, bounded by [`REDIS_ADMIN_TIMEOUT`].
async fn bounded<T>(
    call: impl std::future::Future<Output = redis::RedisResult<T>>,
) -> Result<T, ReseedError> {
    Ok(tokio::time::timeout(REDIS_ADMIN_TIMEOUT, call)
        .await
        .map_err(|_| ReseedError::Timeout)??)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn order(seq: u64, user: &str, state: RoundState) -> RoundOrder {
        RoundOrder {
            order_id: format!("g.5.{seq}"),
            seq,
            user: user.to_owned(),
            quantity: 1,
            request_id: format!("r{seq}"),
            state,
        }
    }

    /// A user whose home among 3 shards is `home`.
    fn user_at(home: u32) -> String {
        (0..)
            .map(|i| format!("u{i}"))
            .find(|u| crate::keys::home_shard(u, 3) == home)
            .unwrap()
    }

    #[test]
    fn a_sharded_round_goes_where_its_orders_are_ended_and_its_buyers_decided() {
        let (a, b) = (user_at(1), user_at(2));
        let orders = vec![
            order(
                4,
                &a,
                RoundState::Reserved {
                    at_ms: 10,
                    deadline_ms: 20,
                },
            ),
            order(5, &b, RoundState::Confirmed),
            order(
                8,
                &b,
                RoundState::Released {
                    reason: "cancelled".into(),
                    returned: false,
                },
            ),
        ];
        let counters = Counters {
            available: 7,
            reserved: 1,
            sold: 1,
            lapsed: 1,
        };
        let parts = split_round("g", counters, orders, 3).unwrap();
        let shards: Vec<_> = parts.iter().map(|p| p.shard).collect();
        assert_eq!(shards, vec![Some(0), Some(1), Some(2)]);
        // Available split evenly (3, 2, 2); each shard's own orders counted.
        let counted: Vec<_> = parts.iter().map(|p| p.counters).collect();
        assert_eq!(
            counted,
            vec![
                Counters {
                    available: 3,
                    ..Counters::default()
                },
                Counters {
                    available: 2,
                    reserved: 1,
                    ..Counters::default()
                },
                Counters {
                    available: 2,
                    sold: 1,
                    lapsed: 1,
                    ..Counters::default()
                },
            ]
        );
        assert_eq!(parts[1].records.reservations.len(), 1);
        assert_eq!(parts[1].records.users.get(&a), Some(&1));
        assert_eq!(parts[2].records.settled.len(), 2);
        assert_eq!(parts[2].records.lapsed, vec!["g.5.8".to_owned()]);
        // b holds only the confirmed unit; both of b's request ids are at b's home.
        assert_eq!(parts[2].records.users.get(&b), Some(&1));
        assert_eq!(parts[2].records.requests.len(), 2);
        assert!(parts[0].records.requests.is_empty());
    }

    #[test]
    fn counters_that_disagree_with_the_orders_are_refused() {
        let orders = vec![order(3, &user_at(0), RoundState::Confirmed)];
        let counters = Counters {
            available: 5,
            sold: 2,
            ..Counters::default()
        };
        assert!(matches!(
            split_round("g", counters, orders, 3),
            Err(ReseedError::Disagrees { .. })
        ));
    }

    #[test]
    fn an_unsharded_round_keeps_mysqls_counters() {
        let orders = vec![order(3, "x", RoundState::Confirmed)];
        let counters = Counters {
            available: 5,
            sold: 9,
            ..Counters::default()
        };
        let parts = split_round("g", counters, orders, 1).unwrap();
        assert_eq!(parts.len(), 1);
        assert_eq!((parts[0].shard, parts[0].counters), (None, counters));
        assert_eq!(parts[0].records.settled.len(), 1);
    }
}
