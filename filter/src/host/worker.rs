//! What the root context and every request of one worker share, and the acts both carry out
//! on a request: forward a winner, answer locally, fail by the failure mode, remember what an
//! answer taught.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::time::Duration;

use super::stats::Stats;
use super::{duration_ns, now_ns, warn, Host, HostStatus};
use crate::batch::{Batcher, Decided, Waiter};
use crate::claims::Claims;
use crate::config::{Config, FailureMode, Mode};
use crate::input::Purchase;
use crate::local::LocalMemory;
use crate::reply::{self, CalloutFailure, GateOutcome, LocalReply, Remember, Verdict, Winner};
use crate::shared;

/// What the root and every request of one worker share.
pub(crate) struct Worker<H> {
    pub(crate) host: H,
    pub(crate) config: Rc<Config>,
    pub(crate) stats: Rc<Stats>,
    /// This worker's memory of sold-out marks and rate-limit refusals (see `local.rs`).
    pub(crate) memory: Rc<RefCell<LocalMemory>>,
    /// Requests waiting for a decision and the callouts carrying them (see `batch.rs`).
    pub(crate) batcher: Rc<RefCell<Batcher>>,
    /// Order ids of forwarded winners, waiting to be claimed (see `claims.rs`).
    pub(crate) claims: Rc<RefCell<Claims>>,
    /// The shared queue whose `on_queue_ready` wakes this worker's root.
    pub(crate) wake_queue: u32,
    /// Release calls out, by token: the request that made each. Envoy makes every callout
    /// on behalf of the root context and delivers its answer there (see `dispatch.rs`).
    pub(crate) releases: Rc<RefCell<HashMap<u32, u32>>>,
}

impl<H: Host> Worker<H> {
    pub(crate) fn share(&self) -> Worker<H> {
        Worker {
            host: self.host.clone(),
            config: Rc::clone(&self.config),
            stats: Rc::clone(&self.stats),
            memory: Rc::clone(&self.memory),
            batcher: Rc::clone(&self.batcher),
            claims: Rc::clone(&self.claims),
            wake_queue: self.wake_queue,
            releases: Rc::clone(&self.releases),
        }
    }

    pub(crate) fn now_ns(&self) -> u64 {
        now_ns(&self.host)
    }

    pub(crate) fn add(&self, counter: u32, count: usize) {
        Stats::add(&self.host, counter, count);
    }

    pub(crate) fn bump(&self, counter: u32) {
        self.add(counter, 1);
    }

    fn count_outcome(&self, outcome: GateOutcome, mode: Mode) {
        if let Some(counter) = self.stats.outcome_counter(outcome, mode) {
            self.bump(counter);
        }
    }

    /// POSTs to the syncer as the effective context (JSON when there is a body); the
    /// callout's token.
    pub(crate) fn post_to_syncer(
        &self,
        path: &str,
        body: Option<&[u8]>,
        timeout: Duration,
    ) -> Result<u32, HostStatus> {
        let deduct = &self.config.deduct;
        let headers = [
            (":method", "POST"),
            (":path", path),
            (":authority", deduct.authority.as_str()),
            (seckill_api::SECRET_HEADER, deduct.secret.as_str()),
            ("content-type", "application/json"),
        ];
        // A call without a body (a release) says nothing about a content type.
        let headers = if body.is_some() {
            &headers[..]
        } else {
            &headers[..4]
        };
        self.host
            .dispatch_http_call(&deduct.cluster, headers, body, timeout)
    }

    /// Remembers, for every worker of this Envoy, that the goods has nothing left.
    fn cache_sold_out(&self, purchase: &Purchase) {
        if !self.config.sold_out_cache.is_zero() {
            let now = self.now_ns();
            let until_ns = now.saturating_add(duration_ns(self.config.sold_out_cache));
            let mut memory = self.memory.borrow_mut();
            shared::mark_sold_out(&self.host, &mut memory, purchase.goods_id(), until_ns, now);
        }
    }

    /// Carries out the stock service's verdict on the request that is the effective
    /// context, in the request's mode, except resuming it: the caller resumes on `Won`,
    /// `FailedOpen` and `Shadowed`.
    pub(crate) fn carry_out(
        &self,
        waiter: &Waiter,
        verdict: Result<Verdict, CalloutFailure>,
        log_failure: bool,
    ) -> Decided {
        let purchase = &waiter.purchase;
        if let Ok(verdict) = &verdict {
            // Only a goods without a bucket of its own needs confirming.
            if waiter.probe && verdict.confirms_goods() {
                let limits = &self.config.rate_limit;
                shared::confirm_goods(&self.host, limits, purchase.goods_id());
            }
        }
        match verdict {
            Ok(Verdict::Forward(winner)) => {
                // The last unit just went: the next buyer need not ask the syncer.
                if winner.remaining == Some(0) {
                    self.cache_sold_out(purchase);
                }
                self.forward_winner(purchase, winner, waiter.mode)
            }
            Ok(Verdict::Answer { reply, remember }) => {
                match remember {
                    Remember::SoldOut => self.cache_sold_out(purchase),
                    Remember::UnknownGoods => self.cache_unknown(purchase),
                    Remember::Nothing => {}
                }
                self.answer(reply, waiter.mode)
            }
            Err(failure) => self.fail(purchase, &failure, log_failure, waiter.mode),
        }
    }

    /// Remembers, in this worker only, that the stock service sells no such goods.
    fn cache_unknown(&self, purchase: &Purchase) {
        if !self.config.unknown_goods_cache.is_zero() {
            let now = self.now_ns();
            let until_ns = now.saturating_add(duration_ns(self.config.unknown_goods_cache));
            let mut memory = self.memory.borrow_mut();
            memory.remember_unknown(purchase.goods_id(), until_ns, now);
        }
    }

    fn forward_winner(&self, purchase: &Purchase, winner: Winner, mode: Mode) -> Decided {
        let won = GateOutcome::Decided(seckill_api::Outcome::Won);
        match mode {
            Mode::Enforce => {
                // Added, not set: every `x-seckill-*` header was stripped on arrival, so
                // there is no copy to replace, and Envoy need not look for one (about 1% of
                // its cost of a winner, BENCHMARKS.md). Refused only when the request is
                // gone, which then needs no headers.
                for (name, value) in reply::winner_request_headers(purchase, &winner) {
                    let _ = self.host.add_request_header(name, &value);
                }
            }
            // No order id: the shop must not take a dry run's request for one that passed
            // the gate. Refused only when the request is gone.
            Mode::Shadow => {
                let _ = self
                    .host
                    .set_request_header(seckill_api::SHADOW_HEADER, won.as_str());
            }
        }
        // Delivered: claim the reservation on the next tick, so it lives for its payment
        // window rather than the claim window. In shadow mode too: the reservation is real,
        // and keeping its normal life (claim, release on a failed shop answer, lapse at its
        // deadline, as nobody confirms it) makes the dry run's stock behave as the sale's.
        self.claims.borrow_mut().add(winner.order_id.clone());
        self.count_outcome(won, mode);
        Decided::Won {
            order_id: winner.order_id,
            request_id: purchase.request_id().to_string(),
            mode,
        }
    }

    /// This worker told the buyer to retry with this request id: its retry skips the
    /// sold-out marks for a while (see `local.rs`).
    pub(crate) fn expect_retry(&self, request_id: &str) {
        let now = self.now_ns();
        let until_ns = now.saturating_add(crate::local::RETRY_REMEMBERED_NS);
        if let Ok(mut memory) = self.memory.try_borrow_mut() {
            memory.remember_retry(request_id, until_ns);
        }
    }

    /// No usable answer from the stock service: refuse (closed) or forward unmarked
    /// (open); in shadow mode, forward marked with either.
    pub(crate) fn fail(
        &self,
        purchase: &Purchase,
        failure: &CalloutFailure,
        log: bool,
        mode: Mode,
    ) -> Decided {
        self.bump(self.stats.callout_failed);
        self.expect_retry(purchase.request_id());
        let deduct = &self.config.deduct;
        if log {
            warn(
                &self.host,
                format_args!(
                    "seckill-filter: deduct call to cluster {:?} for goods {} (request id {}) {failure}; failure mode {}{}",
                    deduct.cluster,
                    purchase.goods_id(),
                    purchase.request_id(),
                    failure_mode_words(deduct.failure_mode),
                    shadow_words(mode)
                ),
            );
        }
        match deduct.failure_mode {
            FailureMode::Closed => {
                let reply = reply::unavailable_after(failure, purchase.request_id());
                self.answer(reply, mode)
            }
            FailureMode::Open if mode == Mode::Shadow => self.shadow(GateOutcome::FailedOpen),
            FailureMode::Open => {
                // Refused only when the request is gone, which then goes nowhere.
                let _ = self
                    .host
                    .set_request_header(seckill_api::GATE_STATUS_HEADER, reply::FAILED_OPEN_VALUE);
                self.count_outcome(GateOutcome::FailedOpen, Mode::Enforce);
                Decided::FailedOpen
            }
        }
    }

    /// Sends a local reply, and the request goes no further; in shadow mode forwards the
    /// request instead, marked with the reply's outcome.
    pub(crate) fn answer(&self, reply: LocalReply, mode: Mode) -> Decided {
        if mode == Mode::Shadow {
            return self.shadow(reply.outcome);
        }
        self.count_outcome(reply.outcome, Mode::Enforce);
        // Refused only when the request is gone: nobody is left to answer.
        let _ = self.host.send_local_reply(&reply);
        Decided::Answered
    }

    /// Shadow mode: the request goes on as the buyer sent it (its gate headers already
    /// stripped), marked with what the gate would have answered; the caller resumes it.
    fn shadow(&self, outcome: GateOutcome) -> Decided {
        self.count_outcome(outcome, Mode::Shadow);
        // The gate's own value replaces anything else: a client's copy was stripped on
        // arrival, and `set` replaces. Refused only when the request is gone.
        let _ = self
            .host
            .set_request_header(seckill_api::SHADOW_HEADER, outcome.as_str());
        Decided::Shadowed
    }
}

fn shadow_words(mode: Mode) -> &'static str {
    match mode {
        Mode::Enforce => "",
        Mode::Shadow => " (shadow mode: forwarding it, marked, instead)",
    }
}

pub(crate) fn failure_mode_words(mode: FailureMode) -> &'static str {
    match mode {
        FailureMode::Closed => "closed: answering 503",
        FailureMode::Open => "open: forwarding without an order id",
    }
}
