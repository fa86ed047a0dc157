//! The `redis_sharded` tier on a Redis Cluster of three masters: a goods' stock split over
//! shards in different hash tags (here one per master). Bad shard counts are refused and
//! change nothing; a buyer whose home shard is empty still wins, from another shard; retries
//! with the same request id get the same answer and no second unit; a released unit goes back
//! to its shard and sells again; `sold_out` comes only once every shard is empty; a move of
//! units cut short between the donor's take and the home shard's give (the syncer aborted at
//! the crash point) is completed by the sweeper; and 5,000 attempts through Envoy for 1,000
//! units over 3 shards sell exactly 1,000, every shard to 0, one MySQL row per winner, with
//! reconcile clean. The order digest compares every shard's orders with MySQL's rows and
//! names each difference; `--repair` replays a lost row through its shard's outbox.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::stream::{self, StreamExt};
use seckill_e2e::admin::Admin;
use seckill_e2e::pipeline::{differences, epoch_of, findings, Pipeline};
use seckill_e2e::process::wait_for;
use seckill_e2e::redis_cluster::RedisCluster;
use seckill_e2e::stack::{now_ms, rfc3339, Stack, StackOptions};
use seckill_e2e::syncer::{Role, SyncerArgs, SyncerProcess};
use seckill_syncer::keys::{home_shard, order_parts, shard_id, shard_of_sequence};
use serde_json::{json, Value};

const SHARDS: u32 = 3;
const DRAIN: Duration = Duration::from_secs(120);
/// How long a buyer keeps retrying with the same request id through 503s.
const PATIENCE: Duration = Duration::from_secs(60);

/// A sharded sale open from a minute ago for an hour.
fn sharded_spec(stock: u64, per_user_limit: u32, shards: Value) -> Value {
    let now = now_ms();
    json!({
        "total_stock": stock,
        "per_user_limit": per_user_limit,
        "starts_at": rfc3339(now - 60_000),
        "ends_at": rfc3339(now + 3_600_000),
        "payment_window_s": 900,
        "tier": "redis_sharded",
        "shards": shards,
    })
}

/// Defines a sharded sale of `stock` units (limit 1 per buyer) and preheats it.
async fn open_sharded(admin: &Admin<'_>, goods: &str, stock: u64) {
    let spec = sharded_spec(stock, 1, json!(SHARDS));
    let (status, body) = admin.try_define(goods, &spec).await.unwrap();
    assert_eq!(status, 201, "{body}");
    admin.preheat(goods, false).await.unwrap();
}

/// `count` buyer ids `{tag}-N` whose home shard is `home`.
fn buyers_of(tag: &str, home: u32, count: usize) -> Vec<String> {
    (0..)
        .map(|i| format!("{tag}-{i}"))
        .filter(|user| home_shard(user, SHARDS) == home)
        .take(count)
        .collect()
}

/// A goods id `{stem}-N` whose shards' hash tags land on three different masters.
async fn goods_over_three_masters(cluster: &RedisCluster, prefix: &str, stem: &str) -> String {
    for i in 0..1_000 {
        let goods = format!("{stem}-{i}");
        let mut masters = HashSet::new();
        for shard in 0..SHARDS {
            let key = format!("{prefix}:{{{}}}:sale", shard_id(&goods, shard));
            masters.insert(cluster.master_of_key(&key).await.unwrap());
        }
        if masters.len() == SHARDS as usize {
            return goods;
        }
    }
    panic!("no goods id whose shards land on three masters");
}

/// The shard that issued an order.
fn shard_of(order_id: &str) -> u32 {
    let (_, _, sequence) = order_parts(order_id).unwrap();
    shard_of_sequence(sequence, SHARDS)
}

/// One attempt through `POST /v1/deduct`, retried with the same request id through 503s (a
/// loaded machine's slow Redis call; stock on its way between shards): the final answer.
async fn attempt(p: &Pipeline<RedisCluster>, goods: &str, user: &str, request: &str) -> Value {
    p.deduct_patiently(goods, user, request, PATIENCE)
        .await
        .unwrap()
}

/// The shards' counters through the admin API: (available, total, in transit) by shard.
async fn shards_of(p: &Pipeline<RedisCluster>, goods: &str) -> Vec<(i64, i64, i64)> {
    let sale = p.admin().sale(goods).await.unwrap();
    let shards = sale["shards"]
        .as_array()
        .unwrap_or_else(|| panic!("{sale}"));
    assert_eq!(shards.len(), SHARDS as usize, "{sale}");
    shards
        .iter()
        .map(|s| {
            let n = |field: &str| s[field].as_i64().unwrap_or_else(|| panic!("{field}: {s}"));
            (n("available"), n("total"), n("in_transit"))
        })
        .collect()
}

fn available(shards: &[(i64, i64, i64)]) -> Vec<i64> {
    shards.iter().map(|s| s.0).collect()
}

/// Reconcile with the order digest (every shard's orders against MySQL's rows) exits 0,
/// settled, once the pipeline has drained.
async fn wait_for_clean_reconcile(p: &Pipeline<RedisCluster>, goods: &str) -> Value {
    wait_for("a clean, settled reconcile", DRAIN, || async {
        let (code, report) = p.reconcile(&["--orders", "--goods", goods])?;
        Ok((code == 0 && report["settled"] == true).then_some(report))
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stock_moves_to_an_empty_home_shard_and_retries_and_releases_stay_exact() {
    let p = Arc::new(Pipeline::start_cluster("sharded_moves").await.unwrap());
    let _pipeline = p.spawn_relay_and_writer(100, 20).await.unwrap();
    let goods = goods_over_three_masters(&p.redis, &p.prefix, "hot").await;
    let admin = p.admin();

    // Bad shard counts: a clear 400, and nothing defined.
    let bad = [
        sharded_spec(6, 1, json!(1)),
        sharded_spec(6, 1, json!(17)),
        sharded_spec(6, 1, json!(0)),
        sharded_spec(6, 1, json!("three")),
        sharded_spec(6, 1, Value::Null),
        sharded_spec(2, 1, json!(3)),
    ];
    for spec in bad {
        let (status, body) = admin.try_define(&goods, &spec).await.unwrap();
        assert_eq!(status, 400, "{spec}: {body}");
        assert!(body.to_string().contains("shards"), "{body}");
    }
    let mut unsharded = sharded_spec(6, 1, json!(3));
    unsharded["tier"] = json!("redis");
    let (status, body) = admin.try_define(&goods, &unsharded).await.unwrap();
    assert_eq!(status, 400, "{body}");
    let nothing = p.admin().sale(&goods).await.unwrap();
    assert_eq!(
        nothing["error"], "not_found",
        "a refused sale is not defined: {nothing}"
    );

    // 6 units over 3 shards: 2 each.
    open_sharded(&admin, &goods, 6).await;
    assert_eq!(shards_of(&p, &goods).await, vec![(2, 2, 0); 3]);

    let home0 = buyers_of("b", 0, 9);
    let order = |answer: &Value| answer["order_id"].as_str().unwrap().to_owned();
    // Shard 0's own two units.
    for user in &home0[..2] {
        let answer = attempt(&p, &goods, user, user).await;
        assert_eq!(answer["outcome"], "won", "{answer}");
        assert_eq!(shard_of(&order(&answer)), 0, "{answer}");
    }
    assert_eq!(available(&shards_of(&p, &goods).await), [0, 2, 2]);

    // Shard 0 is empty: its next buyer wins a unit moved from shard 1, issued by shard 0
    // (which holds the buyer's count and request id).
    let moved = attempt(&p, &goods, &home0[2], &home0[2]).await;
    assert_eq!(moved["outcome"], "won", "{moved}");
    let moved_order = order(&moved);
    // A shard's count is not the goods': no `remaining` (the gate would cache a 0 as sold out).
    assert!(moved.get("remaining").is_none(), "{moved}");
    assert_eq!(shard_of(&moved_order), 0);
    let shards = shards_of(&p, &goods).await;
    assert_eq!(
        shards,
        vec![(0, 3, 0), (1, 1, 0), (2, 2, 0)],
        "one unit moved"
    );

    // The same request again: the same order, no second unit; a new request of the same
    // buyer: the limit of 1 holds.
    let again = attempt(&p, &goods, &home0[2], &home0[2]).await;
    assert_eq!(
        (again["outcome"].clone(), order(&again)),
        (json!("won"), moved_order.clone())
    );
    let other = attempt(&p, &goods, &home0[2], "another-request").await;
    assert_eq!(other["outcome"], "duplicate", "{other}");
    assert_eq!(shards_of(&p, &goods).await, shards, "nothing moved");

    // Released, the unit goes back to the shard that held it, and sells again there; the
    // released request's retry is told so, with its order, and takes nothing.
    let (status, body) = p.settle(&moved_order, "cancel").await.unwrap();
    assert_eq!(
        (status, body["state"].clone()),
        (200, json!("released")),
        "{body}"
    );
    assert_eq!(available(&shards_of(&p, &goods).await), [1, 1, 2]);
    let after_release = attempt(&p, &goods, &home0[2], &home0[2]).await;
    assert_eq!(after_release["outcome"], "released", "{after_release}");
    assert_eq!(order(&after_release), moved_order);
    let resold = attempt(&p, &goods, &home0[3], &home0[3]).await;
    assert_eq!(resold["outcome"], "won", "{resold}");
    assert_eq!(shard_of(&order(&resold)), 0);
    assert_eq!(available(&shards_of(&p, &goods).await), [0, 1, 2]);

    // Buyers of the empty shard keep winning while any shard has a unit: 3 more; then, and
    // only then, sold out with nothing left (what the gate caches).
    let mut winners = vec![];
    for user in &home0[4..7] {
        let answer = attempt(&p, &goods, user, user).await;
        assert_eq!(answer["outcome"], "won", "{user}: {answer}");
        winners.push(order(&answer));
    }
    let shards = shards_of(&p, &goods).await;
    assert_eq!(available(&shards), [0, 0, 0]);
    assert_eq!(
        shards.iter().map(|s| s.1).sum::<i64>(),
        6,
        "the shards hold the whole stock"
    );
    for user in [
        &home0[7],
        &buyers_of("c", 1, 1)[0],
        &buyers_of("c", 2, 1)[0],
    ] {
        let answer = attempt(&p, &goods, user, user).await;
        assert_eq!(answer["outcome"], "sold_out", "{answer}");
        assert_eq!(answer["remaining"], 0, "{answer}");
    }

    // MySQL: one row per order (6 live, 1 released), counters as Redis's; reconcile clean.
    p.wait_for_rows(&goods, 7, DRAIN).await.unwrap();
    assert_eq!(p.order_rows(&goods).await.unwrap(), (7, 7));
    let report = wait_for_clean_reconcile(&p, &goods).await;
    let only = &report["goods"][0];
    assert_eq!(
        only["shards"].as_array().map(Vec::len),
        Some(3),
        "{report:#}"
    );
    assert_eq!(only["redis"]["reserved"], 6, "{report:#}");
    assert_eq!(only["mysql"]["reserved"], 6, "{report:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_move_cut_short_between_take_and_give_is_completed() {
    let crash = [("SECKILL_CRASH_AT", "shard-after-take")];
    let mut p = Pipeline::start_on("sharded_crash", &[], &crash, &[])
        .await
        .unwrap();
    let goods = goods_over_three_masters(&p.redis, &p.prefix, "cut").await;
    let admin = p.admin();
    open_sharded(&admin, &goods, 3).await;
    let home0 = buyers_of("b", 0, 2);
    let first = attempt(&p, &goods, &home0[0], &home0[0]).await;
    assert_eq!(first["outcome"], "won", "{first}");

    // The next buyer of shard 0 needs a unit from shard 1: the syncer takes it, then aborts
    // before shard 0 gets it.
    let cut = p.deduct_once(&goods, &home0[1], &home0[1]).await;
    assert!(cut.is_err(), "the syncer died at the crash point: {cut:?}");
    let mut conn = p.redis.connection().await.unwrap();
    let key =
        |shard: u32, suffix: &str| format!("{}:{{{}}}:{suffix}", p.prefix, shard_id(&goods, shard));
    let totals = |conn: &mut redis::cluster_async::ClusterConnection| {
        let mut conn = conn.clone();
        let keys: Vec<String> = (0..SHARDS).map(|s| key(s, "sale")).collect();
        async move {
            let mut totals = vec![];
            for sale in keys {
                let total: i64 = redis::cmd("HGET")
                    .arg(&sale)
                    .arg("total")
                    .query_async(&mut conn)
                    .await
                    .unwrap();
                totals.push(total);
            }
            totals
        }
    };
    assert_eq!(
        totals(&mut conn).await,
        [1, 0, 1],
        "shard 1's unit is taken, not given"
    );
    let records: HashMap<String, String> = redis::cmd("HGETALL")
        .arg(key(1, "transfers_out"))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(
        records.len(),
        1,
        "the move is recorded on its donor: {records:?}"
    );

    // A syncer without the crash point: its sweeper finds the move and completes it, once.
    let args = SyncerArgs {
        redis_url: &p.redis.url(),
        mysql_url: &p.db.url(),
        key_prefix: &p.prefix,
        kafka: Some(&p.broker.bootstrap()),
    };
    p.api = SyncerProcess::start_role(&p.scratch.path, &args, Role::Serve { pipeline: false }, &[])
        .await
        .unwrap();
    wait_for(
        "the cut move completed",
        Duration::from_secs(30),
        || async {
            let records: HashMap<String, String> = redis::cmd("HGETALL")
                .arg(key(1, "transfers_out"))
                .query_async(&mut conn.clone())
                .await?;
            Ok(records.is_empty().then_some(()))
        },
    )
    .await
    .unwrap();
    assert_eq!(
        totals(&mut conn).await,
        [2, 0, 1],
        "the unit landed on shard 0, once"
    );
    // The same give again (a second sweeper, a late taker) adds nothing.
    let (id, _) = records.iter().next().unwrap();
    let script = redis::Script::new(seckill_syncer::scripts::TRANSFER);
    let mut give = script.prepare_invoke();
    give.key(key(0, "sale")).key(key(0, "transfers_in"));
    give.arg("give")
        .arg(id)
        .arg(1)
        .arg(epoch_of(first["order_id"].as_str().unwrap()));
    let (status, _, _): (String, u64, u64) = give.invoke_async(&mut conn).await.unwrap();
    assert_eq!(status, "repeat");
    assert_eq!(totals(&mut conn).await, [2, 0, 1], "still once");
    let shards = shards_of(&p, &goods).await;
    assert_eq!(shards, vec![(1, 2, 0), (0, 0, 0), (1, 1, 0)]);

    // The buyer's retry with the same request id wins the landed unit.
    let retry = attempt(&p, &goods, &home0[1], &home0[1]).await;
    assert_eq!(retry["outcome"], "won", "{retry}");
    assert_eq!(available(&shards_of(&p, &goods).await), [0, 0, 1]);
    let _pipeline = p.spawn_relay_and_writer(100, 20).await.unwrap();
    p.wait_for_rows(&goods, 2, DRAIN).await.unwrap();
    wait_for_clean_reconcile(&p, &goods).await;
}

/// What a buyer got through Envoy, after retrying 503s with the same request id.
struct Bought {
    user: String,
    outcome: String,
    order_id: Option<String>,
    /// When the try that got this answer was sent, and when the answer came.
    sent: Instant,
    answered: Instant,
}

async fn buy_patiently(
    stack: &Stack<RedisCluster>,
    goods: &str,
    user: &str,
    request: &str,
) -> Bought {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let sent = Instant::now();
        let result = stack.buy(goods, user, 1, request).await.unwrap();
        if result.status != 503 {
            return Bought {
                user: user.to_owned(),
                outcome: result.outcome,
                order_id: result.order_id,
                sent,
                answered: Instant::now(),
            };
        }
        assert!(
            Instant::now() < deadline,
            "{user} got 503 for {PATIENCE:?}: {:?}",
            result.body
        );
        // A poll inside the buyer's deadline.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn five_thousand_attempts_through_envoy_sell_a_sharded_goods_exactly() {
    const STOCK: u64 = 1_000;
    const BUYERS: usize = 4_000;
    const TWICE: usize = 1_000;
    let options = StackOptions::for_a_crowd("sharded_edge");
    let stack = Arc::new(
        Stack::start_cluster(options)
            .await
            .expect("the stack starts"),
    );
    let goods = goods_over_three_masters(&stack.redis, &stack.key_prefix, "phone").await;
    let admin = stack.admin().unwrap();
    open_sharded(&admin, &goods, STOCK).await;

    // 4,000 buyers, half of them of shard 0 (which holds a third of the stock: it must get
    // units from the others), interleaved; 1,000 of them try twice with a second request id
    // at the same moment: 5,000 attempts, as many in flight at once as the machine takes.
    let (home0, home1, home2) = (
        buyers_of("u", 0, 2_000),
        buyers_of("v", 1, 1_000),
        buyers_of("w", 2, 1_000),
    );
    let buyers: Vec<&String> = (0..1_000)
        .flat_map(|i| [&home0[2 * i], &home1[i], &home0[2 * i + 1], &home2[i]])
        .collect();
    assert_eq!(buyers.len(), BUYERS);
    let attempts: Vec<(String, String)> = buyers
        .iter()
        .enumerate()
        .flat_map(|(i, user)| {
            let tries = if i < TWICE { 2 } else { 1 };
            (0..tries).map(move |t| (user.to_string(), format!("{user}-{t}")))
        })
        .collect();
    assert_eq!(attempts.len(), 5_000);
    let answers: Vec<Bought> = stream::iter(attempts)
        .map(|(user, request)| {
            let (stack, goods) = (stack.clone(), goods.clone());
            async move { buy_patiently(&stack, &goods, &user, &request).await }
        })
        .buffer_unordered(1_000)
        .collect()
        .await;
    let mut outcomes: HashMap<&str, usize> = HashMap::new();
    let mut wins_by_user: HashMap<&str, usize> = HashMap::new();
    let mut orders = HashSet::new();
    for answer in &answers {
        *outcomes.entry(answer.outcome.as_str()).or_default() += 1;
        if answer.outcome == "won" {
            *wins_by_user.entry(answer.user.as_str()).or_default() += 1;
            orders.insert(answer.order_id.clone().expect("a winner has an order id"));
        }
    }
    eprintln!("outcomes: {outcomes:?}");
    let sale = admin.sale(&goods).await.unwrap();
    assert_eq!(
        outcomes.get("won"),
        Some(&(STOCK as usize)),
        "{outcomes:?} {sale:#}"
    );
    assert_eq!(orders.len(), STOCK as usize, "distinct order ids");
    assert!(
        wins_by_user.values().all(|&n| n == 1),
        "the per-user limit of 1 holds"
    );
    // No `sold_out` while any shard had a unit: no winner's request left after the first
    // `sold_out` came back (units only go down in this sale: nothing is released).
    let first_sold_out = answers
        .iter()
        .filter(|a| a.outcome == "sold_out")
        .map(|a| a.answered)
        .min();
    let last_win_sent = answers
        .iter()
        .filter(|a| a.outcome == "won")
        .map(|a| a.sent)
        .max();
    if let (Some(sold_out), Some(win)) = (first_sold_out, last_win_sent) {
        assert!(
            win < sold_out,
            "a winner was sent {:?} after the first sold_out",
            win - sold_out
        );
    }
    for outcome in outcomes.keys() {
        assert!(
            ["won", "sold_out", "duplicate"].contains(outcome),
            "{outcomes:?}"
        );
    }
    // Every shard sold to its last unit (a shard emptied early took units from the others).
    let sale = admin.sale(&goods).await.unwrap();
    let shards = sale["shards"].as_array().unwrap();
    assert_eq!(shards.len(), SHARDS as usize);
    for shard in shards {
        assert_eq!(
            (shard["available"].as_i64(), shard["in_transit"].as_i64()),
            (Some(0), Some(0)),
            "{sale}"
        );
    }
    assert_eq!(sale["live"]["reserved"], STOCK, "{sale}");
    let at_shop = stack.shop.accepted_order_ids();
    assert_eq!(
        at_shop.iter().collect::<HashSet<_>>(),
        orders.iter().collect::<HashSet<_>>()
    );

    // One MySQL row per winner, reconcile clean.
    wait_for("a row per winner", DRAIN, || async {
        let (rows,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM orders WHERE goods_id = ?")
            .bind(&goods)
            .fetch_one(&stack.db.pool)
            .await?;
        anyhow::ensure!(rows <= STOCK as i64, "{rows} rows for {STOCK} winners");
        Ok((rows == STOCK as i64).then_some(()))
    })
    .await
    .unwrap();
    let report = wait_for("a clean, settled reconcile", DRAIN, || async {
        let (code, report) = stack.reconcile(&["--goods", &goods])?;
        Ok((code == 0 && report["settled"] == true).then_some(report))
    })
    .await
    .unwrap();
    assert_eq!(report["goods"][0]["mysql"]["reserved"], STOCK, "{report:#}");
}

/// Sells to buyers `{tag}-0..` one at a time (patient through 503s) until one is told
/// `sold_out`; returns the order ids won, by order id the buyer told.
async fn sell_until_sold_out(
    p: &Pipeline<RedisCluster>,
    goods: &str,
    tag: &str,
    max: usize,
) -> HashMap<String, String> {
    let mut won = HashMap::new();
    for i in 0..max {
        let user = format!("{tag}-{i}");
        let answer = attempt(p, goods, &user, &user).await;
        match answer["outcome"].as_str() {
            Some("won") => {
                let order = answer["order_id"].as_str().unwrap().to_owned();
                assert!(
                    won.insert(order.clone(), user).is_none(),
                    "order id {order} told twice"
                );
            }
            Some("sold_out") => return won,
            _ => panic!("{user}: {answer}"),
        }
    }
    panic!("not sold out after {max} buyers")
}

/// What buyers were told: the buyer of each order id, and each buyer's live order.
#[derive(Default)]
struct Ledger {
    issued: HashMap<String, String>,
    holds: HashMap<String, String>,
}

impl Ledger {
    /// Records a `won`; an order id told twice, or a second live unit of a buyer, fails.
    fn won(&mut self, answer: &Value, user: &str) -> String {
        assert_eq!(answer["outcome"], "won", "{user}: {answer}");
        let order = answer["order_id"].as_str().unwrap().to_owned();
        assert!(
            self.issued.insert(order.clone(), user.to_owned()).is_none(),
            "order id {order} told twice"
        );
        let before = self.holds.insert(user.to_owned(), order.clone());
        assert!(before.is_none(), "{user} holds {before:?} and won {order}");
        order
    }
}

/// Confirms or cancels an order, retrying through 503s (a record on its way to MySQL, a goods
/// switching stores) for up to [`PATIENCE`]: the final (status, body).
async fn settle_patiently(p: &Pipeline<RedisCluster>, order: &str, action: &str) -> (u16, Value) {
    wait_for("a settlement that is not 503", PATIENCE, || async {
        let (status, body) = p.settle(order, action).await?;
        Ok((status != 503).then_some((status, body)))
    })
    .await
    .unwrap()
}

/// Whether MySQL decides the goods now (its fallback), as the admin API says.
async fn in_fallback(p: &Pipeline<RedisCluster>, goods: &str) -> bool {
    let sale = p.admin().sale(goods).await.unwrap();
    sale["definition"]["fallback"]
        .as_bool()
        .unwrap_or_else(|| panic!("{sale}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_master_lost_mid_sale_moves_the_goods_to_mysql_and_back_to_its_shards() {
    const STOCK: u64 = 60;
    let mut p = Pipeline::start_on("sharded_master_lost", &[], &[], &[])
        .await
        .unwrap();
    let _pipeline = p.spawn_relay_and_writer(100, 20).await.unwrap();
    let goods = goods_over_three_masters(&p.redis, &p.prefix, "lost").await;
    open_sharded(&p.admin(), &goods, STOCK).await;
    let mut ledger = Ledger::default();
    for i in 0..30 {
        let user = format!("a-{i}");
        ledger.won(&attempt(&p, &goods, &user, &user).await, &user);
    }
    p.wait_for_rows(&goods, 30, DRAIN).await.unwrap();

    // The master of shard 1 dies (SIGKILL), with no replica. Buyers go on, patiently through
    // 503s: the goods moves to MySQL, which sells what is left and never more.
    let lost = p
        .redis
        .kill_master_of(&format!("{}:{{{}}}:sale", p.prefix, shard_id(&goods, 1)))
        .await
        .unwrap();
    let mut after_kill = Vec::new();
    for i in 0..12 {
        let user = format!("b-{i}");
        after_kill.push(ledger.won(&attempt(&p, &goods, &user, &user).await, &user));
    }
    assert!(
        in_fallback(&p, &goods).await,
        "decided by MySQL with master {lost} down"
    );
    // The first few may have come from the shards still up before the breaker opened; the
    // rest MySQL issued, under an epoch of its own.
    let first_epoch = ledger.issued.keys().map(|o| epoch_of(o)).min().unwrap();
    let in_mysql: Vec<String> = after_kill
        .iter()
        .filter(|o| epoch_of(o) > first_epoch)
        .cloned()
        .collect();
    assert!(in_mysql.len() >= 3, "MySQL sold too few: {after_kill:?}");
    // Their ids name each buyer's home shard, as a shard's would.
    for order in &in_mysql {
        assert_eq!(
            shard_of(order),
            home_shard(&ledger.issued[order], SHARDS),
            "{order}"
        );
    }
    // In MySQL: one reservation confirmed, one cancelled (its unit back on sale).
    let (confirmed, cancelled) = (in_mysql[0].clone(), in_mysql[1].clone());
    for (order, action) in [(&confirmed, "confirm"), (&cancelled, "cancel")] {
        let (status, body) = settle_patiently(&p, order, action).await;
        assert_eq!(status, 200, "{action} {order}: {body}");
    }
    let from_shards: Vec<&String> = after_kill
        .iter()
        .filter(|o| epoch_of(o) == first_epoch)
        .collect();
    // A reservation a shard issued just before the breaker opened may not have reached
    // MySQL (with the master down the cluster serves no slot, so no outbox is relayed): it is
    // not `unknown` there (404) but 503, retry; it settles once it arrives (below).
    for order in &from_shards {
        let (status, body) = p.settle(order, "confirm").await.unwrap();
        assert!(
            status == 503 || status == 200,
            "confirm {order}: {status} {body}"
        );
    }
    ledger.holds.remove(&ledger.issued[&cancelled]);

    // The master comes back empty. The fenced shards' outboxes reach MySQL, then the goods
    // is re-seeded shard by shard from MySQL and Redis decides it again.
    p.redis.restart_node(lost).await.unwrap();
    wait_for("the goods back in Redis", DRAIN, || async {
        Ok((!in_fallback(&p, &goods).await).then_some(()))
    })
    .await
    .unwrap();
    for order in &from_shards {
        let (status, body) = settle_patiently(&p, order, "confirm").await;
        assert_eq!(status, 200, "confirm {order}: {body}");
    }
    let shards = shards_of(&p, &goods).await;
    let held = ledger.holds.len() as i64;
    assert_eq!(
        shards.iter().map(|s| s.0).sum::<i64>(),
        STOCK as i64 - held,
        "MySQL's available units, split over the shards: {shards:?}"
    );
    assert!(
        shards
            .iter()
            .all(|s| (s.0 - (STOCK as i64 - held) / 3).abs() <= 1),
        "split evenly: {shards:?}"
    );

    // What each shard loaded answers as before: a retry gets its order again (from Redis
    // or from MySQL), a buyer holding a unit gets no second one, a cancelled order's retry
    // is told so, and that buyer (limit 1, nothing held) may buy again.
    let a0 = &ledger
        .issued
        .iter()
        .find(|(_, u)| *u == "a-0")
        .unwrap()
        .0
        .clone();
    let b2 = ledger.issued[&in_mysql[2]].clone();
    for (user, order) in [("a-0", a0), (b2.as_str(), &in_mysql[2])] {
        let again = attempt(&p, &goods, user, user).await;
        assert_eq!(
            (again["outcome"].as_str(), again["order_id"].as_str()),
            (Some("won"), Some(order.as_str())),
            "{user}: {again}"
        );
        let second = attempt(&p, &goods, user, &format!("{user}-again")).await;
        assert_eq!(second["outcome"], "duplicate", "{user}: {second}");
    }
    let b1 = ledger.issued[&cancelled].clone();
    let told = attempt(&p, &goods, &b1, &b1).await;
    assert_eq!(told["outcome"], "released", "{told}");
    let rebought = ledger.won(&attempt(&p, &goods, &b1, &format!("{b1}-again")).await, &b1);
    assert!(
        epoch_of(&rebought) > epoch_of(&in_mysql[0]),
        "a new epoch: {rebought}"
    );
    // Reservations loaded into Redis end there: one from a shard, one from MySQL.
    assert_eq!(p.settle(a0, "confirm").await.unwrap().0, 200);
    let (status, body) = p.settle(&in_mysql[2], "cancel").await.unwrap();
    assert_eq!(status, 200, "{body}");
    ledger.holds.remove(&b2);
    let (status, body) = p.settle(&confirmed, "cancel").await.unwrap();
    assert_eq!(status, 409, "a confirmed order stays confirmed: {body}");

    // The rest sells out exactly: every unit once, all shards to 0 together.
    for (order, user) in sell_until_sold_out(&p, &goods, "c", 200).await {
        assert!(
            ledger.issued.insert(order.clone(), user.clone()).is_none(),
            "{order} twice"
        );
        ledger.holds.insert(user, order);
    }
    assert_eq!(
        ledger.holds.len() as u64,
        STOCK,
        "units held at the end: {:?}",
        ledger.holds
    );
    assert_eq!(available(&shards_of(&p, &goods).await), [0, 0, 0]);

    // MySQL: a row per order told, with its buyer; counters add up; reconcile clean.
    p.wait_for_rows(&goods, ledger.issued.len() as i64, DRAIN)
        .await
        .unwrap();
    let rows: Vec<(String, String)> =
        sqlx::query_as("SELECT order_id, user_id FROM orders WHERE goods_id = ?")
            .bind(&goods)
            .fetch_all(&p.db.pool)
            .await
            .unwrap();
    assert_eq!(rows.len(), ledger.issued.len());
    for (order, user) in &rows {
        assert_eq!(ledger.issued.get(order), Some(user), "MySQL's row {order}");
    }
    let (stock, reserved, sold, lapsed, total) = p.mysql_counters(&goods).await.unwrap();
    assert_eq!(
        (stock, reserved + sold, lapsed, total),
        (0, STOCK as i64, 0, STOCK as i64)
    );
    assert_eq!(sold, 2 + from_shards.len() as i64, "the confirmed orders");
    wait_for_clean_reconcile(&p, &goods).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_full_coverage_off_the_other_shards_sell_on_while_one_master_is_down() {
    const STOCK: u64 = 60;
    // Redis keeps serving the slots of the masters that are up.
    let coverage = ["--cluster-require-full-coverage", "no"];
    let mut p = Pipeline::start_on("sharded_shard_down", &coverage, &[], &[])
        .await
        .unwrap();
    let _pipeline = p.spawn_relay_and_writer(100, 20).await.unwrap();
    let goods = goods_over_three_masters(&p.redis, &p.prefix, "part").await;
    open_sharded(&p.admin(), &goods, STOCK).await;
    // The shard to lose: one whose master does not hold the sales index (which the relay needs
    // to find the outboxes: a lost index stops the relay until its master is back, README).
    let index_master = p
        .redis
        .master_of_key(&format!("{}:sales", p.prefix))
        .await
        .unwrap();
    let mut lost = 0;
    for shard in 0..SHARDS {
        let key = format!("{}:{{{}}}:sale", p.prefix, shard_id(&goods, shard));
        if p.redis.master_of_key(&key).await.unwrap() != index_master {
            lost = shard;
        }
    }
    let others: Vec<u32> = (0..SHARDS).filter(|&s| s != lost).collect();
    let mut issued: HashMap<String, String> = HashMap::new();
    let mut sell = |answer: Value, user: &str| {
        assert_eq!(answer["outcome"], "won", "{user}: {answer}");
        let order = answer["order_id"].as_str().unwrap().to_owned();
        assert!(
            issued.insert(order.clone(), user.to_owned()).is_none(),
            "{order} twice"
        );
    };
    for user in buyers_of("a", lost, 5) {
        sell(attempt(&p, &goods, &user, &user).await, &user);
    }
    p.wait_for_rows(&goods, 5, DRAIN).await.unwrap();

    // That shard's master dies (SIGKILL), with no replica.
    p.redis
        .kill_master_of(&format!("{}:{{{}}}:sale", p.prefix, shard_id(&goods, lost)))
        .await
        .unwrap();
    // Buyers of that shard are told to come back (503), never sold out nor sold to; five failed
    // calls in a row do not open the breaker (one for all goods) while the other shards answer.
    for lost_buyer in buyers_of("c", lost, 5) {
        let (status, body) = p
            .deduct_once(&goods, &lost_buyer, &lost_buyer)
            .await
            .unwrap();
        assert_eq!(status, 503, "{body}");
    }
    // Buyers of the other shards go on winning from Redis: each still has its own units.
    for &home in &others {
        for user in buyers_of(&format!("b{home}"), home, 10) {
            sell(attempt(&p, &goods, &user, &user).await, &user);
        }
    }
    let sale = p.admin().sale(&goods).await.unwrap();
    assert_eq!(
        sale["definition"]["fallback"], false,
        "Redis decides: {sale}"
    );
    // The other shards sold exactly their buyers' units (20 each at the start).
    let mut conn = p.redis.connection().await.unwrap();
    for &shard in &others {
        let sale = format!("{}:{{{}}}:sale", p.prefix, shard_id(&goods, shard));
        let available: i64 = redis::cmd("HGET")
            .arg(&sale)
            .arg("available")
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(available, 10, "shard {shard}");
    }
    p.wait_for_rows(&goods, 25, DRAIN).await.unwrap();
    assert_eq!(p.order_ids(&goods).await.unwrap().len(), issued.len());
}

/// A reservation one shard forgot (its record gone, as after that master lost it) is ended in
/// MySQL after its payment window and the grace, found on the shard that issued it; the
/// other shards' reservations, which Redis still holds, are untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mysql_ends_a_reservation_its_shard_forgot_and_only_that_one() {
    let p = Pipeline::start_cluster("sharded_forgot").await.unwrap();
    let goods = goods_over_three_masters(&p.redis, &p.prefix, "forgot").await;
    let mut spec = sharded_spec(30, 1, json!(SHARDS));
    spec["payment_window_s"] = json!(1);
    let admin = p.admin();
    let (status, body) = admin.try_define(&goods, &spec).await.unwrap();
    assert_eq!(status, 201, "{body}");
    admin.preheat(&goods, false).await.unwrap();
    // One buyer per home shard: one order on each shard.
    let mut orders = Vec::new();
    for shard in 0..SHARDS {
        let user = &buyers_of("forgot", shard, 1)[0];
        let won = attempt(&p, &goods, user, user).await;
        assert_eq!(won["outcome"], "won", "{won}");
        let order = won["order_id"].as_str().unwrap().to_owned();
        assert_eq!(shard_of(&order), shard);
        orders.push(order);
    }
    // Redis's own sweeper must not end them: off its schedule (the shards still hold them).
    let mut conn = p.redis.connection().await.unwrap();
    let key =
        |shard: u32, suffix: &str| format!("{}:{{{}}}:{suffix}", p.prefix, shard_id(&goods, shard));
    for (shard, order) in orders.iter().enumerate() {
        let removed: u64 = redis::cmd("ZREM")
            .arg(key(shard as u32, "expiries"))
            .arg(order)
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(removed, 1);
    }
    let serve = p
        .spawn(
            Role::Serve { pipeline: true },
            None,
            &[("SECKILL_FORGOTTEN_GRACE_S", "1")],
        )
        .await
        .unwrap();
    p.wait_for_rows(&goods, 3, DRAIN).await.unwrap();
    // Shards 0 and 2 forget their reservation; shard 1 keeps its own.
    for shard in [0u32, 2] {
        let removed: u64 = redis::cmd("HDEL")
            .arg(key(shard, "reservations"))
            .arg(&orders[shard as usize])
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(removed, 1);
    }
    let state = |order: String| {
        let p = &p;
        let goods = goods.clone();
        async move {
            let found = p.mysql_orders(&goods).await?;
            anyhow::Ok(found.get(&order).map(|(state, _)| state.clone()))
        }
    };
    for shard in [0usize, 2] {
        wait_for(
            "the forgotten reservation to end in MySQL",
            DRAIN,
            || async {
                Ok(state(orders[shard].clone())
                    .await?
                    .filter(|s| s == "released"))
            },
        )
        .await
        .unwrap();
    }
    // Two more passes leave shard 1's reservation alone.
    let passes = |text: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix("seckill_forgotten_sweep_passes_total "))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let from = passes(&serve.metrics().await.unwrap());
    wait_for("two more sweep passes", DRAIN, || async {
        Ok((passes(&serve.metrics().await?) >= from + 2.0).then_some(()))
    })
    .await
    .unwrap();
    assert_eq!(
        state(orders[1].clone()).await.unwrap().as_deref(),
        Some("reserved"),
        "shard 1 still holds its reservation: untouched"
    );
    assert_eq!(
        p.mysql_counters(&goods).await.unwrap(),
        (29, 1, 0, 0, 30),
        "the two forgotten units are back on sale"
    );
}

/// The order digest of a sharded goods: every shard's orders against MySQL's rows, each order
/// looked up on the shard that issued it. Clean after wins on every shard, a release and a
/// confirm, with every order counted; then each accident is named, that order alone: a row
/// MySQL lost (restored by `--repair` through the shard's outbox), a row naming another buyer,
/// an order its shard forgot.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_order_digest_compares_every_shards_orders_and_names_each_difference() {
    let p = Pipeline::start_cluster("sharded_digest").await.unwrap();
    let _pipeline = p.spawn_relay_and_writer(100, 20).await.unwrap();
    let goods = goods_over_three_masters(&p.redis, &p.prefix, "digest").await;
    open_sharded(&p.admin(), &goods, 30).await;
    // Three buyers per home shard: each shard issues three orders. (order id, buyer) by shard.
    let mut by_shard: Vec<Vec<(String, String)>> = vec![];
    for shard in 0..SHARDS {
        let mut orders = vec![];
        for user in buyers_of("d", shard, 3) {
            let won = attempt(&p, &goods, &user, &user).await;
            assert_eq!(won["outcome"], "won", "{won}");
            let order = won["order_id"].as_str().unwrap().to_owned();
            assert_eq!(shard_of(&order), shard, "{won}");
            orders.push((order, user));
        }
        by_shard.push(orders);
    }
    let (released, confirmed) = (&by_shard[0][0].0, &by_shard[1][0]);
    for (order, action, state) in [
        (released, "cancel", "released"),
        (&confirmed.0, "confirm", "confirmed"),
    ] {
        let (status, body) = p.settle(order, action).await.unwrap();
        assert_eq!((status, &body["state"]), (200, &json!(state)), "{body}");
    }
    p.wait_for_rows(&goods, 9, DRAIN).await.unwrap();
    let report = wait_for_clean_reconcile(&p, &goods).await;
    let digest = &report["goods"][0]["orders"];
    assert_eq!(
        (&digest["shards"], &digest["epoch"]),
        (&json!(SHARDS), &json!(epoch_of(released))),
        "{report:#}"
    );
    // Every order compared on both sides: 7 live and 2 ended in Redis, 9 rows in MySQL.
    assert_eq!(
        (
            &digest["redis_live"],
            &digest["redis_settled"],
            &digest["mysql_rows"]
        ),
        (&json!(7), &json!(2), &json!(9)),
        "{report:#}"
    );
    assert_eq!(differences(digest), [0; 4], "{report:#}");

    // The digest names exactly one order, with its kind (one of `differences`), and fails.
    let names_only = |kind: &str, order: &str, counts: [u64; 4]| {
        let (code, report) = p.reconcile(&["--orders", "--goods", &goods]).unwrap();
        let digest = &report["goods"][0]["orders"];
        assert_eq!(code, 2, "{report:#}");
        assert_eq!(differences(digest), counts, "{report:#}");
        let only = BTreeSet::from([(kind.to_owned(), order.to_owned())]);
        assert_eq!(findings(digest), only, "{report:#}");
        digest.clone()
    };

    // MySQL loses the row of an order shard 2 issued: named missing from MySQL, alone.
    let (lost, lost_buyer) = &by_shard[2][1];
    p.change_order_row("DELETE FROM orders WHERE order_id = ?", lost)
        .await
        .unwrap();
    names_only("missing_from_mysql", lost, [1, 0, 0, 0]);
    // `--repair` replays it through shard 2's outbox: the row is back, with its buyer.
    p.reconcile(&["--repair", "--goods", &goods]).unwrap();
    let report = wait_for_clean_reconcile(&p, &goods).await;
    assert_eq!(report["goods"][0]["orders"]["mysql_rows"], 9, "{report:#}");
    let (buyer, state): (String, String) =
        sqlx::query_as("SELECT user_id, state FROM orders WHERE order_id = ?")
            .bind(lost)
            .fetch_one(&p.db.pool)
            .await
            .unwrap();
    assert_eq!((&buyer, state.as_str()), (lost_buyer, "reserved"));

    // A row of shard 2's naming another buyer: named, alone.
    let (other, other_buyer) = &by_shard[2][2];
    p.change_order_row(
        "UPDATE orders SET user_id = 'intruder' WHERE order_id = ?",
        other,
    )
    .await
    .unwrap();
    names_only("identity_differs", other, [0, 0, 1, 0]);
    sqlx::query("UPDATE orders SET user_id = ? WHERE order_id = ?")
        .bind(other_buyer)
        .bind(other)
        .execute(&p.db.pool)
        .await
        .unwrap();

    // Shard 1 forgets its confirmed order (its end and the request naming it): MySQL's row is
    // missing from Redis, alone; the other shards' orders are still found.
    let mut conn = p.redis.connection().await.unwrap();
    let key = |suffix: &str| format!("{}:{{{}}}:{suffix}", p.prefix, shard_id(&goods, 1));
    let (order, buyer) = confirmed;
    for (hash, field) in [("settled", order), ("requests", buyer)] {
        let removed: u64 = redis::cmd("HDEL")
            .arg(key(hash))
            .arg(field)
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(removed, 1, "{hash} {field}");
    }
    let digest = names_only("missing_from_redis", order, [0, 1, 0, 0]);
    assert_eq!(
        (&digest["redis_live"], &digest["redis_settled"]),
        (&json!(7), &json!(1)),
        "{digest:#}"
    );
}
