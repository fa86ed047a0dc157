//! The syncer's HTTP surface: the deduct endpoint the filter calls, the admin API, health and
//! metrics. `router(state)` builds it without a socket so tests can drive it directly.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::RedisConn;
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use seckill_api::{
    BatchItem, ClaimReply, ClaimRequest, DeductBatchReply, DeductBatchRequest, DeductReply,
    DeductRequest, ErrorReply, SECRET_HEADER,
};
use serde::Deserialize;
use sqlx::MySqlPool;

use crate::credentials::{Keyring, Role};
use crate::db;
use crate::deduct::{DeductError, Deducter, Delivery};
use crate::keys::KeySpace;
use crate::lifecycle::{Lifecycle, LifecycleError, Settlement};
use crate::order::{OrderState, ReleaseReason};
use crate::preheat::{self, PreheatError};
use crate::reseed::ReseedError;
use crate::sale::SaleSpec;

/// Everything a handler needs; shared behind an `Arc`.
pub struct AppState {
    pub deducter: Deducter,
    pub lifecycle: Lifecycle,
    pub redis: RedisConn,
    pub keys: KeySpace,
    pub mysql: MySqlPool,
    /// Every role's credentials in force (`credentials.rs`).
    pub keyring: Keyring,
    /// Signs each winner's pass (`seckill-pass`).
    pub pass_key: seckill_pass::Key,
    pub kafka: crate::kafka::KafkaConfig,
    pub metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
    /// Who decides each goods: forgotten for a goods this process redefines or loads, so its
    /// next attempt is routed by what MySQL says now.
    pub directory: Option<crate::directory::Directory>,
    /// The live sale dashboard's figures (`dashboard.rs`); the deduct path counts answers in it.
    pub board: Arc<crate::dashboard::Board>,
}

impl AppState {
    /// The stores a sale control works on (`control/`).
    fn stores(&self) -> crate::control::Stores<'_> {
        crate::control::Stores {
            redis: Some(&self.redis),
            mysql: &self.mysql,
            keys: &self.keys,
        }
    }

    fn forget_route(&self, goods_id: &str) {
        if let Some(directory) = &self.directory {
            directory.forget(goods_id);
        }
    }
}

/// The routes of one role, behind that role's credential.
fn for_role(
    state: &Arc<AppState>,
    role: Role,
    routes: Router<Arc<AppState>>,
) -> Router<Arc<AppState>> {
    routes.route_layer(middleware::from_fn_with_state(
        (state.clone(), role),
        require_role,
    ))
}

/// The main listener: the gate's, the shop's and the operators' calls, each behind its own
/// credential (`credentials.rs`), and `/healthz`. With `with_metrics`, `/metrics` and the
/// dashboard too (when the operator gave them no listener of their own).
pub fn router(state: Arc<AppState>, with_metrics: bool) -> Router {
    let edge = Router::new()
        .route(seckill_api::DEDUCT_PATH, post(deduct))
        .route(seckill_api::DEDUCT_BATCH_PATH, post(deduct_batch))
        .route(seckill_api::CLAIM_PATH, post(claim))
        .route("/v1/orders/{order_id}/release", post(release_order));
    let shop = Router::new()
        .route("/v1/orders/{order_id}/confirm", post(confirm_order))
        .route("/v1/orders/{order_id}/cancel", post(cancel_order));
    let admin = Router::new()
        .route("/admin/sales", get(list_sales))
        .route("/admin/sales/{goods_id}", put(define_sale).get(show_sale))
        .route("/admin/sales/{goods_id}/preheat", post(preheat_sale))
        .route("/admin/sales/{goods_id}/reseed", post(reseed_sale))
        .route("/admin/sales/{goods_id}/pause", post(pause_sale))
        .route("/admin/sales/{goods_id}/resume", post(resume_sale))
        .route("/admin/sales/{goods_id}/stop", post(stop_sale))
        .route("/admin/sales/{goods_id}/add-stock", post(add_stock));
    let mut main = Router::new()
        .merge(for_role(&state, Role::Edge, edge))
        .merge(for_role(&state, Role::Shop, shop))
        .merge(for_role(&state, Role::Admin, admin))
        .route("/healthz", get(health));
    if with_metrics {
        main = main.merge(metrics_routes(&state));
    }
    main.with_state(state)
}

/// `/metrics` and the dashboard on a listener of their own (`serve --metrics-listen`), with
/// `/healthz`.
pub fn metrics_router(state: Arc<AppState>) -> Router {
    metrics_routes(&state)
        .route("/healthz", get(health))
        .with_state(state)
}

/// `/metrics` and the dashboard, behind the metrics credential when one is configured.
fn metrics_routes(state: &Arc<AppState>) -> Router<Arc<AppState>> {
    let routes = Router::new()
        .merge(crate::dashboard::routes())
        .route("/metrics", get(render_metrics));
    for_role(state, Role::Metrics, routes)
}

/// Errors a client may see. Logged once here; the body never carries internals.
#[derive(Debug)]
pub enum AppError {
    BadRequest(String),
    /// No credential, or not one of this role's.
    Unauthorized(Role),
    NotFound(String),
    Conflict(String),
    Unavailable(String),
    /// Shedding load (the MySQL fallback at its rate): 503, not logged per request.
    Overloaded(String),
    /// An operator's control MySQL recorded and Redis did not take yet: 503 with what to do
    /// (the admin API's callers are operators; the message names no internals beyond that).
    Incomplete(String),
}

impl AppError {
    /// The status and body a client sees (logged here for store faults).
    fn into_error_reply(self) -> (StatusCode, ErrorReply) {
        let (status, error, message) = match self {
            AppError::BadRequest(m) => (StatusCode::BAD_REQUEST, "bad_request", m),
            AppError::Unauthorized(role) => (
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                format!(
                    "missing or wrong {SECRET_HEADER} header: this call needs the {} credential",
                    role.name()
                ),
            ),
            AppError::NotFound(m) => (StatusCode::NOT_FOUND, "not_found", m),
            AppError::Conflict(m) => (StatusCode::CONFLICT, "conflict", m),
            AppError::Unavailable(detail) => {
                tracing::warn!(%detail, "request failed on a backing store");
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "unavailable",
                    "a backing store is unavailable; try again".to_owned(),
                )
            }
            AppError::Overloaded(m) => (StatusCode::SERVICE_UNAVAILABLE, "overloaded", m),
            AppError::Incomplete(m) => {
                tracing::warn!(detail = %m, "a sale control is incomplete");
                (StatusCode::SERVICE_UNAVAILABLE, "incomplete", m)
            }
        };
        let body = ErrorReply {
            error: error.to_owned(),
            message,
        };
        (status, body)
    }
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        let (status, body) = self.into_error_reply();
        if status == StatusCode::SERVICE_UNAVAILABLE {
            // Every 503 here is a moment's state (a store down, a switch, a rate): say when
            // to come back.
            return (status, [(axum::http::header::RETRY_AFTER, "1")], Json(body)).into_response();
        }
        (status, Json(body)).into_response()
    }
}

impl From<DeductError> for AppError {
    fn from(e: DeductError) -> Self {
        match e {
            DeductError::BadRequest(m) => AppError::BadRequest(m),
            DeductError::FallbackOverloaded | DeductError::Rebalancing => {
                AppError::Overloaded(e.to_string())
            }
            other => AppError::Unavailable(other.to_string()),
        }
    }
}

impl From<PreheatError> for AppError {
    fn from(e: PreheatError) -> Self {
        match e {
            PreheatError::Live { .. } | PreheatError::Superseded { .. } => {
                AppError::Conflict(e.to_string())
            }
            PreheatError::Mysql(e) => e.into(),
            other => AppError::Unavailable(other.to_string()),
        }
    }
}

impl From<ReseedError> for AppError {
    fn from(e: ReseedError) -> Self {
        match e {
            ReseedError::NoSale(_) => AppError::NotFound(e.to_string()),
            ReseedError::Live(_)
            | ReseedError::DbTier(_)
            | ReseedError::Disagrees { .. }
            | ReseedError::Outbox { .. }
            | ReseedError::TooManyOrders { .. }
            | ReseedError::Superseded { .. } => AppError::Conflict(e.to_string()),
            other => AppError::Unavailable(other.to_string()),
        }
    }
}

impl From<db::SaleRowError> for AppError {
    fn from(e: db::SaleRowError) -> Self {
        match e {
            db::SaleRowError::NoSale(_) => AppError::NotFound(e.to_string()),
            db::SaleRowError::History { .. } | db::SaleRowError::OpenWithHistory { .. } => {
                AppError::Conflict(e.to_string())
            }
            db::SaleRowError::Mysql(e) => e.into(),
        }
    }
}

impl From<LifecycleError> for AppError {
    fn from(e: LifecycleError) -> Self {
        match e {
            LifecycleError::BadOrderId(m) => AppError::BadRequest(m),
            LifecycleError::UnknownOrder(_) => AppError::NotFound(e.to_string()),
            LifecycleError::Switching(_) | LifecycleError::NotInMysqlYet(_) => {
                AppError::Unavailable(e.to_string())
            }
            other => AppError::Unavailable(other.to_string()),
        }
    }
}

impl From<crate::control::ControlError> for AppError {
    fn from(e: crate::control::ControlError) -> Self {
        use crate::control::ControlError as E;
        match e {
            E::BadRequest(m) => AppError::BadRequest(m),
            E::NoSale(_) => AppError::NotFound(e.to_string()),
            E::Ended(..) | E::Stopped(..) | E::Live { .. } | E::OperationConflict { .. } => {
                AppError::Conflict(e.to_string())
            }
            E::Incomplete { .. } => AppError::Incomplete(e.to_string()),
            E::SaleRow(e) => e.into(),
            E::Redis(e) => AppError::Unavailable(format!("redis: {e}")),
            E::Mysql(e) => e.into(),
        }
    }
}

impl From<sqlx::Error> for AppError {
    fn from(e: sqlx::Error) -> Self {
        AppError::Unavailable(format!("mysql: {e}"))
    }
}

async fn require_role(
    State((state, role)): State<(Arc<AppState>, Role)>,
    request: Request,
    next: Next,
) -> Response {
    let credentials = state.keyring.current();
    if role == Role::Metrics {
        // Optional: without a metrics credential the operator chose a listener of its own
        // (or an open one) for these pages.
        if credentials.count(Role::Metrics) == 0
            || metrics_credential(request.headers())
                .is_some_and(|given| credentials.allows(role, &given))
        {
            return next.run(request).await;
        }
        metrics::counter!("seckill_unauthorized_total", "role" => role.name()).increment(1);
        // A browser asks for the credential (any user name, the credential as password).
        return (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Basic realm=\"seckill metrics\"")],
            "a metrics credential is required (Authorization: Bearer, or Basic with it as password)",
        )
            .into_response();
    }
    // Read in place: a `HeaderMap` extractor would copy every header of every deduct.
    let given = request
        .headers()
        .get(SECRET_HEADER)
        .map(|v| v.as_bytes())
        .unwrap_or_default();
    if !credentials.allows(role, given) {
        metrics::counter!("seckill_unauthorized_total", "role" => role.name()).increment(1);
        return AppError::Unauthorized(role).into_response();
    }
    next.run(request).await
}

/// The credential a scraper or a browser sent: `Authorization: Bearer <it>` (Prometheus's
/// `authorization`), `Basic` with it as the password (Prometheus's `basic_auth`, a
/// browser's prompt), or `x-seckill-secret`.
fn metrics_credential(headers: &axum::http::HeaderMap) -> Option<Vec<u8>> {
    if let Some(value) = headers.get(header::AUTHORIZATION) {
        let value = value.to_str().ok()?;
        let (scheme, rest) = value.split_once(' ')?;
        if scheme.eq_ignore_ascii_case("bearer") {
            return Some(rest.trim().as_bytes().to_vec());
        }
        if scheme.eq_ignore_ascii_case("basic") {
            use base64::Engine as _;
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(rest.trim())
                .ok()?;
            let colon = decoded.iter().position(|&b| b == b':')?;
            return Some(decoded[colon + 1..].to_vec());
        }
        return None;
    }
    headers.get(SECRET_HEADER).map(|v| v.as_bytes().to_vec())
}

async fn deduct(
    State(state): State<Arc<AppState>>,
    body: Result<Json<DeductRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<DeductReply>, AppError> {
    let Json(request) = body.map_err(|e| AppError::BadRequest(e.body_text()))?;
    Ok(Json(decide(&state, request, Delivery::Direct, None).await?))
}

/// Several attempts in one call (the filter sends every buyer that arrived while its last
/// call was out). Each attempt is decided as if it came alone; one attempt's bad input or
/// store fault is its own answer and does not fail the others.
async fn deduct_batch(
    State(state): State<Arc<AppState>>,
    body: Result<Json<DeductBatchRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<DeductBatchReply>, AppError> {
    let Json(batch) = body.map_err(|e| AppError::BadRequest(e.body_text()))?;
    let count = batch.attempts.len();
    if count == 0 || count > seckill_api::BATCH_ATTEMPTS_MAX {
        return Err(AppError::BadRequest(format!(
            "a batch carries from 1 to {} attempts, not {count}",
            seckill_api::BATCH_ATTEMPTS_MAX
        )));
    }
    let timeout = match batch.timeout_ms {
        Some(ms) if ms == 0 || ms > seckill_api::DEDUCT_TIMEOUT_MS_MAX => {
            return Err(AppError::BadRequest(format!(
                "timeout_ms must be from 1 to {}, not {ms}",
                seckill_api::DEDUCT_TIMEOUT_MS_MAX
            )))
        }
        ms => ms.map(Duration::from_millis),
    };
    // Every attempt joins the deduct queue at once, so they share script calls. The gate
    // forwards its winners and claims them afterwards.
    let decisions = batch
        .attempts
        .into_iter()
        .map(|a| decide(&state, a, Delivery::Claimed, timeout));
    let replies = futures_util::future::join_all(decisions)
        .await
        .into_iter()
        .map(|result| match result {
            Ok(reply) => BatchItem::Decided(reply),
            Err(e) => BatchItem::Refused(AppError::from(e).into_error_reply().1),
        })
        .collect();
    Ok(Json(DeductBatchReply { replies }))
}

/// The gate claims the reservations it delivered to the shop; the rest are released when the
/// claim window ends. A claim for an order that has ended is counted `late` and changes
/// nothing; one the store could not take now is listed in `failed` for the gate to retry.
async fn claim(
    State(state): State<Arc<AppState>>,
    body: Result<Json<ClaimRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<ClaimReply>, AppError> {
    let Json(request) = body.map_err(|e| AppError::BadRequest(e.body_text()))?;
    let count = request.order_ids.len();
    if count == 0 || count > seckill_api::CLAIMS_PER_CALL_MAX {
        return Err(AppError::BadRequest(format!(
            "a claim carries from 1 to {} order ids, not {count}",
            seckill_api::CLAIMS_PER_CALL_MAX
        )));
    }
    let outcome = state.lifecycle.claim(&request.order_ids).await;
    metrics::counter!("seckill_claims_total", "result" => "claimed").increment(outcome.claimed);
    metrics::counter!("seckill_claims_total", "result" => "late").increment(outcome.late);
    metrics::counter!("seckill_claims_total", "result" => "failed")
        .increment(outcome.failed.len() as u64);
    Ok(Json(ClaimReply {
        claimed: outcome.claimed,
        late: outcome.late,
        failed: outcome.failed,
    }))
}

/// One attempt through the batcher, counted in the deduct metrics.
async fn decide(
    state: &AppState,
    request: DeductRequest,
    delivery: Delivery,
    timeout: Option<Duration>,
) -> Result<DeductReply, DeductError> {
    let started = Instant::now();
    // The goods' place in the dashboard's tally, or its id to ask for one afterwards.
    let tally = state
        .board
        .tally
        .get(&request.goods_id)
        .ok_or_else(|| request.goods_id.clone());
    let buyer = Buyer {
        goods_id: request.goods_id.clone(),
        user_id: request.user_id.clone(),
        quantity: request.quantity,
    };
    let result = state.deducter.deduct(request, delivery, timeout).await;
    let result = result.and_then(|reply| with_pass(&state.pass_key, buyer, reply, now_s()));
    match tally {
        Ok(counts) => counts.add(crate::dashboard::Answer::of(&result)),
        Err(goods_id) => state.board.tally.add_first(goods_id, &result),
    }
    metrics::histogram!("seckill_deduct_duration_seconds").record(started.elapsed());
    match &result {
        Ok(reply) => metrics::counter!("seckill_deduct_total", "outcome" => reply.outcome.as_str())
            .increment(1),
        Err(e) => {
            metrics::counter!("seckill_deduct_errors_total", "kind" => e.metric_kind()).increment(1)
        }
    }
    result
}

/// Who a deduct was for: what a winner's pass names besides its order.
struct Buyer {
    goods_id: String,
    user_id: String,
    quantity: u32,
}

/// A winner's answer with its signed pass, which the gate forwards to the shop; any other
/// answer as it is. Signed here, where the winners of every path meet (Redis, MySQL, a
/// retry's repeated answer), so the signing key never leaves the syncer.
fn with_pass(
    key: &seckill_pass::Key,
    buyer: Buyer,
    mut reply: DeductReply,
    now_s: u64,
) -> Result<DeductReply, DeductError> {
    if reply.outcome != seckill_api::Outcome::Won {
        return Ok(reply);
    }
    let (Some(order_id), Some(expires_at_ms)) = (reply.order_id.clone(), reply.expires_at_ms)
    else {
        // The deciders never answer so (deduct.rs and db_decide.rs refuse it): a winner the
        // shop could not verify is not answered at all.
        return Err(DeductError::BadScriptReply(
            "won without an order id or a deadline".into(),
        ));
    };
    let pass = seckill_pass::Pass {
        order_id,
        goods_id: buyer.goods_id,
        user_id: buyer.user_id,
        quantity: buyer.quantity,
        issued_at_s: now_s,
        // Rounded up: the pass never ends before its reservation.
        expires_at_s: expires_at_ms.div_ceil(1000),
    };
    reply.pass = Some(seckill_pass::sign(&pass, key));
    Ok(reply)
}

fn now_s() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Confirms payment. Repeated calls answer the same; an order already released cannot be
/// confirmed (409), nor one whose payment window has passed (it is released as expired).
async fn confirm_order(
    State(state): State<Arc<AppState>>,
    Path(order_id): Path<String>,
) -> Result<Json<Settlement>, AppError> {
    let settlement = state.lifecycle.confirm(&order_id).await?;
    count_settlement("confirm", &settlement);
    if settlement.state != OrderState::Confirmed {
        return Err(AppError::Conflict(format!(
            "order {order_id} was released ({}); it cannot be confirmed",
            settlement
                .reason
                .map_or("unknown reason", ReleaseReason::as_str)
        )));
    }
    Ok(Json(settlement))
}

/// Cancels a reservation and returns its units. Repeated calls answer the same; a confirmed
/// order cannot be cancelled here (409: that is a refund, the shop's business).
async fn cancel_order(
    State(state): State<Arc<AppState>>,
    Path(order_id): Path<String>,
) -> Result<Json<Settlement>, AppError> {
    release(&state, &order_id, ReleaseReason::Cancelled).await
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReleaseParams {
    reason: String,
}

/// Releases a reservation for a stated reason; the filter calls it with `upstream_failed`
/// when the shop API fails a winner.
async fn release_order(
    State(state): State<Arc<AppState>>,
    Path(order_id): Path<String>,
    params: Result<Query<ReleaseParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Settlement>, AppError> {
    let Query(params) = params.map_err(|e| AppError::BadRequest(e.body_text()))?;
    let reason = ReleaseReason::parse(&params.reason)
        .filter(|r| *r != ReleaseReason::Expired)
        .ok_or_else(|| {
            AppError::BadRequest("reason must be cancelled or upstream_failed".to_owned())
        })?;
    release(&state, &order_id, reason).await
}

async fn release(
    state: &AppState,
    order_id: &str,
    reason: ReleaseReason,
) -> Result<Json<Settlement>, AppError> {
    let settlement = state.lifecycle.release(order_id, reason).await?;
    count_settlement("release", &settlement);
    if settlement.state == OrderState::Confirmed {
        return Err(AppError::Conflict(format!(
            "order {order_id} is confirmed (paid); it cannot be released"
        )));
    }
    Ok(Json(settlement))
}

fn count_settlement(action: &'static str, settlement: &Settlement) {
    let result = if settlement.changed {
        "changed"
    } else {
        "repeated"
    };
    metrics::counter!("seckill_settlements_total", "action" => action, "result" => result)
        .increment(1);
}

fn valid_goods_id(goods_id: &str) -> Result<(), AppError> {
    seckill_api::validate_id(goods_id, seckill_api::ID_LEN_MAX)
        .map_err(|e| AppError::BadRequest(format!("goods_id {e}")))
}

/// Defines (or redefines) a sale in MySQL ([`crate::control::define`]): 201 created, 200
/// replaced; refused (changing nothing) when it has ended already, is live, or is open with
/// history in MySQL.
async fn define_sale(
    State(state): State<Arc<AppState>>,
    Path(goods_id): Path<String>,
    body: Result<Json<SaleSpec>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, AppError> {
    let Json(spec) = body.map_err(|e| AppError::BadRequest(e.body_text()))?;
    let now = chrono::Utc::now();
    let saved = crate::control::define(state.stores(), &goods_id, spec, now).await;
    state.forget_route(&goods_id);
    let (saved, sale) = saved?;
    let status = match saved {
        db::Saved::Created => StatusCode::CREATED,
        db::Saved::Replaced => StatusCode::OK,
    };
    Ok((status, Json(sale)).into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListParams {
    after: Option<String>,
    limit: Option<u32>,
}

/// Sales listed per page unless the caller asks for another size.
const LIST_PAGE_DEFAULT: u32 = 100;

/// Every sale with its state and counters, by goods id, a page at a time (`next` names the
/// goods id to list from for the next page).
async fn list_sales(
    State(state): State<Arc<AppState>>,
    params: Result<Query<ListParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<crate::control::SaleList>, AppError> {
    let Query(params) = params.map_err(|e| AppError::BadRequest(e.body_text()))?;
    let limit = params.limit.unwrap_or(LIST_PAGE_DEFAULT);
    let listed = crate::control::list(state.stores(), params.after.as_deref(), limit).await?;
    Ok(Json(listed))
}

/// Pauses a sale: buyers are told `paused` with Retry-After until it is resumed. The body is
/// optional (`{"retry_after_s": 30}`, see [`crate::admin::Pause`]).
async fn pause_sale(
    State(state): State<Arc<AppState>>,
    Path(goods_id): Path<String>,
    body: axum::body::Bytes,
) -> Result<Json<crate::control::Controlled>, AppError> {
    let pause = crate::admin::Pause::from_json(&body).map_err(AppError::BadRequest)?;
    Ok(Json(
        crate::control::pause(state.stores(), &goods_id, pause.retry_after_s()).await?,
    ))
}

async fn resume_sale(
    State(state): State<Arc<AppState>>,
    Path(goods_id): Path<String>,
) -> Result<Json<crate::control::Controlled>, AppError> {
    Ok(Json(
        crate::control::resume(state.stores(), &goods_id).await?,
    ))
}

/// Stops a sale: it ends now, by the end-of-sale rules.
async fn stop_sale(
    State(state): State<Arc<AppState>>,
    Path(goods_id): Path<String>,
) -> Result<Json<crate::control::Controlled>, AppError> {
    Ok(Json(crate::control::stop(state.stores(), &goods_id).await?))
}

/// Adds stock to a sale that has not ended: `{"quantity": N, "operation_id": "..."}`; the
/// same operation id again adds nothing more.
async fn add_stock(
    State(state): State<Arc<AppState>>,
    Path(goods_id): Path<String>,
    body: Result<Json<crate::control::AddStock>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<crate::control::Added>, AppError> {
    let Json(request) = body.map_err(|e| AppError::BadRequest(e.body_text()))?;
    Ok(Json(
        crate::control::add_stock(state.stores(), &goods_id, &request).await?,
    ))
}

async fn show_sale(
    State(state): State<Arc<AppState>>,
    Path(goods_id): Path<String>,
) -> Result<Json<serde_json::Value>, AppError> {
    Ok(Json(
        crate::control::status(state.stores(), &goods_id).await?,
    ))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PreheatParams {
    #[serde(default)]
    force: bool,
}

async fn preheat_sale(
    State(state): State<Arc<AppState>>,
    Path(goods_id): Path<String>,
    params: Result<Query<PreheatParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<serde_json::Value>, AppError> {
    let Query(params) = params.map_err(|e| AppError::BadRequest(e.body_text()))?;
    valid_goods_id(&goods_id)?;
    let preheated = preheat::preheat(
        &state.redis,
        &state.mysql,
        &state.keys,
        &goods_id,
        params.force,
    )
    .await;
    state.forget_route(&goods_id);
    let preheated = preheated?;
    let epoch = preheated.epoch;
    tracing::info!(goods_id, epoch, force = params.force, "sale preheated");
    let live = preheat::live_stock(&state.redis, &state.keys, &goods_id).await?;
    Ok(Json(serde_json::json!({ "epoch": epoch, "live": live })))
}

/// How long the admin API's re-seed waits for the writer (the CLI's --drain-timeout-s).
const RESEED_DRAIN_TIMEOUT: Duration = Duration::from_secs(60);

/// Loads a goods Redis forgot back from MySQL (see [`crate::reseed`]).
async fn reseed_sale(
    State(state): State<Arc<AppState>>,
    Path(goods_id): Path<String>,
) -> Result<Json<crate::reseed::Reseeded>, AppError> {
    valid_goods_id(&goods_id)?;
    let reseeded = crate::reseed::reseed(
        &state.redis,
        &state.mysql,
        &state.kafka,
        &state.keys,
        &goods_id,
        RESEED_DRAIN_TIMEOUT,
    )
    .await;
    state.forget_route(&goods_id);
    let reseeded = reseeded?;
    tracing::info!(
        goods_id,
        epoch = reseeded.epoch,
        "sale re-seeded from MySQL"
    );
    Ok(Json(reseeded))
}

async fn health(State(state): State<Arc<AppState>>) -> Result<&'static str, AppError> {
    let mut conn = state.redis.clone();
    let command = redis::cmd("PING");
    let ping = command.query_async::<String>(&mut conn);
    match tokio::time::timeout(crate::deduct::REDIS_CALL_TIMEOUT, ping).await {
        Ok(Ok(_)) => Ok("ok"),
        Ok(Err(e)) => Err(AppError::Unavailable(format!("redis: {e}"))),
        Err(_) => Err(AppError::Unavailable("redis ping timed out".into())),
    }
}

async fn render_metrics(State(state): State<Arc<AppState>>) -> Response {
    match &state.metrics {
        Some(handle) => handle.render().into_response(),
        None => (StatusCode::NOT_FOUND, "metrics are not enabled").into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::{metrics_credential, with_pass, Buyer};
    use axum::http::{HeaderMap, HeaderValue};
    use seckill_api::{DeductReply, Outcome};

    fn buyer() -> Buyer {
        Buyer {
            goods_id: "sku-1".into(),
            user_id: "u-7".into(),
            quantity: 3,
        }
    }

    #[test]
    fn a_winner_gets_a_pass_naming_its_order_and_buyer() {
        let key: seckill_pass::Key = "k1=0123456789abcdef0123456789abcdef".parse().unwrap();
        let won = DeductReply {
            order_id: Some("sku-1.2.9".into()),
            expires_at_ms: Some(1_700_000_900_001),
            ..DeductReply::new(Outcome::Won, Some(4))
        };
        let signed = with_pass(&key, buyer(), won.clone(), 1_700_000_000).unwrap();
        let token = signed.pass.clone().unwrap();
        assert_eq!(
            DeductReply {
                pass: None,
                ..signed
            },
            won
        );
        let keys = seckill_pass::Keys::new([key]).unwrap();
        let pass = seckill_pass::verify(&token, &keys, 1_700_000_000).unwrap();
        assert_eq!(
            pass,
            seckill_pass::Pass {
                order_id: "sku-1.2.9".into(),
                goods_id: "sku-1".into(),
                user_id: "u-7".into(),
                quantity: 3,
                issued_at_s: 1_700_000_000,
                // Rounded up: never before the reservation ends.
                expires_at_s: 1_700_000_901,
            }
        );
        // Every other answer is left as it is.
        let lost = DeductReply::new(Outcome::SoldOut, Some(0));
        let key: seckill_pass::Key = "k1=0123456789abcdef0123456789abcdef".parse().unwrap();
        assert_eq!(with_pass(&key, buyer(), lost.clone(), 0).unwrap(), lost);
        // A winner without its deadline is not answered: the shop could not verify it.
        let undated = DeductReply {
            order_id: Some("sku-1.2.9".into()),
            ..DeductReply::new(Outcome::Won, Some(4))
        };
        assert!(with_pass(&key, buyer(), undated, 0).is_err());
    }

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert(*name, HeaderValue::from_static(value));
        }
        map
    }

    #[test]
    fn a_metrics_credential_is_read_from_bearer_basic_or_the_secret_header() {
        let given = |pairs| metrics_credential(&headers(pairs));
        assert_eq!(
            given(&[("authorization", "Bearer tok-1")]),
            Some(b"tok-1".to_vec())
        );
        assert_eq!(
            given(&[("authorization", "bearer  tok-1 ")]),
            Some(b"tok-1".to_vec())
        );
        // "prometheus:tok:2" in base64: the password is everything after the first colon.
        assert_eq!(
            given(&[("authorization", "Basic cHJvbWV0aGV1czp0b2s6Mg==")]),
            Some(b"tok:2".to_vec())
        );
        assert_eq!(
            given(&[("x-seckill-secret", "tok-3")]),
            Some(b"tok-3".to_vec())
        );
        assert_eq!(given(&[("authorization", "Basic !!!")]), None);
        assert_eq!(given(&[("authorization", "Digest x")]), None);
        assert_eq!(given(&[("authorization", "Bearer")]), None);
        assert_eq!(given(&[]), None);
    }
}
