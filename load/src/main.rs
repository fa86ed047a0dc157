//! Rehearse a flash sale against any gate: open-loop arrivals, N distinct buyers, a ramp,
//! HDR latency histograms per outcome, a summary table, optional JSON and SVG chart, and an
//! optional check of the result against the syncer.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use seckill_load::{self as load, Plan};
use serde_json::{json, Value};

#[derive(Parser, Clone)]
#[command(about = "Rehearse a flash sale against a seckill gate and report what happened")]
struct Args {
    /// Base URL of the gate (Envoy's listener), e.g. http://127.0.0.1:8080.
    #[arg(long)]
    gate: String,
    /// Goods on sale.
    #[arg(long)]
    goods: String,
    /// Path of the buy endpoint; {goods} is replaced (the default is envoy/production.yaml's
    /// sale route).
    #[arg(long, default_value = "/api/seckill/{goods}/buy")]
    path: String,
    /// Header carrying the buyer's id.
    #[arg(long, default_value = "x-user-id")]
    user_header: String,
    /// Distinct buyers (requests pick buyers by a fixed scramble, so some click twice).
    #[arg(long, default_value_t = 10_000)]
    buyers: u64,
    /// Units per purchase.
    #[arg(long, default_value_t = 1)]
    quantity: u32,
    /// Target arrival rate, requests per second (open loop).
    #[arg(long, default_value_t = 1_000.0)]
    rate: f64,
    /// Seconds to ramp linearly from 0 to --rate.
    #[arg(long, default_value_t = 0.0)]
    ramp_s: f64,
    /// Seconds to run (ignored when --requests is given).
    #[arg(long, default_value_t = 10.0)]
    duration_s: f64,
    /// Requests to send in all (instead of --duration-s).
    #[arg(long, conflicts_with = "stage")]
    requests: Option<u64>,
    /// An arrival stage, RATE:SECONDS: the rate moves linearly from the previous stage's (0 at
    /// first) to RATE over SECONDS. Repeat for a profile (`--stage 2000:5 --stage 2000:20
    /// --stage 0:5`); replaces --rate, --ramp-s and --duration-s, and the run ends with the
    /// last stage.
    #[arg(long, conflicts_with_all = ["ramp_s", "duration_s"])]
    stage: Vec<load::Stage>,
    /// An extra header on every request, 'Name: value' (authentication, tracing); repeatable.
    #[arg(long = "header", value_parser = load::parse_header)]
    headers: Vec<(String, String)>,
    /// A latency bound, OUTCOME:QUANTILE<MS (e.g. `won:p99<250`, `all:max<2000`; QUANTILE is
    /// p50, p90, p99, p99.9 or max); repeatable. A bound crossed fails the run (exit status 2).
    #[arg(long)]
    threshold: Vec<load::Threshold>,
    /// Part of every request id, `load-{run id}-{index}` (default: new each run, so a second
    /// run's requests are not answered as retries of the first's). Set it to replay a run.
    #[arg(long)]
    run_id: Option<String>,
    /// Requests in flight at most (bounds the generator's own memory and sockets).
    #[arg(long, default_value_t = 1_024)]
    in_flight: usize,
    /// Per-request timeout, seconds.
    #[arg(long, default_value_t = 10.0)]
    timeout_s: f64,
    /// Write the summary and per-second timeline as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Draw the run as an SVG chart here.
    #[arg(long)]
    chart: Option<PathBuf>,
    /// The syncer's base URL: sample the stock left during the run and check the result.
    #[arg(long)]
    syncer: Option<String>,
    /// The syncer's admin credential (for --syncer: the run is checked against the admin
    /// API's view of the sale).
    #[arg(long, env = "SECKILL_ADMIN_SECRET", hide_env_values = true)]
    admin_secret: Option<String>,
    /// With --syncer: wait up to this many seconds for MySQL to hold every order.
    #[arg(long, default_value_t = 60.0)]
    drain_s: f64,
    /// No progress bar (for logs).
    #[arg(long)]
    quiet: bool,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    match run(Args::parse()).await {
        Ok(true) => std::process::ExitCode::SUCCESS,
        Ok(false) => std::process::ExitCode::from(2),
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<bool> {
    anyhow::ensure!(args.rate > 0.0, "--rate must be positive");
    anyhow::ensure!(args.buyers > 0, "--buyers must be positive");
    anyhow::ensure!(args.in_flight > 0, "--in-flight must be positive");
    anyhow::ensure!(
        args.ramp_s >= 0.0 && args.duration_s > 0.0,
        "--ramp-s and --duration-s must not be negative"
    );
    seckill_api::validate_id(&args.goods, seckill_api::ID_LEN_MAX)
        .map_err(|e| anyhow::anyhow!("--goods {e}"))?;
    let ramp = Duration::from_secs_f64(args.ramp_s);
    let requests = if args.stage.is_empty() {
        args.requests.unwrap_or_else(|| {
            load::requests_in(Duration::from_secs_f64(args.duration_s), args.rate, ramp)
        })
    } else {
        load::staged_requests(&args.stage)
    };
    let run_id = args.run_id.clone().unwrap_or_else(load::fresh_run_id);
    if let Err(e) = seckill_api::validate_id(
        &format!("load-{run_id}-{requests}"),
        seckill_api::ID_LEN_MAX,
    ) {
        anyhow::bail!("--run-id makes request ids the gate refuses: {e}");
    }
    let plan = Plan {
        url: format!(
            "{}{}",
            args.gate.trim_end_matches('/'),
            args.path.replace("{goods}", &args.goods)
        ),
        user_header: args.user_header.clone(),
        buyers: args.buyers,
        quantity: args.quantity,
        rate: args.stage.iter().map(|s| s.rate).fold(args.rate, f64::max),
        ramp,
        stages: args.stage.clone(),
        requests,
        headers: args.headers.clone(),
        run_id,
        in_flight_max: args.in_flight,
        timeout: Duration::from_secs_f64(args.timeout_s),
    };
    let syncer = match (&args.syncer, &args.admin_secret) {
        (Some(url), Some(secret)) => Some(Syncer::new(url, secret, &args.goods)?),
        (Some(_), None) => anyhow::bail!("--syncer needs --admin-secret (or SECKILL_ADMIN_SECRET)"),
        _ => None,
    };
    let before = match &syncer {
        Some(s) => Some(s.sale().await?),
        None => None,
    };

    let bar = if args.quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(requests)
    };
    bar.set_style(
        ProgressStyle::with_template("{elapsed_precise} [{bar:40}] {pos}/{len} sent, {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let progress_bar = bar.clone();
    // Stock samples every 250 ms while the run goes, to draw the stock line.
    let samples: Arc<Mutex<Vec<(Duration, u64)>>> = Arc::default();
    let sampler = syncer.clone().map(|s| {
        let samples = samples.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            loop {
                if let Ok(sale) = s.sale().await {
                    if let Some(left) = sale["live"]["available"].as_u64() {
                        if let Ok(mut samples) = samples.lock() {
                            samples.push((started.elapsed(), left));
                        }
                    }
                }
                // The stock line's sampling interval; the task is aborted when the run ends.
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        })
    });
    let result = load::run(&plan, move |sent, answered| {
        progress_bar.set_position(sent);
        progress_bar.set_message(format!("{answered} answered"));
    })
    .await?;
    bar.finish_and_clear();
    if let Some(sampler) = sampler {
        sampler.abort();
    }

    let mut timeline = result.recorder.timeline();
    if let Ok(samples) = samples.lock() {
        for second in &mut timeline {
            second.remaining = samples
                .iter()
                .rev()
                .find(|(at, _)| at.as_secs_f64() <= second.start_s + second.width_s)
                .map(|(_, left)| *left);
        }
    }
    print_summary(&args, &plan, &result);

    let mut check = Value::Null;
    let mut ok = judge_thresholds(&args.threshold, &result.recorder);
    if let (Some(syncer), Some(before)) = (&syncer, &before) {
        let (passed, report) = syncer
            .check(
                before,
                &result.recorder,
                args.quantity,
                Duration::from_secs_f64(args.drain_s),
            )
            .await?;
        ok &= passed;
        check = report;
    }
    if let Some(path) = &args.json {
        let report = json!({
            "plan": {
                "url": plan.url, "rate": plan.rate, "ramp_s": args.ramp_s, "requests": plan.requests,
                "run_id": plan.run_id,
                "stages": plan.stages.iter().map(|s| json!({"rate": s.rate, "over_s": s.over.as_secs_f64()})).collect::<Vec<_>>(),
                "buyers": plan.buyers, "quantity": plan.quantity, "in_flight_max": plan.in_flight_max,
            },
            "elapsed_s": result.elapsed.as_secs_f64(),
            "achieved_rate": result.recorder.total() as f64 / result.elapsed.as_secs_f64(),
            "outcomes": result.recorder.outcomes(),
            "overall": result.recorder.overall(),
            "timeline": timeline,
            "check": check,
        });
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)?;
    }
    if let Some(path) = &args.chart {
        let title = format!(
            "{}: {} requests at {:.0}/s",
            args.goods, plan.requests, plan.rate
        );
        load::chart::render(path, &title, &timeline)?;
    }
    Ok(ok)
}

/// Prints each threshold's verdict; false when any bound was crossed.
fn judge_thresholds(thresholds: &[load::Threshold], recorder: &load::Recorder) -> bool {
    let mut ok = true;
    for t in thresholds {
        let name = format!("{}:{}<{}ms", t.outcome, t.quantile, t.below_ms);
        match t.judge(recorder) {
            Some((value, true)) => println!("threshold {name}: {value:.2} ms, OK"),
            Some((value, false)) => {
                ok = false;
                println!("threshold {name}: {value:.2} ms, CROSSED");
            }
            None => println!("threshold {name}: no `{}` answers to measure", t.outcome),
        }
    }
    ok
}

fn print_summary(args: &Args, plan: &Plan, result: &load::Run) {
    let total = result.recorder.total();
    println!(
        "{} requests to {} in {:.2} s: offered {:.0}/s, answered {:.0}/s; {} buyers",
        total,
        plan.url,
        result.elapsed.as_secs_f64(),
        plan.rate,
        total as f64 / result.elapsed.as_secs_f64(),
        args.buyers
    );
    println!(
        "{:<20} {:>9} {:>7} {:>9} {:>9} {:>9} {:>9} {:>9}",
        "outcome", "count", "share", "p50 ms", "p90 ms", "p99 ms", "p99.9 ms", "max ms"
    );
    let mut rows: Vec<_> = result.recorder.outcomes().into_iter().collect();
    rows.sort_by_key(|(outcome, s)| (outcome != "won", std::cmp::Reverse(s.count)));
    rows.push(("all".into(), result.recorder.overall()));
    for (outcome, s) in rows {
        println!(
            "{:<20} {:>9} {:>6.1}% {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>9.2}",
            outcome,
            s.count,
            100.0 * s.count as f64 / total.max(1) as f64,
            s.p50_ms,
            s.p90_ms,
            s.p99_ms,
            s.p999_ms,
            s.max_ms
        );
    }
}

/// The syncer's admin API, to read the sale and check the run against it.
#[derive(Clone)]
struct Syncer {
    url: String,
    secret: String,
    goods: String,
    http: reqwest::Client,
}

impl Syncer {
    fn new(url: &str, secret: &str, goods: &str) -> anyhow::Result<Self> {
        Ok(Self {
            url: url.trim_end_matches('/').to_owned(),
            secret: secret.to_owned(),
            goods: goods.to_owned(),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                .build()?,
        })
    }

    async fn sale(&self) -> anyhow::Result<Value> {
        let response = self
            .http
            .get(format!("{}/admin/sales/{}", self.url, self.goods))
            .header(seckill_api::SECRET_HEADER, &self.secret)
            .send()
            .await?;
        anyhow::ensure!(
            response.status().is_success(),
            "the syncer answered {}",
            response.status()
        );
        Ok(response.json().await?)
    }

    /// Winners counted at the edge must equal the units granted in Redis during the run and,
    /// once drained, the orders MySQL recorded.
    async fn check(
        &self,
        before: &Value,
        recorder: &load::Recorder,
        quantity: u32,
        drain: Duration,
    ) -> anyhow::Result<(bool, Value)> {
        let granted = |sale: &Value| {
            ["reserved", "sold", "lapsed"]
                .iter()
                .map(|k| sale["live"][k].as_i64().unwrap_or(0))
                .sum::<i64>()
        };
        let winners = recorder.count("won") as i64;
        let after = self.sale().await?;
        let redis_units = granted(&after) - granted(before);
        let orders_before = before["definition"]["orders"].as_i64().unwrap_or(0);
        let deadline = Instant::now() + drain;
        let mut mysql_orders = after["definition"]["orders"].as_i64().unwrap_or(0) - orders_before;
        while mysql_orders < winners && Instant::now() < deadline {
            // Poll MySQL, bounded by --drain-s.
            tokio::time::sleep(Duration::from_millis(200)).await;
            mysql_orders = self.sale().await?["definition"]["orders"]
                .as_i64()
                .unwrap_or(0)
                - orders_before;
        }
        // No winner while units were on sale is no rehearsal (a wrong --path or goods: every
        // answer a refusal), though the counts agree at 0.
        let available_before = before["live"]["available"].as_i64().unwrap_or(0);
        let sold_something = winners > 0 || available_before < i64::from(quantity);
        if !sold_something {
            println!(
                "check against the syncer: no winner although {available_before} units were on sale; is --path the gate's sale route?"
            );
        }
        let passed = sold_something
            && redis_units == winners * i64::from(quantity)
            && mysql_orders == winners;
        println!(
            "check against the syncer: {winners} winners at the edge, {redis_units} units granted in Redis, {mysql_orders} new orders in MySQL: {}",
            if passed { "OK" } else { "MISMATCH" }
        );
        Ok((
            passed,
            json!({
                "winners": winners, "redis_units": redis_units, "mysql_orders": mysql_orders, "passed": passed,
            }),
        ))
    }
}
