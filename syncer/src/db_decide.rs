//! MySQL decides purchase attempts itself: the `db` tier, and the fallback while Redis is down
//! or has forgotten. The rules are deduct_batch.lua's, word for word (idempotent request ids,
//! the per-user limit, the sale window, no unit twice), applied to a batch of attempts for one
//! goods in one transaction under the sale row's lock: one conditional `UPDATE` of the stock
//! and one multi-row `INSERT` of the winners' orders per batch, where a per-order design pays a
//! transaction per buyer.
//!
//! Order ids are `goods.epoch.seq` like Redis's, under an epoch MySQL took for itself (a db
//! tier's preheat, or the fallback's entry), with `sales.db_seq` as the sequence: no id Redis
//! handed out can come back. For a `redis_sharded` goods in fallback the sequence also names
//! the buyer's home shard (`seq = shard (mod shards)`, as its shards issue them), so once it is
//! re-seeded each order's records sit where its buyer's count and retries are.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use chrono::{DateTime, NaiveDateTime, SubsecRound, Utc};
use seckill_api::{DeductReply, DeductRequest, Outcome};
use sqlx::{MySqlPool, QueryBuilder, Row};

use crate::keys::order_parts;
use crate::order::OrderState;
use crate::sale::Tier;

/// Attempts per `IN (...)` list and per multi-row INSERT: the deducter's batches are smaller.
const ROWS_MAX: usize = 1_000;

#[derive(Debug, thiserror::Error)]
pub enum DbDecideError {
    /// Redis decides this goods (or a re-seed is loading it): MySQL must not.
    #[error("goods {0} is not decided by MySQL now (mode {1})")]
    NotDecidedHere(String, String),
    #[error("the caller's deadline passed before the attempts were decided; nothing was changed")]
    TooLate,
    #[error("mysql: {0}")]
    Mysql(#[from] sqlx::Error),
}

/// The sale as one decision sees it (read under the row lock).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SaleView {
    pub goods_id: String,
    /// Units MySQL may sell: its stock less the fallback's holdback.
    pub available: i64,
    pub limit: u64,
    pub start_ms: i64,
    pub end_ms: i64,
    /// How long a reservation lives unless paid: a winner's deadline (its pass's expiry).
    pub payment_window_ms: i64,
    pub epoch: u64,
    /// The last sequence number handed out under `epoch`.
    pub seq: u64,
    /// The goods' shards (1: unsharded): each order's sequence names its buyer's home shard.
    pub shards: u32,
    /// While an operator paused the sale: the Retry-After buyers are told, ms.
    pub pause_retry_ms: Option<u64>,
    /// An operator stopped the sale: it has ended, whatever this host's clock says of
    /// `end_ms` (a stop moved it to the stopping host's now).
    pub stopped: bool,
}

/// The next sequence after `last` for a buyer: the next one at all, or for a sharded goods the
/// next that names the buyer's home shard (up to `shards - 1` numbers are skipped).
fn next_sequence(last: u64, shards: u32, user_id: &str) -> u64 {
    let next = last + 1;
    if shards <= 1 {
        return next;
    }
    let shards = u64::from(shards);
    let home = u64::from(crate::keys::home_shard(user_id, shards as u32));
    next + (home + shards - next % shards) % shards
}

/// An earlier order of a request id (the latest of the round).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prior {
    pub user_id: String,
    pub quantity: u32,
    pub order_id: String,
    pub state: OrderState,
    pub reason: Option<String>,
    /// When the order was made, ms since the epoch: its payment window runs from here.
    pub reserved_at_ms: i64,
}

/// A winner's order, to be inserted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewOrder {
    pub order_id: String,
    pub user_id: String,
    pub quantity: u32,
    pub request_id: String,
}

/// What a batch decided: one reply per attempt, the orders to insert and the units granted.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Decided {
    pub replies: Vec<DeductReply>,
    pub orders: Vec<NewOrder>,
    pub granted: i64,
}

fn reply(outcome: Outcome, order_id: Option<&str>, available: i64) -> DeductReply {
    DeductReply {
        order_id: order_id.map(str::to_owned),
        ..DeductReply::new(outcome, u64::try_from(available).ok())
    }
}

/// Decides `attempts` in order, as deduct_batch.lua does: idempotency first, then the sale
/// window, then the buyer, then the stock. `priors` and `held` are updated as the batch goes,
/// so two attempts of one batch see each other.
pub fn decide(
    sale: &mut SaleView,
    priors: &mut HashMap<String, Prior>,
    held: &mut HashMap<String, u64>,
    attempts: &[DeductRequest],
    now_ms: i64,
) -> Decided {
    let mut decided = Decided::default();
    for attempt in attempts {
        let answer = decide_one(sale, priors, held, attempt, now_ms, &mut decided);
        decided.replies.push(answer);
    }
    decided
}

fn decide_one(
    sale: &mut SaleView,
    priors: &mut HashMap<String, Prior>,
    held: &mut HashMap<String, u64>,
    attempt: &DeductRequest,
    now_ms: i64,
    decided: &mut Decided,
) -> DeductReply {
    if let Some(prior) = priors.get(&attempt.request_id) {
        if prior.user_id != attempt.user_id || prior.quantity != attempt.quantity {
            return reply(Outcome::RequestIdConflict, None, sale.available);
        }
        match prior.state {
            OrderState::Reserved => {
                let mut answer = reply(Outcome::Won, Some(&prior.order_id), sale.available);
                // Its own deadline: a repeat does not extend it.
                answer.expires_at_ms = deadline_ms(prior.reserved_at_ms + sale.payment_window_ms);
                return answer;
            }
            OrderState::Confirmed => {
                return reply(Outcome::Confirmed, Some(&prior.order_id), sale.available);
            }
            OrderState::Released => {
                let reason = prior.reason.as_deref().unwrap_or("ended");
                // Never delivered (the shop failed it, or nobody claimed it): the buyer never
                // had it, so a retry is decided afresh.
                if !matches!(reason, "upstream_failed" | "unclaimed") {
                    let mut answer =
                        reply(Outcome::Released, Some(&prior.order_id), sale.available);
                    answer.reason = Some(reason.to_owned());
                    return answer;
                }
            }
        }
    }
    if now_ms < sale.start_ms {
        let mut answer = reply(Outcome::NotStarted, None, sale.available);
        answer.retry_after_ms = Some(u64::try_from(sale.start_ms - now_ms).unwrap_or(0));
        return answer;
    }
    if now_ms >= sale.end_ms || sale.stopped {
        return reply(Outcome::Ended, None, sale.available);
    }
    if let Some(retry_ms) = sale.pause_retry_ms {
        let mut answer = reply(Outcome::Paused, None, sale.available);
        answer.retry_after_ms = Some(retry_ms);
        return answer;
    }
    let quantity = u64::from(attempt.quantity);
    let holds = held.get(&attempt.user_id).copied().unwrap_or(0);
    if holds >= sale.limit {
        return reply(Outcome::Duplicate, None, sale.available);
    }
    if holds + quantity > sale.limit {
        return reply(Outcome::LimitReached, None, sale.available);
    }
    if sale.available < quantity as i64 {
        return reply(Outcome::SoldOut, None, sale.available);
    }
    sale.seq = next_sequence(sale.seq, sale.shards, &attempt.user_id);
    sale.available -= quantity as i64;
    decided.granted += quantity as i64;
    let order_id = format!("{}.{}.{}", sale.goods_id, sale.epoch, sale.seq);
    *held.entry(attempt.user_id.clone()).or_default() += quantity;
    priors.insert(
        attempt.request_id.clone(),
        Prior {
            user_id: attempt.user_id.clone(),
            quantity: attempt.quantity,
            order_id: order_id.clone(),
            state: OrderState::Reserved,
            reason: None,
            reserved_at_ms: now_ms,
        },
    );
    decided.orders.push(NewOrder {
        order_id: order_id.clone(),
        user_id: attempt.user_id.clone(),
        quantity: attempt.quantity,
        request_id: attempt.request_id.clone(),
    });
    let mut answer = reply(Outcome::Won, Some(&order_id), sale.available);
    answer.expires_at_ms = deadline_ms(now_ms + sale.payment_window_ms);
    answer
}

/// A winner's deadline as the reply carries it (a moment before the epoch is none).
fn deadline_ms(ms: i64) -> Option<u64> {
    u64::try_from(ms).ok().filter(|ms| *ms > 0)
}

/// Whether an order id belongs to the round that starts after `round_epoch` (the orders the
/// sale's counters count).
fn in_round(order_id: &str, round_epoch: u64) -> Option<(u64, u64)> {
    order_parts(order_id).and_then(|(_, epoch, seq)| (epoch > round_epoch).then_some((epoch, seq)))
}

fn ms(t: NaiveDateTime) -> i64 {
    t.and_utc().timestamp_millis()
}

/// Decides a batch of attempts for one goods in one MySQL transaction. Orders delivered
/// through a claim (`claim_window`) wait that long for it. Nothing is decided after
/// `deadline`: the transaction is rolled back and the caller told [`DbDecideError::TooLate`].
pub async fn decide_batch(
    pool: &MySqlPool,
    goods_id: &str,
    attempts: &[DeductRequest],
    claim_window: Option<Duration>,
    deadline: Instant,
) -> Result<Vec<DeductReply>, DbDecideError> {
    let mut tx = pool.begin().await?;
    let row = sqlx::query(
        "SELECT stock, holdback, per_user_limit, starts_at, ends_at, epoch, db_seq, round_epoch,
           tier, mode, shards, pause_retry_s, stopped_at, payment_window_s
         FROM sales WHERE goods_id = ? FOR UPDATE",
    )
    .bind(goods_id)
    .fetch_optional(&mut *tx)
    .await?;
    let Some(row) = row else {
        return Ok(attempts
            .iter()
            .map(|_| DeductReply::new(Outcome::UnknownGoods, None))
            .collect());
    };
    let tier: String = row.try_get("tier")?;
    let mode: String = row.try_get("mode")?;
    let epoch: u64 = row.try_get("epoch")?;
    let decided_here = match Tier::parse(&tier) {
        Some(Tier::Db) => true,
        _ => mode == "fallback",
    };
    if !decided_here {
        return Err(DbDecideError::NotDecidedHere(goods_id.to_owned(), mode));
    }
    if epoch == 0 {
        // Never preheated: unknown to buyers, as a Redis goods before its preheat.
        return Ok(attempts
            .iter()
            .map(|_| DeductReply::new(Outcome::UnknownGoods, None))
            .collect());
    }
    let round_epoch: u64 = row.try_get("round_epoch")?;
    let stock: i64 = row.try_get("stock")?;
    let holdback: i64 = row.try_get("holdback")?;
    let mut sale = SaleView {
        goods_id: goods_id.to_owned(),
        available: (stock - holdback).max(0),
        limit: u64::from(row.try_get::<u32, _>("per_user_limit")?),
        start_ms: ms(row.try_get("starts_at")?),
        end_ms: ms(row.try_get("ends_at")?),
        payment_window_ms: i64::from(row.try_get::<u32, _>("payment_window_s")?) * 1000,
        epoch,
        seq: row.try_get("db_seq")?,
        shards: u32::from(row.try_get::<Option<u8>, _>("shards")?.unwrap_or(1)).max(1),
        pause_retry_ms: row
            .try_get::<Option<u32>, _>("pause_retry_s")?
            .map(|s| u64::from(s) * 1000),
        stopped: row
            .try_get::<Option<NaiveDateTime>, _>("stopped_at")?
            .is_some(),
    };
    let (mut priors, mut held) = read_history(&mut tx, goods_id, attempts, round_epoch).await?;
    // To the ms, as `reserved_at` keeps it: a retry's deadline, read back from the row, is
    // then the very one its first answer carried.
    let now = Utc::now().trunc_subsecs(3);
    let decided = decide(
        &mut sale,
        &mut priors,
        &mut held,
        attempts,
        now.timestamp_millis(),
    );
    if decided.granted > 0 {
        insert_orders(&mut tx, goods_id, &decided.orders, now, claim_window).await?;
        // The row is locked and was read above, so this always matches; the condition keeps
        // the rule in the statement itself: never below the holdback.
        let updated = sqlx::query(
            "UPDATE sales SET stock = stock - ?, reserved = reserved + ?, db_seq = ?
             WHERE goods_id = ? AND stock - holdback >= ?",
        )
        .bind(decided.granted)
        .bind(decided.granted)
        .bind(sale.seq)
        .bind(goods_id)
        .bind(decided.granted)
        .execute(&mut *tx)
        .await?;
        if updated.rows_affected() != 1 {
            return Err(DbDecideError::Mysql(sqlx::Error::Protocol(format!(
                "goods {goods_id}: the stock changed under the sale row's lock"
            ))));
        }
    }
    if Instant::now() >= deadline {
        // Dropping the transaction rolls it back: nobody waits for these answers.
        return Err(DbDecideError::TooLate);
    }
    tx.commit().await?;
    crate::crashpoint::crashpoint(crate::crashpoint::DB_DECIDE_AFTER_COMMIT);
    Ok(decided.replies)
}

/// What the batch's buyers and request ids already have in the round, read in one round
/// trip (the sale row's lock is held meanwhile): the latest order of each request id, and the
/// units each buyer holds (reserved or confirmed), as Redis's requests and users hashes
/// keep them.
async fn read_history(
    tx: &mut sqlx::Transaction<'_, sqlx::MySql>,
    goods_id: &str,
    attempts: &[DeductRequest],
    round_epoch: u64,
) -> sqlx::Result<(HashMap<String, Prior>, HashMap<String, u64>)> {
    let mut latest: HashMap<String, ((u64, u64), Prior)> = HashMap::new();
    let mut held: HashMap<String, u64> = HashMap::new();
    for chunk in attempts.chunks(ROWS_MAX) {
        // `by_` says which list matched; an order can come back twice (its request id and its
        // buyer are both in the batch), once for each map.
        let mut query = QueryBuilder::new(
            "SELECT 'request' AS by_, order_id, user_id, quantity, request_id, state,
               release_reason, reserved_at
             FROM orders WHERE goods_id = ",
        );
        query.push_bind(goods_id).push(" AND request_id IN (");
        let mut list = query.separated(", ");
        for attempt in chunk {
            list.push_bind(&attempt.request_id);
        }
        query.push(
            ") UNION ALL
             SELECT 'user', order_id, user_id, quantity, request_id, state, release_reason,
               reserved_at
             FROM orders WHERE state IN ('reserved', 'confirmed') AND goods_id = ",
        );
        query.push_bind(goods_id).push(" AND user_id IN (");
        let mut list = query.separated(", ");
        for attempt in chunk {
            list.push_bind(&attempt.user_id);
        }
        query.push(")");
        for row in query.build().fetch_all(&mut **tx).await? {
            let order_id: String = row.try_get("order_id")?;
            let Some(rank) = in_round(&order_id, round_epoch) else {
                continue;
            };
            let user_id: String = row.try_get("user_id")?;
            let quantity: u32 = row.try_get("quantity")?;
            let by: String = row.try_get("by_")?;
            if by == "user" {
                *held.entry(user_id).or_default() += u64::from(quantity);
                continue;
            }
            let state: String = row.try_get("state")?;
            let Some(state) = OrderState::parse(&state) else {
                continue;
            };
            let request_id: String = row.try_get("request_id")?;
            let prior = Prior {
                user_id,
                quantity,
                order_id,
                state,
                reason: row.try_get("release_reason")?,
                reserved_at_ms: ms(row.try_get("reserved_at")?),
            };
            match latest.get(&request_id) {
                Some((seen, _)) if *seen >= rank => {}
                _ => {
                    latest.insert(request_id, (rank, prior));
                }
            }
        }
    }
    let priors = latest.into_iter().map(|(k, (_, p))| (k, p)).collect();
    Ok((priors, held))
}

async fn insert_orders(
    tx: &mut sqlx::Transaction<'_, sqlx::MySql>,
    goods_id: &str,
    orders: &[NewOrder],
    now: DateTime<Utc>,
    claim_window: Option<Duration>,
) -> sqlx::Result<()> {
    let claim_by = claim_window
        .and_then(|w| chrono::Duration::from_std(w).ok())
        .map(|w| (now + w).naive_utc());
    for chunk in orders.chunks(ROWS_MAX) {
        let mut query = QueryBuilder::new(
            "INSERT INTO orders (order_id, goods_id, user_id, quantity, request_id, state,
               reserved_at, claim_by) ",
        );
        query.push_values(chunk, |mut row, order| {
            row.push_bind(&order.order_id)
                .push_bind(goods_id)
                .push_bind(&order.user_id)
                .push_bind(order.quantity)
                .push_bind(&order.request_id)
                .push_bind(OrderState::Reserved.as_str())
                .push_bind(now.naive_utc())
                .push_bind(claim_by);
        });
        query.build().execute(&mut **tx).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sale(available: i64, limit: u64) -> SaleView {
        SaleView {
            goods_id: "g".into(),
            available,
            limit,
            start_ms: 1_000,
            end_ms: 10_000,
            payment_window_ms: 900_000,
            epoch: 7,
            seq: 0,
            shards: 1,
            pause_retry_ms: None,
            stopped: false,
        }
    }

    fn attempt(user: &str, quantity: u32, request: &str) -> DeductRequest {
        DeductRequest {
            goods_id: "g".into(),
            user_id: user.into(),
            quantity,
            request_id: request.into(),
        }
    }

    fn outcomes(decided: &Decided) -> Vec<(Outcome, Option<String>)> {
        decided
            .replies
            .iter()
            .map(|r| (r.outcome, r.order_id.clone()))
            .collect()
    }

    #[test]
    fn a_batch_is_decided_in_order_with_the_scripts_rules() {
        let mut s = sale(3, 1);
        let (mut priors, mut held) = (HashMap::new(), HashMap::new());
        let attempts = [
            attempt("a", 1, "ra"),
            attempt("a", 1, "ra"),  // a retry in the same batch: the same order
            attempt("a", 1, "ra2"), // a second unit past the limit
            attempt("b", 2, "rb"),  // over the limit of 1
            attempt("z", 1, "ra"),  // another buyer with a's request id
            attempt("c", 1, "rc"),
            attempt("d", 1, "rd"),
            attempt("e", 1, "re"), // sold out
        ];
        let decided = decide(&mut s, &mut priors, &mut held, &attempts, 5_000);
        assert_eq!(
            outcomes(&decided),
            vec![
                (Outcome::Won, Some("g.7.1".into())),
                (Outcome::Won, Some("g.7.1".into())),
                (Outcome::Duplicate, None),
                (Outcome::LimitReached, None),
                (Outcome::RequestIdConflict, None),
                (Outcome::Won, Some("g.7.2".into())),
                (Outcome::Won, Some("g.7.3".into())),
                (Outcome::SoldOut, None),
            ]
        );
        assert_eq!(decided.granted, 3);
        assert_eq!(decided.orders.len(), 3);
        assert_eq!((s.available, s.seq), (0, 3));
        assert_eq!(decided.replies[7].remaining, Some(0));
        // A winner's deadline is its payment window from when it was made, repeats included;
        // nobody else has one.
        let deadlines: Vec<_> = decided.replies.iter().map(|r| r.expires_at_ms).collect();
        let due = Some(5_000 + 900_000);
        assert_eq!(deadlines, vec![due, due, None, None, None, due, due, None]);
    }

    #[test]
    fn the_window_is_checked_after_idempotency() {
        let mut s = sale(5, 1);
        let mut priors = HashMap::from([(
            "old".to_owned(),
            Prior {
                user_id: "a".into(),
                quantity: 1,
                order_id: "g.6.4".into(),
                state: OrderState::Confirmed,
                reason: None,
                reserved_at_ms: 1_500,
            },
        )]);
        let mut held = HashMap::new();
        let early = decide(&mut s, &mut priors, &mut held, &[attempt("b", 1, "x")], 400);
        assert_eq!(early.replies[0].outcome, Outcome::NotStarted);
        assert_eq!(early.replies[0].retry_after_ms, Some(600));
        let late = decide(
            &mut s,
            &mut priors,
            &mut held,
            &[attempt("b", 1, "x"), attempt("a", 1, "old")],
            10_000,
        );
        assert_eq!(
            outcomes(&late),
            vec![
                (Outcome::Ended, None),
                (Outcome::Confirmed, Some("g.6.4".into()))
            ]
        );
    }

    #[test]
    fn a_released_order_answers_released_unless_it_was_never_delivered() {
        let released = |reason: &str| Prior {
            user_id: "a".into(),
            quantity: 1,
            order_id: "g.7.9".into(),
            state: OrderState::Released,
            reason: Some(reason.into()),
            reserved_at_ms: 1_500,
        };
        for (reason, fresh) in [
            ("cancelled", false),
            ("expired", false),
            ("upstream_failed", true),
            ("unclaimed", true),
        ] {
            let mut s = sale(5, 1);
            s.seq = 9;
            let mut priors = HashMap::from([("r".to_owned(), released(reason))]);
            let decided = decide(
                &mut s,
                &mut priors,
                &mut HashMap::new(),
                &[attempt("a", 1, "r")],
                5_000,
            );
            let answer = &decided.replies[0];
            if fresh {
                assert_eq!(
                    (answer.outcome, answer.order_id.as_deref()),
                    (Outcome::Won, Some("g.7.10"))
                );
            } else {
                assert_eq!(answer.outcome, Outcome::Released);
                assert_eq!(answer.reason.as_deref(), Some(reason));
            }
        }
    }

    #[test]
    fn a_paused_sale_decides_nothing_and_a_stopped_one_has_ended() {
        let mut s = sale(5, 1);
        s.pause_retry_ms = Some(7_000);
        let mut priors = HashMap::from([(
            "won-before".to_owned(),
            Prior {
                user_id: "a".into(),
                quantity: 1,
                order_id: "g.7.1".into(),
                state: OrderState::Reserved,
                reason: None,
                reserved_at_ms: 1_500,
            },
        )]);
        let attempts = [attempt("a", 1, "won-before"), attempt("b", 1, "rb")];
        let decided = decide(&mut s, &mut priors, &mut HashMap::new(), &attempts, 5_000);
        // A winner's retry still gets its order; a new attempt is told to come back.
        assert_eq!(
            outcomes(&decided),
            vec![
                (Outcome::Won, Some("g.7.1".into())),
                (Outcome::Paused, None)
            ]
        );
        assert_eq!(decided.replies[1].retry_after_ms, Some(7_000));
        // The retry's deadline is the one its order was made with.
        assert_eq!(decided.replies[0].expires_at_ms, Some(1_500 + 900_000));
        assert_eq!((decided.granted, s.available, s.seq), (0, 5, 0));
        // Ended comes first: a stopped sale says so, paused or not, before its end_ms.
        s.stopped = true;
        let decided = decide(
            &mut s,
            &mut priors,
            &mut HashMap::new(),
            &attempts[1..],
            5_000,
        );
        assert_eq!(outcomes(&decided), vec![(Outcome::Ended, None)]);
    }

    #[test]
    fn held_units_count_against_the_limit() {
        let mut s = sale(10, 3);
        let mut held = HashMap::from([("a".to_owned(), 2)]);
        let decided = decide(
            &mut s,
            &mut HashMap::new(),
            &mut held,
            &[
                attempt("a", 2, "r1"),
                attempt("a", 1, "r2"),
                attempt("a", 1, "r3"),
            ],
            5_000,
        );
        assert_eq!(
            decided
                .replies
                .iter()
                .map(|r| r.outcome)
                .collect::<Vec<_>>(),
            vec![Outcome::LimitReached, Outcome::Won, Outcome::Duplicate]
        );
    }

    #[test]
    fn only_the_rounds_orders_count() {
        assert_eq!(in_round("g.3.5", 2), Some((3, 5)));
        assert_eq!(in_round("g.2.5", 2), None);
        assert_eq!(in_round("junk", 0), None);
    }

    #[test]
    fn a_sharded_goods_sequences_name_each_buyers_home_shard() {
        let mut s = sale(100, 1);
        s.shards = 3;
        let (mut priors, mut held) = (HashMap::new(), HashMap::new());
        let attempts: Vec<_> = (0..30)
            .map(|i| attempt(&format!("u{i}"), 1, &format!("r{i}")))
            .collect();
        let decided = decide(&mut s, &mut priors, &mut held, &attempts, 5_000);
        let mut last = 0;
        for (a, order) in attempts.iter().zip(&decided.orders) {
            let (_, _, seq) = order_parts(&order.order_id).unwrap();
            assert!(seq > last, "{seq} after {last}: sequences only grow");
            assert!(seq - last <= 3, "at most two skipped");
            assert_eq!(
                crate::keys::shard_of_sequence(seq, 3),
                crate::keys::home_shard(&a.user_id, 3),
                "{}",
                order.order_id
            );
            last = seq;
        }
        assert_eq!(s.seq, last);
    }
}
