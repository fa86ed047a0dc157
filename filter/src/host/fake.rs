//! A fake host for the native tests: it keeps what Envoy keeps (request and response headers
//! per context, shared data with compare-and-swap, shared queues, counters, the effective
//! context), records every act the filter asks of it (local replies, callouts, header
//! changes, resumes), and can be told to refuse any host operation. `Gate` drives the root
//! and its requests through the callbacks Envoy would call, in the order it would.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, HashSet, VecDeque};
use std::rc::Rc;
use std::time::Duration;

use serde_json::{json, Value};

use super::{Flow, Host, HostStatus, LogLevel, Root, SaleRequest, Seen, SetError, SharedStore};
use crate::input::serialize_header_map;
use crate::reply::LocalReply;

/// What the filter asked the host to do, and as which context.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Call {
    Reply {
        context: u32,
        status: u32,
        headers: Vec<(String, String)>,
        body: String,
    },
    Dispatch {
        context: u32,
        token: u32,
        cluster: String,
        headers: Vec<(String, String)>,
        body: Option<Vec<u8>>,
        timeout: Duration,
    },
    ContinueRequest {
        context: u32,
    },
    ContinueResponse {
        context: u32,
    },
}

/// Host operations the fake can be told to refuse.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Op {
    Time,
    PluginConfiguration,
    TickPeriod,
    DefineCounter,
    RegisterQueue,
    Enqueue,
    Dispatch,
    RequestHeaderMap,
    SendLocalReply,
    SharedGet,
}

/// The status a refusal answers with unless the test chose another.
const REFUSED: HostStatus = HostStatus::BAD_ARGUMENT;

#[derive(Default)]
pub(crate) struct State {
    pub(crate) now_ns: Cell<u64>,
    effective: Cell<u32>,
    ended: RefCell<HashSet<u32>>,
    refused: RefCell<HashMap<Op, HostStatus>>,
    config: RefCell<Option<Vec<u8>>>,
    calls: RefCell<Vec<Call>>,
    logs: RefCell<Vec<(LogLevel, String)>>,
    counters: RefCell<Vec<(String, i64)>>,
    queues: RefCell<Vec<(String, VecDeque<Vec<u8>>)>>,
    next_token: Cell<u32>,
    shared: RefCell<HashMap<String, (Vec<u8>, u32)>>,
    next_cas: Cell<u32>,
    request_headers: RefCell<HashMap<u32, Vec<(String, String)>>>,
    response_headers: RefCell<HashMap<u32, Vec<(String, String)>>>,
    code_details: RefCell<HashMap<u32, String>>,
    /// `:status` and body of the callout answer being delivered.
    call_response: RefCell<(Option<String>, Vec<u8>)>,
    /// Every host operation called, by name, in order (what a path costs in host calls).
    trace: RefCell<Vec<&'static str>>,
}

#[derive(Clone, Default)]
pub(crate) struct FakeHost(Rc<State>);

impl FakeHost {
    pub(crate) fn refuse(&self, op: Op) {
        self.refuse_with(op, REFUSED);
    }

    pub(crate) fn refuse_with(&self, op: Op, status: HostStatus) {
        self.0.refused.borrow_mut().insert(op, status);
    }

    pub(crate) fn set_config(&self, config: &Value) {
        *self.0.config.borrow_mut() = Some(config.to_string().into_bytes());
    }

    pub(crate) fn allow(&self, op: Op) {
        self.0.refused.borrow_mut().remove(&op);
    }

    fn check(&self, op: Op) -> Result<(), HostStatus> {
        match self.0.refused.borrow().get(&op) {
            Some(status) => Err(*status),
            None => Ok(()),
        }
    }

    fn effective(&self) -> u32 {
        self.0.effective.get()
    }

    /// Envoy runs a callback of this context.
    pub(crate) fn enter(&self, context: u32) {
        self.0.effective.set(context);
    }

    /// Request `context` arrives with these headers (its callbacks not run yet).
    pub(crate) fn arrive(&self, context: u32, headers: &[(&str, &str)]) {
        let headers = owned(headers.iter().copied());
        self.0.request_headers.borrow_mut().insert(context, headers);
    }

    /// The `:status` (None: no headers at all) and body of the callout answer delivered next.
    pub(crate) fn set_call_response(&self, status: Option<&str>, body: &str) {
        *self.0.call_response.borrow_mut() = (status.map(str::to_string), body.as_bytes().to_vec());
    }

    /// The shop's response to request `context` arrives: its `:status` and Envoy's
    /// `response.code_details`.
    pub(crate) fn set_response(&self, context: u32, status: &str, code_details: &str) {
        let headers = vec![(":status".to_string(), status.to_string())];
        self.0
            .response_headers
            .borrow_mut()
            .insert(context, headers);
        let details = code_details.to_string();
        self.0.code_details.borrow_mut().insert(context, details);
    }

    /// The request ended (its client went away): it can no longer be made effective.
    pub(crate) fn end(&self, context: u32) {
        self.0.ended.borrow_mut().insert(context);
    }

    pub(crate) fn advance(&self, by: Duration) {
        let now = self.0.now_ns.get() + super::duration_ns(by);
        self.0.now_ns.set(now);
    }

    pub(crate) fn calls(&self) -> Vec<Call> {
        self.0.calls.borrow().clone()
    }

    pub(crate) fn logs(&self) -> Vec<(LogLevel, String)> {
        self.0.logs.borrow().clone()
    }

    pub(crate) fn counter(&self, name: &str) -> i64 {
        let counters = self.0.counters.borrow();
        counters.iter().find(|(n, _)| n == name).map_or(0, |c| c.1)
    }

    /// The request headers the upstream would get from this context.
    pub(crate) fn request_headers(&self, context: u32) -> Vec<(String, String)> {
        let headers = self.0.request_headers.borrow();
        headers.get(&context).cloned().unwrap_or_default()
    }

    pub(crate) fn response_headers(&self, context: u32) -> Vec<(String, String)> {
        let headers = self.0.response_headers.borrow();
        headers.get(&context).cloned().unwrap_or_default()
    }

    pub(crate) fn shared_keys(&self) -> Vec<String> {
        let mut keys: Vec<String> = self.0.shared.borrow().keys().cloned().collect();
        keys.sort();
        keys
    }

    fn trace(&self, operation: &'static str) {
        self.0.trace.borrow_mut().push(operation);
    }

    /// The host operations called since the last look.
    pub(crate) fn take_trace(&self) -> Vec<&'static str> {
        std::mem::take(&mut self.0.trace.borrow_mut())
    }

    fn record(&self, call: Call) {
        self.0.calls.borrow_mut().push(call);
    }

    fn with_headers<T>(
        map: &RefCell<HashMap<u32, Vec<(String, String)>>>,
        context: u32,
        f: impl FnOnce(&mut Vec<(String, String)>) -> T,
    ) -> T {
        f(map.borrow_mut().entry(context).or_default())
    }

    fn replace(
        map: &RefCell<HashMap<u32, Vec<(String, String)>>>,
        context: u32,
        name: &str,
        value: &str,
    ) {
        FakeHost::with_headers(map, context, |headers| {
            headers.retain(|(n, _)| n != name);
            headers.push((name.to_string(), value.to_string()));
        });
    }
}

impl SharedStore for FakeHost {
    fn get(&self, key: &str) -> Result<Seen, HostStatus> {
        self.trace("shared_get");
        self.check(Op::SharedGet)?;
        Ok(match self.0.shared.borrow().get(key) {
            Some((value, cas)) => (Some(value.clone()), Some(*cas)),
            None => (None, None),
        })
    }

    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), SetError> {
        self.trace("shared_set");
        let mut shared = self.0.shared.borrow_mut();
        if let (Some(cas), Some((_, current))) = (cas, shared.get(key)) {
            if cas != *current {
                return Err(SetError::CasMismatch);
            }
        }
        let cas = self.0.next_cas.get() + 1;
        self.0.next_cas.set(cas);
        shared.insert(key.to_string(), (value.to_vec(), cas));
        Ok(())
    }
}

impl Host for FakeHost {
    fn current_time_ns(&self) -> Result<u64, HostStatus> {
        self.trace("current_time_ns");
        self.check(Op::Time)?;
        Ok(self.0.now_ns.get())
    }

    fn log(&self, level: LogLevel, message: &str) -> Result<(), HostStatus> {
        self.trace("log");
        self.0.logs.borrow_mut().push((level, message.to_string()));
        Ok(())
    }

    fn plugin_configuration(&self) -> Result<Option<Vec<u8>>, HostStatus> {
        self.trace("plugin_configuration");
        self.check(Op::PluginConfiguration)?;
        Ok(self.0.config.borrow().clone())
    }

    fn set_tick_period(&self, _period: Duration) -> Result<(), HostStatus> {
        self.trace("set_tick_period");
        self.check(Op::TickPeriod)
    }

    fn define_counter(&self, name: &str) -> Result<u32, HostStatus> {
        self.trace("define_counter");
        self.check(Op::DefineCounter)?;
        let mut counters = self.0.counters.borrow_mut();
        if let Some(id) = counters.iter().position(|(n, _)| n == name) {
            return Ok(id as u32);
        }
        counters.push((name.to_string(), 0));
        Ok(counters.len() as u32 - 1)
    }

    fn increment_counter(&self, counter: u32, offset: i64) -> Result<(), HostStatus> {
        self.trace("increment_counter");
        let mut counters = self.0.counters.borrow_mut();
        let entry = counters.get_mut(counter as usize).ok_or(HostStatus(1))?;
        entry.1 += offset;
        Ok(())
    }

    fn register_shared_queue(&self, name: &str) -> Result<u32, HostStatus> {
        self.trace("register_shared_queue");
        self.check(Op::RegisterQueue)?;
        let mut queues = self.0.queues.borrow_mut();
        queues.push((name.to_string(), VecDeque::new()));
        Ok(queues.len() as u32 - 1)
    }

    fn enqueue_shared_queue(&self, queue: u32, value: &[u8]) -> Result<(), HostStatus> {
        self.trace("enqueue_shared_queue");
        self.check(Op::Enqueue)?;
        let mut queues = self.0.queues.borrow_mut();
        let (_, entries) = queues.get_mut(queue as usize).ok_or(HostStatus(1))?;
        entries.push_back(value.to_vec());
        Ok(())
    }

    fn dequeue_shared_queue(&self, queue: u32) -> Result<Option<Vec<u8>>, HostStatus> {
        self.trace("dequeue_shared_queue");
        let mut queues = self.0.queues.borrow_mut();
        let (_, entries) = queues.get_mut(queue as usize).ok_or(HostStatus(1))?;
        Ok(entries.pop_front())
    }

    fn dispatch_http_call(
        &self,
        cluster: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
        timeout: Duration,
    ) -> Result<u32, HostStatus> {
        self.trace("dispatch_http_call");
        self.check(Op::Dispatch)?;
        let token = 100 + self.0.next_token.get();
        self.0.next_token.set(self.0.next_token.get() + 1);
        self.record(Call::Dispatch {
            context: self.effective(),
            token,
            cluster: cluster.to_string(),
            headers: owned(headers.iter().map(|(n, v)| (*n, *v))),
            body: body.map(<[u8]>::to_vec),
            timeout,
        });
        Ok(token)
    }

    fn http_call_response_header(&self, name: &str) -> Result<Option<Vec<u8>>, HostStatus> {
        self.trace("http_call_response_header");
        let response = self.0.call_response.borrow();
        Ok((name == ":status")
            .then(|| response.0.clone().map(String::into_bytes))
            .flatten())
    }

    fn http_call_response_body(&self, max_size: usize) -> Result<Option<Vec<u8>>, HostStatus> {
        self.trace("http_call_response_body");
        let body = &self.0.call_response.borrow().1;
        Ok(Some(body[..body.len().min(max_size)].to_vec()))
    }

    fn set_effective_context(&self, context_id: u32) -> Result<(), HostStatus> {
        self.trace("set_effective_context");
        if self.0.ended.borrow().contains(&context_id) {
            return Err(REFUSED);
        }
        self.0.effective.set(context_id);
        Ok(())
    }

    fn request_header_map(&self) -> Result<Vec<u8>, HostStatus> {
        self.trace("request_header_map");
        self.check(Op::RequestHeaderMap)?;
        let headers = self.request_headers(self.effective());
        let pairs = headers.iter().map(|(n, v)| (n.as_bytes(), v.as_bytes()));
        Ok(serialize_header_map(pairs))
    }

    fn remove_request_header(&self, name: &[u8]) -> Result<(), HostStatus> {
        self.trace("remove_request_header");
        FakeHost::with_headers(&self.0.request_headers, self.effective(), |headers| {
            headers.retain(|(n, _)| n.as_bytes() != name);
        });
        Ok(())
    }

    fn set_request_header(&self, name: &str, value: &str) -> Result<(), HostStatus> {
        self.trace("set_request_header");
        FakeHost::replace(&self.0.request_headers, self.effective(), name, value);
        Ok(())
    }

    fn add_request_header(&self, name: &str, value: &str) -> Result<(), HostStatus> {
        self.trace("add_request_header");
        FakeHost::with_headers(&self.0.request_headers, self.effective(), |headers| {
            headers.push((name.to_string(), value.to_string()));
        });
        Ok(())
    }

    fn continue_request(&self) -> Result<(), HostStatus> {
        self.trace("continue_request");
        self.record(Call::ContinueRequest {
            context: self.effective(),
        });
        Ok(())
    }

    fn send_local_reply(&self, reply: &LocalReply) -> Result<(), HostStatus> {
        self.trace("send_local_reply");
        self.check(Op::SendLocalReply)?;
        let headers = reply.headers.iter().map(|(n, v)| (*n, v.as_ref()));
        self.record(Call::Reply {
            context: self.effective(),
            status: reply.status,
            headers: owned(headers),
            body: reply.body.clone(),
        });
        Ok(())
    }

    fn response_header(&self, name: &str) -> Result<Option<Vec<u8>>, HostStatus> {
        self.trace("response_header");
        let headers = self.response_headers(self.effective());
        let value = headers.into_iter().find(|(n, _)| n == name);
        Ok(value.map(|(_, v)| v.into_bytes()))
    }

    fn set_response_header(&self, name: &str, value: &str) -> Result<(), HostStatus> {
        self.trace("set_response_header");
        FakeHost::replace(&self.0.response_headers, self.effective(), name, value);
        Ok(())
    }

    fn add_response_header(&self, name: &str, value: &str) -> Result<(), HostStatus> {
        self.trace("add_response_header");
        FakeHost::with_headers(&self.0.response_headers, self.effective(), |headers| {
            headers.push((name.to_string(), value.to_string()));
        });
        Ok(())
    }

    fn continue_response(&self) -> Result<(), HostStatus> {
        self.trace("continue_response");
        self.record(Call::ContinueResponse {
            context: self.effective(),
        });
        Ok(())
    }

    fn property(&self, path: &[&str]) -> Result<Option<Vec<u8>>, HostStatus> {
        self.trace("property");
        if path != ["response", "code_details"] {
            return Ok(None);
        }
        let details = self.0.code_details.borrow();
        Ok(details
            .get(&self.effective())
            .map(|d| d.clone().into_bytes()))
    }
}

fn owned<'a>(pairs: impl Iterator<Item = (&'a str, &'a str)>) -> Vec<(String, String)> {
    pairs.map(|(n, v)| (n.to_string(), v.to_string())).collect()
}

/// The root context's id (Envoy numbers the root first).
pub(crate) const ROOT: u32 = 1;

/// A plugin configuration for the tests: one sale route, generous rates, the sold-out and
/// unknown-goods caches on.
pub(crate) fn config() -> Value {
    json!({
        "route": {"path_template": "/seckill/{goods_id}/buy"},
        "goods_id": {"path": "goods_id"},
        "user_id": {"header": "x-user-id"},
        "deduct": {"cluster": "syncer", "authority": "seckill-syncer", "timeout_ms": 300,
                   "secret_env": "SECKILL_TEST_EDGE_SECRET"},
        "rate_limit": {"default": {"per_second": 1000, "burst": 1000},
                       "goods": {"hot": {"per_second": 1000, "burst": 1000}}},
        "sold_out_cache_ms": 2000,
        "unknown_goods_cache_ms": 1000
    })
}

/// One worker: a fake host, its root context, and the requests Envoy would create.
pub(crate) struct Gate {
    pub(crate) host: FakeHost,
    pub(crate) root: Root<FakeHost>,
}

impl Gate {
    /// A worker configured with `config()` changed by `edit`.
    pub(crate) fn new(edit: impl FnOnce(&mut Value)) -> Gate {
        let mut config = config();
        edit(&mut config);
        let host = FakeHost::default();
        host.0.now_ns.set(1_700_000_000_000_000_000);
        host.set_config(&config);
        let mut root = Root::new(host.clone(), ROOT);
        host.enter(ROOT);
        assert!(root.configure(), "{:?}", host.logs());
        Gate { host, root }
    }

    /// Request `context` arrives with these headers; its header callback runs.
    pub(crate) fn request(
        &mut self,
        context: u32,
        headers: &[(&str, &str)],
    ) -> (SaleRequest<FakeHost>, Flow) {
        self.host.arrive(context, headers);
        let mut request = self.root.new_request(context).expect("configured");
        self.host.enter(context);
        let flow = request.on_request_headers();
        (request, flow)
    }

    /// A valid purchase of one unit of `goods` by `user`, with request id `r<context>`.
    pub(crate) fn buy(
        &mut self,
        context: u32,
        goods: &str,
        user: &str,
    ) -> (SaleRequest<FakeHost>, Flow) {
        let path = format!("/seckill/{goods}/buy");
        let request_id = format!("r{context}");
        self.request(
            context,
            &[
                (":method", "POST"),
                (":path", &path),
                ("x-user-id", user),
                ("x-request-id", &request_id),
            ],
        )
    }

    /// Request `context` buys one `goods` as `user-<context>` and leaves at once in a call
    /// of its own: the request and the call's token.
    pub(crate) fn buy_and_send(
        &mut self,
        context: u32,
        goods: &str,
    ) -> (SaleRequest<FakeHost>, u32) {
        let (request, flow) = self.buy(context, goods, &format!("user-{context}"));
        assert_eq!(flow, Flow::Pause);
        self.wake();
        let token = self.dispatches().last().expect("a deduct call").token;
        (request, token)
    }

    /// As [`Gate::buy_and_send`], and the syncer answers `item` for it.
    pub(crate) fn decide(
        &mut self,
        context: u32,
        goods: &str,
        item: Value,
    ) -> SaleRequest<FakeHost> {
        let (request, token) = self.buy_and_send(context, goods);
        self.answer(token, Some("200"), &batch_reply(&[item]));
        request
    }

    /// Envoy delivers the wake-ups requests enqueued: `on_queue_ready` of the root.
    pub(crate) fn wake(&mut self) {
        let queues = self.host.0.queues.borrow().len() as u32;
        for queue in 0..queues {
            let waiting = !self.host.0.queues.borrow()[queue as usize].1.is_empty();
            if waiting {
                self.host.enter(ROOT);
                self.root.wake(queue);
            }
        }
    }

    /// The answer to callout `token` reaches the root: `status` None means no headers at
    /// all (Envoy's way of reporting a timeout or a failed connection).
    pub(crate) fn answer(&mut self, token: u32, status: Option<&str>, body: &str) {
        *self.host.0.call_response.borrow_mut() =
            (status.map(str::to_string), body.as_bytes().to_vec());
        self.host.enter(ROOT);
        let num_headers = usize::from(status.is_some());
        self.root.callout_answered(token, num_headers, body.len());
    }

    pub(crate) fn tick(&mut self) {
        self.host.enter(ROOT);
        self.root.tick();
    }

    /// The shop's response to a forwarded request reaches its response-header callback.
    pub(crate) fn shop_answers(
        &self,
        request: &mut SaleRequest<FakeHost>,
        context: u32,
        status: &str,
        code_details: &str,
    ) -> Flow {
        self.host.set_response(context, status, code_details);
        self.host.enter(context);
        request.on_response_headers()
    }

    /// The answer to a request's own callout (a release) reaches it.
    pub(crate) fn release_answered(
        &self,
        request: &mut SaleRequest<FakeHost>,
        context: u32,
        token: u32,
        status: Option<&str>,
    ) {
        *self.host.0.call_response.borrow_mut() = (status.map(str::to_string), Vec::new());
        self.host.enter(context);
        request.release_answered(token, usize::from(status.is_some()));
    }

    /// The callouts dispatched so far (token, context that made it, path, body as JSON).
    pub(crate) fn dispatches(&self) -> Vec<Dispatched> {
        self.host
            .calls()
            .into_iter()
            .filter_map(|call| match call {
                Call::Dispatch {
                    context,
                    token,
                    headers,
                    body,
                    ..
                } => Some(Dispatched {
                    token,
                    context,
                    path: header(&headers, ":path").unwrap_or_default().to_string(),
                    body: body.map(|b| serde_json::from_slice(&b).expect("JSON body")),
                }),
                _ => None,
            })
            .collect()
    }

    /// The local replies sent so far: (context, status, outcome header, body as JSON).
    pub(crate) fn replies(&self) -> Vec<(u32, u32, String, Value)> {
        self.host
            .calls()
            .into_iter()
            .filter_map(|call| match call {
                Call::Reply {
                    context,
                    status,
                    headers,
                    body,
                } => Some((
                    context,
                    status,
                    header(&headers, "x-seckill-outcome")
                        .unwrap_or_default()
                        .to_string(),
                    serde_json::from_str(&body).expect("JSON body"),
                )),
                _ => None,
            })
            .collect()
    }

    /// The one local reply sent so far: (context, status, outcome header).
    pub(crate) fn only_reply(&self) -> (u32, u32, String) {
        let replies = self.replies();
        assert_eq!(replies.len(), 1, "one reply expected: {replies:?}");
        let (context, status, outcome, _) = replies[0].clone();
        (context, status, outcome)
    }

    /// Contexts resumed towards the shop.
    pub(crate) fn resumed(&self) -> Vec<u32> {
        self.host
            .calls()
            .into_iter()
            .filter_map(|call| match call {
                Call::ContinueRequest { context } => Some(context),
                _ => None,
            })
            .collect()
    }
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Dispatched {
    pub(crate) token: u32,
    pub(crate) context: u32,
    pub(crate) path: String,
    pub(crate) body: Option<Value>,
}

pub(crate) fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
}

/// A batch deduct reply body: one item per attempt.
pub(crate) fn batch_reply(items: &[Value]) -> String {
    json!({ "replies": items }).to_string()
}

pub(crate) fn won(order_id: &str, remaining: u64) -> Value {
    json!({"outcome": "won", "order_id": order_id, "remaining": remaining})
}

pub(crate) fn lost(outcome: &str, remaining: Option<u64>) -> Value {
    match remaining {
        Some(remaining) => json!({"outcome": outcome, "remaining": remaining}),
        None => json!({"outcome": outcome}),
    }
}
