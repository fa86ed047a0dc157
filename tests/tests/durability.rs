//! `serve --redis-durability` against real redis-servers: `aof` is checked at start and keeps
//! every acknowledged deduct through a kill -9 of Redis; `replicas:1` never answers a buyer or
//! a confirm on a write that no replica holds. (`none` is what every other test runs.)

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use seckill_e2e::admin::Admin;
use seckill_e2e::mysql_db::TestDatabase;
use seckill_e2e::process::{unique_suffix, wait_for, Scratch};
use seckill_e2e::redis_server::{RedisServer, AOF_ALWAYS, AOF_EVERYSEC};
use seckill_e2e::stack::{credential_for, now_ms, EDGE_SECRET};
use seckill_e2e::syncer::{Role, SyncerArgs, SyncerProcess};
use serde_json::{json, Value};

/// The deduct endpoint's own deadline (`REDIS_CALL_TIMEOUT`) plus room for a loaded machine:
/// a refused attempt must be answered within it.
const ANSWER_WITHIN: Duration = Duration::from_secs(3);

/// A database, a key prefix and a scratch directory; the Redis servers and syncers vary.
struct Fixture {
    db: TestDatabase,
    prefix: String,
    http: reqwest::Client,
    scratch: Scratch,
}

impl Fixture {
    async fn new(label: &str) -> Fixture {
        Fixture {
            db: TestDatabase::create(label).await.unwrap(),
            prefix: format!("t{}", unique_suffix()),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .unwrap(),
            scratch: Scratch::new(label).unwrap(),
        }
    }

    fn args<'a>(&'a self, redis_url: &'a str, mysql_url: &'a str) -> SyncerArgs<'a> {
        SyncerArgs {
            redis_url,
            mysql_url,
            key_prefix: &self.prefix,
            kafka: None,
        }
    }

    /// The syncer, without the MySQL fallback: these tests are about what Redis itself keeps
    /// (with the fallback, a storm against a killed Redis goes on in MySQL: redis_forgets.rs).
    async fn syncer(&self, redis: &RedisServer, env: &[(&str, &str)]) -> SyncerProcess {
        let (redis_url, mysql_url) = (redis.url(), self.db.url());
        let role = Role::Serve { pipeline: false };
        let mut env = env.to_vec();
        env.push(("SECKILL_FALLBACK_RATE", "0"));
        SyncerProcess::start_role(
            &self.scratch.path,
            &self.args(&redis_url, &mysql_url),
            role,
            &env,
        )
        .await
        .unwrap()
    }

    /// Starts `serve` where it must refuse: its exit status and log.
    async fn refused(&self, redis: &RedisServer, env: &[(&str, &str)]) -> (i32, String) {
        let (redis_url, mysql_url) = (redis.url(), self.db.url());
        let (status, log) = SyncerProcess::start_refused(
            &self.scratch.path,
            &self.args(&redis_url, &mysql_url),
            env,
        )
        .await
        .unwrap();
        (status.code().unwrap_or(-1), log)
    }

    /// Defines a sale open for the next hour (one unit per buyer) and preheats it.
    async fn open(&self, syncer: &SyncerProcess, goods: &str, stock: u64) {
        let admin = Admin::new(&self.http, syncer.url());
        let now = now_ms();
        admin
            .define_sale(goods, stock, 1, (now - 60_000, now + 3_600_000), 900)
            .await
            .unwrap();
        admin.preheat(goods, false).await.unwrap();
    }

    async fn post(&self, syncer: &SyncerProcess, path: &str, body: Value) -> (u16, Value) {
        let response = self
            .http
            .post(format!("{}{path}", syncer.url()))
            .header(seckill_api::SECRET_HEADER, credential_for(path))
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    async fn deduct(
        &self,
        syncer: &SyncerProcess,
        goods: &str,
        user: &str,
        request: &str,
    ) -> (u16, Value) {
        let body =
            json!({"goods_id": goods, "user_id": user, "quantity": 1, "request_id": request});
        self.post(syncer, seckill_api::DEDUCT_PATH, body).await
    }

    /// Opens a small sale of `goods` and checks that a buyer wins a unit of it.
    async fn assert_sells(&self, syncer: &SyncerProcess, goods: &str) {
        self.open(syncer, goods, 10).await;
        let (status, reply) = self.deduct(syncer, goods, "u1", "r1").await;
        assert_eq!(
            (status, reply["outcome"].as_str()),
            (200, Some("won")),
            "{reply}"
        );
    }

    fn key(&self, goods: &str, suffix: &str) -> String {
        format!("{}:{{{goods}}}:{suffix}", self.prefix)
    }
}

async fn hget(redis: &RedisServer, key: &str, field: &str) -> Option<String> {
    let mut conn = redis.connection().await.unwrap();
    redis::cmd("HGET")
        .arg(key)
        .arg(field)
        .query_async(&mut conn)
        .await
        .unwrap()
}

/// The order id a request record (`user|quantity|order`) names.
fn order_of(record: &str) -> &str {
    record.rsplit('|').next().unwrap_or_default()
}

/// One sample of a labelled counter in a Prometheus text exposition.
fn counter(text: &str, sample: &str) -> u64 {
    text.lines()
        .find_map(|line| line.strip_prefix(sample)?.trim().parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

#[tokio::test]
async fn aof_is_refused_unless_redis_fsyncs_every_write() {
    let f = Fixture::new("durability_aof_check").await;
    let aof = ("SECKILL_REDIS_DURABILITY", "aof");
    let unchecked = ("SECKILL_REDIS_DURABILITY_UNCHECKED", "true");

    // An AOF fsynced once a second: refused, saying what is wrong and what to set; the
    // override does not overrule a configuration that can be read.
    let everysec = RedisServer::start_with(&f.scratch.path, AOF_EVERYSEC)
        .await
        .unwrap();
    for env in [&[aof][..], &[aof, unchecked][..]] {
        let (code, log) = f.refused(&everysec, env).await;
        assert_eq!(code, 1, "{log}");
        assert!(
            log.contains("appendonly yes, appendfsync everysec")
                && log.contains("appendfsync always"),
            "{log}"
        );
    }
    // No AOF at all: refused.
    let plain = RedisServer::start(&f.scratch.path).await.unwrap();
    let (code, log) = f.refused(&plain, &[aof]).await;
    assert_eq!(code, 1, "{log}");
    assert!(log.contains("appendonly no"), "{log}");

    // CONFIG disabled, as managed services do: refused, naming the override; with it, served.
    let mut managed_args = AOF_ALWAYS.to_vec();
    managed_args.extend(["--rename-command", "CONFIG", ""]);
    let managed = RedisServer::start_with(&f.scratch.path, &managed_args)
        .await
        .unwrap();
    let (code, log) = f.refused(&managed, &[aof]).await;
    assert_eq!(code, 1, "{log}");
    assert!(
        log.contains("cannot check") && log.contains("--redis-durability-unchecked"),
        "{log}"
    );
    let trusted = f.syncer(&managed, &[aof, unchecked]).await;
    f.assert_sells(&trusted, "m").await;

    // appendfsync always: served.
    let always = RedisServer::start_with(&f.scratch.path, AOF_ALWAYS)
        .await
        .unwrap();
    let syncer = f.syncer(&always, &[aof]).await;
    f.assert_sells(&syncer, "a").await;

    // Settings that are not settings: refused by the command line, saying what is allowed.
    for bad in ["replicas:0", "replicas:17", "fsync", "replicas:one"] {
        let (code, log) = f
            .refused(&always, &[("SECKILL_REDIS_DURABILITY", bad)])
            .await;
        assert_eq!(code, 2, "{bad}: {log}");
        assert!(
            log.contains("from 1 to 16") || log.contains("none, aof or replicas:N"),
            "{bad}: {log}"
        );
    }
}

/// What one buyer was told.
#[derive(Clone)]
struct Answer {
    user: String,
    request: String,
    status: u16,
    order_id: Option<String>,
}

#[tokio::test]
async fn aof_keeps_every_acknowledged_deduct_through_kill_9() {
    const GOODS: &str = "hot";
    const STOCK: u64 = 1_000_000;
    /// Buyers at once, each sending attempt after attempt (a new user and request id each).
    const BUYERS: usize = 300;
    /// Attempts per buyer at most: bounds the storm if the waits below fail.
    const ATTEMPTS_MAX: usize = 1_000;
    const WON_BEFORE_KILL: u64 = 1_000;
    const WON_AFTER_RESTART: u64 = 300;

    let f = Arc::new(Fixture::new("durability_aof_kill").await);
    let mut redis = RedisServer::start_with(&f.scratch.path, AOF_ALWAYS)
        .await
        .unwrap();
    let syncer = Arc::new(
        f.syncer(&redis, &[("SECKILL_REDIS_DURABILITY", "aof")])
            .await,
    );
    f.open(&syncer, GOODS, STOCK).await;

    let answers: Arc<Mutex<Vec<Answer>>> = Arc::default();
    let won = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut storm = Vec::new();
    for buyer in 0..BUYERS {
        let (f, syncer, answers, won, stop) = (
            f.clone(),
            syncer.clone(),
            answers.clone(),
            won.clone(),
            stop.clone(),
        );
        storm.push(tokio::spawn(async move {
            for attempt in 0..ATTEMPTS_MAX {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let (user, request) = (format!("u{buyer}-{attempt}"), format!("r{buyer}-{attempt}"));
                let body = json!({"goods_id": GOODS, "user_id": user, "quantity": 1, "request_id": request});
                // A call cut off by the kill is an attempt without an answer.
                let Ok(response) = f
                    .http
                    .post(format!("{}{}", syncer.url(), seckill_api::DEDUCT_PATH))
                    .header(seckill_api::SECRET_HEADER, EDGE_SECRET)
                    .json(&body)
                    .send()
                    .await
                else {
                    continue;
                };
                let status = response.status().as_u16();
                let reply: Value = response.json().await.unwrap_or(Value::Null);
                let order_id = (status == 200 && reply["outcome"] == "won")
                    .then(|| reply["order_id"].as_str().unwrap_or_default().to_owned());
                if order_id.is_some() {
                    won.fetch_add(1, Ordering::Relaxed);
                }
                answers.lock().unwrap().push(Answer {
                    user,
                    request,
                    status,
                    order_id,
                });
            }
        }));
    }

    let wins = |at_least: u64| {
        let won = won.clone();
        move || {
            let count = won.load(Ordering::Relaxed);
            async move { Ok((count >= at_least).then_some(())) }
        }
    };
    wait_for(
        "wins before the kill",
        Duration::from_secs(60),
        wins(WON_BEFORE_KILL),
    )
    .await
    .unwrap();
    redis.kill();
    let won_at_kill = won.load(Ordering::Relaxed);
    redis.restart().await.unwrap();
    // Every answer `won` given before the restart is in the Redis that came back.
    let before: Vec<Answer> = answers.lock().unwrap().clone();
    let (requests, _) = assert_kept(&redis, &f, GOODS, &before).await;
    assert!(requests.len() as u64 >= won_at_kill);
    wait_for(
        "wins after the restart",
        Duration::from_secs(60),
        wins(won_at_kill + WON_AFTER_RESTART),
    )
    .await
    .unwrap();
    stop.store(true, Ordering::Relaxed);
    for buyer in storm {
        buyer.await.unwrap();
    }

    let answers = std::mem::take(&mut *answers.lock().unwrap());
    let refused = answers.iter().filter(|a| a.status == 503).count();
    assert!(refused > 0, "the kill came in the middle of the storm");
    let winners: Vec<&Answer> = answers.iter().filter(|a| a.order_id.is_some()).collect();
    assert!(winners.len() as u64 >= won_at_kill + WON_AFTER_RESTART);

    // And every answer `won` after it too.
    let (requests, reservations) = assert_kept(&redis, &f, GOODS, &answers).await;
    let mut conn = redis.connection().await.unwrap();
    // The counters agree with the records: every unit is available, reserved or sold, and
    // each reservation (attempts cut off by the kill included) is one request's.
    // Read as text: the sale hash also holds its tier's name.
    let sale: HashMap<String, String> = redis::cmd("HGETALL")
        .arg(f.key(GOODS, "sale"))
        .query_async(&mut conn)
        .await
        .unwrap();
    let field = |name: &str| {
        sale.get(name)
            .and_then(|v| v.parse::<i64>().ok())
            .unwrap_or(-1)
    };
    assert_eq!(
        field("available") + field("reserved") + field("sold"),
        STOCK as i64,
        "{sale:?}"
    );
    assert_eq!(field("reserved"), reservations.len() as i64);
    assert_eq!(requests.len(), reservations.len());
    assert_eq!(field("seq"), requests.len() as i64);

    // And a buyer who asks again with the same request id is told the same order.
    for answer in winners.iter().step_by(7) {
        let (status, reply) = f
            .deduct(&syncer, GOODS, &answer.user, &answer.request)
            .await;
        assert_eq!(status, 200, "{reply}");
        assert_eq!(reply["outcome"], "won", "{reply}");
        assert_eq!(reply["order_id"].as_str(), answer.order_id.as_deref());
    }
}

/// Asserts that every answer `won` among `answers` is in Redis: its request names the same
/// order, the order is a live reservation, no order was answered twice. Returns the requests
/// and reservations hashes.
async fn assert_kept(
    redis: &RedisServer,
    f: &Fixture,
    goods: &str,
    answers: &[Answer],
) -> (HashMap<String, String>, HashMap<String, String>) {
    let mut conn = redis.connection().await.unwrap();
    let mut hashes = Vec::new();
    for suffix in ["requests", "reservations"] {
        let hash: HashMap<String, String> = redis::cmd("HGETALL")
            .arg(f.key(goods, suffix))
            .query_async(&mut conn)
            .await
            .unwrap();
        hashes.push(hash);
    }
    let (reservations, requests) = (hashes.pop().unwrap(), hashes.pop().unwrap());
    let mut orders = HashSet::new();
    for answer in answers {
        let Some(order) = answer.order_id.as_deref() else {
            continue;
        };
        assert_eq!(
            requests.get(&answer.request).map(String::as_str),
            Some(format!("{}|1|{order}", answer.user).as_str()),
            "request {} was answered won ({order}) and then lost",
            answer.request
        );
        assert!(reservations.contains_key(order), "reservation {order} lost");
        assert!(orders.insert(order), "order {order} answered twice");
    }
    (requests, reservations)
}

#[tokio::test]
async fn replicas_one_answers_nothing_a_replica_does_not_hold() {
    const GOODS: &str = "g";
    let f = Fixture::new("durability_replicas").await;
    let master = RedisServer::start(&f.scratch.path).await.unwrap();
    let mut replica = RedisServer::start_replica(&f.scratch.path, &master)
        .await
        .unwrap();
    let replicas_1 = [("SECKILL_REDIS_DURABILITY", "replicas:1")];
    let syncer = f.syncer(&master, &replicas_1).await;
    f.open(&syncer, GOODS, 1_000).await;
    let requests = f.key(GOODS, "requests");

    // With the replica attached: won, and the replica holds each win when its answer comes.
    let mut orders = Vec::new();
    for i in 0..10 {
        let request = format!("r{i}");
        let (status, reply) = f.deduct(&syncer, GOODS, &format!("u{i}"), &request).await;
        assert_eq!(
            (status, reply["outcome"].as_str()),
            (200, Some("won")),
            "{reply}"
        );
        let order = reply["order_id"].as_str().unwrap().to_owned();
        let on_replica = hget(&replica, &requests, &request).await;
        assert_eq!(on_replica.as_deref().map(order_of), Some(order.as_str()));
        orders.push(order);
    }
    let admin = Admin::new(&f.http, syncer.url());
    let (status, body) = admin.settle(&orders[0], "confirm").await.unwrap();
    assert_eq!(status, 200, "{body}");
    let settled = hget(&replica, &f.key(GOODS, "settled"), &orders[0]).await;
    assert_eq!(settled.as_deref(), Some("confirmed"));

    // The replica stalls: nobody is told won, within the deadline; the reservation stays.
    replica.pause().unwrap();
    let started = Instant::now();
    let (status, reply) = f.deduct(&syncer, GOODS, "u-p", "r-p").await;
    assert_eq!(
        (status, reply["error"].as_str()),
        (503, Some("unavailable")),
        "{reply}"
    );
    assert!(started.elapsed() < ANSWER_WITHIN, "{:?}", started.elapsed());
    let kept = hget(&master, &requests, "r-p")
        .await
        .expect("the reservation stays");
    let kept_order = order_of(&kept).to_owned();
    // The gate's batch endpoint: each attempt refused on its own, as for a Redis fault.
    let attempts = json!({"attempts": [{"goods_id": GOODS, "user_id": "u-q", "quantity": 1, "request_id": "r-q"}], "timeout_ms": 500});
    let (status, reply) = f
        .post(&syncer, seckill_api::DEDUCT_BATCH_PATH, attempts)
        .await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["replies"][0]["error"], "unavailable", "{reply}");
    // A confirm is not reported done either.
    let (status, body) = admin.settle(&orders[1], "confirm").await.unwrap();
    assert_eq!(status, 503, "{body}");

    // While a WAIT blocks, health checks and the admin API do not queue behind it.
    let blocked = {
        let (http, url) = (f.http.clone(), syncer.url());
        tokio::spawn(async move {
            http.post(format!("{url}{}", seckill_api::DEDUCT_PATH))
                .header(seckill_api::SECRET_HEADER, EDGE_SECRET)
                .json(&json!({"goods_id": GOODS, "user_id": "u-w", "quantity": 1, "request_id": "r-w"}))
                .send()
                .await
                .map(|r| r.status().as_u16())
        })
    };
    wait_for("a WAIT blocking on the master", ANSWER_WITHIN, || async {
        let info = master.info("clients").await?;
        Ok(info
            .lines()
            .any(|l| {
                l.trim()
                    .strip_prefix("blocked_clients:")
                    .is_some_and(|n| n != "0")
            })
            .then_some(()))
    })
    .await
    .unwrap();
    let health = f
        .http
        .get(format!("{}/healthz", syncer.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status().as_u16(), 200);
    assert!(
        !blocked.is_finished(),
        "health was only answered once the WAIT ended: it queued behind it"
    );
    assert_eq!(blocked.await.unwrap().unwrap(), 503);

    // A retry through another syncer (a connection that never wrote) while the replica still
    // stalls: its script only reads, yet it is not answered won on the unreplicated write.
    let other = f.syncer(&master, &replicas_1).await;
    let (status, reply) = f.deduct(&other, GOODS, "u-p", "r-p").await;
    assert_eq!(status, 503, "{reply}");

    // The replica resumes: the retry gets the same order, won, and the replica holds it.
    replica.resume().unwrap();
    let reply = wait_for("the retry to be won", Duration::from_secs(20), || async {
        let (status, reply) = f.deduct(&other, GOODS, "u-p", "r-p").await;
        Ok((status == 200).then_some(reply))
    })
    .await
    .unwrap();
    assert_eq!(reply["outcome"], "won", "{reply}");
    assert_eq!(reply["order_id"].as_str(), Some(kept_order.as_str()));
    let on_replica = hget(&replica, &requests, "r-p").await;
    assert_eq!(
        on_replica.as_deref().map(order_of),
        Some(kept_order.as_str())
    );
    let (status, body) = admin.settle(&orders[1], "confirm").await.unwrap();
    assert_eq!(
        (status, body["state"].as_str()),
        (200, Some("confirmed")),
        "{body}"
    );

    // The replica is gone: refused again, within the deadline.
    replica.kill();
    wait_for(
        "the master to see its replica gone",
        Duration::from_secs(20),
        || async {
            let info = master.info("replication").await?;
            Ok(info
                .lines()
                .any(|l| l.trim() == "connected_slaves:0")
                .then_some(()))
        },
    )
    .await
    .unwrap();
    let started = Instant::now();
    let (status, reply) = f.deduct(&syncer, GOODS, "u-z", "r-z").await;
    assert_eq!(status, 503, "{reply}");
    assert!(started.elapsed() < ANSWER_WITHIN, "{:?}", started.elapsed());

    let metrics = syncer.metrics().await.unwrap();
    let ok = counter(&metrics, r#"seckill_durability_waits_total{result="ok"}"#);
    let short = counter(
        &metrics,
        r#"seckill_durability_waits_total{result="short"}"#,
    );
    assert!(ok >= 11, "{metrics}");
    assert!(short >= 1, "{metrics}");
    assert!(
        metrics.contains("# HELP seckill_durability_waits_total"),
        "{metrics}"
    );
}
