//! Shared-data helpers: the per-goods record (rate limit and sold-out mark), kept in Envoy's
//! shared data so every worker thread of one Envoy instance sees the same state.
//!
//! The logic is written against [`SharedStore`] so the compare-and-swap loops unit-test
//! natively with a fake store; [`HostStore`] (wasm only) is the real one.
//!
//! Keys (scoped by Envoy to the filter's `vm_id`):
//! - `seckill.g.<goods>`: the goods' [`Record`], 16 bytes: GCRA TAT, then the expiry of a
//!   sold-out mark (both u64 ns since the epoch, little-endian; 0 = none). One read answers
//!   both "is it sold out?" and "is it over its rate?".
//! - `seckill.g.~overflow`: the bucket shared by goods seen after the tracking limit (its
//!   sold-out field is never set: it would mark every overflow goods sold out).
//! - `seckill.g.~tracked`: u64 count of goods with their own record.
//! - `seckill.soldout.<goods>`: u64 expiry of a sold-out mark for a goods without its own
//!   record (one riding the overflow bucket); read only when the goods has no record.
//!
//! `~` cannot appear in a goods id (see `seckill_api::validate_id`), so no goods collides
//! with the overflow bucket or the counter.
//!
//! Shared data never expires, so everything a client can name is bounded: own records by
//! `tracked_goods_max`; separate sold-out keys exist only for goods the stock service called
//! sold out or ended, which are real goods.

use crate::config::RateLimits;
use crate::gcra::{self, Decision, Rate};

/// Most compare-and-swap attempts per update. Contention on one key is between worker
/// threads only; sixteen lost races in a row means the goods is hot enough that refusing is
/// the right answer.
pub const CAS_ATTEMPTS_MAX: usize = 16;

const GOODS_PREFIX: &str = "seckill.g.";
/// The bucket every goods past `tracked_goods_max` shares.
pub const OVERFLOW_KEY: &str = "seckill.g.~overflow";
/// Count of goods with their own record.
pub const TRACKED_KEY: &str = "seckill.g.~tracked";
const SOLD_OUT_PREFIX: &str = "seckill.soldout.";

/// Why a write to shared data did not happen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetError {
    /// Someone wrote the key since we read it.
    CasMismatch,
    /// Any other refusal by the host.
    Failed,
}

/// The shared-data calls the helpers need.
pub trait SharedStore {
    /// Value and CAS token of a key; `(None, None)` when absent.
    fn get(&self, key: &str) -> (Option<Vec<u8>>, Option<u32>);
    /// Writes a key; with `cas`, only if nobody wrote it since that token was read.
    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), SetError>;
}

/// Key of a goods' own record. Goods ids are validated (`A-Z a-z 0-9 _ - . :`) before they
/// get here.
pub fn goods_key(goods_id: &str) -> String {
    let mut key = String::with_capacity(GOODS_PREFIX.len() + goods_id.len());
    key.push_str(GOODS_PREFIX);
    key.push_str(goods_id);
    key
}

/// Key of the sold-out mark of a goods without its own record.
pub fn sold_out_key(goods_id: &str) -> String {
    format!("{SOLD_OUT_PREFIX}{goods_id}")
}

/// What shared data holds for one goods (or for the overflow bucket).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Record {
    /// GCRA theoretical arrival time; 0: a fresh bucket.
    pub tat_ns: u64,
    /// Until when a sold-out answer holds; 0 (or anything past): not sold out.
    pub sold_out_until_ns: u64,
}

impl Record {
    pub const LEN: usize = 16;

    pub fn encode(self) -> [u8; Record::LEN] {
        let mut bytes = [0; Record::LEN];
        bytes[..8].copy_from_slice(&gcra::encode(self.tat_ns));
        bytes[8..].copy_from_slice(&gcra::encode(self.sold_out_until_ns));
        bytes
    }

    /// Anything that is not exactly 16 bytes is not ours to trust: None.
    pub fn decode(bytes: &[u8]) -> Option<Record> {
        let bytes = <&[u8; Record::LEN]>::try_from(bytes).ok()?;
        let (tat, sold_out) = bytes.split_at(8);
        Some(Record {
            tat_ns: gcra::decode(tat)?,
            sold_out_until_ns: gcra::decode(sold_out)?,
        })
    }

    /// Reads a stored value; a garbled one counts as a fresh record (bucket restarted, no
    /// mark).
    fn read(value: Option<&[u8]>) -> Option<Record> {
        value.map(|bytes| Record::decode(bytes).unwrap_or_default())
    }

    fn tat(self) -> Option<u64> {
        (self.tat_ns != 0).then_some(self.tat_ns)
    }

    /// The expiry of a sold-out mark still fresh at `now_ns`.
    pub fn sold_out_at(self, now_ns: u64) -> Option<u64> {
        (now_ns < self.sold_out_until_ns).then_some(self.sold_out_until_ns)
    }
}

/// A read of one key: the record (None: absent) and its CAS token.
type Seen = (Option<Record>, Option<u32>);

fn read_record(store: &impl SharedStore, key: &str) -> Seen {
    let (value, cas) = store.get(key);
    (Record::read(value.as_deref()), cas)
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

/// What shared data says about one sale request, in the order the gate asks: sold out
/// first, then the rate limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// A fresh sold-out mark, good until this moment. No token was spent.
    SoldOut { until_ns: u64 },
    /// No fresh mark (or marks not asked for); the rate limiter's answer.
    Rate(RateLimited),
}

/// The shared-data half of the gate: reads the goods' record once, answers from its
/// sold-out mark when `check_sold_out` and the mark is fresh, else spends one token of the
/// goods' bucket (its own, or the overflow bucket's).
pub fn admit(
    store: &impl SharedStore,
    limits: &RateLimits,
    goods_id: &str,
    now_ns: u64,
    check_sold_out: bool,
) -> Admission {
    let key = goods_key(goods_id);
    let seen = read_record(store, &key);
    if let (Some(record), _) = seen {
        // Tracked (or configured) goods: the record answers both questions.
        if check_sold_out {
            if let Some(until_ns) = record.sold_out_at(now_ns) {
                return Admission::SoldOut { until_ns };
            }
        }
        let rate = limits
            .goods
            .get(goods_id)
            .copied()
            .unwrap_or(limits.default);
        return Admission::Rate(take_token_seen(store, &key, rate, now_ns, seen));
    }
    // No record: a goods never seen yet, or one riding the overflow bucket, whose sold-out
    // mark (if any) has a key of its own.
    if check_sold_out {
        if let Some(until_ns) = untracked_sold_out(store, goods_id, now_ns) {
            return Admission::SoldOut { until_ns };
        }
    }
    if let Some(rate) = limits.goods.get(goods_id) {
        return Admission::Rate(take_token_seen(store, &key, *rate, now_ns, seen));
    }
    if reserve_tracking_slot(store, limits.tracked_goods_max) {
        return Admission::Rate(take_token_seen(store, &key, limits.default, now_ns, seen));
    }
    Admission::Rate(take_token(store, OVERFLOW_KEY, limits.default, now_ns))
}

/// Counts one more tracked goods if the limit allows. Two threads meeting a new goods at the
/// same moment may both count it: the count then overstates, which only errs towards the
/// overflow bucket, never past the memory bound.
fn reserve_tracking_slot(store: &impl SharedStore, tracked_goods_max: u64) -> bool {
    for _ in 0..CAS_ATTEMPTS_MAX {
        let (value, cas) = store.get(TRACKED_KEY);
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
/// nothing and returns at once. The record's sold-out mark is written back unchanged.
pub fn take_token(store: &impl SharedStore, key: &str, rate: Rate, now_ns: u64) -> RateLimited {
    let seen = read_record(store, key);
    take_token_seen(store, key, rate, now_ns, seen)
}

/// [`take_token`] whose first attempt uses a read the caller already made.
fn take_token_seen(
    store: &impl SharedStore,
    key: &str,
    rate: Rate,
    now_ns: u64,
    mut seen: Seen,
) -> RateLimited {
    for attempt in 0..CAS_ATTEMPTS_MAX {
        if attempt > 0 {
            seen = read_record(store, key);
        }
        let (record, cas) = seen;
        let record = record.unwrap_or_default();
        match gcra::decide(record.tat(), now_ns, rate) {
            Decision::Deny { retry_after_ns } => return RateLimited::Limited { retry_after_ns },
            Decision::Allow { tat_ns } => {
                let updated = Record { tat_ns, ..record };
                match store.set(key, &updated.encode(), cas) {
                    Ok(()) => return RateLimited::Allowed,
                    Err(SetError::CasMismatch) => continue,
                    Err(SetError::Failed) => break,
                }
            }
        }
    }
    RateLimited::Contended {
        retry_after_ns: rate.interval_ns(),
    }
}

/// The fresh sold-out mark of a goods without its own record.
fn untracked_sold_out(store: &impl SharedStore, goods_id: &str, now_ns: u64) -> Option<u64> {
    let (value, _) = store.get(&sold_out_key(goods_id));
    value
        .as_deref()
        .and_then(gcra::decode)
        .filter(|until_ns| now_ns < *until_ns)
}

/// Marks the goods sold out until `until_ns`, for every worker. A goods with its own record
/// gets the mark in it, by compare-and-swap so its rate-limit state survives (last writer
/// wins: every writer writes "sold out until about now + ttl"). A goods without a record
/// rides the overflow bucket, whose record other goods share, so its mark gets a key of its
/// own. Losing every race costs one more callout, nothing else.
pub fn cache_sold_out(store: &impl SharedStore, goods_id: &str, until_ns: u64) {
    let key = goods_key(goods_id);
    for _ in 0..CAS_ATTEMPTS_MAX {
        let (record, cas) = read_record(store, &key);
        let Some(record) = record else {
            let _ = store.set(&sold_out_key(goods_id), &gcra::encode(until_ns), None);
            return;
        };
        let marked = Record {
            sold_out_until_ns: until_ns,
            ..record
        };
        match store.set(&key, &marked.encode(), cas) {
            Ok(()) => return,
            Err(SetError::CasMismatch) => continue,
            Err(SetError::Failed) => return,
        }
    }
}

/// The real shared data of the Envoy instance.
#[cfg(target_arch = "wasm32")]
pub struct HostStore;

#[cfg(target_arch = "wasm32")]
impl SharedStore for HostStore {
    fn get(&self, key: &str) -> (Option<Vec<u8>>, Option<u32>) {
        // The SDK maps "not found" to (None, None) and only returns Ok; treat any error as
        // absent rather than trap.
        proxy_wasm::hostcalls::get_shared_data(key).unwrap_or((None, None))
    }

    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), SetError> {
        match proxy_wasm::hostcalls::set_shared_data(key, Some(value), cas) {
            Ok(()) => Ok(()),
            Err(proxy_wasm::types::Status::CasMismatch) => Err(SetError::CasMismatch),
            Err(_) => Err(SetError::Failed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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
        /// Written behind our back just before our next write (which then loses its race).
        interloper: RefCell<Option<Vec<u8>>>,
        reads: Cell<usize>,
        writes: Cell<usize>,
    }

    impl FakeStore {
        fn record(&self, key: &str) -> Option<Record> {
            self.data
                .borrow()
                .get(key)
                .and_then(|(value, _)| Record::decode(value))
        }

        /// Someone else writes `key` (bumping its CAS token).
        fn write_behind_our_back(&self, key: &str, value: &[u8]) {
            let cas_now = self.next_cas.get() + 1;
            self.next_cas.set(cas_now);
            self.data
                .borrow_mut()
                .insert(key.to_string(), (value.to_vec(), cas_now));
        }
    }

    impl SharedStore for FakeStore {
        fn get(&self, key: &str) -> (Option<Vec<u8>>, Option<u32>) {
            self.reads.set(self.reads.get() + 1);
            match self.data.borrow().get(key) {
                Some((value, cas)) => (Some(value.clone()), Some(*cas)),
                None => (None, None),
            }
        }

        fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), SetError> {
            if let Some(theirs) = self.interloper.borrow_mut().take() {
                self.write_behind_our_back(key, &theirs);
            }
            if self.lose_races.get() > 0 {
                self.lose_races.set(self.lose_races.get() - 1);
                // Someone else wrote meanwhile (the same value, so only the token changes).
                let current = self.data.borrow().get(key).map(|(v, _)| v.clone());
                self.write_behind_our_back(key, &current.unwrap_or_else(|| value.to_vec()));
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
            tracked_goods_max,
        }
    }

    fn rate(store: &FakeStore, limits: &RateLimits, goods: &str, now: u64) -> RateLimited {
        match admit(store, limits, goods, now, true) {
            Admission::Rate(answer) => answer,
            other => panic!("unexpected {other:?}"),
        }
    }

    fn allowed(store: &FakeStore, limits: &RateLimits, goods: &str, now: u64) -> bool {
        match rate(store, limits, goods, now) {
            RateLimited::Allowed => true,
            RateLimited::Limited { .. } => false,
            RateLimited::Contended { .. } => panic!("unexpected contention"),
        }
    }

    fn tracked(store: &FakeStore) -> Option<u64> {
        store.get(TRACKED_KEY).0.as_deref().and_then(gcra::decode)
    }

    #[test]
    fn record_encoding() {
        let record = Record {
            tat_ns: 0x0102_0304_0506_0708,
            sold_out_until_ns: 42,
        };
        let bytes = record.encode();
        // TAT first, then the sold-out expiry, both little-endian.
        assert_eq!(&bytes[..8], &[8, 7, 6, 5, 4, 3, 2, 1]);
        assert_eq!(&bytes[8..], &[42, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(Record::decode(&bytes), Some(record));
        assert_eq!(Record::decode(&[0; 16]), Some(Record::default()));
        for len in [0, 8, 15, 17, 24] {
            assert_eq!(Record::decode(&vec![1; len]), None, "{len} bytes");
        }
        assert_eq!(record.sold_out_at(41), Some(42));
        assert_eq!(record.sold_out_at(42), None);
        assert_eq!(Record::default().sold_out_at(0), None);
    }

    #[test]
    fn each_goods_has_its_own_budget() {
        let store = FakeStore::default();
        let limits = limits(10);
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
            rate(&store, &limits, "a", T0),
            RateLimited::Limited {
                retry_after_ns: SECOND
            }
        );
        // Configured goods do not count as tracked.
        assert_eq!(tracked(&store), Some(2));
        // A goods named like the counter cannot touch it.
        assert!(allowed(&store, &limits, "tracked", T0));
        assert_eq!(tracked(&store), Some(3));
        assert!(store.record(&goods_key("tracked")).is_some());
    }

    #[test]
    fn a_known_goods_costs_one_read() {
        let store = FakeStore::default();
        let limits = limits(10);
        for goods in ["a", "vip"] {
            assert!(allowed(&store, &limits, goods, T0));
            let reads = store.reads.get();
            // Allowed (read + CAS write), then denied (read only), marks checked as well.
            assert!(allowed(&store, &limits, goods, T0));
            assert_eq!(store.reads.get(), reads + 1, "{goods}");
            for _ in 0..3 {
                let _ = rate(&store, &limits, goods, T0);
            }
            assert_eq!(store.reads.get(), reads + 4, "{goods}");
        }
    }

    #[test]
    fn goods_past_the_tracking_limit_share_the_overflow_bucket() {
        let store = FakeStore::default();
        let limits = limits(2);
        assert!(allowed(&store, &limits, "a", T0));
        assert!(allowed(&store, &limits, "b", T0));
        // Two goods tracked: "c" and "d" share one bucket of the default rate (burst 2).
        assert!(allowed(&store, &limits, "c", T0));
        assert!(allowed(&store, &limits, "d", T0));
        assert!(!allowed(&store, &limits, "e", T0));
        assert!(store.get(&goods_key("c")).0.is_none());
        assert!(store.get(OVERFLOW_KEY).0.is_some());
        // Tracked goods keep their own bucket; configured ones always have theirs.
        assert!(allowed(&store, &limits, "a", T0));
        assert!(allowed(&store, &limits, "vip", T0));
        assert_eq!(tracked(&store), Some(2));
    }

    #[test]
    fn sold_out_marks_live_in_the_record_and_expire() {
        let store = FakeStore::default();
        let limits = limits(10);
        assert!(allowed(&store, &limits, "a", T0));
        let tat = store.record(&goods_key("a")).unwrap().tat_ns;
        cache_sold_out(&store, "a", T0 + SECOND);
        // The mark kept the bucket's state, and no separate key was written.
        assert_eq!(
            store.record(&goods_key("a")),
            Some(Record {
                tat_ns: tat,
                sold_out_until_ns: T0 + SECOND
            })
        );
        assert!(store.get(&sold_out_key("a")).0.is_none());
        let writes = store.writes.get();
        for now in [T0, T0 + SECOND - 1] {
            assert_eq!(
                admit(&store, &limits, "a", now, true),
                Admission::SoldOut {
                    until_ns: T0 + SECOND
                }
            );
        }
        // A sold-out answer spends no token.
        assert_eq!(store.writes.get(), writes);
        assert_eq!(store.record(&goods_key("a")).unwrap().tat_ns, tat);
        // Expired: back to the rate limit.
        assert!(allowed(&store, &limits, "a", T0 + SECOND));
        // Other goods are not marked.
        assert!(allowed(&store, &limits, "b", T0));
    }

    #[test]
    fn rate_limit_updates_keep_the_mark() {
        let store = FakeStore::default();
        let limits = limits(10);
        assert!(allowed(&store, &limits, "vip", T0));
        cache_sold_out(&store, "vip", T0 + 10 * SECOND);
        // With marks ignored (cache disabled) the bucket still works, and its writes keep the
        // mark for whoever does read it.
        assert_eq!(
            admit(&store, &limits, "vip", T0, false),
            Admission::Rate(RateLimited::Allowed)
        );
        let record = store.record(&goods_key("vip")).unwrap();
        assert_eq!(record.sold_out_until_ns, T0 + 10 * SECOND);
        assert_eq!(record.tat_ns, T0 + 2 * SECOND);
        // Even through lost races.
        store.lose_races.set(3);
        assert_eq!(
            admit(&store, &limits, "vip", T0, false),
            Admission::Rate(RateLimited::Allowed)
        );
        let record = store.record(&goods_key("vip")).unwrap();
        assert_eq!(record.sold_out_until_ns, T0 + 10 * SECOND);
        assert_eq!(record.tat_ns, T0 + 3 * SECOND);
    }

    #[test]
    fn marking_keeps_a_token_taken_meanwhile() {
        let store = FakeStore::default();
        let limits = limits(10);
        assert!(allowed(&store, &limits, "a", T0));
        let key = goods_key("a");
        // Another worker takes a token between our read and our write: our write fails, and
        // the retry must not roll its TAT back.
        let theirs = Record {
            tat_ns: T0 + 5 * SECOND,
            sold_out_until_ns: 0,
        };
        *store.interloper.borrow_mut() = Some(theirs.encode().to_vec());
        cache_sold_out(&store, "a", T0 + SECOND);
        assert_eq!(
            store.record(&key),
            Some(Record {
                tat_ns: T0 + 5 * SECOND,
                sold_out_until_ns: T0 + SECOND
            })
        );
        // Sixteen lost races: the mark is dropped (one more callout), nothing else changes.
        store.lose_races.set(CAS_ATTEMPTS_MAX);
        cache_sold_out(&store, "a", T0 + 9 * SECOND);
        assert_eq!(store.record(&key).unwrap().sold_out_until_ns, T0 + SECOND);
        // Fifteen are retried; the last writer wins.
        store.lose_races.set(CAS_ATTEMPTS_MAX - 1);
        cache_sold_out(&store, "a", T0 + 3 * SECOND);
        assert_eq!(
            store.record(&key).unwrap().sold_out_until_ns,
            T0 + 3 * SECOND
        );
    }

    #[test]
    fn a_token_keeps_a_mark_set_meanwhile() {
        let store = FakeStore::default();
        let limits = limits(10);
        assert!(allowed(&store, &limits, "vip", T0));
        let key = goods_key("vip");
        // Another worker marks the goods sold out between our read and our write.
        let theirs = Record {
            sold_out_until_ns: T0 + 10 * SECOND,
            ..store.record(&key).unwrap()
        };
        *store.interloper.borrow_mut() = Some(theirs.encode().to_vec());
        assert_eq!(
            admit(&store, &limits, "vip", T0, true),
            Admission::Rate(RateLimited::Allowed)
        );
        assert_eq!(
            store.record(&key),
            Some(Record {
                tat_ns: T0 + 2 * SECOND,
                sold_out_until_ns: T0 + 10 * SECOND
            })
        );
    }

    #[test]
    fn overflow_goods_keep_their_marks_apart() {
        let store = FakeStore::default();
        let limits = limits(1);
        assert!(allowed(&store, &limits, "a", T0));
        // "c" and "d" ride the overflow bucket.
        assert!(allowed(&store, &limits, "c", T0));
        cache_sold_out(&store, "c", T0 + SECOND);
        assert_eq!(store.record(OVERFLOW_KEY).unwrap().sold_out_until_ns, 0);
        assert!(store.get(&goods_key("c")).0.is_none());
        assert_eq!(
            admit(&store, &limits, "c", T0, true),
            Admission::SoldOut {
                until_ns: T0 + SECOND
            }
        );
        // The mark is c's alone; d still gets the overflow bucket's answer.
        assert!(allowed(&store, &limits, "d", T0));
        assert!(!allowed(&store, &limits, "d", T0));
        // Ignored when marks are not asked for, and gone once expired.
        assert!(matches!(
            admit(&store, &limits, "c", T0, false),
            Admission::Rate(_)
        ));
        assert!(matches!(
            admit(&store, &limits, "c", T0 + SECOND, true),
            Admission::Rate(_)
        ));
    }

    #[test]
    fn marks_are_ignored_when_not_asked_for() {
        let store = FakeStore::default();
        let limits = limits(10);
        assert!(allowed(&store, &limits, "a", T0));
        cache_sold_out(&store, "a", T0 + SECOND);
        assert_eq!(
            admit(&store, &limits, "a", T0, false),
            Admission::Rate(RateLimited::Allowed)
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
        assert_eq!(
            store.record("k"),
            Some(Record {
                tat_ns: T0 + SECOND,
                sold_out_until_ns: 0
            })
        );
        // An old 8-byte value is garbage too.
        store.set("k", &gcra::encode(u64::MAX), None).unwrap();
        assert_eq!(take_token(&store, "k", rate, T0), RateLimited::Allowed);
    }

    #[test]
    fn keys() {
        assert_eq!(goods_key("sku-1"), "seckill.g.sku-1");
        assert_ne!(goods_key("tracked"), TRACKED_KEY);
        assert_eq!(sold_out_key("sku-1"), "seckill.soldout.sku-1");
    }
}
