//! Reconcile against real Redis, Tansu and MariaDB: what it sees (a goods Redis forgot, each
//! order's buyer and state, dead letters), what `--repair` restores, and the MySQL sweep of
//! reservations Redis forgot.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use redis::AsyncCommands;
use seckill_e2e::pipeline::{differences, findings, Pipeline, FAST_SWEEPER};
use seckill_e2e::process::wait_for;
use seckill_e2e::stack::now_ms;
use seckill_e2e::syncer::{Role, SyncerProcess};
use serde_json::Value;
use sqlx::Row;

const DRAIN: Duration = Duration::from_secs(120);

/// The relay, the writer and the periodic reconcile (every second) in one process.
async fn pipeline_process(p: &Pipeline, env: &[(&str, &str)]) -> SyncerProcess {
    p.spawn(Role::Serve { pipeline: true }, None, env)
        .await
        .unwrap()
}

/// The value of one series (name and labels exactly as exposed) in a Prometheus text.
fn series(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

/// Waits until the process exposes `name` with `value`.
async fn wait_for_series(process: &SyncerProcess, name: &str, value: f64) {
    wait_for(&format!("{name} to read {value}"), DRAIN, || async {
        Ok((series(&process.metrics().await?, name) == Some(value)).then_some(()))
    })
    .await
    .unwrap();
}

/// Runs reconcile with `args` until it reports settled; returns its exit code and report.
async fn settled_reconcile(p: &Pipeline, args: &[&str]) -> (i32, Value) {
    wait_for("reconcile to settle", DRAIN, || async {
        let (code, report) = p.reconcile(args)?;
        Ok((report["settled"] == true).then_some((code, report)))
    })
    .await
    .unwrap()
}

/// One goods' part of a report.
fn goods<'a>(report: &'a Value, goods_id: &str) -> &'a Value {
    report["goods"]
        .as_array()
        .and_then(|all| all.iter().find(|g| g["goods_id"] == goods_id))
        .unwrap_or_else(|| panic!("no goods {goods_id} in {report}"))
}

/// Every row of these goods: order id -> (buyer, request, quantity, state, reason, units
/// returned, reserved at).
type Rows = HashMap<
    String,
    (
        String,
        String,
        u32,
        String,
        Option<String>,
        Option<bool>,
        String,
    ),
>;

async fn rows(p: &Pipeline, goods_ids: &[&str]) -> Rows {
    let mut all = HashMap::new();
    for goods_id in goods_ids {
        let found = sqlx::query(
            "SELECT order_id, user_id, request_id, quantity, state, release_reason, \
             stock_returned, DATE_FORMAT(reserved_at, '%Y-%m-%d %H:%i:%s.%f') \
             FROM orders WHERE goods_id = ?",
        )
        .bind(goods_id)
        .fetch_all(&p.db.pool)
        .await
        .unwrap();
        for row in found {
            all.insert(
                row.get(0),
                (
                    row.get(1),
                    row.get(2),
                    row.get(3),
                    row.get(4),
                    row.get(5),
                    row.get(6),
                    row.get(7),
                ),
            );
        }
    }
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reconcile_sees_other_buyers_dead_letters_and_a_goods_redis_forgot() {
    let p = Arc::new(
        Pipeline::start_with("reconcile-sees", FAST_SWEEPER)
            .await
            .unwrap(),
    );
    p.open_sale("g", 100, 1).await.unwrap();
    let serve = pipeline_process(&p, &[]).await;
    let orders = p.sell("g", "u", 20).await.unwrap();
    p.wait_for_rows("g", 20, DRAIN).await.unwrap();
    p.wait_for_counters_to_match("g", DRAIN).await.unwrap();
    let (code, report) = settled_reconcile(&p, &["--orders"]).await;
    let digest = &goods(&report, "g")["orders"];
    assert_eq!(code, 0, "clean at rest: {report}");
    assert_eq!(
        (&digest["redis_live"], &digest["mysql_rows"]),
        (&20.into(), &20.into())
    );
    assert_eq!(differences(digest), [0; 4]);

    // Accidents the counters cannot show: an order id naming another buyer, a row in another
    // state, a row Redis never issued. Nothing else is adjusted.
    let epoch = orders[0].split('.').nth(1).unwrap();
    let ghost = format!("g.{epoch}.9999");
    let buyer = rows(&p, &["g"]).await[&orders[0]].0.clone();
    p.change_order_row(
        "UPDATE orders SET user_id = 'intruder' WHERE order_id = ?",
        &orders[0],
    )
    .await
    .unwrap();
    p.change_order_row(
        "UPDATE orders SET state = 'confirmed' WHERE order_id = ?",
        &orders[1],
    )
    .await
    .unwrap();
    p.change_order_row(
        "INSERT INTO orders (order_id, goods_id, user_id, quantity, request_id, state, \
         reserved_at) VALUES (?, 'g', 'ghost', 1, 'ghost', 'reserved', NOW(3))",
        &ghost,
    )
    .await
    .unwrap();
    let (code, report) = p.reconcile(&[]).unwrap();
    assert_eq!(code, 0, "the totals alone cannot see these: {report}");
    let (code, report) = p.reconcile(&["--orders"]).unwrap();
    let digest = &goods(&report, "g")["orders"];
    assert_eq!(code, 2, "the digest sees them: {report}");
    assert_eq!(differences(digest), [0, 1, 1, 1], "{digest}");
    let expected: BTreeSet<(String, String)> = [
        ("identity_differs", &orders[0]),
        ("state_differs", &orders[1]),
        ("missing_from_redis", &ghost),
    ]
    .into_iter()
    .map(|(kind, order)| (kind.to_owned(), order.clone()))
    .collect();
    assert_eq!(findings(digest), expected);
    sqlx::query("UPDATE orders SET user_id = ? WHERE order_id = ?")
        .bind(&buyer)
        .bind(&orders[0])
        .execute(&p.db.pool)
        .await
        .unwrap();
    p.change_order_row(
        "UPDATE orders SET state = 'reserved' WHERE order_id = ?",
        &orders[1],
    )
    .await
    .unwrap();
    p.change_order_row("DELETE FROM orders WHERE order_id = ?", &ghost)
        .await
        .unwrap();

    // A message the writer cannot parse lands in the dead-letter topic: never clean again
    // until someone deals with it.
    p.broker
        .publish_sale_message("g", b"{not json")
        .await
        .unwrap();
    let (code, report) = wait_for("the dead letter to be counted", DRAIN, || async {
        let (code, report) = p.reconcile(&["--orders"])?;
        Ok((report["dead_letters"] == 1).then_some((code, report)))
    })
    .await
    .unwrap();
    assert_eq!(code, 2, "{report}");
    assert!(
        goods(&report, "g")["orders"]["examples"]
            .as_array()
            .unwrap()
            .is_empty(),
        "{report}"
    );
    wait_for_series(&serve, "seckill_reconcile_dead_letters", 1.0).await;
    wait_for_series(&serve, "seckill_reconcile_clean", 0.0).await;

    // Redis forgets everything, as a restart without persistence would.
    let mut conn = p.redis.connection().await.unwrap();
    let () = redis::cmd("FLUSHALL").query_async(&mut conn).await.unwrap();
    let (code, report) = p.reconcile(&["--orders"]).unwrap();
    let g = goods(&report, "g");
    assert_eq!(code, 2, "{report}");
    assert_eq!(g["missing_from_redis"], true, "{report}");
    assert_eq!(g["redis"], Value::Null);
    assert_eq!(
        (&g["drift"]["available"], &g["drift"]["reserved"]),
        (&(-20).into(), &20.into()),
        "all of MySQL's side is unmatched"
    );
    assert_eq!(differences(&g["orders"]), [0, 20, 0, 0], "{report}");
    wait_for_series(
        &serve,
        "seckill_reconcile_missing_from_redis{goods_id=\"g\"}",
        1.0,
    )
    .await;
    wait_for_series(&serve, "seckill_reconcile_drift{goods_id=\"g\"}", 40.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn repair_restores_each_deleted_order_in_its_state() {
    let p = Arc::new(Pipeline::start_with("repair", FAST_SWEEPER).await.unwrap());
    // g: reserved, confirmed and cancelled orders; x: orders whose 1 s window ran out while
    // the sale was open; l: orders cancelled after their sale closed (their units lapsed).
    let now = now_ms();
    p.define_sale("g", 100, 1, now + 3_600_000, 900)
        .await
        .unwrap();
    p.define_sale("x", 100, 1, now + 3_600_000, 1)
        .await
        .unwrap();
    let closes_at = now_ms() + 5_000;
    p.define_sale("l", 100, 1, closes_at, 900).await.unwrap();
    let l = p.sell("l", "u", 5).await.unwrap();
    let g = p.sell("g", "u", 15).await.unwrap();
    let x = p.sell("x", "u", 5).await.unwrap();
    assert_eq!((g.len(), x.len(), l.len()), (15, 5, 5));
    // The outbox holds the events until the relay starts.
    let _processes = p.spawn_relay_and_writer(1_000, 50).await.unwrap();
    for (orders, action) in [(&g[0..5], "confirm"), (&g[5..10], "cancel")] {
        for order in orders {
            assert_eq!(p.settle(order, action).await.unwrap().0, 200);
        }
    }
    wait_for("sale l to close", DRAIN, || async {
        Ok((now_ms() > closes_at + 100).then_some(()))
    })
    .await
    .unwrap();
    for order in &l {
        let (status, body) = p.settle(order, "cancel").await.unwrap();
        assert_eq!(status, 200, "{body}");
    }
    wait_for("x's reservations to expire", DRAIN, || async {
        Ok((p.redis_counters("x").await?.1 == 0).then_some(()))
    })
    .await
    .unwrap();
    for goods_id in ["g", "x", "l"] {
        p.wait_for_counters_to_match(goods_id, DRAIN).await.unwrap();
    }
    let before = rows(&p, &["g", "x", "l"]).await;
    let state = |order: &str| {
        let row = &before[order];
        (row.3.as_str(), row.4.as_deref(), row.5)
    };
    assert_eq!(state(&g[0]), ("confirmed", None, None));
    assert_eq!(state(&g[5]), ("released", Some("cancelled"), Some(true)));
    assert_eq!(state(&g[10]), ("reserved", None, None));
    assert_eq!(state(&x[0]), ("released", Some("expired"), Some(true)));
    assert_eq!(state(&l[0]), ("released", Some("cancelled"), Some(false)));

    // An operator's accident: rows in each state deleted, and a confirmed row set back to
    // reserved, nothing else adjusted.
    let deleted = [
        &g[10], &g[11], &g[0], &g[1], &g[5], &g[6], &x[0], &x[1], &l[0], &l[1],
    ];
    for order in deleted {
        p.change_order_row("DELETE FROM orders WHERE order_id = ?", order)
            .await
            .unwrap();
    }
    p.change_order_row(
        "UPDATE orders SET state = 'reserved' WHERE order_id = ?",
        &g[2],
    )
    .await
    .unwrap();
    let (code, report) = settled_reconcile(&p, &["--orders"]).await;
    assert_eq!(code, 2, "{report}");
    for (goods_id, expected) in [
        ("g", [6, 0, 0, 1]),
        ("x", [2, 0, 0, 0]),
        ("l", [2, 0, 0, 0]),
    ] {
        assert_eq!(
            differences(&goods(&report, goods_id)["orders"]),
            expected,
            "{goods_id}: {report}"
        );
    }

    p.reconcile(&["--repair"]).unwrap();
    for goods_id in ["g", "x", "l"] {
        p.wait_for_counters_to_match(goods_id, DRAIN).await.unwrap();
    }
    let (code, report) = settled_reconcile(&p, &["--orders"]).await;
    assert_eq!(code, 0, "clean after the repair: {report}");
    let after = rows(&p, &["g", "x", "l"]).await;
    for order in deleted.iter().chain([&&g[2]]) {
        let (was, now) = (&before[*order], &after[*order]);
        // Buyer, request, quantity, state, reason and whether the units came back.
        assert_eq!(
            (&was.0, &was.1, was.2, &was.3, &was.4, was.5),
            (&now.0, &now.1, now.2, &now.3, &now.4, now.5),
            "{order}"
        );
    }
    for order in [&g[10], &g[11]] {
        assert_eq!(
            before[order].6, after[order].6,
            "{order} keeps its reservation time"
        );
    }
    assert_eq!(after.len(), before.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mysql_ends_reservations_redis_forgot_and_only_those() {
    let p = Arc::new(
        Pipeline::start_with("forgotten", FAST_SWEEPER)
            .await
            .unwrap(),
    );
    // 2 s payment windows; c closes in 4 s.
    p.define_sale("g", 100, 1, now_ms() + 3_600_000, 2)
        .await
        .unwrap();
    let closes_at = now_ms() + 4_000;
    p.define_sale("c", 100, 1, closes_at, 2).await.unwrap();
    let (a, b, c) = (
        p.buy("g", "ua", "ra").await.unwrap().unwrap(),
        p.buy("g", "ub", "rb").await.unwrap().unwrap(),
        p.buy("c", "uc", "rc").await.unwrap().unwrap(),
    );
    // The Redis sweeper must not end them: take them off its schedule (Redis still holds
    // their reservations).
    let mut conn = p.redis.connection().await.unwrap();
    let key = |goods: &str, suffix: &str| format!("{}:{{{goods}}}:{suffix}", p.prefix);
    for (goods, order) in [("g", &a), ("g", &b), ("c", &c)] {
        let removed: u64 = conn.zrem(key(goods, "expiries"), order).await.unwrap();
        assert_eq!(removed, 1);
    }
    let serve = pipeline_process(&p, &[("SECKILL_FORGOTTEN_GRACE_S", "1")]).await;
    p.wait_for_rows("g", 2, DRAIN).await.unwrap();
    p.wait_for_rows("c", 1, DRAIN).await.unwrap();
    wait_for("sale c to close", DRAIN, || async {
        Ok((now_ms() > closes_at + 100).then_some(()))
    })
    .await
    .unwrap();
    // Redis forgets a and c; it still holds b, whose window has ended as well.
    for (goods, order) in [("g", &a), ("c", &c)] {
        let removed: u64 = conn.hdel(key(goods, "reservations"), order).await.unwrap();
        assert_eq!(removed, 1);
    }

    let ended = |order: String| {
        let p = p.clone();
        async move {
            let found = p.mysql_orders(order.split('.').next().unwrap()).await?;
            Ok(found
                .get(&order)
                .filter(|(state, _)| state == "released")
                .map(|_| ()))
        }
    };
    wait_for("a to be ended in MySQL", DRAIN, || ended(a.clone()))
        .await
        .unwrap();
    wait_for("c to be ended in MySQL", DRAIN, || ended(c.clone()))
        .await
        .unwrap();
    // Two more passes change nothing.
    let passes = |text: &str| series(text, "seckill_forgotten_sweep_passes_total").unwrap_or(0.0);
    let from = passes(&serve.metrics().await.unwrap());
    wait_for("two more sweep passes", DRAIN, || async {
        Ok((passes(&serve.metrics().await?) >= from + 2.0).then_some(()))
    })
    .await
    .unwrap();

    let after = rows(&p, &["g", "c"]).await;
    let state = |order: &str| {
        let row = &after[order];
        (row.3.as_str(), row.4.as_deref(), row.5)
    };
    assert_eq!(
        state(&a),
        ("released", Some("expired"), Some(true)),
        "units back on sale"
    );
    assert_eq!(
        state(&c),
        ("released", Some("expired"), Some(false)),
        "the sale had closed"
    );
    assert_eq!(
        state(&b),
        ("reserved", None, None),
        "Redis still holds b: untouched"
    );
    assert_eq!(p.mysql_counters("g").await.unwrap(), (99, 1, 0, 0, 100));
    assert_eq!(p.mysql_counters("c").await.unwrap(), (99, 0, 0, 1, 100));
    let text = serve.metrics().await.unwrap();
    let outcome = |o: &str| {
        series(
            &text,
            &format!("seckill_forgotten_reservations_total{{outcome=\"{o}\"}}"),
        )
    };
    assert_eq!(
        (outcome("expired"), outcome("lapsed")),
        (Some(1.0), Some(1.0))
    );
}
