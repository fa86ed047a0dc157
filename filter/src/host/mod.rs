//! The Envoy side of the filter: the root context of each worker (configuration, stats, the
//! batched deduct calls and the claims, `root.rs`), what the root and every request of a
//! worker share (`worker.rs`, `stats.rs`), and the per-request state machine (`request.rs`).
//!
//! All of it is written against [`Host`], the one narrow interface to the proxy-wasm host:
//! every host call the filter makes, each returning `Result`, so no host status can trap the
//! VM and every fallback is the caller's visible decision. The logic therefore compiles
//! natively, and the unit tests drive it with a fake host that records every call and can be
//! told to refuse any of them. The callbacks Envoy calls reach the logic through
//! `dispatch.rs` (which context a callback is for), also native; only the real host
//! (`abi.rs`) and the module's exports (`exports.rs`) are compiled for wasm32 alone: the
//! host's imports do not link into a native binary.

use std::fmt;
use std::time::Duration;

use crate::reply::LocalReply;

#[cfg(target_arch = "wasm32")]
pub mod abi;
// Only the wasm build (and the tests) drive the dispatcher.
#[cfg_attr(not(any(target_arch = "wasm32", test)), allow(dead_code))]
mod dispatch;
#[cfg(target_arch = "wasm32")]
mod exports;
mod request;
mod root;
mod stats;
mod worker;

#[cfg(test)]
mod dispatch_tests;
#[cfg(test)]
mod fake;
#[cfg(test)]
mod request_tests;
#[cfg(test)]
mod root_tests;
#[cfg(test)]
mod shadow_tests;

pub use request::{Flow, SaleRequest};
pub use root::Root;

/// A host call refused: the proxy-wasm status the host answered instead of `Ok`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostStatus(pub u32);

impl HostStatus {
    pub const NOT_FOUND: HostStatus = HostStatus(1);
    pub const BAD_ARGUMENT: HostStatus = HostStatus(2);

    /// Whether a refused `dispatch_http_call` means the host has no cluster of that name.
    /// Envoy answers BadArgument for it (its only other reason for BadArgument, a request
    /// without `:method`, `:path` or `:authority`, cannot happen: the filter always sends
    /// them); NotFound is what the name suggests, should a host answer that.
    pub fn means_no_such_cluster(self) -> bool {
        self == HostStatus::BAD_ARGUMENT || self == HostStatus::NOT_FOUND
    }
}

impl fmt::Display for HostStatus {
    /// The ABI's name for the status, for log lines.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self.0 {
            1 => "NotFound",
            2 => "BadArgument",
            3 => "SerializationFailure",
            4 => "ParseFailure",
            5 => "BadExpression",
            6 => "InvalidMemoryAccess",
            7 => "Empty",
            8 => "CasMismatch",
            9 => "ResultMismatch",
            10 => "InternalFailure",
            11 => "BrokenConnection",
            12 => "Unimplemented",
            other => return write!(f, "status {other}"),
        };
        f.write_str(name)
    }
}

/// Why a write to shared data did not happen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetError {
    /// Someone wrote the key since we read it.
    CasMismatch,
    /// Any other refusal by the host.
    Failed,
}

/// A read of one key: value and CAS token.
pub type Seen = (Option<Vec<u8>>, Option<u32>);

/// The shared-data calls (part of [`Host`]; `shared.rs` builds the rate limits and the
/// sold-out cache on them, and tests them with a fake store).
pub trait SharedStore {
    /// Value and CAS token of a key; `(None, None)` when absent; `Err` when the host refused
    /// the read.
    fn get(&self, key: &str) -> Result<Seen, HostStatus>;
    /// Writes a key; with `cas`, only if nobody wrote it since that token was read.
    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), SetError>;
}

/// Levels of the log lines the filter writes (the ABI's numbers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogLevel {
    Info = 2,
    Warn = 3,
    Error = 4,
}

/// Every host operation the filter uses, and nothing else. Calls act on the effective
/// context: the one whose callback is running, or the one last made effective with
/// [`Host::set_effective_context`]. Shared data comes from [`SharedStore`]. `Clone`: the root
/// and each request hold a handle (the real host is a zero-sized value, so handles and calls
/// cost nothing over calling the ABI directly).
pub trait Host: SharedStore + Clone {
    /// Wall-clock time in ns since the epoch.
    fn current_time_ns(&self) -> Result<u64, HostStatus>;
    fn log(&self, level: LogLevel, message: &str) -> Result<(), HostStatus>;
    /// The plugin configuration (`None`: Envoy gave none).
    fn plugin_configuration(&self) -> Result<Option<Vec<u8>>, HostStatus>;
    /// How often the root context's tick runs.
    fn set_tick_period(&self, period: Duration) -> Result<(), HostStatus>;
    /// Defines (or finds) a counter; its id.
    fn define_counter(&self, name: &str) -> Result<u32, HostStatus>;
    fn increment_counter(&self, counter: u32, offset: i64) -> Result<(), HostStatus>;
    /// Registers a shared queue whose `on_queue_ready` wakes this root context; its id.
    fn register_shared_queue(&self, name: &str) -> Result<u32, HostStatus>;
    fn enqueue_shared_queue(&self, queue: u32, value: &[u8]) -> Result<(), HostStatus>;
    /// The oldest entry, or `None` when the queue is empty.
    fn dequeue_shared_queue(&self, queue: u32) -> Result<Option<Vec<u8>>, HostStatus>;
    /// Makes an HTTP call to an Envoy cluster; its answer comes back with this token to the
    /// root context's `on_http_call_response` (Envoy makes every call on behalf of the root),
    /// where `dispatch.rs` hands a request's answer back to the request.
    fn dispatch_http_call(
        &self,
        cluster: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
        timeout: Duration,
    ) -> Result<u32, HostStatus>;
    /// A header of the call answer being delivered (`None` when absent).
    fn http_call_response_header(&self, name: &str) -> Result<Option<Vec<u8>>, HostStatus>;
    /// Up to `max_size` bytes of the body of the call answer being delivered.
    fn http_call_response_body(&self, max_size: usize) -> Result<Option<Vec<u8>>, HostStatus>;
    /// Makes later calls act on this context; refused when it no longer exists.
    fn set_effective_context(&self, context_id: u32) -> Result<(), HostStatus>;
    /// The request headers, serialized as `input::parse_header_map` reads them.
    fn request_header_map(&self) -> Result<Vec<u8>, HostStatus>;
    /// Removes every copy of a request header.
    fn remove_request_header(&self, name: &[u8]) -> Result<(), HostStatus>;
    fn set_request_header(&self, name: &str, value: &str) -> Result<(), HostStatus>;
    /// Adds a request header, keeping any of the same name. Cheaper than `set` (the host
    /// does not look for a copy to replace): for the gate's own headers, whose every copy
    /// was stripped on arrival.
    fn add_request_header(&self, name: &str, value: &str) -> Result<(), HostStatus>;
    /// Resumes a paused request (Envoy defers it until the VM call returns).
    fn continue_request(&self) -> Result<(), HostStatus>;
    /// Answers the request locally (Envoy defers it until the VM call returns).
    fn send_local_reply(&self, reply: &LocalReply) -> Result<(), HostStatus>;
    /// A header of the upstream's response (`None` when absent).
    fn response_header(&self, name: &str) -> Result<Option<Vec<u8>>, HostStatus>;
    fn set_response_header(&self, name: &str, value: &str) -> Result<(), HostStatus>;
    /// Adds a response header, keeping any of the same name (a `set-cookie` beside the shop's).
    fn add_response_header(&self, name: &str, value: &str) -> Result<(), HostStatus>;
    /// Resumes a paused response.
    fn continue_response(&self) -> Result<(), HostStatus>;
    /// A property of the stream, e.g. `["response", "code_details"]` (`None` when absent).
    fn property(&self, path: &[&str]) -> Result<Option<Vec<u8>>, HostStatus>;
}

/// Wall-clock time from the host in ns since the epoch; 0 if the host cannot tell (every
/// memory entry then lapses and shared data decides, as after a clock step back).
pub(crate) fn now_ns(host: &impl Host) -> u64 {
    host.current_time_ns().unwrap_or(0)
}

pub(crate) fn duration_ns(duration: Duration) -> u64 {
    u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX)
}

/// Writes one log line. A line the host refuses is lost: not worth failing a request over.
pub(crate) fn log(host: &impl Host, level: LogLevel, message: fmt::Arguments<'_>) {
    let _ = host.log(level, &message.to_string());
}

pub(crate) fn warn(host: &impl Host, message: fmt::Arguments<'_>) {
    log(host, LogLevel::Warn, message);
}

pub(crate) fn error(host: &impl Host, message: fmt::Arguments<'_>) {
    log(host, LogLevel::Error, message);
}
