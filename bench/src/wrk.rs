//! Runs `wrk` (a closed-loop HTTP load generator) and reads its report.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context};

/// What one wrk run measured.
#[derive(Debug, Clone, Copy, Default)]
pub struct WrkReport {
    pub requests: u64,
    pub requests_per_second: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// Responses that were not 2xx or 3xx.
    pub non_2xx: u64,
    pub socket_errors: u64,
}

/// A wrk script that POSTs with a random buyer id per request (Envoy adds a fresh
/// x-request-id, so every request is a new purchase attempt).
pub const BUY_SCRIPT: &str = r#"
wrk.method = "POST"
math.randomseed(os.time())
request = function()
  return wrk.format(nil, nil, { ["x-user-id"] = "u" .. math.random(1, 100000000) })
end
"#;

/// As [`BUY_SCRIPT`], but each buyer id holds a character ids may not (`~`): the gate answers
/// 400 for the buyer id, having read the route, the goods id and the buyer id.
pub const BAD_BUYER_SCRIPT: &str = r#"
wrk.method = "POST"
math.randomseed(os.time())
request = function()
  return wrk.format(nil, nil, { ["x-user-id"] = "u~" .. math.random(1, 100000000) })
end
"#;

/// As [`BUY_SCRIPT`], but a GET: the sale route with a method it does not take (405).
pub const GET_SCRIPT: &str = r#"
wrk.method = "GET"
math.randomseed(os.time())
request = function()
  return wrk.format(nil, nil, { ["x-user-id"] = "u" .. math.random(1, 100000000) })
end
"#;

/// A wrk script for the syncer's deduct endpoint: goods `GOODS`, a new buyer and request id
/// each call, so every call is a fresh purchase attempt on one hot goods.
const DEDUCT_SCRIPT: &str = r#"
wrk.method = "POST"
wrk.headers["content-type"] = "application/json"
wrk.headers["x-seckill-secret"] = "SECRET"
math.randomseed(os.time())
counter = 0
request = function()
  counter = counter + 1
  local id = math.random(1, 1000000000) .. "-" .. counter
  local body = '{"goods_id":"GOODS","user_id":"u' .. id .. '","quantity":1,"request_id":"r' .. id .. '"}'
  return wrk.format(nil, nil, nil, body)
end
"#;

/// A wrk script for the syncer's batch deduct endpoint (what the filter calls): one attempt per
/// call on goods `GOODS`, a new buyer and request id each call.
const DEDUCT_BATCH_SCRIPT: &str = r#"
wrk.method = "POST"
wrk.headers["content-type"] = "application/json"
wrk.headers["x-seckill-secret"] = "SECRET"
math.randomseed(os.time())
counter = 0
request = function()
  counter = counter + 1
  local id = math.random(1, 1000000000) .. "-" .. counter
  local body = '{"attempts":[{"goods_id":"GOODS","user_id":"u' .. id .. '","quantity":1,"request_id":"r' .. id .. '"}]}'
  return wrk.format(nil, nil, nil, body)
end
"#;

/// [`DEDUCT_BATCH_SCRIPT`] for `goods` (an id: no quotes to escape) with the edge credential `secret`.
pub fn deduct_batch_script(goods: &str, secret: &str) -> String {
    DEDUCT_BATCH_SCRIPT
        .replace("SECRET", secret)
        .replace("GOODS", goods)
}

/// [`DEDUCT_SCRIPT`] for `goods` (an id: no quotes to escape) with the edge credential `secret`.
pub fn deduct_script(goods: &str, secret: &str) -> String {
    DEDUCT_SCRIPT
        .replace("SECRET", secret)
        .replace("GOODS", goods)
}

pub fn run(
    url: &str,
    script: &Path,
    threads: u32,
    connections: u32,
    duration: Duration,
) -> anyhow::Result<WrkReport> {
    Ok(run_with_output(url, script, threads, connections, duration)?.0)
}

/// [`run`], also giving wrk's whole report: a script's `done()` prints its own counts there.
pub fn run_with_output(
    url: &str,
    script: &Path,
    threads: u32,
    connections: u32,
    duration: Duration,
) -> anyhow::Result<(WrkReport, String)> {
    let output = Command::new("wrk")
        .args(["-t", &threads.to_string(), "-c", &connections.to_string()])
        .args(["-d", &format!("{}s", duration.as_secs().max(1))])
        .args(["--timeout", "5s", "--latency", "-s"])
        .arg(script)
        .arg(url)
        .output()
        .context("cannot run wrk; scripts/setup.sh installs it")?;
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    if !output.status.success() {
        bail!(
            "wrk failed: {text}{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let report = parse(&text).with_context(|| format!("cannot read wrk's report:\n{text}"))?;
    Ok((report, text))
}

pub fn parse(text: &str) -> anyhow::Result<WrkReport> {
    let mut report = WrkReport::default();
    let mut found_rate = false;
    for line in text.lines().map(str::trim) {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["50%", value] => report.p50_ms = duration_ms(value)?,
            ["99%", value] => report.p99_ms = duration_ms(value)?,
            ["Requests/sec:", value] => {
                report.requests_per_second = value.parse()?;
                found_rate = true;
            }
            ["Non-2xx", "or", "3xx", "responses:", value] => report.non_2xx = value.parse()?,
            [count, "requests", "in", ..] => report.requests = count.parse()?,
            ["Socket", "errors:", rest @ ..] => {
                report.socket_errors = rest
                    .iter()
                    .filter_map(|w| w.trim_end_matches(',').parse::<u64>().ok())
                    .sum();
            }
            _ => {}
        }
    }
    if !found_rate {
        bail!("no Requests/sec line");
    }
    Ok(report)
}

/// wrk prints durations as `812.00us`, `1.23ms` or `2.10s`.
fn duration_ms(text: &str) -> anyhow::Result<f64> {
    let (number, scale) = if let Some(n) = text.strip_suffix("us") {
        (n, 0.001)
    } else if let Some(n) = text.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = text.strip_suffix('s') {
        (n, 1000.0)
    } else {
        bail!("unknown duration {text}")
    };
    Ok(number.parse::<f64>()? * scale)
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_a_wrk_report() {
        let text = "Running 2s test @ http://127.0.0.1:1/x
  1 threads and 50 connections
  Latency Distribution
     50%  812.00us
     75%    1.10ms
     90%    1.50ms
     99%    2.34ms
  24000 requests in 2.00s, 3.00MB read
  Socket errors: connect 0, read 2, write 0, timeout 1
  Non-2xx or 3xx responses: 23999
Requests/sec:  11999.50
Transfer/sec:      1.50MB
";
        let r = super::parse(text).unwrap();
        assert_eq!(r.requests, 24000);
        assert_eq!(r.non_2xx, 23999);
        assert_eq!(r.socket_errors, 3);
        assert!((r.p50_ms - 0.812).abs() < 1e-9);
        assert!((r.p99_ms - 2.34).abs() < 1e-9);
        assert!((r.requests_per_second - 11999.5).abs() < 1e-9);
        assert!(super::parse("garbage").is_err());
    }
}
