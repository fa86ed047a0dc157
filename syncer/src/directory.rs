//! Who decides each goods right now, as MySQL says: its tier, its mode (Redis, the MySQL
//! fallback, or a re-seed under way) and the last epoch known to be loaded into Redis. The
//! deducter reads it for every batch, so it is a map in memory, refreshed from MySQL every
//! [`REFRESH_EVERY`] and at once (at most every [`REFRESH_MIN_GAP`]) when a decision finds it
//! stale. Stale for a moment is safe: MySQL's decider checks the mode again under the sale
//! row's lock, and the deduct script refuses an epoch behind the one given here.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use sqlx::{MySqlPool, Row};
use tokio_util::sync::CancellationToken;

use crate::sale::Tier;

pub const REFRESH_EVERY: Duration = Duration::from_millis(500);
/// How long a goods MySQL does not have is taken as unknown before it is looked up again:
/// junk goods ids cost one primary-key lookup per this long each.
const MISS_TTL: Duration = Duration::from_millis(500);
const MISSES_MAX: usize = 10_000;
/// A goods is looked up again (its route found stale) at most this often.
const RELOAD_MIN_GAP: Duration = Duration::from_millis(20);
const REFRESH_MIN_GAP: Duration = Duration::from_millis(100);
/// Sales read per refresh at most: those not ended more than a day ago.
const SALES_MAX: i64 = 100_000;

fn route_of(row: &sqlx::mysql::MySqlRow) -> sqlx::Result<Route> {
    let tier: String = row.try_get("tier")?;
    let mode: String = row.try_get("mode")?;
    Ok(Route {
        tier: Tier::parse(&tier).unwrap_or_default(),
        mode: Mode::parse(&mode),
        loaded_epoch: row.try_get("loaded_epoch")?,
        epoch: row.try_get("epoch")?,
        per_user_limit: row.try_get("per_user_limit")?,
        shards: row
            .try_get::<Option<u8>, _>("shards")?
            .map_or(1, u32::from)
            .max(1),
    })
}

/// Who decides a redis or dual_write goods.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Redis,
    /// MySQL decides: Redis failed or forgot.
    Fallback,
    /// A re-seed is loading Redis from MySQL: nobody decides for that moment.
    Switching,
}

impl Mode {
    pub fn parse(text: &str) -> Mode {
        match text {
            "fallback" => Mode::Fallback,
            "switching" => Mode::Switching,
            _ => Mode::Redis,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Redis => "redis",
            Mode::Fallback => "fallback",
            Mode::Switching => "switching",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    pub tier: Tier,
    pub mode: Mode,
    /// The last epoch known to be loaded into Redis (0: never loaded).
    pub loaded_epoch: u64,
    /// The last epoch handed out (0: never preheated).
    pub epoch: u64,
    pub per_user_limit: u32,
    /// Shards of a `redis_sharded` goods (1: unsharded).
    pub shards: u32,
}

impl Route {
    /// MySQL decides this goods now.
    pub fn in_mysql(&self) -> bool {
        self.tier == Tier::Db || self.mode == Mode::Fallback
    }
}

struct Inner {
    routes: HashMap<String, Route>,
    refreshed: Option<Instant>,
}

#[derive(Clone)]
pub struct Directory {
    inner: Arc<RwLock<Inner>>,
    /// Goods looked up and not found, and when.
    misses: Arc<std::sync::Mutex<HashMap<String, Instant>>>,
    /// Goods whose route was looked up again, and when.
    reloads: Arc<std::sync::Mutex<HashMap<String, Instant>>>,
    mysql: MySqlPool,
    /// Serialises refreshes, so a burst of stale answers costs one query.
    refreshing: Arc<tokio::sync::Mutex<()>>,
}

impl Directory {
    /// An empty directory; [`Directory::refresh`] fills it.
    pub fn new(mysql: MySqlPool) -> Directory {
        Directory {
            inner: Arc::new(RwLock::new(Inner {
                routes: HashMap::new(),
                refreshed: None,
            })),
            misses: Arc::new(std::sync::Mutex::new(HashMap::new())),
            reloads: Arc::new(std::sync::Mutex::new(HashMap::new())),
            mysql,
            refreshing: Arc::new(tokio::sync::Mutex::new(())),
        }
    }

    /// The route of a goods MySQL defines (None: MySQL has no such sale, as far as the last
    /// refresh knows).
    pub fn route(&self, goods_id: &str) -> Option<Route> {
        let inner = self.inner.read().unwrap_or_else(|e| e.into_inner());
        inner.routes.get(goods_id).copied()
    }

    /// The route of a goods, looking it up in MySQL if the last refresh did not know it (a
    /// sale defined or preheated since, through any syncer): a goods must not be decided by
    /// the wrong store, or as unknown, for the length of a refresh.
    pub async fn lookup(&self, goods_id: &str) -> Option<Route> {
        if let Some(route) = self.route(goods_id) {
            return Some(route);
        }
        {
            let misses = self.misses.lock().unwrap_or_else(|e| e.into_inner());
            if misses
                .get(goods_id)
                .is_some_and(|at| at.elapsed() < MISS_TTL)
            {
                return None;
            }
        }
        // Read and written under the refresh lock, as a refresh is: a route read before a
        // change (a goods moved to MySQL) must not land after a refresh that read the change,
        // or the goods would be routed to the store it left until the next refresh.
        let _one = self.refreshing.lock().await;
        let row = sqlx::query(
            "SELECT tier, mode, loaded_epoch, epoch, per_user_limit, shards FROM sales WHERE goods_id = ?",
        )
        .bind(goods_id)
        .fetch_optional(&self.mysql)
        .await;
        match row {
            Ok(Some(row)) => match route_of(&row) {
                Ok(route) => {
                    let mut inner = self.inner.write().unwrap_or_else(|e| e.into_inner());
                    inner.routes.insert(goods_id.to_owned(), route);
                    Some(route)
                }
                Err(e) => {
                    tracing::warn!(goods_id, error = %e, "unreadable sale row");
                    None
                }
            },
            Ok(None) => {
                let mut misses = self.misses.lock().unwrap_or_else(|e| e.into_inner());
                if misses.len() >= MISSES_MAX {
                    misses.clear();
                }
                misses.insert(goods_id.to_owned(), Instant::now());
                None
            }
            Err(e) => {
                tracing::warn!(goods_id, error = %e, "could not look the goods up in MySQL");
                None
            }
        }
    }

    /// Looks a known goods up again in MySQL (its route was found stale), at most every
    /// [`RELOAD_MIN_GAP`] per goods; returns the route as it now stands.
    pub async fn reload(&self, goods_id: &str) -> Option<Route> {
        {
            let mut reloads = self.reloads.lock().unwrap_or_else(|e| e.into_inner());
            if reloads
                .get(goods_id)
                .is_some_and(|at| at.elapsed() < RELOAD_MIN_GAP)
            {
                return self.route(goods_id);
            }
            if reloads.len() >= MISSES_MAX {
                reloads.clear();
            }
            reloads.insert(goods_id.to_owned(), Instant::now());
        }
        {
            let mut inner = self.inner.write().unwrap_or_else(|e| e.into_inner());
            inner.routes.remove(goods_id);
        }
        self.misses
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(goods_id);
        self.lookup(goods_id).await
    }

    /// Forgets what this directory knows of a goods (this process changed it): its next
    /// attempt looks it up.
    pub fn forget(&self, goods_id: &str) {
        self.inner
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .routes
            .remove(goods_id);
        for map in [&self.misses, &self.reloads] {
            map.lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(goods_id);
        }
    }

    /// Goods MySQL decides now (db tier, fallback).
    pub fn in_mysql(&self) -> Vec<String> {
        let inner = self.inner.read().unwrap_or_else(|e| e.into_inner());
        inner
            .routes
            .iter()
            .filter(|(_, r)| r.in_mysql())
            .map(|(g, _)| g.clone())
            .collect()
    }

    /// Goods in a mode other than `redis` (the recoverer's work list).
    pub fn not_in_redis(&self) -> Vec<(String, Route)> {
        let inner = self.inner.read().unwrap_or_else(|e| e.into_inner());
        inner
            .routes
            .iter()
            .filter(|(_, r)| r.tier != Tier::Db && r.mode != Mode::Redis)
            .map(|(g, r)| (g.clone(), *r))
            .collect()
    }

    /// Goods Redis should hold now: redis or dual_write, in mode redis, loaded at least once.
    pub fn loaded_in_redis(&self) -> Vec<(String, Route)> {
        let inner = self.inner.read().unwrap_or_else(|e| e.into_inner());
        inner
            .routes
            .iter()
            .filter(|(_, r)| r.tier != Tier::Db && r.mode == Mode::Redis && r.loaded_epoch > 0)
            .map(|(g, r)| (g.clone(), *r))
            .collect()
    }

    /// Reads every sale not ended more than a day ago.
    pub async fn refresh(&self) -> sqlx::Result<()> {
        let _one = self.refreshing.lock().await;
        let rows = sqlx::query(
            "SELECT goods_id, tier, mode, loaded_epoch, epoch, per_user_limit, shards FROM sales
             WHERE ends_at > UTC_TIMESTAMP(3) - INTERVAL 1 DAY LIMIT ?",
        )
        .bind(SALES_MAX)
        .fetch_all(&self.mysql)
        .await?;
        let mut routes = HashMap::with_capacity(rows.len());
        for row in rows {
            routes.insert(row.try_get("goods_id")?, route_of(&row)?);
        }
        let mut inner = self.inner.write().unwrap_or_else(|e| e.into_inner());
        inner.routes = routes;
        inner.refreshed = Some(Instant::now());
        Ok(())
    }

    /// Refreshes now unless a refresh happened in the last [`REFRESH_MIN_GAP`].
    pub async fn refresh_soon(&self) {
        let recent = {
            let inner = self.inner.read().unwrap_or_else(|e| e.into_inner());
            inner
                .refreshed
                .is_some_and(|at| at.elapsed() < REFRESH_MIN_GAP)
        };
        if !recent {
            if let Err(e) = self.refresh().await {
                tracing::warn!(error = %e, "could not refresh the sales directory from MySQL");
            }
        }
    }

    /// Refreshes every [`REFRESH_EVERY`] until `shutdown`.
    pub fn spawn_refresher(&self, shutdown: CancellationToken) {
        let directory = self.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(REFRESH_EVERY);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = every.tick() => {}
                }
                if let Err(e) = directory.refresh().await {
                    tracing::warn!(error = %e, "could not refresh the sales directory from MySQL");
                }
            }
        });
    }
}
