//! The filter's counters (README, "Stats"): defined once per root context, incremented by the
//! root and its requests.

use super::{Host, HostStatus};
use crate::config::Mode;
use crate::reply::GateOutcome;
use crate::stat_names;

/// Counter ids, defined once per root context.
pub(crate) struct Stats {
    outcomes: [u32; GateOutcome::ALL.len()],
    /// What shadow mode would have answered, per outcome (`seckill.shadow.<outcome>`).
    shadow_outcomes: [u32; GateOutcome::ALL.len()],
    pub(crate) callout_sent: u32,
    pub(crate) callout_attempts: u32,
    pub(crate) callout_failed: u32,
    pub(crate) sold_out_cache_hit: u32,
    pub(crate) passthrough: u32,
    pub(crate) headers_stripped: u32,
    pub(crate) release_sent: u32,
    pub(crate) release_failed: u32,
    pub(crate) upstream_unknown: u32,
    pub(crate) unknown_goods_cache_hit: u32,
    pub(crate) claim_sent: u32,
    pub(crate) claim_ids: u32,
    pub(crate) claim_failed: u32,
    pub(crate) claim_dropped: u32,
}

impl Stats {
    pub(crate) fn define(host: &impl Host) -> Result<Stats, HostStatus> {
        let counter = |name: &str| host.define_counter(name);
        let mut outcomes = [0; GateOutcome::ALL.len()];
        let mut shadow_outcomes = [0; GateOutcome::ALL.len()];
        for ((id, shadow_id), outcome) in outcomes
            .iter_mut()
            .zip(shadow_outcomes.iter_mut())
            .zip(GateOutcome::ALL)
        {
            *id = counter(&outcome.stat_name())?;
            *shadow_id = counter(&outcome.shadow_stat_name())?;
        }
        Ok(Stats {
            outcomes,
            shadow_outcomes,
            callout_sent: counter(stat_names::CALLOUT_SENT)?,
            callout_attempts: counter(stat_names::CALLOUT_ATTEMPTS)?,
            callout_failed: counter(stat_names::CALLOUT_FAILED)?,
            sold_out_cache_hit: counter(stat_names::SOLD_OUT_CACHE_HIT)?,
            passthrough: counter(stat_names::PASSTHROUGH)?,
            headers_stripped: counter(stat_names::HEADERS_STRIPPED)?,
            release_sent: counter(stat_names::RELEASE_SENT)?,
            release_failed: counter(stat_names::RELEASE_FAILED)?,
            upstream_unknown: counter(stat_names::UPSTREAM_UNKNOWN)?,
            unknown_goods_cache_hit: counter(stat_names::UNKNOWN_GOODS_CACHE_HIT)?,
            claim_sent: counter(stat_names::CLAIM_SENT)?,
            claim_ids: counter(stat_names::CLAIM_IDS)?,
            claim_failed: counter(stat_names::CLAIM_FAILED)?,
            claim_dropped: counter(stat_names::CLAIM_DROPPED)?,
        })
    }

    pub(crate) fn add(host: &impl Host, counter: u32, count: usize) {
        // A lost increment is not worth failing a request over.
        let _ = host.increment_counter(counter, i64::try_from(count).unwrap_or(i64::MAX));
    }

    /// The counter of a finished sale request's outcome, as enforced or as a dry run.
    pub(crate) fn outcome_counter(&self, outcome: GateOutcome, mode: Mode) -> Option<u32> {
        let counters = match mode {
            Mode::Enforce => &self.outcomes,
            Mode::Shadow => &self.shadow_outcomes,
        };
        counters.get(outcome.index()).copied()
    }
}
