//! The main job: a local flash sale through the real stack (Envoy + filter, syncer, Redis,
//! MariaDB, a stub shop API), with a summary anyone can read.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use redis::AsyncCommands;
use seckill_e2e::stack::{send, BuyResult, Stack, StackOptions};
use serde_json::json;
use tokio::sync::Semaphore;

#[derive(Parser)]
#[command(about = "Run a local flash sale through the real stack and explain what happened")]
struct Args {
    /// Units on sale.
    #[arg(long, default_value_t = 500)]
    stock: u64,
    /// Distinct buyers in the crowd.
    #[arg(long, default_value_t = 2_000)]
    buyers: u32,
    /// Purchase attempts the crowd makes (some buyers click more than once).
    #[arg(long, default_value_t = 8_000)]
    requests: u32,
    /// Attempts sent per second (open loop: on schedule, whatever the answers).
    #[arg(long, default_value_t = 4_000)]
    rate: u32,
    /// The gate's rate limit for the goods, per second (one budget per Envoy).
    #[arg(long, default_value_t = 1_000.0)]
    limit_per_second: f64,
    /// Envoy worker threads.
    #[arg(long, default_value_t = 2)]
    workers: u32,
}

const GOODS: &str = "phone-x";
/// Requests in flight at once; the rest wait their turn (bounded, like a real client pool).
const IN_FLIGHT_MAX: usize = 512;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(
        args.buyers > 0 && args.requests > 0 && args.rate > 0,
        "buyers, requests and rate must be positive"
    );
    println!("Starting the local stack: redis-server, a Kafka broker (Tansu), MariaDB database seckill_demo, the syncer with its pipeline, Envoy ({} workers) with the seckill filter, and a stub shop API...", args.workers);
    let mut options = StackOptions::new("demo");
    options.workers = args.workers;
    options.kept_database = Some("seckill_demo".into());
    options.pipeline = true;
    options.plugin_config["rate_limit"] = json!({
        "default": { "per_second": 1000.0, "burst": 100 },
        "goods": { GOODS: { "per_second": args.limit_per_second, "burst": (args.limit_per_second / 10.0).ceil().max(1.0) as u64 } }
    });
    let stack = Arc::new(Stack::start(options).await?);
    stack.open_sale(GOODS, args.stock, 1).await?;
    println!(
        "Sale defined and preheated: {GOODS}, {} units, 1 per buyer, rate limit {}/s at the edge.",
        args.stock, args.limit_per_second
    );
    println!(
        "Live dashboard while the demo runs (the stack stops when it ends): {}/dashboard\n",
        stack.syncer()?.url()
    );

    let calls_before = stack.syncer()?.deduct_calls().await?;
    let started = Instant::now();
    let sampler = tokio::spawn(sample_timeline(stack.clone(), started));
    let results = crowd(&stack, &args).await;
    let elapsed = started.elapsed();
    let calls = stack.syncer()?.deduct_calls().await? - calls_before;
    // The demo's Envoy is fresh: its counters cover exactly this sale.
    let callouts = stack.envoy.stat("seckill_callout_sent").await?;

    print_summary(&stack, &args, &results, elapsed, calls, callouts).await?;
    follow_mysql(&stack, started).await?;
    settle_some(&stack).await?;
    sampler.abort();
    Ok(())
}

/// One line every 250 ms while the sale runs: units granted in Redis against order rows
/// in MySQL, to show the pipeline keeping up. Printed at the end.
async fn sample_timeline(stack: Arc<Stack>, started: Instant) {
    let mut lines = Vec::new();
    let mut ticker = tokio::time::interval(Duration::from_millis(250));
    while started.elapsed() < Duration::from_secs(30) {
        ticker.tick().await;
        let Ok(live) = stack.live(GOODS).await else {
            continue;
        };
        let rows: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM orders WHERE goods_id = ?")
            .bind(GOODS)
            .fetch_one(&stack.db.pool)
            .await
            .unwrap_or(-1);
        let granted = live["reserved"].as_i64().unwrap_or(0) + live["sold"].as_i64().unwrap_or(0);
        lines.push(format!(
            "  {:>5.2} s   granted in Redis {granted:>5}   rows in MySQL {rows:>5}",
            started.elapsed().as_secs_f64()
        ));
        if let Ok(mut timeline) = TIMELINE.lock() {
            *timeline = lines.clone();
        }
        let total = live["total"].as_i64().unwrap_or(0);
        if granted == total && rows == total {
            break;
        }
    }
}

static TIMELINE: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

/// Watches MySQL catch up with the sale through outbox, Kafka and the batched writer, then
/// reconciles the two stores.
async fn follow_mysql(stack: &Stack, sale_started: Instant) -> anyhow::Result<()> {
    let live = stack.live(GOODS).await?;
    let granted = live["reserved"].as_i64().unwrap_or(0) + live["sold"].as_i64().unwrap_or(0);
    println!(
        "\nMySQL following the sale (outbox -> Kafka -> batched writer), sampled every 250 ms:"
    );
    if let Ok(timeline) = TIMELINE.lock() {
        for line in timeline.iter() {
            println!("{line}");
        }
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last = -1;
    loop {
        let rows: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM orders WHERE goods_id = ?")
            .bind(GOODS)
            .fetch_one(&stack.db.pool)
            .await?;
        if rows != last {
            println!(
                "  {:>6.2} s after the sale opened: {rows:>5} of {granted} orders in MySQL",
                sale_started.elapsed().as_secs_f64()
            );
            last = rows;
        }
        if rows == granted {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "MySQL did not catch up within 60 s"
        );
        // Poll with the 60 s deadline above.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (stock, reserved, sold): (i64, i64, i64) =
        sqlx::query_as("SELECT stock, reserved, sold FROM sales WHERE goods_id = ?")
            .bind(GOODS)
            .fetch_one(&stack.db.pool)
            .await?;
    println!("MySQL stock: available {stock} + reserved {reserved} + sold {sold} (table sales), {last} rows in table orders.");
    let output = std::process::Command::new(seckill_e2e::syncer::syncer_binary()?)
        .arg("reconcile")
        .args([
            "--redis-url",
            &stack.redis.url(),
            "--mysql-url",
            &stack.db.url(),
        ])
        .args(["--key-prefix", &stack.key_prefix])
        .args([
            "--kafka-brokers",
            &stack
                .broker
                .as_ref()
                .map(|b| b.bootstrap())
                .unwrap_or_default(),
        ])
        .args(["--goods", GOODS])
        .output()?;
    println!(
        "\nseckill-syncer reconcile:\n{}",
        String::from_utf8_lossy(&output.stdout)
    );
    anyhow::ensure!(
        output.status.success(),
        "reconcile found drift: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    println!("OK: Redis and MySQL agree; every unit won at the edge is in MySQL exactly once.");
    Ok(())
}

/// Sends the crowd's attempts on a fixed schedule. Attempt `i` comes from a buyer picked by a
/// fixed scramble of `i`, so eager buyers click more than once; one attempt in 50 is malformed
/// (quantity 0) to show the gate's 400.
async fn crowd(stack: &Arc<Stack>, args: &Args) -> Vec<BuyResult> {
    let interval = Duration::from_secs_f64(1.0 / f64::from(args.rate));
    let slots = Arc::new(Semaphore::new(IN_FLIGHT_MAX));
    let mut tasks = Vec::with_capacity(args.requests as usize);
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    for i in 0..args.requests {
        ticker.tick().await;
        let Ok(permit) = slots.clone().acquire_owned().await else {
            break;
        };
        let stack = stack.clone();
        let user = format!("buyer-{}", scramble(i) % args.buyers);
        let quantity = if i % 50 == 49 { 0 } else { 1 };
        tasks.push(tokio::spawn(async move {
            let _permit = permit;
            let request = stack
                .http
                .post(format!(
                    "{}/seckill/{GOODS}/buy?qty={quantity}",
                    stack.envoy.url()
                ))
                .header("x-user-id", user)
                .header("x-request-id", format!("attempt-{i}"));
            send(request).await
        }));
    }
    let mut results = Vec::with_capacity(tasks.len());
    for task in tasks {
        match task.await {
            Ok(Ok(result)) => results.push(result),
            Ok(Err(e)) => results.push(BuyResult {
                status: 0,
                outcome: format!("client error: {e}"),
                retry_after: None,
                order_id: None,
                body: json!(null),
            }),
            Err(e) => eprintln!("a request task failed: {e}"),
        }
    }
    results
}

/// Knuth's multiplicative hash: spreads attempts over buyers without a random generator.
fn scramble(i: u32) -> u32 {
    i.wrapping_mul(2_654_435_761)
}

fn meaning(outcome: &str) -> &'static str {
    match outcome {
        "won" => "reserved a unit; forwarded to the shop API with its order id",
        "sold_out" => "no stock left; after the last unit went, Envoy answers this itself",
        "duplicate" => "this buyer already holds the per-buyer allowance",
        "limit_reached" => "the quantity would pass the per-buyer limit",
        "rate_limited" => "over the goods' rate limit at the edge; told to retry later",
        "bad_request" => "malformed request (here: quantity 0); nothing was touched",
        "unavailable" => "the stock service did not answer; failed closed",
        _ => "",
    }
}

async fn print_summary(
    stack: &Stack,
    args: &Args,
    results: &[BuyResult],
    elapsed: Duration,
    calls: u64,
    callouts: u64,
) -> anyhow::Result<()> {
    let mut by_outcome: BTreeMap<(String, u16), usize> = BTreeMap::new();
    for r in results {
        *by_outcome.entry((r.outcome.clone(), r.status)).or_insert(0) += 1;
    }
    println!(
        "The crowd: {} attempts from {} buyers in {:.2} s ({:.0}/s offered).\n",
        results.len(),
        args.buyers.min(args.requests),
        elapsed.as_secs_f64(),
        f64::from(args.rate)
    );
    println!(
        "{:<15} {:>9} {:>5}  what it means",
        "outcome", "requests", "HTTP"
    );
    println!("{}", "-".repeat(90));
    let mut ordered: Vec<_> = by_outcome.into_iter().collect();
    ordered.sort_by_key(|((outcome, _), n)| (outcome != "won", std::cmp::Reverse(*n)));
    for ((outcome, status), n) in &ordered {
        println!("{outcome:<15} {n:>9} {status:>5}  {}", meaning(outcome));
    }

    let seen = stack.shop.seen();
    let order_ids: HashSet<&str> = seen
        .iter()
        .filter_map(|s| s.header("x-seckill-order-id"))
        .collect();
    let live = stack.live(GOODS).await?;
    let mut redis = stack.redis().await?;
    let outbox: u64 = redis.xlen(stack.goods_key(GOODS, "outbox")).await?;
    let winners = results.iter().filter(|r| r.outcome == "won").count();
    println!();
    println!(
        "Shop API received {} requests carrying {} distinct order ids (losers never reached it).",
        seen.len(),
        order_ids.len()
    );
    if let Some(example) = order_ids.iter().min() {
        println!("  an order id: {example}");
    }
    println!(
        "Redis stock: total {} = available {} + reserved {} + sold {}.",
        live["total"], live["available"], live["reserved"], live["sold"]
    );
    println!("Outbox: every deduct appended its sale event in the same atomic step; {outbox} not yet relayed to Kafka.");
    println!(
        "Deduct calls: {calls} of {} requests reached the syncer, sharing {callouts} callouts (each Envoy worker sends every buyer waiting at that moment in one call); the rest were answered by Envoy itself.",
        results.len()
    );

    let sold = live["reserved"].as_u64().unwrap_or(0) + live["sold"].as_u64().unwrap_or(0);
    let ok = winners as u64 == sold
        && seen.len() == winners
        && order_ids.len() == winners
        && sold <= args.stock;
    println!();
    if ok {
        println!("OK: {winners} winners = {sold} units sold in Redis = {} requests at the shop; no oversell.", seen.len());
        Ok(())
    } else {
        anyhow::bail!(
            "MISMATCH: winners {winners}, units sold {sold}, shop saw {}, distinct order ids {}",
            seen.len(),
            order_ids.len()
        )
    }
}

/// After the sale: most winners pay, some cancel, the rest are still inside their payment
/// window. Shows the lifecycle reaching MySQL, with stock conserved on both sides.
async fn settle_some(stack: &Stack) -> anyhow::Result<()> {
    let orders: Vec<String> = stack
        .shop
        .seen()
        .iter()
        .filter_map(|s| s.header("x-seckill-order-id").map(str::to_owned))
        .collect();
    let syncer = stack.syncer()?.url();
    let (mut confirmed, mut cancelled) = (0, 0);
    for (i, order) in orders.iter().enumerate() {
        // 7 in 10 pay, 1 in 10 cancels, 2 in 10 have not decided yet.
        let action = match i % 10 {
            0..=6 => "confirm",
            7 => "cancel",
            _ => continue,
        };
        let response = stack
            .http
            .post(format!("{syncer}/v1/orders/{order}/{action}"))
            .header(seckill_api::SECRET_HEADER, seckill_e2e::stack::SHOP_SECRET)
            .send()
            .await?;
        anyhow::ensure!(
            response.status().is_success(),
            "{action} {order}: {}",
            response.status()
        );
        if action == "confirm" {
            confirmed += 1;
        } else {
            cancelled += 1;
        }
    }
    let live = stack.live(GOODS).await?;
    println!(
        "\nAfter the sale: {confirmed} winners paid (confirm), {cancelled} cancelled (their units are on sale again), \
         the rest are inside their {} s payment window (the sweeper releases them when it ends).",
        live["window_ms"].as_u64().unwrap_or(0) / 1000
    );
    println!(
        "Redis: total {} = available {} + reserved {} + sold {}.",
        live["total"], live["available"], live["reserved"], live["sold"]
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (stock, reserved, sold): (i64, i64, i64) =
            sqlx::query_as("SELECT stock, reserved, sold FROM sales WHERE goods_id = ?")
                .bind(GOODS)
                .fetch_one(&stack.db.pool)
                .await?;
        if (stock, reserved, sold)
            == (
                live["available"].as_i64().unwrap_or(-1),
                live["reserved"].as_i64().unwrap_or(-1),
                live["sold"].as_i64().unwrap_or(-1),
            )
        {
            println!("MySQL:  total {} = available {stock} + reserved {reserved} + sold {sold} (orders confirmed and released by the same pipeline).", live["total"]);
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "MySQL did not follow the lifecycle within 60 s"
        );
        // Poll with the 60 s deadline above.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
