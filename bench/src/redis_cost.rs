//! What Redis itself spends, read from its own counters: `INFO commandstats` (script calls and
//! the microseconds Redis spent inside them) and `INFO cpu` (its main thread's CPU, which adds
//! reading commands and writing replies to the scripts' own time). Read on every node before
//! and after a measurement: the difference divided by the decisions made is Redis's cost per
//! decision, from which the capacity of one Redis core, and of N masters, is projected.

use anyhow::Context;

/// Redis's counters at one moment, on one node.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct RedisCounters {
    /// EVAL and EVALSHA calls so far (every Lua script this node ran).
    pub script_calls: u64,
    /// Microseconds spent inside those calls (the commands the scripts ran included).
    pub script_usec: u64,
    /// CPU seconds of the main thread (user + system); the whole process's when the server
    /// does not report its main thread apart (before Redis 7).
    pub main_cpu_s: f64,
    /// The server's process id, to read its CPU from /proc beside Redis's own figure.
    pub pid: u32,
}

/// What a node spent between two readings.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct RedisCost {
    pub script_calls: u64,
    pub script_usec: u64,
    pub main_cpu_s: f64,
}

impl RedisCounters {
    /// Reads `INFO commandstats`, `INFO cpu` and `INFO server` of the node behind `conn`.
    pub async fn read(conn: &mut impl redis::aio::ConnectionLike) -> anyhow::Result<Self> {
        let mut text = String::new();
        for section in ["commandstats", "cpu", "server"] {
            let part: String = redis::cmd("INFO")
                .arg(section)
                .query_async(conn)
                .await
                .with_context(|| format!("INFO {section}"))?;
            text.push_str(&part);
            text.push('\n');
        }
        Ok(parse(&text))
    }

    /// What was spent since `before`.
    pub fn since(&self, before: &RedisCounters) -> RedisCost {
        RedisCost {
            script_calls: self.script_calls.saturating_sub(before.script_calls),
            script_usec: self.script_usec.saturating_sub(before.script_usec),
            main_cpu_s: (self.main_cpu_s - before.main_cpu_s).max(0.0),
        }
    }
}

impl RedisCost {
    /// The cost of several nodes (the masters of a cluster) together.
    pub fn sum(costs: &[RedisCost]) -> RedisCost {
        costs.iter().fold(RedisCost::default(), |a, c| RedisCost {
            script_calls: a.script_calls + c.script_calls,
            script_usec: a.script_usec + c.script_usec,
            main_cpu_s: a.main_cpu_s + c.main_cpu_s,
        })
    }

    /// Decisions per script call (NaN without calls).
    pub fn decisions_per_call(&self, decisions: u64) -> f64 {
        decisions as f64 / self.script_calls as f64
    }

    /// Microseconds Redis spent inside scripts per decision: `usec_per_call` divided by the
    /// decisions per call.
    pub fn script_usec_per_decision(&self, decisions: u64) -> f64 {
        self.script_usec as f64 / decisions as f64
    }

    /// Microseconds of Redis's main thread per decision: the scripts plus reading the calls and
    /// writing the replies.
    pub fn cpu_usec_per_decision(&self, decisions: u64) -> f64 {
        self.main_cpu_s * 1e6 / decisions as f64
    }
}

/// Reads the figures out of INFO's `name:value` lines (sections concatenated).
fn parse(text: &str) -> RedisCounters {
    let mut counters = RedisCounters::default();
    let (mut user, mut sys) = (0.0_f64, 0.0_f64);
    let (mut user_main, mut sys_main): (Option<f64>, Option<f64>) = (None, None);
    for line in text.lines().map(str::trim) {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        match name {
            "cmdstat_eval" | "cmdstat_evalsha" => {
                counters.script_calls += stat_field(value, "calls");
                counters.script_usec += stat_field(value, "usec");
            }
            "used_cpu_user" => user = value.parse().unwrap_or(0.0),
            "used_cpu_sys" => sys = value.parse().unwrap_or(0.0),
            "used_cpu_user_main_thread" => user_main = value.parse().ok(),
            "used_cpu_sys_main_thread" => sys_main = value.parse().ok(),
            "process_id" => counters.pid = value.parse().unwrap_or(0),
            _ => {}
        }
    }
    counters.main_cpu_s = match (user_main, sys_main) {
        (Some(u), Some(s)) => u + s,
        _ => user + sys,
    };
    counters
}

/// One `name=value` of a commandstats line (`calls=3,usec=12,usec_per_call=4.00,...`).
fn stat_field(value: &str, field: &str) -> u64 {
    value
        .split(',')
        .find_map(|pair| pair.strip_prefix(field)?.strip_prefix('='))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_script_calls_and_main_thread_cpu() {
        let text = "# Commandstats\r\n\
            cmdstat_evalsha:calls=100,usec=2500,usec_per_call=25.00,rejected_calls=0,failed_calls=0\r\n\
            cmdstat_eval:calls=2,usec=100,usec_per_call=50.00,rejected_calls=0,failed_calls=1\r\n\
            cmdstat_get:calls=7,usec=70,usec_per_call=10.00,rejected_calls=0,failed_calls=0\r\n\
            # CPU\r\nused_cpu_sys:3.5\r\nused_cpu_user:6.5\r\n\
            used_cpu_sys_main_thread:3.0\r\nused_cpu_user_main_thread:6.0\r\n\
            # Server\r\nprocess_id:4242\r\n";
        let before = parse(text);
        assert_eq!(
            before,
            RedisCounters {
                script_calls: 102,
                script_usec: 2600,
                main_cpu_s: 9.0,
                pid: 4242
            }
        );
        // Without the main thread's figures, the process's.
        assert_eq!(
            parse("used_cpu_sys:1.5\nused_cpu_user:2.0\n").main_cpu_s,
            3.5
        );
        let after = RedisCounters {
            script_calls: 112,
            script_usec: 3600,
            main_cpu_s: 10.0,
            pid: 4242,
        };
        let cost = after.since(&before);
        assert_eq!(cost.script_calls, 10);
        // 10 calls of 40 attempts: 1000 us inside scripts, 1 s of CPU for 400 decisions.
        assert_eq!(cost.decisions_per_call(400), 40.0);
        assert_eq!(cost.script_usec_per_decision(400), 2.5);
        assert_eq!(cost.cpu_usec_per_decision(400), 2500.0);
        assert_eq!(RedisCost::sum(&[cost, cost]).script_calls, 20);
    }
}
