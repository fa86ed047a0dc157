//! The whole local stack in one value: Redis, a MySQL database, the syncer, the stub shop and
//! Envoy with the filter. Tests, the demo and the benchmarks all start it the same way. Redis
//! is one redis-server, or with [`Stack::start_cluster`] a private Redis Cluster.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::Context;
use serde_json::{json, Value};

use crate::envoy::{filter_wasm, Envoy, LOCAL_TEMPLATE};
use crate::kafka_broker::KafkaBroker;
use crate::mysql_db::TestDatabase;
use crate::process::{free_port, unique_suffix, Scratch};
use crate::redis_cluster::RedisCluster;
use crate::redis_server::RedisServer;
use crate::shop::ShopStub;
use crate::syncer::{Role, SyncerArgs, SyncerProcess};
use crate::test_redis::TestRedis;

/// Each role's credential in the tests (`credentials.rs` in the syncer): the gate's, the
/// shop's, the operators' and a metrics scraper's. All different, as the syncer requires.
pub const EDGE_SECRET: &str = "local-test-edge-secret";
pub const SHOP_SECRET: &str = "local-test-shop-secret";
pub const ADMIN_SECRET: &str = "local-test-admin-secret";
pub const METRICS_SECRET: &str = "local-test-metrics-secret";

/// The credential a call to the syncer's `path` needs: the admin API's, the shop's for
/// confirm and cancel, a scraper's for metrics and the dashboard, the gate's for the rest
/// (deduct, claim, release).
/// (`path` may be a whole URL).
pub fn credential_for(path: &str) -> &'static str {
    let path = match path.split_once("://") {
        Some((_, rest)) => rest.find('/').map_or("/", |at| &rest[at..]),
        None => path,
    };
    let path = path.split('?').next().unwrap_or_default();
    if path.starts_with("/admin") {
        ADMIN_SECRET
    } else if path.ends_with("/confirm") || path.ends_with("/cancel") {
        SHOP_SECRET
    } else if path.starts_with("/metrics") || path.starts_with("/dashboard") {
        METRICS_SECRET
    } else {
        EDGE_SECRET
    }
}

/// The environment that gives a syncer `serve` every role's test credential.
pub fn credential_env() -> [(&'static str, &'static str); 4] {
    [
        ("SECKILL_EDGE_SECRET", EDGE_SECRET),
        ("SECKILL_SHOP_SECRET", SHOP_SECRET),
        ("SECKILL_ADMIN_SECRET", ADMIN_SECRET),
        ("SECKILL_METRICS_SECRET", METRICS_SECRET),
    ]
}

/// The key the harness's syncers sign winners' passes with (`--pass-key`, given to every
/// `serve` as `SECKILL_PASS_KEY`; a test's own environment may override it).
pub const PASS_KEY: &str = "test-2024=local-test-pass-secret-0123456789abcdef";

/// [`PASS_KEY`] as the shop's verifier holds it.
pub fn pass_keys() -> seckill_pass::Keys {
    let key: seckill_pass::Key = PASS_KEY.parse().expect("the harness's pass key is valid");
    seckill_pass::Keys::new([key]).expect("one key")
}

/// The plugin configuration the local stack uses unless a test changes it: generous limits so
/// that only the behaviour under test decides.
pub fn default_plugin_config() -> Value {
    json!({
        "route": { "methods": ["POST"], "path_template": "/seckill/{goods_id}/buy" },
        "goods_id": { "path": "goods_id" },
        "user_id": { "header": "x-user-id" },
        "quantity": { "source": { "query": "qty" }, "default": 1, "max": 5 },
        "request_id": { "header": "x-request-id" },
        // Generous: a correctness test must not fail because a loaded machine is slow;
        // latency is for the benchmarks.
        "deduct": { "cluster": "seckill_syncer", "timeout_ms": 10000, "secret_env": "SECKILL_EDGE_SECRET" },
        "rate_limit": { "default": { "per_second": 1000000.0, "burst": 1000000 } },
        "sold_out_cache_ms": 60000
    })
}

pub struct StackOptions {
    pub label: String,
    pub workers: u32,
    pub plugin_config: Value,
    /// Start no syncer: the filter's callouts go to a port where nothing listens.
    pub without_syncer: bool,
    /// Use (and keep) a database of this name instead of a throwaway one.
    pub kept_database: Option<String>,
    /// Also start a Kafka broker and run the syncer with its pipeline (relay, writer,
    /// periodic reconcile), so sales flow on to MySQL.
    pub pipeline: bool,
    /// Extra environment for the syncer (say `SECKILL_CLAIM_WINDOW_MS`).
    pub syncer_env: Vec<(&'static str, String)>,
    /// Extra command-line arguments for the syncer's `serve` (say `--fallback-rate 100`).
    pub syncer_args: Vec<String>,
    /// Extra arguments for the private redis-server (say [`crate::redis_server::AOF_ALWAYS`]).
    pub redis_args: Vec<&'static str>,
    /// Envoy's route timeout for the shop, in ms.
    pub shop_timeout_ms: u64,
    /// Goods given a native sold-out route in Envoy (`seckill_api::fast_path`); the test
    /// starts their switch ([`crate::fast_path::FastPathSwitch`]).
    pub fast_path_goods: Vec<String>,
}

impl StackOptions {
    /// A stack with its pipeline (sales reach MySQL) for a crowd that arrives at once: its
    /// first attempts come before any answer has confirmed the goods to the filter, so the
    /// small bucket of unconfirmed goods ids is opened too.
    pub fn for_a_crowd(label: &str) -> Self {
        let mut options = StackOptions::new(label);
        options.pipeline = true;
        options.plugin_config["rate_limit"]["unconfirmed"] =
            json!({"per_second": 1_000_000.0, "burst": 1_000_000});
        options
    }

    pub fn new(label: &str) -> Self {
        Self {
            label: label.to_owned(),
            workers: 1,
            plugin_config: default_plugin_config(),
            without_syncer: false,
            kept_database: None,
            pipeline: false,
            syncer_env: Vec::new(),
            syncer_args: Vec::new(),
            redis_args: Vec::new(),
            shop_timeout_ms: 5_000,
            fast_path_goods: Vec::new(),
        }
    }
}

/// On one redis-server unless `R` says otherwise ([`RedisCluster`]).
pub struct Stack<R: TestRedis = RedisServer> {
    // Field order is drop order: Envoy first, the stores last, the scratch dir at the very end.
    pub envoy: Envoy,
    pub syncer: Option<SyncerProcess>,
    pub shop: ShopStub,
    pub broker: Option<KafkaBroker>,
    pub redis: R,
    pub db: TestDatabase,
    pub key_prefix: String,
    pub http: reqwest::Client,
    /// What `envoy/local.yaml` was filled in with, for starting a variant of the gate.
    envoy_values: HashMap<&'static str, String>,
    pub scratch: Scratch,
}

/// What a buyer got back from the gate.
#[derive(Debug, Clone)]
pub struct BuyResult {
    pub status: u16,
    /// The `x-seckill-outcome` response header (what the gate decided).
    pub outcome: String,
    pub retry_after: Option<String>,
    /// The `x-seckill-order-id` response header (a winner's order id).
    pub order_id: Option<String>,
    pub body: Value,
}

impl Stack<RedisServer> {
    pub async fn start(options: StackOptions) -> anyhow::Result<Stack> {
        Stack::start_on(options).await
    }
}

impl Stack<RedisCluster> {
    /// On a private Redis Cluster of three masters (no replicas), every node started with
    /// `options.redis_args`; the syncer gets its `redis+cluster://` URL.
    pub async fn start_cluster(options: StackOptions) -> anyhow::Result<Self> {
        Stack::start_on(options).await
    }
}

impl<R: TestRedis> Stack<R> {
    /// Starts the stack on `R`.
    pub async fn start_on(options: StackOptions) -> anyhow::Result<Self> {
        let scratch = Scratch::new(&format!("seckill-{}", options.label))?;
        let redis = R::start_in(&scratch.path, &options.redis_args).await?;
        let db = match &options.kept_database {
            Some(name) => TestDatabase::create_named(name, true).await?,
            None => TestDatabase::create(&options.label).await?,
        };
        let key_prefix = format!("t{}", unique_suffix());
        let broker = if options.pipeline {
            Some(KafkaBroker::start(&scratch.path).await?)
        } else {
            None
        };
        let syncer = if options.without_syncer {
            None
        } else {
            let bootstrap = broker.as_ref().map(KafkaBroker::bootstrap);
            let args = SyncerArgs {
                redis_url: &redis.url(),
                mysql_url: &db.url(),
                key_prefix: &key_prefix,
                kafka: bootstrap.as_deref(),
            };
            let role = Role::Serve {
                pipeline: options.pipeline,
            };
            let env: Vec<(&str, &str)> = options
                .syncer_env
                .iter()
                .map(|(k, v)| (*k, v.as_str()))
                .collect();
            let cli: Vec<&str> = options.syncer_args.iter().map(String::as_str).collect();
            Some(SyncerProcess::start_role_with(&scratch.path, &args, role, &env, &cli).await?)
        };
        let syncer_port = match &syncer {
            Some(s) => s.port,
            None => free_port()?,
        };
        let shop = ShopStub::start().await?;
        let values = HashMap::from([
            ("SHOP_PORT", shop.addr.port().to_string()),
            (
                "SHOP_TIMEOUT",
                format!("{}s", options.shop_timeout_ms as f64 / 1000.0),
            ),
            ("SYNCER_PORT", syncer_port.to_string()),
            ("WASM_PATH", filter_wasm()?.display().to_string()),
            (
                "PLUGIN_CONFIG",
                // A JSON string is a valid YAML double-quoted scalar.
                serde_json::to_string(&options.plugin_config.to_string())?,
            ),
            (
                "FAST_ROUTES",
                crate::fast_path::routes(&options.fast_path_goods)?,
            ),
        ]);
        let envoy = Envoy::start(
            &scratch.path,
            LOCAL_TEMPLATE,
            values.clone(),
            options.workers,
        )
        .await?;
        Ok(Stack {
            envoy,
            envoy_values: values,
            syncer,
            shop,
            broker,
            redis,
            db,
            key_prefix,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()?,
            scratch,
        })
    }

    /// The placeholders `envoy/local.yaml` was filled in with (ports, wasm path, plugin
    /// configuration), to start another Envoy like the stack's with one of them changed.
    pub fn envoy_values(&self) -> HashMap<&'static str, String> {
        self.envoy_values.clone()
    }

    pub fn syncer(&self) -> anyhow::Result<&SyncerProcess> {
        self.syncer
            .as_ref()
            .context("this stack runs without a syncer")
    }

    /// Defines a sale through the admin API and preheats it. The window opens a minute ago
    /// and closes in an hour unless given.
    pub async fn open_sale(
        &self,
        goods_id: &str,
        stock: u64,
        per_user_limit: u32,
    ) -> anyhow::Result<()> {
        let now = now_ms();
        self.define_sale(
            goods_id,
            stock,
            per_user_limit,
            now - 60_000,
            now + 3_600_000,
        )
        .await?;
        self.preheat(goods_id, false).await?;
        Ok(())
    }

    /// The syncer's authenticated API.
    pub fn admin(&self) -> anyhow::Result<crate::admin::Admin<'_>> {
        Ok(crate::admin::Admin::new(&self.http, self.syncer()?.url()))
    }

    pub async fn define_sale(
        &self,
        goods_id: &str,
        stock: u64,
        per_user_limit: u32,
        starts_at_ms: i64,
        ends_at_ms: i64,
    ) -> anyhow::Result<()> {
        self.admin()?
            .define_sale(
                goods_id,
                stock,
                per_user_limit,
                (starts_at_ms, ends_at_ms),
                900,
            )
            .await
    }

    pub async fn preheat(&self, goods_id: &str, force: bool) -> anyhow::Result<Value> {
        self.admin()?.preheat(goods_id, force).await
    }

    /// The live counters in Redis, through the admin API.
    pub async fn live(&self, goods_id: &str) -> anyhow::Result<Value> {
        Ok(self.admin()?.sale(goods_id).await?["live"].clone())
    }

    /// Sends one buy request through Envoy.
    pub async fn buy(
        &self,
        goods_id: &str,
        user_id: &str,
        quantity: u32,
        request_id: &str,
    ) -> anyhow::Result<BuyResult> {
        let request = self
            .http
            .post(format!(
                "{}/seckill/{goods_id}/buy?qty={quantity}",
                self.envoy.url()
            ))
            .header("x-user-id", user_id)
            .header("x-request-id", request_id);
        send(request).await
    }

    /// A `seckill-syncer` command line for `subcommand` against this stack's stores (and its
    /// broker, if it runs one).
    pub fn command(&self, subcommand: &str) -> anyhow::Result<std::process::Command> {
        let mut command = std::process::Command::new(crate::syncer::syncer_binary()?);
        command
            .arg(subcommand)
            .args(["--redis-url", &self.redis.url()])
            .args(["--mysql-url", &self.db.url()])
            .args(["--key-prefix", &self.key_prefix]);
        if let Some(broker) = &self.broker {
            command.args(["--kafka-brokers", &broker.bootstrap()]);
        }
        Ok(command)
    }

    /// Runs `seckill-syncer sale --json ARGS...` (an operator's sale controls) against this
    /// stack's stores, with extra environment (say `SECKILL_CRASH_AT`).
    pub fn sale_cli(&self, args: &[&str], env: &[(&str, &str)]) -> anyhow::Result<CliRun> {
        let output = std::process::Command::new(crate::syncer::syncer_binary()?)
            .arg("sale")
            .args(["--redis-url", &self.redis.url()])
            .args(["--mysql-url", &self.db.url()])
            .args(["--key-prefix", &self.key_prefix])
            .arg("--json")
            .args(args)
            .envs(env.iter().copied())
            .output()?;
        Ok(CliRun {
            code: output.status.code(),
            json: serde_json::from_slice(&output.stdout).unwrap_or(Value::Null),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        })
    }

    /// Runs `seckill-syncer reconcile --json`; returns its exit code and report.
    pub fn reconcile(&self, extra: &[&str]) -> anyhow::Result<(i32, Value)> {
        let output = self
            .command("reconcile")?
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

    /// Raw Redis access for assertions (XLEN, HGETALL, ...); on a cluster, routed by key.
    pub async fn redis(&self) -> anyhow::Result<R::Conn> {
        self.redis.connection().await
    }

    pub fn goods_key(&self, goods_id: &str, suffix: &str) -> String {
        format!("{}:{{{goods_id}}}:{suffix}", self.key_prefix)
    }

    /// A digest of every key under this stack's prefix, to prove a request changed nothing.
    /// A sale hash is compared field by field without the sweeper's own stamps: `swept_ms` on
    /// every sweep (each second) and `claims_from_ms` after a gap between sweeps (a loaded
    /// machine can make one), whatever requests arrive.
    pub async fn redis_snapshot(&self) -> anyhow::Result<Vec<(String, String)>> {
        let mut conn = self.redis().await?;
        let mut keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{}:*", self.key_prefix))
            .query_async(&mut conn)
            .await?;
        keys.sort();
        let mut snapshot = Vec::with_capacity(keys.len());
        for key in keys {
            let digest = if key.ends_with("}:sale") {
                let mut fields: Vec<(String, String)> = redis::cmd("HGETALL")
                    .arg(&key)
                    .query_async(&mut conn)
                    .await?;
                fields.retain(|(field, _)| field != "swept_ms" && field != "claims_from_ms");
                fields.sort();
                format!("{fields:?}")
            } else {
                let dump: Option<Vec<u8>> =
                    redis::cmd("DUMP").arg(&key).query_async(&mut conn).await?;
                format!("{:x?}", dump.unwrap_or_default())
            };
            snapshot.push((key, digest));
        }
        Ok(snapshot)
    }
}

/// What a run of the syncer binary left: its exit code (None: killed by a signal), what it
/// printed as JSON (Null when nothing parsed), and its error output.
#[derive(Debug, Clone)]
pub struct CliRun {
    pub code: Option<i32>,
    pub json: Value,
    pub stderr: String,
}

/// Sends a request and reads the gate's answer.
pub async fn send(request: reqwest::RequestBuilder) -> anyhow::Result<BuyResult> {
    let response = request.send().await?;
    let status = response.status().as_u16();
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let outcome = header("x-seckill-outcome").unwrap_or_default();
    let retry_after = header("retry-after");
    let order_id = header(seckill_api::ORDER_ID_HEADER);
    let text = response.text().await?;
    let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
    Ok(BuyResult {
        status,
        outcome,
        retry_after,
        order_id,
        body,
    })
}

pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// Waits (polling the clock) until `ms` since the epoch has passed: a sale defined to end
/// soon has ended then (a sale cannot be defined ended).
pub async fn wait_past(ms: i64) -> anyhow::Result<()> {
    let wait = Duration::from_millis(u64::try_from(ms - now_ms()).unwrap_or(0));
    crate::process::wait_for("the clock", wait + Duration::from_secs(5), || async {
        Ok((now_ms() > ms).then_some(()))
    })
    .await
}

/// Milliseconds since the epoch as RFC 3339 in UTC (what the admin API takes).
pub fn rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}
