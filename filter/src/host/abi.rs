//! The real host: every host call the filter makes, over the proxy-wasm ABI (0.2.x), each
//! turning the host's status into `Result`. This file is the one place where the rule "no
//! host status can trap the VM" is kept; what to do on `Err` is decided by the callers, in
//! code the native tests run.
//!
//! Why not the SDK: proxy-wasm 0.2's `hostcalls` panic on any status they do not expect
//! (`get_current_time`, `define_metric`, `send_http_response` and `log` on anything but Ok;
//! `get_shared_data` and `get_map_value_bytes` on anything but Ok or NotFound), its context
//! helpers unwrap those results, and its `Status` is a Rust enum that an unknown number
//! returned by the host would not fit; and linking it at all exports its dispatcher's every
//! callback (see `dispatch.rs`). So the imports are declared here with the ABI's symbols,
//! enums and statuses as plain numbers.

use std::ptr::{null, null_mut};
use std::time::Duration;

use super::{Host, HostStatus, LogLevel, Seen, SetError, SharedStore};
use crate::input::serialize_header_map;
use crate::reply::LocalReply;

// The ABI's imports; enums and statuses as plain numbers.
#[link(wasm_import_module = "env")]
extern "C" {
    #[allow(clippy::too_many_arguments)]
    fn proxy_http_call(
        upstream_data: *const u8,
        upstream_size: usize,
        headers_data: *const u8,
        headers_size: usize,
        body_data: *const u8,
        body_size: usize,
        trailers_data: *const u8,
        trailers_size: usize,
        timeout_ms: u32,
        return_token: *mut u32,
    ) -> u32;
    fn proxy_log(level: u32, message_data: *const u8, message_size: usize) -> u32;
    fn proxy_get_current_time_nanoseconds(return_time: *mut u64) -> u32;
    fn proxy_set_tick_period_milliseconds(period: u32) -> u32;
    fn proxy_get_buffer_bytes(
        buffer_type: u32,
        start: usize,
        max_size: usize,
        return_buffer_data: *mut *mut u8,
        return_buffer_size: *mut usize,
    ) -> u32;
    fn proxy_get_header_map_pairs(
        map_type: u32,
        return_map_data: *mut *mut u8,
        return_map_size: *mut usize,
    ) -> u32;
    fn proxy_get_header_map_value(
        map_type: u32,
        key_data: *const u8,
        key_size: usize,
        return_value_data: *mut *mut u8,
        return_value_size: *mut usize,
    ) -> u32;
    fn proxy_replace_header_map_value(
        map_type: u32,
        key_data: *const u8,
        key_size: usize,
        value_data: *const u8,
        value_size: usize,
    ) -> u32;
    fn proxy_add_header_map_value(
        map_type: u32,
        key_data: *const u8,
        key_size: usize,
        value_data: *const u8,
        value_size: usize,
    ) -> u32;
    fn proxy_remove_header_map_value(map_type: u32, key_data: *const u8, key_size: usize) -> u32;
    fn proxy_get_property(
        path_data: *const u8,
        path_size: usize,
        return_value_data: *mut *mut u8,
        return_value_size: *mut usize,
    ) -> u32;
    fn proxy_get_shared_data(
        key_data: *const u8,
        key_size: usize,
        return_value_data: *mut *mut u8,
        return_value_size: *mut usize,
        return_cas: *mut u32,
    ) -> u32;
    fn proxy_set_shared_data(
        key_data: *const u8,
        key_size: usize,
        value_data: *const u8,
        value_size: usize,
        cas: u32,
    ) -> u32;
    fn proxy_register_shared_queue(
        name_data: *const u8,
        name_size: usize,
        return_id: *mut u32,
    ) -> u32;
    fn proxy_dequeue_shared_queue(
        queue_id: u32,
        return_value_data: *mut *mut u8,
        return_value_size: *mut usize,
    ) -> u32;
    fn proxy_enqueue_shared_queue(queue_id: u32, value_data: *const u8, value_size: usize) -> u32;
    fn proxy_continue_stream(stream_type: u32) -> u32;
    fn proxy_send_local_response(
        status_code: u32,
        status_code_details_data: *const u8,
        status_code_details_size: usize,
        body_data: *const u8,
        body_size: usize,
        headers_data: *const u8,
        headers_size: usize,
        grpc_status: i32,
    ) -> u32;
    fn proxy_set_effective_context(context_id: u32) -> u32;
    fn proxy_define_metric(
        metric_type: u32,
        name_data: *const u8,
        name_size: usize,
        return_id: *mut u32,
    ) -> u32;
    fn proxy_increment_metric(metric_id: u32, offset: i64) -> u32;
}

const OK: u32 = 0;
const NOT_FOUND: u32 = 1;
const EMPTY: u32 = 7;
const CAS_MISMATCH: u32 = 8;

// Header map types.
const REQUEST_HEADERS: u32 = 0;
const RESPONSE_HEADERS: u32 = 2;
const CALL_RESPONSE_HEADERS: u32 = 6;
// Buffer types.
const CALL_RESPONSE_BODY: u32 = 4;
const PLUGIN_CONFIGURATION: u32 = 7;
// Stream types.
const HTTP_REQUEST: u32 = 0;
const HTTP_RESPONSE: u32 = 1;
// Metric types.
const COUNTER: u32 = 0;
/// A serialized header map with no headers (a callout's trailers).
const NO_HEADERS: [u8; 4] = [0; 4];
/// `grpc_status` of a plain HTTP local reply.
const NOT_GRPC: i32 = -1;

/// Ok, or the status as an error.
fn status(code: u32) -> Result<(), HostStatus> {
    match code {
        OK => Ok(()),
        code => Err(HostStatus(code)),
    }
}

/// Takes a buffer the host wrote back: it allocated it through this module's
/// `proxy_on_memory_allocate` (`exports.rs`: a boxed slice of exactly `size` bytes), and it
/// is now ours. `None` when the host wrote no buffer.
///
/// # Safety
/// `data` and `size` must be what the host returned with status Ok.
unsafe fn take_buffer(data: *mut u8, size: usize) -> Option<Vec<u8>> {
    // SAFETY: see above.
    (!data.is_null()).then(|| unsafe { Vec::from_raw_parts(data, size, size) })
}

/// The host's buffer-returning calls: `call` gets the two out-pointers. Ok with the buffer
/// (`None`: the host wrote none), NotFound as `None`, any other status as `Err`.
fn read_buffer(
    call: impl FnOnce(*mut *mut u8, *mut usize) -> u32,
) -> Result<Option<Vec<u8>>, HostStatus> {
    let mut data: *mut u8 = null_mut();
    let mut size: usize = 0;
    match call(&mut data, &mut size) {
        // SAFETY: the host returned this buffer with status Ok.
        OK => Ok(unsafe { take_buffer(data, size) }),
        NOT_FOUND => Ok(None),
        code => Err(HostStatus(code)),
    }
}

/// One header of a header map (`Some(empty)` for a header present with no value).
fn map_value(map_type: u32, name: &str) -> Result<Option<Vec<u8>>, HostStatus> {
    let mut data: *mut u8 = null_mut();
    let mut size: usize = 0;
    // SAFETY: the host reads `name.len()` bytes at `name.as_ptr()` and writes the two
    // out-pointers, which live across the call.
    let code = unsafe {
        proxy_get_header_map_value(map_type, name.as_ptr(), name.len(), &mut data, &mut size)
    };
    match code {
        // SAFETY: the host returned this buffer with status Ok.
        OK => Ok(Some(unsafe { take_buffer(data, size) }.unwrap_or_default())),
        NOT_FOUND => Ok(None),
        code => Err(HostStatus(code)),
    }
}

/// The proxy-wasm host, Envoy's. Zero-sized: a handle costs nothing to hold or clone.
#[derive(Debug, Clone, Copy, Default)]
pub struct RealHost;

impl SharedStore for RealHost {
    fn get(&self, key: &str) -> Result<Seen, HostStatus> {
        let mut data: *mut u8 = null_mut();
        let mut size: usize = 0;
        let mut cas: u32 = 0;
        // SAFETY: the host reads `key.len()` bytes at `key.as_ptr()` and writes the three
        // out-pointers, which live across the call.
        let code = unsafe {
            proxy_get_shared_data(key.as_ptr(), key.len(), &mut data, &mut size, &mut cas)
        };
        match code {
            // SAFETY: the host returned this buffer with status Ok. A CAS of 0 means none.
            OK => Ok((
                unsafe { take_buffer(data, size) },
                Some(cas).filter(|c| *c != 0),
            )),
            NOT_FOUND => Ok((None, None)),
            code => Err(HostStatus(code)),
        }
    }

    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), SetError> {
        // SAFETY: the host only reads the given lengths at the given addresses.
        let code = unsafe {
            proxy_set_shared_data(
                key.as_ptr(),
                key.len(),
                value.as_ptr(),
                value.len(),
                cas.unwrap_or(0),
            )
        };
        match code {
            OK => Ok(()),
            CAS_MISMATCH => Err(SetError::CasMismatch),
            _ => Err(SetError::Failed),
        }
    }
}

impl Host for RealHost {
    fn current_time_ns(&self) -> Result<u64, HostStatus> {
        let mut now: u64 = 0;
        // SAFETY: the host writes one u64 at the address, which lives across the call.
        status(unsafe { proxy_get_current_time_nanoseconds(&mut now) })?;
        Ok(now)
    }

    fn log(&self, level: LogLevel, message: &str) -> Result<(), HostStatus> {
        // SAFETY: the host only reads `message.len()` bytes at `message.as_ptr()`.
        status(unsafe { proxy_log(level as u32, message.as_ptr(), message.len()) })
    }

    fn plugin_configuration(&self) -> Result<Option<Vec<u8>>, HostStatus> {
        read_buffer(|data, size| {
            // SAFETY: the host writes the two out-pointers, which live across the call.
            unsafe { proxy_get_buffer_bytes(PLUGIN_CONFIGURATION, 0, usize::MAX, data, size) }
        })
    }

    fn set_tick_period(&self, period: Duration) -> Result<(), HostStatus> {
        let ms = u32::try_from(period.as_millis()).unwrap_or(u32::MAX);
        // SAFETY: no memory is passed.
        status(unsafe { proxy_set_tick_period_milliseconds(ms) })
    }

    fn define_counter(&self, name: &str) -> Result<u32, HostStatus> {
        let mut id: u32 = 0;
        // SAFETY: the host reads `name.len()` bytes at `name.as_ptr()` and writes one u32
        // at the address, which lives across the call.
        status(unsafe { proxy_define_metric(COUNTER, name.as_ptr(), name.len(), &mut id) })?;
        Ok(id)
    }

    fn increment_counter(&self, counter: u32, offset: i64) -> Result<(), HostStatus> {
        // SAFETY: no memory is passed.
        status(unsafe { proxy_increment_metric(counter, offset) })
    }

    fn register_shared_queue(&self, name: &str) -> Result<u32, HostStatus> {
        let mut id: u32 = 0;
        // SAFETY: as for `define_counter`.
        status(unsafe { proxy_register_shared_queue(name.as_ptr(), name.len(), &mut id) })?;
        Ok(id)
    }

    fn enqueue_shared_queue(&self, queue: u32, value: &[u8]) -> Result<(), HostStatus> {
        // SAFETY: the host only reads `value.len()` bytes at `value.as_ptr()`.
        status(unsafe { proxy_enqueue_shared_queue(queue, value.as_ptr(), value.len()) })
    }

    fn dequeue_shared_queue(&self, queue: u32) -> Result<Option<Vec<u8>>, HostStatus> {
        let mut data: *mut u8 = null_mut();
        let mut size: usize = 0;
        // SAFETY: the host writes the two out-pointers, which live across the call.
        match unsafe { proxy_dequeue_shared_queue(queue, &mut data, &mut size) } {
            // SAFETY: the host returned this buffer with status Ok. An entry without a
            // buffer is still an entry.
            OK => Ok(Some(unsafe { take_buffer(data, size) }.unwrap_or_default())),
            EMPTY => Ok(None),
            code => Err(HostStatus(code)),
        }
    }

    fn dispatch_http_call(
        &self,
        cluster: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
        timeout: Duration,
    ) -> Result<u32, HostStatus> {
        let headers = serialize_header_map(
            headers
                .iter()
                .map(|(name, value)| (name.as_bytes(), value.as_bytes())),
        );
        let (body_data, body_size) = body.map_or((null(), 0), |body| (body.as_ptr(), body.len()));
        let timeout_ms = u32::try_from(timeout.as_millis()).unwrap_or(u32::MAX);
        let mut token: u32 = 0;
        // SAFETY: the host only reads the given lengths at the given addresses and writes
        // one u32 at the token's address, which lives across the call.
        status(unsafe {
            proxy_http_call(
                cluster.as_ptr(),
                cluster.len(),
                headers.as_ptr(),
                headers.len(),
                body_data,
                body_size,
                NO_HEADERS.as_ptr(),
                NO_HEADERS.len(),
                timeout_ms,
                &mut token,
            )
        })?;
        Ok(token)
    }

    fn http_call_response_header(&self, name: &str) -> Result<Option<Vec<u8>>, HostStatus> {
        map_value(CALL_RESPONSE_HEADERS, name)
    }

    fn http_call_response_body(&self, max_size: usize) -> Result<Option<Vec<u8>>, HostStatus> {
        read_buffer(|data, size| {
            // SAFETY: the host writes the two out-pointers, which live across the call.
            unsafe { proxy_get_buffer_bytes(CALL_RESPONSE_BODY, 0, max_size, data, size) }
        })
    }

    fn set_effective_context(&self, context_id: u32) -> Result<(), HostStatus> {
        // SAFETY: no memory is passed.
        status(unsafe { proxy_set_effective_context(context_id) })
    }

    fn request_header_map(&self) -> Result<Vec<u8>, HostStatus> {
        let mut data: *mut u8 = null_mut();
        let mut size: usize = 0;
        // SAFETY: the host writes the two out-pointers, which live across the call.
        status(unsafe { proxy_get_header_map_pairs(REQUEST_HEADERS, &mut data, &mut size) })?;
        // SAFETY: the host returned this buffer with status Ok.
        Ok(unsafe { take_buffer(data, size) }.unwrap_or_default())
    }

    fn remove_request_header(&self, name: &[u8]) -> Result<(), HostStatus> {
        // SAFETY: the host only reads `name.len()` bytes at `name.as_ptr()`.
        status(unsafe { proxy_remove_header_map_value(REQUEST_HEADERS, name.as_ptr(), name.len()) })
    }

    fn set_request_header(&self, name: &str, value: &str) -> Result<(), HostStatus> {
        replace_map_value(REQUEST_HEADERS, name, value)
    }

    fn add_request_header(&self, name: &str, value: &str) -> Result<(), HostStatus> {
        add_map_value(REQUEST_HEADERS, name, value)
    }

    fn continue_request(&self) -> Result<(), HostStatus> {
        // SAFETY: no memory is passed.
        status(unsafe { proxy_continue_stream(HTTP_REQUEST) })
    }

    fn send_local_reply(&self, reply: &LocalReply) -> Result<(), HostStatus> {
        // Serialized straight from the reply's own headers: one allocation, no copies.
        let headers = serialize_header_map(
            reply
                .headers
                .iter()
                .map(|(name, value)| (name.as_bytes(), value.as_bytes())),
        );
        let body = reply.body.as_bytes();
        // SAFETY: the host only reads the given lengths at the given addresses.
        status(unsafe {
            proxy_send_local_response(
                reply.status,
                null(),
                0,
                body.as_ptr(),
                body.len(),
                headers.as_ptr(),
                headers.len(),
                NOT_GRPC,
            )
        })
    }

    fn response_header(&self, name: &str) -> Result<Option<Vec<u8>>, HostStatus> {
        map_value(RESPONSE_HEADERS, name)
    }

    fn set_response_header(&self, name: &str, value: &str) -> Result<(), HostStatus> {
        replace_map_value(RESPONSE_HEADERS, name, value)
    }

    fn add_response_header(&self, name: &str, value: &str) -> Result<(), HostStatus> {
        add_map_value(RESPONSE_HEADERS, name, value)
    }

    fn continue_response(&self) -> Result<(), HostStatus> {
        // SAFETY: no memory is passed.
        status(unsafe { proxy_continue_stream(HTTP_RESPONSE) })
    }

    fn property(&self, path: &[&str]) -> Result<Option<Vec<u8>>, HostStatus> {
        // The ABI's path: its parts joined by NUL.
        let path = path.join("\0");
        read_buffer(|data, size| {
            // SAFETY: the host reads `path.len()` bytes at `path.as_ptr()` and writes the
            // two out-pointers, which live across the call.
            unsafe { proxy_get_property(path.as_ptr(), path.len(), data, size) }
        })
    }
}

/// Adds a header to a header map, keeping any copies it has.
fn add_map_value(map_type: u32, name: &str, value: &str) -> Result<(), HostStatus> {
    // SAFETY: the host only reads the given lengths at the given addresses.
    status(unsafe {
        proxy_add_header_map_value(
            map_type,
            name.as_ptr(),
            name.len(),
            value.as_ptr(),
            value.len(),
        )
    })
}

/// Sets a header of a header map, replacing every copy.
fn replace_map_value(map_type: u32, name: &str, value: &str) -> Result<(), HostStatus> {
    // SAFETY: the host only reads the given lengths at the given addresses.
    status(unsafe {
        proxy_replace_header_map_value(
            map_type,
            name.as_ptr(),
            name.len(),
            value.as_ptr(),
            value.len(),
        )
    })
}
