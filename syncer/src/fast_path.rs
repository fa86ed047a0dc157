//! The native sold-out fast path's switch: reads each listed goods' stock from Redis every
//! `every` and sets its Envoy runtime key (`seckill.sold_out.<goods>`, see
//! `seckill_api::fast_path`) on every listed Envoy through its admin API: 100 while the goods
//! is sold out, so Envoy's own route answers it without entering the wasm VM; 0 as soon as
//! units are back (a release, a cancel, an expiry, added stock), so the filter decides again.
//!
//! What keeps a goods from being turned away while it has units: the key goes to 0 within one
//! round of units coming back (the sold-out cache's bound is seconds; a round is 100 ms by
//! default); a goods whose stock cannot be read (Redis down or forgot, a fenced sale, the sale
//! outside its window or paused) counts as not sold out; every Envoy gets the whole set again
//! every `reassert` (an Envoy that restarted forgot its admin layer, which is then the safe
//! default: the filter decides), and every change at once; and on shutdown every key goes to
//! 0. An Envoy this switch cannot reach keeps what it last had, so a goods whose units came
//! back may still be answered sold out there: `seckill_fast_path_envoy_errors_total` (on the
//! switch's own `--metrics-listen`) counts each update it missed, and the shipped alert
//! `SeckillFastPathSwitchFailing` pages while they go on.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use redis::AsyncCommands;
use tokio_util::sync::CancellationToken;

use crate::keys::KeySpace;
use crate::RedisConn;

/// Most goods one switch watches: each costs one Redis read a round.
pub const GOODS_MAX: usize = 256;
/// Most Envoys one switch sets.
pub const ENVOYS_MAX: usize = 64;
/// Bound on each round's Redis reads.
const REDIS_TIMEOUT: Duration = Duration::from_millis(500);
/// Bound on each admin call to an Envoy.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(1);

/// A goods' state as the switch reads it from its sale hash.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Stock {
    pub available: u64,
    pub paused: bool,
    pub fenced: bool,
    pub start_ms: i64,
    pub end_ms: i64,
}

/// Whether Envoy may answer the goods `sold_out` itself: only while the sale is open, not
/// paused (buyers are told `paused` with its Retry-After), not fenced (this Redis may have
/// forgotten units MySQL holds), and has no unit left. Anything unknown is `false`.
pub fn sold_out(stock: Option<&Stock>, now_ms: i64) -> bool {
    stock.is_some_and(|s| {
        s.available == 0 && !s.paused && !s.fenced && s.start_ms <= now_ms && now_ms < s.end_ms
    })
}

/// One Envoy's admin API and what this switch last set there (`None`: not known, so the next
/// round sets every key).
struct Envoy {
    admin: String,
    applied: Option<HashMap<String, bool>>,
    last_full: Instant,
}

pub struct FastPathSwitch {
    pub redis: RedisConn,
    pub keys: KeySpace,
    pub goods: Vec<String>,
    envoys: Vec<Envoy>,
    every: Duration,
    reassert: Duration,
    http: reqwest::Client,
}

impl FastPathSwitch {
    /// Checks the lists: 1 to [`GOODS_MAX`] valid goods ids, 1 to [`ENVOYS_MAX`] admin URLs
    /// (`http://host:port`).
    pub fn new(
        redis: RedisConn,
        keys: KeySpace,
        goods: Vec<String>,
        envoy_admins: Vec<String>,
        every: Duration,
        reassert: Duration,
    ) -> anyhow::Result<Self> {
        anyhow::ensure!(
            (1..=GOODS_MAX).contains(&goods.len()),
            "give 1 to {GOODS_MAX} goods for the fast path (got {})",
            goods.len()
        );
        for goods_id in &goods {
            seckill_api::validate_id(goods_id, seckill_api::ID_LEN_MAX)
                .map_err(|e| anyhow::anyhow!("fast-path goods id {goods_id:?} {e}"))?;
        }
        anyhow::ensure!(
            (1..=ENVOYS_MAX).contains(&envoy_admins.len()),
            "give 1 to {ENVOYS_MAX} Envoy admin URLs (got {})",
            envoy_admins.len()
        );
        let mut envoys = Vec::new();
        for admin in envoy_admins {
            let admin = admin.trim_end_matches('/').to_string();
            let parsed = reqwest::Url::parse(&admin)
                .map_err(|e| anyhow::anyhow!("Envoy admin URL {admin:?}: {e}"))?;
            anyhow::ensure!(
                parsed.scheme() == "http" || parsed.scheme() == "https",
                "Envoy admin URL {admin:?} must be http:// or https://"
            );
            envoys.push(Envoy {
                admin,
                applied: None,
                last_full: Instant::now(),
            });
        }
        let http = reqwest::Client::builder()
            .timeout(ADMIN_TIMEOUT)
            .build()
            .map_err(|e| anyhow::anyhow!("cannot build the HTTP client: {e}"))?;
        Ok(FastPathSwitch {
            redis,
            keys,
            goods,
            envoys,
            every,
            reassert,
            http,
        })
    }

    /// Runs rounds until `shutdown`, then turns every key off on every Envoy.
    pub async fn run(mut self, shutdown: CancellationToken) {
        crate::telemetry::register_fast_path();
        tracing::info!(
            goods = self.goods.len(),
            envoys = self.envoys.len(),
            every = ?self.every,
            "fast-path switch started"
        );
        while !shutdown.is_cancelled() {
            let started = Instant::now();
            let desired = self.desired().await;
            self.apply(&desired).await;
            let pause = self.every.saturating_sub(started.elapsed());
            tokio::select! {
                () = shutdown.cancelled() => {}
                () = tokio::time::sleep(pause) => {}
            }
        }
        let all_off: Vec<(String, bool)> = self.goods.iter().map(|g| (g.clone(), false)).collect();
        for envoy in &mut self.envoys {
            envoy.applied = None;
        }
        self.apply(&all_off).await;
        tracing::info!("fast-path switch stopped; every goods handed back to the filter");
    }

    /// Each goods and whether it is sold out now. A read that fails counts as not sold out.
    async fn desired(&self) -> Vec<(String, bool)> {
        let now_ms = chrono::Utc::now().timestamp_millis();
        let reads = self.goods.iter().map(|goods_id| async move {
            let read = tokio::time::timeout(REDIS_TIMEOUT, read_stock(&self.redis, &self.keys, goods_id));
            let stock = match read.await {
                Ok(Ok(stock)) => stock,
                Ok(Err(e)) => {
                    tracing::debug!(goods = %goods_id, error = %e, "fast path: cannot read the stock; the filter decides");
                    None
                }
                Err(_) => None,
            };
            let sold_out = sold_out(stock.as_ref(), now_ms);
            metrics::gauge!("seckill_fast_path_sold_out", "goods" => goods_id.clone())
                .set(if sold_out { 1.0 } else { 0.0 });
            (goods_id.clone(), sold_out)
        });
        futures_util::future::join_all(reads).await
    }

    /// Sends each Envoy what differs from what it has (everything when that is not known or
    /// the last full set is older than `reassert`), all Envoys at once.
    async fn apply(&mut self, desired: &[(String, bool)]) {
        let http = &self.http;
        let reassert = self.reassert;
        let calls = self.envoys.iter_mut().map(|envoy| async move {
            let full = envoy.applied.is_none() || envoy.last_full.elapsed() >= reassert;
            let changes: Vec<&(String, bool)> = desired
                .iter()
                .filter(|(goods, on)| {
                    full || envoy.applied.as_ref().and_then(|a| a.get(goods)) != Some(on)
                })
                .collect();
            if changes.is_empty() {
                return;
            }
            let query: Vec<(String, &str)> = changes
                .iter()
                .map(|(goods, on)| {
                    let value = if *on { "100" } else { "0" };
                    (seckill_api::fast_path::runtime_key(goods), value)
                })
                .collect();
            let call = http
                .post(format!("{}/runtime_modify", envoy.admin))
                .query(&query)
                .send()
                .await;
            match call.and_then(|r| r.error_for_status()) {
                Ok(_) => {
                    metrics::counter!("seckill_fast_path_updates_total").increment(1);
                    let applied = envoy.applied.get_or_insert_with(HashMap::new);
                    for (goods, on) in changes {
                        applied.insert(goods.clone(), *on);
                    }
                    if full {
                        envoy.last_full = Instant::now();
                    }
                }
                Err(e) => {
                    metrics::counter!("seckill_fast_path_envoy_errors_total").increment(1);
                    tracing::warn!(envoy = %envoy.admin, error = %e, "fast path: cannot set the runtime keys; retrying next round");
                    envoy.applied = None;
                }
            }
        });
        futures_util::future::join_all(calls).await;
    }
}

/// `available`, `pause_retry_ms`, `start_ms`, `end_ms` and `fenced` of a sale hash.
type SaleFields = (
    Option<i64>,
    Option<i64>,
    Option<i64>,
    Option<i64>,
    Option<String>,
);

/// The goods' stock from its sale hash; a `redis_sharded` goods' from its shards (summed,
/// units between shards counted as available). `None` when Redis has no sale for it.
async fn read_stock(
    redis: &RedisConn,
    keys: &KeySpace,
    goods_id: &str,
) -> anyhow::Result<Option<Stock>> {
    let mut conn = redis.clone();
    let sale = keys.goods(goods_id).sale;
    let fields: SaleFields = redis::cmd("HMGET")
        .arg(&sale)
        .arg(&[
            "available",
            "pause_retry_ms",
            "start_ms",
            "end_ms",
            "fenced",
        ])
        .query_async(&mut conn)
        .await?;
    if let (Some(available), paused, Some(start_ms), Some(end_ms), fenced) = fields {
        return Ok(Some(Stock {
            available: available.max(0) as u64,
            paused: paused.unwrap_or(0) > 0,
            fenced: fenced.as_deref() == Some("1"),
            start_ms,
            end_ms,
        }));
    }
    // A sharded goods: its own key has no sale, each shard has one.
    let live = crate::preheat::live_stock(redis, keys, goods_id)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut fenced = false;
    if live.is_some() {
        let shards: Option<u32> = conn
            .hget(
                keys.goods(&crate::keys::shard_id(goods_id, 0)).sale,
                "shards",
            )
            .await?;
        for shard in 0..shards.unwrap_or(0).min(crate::sale::SHARDS_MAX) {
            let sale = keys.goods(&crate::keys::shard_id(goods_id, shard)).sale;
            let mark: Option<String> = conn.hget(sale, "fenced").await?;
            fenced |= mark.as_deref() == Some("1");
        }
    }
    Ok(live.map(|live| Stock {
        available: live.available,
        paused: live.pause_retry_ms > 0,
        fenced,
        start_ms: live.start_ms,
        end_ms: live.end_ms,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(available: u64) -> Stock {
        Stock {
            available,
            start_ms: 1_000,
            end_ms: 2_000,
            ..Stock::default()
        }
    }

    #[test]
    fn only_an_open_sale_with_nothing_left_is_sold_out() {
        assert!(sold_out(Some(&open(0)), 1_500));
        assert!(!sold_out(Some(&open(1)), 1_500));
        assert!(!sold_out(None, 1_500), "unknown stock: the filter decides");
        assert!(!sold_out(Some(&open(0)), 999), "not started");
        assert!(!sold_out(Some(&open(0)), 2_000), "ended");
        let paused = Stock {
            paused: true,
            ..open(0)
        };
        assert!(!sold_out(Some(&paused), 1_500), "paused is answered paused");
        let fenced = Stock {
            fenced: true,
            ..open(0)
        };
        assert!(
            !sold_out(Some(&fenced), 1_500),
            "a fenced Redis may have forgotten units"
        );
    }
}
