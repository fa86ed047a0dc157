//! `seckill-syncer sale ...` (part of the binary, not of the library): an operator's sale
//! controls against MySQL and Redis directly, as `preheat` and `reseed` are, through the same
//! library functions as the admin API (`seckill_syncer::control`).

use std::io::Write as _;

use chrono::{DateTime, Duration as ChronoDuration, Utc};
use clap::{Args, Subcommand};
use seckill_syncer::control::{self, AddStock};
use seckill_syncer::db;
use seckill_syncer::keys::KeySpace;
use seckill_syncer::sale::{FleetRate, SaleSpec, Tier, PAUSE_RETRY_S_DEFAULT};

use super::StoreArgs;

#[derive(Args)]
pub struct SaleCommand {
    #[command(flatten)]
    stores: StoreArgs,
    /// Print the result as JSON (what the admin API answers).
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    action: SaleAction,
}

#[derive(Subcommand)]
enum SaleAction {
    /// Define (or redefine) a sale in MySQL; a sale whose end has passed is refused.
    Define(DefineArgs),
    /// List every sale with its state and counters (MySQL's, and Redis's live ones).
    List,
    /// Show one sale as MySQL and Redis hold it (always JSON).
    Status {
        /// Goods id of the sale.
        goods: String,
    },
    /// Pause a sale: buyers are told `paused` with Retry-After until it is resumed.
    Pause {
        /// Goods id of the sale.
        goods: String,
        /// Seconds buyers are told to wait (1 to 3600).
        #[arg(long, default_value_t = PAUSE_RETRY_S_DEFAULT)]
        retry_after_s: u32,
    },
    /// Resume a paused sale.
    Resume {
        /// Goods id of the sale.
        goods: String,
    },
    /// Stop a sale: it ends now (attempts are told `ended`; units released later lapse).
    Stop {
        /// Goods id of the sale.
        goods: String,
    },
    /// Add stock to a sale that has not ended: MySQL first, then Redis. The same
    /// --operation-id again adds nothing more (use it to retry a failed or unsure call).
    AddStock {
        /// Goods id of the sale.
        goods: String,
        /// Units to add (from 1; the sale's total stays at most 1000000000).
        #[arg(long)]
        quantity: u64,
        /// Names this addition (default: a new id, printed before anything changes).
        #[arg(long)]
        operation_id: Option<String>,
    },
}

/// A sale's definition on the command line (the admin API's `SaleSpec`).
#[derive(Args)]
struct DefineArgs {
    /// Goods id of the sale.
    goods: String,
    /// Units for sale (at most 1000000000).
    #[arg(long)]
    total_stock: u64,
    /// Units one buyer may hold.
    #[arg(long)]
    per_user_limit: u32,
    /// When the sale opens: RFC 3339 (2026-12-01T20:00:00Z), `now`, or `now+N` with a
    /// unit s, m, h or d (now+90s, now+2h).
    #[arg(long, value_parser = parse_time)]
    starts_at: DateTime<Utc>,
    /// When the sale ends (the same forms as --starts-at).
    #[arg(long, value_parser = parse_time)]
    ends_at: DateTime<Utc>,
    /// Seconds a winner has to pay before the reservation is released.
    #[arg(long, default_value_t = seckill_syncer::sale::PAYMENT_WINDOW_S_DEFAULT)]
    payment_window_s: u32,
    /// Who decides: redis, dual_write, redis_sharded or db.
    #[arg(long, default_value = "redis", value_parser = parse_tier)]
    tier: Tier,
    /// Shards the stock is split over (the redis_sharded tier only).
    #[arg(long)]
    shards: Option<u32>,
    /// Attempts per second for the whole fleet of gates (with --fleet-burst).
    #[arg(long, requires = "fleet_burst")]
    fleet_rate_per_s: Option<u32>,
    /// Attempts the fleet-wide rate lets through at once (with --fleet-rate-per-s).
    #[arg(long, requires = "fleet_rate_per_s")]
    fleet_burst: Option<u32>,
}

impl DefineArgs {
    fn spec(&self) -> SaleSpec {
        SaleSpec {
            total_stock: self.total_stock,
            per_user_limit: self.per_user_limit,
            starts_at: self.starts_at,
            ends_at: self.ends_at,
            payment_window_s: self.payment_window_s,
            tier: self.tier,
            fleet_rate: self
                .fleet_rate_per_s
                .zip(self.fleet_burst)
                .map(|(per_second, burst)| FleetRate { per_second, burst }),
            shards: self.shards,
        }
    }
}

/// Sales the `list` subcommand reads at most (pages of the library's largest page): bounds
/// the walk even on a database with very many sales.
const LIST_PAGES_MAX: usize = 100;

pub async fn run(command: SaleCommand) -> anyhow::Result<()> {
    let SaleCommand {
        stores,
        json,
        action,
    } = command;
    let mysql = db::connect(&stores.mysql_url).await?;
    // Without Redis the controls still reach a goods MySQL decides (db tier, or the fallback
    // while Redis is down): the command goes on, and says so.
    let redis = match seckill_syncer::connect_redis(&stores.redis_url).await {
        Ok(redis) => Some(redis),
        Err(e) => {
            eprintln!("warning: {e:#}; going on with MySQL alone");
            None
        }
    };
    let keys = KeySpace::new(stores.key_prefix);
    let stores = control::Stores {
        redis: redis.as_ref(),
        mysql: &mysql,
        keys: &keys,
    };
    let printed = match action {
        SaleAction::Define(define) => {
            let goods = &define.goods;
            let spec = define.spec();
            let (saved, sale) = control::define(stores, goods, spec, Utc::now()).await?;
            let verb = match saved {
                db::Saved::Created => "defined",
                db::Saved::Replaced => "redefined",
            };
            let line = format!(
                "{verb} {goods}: {} units, per-user limit {}, tier {}, from {} to {}",
                sale.total_stock,
                sale.per_user_limit,
                sale.tier.as_str(),
                sale.starts_at.to_rfc3339(),
                sale.ends_at.to_rfc3339()
            );
            (serde_json::to_value(&sale)?, line)
        }
        SaleAction::List => {
            let sales = list_all(stores).await?;
            let table = list_table(&sales);
            (serde_json::to_value(&sales)?, table)
        }
        SaleAction::Status { goods } => {
            let status = control::status(stores, &goods).await?;
            let text = serde_json::to_string_pretty(&status)?;
            (status, text)
        }
        SaleAction::Pause {
            goods,
            retry_after_s,
        } => controlled(control::pause(stores, &goods, retry_after_s).await?)?,
        SaleAction::Resume { goods } => controlled(control::resume(stores, &goods).await?)?,
        SaleAction::Stop { goods } => controlled(control::stop(stores, &goods).await?)?,
        SaleAction::AddStock {
            goods,
            quantity,
            operation_id,
        } => {
            let operation_id = operation_id.unwrap_or_else(new_operation_id);
            // Before anything changes: an operator whose call fails or hangs retries with it.
            eprintln!(
                "adding {quantity} units to {goods} as operation {operation_id} \
                 (to retry, pass --operation-id {operation_id})"
            );
            let request = AddStock {
                quantity,
                operation_id,
            };
            let added = control::add_stock(stores, &goods, &request).await?;
            let line = if added.added_now {
                format!(
                    "added {} units to {goods} (operation {}): total stock {}; redis {}",
                    added.quantity,
                    added.operation_id,
                    added.total_stock,
                    step_name(added.redis)
                )
            } else {
                format!(
                    "operation {} had added its {} units to {goods} already; nothing added \
                     again; redis {}",
                    added.operation_id,
                    added.quantity,
                    step_name(added.redis)
                )
            };
            (serde_json::to_value(&added)?, line)
        }
    };
    let (value, text) = printed;
    let text = if json {
        serde_json::to_string_pretty(&value)?
    } else {
        text
    };
    // A reader that went away (`| head`) is not this command's failure.
    match writeln!(std::io::stdout().lock(), "{text}") {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}

/// Every sale, page after page (at most [`LIST_PAGES_MAX`] pages).
async fn list_all(stores: control::Stores<'_>) -> anyhow::Result<Vec<control::Listed>> {
    let mut sales = Vec::new();
    let mut after: Option<String> = None;
    for _ in 0..LIST_PAGES_MAX {
        let page = control::list(stores, after.as_deref(), db::LIST_PAGE_MAX).await?;
        sales.extend(page.sales);
        match page.next {
            Some(next) => after = Some(next),
            None => return Ok(sales),
        }
    }
    anyhow::bail!(
        "more than {} sales: list them a page at a time through the admin API \
         (GET /admin/sales?after=...)",
        LIST_PAGES_MAX * db::LIST_PAGE_MAX as usize
    )
}

fn list_table(sales: &[control::Listed]) -> String {
    let mut out = format!(
        "{:<24} {:<13} {:<10} {:>12} {:>28} {:>28}  {}",
        "goods",
        "tier",
        "state",
        "total",
        "mysql avail/resv/sold",
        "redis avail/resv/sold",
        "ends at"
    );
    for listed in sales {
        let stored = &listed.stored;
        let redis = match (&listed.live, &listed.live_error) {
            (Some(live), _) => format!("{}/{}/{}", live.available, live.reserved, live.sold),
            (None, Some(_)) => "unreadable".to_owned(),
            (None, None) => "-".to_owned(),
        };
        out.push_str(&format!(
            "\n{:<24} {:<13} {:<10} {:>12} {:>28} {:>28}  {}",
            stored.sale.goods_id,
            stored.sale.tier.as_str(),
            stored.state.as_str(),
            stored.sale.total_stock,
            format!("{}/{}/{}", stored.stock, stored.reserved, stored.sold),
            redis,
            stored.sale.ends_at.to_rfc3339()
        ));
    }
    out
}

fn controlled(done: control::Controlled) -> anyhow::Result<(serde_json::Value, String)> {
    let pause = done
        .pause_retry_s
        .map(|s| format!(" (buyers told to retry after {s} s)"))
        .unwrap_or_default();
    let line = format!(
        "{}: {}{pause}{}; redis {}",
        done.goods_id,
        done.state.as_str(),
        if done.changed { "" } else { " (unchanged)" },
        step_name(done.redis)
    );
    Ok((serde_json::to_value(&done)?, line))
}

fn step_name(step: control::RedisStep) -> &'static str {
    match step {
        control::RedisStep::Applied => "applied",
        control::RedisStep::NotNeeded => "not needed (MySQL decides, or nothing loaded yet)",
    }
}

/// A new operation id: this host's clock in ms and this process's id, unique enough for an
/// operator's hand-made additions (a retry passes the printed one).
fn new_operation_id() -> String {
    format!(
        "add-{}-{}",
        Utc::now().timestamp_millis(),
        std::process::id()
    )
}

fn parse_tier(text: &str) -> Result<Tier, String> {
    Tier::parse(text).ok_or_else(|| {
        format!("unknown tier {text:?}: one of redis, dual_write, redis_sharded, db")
    })
}

/// RFC 3339, `now`, or `now+N<s|m|h|d>`.
fn parse_time(text: &str) -> Result<DateTime<Utc>, String> {
    parse_time_at(text, Utc::now())
}

fn parse_time_at(text: &str, now: DateTime<Utc>) -> Result<DateTime<Utc>, String> {
    let bad = || {
        format!("{text:?} is not RFC 3339 (2026-12-01T20:00:00Z), now, or now+N with s, m, h or d")
    };
    if text == "now" {
        return Ok(now);
    }
    if let Some(offset) = text.strip_prefix("now+") {
        let (digits, unit) = offset.split_at(offset.len().saturating_sub(1));
        let n = i64::from(digits.parse::<u32>().map_err(|_| bad())?);
        let seconds = match unit {
            "s" => Some(n),
            "m" => n.checked_mul(60),
            "h" => n.checked_mul(3_600),
            "d" => n.checked_mul(86_400),
            _ => None,
        }
        .ok_or_else(bad)?;
        let delta = ChronoDuration::try_seconds(seconds).ok_or_else(bad)?;
        return now.checked_add_signed(delta).ok_or_else(bad);
    }
    DateTime::parse_from_rfc3339(text)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|_| bad())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_rfc3339_or_relative_to_now() {
        let now: DateTime<Utc> = "2026-12-01T20:00:00Z".parse().unwrap();
        let at = |t: &str| parse_time_at(t, now);
        assert_eq!(at("now"), Ok(now));
        assert_eq!(at("now+90s").unwrap(), now + ChronoDuration::seconds(90));
        assert_eq!(at("now+2h").unwrap(), now + ChronoDuration::hours(2));
        assert_eq!(at("now+1d").unwrap(), now + ChronoDuration::days(1));
        assert_eq!(
            at("2026-12-02T08:00:00+08:00").unwrap(),
            "2026-12-02T00:00:00Z".parse::<DateTime<Utc>>().unwrap()
        );
        for bad in [
            "",
            "soon",
            "now+",
            "now+5",
            "now+-5s",
            "now+5w",
            "now+99999999999999d",
            "2026-12-01",
        ] {
            assert!(at(bad).is_err(), "{bad}");
        }
    }
}
