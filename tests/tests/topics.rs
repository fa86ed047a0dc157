//! `seckill-syncer topics` against a real broker: creates what is missing, leaves what exists,
//! and gives up with a clear error when no broker answers.

use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use seckill_e2e::kafka_broker::{KafkaBroker, DEAD_LETTER_TOPIC};
use seckill_e2e::process::{free_port, Scratch};
use seckill_syncer::kafka::KafkaConfig;
use seckill_syncer::topics::{ensure, Outcome, TopicsPlan};

const PLAN: TopicsPlan = TopicsPlan {
    partitions: 4,
    replication_factor: 1,
};

fn config(brokers: String) -> KafkaConfig {
    KafkaConfig {
        brokers,
        topic: "fresh.sales".into(),
        // The harness created this one already.
        dead_letter_topic: DEAD_LETTER_TOPIC.into(),
        group: "unused".into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_topics_are_created_and_existing_ones_left_alone_every_time() {
    let scratch = Scratch::new("topics").unwrap();
    let broker = KafkaBroker::start(&scratch.path).await.unwrap();
    let config = config(broker.bootstrap());
    let wait = Duration::from_secs(30);

    let first = ensure(&config, PLAN, wait).await.unwrap();
    assert_eq!(
        first,
        [
            ("fresh.sales".to_owned(), Outcome::Created),
            (DEAD_LETTER_TOPIC.to_owned(), Outcome::Existed)
        ]
    );
    let again = ensure(&config, PLAN, wait).await.unwrap();
    assert!(
        again
            .iter()
            .all(|(_, outcome)| *outcome == Outcome::Existed),
        "{again:?}"
    );

    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", broker.bootstrap())
        .create()
        .unwrap();
    let metadata = tokio::task::block_in_place(|| {
        consumer.fetch_metadata(Some("fresh.sales"), Duration::from_secs(10))
    })
    .unwrap();
    assert_eq!(metadata.topics()[0].partitions().len(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_broker_is_an_error_once_the_wait_is_over() {
    let nobody = format!("127.0.0.1:{}", free_port().unwrap());
    let started = std::time::Instant::now();
    let error = ensure(&config(nobody), PLAN, Duration::from_secs(2))
        .await
        .unwrap_err()
        .to_string();
    assert!(error.contains("topics not created within 2 s"), "{error}");
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "bounded by the wait"
    );
}
