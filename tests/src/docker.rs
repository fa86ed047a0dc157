//! A private Docker engine for one test: Debian's `dockerd` with its own data root, exec root,
//! pid file and socket, so it shares nothing with any other engine on the machine. It has no
//! default bridge and writes no iptables rules (the host's firewall stays as it was; published
//! ports go through docker-proxy), and it gives its networks a /24 that no route on this
//! machine uses. Dropping it stops the engine and removes everything it stored.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::Context;

use crate::process::{unique_suffix, wait_for, ChildGuard};

/// How long the engine may take to answer after it was started (it starts its containerd).
const START_DEADLINE: Duration = Duration::from_secs(60);
/// How long the engine may take to stop; it gives running containers 5 s of that.
const STOP_DEADLINE: Duration = Duration::from_secs(30);

pub struct DockerEngine {
    /// Data root, exec root and socket. Under /tmp with a short name: unix socket paths
    /// (containerd's among them) must stay under 108 bytes.
    root: PathBuf,
    socket: PathBuf,
    process: Option<ChildGuard>,
}

impl DockerEngine {
    /// Starts `dockerd` (its log goes to `log_dir/dockerd.log`) and waits until it answers.
    pub async fn start(log_dir: &Path) -> anyhow::Result<Self> {
        let root = PathBuf::from(format!("/tmp/dk-{}", unique_suffix()));
        std::fs::create_dir_all(&root)?;
        let socket = root.join("docker.sock");
        let subnet = free_subnet().context("no free /24 for the engine's networks")?;
        let mut command = Command::new("dockerd");
        command
            .arg("--data-root")
            .arg(root.join("data"))
            .arg("--exec-root")
            .arg(root.join("exec"))
            .arg("--pidfile")
            .arg(root.join("dockerd.pid"))
            .arg("-H")
            .arg(format!("unix://{}", socket.display()))
            .args(["--bridge=none", "--iptables=false", "--ip-forward=false"])
            .args(["--ip-masq=false", "--shutdown-timeout", "5"])
            .arg("--default-address-pool")
            .arg(format!("base={subnet},size=24"));
        // Made before the engine starts, so a failed start still removes the directory.
        let mut engine = Self {
            root,
            socket,
            process: None,
        };
        engine.process = Some(ChildGuard::spawn(
            "dockerd",
            command,
            &log_dir.join("dockerd.log"),
        )?);
        let host = engine.host();
        let process = engine.process.as_mut().context("dockerd was not started")?;
        wait_for("dockerd to answer", START_DEADLINE, || {
            let answered = process.check_running().and_then(|()| {
                let mut version = client(&host);
                version.args(["version", "--format", "{{.Server.Version}}"]);
                Ok(version.output()?.status.success())
            });
            async move { answered.map(|ok| ok.then_some(())) }
        })
        .await?;
        Ok(engine)
    }

    /// `DOCKER_HOST` for clients of this engine.
    pub fn host(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    /// The `docker` client, talking to this engine only.
    pub fn docker(&self) -> Command {
        client(&self.host())
    }

    /// Runs `docker ARGS` and returns its standard output; fails with its output otherwise.
    pub fn run(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut command = self.docker();
        command.args(args);
        output_of(command)
    }

    fn stop(&mut self) {
        if let Some(mut process) = self.process.take() {
            process.terminate(STOP_DEADLINE);
        }
        // A killed engine can leave its containers' overlay and shm mounts behind: undo them,
        // deepest first, before removing the files under them.
        let mut mounts = mounts_under(&self.root);
        mounts.sort_by_key(|m| std::cmp::Reverse(m.components().count()));
        for mount in mounts {
            let _ = Command::new("umount").arg("-l").arg(&mount).status();
        }
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

impl Drop for DockerEngine {
    fn drop(&mut self) {
        self.stop();
    }
}

fn client(host: &str) -> Command {
    let mut command = Command::new("docker");
    command
        .env("DOCKER_HOST", host)
        .env_remove("DOCKER_CONTEXT")
        .env("NO_COLOR", "1");
    command
}

/// Runs `command` and returns its standard output, or an error with everything it printed.
pub fn output_of(mut command: Command) -> anyhow::Result<String> {
    let output = command
        .output()
        .with_context(|| format!("cannot run {command:?}"))?;
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    anyhow::ensure!(
        output.status.success(),
        "{command:?} failed ({}):\n{stdout}{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(stdout)
}

fn mounts_under(root: &Path) -> Vec<PathBuf> {
    let table = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    table
        .lines()
        .filter_map(|line| line.split_whitespace().nth(1))
        .map(PathBuf::from)
        .filter(|mount| mount.starts_with(root))
        .collect()
}

/// A /24 in 10.213.0.0/16 that overlaps no route of this machine (another engine's networks
/// included), starting from a place that differs between processes.
fn free_subnet() -> anyhow::Result<String> {
    let routes = std::fs::read_to_string("/proc/net/route")?;
    let taken: Vec<(u32, u32)> = routes.lines().skip(1).filter_map(parse_route).collect();
    let start = std::process::id() % 256;
    (0..256)
        .map(|i| (start + i) % 256)
        .map(|n| (0x0a_d5_00_00 | (n << 8), 0xff_ff_ff_00))
        .find(|&(net, mask)| {
            taken
                .iter()
                .all(|&(dest, route_mask)| (dest ^ net) & (mask & route_mask) != 0)
        })
        .map(|(net, _)| {
            let [a, b, c, d] = net.to_be_bytes();
            format!("{a}.{b}.{c}.{d}/24")
        })
        .context("every 10.213.x.0/24 is routed already")
}

/// Destination and mask of one line of /proc/net/route (little-endian hex), in host order;
/// the default route (mask 0) overlaps nothing that matters and is left out.
fn parse_route(line: &str) -> Option<(u32, u32)> {
    let fields: Vec<&str> = line.split_whitespace().collect();
    let dest = u32::from_str_radix(fields.get(1)?, 16).ok()?.swap_bytes();
    let mask = u32::from_str_radix(fields.get(7)?, 16).ok()?.swap_bytes();
    (mask != 0).then_some((dest, mask))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_route_line_reads_as_destination_and_mask() {
        // 10.213.7.0/24 on a bridge, as the kernel prints it.
        let line = "br-1\t0007D50A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0";
        assert_eq!(parse_route(line), Some((0x0a_d5_07_00, 0xff_ff_ff_00)));
        let default = "eth0\t00000000\t0100000A\t0003\t0\t0\t0\t00000000\t0\t0\t0";
        assert_eq!(parse_route(default), None);
    }
}
