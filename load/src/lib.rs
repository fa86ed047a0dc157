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
    pub requests: u64,
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
        let due = started + arrival_offset(index, plan.rate, plan.ramp);
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
            .header("x-request-id", format!("load-{index}"));
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
    fn outcomes_come_from_the_gate_or_the_status() {
        assert_eq!(outcome_of(409, Some("sold_out")), "sold_out");
        assert_eq!(outcome_of(502, None), "http_502");
        assert_eq!(outcome_of(200, Some("")), "http_200");
    }
}
