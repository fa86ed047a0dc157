//! The worker's own memory of sold-out marks, consulted before shared data so a sold-out
//! goods costs no shared-data call at all on a warm worker.
//!
//! Each worker thread runs its own copy of the VM, so this memory is per worker (and per
//! plugin configuration: it lives in the root context). It only ever holds marks this worker
//! wrote to shared data or read from it, each with the exact expiry it was given: an entry
//! never outlives the `sold_out_cache_ms` window of the mark it copies. A mark another worker
//! writes later only reaches this worker through shared data, as before.
//!
//! Pure code: no host calls, unit-tested natively.

use std::collections::HashMap;

/// Marks remembered per worker at most. Marks exist only for goods the stock service called
/// sold out or ended, which are real goods, so this is rarely reached; when it is, expired
/// marks go first, then the ones expiring soonest (a forgotten mark costs a shared-data read).
pub const SOLD_OUT_MEMORY_MAX: usize = 1024;

/// Goods id → end of its sold-out mark (ns since the epoch).
#[derive(Debug, Clone)]
pub struct SoldOutMemory {
    until: HashMap<String, u64>,
    capacity: usize,
}

impl Default for SoldOutMemory {
    fn default() -> Self {
        SoldOutMemory::new(SOLD_OUT_MEMORY_MAX)
    }
}

impl SoldOutMemory {
    pub fn new(capacity: usize) -> Self {
        SoldOutMemory {
            until: HashMap::new(),
            capacity,
        }
    }

    /// Whether a remembered mark for the goods is still fresh at `now_ns`; an expired one is
    /// forgotten.
    pub fn is_sold_out(&mut self, goods_id: &str, now_ns: u64) -> bool {
        match self.until.get(goods_id) {
            Some(&until_ns) if now_ns < until_ns => true,
            Some(_) => {
                self.until.remove(goods_id);
                false
            }
            None => false,
        }
    }

    /// Remembers a mark until `until_ns` (replacing any earlier one for the goods, as the
    /// last write to shared data wins). A mark already expired is not remembered.
    pub fn remember(&mut self, goods_id: &str, until_ns: u64, now_ns: u64) {
        if now_ns >= until_ns || self.capacity == 0 {
            return;
        }
        if let Some(slot) = self.until.get_mut(goods_id) {
            *slot = until_ns;
            return;
        }
        if self.until.len() >= self.capacity {
            self.until.retain(|_, until| now_ns < *until);
        }
        if self.until.len() >= self.capacity {
            let soonest = self
                .until
                .iter()
                .min_by_key(|(_, until)| **until)
                .map(|(goods, _)| goods.clone());
            if let Some(goods) = soonest {
                self.until.remove(&goods);
            }
        }
        self.until.insert(goods_id.to_string(), until_ns);
    }

    pub fn len(&self) -> usize {
        self.until.len()
    }

    pub fn is_empty(&self) -> bool {
        self.until.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: u64 = 1_000_000_000;
    const T0: u64 = 1_700_000_000 * SECOND;

    #[test]
    fn a_mark_holds_exactly_until_its_expiry() {
        let mut memory = SoldOutMemory::default();
        assert!(!memory.is_sold_out("a", T0));
        memory.remember("a", T0 + SECOND, T0);
        assert!(memory.is_sold_out("a", T0));
        assert!(memory.is_sold_out("a", T0 + SECOND - 1));
        assert!(!memory.is_sold_out("b", T0));
        assert!(!memory.is_sold_out("a", T0 + SECOND));
        // Forgotten once seen expired.
        assert!(memory.is_empty());
        assert!(!memory.is_sold_out("a", T0));
    }

    #[test]
    fn expired_marks_are_not_remembered() {
        let mut memory = SoldOutMemory::default();
        memory.remember("a", T0, T0);
        memory.remember("b", T0 - 1, T0);
        assert!(memory.is_empty());
        let mut off = SoldOutMemory::new(0);
        off.remember("a", T0 + SECOND, T0);
        assert!(!off.is_sold_out("a", T0));
    }

    #[test]
    fn a_newer_mark_replaces_the_old_one() {
        let mut memory = SoldOutMemory::default();
        memory.remember("a", T0 + SECOND, T0);
        memory.remember("a", T0 + 3 * SECOND, T0 + SECOND / 2);
        assert!(memory.is_sold_out("a", T0 + 2 * SECOND));
        // Last write wins, like shared data: a shorter mark shortens it.
        memory.remember("a", T0 + 2 * SECOND, T0 + SECOND);
        assert!(!memory.is_sold_out("a", T0 + 2 * SECOND));
        assert!(memory.is_empty());
    }

    #[test]
    fn the_memory_is_bounded() {
        let mut memory = SoldOutMemory::new(3);
        memory.remember("a", T0 + 10 * SECOND, T0);
        memory.remember("b", T0 + SECOND, T0);
        memory.remember("c", T0 + 20 * SECOND, T0);
        // Full of fresh marks: the one expiring first makes room.
        memory.remember("d", T0 + 30 * SECOND, T0);
        assert_eq!(memory.len(), 3);
        assert!(!memory.is_sold_out("b", T0));
        for goods in ["a", "c", "d"] {
            assert!(memory.is_sold_out(goods, T0), "{goods}");
        }
        // Expired marks go before fresh ones, all at once.
        memory.remember("e", T0 + 40 * SECOND, T0 + 15 * SECOND);
        assert_eq!(memory.len(), 3);
        for goods in ["c", "d", "e"] {
            assert!(memory.is_sold_out(goods, T0 + 15 * SECOND), "{goods}");
        }
        // Updating a remembered goods needs no room.
        memory.remember("c", T0 + 50 * SECOND, T0 + 15 * SECOND);
        assert_eq!(memory.len(), 3);
        assert!(memory.is_sold_out("c", T0 + 45 * SECOND));
        for i in 0..100 {
            memory.remember(&format!("g{i}"), T0 + 60 * SECOND, T0 + 15 * SECOND);
        }
        assert_eq!(memory.len(), 3);
    }
}
