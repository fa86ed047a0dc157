//! The root context of one worker: reads the configuration, defines the stats, and owns the
//! deduct calls that carry batches of waiting requests (see `batch.rs`) and the claim calls
//! of the winners it forwarded (see `claims.rs`). It settles each answer onto the requests
//! that waited for it, acting as each request in turn.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::time::Duration;

use super::request::SaleRequest;
use super::stats::Stats;
use super::worker::{failure_mode_words, Worker};
use super::{duration_ns, error, log, now_ns, warn, Host, HostStatus, LogLevel};
use crate::batch::{self, Batcher, Decided, Waiter};
use crate::claims::{self, Claims};
use crate::config::Config;
use crate::reply::{self, CalloutFailure, Verdict};
use crate::{shared, BAD_CONFIG_LOG_PREFIX};

/// How often the root looks at its batcher unprompted: a bound on how long a request can
/// wait should a wake-up ever be lost.
pub(crate) const TICK: Duration = Duration::from_secs(1);

pub struct Root<H: Host> {
    host: H,
    context_id: u32,
    /// Set by a successful `configure`; Envoy creates no request context before that.
    worker: Option<Worker<H>>,
    /// Kept across reconfigurations: requests may be waiting in it.
    batcher: Rc<RefCell<Batcher>>,
    /// Kept across reconfigurations: forwarded winners wait in it to be claimed.
    claims: Rc<RefCell<Claims>>,
    /// Kept across reconfigurations: release calls of requests, by token.
    releases: Rc<RefCell<HashMap<u32, u32>>>,
    wake_queue: Option<u32>,
    /// Whether this worker has said that `deduct.cluster` names no cluster of this Envoy
    /// since its last call went out: said once, not once per batch, as every buyer meets it.
    missing_cluster_reported: Cell<bool>,
}

impl<H: Host> Root<H> {
    pub fn new(host: H, context_id: u32) -> Self {
        Root {
            host,
            context_id,
            worker: None,
            batcher: Rc::default(),
            claims: Rc::default(),
            releases: Rc::default(),
            wake_queue: None,
            missing_cluster_reported: Cell::new(false),
        }
    }

    /// `on_configure`: reads and checks the plugin configuration, defines the stats, takes a
    /// wake-up queue and starts the tick. False (after one log line) refuses the filter.
    pub fn configure(&mut self) -> bool {
        let bytes = match self.host.plugin_configuration() {
            Ok(bytes) => bytes,
            Err(status) => {
                error(
                    &self.host,
                    format_args!("seckill-filter: cannot read the plugin configuration: {status}"),
                );
                return false;
            }
        };
        let config = match Config::from_json(bytes.as_deref()) {
            Ok(config) => config,
            Err(e) => {
                // Exactly one line; returning false makes Envoy refuse the filter.
                error(&self.host, format_args!("{BAD_CONFIG_LOG_PREFIX}{e}"));
                return false;
            }
        };
        let stats = match Stats::define(&self.host) {
            Ok(stats) => stats,
            Err(status) => {
                error(
                    &self.host,
                    format_args!("seckill-filter: could not define stats: {status}"),
                );
                return false;
            }
        };
        let wake_queue = match self.register_wake_queue() {
            Ok(queue) => queue,
            Err(why) => {
                error(&self.host, format_args!("seckill-filter: {why}"));
                return false;
            }
        };
        if let Err(status) = self.host.set_tick_period(TICK) {
            error(
                &self.host,
                format_args!("seckill-filter: could not set the tick period: {status}"),
            );
            return false;
        }
        // A new configuration may name another cluster: its absence is news again.
        self.missing_cluster_reported.set(false);
        self.worker = Some(Worker {
            host: self.host.clone(),
            config: Rc::new(config),
            stats: Rc::new(stats),
            // What was remembered under an earlier configuration (other rates, another
            // sold-out window) does not hold under this one.
            memory: Rc::default(),
            batcher: Rc::clone(&self.batcher),
            claims: Rc::clone(&self.claims),
            wake_queue,
            releases: Rc::clone(&self.releases),
        });
        true
    }

    /// A new request context; `None` before a configuration was accepted.
    pub fn new_request(&self, context_id: u32) -> Option<SaleRequest<H>> {
        let worker = self.worker.as_ref()?;
        Some(SaleRequest::new(context_id, worker.share()))
    }

    /// The request whose release call `token` is, if it is one (forgotten as it is asked:
    /// every call is answered once). Envoy delivers a request's callout answer to the root.
    pub fn release_caller(&self, token: u32) -> Option<u32> {
        self.releases.borrow_mut().remove(&token)
    }

    /// `on_queue_ready`: a request found the batcher idle and woke the root.
    pub fn wake(&mut self, queue_id: u32) {
        // Empty the queue (its entries only say "wake up"); bounded, as every enqueue
        // matches a request that waits.
        for _ in 0..=batch::WAITING_MAX {
            match self.host.dequeue_shared_queue(queue_id) {
                Ok(Some(_)) => continue,
                _ => break,
            }
        }
        self.batcher.borrow_mut().woken();
        self.pump();
    }

    /// `on_tick`: sends what waits (a lost wake-up costs at most a tick) and the claims.
    pub fn tick(&mut self) {
        self.batcher.borrow_mut().woken();
        self.pump();
        self.send_claims(true);
    }

    /// `on_http_call_response` of a deduct or claim call.
    pub fn callout_answered(&mut self, token_id: u32, num_headers: usize, body_size: usize) {
        if self.claims.borrow().owns(token_id) {
            self.finish_claims(token_id, num_headers, body_size);
            return;
        }
        let Some(waiters) = self.batcher.borrow_mut().answered(token_id) else {
            warn(
                &self.host,
                format_args!(
                "seckill-filter: ignoring a deduct response (token {token_id}) nobody waits for"
            ),
            );
            return;
        };
        if let Some(worker) = &self.worker {
            match self.read_batch_response(num_headers, body_size, waiters.len()) {
                Ok(items) => {
                    // `read_batch_response` checked there is one item per waiter; they
                    // pair by position. An attempt refused on its own is logged on its own.
                    let settled = waiters.into_iter().zip(items).map(|(waiter, item)| {
                        let verdict = reply::item_verdict(&waiter.purchase, item);
                        (waiter, verdict)
                    });
                    self.settle(worker, settled, true);
                }
                Err(failure) => self.settle_all(worker, waiters, &failure),
            }
        }
        // Whoever arrived while this call was out leaves now, and so do full claim calls
        // of the winners it forwarded.
        self.pump();
        self.send_claims(false);
    }

    /// A queue name no other worker of this Envoy uses (see `shared::claim_worker_number`).
    fn register_wake_queue(&mut self) -> Result<u32, String> {
        if let Some(queue) = self.wake_queue {
            return Ok(queue);
        }
        let number = shared::claim_worker_number(&self.host)
            .ok_or("could not claim a worker number in shared data")?;
        let name = format!("seckill.batch.wake.{number}");
        let queue = self
            .host
            .register_shared_queue(&name)
            .map_err(|status| format!("could not register shared queue {name}: {status}"))?;
        self.wake_queue = Some(queue);
        Ok(queue)
    }

    /// Sends every batch that may leave now and fails requests that waited too long.
    /// Runs as the root (the effective context), so the callouts are the root's.
    fn pump(&self) {
        let Some(worker) = &self.worker else { return };
        let deduct = &worker.config.deduct;
        // Bounded: each pass either sends a batch (at most CALLOUTS_IN_FLIGHT_MAX can be
        // out) or fails one, and the queue holds at most WAITING_MAX requests.
        loop {
            let now = now_ns(&self.host);
            let next = self
                .batcher
                .borrow_mut()
                .next_batch(now, duration_ns(deduct.timeout));
            if !next.expired.is_empty() {
                let waited_ms = next
                    .expired
                    .first()
                    .map(|w| now.saturating_sub(w.queued_ns) / 1_000_000)
                    .unwrap_or(0);
                let failure = CalloutFailure::Waited(waited_ms);
                self.settle_all(worker, next.expired, &failure);
            }
            if next.batch.is_empty() {
                return;
            }
            let timeout_ms = u64::try_from(deduct.timeout.as_millis()).unwrap_or(u64::MAX);
            let sent = batch::batch_body(&next.batch, timeout_ms)
                .map_err(|e| CalloutFailure::Dispatch(e.to_string()))
                .and_then(|body| {
                    let path = seckill_api::DEDUCT_BATCH_PATH;
                    worker
                        .post_to_syncer(path, Some(&body), deduct.timeout)
                        .map_err(refused_call)
                });
            match sent {
                Ok(token) => {
                    self.call_went_out(worker);
                    worker.bump(worker.stats.callout_sent);
                    worker.add(worker.stats.callout_attempts, next.batch.len());
                    self.batcher.borrow_mut().sent(token, next.batch);
                }
                Err(failure) => self.settle_all(worker, next.batch, &failure),
            }
        }
    }

    /// Carries out a verdict for each waiting request, acting as that request, then acts
    /// as the root again. A request that has ended meanwhile is skipped.
    fn settle(
        &self,
        worker: &Worker<H>,
        settled: impl IntoIterator<Item = (Waiter, Result<Verdict, CalloutFailure>)>,
        log_each_failure: bool,
    ) {
        for (waiter, verdict) in settled {
            if waiter.gone || self.host.set_effective_context(waiter.context_id).is_err() {
                continue;
            }
            let decided = worker.carry_out(&waiter, verdict, log_each_failure);
            let forwarded = matches!(
                decided,
                Decided::Won { .. } | Decided::FailedOpen | Decided::Shadowed
            );
            if forwarded {
                // Refused only when the request is gone, which then goes nowhere.
                let _ = self.host.continue_request();
            }
            *waiter.ticket.borrow_mut() = Some(decided);
        }
        // The root's own context always exists while its callback runs.
        let _ = self.host.set_effective_context(self.context_id);
    }

    /// Settles every waiter with the same failure, logged once for all of them.
    fn settle_all(&self, worker: &Worker<H>, waiters: Vec<Waiter>, failure: &CalloutFailure) {
        let deduct = &worker.config.deduct;
        if let CalloutFailure::NoSuchCluster(status) = failure {
            self.report_missing_cluster(worker, status);
        } else {
            warn(
                &self.host,
                format_args!(
                    "seckill-filter: deduct call to cluster {:?} for {} attempts {failure}; failure mode {}",
                    deduct.cluster,
                    waiters.len(),
                    failure_mode_words(deduct.failure_mode)
                ),
            );
        }
        let settled = waiters.into_iter().map(|w| (w, Err(failure.clone())));
        self.settle(worker, settled, false);
    }

    /// Says, once per worker until a call goes out again, that `deduct.cluster` names no
    /// cluster of this Envoy. Proxy-wasm cannot list the clusters, so a typo passes
    /// `envoy --mode validate` and on_configure alike; the first call is where it shows.
    fn report_missing_cluster(&self, worker: &Worker<H>, status: &str) {
        if self.missing_cluster_reported.replace(true) {
            return;
        }
        let deduct = &worker.config.deduct;
        error(
            &self.host,
            format_args!(
                "seckill-filter: deduct.cluster {:?} is not a cluster of this Envoy (dispatch_http_call: {status}): no purchase can be decided; failure mode {}. Define the cluster or correct deduct.cluster (said once per worker until a call goes out)",
                deduct.cluster,
                failure_mode_words(deduct.failure_mode)
            ),
        );
    }

    /// A call went out: a cluster reported missing is there now (delivered late by the
    /// control plane, say), and saying so closes the story the log told.
    fn call_went_out(&self, worker: &Worker<H>) {
        if self.missing_cluster_reported.replace(false) {
            log(
                &self.host,
                LogLevel::Info,
                format_args!(
                    "seckill-filter: deduct.cluster {:?} takes calls again",
                    worker.config.deduct.cluster
                ),
            );
        }
    }

    /// Sends the forwarded winners' order ids to the syncer: full calls at once, the rest
    /// when `flush` (the tick). Bounded by the claim calls a worker may keep out.
    fn send_claims(&self, flush: bool) {
        let Some(worker) = &self.worker else { return };
        let dropped = self.claims.borrow_mut().take_dropped();
        if dropped > 0 {
            worker.add(worker.stats.claim_dropped, dropped as usize);
            warn(&self.host, format_args!("seckill-filter: dropped {dropped} unsent claims (too many waited); those reservations are released when the claim window ends"));
        }
        for _ in 0..claims::CLAIM_CALLS_IN_FLIGHT_MAX {
            if !self.send_one_claim_call(worker, flush) {
                return;
            }
        }
    }

    /// Sends one claim call if one may go; false when none went.
    fn send_one_claim_call(&self, worker: &Worker<H>, flush: bool) -> bool {
        let Some(ids) = self.claims.borrow_mut().next_call(flush) else {
            return false;
        };
        let dispatched = claims::claim_body(&ids)
            .map_err(|e| CalloutFailure::Dispatch(e.to_string()))
            .and_then(|body| {
                let timeout = claims::CLAIM_CALL_TIMEOUT;
                worker
                    .post_to_syncer(seckill_api::CLAIM_PATH, Some(&body), timeout)
                    .map_err(refused_call)
            });
        match dispatched {
            Ok(token) => {
                self.call_went_out(worker);
                worker.bump(worker.stats.claim_sent);
                worker.add(worker.stats.claim_ids, ids.len());
                self.claims.borrow_mut().sent(token, ids);
                true
            }
            Err(failure) => {
                worker.bump(worker.stats.claim_failed);
                let count = ids.len();
                if let CalloutFailure::NoSuchCluster(status) = &failure {
                    self.report_missing_cluster(worker, status);
                } else {
                    warn(
                        &self.host,
                        format_args!("seckill-filter: claim call for {count} order ids {failure}; sent again next tick"),
                    );
                }
                self.claims.borrow_mut().not_sent(ids);
                false
            }
        }
    }

    /// The claim call came back: what failed is claimed again on the next tick.
    fn finish_claims(&self, token_id: u32, num_headers: usize, body_size: usize) {
        let (status, body) = if num_headers == 0 || body_size > reply::BATCH_REPLY_BYTES_MAX {
            (None, None)
        } else {
            self.call_response(body_size)
        };
        let retry = claims::read_claim_response(status.as_deref(), body.as_deref());
        if retry == claims::Retry::All {
            if let Some(worker) = &self.worker {
                worker.bump(worker.stats.claim_failed);
            }
            warn(
                &self.host,
                format_args!(
                    "seckill-filter: a claim call failed; its claims are sent again next tick"
                ),
            );
        }
        self.claims.borrow_mut().answered(token_id, retry);
    }

    /// Reads the root's current callout response (the effective context is the root).
    fn read_batch_response(
        &self,
        num_headers: usize,
        body_size: usize,
        sent: usize,
    ) -> Result<Vec<seckill_api::BatchItem>, CalloutFailure> {
        // Envoy reports a timeout or a failed connection as a response without headers.
        if num_headers == 0 {
            return Err(CalloutFailure::NoResponse);
        }
        if body_size > reply::BATCH_REPLY_BYTES_MAX {
            return Err(CalloutFailure::TooLarge(body_size));
        }
        let (status, body) = self.call_response(body_size);
        reply::read_batch_response(status.as_deref(), body.as_deref(), sent)
    }

    /// The current callout response's `:status` and body (`None` where unreadable).
    fn call_response(&self, body_size: usize) -> (Option<Vec<u8>>, Option<Vec<u8>>) {
        let status = self.host.http_call_response_header(":status");
        let body = self.host.http_call_response_body(body_size);
        (status.ok().flatten(), body.ok().flatten())
    }
}

/// What a call `dispatch_http_call` refused means for the requests it carried.
fn refused_call(status: HostStatus) -> CalloutFailure {
    if status.means_no_such_cluster() {
        CalloutFailure::NoSuchCluster(status.to_string())
    } else {
        CalloutFailure::Dispatch(status.to_string())
    }
}
