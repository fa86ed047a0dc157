//! Which context each proxy-wasm callback is for: the root contexts (one per plugin
//! configuration of this VM) and the request contexts they create. `exports.rs` hands every
//! callback Envoy calls to [`Contexts`]; nothing is decided here.
//!
//! Why not the SDK's dispatcher: it exports every `proxy_on_*` callback of the ABI, and Envoy
//! enters the VM for each callback a module exports, whether or not the module cares (a
//! callback the module does not export is skipped on the host side). For a request the gate
//! answers itself, the SDK's module is entered seven times (context create, request headers,
//! response headers, response body, done, log, delete); this module exports only what the
//! gate uses, so the same request enters it four times (context create, request headers,
//! response headers, delete). Context create is kept because it is the only callback that
//! names a request's root context; delete is kept because a request waiting for a decision
//! must leave its batch when its client goes away.
//!
//! Generic over [`Host`], so the native tests drive it with the fake host.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use super::{Flow, Host, Root, SaleRequest};
use crate::reply;

/// A request context: a sale request of a configured root, or a stand-in that answers 503
/// (Envoy creates no request context before its root accepted a configuration; this only
/// guards against a host that does).
enum Stream<H: Host> {
    Sale(SaleRequest<H>),
    Unconfigured,
}

/// Context ids are small numbers the host hands out in sequence: a multiplicative hash
/// spreads them well, at a fraction of the default hasher's cost (this map is looked up on
/// every callback of every request).
#[derive(Default)]
pub(crate) struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for byte in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(*byte)).wrapping_mul(FIBONACCI);
        }
    }

    fn write_u32(&mut self, id: u32) {
        self.0 = (self.0 ^ u64::from(id)).wrapping_mul(FIBONACCI);
    }
}

/// 2^64 / golden ratio: consecutive ids land far apart, in the high bits too.
const FIBONACCI: u64 = 0x9E37_79B9_7F4A_7C15;

type IdMap<V> = HashMap<u32, V, BuildHasherDefault<IdHasher>>;

/// Every live context of this VM.
pub(crate) struct Contexts<H: Host> {
    host: H,
    /// Root contexts by id: one per plugin configuration sharing this VM, so a handful at
    /// most; a list beats a map.
    roots: Vec<(u32, Root<H>)>,
    requests: IdMap<Stream<H>>,
}

impl<H: Host> Contexts<H> {
    pub(crate) fn new(host: H) -> Self {
        Contexts {
            host,
            roots: Vec::new(),
            requests: IdMap::default(),
        }
    }

    fn root(&mut self, context_id: u32) -> Option<&mut Root<H>> {
        self.roots
            .iter_mut()
            .find(|(id, _)| *id == context_id)
            .map(|(_, root)| root)
    }

    /// `proxy_on_context_create`: a root context (no parent) or a request of `parent_id`.
    pub(crate) fn create(&mut self, context_id: u32, parent_id: u32) {
        if parent_id == 0 {
            // A reused id replaces whatever held it: the host says that context is new.
            self.roots.retain(|(id, _)| *id != context_id);
            let root = Root::new(self.host.clone(), context_id);
            self.roots.push((context_id, root));
            return;
        }
        let stream = match self.root(parent_id).and_then(|r| r.new_request(context_id)) {
            Some(request) => Stream::Sale(request),
            None => Stream::Unconfigured,
        };
        self.requests.insert(context_id, stream);
    }

    /// `proxy_on_configure`: false refuses the configuration (and so does an unknown root).
    pub(crate) fn configure(&mut self, context_id: u32) -> bool {
        self.root(context_id).is_some_and(Root::configure)
    }

    pub(crate) fn tick(&mut self, context_id: u32) {
        if let Some(root) = self.root(context_id) {
            root.tick();
        }
    }

    pub(crate) fn queue_ready(&mut self, context_id: u32, queue_id: u32) {
        if let Some(root) = self.root(context_id) {
            root.wake(queue_id);
        }
    }

    /// `proxy_on_http_call_response`. Envoy makes every callout on behalf of the root
    /// context and delivers every answer there: a request's release call is handed to the
    /// request that made it, acting as that request (as the SDK's dispatcher did); one whose
    /// request has ended is dropped. Everything else is the root's (deduct and claim calls).
    pub(crate) fn http_call_response(
        &mut self,
        context_id: u32,
        token: u32,
        num_headers: usize,
        body_size: usize,
    ) {
        if let Some((_, root)) = self.roots.iter_mut().find(|(id, _)| *id == context_id) {
            let Some(caller) = root.release_caller(token) else {
                root.callout_answered(token, num_headers, body_size);
                return;
            };
            if let Some(Stream::Sale(request)) = self.requests.get_mut(&caller) {
                // Refused only when the request is gone, which then waits for nothing.
                if self.host.set_effective_context(caller).is_ok() {
                    request.release_answered(token, num_headers);
                }
            }
        } else if let Some(Stream::Sale(request)) = self.requests.get_mut(&context_id) {
            // A host that answers the context that made the call.
            request.release_answered(token, num_headers);
        }
    }

    /// `proxy_on_request_headers`. A context this VM does not know is answered 503 rather
    /// than let through ungated.
    pub(crate) fn request_headers(&mut self, context_id: u32) -> Flow {
        match self.requests.get_mut(&context_id) {
            Some(Stream::Sale(request)) => request.on_request_headers(),
            Some(Stream::Unconfigured) | None => {
                // Refused only when the request is gone.
                let _ = self.host.send_local_reply(&reply::unavailable(None));
                Flow::Pause
            }
        }
    }

    /// `proxy_on_request_body` and `proxy_on_request_trailers`.
    pub(crate) fn request_data(&mut self, context_id: u32) -> Flow {
        match self.requests.get(&context_id) {
            Some(Stream::Sale(request)) => request.on_request_data(),
            Some(Stream::Unconfigured) | None => Flow::Continue,
        }
    }

    pub(crate) fn response_headers(&mut self, context_id: u32) -> Flow {
        match self.requests.get_mut(&context_id) {
            Some(Stream::Sale(request)) => request.on_response_headers(),
            Some(Stream::Unconfigured) | None => Flow::Continue,
        }
    }

    /// `proxy_on_delete`: the context is gone for good (a request that still waits leaves
    /// its batch as it drops).
    pub(crate) fn delete(&mut self, context_id: u32) {
        if self.requests.remove(&context_id).is_none() {
            self.roots.retain(|(id, _)| *id != context_id);
        }
    }

    /// Live request contexts (for the tests).
    #[cfg(test)]
    pub(crate) fn requests(&self) -> usize {
        self.requests.len()
    }

    /// Live root contexts (for the tests).
    #[cfg(test)]
    pub(crate) fn roots(&self) -> usize {
        self.roots.len()
    }
}
