//! Wire types of the deduct call, shared by the filter (wasm) and the syncer so the two
//! cannot drift apart. Kept dependency-light (serde only) because it compiles into the filter.

use serde::{Deserialize, Serialize};

pub mod fast_path;

/// Path of the syncer's deduct endpoint.
pub const DEDUCT_PATH: &str = "/v1/deduct";
/// Path of the batch form of the deduct endpoint: several attempts in one call, decided in
/// order, one reply each. The filter uses it so that one callout serves many buyers.
pub const DEDUCT_BATCH_PATH: &str = "/v1/deduct/batch";
/// Most attempts one batch call may carry (both sides enforce it).
pub const BATCH_ATTEMPTS_MAX: usize = 128;
/// Path where the gate claims the reservations it delivered (see [`ClaimRequest`]).
pub const CLAIM_PATH: &str = "/v1/claims";
/// Most order ids one claim call may carry (both sides enforce it).
pub const CLAIMS_PER_CALL_MAX: usize = 1_024;
/// Longest wait for a decision a caller may announce in `timeout_ms`.
pub const DEDUCT_TIMEOUT_MS_MAX: u64 = 10_000;
/// Header carrying the caller's role credential on every internal call (the gate's, the
/// shop's, the operators'): see the syncer's `credentials.rs`.
pub const SECRET_HEADER: &str = "x-seckill-secret";
/// Prefix of every header the gate sets; clients may never supply one (promise 5).
pub const GATE_HEADER_PREFIX: &str = "x-seckill-";
/// Header the gate sets on a forwarded winner.
pub const ORDER_ID_HEADER: &str = "x-seckill-order-id";
/// Header the gate sets on a forwarded winner: units left after this sale.
pub const REMAINING_HEADER: &str = "x-seckill-remaining";
/// Headers the gate sets on a forwarded winner so the shop API sees the validated values.
pub const GOODS_ID_HEADER: &str = "x-seckill-goods-id";
pub const USER_ID_HEADER: &str = "x-seckill-user-id";
pub const QUANTITY_HEADER: &str = "x-seckill-quantity";
/// Header the gate sets on a forwarded winner: the signed pass (a compact HS256 JWT, see the
/// `seckill-pass` crate) the shop verifies to know the request really won at the gate.
pub const PASS_HEADER: &str = "x-seckill-pass";
/// Longest pass anyone forwards or reads: one with the longest ids is well under 1 KiB.
pub const PASS_LEN_MAX: usize = 4_096;
/// Header the gate sets when it forwarded a request without a decision (failure mode `open`).
pub const GATE_STATUS_HEADER: &str = "x-seckill-gate";
/// Header the gate sets on every sale request it forwards in shadow mode (a dry run): what it
/// would have answered (an outcome name: `won`, `sold_out`, ..., `rate_limited`,
/// `bad_request`, ...). Such a request passed no gate: it carries no order id.
pub const SHADOW_HEADER: &str = "x-seckill-shadow";

/// Longest goods id, user id or request id anyone accepts. Bounds Redis key and field sizes.
pub const ID_LEN_MAX: usize = 128;
/// Largest quantity one request may ask for, whatever the plugin configuration says.
pub const QUANTITY_MAX: u32 = 1_000;

/// One purchase attempt, as the filter sends it to the syncer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeductRequest {
    pub goods_id: String,
    pub user_id: String,
    pub quantity: u32,
    /// Idempotency key: a retry with the same id gets the same answer and deducts once.
    pub request_id: String,
}

/// The one reply shape of the deduct endpoint for every decided outcome (HTTP 200).
/// Faults (bad secret, bad input, Redis down) use [`ErrorReply`] with a non-200 status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeductReply {
    pub outcome: Outcome,
    /// Present exactly when `outcome` is `won`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub order_id: Option<String>,
    /// Units still available for the goods after this decision (absent for unknown goods).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remaining: Option<u64>,
    /// For `not_started`: milliseconds until the sale opens; for `paused`: how long the
    /// operator expects the pause to last; for `fleet_rate_limited`: until a retry may pass.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_ms: Option<u64>,
    /// For `released`: why the order this request id made was released.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// For `won`: when the reservation ends unless the shop confirms it first (the end of its
    /// payment window), ms since the Unix epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at_ms: Option<u64>,
    /// For `won`: the signed pass the gate forwards to the shop in [`PASS_HEADER`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pass: Option<String>,
}

impl DeductReply {
    /// A reply with only an outcome and the units left.
    pub fn new(outcome: Outcome, remaining: Option<u64>) -> DeductReply {
        DeductReply {
            outcome,
            order_id: None,
            remaining,
            retry_after_ms: None,
            reason: None,
            expires_at_ms: None,
            pass: None,
        }
    }
}

/// Several purchase attempts in one call to [`DEDUCT_BATCH_PATH`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeductBatchRequest {
    pub attempts: Vec<DeductRequest>,
    /// How long the caller waits for this answer, in ms. The syncer decides nothing after
    /// that: an answer nobody waits for must not grant a unit (at most
    /// [`DEDUCT_TIMEOUT_MS_MAX`]; absent: the syncer's own bound).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
}

/// The gate tells the syncer which reservations it delivered (forwarded to the shop). A
/// reservation made through the batch endpoint that nobody claims within the syncer's claim
/// window was never delivered (the gate gave up waiting, or the buyer left) and is released
/// as `unclaimed`, long before its payment window ends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClaimRequest {
    /// 1 to [`CLAIMS_PER_CALL_MAX`] order ids.
    pub order_ids: Vec<String>,
}

/// The answer to a [`ClaimRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClaimReply {
    /// Reservations this call claimed (a repeated claim of a claimed one is not counted).
    pub claimed: u64,
    /// Order ids whose reservation had already ended (released, confirmed, or unknown).
    pub late: u64,
    /// Order ids that could not be claimed now (a store fault): the gate claims them again.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failed: Vec<String>,
}

/// The answer to a [`DeductBatchRequest`]: exactly one item per attempt, in the same order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeductBatchReply {
    pub replies: Vec<BatchItem>,
}

/// One attempt's answer inside a batch: decided like a single deduct, or refused on its own
/// (bad input, a store fault) without failing the other attempts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum BatchItem {
    Decided(DeductReply),
    Refused(ErrorReply),
}

/// Body of every error answer, from the syncer and from the filter alike.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorReply {
    pub error: String,
    pub message: String,
}

/// Every way a purchase attempt can end. The string forms are part of the public API:
/// they appear in response bodies, stats names and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// A unit was reserved; the request goes on to the shop API with its order id.
    Won,
    /// Not enough stock left for the requested quantity.
    SoldOut,
    /// The requested quantity would take the buyer past the per-user limit.
    LimitReached,
    /// The buyer already holds the whole per-user allowance for this goods.
    Duplicate,
    /// The sale window has not opened yet.
    NotStarted,
    /// The sale window has closed.
    Ended,
    /// The operator paused the sale: nothing is decided for now; retry after
    /// `retry_after_ms`. A moment's state, never a sold-out: the gate does not cache it.
    Paused,
    /// No sale is defined (or preheated) for this goods id.
    UnknownGoods,
    /// The request id was already used for a different purchase.
    RequestIdConflict,
    /// This request id won an order that has since been released (cancelled, expired): the
    /// order is dead and is never forwarded again. A new purchase needs a new request id.
    Released,
    /// This request id won an order that has since been paid: the purchase is complete.
    Confirmed,
    /// Over the goods' fleet-wide attempt rate (counted in Redis for every gate at once):
    /// nothing was decided; retry after `retry_after_ms`.
    FleetRateLimited,
}

impl Outcome {
    pub const ALL: [Outcome; 12] = [
        Outcome::Won,
        Outcome::SoldOut,
        Outcome::LimitReached,
        Outcome::Duplicate,
        Outcome::NotStarted,
        Outcome::Ended,
        Outcome::Paused,
        Outcome::UnknownGoods,
        Outcome::RequestIdConflict,
        Outcome::Released,
        Outcome::Confirmed,
        Outcome::FleetRateLimited,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Won => "won",
            Outcome::SoldOut => "sold_out",
            Outcome::LimitReached => "limit_reached",
            Outcome::Duplicate => "duplicate",
            Outcome::NotStarted => "not_started",
            Outcome::Ended => "ended",
            Outcome::Paused => "paused",
            Outcome::UnknownGoods => "unknown_goods",
            Outcome::RequestIdConflict => "request_id_conflict",
            Outcome::Released => "released",
            Outcome::Confirmed => "confirmed",
            Outcome::FleetRateLimited => "fleet_rate_limited",
        }
    }

    pub fn parse(text: &str) -> Option<Outcome> {
        Outcome::ALL.into_iter().find(|o| o.as_str() == text)
    }

    /// The HTTP status a buyer sees for this outcome when the gate answers it.
    pub fn http_status(self) -> u32 {
        match self {
            Outcome::Won => 200,
            Outcome::SoldOut | Outcome::LimitReached | Outcome::Duplicate => 409,
            Outcome::RequestIdConflict | Outcome::Released | Outcome::Confirmed => 409,
            // A pause is a sale not open right now, as one that has not started: 403 with
            // Retry-After (a 5xx would page whoever watches the gate's errors).
            Outcome::NotStarted | Outcome::Ended | Outcome::Paused => 403,
            Outcome::UnknownGoods => 404,
            Outcome::FleetRateLimited => 429,
        }
    }
}

/// Why an id was refused. Shared so the filter and the syncer give the same message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdError {
    Empty,
    TooLong { len_max: usize },
    BadCharacter,
}

impl std::fmt::Display for IdError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            IdError::Empty => write!(f, "is empty"),
            IdError::TooLong { len_max } => write!(f, "is longer than {len_max} bytes"),
            IdError::BadCharacter => write!(f, "may only contain A-Z a-z 0-9 _ - . :"),
        }
    }
}

/// Checks a goods, user or request id: non-empty, at most `len_max` bytes, and only
/// characters that are safe inside Redis keys, headers and log lines.
pub fn validate_id(id: &str, len_max: usize) -> Result<(), IdError> {
    if id.is_empty() {
        return Err(IdError::Empty);
    }
    if id.len() > len_max.min(ID_LEN_MAX) {
        return Err(IdError::TooLong {
            len_max: len_max.min(ID_LEN_MAX),
        });
    }
    let safe = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b':');
    if !id.bytes().all(safe) {
        return Err(IdError::BadCharacter);
    }
    Ok(())
}

/// What [`log_safe`] puts where it cut a text.
const CUT_MARK: &str = "...";

/// A text the other side controls (a peer's error message, a parser's words about bad input,
/// which quote the input) made fit for a log line, a Kafka header or an error body: every
/// control character escaped (a `\n` cannot start a forged line), and at most `bytes_max`
/// bytes (3 or more), cut at a character with `...` (so a huge input cannot make a huge line).
pub fn log_safe(text: &str, bytes_max: usize) -> String {
    let room = bytes_max.saturating_sub(CUT_MARK.len());
    let mut safe = String::with_capacity(text.len().min(bytes_max));
    // Where to cut should the whole not fit: after the last character (or escape) that
    // leaves room for the mark.
    let mut cut = 0;
    for c in text.chars() {
        if c.is_control() {
            safe.extend(c.escape_default());
        } else {
            safe.push(c);
        }
        if safe.len() <= room {
            cut = safe.len();
        }
        if safe.len() > bytes_max {
            safe.truncate(cut);
            safe.push_str(CUT_MARK);
            break;
        }
    }
    safe
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcome_strings_round_trip_and_match_serde() {
        for outcome in Outcome::ALL {
            assert_eq!(Outcome::parse(outcome.as_str()), Some(outcome));
            let json = serde_json::to_string(&outcome).unwrap();
            assert_eq!(json, format!("\"{}\"", outcome.as_str()));
        }
        assert_eq!(Outcome::parse("winner"), None);
    }

    #[test]
    fn ids_are_validated() {
        assert_eq!(validate_id("sku-1", 64), Ok(()));
        assert_eq!(validate_id("u:42.a_b", 64), Ok(()));
        assert_eq!(validate_id("", 64), Err(IdError::Empty));
        assert_eq!(validate_id("abc", 2), Err(IdError::TooLong { len_max: 2 }));
        assert_eq!(validate_id("a b", 64), Err(IdError::BadCharacter));
        assert_eq!(validate_id("a{b}", 64), Err(IdError::BadCharacter));
        assert_eq!(validate_id("é", 64), Err(IdError::BadCharacter));
        let long = "a".repeat(ID_LEN_MAX + 1);
        assert!(matches!(
            validate_id(&long, usize::MAX),
            Err(IdError::TooLong { .. })
        ));
    }

    #[test]
    fn batch_items_read_back_as_what_they_were() {
        let reply = DeductBatchReply {
            replies: vec![
                BatchItem::Decided(DeductReply {
                    order_id: Some("g.1.1".into()),
                    ..DeductReply::new(Outcome::Won, Some(9))
                }),
                BatchItem::Refused(ErrorReply {
                    error: "bad_request".into(),
                    message: "quantity must be from 1 to 1000".into(),
                }),
            ],
        };
        let json = serde_json::to_string(&reply).unwrap();
        assert_eq!(
            serde_json::from_str::<DeductBatchReply>(&json).unwrap(),
            reply
        );
        // An item that is neither shape is an error, not a silent default.
        assert!(serde_json::from_str::<DeductBatchReply>(r#"{"replies":[{"x":1}]}"#).is_err());
    }

    #[test]
    fn reply_omits_absent_fields() {
        let reply = DeductReply::new(Outcome::SoldOut, Some(0));
        let json = serde_json::to_string(&reply).unwrap();
        assert_eq!(json, r#"{"outcome":"sold_out","remaining":0}"#);
        let back: DeductReply = serde_json::from_str(&json).unwrap();
        assert_eq!(back, reply);
    }

    #[test]
    fn log_safe_text_is_bounded_and_escaped() {
        assert_eq!(
            log_safe("unknown variant `won`", 64),
            "unknown variant `won`"
        );
        assert_eq!(log_safe("a\nb\r\u{1b}[2Jc", 64), "a\\nb\\r\\u{1b}[2Jc");
        let long = "x".repeat(10_000);
        let cut = log_safe(&long, 100);
        assert_eq!(cut.len(), 100);
        assert!(cut.ends_with("..."));
        // Cut at a character, never inside one.
        let wide = "é".repeat(100);
        let cut = log_safe(&wide, 50);
        assert!(cut.len() <= 50 && cut.ends_with("..."), "{cut}");
        assert_eq!(log_safe(&"\n".repeat(100), 10), "\\n\\n\\n...");
        assert_eq!(log_safe("", 10), "");
    }
}
