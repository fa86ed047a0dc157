//! Claims: the gate tells the syncer which reservations it delivered to the shop.
//!
//! Why: the gate can stop waiting for a deduct answer (its timeout, a stalled Redis) while the
//! syncer still decides the attempt, or the buyer can leave before the answer comes. Such a
//! reservation reached nobody. The syncer keeps a reservation made through the batch
//! endpoint for a short claim window only; the gate claims each winner it forwarded, and the
//! claim extends the reservation to its payment window. An unclaimed reservation is released
//! as `unclaimed` when the claim window ends, so a lost answer strands a unit for seconds,
//! not for the payment window (and a retry with the same request id in the meantime is
//! answered `won` with that order, which is then delivered and claimed).
//!
//! Each worker collects the order ids it forwarded. A full call's worth
//! ([`CLAIMS_PER_CALL_MAX`]) leaves as soon as it is there; the rest leave on the root's tick
//! (about once a second). At most [`CLAIM_CALLS_IN_FLIGHT_MAX`] claim calls are out at once,
//! so claims keep up with any rate a worker can forward winners at. A call that fails puts
//! its ids back; ids the syncer reports `failed` come back too. Bounded: at most
//! [`PENDING_CLAIMS_MAX`] ids wait; past that the oldest are dropped and counted (their
//! reservations are then released when the claim window ends, which the shop learns from a
//! `409` on confirm).
//!
//! Pure code: the host calls live in the host module; this is the bookkeeping.

use std::collections::VecDeque;

use seckill_api::CLAIMS_PER_CALL_MAX;

/// Order ids one worker keeps waiting to be claimed at most. A tick sends up to
/// [`CLAIMS_PER_CALL_MAX`]; this holds several ticks' worth of winners at any rate a worker
/// can forward them.
pub const PENDING_CLAIMS_MAX: usize = 16 * CLAIMS_PER_CALL_MAX;
/// How long a claim call may take. Claims are on no buyer's path, so a slow syncer gets time
/// to take them rather than have them sent again (the claim window, 30 s by default, is far
/// longer); the request-path `deduct.timeout_ms` would give up on them under load.
pub const CLAIM_CALL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
/// Claim calls one worker keeps out at once: several full calls can travel while the syncer
/// works through one (each claims up to [`CLAIMS_PER_CALL_MAX`] reservations in a script call
/// per goods).
pub const CLAIM_CALLS_IN_FLIGHT_MAX: usize = 4;

/// One worker's claims: waiting, and the calls out.
#[derive(Debug, Default)]
pub struct Claims {
    pending: VecDeque<String>,
    in_flight: Vec<(u32, Vec<String>)>,
    dropped: u64,
}

impl Claims {
    /// Remembers a forwarded winner's order id; drops the oldest waiting one if full.
    pub fn add(&mut self, order_id: String) {
        if self.pending.len() >= PENDING_CLAIMS_MAX {
            self.pending.pop_front();
            self.dropped += 1;
        }
        self.pending.push_back(order_id);
    }

    /// The ids for the next claim call, if one may go now: a call slot is free and there is
    /// a full call's worth waiting, or (`flush`, on the tick) anything at all.
    pub fn next_call(&mut self, flush: bool) -> Option<Vec<String>> {
        let enough =
            self.pending.len() >= CLAIMS_PER_CALL_MAX || (flush && !self.pending.is_empty());
        if self.in_flight.len() >= CLAIM_CALLS_IN_FLIGHT_MAX || !enough {
            return None;
        }
        let count = self.pending.len().min(CLAIMS_PER_CALL_MAX);
        Some(self.pending.drain(..count).collect())
    }

    /// The call carrying `ids` went out with this token.
    pub fn sent(&mut self, token: u32, ids: Vec<String>) {
        self.in_flight.push((token, ids));
    }

    /// The call could not be dispatched: its ids wait for the next tick.
    pub fn not_sent(&mut self, ids: Vec<String>) {
        self.put_back(ids);
    }

    /// Whether this token is the claim call's (the root's other callouts are deducts).
    pub fn owns(&self, token: u32) -> bool {
        self.in_flight.iter().any(|(t, _)| *t == token)
    }

    /// The claim call came back. `retry`: the ids to claim again (all of them when the call
    /// failed, the ones the syncer listed as `failed` otherwise).
    pub fn answered(&mut self, token: u32, retry: Retry) {
        let Some(position) = self.in_flight.iter().position(|(t, _)| *t == token) else {
            return;
        };
        let (_, ids) = self.in_flight.swap_remove(position);
        match retry {
            Retry::All => self.put_back(ids),
            Retry::These(failed) => {
                // Only ids this call carried: the syncer's list is not trusted further.
                let again = failed.into_iter().filter(|id| ids.contains(id)).collect();
                self.put_back(again);
            }
        }
    }

    /// Ids back at the front, oldest first, within the bound.
    fn put_back(&mut self, ids: Vec<String>) {
        for id in ids.into_iter().rev() {
            if self.pending.len() >= PENDING_CLAIMS_MAX {
                self.dropped += 1;
                continue;
            }
            self.pending.push_front(id);
        }
    }

    /// Ids waiting (not counting the call out).
    pub fn waiting(&self) -> usize {
        self.pending.len()
    }

    /// Ids dropped so far because the queue was full; reading resets the count.
    pub fn take_dropped(&mut self) -> u64 {
        std::mem::take(&mut self.dropped)
    }
}

/// What to claim again after a claim call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Retry {
    All,
    These(Vec<String>),
}

/// The claim call's body (a `seckill_api::ClaimRequest`).
pub fn claim_body(ids: &[String]) -> Result<Vec<u8>, serde_json::Error> {
    #[derive(serde::Serialize)]
    struct Body<'a> {
        order_ids: &'a [String],
    }
    serde_json::to_vec(&Body { order_ids: ids })
}

/// Reads the claim call's response: on a 200 with a `ClaimReply`, the ids it could not
/// claim; anything else means nothing is known to be claimed.
pub fn read_claim_response(status: Option<&[u8]>, body: Option<&[u8]>) -> Retry {
    if status != Some(b"200".as_slice()) {
        return Retry::All;
    }
    match body.map(serde_json::from_slice::<seckill_api::ClaimReply>) {
        Some(Ok(reply)) => Retry::These(reply.failed),
        _ => Retry::All,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use seckill_api::ClaimRequest;

    fn ids(range: std::ops::Range<usize>) -> Vec<String> {
        range.map(|i| format!("g.1.{i}")).collect()
    }

    #[test]
    fn full_calls_leave_at_once_the_rest_on_the_tick() {
        let mut claims = Claims::default();
        assert_eq!(claims.next_call(true), None);
        for id in ids(0..CLAIMS_PER_CALL_MAX + 5) {
            claims.add(id);
        }
        let first = claims.next_call(false).unwrap();
        assert_eq!(first, ids(0..CLAIMS_PER_CALL_MAX));
        claims.sent(7, first);
        assert!(claims.owns(7));
        assert!(!claims.owns(8));
        // Five waiting: not a full call, so only the tick sends them.
        assert_eq!(claims.next_call(false), None);
        let rest = claims.next_call(true).unwrap();
        assert_eq!(rest, ids(CLAIMS_PER_CALL_MAX..CLAIMS_PER_CALL_MAX + 5));
        claims.sent(8, rest);
        claims.answered(7, Retry::These(vec![]));
        assert!(!claims.owns(7));
        assert!(claims.owns(8));
    }

    #[test]
    fn a_bounded_number_of_calls_is_out() {
        let mut claims = Claims::default();
        for id in ids(0..(CLAIM_CALLS_IN_FLIGHT_MAX + 1) * CLAIMS_PER_CALL_MAX) {
            claims.add(id);
        }
        for token in 0..CLAIM_CALLS_IN_FLIGHT_MAX as u32 {
            let call = claims.next_call(false).unwrap();
            claims.sent(token, call);
        }
        assert_eq!(claims.next_call(true), None, "every slot is taken");
        claims.answered(2, Retry::These(vec![]));
        assert_eq!(claims.next_call(false).unwrap().len(), CLAIMS_PER_CALL_MAX);
    }

    #[test]
    fn failed_calls_and_failed_ids_come_back_first() {
        let mut claims = Claims::default();
        for id in ids(0..3) {
            claims.add(id);
        }
        let call = claims.next_call(true).unwrap();
        claims.sent(1, call);
        claims.add("g.1.9".into());
        claims.answered(1, Retry::All);
        assert_eq!(
            claims.next_call(true).unwrap(),
            vec!["g.1.0", "g.1.1", "g.1.2", "g.1.9"]
        );
        claims.sent(2, ids(0..3));
        // An answer for another token changes nothing.
        claims.answered(3, Retry::All);
        assert!(claims.owns(2));
        // Only ids the call carried are retried, whatever the syncer lists.
        claims.answered(2, Retry::These(vec!["g.1.1".into(), "x.1.1".into()]));
        assert_eq!(claims.next_call(true).unwrap(), vec!["g.1.1"]);
        claims.not_sent(vec!["g.1.1".into()]);
        assert_eq!(claims.waiting(), 1);
    }

    #[test]
    fn the_oldest_are_dropped_past_the_bound() {
        let mut claims = Claims::default();
        for id in ids(0..PENDING_CLAIMS_MAX + 3) {
            claims.add(id);
        }
        assert_eq!(claims.waiting(), PENDING_CLAIMS_MAX);
        assert_eq!(claims.take_dropped(), 3);
        assert_eq!(claims.take_dropped(), 0);
        assert_eq!(claims.next_call(true).unwrap()[0], "g.1.3");
    }

    #[test]
    fn the_wire_shapes_match_the_api() {
        let body = claim_body(&ids(0..2)).unwrap();
        let request: ClaimRequest = serde_json::from_slice(&body).unwrap();
        assert_eq!(request.order_ids, ids(0..2));
        assert_eq!(
            read_claim_response(
                Some(b"200"),
                Some(br#"{"claimed":1,"late":0,"failed":["g.1.1"]}"#)
            ),
            Retry::These(vec!["g.1.1".into()])
        );
        assert_eq!(
            read_claim_response(Some(b"200"), Some(br#"{"claimed":2,"late":0}"#)),
            Retry::These(vec![])
        );
        assert_eq!(read_claim_response(Some(b"503"), None), Retry::All);
        assert_eq!(read_claim_response(None, None), Retry::All);
        assert_eq!(
            read_claim_response(Some(b"200"), Some(b"<html>")),
            Retry::All
        );
    }
}
