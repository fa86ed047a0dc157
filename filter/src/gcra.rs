//! Rate-limit arithmetic: GCRA (generic cell rate algorithm).
//!
//! The whole state of a bucket is one number, the theoretical arrival time (TAT, ns since
//! the Unix epoch): the moment the bucket would be empty again if no request came. One u64
//! fits one shared-data value, so every worker thread can update it with one compare-and-swap
//! (see `shared.rs`), and a denied request writes nothing.
//!
//! Pure code: no host calls, unit-tested natively.

/// Slowest accepted rate (one request per 1000 s): keeps the emission interval at most 1e12 ns.
pub const PER_SECOND_MIN: f64 = 0.001;
/// Fastest accepted rate: the emission interval must stay at least 1 ns.
pub const PER_SECOND_MAX: f64 = 1e9;
/// Largest burst.
pub const BURST_MAX: u64 = 1_000_000_000;
/// Longest refill window (`burst / per_second`, about 31 years). Keeps `now + window` far
/// from u64 overflow; anything near it is a configuration mistake anyway.
pub const WINDOW_NS_MAX: u64 = 1_000_000_000_000_000_000;

/// How far a stored TAT may run past our horizon and still be trusted. Worker threads read
/// the clock at slightly different moments, so another thread's write can legitimately be a
/// little ahead; only a larger gap means the clock stepped back. A step smaller than this
/// delays the bucket by at most this much.
pub const CLOCK_STEP_TOLERANCE_NS: u64 = 1_000_000_000;

const NANOS_PER_SECOND: f64 = 1e9;
const NANOS_PER_MILLI: u64 = 1_000_000;

/// A compiled rate: one request every `interval_ns`, up to `burst` at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    interval_ns: u64,
    burst: u64,
}

impl Rate {
    /// Checks the bounds; the error says what is wrong without the field path (the caller
    /// adds it).
    pub fn new(per_second: f64, burst: u64) -> Result<Rate, String> {
        if !per_second.is_finite() || !(PER_SECOND_MIN..=PER_SECOND_MAX).contains(&per_second) {
            return Err(format!(
                "per_second must be a number from {PER_SECOND_MIN} to {PER_SECOND_MAX} (got {per_second})"
            ));
        }
        if !(1..=BURST_MAX).contains(&burst) {
            return Err(format!(
                "burst must be a whole number from 1 to {BURST_MAX} (got {burst})"
            ));
        }
        // In range by the bounds above: 1 <= interval <= 1e12.
        let interval_ns = (NANOS_PER_SECOND / per_second).round().max(1.0) as u64;
        match interval_ns.checked_mul(burst) {
            Some(window) if window <= WINDOW_NS_MAX => Ok(Rate { interval_ns, burst }),
            _ => Err(format!(
                "burst / per_second must be at most {} seconds (got burst {burst}, per_second {per_second})",
                WINDOW_NS_MAX / 1_000_000_000
            )),
        }
    }

    /// Time between two requests at the steady rate.
    pub fn interval_ns(&self) -> u64 {
        self.interval_ns
    }

    /// How far ahead of now the TAT may run: a full burst.
    fn window_ns(&self) -> u64 {
        self.interval_ns.saturating_mul(self.burst)
    }
}

/// What the limiter says about one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Let it through and store this new TAT.
    Allow { tat_ns: u64 },
    /// Refuse; the same request would pass after this long. Nothing is stored.
    Deny { retry_after_ns: u64 },
}

/// Decides one request against a bucket whose stored TAT is `stored_tat_ns` (None: a new
/// bucket). Never panics, whatever the clock does: all arithmetic saturates.
pub fn decide(stored_tat_ns: Option<u64>, now_ns: u64, rate: Rate) -> Decision {
    let horizon = now_ns.saturating_add(rate.window_ns());
    let tat = match stored_tat_ns {
        Some(tat) if tat <= horizon.saturating_add(CLOCK_STEP_TOLERANCE_NS) => tat.max(now_ns),
        // A TAT further ahead than any write could have put it: the wall clock stepped back
        // (or a new configuration shrank the window). Restart the bucket rather than lock it
        // for as long as the step; the step costs at most one burst.
        Some(_) | None => now_ns,
    };
    let new_tat = tat.saturating_add(rate.interval_ns);
    if new_tat <= horizon {
        Decision::Allow { tat_ns: new_tat }
    } else {
        Decision::Deny {
            retry_after_ns: new_tat - horizon,
        }
    }
}

/// Shared-data encoding of a TAT (and of any other u64 the filter stores).
pub fn encode(value: u64) -> [u8; 8] {
    value.to_le_bytes()
}

/// Reads a stored u64; anything that is not exactly 8 bytes counts as absent.
pub fn decode(bytes: &[u8]) -> Option<u64> {
    <[u8; 8]>::try_from(bytes).ok().map(u64::from_le_bytes)
}

/// Milliseconds to tell the client, rounded up so a retry at that moment passes.
pub fn retry_after_ms(retry_after_ns: u64) -> u64 {
    retry_after_ns.div_ceil(NANOS_PER_MILLI)
}

/// The `Retry-After` header value: whole seconds, rounded up, at least 1.
pub fn retry_after_seconds(retry_after_ms: u64) -> u64 {
    retry_after_ms.div_ceil(1000).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: u64 = 1_000_000_000;
    const T0: u64 = 1_700_000_000 * SECOND;

    /// Runs one request through a bucket held in `tat`, as the CAS loop would.
    fn request(tat: &mut Option<u64>, now: u64, rate: Rate) -> Decision {
        let decision = decide(*tat, now, rate);
        if let Decision::Allow { tat_ns } = decision {
            *tat = Some(tat_ns);
        }
        decision
    }

    #[test]
    fn rate_bounds() {
        assert!(Rate::new(0.0, 1).is_err());
        assert!(Rate::new(-1.0, 1).is_err());
        assert!(Rate::new(f64::NAN, 1).is_err());
        assert!(Rate::new(f64::INFINITY, 1).is_err());
        assert!(Rate::new(2e9, 1).is_err());
        assert!(Rate::new(10.0, 0).is_err());
        assert!(Rate::new(10.0, BURST_MAX + 1).is_err());
        assert_eq!(Rate::new(0.5, 1).unwrap().interval_ns(), 2 * SECOND);
        assert_eq!(Rate::new(1000.0, 1).unwrap().interval_ns(), 1_000_000);
        assert_eq!(Rate::new(3.0, 1).unwrap().interval_ns(), 333_333_333);
        assert_eq!(
            Rate::new(PER_SECOND_MAX, BURST_MAX).unwrap().interval_ns(),
            1
        );
        // Big bursts are fine at a fast rate (the e2e bench uses 1e8/s, burst 1e8)...
        assert!(Rate::new(1e8, 100_000_000).is_ok());
        assert!(Rate::new(PER_SECOND_MIN, 1).is_ok());
        // ...but the refill window is bounded, so `now + window` never nears overflow.
        let e = Rate::new(PER_SECOND_MIN, BURST_MAX).unwrap_err();
        assert!(e.contains("burst / per_second must be at most"), "{e}");
        let widest = Rate::new(PER_SECOND_MIN, 1_000_000).unwrap();
        assert_eq!(widest.window_ns(), WINDOW_NS_MAX);
    }

    #[test]
    fn burst_then_steady_rate() {
        // 10 per second, burst 5: five at once, then one every 100 ms.
        let rate = Rate::new(10.0, 5).unwrap();
        let mut tat = None;
        for i in 0..5 {
            assert!(
                matches!(request(&mut tat, T0, rate), Decision::Allow { .. }),
                "burst request {i}"
            );
        }
        assert_eq!(
            request(&mut tat, T0, rate),
            Decision::Deny {
                retry_after_ns: SECOND / 10
            }
        );
        // 50 ms later: still 50 ms to wait.
        assert_eq!(
            request(&mut tat, T0 + SECOND / 20, rate),
            Decision::Deny {
                retry_after_ns: SECOND / 20
            }
        );
        // Steady state: one per interval passes, a second one in the same interval does not.
        for step in 1..=20 {
            let now = T0 + step * SECOND / 10;
            assert!(matches!(
                request(&mut tat, now, rate),
                Decision::Allow { .. }
            ));
            assert!(matches!(
                request(&mut tat, now, rate),
                Decision::Deny { .. }
            ));
        }
        // After a long pause the full burst is back, and no more.
        let later = T0 + 100 * SECOND;
        for _ in 0..5 {
            assert!(matches!(
                request(&mut tat, later, rate),
                Decision::Allow { .. }
            ));
        }
        assert!(matches!(
            request(&mut tat, later, rate),
            Decision::Deny { .. }
        ));
    }

    #[test]
    fn burst_of_one_is_a_plain_rate() {
        let rate = Rate::new(0.5, 1).unwrap();
        let mut tat = None;
        assert_eq!(
            request(&mut tat, T0, rate),
            Decision::Allow {
                tat_ns: T0 + 2 * SECOND
            }
        );
        assert_eq!(
            request(&mut tat, T0 + SECOND, rate),
            Decision::Deny {
                retry_after_ns: SECOND
            }
        );
        assert!(matches!(
            request(&mut tat, T0 + 2 * SECOND, rate),
            Decision::Allow { .. }
        ));
    }

    #[test]
    fn retry_after_values() {
        assert_eq!(retry_after_ms(1), 1);
        assert_eq!(retry_after_ms(1_000_000), 1);
        assert_eq!(retry_after_ms(1_000_001), 2);
        assert_eq!(retry_after_ms(0), 0);
        assert_eq!(retry_after_seconds(0), 1);
        assert_eq!(retry_after_seconds(1), 1);
        assert_eq!(retry_after_seconds(1000), 1);
        assert_eq!(retry_after_seconds(1001), 2);
        assert_eq!(retry_after_seconds(u64::MAX), u64::MAX.div_ceil(1000));
        // The retry-after from a denial really is the wait: a retry then passes.
        let rate = Rate::new(3.0, 2).unwrap();
        let mut tat = None;
        request(&mut tat, T0, rate);
        request(&mut tat, T0, rate);
        let Decision::Deny { retry_after_ns } = request(&mut tat, T0, rate) else {
            panic!("third request should be denied");
        };
        assert!(matches!(
            request(&mut tat, T0 + retry_after_ns - 1, rate),
            Decision::Deny { .. }
        ));
        assert!(matches!(
            request(&mut tat, T0 + retry_after_ns, rate),
            Decision::Allow { .. }
        ));
    }

    #[test]
    fn time_going_backwards_does_not_panic_or_lock() {
        let rate = Rate::new(10.0, 5).unwrap();
        let mut tat = None;
        for _ in 0..5 {
            request(&mut tat, T0, rate);
        }
        // Another thread read the clock a little earlier: the bucket is still full, and the
        // wait is a little longer, not a free pass.
        let earlier = T0 - SECOND / 1000;
        assert_eq!(
            request(&mut tat, earlier, rate),
            Decision::Deny {
                retry_after_ns: SECOND / 10 + SECOND / 1000
            }
        );
        // The clock steps back an hour: the bucket restarts (one burst, no more) instead of
        // staying locked for an hour.
        let back = T0 - 3600 * SECOND;
        for _ in 0..5 {
            assert!(matches!(
                request(&mut tat, back, rate),
                Decision::Allow { .. }
            ));
        }
        assert_eq!(
            request(&mut tat, back, rate),
            Decision::Deny {
                retry_after_ns: SECOND / 10
            }
        );
        assert!(matches!(
            request(&mut tat, back + SECOND / 10, rate),
            Decision::Allow { .. }
        ));
        // Extremes do not overflow; a TAT absurdly far ahead restarts the bucket.
        assert!(matches!(
            decide(Some(u64::MAX), 0, rate),
            Decision::Allow { tat_ns } if tat_ns == SECOND / 10
        ));
        assert!(matches!(
            decide(Some(0), u64::MAX, rate),
            Decision::Allow { .. }
        ));
        assert!(matches!(
            decide(None, u64::MAX, rate),
            Decision::Allow { .. }
        ));
        assert!(matches!(
            decide(Some(u64::MAX), u64::MAX, rate),
            Decision::Allow { .. } | Decision::Deny { .. }
        ));
    }

    #[test]
    fn encoding_round_trips_and_rejects_wrong_sizes() {
        assert_eq!(decode(&encode(T0)), Some(T0));
        assert_eq!(decode(&[1, 2, 3]), None);
        assert_eq!(decode(&[0; 9]), None);
        assert_eq!(decode(&[]), None);
    }
}
