//! What Redis durability costs a hot goods: decisions per second through the syncer's deduct
//! endpoint under `--redis-durability none` (Redis without persistence), `aof` (appendfsync
//! always) and `replicas:1` (one replica attached, WAIT after each script call), measured in
//! one run, the settings taking turns round by round. Rewrites its BENCHMARKS.md section.

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use seckill_bench::report::update_section;
use seckill_bench::wrk::{self, WrkReport};
use seckill_e2e::admin::Admin;
use seckill_e2e::mysql_db::TestDatabase;
use seckill_e2e::process::{unique_suffix, Scratch};
use seckill_e2e::redis_server::{RedisServer, AOF_ALWAYS};
use seckill_e2e::stack::{now_ms, SECRET};
use seckill_e2e::syncer::{Role, SyncerArgs, SyncerProcess};

#[derive(Parser)]
#[command(about = "Benchmark the deduct endpoint under each Redis durability setting")]
struct Args {
    /// Seconds wrk measures each setting in each round.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Connections of wrk (concurrent buyers of the one hot goods).
    #[arg(long, default_value_t = 50)]
    connections: u32,
    /// Rounds; each measures every setting once, in turn, so drift hits all alike.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=10))]
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
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut runs: Vec<Vec<Figures>> = vec![Vec::new(); SETTINGS.len()];
    for round in 0..args.rounds {
        for (index, setting) in SETTINGS.iter().enumerate() {
            let figures = measure(&args, setting).await?;
            eprintln!(
                "round {round}: {} {:.0} decisions/s, {:.1} attempts per script call",
                setting.durability,
                figures.wrk.requests_per_second,
                figures.attempts / figures.batches.max(1.0)
            );
            runs[index].push(figures);
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
async fn measure(args: &Args, setting: &Setting) -> anyhow::Result<Figures> {
    let scratch = Scratch::new("bench-durability")?;
    let redis = RedisServer::start_with(&scratch.path, setting.redis_args).await?;
    let _replica = match setting.replica {
        true => Some(RedisServer::start_replica(&scratch.path, &redis).await?),
        false => None,
    };
    let db = TestDatabase::create("bench_durability").await?;
    let prefix = format!("b{}", unique_suffix());
    let (redis_url, mysql_url) = (redis.url(), db.url());
    let syncer_args = SyncerArgs {
        redis_url: &redis_url,
        mysql_url: &mysql_url,
        key_prefix: &prefix,
        secret: SECRET,
        kafka: None,
    };
    let env = [("SECKILL_REDIS_DURABILITY", setting.durability)];
    let role = Role::Serve { pipeline: false };
    let syncer = SyncerProcess::start_role(&scratch.path, &syncer_args, role, &env).await?;
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
    std::fs::write(&script, wrk::deduct_script("bench", SECRET))?;
    let url = format!("{}{}", syncer.url(), seckill_api::DEDUCT_PATH);
    let connections = args.connections;
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
    })
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

/// The mean of one figure over the rounds.
fn mean(runs: &[Figures], figure: impl Fn(&Figures) -> f64) -> f64 {
    runs.iter().map(&figure).sum::<f64>() / runs.len().max(1) as f64
}

fn render(args: &Args, runs: &[Vec<Figures>]) -> String {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let seconds = args.seconds as f64;
    let rate = |i: usize| mean(&runs[i], |f| f.wrk.requests_per_second);
    // A hot goods has one script call out at a time: the time per call is the run over calls.
    let call_us = |i: usize| mean(&runs[i], |f| seconds * 1e6 / f.batches.max(1.0));
    let mut rows = String::new();
    for (i, setting) in SETTINGS.iter().enumerate() {
        let rounds: Vec<String> = runs[i]
            .iter()
            .map(|f| format!("{:.0}", f.wrk.requests_per_second))
            .collect();
        rows.push_str(&format!(
            "| `{}` | {} | {:.0} ({}) | **{:.2}x** | {:.1} | {:.0} µs (+{:.0} µs) | {:.2} ms | {:.2} ms |\n",
            setting.durability,
            setting.what,
            rate(i),
            rounds.join(", "),
            rate(i) / rate(0),
            mean(&runs[i], |f| f.attempts / f.batches.max(1.0)),
            call_us(i),
            (call_us(i) - call_us(0)).max(0.0),
            mean(&runs[i], |f| f.wrk.p50_ms),
            mean(&runs[i], |f| f.wrk.p99_ms),
        ));
    }
    format!(
        "## Redis durability: what `aof` and `replicas:1` cost a hot goods

Command: `target/release/seckill-bench-durability --seconds {s} --connections {c} --rounds {r}` \
(in `bash scripts/bench.sh`).

Conditions: this machine ({cores} cores shared by wrk, the syncer and every Redis), release \
builds; for each setting in turn, a fresh private redis-server (and replica), a syncer with \
`--redis-durability` set, one goods with stock no run exhausts, and wrk (1 thread, {c} \
connections, a new buyer and request id per call) on `POST /v1/deduct` for {s} s after a 2 s \
warm-up; {r} rounds, the settings taking turns; figures are the rounds' mean.

| setting | Redis | decisions/s (each round) | against `none` | attempts per script call | time per script call (over `none`) | p50 | p99 |
|---|---|---|---|---|---|---|---|
{rows}
Goal: at least 0.7x of `none` for each. One script call decides every attempt that queued \
while the previous call was out, so a slower call makes the next batch larger: the fsync \
(`aof`) or the replica's acknowledgement (`replicas:1`) is paid once per batch, not once per \
buyer, and the added time per call above is what one fsync or one WAIT round trip costs.
",
        s = args.seconds,
        c = args.connections,
        r = args.rounds,
    )
}
