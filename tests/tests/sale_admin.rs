//! Sale controls as an operator drives them, through the admin API and the built
//! `seckill-syncer sale` binary, against a private Redis and a fresh MariaDB database:
//!
//! - bad input (negative, zero, huge quantities, unknown goods, bad ids, a sale that ended,
//!   a definition whose end has passed) gets a clear error and changes nothing, in Redis or
//!   in MySQL;
//! - the list shows every sale with its state, a page at a time;
//! - an add-stock or a pause cut short between MySQL and Redis (the CLI aborted at the crash
//!   point) is shown (status lists the pending addition, reconcile the drift) and completed by
//!   the same command again, which adds nothing twice;
//! - a control waits for a load of Redis under way, and a preheat carries the pause.

use seckill_e2e::process::wait_for;
use seckill_e2e::stack::{now_ms, rfc3339, wait_past, CliRun, Stack, StackOptions};
use serde_json::{json, Value};
use std::time::Duration;

const CRASH_AFTER_MYSQL: (&str, &str) = ("SECKILL_CRASH_AT", "control-after-mysql");
const CRASH_AT_PREHEAT: (&str, &str) = ("SECKILL_CRASH_AT", "preheat-after-epoch");

/// Every sale row and stock addition MySQL holds, and every key of the stack in Redis: what a
/// refused control must leave as it found it.
async fn snapshot(stack: &Stack) -> (Vec<String>, Vec<String>, Vec<(String, String)>) {
    let sales: Vec<String> = sqlx::query_scalar(
        "SELECT CONCAT_WS('|', goods_id, total_stock, stock, reserved, sold, lapsed, starts_at,
           ends_at, COALESCE(paused_at, '-'), COALESCE(pause_retry_s, '-'),
           COALESCE(stopped_at, '-'), epoch)
         FROM sales ORDER BY goods_id",
    )
    .fetch_all(&stack.db.pool)
    .await
    .unwrap();
    let additions: Vec<String> = sqlx::query_scalar(
        "SELECT CONCAT_WS('|', goods_id, operation_id, quantity) FROM stock_additions
         ORDER BY goods_id, operation_id",
    )
    .fetch_all(&stack.db.pool)
    .await
    .unwrap();
    (sales, additions, stack.redis_snapshot().await.unwrap())
}

fn spec(starts_at_ms: i64, ends_at_ms: i64) -> Value {
    json!({
        "total_stock": 10, "per_user_limit": 1,
        "starts_at": rfc3339(starts_at_ms), "ends_at": rfc3339(ends_at_ms),
    })
}

async fn define(stack: &Stack, goods: &str, spec: &Value) {
    let (status, body) = stack
        .admin()
        .unwrap()
        .try_define(goods, spec)
        .await
        .unwrap();
    assert_eq!(status, 201, "define {goods}: {body}");
}

fn assert_cli_refused(run: &CliRun, code: i32, says: &str) {
    assert_eq!(run.code, Some(code), "{run:?}");
    assert!(run.stderr.contains(says), "expected {says:?} in {run:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_controls_get_a_clear_error_and_change_nothing() {
    let stack = Stack::start(StackOptions::new("controls-bad"))
        .await
        .unwrap();
    let admin = stack.admin().unwrap();
    let now = now_ms();
    define(&stack, "g", &spec(now - 60_000, now + 3_600_000)).await;
    stack.preheat("g", false).await.unwrap();
    define(&stack, "stopped", &spec(now - 60_000, now + 3_600_000)).await;
    stack.preheat("stopped", false).await.unwrap();
    let run = stack.sale_cli(&["stop", "stopped"], &[]).unwrap();
    assert_eq!(
        (run.code, &run.json["state"]),
        (Some(0), &json!("stopped")),
        "{run:?}"
    );
    let ends_soon = now_ms() + 1_000;
    define(&stack, "ended", &spec(now - 60_000, ends_soon)).await;
    stack.preheat("ended", false).await.unwrap();
    wait_past(ends_soon).await.unwrap();
    // One addition on record, so a reuse of its id can be refused.
    let (status, body) = admin
        .control(
            "g",
            "add-stock",
            Some(&json!({"quantity": 2, "operation_id": "op-1"})),
        )
        .await
        .unwrap();
    assert_eq!((status, &body["added_now"]), (200, &json!(true)), "{body}");
    let before = snapshot(&stack).await;

    let add = |quantity: Value, operation: Value| json!({"quantity": quantity, "operation_id": operation});
    let refusals: Vec<(&str, &str, Option<Value>, u16, &str)> = vec![
        (
            "g",
            "add-stock",
            Some(add(json!(0), json!("op-2"))),
            400,
            "quantity must be from 1",
        ),
        (
            "g",
            "add-stock",
            Some(add(json!(-5), json!("op-2"))),
            400,
            "quantity",
        ),
        (
            "g",
            "add-stock",
            Some(add(json!(1_000_000_001u64), json!("op-2"))),
            400,
            "quantity must be from 1",
        ),
        (
            "g",
            "add-stock",
            Some(add(json!(999_999_999u64), json!("op-2"))),
            400,
            "above 1000000000",
        ),
        (
            "g",
            "add-stock",
            Some(add(json!(1.5), json!("op-2"))),
            400,
            "quantity",
        ),
        (
            "g",
            "add-stock",
            Some(json!({"quantity": 1})),
            400,
            "operation_id",
        ),
        (
            "g",
            "add-stock",
            Some(add(json!(1), json!("bad id"))),
            400,
            "operation_id may only contain",
        ),
        (
            "g",
            "add-stock",
            Some(add(json!(1), json!("x".repeat(129)))),
            400,
            "operation_id is longer",
        ),
        (
            "g",
            "add-stock",
            Some(json!({"quantity": 1, "operation_id": "op-2", "force": true})),
            400,
            "unknown field",
        ),
        ("g", "add-stock", Some(json!("3")), 400, ""),
        (
            "g",
            "add-stock",
            Some(add(json!(3), json!("op-1"))),
            409,
            "already added 2 units",
        ),
        (
            "nope",
            "add-stock",
            Some(add(json!(1), json!("op-2"))),
            404,
            "no sale is defined for goods nope",
        ),
        (
            "stopped",
            "add-stock",
            Some(add(json!(1), json!("op-2"))),
            409,
            "was stopped",
        ),
        (
            "ended",
            "add-stock",
            Some(add(json!(1), json!("op-2"))),
            409,
            "has ended",
        ),
        (
            "g",
            "pause",
            Some(json!({"retry_after_s": 0})),
            400,
            "retry_after_s must be from 1 to 3600",
        ),
        (
            "g",
            "pause",
            Some(json!({"retry_after_s": 3_601})),
            400,
            "retry_after_s must be from 1 to 3600",
        ),
        (
            "g",
            "pause",
            Some(json!({"retry_after_s": "soon"})),
            400,
            "invalid type",
        ),
        (
            "g",
            "pause",
            Some(json!({"retry": 5})),
            400,
            "unknown field",
        ),
        ("nope", "pause", None, 404, "no sale"),
        ("stopped", "pause", None, 409, "was stopped"),
        ("ended", "pause", None, 409, "has ended"),
        ("nope", "resume", None, 404, "no sale"),
        ("stopped", "resume", None, 409, "does not resume"),
        ("nope", "stop", None, 404, "no sale"),
        ("a%20b", "stop", None, 400, "goods_id may only contain"),
    ];
    for (goods, action, body, status, says) in refusals {
        let (got, answer) = admin.control(goods, action, body.as_ref()).await.unwrap();
        let message = answer["message"].as_str().unwrap_or_default();
        assert!(
            got == status && message.contains(says),
            "{action} {goods} {body:?}: expected {status} saying {says:?}, got {got} {answer}"
        );
    }
    // The routes are the admin API's: no secret, no control.
    let anonymous = stack
        .http
        .post(format!(
            "{}/admin/sales/g/pause",
            stack.syncer().unwrap().url()
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(anonymous.status().as_u16(), 401);
    // A definition whose end has passed: refused, nothing saved.
    let (status, body) = admin
        .try_define("old", &spec(now - 7_200_000, now - 3_600_000))
        .await
        .unwrap();
    assert_eq!(status, 400, "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("already ended cannot be defined"),
        "{body}"
    );
    assert_eq!(
        admin.list("").await.unwrap().1["sales"]
            .as_array()
            .unwrap()
            .len(),
        3
    );

    // The same refusals through the CLI: exit 1 with the reason (2: clap's own refusal).
    let cli: Vec<(Vec<&str>, i32, &str)> = vec![
        (
            vec!["add-stock", "g", "--quantity", "0"],
            1,
            "quantity must be from 1",
        ),
        (vec!["add-stock", "g", "--quantity=-5"], 2, "invalid value"),
        (
            vec!["add-stock", "g", "--quantity", "999999999"],
            1,
            "above 1000000000",
        ),
        (
            vec!["add-stock", "nope", "--quantity", "1"],
            1,
            "no sale is defined for goods nope",
        ),
        (
            vec![
                "add-stock",
                "g",
                "--quantity",
                "3",
                "--operation-id",
                "op-1",
            ],
            1,
            "already added 2 units",
        ),
        (
            vec!["add-stock", "ended", "--quantity", "1"],
            1,
            "has ended",
        ),
        (
            vec!["pause", "g", "--retry-after-s", "0"],
            1,
            "retry_after_s must be from 1",
        ),
        (vec!["resume", "stopped"], 1, "does not resume"),
        (vec!["stop", "nope"], 1, "no sale"),
        (vec!["status", "nope"], 1, "no sale"),
        (
            vec![
                "define",
                "old",
                "--total-stock",
                "5",
                "--per-user-limit",
                "1",
                "--starts-at",
                "2020-01-01T00:00:00Z",
                "--ends-at",
                "2020-01-02T00:00:00Z",
            ],
            1,
            "already ended cannot be defined",
        ),
        (
            vec![
                "define",
                "old",
                "--total-stock",
                "5",
                "--per-user-limit",
                "1",
                "--starts-at",
                "now",
                "--ends-at",
                "tomorrow",
            ],
            2,
            "not RFC 3339",
        ),
        (
            vec![
                "define",
                "old",
                "--total-stock",
                "5",
                "--per-user-limit",
                "1",
                "--starts-at",
                "now",
                "--ends-at",
                "now+1h",
                "--tier",
                "fast",
            ],
            2,
            "unknown tier",
        ),
    ];
    for (args, code, says) in cli {
        let run = stack.sale_cli(&args, &[]).unwrap();
        assert_cli_refused(&run, code, says);
    }
    assert_eq!(
        snapshot(&stack).await,
        before,
        "the refusals changed nothing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_list_shows_every_sale_with_its_state() {
    let stack = Stack::start(StackOptions::new("controls-list"))
        .await
        .unwrap();
    let admin = stack.admin().unwrap();
    let now = now_ms();
    // Defined through the CLI (a db goods), the rest through the API.
    let run = stack
        .sale_cli(
            &[
                "define",
                "g-db",
                "--total-stock",
                "4",
                "--per-user-limit",
                "1",
                "--starts-at",
                "now",
                "--ends-at",
                "now+1h",
                "--tier",
                "db",
            ],
            &[],
        )
        .unwrap();
    assert_eq!(
        (run.code, &run.json["tier"]),
        (Some(0), &json!("db")),
        "{run:?}"
    );
    define(&stack, "a-defined", &spec(now - 60_000, now + 3_600_000)).await;
    let ends_soon = now_ms() + 1_000;
    for (goods, window) in [
        ("b-scheduled", (now + 3_600_000, now + 7_200_000)),
        ("c-open", (now - 60_000, now + 3_600_000)),
        ("d-paused", (now - 60_000, now + 3_600_000)),
        ("e-stopped", (now - 60_000, now + 3_600_000)),
        ("f-ended", (now - 60_000, ends_soon)),
    ] {
        define(&stack, goods, &spec(window.0, window.1)).await;
        stack.preheat(goods, false).await.unwrap();
    }
    stack.preheat("g-db", false).await.unwrap();
    let run = stack
        .sale_cli(&["pause", "d-paused", "--retry-after-s", "30"], &[])
        .unwrap();
    assert_eq!(
        (run.code, &run.json["state"], &run.json["pause_retry_s"]),
        (Some(0), &json!("paused"), &json!(30)),
        "{run:?}"
    );
    let (status, body) = admin.control("e-stopped", "stop", None).await.unwrap();
    assert_eq!((status, &body["state"]), (200, &json!("stopped")), "{body}");
    wait_past(ends_soon).await.unwrap();

    let expected = [
        ("a-defined", "defined"),
        ("b-scheduled", "scheduled"),
        ("c-open", "open"),
        ("d-paused", "paused"),
        ("e-stopped", "stopped"),
        ("f-ended", "ended"),
        ("g-db", "open"),
    ];
    let states = |sales: &Value| -> Vec<(String, String)> {
        sales
            .as_array()
            .unwrap()
            .iter()
            .map(|s| {
                (
                    s["goods_id"].as_str().unwrap().to_owned(),
                    s["state"].as_str().unwrap().to_owned(),
                )
            })
            .collect()
    };
    let expected: Vec<(String, String)> = expected
        .iter()
        .map(|(g, s)| (g.to_string(), s.to_string()))
        .collect();
    let (status, listed) = admin.list("").await.unwrap();
    assert_eq!(status, 200, "{listed}");
    assert_eq!(states(&listed["sales"]), expected, "{listed}");
    assert_eq!(listed["next"], Value::Null);
    // Each with MySQL's counters and Redis's: none for a goods Redis holds nothing of.
    let by_goods = |goods: &str| {
        listed["sales"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["goods_id"] == goods)
            .unwrap()
            .clone()
    };
    assert_eq!(by_goods("c-open")["live"]["available"], 10, "{listed}");
    assert_eq!(
        by_goods("d-paused")["live"]["pause_retry_ms"],
        30_000,
        "{listed}"
    );
    assert_eq!(by_goods("a-defined")["live"], Value::Null, "{listed}");
    assert_eq!(by_goods("g-db")["live"], Value::Null, "{listed}");
    assert_eq!(by_goods("g-db")["stock"], 4, "{listed}");

    // A page at a time.
    let (_, first) = admin.list("limit=3").await.unwrap();
    assert_eq!(states(&first["sales"]), expected[..3], "{first}");
    assert_eq!(first["next"], "c-open");
    let (_, rest) = admin.list("limit=5&after=c-open").await.unwrap();
    assert_eq!(states(&rest["sales"]), expected[3..], "{rest}");
    assert_eq!(rest["next"], Value::Null);
    for bad in [
        "limit=0",
        "limit=501",
        "limit=x",
        "after=a%20b",
        "order=desc",
    ] {
        let (status, body) = admin.list(bad).await.unwrap();
        assert_eq!(status, 400, "{bad}: {body}");
    }

    // The CLI lists the same, and shows one sale.
    let run = stack.sale_cli(&["list"], &[]).unwrap();
    assert_eq!(run.code, Some(0), "{run:?}");
    assert_eq!(states(&run.json), expected, "{run:?}");
    let run = stack.sale_cli(&["status", "d-paused"], &[]).unwrap();
    assert_eq!(run.code, Some(0), "{run:?}");
    assert_eq!(
        (
            &run.json["definition"]["state"],
            &run.json["definition"]["pause_retry_s"]
        ),
        (&json!("paused"), &json!(30)),
        "{run:?}"
    );
    // The table, for people.
    let output = std::process::Command::new(seckill_e2e::syncer::syncer_binary().unwrap())
        .args([
            "sale",
            "--redis-url",
            &stack.redis.url(),
            "--mysql-url",
            &stack.db.url(),
        ])
        .args(["--key-prefix", &stack.key_prefix, "list"])
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{table}");
    assert_eq!(table.lines().count(), 1 + expected.len(), "{table}");
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("d-paused") && l.contains(" paused ")),
        "{table}"
    );
}

/// The CLI aborted right after MySQL took an add-stock (or a pause): MySQL holds it, Redis
/// does not, and that shows; the same command again completes it, adding nothing twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_control_cut_short_after_mysql_is_shown_and_completed_by_its_retry() {
    let stack = Stack::start(StackOptions::for_a_crowd("controls-crash"))
        .await
        .unwrap();
    let admin = stack.admin().unwrap();
    let now = now_ms();
    define(&stack, "r", &spec(now - 60_000, now + 3_600_000)).await;
    stack.preheat("r", false).await.unwrap();
    let sharded = json!({
        "total_stock": 9, "per_user_limit": 1, "tier": "redis_sharded", "shards": 3,
        "starts_at": rfc3339(now - 60_000), "ends_at": rfc3339(now + 3_600_000),
    });
    define(&stack, "s", &sharded).await;
    stack.preheat("s", false).await.unwrap();
    for goods in ["r", "s"] {
        for n in 0..3 {
            let won = stack
                .buy(goods, &format!("u{n}"), 1, &format!("{goods}-r{n}"))
                .await
                .unwrap();
            assert_eq!(won.outcome, "won", "{won:?}");
        }
    }

    for (goods, total) in [("r", 10), ("s", 9)] {
        let operation = format!("{goods}-op");
        let add = [
            "add-stock",
            goods,
            "--quantity",
            "4",
            "--operation-id",
            &operation,
        ];
        let cut = stack.sale_cli(&add, &[CRASH_AFTER_MYSQL]).unwrap();
        assert_eq!(
            cut.code, None,
            "the CLI aborted at the crash point: {cut:?}"
        );
        let status = admin.sale(goods).await.unwrap();
        assert_eq!(
            (
                &status["definition"]["total_stock"],
                &status["live"]["total"]
            ),
            (&json!(total + 4), &json!(total)),
            "MySQL has the units, Redis not yet: {status}"
        );
        assert_eq!(
            status["pending_additions"],
            json!([{"operation_id": operation, "quantity": 4}]),
            "{status}"
        );
        let (code, report) = wait_for(
            "reconcile to see the drift",
            Duration::from_secs(60),
            || async {
                let (code, report) = stack.reconcile(&["--goods", goods])?;
                let drift = &report["goods"][0]["drift"];
                Ok((drift["available"] == 4).then_some((code, report.clone())))
            },
        )
        .await
        .unwrap();
        assert_eq!(code, 2, "reconcile is not clean: {report}");

        let retry = stack.sale_cli(&add, &[]).unwrap();
        assert_eq!(retry.code, Some(0), "{retry:?}");
        assert_eq!(
            (
                &retry.json["added_now"],
                &retry.json["redis"],
                &retry.json["total_stock"]
            ),
            (&json!(false), &json!("applied"), &json!(total + 4)),
            "{retry:?}"
        );
        let again = stack.sale_cli(&add, &[]).unwrap();
        assert_eq!(again.code, Some(0), "{again:?}");
        let status = admin.sale(goods).await.unwrap();
        assert_eq!(
            (&status["live"]["total"], &status["live"]["available"]),
            (&json!(total + 4), &json!(total + 4 - 3)),
            "the units were added once: {status}"
        );
        assert_eq!(status["pending_additions"], Value::Null, "{status}");
        wait_for(
            "reconcile to be clean",
            Duration::from_secs(120),
            || async {
                let (code, _) = stack.reconcile(&["--goods", goods])?;
                Ok((code == 0).then_some(()))
            },
        )
        .await
        .unwrap();
    }

    // A pause cut short: MySQL says paused, Redis still sells; nobody was told it paused.
    let cut = stack
        .sale_cli(&["pause", "r"], &[CRASH_AFTER_MYSQL])
        .unwrap();
    assert_eq!(cut.code, None, "{cut:?}");
    let status = admin.sale("r").await.unwrap();
    assert_eq!(
        (
            &status["definition"]["state"],
            &status["live"]["pause_retry_ms"]
        ),
        (&json!("paused"), &json!(0)),
        "{status}"
    );
    let run = stack.sale_cli(&["pause", "r"], &[]).unwrap();
    assert_eq!(
        (run.code, &run.json["changed"], &run.json["redis"]),
        (Some(0), &json!(false), &json!("applied")),
        "{run:?}"
    );
    let paused = stack.buy("r", "u9", 1, "r-r9").await.unwrap();
    assert_eq!(
        (paused.status, paused.outcome.as_str()),
        (403, "paused"),
        "{paused:?}"
    );
}

/// A preheat that took its epoch from MySQL and stopped before loading Redis (aborted at the
/// crash point): a pause recorded now could be overwritten by that load, so its Redis step
/// waits for it, then answers incomplete, changing nothing in Redis. The next preheat reads
/// the pause from MySQL and loads the sale paused; the same pause again completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_control_waits_for_a_load_under_way_and_a_preheat_carries_the_pause() {
    let stack = Stack::start(StackOptions::new("controls-behind"))
        .await
        .unwrap();
    let now = now_ms();
    define(&stack, "p", &spec(now - 60_000, now + 3_600_000)).await;
    let cut = stack
        .command("preheat")
        .unwrap()
        .args(["--goods", "p"])
        .env(CRASH_AT_PREHEAT.0, CRASH_AT_PREHEAT.1)
        .output()
        .unwrap();
    assert_eq!(
        cut.status.code(),
        None,
        "the preheat aborted after its epoch"
    );

    let started = std::time::Instant::now();
    let run = stack.sale_cli(&["pause", "p"], &[]).unwrap();
    assert_cli_refused(&run, 1, "a load under epoch 1 may still come");
    assert!(
        started.elapsed() >= Duration::from_secs(5),
        "it waited for the load"
    );
    let status = stack.admin().unwrap().sale("p").await.unwrap();
    assert_eq!(
        (&status["definition"]["state"], &status["live"]),
        (&json!("paused"), &Value::Null),
        "MySQL holds the pause, Redis nothing: {status}"
    );

    let preheated = stack.preheat("p", false).await.unwrap();
    assert_eq!(
        (&preheated["epoch"], &preheated["live"]["pause_retry_ms"]),
        (&json!(2), &json!(10_000)),
        "the preheat loaded the sale paused: {preheated}"
    );
    let buyer = stack.buy("p", "u1", 1, "r1").await.unwrap();
    assert_eq!(
        (
            buyer.status,
            buyer.outcome.as_str(),
            buyer.retry_after.as_deref()
        ),
        (403, "paused", Some("10")),
        "{buyer:?}"
    );
    let run = stack.sale_cli(&["pause", "p"], &[]).unwrap();
    assert_eq!(
        (run.code, &run.json["changed"], &run.json["redis"]),
        (Some(0), &json!(false), &json!("applied")),
        "{run:?}"
    );
    let run = stack.sale_cli(&["resume", "p"], &[]).unwrap();
    assert_eq!(run.code, Some(0), "{run:?}");
    let buyer = stack.buy("p", "u1", 1, "r1").await.unwrap();
    assert_eq!(buyer.outcome, "won", "{buyer:?}");
}
