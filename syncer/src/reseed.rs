//! Re-seeds a goods Redis forgot (it restarted empty) from what MySQL holds: first waits until
//! the writer has applied everything already on its way to MySQL, then takes a new epoch from
//! MySQL and, in the same transaction under the sale row's lock, reads the round's counters
//! and orders; then loads all of it into Redis in one script call. Redis is never trusted
//! after it forgot: MySQL is the record, and the new epoch keeps new order ids apart from
//! every id MySQL has.

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
        "goods {0} is a redis_sharded sale: a re-seed loads one keyspace, not its shards; \
         MySQL decides it until its sale ends"
    )]
    Sharded(String),
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
    let goods = keys.goods(goods_id);
    let mut conn = redis.clone();
    let modes: Option<(String, String)> =
        sqlx::query_as("SELECT tier, mode FROM sales WHERE goods_id = ?")
            .bind(goods_id)
            .fetch_optional(mysql)
            .await?;
    let (tier, mode) = modes.ok_or_else(|| ReseedError::NoSale(goods_id.to_owned()))?;
    if tier == crate::sale::Tier::Db.as_str() {
        return Err(ReseedError::DbTier(goods_id.to_owned()));
    }
    if tier == crate::sale::Tier::RedisSharded.as_str() {
        return Err(ReseedError::Sharded(goods_id.to_owned()));
    }
    // MySQL decided the goods meanwhile (fallback) or a re-seed stopped half way: whatever
    // Redis holds of it is stale and is replaced. Otherwise Redis must have forgotten it.
    let replace = mode != Mode::Redis.as_str();
    // Refused before anything moves (the script checks both again, atomically). With no sale
    // hash (or one nobody decides from, in fallback), nothing appends to this goods' outbox,
    // so an empty outbox stays empty.
    if !replace && bounded(conn.exists(&goods.sale)).await? {
        return Err(ReseedError::Live(goods_id.to_owned()));
    }
    let pending: u64 = bounded(conn.xlen(&goods.outbox)).await?;
    if pending > 0 {
        return Err(ReseedError::Outbox {
            goods_id: goods_id.to_owned(),
            pending,
        });
    }
    drain(kafka, drain_timeout).await?;
    let floor: Option<u64> = bounded(conn.get(&goods.epoch)).await?;
    let snapshot = read_round(mysql, goods_id, floor.unwrap_or(0)).await?;
    // From here until the load is done or undone, the goods is `switching`: neither MySQL nor
    // Redis decides it, so nothing moves that the snapshot does not hold.
    let loaded = load(&mut conn, &goods, &snapshot, replace).await;
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
    let _: () = bounded(conn.sadd(keys.sales_index(), goods_id)).await?;
    Ok(Reseeded {
        epoch: snapshot.epoch,
        available: snapshot.available,
        reserved: snapshot.reserved,
        sold: snapshot.sold,
        lapsed: snapshot.lapsed,
        orders: snapshot.records.requests.len(),
        reservations: snapshot.records.reservations.len(),
    })
}

/// Loads a round into Redis in one script call.
async fn load(
    conn: &mut RedisConn,
    goods: &crate::keys::GoodsKeys,
    snapshot: &Round,
    replace: bool,
) -> Result<(), ReseedError> {
    let goods_id = snapshot.goods_id.as_str();
    let script = redis::Script::new(crate::scripts::RESEED);
    let mut invocation = crate::scripts::invocation(&script, &goods.reseed_script_keys());
    invocation
        .arg(snapshot.epoch)
        .arg(snapshot.first_epoch)
        .arg(snapshot.total)
        .arg(snapshot.available)
        .arg(snapshot.reserved)
        .arg(snapshot.sold)
        .arg(snapshot.lapsed)
        .arg(snapshot.limit)
        .arg(snapshot.start_ms)
        .arg(snapshot.end_ms)
        .arg(snapshot.window_ms)
        .arg(snapshot.records.to_json())
        .arg(if replace { "1" } else { "0" })
        .arg(snapshot.rate_ms.0.to_string())
        .arg(snapshot.rate_ms.1.to_string())
        .arg(snapshot.tier.as_str())
        .arg(snapshot.pause_retry_ms);
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
    total: u64,
    available: i64,
    reserved: i64,
    sold: i64,
    lapsed: i64,
    limit: u32,
    start_ms: i64,
    end_ms: i64,
    window_ms: u64,
    /// The fleet-wide rate's GCRA interval and tolerance, ms (0: none).
    rate_ms: (f64, f64),
    tier: crate::sale::Tier,
    /// The pause MySQL holds (0: not paused), loaded with the rest.
    pause_retry_ms: u64,
    records: Records,
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
async fn read_round(pool: &MySqlPool, goods_id: &str, floor: u64) -> Result<Round, ReseedError> {
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
    let mut records = Records::default();
    for row in &rows {
        let order_id: String = row.try_get("order_id")?;
        let user: String = row.try_get("user_id")?;
        let quantity: u32 = row.try_get("quantity")?;
        let state: String = row.try_get("state")?;
        records.requests.push((
            row.try_get("request_id")?,
            format!("{user}|{quantity}|{order_id}"),
        ));
        match OrderState::parse(&state) {
            Some(OrderState::Reserved) => {
                let at: NaiveDateTime = row.try_get("reserved_at")?;
                let at_ms = at.and_utc().timestamp_millis();
                records.reservations.push((
                    order_id.clone(),
                    format!("{user}|{quantity}|{at_ms}"),
                    (at_ms + window_ms as i64).to_string(),
                ));
                *records.users.entry(user).or_default() += u64::from(quantity);
            }
            Some(OrderState::Confirmed) => {
                records.settled.push((order_id, "confirmed".to_owned()));
                *records.users.entry(user).or_default() += u64::from(quantity);
            }
            Some(OrderState::Released) => {
                let reason: Option<String> = row.try_get("release_reason")?;
                let returned: Option<bool> = row.try_get("stock_returned")?;
                let reason = reason.unwrap_or_else(|| "ended".to_owned());
                records
                    .settled
                    .push((order_id.clone(), format!("released:{reason}")));
                if returned == Some(false) {
                    records.lapsed.push(order_id);
                }
            }
            // The writer stores only the three states; a row it did not write is left out
            // (reconcile --orders reports it).
            None => tracing::warn!(order_id, state, "order row in an unknown state; not loaded"),
        }
    }
    sqlx::query("UPDATE sales SET mode = 'switching' WHERE goods_id = ?")
        .bind(goods_id)
        .execute(&mut *tx)
        .await?;
    crate::db::commit_epoch(tx, goods_id, epoch).await?;
    Ok(Round {
        goods_id: goods_id.to_owned(),
        epoch,
        first_epoch: round_epoch + 1,
        total: sale.total_stock,
        available: row.try_get("stock")?,
        reserved: row.try_get("reserved")?,
        sold: row.try_get("sold")?,
        lapsed: row.try_get("lapsed")?,
        limit: sale.per_user_limit,
        start_ms: sale.starts_at.timestamp_millis(),
        end_ms: sale.ends_at.timestamp_millis(),
        window_ms,
        rate_ms: sale.fleet_rate.map_or((0.0, 0.0), |r| r.gcra_ms()),
        tier: sale.tier,
        pause_retry_ms: crate::control::retry_ms(row.try_get("pause_retry_s")?),
        records,
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
