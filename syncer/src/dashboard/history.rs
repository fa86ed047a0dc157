//! One goods' recent samples: a ring of fixed capacity, so a sale that runs for days costs
//! the same memory as one that runs for a minute.

use std::collections::VecDeque;

use serde::Serialize;

use super::tally::{Answer, PerAnswer};

/// One store's counters of a sale: reconcile's type, for Redis's side as for MySQL's.
pub use crate::reconcile::StoredStock as Stock;

/// A goods at one moment.
#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    /// Wall-clock milliseconds (the syncer's clock) when it was read.
    pub at_ms: i64,
    /// Redis's counters (absent: no sale in Redis, or Redis could not be read).
    pub redis: Option<Stock>,
    /// MySQL's counters (absent: MySQL could not be read).
    pub mysql: Option<Stock>,
    /// Events in the goods' outbox, not yet confirmed by Kafka (absent: unreadable).
    pub outbox: Option<u64>,
    /// This syncer's answers for the goods since it started (running totals: the page and
    /// [`History::rates`] take differences).
    pub answers: PerAnswer<u64>,
}

pub struct History {
    samples: VecDeque<Sample>,
    capacity: usize,
}

impl History {
    pub fn new(capacity: usize) -> Self {
        History {
            samples: VecDeque::with_capacity(capacity),
            capacity: capacity.max(1),
        }
    }

    pub fn push(&mut self, sample: Sample) {
        if self.samples.len() >= self.capacity {
            self.samples.pop_front();
        }
        self.samples.push_back(sample);
    }

    pub fn latest(&self) -> Option<&Sample> {
        self.samples.back()
    }

    /// The samples taken after `since_ms`, oldest first.
    pub fn since(&self, since_ms: i64) -> Vec<Sample> {
        self.samples
            .iter()
            .filter(|s| s.at_ms > since_ms)
            .cloned()
            .collect()
    }

    /// Answers per second over the last `window` intervals (fewer while the history is
    /// shorter): smooth enough to read, recent enough to follow a sale's first seconds.
    pub fn rates(&self, window: usize) -> PerAnswer<f64> {
        let (Some(last), Some(first)) = (
            self.samples.back(),
            self.samples
                .get(self.samples.len().saturating_sub(window.max(1) + 1)),
        ) else {
            return PerAnswer::default();
        };
        let seconds = (last.at_ms - first.at_ms) as f64 / 1000.0;
        if seconds <= 0.0 {
            return PerAnswer::default();
        }
        PerAnswer::from_fn(|a: Answer| {
            // A goods that lost its place in the tally starts again from zero: no negative rate.
            last.answers.get(a).saturating_sub(first.answers.get(a)) as f64 / seconds
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(at_ms: i64, won: u64, sold_out: u64) -> Sample {
        Sample {
            at_ms,
            redis: None,
            mysql: None,
            outbox: None,
            answers: PerAnswer {
                won,
                sold_out,
                ..PerAnswer::default()
            },
        }
    }

    #[test]
    fn the_ring_keeps_the_newest_samples() {
        let mut history = History::new(3);
        for i in 0..5 {
            history.push(sample(i * 1000, i as u64, 0));
        }
        let kept: Vec<i64> = history.since(i64::MIN).iter().map(|s| s.at_ms).collect();
        assert_eq!(kept, [2000, 3000, 4000]);
        assert_eq!(history.since(3000).len(), 1);
        assert_eq!(history.latest().map(|s| s.at_ms), Some(4000));
    }

    #[test]
    fn rates_are_taken_over_the_window() {
        let mut history = History::new(10);
        assert_eq!(history.rates(2), PerAnswer::default());
        history.push(sample(0, 0, 0));
        assert_eq!(
            history.rates(2),
            PerAnswer::default(),
            "one sample: no interval"
        );
        history.push(sample(1000, 100, 0));
        history.push(sample(2000, 100, 50));
        history.push(sample(3000, 130, 50));
        let rates = history.rates(2);
        assert_eq!(rates.won, 15.0, "30 won over the last 2 s");
        assert_eq!(rates.sold_out, 25.0);
        assert_eq!(history.rates(100).won, 130.0 / 3.0, "the whole history");
    }

    #[test]
    fn totals_that_restart_give_no_negative_rate() {
        let mut history = History::new(10);
        history.push(sample(0, 40, 0));
        history.push(sample(1000, 3, 0));
        assert_eq!(history.rates(1).won, 0.0);
    }
}
