//! The sync pipeline's fixture: a private redis-server (or, with [`Pipeline::start_cluster`],
//! a private Redis Cluster), a Tansu broker, a fresh MariaDB database and the syncer's HTTP
//! service (for deducts and the admin API). Tests add the relay and the writer as processes of
//! their own, so they can kill them.

use std::collections::{BTreeSet, HashSet};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use redis::AsyncCommands;
use serde_json::{json, Value};
use sqlx::Row;

use crate::admin::Admin;
use crate::kafka_broker::KafkaBroker;
use crate::mysql_db::TestDatabase;
use crate::process::{unique_suffix, wait_for, Scratch};
use crate::redis_cluster::RedisCluster;
use crate::redis_server::RedisServer;
use crate::stack::{now_ms, EDGE_SECRET};
use crate::syncer::{syncer_binary, Role, SyncerArgs, SyncerProcess};
use crate::test_redis::TestRedis;

/// Environment for a syncer whose sweeper runs every 50 ms, so expiry in a test is prompt.
pub const FAST_SWEEPER: &[(&str, &str)] = &[("SECKILL_SWEEP_EVERY_MS", "50")];

/// Deduct calls in flight at once while selling.
const SELL_CONCURRENCY: usize = 64;

/// On one redis-server unless `R` says otherwise ([`RedisCluster`]).
pub struct Pipeline<R: TestRedis = RedisServer> {
    pub api: SyncerProcess,
    pub broker: KafkaBroker,
    pub redis: R,
    pub db: TestDatabase,
    pub prefix: String,
    pub http: reqwest::Client,
    pub scratch: Scratch,
}

impl Pipeline<RedisServer> {
    pub async fn start(label: &str) -> anyhow::Result<Pipeline> {
        Self::start_with(label, &[]).await
    }

    /// Starts the fixture with extra environment for the HTTP service (say, a faster sweeper).
    pub async fn start_with(label: &str, env: &[(&str, &str)]) -> anyhow::Result<Pipeline> {
        Self::start_custom(label, &[], env, &[]).await
    }

    /// Starts the fixture with extra arguments for redis-server (say
    /// [`crate::redis_server::AOF_EVERYSEC`]), extra environment and extra command-line
    /// arguments for the HTTP service (say `--fallback-rate 100`).
    pub async fn start_custom(
        label: &str,
        redis_args: &[&str],
        env: &[(&str, &str)],
        serve_args: &[&str],
    ) -> anyhow::Result<Pipeline> {
        Pipeline::start_on(label, redis_args, env, serve_args).await
    }
}

impl Pipeline<RedisCluster> {
    /// On a private Redis Cluster of three masters (no replicas): the syncer gets its
    /// `redis+cluster://` URL.
    pub async fn start_cluster(label: &str) -> anyhow::Result<Self> {
        Self::start_on(label, &[], &[], &[]).await
    }
}

impl<R: TestRedis> Pipeline<R> {
    /// Starts the fixture on `R` (every redis-server with `redis_args`), with extra
    /// environment and command-line arguments for the HTTP service.
    pub async fn start_on(
        label: &str,
        redis_args: &[&str],
        env: &[(&str, &str)],
        serve_args: &[&str],
    ) -> anyhow::Result<Self> {
        let scratch = Scratch::new(&format!("seckill-{label}"))?;
        let redis = R::start_in(&scratch.path, redis_args).await?;
        let db = TestDatabase::create(label).await?;
        let broker = KafkaBroker::start(&scratch.path).await?;
        let prefix = format!("t{}", unique_suffix());
        let args = SyncerArgs {
            redis_url: &redis.url(),
            mysql_url: &db.url(),
            key_prefix: &prefix,
            kafka: Some(&broker.bootstrap()),
        };
        let serve = Role::Serve { pipeline: false };
        let api =
            SyncerProcess::start_role_with(&scratch.path, &args, serve, env, serve_args).await?;
        Ok(Pipeline {
            api,
            broker,
            redis,
            db,
            prefix,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()?,
            scratch,
        })
    }

    /// Starts a relay or writer process; `mysql_url` overrides the database address (to go
    /// through a proxy the test can cut).
    pub async fn spawn(
        &self,
        role: Role,
        mysql_url: Option<&str>,
        env: &[(&str, &str)],
    ) -> anyhow::Result<SyncerProcess> {
        let db_url = self.db.url();
        let args = SyncerArgs {
            redis_url: &self.redis.url(),
            mysql_url: mysql_url.unwrap_or(&db_url),
            key_prefix: &self.prefix,
            kafka: Some(&self.broker.bootstrap()),
        };
        SyncerProcess::start_role(&self.scratch.path, &args, role, env).await
    }

    /// Starts the relay (as `relay-0`) and a writer taking batches of `batch_size` events or
    /// `batch_wait_ms`, as processes of their own.
    pub async fn spawn_relay_and_writer(
        &self,
        batch_size: u32,
        batch_wait_ms: u32,
    ) -> anyhow::Result<(SyncerProcess, SyncerProcess)> {
        let relay = Role::Relay {
            name: "relay-0".into(),
        };
        let writer = Role::Write {
            batch_size,
            batch_wait_ms,
        };
        Ok((
            self.spawn(relay, None, &[]).await?,
            self.spawn(writer, None, &[]).await?,
        ))
    }

    pub async fn open_sale(
        &self,
        goods_id: &str,
        stock: u64,
        per_user_limit: u32,
    ) -> anyhow::Result<()> {
        let now = now_ms();
        self.define_sale(goods_id, stock, per_user_limit, now + 3_600_000, 900)
            .await
    }

    /// Defines and preheats a sale open from a minute ago until `ends_at_ms`.
    pub async fn define_sale(
        &self,
        goods_id: &str,
        stock: u64,
        per_user_limit: u32,
        ends_at_ms: i64,
        payment_window_s: u32,
    ) -> anyhow::Result<()> {
        let admin = self.admin();
        let window = (now_ms() - 60_000, ends_at_ms);
        admin
            .define_sale(goods_id, stock, per_user_limit, window, payment_window_s)
            .await?;
        admin.preheat(goods_id, false).await?;
        Ok(())
    }

    /// The syncer's authenticated API.
    pub fn admin(&self) -> Admin<'_> {
        Admin::new(&self.http, self.api.url())
    }

    /// One purchase through the deduct endpoint; returns the order id if it won.
    pub async fn buy(
        &self,
        goods_id: &str,
        user: &str,
        request_id: &str,
    ) -> anyhow::Result<Option<String>> {
        let reply: Value = self
            .http
            .post(format!("{}{}", self.api.url(), seckill_api::DEDUCT_PATH))
            .header(seckill_api::SECRET_HEADER, EDGE_SECRET)
            .json(&json!({"goods_id": goods_id, "user_id": user, "quantity": 1, "request_id": request_id}))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        Ok(reply["order_id"].as_str().map(str::to_owned))
    }

    /// One attempt of one unit through `POST /v1/deduct`, sent once: its status and body.
    pub async fn deduct_once(
        &self,
        goods_id: &str,
        user: &str,
        request_id: &str,
    ) -> anyhow::Result<(u16, Value)> {
        let response = self
            .http
            .post(format!("{}{}", self.api.url(), seckill_api::DEDUCT_PATH))
            .header(seckill_api::SECRET_HEADER, EDGE_SECRET)
            .json(&json!({"goods_id": goods_id, "user_id": user, "quantity": 1, "request_id": request_id}))
            .send()
            .await?;
        crate::admin::status_and_body(response).await
    }

    /// One attempt of one unit through `POST /v1/deduct`, retried with the same request id
    /// through 503s (a loaded machine's slow Redis call, a goods switching, stock moving
    /// between shards: the gate's buyers are told to retry) for up to `patience`: the final
    /// answer. Any other status fails.
    pub async fn deduct_patiently(
        &self,
        goods_id: &str,
        user: &str,
        request_id: &str,
        patience: Duration,
    ) -> anyhow::Result<Value> {
        let deadline = std::time::Instant::now() + patience;
        loop {
            let (status, body) = self.deduct_once(goods_id, user, request_id).await?;
            if status == 200 {
                return Ok(body);
            }
            anyhow::ensure!(status == 503, "{status} {body}");
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "{user} got 503 for {patience:?}: {body}"
            );
            // A poll inside the buyer's deadline: a 503 asks for a retry in a moment.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Sells `count` units to distinct users `{tag}-0..count`; returns the order ids.
    pub async fn sell(
        self: &Arc<Self>,
        goods_id: &str,
        tag: &str,
        count: usize,
    ) -> anyhow::Result<Vec<String>> {
        let slots = Arc::new(tokio::sync::Semaphore::new(SELL_CONCURRENCY));
        let mut tasks = Vec::with_capacity(count);
        for i in 0..count {
            let permit = slots.clone().acquire_owned().await?;
            let pipeline = self.clone();
            let goods_id = goods_id.to_owned();
            let user = format!("{tag}-{i}");
            tasks.push(tokio::spawn(async move {
                let _permit = permit;
                pipeline.buy(&goods_id, &user, &user).await
            }));
        }
        let mut orders = Vec::with_capacity(count);
        for task in tasks {
            if let Some(order) = task.await?? {
                orders.push(order);
            }
        }
        Ok(orders)
    }

    /// Confirms (`confirm`) or cancels (`cancel`) an order; returns the HTTP status and body.
    pub async fn settle(&self, order_id: &str, action: &str) -> anyhow::Result<(u16, Value)> {
        self.admin().settle(order_id, action).await
    }

    /// Redis's (available, reserved, sold, lapsed, total) of a sale.
    pub async fn redis_counters(
        &self,
        goods_id: &str,
    ) -> anyhow::Result<(i64, i64, i64, i64, i64)> {
        let mut conn = self.redis.connection().await?;
        let key = format!("{}:{{{goods_id}}}:sale", self.prefix);
        Ok(redis::cmd("HMGET")
            .arg(&key)
            .arg(&["available", "reserved", "sold", "lapsed", "total"])
            .query_async(&mut conn)
            .await?)
    }

    /// MySQL's (stock, reserved, sold, lapsed, total) of a sale.
    pub async fn mysql_counters(
        &self,
        goods_id: &str,
    ) -> anyhow::Result<(i64, i64, i64, i64, i64)> {
        let row = sqlx::query(
            "SELECT stock, reserved, sold, lapsed, CAST(total_stock AS SIGNED) FROM sales WHERE goods_id = ?",
        )
        .bind(goods_id)
        .fetch_one(&self.db.pool)
        .await?;
        Ok((
            row.try_get(0)?,
            row.try_get(1)?,
            row.try_get(2)?,
            row.try_get(3)?,
            row.try_get(4)?,
        ))
    }

    /// Final states of settled orders in Redis: order id -> "confirmed" | "released:<reason>".
    pub async fn settled_orders(
        &self,
        goods_id: &str,
    ) -> anyhow::Result<std::collections::HashMap<String, String>> {
        let mut conn = self.redis.connection().await?;
        Ok(conn
            .hgetall(format!("{}:{{{goods_id}}}:settled", self.prefix))
            .await?)
    }

    /// Order states in MySQL: order id -> (state, release reason).
    pub async fn mysql_orders(
        &self,
        goods_id: &str,
    ) -> anyhow::Result<std::collections::HashMap<String, (String, Option<String>)>> {
        Ok(
            sqlx::query("SELECT order_id, state, release_reason FROM orders WHERE goods_id = ?")
                .bind(goods_id)
                .fetch_all(&self.db.pool)
                .await?
                .iter()
                .filter_map(|row| {
                    Some((
                        row.try_get(0).ok()?,
                        (row.try_get(1).ok()?, row.try_get(2).ok()?),
                    ))
                })
                .collect(),
        )
    }

    /// Order rows in MySQL for a goods, and how many distinct order ids they have.
    pub async fn order_rows(&self, goods_id: &str) -> anyhow::Result<(i64, i64)> {
        let row =
            sqlx::query("SELECT COUNT(*), COUNT(DISTINCT order_id) FROM orders WHERE goods_id = ?")
                .bind(goods_id)
                .fetch_one(&self.db.pool)
                .await?;
        Ok((row.try_get(0)?, row.try_get(1)?))
    }

    pub async fn order_ids(&self, goods_id: &str) -> anyhow::Result<HashSet<String>> {
        Ok(
            sqlx::query("SELECT order_id FROM orders WHERE goods_id = ?")
                .bind(goods_id)
                .fetch_all(&self.db.pool)
                .await?
                .iter()
                .filter_map(|row| row.try_get(0).ok())
                .collect(),
        )
    }

    /// MySQL's (stock, reserved, sold) of a sale.
    pub async fn mysql_stock(&self, goods_id: &str) -> anyhow::Result<(i64, i64, i64)> {
        let row = sqlx::query("SELECT stock, reserved, sold FROM sales WHERE goods_id = ?")
            .bind(goods_id)
            .fetch_one(&self.db.pool)
            .await?;
        Ok((row.try_get(0)?, row.try_get(1)?, row.try_get(2)?))
    }

    /// Redis's (available, reserved, sold) of a sale.
    pub async fn redis_stock(&self, goods_id: &str) -> anyhow::Result<(i64, i64, i64)> {
        let mut conn = self.redis.connection().await?;
        let key = format!("{}:{{{goods_id}}}:sale", self.prefix);
        let (a, r, s): (i64, i64, i64) = redis::cmd("HMGET")
            .arg(&key)
            .arg(&["available", "reserved", "sold"])
            .query_async(&mut conn)
            .await?;
        Ok((a, r, s))
    }

    pub async fn outbox_len(&self, goods_id: &str) -> anyhow::Result<u64> {
        let mut conn = self.redis.connection().await?;
        Ok(conn
            .xlen(format!("{}:{{{goods_id}}}:outbox", self.prefix))
            .await?)
    }

    /// Waits until MySQL holds `rows` orders for the goods.
    pub async fn wait_for_rows(
        &self,
        goods_id: &str,
        rows: i64,
        deadline: Duration,
    ) -> anyhow::Result<()> {
        wait_for(
            &format!("{rows} order rows for {goods_id}"),
            deadline,
            || async {
                let (count, _) = self.order_rows(goods_id).await?;
                anyhow::ensure!(count <= rows, "{count} rows, more than the {rows} sold");
                Ok((count == rows).then_some(()))
            },
        )
        .await
    }

    /// Waits until MySQL's `sales.reserved` of a goods reaches `units`. For timing a writer:
    /// the counter is one primary-key read, moved in the same transaction as the rows,
    /// whereas [`Pipeline::wait_for_rows`] counts the rows every poll, and at 200,000 rows
    /// that count takes a large share of the very MySQL whose speed is measured. The caller
    /// counts the rows once afterwards.
    pub async fn wait_for_reserved_units(
        &self,
        goods_id: &str,
        units: i64,
        deadline: Duration,
    ) -> anyhow::Result<()> {
        wait_for(
            &format!("{units} reserved units of {goods_id} in MySQL"),
            deadline,
            || async {
                let reserved: i64 =
                    sqlx::query_scalar("SELECT reserved FROM sales WHERE goods_id = ?")
                        .bind(goods_id)
                        .fetch_one(&self.db.pool)
                        .await?;
                anyhow::ensure!(
                    reserved <= units,
                    "{reserved} units reserved, more than the {units} sold"
                );
                Ok((reserved == units).then_some(()))
            },
        )
        .await
    }

    /// Waits until MySQL holds at least `rows` orders for the goods (a writer making progress).
    pub async fn wait_for_rows_at_least(
        &self,
        goods_id: &str,
        rows: i64,
        deadline: Duration,
    ) -> anyhow::Result<()> {
        wait_for(
            &format!("at least {rows} order rows for {goods_id}"),
            deadline,
            || async { Ok((self.order_rows(goods_id).await?.0 >= rows).then_some(())) },
        )
        .await
    }

    /// Waits until the goods' outbox is empty and MySQL's counters equal Redis's.
    pub async fn wait_for_counters_to_match(
        &self,
        goods_id: &str,
        deadline: Duration,
    ) -> anyhow::Result<()> {
        wait_for(
            &format!("MySQL's counters of {goods_id} to match Redis's"),
            deadline,
            || async {
                let redis = self.redis_counters(goods_id).await?;
                let mysql = self.mysql_counters(goods_id).await?;
                Ok((self.outbox_len(goods_id).await? == 0 && redis == mysql).then_some(()))
            },
        )
        .await
    }

    /// Runs `statement` (one `?`, bound to `order_id`) on MySQL: it must change exactly that
    /// order's row (an accident the test stages).
    pub async fn change_order_row(&self, statement: &str, order_id: &str) -> anyhow::Result<()> {
        let done = sqlx::query(statement)
            .bind(order_id)
            .execute(&self.db.pool)
            .await?;
        anyhow::ensure!(
            done.rows_affected() == 1,
            "{statement} {order_id}: {} rows",
            done.rows_affected()
        );
        Ok(())
    }

    /// A `seckill-syncer` command line for `subcommand` against this fixture's stores.
    pub fn command(&self, subcommand: &str) -> anyhow::Result<std::process::Command> {
        let mut command = std::process::Command::new(syncer_binary()?);
        command
            .arg(subcommand)
            .args(["--redis-url", &self.redis.url()])
            .args(["--mysql-url", &self.db.url()])
            .args(["--key-prefix", &self.prefix]);
        Ok(command)
    }

    /// Runs `seckill-syncer reconcile --json`; returns its exit code and report.
    pub fn reconcile(&self, extra: &[&str]) -> anyhow::Result<(i32, Value)> {
        let output = self
            .command("reconcile")?
            .args(["--kafka-brokers", &self.broker.bootstrap()])
            .arg("--json")
            .args(extra)
            .output()?;
        let code = output.status.code().unwrap_or(-1);
        let report = serde_json::from_slice(&output.stdout).with_context(|| {
            format!(
                "reconcile printed no report (exit {code}): {}",
                String::from_utf8_lossy(&output.stderr)
            )
        })?;
        Ok((code, report))
    }
}

/// The epoch in an order id `goods.epoch.sequence`.
pub fn epoch_of(order_id: &str) -> u64 {
    order_id
        .rsplit('.')
        .nth(1)
        .and_then(|e| e.parse().ok())
        .unwrap_or_else(|| panic!("no epoch in {order_id}"))
}

/// An order digest's (`reconcile --orders`) four difference counts: missing from MySQL,
/// missing from Redis, another buyer, another state.
pub fn differences(digest: &Value) -> [u64; 4] {
    [
        "missing_from_mysql",
        "missing_from_redis",
        "identity_differs",
        "state_differs",
    ]
    .map(|field| digest[field].as_u64().unwrap_or(u64::MAX))
}

/// An order digest's findings as (kind, order id).
pub fn findings(digest: &Value) -> BTreeSet<(String, String)> {
    digest["examples"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|f| {
            let text = |field: &str| f[field].as_str().unwrap_or_default().to_owned();
            (text("kind"), text("order_id"))
        })
        .collect()
}
