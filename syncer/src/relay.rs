//! The outbox relay: moves sale events from each goods' Redis outbox stream to Kafka.
//!
//! It reads with a consumer group, publishes the events keyed by goods id, and only after
//! Kafka confirmed delivery acknowledges and deletes the stream entries (one MULTI). The
//! events of one read travel packed, up to [`crate::events_pack::PACK_EVENTS_MAX`] per Kafka
//! message, one per line (see [`crate::events_pack`]): a broker's cost is mostly per message,
//! so a pack of 128 costs it about what one event did. A crash between delivery and
//! acknowledgement re-publishes those events on restart; the writer absorbs the duplicates.
//! Goods are relayed side by side, up to [`GOODS_IN_FLIGHT_MAX`] at once, each by one run at a
//! time, so one goods' events keep their order. While the broker is away the entries wait in
//! the stream (Redis memory, not ours: the relay holds at most one read batch per goods in
//! flight), and retries back off, each goods on a backoff of its own, so a goods whose outbox
//! fails does not slow the others. A stream whose consumer group Redis lost (a restart
//! without persistence, a failover) gets it back, reading from the stream's start, so the
//! relay outlives a Redis that forgot.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use futures_util::StreamExt;

use crate::RedisConn;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use redis::streams::{StreamId, StreamReadOptions, StreamReadReply};
use redis::AsyncCommands;
use tokio_util::sync::CancellationToken;

use crate::crashpoint::{crashpoint, RELAY_AFTER_PUBLISH};
use crate::events::OUTBOX_FIELD;
use crate::events_pack::Pack;
use crate::kafka::KafkaConfig;
use crate::keys::KeySpace;

/// Consumer group every relay instance joins on every outbox stream.
pub const GROUP: &str = "relay";
/// Entries one read takes from one stream: bounds the relay's memory (about 600 KB of events)
/// and one publish wave (16 packs). From a backlog, 2,048 relayed 51k events/s where 512 made
/// 39k (paired runs of `seckill-bench-sync`): each read pays Redis and Kafka round trips.
pub const READ_ENTRIES_MAX: usize = 2048;
/// Goods one pass relays side by side: each holds a read batch in memory and a wave of packs
/// in the producer, so this bounds both (about 5 MB of events).
pub const GOODS_IN_FLIGHT_MAX: usize = 8;
/// Pause when every stream was empty, so an idle relay costs next to nothing.
const IDLE_WAIT: Duration = Duration::from_millis(20);
/// Retry pause after a failure doubles from the first to the last value.
const BACKOFF_FIRST: Duration = Duration::from_millis(100);
const BACKOFF_LAST: Duration = Duration::from_secs(5);
/// Entries another relay instance read but has not acknowledged for this long are taken over.
const CLAIM_IDLE: Duration = Duration::from_secs(60);
const CLAIM_EVERY: Duration = Duration::from_secs(30);
/// Bound on every Redis call of the relay.
const REDIS_TIMEOUT: Duration = Duration::from_secs(5);

pub struct Relay {
    pub redis: RedisConn,
    pub keys: KeySpace,
    pub producer: FutureProducer,
    pub kafka: KafkaConfig,
    /// Names this instance in the consumer group: a restarted relay with the same name picks
    /// up what it had read but not acknowledged.
    pub name: String,
}

/// What a pass did.
#[derive(Debug, Default)]
struct Pass {
    /// Events that went to Kafka.
    relayed: usize,
    /// Some goods' events were not delivered: the broker is probably away, and the producer
    /// is replaced (see [`Relay::renew_producer`]).
    delivery_failed: bool,
}

/// Goods whose last run failed, each on a backoff of its own: when it may run again, and the
/// pause its next failure starts.
#[derive(Debug, Default)]
struct Resting {
    until: HashMap<String, (Instant, Duration)>,
}

impl Resting {
    fn is_resting(&self, stream: &str, now: Instant) -> bool {
        self.until
            .get(stream)
            .is_some_and(|(until, _)| now < *until)
    }

    /// Records a failure; returns how long the goods now rests (doubling from
    /// [`BACKOFF_FIRST`] to [`BACKOFF_LAST`]).
    fn failed(&mut self, stream: &str, now: Instant) -> Duration {
        let pause = self
            .until
            .get(stream)
            .map_or(BACKOFF_FIRST, |(_, last)| (*last * 2).min(BACKOFF_LAST));
        self.until.insert(stream.to_owned(), (now + pause, pause));
        pause
    }

    fn recovered(&mut self, stream: &str) {
        self.until.remove(stream);
    }

    /// Drops goods no longer sold, so the map is bounded by the sales index.
    fn forget_all_but(&mut self, streams: &HashSet<&str>) {
        self.until
            .retain(|stream, _| streams.contains(stream.as_str()));
    }
}

/// What one goods' run of a pass did, and what the pass should remember about its stream.
struct GoodsRun {
    stream: String,
    /// The stream's consumer group exists (it need not be created next pass).
    group_ready: bool,
    /// No entries of this relay's are left read and not acknowledged.
    caught_up: bool,
    relayed: Result<usize, RelayError>,
}

#[derive(Debug, thiserror::Error)]
enum RelayError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("redis did not answer within {REDIS_TIMEOUT:?}")]
    RedisTimeout,
    #[error("{failed} of {total} events were not delivered to Kafka: {first}")]
    Delivery {
        failed: usize,
        total: usize,
        first: String,
    },
}

async fn bounded<T>(
    call: impl std::future::Future<Output = redis::RedisResult<T>>,
) -> Result<T, RelayError> {
    tokio::time::timeout(REDIS_TIMEOUT, call)
        .await
        .map_err(|_| RelayError::RedisTimeout)?
        .map_err(RelayError::from)
}

impl Relay {
    /// Relays until `shutdown`, then flushes the producer.
    pub async fn run(mut self, shutdown: CancellationToken) {
        tracing::info!(name = %self.name, topic = %self.kafka.topic, "relay started");
        crate::telemetry::register_relay();
        let mut groups_ready = HashSet::new();
        let mut caught_up = HashSet::new();
        let mut resting = Resting::default();
        let mut backoff = BACKOFF_FIRST;
        let mut last_claim = Instant::now() - CLAIM_EVERY;
        let mut last_gauge = Instant::now() - Duration::from_secs(1);
        while !shutdown.is_cancelled() {
            let claim = last_claim.elapsed() >= CLAIM_EVERY;
            if claim {
                last_claim = Instant::now();
            }
            let passed = self
                .pass(&mut groups_ready, &mut caught_up, &mut resting, claim)
                .await;
            let pause = match passed {
                Ok(pass) => {
                    backoff = BACKOFF_FIRST;
                    if pass.delivery_failed {
                        self.renew_producer();
                    }
                    if pass.relayed == 0 {
                        IDLE_WAIT
                    } else {
                        Duration::ZERO
                    }
                }
                Err(e) => {
                    // The list of goods could not be read: every goods waits.
                    metrics::counter!("seckill_relay_errors_total").increment(1);
                    tracing::warn!(error = %e, retry_in = ?backoff, "relay pass failed; entries stay in the outbox");
                    let pause = backoff;
                    backoff = (backoff * 2).min(BACKOFF_LAST);
                    pause
                }
            };
            if last_gauge.elapsed() >= Duration::from_secs(1) {
                last_gauge = Instant::now();
                if let Ok(lengths) = self.outbox_lengths().await {
                    record_outbox_lengths(&lengths);
                }
            }
            if !pause.is_zero() {
                // Idle wait or retry backoff, both bounded; shutdown cuts it short.
                tokio::select! {
                    () = shutdown.cancelled() => {}
                    () = tokio::time::sleep(pause) => {}
                }
            }
        }
        if let Err(e) = self.producer.flush(Duration::from_secs(10)) {
            tracing::warn!(error = %e, "producer flush on shutdown failed");
        }
        tracing::info!("relay stopped");
    }

    /// Replaces the producer after failed deliveries (the broker is probably away). The old
    /// one's queue is purged: what it held is still pending in the outbox and is read again.
    /// A fresh producer asks the broker for a new producer id when it comes back, which
    /// Kafka does not need but Tansu 0.6 does: its sqlite storage panics when a producer id
    /// from before its restart produces to a partition again.
    fn renew_producer(&mut self) {
        self.producer
            .purge(rdkafka::producer::PurgeConfig::default().queue().inflight());
        match crate::kafka::producer(&self.kafka) {
            Ok(producer) => self.producer = producer,
            Err(e) => {
                tracing::warn!(error = %e, "cannot create a new Kafka producer; keeping the old one")
            }
        }
    }

    /// Every goods' outbox length: events not yet confirmed by Kafka.
    pub async fn outbox_lengths(&self) -> Result<Vec<(String, u64)>, redis::RedisError> {
        outbox_lengths(&self.redis, &self.keys).await
    }

    /// One pass over every goods' outbox, up to [`GOODS_IN_FLIGHT_MAX`] goods side by side,
    /// skipping goods that are resting after a failure. `caught_up` holds the streams where
    /// this relay is known to have no entries read and not acknowledged, so their pending
    /// list need not be read again each pass. Fails only if the list of goods cannot be read.
    async fn pass(
        &self,
        groups_ready: &mut HashSet<String>,
        caught_up: &mut HashSet<String>,
        resting: &mut Resting,
        claim: bool,
    ) -> Result<Pass, RelayError> {
        let mut conn = self.redis.clone();
        let goods: Vec<String> = bounded(conn.smembers(self.keys.sales_index())).await?;
        let outboxes: Vec<(String, String)> = goods
            .into_iter()
            .map(|goods_id| {
                let stream = self.keys.goods(&goods_id).outbox;
                (goods_id, stream)
            })
            .collect();
        resting.forget_all_but(&outboxes.iter().map(|(_, stream)| stream.as_str()).collect());
        let now = Instant::now();
        let runs: Vec<_> = outboxes
            .into_iter()
            .filter_map(|(goods_id, stream)| {
                if resting.is_resting(&stream, now) {
                    return None;
                }
                let group_ready = groups_ready.contains(&stream);
                // Whatever goes wrong below may leave entries read and not acknowledged:
                // until this run proves otherwise, read the pending list first again.
                let was_caught_up = caught_up.remove(&stream);
                Some(self.relay_goods(goods_id, stream, group_ready, was_caught_up, claim))
            })
            .collect();
        // Each goods is one stream and one Kafka key, relayed by one run at a time, so its
        // events keep their order; goods are independent of each other, and their Redis
        // round trips and Kafka deliveries overlap instead of queueing.
        let outcomes: Vec<GoodsRun> = futures_util::stream::iter(runs)
            .buffer_unordered(GOODS_IN_FLIGHT_MAX)
            .collect()
            .await;
        let mut pass = Pass::default();
        for run in outcomes {
            if run.group_ready {
                groups_ready.insert(run.stream.clone());
            } else {
                groups_ready.remove(&run.stream);
            }
            if run.caught_up {
                caught_up.insert(run.stream.clone());
            }
            match run.relayed {
                Ok(n) => {
                    pass.relayed += n;
                    resting.recovered(&run.stream);
                }
                // This goods rests, on a backoff of its own; the others go on at full speed:
                // one goods' trouble must not slow the rest.
                Err(e) => {
                    metrics::counter!("seckill_relay_errors_total").increment(1);
                    let retry_in = resting.failed(&run.stream, Instant::now());
                    tracing::warn!(stream = %run.stream, error = %e, ?retry_in,
                        "relaying this goods failed; its entries stay in the outbox");
                    pass.delivery_failed |= matches!(e, RelayError::Delivery { .. });
                }
            }
        }
        Ok(pass)
    }

    /// One goods: makes sure its consumer group exists, takes over abandoned entries (when
    /// `claim`), then relays a read batch. On a connection of its own (a clone of the
    /// multiplexed one), so goods run side by side.
    async fn relay_goods(
        &self,
        goods_id: String,
        stream: String,
        group_ready: bool,
        was_caught_up: bool,
        claim: bool,
    ) -> GoodsRun {
        let mut conn = self.redis.clone();
        let mut run = GoodsRun {
            stream,
            group_ready,
            caught_up: false,
            relayed: Ok(0),
        };
        if !run.group_ready {
            if let Err(e) = ensure_group(&mut conn, &run.stream).await {
                run.relayed = Err(e);
                return run;
            }
            run.group_ready = true;
        }
        let relayed = async {
            if claim {
                // Claimed entries join this relay's pending list.
                self.claim_abandoned(&mut conn, &run.stream).await?;
            }
            self.relay_stream(&mut conn, &goods_id, &run.stream, was_caught_up && !claim)
                .await
        }
        .await;
        run.relayed = match relayed {
            Ok((n, pending_left)) => {
                run.caught_up = !pending_left;
                Ok(n)
            }
            Err(RelayError::Redis(e)) if e.code() == Some("NOGROUP") => {
                // The group is gone with the data of a Redis that forgot (a restart without
                // persistence, a failover): read from the start of the stream again, so
                // nothing written since is skipped. Once per loss, not per pass; a failed
                // create fails the pass, which then backs off, and is tried again next pass.
                match recreate_group(&mut conn, &run.stream).await {
                    Ok(()) => Ok(0),
                    Err(e) => {
                        run.group_ready = false;
                        Err(e)
                    }
                }
            }
            Err(e) => Err(e),
        };
        run
    }

    async fn relay_stream(
        &self,
        conn: &mut RedisConn,
        goods_id: &str,
        stream: &str,
        caught_up: bool,
    ) -> Result<(usize, bool), RelayError> {
        // Our own pending entries first (read before a crash, a failed delivery or taken
        // over from another relay), then new ones. A full read of pending entries may have
        // left more of them: the pending list is read again next pass (`pending_left`).
        let mut entries = Vec::new();
        if !caught_up {
            entries = self.read(conn, stream, "0").await?;
        }
        let pending_left = entries.len() == READ_ENTRIES_MAX;
        if entries.is_empty() {
            entries = self.read(conn, stream, ">").await?;
        }
        if entries.is_empty() {
            return Ok((0, false));
        }
        let total = entries.len();
        let events: Vec<Option<&[u8]>> = entries
            .iter()
            .map(|(_, event)| event.as_ref().ok().map(Vec::as_slice))
            .collect();
        let packs = crate::events_pack::plan(&events);
        let sends = packs
            .iter()
            .map(|pack| self.publish(goods_id, stream, &entries, pack));
        let results = futures_util::future::join_all(sends).await;
        crashpoint(RELAY_AFTER_PUBLISH);
        let mut delivered = Vec::with_capacity(total);
        let mut first_failure = None;
        for (pack, result) in packs.iter().zip(results) {
            match result {
                Ok(()) => delivered.extend(pack.entries().map(|i| entries[i].0.clone())),
                Err(e) => {
                    first_failure.get_or_insert(e);
                }
            }
        }
        if !delivered.is_empty() {
            // Acknowledge and delete together: the stream's length stays the backlog.
            let mut pipe = redis::pipe();
            pipe.atomic()
                .xack(stream, GROUP, &delivered)
                .ignore()
                .xdel(stream, &delivered)
                .ignore();
            bounded(pipe.query_async::<()>(conn)).await?;
            metrics::counter!("seckill_relay_published_total").increment(delivered.len() as u64);
        }
        match first_failure {
            None => Ok((delivered.len(), pending_left)),
            Some(first) => Err(RelayError::Delivery {
                failed: total - delivered.len(),
                total,
                first,
            }),
        }
    }

    async fn read(
        &self,
        conn: &mut RedisConn,
        stream: &str,
        from: &str,
    ) -> Result<Vec<(String, OutboxEvent)>, RelayError> {
        let options = StreamReadOptions::default()
            .group(GROUP, &self.name)
            .count(READ_ENTRIES_MAX);
        let reply: Option<StreamReadReply> =
            bounded(conn.xread_options(&[stream], &[from], &options)).await?;
        let mut entries = Vec::new();
        for key in reply.map(|r| r.keys).unwrap_or_default() {
            for mut entry in key.ids {
                let id = std::mem::take(&mut entry.id);
                entries.push((id, outbox_event(entry)));
            }
        }
        Ok(entries)
    }

    /// Publishes one pack of outbox entries, keyed by its goods: their events as the script
    /// wrote them (the writer decodes and checks each; what it cannot read becomes a dead
    /// letter there, alone). An entry without an event goes to the dead-letter topic here, so
    /// it is never lost and never blocks the stream.
    async fn publish(
        &self,
        goods_id: &str,
        stream: &str,
        entries: &[(String, OutboxEvent)],
        pack: &Pack,
    ) -> Result<(), String> {
        // Keyed by the goods, also from a shard's outbox: one goods, one partition.
        let key = crate::keys::base_goods(goods_id);
        let record = match pack {
            Pack::Single(i) => match &entries[*i].1 {
                Ok(bytes) => FutureRecord::to(&self.kafka.topic)
                    .key(key)
                    .payload(bytes.as_slice()),
                Err(raw) => return self.publish_dead_letter(stream, &entries[*i].0, raw).await,
            },
            Pack::Lines(range) => {
                // A plan puts only events in a pack.
                let events = entries[range.clone()]
                    .iter()
                    .filter_map(|(_, e)| e.as_ref().ok().map(Vec::as_slice));
                let payload = crate::events_pack::join(events);
                let count = range.len().to_string();
                let headers = OwnedHeaders::new().insert(Header {
                    key: crate::events_pack::HEADER,
                    value: Some(count.as_bytes()),
                });
                return self
                    .send(
                        FutureRecord::to(&self.kafka.topic)
                            .key(key)
                            .payload(payload.as_slice())
                            .headers(headers),
                    )
                    .await;
            }
        };
        self.send(record).await
    }

    async fn publish_dead_letter(&self, stream: &str, id: &str, raw: &[u8]) -> Result<(), String> {
        tracing::error!(
            stream,
            id,
            "outbox entry without an event: sent to the dead-letter topic"
        );
        metrics::counter!("seckill_dead_letters_total", "source" => "outbox").increment(1);
        let reason = format!("malformed outbox entry {stream} {id}: no field {OUTBOX_FIELD}");
        let headers = OwnedHeaders::new().insert(Header {
            key: "reason",
            value: Some(reason.as_bytes()),
        });
        let record = FutureRecord::to(&self.kafka.dead_letter_topic)
            .key(stream)
            .payload(raw)
            .headers(headers);
        self.send(record).await
    }

    async fn send(&self, record: FutureRecord<'_, str, [u8]>) -> Result<(), String> {
        self.producer
            .send(record, Duration::ZERO)
            .await
            .map(|_| ())
            .map_err(|(e, _)| e.to_string())
    }

    /// Takes over entries another relay instance read long ago and never acknowledged (it
    /// died and did not come back under its name).
    async fn claim_abandoned(&self, conn: &mut RedisConn, stream: &str) -> Result<(), RelayError> {
        let _: redis::Value = bounded(
            redis::cmd("XAUTOCLAIM")
                .arg(stream)
                .arg(GROUP)
                .arg(&self.name)
                .arg(CLAIM_IDLE.as_millis() as u64)
                .arg("0-0")
                .arg("COUNT")
                .arg(READ_ENTRIES_MAX)
                .arg("JUSTID")
                .query_async(conn),
        )
        .await?;
        Ok(())
    }
}

/// An outbox entry's event: the JSON bytes of its [`OUTBOX_FIELD`], or, when it has none, all
/// its fields as JSON for the dead letter.
pub(crate) type OutboxEvent = Result<Vec<u8>, Vec<u8>>;

/// Takes the event out of an outbox entry without copying it.
pub(crate) fn outbox_event(mut entry: StreamId) -> OutboxEvent {
    match entry.map.remove(OUTBOX_FIELD) {
        Some(redis::Value::BulkString(bytes)) => Ok(bytes),
        other => {
            if let Some(value) = other {
                entry.map.insert(OUTBOX_FIELD.to_owned(), value);
            }
            let fields: Vec<(&String, String)> = entry
                .map
                .iter()
                .filter_map(|(k, v)| {
                    redis::from_redis_value_ref::<String>(v)
                        .ok()
                        .map(|v| (k, v))
                })
                .collect();
            Err(serde_json::to_vec(&fields).unwrap_or_default())
        }
    }
}

/// Creates the relay's consumer group on a stream that lost it, logged and counted
/// (`seckill_relay_groups_recreated_total`): from the stream's start (`0`), so every entry
/// written since the loss is relayed, none skipped.
async fn recreate_group(conn: &mut RedisConn, stream: &str) -> Result<(), RelayError> {
    ensure_group(conn, stream).await?;
    metrics::counter!("seckill_relay_groups_recreated_total").increment(1);
    tracing::warn!(
        stream,
        "the outbox consumer group was missing (Redis lost it: a restart or a failover); \
         re-created it from the start of the stream"
    );
    Ok(())
}

/// Creates the relay's consumer group on a stream (and the stream) unless it exists, reading
/// from the stream's start.
async fn ensure_group(conn: &mut RedisConn, stream: &str) -> Result<(), RelayError> {
    let created: redis::RedisResult<()> = tokio::time::timeout(
        REDIS_TIMEOUT,
        conn.xgroup_create_mkstream(stream, GROUP, "0"),
    )
    .await
    .map_err(|_| RelayError::RedisTimeout)?;
    match created {
        Ok(()) => Ok(()),
        Err(e) if e.code() == Some("BUSYGROUP") => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Sets the per-goods outbox gauge (a `redis_sharded` goods' shards summed), busy outboxes
/// first when there are more goods than series.
fn record_outbox_lengths(lengths: &[(String, u64)]) {
    let by_goods: Vec<(String, u64)> =
        crate::telemetry::by_goods(lengths.iter().map(|(id, n)| (id.as_str(), *n)))
            .into_iter()
            .collect();
    for (goods_id, length) in crate::telemetry::per_goods(&by_goods, |(_, n)| *n > 0) {
        metrics::gauge!(crate::telemetry::OUTBOX_LENGTH, "goods_id" => goods_id.clone())
            .set(*length as f64);
    }
}

/// Each outbox's length (events Kafka has not confirmed yet), by its key in the sales index.
pub async fn outbox_lengths(
    redis: &RedisConn,
    keys: &KeySpace,
) -> Result<Vec<(String, u64)>, redis::RedisError> {
    let mut conn = redis.clone();
    let timed_out = || redis::RedisError::from((redis::ErrorKind::Io, "outbox length timed out"));
    let goods: Vec<String> = tokio::time::timeout(REDIS_TIMEOUT, conn.smembers(keys.sales_index()))
        .await
        .map_err(|_| timed_out())??;
    let mut lengths = Vec::with_capacity(goods.len());
    for goods_id in goods {
        let length: u64 =
            tokio::time::timeout(REDIS_TIMEOUT, conn.xlen(keys.goods(&goods_id).outbox))
                .await
                .map_err(|_| timed_out())??;
        lengths.push((goods_id, length));
    }
    Ok(lengths)
}

#[cfg(test)]
mod tests {
    use super::{Resting, BACKOFF_FIRST, BACKOFF_LAST};
    use std::collections::HashSet;
    use std::time::{Duration, Instant};

    #[test]
    fn a_failing_goods_rests_longer_each_time_up_to_the_bound_and_alone() {
        let mut resting = Resting::default();
        let now = Instant::now();
        let mut pauses = Vec::new();
        for _ in 0..8 {
            pauses.push(resting.failed("broken", now));
        }
        assert_eq!(pauses[0], BACKOFF_FIRST);
        assert_eq!(pauses[1], BACKOFF_FIRST * 2);
        assert!(pauses.windows(2).all(|w| w[1] >= w[0]));
        assert_eq!(*pauses.last().unwrap(), BACKOFF_LAST);
        assert!(resting.is_resting("broken", now + BACKOFF_LAST - Duration::from_millis(1)));
        assert!(!resting.is_resting("broken", now + BACKOFF_LAST));
        assert!(
            !resting.is_resting("healthy", now),
            "only the goods that failed rests"
        );

        resting.recovered("broken");
        assert!(!resting.is_resting("broken", now));
        assert_eq!(
            resting.failed("broken", now),
            BACKOFF_FIRST,
            "a recovery resets it"
        );
    }

    #[test]
    fn goods_no_longer_sold_are_forgotten() {
        let mut resting = Resting::default();
        let now = Instant::now();
        resting.failed("gone", now);
        resting.failed("kept", now);
        resting.forget_all_but(&HashSet::from(["kept"]));
        assert!(!resting.is_resting("gone", now));
        assert!(resting.is_resting("kept", now));
    }
}
