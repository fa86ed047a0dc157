//! A private Redis Cluster on free ports: N masters (3 unless asked otherwise), optionally a
//! replica for each, every one a `redis-server --cluster-enabled yes` of its own in the
//! test's scratch directory, joined by `redis-cli --cluster create`; ready once every node's
//! `CLUSTER INFO` says `cluster_state:ok` and every node knows all of them. Every node is
//! killed when the value drops. A test can kill a master, flush one, or freeze one.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::Context;

use crate::process::{free_port, wait_for, ChildGuard};

/// Slots of a Redis Cluster.
pub const SLOTS: u16 = 16384;

/// How long a node may be unreachable before the others mark it failed (Redis's default is
/// 15 s; tests that kill a master should not wait that long).
const NODE_TIMEOUT_MS: u32 = 2_000;

pub struct ClusterNode {
    pub port: u16,
    /// The cluster bus port (`--cluster-port`), also free: `port + 10000` may not be.
    pub bus_port: u16,
    process: ChildGuard,
    data_dir: PathBuf,
    log_dir: PathBuf,
    /// Arguments after the defaults.
    extra: Vec<String>,
}

impl ClusterNode {
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// A plain connection to this node alone (commands for keys it does not own answer
    /// MOVED).
    pub async fn connection(&self) -> anyhow::Result<redis::aio::MultiplexedConnection> {
        Ok(redis::Client::open(self.url())?
            .get_multiplexed_async_connection()
            .await?)
    }

    /// One section of INFO as text.
    pub async fn info(&self, section: &str) -> anyhow::Result<String> {
        let mut conn = self.connection().await?;
        Ok(redis::cmd("INFO")
            .arg(section)
            .query_async(&mut conn)
            .await?)
    }

    pub fn is_running(&mut self) -> bool {
        self.process.check_running().is_ok()
    }

    /// Its data directory (nodes.conf, AOF).
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    fn signal(&self, name: &str) -> anyhow::Result<()> {
        let pid = self.process.pid().context("redis-server is not running")?;
        let status = Command::new("kill")
            .args([format!("-{name}"), pid.to_string()])
            .status()?;
        anyhow::ensure!(status.success(), "kill -{name} {pid} failed");
        Ok(())
    }
}

/// A node's place in the cluster, as `CLUSTER NODES` says.
#[derive(Debug, Clone)]
struct Role {
    id: String,
    port: u16,
    /// The master's id for a replica.
    master_of: Option<String>,
    slots: Vec<(u16, u16)>,
}

pub struct RedisCluster {
    /// Every node, masters and replicas, in the order they were started (masters first, as
    /// `redis-cli --cluster create` assigns them).
    pub nodes: Vec<ClusterNode>,
    masters: usize,
}

impl RedisCluster {
    /// Three masters, no replicas, without persistence.
    pub async fn start(dir: &Path) -> anyhow::Result<Self> {
        Self::start_with(dir, 3, 0, &[]).await
    }

    /// `masters` masters, each with `replicas` replicas, every node started with `extra`
    /// arguments after the defaults (say [`crate::redis_server::AOF_ALWAYS`]).
    pub async fn start_with(
        dir: &Path,
        masters: usize,
        replicas: usize,
        extra: &[&str],
    ) -> anyhow::Result<Self> {
        anyhow::ensure!(
            masters >= 3,
            "redis-cli --cluster create needs 3 masters at least"
        );
        let mut last_error = None;
        // Free ports can be taken between the probe and redis' bind: retry a few times.
        for _ in 0..3 {
            match Self::try_start(dir, masters, replicas, extra).await {
                Ok(cluster) => return Ok(cluster),
                Err(e) => last_error = Some(e),
            }
        }
        Err(last_error.unwrap_or_else(|| anyhow::anyhow!("the redis cluster did not start")))
    }

    async fn try_start(
        dir: &Path,
        masters: usize,
        replicas: usize,
        extra: &[&str],
    ) -> anyhow::Result<Self> {
        let count = masters * (1 + replicas);
        let mut ports = HashSet::new();
        let mut ordered = Vec::with_capacity(count * 2);
        while ordered.len() < count * 2 {
            let port = free_port()?;
            if ports.insert(port) {
                ordered.push(port);
            }
        }
        let mut nodes = Vec::with_capacity(count);
        for pair in ordered.chunks(2) {
            let (port, bus_port) = (pair[0], pair[1]);
            let data_dir = dir.join(format!("redis-cluster-{port}"));
            std::fs::create_dir_all(&data_dir)?;
            let extra: Vec<String> = extra.iter().map(|a| a.to_string()).collect();
            let process = spawn_node(dir, &data_dir, port, bus_port, &extra)?;
            nodes.push(ClusterNode {
                port,
                bus_port,
                process,
                data_dir,
                log_dir: dir.to_owned(),
                extra,
            });
        }
        for node in &mut nodes {
            wait_for_pong(node).await?;
        }
        let mut create = Command::new("redis-cli");
        create.arg("--cluster").arg("create");
        for node in &nodes {
            create.arg(node.address());
        }
        create.args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"]);
        let output = tokio::task::spawn_blocking(move || create.output())
            .await?
            .context("is redis-cli installed? scripts/setup.sh installs it")?;
        anyhow::ensure!(
            output.status.success(),
            "redis-cli --cluster create failed ({}): {}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        let cluster = RedisCluster { nodes, masters };
        cluster.wait_until_ok(count).await?;
        Ok(cluster)
    }

    /// Waits (bounded) until every node says `cluster_state:ok`, knows `count` nodes and sees
    /// every slot served, and each replica's link to its master is up.
    async fn wait_until_ok(&self, count: usize) -> anyhow::Result<()> {
        wait_for(
            "the redis cluster to be ok on every node",
            Duration::from_secs(30),
            || async {
                for node in &self.nodes {
                    let Ok(mut conn) = node.connection().await else {
                        return Ok(None);
                    };
                    let info: String = match redis::cmd("CLUSTER")
                        .arg("INFO")
                        .query_async(&mut conn)
                        .await
                    {
                        Ok(info) => info,
                        Err(_) => return Ok(None),
                    };
                    let has = |line: &str| info.lines().any(|l| l.trim() == line);
                    if !(has("cluster_state:ok")
                        && has(&format!("cluster_known_nodes:{count}"))
                        && has(&format!("cluster_slots_ok:{SLOTS}")))
                    {
                        return Ok(None);
                    }
                }
                for role in self.roles().await.unwrap_or_default() {
                    if role.master_of.is_some() {
                        let info = self.node(role.port)?.info("replication").await?;
                        if !info.lines().any(|l| l.trim() == "master_link_status:up") {
                            return Ok(None);
                        }
                    }
                }
                Ok(Some(()))
            },
        )
        .await
    }

    /// The syncer's `--redis-url` for this cluster: every master as a seed.
    pub fn url(&self) -> String {
        let seeds: Vec<String> = self.nodes[..self.masters]
            .iter()
            .map(ClusterNode::address)
            .collect();
        format!("redis+cluster://{}", seeds.join(","))
    }

    /// A connection through the redis crate's cluster client (routes every command by its
    /// key's slot).
    pub async fn connection(&self) -> anyhow::Result<redis::cluster_async::ClusterConnection> {
        let seeds: Vec<String> = self.nodes.iter().map(ClusterNode::url).collect();
        let client = redis::cluster::ClusterClientBuilder::new(seeds)
            .connection_timeout(Duration::from_secs(2))
            .response_timeout(Duration::from_secs(5))
            .build()?;
        Ok(client.get_async_connection().await?)
    }

    pub fn node(&self, port: u16) -> anyhow::Result<&ClusterNode> {
        self.nodes
            .iter()
            .find(|n| n.port == port)
            .with_context(|| format!("no node on port {port}"))
    }

    fn node_mut(&mut self, port: u16) -> anyhow::Result<&mut ClusterNode> {
        self.nodes
            .iter_mut()
            .find(|n| n.port == port)
            .with_context(|| format!("no node on port {port}"))
    }

    /// Every node's role, from `CLUSTER NODES` of the first node that answers.
    async fn roles(&self) -> anyhow::Result<Vec<Role>> {
        let mut last_error = None;
        for node in &self.nodes {
            let text: anyhow::Result<String> = async {
                let mut conn = node.connection().await?;
                Ok(redis::cmd("CLUSTER")
                    .arg("NODES")
                    .query_async(&mut conn)
                    .await?)
            }
            .await;
            match text {
                Ok(text) => return parse_cluster_nodes(&text),
                Err(e) => last_error = Some(e),
            }
        }
        Err(last_error.unwrap_or_else(|| anyhow::anyhow!("no node answered CLUSTER NODES")))
    }

    /// The ports of the masters, in the order of their first slot.
    pub async fn master_ports(&self) -> anyhow::Result<Vec<u16>> {
        let mut masters: Vec<Role> = self
            .roles()
            .await?
            .into_iter()
            .filter(|r| r.master_of.is_none() && !r.slots.is_empty())
            .collect();
        masters.sort_by_key(|r| r.slots.first().map(|s| s.0));
        Ok(masters.into_iter().map(|r| r.port).collect())
    }

    /// The port of the master that serves `key` (its slot, as the cluster says).
    pub async fn master_of_key(&self, key: &str) -> anyhow::Result<u16> {
        let slot = key_slot(key);
        self.roles()
            .await?
            .into_iter()
            .find(|r| {
                r.master_of.is_none() && r.slots.iter().any(|&(a, b)| (a..=b).contains(&slot))
            })
            .map(|r| r.port)
            .with_context(|| format!("no master serves slot {slot} of {key}"))
    }

    /// The ports of the replicas of the master on `master_port`.
    pub async fn replicas_of(&self, master_port: u16) -> anyhow::Result<Vec<u16>> {
        let roles = self.roles().await?;
        let id = roles
            .iter()
            .find(|r| r.port == master_port)
            .map(|r| r.id.clone())
            .with_context(|| format!("no node on port {master_port}"))?;
        Ok(roles
            .into_iter()
            .filter(|r| r.master_of.as_deref() == Some(id.as_str()))
            .map(|r| r.port)
            .collect())
    }

    /// Kills the node on `port` now (SIGKILL), as a crashed host would stop.
    pub fn kill_node(&mut self, port: u16) -> anyhow::Result<()> {
        self.node_mut(port)?.process.kill();
        Ok(())
    }

    /// Starts the node on `port` again (after [`RedisCluster::kill_node`]; a running one is
    /// killed first) with its cluster configuration (`nodes.conf`: its id and its slots) and
    /// whatever it persisted (nothing, by default: a master that comes back having forgotten
    /// its keys, still owning its slots), and waits until the cluster is ok on every node.
    pub async fn restart_node(&mut self, port: u16) -> anyhow::Result<()> {
        let count = self.nodes.len();
        let node = self.node_mut(port)?;
        node.process.kill();
        let mut last_error = None;
        // The port is ours, but the old process's sockets may take a moment to let go.
        for attempt in 0..5u64 {
            tokio::time::sleep(Duration::from_millis(100 * attempt)).await;
            match spawn_node(
                &node.log_dir,
                &node.data_dir,
                node.port,
                node.bus_port,
                &node.extra,
            ) {
                Ok(process) => node.process = process,
                Err(e) => {
                    last_error = Some(e);
                    continue;
                }
            }
            match wait_for_pong(node).await {
                Ok(()) => {
                    last_error = None;
                    break;
                }
                Err(e) => last_error = Some(e),
            }
        }
        if let Some(e) = last_error {
            return Err(e);
        }
        self.wait_until_ok(count).await
    }

    /// Kills the master that serves `key` (SIGKILL); returns its port.
    pub async fn kill_master_of(&mut self, key: &str) -> anyhow::Result<u16> {
        let port = self.master_of_key(key).await?;
        self.kill_node(port)?;
        Ok(port)
    }

    /// FLUSHALL on the node on `port` alone: a master that forgot everything it held (its
    /// slots stay its own), while the other masters keep theirs.
    pub async fn flush_node(&self, port: u16) -> anyhow::Result<()> {
        let mut conn = self.node(port)?.connection().await?;
        let () = redis::cmd("FLUSHALL").query_async(&mut conn).await?;
        Ok(())
    }

    /// Freezes the node on `port` (SIGSTOP) until [`RedisCluster::resume`].
    pub fn pause(&self, port: u16) -> anyhow::Result<()> {
        self.node(port)?.signal("STOP")
    }

    pub fn resume(&self, port: u16) -> anyhow::Result<()> {
        self.node(port)?.signal("CONT")
    }

    /// Every key matching `pattern` on every master.
    pub async fn keys(&self, pattern: &str) -> anyhow::Result<Vec<String>> {
        let mut keys = Vec::new();
        for port in self.master_ports().await? {
            let mut conn = self.node(port)?.connection().await?;
            let found: Vec<String> = redis::cmd("KEYS")
                .arg(pattern)
                .query_async(&mut conn)
                .await?;
            keys.extend(found);
        }
        keys.sort();
        Ok(keys)
    }
}

/// Starts one cluster node; its log is appended to, so a restarted node keeps its first life's.
fn spawn_node(
    log_dir: &Path,
    data_dir: &Path,
    port: u16,
    bus_port: u16,
    extra: &[String],
) -> anyhow::Result<ChildGuard> {
    let mut command = Command::new("redis-server");
    command
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no"])
        .args(["--cluster-enabled", "yes"])
        .args(["--cluster-port", &bus_port.to_string()])
        .args(["--cluster-node-timeout", &NODE_TIMEOUT_MS.to_string()])
        .arg("--cluster-config-file")
        .arg(data_dir.join("nodes.conf"))
        .arg("--dir")
        .arg(data_dir)
        .args(extra);
    let log = log_dir.join(format!("redis-cluster-{port}.log"));
    ChildGuard::spawn_appending("redis-server", command, &log)
        .context("is redis-server installed? scripts/setup.sh installs it")
}

/// Polls PING until PONG (bounded), failing at once if the node exited.
async fn wait_for_pong(node: &mut ClusterNode) -> anyhow::Result<()> {
    let url = node.url();
    let process = &mut node.process;
    wait_for("a cluster node", Duration::from_secs(20), || {
        let url = url.clone();
        let running = process.check_running();
        async move {
            running?;
            let client = redis::Client::open(url)?;
            let Ok(mut conn) = client.get_multiplexed_async_connection().await else {
                return Ok(None);
            };
            let pong: Option<String> = redis::cmd("PING").query_async(&mut conn).await.ok();
            Ok((pong.as_deref() == Some("PONG")).then_some(()))
        }
    })
    .await
}

/// `CLUSTER NODES`: `<id> <ip:port@bus[,hostname]> <flags> <master|-> <ping> <pong> <epoch>
/// <link> <slot or range>...`; importing and migrating slots (`[...]`) are skipped.
fn parse_cluster_nodes(text: &str) -> anyhow::Result<Vec<Role>> {
    let mut roles = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        anyhow::ensure!(
            fields.len() >= 8,
            "a CLUSTER NODES line I cannot read: {line}"
        );
        let address = fields[1].split(['@', ',']).next().unwrap_or_default();
        let port = address
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .with_context(|| format!("no port in {line}"))?;
        let master_of = match fields[3] {
            "-" => None,
            id => Some(id.to_owned()),
        };
        let mut slots = Vec::new();
        for slot in fields[8..].iter().filter(|s| !s.starts_with('[')) {
            let (a, b) = slot.split_once('-').unwrap_or((slot, slot));
            slots.push((a.parse()?, b.parse()?));
        }
        roles.push(Role {
            id: fields[0].to_owned(),
            port,
            master_of,
            slots,
        });
    }
    Ok(roles)
}

/// The slot of `key`: CRC16 (XMODEM) of its hash tag (the first non-empty `{...}`) or of the
/// whole key, mod 16384, as Redis Cluster computes it.
pub fn key_slot(key: &str) -> u16 {
    let bytes = key.as_bytes();
    let hashed = match bytes.iter().position(|&b| b == b'{') {
        Some(open) => match bytes[open + 1..].iter().position(|&b| b == b'}') {
            Some(len) if len > 0 => &bytes[open + 1..open + 1 + len],
            _ => bytes,
        },
        None => bytes,
    };
    crc16_xmodem(hashed) % SLOTS
}

fn crc16_xmodem(bytes: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &byte in bytes {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_computed_as_redis_does() {
        // Values from the Redis Cluster specification and `CLUSTER KEYSLOT`.
        assert_eq!(crc16_xmodem(b"123456789"), 0x31C3);
        assert_eq!(key_slot("foo"), 12182);
        assert_eq!(key_slot("bar"), 5061);
        assert_eq!(key_slot("{user1000}.following"), key_slot("user1000"));
        assert_eq!(key_slot("foo{}{bar}"), crc16_xmodem(b"foo{}{bar}") % SLOTS);
        assert_eq!(key_slot("foo{{bar}}zap"), key_slot("{bar"));
        assert_eq!(key_slot("t1:{sku-9}:sale"), key_slot("t1:{sku-9}:outbox"));
    }

    #[test]
    fn cluster_nodes_are_read() {
        let text = "\
07c37dfeb235213a872192d90877d0cd55635b91 127.0.0.1:30004@31004,host master - 0 1426238317239 4 connected 0-5460 5462 [5461->-e7d1eecce10fd6bb5eb35b9f99a514335d9ba9ca]
67ed2db8d677e59ec4a4cefb06858cf2a1a89fa1 127.0.0.1:30002@31002 myself,master - 0 0 2 connected 5461 5463-16383
e7d1eecce10fd6bb5eb35b9f99a514335d9ba9ca 127.0.0.1:30001@31001 slave 07c37dfeb235213a872192d90877d0cd55635b91 0 1426238316232 1 connected
";
        let roles = parse_cluster_nodes(text).unwrap();
        assert_eq!(roles.len(), 3);
        assert_eq!(roles[0].port, 30004);
        assert_eq!(roles[0].slots, [(0, 5460), (5462, 5462)]);
        assert_eq!(roles[1].slots, [(5461, 5461), (5463, 16383)]);
        assert_eq!(roles[2].master_of.as_deref(), Some(roles[0].id.as_str()));
        assert!(roles[2].slots.is_empty());
    }
}
