//! From request headers to a validated [`Purchase`], or a [`BadInput`] that says which field
//! is wrong and why. Decides first whether the request is a sale request at all.
//!
//! Pure code: it works on the header list the host hands over (names lower-case, values as
//! raw bytes, pseudo-headers `:method` and `:path` included), unit-tested natively. The filter
//! reads that list in place from the host's serialized map ([`parse_header_map`]) rather than
//! copying every name and value.

use std::fmt;

use seckill_api::{validate_id, DeductRequest, IdError};

use crate::config::{Config, QuantityRule, Source};
use crate::route;

/// One request header as the host gives it: lower-case name and raw value.
pub trait HeaderPair {
    fn name(&self) -> &[u8];
    fn value(&self) -> &[u8];
}

/// A header read in place from the host's serialized map.
impl HeaderPair for (&[u8], &[u8]) {
    fn name(&self) -> &[u8] {
        self.0
    }

    fn value(&self) -> &[u8] {
        self.1
    }
}

/// A header as the SDK's copying accessor returns it.
impl HeaderPair for (String, Vec<u8>) {
    fn name(&self) -> &[u8] {
        self.0.as_bytes()
    }

    fn value(&self) -> &[u8] {
        &self.1
    }
}

/// Reads a header map as the host serializes it (proxy-wasm ABI 0.2.x: a u32 count; then per
/// header a u32 name length and a u32 value length; then per header the name, a NUL, the
/// value, a NUL; all little-endian), borrowing every name and value from `bytes`. None when
/// the buffer does not hold what its lengths say.
pub fn parse_header_map(bytes: &[u8]) -> Option<Vec<(&[u8], &[u8])>> {
    let word = |at: usize| -> Option<usize> {
        let raw = bytes.get(at..at.checked_add(4)?)?;
        usize::try_from(u32::from_le_bytes(raw.try_into().ok()?)).ok()
    };
    let count = word(0)?;
    // Each header takes at least 10 bytes (two lengths, two NULs): refuse a count the buffer
    // cannot hold before reserving room for it.
    if count > bytes.len() / 10 {
        return None;
    }
    let mut headers = Vec::with_capacity(count);
    let mut data = 4 + count * 8;
    for i in 0..count {
        let name_len = word(4 + i * 8)?;
        let value_len = word(8 + i * 8)?;
        let name = bytes.get(data..data.checked_add(name_len)?)?;
        data += name_len + 1;
        let value = bytes.get(data..data.checked_add(value_len)?)?;
        data += value_len + 1;
        headers.push((name, value));
    }
    Some(headers)
}

/// Writes a header map in the layout [`parse_header_map`] reads (the host reads local-reply
/// headers in it), in one allocation of the exact size.
pub fn serialize_header_map<'a, I>(pairs: I) -> Vec<u8>
where
    I: IntoIterator<Item = (&'a [u8], &'a [u8])>,
    I::IntoIter: Clone,
{
    // Lengths the layout cannot hold do not occur: header names and values are far shorter.
    let word = |len: usize| u32::try_from(len).unwrap_or(u32::MAX).to_le_bytes();
    let pairs = pairs.into_iter();
    let (count, size) = pairs.clone().fold((0, 4), |(count, size), (name, value)| {
        (count + 1, size + 10 + name.len() + value.len())
    });
    let mut bytes = Vec::with_capacity(size);
    bytes.extend_from_slice(&word(count));
    for (name, value) in pairs.clone() {
        bytes.extend_from_slice(&word(name.len()));
        bytes.extend_from_slice(&word(value.len()));
    }
    for (name, value) in pairs {
        bytes.extend_from_slice(name);
        bytes.push(0);
        bytes.extend_from_slice(value);
        bytes.push(0);
    }
    bytes
}

/// A sale request whose inputs all passed validation: exactly the body of the deduct call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Purchase {
    request: DeductRequest,
}

impl Purchase {
    pub fn goods_id(&self) -> &str {
        &self.request.goods_id
    }

    pub fn user_id(&self) -> &str {
        &self.request.user_id
    }

    pub fn quantity(&self) -> u32 {
        self.request.quantity
    }

    pub fn request_id(&self) -> &str {
        &self.request.request_id
    }

    pub fn deduct_request(&self) -> &DeductRequest {
        &self.request
    }
}

/// Why a sale request was refused before anything was spent. The message goes to the buyer
/// in the 400 body, so it names the field and its source but never echoes the value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadInput {
    pub message: String,
    /// The goods id, when it was read and valid and a later field was not: a goods in shadow
    /// mode is a dry run for its bad requests too.
    pub goods_id: Option<String>,
}

impl fmt::Display for BadInput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

/// Whether a header is one only the gate may set (`x-seckill-*`, any case, and with `_` for
/// any `-`: many servers read `x_seckill_order_id` as `x-seckill-order-id`). Every such
/// request header is stripped before anything else happens.
pub fn is_gate_header(name: impl AsRef<[u8]>) -> bool {
    let prefix = seckill_api::GATE_HEADER_PREFIX.as_bytes();
    name.as_ref().get(..prefix.len()).is_some_and(|start| {
        start
            .iter()
            .zip(prefix)
            .all(|(b, p)| b.eq_ignore_ascii_case(p) || (*p == b'-' && *b == b'_'))
    })
}

/// What the filter should do with a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Classified {
    /// The path is not (and does not resemble) the sale route: pass it on untouched.
    NotSale,
    /// A sale request, valid or not.
    Sale(Result<Purchase, BadInput>),
    /// The sale route, with a method it does not take: 405, never passed on. With the goods
    /// id, when its source holds a valid one (it decides the goods' mode).
    WrongMethod { goods_id: Option<String> },
    /// Not the sale route, but a path a lenient shop would route to the same handler
    /// (see [`route::PathTemplate::resembles`]): 400, never passed on.
    NearMiss,
}

/// Decides whether the request is a sale request and, if so, extracts and checks its inputs.
pub fn classify<H: HeaderPair>(config: &Config, headers: &[H]) -> Classified {
    // Pseudo-headers are single by construction in Envoy; take the first of each.
    let first = |name: &[u8]| headers.iter().find(|h| h.name() == name).map(|h| h.value());
    let method = first(b":method");
    let path = first(b":path");
    let (Some(method), Some(path)) = (method, path) else {
        return Classified::NotSale;
    };
    // Envoy only admits visible ASCII in :path; anything else cannot be the sale route.
    let Ok(path) = std::str::from_utf8(path) else {
        return Classified::NotSale;
    };
    let (path, query) = route::split_path(path);
    // A fragment never reaches a server; should one arrive, it is not part of the path.
    let path = path.split('#').next().unwrap_or_default();
    let template = &config.route.template;
    let Some(captures) = template.matches(path) else {
        if template.resembles(path) {
            return Classified::NearMiss;
        }
        return Classified::NotSale;
    };
    let request = Request {
        headers,
        captures: &captures,
        query,
    };
    if !config.route.methods.iter().any(|m| m.as_bytes() == method) {
        let goods_id = read_id("goods id", &config.goods_id, &request, config.id_len_max).ok();
        return Classified::WrongMethod { goods_id };
    }
    Classified::Sale(extract(config, &request))
}

/// The parts of a matched sale request the sources read from.
struct Request<'a, H> {
    headers: &'a [H],
    captures: &'a [&'a str],
    query: Option<&'a str>,
}

/// A raw value as read from its source, before any validation.
enum Raw<'a> {
    Missing,
    Value(&'a [u8]),
    Owned(String),
}

fn extract<H: HeaderPair>(config: &Config, request: &Request<'_, H>) -> Result<Purchase, BadInput> {
    let goods_id = read_id("goods id", &config.goods_id, request, config.id_len_max)?;
    let rest = || -> Result<(String, u32, String), BadInput> {
        let user_id = read_id("user id", &config.user_id, request, config.id_len_max)?;
        let quantity = read_quantity(&config.quantity, request)?;
        let request_id = read_id("request id", &config.request_id, request, config.id_len_max)?;
        Ok((user_id, quantity, request_id))
    };
    let (user_id, quantity, request_id) = match rest() {
        Ok(rest) => rest,
        Err(bad) => {
            return Err(BadInput {
                goods_id: Some(goods_id),
                ..bad
            })
        }
    };
    Ok(Purchase {
        request: DeductRequest {
            goods_id,
            user_id,
            quantity,
            request_id,
        },
    })
}

fn bad(field: &str, source: &Source, problem: impl fmt::Display) -> BadInput {
    BadInput {
        message: format!("{field} ({source}) {problem}"),
        goods_id: None,
    }
}

fn read_raw<'a, H: HeaderPair>(
    field: &str,
    source: &Source,
    request: &Request<'a, H>,
) -> Result<Raw<'a>, BadInput> {
    match source {
        Source::Header(name) => {
            // Gate headers were stripped before this runs; ignore them here as well so a
            // forged one can never be read (config refuses such sources anyway).
            if is_gate_header(name) {
                return Ok(Raw::Missing);
            }
            let mut values = request
                .headers
                .iter()
                .filter(|h| h.name() == name.as_bytes())
                .map(|h| h.value());
            match (values.next(), values.next()) {
                (None, _) => Ok(Raw::Missing),
                (Some(value), None) => Ok(Raw::Value(value)),
                // Refuse rather than guess which copy counts: the shop API might read the
                // other one.
                (Some(_), Some(_)) => Err(bad(field, source, "appears more than once")),
            }
        }
        Source::Query(name) => match request.query.map(|q| route::query_param(q, name)) {
            None | Some(Ok(None)) => Ok(Raw::Missing),
            Some(Ok(Some(value))) => Ok(Raw::Owned(value)),
            Some(Err(e)) => Err(bad(field, source, e)),
        },
        // Config checked the index against the template, so a match always has it.
        Source::Path { index, .. } => Ok(request
            .captures
            .get(*index)
            .map_or(Raw::Missing, |v| Raw::Value(v.as_bytes()))),
    }
}

fn read_id<H: HeaderPair>(
    field: &str,
    source: &Source,
    request: &Request<'_, H>,
    len_max: usize,
) -> Result<String, BadInput> {
    let text = match read_raw(field, source, request)? {
        Raw::Missing => return Err(bad(field, source, "is missing")),
        Raw::Owned(text) => text,
        Raw::Value(bytes) => match std::str::from_utf8(bytes) {
            Ok(text) => text.to_string(),
            Err(_) => return Err(bad(field, source, IdError::BadCharacter)),
        },
    };
    validate_id(&text, len_max).map_err(|e| bad(field, source, e))?;
    Ok(text)
}

fn read_quantity<H: HeaderPair>(
    rule: &QuantityRule,
    request: &Request<'_, H>,
) -> Result<u32, BadInput> {
    let Some(source) = &rule.source else {
        return Ok(rule.default);
    };
    let field = "quantity";
    let text = match read_raw(field, source, request)? {
        Raw::Missing => return Ok(rule.default),
        Raw::Owned(text) => text,
        Raw::Value(bytes) => String::from_utf8_lossy(bytes).into_owned(),
    };
    parse_quantity(&text, rule.max).map_err(|problem| bad(field, source, problem))
}

/// Reads a quantity: plain decimal digits only (no sign, no spaces, no fraction), from 1 to
/// `max`. Returns the problem as a phrase for the error message.
pub fn parse_quantity(text: &str, max: u32) -> Result<u32, String> {
    let whole = || format!("must be a whole number from 1 to {max}");
    if text.is_empty() {
        return Err(format!("is empty; it {}", whole()));
    }
    let (negative, digits) = match text.strip_prefix('-') {
        Some(digits) => (true, digits),
        None => (false, text),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(whole());
    }
    if negative {
        return Err(format!("must be at least 1; it {}", whole()));
    }
    // Too many digits for a u64 is simply too large; no overflow, no panic.
    let value = digits.parse::<u64>().unwrap_or(u64::MAX);
    if value == 0 {
        return Err(format!("must be at least 1; it {}", whole()));
    }
    if value > u64::from(max) {
        return Err(format!("must be at most {max}"));
    }
    // value <= max, so it fits in u32.
    u32::try_from(value).map_err(|_| format!("must be at most {max}"))
}

/// Test fixture for the modules whose tests need a validated purchase: classifies these
/// headers under this plugin configuration, and panics unless they make a valid sale.
#[cfg(test)]
pub(crate) fn sale_for_test(config: &serde_json::Value, headers: &[(&str, &str)]) -> Purchase {
    let config = Config::from_json(Some(config.to_string().as_bytes())).expect("a valid config");
    let headers: Vec<(String, Vec<u8>)> = headers
        .iter()
        .map(|(n, v)| (n.to_string(), v.as_bytes().to_vec()))
        .collect();
    match classify(&config, &headers) {
        Classified::Sale(Ok(p)) => p,
        other => panic!("not a valid sale: {other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn config() -> Config {
        let value = json!({
            "route": {"methods": ["POST", "PUT"], "path_template": "/seckill/{goods_id}/buy"},
            "goods_id": {"path": "goods_id"},
            "user_id": {"header": "x-user-id"},
            "quantity": {"source": {"query": "qty"}, "default": 1, "max": 5},
            "id_len_max": 16,
            "deduct": {"cluster": "c", "secret_env": "SECKILL_TEST_EDGE_SECRET"},
            "rate_limit": {"default": {"per_second": 10, "burst": 1}}
        });
        Config::from_json(Some(value.to_string().as_bytes())).unwrap()
    }

    fn headers(method: &str, path: &str, extra: &[(&str, &[u8])]) -> Vec<(String, Vec<u8>)> {
        let mut list = vec![
            (":method".to_string(), method.as_bytes().to_vec()),
            (":path".to_string(), path.as_bytes().to_vec()),
            (":authority".to_string(), b"shop".to_vec()),
        ];
        list.extend(extra.iter().map(|(n, v)| (n.to_string(), v.to_vec())));
        list
    }

    fn serialize_map(pairs: &[(&str, &[u8])]) -> Vec<u8> {
        serialize_header_map(pairs.iter().map(|(name, value)| (name.as_bytes(), *value)))
    }

    #[test]
    fn header_maps_are_read_in_place() {
        let pairs: [(&str, &[u8]); 4] = [
            (":method", b"POST"),
            (":path", b"/seckill/sku-1/buy?qty=2"),
            ("x-empty", b""),
            ("x-user-id", b"u\xff\x00-1"),
        ];
        let bytes = serialize_map(&pairs);
        let parsed = parse_header_map(&bytes).unwrap();
        let expected: Vec<(&[u8], &[u8])> = pairs.iter().map(|(n, v)| (n.as_bytes(), *v)).collect();
        assert_eq!(parsed, expected);
        assert_eq!(parse_header_map(&serialize_map(&[])), Some(vec![]));
        // The same purchase as from the SDK's copies.
        let owned: Vec<(String, Vec<u8>)> = [
            (":method", "POST"),
            (":path", "/seckill/sku-1/buy?qty=2"),
            ("x-user-id", "u-1"),
            ("x-request-id", "r-1"),
        ]
        .iter()
        .map(|(n, v)| (n.to_string(), v.as_bytes().to_vec()))
        .collect();
        let borrowed: Vec<(&str, &[u8])> = owned
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_slice()))
            .collect();
        let bytes = serialize_map(&borrowed);
        let view = parse_header_map(&bytes).unwrap();
        assert!(matches!(
            classify(&config(), &view),
            Classified::Sale(Ok(_))
        ));
        assert_eq!(classify(&config(), &view), classify(&config(), &owned));
    }

    #[test]
    fn header_maps_are_written_as_the_host_reads_them() {
        // proxy-wasm ABI 0.2.x: count, then (name length, value length) per header, then
        // name NUL value NUL per header; little-endian u32s.
        let bytes = serialize_header_map([(&b"ab"[..], &b"xyz"[..]), (b"c", b"")]);
        let expected: &[u8] = &[
            2, 0, 0, 0, 2, 0, 0, 0, 3, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, b'a', b'b', 0, b'x', b'y',
            b'z', 0, b'c', 0, 0,
        ];
        assert_eq!(bytes, expected);
        assert_eq!(
            bytes.capacity(),
            bytes.len(),
            "one allocation of the exact size"
        );
    }

    #[test]
    fn malformed_header_maps_are_refused() {
        let bytes = serialize_map(&[(":method", b"POST"), ("x-user-id", b"u-1")]);
        // Cut anywhere before the last value ends: refused, never a panic.
        for len in 0..bytes.len() - 1 {
            assert_eq!(parse_header_map(&bytes[..len]), None, "{len} bytes");
        }
        // A count the buffer cannot hold.
        let mut huge = bytes.clone();
        huge[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(parse_header_map(&huge), None);
        // A length running past the end.
        let mut long = bytes.clone();
        long[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(parse_header_map(&long), None);
    }

    fn good_extra() -> Vec<(&'static str, &'static [u8])> {
        vec![("x-user-id", b"u-1"), ("x-request-id", b"r-1")]
    }

    fn classify_path(path: &str, extra: &[(&str, &[u8])]) -> Classified {
        classify(&config(), &headers("POST", path, extra))
    }

    fn bad_message(path: &str, extra: &[(&str, &[u8])]) -> String {
        match classify_path(path, extra) {
            Classified::Sale(Err(bad)) => bad.message,
            other => panic!("expected bad input, got {other:?}"),
        }
    }

    #[test]
    fn valid_purchase() {
        let Classified::Sale(Ok(p)) = classify_path("/seckill/sku-1/buy?qty=3", &good_extra())
        else {
            panic!("expected a purchase");
        };
        assert_eq!(
            p.deduct_request(),
            &DeductRequest {
                goods_id: "sku-1".into(),
                user_id: "u-1".into(),
                quantity: 3,
                request_id: "r-1".into(),
            }
        );
        assert_eq!(
            (p.goods_id(), p.user_id(), p.quantity(), p.request_id()),
            ("sku-1", "u-1", 3, "r-1")
        );
        // No qty: the default.
        let Classified::Sale(Ok(p)) = classify_path("/seckill/sku-1/buy", &good_extra()) else {
            panic!("expected a purchase");
        };
        assert_eq!(p.quantity(), 1);
        let Classified::Sale(Ok(p)) = classify_path("/seckill/sku-1/buy?x=1&qty=5", &good_extra())
        else {
            panic!("expected a purchase");
        };
        assert_eq!(p.quantity(), 5);
    }

    #[test]
    fn not_sale_requests() {
        let c = config();
        for (method, path) in [
            ("POST", "/seckill/sku-1"),
            ("POST", "/seckill//buy"),
            ("POST", "/other"),
            ("GET", "/other"),
            ("POST", "/seckill/sku-1/buy/more"),
        ] {
            assert_eq!(
                classify(&c, &headers(method, path, &good_extra())),
                Classified::NotSale,
                "{method} {path}"
            );
        }
        // The sale route with another method: refused, never passed on.
        for method in ["GET", "HEAD", "DELETE", "post", "OPTIONS"] {
            assert_eq!(
                classify(&c, &headers(method, "/seckill/sku-1/buy", &good_extra())),
                Classified::WrongMethod {
                    goods_id: Some("sku-1".into())
                },
                "{method}"
            );
        }
        assert_eq!(
            classify(&c, &headers("GET", "/seckill/a%20b/buy", &good_extra())),
            Classified::WrongMethod { goods_id: None },
            "a goods id that is not valid is not read"
        );
        // Paths a lenient shop would route to the sale handler: refused, whatever the method.
        for path in [
            "/seckill/sku-1/buy/",
            "//seckill/sku-1/buy",
            "/SECKILL/sku-1/BUY",
            "/seckill/sku-1/buy;x=1",
            "/seckill/sku-1/%62uy?qty=1",
            "/seckill/x/../sku-1/buy",
        ] {
            for method in ["POST", "GET"] {
                assert_eq!(
                    classify(&c, &headers(method, path, &good_extra())),
                    Classified::NearMiss,
                    "{method} {path}"
                );
            }
        }
        assert!(matches!(
            classify(&c, &headers("PUT", "/seckill/sku-1/buy", &good_extra())),
            Classified::Sale(Ok(_))
        ));
        // Without pseudo-headers nothing matches (and nothing panics).
        let none: [(String, Vec<u8>); 0] = [];
        assert_eq!(classify(&c, &none), Classified::NotSale);
        let bad_path = vec![
            (":method".to_string(), b"POST".to_vec()),
            (":path".to_string(), vec![b'/', 0xff]),
        ];
        assert_eq!(classify(&c, &bad_path), Classified::NotSale);
    }

    #[test]
    fn user_id_errors() {
        let path = "/seckill/sku-1/buy";
        assert_eq!(
            bad_message(path, &[("x-request-id", b"r-1")]),
            "user id (header x-user-id) is missing"
        );
        assert_eq!(
            bad_message(path, &[("x-user-id", b""), ("x-request-id", b"r-1")]),
            "user id (header x-user-id) is empty"
        );
        assert_eq!(
            bad_message(path, &[("x-user-id", b"a b"), ("x-request-id", b"r-1")]),
            "user id (header x-user-id) may only contain A-Z a-z 0-9 _ - . :"
        );
        assert_eq!(
            bad_message(path, &[("x-user-id", b"u\xff"), ("x-request-id", b"r-1")]),
            "user id (header x-user-id) may only contain A-Z a-z 0-9 _ - . :"
        );
        assert_eq!(
            bad_message(path, &[("x-user-id", b"u{1}"), ("x-request-id", b"r-1")]),
            "user id (header x-user-id) may only contain A-Z a-z 0-9 _ - . :"
        );
        assert_eq!(
            bad_message(
                path,
                &[
                    ("x-user-id", b"u-0123456789abcdef"),
                    ("x-request-id", b"r-1")
                ]
            ),
            "user id (header x-user-id) is longer than 16 bytes"
        );
        assert_eq!(
            bad_message(
                path,
                &[
                    ("x-user-id", b"a"),
                    ("x-user-id", b"b"),
                    ("x-request-id", b"r-1")
                ]
            ),
            "user id (header x-user-id) appears more than once"
        );
        // A long id is refused, however long.
        let huge = vec![b'a'; 100_000];
        assert_eq!(
            bad_message(path, &[("x-user-id", &huge), ("x-request-id", b"r-1")]),
            "user id (header x-user-id) is longer than 16 bytes"
        );
    }

    #[test]
    fn goods_id_errors() {
        // The route only matches a non-empty segment, so a path goods id cannot be missing;
        // but it can be malformed or too long.
        assert_eq!(
            bad_message("/seckill/a%20b/buy", &good_extra()),
            "goods id (path segment {goods_id}) may only contain A-Z a-z 0-9 _ - . :"
        );
        assert_eq!(
            bad_message("/seckill/abcdefghijklmnopq/buy", &good_extra()),
            "goods id (path segment {goods_id}) is longer than 16 bytes"
        );
        // A goods id from a header can be missing.
        let value = json!({
            "route": {"path_template": "/buy"},
            "goods_id": {"header": "x-goods-id"},
            "user_id": {"query": "user"},
            "deduct": {"cluster": "c", "secret_env": "SECKILL_TEST_EDGE_SECRET"},
            "rate_limit": {"default": {"per_second": 10, "burst": 1}}
        });
        let c = Config::from_json(Some(value.to_string().as_bytes())).unwrap();
        let Classified::Sale(Err(bad)) = classify(
            &c,
            &headers("POST", "/buy?user=u1", &[("x-request-id", b"r")]),
        ) else {
            panic!("expected bad input");
        };
        assert_eq!(bad.message, "goods id (header x-goods-id) is missing");
        assert_eq!(bad.goods_id, None, "no goods id to decide a goods' mode by");
        let Classified::Sale(Err(bad)) = classify(
            &c,
            &headers(
                "POST",
                "/buy?user=u%201",
                &[("x-goods-id", b"g"), ("x-request-id", b"r")],
            ),
        ) else {
            panic!("expected bad input");
        };
        assert_eq!(
            bad.message,
            "user id (query parameter user) may only contain A-Z a-z 0-9 _ - . :"
        );
        assert_eq!(bad.goods_id.as_deref(), Some("g"), "a later field was bad");
        let Classified::Sale(Err(bad)) = classify(
            &c,
            &headers(
                "POST",
                "/buy?user=a&user=b",
                &[("x-goods-id", b"g"), ("x-request-id", b"r")],
            ),
        ) else {
            panic!("expected bad input");
        };
        assert_eq!(
            bad.message,
            "user id (query parameter user) appears more than once"
        );
        let Classified::Sale(Ok(p)) = classify(
            &c,
            &headers(
                "POST",
                "/buy?user=u%3A1",
                &[("x-goods-id", b"g"), ("x-request-id", b"r")],
            ),
        ) else {
            panic!("expected a purchase");
        };
        assert_eq!((p.goods_id(), p.user_id(), p.quantity()), ("g", "u:1", 1));
    }

    #[test]
    fn quantity_errors() {
        let cases: [(&str, &str); 9] = [
            (
                "0",
                "must be at least 1; it must be a whole number from 1 to 5",
            ),
            (
                "-1",
                "must be at least 1; it must be a whole number from 1 to 5",
            ),
            ("abc", "must be a whole number from 1 to 5"),
            ("1.5", "must be a whole number from 1 to 5"),
            ("+1", "must be a whole number from 1 to 5"),
            ("6", "must be at most 5"),
            ("99999999999999999999", "must be at most 5"),
            ("999999999999999999999999999999999999", "must be at most 5"),
            ("", "is empty; it must be a whole number from 1 to 5"),
        ];
        for (qty, problem) in cases {
            assert_eq!(
                bad_message(&format!("/seckill/sku-1/buy?qty={qty}"), &good_extra()),
                format!("quantity (query parameter qty) {problem}"),
                "qty={qty}"
            );
        }
        assert_eq!(
            bad_message("/seckill/sku-1/buy?qty=1&qty=2", &good_extra()),
            "quantity (query parameter qty) appears more than once"
        );
        assert_eq!(
            bad_message("/seckill/sku-1/buy?qty=%zz", &good_extra()),
            "quantity (query parameter qty) is not validly percent-encoded UTF-8"
        );
        assert_eq!(parse_quantity("005", 5), Ok(5));
        assert_eq!(parse_quantity("1000", 1000), Ok(1000));
        assert!(parse_quantity(" 1", 5).is_err());
        assert!(parse_quantity("1 ", 5).is_err());
        assert!(parse_quantity("-", 5).is_err());
        assert!(
            parse_quantity("١", 5).is_err(),
            "non-ASCII digits are refused"
        );
    }

    #[test]
    fn request_id_errors() {
        assert_eq!(
            bad_message("/seckill/sku-1/buy", &[("x-user-id", b"u")]),
            "request id (header x-request-id) is missing"
        );
        assert_eq!(
            bad_message(
                "/seckill/sku-1/buy",
                &[("x-user-id", b"u"), ("x-request-id", b"r/1")]
            ),
            "request id (header x-request-id) may only contain A-Z a-z 0-9 _ - . :"
        );
    }

    #[test]
    fn first_error_wins_in_field_order() {
        // goods, then user, then quantity, then request id.
        assert_eq!(
            bad_message("/seckill/a%20b/buy?qty=0", &[]),
            "goods id (path segment {goods_id}) may only contain A-Z a-z 0-9 _ - . :"
        );
        assert_eq!(
            bad_message("/seckill/sku-1/buy?qty=0", &[]),
            "user id (header x-user-id) is missing"
        );
        assert_eq!(
            bad_message("/seckill/sku-1/buy?qty=0", &[("x-user-id", b"u")]),
            "quantity (query parameter qty) must be at least 1; it must be a whole number from 1 to 5"
        );
    }

    #[test]
    fn gate_headers_are_recognised_in_any_case() {
        assert!(is_gate_header("x-seckill-order-id"));
        assert!(is_gate_header("X-Seckill-Order-Id"));
        assert!(is_gate_header("x-seckill-"));
        assert!(is_gate_header("x_seckill_order_id"));
        assert!(is_gate_header("X_Seckill-order-id"));
        // The pass too: a client's own pass never reaches the shop.
        assert!(is_gate_header(seckill_api::PASS_HEADER));
        assert!(is_gate_header("X-SECKILL_PASS"));
        assert!(!is_gate_header("x-seckill"));
        assert!(!is_gate_header("x.seckill.order"));
        assert!(!is_gate_header("x-seckil-order-id"));
        assert!(!is_gate_header("x-user-id"));
        assert!(!is_gate_header(""));
    }

    #[test]
    fn forged_gate_headers_are_never_read() {
        let source = Source::Header("x-seckill-user-id".into());
        let list = headers("POST", "/", &[("x-seckill-user-id", b"forged")]);
        let request = Request {
            headers: &list,
            captures: &[],
            query: None,
        };
        assert!(matches!(
            read_raw("user id", &source, &request),
            Ok(Raw::Missing)
        ));
    }
}
