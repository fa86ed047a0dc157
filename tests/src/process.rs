//! Child processes that die with their owner, free ports, and polling with a deadline.

use std::future::Future;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// A child process that is killed (SIGKILL) and reaped when dropped, so a failing test never
/// leaves a server behind.
pub struct ChildGuard {
    name: String,
    child: Option<Child>,
    pub log_path: PathBuf,
}

impl ChildGuard {
    /// Starts `command` with stdout and stderr going to `log_path`.
    pub fn spawn(name: &str, command: Command, log_path: &Path) -> anyhow::Result<Self> {
        let log = std::fs::File::create(log_path)
            .with_context(|| format!("cannot create {}", log_path.display()))?;
        Self::spawn_logging(name, command, log, log_path)
    }

    /// Like [`ChildGuard::spawn`], appending to `log_path` (a restarted server's log keeps
    /// what its first life wrote).
    pub fn spawn_appending(name: &str, command: Command, log_path: &Path) -> anyhow::Result<Self> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log_path)
            .with_context(|| format!("cannot open {}", log_path.display()))?;
        Self::spawn_logging(name, command, log, log_path)
    }

    fn spawn_logging(
        name: &str,
        mut command: Command,
        log: std::fs::File,
        log_path: &Path,
    ) -> anyhow::Result<Self> {
        let child = command
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot start {name} ({command:?})"))?;
        Ok(Self {
            name: name.to_owned(),
            child: Some(child),
            log_path: log_path.to_owned(),
        })
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Fails if the process has exited, with the tail of its log.
    pub fn check_running(&mut self) -> anyhow::Result<()> {
        let Some(child) = self.child.as_mut() else {
            bail!("{} was stopped", self.name)
        };
        if let Some(status) = child.try_wait()? {
            bail!(
                "{} exited ({status}); last log lines:\n{}",
                self.name,
                self.log_tail(30)
            );
        }
        Ok(())
    }

    /// The exit status, once the process has exited.
    pub fn exit_status(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log_path).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Asks the process to stop (SIGTERM) and waits for it, up to `deadline`; then kills it.
    pub fn terminate(&mut self, deadline: std::time::Duration) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let started = Instant::now();
            while started.elapsed() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Kills the process now (SIGKILL) and waits for it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A port that was free a moment ago. Callers that start a server on it retry with another
/// port if the server finds it taken.
pub fn free_port() -> anyhow::Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

/// Polls `probe` until it returns `Ok(Some(v))`, failing after `deadline`. An `Err` from the
/// probe is fatal (say, the server process exited) and ends the wait at once; transient
/// failures (connection refused while starting) should be `Ok(None)`.
pub async fn wait_for<T, F, Fut>(what: &str, deadline: Duration, mut probe: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<Option<T>>>,
{
    let started = Instant::now();
    loop {
        if let Some(value) = probe()
            .await
            .with_context(|| format!("waiting for {what}"))?
        {
            return Ok(value);
        }
        if started.elapsed() > deadline {
            bail!("timed out after {deadline:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// The workspace root (this crate lives in `tests/`).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// The cargo profile directory (`target/debug` or `target/release`) the running executable
/// was built into, so the harness runs the syncer of the same build.
pub fn profile_dir() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    exe.ancestors()
        .find(|dir| {
            dir.file_name()
                .is_some_and(|n| n == "debug" || n == "release")
        })
        .map(Path::to_path_buf)
        .with_context(|| {
            format!(
                "cannot find the cargo profile directory above {}",
                exe.display()
            )
        })
}

/// `seckill-load` lives in its own crate (`load/`), so cargo does not hand tests its path;
/// `cargo build --workspace` puts it beside the test binaries' profile.
pub fn load_binary() -> anyhow::Result<PathBuf> {
    locate(
        "SECKILL_LOAD_BIN",
        profile_dir()?.join("seckill-load"),
        "build it with `cargo build -p seckill-load` (same profile as this test)",
    )
}

/// A binary named by `env_var`, or found by `default`; the error says how to build it.
pub fn locate(env_var: &str, default: PathBuf, how_to_build: &str) -> anyhow::Result<PathBuf> {
    let path = std::env::var_os(env_var)
        .map(PathBuf::from)
        .unwrap_or(default);
    if !path.exists() {
        bail!(
            "{} not found (set {env_var} to override); {how_to_build}",
            path.display()
        );
    }
    Ok(path)
}

/// A scratch directory for one test's logs and configs, removed on drop unless the test
/// failed (a panicking thread keeps it for the post-mortem).
pub struct Scratch {
    pub path: PathBuf,
}

impl Scratch {
    pub fn new(name: &str) -> anyhow::Result<Self> {
        let path = std::env::temp_dir().join(format!("{name}-{}", unique_suffix()));
        std::fs::create_dir_all(&path)?;
        Ok(Self { path })
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("logs kept in {}", self.path.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// Unique within this machine for this run: pid, a counter and the clock.
pub fn unique_suffix() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{}_{n}_{nanos:x}", std::process::id())
}
