//! What an operator watches a sale with, against real parts: the syncer's /metrics, Envoy's
//! /stats/prometheus and the fast-path switch's /metrics after a small sale (checked by
//! promtool, and against Redis), the outbox and deduct-to-MySQL metrics through a broker
//! outage, and the shipped Grafana dashboard and alert rules (their queries parsed by
//! promtool and naming only metrics a real scrape has).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use seckill_e2e::fast_path::{runtime_value, FastPathSwitch};
use seckill_e2e::pipeline::Pipeline;
use seckill_e2e::process::{free_port, wait_for, workspace_root};
use seckill_e2e::prometheus::{
    self, check_metrics, exposed_names, metric_names_in, rule_expressions, sample, types,
    without_grafana_variables, ALERT_RULES, ALERT_RULE_TESTS, DASHBOARD,
};
use seckill_e2e::stack::{Stack, StackOptions};
use seckill_e2e::syncer::{sum_metric, Role};
use serde_json::Value;

const SETTLE: Duration = Duration::from_secs(90);
/// The build the harness runs: the workspace's version, which the syncer reports.
const VERSION: &str = env!("CARGO_PKG_VERSION");

/// promtool finds nothing to say about an exposition.
fn assert_lint_clean(what: &str, exposition: &str) {
    let verdict = check_metrics(exposition).expect("promtool runs");
    assert!(
        verdict.success && verdict.output.trim().is_empty(),
        "promtool check metrics on {what}: {}\n---\n{exposition}",
        verdict.output
    );
}

fn value(exposition: &str, name: &str) -> f64 {
    sample(exposition, name).unwrap_or_else(|| panic!("no sample {name} in\n{exposition}"))
}

/// A histogram family with buckets: its `+Inf` bucket is its count, and it is no summary.
fn assert_histogram(exposition: &str, family: &str) -> f64 {
    let kind = types(exposition)
        .into_iter()
        .find(|(name, _)| name == family)
        .map(|(_, kind)| kind);
    assert_eq!(kind.as_deref(), Some("histogram"), "{family}");
    let count = value(exposition, &format!("{family}_count"));
    assert_eq!(
        value(exposition, &format!("{family}_bucket{{le=\"+Inf\"}}")),
        count,
        "{family}"
    );
    count
}

/// Redis's (available, reserved, sold, lapsed) of a sale.
async fn redis_stock(stack: &Stack, goods_id: &str) -> [i64; 4] {
    let mut conn = stack.redis().await.unwrap();
    let (a, r, s, l): (i64, i64, i64, i64) = redis::cmd("HMGET")
        .arg(stack.goods_key(goods_id, "sale"))
        .arg(&["available", "reserved", "sold", "lapsed"])
        .query_async(&mut conn)
        .await
        .unwrap();
    [a, r, s, l]
}

/// The stock gauge of a goods, in the order of [`redis_stock`]; None while a series is missing.
fn stock_gauge(exposition: &str, goods_id: &str) -> Option<[i64; 4]> {
    let mut stock = [0; 4];
    for (slot, state) in stock
        .iter_mut()
        .zip(["available", "reserved", "sold", "lapsed"])
    {
        let name = format!("seckill_redis_stock{{goods_id=\"{goods_id}\",state=\"{state}\"}}");
        *slot = sample(exposition, &name)? as i64;
    }
    Some(stock)
}

/// What still differs from `wanted` in a sample, if anything.
fn not_yet(exposition: &str, name: &str, wanted: f64) -> Option<String> {
    let got = sample(exposition, name);
    (got != Some(wanted)).then(|| format!("{name} is {got:?}, not {wanted}"))
}

/// Every counter a component starts at zero, as a scrape before its first event shows it.
const FROM_ZERO: &[&str] = &[
    "seckill_deduct_total{outcome=\"won\"}",
    "seckill_deduct_total{outcome=\"fleet_rate_limited\"}",
    "seckill_deduct_errors_total{kind=\"redis\"}",
    "seckill_deduct_errors_total{kind=\"too_late\"}",
    "seckill_claims_total{result=\"failed\"}",
    "seckill_settlements_total{action=\"confirm\",result=\"changed\"}",
    "seckill_fallback_entered_total{why=\"redis_down\"}",
    "seckill_redis_forgot_total{why=\"forgot\"}",
    "seckill_durability_waits_total{result=\"short\"}",
    "seckill_redis_lost_orders_total",
    "seckill_breaker_open",
    "seckill_dead_letters_total{source=\"kafka\"}",
    "seckill_dead_letters_total{source=\"outbox\"}",
    "seckill_writer_conflicts_total",
    "seckill_writer_errors_total",
    "seckill_relay_errors_total",
    "seckill_forgotten_reservations_total{outcome=\"expired\"}",
    "seckill_deduct_to_mysql_seconds_count",
    "seckill_deduct_duration_seconds_count",
];

/// A sale of 10 units to 15 buyers through Envoy, 3 of them paid: the syncer's and Envoy's
/// metrics pass promtool, carry help and true histograms, start at zero, show each goods'
/// Redis stock as Redis has it, the fast-path switch counts the updates an Envoy missed, and
/// every query of the dashboard and the alert rules names only metrics these scrapes have.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sale_is_watched_through_lint_clean_metrics() {
    let stack = Stack::start(StackOptions::for_a_crowd("metrics"))
        .await
        .unwrap();
    let syncer = stack.syncer().unwrap();

    // Before anything happened: counters at zero, help on every family.
    let before = syncer.metrics().await.unwrap();
    assert_lint_clean("the syncer before a sale", &before);
    for name in FROM_ZERO {
        assert_eq!(value(&before, name), 0.0, "{name} starts at zero");
    }
    assert_eq!(
        value(
            &before,
            &format!("seckill_build_info{{version=\"{VERSION}\"}}")
        ),
        1.0
    );
    assert!(
        !types(&before).iter().any(|(_, kind)| kind == "summary"),
        "no summaries: {before}"
    );

    stack.open_sale("hot", 10, 1).await.unwrap();
    stack.open_sale("cold", 5, 1).await.unwrap();
    let mut orders = Vec::new();
    for n in 0..15 {
        let bought = stack
            .buy("hot", &format!("u{n}"), 1, &format!("r{n}"))
            .await
            .unwrap();
        orders.extend(bought.order_id);
    }
    assert_eq!(orders.len(), 10);
    for order in &orders[..3] {
        let (status, body) = stack
            .admin()
            .unwrap()
            .settle(order, "confirm")
            .await
            .unwrap();
        assert_eq!(status, 200, "{body}");
    }

    // Once the pipeline has carried the sale to MySQL and reconcile has run over it.
    let last = std::sync::Mutex::new(String::new());
    let settled = wait_for("the sale to settle in the metrics", SETTLE, || async {
        let redis_hot = redis_stock(&stack, "hot").await;
        let redis_cold = redis_stock(&stack, "cold").await;
        let text = syncer.metrics().await?;
        let mut waiting = Vec::new();
        for (goods, redis) in [("hot", redis_hot), ("cold", redis_cold)] {
            let gauge = stock_gauge(&text, goods);
            if gauge != Some(redis) {
                waiting.push(format!(
                    "stock of {goods}: gauge {gauge:?}, Redis {redis:?}"
                ));
            }
            let outbox = format!("seckill_outbox_length{{goods_id=\"{goods}\"}}");
            waiting.extend(not_yet(&text, &outbox, 0.0));
        }
        for partition in 0..3 {
            let lag = format!("seckill_consumer_lag{{partition=\"{partition}\"}}");
            waiting.extend(not_yet(&text, &lag, 0.0));
        }
        waiting.extend(not_yet(
            &text,
            "seckill_deduct_to_mysql_seconds_count",
            10.0,
        ));
        waiting.extend(not_yet(&text, "seckill_reconcile_settled", 1.0));
        waiting.extend(not_yet(
            &text,
            "seckill_reconcile_drift{goods_id=\"hot\"}",
            0.0,
        ));
        let done = waiting.is_empty();
        if let Ok(mut last) = last.lock() {
            *last = waiting.join("; ");
        }
        Ok(done.then_some((text, redis_hot)))
    })
    .await;
    let (text, redis_hot) = settled.unwrap_or_else(|e| panic!("{e}: {}", last.lock().unwrap()));
    assert_eq!(redis_hot, [0, 7, 3, 0], "10 reserved, 3 of them paid");
    assert_eq!(stock_gauge(&text, "cold"), Some([5, 0, 0, 0]));
    assert_lint_clean("the syncer after a sale", &text);

    // Latencies are histograms with buckets, one observation per answer or order.
    let answers = (sum_metric(&text, "seckill_deduct_total")
        + sum_metric(&text, "seckill_deduct_errors_total")) as f64;
    assert_eq!(value(&text, "seckill_deduct_total{outcome=\"won\"}"), 10.0);
    assert_eq!(
        assert_histogram(&text, "seckill_deduct_duration_seconds"),
        answers
    );
    assert_eq!(
        assert_histogram(&text, "seckill_deduct_to_mysql_seconds"),
        10.0
    );
    assert!(value(&text, "seckill_deduct_to_mysql_seconds_sum") > 0.0);
    assert_histogram(&text, "seckill_writer_batch_duration_seconds");
    assert_histogram(&text, "seckill_deduct_batch_attempts");
    // The outcome counters untouched by this sale are still there, at zero.
    for name in FROM_ZERO
        .iter()
        .filter(|n| n.contains("errors") || n.contains("dead"))
    {
        assert_eq!(value(&text, name), 0.0, "{name}");
    }

    // Envoy: the per-outcome counters are one family with an outcome label.
    let envoy = stack.envoy.prometheus().await.unwrap();
    assert_eq!(value(&envoy, "seckill_outcome{outcome=\"won\"}"), 10.0);
    assert_eq!(value(&envoy, "seckill_outcome{outcome=\"sold_out\"}"), 5.0);
    for outcome in ["unavailable", "failed_open", "rate_limited", "bad_request"] {
        assert_eq!(
            value(&envoy, &format!("seckill_outcome{{outcome=\"{outcome}\"}}")),
            0.0
        );
    }

    // The fast-path switch, set on the stack's Envoy and on an admin address nothing listens
    // on: the reachable Envoy gets the sold-out goods' key, and each update the other misses
    // is counted (SeckillFastPathSwitchFailing pages on it).
    let unreachable = free_port().unwrap();
    let switch = FastPathSwitch::start(
        &stack.scratch.path,
        &stack.redis.url(),
        &stack.key_prefix,
        &[stack.envoy.admin_port, unreachable],
        &["hot".to_string()],
        Duration::from_millis(50),
        Some(free_port().unwrap()),
    )
    .unwrap();
    let switched = wait_for(
        "the switch to update one Envoy and miss the other",
        SETTLE,
        || async {
            // It has no readiness signal: refused until it listens.
            let Ok(text) = switch.metrics(&stack.http).await else {
                return Ok(None);
            };
            let done = sample(&text, "seckill_fast_path_updates_total").is_some_and(|n| n >= 1.0)
                && sample(&text, "seckill_fast_path_envoy_errors_total").is_some_and(|n| n >= 2.0);
            Ok(done.then_some(text))
        },
    )
    .await
    .unwrap();
    assert_lint_clean("the fast-path switch", &switched);
    let key = seckill_api::fast_path::runtime_key("hot");
    assert_eq!(
        runtime_value(&stack.http, stack.envoy.admin_port, &key)
            .await
            .unwrap()
            .as_deref(),
        Some("100"),
        "hot is sold out in Redis, so the reachable Envoy answers it natively"
    );
    assert_eq!(
        value(&switched, "seckill_fast_path_sold_out{goods=\"hot\"}"),
        1.0
    );

    // The dashboard and the alert rules read only what these scrapes have.
    let mut exported = exposed_names(&text);
    exported.extend(exposed_names(&envoy));
    exported.extend(exposed_names(&switched));
    for (source, query) in dashboard_queries(true).into_iter().chain(alert_queries()) {
        let names = metric_names_in(&query);
        assert!(!names.is_empty(), "{source} names no metric: {query}");
        let unknown: Vec<&String> = names.difference(&exported).collect();
        assert!(
            unknown.is_empty(),
            "{source} reads {unknown:?}, which neither the syncer, Envoy nor the fast-path switch exports: {query}"
        );
    }
}

/// While the broker is away the relay's outbox gauge shows what waits in Redis; once it is
/// back, every order reaches MySQL and the writer's deduct-to-MySQL histogram counts each one
/// with at least the time it waited.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn outbox_and_deduct_to_mysql_follow_a_broker_outage() {
    let p = Arc::new(Pipeline::start("metrics-outage").await.unwrap());
    p.open_sale("g", 20, 1).await.unwrap();
    p.broker.stop();
    let orders = p.sell("g", "b", 12).await.unwrap();
    assert_eq!(orders.len(), 12);
    let sold = Instant::now();

    let relay = p
        .spawn(
            Role::Relay {
                name: "relay-0".into(),
            },
            None,
            &[],
        )
        .await
        .unwrap();
    let waiting = wait_for(
        "the outbox gauge to show the waiting events",
        SETTLE,
        || async {
            let length = p.outbox_len("g").await?;
            let text = relay.metrics().await?;
            let gauge = sample(&text, "seckill_outbox_length{goods_id=\"g\"}");
            Ok((gauge == Some(length as f64)).then_some((length, text)))
        },
    )
    .await;
    let (length, text) = waiting.unwrap();
    assert_eq!(length, 12, "every sale waits in the outbox");
    assert_lint_clean("the relay", &text);

    p.broker.resume().await.unwrap();
    let away = sold.elapsed();
    let writer = p
        .spawn(
            Role::Write {
                batch_size: 100,
                batch_wait_ms: 50,
            },
            None,
            &[],
        )
        .await
        .unwrap();
    let drained = wait_for("the orders to reach MySQL", SETTLE, || async {
        let relayed = relay.metrics().await?;
        let written = writer.metrics().await?;
        let done = sample(&relayed, "seckill_outbox_length{goods_id=\"g\"}") == Some(0.0)
            && sample(&written, "seckill_deduct_to_mysql_seconds_count") == Some(12.0)
            && (0..3).all(|partition| {
                sample(
                    &written,
                    &format!("seckill_consumer_lag{{partition=\"{partition}\"}}"),
                ) == Some(0.0)
            });
        Ok(done.then_some(written))
    })
    .await;
    let written = drained.unwrap();
    assert_lint_clean("the writer", &written);
    assert_eq!(
        p.order_rows("g").await.unwrap(),
        (12, 12),
        "every order is in MySQL once"
    );
    // Each order waited at least as long as the broker was away after the last sale (less a
    // millisecond of rounding in the event's timestamp).
    let floor = away.as_secs_f64() - 0.001;
    assert!(floor > 1.0, "the outage lasted {away:?}");
    let sum = value(&written, "seckill_deduct_to_mysql_seconds_sum");
    assert!(
        sum >= 12.0 * floor,
        "12 orders waited {sum} s in all, at least {floor} s each expected"
    );
    assert_eq!(
        value(&written, "seckill_deduct_to_mysql_seconds_bucket{le=\"1\"}"),
        0.0,
        "no order reached MySQL within a second while the broker was away"
    );
}

/// The dashboard's queries (with `variables`, its template variables' too), each with where it
/// is.
fn dashboard_queries(variables: bool) -> Vec<(String, String)> {
    let path = workspace_root().join(DASHBOARD);
    let text = std::fs::read_to_string(&path).unwrap();
    let dashboard: Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    let mut queries = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        if panel["type"] == "row" {
            continue;
        }
        let title = panel["title"].as_str().expect("every panel has a title");
        let targets = panel["targets"]
            .as_array()
            .expect("every panel has targets");
        assert!(!targets.is_empty(), "panel {title} has no query");
        for target in targets {
            let expr = target["expr"].as_str().expect("every target has an expr");
            queries.push((format!("dashboard panel {title:?}"), expr.to_owned()));
        }
    }
    if variables {
        for variable in dashboard["templating"]["list"]
            .as_array()
            .expect("templating")
        {
            if let Some(query) = variable["definition"].as_str() {
                queries.push((
                    format!("dashboard variable {}", variable["name"]),
                    query.to_owned(),
                ));
            }
        }
    }
    queries
}

fn alert_queries() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(workspace_root().join(ALERT_RULES)).unwrap();
    rule_expressions(&text)
        .unwrap()
        .into_iter()
        .map(|expr| (format!("alert rule in {ALERT_RULES}"), expr))
        .collect()
}

/// promtool parses every query of the dashboard and of the alert rules, and the rules pass
/// their unit tests (drift only at rest, a breaker open for a minute, dead letters, a stalled
/// writer); the dashboard shows what a sale is watched by and the rules page on what matters.
#[test]
fn dashboard_and_alert_rules_pass_promtool() {
    let root = workspace_root();
    let checked = prometheus::check_rules(&root.join(ALERT_RULES)).unwrap();
    assert!(checked.success, "{}", checked.output);
    let tested = prometheus::test_rules(&root.join(ALERT_RULE_TESTS)).unwrap();
    assert!(
        tested.success && tested.output.contains("SUCCESS"),
        "{}",
        tested.output
    );

    // The dashboard's queries as recording rules: promtool parses each one's PromQL.
    let queries = dashboard_queries(false);
    let mut rules = String::from("groups:\n- name: dashboard\n  rules:\n");
    for (n, (_, query)) in queries.iter().enumerate() {
        let expr = serde_json::to_string(&without_grafana_variables(query)).unwrap();
        rules.push_str(&format!(
            "  - record: dashboard:query_{n}\n    expr: {expr}\n"
        ));
    }
    let scratch = seckill_e2e::process::Scratch::new("seckill-dashboard").unwrap();
    let path = scratch.path.join("dashboard-rules.yml");
    std::fs::write(&path, rules).unwrap();
    let parsed = prometheus::check_rules(&path).unwrap();
    assert!(parsed.success, "dashboard queries: {}", parsed.output);

    let shown: BTreeSet<String> = queries
        .iter()
        .flat_map(|(_, query)| metric_names_in(query))
        .collect();
    for wanted in [
        "seckill_redis_stock",
        "seckill_outcome",
        "seckill_deduct_total",
        "seckill_deduct_duration_seconds_bucket",
        "seckill_consumer_lag",
        "seckill_deduct_to_mysql_seconds_bucket",
        "seckill_reconcile_drift",
        "seckill_reconcile_dead_letters",
        "seckill_breaker_open",
        "seckill_outbox_length",
    ] {
        assert!(shown.contains(wanted), "the dashboard shows no {wanted}");
    }
    let rules = std::fs::read_to_string(root.join(ALERT_RULES)).unwrap();
    for alert in [
        "SeckillDriftAtRest",
        "SeckillWriterLagging",
        "SeckillDeadLetters",
        "SeckillBreakerOpen",
        "SeckillFastPathSwitchFailing",
    ] {
        assert!(
            rules.contains(&format!("- alert: {alert}\n")),
            "no alert {alert}"
        );
    }
}
