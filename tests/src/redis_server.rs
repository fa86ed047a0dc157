//! A private redis-server on a free port, killed when dropped: without persistence (the
//! default), with an AOF fsynced on every write or once a second, or as a replica of another.
//! A test can kill it, restart it from what it persisted, empty, or from an older copy of its
//! data directory (an AOF whose tail was lost).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::Context;

use crate::process::{free_port, wait_for, ChildGuard};

/// Extra arguments for an AOF that Redis fsyncs before it replies (`--redis-durability aof`).
pub const AOF_ALWAYS: &[&str] = &["--appendonly", "yes", "--appendfsync", "always"];
/// Extra arguments for an AOF fsynced once a second (Redis's default when AOF is on).
pub const AOF_EVERYSEC: &[&str] = &["--appendonly", "yes", "--appendfsync", "everysec"];

pub struct RedisServer {
    pub port: u16,
    process: ChildGuard,
    /// Its own data directory (AOF, RDB), which a restart reads again.
    data_dir: PathBuf,
    log_dir: PathBuf,
    /// Arguments after the defaults (later ones win in Redis's configuration).
    extra: Vec<String>,
}

impl RedisServer {
    /// The server's process id (a benchmark reads its CPU time).
    pub fn pid(&self) -> Option<u32> {
        self.process.pid()
    }

    /// Without persistence: a restart starts empty.
    pub async fn start(dir: &Path) -> anyhow::Result<Self> {
        Self::start_with(dir, &[]).await
    }

    /// With `extra` arguments after the defaults (say [`AOF_ALWAYS`]).
    pub async fn start_with(dir: &Path, extra: &[&str]) -> anyhow::Result<Self> {
        let extra: Vec<String> = extra.iter().map(|a| a.to_string()).collect();
        let mut last_error = None;
        // A free port can be taken between our probe and redis' bind: retry a few times.
        for _ in 0..3 {
            let port = free_port()?;
            match Self::try_start(dir, port, extra.clone()).await {
                Ok(server) => return Ok(server),
                Err(e) => last_error = Some(e),
            }
        }
        Err(last_error.unwrap_or_else(|| anyhow::anyhow!("redis did not start")))
    }

    /// A replica of `master`, returned once its link is up and its first sync is done.
    pub async fn start_replica(dir: &Path, master: &RedisServer) -> anyhow::Result<Self> {
        let master_port = master.port.to_string();
        let replica =
            Self::start_with(dir, &["--replicaof", "127.0.0.1", master_port.as_str()]).await?;
        replica.wait_for_master_link().await?;
        Ok(replica)
    }

    /// Waits (bounded) until this replica's link to its master is up.
    pub async fn wait_for_master_link(&self) -> anyhow::Result<()> {
        wait_for(
            "the replica's link to its master",
            Duration::from_secs(20),
            || async {
                let info = self.info("replication").await.ok();
                Ok(info
                    .filter(|i| i.lines().any(|l| l.trim() == "master_link_status:up"))
                    .map(|_| ()))
            },
        )
        .await
    }

    async fn try_start(dir: &Path, port: u16, extra: Vec<String>) -> anyhow::Result<Self> {
        let data_dir = dir.join(format!("redis-{port}"));
        std::fs::create_dir_all(&data_dir)?;
        let mut server = Self {
            port,
            process: Self::spawn(dir, &data_dir, port, &extra)?,
            data_dir,
            log_dir: dir.to_owned(),
            extra,
        };
        server.wait_ready().await?;
        Ok(server)
    }

    fn spawn(
        log_dir: &Path,
        data_dir: &Path,
        port: u16,
        extra: &[String],
    ) -> anyhow::Result<ChildGuard> {
        let mut command = Command::new("redis-server");
        command
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(data_dir)
            .args(extra);
        // Appended to, so the log of a restarted server keeps its first life too.
        let log = log_dir.join(format!("redis-{port}.log"));
        ChildGuard::spawn_appending("redis-server", command, &log)
            .context("is redis-server installed? scripts/setup.sh installs it")
    }

    /// Polls PING until PONG (an AOF being loaded answers LOADING meanwhile).
    async fn wait_ready(&mut self) -> anyhow::Result<()> {
        let url = self.url();
        let process = &mut self.process;
        wait_for("redis-server", Duration::from_secs(20), || {
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

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

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

    /// Kills the server now (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        self.process.kill();
    }

    /// Starts the server again on the same port, with the same arguments and data directory
    /// (after [`RedisServer::kill`]; a running one is killed first), and waits until it has
    /// loaded what it persisted.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.process.kill();
        let mut last_error = None;
        // The port is ours, but the old process's sockets may take a moment to let go:
        // a few tries, backing off a little more each time.
        for attempt in 0..5u64 {
            tokio::time::sleep(Duration::from_millis(100 * attempt)).await;
            match Self::spawn(&self.log_dir, &self.data_dir, self.port, &self.extra) {
                Ok(process) => self.process = process,
                Err(e) => {
                    last_error = Some(e);
                    continue;
                }
            }
            match self.wait_ready().await {
                Ok(()) => return Ok(()),
                Err(e) => last_error = Some(e),
            }
        }
        Err(last_error.unwrap_or_else(|| anyhow::anyhow!("redis did not restart")))
    }

    /// Kills the server (SIGKILL, as a crashed host would stop) and starts an empty one on the
    /// same port, as a Redis restarted without persistence (or that lost its disk): clients
    /// reconnect to the same address and find nothing of what it held.
    pub async fn restart_empty(&mut self) -> anyhow::Result<()> {
        self.process.kill();
        std::fs::remove_dir_all(&self.data_dir)?;
        std::fs::create_dir_all(&self.data_dir)?;
        self.restart().await
    }

    /// Its data directory (AOF directory, RDB), which a restart reads again.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// Copies what the server has persisted so far (its whole data directory: the AOF
    /// directory with its manifest, base and increments) into `to`, which must not exist yet.
    /// The server is frozen (SIGSTOP) while the files are copied, so the copy is one moment of
    /// it: no command is half-written, no AOF rewrite swaps files under the copy. With
    /// `appendfsync everysec` the copy is what a crash a moment later could leave on disk when
    /// the last second's writes never reached it.
    pub fn snapshot_data(&self, to: &Path) -> anyhow::Result<()> {
        anyhow::ensure!(!to.exists(), "{} exists already", to.display());
        self.pause()?;
        let copied = copy_dir(&self.data_dir, to);
        let resumed = self.resume();
        copied.with_context(|| format!("copying {}", self.data_dir.display()))?;
        resumed
    }

    /// Kills the server (SIGKILL), puts the data directory copied by
    /// [`RedisServer::snapshot_data`] in place of its own and starts it again from it on the
    /// same port: a Redis that came back having lost whatever it wrote after the copy (the
    /// unsynced tail of an `everysec` AOF, an asynchronous replica promoted).
    pub async fn restart_from(&mut self, snapshot: &Path) -> anyhow::Result<()> {
        self.process.kill();
        std::fs::remove_dir_all(&self.data_dir)?;
        copy_dir(snapshot, &self.data_dir)
            .with_context(|| format!("restoring {}", snapshot.display()))?;
        self.restart().await
    }

    /// Freezes the server (SIGSTOP) as a stalled host would: connections stay open and
    /// commands queue up unanswered until [`RedisServer::resume`].
    pub fn pause(&self) -> anyhow::Result<()> {
        self.signal("STOP")
    }

    /// Lets a paused server go on (SIGCONT); it then runs what queued up meanwhile.
    pub fn resume(&self) -> anyhow::Result<()> {
        self.signal("CONT")
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

/// Copies the directory `from` (files and subdirectories) to `to`, creating it.
fn copy_dir(from: &Path, to: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), &target)?;
        }
    }
    Ok(())
}
