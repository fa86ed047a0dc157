//! Harness for end-to-end runs of the seckill gate against real parts: a private redis-server (or a Redis Cluster),
//! a fresh MariaDB database, the syncer binary, a stub shop API and Envoy with the wasm filter.
//! Every server runs on a free port and is killed when its handle drops.

pub mod admin;
pub mod browser;
pub mod deduct_stub;
pub mod docker;
pub mod envoy;
pub mod fast_path;
pub mod kafka_broker;
pub mod mysql_db;
pub mod pipeline;
pub mod process;
pub mod prometheus;
pub mod redis_cluster;
pub mod redis_server;
pub mod served;
pub mod shipped;
pub mod shop;
pub mod stack;
pub mod syncer;
pub mod tcp_proxy;
pub mod test_redis;
