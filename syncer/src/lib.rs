//! The seckill syncer: the atomic Redis deduct behind the edge filter, the sale admin API and
//! preheat. `main.rs` only parses flags; everything runs from here.

pub mod control;
pub mod crashpoint;
pub mod credentials;
pub mod dashboard;
pub mod db;
pub mod db_decide;
pub mod db_lifecycle;
pub mod deduct;
pub mod directory;
pub mod durability;
pub mod events_pack;
pub mod fallback;
pub mod fast_path;
pub mod http;
pub mod kafka;
pub mod keys;
pub mod lifecycle;
pub mod preheat;
pub mod reconcile;
pub mod recover;
pub mod redis_conn;
pub mod relay;
pub mod reseed;
pub mod scripts;
pub mod shard;
pub mod telemetry;
pub mod topics;
pub mod writer;

// The pure data model lives in its own crate (no stores, so it builds anywhere, fuzzed
// included); the syncer uses its modules as its own.
pub use seckill_model::{admin, events, order, sale};

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::deduct::Deducter;
use crate::keys::KeySpace;

pub use crate::redis_conn::RedisConn;

/// Where the stores are, shared by every subcommand.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    pub redis_url: String,
    pub mysql_url: String,
    pub key_prefix: String,
}

#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub stores: StoreConfig,
    pub listen: SocketAddr,
    /// Each role's credentials, fixed or re-read from a directory (`credentials.rs`).
    pub credentials: credentials::Source,
    /// Serve `/metrics` and the dashboard on this address instead of `listen`.
    pub metrics_listen: Option<SocketAddr>,
    /// The operator chose to leave `/metrics` and the dashboard open on `listen` (no metrics
    /// listener, no metrics credential): a trusted network.
    pub metrics_open: bool,
    /// The key every winner's pass is signed with (`seckill-pass`); its secret stays here,
    /// never in Envoy's configuration.
    pub pass_key: seckill_pass::Key,
    /// How often the sweeper releases reservations whose payment window has passed.
    pub sweep_every: Duration,
    /// How long a reservation made through the batch endpoint waits for the gate's claim.
    pub claim_window: Duration,
    /// What an answer must rest on before it is given (`durability.rs`).
    pub durability: durability::Durability,
    /// With `aof`: trust a Redis whose CONFIG cannot be read.
    pub durability_unchecked: bool,
    /// The sale topic and writer group a re-seed waits for (the admin API's reseed, and the
    /// way back from the fallback).
    pub kafka: kafka::KafkaConfig,
    /// Attempts per second the MySQL fallback decides at most (0: no fallback).
    pub fallback_rate: u32,
    /// How often the dashboard's drift and Kafka figures are refreshed (with a pipeline, the
    /// same reconcile also refreshes the drift metrics).
    pub reconcile_every: Duration,
}

/// Connects to one Redis server or a Redis Cluster, as `url` says (`redis_conn.rs`).
pub async fn connect_redis(url: &str) -> anyhow::Result<RedisConn> {
    redis_conn::connect(url).await
}

/// The sync pipeline a `serve --pipeline` process runs beside the HTTP service.
#[derive(Debug, Clone)]
pub struct PipelineConfig {
    pub writer: writer::WriterConfig,
    pub relay_name: String,
    /// How often the periodic reconcile refreshes the drift metric (and the MySQL sweep of
    /// reservations Redis forgot runs).
    pub reconcile_every: Duration,
    /// How long after its payment window a MySQL reservation Redis does not know is ended.
    pub forgotten_grace: Duration,
}

/// Runs the outbox relay until `shutdown`.
pub async fn run_relay(
    stores: &StoreConfig,
    kafka: &kafka::KafkaConfig,
    name: &str,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let relay = relay::Relay {
        redis: connect_redis(&stores.redis_url).await?,
        keys: KeySpace::new(stores.key_prefix.clone()),
        producer: kafka::producer(kafka)?,
        kafka: kafka.clone(),
        name: name.to_owned(),
    };
    relay.run(shutdown).await;
    Ok(())
}

/// Runs the batched MySQL writer until `shutdown`.
pub async fn run_writer(
    stores: &StoreConfig,
    config: &writer::WriterConfig,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let writer = writer::Writer {
        mysql: db::connect(&stores.mysql_url).await?,
        producer: kafka::dead_letter_producer(&config.kafka)?,
        config: config.clone(),
    };
    writer.run(shutdown).await
}

/// Runs `tick` every `every` until `shutdown`. A tick that overruns delays the next instead
/// of bunching them; shutdown also cuts a tick short (each caller's tick is safe to drop: a
/// Redis script runs whole or not at all, an open MySQL transaction rolls back).
pub(crate) async fn every_tick<F, Fut>(every: Duration, shutdown: &CancellationToken, mut tick: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut ticker = tokio::time::interval(every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = ticker.tick() => {}
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tick() => {}
        }
    }
}

/// Reconciles every `every` until `shutdown`, for the dashboard's drift and Kafka figures;
/// with `metrics` (the process that runs the pipeline) also for the drift metrics and the
/// warning when a settled sale drifts (one process says it, not every replica).
pub async fn run_periodic_reconcile(
    reconciler: reconcile::Reconciler,
    every: Duration,
    board: Arc<dashboard::Board>,
    metrics: bool,
    shutdown: CancellationToken,
) {
    every_tick(every, &shutdown, || async {
        // Totals, goods Redis forgot and dead letters: cheap enough for every tick (the order
        // digest reads every order, so it is `reconcile --orders`).
        let at_ms = chrono::Utc::now().timestamp_millis();
        match reconciler.report(None, false).await {
            Ok(report) => {
                board.record_report(at_ms, &report);
                if !metrics {
                    return;
                }
                report.record_metrics();
                if report.settled && !report.is_clean() {
                    tracing::warn!(
                        drift = report.total_drift(),
                        dead_letters = ?report.dead_letters,
                        "reconcile is not clean at rest"
                    );
                }
            }
            Err(e) => {
                board.record_report_failed(at_ms);
                if metrics {
                    tracing::warn!(error = %e, "periodic reconcile failed");
                }
            }
        }
    })
    .await;
}

/// Logs a pipeline task's failure when it happens (not only at shutdown) and passes it on.
fn logged(task: &str, result: anyhow::Result<()>) -> anyhow::Result<()> {
    if let Err(e) = &result {
        tracing::error!(task, error = %e, "pipeline task stopped");
    }
    result
}

/// Runs the HTTP service until `shutdown`, then drains in-flight requests. With a pipeline,
/// the relay, the writer and the periodic reconcile run in the same process and stop in order.
pub async fn serve(
    config: ServeConfig,
    metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
    pipeline: Option<PipelineConfig>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let (keyring, reload) = match &config.credentials {
        credentials::Source::Fixed(set) => (credentials::Keyring::new(set.clone()), None),
        credentials::Source::Dir { path, every } => {
            let set = credentials::read_dir(path).map_err(|e| anyhow::anyhow!(e))?;
            (credentials::Keyring::new(set), Some((path.clone(), *every)))
        }
    };
    let metrics_guarded = keyring.current().count(credentials::Role::Metrics) > 0;
    if config.metrics_listen.is_none() && !metrics_guarded && !config.metrics_open {
        anyhow::bail!(
            "/metrics and the dashboard show sales figures: give them a listener of their own \
             (--metrics-listen), a metrics credential (--metrics-secret, or a `metrics` file in \
             --secrets-dir), or say --metrics-open to serve them to anyone who reaches --listen"
        );
    }
    let redis = connect_redis(&config.stores.redis_url).await?;
    durability::check_at_start(&redis, config.durability, config.durability_unchecked).await?;
    telemetry::register_serve();
    // A WAIT blocks its connection: under `replicas:N` each batch in flight and the lifecycle
    // get one of their own, so health checks, admin calls and the other calls never queue
    // behind it.
    let batches_in_flight = config.durability.batches_in_flight();
    let mut deduct_connections = Vec::with_capacity(batches_in_flight);
    for _ in 0..batches_in_flight {
        deduct_connections.push(match config.durability.waits() {
            true => connect_redis(&config.stores.redis_url).await?,
            false => redis.clone(),
        });
    }
    let lifecycle_redis = match config.durability.waits() {
        true => connect_redis(&config.stores.redis_url).await?,
        false => redis.clone(),
    };
    let mysql = db::connect(&config.stores.mysql_url).await?;
    let keys = KeySpace::new(config.stores.key_prefix.clone());
    let mut background = tokio::task::JoinSet::new();
    let board = Arc::new(dashboard::Board::default());
    let reconciler = reconcile::Reconciler {
        redis: redis.clone(),
        keys: keys.clone(),
        mysql: mysql.clone(),
        kafka: config.kafka.clone(),
    };
    let has_pipeline = pipeline.is_some();
    if let Some(pipeline) = pipeline {
        telemetry::register_reconcile();
        let stores = config.stores.clone();
        let (kafka, name, token) = (
            pipeline.writer.kafka.clone(),
            pipeline.relay_name.clone(),
            shutdown.clone(),
        );
        background
            .spawn(async move { logged("relay", run_relay(&stores, &kafka, &name, token).await) });
        let stores = config.stores.clone();
        let (writer, token) = (pipeline.writer.clone(), shutdown.clone());
        background
            .spawn(async move { logged("writer", run_writer(&stores, &writer, token).await) });
        let reconciler = reconciler.clone();
        let sweep = reconcile::ForgottenSweep::new(reconciler, pipeline.forgotten_grace);
        let token = shutdown.clone();
        background.spawn(async move {
            reconcile::run_forgotten_sweeper(sweep, pipeline.reconcile_every, token).await;
            Ok(())
        });
    }
    let (token, every, shown) = (shutdown.clone(), config.reconcile_every, board.clone());
    background.spawn(async move {
        run_periodic_reconcile(reconciler, every, shown, has_pipeline, token).await;
        Ok(())
    });
    let sampler = dashboard::Sampler {
        board: board.clone(),
        redis: redis.clone(),
        keys: keys.clone(),
        mysql: mysql.clone(),
    };
    let token = shutdown.clone();
    background.spawn(async move {
        sampler.run(token).await;
        Ok(())
    });
    // Who decides each goods, as MySQL says; read once before the first deduct.
    let directory = directory::Directory::new(mysql.clone());
    directory
        .refresh()
        .await
        .map_err(|e| anyhow::anyhow!("cannot read the sales from MySQL: {e}"))?;
    directory.spawn_refresher(shutdown.clone());
    let routing = deduct::Routing::new(mysql.clone(), directory.clone(), config.fallback_rate);
    let recoverer = recover::Recoverer {
        redis: redis.clone(),
        mysql: mysql.clone(),
        keys: keys.clone(),
        kafka: config.kafka.clone(),
        directory: directory.clone(),
        watch: routing.watch.clone(),
        breaker: routing.breaker.clone(),
        fallback: config.fallback_rate > 0,
    };
    let token = shutdown.clone();
    background.spawn(async move {
        recoverer.run(token).await;
        Ok(())
    });
    let lifecycle = lifecycle::Lifecycle::new(lifecycle_redis, keys.clone())
        .with_durability(config.durability)
        .with_mysql(mysql.clone(), directory.clone());
    let (sweeper, token, every) = (lifecycle.clone(), shutdown.clone(), config.sweep_every);
    let claim_window = config.claim_window;
    background.spawn(async move {
        sweeper.run_sweeper(every, claim_window, token).await;
        Ok(())
    });
    let state = Arc::new(http::AppState {
        deducter: Deducter::start_routed(
            deduct_connections,
            keys.clone(),
            config.claim_window,
            config.durability,
            Some(routing),
        ),
        lifecycle,
        redis,
        keys,
        mysql,
        keyring: keyring.clone(),
        pass_key: config.pass_key.clone(),
        kafka: config.kafka.clone(),
        metrics,
        directory: Some(directory),
        board,
    });
    if let Some((dir, every)) = reload {
        let token = shutdown.clone();
        background.spawn(async move {
            keyring.reload_from(dir, every, token).await;
            Ok(())
        });
    }
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", config.listen))?;
    if let Some(address) = config.metrics_listen {
        let metrics_listener = tokio::net::TcpListener::bind(address)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {address} for metrics: {e}"))?;
        tracing::info!(listen = %metrics_listener.local_addr()?, "metrics and dashboard serving");
        let (router, token) = (http::metrics_router(state.clone()), shutdown.clone());
        background.spawn(async move {
            axum::serve(metrics_listener, router)
                .with_graceful_shutdown(token.cancelled_owned())
                .await
                .map_err(|e| anyhow::anyhow!("metrics listener: {e}"))
        });
    }
    tracing::info!(listen = %listener.local_addr()?, "syncer serving");
    let served = axum::serve(
        listener,
        http::router(state, config.metrics_listen.is_none()),
    )
    .with_graceful_shutdown(shutdown.clone().cancelled_owned())
    .await;
    // The HTTP side has stopped taking deducts: now the pipeline finishes its batch.
    shutdown.cancel();
    while let Some(joined) = background.join_next().await {
        match joined {
            Ok(Ok(())) => {}
            Ok(Err(_)) => {} // logged when it happened
            Err(e) => tracing::error!(error = %e, "pipeline task panicked"),
        }
    }
    served?;
    tracing::info!("syncer stopped");
    Ok(())
}
