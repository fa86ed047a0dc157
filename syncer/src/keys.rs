//! Redis key layout. Every key of one goods shares the Redis Cluster hash tag `{goods}`, so the
//! deduct script may touch all of them atomically on one shard.

/// The keys of one goods' sale.
#[derive(Debug, Clone)]
pub struct GoodsKeys {
    /// Hash: total, available, reserved, sold, limit, start_ms, end_ms, epoch, seq.
    pub sale: String,
    /// Hash: user id -> units this user holds (reserved or sold).
    pub users: String,
    /// Hash: request id -> "user|quantity|order_id" of every request that won (idempotency).
    pub requests: String,
    /// Hash: order id -> "user|quantity|reserved_at_ms" of every open reservation.
    pub reservations: String,
    /// Stream: the outbox of sale events, appended by the same script that deducts.
    pub outbox: String,
    /// Counter bumped by every preheat; part of each order id so a re-preheated sale never
    /// reuses an order id. Never deleted.
    pub epoch: String,
}

/// Key names under one prefix, so tests and tenants can share a Redis without colliding.
#[derive(Debug, Clone)]
pub struct KeySpace {
    prefix: String,
}

impl KeySpace {
    pub fn new(prefix: impl Into<String>) -> Self {
        Self {
            prefix: prefix.into(),
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn goods(&self, goods_id: &str) -> GoodsKeys {
        let base = format!("{}:{{{}}}", self.prefix, goods_id);
        GoodsKeys {
            sale: format!("{base}:sale"),
            users: format!("{base}:users"),
            requests: format!("{base}:requests"),
            reservations: format!("{base}:reservations"),
            outbox: format!("{base}:outbox"),
            epoch: format!("{base}:epoch"),
        }
    }

    /// Set of every goods id ever preheated (the relay and reconcile walk it).
    pub fn sales_index(&self) -> String {
        format!("{}:sales", self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_goods_shares_one_hash_tag() {
        let keys = KeySpace::new("t1").goods("sku-9");
        for key in [
            &keys.sale,
            &keys.users,
            &keys.requests,
            &keys.reservations,
            &keys.outbox,
            &keys.epoch,
        ] {
            assert!(key.starts_with("t1:{sku-9}:"), "{key}");
        }
        assert_ne!(keys.sale, KeySpace::new("t2").goods("sku-9").sale);
    }
}
