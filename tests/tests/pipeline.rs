//! The sync pipeline end to end against real parts: a private redis-server, a Tansu broker,
//! a fresh MariaDB database, and the syncer's relay and writer as processes the tests kill.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use seckill_e2e::kafka_broker::{DEAD_LETTER_TOPIC, TOPIC};
use seckill_e2e::pipeline::Pipeline;
use seckill_e2e::process::wait_for;
use seckill_e2e::syncer::{sum_metric, Role};
use seckill_e2e::tcp_proxy::TcpProxy;
use seckill_syncer::events::SaleEvent;

const DRAIN: Duration = Duration::from_secs(120);

async fn pipeline(label: &str) -> Arc<Pipeline> {
    Arc::new(
        Pipeline::start(label)
            .await
            .expect("the pipeline fixture starts"),
    )
}

fn relay() -> Role {
    Role::Relay {
        name: "relay-0".into(),
    }
}

fn writer() -> Role {
    Role::Write {
        batch_size: 1_000,
        batch_wait_ms: 100,
    }
}

/// Starts `role` armed to abort at `crash_point` and waits until it has.
async fn run_until_crash(p: &Pipeline, role: Role, crash_point: &str) {
    let mut process = p
        .spawn(role, None, &[("SECKILL_CRASH_AT", crash_point)])
        .await
        .unwrap();
    let status = process
        .wait_exit(&format!("the crash point {crash_point}"), DRAIN)
        .await
        .unwrap();
    assert!(!status.success(), "it aborted at the crash point: {status}");
}

/// After a drain: MySQL has exactly these orders, its counters match Redis, reconcile is clean.
async fn assert_drained(p: &Pipeline, goods: &str, orders: &[String]) {
    let (code, report) = drained(p, goods, orders).await;
    assert_eq!(code, 0, "reconcile is clean at rest: {report}");
}

/// Waits for the drain: MySQL has exactly these orders, its counters match Redis; returns the
/// settled reconcile's exit code and report.
async fn drained(p: &Pipeline, goods: &str, orders: &[String]) -> (i32, serde_json::Value) {
    p.wait_for_rows(goods, orders.len() as i64, DRAIN)
        .await
        .unwrap();
    let (rows, distinct) = p.order_rows(goods).await.unwrap();
    assert_eq!((rows, distinct), (orders.len() as i64, orders.len() as i64));
    let in_mysql = p.order_ids(goods).await.unwrap();
    assert!(
        orders.iter().all(|o| in_mysql.contains(o)),
        "every confirmed order is in MySQL"
    );
    assert_eq!(
        p.mysql_stock(goods).await.unwrap(),
        p.redis_stock(goods).await.unwrap()
    );
    // The rows can land before the relay has acknowledged what it sent (a restarted relay
    // re-publishes its pending entries, which the writer already has).
    wait_for("the outbox to empty", DRAIN, || async {
        Ok((p.outbox_len(goods).await? == 0).then_some(()))
    })
    .await
    .unwrap();
    // The writer commits offsets right after the database: wait for the lag to reach zero.
    wait_for("reconcile to settle", Duration::from_secs(30), || async {
        let (code, report) = p.reconcile(&[]).unwrap();
        Ok((report["settled"] == true).then_some((code, report)))
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ten_thousand_sales_become_ten_thousand_rows() {
    let p = pipeline("tenk").await;
    p.open_sale("bulk", 10_000, 1).await.unwrap();
    let _relay = p.spawn(relay(), None, &[]).await.unwrap();
    let _writer = p.spawn(writer(), None, &[]).await.unwrap();
    let orders = p.sell("bulk", "u", 10_000).await.unwrap();
    assert_eq!(orders.len(), 10_000);
    assert_drained(&p, "bulk", &orders).await;
    assert_eq!(p.mysql_stock("bulk").await.unwrap(), (0, 10_000, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn writer_killed_mid_batch_loses_and_doubles_nothing() {
    let p = pipeline("writerkill").await;
    p.open_sale("g", 6_000, 1).await.unwrap();
    let _relay = p.spawn(relay(), None, &[]).await.unwrap();
    let orders = p.sell("g", "a", 3_000).await.unwrap();

    // 1. Dies right after its first database commit, before committing the Kafka offsets.
    run_until_crash(&p, writer(), "writer-after-db-commit").await;
    let (rows_at_crash, _) = p.order_rows("g").await.unwrap();
    assert!(rows_at_crash > 0, "the crash came after a database commit");

    // 2. Killed with SIGKILL at an arbitrary moment while it works through small batches.
    let more = p.sell("g", "b", 3_000).await.unwrap();
    let mut second = p
        .spawn(
            Role::Write {
                batch_size: 50,
                batch_wait_ms: 10,
            },
            None,
            &[],
        )
        .await
        .unwrap();
    p.wait_for_rows_at_least("g", rows_at_crash + 201, DRAIN)
        .await
        .unwrap();
    let redelivered = sum_metric(
        &second.metrics().await.unwrap(),
        "seckill_writer_duplicates_total",
    );
    assert!(
        redelivered > 0,
        "the first writer's uncommitted batch reached the second writer again and was absorbed"
    );
    second.kill();
    let (rows_at_kill, _) = p.order_rows("g").await.unwrap();
    assert!(
        rows_at_kill < 6_000,
        "killed mid-stream ({rows_at_kill} rows)"
    );

    let _third = p.spawn(writer(), None, &[]).await.unwrap();
    let all: Vec<String> = orders.into_iter().chain(more).collect();
    assert_drained(&p, "g", &all).await;
}

/// The writer applies each partition's events in a transaction of its own, side by side.
/// Six goods spread over the topic's partitions, all in Kafka before the writer starts, so its
/// first batch spans partitions; it dies right after the first of those transactions commits
/// (the others may have committed too).
/// The next writer gets the whole batch again: what was committed comes back as duplicates,
/// the rest is applied, and every goods ends with exactly its orders.
/// The relay works on several goods at once (`relay::GOODS_IN_FLIGHT_MAX`, 8): with more goods
/// than that, each goods' reservation must still reach MySQL before its confirmation or
/// cancellation, or the writer would refuse those as transitions of unknown orders.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn goods_relayed_side_by_side_keep_each_goods_order() {
    let p = pipeline("sidebyside").await;
    let goods: Vec<String> = (0..12).map(|i| format!("s{i}")).collect();
    let mut sold = Vec::new();
    // The whole backlog, with each order's later life, waits in the outboxes first.
    for id in &goods {
        p.open_sale(id, 60, 1).await.unwrap();
        let orders = p.sell(id, "u", 30).await.unwrap();
        assert_eq!(orders.len(), 30);
        for order in &orders[..10] {
            assert_eq!(p.settle(order, "confirm").await.unwrap().0, 200);
        }
        for order in &orders[10..15] {
            assert_eq!(p.settle(order, "cancel").await.unwrap().0, 200);
        }
        sold.push(orders);
    }
    let _writer = p.spawn(writer(), None, &[]).await.unwrap();
    let _relay = p.spawn(relay(), None, &[]).await.unwrap();
    for (id, orders) in goods.iter().zip(&sold) {
        assert_drained(&p, id, orders).await;
        // 60 units: 10 sold, 15 still reserved, 5 returned by the cancellations.
        assert_eq!(p.mysql_stock(id).await.unwrap(), (35, 15, 10), "{id}");
        let states = p.mysql_orders(id).await.unwrap();
        let count = |state: &str| states.values().filter(|(s, _)| s == state).count();
        assert_eq!(
            (count("confirmed"), count("released"), count("reserved")),
            (10, 5, 15),
            "{id}: {states:?}"
        );
    }
    assert_eq!(
        topic_messages(&p.broker.bootstrap(), DEAD_LETTER_TOPIC),
        0,
        "no event was refused"
    );
}

/// A goods whose outbox the relay cannot read (here a key of the wrong type, which no
/// retry mends) rests on a backoff of its own; the other goods keep flowing at full speed.
/// When one failing goods held up the whole pass, each pass waited up to 5 s and moved at most
/// 2,048 events a goods: the 16,000 sold here would have needed more than 30 s after the
/// sale, against the 15 s allowed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_broken_outbox_does_not_slow_the_other_goods() {
    let p = pipeline("brokenoutbox").await;
    p.open_sale("fine", 16_000, 1).await.unwrap();
    p.open_sale("broken", 10, 1).await.unwrap();
    let mut conn = p.redis.connection().await.unwrap();
    let broken = format!("{}:{{broken}}:outbox", p.prefix);
    let _: () = redis::pipe()
        .del(&broken)
        .set(&broken, "not a stream")
        .query_async(&mut conn)
        .await
        .unwrap();
    let started = Instant::now();
    let _writer = p.spawn(writer(), None, &[]).await.unwrap();
    let relay = p.spawn(relay(), None, &[]).await.unwrap();
    let errors = || async {
        let metrics = relay.metrics().await?;
        anyhow::Ok(sum_metric(&metrics, "seckill_relay_errors_total"))
    };
    // Seven failures: the broken goods' backoff has reached its bound of 5 s.
    wait_for(
        "the broken goods to reach its longest rest",
        DRAIN,
        || async { Ok((errors().await? >= 7).then_some(())) },
    )
    .await
    .unwrap();

    let orders = p.sell("fine", "u", 16_000).await.unwrap();
    assert_eq!(orders.len(), 16_000);
    p.wait_for_rows("fine", 16_000, Duration::from_secs(15))
        .await
        .unwrap();
    assert_eq!(p.order_rows("fine").await.unwrap(), (16_000, 16_000));
    assert_eq!(
        p.mysql_stock("fine").await.unwrap(),
        p.redis_stock("fine").await.unwrap()
    );

    // The broken goods was retried on its backoff, not in a hot loop: at most one failure
    // per 5 s once the backoff reached its bound (7 failures), and a spare one.
    let failures = errors().await.unwrap();
    let bound = 8 + started.elapsed().as_secs() / 5;
    assert!(
        (7..=bound).contains(&failures),
        "{failures} failures in {:?}",
        started.elapsed()
    );

    // Mended, the resting goods comes back on its next try.
    let _: () = redis::cmd("DEL")
        .arg(&broken)
        .query_async(&mut conn)
        .await
        .unwrap();
    let late = p.sell("broken", "v", 5).await.unwrap();
    assert_eq!(late.len(), 5);
    assert_drained(&p, "broken", &late).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn partitions_applied_side_by_side_survive_a_crash_between_their_commits() {
    let p = pipeline("lanes").await;
    let goods: Vec<String> = (0..6).map(|i| format!("g{i}")).collect();
    let _relay = p.spawn(relay(), None, &[]).await.unwrap();
    let mut orders = Vec::new();
    for id in &goods {
        p.open_sale(id, 300, 1).await.unwrap();
        orders.push(p.sell(id, "u", 150).await.unwrap());
    }
    wait_for("the relay to send every event", DRAIN, || async {
        for id in &goods {
            if p.outbox_len(id).await? > 0 {
                return Ok(None);
            }
        }
        Ok(Some(()))
    })
    .await
    .unwrap();
    let busy = partitions_with_messages(&p.broker.bootstrap(), TOPIC);
    assert!(busy >= 2, "the goods span {busy} partitions");

    run_until_crash(&p, writer(), "writer-after-db-commit").await;
    let mut rows_at_crash = 0;
    for id in &goods {
        rows_at_crash += p.order_rows(id).await.unwrap().0;
    }
    // At least the first lane's rows. Other lanes whose COMMIT had reached MariaDB when the
    // process died still commit after it, so more rows may appear after this count.
    assert!(
        (1..=900).contains(&rows_at_crash),
        "the crash came after a commit: {rows_at_crash} rows"
    );

    let writer = p.spawn(writer(), None, &[]).await.unwrap();
    for (id, sold) in goods.iter().zip(&orders) {
        p.wait_for_rows(id, sold.len() as i64, DRAIN).await.unwrap();
    }
    for (id, sold) in goods.iter().zip(&orders) {
        assert_drained(&p, id, sold).await;
        assert_eq!(p.mysql_stock(id).await.unwrap(), (150, 150, 0));
    }
    // The counters move just after the commit that made the rows visible: wait for them.
    let (inserted, duplicates) = wait_for("the writer to count its batch", DRAIN, || async {
        let metrics = writer.metrics().await?;
        let inserted = sum_metric(&metrics, "seckill_writer_orders_total");
        let duplicates = sum_metric(&metrics, "seckill_writer_duplicates_total");
        Ok((inserted + duplicates >= 900).then_some((inserted, duplicates)))
    })
    .await
    .unwrap();
    assert_eq!(
        (inserted + duplicates, duplicates >= rows_at_crash as u64),
        (900, true),
        "every event came back once: what the dead writer committed ({duplicates} of at least \
         {rows_at_crash}) as a duplicate that changed nothing, the rest ({inserted}) as new rows"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn relay_killed_after_delivery_before_ack_duplicates_are_absorbed() {
    let p = pipeline("relaykill").await;
    p.open_sale("g", 2_000, 1).await.unwrap();
    let orders = p.sell("g", "u", 2_000).await.unwrap();
    let writer = p.spawn(writer(), None, &[]).await.unwrap();

    run_until_crash(&p, relay(), "relay-after-publish").await;
    assert_eq!(
        p.outbox_len("g").await.unwrap(),
        2_000,
        "nothing was acknowledged"
    );

    // Same name: it re-reads what it had read but not acknowledged, and publishes it again.
    let _relay = p.spawn(relay(), None, &[]).await.unwrap();
    assert_drained(&p, "g", &orders).await;
    let metrics = writer.metrics().await.unwrap();
    assert!(
        sum_metric(&metrics, "seckill_writer_duplicates_total") > 0,
        "the republished events reached the writer and were absorbed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn broker_outage_is_absorbed_by_the_outbox() {
    let p = pipeline("brokerdown").await;
    p.open_sale("g", 100_000, 1).await.unwrap();
    let _relay = p.spawn(relay(), None, &[]).await.unwrap();
    let _writer = p.spawn(writer(), None, &[]).await.unwrap();
    let mut orders = p.sell("g", "before", 500).await.unwrap();
    p.wait_for_rows("g", 500, DRAIN).await.unwrap();

    // The broker is away for at least 20 s while the sale goes on.
    p.broker.stop();
    let down_since = Instant::now();
    let mut round = 0;
    let mut outbox_peak = 0;
    while down_since.elapsed() < Duration::from_secs(21) {
        orders.extend(p.sell("g", &format!("down{round}"), 100).await.unwrap());
        outbox_peak = outbox_peak.max(p.outbox_len("g").await.unwrap());
        round += 1;
    }
    assert!(
        outbox_peak >= 1_000,
        "sales waited in the outbox (peak {outbox_peak})"
    );
    let (rows_while_down, _) = p.order_rows("g").await.unwrap();
    assert!(rows_while_down < orders.len() as i64);

    p.broker.resume().await.unwrap();
    assert_drained(&p, "g", &orders).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mysql_cut_off_commits_no_offsets_and_recovers() {
    let p = pipeline("mysqlcut").await;
    p.open_sale("g", 10_000, 1).await.unwrap();
    let _relay = p.spawn(relay(), None, &[]).await.unwrap();
    let proxy = TcpProxy::start("127.0.0.1:3306".parse().unwrap())
        .await
        .unwrap();
    let via_proxy =
        p.db.url()
            .replace("127.0.0.1:3306", &proxy.addr.to_string());
    assert_ne!(via_proxy, p.db.url());
    let writer = p.spawn(writer(), Some(&via_proxy), &[]).await.unwrap();
    let mut orders = p.sell("g", "a", 300).await.unwrap();
    p.wait_for_rows("g", 300, DRAIN).await.unwrap();
    // The rows are visible once MySQL committed, the offsets once the writer heard so: a cut
    // in between would swallow the acknowledgement and leave these 300 uncommitted too.
    wait_for("the first offsets to be committed", DRAIN, || async {
        let (_, report) = p.reconcile(&[])?;
        Ok((report["kafka_lag"] == 0).then_some(()))
    })
    .await
    .unwrap();

    // Lag counts messages, and the relay packs events: the 700 events travel in however many
    // messages their reads made. Every one of those must stay uncommitted.
    let before_cut = topic_messages(&p.broker.bootstrap(), TOPIC);
    proxy.cut();
    orders.extend(p.sell("g", "b", 700).await.unwrap());
    // Every event reaches Kafka, none reaches MySQL, and the writer commits no offsets.
    let waiting = wait_for("the events to wait in Kafka", DRAIN, || async {
        let (_, report) = p.reconcile(&[])?;
        let since_cut = topic_messages(&p.broker.bootstrap(), TOPIC) - before_cut;
        let relayed = p.outbox_len("g").await? == 0;
        Ok((relayed && since_cut > 0 && report["kafka_lag"] == since_cut).then_some(since_cut))
    })
    .await
    .unwrap();
    assert!(waiting <= 700, "{waiting} messages for 700 events");
    wait_for("the writer to hit the cut", DRAIN, || async {
        let errors = sum_metric(&writer.metrics().await?, "seckill_writer_errors_total");
        Ok((errors >= 2).then_some(()))
    })
    .await
    .unwrap();
    assert_eq!(p.order_rows("g").await.unwrap().0, 300);
    let (_, report) = p.reconcile(&[]).unwrap();
    assert_eq!(
        report["kafka_lag"], waiting,
        "no offsets committed while MySQL is away"
    );
    // The writer's own lag gauge shows the backlog while it retries, not the lag it had
    // before the cut.
    wait_for("the lag gauge to show the backlog", DRAIN, || async {
        let lag = sum_metric(&writer.metrics().await?, "seckill_consumer_lag");
        Ok((lag == waiting as u64).then_some(()))
    })
    .await
    .unwrap();

    proxy.restore();
    assert_drained(&p, "g", &orders).await;
}

/// A lock held on the sales row (a long report, an operator's manual fix) makes the writer's
/// transaction wait out `innodb_lock_wait_timeout`. That error is the server's, not the
/// events': the batch is retried until the lock goes, and not one sale is dead-lettered.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lock_wait_timeout_is_retried_not_dead_lettered() {
    let p = pipeline("lockwait").await;
    p.open_sale("g", 1_000, 1).await.unwrap();
    let _relay = p.spawn(relay(), None, &[]).await.unwrap();
    let writer = p.spawn(writer(), None, &[]).await.unwrap();
    let mut orders = p.sell("g", "a", 100).await.unwrap();
    p.wait_for_rows("g", 100, DRAIN).await.unwrap();

    let mut lock = p.db.pool.begin().await.unwrap();
    sqlx::query("SELECT stock FROM sales WHERE goods_id = 'g' FOR UPDATE")
        .execute(&mut *lock)
        .await
        .unwrap();
    orders.extend(p.sell("g", "b", 200).await.unwrap());
    // The writer's lock wait is 5 s; two timed-out attempts prove it retries the batch.
    wait_for("the writer to time out on the lock", DRAIN, || async {
        let errors = sum_metric(&writer.metrics().await?, "seckill_writer_errors_total");
        Ok((errors >= 2).then_some(()))
    })
    .await
    .unwrap();
    let metrics = writer.metrics().await.unwrap();
    assert_eq!(sum_metric(&metrics, "seckill_dead_letters_total"), 0);
    assert_eq!(
        p.order_rows("g").await.unwrap().0,
        100,
        "nothing applied under the lock"
    );
    lock.rollback().await.unwrap();

    let (code, report) = drained(&p, "g", &orders).await;
    assert_eq!(code, 0, "reconcile is clean: {report}");
    assert_eq!(report["dead_letters"], 0, "{report}");
    assert_eq!(
        sum_metric(
            &writer.metrics().await.unwrap(),
            "seckill_dead_letters_total"
        ),
        0
    );
    assert_eq!(p.mysql_stock("g").await.unwrap(), (700, 300, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unparsable_message_goes_to_dead_letter_and_the_partition_flows() {
    let p = pipeline("deadletter").await;
    p.open_sale("g", 1_000, 1).await.unwrap();
    let writer = p.spawn(writer(), None, &[]).await.unwrap();
    // An unknown type of 600 KB with a carriage return in it, which serde's words quote: as a
    // reason of the same size the dead letter (message plus reason) would be past the
    // producer's 1 MB limit, and the writer would retry it forever (found by fuzzing).
    let huge = format!(r#"{{"type":"\r{}"}}"#, "x".repeat(600_000));
    // Same key as the sales, so the same partition: what follows must not be blocked.
    for payload in [
        &b"{not json"[..],
        br#"{"type":"reserved","order_id":"g.1.x","goods_id":"g"}"#,
        huge.as_bytes(),
    ] {
        p.broker.publish_sale_message("g", payload).await.unwrap();
    }
    let _relay = p.spawn(relay(), None, &[]).await.unwrap();
    let orders = p.sell("g", "u", 200).await.unwrap();
    let (code, report) = drained(&p, "g", &orders).await;
    assert_eq!(
        sum_metric(
            &writer.metrics().await.unwrap(),
            "seckill_dead_letters_total"
        ),
        3
    );
    // The sales all landed, but three messages never will: reconcile is not clean.
    assert_eq!(report["goods"][0]["drift"]["reserved"], 0, "{report}");
    assert_eq!(report["dead_letters"], 3, "{report}");
    assert_eq!(code, 2, "dead letters make reconcile unclean: {report}");

    let letters = read_topic(&p.broker.bootstrap(), DEAD_LETTER_TOPIC, 3);
    assert_eq!(letters.len(), 3);
    assert_eq!(letters[0].0, b"{not json");
    // The huge one is kept whole; its reason is short and one line.
    assert_eq!(letters[2].0, huge.as_bytes());
    let reason = &letters[2].1;
    assert!(reason.len() <= 300, "a {}-byte reason", reason.len());
    assert!(
        reason.contains("unknown variant") && !reason.contains('\r'),
        "{reason}"
    );
    assert!(
        letters.iter().all(|(_, reason)| !reason.is_empty()),
        "{letters:?}"
    );
    assert!(
        letters[1].1.contains("missing field"),
        "the reason says why: {}",
        letters[1].1
    );
}

/// The relay packs an outbox read into few Kafka messages, one event per line. Junk written
/// into the outbox between real sales lands in those packs: each junk event is dead-lettered
/// alone (its `source` names the pack's line), every sale beside it reaches MySQL, and the
/// topic holds far fewer messages than events.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn junk_in_a_pack_is_dead_lettered_alone_and_its_neighbours_land() {
    let p = pipeline("packjunk").await;
    p.open_sale("g", 1_000, 1).await.unwrap();
    let mut orders = p.sell("g", "a", 150).await.unwrap();
    let outbox = format!("{}:{{g}}:outbox", p.prefix);
    let mut conn = p.redis.connection().await.unwrap();
    let junk: [(&str, &str); 5] = [
        ("event", "{not json"),
        (
            "event",
            r#"{"type":"reserved","order_id":"g.1.x","goods_id":"g"}"#,
        ),
        ("event", ""),
        ("event", "{\n}"),
        ("no_event", "x"),
    ];
    for (field, value) in junk {
        let _: String = redis::cmd("XADD")
            .arg(&outbox)
            .arg("*")
            .arg(field)
            .arg(value)
            .query_async(&mut conn)
            .await
            .unwrap();
    }
    orders.extend(p.sell("g", "b", 150).await.unwrap());
    assert_eq!(p.outbox_len("g").await.unwrap(), 305);

    let writer = p.spawn(writer(), None, &[]).await.unwrap();
    let relay = p.spawn(relay(), None, &[]).await.unwrap();
    let (code, report) = drained(&p, "g", &orders).await;
    assert_eq!(code, 2, "dead letters make reconcile unclean: {report}");
    assert_eq!(report["dead_letters"], 5, "{report}");
    assert_eq!(report["goods"][0]["drift"]["reserved"], 0, "{report}");
    let dead = |metrics: &str| sum_metric(metrics, "seckill_dead_letters_total");
    assert_eq!(dead(&writer.metrics().await.unwrap()), 4);
    assert_eq!(dead(&relay.metrics().await.unwrap()), 1);

    let letters = read_topic_with_source(&p.broker.bootstrap(), DEAD_LETTER_TOPIC, 5);
    let payload_of = |wanted: &[u8]| {
        letters
            .iter()
            .find(|(payload, _)| payload == wanted)
            .unwrap_or_else(|| {
                panic!(
                    "no dead letter {:?}: {letters:?}",
                    String::from_utf8_lossy(wanted)
                )
            })
    };
    // Packed junk: one line each, named by its line in the pack.
    for packed in [&b"{not json"[..], junk[1].1.as_bytes(), b""] {
        let (_, source) = payload_of(packed);
        assert!(
            source.contains('#'),
            "a packed event names its line: {source}"
        );
    }
    // An entry with a raw newline travels alone and is one dead letter, whole.
    let (_, source) = payload_of(b"{\n}");
    assert!(!source.contains('#'), "sent alone, not packed: {source}");

    // 300 events and 4 junk ones went to Kafka in a handful of messages.
    let messages = topic_messages(&p.broker.bootstrap(), TOPIC);
    assert!(
        (3..=30).contains(&messages),
        "{messages} messages for 304 events: the relay packs them"
    );
}

/// An order id MySQL holds arrives again for another buyer (as a Redis that forgot its epoch
/// would reissue it): not a redelivery but a conflict. Dead-lettered with a reason that names
/// the order and what differs, counted, never applied; the partition goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_conflicting_event_is_dead_lettered_counted_and_never_applied() {
    let p = pipeline("conflict").await;
    p.open_sale("g", 100, 1).await.unwrap();
    let (_relay, writer) = p.spawn_relay_and_writer(1_000, 100).await.unwrap();
    // Registered when the writer starts, so that an alert sees 0 rather than nothing.
    wait_for("the conflict counter at 0", DRAIN, || async {
        let metrics = writer.metrics().await?;
        Ok(metrics
            .lines()
            .any(|line| line == "seckill_writer_conflicts_total 0")
            .then_some(()))
    })
    .await
    .unwrap();
    let first = p.sell("g", "a", 10).await.unwrap();
    p.wait_for_rows("g", 10, DRAIN).await.unwrap();
    let victim = &first[0];
    let before = order_row(&p, victim).await;

    let conflicting = SaleEvent::Reserved {
        order_id: victim.clone(),
        goods_id: "g".into(),
        user_id: "intruder".into(),
        quantity: 1,
        request_id: "intruder-1".into(),
        at_ms: 1_800_000_000_000,
    }
    .to_json();
    // Keyed by its goods like the relay's events: the same partition, which must go on.
    p.broker
        .publish_sale_message("g", &conflicting)
        .await
        .unwrap();
    let later = p.sell("g", "b", 10).await.unwrap();
    let all: Vec<String> = first.iter().chain(&later).cloned().collect();
    let (code, report) = drained(&p, "g", &all).await;
    // Every sale landed with its counters; the conflict waits in the dead-letter topic for a
    // person, so reconcile says so.
    assert_eq!(report["goods"][0]["drift"]["reserved"], 0, "{report}");
    assert_eq!(report["dead_letters"], 1, "{report}");
    assert_eq!(code, 2, "a conflict makes reconcile unclean: {report}");
    assert_eq!(
        order_row(&p, victim).await,
        before,
        "the original row is untouched"
    );

    wait_for("the conflict to be counted", DRAIN, || async {
        let metrics = writer.metrics().await?;
        Ok((sum_metric(&metrics, "seckill_writer_conflicts_total") == 1).then_some(metrics))
    })
    .await
    .map(|metrics| {
        assert_eq!(sum_metric(&metrics, "seckill_dead_letters_total"), 1);
        assert_eq!(
            sum_metric(&metrics, "seckill_writer_duplicates_total"),
            0,
            "not taken for a redelivery"
        );
    })
    .unwrap();
    let letters = read_topic(&p.broker.bootstrap(), DEAD_LETTER_TOPIC, 1);
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].0, conflicting);
    let reason = &letters[0].1;
    let expected = format!(
        "order {victim} is another purchase in MySQL: reserved event with user_id intruder \
         (MySQL has {}), request_id intruder-1 (MySQL has {})",
        before.0, before.1
    );
    assert_eq!(reason, &expected);
}

/// An order's (user id, request id, quantity, state) in MySQL.
async fn order_row(p: &Pipeline, order_id: &str) -> (String, String, u32, String) {
    sqlx::query_as("SELECT user_id, request_id, quantity, state FROM orders WHERE order_id = ?")
        .bind(order_id)
        .fetch_one(&p.db.pool)
        .await
        .unwrap()
}

/// Reads `count` messages (payload, `reason` header) from partition 0 of a topic.
fn read_topic(bootstrap: &str, topic: &str, count: usize) -> Vec<(Vec<u8>, String)> {
    read_topic_header(bootstrap, topic, count, "reason")
}

/// Reads `count` messages (payload, `source` header) from partition 0 of a topic.
fn read_topic_with_source(bootstrap: &str, topic: &str, count: usize) -> Vec<(Vec<u8>, String)> {
    read_topic_header(bootstrap, topic, count, "source")
}

/// Messages in every partition of a topic (from each one's low to high watermark).
fn topic_messages(bootstrap: &str, topic: &str) -> i64 {
    watermarks(bootstrap, topic)
        .iter()
        .map(|(low, high)| high - low)
        .sum()
}

/// Partitions of a topic holding at least one message.
fn partitions_with_messages(bootstrap: &str, topic: &str) -> usize {
    watermarks(bootstrap, topic)
        .iter()
        .filter(|(low, high)| high > low)
        .count()
}

/// Each partition's low and high watermarks.
fn watermarks(bootstrap: &str, topic: &str) -> Vec<(i64, i64)> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "test-counter")
        .create()
        .unwrap();
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .unwrap();
    metadata
        .topics()
        .iter()
        .flat_map(|t| t.partitions())
        .map(|partition| {
            consumer
                .fetch_watermarks(topic, partition.id(), Duration::from_secs(10))
                .unwrap()
        })
        .collect()
}

/// Reads `count` messages (payload, the value of header `header`) from partition 0 of a topic.
fn read_topic_header(
    bootstrap: &str,
    topic: &str,
    count: usize,
    header: &str,
) -> Vec<(Vec<u8>, String)> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "test-reader")
        .create()
        .unwrap();
    let mut list = TopicPartitionList::new();
    list.add_partition_offset(topic, 0, Offset::Beginning)
        .unwrap();
    consumer.assign(&list).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut messages = Vec::new();
    while messages.len() < count && Instant::now() < deadline {
        if let Some(Ok(message)) = consumer.poll(Duration::from_millis(200)) {
            let reason = message
                .headers()
                .and_then(|h| h.iter().find(|h| h.key == header))
                .and_then(|h| h.value)
                .map(|v| String::from_utf8_lossy(v).into_owned())
                .unwrap_or_default();
            messages.push((message.payload().unwrap_or_default().to_vec(), reason));
        }
    }
    messages
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reconcile_is_zero_at_rest_and_sees_a_tamper() {
    let p = pipeline("reconcile").await;
    p.open_sale("g", 500, 1).await.unwrap();
    let _relay = p.spawn(relay(), None, &[]).await.unwrap();
    let _writer = p.spawn(writer(), None, &[]).await.unwrap();
    let orders = p.sell("g", "u", 120).await.unwrap();
    assert_drained(&p, "g", &orders).await;

    sqlx::query("UPDATE sales SET stock = stock - 3, reserved = reserved + 3 WHERE goods_id = 'g'")
        .execute(&p.db.pool)
        .await
        .unwrap();
    let (code, report) = p.reconcile(&[]).unwrap();
    assert_eq!(code, 2, "drift is reported: {report}");
    let drift = &report["goods"][0]["drift"];
    assert_eq!(
        (drift["available"].as_i64(), drift["reserved"].as_i64()),
        (Some(-3), Some(3))
    );

    let (code, report) = p.reconcile(&["--repair"]).unwrap();
    assert_eq!(
        code, 0,
        "repair recomputes MySQL's counters from its rows: {report}"
    );
    assert_eq!(p.mysql_stock("g").await.unwrap(), (380, 120, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn writer_finishes_and_commits_its_batch_on_sigterm() {
    let p = pipeline("sigterm").await;
    p.open_sale("g", 5_000, 1).await.unwrap();
    let orders = p.sell("g", "u", 5_000).await.unwrap();
    let _relay = p.spawn(relay(), None, &[]).await.unwrap();
    wait_for("the outbox to drain into Kafka", DRAIN, || async {
        Ok((p.outbox_len("g").await? == 0).then_some(()))
    })
    .await
    .unwrap();
    let mut first = p
        .spawn(
            Role::Write {
                batch_size: 100,
                batch_wait_ms: 10,
            },
            None,
            &[],
        )
        .await
        .unwrap();
    p.wait_for_rows_at_least("g", 500, DRAIN).await.unwrap();
    let status = first.terminate(Duration::from_secs(30)).await.unwrap();
    assert!(status.success(), "a clean exit on SIGTERM: {status}");
    let (rows_at_stop, _) = p.order_rows("g").await.unwrap();
    assert!(
        rows_at_stop < 5_000,
        "stopped mid-stream ({rows_at_stop} rows)"
    );

    let second = p.spawn(writer(), None, &[]).await.unwrap();
    assert_drained(&p, "g", &orders).await;
    assert_eq!(
        sum_metric(
            &second.metrics().await.unwrap(),
            "seckill_writer_duplicates_total"
        ),
        0,
        "everything the first writer applied had its offsets committed before it exited"
    );
}
