//! One Redis connection type for the whole syncer, over a single server or a Redis Cluster,
//! chosen by the one URL setting (`--redis-url`):
//!
//! - `redis://[user:password@]host:port[/db]`: one server (or a master behind a proxy), through
//!   the redis crate's `ConnectionManager`, which reconnects by itself.
//! - `redis+cluster://[user:password@]host:port[,host:port...]`: a Redis Cluster, through the
//!   redis crate's own cluster client (`cluster_async::ClusterConnection`). The addresses are
//!   seeds: the client asks them for the slot map and then talks to every master it names,
//!   following the cluster through MOVED redirections and failovers.
//!
//! Both implement [`redis::aio::ConnectionLike`] through [`RedisConn`], so every command,
//! script and pipeline in the syncer runs unchanged on either. What keeps that right on a
//! cluster is the key layout (`keys.rs`): every key of one goods shares the hash tag
//! `{goods}`, so each script call and each pipeline names keys of one slot and goes whole to
//! the master that owns it; the sales index (`P:sales`) is outside every tag and is only
//! ever used by single-key commands.

use std::fmt;
use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{MultipleNodeRoutingInfo, RoutingInfo};
use redis::{Cmd, Pipeline, RedisFuture, RedisResult, Value};

/// Bounds on every Redis connection attempt and reply, so nothing waits forever.
const REDIS_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const REDIS_RESPONSE_TIMEOUT: Duration = Duration::from_secs(2);
/// Reconnect attempts per failed command before the command itself fails.
const REDIS_RECONNECT_RETRIES: usize = 2;
/// A cluster's retries back off between these bounds (ms): short, since every call is bounded
/// by [`REDIS_RESPONSE_TIMEOUT`] overall, retries included.
const CLUSTER_RETRY_WAIT_MIN_MS: u64 = 10;
const CLUSTER_RETRY_WAIT_MAX_MS: u64 = 500;

/// The scheme that names a Redis Cluster.
pub const CLUSTER_SCHEME: &str = "redis+cluster://";

/// Where Redis is, as `--redis-url` says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RedisTarget {
    /// One server: the URL as given (the redis crate parses it).
    Single(String),
    /// A Redis Cluster: one `redis://` URL per seed node, in the order given.
    Cluster(Vec<String>),
}

impl RedisTarget {
    /// Reads `--redis-url`. A cluster is `redis+cluster://[user[:password]@]host:port,...`;
    /// anything else with a comma is refused (several `redis://` URLs would otherwise be
    /// read as one server with a strange host).
    pub fn parse(url: &str) -> Result<RedisTarget, String> {
        const HOW: &str = "write a Redis Cluster as redis+cluster://host:port,host:port,... \
                           (user and password, if any, before the first host: \
                           redis+cluster://user:password@host:port,host:port)";
        let scheme_end = url.find("://").map(|i| i + 3).unwrap_or(0);
        let scheme = url[..scheme_end].to_ascii_lowercase();
        if scheme == "rediss+cluster://" {
            return Err(format!(
                "TLS to a Redis Cluster (rediss+cluster://) is not built into this syncer; {HOW}"
            ));
        }
        if scheme != CLUSTER_SCHEME {
            if url.contains(',') {
                return Err(format!(
                    "a Redis URL names one server and has no comma; to list the seed nodes \
                     of a Redis Cluster, {HOW}"
                ));
            }
            if url.trim().is_empty() {
                return Err("the Redis URL is empty".to_owned());
            }
            return Ok(RedisTarget::Single(url.to_owned()));
        }
        let rest = &url[scheme_end..];
        // User info ends at the last '@' (a password's own '@' must be percent-encoded, as
        // in any URL, but hosts never hold one).
        let (userinfo, hosts) = match rest.rfind('@') {
            Some(at) => (Some(&rest[..at]), &rest[at + 1..]),
            None => (None, rest),
        };
        if userinfo.is_some_and(str::is_empty) {
            return Err(format!("an empty user before '@'; {HOW}"));
        }
        // A trailing '/' is tolerated; a database, options or a fragment are not: a cluster
        // has only database 0, and the syncer takes no options in its Redis URL.
        let hosts = hosts.strip_suffix('/').unwrap_or(hosts);
        if let Some(bad) = hosts.find(['/', '?', '#']) {
            return Err(format!(
                "a Redis Cluster URL takes no database, path or options (found {:?}): a \
                 cluster serves only database 0; {HOW}",
                &hosts[bad..]
            ));
        }
        if hosts.is_empty() {
            return Err(format!("no seed node in {CLUSTER_SCHEME}; {HOW}"));
        }
        let mut seeds = Vec::new();
        for (i, seed) in hosts.split(',').enumerate() {
            let (host, port) = split_host_port(seed)
                .map_err(|why| format!("seed {} {seed:?}: {why}; {HOW}", i + 1))?;
            let userinfo = userinfo.map(|u| format!("{u}@")).unwrap_or_default();
            let seed_url = format!("redis://{userinfo}{host}:{port}/");
            redis::IntoConnectionInfo::into_connection_info(seed_url.as_str())
                .map_err(|e| format!("seed {} {seed:?}: {e}", i + 1))?;
            seeds.push(seed_url);
        }
        Ok(RedisTarget::Cluster(seeds))
    }

    pub fn is_cluster(&self) -> bool {
        matches!(self, RedisTarget::Cluster(_))
    }
}

/// `host:port` (`[v6]:port` for an IPv6 address) of one seed; the port is required, since a
/// cluster's nodes rarely all listen on 6379.
fn split_host_port(seed: &str) -> Result<(&str, u16), String> {
    if seed.is_empty() {
        return Err("empty (two commas in a row, or one at an end?)".to_owned());
    }
    let (host, port) = if let Some(v6) = seed.strip_prefix('[') {
        let close = v6.find(']').ok_or("an IPv6 address without its ']'")?;
        let port = v6[close + 1..]
            .strip_prefix(':')
            .ok_or("no port: write host:port")?;
        (&seed[..close + 2], port)
    } else {
        seed.rsplit_once(':').ok_or("no port: write host:port")?
    };
    if host.is_empty() || host.contains(':') && !host.starts_with('[') {
        return Err("no host name or address before the port".to_owned());
    }
    if host.contains(char::is_whitespace) {
        return Err("a space in the host".to_owned());
    }
    let port: u16 = match port.parse() {
        Ok(p) if p > 0 && port.bytes().all(|b| b.is_ascii_digit()) => p,
        _ => return Err(format!("{port:?} is not a port (1 to 65535)")),
    };
    Ok((host, port))
}

/// The URL with its password hidden, for messages.
pub fn redacted(url: &str) -> String {
    let Some(scheme_end) = url.find("://").map(|i| i + 3) else {
        return url.to_owned();
    };
    match url[scheme_end..].rfind('@') {
        Some(at) => {
            let userinfo = &url[scheme_end..scheme_end + at];
            let user = userinfo.split(':').next().unwrap_or("");
            let hidden = match userinfo.contains(':') {
                true => format!("{user}:***"),
                false => "***".to_owned(),
            };
            format!("{}{hidden}{}", &url[..scheme_end], &url[scheme_end + at..])
        }
        None => url.to_owned(),
    }
}

/// A connection to Redis, one server or a cluster; cheap to clone (clones share the
/// underlying connections, as `ConnectionManager`'s do).
#[derive(Clone)]
pub enum RedisConn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl fmt::Debug for RedisConn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RedisConn::Single(_) => f.write_str("RedisConn::Single"),
            RedisConn::Cluster(_) => f.write_str("RedisConn::Cluster"),
        }
    }
}

impl From<ConnectionManager> for RedisConn {
    fn from(conn: ConnectionManager) -> Self {
        RedisConn::Single(conn)
    }
}

impl ConnectionLike for RedisConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            RedisConn::Single(conn) => conn.req_packed_command(cmd),
            RedisConn::Cluster(conn) => conn.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            RedisConn::Single(conn) => conn.req_packed_commands(pipeline, offset, count),
            RedisConn::Cluster(conn) => conn.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            RedisConn::Single(conn) => conn.get_db(),
            RedisConn::Cluster(conn) => conn.get_db(),
        }
    }
}

impl RedisConn {
    pub fn is_cluster(&self) -> bool {
        matches!(self, RedisConn::Cluster(_))
    }

    /// Runs `cmd` on every master (one server: on it) and returns each one's reply, named by
    /// its address (`"redis"` for one server). A master's error reply is its entry's `Err`;
    /// a master that cannot be reached fails the whole call. For what each master must say
    /// for itself: its persistence settings, its replicas.
    pub async fn on_every_master(
        &self,
        cmd: &Cmd,
    ) -> RedisResult<Vec<(String, RedisResult<Value>)>> {
        match self {
            RedisConn::Single(conn) => {
                let mut conn = conn.clone();
                let reply = cmd.query_async::<Value>(&mut conn).await;
                match reply {
                    Err(e) if !matches!(e.kind(), redis::ErrorKind::Server(_)) => Err(e),
                    reply => Ok(vec![("redis".to_owned(), reply)]),
                }
            }
            RedisConn::Cluster(conn) => {
                let mut conn = conn.clone();
                let routing = RoutingInfo::MultiNode((MultipleNodeRoutingInfo::AllMasters, None));
                let replies = conn.route_command(cmd.clone(), routing).await?;
                let Value::Map(replies) = replies else {
                    return Err(redis::RedisError::from((
                        redis::ErrorKind::Client,
                        "the cluster client answered a command for every master with no map",
                    )));
                };
                let mut by_master = Vec::with_capacity(replies.len());
                for (address, reply) in replies {
                    let address: String = redis::from_redis_value(address)?;
                    let reply = match reply {
                        Value::ServerError(e) => Err(redis::RedisError::from(e)),
                        other => Ok(other),
                    };
                    by_master.push((address, reply));
                }
                by_master.sort_by(|a, b| a.0.cmp(&b.0));
                Ok(by_master)
            }
        }
    }
}

/// Connects to Redis as `url` says (see the module's documentation); fails with a clear
/// message for a URL of neither form or a Redis that cannot be reached.
pub async fn connect(url: &str) -> anyhow::Result<RedisConn> {
    let target = RedisTarget::parse(url)
        .map_err(|e| anyhow::anyhow!("bad Redis URL {:?}: {e}", redacted(url)))?;
    match target {
        RedisTarget::Single(url) => {
            let client = redis::Client::open(url.as_str())
                .map_err(|e| anyhow::anyhow!("bad Redis URL {:?}: {e}", redacted(&url)))?;
            let config = ConnectionManagerConfig::new()
                .set_connection_timeout(Some(REDIS_CONNECT_TIMEOUT))
                .set_response_timeout(Some(REDIS_RESPONSE_TIMEOUT))
                .set_number_of_retries(REDIS_RECONNECT_RETRIES);
            let conn = ConnectionManager::new_with_config(client, config)
                .await
                .map_err(|e| {
                    anyhow::anyhow!("cannot connect to Redis at {}: {e}", redacted(&url))
                })?;
            Ok(RedisConn::Single(conn))
        }
        RedisTarget::Cluster(seeds) => {
            let client = ClusterClientBuilder::new(seeds.iter().map(String::as_str))
                .connection_timeout(REDIS_CONNECT_TIMEOUT)
                .response_timeout(REDIS_RESPONSE_TIMEOUT)
                .retries(REDIS_RECONNECT_RETRIES as u32)
                .min_retry_wait(CLUSTER_RETRY_WAIT_MIN_MS)
                .max_retry_wait(CLUSTER_RETRY_WAIT_MAX_MS)
                .build()
                .map_err(|e| anyhow::anyhow!("bad Redis Cluster URL {:?}: {e}", redacted(url)))?;
            let conn = client.get_async_connection().await.map_err(|e| {
                anyhow::anyhow!(
                    "cannot connect to the Redis Cluster at {} (is every seed a node of a \
                     cluster whose slots are all served?): {e}",
                    redacted(url)
                )
            })?;
            Ok(RedisConn::Cluster(conn))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster(url: &str) -> Vec<String> {
        match RedisTarget::parse(url) {
            Ok(RedisTarget::Cluster(seeds)) => seeds,
            other => panic!("{url}: {other:?}"),
        }
    }

    #[test]
    fn one_server_urls_pass_through() {
        for url in [
            "redis://127.0.0.1:6379",
            "redis://127.0.0.1:6379/",
            "redis://:secret@redis:6379/2",
            "redis://redis",
            "unix:///run/redis.sock",
        ] {
            assert_eq!(
                RedisTarget::parse(url),
                Ok(RedisTarget::Single(url.to_owned()))
            );
        }
        assert!(!RedisTarget::parse("redis://a:1").unwrap().is_cluster());
    }

    #[test]
    fn a_cluster_is_its_seed_nodes() {
        assert_eq!(
            cluster("redis+cluster://10.0.0.1:7000,10.0.0.2:7001,node-3.local:7002"),
            [
                "redis://10.0.0.1:7000/",
                "redis://10.0.0.2:7001/",
                "redis://node-3.local:7002/"
            ]
        );
        assert_eq!(cluster("redis+cluster://h:7000/"), ["redis://h:7000/"]);
        assert_eq!(
            cluster("REDIS+CLUSTER://h:7000"),
            ["redis://h:7000/"],
            "the scheme is case-insensitive"
        );
        assert_eq!(
            cluster("redis+cluster://user:p%40ss@a:1,b:2"),
            ["redis://user:p%40ss@a:1/", "redis://user:p%40ss@b:2/"],
            "the user and password go to every seed"
        );
        assert_eq!(
            cluster("redis+cluster://:pw@[::1]:7000,127.0.0.1:7001"),
            ["redis://:pw@[::1]:7000/", "redis://:pw@127.0.0.1:7001/"]
        );
        assert!(RedisTarget::parse("redis+cluster://a:1")
            .unwrap()
            .is_cluster());
    }

    #[test]
    fn bad_urls_are_refused_with_the_form_to_use() {
        for (url, says) in [
            ("redis://a:1,redis://b:2", "has no comma"),
            ("redis://a:1,b:2", "has no comma"),
            ("redis+cluster://", "no seed node"),
            ("redis+cluster:///", "no seed node"),
            ("redis+cluster://a:1,,b:2", "empty"),
            ("redis+cluster://a:1,", "empty"),
            ("redis+cluster://a", "no port"),
            ("redis+cluster://a:1,b", "no port"),
            ("redis+cluster://a:", "not a port"),
            ("redis+cluster://a:0", "not a port"),
            ("redis+cluster://a:65536", "not a port"),
            ("redis+cluster://a:+1", "not a port"),
            ("redis+cluster://a:x", "not a port"),
            ("redis+cluster://:1", "no host"),
            ("redis+cluster://a b:1", "a space"),
            ("redis+cluster://[::1:7000", "']'"),
            ("redis+cluster://[::1]", "no port"),
            ("redis+cluster://a:1/2", "no database"),
            ("redis+cluster://a:1,b:2/0", "no database"),
            ("redis+cluster://a:1?timeout=1", "no database"),
            ("redis+cluster://@a:1", "empty user"),
            ("rediss+cluster://a:1", "TLS"),
            ("", "empty"),
        ] {
            let error = RedisTarget::parse(url).unwrap_err();
            assert!(error.contains(says), "{url:?}: {error}");
        }
        // Every refusal of a cluster URL says how to write one.
        let error = RedisTarget::parse("redis+cluster://a").unwrap_err();
        assert!(
            error.contains("redis+cluster://host:port,host:port"),
            "{error}"
        );
        let error = RedisTarget::parse("redis://a:1,redis://b:2").unwrap_err();
        assert!(
            error.contains("redis+cluster://host:port,host:port"),
            "{error}"
        );
    }

    #[test]
    fn passwords_stay_out_of_messages() {
        assert_eq!(
            redacted("redis+cluster://u:secret@a:1,b:2"),
            "redis+cluster://u:***@a:1,b:2"
        );
        assert_eq!(redacted("redis://:secret@a:1/"), "redis://:***@a:1/");
        assert_eq!(redacted("redis://token@a:1/"), "redis://***@a:1/");
        assert_eq!(redacted("redis://a:1/"), "redis://a:1/");
        let error = RedisTarget::parse("redis+cluster://u:secret@a").unwrap_err();
        assert!(!error.contains("secret"), "{error}");
    }

    #[tokio::test]
    async fn a_bad_url_fails_to_connect_with_a_clear_message() {
        let error = connect("redis+cluster://u:secret@a:1,,b:2")
            .await
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("bad Redis URL") && error.contains("empty"),
            "{error}"
        );
        assert!(!error.contains("secret"), "{error}");
        let error = connect("redis://a:1,redis://b:2")
            .await
            .unwrap_err()
            .to_string();
        assert!(error.contains("redis+cluster://"), "{error}");
    }
}
