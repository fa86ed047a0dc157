//! The batched MySQL writer: consumes sale events from Kafka and applies them to MySQL.
//!
//! This module is the consuming side: partition assignment, batches, offsets, dead letters.
//! A message is one event or a pack of them (`events_pack.rs`); each event is decoded on its
//! own, and a batch closes at `batch_size_max` events or `batch_wait` after its first. Each
//! partition's events of a batch are applied in one transaction (`writer/apply.rs`), the
//! partitions side by side; a transaction inserts the orders that are really new (the order
//! id is the primary key, so a redelivered event changes nothing) and updates each goods'
//! counters once with the aggregated quantity; `seckill_model::transition` decides what
//! each event does. Kafka offsets are committed only after the database commit. Messages that
//! cannot be parsed or applied go to the dead-letter topic with the reason; an event whose
//! order id MySQL holds for another purchase is a conflict (an order id issued twice), which
//! also is logged as an error and counted in [`CONFLICTS_METRIC`]. A dead letter is one event,
//! also out of a pack: its `source` header names the message and, in a pack, its line.

mod apply;

pub use apply::{apply_events, Applied, Refused};

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::{Header, Message, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use sqlx::MySqlPool;
use tokio_util::sync::CancellationToken;

use crate::events::SaleEvent;
use crate::kafka::KafkaConfig;

const BACKOFF_FIRST: Duration = Duration::from_millis(100);
const BACKOFF_LAST: Duration = Duration::from_secs(5);
/// Bound on Kafka's blocking calls (commit, metadata).
const KAFKA_CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// The lag gauge is refreshed at most this often: it costs a broker round trip per partition.
const LAG_REFRESH_EVERY: Duration = Duration::from_secs(1);
/// Bound on each of those round trips; short, so that a broker that does not answer cannot
/// hold up a retry of the batch for long.
const LAG_CALL_TIMEOUT: Duration = Duration::from_secs(2);
/// Partitions' transactions one batch keeps open at once: the MySQL pool (8 connections) is
/// shared with the deducter's MySQL lane and the admin API.
const LANES_IN_FLIGHT_MAX: usize = 3;
/// Counter of sale events whose order id MySQL holds for another purchase.
pub const CONFLICTS_METRIC: &str = crate::telemetry::CONFLICTS;

#[derive(Debug, Clone)]
pub struct WriterConfig {
    pub kafka: KafkaConfig,
    /// A batch closes at this many events...
    pub batch_size_max: usize,
    /// ...or this long after its first event, whichever comes first.
    pub batch_wait: Duration,
    /// Partitions this writer applies (None: all). Writers sharing a topic split its
    /// partitions between them; an overlap is safe (idempotent) but wasted work.
    pub partitions: Option<Vec<i32>>,
}

pub struct Writer {
    pub mysql: MySqlPool,
    pub config: WriterConfig,
    /// Publishes dead letters.
    pub producer: FutureProducer,
}

/// An event (or a whole message) the writer gives up on, with the reason.
#[derive(Debug)]
struct DeadLetter<'a> {
    message: &'a OwnedMessage,
    /// What is dead-lettered: the message's payload, or one line of a pack.
    payload: &'a [u8],
    /// The line of a pack the event was (see [`crate::events_pack`]).
    line: Option<usize>,
    reason: String,
    /// An order id issued for two purchases (see `seckill_model::transition::Step::Conflict`):
    /// logged as an error and counted in [`CONFLICTS_METRIC`] besides the dead-letter count.
    conflict: bool,
}

/// One event of a message: the message, its line in a pack, its text.
type Piece<'a> = (&'a OwnedMessage, Option<usize>, &'a [u8]);

impl<'a> DeadLetter<'a> {
    /// An event refused for its content (unreadable, or not applicable), not a conflict.
    fn new((message, line, payload): Piece<'a>, reason: String) -> Self {
        DeadLetter {
            message,
            payload,
            line,
            reason,
            conflict: false,
        }
    }
}

/// Whether a message is a pack of events (it carries [`crate::events_pack::HEADER`]), and the
/// event count its header gives.
fn pack_header(message: &OwnedMessage) -> Option<Option<&[u8]>> {
    use rdkafka::message::Headers;
    message.headers().and_then(|headers| {
        headers
            .iter()
            .find(|h| h.key == crate::events_pack::HEADER)
            .map(|h| h.value)
    })
}

/// The events in a message, each with the message and its line in a pack.
fn pieces(message: &OwnedMessage) -> Vec<Piece<'_>> {
    let packed = pack_header(message).is_some();
    crate::events_pack::split(message.payload().unwrap_or_default(), packed)
        .into_iter()
        .map(|(line, bytes)| (message, line, bytes))
        .collect()
}

/// Events a message counts for a batch's size.
fn events_in(message: &OwnedMessage) -> usize {
    crate::events_pack::count(pack_header(message).flatten())
}

/// The consumer-lag gauge, per partition: messages in each of the writer's partitions after the
/// group's committed offset, i.e. not yet durably in MySQL. Refreshed by the consuming loop and by every retry
/// of a batch (a backlog must show while MySQL is away and it piles up), at most once every
/// [`LAG_REFRESH_EVERY`].
#[derive(Default)]
struct LagGauge {
    refreshed: Option<Instant>,
}

impl LagGauge {
    fn refresh(&mut self, consumer: &StreamConsumer) {
        if self
            .refreshed
            .is_some_and(|at| at.elapsed() < LAG_REFRESH_EVERY)
        {
            return;
        }
        self.refreshed = Some(Instant::now());
        let lag = tokio::task::block_in_place(|| {
            let committed = consumer.committed(LAG_CALL_TIMEOUT).ok()?;
            crate::kafka::uncommitted(consumer, &committed, LAG_CALL_TIMEOUT)
        });
        match lag {
            Some(partitions) => {
                for (partition, lag) in partitions {
                    metrics::gauge!(crate::telemetry::CONSUMER_LAG,
                        "partition" => partition.to_string())
                    .set(lag as f64);
                }
            }
            None => tracing::debug!("consumer lag not refreshed: the broker did not answer"),
        }
    }
}

pub fn consumer(config: &KafkaConfig) -> anyhow::Result<StreamConsumer> {
    ClientConfig::new()
        .set("bootstrap.servers", &config.brokers)
        .set("group.id", &config.group)
        // Offsets are ours to commit, after the database commit.
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "10000")
        .set("heartbeat.interval.ms", "1000")
        .set("socket.timeout.ms", "5000")
        // Some brokers (Tansu) hold every fetch for the full wait even when data is ready;
        // a short wait keeps a backlog draining fast and costs an idle writer little.
        .set("fetch.wait.max.ms", "20")
        // Bounds what librdkafka prefetches while a batch is being applied.
        .set("queued.max.messages.kbytes", "16384")
        .create()
        .map_err(|e| anyhow::anyhow!("cannot create the Kafka consumer: {e}"))
}

impl Writer {
    /// Consumes and applies until `shutdown`; then finishes the batch in hand, commits it and
    /// returns.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        crate::telemetry::register_writer();
        let consumer = Arc::new(consumer(&self.config.kafka)?);
        let Some(partitions) = self.assign(&consumer, &shutdown).await? else {
            return Ok(());
        };
        tracing::info!(
            topic = %self.config.kafka.topic, group = %self.config.kafka.group, ?partitions,
            "writer started"
        );
        let mut lag = LagGauge::default();
        loop {
            let batch = self.collect(&consumer, &shutdown).await;
            if !batch.is_empty() {
                let applying = self.apply_until_done(&consumer, &mut lag, &batch, &shutdown);
                let Some(applied) = applying.await else {
                    // Shut down before the batch could be applied: commit nothing, so the
                    // batch is read again by whoever consumes next.
                    break;
                };
                // A failed commit is retried by the next batch's commit, which covers these
                // offsets too; a crash before it only redelivers events MySQL already has.
                match commit_offsets(&consumer, &batch) {
                    Ok(()) => tracing::debug!(?applied, events = batch.len(), "batch committed"),
                    Err(e) => {
                        tracing::warn!(error = %e, "offset commit failed; the next commit covers it")
                    }
                }
            }
            lag.refresh(&consumer);
            if shutdown.is_cancelled() {
                break;
            }
        }
        tracing::info!("writer stopped");
        Ok(())
    }

    /// Takes the configured partitions (all by default) and resumes each from the group's
    /// committed offset. Static assignment, not group membership: a restarted writer owns
    /// its partitions at once, with no rebalance in the middle of a sale (and none of the
    /// rebalance gaps some Kafka-compatible brokers have). Waits, bounded by shutdown, for the
    /// topic to exist. Returns `None` if shut down first.
    async fn assign(
        &self,
        consumer: &StreamConsumer,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<Option<Vec<i32>>> {
        let topic = &self.config.kafka.topic;
        let mut backoff = BACKOFF_FIRST;
        loop {
            let found = tokio::task::block_in_place(|| {
                consumer.fetch_metadata(Some(topic), KAFKA_CALL_TIMEOUT)
            })
            .map(|metadata| {
                metadata
                    .topics()
                    .iter()
                    .filter(|t| t.name() == topic && t.error().is_none())
                    .flat_map(|t| t.partitions().iter().map(|p| p.id()))
                    .collect::<Vec<i32>>()
            });
            match found {
                Ok(mut partitions) if !partitions.is_empty() => {
                    if let Some(wanted) = &self.config.partitions {
                        let missing: Vec<&i32> =
                            wanted.iter().filter(|p| !partitions.contains(p)).collect();
                        anyhow::ensure!(
                            missing.is_empty(),
                            "topic {topic} has no partitions {missing:?} (it has {partitions:?})"
                        );
                        partitions = wanted.clone();
                    }
                    let list = self.resume_offsets(consumer, &partitions)?;
                    consumer.assign(&list).map_err(|e| {
                        anyhow::anyhow!("cannot assign {topic} {partitions:?}: {e}")
                    })?;
                    return Ok(Some(partitions));
                }
                Ok(_) => tracing::warn!(%topic, "topic not found yet; waiting"),
                Err(e) => {
                    tracing::warn!(%topic, error = %e, "cannot read topic metadata; retrying")
                }
            }
            // The topic may not exist yet: retry with a bounded backoff, shutdown cuts it short.
            tokio::select! {
                () = shutdown.cancelled() => return Ok(None),
                () = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(BACKOFF_LAST);
        }
    }

    /// Each partition's committed offset; a partition never committed starts at the
    /// beginning (asked for explicitly: left to the broker, "no offset" can mean the end,
    /// which would skip every event published before this writer first started).
    fn resume_offsets(
        &self,
        consumer: &StreamConsumer,
        partitions: &[i32],
    ) -> anyhow::Result<TopicPartitionList> {
        let topic = &self.config.kafka.topic;
        let mut wanted = TopicPartitionList::new();
        for partition in partitions {
            wanted.add_partition(topic, *partition);
        }
        let committed =
            tokio::task::block_in_place(|| consumer.committed_offsets(wanted, KAFKA_CALL_TIMEOUT))
                .map_err(|e| anyhow::anyhow!("cannot read committed offsets of {topic}: {e}"))?;
        let mut list = TopicPartitionList::new();
        for element in committed.elements() {
            let offset = match element.offset() {
                Offset::Offset(at) if at >= 0 => Offset::Offset(at),
                _ => Offset::Beginning,
            };
            tracing::info!(%topic, partition = element.partition(), ?offset, "resuming partition");
            list.add_partition_offset(topic, element.partition(), offset)?;
        }
        Ok(list)
    }

    /// Waits for a first message, then takes more until the batch holds `batch_size_max`
    /// events or its time is up.
    async fn collect(
        &self,
        consumer: &StreamConsumer,
        shutdown: &CancellationToken,
    ) -> Vec<OwnedMessage> {
        let mut batch = Vec::new();
        let first = tokio::select! {
            () = shutdown.cancelled() => return batch,
            // A pause now and then lets the caller refresh the lag gauge.
            () = tokio::time::sleep(Duration::from_secs(1)) => return batch,
            message = consumer.recv() => message,
        };
        // A batch is sized in events, and a message may be a pack of many.
        let mut events = 0;
        match first {
            Ok(message) => {
                let message = message.detach();
                events += events_in(&message);
                batch.push(message);
            }
            Err(e) => {
                tracing::warn!(error = %e, "kafka receive failed");
                return batch;
            }
        }
        let deadline = tokio::time::Instant::now() + self.config.batch_wait;
        while events < self.config.batch_size_max {
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = tokio::time::sleep_until(deadline) => break,
                message = consumer.recv() => match message {
                    Ok(message) => {
                        let message = message.detach();
                        events += events_in(&message);
                        batch.push(message);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "kafka receive failed");
                        break;
                    }
                },
            }
        }
        batch
    }

    /// Applies a batch and publishes its dead letters, retrying with backoff while MySQL or
    /// Kafka is away. Every step is idempotent, so a retry after a partial success is safe.
    /// Returns `None` only if shutdown came first.
    async fn apply_until_done(
        &self,
        consumer: &StreamConsumer,
        lag: &mut LagGauge,
        batch: &[OwnedMessage],
        shutdown: &CancellationToken,
    ) -> Option<Applied> {
        let mut backoff = BACKOFF_FIRST;
        loop {
            let started = Instant::now();
            let result = match self.apply(batch).await {
                Ok((applied, dead)) => {
                    // Committed: the new orders' rows are in MySQL as of now.
                    record_deduct_to_mysql(&applied.new_orders_reserved_at_ms);
                    self.publish_dead_letters(&dead).await.map(|()| applied)
                }
                Err(e) => Err(e),
            };
            match result {
                Ok(applied) => {
                    metrics::histogram!("seckill_writer_batch_events").record(batch.len() as f64);
                    metrics::histogram!("seckill_writer_batch_duration_seconds")
                        .record(started.elapsed());
                    metrics::counter!("seckill_writer_orders_total")
                        .increment(applied.new_orders as u64);
                    metrics::counter!("seckill_writer_transitions_total")
                        .increment(applied.transitions as u64);
                    metrics::counter!("seckill_writer_duplicates_total")
                        .increment(applied.duplicates as u64);
                    return Some(applied);
                }
                Err(e) => {
                    metrics::counter!("seckill_writer_errors_total").increment(1);
                    tracing::warn!(error = %e, retry_in = ?backoff, events = batch.len(), "batch not applied; offsets not committed");
                }
            }
            // Nothing is consumed meanwhile, but events keep arriving: the gauge shows them.
            lag.refresh(consumer);
            // MySQL or Kafka is away: retry with a bounded backoff, shutdown cuts it short.
            tokio::select! {
                () = shutdown.cancelled() => return None,
                () = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(BACKOFF_LAST);
        }
    }

    /// Applies a batch: each partition's events in a transaction of their own, up to
    /// [`LANES_IN_FLIGHT_MAX`] transactions side by side. A goods lives on one partition (its
    /// id is the key), so they touch different sales rows; a batch where one goods shows up on
    /// two partitions (only a hand-made message can do that) is applied as one transaction.
    /// Each transaction is [`Writer::apply_lane`]'s. Any error that is not about the data
    /// fails the whole batch, which is retried whole; what one lane committed meanwhile comes
    /// back as duplicates, which change nothing.
    async fn apply<'a>(
        &self,
        batch: &'a [OwnedMessage],
    ) -> anyhow::Result<(Applied, Vec<DeadLetter<'a>>)> {
        let mut dead = Vec::new();
        let mut lanes: BTreeMap<i32, Vec<(Piece<'a>, SaleEvent)>> = BTreeMap::new();
        for piece in batch.iter().flat_map(pieces) {
            match piece.2 {
                [] => dead.push(DeadLetter::new(piece, "empty event".into())),
                bytes => match SaleEvent::from_json(bytes) {
                    Ok(event) => lanes
                        .entry(piece.0.partition())
                        .or_default()
                        .push((piece, event)),
                    Err(e) => dead.push(DeadLetter::new(piece, e.to_string())),
                },
            }
        }
        if !goods_disjoint(&lanes) {
            let one: Vec<_> = std::mem::take(&mut lanes).into_values().flatten().collect();
            lanes.insert(0, one);
        }
        let applying: Vec<_> = lanes
            .values()
            .map(|events| self.apply_lane(events))
            .collect();
        let results: Vec<_> = futures_util::stream::iter(applying)
            .buffered(LANES_IN_FLIGHT_MAX)
            .collect()
            .await;
        let mut applied = Applied::default();
        for result in results {
            let (lane, lane_dead) = result?;
            applied.absorb(lane);
            dead.extend(lane_dead);
        }
        applied.dead_letters = dead.len();
        Ok((applied, dead))
    }

    /// One transaction for a lane's events. If MySQL refuses it for a reason of its data
    /// (see [`refuses_the_data`]), each event is applied alone and the ones MySQL refuses
    /// for their data become dead letters, so one bad event cannot block its partition. Any
    /// other error (a lock wait timeout, a deadlock, a read-only or restarting server, a lost
    /// connection) says nothing about the events: it is returned, and the batch is retried
    /// whole, never dead-lettered.
    async fn apply_lane<'a>(
        &self,
        events: &[(Piece<'a>, SaleEvent)],
    ) -> anyhow::Result<(Applied, Vec<DeadLetter<'a>>)> {
        let mut dead = Vec::new();
        let parsed: Vec<&SaleEvent> = events.iter().map(|(_, e)| e).collect();
        match apply_events(&self.mysql, &parsed).await {
            Ok((applied, refused)) => {
                for refusal in refused {
                    dead.push(DeadLetter {
                        conflict: refusal.conflict,
                        ..DeadLetter::new(events[refusal.index].0, refusal.reason)
                    });
                }
                Ok((applied, dead))
            }
            Err(sqlx::Error::Database(e)) if refuses_the_data(e.as_ref()) => {
                tracing::warn!(error = %e, "MySQL refused the batch; applying its events one by one");
                let mut applied = Applied::default();
                for (piece, event) in events {
                    match apply_events(&self.mysql, &[event]).await {
                        Ok((a, refused)) => {
                            applied.absorb(a);
                            for refusal in refused {
                                dead.push(DeadLetter {
                                    conflict: refusal.conflict,
                                    ..DeadLetter::new(*piece, refusal.reason)
                                });
                            }
                        }
                        Err(sqlx::Error::Database(e)) if refuses_the_data(e.as_ref()) => {
                            dead.push(DeadLetter::new(*piece, format!("MySQL refused it: {e}")))
                        }
                        Err(e) => return Err(e.into()),
                    }
                }
                Ok((applied, dead))
            }
            Err(e) => Err(e.into()),
        }
    }

    async fn publish_dead_letters(&self, dead: &[DeadLetter<'_>]) -> anyhow::Result<()> {
        for letter in dead {
            let message = letter.message;
            if letter.conflict {
                tracing::error!(
                    topic = message.topic(), partition = message.partition(), offset = message.offset(),
                    line = ?letter.line, reason = %letter.reason,
                    "conflicting sale event sent to the dead-letter topic, not applied: an order id was issued for two purchases"
                );
            } else {
                tracing::warn!(
                    topic = message.topic(), partition = message.partition(), offset = message.offset(),
                    line = ?letter.line, reason = %letter.reason, "message sent to the dead-letter topic"
                );
            }
            // topic/partition/offset, and the line for an event of a pack.
            let mut source = format!(
                "{}/{}/{}",
                message.topic(),
                message.partition(),
                message.offset()
            );
            if let Some(line) = letter.line {
                source.push_str(&format!("#{line}"));
            }
            let headers = OwnedHeaders::new()
                .insert(Header {
                    key: "reason",
                    value: Some(letter.reason.as_bytes()),
                })
                .insert(Header {
                    key: "source",
                    value: Some(source.as_bytes()),
                });
            let mut record = FutureRecord::to(&self.config.kafka.dead_letter_topic)
                .payload(letter.payload)
                .headers(headers);
            if let Some(key) = message.key() {
                record = record.key(key);
            }
            self.producer
                .send(record, Duration::ZERO)
                .await
                .map_err(|(e, _)| anyhow::anyhow!("cannot publish a dead letter: {e}"))?;
            metrics::counter!("seckill_dead_letters_total", "source" => "kafka").increment(1);
            if letter.conflict {
                metrics::counter!(CONFLICTS_METRIC).increment(1);
            }
        }
        Ok(())
    }
}

/// Whether no goods has events in two lanes.
fn goods_disjoint<T>(lanes: &BTreeMap<i32, Vec<(T, SaleEvent)>>) -> bool {
    let mut owner: HashMap<&str, i32> = HashMap::new();
    lanes.iter().all(|(lane, events)| {
        events
            .iter()
            .all(|(_, event)| *owner.entry(event.goods_id()).or_insert(*lane) == *lane)
    })
}

/// Whether a database error is MySQL refusing the statement's data (the event itself is bad),
/// as opposed to the server being unable to apply it right now. Only the first kind may turn
/// an event into a dead letter: a transient error dead-lettered would drop a real sale from
/// MySQL. It is an allow-list, so an error not known to be about the data is retried (and
/// counted in `seckill_writer_errors_total`, which alerts) rather than thrown away.
fn refuses_the_data(error: &dyn sqlx::error::DatabaseError) -> bool {
    let number = error
        .try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>()
        .map(|e| e.number());
    is_data_error(number, error.code().as_deref())
}

/// MySQL error numbers about a statement's data whose SQLSTATE is the catch-all `HY000`.
const DATA_ERROR_NUMBERS: [u16; 3] = [
    1366, // incorrect value for a column
    1265, // data truncated for a column
    1411, // incorrect value for a function
];

/// Data errors: SQLSTATE class 21 (cardinality), 22 (data exception: out of range, too long,
/// bad value) and 23 (integrity: a CHECK such as `stock_not_negative`, NOT NULL, keys), plus
/// the few data errors MySQL files under `HY000`. Lock waits (1205, `HY000`), deadlocks
/// (1213, `40001`), read-only servers (1290/1792/1836, `HY000`/`25006`), shutdowns and lost
/// connections (`08S01`, `70100`) are not.
fn is_data_error(number: Option<u16>, sqlstate: Option<&str>) -> bool {
    let by_class = sqlstate.is_some_and(|s| {
        s.len() == 5 && (s.starts_with("21") || s.starts_with("22") || s.starts_with("23"))
    });
    by_class || number.is_some_and(|n| DATA_ERROR_NUMBERS.contains(&n))
}

/// Records, for each order a batch inserted, the time from its reservation in Redis to now.
/// The two clocks are different hosts' (Redis's, this one's), assumed NTP-close like the sale
/// window already is; a reservation that seems to come from the future counts as 0.
fn record_deduct_to_mysql(reserved_at_ms: &[i64]) {
    if reserved_at_ms.is_empty() {
        return;
    }
    let now_ms = chrono::Utc::now().timestamp_millis();
    let histogram = metrics::histogram!(crate::telemetry::DEDUCT_TO_MYSQL);
    for at_ms in reserved_at_ms {
        histogram.record(now_ms.saturating_sub(*at_ms).max(0) as f64 / 1000.0);
    }
}

/// Commits, per partition, the offset after the last message of the batch.
fn commit_offsets(consumer: &StreamConsumer, batch: &[OwnedMessage]) -> anyhow::Result<()> {
    let mut next: HashMap<(&str, i32), i64> = HashMap::new();
    for message in batch {
        let offset = next
            .entry((message.topic(), message.partition()))
            .or_insert(0);
        *offset = (*offset).max(message.offset() + 1);
    }
    let mut list = TopicPartitionList::new();
    for ((topic, partition), offset) in next {
        list.add_partition_offset(topic, partition, Offset::Offset(offset))?;
    }
    tokio::task::block_in_place(|| consumer.commit(&list, CommitMode::Sync))
        .map_err(|e| anyhow::anyhow!("offset commit failed: {e}"))
}

#[cfg(test)]
mod tests {
    use super::{goods_disjoint, is_data_error};
    use crate::events::SaleEvent;
    use std::collections::BTreeMap;

    fn reserved(goods_id: &str, n: usize) -> ((), SaleEvent) {
        let event = SaleEvent::Reserved {
            order_id: format!("{goods_id}.1.{n}"),
            goods_id: goods_id.into(),
            user_id: format!("u{n}"),
            quantity: 1,
            request_id: format!("r{n}"),
            at_ms: 1_800_000_000_000,
        };
        ((), event)
    }

    #[test]
    fn lanes_run_side_by_side_only_when_no_goods_spans_two() {
        let mut lanes = BTreeMap::new();
        lanes.insert(
            0,
            vec![reserved("a", 1), reserved("b", 2), reserved("a", 3)],
        );
        lanes.insert(2, vec![reserved("c", 4)]);
        assert!(goods_disjoint(&lanes));
        lanes.insert(1, vec![reserved("d", 5), reserved("b", 6)]);
        assert!(!goods_disjoint(&lanes), "b is on partitions 0 and 1");
        assert!(goods_disjoint::<()>(&BTreeMap::new()));
    }

    #[test]
    fn errors_about_the_data_may_dead_letter_an_event() {
        // (MySQL error number, SQLSTATE) as MariaDB reports them.
        for (number, sqlstate) in [
            (4025, "23000"), // CHECK constraint failed (stock_not_negative)
            (1048, "23000"), // column cannot be null
            (1062, "23000"), // duplicate entry
            (1406, "22001"), // data too long
            (1264, "22003"), // out of range
            (1690, "22003"), // BIGINT UNSIGNED value out of range
            (1292, "22007"), // truncated incorrect value
            (1366, "HY000"), // incorrect integer value
            (1242, "21000"), // subquery returns more than one row
        ] {
            assert!(
                is_data_error(Some(number), Some(sqlstate)),
                "{number} {sqlstate}"
            );
        }
    }

    #[test]
    fn errors_about_the_server_are_retried_never_dead_lettered() {
        for (number, sqlstate) in [
            (1205, "HY000"), // lock wait timeout
            (1213, "40001"), // deadlock
            (1290, "HY000"), // --read-only
            (1792, "25006"), // read-only transaction
            (1836, "HY000"), // read-only mode
            (1053, "08S01"), // server shutdown in progress
            (1040, "08004"), // too many connections
            (1317, "70100"), // query interrupted
            (1927, "70100"), // connection killed
            (1969, "70100"), // max_statement_time exceeded
            (1114, "HY000"), // table is full
            (1021, "HY000"), // disk full
            (1180, "HY000"), // error during commit
            (1146, "42S02"), // table does not exist (schema, not data: retry and alert)
        ] {
            assert!(
                !is_data_error(Some(number), Some(sqlstate)),
                "{number} {sqlstate}"
            );
        }
        assert!(!is_data_error(None, None));
        assert!(
            !is_data_error(None, Some("22")),
            "a malformed SQLSTATE proves nothing"
        );
    }
}
