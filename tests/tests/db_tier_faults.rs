//! The `db` tier when MySQL or the syncer goes away under it. A syncer reaches MySQL through a
//! TCP proxy the test cuts in the middle of a crowd (open connections closed, new ones
//! refused) and then restores; another dies right after MySQL committed a batch, before any
//! of its buyers heard. Buyers retry with the same request id, and each must meet what MySQL
//! decided: nobody gets two orders, no unit is sold twice, and every winner has its row.
//! Real MariaDB, Redis and syncers.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use seckill_e2e::pipeline::Pipeline;
use seckill_e2e::process::wait_for;
use seckill_e2e::stack::{now_ms, EDGE_SECRET};
use seckill_e2e::syncer::Role;
use seckill_e2e::tcp_proxy::TcpProxy;
use serde_json::{json, Value};
use sqlx::Row;

const GOODS: &str = "dbcut";
const STOCK: usize = 60;
/// Buyers before the cut, all answered.
const EARLY: usize = 20;
/// Buyers in the crowd the cut lands in.
const CROWD: usize = 130;
/// How long a buyer keeps retrying its request id through 503s.
const PATIENCE: Duration = Duration::from_secs(60);

/// A buyer's final answer: (outcome, order id).
type Final = (String, Option<String>);

/// One buyer: retries its request id through 503s until a final answer. Counts the 503s.
async fn buy(http: &reqwest::Client, url: &str, user: &str, unavailable: &AtomicUsize) -> Final {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let sent = http
            .post(format!("{url}{}", seckill_api::DEDUCT_PATH))
            .header(seckill_api::SECRET_HEADER, EDGE_SECRET)
            .json(&json!({"goods_id": GOODS, "user_id": user, "quantity": 1,
                          "request_id": format!("{user}-r0")}))
            .send()
            .await
            .unwrap();
        let status = sent.status().as_u16();
        let body: Value = sent.json().await.unwrap();
        if status == 200 {
            let outcome = body["outcome"].as_str().unwrap_or_default().to_owned();
            return (outcome, body["order_id"].as_str().map(str::to_owned));
        }
        assert_eq!(status, 503, "{user}: {body}");
        unavailable.fetch_add(1, Ordering::Relaxed);
        assert!(
            Instant::now() < deadline,
            "{user} got 503 for {PATIENCE:?}: {body}"
        );
        // A poll inside the buyer's deadline: a 503 asks for a retry in a moment.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One attempt on `url`; None when no answer came back (the syncer died under it).
async fn attempt(http: &reqwest::Client, url: &str, user: &str, request: &str) -> Option<Value> {
    let sent = http
        .post(format!("{url}{}", seckill_api::DEDUCT_PATH))
        .header(seckill_api::SECRET_HEADER, EDGE_SECRET)
        .json(&json!({"goods_id": GOODS, "user_id": user, "quantity": 1, "request_id": request}))
        .send()
        .await
        .ok()?;
    sent.json().await.ok()
}

async fn rows(p: &Pipeline) -> usize {
    sqlx::query("SELECT COUNT(*) FROM orders WHERE goods_id = ?")
        .bind(GOODS)
        .fetch_one(&p.db.pool)
        .await
        .unwrap()
        .get::<i64, _>(0) as usize
}

async fn open_db_sale(label: &str, stock: usize) -> Pipeline {
    let p = Pipeline::start(label).await.unwrap();
    let window = (now_ms() - 60_000, now_ms() + 3_600_000);
    let admin = p.admin();
    admin
        .define_sale_tier(GOODS, stock as u64, 1, window, 900, Some("db"))
        .await
        .unwrap();
    admin.preheat(GOODS, false).await.unwrap();
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_mysql_cut_mid_crowd_loses_no_decision_and_sells_no_unit_twice() {
    let p = open_db_sale("dbcut", STOCK).await;
    let mysql = "127.0.0.1:3306";
    let proxy = TcpProxy::start(mysql.parse().unwrap()).await.unwrap();
    let via_proxy = p.db.url().replace(mysql, &proxy.addr.to_string());
    assert_ne!(via_proxy, p.db.url());
    let gate = p
        .spawn(Role::Serve { pipeline: false }, Some(&via_proxy), &[])
        .await
        .unwrap();
    let url = gate.url();
    let unavailable = Arc::new(AtomicUsize::new(0));

    let mut finals: BTreeMap<String, Final> = BTreeMap::new();
    for i in 0..EARLY {
        let user = format!("early-{i}");
        let answer = buy(&p.http, &url, &user, &unavailable).await;
        finals.insert(user, answer);
    }
    assert_eq!(rows(&p).await, EARLY);

    // The crowd; the cut lands as soon as MySQL holds a row of it, with the rest of the crowd
    // queued or in flight.
    let crowd: Vec<_> = (0..CROWD)
        .map(|i| {
            let (http, url, unavailable) = (p.http.clone(), url.clone(), unavailable.clone());
            tokio::spawn(async move {
                let user = format!("crowd-{i}");
                let answer = buy(&http, &url, &user, &unavailable).await;
                (user, answer)
            })
        })
        .collect();
    wait_for("the crowd's first row", Duration::from_secs(30), || async {
        Ok((rows(&p).await > EARLY).then_some(()))
    })
    .await
    .unwrap();
    proxy.cut();
    let rows_at_cut = rows(&p).await;
    // Cut until buyers have been told 503: their batches lost MySQL.
    wait_for(
        "buyers to meet the cut",
        Duration::from_secs(30),
        || async { Ok((unavailable.load(Ordering::Relaxed) >= 5).then_some(())) },
    )
    .await
    .unwrap();
    proxy.restore();
    for task in crowd {
        let (user, answer) = task.await.unwrap();
        finals.insert(user, answer);
    }
    assert!(
        rows_at_cut < STOCK,
        "the cut landed before the sale was over ({rows_at_cut} rows)"
    );

    // Exactly the stock won, once per buyer, each with an order of its own.
    let winners: BTreeMap<&String, &String> = finals
        .iter()
        .filter(|(_, (outcome, _))| outcome == "won")
        .map(|(user, (_, order))| (user, order.as_ref().expect("a winner has its order id")))
        .collect();
    let others: Vec<&Final> = finals
        .values()
        .filter(|(outcome, _)| outcome != "won")
        .collect();
    assert_eq!(winners.len(), STOCK, "{finals:?}");
    assert!(
        others.iter().all(|(outcome, _)| outcome == "sold_out"),
        "{others:?}"
    );
    let distinct: HashSet<&&String> = winners.values().collect();
    assert_eq!(distinct.len(), STOCK, "no order id told to two buyers");

    // MySQL holds exactly the winners' orders, each naming its buyer and request id.
    let held = sqlx::query("SELECT order_id, user_id, request_id FROM orders WHERE goods_id = ?")
        .bind(GOODS)
        .fetch_all(&p.db.pool)
        .await
        .unwrap();
    let held: BTreeMap<String, (String, String)> = held
        .iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2))))
        .collect();
    assert_eq!(held.len(), STOCK, "one row per unit: {held:?}");
    for (user, order) in &winners {
        let (buyer, request) = held.get(*order).expect("every winner's order is a row");
        assert_eq!((buyer, request), (*user, &format!("{user}-r0")));
    }
    let counters = sqlx::query("SELECT stock, reserved FROM sales WHERE goods_id = ?")
        .bind(GOODS)
        .fetch_one(&p.db.pool)
        .await
        .unwrap();
    let (stock, reserved): (i64, i64) = (counters.get(0), counters.get(1));
    assert_eq!((stock, reserved), (0, STOCK as i64));

    // Every buyer asking again with its request id hears what it heard.
    let unavailable = AtomicUsize::new(0);
    for (user, first) in &finals {
        let again = buy(&p.http, &url, user, &unavailable).await;
        assert_eq!(&again, first, "{user} asked again");
    }
}

/// The syncer aborts right after MySQL committed its first batch: those buyers never hear
/// their answer. Retried on another syncer with the same request ids, each finds the order
/// MySQL holds for it, and nothing is sold twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn answers_lost_with_a_syncer_after_the_commit_are_found_by_the_retries() {
    const BUYERS: usize = 12;
    let p = open_db_sale("dbcrash", 8).await;
    let crash = [("SECKILL_CRASH_AT", "db-decide-after-commit")];
    let mut doomed = p
        .spawn(Role::Serve { pipeline: false }, None, &crash)
        .await
        .unwrap();
    let doomed_url = doomed.url();
    let lost = futures::future::join_all((0..BUYERS).map(|i| {
        let (http, url) = (p.http.clone(), doomed_url.clone());
        async move { attempt(&http, &url, &format!("b{i}"), &format!("b{i}-r0")).await }
    }))
    .await;
    doomed
        .wait_exit(
            "the syncer to abort at its crash point",
            Duration::from_secs(30),
        )
        .await
        .unwrap();
    assert!(
        lost.iter()
            .all(|answer| answer.as_ref().is_none_or(|a| a["outcome"] != "won")),
        "nobody heard won from the syncer that died after the commit: {lost:?}"
    );
    // What MySQL decided before anyone heard.
    let committed: BTreeMap<String, String> =
        sqlx::query("SELECT request_id, order_id FROM orders WHERE goods_id = ?")
            .bind(GOODS)
            .fetch_all(&p.db.pool)
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
    assert!(!committed.is_empty(), "the crash point is after a commit");

    let unavailable = AtomicUsize::new(0);
    let mut finals = BTreeMap::new();
    for i in 0..BUYERS {
        let user = format!("b{i}");
        finals.insert(
            user.clone(),
            buy(&p.http, &p.api.url(), &user, &unavailable).await,
        );
    }
    for (request, order) in &committed {
        let user = request.trim_end_matches("-r0");
        assert_eq!(
            finals[user],
            ("won".to_owned(), Some(order.clone())),
            "{user} gets the order MySQL committed for its request"
        );
    }
    let won = finals.values().filter(|(o, _)| o == "won").count();
    let sold_out = finals.values().filter(|(o, _)| o == "sold_out").count();
    assert_eq!((won, sold_out), (8, BUYERS - 8), "{finals:?}");
    assert_eq!(rows(&p).await, 8, "one row per unit");
}
