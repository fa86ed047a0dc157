//! Creates the sale topic and its dead-letter topic when they are missing. The writer waits
//! for its topic and the relay retries while it is absent, but a sale must not start before
//! both exist, and brokers without automatic topic creation (Tansu, most production Kafka)
//! never make them. Idempotent, so a deployment can run it on every start (the docker compose
//! stack's one-shot job does): a topic that already exists is left exactly as it is.

use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication, TopicResult};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::types::RDKafkaErrorCode;

use crate::kafka::KafkaConfig;

/// How long one CreateTopics request may take before it is tried again.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// Pause between attempts while the broker is not reachable yet (a broker starting beside
/// this job takes a few seconds).
const RETRY_PAUSE: Duration = Duration::from_millis(500);

/// What to create: the partition count of the sale topic (events are keyed by goods, so this
/// bounds how many writers can share the work) and the replication factor of both topics.
#[derive(Debug, Clone, Copy)]
pub struct TopicsPlan {
    pub partitions: i32,
    pub replication_factor: i32,
}

/// What happened to one topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Created,
    /// It was there already; its partitions and settings were not touched.
    Existed,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Created => "created",
            Outcome::Existed => "exists (left as it is)",
        }
    }
}

/// One topic's answer, sorted into done, worth another try, or a refusal to report.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    Done(Outcome),
    Retry(String),
    Refused(String),
}

/// Creates both topics if missing, retrying while the broker is unreachable or not ready,
/// for at most `wait`. Returns each topic's name and outcome.
pub async fn ensure(
    config: &KafkaConfig,
    plan: TopicsPlan,
    wait: Duration,
) -> anyhow::Result<Vec<(String, Outcome)>> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &config.brokers)
        .set("socket.timeout.ms", CALL_TIMEOUT.as_millis().to_string())
        .create()
        .map_err(|e| anyhow::anyhow!("cannot create the Kafka admin client: {e}"))?;
    let wanted = [
        (config.topic.as_str(), plan.partitions),
        // One partition: dead letters are rare and read by a person, in order.
        (config.dead_letter_topic.as_str(), 1),
    ];
    let options = AdminOptions::new()
        .request_timeout(Some(CALL_TIMEOUT))
        .operation_timeout(Some(CALL_TIMEOUT));
    let deadline = Instant::now() + wait;
    let mut done: Vec<(String, Outcome)> = Vec::new();
    loop {
        let missing: Vec<NewTopic> = wanted
            .iter()
            .filter(|(name, _)| done.iter().all(|(d, _)| d != name))
            .map(|(name, partitions)| {
                NewTopic::new(
                    name,
                    *partitions,
                    TopicReplication::Fixed(plan.replication_factor),
                )
            })
            .collect();
        if missing.is_empty() {
            return Ok(done);
        }
        let last_problem = match admin.create_topics(&missing, &options).await {
            Ok(results) => {
                let mut retry = None;
                for result in results {
                    let name = match &result {
                        Ok(name) | Err((name, _)) => name.clone(),
                    };
                    match judge(result) {
                        Verdict::Done(outcome) => {
                            tracing::info!(topic = %name, ?outcome, "topic ready");
                            done.push((name, outcome));
                        }
                        Verdict::Retry(why) => retry = Some(why),
                        Verdict::Refused(why) => anyhow::bail!("{why}"),
                    }
                }
                retry
            }
            Err(e) => Some(format!("the broker did not answer: {e}")),
        };
        if let Some(problem) = last_problem {
            if Instant::now() >= deadline {
                anyhow::bail!("topics not created within {} s: {problem}", wait.as_secs());
            }
            tracing::warn!(%problem, "topics not created yet; retrying");
            tokio::time::sleep(RETRY_PAUSE).await;
        }
    }
}

/// Errors a broker gives while it is starting or electing a controller: worth another try.
fn judge(result: TopicResult) -> Verdict {
    match result {
        Ok(_) => Verdict::Done(Outcome::Created),
        Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => Verdict::Done(Outcome::Existed),
        Err((name, code)) => {
            let why = format!("topic {name}: {code}");
            match code {
                RDKafkaErrorCode::NotController
                | RDKafkaErrorCode::RequestTimedOut
                | RDKafkaErrorCode::BrokerNotAvailable
                | RDKafkaErrorCode::LeaderNotAvailable
                | RDKafkaErrorCode::NotEnoughReplicas
                | RDKafkaErrorCode::OperationTimedOut
                | RDKafkaErrorCode::CoordinatorLoadInProgress => Verdict::Retry(why),
                _ => Verdict::Refused(why),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_existing_topic_counts_as_done_and_a_bad_request_is_refused() {
        assert_eq!(judge(Ok("t".into())), Verdict::Done(Outcome::Created));
        assert_eq!(
            judge(Err(("t".into(), RDKafkaErrorCode::TopicAlreadyExists))),
            Verdict::Done(Outcome::Existed)
        );
        assert!(matches!(
            judge(Err(("t".into(), RDKafkaErrorCode::NotController))),
            Verdict::Retry(_)
        ));
        assert!(matches!(
            judge(Err(("t".into(), RDKafkaErrorCode::InvalidReplicationFactor))),
            Verdict::Refused(why) if why.contains("t:")
        ));
    }
}
