//! Shared-data helpers: the per-goods rate limit and the sold-out cache, kept in Envoy's
//! shared data so every worker thread of one Envoy instance sees the same state, and
//! [`admit`], which puts them together with the worker's own memory ([`LocalMemory`]).
//!
//! The logic is written against [`SharedStore`] so the compare-and-swap loops unit-test
//! natively with a fake store; the real one is the host's shared data (`host::abi::RealHost`).
//!
//! Keys (scoped by Envoy to the filter's `vm_id`):
//! - `seckill.rl.<goods>`: GCRA state, one u64 TAT (ns, little-endian).
//! - `seckill.rl.~overflow`: the bucket shared by goods the stock service has not confirmed
//!   (and by confirmed goods past the tracking limit).
//! - `seckill.rl.tracked`: u64 count of confirmed goods with their own bucket.
//! - `seckill.soldout.<goods>`: u64 expiry (ns since the epoch) of a sold-out answer.
//!
//! The sold-out mark has a key of its own rather than sharing a record with the bucket: a
//! goods that is not sold out then costs a shared-data *miss* (cheap: the host copies nothing
//! into the VM), and a worker may answer a refused bucket from its memory without missing a
//! mark another worker just wrote (see `local.rs`).
//!
//! Shared data never expires, so nothing a client can name gets a key: own buckets exist only
//! for configured goods and goods the stock service confirmed (bounded by
//! `tracked_goods_max`); sold-out entries only for goods the stock service called sold out or
//! ended, which are real goods.

use crate::config::RateLimits;
use crate::gcra::{self, Decision, Rate};
use crate::host::{Seen, SetError, SharedStore};
use crate::local::LocalMemory;

/// Most compare-and-swap attempts per update. Contention on one key is between worker
/// threads only; sixteen lost races in a row means the goods is hot enough that refusing is
/// the right answer.
pub const CAS_ATTEMPTS_MAX: usize = 16;

const RATE_LIMIT_PREFIX: &str = "seckill.rl.";
/// `~` cannot appear in a goods id (see `seckill_api::validate_id`), so no goods collides.
pub const OVERFLOW_KEY: &str = "seckill.rl.~overflow";
/// Count of goods with their own bucket. A goods literally named `tracked` would share this
/// key, so [`rate_limit_key`] moves that one elsewhere.
pub const TRACKED_KEY: &str = "seckill.rl.tracked";
const SOLD_OUT_PREFIX: &str = "seckill.soldout.";

/// A read whose refusal counts as absence. Envoy only answers a read with the value or
/// "not found"; should it ever refuse one, acting as for a key nobody wrote (a fresh bucket,
/// no sold-out mark) costs at most a burst or a callout, where trapping would fail every
/// request of the worker.
fn read(store: &impl SharedStore, key: &str) -> Seen {
    store.get(key).unwrap_or((None, None))
}

/// Key of a goods' own bucket. Goods ids are validated (`A-Z a-z 0-9 _ - . :`) before they
/// get here.
pub fn rate_limit_key(goods_id: &str) -> String {
    // The goods `tracked` would collide with the counter: give it a key no other id can have.
    if goods_id == "tracked" {
        return format!("{RATE_LIMIT_PREFIX}~goods.tracked");
    }
    format!("{RATE_LIMIT_PREFIX}{goods_id}")
}

pub fn sold_out_key(goods_id: &str) -> String {
    format!("{SOLD_OUT_PREFIX}{goods_id}")
}

/// What the rate limiter says about one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RateLimited {
    Allowed,
    /// Over the rate; retry after this long.
    Limited {
        retry_after_ns: u64,
    },
    /// Lost the compare-and-swap race [`CAS_ATTEMPTS_MAX`] times; refuse like `Limited`.
    Contended {
        retry_after_ns: u64,
    },
}

/// Which bucket answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bucket {
    /// The goods' own (configured or tracked).
    Own,
    /// The one all unconfirmed goods (and those past the tracking limit) share.
    Overflow,
}

/// What the gate should do with a valid sale request before asking the stock service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// The stock service said a moment ago that it sells no such goods (this worker's
    /// memory): 404.
    UnknownGoods,
    /// A fresh sold-out mark (from this worker's memory or from shared data): 409.
    SoldOut,
    /// No fresh mark (or marks not asked for): the rate limiter's answer.
    Rate(RateLimited),
    /// Allowed through the unconfirmed bucket: the goods has no bucket of its own yet, and
    /// the stock service's answer may confirm it (see [`confirm_goods`]).
    Probe,
}

/// The gate's steps 4 and 5 for one request, in that order: the unknown-goods and sold-out
/// caches (the latter when `check_sold_out`), then the goods' rate limit. The worker's `memory` answers first where
/// it holds; every answer it gives is the one shared data would give (see `local.rs`). What
/// shared data says is remembered: fresh marks, and refusals of a goods' own bucket.
pub fn admit(
    store: &impl SharedStore,
    memory: &mut LocalMemory,
    limits: &RateLimits,
    goods_id: &str,
    now_ns: u64,
    check_sold_out: bool,
) -> Admission {
    if memory.unknown(goods_id, now_ns) {
        return Admission::UnknownGoods;
    }
    if check_sold_out {
        if memory.sold_out(goods_id, now_ns) {
            return Admission::SoldOut;
        }
        if let Some(until_ns) = sold_out_until(store, goods_id, now_ns) {
            memory.remember_sold_out(goods_id, until_ns, now_ns);
            return Admission::SoldOut;
        }
    }
    if let Some(retry_after_ns) = memory.denied(goods_id, now_ns) {
        return Admission::Rate(RateLimited::Limited { retry_after_ns });
    }
    let (answer, bucket) = check_rate_limit(store, limits, goods_id, now_ns);
    if let (RateLimited::Allowed, Bucket::Overflow) = (answer, bucket) {
        return Admission::Probe;
    }
    // A refusal of the goods' own bucket holds until the retry moment (nobody can take a
    // token before then). The overflow bucket's are not kept: its goods ids are whatever
    // clients send.
    if let (RateLimited::Limited { retry_after_ns }, Bucket::Own) = (answer, bucket) {
        memory.remember_denial(goods_id, retry_after_ns, now_ns);
    }
    Admission::Rate(answer)
}

/// Marks the goods sold out until `until_ns`, for every worker (shared data) and in this
/// worker's memory.
pub fn mark_sold_out(
    store: &impl SharedStore,
    memory: &mut LocalMemory,
    goods_id: &str,
    until_ns: u64,
    now_ns: u64,
) {
    cache_sold_out(store, goods_id, until_ns);
    memory.remember_sold_out(goods_id, until_ns, now_ns);
}

/// Spends one token of the goods' bucket; says which bucket answered.
pub fn check_rate_limit(
    store: &impl SharedStore,
    limits: &RateLimits,
    goods_id: &str,
    now_ns: u64,
) -> (RateLimited, Bucket) {
    // Configured goods always have their own bucket; other goods once the stock service has
    // confirmed they exist (see `confirm_goods`); the rest share the unconfirmed bucket. One
    // read of the goods' key serves both as "is it confirmed?" and as the first
    // compare-and-swap attempt.
    let key = rate_limit_key(goods_id);
    let seen = read(store, &key);
    if let Some(rate) = limits.goods.get(goods_id) {
        return (
            take_token_seen(store, &key, *rate, now_ns, seen),
            Bucket::Own,
        );
    }
    if seen.0.is_some() {
        let answer = take_token_seen(store, &key, limits.default, now_ns, seen);
        return (answer, Bucket::Own);
    }
    let answer = take_token(store, OVERFLOW_KEY, limits.unconfirmed, now_ns);
    (answer, Bucket::Overflow)
}

/// The stock service answered for this goods as a goods it sells (anything but
/// `unknown_goods`): from now on it has a bucket of its own, while fewer than
/// `tracked_goods_max` goods have one. Goods ids that nobody sells never get here, so a
/// client inventing ids cannot use up the slots of real goods.
pub fn confirm_goods(store: &impl SharedStore, limits: &RateLimits, goods_id: &str) {
    if limits.goods.contains_key(goods_id) {
        return;
    }
    let key = rate_limit_key(goods_id);
    if read(store, &key).0.is_some() || !reserve_tracking_slot(store, limits.tracked_goods_max) {
        return;
    }
    // A fresh bucket (TAT 0: a full burst). Two workers confirming the same goods at once
    // may both write it, costing at most one more burst, once.
    let _ = store.set(&key, &gcra::encode(0), None);
}

/// Counts one more tracked goods if the limit allows. Two threads confirming a new goods at
/// the same moment may both count it: the count then overstates, which only errs towards the
/// unconfirmed bucket, never past the memory bound.
fn reserve_tracking_slot(store: &impl SharedStore, tracked_goods_max: u64) -> bool {
    for _ in 0..CAS_ATTEMPTS_MAX {
        let (value, cas) = read(store, TRACKED_KEY);
        let tracked = value.as_deref().and_then(gcra::decode).unwrap_or(0);
        if tracked >= tracked_goods_max {
            return false;
        }
        match store.set(TRACKED_KEY, &gcra::encode(tracked + 1), cas) {
            Ok(()) => return true,
            Err(SetError::CasMismatch) => continue,
            Err(SetError::Failed) => return false,
        }
    }
    false
}

/// One GCRA step on `key` with compare-and-swap, deciding inside the loop: a denial writes
/// nothing and returns at once.
pub fn take_token(store: &impl SharedStore, key: &str, rate: Rate, now_ns: u64) -> RateLimited {
    let seen = read(store, key);
    take_token_seen(store, key, rate, now_ns, seen)
}

/// [`take_token`] whose first attempt uses a read the caller already made.
fn take_token_seen(
    store: &impl SharedStore,
    key: &str,
    rate: Rate,
    now_ns: u64,
    seen: Seen,
) -> RateLimited {
    let mut first = Some(seen);
    for _ in 0..CAS_ATTEMPTS_MAX {
        let (value, cas) = first.take().unwrap_or_else(|| read(store, key));
        // A value of the wrong size is not ours to trust: start the bucket afresh.
        let tat = value.as_deref().and_then(gcra::decode);
        match gcra::decide(tat, now_ns, rate) {
            Decision::Deny { retry_after_ns } => return RateLimited::Limited { retry_after_ns },
            Decision::Allow { tat_ns } => match store.set(key, &gcra::encode(tat_ns), cas) {
                Ok(()) => return RateLimited::Allowed,
                Err(SetError::CasMismatch) => continue,
                Err(SetError::Failed) => break,
            },
        }
    }
    RateLimited::Contended {
        retry_after_ns: rate.interval_ns(),
    }
}

/// The expiry of a fresh sold-out answer cached for the goods, if any.
pub fn sold_out_until(store: &impl SharedStore, goods_id: &str, now_ns: u64) -> Option<u64> {
    let (value, _) = read(store, &sold_out_key(goods_id));
    value
        .as_deref()
        .and_then(gcra::decode)
        .filter(|until_ns| now_ns < *until_ns)
}

/// Caches a sold-out answer until `expiry_ns`. A plain write: the last writer wins, and every
/// writer writes "sold out until about now + ttl", so no compare-and-swap is needed.
pub fn cache_sold_out(store: &impl SharedStore, goods_id: &str, expiry_ns: u64) {
    // Losing this write costs one more callout, nothing else.
    let _ = store.set(&sold_out_key(goods_id), &gcra::encode(expiry_ns), None);
}

/// Key of the count of root contexts that took a batch wake-up queue (see `batch.rs`).
pub const WORKER_SEQ_KEY: &str = "seckill.batch.workers";

/// A number no other root context of this Envoy has taken, so each worker's wake-up queue
/// gets a name of its own (Envoy hands a queue name registered twice to the last
/// registrant, which would wake the wrong worker). `None` if the counter cannot be claimed
/// within [`CAS_ATTEMPTS_MAX`] races.
pub fn claim_worker_number(store: &impl SharedStore) -> Option<u64> {
    for _ in 0..CAS_ATTEMPTS_MAX {
        let (value, cas) = read(store, WORKER_SEQ_KEY);
        let taken = value.as_deref().and_then(gcra::decode).unwrap_or(0);
        let mine = taken.checked_add(1)?;
        match store.set(WORKER_SEQ_KEY, &gcra::encode(mine), cas) {
            Ok(()) => return Some(mine),
            Err(SetError::CasMismatch) => continue,
            Err(SetError::Failed) => return None,
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::HostStatus;
    use std::cell::{Cell, RefCell};
    use std::collections::HashMap;

    const SECOND: u64 = 1_000_000_000;
    const T0: u64 = 1_700_000_000 * SECOND;

    /// In-memory shared data with Envoy's CAS semantics (a write with a stale token fails; a
    /// token of 0/None always writes), plus a knob to lose the next N races and counters of
    /// reads and successful writes.
    #[derive(Default)]
    struct FakeStore {
        data: RefCell<HashMap<String, (Vec<u8>, u32)>>,
        next_cas: Cell<u32>,
        lose_races: Cell<usize>,
        reads: Cell<usize>,
        writes: Cell<usize>,
    }

    impl SharedStore for FakeStore {
        fn get(&self, key: &str) -> Result<Seen, HostStatus> {
            self.reads.set(self.reads.get() + 1);
            Ok(match self.data.borrow().get(key) {
                Some((value, cas)) => (Some(value.clone()), Some(*cas)),
                None => (None, None),
            })
        }

        fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), SetError> {
            if self.lose_races.get() > 0 {
                self.lose_races.set(self.lose_races.get() - 1);
                // Someone else wrote meanwhile.
                let cas_now = self.next_cas.get() + 1;
                self.next_cas.set(cas_now);
                let mut data = self.data.borrow_mut();
                let entry = data.entry(key.to_string()).or_insert((value.to_vec(), 0));
                entry.1 = cas_now;
                return Err(SetError::CasMismatch);
            }
            let mut data = self.data.borrow_mut();
            if let (Some(cas), Some((_, current))) = (cas, data.get(key)) {
                if cas != *current {
                    return Err(SetError::CasMismatch);
                }
            }
            let cas_now = self.next_cas.get() + 1;
            self.next_cas.set(cas_now);
            data.insert(key.to_string(), (value.to_vec(), cas_now));
            self.writes.set(self.writes.get() + 1);
            Ok(())
        }
    }

    fn limits(tracked_goods_max: u64) -> RateLimits {
        let mut goods = HashMap::new();
        goods.insert("vip".to_string(), Rate::new(1.0, 3).unwrap());
        RateLimits {
            default: Rate::new(1.0, 2).unwrap(),
            goods,
            unconfirmed: Rate::new(1.0, 2).unwrap(),
            tracked_goods_max,
        }
    }

    fn allowed(store: &FakeStore, limits: &RateLimits, goods: &str, now: u64) -> bool {
        match check_rate_limit(store, limits, goods, now).0 {
            RateLimited::Allowed => true,
            RateLimited::Limited { .. } => false,
            RateLimited::Contended { .. } => panic!("unexpected contention"),
        }
    }

    fn tracked(store: &FakeStore) -> Option<u64> {
        read(store, TRACKED_KEY).0.as_deref().and_then(gcra::decode)
    }

    #[test]
    fn each_goods_has_its_own_budget() {
        let store = FakeStore::default();
        let limits = limits(10);
        for goods in ["a", "b", "vip"] {
            confirm_goods(&store, &limits, goods);
        }
        assert!(allowed(&store, &limits, "a", T0));
        assert!(allowed(&store, &limits, "a", T0));
        assert!(!allowed(&store, &limits, "a", T0));
        assert!(allowed(&store, &limits, "b", T0));
        // The configured goods has burst 3.
        for _ in 0..3 {
            assert!(allowed(&store, &limits, "vip", T0));
        }
        assert!(!allowed(&store, &limits, "vip", T0));
        assert_eq!(
            check_rate_limit(&store, &limits, "a", T0),
            (
                RateLimited::Limited {
                    retry_after_ns: SECOND
                },
                Bucket::Own
            )
        );
        // Configured goods do not count as tracked.
        assert_eq!(tracked(&store), Some(2));
    }

    #[test]
    fn a_known_goods_costs_one_read() {
        let store = FakeStore::default();
        let limits = limits(10);
        confirm_goods(&store, &limits, "a");
        for goods in ["a", "vip"] {
            assert!(allowed(&store, &limits, goods, T0));
            for _ in 0..4 {
                let reads = store.reads.get();
                let _ = check_rate_limit(&store, &limits, goods, T0);
                assert_eq!(store.reads.get(), reads + 1, "{goods}");
            }
        }
    }

    #[test]
    fn unconfirmed_goods_share_one_bucket_and_never_take_a_slot() {
        let store = FakeStore::default();
        let limits = limits(2);
        // A client inventing goods ids: all of them share the unconfirmed bucket (burst 2),
        // however many, and none gets a key of its own or a tracking slot.
        assert!(allowed(&store, &limits, "junk-1", T0));
        assert!(allowed(&store, &limits, "junk-2", T0));
        for i in 3..1_000 {
            assert_eq!(
                check_rate_limit(&store, &limits, &format!("junk-{i}"), T0).1,
                Bucket::Overflow
            );
            assert!(!allowed(&store, &limits, &format!("junk-{i}"), T0));
        }
        assert_eq!(tracked(&store), None);
        assert!(read(&store, &rate_limit_key("junk-1")).0.is_none());
        // A configured goods keeps its own budget all through.
        for _ in 0..3 {
            assert!(allowed(&store, &limits, "vip", T0));
        }
        // Confirmed goods get their own bucket, up to the tracking limit.
        for goods in ["a", "b", "c"] {
            confirm_goods(&store, &limits, goods);
        }
        assert_eq!(tracked(&store), Some(2));
        assert!(allowed(&store, &limits, "a", T0));
        assert!(allowed(&store, &limits, "b", T0));
        assert_eq!(check_rate_limit(&store, &limits, "a", T0).1, Bucket::Own);
        assert_eq!(
            check_rate_limit(&store, &limits, "c", T0),
            (
                RateLimited::Limited {
                    retry_after_ns: SECOND
                },
                Bucket::Overflow
            )
        );
        // Confirming again changes nothing; configured goods take no slot.
        confirm_goods(&store, &limits, "a");
        confirm_goods(&store, &limits, "vip");
        assert_eq!(tracked(&store), Some(2));
    }

    #[test]
    fn an_unknown_goods_answer_is_remembered_by_the_worker() {
        let store = FakeStore::default();
        let limits = limits(10);
        let mut memory = LocalMemory::default();
        memory.remember_unknown("junk", T0 + SECOND, T0);
        let reads = store.reads.get();
        assert_eq!(
            admit(&store, &mut memory, &limits, "junk", T0, true),
            Admission::UnknownGoods
        );
        assert_eq!(store.reads.get(), reads, "answered without shared data");
        // Then the syncer is asked again, through the unconfirmed bucket.
        assert_eq!(
            admit(&store, &mut memory, &limits, "junk", T0 + SECOND, true),
            Admission::Probe
        );
    }

    #[test]
    fn lost_races_are_retried_then_refused() {
        let store = FakeStore::default();
        let rate = Rate::new(1.0, 100).unwrap();
        store.lose_races.set(CAS_ATTEMPTS_MAX - 1);
        assert_eq!(take_token(&store, "k", rate, T0), RateLimited::Allowed);
        store.lose_races.set(CAS_ATTEMPTS_MAX);
        assert_eq!(
            take_token(&store, "k", rate, T0),
            RateLimited::Contended {
                retry_after_ns: SECOND
            }
        );
    }

    #[test]
    fn denial_writes_nothing() {
        let store = FakeStore::default();
        let rate = Rate::new(1.0, 1).unwrap();
        assert_eq!(take_token(&store, "k", rate, T0), RateLimited::Allowed);
        let writes = store.writes.get();
        assert!(matches!(
            take_token(&store, "k", rate, T0),
            RateLimited::Limited { .. }
        ));
        assert_eq!(store.writes.get(), writes);
    }

    #[test]
    fn garbage_state_restarts_the_bucket() {
        let store = FakeStore::default();
        store.set("k", b"junk", None).unwrap();
        let rate = Rate::new(1.0, 1).unwrap();
        assert_eq!(take_token(&store, "k", rate, T0), RateLimited::Allowed);
    }

    #[test]
    fn sold_out_cache_expires() {
        let store = FakeStore::default();
        assert_eq!(sold_out_until(&store, "a", T0), None);
        cache_sold_out(&store, "a", T0 + SECOND);
        assert_eq!(sold_out_until(&store, "a", T0), Some(T0 + SECOND));
        assert_eq!(
            sold_out_until(&store, "a", T0 + SECOND - 1),
            Some(T0 + SECOND)
        );
        assert_eq!(sold_out_until(&store, "a", T0 + SECOND), None);
        assert_eq!(sold_out_until(&store, "b", T0), None);
    }

    #[test]
    fn keys() {
        assert_eq!(rate_limit_key("sku-1"), "seckill.rl.sku-1");
        assert_ne!(rate_limit_key("tracked"), TRACKED_KEY);
        assert_eq!(sold_out_key("sku-1"), "seckill.soldout.sku-1");
    }

    #[test]
    fn a_remembered_mark_costs_no_read() {
        let store = FakeStore::default();
        let limits = limits(10);
        let mut writer = LocalMemory::default();
        let mut reader = LocalMemory::default();
        confirm_goods(&store, &limits, "a");
        confirm_goods(&store, &limits, "b");
        mark_sold_out(&store, &mut writer, "a", T0 + SECOND, T0);
        let reads = store.reads.get();
        assert_eq!(
            admit(&store, &mut writer, &limits, "a", T0, true),
            Admission::SoldOut
        );
        assert_eq!(store.reads.get(), reads);
        // Another worker reads it from shared data once, then remembers it.
        assert_eq!(
            admit(&store, &mut reader, &limits, "a", T0, true),
            Admission::SoldOut
        );
        assert_eq!(store.reads.get(), reads + 1);
        assert_eq!(
            admit(&store, &mut reader, &limits, "a", T0 + SECOND - 1, true),
            Admission::SoldOut
        );
        assert_eq!(store.reads.get(), reads + 1);
        // Never past the mark's expiry; nor when marks are not asked for.
        for memory in [&mut writer, &mut reader] {
            assert_eq!(
                admit(&store, memory, &limits, "a", T0 + SECOND, true),
                Admission::Rate(RateLimited::Allowed)
            );
        }
        let mut other = LocalMemory::default();
        mark_sold_out(&store, &mut other, "b", T0 + SECOND, T0);
        assert_eq!(
            admit(&store, &mut other, &limits, "b", T0, false),
            Admission::Rate(RateLimited::Allowed)
        );
    }

    #[test]
    fn a_remembered_denial_costs_no_bucket_read() {
        let store = FakeStore::default();
        let limits = limits(10);
        let mut memory = LocalMemory::default();
        for _ in 0..3 {
            assert_eq!(
                admit(&store, &mut memory, &limits, "vip", T0, true),
                Admission::Rate(RateLimited::Allowed)
            );
        }
        let limited = |retry_after_ns| Admission::Rate(RateLimited::Limited { retry_after_ns });
        assert_eq!(
            admit(&store, &mut memory, &limits, "vip", T0, true),
            limited(SECOND)
        );
        // From now on: only the sold-out key is read (absent: the host copies nothing), and
        // with marks off, nothing at all.
        let reads = store.reads.get();
        assert_eq!(
            admit(&store, &mut memory, &limits, "vip", T0 + SECOND / 4, true),
            limited(3 * SECOND / 4)
        );
        assert_eq!(store.reads.get(), reads + 1);
        assert_eq!(
            admit(&store, &mut memory, &limits, "vip", T0 + SECOND / 2, false),
            limited(SECOND / 2)
        );
        assert_eq!(store.reads.get(), reads + 1);
        // A mark another worker writes meanwhile is seen at once: sold out comes first.
        let mut other = LocalMemory::default();
        mark_sold_out(&store, &mut other, "vip", T0 + 2 * SECOND, T0);
        assert_eq!(
            admit(&store, &mut memory, &limits, "vip", T0 + SECOND / 2, true),
            Admission::SoldOut
        );
        // At the retry moment the bucket decides again.
        assert_eq!(
            admit(&store, &mut memory, &limits, "vip", T0 + SECOND, false),
            Admission::Rate(RateLimited::Allowed)
        );
    }

    #[test]
    fn overflow_refusals_are_not_remembered() {
        let store = FakeStore::default();
        let limits = limits(0);
        let mut memory = LocalMemory::default();
        for goods in ["x", "y"] {
            assert_eq!(
                admit(&store, &mut memory, &limits, goods, T0, true),
                Admission::Probe
            );
        }
        assert!(matches!(
            admit(&store, &mut memory, &limits, "z", T0, true),
            Admission::Rate(RateLimited::Limited { .. })
        ));
        assert!(memory.is_empty());
    }

    /// xorshift64: a fixed, dependency-free sequence.
    struct Dice(u64);

    impl Dice {
        fn roll(&mut self, sides: u64) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0 % sides
        }
    }

    /// Whatever the interleaving of workers, requests and sold-out marks (all with one
    /// configuration's `sold_out_cache_ms`), workers with a memory answer exactly as workers
    /// reading shared data every time (a memory of capacity 0 remembers nothing), Retry-After
    /// included.
    #[test]
    fn memory_answers_as_shared_data_would() {
        const WORKERS: usize = 3;
        for seed in 1..=40u64 {
            let check_sold_out = seed % 4 != 0;
            let limits = limits(2);
            let goods = ["a", "b", "c", "d", "vip"];
            let cached = FakeStore::default();
            let reference = FakeStore::default();
            for store in [&cached, &reference] {
                confirm_goods(store, &limits, "a");
                confirm_goods(store, &limits, "b");
            }
            let mut memories: Vec<LocalMemory> =
                (0..WORKERS).map(|_| LocalMemory::default()).collect();
            let mut forgetful: Vec<LocalMemory> =
                (0..WORKERS).map(|_| LocalMemory::new(0)).collect();
            let mut dice = Dice(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15));
            let mut now = T0;
            let ttl = (seed % 5 + 1) * SECOND / 2;
            let mut remembered = 0;
            for step in 0..2_000 {
                // Time only moves forward, by nothing up to 1.5 s (mostly by little: a
                // crowd).
                now += match dice.roll(32) {
                    0..=15 => 0,
                    16..=29 => dice.roll(SECOND / 100),
                    30 => dice.roll(SECOND / 2),
                    _ => dice.roll(3 * SECOND / 2),
                };
                let worker = dice.roll(WORKERS as u64) as usize;
                let goods_id = goods[dice.roll(goods.len() as u64) as usize];
                if dice.roll(25) == 0 {
                    // A deduct answer on this worker: sold out for `sold_out_cache_ms`.
                    let until = now + ttl;
                    mark_sold_out(&cached, &mut memories[worker], goods_id, until, now);
                    mark_sold_out(&reference, &mut forgetful[worker], goods_id, until, now);
                    continue;
                }
                let got = admit(
                    &cached,
                    &mut memories[worker],
                    &limits,
                    goods_id,
                    now,
                    check_sold_out,
                );
                let want = admit(
                    &reference,
                    &mut forgetful[worker],
                    &limits,
                    goods_id,
                    now,
                    check_sold_out,
                );
                assert_eq!(got, want, "seed {seed}, step {step}, {goods_id} at {now}");
                remembered += memories[worker].len();
            }
            assert!(remembered > 0, "seed {seed}: the memory was never used");
            // ...and it answered: fewer reads than going to shared data every time.
            assert!(
                cached.reads.get() * 10 < reference.reads.get() * 9,
                "seed {seed}: {} reads with memory, {} without",
                cached.reads.get(),
                reference.reads.get()
            );
            assert!(forgetful.iter().all(LocalMemory::is_empty));
        }
    }

    #[test]
    fn a_clock_step_back_lets_shared_data_decide() {
        let store = FakeStore::default();
        let limits = limits(10);
        let mut memory = LocalMemory::default();
        // Burst 1 at one request per 1000 s.
        let slow = RateLimits {
            default: Rate::new(0.001, 1).unwrap(),
            ..limits
        };
        confirm_goods(&store, &slow, "a");
        assert_eq!(
            admit(&store, &mut memory, &slow, "a", T0, false),
            Admission::Rate(RateLimited::Allowed)
        );
        assert!(matches!(
            admit(&store, &mut memory, &slow, "a", T0 + SECOND, false),
            Admission::Rate(RateLimited::Limited { .. })
        ));
        // The clock steps back 10 s: the remembered denial lapses and the bucket restarts,
        // as documented for a step of more than 1 s.
        assert_eq!(
            admit(&store, &mut memory, &slow, "a", T0 - 9 * SECOND, false),
            Admission::Rate(RateLimited::Allowed)
        );
    }

    #[test]
    fn every_worker_claims_a_different_number() {
        let store = FakeStore::default();
        let numbers: Vec<_> = (0..5).map(|_| claim_worker_number(&store)).collect();
        assert_eq!(numbers, vec![Some(1), Some(2), Some(3), Some(4), Some(5)]);
        // A few lost races are retried, not turned into a duplicate.
        store.lose_races.set(3);
        assert_eq!(claim_worker_number(&store), Some(6));
        store.lose_races.set(CAS_ATTEMPTS_MAX);
        assert_eq!(claim_worker_number(&store), None);
    }
}
