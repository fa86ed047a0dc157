//! Seckill gate: a proxy-wasm HTTP filter for Envoy that decides at the edge who gets a unit
//! of stock. See README.md for the configuration and the per-request order.
//!
//! The decisions live in pure modules that unit-test natively (`config`, `route`, `input`,
//! `gcra`, `reply`, `local`, `batch`, `claims`, and the CAS loops of `shared`); `host` holds
//! the Envoy side (the root context of each worker and the per-request state machine),
//! written against one narrow `Host` interface so it unit-tests natively too, with a fake
//! host. Only the real host and the SDK's callbacks compile for wasm32 alone, because the
//! SDK's host imports cannot link into a native binary.

pub mod batch;
pub mod claims;
pub mod config;
pub mod gcra;
pub mod host;
pub mod input;
pub mod local;
pub mod reply;
pub mod route;
pub mod shared;

/// Names of the counters besides the per-outcome ones (`seckill.outcome.<name>`).
pub mod stat_names {
    /// Deduct calls dispatched (each carries a batch of attempts).
    pub const CALLOUT_SENT: &str = "seckill.callout.sent";
    /// Purchase attempts those calls carried.
    pub const CALLOUT_ATTEMPTS: &str = "seckill.callout.attempts";
    /// Attempts that got no usable answer (then the failure mode decides).
    pub const CALLOUT_FAILED: &str = "seckill.callout.failed";
    pub const SOLD_OUT_CACHE_HIT: &str = "seckill.soldout_cache.hit";
    pub const PASSTHROUGH: &str = "seckill.passthrough";
    pub const HEADERS_STRIPPED: &str = "seckill.headers_stripped";
    pub const RELEASE_SENT: &str = "seckill.release.sent";
    pub const RELEASE_FAILED: &str = "seckill.release.failed";
    /// Forwarded winners whose shop answer leaves it unknown whether the order was created
    /// (a timeout, a reset after the request was sent): the reservation is kept.
    pub const UPSTREAM_UNKNOWN: &str = "seckill.upstream.unknown";
    /// Requests answered `unknown_goods` from this worker's memory.
    pub const UNKNOWN_GOODS_CACHE_HIT: &str = "seckill.unknown_goods_cache.hit";
    /// Claim calls sent, and order ids they carried.
    pub const CLAIM_SENT: &str = "seckill.claim.sent";
    pub const CLAIM_IDS: &str = "seckill.claim.ids";
    /// Claim calls that failed as a whole (their ids are claimed again on the next tick).
    pub const CLAIM_FAILED: &str = "seckill.claim.failed";
    /// Order ids dropped unclaimed because too many waited (see `claims.rs`).
    pub const CLAIM_DROPPED: &str = "seckill.claim.dropped";
}

/// The syncer path that gives a failed winner's reservation back, or `None` for an order id
/// that has no business in a path (the syncer only issues `[A-Za-z0-9._:-]`).
pub fn release_path(order_id: &str) -> Option<String> {
    let safe = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-');
    (!order_id.is_empty() && order_id.bytes().all(safe))
        .then(|| format!("/v1/orders/{order_id}/release?reason=upstream_failed"))
}

/// What the shop's answer to a forwarded winner says about the order it was asked to create.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShopAnswer {
    /// The shop answered (anything but a 5xx): the order is the shop's to confirm or cancel.
    Answered,
    /// Definitely not created: the shop said so with a 5xx other than 504, or the request
    /// never reached it (no connection, no healthy host, circuit breaker). Release at once.
    NotCreated,
    /// Maybe created: a timeout (Envoy's 504, or a 504 from anyone), a reset or a closed
    /// connection after the request was sent, or nothing readable. Keep the reservation: the
    /// shop may hold the order; it ends by confirm, cancel or its payment window.
    Unknown,
}

/// Reads the shop's `:status` and Envoy's `response.code_details` for a forwarded winner.
/// Only a definite "not created" may release: releasing an order the shop did create puts
/// its units on sale a second time.
pub fn shop_answer(status: &[u8], code_details: Option<&[u8]>) -> ShopAnswer {
    let server_error =
        status.len() == 3 && status[0] == b'5' && status.iter().all(u8::is_ascii_digit);
    if !server_error {
        return ShopAnswer::Answered;
    }
    let Some(details) = code_details else {
        return ShopAnswer::Unknown;
    };
    let contains = |needle: &[u8]| details.windows(needle.len()).any(|w| w == needle);
    if details == b"via_upstream" {
        // The shop's own answer. A 504 is a gateway's timeout (a proxy in front of the shop):
        // the shop may have gone on and created the order.
        return if status == b"504" {
            ShopAnswer::Unknown
        } else {
            ShopAnswer::NotCreated
        };
    }
    // Envoy's own answer: only reasons that mean the request never left Envoy.
    let never_sent = contains(b"connection_failure")
        || details == b"no_healthy_upstream"
        || contains(b"{overflow}")
        || details == b"cluster_not_found"
        || details == b"maintenance_mode";
    if never_sent {
        ShopAnswer::NotCreated
    } else {
        ShopAnswer::Unknown
    }
}

/// Prefix of the one log line a refused configuration produces.
pub const BAD_CONFIG_LOG_PREFIX: &str = "seckill-filter: bad plugin configuration: ";

#[cfg(test)]
mod release_tests {
    use super::{shop_answer, ShopAnswer};

    #[test]
    fn failed_winners_are_released_by_order_id() {
        assert_eq!(
            super::release_path("sku-1.2.3").as_deref(),
            Some("/v1/orders/sku-1.2.3/release?reason=upstream_failed")
        );
        assert_eq!(super::release_path("a/../b"), None);
        assert_eq!(super::release_path(""), None);
    }

    #[test]
    fn only_a_definite_failure_releases() {
        let upstream = Some(&b"via_upstream"[..]);
        for status in [&b"200"[..], b"201", b"302", b"409", b"5xx", b"50"] {
            assert_eq!(shop_answer(status, upstream), ShopAnswer::Answered);
            assert_eq!(shop_answer(status, None), ShopAnswer::Answered);
        }
        // The shop's own 5xx: not created (its contract), except a gateway's 504.
        for status in [&b"500"[..], b"501", b"502", b"503"] {
            assert_eq!(shop_answer(status, upstream), ShopAnswer::NotCreated);
        }
        assert_eq!(shop_answer(b"504", upstream), ShopAnswer::Unknown);
        // Envoy's own answers: released only when the request never left Envoy.
        for details in [
            &b"upstream_reset_before_response_started{remote_connection_failure|delayed_connect_error:_111}"[..],
            b"upstream_reset_before_response_started{connection_failure}",
            b"upstream_reset_before_response_started{local_connection_failure}",
            b"no_healthy_upstream",
            b"upstream_reset_before_response_started{overflow}",
            b"cluster_not_found",
        ] {
            assert_eq!(shop_answer(b"503", Some(details)), ShopAnswer::NotCreated);
        }
        for details in [
            &b"upstream_response_timeout"[..],
            b"upstream_per_try_timeout",
            b"upstream_reset_before_response_started{remote_reset}",
            b"upstream_reset_before_response_started{connection_termination}",
            b"upstream_reset_before_response_started{local_reset}",
            b"something_new",
            b"",
        ] {
            assert_eq!(shop_answer(b"504", Some(details)), ShopAnswer::Unknown);
            assert_eq!(shop_answer(b"503", Some(details)), ShopAnswer::Unknown);
        }
        // Nothing readable: never release on a guess.
        assert_eq!(shop_answer(b"503", None), ShopAnswer::Unknown);
    }
}
