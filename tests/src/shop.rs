//! A stub shop API (the upstream behind Envoy) that records every request it receives, so a
//! test can check that only winners got through and what headers they carried.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::IntoResponse;
use axum::Router;

use crate::served::Served;

/// One request as the shop saw it.
#[derive(Debug, Clone)]
pub struct SeenRequest {
    pub path: String,
    /// Every `x-seckill-*` header, name and value.
    pub gate_headers: Vec<(String, String)>,
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
    uri: Uri,
    headers: HeaderMap,
) -> impl IntoResponse {
    let gate_headers = headers
        .iter()
        .filter(|(name, _)| name.as_str().starts_with(seckill_api::GATE_HEADER_PREFIX))
        .map(|(name, value)| {
            (
                name.as_str().to_owned(),
                String::from_utf8_lossy(value.as_bytes()).into_owned(),
            )
        })
        .collect();
    if let Ok(mut seen) = recorder.seen.lock() {
        seen.push(SeenRequest {
            path: uri.path().to_owned(),
            gate_headers,
        });
    }
    let status = StatusCode::from_u16(recorder.status.load(Ordering::Relaxed))
        .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
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
