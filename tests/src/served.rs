//! An axum app served in the background on a port the OS picks, stopped when dropped: what
//! the stub shop and the deduct stub run on.

use std::net::SocketAddr;

use axum::Router;
use tokio::sync::oneshot;

pub struct Served {
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
}

impl Served {
    /// Serves HTTP/1 and HTTP/2 (prior knowledge, as Envoy's syncer cluster speaks it).
    pub async fn start(app: Router) -> anyhow::Result<Self> {
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

impl Drop for Served {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}
