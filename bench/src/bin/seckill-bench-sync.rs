//! Sync benchmark, in one run: the batched writer's MySQL apply against the seed's tier-1
//! approach (one conditional UPDATE per order, concurrent clients); the pipeline's rate from a
//! backlog (outbox -> Kafka -> MySQL) and which stage limits it; and the lag from deduct
//! acknowledgement to the MySQL row at a fixed offered rate. Rewrites its BENCHMARKS.md section.

use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use seckill_bench::cpu::{mysql_pid, CoresUsed, PhaseCores, PhaseCpu};
use seckill_bench::report::{quantile, update_section};
use seckill_e2e::mysql_db::TestDatabase;
use seckill_e2e::pipeline::Pipeline;
use seckill_e2e::process::wait_for;
use seckill_e2e::syncer::Role;
use seckill_syncer::events::SaleEvent;
use sqlx::mysql::MySqlPoolOptions;
use sqlx::Executor;
use tokio::sync::Semaphore;

#[derive(Parser)]
#[command(about = "Benchmark the sync pipeline and update BENCHMARKS.md")]
struct Args {
    /// Orders the batched writer applies (in batches of --batch).
    #[arg(long, default_value_t = 200_000)]
    orders: usize,
    /// Events per batch for the batched apply (and the pipeline's writer).
    #[arg(long, default_value_t = 1_000)]
    batch: usize,
    /// The pipeline's writer closes a batch this many ms after its first event (as
    /// `seckill-syncer write --batch-wait-ms`).
    #[arg(long, default_value_t = 25)]
    batch_wait_ms: u32,
    /// Orders the per-order UPDATE baseline applies.
    #[arg(long, default_value_t = 20_000)]
    baseline_orders: usize,
    /// Concurrent MySQL clients of the per-order baseline.
    #[arg(long, default_value_t = 16)]
    baseline_clients: usize,
    /// Sales preloaded into the outbox for the pipeline-rate measurement.
    #[arg(long, default_value_t = 200_000)]
    backlog: usize,
    /// Goods the backlog is spread over (their ids decide their partitions; the writer applies
    /// partitions side by side).
    #[arg(long, default_value_t = 1)]
    backlog_goods: usize,
    /// Offered sales per second for the lag measurement (open loop).
    #[arg(long, default_value_t = 10_000)]
    rate: u32,
    /// Seconds the lag measurement offers sales.
    #[arg(long, default_value_t = 10)]
    seconds: u32,
    #[arg(long, default_value = "BENCHMARKS.md")]
    out: std::path::PathBuf,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(
        args.batch > 0 && args.baseline_clients > 0 && args.rate > 0 && args.backlog_goods > 0,
        "sizes must be positive"
    );
    let per_order = per_order_updates(&args).await?;
    eprintln!("per-order UPDATE: {per_order:.0} orders/s");
    let batched = batched_apply(&args).await?;
    eprintln!("batched apply: {batched:.0} orders/s");
    let pipeline = pipeline_rates(&args).await?;
    eprintln!("{pipeline:?}");
    let body = render(&args, per_order, batched, &pipeline);
    println!("{body}");
    update_section(&args.out, "sync-benchmark", &body)?;
    println!("updated {}", args.out.display());
    Ok(())
}

/// The seed's tier 1: every order is one `UPDATE ... SET stock = stock - 1 WHERE ... AND
/// stock > 0` on the hot row, from `baseline_clients` concurrent connections.
async fn per_order_updates(args: &Args) -> anyhow::Result<f64> {
    let db = TestDatabase::create("bench_perorder").await?;
    let pool = MySqlPoolOptions::new()
        .max_connections(args.baseline_clients as u32)
        .connect(&db.url())
        .await?;
    pool.execute("CREATE TABLE goods (id INT PRIMARY KEY, stock BIGINT NOT NULL) ENGINE = InnoDB")
        .await?;
    sqlx::query("INSERT INTO goods VALUES (1, ?)")
        .bind(args.baseline_orders as i64)
        .execute(&pool)
        .await?;
    let per_client = args.baseline_orders / args.baseline_clients;
    let started = Instant::now();
    let clients = (0..args.baseline_clients).map(|_| {
        let pool = pool.clone();
        tokio::spawn(async move {
            for _ in 0..per_client {
                sqlx::query("UPDATE goods SET stock = stock - 1 WHERE id = 1 AND stock > 0")
                    .execute(&pool)
                    .await?;
            }
            anyhow::Ok(())
        })
    });
    for client in futures::future::join_all(clients).await {
        client??;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let left: i64 = sqlx::query_scalar("SELECT stock FROM goods WHERE id = 1")
        .fetch_one(&pool)
        .await?;
    anyhow::ensure!(
        left == (args.baseline_orders - per_client * args.baseline_clients) as i64,
        "the baseline lost updates"
    );
    Ok((per_client * args.baseline_clients) as f64 / elapsed)
}

/// The batched writer's own apply (`seckill_syncer::writer::apply_events`): one transaction
/// per batch inserting the new orders and updating the goods once. One client.
async fn batched_apply(args: &Args) -> anyhow::Result<f64> {
    let db = TestDatabase::create("bench_batched").await?;
    let pool = seckill_syncer::db::connect(&db.url()).await?;
    sqlx::query(
        "INSERT INTO sales (goods_id, total_stock, stock, per_user_limit, starts_at, ends_at)
         VALUES ('hot', ?, ?, 1, NOW(), NOW() + INTERVAL 1 DAY)",
    )
    .bind(args.orders as u64)
    .bind(args.orders as i64)
    .execute(&pool)
    .await?;
    let events: Vec<SaleEvent> = (0..args.orders)
        .map(|i| SaleEvent::Reserved {
            order_id: format!("hot.1.{i}"),
            goods_id: "hot".into(),
            user_id: format!("u{i}"),
            quantity: 1,
            request_id: format!("r{i}"),
            at_ms: 1_800_000_000_000,
        })
        .collect();
    let started = Instant::now();
    for chunk in events.chunks(args.batch) {
        let batch: Vec<&SaleEvent> = chunk.iter().collect();
        let (applied, refused) = seckill_syncer::writer::apply_events(&pool, &batch).await?;
        anyhow::ensure!(
            refused.is_empty() && applied.new_orders == chunk.len(),
            "batch not fully applied"
        );
    }
    let elapsed = started.elapsed().as_secs_f64();
    let stock: i64 = sqlx::query_scalar("SELECT stock FROM sales WHERE goods_id = 'hot'")
        .fetch_one(&pool)
        .await?;
    anyhow::ensure!(stock == 0, "MySQL stock should end at 0, is {stock}");
    Ok(args.orders as f64 / elapsed)
}

#[derive(Debug)]
struct PipelineFigures {
    deduct_rate: f64,
    relay_rate: f64,
    pipeline_rate: f64,
    offered_rate: f64,
    achieved_rate: f64,
    lag_p50_ms: f64,
    lag_p99_ms: f64,
    lag_max_ms: f64,
    lag_orders: usize,
    /// Who used the cores while the backlog drained.
    backlog_cpu: PhaseCores,
}

async fn pipeline_rates(args: &Args) -> anyhow::Result<PipelineFigures> {
    let p = Arc::new(Pipeline::start("bench_pipeline").await?);

    // Backlog: sales wait in the outbox (no relay yet); then relay and writer start together.
    let goods: Vec<String> = (0..args.backlog_goods)
        .map(|i| format!("backlog{i}"))
        .collect();
    let per_goods = args.backlog / args.backlog_goods;
    let started = Instant::now();
    let mut sold = 0;
    for id in &goods {
        p.open_sale(id, per_goods as u64, 1).await?;
        let here = p.sell(id, "b", per_goods).await?.len();
        anyhow::ensure!(
            p.outbox_len(id).await? == here as u64,
            "the outbox holds the backlog"
        );
        sold += here;
    }
    let deduct_rate = sold as f64 / started.elapsed().as_secs_f64();
    // The writer runs first, as it does all through a sale, and waits on the empty topic; the
    // clock starts when the relay is started, so its start-up counts and the writer's does not.
    let writer = p
        .spawn(
            Role::Write {
                batch_size: args.batch as u32,
                batch_wait_ms: args.batch_wait_ms,
            },
            None,
            &[],
        )
        .await?;
    let mut cpu = PhaseCpu::start(&[
        ("MariaDB", mysql_pid()),
        ("Tansu (the broker)", p.broker.pid()),
        ("Redis", p.redis.pid()),
        ("the writer", writer.pid()),
        ("this benchmark (its polls)", Some(std::process::id())),
    ]);
    let started = Instant::now();
    let relay = p
        .spawn(
            Role::Relay {
                name: "relay-0".into(),
            },
            None,
            &[],
        )
        .await?;
    cpu.add_born("the relay", relay.pid());
    wait_for(
        "the relay to empty the outbox",
        Duration::from_secs(600),
        || async {
            for id in &goods {
                if p.outbox_len(id).await? > 0 {
                    return Ok(None);
                }
            }
            Ok(Some(()))
        },
    )
    .await?;
    let relay_rate = sold as f64 / started.elapsed().as_secs_f64();
    // Polls the sales row, not a count of the orders: counting 200,000 rows every 25 ms
    // would load the very MySQL being measured. The rows are counted once, at the end.
    for id in &goods {
        p.wait_for_reserved_units(id, per_goods as i64, Duration::from_secs(600))
            .await?;
    }
    let pipeline_rate = sold as f64 / started.elapsed().as_secs_f64();
    let backlog_cpu = cpu.finish();
    for id in &goods {
        let (rows, distinct) = p.order_rows(id).await?;
        anyhow::ensure!(
            rows == per_goods as i64 && distinct == rows,
            "{id}: {per_goods} units reserved in MySQL, but {rows} order rows ({distinct} distinct)"
        );
    }

    // Lag: sales offered on a fixed schedule while relay and writer run.
    let total = (args.rate * args.seconds) as usize;
    p.open_sale("lag", total as u64, 1).await?;
    let slots = Arc::new(Semaphore::new(1_024));
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(args.rate)));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(total);
    for i in 0..total {
        ticker.tick().await;
        let permit = slots.clone().acquire_owned().await?;
        let p = p.clone();
        tasks.push(tokio::spawn(async move {
            let _permit = permit;
            let user = format!("l{i}");
            p.buy("lag", &user, &user).await
        }));
    }
    let mut won = 0;
    for task in tasks {
        if task.await??.is_some() {
            won += 1;
        }
    }
    let achieved_rate = won as f64 / started.elapsed().as_secs_f64();
    p.wait_for_rows("lag", won, Duration::from_secs(600))
        .await?;
    let mut lags: Vec<f64> = sqlx::query_scalar::<_, i64>(
        "SELECT TIMESTAMPDIFF(MICROSECOND, reserved_at, written_at) FROM orders WHERE goods_id = 'lag'",
    )
    .fetch_all(&p.db.pool)
    .await?
    .into_iter()
    .map(|us| us as f64 / 1000.0)
    .collect();
    lags.sort_by(f64::total_cmp);
    Ok(PipelineFigures {
        deduct_rate,
        relay_rate,
        pipeline_rate,
        offered_rate: f64::from(args.rate),
        achieved_rate,
        lag_p50_ms: quantile(&lags, 0.5),
        lag_p99_ms: quantile(&lags, 0.99),
        lag_max_ms: quantile(&lags, 1.0),
        lag_orders: lags.len(),
        backlog_cpu,
    })
}

fn render(args: &Args, per_order: f64, batched: f64, p: &PipelineFigures) -> String {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    // The stage that finished last: how long MySQL took to get its last row after the relay
    // had emptied the outbox, against the whole drain.
    let relay_s = args.backlog as f64 / p.relay_rate.max(1.0);
    let drain_s = args.backlog as f64 / p.pipeline_rate.max(1.0);
    let tail_s = (drain_s - relay_s).max(0.0);
    let side = if tail_s > 0.2 * drain_s {
        "the writer side (Kafka fetch from the broker plus the MySQL apply)"
    } else {
        "the relay side (outbox read and Kafka produce)"
    };
    let stage = format!(
        "{side}: MySQL got its last row {tail_s:.2} s after the relay had emptied the outbox, \
         {:.0}% of the {drain_s:.2} s drain",
        100.0 * tail_s / drain_s
    );
    let machine = p.backlog_cpu.machine;
    let busy = machine * 100.0 / cores.max(1) as f64;
    let mut processes: Vec<&CoresUsed> = p.backlog_cpu.processes.iter().collect();
    processes.sort_by(|a, b| b.cores.total_cmp(&a.cores));
    let listed: f64 = processes.iter().map(|u| u.cores).sum();
    let mut cpu_rows: String = processes
        .iter()
        .map(|u| format!("| {} | {:.0}% |\n", u.name, u.cores * 100.0))
        .collect();
    cpu_rows.push_str(&format!(
        "| everything else (kernel threads, the idle HTTP syncer, other services) | {:.0}% |\n| **the whole machine** | **{:.0}%, {busy:.0}% of its {cores} cores** |\n",
        ((machine - listed) * 100.0).max(0.0),
        machine * 100.0,
    ));
    let limiter = if cores > 0 && machine >= 0.75 * cores as f64 {
        format!(
            "the cores. The machine was busy {busy:.0}% of its {cores} cores while the backlog \
             drained, so every stage waited on CPU the others were using; the biggest share was \
             {}'s. Within that, the slower stage was {stage}",
            processes.first().map_or("nobody", |u| u.name),
        )
    } else {
        format!(
            "not the cores: the machine was busy {busy:.0}% of its {cores} cores while the backlog \
             drained, so the stages waited on each other's round trips more than on CPU. The \
             slower stage was {stage}"
        )
    };
    format!(
        "## Sync: batched MySQL writer and the outbox -> Kafka -> MySQL pipeline

Command: `bash scripts/bench.sh` (runs `target/release/seckill-bench-sync --orders {orders} --batch {batch} \
--batch-wait-ms {batch_wait_ms} --baseline-orders {baseline} --baseline-clients {clients} --backlog {backlog} --backlog-goods {backlog_goods} --rate {rate} --seconds {seconds}`).

Conditions: this machine ({cores} cores shared by everything), MariaDB 10.11 (Debian defaults), a private \
redis-server, Tansu 0.6 (sqlite storage) as the Kafka broker, the syncer in release build.

| ratio | measured | target |
|---|---|---|
| batched apply / per-order UPDATE (orders applied per second) | **{ratio:.0}x** | at least 20x |
| whole pipeline from a backlog of {backlog} (outbox -> Kafka -> MySQL) | **{pipeline:.0} orders/s** | at least 40,000 orders/s |
| whole pipeline / batched apply alone (MySQL's own ceiling) | **{ceiling:.2}x** | reference |
| lag p99, deduct acknowledgement to MySQL row, at {rate} sales/s offered | **{p99:.0} ms** | under 300 ms |

Absolute figures, this machine, this run:

| what | conditions | figure |
|---|---|---|
| per-order `UPDATE goods SET stock = stock - 1 WHERE id = 1 AND stock > 0` | {clients} concurrent clients, {baseline} orders | {per_order:.0} orders/s |
| batched apply (`writer::apply_events`) | 1 client, batches of {batch}: one INSERT of the new orders + one UPDATE per goods per transaction, {orders} orders | {batched:.0} orders/s |
| deduct endpoint filling the outbox | 64 concurrent HTTP clients, Lua deduct + outbox append, {backlog} sales | {deduct:.0} sales/s |
| relay, backlog of {backlog} | outbox stream -> Kafka (idempotent producer, acks=all, up to 128 events a message) | {relay:.0} events/s |
| whole pipeline, backlog of {backlog} | outbox -> Kafka -> MySQL, the writer running, from the relay's start to MySQL's last row, {backlog_goods} goods | {pipeline:.0} orders/s |
| lag at a fixed offered rate | {offered:.0} sales/s offered for {seconds} s (achieved {achieved:.0}/s), {lag_orders} orders | p50 {p50:.0} ms, p99 {p99:.0} ms, max {max:.0} ms |

CPU while the backlog drained (from the relay's start to MySQL's last row), in % of one core:

| process | CPU |
|---|---|
{cpu_rows}
What limits the pipeline here: {limiter}. The lag is measured from the deduct script's Redis time \
(`reserved_at`) to the writer's INSERT (`written_at`, MySQL's clock; same machine).
",
        orders = args.orders,
        batch = args.batch,
        batch_wait_ms = args.batch_wait_ms,
        baseline = args.baseline_orders,
        clients = args.baseline_clients,
        backlog = args.backlog,
        backlog_goods = args.backlog_goods,
        rate = args.rate,
        seconds = args.seconds,
        ratio = batched / per_order,
        ceiling = p.pipeline_rate / batched,
        p99 = p.lag_p99_ms,
        p50 = p.lag_p50_ms,
        max = p.lag_max_ms,
        deduct = p.deduct_rate,
        relay = p.relay_rate,
        pipeline = p.pipeline_rate,
        offered = p.offered_rate,
        achieved = p.achieved_rate,
        lag_orders = p.lag_orders,
    )
}
