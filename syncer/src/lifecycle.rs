//! The end of a reservation: confirmed (paid) or released (cancelled, expired, upstream
//! failure), exactly once per order, atomically in Redis, with its event in the outbox.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::RedisConn;
use redis::AsyncCommands;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::db_lifecycle;
use crate::directory::{Directory, Mode};
use crate::durability::{self, CallError, Durability};
use crate::keys::{self, goods_of_order, KeySpace};
use crate::order::{OrderState, ReleaseReason};

const REDIS_TIMEOUT: Duration = Duration::from_secs(2);
/// Reservations one sweep call releases at most per goods: bounds how long it blocks Redis.
pub const SWEEP_BATCH_MAX: usize = 500;

/// How the sweeper treats unclaimed reservations. Claims cannot land while Redis stands
/// still or no sweeper runs; when sweeps resume after a gap longer than `stall`, the gate
/// gets a whole `claim_window` from then before any reservation counts as unclaimed, so a
/// Redis stall does not release the orders the gate delivered just before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SweepRules {
    pub claim_window: Duration,
    pub stall: Duration,
}

impl SweepRules {
    /// A stall is a gap of three sweep intervals, and at least 2 s.
    pub fn new(sweep_every: Duration, claim_window: Duration) -> SweepRules {
        SweepRules {
            claim_window,
            stall: (3 * sweep_every).max(Duration::from_secs(2)),
        }
    }
}

/// What a claim call did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClaimOutcome {
    pub claimed: u64,
    pub late: u64,
    /// Could not be claimed now (store fault).
    pub failed: Vec<String>,
}

/// Where an order stands after a confirm or release call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Settlement {
    pub order_id: String,
    /// Confirmed or released.
    pub state: OrderState,
    /// Why it was released.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<ReleaseReason>,
    /// This call settled the order (false: it was settled before, this is the same answer).
    pub changed: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum LifecycleError {
    #[error("{0}")]
    BadOrderId(String),
    #[error("no reservation or order {0} is known")]
    UnknownOrder(String),
    #[error("redis did not answer within {REDIS_TIMEOUT:?}")]
    Timeout,
    /// A confirm, release or claim call under the durability setting gave no answer to act
    /// on: Redis failed or timed out, or too few replicas acknowledged it in time (then the
    /// settlement stays in Redis and a repeated call answers from it).
    #[error(transparent)]
    Call(#[from] CallError),
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("lifecycle script replied {0:?}")]
    BadScriptReply(String),
    /// MySQL decides the goods (the db tier, or the fallback) and failed.
    #[error("mysql: {0}")]
    Mysql(String),
    /// A re-seed is loading the goods into Redis: retry in a moment.
    #[error("goods {0} is switching from MySQL back to Redis; retry in a moment")]
    Switching(String),
    /// MySQL decides the goods now, and does not hold this order, which Redis issued: its
    /// record may still be on its way (outbox, Kafka). Not `unknown`: retry in a moment.
    #[error(
        "order {0} was issued by Redis and has not reached MySQL, which decides its goods now; \
         retry in a moment"
    )]
    NotInMysqlYet(String),
}

#[derive(Clone)]
pub struct Lifecycle {
    redis: RedisConn,
    keys: KeySpace,
    script: redis::Script,
    durability: Durability,
    /// Where MySQL decides (db tier, fallback): its orders end in MySQL.
    mysql: Option<(sqlx::MySqlPool, Directory)>,
}

/// Where one goods' reservations end.
enum Place<'a> {
    Redis,
    /// MySQL, with the epoch Redis last loaded (0: never; orders of that epoch or before came
    /// from Redis).
    Mysql(&'a sqlx::MySqlPool, u64),
    Switching,
}

impl Lifecycle {
    pub fn new(redis: RedisConn, keys: KeySpace) -> Self {
        Self {
            redis,
            keys,
            script: redis::Script::new(crate::scripts::LIFECYCLE),
            durability: Durability::None,
            mysql: None,
        }
    }

    /// Ends the orders of goods MySQL decides (as the directory says) in MySQL.
    pub fn with_mysql(mut self, mysql: sqlx::MySqlPool, directory: Directory) -> Self {
        self.mysql = Some((mysql, directory));
        self
    }

    /// Where a goods' (or one of its shards': `key_id`) orders are ended now.
    fn place(&self, key_id: &str) -> Place<'_> {
        let Some((pool, directory)) = &self.mysql else {
            return Place::Redis;
        };
        match directory.route(keys::base_goods(key_id)) {
            Some(route) if route.in_mysql() => Place::Mysql(pool, route.loaded_epoch),
            Some(route) if route.mode == Mode::Switching => Place::Switching,
            _ => Place::Redis,
        }
    }

    /// Confirms, releases and claims answer only once `durability` is met (sweeps answer
    /// nobody and do not wait). With `replicas:N`, give the lifecycle a connection of its
    /// own: each WAIT holds up the commands queued behind it.
    pub fn with_durability(mut self, durability: Durability) -> Self {
        self.durability = durability;
        self
    }

    /// One script call whose answer someone acts on, under the durability setting.
    async fn invoke_durably<T: redis::FromRedisValue>(
        &self,
        goods_id: &str,
        invocation: &redis::ScriptInvocation<'_>,
    ) -> Result<T, LifecycleError> {
        let mut conn = self.redis.clone();
        let mark = self.keys.durability_mark(goods_id);
        let deadline = Instant::now() + REDIS_TIMEOUT;
        Ok(durability::invoke(self.durability, &mut conn, invocation, &mark, deadline).await?)
    }

    pub async fn confirm(&self, order_id: &str) -> Result<Settlement, LifecycleError> {
        self.settle(order_id, "confirm", "").await
    }

    pub async fn release(
        &self,
        order_id: &str,
        reason: ReleaseReason,
    ) -> Result<Settlement, LifecycleError> {
        self.settle(order_id, "release", reason.as_str()).await
    }

    async fn settle(
        &self,
        order_id: &str,
        action: &str,
        reason: &str,
    ) -> Result<Settlement, LifecycleError> {
        seckill_api::validate_id(order_id, seckill_api::ID_LEN_MAX)
            .map_err(|e| LifecycleError::BadOrderId(format!("order id {e}")))?;
        let goods_id = goods_of_order(order_id).ok_or_else(|| {
            LifecycleError::BadOrderId(format!(
                "{order_id:?} is not an order id (goods.epoch.sequence)"
            ))
        })?;
        match self.place(goods_id) {
            Place::Redis => {}
            Place::Switching => return Err(LifecycleError::Switching(goods_id.to_owned())),
            Place::Mysql(pool, loaded_epoch) => {
                let action = match action {
                    "confirm" => db_lifecycle::Action::Confirm,
                    _ => db_lifecycle::Action::Release(
                        ReleaseReason::parse(reason)
                            .ok_or_else(|| LifecycleError::BadScriptReply(reason.to_owned()))?,
                    ),
                };
                let from_redis = keys::order_parts(order_id)
                    .is_some_and(|(_, epoch, _)| epoch > 0 && epoch <= loaded_epoch);
                return match db_lifecycle::settle(pool, order_id, action).await {
                    Err(LifecycleError::UnknownOrder(_)) if from_redis => {
                        Err(LifecycleError::NotInMysqlYet(order_id.to_owned()))
                    }
                    other => other,
                };
            }
        }
        let key_id = self.key_id_of_order(order_id).await;
        let mut invocation = self.invocation(&key_id, action);
        invocation.arg(order_id).arg(reason);
        let (status, state): (String, String) = self.invoke_durably(&key_id, &invocation).await?;
        let changed = match status.as_str() {
            "changed" => true,
            "settled" => false,
            "unknown" => return Err(LifecycleError::UnknownOrder(order_id.to_owned())),
            other => return Err(LifecycleError::BadScriptReply(other.to_owned())),
        };
        let (state, reason) = parse_final(&state).ok_or(LifecycleError::BadScriptReply(state))?;
        Ok(Settlement {
            order_id: order_id.to_owned(),
            state,
            reason,
            changed,
        })
    }

    /// Claims reservations the gate delivered: each then lives for its sale's payment window
    /// instead of the claim window. Order ids are grouped by goods, one script call each.
    pub async fn claim(&self, order_ids: &[String]) -> ClaimOutcome {
        let mut outcome = ClaimOutcome::default();
        // By goods, or by shard of a sharded goods: one script call each.
        let mut by_keys: HashMap<String, Vec<&String>> = HashMap::new();
        for order_id in order_ids {
            let valid = seckill_api::validate_id(order_id, seckill_api::ID_LEN_MAX).is_ok();
            match goods_of_order(order_id).filter(|_| valid) {
                Some(_) => {
                    let key_id = self.key_id_of_order(order_id).await;
                    by_keys.entry(key_id).or_default().push(order_id);
                }
                // Not an order id the syncer could have issued: nothing to claim.
                None => outcome.late += 1,
            }
        }
        for (key_id, ids) in by_keys {
            let goods_id = keys::base_goods(&key_id);
            let result: Result<(u64, u64), LifecycleError> = match self.place(goods_id) {
                Place::Redis => {
                    let mut invocation = self.invocation(&key_id, "claim");
                    for id in &ids {
                        invocation.arg(id.as_str());
                    }
                    self.invoke_durably(&key_id, &invocation).await
                }
                Place::Mysql(pool, _) => db_lifecycle::claim(pool, goods_id, &ids).await,
                Place::Switching => Err(LifecycleError::Switching(goods_id.to_owned())),
            };
            match result {
                Ok((claimed, late)) => {
                    outcome.claimed += claimed;
                    outcome.late += late;
                }
                Err(e) => {
                    tracing::warn!(goods_id, error = %e, "claiming reservations failed; the gate retries");
                    outcome.failed.extend(ids.into_iter().cloned());
                }
            }
        }
        outcome
    }

    /// Releases up to `SWEEP_BATCH_MAX` reservations of one goods whose window has passed
    /// (see [`SweepRules`] for the unclaimed ones).
    pub async fn sweep_goods(
        &self,
        goods_id: &str,
        rules: &SweepRules,
    ) -> Result<u64, LifecycleError> {
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        let mut invocation = self.invocation(goods_id, "sweep");
        invocation
            .arg(SWEEP_BATCH_MAX)
            .arg(ms(rules.claim_window))
            .arg(ms(rules.stall));
        let mut conn = self.redis.clone();
        let (released,): (u64,) =
            tokio::time::timeout(REDIS_TIMEOUT, invocation.invoke_async(&mut conn))
                .await
                .map_err(|_| LifecycleError::Timeout)??;
        Ok(released)
    }

    /// A call on the keys of `key_id` (a goods, or one shard of a sharded goods); its
    /// events name the goods.
    fn invocation(&self, key_id: &str, action: &str) -> redis::ScriptInvocation<'_> {
        let keys = self.keys.goods(key_id);
        let mut invocation =
            crate::scripts::invocation(&self.script, &keys.lifecycle_script_keys());
        invocation.arg(keys::base_goods(key_id)).arg(action);
        invocation
    }

    /// The keys an order lives under: its goods', or for a `redis_sharded` goods the shard
    /// that issued it (its sequence says which, `keys::shard_of_sequence`).
    async fn key_id_of_order(&self, order_id: &str) -> String {
        let Some((goods_id, _, sequence)) = keys::order_parts(order_id) else {
            return order_id.to_owned();
        };
        let shards = match &self.mysql {
            Some((_, directory)) => directory.lookup(goods_id).await.map_or(1, |r| r.shards),
            None => 1,
        };
        if shards > 1 {
            keys::shard_id(goods_id, keys::shard_of_sequence(sequence, shards))
        } else {
            goods_id.to_owned()
        }
    }

    /// Releases expired reservations of every preheated goods, every `every`, until shutdown.
    pub async fn run_sweeper(
        self,
        every: Duration,
        claim_window: Duration,
        shutdown: CancellationToken,
    ) {
        tracing::info!(?every, "sweeper started");
        let rules = SweepRules::new(every, claim_window);
        crate::every_tick(every, &shutdown, || async {
            if let Err(e) = self.sweep_all(&rules, &shutdown).await {
                metrics::counter!("seckill_sweeper_errors_total").increment(1);
                tracing::warn!(error = %e, "sweep failed; retrying next tick");
            }
        })
        .await;
        tracing::info!("sweeper stopped");
    }

    async fn sweep_all(
        &self,
        rules: &SweepRules,
        shutdown: &CancellationToken,
    ) -> Result<(), LifecycleError> {
        // MySQL first: it sweeps while Redis is down.
        self.sweep_mysql(shutdown).await?;
        let mut conn = self.redis.clone();
        let goods: Vec<String> =
            tokio::time::timeout(REDIS_TIMEOUT, conn.smembers(self.keys.sales_index()))
                .await
                .map_err(|_| LifecycleError::Timeout)??;
        // One goods' trouble (its master down) must not stall the others' sweep: the first
        // error is reported once every goods had its turn.
        let mut first_error = None;
        for goods_id in goods {
            // Goods MySQL decides are swept there (below); Redis's copy waits for its re-seed.
            if !matches!(self.place(&goods_id), Place::Redis) {
                continue;
            }
            // A shard's moves of units cut short (their taker died) are completed here.
            if let (_, Some(shard)) = keys::split_shard(&goods_id) {
                self.complete_transfers(&goods_id, shard).await;
            }
            // A full batch means more may be due: go on with this goods, bounded by shutdown.
            while !shutdown.is_cancelled() {
                let released = match self.sweep_goods(&goods_id, rules).await {
                    Ok(released) => released,
                    Err(e) => {
                        first_error.get_or_insert(e);
                        break;
                    }
                };
                metrics::counter!("seckill_reservations_expired_total").increment(released);
                if released < SWEEP_BATCH_MAX as u64 {
                    break;
                }
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

impl Lifecycle {
    /// Completes shard `shard`'s moves of units that were cut short (`shard.rs`). Best
    /// effort: what fails is tried again next tick.
    async fn complete_transfers(&self, key_id: &str, shard: u32) {
        let script = redis::Script::new(crate::scripts::TRANSFER);
        let mover = crate::shard::Mover {
            conn: self.redis.clone(),
            keys: &self.keys,
            durability: self.durability,
            script: &script,
        };
        let goods_id = keys::base_goods(key_id);
        match mover.complete_pending(goods_id, shard).await {
            Ok(0) => {}
            Ok(n) => metrics::counter!("seckill_shard_moves_completed_total").increment(n),
            Err(e) => tracing::warn!(goods_id, shard, error = %e,
                "could not complete a move of units between shards; retrying next sweep"),
        }
    }

    /// Sweeps the goods MySQL decides (db tier, fallback), as the directory lists them.
    async fn sweep_mysql(&self, shutdown: &CancellationToken) -> Result<(), LifecycleError> {
        let Some((pool, directory)) = &self.mysql else {
            return Ok(());
        };
        for goods_id in directory.in_mysql() {
            while !shutdown.is_cancelled() {
                let released = db_lifecycle::sweep_goods(pool, &goods_id).await?;
                metrics::counter!("seckill_reservations_expired_total").increment(released);
                if released < db_lifecycle::SWEEP_BATCH_MAX as u64 {
                    break;
                }
            }
        }
        Ok(())
    }
}

/// Reads how the settled hash says an order ended: "confirmed" or "released:<reason>".
pub(crate) fn parse_final(text: &str) -> Option<(OrderState, Option<ReleaseReason>)> {
    match text.split_once(':') {
        Some(("released", reason)) => {
            Some((OrderState::Released, Some(ReleaseReason::parse(reason)?)))
        }
        None if text == OrderState::Confirmed.as_str() => Some((OrderState::Confirmed, None)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn final_states_read_as_the_script_writes_them() {
        assert_eq!(
            parse_final("confirmed"),
            Some((OrderState::Confirmed, None))
        );
        for reason in ReleaseReason::ALL {
            assert_eq!(
                parse_final(&format!("released:{reason}")),
                Some((OrderState::Released, Some(*reason)))
            );
        }
        for bad in ["released", "released:bored", "reserved", "confirmed:x", ""] {
            assert_eq!(parse_final(bad), None, "{bad}");
        }
    }
}
