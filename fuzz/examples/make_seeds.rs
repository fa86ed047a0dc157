//! Writes the committed seed corpora, `fuzz/corpus/<target>/`, from the real shapes: the plugin
//! configurations shipped in `envoy/`, `compose/` and the tests, requests as Envoy hands them
//! to the filter, the syncer's answers of every outcome, events as the Lua scripts write them
//! (cjson: keys in any order, `/` escaped) and the admin bodies the README documents.
//!
//! `cargo run --manifest-path fuzz/Cargo.toml --example make_seeds` (from the repository root,
//! or anywhere: paths are relative to this crate). It rewrites the seeds it names and leaves
//! any other file in the corpora alone.

use std::fs;
use std::path::{Path, PathBuf};

use seckill_fuzz::{request_input, request_lines};

fn main() -> std::io::Result<()> {
    let fuzz = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let root = fuzz.parent().expect("fuzz/ is inside the repository");
    let corpus = fuzz.join("corpus");
    write_all(&corpus.join("filter_config"), &filter_configs(root)?)?;
    write_all(&corpus.join("filter_request"), &requests())?;
    write_all(&corpus.join("deduct_reply"), &deduct_replies())?;
    write_all(&corpus.join("sale_event"), &sale_events())?;
    write_all(&corpus.join("admin_json"), &admin_bodies())?;
    Ok(())
}

type Seeds = Vec<(String, Vec<u8>)>;

fn write_all(dir: &Path, seeds: &Seeds) -> std::io::Result<()> {
    fs::create_dir_all(dir)?;
    for (name, bytes) in seeds {
        fs::write(dir.join(name), bytes)?;
    }
    println!("{}: {} seeds", dir.display(), seeds.len());
    Ok(())
}

fn seed(name: &str, bytes: impl Into<Vec<u8>>) -> (String, Vec<u8>) {
    (name.to_owned(), bytes.into())
}

/// The JSON block under the first `value: |` of a YAML file (Envoy's `StringValue`).
fn plugin_config_in_yaml(path: &Path) -> std::io::Result<String> {
    let text = fs::read_to_string(path)?;
    let mut lines = text
        .lines()
        .skip_while(|line| !line.trim_end().ends_with("value: |"));
    let header = lines.next().unwrap_or_default();
    let indent = header.len() - header.trim_start().len();
    let block: Vec<&str> = lines
        .take_while(|line| line.trim().is_empty() || line.len() - line.trim_start().len() > indent)
        .collect();
    let margin = block
        .iter()
        .filter(|line| !line.trim().is_empty())
        .map(|line| line.len() - line.trim_start().len())
        .min()
        .unwrap_or(0);
    let dedented: Vec<&str> = block
        .iter()
        .map(|line| line.get(margin..).unwrap_or(""))
        .collect();
    Ok(dedented.join("\n").trim_end().to_owned() + "\n")
}

/// The first fenced `json` block of a Markdown file.
fn first_json_block(path: &Path) -> std::io::Result<String> {
    let text = fs::read_to_string(path)?;
    let block: Vec<&str> = text
        .lines()
        .skip_while(|line| line.trim() != "```json")
        .skip(1)
        .take_while(|line| line.trim() != "```")
        .collect();
    Ok(block.join("\n") + "\n")
}

fn filter_configs(root: &Path) -> std::io::Result<Seeds> {
    let compose = plugin_config_in_yaml(&root.join("compose/envoy.yaml"))?
        // The compose entrypoint fills these in.
        .replace("@SECKILL_DEDUCT_TIMEOUT_MS@", "300")
        .replace("@SECKILL_SECRET@", "compose-secret");
    let mut seeds = vec![
        seed(
            "production.json",
            plugin_config_in_yaml(&root.join("envoy/production.yaml"))?,
        ),
        seed(
            "ecds.json",
            plugin_config_in_yaml(&root.join("envoy/ecds/seckill.yaml"))?,
        ),
        seed("compose.json", compose),
        // filter/README.md's example: every field.
        seed(
            "readme.json",
            first_json_block(&root.join("filter/README.md"))?,
        ),
    ];
    for (i, config) in seckill_fuzz::REQUEST_CONFIGS.iter().enumerate() {
        seeds.push(seed(&format!("request_config_{i}.json"), *config));
    }
    seeds.extend([
        // deploy/istio/seckill-gate.yaml's pluginConfig, as Istio hands it over.
        seed(
            "istio.json",
            r#"{"route":{"methods":["POST"],"path_template":"/api/seckill/{goods_id}/buy"},"goods_id":{"path":"goods_id"},"user_id":{"header":"x-user-id"},"quantity":{"source":{"query":"qty"},"default":1,"max":2},"request_id":{"header":"x-request-id"},"deduct":{"cluster":"outbound|8081||seckill-syncer.seckill.svc.cluster.local","authority":"seckill-syncer.seckill.svc.cluster.local","timeout_ms":300,"secret":"REPLACE-WITH-A-LONG-RANDOM-SECRET","failure_mode":"closed"},"rate_limit":{"default":{"per_second":2000,"burst":200}},"sold_out_cache_ms":2000}"#,
        ),
        seed(
            "open_no_caches.json",
            r#"{"route":{"path_template":"/"},"goods_id":{"header":"x-goods"},"user_id":{"header":"x-user-id"},"deduct":{"cluster":"c","secret":"s","failure_mode":"open"},"rate_limit":{"default":{"per_second":0.001,"burst":1},"tracked_goods_max":1},"sold_out_cache_ms":0,"unknown_goods_cache_ms":0,"release_on_upstream_failure":false}"#,
        ),
        // Refused ones, each for one reason.
        seed("refused_empty_object.json", "{}"),
        seed(
            "refused_gate_header.json",
            r#"{"route":{"path_template":"/buy/{g}"},"goods_id":{"path":"g"},"user_id":{"header":"X-Seckill-User-Id"},"deduct":{"cluster":"c","secret":"s"},"rate_limit":{"default":{"per_second":1,"burst":1}}}"#,
        ),
        seed(
            "refused_two_sources.json",
            r#"{"route":{"path_template":"/buy/{g}"},"goods_id":{"path":"g","query":"g"},"user_id":{"header":"x-user-id"},"deduct":{"cluster":"c","secret":"s"},"rate_limit":{"default":{"per_second":1,"burst":1}}}"#,
        ),
        seed(
            "refused_window.json",
            r#"{"route":{"path_template":"/buy/{g}"},"goods_id":{"path":"g"},"user_id":{"header":"x-user-id"},"deduct":{"cluster":"c","secret":"s","timeout_ms":0},"rate_limit":{"default":{"per_second":0.001,"burst":1000000000}}}"#,
        ),
    ]);
    Ok(seeds)
}

/// Headers Envoy adds to every request besides the client's.
const ENVOY: [(&str, &str); 4] = [
    (":scheme", "http"),
    (":authority", "shop.example"),
    ("x-forwarded-proto", "http"),
    ("content-length", "0"),
];

fn request(config: u8, headers: &[(&str, &str)]) -> Vec<u8> {
    let mut all: Vec<(&str, &str)> = headers.to_vec();
    all.extend(ENVOY);
    request_input(config, &all)
}

fn requests() -> Seeds {
    let buy = |path| {
        [
            (":method", "POST"),
            (":path", path),
            ("x-user-id", "u-42"),
            ("x-request-id", "4f6c1a2e-9b7d-4e1f-8a3c-2d5e6f708192"),
        ]
    };
    vec![
        seed("0_winner.bin", request(0, &buy("/seckill/sku-1/buy?qty=2"))),
        seed("0_no_quantity.bin", request(0, &buy("/seckill/sku-1/buy"))),
        seed(
            "0_winner_lines.txt",
            request_lines(0, &buy("/seckill/sku-1/buy?qty=2")),
        ),
        seed(
            "0_near_miss_lines.txt",
            request_lines(0, &buy("/seckill//sku-1/buy%2F?qty=1")),
        ),
        seed(
            "1_winner_lines.txt",
            request_lines(1, &buy("/api/seckill/sku-1/buy?qty=2")),
        ),
        seed(
            "2_winner_lines.txt",
            request_lines(
                2,
                &[
                    (":method", "POST"),
                    (":path", "/v2/shop-1/orders/r-1?goods=sku%2D1"),
                    ("x-buyer", "u-42"),
                    ("x-qty", "1000"),
                ],
            ),
        ),
        seed(
            "0_encoded_query.bin",
            request(0, &buy("/seckill/sku-1/buy?utm=a%20b&qty=%33&x")),
        ),
        seed(
            "0_quantity_zero.bin",
            request(0, &buy("/seckill/sku-1/buy?qty=0")),
        ),
        seed(
            "0_quantity_twice.bin",
            request(0, &buy("/seckill/sku-1/buy?qty=1&qty=2")),
        ),
        seed("0_bad_goods.bin", request(0, &buy("/seckill/sku%2F1/buy"))),
        seed(
            "0_near_miss.bin",
            request(0, &buy("/SECKILL/sku-1/./buy/;x")),
        ),
        seed("0_not_sale.bin", request(0, &buy("/healthz"))),
        seed(
            "0_wrong_method.bin",
            request(
                0,
                &[
                    (":method", "GET"),
                    (":path", "/seckill/sku-1/buy"),
                    ("x-user-id", "u-42"),
                ],
            ),
        ),
        seed(
            "0_forged_gate_headers.bin",
            request(
                0,
                &[
                    (":method", "POST"),
                    (":path", "/seckill/sku-1/buy"),
                    ("x-user-id", "u-42"),
                    ("x-request-id", "r-1"),
                    ("x-seckill-order-id", "sku-1.1.1"),
                    ("x_seckill_user_id", "u-1"),
                ],
            ),
        ),
        seed(
            "0_user_twice.bin",
            request(
                0,
                &[
                    (":method", "POST"),
                    (":path", "/seckill/sku-1/buy"),
                    ("x-user-id", "u-42"),
                    ("x-user-id", "u-43"),
                    ("x-request-id", "r-1"),
                ],
            ),
        ),
        seed("1_put.bin", {
            let mut headers = buy("/api/seckill/sku-1/buy?qty=2");
            headers[0].1 = "PUT";
            request(1, &headers)
        }),
        seed(
            "2_everything_elsewhere.bin",
            request(
                2,
                &[
                    (":method", "POST"),
                    (":path", "/v2/shop-1/orders/r-1?goods=sku-1"),
                    ("x-buyer", "u-42"),
                    ("x-qty", "3"),
                ],
            ),
        ),
    ]
}

fn deduct_replies() -> Seeds {
    vec![
        seed(
            "batch_won.json",
            r#"{"replies":[{"outcome":"won","order_id":"sku-1.1.7","remaining":93}]}"#,
        ),
        seed(
            "batch_mixed.json",
            r#"{"replies":[{"outcome":"won","order_id":"sku-1.1.8","remaining":0},{"outcome":"sold_out","remaining":0},{"outcome":"limit_reached","remaining":4},{"error":"bad_request","message":"quantity must be from 1 to 1000"},{"outcome":"duplicate","remaining":4}]}"#,
        ),
        seed(
            "batch_windows.json",
            r#"{"replies":[{"outcome":"not_started","remaining":100,"retry_after_ms":5000},{"outcome":"paused","remaining":100,"retry_after_ms":10000},{"outcome":"ended","remaining":7},{"outcome":"fleet_rate_limited","retry_after_ms":20}]}"#,
        ),
        seed(
            "batch_settled.json",
            r#"{"replies":[{"outcome":"released","order_id":"sku-1.1.3","remaining":5,"reason":"upstream_failed"},{"outcome":"confirmed","order_id":"sku-1.1.4","remaining":5},{"outcome":"request_id_conflict","remaining":5},{"outcome":"unknown_goods"}]}"#,
        ),
        seed(
            "batch_refused.json",
            r#"{"replies":[{"error":"unavailable","message":"the stock store did not answer in time"}]}"#,
        ),
        seed("batch_empty.json", r#"{"replies":[]}"#),
        // A string where the list belongs, long enough to make a long log line (found by this
        // target's checks).
        seed(
            "batch_long_string.json",
            format!(r#"{{"replies":"{}"}}"#, "x".repeat(3000)),
        ),
        seed(
            "single_won.json",
            r#"{"outcome":"won","order_id":"sku-1.2.99","remaining":0}"#,
        ),
        seed(
            "single_sold_out.json",
            r#"{"outcome":"sold_out","remaining":1}"#,
        ),
        seed("claim_all.json", r#"{"claimed":2,"late":0}"#),
        seed(
            "claim_failed.json",
            r#"{"claimed":1,"late":0,"failed":["sku-1.1.2"]}"#,
        ),
    ]
}

fn sale_events() -> Seeds {
    // As cjson writes them (`lua/common.lua`): keys in hash order, '/' escaped, integers bare.
    let mut seeds = vec![
        seed(
            "reserved.json",
            r#"{"request_id":"4f6c1a2e-9b7d","at_ms":1764518400123,"goods_id":"sku-1","quantity":2,"type":"reserved","user_id":"u-42","order_id":"sku-1.1.7"}"#,
        ),
        seed(
            "confirmed.json",
            r#"{"at_ms":1764518460001,"quantity":2,"user_id":"u-42","type":"confirmed","goods_id":"sku-1","order_id":"sku-1.1.7"}"#,
        ),
        // What reconcile's repair appends (serde's order).
        seed(
            "reserved_repair.json",
            r#"{"type":"reserved","order_id":"sku-1~2.3.41","goods_id":"sku-1~2","user_id":"u:7","quantity":1,"request_id":"r.1","at_ms":1764518400000}"#,
        ),
        seed("not_json.txt", "reserved sku-1.1.7"),
    ];
    for reason in ["cancelled", "expired", "upstream_failed", "unclaimed"] {
        for kind in ["released", "lapsed"] {
            seeds.push(seed(
                &format!("{kind}_{reason}.json"),
                format!(
                    r#"{{"at_ms":1764519300000,"quantity":1,"reason":"{reason}","user_id":"u-42","type":"{kind}","goods_id":"sku-1","order_id":"sku-1.1.9"}}"#
                ),
            ));
        }
    }
    seeds
}

fn admin_bodies() -> Seeds {
    vec![
        // README's sale definition.
        seed(
            "sale.json",
            r#"{"total_stock":1000,"per_user_limit":1,"starts_at":"2026-12-12T12:00:00Z","ends_at":"2026-12-12T13:00:00Z"}"#,
        ),
        seed(
            "sale_every_field.json",
            r#"{"total_stock":100000,"per_user_limit":2,"starts_at":"2026-12-12T12:00:00+08:00","ends_at":"2026-12-12T13:00:00.500+08:00","payment_window_s":900,"tier":"redis","fleet_rate":{"per_second":5000,"burst":500}}"#,
        ),
        seed(
            "sale_sharded.json",
            r#"{"total_stock":1000,"per_user_limit":1,"starts_at":"2026-12-12T12:00:00Z","ends_at":"2026-12-12T13:00:00Z","tier":"redis_sharded","shards":3}"#,
        ),
        seed(
            "sale_db.json",
            r#"{"total_stock":60,"per_user_limit":2,"starts_at":"2026-12-12T12:00:00Z","ends_at":"2026-12-12T13:00:00Z","payment_window_s":1,"tier":"db"}"#,
        ),
        seed(
            "sale_dual_write.json",
            r#"{"total_stock":60,"per_user_limit":2,"starts_at":"2026-12-12T12:00:00Z","ends_at":"2026-12-12T13:00:00Z","tier":"dual_write"}"#,
        ),
        // Windows MySQL's DATETIME cannot hold (found by this target's checks).
        seed(
            "sale_year_0999.json",
            r#"{"total_stock":1,"per_user_limit":1,"starts_at":"0999-12-12T12:00:00Z","ends_at":"2026-12-12T13:00:00Z"}"#,
        ),
        seed(
            "sale_year_12026.json",
            r#"{"total_stock":1,"per_user_limit":1,"starts_at":"2026-12-12T12:00:00Z","ends_at":"+12026-12-12T13:00:00Z"}"#,
        ),
        seed(
            "add_stock.json",
            r#"{"quantity":50,"operation_id":"restock-2026-12-12-1"}"#,
        ),
        seed("pause.json", r#"{"retry_after_s":30}"#),
        seed("pause_empty.json", ""),
    ]
}
