//! What the buyer is told: outcome names, statuses, headers and JSON bodies of every local
//! reply, and the reading of the deduct call's answer into a verdict.
//!
//! Pure code: no host calls, unit-tested natively.

use std::borrow::Cow;
use std::fmt::{self, Write as _};

use serde::Serialize;

use seckill_api::{BatchItem, DeductBatchReply, DeductReply, ErrorReply, Outcome};

use crate::gcra;
use crate::input::Purchase;

/// Response header naming how the gate decided (local replies and forwarded requests alike).
pub const OUTCOME_HEADER: &str = "x-seckill-outcome";
/// Value of `GATE_STATUS_HEADER` on a request forwarded without a decision.
pub const FAILED_OPEN_VALUE: &str = "failed-open";
/// Largest batch deduct reply body read: a full batch of replies with room to spare (one
/// reply is under 200 bytes); anything near this is not the syncer talking.
pub const BATCH_REPLY_BYTES_MAX: usize = seckill_api::BATCH_ATTEMPTS_MAX * 1024;
/// Longest account of an unreadable deduct answer in the log.
const BAD_BODY_WORDS_MAX: usize = 256;
/// Longest order id forwarded in a header (same bound as every other id).
const ORDER_ID_LEN_MAX: usize = seckill_api::ID_LEN_MAX;

/// Every way the gate can end a sale request; the names appear in `x-seckill-outcome`, in
/// error bodies and in stats names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GateOutcome {
    /// The stock service decided.
    Decided(Outcome),
    /// Over the per-goods request rate: 429.
    RateLimited,
    /// Bad goods id, user id, quantity or request id, or a path that only resembles the sale
    /// route: 400.
    BadRequest,
    /// The sale route with a method it does not take: 405.
    MethodNotAllowed,
    /// The stock service did not answer usably and failure mode is closed: 503.
    Unavailable,
    /// The stock service did not answer usably and failure mode is open: forwarded unmarked.
    FailedOpen,
}

impl GateOutcome {
    pub const ALL: [GateOutcome; 17] = [
        GateOutcome::Decided(Outcome::Won),
        GateOutcome::Decided(Outcome::SoldOut),
        GateOutcome::Decided(Outcome::LimitReached),
        GateOutcome::Decided(Outcome::Duplicate),
        GateOutcome::Decided(Outcome::NotStarted),
        GateOutcome::Decided(Outcome::Ended),
        GateOutcome::Decided(Outcome::Paused),
        GateOutcome::Decided(Outcome::UnknownGoods),
        GateOutcome::Decided(Outcome::RequestIdConflict),
        GateOutcome::Decided(Outcome::Released),
        GateOutcome::Decided(Outcome::Confirmed),
        GateOutcome::Decided(Outcome::FleetRateLimited),
        GateOutcome::RateLimited,
        GateOutcome::BadRequest,
        GateOutcome::MethodNotAllowed,
        GateOutcome::Unavailable,
        GateOutcome::FailedOpen,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            GateOutcome::Decided(outcome) => outcome.as_str(),
            GateOutcome::RateLimited => "rate_limited",
            GateOutcome::BadRequest => "bad_request",
            GateOutcome::MethodNotAllowed => "method_not_allowed",
            GateOutcome::Unavailable => "unavailable",
            GateOutcome::FailedOpen => "failed_open",
        }
    }

    /// Position in [`GateOutcome::ALL`], for per-outcome counters.
    pub fn index(self) -> usize {
        GateOutcome::ALL
            .iter()
            .position(|o| *o == self)
            .unwrap_or_default()
    }

    /// The counter this outcome increments.
    pub fn stat_name(self) -> String {
        format!("seckill.outcome.{}", self.as_str())
    }

    /// The counter a request forwarded in shadow mode increments instead: what the gate
    /// would have answered. A family of its own, so enforced answers and dry-run ones never
    /// mix (a mixed filter shows both; alerts on `outcome` ignore the dry run).
    pub fn shadow_stat_name(self) -> String {
        format!("seckill.shadow.{}", self.as_str())
    }
}

/// A reply the gate sends itself instead of forwarding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalReply {
    pub outcome: GateOutcome,
    pub status: u32,
    pub headers: Vec<(&'static str, Cow<'static, str>)>,
    pub body: String,
}

impl LocalReply {
    fn new(outcome: GateOutcome, status: u32, body: String, retry_after_ms: Option<u64>) -> Self {
        let mut headers = Vec::with_capacity(4);
        headers.extend([
            ("content-type", Cow::Borrowed("application/json")),
            // Decisions are per buyer and per moment: no cache may keep them.
            ("cache-control", Cow::Borrowed("no-store")),
            (OUTCOME_HEADER, Cow::Borrowed(outcome.as_str())),
        ]);
        if let Some(ms) = retry_after_ms {
            let seconds = gcra::retry_after_seconds(ms).to_string();
            headers.push(("retry-after", Cow::Owned(seconds)));
        }
        LocalReply {
            outcome,
            status,
            headers,
            body,
        }
    }
}

/// Body of an outcome the stock service decided (and of a cached sold-out).
#[derive(Serialize)]
struct OutcomeBody<'a> {
    outcome: Outcome,
    goods_id: &'a str,
    message: String,
    /// For `released` and `confirmed`: the order this request id made before.
    #[serde(skip_serializing_if = "Option::is_none")]
    order_id: Option<&'a str>,
    /// For `released`: why it was released.
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    remaining: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    retry_after_ms: Option<u64>,
}

/// Error body with a retry hint (the shared `ErrorReply` plus `retry_after_ms`). Only the
/// tests serialise it: [`rate_limited`] writes the same bytes directly.
#[cfg(test)]
#[derive(Serialize)]
struct RetryErrorBody {
    #[serde(flatten)]
    error: ErrorReply,
    retry_after_ms: u64,
}

/// Appends `text` as a JSON string, escaped exactly as `serde_json` does (the two hot replies
/// below are written by hand; everything else goes through serde).
fn push_json_str(out: &mut String, text: &str) {
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if c < ' ' => {
                let _ = write!(out, "\\u{:04x}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Serialising these plain structs cannot fail; should it ever, a fixed body beats a panic.
fn to_json(value: &impl Serialize) -> String {
    serde_json::to_string(value)
        .unwrap_or_else(|_| r#"{"error":"internal","message":"reply could not be encoded"}"#.into())
}

fn error_body(outcome: GateOutcome, message: &str) -> String {
    to_json(&ErrorReply {
        error: outcome.as_str().to_string(),
        message: message.to_string(),
    })
}

/// 400 for input that failed validation.
pub fn bad_request(message: &str) -> LocalReply {
    let outcome = GateOutcome::BadRequest;
    LocalReply::new(outcome, 400, error_body(outcome, message), None)
}

/// 429 for a request over the goods' rate.
pub fn rate_limited(retry_after_ns: u64) -> LocalReply {
    let outcome = GateOutcome::RateLimited;
    // At least 1 ms, so the hint never says "retry now" to a refused request.
    let retry_after_ms = gcra::retry_after_ms(retry_after_ns).max(1);
    // The shape of `RetryErrorBody`, written directly: this is a hot path.
    let body = format!(
        "{{\"error\":\"rate_limited\",\"message\":\"too many purchase attempts for this goods right now; retry after {retry_after_ms} ms\",\"retry_after_ms\":{retry_after_ms}}}"
    );
    LocalReply::new(outcome, 429, body, Some(retry_after_ms))
}

/// Body of a 503 that names the request id to retry with.
#[derive(Serialize)]
struct UnavailableBody<'a> {
    error: &'static str,
    message: &'static str,
    request_id: &'a str,
}

/// 503 when the stock service gave no usable answer and failure mode is closed. The message
/// is fixed: the buyer learns nothing about the internals. With the buyer's request id, the
/// answer says to retry with it: the attempt may have been decided after the gate stopped
/// waiting, and a retry with the same id is answered from that decision (a unit won is
/// then delivered, never won twice). `Retry-After: 1`: the stock service is down, switching
/// to its MySQL fallback, or shedding load, each a matter of moments.
pub fn unavailable(request_id: Option<&str>) -> LocalReply {
    let outcome = GateOutcome::Unavailable;
    let retry_cookie = request_id.is_some();
    let body = match request_id {
        Some(request_id) => to_json(&UnavailableBody {
            error: "unavailable",
            message: "the stock service did not answer in time; retry with the same request id",
            request_id,
        }),
        None => error_body(
            outcome,
            "the stock service did not answer in time; try again",
        ),
    };
    let mut reply = LocalReply::new(outcome, 503, body, Some(1_000));
    if retry_cookie {
        // The retry with this request id must reach the filter (whose worker remembers it),
        // not the native sold-out route (`seckill_api::fast_path`).
        let cookie = seckill_api::fast_path::RETRY_COOKIE_SET;
        reply.headers.push(("set-cookie", Cow::Borrowed(cookie)));
    }
    reply
}

/// How long a buyer is told to wait after a 503 caused by this site's configuration: a fix
/// takes someone's minutes, not the moments of an outage, and a tight retry loop of every
/// buyer helps nobody meanwhile.
const MISCONFIGURED_RETRY_AFTER_MS: u64 = 10_000;

/// 503 when the gate cannot call its stock service at all because Envoy has no cluster of
/// the configured name. Nothing was asked, so nothing was decided: the buyer may retry with
/// any request id. The message says it is the site's fault (not a crowd, not the buyer's) and
/// no more: the cluster's name is for the operator's log, not for buyers.
pub fn misconfigured(request_id: &str) -> LocalReply {
    let body = to_json(&UnavailableBody {
        error: GateOutcome::Unavailable.as_str(),
        message: "this gateway is misconfigured and cannot reach the stock service; nothing was reserved; try again later",
        request_id,
    });
    let retry_after_ms = Some(MISCONFIGURED_RETRY_AFTER_MS);
    LocalReply::new(GateOutcome::Unavailable, 503, body, retry_after_ms)
}

/// The 503 of failure mode closed, for this failure.
pub fn unavailable_after(failure: &CalloutFailure, request_id: &str) -> LocalReply {
    match failure {
        CalloutFailure::NoSuchCluster(_) => misconfigured(request_id),
        _ => unavailable(Some(request_id)),
    }
}

/// 405 for the sale route with a method it does not take; `allow` lists the ones it does.
pub fn method_not_allowed(methods: &[String]) -> LocalReply {
    let outcome = GateOutcome::MethodNotAllowed;
    let allow = methods.join(", ");
    let message = format!("the sale route takes {allow} only");
    let mut reply = LocalReply::new(outcome, 405, error_body(outcome, &message), None);
    reply.headers.push(("allow", Cow::Owned(allow)));
    reply
}

/// 400 for a path that is not the sale route but would reach the same handler at many shops
/// (another case, a trailing slash, `;` parameters, percent-encoding, dot segments): it
/// must not reach the shop ungated, and the gate does not guess which goods it meant.
pub fn not_the_sale_path(template: &str) -> LocalReply {
    bad_request(&format!(
        "the path resembles the sale route but is not it; send exactly {template}"
    ))
}

/// 404 from this worker's memory of an `unknown_goods` answer, without asking again.
pub fn unknown_goods_cached(goods_id: &str) -> LocalReply {
    decided(goods_id, &DeductReply::new(Outcome::UnknownGoods, None))
}

/// 409 from the local sold-out cache, without asking the stock service.
pub fn sold_out_cached(goods_id: &str) -> LocalReply {
    // The shape of `OutcomeBody` for a sold-out with nothing left, written directly: this is
    // the hot path of a sold-out goods.
    const HEAD: &str = r#"{"outcome":"sold_out","goods_id":"#;
    const TAIL: &str = r#","message":"sorry, this item is sold out","remaining":0}"#;
    let mut body = String::with_capacity(HEAD.len() + goods_id.len() + 2 + TAIL.len());
    body.push_str(HEAD);
    push_json_str(&mut body, goods_id);
    body.push_str(TAIL);
    LocalReply::new(
        GateOutcome::Decided(Outcome::SoldOut),
        Outcome::SoldOut.http_status(),
        body,
        None,
    )
}

fn human_message(reply: &DeductReply) -> String {
    match reply.outcome {
        Outcome::Won => "you got it".to_string(),
        Outcome::SoldOut => match reply.remaining {
            Some(remaining) if remaining > 0 => {
                format!("only {remaining} left, fewer than the quantity you asked for")
            }
            _ => "sorry, this item is sold out".to_string(),
        },
        Outcome::LimitReached => {
            "this purchase would take you past the per-buyer limit for this item".to_string()
        }
        Outcome::Duplicate => "you already hold as many of this item as one buyer may".to_string(),
        Outcome::NotStarted => match reply.retry_after_ms {
            Some(ms) => format!("the sale has not started yet; it opens in {ms} ms"),
            None => "the sale has not started yet".to_string(),
        },
        Outcome::Ended => "the sale has ended".to_string(),
        Outcome::Paused => match reply.retry_after_ms {
            Some(ms) => format!("the sale is paused; try again in {ms} ms"),
            None => "the sale is paused; try again later".to_string(),
        },
        Outcome::UnknownGoods => "there is no sale for this item".to_string(),
        Outcome::RequestIdConflict => {
            "this request id was already used for a different purchase".to_string()
        }
        Outcome::Released => match reply.reason.as_deref() {
            Some(reason) => format!(
                "the order this request id won was released ({reason}); it is no longer valid. A new purchase needs a new request id"
            ),
            None => "the order this request id won was released; it is no longer valid. A new purchase needs a new request id".to_string(),
        },
        Outcome::FleetRateLimited => match reply.retry_after_ms {
            Some(ms) => format!(
                "too many purchase attempts for this goods across the gates right now; retry after {ms} ms"
            ),
            None => "too many purchase attempts for this goods across the gates right now".to_string(),
        },
        Outcome::Confirmed => {
            "the order this request id won is already paid; this purchase is complete"
                .to_string()
        }
    }
}

/// The local reply for an outcome the stock service decided against the buyer.
fn decided(goods_id: &str, reply: &DeductReply) -> LocalReply {
    let retry_after_ms = match reply.outcome {
        Outcome::NotStarted | Outcome::Paused | Outcome::FleetRateLimited => reply.retry_after_ms,
        _ => None,
    };
    let names_order = matches!(reply.outcome, Outcome::Released | Outcome::Confirmed);
    let body = OutcomeBody {
        outcome: reply.outcome,
        goods_id,
        message: human_message(reply),
        order_id: reply.order_id.as_deref().filter(|_| names_order),
        reason: reply
            .reason
            .as_deref()
            .filter(|_| reply.outcome == Outcome::Released),
        remaining: reply.remaining,
        retry_after_ms,
    };
    LocalReply::new(
        GateOutcome::Decided(reply.outcome),
        reply.outcome.http_status(),
        to_json(&body),
        retry_after_ms,
    )
}

/// Why the deduct call gave no usable answer. Logged (never shown to the buyer).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CalloutFailure {
    /// `dispatch_http_call` refused for a reason other than the cluster (or the request
    /// could not be written).
    Dispatch(String),
    /// `dispatch_http_call` refused because this Envoy has no cluster named `deduct.cluster`
    /// (a typo, or a cluster not delivered yet): no call was made, nothing was decided. The
    /// host's status is kept for the log.
    NoSuchCluster(String),
    /// No response headers at all (Envoy usually synthesises a 503/504 instead).
    NoResponse,
    /// The response had a status other than 200 (or none readable).
    Status(String),
    /// The body was larger than [`BATCH_REPLY_BYTES_MAX`].
    TooLarge(usize),
    /// The body was not a `DeductReply`.
    BadBody(String),
    /// `won` without a usable order id: forwarding it would break "every forwarded request
    /// carries a real order id".
    BadOrderId,
    /// `won` with a pass that cannot travel in a header (too long, or not printable ASCII).
    BadPass,
    /// A batch reply with a different number of answers than attempts sent: none of them
    /// can be matched to its buyer with confidence.
    Miscounted { sent: usize, answered: usize },
    /// The syncer refused this attempt on its own (its error and message).
    Refused(String),
    /// This worker already has the most requests waiting for a decision it may hold.
    Overloaded,
    /// Waited this many ms without a deduct call slot (earlier calls did not come back).
    Waited(u64),
}

impl fmt::Display for CalloutFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CalloutFailure::Dispatch(why) => write!(f, "could not be dispatched ({why})"),
            CalloutFailure::NoSuchCluster(status) => write!(
                f,
                "could not be dispatched: this Envoy has no cluster of that name ({status})"
            ),
            CalloutFailure::NoResponse => {
                write!(f, "got no response (timeout, connection refused or reset)")
            }
            // Envoy answers a deduct call itself when it times out (504) or cannot connect
            // (503); say so, since those are the usual cases.
            CalloutFailure::Status(status) => match status.as_str() {
                "504" => write!(f, "answered with status 504 (Envoy's answer to a timeout)"),
                "503" => write!(
                    f,
                    "answered with status 503 (Envoy's answer when it cannot connect)"
                ),
                _ => write!(f, "answered with status {status}"),
            },
            CalloutFailure::TooLarge(size) => write!(
                f,
                "answered with a {size}-byte body (more than {BATCH_REPLY_BYTES_MAX})"
            ),
            CalloutFailure::BadBody(why) => write!(f, "answered with an unreadable body: {why}"),
            CalloutFailure::BadOrderId => {
                write!(f, "answered won without a usable order id")
            }
            CalloutFailure::BadPass => {
                write!(f, "answered won with a pass that cannot be forwarded")
            }
            CalloutFailure::Miscounted { sent, answered } => write!(
                f,
                "answered {answered} attempts of a batch of {sent}; none can be trusted"
            ),
            CalloutFailure::Refused(why) => write!(f, "refused this attempt: {why}"),
            CalloutFailure::Overloaded => write!(
                f,
                "was not made: {} requests already wait on this worker",
                crate::batch::WAITING_MAX
            ),
            CalloutFailure::Waited(ms) => {
                write!(
                    f,
                    "was not made: waited {ms} ms for earlier calls to return"
                )
            }
        }
    }
}

/// A winner to forward to the shop API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Winner {
    pub order_id: String,
    pub remaining: Option<u64>,
    /// The syncer's signed pass for the shop (absent only from a syncer older than the pass:
    /// the winner is forwarded without one, and a shop that checks passes refuses it).
    pub pass: Option<String>,
}

/// What an answer teaches the worker about the goods.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Remember {
    Nothing,
    /// Sold out (or its sale ended): cache it for every worker.
    SoldOut,
    /// The stock service sells no such goods: cache it in this worker.
    UnknownGoods,
}

/// What to do with a sale request once the stock service answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Forward(Winner),
    Answer {
        reply: LocalReply,
        remember: Remember,
    },
}

impl Verdict {
    /// Whether the answer shows the stock service sells this goods (anything but
    /// `unknown_goods`).
    pub fn confirms_goods(&self) -> bool {
        match self {
            Verdict::Forward(_) => true,
            Verdict::Answer { remember, .. } => *remember != Remember::UnknownGoods,
        }
    }
}

/// Reads a batch deduct call's response: a 200 whose body is a `DeductBatchReply` with exactly
/// `sent` answers, in the order the attempts were sent.
pub fn read_batch_response(
    status: Option<&[u8]>,
    body: Option<&[u8]>,
    sent: usize,
) -> Result<Vec<BatchItem>, CalloutFailure> {
    let status = status.map(String::from_utf8_lossy);
    match status.as_deref() {
        Some("200") => {}
        Some(other) => return Err(CalloutFailure::Status(printable(other))),
        None => return Err(CalloutFailure::Status("(missing)".to_string())),
    }
    let body = body.unwrap_or_default();
    if body.len() > BATCH_REPLY_BYTES_MAX {
        return Err(CalloutFailure::TooLarge(body.len()));
    }
    // serde's words quote the body (a string where a list belongs, verbatim): bounded, since
    // they go to the log.
    let reply: DeductBatchReply = serde_json::from_slice(body).map_err(|e| {
        CalloutFailure::BadBody(seckill_api::log_safe(&e.to_string(), BAD_BODY_WORDS_MAX))
    })?;
    if reply.replies.len() != sent {
        return Err(CalloutFailure::Miscounted {
            sent,
            answered: reply.replies.len(),
        });
    }
    Ok(reply.replies)
}

/// What to do with one buyer's answer inside a batch reply.
pub fn item_verdict(purchase: &Purchase, item: BatchItem) -> Result<Verdict, CalloutFailure> {
    match item {
        BatchItem::Decided(reply) => verdict(purchase, reply),
        BatchItem::Refused(refusal) => Err(CalloutFailure::Refused(format!(
            "{}: {}",
            printable(&refusal.error),
            refusal
                .message
                .chars()
                .take(200)
                .map(|c| if c.is_ascii_graphic() || c == ' ' {
                    c
                } else {
                    '?'
                })
                .collect::<String>()
        ))),
    }
}

/// Keeps a host-supplied value safe for a log line.
fn printable(text: &str) -> String {
    text.chars()
        .take(32)
        .map(|c| if c.is_ascii_graphic() { c } else { '?' })
        .collect()
}

/// Decides what to do with the stock service's answer for this purchase.
pub fn verdict(purchase: &Purchase, reply: DeductReply) -> Result<Verdict, CalloutFailure> {
    if reply.outcome == Outcome::Won {
        // The order id goes into a header the shop API trusts: it must be present and
        // header-safe.
        let order_id = reply.order_id.ok_or(CalloutFailure::BadOrderId)?;
        let usable = !order_id.is_empty()
            && order_id.len() <= ORDER_ID_LEN_MAX
            && order_id.bytes().all(|b| b.is_ascii_graphic());
        if !usable {
            return Err(CalloutFailure::BadOrderId);
        }
        // The pass goes into a header too; the shop checks what it says.
        let pass_usable = |pass: &String| {
            !pass.is_empty()
                && pass.len() <= seckill_api::PASS_LEN_MAX
                && pass.bytes().all(|b| b.is_ascii_graphic())
        };
        if reply.pass.as_ref().is_some_and(|pass| !pass_usable(pass)) {
            return Err(CalloutFailure::BadPass);
        }
        return Ok(Verdict::Forward(Winner {
            order_id,
            remaining: reply.remaining,
            pass: reply.pass,
        }));
    }
    let remember = match reply.outcome {
        // Sold out for this quantity but units left: a smaller order may still win.
        Outcome::SoldOut if reply.remaining == Some(0) => Remember::SoldOut,
        Outcome::Ended => Remember::SoldOut,
        Outcome::UnknownGoods => Remember::UnknownGoods,
        _ => Remember::Nothing,
    };
    Ok(Verdict::Answer {
        reply: decided(purchase.goods_id(), &reply),
        remember,
    })
}

/// Request headers the shop API gets with a winner: the order id, the validated inputs and
/// the signed pass that vouches for them.
pub fn winner_request_headers(purchase: &Purchase, winner: &Winner) -> Vec<(&'static str, String)> {
    let mut headers = vec![(seckill_api::ORDER_ID_HEADER, winner.order_id.clone())];
    if let Some(pass) = &winner.pass {
        headers.push((seckill_api::PASS_HEADER, pass.clone()));
    }
    if let Some(remaining) = winner.remaining {
        headers.push((seckill_api::REMAINING_HEADER, remaining.to_string()));
    }
    headers.extend([
        (
            seckill_api::GOODS_ID_HEADER,
            purchase.goods_id().to_string(),
        ),
        (seckill_api::USER_ID_HEADER, purchase.user_id().to_string()),
        (
            seckill_api::QUANTITY_HEADER,
            purchase.quantity().to_string(),
        ),
    ]);
    headers
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::input::sale_for_test;
    use serde_json::{json, Value};

    fn purchase() -> Purchase {
        let config = json!({
            "route": {"path_template": "/seckill/{goods_id}/buy"},
            "goods_id": {"path": "goods_id"},
            "user_id": {"header": "x-user-id"},
            "quantity": {"source": {"query": "qty"}, "max": 5},
            "deduct": {"cluster": "c", "secret_env": "SECKILL_TEST_EDGE_SECRET"},
            "rate_limit": {"default": {"per_second": 10, "burst": 1}}
        });
        let headers = [
            (":method", "POST"),
            (":path", "/seckill/sku-1/buy?qty=2"),
            ("x-user-id", "u-1"),
            ("x-request-id", "r-1"),
        ];
        sale_for_test(&config, &headers)
    }

    fn reply(outcome: Outcome) -> DeductReply {
        DeductReply::new(outcome, None)
    }

    #[test]
    fn the_native_sold_out_route_answers_as_the_cache_does() {
        for goods in ["sku-1", "a.b:c_d-9"] {
            let cached = sold_out_cached(goods);
            assert_eq!(cached.body, seckill_api::fast_path::sold_out_body(goods));
            assert_eq!(cached.status, 409);
            assert_eq!(header(&cached, OUTCOME_HEADER), Some("sold_out"));
        }
    }

    #[test]
    fn only_an_answer_naming_a_request_id_to_retry_with_sets_the_retry_cookie() {
        let cookie = Some(seckill_api::fast_path::RETRY_COOKIE_SET);
        assert_eq!(header(&unavailable(Some("r-1")), "set-cookie"), cookie);
        assert_eq!(header(&unavailable(None), "set-cookie"), None);
        let failure = CalloutFailure::Dispatch("x".into());
        assert_eq!(
            header(&unavailable_after(&failure, "r-1"), "set-cookie"),
            cookie
        );
        assert_eq!(header(&sold_out_cached("g"), "set-cookie"), None);
    }

    fn body(reply: &LocalReply) -> Value {
        serde_json::from_str(&reply.body).unwrap()
    }

    fn header<'a>(reply: &'a LocalReply, name: &str) -> Option<&'a str> {
        reply
            .headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_ref())
    }

    fn answer(verdict: Result<Verdict, CalloutFailure>) -> (LocalReply, bool) {
        match verdict {
            Ok(Verdict::Answer { reply, remember }) => (reply, remember == Remember::SoldOut),
            other => panic!("expected a local answer, got {other:?}"),
        }
    }

    #[test]
    fn outcome_names_are_unique_and_match_the_api() {
        let names: Vec<&str> = GateOutcome::ALL.iter().map(|o| o.as_str()).collect();
        assert_eq!(
            names,
            [
                "won",
                "sold_out",
                "limit_reached",
                "duplicate",
                "not_started",
                "ended",
                "paused",
                "unknown_goods",
                "request_id_conflict",
                "released",
                "confirmed",
                "fleet_rate_limited",
                "rate_limited",
                "bad_request",
                "method_not_allowed",
                "unavailable",
                "failed_open"
            ]
        );
        for (i, outcome) in GateOutcome::ALL.iter().enumerate() {
            assert_eq!(outcome.index(), i);
        }
        assert_eq!(
            GateOutcome::RateLimited.stat_name(),
            "seckill.outcome.rate_limited"
        );
        assert_eq!(
            GateOutcome::RateLimited.shadow_stat_name(),
            "seckill.shadow.rate_limited"
        );
    }

    #[test]
    fn every_local_reply_has_the_gate_headers() {
        let p = purchase();
        let mut replies = vec![
            bad_request("user id (header x-user-id) is missing"),
            rate_limited(1),
            unavailable(None),
            unavailable(Some("r-1")),
            misconfigured("r-1"),
            sold_out_cached("sku-1"),
            unknown_goods_cached("sku-1"),
            method_not_allowed(&["POST".to_string()]),
            not_the_sale_path("/seckill/{goods_id}/buy"),
        ];
        for outcome in Outcome::ALL.into_iter().filter(|o| *o != Outcome::Won) {
            replies.push(answer(verdict(&p, reply(outcome))).0);
        }
        for r in &replies {
            assert_eq!(header(r, "content-type"), Some("application/json"));
            assert_eq!(header(r, "cache-control"), Some("no-store"));
            assert_eq!(header(r, OUTCOME_HEADER), Some(r.outcome.as_str()));
            // Bodies are JSON objects.
            assert!(body(r).is_object(), "{}", r.body);
        }
    }

    #[test]
    fn hand_written_bodies_match_serde() {
        for goods_id in [
            "sku-1",
            "",
            "a\"b\\c/d",
            "tab\tnl\ncr\r\u{8}\u{c}\u{0}\u{1f}\u{7f}",
            "caf\u{e9} \u{1f600}",
        ] {
            let serde_body = to_json(&OutcomeBody {
                outcome: Outcome::SoldOut,
                goods_id,
                message: "sorry, this item is sold out".to_string(),
                order_id: None,
                reason: None,
                remaining: Some(0),
                retry_after_ms: None,
            });
            let r = sold_out_cached(goods_id);
            assert_eq!(r.body, serde_body, "{goods_id:?}");
            assert_eq!(body(&r)["goods_id"], goods_id);
        }
        for retry_after_ns in [0, 1, 999_999, 1_000_001, 1_500_000_000, u64::MAX] {
            let retry_after_ms = gcra::retry_after_ms(retry_after_ns).max(1);
            let serde_body = to_json(&RetryErrorBody {
                error: ErrorReply {
                    error: "rate_limited".to_string(),
                    message: format!(
                        "too many purchase attempts for this goods right now; retry after {retry_after_ms} ms"
                    ),
                },
                retry_after_ms,
            });
            assert_eq!(rate_limited(retry_after_ns).body, serde_body);
        }
    }

    #[test]
    fn error_replies() {
        let r = bad_request("quantity (query parameter qty) must be at most 5");
        assert_eq!(r.status, 400);
        assert_eq!(
            body(&r),
            json!({"error": "bad_request", "message": "quantity (query parameter qty) must be at most 5"})
        );
        let r = unavailable(None);
        assert_eq!(r.status, 503);
        assert_eq!(
            body(&r),
            json!({"error": "unavailable", "message": "the stock service did not answer in time; try again"})
        );
        assert_eq!(header(&r, "retry-after"), Some("1"));
        // With the buyer's request id, the answer says to retry with it.
        let r = unavailable(Some("r-9"));
        assert_eq!(r.status, 503);
        assert_eq!(body(&r)["request_id"], "r-9");
        assert!(body(&r)["message"]
            .as_str()
            .unwrap()
            .contains("same request id"));
        // No such cluster: the site's fault, said plainly, with a longer wait; any other
        // failure is the usual 503.
        let failure = CalloutFailure::NoSuchCluster("BadArgument".into());
        let r = unavailable_after(&failure, "r-9");
        assert_eq!((r.status, r.outcome), (503, GateOutcome::Unavailable));
        assert_eq!(body(&r)["error"], "unavailable");
        assert_eq!(body(&r)["request_id"], "r-9");
        let message = body(&r)["message"].as_str().unwrap().to_owned();
        assert!(message.contains("misconfigured"), "{message}");
        assert!(message.contains("nothing was reserved"), "{message}");
        assert!(!message.contains("BadArgument"), "no internals for buyers");
        assert_eq!(header(&r, "retry-after"), Some("10"));
        let r = unavailable_after(&CalloutFailure::NoResponse, "r-9");
        assert_eq!(r, unavailable(Some("r-9")));
        let r = method_not_allowed(&["POST".to_string(), "PUT".to_string()]);
        assert_eq!(r.status, 405);
        assert_eq!(header(&r, "allow"), Some("POST, PUT"));
        assert_eq!(body(&r)["error"], "method_not_allowed");
        let r = not_the_sale_path("/seckill/{goods_id}/buy");
        assert_eq!((r.status, r.outcome), (400, GateOutcome::BadRequest));
        assert!(body(&r)["message"]
            .as_str()
            .unwrap()
            .contains("/seckill/{goods_id}/buy"));
        let r = rate_limited(1_500_000_000);
        assert_eq!(r.status, 429);
        assert_eq!(header(&r, "retry-after"), Some("2"));
        assert_eq!(body(&r)["error"], "rate_limited");
        assert_eq!(body(&r)["retry_after_ms"], 1500);
        let r = rate_limited(1);
        assert_eq!(header(&r, "retry-after"), Some("1"));
        assert_eq!(body(&r)["retry_after_ms"], 1);
        let r = rate_limited(0);
        assert_eq!(body(&r)["retry_after_ms"], 1);
    }

    #[test]
    fn decided_outcomes_map_to_status_and_body() {
        let p = purchase();
        let expected = [
            (Outcome::SoldOut, 409),
            (Outcome::LimitReached, 409),
            (Outcome::Duplicate, 409),
            (Outcome::RequestIdConflict, 409),
            (Outcome::Released, 409),
            (Outcome::Confirmed, 409),
            (Outcome::NotStarted, 403),
            (Outcome::Ended, 403),
            (Outcome::Paused, 403),
            (Outcome::UnknownGoods, 404),
            (Outcome::FleetRateLimited, 429),
        ];
        for (outcome, status) in expected {
            let (r, _) = answer(verdict(&p, reply(outcome)));
            assert_eq!(r.status, status, "{outcome:?}");
            assert_eq!(r.outcome, GateOutcome::Decided(outcome));
            let b = body(&r);
            assert_eq!(b["outcome"], outcome.as_str());
            assert_eq!(b["goods_id"], "sku-1");
            assert!(b["message"].as_str().is_some_and(|m| !m.is_empty()));
            assert!(b.get("remaining").is_none());
        }
    }

    #[test]
    fn the_fleet_rate_says_when_to_come_back() {
        let p = purchase();
        let mut limited = reply(Outcome::FleetRateLimited);
        limited.retry_after_ms = Some(1_200);
        let (r, cached) = answer(verdict(&p, limited));
        assert_eq!(r.status, 429);
        assert!(!cached, "a rate is not a sold-out");
        assert_eq!(header(&r, "retry-after"), Some("2"));
        assert_eq!(body(&r)["retry_after_ms"], 1200);
    }

    #[test]
    fn a_pause_says_when_to_come_back_and_is_not_a_sold_out() {
        let p = purchase();
        let mut paused = reply(Outcome::Paused);
        paused.retry_after_ms = Some(7_000);
        // Even with nothing left: a paused goods may be restocked and resumed.
        paused.remaining = Some(0);
        let (r, cached) = answer(verdict(&p, paused));
        assert!(!cached, "a pause is not a sold-out");
        assert_eq!(r.status, 403);
        assert_eq!(header(&r, "retry-after"), Some("7"));
        assert_eq!(header(&r, OUTCOME_HEADER), Some("paused"));
        let b = body(&r);
        assert_eq!(
            (b["outcome"].clone(), b["retry_after_ms"].clone()),
            (json!("paused"), json!(7000))
        );
        assert!(b["message"].as_str().unwrap().contains("paused"));
    }

    #[test]
    fn sold_out_cache_rules() {
        let p = purchase();
        let mut sold_out = reply(Outcome::SoldOut);
        sold_out.remaining = Some(0);
        let (r, cache) = answer(verdict(&p, sold_out));
        assert!(cache);
        assert_eq!(
            body(&r),
            json!({"outcome": "sold_out", "goods_id": "sku-1",
                   "message": "sorry, this item is sold out", "remaining": 0})
        );
        // Some left, just not enough for this quantity: do not cache.
        let mut partly = reply(Outcome::SoldOut);
        partly.remaining = Some(1);
        let (r, cache) = answer(verdict(&p, partly));
        assert!(!cache);
        assert_eq!(body(&r)["remaining"], 1);
        assert!(body(&r)["message"]
            .as_str()
            .unwrap()
            .contains("only 1 left"));
        // Remaining unknown: do not cache.
        assert!(!answer(verdict(&p, reply(Outcome::SoldOut))).1);
        assert!(answer(verdict(&p, reply(Outcome::Ended))).1);
        for outcome in [
            Outcome::LimitReached,
            Outcome::Duplicate,
            Outcome::NotStarted,
            Outcome::Paused,
            Outcome::UnknownGoods,
            Outcome::RequestIdConflict,
            Outcome::Released,
            Outcome::Confirmed,
        ] {
            assert!(!answer(verdict(&p, reply(outcome))).1, "{outcome:?}");
        }
        // Unknown goods are remembered by the worker, and are the one answer that does not
        // confirm the goods exists.
        let unknown = verdict(&p, reply(Outcome::UnknownGoods)).unwrap();
        assert!(matches!(
            unknown,
            Verdict::Answer {
                remember: Remember::UnknownGoods,
                ..
            }
        ));
        assert!(!unknown.confirms_goods());
        for outcome in Outcome::ALL
            .into_iter()
            .filter(|o| !matches!(o, Outcome::UnknownGoods | Outcome::Won))
        {
            assert!(verdict(&p, reply(outcome)).unwrap().confirms_goods());
        }
        let cached = unknown_goods_cached("sku-1");
        assert_eq!(
            (cached.status, body(&cached)["outcome"].clone()),
            (404, json!("unknown_goods"))
        );
        let cached = sold_out_cached("sku-1");
        assert_eq!(cached.status, 409);
        assert_eq!(body(&cached)["outcome"], "sold_out");
        assert_eq!(header(&cached, OUTCOME_HEADER), Some("sold_out"));
    }

    #[test]
    fn a_dead_order_is_named_with_its_reason() {
        let p = purchase();
        let released = DeductReply {
            order_id: Some("sku-1.1.4".into()),
            reason: Some("cancelled".into()),
            ..reply(Outcome::Released)
        };
        let (r, _) = answer(verdict(&p, released));
        assert_eq!(r.status, 409);
        let b = body(&r);
        assert_eq!(
            (
                b["outcome"].clone(),
                b["order_id"].clone(),
                b["reason"].clone()
            ),
            (json!("released"), json!("sku-1.1.4"), json!("cancelled"))
        );
        assert!(b["message"].as_str().unwrap().contains("new request id"));
        let paid = DeductReply {
            order_id: Some("sku-1.1.5".into()),
            ..reply(Outcome::Confirmed)
        };
        let b = body(&answer(verdict(&p, paid)).0);
        assert_eq!(
            (b["outcome"].clone(), b["order_id"].clone()),
            (json!("confirmed"), json!("sku-1.1.5"))
        );
        assert!(b.get("reason").is_none());
        // No other outcome shows an order id.
        let odd = DeductReply {
            order_id: Some("sku-1.1.6".into()),
            ..reply(Outcome::SoldOut)
        };
        assert!(body(&answer(verdict(&p, odd)).0).get("order_id").is_none());
    }

    #[test]
    fn not_started_carries_retry_after() {
        let p = purchase();
        let mut not_started = reply(Outcome::NotStarted);
        not_started.retry_after_ms = Some(2_500);
        let (r, _) = answer(verdict(&p, not_started));
        assert_eq!(r.status, 403);
        assert_eq!(header(&r, "retry-after"), Some("3"));
        assert_eq!(body(&r)["retry_after_ms"], 2500);
        // Without a hint, neither header nor field.
        let (r, _) = answer(verdict(&p, reply(Outcome::NotStarted)));
        assert_eq!(header(&r, "retry-after"), None);
        assert!(body(&r).get("retry_after_ms").is_none());
        // A hint on another outcome is ignored.
        let mut ended = reply(Outcome::Ended);
        ended.retry_after_ms = Some(5);
        let (r, _) = answer(verdict(&p, ended));
        assert_eq!(header(&r, "retry-after"), None);
    }

    #[test]
    fn winners_are_forwarded_with_their_headers() {
        let p = purchase();
        let mut won = reply(Outcome::Won);
        won.order_id = Some("o-42".into());
        won.remaining = Some(7);
        won.pass = Some("eyJh.eyJv.c2ln".into());
        let Ok(Verdict::Forward(winner)) = verdict(&p, won.clone()) else {
            panic!("expected a winner");
        };
        assert_eq!(
            winner_request_headers(&p, &winner),
            vec![
                ("x-seckill-order-id", "o-42".to_string()),
                ("x-seckill-pass", "eyJh.eyJv.c2ln".to_string()),
                ("x-seckill-remaining", "7".to_string()),
                ("x-seckill-goods-id", "sku-1".to_string()),
                ("x-seckill-user-id", "u-1".to_string()),
                ("x-seckill-quantity", "2".to_string()),
            ]
        );
        // A syncer older than the pass: forwarded without one.
        won.pass = None;
        let Ok(Verdict::Forward(winner)) = verdict(&p, won.clone()) else {
            panic!("expected a winner");
        };
        let names: Vec<_> = winner_request_headers(&p, &winner)
            .into_iter()
            .map(|(name, _)| name)
            .collect();
        assert!(!names.contains(&seckill_api::PASS_HEADER), "{names:?}");
        // A pass that cannot be a header value: nothing is forwarded on it.
        for bad_pass in [
            String::new(),
            "a.b c".into(),
            "a.b\nc".into(),
            "é".into(),
            "x".repeat(seckill_api::PASS_LEN_MAX + 1),
        ] {
            won.pass = Some(bad_pass);
            assert_eq!(verdict(&p, won.clone()), Err(CalloutFailure::BadPass));
        }
        for bad_id in [
            None,
            Some(String::new()),
            Some("o 1".into()),
            Some("o\n1".into()),
            Some("x".repeat(129)),
        ] {
            let mut won = reply(Outcome::Won);
            won.order_id = bad_id;
            assert_eq!(verdict(&p, won), Err(CalloutFailure::BadOrderId));
        }
    }

    #[test]
    fn batch_responses_are_read_strictly() {
        let ok = br#"{"replies":[{"outcome":"won","order_id":"o-1","remaining":3},{"error":"bad_request","message":"quantity must be from 1 to 1000"}]}"#;
        let items = read_batch_response(Some(b"200"), Some(ok), 2).unwrap();
        assert_eq!(
            item_verdict(&purchase(), items[0].clone()),
            Ok(Verdict::Forward(Winner {
                order_id: "o-1".into(),
                remaining: Some(3),
                pass: None,
            }))
        );
        assert_eq!(
            item_verdict(&purchase(), items[1].clone()),
            Err(CalloutFailure::Refused(
                "bad_request: quantity must be from 1 to 1000".into()
            ))
        );
        // Fields the syncer may add later are tolerated.
        let extra = br#"{"replies":[{"outcome":"sold_out","remaining":0,"shard":3}],"took_ms":1}"#;
        assert!(matches!(
            &read_batch_response(Some(b"200"), Some(extra), 1).unwrap()[0],
            BatchItem::Decided(r) if r.outcome == Outcome::SoldOut
        ));
        // One answer too few or too many: nobody's answer can be trusted.
        assert_eq!(
            read_batch_response(Some(b"200"), Some(ok), 3),
            Err(CalloutFailure::Miscounted {
                sent: 3,
                answered: 2
            })
        );
        assert_eq!(
            read_batch_response(Some(b"500"), Some(ok), 2),
            Err(CalloutFailure::Status("500".into()))
        );
        assert_eq!(
            read_batch_response(None, Some(ok), 2),
            Err(CalloutFailure::Status("(missing)".into()))
        );
        for bad in [
            &b""[..],
            b"{\"replies\":[{\"outcome\":\"winner\"}]}",
            b"<html>",
            b"{\"outcome\":\"won\",\"order_id\":\"o\"}",
        ] {
            assert!(
                matches!(
                    read_batch_response(Some(b"200"), Some(bad), 1),
                    Err(CalloutFailure::BadBody(_))
                ),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        let big = vec![b' '; BATCH_REPLY_BYTES_MAX + 1];
        assert_eq!(
            read_batch_response(Some(b"200"), Some(&big), 1),
            Err(CalloutFailure::TooLarge(BATCH_REPLY_BYTES_MAX + 1))
        );
        assert_eq!(
            read_batch_response(Some(b"2\n0"), None, 1),
            Err(CalloutFailure::Status("2?0".into()))
        );
        // Found by the fuzz target's log check (`fuzz/fuzz_targets/deduct_reply.rs`, seed
        // `batch_long_string.json`): serde quoted a string where the list belongs whole, so a
        // body of up to BATCH_REPLY_BYTES_MAX made a log line as long.
        let long = format!(r#"{{"replies":"{}"}}"#, "x".repeat(100_000));
        let Err(failure) = read_batch_response(Some(b"200"), Some(long.as_bytes()), 1) else {
            panic!("not a batch reply");
        };
        let logged = failure.to_string();
        assert!(logged.len() <= 300, "a {}-byte log sentence", logged.len());
        assert!(logged.contains("invalid type: string"), "{logged}");
        // Every failure has a log sentence.
        assert!(CalloutFailure::NoResponse
            .to_string()
            .contains("no response"));
        assert!(CalloutFailure::Waited(1500).to_string().contains("1500 ms"));
    }
}
