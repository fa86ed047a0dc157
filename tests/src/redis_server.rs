//! A private redis-server on a free port, killed when dropped.

use std::process::Command;
use std::time::Duration;

use anyhow::Context;

use crate::process::{free_port, wait_for, ChildGuard};

pub struct RedisServer {
    pub port: u16,
    process: ChildGuard,
}

impl RedisServer {
    pub async fn start(dir: &std::path::Path) -> anyhow::Result<Self> {
        let mut last_error = None;
        // A free port can be taken between our probe and redis' bind: retry a few times.
        for _ in 0..3 {
            match Self::try_start(dir).await {
                Ok(server) => return Ok(server),
                Err(e) => last_error = Some(e),
            }
        }
        Err(last_error.unwrap_or_else(|| anyhow::anyhow!("redis did not start")))
    }

    async fn try_start(dir: &std::path::Path) -> anyhow::Result<Self> {
        let port = free_port()?;
        let mut command = Command::new("redis-server");
        command
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(dir);
        let mut process = ChildGuard::spawn(
            "redis-server",
            command,
            &dir.join(format!("redis-{port}.log")),
        )
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
        Ok(Self { port, process })
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
