//! Shared-data helpers: the per-goods rate limit and the sold-out cache, kept in Envoy's
//! shared data so every worker thread of one Envoy instance sees the same state.
//!
//! The logic is written against [`SharedStore`] so the compare-and-swap loops unit-test
//! natively with a fake store; [`HostStore`] (wasm only) is the real one.
//!
//! Keys (scoped by Envoy to the filter's `vm_id`):
//! - `seckill.rl.<goods>`: GCRA state, one u64 TAT (ns, little-endian).
//! - `seckill.rl.~overflow`: the bucket shared by goods seen after the tracking limit.
//! - `seckill.rl.tracked`: u64 count of goods with their own bucket.
//! - `seckill.soldout.<goods>`: u64 expiry (ns since the epoch) of a sold-out answer.
//!
//! Shared data never expires, so everything a client can name is bounded: own buckets by
//! `tracked_goods_max`; sold-out entries exist only for goods the stock service called sold
//! out or ended, which are real goods.

use crate::config::RateLimits;
use crate::gcra::{self, Decision, Rate};

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

/// Spends one token of the goods' bucket, if there is one.
pub fn check_rate_limit(
    store: &impl SharedStore,
    limits: &RateLimits,
    goods_id: &str,
    now_ns: u64,
) -> RateLimited {
    let (key, rate) = choose_bucket(store, limits, goods_id);
    take_token(store, &key, rate, now_ns)
}

/// Which bucket a goods uses: configured goods always their own; other goods their own while
/// fewer than `tracked_goods_max` are tracked, else the shared overflow bucket.
fn choose_bucket(store: &impl SharedStore, limits: &RateLimits, goods_id: &str) -> (String, Rate) {
    let key = rate_limit_key(goods_id);
    if let Some(rate) = limits.goods.get(goods_id) {
        return (key, *rate);
    }
    if store.get(&key).0.is_some() || reserve_tracking_slot(store, limits.tracked_goods_max) {
        return (key, limits.default);
    }
    (OVERFLOW_KEY.to_string(), limits.default)
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
/// nothing and returns at once.
pub fn take_token(store: &impl SharedStore, key: &str, rate: Rate, now_ns: u64) -> RateLimited {
    for _ in 0..CAS_ATTEMPTS_MAX {
        let (value, cas) = store.get(key);
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

/// Whether a fresh sold-out answer for the goods is cached.
pub fn sold_out_cached(store: &impl SharedStore, goods_id: &str, now_ns: u64) -> bool {
    let (value, _) = store.get(&sold_out_key(goods_id));
    value
        .as_deref()
        .and_then(gcra::decode)
        .is_some_and(|expiry_ns| now_ns < expiry_ns)
}

/// Caches a sold-out answer until `expiry_ns`. A plain write: the last writer wins, and every
/// writer writes "sold out until about now + ttl", so no compare-and-swap is needed.
pub fn cache_sold_out(store: &impl SharedStore, goods_id: &str, expiry_ns: u64) {
    // Losing this write costs one more callout, nothing else.
    let _ = store.set(&sold_out_key(goods_id), &gcra::encode(expiry_ns), None);
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
    /// token of 0/None always writes), plus a knob to lose the next N races.
    #[derive(Default)]
    struct FakeStore {
        data: RefCell<HashMap<String, (Vec<u8>, u32)>>,
        next_cas: Cell<u32>,
        lose_races: Cell<usize>,
        writes: Cell<usize>,
    }

    impl SharedStore for FakeStore {
        fn get(&self, key: &str) -> (Option<Vec<u8>>, Option<u32>) {
            match self.data.borrow().get(key) {
                Some((value, cas)) => (Some(value.clone()), Some(*cas)),
                None => (None, None),
            }
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
            tracked_goods_max,
        }
    }

    fn allowed(store: &FakeStore, limits: &RateLimits, goods: &str, now: u64) -> bool {
        match check_rate_limit(store, limits, goods, now) {
            RateLimited::Allowed => true,
            RateLimited::Limited { .. } => false,
            RateLimited::Contended { .. } => panic!("unexpected contention"),
        }
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
            check_rate_limit(&store, &limits, "a", T0),
            RateLimited::Limited {
                retry_after_ns: SECOND
            }
        );
        // Configured goods do not count as tracked.
        let tracked = store.get(TRACKED_KEY).0.as_deref().and_then(gcra::decode);
        assert_eq!(tracked, Some(2));
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
        assert!(store.get(&rate_limit_key("c")).0.is_none());
        assert!(store.get(OVERFLOW_KEY).0.is_some());
        // Tracked goods keep their own bucket; configured ones always have theirs.
        assert!(allowed(&store, &limits, "a", T0));
        assert!(allowed(&store, &limits, "vip", T0));
        let tracked = store.get(TRACKED_KEY).0.as_deref().and_then(gcra::decode);
        assert_eq!(tracked, Some(2));
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
        assert!(!sold_out_cached(&store, "a", T0));
        cache_sold_out(&store, "a", T0 + SECOND);
        assert!(sold_out_cached(&store, "a", T0));
        assert!(sold_out_cached(&store, "a", T0 + SECOND - 1));
        assert!(!sold_out_cached(&store, "a", T0 + SECOND));
        assert!(!sold_out_cached(&store, "b", T0));
    }

    #[test]
    fn keys() {
        assert_eq!(rate_limit_key("sku-1"), "seckill.rl.sku-1");
        assert_ne!(rate_limit_key("tracked"), TRACKED_KEY);
        assert_eq!(sold_out_key("sku-1"), "seckill.soldout.sku-1");
    }
}
