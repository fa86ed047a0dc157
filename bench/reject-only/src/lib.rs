//! The edge benchmark's floor for a wasm rejection: a proxy-wasm filter that answers every
//! request with a 429 and does nothing else (no header read, no clock, no stats). The
//! seckill filter's reject paths are measured against it and against Envoy's native
//! `local_ratelimit`, in the same run (see `bench/src/bin/seckill-bench.rs`).
//!
//! Built only for wasm32: the native workspace build compiles it to an empty library.

#[cfg(target_arch = "wasm32")]
mod filter {
    use proxy_wasm::traits::{Context, HttpContext, RootContext};
    use proxy_wasm::types::{Action, ContextType};

    proxy_wasm::main! {{
        proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root) });
    }}

    struct Root;

    impl Context for Root {}

    impl RootContext for Root {
        fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
            Some(Box::new(Reject))
        }

        fn get_type(&self) -> Option<ContextType> {
            Some(ContextType::HttpContext)
        }
    }

    struct Reject;

    impl Context for Reject {}

    impl HttpContext for Reject {
        fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
            self.send_http_response(429, vec![], Some(b"rate_limited"));
            Action::Pause
        }
    }
}
