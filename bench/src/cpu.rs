//! CPU time from /proc: what each process (Redis, the syncer, MySQL, a load generator) and
//! the whole machine spent during a measurement, so a benchmark can say who used the cores.

/// Clock ticks per second of /proc's CPU times.
pub fn clock_ticks() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// User + system CPU ticks of a process so far, and of its children it has waited for (0 if
/// it cannot be read).
pub fn process_ticks(pid: u32) -> (f64, f64) {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return (0.0, 0.0);
    };
    // Fields after the command name (which may hold spaces) start at field 3, the state:
    // utime, stime, cutime and cstime are fields 14 to 17.
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return (0.0, 0.0);
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (field(11) + field(12), field(13) + field(14))
}

/// The MariaDB server's pid (the shared server the benchmark's databases live on).
pub fn mysql_pid() -> Option<u32> {
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .find_map(|entry| {
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let comm = std::fs::read_to_string(entry.path().join("comm")).ok()?;
            matches!(comm.trim(), "mariadbd" | "mysqld").then_some(pid)
        })
}

/// CPU ticks the whole machine spent busy (not idle, not waiting for I/O) so far.
pub fn machine_busy_ticks() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/stat") else {
        return 0.0;
    };
    let Some(line) = stat.lines().next() else {
        return 0.0;
    };
    let values: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal ...
    let total: f64 = values.iter().take(8).sum();
    let idle = values.get(3).copied().unwrap_or(0.0) + values.get(4).copied().unwrap_or(0.0);
    total - idle
}

/// Named processes' CPU over a phase: read once at its start, then again at its end.
pub struct PhaseCpu {
    processes: Vec<(&'static str, Option<u32>, f64)>,
    machine_busy: f64,
    started: std::time::Instant,
}

/// What one process, or the whole machine, spent over a phase, in cores (1.0 is one core busy
/// the whole phase).
#[derive(Debug, Clone)]
pub struct CoresUsed {
    pub name: &'static str,
    pub cores: f64,
}

impl PhaseCpu {
    /// Starts the phase. A process whose pid is unknown counts 0.
    pub fn start(processes: &[(&'static str, Option<u32>)]) -> Self {
        PhaseCpu {
            processes: processes
                .iter()
                .map(|(name, pid)| (*name, *pid, pid.map(|p| process_ticks(p).0).unwrap_or(0.0)))
                .collect(),
            machine_busy: machine_busy_ticks(),
            started: std::time::Instant::now(),
        }
    }

    /// Adds a process started during the phase: all its CPU time so far is the phase's.
    pub fn add_born(&mut self, name: &'static str, pid: Option<u32>) {
        self.processes.push((name, pid, 0.0));
    }

    /// Ends the phase: each process's cores, and the whole machine's.
    pub fn finish(&self) -> PhaseCores {
        let seconds = self.started.elapsed().as_secs_f64().max(1e-9);
        let cores = |before: f64, after: f64| (after - before).max(0.0) / clock_ticks() / seconds;
        let processes = self
            .processes
            .iter()
            .map(|(name, pid, before)| CoresUsed {
                name,
                cores: pid
                    .map(|p| cores(*before, process_ticks(p).0))
                    .unwrap_or(0.0),
            })
            .collect();
        PhaseCores {
            processes,
            machine: cores(self.machine_busy, machine_busy_ticks()),
        }
    }
}

/// A phase's CPU: each named process's cores, and the whole machine's busy cores.
#[derive(Debug, Clone)]
pub struct PhaseCores {
    pub processes: Vec<CoresUsed>,
    pub machine: f64,
}
