//! The seckill syncer: the atomic Redis deduct behind the edge filter, the sale admin API and
//! preheat. `main.rs` only parses flags; everything runs from here.

pub mod db;
pub mod deduct;
pub mod http;
pub mod keys;
pub mod preheat;
pub mod sale;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use crate::deduct::Deducter;
use crate::keys::KeySpace;

/// Bounds on every Redis connection attempt and reply, so nothing waits forever.
const REDIS_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const REDIS_RESPONSE_TIMEOUT: Duration = Duration::from_secs(2);
/// Reconnect attempts per failed command before the command itself fails.
const REDIS_RECONNECT_RETRIES: usize = 2;

/// Where the stores are, shared by every subcommand.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    pub redis_url: String,
    pub mysql_url: String,
    pub key_prefix: String,
}

#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub stores: StoreConfig,
    pub listen: SocketAddr,
    pub secret: String,
}

pub async fn connect_redis(url: &str) -> anyhow::Result<ConnectionManager> {
    let client =
        redis::Client::open(url).map_err(|e| anyhow::anyhow!("bad Redis URL {url:?}: {e}"))?;
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(REDIS_CONNECT_TIMEOUT))
        .set_response_timeout(Some(REDIS_RESPONSE_TIMEOUT))
        .set_number_of_retries(REDIS_RECONNECT_RETRIES);
    ConnectionManager::new_with_config(client, config)
        .await
        .map_err(|e| anyhow::anyhow!("cannot connect to Redis at {url}: {e}"))
}

/// Runs the HTTP service until `shutdown` resolves, then drains in-flight requests.
pub async fn serve(
    config: ServeConfig,
    metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    if config.secret.is_empty() {
        anyhow::bail!("the shared secret must not be empty");
    }
    let redis = connect_redis(&config.stores.redis_url).await?;
    let mysql = db::connect(&config.stores.mysql_url).await?;
    let keys = KeySpace::new(config.stores.key_prefix.clone());
    let state = Arc::new(http::AppState {
        deducter: Deducter::start(redis.clone(), keys.clone()),
        redis,
        keys,
        mysql,
        secret: config.secret.clone(),
        metrics,
    });
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", config.listen))?;
    tracing::info!(listen = %listener.local_addr()?, "syncer serving");
    axum::serve(listener, http::router(state))
        .with_graceful_shutdown(shutdown)
        .await?;
    tracing::info!("syncer stopped");
    Ok(())
}
