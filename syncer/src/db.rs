//! MySQL access: the pool, the schema (sqlx migrations) and the sale definitions.

use std::time::Duration;

use chrono::{DateTime, NaiveDateTime, Utc};
use sqlx::mysql::{MySqlConnectOptions, MySqlPool, MySqlPoolOptions};
use sqlx::Row;

use crate::sale::Sale;

/// How long to wait for a connection from the pool before giving up on a request.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections per syncer process; the batched writer needs few, the admin API fewer.
const POOL_CONNECTIONS_MAX: u32 = 8;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Connects to MySQL and brings the schema up to date.
pub async fn connect(url: &str) -> anyhow::Result<MySqlPool> {
    let options: MySqlConnectOptions = url
        .parse()
        .map_err(|e| anyhow::anyhow!("bad MySQL URL: {e}"))?;
    let pool = MySqlPoolOptions::new()
        .max_connections(POOL_CONNECTIONS_MAX)
        .acquire_timeout(ACQUIRE_TIMEOUT)
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

/// Creates or replaces a sale definition. Replacing starts a new round: MySQL's counters are
/// reset to the new total (the caller must have checked that the sale is not live; order rows
/// of earlier rounds stay, their ids carry the earlier epoch).
pub async fn save_sale(pool: &MySqlPool, sale: &Sale) -> sqlx::Result<Saved> {
    // The new values are bound twice rather than read back with VALUES(col), which MySQL
    // deprecates (8.0.20), or with a row alias, which MariaDB lacks: one text for both.
    let mut query = sqlx::query(
        "INSERT INTO sales (goods_id, total_stock, stock, per_user_limit, starts_at, ends_at,
           payment_window_s)
         VALUES (?, ?, ?, ?, ?, ?, ?)
         ON DUPLICATE KEY UPDATE total_stock = ?, stock = ?, per_user_limit = ?,
           starts_at = ?, ends_at = ?, payment_window_s = ?,
           reserved = 0, sold = 0, lapsed = 0",
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
            .bind(sale.payment_window_s);
    }
    let result = query.execute(pool).await?;
    // MySQL counts 1 affected row for an insert and 2 for an update of an existing row.
    Ok(if result.rows_affected() == 1 {
        Saved::Created
    } else {
        Saved::Replaced
    })
}

/// A sale definition with MySQL's own view of its stock.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct StoredSale {
    #[serde(flatten)]
    pub sale: Sale,
    /// Units not yet sold according to MySQL.
    pub stock: i64,
    pub reserved: i64,
    pub sold: i64,
    pub lapsed: i64,
    /// Order rows MySQL holds for this goods.
    pub orders: i64,
}

pub async fn load_sale(pool: &MySqlPool, goods_id: &str) -> sqlx::Result<Option<StoredSale>> {
    let row = sqlx::query(
        "SELECT goods_id, total_stock, stock, per_user_limit, starts_at, ends_at, payment_window_s,
           reserved, sold, lapsed,
           (SELECT COUNT(*) FROM orders WHERE orders.goods_id = sales.goods_id) AS orders
         FROM sales WHERE goods_id = ?",
    )
    .bind(goods_id)
    .fetch_optional(pool)
    .await?;
    let Some(row) = row else { return Ok(None) };
    let utc = |t: NaiveDateTime| DateTime::<Utc>::from_naive_utc_and_offset(t, Utc);
    Ok(Some(StoredSale {
        sale: Sale {
            goods_id: row.try_get("goods_id")?,
            total_stock: row.try_get("total_stock")?,
            per_user_limit: row.try_get("per_user_limit")?,
            starts_at: utc(row.try_get("starts_at")?),
            ends_at: utc(row.try_get("ends_at")?),
            payment_window_s: row.try_get("payment_window_s")?,
        },
        stock: row.try_get("stock")?,
        reserved: row.try_get("reserved")?,
        sold: row.try_get("sold")?,
        lapsed: row.try_get("lapsed")?,
        orders: row.try_get("orders")?,
    }))
}
