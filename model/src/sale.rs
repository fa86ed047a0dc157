//! A sale's definition (kept in MySQL, the source of truth for what is on sale) and its live
//! state (kept in Redis, the source of truth for who won while the sale runs).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// Largest stock one sale may have. Keeps every counter far inside Lua's exact-integer range.
pub const TOTAL_STOCK_MAX: u64 = 1_000_000_000;
/// Largest per-user limit; a bigger one is no limit at all and hides a typo.
pub const PER_USER_LIMIT_MAX: u32 = 1_000_000;
/// Payment window bounds: a reservation lives this long before it is released.
pub const PAYMENT_WINDOW_S_MAX: u32 = 86_400;
pub const PAYMENT_WINDOW_S_DEFAULT: u32 = 900;
/// Longest goods id a sale may have: its order ids (`goods.epoch.sequence`) must fit the
/// id bound every other part checks.
pub const GOODS_ID_LEN_MAX: usize = 64;

/// The earliest and the latest instant a sale's window may name, ms since the epoch:
/// 1000-01-01T00:00:00Z and 9999-12-31T23:59:59.999Z, MySQL's DATETIME range (the window is
/// kept in `DATETIME(3)` columns). MySQL does not promise to keep a value outside it: MariaDB
/// saved a window ending in year +12026 and then could not give it back, and every read of the
/// sales table (the list of sales, the preheat) failed as a store fault.
pub const WINDOW_MS_MIN: i64 = -30_610_224_000_000;
pub const WINDOW_MS_MAX: i64 = 253_402_300_799_999;

/// [`WINDOW_MS_MIN`] and [`WINDOW_MS_MAX`] as instants.
pub fn window_bounds() -> (DateTime<Utc>, DateTime<Utc>) {
    let at = |ms| DateTime::from_timestamp_millis(ms).unwrap_or_default();
    (at(WINDOW_MS_MIN), at(WINDOW_MS_MAX))
}

fn default_payment_window_s() -> u32 {
    PAYMENT_WINDOW_S_DEFAULT
}

/// Who decides a goods' purchase attempts (the seed's tiers, by how hot the goods is).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Tier {
    /// Redis decides in one atomic script; the pipeline writes MySQL afterwards. For hot
    /// goods.
    #[default]
    Redis,
    /// MySQL alone decides, a batch of attempts per transaction (the fallback's code). For
    /// goods under a few thousand attempts a second: no Redis, no pipeline, nothing to drift.
    Db,
    /// Redis decides, and the winners' rows are written to MySQL before the answer.
    DualWrite,
    /// Redis decides, the stock split over `shards` keyspaces in different hash tags (so, on
    /// a Redis Cluster, on different masters): for one goods hotter than one Redis core
    /// (`shard.rs`).
    RedisSharded,
}

impl Tier {
    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Redis => "redis",
            Tier::Db => "db",
            Tier::DualWrite => "dual_write",
            Tier::RedisSharded => "redis_sharded",
        }
    }

    pub fn parse(text: &str) -> Option<Tier> {
        match text {
            "redis" => Some(Tier::Redis),
            "db" => Some(Tier::Db),
            "dual_write" => Some(Tier::DualWrite),
            "redis_sharded" => Some(Tier::RedisSharded),
            _ => None,
        }
    }
}

/// Shards a `redis_sharded` sale may have: at least two (one is the `redis` tier), at most
/// sixteen (an attempt whose buyer's shard is empty asks up to `shards - 1` others, and
/// reconcile and the admin API read every shard).
pub const SHARDS_MIN: u32 = 2;
pub const SHARDS_MAX: u32 = 16;

/// Largest fleet-wide attempt rate per goods (per second).
pub const FLEET_RATE_MAX: u32 = 1_000_000;

/// A goods' attempt rate for the whole fleet of gates, counted in Redis in the deduct call
/// (GCRA): `per_second` on average, up to `burst` at once. Each gate's own per-goods limit
/// (plugin configuration) stays the first line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetRate {
    pub per_second: u32,
    pub burst: u32,
}

impl FleetRate {
    /// GCRA's emission interval and burst tolerance, in ms (fractions kept: Lua computes in
    /// doubles).
    pub fn gcra_ms(self) -> (f64, f64) {
        let interval = 1_000.0 / f64::from(self.per_second.max(1));
        (interval, interval * f64::from(self.burst.max(1) - 1))
    }

    /// One shard's part of the rate (a `redis_sharded` goods' shards each enforce theirs).
    pub fn per_shard(self, shards: u32) -> FleetRate {
        let shards = shards.max(1);
        FleetRate {
            per_second: (self.per_second / shards).max(1),
            burst: (self.burst / shards).max(1),
        }
    }
}

/// What the admin API accepts to define a sale.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SaleSpec {
    pub total_stock: u64,
    pub per_user_limit: u32,
    pub starts_at: DateTime<Utc>,
    pub ends_at: DateTime<Utc>,
    /// Seconds a winner has to pay before the reservation is released (default 15 minutes).
    #[serde(default = "default_payment_window_s")]
    pub payment_window_s: u32,
    /// Who decides (default `redis`).
    #[serde(default)]
    pub tier: Tier,
    /// Attempts per second for the whole fleet of gates (none by default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fleet_rate: Option<FleetRate>,
    /// How many shards the stock is split over: required by the `redis_sharded` tier
    /// ([`SHARDS_MIN`]..=[`SHARDS_MAX`]), refused by the others.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shards: Option<u32>,
}

/// A defined sale: the spec plus its goods id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sale {
    pub goods_id: String,
    pub total_stock: u64,
    pub per_user_limit: u32,
    pub starts_at: DateTime<Utc>,
    pub ends_at: DateTime<Utc>,
    pub payment_window_s: u32,
    pub tier: Tier,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fleet_rate: Option<FleetRate>,
    /// Set for the `redis_sharded` tier only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shards: Option<u32>,
}

impl Sale {
    /// The shards the stock is split over: 1 for every tier but `redis_sharded`.
    pub fn shard_count(&self) -> u32 {
        self.shards.unwrap_or(1)
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SaleError {
    #[error("goods_id {0}")]
    GoodsId(seckill_api::IdError),
    #[error("total_stock must be at most {TOTAL_STOCK_MAX}")]
    StockTooLarge,
    #[error("per_user_limit must be from 1 to {PER_USER_LIMIT_MAX}")]
    PerUserLimit,
    #[error("ends_at must be after starts_at")]
    EmptyWindow,
    #[error("starts_at and ends_at must be from 1000-01-01T00:00:00Z to 9999-12-31T23:59:59.999Z")]
    WindowOutOfRange,
    #[error("payment_window_s must be from 1 to {PAYMENT_WINDOW_S_MAX}")]
    PaymentWindow,
    #[error("goods_id must be at most {GOODS_ID_LEN_MAX} bytes so that order ids stay short")]
    GoodsIdTooLong,
    #[error("fleet_rate.per_second must be from 1 to {FLEET_RATE_MAX}, and fleet_rate.burst from 1 to per_second")]
    FleetRate,
    #[error("fleet_rate is counted in Redis: a db-tier sale cannot have one")]
    FleetRateOnDb,
    #[error("the redis_sharded tier needs shards from {SHARDS_MIN} to {SHARDS_MAX}")]
    Shards,
    #[error("shards is set only for the redis_sharded tier")]
    ShardsOnUnsharded,
    #[error("total_stock must be at least shards, so that every shard starts with a unit")]
    StockBelowShards,
    #[error(
        "ends_at {ends_at} is not in the future: a sale that has already ended cannot be defined"
    )]
    AlreadyEnded { ends_at: DateTime<Utc> },
}

impl Sale {
    /// Validates a spec for a goods id; bad input gets a clear error and changes nothing.
    pub fn new(goods_id: &str, spec: SaleSpec) -> Result<Sale, SaleError> {
        seckill_api::validate_id(goods_id, seckill_api::ID_LEN_MAX).map_err(SaleError::GoodsId)?;
        if goods_id.len() > GOODS_ID_LEN_MAX {
            return Err(SaleError::GoodsIdTooLong);
        }
        if spec.payment_window_s == 0 || spec.payment_window_s > PAYMENT_WINDOW_S_MAX {
            return Err(SaleError::PaymentWindow);
        }
        if spec.total_stock > TOTAL_STOCK_MAX {
            return Err(SaleError::StockTooLarge);
        }
        if spec.per_user_limit == 0 || spec.per_user_limit > PER_USER_LIMIT_MAX {
            return Err(SaleError::PerUserLimit);
        }
        if spec.ends_at <= spec.starts_at {
            return Err(SaleError::EmptyWindow);
        }
        let (first, last) = window_bounds();
        if spec.starts_at < first || spec.ends_at > last {
            return Err(SaleError::WindowOutOfRange);
        }
        if let Some(rate) = spec.fleet_rate {
            let per_second_ok = (1..=FLEET_RATE_MAX).contains(&rate.per_second);
            if !per_second_ok || rate.burst == 0 || rate.burst > rate.per_second {
                return Err(SaleError::FleetRate);
            }
            if spec.tier == Tier::Db {
                return Err(SaleError::FleetRateOnDb);
            }
        }
        match (spec.tier, spec.shards) {
            (Tier::RedisSharded, Some(shards)) if (SHARDS_MIN..=SHARDS_MAX).contains(&shards) => {
                if spec.total_stock < u64::from(shards) {
                    return Err(SaleError::StockBelowShards);
                }
            }
            (Tier::RedisSharded, _) => return Err(SaleError::Shards),
            (_, Some(_)) => return Err(SaleError::ShardsOnUnsharded),
            (_, None) => {}
        }
        Ok(Sale {
            goods_id: goods_id.to_owned(),
            total_stock: spec.total_stock,
            per_user_limit: spec.per_user_limit,
            starts_at: spec.starts_at,
            ends_at: spec.ends_at,
            payment_window_s: spec.payment_window_s,
            tier: spec.tier,
            fleet_rate: spec.fleet_rate,
            shards: spec.shards,
        })
    }

    /// Refuses a definition whose window closed before `now`: nobody could ever buy, and
    /// saving it would start a new round (resetting MySQL's counters) for nothing.
    pub fn refuse_ended(&self, now: DateTime<Utc>) -> Result<(), SaleError> {
        if self.ends_at <= now {
            return Err(SaleError::AlreadyEnded {
                ends_at: self.ends_at,
            });
        }
        Ok(())
    }
}

/// Longest pause a buyer may be told to wait out (Retry-After), and the one told when the
/// operator names none: long enough that a crowd does not hammer a paused sale, short enough
/// that buyers come back soon after a resume.
pub const PAUSE_RETRY_S_MAX: u32 = 3_600;
pub const PAUSE_RETRY_S_DEFAULT: u32 = 10;

/// What an operator did to a sale (`control/`), as MySQL records it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Controls {
    /// When it was paused (None: not paused).
    pub paused_at: Option<DateTime<Utc>>,
    /// While paused: the Retry-After buyers are told, seconds.
    pub pause_retry_s: Option<u32>,
    /// When an operator stopped it (its `ends_at` moved there).
    pub stopped_at: Option<DateTime<Utc>>,
}

/// Where a sale stands, as an operator sees it (`sale list`, `GET /admin/sales`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SaleState {
    /// Defined, never preheated: buyers are told `unknown_goods`.
    Defined,
    /// Preheated, its window not open yet: `not_started`.
    Scheduled,
    Open,
    /// An operator paused it: `paused`, with Retry-After.
    Paused,
    /// Its window closed: `ended`.
    Ended,
    /// An operator stopped it (it ended then): `ended`.
    Stopped,
}

impl SaleState {
    pub fn as_str(self) -> &'static str {
        match self {
            SaleState::Defined => "defined",
            SaleState::Scheduled => "scheduled",
            SaleState::Open => "open",
            SaleState::Paused => "paused",
            SaleState::Ended => "ended",
            SaleState::Stopped => "stopped",
        }
    }
}

/// What a sale's state is made of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Standing {
    pub starts_at: DateTime<Utc>,
    pub ends_at: DateTime<Utc>,
    /// An epoch was handed out for it (a load into Redis, or a db sale's preheat).
    pub preheated: bool,
    pub paused: bool,
    pub stopped: bool,
}

impl Standing {
    /// The state at `now`. The end wins over a pause: an ended sale says so, as the deduct
    /// script answers `ended` before `paused`.
    pub fn state(&self, now: DateTime<Utc>) -> SaleState {
        if self.stopped {
            SaleState::Stopped
        } else if now >= self.ends_at {
            SaleState::Ended
        } else if !self.preheated {
            SaleState::Defined
        } else if self.paused {
            SaleState::Paused
        } else if now < self.starts_at {
            SaleState::Scheduled
        } else {
            SaleState::Open
        }
    }
}

impl Sale {
    /// The sale's state at `now` (see [`Standing::state`]).
    pub fn state(&self, now: DateTime<Utc>, preheated: bool, controls: &Controls) -> SaleState {
        let standing = Standing {
            starts_at: self.starts_at,
            ends_at: self.ends_at,
            preheated,
            paused: controls.paused_at.is_some(),
            stopped: controls.stopped_at.is_some(),
        };
        standing.state(now)
    }
}

/// The live counters of a preheated sale in Redis. `total = available + reserved + sold +
/// lapsed` holds after every script (promise 3); `lapsed` counts units whose reservation ended
/// after the sale closed (never sold, never for sale again) and is 0 while the sale is open.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LiveStock {
    pub total: u64,
    pub available: u64,
    pub reserved: u64,
    pub sold: u64,
    pub per_user_limit: u32,
    pub start_ms: i64,
    pub end_ms: i64,
    pub epoch: u64,
    pub lapsed: u64,
    pub window_ms: u64,
    /// While an operator paused the sale: the Retry-After buyers are told, ms (0: not paused).
    #[serde(default)]
    pub pause_retry_ms: u64,
}

impl LiveStock {
    pub fn is_conserved(&self) -> bool {
        self.available + self.reserved + self.sold + self.lapsed == self.total
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> SaleSpec {
        SaleSpec {
            total_stock: 100,
            per_user_limit: 1,
            starts_at: "2026-01-01T00:00:00Z".parse().unwrap(),
            ends_at: "2026-01-01T01:00:00Z".parse().unwrap(),
            payment_window_s: 60,
            tier: Tier::Redis,
            fleet_rate: None,
            shards: None,
        }
    }

    #[test]
    fn a_good_spec_is_accepted() {
        let sale = Sale::new("sku-1", spec()).unwrap();
        assert_eq!(sale.total_stock, 100);
    }

    #[test]
    fn bad_specs_are_refused_with_a_reason() {
        assert!(matches!(
            Sale::new("a b", spec()),
            Err(SaleError::GoodsId(_))
        ));
        let mut s = spec();
        s.total_stock = TOTAL_STOCK_MAX + 1;
        assert_eq!(Sale::new("g", s), Err(SaleError::StockTooLarge));
        let mut s = spec();
        s.per_user_limit = 0;
        assert_eq!(Sale::new("g", s), Err(SaleError::PerUserLimit));
        let mut s = spec();
        s.ends_at = s.starts_at;
        assert_eq!(Sale::new("g", s), Err(SaleError::EmptyWindow));
        let mut s = spec();
        s.payment_window_s = 0;
        assert_eq!(Sale::new("g", s), Err(SaleError::PaymentWindow));
        assert_eq!(
            Sale::new(&"g".repeat(65), spec()),
            Err(SaleError::GoodsIdTooLong)
        );
        for (per_second, burst) in [(0, 1), (10, 0), (10, 11), (FLEET_RATE_MAX + 1, 1)] {
            let mut s = spec();
            s.fleet_rate = Some(FleetRate { per_second, burst });
            assert_eq!(
                Sale::new("g", s),
                Err(SaleError::FleetRate),
                "{per_second}/{burst}"
            );
        }
        let mut s = spec();
        s.fleet_rate = Some(FleetRate {
            per_second: 100,
            burst: 10,
        });
        assert!(Sale::new("g", s.clone()).is_ok());
        s.tier = Tier::Db;
        assert_eq!(Sale::new("g", s), Err(SaleError::FleetRateOnDb));
    }

    /// Found by the fuzz target's check that an accepted definition can be stored
    /// (`fuzz/fuzz_targets/admin_json.rs`, seeds `sale_year_0999.json` and
    /// `sale_year_12026.json`): a window outside MySQL's DATETIME range was accepted and saved,
    /// and the sales table could not be read back.
    #[test]
    fn a_window_mysql_cannot_hold_is_refused() {
        let at = |t: &str| t.parse::<DateTime<Utc>>().unwrap();
        let (first, last) = window_bounds();
        assert_eq!(first, at("1000-01-01T00:00:00Z"));
        assert_eq!(last, at("9999-12-31T23:59:59.999Z"));
        let window = |starts_at: &str, ends_at: &str| {
            let mut s = spec();
            (s.starts_at, s.ends_at) = (at(starts_at), at(ends_at));
            Sale::new("g", s).map(|_| ())
        };
        assert_eq!(
            window("1000-01-01T00:00:00Z", "9999-12-31T23:59:59.999Z"),
            Ok(())
        );
        for (starts_at, ends_at) in [
            ("0999-12-31T23:59:59.999Z", "2026-01-01T00:00:00Z"),
            ("2026-01-01T00:00:00Z", "+12026-12-12T13:00:00Z"),
            // A fraction of a millisecond past the last one rounds into year 10000.
            ("2026-01-01T00:00:00Z", "9999-12-31T23:59:59.9995Z"),
            ("-0001-01-01T00:00:00Z", "2026-01-01T00:00:00Z"),
        ] {
            assert_eq!(
                window(starts_at, ends_at),
                Err(SaleError::WindowOutOfRange),
                "{starts_at} {ends_at}"
            );
        }
    }

    #[test]
    fn a_sale_that_already_ended_is_refused() {
        let sale = Sale::new("g", spec()).unwrap();
        let during: DateTime<Utc> = "2026-01-01T00:30:00Z".parse().unwrap();
        assert_eq!(sale.refuse_ended(during), Ok(()));
        for after in ["2026-01-01T01:00:00Z", "2027-01-01T00:00:00Z"] {
            let now: DateTime<Utc> = after.parse().unwrap();
            assert_eq!(
                sale.refuse_ended(now),
                Err(SaleError::AlreadyEnded {
                    ends_at: sale.ends_at
                })
            );
        }
        // Before it starts is fine: a sale is defined ahead of its window.
        let before: DateTime<Utc> = "2025-12-31T00:00:00Z".parse().unwrap();
        assert_eq!(sale.refuse_ended(before), Ok(()));
    }

    #[test]
    fn a_sales_state_follows_its_window_and_its_controls() {
        let sale = Sale::new("g", spec()).unwrap();
        let at = |t: &str| t.parse::<DateTime<Utc>>().unwrap();
        let (before, during, after) = (
            at("2025-12-31T23:00:00Z"),
            at("2026-01-01T00:30:00Z"),
            at("2026-01-01T02:00:00Z"),
        );
        let open = Controls::default();
        let paused = Controls {
            paused_at: Some(during),
            pause_retry_s: Some(10),
            stopped_at: None,
        };
        let stopped = Controls {
            stopped_at: Some(during),
            ..Controls::default()
        };
        assert_eq!(sale.state(during, false, &open), SaleState::Defined);
        assert_eq!(sale.state(before, true, &open), SaleState::Scheduled);
        assert_eq!(sale.state(during, true, &open), SaleState::Open);
        assert_eq!(sale.state(during, true, &paused), SaleState::Paused);
        assert_eq!(sale.state(before, true, &paused), SaleState::Paused);
        assert_eq!(sale.state(after, true, &paused), SaleState::Ended);
        assert_eq!(sale.state(after, true, &open), SaleState::Ended);
        assert_eq!(sale.state(during, true, &stopped), SaleState::Stopped);
        assert_eq!(sale.state(after, false, &stopped), SaleState::Stopped);
        assert_eq!(SaleState::Paused.as_str(), "paused");
        assert_eq!(
            serde_json::to_string(&SaleState::Stopped).unwrap(),
            "\"stopped\""
        );
    }

    #[test]
    fn shards_are_bounded_and_belong_to_the_sharded_tier() {
        let sharded = |shards: Option<u32>| {
            let mut s = spec();
            s.tier = Tier::RedisSharded;
            s.shards = shards;
            Sale::new("g", s)
        };
        assert_eq!(sharded(Some(3)).unwrap().shard_count(), 3);
        assert_eq!(sharded(Some(SHARDS_MAX)).unwrap().shard_count(), 16);
        for bad in [None, Some(0), Some(1), Some(SHARDS_MAX + 1)] {
            assert_eq!(sharded(bad), Err(SaleError::Shards), "{bad:?}");
        }
        let mut s = spec();
        s.shards = Some(3);
        assert_eq!(Sale::new("g", s), Err(SaleError::ShardsOnUnsharded));
        let mut s = spec();
        s.tier = Tier::RedisSharded;
        s.shards = Some(4);
        s.total_stock = 3;
        assert_eq!(Sale::new("g", s), Err(SaleError::StockBelowShards));
        assert_eq!(Tier::parse("redis_sharded"), Some(Tier::RedisSharded));
        assert_eq!(Sale::new("g", spec()).unwrap().shard_count(), 1);
    }

    #[test]
    fn gcra_takes_the_interval_and_the_burst_tolerance() {
        let rate = FleetRate {
            per_second: 200,
            burst: 11,
        };
        assert_eq!(rate.gcra_ms(), (5.0, 50.0));
    }

    #[test]
    fn unknown_fields_are_refused() {
        let json = r#"{"total_stock":1,"per_user_limit":1,"starts_at":"2026-01-01T00:00:00Z","ends_at":"2026-01-02T00:00:00Z","stock":5}"#;
        assert!(serde_json::from_str::<SaleSpec>(json).is_err());
    }
}
