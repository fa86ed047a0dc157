//! The live sale dashboard: a page the syncer serves at `GET /dashboard` and the figures it
//! polls at `GET /dashboard/data`, for an operator watching a sale.
//!
//! Why it is built this way:
//! - The figures come from the syncer's own memory ([`Board`]): a [`sampler`] reads the stores
//!   once a second and the periodic reconcile hands over its report; a page that polls only
//!   copies them out. Ten open pages cost the stores nothing more than one.
//! - Memory is bounded: at most [`GOODS_MAX`] sales, each with a ring of [`HISTORY_MAX`]
//!   samples; a page asks for the samples after the last one it has (`?since=`).
//! - Guarded as `/metrics` is (`http.rs`): the page shows counters, never a buyer, an order
//!   id or a setting, so it takes the metrics credential (a browser prompts for it: Basic,
//!   with the credential as password) or lives on `--metrics-listen`. The credentials that
//!   deduct or change sales have no place in a browser.
//! - Nothing from outside: the page, its script and its style are compiled into the binary
//!   and a Content-Security-Policy keeps the browser from loading anything else.
//!
//! Answers per second are this syncer's own (the filter answers sold-out and rate-limited
//! buyers itself once it knows, and other syncers answer theirs): see the README.

mod history;
mod sampler;
mod tally;

pub use history::{Sample, Stock};
pub use sampler::Sampler;
pub use tally::{Answer, PerAnswer, Tally};

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

use crate::http::{AppError, AppState};
use crate::reconcile::Report;
use history::History;

/// Sales shown at most (the ones ending last): bounds the sampler's reads and the memory.
pub const GOODS_MAX: usize = 64;
/// How often the stores are read.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(1);
/// Samples kept per goods: five minutes at one a second.
pub const HISTORY_MAX: usize = 300;
/// Answers per second are averaged over this many sample intervals.
pub const RATE_WINDOW: usize = 5;

const PAGE: &str = include_str!("dashboard/page/index.html");
const SCRIPT: &str = include_str!("dashboard/page/app.js");
const STYLE: &str = include_str!("dashboard/page/app.css");
/// The page loads its own script and style and polls its own data; nothing else.
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
    style-src 'self'; connect-src 'self'; img-src 'self'; base-uri 'none'; \
    form-action 'none'; frame-ancestors 'none'";

/// A sale's definition as MySQL holds it.
#[derive(Debug, Clone, Serialize)]
pub struct Definition {
    pub tier: String,
    /// Who decides now: `redis`, `fallback` (MySQL) or `switching`.
    pub mode: String,
    pub shards: u32,
    pub starts_at_ms: i64,
    pub ends_at_ms: i64,
}

/// What the sampler read for one goods.
pub struct Reading {
    pub goods_id: String,
    pub definition: Definition,
    pub mysql: Option<Stock>,
    /// How long ago MySQL last changed the sale's row (MySQL's clock).
    pub written_ago_ms: Option<i64>,
    pub redis: Option<Stock>,
    pub outbox: Option<u64>,
    /// When the oldest event still in the outbox was written (Redis's clock).
    pub outbox_oldest_ms: Option<i64>,
}

/// The reconcile's figures for one goods.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct GoodsDrift {
    pub available: i64,
    pub reserved: i64,
    pub sold: i64,
    pub lapsed: i64,
    /// Sum of the differences' sizes: 0 when MySQL matches Redis.
    pub total: i64,
    /// Redis lost the sale while MySQL holds its orders.
    pub missing_from_redis: bool,
    /// Each store's own `total = available + reserved + sold + lapsed`.
    pub conserved: bool,
}

/// The last reconcile report, as the page shows it.
#[derive(Debug, Clone, Serialize)]
pub struct SyncView {
    /// When the figures below were taken.
    pub reconciled_at_ms: i64,
    /// When a later reconcile failed (the figures are older than they look).
    pub failed_at_ms: Option<i64>,
    /// Messages on the sale topic the writer has not committed (None: unreadable).
    pub kafka_lag: Option<i64>,
    pub dead_letters: Option<i64>,
    /// Nothing in flight: the drift is final.
    pub settled: bool,
    #[serde(skip)]
    goods: HashMap<String, GoodsDrift>,
}

/// When a store started failing the sampler; logged once when it starts and once when it ends.
#[derive(Debug, Default, Clone, Copy, Serialize)]
pub struct StoreHealth {
    pub failing_since_ms: Option<i64>,
}

impl StoreHealth {
    fn note(&mut self, store: &str, result: Result<(), String>, at_ms: i64) {
        match (result, self.failing_since_ms) {
            (Err(error), None) => {
                tracing::warn!(store, %error, "the dashboard cannot read a store");
                self.failing_since_ms = Some(at_ms);
            }
            (Ok(()), Some(_)) => {
                tracing::info!(store, "the dashboard reads the store again");
                self.failing_since_ms = None;
            }
            _ => {}
        }
    }
}

struct GoodsEntry {
    definition: Definition,
    written_ago_ms: Option<i64>,
    outbox_oldest_ms: Option<i64>,
    history: History,
}

#[derive(Default)]
struct Sheet {
    /// In the sampler's order (ending last first).
    order: Vec<String>,
    goods: HashMap<String, GoodsEntry>,
    mysql: StoreHealth,
    redis: StoreHealth,
    sync: Option<SyncView>,
}

/// What the page shows, kept by the syncer between polls.
pub struct Board {
    pub tally: Tally,
    sheet: Mutex<Sheet>,
}

impl Default for Board {
    fn default() -> Self {
        Board {
            tally: Tally::new(GOODS_MAX),
            sheet: Mutex::new(Sheet::default()),
        }
    }
}

impl Board {
    /// Takes one tick of the sampler: the listed goods replace the last list (a goods no
    /// longer listed is forgotten, history and all).
    pub fn record(
        &self,
        at_ms: i64,
        mut readings: Vec<Reading>,
        mysql: Result<(), String>,
        redis: Result<(), String>,
    ) {
        readings.truncate(GOODS_MAX);
        let listed: Vec<String> = readings.iter().map(|r| r.goods_id.clone()).collect();
        self.tally.keep_only(&listed);
        let Ok(mut sheet) = self.sheet.lock() else {
            return;
        };
        sheet.mysql.note("mysql", mysql, at_ms);
        sheet.redis.note("redis", redis, at_ms);
        sheet.goods.retain(|id, _| listed.contains(id));
        for reading in readings {
            let entry = sheet
                .goods
                .entry(reading.goods_id.clone())
                .or_insert_with(|| GoodsEntry {
                    definition: reading.definition.clone(),
                    written_ago_ms: None,
                    outbox_oldest_ms: None,
                    history: History::new(HISTORY_MAX),
                });
            entry.definition = reading.definition;
            entry.written_ago_ms = reading.written_ago_ms;
            entry.outbox_oldest_ms = reading.outbox_oldest_ms;
            entry.history.push(Sample {
                at_ms,
                redis: reading.redis,
                mysql: reading.mysql,
                outbox: reading.outbox,
                answers: self.tally.totals(&reading.goods_id),
            });
        }
        sheet.order = listed;
    }

    /// Takes a reconcile report (the periodic one: see `run_periodic_reconcile`).
    pub fn record_report(&self, at_ms: i64, report: &Report) {
        let Ok(mut sheet) = self.sheet.lock() else {
            return;
        };
        let goods = report
            .goods
            .iter()
            .filter(|g| sheet.goods.contains_key(&g.goods_id))
            .map(|g| {
                let drift = GoodsDrift {
                    available: g.drift.available,
                    reserved: g.drift.reserved,
                    sold: g.drift.sold,
                    lapsed: g.drift.lapsed,
                    total: g.drift.magnitude(),
                    missing_from_redis: g.missing_from_redis,
                    conserved: g.redis_conserved && g.mysql_conserved,
                };
                (g.goods_id.clone(), drift)
            })
            .collect();
        sheet.sync = Some(SyncView {
            reconciled_at_ms: at_ms,
            failed_at_ms: None,
            kafka_lag: report.kafka_lag,
            dead_letters: report.dead_letters,
            settled: report.settled,
            goods,
        });
    }

    /// A reconcile failed: the last figures stay, marked as older.
    pub fn record_report_failed(&self, at_ms: i64) {
        if let Ok(mut sheet) = self.sheet.lock() {
            if let Some(sync) = &mut sheet.sync {
                sync.failed_at_ms = Some(at_ms);
            }
        }
    }

    /// The page's figures, with the samples taken after `since_ms`.
    pub fn view(&self, now_ms: i64, since_ms: i64) -> View {
        let unlisted = self.tally.unlisted();
        let Ok(sheet) = self.sheet.lock() else {
            return View::empty(now_ms, unlisted);
        };
        let goods = sheet
            .order
            .iter()
            .filter_map(|id| {
                let entry = sheet.goods.get(id)?;
                let latest = entry.history.latest()?;
                Some(GoodsView {
                    goods_id: id.clone(),
                    definition: entry.definition.clone(),
                    redis: latest.redis,
                    mysql: latest.mysql,
                    outbox: latest.outbox,
                    outbox_oldest_age_ms: entry
                        .outbox_oldest_ms
                        .map(|at| (latest.at_ms - at).max(0)),
                    mysql_written_age_ms: entry.written_ago_ms,
                    drift: sheet.sync.as_ref().and_then(|s| s.goods.get(id).copied()),
                    answers: latest.answers,
                    answers_per_s: entry.history.rates(RATE_WINDOW),
                    history: entry.history.since(since_ms),
                })
            })
            .collect();
        View {
            now_ms,
            mysql: sheet.mysql,
            redis: sheet.redis,
            sync: sheet.sync.clone(),
            unlisted,
            goods,
            ..View::empty(now_ms, unlisted)
        }
    }
}

/// `GET /dashboard/data`.
#[derive(Debug, Serialize)]
pub struct View {
    pub now_ms: i64,
    pub sample_every_ms: u64,
    pub history_max: usize,
    pub goods_max: usize,
    pub rate_window_s: u64,
    pub mysql: StoreHealth,
    pub redis: StoreHealth,
    pub sync: Option<SyncView>,
    /// This syncer's answers for goods it does not list (unknown ids, goods past the cap).
    pub unlisted: PerAnswer<u64>,
    pub goods: Vec<GoodsView>,
}

impl View {
    fn empty(now_ms: i64, unlisted: PerAnswer<u64>) -> View {
        View {
            now_ms,
            sample_every_ms: SAMPLE_EVERY.as_millis() as u64,
            history_max: HISTORY_MAX,
            goods_max: GOODS_MAX,
            rate_window_s: SAMPLE_EVERY.as_secs() * RATE_WINDOW as u64,
            mysql: StoreHealth::default(),
            redis: StoreHealth::default(),
            sync: None,
            unlisted,
            goods: Vec::new(),
        }
    }
}

#[derive(Debug, Serialize)]
pub struct GoodsView {
    pub goods_id: String,
    #[serde(flatten)]
    pub definition: Definition,
    pub redis: Option<Stock>,
    pub mysql: Option<Stock>,
    pub outbox: Option<u64>,
    pub outbox_oldest_age_ms: Option<i64>,
    pub mysql_written_age_ms: Option<i64>,
    /// From the last reconcile (absent before the first, and for a db goods: one store).
    pub drift: Option<GoodsDrift>,
    /// This syncer's answers since it started.
    pub answers: PerAnswer<u64>,
    /// ... and per second over the last `rate_window_s`.
    pub answers_per_s: PerAnswer<f64>,
    pub history: Vec<Sample>,
}

/// The dashboard's routes, open like `/metrics` (see the module's comment).
pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/dashboard", get(page))
        .route("/dashboard/app.js", get(script))
        .route("/dashboard/app.css", get(style))
        .route("/dashboard/data", get(data))
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

async fn page() -> Response {
    asset("text/html; charset=utf-8", PAGE)
}

async fn script() -> Response {
    asset("text/javascript; charset=utf-8", SCRIPT)
}

async fn style() -> Response {
    asset("text/css; charset=utf-8", STYLE)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DataParams {
    /// Only the samples taken after this (ms): what the page does not have yet.
    #[serde(default)]
    since: Option<i64>,
}

async fn data(
    State(state): State<Arc<AppState>>,
    params: Result<Query<DataParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, AppError> {
    let Query(params) = params.map_err(|e| AppError::BadRequest(e.body_text()))?;
    let now_ms = chrono::Utc::now().timestamp_millis();
    let view = state.board.view(now_ms, params.since.unwrap_or(i64::MIN));
    Ok(([(header::CACHE_CONTROL, "no-store")], Json(view)).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reading(goods_id: &str, available: i64) -> Reading {
        let stock = Stock {
            total: 10,
            available,
            reserved: 10 - available,
            sold: 0,
            lapsed: 0,
        };
        Reading {
            goods_id: goods_id.into(),
            definition: Definition {
                tier: "redis".into(),
                mode: "redis".into(),
                shards: 1,
                starts_at_ms: 0,
                ends_at_ms: 1,
            },
            mysql: Some(stock),
            written_ago_ms: Some(5),
            redis: Some(stock),
            outbox: Some(0),
            outbox_oldest_ms: None,
        }
    }

    #[test]
    fn the_board_follows_the_list_and_pages_get_only_new_samples() {
        let board = Board::default();
        board.record(
            1_000,
            vec![reading("a", 9), reading("b", 10)],
            Ok(()),
            Ok(()),
        );
        board.record(2_000, vec![reading("a", 8)], Ok(()), Err("down".into()));
        let view = board.view(2_500, 1_000);
        assert_eq!(view.goods.len(), 1, "b left the list");
        let a = &view.goods[0];
        assert_eq!(a.redis.map(|s| s.available), Some(8));
        assert_eq!(a.history.len(), 1, "only the sample after since");
        assert_eq!(view.redis.failing_since_ms, Some(2_000));
        assert_eq!(board.view(2_500, i64::MIN).goods[0].history.len(), 2);
    }

    #[test]
    fn the_board_is_bounded() {
        let board = Board::default();
        let many: Vec<Reading> = (0..GOODS_MAX + 5)
            .map(|i| reading(&format!("g{i}"), 1))
            .collect();
        for tick in 0..HISTORY_MAX as i64 + 10 {
            let readings = many.iter().map(|r| reading(&r.goods_id, 1)).collect();
            board.record(tick * 1_000, readings, Ok(()), Ok(()));
        }
        let view = board.view(0, i64::MIN);
        assert!(view.goods.iter().all(|g| g.history.len() == HISTORY_MAX));
        assert_eq!(view.goods.len(), GOODS_MAX);
        assert!(
            (0..GOODS_MAX + 5)
                .filter(|i| board.tally.get(&format!("g{i}")).is_some())
                .count()
                <= GOODS_MAX
        );
    }
}
