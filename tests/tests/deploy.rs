//! The deploy examples a user copies, each checked as shipped: the Envoy configurations in
//! `envoy/` validate by the command their own header gives;
//! and a `deduct.cluster` that names no cluster of Envoy's is said plainly.

use std::collections::HashMap;

use seckill_e2e::deduct_stub::DeductStub;
use seckill_e2e::envoy::{filter_wasm, Envoy, LOCAL_TEMPLATE};
use seckill_e2e::process::Scratch;
use seckill_e2e::shipped::{self, WITH_ETC_ENVOY};
use seckill_e2e::shop::ShopStub;
use seckill_e2e::stack::{default_plugin_config, send};
use serde_json::json;

/// `envoy --mode validate` on a shipped config, exactly as its header says, from a checkout:
/// the header's `scripts/with-etc-envoy.sh envoy --mode validate -c FILE` line must be its
/// plain `envoy --mode validate -c FILE` line run where `/etc/envoy` is staged.
fn validates_as_its_header_says(path: &str) {
    let validate = ["envoy", "--mode", "validate"];
    let plain = shipped::header_command(path, &validate).unwrap();
    assert_eq!(plain[3..], ["-c".to_owned(), path.to_owned()], "{plain:?}");
    let staged = shipped::header_command(path, &[WITH_ETC_ENVOY]).unwrap();
    assert_eq!(
        staged[1..],
        plain[..],
        "the staged command is the plain one"
    );
    let ran = shipped::run_from_root(&staged).unwrap();
    assert!(
        ran.ok && ran.output.contains(&format!("configuration '{path}' OK")),
        "{path} does not validate as its header says:\n{}",
        ran.output
    );
}

#[test]
fn production_config_validates_as_shipped() {
    validates_as_its_header_says("envoy/production.yaml");
}

#[test]
fn validation_runs_the_filters_own_configuration_check() {
    // A copy with one plugin-config value broken: Envoy's validation loads the filter, whose
    // on_configure must refuse it with its own line.
    let scratch = Scratch::new("validate-broken").unwrap();
    let shipped = shipped::read("envoy/production.yaml").unwrap();
    let broken = shipped::replace_each(&shipped, &[("\"max\": 2", "\"max\": 0".into())]).unwrap();
    let path = scratch.path.join("broken.yaml");
    std::fs::write(&path, broken).unwrap();
    let ran = shipped::validate_staged(&path).unwrap();
    assert!(!ran.ok, "{}", ran.output);
    assert!(
        ran.output
            .contains("seckill-filter: bad plugin configuration: quantity.max: must be from 1"),
        "{}",
        ran.output
    );
}

// --- deduct.cluster that names no cluster of this Envoy ---

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mistyped_deduct_cluster_is_named_in_the_log_and_buyers_get_a_clear_503() {
    let scratch = Scratch::new("cluster-typo").unwrap();
    let shop = ShopStub::start().await.unwrap();
    let syncer = DeductStub::start().await.unwrap();
    // Envoy's cluster is `seckill_syncer`; the plugin configuration misspells it. Neither
    // `envoy --mode validate` nor the filter's on_configure can tell (proxy-wasm cannot list
    // clusters): Envoy starts, and the first call is where it shows.
    let mut plugin_config = default_plugin_config();
    plugin_config["deduct"]["cluster"] = json!("seckill_syncr");
    let values = HashMap::from([
        ("SHOP_PORT", shop.addr.port().to_string()),
        ("SHOP_TIMEOUT", "5s".to_owned()),
        ("SYNCER_PORT", syncer.addr.port().to_string()),
        ("WASM_PATH", filter_wasm().unwrap().display().to_string()),
        (
            "PLUGIN_CONFIG",
            serde_json::to_string(&plugin_config.to_string()).unwrap(),
        ),
    ]);
    let envoy = Envoy::start(&scratch.path, LOCAL_TEMPLATE, values, 1)
        .await
        .unwrap();
    let client = reqwest::Client::new();
    for i in 0..5 {
        let request = client
            .post(format!("{}/seckill/sku-1/buy", envoy.url()))
            .header("x-user-id", format!("u{i}"))
            .header("x-request-id", format!("r{i}"));
        let r = send(request).await.unwrap();
        assert_eq!(
            (r.status, r.outcome.as_str()),
            (503, "unavailable"),
            "{r:?}"
        );
        assert_eq!(
            r.body["message"],
            "this gateway is misconfigured and cannot reach the stock service; nothing was reserved; try again later"
        );
        assert_eq!(r.body["request_id"], format!("r{i}"));
        assert_eq!(r.retry_after.as_deref(), Some("10"));
    }
    // Said once, at error level, naming the cluster; not once per buyer.
    let log = envoy.log();
    let line = "seckill-filter: deduct.cluster \"seckill_syncr\" is not a cluster of this Envoy";
    let said: Vec<&str> = log.lines().filter(|l| l.contains(line)).collect();
    assert_eq!(said.len(), 1, "{log}");
    assert!(said[0].contains("[error]"), "{}", said[0]);
    assert!(
        said[0].contains("failure mode closed: answering 503"),
        "{}",
        said[0]
    );
    assert_eq!(syncer.attempts(), 0, "no call went anywhere");
    assert!(shop.seen().is_empty(), "nobody reached the shop ungated");
}
