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
use seckill_api::{BatchItem, DeductBatchReply, DeductBatchRequest, DeductReply, Outcome};
use tokio::sync::{oneshot, watch};

pub struct DeductStub {
    pub addr: SocketAddr,
    state: Arc<StubState>,
    stop: Option<oneshot::Sender<()>>,
}

struct StubState {
    orders: AtomicU64,
    /// Attempts received (answered or held).
    attempts: AtomicU64,
    /// While false, batch answers wait.
    open: watch::Sender<bool>,
}

impl DeductStub {
    /// Serves HTTP/1 and HTTP/2 (prior knowledge, as Envoy's syncer cluster speaks it) on a
    /// port the OS picks; every deduct wins a fresh order id.
    pub async fn start() -> anyhow::Result<Self> {
        Self::serve(true).await
    }

    /// Like `start`, but every batch answer waits until [`DeductStub::release`].
    pub async fn start_held() -> anyhow::Result<Self> {
        Self::serve(false).await
    }

    /// Lets held answers (and every later one) go.
    pub fn release(&self) {
        self.state.open.send_replace(true);
    }

    /// Attempts received so far, answered or held.
    pub fn attempts(&self) -> u64 {
        self.state.attempts.load(Ordering::Relaxed)
    }

    async fn serve(open: bool) -> anyhow::Result<Self> {
        let state = Arc::new(StubState {
            orders: AtomicU64::new(0),
            attempts: AtomicU64::new(0),
            open: watch::Sender::new(open),
        });
        let app = Router::new()
            .route(seckill_api::DEDUCT_PATH, post(win))
            .route(seckill_api::DEDUCT_BATCH_PATH, post(win_all))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = stopped.await;
                })
                .await;
        });
        Ok(Self {
            addr,
            state,
            stop: Some(stop),
        })
    }
}

impl Drop for DeductStub {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

async fn win(State(state): State<Arc<StubState>>) -> Json<DeductReply> {
    state.attempts.fetch_add(1, Ordering::Relaxed);
    Json(won(&state.orders))
}

async fn win_all(
    State(state): State<Arc<StubState>>,
    Json(batch): Json<DeductBatchRequest>,
) -> Json<DeductBatchReply> {
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
        outcome: Outcome::Won,
        order_id: Some(format!("stub.1.{seq}")),
        remaining: Some(999_999_999),
        retry_after_ms: None,
    }
}
