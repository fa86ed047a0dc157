//! The module's exports: the proxy-wasm ABI (0.2.1) entry points Envoy calls, each handing
//! over to [`Contexts`] with the real host. Only the callbacks the gate uses are exported (see
//! `dispatch.rs` for why): no `on_log`, `on_done`, `on_vm_start`, response body or trailers,
//! and nothing of the network-filter or gRPC callbacks.
//!
//! Envoy never re-enters the VM while one of its callbacks runs (a callout answered inline is
//! deferred until the call returns), so one borrow of the contexts per callback holds; should
//! a host ever re-enter, the inner callback is dropped (logged) rather than trap the VM.

use std::cell::RefCell;
use std::mem::MaybeUninit;

use super::abi::RealHost;
use super::dispatch::Contexts;
use super::{Flow, Host, LogLevel};

thread_local! {
    static CONTEXTS: RefCell<Contexts<RealHost>> = RefCell::new(Contexts::new(RealHost));
}

/// Runs `f` on the contexts; `fallback` when they are already in use (a re-entered VM).
fn with_contexts<T>(fallback: T, f: impl FnOnce(&mut Contexts<RealHost>) -> T) -> T {
    CONTEXTS.with(|contexts| match contexts.try_borrow_mut() {
        Ok(mut contexts) => f(&mut contexts),
        Err(_) => {
            let _ = RealHost.log(
                LogLevel::Error,
                "seckill-filter: a callback re-entered the VM; ignored",
            );
            fallback
        }
    })
}

/// The ABI's `Action`.
fn action(flow: Flow) -> u32 {
    match flow {
        Flow::Continue => 0,
        Flow::Pause => 1,
    }
}

extern "C" {
    /// Static constructors of a WASI reactor, which the module runs itself.
    fn __wasm_call_ctors();
}

/// Run once by the host after instantiating the module.
#[no_mangle]
pub extern "C" fn _initialize() {
    // SAFETY: called once, before any other export, as a WASI reactor requires.
    unsafe { __wasm_call_ctors() };
    // A panic's message goes to Envoy's log before the VM traps.
    std::panic::set_hook(Box::new(|panic| {
        let _ = RealHost.log(LogLevel::Error, &format!("seckill-filter: {panic}"));
    }));
}

/// Tells the host which ABI this module speaks.
#[no_mangle]
pub extern "C" fn proxy_abi_version_0_2_1() {}

/// The host allocates in the VM through this when it hands a buffer over; `abi.rs` takes
/// the buffer back as a `Vec` of exactly `size` bytes.
#[no_mangle]
pub extern "C" fn proxy_on_memory_allocate(size: usize) -> *mut u8 {
    // Not zeroed: the host writes every byte before the module reads any.
    let mut buffer: Vec<MaybeUninit<u8>> = Vec::with_capacity(size);
    // SAFETY: the capacity is `size`; `MaybeUninit` needs no initialisation.
    unsafe { buffer.set_len(size) };
    Box::into_raw(buffer.into_boxed_slice()).cast::<u8>()
}

#[no_mangle]
pub extern "C" fn proxy_on_context_create(context_id: u32, parent_context_id: u32) {
    with_contexts((), |c| c.create(context_id, parent_context_id));
}

#[no_mangle]
pub extern "C" fn proxy_on_configure(context_id: u32, _configuration_size: usize) -> u32 {
    u32::from(with_contexts(false, |c| c.configure(context_id)))
}

#[no_mangle]
pub extern "C" fn proxy_on_tick(context_id: u32) {
    with_contexts((), |c| c.tick(context_id));
}

#[no_mangle]
pub extern "C" fn proxy_on_queue_ready(context_id: u32, queue_id: u32) {
    with_contexts((), |c| c.queue_ready(context_id, queue_id));
}

#[no_mangle]
pub extern "C" fn proxy_on_http_call_response(
    context_id: u32,
    token: u32,
    num_headers: usize,
    body_size: usize,
    _num_trailers: usize,
) {
    with_contexts((), |c| {
        c.http_call_response(context_id, token, num_headers, body_size)
    });
}

#[no_mangle]
pub extern "C" fn proxy_on_request_headers(
    context_id: u32,
    _num_headers: usize,
    _end_of_stream: u32,
) -> u32 {
    action(with_contexts(Flow::Pause, |c| {
        c.request_headers(context_id)
    }))
}

#[no_mangle]
pub extern "C" fn proxy_on_request_body(
    context_id: u32,
    _body_size: usize,
    _end_of_stream: u32,
) -> u32 {
    action(with_contexts(Flow::Pause, |c| c.request_data(context_id)))
}

#[no_mangle]
pub extern "C" fn proxy_on_request_trailers(context_id: u32, _num_trailers: usize) -> u32 {
    action(with_contexts(Flow::Pause, |c| c.request_data(context_id)))
}

#[no_mangle]
pub extern "C" fn proxy_on_response_headers(
    context_id: u32,
    _num_headers: usize,
    _end_of_stream: u32,
) -> u32 {
    action(with_contexts(Flow::Continue, |c| {
        c.response_headers(context_id)
    }))
}

#[no_mangle]
pub extern "C" fn proxy_on_delete(context_id: u32) {
    with_contexts((), |c| c.delete(context_id));
}
