//! The admin API's bodies besides a sale's definition ([`crate::sale::SaleSpec`]): adding stock
//! and pausing. Read and checked here, before any store is touched, so the API and the `sale`
//! command refuse the same input with the same words.

use serde::{Deserialize, Serialize};

use crate::sale::{PAUSE_RETRY_S_DEFAULT, PAUSE_RETRY_S_MAX, TOTAL_STOCK_MAX};

/// Longest operation id (the same bound as every other id).
pub const OPERATION_ID_LEN_MAX: usize = seckill_api::ID_LEN_MAX;

/// What the admin API takes to add stock.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddStock {
    /// Units to add: from 1, and the sale's total may not pass [`TOTAL_STOCK_MAX`].
    pub quantity: u64,
    /// Names this addition: sent again (a retry), it adds nothing more.
    pub operation_id: String,
}

impl AddStock {
    /// Checks what can be checked without the sale: a usable operation id and a quantity from
    /// 1 to [`TOTAL_STOCK_MAX`] (whether the sale's total stays within it is the caller's to
    /// check, under the sale row's lock). The error is the message for the operator.
    pub fn check(&self) -> Result<(), String> {
        seckill_api::validate_id(&self.operation_id, OPERATION_ID_LEN_MAX)
            .map_err(|e| format!("operation_id {e}"))?;
        if self.quantity == 0 || self.quantity > TOTAL_STOCK_MAX {
            return Err(format!(
                "quantity must be from 1 to {TOTAL_STOCK_MAX}, not {}",
                self.quantity
            ));
        }
        Ok(())
    }
}

/// The optional body of a pause: `{"retry_after_s": 30}`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pause {
    /// The Retry-After buyers are told (default [`PAUSE_RETRY_S_DEFAULT`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_s: Option<u32>,
}

impl Pause {
    /// Reads a pause's body; an empty body asks for the defaults. The error is the message for
    /// the operator.
    pub fn from_json(body: &[u8]) -> Result<Pause, String> {
        if body.is_empty() {
            return Ok(Pause::default());
        }
        serde_json::from_slice(body).map_err(|e| e.to_string())
    }

    /// The Retry-After buyers are to be told, seconds (checked by the pause itself, which the
    /// `sale` command calls too: [`check_pause_retry_s`]).
    pub fn retry_after_s(&self) -> u32 {
        self.retry_after_s.unwrap_or(PAUSE_RETRY_S_DEFAULT)
    }
}

/// A pause's Retry-After must be from 1 to [`PAUSE_RETRY_S_MAX`] seconds: zero would tell a
/// crowd to come straight back, and a longer one outlasts what a buyer waits for.
pub fn check_pause_retry_s(retry_after_s: u32) -> Result<(), String> {
    if retry_after_s == 0 || retry_after_s > PAUSE_RETRY_S_MAX {
        return Err(format!(
            "retry_after_s must be from 1 to {PAUSE_RETRY_S_MAX}, not {retry_after_s}"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn add(quantity: u64, operation_id: &str) -> AddStock {
        AddStock {
            quantity,
            operation_id: operation_id.to_owned(),
        }
    }

    #[test]
    fn an_addition_needs_an_operation_id_and_a_quantity_in_bounds() {
        assert_eq!(add(1, "op-1").check(), Ok(()));
        assert_eq!(add(TOTAL_STOCK_MAX, "op-1").check(), Ok(()));
        let zero = add(0, "op-1").check().unwrap_err();
        assert!(zero.contains("quantity must be from 1"), "{zero}");
        assert!(add(TOTAL_STOCK_MAX + 1, "op-1").check().is_err());
        let id = add(1, "op 1").check().unwrap_err();
        assert!(id.starts_with("operation_id "), "{id}");
        assert!(add(1, "").check().is_err());
        assert!(add(1, &"o".repeat(OPERATION_ID_LEN_MAX + 1))
            .check()
            .is_err());
        let unknown = r#"{"quantity":1,"operation_id":"op","units":2}"#;
        assert!(serde_json::from_str::<AddStock>(unknown).is_err());
    }

    #[test]
    fn a_pause_body_is_optional_and_its_retry_bounded() {
        let retry = |body: &[u8]| Pause::from_json(body).map(|pause| pause.retry_after_s());
        assert_eq!(retry(b""), Ok(PAUSE_RETRY_S_DEFAULT));
        assert_eq!(retry(b"{}"), Ok(PAUSE_RETRY_S_DEFAULT));
        assert_eq!(retry(br#"{"retry_after_s": 30}"#), Ok(30));
        assert!(retry(br#"{"retry_after": 30}"#).is_err());
        assert!(retry(br#"{"retry_after_s": -1}"#).is_err());
        assert!(retry(b"30").is_err());
        assert_eq!(check_pause_retry_s(1), Ok(()));
        assert_eq!(check_pause_retry_s(PAUSE_RETRY_S_MAX), Ok(()));
        for bad in [0, PAUSE_RETRY_S_MAX + 1] {
            let refused = check_pause_retry_s(bad).unwrap_err();
            assert!(
                refused.contains("retry_after_s must be from 1"),
                "{refused}"
            );
        }
    }
}
