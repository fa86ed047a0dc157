//! What the benchmark binaries share: driving `wrk` and writing their sections of
//! BENCHMARKS.md. The binaries start the real stack through the end-to-end harness
//! (`seckill-e2e`) and put each path beside its baseline in the same run.

pub mod cpu;
pub mod local;
pub mod redis_cost;
pub mod report;
pub mod wrk;
