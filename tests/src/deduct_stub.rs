//! A stand-in for the syncer's deduct endpoint that says "won" at once, without Redis. The
//! edge benchmark uses it to show what the filter and Envoy cost by themselves, apart from
//! the stock service behind them. Nothing that claims stock behaviour may use it.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use axum::extract::State;
use axum::routing::post;
use axum::{Json, Router};
use seckill_api::{BatchItem, DeductBatchReply, DeductBatchRequest, DeductReply, Outcome};
use tokio::sync::oneshot;

pub struct DeductStub {
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
}

impl DeductStub {
    /// Serves HTTP/1 and HTTP/2 (prior knowledge, as Envoy's syncer cluster speaks it) on a
    /// port the OS picks; every deduct wins a fresh order id.
    pub async fn start() -> anyhow::Result<Self> {
        let orders = Arc::new(AtomicU64::new(0));
        let app = Router::new()
            .route(seckill_api::DEDUCT_PATH, post(win))
            .route(seckill_api::DEDUCT_BATCH_PATH, post(win_all))
            .with_state(orders);
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

async fn win(State(orders): State<Arc<AtomicU64>>) -> Json<DeductReply> {
    Json(won(&orders))
}

async fn win_all(
    State(orders): State<Arc<AtomicU64>>,
    Json(batch): Json<DeductBatchRequest>,
) -> Json<DeductBatchReply> {
    let replies = batch
        .attempts
        .iter()
        .map(|_| BatchItem::Decided(won(&orders)))
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
