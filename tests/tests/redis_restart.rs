//! A Redis that forgets: the private redis-server is killed (`kill -9`) mid-sale and started
//! again empty on its port (no persistence), with the pipeline running against real Tansu and
//! MariaDB. Proves that a sale MySQL sold from is never loaded with its full stock again
//! (forced or not, through the API and the command line), that epochs come from MySQL so no
//! order id is ever issued twice, that a preheat that dies between its epoch and its load
//! leaves a gap and no repeat, and that the relay outlives the restart (it re-creates the
//! consumer groups Redis lost) and the writer goes on.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use seckill_e2e::pipeline::{epoch_of, Pipeline};
use seckill_e2e::process::wait_for;
use seckill_e2e::stack::EDGE_SECRET;
use seckill_e2e::syncer::{sum_metric, SyncerProcess};
use seckill_syncer::db::{take_epoch, HistoryRule, SaleRowError};
use serde_json::{json, Value};
use sqlx::Row;

const DRAIN: Duration = Duration::from_secs(120);

struct Fixture {
    p: Arc<Pipeline>,
    relay: SyncerProcess,
    writer: SyncerProcess,
    /// Every order id a buyer was told `won` with, and that buyer.
    issued: HashMap<String, String>,
}

impl Fixture {
    async fn start(label: &str) -> Fixture {
        // The operator's path: no MySQL fallback, so nothing re-seeds on its own and what Redis
        // forgot stays forgotten until the test acts (redis_forgets.rs covers the automatic
        // path).
        let p = Arc::new(
            Pipeline::start_with(label, &[("SECKILL_FALLBACK_RATE", "0")])
                .await
                .expect("the fixture starts"),
        );
        let (relay, writer) = p.spawn_relay_and_writer(100, 20).await.unwrap();
        Fixture {
            p,
            relay,
            writer,
            issued: HashMap::new(),
        }
    }

    /// Sells `count` units of `goods` to buyers `{tag}-i` and waits until MySQL has every
    /// order of the goods; records who got which order id, and fails on an order id issued
    /// twice.
    async fn sell_and_drain(&mut self, goods: &str, tag: &str, count: usize) -> Vec<String> {
        let rows_before = self.p.order_rows(goods).await.unwrap().0;
        let orders = self.p.sell(goods, tag, count).await.unwrap();
        assert_eq!(orders.len(), count, "every buyer of {goods} won");
        self.p
            .wait_for_rows(goods, rows_before + count as i64, DRAIN)
            .await
            .unwrap();
        let buyers: HashMap<String, String> =
            sqlx::query_as("SELECT order_id, user_id FROM orders WHERE goods_id = ?")
                .bind(goods)
                .fetch_all(&self.p.db.pool)
                .await
                .unwrap()
                .into_iter()
                .collect();
        for order in &orders {
            let buyer = buyers
                .get(order)
                .expect("every order won is in MySQL")
                .clone();
            let previous = self.issued.insert(order.clone(), buyer);
            assert!(previous.is_none(), "order id {order} was issued twice");
        }
        orders
    }

    /// Kills Redis and starts it again empty on its port.
    async fn restart_redis(&mut self) {
        Arc::get_mut(&mut self.p)
            .expect("no sale in flight holds the fixture")
            .redis
            .restart_empty()
            .await
            .unwrap();
        self.p.api.wait_healthy(DRAIN).await.unwrap();
    }

    /// The epoch MySQL last handed out for `goods`.
    async fn mysql_epoch(&self, goods: &str) -> u64 {
        sqlx::query_scalar("SELECT epoch FROM sales WHERE goods_id = ?")
            .bind(goods)
            .fetch_one(&self.p.db.pool)
            .await
            .unwrap()
    }

    /// The epoch of the sale Redis holds for `goods` (None: no sale).
    async fn redis_epoch(&self, goods: &str) -> Option<u64> {
        let mut conn = self.p.redis.connection().await.unwrap();
        redis::cmd("HGET")
            .arg(format!("{}:{{{goods}}}:sale", self.p.prefix))
            .arg("epoch")
            .query_async(&mut conn)
            .await
            .unwrap()
    }

    /// The outcome the deduct endpoint answers for one purchase.
    async fn outcome(&self, goods: &str, user: &str) -> String {
        let reply: Value = self
            .p
            .http
            .post(format!("{}{}", self.p.api.url(), seckill_api::DEDUCT_PATH))
            .header(seckill_api::SECRET_HEADER, EDGE_SECRET)
            .json(&json!({"goods_id": goods, "user_id": user, "quantity": 1, "request_id": user}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        reply["outcome"]
            .as_str()
            .or(reply["error"].as_str())
            .unwrap_or_default()
            .to_owned()
    }

    /// Preheat through the API and the command line, without and with force: every one is
    /// refused because MySQL has history for the goods, and nothing changes.
    async fn assert_preheat_refused(&self, goods: &str) {
        let epoch = self.mysql_epoch(goods).await;
        for force in [false, true] {
            let (status, body) = self.p.admin().try_preheat(goods, force).await.unwrap();
            assert_eq!(status, 409, "preheat {goods} force={force}: {body}");
            let message = body["message"].as_str().unwrap_or_default();
            for words in [
                "has history in MySQL",
                "re-seeded from MySQL",
                "seckill-syncer reseed",
            ] {
                assert!(message.contains(words), "{message}");
            }
            let mut command = self.p.command("preheat").unwrap();
            command.args(["--goods", goods]);
            if force {
                command.arg("--force");
            }
            let output = command.output().unwrap();
            let stderr = String::from_utf8_lossy(&output.stderr);
            assert!(!output.status.success(), "the CLI refused too: {stderr}");
            assert!(stderr.contains("has history in MySQL"), "{stderr}");
        }
        assert_eq!(self.mysql_epoch(goods).await, epoch, "no epoch was taken");
        assert_eq!(self.redis_epoch(goods).await, None, "Redis holds no sale");
        // MySQL loaded the goods into Redis, so a Redis without it forgot: nothing is sold
        // from it (a 503), where it once answered `unknown_goods`.
        assert_eq!(self.outcome(goods, "late-buyer").await, "unavailable");
    }

    /// The relay's consumer group exists on the goods' outbox.
    async fn wait_for_relay_group(&self, goods: &str) {
        let stream = format!("{}:{{{goods}}}:outbox", self.p.prefix);
        wait_for("the relay's group", Duration::from_secs(30), || async {
            let mut conn = self.p.redis.connection().await?;
            let groups: redis::RedisResult<Vec<redis::Value>> = redis::cmd("XINFO")
                .arg("GROUPS")
                .arg(&stream)
                .query_async(&mut conn)
                .await;
            Ok(groups.ok().filter(|g| !g.is_empty()).map(|_| ()))
        })
        .await
        .unwrap();
    }

    /// MySQL rows name the buyer each order id was issued to, and the pipeline saw no
    /// conflict and dropped nothing.
    async fn assert_every_row_is_its_buyers(&self) {
        let rows = sqlx::query("SELECT order_id, user_id FROM orders")
            .fetch_all(&self.p.db.pool)
            .await
            .unwrap();
        assert_eq!(rows.len(), self.issued.len(), "one row per order id issued");
        for row in rows {
            let order: String = row.get(0);
            let user: String = row.get(1);
            assert_eq!(self.issued.get(&order), Some(&user), "order {order}");
        }
        let metrics = self.writer.metrics().await.unwrap();
        assert_eq!(sum_metric(&metrics, "seckill_writer_conflicts_total"), 0);
        assert_eq!(sum_metric(&metrics, "seckill_dead_letters_total"), 0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sale_redis_forgot_is_refused_full_stock_and_the_pipeline_goes_on() {
    let mut f = Fixture::start("restart").await;
    f.p.open_sale("g", 100, 1).await.unwrap();
    // Preheated before the restart and not sold: the relay has made its consumer group.
    f.p.open_sale("h", 50, 1).await.unwrap();
    f.wait_for_relay_group("h").await;
    let sold = f.sell_and_drain("g", "a", 40).await;
    assert!(sold.iter().all(|o| epoch_of(o) == 1));
    assert_eq!((f.mysql_epoch("g").await, f.mysql_epoch("h").await), (1, 1));

    f.restart_redis().await;

    // g sold 40 units that MySQL holds: a full-stock load would sell them again.
    f.assert_preheat_refused("g").await;
    // What a re-seed of g will do first: take an epoch past every one in MySQL's order ids.
    let mysql = seckill_syncer::db::connect(&f.p.db.url()).await.unwrap();
    match take_epoch(&mysql, "g", 0, HistoryRule::Refuse).await {
        Err(SaleRowError::History { history, .. }) => {
            assert_eq!((history.orders, history.reserved), (40, 40))
        }
        other => panic!("a full-stock epoch for g must be refused: {other:?}"),
    }
    let (reseed_epoch, _) = take_epoch(&mysql, "g", 0, HistoryRule::Allow)
        .await
        .unwrap();
    let newest = f.p.order_ids("g").await.unwrap();
    assert!(newest.iter().all(|o| epoch_of(o) < reseed_epoch));
    assert_eq!(f.mysql_epoch("g").await, reseed_epoch);

    // h has no history: it loads again, under an epoch past the one the lost Redis had.
    let body = f.p.admin().preheat("h", false).await.unwrap();
    assert_eq!(body["epoch"], 2, "{body}");
    assert_eq!(f.redis_epoch("h").await, Some(f.mysql_epoch("h").await));
    // The relay had h's consumer group; Redis lost it: the relay makes it again and relays.
    let after = f.sell_and_drain("h", "b", 10).await;
    assert!(after.iter().all(|o| epoch_of(o) == 2), "{after:?}");
    f.relay.check_running().unwrap();
    let relay_metrics = f.relay.metrics().await.unwrap();
    assert!(
        sum_metric(&relay_metrics, "seckill_relay_groups_recreated_total") >= 1,
        "{relay_metrics}"
    );
    f.assert_every_row_is_its_buyers().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_order_id_is_issued_twice_across_restarts() {
    let mut f = Fixture::start("twice").await;
    f.p.open_sale("g", 10, 1).await.unwrap();
    f.sell_and_drain("g", "a", 10).await;
    f.restart_redis().await;

    // A goods defined after the restart. Its first preheat dies after MySQL handed out the
    // epoch and before Redis was loaded: the next one takes a new epoch (a gap, no repeat).
    let now = seckill_e2e::stack::now_ms();
    f.p.admin()
        .define_sale("k", 20, 1, (now - 60_000, now + 3_600_000), 900)
        .await
        .unwrap();
    let crashed =
        f.p.command("preheat")
            .unwrap()
            .args(["--goods", "k"])
            .env("SECKILL_CRASH_AT", "preheat-after-epoch")
            .output()
            .unwrap();
    assert!(!crashed.status.success(), "it stopped at the crash point");
    assert_eq!(f.mysql_epoch("k").await, 1);
    assert_eq!(f.redis_epoch("k").await, None, "Redis was never loaded");
    let body = f.p.admin().preheat("k", false).await.unwrap();
    assert_eq!(body["epoch"], 2, "{body}");
    assert_eq!(f.redis_epoch("k").await, Some(2));
    let sold = f.sell_and_drain("k", "b", 20).await;
    assert!(sold.iter().all(|o| epoch_of(o) == 2), "{sold:?}");

    // Redis forgets again: neither goods loads with full stock, so no sequence restarts
    // under an epoch that already sold.
    f.restart_redis().await;
    f.assert_preheat_refused("k").await;
    f.assert_preheat_refused("g").await;
    assert_eq!(f.issued.len(), 30, "30 buyers, 30 distinct order ids");
    f.assert_every_row_is_its_buyers().await;
}
