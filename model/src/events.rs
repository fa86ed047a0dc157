//! Sale events: the one definition of what happens to an order, on every hop.
//!
//! The deduct and lifecycle scripts write each event as one JSON document (`cjson.encode`, see
//! `lua/common.lua`) into the field [`OUTBOX_FIELD`] of an entry of the goods' outbox stream;
//! the relay forwards those bytes to Kafka untouched (keyed by goods id); the batched writer
//! decodes them here, and reconcile's repair encodes here what it appends to an outbox. So
//! this module is the only Rust code that reads or writes the format, and
//! `tests/tests/event_contract.rs` decodes every kind of event the real scripts write with it.
//!
//! JSON, with keys in any order (cjson does not keep them):
//! `{"type":"reserved","order_id":"g.1.7","goods_id":"g","user_id":"u1","quantity":2,
//!   "request_id":"r1","at_ms":1764518400123}`; `confirmed` has no `request_id`; `released`
//! (units back on sale) and `lapsed` (units gone: the sale had closed) carry a `reason`.

use serde::{Deserialize, Serialize};

use crate::order::{OrderState, ReleaseReason};

/// The field of an outbox stream entry that holds the event's JSON. `lua/common.lua` writes
/// the same name.
pub const OUTBOX_FIELD: &str = "event";

/// Longest account of why a message is not a sale event. A dead letter carries it in a header
/// beside the message itself: a reason as large as the message could make the dead letter
/// larger than Kafka takes, and the writer would retry it forever.
pub const REASON_BYTES_MAX: usize = 256;

/// One event of an order's life. Every event names its order, so applying an event twice is
/// detectable (promise 4).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum SaleEvent {
    /// A unit (or several) was taken from available stock and reserved for a buyer.
    Reserved {
        order_id: String,
        goods_id: String,
        user_id: String,
        quantity: u32,
        request_id: String,
        at_ms: i64,
    },
    /// The buyer paid: the reservation's units are sold.
    Confirmed {
        order_id: String,
        goods_id: String,
        user_id: String,
        quantity: u32,
        at_ms: i64,
    },
    /// The reservation ended unpaid while its sale was open: its units went back on sale.
    Released {
        order_id: String,
        goods_id: String,
        user_id: String,
        quantity: u32,
        reason: ReleaseReason,
        at_ms: i64,
    },
    /// The reservation ended unpaid after its sale had closed: its units lapsed (never sold,
    /// never on sale again). The order is released all the same.
    Lapsed {
        order_id: String,
        goods_id: String,
        user_id: String,
        quantity: u32,
        reason: ReleaseReason,
        at_ms: i64,
    },
}

/// What an event does to a sale's four counters (available, reserved, sold, lapsed).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Effect {
    pub available: i64,
    pub reserved: i64,
    pub sold: i64,
    pub lapsed: i64,
}

impl std::ops::AddAssign for Effect {
    fn add_assign(&mut self, other: Effect) {
        self.available += other.available;
        self.reserved += other.reserved;
        self.sold += other.sold;
        self.lapsed += other.lapsed;
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EventError {
    #[error("field {field} is not valid: {why}")]
    Invalid { field: &'static str, why: String },
    #[error("not a sale event: {0}")]
    Json(String),
}

/// The fields every event has.
struct Common<'a> {
    order_id: &'a str,
    goods_id: &'a str,
    user_id: &'a str,
    quantity: u32,
    at_ms: i64,
}

impl SaleEvent {
    fn common(&self) -> Common<'_> {
        match self {
            SaleEvent::Reserved {
                order_id,
                goods_id,
                user_id,
                quantity,
                at_ms,
                ..
            }
            | SaleEvent::Confirmed {
                order_id,
                goods_id,
                user_id,
                quantity,
                at_ms,
            }
            | SaleEvent::Released {
                order_id,
                goods_id,
                user_id,
                quantity,
                at_ms,
                ..
            }
            | SaleEvent::Lapsed {
                order_id,
                goods_id,
                user_id,
                quantity,
                at_ms,
                ..
            } => Common {
                order_id,
                goods_id,
                user_id,
                quantity: *quantity,
                at_ms: *at_ms,
            },
        }
    }

    pub fn goods_id(&self) -> &str {
        self.common().goods_id
    }

    pub fn order_id(&self) -> &str {
        self.common().order_id
    }

    pub fn user_id(&self) -> &str {
        self.common().user_id
    }

    pub fn quantity(&self) -> u32 {
        self.common().quantity
    }

    /// The event's `type`, as the JSON names it.
    pub fn kind(&self) -> &'static str {
        match self {
            SaleEvent::Reserved { .. } => "reserved",
            SaleEvent::Confirmed { .. } => "confirmed",
            SaleEvent::Released { .. } => "released",
            SaleEvent::Lapsed { .. } => "lapsed",
        }
    }

    /// The buyer's request id: only a `reserved` event carries it.
    pub fn request_id(&self) -> Option<&str> {
        match self {
            SaleEvent::Reserved { request_id, .. } => Some(request_id),
            _ => None,
        }
    }

    /// When the script (or the repair) wrote the event, ms since the epoch by Redis's clock.
    pub fn at_ms(&self) -> i64 {
        self.common().at_ms
    }

    /// The state the event leaves its order in.
    pub fn order_state(&self) -> OrderState {
        match self {
            SaleEvent::Reserved { .. } => OrderState::Reserved,
            SaleEvent::Confirmed { .. } => OrderState::Confirmed,
            SaleEvent::Released { .. } | SaleEvent::Lapsed { .. } => OrderState::Released,
        }
    }

    /// Why the order was released, and whether its units went back on sale (None: the event
    /// releases nothing). MySQL keeps both (`release_reason`, `stock_returned`).
    pub fn release(&self) -> Option<(ReleaseReason, bool)> {
        match self {
            SaleEvent::Released { reason, .. } => Some((*reason, true)),
            SaleEvent::Lapsed { reason, .. } => Some((*reason, false)),
            SaleEvent::Reserved { .. } | SaleEvent::Confirmed { .. } => None,
        }
    }

    /// The counters this event moves units between.
    pub fn effect(&self) -> Effect {
        let q = i64::from(self.quantity());
        let none = Effect::default();
        match self {
            SaleEvent::Reserved { .. } => Effect {
                available: -q,
                reserved: q,
                ..none
            },
            SaleEvent::Confirmed { .. } => Effect {
                reserved: -q,
                sold: q,
                ..none
            },
            SaleEvent::Released { .. } => Effect {
                available: q,
                reserved: -q,
                ..none
            },
            SaleEvent::Lapsed { .. } => Effect {
                reserved: -q,
                lapsed: q,
                ..none
            },
        }
    }

    /// Reads an event (an outbox field, a Kafka message value). Anything that fails here is a
    /// dead letter, never a silent drop.
    pub fn from_json(bytes: &[u8]) -> Result<SaleEvent, EventError> {
        // serde's words quote the message (an unknown `type` verbatim): bounded and escaped,
        // since they become the dead letter's reason, in a log line and a Kafka header.
        let event: SaleEvent = serde_json::from_slice(bytes).map_err(|e| {
            EventError::Json(seckill_api::log_safe(&e.to_string(), REASON_BYTES_MAX))
        })?;
        event.validate()?;
        Ok(event)
    }

    pub fn to_json(&self) -> Vec<u8> {
        // Serialising a plain enum of strings and integers cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    fn validate(&self) -> Result<(), EventError> {
        let id = |field: &'static str, value: &str| {
            seckill_api::validate_id(value, seckill_api::ID_LEN_MAX).map_err(|e| {
                EventError::Invalid {
                    field,
                    why: e.to_string(),
                }
            })
        };
        id("order_id", self.order_id())?;
        id("goods_id", self.goods_id())?;
        id("user_id", self.user_id())?;
        let quantity = self.quantity();
        if quantity == 0 || quantity > seckill_api::QUANTITY_MAX {
            return Err(EventError::Invalid {
                field: "quantity",
                why: format!("must be from 1 to {}", seckill_api::QUANTITY_MAX),
            });
        }
        match self {
            SaleEvent::Reserved { request_id, .. } => id("request_id", request_id),
            _ => Ok(()),
        }
    }
}

/// An event of type `kind` for tests: order `g.1.7` of goods `g`, bought by `u1` (request
/// `r1`), at a 13-digit time.
#[cfg(test)]
pub(crate) fn sample(kind: &str, quantity: u32, reason: ReleaseReason) -> SaleEvent {
    let mut json = serde_json::json!({
        "type": kind, "order_id": "g.1.7", "goods_id": "g", "user_id": "u1",
        "quantity": quantity, "at_ms": 1_764_518_400_123_i64,
    });
    match kind {
        "reserved" => json["request_id"] = "r1".into(),
        "released" | "lapsed" => json["reason"] = reason.as_str().into(),
        _ => {}
    }
    serde_json::from_value(json).unwrap_or_else(|e| panic!("no {kind} event: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const KINDS: [&str; 4] = ["reserved", "confirmed", "released", "lapsed"];

    #[test]
    fn events_round_trip_through_json() {
        for kind in KINDS {
            let event = sample(kind, 2, ReleaseReason::Expired);
            let json = event.to_json();
            assert_eq!(SaleEvent::from_json(&json).unwrap(), event);
            assert_eq!(event.kind(), kind);
            let prefix = format!(r#"{{"type":"{kind}""#);
            assert!(String::from_utf8(json).unwrap().starts_with(&prefix));
        }
    }

    #[test]
    fn cjson_output_reads_back() {
        // As cjson writes it: keys in hash order, "/" escaped, integers without a fraction.
        let json = br#"{"at_ms":1764518400123,"quantity":2,"reason":"upstream_failed","user_id":"u\/1","type":"lapsed","goods_id":"g","order_id":"g.1.7"}"#;
        let event = SaleEvent::from_json(json);
        // "u/1" is not a valid user id: cjson's escape was read, then the id refused.
        assert!(matches!(
            event,
            Err(EventError::Invalid {
                field: "user_id",
                ..
            })
        ));
        let json = br#"{"at_ms":1764518400123,"quantity":2,"reason":"upstream_failed","user_id":"u1","type":"lapsed","goods_id":"g","order_id":"g.1.7"}"#;
        let event = SaleEvent::from_json(json).unwrap();
        assert_eq!(event.at_ms(), 1_764_518_400_123);
        assert_eq!(
            event.release(),
            Some((ReleaseReason::UpstreamFailed, false))
        );
        // A timestamp printed as a float (cjson below 14 digits of precision) is refused.
        let float = br#"{"type":"confirmed","order_id":"g.1.7","goods_id":"g","user_id":"u1","quantity":2,"at_ms":1.7645e+12}"#;
        assert!(SaleEvent::from_json(float).is_err());
    }

    #[test]
    fn each_event_moves_units_and_sets_a_state() {
        let none = Effect::default();
        let cases = [
            (OrderState::Reserved, (-2, 2, 0, 0)),
            (OrderState::Confirmed, (0, -2, 2, 0)),
            (OrderState::Released, (2, -2, 0, 0)),
            (OrderState::Released, (0, -2, 0, 2)),
        ];
        for (kind, (state, (available, reserved, sold, lapsed))) in KINDS.into_iter().zip(cases) {
            let event = sample(kind, 2, ReleaseReason::Cancelled);
            let expected = Effect {
                available,
                reserved,
                sold,
                lapsed,
            };
            assert_eq!(event.effect(), expected, "{event:?}");
            assert_eq!(event.order_state(), state);
            let mut total = none;
            total += event.effect();
            assert_eq!(total, expected);
        }
    }

    /// Found by fuzzing (`fuzz/fuzz_targets/sale_event.rs`): serde's message quoted an unknown
    /// `type` verbatim, so a control character reached the writer's log line and a huge one
    /// made a dead-letter reason as large as the message.
    #[test]
    fn a_refusal_is_bounded_and_printable_whatever_the_message() {
        let forged = br#"{"type":"r\rvdsee","order_id":"g.1.1"}"#;
        let Err(EventError::Json(reason)) = SaleEvent::from_json(forged) else {
            panic!("refused for its type");
        };
        assert!(!reason.contains('\r'), "{reason:?}");
        assert!(reason.contains("unknown variant `r\\rvdsee`"), "{reason}");
        let huge = format!(r#"{{"type":"{}"}}"#, "x".repeat(900_000));
        let Err(refused) = SaleEvent::from_json(huge.as_bytes()) else {
            panic!("refused for its type");
        };
        let reason = refused.to_string();
        assert!(reason.len() <= 300, "{} bytes", reason.len());
        assert!(
            reason.starts_with("not a sale event: unknown variant `xxx"),
            "{reason}"
        );
    }

    #[test]
    fn broken_messages_are_refused() {
        assert!(SaleEvent::from_json(b"not json").is_err());
        assert!(SaleEvent::from_json(br#"{"type":"exploded"}"#).is_err());
        let missing = SaleEvent::from_json(br#"{"type":"reserved","order_id":"g.1.x"}"#);
        assert!(matches!(missing, Err(EventError::Json(m)) if m.contains("missing field")));
        assert!(SaleEvent::from_json(
            br#"{"type":"reserved","order_id":"a b","goods_id":"g","user_id":"u","quantity":1,"request_id":"r","at_ms":1}"#
        )
        .is_err());
        assert!(SaleEvent::from_json(
            br#"{"type":"reserved","order_id":"g.1.1","goods_id":"g","user_id":"u","quantity":0,"request_id":"r","at_ms":1}"#
        )
        .is_err());
        assert!(SaleEvent::from_json(
            br#"{"type":"reserved","order_id":"g.1.1","goods_id":"g","user_id":"u","quantity":1,"request_id":"r","at_ms":1,"x":1}"#
        )
        .is_err());
        assert!(SaleEvent::from_json(
            br#"{"type":"released","order_id":"g.1.1","goods_id":"g","user_id":"u","quantity":1,"reason":"bored","at_ms":1}"#
        )
        .is_err());
    }
}
