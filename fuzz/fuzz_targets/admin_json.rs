//! The syncer's admin API bodies, each read as the API reads it: a sale's definition
//! (`PUT /admin/sales/{goods_id}`: `SaleSpec`, then `Sale::new`), an addition of stock
//! (`POST .../add-stock`: `AddStock`, then `AddStock::check`) and a pause
//! (`POST .../pause`: `admin::Pause::from_json`, then `check_pause_retry_s`). The same bytes go
//! to all three.
//!
//! Checked: nothing panics; what is accepted is within every documented bound (so the stores
//! can hold it: MySQL's DATETIME range, Lua's exact integers) and reads back as itself; every
//! refusal of a well-formed body is a bounded, printable message. (A body that is not even the
//! right JSON is answered with serde's words, to the operator who sent it, and not logged.)

#![no_main]

use chrono::{DateTime, Utc};
use libfuzzer_sys::fuzz_target;
use seckill_api::{validate_id, ID_LEN_MAX};
use seckill_fuzz::assert_log_safe;
use seckill_model::admin::{self, AddStock, OPERATION_ID_LEN_MAX};
use seckill_model::sale::{
    window_bounds, Sale, SaleSpec, Tier, FLEET_RATE_MAX, PAUSE_RETRY_S_MAX, PAYMENT_WINDOW_S_MAX,
    PER_USER_LIMIT_MAX, SHARDS_MAX, SHARDS_MIN, TOTAL_STOCK_MAX,
};

fuzz_target!(|body: &[u8]| {
    sale_definition(body);
    add_stock(body);
    pause(body);
});

fn sale_definition(body: &[u8]) {
    let spec: SaleSpec = match serde_json::from_slice(body) {
        Ok(spec) => spec,
        Err(e) => return assert!(!e.to_string().is_empty()),
    };
    let encoded = serde_json::to_vec(&spec).expect("a spec encodes");
    let read: SaleSpec = serde_json::from_slice(&encoded).expect("and reads back");
    assert_eq!(read, spec);
    let sale = match Sale::new("sku-1", spec) {
        Ok(sale) => sale,
        Err(refused) => return assert_log_safe(&refused.to_string()),
    };
    assert!(sale.total_stock <= TOTAL_STOCK_MAX);
    assert!((1..=PER_USER_LIMIT_MAX).contains(&sale.per_user_limit));
    assert!((1..=PAYMENT_WINDOW_S_MAX).contains(&sale.payment_window_s));
    assert!(sale.starts_at < sale.ends_at);
    // MySQL's DATETIME range, written out here rather than taken from the code under test.
    let (datetime_min, datetime_max): (DateTime<Utc>, DateTime<Utc>) = (
        "1000-01-01T00:00:00Z".parse().unwrap(),
        "9999-12-31T23:59:59.999Z".parse().unwrap(),
    );
    assert_eq!(window_bounds(), (datetime_min, datetime_max));
    for at in [sale.starts_at, sale.ends_at] {
        assert!(
            (datetime_min..=datetime_max).contains(&at),
            "{at} is outside what MySQL's DATETIME holds"
        );
        // Redis and Lua keep times as ms in doubles: exact below 2^53.
        assert!(at.timestamp_millis().unsigned_abs() < 1 << 53);
    }
    if let Some(rate) = sale.fleet_rate {
        assert!(1 <= rate.burst && rate.burst <= rate.per_second);
        assert!(rate.per_second <= FLEET_RATE_MAX);
        assert_ne!(sale.tier, Tier::Db);
        let (interval_ms, tolerance_ms) = rate.gcra_ms();
        assert!(interval_ms.is_finite() && interval_ms > 0.0);
        assert!(tolerance_ms.is_finite() && tolerance_ms >= 0.0);
    }
    let shards = sale.shard_count();
    match sale.tier {
        Tier::RedisSharded => {
            assert!((SHARDS_MIN..=SHARDS_MAX).contains(&shards));
            assert!(sale.total_stock >= u64::from(shards));
        }
        _ => assert_eq!(sale.shards, None),
    }
    let encoded = serde_json::to_vec(&sale).expect("a sale encodes");
    let read: Sale = serde_json::from_slice(&encoded).expect("and reads back");
    assert_eq!(read, sale);
}

fn add_stock(body: &[u8]) {
    let request: AddStock = match serde_json::from_slice(body) {
        Ok(request) => request,
        Err(e) => return assert!(!e.to_string().is_empty()),
    };
    match request.check() {
        Ok(()) => {
            assert!((1..=TOTAL_STOCK_MAX).contains(&request.quantity));
            let id = &request.operation_id;
            assert_eq!(
                validate_id(id, OPERATION_ID_LEN_MAX.min(ID_LEN_MAX)),
                Ok(())
            );
        }
        Err(refused) => assert_log_safe(&refused),
    }
}

fn pause(body: &[u8]) {
    let pause = match admin::Pause::from_json(body) {
        Ok(pause) => pause,
        Err(refused) => return assert!(!refused.is_empty()),
    };
    let retry_after_s = pause.retry_after_s();
    match admin::check_pause_retry_s(retry_after_s) {
        Ok(()) => assert!((1..=PAUSE_RETRY_S_MAX).contains(&retry_after_s)),
        Err(refused) => assert_log_safe(&refused),
    }
}
