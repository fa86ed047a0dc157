//! A private Kafka-protocol broker (Tansu, sqlite storage) on a free port. It can be stopped
//! and started again on the same port with the same data, to test a broker outage.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::Context;

use crate::process::{free_port, wait_for, ChildGuard};

/// Topic of sale events and its dead-letter topic, as the tests create them.
pub const TOPIC: &str = "seckill.sales";
pub const DEAD_LETTER_TOPIC: &str = "seckill.sales.dead-letter";
pub const TOPIC_PARTITIONS: u32 = 3;

pub struct KafkaBroker {
    pub port: u16,
    dir: PathBuf,
    /// Behind a lock so a test holding the broker in a shared fixture can stop and resume it.
    process: std::sync::Mutex<Option<ChildGuard>>,
}

pub fn tansu_binary() -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os("SECKILL_TANSU_BIN") {
        return Ok(PathBuf::from(path));
    }
    let home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .context("no CARGO_HOME or HOME")?;
    let path = home.join("bin/tansu");
    anyhow::ensure!(
        path.exists(),
        "{} not found; scripts/setup.sh installs Tansu (cargo install tansu)",
        path.display()
    );
    Ok(path)
}

impl KafkaBroker {
    /// The broker's process id while it runs (a benchmark reads its CPU time).
    pub fn pid(&self) -> Option<u32> {
        self.process.lock().ok()?.as_ref().and_then(ChildGuard::pid)
    }

    /// Starts a broker and creates the sale topic and its dead-letter topic.
    pub async fn start(dir: &Path) -> anyhow::Result<Self> {
        let mut last_error = None;
        for _ in 0..3 {
            let broker = KafkaBroker {
                port: free_port()?,
                dir: dir.to_owned(),
                process: std::sync::Mutex::new(None),
            };
            match broker.resume().await {
                Ok(()) => {
                    broker.create_topic(TOPIC, TOPIC_PARTITIONS)?;
                    broker.create_topic(DEAD_LETTER_TOPIC, 1)?;
                    return Ok(broker);
                }
                Err(e) => last_error = Some(e),
            }
        }
        Err(last_error.unwrap_or_else(|| anyhow::anyhow!("the broker did not start")))
    }

    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Publishes `payload` to the sale topic keyed by `goods_id`, as the relay keys its
    /// events (so the same partition as that goods' sales): for tests that inject what no
    /// script writes.
    pub async fn publish_sale_message(&self, goods_id: &str, payload: &[u8]) -> anyhow::Result<()> {
        use rdkafka::producer::{FutureProducer, FutureRecord};
        let producer: FutureProducer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", self.bootstrap())
            .create()?;
        producer
            .send(
                FutureRecord::to(TOPIC).key(goods_id).payload(payload),
                Duration::from_secs(10),
            )
            .await
            .map_err(|(e, _)| e)?;
        Ok(())
    }

    /// Stops the broker (SIGTERM, SIGKILL after 10 s); its data stays on disk. Tansu 0.6's
    /// sqlite storage does not survive a SIGKILL intact (its next produce panics), so the
    /// outage test stops it the way an operator would.
    pub fn stop(&self) {
        let process = self.process.lock().ok().and_then(|mut p| p.take());
        if let Some(mut process) = process {
            process.terminate(Duration::from_secs(10));
        }
    }

    /// Starts the broker (again) on its port with its data.
    pub async fn resume(&self) -> anyhow::Result<()> {
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let mut command = Command::new(tansu_binary()?);
        command
            .current_dir(&self.dir)
            .arg("broker")
            .args(["--listener-url", &url, "--advertised-listener-url", &url])
            .args([
                "--storage-engine",
                &format!("sqlite://tansu-{}.db", self.port),
            ])
            .env("RUST_LOG", "warn");
        let log = self.dir.join(format!("tansu-{}.log", self.port));
        let mut process = ChildGuard::spawn("tansu", command, &log)?;
        let address = self.bootstrap();
        wait_for("the Kafka broker", Duration::from_secs(30), || {
            let running = process.check_running();
            let address = address.clone();
            async move {
                running?;
                Ok(tokio::net::TcpStream::connect(address)
                    .await
                    .ok()
                    .map(|_| ()))
            }
        })
        .await?;
        if let Ok(mut slot) = self.process.lock() {
            *slot = Some(process);
        }
        Ok(())
    }

    fn create_topic(&self, name: &str, partitions: u32) -> anyhow::Result<()> {
        let output = Command::new(tansu_binary()?)
            .args([
                "topic",
                "create",
                "--broker",
                &format!("tcp://127.0.0.1:{}", self.port),
            ])
            .args(["--partitions", &partitions.to_string(), name])
            .output()?;
        anyhow::ensure!(
            output.status.success(),
            "cannot create topic {name}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        Ok(())
    }
}
