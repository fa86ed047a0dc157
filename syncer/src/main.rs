//! Command line of the syncer. Thin: parse flags, set up logging, call the library.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use seckill_syncer::durability::Durability;
use seckill_syncer::kafka::KafkaConfig;
use seckill_syncer::reconcile::Reconciler;
use seckill_syncer::writer::WriterConfig;
use seckill_syncer::{db, keys::KeySpace, preheat, PipelineConfig, ServeConfig, StoreConfig};
use tokio_util::sync::CancellationToken;

mod sale_command;

#[derive(Parser)]
#[command(
    name = "seckill-syncer",
    version,
    about = "Companion service of the seckill gate"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Clone)]
struct StoreArgs {
    /// Redis holding the live sale counters.
    #[arg(
        long,
        env = "SECKILL_REDIS_URL",
        default_value = "redis://127.0.0.1:6379"
    )]
    redis_url: String,
    /// MySQL (or MariaDB) holding sale definitions and orders.
    #[arg(
        long,
        env = "SECKILL_MYSQL_URL",
        default_value = "mysql://seckill:seckill@127.0.0.1:3306/seckill"
    )]
    mysql_url: String,
    /// Prefix of every Redis key, so several gates or tests can share one Redis.
    #[arg(long, env = "SECKILL_KEY_PREFIX", default_value = "seckill")]
    key_prefix: String,
}

impl StoreArgs {
    fn config(&self) -> StoreConfig {
        StoreConfig {
            redis_url: self.redis_url.clone(),
            mysql_url: self.mysql_url.clone(),
            key_prefix: self.key_prefix.clone(),
        }
    }
}

#[derive(Args, Clone)]
struct KafkaArgs {
    /// Kafka bootstrap servers (any Kafka-protocol broker).
    #[arg(long, env = "SECKILL_KAFKA_BROKERS", default_value = "127.0.0.1:9092")]
    kafka_brokers: String,
    /// Topic of sale events, keyed by goods id.
    #[arg(long, env = "SECKILL_TOPIC", default_value = "seckill.sales")]
    topic: String,
    /// Topic for messages the writer cannot parse or apply.
    #[arg(
        long,
        env = "SECKILL_DEAD_LETTER_TOPIC",
        default_value = "seckill.sales.dead-letter"
    )]
    dead_letter_topic: String,
    /// Consumer group of the MySQL writer.
    #[arg(
        long,
        env = "SECKILL_CONSUMER_GROUP",
        default_value = "seckill-mysql-writer"
    )]
    consumer_group: String,
}

impl KafkaArgs {
    fn config(&self) -> KafkaConfig {
        KafkaConfig {
            brokers: self.kafka_brokers.clone(),
            topic: self.topic.clone(),
            dead_letter_topic: self.dead_letter_topic.clone(),
            group: self.consumer_group.clone(),
        }
    }
}

#[derive(Args, Clone)]
struct WriterArgs {
    #[command(flatten)]
    kafka: KafkaArgs,
    /// A batch closes at this many events (1 to 10000)...
    #[arg(long, default_value_t = 1_000, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    batch_size: u64,
    /// ...or this many milliseconds after its first event (1 to 10000). Under a backlog
    /// batches fill at once whatever this is; at a steady rate it is most of the lag to
    /// MySQL (25 instead of 100 took the median lag from about 90 ms to 65 at 10,000 sales/s).
    #[arg(long, default_value_t = 25, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    batch_wait_ms: u64,
    /// Partitions of the topic this writer applies, comma-separated (default: all).
    #[arg(long, value_delimiter = ',')]
    partitions: Option<Vec<i32>>,
}

impl WriterArgs {
    fn config(&self) -> WriterConfig {
        WriterConfig {
            kafka: self.kafka.config(),
            batch_size_max: self.batch_size as usize,
            batch_wait: Duration::from_millis(self.batch_wait_ms),
            partitions: self.partitions.clone(),
        }
    }
}

/// Who may call what (`credentials.rs`): a credential per role, each sent in
/// x-seckill-secret. Give each role one value, or two comma-separated while rotating; or give
/// --secrets-dir, whose files are re-read while the syncer runs. Prefer the environment or
/// the directory to flags: a process's arguments are visible to every user of the machine.
#[derive(Args)]
struct CredentialArgs {
    /// The gate's (the wasm filter's): deduct, claim and release, nothing else.
    #[arg(long, env = "SECKILL_EDGE_SECRET", hide_env_values = true)]
    edge_secret: Option<String>,
    /// The shop's: confirm and cancel orders.
    #[arg(long, env = "SECKILL_SHOP_SECRET", hide_env_values = true)]
    shop_secret: Option<String>,
    /// Operators': the admin API.
    #[arg(long, env = "SECKILL_ADMIN_SECRET", hide_env_values = true)]
    admin_secret: Option<String>,
    /// Optional: required of /metrics and the dashboard (Authorization: Bearer, or Basic with
    /// it as the password).
    #[arg(long, env = "SECKILL_METRICS_SECRET", hide_env_values = true)]
    metrics_secret: Option<String>,
    /// A directory with a file per role, `edge`, `shop`, `admin` and optionally `metrics`,
    /// each holding one value or two (one per line), re-read every --secrets-reload-ms: a new
    /// set that does not parse is refused whole and logged, and the set in force stays.
    #[arg(long, env = "SECKILL_SECRETS_DIR", conflicts_with_all = ["edge_secret", "shop_secret", "admin_secret", "metrics_secret"])]
    secrets_dir: Option<std::path::PathBuf>,
    /// Milliseconds between reads of --secrets-dir (100 to 60000).
    #[arg(long, env = "SECKILL_SECRETS_RELOAD_MS", default_value_t = 1_000, value_parser = clap::value_parser!(u64).range(100..=60_000))]
    secrets_reload_ms: u64,
}

impl CredentialArgs {
    fn source(&self) -> anyhow::Result<seckill_syncer::credentials::Source> {
        use seckill_syncer::credentials::{Credentials, Role, Source};
        if let Some(path) = &self.secrets_dir {
            return Ok(Source::Dir {
                path: path.clone(),
                every: Duration::from_millis(self.secrets_reload_ms),
            });
        }
        let set = Credentials::parse(&[
            (Role::Edge, self.edge_secret.as_deref()),
            (Role::Shop, self.shop_secret.as_deref()),
            (Role::Admin, self.admin_secret.as_deref()),
            (Role::Metrics, self.metrics_secret.as_deref()),
        ])
        .map_err(|e| anyhow::anyhow!(e))?;
        Ok(Source::Fixed(set))
    }
}

#[derive(Subcommand)]
enum Command {
    /// Serve the deduct endpoint, the admin API, /healthz and /metrics.
    Serve {
        #[command(flatten)]
        stores: StoreArgs,
        /// Address to listen on.
        #[arg(long, env = "SECKILL_LISTEN", default_value = "127.0.0.1:8081")]
        listen: SocketAddr,
        // Boxed: the credentials are the largest part of any command's arguments.
        #[command(flatten)]
        credentials: Box<CredentialArgs>,
        /// Serve /metrics and the dashboard on this address (a listener of their own, say
        /// one only the monitoring network reaches) instead of --listen.
        #[arg(long, env = "SECKILL_METRICS_LISTEN")]
        metrics_listen: Option<SocketAddr>,
        /// Serve /metrics and the dashboard on --listen to anyone, without a credential (a
        /// trusted network). Without this, --metrics-listen or a metrics credential is needed.
        #[arg(long, env = "SECKILL_METRICS_OPEN")]
        metrics_open: bool,
        /// The key every winner's pass is signed with, KEY_ID=SECRET: an id of 1 to 64 of
        /// A-Z a-z 0-9 . _ - and a secret of at least 32 bytes the shop verifies with (see
        /// pass/README.md). Prefer the environment: a command line is visible to `ps`.
        #[arg(long, env = "SECKILL_PASS_KEY", hide_env_values = true)]
        pass_key: String,
        /// Also run the relay, the batched writer and the periodic reconcile in this process.
        #[arg(long)]
        pipeline: bool,
        #[command(flatten)]
        writer: WriterArgs,
        /// Name of this relay in the outbox consumer group (keep it stable across restarts).
        #[arg(long, env = "SECKILL_RELAY_NAME", default_value = "relay-0")]
        relay_name: String,
        /// Milliseconds between sweeps that release reservations whose payment window passed.
        #[arg(long, env = "SECKILL_SWEEP_EVERY_MS", default_value_t = 1_000, value_parser = clap::value_parser!(u64).range(10..=60_000))]
        sweep_every_ms: u64,
        /// Milliseconds a reservation made through the batch endpoint (the gate's) waits for
        /// the gate's claim that it reached the shop; unclaimed, it is released then
        /// (reason "unclaimed") instead of at the end of its payment window.
        #[arg(long, env = "SECKILL_CLAIM_WINDOW_MS", default_value_t = 30_000, value_parser = clap::value_parser!(u64).range(1_000..=3_600_000))]
        claim_window_ms: u64,
        /// Seconds between periodic reconciles: the dashboard's drift and Kafka figures, and
        /// with --pipeline the drift metric and the sweep of reservations Redis forgot.
        #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600))]
        reconcile_every_s: u64,
        /// Seconds after its payment window that a MySQL reservation Redis no longer knows is
        /// ended in MySQL as expired, with --pipeline (covers clock skew; 1 to 86400).
        #[arg(long, env = "SECKILL_FORGOTTEN_GRACE_S", default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=86_400))]
        forgotten_grace_s: u64,
        /// What an answer must rest on before a buyer or the shop gets it: `none` (Redis's
        /// memory), `aof` (Redis's AOF, fsynced before each reply: appendonly yes and
        /// appendfsync always, checked at start) or `replicas:N` (N from 1 to 16 replicas
        /// acknowledged the write: WAIT after each script call, 503 when they do not).
        #[arg(long, env = "SECKILL_REDIS_DURABILITY", default_value = "none", value_parser = parse_durability)]
        redis_durability: Durability,
        /// With `--redis-durability aof`: start even though Redis's CONFIG cannot be read (a
        /// managed Redis that disables it), trusting that it runs as `aof` requires. A CONFIG
        /// that can be read and says otherwise is refused all the same.
        #[arg(long, env = "SECKILL_REDIS_DURABILITY_UNCHECKED")]
        redis_durability_unchecked: bool,
        /// Purchase attempts per second MySQL decides at most while Redis is down or has
        /// forgotten a goods (the fallback); the rest are answered 503 with Retry-After.
        /// 0 turns the fallback off: Redis failures are answered 503.
        #[arg(long, env = "SECKILL_FALLBACK_RATE", default_value_t = 1_000, value_parser = clap::value_parser!(u32).range(0..=1_000_000))]
        fallback_rate: u32,
    },
    /// Relay sale events from the Redis outboxes to Kafka.
    Relay {
        #[command(flatten)]
        stores: StoreArgs,
        #[command(flatten)]
        kafka: KafkaArgs,
        /// Name of this relay in the outbox consumer group (keep it stable across restarts).
        #[arg(long, env = "SECKILL_RELAY_NAME", default_value = "relay-0")]
        relay_name: String,
        /// Serve /metrics on this address.
        #[arg(long)]
        metrics_listen: Option<SocketAddr>,
    },
    /// Switch Envoy's native sold-out route for hot goods: every round, read each goods'
    /// stock from Redis and set its runtime key (`seckill.sold_out.<goods>`) on each Envoy
    /// through its admin API, 100 while sold out (Envoy answers without entering the wasm
    /// VM), 0 once units are back. Run one next to each Envoy (its admin stays local), or one
    /// for several. See `fast-path-routes` for the routes.
    FastPath {
        /// Redis holding the live sale counters.
        #[arg(
            long,
            env = "SECKILL_REDIS_URL",
            default_value = "redis://127.0.0.1:6379"
        )]
        redis_url: String,
        /// Prefix of every Redis key (as the syncer's).
        #[arg(long, env = "SECKILL_KEY_PREFIX", default_value = "seckill")]
        key_prefix: String,
        /// An Envoy's admin URL, such as http://127.0.0.1:9901 (repeat, or comma-separate).
        #[arg(
            long = "envoy-admin",
            env = "SECKILL_ENVOY_ADMIN",
            value_delimiter = ',',
            required = true
        )]
        envoy_admin: Vec<String>,
        /// A goods with a fast-path route (repeat, or comma-separate; at most 256).
        #[arg(
            long = "goods",
            env = "SECKILL_FAST_PATH_GOODS",
            value_delimiter = ',',
            required = true
        )]
        goods: Vec<String>,
        /// Milliseconds between rounds: how soon returned units reopen the goods (keep it well
        /// under the filter's sold_out_cache_ms).
        #[arg(long, env = "SECKILL_FAST_PATH_EVERY_MS", default_value_t = 100, value_parser = clap::value_parser!(u64).range(10..=1_000))]
        every_ms: u64,
        /// Milliseconds between full re-sets of every key on each Envoy (an Envoy that
        /// restarted has forgotten them).
        #[arg(long, env = "SECKILL_FAST_PATH_REASSERT_MS", default_value_t = 1_000, value_parser = clap::value_parser!(u64).range(100..=60_000))]
        reassert_ms: u64,
        /// Serve /metrics on this address.
        #[arg(long)]
        metrics_listen: Option<SocketAddr>,
    },
    /// Print the Envoy routes of the native sold-out fast path (one per goods, JSON lines that
    /// go in a YAML `routes:` list before the sale route), to be switched by `fast-path`.
    FastPathRoutes {
        /// Goods to print a route for (repeat, or comma-separate).
        #[arg(long = "goods", value_delimiter = ',', required = true)]
        goods: Vec<String>,
        /// The filter's route.path_template.
        #[arg(long, default_value = "/seckill/{goods_id}/buy")]
        path_template: String,
        /// The template's variable that holds the goods id (the filter's goods_id.path).
        #[arg(long, default_value = "goods_id")]
        goods_variable: String,
        /// The filter's route.methods (repeat, or comma-separate).
        #[arg(long = "method", value_delimiter = ',', default_value = "POST")]
        methods: Vec<String>,
        /// The wasm filter's name in http_filters (disabled on these routes).
        #[arg(long, default_value = "envoy.filters.http.wasm")]
        filter_name: String,
        /// Indent each line by this many spaces.
        #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u16).range(0..=64))]
        indent: u16,
    },
    /// Consume sale events from Kafka and write them to MySQL in batches.
    Write {
        #[command(flatten)]
        stores: StoreArgs,
        #[command(flatten)]
        writer: WriterArgs,
        /// Serve /metrics on this address.
        #[arg(long)]
        metrics_listen: Option<SocketAddr>,
    },
    /// Compare Redis with MySQL. Exit status: 0 clean; 2 not clean (drift, a goods Redis
    /// forgot, dead letters, order differences); 1 could not check (or repair refused).
    Reconcile {
        #[command(flatten)]
        stores: StoreArgs,
        #[command(flatten)]
        kafka: KafkaArgs,
        /// Only this goods.
        #[arg(long)]
        goods: Option<String>,
        /// Also compare every order (buyer, request id, quantity, state): reads them all.
        #[arg(long)]
        orders: bool,
        /// Recompute MySQL's counters from its rows, then replay through the outbox each
        /// order's history MySQL lacks (only when nothing is in flight).
        #[arg(long)]
        repair: bool,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Create the sale topic and its dead-letter topic if they are missing, and exit. A topic
    /// that exists is left as it is, so this can run before every start.
    Topics {
        #[command(flatten)]
        kafka: KafkaArgs,
        /// Partitions of the sale topic (1 to 1000); the dead-letter topic gets one.
        #[arg(long, env = "SECKILL_TOPIC_PARTITIONS", default_value_t = 3, value_parser = clap::value_parser!(i32).range(1..=1000))]
        partitions: i32,
        /// Replicas of each partition (1 to 32); 3 on a production Kafka cluster.
        #[arg(long, env = "SECKILL_TOPIC_REPLICATION_FACTOR", default_value_t = 1, value_parser = clap::value_parser!(i32).range(1..=32))]
        replication_factor: i32,
        /// How long to keep trying while the broker is not reachable yet (1 to 600 s).
        #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=600))]
        wait_s: u64,
    },
    /// Create or update the MySQL schema and exit.
    Migrate {
        #[command(flatten)]
        stores: StoreArgs,
    },
    /// Load a sale defined in MySQL into Redis with its full stock, under a new epoch taken
    /// from MySQL. Refused (forced or not) when MySQL already has orders for the sale.
    Preheat {
        #[command(flatten)]
        stores: StoreArgs,
        /// Goods id of the sale.
        #[arg(long)]
        goods: String,
        /// Replace a sale that has not ended yet (its buyers and reservations are forgotten).
        #[arg(long)]
        force: bool,
    },
    /// An operator's controls of sales: define, list, status, pause, resume, stop, add-stock
    /// (against MySQL and Redis directly; the admin API has the same under /admin/sales).
    Sale(sale_command::SaleCommand),
    /// Load a sale Redis forgot back from MySQL (counters, buyers, idempotency records, open
    /// reservations) under a new epoch taken from MySQL, once the writer has applied
    /// everything on its way. Refused while Redis still has the sale or its outbox has events.
    Reseed {
        #[command(flatten)]
        stores: StoreArgs,
        #[command(flatten)]
        kafka: KafkaArgs,
        /// Goods id of the sale.
        goods: String,
        /// How long to wait for the writer to apply the sale topic (1 to 3600 s).
        #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=3600))]
        drain_timeout_s: u64,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        // Logs on stderr: stdout is the commands' own output (`reconcile --json`, `sale`).
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.command)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command) -> anyhow::Result<ExitCode> {
    let shutdown = CancellationToken::new();
    let token = shutdown.clone();
    tokio::spawn(async move {
        shutdown_signal().await;
        token.cancel();
    });
    match command {
        Command::Serve {
            stores,
            listen,
            credentials,
            metrics_listen,
            metrics_open,
            pass_key,
            pipeline,
            writer,
            relay_name,
            reconcile_every_s,
            forgotten_grace_s,
            sweep_every_ms,
            claim_window_ms,
            redis_durability,
            redis_durability_unchecked,
            fallback_rate,
        } => {
            // Read here, not by clap: clap's error would print the value, secret and all.
            let pass_key: seckill_pass::Key = pass_key
                .parse()
                .map_err(|e| anyhow::anyhow!("--pass-key (SECKILL_PASS_KEY): {e}"))?;
            let metrics = install_metrics()?;
            let config = ServeConfig {
                stores: stores.config(),
                listen,
                credentials: credentials.source()?,
                metrics_listen,
                metrics_open,
                pass_key,
                sweep_every: Duration::from_millis(sweep_every_ms),
                claim_window: Duration::from_millis(claim_window_ms),
                durability: redis_durability,
                durability_unchecked: redis_durability_unchecked,
                kafka: writer.kafka.config(),
                fallback_rate,
                reconcile_every: Duration::from_secs(reconcile_every_s),
            };
            let pipeline = pipeline.then(|| PipelineConfig {
                writer: writer.config(),
                relay_name,
                reconcile_every: Duration::from_secs(reconcile_every_s),
                forgotten_grace: Duration::from_secs(forgotten_grace_s),
            });
            seckill_syncer::serve(config, Some(metrics), pipeline, shutdown).await?;
        }
        Command::Relay {
            stores,
            kafka,
            relay_name,
            metrics_listen,
        } => {
            serve_metrics(metrics_listen, shutdown.clone()).await?;
            seckill_syncer::run_relay(&stores.config(), &kafka.config(), &relay_name, shutdown)
                .await?;
        }
        Command::FastPath {
            redis_url,
            key_prefix,
            envoy_admin,
            goods,
            every_ms,
            reassert_ms,
            metrics_listen,
        } => {
            serve_metrics(metrics_listen, shutdown.clone()).await?;
            let switch = seckill_syncer::fast_path::FastPathSwitch::new(
                seckill_syncer::connect_redis(&redis_url).await?,
                seckill_syncer::keys::KeySpace::new(key_prefix),
                goods,
                envoy_admin,
                Duration::from_millis(every_ms),
                Duration::from_millis(reassert_ms),
            )?;
            switch.run(shutdown).await;
        }
        Command::FastPathRoutes {
            goods,
            path_template,
            goods_variable,
            methods,
            filter_name,
            indent,
        } => {
            let methods: Vec<&str> = methods.iter().map(String::as_str).collect();
            let sale = seckill_api::fast_path::SaleRoute {
                template: &path_template,
                variable: &goods_variable,
                methods: &methods,
                filter_name: &filter_name,
            };
            let pad = " ".repeat(usize::from(indent));
            for goods_id in &goods {
                let route = seckill_api::fast_path::sold_out_route(&sale, goods_id)?;
                println!("{pad}- {route}");
            }
        }
        Command::Write {
            stores,
            writer,
            metrics_listen,
        } => {
            serve_metrics(metrics_listen, shutdown.clone()).await?;
            seckill_syncer::run_writer(&stores.config(), &writer.config(), shutdown).await?;
        }
        Command::Topics {
            kafka,
            partitions,
            replication_factor,
            wait_s,
        } => {
            let plan = seckill_syncer::topics::TopicsPlan {
                partitions,
                replication_factor,
            };
            let done =
                seckill_syncer::topics::ensure(&kafka.config(), plan, Duration::from_secs(wait_s))
                    .await?;
            for (topic, outcome) in done {
                println!("{topic}: {}", outcome.as_str());
            }
        }
        Command::Sale(command) => sale_command::run(command).await?,
        Command::Migrate { stores } => {
            db::connect(&stores.mysql_url).await?;
            println!("schema is up to date");
        }
        Command::Preheat {
            stores,
            goods,
            force,
        } => {
            seckill_api::validate_id(&goods, seckill_api::ID_LEN_MAX)
                .map_err(|e| anyhow::anyhow!("--goods {e}"))?;
            let mysql = db::connect(&stores.mysql_url).await?;
            let redis = seckill_syncer::connect_redis(&stores.redis_url).await?;
            let keys = KeySpace::new(stores.key_prefix);
            let preheated = preheat::preheat(&redis, &mysql, &keys, &goods, force).await?;
            println!(
                "preheated {goods}: {} units, per-user limit {}, epoch {}",
                preheated.sale.total_stock, preheated.sale.per_user_limit, preheated.epoch
            );
        }
        Command::Reseed {
            stores,
            kafka,
            goods,
            drain_timeout_s,
        } => {
            seckill_api::validate_id(&goods, seckill_api::ID_LEN_MAX)
                .map_err(|e| anyhow::anyhow!("goods {e}"))?;
            let mysql = db::connect(&stores.mysql_url).await?;
            let redis = seckill_syncer::connect_redis(&stores.redis_url).await?;
            let keys = KeySpace::new(stores.key_prefix);
            let done = seckill_syncer::reseed::reseed(
                &redis,
                &mysql,
                &kafka.config(),
                &keys,
                &goods,
                Duration::from_secs(drain_timeout_s),
            )
            .await?;
            println!(
                "reseeded {goods}: epoch {}, available {}, reserved {}, sold {}, lapsed {}; \
                 {} orders, {} open reservations",
                done.epoch,
                done.available,
                done.reserved,
                done.sold,
                done.lapsed,
                done.orders,
                done.reservations
            );
        }
        Command::Reconcile {
            stores,
            kafka,
            goods,
            orders,
            repair,
            json,
        } => {
            let reconciler = Reconciler {
                redis: seckill_syncer::connect_redis(&stores.redis_url).await?,
                keys: KeySpace::new(stores.key_prefix.clone()),
                mysql: db::connect(&stores.mysql_url).await?,
                kafka: kafka.config(),
            };
            let report = if repair {
                let before = reconciler.report(goods.as_deref(), false).await?;
                let repaired = reconciler.repair(&before).await?;
                eprintln!(
                    "repair: counters recomputed for {} goods; {} orders replayed and {} ended \
                     through the outbox ({} events); {} differences left alone; {} missing \
                     orders Redis keeps only the end of",
                    repaired.counters_recomputed,
                    repaired.orders_replayed,
                    repaired.orders_ended,
                    repaired.events_appended,
                    repaired.left_alone,
                    repaired.unreplayable
                );
                // The replayed events are in the outbox now: the report counts them in flight.
                reconciler.report(goods.as_deref(), true).await?
            } else {
                reconciler.report(goods.as_deref(), orders).await?
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print_report(&report);
            }
            if !report.is_clean() {
                return Ok(ExitCode::from(2));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn parse_durability(text: &str) -> Result<Durability, String> {
    text.parse()
}

fn install_metrics() -> anyhow::Result<metrics_exporter_prometheus::PrometheusHandle> {
    seckill_syncer::telemetry::install()
}

/// For the relay and the writer run alone: /metrics on its own small listener.
async fn serve_metrics(
    listen: Option<SocketAddr>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let handle = install_metrics()?;
    let Some(listen) = listen else { return Ok(()) };
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {listen}: {e}"))?;
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || std::future::ready(handle.render())),
    );
    tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await;
    });
    Ok(())
}

fn print_report(report: &seckill_syncer::reconcile::Report) {
    println!(
        "{:<24} {:>28} {:>28} {:>12} {:>18}",
        "goods", "redis avail/resv/sold", "mysql avail/resv/sold", "in outbox", "drift a/r/s"
    );
    for g in &report.goods {
        let redis = match (g.redis, g.missing_from_redis) {
            (Some(r), _) => format!("{}/{}/{}", r.available, r.reserved, r.sold),
            (None, true) => "MISSING".into(),
            (None, false) => "-".into(),
        };
        let mysql = g
            .mysql
            .map(|m| format!("{}/{}/{}", m.available, m.reserved, m.sold))
            .unwrap_or_else(|| "-".into());
        println!(
            "{:<24} {:>28} {:>28} {:>12} {:>18}",
            g.goods_id,
            redis,
            mysql,
            g.outbox_events,
            format!(
                "{}/{}/{}",
                g.drift.available, g.drift.reserved, g.drift.sold
            )
        );
    }
    for g in report.goods.iter().filter(|g| g.missing_from_redis) {
        println!(
            "{}: Redis has no sale while MySQL holds its orders (Redis forgot it)",
            g.goods_id
        );
    }
    let known = |n: Option<i64>| n.map_or_else(|| "unknown".to_owned(), |n| n.to_string());
    println!(
        "kafka lag: {}; {}; total drift {}; dead letters: {}",
        known(report.kafka_lag),
        if report.settled {
            "settled (drift is final)"
        } else {
            "events in flight (drift may still close)"
        },
        report.total_drift(),
        known(report.dead_letters)
    );
    print_orders(report);
}

/// The order digest's table and examples (`--orders`).
fn print_orders(report: &seckill_syncer::reconcile::Report) {
    let digests: Vec<_> = report
        .goods
        .iter()
        .filter_map(|g| Some((&g.goods_id, g.orders.as_ref()?)))
        .collect();
    if digests.is_empty() {
        return;
    }
    println!(
        "\n{:<24} {:>18} {:>10} {:>10} {:>22} {:>12} {:>12}",
        "orders",
        "redis live/ended",
        "mysql",
        "in flight",
        "missing in mysql/redis",
        "other buyer",
        "other state"
    );
    for (goods_id, d) in &digests {
        println!(
            "{:<24} {:>18} {:>10} {:>10} {:>22} {:>12} {:>12}",
            goods_id,
            format!("{}/{}", d.redis_live, d.redis_settled),
            d.mysql_rows,
            d.in_flight,
            format!("{}/{}", d.missing_from_mysql, d.missing_from_redis),
            d.identity_differs,
            d.state_differs
        );
    }
    for (goods_id, d) in &digests {
        if let Some(why) = &d.postponed {
            println!("{goods_id}: not compared: {why}");
        }
        if d.unreplayable > 0 {
            println!(
                "{goods_id}: {} of the orders missing in MySQL ended after their request won again; Redis keeps only their end",
                d.unreplayable
            );
        }
        for finding in &d.examples {
            let side = |s: Option<String>| s.unwrap_or_else(|| "-".into());
            println!(
                "  {} {:?}: redis {} / mysql {}",
                finding.order_id,
                finding.kind,
                side(
                    finding
                        .redis
                        .as_ref()
                        .map(|r| describe(r.identity.as_ref(), r.standing))
                ),
                side(
                    finding
                        .mysql
                        .as_ref()
                        .map(|m| describe(Some(&m.identity), m.standing))
                )
            );
        }
    }
}

fn describe(
    identity: Option<&seckill_syncer::reconcile::Identity>,
    standing: Option<seckill_syncer::reconcile::Standing>,
) -> String {
    let state = standing.map_or_else(|| "no state".to_owned(), |s| s.to_string());
    match identity {
        Some(i) => format!(
            "{state} for {} (request {}, {} units)",
            i.user_id, i.request_id, i.quantity
        ),
        None => state,
    }
}

/// Resolves on SIGTERM or Ctrl-C.
async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!("cannot listen for Ctrl-C: {e}");
            std::future::pending::<()>().await;
        }
    };
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(e) => {
                tracing::error!("cannot listen for SIGTERM: {e}");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
    tracing::info!("shutdown requested");
}
