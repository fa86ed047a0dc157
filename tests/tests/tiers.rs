//! Tiers per goods, through the real gate: Envoy with the filter, the syncer with its whole
//! pipeline (relay, writer, sweeper, claims), a private Redis, a Tansu broker and a fresh
//! MariaDB database. A `db` goods is decided by MySQL alone (nothing of it in Redis); a
//! `dual_write` goods is decided by Redis and its order row is in MySQL before the winner
//! reaches the shop. Each gets the same crowd and the same lifecycle as a `redis` goods, and
//! the counts must be exact: winners, rows, per-user limits, repeat answers, counters.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use futures::future::join_all;
use seckill_e2e::process::wait_for;
use seckill_e2e::stack::{now_ms, rfc3339, Stack, StackOptions, ADMIN_SECRET, EDGE_SECRET};
use serde_json::{json, Value};
use sqlx::Row;

/// Units of the crowd's goods.
const STOCK: usize = 60;
/// Units one buyer may hold.
const LIMIT: usize = 2;
/// Buyers in the crowd: a third retry one request id three times at once, a third try three
/// different request ids (past the limit), a third try once. 350 attempts for 60 units.
const USERS: usize = 150;
/// Orders confirmed, and orders cancelled, after the crowd.
const CONFIRMED: usize = 10;
const CANCELLED: usize = 10;
/// Buyers the shop fails.
const SHOP_FAILS: usize = 5;
/// The claim window of the syncer: a reservation the gate never claims is released after it.
const CLAIM_WINDOW_MS: &str = "5000";
const DRAIN: Duration = Duration::from_secs(120);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tier {
    Redis,
    Db,
    DualWrite,
}

impl Tier {
    fn name(self) -> &'static str {
        match self {
            Tier::Redis => "redis",
            Tier::Db => "db",
            Tier::DualWrite => "dual_write",
        }
    }
}

/// What a buyer got back through Envoy.
#[derive(Debug, Clone)]
struct Answer {
    user: String,
    request_id: String,
    status: u16,
    /// `x-seckill-outcome`.
    outcome: String,
    /// `x-seckill-order-id` on the answer (a winner's, and one the shop failed).
    order_id: Option<String>,
    body: Value,
}

/// How long a buyer keeps retrying with the same request id while the gate answers 503.
const BUYER_PATIENCE: Duration = Duration::from_secs(60);

/// One buyer through Envoy, retrying with the same request id while the gate itself answers
/// 503 `unavailable` (a call cut short on a loaded machine; the gate tells buyers to retry,
/// and the retry must meet whatever the first attempt got); the final answer.
async fn buy(stack: &Stack, goods: &str, user: &str, request_id: &str) -> Answer {
    let deadline = std::time::Instant::now() + BUYER_PATIENCE;
    loop {
        let answer = buy_once(stack, goods, user, request_id).await;
        if (answer.status, answer.outcome.as_str()) != (503, "unavailable") {
            return answer;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{user} got 503 for {BUYER_PATIENCE:?}: {answer:?}"
        );
        // A poll inside the buyer's deadline: a 503 asks for a retry in a moment.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn buy_once(stack: &Stack, goods: &str, user: &str, request_id: &str) -> Answer {
    let request = stack
        .http
        .post(format!("{}/seckill/{goods}/buy", stack.envoy.url()))
        .header("x-user-id", user)
        .header("x-request-id", request_id);
    let answer = seckill_e2e::stack::send(request).await.unwrap();
    Answer {
        user: user.to_owned(),
        request_id: request_id.to_owned(),
        status: answer.status,
        outcome: answer.outcome,
        order_id: answer.order_id,
        body: answer.body,
    }
}

/// Sends every (user, request id) at once.
async fn buy_all(stack: &Arc<Stack>, goods: &str, attempts: &[(String, String)]) -> Vec<Answer> {
    join_all(attempts.iter().map(|(user, request)| {
        let stack = stack.clone();
        let (goods, user, request) = (goods.to_owned(), user.clone(), request.clone());
        async move { buy(&stack, &goods, &user, &request).await }
    }))
    .await
}

/// The stack: the syncer with its pipeline, a 5 s claim window and a 50 ms sweeper; the
/// filter without a sold-out cache (a winner's retry must reach the syncer, which answers it
/// from the idempotency record: the cache's trade-off is the edge tests' business) and
/// without a rate limit that could bite (the edge tests cover those). The shop
/// looks each order id up in MySQL when it arrives.
async fn start(label: &str) -> Arc<Stack> {
    let mut options = StackOptions::new(label);
    options.pipeline = true;
    options.plugin_config["sold_out_cache_ms"] = json!(0);
    // The crowd's first attempts arrive before any answer has confirmed the goods to the
    // filter: they must not meet the small bucket of unconfirmed goods ids either.
    options.plugin_config["rate_limit"]["unconfirmed"] =
        json!({ "per_second": 1_000_000.0, "burst": 1_000_000 });
    options.syncer_env = vec![
        ("SECKILL_CLAIM_WINDOW_MS", CLAIM_WINDOW_MS.to_owned()),
        ("SECKILL_SWEEP_EVERY_MS", "50".to_owned()),
    ];
    let stack = Stack::start(options).await.expect("the stack starts");
    stack.shop.probe_orders(stack.db.pool.clone());
    Arc::new(stack)
}

/// Defines a sale of `tier`, open from a minute ago for an hour, through the admin API.
async fn define(stack: &Stack, goods: &str, tier: Tier, stock: usize, limit: usize, window_s: u32) {
    let now = now_ms();
    let response = stack
        .http
        .put(format!(
            "{}/admin/sales/{goods}",
            stack.syncer().unwrap().url()
        ))
        .header(seckill_api::SECRET_HEADER, ADMIN_SECRET)
        .json(&json!({
            "total_stock": stock,
            "per_user_limit": limit,
            "starts_at": rfc3339(now - 60_000),
            "ends_at": rfc3339(now + 3_600_000),
            "payment_window_s": window_s,
            "tier": tier.name(),
        }))
        .send()
        .await
        .unwrap();
    let status = response.status();
    let body = response.text().await.unwrap();
    assert!(
        status.is_success(),
        "define {goods} ({}): {status} {body}",
        tier.name()
    );
}

/// One attempt on the syncer's single deduct endpoint (not through Envoy).
async fn deduct_direct(stack: &Stack, goods: &str, user: &str, request_id: &str) -> (u16, Value) {
    let response = stack
        .http
        .post(format!(
            "{}{}",
            stack.syncer().unwrap().url(),
            seckill_api::DEDUCT_PATH
        ))
        .header(seckill_api::SECRET_HEADER, EDGE_SECRET)
        .json(&json!({"goods_id": goods, "user_id": user, "quantity": 1, "request_id": request_id}))
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap())
}

/// MySQL's (stock, reserved, sold, lapsed, total) of a sale.
async fn mysql_counters(stack: &Stack, goods: &str) -> (i64, i64, i64, i64, i64) {
    let row = sqlx::query(
        "SELECT stock, reserved, sold, lapsed, CAST(total_stock AS SIGNED) FROM sales WHERE goods_id = ?",
    )
    .bind(goods)
    .fetch_one(&stack.db.pool)
    .await
    .unwrap();
    (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4))
}

/// Redis's (available, reserved, sold, lapsed, total) of a sale.
async fn redis_counters(stack: &Stack, goods: &str) -> (i64, i64, i64, i64, i64) {
    let mut conn = stack.redis().await.unwrap();
    redis::cmd("HMGET")
        .arg(stack.goods_key(goods, "sale"))
        .arg(&["available", "reserved", "sold", "lapsed", "total"])
        .query_async(&mut conn)
        .await
        .unwrap()
}

/// One order row.
#[derive(Debug, Clone, PartialEq, Eq)]
struct OrderRow {
    user: String,
    request_id: String,
    quantity: u32,
    state: String,
    reason: Option<String>,
}

async fn order_rows(stack: &Stack, goods: &str) -> BTreeMap<String, OrderRow> {
    sqlx::query(
        "SELECT order_id, user_id, request_id, quantity, state, release_reason FROM orders
         WHERE goods_id = ?",
    )
    .bind(goods)
    .fetch_all(&stack.db.pool)
    .await
    .unwrap()
    .iter()
    .map(|row| {
        (
            row.get(0),
            OrderRow {
                user: row.get(1),
                request_id: row.get(2),
                quantity: row.get(3),
                state: row.get(4),
                reason: row.get(5),
            },
        )
    })
    .collect()
}

/// The counters where the tier keeps them are `expected` (available, reserved, sold, lapsed,
/// total), and conserved: MySQL's at once for `db`; Redis's at once for `dual_write`, and
/// MySQL's once the pipeline has brought them (the rows are there before; the counters follow
/// the events).
async fn assert_counters(
    stack: &Stack,
    goods: &str,
    tier: Tier,
    expected: (i64, i64, i64, i64, i64),
) {
    let conserved = |(a, r, s, l, t): (i64, i64, i64, i64, i64)| a + r + s + l == t;
    assert!(
        conserved(expected),
        "the expectation itself conserves: {expected:?}"
    );
    if tier == Tier::DualWrite {
        assert_eq!(
            redis_counters(stack, goods).await,
            expected,
            "Redis's counters of {goods}"
        );
    }
    if tier == Tier::DualWrite {
        let caught_up = wait_for("MySQL's counters to follow Redis's", DRAIN, || async {
            Ok((mysql_counters(stack, goods).await == expected).then_some(()))
        })
        .await;
        if let Err(e) = caught_up {
            eprintln!("{e:#}");
        }
    }
    let mysql = mysql_counters(stack, goods).await;
    assert_eq!(mysql, expected, "MySQL's counters of {goods}");
}

/// Nothing of a `db` goods is in Redis: no key names it, the index of preheated sales does not
/// list it.
async fn assert_nothing_in_redis(stack: &Stack, goods: &str) {
    let mut conn = stack.redis().await.unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{}:*", stack.key_prefix))
        .query_async(&mut conn)
        .await
        .unwrap();
    let named: Vec<&String> = keys.iter().filter(|k| k.contains(goods)).collect();
    assert!(
        named.is_empty(),
        "Redis holds keys of db goods {goods}: {named:?}"
    );
    let listed: bool = redis::cmd("SISMEMBER")
        .arg(format!("{}:sales", stack.key_prefix))
        .arg(goods)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(!listed, "Redis's sales index lists db goods {goods}");
}

/// Waits until the order's row is `released` for `reason`.
async fn wait_released(stack: &Stack, goods: &str, order: &str, reason: &str) {
    let released = wait_for(
        &format!("{order} to be released ({reason}) in MySQL"),
        DRAIN,
        || async {
            let rows = order_rows(stack, goods).await;
            let row = rows.get(order);
            Ok(row
                .filter(|r| r.state == "released" && r.reason.as_deref() == Some(reason))
                .map(|_| ()))
        },
    )
    .await;
    if let Err(e) = released {
        let rows = order_rows(stack, goods).await;
        panic!("{e:#}: the row is {:?}", rows.get(order));
    }
}

/// The shop's requests for one goods: order id -> (users it came with, times it arrived).
fn shop_orders(stack: &Stack, goods: &str) -> HashMap<String, (HashSet<String>, usize)> {
    let mut orders: HashMap<String, (HashSet<String>, usize)> = HashMap::new();
    for seen in stack.shop.seen() {
        if seen.header(seckill_api::GOODS_ID_HEADER) != Some(goods) {
            continue;
        }
        let order = seen
            .header(seckill_api::ORDER_ID_HEADER)
            .expect("a forwarded request has an order id");
        let entry = orders.entry(order.to_owned()).or_default();
        entry.0.insert(
            seen.header(seckill_api::USER_ID_HEADER)
                .unwrap_or_default()
                .to_owned(),
        );
        entry.1 += 1;
    }
    orders
}

/// The crowd's attempts, one buyer's side by side (sent at once, they arrive together, while
/// units are left): a third retry one request id three times (a client that did not hear
/// back), a third make three purchases (the third must not pass the limit), a third buy once.
fn crowd(goods: &str) -> Vec<(String, String)> {
    let mut attempts = Vec::new();
    for u in 0..USERS {
        let user = format!("{goods}-u{u}");
        let requests: Vec<String> = match u % 3 {
            0 => vec![format!("{user}-r0"); 3],
            1 => (0..3).map(|k| format!("{user}-r{k}")).collect(),
            _ => vec![format!("{user}-r0")],
        };
        attempts.extend(requests.into_iter().map(|r| (user.clone(), r)));
    }
    attempts
}

/// Whether a crowd buyer makes three purchases.
fn is_greedy(user: &str) -> bool {
    let number = user
        .rsplit("-u")
        .next()
        .and_then(|n| n.parse::<usize>().ok());
    number.expect("a crowd buyer") % 3 == 1
}

async fn sale_through_envoy(tier: Tier) {
    let stack = start(&format!("tier-{}", tier.name().replace('_', ""))).await;
    let goods = format!("{}-g", tier.name().replace('_', "-"));
    let short = format!("{}-short", tier.name().replace('_', "-"));
    let goods = goods.as_str();
    let short = short.as_str();
    // Defined but not preheated: unknown, like a redis goods (a goods of its own: asking about
    // it makes the syncer look its sales up again, which must not be what makes the goods
    // below work).
    let early = format!("{}-early", tier.name().replace('_', "-"));
    define(&stack, &early, tier, 1, 1, 900).await;
    let (status, reply) = deduct_direct(&stack, &early, "early", "early-r0").await;
    assert_eq!(
        (status, reply["outcome"].as_str()),
        (200, Some("unknown_goods")),
        "{reply}"
    );
    // The goods under test are defined, preheated and on sale at once, as an operator opens
    // a sale: the syncer must decide them by their tier from the first attempt.
    define(&stack, goods, tier, STOCK, LIMIT, 900).await;
    // A second goods whose reservations expire after a second.
    define(&stack, short, tier, 3, 1, 1).await;
    for g in [goods, short] {
        let preheated = stack.preheat(g, false).await.unwrap();
        assert!(
            preheated["epoch"].as_u64().is_some_and(|e| e >= 1),
            "{preheated}"
        );
    }
    let shown = stack.admin().unwrap().sale(goods).await.unwrap();
    assert_eq!(shown["definition"]["tier"], json!(tier.name()), "{shown}");
    assert_eq!(shown["definition"]["fallback"], json!(false), "{shown}");
    if tier == Tier::Db {
        assert_nothing_in_redis(&stack, goods).await;
    }

    // 1. The crowd: 350 attempts at once for 60 units.
    let answers = buy_all(&stack, goods, &crowd(goods)).await;
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for a in &answers {
        *counts.entry(a.outcome.as_str()).or_default() += 1;
        match a.outcome.as_str() {
            "won" => {
                assert_eq!(a.status, 200, "{a:?}");
                assert!(a.order_id.is_some(), "a winner carries its order id: {a:?}");
            }
            "sold_out" | "duplicate" => {
                assert_eq!(a.status, 409, "{a:?}");
                assert_eq!(a.body["outcome"], json!(a.outcome), "{a:?}");
            }
            other => panic!("unexpected outcome {other}: {a:?}"),
        }
    }
    // Order id -> (user, request id) that won it; every won answer for it agrees.
    let mut winners: BTreeMap<String, (String, String)> = BTreeMap::new();
    let mut won_answers: HashMap<String, usize> = HashMap::new();
    for a in answers.iter().filter(|a| a.outcome == "won") {
        let order = a.order_id.clone().unwrap();
        let owner = winners
            .entry(order.clone())
            .or_insert_with(|| (a.user.clone(), a.request_id.clone()));
        assert_eq!(
            owner,
            &(a.user.clone(), a.request_id.clone()),
            "{order} went to two requests"
        );
        *won_answers.entry(order).or_default() += 1;
    }
    assert_eq!(
        winners.len(),
        STOCK,
        "exactly the stock was won: {counts:?}"
    );
    // Repeat answers: one request id, one answer (and one order).
    type Said<'a> = (&'a str, Option<&'a str>);
    let mut by_request: HashMap<(&str, &str), HashSet<Said>> = HashMap::new();
    for a in &answers {
        by_request
            .entry((a.user.as_str(), a.request_id.as_str()))
            .or_default()
            .insert((a.outcome.as_str(), a.order_id.as_deref()));
    }
    for ((user, request), got) in &by_request {
        assert_eq!(
            got.len(),
            1,
            "{user}/{request} got different answers: {got:?}"
        );
    }
    assert!(
        won_answers.values().any(|n| *n > 1),
        "some retried request ids won (the test must exercise repeats): {won_answers:?}"
    );
    // The per-user limit, exactly: nobody above it; a buyer told `duplicate` holds all of it.
    let mut held: HashMap<&str, usize> = HashMap::new();
    for (user, _) in winners.values() {
        *held.entry(user.as_str()).or_default() += 1;
    }
    for a in &answers {
        let holds = held.get(a.user.as_str()).copied().unwrap_or(0);
        let greedy = is_greedy(&a.user);
        assert!(
            holds <= if greedy { LIMIT } else { 1 },
            "{} holds {holds}",
            a.user
        );
        if a.outcome == "duplicate" {
            assert!(greedy && holds == LIMIT, "{a:?} but holds {holds}");
        }
    }
    assert!(
        held.values().any(|n| *n == LIMIT),
        "some buyer reached the limit: {held:?}"
    );

    // The shop got exactly the winners: each won answer once, each order from its one buyer,
    // and the row was in MySQL when it arrived.
    let shop = shop_orders(&stack, goods);
    assert_eq!(shop.len(), STOCK, "distinct orders at the shop");
    for (order, (users, arrivals)) in &shop {
        let (user, _) = winners
            .get(order)
            .unwrap_or_else(|| panic!("{order} at the shop was never won"));
        assert_eq!(users, &HashSet::from([user.clone()]), "{order}");
        assert_eq!(
            *arrivals, won_answers[order],
            "{order}: one arrival per won answer"
        );
    }
    assert_rows_at_receipt(&stack);

    // MySQL holds exactly the winners, at once (both tiers write the row before answering).
    let rows = order_rows(&stack, goods).await;
    assert_eq!(rows.len(), STOCK, "MySQL rows = winners");
    for (order, (user, request)) in &winners {
        let row = rows
            .get(order)
            .unwrap_or_else(|| panic!("no row for {order}"));
        assert_eq!(
            (
                row.user.as_str(),
                row.request_id.as_str(),
                row.quantity,
                row.state.as_str()
            ),
            (user.as_str(), request.as_str(), 1, "reserved"),
            "{order}"
        );
    }
    let stock = STOCK as i64;
    assert_counters(&stack, goods, tier, (0, stock, 0, 0, stock)).await;
    if tier == Tier::Db {
        assert_nothing_in_redis(&stack, goods).await;
    }

    // 2. The lifecycle: confirm some, cancel some; repeats answer the same.
    let orders: Vec<String> = winners.keys().cloned().collect();
    let admin = stack.admin().unwrap();
    for order in &orders[..CONFIRMED] {
        let (status, body) = admin.settle(order, "confirm").await.unwrap();
        assert_eq!(
            (status, body["state"].as_str(), body["changed"].as_bool()),
            (200, Some("confirmed"), Some(true)),
            "{order}: {body}"
        );
        let (status, again) = admin.settle(order, "confirm").await.unwrap();
        assert_eq!(
            (status, again["changed"].as_bool()),
            (200, Some(false)),
            "{order}: {again}"
        );
        let (status, body) = admin.settle(order, "cancel").await.unwrap();
        assert_eq!(status, 409, "a paid order cannot be cancelled: {body}");
    }
    for order in &orders[CONFIRMED..CONFIRMED + CANCELLED] {
        let (status, body) = admin.settle(order, "cancel").await.unwrap();
        assert_eq!(
            (
                status,
                body["state"].as_str(),
                body["reason"].as_str(),
                body["changed"].as_bool()
            ),
            (200, Some("released"), Some("cancelled"), Some(true)),
            "{order}: {body}"
        );
        let (status, again) = admin.settle(order, "cancel").await.unwrap();
        assert_eq!(
            (status, again["changed"].as_bool()),
            (200, Some(false)),
            "{order}: {again}"
        );
        let (status, body) = admin.settle(order, "confirm").await.unwrap();
        assert_eq!(status, 409, "a cancelled order cannot be paid: {body}");
    }
    let (status, body) = admin
        .settle(&format!("{goods}.999.1"), "confirm")
        .await
        .unwrap();
    assert_eq!(status, 404, "{body}");
    let (confirmed, cancelled) = (CONFIRMED as i64, CANCELLED as i64);
    let live = stock - confirmed - cancelled;
    assert_counters(&stack, goods, tier, (cancelled, live, confirmed, 0, stock)).await;

    // 3. Reused request ids through Envoy: a paid order's, a cancelled order's, a live one's.
    let (user, request) = &winners[&orders[0]];
    let paid = buy(&stack, goods, user, request).await;
    assert_eq!(
        (
            paid.status,
            paid.outcome.as_str(),
            paid.body["order_id"].as_str()
        ),
        (409, "confirmed", Some(orders[0].as_str())),
        "{paid:?}"
    );
    let (user, request) = &winners[&orders[CONFIRMED]];
    let gone = buy(&stack, goods, user, request).await;
    assert_eq!(
        (
            gone.status,
            gone.outcome.as_str(),
            gone.body["order_id"].as_str(),
            gone.body["reason"].as_str()
        ),
        (
            409,
            "released",
            Some(orders[CONFIRMED].as_str()),
            Some("cancelled")
        ),
        "{gone:?}"
    );
    let last = orders.last().unwrap();
    let (user, request) = &winners[last];
    let again = buy(&stack, goods, user, request).await;
    assert_eq!(
        (
            again.status,
            again.outcome.as_str(),
            again.order_id.as_deref()
        ),
        (200, "won", Some(last.as_str())),
        "{again:?}"
    );
    assert_counters(&stack, goods, tier, (cancelled, live, confirmed, 0, stock)).await;

    // 4. The shop fails some buyers: their orders are released and the units come back; the
    // same request id then wins a new order once the shop is well.
    let failing: Vec<(String, String)> = (0..SHOP_FAILS)
        .map(|i| (format!("{goods}-sf{i}"), format!("{goods}-sf{i}-r0")))
        .collect();
    let names: Vec<&str> = failing.iter().map(|(u, _)| u.as_str()).collect();
    stack.shop.set_failing_users(&names);
    let failed = buy_all(&stack, goods, &failing).await;
    let mut failed_orders = HashMap::new();
    for a in &failed {
        assert_eq!(
            (a.status, a.outcome.as_str()),
            (503, "upstream_failed"),
            "{a:?}"
        );
        let order = a
            .order_id
            .clone()
            .expect("the failed winner's order id is named");
        failed_orders.insert(a.user.clone(), order);
    }
    let seen = shop_orders(&stack, goods);
    for (user, order) in &failed_orders {
        assert_eq!(
            seen.get(order).map(|(u, n)| (u.clone(), *n)),
            Some((HashSet::from([user.clone()]), 1)),
            "{order}"
        );
        wait_released(&stack, goods, order, "upstream_failed").await;
    }
    assert_counters(&stack, goods, tier, (cancelled, live, confirmed, 0, stock)).await;
    stack.shop.set_failing_users(&[]);
    let retried = buy_all(&stack, goods, &failing).await;
    for a in &retried {
        assert_eq!((a.status, a.outcome.as_str()), (200, "won"), "{a:?}");
        let order = a.order_id.as_deref().unwrap();
        assert_ne!(
            order, failed_orders[&a.user],
            "the retry after a shop failure is a new order"
        );
    }
    let fails = SHOP_FAILS as i64;
    assert_counters(
        &stack,
        goods,
        tier,
        (cancelled - fails, live + fails, confirmed, 0, stock),
    )
    .await;

    // 5. A reservation the gate never claims (made through the batch endpoint, as the filter
    // does, and never delivered) comes back after the claim window.
    let reply: Value = stack
        .http
        .post(format!("{}{}", stack.syncer().unwrap().url(), seckill_api::DEDUCT_BATCH_PATH))
        .header(seckill_api::SECRET_HEADER, EDGE_SECRET)
        .json(&json!({"attempts": [{"goods_id": goods, "user_id": "ghost", "quantity": 1, "request_id": "ghost-r0"}]}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let ghost = reply["replies"][0]["order_id"]
        .as_str()
        .unwrap_or_else(|| panic!("the ghost won: {reply}"))
        .to_owned();
    wait_released(&stack, goods, &ghost, "unclaimed").await;
    assert_counters(
        &stack,
        goods,
        tier,
        (cancelled - fails, live + fails, confirmed, 0, stock),
    )
    .await;

    // 6. The units cancelled and swept sell again, exactly.
    let resale: Vec<(String, String)> = (0..30)
        .map(|i| (format!("{goods}-late{i}"), format!("{goods}-late{i}-r0")))
        .collect();
    let late = buy_all(&stack, goods, &resale).await;
    let resold: Vec<&Answer> = late.iter().filter(|a| a.outcome == "won").collect();
    assert_eq!(
        resold.len(),
        CANCELLED - SHOP_FAILS,
        "exactly the returned units sold again"
    );
    assert!(late
        .iter()
        .all(|a| a.outcome == "won" || (a.status, a.outcome.as_str()) == (409, "sold_out")));
    assert_counters(
        &stack,
        goods,
        tier,
        (0, live + cancelled, confirmed, 0, stock),
    )
    .await;

    // 7. Unpaid reservations of the short goods expire and their units come back.
    let short_buyers: Vec<(String, String)> = (0..2)
        .map(|i| (format!("{short}-u{i}"), format!("{short}-u{i}-r0")))
        .collect();
    let expiring = buy_all(&stack, short, &short_buyers).await;
    for a in &expiring {
        assert_eq!((a.status, a.outcome.as_str()), (200, "won"), "{a:?}");
        wait_released(&stack, short, a.order_id.as_deref().unwrap(), "expired").await;
    }
    assert_counters(&stack, short, tier, (3, 0, 0, 0, 3)).await;

    // At rest: every order of the goods in MySQL, in the state its story says.
    let rows = order_rows(&stack, goods).await;
    let mut states: BTreeMap<(String, Option<String>), usize> = BTreeMap::new();
    for row in rows.values() {
        *states
            .entry((row.state.clone(), row.reason.clone()))
            .or_default() += 1;
    }
    let expected: BTreeMap<(String, Option<String>), usize> = [
        (("confirmed", None), CONFIRMED),
        (("released", Some("cancelled")), CANCELLED),
        (("released", Some("upstream_failed")), SHOP_FAILS),
        (("released", Some("unclaimed")), 1),
        (
            ("reserved", None),
            STOCK - CONFIRMED - CANCELLED + SHOP_FAILS + (CANCELLED - SHOP_FAILS),
        ),
    ]
    .into_iter()
    .map(|((s, r), n)| ((s.to_owned(), r.map(str::to_owned)), n))
    .collect();
    assert_eq!(
        states, expected,
        "no order the gate delivered was released unclaimed"
    );
    let shop = shop_orders(&stack, goods);
    assert_eq!(
        shop.len(),
        rows.len() - 1,
        "every order but the ghost's reached the shop"
    );
    let live_at_shop = shop
        .keys()
        .filter(|o| rows.get(*o).is_some_and(|r| r.state != "released"))
        .count();
    assert_eq!(
        live_at_shop, STOCK,
        "the shop holds exactly the stock in live orders"
    );
    let mut per_user: HashMap<&str, usize> = HashMap::new();
    for row in rows.values().filter(|r| r.state != "released") {
        *per_user.entry(row.user.as_str()).or_default() += row.quantity as usize;
    }
    assert!(per_user.values().all(|n| *n <= LIMIT), "{per_user:?}");
    assert_rows_at_receipt(&stack);
    assert_counters(
        &stack,
        goods,
        tier,
        (0, live + cancelled, confirmed, 0, stock),
    )
    .await;
    let shown = stack.admin().unwrap().sale(goods).await.unwrap();
    assert_eq!(shown["definition"]["fallback"], json!(false), "{shown}");
    if tier == Tier::Db {
        assert_nothing_in_redis(&stack, goods).await;
        assert_nothing_in_redis(&stack, short).await;
    }
    let reconcile = reconcile(&stack);
    assert_eq!(reconcile.0, 0, "reconcile is clean: {}", reconcile.1);
}

/// Every winner the shop received had its order row in MySQL, `reserved`, when it arrived.
fn assert_rows_at_receipt(stack: &Stack) {
    let seen = stack.shop.seen();
    let missing: Vec<String> = seen
        .iter()
        .filter(|s| s.row_at_receipt.as_ref().map(|r| r.as_deref()) != Some(Some("reserved")))
        .map(|s| {
            format!(
                "{} ({:?})",
                s.header(seckill_api::ORDER_ID_HEADER)
                    .unwrap_or("no order id"),
                s.row_at_receipt
            )
        })
        .collect();
    assert!(
        missing.is_empty(),
        "{} of {} winners reached the shop before their order row was in MySQL as reserved: {missing:?}",
        missing.len(),
        seen.len()
    );
}

/// `seckill-syncer reconcile --json` against the stack's stores: exit code and report.
fn reconcile(stack: &Stack) -> (i32, String) {
    let output = std::process::Command::new(seckill_e2e::syncer::syncer_binary().unwrap())
        .arg("reconcile")
        .args(["--redis-url", &stack.redis.url()])
        .args(["--mysql-url", &stack.db.url()])
        .args(["--key-prefix", &stack.key_prefix])
        .args([
            "--kafka-brokers",
            &stack.broker.as_ref().unwrap().bootstrap(),
        ])
        .arg("--json")
        .output()
        .unwrap();
    (
        output.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_db_sale_through_envoy() {
    sale_through_envoy(Tier::Db).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dual_write_sale_through_envoy() {
    sale_through_envoy(Tier::DualWrite).await;
}

/// A goods first defined as `redis` and asked about (so the syncer has looked it up and knows
/// it as a redis goods), then redefined as `tier` before it was ever preheated, preheated, and
/// bought at once: decided by its new tier from the first attempt, exactly as a goods defined
/// so from the start.
async fn redefined_then_sold(tier: Tier) {
    let stack = start(&format!("redef-{}", tier.name().replace('_', ""))).await;
    let goods = format!("{}-redef", tier.name().replace('_', "-"));
    let goods = goods.as_str();
    define(&stack, goods, Tier::Redis, 10, 1, 900).await;
    let (status, reply) = deduct_direct(&stack, goods, "early", "early-r0").await;
    assert_eq!(
        (status, reply["outcome"].as_str()),
        (200, Some("unknown_goods")),
        "{reply}"
    );
    define(&stack, goods, tier, 10, 1, 900).await;
    stack.preheat(goods, false).await.unwrap();
    let buyers: Vec<(String, String)> = (0..6)
        .map(|i| (format!("{goods}-u{i}"), format!("{goods}-u{i}-r0")))
        .collect();
    let answers = buy_all(&stack, goods, &buyers).await;
    for a in &answers {
        assert_eq!((a.status, a.outcome.as_str()), (200, "won"), "{a:?}");
    }
    assert_rows_at_receipt(&stack);
    let rows = order_rows(&stack, goods).await;
    assert_eq!(rows.len(), buyers.len(), "a row per winner: {rows:?}");
    if tier == Tier::Db {
        assert_nothing_in_redis(&stack, goods).await;
    }
    assert_counters(&stack, goods, tier, (4, 6, 0, 0, 10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_goods_redefined_as_db_is_decided_by_mysql_from_its_first_attempt() {
    redefined_then_sold(Tier::Db).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_goods_redefined_as_dual_write_writes_its_rows_from_its_first_sale() {
    redefined_then_sold(Tier::DualWrite).await;
}

/// A `db` goods whose sale row is held up in MySQL (a lock taken elsewhere) does not hold up a
/// `redis` goods on the same syncer: MySQL's batches are decided in a lane of their own. The
/// held attempts are answered 503 at their deadline, changing nothing, and their retries win
/// once each after the lock is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_db_goods_held_up_in_mysql_does_not_hold_up_a_redis_goods() {
    let stack = start("lane").await;
    let (slow, quick) = ("lane-db", "lane-redis");
    define(&stack, slow, Tier::Db, 50, 1, 900).await;
    define(&stack, quick, Tier::Redis, 50, 1, 900).await;
    stack.preheat(slow, false).await.unwrap();
    stack.preheat(quick, false).await.unwrap();
    // The directory knows both goods (a first attempt each), so nothing below waits on a
    // lookup.
    for goods in [slow, quick] {
        let (status, reply) = deduct_direct(&stack, goods, "warm", &format!("{goods}-warm")).await;
        assert_eq!(
            (status, reply["outcome"].as_str()),
            (200, Some("won")),
            "{reply}"
        );
    }

    // Someone else holds the db goods' sale row.
    let mut holder = stack.db.pool.begin().await.unwrap();
    sqlx::query("SELECT stock FROM sales WHERE goods_id = ? FOR UPDATE")
        .bind(slow)
        .fetch_one(&mut *holder)
        .await
        .unwrap();
    let answered_at = |stack: Arc<Stack>, goods: &'static str, i: usize| async move {
        let user = format!("{goods}-u{i}");
        let reply = deduct_direct(&stack, goods, &user, &format!("{user}-r0")).await;
        (reply, std::time::Instant::now())
    };
    let held: Vec<_> = (0..8)
        .map(|i| tokio::spawn(answered_at(stack.clone(), slow, i)))
        .collect();
    // The held attempts are in the lane before the redis goods' crowd arrives: the decider's
    // read of the sale row is executing (blocked on the row) on a connection of the syncer.
    let waiting_seen = wait_for(
        "a db decision to wait on the sale row",
        Duration::from_secs(10),
        || async {
            let waiting: i64 = sqlx::query_scalar(
                "SELECT COUNT(*) FROM information_schema.PROCESSLIST
                 WHERE DB = DATABASE() AND ID <> CONNECTION_ID() AND COMMAND = 'Execute'
                   AND INFO LIKE 'SELECT stock, holdback%FOR UPDATE'",
            )
            .fetch_one(&stack.db.pool)
            .await?;
            Ok((waiting > 0).then_some(()))
        },
    )
    .await;
    if let Err(e) = waiting_seen {
        let answers: Vec<_> = join_all(held).await;
        panic!("{e:#}; the held attempts' answers: {answers:?}");
    }
    let quick_answers = join_all((0..20).map(|i| answered_at(stack.clone(), quick, i))).await;
    let held_answers: Vec<_> = join_all(held)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    holder.rollback().await.unwrap();

    for ((status, reply), _) in &quick_answers {
        assert_eq!(
            (*status, reply["outcome"].as_str()),
            (200, Some("won")),
            "{reply}"
        );
    }
    // Every redis answer came before the first held db answer: none waited behind MySQL.
    let first_held = held_answers.iter().map(|(_, at)| *at).min().unwrap();
    let last_quick = quick_answers.iter().map(|(_, at)| *at).max().unwrap();
    assert!(
        last_quick < first_held,
        "the redis goods waited behind the db goods' lock: its last answer came {:?} after \
         the first held one",
        last_quick - first_held
    );
    for ((status, reply), _) in &held_answers {
        assert_eq!(
            *status, 503,
            "a held attempt is answered unavailable: {reply}"
        );
    }
    // Nothing was decided for them; each retry wins once, and a second retry gets the same.
    for i in 0..8 {
        let user = format!("{slow}-u{i}");
        let first = deduct_direct(&stack, slow, &user, &format!("{user}-r0")).await;
        let again = deduct_direct(&stack, slow, &user, &format!("{user}-r0")).await;
        assert_eq!(
            (first.0, first.1["outcome"].as_str()),
            (200, Some("won")),
            "{first:?}"
        );
        assert_eq!(
            first.1["order_id"], again.1["order_id"],
            "{first:?} {again:?}"
        );
    }
    let rows = order_rows(&stack, slow).await;
    assert_eq!(rows.len(), 1 + 8, "one row per winner: {rows:?}");
    assert_counters(&stack, slow, Tier::Db, (41, 9, 0, 0, 50)).await;
}
