//! The real syncer binary, started as a process so tests can kill it.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::process::{free_port, locate, profile_dir, wait_for, ChildGuard};

pub struct SyncerProcess {
    pub port: u16,
    process: ChildGuard,
}

pub struct SyncerArgs<'a> {
    pub redis_url: &'a str,
    pub mysql_url: &'a str,
    pub key_prefix: &'a str,
    pub secret: &'a str,
}

pub fn syncer_binary() -> anyhow::Result<std::path::PathBuf> {
    locate(
        "SECKILL_SYNCER_BIN",
        profile_dir()?.join("seckill-syncer"),
        "build it with `cargo build -p seckill-syncer` (same profile as this binary)",
    )
}

impl SyncerProcess {
    pub async fn start(dir: &Path, args: &SyncerArgs<'_>) -> anyhow::Result<Self> {
        let binary = syncer_binary()?;
        let mut last_error = None;
        for _ in 0..3 {
            match Self::try_start(&binary, dir, args).await {
                Ok(syncer) => return Ok(syncer),
                Err(e) => last_error = Some(e),
            }
        }
        Err(last_error.unwrap_or_else(|| anyhow::anyhow!("syncer did not start")))
    }

    async fn try_start(binary: &Path, dir: &Path, args: &SyncerArgs<'_>) -> anyhow::Result<Self> {
        let port = free_port()?;
        let mut command = Command::new(binary);
        command
            .arg("serve")
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--redis-url", args.redis_url])
            .args(["--mysql-url", args.mysql_url])
            .args(["--key-prefix", args.key_prefix])
            .args(["--secret", args.secret])
            .env("RUST_LOG", "warn,seckill_syncer=info");
        let mut process = ChildGuard::spawn(
            "seckill-syncer",
            command,
            &dir.join(format!("syncer-{port}.log")),
        )?;
        let health = format!("http://127.0.0.1:{port}/healthz");
        let client = reqwest::Client::new();
        wait_for("the syncer's /healthz", Duration::from_secs(30), || {
            let running = process.check_running();
            let request = client.get(&health).send();
            async move {
                running?;
                Ok(request
                    .await
                    .ok()
                    .filter(|r| r.status().is_success())
                    .map(|_| ()))
            }
        })
        .await?;
        Ok(Self { port, process })
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn kill(&mut self) {
        self.process.kill();
    }

    /// Deduct calls the syncer has answered, by outcome, read from its /metrics.
    pub async fn deduct_calls(&self) -> anyhow::Result<u64> {
        let text = reqwest::get(format!("{}/metrics", self.url()))
            .await?
            .text()
            .await?;
        Ok(sum_metric(&text, "seckill_deduct_total")
            + sum_metric(&text, "seckill_deduct_errors_total"))
    }
}

/// Sums every sample of a Prometheus counter family in a text exposition.
pub fn sum_metric(text: &str, family: &str) -> u64 {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter(|line| {
            line.strip_prefix(family)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|v| v as u64)
        .sum()
}

#[cfg(test)]
mod tests {
    #[test]
    fn sums_a_counter_family() {
        let text = "# TYPE x counter\nx{a=\"1\"} 3\nx{a=\"2\"} 4\nxy 100\nx 1\n";
        assert_eq!(super::sum_metric(text, "x"), 8);
    }
}
