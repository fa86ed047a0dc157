//! The syncer's Prometheus metrics, described in one place.
//!
//! Every metric the syncer emits is listed in [`METRICS`] with its type, unit and help text:
//! [`install`] sets up the exporter (true histograms with buckets chosen per metric, not
//! summaries, so a fleet's latencies can be aggregated) and describes them all, so each
//! family has its `# HELP` line. The `register_*` functions start each component's counters at
//! zero with every label value they can take, so an alert or a `rate()` sees 0 before the first
//! event rather than nothing. Call sites emit with the `metrics` macros under the names listed
//! here; a unit test fails when a name is emitted without being listed.

use std::collections::BTreeMap;

use metrics::Unit;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// How a metric is exposed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// One metric family: its name, type, unit and help text.
#[derive(Debug, Clone, Copy)]
pub struct Metric {
    pub name: &'static str,
    pub kind: Kind,
    pub unit: Unit,
    pub help: &'static str,
}

const fn counter(name: &'static str, help: &'static str) -> Metric {
    Metric {
        name,
        kind: Kind::Counter,
        unit: Unit::Count,
        help,
    }
}

const fn gauge(name: &'static str, help: &'static str) -> Metric {
    Metric {
        name,
        kind: Kind::Gauge,
        unit: Unit::Count,
        help,
    }
}

const fn seconds(name: &'static str, help: &'static str) -> Metric {
    Metric {
        name,
        kind: Kind::Histogram,
        unit: Unit::Seconds,
        help,
    }
}

const fn sizes(name: &'static str, help: &'static str) -> Metric {
    Metric {
        name,
        kind: Kind::Histogram,
        unit: Unit::Count,
        help,
    }
}

/// Counter of sale events whose order id MySQL holds for another purchase.
pub const CONFLICTS: &str = "seckill_writer_conflicts_total";
/// Per-goods gauge of Redis's counters, one series per `state`.
pub const REDIS_STOCK: &str = "seckill_redis_stock";
/// Per-goods gauge of outbox entries not yet confirmed by Kafka.
pub const OUTBOX_LENGTH: &str = "seckill_outbox_length";
/// Per-partition gauge of the writer's uncommitted messages.
pub const CONSUMER_LAG: &str = "seckill_consumer_lag";
/// Histogram of the time from an order's reservation in Redis to its row in MySQL.
pub const DEDUCT_TO_MYSQL: &str = "seckill_deduct_to_mysql_seconds";
const DEDUCT_DURATION: &str = "seckill_deduct_duration_seconds";
const DEDUCT_BATCH_ATTEMPTS: &str = "seckill_deduct_batch_attempts";
const WRITER_BATCH_DURATION: &str = "seckill_writer_batch_duration_seconds";
const WRITER_BATCH_EVENTS: &str = "seckill_writer_batch_events";
const BUILD_INFO: &str = "seckill_build_info";

/// Every metric the syncer emits.
pub const METRICS: &[Metric] = &[
    // The deduct endpoint.
    counter(
        "seckill_deduct_total",
        "Purchase attempts answered, by outcome (won, sold_out, ...)",
    ),
    counter(
        "seckill_deduct_errors_total",
        "Purchase attempts not answered with an outcome, by kind (bad_request, overloaded, \
         too_late: past the caller's deadline, not_replicated, redis)",
    ),
    seconds(
        DEDUCT_DURATION,
        "Time from a purchase attempt's arrival to its answer",
    ),
    sizes(
        DEDUCT_BATCH_ATTEMPTS,
        "Purchase attempts decided together in one batch",
    ),
    counter(
        "seckill_claims_total",
        "Order ids the gate claimed after forwarding them, by result (claimed, late: the \
         reservation had ended, failed)",
    ),
    counter(
        "seckill_settlements_total",
        "Confirm and release calls, by action and result (changed, repeated)",
    ),
    counter(
        "seckill_unauthorized_total",
        "Calls refused for a missing or wrong credential, by the role the call needs",
    ),
    counter(
        "seckill_credential_reloads_total",
        "Re-reads of --secrets-dir that changed the credentials (applied) or were refused",
    ),
    counter(
        "seckill_durability_waits_total",
        "Script calls whose WAIT reached the replicas --redis-durability replicas:N asks \
         (result=ok) or did not before the deadline (result=short: the callers got 503)",
    ),
    // The reservation lifecycle.
    counter(
        "seckill_reservations_expired_total",
        "Reservations released by the sweeper because their payment or claim window passed",
    ),
    counter("seckill_sweeper_errors_total", "Sweeper passes that failed"),
    counter(
        "seckill_shard_units_moved_total",
        "Units moved between the shards of a redis_sharded goods",
    ),
    counter(
        "seckill_shard_moves_completed_total",
        "Moves of units between shards cut short and completed by the sweeper",
    ),
    // The MySQL fallback.
    gauge(
        "seckill_breaker_open",
        "1 while the Redis breaker is open (Redis failed calls in a row), else 0",
    ),
    counter(
        "seckill_fallback_entered_total",
        "Goods moved to MySQL decisions, by why (redis_down, forgot, reissued)",
    ),
    counter(
        "seckill_redis_forgot_total",
        "Goods Redis forgot or re-issued order ids for, by why (forgot, reissued)",
    ),
    counter(
        "seckill_fallback_exited_total",
        "Goods re-seeded into Redis after MySQL decided them",
    ),
    counter(
        "seckill_fallback_refused_total",
        "Purchase attempts refused with 503 over the fallback's rate",
    ),
    counter(
        "seckill_fallback_decisions_total",
        "Purchase attempts MySQL decided during the fallback, by outcome",
    ),
    counter(
        "seckill_redis_lost_orders_total",
        "Orders a Redis answered won and then forgot before they reached MySQL",
    ),
    // The relay.
    gauge(
        OUTBOX_LENGTH,
        "Sale events in a goods' Redis outbox not yet confirmed by Kafka",
    ),
    counter(
        "seckill_relay_published_total",
        "Sale events delivered to Kafka and removed from their outbox",
    ),
    gauge(
        "seckill_fast_path_sold_out",
        "What the fast-path switch last read for each goods: 1 sold out (Envoy's route answers), 0 the filter decides",
    ),
    counter(
        "seckill_fast_path_updates_total",
        "Runtime-key updates the fast-path switch made on an Envoy",
    ),
    counter(
        "seckill_fast_path_envoy_errors_total",
        "Runtime-key updates the fast-path switch could not make on an Envoy (it keeps what it last had)",
    ),
    counter(
        "seckill_relay_errors_total",
        "Relay passes that failed (retried with backoff)",
    ),
    counter(
        "seckill_relay_groups_recreated_total",
        "Outbox consumer groups re-created after Redis lost them",
    ),
    counter(
        "seckill_dead_letters_total",
        "Messages sent to the dead-letter topic, by source (outbox: an entry without an \
         event; kafka: an event the writer could not parse or apply)",
    ),
    // The writer.
    gauge(
        CONSUMER_LAG,
        "Messages in a partition of the sale topic after the writer's committed offset (not \
         yet durably in MySQL)",
    ),
    sizes(
        WRITER_BATCH_EVENTS,
        "Sale events applied to MySQL in one transaction",
    ),
    seconds(
        WRITER_BATCH_DURATION,
        "Time to apply one batch of sale events to MySQL (and publish its dead letters)",
    ),
    seconds(
        DEDUCT_TO_MYSQL,
        "Time from an order's reservation in Redis (its event's at_ms, Redis's clock) to its \
         row committed in MySQL (this host's clock)",
    ),
    counter("seckill_writer_orders_total", "Orders inserted into MySQL"),
    counter(
        "seckill_writer_transitions_total",
        "Orders moved from reserved to confirmed or released in MySQL",
    ),
    counter(
        "seckill_writer_duplicates_total",
        "Sale events MySQL already had (redelivered): changed nothing",
    ),
    counter(
        CONFLICTS,
        "Sale events whose order id MySQL holds for another buyer, request id or quantity \
         (an order id issued twice): dead-lettered, never applied",
    ),
    counter(
        "seckill_writer_errors_total",
        "Batches MySQL or Kafka failed to take (retried with backoff, offsets not committed)",
    ),
    // The periodic reconcile (serve --pipeline).
    gauge(
        REDIS_STOCK,
        "A goods' units in Redis by state (available, reserved, sold, lapsed); their sum is \
         the sale's total stock",
    ),
    gauge(
        "seckill_reconcile_drift",
        "Units MySQL differs by from Redis once in-flight events land, per goods (0 at rest)",
    ),
    gauge(
        "seckill_reconcile_missing_from_redis",
        "1 for a goods MySQL has orders of and Redis has no sale for (Redis forgot it)",
    ),
    gauge(
        "seckill_reconcile_settled",
        "1 when nothing was in flight at the last reconcile: its drift figures are final",
    ),
    gauge(
        "seckill_reconcile_dead_letters",
        "Messages in the dead-letter topic at the last reconcile (-1: could not be read)",
    ),
    gauge(
        "seckill_reconcile_clean",
        "1 when the last reconcile found no drift, no forgotten goods and no dead letter",
    ),
    counter(
        "seckill_forgotten_reservations_total",
        "MySQL reservations Redis forgot, by outcome (expired, lapsed, deferred)",
    ),
    counter(
        "seckill_forgotten_sweep_passes_total",
        "Passes of the MySQL sweep of reservations Redis forgot",
    ),
    counter(
        "seckill_forgotten_sweep_errors_total",
        "Passes of the MySQL sweep of reservations Redis forgot that failed",
    ),
    gauge(
        BUILD_INFO,
        "Always 1; the labels name the running syncer's version",
    ),
];

/// Latency buckets, in seconds, for a deduct: a Redis round trip is a fraction of a
/// millisecond when all is well; a queue behind a slow Redis shows up in the 10 ms to 1 s
/// range; the callers give up after a few seconds.
const DEDUCT_SECONDS: &[f64] = &[
    0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];
/// One MySQL transaction of up to a few thousand events.
const BATCH_SECONDS: &[f64] = &[
    0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// Reservation to MySQL: the relay, the broker and a batch wait in the normal case (tens of
/// milliseconds); minutes while MySQL or the broker is away and the backlog waits.
const DEDUCT_TO_MYSQL_SECONDS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
];
/// Attempts per deduct batch, up to [`crate::deduct::BATCH_ATTEMPTS_MAX`].
const BATCH_ATTEMPTS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0];
/// Events per writer batch, up to the largest `--batch-size`.
const BATCH_EVENTS: &[f64] = &[
    1.0, 10.0, 50.0, 100.0, 250.0, 500.0, 1_000.0, 2_500.0, 5_000.0, 10_000.0,
];

/// Goods that get series of their own in the per-goods gauges: bounds the scrape (and the
/// time series a monitoring system keeps) however many sales the sales index holds. Goods
/// that need attention come first ([`per_goods`]).
pub const GOODS_SERIES_MAX: usize = 1_000;

/// Installs the Prometheus recorder for this process, describes every metric and sets the
/// build info. Returns the handle that renders `/metrics`.
pub fn install() -> anyhow::Result<PrometheusHandle> {
    let bucketed = [
        (DEDUCT_DURATION, DEDUCT_SECONDS),
        (WRITER_BATCH_DURATION, BATCH_SECONDS),
        (DEDUCT_TO_MYSQL, DEDUCT_TO_MYSQL_SECONDS),
        (DEDUCT_BATCH_ATTEMPTS, BATCH_ATTEMPTS),
        (WRITER_BATCH_EVENTS, BATCH_EVENTS),
    ];
    // Default buckets too, so that no histogram is ever rendered as a summary (a summary's
    // quantiles cannot be aggregated across replicas).
    let mut builder = PrometheusBuilder::new()
        .set_buckets(DEDUCT_SECONDS)
        .map_err(|e| anyhow::anyhow!("bad buckets: {e}"))?;
    for (name, buckets) in bucketed {
        builder = builder
            .set_buckets_for_metric(Matcher::Full(name.to_owned()), buckets)
            .map_err(|e| anyhow::anyhow!("bad buckets for {name}: {e}"))?;
    }
    let handle = builder
        .install_recorder()
        .map_err(|e| anyhow::anyhow!("cannot install the metrics recorder: {e}"))?;
    describe();
    metrics::gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    Ok(handle)
}

fn describe() {
    for metric in METRICS {
        match metric.kind {
            Kind::Counter => metrics::describe_counter!(metric.name, metric.unit, metric.help),
            Kind::Gauge => metrics::describe_gauge!(metric.name, metric.unit, metric.help),
            Kind::Histogram => {
                metrics::describe_histogram!(metric.name, metric.unit, metric.help)
            }
        }
    }
}

/// Starts `name` at zero for each of `values` of `label`.
fn zero_each(name: &'static str, label: &'static str, values: &[&'static str]) {
    for value in values {
        metrics::counter!(name, label => *value).increment(0);
    }
}

fn zero(names: &[&'static str]) {
    for name in names {
        metrics::counter!(*name).increment(0);
    }
}

/// The kinds of `seckill_deduct_errors_total` (see `http::decide`).
pub const DEDUCT_ERROR_KINDS: [&str; 5] = [
    "bad_request",
    "overloaded",
    "too_late",
    "not_replicated",
    "redis",
];

/// The HTTP service's metrics: deducts, settlements, the lifecycle, the fallback.
pub fn register_serve() {
    let outcomes: Vec<&'static str> = seckill_api::Outcome::ALL
        .iter()
        .map(|o| o.as_str())
        .collect();
    zero_each("seckill_deduct_total", "outcome", &outcomes);
    zero_each("seckill_fallback_decisions_total", "outcome", &outcomes);
    zero_each("seckill_deduct_errors_total", "kind", &DEDUCT_ERROR_KINDS);
    zero_each(
        "seckill_claims_total",
        "result",
        &["claimed", "late", "failed"],
    );
    for action in ["confirm", "release"] {
        for result in ["changed", "repeated"] {
            metrics::counter!("seckill_settlements_total", "action" => action, "result" => result)
                .increment(0);
        }
    }
    use crate::fallback::Why;
    for why in Why::ALL {
        metrics::counter!("seckill_fallback_entered_total", "why" => why.as_str()).increment(0);
        // Redis away is not Redis forgetting: never counted there.
        if why != Why::RedisDown {
            metrics::counter!("seckill_redis_forgot_total", "why" => why.as_str()).increment(0);
        }
    }
    // Under `none` and `aof` too (they stay 0): an alert on short waits needs no exception.
    zero_each("seckill_durability_waits_total", "result", &["ok", "short"]);
    zero_each(
        "seckill_unauthorized_total",
        "role",
        &["edge", "shop", "admin", "metrics"],
    );
    zero_each(
        "seckill_credential_reloads_total",
        "result",
        &["applied", "refused"],
    );
    zero(&[
        "seckill_reservations_expired_total",
        "seckill_sweeper_errors_total",
        "seckill_shard_units_moved_total",
        "seckill_shard_moves_completed_total",
        "seckill_fallback_exited_total",
        "seckill_fallback_refused_total",
        "seckill_redis_lost_orders_total",
    ]);
    metrics::gauge!("seckill_breaker_open").set(0.0);
    // Registered, so that their (empty) buckets are there before the first deduct.
    let _ = metrics::histogram!(DEDUCT_DURATION);
    let _ = metrics::histogram!(DEDUCT_BATCH_ATTEMPTS);
}

/// The relay's metrics.
pub fn register_relay() {
    zero(&[
        "seckill_relay_published_total",
        "seckill_relay_errors_total",
        "seckill_relay_groups_recreated_total",
    ]);
    zero_each("seckill_dead_letters_total", "source", &["outbox"]);
}

/// The writer's metrics.
pub fn register_writer() {
    zero(&[
        "seckill_writer_orders_total",
        "seckill_writer_transitions_total",
        "seckill_writer_duplicates_total",
        "seckill_writer_errors_total",
        CONFLICTS,
    ]);
    zero_each("seckill_dead_letters_total", "source", &["kafka"]);
    let _ = metrics::histogram!(WRITER_BATCH_EVENTS);
    let _ = metrics::histogram!(WRITER_BATCH_DURATION);
    let _ = metrics::histogram!(DEDUCT_TO_MYSQL);
}

/// The fast-path switch's metrics: at zero from the start, so that the first failed update
/// shows as an increase to the alert that watches it.
pub fn register_fast_path() {
    zero(&[
        "seckill_fast_path_updates_total",
        "seckill_fast_path_envoy_errors_total",
    ]);
}

/// The periodic reconcile's and the forgotten-reservation sweep's metrics.
pub fn register_reconcile() {
    zero(&[
        "seckill_forgotten_sweep_passes_total",
        "seckill_forgotten_sweep_errors_total",
    ]);
    zero_each(
        "seckill_forgotten_reservations_total",
        "outcome",
        &["expired", "lapsed", "deferred"],
    );
}

/// Picks the goods that get per-goods series, at most [`GOODS_SERIES_MAX`]: those that
/// `needs_attention` says first (an open sale, something in flight, drift), then the rest, each
/// group in its given order.
pub fn per_goods<T>(goods: &[T], needs_attention: impl Fn(&T) -> bool) -> Vec<&T> {
    let (first, rest): (Vec<&T>, Vec<&T>) = goods.iter().partition(|g| needs_attention(g));
    let left_out = goods.len().saturating_sub(GOODS_SERIES_MAX);
    // Once per process: the callers run every second or so.
    static WARNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if left_out > 0 && !WARNED.swap(true, std::sync::atomic::Ordering::Relaxed) {
        tracing::warn!(
            goods = goods.len(),
            left_out,
            series_max = GOODS_SERIES_MAX,
            "more goods than per-goods metric series: the quietest are left out"
        );
    }
    first
        .into_iter()
        .chain(rest)
        .take(GOODS_SERIES_MAX)
        .collect()
}

/// Sums counts kept per key of the sales index (a `redis_sharded` goods' shards) per goods.
pub fn by_goods<'a>(counts: impl IntoIterator<Item = (&'a str, u64)>) -> BTreeMap<String, u64> {
    let mut summed = BTreeMap::new();
    for (key_id, count) in counts {
        *summed
            .entry(crate::keys::base_goods(key_id).to_owned())
            .or_insert(0) += count;
    }
    summed
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn every_metric_is_listed_once_with_help() {
        let mut names = HashSet::new();
        for metric in METRICS {
            assert!(names.insert(metric.name), "{} listed twice", metric.name);
            assert!(!metric.help.is_empty(), "{} has no help", metric.name);
            assert_eq!(
                metric.kind == Kind::Counter,
                metric.name.ends_with("_total"),
                "{}: counters and only counters end in _total",
                metric.name
            );
        }
    }

    /// Every `seckill_*` name the syncer's code emits through a `metrics` macro is in
    /// [`METRICS`]: a metric added without a description fails here, not on a dashboard.
    #[test]
    fn every_emitted_metric_is_described() {
        let listed: HashSet<&str> = METRICS.iter().map(|m| m.name).collect();
        let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut files = vec![src];
        let mut emitted = Vec::new();
        while let Some(path) = files.pop() {
            if path.is_dir() {
                for entry in std::fs::read_dir(&path).expect("syncer/src is readable") {
                    files.push(entry.expect("a directory entry").path());
                }
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let text = std::fs::read_to_string(&path).expect("a source file is readable");
            for macro_name in ["counter!(", "gauge!(", "histogram!("] {
                for (at, _) in text.match_indices(macro_name) {
                    let rest = text[at + macro_name.len()..].trim_start();
                    if let Some(name) = rest
                        .strip_prefix('"')
                        .and_then(|r| r.split('"').next())
                        .filter(|n| n.starts_with("seckill_"))
                    {
                        emitted.push((name.to_owned(), path.display().to_string()));
                    }
                }
            }
        }
        assert!(emitted.len() > 20, "the scan found the call sites");
        for (name, file) in emitted {
            assert!(
                listed.contains(name.as_str()),
                "{name} ({file}) is not in METRICS"
            );
        }
    }

    #[test]
    fn every_deduct_error_kind_is_started_at_zero() {
        use crate::deduct::DeductError;
        let errors = [
            DeductError::BadRequest(String::new()),
            DeductError::Timeout,
            DeductError::TooLate,
            DeductError::Overloaded,
            DeductError::Redis(String::new()),
            DeductError::BadScriptReply(String::new()),
            DeductError::NotReplicated {
                acked: 0,
                wanted: 1,
            },
            DeductError::Stopped,
            DeductError::FallbackOverloaded,
            DeductError::Mysql(String::new()),
            DeductError::Switching,
            DeductError::Forgot(String::new()),
            DeductError::Rebalancing,
        ];
        for error in errors {
            assert!(
                DEDUCT_ERROR_KINDS.contains(&error.metric_kind()),
                "{error:?}"
            );
        }
    }

    #[test]
    fn bucket_bounds_rise() {
        for buckets in [
            DEDUCT_SECONDS,
            BATCH_SECONDS,
            DEDUCT_TO_MYSQL_SECONDS,
            BATCH_ATTEMPTS,
            BATCH_EVENTS,
        ] {
            assert!(buckets.windows(2).all(|w| w[0] < w[1]), "{buckets:?}");
        }
        assert_eq!(
            BATCH_ATTEMPTS.last().copied(),
            Some(crate::deduct::BATCH_ATTEMPTS_MAX as f64)
        );
    }

    #[test]
    fn goods_that_need_attention_come_first_and_the_count_is_bounded() {
        let goods: Vec<usize> = (0..GOODS_SERIES_MAX + 10).collect();
        let picked = per_goods(&goods, |g| *g >= GOODS_SERIES_MAX);
        assert_eq!(picked.len(), GOODS_SERIES_MAX);
        assert_eq!(*picked[0], GOODS_SERIES_MAX);
        assert_eq!(*picked[9], GOODS_SERIES_MAX + 9);
        assert_eq!(*picked[10], 0);
    }

    #[test]
    fn shards_are_summed_per_goods() {
        let summed = by_goods([("a", 1), ("b~0", 2), ("b~1", 3)]);
        assert_eq!(summed.get("a"), Some(&1));
        assert_eq!(summed.get("b"), Some(&5));
        assert_eq!(summed.len(), 2);
    }
}
