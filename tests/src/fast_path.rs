//! The native sold-out fast path in the harness: the Envoy routes (`seckill-syncer
//! fast-path-routes`) for `envoy/local.yaml`'s `{{FAST_ROUTES}}`, and the switch process
//! (`seckill-syncer fast-path`) that sets their runtime keys on an Envoy.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::Context;

use crate::process::ChildGuard;
use crate::syncer::syncer_binary;

/// The routes for `goods`, indented for `envoy/local.yaml`'s route list, as the syncer prints
/// them for the stack's plugin configuration (`/seckill/{goods_id}/buy`, POST).
pub fn routes(goods: &[String]) -> anyhow::Result<String> {
    if goods.is_empty() {
        return Ok(String::new());
    }
    let output = Command::new(syncer_binary()?)
        .args(["fast-path-routes", "--indent", "14", "--goods"])
        .arg(goods.join(","))
        .output()
        .context("cannot run seckill-syncer fast-path-routes")?;
    anyhow::ensure!(
        output.status.success(),
        "fast-path-routes failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(String::from_utf8(output.stdout)?)
}

/// A running `seckill-syncer fast-path`.
pub struct FastPathSwitch {
    process: ChildGuard,
    /// Where its /metrics is served, when started with one.
    metrics_port: Option<u16>,
}

impl FastPathSwitch {
    /// Starts the switch for `goods` on the Envoys whose admin ports are given, a round every
    /// `every`, serving /metrics on `metrics_port` if given ([`FastPathSwitch::metrics`]). It
    /// has no readiness signal of its own: tests wait for the runtime key they expect
    /// ([`runtime_value`]).
    pub fn start(
        dir: &Path,
        redis_url: &str,
        key_prefix: &str,
        envoy_admin_ports: &[u16],
        goods: &[String],
        every: Duration,
        metrics_port: Option<u16>,
    ) -> anyhow::Result<Self> {
        let admins: Vec<String> = envoy_admin_ports
            .iter()
            .map(|port| format!("http://127.0.0.1:{port}"))
            .collect();
        let mut command = Command::new(syncer_binary()?);
        command
            .arg("fast-path")
            .args(["--redis-url", redis_url, "--key-prefix", key_prefix])
            .args(["--envoy-admin", &admins.join(",")])
            .args(["--goods", &goods.join(",")])
            .args(["--every-ms", &every.as_millis().to_string()])
            .env("RUST_LOG", "info,seckill_syncer::fast_path=debug");
        if let Some(port) = metrics_port {
            command.args(["--metrics-listen", &format!("127.0.0.1:{port}")]);
        }
        let log = dir.join(format!("fast-path-{}.log", crate::process::unique_suffix()));
        Ok(Self {
            process: ChildGuard::spawn("fast-path", command, &log)?,
            metrics_port,
        })
    }

    /// The text of its /metrics (an error until it listens: poll with a deadline).
    pub async fn metrics(&self, http: &reqwest::Client) -> anyhow::Result<String> {
        let port = self
            .metrics_port
            .context("this switch was started without --metrics-listen")?;
        Ok(http
            .get(format!("http://127.0.0.1:{port}/metrics"))
            .send()
            .await?
            .error_for_status()?
            .text()
            .await?)
    }

    /// Asks it to stop (SIGTERM: it hands every goods back to the filter first) and waits.
    pub fn terminate(&mut self) {
        self.process.terminate(Duration::from_secs(10));
    }

    pub fn kill(&mut self) {
        self.process.kill();
    }

    pub fn check_running(&mut self) -> anyhow::Result<()> {
        self.process.check_running()
    }

    pub fn log_tail(&self) -> String {
        self.process.log_tail(30)
    }
}

/// The value of a runtime key on the Envoy whose admin port is given (`None`: not set).
pub async fn runtime_value(
    http: &reqwest::Client,
    admin_port: u16,
    key: &str,
) -> anyhow::Result<Option<String>> {
    let runtime: serde_json::Value = http
        .get(format!("http://127.0.0.1:{admin_port}/runtime"))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    Ok(runtime["entries"][key]["final_value"]
        .as_str()
        .map(str::to_owned))
}
