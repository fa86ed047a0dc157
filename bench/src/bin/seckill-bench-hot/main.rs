//! One hot goods: decisions per second through the syncer's batch endpoint against
//! `redis-benchmark` running the seed's own deduct script (bench/seed/deduct_stock.lua)
//! pipelined on the same private Redis, in alternating rounds; and what Redis itself spends
//! per decision on each side (`INFO commandstats`, `INFO cpu`), from which the capacity of one
//! Redis master (and of N) is projected. Rewrites its section of BENCHMARKS.md.
//!
//! With `--sharded` (issue 14: one goods over 3 masters against one master) it runs on a
//! local 3-master Redis Cluster instead: the syncer on the cluster's URL, one unsharded goods
//! (on one master) and one `redis_sharded` goods whose shards land on the three masters, both
//! through the batch endpoint in alternating rounds, every master's counters read around each
//! run; decisions are the sum of the shards' order sequences. It writes its own section
//! (`sharded.rs`), with Redis CPU per decision on each master and summed, and what N masters
//! would give.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use clap::Parser;
use redis::aio::MultiplexedConnection;
use seckill_bench::cpu::{clock_ticks, machine_busy_ticks, process_ticks};
use seckill_bench::local::start_syncer;
use seckill_bench::redis_cost::{RedisCost, RedisCounters};
use seckill_bench::report::{quantile, update_section};
use seckill_bench::wrk;
use seckill_e2e::admin::Admin;
use seckill_e2e::mysql_db::TestDatabase;
use seckill_e2e::process::Scratch;
use seckill_e2e::redis_cluster::RedisCluster;
use seckill_e2e::redis_server::RedisServer;
use seckill_e2e::stack::{now_ms, rfc3339, EDGE_SECRET};
use seckill_e2e::syncer::SyncerProcess;
use seckill_syncer::keys::KeySpace;

mod sharded;

/// The seed's deduct script, verbatim but for its leading comment.
const SEED_SCRIPT: &str = include_str!("../../../seed/deduct_stock.lua");
/// The seed's keys for goods 1 (`goods:stock:%d`, `goods:stock:lock:%d`) and its arguments:
/// one unit, a day's expiry.
const SEED_KEYS: [&str; 2] = ["goods:stock:1", "goods:stock:lock:1"];
const SEED_ARGS: [&str; 2] = ["1", "86400"];
/// Stock of both sides: no run sells out, so every attempt is a decision that wins.
const STOCK: u64 = 1_000_000_000;
const GOODS: &str = "hot";

#[derive(Parser)]
#[command(
    about = "One hot goods: the batch endpoint against redis-benchmark running the seed's \
                   script; update BENCHMARKS.md"
)]
struct Args {
    /// Seconds each measurement runs (redis-benchmark's request count is sized to match).
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Rounds; each runs every side once, in alternating order.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Attempts per call to the batch endpoint, one measurement each.
    #[arg(long, value_delimiter = ',', default_value = "1,16,64,128")]
    batch_sizes: Vec<usize>,
    /// Attempts per call of the project's deduct script run directly by redis-benchmark (no
    /// HTTP, no syncer): Redis's own part of the batch endpoint. Empty: not measured.
    #[arg(long, value_delimiter = ',', default_value = "128")]
    direct_sizes: Vec<usize>,
    /// redis-benchmark's clients for the direct calls (each call holds many attempts).
    #[arg(long, default_value_t = 4)]
    direct_clients: u32,
    /// wrk's connections to the batch endpoint (one thread).
    #[arg(long, default_value_t = 16)]
    connections: u32,
    /// redis-benchmark's clients.
    #[arg(long, default_value_t = 50)]
    redis_clients: u32,
    /// redis-benchmark's pipeline depth (`-P`).
    #[arg(long, default_value_t = 16)]
    pipeline: u32,
    /// One goods sharded over the masters of a local 3-master Redis Cluster against one
    /// unsharded goods on one of them, both through the batch endpoint (`--batch-sizes`); the
    /// seed's script and the direct calls are not run. Writes its own section.
    #[arg(long)]
    sharded: bool,
    /// Shards of the sharded goods (with `--sharded`; 3 puts one on each master).
    #[arg(long, default_value_t = 3)]
    shards: u32,
    #[arg(long, default_value = "BENCHMARKS.md")]
    out: PathBuf,
}

/// Which side a measurement is.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Side {
    /// redis-benchmark, EVALSHA of the seed's script, one decision per call.
    Seed,
    /// redis-benchmark, EVALSHA of the project's deduct script, this many attempts per call.
    Direct(usize),
    /// wrk through the syncer's batch endpoint, this many attempts per call.
    Batch(usize),
    /// The same for the sharded goods (`--sharded`).
    Sharded(usize),
}

/// What one measurement found.
#[derive(Debug, Clone)]
struct Measured {
    side: Side,
    /// Decisions answered `won` to the load generator (the seed side: calls Redis counted).
    decisions: u64,
    decisions_per_s: f64,
    /// Decisions Redis counted (the sale's order sequence; the seed's stock).
    redis_decisions: u64,
    /// Attempts answered anything but `won` (none expected: the stock never runs out).
    not_won: u64,
    p50_ms: f64,
    p99_ms: f64,
    /// What every node spent together, and each (in `Bench::nodes`' order).
    redis: RedisCost,
    per_node: Vec<RedisCost>,
    /// Cores (0..=2 here) each part used during the measurement (Redis: every node's).
    redis_cores: f64,
    syncer_cores: f64,
    load_cores: f64,
    other_cores: f64,
}

/// What a redis-benchmark run measured.
struct RunFigures {
    calls_per_s: f64,
    redis: RedisCost,
    per_node: Vec<RedisCost>,
    /// Cores used by Redis, the syncer, the load generator and the rest.
    cores: (f64, f64, f64, f64),
}

impl RunFigures {
    fn measured(
        &self,
        side: Side,
        decisions: u64,
        decisions_per_s: f64,
        redis_decisions: u64,
        not_won: u64,
    ) -> Measured {
        let (redis_cores, syncer_cores, load_cores, other_cores) = self.cores;
        Measured {
            side,
            decisions,
            decisions_per_s,
            redis_decisions,
            not_won,
            p50_ms: f64::NAN,
            p99_ms: f64::NAN,
            redis: self.redis,
            per_node: self.per_node.clone(),
            redis_cores,
            syncer_cores,
            load_cores,
            other_cores,
        }
    }
}

/// A Redis node the benchmark reads: the private server, or one master of the cluster.
struct Node {
    conn: MultiplexedConnection,
}

/// The Redis the syncer decides on.
enum Store {
    Single(RedisServer),
    Cluster(RedisCluster),
}

impl Store {
    fn url(&self) -> String {
        match self {
            Store::Single(redis) => redis.url(),
            Store::Cluster(cluster) => cluster.url(),
        }
    }
}

/// A goods a side measures and where its keys live: one part (the goods' own hash tag) for an
/// unsharded goods, one per shard for a sharded one, each with the index in `Bench::nodes` of
/// the node that holds it.
#[derive(Debug, Clone)]
struct Target {
    goods: String,
    parts: Vec<(String, usize)>,
}

/// Field order is drop order: the syncer before the stores, the scratch directory last.
struct Bench {
    syncer: SyncerProcess,
    nodes: Vec<Node>,
    store: Store,
    _db: TestDatabase,
    /// The seed's script and the project's deduct script as the syncer loads it, on the
    /// private server (not loaded with `--sharded`: those sides are not run there).
    seed_sha: String,
    deduct_sha: String,
    keys: KeySpace,
    /// The unsharded goods (every side but `Sharded`), and the sharded one (`--sharded`).
    flat: Target,
    sharded: Option<Target>,
    run: u64,
    scratch: Scratch,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    ensure!(
        args.batch_sizes
            .iter()
            .chain(&args.direct_sizes)
            .all(|b| (1..=seckill_api::BATCH_ATTEMPTS_MAX).contains(b)),
        "--batch-sizes and --direct-sizes must be from 1 to {}",
        seckill_api::BATCH_ATTEMPTS_MAX
    );
    ensure!(args.rounds > 0, "--rounds must be at least 1");
    ensure!(
        (2..=16).contains(&args.shards),
        "--shards must be from 2 to 16 (as a sale's definition)"
    );
    let mut bench = Bench::start(&args).await?;
    // Warm-up, and redis-benchmark's call counts sized to run as long as wrk does.
    let mut seed_calls = 0;
    let mut direct_calls = Vec::new();
    if args.sharded {
        bench.batch(&args, Side::Batch(16), 2).await?;
        bench.batch(&args, Side::Sharded(16), 2).await?;
    } else {
        let warm = bench.seed(&args, 100_000).await?;
        seed_calls = ((warm.decisions_per_s * args.seconds as f64) as u64).max(100_000);
        for &size in &args.direct_sizes {
            let warm = bench.direct(&args, size, 200).await?;
            let calls_per_s = warm.decisions_per_s / size as f64;
            direct_calls.push((size, ((calls_per_s * args.seconds as f64) as u64).max(200)));
        }
        bench.batch(&args, Side::Batch(16), 2).await?;
    }
    let mut rounds = Vec::new();
    for round in 0..args.rounds {
        let mut order = sides(&args);
        // Alternating order: drift on the machine favours neither side.
        if round % 2 == 1 {
            order.reverse();
        }
        let mut measured = Vec::new();
        for side in order {
            let m = match side {
                Side::Seed => bench.seed(&args, seed_calls).await?,
                Side::Direct(size) => {
                    let calls = direct_calls
                        .iter()
                        .find(|(s, _)| *s == size)
                        .map_or(200, |(_, calls)| *calls);
                    bench.direct(&args, size, calls).await?
                }
                Side::Batch(_) | Side::Sharded(_) => bench.batch(&args, side, args.seconds).await?,
            };
            eprintln!("round {round}: {m:?}");
            measured.push(m);
        }
        rounds.push(measured);
    }
    let (section, body) = if args.sharded {
        let masters = bench.nodes.len();
        let placed = sharded::Placement {
            flat: &bench.flat,
            sharded: bench.sharded.as_ref().context("no sharded goods")?,
            masters,
        };
        (
            "sharded-hot-goods-benchmark",
            sharded::render(&args, &placed, &rounds),
        )
    } else {
        ("hot-goods-benchmark", render(&args, seed_calls, &rounds))
    };
    println!("{body}");
    update_section(&args.out, section, &body)?;
    println!("updated {}", args.out.display());
    Ok(())
}

/// Every side a round measures: the seed's script, the deduct script direct, the endpoint; with
/// `--sharded`, the endpoint for the unsharded and the sharded goods at each batch size.
fn sides(args: &Args) -> Vec<Side> {
    if args.sharded {
        return args
            .batch_sizes
            .iter()
            .flat_map(|&b| [Side::Batch(b), Side::Sharded(b)])
            .collect();
    }
    std::iter::once(Side::Seed)
        .chain(args.direct_sizes.iter().map(|&b| Side::Direct(b)))
        .chain(args.batch_sizes.iter().map(|&b| Side::Batch(b)))
        .collect()
}

/// CPU counters of the processes sharing the machine, read before and after a measurement.
struct CpuMark {
    at: Instant,
    /// Every Redis node's together.
    redis: f64,
    syncer: f64,
    children: f64,
    machine: f64,
}

impl CpuMark {
    fn take(redis_pids: &[u32], syncer_pid: u32) -> CpuMark {
        CpuMark {
            at: Instant::now(),
            redis: redis_pids.iter().map(|&pid| process_ticks(pid).0).sum(),
            syncer: process_ticks(syncer_pid).0,
            // The load generators are this process's children, waited for when they end.
            children: process_ticks(std::process::id()).1,
            machine: machine_busy_ticks(),
        }
    }

    /// Cores used since `self`: (Redis, syncer, load generator, the rest).
    fn cores_until(&self, after: &CpuMark) -> (f64, f64, f64, f64) {
        let elapsed = after.at.duration_since(self.at).as_secs_f64().max(1e-9);
        let cores = |before: f64, after: f64| (after - before) / clock_ticks() / elapsed;
        let (redis, syncer, load) = (
            cores(self.redis, after.redis),
            cores(self.syncer, after.syncer),
            cores(self.children, after.children),
        );
        let machine = cores(self.machine, after.machine);
        (
            redis,
            syncer,
            load,
            (machine - redis - syncer - load).max(0.0),
        )
    }
}

impl Bench {
    /// A private redis-server (with `--sharded`, a local 3-master cluster), a database, a
    /// syncer, the hot goods preheated (and the sharded one), and the seed's stock key and
    /// script loaded on the private server. No Envoy: nothing here goes through the gate.
    async fn start(args: &Args) -> anyhow::Result<Bench> {
        let scratch = Scratch::new("bench-hot")?;
        let store = if args.sharded {
            Store::Cluster(RedisCluster::start(&scratch.path).await?)
        } else {
            Store::Single(RedisServer::start_with(&scratch.path, &[]).await?)
        };
        let db = TestDatabase::create("bench_hot").await?;
        // No reservation is released during the run (the sweeper would add its own Redis
        // work): the claim window outlasts the benchmark.
        let env = [("SECKILL_CLAIM_WINDOW_MS", "3600000")];
        let (syncer, prefix) = start_syncer(&scratch.path, &store.url(), &db.url(), &env).await?;
        let keys = KeySpace::new(prefix);
        let http = reqwest::Client::new();
        let admin = Admin::new(&http, syncer.url());
        let now = now_ms();
        // One unit per buyer; every buyer is new, so every attempt wins.
        admin
            .define_sale(GOODS, STOCK, 1, (now - 60_000, now + 3_600_000), 900)
            .await?;
        admin.preheat(GOODS, false).await?;
        let (mut nodes, mut seed_sha, mut deduct_sha) = (Vec::new(), String::new(), String::new());
        let (flat, sharded) = match &store {
            Store::Single(redis) => {
                let mut conn = redis.connection().await?;
                (seed_sha, deduct_sha) = load_seed(&mut conn).await?;
                nodes.push(Node { conn });
                let flat = Target {
                    goods: GOODS.into(),
                    parts: vec![(GOODS.into(), 0)],
                };
                (flat, None)
            }
            Store::Cluster(cluster) => {
                let masters = cluster.master_ports().await?;
                for &port in &masters {
                    let conn = cluster.node(port)?.connection().await?;
                    nodes.push(Node { conn });
                }
                let flat = sharded::place(cluster, &masters, &keys, GOODS, None).await?;
                let sharded =
                    sharded::place(cluster, &masters, &keys, "sharded", Some(args.shards)).await?;
                let spec = serde_json::json!({
                    "total_stock": STOCK,
                    "per_user_limit": 1,
                    "starts_at": rfc3339(now - 60_000),
                    "ends_at": rfc3339(now + 3_600_000),
                    "payment_window_s": 900,
                    "tier": "redis_sharded",
                    "shards": args.shards,
                });
                let (status, body) = admin.try_define(&sharded.goods, &spec).await?;
                ensure!(status == 201, "define the sharded sale: {status} {body}");
                admin.preheat(&sharded.goods, false).await?;
                (flat, Some(sharded))
            }
        };
        Ok(Bench {
            syncer,
            nodes,
            store,
            _db: db,
            seed_sha,
            deduct_sha,
            keys,
            flat,
            sharded,
            run: 0,
            scratch,
        })
    }

    fn syncer_pid(&self) -> anyhow::Result<u32> {
        self.syncer.pid().context("the syncer is not running")
    }

    async fn counters(&mut self) -> anyhow::Result<Vec<RedisCounters>> {
        let mut all = Vec::with_capacity(self.nodes.len());
        for node in &mut self.nodes {
            all.push(RedisCounters::read(&mut node.conn).await?);
        }
        Ok(all)
    }

    /// What each node spent between two readings.
    fn costs_since(before: &[RedisCounters], after: &[RedisCounters]) -> Vec<RedisCost> {
        after.iter().zip(before).map(|(a, b)| a.since(b)).collect()
    }

    fn pids(counters: &[RedisCounters]) -> Vec<u32> {
        counters.iter().map(|c| c.pid).collect()
    }

    async fn get_u64(&mut self, command: redis::Cmd) -> anyhow::Result<u64> {
        let value: Option<u64> = command.query_async(&mut self.nodes[0].conn).await?;
        Ok(value.unwrap_or(0))
    }

    /// Runs redis-benchmark with `command` (its own options before it) on the private Redis:
    /// its rate of calls, what Redis spent, and the cores each part used meanwhile.
    async fn redis_benchmark(&mut self, command: &[String]) -> anyhow::Result<RunFigures> {
        let Store::Single(redis) = &self.store else {
            anyhow::bail!("redis-benchmark runs on the private server, not with --sharded");
        };
        let port = redis.port;
        let counters = self.counters().await?;
        let pids = Self::pids(&counters);
        let cpu = CpuMark::take(&pids, self.syncer_pid()?);
        let output = Command::new("redis-benchmark")
            .args(["-h", "127.0.0.1", "-p", &port.to_string()])
            .args(["-q", "--csv"])
            .args(command)
            .output()
            .context("cannot run redis-benchmark")?;
        let cpu_after = CpuMark::take(&pids, self.syncer_pid()?);
        let after = self.counters().await?;
        let text = String::from_utf8_lossy(&output.stdout);
        ensure!(output.status.success(), "redis-benchmark failed: {text}");
        let per_node = Self::costs_since(&counters, &after);
        Ok(RunFigures {
            calls_per_s: redis_benchmark_rate(&text)?,
            redis: RedisCost::sum(&per_node),
            per_node,
            cores: cpu.cores_until(&cpu_after),
        })
    }

    /// redis-benchmark: `calls` EVALSHA of the seed's script, each one decision.
    async fn seed(&mut self, args: &Args, calls: u64) -> anyhow::Result<Measured> {
        let stock_before = self
            .get_u64(redis::cmd("GET").arg(SEED_KEYS[0]).clone())
            .await?;
        let lock_before = self
            .get_u64(redis::cmd("GET").arg(SEED_KEYS[1]).clone())
            .await?;
        ensure!(
            stock_before >= calls,
            "the seed's stock ({stock_before}) would run out"
        );
        let mut command: Vec<String> = vec![
            "-c".into(),
            args.redis_clients.to_string(),
            "-P".into(),
            args.pipeline.to_string(),
            "-n".into(),
            calls.to_string(),
            "EVALSHA".into(),
            self.seed_sha.clone(),
            SEED_KEYS.len().to_string(),
        ];
        command.extend(SEED_KEYS.iter().chain(&SEED_ARGS).map(|a| a.to_string()));
        let run = self.redis_benchmark(&command).await?;
        let stock_after = self
            .get_u64(redis::cmd("GET").arg(SEED_KEYS[0]).clone())
            .await?;
        let lock_after = self
            .get_u64(redis::cmd("GET").arg(SEED_KEYS[1]).clone())
            .await?;
        // Every call must have deducted one unit and taken one lock id: no error, no refusal.
        // (A pipelining client may send its last pipeline whole, past `-n`.)
        let decided = stock_before - stock_after;
        let overshoot = u64::from(args.redis_clients * args.pipeline);
        ensure!(
            (calls..=calls + overshoot).contains(&decided) && lock_after - lock_before == decided,
            "the seed's script decided {decided} of {calls} calls (lock ids {})",
            lock_after - lock_before
        );
        Ok(run.measured(Side::Seed, decided, run.calls_per_s, decided, 0))
    }

    /// redis-benchmark calling the project's own deduct script directly, `size` attempts per
    /// call (random buyers and request ids), `calls` calls: Redis's part of the batch
    /// endpoint, without HTTP, JSON or the syncer.
    async fn direct(&mut self, args: &Args, size: usize, calls: u64) -> anyhow::Result<Measured> {
        let goods = self.keys.goods(GOODS);
        let keys = goods.deduct_script_keys();
        let flat = self.flat.clone();
        let mut command: Vec<String> = vec![
            "-c".into(),
            args.direct_clients.to_string(),
            "-n".into(),
            calls.to_string(),
            "-r".into(),
            "1000000000".into(),
            "EVALSHA".into(),
            self.deduct_sha.clone(),
            keys.len().to_string(),
        ];
        command.extend(keys.iter().map(|k| k.to_string()));
        // Goods, a deadline that never comes, the claim window, no epoch check (as the
        // endpoint passes them), then one (buyer, quantity, request id) per attempt.
        command.extend([GOODS, "99999999999999", "3600000", "0"].map(String::from));
        for _ in 0..size {
            command.extend(["u__rand_int__", "1", "r__rand_int__"].map(String::from));
        }
        let seq_before = self.sale_seq(&flat).await?;
        let run = self.redis_benchmark(&command).await?;
        let decided = self.sale_seq(&flat).await? - seq_before;
        let attempts = calls * size as u64;
        // Random ids from 10^9 may meet twice in a run: a repeated buyer is refused.
        ensure!(
            decided * 100 >= attempts * 99,
            "the deduct script granted {decided} of {attempts} attempts"
        );
        self.reset(&flat).await?;
        let rate = run.calls_per_s * decided as f64 / calls as f64;
        Ok(run.measured(
            Side::Direct(size),
            decided,
            rate,
            decided,
            attempts - decided,
        ))
    }

    /// The goods' order sequence: one per unit the deduct script granted (a sharded goods:
    /// the sum of its shards' own sequences).
    async fn sale_seq(&mut self, target: &Target) -> anyhow::Result<u64> {
        let mut total = 0;
        for (key_id, node) in &target.parts {
            let sale = self.keys.goods(key_id).sale;
            let value: Option<u64> = redis::cmd("HGET")
                .arg(sale)
                .arg("seq")
                .query_async(&mut self.nodes[*node].conn)
                .await?;
            total += value.unwrap_or(0);
        }
        Ok(total)
    }

    /// The goods a side measures.
    fn target(&self, side: Side) -> anyhow::Result<Target> {
        match side {
            Side::Sharded(_) => self.sharded.clone().context("no sharded goods"),
            _ => Ok(self.flat.clone()),
        }
    }

    /// wrk through the batch endpoint for `seconds`: `side` is `Batch(size)` or
    /// `Sharded(size)`, `size` attempts per call.
    async fn batch(&mut self, args: &Args, side: Side, seconds: u64) -> anyhow::Result<Measured> {
        let size = match side {
            Side::Batch(size) | Side::Sharded(size) => size,
            _ => anyhow::bail!("{side:?} is not measured through the batch endpoint"),
        };
        let target = self.target(side)?;
        self.run += 1;
        let script = self.scratch.path.join(format!("batch-{}.lua", self.run));
        std::fs::write(&script, batch_script(&target.goods, size, self.run))?;
        let url = format!("{}{}", self.syncer.url(), seckill_api::DEDUCT_BATCH_PATH);
        let seq_before = self.sale_seq(&target).await?;
        let counters = self.counters().await?;
        let (redis_pids, syncer_pid) = (Self::pids(&counters), self.syncer_pid()?);
        let cpu = CpuMark::take(&redis_pids, syncer_pid);
        let connections = args.connections;
        let (report, text) = tokio::task::spawn_blocking(move || {
            wrk::run_with_output(&url, &script, 1, connections, Duration::from_secs(seconds))
        })
        .await??;
        let cpu_after = CpuMark::take(&redis_pids, syncer_pid);
        // Calls wrk stopped waiting for are still decided: count Redis once it is quiet.
        let seq_after = self.quiet_seq(&target).await?;
        let after = self.counters().await?;
        ensure!(
            report.non_2xx == 0 && report.socket_errors == 0,
            "the batch endpoint failed {} calls ({} socket errors)",
            report.non_2xx,
            report.socket_errors
        );
        let (won, answered) = (
            wrk_count(&text, "seckill-won")?,
            wrk_count(&text, "seckill-answered")?,
        );
        let redis_decisions = seq_after - seq_before;
        let in_flight = u64::from(args.connections) * size as u64;
        // Honest counting: every `won` answered is an order Redis holds; Redis may hold a few
        // more, decided for calls wrk stopped waiting for at the end.
        ensure!(
            won <= redis_decisions && redis_decisions <= won + in_flight,
            "answered {won} won, Redis counted {redis_decisions} (at most {in_flight} in flight)"
        );
        ensure!(
            answered == report.requests * size as u64,
            "{} calls of {size} answered {answered} attempts",
            report.requests
        );
        self.reset(&target).await?;
        let (redis_cores, syncer_cores, load_cores, other_cores) = cpu.cores_until(&cpu_after);
        let per_node = Self::costs_since(&counters, &after);
        Ok(Measured {
            side,
            decisions: won,
            // wrk's own rate times the share of attempts that won (all, unless something went
            // wrong, which `not_won` shows).
            decisions_per_s: report.requests_per_second * size as f64 * won as f64
                / answered.max(1) as f64,
            redis_decisions,
            not_won: answered - won,
            p50_ms: report.p50_ms,
            p99_ms: report.p99_ms,
            redis: RedisCost::sum(&per_node),
            per_node,
            redis_cores,
            syncer_cores,
            load_cores,
            other_cores,
        })
    }

    /// The sale's sequence once it has stopped moving (bounded: 5 s).
    async fn quiet_seq(&mut self, target: &Target) -> anyhow::Result<u64> {
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut last = self.sale_seq(target).await?;
        while Instant::now() < deadline {
            // The batcher's last calls finish within a Redis call timeout; poll until then.
            tokio::time::sleep(Duration::from_millis(100)).await;
            let now = self.sale_seq(target).await?;
            if now == last {
                return Ok(now);
            }
            last = now;
        }
        Ok(last)
    }

    /// Forgets every buyer, request, reservation and outbox entry of the run (the sale hash
    /// stays, stock still high), so each run starts from the same small state, and waits until
    /// Redis has freed them in the background.
    async fn reset(&mut self, target: &Target) -> anyhow::Result<()> {
        let mut touched = Vec::new();
        for (key_id, node) in &target.parts {
            let keys: Vec<String> = self.keys.goods(key_id).deduct_script_keys()[1..]
                .iter()
                .map(|k| k.to_string())
                .collect();
            redis::cmd("UNLINK")
                .arg(&keys)
                .query_async::<()>(&mut self.nodes[*node].conn)
                .await?;
            touched.push(*node);
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        for node in touched {
            let conn = &mut self.nodes[node].conn;
            loop {
                let memory: String = redis::cmd("INFO").arg("memory").query_async(conn).await?;
                let pending = memory
                    .lines()
                    .find_map(|l| l.trim().strip_prefix("lazyfree_pending_objects:"))
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(0);
                if pending == 0 {
                    break;
                }
                ensure!(
                    Instant::now() < deadline,
                    "redis did not free the run's keys within 30 s"
                );
                // Redis frees in a background thread; poll it, bounded by the deadline.
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        Ok(())
    }
}

/// Sets the seed's stock key and loads the seed's script and the project's deduct script on
/// the private server: their SHAs.
async fn load_seed(conn: &mut MultiplexedConnection) -> anyhow::Result<(String, String)> {
    redis::cmd("SET")
        .arg(SEED_KEYS[0])
        .arg(STOCK)
        .query_async::<()>(conn)
        .await?;
    let seed_sha: String = redis::cmd("SCRIPT")
        .arg("LOAD")
        .arg(SEED_SCRIPT)
        .query_async(conn)
        .await?;
    let deduct_sha: String = redis::cmd("SCRIPT")
        .arg("LOAD")
        .arg(seckill_syncer::scripts::DEDUCT)
        .query_async(conn)
        .await?;
    Ok((seed_sha, deduct_sha))
}

/// The wrk script: `size` attempts per call for `goods`, each a new buyer and request id (run,
/// thread, counter), and the answers counted. Its `done()` prints `seckill-won N` (answers
/// `won`) and `seckill-answered N` (answers with an outcome).
fn batch_script(goods: &str, size: usize, run: u64) -> String {
    r#"
wrk.method = "POST"
wrk.headers["content-type"] = "application/json"
wrk.headers["x-seckill-secret"] = "SECRET"
local threads = {}
function setup(thread)
  table.insert(threads, thread)
  thread:set("tag", "RUN-" .. #threads)
end
counter = 0
won = 0
answered = 0
function request()
  local parts = {}
  for i = 1, SIZE do
    counter = counter + 1
    local id = tag .. "-" .. counter
    parts[i] = '{"goods_id":"GOODS","user_id":"u' .. id .. '","quantity":1,"request_id":"r' .. id .. '"}'
  end
  return wrk.format(nil, nil, nil, '{"attempts":[' .. table.concat(parts, ",") .. ']}')
end
function response(status, headers, body)
  if status ~= 200 then return end
  local _, w = string.gsub(body, '"outcome":"won"', '')
  local _, n = string.gsub(body, '"outcome":"', '')
  won = won + w
  answered = answered + n
end
function done(summary, latency, requests)
  local w, n = 0, 0
  for _, t in ipairs(threads) do
    w = w + t:get("won")
    n = n + t:get("answered")
  end
  io.write(string.format("seckill-won %d\nseckill-answered %d\n", w, n))
end
"#
    .replace("SECRET", EDGE_SECRET)
    .replace("GOODS", goods)
    .replace("SIZE", &size.to_string())
    .replace("RUN", &format!("b{run}"))
}

/// A count the wrk script printed (`name N`).
fn wrk_count(text: &str, name: &str) -> anyhow::Result<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        .with_context(|| format!("no {name} in wrk's output:\n{text}"))
}

/// The rate in redis-benchmark's CSV (`"test","rps",...` on the last line).
fn redis_benchmark_rate(text: &str) -> anyhow::Result<f64> {
    text.lines()
        .filter_map(|line| line.split(',').nth(1))
        .filter_map(|v| v.trim_matches('"').parse::<f64>().ok())
        .next_back()
        .with_context(|| format!("no rate in redis-benchmark's output: {text}"))
}

fn median(values: impl Iterator<Item = f64>) -> f64 {
    let mut values: Vec<f64> = values.filter(|v| !v.is_nan()).collect();
    values.sort_by(f64::total_cmp);
    quantile(&values, 0.5)
}

/// Every measurement of `side`, one per round.
fn of(rounds: &[Vec<Measured>], side: Side) -> Vec<Measured> {
    rounds
        .iter()
        .flat_map(|r| r.iter().filter(|m| m.side == side).cloned())
        .collect()
}

/// Within each round, `side`'s decisions/s over `base`'s.
fn ratios(rounds: &[Vec<Measured>], side: Side, base: Side) -> Vec<f64> {
    rounds
        .iter()
        .filter_map(|r| {
            let rate = |s: Side| r.iter().find(|m| m.side == s).map(|m| m.decisions_per_s);
            Some(rate(side)? / rate(base)?)
        })
        .collect()
}

fn label(side: Side) -> String {
    match side {
        Side::Seed => "seed script, redis-benchmark".into(),
        Side::Direct(size) => format!("deduct script direct, {size} per call"),
        Side::Batch(size) => format!("batch endpoint, {size} per call"),
        Side::Sharded(size) => format!("batch endpoint, sharded goods, {size} per call"),
    }
}

/// A row of the rates table: `side`'s median decisions/s, every run's decisions answered and
/// counted in Redis, the latency per call (the endpoint's sides), and the cores each part used.
fn rate_row(side: Side, runs: &[Measured]) -> String {
    let m = |f: &dyn Fn(&Measured) -> f64| median(runs.iter().map(f));
    let latency = match side {
        Side::Seed | Side::Direct(_) => "| |".to_owned(),
        Side::Batch(_) | Side::Sharded(_) => {
            format!("{:.2} ms | {:.2} ms |", m(&|x| x.p50_ms), m(&|x| x.p99_ms))
        }
    };
    format!(
        "| {} | {:.0} | {} / {} | {} {:.2} | {:.2} | {:.2} | {:.2} |\n",
        label(side),
        m(&|x| x.decisions_per_s),
        runs.iter().map(|x| x.decisions).sum::<u64>(),
        runs.iter().map(|x| x.redis_decisions).sum::<u64>(),
        latency,
        m(&|x| x.redis_cores),
        m(&|x| x.syncer_cores),
        m(&|x| x.load_cores),
        m(&|x| x.other_cores),
    )
}

fn render(args: &Args, seed_calls: u64, rounds: &[Vec<Measured>]) -> String {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let sides = sides(args);
    let mut ratio_rows = String::new();
    for &side in &sides[1..] {
        let per_round = ratios(rounds, side, Side::Seed);
        let listed: Vec<String> = per_round.iter().map(|r| format!("{r:.2}x")).collect();
        let goal = match side {
            Side::Batch(_) | Side::Sharded(_) => "at least 3x",
            _ => "reference: Redis's part of the endpoint alone",
        };
        ratio_rows.push_str(&format!(
            "| {} / seed script | **{:.2}x** | {} | {goal} |\n",
            label(side),
            median(per_round.iter().copied()),
            listed.join(", ")
        ));
    }
    // When Redis is what limits both sides, the ratio can reach at most the seed's Redis CPU
    // per decision over the endpoint's (the endpoint at its cheapest batch size).
    let cpu_per_decision = |side: Side| {
        median(
            of(rounds, side)
                .iter()
                .map(|x| x.redis.cpu_usec_per_decision(x.redis_decisions)),
        )
    };
    let cheapest = args
        .batch_sizes
        .iter()
        .map(|&b| (b, cpu_per_decision(Side::Batch(b))))
        .min_by(|a, b| a.1.total_cmp(&b.1));
    if let Some((size, cpu)) = cheapest {
        ratio_rows.push_str(&format!(
            "| Redis CPU per decision: seed script / batch endpoint, {size} per call (the \
             ratio's ceiling when Redis limits both sides) | **{:.2}x** | | |\n",
            cpu_per_decision(Side::Seed) / cpu
        ));
    }
    let mut rate_rows = String::new();
    let mut cost_rows = String::new();
    for &side in &sides {
        let runs = of(rounds, side);
        let m = |f: &dyn Fn(&Measured) -> f64| median(runs.iter().map(f));
        rate_rows.push_str(&rate_row(side, &runs));
        let cpu_us = m(&|x| x.redis.cpu_usec_per_decision(x.redis_decisions));
        cost_rows.push_str(&format!(
            "| {} | {:.1} | {:.2} | {:.2} | {:.0} |\n",
            label(side),
            m(&|x| x.redis.decisions_per_call(x.redis_decisions)),
            m(&|x| x.redis.script_usec_per_decision(x.redis_decisions)),
            cpu_us,
            1e6 / cpu_us,
        ));
    }
    let not_won = |direct: bool| -> u64 {
        rounds
            .iter()
            .flatten()
            .filter(|m| matches!(m.side, Side::Direct(_)) == direct)
            .map(|m| m.not_won)
            .sum()
    };
    let list = |sizes: &[usize]| -> String {
        let sizes: Vec<String> = sizes.iter().map(usize::to_string).collect();
        sizes.join(",")
    };
    format!(
        "## One hot goods: the batch endpoint against the seed's own Lua script

Command: `bash scripts/bench.sh` (runs `target/release/seckill-bench-hot --seconds {secs} \
--rounds {rounds} --batch-sizes {sizes} --direct-sizes {direct} --direct-clients {dc} \
--connections {c} --redis-clients {rc} --pipeline {p}`).

Conditions: this machine ({cores} cores shared by Redis, the syncer and the load generator), \
one private redis-server (no persistence), the syncer in release build (no pipeline; claim \
window one hour, so the sweeper releases nothing during a run), one goods with a stock no run \
sells out. {rounds} rounds, each running every side once, in alternating order; a ratio is the \
median over rounds of the two sides' decisions/s within one round, the absolute figures each \
side's median round.

- Seed script: `redis-benchmark -c {rc} -P {p} -n {seed_calls} EVALSHA <sha> 2 goods:stock:1 \
goods:stock:lock:1 1 86400`, the seed's `deductStockScript` verbatim \
([bench/seed/deduct_stock.lua](bench/seed/deduct_stock.lua)) with its KEYS and ARGV as the seed \
calls it; one decision per call, counted from its stock and lock keys (every call must deduct).
- Batch endpoint: wrk, 1 thread, {c} connections, {secs} s per run, `POST {path}` with N \
attempts per call, each a new buyer and request id, as the filter sends the buyers that \
arrived while its last call was out. A decision is an attempt answered `won` (the stock never \
runs out, so every answered attempt must win; {batch_not_won} did not); Redis's own count (the \
sale's order sequence) must hold every one, plus at most the calls wrk left in flight.
- Deduct script direct (a reference, not a goal): `redis-benchmark -c {dc} -r 1000000000 \
EVALSHA <sha> 8 <the goods's keys> hot <deadline> 3600000 0` followed by N (buyer, 1, request \
id) triples with random ids: the project's `deduct_batch.lua` as the syncer calls it, without \
HTTP, JSON or the syncer. Decisions counted from the sale's order sequence ({direct_not_won} \
attempts met a buyer id drawn twice and were refused).
- Between runs of the endpoint and of the direct calls the run's buyers, requests, \
reservations and outbox are deleted, so every run starts from the same small state.

| ratio (decisions/s) | median | per round | goal |
|---|---|---|---|
{ratio_rows}
| side | decisions/s | decisions answered / counted in Redis (all rounds) | p50 per call | p99 per call | Redis cores | syncer cores | load generator cores | other cores |
|---|---|---|---|---|---|---|---|---|
{rate_rows}
### What Redis spends per decision (one master, one hot goods)

From Redis's own counters around each run: `INFO commandstats` (EVAL and EVALSHA: calls and \
the microseconds spent inside them) and the main thread's CPU from `INFO cpu` (the scripts plus \
reading calls and writing replies). Commandstats' microseconds are wall-clock time inside each \
call, so they grow when the machine preempts Redis mid-call; the main thread's CPU does not, and \
is the figure to project from. Projected capacity: decisions/s one fully used Redis core would \
make at this cost; N masters, each with a core of its own and the goods's load spread evenly \
over them, make N times that.

| side | decisions per script call | script µs per decision (commandstats) | Redis main-thread CPU µs per decision | projected decisions/s per Redis core |
|---|---|---|---|---|
{cost_rows}",
        secs = args.seconds,
        rounds = args.rounds,
        sizes = list(&args.batch_sizes),
        direct = list(&args.direct_sizes),
        dc = args.direct_clients,
        batch_not_won = not_won(false),
        direct_not_won = not_won(true),
        c = args.connections,
        rc = args.redis_clients,
        p = args.pipeline,
        path = seckill_api::DEDUCT_BATCH_PATH,
    )
}
