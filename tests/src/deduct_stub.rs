//! A stand-in for the syncer's deduct endpoint that says "won" at once, without Redis. The
//! edge benchmark uses it to show what the filter and Envoy cost by themselves, apart from
//! the stock service behind them, and edge tests use it to hold answers back at will.
//! Nothing that claims stock behaviour may use it.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use axum::extract::State;
use axum::routing::post;
use axum::{Json, Router};
use seckill_api::{
    BatchItem, ClaimReply, ClaimRequest, DeductBatchReply, DeductBatchRequest, DeductReply, Outcome,
};
use tokio::sync::watch;

use crate::served::Served;

pub struct DeductStub {
    pub addr: SocketAddr,
    state: Arc<StubState>,
    _served: Served,
}

struct StubState {
    orders: AtomicU64,
    /// Batch calls received (answered or held).
    calls: AtomicU64,
    /// Attempts received (answered or held).
    attempts: AtomicU64,
    /// While false, answers wait.
    open: watch::Sender<bool>,
}

impl DeductStub {
    /// Answers every batch deduct at once; every attempt wins a fresh order id.
    pub async fn start() -> anyhow::Result<Self> {
        Self::serve(true).await
    }

    /// Like `start`, but every answer waits until [`DeductStub::release`].
    pub async fn start_held() -> anyhow::Result<Self> {
        Self::serve(false).await
    }

    /// Lets held answers (and every later one) go.
    pub fn release(&self) {
        self.state.open.send_replace(true);
    }

    /// Batch calls received so far, answered or held.
    pub fn calls(&self) -> u64 {
        self.state.calls.load(Ordering::Relaxed)
    }

    /// Attempts received so far, answered or held.
    pub fn attempts(&self) -> u64 {
        self.state.attempts.load(Ordering::Relaxed)
    }

    async fn serve(open: bool) -> anyhow::Result<Self> {
        let state = Arc::new(StubState {
            orders: AtomicU64::new(0),
            calls: AtomicU64::new(0),
            attempts: AtomicU64::new(0),
            open: watch::Sender::new(open),
        });
        // Only the batch endpoint: it is the one the filter calls.
        let app = Router::new()
            .route(seckill_api::DEDUCT_BATCH_PATH, post(win_all))
            .route(seckill_api::CLAIM_PATH, post(claim_all))
            .with_state(state.clone());
        let served = Served::start(app).await?;
        Ok(Self {
            addr: served.addr,
            state,
            _served: served,
        })
    }
}

async fn win_all(
    State(state): State<Arc<StubState>>,
    Json(batch): Json<DeductBatchRequest>,
) -> Json<DeductBatchReply> {
    state.calls.fetch_add(1, Ordering::Relaxed);
    state
        .attempts
        .fetch_add(batch.attempts.len() as u64, Ordering::Relaxed);
    let mut open = state.open.subscribe();
    // Held until released; the sender lives as long as the stub.
    let _ = open.wait_for(|open| *open).await;
    let replies = batch
        .attempts
        .iter()
        .map(|_| BatchItem::Decided(won(&state.orders)))
        .collect();
    Json(DeductBatchReply { replies })
}

fn won(orders: &AtomicU64) -> DeductReply {
    let seq = orders.fetch_add(1, Ordering::Relaxed) + 1;
    DeductReply {
        order_id: Some(format!("stub.1.{seq}")),
        ..DeductReply::new(Outcome::Won, Some(999_999_999))
    }
}

/// Every claim is taken (the stub keeps no reservations to release).
async fn claim_all(Json(claim): Json<ClaimRequest>) -> Json<ClaimReply> {
    Json(ClaimReply {
        claimed: claim.order_ids.len() as u64,
        late: 0,
        failed: Vec::new(),
    })
}
