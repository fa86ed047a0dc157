//! Sale events: what the deduct and lifecycle scripts append to a goods' outbox stream, what
//! the relay publishes to Kafka (JSON, keyed by goods id) and what the batched writer applies
//! to MySQL.

use serde::{Deserialize, Serialize};

use crate::order::ReleaseReason;

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
    /// The reservation ended unpaid; its units went back on sale (`returned`) or, the sale
    /// being closed, lapsed.
    Released {
        order_id: String,
        goods_id: String,
        user_id: String,
        quantity: u32,
        reason: String,
        returned: bool,
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

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EventError {
    #[error("field {0} is missing")]
    Missing(&'static str),
    #[error("field {field} is not valid: {why}")]
    Invalid { field: &'static str, why: String },
    #[error("unknown event type {0:?}")]
    UnknownType(String),
    #[error("not a sale event: {0}")]
    Json(String),
}

impl SaleEvent {
    pub fn goods_id(&self) -> &str {
        match self {
            SaleEvent::Reserved { goods_id, .. }
            | SaleEvent::Confirmed { goods_id, .. }
            | SaleEvent::Released { goods_id, .. } => goods_id,
        }
    }

    pub fn order_id(&self) -> &str {
        match self {
            SaleEvent::Reserved { order_id, .. }
            | SaleEvent::Confirmed { order_id, .. }
            | SaleEvent::Released { order_id, .. } => order_id,
        }
    }

    pub fn user_id(&self) -> &str {
        match self {
            SaleEvent::Reserved { user_id, .. }
            | SaleEvent::Confirmed { user_id, .. }
            | SaleEvent::Released { user_id, .. } => user_id,
        }
    }

    pub fn quantity(&self) -> u32 {
        match self {
            SaleEvent::Reserved { quantity, .. }
            | SaleEvent::Confirmed { quantity, .. }
            | SaleEvent::Released { quantity, .. } => *quantity,
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
            SaleEvent::Released { returned: true, .. } => Effect {
                available: q,
                reserved: -q,
                ..none
            },
            SaleEvent::Released {
                returned: false, ..
            } => Effect {
                reserved: -q,
                lapsed: q,
                ..none
            },
        }
    }

    /// Reads an outbox stream entry (flat field/value pairs, as XADD wrote them).
    pub fn from_stream_fields(fields: &[(String, String)]) -> Result<SaleEvent, EventError> {
        let get = |name: &'static str| {
            fields
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.as_str())
                .ok_or(EventError::Missing(name))
        };
        let number = |name: &'static str| -> Result<i64, EventError> {
            get(name)?
                .parse()
                .map_err(|e: std::num::ParseIntError| EventError::Invalid {
                    field: name,
                    why: e.to_string(),
                })
        };
        let quantity = || -> Result<u32, EventError> {
            u32::try_from(number("quantity")?).map_err(|e| EventError::Invalid {
                field: "quantity",
                why: e.to_string(),
            })
        };
        let event = match get("type")? {
            "reserved" => SaleEvent::Reserved {
                order_id: get("order_id")?.to_owned(),
                goods_id: get("goods_id")?.to_owned(),
                user_id: get("user_id")?.to_owned(),
                quantity: quantity()?,
                request_id: get("request_id")?.to_owned(),
                at_ms: number("at_ms")?,
            },
            "confirmed" => SaleEvent::Confirmed {
                order_id: get("order_id")?.to_owned(),
                goods_id: get("goods_id")?.to_owned(),
                user_id: get("user_id")?.to_owned(),
                quantity: quantity()?,
                at_ms: number("at_ms")?,
            },
            "released" => SaleEvent::Released {
                order_id: get("order_id")?.to_owned(),
                goods_id: get("goods_id")?.to_owned(),
                user_id: get("user_id")?.to_owned(),
                quantity: quantity()?,
                reason: get("reason")?.to_owned(),
                returned: match get("returned")? {
                    "1" => true,
                    "0" => false,
                    other => {
                        return Err(EventError::Invalid {
                            field: "returned",
                            why: format!("{other:?} is not 0 or 1"),
                        })
                    }
                },
                at_ms: number("at_ms")?,
            },
            other => return Err(EventError::UnknownType(other.to_owned())),
        };
        event.validate()?;
        Ok(event)
    }

    /// Reads a Kafka message value. Anything that fails here goes to the dead-letter topic.
    pub fn from_json(bytes: &[u8]) -> Result<SaleEvent, EventError> {
        let event: SaleEvent =
            serde_json::from_slice(bytes).map_err(|e| EventError::Json(e.to_string()))?;
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
            SaleEvent::Confirmed { .. } => Ok(()),
            SaleEvent::Released { reason, .. } if ReleaseReason::parse(reason).is_some() => Ok(()),
            SaleEvent::Released { reason, .. } => Err(EventError::Invalid {
                field: "reason",
                why: format!("unknown release reason {reason:?}"),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn reserved() -> Vec<(String, String)> {
        fields(&[
            ("type", "reserved"),
            ("order_id", "g.1.7"),
            ("goods_id", "g"),
            ("user_id", "u1"),
            ("quantity", "2"),
            ("request_id", "r1"),
            ("at_ms", "1700000000000"),
        ])
    }

    #[test]
    fn stream_entry_round_trips_through_json() {
        let event = SaleEvent::from_stream_fields(&reserved()).unwrap();
        assert_eq!(event.order_id(), "g.1.7");
        let json = event.to_json();
        assert_eq!(SaleEvent::from_json(&json).unwrap(), event);
        assert!(String::from_utf8(json)
            .unwrap()
            .starts_with(r#"{"type":"reserved""#));
    }

    #[test]
    fn lifecycle_entries_parse_and_move_units() {
        let released = SaleEvent::from_stream_fields(&fields(&[
            ("type", "released"),
            ("order_id", "g.1.7"),
            ("goods_id", "g"),
            ("user_id", "u1"),
            ("quantity", "2"),
            ("reason", "expired"),
            ("returned", "0"),
            ("at_ms", "1"),
        ]))
        .unwrap();
        assert_eq!(
            released.effect(),
            Effect {
                reserved: -2,
                lapsed: 2,
                ..Effect::default()
            }
        );
        assert_eq!(SaleEvent::from_json(&released.to_json()).unwrap(), released);
        let confirmed = SaleEvent::from_stream_fields(&fields(&[
            ("type", "confirmed"),
            ("order_id", "g.1.7"),
            ("goods_id", "g"),
            ("user_id", "u1"),
            ("quantity", "2"),
            ("at_ms", "1"),
        ]))
        .unwrap();
        assert_eq!(
            confirmed.effect(),
            Effect {
                reserved: -2,
                sold: 2,
                ..Effect::default()
            }
        );
        let bad_reason = fields(&[
            ("type", "released"),
            ("order_id", "g.1.7"),
            ("goods_id", "g"),
            ("user_id", "u1"),
            ("quantity", "2"),
            ("reason", "bored"),
            ("returned", "1"),
            ("at_ms", "1"),
        ]);
        assert!(SaleEvent::from_stream_fields(&bad_reason).is_err());
    }

    #[test]
    fn broken_entries_and_messages_are_refused() {
        let mut missing = reserved();
        missing.retain(|(k, _)| k != "order_id");
        assert_eq!(
            SaleEvent::from_stream_fields(&missing),
            Err(EventError::Missing("order_id"))
        );
        let mut bad_qty = reserved();
        bad_qty[4].1 = "0".into();
        assert!(SaleEvent::from_stream_fields(&bad_qty).is_err());
        assert!(SaleEvent::from_json(b"not json").is_err());
        assert!(SaleEvent::from_json(br#"{"type":"exploded"}"#).is_err());
        assert!(SaleEvent::from_json(
            br#"{"type":"reserved","order_id":"a b","goods_id":"g","user_id":"u","quantity":1,"request_id":"r","at_ms":1}"#
        )
        .is_err());
        assert!(SaleEvent::from_json(
            br#"{"type":"reserved","order_id":"g.1.1","goods_id":"g","user_id":"u","quantity":1,"request_id":"r","at_ms":1,"x":1}"#
        )
        .is_err());
    }
}
