//! Two benchmarks, in one run, that rewrite their BENCHMARKS.md section and draw the sale:
//! the deduct endpoint against `redis-benchmark` running the same Lua script on the same
//! Redis, and an end-to-end sale (many buyers, few units) through the whole stack.

use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use seckill_bench::report::update_section;
use seckill_bench::wrk;
use seckill_e2e::stack::{Stack, StackOptions, EDGE_SECRET};
use seckill_load::{self as load, LatencySummary, Plan};
use serde_json::json;

#[derive(Parser)]
#[command(about = "Benchmark the deduct endpoint and an end-to-end sale; update BENCHMARKS.md")]
struct Args {
    /// Seconds wrk measures the deduct endpoint.
    #[arg(long, default_value_t = 10)]
    deduct_seconds: u64,
    /// Requests redis-benchmark sends.
    #[arg(long, default_value_t = 300_000)]
    redis_requests: u64,
    /// Connections of both deduct load generators.
    #[arg(long, default_value_t = 50)]
    connections: u32,
    /// Buyers in the end-to-end sale (one request each, on average).
    #[arg(long, default_value_t = 100_000)]
    buyers: u64,
    /// Units on sale.
    #[arg(long, default_value_t = 1_000)]
    units: u64,
    /// Offered requests per second in the end-to-end sale (open loop).
    #[arg(long, default_value_t = 10_000.0)]
    rate: f64,
    #[arg(long, default_value = "BENCHMARKS.md")]
    out: PathBuf,
    #[arg(long, default_value = "docs/sale.svg")]
    chart: PathBuf,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let deduct = deduct_against_redis(&args).await?;
    eprintln!("{deduct:?}");
    let sale = end_to_end_sale(&args).await?;
    let body = render(&args, &deduct, &sale);
    println!("{body}");
    update_section(&args.out, "sale-benchmark", &body)?;
    println!(
        "updated {} and {}",
        args.out.display(),
        args.chart.display()
    );
    Ok(())
}

#[derive(Debug)]
struct DeductFigures {
    endpoint: wrk::WrkReport,
    redis_rps: f64,
}

async fn deduct_against_redis(args: &Args) -> anyhow::Result<DeductFigures> {
    let mut options = StackOptions::new("bench_deduct");
    options.without_syncer = false;
    let stack = Stack::start(options).await?;
    stack.open_sale("bench", 1_000_000_000, 1_000_000).await?;

    // The syncer's endpoint: HTTP, JSON, the batched script call.
    let script = stack.scratch.path.join("deduct.lua");
    std::fs::write(&script, wrk::deduct_script("bench", EDGE_SECRET))?;
    let url = format!("{}{}", stack.syncer()?.url(), seckill_api::DEDUCT_PATH);
    let (connections, seconds) = (args.connections, args.deduct_seconds);
    let endpoint = tokio::task::spawn_blocking(move || {
        wrk::run(&url, &script, 1, connections, Duration::from_secs(2))?;
        wrk::run(&url, &script, 1, connections, Duration::from_secs(seconds))
    })
    .await??;
    anyhow::ensure!(
        endpoint.non_2xx == 0,
        "the deduct endpoint refused {} calls",
        endpoint.non_2xx
    );

    // redis-benchmark: the same script (one attempt per call), on the same Redis, same goods,
    // as the gate calls it (reservations wait for a claim), with a deadline that never comes.
    let mut conn = stack.redis().await?;
    let sha: String = redis::cmd("SCRIPT")
        .arg("LOAD")
        .arg(seckill_syncer::scripts::DEDUCT)
        .query_async(&mut conn)
        .await?;
    let goods = seckill_syncer::keys::KeySpace::new(stack.key_prefix.clone()).goods("bench");
    let keys: Vec<String> = goods
        .deduct_script_keys()
        .iter()
        .map(|k| k.to_string())
        .collect();
    let output = Command::new("redis-benchmark")
        .args(["-h", "127.0.0.1", "-p", &stack.redis.port.to_string()])
        .args([
            "-c",
            &args.connections.to_string(),
            "-n",
            &args.redis_requests.to_string(),
        ])
        .args(["-r", "1000000000", "-q", "--csv"])
        .args(["EVALSHA", &sha, &keys.len().to_string()])
        .args(&keys)
        // Goods, deadline, claim window, and 0: no epoch check (the syncer passes MySQL's).
        .args(["bench", "99999999999999", "30000", "0"])
        .args(["u__rand_int__", "1", "r__rand_int__"])
        .output()?;
    let text = String::from_utf8_lossy(&output.stdout);
    anyhow::ensure!(output.status.success(), "redis-benchmark failed: {text}");
    // CSV: "test","rps",... on the last line.
    let redis_rps = text
        .lines()
        .filter_map(|line| line.split(',').nth(1))
        .filter_map(|v| v.trim_matches('"').parse::<f64>().ok())
        .next_back()
        .ok_or_else(|| anyhow::anyhow!("no rate in redis-benchmark's output: {text}"))?;
    Ok(DeductFigures {
        endpoint,
        redis_rps,
    })
}

struct SaleFigures {
    requests: u64,
    elapsed: Duration,
    sold_out_after: Option<Duration>,
    mysql_consistent_after: Option<Duration>,
    outcomes: Vec<(String, LatencySummary)>,
    winners: u64,
    workers: u32,
}

async fn end_to_end_sale(args: &Args) -> anyhow::Result<SaleFigures> {
    let workers = 2;
    let mut options = StackOptions::new("bench_sale");
    options.pipeline = true;
    options.workers = workers;
    let stack = Arc::new(Stack::start(options).await?);
    stack.open_sale("hot", args.units, 1).await?;
    let plan = Plan {
        url: format!("{}/seckill/hot/buy", stack.envoy.url()),
        user_header: "x-user-id".into(),
        buyers: args.buyers,
        quantity: 1,
        rate: args.rate,
        ramp: Duration::from_secs(1),
        stages: Vec::new(),
        requests: args.buyers,
        headers: Vec::new(),
        run_id: load::fresh_run_id(),
        in_flight_max: 2_048,
        timeout: Duration::from_secs(10),
    };
    // Stock left and MySQL's order rows, sampled every 100 ms: to time the sell-out and the
    // moment MySQL has caught up, and to draw the stock line.
    let samples: Arc<Mutex<Vec<(Duration, u64, i64)>>> = Arc::default();
    let started = Instant::now();
    let sampler = {
        let (stack, samples) = (stack.clone(), samples.clone());
        tokio::spawn(async move {
            loop {
                let rows: i64 =
                    sqlx::query_scalar("SELECT COUNT(*) FROM orders WHERE goods_id = 'hot'")
                        .fetch_one(&stack.db.pool)
                        .await
                        .unwrap_or(-1);
                if let Ok(live) = stack.live("hot").await {
                    if let (Some(left), Ok(mut s)) = (live["available"].as_u64(), samples.lock()) {
                        s.push((started.elapsed(), left, rows));
                    }
                }
                // The sampling interval of the stock line and of MySQL catching up.
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let run = load::run(&plan, |_, _| {}).await?;
    let winners = run.recorder.count("won");
    // Let MySQL catch up (bounded), still sampling.
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline {
        let caught_up = samples
            .lock()
            .map(|s| s.iter().any(|(_, _, rows)| *rows as u64 == winners))
            .unwrap_or(false);
        if caught_up {
            break;
        }
        // Poll the sampler's result, bounded by the deadline above.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    sampler.abort();
    let samples = samples.lock().map(|s| s.clone()).unwrap_or_default();
    let sold_out_after = samples
        .iter()
        .find(|(_, left, _)| *left == 0)
        .map(|(at, _, _)| *at);
    let mysql_consistent_after = samples
        .iter()
        .find(|(_, _, rows)| *rows >= 0 && *rows as u64 == winners)
        .map(|(at, _, _)| *at);
    let mut timeline = run.recorder.timeline();
    for second in &mut timeline {
        second.remaining = samples
            .iter()
            .rev()
            .find(|(at, _, _)| at.as_secs_f64() <= second.start_s + second.width_s)
            .map(|(_, left, _)| *left);
    }
    if let Some(dir) = args.chart.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let title = format!(
        "{} buyers for {} units at {:.0} requests/s offered (Envoy {workers} workers)",
        args.buyers, args.units, args.rate
    );
    load::chart::render(&args.chart, &title, &timeline)?;
    std::fs::write(
        args.chart.with_extension("json"),
        serde_json::to_vec_pretty(
            &json!({ "timeline": timeline, "outcomes": run.recorder.outcomes() }),
        )?,
    )?;
    let mut outcomes: Vec<_> = run.recorder.outcomes().into_iter().collect();
    outcomes.sort_by_key(|(o, s)| (o != "won", std::cmp::Reverse(s.count)));
    Ok(SaleFigures {
        requests: run.recorder.total(),
        elapsed: run.elapsed,
        sold_out_after,
        mysql_consistent_after,
        outcomes,
        winners,
        workers,
    })
}

fn render(args: &Args, d: &DeductFigures, s: &SaleFigures) -> String {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let secs = |d: Option<Duration>| {
        d.map_or("not reached".to_owned(), |d| {
            format!("{:.2} s", d.as_secs_f64())
        })
    };
    let mut rows = String::new();
    for (outcome, l) in &s.outcomes {
        rows.push_str(&format!(
            "| {outcome} | {} | {:.2} | {:.2} | {:.2} | {:.2} |\n",
            l.count, l.p50_ms, l.p99_ms, l.p999_ms, l.max_ms
        ));
    }
    format!(
        "## Deduct endpoint and an end-to-end sale

Command: `bash scripts/bench.sh` (runs `target/release/seckill-bench-sale --deduct-seconds {ds} \
--redis-requests {rr} --connections {c} --buyers {b} --units {u} --rate {rate}`).

Conditions: this machine ({cores} cores shared by everything below), release builds, a private \
redis-server, Tansu, MariaDB, Envoy 1.40.

| ratio | measured |
|---|---|
| deduct endpoint (HTTP + JSON + batched Lua call) / `redis-benchmark` EVALSHA of the same script | **{ratio:.2}x** |

| what | conditions | requests/s | p50 | p99 |
|---|---|---|---|---|
| deduct endpoint | wrk, 1 thread, {c} connections, {ds} s, a new buyer per call | {erps:.0} | {ep50:.2} ms | {ep99:.2} ms |
| `redis-benchmark` EVALSHA `deduct_batch.lua` | {c} clients, {rr} calls, random buyers (`-r`), one attempt per call | {rrps:.0} | | |

The endpoint batches concurrent attempts for one goods into one script call, so it can pass the \
one-attempt-per-call rate `redis-benchmark` measures; the HTTP and JSON work is what it pays.

### End-to-end sale

{b} buyers (one request each) for {u} units (one per buyer), offered open-loop at {rate:.0} \
requests/s after a 1 s ramp, through Envoy ({workers} workers) with the filter, the syncer with its \
pipeline, Redis, Tansu and MariaDB; the load generator runs on the same machine.

| figure | this run |
|---|---|
| requests answered | {req} in {el:.2} s |
| winners | {winners} |
| time to sell out (from the first request) | {soldout} |
| time until MySQL holds every order (from the first request; sampled every 100 ms) | {mysql} |

| outcome | count | p50 ms | p99 ms | p99.9 ms | max ms |
|---|---|---|---|---|---|
{rows}
Latency is measured from each request's scheduled send time (no coordinated omission).

![the sale over time](docs/sale.svg)
",
        ds = args.deduct_seconds,
        rr = args.redis_requests,
        c = args.connections,
        b = args.buyers,
        u = args.units,
        rate = args.rate,
        ratio = d.endpoint.requests_per_second / d.redis_rps,
        erps = d.endpoint.requests_per_second,
        ep50 = d.endpoint.p50_ms,
        ep99 = d.endpoint.p99_ms,
        rrps = d.redis_rps,
        workers = s.workers,
        req = s.requests,
        el = s.elapsed.as_secs_f64(),
        winners = s.winners,
        soldout = secs(s.sold_out_after),
        mysql = secs(s.mysql_consistent_after),
    )
}
