//! Which requests are sale requests: method list plus a path template such as
//! `/seckill/{goods_id}/buy`, and the query-string reading the sources need.
//!
//! Pure code: no host calls, unit-tested natively.

use std::fmt;

/// Most segments a template may have. Sale routes are short; the bound keeps matching cheap.
pub const TEMPLATE_SEGMENTS_MAX: usize = 16;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(String),
    Variable(String),
}

/// A compiled path template: `/`-separated literal segments and `{name}` segments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathTemplate {
    segments: Vec<Segment>,
    /// The template as configured, for messages.
    text: String,
}

impl PathTemplate {
    /// Parses and checks a template. Errors say what is wrong, without the field name
    /// (the caller adds it).
    pub fn parse(text: &str) -> Result<PathTemplate, String> {
        let Some(rest) = text.strip_prefix('/') else {
            return Err(format!("{text:?} must start with '/'"));
        };
        if rest.contains(['?', '#']) {
            return Err(format!(
                "{text:?} may not contain '?' or '#' (matching ignores the query string)"
            ));
        }
        let mut segments = Vec::new();
        if !rest.is_empty() {
            for part in rest.split('/') {
                segments.push(parse_segment(part, text)?);
            }
        }
        if segments.len() > TEMPLATE_SEGMENTS_MAX {
            return Err(format!(
                "{text:?} has more than {TEMPLATE_SEGMENTS_MAX} segments"
            ));
        }
        let mut seen: Vec<&str> = Vec::new();
        for name in segments.iter().filter_map(|s| match s {
            Segment::Variable(name) => Some(name.as_str()),
            Segment::Literal(_) => None,
        }) {
            if seen.contains(&name) {
                return Err(format!("{text:?} uses the variable {{{name}}} twice"));
            }
            seen.push(name);
        }
        Ok(PathTemplate {
            segments,
            text: text.to_string(),
        })
    }

    /// The template as configured.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Whether a path that does not [`match`](PathTemplate::matches) would still reach the
    /// sale handler at a lenient server: literals in another case, `;` path parameters,
    /// percent-encoded characters, empty, `.` and `..` segments, a trailing slash,
    /// backslashes. Such a path is neither the sale route nor safe to pass on ungated.
    pub fn resembles(&self, path: &str) -> bool {
        let decoded = decode_leniently(path);
        let mut parts: Vec<&[u8]> = Vec::new();
        for part in decoded.split(|b| *b == b'/' || *b == b'\\') {
            let part = part.split(|b| *b == b';').next().unwrap_or_default();
            match part {
                b"" | b"." => {}
                b".." => {
                    parts.pop();
                }
                _ => parts.push(part),
            }
            // Deeper than the template can ever be, even after `..`: cannot resemble it.
            if parts.len() > TEMPLATE_SEGMENTS_MAX * 2 {
                return false;
            }
        }
        parts.len() == self.segments.len()
            && self
                .segments
                .iter()
                .zip(&parts)
                .all(|(segment, part)| match segment {
                    Segment::Literal(literal) => literal.as_bytes().eq_ignore_ascii_case(part),
                    Segment::Variable(_) => true,
                })
    }

    /// Position of a variable among the template's variables (the index into the captures
    /// that [`PathTemplate::matches`] returns), if the template has it.
    pub fn variable_index(&self, name: &str) -> Option<usize> {
        self.variables().position(|v| v == name)
    }

    fn variables(&self) -> impl Iterator<Item = &str> {
        self.segments.iter().filter_map(|s| match s {
            Segment::Variable(name) => Some(name.as_str()),
            Segment::Literal(_) => None,
        })
    }

    /// Matches a path without its query string. On a match, returns the values of the
    /// variables in template order. A variable matches exactly one non-empty segment; no
    /// percent-decoding happens, so an encoded id fails id validation instead of smuggling in
    /// a '/' or another character.
    pub fn matches<'a>(&self, path: &'a str) -> Option<Vec<&'a str>> {
        let rest = path.strip_prefix('/')?;
        let mut captures = Vec::new();
        if rest.is_empty() {
            return self.segments.is_empty().then_some(captures);
        }
        let mut parts = rest.split('/');
        for segment in &self.segments {
            let part = parts.next()?;
            match segment {
                Segment::Literal(literal) => {
                    if part != literal {
                        return None;
                    }
                }
                Segment::Variable(_) => {
                    if part.is_empty() {
                        return None;
                    }
                    captures.push(part);
                }
            }
        }
        // Every path segment must be consumed: `/seckill/a/buy/extra` is not the sale route.
        if parts.next().is_some() {
            return None;
        }
        Some(captures)
    }
}

fn parse_segment(part: &str, template: &str) -> Result<Segment, String> {
    if part.is_empty() {
        return Err(format!(
            "{template:?} has an empty segment ('//' or a trailing '/')"
        ));
    }
    if let Some(inner) = part.strip_prefix('{') {
        let Some(name) = inner.strip_suffix('}') else {
            return Err(format!(
                "{template:?}: segment {part:?} must be a whole {{name}} variable or a literal"
            ));
        };
        let valid_name = !name.is_empty()
            && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
            && !name.as_bytes()[0].is_ascii_digit();
        if !valid_name {
            return Err(format!(
                "{template:?}: variable {{{name}}} must be a name of A-Z a-z 0-9 _ not starting with a digit"
            ));
        }
        return Ok(Segment::Variable(name.to_string()));
    }
    if part.contains(['{', '}']) {
        return Err(format!(
            "{template:?}: segment {part:?} must be a whole {{name}} variable or a literal"
        ));
    }
    Ok(Segment::Literal(part.to_string()))
}

/// Splits a `:path` value into the path and the query string (without the `?`).
pub fn split_path(path_and_query: &str) -> (&str, Option<&str>) {
    match path_and_query.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (path_and_query, None),
    }
}

/// Why a query parameter could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueryError {
    /// The parameter appears more than once: refuse rather than guess which one counts,
    /// since another parser further up might pick the other.
    Repeated,
    /// Bad `%` escape, or the decoded bytes are not UTF-8.
    BadEncoding,
}

impl fmt::Display for QueryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            QueryError::Repeated => write!(f, "appears more than once"),
            QueryError::BadEncoding => write!(f, "is not validly percent-encoded UTF-8"),
        }
    }
}

/// Reads one parameter from a query string (`a=1&b=2`). `name` is compared with each
/// decoded parameter name; a parameter without `=` has the empty value.
pub fn query_param(query: &str, name: &str) -> Result<Option<String>, QueryError> {
    let mut found = None;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (raw_key, raw_value) = pair.split_once('=').unwrap_or((pair, ""));
        // A key that does not decode cannot be the one we look for, unless it is: decode it
        // and only fail when it is ours, so junk parameters do not break sale requests.
        let Ok(key) = percent_decode(raw_key) else {
            continue;
        };
        if key != name {
            continue;
        }
        if found.is_some() {
            return Err(QueryError::Repeated);
        }
        found = Some(percent_decode(raw_value)?);
    }
    Ok(found)
}

/// Decodes every valid `%XX` escape, keeping anything else as it is (a path is only being
/// compared, never used).
fn decode_leniently(text: &str) -> Vec<u8> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escape = (bytes[i] == b'%')
            .then(|| {
                let high = hex_value(*bytes.get(i + 1)?)?;
                let low = hex_value(*bytes.get(i + 2)?)?;
                Some(high << 4 | low)
            })
            .flatten();
        match escape {
            Some(byte) => {
                out.push(byte);
                i += 3;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    out
}

/// Decodes `%XX` escapes and `+` (space, as in HTML forms).
fn percent_decode(text: &str) -> Result<String, QueryError> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let high = bytes.get(i + 1).and_then(|b| hex_value(*b));
                let low = bytes.get(i + 2).and_then(|b| hex_value(*b));
                match (high, low) {
                    (Some(high), Some(low)) => out.push(high << 4 | low),
                    _ => return Err(QueryError::BadEncoding),
                }
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            other => {
                out.push(other);
                i += 1;
            }
        }
    }
    String::from_utf8(out).map_err(|_| QueryError::BadEncoding)
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn template(text: &str) -> PathTemplate {
        PathTemplate::parse(text).unwrap()
    }

    #[test]
    fn template_matches_literals_and_variables() {
        let t = template("/seckill/{goods_id}/buy");
        assert_eq!(t.matches("/seckill/sku-1/buy"), Some(vec!["sku-1"]));
        assert_eq!(t.variable_index("goods_id"), Some(0));
        assert_eq!(t.variable_index("user"), None);
        assert_eq!(
            t.matches("/seckill//buy"),
            None,
            "a variable needs a non-empty segment"
        );
        assert_eq!(t.matches("/seckill/sku-1/buy/"), None);
        assert_eq!(t.matches("/seckill/sku-1/buy/x"), None);
        assert_eq!(t.matches("/seckill/sku-1"), None);
        assert_eq!(t.matches("/seckill/sku-1/sell"), None);
        assert_eq!(
            t.matches("/Seckill/sku-1/buy"),
            None,
            "literals are case-sensitive"
        );
        assert_eq!(t.matches("seckill/sku-1/buy"), None);
        assert_eq!(t.matches(""), None);
        assert_eq!(t.matches("/"), None);
        // No decoding: the encoded value reaches id validation as it is.
        assert_eq!(t.matches("/seckill/a%2Fb/buy"), Some(vec!["a%2Fb"]));
    }

    #[test]
    fn near_misses_resemble_the_template() {
        let t = template("/seckill/{goods_id}/buy");
        for near in [
            "/seckill/g/buy/",
            "//seckill/g/buy",
            "/seckill//g/buy",
            "/seckill/x/../g/buy",
            "/seckill/./g/buy",
            "/seckill/g/%62uy",
            "/%73eckill/g/buy",
            "/SECKILL/g/BUY",
            "/Seckill/g/Buy",
            "/seckill/g/buy;x=1",
            "/seckill;a/g/buy",
            "/seckill\\g\\buy",
            "/seckill/g/buy%2F",
            "/seckill/g%2Fbuy",
        ] {
            assert_eq!(t.matches(near), None, "{near}");
            assert!(t.resembles(near), "{near} should resemble the sale route");
        }
        for other in [
            "/seckill/g",
            "/seckill/g/sell",
            "/seckill/g/buy/x",
            "/other",
            "/",
            "",
            "/seckill/g/buyx",
            "/seckill/g/../buy",
            "/seckill/g/%zz",
        ] {
            assert!(
                !t.resembles(other),
                "{other} should not resemble the sale route"
            );
        }
        let deep = "/a".repeat(10_000);
        assert!(!t.resembles(&deep));
        assert_eq!(t.as_str(), "/seckill/{goods_id}/buy");
    }

    #[test]
    fn template_with_several_variables_and_root() {
        let t = template("/shop/{shop}/goods/{goods}");
        assert_eq!(t.matches("/shop/s1/goods/g9"), Some(vec!["s1", "g9"]));
        assert_eq!(t.variable_index("goods"), Some(1));
        let root = template("/");
        assert_eq!(root.matches("/"), Some(vec![]));
        assert_eq!(root.matches("/a"), None);
        let literal = template("/buy");
        assert_eq!(literal.matches("/buy"), Some(vec![]));
        assert_eq!(literal.matches("/buy/"), None);
    }

    #[test]
    fn bad_templates_are_refused() {
        for bad in [
            "",
            "seckill/{id}",
            "/seckill//buy",
            "/seckill/",
            "/seckill/{id",
            "/seckill/id}",
            "/seckill/x{id}",
            "/seckill/{}",
            "/seckill/{1id}",
            "/seckill/{a-b}",
            "/seckill/{id}/{id}",
            "/seckill?x=1",
            "/a#b",
        ] {
            assert!(
                PathTemplate::parse(bad).is_err(),
                "{bad:?} should be refused"
            );
        }
        let long = "/a".repeat(TEMPLATE_SEGMENTS_MAX + 1);
        assert!(PathTemplate::parse(&long).is_err());
    }

    #[test]
    fn path_and_query_split() {
        assert_eq!(split_path("/a/b?x=1&y"), ("/a/b", Some("x=1&y")));
        assert_eq!(split_path("/a/b"), ("/a/b", None));
        assert_eq!(split_path("/a?"), ("/a", Some("")));
    }

    #[test]
    fn query_params_are_decoded_and_checked() {
        assert_eq!(query_param("qty=2&x=1", "qty"), Ok(Some("2".into())));
        assert_eq!(query_param("x=1", "qty"), Ok(None));
        assert_eq!(query_param("", "qty"), Ok(None));
        assert_eq!(query_param("qty", "qty"), Ok(Some(String::new())));
        assert_eq!(query_param("qty=", "qty"), Ok(Some(String::new())));
        assert_eq!(query_param("u=a%3Ab", "u"), Ok(Some("a:b".into())));
        assert_eq!(query_param("u=a+b", "u"), Ok(Some("a b".into())));
        assert_eq!(query_param("q%74y=3", "qty"), Ok(Some("3".into())));
        assert_eq!(query_param("qty=1&qty=2", "qty"), Err(QueryError::Repeated));
        assert_eq!(query_param("qty=%zz", "qty"), Err(QueryError::BadEncoding));
        assert_eq!(query_param("qty=%4", "qty"), Err(QueryError::BadEncoding));
        assert_eq!(query_param("qty=%ff", "qty"), Err(QueryError::BadEncoding));
        // Junk elsewhere in the query does not matter.
        assert_eq!(query_param("x=%zz&qty=1", "qty"), Ok(Some("1".into())));
        assert_eq!(query_param("&&qty=1&", "qty"), Ok(Some("1".into())));
    }
}
