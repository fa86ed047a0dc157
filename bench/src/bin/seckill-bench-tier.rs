//! The `db` tier against the per-order UPDATE, in one run on the same MariaDB: decisions per
//! second of a goods that MySQL alone decides against the textbook way, one MySQL transaction
//! per attempt (a conditional `UPDATE sales SET stock = stock - 1 WHERE goods_id = ? AND
//! stock >= 1` and the order row's INSERT), at the same number of concurrent clients. The db
//! tier is measured twice: through the syncer's batch deduct endpoint (as the filter calls it,
//! one attempt per call), and through the syncer library's deducter in this process (the same
//! batching and MySQL decider, no HTTP), so the difference shows what HTTP costs. Where the
//! time goes: MySQL commits and InnoDB fsyncs per decision, attempts per transaction, and the
//! CPU each process used. Rewrites its BENCHMARKS.md section.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use seckill_bench::cpu::{clock_ticks, machine_busy_ticks, mysql_pid, process_ticks};
use seckill_bench::local::start_syncer;
use seckill_bench::report::{quantile, update_section};
use seckill_bench::wrk::{self, WrkReport};
use seckill_e2e::mysql_db::TestDatabase;
use seckill_e2e::process::{unique_suffix, Scratch};
use seckill_e2e::redis_server::RedisServer;
use seckill_e2e::stack::{now_ms, rfc3339, ADMIN_SECRET, EDGE_SECRET};
use seckill_e2e::syncer::{sum_metric, SyncerProcess};
use seckill_syncer::deduct::{Deducter, Delivery, Routing};
use seckill_syncer::directory::Directory;
use seckill_syncer::durability::Durability;
use seckill_syncer::keys::KeySpace;
use sqlx::mysql::{MySqlPool, MySqlPoolOptions};

#[derive(Parser)]
#[command(about = "Benchmark the db tier against one MySQL transaction per attempt")]
struct Args {
    /// Seconds each path is measured at each level in each round (after a 2 s warm-up).
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Concurrent clients (wrk connections to the syncer; MySQL connections of the
    /// baseline), each with one attempt in flight: each level is measured in every round.
    /// At most 128: the baseline opens one MySQL connection per client, and MariaDB allows
    /// 151 by default.
    #[arg(long, value_delimiter = ',', default_values_t = [16, 64, 128])]
    connections: Vec<u32>,
    /// Rounds; each measures both paths at every level, the order alternating per round so
    /// drift on the machine hits both alike.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=10))]
    rounds: u32,
    #[arg(long, default_value = "BENCHMARKS.md")]
    out: PathBuf,
}

/// Stock no run exhausts, and a per-user limit no buyer reaches: every attempt is `won`.
const STOCK: u64 = 1_000_000_000;
const GOODS: &str = "bench";
const WARM_UP: Duration = Duration::from_secs(2);

/// What one path measured in one round at one level.
#[derive(Debug, Clone, Copy, Default)]
struct Figures {
    /// Attempts decided `won` (order rows written) per second of the measured run.
    decisions_per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
    /// Server-wide deltas over the measured run (anything else using the server counts too:
    /// `other_cores` says whether anything else ran).
    commits: f64,
    fsyncs: f64,
    decisions: f64,
    /// CPU over the measured run, in cores: the syncer process (`db` tier over HTTP),
    /// this process (the clients; the deducter too when in process), wrk, MariaDB, and the
    /// rest of the machine (the kernel, and anything else running on it).
    syncer_cores: f64,
    client_cores: f64,
    mysql_cores: f64,
    other_cores: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Path {
    PerOrder,
    DbTierHttp,
    DbTierInProcess,
}

const PATHS: [Path; 3] = [Path::PerOrder, Path::DbTierHttp, Path::DbTierInProcess];

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(
        !args.connections.is_empty() && args.connections.iter().all(|c| (1..=128).contains(c)),
        "--connections takes levels from 1 to 128"
    );
    let flush: u64 = sqlx::query_scalar("SELECT @@innodb_flush_log_at_trx_commit")
        .fetch_one(&server_pool().await?)
        .await?;
    // runs[level][path]: the figures of each round.
    let mut runs = vec![vec![Vec::new(); PATHS.len()]; args.connections.len()];
    let mut probes = Vec::new();
    for round in 0..args.rounds {
        let probe = probe_batches().await?;
        eprintln!("round {round}: {probe:?}");
        probes.push(probe);
        for (level, &connections) in args.connections.iter().enumerate() {
            let mut order = PATHS;
            if round % 2 == 1 {
                order.reverse();
            }
            for path in order {
                let figures = match path {
                    Path::PerOrder => per_order(&args, connections).await?,
                    Path::DbTierHttp => db_tier_http(&args, connections).await?,
                    Path::DbTierInProcess => db_tier_in_process(&args, connections).await?,
                };
                eprintln!(
                    "round {round}, {connections} clients: {path:?} {:.0} decisions/s, {:.2} decisions per commit, {:.2} fsyncs per decision, cores: syncer {:.2} client {:.2} mysql {:.2} other {:.2}",
                    figures.decisions_per_s,
                    figures.decisions / figures.commits.max(1.0),
                    figures.fsyncs / figures.decisions.max(1.0),
                    figures.syncer_cores,
                    figures.client_cores,
                    figures.mysql_cores,
                    figures.other_cores,
                );
                runs[level][path as usize].push(figures);
            }
        }
    }
    let body = render(&args, flush, &runs, &probes);
    println!("{body}");
    update_section(&args.out, "tier-benchmark", &body)?;
    println!("updated {}", args.out.display());
    Ok(())
}

/// A pool on the server itself (no database), for its global status.
async fn server_pool() -> anyhow::Result<MySqlPool> {
    Ok(MySqlPoolOptions::new()
        .max_connections(1)
        .connect(&seckill_e2e::mysql_db::server_url())
        .await?)
}

/// A fresh database with the syncer's schema.
async fn database(label: &str) -> anyhow::Result<TestDatabase> {
    let db = TestDatabase::create(label).await?;
    seckill_syncer::db::connect(&db.url()).await?.close().await;
    Ok(db)
}

/// The baseline: `connections` clients, each on its own MySQL connection, each attempt one
/// transaction: the conditional UPDATE of the goods' row, then (if it took a unit) the order
/// row, then COMMIT.
async fn per_order(args: &Args, connections: u32) -> anyhow::Result<Figures> {
    let db = database("bench_tier_perorder").await?;
    let pool = MySqlPoolOptions::new()
        .max_connections(connections)
        .min_connections(connections)
        .connect(&db.url())
        .await?;
    sqlx::query(
        "INSERT INTO sales (goods_id, total_stock, stock, per_user_limit, starts_at, ends_at)
         VALUES (?, ?, ?, 1000000, NOW() - INTERVAL 1 MINUTE, NOW() + INTERVAL 1 DAY)",
    )
    .bind(GOODS)
    .bind(STOCK)
    .bind(STOCK as i64)
    .execute(&pool)
    .await?;
    let sequence = Arc::new(AtomicU64::new(0));
    // Warm-up, then the measured run, each client on the same connections.
    run_clients(&pool, connections, WARM_UP, &sequence).await?;
    let before = Sample::take(None).await?;
    let started = Instant::now();
    let latencies = run_clients(
        &pool,
        connections,
        Duration::from_secs(args.seconds),
        &sequence,
    )
    .await?;
    let elapsed = started.elapsed().as_secs_f64();
    let after = Sample::take(None).await?;
    let rows: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM orders")
        .fetch_one(&pool)
        .await?;
    let left: i64 = sqlx::query_scalar("SELECT stock FROM sales WHERE goods_id = ?")
        .bind(GOODS)
        .fetch_one(&pool)
        .await?;
    anyhow::ensure!(
        rows as u64 == sequence.load(Ordering::Relaxed) && STOCK as i64 - left == rows,
        "the baseline lost a write: {rows} rows, {} attempts, stock {left}",
        sequence.load(Ordering::Relaxed)
    );
    pool.close().await;
    let mut latencies = latencies;
    latencies.sort_by(f64::total_cmp);
    let decisions = latencies.len() as f64;
    Ok(before.figures(&after, elapsed, decisions, &latencies))
}

/// Runs the baseline's clients for `duration`; returns each measured attempt's latency (ms).
async fn run_clients(
    pool: &MySqlPool,
    connections: u32,
    duration: Duration,
    sequence: &Arc<AtomicU64>,
) -> anyhow::Result<Vec<f64>> {
    let deadline = Instant::now() + duration;
    let clients = (0..connections).map(|_| {
        let (pool, sequence) = (pool.clone(), sequence.clone());
        tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut conn = pool.acquire().await?;
            while Instant::now() < deadline {
                let started = Instant::now();
                let mut tx = sqlx::Connection::begin(&mut *conn).await?;
                let taken = sqlx::query(
                    "UPDATE sales SET stock = stock - 1 WHERE goods_id = ? AND stock >= 1",
                )
                .bind(GOODS)
                .execute(&mut *tx)
                .await?
                .rows_affected();
                anyhow::ensure!(taken == 1, "the baseline ran out of stock");
                let n = sequence.fetch_add(1, Ordering::Relaxed) + 1;
                sqlx::query(
                    "INSERT INTO orders (order_id, goods_id, user_id, quantity, request_id, state, reserved_at)
                     VALUES (?, ?, ?, 1, ?, 'reserved', NOW(3))",
                )
                .bind(format!("{GOODS}.1.{n}"))
                .bind(GOODS)
                .bind(format!("u{n}"))
                .bind(format!("r{n}"))
                .execute(&mut *tx)
                .await?;
                tx.commit().await?;
                latencies.push(started.elapsed().as_secs_f64() * 1e3);
            }
            anyhow::Ok(latencies)
        })
    });
    let mut all = Vec::new();
    for client in futures::future::join_all(clients).await {
        all.extend(client??);
    }
    Ok(all)
}

/// The `db` tier: a syncer (with its private Redis, which a db goods never touches), one db
/// goods, and wrk's `connections` on the batch deduct endpoint, one attempt per call.
async fn db_tier_http(args: &Args, connections: u32) -> anyhow::Result<Figures> {
    let scratch = Scratch::new("bench-tier")?;
    let redis = RedisServer::start(&scratch.path).await?;
    let db = database("bench_tier_db").await?;
    let (syncer, _) = start_syncer(&scratch.path, &redis.url(), &db.url(), &[]).await?;
    define_db_sale(&syncer).await?;

    let script = scratch.path.join("deduct_batch.lua");
    std::fs::write(&script, wrk::deduct_batch_script(GOODS, EDGE_SECRET))?;
    let url = format!("{}{}", syncer.url(), seckill_api::DEDUCT_BATCH_PATH);
    let (warm_url, warm_script) = (url.clone(), script.clone());
    tokio::task::spawn_blocking(move || wrk::run(&warm_url, &warm_script, 1, connections, WARM_UP))
        .await??;
    let rows_before = order_rows(&db).await?;
    let refused_before = refused(&syncer).await?;
    let before = Sample::take(syncer.pid()).await?;
    let seconds = args.seconds;
    let started = Instant::now();
    let report: WrkReport = tokio::task::spawn_blocking(move || {
        wrk::run(&url, &script, 1, connections, Duration::from_secs(seconds))
    })
    .await??;
    let elapsed = started.elapsed().as_secs_f64();
    let after = Sample::take(syncer.pid()).await?;
    let decisions = (order_rows(&db).await? - rows_before) as f64;
    let refused = refused(&syncer).await? - refused_before;
    anyhow::ensure!(
        report.non_2xx == 0 && report.socket_errors == 0 && refused == 0,
        "the db tier refused attempts: {} non-2xx, {} socket errors, {refused} refused items",
        report.non_2xx,
        report.socket_errors
    );
    // wrk counts the answers within its run; the rows count the commits in the same span:
    // they differ by the attempts in flight at either end, nothing more.
    let slack = f64::from(connections) * 2.0;
    anyhow::ensure!(
        (decisions - report.requests as f64).abs() <= slack.max(report.requests as f64 * 0.01),
        "{decisions} orders written for {} answers: attempts were not decided won",
        report.requests
    );
    let mut figures = before.figures(&after, elapsed, decisions, &[]);
    figures.p50_ms = report.p50_ms;
    figures.p99_ms = report.p99_ms;
    Ok(figures)
}

/// The `db` tier through the syncer library in this process: the deducter (its batching and
/// MySQL decider, as `serve` builds it) and `connections` client tasks, each with one attempt
/// in flight (`Delivery::Claimed`, as the batch endpoint decides them).
async fn db_tier_in_process(args: &Args, connections: u32) -> anyhow::Result<Figures> {
    let scratch = Scratch::new("bench-tier-lib")?;
    let redis_server = RedisServer::start(&scratch.path).await?;
    let db = database("bench_tier_lib").await?;
    let redis = seckill_syncer::connect_redis(&redis_server.url()).await?;
    let mysql = seckill_syncer::db::connect(&db.url()).await?;
    let keys = KeySpace::new(format!("b{}", unique_suffix()));
    let now = now_ms();
    let spec: seckill_syncer::sale::SaleSpec = serde_json::from_value(serde_json::json!({
        "total_stock": STOCK,
        "per_user_limit": 1_000_000,
        "starts_at": rfc3339(now - 60_000),
        "ends_at": rfc3339(now + 3_600_000),
        "tier": "db",
    }))?;
    let sale = seckill_syncer::sale::Sale::new(GOODS, spec)?;
    seckill_syncer::db::save_sale(&mysql, &sale).await?;
    seckill_syncer::preheat::preheat(&redis, &mysql, &keys, GOODS, false).await?;
    let directory = Directory::new(mysql.clone());
    directory.refresh().await?;
    let routing = Routing::new(mysql.clone(), directory, 1_000);
    let deducter = Arc::new(Deducter::start_routed(
        vec![redis],
        keys,
        Duration::from_secs(30),
        Durability::None,
        Some(routing),
    ));
    let sequence = Arc::new(AtomicU64::new(0));
    deduct_clients(&deducter, connections, WARM_UP, &sequence).await?;
    let rows_before = order_rows(&db).await?;
    let before = Sample::take(None).await?;
    let started = Instant::now();
    let mut latencies = deduct_clients(
        &deducter,
        connections,
        Duration::from_secs(args.seconds),
        &sequence,
    )
    .await?;
    let elapsed = started.elapsed().as_secs_f64();
    let after = Sample::take(None).await?;
    let decisions = (order_rows(&db).await? - rows_before) as f64;
    anyhow::ensure!(
        decisions == latencies.len() as f64,
        "{decisions} orders written for {} won answers",
        latencies.len()
    );
    latencies.sort_by(f64::total_cmp);
    Ok(before.figures(&after, elapsed, decisions, &latencies))
}

/// Runs `connections` tasks on the deducter for `duration`; returns each won attempt's
/// latency (ms). Any other answer fails the run: nothing here should lose.
async fn deduct_clients(
    deducter: &Arc<Deducter>,
    connections: u32,
    duration: Duration,
    sequence: &Arc<AtomicU64>,
) -> anyhow::Result<Vec<f64>> {
    let deadline = Instant::now() + duration;
    let clients = (0..connections).map(|_| {
        let (deducter, sequence) = (deducter.clone(), sequence.clone());
        tokio::spawn(async move {
            let mut latencies = Vec::new();
            while Instant::now() < deadline {
                let n = sequence.fetch_add(1, Ordering::Relaxed) + 1;
                let request = seckill_api::DeductRequest {
                    goods_id: GOODS.to_owned(),
                    user_id: format!("u{n}"),
                    quantity: 1,
                    request_id: format!("r{n}"),
                };
                let started = Instant::now();
                let reply = deducter.deduct(request, Delivery::Claimed, None).await?;
                anyhow::ensure!(
                    reply.outcome == seckill_api::Outcome::Won,
                    "the db tier answered {:?}",
                    reply.outcome
                );
                latencies.push(started.elapsed().as_secs_f64() * 1e3);
            }
            anyhow::Ok(latencies)
        })
    });
    let mut all = Vec::new();
    for client in futures::future::join_all(clients).await {
        all.extend(client??);
    }
    Ok(all)
}

/// Batch sizes the probe decides alone, and how many times each.
const PROBE_SIZES: [usize; 5] = [1, 8, 32, 64, 128];
const PROBE_SAMPLES: usize = 30;

/// What one batch costs MySQL, without anything around it.
#[derive(Debug, Clone)]
struct Probe {
    round_trip_ms: f64,
    /// Median ms of the COMMIT of a one-row UPDATE (the redo log's fsync, mostly).
    commit_ms: f64,
    /// Median ms of `decide_batch` per size of [`PROBE_SIZES`].
    batch_ms: Vec<f64>,
}

/// Times `decide_batch` alone on a fresh db goods, one caller, for each size of
/// [`PROBE_SIZES`]; and a `SELECT 1` round trip.
async fn probe_batches() -> anyhow::Result<Probe> {
    let db = database("bench_tier_probe").await?;
    let pool = MySqlPoolOptions::new()
        .max_connections(1)
        .connect(&db.url())
        .await?;
    let now = now_ms();
    let spec: seckill_syncer::sale::SaleSpec = serde_json::from_value(serde_json::json!({
        "total_stock": STOCK,
        "per_user_limit": 1_000_000,
        "starts_at": rfc3339(now - 60_000),
        "ends_at": rfc3339(now + 3_600_000),
        "tier": "db",
    }))?;
    seckill_syncer::db::save_sale(&pool, &seckill_syncer::sale::Sale::new(GOODS, spec)?).await?;
    seckill_syncer::db::take_epoch(&pool, GOODS, 0, seckill_syncer::db::HistoryRule::Refuse)
        .await?;
    let mut round_trips = Vec::with_capacity(200);
    for _ in 0..200 {
        let started = Instant::now();
        sqlx::query("SELECT 1").execute(&pool).await?;
        round_trips.push(started.elapsed().as_secs_f64() * 1e3);
    }
    let mut commits = Vec::with_capacity(200);
    for _ in 0..200 {
        let mut tx = pool.begin().await?;
        sqlx::query("UPDATE sales SET stock = stock - 1 WHERE goods_id = ?")
            .bind(GOODS)
            .execute(&mut *tx)
            .await?;
        let started = Instant::now();
        tx.commit().await?;
        commits.push(started.elapsed().as_secs_f64() * 1e3);
    }
    let mut n = 0u64;
    let mut batch_ms = Vec::with_capacity(PROBE_SIZES.len());
    for size in PROBE_SIZES {
        let mut samples = Vec::with_capacity(PROBE_SAMPLES);
        for _ in 0..PROBE_SAMPLES {
            let attempts: Vec<seckill_api::DeductRequest> = (0..size)
                .map(|_| {
                    n += 1;
                    seckill_api::DeductRequest {
                        goods_id: GOODS.to_owned(),
                        user_id: format!("u{n}"),
                        quantity: 1,
                        request_id: format!("r{n}"),
                    }
                })
                .collect();
            let started = Instant::now();
            let replies = seckill_syncer::db_decide::decide_batch(
                &pool,
                GOODS,
                &attempts,
                Some(Duration::from_secs(30)),
                Instant::now() + Duration::from_secs(10),
            )
            .await?;
            samples.push(started.elapsed().as_secs_f64() * 1e3);
            anyhow::ensure!(
                replies
                    .iter()
                    .all(|r| r.outcome == seckill_api::Outcome::Won),
                "the probe's attempts must all win"
            );
        }
        batch_ms.push(median_of(samples.into_iter()));
    }
    pool.close().await;
    Ok(Probe {
        round_trip_ms: median_of(round_trips.into_iter()),
        commit_ms: median_of(commits.into_iter()),
        batch_ms,
    })
}

fn median_of(values: impl Iterator<Item = f64>) -> f64 {
    let mut values: Vec<f64> = values.collect();
    values.sort_by(f64::total_cmp);
    quantile(&values, 0.5)
}

/// Defines and preheats the benchmark's db goods through the admin API.
async fn define_db_sale(syncer: &SyncerProcess) -> anyhow::Result<()> {
    let http = reqwest::Client::new();
    let now = now_ms();
    let response = http
        .put(format!("{}/admin/sales/{GOODS}", syncer.url()))
        .header(seckill_api::SECRET_HEADER, ADMIN_SECRET)
        .json(&serde_json::json!({
            "total_stock": STOCK,
            "per_user_limit": 1_000_000,
            "starts_at": rfc3339(now - 60_000),
            "ends_at": rfc3339(now + 3_600_000),
            "tier": "db",
        }))
        .send()
        .await?;
    let status = response.status();
    anyhow::ensure!(
        status.is_success(),
        "define a db sale: {status} {}",
        response.text().await?
    );
    seckill_e2e::admin::Admin::new(&http, syncer.url())
        .preheat(GOODS, false)
        .await?;
    Ok(())
}

async fn order_rows(db: &TestDatabase) -> anyhow::Result<i64> {
    Ok(sqlx::query_scalar("SELECT COUNT(*) FROM orders")
        .fetch_one(&db.pool)
        .await?)
}

/// Batch items the syncer refused or failed (store faults, overload) so far.
async fn refused(syncer: &SyncerProcess) -> anyhow::Result<u64> {
    Ok(sum_metric(
        &syncer.metrics().await?,
        "seckill_deduct_errors_total",
    ))
}

/// Counters read at the start and the end of a measured run.
struct Sample {
    commits: f64,
    fsyncs: f64,
    syncer_ticks: f64,
    /// This process, and its children that have exited (wrk: `cutime`, `cstime`).
    self_ticks: f64,
    children_ticks: f64,
    mysql_ticks: f64,
    machine_busy_ticks: f64,
}

impl Sample {
    async fn take(syncer: Option<u32>) -> anyhow::Result<Sample> {
        let pool = server_pool().await?;
        let status: Vec<(String, String)> = sqlx::query_as(
            "SHOW GLOBAL STATUS WHERE Variable_name IN ('Com_commit', 'Innodb_data_fsyncs')",
        )
        .fetch_all(&pool)
        .await?;
        pool.close().await;
        let value = |name: &str| {
            status
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(name))
                .and_then(|(_, v)| v.parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        Ok(Sample {
            commits: value("Com_commit"),
            fsyncs: value("Innodb_data_fsyncs"),
            syncer_ticks: syncer.map(|pid| process_ticks(pid).0).unwrap_or(0.0),
            self_ticks: process_ticks(std::process::id()).0,
            children_ticks: process_ticks(std::process::id()).1,
            mysql_ticks: mysql_pid().map(|pid| process_ticks(pid).0).unwrap_or(0.0),
            machine_busy_ticks: machine_busy_ticks(),
        })
    }

    fn figures(&self, after: &Sample, elapsed: f64, decisions: f64, latencies: &[f64]) -> Figures {
        let cores = |before: f64, after: f64| (after - before) / clock_ticks() / elapsed;
        let syncer_cores = cores(self.syncer_ticks, after.syncer_ticks);
        let client_cores = cores(self.self_ticks, after.self_ticks)
            + cores(self.children_ticks, after.children_ticks);
        let mysql_cores = cores(self.mysql_ticks, after.mysql_ticks);
        let machine = cores(self.machine_busy_ticks, after.machine_busy_ticks);
        Figures {
            decisions_per_s: decisions / elapsed,
            p50_ms: quantile(latencies, 0.5),
            p99_ms: quantile(latencies, 0.99),
            commits: after.commits - self.commits,
            fsyncs: after.fsyncs - self.fsyncs,
            decisions,
            syncer_cores,
            client_cores,
            mysql_cores,
            other_cores: (machine - syncer_cores - client_cores - mysql_cores).max(0.0),
        }
    }
}

/// The median of one figure over the rounds.
fn median(runs: &[Figures], figure: impl Fn(&Figures) -> f64) -> f64 {
    let mut values: Vec<f64> = runs.iter().map(figure).collect();
    values.sort_by(f64::total_cmp);
    quantile(&values, 0.5)
}

/// The median over the rounds of the db tier's rate over the baseline's in the same round.
fn median_ratio(db: &[Figures], base: &[Figures]) -> f64 {
    let mut ratios: Vec<f64> = db
        .iter()
        .zip(base)
        .map(|(d, b)| d.decisions_per_s / b.decisions_per_s.max(1.0))
        .collect();
    ratios.sort_by(f64::total_cmp);
    quantile(&ratios, 0.5)
}

fn render(args: &Args, flush: u64, runs: &[Vec<Vec<Figures>>], probes: &[Probe]) -> String {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let levels: Vec<String> = args.connections.iter().map(u32::to_string).collect();
    let mut tables = String::new();
    for (level, connections) in args.connections.iter().enumerate() {
        let base = &runs[level][Path::PerOrder as usize];
        let http = median_ratio(&runs[level][Path::DbTierHttp as usize], base);
        let lib = median_ratio(&runs[level][Path::DbTierInProcess as usize], base);
        tables.push_str(&format!(
            "\n{connections} concurrent clients: the `db` tier decides **{http:.1}x** as many \
             attempts per second as one transaction per attempt through the syncer's HTTP \
             endpoint, {lib:.1}x through its library in process.\n\n\
             | path | decisions/s (each round) | against per-order | attempts per MySQL commit | InnoDB fsyncs per decision | CPU cores: syncer / client (+wrk) / MariaDB / other | p50 | p99 |\n\
             |---|---|---|---|---|---|---|---|\n{}",
            rows(&runs[level])
        ));
    }
    format!(
        "## The `db` tier against one MySQL transaction per attempt

Command: `target/release/seckill-bench-tier --seconds {s} --connections {c} --rounds {r}` \
(in `bash scripts/bench.sh`).

Conditions: this machine ({cores} cores shared by the clients, the syncer and MariaDB, and by \
whatever else runs on it: the `other` column), release builds, the shared MariaDB 10.11 \
(`innodb_flush_log_at_trx_commit = {flush}`), a fresh database with the syncer's schema (its \
`orders` indexes included) per measurement, stock and per-user limits no run reaches (every \
attempt wins and writes an order row). **Per-order**: as many clients as connections, each on \
its own MySQL connection, each attempt one transaction: `UPDATE sales SET stock = stock - 1 \
WHERE goods_id = ? AND stock >= 1`, the order row's `INSERT`, `COMMIT` (no HTTP, no \
idempotency or per-user checks: the cheapest honest version). **`db` tier, HTTP**: the syncer \
(`serve`) with one goods of tier `db`, and wrk (1 thread, a new buyer and request id per call) \
with as many connections on `POST /v1/deduct/batch`, one attempt per call as the filter sends \
it; a decision is an order row written during the run. **`db` tier, in process**: the \
syncer's `Deducter` with its MySQL routing, built as `serve` builds it, and as many tasks in \
this process, each with one attempt in flight. Each path measured for {s} s after a 2 s \
warm-up; {r} rounds, the paths taking turns (the order reversed every other round); figures \
are the rounds' median, a ratio the median of each round's ratio. Commits (`Com_commit`) and \
fsyncs (`Innodb_data_fsyncs`, the redo log's included) are MariaDB's global counters over the \
run; CPU is each process's user+system time over the run in cores, `other` the rest of the \
machine's busy time (the kernel, and anything else that ran).
{tables}
Where the time goes. One `SELECT 1` round trip to MariaDB takes {rtt:.2} ms; the `COMMIT` of \
a one-row UPDATE takes {commit:.2} ms (the redo log's fsync on this machine's disk). One \
batch's whole transaction alone (`seckill_syncer::db_decide::decide_batch`, one caller, new \
buyers, median of {samples} per size, median over the rounds): {batches}. That is six round \
trips (BEGIN, the sale row `FOR UPDATE`, the batch's earlier request ids and its buyers' \
holdings in one `UNION ALL`, the orders' `INSERT`, the stock's `UPDATE`, `COMMIT`) and one \
commit, then a little per attempt. The deducter's MySQL lane keeps one batch per goods in \
flight (the sale row's lock is held through the commit, so a second one would only wait for \
the row), so a batch holds the attempts that arrived while the previous one was out, about \
half the clients (the attempts-per-commit column), and B attempts every T ms cap the tier at \
B/T: its rate grows with the crowd. The per-order baseline holds the goods' row from its `UPDATE` to \
its `COMMIT`, so its transactions take the row one at a time however many clients wait: its \
rate stays flat. Through HTTP the tier also pays wrk, the request's parsing and JSON, and one \
more hop (the syncer's CPU column), against the deducter called in process.

Goal: at least 5x. This run, at {levels_text} clients: {verdict}.
",
        levels_text = levels.join(" / "),
        verdict = {
            let ratios = |path: Path| {
                runs.iter()
                    .map(|level| {
                        format!(
                            "{:.1}x",
                            median_ratio(&level[path as usize], &level[Path::PerOrder as usize])
                        )
                    })
                    .collect::<Vec<_>>()
                    .join(" / ")
            };
            format!(
                "through HTTP {}, in process {}",
                ratios(Path::DbTierHttp),
                ratios(Path::DbTierInProcess)
            )
        },
        samples = PROBE_SAMPLES,
        rtt = median_of(probes.iter().map(|p| p.round_trip_ms)),
        commit = median_of(probes.iter().map(|p| p.commit_ms)),
        batches = PROBE_SIZES
            .iter()
            .enumerate()
            .map(|(i, size)| {
                let ms = median_of(probes.iter().map(|p| p.batch_ms[i]));
                format!(
                    "{size} attempt{} {ms:.2} ms ({:.0}/s)",
                    if *size == 1 { "" } else { "s" },
                    *size as f64 * 1e3 / ms
                )
            })
            .collect::<Vec<_>>()
            .join(", "),
        s = args.seconds,
        c = levels.join(","),
        r = args.rounds,
    )
}

/// One table row per path at one concurrency level.
fn rows(runs: &[Vec<Figures>]) -> String {
    let names = [
        "per-order transaction",
        "`db` tier, HTTP (`serve`)",
        "`db` tier, in process (`Deducter`)",
    ];
    let mut out = String::new();
    for (i, name) in names.iter().enumerate() {
        let rounds: Vec<String> = runs[i]
            .iter()
            .map(|f| format!("{:.0}", f.decisions_per_s))
            .collect();
        out.push_str(&format!(
            "| {name} | {:.0} ({}) | **{:.2}x** | {:.1} | {:.3} | {:.2} / {:.2} / {:.2} / {:.2} | {:.2} ms | {:.2} ms |\n",
            median(&runs[i], |f| f.decisions_per_s),
            rounds.join(", "),
            median_ratio(&runs[i], &runs[0]),
            median(&runs[i], |f| f.decisions / f.commits.max(1.0)),
            median(&runs[i], |f| f.fsyncs / f.decisions.max(1.0)),
            median(&runs[i], |f| f.syncer_cores),
            median(&runs[i], |f| f.client_cores),
            median(&runs[i], |f| f.mysql_cores),
            median(&runs[i], |f| f.other_cores),
            median(&runs[i], |f| f.p50_ms),
            median(&runs[i], |f| f.p99_ms),
        ));
    }
    out
}
