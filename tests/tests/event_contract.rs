//! The sale-event contract between the Lua scripts and the Rust side: the real scripts, called
//! by the syncer's own code against a private redis-server, write every kind of event there
//! is, and `seckill_syncer::events` must decode each one exactly, so neither side can drift
//! from the other without this failing. It also checks the parts of the format that are easy
//! to get wrong with cjson (integers printed as floats, escaping), that each event moves the
//! counters the way the script moved Redis's, and the `user|quantity|rest` records.

use std::collections::BTreeSet;
use std::time::Duration;

use chrono::{TimeDelta, Utc};
use seckill_api::{DeductRequest, Outcome};
use seckill_e2e::mysql_db::TestDatabase;
use seckill_e2e::process::{unique_suffix, wait_for, Scratch};
use seckill_e2e::redis_server::RedisServer;
use seckill_syncer::deduct::{Deducter, Delivery};
use seckill_syncer::events::{Effect, SaleEvent, OUTBOX_FIELD};
use seckill_syncer::keys::{goods_of_order, KeySpace, Record};
use seckill_syncer::lifecycle::{Lifecycle, SweepRules};
use seckill_syncer::order::ReleaseReason;
use seckill_syncer::preheat::{live_stock, preheat};
use seckill_syncer::sale::{Sale, SaleSpec};
use seckill_syncer::RedisConn;
use sqlx::MySqlPool;

/// Uses every character an id may have, so the encoding of each is exercised.
const GOODS: &str = "Az09_.:-g";
/// A goods whose reservations expire after one second.
const SHORT_WINDOW_GOODS: &str = "short";
const STOCK: u64 = 2_000;
const CLAIM_WINDOW: Duration = Duration::from_millis(1);

struct Fixture {
    redis: RedisConn,
    keys: KeySpace,
    deducter: Deducter,
    lifecycle: Lifecycle,
    /// The sale definitions (a preheat takes its epoch from MySQL).
    mysql: MySqlPool,
    _db: TestDatabase,
    _server: RedisServer,
    _scratch: Scratch,
}

impl Fixture {
    async fn start() -> Fixture {
        let scratch = Scratch::new("contract").unwrap();
        let server = RedisServer::start(&scratch.path).await.unwrap();
        let redis = seckill_syncer::connect_redis(&server.url()).await.unwrap();
        let keys = KeySpace::new(format!("t{}", unique_suffix()));
        let db = TestDatabase::create("contract").await.unwrap();
        let mysql = seckill_syncer::db::connect(&db.url()).await.unwrap();
        Fixture {
            mysql,
            _db: db,
            deducter: Deducter::start(redis.clone(), keys.clone(), CLAIM_WINDOW),
            lifecycle: Lifecycle::new(redis.clone(), keys.clone()),
            redis,
            keys,
            _server: server,
            _scratch: scratch,
        }
    }

    async fn open(&self, goods: &str, payment_window_s: u32) {
        let now = Utc::now();
        let spec = SaleSpec {
            total_stock: STOCK,
            per_user_limit: seckill_api::QUANTITY_MAX,
            starts_at: now - TimeDelta::hours(1),
            ends_at: now + TimeDelta::hours(1),
            payment_window_s,
            tier: Default::default(),
            fleet_rate: None,
            shards: None,
        };
        let sale = Sale::new(goods, spec).unwrap();
        seckill_syncer::db::save_sale(&self.mysql, &sale)
            .await
            .unwrap();
        preheat(&self.redis, &self.mysql, &self.keys, goods, false)
            .await
            .unwrap();
    }

    /// Reserves `quantity` for `user`; returns the order id.
    async fn reserve(&self, goods: &str, user: &str, quantity: u32, delivery: Delivery) -> String {
        let request = DeductRequest {
            goods_id: goods.into(),
            user_id: user.into(),
            quantity,
            request_id: format!("r-{user}"),
        };
        let reply = self.deducter.deduct(request, delivery, None).await.unwrap();
        assert_eq!(reply.outcome, Outcome::Won, "{reply:?}");
        reply.order_id.unwrap()
    }

    async fn release(&self, order_id: &str, reason: ReleaseReason) {
        self.lifecycle.release(order_id, reason).await.unwrap();
    }

    async fn redis_ms(&self) -> i64 {
        let mut conn = self.redis.clone();
        let (seconds, micros): (i64, i64) =
            redis::cmd("TIME").query_async(&mut conn).await.unwrap();
        seconds * 1000 + micros / 1000
    }

    /// Every entry of a goods' outbox, decoded. Each entry must hold the one event field.
    async fn outbox(&self, goods: &str) -> Vec<SaleEvent> {
        let mut conn = self.redis.clone();
        let range: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
            .arg(self.keys.goods(goods).outbox)
            .arg("-")
            .arg("+")
            .query_async(&mut conn)
            .await
            .unwrap();
        range
            .ids
            .iter()
            .map(|entry| {
                let fields: Vec<&String> = entry.map.keys().collect();
                assert_eq!(fields, [OUTBOX_FIELD], "one field per entry: {entry:?}");
                let bytes: Vec<u8> = entry.get(OUTBOX_FIELD).unwrap();
                SaleEvent::from_json(&bytes).unwrap_or_else(|e| {
                    panic!("{e}: {}", String::from_utf8_lossy(&bytes));
                })
            })
            .collect()
    }

    async fn hash(&self, key: &str) -> Vec<(String, String)> {
        let mut conn = self.redis.clone();
        redis::cmd("HGETALL")
            .arg(key)
            .query_async(&mut conn)
            .await
            .unwrap()
    }
}

/// An event without its time, for comparing with what the test did.
fn summary(event: &SaleEvent) -> (String, String, String, u32, Option<(ReleaseReason, bool)>) {
    let kind = serde_json::to_value(event).unwrap()["type"]
        .as_str()
        .unwrap()
        .to_owned();
    (
        kind,
        event.order_id().to_owned(),
        event.user_id().to_owned(),
        event.quantity(),
        event.release(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_event_the_scripts_write_decodes_in_rust() {
    let f = Fixture::start().await;
    // Another tenant of the same Redis may lower cjson's number precision: the scripts must
    // not print a timestamp as 1.8e+12 all the same.
    let mut conn = f.redis.clone();
    let _: i64 = redis::cmd("EVAL")
        .arg("cjson.encode_number_precision(5) return 1")
        .arg(0)
        .query_async(&mut conn)
        .await
        .unwrap();
    f.open(GOODS, 600).await;
    f.open(SHORT_WINDOW_GOODS, 1).await;
    let started_ms = f.redis_ms().await;

    let max = seckill_api::QUANTITY_MAX;
    let paid = f.reserve(GOODS, "paid", max, Delivery::Direct).await;
    let cancelled = f.reserve(GOODS, "u:cancel", 2, Delivery::Direct).await;
    let failed = f.reserve(GOODS, "u.failed", 1, Delivery::Direct).await;
    let unclaimed = f.reserve(GOODS, "u-unclaimed", 1, Delivery::Claimed).await;
    let late = f.reserve(GOODS, "u_late", 3, Delivery::Direct).await;
    let expired = f
        .reserve(SHORT_WINDOW_GOODS, "slow", 1, Delivery::Direct)
        .await;

    // The records the deduct wrote read back as the scripts and reconcile read them.
    let requests = f.hash(&f.keys.goods(GOODS).requests).await;
    let record = requests.iter().find(|(id, _)| id == "r-u:cancel").unwrap();
    let record = Record::parse(&record.1).unwrap();
    assert_eq!(
        (record.user_id, record.quantity, record.rest),
        ("u:cancel", 2, cancelled.as_str())
    );
    let reservations = f.hash(&f.keys.goods(GOODS).reservations).await;
    let record = reservations.iter().find(|(id, _)| *id == paid).unwrap();
    let record = Record::parse(&record.1).unwrap();
    assert_eq!((record.user_id, record.quantity), ("paid", max));
    let reserved_at: i64 = record.rest.parse().unwrap();
    assert!(reserved_at >= started_ms, "{reserved_at} {started_ms}");

    f.lifecycle.confirm(&paid).await.unwrap();
    f.release(&cancelled, ReleaseReason::Cancelled).await;
    f.release(&failed, ReleaseReason::UpstreamFailed).await;
    // Sweeps until the one reservation whose window passes first ends (a sweep before that
    // ends nothing): the unclaimed one's claim window is 1 ms, the payment windows of the
    // rest are not over; then the short goods' payment window (1 s).
    let rules = SweepRules {
        claim_window: CLAIM_WINDOW,
        stall: Duration::from_secs(3_600),
    };
    for goods in [GOODS, SHORT_WINDOW_GOODS] {
        let ended = wait_for("a window to pass", Duration::from_secs(10), || async {
            let ended = f.lifecycle.sweep_goods(goods, &rules).await?;
            Ok((ended > 0).then_some(ended))
        })
        .await
        .unwrap();
        assert_eq!(ended, 1, "{goods}: one reservation's window passed");
    }
    // The sale closes with one reservation open: its release lapses.
    let mut conn = f.redis.clone();
    let _: () = redis::cmd("HSET")
        .arg(f.keys.goods(GOODS).sale)
        .arg("end_ms")
        .arg(started_ms)
        .query_async(&mut conn)
        .await
        .unwrap();
    f.release(&late, ReleaseReason::Cancelled).await;
    let finished_ms = f.redis_ms().await;

    let events = f.outbox(GOODS).await;
    let short_events = f.outbox(SHORT_WINDOW_GOODS).await;
    // (type, order, buyer, quantity, release) of each event, in the order they happened.
    let event = |kind: &str, order: &str, user: &str, quantity: u32, release| {
        let owned = |s: &str| s.to_owned();
        (owned(kind), owned(order), owned(user), quantity, release)
    };
    let back = |reason| Some((reason, true));
    let gone = |reason| Some((reason, false));
    use ReleaseReason::{Cancelled, Expired, Unclaimed, UpstreamFailed};
    let expected = vec![
        event("reserved", &paid, "paid", max, None),
        event("reserved", &cancelled, "u:cancel", 2, None),
        event("reserved", &failed, "u.failed", 1, None),
        event("reserved", &unclaimed, "u-unclaimed", 1, None),
        event("reserved", &late, "u_late", 3, None),
        event("confirmed", &paid, "paid", max, None),
        event("released", &cancelled, "u:cancel", 2, back(Cancelled)),
        event("released", &failed, "u.failed", 1, back(UpstreamFailed)),
        event("released", &unclaimed, "u-unclaimed", 1, back(Unclaimed)),
        event("lapsed", &late, "u_late", 3, gone(Cancelled)),
    ];
    assert_eq!(events.iter().map(summary).collect::<Vec<_>>(), expected);
    let expected = vec![
        event("reserved", &expired, "slow", 1, None),
        event("released", &expired, "slow", 1, back(Expired)),
    ];
    assert_eq!(
        short_events.iter().map(summary).collect::<Vec<_>>(),
        expected
    );

    let all: Vec<&SaleEvent> = events.iter().chain(&short_events).collect();
    // Every kind of event and every release reason the scripts can write was seen.
    let kinds: BTreeSet<String> = all.iter().map(|e| summary(e).0).collect();
    assert_eq!(
        kinds,
        ["confirmed", "lapsed", "released", "reserved"]
            .map(String::from)
            .into()
    );
    let reasons: BTreeSet<&str> = all
        .iter()
        .filter_map(|e| e.release())
        .map(|(reason, _)| reason.as_str())
        .collect();
    let all_reasons: BTreeSet<&str> = ReleaseReason::ALL.iter().map(|r| r.as_str()).collect();
    assert_eq!(reasons, all_reasons);
    for event in &all {
        assert_eq!(goods_of_order(event.order_id()), Some(event.goods_id()));
        // Exact integers from Redis's clock, not rounded floats.
        assert!(
            (started_ms..=finished_ms).contains(&event.at_ms()),
            "{event:?} outside {started_ms}..={finished_ms}"
        );
    }
    // Round trip: what the Rust side encodes (reconcile's repair) decodes the same.
    for event in &all {
        assert_eq!(&SaleEvent::from_json(&event.to_json()).unwrap(), *event);
    }

    // The events move MySQL's counters exactly as the scripts moved Redis's.
    let mut moved = Effect::default();
    for event in &events {
        moved += event.effect();
    }
    let live = live_stock(&f.redis, &f.keys, GOODS).await.unwrap().unwrap();
    let counted = Effect {
        available: live.available as i64 - STOCK as i64,
        reserved: live.reserved as i64,
        sold: live.sold as i64,
        lapsed: live.lapsed as i64,
    };
    assert_eq!(moved, counted, "{live:?}");
    assert_eq!((live.sold, live.lapsed), (u64::from(max), 3));
}
