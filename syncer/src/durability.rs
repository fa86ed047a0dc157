//! How much of what Redis acknowledged survives Redis losing its memory: the operator's
//! choice (`serve --redis-durability`), checked at start and kept on every script call whose
//! answer a buyer or the shop acts on.
//!
//! - `none`: Redis replies before anything is on disk or on a replica. An answer `won` lasts
//!   as long as Redis's memory does.
//! - `aof`: Redis must run with `appendonly yes` and `appendfsync always`. Redis then writes
//!   and fsyncs the AOF before it sends the replies of an event-loop pass, so every answer
//!   the syncer gives rests on a write that is on disk. Nothing to do per call.
//! - `replicas:N`: after each script call, `WAIT N timeout` on the same connection, in the
//!   same pipeline. A call that fewer than N replicas acknowledged within its deadline is
//!   never answered as a success; what it wrote stays in Redis, and a retry with the same
//!   request id meets it.
//!
//! Not `WAITAOF` (Redis 7.2): it would add a replica's or the local disk to the wait, but
//! the Redis this project runs on (Debian's 7.0) lacks it; `aof` covers the local disk.

use std::fmt;
use std::str::FromStr;
use std::time::{Duration, Instant};

use crate::RedisConn;
use redis::{FromRedisValue, RedisResult, ScriptInvocation, Value};

/// Replicas `replicas:N` may wait for at most: more than any real deployment has, and
/// small enough that a typo (`replicas:100`) is refused rather than never satisfied.
pub const REPLICAS_MAX: u32 = 16;
/// Of the time left before a call's deadline, the share WAIT may block; the rest (at most
/// [`WAIT_MARGIN_MAX`]) is for its reply to come back before the caller stops listening.
/// Redis checks blocked clients' timeouts on its cron (10 times a second by default), so a
/// WAIT may answer up to about 100 ms after its timeout: the margin must be larger than that.
const WAIT_SHARE_PERCENT: u32 = 75;
const WAIT_MARGIN_MAX: Duration = Duration::from_millis(250);

/// The operator's durability setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    None,
    Aof,
    /// Wait for this many replicas (1 to [`REPLICAS_MAX`]) to acknowledge each call.
    Replicas(u32),
}

impl FromStr for Durability {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "none" => return Ok(Durability::None),
            "aof" => return Ok(Durability::Aof),
            _ => {}
        }
        let count = text.strip_prefix("replicas:").ok_or_else(|| {
            format!("{text:?} is not a durability setting: use none, aof or replicas:N")
        })?;
        match count.parse::<u32>() {
            Ok(n) if (1..=REPLICAS_MAX).contains(&n) => Ok(Durability::Replicas(n)),
            _ => Err(format!(
                "replicas:{count}: N must be a whole number from 1 to {REPLICAS_MAX}"
            )),
        }
    }
}

impl fmt::Display for Durability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Durability::None => f.write_str("none"),
            Durability::Aof => f.write_str("aof"),
            Durability::Replicas(n) => write!(f, "replicas:{n}"),
        }
    }
}

impl Durability {
    /// Whether calls wait for replicas: such calls need a connection of their own, since
    /// `WAIT` holds up every later command on its connection while it blocks.
    pub fn waits(self) -> bool {
        matches!(self, Durability::Replicas(_))
    }

    /// Deduct batches out at Redis at once. One is enough while Redis answers at once: the
    /// next batch forms meanwhile. When each answer waits (an fsync under `aof`, a replica's
    /// acknowledgement under `replicas:N`), batches that reach Redis meanwhile share the
    /// next wait: Redis fsyncs once per pass of its event loop for every command of that
    /// pass, and asks its replicas for one acknowledgement that covers every blocked WAIT.
    pub fn batches_in_flight(self) -> usize {
        match self {
            Durability::None => 1,
            Durability::Aof | Durability::Replicas(_) => WAITING_BATCHES_IN_FLIGHT,
        }
    }
}

/// See [`Durability::batches_in_flight`]: enough to keep Redis busy while it waits, few
/// enough that batches stay large (each holds what queued while the others were out).
const WAITING_BATCHES_IN_FLIGHT: usize = 4;

#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error(
        "--redis-durability aof needs Redis to run with appendonly yes and appendfsync always \
         ({whose} has appendonly {appendonly}, appendfsync {appendfsync}): with anything less, \
         Redis replies before the write is on disk and a power loss forgets reservations \
         buyers were told they won. Set both in redis.conf (or CONFIG SET appendonly yes, \
         CONFIG SET appendfsync always, and CONFIG REWRITE), or choose another setting"
    )]
    NotFsyncingEveryWrite {
        /// "it" (one server), or which master of a cluster.
        whose: String,
        appendonly: String,
        appendfsync: String,
    },
    #[error(
        "--redis-durability aof cannot check Redis's persistence: CONFIG GET failed ({0}); \
         managed Redis services often disable or rename CONFIG. If you know this Redis runs \
         with appendonly yes and appendfsync always, start with --redis-durability-unchecked"
    )]
    ConfigUnreadable(String),
    #[error("redis: {0}")]
    Redis(redis::RedisError),
    #[error("redis did not answer the durability check within {0:?}")]
    Timeout(Duration),
}

/// Bound on each check at start.
const CHECK_TIMEOUT: Duration = Duration::from_secs(5);

/// Checks at start that Redis keeps what `durability` promises, and says in the log what the
/// setting risks. `unchecked` trusts an `aof` Redis whose CONFIG cannot be read; a CONFIG
/// that can be read and says otherwise is refused all the same.
pub async fn check_at_start(
    redis: &RedisConn,
    durability: Durability,
    unchecked: bool,
) -> Result<(), CheckError> {
    let conn = redis.clone();
    match durability {
        Durability::None => {
            tracing::warn!(
                "redis durability none: a buyer told `won` keeps the unit only as long as Redis \
                 keeps its memory; a Redis restart without persistence, the unsynced tail of an \
                 everysec AOF after a power loss, or a failover to a replica that had not \
                 received the write forgets those reservations and their unrelayed events \
                 (see --redis-durability aof or replicas:N)"
            );
            Ok(())
        }
        Durability::Aof => {
            // On a cluster every master decides goods of its own: each must fsync.
            let appendonly = config_get(&conn, "appendonly").await;
            let appendfsync = config_get(&conn, "appendfsync").await;
            match (appendonly, appendfsync) {
                (Ok(appendonly), Ok(appendfsync)) => {
                    for ((master, appendonly), (_, appendfsync)) in
                        appendonly.into_iter().zip(appendfsync)
                    {
                        if appendonly != "yes" || appendfsync != "always" {
                            return Err(CheckError::NotFsyncingEveryWrite {
                                whose: whose(&conn, &master),
                                appendonly,
                                appendfsync,
                            });
                        }
                    }
                    tracing::info!(
                        cluster = conn.is_cluster(),
                        "redis durability aof: Redis runs with appendonly yes and appendfsync \
                         always (on every master); every answer rests on a write fsynced to its \
                         AOF"
                    );
                    Ok(())
                }
                (Err(CheckError::ConfigUnreadable(why)), _)
                | (_, Err(CheckError::ConfigUnreadable(why)))
                    if unchecked =>
                {
                    tracing::warn!(
                        reason = %why,
                        "redis durability aof, unchecked: CONFIG cannot be read; trusting the \
                         operator that Redis runs with appendonly yes and appendfsync always"
                    );
                    Ok(())
                }
                (Err(e), _) | (_, Err(e)) => Err(e),
            }
        }
        Durability::Replicas(wanted) => {
            // Only for the log: the calls themselves are what keeps the promise. On a cluster
            // each call's WAIT runs on the master of its goods and counts that master's
            // replicas, so every master needs N.
            let counts = match connected_replicas(&conn).await {
                Ok(counts) => counts,
                Err(e) => {
                    tracing::warn!(error = %e, wanted, "redis durability replicas: cannot count the connected replicas");
                    return Ok(());
                }
            };
            let short: Vec<String> = counts
                .iter()
                .filter(|(_, connected)| *connected < u64::from(wanted))
                .map(|(master, connected)| format!("{}: {connected}", whose(&conn, master)))
                .collect();
            let connected = counts.iter().map(|(_, c)| *c).min().unwrap_or(0);
            if !short.is_empty() {
                tracing::warn!(
                    connected,
                    wanted,
                    short = %short.join(", "),
                    "redis durability replicas: fewer replicas are connected than each call \
                     waits for; deducts and settlements answer 503 until enough attach"
                );
            } else {
                tracing::info!(
                    connected,
                    wanted,
                    cluster = conn.is_cluster(),
                    "redis durability replicas: each script call waits for its writes to reach \
                     this many replicas (of its goods' master) before anyone is answered"
                );
            }
            Ok(())
        }
    }
}

/// "it" for one server, "the master at ADDRESS" for a master of a cluster.
fn whose(conn: &RedisConn, master: &str) -> String {
    match conn.is_cluster() {
        true => format!("the master at {master}"),
        false => "it".to_owned(),
    }
}

/// One CONFIG GET value of every master (one server: of it), in the same order for every
/// name. An error reply (unknown or renamed command, no permission) means this Redis does not
/// let us read its configuration.
async fn config_get(conn: &RedisConn, name: &str) -> Result<Vec<(String, String)>, CheckError> {
    let mut command = redis::cmd("CONFIG");
    command.arg("GET").arg(name);
    let replies = tokio::time::timeout(CHECK_TIMEOUT, conn.on_every_master(&command))
        .await
        .map_err(|_| CheckError::Timeout(CHECK_TIMEOUT))?
        .map_err(CheckError::Redis)?;
    let mut values = Vec::with_capacity(replies.len());
    for (master, reply) in replies {
        let unreadable = |what: String| match conn.is_cluster() {
            true => CheckError::ConfigUnreadable(format!("the master at {master}: {what}")),
            false => CheckError::ConfigUnreadable(what),
        };
        let pair: Vec<String> = reply
            .and_then(|v| redis::from_redis_value(v).map_err(redis::RedisError::from))
            .map_err(|e| unreadable(e.to_string()))?;
        match pair.as_slice() {
            [key, value] if key == name => values.push((master, value.clone())),
            _ => return Err(unreadable(format!("CONFIG GET {name} answered {pair:?}"))),
        }
    }
    Ok(values)
}

/// `connected_slaves` from INFO replication of every master (one server: of it).
async fn connected_replicas(conn: &RedisConn) -> Result<Vec<(String, u64)>, CheckError> {
    let mut command = redis::cmd("INFO");
    command.arg("replication");
    let replies = tokio::time::timeout(CHECK_TIMEOUT, conn.on_every_master(&command))
        .await
        .map_err(|_| CheckError::Timeout(CHECK_TIMEOUT))?
        .map_err(CheckError::Redis)?;
    let mut counts = Vec::with_capacity(replies.len());
    for (master, reply) in replies {
        let info: String = reply
            .and_then(|v| redis::from_redis_value(v).map_err(redis::RedisError::from))
            .map_err(CheckError::Redis)?;
        let connected = info
            .lines()
            .find_map(|line| line.trim().strip_prefix("connected_slaves:"))
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        counts.push((master, connected));
    }
    Ok(counts)
}

/// Why a script call under the durability setting gave no answer to act on.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CallError {
    #[error("redis did not answer before the deadline")]
    Timeout,
    #[error("redis: {0}")]
    Redis(String),
    /// The script ran (its writes stay in Redis) but fewer replicas than the setting asks
    /// acknowledged them in time: the caller must not act on its answer.
    #[error("{acked} of {wanted} replicas acknowledged the write before the deadline")]
    NotReplicated { acked: u64, wanted: u32 },
}

/// Runs one script call under `durability`, bounded by `deadline`, and returns its reply
/// only if the setting is met. `mark` is a key of the same goods (hash tag) that a
/// `replicas:N` call increments: see [`invoke_and_wait`].
pub async fn invoke<T: FromRedisValue>(
    durability: Durability,
    conn: &mut RedisConn,
    invocation: &ScriptInvocation<'_>,
    mark: &str,
    deadline: Instant,
) -> Result<T, CallError> {
    let budget = deadline.saturating_duration_since(Instant::now());
    let call = async {
        match durability {
            Durability::Replicas(wanted) => {
                invoke_and_wait(conn, invocation, mark, wanted, deadline).await
            }
            // `aof`: Redis fsyncs before it replies, so its reply is the guarantee.
            Durability::None | Durability::Aof => invocation
                .invoke_async(conn)
                .await
                .map_err(|e| CallError::Redis(e.to_string())),
        }
    };
    tokio::time::timeout(budget, call)
        .await
        .map_err(|_| CallError::Timeout)?
}

/// The script call, an INCR of `mark` and `WAIT wanted timeout` in one pipeline: one request
/// on one connection, so WAIT counts the acknowledgements of exactly this connection's writes.
///
/// On a Redis Cluster the crate's cluster client routes a pipeline by its keyed commands (the
/// script's keys and `mark`, all of one goods' hash tag, so one slot) and sends it whole to
/// that slot's master; `WAIT`, which sent alone it would fan out to every master (taking the
/// smallest count), rides along on that master's connection and counts that master's
/// replicas: exactly the ones a failover of this goods' master promotes from. Each
/// `connect_redis` is a cluster client of its own, so a blocked WAIT holds up only the
/// connections of its own batch, as on one server.
///
/// From Redis 7.2 on, WAIT waits for the offset of the connection's last command that
/// propagated a write (7.0 takes the offset after any command). A script that only read (a
/// retry answered from an earlier win, made on another connection before a reconnect, or by
/// another syncer) propagates nothing, and WAIT would then vouch for an older offset than
/// the write the answer rests on. The INCR always propagates, at an offset after every write
/// Redis made before it, so one WAIT covers them all, on every version.
async fn invoke_and_wait<T: FromRedisValue>(
    conn: &mut RedisConn,
    invocation: &ScriptInvocation<'_>,
    mark: &str,
    wanted: u32,
    deadline: Instant,
) -> Result<T, CallError> {
    let redis_error = |e: redis::RedisError| CallError::Redis(e.to_string());
    // Two rounds at most: the second only after Redis had forgotten the script (restart).
    for round in 0..2 {
        let mut pipe = redis::pipe();
        pipe.ignore_errors()
            .invoke_script(invocation)
            .cmd("INCR")
            .arg(mark)
            .cmd("WAIT")
            .arg(wanted)
            .arg(wait_timeout_ms(deadline, Instant::now()));
        let (script, marked, acked): (RedisResult<Value>, RedisResult<i64>, RedisResult<u64>) =
            pipe.query_async(conn).await.map_err(redis_error)?;
        let script = match script {
            Err(e)
                if round == 0
                    && e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) =>
            {
                // Nothing ran: load the script and send the pipeline again.
                invocation.load_async(conn).await.map_err(redis_error)?;
                continue;
            }
            other => other.map_err(redis_error)?,
        };
        marked.map_err(redis_error)?;
        let acked = acked.map_err(redis_error)?;
        if acked < u64::from(wanted) {
            metrics::counter!("seckill_durability_waits_total", "result" => "short").increment(1);
            return Err(CallError::NotReplicated { acked, wanted });
        }
        metrics::counter!("seckill_durability_waits_total", "result" => "ok").increment(1);
        return redis::from_redis_value(script).map_err(|e| CallError::Redis(e.to_string()));
    }
    Err(CallError::Redis(
        "the script was still unknown after loading it".to_owned(),
    ))
}

/// WAIT's timeout: most of the time left, never 0 (which would block forever).
fn wait_timeout_ms(deadline: Instant, now: Instant) -> u64 {
    let left = deadline.saturating_duration_since(now);
    let margin = (left * (100 - WAIT_SHARE_PERCENT) / 100).min(WAIT_MARGIN_MAX);
    u64::try_from((left - margin).as_millis())
        .unwrap_or(u64::MAX)
        .max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_parse_and_print_back() {
        for text in ["none", "aof", "replicas:1", "replicas:16"] {
            let parsed: Durability = text.parse().unwrap();
            assert_eq!(parsed.to_string(), text);
        }
        assert_eq!("replicas:3".parse(), Ok(Durability::Replicas(3)));
        for bad in [
            "",
            "None",
            "aof ",
            "replicas",
            "replicas:",
            "replicas:0",
            "replicas:17",
            "replicas:-1",
            "replicas:1x",
            "everysec",
        ] {
            let error = bad.parse::<Durability>().unwrap_err();
            assert!(
                error.contains("none, aof or replicas:N") || error.contains("from 1 to 16"),
                "{bad}: {error}"
            );
        }
        assert!(Durability::Replicas(1).waits());
        assert!(!Durability::Aof.waits() && !Durability::None.waits());
    }

    #[test]
    fn wait_leaves_time_for_the_reply_and_never_blocks_forever() {
        let now = Instant::now();
        let at = |ms| now + Duration::from_millis(ms);
        assert_eq!(wait_timeout_ms(at(2_000), now), 1_750);
        assert_eq!(wait_timeout_ms(at(1_000), now), 750);
        assert_eq!(wait_timeout_ms(at(100), now), 75);
        assert_eq!(wait_timeout_ms(at(1), now), 1);
        assert_eq!(wait_timeout_ms(now, now), 1);
        assert_eq!(wait_timeout_ms(now, at(5)), 1);
    }
}
