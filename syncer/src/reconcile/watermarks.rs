//! What reconcile reads from Kafka: the writer group's lag, the messages in the dead-letter
//! topic, and whether the writer has applied everything the topic held at some moment. Every
//! call blocks (rdkafka's metadata and offset calls), bounded by [`KAFKA_TIMEOUT`]: run them on
//! a blocking thread.

use std::time::Duration;

use rdkafka::client::ClientContext;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{Offset, TopicPartitionList};

use crate::kafka::KafkaConfig;

const KAFKA_TIMEOUT: Duration = Duration::from_secs(5);

/// Says librdkafka's complaints at debug level only. These clients live for one question
/// each; when the broker is away the answer is "unknown" (the report says so) while
/// librdkafka would log every reconnect attempt as an error, dozens a second, from every
/// process that reconciles (each syncer's dashboard does). The relay and the writer keep
/// their own clients' errors.
struct Quiet;

impl ClientContext for Quiet {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        tracing::debug!(?level, fac, log_message, "librdkafka (reconcile)");
    }

    fn error(&self, error: KafkaError, reason: &str) {
        tracing::debug!(%error, reason, "librdkafka (reconcile)");
    }
}

impl ConsumerContext for Quiet {}

type Client = BaseConsumer<Quiet>;

/// A client of the writer's group that never joins it (no subscription, no commits).
fn client(kafka: &KafkaConfig) -> anyhow::Result<Client> {
    ClientConfig::new()
        .set("bootstrap.servers", &kafka.brokers)
        .set("group.id", &kafka.group)
        .set("enable.auto.commit", "false")
        .create_with_context(Quiet)
        .map_err(|e| anyhow::anyhow!("cannot create a Kafka client: {e}"))
}

/// A topic's partitions; empty when the broker does not know the topic.
fn partitions(consumer: &Client, topic: &str) -> anyhow::Result<Vec<i32>> {
    let metadata = consumer
        .fetch_metadata(Some(topic), KAFKA_TIMEOUT)
        .map_err(|e| anyhow::anyhow!("cannot read the metadata of {topic}: {e}"))?;
    let Some(found) = metadata.topics().iter().find(|t| t.name() == topic) else {
        return Ok(Vec::new());
    };
    match found.error() {
        None => Ok(found.partitions().iter().map(|p| p.id()).collect()),
        Some(RDKafkaRespErr::RD_KAFKA_RESP_ERR_UNKNOWN_TOPIC_OR_PART) => Ok(Vec::new()),
        Some(e) => anyhow::bail!("topic {topic}: {e:?}"),
    }
}

/// Each partition's (committed offset of the writer group, or the low watermark when it never
/// committed; high watermark).
fn positions(kafka: &KafkaConfig) -> anyhow::Result<Vec<(i32, i64, i64)>> {
    let consumer = client(kafka)?;
    let topic = &kafka.topic;
    let mut list = TopicPartitionList::new();
    for partition in partitions(&consumer, topic)? {
        list.add_partition(topic, partition);
    }
    let committed = consumer
        .committed_offsets(list, KAFKA_TIMEOUT)
        .map_err(|e| anyhow::anyhow!("cannot read the writer's committed offsets: {e}"))?;
    let mut positions = Vec::new();
    for element in committed.elements() {
        let (low, high) = consumer
            .fetch_watermarks(topic, element.partition(), KAFKA_TIMEOUT)
            .map_err(|e| anyhow::anyhow!("cannot read the watermarks of {topic}: {e}"))?;
        let at = match element.offset() {
            Offset::Offset(at) => at,
            // Nothing committed yet: everything from the start is unread.
            _ => low,
        };
        positions.push((element.partition(), at, high));
    }
    Ok(positions)
}

/// Messages on the sale topic the writer's group has not committed (None: unreadable).
pub fn writer_lag(kafka: &KafkaConfig) -> Option<i64> {
    let positions = positions(kafka).ok()?;
    Some(
        positions
            .iter()
            .map(|(_, at, high)| (high - at).max(0))
            .sum(),
    )
}

/// Messages in the dead-letter topic (None: unreadable; 0 when the topic does not exist,
/// since the writer creates it with its first dead letter).
pub fn dead_letters(kafka: &KafkaConfig) -> Option<i64> {
    let consumer = client(kafka).ok()?;
    let topic = &kafka.dead_letter_topic;
    let mut count = 0;
    for partition in partitions(&consumer, topic).ok()? {
        let (low, high) = consumer
            .fetch_watermarks(topic, partition, KAFKA_TIMEOUT)
            .ok()?;
        count += (high - low).max(0);
    }
    Some(count)
}

/// The sale topic's high watermark per partition: what it holds now.
pub fn high_watermarks(kafka: &KafkaConfig) -> anyhow::Result<Vec<(i32, i64)>> {
    Ok(positions(kafka)?
        .into_iter()
        .map(|(partition, _, high)| (partition, high))
        .collect())
}

/// Whether the writer has committed everything up to `marks` (from [`high_watermarks`]).
pub fn writer_reached(kafka: &KafkaConfig, marks: &[(i32, i64)]) -> anyhow::Result<bool> {
    let positions = positions(kafka)?;
    Ok(marks.iter().all(|(partition, mark)| {
        positions
            .iter()
            .any(|(p, at, _)| p == partition && at >= mark)
    }))
}
