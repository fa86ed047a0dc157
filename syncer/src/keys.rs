//! Redis key layout. Every key of one goods shares the Redis Cluster hash tag `{goods}`, so the
//! deduct script may touch all of them atomically on one shard.

/// The keys of one goods' sale.
#[derive(Debug, Clone)]
pub struct GoodsKeys {
    /// Hash: total, available, reserved, sold, lapsed, limit, start_ms, end_ms, window_ms,
    /// epoch, seq; and first_epoch after a re-seed (orders of epochs first_epoch..=epoch are
    /// in the counters); pause_retry_ms while an operator paused the sale, and added:<id> for
    /// each stock addition applied under this epoch (`control/`).
    pub sale: String,
    /// Hash: user id -> units this user holds (reserved or sold).
    pub users: String,
    /// Hash: request id -> "user|quantity|order_id" of every request that won (idempotency);
    /// see [`Record`].
    pub requests: String,
    /// Hash: order id -> "user|quantity|reserved_at_ms" of every open reservation; see
    /// [`Record`].
    pub reservations: String,
    /// Sorted set: open reservation order ids scored by the end of their payment window.
    pub expiries: String,
    /// Sorted set: open reservations the gate has not claimed yet (not known to have reached
    /// the shop), scored by the end of their claim window; a claim removes the entry.
    pub unclaimed: String,
    /// Hash: order id -> final state ("confirmed", "released:<reason>") of every settled order,
    /// so repeated confirm and cancel calls get the same answer.
    pub settled: String,
    /// Set: settled orders whose units lapsed instead of going back on sale (released after
    /// their sale closed, or not of the sale's epoch). MySQL keeps the same fact as
    /// `stock_returned = false`; reconcile reads it to replay the exact event.
    pub lapsed_orders: String,
    /// Stream: the outbox of sale events, appended by the same script that deducts.
    pub outbox: String,
    /// The last epoch loaded into this Redis (MySQL hands epochs out: `sales.epoch`); a load
    /// with an epoch not above it is refused, so epochs only move forward. Never deleted.
    pub epoch: String,
    /// Hash (a shard of a `redis_sharded` goods): transfer id -> "to_shard|units|at_ms" of
    /// every unit this shard gave up whose arrival is not confirmed yet (`shard.rs`).
    pub transfers_out: String,
    /// Set (a shard): the transfer ids this shard received, so a transfer lands once.
    pub transfers_in: String,
}

/// Each script's KEYS, in the order of its header: written once here for every caller (the
/// syncer, the tests, the benchmark).
impl GoodsKeys {
    /// `lua/deduct_batch.lua`.
    pub fn deduct_script_keys(&self) -> [&str; 8] {
        [
            &self.sale,
            &self.users,
            &self.requests,
            &self.reservations,
            &self.outbox,
            &self.expiries,
            &self.unclaimed,
            &self.settled,
        ]
    }

    /// `lua/lifecycle.lua`.
    pub fn lifecycle_script_keys(&self) -> [&str; 8] {
        [
            &self.sale,
            &self.users,
            &self.reservations,
            &self.expiries,
            &self.settled,
            &self.outbox,
            &self.unclaimed,
            &self.lapsed_orders,
        ]
    }

    /// `lua/reseed.lua`: preheat's first nine keys, then the outbox.
    pub fn reseed_script_keys(&self) -> [&str; 12] {
        let [a, b, c, d, e, f, g, h, i, j, k] = self.preheat_script_keys();
        [a, b, c, d, e, f, g, h, i, &self.outbox, j, k]
    }

    /// `lua/transfer.lua` on the shard that gives units up (take, done, pending).
    pub fn transfer_out_script_keys(&self) -> [&str; 2] {
        [&self.sale, &self.transfers_out]
    }

    /// `lua/transfer.lua` on the shard that receives them (give, pending_in).
    pub fn transfer_in_script_keys(&self) -> [&str; 2] {
        [&self.sale, &self.transfers_in]
    }

    /// `lua/control.lua`.
    pub fn control_script_keys(&self) -> [&str; 2] {
        [&self.sale, &self.epoch]
    }

    /// `lua/preheat.lua`.
    pub fn preheat_script_keys(&self) -> [&str; 11] {
        [
            &self.sale,
            &self.users,
            &self.requests,
            &self.reservations,
            &self.epoch,
            &self.expiries,
            &self.settled,
            &self.unclaimed,
            &self.lapsed_orders,
            &self.transfers_out,
            &self.transfers_in,
        ]
    }
}

/// A record of the requests or reservations hash, `user|quantity|rest`, as `parse_record` in
/// `lua/common.lua` reads it: `rest` is the order id (requests) or the reserved-at ms
/// (reservations).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record<'a> {
    pub user_id: &'a str,
    pub quantity: u32,
    pub rest: &'a str,
}

impl<'a> Record<'a> {
    /// None when the text is not of that shape.
    pub fn parse(text: &'a str) -> Option<Record<'a>> {
        let mut parts = text.splitn(3, '|');
        let (user_id, quantity, rest) = (parts.next()?, parts.next()?, parts.next()?);
        let digits = !quantity.is_empty() && quantity.bytes().all(|b| b.is_ascii_digit());
        if !digits || rest.is_empty() {
            return None;
        }
        Some(Record {
            user_id,
            quantity: quantity.parse().ok()?,
            rest,
        })
    }
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
            expiries: format!("{base}:expiries"),
            unclaimed: format!("{base}:unclaimed"),
            settled: format!("{base}:settled"),
            lapsed_orders: format!("{base}:lapsed_orders"),
            outbox: format!("{base}:outbox"),
            epoch: format!("{base}:epoch"),
            transfers_out: format!("{base}:transfers_out"),
            transfers_in: format!("{base}:transfers_in"),
        }
    }

    /// Set of every goods id ever preheated (the relay and reconcile walk it).
    pub fn sales_index(&self) -> String {
        format!("{}:sales", self.prefix)
    }

    /// Counter that a script call under `--redis-durability replicas:N` increments, so its
    /// WAIT covers every write before it (`durability.rs`). One per goods, in its hash tag
    /// (a WAIT on a Redis Cluster shard counts that shard's replicas).
    pub fn durability_mark(&self, goods_id: &str) -> String {
        format!("{}:{{{}}}:durability", self.prefix, goods_id)
    }
}

/// Separates a goods id from a shard's index in the id a shard's keys are named by (`G~2`):
/// id validation refuses `~`, so no goods id a sale may have is ever a shard's.
pub const SHARD_SEPARATOR: char = '~';

/// The id shard `shard` of a `redis_sharded` goods is keyed by: a hash tag of its own, so on a
/// Redis Cluster the shards of one goods spread over the masters. Also what the sales index
/// holds for it (the relay, the sweeper and reconcile walk every shard).
pub fn shard_id(goods_id: &str, shard: u32) -> String {
    format!("{goods_id}{SHARD_SEPARATOR}{shard}")
}

/// The key ids a goods' records live under: its own, or one per shard of a `redis_sharded`
/// goods of `shards` shards.
pub fn key_ids(goods_id: &str, shards: u32) -> Vec<String> {
    if shards > 1 {
        (0..shards).map(|shard| shard_id(goods_id, shard)).collect()
    } else {
        vec![goods_id.to_owned()]
    }
}

/// The goods and shard of a key id: `("G", Some(2))` for `G~2`, `("G", None)` for `G`.
pub fn split_shard(key_id: &str) -> (&str, Option<u32>) {
    match key_id.rsplit_once(SHARD_SEPARATOR) {
        Some((goods, shard)) if !goods.is_empty() && shard.bytes().all(|b| b.is_ascii_digit()) => {
            match shard.parse() {
                Ok(shard) => (goods, Some(shard)),
                Err(_) => (key_id, None),
            }
        }
        _ => (key_id, None),
    }
}

/// The goods a key id belongs to (itself, or the goods of a shard).
pub fn base_goods(key_id: &str) -> &str {
    split_shard(key_id).0
}

/// The buyer's home shard: the one that holds their per-user count and their request ids, so
/// that the limit and retries stay exact however the stock moves. FNV-1a (64 bit): the same
/// in every syncer process and release, unlike the std hasher.
pub fn home_shard(user_id: &str, shards: u32) -> u32 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in user_id.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    (hash % u64::from(shards.max(1))) as u32
}

/// The shard that issued an order: its sequence is `local_seq * shards + shard`
/// (`lua/deduct_batch.lua`), so every shard hands out sequences of its own.
pub fn shard_of_sequence(sequence: u64, shards: u32) -> u32 {
    (sequence % u64::from(shards.max(1))) as u32
}

/// The sequence of the last order a keyspace issued, from its sale hash: `seq` (how many it
/// handed out), and for a shard `shards` and `shard`, as `lua/deduct_batch.lua` issues
/// `seq * shards + shard` (a goods of one keyspace has neither field: 1 and 0). 0 when it
/// issued none.
pub fn last_issued(seq: u64, shards: Option<u64>, shard: Option<u64>) -> u64 {
    if seq == 0 {
        return 0;
    }
    seq.saturating_mul(shards.unwrap_or(1))
        .saturating_add(shard.unwrap_or(0))
}

/// The goods id inside an order id (`goods.epoch.sequence`; a goods id may contain dots).
pub fn goods_of_order(order_id: &str) -> Option<&str> {
    order_parts(order_id).map(|(goods, _, _)| goods)
}

/// The goods id, epoch and sequence of an order id (`goods.epoch.sequence`).
pub fn order_parts(order_id: &str) -> Option<(&str, u64, u64)> {
    let mut parts = order_id.rsplitn(3, '.');
    let sequence = parts.next()?;
    let epoch = parts.next()?;
    let goods = parts.next()?;
    let numeric = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !(numeric(sequence) && numeric(epoch) && !goods.is_empty()) {
        return None;
    }
    Some((goods, epoch.parse().ok()?, sequence.parse().ok()?))
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
            &keys.expiries,
            &keys.unclaimed,
            &keys.settled,
            &keys.lapsed_orders,
            &keys.outbox,
            &keys.epoch,
        ] {
            assert!(key.starts_with("t1:{sku-9}:"), "{key}");
        }
        // The mark a `replicas:N` call increments in the script's pipeline: same slot.
        assert!(KeySpace::new("t1")
            .durability_mark("sku-9")
            .starts_with("t1:{sku-9}:"));
        // The sales index is in no goods' tag: only single-key commands use it.
        assert!(!KeySpace::new("t1").sales_index().contains('{'));
        assert_ne!(keys.sale, KeySpace::new("t2").goods("sku-9").sale);
    }

    #[test]
    fn records_read_as_the_scripts_write_them() {
        let record = Record::parse("u:1|3|g.1.7").unwrap();
        assert_eq!(
            (record.user_id, record.quantity, record.rest),
            ("u:1", 3, "g.1.7")
        );
        assert_eq!(Record::parse("u|2|1764518400123").unwrap().quantity, 2);
        for bad in ["u|x|g.1.1", "u|1|", "u|1", "u", "u||g.1.1", "u|-1|g.1.1"] {
            assert_eq!(Record::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn script_key_lists_name_keys_of_one_goods() {
        let keys = KeySpace::new("t1").goods("sku-9");
        let lists: [&[&str]; 3] = [
            &keys.deduct_script_keys(),
            &keys.lifecycle_script_keys(),
            &keys.preheat_script_keys(),
        ];
        for list in lists {
            let distinct: std::collections::HashSet<&&str> = list.iter().collect();
            assert_eq!(distinct.len(), list.len());
            assert!(list.iter().all(|k| k.starts_with("t1:{sku-9}:")));
        }
    }

    #[test]
    fn shards_have_tags_of_their_own_that_no_goods_can_take() {
        let space = KeySpace::new("t1");
        let shard = space.goods(&shard_id("sku-9", 2));
        assert!(shard.sale.starts_with("t1:{sku-9~2}:"), "{}", shard.sale);
        assert!(shard.transfers_out.starts_with("t1:{sku-9~2}:"));
        assert!(seckill_api::validate_id(&shard_id("sku-9", 2), 128).is_err());
        assert_eq!(split_shard("sku-9~2"), ("sku-9", Some(2)));
        assert_eq!(split_shard("sku-9"), ("sku-9", None));
        assert_eq!(split_shard("~2"), ("~2", None));
        assert_eq!(split_shard("a~b"), ("a~b", None));
        assert_eq!(base_goods("g.1~15"), "g.1");
        // Stable across processes: pinned values.
        assert_eq!(home_shard("u1", 3), home_shard("u1", 3));
        let spread: std::collections::HashSet<u32> =
            (0..100).map(|i| home_shard(&format!("u{i}"), 3)).collect();
        assert_eq!(spread.len(), 3);
        assert_eq!(home_shard("anyone", 1), 0);
        assert_eq!(shard_of_sequence(7, 3), 1);
        // Shard 2 of 3, its fourth order: 4 * 3 + 2, which is its own.
        assert_eq!(last_issued(4, Some(3), Some(2)), 14);
        assert_eq!(shard_of_sequence(14, 3), 2);
        assert_eq!(
            (last_issued(4, None, None), last_issued(0, Some(3), Some(2))),
            (4, 0)
        );
    }

    #[test]
    fn order_ids_name_their_goods() {
        assert_eq!(goods_of_order("sku-1.3.17"), Some("sku-1"));
        assert_eq!(goods_of_order("a.b.c.2.5"), Some("a.b.c"));
        assert_eq!(goods_of_order("sku-1.x.17"), None);
        assert_eq!(goods_of_order(".1.2"), None);
        assert_eq!(goods_of_order("17"), None);
        assert_eq!(order_parts("a.b.2.5"), Some(("a.b", 2, 5)));
        assert_eq!(order_parts("g.1.99999999999999999999"), None);
    }
}
