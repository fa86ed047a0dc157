//! What the fixtures need of their Redis, one server ([`RedisServer`]) or a Redis Cluster
//! ([`RedisCluster`]): start it, the syncer's `--redis-url`, and a connection for the test's
//! own reads (which routes by key on a cluster).

use std::future::Future;
use std::path::Path;

use crate::redis_cluster::RedisCluster;
use crate::redis_server::RedisServer;

pub trait TestRedis: Sized + Send + Sync + 'static {
    type Conn: redis::aio::ConnectionLike + Clone + Send + Sync + 'static;

    /// Starts it in `dir` with `extra` redis-server arguments (every node's, on a cluster).
    fn start_in(dir: &Path, extra: &[&str]) -> impl Future<Output = anyhow::Result<Self>> + Send;

    /// The syncer's `--redis-url`.
    fn url(&self) -> String;

    fn connection(&self) -> impl Future<Output = anyhow::Result<Self::Conn>> + Send;
}

impl TestRedis for RedisServer {
    type Conn = redis::aio::MultiplexedConnection;

    async fn start_in(dir: &Path, extra: &[&str]) -> anyhow::Result<Self> {
        RedisServer::start_with(dir, extra).await
    }

    fn url(&self) -> String {
        RedisServer::url(self)
    }

    async fn connection(&self) -> anyhow::Result<Self::Conn> {
        RedisServer::connection(self).await
    }
}

/// Three masters without replicas.
impl TestRedis for RedisCluster {
    type Conn = redis::cluster_async::ClusterConnection;

    async fn start_in(dir: &Path, extra: &[&str]) -> anyhow::Result<Self> {
        RedisCluster::start_with(dir, 3, 0, extra).await
    }

    fn url(&self) -> String {
        RedisCluster::url(self)
    }

    async fn connection(&self) -> anyhow::Result<Self::Conn> {
        RedisCluster::connection(self).await
    }
}
