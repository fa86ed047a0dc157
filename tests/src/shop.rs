//! A stub shop API (the upstream behind Envoy) that records every request it receives, so a
//! test can check that only winners got through and what headers they carried.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::IntoResponse;
use axum::Router;

use crate::served::Served;

/// One request as the shop saw it.
#[derive(Debug, Clone)]
pub struct SeenRequest {
    pub method: String,
    pub path: String,
    /// The status the shop answered with.
    pub status: u16,
    /// Every `x-seckill-*` header, name and value.
    pub gate_headers: Vec<(String, String)>,
    /// With [`ShopStub::probe_orders`]: the `orders.state` of the request's order id as MySQL
    /// had it when the request arrived, read before the shop answered (`Some(None)`: no row).
    /// `None` when not probed (no probe set, or no order id).
    pub row_at_receipt: Option<Option<String>>,
    /// The `authorization` header as the shop got it (the gate passes it through).
    pub authorization: Option<String>,
}

impl SeenRequest {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.gate_headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

struct Recorder {
    seen: Mutex<Vec<SeenRequest>>,
    /// The status every answer carries (200 unless a test makes the shop fail).
    status: AtomicU16,
    /// How long the shop takes to answer, in ms (0 unless a test makes it slow).
    delay_ms: AtomicU64,
    /// Buyers (`x-seckill-user-id`) the shop fails with 503 whatever `status` says.
    failing_users: Mutex<HashSet<String>>,
    /// Where to look up each order id on receipt (see [`SeenRequest::row_at_receipt`]).
    orders: Mutex<Option<sqlx::MySqlPool>>,
}

pub struct ShopStub {
    pub addr: SocketAddr,
    recorder: Arc<Recorder>,
    _served: Served,
}

impl ShopStub {
    /// Serves on a port the OS picks; answers every request `200 {"ok":true}`.
    pub async fn start() -> anyhow::Result<Self> {
        let recorder = Arc::new(Recorder {
            seen: Mutex::new(Vec::new()),
            status: AtomicU16::new(200),
            delay_ms: AtomicU64::new(0),
            failing_users: Mutex::new(HashSet::new()),
            orders: Mutex::new(None),
        });
        let app = Router::new().fallback(record).with_state(recorder.clone());
        let served = Served::start(app).await?;
        Ok(Self {
            addr: served.addr,
            recorder,
            _served: served,
        })
    }

    /// Makes every later answer carry this status (say 503, a failing shop).
    pub fn set_status(&self, status: u16) {
        self.recorder.status.store(status, Ordering::Relaxed);
    }

    /// Makes every later answer wait this long (a shop slower than the route timeout). The
    /// request is recorded when it arrives, before the wait.
    pub fn set_delay(&self, delay: Duration) {
        let ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
        self.recorder.delay_ms.store(ms, Ordering::Relaxed);
    }

    /// Makes the shop fail these buyers (by `x-seckill-user-id`) with 503 from now on, and
    /// answer everyone else with the common status: a shop that fails some orders.
    pub fn set_failing_users(&self, users: &[&str]) {
        if let Ok(mut failing) = self.recorder.failing_users.lock() {
            *failing = users.iter().map(|u| (*u).to_owned()).collect();
        }
    }

    /// From now on, looks up every arriving order id in this database's `orders` table before
    /// answering, and records what it found in [`SeenRequest::row_at_receipt`]: proof that
    /// the order row existed when the shop got the winner (or that it did not).
    pub fn probe_orders(&self, pool: sqlx::MySqlPool) {
        if let Ok(mut orders) = self.recorder.orders.lock() {
            *orders = Some(pool);
        }
    }

    /// Order ids the shop answered with a 2xx, in arrival order (repeats included).
    pub fn accepted_order_ids(&self) -> Vec<String> {
        self.seen()
            .into_iter()
            .filter(|r| (200..300).contains(&r.status))
            .filter_map(|r| r.header(seckill_api::ORDER_ID_HEADER).map(str::to_owned))
            .collect()
    }

    pub fn seen(&self) -> Vec<SeenRequest> {
        self.recorder
            .seen
            .lock()
            .map(|seen| seen.clone())
            .unwrap_or_default()
    }
}

async fn record(
    State(recorder): State<Arc<Recorder>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> impl IntoResponse {
    let failing = headers
        .get(seckill_api::USER_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|user| {
            recorder
                .failing_users
                .lock()
                .is_ok_and(|failing| failing.contains(user))
        });
    let status = if failing {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::from_u16(recorder.status.load(Ordering::Relaxed))
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    };
    let gate_headers: Vec<(String, String)> = headers
        .iter()
        .filter(|(name, _)| name.as_str().starts_with(seckill_api::GATE_HEADER_PREFIX))
        .map(|(name, value)| {
            (
                name.as_str().to_owned(),
                String::from_utf8_lossy(value.as_bytes()).into_owned(),
            )
        })
        .collect();
    let probe = recorder
        .orders
        .lock()
        .ok()
        .and_then(|orders| orders.clone());
    let order_id = headers
        .get(seckill_api::ORDER_ID_HEADER)
        .and_then(|v| v.to_str().ok());
    let row_at_receipt = match (probe, order_id) {
        (Some(pool), Some(order_id)) => Some(
            // A failed lookup counts as "no row": the assertion on it fails loudly.
            sqlx::query_scalar::<_, String>("SELECT state FROM orders WHERE order_id = ?")
                .bind(order_id)
                .fetch_optional(&pool)
                .await
                .ok()
                .flatten(),
        ),
        _ => None,
    };
    if let Ok(mut seen) = recorder.seen.lock() {
        seen.push(SeenRequest {
            authorization: headers
                .get("authorization")
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned()),
            method: method.to_string(),
            path: uri.path().to_owned(),
            status: status.as_u16(),
            gate_headers,
            row_at_receipt,
        });
    }
    // A slow shop is the fault under test (slower than Envoy's route timeout), not a wait
    // for anything to be ready.
    let delay_ms = recorder.delay_ms.load(Ordering::Relaxed);
    if delay_ms > 0 {
        tokio::time::sleep(Duration::from_millis(delay_ms)).await;
    }
    (
        status,
        [("content-type", "application/json")],
        if status.is_success() {
            r#"{"ok":true}"#
        } else {
            r#"{"ok":false}"#
        },
    )
}
