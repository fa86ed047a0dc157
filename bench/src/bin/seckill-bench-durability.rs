//! What Redis durability costs a hot goods: decisions per second through the syncer's deduct
//! endpoint under `--redis-durability none` (Redis without persistence), `aof` (appendfsync
//! always) and `replicas:1` (one replica attached, WAIT after each script call), measured in
//! one run, the settings taking turns round by round. Rewrites its BENCHMARKS.md section.

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use seckill_bench::local::start_syncer;
use seckill_bench::report::update_section;
use seckill_bench::wrk::{self, WrkReport};
use seckill_e2e::admin::Admin;
use seckill_e2e::mysql_db::TestDatabase;
use seckill_e2e::process::Scratch;
use seckill_e2e::redis_server::{RedisServer, AOF_ALWAYS};
use seckill_e2e::stack::{now_ms, EDGE_SECRET};
use seckill_e2e::syncer::SyncerProcess;

#[derive(Parser)]
#[command(about = "Benchmark the deduct endpoint under each Redis durability setting")]
struct Args {
    /// Seconds wrk measures each setting in each round.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Connections of wrk (concurrent buyers of the one hot goods): each level is measured
    /// in every round. A few buyers show the wait whole; a crowd fills the batches.
    #[arg(long, value_delimiter = ',', default_values_t = [50, 400])]
    connections: Vec<u32>,
    /// Rounds; each measures every setting once, in turn, so drift hits all alike.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=10))]
    rounds: u32,
    #[arg(long, default_value = "BENCHMARKS.md")]
    out: PathBuf,
}

/// One durability setting and the Redis it needs.
struct Setting {
    durability: &'static str,
    redis_args: &'static [&'static str],
    replica: bool,
    what: &'static str,
}

const SETTINGS: [Setting; 3] = [
    Setting {
        durability: "none",
        redis_args: &[],
        replica: false,
        what: "Redis without persistence",
    },
    Setting {
        durability: "aof",
        redis_args: AOF_ALWAYS,
        replica: false,
        what: "AOF with appendfsync always (ext4 on the machine's disk)",
    },
    Setting {
        durability: "replicas:1",
        redis_args: &[],
        replica: true,
        what: "one replica on the same machine; WAIT 1 after each script call",
    },
];

/// What one setting measured in one round.
#[derive(Debug, Clone, Copy, Default)]
struct Figures {
    wrk: WrkReport,
    /// Script calls (one per batch of attempts) during the measured run.
    batches: f64,
    attempts: f64,
    /// Median round trip of one write alone (with its WAIT under `replicas:1`), in µs.
    write_us: f64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(
        !args.connections.is_empty() && args.connections.iter().all(|c| (1..=1_000).contains(c)),
        "--connections takes levels from 1 to 1000"
    );
    // runs[level][setting]: the figures of each round.
    let mut runs = vec![vec![Vec::new(); SETTINGS.len()]; args.connections.len()];
    for round in 0..args.rounds {
        for (level, &connections) in args.connections.iter().enumerate() {
            for (index, setting) in SETTINGS.iter().enumerate() {
                let figures = measure(&args, connections, setting).await?;
                eprintln!(
                    "round {round}, {connections} connections: {} {:.0} decisions/s, {:.1} attempts per script call",
                    setting.durability,
                    figures.wrk.requests_per_second,
                    figures.attempts / figures.batches.max(1.0)
                );
                runs[level][index].push(figures);
            }
        }
    }
    let body = render(&args, &runs);
    println!("{body}");
    update_section(&args.out, "durability-benchmark", &body)?;
    println!("updated {}", args.out.display());
    Ok(())
}

/// Starts Redis (and its replica) for `setting`, a syncer with that setting, one hot goods,
/// and measures the deduct endpoint with wrk after a warm-up.
async fn measure(args: &Args, connections: u32, setting: &Setting) -> anyhow::Result<Figures> {
    let scratch = Scratch::new("bench-durability")?;
    let redis = RedisServer::start_with(&scratch.path, setting.redis_args).await?;
    let _replica = match setting.replica {
        true => Some(RedisServer::start_replica(&scratch.path, &redis).await?),
        false => None,
    };
    let write_us = write_round_trip_us(&redis, setting.replica).await?;
    let db = TestDatabase::create("bench_durability").await?;
    let env = [("SECKILL_REDIS_DURABILITY", setting.durability)];
    let (syncer, _) = start_syncer(&scratch.path, &redis.url(), &db.url(), &env).await?;
    let http = reqwest::Client::new();
    let admin = Admin::new(&http, syncer.url());
    let now = now_ms();
    // Stock and a per-user limit no run reaches: every call is decided `won` by the script.
    admin
        .define_sale(
            "bench",
            1_000_000_000,
            1_000_000,
            (now - 60_000, now + 3_600_000),
            900,
        )
        .await?;
    admin.preheat("bench", false).await?;

    let script = scratch.path.join("deduct.lua");
    std::fs::write(&script, wrk::deduct_script("bench", EDGE_SECRET))?;
    let url = format!("{}{}", syncer.url(), seckill_api::DEDUCT_PATH);
    let warm = script.clone();
    let warm_url = url.clone();
    tokio::task::spawn_blocking(move || {
        wrk::run(&warm_url, &warm, 1, connections, Duration::from_secs(2))
    })
    .await??;
    let before = batch_counts(&syncer).await?;
    let seconds = args.seconds;
    let report = tokio::task::spawn_blocking(move || {
        wrk::run(&url, &script, 1, connections, Duration::from_secs(seconds))
    })
    .await??;
    let after = batch_counts(&syncer).await?;
    anyhow::ensure!(
        report.non_2xx == 0,
        "{}: the deduct endpoint refused {} calls",
        setting.durability,
        report.non_2xx
    );
    Ok(Figures {
        wrk: report,
        batches: after.0 - before.0,
        attempts: after.1 - before.1,
        write_us,
    })
}

/// Sequential writes measured one by one, for the median.
const PROBE_WRITES: usize = 200;

/// The median round trip of one INCR on its own (followed by `WAIT 1` when `wait`): what
/// one script call waits for under the setting, besides the script itself.
async fn write_round_trip_us(redis: &RedisServer, wait: bool) -> anyhow::Result<f64> {
    let mut conn = redis.connection().await?;
    let mut samples = Vec::with_capacity(PROBE_WRITES);
    for _ in 0..PROBE_WRITES {
        let mut pipe = redis::pipe();
        pipe.cmd("INCR").arg("bench:probe");
        if wait {
            pipe.cmd("WAIT").arg(1).arg(1_000);
        }
        let started = std::time::Instant::now();
        let _: redis::Value = pipe.query_async(&mut conn).await?;
        samples.push(started.elapsed().as_secs_f64() * 1e6);
    }
    samples.sort_by(f64::total_cmp);
    Ok(seckill_bench::report::quantile(&samples, 0.5))
}

/// Script calls and attempts so far: the count and sum of `seckill_deduct_batch_attempts`.
async fn batch_counts(syncer: &SyncerProcess) -> anyhow::Result<(f64, f64)> {
    let text = syncer.metrics().await?;
    let sample = |name: &str| {
        text.lines()
            .find_map(|line| line.strip_prefix(name)?.trim().parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    Ok((
        sample("seckill_deduct_batch_attempts_count"),
        sample("seckill_deduct_batch_attempts_sum"),
    ))
}

/// The median of one figure over the rounds: one round disturbed by other work on the
/// machine does not move it.
fn median(runs: &[Figures], figure: impl Fn(&Figures) -> f64) -> f64 {
    let mut values: Vec<f64> = runs.iter().map(figure).collect();
    values.sort_by(f64::total_cmp);
    seckill_bench::report::quantile(&values, 0.5)
}

/// The median over the rounds of a setting's rate over `none`'s in the same round: the two
/// ran minutes apart at most, so drifting load on the machine cancels out.
fn median_ratio(setting: &[Figures], none: &[Figures]) -> f64 {
    let mut ratios: Vec<f64> = setting
        .iter()
        .zip(none)
        .map(|(s, n)| s.wrk.requests_per_second / n.wrk.requests_per_second.max(1.0))
        .collect();
    ratios.sort_by(f64::total_cmp);
    seckill_bench::report::quantile(&ratios, 0.5)
}

fn render(args: &Args, runs: &[Vec<Vec<Figures>>]) -> String {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let levels: Vec<String> = args.connections.iter().map(u32::to_string).collect();
    let mut tables = String::new();
    for (level, connections) in args.connections.iter().enumerate() {
        tables.push_str(&format!(
            "\n{connections} connections:\n\n\
             | setting | Redis | decisions/s (each round) | against `none` | attempts per script call | script calls/s | p50 | p99 |\n\
             |---|---|---|---|---|---|---|---|\n{}",
            rows(args, &runs[level])
        ));
    }
    format!(
        "## Redis durability: what `aof` and `replicas:1` cost a hot goods

Command: `target/release/seckill-bench-durability --seconds {s} --connections {c} --rounds {r}` \
(in `bash scripts/bench.sh`).

Conditions: this machine ({cores} cores shared by wrk, the syncer and every Redis, and by \
whatever else runs on it), release builds; for each setting in turn, a fresh private \
redis-server (and replica), a syncer with `--redis-durability` set, one goods with stock no run \
exhausts, and wrk (1 thread, a new buyer and request id per call) on `POST /v1/deduct` for {s} s \
after a 2 s warm-up; {r} rounds, the settings taking turns; figures are the rounds' median, \
and a ratio is the median of each round's ratio to `none` in the same round.
{tables}
One write's round trip alone (median of {p} sequential INCRs, `WAIT 1` added under \
`replicas:1`), first level's rounds: `none` {w0:.0} µs, `aof` {w1:.0} µs (the fsync), \
`replicas:1` {w2:.0} µs (the replica's acknowledgement).

Goal: at least 0.7x of `none` for each. Each script call waits for one fsync (`aof`) or one \
replica acknowledgement (`replicas:1`, on the same 2 cores here, where a production replica \
has its own machine), and that wait is shared: by every attempt of the batch, which holds \
whatever queued while the previous calls were out, and, with up to 4 batches out at once \
under these settings, by every batch that reached Redis meanwhile. With few buyers the \
batches stay small and the wait shows; a crowd fills them.
",
        s = args.seconds,
        c = levels.join(","),
        r = args.rounds,
        p = PROBE_WRITES,
        w0 = median(&runs[0][0], |f| f.write_us),
        w1 = median(&runs[0][1], |f| f.write_us),
        w2 = median(&runs[0][2], |f| f.write_us),
    )
}

/// One table row per setting at one concurrency level.
fn rows(args: &Args, runs: &[Vec<Figures>]) -> String {
    let seconds = args.seconds as f64;
    let rate = |i: usize| median(&runs[i], |f| f.wrk.requests_per_second);
    let ratio = |i: usize| median_ratio(&runs[i], &runs[0]);
    let mut rows = String::new();
    for (i, setting) in SETTINGS.iter().enumerate() {
        let rounds: Vec<String> = runs[i]
            .iter()
            .map(|f| format!("{:.0}", f.wrk.requests_per_second))
            .collect();
        rows.push_str(&format!(
            "| `{}` | {} | {:.0} ({}) | **{:.2}x** | {:.1} | {:.0} | {:.2} ms | {:.2} ms |\n",
            setting.durability,
            setting.what,
            rate(i),
            rounds.join(", "),
            ratio(i),
            median(&runs[i], |f| f.attempts / f.batches.max(1.0)),
            median(&runs[i], |f| f.batches / seconds),
            median(&runs[i], |f| f.wrk.p50_ms),
            median(&runs[i], |f| f.wrk.p99_ms),
        ));
    }
    rows
}
