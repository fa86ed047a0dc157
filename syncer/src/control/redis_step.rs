//! The second half of a control: writing into Redis what MySQL recorded, on each sale hash
//! that decides the goods (`lua/control.lua`).
//!
//! A control is recorded under the goods' epoch at the moment MySQL took it. A load of Redis
//! under a later epoch read MySQL afterwards and carries the control; one under that very
//! epoch may have read MySQL before (a preheat or re-seed under way) and would overwrite what
//! the script writes now. So while such a load can still land (MySQL's `loaded_epoch` is
//! behind the control's epoch and MySQL does not decide the goods), the script writes
//! nothing and this step waits for the load, at most [`BEHIND_WAIT`].

use std::time::{Duration, Instant};

use serde::Serialize;
use sqlx::MySqlPool;

use super::{ControlError, Stores};
use crate::keys::KeySpace;
use crate::RedisConn;

/// Longest one control script call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a control waits for a load of Redis under its epoch to land before it gives up
/// (the same command again completes it): a preheat or re-seed takes well under this.
const BEHIND_WAIT: Duration = Duration::from_secs(5);
/// How often it looks again meanwhile.
const BEHIND_POLL: Duration = Duration::from_millis(100);

/// What Redis made of a control.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RedisStep {
    /// Every sale hash that decides the goods holds it now.
    Applied,
    /// Nothing to write: MySQL decides the goods (db tier, fallback), or Redis holds no sale
    /// of it; the next load of Redis reads MySQL, which holds the control.
    NotNeeded,
}

/// One control to write: the action and, per sale hash (key id), its arguments after the
/// action's common ones.
pub(super) struct Write<'a> {
    pub goods_id: &'a str,
    pub action: &'static str,
    pub epoch: u64,
    pub calls: Vec<(String, Vec<String>)>,
}

/// The script's reply: `{status, value}`.
type Reply = (String, i64);

/// Writes `write` into Redis, hash by hash; `Applied` once every hash holds it (or was loaded
/// after it), `NotNeeded` when none needed it.
pub(super) async fn apply(
    stores: Stores<'_>,
    write: &Write<'_>,
) -> Result<RedisStep, ControlError> {
    let Some(redis) = stores.redis else {
        return Err(incomplete(write, super::NO_REDIS.to_owned()));
    };
    let (mysql, keys) = (stores.mysql, stores.keys);
    let script = redis::Script::new(crate::scripts::CONTROL);
    let deadline = Instant::now() + BEHIND_WAIT;
    let mut pending: Vec<&(String, Vec<String>)> = write.calls.iter().collect();
    let mut applied = false;
    loop {
        let settled = settled(mysql, write.goods_id, write.epoch).await?;
        let mut behind = Vec::new();
        for call in pending {
            let (status, value) = call_once(redis, keys, &script, write, settled, call).await?;
            match status.as_str() {
                "applied" | "already" | "reloaded" => applied = true,
                "missing" => {}
                "behind" => behind.push((call, value)),
                other => {
                    return Err(incomplete(write, format!("the script replied {other:?}")));
                }
            }
        }
        let Some(&(_, loaded)) = behind.first() else {
            return Ok(if applied {
                RedisStep::Applied
            } else {
                RedisStep::NotNeeded
            });
        };
        if Instant::now() >= deadline {
            return Err(incomplete(
                write,
                format!(
                    "Redis has loaded epoch {loaded}, and a load under epoch {} may still come \
                     (a preheat or re-seed under way, or one that stopped half way)",
                    write.epoch
                ),
            ));
        }
        pending = behind.into_iter().map(|(call, _)| call).collect();
        tokio::time::sleep(BEHIND_POLL).await;
    }
}

/// One script call on one sale hash.
async fn call_once(
    redis: &RedisConn,
    keys: &KeySpace,
    script: &redis::Script,
    write: &Write<'_>,
    settled: bool,
    (key_id, args): &(String, Vec<String>),
) -> Result<Reply, ControlError> {
    let goods = keys.goods(key_id);
    let mut invocation = crate::scripts::invocation(script, &goods.control_script_keys());
    invocation
        .arg(write.action)
        .arg(write.epoch)
        .arg(if settled { "1" } else { "0" });
    for arg in args {
        invocation.arg(arg);
    }
    let mut conn = redis.clone();
    match tokio::time::timeout(CALL_TIMEOUT, invocation.invoke_async(&mut conn)).await {
        Ok(Ok(reply)) => Ok(reply),
        Ok(Err(e)) => Err(incomplete(write, format!("redis: {e}"))),
        Err(_) => Err(incomplete(
            write,
            format!("redis did not answer within {CALL_TIMEOUT:?}"),
        )),
    }
}

/// Whether no load of Redis under `epoch` can still come: MySQL loaded that epoch (or a
/// later one) already, or decides the goods itself (its way back to Redis is a re-seed under
/// a later epoch, which reads MySQL).
async fn settled(mysql: &MySqlPool, goods_id: &str, epoch: u64) -> Result<bool, ControlError> {
    let row: Option<(u64, String)> =
        sqlx::query_as("SELECT loaded_epoch, mode FROM sales WHERE goods_id = ?")
            .bind(goods_id)
            .fetch_optional(mysql)
            .await?;
    Ok(row.is_none_or(|(loaded, mode)| loaded >= epoch || mode == "fallback"))
}

fn incomplete(write: &Write<'_>, why: String) -> ControlError {
    ControlError::Incomplete {
        goods_id: write.goods_id.to_owned(),
        action: match write.action {
            "add" => "stock addition",
            other => other,
        },
        why,
    }
}
