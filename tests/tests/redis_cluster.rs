//! The syncer on a Redis Cluster of three masters (`redis+cluster://` in `--redis-url`), with
//! the relay and the writer running against real Tansu and MariaDB: goods whose hash tags land
//! on different masters are defined, preheated, sold through the deduct endpoints (single and
//! batch) and through Envoy; confirm, cancel and the sweeper end reservations on every master;
//! MySQL holds one row per winner and `reconcile --orders` is clean; a master that forgot
//! (FLUSHALL of that node alone) has its goods re-seeded from MySQL while the goods of the
//! other masters go on; a master lost without a replica moves the sale to MySQL and back;
//! `--redis-durability aof` is checked on every master, and `replicas:N` waits on the
//! replicas of each goods' own master.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use futures::future::join_all;
use seckill_e2e::pipeline::{epoch_of, Pipeline};
use seckill_e2e::process::wait_for;
use seckill_e2e::redis_cluster::{key_slot, RedisCluster};
use seckill_e2e::redis_server::{AOF_ALWAYS, AOF_EVERYSEC};
use seckill_e2e::stack::{now_ms, Stack, StackOptions, EDGE_SECRET};
use seckill_e2e::syncer::{Role, SyncerArgs, SyncerProcess};
use serde_json::{json, Value};

const DRAIN: Duration = Duration::from_secs(120);
/// How long a buyer keeps retrying with the same request id through 503s.
const BUYER_PATIENCE: Duration = Duration::from_secs(60);

/// Goods ids, one per master, in the order of the masters' first slots: `{stem}-N` for the
/// first N whose hash tag lands on each master.
async fn goods_on_each_master(cluster: &RedisCluster, prefix: &str, stem: &str) -> Vec<String> {
    let masters = cluster.master_ports().await.unwrap();
    assert_eq!(masters.len(), 3, "three masters");
    let mut chosen: BTreeMap<usize, String> = BTreeMap::new();
    for i in 0..1_000 {
        let goods = format!("{stem}-{i}");
        let port = cluster
            .master_of_key(&format!("{prefix}:{{{goods}}}:sale"))
            .await
            .unwrap();
        let index = masters.iter().position(|&p| p == port).unwrap();
        chosen.entry(index).or_insert(goods);
        if chosen.len() == masters.len() {
            break;
        }
    }
    assert_eq!(chosen.len(), 3, "a goods id for every master");
    chosen.into_values().collect()
}

/// Every key of `goods` lives on the master `cluster` says serves its hash tag, and on no
/// other (read from each node directly, not through the cluster client); the slot computed
/// here is the one the server computes.
async fn assert_keys_live_on_their_master(cluster: &RedisCluster, prefix: &str, goods: &str) {
    let sale = format!("{prefix}:{{{goods}}}:sale");
    let home = cluster.master_of_key(&sale).await.unwrap();
    let mut conn = cluster.node(home).unwrap().connection().await.unwrap();
    let slot: u16 = redis::cmd("CLUSTER")
        .arg("KEYSLOT")
        .arg(&sale)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(slot, key_slot(&sale), "the server's slot of {sale}");
    for port in cluster.master_ports().await.unwrap() {
        let mut conn = cluster.node(port).unwrap().connection().await.unwrap();
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{prefix}:{{{goods}}}:*"))
            .query_async(&mut conn)
            .await
            .unwrap();
        if port == home {
            for suffix in ["sale", "epoch"] {
                let key = format!("{prefix}:{{{goods}}}:{suffix}");
                assert!(keys.contains(&key), "{key} on its master {port}: {keys:?}");
            }
        } else {
            assert!(keys.is_empty(), "{goods}'s keys on master {port}: {keys:?}");
        }
    }
}

/// One buyer's attempt through `POST /v1/deduct`, retried with the same request id through
/// 503s (a Redis call cut short by a loaded machine: the gate's buyers are told to retry);
/// the final answer.
async fn deduct(p: &Pipeline<RedisCluster>, goods: &str, user: &str, request: &str) -> Value {
    p.deduct_patiently(goods, user, request, BUYER_PATIENCE)
        .await
        .unwrap()
}

/// Buyers `{tag}-0..count` (request id = buyer), 20 at a time, each patient: the order id
/// each one won, by buyer.
async fn sell_in_order(
    p: &Arc<Pipeline<RedisCluster>>,
    goods: &str,
    tag: &str,
    count: usize,
) -> Vec<Option<String>> {
    let mut orders = Vec::with_capacity(count);
    for chunk in (0..count).collect::<Vec<_>>().chunks(20) {
        let answers = join_all(chunk.iter().map(|i| {
            let p = p.clone();
            let (goods, user) = (goods.to_owned(), format!("{tag}-{i}"));
            async move { deduct(&p, &goods, &user, &user).await }
        }))
        .await;
        for answer in answers {
            let outcome = answer["outcome"].as_str().unwrap_or_default();
            assert!(["won", "sold_out"].contains(&outcome), "{answer}");
            orders.push(answer["order_id"].as_str().map(str::to_owned));
        }
    }
    orders
}

/// The order ids won, in buyer order.
async fn sell(
    p: &Arc<Pipeline<RedisCluster>>,
    goods: &str,
    tag: &str,
    count: usize,
) -> Vec<String> {
    sell_in_order(p, goods, tag, count)
        .await
        .into_iter()
        .flatten()
        .collect()
}

/// Attempts through `POST /v1/deduct/batch` (what the filter sends): the replies, in order.
async fn deduct_batch(p: &Pipeline<RedisCluster>, attempts: Vec<Value>) -> Vec<Value> {
    let reply = p
        .http
        .post(format!("{}{}", p.api.url(), seckill_api::DEDUCT_BATCH_PATH))
        .header(seckill_api::SECRET_HEADER, EDGE_SECRET)
        .json(&json!({ "attempts": attempts }))
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status(), 200);
    let body: Value = reply.json().await.unwrap();
    body["replies"].as_array().unwrap().clone()
}

async fn claim(p: &Pipeline<RedisCluster>, orders: &[String]) {
    let reply: Value = p
        .http
        .post(format!("{}{}", p.api.url(), seckill_api::CLAIM_PATH))
        .header(seckill_api::SECRET_HEADER, EDGE_SECRET)
        .json(&json!({ "order_ids": orders }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(reply["claimed"], orders.len(), "{reply}");
}

async fn settle_ok(p: &Pipeline<RedisCluster>, order: &str, action: &str, state: &str) {
    let (status, body) = p.settle(order, action).await.unwrap();
    assert_eq!(status, 200, "{action} {order}: {body}");
    assert_eq!(body["state"], state, "{action} {order}: {body}");
}

/// MySQL agrees with Redis on `goods` (counters and every settled order's state), with one
/// row per order id, `rows` in all.
async fn assert_mysql_follows(p: &Pipeline<RedisCluster>, goods: &str, rows: i64) {
    p.wait_for_counters_to_match(goods, DRAIN).await.unwrap();
    assert_eq!(p.order_rows(goods).await.unwrap(), (rows, rows), "{goods}");
    let settled = p.settled_orders(goods).await.unwrap();
    let in_mysql = p.mysql_orders(goods).await.unwrap();
    for (order, state) in &settled {
        let (row_state, reason) = &in_mysql[order];
        let expected = match reason {
            Some(reason) => format!("{row_state}:{reason}"),
            None => row_state.clone(),
        };
        assert_eq!(&expected, state, "order {order}");
    }
}

fn assert_reconcile_clean(p: &Pipeline<RedisCluster>, goods: &[String]) {
    let (code, report) = p.reconcile(&["--orders"]).unwrap();
    assert_eq!(code, 0, "reconcile --orders: {report:#}");
    let reported: HashSet<&str> = report["goods"]
        .as_array()
        .map(|all| all.iter().filter_map(|g| g["goods_id"].as_str()).collect())
        .unwrap_or_default();
    for g in goods {
        assert!(reported.contains(g.as_str()), "{g} in {report:#}");
    }
}

/// Runs `seckill-syncer reseed`; returns whether it succeeded and what it printed.
fn reseed(p: &Pipeline<RedisCluster>, goods: &str) -> (bool, String) {
    let output = p
        .command("reseed")
        .unwrap()
        .args(["--kafka-brokers", &p.broker.bootstrap()])
        .args(["--drain-timeout-s", "60"])
        .arg(goods)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn goods_on_three_masters_sell_settle_reach_mysql_and_a_forgetful_master_is_reseeded() {
    // A fast sweeper for the short payment window; no MySQL fallback, so the re-seed below is
    // the operator's (the automatic way back is the same code, `reseed.rs`).
    let env = [
        ("SECKILL_SWEEP_EVERY_MS", "50"),
        ("SECKILL_FALLBACK_RATE", "0"),
    ];
    let p = Arc::new(
        Pipeline::<RedisCluster>::start_on("cluster_sale", &[], &env, &[])
            .await
            .expect("the fixture starts on a cluster"),
    );
    assert!(p.redis.url().starts_with("redis+cluster://127.0.0.1:"));
    let (_relay, _writer) = p.spawn_relay_and_writer(100, 20).await.unwrap();

    // Three goods, one on each master; a is the one on the master that also holds the sales
    // index (which has no hash tag of a goods), so that flushing a's master below loses both.
    let mut goods = goods_on_each_master(&p.redis, &p.prefix, "sku").await;
    let index = format!("{}:sales", p.prefix);
    let index_home = p.redis.master_of_key(&index).await.unwrap();
    let mut homes = Vec::new();
    for g in &goods {
        let sale = format!("{}:{{{g}}}:sale", p.prefix);
        homes.push(p.redis.master_of_key(&sale).await.unwrap());
    }
    assert_eq!(
        homes.iter().collect::<HashSet<_>>().len(),
        3,
        "the three goods live on three masters: {homes:?}"
    );
    let on_index_master = homes.iter().position(|&h| h == index_home).unwrap();
    goods.swap(0, on_index_master);
    let (a, b, c) = (&goods[0], &goods[1], &goods[2]);
    let ends = now_ms() + 3_600_000;
    p.define_sale(a, 40, 1, ends, 900).await.unwrap();
    p.define_sale(b, 40, 1, ends, 900).await.unwrap();
    // c: a 2 s payment window, for the sweeper.
    p.define_sale(c, 20, 1, ends, 2).await.unwrap();
    for g in &goods {
        assert_keys_live_on_their_master(&p.redis, &p.prefix, g).await;
    }

    // a: 40 buyers through the single endpoint, 64 at once: all win (won_a[i] is a-i's), 40
    // distinct order ids; 20 more find it sold out.
    let won_a = sell(&p, a, "a", 40).await;
    assert_eq!(won_a.len(), 40);
    assert_eq!(won_a.iter().collect::<HashSet<_>>().len(), 40);
    assert!(sell(&p, a, "late-a", 20).await.is_empty());
    // A winner's retry gets the same order.
    let retry = deduct(&p, a, "a-0", "a-0").await;
    assert_eq!(retry["outcome"], "won", "{retry}");
    assert_eq!(
        retry["order_id"].as_str(),
        Some(won_a[0].as_str()),
        "{retry}"
    );

    // b: 60 buyers through the batch endpoint, two batches of 30: exactly 40 win, claimed.
    let mut won_b = Vec::new();
    let mut outcomes: HashMap<String, usize> = HashMap::new();
    for round in 0..2 {
        let mut users: Vec<String> = (0..30).map(|i| format!("b-{}", round * 30 + i)).collect();
        // Attempts answered `unavailable` (a Redis call cut short) are sent again with the
        // same request ids, as the gate's buyers would.
        let deadline = std::time::Instant::now() + BUYER_PATIENCE;
        while !users.is_empty() {
            assert!(
                std::time::Instant::now() < deadline,
                "unavailable for {users:?}"
            );
            let attempts = users
                .iter()
                .map(|user| json!({"goods_id": b, "user_id": user, "quantity": 1, "request_id": user}))
                .collect();
            let replies = deduct_batch(&p, attempts).await;
            let mut again = Vec::new();
            for (user, reply) in users.iter().zip(replies) {
                if reply["error"] == "unavailable" {
                    again.push(user.clone());
                    continue;
                }
                let outcome = reply["outcome"].as_str().unwrap_or("error").to_owned();
                if outcome == "won" {
                    won_b.push(reply["order_id"].as_str().unwrap().to_owned());
                }
                *outcomes.entry(outcome).or_default() += 1;
            }
            users = again;
        }
    }
    assert_eq!(outcomes.get("won"), Some(&40), "{outcomes:?}");
    assert_eq!(outcomes.get("sold_out"), Some(&20), "{outcomes:?}");
    claim(&p, &won_b).await;

    // c: 20 buyers win; nobody pays within 2 s: the sweeper releases all of them.
    let won_c = sell(&p, c, "c", 20).await;
    assert_eq!(won_c.len(), 20);

    // Settle on two masters: confirm 10 and cancel 5 of a; confirm 10 and cancel 5 of b.
    for (orders, g) in [(&won_a, a), (&won_b, b)] {
        for order in &orders[..10] {
            settle_ok(&p, order, "confirm", "confirmed").await;
        }
        for order in &orders[10..15] {
            settle_ok(&p, order, "cancel", "released").await;
        }
        assert_eq!(
            p.redis_counters(g).await.unwrap(),
            (5, 25, 10, 0, 40),
            "{g}: available, reserved, sold, lapsed, total"
        );
    }
    wait_for(
        "c's reservations to expire",
        Duration::from_secs(30),
        || async { Ok((p.redis_counters(c).await?.0 == 20).then_some(())) },
    )
    .await
    .unwrap();
    let settled_c = p.settled_orders(c).await.unwrap();
    assert_eq!(settled_c.len(), 20);
    assert!(
        settled_c.values().all(|s| s == "released:expired"),
        "{settled_c:?}"
    );
    assert_eq!(p.redis_counters(c).await.unwrap(), (20, 0, 0, 0, 20));

    // MySQL: one row per winner, every state as Redis has it; reconcile is clean.
    assert_mysql_follows(&p, a, 40).await;
    assert_mysql_follows(&p, b, 40).await;
    assert_mysql_follows(&p, c, 20).await;
    assert_reconcile_clean(&p, &goods);

    // a's master forgets everything (FLUSHALL on that node alone): a's sale and the sales
    // index the relay, the sweeper and reconcile walk. b and c, on the other masters, keep
    // theirs; the syncer puts every goods whose sale Redis holds back into the index (within
    // a second), or b's and c's new events would never be relayed; a goes back in with its
    // re-seed.
    let home_a = p
        .redis
        .master_of_key(&format!("{}:{{{a}}}:sale", p.prefix))
        .await
        .unwrap();
    assert_eq!(home_a, index_home);
    p.redis.flush_node(home_a).await.unwrap();
    let conn = p.redis.connection().await.unwrap();
    let exists = |key: String| {
        let mut conn = conn.clone();
        async move {
            redis::cmd("EXISTS")
                .arg(key)
                .query_async::<u32>(&mut conn)
                .await
                .unwrap()
        }
    };
    assert_eq!(exists(format!("{}:{{{a}}}:sale", p.prefix)).await, 0);
    assert_eq!(exists(format!("{}:{{{b}}}:sale", p.prefix)).await, 1);
    assert_eq!(exists(format!("{}:{{{c}}}:sale", p.prefix)).await, 1);
    let index_members = || async {
        let members: HashSet<String> = redis::cmd("SMEMBERS")
            .arg(&index)
            .query_async(&mut conn.clone())
            .await
            .unwrap();
        members
    };
    wait_for("the sales index to name b and c again", DRAIN, || async {
        let members = index_members().await;
        Ok((members.contains(b) && members.contains(c)).then_some(()))
    })
    .await
    .unwrap();
    assert!(!index_members().await.contains(a), "a's sale is gone");
    // a is not decided from a Redis that forgot it (no fallback here: 503 until re-seeded).
    let (status, _) = {
        let reply = p
            .http
            .post(format!("{}{}", p.api.url(), seckill_api::DEDUCT_PATH))
            .header(seckill_api::SECRET_HEADER, EDGE_SECRET)
            .json(&json!({"goods_id": a, "user_id": "late", "quantity": 1, "request_id": "late"}))
            .send()
            .await
            .unwrap();
        (reply.status().as_u16(), ())
    };
    assert_eq!(status, 503, "a forgotten goods is not sold from Redis");

    let (ok, printed) = reseed(&p, a);
    assert!(ok, "reseed: {printed}");
    assert!(index_members().await.contains(a), "a is in the index again");
    assert_keys_live_on_their_master(&p.redis, &p.prefix, a).await;
    let (stock, reserved, sold, lapsed, total) = p.mysql_counters(a).await.unwrap();
    assert_eq!(
        p.redis_counters(a).await.unwrap(),
        (stock, reserved, sold, lapsed, total),
        "a re-seeded from MySQL"
    );
    assert_eq!((stock, reserved, sold), (5, 25, 10));
    // Old orders of a settle by id; a paid buyer is still at the limit.
    settle_ok(&p, &won_a[15], "confirm", "confirmed").await;
    settle_ok(&p, &won_a[16], "cancel", "released").await;
    let paid = deduct(&p, a, "a-0", "a-0-again").await;
    assert_eq!(paid["outcome"], "duplicate", "{paid}");
    // a sells out its 6 units to new buyers under a new epoch; b sells its 5 on its own master
    // under its first epoch, untouched by a's loss.
    let new_a = sell(&p, a, "a2", 10).await;
    assert_eq!(new_a.len(), 6, "{new_a:?}");
    assert!(
        new_a.iter().all(|o| epoch_of(o) > epoch_of(&won_a[0])),
        "{new_a:?}"
    );
    let new_b = sell(&p, b, "b2", 10).await;
    assert_eq!(new_b.len(), 5, "{new_b:?}");
    assert!(new_b.iter().all(|o| epoch_of(o) == epoch_of(&won_b[0])));
    assert_eq!(p.redis_counters(a).await.unwrap().0, 0, "a sold out");

    assert_mysql_follows(&p, a, 46).await;
    assert_mysql_follows(&p, b, 45).await;
    assert_reconcile_clean(&p, &goods);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sale_through_envoy_on_a_cluster_reaches_the_shop_and_mysql_once() {
    let options = StackOptions::for_a_crowd("cluster_edge");
    let stack = Arc::new(
        Stack::start_cluster(options)
            .await
            .expect("the stack starts"),
    );
    stack.open_sale("phone", 50, 1).await.unwrap();
    let home = stack
        .redis
        .master_of_key(&stack.goods_key("phone", "sale"))
        .await
        .unwrap();
    eprintln!("phone lives on master {home}");

    // 150 buyers at once through Envoy: exactly 50 win, each forwarded once to the shop with
    // an order id of its own.
    let results = join_all((0..150).map(|i| {
        let stack = stack.clone();
        async move {
            let user = format!("u{i}");
            stack.buy("phone", &user, 1, &user).await.unwrap()
        }
    }))
    .await;
    let mut outcomes: HashMap<&str, usize> = HashMap::new();
    for r in &results {
        *outcomes.entry(r.outcome.as_str()).or_default() += 1;
    }
    assert_eq!(outcomes.get("won"), Some(&50), "{outcomes:?}");
    assert_eq!(outcomes.get("sold_out"), Some(&100), "{outcomes:?}");
    let at_shop = stack.shop.accepted_order_ids();
    assert_eq!(at_shop.len(), 50);
    assert_eq!(at_shop.iter().collect::<HashSet<_>>().len(), 50);
    let live = stack.live("phone").await.unwrap();
    assert_eq!(
        (live["available"].as_i64(), live["reserved"].as_i64()),
        (Some(0), Some(50)),
        "{live}"
    );

    // The pipeline in the syncer moves every sale to MySQL; reconcile is clean.
    wait_for("50 rows in MySQL", DRAIN, || async {
        let (rows,): (i64,) =
            sqlx::query_as("SELECT COUNT(*) FROM orders WHERE goods_id = 'phone'")
                .fetch_one(&stack.db.pool)
                .await?;
        anyhow::ensure!(rows <= 50, "{rows} rows for 50 winners");
        Ok((rows == 50).then_some(()))
    })
    .await
    .unwrap();
    let ids: HashSet<String> =
        sqlx::query_as::<_, (String,)>("SELECT order_id FROM orders WHERE goods_id = 'phone'")
            .fetch_all(&stack.db.pool)
            .await
            .unwrap()
            .into_iter()
            .map(|(id,)| id)
            .collect();
    assert_eq!(ids, at_shop.into_iter().collect::<HashSet<_>>());
    let (code, report) = stack.reconcile(&["--orders"]).unwrap();
    assert_eq!(code, 0, "{report:#}");
    // The sale's keys, read through the cluster client, sit under one hash tag.
    let snapshot = stack.redis_snapshot().await.unwrap();
    assert!(
        snapshot
            .iter()
            .any(|(k, _)| k == &stack.goods_key("phone", "sale")),
        "{snapshot:?}"
    );
}

/// A syncer `serve` against `url` that must refuse to start: its exit code and log.
async fn refused(p: &Pipeline<RedisCluster>, url: &str, env: &[(&str, &str)]) -> (i32, String) {
    let db = p.db.url();
    let args = SyncerArgs {
        redis_url: url,
        mysql_url: &db,
        key_prefix: &p.prefix,
        kafka: None,
    };
    let (status, log) = SyncerProcess::start_refused(&p.scratch.path, &args, env)
        .await
        .unwrap();
    (status.code().unwrap_or(-1), log)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn aof_is_checked_on_every_master_and_a_bad_url_is_refused() {
    let aof = ("SECKILL_REDIS_DURABILITY", "aof");
    // Every master with appendfsync always: the syncer starts with aof and sells.
    let p = Pipeline::<RedisCluster>::start_on("cluster_aof", AOF_ALWAYS, &[aof], &[])
        .await
        .expect("a syncer with aof starts on a cluster whose every master fsyncs");
    let goods = goods_on_each_master(&p.redis, &p.prefix, "aof").await;
    for g in &goods {
        p.open_sale(g, 5, 1).await.unwrap();
        assert_eq!(deduct(&p, g, "u", "r").await["outcome"], "won");
    }

    // One master fsyncs once a second: refused, naming that master.
    let masters = p.redis.master_ports().await.unwrap();
    let lax = masters[1];
    let mut conn = p.redis.node(lax).unwrap().connection().await.unwrap();
    let () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("appendfsync")
        .arg("everysec")
        .query_async(&mut conn)
        .await
        .unwrap();
    let (code, log) = refused(&p, &p.redis.url(), &[aof]).await;
    assert_eq!(code, 1, "{log}");
    assert!(
        log.contains(&format!(
            "the master at 127.0.0.1:{lax} has appendonly yes, appendfsync everysec"
        )) && log.contains("appendfsync always"),
        "{log}"
    );
    // durability none still starts there (not checked), and a URL the syncer cannot read is
    // refused with the form to use.
    drop(conn);
    for (url, says) in [
        (
            format!(
                "redis://127.0.0.1:{},redis://127.0.0.1:{}",
                masters[0], masters[1]
            ),
            "redis+cluster://host:port,host:port",
        ),
        (
            format!("redis+cluster://127.0.0.1:{},", masters[0]),
            "empty",
        ),
        (
            format!("redis+cluster://127.0.0.1:{}/1", masters[0]),
            "only database 0",
        ),
    ] {
        let (code, log) = refused(&p, &url, &[]).await;
        assert_eq!(code, 1, "{url}: {log}");
        assert!(
            log.contains("bad Redis URL") && log.contains(says),
            "{url}: {log}"
        );
    }
    // A cluster URL whose seeds are not a cluster (a node that is not cluster-enabled).
    let plain = seckill_e2e::redis_server::RedisServer::start_with(&p.scratch.path, AOF_EVERYSEC)
        .await
        .unwrap();
    let url = format!("redis+cluster://127.0.0.1:{}", plain.port);
    let (code, log) = refused(&p, &url, &[]).await;
    assert_eq!(code, 1, "{log}");
    assert!(log.contains("cannot connect to the Redis Cluster"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replicas_one_waits_for_the_replica_of_each_goods_own_master() {
    let scratch = seckill_e2e::process::Scratch::new("seckill-cluster-replicas").unwrap();
    let cluster = RedisCluster::start_with(&scratch.path, 3, 1, &[])
        .await
        .expect("a cluster of three masters with a replica each");
    let db = seckill_e2e::mysql_db::TestDatabase::create("cluster_replicas")
        .await
        .unwrap();
    let prefix = format!("t{}", seckill_e2e::process::unique_suffix());
    let args = SyncerArgs {
        redis_url: &cluster.url(),
        mysql_url: &db.url(),
        key_prefix: &prefix,
        kafka: None,
    };
    let env = [
        ("SECKILL_REDIS_DURABILITY", "replicas:1"),
        ("SECKILL_FALLBACK_RATE", "0"),
    ];
    let syncer = SyncerProcess::start_role_with(
        &scratch.path,
        &args,
        Role::Serve { pipeline: false },
        &env,
        &[],
    )
    .await
    .unwrap();
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let admin = seckill_e2e::admin::Admin::new(&http, syncer.url());
    let goods = goods_on_each_master(&cluster, &prefix, "rep").await;
    let window = (now_ms() - 60_000, now_ms() + 3_600_000);
    for g in &goods {
        admin.define_sale(g, 10, 1, window, 900).await.unwrap();
        admin.preheat(g, false).await.unwrap();
    }
    let buy = |g: &str, user: &str| {
        let request = http
            .post(format!("{}{}", syncer.url(), seckill_api::DEDUCT_PATH))
            .header(seckill_api::SECRET_HEADER, EDGE_SECRET)
            .json(&json!({"goods_id": g, "user_id": user, "quantity": 1, "request_id": user}));
        async move {
            let reply = request.send().await.unwrap();
            let status = reply.status().as_u16();
            (status, reply.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    // A win, retried through 503s (the first call of a loaded machine may miss its deadline).
    let win = |g: String, user: &'static str| {
        let buy = &buy;
        async move {
            wait_for(
                &format!("{user} to win {g}"),
                Duration::from_secs(30),
                || async {
                    let (status, body) = buy(&g, user).await;
                    Ok((status != 503).then_some((status, body)))
                },
            )
            .await
            .unwrap()
        }
    };
    // Each win is on its master's replica when it is answered.
    for g in &goods {
        let (status, body) = win(g.clone(), "first").await;
        assert_eq!(
            (status, body["outcome"].as_str()),
            (200, Some("won")),
            "{g}: {body}"
        );
        let sale = format!("{prefix}:{{{g}}}:sale");
        let master = cluster.master_of_key(&sale).await.unwrap();
        let replicas = cluster.replicas_of(master).await.unwrap();
        assert_eq!(replicas.len(), 1, "{g}'s master {master} has one replica");
        let mut conn = cluster
            .node(replicas[0])
            .unwrap()
            .connection()
            .await
            .unwrap();
        let () = redis::cmd("READONLY").query_async(&mut conn).await.unwrap();
        let reserved: Option<i64> = redis::cmd("HGET")
            .arg(&sale)
            .arg("reserved")
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(reserved, Some(1), "{g}: the replica holds the win");
    }

    // The replica of the first goods' master stops: that goods answers 503 (its WAIT, on its
    // own master, is not met), while the goods of the other masters go on winning.
    let (stalled, others) = (&goods[0], &goods[1..]);
    let master = cluster
        .master_of_key(&format!("{prefix}:{{{stalled}}}:sale"))
        .await
        .unwrap();
    let replica = cluster.replicas_of(master).await.unwrap()[0];
    cluster.pause(replica).unwrap();
    let (status, body) = buy(stalled, "second").await;
    assert_eq!(
        status, 503,
        "{stalled} while its master's replica is stopped: {body}"
    );
    for g in others {
        let (status, body) = win(g.clone(), "second").await;
        assert_eq!(
            (status, body["outcome"].as_str()),
            (200, Some("won")),
            "{g}: {body}"
        );
    }
    cluster.resume(replica).unwrap();
    // Resumed: the retry gets the order the unacknowledged call made, once the replica has it.
    let order = wait_for(
        "the retry to be answered",
        Duration::from_secs(30),
        || async {
            let (status, body) = buy(stalled, "second").await;
            Ok((status == 200).then_some(body))
        },
    )
    .await
    .unwrap();
    assert_eq!(order["outcome"], "won", "{order}");
    let live = admin.sale(stalled).await.unwrap()["live"].clone();
    assert_eq!(
        live["reserved"], 2,
        "one order for the retried request: {live}"
    );
}

/// Buyers `{tag}-0..count` of `goods`, 20 at a time, each patient; records every `won`
/// (order id -> buyer), failing on an order id told to two buyers. Returns how many won.
async fn patient_sell(
    p: &Arc<Pipeline<RedisCluster>>,
    goods: &str,
    tag: &str,
    count: usize,
    issued: &mut HashMap<String, String>,
) -> usize {
    let mut won = 0;
    for chunk in (0..count).collect::<Vec<_>>().chunks(20) {
        let answers = join_all(chunk.iter().map(|i| {
            let p = p.clone();
            let (goods, user) = (goods.to_owned(), format!("{tag}-{i}"));
            async move { (user.clone(), deduct(&p, &goods, &user, &user).await) }
        }))
        .await;
        for (user, answer) in answers {
            if answer["outcome"] == "won" {
                let order = answer["order_id"].as_str().unwrap().to_owned();
                if let Some(other) = issued.insert(order.clone(), user.clone()) {
                    assert_eq!(other, user, "order id {order} told to two buyers");
                }
                won += 1;
            }
        }
    }
    won
}

async fn in_fallback(p: &Pipeline<RedisCluster>, goods: &str) -> bool {
    let sale = p.admin().sale(goods).await.unwrap();
    sale["definition"]["fallback"].as_bool().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_master_lost_without_a_replica_moves_the_sale_to_mysql_and_back() {
    let p = Pipeline::<RedisCluster>::start_on("cluster_master_lost", &[], &[], &[])
        .await
        .expect("the fixture starts on a cluster");
    let (_relay, _writer) = p.spawn_relay_and_writer(100, 20).await.unwrap();
    let goods = goods_on_each_master(&p.redis, &p.prefix, "lost").await;
    for g in &goods {
        p.open_sale(g, 40, 1).await.unwrap();
    }
    let p = Arc::new(p);
    let mut issued: HashMap<String, HashMap<String, String>> = HashMap::new();
    for g in &goods {
        let sold = patient_sell(&p, g, "a", 10, issued.entry(g.clone()).or_default()).await;
        assert_eq!(sold, 10);
        p.wait_for_rows(g, 10, DRAIN).await.unwrap();
    }

    // The master of the first goods dies (SIGKILL), with no replica to take over.
    let mut p = Arc::into_inner(p).expect("no other handle");
    let lost = p
        .redis
        .kill_master_of(&format!("{}:{{{}}}:sale", p.prefix, goods[0]))
        .await
        .unwrap();
    let p = Arc::new(p);
    // Buyers of every goods go on (patiently): MySQL decides what Redis cannot.
    for g in &goods {
        let sold = patient_sell(&p, g, "b", 10, issued.get_mut(g).unwrap()).await;
        assert_eq!(sold, 10, "{g} sells on while master {lost} is down");
    }
    let mut moved = Vec::new();
    for g in &goods {
        moved.push((g.clone(), in_fallback(&p, g).await));
    }
    // The lost master's goods is decided by MySQL. The others follow when the breaker (one for
    // all goods) opens on their calls or once the cluster marks the master failed (with
    // Redis's default cluster-require-full-coverage, no node answers then); until then their
    // masters decide them: either way every buyer above was answered, and nothing is sold
    // twice (checked at the end).
    assert!(moved[0].1, "{} is decided by MySQL: {moved:?}", goods[0]);
    eprintln!("master {lost} down: (goods, decided by MySQL): {moved:?}");
    // The master comes back empty, still owning its slots: every goods in MySQL's hands is
    // re-seeded and Redis decides again; each sells out at exactly its stock.
    let mut p = Arc::into_inner(p).expect("no other handle");
    p.redis.restart_node(lost).await.unwrap();
    let p = Arc::new(p);
    for g in &goods {
        wait_for(&format!("{g} back in Redis"), DRAIN, || async {
            Ok((!in_fallback(&p, g).await).then_some(()))
        })
        .await
        .unwrap();
    }
    for g in &goods {
        let sold = patient_sell(&p, g, "c", 30, issued.get_mut(g).unwrap()).await;
        assert_eq!(sold, 20, "{g} sold out at 40");
    }
    for g in &goods {
        let issued = &issued[g];
        assert_eq!(issued.len(), 40, "{g}: 40 order ids, 40 buyers");
        p.wait_for_rows(g, 40, DRAIN).await.unwrap();
        let rows: Vec<(String, String)> =
            sqlx::query_as("SELECT order_id, user_id FROM orders WHERE goods_id = ?")
                .bind(g)
                .fetch_all(&p.db.pool)
                .await
                .unwrap();
        for (order, user) in &rows {
            assert_eq!(issued.get(order), Some(user), "MySQL's row {order}");
        }
        p.wait_for_counters_to_match(g, DRAIN).await.unwrap();
    }
    let (code, report) = p.reconcile(&["--orders"]).unwrap();
    assert_eq!(code, 0, "reconcile is clean: {report:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_goods_redefined_as_db_leaves_nothing_on_its_master() {
    let p = Arc::new(
        Pipeline::<RedisCluster>::start_on("cluster_redefine", &[], &[], &[])
            .await
            .expect("the fixture starts on a cluster"),
    );
    // A goods whose master is not the one holding the sales index: removing its sale and its
    // index entry are two slots on two masters.
    let index = format!("{}:sales", p.prefix);
    let index_home = p.redis.master_of_key(&index).await.unwrap();
    let mut goods = None;
    for g in goods_on_each_master(&p.redis, &p.prefix, "redef").await {
        let home = p
            .redis
            .master_of_key(&format!("{}:{{{g}}}:sale", p.prefix))
            .await
            .unwrap();
        if home != index_home {
            goods = Some(g);
            break;
        }
    }
    let g = goods.expect("a goods on another master than the index");
    let admin = p.admin();
    // A first round in Redis, closing in 2 s, with one sale.
    let ends = now_ms() + 2_000;
    admin
        .define_sale_tier(&g, 10, 1, (now_ms() - 60_000, ends), 900, Some("redis"))
        .await
        .unwrap();
    admin.preheat(&g, false).await.unwrap();
    assert_eq!(deduct(&p, &g, "u0", "u0-r").await["outcome"], "won");
    let mut conn = p.redis.connection().await.unwrap();
    let sale = format!("{}:{{{g}}}:sale", p.prefix);
    let is_member = |conn: &mut redis::cluster_async::ClusterConnection| {
        let mut conn = conn.clone();
        let (index, g) = (index.clone(), g.clone());
        async move {
            redis::cmd("SISMEMBER")
                .arg(index)
                .arg(g)
                .query_async::<bool>(&mut conn)
                .await
                .unwrap()
        }
    };
    assert!(is_member(&mut conn).await);
    wait_for(
        "the first round to close",
        Duration::from_secs(10),
        || async { Ok((now_ms() > ends + 100).then_some(())) },
    )
    .await
    .unwrap();
    // The next round is decided by MySQL: its preheat removes the first round's sale from
    // Redis and the goods from the index.
    admin
        .define_sale_tier(
            &g,
            10,
            1,
            (now_ms() - 1_000, now_ms() + 3_600_000),
            900,
            Some("db"),
        )
        .await
        .unwrap();
    admin.preheat(&g, false).await.unwrap();
    let exists: bool = redis::cmd("EXISTS")
        .arg(&sale)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(!exists, "the first round's sale is gone from its master");
    assert!(!is_member(&mut conn).await, "the goods is out of the index");
    let reply = deduct(&p, &g, "u1", "u1-r").await;
    assert_eq!(
        reply["outcome"], "won",
        "MySQL decides the new round: {reply}"
    );
}
