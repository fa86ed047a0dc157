//! The answers this syncer gave, counted per goods for the dashboard.
//!
//! The Prometheus counters are global per outcome; a sale's page needs them per goods. The
//! deduct path counts here with one read lock and one atomic add. The map is bounded: a goods
//! enters on its first real answer (not `unknown_goods`, not a refused request, so ids a
//! client makes up cannot fill it) while there is room, and the sampler keeps only the goods
//! it lists; everything else lands in one `unlisted` bucket, so the totals still add up.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use seckill_api::Outcome;
use serde::Serialize;

use crate::deduct::DeductError;

/// What the page groups answers into: the outcomes an operator watches one by one, and the
/// rest together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    Won,
    SoldOut,
    Duplicate,
    /// Over the per-user limit.
    Limit,
    /// Told to come back later: the fleet-wide rate, the MySQL fallback's rate, a full queue.
    RateLimited,
    /// Decided otherwise: not started, ended, unknown goods, a reused request id, an order
    /// already released or confirmed.
    Other,
    /// Not decided: bad input, a store fault, a timeout, a goods switching stores.
    Error,
}

impl Answer {
    pub const ALL: [Answer; 7] = [
        Answer::Won,
        Answer::SoldOut,
        Answer::Duplicate,
        Answer::Limit,
        Answer::RateLimited,
        Answer::Other,
        Answer::Error,
    ];

    fn index(self) -> usize {
        self as usize
    }

    pub fn of(result: &Result<seckill_api::DeductReply, DeductError>) -> Answer {
        match result {
            Ok(reply) => match reply.outcome {
                Outcome::Won => Answer::Won,
                Outcome::SoldOut => Answer::SoldOut,
                Outcome::Duplicate => Answer::Duplicate,
                Outcome::LimitReached => Answer::Limit,
                Outcome::FleetRateLimited => Answer::RateLimited,
                Outcome::NotStarted
                | Outcome::Paused
                | Outcome::Ended
                | Outcome::UnknownGoods
                | Outcome::RequestIdConflict
                | Outcome::Released
                | Outcome::Confirmed => Answer::Other,
            },
            Err(DeductError::FallbackOverloaded | DeductError::Overloaded) => Answer::RateLimited,
            Err(_) => Answer::Error,
        }
    }

    /// Whether the answer shows the goods has a sale (so it may take a place in the tally).
    fn names_a_sale(result: &Result<seckill_api::DeductReply, DeductError>) -> bool {
        match result {
            Ok(reply) => reply.outcome != Outcome::UnknownGoods,
            Err(_) => false,
        }
    }
}

/// One figure per [`Answer`], serialized under the answer's name.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct PerAnswer<T> {
    pub won: T,
    pub sold_out: T,
    pub duplicate: T,
    pub limit: T,
    pub rate_limited: T,
    pub other: T,
    pub error: T,
}

impl<T: Copy> PerAnswer<T> {
    pub fn from_fn(mut f: impl FnMut(Answer) -> T) -> Self {
        PerAnswer {
            won: f(Answer::Won),
            sold_out: f(Answer::SoldOut),
            duplicate: f(Answer::Duplicate),
            limit: f(Answer::Limit),
            rate_limited: f(Answer::RateLimited),
            other: f(Answer::Other),
            error: f(Answer::Error),
        }
    }

    pub fn get(&self, answer: Answer) -> T {
        match answer {
            Answer::Won => self.won,
            Answer::SoldOut => self.sold_out,
            Answer::Duplicate => self.duplicate,
            Answer::Limit => self.limit,
            Answer::RateLimited => self.rate_limited,
            Answer::Other => self.other,
            Answer::Error => self.error,
        }
    }
}

/// Running totals of one goods (or of the unlisted bucket).
#[derive(Debug, Default)]
pub struct Counts([AtomicU64; Answer::ALL.len()]);

impl Counts {
    pub fn add(&self, answer: Answer) {
        self.0[answer.index()].fetch_add(1, Ordering::Relaxed);
    }

    pub fn totals(&self) -> PerAnswer<u64> {
        PerAnswer::from_fn(|a| self.0[a.index()].load(Ordering::Relaxed))
    }
}

pub struct Tally {
    goods_max: usize,
    goods: RwLock<HashMap<String, Arc<Counts>>>,
    unlisted: Counts,
}

impl Tally {
    pub fn new(goods_max: usize) -> Self {
        Tally {
            goods_max,
            goods: RwLock::new(HashMap::new()),
            unlisted: Counts::default(),
        }
    }

    /// The goods' counts, if it has a place (looked up before the attempt, so the deduct
    /// path copies no goods id for a goods already counted).
    pub fn get(&self, goods_id: &str) -> Option<Arc<Counts>> {
        self.goods.read().ok()?.get(goods_id).cloned()
    }

    /// Counts the answer to an attempt on a goods that had no place when it started.
    pub fn add_first(
        &self,
        goods_id: String,
        result: &Result<seckill_api::DeductReply, DeductError>,
    ) {
        let answer = Answer::of(result);
        if Answer::names_a_sale(result) {
            if let Ok(mut goods) = self.goods.write() {
                let room = goods.len() < self.goods_max;
                if let Some(counts) = goods.get(&goods_id) {
                    return counts.add(answer);
                }
                if room {
                    let counts = Arc::new(Counts::default());
                    counts.add(answer);
                    goods.insert(goods_id, counts);
                    return;
                }
            }
        }
        self.unlisted.add(answer);
    }

    /// Keeps places for exactly `listed` (at most `goods_max` of them): a goods that left the
    /// list forgets its counts, a listed goods gets a place even before its first answer.
    pub fn keep_only(&self, listed: &[String]) {
        let Ok(mut goods) = self.goods.write() else {
            return;
        };
        goods.retain(|id, _| listed.contains(id));
        for id in listed.iter().take(self.goods_max) {
            if goods.len() >= self.goods_max {
                break;
            }
            goods.entry(id.clone()).or_default();
        }
    }

    pub fn totals(&self, goods_id: &str) -> PerAnswer<u64> {
        self.get(goods_id)
            .map(|counts| counts.totals())
            .unwrap_or_default()
    }

    pub fn unlisted(&self) -> PerAnswer<u64> {
        self.unlisted.totals()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use seckill_api::DeductReply;

    fn reply(outcome: Outcome) -> Result<DeductReply, DeductError> {
        Ok(DeductReply::new(outcome, None))
    }

    #[test]
    fn answers_count_per_goods_and_unknown_goods_take_no_place() {
        let tally = Tally::new(2);
        tally.add_first("a".into(), &reply(Outcome::Won));
        tally.get("a").unwrap().add(Answer::SoldOut);
        tally.add_first("made-up".into(), &reply(Outcome::UnknownGoods));
        tally.add_first("broken".into(), &Err(DeductError::Timeout));
        assert_eq!(tally.totals("a").won, 1);
        assert_eq!(tally.totals("a").sold_out, 1);
        assert!(tally.get("made-up").is_none() && tally.get("broken").is_none());
        let unlisted = tally.unlisted();
        assert_eq!((unlisted.other, unlisted.error), (1, 1));
    }

    #[test]
    fn the_tally_is_bounded_and_follows_the_list() {
        let tally = Tally::new(2);
        for goods in ["a", "b", "c"] {
            tally.add_first(goods.into(), &reply(Outcome::Won));
        }
        assert!(tally.get("c").is_none(), "no room for a third goods");
        assert_eq!(tally.unlisted().won, 1);
        tally.keep_only(&["b".into(), "c".into(), "d".into()]);
        assert!(tally.get("a").is_none());
        assert_eq!(tally.totals("b").won, 1);
        assert_eq!(
            tally.totals("c").won,
            0,
            "listed: a place before its first answer"
        );
        assert!(tally.get("d").is_none(), "still at most two goods");
    }

    #[test]
    fn load_shedding_is_rate_limited_and_faults_are_errors() {
        assert_eq!(
            Answer::of(&Err(DeductError::FallbackOverloaded)),
            Answer::RateLimited
        );
        assert_eq!(
            Answer::of(&reply(Outcome::FleetRateLimited)),
            Answer::RateLimited
        );
        assert_eq!(Answer::of(&reply(Outcome::LimitReached)), Answer::Limit);
        assert_eq!(Answer::of(&Err(DeductError::Switching)), Answer::Error);
    }
}
