//! What an operator reads: one sale as MySQL and Redis hold it, and the list of every sale.

use serde::Serialize;

use super::{pending_additions, valid_goods, ControlError, Stores};
use crate::db::StoredSale;
use crate::sale::Tier;

/// A sale as MySQL and Redis hold it: `definition` (MySQL's record, its state and controls),
/// `live` (Redis's counters, or why they could not be read: MySQL's half is shown even while
/// Redis is down), `shards` for a sharded goods, and `pending_additions`: stock MySQL added
/// that Redis has not taken yet (the same add-stock again completes it).
pub async fn status(stores: Stores<'_>, goods_id: &str) -> Result<serde_json::Value, ControlError> {
    valid_goods(goods_id)?;
    let stored = crate::db::load_sale(stores.mysql, goods_id)
        .await?
        .ok_or_else(|| ControlError::NoSale(goods_id.to_owned()))?;
    let live = match stores.live(goods_id).await {
        Ok(live) => serde_json::json!(live),
        Err(e) => serde_json::json!({ "error": e }),
    };
    let sharded = stored.sale.shard_count() > 1;
    let mut shown = serde_json::json!({ "definition": stored, "live": live });
    let pending = pending_additions(stores.mysql, goods_id).await?;
    if !pending.is_empty() {
        shown["pending_additions"] = pending
            .into_iter()
            .map(|(operation_id, quantity, _)| {
                serde_json::json!({ "operation_id": operation_id, "quantity": quantity })
            })
            .collect();
    }
    // A sharded goods: `live` sums its shards; each shard's own counters beside it.
    if let (true, Some(redis)) = (sharded, stores.redis) {
        shown["shards"] = match crate::preheat::live_shards(redis, stores.keys, goods_id).await {
            Ok(shards) => serde_json::json!(shards.unwrap_or_default()),
            Err(e) => serde_json::json!({ "error": e.to_string() }),
        };
    }
    Ok(shown)
}

/// One sale of a list: MySQL's record and Redis's live counters.
#[derive(Debug, Clone, Serialize)]
pub struct Listed {
    #[serde(flatten)]
    pub stored: StoredSale,
    /// Redis's counters (a sharded goods': its shards' summed); None when Redis holds no sale
    /// of it (a db goods, one never preheated, or one Redis forgot).
    pub live: Option<crate::sale::LiveStock>,
    /// Why Redis could not be read, if it could not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub live_error: Option<String>,
}

/// A page of sales, by goods id.
#[derive(Debug, Clone, Serialize)]
pub struct SaleList {
    pub sales: Vec<Listed>,
    /// The goods id to list from for the next page (None: this was the last).
    pub next: Option<String>,
}

/// Every sale MySQL defines with its state and, from Redis, its live counters; one page of at
/// most `limit` ([`crate::db::LIST_PAGE_MAX`]) from the first goods id after `after`.
pub async fn list(
    stores: Stores<'_>,
    after: Option<&str>,
    limit: u32,
) -> Result<SaleList, ControlError> {
    if let Some(after) = after {
        valid_goods(after)?;
    }
    if limit == 0 || limit > crate::db::LIST_PAGE_MAX {
        return Err(ControlError::BadRequest(format!(
            "limit must be from 1 to {}",
            crate::db::LIST_PAGE_MAX
        )));
    }
    let stored = crate::db::list_sales(stores.mysql, after, limit).await?;
    let next = (stored.len() == limit as usize)
        .then(|| stored.last().map(|s| s.sale.goods_id.clone()))
        .flatten();
    let mut sales = Vec::with_capacity(stored.len());
    for stored in stored {
        let (live, live_error) = if stored.sale.tier == Tier::Db {
            (None, None)
        } else {
            match stores.live(&stored.sale.goods_id).await {
                Ok(live) => (live, None),
                Err(e) => (None, Some(e)),
            }
        };
        sales.push(Listed {
            stored,
            live,
            live_error,
        });
    }
    Ok(SaleList { sales, next })
}
