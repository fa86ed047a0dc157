//! The load generator against the real stack: its counts must match what the syncer recorded.

use seckill_e2e::process::load_binary;
use seckill_e2e::stack::{Stack, StackOptions, SECRET};

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
            "--secret",
            SECRET,
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
