//! Defining (or redefining) a sale in MySQL, for the admin API and the CLI alike.

use chrono::{DateTime, Utc};

use super::{ControlError, Stores};
use crate::db::{self, Saved};
use crate::sale::{Sale, SaleSpec, Tier};

/// Validates `spec` for `goods_id` and saves it. Refused, changing nothing: a bad spec; a
/// window that has closed by `now`; a sale live in Redis (its counters would no longer
/// match); a sale whose window is open while MySQL has history for it (a Redis that
/// restarted no longer knows it is live).
pub async fn define(
    stores: Stores<'_>,
    goods_id: &str,
    spec: SaleSpec,
    now: DateTime<Utc>,
) -> Result<(Saved, Sale), ControlError> {
    let sale = Sale::new(goods_id, spec).map_err(|e| ControlError::BadRequest(e.to_string()))?;
    sale.refuse_ended(now)
        .map_err(|e| ControlError::BadRequest(e.to_string()))?;
    let live = match stores.live(goods_id).await {
        Ok(live) => live,
        // A db sale needs no Redis; MySQL still refuses to redefine an open sale with history.
        Err(_) if sale.tier == Tier::Db => None,
        Err(e) => return Err(ControlError::Redis(e)),
    };
    if live.is_some_and(|live| now.timestamp_millis() < live.end_ms) {
        return Err(ControlError::Live {
            goods_id: goods_id.to_owned(),
        });
    }
    let saved = db::save_sale(stores.mysql, &sale).await?;
    Ok((saved, sale))
}
