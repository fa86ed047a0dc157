//! The worker's own memory of answers that cannot change for a while, consulted before shared
//! data so that the two local-reject paths cost no shared-data value on a warm worker:
//!
//! - **sold-out marks** this worker wrote to shared data or read from it, each until the
//!   exact expiry it was given (an entry never outlives the `sold_out_cache_ms` window of the
//!   mark it copies);
//! - **unknown goods**: goods ids the stock service said it does not sell, for
//!   `unknown_goods_cache_ms`. This one lives in the worker only, never in shared data
//!   (which never forgets): the ids are whatever clients send, so the bound below is what
//!   keeps them from costing memory;
//! - **expected retries**: request ids this worker told to retry (a 503 because the deduct
//!   answer did not come in time, or a shop that timed out), for [`RETRY_REMEMBERED_NS`].
//!   Their retry skips the sold-out marks and asks the syncer, which answers from the
//!   idempotency record: a unit won while the gate was not listening is delivered, not
//!   hidden behind "sold out" (the last unit is often the one that marks the goods sold
//!   out). Per worker: a retry on the same connection lands here; one that lands on
//!   another worker or Envoy gets the sold-out answer, and its unit returns when the claim
//!   window ends (README, "Decided: the sold-out cache and retries");
//! - **rate-limit denials** of goods with their own bucket, until the moment the same request
//!   would pass. A denial writes nothing, and while it holds no worker with the same rate can
//!   be admitted (GCRA: the TAT it read stays too far ahead until then), so the bucket cannot
//!   change before that moment: every answer from this memory is the one shared data would
//!   give, `Retry-After` included.
//!
//! Each worker thread runs its own copy of the VM, so this memory is per worker (and per
//! plugin configuration: it lives in the root context). An entry also lapses when the clock
//! reads earlier than when it was remembered (a wall-clock step back): shared data decides
//! again, as it always did.
//!
//! Pure code: no host calls, unit-tested natively.

use std::collections::{HashMap, VecDeque};

/// Entries remembered per kind and worker at most. Sold-out marks exist only for real goods
/// (the stock service called them sold out or ended) and denials only for goods with their
/// own bucket, so this is rarely reached; when it is, lapsed entries go first, then the ones
/// ending soonest (a forgotten entry only costs a shared-data read).
pub const MEMORY_ENTRIES_MAX: usize = 1024;
/// How long a worker remembers a request id it told to retry: long enough for an app's retry
/// with backoff, short next to a payment window.
pub const RETRY_REMEMBERED_NS: u64 = 60 * 1_000_000_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Entry {
    /// When it was remembered (this worker's clock).
    since_ns: u64,
    /// When it stops holding.
    until_ns: u64,
}

impl Entry {
    fn holds_at(self, now_ns: u64) -> bool {
        self.since_ns <= now_ns && now_ns < self.until_ns
    }
}

/// Goods id → an answer holding from `since_ns` until `until_ns`, bounded.
#[derive(Debug, Clone)]
struct Expiring {
    entries: HashMap<String, Entry>,
    capacity: usize,
}

impl Expiring {
    fn new(capacity: usize) -> Self {
        Expiring {
            entries: HashMap::new(),
            capacity,
        }
    }

    /// The end of the entry for `goods_id`, if it holds at `now_ns`; a lapsed one is
    /// forgotten.
    fn get(&mut self, goods_id: &str, now_ns: u64) -> Option<u64> {
        let entry = *self.entries.get(goods_id)?;
        if entry.holds_at(now_ns) {
            return Some(entry.until_ns);
        }
        self.entries.remove(goods_id);
        None
    }

    /// Remembers an answer for `goods_id` from `now_ns` until `until_ns`, replacing any
    /// earlier one. One already over is not remembered.
    fn insert(&mut self, goods_id: &str, until_ns: u64, now_ns: u64) {
        if now_ns >= until_ns || self.capacity == 0 {
            return;
        }
        let entry = Entry {
            since_ns: now_ns,
            until_ns,
        };
        if let Some(slot) = self.entries.get_mut(goods_id) {
            *slot = entry;
            return;
        }
        if self.entries.len() >= self.capacity {
            self.entries.retain(|_, entry| entry.holds_at(now_ns));
        }
        if self.entries.len() >= self.capacity {
            let soonest = self
                .entries
                .iter()
                .min_by_key(|(_, entry)| entry.until_ns)
                .map(|(goods, _)| goods.clone());
            if let Some(goods) = soonest {
                self.entries.remove(&goods);
            }
        }
        self.entries.insert(goods_id.to_string(), entry);
    }

    fn len(&self) -> usize {
        self.entries.len()
    }
}

/// Request ids told to retry, each for the same time ([`RETRY_REMEMBERED_NS`]), so the oldest
/// is also the first to lapse: a FIFO of at most `capacity` ids, O(1) to add and to look up
/// however many arrive (a 503 storm while the stock service is down tells every buyer to
/// retry).
#[derive(Debug, Clone)]
struct RetryMemory {
    until: HashMap<String, u64>,
    order: VecDeque<String>,
    capacity: usize,
}

impl RetryMemory {
    fn new(capacity: usize) -> Self {
        RetryMemory {
            until: HashMap::new(),
            order: VecDeque::new(),
            capacity,
        }
    }

    fn holds(&self, request_id: &str, now_ns: u64) -> bool {
        !self.until.is_empty()
            && self
                .until
                .get(request_id)
                .is_some_and(|until_ns| now_ns < *until_ns)
    }

    fn insert(&mut self, request_id: &str, until_ns: u64) {
        if self.capacity == 0 {
            return;
        }
        if let Some(slot) = self.until.get_mut(request_id) {
            *slot = until_ns;
            return;
        }
        if self.order.len() >= self.capacity {
            if let Some(oldest) = self.order.pop_front() {
                self.until.remove(&oldest);
            }
        }
        self.until.insert(request_id.to_string(), until_ns);
        self.order.push_back(request_id.to_string());
    }

    fn len(&self) -> usize {
        self.until.len()
    }
}

/// One worker's memory of sold-out marks and rate-limit denials.
#[derive(Debug, Clone)]
pub struct LocalMemory {
    sold_out: Expiring,
    unknown: Expiring,
    retrying: RetryMemory,
    denied: Expiring,
}

impl Default for LocalMemory {
    fn default() -> Self {
        LocalMemory::new(MEMORY_ENTRIES_MAX)
    }
}

impl LocalMemory {
    /// A memory of at most `capacity` entries of each kind (0: remembers nothing).
    pub fn new(capacity: usize) -> Self {
        LocalMemory {
            sold_out: Expiring::new(capacity),
            unknown: Expiring::new(capacity),
            retrying: RetryMemory::new(capacity),
            denied: Expiring::new(capacity),
        }
    }

    /// Whether a remembered sold-out mark for the goods holds at `now_ns`.
    pub fn sold_out(&mut self, goods_id: &str, now_ns: u64) -> bool {
        self.sold_out.get(goods_id, now_ns).is_some()
    }

    /// Remembers a sold-out mark that shared data holds until `until_ns` (the last write
    /// wins, as in shared data).
    pub fn remember_sold_out(&mut self, goods_id: &str, until_ns: u64, now_ns: u64) {
        self.sold_out.insert(goods_id, until_ns, now_ns);
    }

    /// Whether the stock service said, until a moment that has not come, that it sells no
    /// such goods.
    pub fn unknown(&mut self, goods_id: &str, now_ns: u64) -> bool {
        self.unknown.get(goods_id, now_ns).is_some()
    }

    /// Remembers an `unknown_goods` answer until `until_ns`.
    pub fn remember_unknown(&mut self, goods_id: &str, until_ns: u64, now_ns: u64) {
        self.unknown.insert(goods_id, until_ns, now_ns);
    }

    /// Whether this worker told the request id to retry, until a moment that has not come.
    /// Free while nobody was told to retry (the common case under a sold-out flood).
    pub fn expects_retry(&self, request_id: &str, now_ns: u64) -> bool {
        self.retrying.holds(request_id, now_ns)
    }

    /// Remembers that the request id was told to retry, until `until_ns`.
    pub fn remember_retry(&mut self, request_id: &str, until_ns: u64) {
        self.retrying.insert(request_id, until_ns);
    }

    /// If a remembered denial holds at `now_ns`: how long until the request would pass.
    pub fn denied(&mut self, goods_id: &str, now_ns: u64) -> Option<u64> {
        self.denied
            .get(goods_id, now_ns)
            .map(|until_ns| until_ns - now_ns)
    }

    /// Remembers that the goods' own bucket refuses every request until
    /// `now_ns + retry_after_ns`.
    pub fn remember_denial(&mut self, goods_id: &str, retry_after_ns: u64, now_ns: u64) {
        self.denied
            .insert(goods_id, now_ns.saturating_add(retry_after_ns), now_ns);
    }

    /// Entries remembered (every kind).
    pub fn len(&self) -> usize {
        self.sold_out.len() + self.unknown.len() + self.retrying.len() + self.denied.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: u64 = 1_000_000_000;
    const T0: u64 = 1_700_000_000 * SECOND;

    #[test]
    fn a_mark_holds_exactly_until_its_expiry() {
        let mut memory = LocalMemory::default();
        assert!(!memory.sold_out("a", T0));
        memory.remember_sold_out("a", T0 + SECOND, T0);
        assert!(memory.sold_out("a", T0));
        assert!(memory.sold_out("a", T0 + SECOND - 1));
        assert!(!memory.sold_out("b", T0));
        assert!(!memory.sold_out("a", T0 + SECOND));
        // Forgotten once seen lapsed.
        assert!(memory.is_empty());
        assert!(!memory.sold_out("a", T0));
    }

    #[test]
    fn a_retry_is_expected_until_its_time() {
        let mut memory = LocalMemory::default();
        assert!(!memory.expects_retry("r1", T0));
        memory.remember_retry("r1", T0 + SECOND);
        assert!(memory.expects_retry("r1", T0 + SECOND - 1));
        assert!(!memory.expects_retry("r2", T0));
        assert!(!memory.expects_retry("r1", T0 + SECOND));
        // Bounded, whatever the number of request ids: the oldest go first.
        for i in 0..10 * MEMORY_ENTRIES_MAX {
            memory.remember_retry(&format!("r{i}"), T0 + 2 * SECOND);
        }
        assert_eq!(memory.len(), MEMORY_ENTRIES_MAX);
        assert!(!memory.expects_retry("r0", T0));
        assert!(memory.expects_retry(&format!("r{}", 10 * MEMORY_ENTRIES_MAX - 1), T0));
    }

    #[test]
    fn a_denial_counts_down_to_its_end() {
        let mut memory = LocalMemory::default();
        assert_eq!(memory.denied("a", T0), None);
        memory.remember_denial("a", 3 * SECOND, T0);
        assert_eq!(memory.denied("a", T0), Some(3 * SECOND));
        assert_eq!(memory.denied("a", T0 + SECOND), Some(2 * SECOND));
        assert_eq!(memory.denied("a", T0 + 3 * SECOND - 1), Some(1));
        // Kinds are apart.
        assert!(!memory.sold_out("a", T0));
        assert_eq!(memory.denied("b", T0), None);
        assert_eq!(memory.denied("a", T0 + 3 * SECOND), None);
        assert!(memory.is_empty());
        // No overflow at the end of time.
        memory.remember_denial("a", u64::MAX, T0);
        assert_eq!(memory.denied("a", T0), Some(u64::MAX - T0));
    }

    #[test]
    fn a_clock_step_back_lapses_entries() {
        let mut memory = LocalMemory::default();
        memory.remember_denial("a", 10 * SECOND, T0);
        memory.remember_sold_out("b", T0 + 10 * SECOND, T0);
        // Earlier than remembered: shared data decides again.
        assert_eq!(memory.denied("a", T0 - 1), None);
        assert!(!memory.sold_out("b", T0 - 1));
        assert!(memory.is_empty());
    }

    #[test]
    fn lapsed_answers_are_not_remembered() {
        let mut memory = LocalMemory::default();
        memory.remember_sold_out("a", T0, T0);
        memory.remember_sold_out("b", T0 - 1, T0);
        memory.remember_denial("c", 0, T0);
        assert!(memory.is_empty());
        let mut off = LocalMemory::new(0);
        off.remember_sold_out("a", T0 + SECOND, T0);
        off.remember_denial("a", SECOND, T0);
        assert!(!off.sold_out("a", T0));
        assert_eq!(off.denied("a", T0), None);
    }

    #[test]
    fn a_newer_answer_replaces_the_old_one() {
        let mut memory = LocalMemory::default();
        memory.remember_sold_out("a", T0 + SECOND, T0);
        memory.remember_sold_out("a", T0 + 3 * SECOND, T0 + SECOND / 2);
        assert!(memory.sold_out("a", T0 + 2 * SECOND));
        // Last write wins, like shared data: a shorter mark shortens it.
        memory.remember_sold_out("a", T0 + 2 * SECOND, T0 + SECOND);
        assert!(!memory.sold_out("a", T0 + 2 * SECOND));
        memory.remember_denial("a", 5 * SECOND, T0);
        memory.remember_denial("a", SECOND, T0 + SECOND);
        assert_eq!(memory.denied("a", T0 + SECOND), Some(SECOND));
        assert_eq!(memory.denied("a", T0 + 2 * SECOND), None);
    }

    #[test]
    fn the_memory_is_bounded() {
        let mut memory = LocalMemory::new(3);
        memory.remember_sold_out("a", T0 + 10 * SECOND, T0);
        memory.remember_sold_out("b", T0 + SECOND, T0);
        memory.remember_sold_out("c", T0 + 20 * SECOND, T0);
        // Full of holding marks: the one ending first makes room.
        memory.remember_sold_out("d", T0 + 30 * SECOND, T0);
        assert_eq!(memory.len(), 3);
        assert!(!memory.sold_out("b", T0));
        for goods in ["a", "c", "d"] {
            assert!(memory.sold_out(goods, T0), "{goods}");
        }
        // Lapsed marks go before holding ones, all at once.
        memory.remember_sold_out("e", T0 + 40 * SECOND, T0 + 15 * SECOND);
        assert_eq!(memory.len(), 3);
        for goods in ["c", "d", "e"] {
            assert!(memory.sold_out(goods, T0 + 15 * SECOND), "{goods}");
        }
        // Updating a remembered goods needs no room.
        memory.remember_sold_out("c", T0 + 50 * SECOND, T0 + 15 * SECOND);
        assert_eq!(memory.len(), 3);
        assert!(memory.sold_out("c", T0 + 45 * SECOND));
        for i in 0..100 {
            memory.remember_sold_out(&format!("g{i}"), T0 + 60 * SECOND, T0 + 15 * SECOND);
            memory.remember_denial(&format!("g{i}"), 60 * SECOND, T0 + 15 * SECOND);
        }
        // Each kind has its own bound.
        assert_eq!(memory.len(), 6);
    }
}
