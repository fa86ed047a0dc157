//! The deduct path: purchase attempts are decided by one atomic Redis script. Attempts that
//! arrive while a script call is out are queued and sent together, one call per goods, so a
//! hot goods costs Redis one script call per batch instead of one per buyer. Nothing waits
//! on purpose: under light load every batch holds one attempt.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

mod sharded;

use crate::RedisConn;
use seckill_api::{DeductReply, DeductRequest, Outcome};
use tokio::sync::{mpsc, oneshot};

use crate::directory::{Directory, Mode, Route};
use crate::durability::{self, CallError, Durability};
use crate::fallback::{self, Breaker, SeqWatch, Watched, Why};
use crate::keys::KeySpace;
use crate::sale::Tier;

mod db_lane;
use db_lane::{DbLane, Job};

/// Longest a deduct may wait on Redis. The filter's callout timeout is shorter still; this
/// bound keeps a stuck Redis from piling up tasks in the syncer.
pub const REDIS_CALL_TIMEOUT: Duration = Duration::from_millis(1_000);
/// Attempts one script call decides at most: bounds how long one call blocks Redis.
pub const BATCH_ATTEMPTS_MAX: usize = 128;
/// Attempts waiting for a batch at most; past it the endpoint sheds load with 503 rather than
/// queueing without bound.
pub const QUEUE_ATTEMPTS_MAX: usize = 16_384;

/// How the answer to an attempt reaches its buyer, which decides how long its reservation
/// waits for a claim.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Delivery {
    /// The answer is the delivery (the single deduct endpoint): the reservation lives for its
    /// payment window at once.
    Direct,
    /// The gate forwards the winner and claims the reservation afterwards (the batch
    /// endpoint): unclaimed, it lives for the claim window only.
    Claimed,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum DeductError {
    #[error("{0}")]
    BadRequest(String),
    #[error("redis did not answer within {REDIS_CALL_TIMEOUT:?}")]
    Timeout,
    #[error("the caller's deadline passed before the attempt was decided; nothing was changed")]
    TooLate,
    #[error("more than {QUEUE_ATTEMPTS_MAX} attempts are waiting; shedding load")]
    Overloaded,
    #[error("redis error: {0}")]
    Redis(String),
    #[error("deduct script replied {0}")]
    BadScriptReply(String),
    /// `--redis-durability replicas:N` was not met: the batch's reservations stay in Redis
    /// (a retry with the same request id meets them) but nobody is told `won` on them.
    #[error(
        "{acked} of {wanted} replicas acknowledged the batch before its deadline; \
         its attempts are not answered"
    )]
    NotReplicated { acked: u64, wanted: u32 },
    #[error("the deduct batcher stopped")]
    Stopped,
    /// MySQL decides this goods while Redis is down, and the fallback's rate is used up.
    #[error("the MySQL fallback is at its rate; retry in a moment")]
    FallbackOverloaded,
    /// MySQL could not decide (the db tier or the fallback).
    #[error("mysql: {0}")]
    Mysql(String),
    /// A re-seed is loading the goods into Redis, or the decision moved between Redis and
    /// MySQL under this attempt: nothing was decided.
    #[error("the goods is switching between Redis and MySQL; retry in a moment")]
    Switching,
    /// Redis forgot (or went back): this attempt was not answered from it.
    #[error("redis forgot goods {0}; it is decided by MySQL until re-seeded")]
    Forgot(String),
    /// A sharded goods' units are on their way between shards (or buyers of the same shard
    /// took them first, round after round): nothing was decided.
    #[error("the goods' stock is moving between its shards; retry in a moment")]
    Rebalancing,
}

impl DeductError {
    /// The `kind` label of `seckill_deduct_errors_total`, one of
    /// [`crate::telemetry::DEDUCT_ERROR_KINDS`]: what an operator acts on differently.
    pub fn metric_kind(&self) -> &'static str {
        match self {
            DeductError::BadRequest(_) => "bad_request",
            DeductError::Overloaded => "overloaded",
            DeductError::TooLate => "too_late",
            DeductError::NotReplicated { .. } => "not_replicated",
            _ => "redis",
        }
    }
}

struct Attempt {
    request: DeductRequest,
    delivery: Delivery,
    /// After this the caller no longer waits: the attempt must not be decided.
    deadline: Instant,
    reply: oneshot::Sender<Result<DeductReply, DeductError>>,
}

/// Handle to the deduct batcher. Cheap to clone.
#[derive(Clone)]
pub struct Deducter {
    queue: mpsc::Sender<Attempt>,
}

/// What one script call needs besides its attempts.
struct Batching {
    keys: KeySpace,
    script: redis::Script,
    claim_window: Duration,
    durability: Durability,
    routing: Option<Routing>,
    /// Moves units between the shards of a `redis_sharded` goods (`shard.rs`).
    transfer: redis::Script,
}

/// What lets MySQL decide: the `db` tier, `dual_write`'s rows, and the fallback when Redis
/// fails or forgets. Without it (tests, benchmarks) Redis decides everything, as before.
#[derive(Clone)]
pub struct Routing {
    pub mysql: sqlx::MySqlPool,
    pub directory: Directory,
    pub watch: SeqWatch,
    pub breaker: Arc<Breaker>,
    /// Attempts the fallback decides per second at most; None: no fallback (Redis failures
    /// are answered 503, as without routing).
    pub fallback_rate: Option<Arc<governor::DefaultDirectRateLimiter>>,
}

impl Routing {
    pub fn new(mysql: sqlx::MySqlPool, directory: Directory, fallback_rate: u32) -> Routing {
        let fallback_rate = std::num::NonZeroU32::new(fallback_rate).map(|rate| {
            Arc::new(governor::RateLimiter::direct(governor::Quota::per_second(
                rate,
            )))
        });
        Routing {
            mysql,
            directory,
            watch: SeqWatch::default(),
            breaker: Arc::new(Breaker::default()),
            fallback_rate,
        }
    }
}

impl Deducter {
    /// Starts the batcher task; it ends when every handle is dropped. Reservations delivered
    /// through a claim wait `claim_window` for it.
    pub fn start(redis: RedisConn, keys: KeySpace, claim_window: Duration) -> Self {
        Self::start_with_durability(vec![redis], keys, claim_window, Durability::None)
    }

    /// [`Deducter::start`] under a durability setting, with one batch out at a time on each
    /// of `connections` (at least one). With `replicas:N` each should be a connection of its
    /// own: a blocked WAIT holds up every command behind it on its connection.
    pub fn start_with_durability(
        connections: Vec<RedisConn>,
        keys: KeySpace,
        claim_window: Duration,
        durability: Durability,
    ) -> Self {
        Self::start_routed(connections, keys, claim_window, durability, None)
    }

    /// [`Deducter::start_with_durability`], with MySQL deciding what `routing` says it
    /// decides.
    pub fn start_routed(
        connections: Vec<RedisConn>,
        keys: KeySpace,
        claim_window: Duration,
        durability: Durability,
        routing: Option<Routing>,
    ) -> Self {
        let (queue, attempts) = mpsc::channel(QUEUE_ATTEMPTS_MAX);
        let batching = Batching {
            keys,
            script: redis::Script::new(crate::scripts::DEDUCT),
            claim_window,
            durability,
            routing,
            transfer: redis::Script::new(crate::scripts::TRANSFER),
        };
        tokio::spawn(run_batches(attempts, batching, connections));
        Self { queue }
    }

    /// Decides one attempt. `timeout` is how long the caller waits for the answer (capped by
    /// [`REDIS_CALL_TIMEOUT`]): past it, the attempt is refused unchanged, also inside Redis.
    pub async fn deduct(
        &self,
        request: DeductRequest,
        delivery: Delivery,
        timeout: Option<Duration>,
    ) -> Result<DeductReply, DeductError> {
        validate(&request)?;
        let budget = timeout.map_or(REDIS_CALL_TIMEOUT, |t| t.min(REDIS_CALL_TIMEOUT));
        let deadline = Instant::now() + budget;
        let (reply, answer) = oneshot::channel();
        self.queue
            .try_send(Attempt {
                request,
                delivery,
                deadline,
                reply,
            })
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
/// goods, answers each, and repeats. One batch out at a time on each connection: while the
/// batches are out, the next forms.
async fn run_batches(
    mut attempts: mpsc::Receiver<Attempt>,
    batching: Batching,
    connections: Vec<RedisConn>,
) {
    let batching = Arc::new(batching);
    let lane = DbLane::start(batching.clone());
    // The free connections; a batch takes one and gives it back when it is answered.
    let (free, mut idle) = mpsc::channel(connections.len().max(1));
    for connection in connections {
        let _ = free.try_send(connection);
    }
    let mut batch = Vec::with_capacity(BATCH_ATTEMPTS_MAX);
    // A free connection first, so that while every one is out the next batch keeps forming.
    while let Some(connection) = idle.recv().await {
        if attempts.recv_many(&mut batch, BATCH_ATTEMPTS_MAX).await == 0 {
            return;
        }
        let groups = group_by_goods(&mut batch);
        let (batching, free, lane) = (batching.clone(), free.clone(), lane.clone());
        tokio::spawn(async move {
            let calls = groups.into_iter().map(|((goods_id, delivery), group)| {
                decide_group(
                    &batching,
                    &lane,
                    connection.clone(),
                    goods_id,
                    delivery,
                    group,
                )
            });
            futures_util::future::join_all(calls).await;
            let _ = free.send(connection).await;
        });
    }
}

/// One group per goods and delivery (one script call each); attempts whose caller already
/// gave up are answered `TooLate` here, without asking Redis.
fn group_by_goods(batch: &mut Vec<Attempt>) -> HashMap<(String, Delivery), Vec<Attempt>> {
    let now = Instant::now();
    let mut by_goods: HashMap<(String, Delivery), Vec<Attempt>> = HashMap::new();
    for attempt in batch.drain(..) {
        // Waited in the queue past its caller's patience: answer without asking Redis.
        if attempt.deadline <= now {
            let _ = attempt.reply.send(Err(DeductError::TooLate));
            continue;
        }
        by_goods
            .entry((attempt.request.goods_id.clone(), attempt.delivery))
            .or_default()
            .push(attempt);
    }
    metrics::histogram!("seckill_deduct_batch_attempts")
        .record(by_goods.values().map(Vec::len).sum::<usize>() as f64);
    by_goods
}

/// Milliseconds since the epoch at `deadline`, by this host's wall clock; the script compares
/// it with Redis's clock (the two are assumed NTP-close, as the sale window already is).
fn epoch_ms_at(deadline: Instant) -> u64 {
    let wall = SystemTime::now() + deadline.saturating_duration_since(Instant::now());
    wall.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Decides one goods' group: in Redis, or handed to the MySQL lane (then this returns at
/// once, and the Redis connection is free for the next batch).
async fn decide_group(
    batching: &Batching,
    lane: &DbLane,
    conn: RedisConn,
    goods_id: String,
    delivery: Delivery,
    group: Vec<Attempt>,
) {
    let Some(routing) = &batching.routing else {
        let target = Target {
            route: None,
            shard: None,
        };
        decide_in_redis(batching, lane, conn, &goods_id, delivery, group, target).await;
        return;
    };
    let route = routing.directory.lookup(&goods_id).await;
    match route {
        Some(route) if route.in_mysql() => {
            let rated = route.tier != Tier::Db;
            return lane.submit(Job {
                goods_id,
                delivery,
                rated,
                group,
            });
        }
        Some(Route {
            mode: Mode::Switching,
            ..
        }) => return answer_all(group, &DeductError::Switching),
        _ => {}
    }
    // Redis is failing: a goods MySQL can decide moves there instead of waiting on Redis.
    if routing.breaker.is_open() && routing.fallback_rate.is_some() {
        let redis = (&conn, &batching.keys);
        let group = match move_to_mysql(routing, redis, &goods_id, Why::RedisDown, group).await {
            Ok(group) => group,
            Err(group) => return answer_all(group, &DeductError::Redis("redis is failing".into())),
        };
        let route = routing.directory.route(&goods_id);
        let rated = route.is_none_or(|r| r.tier != Tier::Db);
        return lane.submit(Job {
            goods_id,
            delivery,
            rated,
            group,
        });
    }
    if let Some(route) = route.filter(|r| r.tier == Tier::RedisSharded && r.shards > 1) {
        let call = sharded::Call {
            batching,
            lane,
            routing,
            conn,
            goods_id: &goods_id,
            delivery,
            route,
        };
        return sharded::decide(&call, group).await;
    }
    let InRedis::LookAgain(group, replies) = decide_in_redis(
        batching,
        lane,
        conn.clone(),
        &goods_id,
        delivery,
        group,
        Target { route, shard: None },
    )
    .await
    else {
        return;
    };
    // Redis does not know a goods the directory knows as never loaded: a sale preheated (or
    // redefined, say as db) since the last refresh. Looked up again, the directory may say
    // MySQL decides it, or that Redis should have it (then Redis forgot, and the script says
    // so). Once per batch, and a goods is looked up at most every 20 ms.
    let route = routing.directory.reload(&goods_id).await;
    match route {
        Some(r) if r.loaded_epoch > 0 || r.in_mysql() => {
            Box::pin(decide_group(
                batching, lane, conn, goods_id, delivery, group,
            ))
            .await;
        }
        // Unknown to MySQL as well: the answer stands.
        _ => {
            for (attempt, reply) in group.into_iter().zip(replies) {
                let _ = attempt.reply.send(parse_reply(reply));
            }
        }
    }
}

/// Moves a goods to MySQL (if MySQL can take it) and refreshes the directory: `Ok` with the
/// group for MySQL to decide, `Err` with it when MySQL cannot (no such sale there, never
/// loaded, no fallback).
async fn move_to_mysql(
    routing: &Routing,
    redis: (&RedisConn, &KeySpace),
    goods_id: &str,
    why: Why,
    group: Vec<Attempt>,
) -> Result<Vec<Attempt>, Vec<Attempt>> {
    if routing.fallback_rate.is_none() {
        return Err(group);
    }
    match fallback::enter(&routing.mysql, &routing.watch, goods_id, why, Some(redis)).await {
        // This call moved it: the directory must say so before the group is decided.
        Ok(true) => {
            if let Err(e) = routing.directory.refresh().await {
                tracing::warn!(goods_id, error = %e, "could not refresh the sales directory");
            }
        }
        Ok(false) => routing.directory.refresh_soon().await,
        Err(e) => {
            tracing::warn!(goods_id, error = %e, "could not move the goods to MySQL");
            return Err(group);
        }
    }
    match routing.directory.route(goods_id) {
        Some(route) if route.in_mysql() => Ok(group),
        _ => Err(group),
    }
}

/// MySQL decides the group (the db tier, or the fallback within its rate); called by the
/// lane.
async fn decide_in_mysql(
    batching: &Batching,
    routing: &Routing,
    goods_id: &str,
    delivery: Delivery,
    mut group: Vec<Attempt>,
    rated: bool,
) {
    if rated {
        let Some(limiter) = &routing.fallback_rate else {
            return answer_all(group, &DeductError::Forgot(goods_id.to_owned()));
        };
        // Each attempt takes one cell of the rate; the rest are answered at once.
        let over: Vec<Attempt> = {
            let mut kept = Vec::with_capacity(group.len());
            let mut over = Vec::new();
            for attempt in group.drain(..) {
                if limiter.check().is_ok() {
                    kept.push(attempt);
                } else {
                    over.push(attempt);
                }
            }
            group = kept;
            over
        };
        if !over.is_empty() {
            metrics::counter!("seckill_fallback_refused_total").increment(over.len() as u64);
            answer_all(over, &DeductError::FallbackOverloaded);
        }
        if group.is_empty() {
            return;
        }
    }
    let deadline = group
        .iter()
        .map(|a| a.deadline)
        .min()
        .unwrap_or_else(Instant::now);
    let requests: Vec<DeductRequest> = group.iter().map(|a| a.request.clone()).collect();
    let claim_window = match delivery {
        Delivery::Direct => None,
        Delivery::Claimed => Some(batching.claim_window),
    };
    // Bounded by the callers' patience: a sale row locked elsewhere must not hold the lane.
    // Past it the batch may or may not have committed: answered 503 like a Redis timeout,
    // and a retry with the same request id meets whichever it was.
    let decided =
        crate::db_decide::decide_batch(&routing.mysql, goods_id, &requests, claim_window, deadline);
    let Ok(result) = tokio::time::timeout_at(deadline.into(), decided).await else {
        let unsure = "no answer before the callers' deadline (the batch may have committed: \
                      retry with the same request id)";
        return answer_all(group, &DeductError::Mysql(unsure.into()));
    };
    match result {
        Ok(replies) if replies.len() == group.len() => {
            for (attempt, reply) in group.into_iter().zip(replies) {
                if rated {
                    metrics::counter!("seckill_fallback_decisions_total",
                        "outcome" => reply.outcome.as_str())
                    .increment(1);
                }
                let _ = attempt.reply.send(Ok(reply));
            }
        }
        Ok(replies) => answer_all(
            group,
            &DeductError::BadScriptReply(format!("{} replies for attempts", replies.len())),
        ),
        Err(crate::db_decide::DbDecideError::TooLate) => answer_all(group, &DeductError::TooLate),
        Err(crate::db_decide::DbDecideError::NotDecidedHere(..)) => {
            // The directory was behind (the goods was redefined, or is back in Redis): the
            // next attempt goes where MySQL says.
            routing.directory.reload(goods_id).await;
            answer_all(group, &DeductError::Switching)
        }
        Err(e) => answer_all(group, &DeductError::Mysql(e.to_string())),
    }
}

/// One shard of a `redis_sharded` goods: the buyers' home shard of a group.
#[derive(Debug, Clone, Copy)]
struct Shard {
    index: u32,
    count: u32,
}

/// Which keys decide a group: the goods' route, and its shard for a sharded goods.
#[derive(Debug, Clone, Copy)]
struct Target {
    route: Option<Route>,
    shard: Option<Shard>,
}

/// What became of a group Redis was asked to decide.
enum InRedis {
    /// Every attempt was answered.
    Answered,
    /// Redis answered `unknown_goods` for a goods the directory does not know as loaded:
    /// nobody was answered, and the caller looks again.
    LookAgain(Vec<Attempt>, Vec<ScriptReply>),
    /// A shard had too little for these attempts (its `sold_out`): not answered, so that
    /// units can move to it from the other shards first.
    ShardShort(Vec<(Attempt, ScriptReply)>),
}

/// Redis decides the group: on the goods' keys, or on one shard's (`shard`).
async fn decide_in_redis(
    batching: &Batching,
    lane: &DbLane,
    mut conn: RedisConn,
    goods_id: &str,
    delivery: Delivery,
    group: Vec<Attempt>,
    target: Target,
) -> InRedis {
    let Target { route, shard } = target;
    // The keys (and the watch's name) of the goods, or of its shard.
    let key_id = match shard {
        Some(shard) => crate::keys::shard_id(goods_id, shard.index),
        None => goods_id.to_owned(),
    };
    let goods = batching.keys.goods(&key_id);
    // The call must not decide anything after the most impatient of its callers gave up.
    let deadline = group
        .iter()
        .map(|a| a.deadline)
        .min()
        .unwrap_or_else(Instant::now);
    let claim_window_ms = match delivery {
        Delivery::Direct => 0,
        Delivery::Claimed => u64::try_from(batching.claim_window.as_millis())
            .unwrap_or(u64::MAX)
            .max(1),
    };
    let mut invocation = crate::scripts::invocation(&batching.script, &goods.deduct_script_keys());
    invocation
        .arg(goods_id)
        .arg(epoch_ms_at(deadline))
        .arg(claim_window_ms)
        .arg(route.map_or(0, |r| r.loaded_epoch));
    for attempt in &group {
        invocation
            .arg(&attempt.request.user_id)
            .arg(attempt.request.quantity)
            .arg(&attempt.request.request_id);
    }
    let mark = batching.keys.durability_mark(&key_id);
    let result: Result<Vec<ScriptReply>, DeductError> =
        durability::invoke(batching.durability, &mut conn, &invocation, &mark, deadline)
            .await
            .map_err(|e| match e {
                CallError::Timeout => DeductError::Timeout,
                CallError::Redis(e) => DeductError::Redis(e),
                CallError::NotReplicated { acked, wanted } => {
                    DeductError::NotReplicated { acked, wanted }
                }
            });
    let routing = batching.routing.as_ref();
    let replies = match result {
        Ok(replies) if replies.len() == group.len() => replies,
        Ok(replies) => {
            let error = DeductError::BadScriptReply(format!(
                "{} replies for {} attempts",
                replies.len(),
                group.len()
            ));
            answer_all(group, &error);
            return InRedis::Answered;
        }
        Err(error) => {
            // Not decided here, and the attempts may have been decided in Redis (a timeout):
            // they are answered 503 and their retries meet whichever decided them.
            // One shard failing is that shard's buyers' 503, not the breaker's, as long as
            // another shard of the goods answers a read now (`shard::another_answers`).
            if let (Some(routing), DeductError::Timeout | DeductError::Redis(_)) = (routing, &error)
            {
                let apart = match shard {
                    Some(s) => {
                        let keys = &batching.keys;
                        crate::shard::another_answers(&conn, keys, goods_id, s.index, s.count).await
                    }
                    None => false,
                };
                if !apart {
                    routing.breaker.failure();
                }
            }
            // A call that timed out may have run: what it could have sold is held back if the
            // goods moves to MySQL. (A refused or broken connection sent nothing.)
            if let (Some(routing), DeductError::Timeout) = (routing, &error) {
                routing.watch.uncertain(
                    &key_id,
                    group
                        .iter()
                        .map(|a| (a.request.request_id.as_str(), u64::from(a.request.quantity))),
                );
            }
            answer_all(group, &error);
            return InRedis::Answered;
        }
    };
    if let Some(routing) = routing {
        if routing.breaker.success() {
            // Back from an outage: what MySQL decided meanwhile must be in the directory
            // before Redis decides on.
            routing.directory.refresh_soon().await;
        }
    }
    if replies.first().is_some_and(|r| r.0 == "stale") {
        // This Redis forgot the goods: MySQL decides it until it is re-seeded.
        let Some(routing) = routing else {
            answer_all(group, &DeductError::Forgot(goods_id.to_owned()));
            return InRedis::Answered;
        };
        let redis = (&conn, &batching.keys);
        let group = match move_to_mysql(routing, redis, goods_id, Why::Forgot, group).await {
            Ok(group) => group,
            Err(group) => {
                answer_all(group, &DeductError::Forgot(goods_id.to_owned()));
                return InRedis::Answered;
            }
        };
        lane.submit(Job {
            goods_id: goods_id.to_owned(),
            delivery,
            rated: true,
            group,
        });
        return InRedis::Answered;
    }
    if routing.is_some()
        && route.is_none_or(|r| r.loaded_epoch == 0)
        && replies.first().is_some_and(|r| r.0 == "unknown_goods")
    {
        return InRedis::LookAgain(group, replies);
    }
    let new_orders: Vec<(u64, u64, u64)> = group
        .iter()
        .zip(&replies)
        .filter(|(_, r)| r.0 == "won" && (r.4 == "new" || r.4 == "new_dw"))
        .filter_map(|(a, r)| {
            crate::keys::order_parts(&r.1).map(|(_, e, s)| (e, s, u64::from(a.request.quantity)))
        })
        .collect();
    if let Some(routing) = routing {
        // The first time this process meets an epoch, MySQL says how far it already got: a
        // syncer started in front of a Redis that went back must not hand out those ids.
        // A shard is watched on its own: its sequences rise, the goods' interleave.
        if let Some(&(epoch, _, _)) = new_orders.iter().max() {
            if !routing.watch.knows(&key_id, epoch) {
                let of_shard = shard.map(|s| (s.index, s.count));
                match fallback::mysql_max_seq_in(&routing.mysql, goods_id, epoch, of_shard).await {
                    Ok(floor) => routing.watch.set_floor(&key_id, epoch, floor),
                    Err(e) => tracing::warn!(goods_id, error = %e,
                        "could not read MySQL's highest order of the epoch; watching from here"),
                }
            }
        }
        if routing.watch.observe(&key_id, &new_orders) == Watched::Reissued {
            // Redis went back: none of this batch's new ids may reach a buyer. The others of
            // the batch are answered (they hand out nothing).
            fallback::fence(&conn, &batching.keys, &key_id).await;
            if let Err(e) = fallback::enter(
                &routing.mysql,
                &routing.watch,
                goods_id,
                Why::Reissued,
                Some((&conn, &batching.keys)),
            )
            .await
            {
                tracing::warn!(goods_id, error = %e, "could not move the goods to MySQL");
            }
            if let Err(e) = routing.directory.refresh().await {
                tracing::warn!(goods_id, error = %e, "could not refresh the sales directory");
            }
            let forgot = DeductError::Forgot(goods_id.to_owned());
            for (attempt, reply) in group.into_iter().zip(replies) {
                let answer = if reply.0 == "won" && (reply.4 == "new" || reply.4 == "new_dw") {
                    Err(forgot.clone())
                } else {
                    parse_reply(reply)
                };
                let _ = attempt.reply.send(answer);
            }
            return InRedis::Answered;
        }
        // The script marks a dual_write sale's wins (the tier travels with the sale in Redis):
        // a directory that has not seen the sale's tier yet cannot skip its rows.
        let marked = replies.iter().any(|r| r.4 == "new_dw" || r.4 == "dw");
        if marked || route.is_some_and(|r| r.tier == Tier::DualWrite) {
            answer_dual_write(routing, goods_id, group, replies).await;
            return InRedis::Answered;
        }
    }
    let mut short = Vec::new();
    for (attempt, mut reply) in group.into_iter().zip(replies) {
        if shard.is_some() && reply.0 == Outcome::SoldOut.as_str() {
            short.push((attempt, reply));
            continue;
        }
        if shard.is_some() {
            // A shard's count is not the goods': told `remaining: 0` with a win, the gate
            // would cache the whole goods as sold out. A sharded goods' answers carry none
            // (`sold_out` carries the goods' own, `deduct/sharded.rs`).
            reply.2 = -1;
        }
        // The buyer may have given up (timeout); its answer is then dropped.
        let _ = attempt.reply.send(parse_reply(reply));
    }
    if short.is_empty() {
        InRedis::Answered
    } else {
        InRedis::ShardShort(short)
    }
}

/// `dual_write`: the winners' rows go to MySQL (the writer's own apply, so the event that
/// follows through Kafka is a redelivery) before anyone is told `won`. If MySQL fails, the
/// winners are answered 503: their reservations wait in Redis for a retry with the same
/// request id, which writes the row again (idempotent) before answering.
async fn answer_dual_write(
    routing: &Routing,
    goods_id: &str,
    group: Vec<Attempt>,
    replies: Vec<ScriptReply>,
) {
    let now_ms = chrono::Utc::now().timestamp_millis();
    let events: Vec<crate::events::SaleEvent> = group
        .iter()
        .zip(&replies)
        .filter(|(_, r)| r.0 == "won")
        .map(|(a, r)| crate::events::SaleEvent::Reserved {
            order_id: r.1.clone(),
            goods_id: goods_id.to_owned(),
            user_id: a.request.user_id.clone(),
            quantity: a.request.quantity,
            request_id: a.request.request_id.clone(),
            at_ms: now_ms,
        })
        .collect();
    let written = if events.is_empty() {
        Ok(())
    } else {
        let refs: Vec<&crate::events::SaleEvent> = events.iter().collect();
        match crate::writer::apply_events(&routing.mysql, &refs).await {
            Ok((_, refused)) if refused.is_empty() => Ok(()),
            Ok((_, refused)) => Err(DeductError::Mysql(format!(
                "{} winners' rows were refused: {}",
                refused.len(),
                refused[0].reason
            ))),
            Err(e) => Err(DeductError::Mysql(e.to_string())),
        }
    };
    for (attempt, reply) in group.into_iter().zip(replies) {
        let answer = match (&written, reply.0 == "won") {
            (Err(e), true) => Err(e.clone()),
            _ => parse_reply(reply),
        };
        let _ = attempt.reply.send(answer);
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

/// The script's one reply shape: `{outcome, order_id, remaining, at_ms, reason}`, where
/// `at_ms` is a retry-after or, for `won`, the reservation's payment deadline.
type ScriptReply = (String, String, i64, i64, String);

/// Maps one script reply to the wire reply (or to `TooLate`: nothing was decided).
fn parse_reply(
    (outcome, order_id, remaining, at_ms, reason): ScriptReply,
) -> Result<DeductReply, DeductError> {
    if outcome == "too_late" {
        return Err(DeductError::TooLate);
    }
    let outcome = Outcome::parse(&outcome)
        .ok_or_else(|| DeductError::BadScriptReply(format!("unknown outcome {outcome:?}")))?;
    // Won, released and confirmed name the order; nothing else does.
    let names_order = matches!(
        outcome,
        Outcome::Won | Outcome::Released | Outcome::Confirmed
    );
    let order_id = match (names_order, order_id.is_empty()) {
        (true, false) => Some(order_id),
        (true, true) => {
            return Err(DeductError::BadScriptReply(format!(
                "{} without order id",
                outcome.as_str()
            )))
        }
        (false, _) => None,
    };
    // A winner's pass carries its deadline: a `won` without one cannot be signed.
    let expires_at_ms = match (outcome, u64::try_from(at_ms)) {
        (Outcome::Won, Ok(ms)) if ms > 0 => Some(ms),
        (Outcome::Won, _) => {
            return Err(DeductError::BadScriptReply(format!(
                "won with deadline {at_ms}"
            )))
        }
        _ => None,
    };
    Ok(DeductReply {
        outcome,
        order_id,
        remaining: u64::try_from(remaining).ok(),
        retry_after_ms: matches!(
            outcome,
            Outcome::NotStarted | Outcome::Paused | Outcome::FleetRateLimited
        )
        .then_some(at_ms.max(0) as u64),
        reason: (outcome == Outcome::Released && !reason.is_empty()).then_some(reason),
        expires_at_ms,
        pass: None,
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

    fn script(outcome: &str, order: &str, remaining: i64, retry: i64, reason: &str) -> ScriptReply {
        (
            outcome.into(),
            order.into(),
            remaining,
            retry,
            reason.into(),
        )
    }

    #[test]
    fn script_replies_map_to_one_shape() {
        let won = parse_reply(script("won", "sku-1.1.7", 93, 1_700_000_900_000, "")).unwrap();
        assert_eq!(won.order_id.as_deref(), Some("sku-1.1.7"));
        assert_eq!(won.remaining, Some(93));
        assert_eq!(won.reason, None);
        assert_eq!(
            (won.expires_at_ms, won.retry_after_ms),
            (Some(1_700_000_900_000), None)
        );
        let unknown = parse_reply(script("unknown_goods", "", -1, 0, "")).unwrap();
        assert_eq!(unknown.remaining, None);
        let early = parse_reply(script("not_started", "", 5, 1500, "")).unwrap();
        assert_eq!(early.retry_after_ms, Some(1500));
        let paused = parse_reply(script("paused", "", 5, 7000, "")).unwrap();
        assert_eq!(
            (paused.outcome, paused.retry_after_ms, paused.order_id),
            (Outcome::Paused, Some(7000), None)
        );
        let released = parse_reply(script("released", "g.1.2", 4, 0, "cancelled")).unwrap();
        assert_eq!(
            (released.order_id.as_deref(), released.reason.as_deref()),
            (Some("g.1.2"), Some("cancelled"))
        );
        let paid = parse_reply(script("confirmed", "g.1.3", 4, 0, "")).unwrap();
        assert_eq!(paid.order_id.as_deref(), Some("g.1.3"));
        assert!(matches!(
            parse_reply(script("too_late", "", -1, 0, "")),
            Err(DeductError::TooLate)
        ));
        assert!(parse_reply(script("won", "", 1, 1_700_000_900_000, "")).is_err());
        // A winner without its deadline could not be given a pass.
        assert!(parse_reply(script("won", "sku-1.1.8", 1, 0, "")).is_err());
        assert_eq!(paused.expires_at_ms, None);
        assert!(parse_reply(script("released", "", 1, 0, "cancelled")).is_err());
        assert!(parse_reply(script("maybe", "", 1, 0, "")).is_err());
    }
}
