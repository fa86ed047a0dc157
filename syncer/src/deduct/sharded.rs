//! Deciding a `redis_sharded` goods (`shard.rs`): each attempt at its buyer's home shard;
//! attempts the home shard has too little for wait while units move to it from the other
//! shards, then are decided there again. `sold_out` is answered only when all shards together
//! hold too little, read twice with nothing moving between (`shard::Mover::rebalance`).

use std::collections::HashMap;
use std::time::Duration;

use crate::directory::Route;
use crate::durability::CallError;
use crate::keys::home_shard;
use crate::shard::{Mover, Rebalanced};
use crate::RedisConn;

use super::{
    answer_all, decide_group, decide_in_redis, parse_reply, Attempt, Batching, DbLane, DeductError,
    Delivery, InRedis, Routing, Shard, Target,
};

/// Times one group asks the other shards for units at most. Each round either moves units
/// (and the group is decided again), finds the goods out of stock (`sold_out`), or finds
/// units moving (decided again); past it, the attempts left are answered 503 (their retry is
/// decided afresh).
const ROUNDS_MAX: usize = 3;
/// A pause before deciding again while units move between shards (a move is a few calls).
const IN_TRANSIT_POLL: Duration = Duration::from_millis(5);

/// What every call for one sharded goods' group carries.
pub(super) struct Call<'a> {
    pub batching: &'a Batching,
    pub lane: &'a DbLane,
    pub routing: &'a Routing,
    pub conn: RedisConn,
    pub goods_id: &'a str,
    pub delivery: Delivery,
    pub route: Route,
}

/// Decides a group of one sharded goods: one group per home shard, all at once.
pub(super) async fn decide(call: &Call<'_>, group: Vec<Attempt>) {
    let shards = call.route.shards;
    let mut homes: HashMap<u32, Vec<Attempt>> = HashMap::new();
    for attempt in group {
        let home = home_shard(&attempt.request.user_id, shards);
        homes.entry(home).or_default().push(attempt);
    }
    let calls = homes.into_iter().map(|(index, group)| {
        let shard = Shard {
            index,
            count: shards,
        };
        decide_at_home(call, group, shard)
    });
    futures_util::future::join_all(calls).await;
}

async fn decide_at_home(call: &Call<'_>, mut group: Vec<Attempt>, shard: Shard) {
    let Call {
        batching,
        lane,
        goods_id,
        delivery,
        route,
        ..
    } = *call;
    let conn = &call.conn;
    let mover = Mover {
        conn: conn.clone(),
        keys: &batching.keys,
        durability: batching.durability,
        script: &batching.transfer,
    };
    for round in 0..=ROUNDS_MAX {
        let decided = decide_in_redis(
            batching,
            lane,
            conn.clone(),
            goods_id,
            delivery,
            group,
            Target {
                route: Some(route),
                shard: Some(shard),
            },
        )
        .await;
        let short = match decided {
            InRedis::Answered => return,
            InRedis::LookAgain(group, replies) => return look_again(call, group, replies).await,
            InRedis::ShardShort(short) => short,
        };
        if round == ROUNDS_MAX {
            // Units moved here each round and buyers of this shard took them first.
            return answer_all(
                short.into_iter().map(|(a, _)| a).collect(),
                &DeductError::Rebalancing,
            );
        }
        let wanted: u64 = short
            .iter()
            .map(|(a, _)| u64::from(a.request.quantity))
            .sum();
        let least = short
            .iter()
            .map(|(a, _)| u64::from(a.request.quantity))
            .min()
            .unwrap_or(1);
        let moved = mover
            .rebalance(
                goods_id,
                shard.index,
                shard.count,
                route.loaded_epoch,
                wanted,
                least,
            )
            .await;
        match moved {
            Ok(Rebalanced::Moved(units)) => {
                metrics::counter!("seckill_shard_units_moved_total").increment(units);
            }
            Ok(Rebalanced::Exhausted(left)) => {
                // The goods as a whole has too little: `sold_out` with what is left (0: the
                // gate may cache it as sold out).
                for (attempt, (outcome, order, _, retry, reason)) in short {
                    let left = i64::try_from(left).unwrap_or(i64::MAX);
                    let _ = attempt
                        .reply
                        .send(parse_reply((outcome, order, left, retry, reason)));
                }
                return;
            }
            Ok(Rebalanced::Unsettled) => tokio::time::sleep(IN_TRANSIT_POLL).await,
            Err(e) => {
                let error = match e {
                    CallError::Timeout => DeductError::Timeout,
                    other => DeductError::Redis(other.to_string()),
                };
                return answer_all(short.into_iter().map(|(a, _)| a).collect(), &error);
            }
        }
        group = short.into_iter().map(|(a, _)| a).collect();
    }
}

/// A shard did not know the goods and the directory does not know it as loaded: looked up
/// again, a goods preheated since is decided afresh; otherwise the answer stands.
async fn look_again(call: &Call<'_>, group: Vec<Attempt>, replies: Vec<super::ScriptReply>) {
    let Call {
        batching,
        lane,
        routing,
        goods_id,
        delivery,
        ..
    } = *call;
    let conn = call.conn.clone();
    match routing.directory.reload(goods_id).await {
        Some(r) if r.loaded_epoch > 0 || r.in_mysql() => {
            Box::pin(decide_group(
                batching,
                lane,
                conn,
                goods_id.to_owned(),
                delivery,
                group,
            ))
            .await;
        }
        _ => {
            for (attempt, reply) in group.into_iter().zip(replies) {
                let _ = attempt.reply.send(parse_reply(reply));
            }
        }
    }
}
