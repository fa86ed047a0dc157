//! The SDK's callbacks, each handing over to the logic of `root.rs` and `request.rs` with the
//! real host. Nothing is decided here.

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};

use super::abi::RealHost;
use super::{Flow, Host, Root, SaleRequest};
use crate::reply;

proxy_wasm::main! {{
    // The filter logs through `Host::log`; this installs the SDK's panic hook, which puts a
    // panic's message in Envoy's log before the VM traps. Info: per-request debug lines
    // would cost a host call each even when Envoy drops them.
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|context_id| -> Box<dyn RootContext> {
        Box::new(Root::new(RealHost, context_id))
    });
}}

fn action(flow: Flow) -> Action {
    match flow {
        Flow::Continue => Action::Continue,
        Flow::Pause => Action::Pause,
    }
}

impl Context for Root<RealHost> {
    fn on_http_call_response(
        &mut self,
        token_id: u32,
        num_headers: usize,
        body_size: usize,
        _num_trailers: usize,
    ) {
        self.callout_answered(token_id, num_headers, body_size);
    }
}

impl RootContext for Root<RealHost> {
    fn on_configure(&mut self, _plugin_configuration_size: usize) -> bool {
        self.configure()
    }

    fn on_queue_ready(&mut self, queue_id: u32) {
        self.wake(queue_id);
    }

    fn on_tick(&mut self) {
        self.tick();
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        // Returning None would make the SDK panic; without a configuration (which Envoy
        // does not allow to happen) answer 503 rather than let sales through ungated.
        Some(match self.new_request(context_id) {
            Some(request) => Box::new(request),
            None => Box::new(Unconfigured),
        })
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

impl Context for SaleRequest<RealHost> {
    fn on_http_call_response(
        &mut self,
        token_id: u32,
        num_headers: usize,
        _body_size: usize,
        _num_trailers: usize,
    ) {
        self.release_answered(token_id, num_headers);
    }
}

impl HttpContext for SaleRequest<RealHost> {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        action(self.on_request_headers())
    }

    fn on_http_request_body(&mut self, _body_size: usize, _end_of_stream: bool) -> Action {
        action(self.on_request_data())
    }

    fn on_http_request_trailers(&mut self, _num_trailers: usize) -> Action {
        action(self.on_request_data())
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        action(self.on_response_headers())
    }
}

/// Stand-in for a request context when no configuration was accepted (Envoy does not
/// create request contexts then; this only guards against the SDK panicking on None).
struct Unconfigured;

impl Context for Unconfigured {}

impl HttpContext for Unconfigured {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        // Refused only when the request is gone.
        let _ = RealHost.send_local_reply(&reply::unavailable(None));
        Action::Pause
    }
}
