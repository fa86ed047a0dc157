//! The deduct path: purchase attempts are decided by one atomic Redis script. Attempts that
//! arrive while a script call is out are queued and sent together, one call per goods, so a
//! hot goods costs Redis one script call per batch instead of one per buyer. Nothing waits
//! on purpose: under light load every batch holds one attempt.

use std::collections::HashMap;
use std::time::Duration;

use redis::aio::ConnectionManager;
use seckill_api::{DeductReply, DeductRequest, Outcome};
use tokio::sync::{mpsc, oneshot};

use crate::keys::KeySpace;

/// Longest a deduct may wait on Redis. The filter's callout timeout is shorter still; this
/// bound keeps a stuck Redis from piling up tasks in the syncer.
pub const REDIS_CALL_TIMEOUT: Duration = Duration::from_millis(1_000);
/// Attempts one script call decides at most: bounds how long one call blocks Redis.
pub const BATCH_ATTEMPTS_MAX: usize = 128;
/// Attempts waiting for a batch at most; past it the endpoint sheds load with 503 rather than
/// queueing without bound.
pub const QUEUE_ATTEMPTS_MAX: usize = 16_384;

#[derive(Debug, Clone, thiserror::Error)]
pub enum DeductError {
    #[error("{0}")]
    BadRequest(String),
    #[error("redis did not answer within {REDIS_CALL_TIMEOUT:?}")]
    Timeout,
    #[error("more than {QUEUE_ATTEMPTS_MAX} attempts are waiting; shedding load")]
    Overloaded,
    #[error("redis error: {0}")]
    Redis(String),
    #[error("deduct script replied {0}")]
    BadScriptReply(String),
    #[error("the deduct batcher stopped")]
    Stopped,
}

struct Attempt {
    request: DeductRequest,
    reply: oneshot::Sender<Result<DeductReply, DeductError>>,
}

/// Handle to the deduct batcher. Cheap to clone.
#[derive(Clone)]
pub struct Deducter {
    queue: mpsc::Sender<Attempt>,
}

impl Deducter {
    /// Starts the batcher task; it ends when every handle is dropped.
    pub fn start(redis: ConnectionManager, keys: KeySpace) -> Self {
        let (queue, attempts) = mpsc::channel(QUEUE_ATTEMPTS_MAX);
        let script = redis::Script::new(include_str!("lua/deduct_batch.lua"));
        tokio::spawn(run_batches(attempts, redis, keys, script));
        Self { queue }
    }

    pub async fn deduct(&self, request: DeductRequest) -> Result<DeductReply, DeductError> {
        validate(&request)?;
        let (reply, answer) = oneshot::channel();
        self.queue
            .try_send(Attempt { request, reply })
            .map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => DeductError::Overloaded,
                mpsc::error::TrySendError::Closed(_) => DeductError::Stopped,
            })?;
        // The batch that takes this attempt has its own Redis timeout; this one only bounds
        // the wait in the queue before it.
        match tokio::time::timeout(2 * REDIS_CALL_TIMEOUT, answer).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(DeductError::Stopped),
            Err(_) => Err(DeductError::Timeout),
        }
    }
}

/// Takes whatever attempts are queued (up to a batch), decides them with one script call per
/// goods, answers each, and repeats. One batch at a time: while it is out, the next forms.
async fn run_batches(
    mut attempts: mpsc::Receiver<Attempt>,
    redis: ConnectionManager,
    keys: KeySpace,
    script: redis::Script,
) {
    let mut batch = Vec::with_capacity(BATCH_ATTEMPTS_MAX);
    while attempts.recv_many(&mut batch, BATCH_ATTEMPTS_MAX).await > 0 {
        let mut by_goods: HashMap<String, Vec<Attempt>> = HashMap::new();
        for attempt in batch.drain(..) {
            by_goods
                .entry(attempt.request.goods_id.clone())
                .or_default()
                .push(attempt);
        }
        metrics::histogram!("seckill_deduct_batch_attempts")
            .record(by_goods.values().map(Vec::len).sum::<usize>() as f64);
        let calls = by_goods
            .into_iter()
            .map(|(goods_id, group)| decide_group(&redis, &keys, &script, goods_id, group));
        futures_util::future::join_all(calls).await;
    }
}

async fn decide_group(
    redis: &ConnectionManager,
    keys: &KeySpace,
    script: &redis::Script,
    goods_id: String,
    group: Vec<Attempt>,
) {
    let goods = keys.goods(&goods_id);
    let mut invocation = script.prepare_invoke();
    invocation
        .key(&goods.sale)
        .key(&goods.users)
        .key(&goods.requests)
        .key(&goods.reservations)
        .key(&goods.outbox)
        .key(&goods.expiries)
        .arg(&goods_id);
    for attempt in &group {
        invocation
            .arg(&attempt.request.user_id)
            .arg(attempt.request.quantity)
            .arg(&attempt.request.request_id);
    }
    let mut conn = redis.clone();
    let result: Result<Vec<(String, String, i64, i64)>, DeductError> =
        match tokio::time::timeout(REDIS_CALL_TIMEOUT, invocation.invoke_async(&mut conn)).await {
            Err(_) => Err(DeductError::Timeout),
            Ok(Err(e)) => Err(DeductError::Redis(e.to_string())),
            Ok(Ok(replies)) => Ok(replies),
        };
    match result {
        Ok(replies) if replies.len() == group.len() => {
            for (attempt, reply) in group.into_iter().zip(replies) {
                // The buyer may have given up (timeout); its answer is then dropped.
                let _ = attempt.reply.send(parse_reply(reply));
            }
        }
        Ok(replies) => {
            let error = DeductError::BadScriptReply(format!(
                "{} replies for {} attempts",
                replies.len(),
                group.len()
            ));
            answer_all(group, &error);
        }
        Err(error) => answer_all(group, &error),
    }
}

fn answer_all(group: Vec<Attempt>, error: &DeductError) {
    for attempt in group {
        let _ = attempt.reply.send(Err(error.clone()));
    }
}

/// The syncer checks input too: the endpoint must be safe even if something other than the
/// filter calls it.
fn validate(request: &DeductRequest) -> Result<(), DeductError> {
    let id_len_max = seckill_api::ID_LEN_MAX;
    for (name, value) in [
        ("goods_id", &request.goods_id),
        ("user_id", &request.user_id),
        ("request_id", &request.request_id),
    ] {
        seckill_api::validate_id(value, id_len_max)
            .map_err(|e| DeductError::BadRequest(format!("{name} {e}")))?;
    }
    if request.quantity == 0 || request.quantity > seckill_api::QUANTITY_MAX {
        return Err(DeductError::BadRequest(format!(
            "quantity must be from 1 to {}",
            seckill_api::QUANTITY_MAX
        )));
    }
    Ok(())
}

/// Maps the script's one reply shape `{outcome, order_id, remaining, retry_after_ms}`.
fn parse_reply(
    (outcome, order_id, remaining, retry_after_ms): (String, String, i64, i64),
) -> Result<DeductReply, DeductError> {
    let outcome = Outcome::parse(&outcome)
        .ok_or_else(|| DeductError::BadScriptReply(format!("unknown outcome {outcome:?}")))?;
    let order_id = match outcome {
        Outcome::Won if !order_id.is_empty() => Some(order_id),
        Outcome::Won => return Err(DeductError::BadScriptReply("won without order id".into())),
        _ => None,
    };
    Ok(DeductReply {
        outcome,
        order_id,
        remaining: u64::try_from(remaining).ok(),
        retry_after_ms: (outcome == Outcome::NotStarted).then_some(retry_after_ms.max(0) as u64),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> DeductRequest {
        DeductRequest {
            goods_id: "sku-1".into(),
            user_id: "u1".into(),
            quantity: 1,
            request_id: "r1".into(),
        }
    }

    #[test]
    fn input_is_checked_before_redis() {
        assert!(validate(&request()).is_ok());
        let mut r = request();
        r.quantity = 0;
        assert!(matches!(validate(&r), Err(DeductError::BadRequest(m)) if m.contains("quantity")));
        let mut r = request();
        r.user_id = "a|b".into();
        assert!(matches!(validate(&r), Err(DeductError::BadRequest(m)) if m.contains("user_id")));
        let mut r = request();
        r.request_id = String::new();
        assert!(
            matches!(validate(&r), Err(DeductError::BadRequest(m)) if m.contains("request_id"))
        );
    }

    #[test]
    fn script_replies_map_to_one_shape() {
        let won = parse_reply(("won".into(), "sku-1.1.7".into(), 93, 0)).unwrap();
        assert_eq!(won.order_id.as_deref(), Some("sku-1.1.7"));
        assert_eq!(won.remaining, Some(93));
        let unknown = parse_reply(("unknown_goods".into(), String::new(), -1, 0)).unwrap();
        assert_eq!(unknown.remaining, None);
        let early = parse_reply(("not_started".into(), String::new(), 5, 1500)).unwrap();
        assert_eq!(early.retry_after_ms, Some(1500));
        assert!(parse_reply(("won".into(), String::new(), 1, 0)).is_err());
        assert!(parse_reply(("maybe".into(), String::new(), 1, 0)).is_err());
    }
}
