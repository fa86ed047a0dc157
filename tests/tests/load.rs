//! The load generator against the real stack: its counts must match what the syncer recorded.

use seckill_e2e::process::load_binary;
use seckill_e2e::stack::{Stack, StackOptions, ADMIN_SECRET};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn load_generator_counts_match_the_syncer() {
    let mut options = StackOptions::new("loadgen");
    options.pipeline = true;
    options.workers = 2;
    let stack = Stack::start(options).await.unwrap();
    stack.open_sale("g", 150, 1).await.unwrap();
    let json = stack.scratch.path.join("run.json");
    let chart = stack.scratch.path.join("run.svg");
    let output = tokio::process::Command::new(load_binary().unwrap())
        .args(["--gate", &stack.envoy.url(), "--goods", "g"])
        // The test gate's sale route (production.yaml's, the default, is /api/seckill/...).
        .args(["--path", "/seckill/{goods}/buy"])
        .args([
            "--buyers",
            "1500",
            "--rate",
            "1000",
            "--ramp-s",
            "0.5",
            "--requests",
            "2000",
        ])
        .args([
            "--syncer",
            &stack.syncer().unwrap().url(),
            "--admin-secret",
            ADMIN_SECRET,
            "--quiet",
        ])
        .arg("--json")
        .arg(&json)
        .arg("--chart")
        .arg(&chart)
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!(report["check"]["passed"], true, "{}", report["check"]);
    assert_eq!(
        report["outcomes"]["won"]["count"], 150,
        "{}",
        report["outcomes"]
    );
    let total: u64 = report["outcomes"]
        .as_object()
        .unwrap()
        .values()
        .map(|o| o["count"].as_u64().unwrap())
        .sum();
    assert_eq!(
        total, 2000,
        "every scheduled request was answered and counted"
    );
    assert_eq!(
        stack.shop.seen().len(),
        150,
        "the shop saw exactly the winners"
    );
    let svg = std::fs::read_to_string(&chart).unwrap();
    assert!(
        svg.starts_with("<svg") && svg.contains("answers per second"),
        "a chart was drawn"
    );
}

/// Runs `seckill-load` against the stack's gate with these arguments; (exit code, stdout, the
/// JSON report).
async fn run_load(stack: &Stack, goods: &str, args: &[&str]) -> (i32, String, serde_json::Value) {
    let json = stack
        .scratch
        .path
        .join(format!("{goods}-{}.json", args.len()));
    let output = tokio::process::Command::new(load_binary().unwrap())
        .args(["--gate", &stack.envoy.url(), "--goods", goods])
        .args(["--path", "/seckill/{goods}/buy", "--quiet"])
        .args(args)
        .arg("--json")
        .arg(&json)
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let report = std::fs::read(&json)
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok())
        .unwrap_or_else(|| {
            panic!(
                "no report: {stdout}{}",
                String::from_utf8_lossy(&output.stderr)
            )
        });
    (output.status.code().unwrap_or(-1), stdout, report)
}

/// Stages shape the arrivals, extra headers reach the shop, a second run's request ids are its
/// own (not answered as the first run's retries), and a latency bound crossed fails the run.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stages_headers_run_ids_and_thresholds_work_against_the_real_gate() {
    let mut options = StackOptions::new("loadgen_stages");
    options.workers = 2;
    let stack = Stack::start(options).await.unwrap();
    stack.open_sale("s", 1_000, 1_000).await.unwrap();
    // Up to 400/s over 1 s, then down to 0 over 1 s: 400 requests, from one buyer (limit
    // 1,000), so each is a purchase of its own.
    let profile = [
        "--stage",
        "400:1",
        "--stage",
        "0:1",
        "--buyers",
        "1",
        "--header",
        "Authorization: Bearer rehearsal",
    ];
    let (code, stdout, first) = run_load(&stack, "s", &profile).await;
    assert_eq!(code, 0, "{stdout}");
    assert_eq!(first["plan"]["requests"], 400, "{}", first["plan"]);
    assert_eq!(
        first["outcomes"]["won"]["count"], 400,
        "{}",
        first["outcomes"]
    );
    // The busiest 100 ms slices are in the middle of the run, where the profile peaks.
    let timeline = first["timeline"].as_array().unwrap();
    let busiest = timeline
        .iter()
        .max_by_key(|s| s["outcomes"]["won"].as_u64().unwrap_or(0))
        .unwrap();
    let peak_at = busiest["start_s"].as_f64().unwrap();
    assert!(
        (0.6..=1.4).contains(&peak_at),
        "peak at {peak_at} s: {timeline:?}"
    );
    let seen = stack.shop.seen();
    assert_eq!(seen.len(), 400);
    assert!(
        seen.iter()
            .all(|r| r.authorization.as_deref() == Some("Bearer rehearsal")),
        "every request carried the header"
    );

    // The same profile again: 400 new purchases, not 400 retries of the first run's.
    let (code, stdout, second) = run_load(&stack, "s", &profile).await;
    assert_eq!(code, 0, "{stdout}");
    assert_eq!(
        second["outcomes"]["won"]["count"], 400,
        "{}",
        second["outcomes"]
    );
    assert_ne!(first["plan"]["run_id"], second["plan"]["run_id"]);
    let orders: std::collections::HashSet<String> = stack
        .shop
        .seen()
        .iter()
        .filter_map(|r| {
            r.gate_headers
                .iter()
                .find(|(name, _)| name == seckill_api::ORDER_ID_HEADER)
                .map(|(_, order)| order.clone())
        })
        .collect();
    assert_eq!(
        orders.len(),
        800,
        "the shop got both runs' purchases, each its own order"
    );

    // A bound no gate meets fails the run with exit status 2 and says which; one it meets
    // passes.
    let crossed = [
        "--requests",
        "50",
        "--rate",
        "500",
        "--threshold",
        "all:p50<0.001",
    ];
    let (code, stdout, _) = run_load(&stack, "s", &crossed).await;
    assert_eq!(code, 2, "{stdout}");
    assert!(
        stdout.contains("threshold all:p50<0.001ms") && stdout.contains("CROSSED"),
        "{stdout}"
    );
    let met = [
        "--requests",
        "50",
        "--rate",
        "500",
        "--threshold",
        "all:max<60000",
    ];
    let (code, stdout, _) = run_load(&stack, "s", &met).await;
    assert_eq!(code, 0, "{stdout}");

    // Bad input: a clear error, nothing sent.
    let shop_before = stack.shop.seen().len();
    for bad in [
        &["--stage", "400"][..],
        &["--header", "no colon"][..],
        &["--threshold", "won:p98<5"][..],
        &["--stage", "10:1", "--requests", "5"][..],
    ] {
        let output = tokio::process::Command::new(load_binary().unwrap())
            .args(["--gate", &stack.envoy.url(), "--goods", "s"])
            .args(bad)
            .output()
            .await
            .unwrap();
        assert!(!output.status.success(), "{bad:?} was accepted");
        assert!(!output.stderr.is_empty(), "{bad:?}: no message");
    }
    assert_eq!(stack.shop.seen().len(), shop_before, "nothing was sent");
}
