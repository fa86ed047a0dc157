//! One sale request, as a small state machine: headers → a local reply, or a wait for its
//! batch's deduct answer (which the root settles) → forwarded winner → the shop's answer,
//! which may give the reservation back.

use std::rc::Rc;

use super::worker::Worker;
use super::{error, warn, Host};
use crate::batch::{Decided, Enqueued, Ticket, Waiter};
use crate::config::Mode;
use crate::input::{self, is_gate_header, Classified, Purchase};
use crate::reply::{self, CalloutFailure, GateOutcome, LocalReply};
use crate::shared::{self, Admission, RateLimited};
use crate::{release_path, shop_answer, ShopAnswer};

/// What a request callback tells Envoy (the SDK's `Action`, without the SDK).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    /// Go on with the request or response.
    Continue,
    /// Hold it: the filter answers, resumes or lets a local reply replace it later.
    Pause,
}

/// Where one request stands.
enum State {
    /// Headers not seen yet.
    Started,
    /// Not a sale request: passed on untouched (but stripped of gate headers).
    Passthrough,
    /// Waiting for its batch's answer; the root leaves the decision in the ticket.
    Waiting { ticket: Ticket },
    /// Forwarded to the shop API as a winner with this order id (in shadow mode without
    /// it, marked `won`).
    ForwardedWinner {
        order_id: String,
        request_id: String,
        mode: Mode,
    },
    /// The shop failed the winner; its response waits while the reservation is given back.
    ReleasingWinner { token: u32, order_id: String },
    /// Forwarded without a decision (failure mode open).
    ForwardedFailedOpen,
    /// Forwarded in shadow mode, marked with the answer it would have had (not `won`): the
    /// shop's answer passes back untouched.
    Shadowed,
    /// The gate answered locally.
    Answered,
}

pub struct SaleRequest<H: Host> {
    context_id: u32,
    worker: Worker<H>,
    state: State,
}

impl<H: Host> Drop for SaleRequest<H> {
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

impl<H: Host> SaleRequest<H> {
    pub(crate) fn new(context_id: u32, worker: Worker<H>) -> Self {
        SaleRequest {
            context_id,
            worker,
            state: State::Started,
        }
    }

    /// `on_http_request_headers`: strip the gate's headers, then classify and gate. A
    /// request the gate cannot read is answered 503 even in shadow mode: it cannot tell
    /// whether it is a sale request, nor strip what a client forged.
    pub fn on_request_headers(&mut self) -> Flow {
        // Read the host's serialized map in place: no copy of every name and value (and
        // no UTF-8 assumption about values, which a client controls).
        let map = match self.worker.host.request_header_map() {
            Ok(map) => map,
            Err(status) => {
                error(
                    &self.worker.host,
                    format_args!("seckill-filter: cannot read the request headers: {status}"),
                );
                return self.answer(reply::unavailable(None), Mode::Enforce);
            }
        };
        let Some(headers) = input::parse_header_map(&map) else {
            error(
                &self.worker.host,
                format_args!("seckill-filter: the host's request header map is malformed"),
            );
            return self.answer(reply::unavailable(None), Mode::Enforce);
        };
        // Stripped in shadow mode too: a shop getting ready to trust the gate's headers
        // must not see a client's forgeries during the dry run either.
        self.strip_gate_headers(&headers);
        let config = &self.worker.config;
        // A request whose goods id could not be read takes the filter's own mode.
        let modes = &config.modes;
        match input::classify(config, &headers) {
            Classified::NotSale => {
                self.worker.bump(self.worker.stats.passthrough);
                self.state = State::Passthrough;
                Flow::Continue
            }
            Classified::Sale(Err(bad)) => {
                let mode = modes.of(bad.goods_id.as_deref());
                self.answer(reply::bad_request(&bad.message), mode)
            }
            Classified::Sale(Ok(purchase)) => self.gate(purchase),
            Classified::WrongMethod { goods_id } => {
                let mode = modes.of(goods_id.as_deref());
                let reply = reply::method_not_allowed(&config.route.methods);
                self.answer(reply, mode)
            }
            Classified::NearMiss => {
                let mode = modes.of(None);
                let reply = reply::not_the_sale_path(config.route.template.as_str());
                self.answer(reply, mode)
            }
        }
    }

    /// `on_http_request_body` and `on_http_request_trailers`. While the decision is out,
    /// they must not resume the request: Envoy treats Continue from a data callback as "go
    /// on", which would forward the request before the decision. Pause buffers them (within
    /// Envoy's buffer limits).
    pub fn on_request_data(&self) -> Flow {
        match &self.state {
            State::Waiting { ticket } if ticket.borrow().is_none() => Flow::Pause,
            _ => Flow::Continue,
        }
    }

    /// `on_http_response_headers`: marks the response with how the gate decided; a winner
    /// the shop definitely did not serve has its reservation released first. In shadow mode
    /// the release happens all the same, but the buyer's response is the shop's, unmarked.
    pub fn on_response_headers(&mut self) -> Flow {
        if let State::Waiting { ticket } = &self.state {
            let decided = ticket.borrow_mut().take();
            self.state = match decided {
                Some(Decided::Won {
                    order_id,
                    request_id,
                    mode,
                }) => State::ForwardedWinner {
                    order_id,
                    request_id,
                    mode,
                },
                Some(Decided::FailedOpen) => State::ForwardedFailedOpen,
                Some(Decided::Shadowed) => State::Shadowed,
                Some(Decided::Answered) | None => State::Answered,
            };
        }
        let host = &self.worker.host;
        let mut outcome = GateOutcome::Decided(seckill_api::Outcome::Won).as_str();
        if let State::ForwardedWinner {
            order_id,
            request_id,
            mode,
        } = &self.state
        {
            let status = host.response_header(":status").ok().flatten();
            let status = status.unwrap_or_default();
            // Only a 5xx needs Envoy's account of where it came from.
            let details = if status.first() == Some(&b'5') {
                host.property(&["response", "code_details"]).ok().flatten()
            } else {
                None
            };
            match shop_answer(&status, details.as_deref()) {
                ShopAnswer::NotCreated if self.worker.config.release_on_upstream_failure => {
                    let (order_id, mode) = (order_id.clone(), *mode);
                    return self.release_failed_winner(order_id, mode);
                }
                ShopAnswer::Unknown => {
                    // The shop may have the order: keep the reservation, and say so.
                    self.worker.bump(self.worker.stats.upstream_unknown);
                    outcome = "upstream_unknown";
                    self.worker.expect_retry(request_id);
                    // The retry must reach this filter, not the native sold-out route
                    // (`seckill_api::fast_path`); a shadow buyer gets the shop's answer
                    // untouched. Refused only when the response is gone.
                    if *mode == Mode::Enforce {
                        let _ = host.add_response_header(
                            "set-cookie",
                            seckill_api::fast_path::RETRY_COOKIE_SET,
                        );
                    }
                }
                ShopAnswer::NotCreated | ShopAnswer::Answered => {}
            }
        }
        // A header the host refuses belongs to a response that is gone.
        match &self.state {
            State::ForwardedWinner {
                order_id,
                mode: Mode::Enforce,
                ..
            } => {
                let _ = host.set_response_header(reply::OUTCOME_HEADER, outcome);
                let _ = host.set_response_header(seckill_api::ORDER_ID_HEADER, order_id);
            }
            State::ForwardedFailedOpen => {
                let failed_open = GateOutcome::FailedOpen.as_str();
                let _ = host.set_response_header(reply::OUTCOME_HEADER, failed_open);
            }
            _ => {}
        }
        Flow::Continue
    }

    /// `on_http_call_response`: a request's own callouts are only ever releases; deducts
    /// belong to the root.
    pub fn release_answered(&mut self, token_id: u32, num_headers: usize) {
        match std::mem::replace(&mut self.state, State::Answered) {
            State::ReleasingWinner { token, order_id } if token == token_id => {
                self.finish_release(&order_id, num_headers);
            }
            state => {
                warn(
                    &self.worker.host,
                    format_args!(
                        "seckill-filter: ignoring a response (token {token_id}) nobody waits for"
                    ),
                );
                self.state = state;
            }
        }
    }

    /// The shop failed a winner: ask the syncer to give the reservation back before the
    /// buyer sees the failure. If the call cannot be made, the sweeper releases the
    /// reservation when its payment window ends.
    fn release_failed_winner(&mut self, order_id: String, mode: Mode) -> Flow {
        let host = &self.worker.host;
        if mode == Mode::Enforce {
            // A header the host refuses belongs to a response that is gone.
            let _ = host.set_response_header(reply::OUTCOME_HEADER, "upstream_failed");
            let _ = host.set_response_header(seckill_api::ORDER_ID_HEADER, &order_id);
        }
        let stats = Rc::clone(&self.worker.stats);
        let Some(path) = release_path(&order_id) else {
            warn(
                host,
                format_args!(
                    "seckill-filter: not releasing order {order_id:?}: not a path-safe id"
                ),
            );
            self.worker.bump(stats.release_failed);
            return Flow::Continue;
        };
        let timeout = self.worker.config.deduct.timeout;
        match self.worker.post_to_syncer(&path, None, timeout) {
            Ok(token) => {
                self.worker.bump(stats.release_sent);
                // The answer reaches the root, which hands it back to this request.
                let releases = &self.worker.releases;
                releases.borrow_mut().insert(token, self.context_id);
                self.state = State::ReleasingWinner { token, order_id };
                Flow::Pause
            }
            Err(status) => {
                warn(
                    host,
                    format_args!("seckill-filter: cannot call the syncer to release order {order_id}: {status}; the sweeper will"),
                );
                self.worker.bump(stats.release_failed);
                self.state = State::Answered;
                Flow::Continue
            }
        }
    }

    fn finish_release(&mut self, order_id: &str, num_headers: usize) {
        let host = &self.worker.host;
        let status = if num_headers == 0 {
            None
        } else {
            host.http_call_response_header(":status").ok().flatten()
        };
        if status.as_deref() != Some(b"200".as_slice()) {
            self.worker.bump(self.worker.stats.release_failed);
            warn(
                host,
                format_args!(
                    "seckill-filter: releasing order {order_id} after a shop failure answered {:?}; the sweeper will release it when its window ends",
                    status.map(|s| String::from_utf8_lossy(&s).into_owned())
                ),
            );
        }
        self.state = State::Answered;
        // Refused only when the response is gone: nobody is left to pass it to.
        let _ = host.continue_response();
    }

    /// Removes every `x-seckill-*` request header: only the gate may set them. Only names
    /// actually present cost a host call, each name once (that removes every copy).
    fn strip_gate_headers(&self, headers: &[(&[u8], &[u8])]) {
        let mut count = 0;
        for (i, (name, _)) in headers.iter().enumerate() {
            if is_gate_header(name) {
                count += 1;
                if !headers[..i].iter().any(|(seen, _)| seen == name) {
                    // Refused only when the request is gone, which then reaches nobody.
                    let _ = self.worker.host.remove_request_header(name);
                }
            }
        }
        if count > 0 {
            self.worker.add(self.worker.stats.headers_stripped, count);
        }
    }

    /// Sold-out cache, rate limit (this worker's memory first, then shared data), then
    /// the deduct call.
    fn gate(&mut self, purchase: Purchase) -> Flow {
        let worker = &self.worker;
        let mode = worker.config.modes.of(Some(purchase.goods_id()));
        let now = worker.now_ns();
        let mut memory = worker.memory.borrow_mut();
        // A retry this worker asked for (its answer may be waiting in the syncer) is
        // decided by the syncer, not by a sold-out mark.
        let check_sold_out = !worker.config.sold_out_cache.is_zero()
            && !memory.expects_retry(purchase.request_id(), now);
        let admission = shared::admit(
            &worker.host,
            &mut memory,
            &worker.config.rate_limit,
            purchase.goods_id(),
            now,
            check_sold_out,
        );
        drop(memory);
        match admission {
            Admission::UnknownGoods => {
                worker.bump(worker.stats.unknown_goods_cache_hit);
                self.answer(reply::unknown_goods_cached(purchase.goods_id()), mode)
            }
            Admission::SoldOut => {
                worker.bump(worker.stats.sold_out_cache_hit);
                self.answer(reply::sold_out_cached(purchase.goods_id()), mode)
            }
            Admission::Rate(RateLimited::Allowed) => {
                self.wait_for_deduct(purchase, mode, now, false)
            }
            Admission::Probe => self.wait_for_deduct(purchase, mode, now, true),
            Admission::Rate(
                RateLimited::Limited { retry_after_ns } | RateLimited::Contended { retry_after_ns },
            ) => self.answer(reply::rate_limited(retry_after_ns), mode),
        }
    }

    /// Joins this worker's next deduct batch and pauses until the root settles it.
    fn wait_for_deduct(&mut self, purchase: Purchase, mode: Mode, now: u64, probe: bool) -> Flow {
        let ticket = Ticket::default();
        let waiter = Waiter {
            context_id: self.context_id,
            purchase,
            mode,
            probe,
            queued_ns: now,
            ticket: Rc::clone(&ticket),
            gone: false,
        };
        let enqueued = self.worker.batcher.borrow_mut().enqueue(waiter);
        match enqueued {
            Enqueued::Full(waiter) => {
                return self.fail_here(&waiter, &CalloutFailure::Overloaded);
            }
            Enqueued::WakeRoot => {
                let worker = &self.worker;
                if let Err(status) = worker.host.enqueue_shared_queue(worker.wake_queue, b"1") {
                    let mut batcher = worker.batcher.borrow_mut();
                    batcher.woken();
                    let waiter = batcher.withdraw(self.context_id);
                    drop(batcher);
                    let failure = CalloutFailure::Dispatch(format!(
                        "could not wake the worker's batcher: {status}"
                    ));
                    if let Some(waiter) = waiter {
                        return self.fail_here(&waiter, &failure);
                    }
                }
            }
            Enqueued::Queued => {}
        }
        self.state = State::Waiting { ticket };
        Flow::Pause
    }

    /// A failure decided in this request's own callback.
    fn fail_here(&mut self, waiter: &Waiter, failure: &CalloutFailure) -> Flow {
        let decided = self
            .worker
            .fail(&waiter.purchase, failure, true, waiter.mode);
        self.decided_here(decided)
    }

    /// Sends a local reply, and the request goes no further; in shadow mode it goes on,
    /// marked with the reply's outcome.
    fn answer(&mut self, reply: LocalReply, mode: Mode) -> Flow {
        let decided = self.worker.answer(reply, mode);
        self.decided_here(decided)
    }

    /// Where a decision made in this request's own callback leaves it.
    fn decided_here(&mut self, decided: Decided) -> Flow {
        let (state, flow) = match decided {
            Decided::FailedOpen => (State::ForwardedFailedOpen, Flow::Continue),
            Decided::Shadowed => (State::Shadowed, Flow::Continue),
            // Winners are only ever decided by the root, from a deduct answer.
            Decided::Won {
                order_id,
                request_id,
                mode,
            } => {
                let state = State::ForwardedWinner {
                    order_id,
                    request_id,
                    mode,
                };
                (state, Flow::Continue)
            }
            Decided::Answered => (State::Answered, Flow::Pause),
        };
        self.state = state;
        flow
    }
}
