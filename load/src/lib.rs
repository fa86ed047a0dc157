//! The flash-sale load generator's engine: an open-loop arrival schedule (requests go out on
//! schedule whether or not earlier ones returned, and latency is counted from the scheduled
//! time, so a slow gate cannot hide its slowness by slowing the load: no coordinated
//! omission), HDR latency histograms per outcome, and a per-second timeline.

pub mod chart;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::sync::Semaphore;

/// When request `index` (from 0) is due, for a rate that ramps linearly from 0 to `rate` per
/// second over `ramp`, then stays at `rate`.
pub fn arrival_offset(index: u64, rate: f64, ramp: Duration) -> Duration {
    let ramp_s = ramp.as_secs_f64();
    let i = index as f64;
    // Requests sent during the ramp: rate * ramp / 2 (the area of the triangle).
    let in_ramp = rate * ramp_s / 2.0;
    let seconds = if i < in_ramp {
        // During the ramp, i = rate * t^2 / (2 * ramp).
        (2.0 * ramp_s * i / rate).sqrt()
    } else {
        ramp_s + (i - in_ramp) / rate
    };
    Duration::from_secs_f64(seconds.max(0.0))
}

/// One stage of a multi-stage arrival profile: the rate moves linearly from where the previous
/// stage ended (0 before the first) to `rate` over `over` (k6's `stages`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Stage {
    pub rate: f64,
    pub over: Duration,
}

impl std::str::FromStr for Stage {
    type Err = String;

    /// `RATE:SECONDS`, e.g. `5000:10` (to 5,000/s over 10 s).
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (rate, seconds) = text
            .split_once(':')
            .ok_or_else(|| format!("stage {text:?}: expected RATE:SECONDS, e.g. 5000:10"))?;
        let rate: f64 = rate
            .trim()
            .parse()
            .map_err(|_| format!("stage {text:?}: rate {rate:?} is not a number"))?;
        let seconds: f64 = seconds
            .trim()
            .parse()
            .map_err(|_| format!("stage {text:?}: seconds {seconds:?} is not a number"))?;
        if !(rate.is_finite() && (0.0..=STAGE_RATE_MAX).contains(&rate)) {
            return Err(format!(
                "stage {text:?}: the rate must be 0 to {STAGE_RATE_MAX}/s"
            ));
        }
        if !(seconds.is_finite() && seconds > 0.0 && seconds <= STAGE_SECONDS_MAX) {
            return Err(format!(
                "stage {text:?}: the seconds must be above 0 and at most {STAGE_SECONDS_MAX}"
            ));
        }
        Ok(Stage {
            rate,
            over: Duration::from_secs_f64(seconds),
        })
    }
}

/// Bounds of one stage: a mistyped stage must not schedule years of load.
pub const STAGE_RATE_MAX: f64 = 10_000_000.0;
pub const STAGE_SECONDS_MAX: f64 = 86_400.0;

/// When request `index` is due in a multi-stage profile; `None` past its last stage.
pub fn staged_offset(index: u64, stages: &[Stage]) -> Option<Duration> {
    let mut before = 0.0; // requests due in earlier stages
    let mut start_s = 0.0;
    let mut from = 0.0;
    for stage in stages {
        let d = stage.over.as_secs_f64();
        let count = (from + stage.rate) / 2.0 * d;
        let c = index as f64 - before;
        if c < count {
            // Requests due by t into the stage: from * t + a * t^2, a = (to - from) / (2 d).
            // Solved in the form that stays exact for ramps up, down and flat.
            let a = (stage.rate - from) / (2.0 * d);
            let root = (from * from + 4.0 * a * c).max(0.0).sqrt();
            let t = if c > 0.0 {
                2.0 * c / (from + root)
            } else {
                0.0
            };
            return Some(Duration::from_secs_f64(start_s + t.clamp(0.0, d)));
        }
        before += count;
        start_s += d;
        from = stage.rate;
    }
    None
}

/// Requests a multi-stage profile sends in all.
pub fn staged_requests(stages: &[Stage]) -> u64 {
    let mut from = 0.0;
    let mut total = 0.0;
    for stage in stages {
        total += (from + stage.rate) / 2.0 * stage.over.as_secs_f64();
        from = stage.rate;
    }
    total.ceil() as u64
}

/// How many requests a run of `duration` at this schedule sends.
pub fn requests_in(duration: Duration, rate: f64, ramp: Duration) -> u64 {
    let d = duration.as_secs_f64();
    let ramp_s = ramp.as_secs_f64().min(d);
    let full_ramp = ramp.as_secs_f64();
    let ramp_part = if full_ramp > 0.0 {
        rate * ramp_s * ramp_s / (2.0 * full_ramp)
    } else {
        0.0
    };
    (ramp_part + rate * (d - ramp_s).max(0.0)).floor() as u64
}

/// Latencies of one outcome, in microseconds (1 µs to 60 s, 3 significant digits).
#[derive(Clone)]
pub struct Latencies {
    histogram: Histogram<u64>,
}

impl Default for Latencies {
    fn default() -> Self {
        Self {
            histogram: Histogram::new_with_bounds(1, 60_000_000, 3)
                .expect("constant histogram bounds are valid"),
        }
    }
}

impl Latencies {
    pub fn record(&mut self, latency: Duration) {
        let micros = latency.as_micros().clamp(1, 60_000_000) as u64;
        self.histogram.saturating_record(micros);
    }

    pub fn count(&self) -> u64 {
        self.histogram.len()
    }

    /// The latency at quantile `q` (0..=1), in milliseconds.
    pub fn quantile_ms(&self, q: f64) -> f64 {
        self.histogram.value_at_quantile(q) as f64 / 1000.0
    }

    pub fn summary(&self) -> LatencySummary {
        LatencySummary {
            count: self.count(),
            p50_ms: self.quantile_ms(0.5),
            p90_ms: self.quantile_ms(0.9),
            p99_ms: self.quantile_ms(0.99),
            p999_ms: self.quantile_ms(0.999),
            max_ms: self.histogram.max() as f64 / 1000.0,
        }
    }

    pub fn add(&mut self, other: &Latencies) {
        let _ = self.histogram.add(&other.histogram);
    }
}

#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct LatencySummary {
    pub count: u64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

/// One slice of the run (by scheduled send time): answers by outcome and the latency
/// percentiles of that slice.
#[derive(Debug, Clone, Serialize, Default)]
pub struct Slice {
    /// Start of the slice, seconds from the start of the run.
    pub start_s: f64,
    /// Width of the slice, seconds.
    pub width_s: f64,
    pub outcomes: BTreeMap<String, u64>,
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// Units left, when the run could read them (the syncer's admin API).
    pub remaining: Option<u64>,
}

/// Everything a run recorded, by outcome and by time slice.
pub struct Recorder {
    by_outcome: BTreeMap<String, Latencies>,
    by_slice: BTreeMap<u64, (BTreeMap<String, u64>, Latencies)>,
    slice: Duration,
}

impl Default for Recorder {
    fn default() -> Self {
        Self::with_slice(Duration::from_millis(100))
    }
}

impl Recorder {
    /// A recorder whose timeline has slices of this width.
    pub fn with_slice(slice: Duration) -> Self {
        Self {
            by_outcome: BTreeMap::new(),
            by_slice: BTreeMap::new(),
            slice: slice.max(Duration::from_millis(1)),
        }
    }

    /// Records one answer, `latency` counted from its scheduled time, at `offset` into the run.
    pub fn record(&mut self, outcome: &str, latency: Duration, offset: Duration) {
        self.by_outcome
            .entry(outcome.to_owned())
            .or_default()
            .record(latency);
        let index = (offset.as_nanos() / self.slice.as_nanos()) as u64;
        let (counts, latencies) = self.by_slice.entry(index).or_default();
        *counts.entry(outcome.to_owned()).or_insert(0) += 1;
        latencies.record(latency);
    }

    pub fn outcomes(&self) -> BTreeMap<String, LatencySummary> {
        self.by_outcome
            .iter()
            .map(|(outcome, l)| (outcome.clone(), l.summary()))
            .collect()
    }

    pub fn count(&self, outcome: &str) -> u64 {
        self.by_outcome.get(outcome).map_or(0, Latencies::count)
    }

    pub fn total(&self) -> u64 {
        self.by_outcome.values().map(Latencies::count).sum()
    }

    pub fn overall(&self) -> LatencySummary {
        let mut all = Latencies::default();
        for l in self.by_outcome.values() {
            all.add(l);
        }
        all.summary()
    }

    pub fn timeline(&self) -> Vec<Slice> {
        let width_s = self.slice.as_secs_f64();
        self.by_slice
            .iter()
            .map(|(index, (outcomes, latencies))| Slice {
                start_s: *index as f64 * width_s,
                width_s,
                outcomes: outcomes.clone(),
                p50_ms: latencies.quantile_ms(0.5),
                p99_ms: latencies.quantile_ms(0.99),
                remaining: None,
            })
            .collect()
    }
}

/// What to send.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Full URL of the buy endpoint with `{goods}` replaced, e.g. http://127.0.0.1:8080/seckill/sku-1/buy.
    pub url: String,
    pub user_header: String,
    pub buyers: u64,
    pub quantity: u32,
    pub rate: f64,
    pub ramp: Duration,
    /// A multi-stage profile; when not empty it replaces `rate` and `ramp`.
    pub stages: Vec<Stage>,
    pub requests: u64,
    /// Extra headers on every request (authentication, tracing).
    pub headers: Vec<(String, String)>,
    /// Part of every request id (`load-{run_id}-{index}`): ids are unique per run, so a
    /// second run is not answered from the first one's idempotency records.
    pub run_id: String,
    /// Requests in flight at most; past it, due requests wait (and their wait counts).
    pub in_flight_max: usize,
    pub timeout: Duration,
}

/// What a run measured.
pub struct Run {
    pub recorder: Recorder,
    pub elapsed: Duration,
    /// The moment the schedule started.
    pub started: Instant,
}

/// The outcome of one answer: the gate's `x-seckill-outcome`, else the HTTP status.
pub fn outcome_of(status: u16, gate_outcome: Option<&str>) -> String {
    match gate_outcome {
        Some(outcome) if !outcome.is_empty() => outcome.to_owned(),
        _ => format!("http_{status}"),
    }
}

/// Runs the plan. `progress` is called with (sent, answered) now and then.
pub async fn run(
    plan: &Plan,
    progress: impl Fn(u64, u64) + Send + Sync + 'static,
) -> anyhow::Result<Run> {
    anyhow::ensure!(
        plan.rate > 0.0 && plan.buyers > 0,
        "rate and buyers must be positive"
    );
    let client = reqwest::Client::builder()
        .timeout(plan.timeout)
        .pool_max_idle_per_host(plan.in_flight_max)
        .build()?;
    let recorder = Arc::new(Mutex::new(Recorder::default()));
    let slots = Arc::new(Semaphore::new(plan.in_flight_max));
    let answered = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let progress = Arc::new(progress);
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for index in 0..plan.requests {
        let offset = if plan.stages.is_empty() {
            arrival_offset(index, plan.rate, plan.ramp)
        } else {
            match staged_offset(index, &plan.stages) {
                Some(offset) => offset,
                None => break,
            }
        };
        let due = started + offset;
        tokio::time::sleep_until(due.into()).await;
        // Waiting for a slot delays the send, not the clock: latency runs from `due`.
        let permit = slots.clone().acquire_owned().await?;
        let request = client
            .post(&plan.url)
            .query(&[("qty", plan.quantity)])
            .header(
                plan.user_header.as_str(),
                format!("buyer-{}", scramble(index) % plan.buyers),
            )
            .header("x-request-id", format!("load-{}-{index}", plan.run_id));
        let request = plan.headers.iter().fold(request, |request, (name, value)| {
            request.header(name, value)
        });
        let (recorder, done) = (recorder.clone(), answered.clone());
        tasks.spawn(async move {
            let _permit = permit;
            let outcome = match request.send().await {
                Ok(response) => {
                    let gate = response
                        .headers()
                        .get("x-seckill-outcome")
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_owned);
                    let status = response.status().as_u16();
                    // Read the body so the connection can be reused.
                    let _ = response.bytes().await;
                    outcome_of(status, gate.as_deref())
                }
                Err(e) if e.is_timeout() => "client_timeout".to_owned(),
                Err(_) => "client_error".to_owned(),
            };
            let now = Instant::now();
            if let Ok(mut recorder) = recorder.lock() {
                recorder.record(&outcome, now - due, due - started);
            }
            done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        });
        if index % 512 == 0 {
            progress(index, answered.load(std::sync::atomic::Ordering::Relaxed));
        }
    }
    while tasks.join_next().await.is_some() {}
    progress(
        plan.requests,
        answered.load(std::sync::atomic::Ordering::Relaxed),
    );
    let elapsed = started.elapsed();
    let recorder = Arc::try_unwrap(recorder)
        .map_err(|_| anyhow::anyhow!("recorder still shared"))?
        .into_inner()
        .map_err(|_| anyhow::anyhow!("recorder poisoned"))?;
    Ok(Run {
        recorder,
        elapsed,
        started,
    })
}

/// A run id unique enough to keep two runs' request ids apart: the start time (µs) and the
/// process id, in base 36.
pub fn fresh_run_id() -> String {
    let micros = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros());
    format!(
        "{}{}",
        base36(micros),
        base36(u128::from(std::process::id()))
    )
}

fn base36(mut n: u128) -> String {
    const DIGITS: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut out = Vec::new();
    loop {
        out.push(DIGITS[(n % 36) as usize]);
        n /= 36;
        if n == 0 {
            break;
        }
    }
    out.reverse();
    String::from_utf8_lossy(&out).into_owned()
}

/// A header given as `Name: value`: a valid HTTP name, a value without control characters.
pub fn parse_header(text: &str) -> Result<(String, String), String> {
    let (name, value) = text
        .split_once(':')
        .ok_or_else(|| format!("header {text:?}: expected 'Name: value'"))?;
    let (name, value) = (name.trim(), value.trim());
    reqwest::header::HeaderName::from_bytes(name.as_bytes())
        .map_err(|_| format!("header {text:?}: {name:?} is not a valid header name"))?;
    reqwest::header::HeaderValue::from_str(value)
        .map_err(|_| format!("header {text:?}: the value has characters a header cannot carry"))?;
    Ok((name.to_owned(), value.to_owned()))
}

/// A latency bound that fails the run: `OUTCOME:QUANTILE<MS`, e.g. `won:p99<250` or
/// `all:max<2000`; QUANTILE is p50, p90, p99, p99.9 or max.
#[derive(Debug, Clone, PartialEq)]
pub struct Threshold {
    pub outcome: String,
    pub quantile: String,
    pub below_ms: f64,
}

impl std::str::FromStr for Threshold {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let usage =
            || format!("threshold {text:?}: expected OUTCOME:QUANTILE<MS, e.g. won:p99<250");
        let (outcome, rest) = text.split_once(':').ok_or_else(usage)?;
        let (quantile, bound) = rest.split_once('<').ok_or_else(usage)?;
        let quantile = quantile.trim();
        if !["p50", "p90", "p99", "p99.9", "max"].contains(&quantile) {
            return Err(format!(
                "threshold {text:?}: quantile {quantile:?} is not one of p50, p90, p99, p99.9, max"
            ));
        }
        let below_ms: f64 = bound
            .trim()
            .trim_end_matches("ms")
            .parse()
            .map_err(|_| usage())?;
        if !(below_ms.is_finite() && below_ms > 0.0) {
            return Err(format!(
                "threshold {text:?}: the bound must be a positive number of ms"
            ));
        }
        let outcome = outcome.trim();
        if outcome.is_empty() {
            return Err(usage());
        }
        Ok(Threshold {
            outcome: outcome.to_owned(),
            quantile: quantile.to_owned(),
            below_ms,
        })
    }
}

impl Threshold {
    /// The measured value and whether it is under the bound; `None` when the outcome had no
    /// answers (nothing to hold to the bound).
    pub fn judge(&self, recorder: &Recorder) -> Option<(f64, bool)> {
        let summary = if self.outcome == "all" {
            recorder.overall()
        } else {
            *recorder.outcomes().get(&self.outcome)?
        };
        if summary.count == 0 {
            return None;
        }
        let value = match self.quantile.as_str() {
            "p50" => summary.p50_ms,
            "p90" => summary.p90_ms,
            "p99" => summary.p99_ms,
            "p99.9" => summary.p999_ms,
            _ => summary.max_ms,
        };
        Some((value, value < self.below_ms))
    }
}

/// Knuth's multiplicative hash: spreads request indexes over buyers, so eager buyers click
/// more than once, without a random generator (runs are repeatable).
pub fn scramble(index: u64) -> u64 {
    index.wrapping_mul(2_654_435_761) >> 7
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constant_rate_schedule_is_evenly_spaced() {
        let rate = 1_000.0;
        assert_eq!(arrival_offset(0, rate, Duration::ZERO), Duration::ZERO);
        assert_eq!(
            arrival_offset(1_000, rate, Duration::ZERO),
            Duration::from_secs(1)
        );
        assert_eq!(
            arrival_offset(2_500, rate, Duration::ZERO),
            Duration::from_millis(2_500)
        );
        assert_eq!(
            requests_in(Duration::from_secs(3), rate, Duration::ZERO),
            3_000
        );
    }

    #[test]
    fn ramp_schedule_sends_half_as_many_during_the_ramp() {
        let rate = 1_000.0;
        let ramp = Duration::from_secs(2);
        // 1,000 requests during a 2 s ramp to 1,000/s; the last is due at the end of it.
        assert_eq!(requests_in(ramp, rate, ramp), 1_000);
        let end_of_ramp = arrival_offset(1_000, rate, ramp);
        assert!(
            (end_of_ramp.as_secs_f64() - 2.0).abs() < 1e-9,
            "{end_of_ramp:?}"
        );
        // A quarter of the way in count, half of the way in time.
        let quarter = arrival_offset(250, rate, ramp);
        assert!((quarter.as_secs_f64() - 1.0).abs() < 1e-9, "{quarter:?}");
        // After the ramp: one request per millisecond.
        let later = arrival_offset(2_000, rate, ramp);
        assert!((later.as_secs_f64() - 3.0).abs() < 1e-9, "{later:?}");
        assert_eq!(requests_in(Duration::from_secs(3), rate, ramp), 2_000);
        // Offsets never go backwards.
        let mut last = Duration::ZERO;
        for i in 0..3_000 {
            let t = arrival_offset(i, rate, ramp);
            assert!(t >= last);
            last = t;
        }
    }

    #[test]
    fn histograms_report_quantiles_per_outcome_and_second() {
        let mut recorder = Recorder::with_slice(Duration::from_secs(1));
        for ms in 1..=100u64 {
            recorder.record(
                "won",
                Duration::from_millis(ms),
                Duration::from_millis(ms * 15),
            );
        }
        recorder.record(
            "sold_out",
            Duration::from_micros(300),
            Duration::from_millis(10),
        );
        let won = recorder.outcomes()["won"];
        assert_eq!(won.count, 100);
        assert!((won.p50_ms - 50.0).abs() < 0.1, "{won:?}");
        assert!((won.p99_ms - 99.0).abs() < 0.1, "{won:?}");
        assert!((won.max_ms - 100.0).abs() < 0.1, "{won:?}");
        assert_eq!(recorder.total(), 101);
        assert_eq!(recorder.count("sold_out"), 1);
        let timeline = recorder.timeline();
        // 100 answers spread over 1.5 s: seconds 0 and 1.
        assert_eq!(timeline.len(), 2);
        assert_eq!(timeline[0].outcomes["won"], 66);
        assert_eq!(timeline[0].outcomes["sold_out"], 1);
        assert_eq!(timeline[1].outcomes["won"], 34);
        // Latencies below 1 µs and above 60 s are clamped, not lost.
        let mut l = Latencies::default();
        l.record(Duration::ZERO);
        l.record(Duration::from_secs(3_600));
        assert_eq!(l.count(), 2);
    }

    #[test]
    fn stages_ramp_up_hold_and_down() {
        let stages: Vec<Stage> = ["1000:2", "1000:1", "0:2"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        // 1,000 while ramping up, 1,000 holding, 1,000 ramping down.
        assert_eq!(staged_requests(&stages), 3_000);
        let at = |i| staged_offset(i, &stages).unwrap().as_secs_f64();
        assert!((at(250) - 1.0).abs() < 1e-9, "{}", at(250));
        assert!((at(1_000) - 2.0).abs() < 1e-9);
        assert!((at(1_500) - 2.5).abs() < 1e-9);
        // Half of the ramp down's requests in its first quarter... of its time: 750 by 1 s.
        assert!((at(2_750) - 4.0).abs() < 1e-6, "{}", at(2_750));
        assert_eq!(staged_offset(3_000, &stages), None);
        let mut last = 0.0;
        for i in 0..3_000 {
            let t = at(i);
            assert!(t >= last && t <= 5.0, "{i}: {t}");
            last = t;
        }
        // A pause (0 to 0) moves the next stage later.
        let paused: Vec<Stage> = ["0:3", "100:1"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        assert!(staged_offset(0, &paused).unwrap() >= Duration::from_secs(3));
    }

    #[test]
    fn bad_stages_headers_and_thresholds_are_refused() {
        for bad in [
            "1000", "x:1", "10:0", "-5:1", "10:-1", "1e12:1", "10:1e9", "nan:1",
        ] {
            assert!(bad.parse::<Stage>().is_err(), "{bad}");
        }
        assert_eq!(
            parse_header("Authorization: Bearer abc").unwrap(),
            ("Authorization".to_owned(), "Bearer abc".to_owned())
        );
        for bad in ["no-colon", "bad name: x", ": x", "x: a\nb"] {
            assert!(parse_header(bad).is_err(), "{bad:?}");
        }
        let t: Threshold = "won:p99<250".parse().unwrap();
        assert_eq!(
            (t.outcome.as_str(), t.quantile.as_str(), t.below_ms),
            ("won", "p99", 250.0)
        );
        for bad in [
            "won",
            "won:p99",
            "won:p98<1",
            "won:p99<0",
            ":p99<5",
            "won:p99<x",
        ] {
            assert!(bad.parse::<Threshold>().is_err(), "{bad}");
        }
    }

    #[test]
    fn thresholds_judge_the_measured_quantile() {
        let mut recorder = Recorder::default();
        for ms in 1..=100u64 {
            recorder.record("won", Duration::from_millis(ms), Duration::ZERO);
        }
        let judge = |t: &str| t.parse::<Threshold>().unwrap().judge(&recorder);
        assert_eq!(judge("won:p50<60").map(|j| j.1), Some(true));
        assert_eq!(judge("won:p99<60").map(|j| j.1), Some(false));
        assert_eq!(judge("all:max<100").map(|j| j.1), Some(false));
        assert_eq!(judge("sold_out:p99<1"), None);
    }

    #[test]
    fn run_ids_differ() {
        assert_ne!(fresh_run_id(), {
            std::thread::sleep(Duration::from_millis(1)); // a new microsecond
            fresh_run_id()
        });
    }

    #[test]
    fn outcomes_come_from_the_gate_or_the_status() {
        assert_eq!(outcome_of(409, Some("sold_out")), "sold_out");
        assert_eq!(outcome_of(502, None), "http_502");
        assert_eq!(outcome_of(200, Some("")), "http_200");
    }
}
