//! Kafka settings shared by the relay (producer) and the batched writer (consumer). The syncer
//! speaks the plain Kafka protocol through rdkafka, so any Kafka-compatible broker works.

use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, ConsumerContext};
use rdkafka::producer::FutureProducer;
use rdkafka::{Offset, TopicPartitionList};

/// How long the producer keeps trying to deliver one message before reporting failure; the
/// relay then leaves the outbox entry pending and retries later.
pub const DELIVERY_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
pub struct KafkaConfig {
    pub brokers: String,
    /// Sale events, keyed by goods id (one goods' events stay in order on one partition).
    pub topic: String,
    /// Messages the writer could not parse or apply, with the reason in a header.
    pub dead_letter_topic: String,
    /// Consumer group of the MySQL writer.
    pub group: String,
}

/// An idempotent producer that waits for every in-sync replica (acks=all).
pub fn producer(config: &KafkaConfig) -> anyhow::Result<FutureProducer> {
    ClientConfig::new()
        .set("bootstrap.servers", &config.brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set(
            "message.timeout.ms",
            DELIVERY_TIMEOUT.as_millis().to_string(),
        )
        .set("request.timeout.ms", "5000")
        .set("socket.timeout.ms", "5000")
        .set("retry.backoff.ms", "100")
        .set("retry.backoff.max.ms", "1000")
        .set("linger.ms", "2")
        // Bounds the producer's own memory while the broker is away.
        .set("queue.buffering.max.messages", "100000")
        .create()
        .map_err(|e| anyhow::anyhow!("cannot create the Kafka producer: {e}"))
}

/// A plain producer for dead letters: a duplicate dead letter is harmless, and keeping it
/// out of the idempotent producer's state keeps a dead letter from ever blocking the writer.
pub fn dead_letter_producer(config: &KafkaConfig) -> anyhow::Result<FutureProducer> {
    ClientConfig::new()
        .set("bootstrap.servers", &config.brokers)
        .set("enable.idempotence", "false")
        .set("acks", "all")
        .set(
            "message.timeout.ms",
            DELIVERY_TIMEOUT.as_millis().to_string(),
        )
        .set("request.timeout.ms", "5000")
        .set("socket.timeout.ms", "5000")
        .set("queue.buffering.max.messages", "10000")
        .create()
        .map_err(|e| anyhow::anyhow!("cannot create the dead-letter producer: {e}"))
}

/// Messages after each partition's `committed` offset (from the partition's start when nothing
/// was committed), per partition: what the writer's group has not applied durably yet.
/// Blocking broker calls, each bounded by `timeout`; None when the broker did not answer one
/// of them.
pub fn uncommitted<C: ConsumerContext>(
    consumer: &impl Consumer<C>,
    committed: &TopicPartitionList,
    timeout: Duration,
) -> Option<Vec<(i32, i64)>> {
    let mut lag = Vec::with_capacity(committed.count());
    for element in committed.elements() {
        let (low, high) = consumer
            .fetch_watermarks(element.topic(), element.partition(), timeout)
            .ok()?;
        let at = match element.offset() {
            Offset::Offset(at) => at,
            // Nothing committed yet: everything from the start is unread.
            _ => low,
        };
        lag.push((element.partition(), (high - at).max(0)));
    }
    Some(lag)
}
