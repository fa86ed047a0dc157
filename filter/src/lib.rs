//! Seckill gate: a proxy-wasm HTTP filter for Envoy that decides at the edge who gets a unit
//! of stock. See README.md for the configuration and the per-request order.
//!
//! The decisions live in pure modules that unit-test natively (`config`, `route`, `input`,
//! `gcra`, `reply`, `local`, and the CAS loops of `shared`); this file holds the Envoy side:
//! the root context (configuration, stats, the worker's memory) and the per-request state
//! machine. The host side only compiles for wasm32, because the SDK's host imports cannot
//! link into a native binary.

pub mod config;
pub mod gcra;
pub mod input;
pub mod local;
pub mod reply;
pub mod route;
pub mod shared;

/// Names of the counters besides the per-outcome ones (`seckill.outcome.<name>`).
pub mod stat_names {
    pub const CALLOUT_SENT: &str = "seckill.callout.sent";
    pub const CALLOUT_FAILED: &str = "seckill.callout.failed";
    pub const SOLD_OUT_CACHE_HIT: &str = "seckill.soldout_cache.hit";
    pub const PASSTHROUGH: &str = "seckill.passthrough";
    pub const HEADERS_STRIPPED: &str = "seckill.headers_stripped";
    pub const RELEASE_SENT: &str = "seckill.release.sent";
    pub const RELEASE_FAILED: &str = "seckill.release.failed";
}

/// The syncer path that gives a failed winner's reservation back, or `None` for an order id
/// that has no business in a path (the syncer only issues `[A-Za-z0-9._:-]`).
pub fn release_path(order_id: &str) -> Option<String> {
    let safe = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-');
    (!order_id.is_empty() && order_id.bytes().all(safe))
        .then(|| format!("/v1/orders/{order_id}/release?reason=upstream_failed"))
}

/// Whether the shop API's answer to a winner means the sale did not happen there: a 5xx,
/// including Envoy's own 503/504 when the shop cannot be reached or times out.
pub fn upstream_failed(status: &[u8]) -> bool {
    status.len() == 3 && status[0] == b'5' && status.iter().all(u8::is_ascii_digit)
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

    use crate::config::{Config, FailureMode};
    use crate::input::{self, is_gate_header, Classified, Purchase};
    use crate::local::LocalMemory;
    use crate::reply::{self, CalloutFailure, GateOutcome, LocalReply, Verdict, Winner};
    use crate::shared::{self, Admission, HostStore, RateLimited};
    use crate::{release_path, stat_names, upstream_failed, BAD_CONFIG_LOG_PREFIX};

    proxy_wasm::main! {{
        // Info: per-request debug lines would cost a host call each even when Envoy drops them.
        proxy_wasm::set_log_level(LogLevel::Info);
        proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(SeckillRoot::default()) });
    }}

    /// Counter ids, defined once per root context.
    struct Stats {
        outcomes: [u32; GateOutcome::ALL.len()],
        callout_sent: u32,
        callout_failed: u32,
        sold_out_cache_hit: u32,
        passthrough: u32,
        headers_stripped: u32,
        release_sent: u32,
        release_failed: u32,
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
                callout_failed: counter(stat_names::CALLOUT_FAILED)?,
                sold_out_cache_hit: counter(stat_names::SOLD_OUT_CACHE_HIT)?,
                passthrough: counter(stat_names::PASSTHROUGH)?,
                headers_stripped: counter(stat_names::HEADERS_STRIPPED)?,
                release_sent: counter(stat_names::RELEASE_SENT)?,
                release_failed: counter(stat_names::RELEASE_FAILED)?,
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

    #[derive(Default)]
    struct SeckillRoot {
        /// Set by a successful `on_configure`; Envoy creates no request context before that.
        shared: Option<(Rc<Config>, Rc<Stats>)>,
        /// This worker's memory of sold-out marks and rate-limit refusals (see `local.rs`).
        memory: Rc<RefCell<LocalMemory>>,
    }

    impl Context for SeckillRoot {}

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
            self.shared = Some((Rc::new(config), Rc::new(stats)));
            // What was remembered under an earlier configuration (other rates, another
            // sold-out window) does not hold under this one.
            self.memory = Rc::default();
            true
        }

        fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
            // Returning None would make the SDK panic; without a configuration (which Envoy
            // does not allow to happen) answer 503 rather than let sales through ungated.
            let Some((config, stats)) = &self.shared else {
                return Some(Box::new(Unconfigured));
            };
            Some(Box::new(SaleRequest {
                config: Rc::clone(config),
                stats: Rc::clone(stats),
                memory: Rc::clone(&self.memory),
                state: State::Started,
            }))
        }

        fn get_type(&self) -> Option<ContextType> {
            Some(ContextType::HttpContext)
        }
    }

    /// Where one request stands.
    enum State {
        /// Headers not seen yet.
        Started,
        /// Not a sale request: passed on untouched (but stripped of gate headers).
        Passthrough,
        /// Waiting for the deduct call with this token; the request is paused.
        AwaitingDeduct { token: u32, purchase: Purchase },
        /// Forwarded to the shop API as a winner with this order id.
        ForwardedWinner { order_id: String },
        /// The shop failed the winner; its response waits while the reservation is given back.
        ReleasingWinner { token: u32, order_id: String },
        /// Forwarded without a decision (failure mode open).
        ForwardedFailedOpen,
        /// The gate answered locally.
        Answered,
    }

    struct SaleRequest {
        config: Rc<Config>,
        stats: Rc<Stats>,
        memory: Rc<RefCell<LocalMemory>>,
        state: State,
    }

    impl Context for SaleRequest {
        fn on_http_call_response(
            &mut self,
            token_id: u32,
            num_headers: usize,
            body_size: usize,
            _num_trailers: usize,
        ) {
            let state = std::mem::replace(&mut self.state, State::Answered);
            if let State::ReleasingWinner { token, order_id } = state {
                if token == token_id {
                    self.finish_release(&order_id, num_headers);
                } else {
                    self.state = State::ReleasingWinner { token, order_id };
                }
                return;
            }
            let State::AwaitingDeduct { token, purchase } = state else {
                self.state = state;
                warn!("seckill-filter: ignoring a deduct response (token {token_id}) nobody waits for");
                return;
            };
            if token != token_id {
                warn!("seckill-filter: ignoring a deduct response with token {token_id}, waiting for {token}");
                self.state = State::AwaitingDeduct { token, purchase };
                return;
            }
            let verdict = self
                .read_deduct_response(num_headers, body_size)
                .and_then(|answer| reply::verdict(&purchase, answer));
            match verdict {
                Ok(Verdict::Forward(winner)) => {
                    // The last unit just went: the next buyer need not ask the syncer.
                    if winner.remaining == Some(0) {
                        self.cache_sold_out(&purchase);
                    }
                    self.forward_winner(&purchase, winner);
                    self.resume_http_request();
                }
                Ok(Verdict::Answer {
                    reply,
                    cache_sold_out,
                }) => {
                    if cache_sold_out {
                        self.cache_sold_out(&purchase);
                    }
                    self.answer(reply);
                }
                Err(failure) => {
                    if self.fail(&purchase, &failure) == Action::Continue {
                        self.resume_http_request();
                    }
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
                    return self.answer(reply::unavailable());
                }
            };
            let Some(headers) = input::parse_header_map(&map) else {
                error!("seckill-filter: the host's request header map is malformed");
                return self.answer(reply::unavailable());
            };
            self.strip_gate_headers(&headers);
            match input::classify(&self.config, &headers) {
                Classified::NotSale => {
                    Stats::bump(self.stats.passthrough);
                    self.state = State::Passthrough;
                    Action::Continue
                }
                Classified::Sale(Err(bad)) => self.answer(reply::bad_request(&bad.message)),
                Classified::Sale(Ok(purchase)) => self.gate(purchase),
            }
        }

        // While the deduct call is out, body and trailers must not resume the request: Envoy
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
            if let State::ForwardedWinner { order_id } = &self.state {
                let status = self.get_http_response_header_bytes(":status");
                if self.config.release_on_upstream_failure
                    && status.as_deref().is_some_and(upstream_failed)
                {
                    let order_id = order_id.clone();
                    return self.release_failed_winner(order_id);
                }
            }
            match &self.state {
                State::ForwardedWinner { order_id } => {
                    self.set_http_response_header(
                        reply::OUTCOME_HEADER,
                        Some(GateOutcome::Decided(seckill_api::Outcome::Won).as_str()),
                    );
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
            let Some(path) = release_path(&order_id) else {
                warn!("seckill-filter: not releasing order {order_id:?}: not a path-safe id");
                Stats::bump(self.stats.release_failed);
                return Action::Continue;
            };
            let config = Rc::clone(&self.config);
            let deduct = &config.deduct;
            let headers = vec![
                (":method", "POST"),
                (":path", path.as_str()),
                (":authority", deduct.authority.as_str()),
                (seckill_api::SECRET_HEADER, deduct.secret.as_str()),
            ];
            match self.dispatch_http_call(&deduct.cluster, headers, None, vec![], deduct.timeout) {
                Ok(token) => {
                    Stats::bump(self.stats.release_sent);
                    self.state = State::ReleasingWinner { token, order_id };
                    Action::Pause
                }
                Err(status) => {
                    warn!("seckill-filter: cannot call the syncer to release order {order_id}: {status:?}; the sweeper will");
                    Stats::bump(self.stats.release_failed);
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
                Stats::bump(self.stats.release_failed);
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
                Stats::add(self.stats.headers_stripped, count);
            }
        }

        /// Remembers, for every worker of this Envoy, that the goods has nothing left.
        fn cache_sold_out(&self, purchase: &Purchase) {
            if !self.config.sold_out_cache.is_zero() {
                let now = now_ns(self);
                let until_ns = now.saturating_add(duration_ns(self.config.sold_out_cache));
                let mut memory = self.memory.borrow_mut();
                shared::mark_sold_out(&HostStore, &mut memory, purchase.goods_id(), until_ns, now);
            }
        }

        /// Sold-out cache, rate limit (this worker's memory first, then shared data), then
        /// the deduct call.
        fn gate(&mut self, purchase: Purchase) -> Action {
            let now = now_ns(self);
            let admission = shared::admit(
                &HostStore,
                &mut self.memory.borrow_mut(),
                &self.config.rate_limit,
                purchase.goods_id(),
                now,
                !self.config.sold_out_cache.is_zero(),
            );
            match admission {
                Admission::SoldOut => {
                    Stats::bump(self.stats.sold_out_cache_hit);
                    self.answer(reply::sold_out_cached(purchase.goods_id()))
                }
                Admission::Rate(RateLimited::Allowed) => self.call_deduct(purchase),
                Admission::Rate(
                    RateLimited::Limited { retry_after_ns }
                    | RateLimited::Contended { retry_after_ns },
                ) => self.answer(reply::rate_limited(retry_after_ns)),
            }
        }

        fn call_deduct(&mut self, purchase: Purchase) -> Action {
            let config = Rc::clone(&self.config);
            let deduct = &config.deduct;
            let body = match serde_json::to_vec(purchase.deduct_request()) {
                Ok(body) => body,
                Err(e) => return self.fail(&purchase, &CalloutFailure::Dispatch(e.to_string())),
            };
            let headers = vec![
                (":method", "POST"),
                (":path", seckill_api::DEDUCT_PATH),
                (":authority", deduct.authority.as_str()),
                ("content-type", "application/json"),
                (seckill_api::SECRET_HEADER, deduct.secret.as_str()),
            ];
            match self.dispatch_http_call(
                &deduct.cluster,
                headers,
                Some(&body),
                vec![],
                deduct.timeout,
            ) {
                Ok(token) => {
                    Stats::bump(self.stats.callout_sent);
                    self.state = State::AwaitingDeduct { token, purchase };
                    Action::Pause
                }
                Err(status) => {
                    let why = format!("{status:?}; is cluster {:?} defined?", deduct.cluster);
                    self.fail(&purchase, &CalloutFailure::Dispatch(why))
                }
            }
        }

        fn read_deduct_response(
            &self,
            num_headers: usize,
            body_size: usize,
        ) -> Result<seckill_api::DeductReply, CalloutFailure> {
            // Envoy reports a timeout or a failed connection as a response without headers.
            if num_headers == 0 {
                return Err(CalloutFailure::NoResponse);
            }
            if body_size > reply::DEDUCT_REPLY_BYTES_MAX {
                return Err(CalloutFailure::TooLarge(body_size));
            }
            let status = self.get_http_call_response_header_bytes(":status");
            let body = self.get_http_call_response_body(0, body_size);
            reply::read_deduct_response(status.as_deref(), body.as_deref())
        }

        fn forward_winner(&mut self, purchase: &Purchase, winner: Winner) {
            for (name, value) in reply::winner_request_headers(purchase, &winner) {
                self.set_http_request_header(name, Some(&value));
            }
            self.stats
                .outcome(GateOutcome::Decided(seckill_api::Outcome::Won));
            self.state = State::ForwardedWinner {
                order_id: winner.order_id,
            };
        }

        /// No usable answer from the stock service: log it, then refuse (closed) or forward
        /// unmarked (open). Returns what `on_http_request_headers` should return; after a
        /// callout the caller resumes on Continue.
        fn fail(&mut self, purchase: &Purchase, failure: &CalloutFailure) -> Action {
            Stats::bump(self.stats.callout_failed);
            let config = Rc::clone(&self.config);
            let deduct = &config.deduct;
            warn!(
                "seckill-filter: deduct call to cluster {:?} for goods {} (request id {}) {failure}; failure mode {}",
                deduct.cluster,
                purchase.goods_id(),
                purchase.request_id(),
                match deduct.failure_mode {
                    FailureMode::Closed => "closed: answering 503",
                    FailureMode::Open => "open: forwarding without an order id",
                }
            );
            match deduct.failure_mode {
                FailureMode::Closed => self.answer(reply::unavailable()),
                FailureMode::Open => {
                    self.set_http_request_header(
                        seckill_api::GATE_STATUS_HEADER,
                        Some(reply::FAILED_OPEN_VALUE),
                    );
                    self.stats.outcome(GateOutcome::FailedOpen);
                    self.state = State::ForwardedFailedOpen;
                    Action::Continue
                }
            }
        }

        /// Sends a local reply; the request goes no further.
        fn answer(&mut self, reply: LocalReply) -> Action {
            self.stats.outcome(reply.outcome);
            let headers: Vec<(&str, &str)> = reply
                .headers
                .iter()
                .map(|(name, value)| (*name, value.as_ref()))
                .collect();
            self.send_http_response(reply.status, headers, Some(reply.body.as_bytes()));
            self.state = State::Answered;
            Action::Pause
        }

        fn hold_while_deciding(&self) -> Action {
            match self.state {
                State::AwaitingDeduct { .. } => Action::Pause,
                _ => Action::Continue,
            }
        }
    }

    /// The host calls used without the SDK's wrappers, which copy every header name and value
    /// into its own `String` and `Vec` (see `input::parse_header_map`).
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
        }

        const HTTP_REQUEST_HEADERS: u32 = proxy_wasm::types::MapType::HttpRequestHeaders as u32;
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
    }

    /// Stand-in for a request context when no configuration was accepted (Envoy does not
    /// create request contexts then; this only guards against the SDK panicking on None).
    struct Unconfigured;

    impl Context for Unconfigured {}

    impl HttpContext for Unconfigured {
        fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
            let reply = reply::unavailable();
            let headers: Vec<(&str, &str)> = reply
                .headers
                .iter()
                .map(|(name, value)| (*name, value.as_ref()))
                .collect();
            self.send_http_response(reply.status, headers, Some(reply.body.as_bytes()));
            Action::Pause
        }
    }

    /// Wall-clock time from the host, in ns since the epoch (0 if before it; never panics).
    fn now_ns(context: &dyn Context) -> u64 {
        let now = context.get_current_time();
        let since_epoch = now.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO);
        duration_ns(since_epoch)
    }

    fn duration_ns(duration: Duration) -> u64 {
        u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX)
    }
}

#[cfg(test)]
mod release_tests {
    #[test]
    fn failed_winners_are_released_by_order_id() {
        assert_eq!(
            super::release_path("sku-1.2.3").as_deref(),
            Some("/v1/orders/sku-1.2.3/release?reason=upstream_failed")
        );
        assert_eq!(super::release_path("a/../b"), None);
        assert_eq!(super::release_path(""), None);
        assert!(super::upstream_failed(b"503"));
        assert!(super::upstream_failed(b"500"));
        assert!(!super::upstream_failed(b"200"));
        assert!(!super::upstream_failed(b"409"));
        assert!(!super::upstream_failed(b"5xx"));
    }
}
