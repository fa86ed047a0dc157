//! The deduct path: one atomic Redis script per purchase attempt.

use std::time::Duration;

use redis::aio::ConnectionManager;
use seckill_api::{DeductReply, DeductRequest, Outcome};

use crate::keys::KeySpace;

/// Longest a deduct may wait on Redis. The filter's callout timeout is shorter still; this
/// bound keeps a stuck Redis from piling up tasks in the syncer.
pub const REDIS_CALL_TIMEOUT: Duration = Duration::from_millis(1_000);

#[derive(Debug, thiserror::Error)]
pub enum DeductError {
    #[error("{0}")]
    BadRequest(String),
    #[error("redis did not answer within {REDIS_CALL_TIMEOUT:?}")]
    Timeout,
    #[error("redis error: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("deduct script replied with an unknown outcome {0:?}")]
    BadScriptReply(String),
}

/// Runs the deduct script. Cheap to clone: the connection manager multiplexes one connection.
#[derive(Clone)]
pub struct Deducter {
    redis: ConnectionManager,
    keys: KeySpace,
    script: redis::Script,
}

impl Deducter {
    pub fn new(redis: ConnectionManager, keys: KeySpace) -> Self {
        Self {
            redis,
            keys,
            script: redis::Script::new(include_str!("lua/deduct.lua")),
        }
    }

    pub async fn deduct(&self, request: &DeductRequest) -> Result<DeductReply, DeductError> {
        validate(request)?;
        let keys = self.keys.goods(&request.goods_id);
        let mut invocation = self.script.prepare_invoke();
        invocation
            .key(&keys.sale)
            .key(&keys.users)
            .key(&keys.requests)
            .key(&keys.reservations)
            .key(&keys.outbox)
            .arg(&request.goods_id)
            .arg(&request.user_id)
            .arg(request.quantity)
            .arg(&request.request_id);
        let mut redis = self.redis.clone();
        let reply: (String, String, i64, i64) =
            tokio::time::timeout(REDIS_CALL_TIMEOUT, invocation.invoke_async(&mut redis))
                .await
                .map_err(|_| DeductError::Timeout)??;
        parse_reply(reply)
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
    let outcome = Outcome::parse(&outcome).ok_or(DeductError::BadScriptReply(outcome))?;
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
