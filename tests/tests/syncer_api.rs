//! The syncer's own HTTP API against a private redis-server and a fresh MariaDB database:
//! authentication, input checks, preheat rules and the one reply shape of the deduct script.

use std::time::Duration;

use seckill_e2e::mysql_db::TestDatabase;
use seckill_e2e::process::{unique_suffix, Scratch};
use seckill_e2e::redis_server::RedisServer;
use seckill_e2e::stack::{
    credential_for, now_ms, pass_keys, rfc3339, wait_past, ADMIN_SECRET, EDGE_SECRET,
    METRICS_SECRET, SHOP_SECRET,
};
use seckill_e2e::syncer::{SyncerArgs, SyncerProcess};
use serde_json::{json, Value};

struct Fixture {
    syncer: SyncerProcess,
    redis: RedisServer,
    db: TestDatabase,
    prefix: String,
    http: reqwest::Client,
    _scratch: Scratch,
}

impl Fixture {
    async fn start(label: &str) -> Fixture {
        Fixture::start_with(label, &[]).await
    }

    /// With extra environment for the syncer (say a short claim window).
    async fn start_with(label: &str, env: &[(&str, &str)]) -> Fixture {
        let scratch = Scratch::new(label).unwrap();
        let redis = RedisServer::start(&scratch.path).await.unwrap();
        let db = TestDatabase::create(label).await.unwrap();
        let prefix = format!("t{}", unique_suffix());
        let args = SyncerArgs {
            redis_url: &redis.url(),
            mysql_url: &db.url(),
            key_prefix: &prefix,
            kafka: None,
        };
        let role = seckill_e2e::syncer::Role::Serve { pipeline: false };
        let syncer = SyncerProcess::start_role(&scratch.path, &args, role, env)
            .await
            .unwrap();
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .unwrap();
        Fixture {
            syncer,
            redis,
            db,
            prefix,
            http,
            _scratch: scratch,
        }
    }

    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        secret: Option<&str>,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut request = self
            .http
            .request(method, format!("{}{path}", self.syncer.url()));
        if let Some(secret) = secret {
            request = request.header(seckill_api::SECRET_HEADER, secret);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let text = response.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    /// Defines a sale open from a second ago for an hour.
    async fn define(&self, goods: &str, stock: u64, limit: u32) -> (u16, Value) {
        let now = now_ms();
        self.define_window(goods, stock, limit, (now - 1_000, now + 3_600_000))
            .await
    }

    /// Defines a sale of 5 units, one per buyer, opened two hours ago and ending at
    /// `ends_at_ms`.
    async fn define_ending(&self, goods: &str, ends_at_ms: i64) -> (u16, Value) {
        self.define_window(goods, 5, 1, (now_ms() - 7_200_000, ends_at_ms))
            .await
    }

    async fn define_window(
        &self,
        goods: &str,
        stock: u64,
        limit: u32,
        (starts_at_ms, ends_at_ms): (i64, i64),
    ) -> (u16, Value) {
        let spec = json!({
            "total_stock": stock, "per_user_limit": limit,
            "starts_at": rfc3339(starts_at_ms), "ends_at": rfc3339(ends_at_ms),
        });
        self.call(
            reqwest::Method::PUT,
            &format!("/admin/sales/{goods}"),
            Some(ADMIN_SECRET),
            Some(spec),
        )
        .await
    }

    /// Defines a sale open from a second ago for an hour, and preheats it.
    async fn open(&self, goods: &str, stock: u64, limit: u32) {
        assert_eq!(
            self.define(goods, stock, limit).await.0,
            201,
            "define {goods}"
        );
        let (status, body) = self.preheat(goods, false).await;
        assert_eq!(status, 200, "preheat {goods}: {body}");
    }

    async fn preheat(&self, goods: &str, force: bool) -> (u16, Value) {
        let path = format!("/admin/sales/{goods}/preheat?force={force}");
        self.call(reqwest::Method::POST, &path, Some(ADMIN_SECRET), None)
            .await
    }

    /// The sale's definition (MySQL) and live counters (Redis).
    async fn sale(&self, goods: &str) -> Value {
        let path = format!("/admin/sales/{goods}");
        self.call(reqwest::Method::GET, &path, Some(ADMIN_SECRET), None)
            .await
            .1
    }

    async fn deduct(&self, body: Value) -> (u16, Value) {
        self.call(
            reqwest::Method::POST,
            seckill_api::DEDUCT_PATH,
            Some(EDGE_SECRET),
            Some(body),
        )
        .await
    }

    async fn redis_keys(&self) -> Vec<String> {
        let mut conn = self.redis.connection().await.unwrap();
        let mut keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{}:*", self.prefix))
            .query_async(&mut conn)
            .await
            .unwrap();
        keys.sort();
        keys
    }
}

impl Fixture {
    async fn batch(&self, attempts: Vec<Value>) -> Vec<Value> {
        let (status, reply) = self
            .call(
                reqwest::Method::POST,
                seckill_api::DEDUCT_BATCH_PATH,
                Some(EDGE_SECRET),
                Some(json!({ "attempts": attempts })),
            )
            .await;
        assert_eq!(status, 200, "{reply}");
        reply["replies"].as_array().unwrap().clone()
    }

    async fn order(&self, order_id: &str, action: &str) -> (u16, Value) {
        self.call(
            reqwest::Method::POST,
            &format!("/v1/orders/{order_id}/{action}"),
            Some(credential_for(&format!("/v1/orders/{order_id}/{action}"))),
            None,
        )
        .await
    }

    async fn claim(&self, order_ids: &[&str]) -> (u16, Value) {
        self.call(
            reqwest::Method::POST,
            seckill_api::CLAIM_PATH,
            Some(EDGE_SECRET),
            Some(json!({ "order_ids": order_ids })),
        )
        .await
    }

    async fn live(&self, goods: &str) -> Value {
        let path = format!("/admin/sales/{goods}");
        let (_, sale) = self
            .call(reqwest::Method::GET, &path, Some(ADMIN_SECRET), None)
            .await;
        sale["live"].clone()
    }

    async fn redis_hash(
        &self,
        goods: &str,
        suffix: &str,
    ) -> std::collections::HashMap<String, String> {
        let mut conn = self.redis.connection().await.unwrap();
        redis::cmd("HGETALL")
            .arg(format!("{}:{{{goods}}}:{suffix}", self.prefix))
            .query_async(&mut conn)
            .await
            .unwrap()
    }
}

/// A one-second claim window, swept every 50 ms: claims that matter within a test's time.
const SHORT_CLAIM_WINDOW: &[(&str, &str)] = &[
    ("SECKILL_CLAIM_WINDOW_MS", "1000"),
    ("SECKILL_SWEEP_EVERY_MS", "50"),
];

/// The order ids of a batch's replies, in order (every reply must be a win).
fn order_ids(replies: &[Value]) -> Vec<String> {
    replies
        .iter()
        .map(|r| r["order_id"].as_str().unwrap().to_owned())
        .collect()
}

fn purchase(user: &str, request: &str) -> Value {
    json!({"goods_id": "g", "user_id": user, "quantity": 1, "request_id": request})
}

/// Every call of the syncer's API, with the role whose credential it needs. Bodies and
/// goods are such that the right credential changes nothing either (bad input, unknown
/// goods or order): the test only learns whether the credential was let through.
fn calls_by_role() -> Vec<(reqwest::Method, &'static str, Option<Value>, &'static str)> {
    use reqwest::Method;
    let bad = Some(json!({"nonsense": true}));
    vec![
        (
            Method::POST,
            seckill_api::DEDUCT_PATH,
            bad.clone(),
            EDGE_SECRET,
        ),
        (
            Method::POST,
            seckill_api::DEDUCT_BATCH_PATH,
            Some(json!({"attempts": []})),
            EDGE_SECRET,
        ),
        (
            Method::POST,
            seckill_api::CLAIM_PATH,
            Some(json!({"order_ids": []})),
            EDGE_SECRET,
        ),
        (Method::POST, "/v1/orders/g.9.9/release", None, EDGE_SECRET),
        (Method::POST, "/v1/orders/g.9.9/confirm", None, SHOP_SECRET),
        (Method::POST, "/v1/orders/g.9.9/cancel", None, SHOP_SECRET),
        (Method::GET, "/admin/sales", None, ADMIN_SECRET),
        (Method::GET, "/admin/sales/g", None, ADMIN_SECRET),
        (Method::PUT, "/admin/sales/g", bad.clone(), ADMIN_SECRET),
        (
            Method::POST,
            "/admin/sales/none/preheat?force=true",
            None,
            ADMIN_SECRET,
        ),
        (Method::POST, "/admin/sales/none/reseed", None, ADMIN_SECRET),
        (
            Method::POST,
            "/admin/sales/none/pause",
            bad.clone(),
            ADMIN_SECRET,
        ),
        (Method::POST, "/admin/sales/none/resume", None, ADMIN_SECRET),
        (Method::POST, "/admin/sales/none/stop", None, ADMIN_SECRET),
        (
            Method::POST,
            "/admin/sales/none/add-stock",
            bad,
            ADMIN_SECRET,
        ),
        (Method::GET, "/metrics", None, METRICS_SECRET),
        (Method::GET, "/dashboard/data", None, METRICS_SECRET),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_call_takes_only_its_roles_credential() {
    let f = Fixture::start("auth").await;
    assert_eq!(f.define("g", 5, 1).await.0, 201);
    let (status, _) = f
        .call(
            reqwest::Method::POST,
            "/admin/sales/g/preheat",
            Some(ADMIN_SECRET),
            None,
        )
        .await;
    assert_eq!(status, 200);
    let before = f.sale("g").await;
    let keys_before = f.redis_keys().await;
    let credentials = [EDGE_SECRET, SHOP_SECRET, ADMIN_SECRET, METRICS_SECRET];
    let mut let_through = 0;
    for (method, path, body, needed) in calls_by_role() {
        for given in [None, Some(""), Some("wrong-but-long-enough")]
            .into_iter()
            .chain(credentials.map(Some))
        {
            let (status, reply) = f.call(method.clone(), path, given, body.clone()).await;
            if given == Some(needed) {
                assert_ne!(
                    status, 401,
                    "{method} {path} refused its own credential: {reply}"
                );
                let_through += 1;
            } else {
                assert_eq!(
                    status, 401,
                    "{method} {path} let {given:?} through: {reply}"
                );
                if !path.starts_with("/metrics") && !path.starts_with("/dashboard") {
                    assert_eq!(reply["error"], "unauthorized", "{path}");
                }
            }
        }
    }
    assert_eq!(let_through, calls_by_role().len());
    // The edge's credential (the one every Envoy holds) tried every admin call above and
    // nothing changed: the sale's definition and live counters, and every Redis key.
    let after = f.sale("g").await;
    assert_eq!(after["definition"], before["definition"]);
    assert_eq!(after["live"], before["live"]);
    assert_eq!(f.redis_keys().await, keys_before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deduct_refuses_bad_input_and_changes_nothing() {
    let f = Fixture::start("deductinput").await;
    f.open("g", 5, 1).await;
    let keys_before = f.redis_keys().await;
    for body in [
        json!({"goods_id": "g", "user_id": "u", "quantity": 0, "request_id": "r"}),
        json!({"goods_id": "g", "user_id": "u", "quantity": -1, "request_id": "r"}),
        json!({"goods_id": "g", "user_id": "u|x", "quantity": 1, "request_id": "r"}),
        json!({"goods_id": "g", "user_id": "u", "quantity": 1, "request_id": ""}),
        json!({"goods_id": "g", "user_id": "u", "quantity": 1}),
        json!({"goods_id": "g", "user_id": "u", "quantity": 1, "request_id": "r", "extra": 1}),
        json!("not an object"),
    ] {
        let (status, reply) = f.deduct(body.clone()).await;
        assert_eq!(status, 400, "{body} -> {reply}");
        assert_eq!(reply["error"], "bad_request");
    }
    assert_eq!(f.redis_keys().await, keys_before);
    let (_, sale) = f
        .call(
            reqwest::Method::GET,
            "/admin/sales/g",
            Some(ADMIN_SECRET),
            None,
        )
        .await;
    assert_eq!(sale["live"]["available"], 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_outcome_has_one_reply_shape() {
    let f = Fixture::start("shape").await;
    f.open("g", 1, 1).await;
    let (status, won) = f.deduct(purchase("a", "ra")).await;
    assert_eq!(status, 200);
    assert_eq!(won["outcome"], "won");
    assert_eq!(won["remaining"], 0);
    let order_id = won["order_id"].as_str().unwrap().to_owned();
    let (_, again) = f.deduct(purchase("a", "ra")).await;
    assert_eq!(
        again["order_id"],
        json!(order_id),
        "a retry gets the same order id"
    );
    let (_, dup) = f.deduct(purchase("a", "ra2")).await;
    assert_eq!(dup, json!({"outcome": "duplicate", "remaining": 0}));
    let (_, sold) = f.deduct(purchase("b", "rb")).await;
    assert_eq!(sold, json!({"outcome": "sold_out", "remaining": 0}));
    let (_, unknown) = f
        .deduct(json!({"goods_id": "nope", "user_id": "b", "quantity": 1, "request_id": "x"}))
        .await;
    assert_eq!(unknown, json!({"outcome": "unknown_goods"}));
    let (_, conflict) = f
        .deduct(json!({"goods_id": "g", "user_id": "b", "quantity": 1, "request_id": "ra"}))
        .await;
    assert_eq!(conflict["outcome"], "request_id_conflict");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preheat_refuses_to_replace_a_live_sale_without_force() {
    let f = Fixture::start("preheat").await;
    let (status, _) = f.define("g", 3, 1).await;
    assert_eq!(status, 201);
    let (status, first) = f
        .call(
            reqwest::Method::POST,
            "/admin/sales/g/preheat",
            Some(ADMIN_SECRET),
            None,
        )
        .await;
    assert_eq!(status, 200, "{first}");
    let (_, won) = f.deduct(purchase("a", "r1")).await;
    assert_eq!(won["outcome"], "won");

    let (status, refused) = f
        .call(
            reqwest::Method::POST,
            "/admin/sales/g/preheat",
            Some(ADMIN_SECRET),
            None,
        )
        .await;
    assert_eq!(status, 409, "{refused}");
    assert!(refused["message"].as_str().unwrap().contains("force"));
    let (_, sale) = f
        .call(
            reqwest::Method::GET,
            "/admin/sales/g",
            Some(ADMIN_SECRET),
            None,
        )
        .await;
    assert_eq!(
        sale["live"]["available"], 2,
        "the refused preheat changed nothing"
    );
    let (status, _) = f.define("g", 99, 1).await;
    assert_eq!(status, 409, "a live sale cannot be redefined");

    let (status, forced) = f
        .call(
            reqwest::Method::POST,
            "/admin/sales/g/preheat?force=true",
            Some(ADMIN_SECRET),
            None,
        )
        .await;
    assert_eq!(status, 200, "{forced}");
    assert_eq!(forced["live"]["available"], 3);
    assert!(
        forced["epoch"].as_u64() > first["epoch"].as_u64(),
        "a new epoch"
    );
    let (_, again) = f.deduct(purchase("a", "r2")).await;
    assert_ne!(
        again["order_id"], won["order_id"],
        "order ids never repeat across preheats"
    );

    let (status, missing) = f
        .call(
            reqwest::Method::POST,
            "/admin/sales/none/preheat",
            Some(ADMIN_SECRET),
            None,
        )
        .await;
    assert_eq!(status, 404, "{missing}");
}

/// Preheats at once take their epochs from MySQL one after another (the sale row's lock), and
/// whichever reaches Redis first, the newest epoch stands: Redis never sells under an epoch
/// below the one MySQL last handed out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_preheats_take_distinct_epochs_and_the_newest_stands() {
    const PREHEATS: u64 = 8;
    let f = Fixture::start("preheats").await;
    f.open("g", 3, 1).await;
    let calls = (0..PREHEATS).map(|_| f.preheat("g", true));
    let mut epochs = Vec::new();
    for (status, body) in futures::future::join_all(calls).await {
        match status {
            200 => epochs.push(body["epoch"].as_u64().unwrap()),
            409 => assert!(
                body["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("another preheat loaded epoch")),
                "{body}"
            ),
            _ => panic!("preheat answered {status} {body}"),
        }
    }
    let loaded = epochs.len();
    epochs.sort_unstable();
    epochs.dedup();
    assert!(loaded > 0 && epochs.len() == loaded, "distinct epochs");
    let sale = f.sale("g").await;
    assert_eq!(sale["definition"]["epoch"], 1 + PREHEATS, "one epoch each");
    assert_eq!(sale["live"]["epoch"], 1 + PREHEATS, "the newest stands");
    let (_, won) = f.deduct(purchase("a", "r1")).await;
    assert_eq!(won["order_id"], format!("g.{}.1", 1 + PREHEATS));

    // The interleaving the row lock cannot order, made happen: a preheat that took an older
    // epoch reaches Redis after the newer one loaded. The script refuses it, forced or not.
    let keys = seckill_syncer::keys::KeySpace::new(f.prefix.clone()).goods("g");
    let script = redis::Script::new(seckill_syncer::scripts::PREHEAT);
    let mut late = seckill_syncer::scripts::invocation(&script, &keys.preheat_script_keys());
    late.arg(3)
        .arg(1)
        .arg(now_ms() - 1_000)
        .arg(now_ms() + 3_600_000)
        .arg("1")
        .arg(60_000)
        .arg(PREHEATS);
    let mut conn = f.redis.connection().await.unwrap();
    let reply: (String, u64) = late.invoke_async(&mut conn).await.unwrap();
    assert_eq!(reply, ("stale".to_owned(), 1 + PREHEATS));
    let sale = f.sale("g").await;
    assert_eq!(
        (&sale["live"]["epoch"], &sale["live"]["available"]),
        (&json!(1 + PREHEATS), &json!(2)),
        "the sale under the newest epoch was left as it was: {sale}"
    );
}

/// MySQL's history of a sale (an order row, as the writer records it) keeps the sale from
/// being loaded with its full stock, and from being redefined while its window is open, even
/// when Redis forgot the sale; once its window has ended, a redefinition starts a new round
/// that preheats under a new epoch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_in_mysql_blocks_full_stock_until_a_new_round() {
    let mut f = Fixture::start("history").await;
    let now = now_ms();
    assert_eq!(f.define_ending("open", now + 3_600_000).await.0, 201);
    // A sale cannot be defined ended: this one ends soon, before Redis forgets below.
    let ended_at = now_ms() + 2_000;
    assert_eq!(f.define_ending("ended", ended_at).await.0, 201);
    for goods in ["open", "ended"] {
        let (status, body) = f.preheat(goods, false).await;
        assert_eq!((status, &body["epoch"]), (200, &json!(1)), "{body}");
        // What the writer records for one order of epoch 1.
        sqlx::query(
            "INSERT INTO orders (order_id, goods_id, user_id, quantity, request_id, state, \
             reserved_at) VALUES (?, ?, 'u', 1, 'r', 'reserved', NOW(3))",
        )
        .bind(format!("{goods}.1.1"))
        .bind(goods)
        .execute(&f.db.pool)
        .await
        .unwrap();
        sqlx::query("UPDATE sales SET stock = stock - 1, reserved = 1 WHERE goods_id = ?")
            .bind(goods)
            .execute(&f.db.pool)
            .await
            .unwrap();
        let (status, body) = f.preheat(goods, true).await;
        assert_eq!(status, 409, "{body}");
        let message = body["message"].as_str().unwrap();
        assert!(
            message.contains("has history in MySQL (1 orders; units reserved 1"),
            "{message}"
        );
    }

    // "ended" ends before Redis forgets: only "open" is a live sale Redis forgot.
    wait_past(ended_at).await.unwrap();
    // Redis forgets: it no longer knows "open" is live, MySQL does.
    f.redis.restart_empty().await.unwrap();
    f.syncer
        .wait_healthy(Duration::from_secs(30))
        .await
        .unwrap();
    let (status, body) = f.define_ending("open", now + 3_600_000).await;
    assert_eq!(status, 409, "{body}");
    assert!(
        body["message"].as_str().unwrap().contains("window is open"),
        "{body}"
    );
    let sale = f.sale("open").await;
    assert_eq!(
        (
            &sale["definition"]["reserved"],
            &sale["definition"]["epoch"]
        ),
        (&json!(1), &json!(1)),
        "the refusals changed nothing: {sale}"
    );

    // "ended" is over: its redefinition is a new round, its old order is not this round's.
    assert_eq!(f.define_ending("ended", now + 3_600_000).await.0, 200);
    let (status, body) = f.preheat("ended", false).await;
    assert_eq!((status, &body["epoch"]), (200, &json!(2)), "{body}");
    assert_eq!(body["live"]["available"], 5);
    let (_, won) = f
        .deduct(json!({"goods_id": "ended", "user_id": "v", "quantity": 1, "request_id": "rv"}))
        .await;
    assert_eq!(won["order_id"], "ended.2.1", "{won}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_sale_definitions_are_refused() {
    let f = Fixture::start("saledef").await;
    let now = now_ms();
    for spec in [
        json!({"total_stock": 5, "per_user_limit": 0, "starts_at": rfc3339(now), "ends_at": rfc3339(now + 1000)}),
        json!({"total_stock": 5, "per_user_limit": 1, "starts_at": rfc3339(now), "ends_at": rfc3339(now - 1000)}),
        json!({"total_stock": -5, "per_user_limit": 1, "starts_at": rfc3339(now), "ends_at": rfc3339(now + 1000)}),
        json!({"total_stock": 5, "per_user_limit": 1, "starts_at": "yesterday", "ends_at": rfc3339(now + 1000)}),
        json!({"total_stock": 5, "per_user_limit": 1, "starts_at": rfc3339(now), "ends_at": rfc3339(now + 1000), "color": "red"}),
        // Windows outside MySQL's DATETIME range (found by fuzzing): both were saved (201), and
        // the row ending in year 12026 then made every read of the sales table fail, so the
        // list of all sales and this goods' preheat answered 503.
        json!({"total_stock": 5, "per_user_limit": 1, "starts_at": "0999-12-31T00:00:00Z", "ends_at": rfc3339(now + 1000)}),
        json!({"total_stock": 5, "per_user_limit": 1, "starts_at": rfc3339(now), "ends_at": "+12026-01-01T00:00:00Z"}),
    ] {
        let (status, body) = f
            .call(
                reqwest::Method::PUT,
                "/admin/sales/g",
                Some(ADMIN_SECRET),
                Some(spec.clone()),
            )
            .await;
        assert_eq!(status, 400, "{spec} -> {body}");
    }
    let (status, _) = f
        .call(
            reqwest::Method::GET,
            "/admin/sales/g",
            Some(ADMIN_SECRET),
            None,
        )
        .await;
    assert_eq!(status, 404, "nothing was defined");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_deduct_answers_each_attempt_in_order() {
    let f = Fixture::start("batch").await;
    f.open("g", 2, 1).await;
    let batch = |attempts: Vec<Value>, secret: Option<&'static str>| {
        f.call(
            reqwest::Method::POST,
            seckill_api::DEDUCT_BATCH_PATH,
            secret,
            Some(json!({ "attempts": attempts })),
        )
    };

    // Without the secret, or with a batch of the wrong size, nothing is decided.
    let keys_before = f.redis_keys().await;
    let (status, _) = batch(vec![purchase("a", "ra")], None).await;
    assert_eq!(status, 401);
    let (status, reply) = batch(vec![], Some(EDGE_SECRET)).await;
    assert_eq!(
        (status, reply["error"].as_str()),
        (400, Some("bad_request"))
    );
    let too_many = (0..=seckill_api::BATCH_ATTEMPTS_MAX)
        .map(|i| purchase(&format!("u{i}"), &format!("r{i}")))
        .collect();
    let (status, _) = batch(too_many, Some(EDGE_SECRET)).await;
    assert_eq!(status, 400);
    assert_eq!(f.redis_keys().await, keys_before);

    // In order: a winner, a bad attempt refused on its own, a duplicate, the last unit,
    // a buyer who finds it sold out, and a retry that gets its first answer again.
    let (status, reply) = batch(
        vec![
            purchase("a", "ra"),
            json!({"goods_id": "g", "user_id": "b", "quantity": 0, "request_id": "rb"}),
            purchase("a", "ra2"),
            purchase("c", "rc"),
            purchase("d", "rd"),
            purchase("a", "ra"),
        ],
        Some(EDGE_SECRET),
    )
    .await;
    assert_eq!(status, 200, "{reply}");
    let replies = reply["replies"].as_array().unwrap();
    let outcomes: Vec<&str> = replies
        .iter()
        .map(|r| r["outcome"].as_str().or(r["error"].as_str()).unwrap())
        .collect();
    assert_eq!(
        outcomes,
        ["won", "bad_request", "duplicate", "won", "sold_out", "won"]
    );
    assert_eq!(replies[5]["order_id"], replies[0]["order_id"]);
    assert_ne!(replies[3]["order_id"], replies[0]["order_id"]);
    let (_, sale) = f
        .call(
            reqwest::Method::GET,
            "/admin/sales/g",
            Some(ADMIN_SECRET),
            None,
        )
        .await;
    assert_eq!(sale["live"]["available"], 0);
    assert_eq!(sale["live"]["reserved"], 2);
}

/// A retry of a request id after each way its order can end: an order id is handed out again
/// only while its reservation is live; a cancelled or expired one is answered `released`
/// (never forwarded again), a paid one `confirmed`, and one the shop failed is decided afresh
/// with a new order id. The per-user count follows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_never_revives_an_ended_order() {
    let f = Fixture::start("retry-ended").await;
    f.open("g", 4, 1).await;
    let won = |reply: &Value| -> String {
        assert_eq!(reply["outcome"], "won", "{reply}");
        reply["order_id"].as_str().unwrap().to_owned()
    };

    // Live: the same order again.
    let (_, first) = f.deduct(purchase("a", "ra")).await;
    let order_a = won(&first);
    let (_, again) = f.deduct(purchase("a", "ra")).await;
    assert_eq!(won(&again), order_a);

    // Cancelled: released, with the order and the reason; the unit is back.
    assert_eq!(f.order(&order_a, "cancel").await.0, 200);
    let (status, after_cancel) = f.deduct(purchase("a", "ra")).await;
    assert_eq!(status, 200);
    assert_eq!(
        (
            after_cancel["outcome"].as_str(),
            after_cancel["order_id"].as_str(),
            after_cancel["reason"].as_str()
        ),
        (Some("released"), Some(order_a.as_str()), Some("cancelled")),
        "{after_cancel}"
    );
    assert_eq!(f.live("g").await["available"], 4);

    // Paid: confirmed, nothing more is sold.
    let (_, b) = f.deduct(purchase("b", "rb")).await;
    let order_b = won(&b);
    assert_eq!(f.order(&order_b, "confirm").await.0, 200);
    let (_, after_confirm) = f.deduct(purchase("b", "rb")).await;
    assert_eq!(after_confirm["outcome"], "confirmed", "{after_confirm}");
    assert_eq!(after_confirm["order_id"], order_b.as_str());

    // The shop failed it: a fresh attempt, with a new order id, counted once for the buyer.
    let (_, c) = f.deduct(purchase("c", "rc")).await;
    let order_c = won(&c);
    let (status, _) = f.order(&order_c, "release?reason=upstream_failed").await;
    assert_eq!(status, 200);
    let (_, fresh) = f.deduct(purchase("c", "rc")).await;
    let order_c2 = won(&fresh);
    assert_ne!(
        order_c2, order_c,
        "a released order id is never handed out again"
    );
    let (_, repeat) = f.deduct(purchase("c", "rc")).await;
    assert_eq!(
        won(&repeat),
        order_c2,
        "the new order is now the request's answer"
    );
    let (_, limit) = f.deduct(purchase("c", "rc-other")).await;
    assert_eq!(limit["outcome"], "duplicate", "one unit per buyer: {limit}");

    // Redis agrees: 1 sold (b), 1 reserved (c's new order), 2 available.
    let live = f.live("g").await;
    assert_eq!(
        (
            live["available"].as_u64(),
            live["reserved"].as_u64(),
            live["sold"].as_u64()
        ),
        (Some(2), Some(1), Some(1)),
        "{live}"
    );
    let reservations = f.redis_hash("g", "reservations").await;
    assert_eq!(reservations.keys().collect::<Vec<_>>(), vec![&order_c2]);
}

/// A script call that arrives after its caller stopped waiting decides nothing: every
/// attempt is refused and no key changes, whatever the attempts would have won.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deduct_past_its_deadline_changes_nothing() {
    let f = Fixture::start("deadline").await;
    f.open("g", 5, 1).await;
    let goods = seckill_syncer::keys::KeySpace::new(f.prefix.clone()).goods("g");
    let keys: Vec<String> = goods
        .deduct_script_keys()
        .iter()
        .map(|k| k.to_string())
        .collect();
    let snapshot = |conn: redis::aio::MultiplexedConnection| async {
        let mut conn = conn;
        let mut dump = Vec::new();
        for key in &keys {
            let value: Option<Vec<u8>> = redis::cmd("DUMP")
                .arg(key)
                .query_async(&mut conn)
                .await
                .unwrap();
            dump.push(value);
        }
        dump
    };
    let conn = f.redis.connection().await.unwrap();
    let before = snapshot(conn.clone()).await;
    let script = redis::Script::new(seckill_syncer::scripts::DEDUCT);
    let mut invocation = script.prepare_invoke();
    for key in &keys {
        invocation.key(key);
    }
    // A deadline one second ago, by Redis's own clock.
    let mut clock = conn.clone();
    let (seconds, _micros): (u64, u64) = redis::cmd("TIME").query_async(&mut clock).await.unwrap();
    invocation
        .arg("g")
        .arg((seconds - 1) * 1000)
        .arg(30_000)
        .arg(0);
    for i in 0..3 {
        invocation.arg(format!("u{i}")).arg(1).arg(format!("r{i}"));
    }
    let mut call = conn.clone();
    let replies: Vec<(String, String, i64, i64, String)> =
        invocation.invoke_async(&mut call).await.unwrap();
    assert_eq!(replies.len(), 3);
    assert!(replies.iter().all(|r| r.0 == "too_late"), "{replies:?}");
    assert_eq!(snapshot(conn).await, before, "nothing changed");
    // The same attempts with time to spare are decided.
    let (_, reply) = f.deduct(purchase("u0", "r0")).await;
    assert_eq!(reply["outcome"], "won");
}

/// Reservations made through the batch endpoint (the gate's) live for the claim window
/// unless claimed: an unclaimed one is released as `unclaimed` and its unit sells again; a
/// claimed one lives on; a late claim changes nothing; a retry of the unclaimed request id
/// is a fresh attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unclaimed_reservations_return_after_the_claim_window() {
    let f = Fixture::start_with("claims", SHORT_CLAIM_WINDOW).await;
    f.open("g", 3, 1).await;
    let replies = f
        .batch(vec![
            purchase("a", "ra"),
            purchase("b", "rb"),
            purchase("c", "rc"),
        ])
        .await;
    let orders = order_ids(&replies);
    assert_eq!(f.live("g").await["available"], 0);

    // Claim a's order (twice: the second counts nothing) and something that is no order.
    let (status, reply) = f.claim(&[&orders[0], &orders[0], "junk", "x.y.z"]).await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(
        (reply["claimed"].as_u64(), reply["late"].as_u64()),
        (Some(1), Some(2))
    );

    // b and c were never claimed: released when the window ends.
    seckill_e2e::process::wait_for(
        "the unclaimed to be released",
        Duration::from_secs(20),
        || async {
            let settled = f.redis_hash("g", "settled").await;
            let released = orders[1..]
                .iter()
                .all(|o| settled.get(o).map(String::as_str) == Some("released:unclaimed"));
            Ok(released.then_some(()))
        },
    )
    .await
    .unwrap();
    let live = f.live("g").await;
    assert_eq!(
        (live["available"].as_u64(), live["reserved"].as_u64()),
        (Some(2), Some(1)),
        "{live}"
    );
    let reservations = f.redis_hash("g", "reservations").await;
    assert_eq!(reservations.keys().collect::<Vec<_>>(), vec![&orders[0]]);

    // A late claim changes nothing.
    let (_, reply) = f.claim(&[&orders[1]]).await;
    assert_eq!(
        (reply["claimed"].as_u64(), reply["late"].as_u64()),
        (Some(0), Some(1))
    );
    assert_eq!(f.live("g").await["available"], 2);

    // b retries: its answer never reached it, so it gets a fresh attempt and a new order.
    let retry = f.batch(vec![purchase("b", "rb")]).await;
    assert_eq!(retry[0]["outcome"], "won", "{retry:?}");
    assert_ne!(retry[0]["order_id"].as_str(), Some(orders[1].as_str()));

    // Bad claims are refused whole.
    assert_eq!(f.claim(&[]).await.0, 400);
    let too_many: Vec<String> = (0..=seckill_api::CLAIMS_PER_CALL_MAX)
        .map(|i| format!("g.1.{i}"))
        .collect();
    let refs: Vec<&str> = too_many.iter().map(String::as_str).collect();
    assert_eq!(f.claim(&refs).await.0, 400);
}

/// Claims cannot land while Redis stands still. A reservation made just before a stall
/// longer than its claim window is not released when Redis resumes: the gate gets a whole
/// claim window from then to claim it. One nobody claims is released after that.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_stall_does_not_cost_the_gate_its_claims() {
    let f = Fixture::start_with("claim-stall", SHORT_CLAIM_WINDOW).await;
    f.open("g", 2, 1).await;
    let replies = f
        .batch(vec![purchase("a", "ra"), purchase("b", "rb")])
        .await;
    let orders = order_ids(&replies);
    // Redis stands still for 3 s, three claim windows (the fault under test, so its length
    // is fixed); the sweeper's calls queue up meanwhile and run the moment it resumes.
    f.redis.pause().unwrap();
    tokio::time::sleep_until(tokio::time::Instant::now() + Duration::from_secs(3)).await;
    f.redis.resume().unwrap();

    // The gate's claim for a arrives after the sweeps that queued up: still in time.
    seckill_e2e::process::wait_for(
        "the syncer to sweep again",
        Duration::from_secs(20),
        || async {
            let mut conn = f.redis.connection().await?;
            let swept: Option<i64> = redis::cmd("HGET")
                .arg(format!("{}:{{g}}:sale", f.prefix))
                .arg("swept_ms")
                .query_async(&mut conn)
                .await?;
            Ok(swept
                .filter(|ms| *ms > seckill_e2e::stack::now_ms() - 500)
                .map(|_| ()))
        },
    )
    .await
    .unwrap();
    let (status, reply) = f.claim(&[&orders[0]]).await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(
        (reply["claimed"].as_u64(), reply["late"].as_u64()),
        (Some(1), Some(0)),
        "the claim found its reservation: {reply} (settled: {:?}, sale: {:?})",
        f.redis_hash("g", "settled").await,
        f.redis_hash("g", "sale").await
    );
    // b is never claimed: released a claim window after the stall.
    seckill_e2e::process::wait_for("b to be released", Duration::from_secs(20), || async {
        let settled = f.redis_hash("g", "settled").await;
        Ok(
            (settled.get(&orders[1]).map(String::as_str) == Some("released:unclaimed"))
                .then_some(()),
        )
    })
    .await
    .unwrap();
    let reservations = f.redis_hash("g", "reservations").await;
    assert_eq!(reservations.keys().collect::<Vec<_>>(), vec![&orders[0]]);
}

/// What a `won` reply's pass says, once verified with the harness's key; checks that it
/// names this goods, buyer and quantity and the reply's order and deadline.
fn verified_pass(reply: &Value, goods: &str, user: &str, quantity: u32) -> seckill_pass::Pass {
    assert_eq!(reply["outcome"], "won", "{reply}");
    let token = reply["pass"].as_str().unwrap_or_else(|| panic!("{reply}"));
    let now_s = (now_ms() / 1000) as u64;
    let pass =
        seckill_pass::verify(token, &pass_keys(), now_s).unwrap_or_else(|e| panic!("{e}: {reply}"));
    assert_eq!(
        (
            Some(pass.order_id.as_str()),
            pass.goods_id.as_str(),
            pass.user_id.as_str(),
            pass.quantity
        ),
        (reply["order_id"].as_str(), goods, user, quantity),
        "{reply}"
    );
    let deadline_ms = reply["expires_at_ms"].as_u64().unwrap();
    assert_eq!(pass.expires_at_s, deadline_ms.div_ceil(1000), "{reply}");
    pass
}

/// Every `won` answer carries a pass the shop verifies with the syncer's key, naming the
/// order, goods, buyer and quantity, and ending when the reservation's payment window does:
/// from the single and the batch endpoint, for a retry (its first deadline, not a later one),
/// decided by Redis or by MySQL (the db tier, whose decider the fallback uses). No other
/// answer carries one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_win_carries_a_pass_that_names_it_and_ends_with_its_reservation() {
    let f = Fixture::start("pass").await;
    let now = now_ms();
    for (goods, tier, window_s) in [("pr", "redis", 600_i64), ("pd", "db", 300)] {
        let spec = json!({
            "total_stock": 3, "per_user_limit": 2, "payment_window_s": window_s, "tier": tier,
            "starts_at": rfc3339(now - 1_000), "ends_at": rfc3339(now + 3_600_000),
        });
        let path = format!("/admin/sales/{goods}");
        let (status, body) = f
            .call(reqwest::Method::PUT, &path, Some(ADMIN_SECRET), Some(spec))
            .await;
        assert_eq!(status, 201, "{body}");
        let (status, body) = f.preheat(goods, false).await;
        assert_eq!(status, 200, "{body}");
        let attempt = |user: &str, quantity: u32| {
            json!({"goods_id": goods, "user_id": user, "quantity": quantity,
                   "request_id": format!("{goods}-{user}")})
        };

        let before_ms = now_ms();
        let (status, single) = f.deduct(attempt("alice", 2)).await;
        assert_eq!(status, 200, "{single}");
        let batch = f.batch(vec![attempt("bob", 1), attempt("carol", 1)]).await;
        let after_ms = now_ms();
        let first = verified_pass(&single, goods, "alice", 2);
        let batched = verified_pass(&batch[0], goods, "bob", 1);
        for pass in [&first, &batched] {
            // The payment window from the moment the order was made, rounded up.
            let window_ms = window_s * 1000;
            let earliest = (before_ms + window_ms).div_euclid(1000) as u64;
            let latest = (after_ms + window_ms + 999).div_euclid(1000) as u64;
            assert!(
                (earliest..=latest).contains(&pass.expires_at_s),
                "{goods}: exp {} not in {earliest}..={latest}",
                pass.expires_at_s
            );
            let issued = (before_ms / 1000) as u64..=(after_ms / 1000) as u64 + 1;
            assert!(issued.contains(&pass.issued_at_s), "{goods}: {pass:?}");
        }
        assert_ne!(first.order_id, batched.order_id);
        // Sold out: no pass, no deadline.
        assert_eq!(batch[1]["outcome"], "sold_out", "{goods}");
        assert!(batch[1].get("pass").is_none(), "{}", batch[1]);
        assert!(batch[1].get("expires_at_ms").is_none(), "{}", batch[1]);

        // A retry gets the same order with a new pass that ends when the order does.
        let (_, again) = f.deduct(attempt("alice", 2)).await;
        let repeated = verified_pass(&again, goods, "alice", 2);
        assert_eq!(
            (&repeated.order_id, repeated.expires_at_s),
            (&first.order_id, first.expires_at_s),
            "{goods}"
        );
        assert_eq!(again["expires_at_ms"], single["expires_at_ms"], "{goods}");
    }
}

/// `serve` refuses a pass key it could not sign with, says why, and never prints the secret.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_refuses_a_pass_key_it_cannot_sign_with() {
    let scratch = Scratch::new("passkey").unwrap();
    // Nothing is reached: the key is read before any store.
    let args = SyncerArgs {
        redis_url: "redis://127.0.0.1:1",
        mysql_url: "mysql://nobody@127.0.0.1:1/none",
        key_prefix: "t",
        kafka: None,
    };
    let secret = "s3cret-s3cret-s3cret-s3cret-s3cret";
    for (key, says) in [
        ("k1=short-s3cret".to_owned(), "at least 32"),
        (format!("k 1={secret}"), "key id"),
        (format!("={secret}"), "key id"),
        (secret.to_owned(), "KEY_ID=SECRET"),
    ] {
        let env = [("SECKILL_PASS_KEY", key.as_str())];
        let (status, log) = SyncerProcess::start_refused(&scratch.path, &args, &env)
            .await
            .unwrap();
        assert!(!status.success(), "{key}: {log}");
        assert!(
            log.contains("--pass-key") && log.contains(says),
            "{key}: {log}"
        );
        assert!(!log.contains("s3cret"), "the secret was printed: {log}");
    }
}
