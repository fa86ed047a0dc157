//! The way back to Redis, and the watch for a Redis that forgot while nobody bought.
//!
//! Every [`TICK`]: each goods MySQL decides in fallback (or whose re-seed stopped half way)
//! is re-seeded as soon as Redis answers and the pipeline has drained (its outbox relayed, the
//! writer caught up: `reseed.rs`); then Redis decides it again under a new epoch. And each
//! goods Redis should hold is checked: a sale missing, behind the epoch MySQL loaded, or fenced
//! means Redis forgot, and the goods moves to MySQL at once, before any buyer meets it.

use std::collections::HashSet;
use std::time::Duration;

use crate::RedisConn;
use redis::AsyncCommands;
use sqlx::MySqlPool;
use tokio_util::sync::CancellationToken;

use crate::directory::Directory;
use crate::fallback::{self, SeqWatch, Why};
use crate::kafka::KafkaConfig;
use crate::keys::KeySpace;
use crate::reseed::{self, ReseedError};

pub const TICK: Duration = Duration::from_secs(1);
/// How long one re-seed waits for the writer to catch up; it tries again next tick.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
const REDIS_CHECK_TIMEOUT: Duration = Duration::from_millis(500);
/// Goods checked for a forgetful Redis per tick at most.
const CHECKS_MAX: usize = 1_000;

pub struct Recoverer {
    pub redis: RedisConn,
    pub mysql: MySqlPool,
    pub keys: KeySpace,
    pub kafka: KafkaConfig,
    pub directory: Directory,
    pub watch: SeqWatch,
    /// The deducter's breaker: a Redis that answers here closes it, so a goods re-seeded in
    /// the second after the last failure is not moved back to MySQL for a breaker still open.
    pub breaker: std::sync::Arc<fallback::Breaker>,
    /// Whether goods may move to MySQL (the fallback is on).
    pub fallback: bool,
}

impl Recoverer {
    pub async fn run(self, shutdown: CancellationToken) {
        crate::every_tick(TICK, &shutdown, || async {
            if !self.redis_answers().await {
                return;
            }
            self.breaker.success();
            self.restore_index().await;
            self.return_to_redis().await;
            if self.fallback {
                self.find_forgotten().await;
            }
        })
        .await;
    }

    async fn redis_answers(&self) -> bool {
        let mut conn = self.redis.clone();
        let command = redis::cmd("PING");
        let ping = command.query_async::<String>(&mut conn);
        matches!(
            tokio::time::timeout(REDIS_CHECK_TIMEOUT, ping).await,
            Ok(Ok(_))
        )
    }

    /// Puts back into the sales index (which the relay, the sweeper and reconcile walk) every
    /// goods MySQL says Redis holds whose sale Redis does hold: each was preheated or
    /// re-seeded, which added it. The index lives in one slot, apart from the goods' own: on a
    /// Redis Cluster, a master that forgot (restarted empty, flushed) can lose the index while
    /// the goods of the other masters live on, and their outboxes would go unrelayed and their
    /// reservations unswept. One SMEMBERS a tick; an EXISTS and a SADD only for what is
    /// missing. A goods whose sale is gone (forgotten: the fallback re-seeds it, which adds
    /// it; redefined as db: its preheat removed both) is left out.
    async fn restore_index(&self) {
        let mut loaded = self.directory.loaded_in_redis();
        // A sharded goods MySQL decides keeps its fenced shards until its re-seed: their
        // outboxes must reach MySQL first (the re-seed waits for them).
        loaded.extend(
            self.directory
                .not_in_redis()
                .into_iter()
                .filter(|(_, route)| route.shards > 1 && route.loaded_epoch > 0),
        );
        if loaded.is_empty() {
            return;
        }
        let mut conn = self.redis.clone();
        let index = self.keys.sales_index();
        let members = conn.smembers::<_, HashSet<String>>(&index);
        let members = match tokio::time::timeout(REDIS_CHECK_TIMEOUT, members).await {
            Ok(Ok(members)) => members,
            Ok(Err(e)) => return tracing::warn!(error = %e, "could not read the sales index"),
            Err(_) => return tracing::warn!("reading the sales index timed out"),
        };
        // A sharded goods is indexed by its shards.
        let key_ids = loaded
            .into_iter()
            .flat_map(|(goods_id, route)| crate::keys::key_ids(&goods_id, route.shards));
        for goods_id in key_ids {
            if members.contains(&goods_id) {
                continue;
            }
            let sale = self.keys.goods(&goods_id).sale;
            let restore = async {
                if !conn.exists::<_, bool>(&sale).await? {
                    return Ok(false);
                }
                conn.sadd::<_, _, u64>(&index, &goods_id)
                    .await
                    .map(|_| true)
            };
            match tokio::time::timeout(REDIS_CHECK_TIMEOUT, restore).await {
                Ok(Ok(true)) => tracing::warn!(
                    goods_id,
                    "a goods Redis holds was missing from the sales index (Redis forgot the \
                     index); put back"
                ),
                Ok(Ok(false)) => {}
                Ok(Err(e)) => {
                    tracing::warn!(goods_id, error = %e, "could not restore the sales index")
                }
                Err(_) => tracing::warn!(goods_id, "restoring the sales index timed out"),
            }
        }
    }

    /// Re-seeds every goods in fallback (or stopped switching).
    async fn return_to_redis(&self) {
        let returning = self.directory.not_in_redis();
        if returning.is_empty() {
            self.directory.refresh_soon().await;
            return;
        }
        for (goods_id, route) in returning {
            let old_epoch = route.loaded_epoch;
            let result = reseed::reseed(
                &self.redis,
                &self.mysql,
                &self.kafka,
                &self.keys,
                &goods_id,
                DRAIN_TIMEOUT,
            )
            .await;
            match result {
                Ok(reseeded) => {
                    metrics::counter!("seckill_fallback_exited_total").increment(1);
                    self.count_lost(&goods_id, old_epoch, route.shards).await;
                    tracing::info!(
                        goods_id,
                        epoch = reseeded.epoch,
                        available = reseeded.available,
                        reservations = reseeded.reservations,
                        "goods re-seeded from MySQL: Redis decides it again"
                    );
                }
                // Waiting on the pipeline (outbox not yet relayed, writer behind): next tick.
                Err(e @ (ReseedError::Outbox { .. } | ReseedError::DrainTimeout(_))) => {
                    tracing::debug!(goods_id, error = %e, "re-seed waits for the pipeline");
                }
                Err(e) => tracing::warn!(goods_id, error = %e, "re-seed failed; retrying"),
            }
        }
        // Now, not `refresh_soon`: a periodic refresh that read MySQL while the goods was
        // `switching` may have run moments ago, and until the next one (up to 500 ms) every
        // buyer of a goods Redis decides again would be answered 503 "switching". Refreshes
        // are serialized, so this one reads what the re-seed wrote.
        if let Err(e) = self.directory.refresh().await {
            tracing::warn!(error = %e, "could not refresh the sales directory from MySQL");
        }
    }

    /// Orders this syncer saw Redis hand out under the epoch it replaced that never reached
    /// MySQL, after the drain: lost with the Redis that forgot them (see the README).
    /// A sharded goods is watched per shard (each issues its own sequences).
    async fn count_lost(&self, goods_id: &str, old_epoch: u64, shards: u32) {
        for (index, key_id) in crate::keys::key_ids(goods_id, shards).iter().enumerate() {
            let shard = (shards > 1).then_some((index as u32, shards));
            match fallback::mysql_max_seq_in(&self.mysql, goods_id, old_epoch, shard).await {
                Ok(max_seq) => {
                    let (units, orders) = self.watch.unseen(key_id, old_epoch, max_seq);
                    if orders > 0 {
                        metrics::counter!("seckill_redis_lost_orders_total").increment(orders);
                        tracing::error!(
                            goods_id,
                            key_id,
                            orders,
                            units,
                            "orders answered `won` by a Redis that then forgot them never \
                             reached MySQL"
                        );
                    }
                }
                Err(e) => tracing::warn!(goods_id, error = %e, "could not count lost orders"),
            }
            self.watch.forget(key_id);
        }
        self.watch.forget(goods_id);
    }

    /// Moves to MySQL every goods whose sale Redis no longer holds as MySQL loaded it.
    async fn find_forgotten(&self) {
        let mut conn = self.redis.clone();
        for (goods_id, route) in self
            .directory
            .loaded_in_redis()
            .into_iter()
            .take(CHECKS_MAX)
        {
            // A sharded goods forgot if any of its shards did.
            let mut forgot = false;
            for key_id in crate::keys::key_ids(&goods_id, route.shards) {
                let sale = self.keys.goods(&key_id).sale;
                let mut command = redis::cmd("HMGET");
                command.arg(&sale).arg("epoch").arg("fenced");
                let read = command.query_async::<(Option<u64>, Option<String>)>(&mut conn);
                let (epoch, fenced) = match tokio::time::timeout(REDIS_CHECK_TIMEOUT, read).await {
                    Ok(Ok(fields)) => fields,
                    _ => return,
                };
                forgot |= match epoch {
                    None => true,
                    Some(epoch) => epoch < route.loaded_epoch || fenced.as_deref() == Some("1"),
                };
            }
            if forgot {
                let redis = Some((&self.redis, &self.keys));
                if let Err(e) =
                    fallback::enter(&self.mysql, &self.watch, &goods_id, Why::Forgot, redis).await
                {
                    tracing::warn!(goods_id, error = %e, "could not move the goods to MySQL");
                }
            }
        }
    }
}
