//! The syncer's own HTTP API against a private redis-server and a fresh MariaDB database:
//! authentication, input checks, preheat rules and the one reply shape of the deduct script.

use std::time::Duration;

use seckill_e2e::mysql_db::TestDatabase;
use seckill_e2e::process::{unique_suffix, Scratch};
use seckill_e2e::redis_server::RedisServer;
use seckill_e2e::stack::{now_ms, rfc3339, SECRET};
use seckill_e2e::syncer::{SyncerArgs, SyncerProcess};
use serde_json::{json, Value};

struct Fixture {
    syncer: SyncerProcess,
    redis: RedisServer,
    _db: TestDatabase,
    prefix: String,
    http: reqwest::Client,
    _scratch: Scratch,
}

impl Fixture {
    async fn start(label: &str) -> Fixture {
        let scratch = Scratch::new(label).unwrap();
        let redis = RedisServer::start(&scratch.path).await.unwrap();
        let db = TestDatabase::create(label).await.unwrap();
        let prefix = format!("t{}", unique_suffix());
        let args = SyncerArgs {
            redis_url: &redis.url(),
            mysql_url: &db.url(),
            key_prefix: &prefix,
            secret: SECRET,
            kafka: None,
        };
        let syncer = SyncerProcess::start(&scratch.path, &args).await.unwrap();
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .unwrap();
        Fixture {
            syncer,
            redis,
            _db: db,
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

    async fn define(&self, goods: &str, stock: u64, limit: u32) -> (u16, Value) {
        let now = now_ms();
        let spec = json!({
            "total_stock": stock, "per_user_limit": limit,
            "starts_at": rfc3339(now - 1_000), "ends_at": rfc3339(now + 3_600_000),
        });
        self.call(
            reqwest::Method::PUT,
            &format!("/admin/sales/{goods}"),
            Some(SECRET),
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
        let (status, body) = self
            .call(
                reqwest::Method::POST,
                &format!("/admin/sales/{goods}/preheat"),
                Some(SECRET),
                None,
            )
            .await;
        assert_eq!(status, 200, "preheat {goods}: {body}");
    }

    async fn deduct(&self, body: Value) -> (u16, Value) {
        self.call(
            reqwest::Method::POST,
            seckill_api::DEDUCT_PATH,
            Some(SECRET),
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

fn purchase(user: &str, request: &str) -> Value {
    json!({"goods_id": "g", "user_id": user, "quantity": 1, "request_id": request})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn internal_endpoints_require_the_shared_secret() {
    let f = Fixture::start("auth").await;
    assert_eq!(f.define("g", 5, 1).await.0, 201);
    let (status, _) = f
        .call(
            reqwest::Method::POST,
            "/admin/sales/g/preheat",
            Some(SECRET),
            None,
        )
        .await;
    assert_eq!(status, 200);
    for secret in [None, Some("wrong"), Some("")] {
        let (status, body) = f
            .call(
                reqwest::Method::POST,
                seckill_api::DEDUCT_PATH,
                secret,
                Some(purchase("u", "r")),
            )
            .await;
        assert_eq!(status, 401, "{secret:?}");
        assert_eq!(body["error"], "unauthorized");
        let (status, _) = f
            .call(reqwest::Method::GET, "/admin/sales/g", secret, None)
            .await;
        assert_eq!(status, 401);
    }
    let (_, sale) = f
        .call(reqwest::Method::GET, "/admin/sales/g", Some(SECRET), None)
        .await;
    assert_eq!(
        sale["live"]["available"], 5,
        "no unauthenticated call deducted"
    );
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
        .call(reqwest::Method::GET, "/admin/sales/g", Some(SECRET), None)
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
            Some(SECRET),
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
            Some(SECRET),
            None,
        )
        .await;
    assert_eq!(status, 409, "{refused}");
    assert!(refused["message"].as_str().unwrap().contains("force"));
    let (_, sale) = f
        .call(reqwest::Method::GET, "/admin/sales/g", Some(SECRET), None)
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
            Some(SECRET),
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
            Some(SECRET),
            None,
        )
        .await;
    assert_eq!(status, 404, "{missing}");
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
    ] {
        let (status, body) = f
            .call(
                reqwest::Method::PUT,
                "/admin/sales/g",
                Some(SECRET),
                Some(spec.clone()),
            )
            .await;
        assert_eq!(status, 400, "{spec} -> {body}");
    }
    let (status, _) = f
        .call(reqwest::Method::GET, "/admin/sales/g", Some(SECRET), None)
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
    let (status, reply) = batch(vec![], Some(SECRET)).await;
    assert_eq!(
        (status, reply["error"].as_str()),
        (400, Some("bad_request"))
    );
    let too_many = (0..=seckill_api::BATCH_ATTEMPTS_MAX)
        .map(|i| purchase(&format!("u{i}"), &format!("r{i}")))
        .collect();
    let (status, _) = batch(too_many, Some(SECRET)).await;
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
        Some(SECRET),
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
        .call(reqwest::Method::GET, "/admin/sales/g", Some(SECRET), None)
        .await;
    assert_eq!(sale["live"]["available"], 0);
    assert_eq!(sale["live"]["reserved"], 2);
}
