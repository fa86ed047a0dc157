//! Edge benchmark: Envoy's baselines and the filter's paths, measured side by side in one run
//! with the same load generator, the same upstream and the same Envoy worker count, then
//! written into BENCHMARKS.md with the ratios.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use seckill_bench::wrk::{self, WrkReport};
use seckill_e2e::deduct_stub::DeductStub;
use seckill_e2e::envoy::{Envoy, LOCAL_TEMPLATE};
use seckill_e2e::stack::{Stack, StackOptions};
use serde_json::json;

#[derive(Parser)]
#[command(about = "Benchmark the edge against Envoy's own baselines and update BENCHMARKS.md")]
struct Args {
    /// Seconds each scenario is measured (after a short warm-up).
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Concurrent connections wrk keeps open.
    #[arg(long, default_value_t = 50)]
    connections: u32,
    /// File to update (the section between the edge markers is replaced).
    #[arg(long, default_value = "BENCHMARKS.md")]
    out: PathBuf,
    /// Measure only the scenarios whose names contain one of these words (for exploring);
    /// BENCHMARKS.md is only rewritten by a full run.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Interleaved rounds; each scenario reports its median round.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
}

struct Scenario<'a> {
    name: &'a str,
    what: &'a str,
    /// The median round (by requests/s), shown in the table of absolute figures.
    report: WrkReport,
    /// Requests/s of every round, in round order: ratios pair scenarios round by round.
    per_round: Vec<f64>,
    /// Whether the answers are meant to be rejections (non-2xx) or forwards (2xx).
    rejects: bool,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 1)]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(args.rounds > 0, "--rounds must be at least 1");
    let duration = Duration::from_secs(args.duration);
    let warmup = Duration::from_secs(2);

    // One Envoy worker everywhere, as in ARCHITECTURE.md's reference figures.
    let mut options = StackOptions::new("bench");
    options.workers = 1;
    options.plugin_config["rate_limit"] = json!({
        "default": { "per_second": 100_000_000.0, "burst": 100_000_000u64 },
        "goods": { "slow": { "per_second": 0.001, "burst": 1 } }
    });
    options.plugin_config["sold_out_cache_ms"] = json!(3_600_000);
    // The unknown-goods path answers from the worker's memory of the syncer's answer.
    options.plugin_config["unknown_goods_cache_ms"] = json!(3_600_000);
    let stack = Stack::start(options).await?;
    stack.open_sale("win", 1_000_000_000, 1_000_000).await?;
    stack.open_sale("gone", 0, 1).await?;
    stack.open_sale("slow", 1_000_000_000, 1_000_000).await?;

    for (file, text) in SCRIPTS {
        std::fs::write(stack.scratch.path.join(file), text)?;
    }
    let shop_port = stack.shop.addr.port().to_string();
    let baseline = |template: &'static str| {
        let values = HashMap::from([("SHOP_PORT", shop_port.clone())]);
        Envoy::start(&stack.scratch.path, template, values, 1)
    };
    let plain = baseline("bench/envoy/plain.yaml").await?;
    let native = baseline("bench/envoy/native-ratelimit.yaml").await?;
    let gate = stack.envoy.url();
    // The same filter and configuration, but its callouts go to a stub that says "won" at
    // once: what the edge costs apart from the stock service.
    let stub = DeductStub::start().await?;
    let stub_gate = {
        let mut values = stack.envoy_values();
        values.insert("SYNCER_PORT", stub.addr.port().to_string());
        Envoy::start(&stack.scratch.path, LOCAL_TEMPLATE, values, 1).await?
    };
    // The floor for any wasm rejection: a filter that only answers 429, in the same Envoy
    // set-up as the gate (V8, one VM per worker).
    let reject_only = {
        let mut values = stack.envoy_values();
        values.insert("WASM_PATH", reject_only_wasm()?.display().to_string());
        Envoy::start(&stack.scratch.path, LOCAL_TEMPLATE, values, 1).await?
    };
    // The native sold-out fast path: the gate with Envoy's own route for "gone", its runtime
    // key set as `seckill-syncer fast-path` sets it for a sold-out goods.
    let fast = {
        let mut values = stack.envoy_values();
        values.insert(
            "FAST_ROUTES",
            seckill_e2e::fast_path::routes(&["gone".to_string()])?,
        );
        let fast = Envoy::start(&stack.scratch.path, LOCAL_TEMPLATE, values, 1).await?;
        let key = seckill_api::fast_path::runtime_key("gone");
        let admin = format!("http://127.0.0.1:{}", fast.admin_port);
        stack
            .http
            .post(format!("{admin}/runtime_modify?{key}=100"))
            .send()
            .await?
            .error_for_status()?;
        fast
    };
    let plans = [
        // Each filter path next to its baseline: ratios pair runs of the same round, so the
        // closer in time, the less the machine's drift enters them.
        (
            "plain proxy",
            "Envoy router only, to the stub shop",
            format!("{}/seckill/win/buy", plain.url()),
            false,
        ),
        (
            "filter: winner",
            "callout to the syncer, Lua deduct in Redis, forwarded to the shop",
            format!("{gate}/seckill/win/buy"),
            false,
        ),
        (
            "filter: winner, stub deduct",
            "as the winner path, but the callout goes to a stub that answers \"won\" at once (no syncer, no Redis)",
            format!("{}/seckill/win/buy", stub_gate.url()),
            false,
        ),
        (
            "native local_ratelimit",
            "Envoy's own filter rejecting every request (429)",
            format!("{}/seckill/win/buy", native.url()),
            true,
        ),
        (
            "wasm reject-only",
            "a proxy-wasm filter that does nothing but answer 429 (bench/reject-only): the floor for a wasm rejection",
            format!("{}/seckill/win/buy", reject_only.url()),
            true,
        ),
        (
            "filter: sold out",
            "answered from the shared sold-out cache (409), no callout",
            format!("{gate}/seckill/gone/buy"),
            true,
        ),
        (
            "native fast path: sold out",
            "the gate's Envoy with a sold-out route for the goods (its runtime key on): direct_response 409, the wasm filter disabled on the route",
            format!("{}/seckill/gone/buy", fast.url()),
            true,
        ),
        (
            "filter: rate limited",
            "per-goods GCRA rejects (429): shared data, then the worker's memory of the denial",
            format!("{gate}/seckill/slow/buy"),
            true,
        ),
        (
            "filter: unknown goods",
            "a goods the syncer does not sell (404), answered from the worker's memory of that answer, no callout",
            format!("{gate}/seckill/nosuch/buy"),
            true,
        ),
        (
            "filter: bad input",
            "a buyer id with a character ids may not hold (400), refused before any goods lookup",
            format!("{gate}/seckill/win/buy"),
            true,
        ),
        (
            "filter: wrong method",
            "a GET on the sale route (405)",
            format!("{gate}/seckill/win/buy"),
            true,
        ),
    ];
    let selected: Vec<_> = plans
        .iter()
        .filter(|(name, ..)| {
            args.only.is_empty() || args.only.iter().any(|w| name.contains(w.as_str()))
        })
        .collect();

    // Rounds interleave the scenarios, so a slow moment of the machine hits all of them
    // alike; each scenario reports its median round.
    let mut rounds: Vec<Vec<WrkReport>> = vec![Vec::new(); selected.len()];
    for round in 0..args.rounds {
        for (i, (name, _, url, _)) in selected.iter().enumerate() {
            let script = stack.scratch.path.join(script_for(name));
            let run = |duration: Duration| {
                let (url, script) = (url.clone(), script.clone());
                let connections = args.connections;
                tokio::task::spawn_blocking(move || {
                    wrk::run(&url, &script, 1, connections, duration)
                })
            };
            run(warmup).await??;
            let proof = proof_of(name);
            let before = match proof {
                Some(proof) => proof.count(&stack.envoy).await?,
                None => 0,
            };
            let report = run(duration).await??;
            if let Some(proof) = proof {
                proof
                    .check(&stack.envoy, name, before, report.requests)
                    .await?;
            }
            eprintln!(
                "round {}: {name}: {:.0} req/s",
                round + 1,
                report.requests_per_second
            );
            rounds[i].push(report);
        }
    }
    let mut scenarios = Vec::new();
    for ((name, what, _, rejects), mut reports) in selected.into_iter().zip(rounds) {
        let per_round = reports.iter().map(|r| r.requests_per_second).collect();
        reports.sort_by(|a, b| a.requests_per_second.total_cmp(&b.requests_per_second));
        let report = reports[reports.len() / 2];
        scenarios.push(Scenario {
            name,
            what,
            report,
            per_round,
            rejects: *rejects,
        });
    }

    for s in &scenarios {
        let wrong = if s.rejects {
            s.report.requests - s.report.non_2xx.min(s.report.requests)
        } else {
            s.report.non_2xx
        };
        anyhow::ensure!(
            wrong * 1000 <= s.report.requests.max(1),
            "{}: {wrong} of {} answers were not the expected kind; the scenario measured the wrong path",
            s.name,
            s.report.requests
        );
    }

    let section = render(&scenarios, &args);
    println!("{section}");
    if args.only.is_empty() {
        seckill_bench::report::update_section(&args.out, "edge-benchmark", &section)?;
        println!("updated {}", args.out.display());
    }
    Ok(())
}

/// The median over rounds of `name`'s rate divided by `base`'s rate in the same round. The
/// machine's speed drifts between rounds; within one round the two ran a few seconds apart.
fn paired_ratio(scenarios: &[Scenario], name: &str, base: &str) -> f64 {
    let rounds = |name: &str| {
        scenarios
            .iter()
            .find(|s| s.name == name)
            .map(|s| s.per_round.clone())
            .unwrap_or_default()
    };
    let mut ratios: Vec<f64> = rounds(name)
        .iter()
        .zip(rounds(base))
        .map(|(rate, base)| rate / base)
        .collect();
    if ratios.is_empty() {
        return f64::NAN;
    }
    ratios.sort_by(f64::total_cmp);
    ratios[ratios.len() / 2]
}

fn render(scenarios: &[Scenario], args: &Args) -> String {
    let ratio = |name: &str, base: &str| paired_ratio(scenarios, name, base);
    let (plain, native, floor) = ("plain proxy", "native local_ratelimit", "wasm reject-only");
    let mut out = String::new();
    out.push_str("## Edge: the filter against Envoy's own baselines\n\n");
    out.push_str(&format!(
        "Command: `bash scripts/bench.sh` (runs `target/release/seckill-bench --duration {} --connections {} --rounds {}`).\n\n",
        args.duration, args.connections, args.rounds
    ));
    out.push_str(&format!(
        "Conditions: this machine ({} cores, shared by everything below), Envoy 1.40 with 1 worker thread, \
         wrk with 1 thread and {} connections for {} s per scenario after a 2 s warm-up, {} rounds \
         interleaving the scenarios (each ratio is the median over rounds of the two scenarios' ratio within one round; the absolute figures are each scenario's median round), one stub shop API (axum) as \
         the upstream of every scenario, the syncer (release build) and a private redis-server on the same \
         cores. Each request is a POST from a random buyer id; the winner path sells from a stock of 10^9.\n\n",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        args.connections,
        args.duration,
        args.rounds
    ));
    // (label, scenario, baseline, target); a row with a target shows its figure in bold.
    let mut rows = Vec::new();
    for (path, scenario) in REJECT_PATHS {
        rows.push((
            format!("{path} / native local_ratelimit"),
            scenario,
            native,
            Some("at least 0.7x"),
        ));
        rows.push((
            format!("{path} / wasm reject-only"),
            scenario,
            floor,
            Some("at least 0.9x"),
        ));
    }
    rows.push((
        "native fast path (sold out) / native local_ratelimit".to_string(),
        "native fast path: sold out",
        native,
        Some("at least 0.95x"),
    ));
    rows.push((
        "wasm reject-only / native local_ratelimit".to_string(),
        floor,
        native,
        None,
    ));
    rows.push((
        "winner path / plain proxy".to_string(),
        "filter: winner",
        plain,
        Some("at least 0.5x"),
    ));
    out.push_str("| ratio | measured | target |\n|---|---|---|\n");
    let measured = |name: &str| scenarios.iter().any(|s| s.name == name);
    for (label, name, base, target) in rows {
        // A run of some scenarios (`--only`) shows the ratios it measured.
        if !measured(name) || !measured(base) {
            continue;
        }
        let measured = ratio(name, base);
        out.push_str(&match target {
            Some(target) => format!("| {label} | **{measured:.2}x** | {target} |\n"),
            None => format!(
                "| {label} | {measured:.2}x | reference: the floor for any wasm rejection |\n"
            ),
        });
    }
    out.push('\n');
    out.push_str("Absolute figures, this machine, this run:\n\n");
    out.push_str("| scenario | what happens | requests/s | p50 | p99 |\n|---|---|---|---|---|\n");
    for s in scenarios {
        out.push_str(&format!(
            "| {} | {} | {:.0} | {:.2} ms | {:.2} ms |\n",
            s.name, s.what, s.report.requests_per_second, s.report.p50_ms, s.report.p99_ms
        ));
    }
    out
}

/// The reject-only baseline filter (`bench/reject-only`), built by `scripts/bench.sh`.
fn reject_only_wasm() -> anyhow::Result<PathBuf> {
    seckill_e2e::process::locate(
        "SECKILL_REJECT_ONLY_WASM",
        seckill_e2e::process::workspace_root()
            .join("target/wasm32-wasip1/release/seckill_bench_reject_only.wasm"),
        "build it with `cargo build -p seckill-bench-reject-only --target wasm32-wasip1 --release`",
    )
}

/// Every answer the gate gives itself, as (what the ratio rows call it, scenario).
const REJECT_PATHS: [(&str, &str); 5] = [
    ("sold-out path", "filter: sold out"),
    ("rate-limited path", "filter: rate limited"),
    ("unknown-goods path", "filter: unknown goods"),
    ("bad-input path", "filter: bad input"),
    ("wrong-method path", "filter: wrong method"),
];

/// The wrk scripts, by file name in the scratch directory.
const SCRIPTS: [(&str, &str); 3] = [
    ("buy.lua", wrk::BUY_SCRIPT),
    ("bad-buyer.lua", wrk::BAD_BUYER_SCRIPT),
    ("get.lua", wrk::GET_SCRIPT),
];

/// The script a scenario's requests come from: a buy from a random buyer, unless the
/// scenario is about a request the gate refuses as such.
fn script_for(scenario: &str) -> &'static str {
    match scenario {
        "filter: bad input" => "bad-buyer.lua",
        "filter: wrong method" => "get.lua",
        _ => "buy.lua",
    }
}

/// A counter of the gate that counts exactly the answers a scenario means to measure: a
/// scenario whose requests took another path (a callout instead of a memory's answer, say)
/// would have the right kind of status and the wrong cost.
#[derive(Clone, Copy)]
enum Proof {
    /// A counter by its Prometheus name.
    Stat(&'static str),
    /// `seckill_outcome{outcome="..."}`.
    Outcome(&'static str),
}

fn proof_of(scenario: &str) -> Option<Proof> {
    match scenario {
        "filter: sold out" => Some(Proof::Stat("seckill_soldout_cache_hit")),
        "filter: rate limited" => Some(Proof::Outcome("rate_limited")),
        "filter: unknown goods" => Some(Proof::Stat("seckill_unknown_goods_cache_hit")),
        "filter: bad input" => Some(Proof::Outcome("bad_request")),
        "filter: wrong method" => Some(Proof::Outcome("method_not_allowed")),
        _ => None,
    }
}

impl Proof {
    async fn count(self, envoy: &Envoy) -> anyhow::Result<u64> {
        match self {
            Proof::Stat(name) => envoy.stat(name).await,
            Proof::Outcome(outcome) => envoy.outcome_stat(outcome).await,
        }
    }

    /// Fails unless the counter grew by (nearly) every answer of the run. Polled for a few
    /// seconds: a counter may be flushed after the answers it counts.
    async fn check(
        self,
        envoy: &Envoy,
        scenario: &str,
        before: u64,
        answered: u64,
    ) -> anyhow::Result<()> {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let grew = self.count(envoy).await?.saturating_sub(before);
            if grew * 1000 >= answered * 999 {
                return Ok(());
            }
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "{scenario}: the gate counted {grew} answers of the measured kind for {answered} requests; the scenario measured another path"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}
