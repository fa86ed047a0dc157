//! Seckill gate: a proxy-wasm HTTP filter for Envoy that decides at the edge who gets a unit
//! of stock. See README.md for the configuration and the per-request order.
//!
//! The decisions live in pure modules that unit-test natively (`config`, `route`, `input`,
//! `gcra`, `reply`, `local`, and the CAS loops of `shared`); this file holds the Envoy side:
//! the root context (configuration, stats, the worker's memory) and the per-request state
//! machine. The host side only compiles for wasm32, because the SDK's host imports cannot
//! link into a native binary.

pub mod batch;
pub mod claims;
pub mod config;
pub mod gcra;
pub mod input;
pub mod local;
pub mod reply;
pub mod route;
pub mod shared;

/// Names of the counters besides the per-outcome ones (`seckill.outcome.<name>`).
pub mod stat_names {
    /// Deduct calls dispatched (each carries a batch of attempts).
    pub const CALLOUT_SENT: &str = "seckill.callout.sent";
    /// Purchase attempts those calls carried.
    pub const CALLOUT_ATTEMPTS: &str = "seckill.callout.attempts";
    /// Attempts that got no usable answer (then the failure mode decides).
    pub const CALLOUT_FAILED: &str = "seckill.callout.failed";
    pub const SOLD_OUT_CACHE_HIT: &str = "seckill.soldout_cache.hit";
    pub const PASSTHROUGH: &str = "seckill.passthrough";
    pub const HEADERS_STRIPPED: &str = "seckill.headers_stripped";
    pub const RELEASE_SENT: &str = "seckill.release.sent";
    pub const RELEASE_FAILED: &str = "seckill.release.failed";
    /// Forwarded winners whose shop answer leaves it unknown whether the order was created
    /// (a timeout, a reset after the request was sent): the reservation is kept.
    pub const UPSTREAM_UNKNOWN: &str = "seckill.upstream.unknown";
    /// Requests answered `unknown_goods` from this worker's memory.
    pub const UNKNOWN_GOODS_CACHE_HIT: &str = "seckill.unknown_goods_cache.hit";
    /// Claim calls sent, and order ids they carried.
    pub const CLAIM_SENT: &str = "seckill.claim.sent";
    pub const CLAIM_IDS: &str = "seckill.claim.ids";
    /// Claim calls that failed as a whole (their ids are claimed again on the next tick).
    pub const CLAIM_FAILED: &str = "seckill.claim.failed";
    /// Order ids dropped unclaimed because too many waited (see `claims.rs`).
    pub const CLAIM_DROPPED: &str = "seckill.claim.dropped";
}

/// The syncer path that gives a failed winner's reservation back, or `None` for an order id
/// that has no business in a path (the syncer only issues `[A-Za-z0-9._:-]`).
pub fn release_path(order_id: &str) -> Option<String> {
    let safe = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-');
    (!order_id.is_empty() && order_id.bytes().all(safe))
        .then(|| format!("/v1/orders/{order_id}/release?reason=upstream_failed"))
}

/// What the shop's answer to a forwarded winner says about the order it was asked to create.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShopAnswer {
    /// The shop answered (anything but a 5xx): the order is the shop's to confirm or cancel.
    Answered,
    /// Definitely not created: the shop said so with a 5xx other than 504, or the request
    /// never reached it (no connection, no healthy host, circuit breaker). Release at once.
    NotCreated,
    /// Maybe created: a timeout (Envoy's 504, or a 504 from anyone), a reset or a closed
    /// connection after the request was sent, or nothing readable. Keep the reservation: the
    /// shop may hold the order; it ends by confirm, cancel or its payment window.
    Unknown,
}

/// Reads the shop's `:status` and Envoy's `response.code_details` for a forwarded winner.
/// Only a definite "not created" may release: releasing an order the shop did create puts
/// its units on sale a second time.
pub fn shop_answer(status: &[u8], code_details: Option<&[u8]>) -> ShopAnswer {
    let server_error =
        status.len() == 3 && status[0] == b'5' && status.iter().all(u8::is_ascii_digit);
    if !server_error {
        return ShopAnswer::Answered;
    }
    let Some(details) = code_details else {
        return ShopAnswer::Unknown;
    };
    let contains = |needle: &[u8]| details.windows(needle.len()).any(|w| w == needle);
    if details == b"via_upstream" {
        // The shop's own answer. A 504 is a gateway's timeout (a proxy in front of the shop):
        // the shop may have gone on and created the order.
        return if status == b"504" {
            ShopAnswer::Unknown
        } else {
            ShopAnswer::NotCreated
        };
    }
    // Envoy's own answer: only reasons that mean the request never left Envoy.
    let never_sent = contains(b"connection_failure")
        || details == b"no_healthy_upstream"
        || contains(b"{overflow}")
        || details == b"cluster_not_found"
        || details == b"maintenance_mode";
    if never_sent {
        ShopAnswer::NotCreated
    } else {
        ShopAnswer::Unknown
    }
}

/// Prefix of the one log line a refused configuration produces.
pub const BAD_CONFIG_LOG_PREFIX: &str = "seckill-filter: bad plugin configuration: ";

#[cfg(target_arch = "wasm32")]
mod host {
    use std::cell::RefCell;
    use std::rc::Rc;
    use std::time::{Duration, UNIX_EPOCH};

    use log::{error, warn};
    use proxy_wasm::hostcalls;
    use proxy_wasm::traits::{Context, HttpContext, RootContext};
    use proxy_wasm::types::{Action, ContextType, LogLevel, MetricType, Status};

    use crate::batch::{self, Batcher, Decided, Enqueued, Ticket, Waiter};
    use crate::claims::{self, Claims};
    use crate::config::{Config, FailureMode};
    use crate::input::{self, is_gate_header, Classified, Purchase};
    use crate::local::LocalMemory;
    use crate::reply::{self, CalloutFailure, GateOutcome, LocalReply, Remember, Verdict, Winner};
    use crate::shared::{self, Admission, HostStore, RateLimited};
    use crate::{release_path, shop_answer, stat_names, ShopAnswer, BAD_CONFIG_LOG_PREFIX};

    proxy_wasm::main! {{
        // Info: per-request debug lines would cost a host call each even when Envoy drops them.
        proxy_wasm::set_log_level(LogLevel::Info);
        proxy_wasm::set_root_context(|context_id| -> Box<dyn RootContext> {
            Box::new(SeckillRoot::new(context_id))
        });
    }}

    /// How often the root looks at its batcher unprompted: a bound on how long a request can
    /// wait should a wake-up ever be lost.
    const TICK: Duration = Duration::from_secs(1);

    /// Counter ids, defined once per root context.
    struct Stats {
        outcomes: [u32; GateOutcome::ALL.len()],
        callout_sent: u32,
        callout_attempts: u32,
        callout_failed: u32,
        sold_out_cache_hit: u32,
        passthrough: u32,
        headers_stripped: u32,
        release_sent: u32,
        release_failed: u32,
        upstream_unknown: u32,
        unknown_goods_cache_hit: u32,
        claim_sent: u32,
        claim_ids: u32,
        claim_failed: u32,
        claim_dropped: u32,
    }

    impl Stats {
        fn define() -> Result<Stats, Status> {
            let counter = |name: &str| hostcalls::define_metric(MetricType::Counter, name);
            let mut outcomes = [0; GateOutcome::ALL.len()];
            for (id, outcome) in outcomes.iter_mut().zip(GateOutcome::ALL) {
                *id = counter(&outcome.stat_name())?;
            }
            Ok(Stats {
                outcomes,
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

        fn add(id: u32, count: usize) {
            // A lost increment is not worth failing a request over.
            let _ = hostcalls::increment_metric(id, i64::try_from(count).unwrap_or(i64::MAX));
        }

        fn bump(id: u32) {
            Stats::add(id, 1);
        }

        fn outcome(&self, outcome: GateOutcome) {
            if let Some(id) = self.outcomes.get(outcome.index()) {
                Stats::bump(*id);
            }
        }
    }

    /// What the root and every request of one worker share.
    struct Worker {
        config: Rc<Config>,
        stats: Rc<Stats>,
        /// This worker's memory of sold-out marks and rate-limit refusals (see `local.rs`).
        memory: Rc<RefCell<LocalMemory>>,
        /// Requests waiting for a decision and the callouts carrying them (see `batch.rs`).
        batcher: Rc<RefCell<Batcher>>,
        /// Order ids of forwarded winners, waiting to be claimed (see `claims.rs`).
        claims: Rc<RefCell<Claims>>,
        /// The shared queue whose `on_queue_ready` wakes this worker's root.
        wake_queue: u32,
    }

    impl Worker {
        fn share(&self) -> Worker {
            Worker {
                config: Rc::clone(&self.config),
                stats: Rc::clone(&self.stats),
                memory: Rc::clone(&self.memory),
                batcher: Rc::clone(&self.batcher),
                claims: Rc::clone(&self.claims),
                wake_queue: self.wake_queue,
            }
        }

        /// Remembers, for every worker of this Envoy, that the goods has nothing left.
        fn cache_sold_out(&self, purchase: &Purchase) {
            if !self.config.sold_out_cache.is_zero() {
                let now = now_ns();
                let until_ns = now.saturating_add(duration_ns(self.config.sold_out_cache));
                let mut memory = self.memory.borrow_mut();
                shared::mark_sold_out(&HostStore, &mut memory, purchase.goods_id(), until_ns, now);
            }
        }

        /// Carries out the stock service's verdict on the request that is the effective
        /// context, except resuming it: the caller resumes on `Won` and `FailedOpen`.
        fn carry_out(
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
                    shared::confirm_goods(&HostStore, limits, purchase.goods_id());
                }
            }
            match verdict {
                Ok(Verdict::Forward(winner)) => {
                    // The last unit just went: the next buyer need not ask the syncer.
                    if winner.remaining == Some(0) {
                        self.cache_sold_out(purchase);
                    }
                    self.forward_winner(purchase, winner)
                }
                Ok(Verdict::Answer { reply, remember }) => {
                    match remember {
                        Remember::SoldOut => self.cache_sold_out(purchase),
                        Remember::UnknownGoods => self.cache_unknown(purchase),
                        Remember::Nothing => {}
                    }
                    self.answer(reply)
                }
                Err(failure) => self.fail(purchase, &failure, log_failure),
            }
        }

        /// Remembers, in this worker only, that the stock service sells no such goods.
        fn cache_unknown(&self, purchase: &Purchase) {
            if !self.config.unknown_goods_cache.is_zero() {
                let now = now_ns();
                let until_ns = now.saturating_add(duration_ns(self.config.unknown_goods_cache));
                let mut memory = self.memory.borrow_mut();
                memory.remember_unknown(purchase.goods_id(), until_ns, now);
            }
        }

        fn forward_winner(&self, purchase: &Purchase, winner: Winner) -> Decided {
            for (name, value) in reply::winner_request_headers(purchase, &winner) {
                abi::set_request_header(name, &value);
            }
            // Delivered: claim the reservation on the next tick, so it lives for its payment
            // window rather than the claim window.
            self.claims.borrow_mut().add(winner.order_id.clone());
            self.stats
                .outcome(GateOutcome::Decided(seckill_api::Outcome::Won));
            Decided::Won {
                order_id: winner.order_id,
                request_id: purchase.request_id().to_string(),
            }
        }

        /// This worker told the buyer to retry with this request id: its retry skips the
        /// sold-out marks for a while (see `local.rs`).
        fn expect_retry(&self, request_id: &str) {
            let now = now_ns();
            let until_ns = now.saturating_add(crate::local::RETRY_REMEMBERED_NS);
            if let Ok(mut memory) = self.memory.try_borrow_mut() {
                memory.remember_retry(request_id, until_ns);
            }
        }

        /// No usable answer from the stock service: refuse (closed) or forward unmarked
        /// (open).
        fn fail(&self, purchase: &Purchase, failure: &CalloutFailure, log: bool) -> Decided {
            Stats::bump(self.stats.callout_failed);
            self.expect_retry(purchase.request_id());
            let deduct = &self.config.deduct;
            if log {
                warn!(
                    "seckill-filter: deduct call to cluster {:?} for goods {} (request id {}) {failure}; failure mode {}",
                    deduct.cluster,
                    purchase.goods_id(),
                    purchase.request_id(),
                    failure_mode_words(deduct.failure_mode)
                );
            }
            match deduct.failure_mode {
                FailureMode::Closed => self.answer(reply::unavailable(Some(purchase.request_id()))),
                FailureMode::Open => {
                    abi::set_request_header(
                        seckill_api::GATE_STATUS_HEADER,
                        reply::FAILED_OPEN_VALUE,
                    );
                    self.stats.outcome(GateOutcome::FailedOpen);
                    Decided::FailedOpen
                }
            }
        }

        /// Sends a local reply; the request goes no further.
        fn answer(&self, reply: LocalReply) -> Decided {
            self.stats.outcome(reply.outcome);
            send_local_reply(&reply);
            Decided::Answered
        }
    }

    fn failure_mode_words(mode: FailureMode) -> &'static str {
        match mode {
            FailureMode::Closed => "closed: answering 503",
            FailureMode::Open => "open: forwarding without an order id",
        }
    }

    fn send_local_reply(reply: &LocalReply) {
        let headers: Vec<(&str, &str)> = reply
            .headers
            .iter()
            .map(|(name, value)| (*name, value.as_ref()))
            .collect();
        // Envoy defers the local reply until the VM call returns and always answers Ok.
        let _ = hostcalls::send_http_response(reply.status, headers, Some(reply.body.as_bytes()));
    }

    struct SeckillRoot {
        context_id: u32,
        /// Set by a successful `on_configure`; Envoy creates no request context before that.
        worker: Option<Worker>,
        /// Kept across reconfigurations: requests may be waiting in it.
        batcher: Rc<RefCell<Batcher>>,
        /// Kept across reconfigurations: forwarded winners wait in it to be claimed.
        claims: Rc<RefCell<Claims>>,
        wake_queue: Option<u32>,
    }

    impl SeckillRoot {
        fn new(context_id: u32) -> Self {
            SeckillRoot {
                context_id,
                worker: None,
                batcher: Rc::default(),
                claims: Rc::default(),
                wake_queue: None,
            }
        }

        /// A queue name no other worker of this Envoy uses (see `shared::claim_worker_number`).
        fn register_wake_queue(&mut self) -> Result<u32, String> {
            if let Some(queue) = self.wake_queue {
                return Ok(queue);
            }
            let number = shared::claim_worker_number(&HostStore)
                .ok_or("could not claim a worker number in shared data")?;
            let name = format!("seckill.batch.wake.{number}");
            let queue = hostcalls::register_shared_queue(&name)
                .map_err(|status| format!("could not register shared queue {name}: {status:?}"))?;
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
                let now = now_ns();
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
                        post_to_syncer(
                            deduct,
                            seckill_api::DEDUCT_BATCH_PATH,
                            &body,
                            deduct.timeout,
                        )
                        .map_err(|status| {
                            CalloutFailure::Dispatch(format!(
                                "{status:?}; is cluster {:?} defined?",
                                deduct.cluster
                            ))
                        })
                    });
                match sent {
                    Ok(token) => {
                        Stats::bump(worker.stats.callout_sent);
                        Stats::add(worker.stats.callout_attempts, next.batch.len());
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
            worker: &Worker,
            settled: impl IntoIterator<Item = (Waiter, Result<Verdict, CalloutFailure>)>,
            log_each_failure: bool,
        ) {
            for (waiter, verdict) in settled {
                if waiter.gone || !abi::set_effective_context(waiter.context_id) {
                    continue;
                }
                let decided = worker.carry_out(&waiter, verdict, log_each_failure);
                if matches!(decided, Decided::Won { .. } | Decided::FailedOpen) {
                    abi::continue_request();
                }
                *waiter.ticket.borrow_mut() = Some(decided);
            }
            abi::set_effective_context(self.context_id);
        }

        /// Sends the forwarded winners' order ids to the syncer: full calls at once, the rest
        /// when `flush` (the tick). Bounded by the claim calls a worker may keep out.
        fn send_claims(&self, flush: bool) {
            let Some(worker) = &self.worker else { return };
            let dropped = self.claims.borrow_mut().take_dropped();
            if dropped > 0 {
                Stats::add(worker.stats.claim_dropped, dropped as usize);
                warn!("seckill-filter: dropped {dropped} unsent claims (too many waited); those reservations are released when the claim window ends");
            }
            for _ in 0..claims::CLAIM_CALLS_IN_FLIGHT_MAX {
                if !self.send_one_claim_call(worker, flush) {
                    return;
                }
            }
        }

        /// Sends one claim call if one may go; false when none went.
        fn send_one_claim_call(&self, worker: &Worker, flush: bool) -> bool {
            let Some(ids) = self.claims.borrow_mut().next_call(flush) else {
                return false;
            };
            let deduct = &worker.config.deduct;
            let dispatched = claims::claim_body(&ids)
                .map_err(|e| e.to_string())
                .and_then(|body| {
                    post_to_syncer(
                        deduct,
                        seckill_api::CLAIM_PATH,
                        &body,
                        claims::CLAIM_CALL_TIMEOUT,
                    )
                    .map_err(|status| format!("{status:?}"))
                });
            match dispatched {
                Ok(token) => {
                    Stats::bump(worker.stats.claim_sent);
                    Stats::add(worker.stats.claim_ids, ids.len());
                    self.claims.borrow_mut().sent(token, ids);
                    true
                }
                Err(why) => {
                    Stats::bump(worker.stats.claim_failed);
                    warn!(
                        "seckill-filter: could not send {} claims ({why}); next tick",
                        ids.len()
                    );
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
                call_response(body_size)
            };
            let retry = claims::read_claim_response(status.as_deref(), body.as_deref());
            if retry == claims::Retry::All {
                if let Some(worker) = &self.worker {
                    Stats::bump(worker.stats.claim_failed);
                }
                warn!("seckill-filter: a claim call failed; its claims are sent again next tick");
            }
            self.claims.borrow_mut().answered(token_id, retry);
        }

        /// Settles every waiter with the same failure, logged once for all of them.
        fn settle_all(&self, worker: &Worker, waiters: Vec<Waiter>, failure: &CalloutFailure) {
            let deduct = &worker.config.deduct;
            warn!(
                "seckill-filter: deduct call to cluster {:?} for {} attempts {failure}; failure mode {}",
                deduct.cluster,
                waiters.len(),
                failure_mode_words(deduct.failure_mode)
            );
            let settled = waiters.into_iter().map(|w| (w, Err(failure.clone())));
            self.settle(worker, settled, false);
        }
    }

    impl Context for SeckillRoot {
        fn on_http_call_response(
            &mut self,
            token_id: u32,
            num_headers: usize,
            body_size: usize,
            _num_trailers: usize,
        ) {
            if self.claims.borrow().owns(token_id) {
                self.finish_claims(token_id, num_headers, body_size);
                return;
            }
            let Some(waiters) = self.batcher.borrow_mut().answered(token_id) else {
                warn!("seckill-filter: ignoring a deduct response (token {token_id}) nobody waits for");
                return;
            };
            if let Some(worker) = &self.worker {
                match read_batch_response(num_headers, body_size, waiters.len()) {
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
    }

    impl RootContext for SeckillRoot {
        fn on_configure(&mut self, _plugin_configuration_size: usize) -> bool {
            let bytes = self.get_plugin_configuration();
            let config = match Config::from_json(bytes.as_deref()) {
                Ok(config) => config,
                Err(e) => {
                    // Exactly one line; returning false makes Envoy refuse the filter.
                    error!("{BAD_CONFIG_LOG_PREFIX}{e}");
                    return false;
                }
            };
            let stats = match Stats::define() {
                Ok(stats) => stats,
                Err(status) => {
                    error!("seckill-filter: could not define stats: {status:?}");
                    return false;
                }
            };
            let wake_queue = match self.register_wake_queue() {
                Ok(queue) => queue,
                Err(why) => {
                    error!("seckill-filter: {why}");
                    return false;
                }
            };
            if let Err(status) = hostcalls::set_tick_period(TICK) {
                error!("seckill-filter: could not set the tick period: {status:?}");
                return false;
            }
            self.worker = Some(Worker {
                config: Rc::new(config),
                stats: Rc::new(stats),
                // What was remembered under an earlier configuration (other rates, another
                // sold-out window) does not hold under this one.
                memory: Rc::default(),
                batcher: Rc::clone(&self.batcher),
                claims: Rc::clone(&self.claims),
                wake_queue,
            });
            true
        }

        fn on_queue_ready(&mut self, queue_id: u32) {
            // Empty the queue (its entries only say "wake up"); bounded, as every enqueue
            // matches a request that waits.
            for _ in 0..=batch::WAITING_MAX {
                match hostcalls::dequeue_shared_queue(queue_id) {
                    Ok(Some(_)) => continue,
                    _ => break,
                }
            }
            self.batcher.borrow_mut().woken();
            self.pump();
        }

        fn on_tick(&mut self) {
            self.batcher.borrow_mut().woken();
            self.pump();
            self.send_claims(true);
        }

        fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
            // Returning None would make the SDK panic; without a configuration (which Envoy
            // does not allow to happen) answer 503 rather than let sales through ungated.
            let Some(worker) = &self.worker else {
                return Some(Box::new(Unconfigured));
            };
            Some(Box::new(SaleRequest {
                context_id,
                worker: worker.share(),
                state: State::Started,
            }))
        }

        fn get_type(&self) -> Option<ContextType> {
            Some(ContextType::HttpContext)
        }
    }

    /// Reads the root's current callout response (the effective context is the root).
    fn read_batch_response(
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
        let (status, body) = call_response(body_size);
        reply::read_batch_response(status.as_deref(), body.as_deref(), sent)
    }

    /// The current callout response's `:status` and body (`None` where unreadable).
    fn call_response(body_size: usize) -> (Option<Vec<u8>>, Option<Vec<u8>>) {
        let status = hostcalls::get_map_value_bytes(
            proxy_wasm::types::MapType::HttpCallResponseHeaders,
            ":status",
        )
        .ok()
        .flatten();
        let body = hostcalls::get_buffer(
            proxy_wasm::types::BufferType::HttpCallResponseBody,
            0,
            body_size,
        )
        .ok()
        .flatten();
        (status, body)
    }

    /// POSTs a JSON body to the syncer as the effective context; the callout's token.
    fn post_to_syncer(
        deduct: &crate::config::Deduct,
        path: &str,
        body: &[u8],
        timeout: Duration,
    ) -> Result<u32, Status> {
        let headers = vec![
            (":method", "POST"),
            (":path", path),
            (":authority", deduct.authority.as_str()),
            ("content-type", "application/json"),
            (seckill_api::SECRET_HEADER, deduct.secret.as_str()),
        ];
        hostcalls::dispatch_http_call(&deduct.cluster, headers, Some(body), vec![], timeout)
    }

    /// Where one request stands.
    enum State {
        /// Headers not seen yet.
        Started,
        /// Not a sale request: passed on untouched (but stripped of gate headers).
        Passthrough,
        /// Waiting for its batch's answer; the root leaves the decision in the ticket.
        Waiting { ticket: Ticket },
        /// Forwarded to the shop API as a winner with this order id.
        ForwardedWinner {
            order_id: String,
            request_id: String,
        },
        /// The shop failed the winner; its response waits while the reservation is given back.
        ReleasingWinner { token: u32, order_id: String },
        /// Forwarded without a decision (failure mode open).
        ForwardedFailedOpen,
        /// The gate answered locally.
        Answered,
    }

    struct SaleRequest {
        context_id: u32,
        worker: Worker,
        state: State,
    }

    impl Drop for SaleRequest {
        fn drop(&mut self) {
            // Ended (client gone) while waiting: the root must not act on it any more.
            if let State::Waiting { ticket } = &self.state {
                if ticket.borrow().is_none() {
                    if let Ok(mut batcher) = self.worker.batcher.try_borrow_mut() {
                        batcher.forget(self.context_id);
                    }
                }
            }
        }
    }

    impl Context for SaleRequest {
        fn on_http_call_response(
            &mut self,
            token_id: u32,
            num_headers: usize,
            _body_size: usize,
            _num_trailers: usize,
        ) {
            // A request's own callouts are only ever releases; deducts belong to the root.
            match std::mem::replace(&mut self.state, State::Answered) {
                State::ReleasingWinner { token, order_id } if token == token_id => {
                    self.finish_release(&order_id, num_headers);
                }
                state => {
                    warn!(
                        "seckill-filter: ignoring a response (token {token_id}) nobody waits for"
                    );
                    self.state = state;
                }
            }
        }
    }

    impl HttpContext for SaleRequest {
        fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
            // Read the host's serialized map in place: no copy of every name and value (and
            // no UTF-8 assumption about values, which a client controls).
            let map = match abi::request_header_map() {
                Ok(map) => map,
                Err(status) => {
                    error!("seckill-filter: cannot read the request headers: status {status}");
                    return self.answer(reply::unavailable(None));
                }
            };
            let Some(headers) = input::parse_header_map(&map) else {
                error!("seckill-filter: the host's request header map is malformed");
                return self.answer(reply::unavailable(None));
            };
            self.strip_gate_headers(&headers);
            match input::classify(&self.worker.config, &headers) {
                Classified::NotSale => {
                    Stats::bump(self.worker.stats.passthrough);
                    self.state = State::Passthrough;
                    Action::Continue
                }
                Classified::Sale(Err(bad)) => self.answer(reply::bad_request(&bad.message)),
                Classified::Sale(Ok(purchase)) => self.gate(purchase),
                Classified::WrongMethod => {
                    let methods = &self.worker.config.route.methods;
                    self.answer(reply::method_not_allowed(methods))
                }
                Classified::NearMiss => {
                    let template = self.worker.config.route.template.as_str();
                    self.answer(reply::not_the_sale_path(template))
                }
            }
        }

        // While the decision is out, body and trailers must not resume the request: Envoy
        // treats Continue from a data callback as "go on", which would forward the request
        // before the decision. Pause buffers them (within Envoy's buffer limits).
        fn on_http_request_body(&mut self, _body_size: usize, _end_of_stream: bool) -> Action {
            self.hold_while_deciding()
        }

        fn on_http_request_trailers(&mut self, _num_trailers: usize) -> Action {
            self.hold_while_deciding()
        }

        fn on_http_response_headers(
            &mut self,
            _num_headers: usize,
            _end_of_stream: bool,
        ) -> Action {
            if let State::Waiting { ticket } = &self.state {
                let decided = ticket.borrow_mut().take();
                self.state = match decided {
                    Some(Decided::Won {
                        order_id,
                        request_id,
                    }) => State::ForwardedWinner {
                        order_id,
                        request_id,
                    },
                    Some(Decided::FailedOpen) => State::ForwardedFailedOpen,
                    Some(Decided::Answered) | None => State::Answered,
                };
            }
            let mut outcome = GateOutcome::Decided(seckill_api::Outcome::Won).as_str();
            if let State::ForwardedWinner {
                order_id,
                request_id,
            } = &self.state
            {
                let status = hostcalls::get_map_value_bytes(
                    proxy_wasm::types::MapType::HttpResponseHeaders,
                    ":status",
                )
                .ok()
                .flatten()
                .unwrap_or_default();
                // Only a 5xx needs Envoy's account of where it came from.
                let details = if status.first() == Some(&b'5') {
                    hostcalls::get_property(vec!["response", "code_details"])
                        .ok()
                        .flatten()
                } else {
                    None
                };
                match shop_answer(&status, details.as_deref()) {
                    ShopAnswer::NotCreated if self.worker.config.release_on_upstream_failure => {
                        let order_id = order_id.clone();
                        return self.release_failed_winner(order_id);
                    }
                    ShopAnswer::Unknown => {
                        // The shop may have the order: keep the reservation, and say so.
                        Stats::bump(self.worker.stats.upstream_unknown);
                        outcome = "upstream_unknown";
                        self.worker.expect_retry(request_id);
                    }
                    ShopAnswer::NotCreated | ShopAnswer::Answered => {}
                }
            }
            match &self.state {
                State::ForwardedWinner { order_id, .. } => {
                    self.set_http_response_header(reply::OUTCOME_HEADER, Some(outcome));
                    self.set_http_response_header(seckill_api::ORDER_ID_HEADER, Some(order_id));
                }
                State::ForwardedFailedOpen => {
                    self.set_http_response_header(
                        reply::OUTCOME_HEADER,
                        Some(GateOutcome::FailedOpen.as_str()),
                    );
                }
                _ => {}
            }
            Action::Continue
        }
    }

    impl SaleRequest {
        /// The shop failed a winner: ask the syncer to give the reservation back before the
        /// buyer sees the failure. If the call cannot be made, the sweeper releases the
        /// reservation when its payment window ends.
        fn release_failed_winner(&mut self, order_id: String) -> Action {
            self.set_http_response_header(reply::OUTCOME_HEADER, Some("upstream_failed"));
            self.set_http_response_header(seckill_api::ORDER_ID_HEADER, Some(&order_id));
            let stats = Rc::clone(&self.worker.stats);
            let Some(path) = release_path(&order_id) else {
                warn!("seckill-filter: not releasing order {order_id:?}: not a path-safe id");
                Stats::bump(stats.release_failed);
                return Action::Continue;
            };
            let config = Rc::clone(&self.worker.config);
            let deduct = &config.deduct;
            let headers = vec![
                (":method", "POST"),
                (":path", path.as_str()),
                (":authority", deduct.authority.as_str()),
                (seckill_api::SECRET_HEADER, deduct.secret.as_str()),
            ];
            match self.dispatch_http_call(&deduct.cluster, headers, None, vec![], deduct.timeout) {
                Ok(token) => {
                    Stats::bump(stats.release_sent);
                    self.state = State::ReleasingWinner { token, order_id };
                    Action::Pause
                }
                Err(status) => {
                    warn!("seckill-filter: cannot call the syncer to release order {order_id}: {status:?}; the sweeper will");
                    Stats::bump(stats.release_failed);
                    self.state = State::Answered;
                    Action::Continue
                }
            }
        }

        fn finish_release(&mut self, order_id: &str, num_headers: usize) {
            let status = if num_headers == 0 {
                None
            } else {
                self.get_http_call_response_header_bytes(":status")
            };
            if status.as_deref() != Some(b"200".as_slice()) {
                Stats::bump(self.worker.stats.release_failed);
                warn!(
                    "seckill-filter: releasing order {order_id} after a shop failure answered {:?}; the sweeper will release it when its window ends",
                    status.map(|s| String::from_utf8_lossy(&s).into_owned())
                );
            }
            self.state = State::Answered;
            self.resume_http_response();
        }

        /// Removes every `x-seckill-*` request header: only the gate may set them. Only names
        /// actually present cost a host call, each name once (that removes every copy).
        fn strip_gate_headers(&self, headers: &[(&[u8], &[u8])]) {
            let mut count = 0;
            for (i, (name, _)) in headers.iter().enumerate() {
                if is_gate_header(name) {
                    count += 1;
                    if !headers[..i].iter().any(|(seen, _)| seen == name) {
                        abi::remove_request_header(name);
                    }
                }
            }
            if count > 0 {
                Stats::add(self.worker.stats.headers_stripped, count);
            }
        }

        /// Sold-out cache, rate limit (this worker's memory first, then shared data), then
        /// the deduct call.
        fn gate(&mut self, purchase: Purchase) -> Action {
            let now = now_ns();
            let worker = &self.worker;
            let mut memory = worker.memory.borrow_mut();
            // A retry this worker asked for (its answer may be waiting in the syncer) is
            // decided by the syncer, not by a sold-out mark.
            let check_sold_out = !worker.config.sold_out_cache.is_zero()
                && !memory.expects_retry(purchase.request_id(), now);
            let admission = shared::admit(
                &HostStore,
                &mut memory,
                &worker.config.rate_limit,
                purchase.goods_id(),
                now,
                check_sold_out,
            );
            drop(memory);
            match admission {
                Admission::UnknownGoods => {
                    Stats::bump(worker.stats.unknown_goods_cache_hit);
                    self.answer(reply::unknown_goods_cached(purchase.goods_id()))
                }
                Admission::SoldOut => {
                    Stats::bump(worker.stats.sold_out_cache_hit);
                    self.answer(reply::sold_out_cached(purchase.goods_id()))
                }
                Admission::Rate(RateLimited::Allowed) => self.wait_for_deduct(purchase, now, false),
                Admission::Probe => self.wait_for_deduct(purchase, now, true),
                Admission::Rate(
                    RateLimited::Limited { retry_after_ns }
                    | RateLimited::Contended { retry_after_ns },
                ) => self.answer(reply::rate_limited(retry_after_ns)),
            }
        }

        /// Joins this worker's next deduct batch and pauses until the root settles it.
        fn wait_for_deduct(&mut self, purchase: Purchase, now: u64, probe: bool) -> Action {
            let ticket = Ticket::default();
            let waiter = Waiter {
                context_id: self.context_id,
                purchase,
                probe,
                queued_ns: now,
                ticket: Rc::clone(&ticket),
                gone: false,
            };
            let enqueued = self.worker.batcher.borrow_mut().enqueue(waiter);
            match enqueued {
                Enqueued::Full(waiter) => {
                    return self.fail_here(&waiter.purchase, &CalloutFailure::Overloaded);
                }
                Enqueued::WakeRoot => {
                    if let Err(status) =
                        hostcalls::enqueue_shared_queue(self.worker.wake_queue, Some(b"1"))
                    {
                        let mut batcher = self.worker.batcher.borrow_mut();
                        batcher.woken();
                        let waiter = batcher.withdraw(self.context_id);
                        drop(batcher);
                        let failure = CalloutFailure::Dispatch(format!(
                            "could not wake the worker's batcher: {status:?}"
                        ));
                        if let Some(waiter) = waiter {
                            return self.fail_here(&waiter.purchase, &failure);
                        }
                    }
                }
                Enqueued::Queued => {}
            }
            self.state = State::Waiting { ticket };
            Action::Pause
        }

        /// A failure decided in this request's own callback.
        fn fail_here(&mut self, purchase: &Purchase, failure: &CalloutFailure) -> Action {
            match self.worker.fail(purchase, failure, true) {
                Decided::FailedOpen => {
                    self.state = State::ForwardedFailedOpen;
                    Action::Continue
                }
                _ => {
                    self.state = State::Answered;
                    Action::Pause
                }
            }
        }

        /// Sends a local reply; the request goes no further.
        fn answer(&mut self, reply: LocalReply) -> Action {
            self.worker.answer(reply);
            self.state = State::Answered;
            Action::Pause
        }

        fn hold_while_deciding(&self) -> Action {
            match &self.state {
                State::Waiting { ticket } if ticket.borrow().is_none() => Action::Pause,
                _ => Action::Continue,
            }
        }
    }

    /// The host calls used without the SDK's wrappers: reading headers in place (the SDK
    /// copies every name and value into its own `String` and `Vec`, see
    /// `input::parse_header_map`), and the calls the root makes on behalf of a request, where
    /// the SDK would trap on a status it does not expect.
    mod abi {
        // Same symbols and ABI as the SDK's declarations; statuses are read as plain numbers.
        #[link(wasm_import_module = "env")]
        extern "C" {
            fn proxy_get_header_map_pairs(
                map_type: u32,
                return_map_data: *mut *mut u8,
                return_map_size: *mut usize,
            ) -> u32;
            fn proxy_remove_header_map_value(
                map_type: u32,
                key_data: *const u8,
                key_size: usize,
            ) -> u32;
            fn proxy_replace_header_map_value(
                map_type: u32,
                key_data: *const u8,
                key_size: usize,
                value_data: *const u8,
                value_size: usize,
            ) -> u32;
            fn proxy_continue_stream(stream_type: u32) -> u32;
            fn proxy_set_effective_context(context_id: u32) -> u32;
        }

        const HTTP_REQUEST_HEADERS: u32 = proxy_wasm::types::MapType::HttpRequestHeaders as u32;
        const HTTP_REQUEST: u32 = proxy_wasm::types::StreamType::HttpRequest as u32;
        const OK: u32 = proxy_wasm::types::Status::Ok as u32;

        /// The request headers as the host serializes them; `Err` carries the host's status.
        pub fn request_header_map() -> Result<Vec<u8>, u32> {
            let mut data: *mut u8 = std::ptr::null_mut();
            let mut size: usize = 0;
            // SAFETY: the host writes the address and size of a buffer it allocated through
            // this module's `proxy_on_memory_allocate` (the SDK's: a leaked `Vec<u8>` of
            // capacity `size`), which becomes ours, exactly as in the SDK's `get_map_bytes`.
            let status =
                unsafe { proxy_get_header_map_pairs(HTTP_REQUEST_HEADERS, &mut data, &mut size) };
            match status {
                OK if data.is_null() => Ok(Vec::new()),
                // SAFETY: see above.
                OK => Ok(unsafe { Vec::from_raw_parts(data, size, size) }),
                status => Err(status),
            }
        }

        /// Removes every copy of a request header (a lost removal is not worth failing over;
        /// the host only refuses when the request is gone).
        pub fn remove_request_header(name: &[u8]) {
            // SAFETY: the host only reads `name.len()` bytes at `name.as_ptr()`.
            let _ = unsafe {
                proxy_remove_header_map_value(HTTP_REQUEST_HEADERS, name.as_ptr(), name.len())
            };
        }

        /// Sets a request header of the effective context (refused only if it is gone).
        pub fn set_request_header(name: &str, value: &str) {
            // SAFETY: the host only reads the given lengths at the given addresses.
            let _ = unsafe {
                proxy_replace_header_map_value(
                    HTTP_REQUEST_HEADERS,
                    name.as_ptr(),
                    name.len(),
                    value.as_ptr(),
                    value.len(),
                )
            };
        }

        /// Resumes the effective context's paused request (Envoy defers it until the VM
        /// call returns).
        pub fn continue_request() {
            // SAFETY: no memory is passed.
            let _ = unsafe { proxy_continue_stream(HTTP_REQUEST) };
        }

        /// Makes later host calls act on this context; false if it no longer exists.
        pub fn set_effective_context(context_id: u32) -> bool {
            // SAFETY: no memory is passed.
            unsafe { proxy_set_effective_context(context_id) == OK }
        }
    }

    /// Stand-in for a request context when no configuration was accepted (Envoy does not
    /// create request contexts then; this only guards against the SDK panicking on None).
    struct Unconfigured;

    impl Context for Unconfigured {}

    impl HttpContext for Unconfigured {
        fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
            send_local_reply(&reply::unavailable(None));
            Action::Pause
        }
    }

    /// Wall-clock time from the host, in ns since the epoch (0 if unavailable; never panics).
    fn now_ns() -> u64 {
        let now = hostcalls::get_current_time().unwrap_or(UNIX_EPOCH);
        let since_epoch = now.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO);
        duration_ns(since_epoch)
    }

    fn duration_ns(duration: Duration) -> u64 {
        u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX)
    }
}

#[cfg(test)]
mod release_tests {
    use super::{shop_answer, ShopAnswer};

    #[test]
    fn failed_winners_are_released_by_order_id() {
        assert_eq!(
            super::release_path("sku-1.2.3").as_deref(),
            Some("/v1/orders/sku-1.2.3/release?reason=upstream_failed")
        );
        assert_eq!(super::release_path("a/../b"), None);
        assert_eq!(super::release_path(""), None);
    }

    #[test]
    fn only_a_definite_failure_releases() {
        let upstream = Some(&b"via_upstream"[..]);
        for status in [&b"200"[..], b"201", b"302", b"409", b"5xx", b"50"] {
            assert_eq!(shop_answer(status, upstream), ShopAnswer::Answered);
            assert_eq!(shop_answer(status, None), ShopAnswer::Answered);
        }
        // The shop's own 5xx: not created (its contract), except a gateway's 504.
        for status in [&b"500"[..], b"501", b"502", b"503"] {
            assert_eq!(shop_answer(status, upstream), ShopAnswer::NotCreated);
        }
        assert_eq!(shop_answer(b"504", upstream), ShopAnswer::Unknown);
        // Envoy's own answers: released only when the request never left Envoy.
        for details in [
            &b"upstream_reset_before_response_started{remote_connection_failure|delayed_connect_error:_111}"[..],
            b"upstream_reset_before_response_started{connection_failure}",
            b"upstream_reset_before_response_started{local_connection_failure}",
            b"no_healthy_upstream",
            b"upstream_reset_before_response_started{overflow}",
            b"cluster_not_found",
        ] {
            assert_eq!(shop_answer(b"503", Some(details)), ShopAnswer::NotCreated);
        }
        for details in [
            &b"upstream_response_timeout"[..],
            b"upstream_per_try_timeout",
            b"upstream_reset_before_response_started{remote_reset}",
            b"upstream_reset_before_response_started{connection_termination}",
            b"upstream_reset_before_response_started{local_reset}",
            b"something_new",
            b"",
        ] {
            assert_eq!(shop_answer(b"504", Some(details)), ShopAnswer::Unknown);
            assert_eq!(shop_answer(b"503", Some(details)), ShopAnswer::Unknown);
        }
        // Nothing readable: never release on a guess.
        assert_eq!(shop_answer(b"503", None), ShopAnswer::Unknown);
    }
}
