//! The native sold-out fast path: an Envoy route per hot goods that answers its sold-out
//! requests itself (`direct_response`, the wasm filter disabled on the route), switched on and
//! off by an Envoy runtime key the syncer sets from Redis's stock. While the key is off (its
//! default, and what an Envoy that restarted or lost its syncer has) the route never matches
//! and the filter decides as always. Shared by the syncer (which sets the keys and prints the
//! routes) and the filter's tests (which check the route's answer is the filter's own).

use crate::{GATE_STATUS_HEADER, ORDER_ID_HEADER, SHADOW_HEADER};

/// Prefix of each goods' runtime key: `seckill.sold_out.<goods id>`, 100 while the goods is
/// sold out (the route answers), 0 or unset while it is not (the filter decides).
pub const RUNTIME_KEY_PREFIX: &str = "seckill.sold_out.";

/// Cookie the gate sets on an answer that asks the buyer to retry with the same request id
/// (a `503 unavailable`, an `upstream_unknown`): a request carrying it skips the route, so the
/// retry reaches the filter, whose worker remembers the request id and asks the syncer
/// instead of answering from the sold-out cache. Apps that keep no cookies send it themselves.
pub const RETRY_COOKIE: &str = "seckill_retry";

/// `Set-Cookie` value of [`RETRY_COOKIE`]: it lives as long as a worker remembers a request
/// id it asked to be retried (one minute).
pub const RETRY_COOKIE_SET: &str = "seckill_retry=1; Max-Age=60; Path=/; HttpOnly; SameSite=Lax";

/// Response header the route adds, so a buyer's answer (and a test) shows Envoy gave it.
pub const ANSWERED_BY_HEADER: &str = "x-seckill-answered-by";
/// Its value on the route's answers.
pub const ANSWERED_BY_ROUTE: &str = "route";

/// The runtime key of one goods.
pub fn runtime_key(goods_id: &str) -> String {
    format!("{RUNTIME_KEY_PREFIX}{goods_id}")
}

/// The body the filter answers a sold-out goods with from its cache (`409`): the route's
/// answer is the same, byte for byte (the filter's tests compare the two). Goods ids are
/// checked by [`crate::validate_id`], whose characters need no JSON escaping.
pub fn sold_out_body(goods_id: &str) -> String {
    format!(
        r#"{{"outcome":"sold_out","goods_id":"{goods_id}","message":"sorry, this item is sold out","remaining":0}}"#
    )
}

/// Why a route could not be made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteError {
    /// The goods id is not one a sale may have.
    GoodsId(String),
    /// The path template has no `{goods_id}` segment: the goods id is read from elsewhere
    /// (a query parameter, a header), which this route does not match on.
    Template(String),
    /// No sale method given, or one that is not a plain token.
    Methods,
}

impl std::fmt::Display for RouteError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RouteError::GoodsId(why) => write!(f, "goods id {why}"),
            RouteError::Template(template) => write!(
                f,
                "the path template {template:?} must start with '/' and hold the goods id's variable once, as a whole segment"
            ),
            RouteError::Methods => write!(f, "give the sale route's methods (such as POST)"),
        }
    }
}

impl std::error::Error for RouteError {}

/// Where the sale route is, as the filter's plugin configuration says it.
#[derive(Debug, Clone, Copy)]
pub struct SaleRoute<'a> {
    /// `route.path_template`, such as `/seckill/{goods_id}/buy`.
    pub template: &'a str,
    /// The template's variable holding the goods id (`goods_id.path`), such as `goods_id`.
    pub variable: &'a str,
    /// `route.methods`.
    pub methods: &'a [&'a str],
    /// The wasm filter's name in `http_filters`: disabled on the route, so no VM is entered.
    pub filter_name: &'a str,
}

/// One Envoy route (JSON, which YAML takes as it is) answering `goods_id`'s sale requests
/// `409 sold_out` while its runtime key is 100.
///
/// The route does not match a request the filter must see whatever the stock says: one that
/// carries the retry cookie, and one that carries a header only the filter sets on a request
/// it forwards (an order id, a failed-open or shadow mark). Envoy may match routes again after
/// the filter changed a request's headers; a winner decided while the key flipped must still
/// reach the shop, not this route's answer.
pub fn sold_out_route(sale: &SaleRoute<'_>, goods_id: &str) -> Result<String, RouteError> {
    crate::validate_id(goods_id, crate::ID_LEN_MAX)
        .map_err(|e| RouteError::GoodsId(e.to_string()))?;
    let SaleRoute {
        template,
        methods,
        filter_name,
        ..
    } = *sale;
    let variable = &format!("{{{}}}", sale.variable);
    let well_formed = template.starts_with('/')
        && template.matches(variable).count() == 1
        && template.split('/').any(|segment| segment == variable)
        && !template.contains(['"', '\\', '?', '#']);
    if !well_formed {
        return Err(RouteError::Template(template.to_string()));
    }
    let token = |m: &&str| !m.is_empty() && m.bytes().all(|b| b.is_ascii_uppercase());
    if methods.is_empty() || !methods.iter().all(token) {
        return Err(RouteError::Methods);
    }
    let path = template.replace(variable, goods_id);
    let method_regex = methods.join("|");
    let absent =
        |name: &str| format!(r#"{{"name":"{name}","present_match":true,"invert_match":true}}"#);
    let headers = [
        format!(r#"{{"name":":method","string_match":{{"safe_regex":{{"regex":"{method_regex}"}}}}}}"#),
        absent(ORDER_ID_HEADER),
        absent(GATE_STATUS_HEADER),
        absent(SHADOW_HEADER),
        format!(
            r#"{{"name":"cookie","string_match":{{"contains":"{RETRY_COOKIE}="}},"invert_match":true,"treat_missing_header_as_empty":true}}"#
        ),
    ]
    .join(",");
    let key = runtime_key(goods_id);
    let body = sold_out_body(goods_id).replace('"', "\\\"");
    // The answer's headers. `content-type` is overwritten: a direct response with a body
    // gets Envoy's `text/plain` unless it has one, and overwriting keeps that true whatever
    // order Envoy adds them in (it costs the same as appending an inline header). The others
    // are on no direct response, so they are appended, which costs Envoy about half of an
    // overwrite: 4.2k fewer instructions a request of about 97k (BENCHMARKS.md,
    // `scripts/edge-instructions.py`).
    Ok(format!(
        concat!(
            r#"{{"name":"seckill-sold-out-{goods}","#,
            r#""match":{{"path":"{path}","headers":[{headers}],"#,
            r#""runtime_fraction":{{"default_value":{{"numerator":0,"denominator":"HUNDRED"}},"runtime_key":"{key}"}}}},"#,
            r#""direct_response":{{"status":409,"body":{{"inline_string":"{body}"}}}},"#,
            r#""response_headers_to_add":["#,
            r#"{{"header":{{"key":"content-type","value":"application/json"}},"append_action":"OVERWRITE_IF_EXISTS_OR_ADD"}},"#,
            r#"{{"header":{{"key":"cache-control","value":"no-store"}},"append_action":"APPEND_IF_EXISTS_OR_ADD"}},"#,
            r#"{{"header":{{"key":"x-seckill-outcome","value":"sold_out"}},"append_action":"APPEND_IF_EXISTS_OR_ADD"}},"#,
            r#"{{"header":{{"key":"{by}","value":"{route}"}},"append_action":"APPEND_IF_EXISTS_OR_ADD"}}],"#,
            r#""typed_per_filter_config":{{"{filter}":{{"@type":"type.googleapis.com/envoy.config.route.v3.FilterConfig","disabled":true}}}}}}"#
        ),
        goods = goods_id,
        path = path,
        headers = headers,
        key = key,
        body = body,
        by = ANSWERED_BY_HEADER,
        route = ANSWERED_BY_ROUTE,
        filter = filter_name,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_route_matches_the_goods_path_and_its_runtime_key() {
        let sale = SaleRoute {
            template: "/seckill/{goods_id}/buy",
            variable: "goods_id",
            methods: &["POST"],
            filter_name: "wasm",
        };
        let route = sold_out_route(&sale, "g-1").unwrap();
        let json: serde_json::Value = serde_json::from_str(&route).unwrap();
        assert_eq!(json["match"]["path"], "/seckill/g-1/buy");
        assert_eq!(
            json["match"]["runtime_fraction"]["runtime_key"],
            "seckill.sold_out.g-1"
        );
        assert_eq!(
            json["match"]["runtime_fraction"]["default_value"]["numerator"],
            0
        );
        assert_eq!(json["direct_response"]["status"], 409);
        let body = json["direct_response"]["body"]["inline_string"]
            .as_str()
            .unwrap();
        assert_eq!(body, sold_out_body("g-1"));
        let body: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(body["outcome"], "sold_out");
        assert_eq!(body["goods_id"], "g-1");
        let disabled = &json["typed_per_filter_config"]["wasm"];
        assert_eq!(disabled["disabled"], true);
        let headers = json["match"]["headers"].as_array().unwrap();
        let inverted: Vec<_> = headers
            .iter()
            .filter(|h| h["invert_match"] == true)
            .map(|h| h["name"].as_str().unwrap())
            .collect();
        assert_eq!(
            inverted,
            [
                "x-seckill-order-id",
                "x-seckill-gate",
                "x-seckill-shadow",
                "cookie"
            ]
        );
        assert_eq!(headers[0]["string_match"]["safe_regex"]["regex"], "POST");
        let added: Vec<_> = json["response_headers_to_add"]
            .as_array()
            .unwrap()
            .iter()
            .map(|h| {
                let name = h["header"]["key"].as_str().unwrap();
                (name, h["append_action"].as_str().unwrap())
            })
            .collect();
        assert_eq!(
            added,
            [
                ("content-type", "OVERWRITE_IF_EXISTS_OR_ADD"),
                ("cache-control", "APPEND_IF_EXISTS_OR_ADD"),
                ("x-seckill-outcome", "APPEND_IF_EXISTS_OR_ADD"),
                (ANSWERED_BY_HEADER, "APPEND_IF_EXISTS_OR_ADD")
            ]
        );
    }

    #[test]
    fn bad_goods_templates_and_methods_are_refused() {
        let route = |template: &str, methods: &[&str], goods: &str| {
            let sale = SaleRoute {
                template,
                variable: "goods_id",
                methods,
                filter_name: "wasm",
            };
            sold_out_route(&sale, goods)
        };
        assert!(matches!(
            route("/seckill/{goods_id}/buy", &["POST"], "a/b"),
            Err(RouteError::GoodsId(_))
        ));
        assert!(matches!(
            route("/seckill/{goods_id}/buy", &["POST"], ""),
            Err(RouteError::GoodsId(_))
        ));
        for template in [
            "/seckill/buy",
            "seckill/{goods_id}",
            "/s/x{goods_id}",
            "/{goods_id}/{goods_id}",
        ] {
            assert!(
                matches!(
                    route(template, &["POST"], "g"),
                    Err(RouteError::Template(_))
                ),
                "{template}"
            );
        }
        assert_eq!(route("/s/{goods_id}", &[], "g"), Err(RouteError::Methods));
        assert_eq!(
            route("/s/{goods_id}", &["POST|GET"], "g"),
            Err(RouteError::Methods)
        );
        assert!(route("/s/{goods_id}", &["POST", "PUT"], "g").is_ok());
    }
}
