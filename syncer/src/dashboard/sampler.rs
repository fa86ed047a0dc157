//! Reads every listed sale once a second: MySQL's sales table in one query, then each goods'
//! Redis counters and outbox. The cost depends on the number of sales (at most
//! [`super::GOODS_MAX`]), never on how many pages are open.

use std::sync::Arc;
use std::time::Duration;

use chrono::{NaiveDateTime, Utc};
use redis::AsyncCommands;
use sqlx::{MySqlPool, Row};
use tokio_util::sync::CancellationToken;

use super::history::Stock;
use super::{Board, Definition, Reading, SAMPLE_EVERY};
use crate::keys::KeySpace;
use crate::sale::Tier;
use crate::RedisConn;

/// Bound on each store's part of one tick (every goods' Redis reads together): a store that
/// hangs costs the page a stale second, never a pile of waiting ticks.
const STORE_TIMEOUT: Duration = Duration::from_secs(3);

pub struct Sampler {
    pub board: Arc<Board>,
    pub redis: RedisConn,
    pub keys: KeySpace,
    pub mysql: MySqlPool,
}

/// A sale as MySQL lists it.
#[derive(Clone)]
struct Listed {
    goods_id: String,
    definition: Definition,
    stock: Stock,
    written_ago_ms: Option<i64>,
}

/// One goods' Redis side.
#[derive(Default)]
struct Live {
    stock: Option<Stock>,
    outbox: u64,
    outbox_oldest_ms: Option<i64>,
}

impl Sampler {
    /// Samples every [`SAMPLE_EVERY`] until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) {
        // The last list MySQL gave: while MySQL is away, Redis is still read for it.
        let last_listed = std::sync::Mutex::new(Vec::new());
        crate::every_tick(SAMPLE_EVERY, &shutdown, || self.tick(&last_listed)).await;
    }

    async fn tick(&self, last_listed: &std::sync::Mutex<Vec<Listed>>) {
        let at_ms = Utc::now().timestamp_millis();
        let fresh = bounded(list_sales(&self.mysql, super::GOODS_MAX)).await;
        let mysql = fresh
            .as_ref()
            .map(|_| ())
            .map_err(|e| format!("mysql: {e}"));
        let listed = match (fresh, last_listed.lock()) {
            (Ok(fresh), Ok(mut last)) => {
                last.clone_from(&fresh);
                fresh
            }
            (Ok(fresh), Err(_)) => fresh,
            (Err(_), Ok(last)) => last.clone(),
            (Err(_), Err(_)) => Vec::new(),
        };
        let (lives, redis) = self.read_redis(&listed).await;
        let readings = listed
            .into_iter()
            .zip(lives)
            .map(|(sale, live)| Reading {
                goods_id: sale.goods_id,
                definition: sale.definition,
                mysql: mysql.is_ok().then_some(sale.stock),
                written_ago_ms: sale.written_ago_ms.filter(|_| mysql.is_ok()),
                redis: live.as_ref().and_then(|l| l.stock),
                outbox: live.as_ref().map(|l| l.outbox),
                outbox_oldest_ms: live.and_then(|l| l.outbox_oldest_ms),
            })
            .collect();
        self.board.record(at_ms, readings, mysql, redis);
    }

    /// Every goods' Redis side (None for a db goods, which has none, and for all of them
    /// when Redis could not be read).
    async fn read_redis(&self, listed: &[Listed]) -> (Vec<Option<Live>>, Result<(), String>) {
        let reads = listed.iter().map(|sale| async move {
            if sale.definition.tier == Tier::Db.as_str() {
                return Ok(None);
            }
            self.read_live(sale).await.map(Some)
        });
        match bounded(futures_util::future::try_join_all(reads)).await {
            Ok(lives) => (lives, Ok(())),
            Err(e) => (
                listed.iter().map(|_| None).collect(),
                Err(format!("redis: {e}")),
            ),
        }
    }

    async fn read_live(&self, sale: &Listed) -> anyhow::Result<Live> {
        let goods_id = &sale.goods_id;
        let stock = crate::preheat::live_stock(&self.redis, &self.keys, goods_id)
            .await?
            .map(|live| Stock {
                total: live.total as i64,
                available: live.available as i64,
                reserved: live.reserved as i64,
                sold: live.sold as i64,
                lapsed: live.lapsed as i64,
            });
        let mut live = Live {
            stock,
            ..Live::default()
        };
        let key_ids: Vec<String> = match sale.definition.shards {
            shards if shards > 1 => (0..shards)
                .map(|shard| crate::keys::shard_id(goods_id, shard))
                .collect(),
            _ => vec![goods_id.clone()],
        };
        let mut conn = self.redis.clone();
        for key_id in key_ids {
            let outbox = self.keys.goods(&key_id).outbox;
            live.outbox += conn.xlen::<_, u64>(&outbox).await?;
            let oldest: redis::streams::StreamRangeReply =
                conn.xrange_count(&outbox, "-", "+", 1).await?;
            // An entry id is `<ms>-<seq>`, the ms Redis's clock when the deduct wrote it.
            let oldest_ms = oldest
                .ids
                .first()
                .and_then(|entry| entry.id.split('-').next()?.parse::<i64>().ok());
            live.outbox_oldest_ms = match (live.outbox_oldest_ms, oldest_ms) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
        }
        Ok(live)
    }
}

async fn bounded<T, E: std::fmt::Display>(
    call: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, String> {
    match tokio::time::timeout(STORE_TIMEOUT, call).await {
        Ok(result) => result.map_err(|e| e.to_string()),
        Err(_) => Err(format!("no answer within {STORE_TIMEOUT:?}")),
    }
}

/// The sales ending last (live and coming ones first), at most `limit`.
async fn list_sales(mysql: &MySqlPool, limit: usize) -> sqlx::Result<Vec<Listed>> {
    // The age of the last write is taken by MySQL from its own clock: `updated_at` is set
    // in the server's time zone, which need not be the syncer's.
    let rows = sqlx::query(
        "SELECT goods_id, tier, mode, shards, CAST(total_stock AS SIGNED) AS total, stock, \
           reserved, sold, lapsed, starts_at, ends_at, \
           CAST(TIMESTAMPDIFF(MICROSECOND, updated_at, CURRENT_TIMESTAMP(3)) DIV 1000 AS SIGNED) \
             AS written_ago_ms \
         FROM sales ORDER BY ends_at DESC, goods_id LIMIT ?",
    )
    .bind(limit as u64)
    .fetch_all(mysql)
    .await?;
    // Sale windows are stored as UTC (`db::save_sale`).
    let utc_ms = |t: NaiveDateTime| t.and_utc().timestamp_millis();
    rows.iter()
        .map(|row| {
            Ok(Listed {
                goods_id: row.try_get("goods_id")?,
                definition: Definition {
                    tier: row.try_get("tier")?,
                    mode: row.try_get("mode")?,
                    shards: row.try_get::<Option<u8>, _>("shards")?.map_or(1, u32::from),
                    starts_at_ms: utc_ms(row.try_get("starts_at")?),
                    ends_at_ms: utc_ms(row.try_get("ends_at")?),
                },
                stock: Stock {
                    total: row.try_get("total")?,
                    available: row.try_get("stock")?,
                    reserved: row.try_get("reserved")?,
                    sold: row.try_get("sold")?,
                    lapsed: row.try_get("lapsed")?,
                },
                written_ago_ms: row.try_get("written_ago_ms")?,
            })
        })
        .collect()
}
