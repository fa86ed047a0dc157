//! MySQL access: the pool, the schema (sqlx migrations) and the sale definitions.

use std::time::Duration;

use chrono::{DateTime, NaiveDateTime, Utc};
use sqlx::mysql::{MySqlConnectOptions, MySqlPool, MySqlPoolOptions, MySqlRow};
use sqlx::{MySql, Row, Transaction};

use crate::sale::{Controls, FleetRate, Sale, SaleState, Tier};

/// How long to wait for a connection from the pool before giving up on a request.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections per syncer process: the deducter's MySQL lane keeps up to four batches in
/// flight, the batched writer needs few, the admin API fewer.
const POOL_CONNECTIONS_MAX: u32 = 8;

/// The longest any statement of the syncer waits for a row lock.
const LOCK_WAIT_SQL: &str = "SET SESSION innodb_lock_wait_timeout = 5";

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Connects to MySQL and brings the schema up to date.
pub async fn connect(url: &str) -> anyhow::Result<MySqlPool> {
    let options: MySqlConnectOptions = url
        .parse()
        .map_err(|e| anyhow::anyhow!("bad MySQL URL: {e}"))?;
    let pool = MySqlPoolOptions::new()
        .max_connections(POOL_CONNECTIONS_MAX)
        .acquire_timeout(ACQUIRE_TIMEOUT)
        // InnoDB's default is 50 s: a stuck holder of a sale row would park the deducter's
        // and the writer's connections that long. Their callers retry; nothing here should
        // wait on a row lock longer than this.
        .after_connect(|conn, _meta| {
            Box::pin(async move {
                sqlx::query(LOCK_WAIT_SQL).execute(conn).await?;
                Ok(())
            })
        })
        .connect_with(options)
        .await
        .map_err(|e| anyhow::anyhow!("cannot connect to MySQL: {e}"))?;
    MIGRATOR
        .run(&pool)
        .await
        .map_err(|e| anyhow::anyhow!("cannot migrate the MySQL schema: {e}"))?;
    Ok(pool)
}

/// What happened to a sale definition on save.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Saved {
    Created,
    Replaced,
}

/// What MySQL holds of a sale's current round (the orders sold under its current definition,
/// and the units its counters moved), read under the sale row's lock. A sale with any history
/// is never loaded into Redis with its full stock again.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct History {
    /// Order rows whose epoch is above the round's start (`sales.round_epoch`).
    pub orders: i64,
    pub reserved: i64,
    pub sold: i64,
    pub lapsed: i64,
    /// `total_stock - stock`: units MySQL no longer counts as available.
    pub taken: i64,
}

impl History {
    pub fn is_empty(&self) -> bool {
        *self == History::default()
    }
}

impl std::fmt::Display for History {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} orders; units reserved {}, sold {}, lapsed {}; stock {} below its total",
            self.orders, self.reserved, self.sold, self.lapsed, self.taken
        )
    }
}

/// Why MySQL refused to hand out an epoch or to save a definition.
#[derive(Debug, thiserror::Error)]
pub enum SaleRowError {
    #[error("no sale is defined for goods {0}")]
    NoSale(String),
    #[error(
        "goods {goods_id} has history in MySQL ({history}): a preheat loads the full stock and \
         would sell those units again, so this sale must be re-seeded from MySQL instead \
         (seckill-syncer reseed)"
    )]
    History { goods_id: String, history: History },
    #[error(
        "goods {goods_id} has history in MySQL ({history}) and its window is open; it cannot \
         be redefined until it ends"
    )]
    OpenWithHistory { goods_id: String, history: History },
    #[error("mysql: {0}")]
    Mysql(#[from] sqlx::Error),
}

/// Whether an epoch may be handed out for a sale that has history.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HistoryRule {
    /// A load with the full stock (preheat): refused when the sale has history.
    Refuse,
    /// A load that starts from what MySQL holds.
    Allow,
}

/// Hands out the goods' next epoch: in one transaction under the sale row's lock, moves
/// `sales.epoch` past its own value and past `floor` (the epoch a Redis still remembers, so a
/// database from before durable epochs never goes back), commits, and returns the epoch with
/// the definition read under the same lock. The caller loads Redis with it only after this
/// returned: an epoch Redis sells under is always one MySQL recorded first, so a Redis that
/// forgets can never be given it again. Two callers at once are ordered by the row lock and get
/// different epochs; one that fails after this leaves a gap, never a repeat. With
/// [`HistoryRule::Refuse`], a sale with history is refused and nothing changes.
pub async fn take_epoch(
    pool: &MySqlPool,
    goods_id: &str,
    floor: u64,
    rule: HistoryRule,
) -> Result<(u64, Sale), SaleRowError> {
    let mut tx = pool.begin().await?;
    let locked = lock_sale(&mut tx, goods_id)
        .await?
        .ok_or_else(|| SaleRowError::NoSale(goods_id.to_owned()))?;
    if rule == HistoryRule::Refuse && !locked.history.is_empty() {
        return Err(SaleRowError::History {
            goods_id: goods_id.to_owned(),
            history: locked.history,
        });
    }
    let epoch = locked.epoch.max(floor) + 1;
    commit_epoch(tx, goods_id, epoch).await?;
    Ok((epoch, locked.sale))
}

/// Records `epoch` as the goods' last and commits `tx`, which holds the sale row's lock.
pub(crate) async fn commit_epoch(
    mut tx: Transaction<'_, MySql>,
    goods_id: &str,
    epoch: u64,
) -> sqlx::Result<()> {
    // MySQL's own order sequence starts again under every new epoch (see `db_decide.rs`).
    sqlx::query("UPDATE sales SET epoch = ?, db_seq = 0 WHERE goods_id = ?")
        .bind(epoch)
        .bind(goods_id)
        .execute(&mut *tx)
        .await?;
    tx.commit().await
}

/// Creates or replaces a sale definition. Replacing starts a new round: MySQL's counters are
/// reset to the new total, and the old round's controls (pause, stop) are gone and the round starts at the current epoch (order rows of earlier
/// rounds stay, their ids carry the earlier epochs). A sale whose window is open and that has
/// history cannot be replaced: that would hand its units out again (checked here, in MySQL,
/// because a Redis that restarted no longer knows the sale is live).
pub async fn save_sale(pool: &MySqlPool, sale: &Sale) -> Result<Saved, SaleRowError> {
    let mut tx = pool.begin().await?;
    if let Some(locked) = lock_sale(&mut tx, &sale.goods_id).await? {
        if Utc::now() < locked.sale.ends_at && !locked.history.is_empty() {
            return Err(SaleRowError::OpenWithHistory {
                goods_id: sale.goods_id.clone(),
                history: locked.history,
            });
        }
    }
    // The new values are bound twice rather than read back with VALUES(col), which MySQL
    // deprecates (8.0.20), or with a row alias, which MariaDB lacks: one text for both.
    let mut query = sqlx::query(
        "INSERT INTO sales (goods_id, total_stock, stock, per_user_limit, starts_at, ends_at,
           payment_window_s, tier, fleet_rate_per_s, fleet_burst, shards)
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
         ON DUPLICATE KEY UPDATE total_stock = ?, stock = ?, per_user_limit = ?,
           starts_at = ?, ends_at = ?, payment_window_s = ?, tier = ?,
           fleet_rate_per_s = ?, fleet_burst = ?, shards = ?,
           reserved = 0, sold = 0, lapsed = 0, round_epoch = epoch, mode = 'redis',
           holdback = 0, paused_at = NULL, pause_retry_s = NULL, stopped_at = NULL",
    )
    .bind(&sale.goods_id);
    // Once for VALUES, once for the UPDATE, in the same column order.
    for _ in 0..2 {
        query = query
            .bind(sale.total_stock)
            .bind(sale.total_stock as i64)
            .bind(sale.per_user_limit)
            .bind(sale.starts_at.naive_utc())
            .bind(sale.ends_at.naive_utc())
            .bind(sale.payment_window_s)
            .bind(sale.tier.as_str())
            .bind(sale.fleet_rate.map(|r| r.per_second))
            .bind(sale.fleet_rate.map(|r| r.burst))
            .bind(sale.shards);
    }
    let result = query.execute(&mut *tx).await?;
    tx.commit().await?;
    // MySQL counts 1 affected row for an insert and 2 for an update of an existing row.
    Ok(if result.rows_affected() == 1 {
        Saved::Created
    } else {
        Saved::Replaced
    })
}

/// A sale row read under its lock, with the history of its current round.
struct LockedSale {
    sale: Sale,
    epoch: u64,
    history: History,
}

/// Locks the sale row until `tx` ends and reads it with the history of its current round.
async fn lock_sale(
    tx: &mut Transaction<'_, MySql>,
    goods_id: &str,
) -> sqlx::Result<Option<LockedSale>> {
    let row = sqlx::query(
        "SELECT goods_id, total_stock, per_user_limit, starts_at, ends_at, payment_window_s, tier,
           fleet_rate_per_s, fleet_burst, shards, CAST(total_stock AS SIGNED) - stock AS taken, reserved, sold, lapsed,
           epoch, round_epoch
         FROM sales WHERE goods_id = ? FOR UPDATE",
    )
    .bind(goods_id)
    .fetch_optional(&mut **tx)
    .await?;
    let Some(row) = row else { return Ok(None) };
    let round_epoch: u64 = row.try_get("round_epoch")?;
    // The order id is the primary key and starts with the goods id: a LIKE with that prefix
    // reads only this goods' range. "!" escapes the LIKE wildcards a goods id may hold ("_").
    let prefix = goods_id
        .replace('!', "!!")
        .replace('_', "!_")
        .replace('%', "!%");
    let orders: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM orders
         WHERE order_id LIKE ? ESCAPE '!' AND goods_id = ?
           AND CAST(SUBSTRING_INDEX(SUBSTRING_INDEX(order_id, '.', -2), '.', 1) AS UNSIGNED) > ?",
    )
    .bind(format!("{prefix}.%"))
    .bind(goods_id)
    .bind(round_epoch)
    .fetch_one(&mut **tx)
    .await?;
    Ok(Some(LockedSale {
        sale: sale_of(&row)?,
        epoch: row.try_get("epoch")?,
        history: History {
            orders,
            reserved: row.try_get("reserved")?,
            sold: row.try_get("sold")?,
            lapsed: row.try_get("lapsed")?,
            taken: row.try_get("taken")?,
        },
    }))
}

/// The definition in a row that has the `sales` columns of [`Sale`].
pub(crate) fn sale_of(row: &MySqlRow) -> sqlx::Result<Sale> {
    let utc = |t: NaiveDateTime| DateTime::<Utc>::from_naive_utc_and_offset(t, Utc);
    Ok(Sale {
        goods_id: row.try_get("goods_id")?,
        total_stock: row.try_get("total_stock")?,
        per_user_limit: row.try_get("per_user_limit")?,
        starts_at: utc(row.try_get("starts_at")?),
        ends_at: utc(row.try_get("ends_at")?),
        payment_window_s: row.try_get("payment_window_s")?,
        tier: {
            let tier: String = row.try_get("tier")?;
            Tier::parse(&tier).ok_or_else(|| sqlx::Error::ColumnDecode {
                index: "tier".into(),
                source: format!("unknown tier {tier:?}").into(),
            })?
        },
        fleet_rate: match (
            row.try_get::<Option<u32>, _>("fleet_rate_per_s")?,
            row.try_get::<Option<u32>, _>("fleet_burst")?,
        ) {
            (Some(per_second), Some(burst)) => Some(FleetRate { per_second, burst }),
            _ => None,
        },
        shards: row.try_get::<Option<u8>, _>("shards")?.map(u32::from),
    })
}

/// A sale definition with MySQL's own view of its stock.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct StoredSale {
    /// Where it stands now (its window, and what an operator did to it).
    pub state: SaleState,
    #[serde(flatten)]
    pub sale: Sale,
    /// Units not yet sold according to MySQL.
    pub stock: i64,
    pub reserved: i64,
    pub sold: i64,
    pub lapsed: i64,
    /// Order rows MySQL holds for this goods (not counted in a list of sales).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub orders: Option<i64>,
    /// The last epoch handed out for this goods (durable; see [`take_epoch`]).
    pub epoch: u64,
    /// Who decides now: `redis`, `fallback` (MySQL, while Redis failed or forgot) or
    /// `switching` (a re-seed is loading Redis).
    pub mode: String,
    /// The goods is decided in MySQL right now because Redis failed or forgot.
    pub fallback: bool,
    /// Units MySQL does not sell in fallback (Redis may have sold them).
    pub holdback: i64,
    /// Pause and stop (`control/`).
    #[serde(flatten)]
    pub controls: Controls,
}

/// The `sales` columns [`stored_of`] reads.
macro_rules! stored_columns {
    () => {
        "goods_id, total_stock, stock, per_user_limit, starts_at, ends_at, payment_window_s,
         tier, fleet_rate_per_s, fleet_burst, shards, mode, holdback, reserved, sold, lapsed,
         epoch, paused_at, pause_retry_s, stopped_at"
    };
}

/// Most sales one page of [`list_sales`] holds.
pub const LIST_PAGE_MAX: u32 = 500;

pub async fn load_sale(pool: &MySqlPool, goods_id: &str) -> sqlx::Result<Option<StoredSale>> {
    let row = sqlx::query(concat!(
        "SELECT ",
        stored_columns!(),
        ", (SELECT COUNT(*) FROM orders WHERE orders.goods_id = sales.goods_id) AS orders
         FROM sales WHERE goods_id = ?"
    ))
    .bind(goods_id)
    .fetch_optional(pool)
    .await?;
    let Some(row) = row else { return Ok(None) };
    let mut stored = stored_of(&row, Utc::now())?;
    stored.orders = Some(row.try_get("orders")?);
    Ok(Some(stored))
}

/// Every sale MySQL defines, by goods id, from the first after `after`; at most `limit`
/// ([`LIST_PAGE_MAX`] at most) per page.
pub async fn list_sales(
    pool: &MySqlPool,
    after: Option<&str>,
    limit: u32,
) -> sqlx::Result<Vec<StoredSale>> {
    let rows = sqlx::query(concat!(
        "SELECT ",
        stored_columns!(),
        " FROM sales WHERE goods_id > ? ORDER BY goods_id LIMIT ?"
    ))
    .bind(after.unwrap_or(""))
    .bind(limit.min(LIST_PAGE_MAX))
    .fetch_all(pool)
    .await?;
    let now = Utc::now();
    rows.iter().map(|row| stored_of(row, now)).collect()
}

/// A [`StoredSale`] from a row of [`stored_columns!`], its state as of `now`.
fn stored_of(row: &MySqlRow, now: DateTime<Utc>) -> sqlx::Result<StoredSale> {
    let utc =
        |t: Option<NaiveDateTime>| t.map(|t| DateTime::<Utc>::from_naive_utc_and_offset(t, Utc));
    let sale = sale_of(row)?;
    let controls = Controls {
        paused_at: utc(row.try_get("paused_at")?),
        pause_retry_s: row.try_get("pause_retry_s")?,
        stopped_at: utc(row.try_get("stopped_at")?),
    };
    let epoch: u64 = row.try_get("epoch")?;
    Ok(StoredSale {
        state: sale.state(now, epoch > 0, &controls),
        sale,
        stock: row.try_get("stock")?,
        reserved: row.try_get("reserved")?,
        sold: row.try_get("sold")?,
        lapsed: row.try_get("lapsed")?,
        orders: None,
        epoch,
        fallback: row.try_get::<String, _>("mode")? != "redis",
        mode: row.try_get("mode")?,
        holdback: row.try_get("holdback")?,
        controls,
    })
}
