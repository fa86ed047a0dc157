//! Plugin configuration: the JSON in the Envoy wasm filter's `configuration` value, parsed
//! and validated once in `on_configure` and compiled into an immutable [`Config`] that every
//! request context shares.
//!
//! The document is read into typed structs (`Raw*` below) through `serde_path_to_error`, so a
//! wrong type, a missing field or an unknown one is refused with its exact path
//! (`rate_limit.default.per_second: invalid type: ...`); serde alone would only give a line
//! and column. Unknown fields are refused everywhere (`deny_unknown_fields`): a typo must not
//! silently fall back to a default. `null` counts as absent (every optional field is an
//! `Option`). What serde cannot express (ranges, header-safe text, a path source naming a
//! variable of the route, bounds that depend on another field) is checked after, in field
//! order, each error naming its field the same way.
//!
//! Pure code: no host calls, unit-tested natively.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::time::Duration;

use serde::de::{self, Deserializer, IgnoredAny, MapAccess, Visitor};
use serde::Deserialize;
use serde_json::Value;

use crate::gcra::Rate;
use crate::route::PathTemplate;

/// Longest accepted `deduct.timeout_ms`: a buyer waits no longer than this for a decision.
pub const TIMEOUT_MS_MAX: u64 = 10_000;
const TIMEOUT_MS_DEFAULT: u64 = 500;
const ID_LEN_MAX_DEFAULT: u64 = 64;
const AUTHORITY_DEFAULT: &str = "seckill-syncer";
const REQUEST_ID_HEADER_DEFAULT: &str = "x-request-id";
/// Longest sold-out cache life: one hour. Past that a restocked goods would stay "sold out"
/// too long.
pub const SOLD_OUT_CACHE_MS_MAX: u64 = 3_600_000;
const SOLD_OUT_CACHE_MS_DEFAULT: u64 = 1_000;
/// How long a worker answers `unknown_goods` itself after the stock service said so. Short:
/// a sale preheated a moment later opens to this worker's buyers within it.
const UNKNOWN_GOODS_CACHE_MS_DEFAULT: u64 = 1_000;
/// The bucket of goods the stock service has not confirmed yet (default 100/s, burst 100):
/// it bounds the callouts that goods ids nobody sells can cause, and is wide enough for the
/// first requests of a real goods, whose first answer gives it a bucket of its own.
const UNCONFIRMED_PER_SECOND_DEFAULT: f64 = 100.0;
const UNCONFIRMED_BURST_DEFAULT: u64 = 100;
const TRACKED_GOODS_MAX_DEFAULT: u64 = 10_000;
/// Most goods ids with their own rate-limit bucket. Each costs one shared-data entry of
/// about 40 bytes per Envoy instance; a million is 40 MB, more is a mistake.
pub const TRACKED_GOODS_MAX_LIMIT: u64 = 1_000_000;
/// Longest secret, cluster or authority: they travel in headers of every call.
const TEXT_LEN_MAX: usize = 1024;
/// Longest header name or query parameter name of a source.
const SOURCE_NAME_LEN_MAX: usize = 256;

/// A configuration error: the field it concerns (dotted path, empty for the whole document)
/// and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub field: String,
    pub problem: String,
}

impl ConfigError {
    fn new(field: &str, problem: impl Into<String>) -> ConfigError {
        ConfigError {
            field: field.to_string(),
            problem: problem.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() {
            write!(f, "{}", self.problem)
        } else {
            write!(f, "{}: {}", self.field, self.problem)
        }
    }
}

impl std::error::Error for ConfigError {}

/// A type error, a missing or an unknown field, at the path where serde met it.
impl From<serde_path_to_error::Error<serde_json::Error>> for ConfigError {
    fn from(error: serde_path_to_error::Error<serde_json::Error>) -> ConfigError {
        // The document itself has the empty path (the crate would print it as ".").
        let field = match error.path().iter().next() {
            None => String::new(),
            Some(_) => error.path().to_string(),
        };
        ConfigError {
            field,
            problem: error.into_inner().to_string(),
        }
    }
}

/// Where a value comes from in the buyer's request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A request header (name stored lowercase, as Envoy presents them).
    Header(String),
    /// A query-string parameter (compared after percent-decoding).
    Query(String),
    /// A `{variable}` of the route's path template; `index` is its capture position.
    Path { name: String, index: usize },
}

impl fmt::Display for Source {
    /// How error messages name the source to the buyer.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Header(name) => write!(f, "header {name}"),
            Source::Query(name) => write!(f, "query parameter {name}"),
            Source::Path { name, .. } => write!(f, "path segment {{{name}}}"),
        }
    }
}

/// Which requests are sale requests.
#[derive(Debug, Clone)]
pub struct Route {
    pub methods: Vec<String>,
    pub template: PathTemplate,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuantityRule {
    /// None: the quantity is always `default`.
    pub source: Option<Source>,
    pub default: u32,
    pub max: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FailureMode {
    /// No answer from the stock service: refuse the purchase (503).
    Closed,
    /// No answer from the stock service: forward without an order id, marked failed-open.
    Open,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deduct {
    pub cluster: String,
    pub authority: String,
    pub timeout: Duration,
    pub secret: String,
    pub failure_mode: FailureMode,
}

#[derive(Debug, Clone)]
pub struct RateLimits {
    /// The rate of every goods with a bucket of its own but no override.
    pub default: Rate,
    /// Per-goods overrides. These goods always get their own bucket; they do not count
    /// against `tracked_goods_max` (the operator chose them, clients did not).
    pub goods: HashMap<String, Rate>,
    /// The one bucket shared by every goods the stock service has not yet confirmed to exist
    /// (and by confirmed goods past `tracked_goods_max`): a client inventing goods ids gets
    /// at most this many callouts, and never a bucket of its own.
    pub unconfirmed: Rate,
    /// Most confirmed goods with a bucket of their own (configured goods not counted).
    pub tracked_goods_max: u64,
}

/// What the gate does with its decision on a sale request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Carries it out: losers are answered by the gate, winners forwarded with their order.
    Enforce,
    /// A dry run in front of a live shop: decides and counts exactly as `Enforce`, then
    /// forwards the request as the buyer sent it (gate headers stripped), marked with what
    /// the gate would have answered (`x-seckill-shadow`) and without a winner's headers.
    Shadow,
}

impl Mode {
    fn from_flag(shadow: bool) -> Mode {
        if shadow {
            Mode::Shadow
        } else {
            Mode::Enforce
        }
    }
}

/// Which goods run in shadow mode: the top-level `shadow`, overridden per goods.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Modes {
    /// Every goods not listed below, and every request whose goods id could not be read.
    pub default: Mode,
    /// Per-goods overrides (`goods.<id>.shadow`).
    pub goods: HashMap<String, Mode>,
}

impl Modes {
    /// The mode of a request for this goods; `None`: the gate could not read a valid goods
    /// id (a path that only resembles the sale route, a missing or malformed id).
    pub fn of(&self, goods_id: Option<&str>) -> Mode {
        // No hashing at all for the common filter without overrides.
        if self.goods.is_empty() {
            return self.default;
        }
        goods_id
            .and_then(|id| self.goods.get(id).copied())
            .unwrap_or(self.default)
    }
}

/// The compiled, validated configuration. Immutable; shared by every request as `Rc<Config>`.
#[derive(Debug, Clone)]
pub struct Config {
    pub route: Route,
    pub goods_id: Source,
    pub user_id: Source,
    pub quantity: QuantityRule,
    pub request_id: Source,
    pub id_len_max: usize,
    pub deduct: Deduct,
    pub rate_limit: RateLimits,
    /// How long a sold-out answer is served locally; zero disables the cache.
    pub sold_out_cache: Duration,
    /// How long a worker answers `unknown_goods` itself; zero disables it.
    pub unknown_goods_cache: Duration,
    /// When the shop API answers a winner with a 5xx (or cannot be reached), give the
    /// reservation back through the syncer before passing the answer on.
    pub release_on_upstream_failure: bool,
    /// Shadow mode (a dry run) or enforcement, per goods.
    pub modes: Modes,
}

// --- the document as written: types checked by serde, values checked by `compile` ---

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    route: RawRoute,
    goods_id: RawSource,
    user_id: RawSource,
    quantity: Option<RawQuantity>,
    request_id: Option<RawSource>,
    id_len_max: Option<u64>,
    deduct: RawDeduct,
    rate_limit: RawRateLimit,
    sold_out_cache_ms: Option<u64>,
    unknown_goods_cache_ms: Option<u64>,
    release_on_upstream_failure: Option<bool>,
    shadow: Option<bool>,
    goods: Option<BTreeMap<String, RawGoods>>,
}

/// Settings of one goods (`goods.<id>`).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGoods {
    shadow: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    methods: Option<Vec<String>>,
    path_template: String,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawQuantity {
    source: Option<RawSource>,
    default: Option<u64>,
    max: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDeduct {
    cluster: String,
    authority: Option<String>,
    timeout_ms: Option<u64>,
    /// Refused with a message saying where the credential goes instead (the name is kept so
    /// that an old configuration gets that message, not "unknown field").
    secret: Option<serde::de::IgnoredAny>,
    secret_env: Option<String>,
    failure_mode: Option<FailureMode>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRateLimit {
    default: RawRate,
    goods: Option<BTreeMap<String, RawRate>>,
    unconfirmed: Option<RawRate>,
    tracked_goods_max: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRate {
    per_second: f64,
    burst: u64,
}

/// A source as written. Not a derived enum: serde's own messages for a map with no key or
/// two keys, or for a bare string, would not say what a source looks like.
enum RawSource {
    Header(String),
    Query(String),
    Path(String),
}

const SOURCE_SHAPE: &str =
    "exactly one of {\"header\": NAME}, {\"query\": NAME}, {\"path\": VARIABLE}";

impl<'de> Deserialize<'de> for RawSource {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<RawSource, D::Error> {
        deserializer.deserialize_map(SourceVisitor)
    }
}

struct SourceVisitor;

impl<'de> Visitor<'de> for SourceVisitor {
    type Value = RawSource;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(SOURCE_SHAPE)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawSource, A::Error> {
        let shape = || de::Error::custom(format_args!("must be {SOURCE_SHAPE}"));
        // Checked before any value is read, so `{"header": 5, "query": "u"}` is refused for
        // its shape rather than for the type of its first value.
        if map.size_hint().is_some_and(|len| len != 1) {
            return Err(shape());
        }
        let Some(kind) = map.next_key::<String>()? else {
            return Err(shape());
        };
        let source = match kind.as_str() {
            "header" => RawSource::Header(map.next_value()?),
            "query" => RawSource::Query(map.next_value()?),
            "path" => RawSource::Path(map.next_value()?),
            other => {
                return Err(de::Error::custom(format_args!(
                    "unknown source `{other}`: must be {SOURCE_SHAPE}"
                )))
            }
        };
        if map.next_key::<IgnoredAny>()?.is_some() {
            return Err(shape());
        }
        Ok(source)
    }
}

impl Config {
    /// Parses and validates the plugin configuration. `None` or empty: Envoy gave none.
    /// Variables it names (`deduct.secret_env`) are read from the wasm VM's environment.
    pub fn from_json(bytes: Option<&[u8]>) -> Result<Config, ConfigError> {
        Config::from_json_with_env(bytes, &vm_env)
    }

    /// As [`Config::from_json`], with `env` standing for the VM's environment: for tools and
    /// tests that check a configuration outside Envoy.
    pub fn from_json_with_env(
        bytes: Option<&[u8]>,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let bytes = match bytes {
            Some(bytes) if !bytes.iter().all(u8::is_ascii_whitespace) => bytes,
            _ => {
                return Err(ConfigError::new(
                    "",
                    "no configuration given (the filter needs a JSON object in the wasm filter's `configuration`)",
                ))
            }
        };
        // Syntax first, whose errors need a line and column; the typed pass then reads the
        // parsed value, whose errors need a path instead (and carry no position noise).
        let document: Value = serde_json::from_slice(bytes)
            .map_err(|e| ConfigError::new("", format!("not valid JSON: {e}")))?;
        if !document.is_object() {
            return Err(ConfigError::new(
                "",
                "the configuration must be a JSON object",
            ));
        }
        let raw: RawConfig = serde_path_to_error::deserialize(document)?;
        Config::compile(raw, env)
    }

    fn compile(
        raw: RawConfig,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let route = compile_route(raw.route)?;
        let goods_id = compile_source("goods_id", raw.goods_id, &route.template)?;
        let user_id = compile_source("user_id", raw.user_id, &route.template)?;
        let request_id = match raw.request_id {
            None => Source::Header(REQUEST_ID_HEADER_DEFAULT.to_string()),
            Some(source) => compile_source("request_id", source, &route.template)?,
        };
        let quantity = compile_quantity(raw.quantity.unwrap_or_default(), &route.template)?;

        let id_len_max = raw.id_len_max.unwrap_or(ID_LEN_MAX_DEFAULT);
        let id_len_max = usize::try_from(id_len_max)
            .ok()
            .filter(|len| (1..=seckill_api::ID_LEN_MAX).contains(len))
            .ok_or_else(|| {
                ConfigError::new(
                    "id_len_max",
                    format!(
                        "must be from 1 to {} (got {id_len_max})",
                        seckill_api::ID_LEN_MAX
                    ),
                )
            })?;

        let deduct = compile_deduct(raw.deduct, env)?;
        let rate_limit = compile_rate_limit(raw.rate_limit, id_len_max)?;
        let sold_out_cache = cache_life(
            "sold_out_cache_ms",
            raw.sold_out_cache_ms,
            SOLD_OUT_CACHE_MS_DEFAULT,
        )?;
        let unknown_goods_cache = cache_life(
            "unknown_goods_cache_ms",
            raw.unknown_goods_cache_ms,
            UNKNOWN_GOODS_CACHE_MS_DEFAULT,
        )?;

        let modes = compile_modes(raw.shadow, raw.goods, id_len_max)?;

        Ok(Config {
            route,
            goods_id,
            user_id,
            quantity,
            request_id,
            id_len_max,
            deduct,
            rate_limit,
            sold_out_cache,
            unknown_goods_cache,
            release_on_upstream_failure: raw.release_on_upstream_failure.unwrap_or(true),
            modes,
        })
    }
}

/// A cache's life in ms: 0 disables it, at most an hour.
fn cache_life(field: &str, ms: Option<u64>, default_ms: u64) -> Result<Duration, ConfigError> {
    let ms = ms.unwrap_or(default_ms);
    if ms > SOLD_OUT_CACHE_MS_MAX {
        return Err(ConfigError::new(
            field,
            format!(
                "must be at most {SOLD_OUT_CACHE_MS_MAX} (one hour; 0 disables the cache), got {ms}"
            ),
        ));
    }
    Ok(Duration::from_millis(ms))
}

fn compile_route(raw: RawRoute) -> Result<Route, ConfigError> {
    let methods = raw.methods.unwrap_or_else(|| vec!["POST".to_string()]);
    if methods.is_empty() {
        return Err(ConfigError::new(
            "route.methods",
            "must list at least one method",
        ));
    }
    for method in &methods {
        // Envoy compares :method case-sensitively, so "post" would never match a POST.
        let valid = !method.is_empty()
            && method.len() <= 32
            && method
                .bytes()
                .all(|b| b.is_ascii_uppercase() || b == b'-' || b == b'_');
        if !valid {
            return Err(ConfigError::new(
                "route.methods",
                format!("{method:?} is not an upper-case HTTP method such as \"POST\""),
            ));
        }
    }
    let template = PathTemplate::parse(&raw.path_template)
        .map_err(|e| ConfigError::new("route.path_template", e))?;
    Ok(Route { methods, template })
}

fn compile_source(
    field: &str,
    raw: RawSource,
    template: &PathTemplate,
) -> Result<Source, ConfigError> {
    let (kind, name) = match raw {
        RawSource::Header(name) => ("header", name),
        RawSource::Query(name) => ("query", name),
        RawSource::Path(name) => ("path", name),
    };
    let path = format!("{field}.{kind}");
    if name.is_empty() || name.len() > SOURCE_NAME_LEN_MAX {
        return Err(ConfigError::new(
            &path,
            format!("must be a name of 1 to {SOURCE_NAME_LEN_MAX} bytes"),
        ));
    }
    match kind {
        "header" => {
            let name = name.to_ascii_lowercase();
            if !name.bytes().all(is_token_byte) {
                return Err(ConfigError::new(
                    &path,
                    format!("{name:?} is not a valid HTTP header name"),
                ));
            }
            if name.starts_with(seckill_api::GATE_HEADER_PREFIX) {
                return Err(ConfigError::new(
                    &path,
                    format!(
                        "{name:?} starts with {:?}: the gate strips those headers from every request, so it would always be missing",
                        seckill_api::GATE_HEADER_PREFIX
                    ),
                ));
            }
            Ok(Source::Header(name))
        }
        "query" => Ok(Source::Query(name)),
        _ => match template.variable_index(&name) {
            Some(index) => Ok(Source::Path { name, index }),
            None => Err(ConfigError::new(
                &path,
                format!("route.path_template has no {{{name}}} variable"),
            )),
        },
    }
}

/// RFC 9110 token characters, the only ones allowed in a header name.
fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn compile_quantity(
    raw: RawQuantity,
    template: &PathTemplate,
) -> Result<QuantityRule, ConfigError> {
    let source = match raw.source {
        None => None,
        Some(source) => Some(compile_source("quantity.source", source, template)?),
    };
    let max = raw.max.unwrap_or(1);
    let max_limit = seckill_api::QUANTITY_MAX;
    let max = u32::try_from(max)
        .ok()
        .filter(|max| (1..=max_limit).contains(max))
        .ok_or_else(|| {
            ConfigError::new(
                "quantity.max",
                format!("must be from 1 to {max_limit} (got {max})"),
            )
        })?;
    let default = raw.default.unwrap_or(1);
    let default = u32::try_from(default)
        .ok()
        .filter(|default| (1..=max).contains(default))
        .ok_or_else(|| {
            ConfigError::new(
                "quantity.default",
                format!("must be from 1 to quantity.max ({max}), got {default}"),
            )
        })?;
    Ok(QuantityRule {
        source,
        default,
        max,
    })
}

/// Text that travels in a header: printable ASCII, no spaces, bounded.
fn header_safe(field: &str, text: &str) -> Result<(), ConfigError> {
    if text.is_empty() {
        return Err(ConfigError::new(field, "must not be empty"));
    }
    if text.len() > TEXT_LEN_MAX {
        return Err(ConfigError::new(
            field,
            format!("must be at most {TEXT_LEN_MAX} bytes"),
        ));
    }
    if !text.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(ConfigError::new(
            field,
            "may only contain printable ASCII characters without spaces",
        ));
    }
    Ok(())
}

/// In the filter's own unit tests, the variable the test configurations name holds this.
#[cfg(test)]
pub(crate) const TEST_SECRET_ENV: &str = "SECKILL_TEST_EDGE_SECRET";
#[cfg(test)]
pub(crate) const TEST_SECRET: &str = "s3cret";

/// The wasm VM's environment: what Envoy's `vm_config.environment_variables` put there
/// (`host_env_keys` copies variables of Envoy's own environment).
fn vm_env(name: &str) -> Option<String> {
    #[cfg(test)]
    if name == TEST_SECRET_ENV {
        return Some(TEST_SECRET.to_owned());
    }
    std::env::var(name).ok()
}

/// Longest environment variable name accepted for `deduct.secret_env`.
const ENV_NAME_LEN_MAX: usize = 128;

fn compile_deduct(
    raw: RawDeduct,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Deduct, ConfigError> {
    header_safe("deduct.cluster", &raw.cluster)?;
    let authority = raw
        .authority
        .unwrap_or_else(|| AUTHORITY_DEFAULT.to_string());
    header_safe("deduct.authority", &authority)?;
    let timeout_ms = raw.timeout_ms.unwrap_or(TIMEOUT_MS_DEFAULT);
    if !(1..=TIMEOUT_MS_MAX).contains(&timeout_ms) {
        return Err(ConfigError::new(
            "deduct.timeout_ms",
            format!("must be from 1 to {TIMEOUT_MS_MAX} (got {timeout_ms})"),
        ));
    }
    let secret = compile_secret(raw.secret.is_some(), raw.secret_env, env)?;
    Ok(Deduct {
        cluster: raw.cluster,
        authority,
        timeout: Duration::from_millis(timeout_ms),
        secret,
        failure_mode: raw.failure_mode.unwrap_or(FailureMode::Closed),
    })
}

/// The syncer's edge credential, read from the VM's environment: never from the plugin
/// configuration, which Envoy's admin `/config_dump` prints to anyone who can read it.
fn compile_secret(
    inline: bool,
    name: Option<String>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<String, ConfigError> {
    if inline {
        return Err(ConfigError::new(
            "deduct.secret",
            "an inline credential shows in Envoy's admin /config_dump; put it in an environment \
             variable of Envoy's, list that variable in vm_config.environment_variables.\
             host_env_keys, and name it in deduct.secret_env",
        ));
    }
    let Some(name) = name else {
        return Err(ConfigError::new(
            "deduct",
            "missing field `secret_env` (the environment variable that holds the syncer's edge \
             credential, listed in vm_config.environment_variables.host_env_keys)",
        ));
    };
    let well_formed = !name.is_empty()
        && name.len() <= ENV_NAME_LEN_MAX
        && !name.starts_with(|c: char| c.is_ascii_digit())
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    if !well_formed {
        return Err(ConfigError::new(
            "deduct.secret_env",
            format!(
                "must be an environment variable name (letters, digits and _, not starting with \
                 a digit, at most {ENV_NAME_LEN_MAX} bytes)"
            ),
        ));
    }
    let Some(value) = env(&name) else {
        return Err(ConfigError::new(
            "deduct.secret_env",
            format!(
                "{name} is not set in the wasm VM: set it in Envoy's environment and list it in \
                 vm_config.environment_variables.host_env_keys"
            ),
        ));
    };
    // The message names the variable, never its value.
    header_safe(&format!("deduct.secret_env ({name})"), &value)?;
    Ok(value)
}

/// A goods id the operator wrote as a key (`rate_limit.goods`, `goods`): an id no request
/// can carry would be a setting that never applies.
fn configured_goods_id(field: &str, goods_id: &str, id_len_max: usize) -> Result<(), ConfigError> {
    seckill_api::validate_id(goods_id, id_len_max).map_err(|e| {
        ConfigError::new(
            field,
            format!("the goods id {e} (no request could carry it)"),
        )
    })
}

fn compile_modes(
    shadow: Option<bool>,
    raw_goods: Option<BTreeMap<String, RawGoods>>,
    id_len_max: usize,
) -> Result<Modes, ConfigError> {
    let default = Mode::from_flag(shadow.unwrap_or(false));
    let mut goods = HashMap::new();
    for (goods_id, settings) in raw_goods.unwrap_or_default() {
        configured_goods_id(&format!("goods.{goods_id}"), &goods_id, id_len_max)?;
        if let Some(shadow) = settings.shadow {
            goods.insert(goods_id, Mode::from_flag(shadow));
        }
    }
    Ok(Modes { default, goods })
}

fn compile_rate(field: &str, raw: &RawRate) -> Result<Rate, ConfigError> {
    // Rate::new names which of the two is wrong in its message.
    Rate::new(raw.per_second, raw.burst).map_err(|e| ConfigError::new(field, e))
}

fn compile_rate_limit(raw: RawRateLimit, id_len_max: usize) -> Result<RateLimits, ConfigError> {
    let default = compile_rate("rate_limit.default", &raw.default)?;
    let raw_goods = raw.goods.unwrap_or_default();
    let mut goods = HashMap::with_capacity(raw_goods.len());
    for (goods_id, rate) in raw_goods {
        let field = format!("rate_limit.goods.{goods_id}");
        configured_goods_id(&field, &goods_id, id_len_max)?;
        let rate = compile_rate(&field, &rate)?;
        goods.insert(goods_id, rate);
    }
    let unconfirmed_default = RawRate {
        per_second: UNCONFIRMED_PER_SECOND_DEFAULT,
        burst: UNCONFIRMED_BURST_DEFAULT,
    };
    let unconfirmed = compile_rate(
        "rate_limit.unconfirmed",
        raw.unconfirmed.as_ref().unwrap_or(&unconfirmed_default),
    )?;
    let tracked_goods_max = raw.tracked_goods_max.unwrap_or(TRACKED_GOODS_MAX_DEFAULT);
    if !(1..=TRACKED_GOODS_MAX_LIMIT).contains(&tracked_goods_max) {
        return Err(ConfigError::new(
            "rate_limit.tracked_goods_max",
            format!("must be from 1 to {TRACKED_GOODS_MAX_LIMIT} (got {tracked_goods_max})"),
        ));
    }
    Ok(RateLimits {
        default,
        goods,
        unconfirmed,
        tracked_goods_max,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The configuration of the README example.
    fn example() -> Value {
        json!({
            "route": {"methods": ["POST"], "path_template": "/seckill/{goods_id}/buy"},
            "goods_id": {"path": "goods_id"},
            "user_id": {"header": "x-user-id"},
            "quantity": {"source": {"query": "qty"}, "default": 1, "max": 5},
            "request_id": {"header": "x-request-id"},
            "id_len_max": 64,
            "deduct": {"cluster": "seckill_syncer", "authority": "seckill-syncer",
                       "timeout_ms": 300, "secret_env": "SECKILL_TEST_EDGE_SECRET", "failure_mode": "closed"},
            "rate_limit": {"default": {"per_second": 1000, "burst": 200},
                           "goods": {"sku-1": {"per_second": 50, "burst": 10}},
                           "tracked_goods_max": 10000},
            "sold_out_cache_ms": 2000
        })
    }

    fn minimal() -> Value {
        json!({
            "route": {"path_template": "/seckill/{goods_id}/buy"},
            "goods_id": {"path": "goods_id"},
            "user_id": {"header": "x-user-id"},
            "deduct": {"cluster": "seckill_syncer", "secret_env": "SECKILL_TEST_EDGE_SECRET"},
            "rate_limit": {"default": {"per_second": 0.5, "burst": 1}}
        })
    }

    fn parse(value: &Value) -> Result<Config, ConfigError> {
        Config::from_json(Some(value.to_string().as_bytes()))
    }

    /// Applies `edit` to the example and returns the error it must cause.
    fn error_of(edit: impl FnOnce(&mut Value)) -> ConfigError {
        let mut value = example();
        edit(&mut value);
        match parse(&value) {
            Ok(_) => panic!("configuration should be refused: {value}"),
            Err(e) => e,
        }
    }

    fn assert_error(edit: impl FnOnce(&mut Value), field: &str, fragment: &str) {
        let e = error_of(edit);
        assert_eq!(e.field, field, "{e}");
        assert!(
            e.problem.contains(fragment),
            "{e:?} should mention {fragment:?}"
        );
    }

    #[test]
    fn example_compiles() {
        let c = parse(&example()).unwrap();
        assert_eq!(c.route.methods, ["POST"]);
        assert_eq!(c.route.template.matches("/seckill/a/buy"), Some(vec!["a"]));
        assert_eq!(
            c.goods_id,
            Source::Path {
                name: "goods_id".into(),
                index: 0
            }
        );
        assert_eq!(c.user_id, Source::Header("x-user-id".into()));
        assert_eq!(
            c.quantity,
            QuantityRule {
                source: Some(Source::Query("qty".into())),
                default: 1,
                max: 5
            }
        );
        assert_eq!(c.request_id, Source::Header("x-request-id".into()));
        assert_eq!(c.id_len_max, 64);
        assert_eq!(
            c.deduct,
            Deduct {
                cluster: "seckill_syncer".into(),
                authority: "seckill-syncer".into(),
                timeout: Duration::from_millis(300),
                secret: "s3cret".into(),
                failure_mode: FailureMode::Closed,
            }
        );
        assert_eq!(c.rate_limit.default, Rate::new(1000.0, 200).unwrap());
        assert_eq!(c.rate_limit.goods["sku-1"], Rate::new(50.0, 10).unwrap());
        assert_eq!(c.rate_limit.tracked_goods_max, 10_000);
        assert_eq!(c.sold_out_cache, Duration::from_millis(2000));
    }

    #[test]
    fn large_and_slow_rates_compile() {
        let mut v = minimal();
        v["rate_limit"] = json!({
            "default": {"per_second": 100_000_000.0, "burst": 100_000_000u64},
            "goods": {"slow": {"per_second": 0.001, "burst": 1}}
        });
        let c = parse(&v).unwrap();
        assert_eq!(c.rate_limit.goods["slow"].interval_ns(), 1_000_000_000_000);
        assert_error(
            |v| {
                v["rate_limit"]["default"] = json!({"per_second": 0.001, "burst": 1_000_000_000u64})
            },
            "rate_limit.default",
            "burst / per_second must be at most",
        );
    }

    #[test]
    fn defaults_apply() {
        let c = parse(&minimal()).unwrap();
        assert_eq!(c.route.methods, ["POST"]);
        assert_eq!(
            c.quantity,
            QuantityRule {
                source: None,
                default: 1,
                max: 1
            }
        );
        assert_eq!(c.request_id, Source::Header("x-request-id".into()));
        assert_eq!(c.id_len_max, 64);
        assert_eq!(c.deduct.authority, "seckill-syncer");
        assert_eq!(c.deduct.timeout, Duration::from_millis(500));
        assert_eq!(c.deduct.failure_mode, FailureMode::Closed);
        assert!(c.rate_limit.goods.is_empty());
        assert_eq!(c.rate_limit.tracked_goods_max, 10_000);
        assert_eq!(c.sold_out_cache, Duration::from_millis(1000));
        // Header names are stored lower-case, as Envoy presents them.
        let mut upper = minimal();
        upper["user_id"] = json!({"header": "X-User-Id"});
        assert_eq!(
            parse(&upper).unwrap().user_id,
            Source::Header("x-user-id".into())
        );
        // Zero disables the sold-out cache; failure mode open is accepted.
        let mut open = minimal();
        open["sold_out_cache_ms"] = json!(0);
        open["deduct"]["failure_mode"] = json!("open");
        let c = parse(&open).unwrap();
        assert_eq!(c.sold_out_cache, Duration::ZERO);
        assert_eq!(c.deduct.failure_mode, FailureMode::Open);
    }

    #[test]
    fn document_level_errors() {
        let e = Config::from_json(None).unwrap_err();
        assert!(e.problem.contains("no configuration"), "{e}");
        let e = Config::from_json(Some(b"  \n")).unwrap_err();
        assert!(e.problem.contains("no configuration"), "{e}");
        let e = Config::from_json(Some(b"{\"route\": ")).unwrap_err();
        assert!(e.problem.starts_with("not valid JSON"), "{e}");
        let e = Config::from_json(Some(b"[1]")).unwrap_err();
        assert!(e.problem.contains("JSON object"), "{e}");
        let e = error_of(|v| v["colour"] = json!("red"));
        assert!(e.problem.contains("unknown field `colour`"), "{e}");
        let e = error_of(|v| {
            v.as_object_mut().unwrap().remove("deduct");
        });
        assert!(e.problem.contains("missing field `deduct`"), "{e}");
        // The message the filter logs names the field.
        let e = error_of(|v| v["deduct"]["timeout_ms"] = json!("fast"));
        assert_eq!(
            e.to_string(),
            "deduct.timeout_ms: invalid type: string \"fast\", expected u64"
        );
    }

    /// An unknown field is named by its own path, the section it is in first.
    #[test]
    fn unknown_fields_are_refused_in_every_section() {
        assert_error(
            |v| v["route"]["paths"] = json!([]),
            "route.paths",
            "unknown field `paths`",
        );
        assert_error(
            |v| v["quantity"]["min"] = json!(1),
            "quantity.min",
            "unknown field `min`",
        );
        assert_error(
            |v| v["deduct"]["cluser"] = json!("x"),
            "deduct.cluser",
            "unknown field `cluser`",
        );
        assert_error(
            |v| v["rate_limit"]["per_second"] = json!(1),
            "rate_limit.per_second",
            "unknown field `per_second`",
        );
        assert_error(
            |v| v["rate_limit"]["default"]["rate"] = json!(1),
            "rate_limit.default.rate",
            "unknown field `rate`",
        );
        assert_error(
            |v| v["rate_limit"]["goods"]["sku-1"]["x"] = json!(1),
            "rate_limit.goods.sku-1.x",
            "unknown field `x`",
        );
    }

    #[test]
    fn route_errors() {
        assert_error(
            |v| v["route"]["methods"] = json!([]),
            "route.methods",
            "at least one",
        );
        assert_error(
            |v| v["route"]["methods"] = json!(["post"]),
            "route.methods",
            "upper-case",
        );
        assert_error(
            |v| v["route"]["methods"] = json!("POST"),
            "route.methods",
            "expected a sequence",
        );
        assert_error(
            |v| v["route"]["path_template"] = json!("seckill/{goods_id}"),
            "route.path_template",
            "must start with '/'",
        );
        assert_error(
            |v| {
                v["route"].as_object_mut().unwrap().remove("path_template");
            },
            "route",
            "missing field `path_template`",
        );
    }

    #[test]
    fn source_errors() {
        assert_error(
            |v| v["goods_id"] = json!({"path": "sku"}),
            "goods_id.path",
            "no {sku} variable",
        );
        assert_error(
            |v| v["user_id"] = json!({"header": "x-user-id", "query": "u"}),
            "user_id",
            "exactly one of",
        );
        assert_error(|v| v["user_id"] = json!({}), "user_id", "exactly one of");
        assert_error(
            |v| v["user_id"] = json!("x-user-id"),
            "user_id",
            "exactly one of",
        );
        assert_error(
            |v| v["user_id"] = json!({"cookie": "u"}),
            "user_id",
            "unknown source `cookie`",
        );
        assert_error(
            |v| v["user_id"] = json!({"header": ""}),
            "user_id.header",
            "1 to 256 bytes",
        );
        assert_error(
            |v| v["user_id"] = json!({"header": 5}),
            "user_id.header",
            "expected a string",
        );
        assert_error(
            |v| v["user_id"] = json!({"header": "x user"}),
            "user_id.header",
            "not a valid HTTP header name",
        );
        assert_error(
            |v| v["user_id"] = json!({"header": "X-Seckill-User"}),
            "user_id.header",
            "strips those headers",
        );
        assert_error(
            |v| v["request_id"] = json!({"path": "rid"}),
            "request_id.path",
            "no {rid} variable",
        );
        assert_error(
            |v| v["quantity"]["source"] = json!({"path": "qty"}),
            "quantity.source.path",
            "no {qty} variable",
        );
    }

    #[test]
    fn quantity_errors() {
        assert_error(
            |v| v["quantity"]["max"] = json!(0),
            "quantity.max",
            "from 1 to 1000",
        );
        assert_error(
            |v| v["quantity"]["max"] = json!(1001),
            "quantity.max",
            "from 1 to 1000",
        );
        assert_error(
            |v| v["quantity"]["max"] = json!(-1),
            "quantity.max",
            "expected u64",
        );
        assert_error(
            |v| v["quantity"]["default"] = json!(6),
            "quantity.default",
            "quantity.max (5)",
        );
        assert_error(
            |v| v["quantity"]["default"] = json!(0),
            "quantity.default",
            "from 1",
        );
        assert_error(
            |v| v["quantity"]["default"] = json!(1.5),
            "quantity.default",
            "expected u64",
        );
    }

    #[test]
    fn id_len_max_errors() {
        assert_error(
            |v| v["id_len_max"] = json!(0),
            "id_len_max",
            "from 1 to 128",
        );
        assert_error(
            |v| v["id_len_max"] = json!(129),
            "id_len_max",
            "from 1 to 128",
        );
    }

    #[test]
    fn deduct_errors() {
        assert_error(
            |v| v["deduct"]["secret"] = json!("s3cret"),
            "deduct.secret",
            "shows in Envoy's admin /config_dump",
        );
        assert_error(
            |v| v["deduct"]["secret_env"] = json!("SECKILL_NOT_SET_ANYWHERE"),
            "deduct.secret_env",
            "SECKILL_NOT_SET_ANYWHERE is not set in the wasm VM",
        );
        for bad in ["", "1ABC", "A-B", "A B", &"A".repeat(129)] {
            assert_error(
                |v| v["deduct"]["secret_env"] = json!(bad),
                "deduct.secret_env",
                "must be an environment variable name",
            );
        }
        assert_error(
            |v| {
                v["deduct"].as_object_mut().unwrap().remove("secret_env");
            },
            "deduct",
            "missing field `secret_env`",
        );
        assert_error(
            |v| {
                v["deduct"].as_object_mut().unwrap().remove("cluster");
            },
            "deduct",
            "missing field `cluster`",
        );
        assert_error(
            |v| v["deduct"]["cluster"] = json!(""),
            "deduct.cluster",
            "must not be empty",
        );
        assert_error(
            |v| v["deduct"]["authority"] = json!(""),
            "deduct.authority",
            "must not be empty",
        );
        assert_error(
            |v| v["deduct"]["timeout_ms"] = json!(0),
            "deduct.timeout_ms",
            "from 1 to 10000",
        );
        assert_error(
            |v| v["deduct"]["timeout_ms"] = json!(10_001),
            "deduct.timeout_ms",
            "from 1 to 10000",
        );
        assert_error(
            |v| v["deduct"]["failure_mode"] = json!("ajar"),
            "deduct.failure_mode",
            "unknown variant `ajar`, expected `closed` or `open`",
        );
    }

    #[test]
    fn rate_limit_errors() {
        assert_error(
            |v| v["rate_limit"]["default"]["per_second"] = json!(0),
            "rate_limit.default",
            "per_second must be",
        );
        assert_error(
            |v| v["rate_limit"]["default"]["per_second"] = json!(-3),
            "rate_limit.default",
            "per_second must be",
        );
        assert_error(
            |v| v["rate_limit"]["default"]["per_second"] = json!("many"),
            "rate_limit.default.per_second",
            "expected f64",
        );
        assert_error(
            |v| v["rate_limit"]["default"]["burst"] = json!(0),
            "rate_limit.default",
            "burst must be",
        );
        assert_error(
            |v| v["rate_limit"]["default"]["burst"] = json!(2.5),
            "rate_limit.default.burst",
            "expected u64",
        );
        assert_error(
            |v| {
                v["rate_limit"].as_object_mut().unwrap().remove("default");
            },
            "rate_limit",
            "missing field `default`",
        );
        assert_error(
            |v| v["rate_limit"]["goods"]["sku-1"]["per_second"] = json!(0),
            "rate_limit.goods.sku-1",
            "per_second must be",
        );
        assert_error(
            |v| v["rate_limit"]["goods"]["bad id"] = json!({"per_second": 1, "burst": 1}),
            "rate_limit.goods.bad id",
            "may only contain",
        );
        assert_error(
            |v| v["rate_limit"]["tracked_goods_max"] = json!(0),
            "rate_limit.tracked_goods_max",
            "from 1 to",
        );
    }

    #[test]
    fn messages_quoted_in_the_readme() {
        let e = error_of(|v| v["rate_limit"]["default"]["per_second"] = json!(0));
        assert_eq!(
            e.to_string(),
            "rate_limit.default: per_second must be a number from 0.001 to 1000000000 (got 0)"
        );
        let e = error_of(|v| v["quantity"]["max"] = json!(0));
        assert_eq!(
            e.to_string(),
            "quantity.max: must be from 1 to 1000 (got 0)"
        );
        let e = error_of(|v| v["goods_id"] = json!({"path": "sku"}));
        assert_eq!(
            e.to_string(),
            "goods_id.path: route.path_template has no {sku} variable"
        );
        let e = error_of(|v| v["deduct"]["secret_env"] = json!("SECKILL_UNSET"));
        assert_eq!(
            e.to_string(),
            "deduct.secret_env: SECKILL_UNSET is not set in the wasm VM: set it in Envoy's \
             environment and list it in vm_config.environment_variables.host_env_keys"
        );
    }

    #[test]
    fn release_on_upstream_failure_defaults_on_and_must_be_a_bool() {
        let c = Config::from_json(Some(minimal().to_string().as_bytes())).unwrap();
        assert!(c.release_on_upstream_failure);
        let mut v = minimal();
        v["release_on_upstream_failure"] = json!(false);
        let c = Config::from_json(Some(v.to_string().as_bytes())).unwrap();
        assert!(!c.release_on_upstream_failure);
        v["release_on_upstream_failure"] = json!("yes");
        let e = Config::from_json(Some(v.to_string().as_bytes())).unwrap_err();
        assert!(
            e.to_string().starts_with("release_on_upstream_failure"),
            "{e}"
        );
    }

    #[test]
    fn shadow_mode_is_off_unless_asked_and_a_goods_overrides_it_both_ways() {
        let c = parse(&minimal()).unwrap();
        assert_eq!(c.modes.default, Mode::Enforce);
        assert_eq!(c.modes.of(Some("sku-1")), Mode::Enforce);
        assert_eq!(c.modes.of(None), Mode::Enforce);

        let mut v = minimal();
        v["goods"] = json!({"dry": {"shadow": true}, "plain": {}, "nulled": {"shadow": null}});
        let c = parse(&v).unwrap();
        assert_eq!(c.modes.of(Some("dry")), Mode::Shadow);
        assert_eq!(c.modes.of(Some("plain")), Mode::Enforce);
        assert_eq!(c.modes.of(Some("nulled")), Mode::Enforce);
        assert_eq!(c.modes.of(Some("other")), Mode::Enforce);
        assert_eq!(c.modes.of(None), Mode::Enforce);

        v["shadow"] = json!(true);
        v["goods"] = json!({"live": {"shadow": false}});
        let c = parse(&v).unwrap();
        assert_eq!(c.modes.of(Some("live")), Mode::Enforce);
        assert_eq!(c.modes.of(Some("other")), Mode::Shadow);
        assert_eq!(c.modes.of(None), Mode::Shadow, "no goods id: the top level");
    }

    #[test]
    fn shadow_settings_are_validated() {
        assert_error(
            |v| v["shadow"] = json!("yes"),
            "shadow",
            "invalid type: string \"yes\", expected a boolean",
        );
        assert_error(
            |v| v["goods"] = json!({"sku-1": {"shadow": 1}}),
            "goods.sku-1.shadow",
            "expected a boolean",
        );
        assert_error(
            |v| v["goods"] = json!({"sku-1": {"shaddow": true}}),
            "goods.sku-1.shaddow",
            "unknown field `shaddow`, expected `shadow`",
        );
        assert_error(
            |v| v["goods"] = json!({"sku-1": true}),
            "goods.sku-1",
            "invalid type: boolean `true`",
        );
        assert_error(
            |v| v["goods"] = json!({"bad id": {"shadow": true}}),
            "goods.bad id",
            "no request could carry it",
        );
        assert_error(|v| v["goods"] = json!(["sku-1"]), "goods", "expected a map");
    }

    #[test]
    fn sold_out_cache_bound() {
        assert_error(
            |v| v["sold_out_cache_ms"] = json!(3_600_001),
            "sold_out_cache_ms",
            "at most 3600000",
        );
        let mut v = example();
        v["sold_out_cache_ms"] = json!(3_600_000);
        assert!(parse(&v).is_ok());
    }

    #[test]
    fn errors_name_the_exact_path() {
        let e = error_of(|v| v["colour"] = json!("red"));
        assert_eq!(e.field, "colour");
        assert!(
            e.problem
                .starts_with("unknown field `colour`, expected one of `route`"),
            "{e}"
        );
        assert_error(
            |v| v["route"]["methods"] = json!(["POST", 5]),
            "route.methods[1]",
            "invalid type: integer `5`, expected a string",
        );
        assert_error(
            |v| v["rate_limit"]["goods"]["sku-1"]["burst"] = json!("ten"),
            "rate_limit.goods.sku-1.burst",
            "expected u64",
        );
        assert_error(
            |v| v["quantity"]["source"] = json!({"query": ["qty"]}),
            "quantity.source.query",
            "expected a string",
        );
        assert_error(|v| v["route"] = json!(null), "route", "invalid type: null");
    }

    #[test]
    fn a_source_is_refused_for_its_shape_before_its_values() {
        // Two keys: the shape is wrong whatever the first value is.
        assert_error(
            |v| v["user_id"] = json!({"header": 5, "query": "u"}),
            "user_id",
            "must be exactly one of",
        );
        assert_error(
            |v| v["user_id"] = json!(null),
            "user_id",
            "invalid type: null, expected exactly one of",
        );
        assert_error(
            |v| v["user_id"] = json!(["x-user-id"]),
            "user_id",
            "expected exactly one of",
        );
    }

    #[test]
    fn null_counts_as_absent() {
        let mut v = minimal();
        for field in [
            "quantity",
            "request_id",
            "id_len_max",
            "sold_out_cache_ms",
            "unknown_goods_cache_ms",
            "release_on_upstream_failure",
            "shadow",
            "goods",
        ] {
            v[field] = Value::Null;
        }
        v["route"]["methods"] = Value::Null;
        v["deduct"]["authority"] = Value::Null;
        v["deduct"]["failure_mode"] = Value::Null;
        v["rate_limit"]["goods"] = Value::Null;
        v["rate_limit"]["unconfirmed"] = Value::Null;
        let c = parse(&v).unwrap();
        assert_eq!(c.route.methods, ["POST"]);
        assert_eq!(c.request_id, Source::Header("x-request-id".into()));
        assert_eq!(c.quantity.max, 1);
        assert_eq!(c.id_len_max, 64);
        assert_eq!(c.deduct.authority, "seckill-syncer");
        assert_eq!(c.deduct.failure_mode, FailureMode::Closed);
        assert_eq!(c.rate_limit.unconfirmed, Rate::new(100.0, 100).unwrap());
        assert_eq!(c.unknown_goods_cache, Duration::from_millis(1000));
        assert!(c.release_on_upstream_failure);
        assert_eq!(c.modes.default, Mode::Enforce);
    }
}
