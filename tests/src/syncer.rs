//! The real syncer binary, started as a process so tests can kill it.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::process::{free_port, locate, profile_dir, wait_for, ChildGuard};

pub struct SyncerProcess {
    /// The HTTP port (`serve`) or the metrics port (`relay`, `write`).
    pub port: u16,
    process: ChildGuard,
}

pub struct SyncerArgs<'a> {
    pub redis_url: &'a str,
    pub mysql_url: &'a str,
    pub key_prefix: &'a str,
    /// Kafka bootstrap address, for the roles that speak Kafka.
    pub kafka: Option<&'a str>,
}

/// What the process runs.
#[derive(Debug, Clone)]
pub enum Role {
    /// The HTTP service; with `pipeline`, also the relay, the writer and periodic reconcile.
    Serve { pipeline: bool },
    /// The outbox relay alone, under this name in the outbox consumer group.
    Relay { name: String },
    /// The batched MySQL writer alone.
    Write { batch_size: u32, batch_wait_ms: u32 },
}

pub fn syncer_binary() -> anyhow::Result<std::path::PathBuf> {
    locate(
        "SECKILL_SYNCER_BIN",
        profile_dir()?.join("seckill-syncer"),
        "build it with `cargo build -p seckill-syncer` (same profile as this binary)",
    )
}

impl SyncerProcess {
    /// The HTTP service alone.
    pub async fn start(dir: &Path, args: &SyncerArgs<'_>) -> anyhow::Result<Self> {
        Self::start_role(dir, args, Role::Serve { pipeline: false }, &[]).await
    }

    /// Starts `role`, with extra environment (say `SECKILL_CRASH_AT`).
    pub async fn start_role(
        dir: &Path,
        args: &SyncerArgs<'_>,
        role: Role,
        env: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        Self::start_role_with(dir, args, role, env, &[]).await
    }

    /// Starts `role` with extra environment and extra command-line arguments after the
    /// harness's own (say `--fallback-rate 100`).
    pub async fn start_role_with(
        dir: &Path,
        args: &SyncerArgs<'_>,
        role: Role,
        env: &[(&str, &str)],
        cli: &[&str],
    ) -> anyhow::Result<Self> {
        let binary = syncer_binary()?;
        let mut last_error = None;
        for _ in 0..3 {
            match Self::try_start(&binary, dir, args, &role, env, cli).await {
                Ok(syncer) => return Ok(syncer),
                Err(e) => last_error = Some(e),
            }
        }
        Err(last_error.unwrap_or_else(|| anyhow::anyhow!("syncer did not start")))
    }

    /// Runs `serve` with `env` where it is expected to refuse to start: returns its exit
    /// status and its log once it exits (bounded), or fails if it became ready instead.
    pub async fn start_refused(
        dir: &Path,
        args: &SyncerArgs<'_>,
        env: &[(&str, &str)],
    ) -> anyhow::Result<(std::process::ExitStatus, String)> {
        let port = free_port()?;
        let role = Role::Serve { pipeline: false };
        let (command, name, _) = Self::command(&syncer_binary()?, args, &role, env, &[], port)?;
        let log = dir.join(format!("syncer-{name}-{port}-refused.log"));
        let mut process = ChildGuard::spawn("seckill-syncer", command, &log)?;
        let health = format!("http://127.0.0.1:{port}/healthz");
        let client = reqwest::Client::new();
        let status = wait_for(
            "the syncer to refuse and exit",
            Duration::from_secs(30),
            || {
                let status = process.exit_status();
                let request = client.get(&health).send();
                async move {
                    if status.is_some() {
                        return Ok(status);
                    }
                    if request.await.is_ok_and(|r| r.status().is_success()) {
                        anyhow::bail!("the syncer started and serves; it was expected to refuse");
                    }
                    Ok(None)
                }
            },
        )
        .await?;
        Ok((status, std::fs::read_to_string(&log)?))
    }

    /// The command line of `role` listening (or serving metrics) on `port`, with `cli` after
    /// the harness's arguments; with its name and the path that answers once it is ready.
    fn command(
        binary: &Path,
        args: &SyncerArgs<'_>,
        role: &Role,
        env: &[(&str, &str)],
        cli: &[&str],
        port: u16,
    ) -> anyhow::Result<(Command, &'static str, &'static str)> {
        let mut command = Command::new(binary);
        let (name, ready_path) = match role {
            Role::Serve { pipeline } => {
                command
                    .arg("serve")
                    .args(["--listen", &format!("127.0.0.1:{port}")]);
                // Each role's credential, from the environment as production would give it
                // (a test that gives --secrets-dir brings its own; the two cannot mix).
                if !cli.contains(&"--secrets-dir") {
                    command.envs(crate::stack::credential_env());
                }
                // The key winners' passes are signed with, from the environment too: a test's
                // `env` can replace it.
                command.env("SECKILL_PASS_KEY", crate::stack::PASS_KEY);
                if *pipeline {
                    command.args(["--pipeline", "--reconcile-every-s", "1"]);
                }
                ("serve", "/healthz")
            }
            Role::Relay { name } => {
                command
                    .arg("relay")
                    .args(["--relay-name", name])
                    .args(["--metrics-listen", &format!("127.0.0.1:{port}")]);
                ("relay", "/metrics")
            }
            Role::Write {
                batch_size,
                batch_wait_ms,
            } => {
                command
                    .arg("write")
                    .args(["--batch-size", &batch_size.to_string()])
                    .args(["--batch-wait-ms", &batch_wait_ms.to_string()])
                    .args(["--metrics-listen", &format!("127.0.0.1:{port}")]);
                ("write", "/metrics")
            }
        };
        command
            .args(["--redis-url", args.redis_url])
            .args(["--mysql-url", args.mysql_url])
            .args(["--key-prefix", args.key_prefix])
            .env("RUST_LOG", "warn,seckill_syncer=info");
        // A serve without the pipeline uses Kafka only for the admin API's reseed.
        let needs_kafka = !matches!(role, Role::Serve { pipeline: false });
        match args.kafka {
            Some(kafka) => {
                command.args(["--kafka-brokers", kafka]);
            }
            None if needs_kafka => anyhow::bail!("{name} needs a Kafka broker"),
            None => {}
        }
        command.args(cli);
        for (key, value) in env {
            command.env(key, value);
        }
        Ok((command, name, ready_path))
    }

    async fn try_start(
        binary: &Path,
        dir: &Path,
        args: &SyncerArgs<'_>,
        role: &Role,
        env: &[(&str, &str)],
        cli: &[&str],
    ) -> anyhow::Result<Self> {
        let port = free_port()?;
        let (command, name, ready_path) = Self::command(binary, args, role, env, cli, port)?;
        let log = dir.join(format!("syncer-{name}-{port}.log"));
        let mut process = ChildGuard::spawn("seckill-syncer", command, &log)?;
        let ready = format!("http://127.0.0.1:{port}{ready_path}");
        let client = reqwest::Client::new();
        wait_for("the syncer to be ready", Duration::from_secs(30), || {
            let running = process.check_running();
            let request = client.get(&ready).send();
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

    /// Kills the process now (SIGKILL).
    pub fn kill(&mut self) {
        self.process.kill();
    }

    /// Fails if the process has exited.
    pub fn check_running(&mut self) -> anyhow::Result<()> {
        self.process.check_running()
    }

    pub fn pid(&self) -> Option<u32> {
        self.process.pid()
    }

    /// Sends SIGTERM and waits (bounded) for the process to exit on its own; returns its
    /// exit status.
    pub async fn terminate(
        &mut self,
        deadline: Duration,
    ) -> anyhow::Result<std::process::ExitStatus> {
        let pid = self.pid().ok_or_else(|| anyhow::anyhow!("not running"))?;
        let status = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()?;
        anyhow::ensure!(status.success(), "kill -TERM {pid} failed");
        self.wait_exit("the syncer to exit after SIGTERM", deadline)
            .await
    }

    /// Waits (bounded) for the process to exit by itself; returns its exit status.
    pub async fn wait_exit(
        &mut self,
        what: &str,
        deadline: Duration,
    ) -> anyhow::Result<std::process::ExitStatus> {
        wait_for(what, deadline, || {
            let status = self.process.exit_status();
            async move { Ok(status) }
        })
        .await
    }

    /// Waits (bounded) until `/healthz` answers 200: the service reaches Redis again, say
    /// after a Redis restart (its first commands on the broken connection fail with 503).
    pub async fn wait_healthy(&self, deadline: Duration) -> anyhow::Result<()> {
        let url = format!("{}/healthz", self.url());
        wait_for("the syncer to reach Redis", deadline, || async {
            let response = reqwest::get(&url).await;
            Ok(response
                .ok()
                .filter(|r| r.status().is_success())
                .map(|_| ()))
        })
        .await
    }

    /// The text of its /metrics.
    pub async fn metrics(&self) -> anyhow::Result<String> {
        Ok(reqwest::Client::new()
            .get(format!("{}/metrics", self.url()))
            .bearer_auth(crate::stack::METRICS_SECRET)
            .send()
            .await?
            .error_for_status()?
            .text()
            .await?)
    }

    /// Deduct calls the syncer has answered, read from its /metrics.
    pub async fn deduct_calls(&self) -> anyhow::Result<u64> {
        let text = self.metrics().await?;
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

/// One sample of a metric, named with its labels as the exposition writes them (say
/// `seckill_fallback_decisions_total{outcome="won"}`); 0 if absent.
pub fn metric_sample(text: &str, sample: &str) -> u64 {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .find_map(|line| {
            let value = line.strip_prefix(sample)?.strip_prefix(' ')?;
            value.trim().parse::<f64>().ok()
        })
        .map_or(0, |v| v as u64)
}

#[cfg(test)]
mod tests {
    #[test]
    fn sums_a_counter_family() {
        let text = "# TYPE x counter\nx{a=\"1\"} 3\nx{a=\"2\"} 4\nxy 100\nx 1\n";
        assert_eq!(super::sum_metric(text, "x"), 8);
    }

    #[test]
    fn reads_one_sample() {
        let text = "# TYPE x counter\nx{a=\"1\"} 3\nx{a=\"12\"} 4\nx 1\n";
        assert_eq!(super::metric_sample(text, "x{a=\"1\"}"), 3);
        assert_eq!(super::metric_sample(text, "x{a=\"12\"}"), 4);
        assert_eq!(super::metric_sample(text, "x"), 1);
        assert_eq!(super::metric_sample(text, "x{a=\"2\"}"), 0);
    }
}
