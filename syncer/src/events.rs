//! Sale events: what the deduct script appends to a goods' outbox stream, what the relay
//! publishes to Kafka (JSON, keyed by goods id) and what the batched writer applies to MySQL.

use serde::{Deserialize, Serialize};

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
            SaleEvent::Reserved { goods_id, .. } => goods_id,
        }
    }

    pub fn order_id(&self) -> &str {
        match self {
            SaleEvent::Reserved { order_id, .. } => order_id,
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
        match get("type")? {
            "reserved" => {
                let event = SaleEvent::Reserved {
                    order_id: get("order_id")?.to_owned(),
                    goods_id: get("goods_id")?.to_owned(),
                    user_id: get("user_id")?.to_owned(),
                    quantity: u32::try_from(number("quantity")?).map_err(|e| {
                        EventError::Invalid {
                            field: "quantity",
                            why: e.to_string(),
                        }
                    })?,
                    request_id: get("request_id")?.to_owned(),
                    at_ms: number("at_ms")?,
                };
                event.validate()?;
                Ok(event)
            }
            other => Err(EventError::UnknownType(other.to_owned())),
        }
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
        let id = |field: &'static str, value: &str, len_max: usize| {
            seckill_api::validate_id(value, len_max).map_err(|e| EventError::Invalid {
                field,
                why: e.to_string(),
            })
        };
        match self {
            SaleEvent::Reserved {
                order_id,
                goods_id,
                user_id,
                quantity,
                request_id,
                ..
            } => {
                id("order_id", order_id, ORDER_ID_LEN_MAX)?;
                id("goods_id", goods_id, seckill_api::ID_LEN_MAX)?;
                id("user_id", user_id, seckill_api::ID_LEN_MAX)?;
                id("request_id", request_id, seckill_api::ID_LEN_MAX)?;
                if *quantity == 0 || *quantity > seckill_api::QUANTITY_MAX {
                    return Err(EventError::Invalid {
                        field: "quantity",
                        why: format!("must be from 1 to {}", seckill_api::QUANTITY_MAX),
                    });
                }
                Ok(())
            }
        }
    }
}

/// Order ids are `goods.epoch.sequence`: a goods id plus two numbers.
pub const ORDER_ID_LEN_MAX: usize = seckill_api::ID_LEN_MAX;

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
