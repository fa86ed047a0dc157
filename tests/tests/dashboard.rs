//! The live sale dashboard in a real browser: a sale on the real pipeline (redis-server,
//! Tansu, MariaDB, the syncer's relay and writer), the page opened in headless Chromium, and
//! the figures it draws checked against what the syncer answered and what the stores hold.

use std::collections::HashMap;
use std::time::Duration;

use seckill_e2e::browser::{dom_field, Chromium};
use seckill_e2e::pipeline::Pipeline;
use seckill_e2e::process::{free_port, wait_for, workspace_root};
use serde_json::Value;

const GOODS: &str = "dash-phone";
/// Units on sale: fewer than the buyers, so some are sold out.
const STOCK: u64 = 6;
const BUYERS: usize = 8;
/// Virtual time the page runs before Chromium reads it: a few polls.
const PAGE_BUDGET: Duration = Duration::from_secs(4);

#[tokio::test(flavor = "multi_thread")]
async fn the_dashboard_shows_a_live_sale_as_the_syncer_counts_it() {
    // A reconcile every second, so drift and Kafka lag are fresh on the page. The page and
    // /metrics on a listener of their own (an operator's network), without a credential: a
    // browser opens it as an operator would.
    let board = format!("127.0.0.1:{}", free_port().unwrap());
    let p = Pipeline::start_custom(
        "dashboard",
        &[],
        &[("SECKILL_METRICS_SECRET", "")],
        &["--reconcile-every-s", "1", "--metrics-listen", &board],
    )
    .await
    .expect("the pipeline fixture starts");
    let board = format!("http://{board}");
    let (_relay, mut writer) = p.spawn_relay_and_writer(100, 50).await.unwrap();
    p.open_sale(GOODS, STOCK, 1).await.unwrap();

    // Buyers one after another: the first STOCK win, the rest find it sold out; then a winner
    // tries again with a new request id (a duplicate).
    let mut answers: HashMap<String, u64> = HashMap::new();
    let mut orders = Vec::new();
    for i in 0..BUYERS {
        let user = format!("buyer-{i}");
        let (status, body) = p.deduct_once(GOODS, &user, &user).await.unwrap();
        assert_eq!(status, 200, "{body}");
        *answers.entry(outcome(&body)).or_default() += 1;
        orders.extend(body["order_id"].as_str().map(str::to_owned));
    }
    let (_, again) = p
        .deduct_once(GOODS, "buyer-0", "buyer-0-again")
        .await
        .unwrap();
    *answers.entry(outcome(&again)).or_default() += 1;
    assert_eq!(
        (answers["won"], answers["sold_out"], answers["duplicate"]),
        (STOCK, (BUYERS as u64) - STOCK, 1)
    );
    // Three paid, one cancelled: available 1, reserved 2, sold 3 (all different, so a page
    // that shows one figure in another's place is caught).
    for order in &orders[..3] {
        assert_eq!(p.settle(order, "confirm").await.unwrap().0, 200);
    }
    assert_eq!(p.settle(&orders[3], "cancel").await.unwrap().0, 200);

    // The pipeline drains and the syncer's own reconcile says so.
    let data_url = format!("{board}/dashboard/data");
    wait_for(
        "the dashboard to show the sale settled",
        Duration::from_secs(120),
        || async {
            let data: Value = p.http.get(&data_url).send().await?.json().await?;
            let goods = &data["goods"][0];
            let settled = data["sync"]["settled"] == true
                && goods["drift"]["total"] == 0
                && goods["mysql"]["sold"] == 3
                && goods["redis"] == goods["mysql"];
            Ok(settled.then_some(()))
        },
    )
    .await
    .unwrap();
    let redis = p.redis_counters(GOODS).await.unwrap();
    let mysql = p.mysql_counters(GOODS).await.unwrap();
    assert_eq!(
        (redis.0, redis.1, redis.2),
        (1, 2, 3),
        "available, reserved, sold"
    );

    // The page loads nothing from elsewhere, and it is not on the API's listener.
    let on_api = p.http.get(format!("{}/dashboard", p.api.url())).send();
    assert_eq!(on_api.await.unwrap().status(), 404);
    let page = p
        .http
        .get(format!("{board}/dashboard"))
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 200);
    let policy = page.headers()["content-security-policy"].to_str().unwrap();
    assert!(policy.contains("default-src 'none'"), "{policy}");

    let chromium = Chromium::locate(&p.scratch.path).unwrap();
    let url = format!("{board}/dashboard");
    let dom = chromium.dump_dom(&url, PAGE_BUDGET).await.unwrap();
    check_figures(&dom, redis, mysql, &answers);
    assert_eq!(shown(&dom, Some(GOODS), "outbox"), "0 events");
    assert_eq!(shown(&dom, Some(GOODS), "drift"), "0");
    assert_eq!(shown(&dom, None, "sync.kafka_lag"), "0");
    assert_eq!(shown(&dom, None, "sync.dead_letters"), "0");
    for chart in ["stock", "answers"] {
        let drawn = dom
            .split(&format!("data-chart=\"{chart}\""))
            .nth(1)
            .and_then(|rest| rest.split("</svg>").next())
            .unwrap_or_default();
        assert!(
            drawn.contains("<polyline"),
            "the {chart} chart has lines: {drawn}"
        );
    }

    // With the writer stopped, one more winner: Redis moves, MySQL does not, the event waits
    // in Kafka. The page shows each store's own figures and the lag between them.
    writer.kill();
    let (status, body) = p
        .deduct_once(GOODS, "late-buyer", "late-buyer")
        .await
        .unwrap();
    assert_eq!((status, outcome(&body).as_str()), (200, "won"), "{body}");
    *answers.entry("won".into()).or_default() += 1;
    wait_for(
        "the dashboard to show the event in Kafka",
        Duration::from_secs(60),
        || async {
            let data: Value = p.http.get(&data_url).send().await?.json().await?;
            let waiting = data["sync"]["kafka_lag"] == 1
                && data["goods"][0]["outbox"] == 0
                && data["goods"][0]["redis"]["available"] == 0;
            Ok(waiting.then_some(()))
        },
    )
    .await
    .unwrap();
    let redis = p.redis_counters(GOODS).await.unwrap();
    let mysql = p.mysql_counters(GOODS).await.unwrap();
    assert_eq!((redis.0, redis.1, redis.2), (0, 3, 3));
    assert_eq!(
        (mysql.0, mysql.1, mysql.2),
        (1, 2, 3),
        "MySQL has not moved"
    );
    let dom = chromium.dump_dom(&url, PAGE_BUDGET).await.unwrap();
    check_figures(&dom, redis, mysql, &answers);
    assert_eq!(shown(&dom, None, "sync.kafka_lag"), "1");
    assert_eq!(
        shown(&dom, Some(GOODS), "drift"),
        "2 (events in flight)",
        "one unit moved from available to reserved in Redis only"
    );

    let screenshot = workspace_root().join("target").join("dashboard.png");
    chromium
        .screenshot(&url, &screenshot, (1280, 1100), PAGE_BUDGET)
        .await
        .unwrap();
    let png = std::fs::read(&screenshot).unwrap();
    assert!(
        png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 10_000,
        "a PNG of the page ({} bytes)",
        png.len()
    );
    println!("dashboard screenshot: {}", screenshot.display());
}

/// Redis's and MySQL's (available, reserved, sold, lapsed, total), as the harness reads them.
type Counters = (i64, i64, i64, i64, i64);

/// The sale's figures on the page equal the stores' and the answers the syncer gave.
fn check_figures(dom: &str, redis: Counters, mysql: Counters, answers: &HashMap<String, u64>) {
    assert!(
        dom.contains("data-state=\"live\""),
        "the page polled: {dom}"
    );
    let answered = |outcome: &str| answers.get(outcome).copied().unwrap_or(0) as i64;
    let figures = [
        ("stock.available", redis.0),
        ("stock.reserved", redis.1),
        ("stock.sold", redis.2),
        ("stock.total", redis.4),
        ("redis.available", redis.0),
        ("redis.reserved", redis.1),
        ("redis.sold", redis.2),
        ("redis.lapsed", redis.3),
        ("mysql.available", mysql.0),
        ("mysql.reserved", mysql.1),
        ("mysql.sold", mysql.2),
        ("mysql.lapsed", mysql.3),
        ("total.won", answered("won")),
        ("total.sold_out", answered("sold_out")),
        ("total.duplicate", answered("duplicate")),
        ("total.error", 0),
    ];
    for (field, expected) in figures {
        assert_eq!(
            shown(dom, Some(GOODS), field),
            expected.to_string(),
            "{field} on the page"
        );
    }
}

/// The text of a field on the page; fails when the page does not show it.
fn shown(dom: &str, goods: Option<&str>, field: &str) -> String {
    dom_field(dom, goods, field).unwrap_or_else(|| panic!("the page shows {field}:\n{dom}"))
}

fn outcome(body: &Value) -> String {
    body["outcome"].as_str().unwrap_or("none").to_owned()
}
