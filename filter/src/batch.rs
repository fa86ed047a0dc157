//! Deduct calls shared between buyers: each Envoy worker keeps one queue of sale requests
//! waiting for a decision, and one callout to the syncer carries every request that arrived
//! while the previous callout was out (at most [`seckill_api::BATCH_ATTEMPTS_MAX`]).
//!
//! Why: on this kind of machine an HTTP callout from a wasm filter costs Envoy about as much
//! CPU as proxying two more requests, so one callout per buyer caps the winner path at about a
//! third of plain proxying. Shared callouts cost a little per buyer instead. Nothing waits on
//! purpose: when no callout is out, a request's batch leaves at once (a batch of one).
//!
//! Callouts belong to the root context (one per worker), not to a request: a request can end
//! (its client gone) while its batch is out, and the SDK drops the answer to a callout whose
//! owner has ended, which would strand every other request in that batch. Only a root
//! callback can dispatch a root-owned callout, so a request that finds the batcher idle wakes
//! the root through a shared queue; the root then dispatches, and dispatches the next batch
//! from each answer while requests keep arriving.
//!
//! Pure code: the host calls live in `host/root.rs`; this is the bookkeeping, unit-tested natively.

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::rc::Rc;

use seckill_api::BATCH_ATTEMPTS_MAX;

use crate::config::Mode;
use crate::input::Purchase;

/// Deduct callouts one worker keeps out at once. A request that arrives while a batch is out
/// need not wait for that batch's whole round trip. On 2 cores the round trip is mostly
/// waiting for the syncer's and Redis's turn on a core, so overlapping several raised the
/// winner path from 16k to 19.5k requests/s (with 2 and with 8 out, 50 buyers; 16 gave no
/// more). The syncer merges concurrent batches into its Redis calls, so more callouts do not
/// mean more Redis round trips.
pub const CALLOUTS_IN_FLIGHT_MAX: usize = 8;
/// Requests one worker keeps waiting for a batch at most; past it, requests fail at once
/// (failure mode) instead of queueing without bound.
pub const WAITING_MAX: usize = 4_096;

/// What the batch decided for one request. The root writes it; the request's own context
/// reads it when the shop's answer (or the local reply) comes back through it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decided {
    /// Forwarded to the shop API with this order id (for this request id); in shadow mode
    /// without it, but the reservation is real and lives by the shop's answer all the same.
    Won {
        order_id: String,
        request_id: String,
        mode: Mode,
    },
    /// Forwarded without a decision (failure mode open).
    FailedOpen,
    /// Forwarded in shadow mode with what the gate would have answered (anything but `won`):
    /// the shop's answer goes back to the buyer untouched.
    Shadowed,
    /// Answered locally (a loser, or failure mode closed).
    Answered,
}

/// Where a request's decision is left for it.
pub type Ticket = Rc<RefCell<Option<Decided>>>;

/// A sale request waiting for a decision.
#[derive(Debug)]
pub struct Waiter {
    /// The request's context id: the root acts on the request through it.
    pub context_id: u32,
    pub purchase: Purchase,
    /// Enforced, or a dry run (shadow mode), decided when the request arrived.
    pub mode: Mode,
    /// Admitted through the unconfirmed bucket: the answer may confirm the goods.
    pub probe: bool,
    /// When it started waiting (ns since the epoch, host clock).
    pub queued_ns: u64,
    pub ticket: Ticket,
    /// The request ended while its batch was out: its answer is read (answers pair with
    /// attempts by position) but not acted on.
    pub gone: bool,
}

/// What became of a request handed to [`Batcher::enqueue`].
#[derive(Debug)]
pub enum Enqueued {
    /// Waiting, and no batch can leave until the root runs: wake it.
    WakeRoot,
    /// Waiting; a root callback already due will send it.
    Queued,
    /// The queue is full: the request is handed back to be failed.
    Full(Waiter),
}

/// One worker's waiting requests and callouts.
#[derive(Debug, Default)]
pub struct Batcher {
    queue: VecDeque<Waiter>,
    in_flight: HashMap<u32, Vec<Waiter>>,
    /// A wake-up is on its way to the root; later arrivals need not send another.
    wake_pending: bool,
}

/// What [`Batcher::next_batch`] hands out.
#[derive(Debug, Default)]
pub struct NextBatch {
    /// Requests that waited longer than allowed without a batch leaving: fail them.
    pub expired: Vec<Waiter>,
    /// Requests to send in one callout now (empty: nothing may or needs to leave).
    pub batch: Vec<Waiter>,
}

impl Batcher {
    pub fn enqueue(&mut self, waiter: Waiter) -> Enqueued {
        if self.queue.len() >= WAITING_MAX {
            return Enqueued::Full(waiter);
        }
        self.queue.push_back(waiter);
        if self.wake_pending || self.in_flight.len() >= CALLOUTS_IN_FLIGHT_MAX {
            // Either the wake-up or a callout's answer will send it.
            return Enqueued::Queued;
        }
        self.wake_pending = true;
        Enqueued::WakeRoot
    }

    /// The root runs (woken, or for any other reason): a new arrival must wake it again.
    pub fn woken(&mut self) {
        self.wake_pending = false;
    }

    /// The next batch, if a callout may leave now. Requests queued before
    /// `now_ns - max_wait_ns` come back as expired instead of being sent.
    pub fn next_batch(&mut self, now_ns: u64, max_wait_ns: u64) -> NextBatch {
        let mut next = NextBatch::default();
        let oldest_allowed = now_ns.saturating_sub(max_wait_ns);
        while self
            .queue
            .front()
            .is_some_and(|w| w.queued_ns < oldest_allowed)
        {
            next.expired.extend(self.queue.pop_front());
        }
        if self.in_flight.len() < CALLOUTS_IN_FLIGHT_MAX {
            let take = self.queue.len().min(BATCH_ATTEMPTS_MAX);
            next.batch.extend(self.queue.drain(..take));
        }
        next
    }

    /// A batch left as callout `token`.
    pub fn sent(&mut self, token: u32, batch: Vec<Waiter>) {
        self.in_flight.insert(token, batch);
    }

    /// The requests callout `token` carried; `None` for a token this batcher did not send.
    pub fn answered(&mut self, token: u32) -> Option<Vec<Waiter>> {
        self.in_flight.remove(&token)
    }

    /// Takes a request back out of the queue (its wake-up could not be sent).
    pub fn withdraw(&mut self, context_id: u32) -> Option<Waiter> {
        let at = self.queue.iter().position(|w| w.context_id == context_id)?;
        self.queue.remove(at)
    }

    /// A request ended before its decision: it must not be acted on any more. If its batch
    /// is already out, it stays in the batch marked gone (the answer still pairs with it);
    /// the syncer decides it anyway, and a unit it won is released when its payment window
    /// ends, as for any buyer who never pays.
    pub fn forget(&mut self, context_id: u32) {
        self.queue.retain(|w| w.context_id != context_id);
        for waiter in self.in_flight.values_mut().flatten() {
            if waiter.context_id == context_id {
                waiter.gone = true;
            }
        }
    }

    pub fn waiting(&self) -> usize {
        self.queue.len()
    }
}

/// The callout body for a batch (a `seckill_api::DeductBatchRequest`), written without
/// copying each attempt. `timeout_ms`: how long the gate waits for the answer; the syncer
/// decides nothing after that, so no unit is granted to a buyer the gate stopped waiting for.
pub fn batch_body(batch: &[Waiter], timeout_ms: u64) -> Result<Vec<u8>, serde_json::Error> {
    #[derive(serde::Serialize)]
    struct Body<'a> {
        attempts: Vec<&'a seckill_api::DeductRequest>,
        timeout_ms: u64,
    }
    let body = Body {
        attempts: batch.iter().map(|w| w.purchase.deduct_request()).collect(),
        timeout_ms,
    };
    serde_json::to_vec(&body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::input::sale_for_test;
    use seckill_api::DeductBatchRequest;
    use serde_json::json;

    fn purchase(user: &str) -> Purchase {
        let config = json!({
            "route": {"path_template": "/seckill/{goods_id}/buy"},
            "goods_id": {"path": "goods_id"},
            "user_id": {"header": "x-user-id"},
            "request_id": {"header": "x-request-id"},
            "deduct": {"cluster": "syncer", "secret_env": "SECKILL_TEST_EDGE_SECRET"},
            "rate_limit": {"default": {"per_second": 10.0, "burst": 10}}
        });
        let headers = [
            (":method", "POST"),
            (":path", "/seckill/g1/buy"),
            ("x-user-id", user),
            ("x-request-id", "r1"),
        ];
        sale_for_test(&config, &headers)
    }

    fn waiter(id: u32, at: u64) -> Waiter {
        Waiter {
            context_id: id,
            purchase: purchase(&format!("u{id}")),
            mode: crate::config::Mode::Enforce,
            probe: false,
            queued_ns: at,
            ticket: Ticket::default(),
            gone: false,
        }
    }

    fn ids(batch: &[Waiter]) -> Vec<u32> {
        batch.iter().map(|w| w.context_id).collect()
    }

    #[test]
    fn the_first_arrival_wakes_the_root_and_later_ones_ride_along() {
        let mut b = Batcher::default();
        assert!(matches!(b.enqueue(waiter(1, 0)), Enqueued::WakeRoot));
        assert!(matches!(b.enqueue(waiter(2, 0)), Enqueued::Queued));
        b.woken();
        let next = b.next_batch(10, 100);
        assert_eq!(ids(&next.batch), vec![1, 2]);
        assert!(next.expired.is_empty());
        b.sent(100, next.batch);
        // While fewer than the maximum are out, a newcomer starts a callout of its own.
        for token in 101..100 + CALLOUTS_IN_FLIGHT_MAX as u32 {
            assert!(matches!(b.enqueue(waiter(token, 20)), Enqueued::WakeRoot));
            b.woken();
            let next = b.next_batch(20, 100);
            assert_eq!(ids(&next.batch), vec![token]);
            b.sent(token, next.batch);
        }
        // All out: newcomers wait for an answer, which sends them.
        assert!(matches!(b.enqueue(waiter(4, 30)), Enqueued::Queued));
        assert!(matches!(b.enqueue(waiter(5, 30)), Enqueued::Queued));
        assert!(b.next_batch(30, 100).batch.is_empty());
        assert_eq!(ids(&b.answered(100).unwrap()), vec![1, 2]);
        assert!(b.answered(100).is_none(), "an answer is delivered once");
        assert_eq!(ids(&b.next_batch(40, 100).batch), vec![4, 5]);
    }

    #[test]
    fn a_batch_holds_at_most_the_api_limit() {
        let mut b = Batcher::default();
        for id in 0..(BATCH_ATTEMPTS_MAX as u32 + 5) {
            b.enqueue(waiter(id, 0));
        }
        assert_eq!(b.next_batch(0, 100).batch.len(), BATCH_ATTEMPTS_MAX);
        assert_eq!(b.waiting(), 5);
    }

    #[test]
    fn the_queue_is_bounded() {
        let mut b = Batcher::default();
        for id in 0..WAITING_MAX as u32 {
            assert!(!matches!(b.enqueue(waiter(id, 0)), Enqueued::Full(_)));
        }
        match b.enqueue(waiter(99_999, 0)) {
            Enqueued::Full(w) => assert_eq!(w.context_id, 99_999),
            other => panic!("expected Full, got {other:?}"),
        }
        assert_eq!(b.waiting(), WAITING_MAX);
    }

    #[test]
    fn requests_that_waited_too_long_expire_instead_of_leaving() {
        let mut b = Batcher::default();
        b.enqueue(waiter(1, 0));
        b.enqueue(waiter(2, 50));
        b.enqueue(waiter(3, 90));
        let next = b.next_batch(120, 60);
        assert_eq!(ids(&next.expired), vec![1, 2]);
        assert_eq!(ids(&next.batch), vec![3]);
    }

    #[test]
    fn expiry_is_judged_even_when_no_callout_may_leave() {
        let mut b = Batcher::default();
        for token in 0..CALLOUTS_IN_FLIGHT_MAX as u32 {
            b.sent(token, vec![]);
        }
        b.enqueue(waiter(3, 0));
        let next = b.next_batch(1_000, 10);
        assert_eq!(ids(&next.expired), vec![3]);
        assert!(next.batch.is_empty());
    }

    #[test]
    fn a_request_that_ended_is_not_acted_on() {
        let mut b = Batcher::default();
        b.enqueue(waiter(1, 0));
        b.enqueue(waiter(2, 0));
        let batch = b.next_batch(0, 10).batch;
        b.sent(5, batch);
        b.enqueue(waiter(3, 0));
        b.forget(2);
        b.forget(3);
        let answered = b.answered(5).unwrap();
        assert_eq!(ids(&answered), vec![1, 2], "answers still pair by position");
        let gone: Vec<bool> = answered.iter().map(|w| w.gone).collect();
        assert_eq!(gone, vec![false, true]);
        assert_eq!(
            b.waiting(),
            0,
            "a request not yet sent is dropped from the queue"
        );
    }

    #[test]
    fn the_body_is_what_the_syncer_reads() {
        let batch = vec![waiter(1, 0), waiter(2, 0)];
        let body = batch_body(&batch, 300).unwrap();
        let read: DeductBatchRequest = serde_json::from_slice(&body).unwrap();
        assert_eq!(read.timeout_ms, Some(300));
        assert_eq!(read.attempts.len(), 2);
        assert_eq!(read.attempts[1].user_id, "u2");
        assert_eq!(&read.attempts[0], batch[0].purchase.deduct_request());
    }
}
