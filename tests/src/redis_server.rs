//! A private redis-server on a free port, killed when dropped. It keeps nothing on disk
//! (`--save "" --appendonly no`), so a restart finds it empty.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::Context;

use crate::process::{free_port, wait_for, ChildGuard};

/// Attempts at starting a server: a port probed free can be taken before redis binds it (a
/// fresh start then tries another port).
const START_ATTEMPTS: usize = 3;

pub struct RedisServer {
    pub port: u16,
    dir: PathBuf,
    process: ChildGuard,
}

impl RedisServer {
    pub async fn start(dir: &Path) -> anyhow::Result<Self> {
        let mut last_error = None;
        for _ in 0..START_ATTEMPTS {
            let port = free_port()?;
            match spawn(dir, port).await {
                Ok(process) => {
                    return Ok(Self {
                        port,
                        dir: dir.to_owned(),
                        process,
                    })
                }
                Err(e) => last_error = Some(e),
            }
        }
        Err(last_error.unwrap_or_else(|| anyhow::anyhow!("redis did not start")))
    }

    /// Kills the server (SIGKILL, as a crashed host would stop) and starts an empty one on the
    /// same port, as a Redis restarted without persistence: clients reconnect to the same
    /// address and find nothing of what it held.
    pub async fn restart_empty(&mut self) -> anyhow::Result<()> {
        self.process.kill();
        self.process = spawn(&self.dir, self.port)
            .await
            .with_context(|| format!("restarting redis-server on port {}", self.port))?;
        Ok(())
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    pub async fn connection(&self) -> anyhow::Result<redis::aio::MultiplexedConnection> {
        Ok(redis::Client::open(self.url())?
            .get_multiplexed_async_connection()
            .await?)
    }

    pub fn kill(&mut self) {
        self.process.kill();
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

/// Starts redis-server on `port` and waits (bounded) until it answers PING.
async fn spawn(dir: &Path, port: u16) -> anyhow::Result<ChildGuard> {
    let mut command = Command::new("redis-server");
    command
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no"])
        .arg("--dir")
        .arg(dir);
    // One log per start: a restarted server's log does not overwrite its predecessor's.
    let log = (0..1_000)
        .map(|n| dir.join(format!("redis-{port}-{n}.log")))
        .find(|path| !path.exists())
        .context("no log file name left")?;
    let mut process = ChildGuard::spawn("redis-server", command, &log)
        .context("is redis-server installed? scripts/setup.sh installs it")?;
    let url = format!("redis://127.0.0.1:{port}/");
    wait_for("redis-server", Duration::from_secs(10), || {
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
    .await?;
    Ok(process)
}
