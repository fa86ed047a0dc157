//! The signed pass: proof, for the shop API, that a forwarded request won a unit at the gate.
//!
//! Why: the shop trusts `x-seckill-order-id` because it comes from the gate, but a misrouted or
//! internal request can carry any header. The syncer signs each `won` answer (the signing key
//! never enters Envoy, whose admin page prints the plugin configuration) and the gate forwards
//! the pass in `x-seckill-pass`; the shop checks it with the same key before it takes the
//! order.
//!
//! The format is a compact JWS (a JWT) with HS256, so any JWT library verifies it; this crate
//! is the small verifier for Rust shops and the signer the syncer uses. README.md documents
//! the format, how to verify it elsewhere, and how to rotate keys.
//!
//! ```
//! use seckill_pass::{sign, verify, Key, Keys, Pass};
//!
//! let key: Key = "k1=0123456789abcdef0123456789abcdef".parse().unwrap();
//! let pass = Pass {
//!     order_id: "sku-1.1.7".into(),
//!     goods_id: "sku-1".into(),
//!     user_id: "u-42".into(),
//!     quantity: 1,
//!     issued_at_s: 1_700_000_000,
//!     expires_at_s: 1_700_000_900,
//! };
//! let token = sign(&pass, &key);
//! let keys = Keys::new([key]).unwrap();
//! assert_eq!(verify(&token, &keys, 1_700_000_001), Ok(pass));
//! ```

use std::fmt;
use std::str::FromStr;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

/// The one algorithm a pass is signed with (JWS `alg`).
pub const ALGORITHM: &str = "HS256";
/// The request header the gate forwards a pass in.
pub use seckill_api::PASS_HEADER;
/// Longest token [`verify`] reads (and the gate forwards): a pass with the longest ids is
/// well under 1 KiB.
pub use seckill_api::PASS_LEN_MAX as TOKEN_LEN_MAX;
/// Fewest secret bytes a key may have: HS256 wants a key as long as its 256-bit output.
pub const SECRET_LEN_MIN: usize = 32;
/// Longest key id.
pub const KEY_ID_LEN_MAX: usize = 64;

/// What a pass says: this buyer won this many units of this goods under this order id, and
/// the shop must act (confirm or cancel) before `exp`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pass {
    pub order_id: String,
    pub goods_id: String,
    /// The buyer (JWT `sub`).
    #[serde(rename = "sub")]
    pub user_id: String,
    pub quantity: u32,
    /// When the syncer signed it, seconds since the Unix epoch (JWT `iat`).
    #[serde(rename = "iat")]
    pub issued_at_s: u64,
    /// When the reservation ends unless the shop confirms it, seconds since the Unix epoch,
    /// rounded up (JWT `exp`): the pass is refused at or after it.
    #[serde(rename = "exp")]
    pub expires_at_s: u64,
}

/// One signing key: an id (JWS `kid`) and its secret. Its `Debug` never shows the secret.
#[derive(Clone)]
pub struct Key {
    id: String,
    secret: Vec<u8>,
}

/// Why a key was refused. The messages never contain the secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("a pass key is written KEY_ID=SECRET")]
    NoSeparator,
    #[error("a pass key id is 1 to {KEY_ID_LEN_MAX} of A-Z a-z 0-9 . _ -")]
    BadId,
    #[error("the secret of pass key {id:?} has {len} bytes; at least {SECRET_LEN_MIN} are needed")]
    ShortSecret { id: String, len: usize },
    #[error("pass key id {0:?} is given twice")]
    DuplicateId(String),
}

impl Key {
    /// A key with this id and secret (the secret's bytes as given: for a text secret, its
    /// UTF-8 bytes).
    pub fn new(id: &str, secret: &[u8]) -> Result<Key, KeyError> {
        let id_ok = !id.is_empty()
            && id.len() <= KEY_ID_LEN_MAX
            && id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        if !id_ok {
            return Err(KeyError::BadId);
        }
        if secret.len() < SECRET_LEN_MIN {
            return Err(KeyError::ShortSecret {
                id: id.to_owned(),
                len: secret.len(),
            });
        }
        Ok(Key {
            id: id.to_owned(),
            secret: secret.to_vec(),
        })
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    fn mac(&self) -> Hmac<Sha256> {
        // HMAC takes a key of any length; the error exists only for fixed-key MACs.
        Hmac::<Sha256>::new_from_slice(&self.secret).expect("HMAC accepts any key length")
    }
}

/// `KEY_ID=SECRET`: the id up to the first `=`, the secret (its UTF-8 bytes) after it.
impl FromStr for Key {
    type Err = KeyError;

    fn from_str(text: &str) -> Result<Key, KeyError> {
        let (id, secret) = text.split_once('=').ok_or(KeyError::NoSeparator)?;
        Key::new(id, secret.as_bytes())
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Key")
            .field("id", &self.id)
            .field("secret", &"<hidden>")
            .finish()
    }
}

/// The keys a verifier accepts, by id: during a rotation, the old one and the new one.
#[derive(Debug, Clone, Default)]
pub struct Keys {
    keys: Vec<Key>,
}

impl Keys {
    /// Refuses two keys with one id: which secret a pass names must never be ambiguous.
    pub fn new(keys: impl IntoIterator<Item = Key>) -> Result<Keys, KeyError> {
        let mut held: Vec<Key> = Vec::new();
        for key in keys {
            if held.iter().any(|k| k.id == key.id) {
                return Err(KeyError::DuplicateId(key.id));
            }
            held.push(key);
        }
        Ok(Keys { keys: held })
    }

    fn get(&self, id: &str) -> Option<&Key> {
        self.keys.iter().find(|k| k.id == id)
    }
}

/// Why a pass was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PassError {
    #[error("the pass is not a compact JWS (header.claims.signature): {0}")]
    BadFormat(&'static str),
    #[error("the pass is signed with {0:?}; only HS256 is accepted")]
    WrongAlgorithm(String),
    #[error("the pass names key {0:?}, which this verifier does not hold")]
    UnknownKey(String),
    #[error("the pass's signature does not match its content")]
    BadSignature,
    #[error("the pass's claims are not a seckill pass: {0}")]
    BadClaims(String),
    #[error("the pass expired at {expires_at_s} (now {now_s}, seconds since the Unix epoch)")]
    Expired { expires_at_s: u64, now_s: u64 },
}

/// The JOSE header a pass is signed with, fields in this order.
#[derive(Serialize)]
struct HeaderOut<'a> {
    alg: &'static str,
    typ: &'static str,
    kid: &'a str,
}

/// The JOSE header as read: only what decides how to verify.
#[derive(Deserialize)]
struct HeaderIn {
    alg: String,
    #[serde(default)]
    typ: Option<String>,
    #[serde(default)]
    kid: Option<String>,
    /// Extensions the signer says a verifier must understand: this one understands none.
    #[serde(default)]
    crit: Option<serde::de::IgnoredAny>,
}

/// Signs `pass` with `key`: `base64url(header).base64url(claims).base64url(HMAC-SHA256)`.
pub fn sign(pass: &Pass, key: &Key) -> String {
    let header = HeaderOut {
        alg: ALGORITHM,
        typ: "JWT",
        kid: &key.id,
    };
    // Strings and integers only: serialising them cannot fail.
    let header = serde_json::to_vec(&header).expect("a pass header serialises");
    let claims = serde_json::to_vec(pass).expect("a pass serialises");
    let mut token = URL_SAFE_NO_PAD.encode(header);
    token.push('.');
    token.push_str(&URL_SAFE_NO_PAD.encode(claims));
    let mut mac = key.mac();
    mac.update(token.as_bytes());
    let signature = mac.finalize().into_bytes();
    token.push('.');
    token.push_str(&URL_SAFE_NO_PAD.encode(signature));
    token
}

/// Verifies `token` with the key its header names and returns what it says; refused when it
/// is malformed, names another algorithm (`none` included) or a key not in `keys`, its
/// signature does not match (compared in constant time), or `now_s` (seconds since the Unix
/// epoch) is at or after its `exp`. To allow for clock skew, pass `now_s` less the skew.
/// The claims are read only once the signature has matched.
pub fn verify(token: &str, keys: &Keys, now_s: u64) -> Result<Pass, PassError> {
    if token.len() > TOKEN_LEN_MAX {
        return Err(PassError::BadFormat("longer than 4096 bytes"));
    }
    let mut parts = token.split('.');
    let (Some(header_b64), Some(claims_b64), Some(signature_b64), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(PassError::BadFormat("not three dot-separated parts"));
    };
    let header = URL_SAFE_NO_PAD
        .decode(header_b64)
        .map_err(|_| PassError::BadFormat("the header is not base64url"))?;
    let header: HeaderIn = serde_json::from_slice(&header)
        .map_err(|_| PassError::BadFormat("the header is not a JOSE header"))?;
    if header.alg != ALGORITHM {
        return Err(PassError::WrongAlgorithm(header.alg));
    }
    if header.crit.is_some() {
        return Err(PassError::BadFormat("the header has critical extensions"));
    }
    if header
        .typ
        .is_some_and(|typ| !typ.eq_ignore_ascii_case("JWT"))
    {
        return Err(PassError::BadFormat("the header's typ is not JWT"));
    }
    let kid = header
        .kid
        .ok_or(PassError::BadFormat("the header names no key (kid)"))?;
    let key = keys.get(&kid).ok_or(PassError::UnknownKey(kid))?;
    let signature = URL_SAFE_NO_PAD
        .decode(signature_b64)
        .map_err(|_| PassError::BadFormat("the signature is not base64url"))?;
    let mut mac = key.mac();
    mac.update(header_b64.as_bytes());
    mac.update(b".");
    mac.update(claims_b64.as_bytes());
    mac.verify_slice(&signature)
        .map_err(|_| PassError::BadSignature)?;
    let claims = URL_SAFE_NO_PAD
        .decode(claims_b64)
        .map_err(|_| PassError::BadFormat("the claims are not base64url"))?;
    let pass: Pass =
        serde_json::from_slice(&claims).map_err(|e| PassError::BadClaims(e.to_string()))?;
    if now_s >= pass.expires_at_s {
        return Err(PassError::Expired {
            expires_at_s: pass.expires_at_s,
            now_s,
        });
    }
    Ok(pass)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    const NOW: u64 = 1_700_000_000;
    const SECRET: &str = "0123456789abcdef0123456789abcdef";
    const OTHER_SECRET: &str = "fedcba9876543210fedcba9876543210";

    fn key(id: &str, secret: &str) -> Key {
        Key::new(id, secret.as_bytes()).unwrap()
    }

    fn keys() -> Keys {
        Keys::new([key("k1", SECRET)]).unwrap()
    }

    fn pass() -> Pass {
        Pass {
            order_id: "sku-1.3.17".into(),
            goods_id: "sku-1".into(),
            user_id: "u-42".into(),
            quantity: 2,
            issued_at_s: NOW,
            expires_at_s: NOW + 900,
        }
    }

    fn parts(token: &str) -> Vec<String> {
        token.split('.').map(str::to_owned).collect()
    }

    fn decode(part: &str) -> Value {
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(part).unwrap()).unwrap()
    }

    fn encode(value: &Value) -> String {
        URL_SAFE_NO_PAD.encode(serde_json::to_vec(value).unwrap())
    }

    /// A token with this header and these claims, signed (HS256) with `secret` whatever the
    /// header says: what a forger who knows or guesses a secret can make.
    fn forge(header: &Value, claims: &Value, secret: &str) -> String {
        let signed = format!("{}.{}", encode(header), encode(claims));
        let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
        mac.update(signed.as_bytes());
        let signature = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
        format!("{signed}.{signature}")
    }

    #[test]
    fn a_signed_pass_verifies_and_reads_back() {
        let token = sign(&pass(), &key("k1", SECRET));
        assert_eq!(verify(&token, &keys(), NOW), Ok(pass()));
        assert_eq!(verify(&token, &keys(), NOW + 899), Ok(pass()));
        let p = parts(&token);
        assert_eq!(
            decode(&p[0]),
            json!({"alg": "HS256", "typ": "JWT", "kid": "k1"})
        );
        assert_eq!(
            decode(&p[1]),
            json!({"order_id": "sku-1.3.17", "goods_id": "sku-1", "sub": "u-42",
                   "quantity": 2, "iat": NOW, "exp": NOW + 900})
        );
        // Header-safe: base64url and dots only.
        assert!(token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.')));
    }

    #[test]
    fn a_pass_signed_with_another_secret_is_refused() {
        let forged = sign(&pass(), &key("k1", OTHER_SECRET));
        assert_eq!(verify(&forged, &keys(), NOW), Err(PassError::BadSignature));
        // A signature flipped in one bit, or cut short, or missing.
        let token = sign(&pass(), &key("k1", SECRET));
        let p = parts(&token);
        let mut signature = URL_SAFE_NO_PAD.decode(&p[2]).unwrap();
        signature[31] ^= 1;
        let flipped = format!("{}.{}.{}", p[0], p[1], URL_SAFE_NO_PAD.encode(&signature));
        assert_eq!(verify(&flipped, &keys(), NOW), Err(PassError::BadSignature));
        let short = format!(
            "{}.{}.{}",
            p[0],
            p[1],
            URL_SAFE_NO_PAD.encode(&signature[..16])
        );
        assert_eq!(verify(&short, &keys(), NOW), Err(PassError::BadSignature));
        let empty = format!("{}.{}.", p[0], p[1]);
        assert_eq!(verify(&empty, &keys(), NOW), Err(PassError::BadSignature));
    }

    #[test]
    fn every_altered_claim_is_refused() {
        let token = sign(&pass(), &key("k1", SECRET));
        let p = parts(&token);
        let claims = decode(&p[1]);
        for (name, value) in [
            ("order_id", json!("sku-1.3.18")),
            ("goods_id", json!("sku-2")),
            ("sub", json!("u-43")),
            ("quantity", json!(5)),
            ("exp", json!(NOW + 86_400)),
            ("iat", json!(NOW + 1)),
        ] {
            let mut altered = claims.clone();
            altered[name] = value;
            let token = format!("{}.{}.{}", p[0], encode(&altered), p[2]);
            assert_eq!(
                verify(&token, &keys(), NOW),
                Err(PassError::BadSignature),
                "{name}"
            );
        }
        // The header too: another key id, even one the verifier holds, breaks the signature.
        let both = Keys::new([key("k1", SECRET), key("k2", SECRET)]).unwrap();
        let header = encode(&json!({"alg": "HS256", "typ": "JWT", "kid": "k2"}));
        let token = format!("{header}.{}.{}", p[1], p[2]);
        assert_eq!(verify(&token, &both, NOW), Err(PassError::BadSignature));
    }

    #[test]
    fn an_expired_pass_is_refused() {
        let token = sign(&pass(), &key("k1", SECRET));
        let expired = Err(PassError::Expired {
            expires_at_s: NOW + 900,
            now_s: NOW + 900,
        });
        assert_eq!(verify(&token, &keys(), NOW + 900), expired);
        assert!(matches!(
            verify(&token, &keys(), u64::MAX),
            Err(PassError::Expired { .. })
        ));
        // Checked only once the signature matched: a forged pass is a bad signature,
        // however old.
        let forged = sign(&pass(), &key("k1", OTHER_SECRET));
        assert_eq!(
            verify(&forged, &keys(), NOW + 900),
            Err(PassError::BadSignature)
        );
    }

    #[test]
    fn an_unknown_key_is_refused() {
        let token = sign(&pass(), &key("k9", SECRET));
        assert_eq!(
            verify(&token, &keys(), NOW),
            Err(PassError::UnknownKey("k9".into()))
        );
        let claims = decode(&parts(&token)[1]);
        let no_kid = forge(&json!({"alg": "HS256", "typ": "JWT"}), &claims, SECRET);
        assert!(matches!(
            verify(&no_kid, &keys(), NOW),
            Err(PassError::BadFormat(_))
        ));
    }

    #[test]
    fn only_hs256_is_accepted() {
        let claims = decode(&parts(&sign(&pass(), &key("k1", SECRET)))[1]);
        // `none`: no signature at all, the classic downgrade.
        let unsigned = format!(
            "{}.{}.",
            encode(&json!({"alg": "none", "typ": "JWT", "kid": "k1"})),
            encode(&claims)
        );
        assert_eq!(
            verify(&unsigned, &keys(), NOW),
            Err(PassError::WrongAlgorithm("none".into()))
        );
        for alg in ["HS512", "RS256", "hs256", "HS256 ", ""] {
            let header = json!({"alg": alg, "typ": "JWT", "kid": "k1"});
            // Even with a signature made with the right secret.
            let token = forge(&header, &claims, SECRET);
            assert_eq!(
                verify(&token, &keys(), NOW),
                Err(PassError::WrongAlgorithm(alg.into())),
                "{alg}"
            );
        }
        let critical = json!({"alg": "HS256", "kid": "k1", "crit": ["b64"], "b64": false});
        let token = forge(&critical, &claims, SECRET);
        assert!(matches!(
            verify(&token, &keys(), NOW),
            Err(PassError::BadFormat(_))
        ));
        let other_typ = json!({"alg": "HS256", "typ": "at+jwt", "kid": "k1"});
        let token = forge(&other_typ, &claims, SECRET);
        assert!(matches!(
            verify(&token, &keys(), NOW),
            Err(PassError::BadFormat(_))
        ));
    }

    #[test]
    fn garbage_is_refused_with_a_reason() {
        let token = sign(&pass(), &key("k1", SECRET));
        let p = parts(&token);
        for bad in [
            String::new(),
            "not a token".into(),
            "a.b".into(),
            format!("{token}.x"),
            format!("{}.{}", p[0], p[1]),
            format!("%%%.{}.{}", p[1], p[2]),
            format!("{}.{}.{}=", p[0], p[1], p[2]),
            format!("{}.{}.{}", encode(&json!([1, 2])), p[1], p[2]),
            format!("{}.{}.{}", URL_SAFE_NO_PAD.encode(b"\xff"), p[1], p[2]),
            "x".repeat(TOKEN_LEN_MAX + 1),
        ] {
            assert!(
                matches!(verify(&bad, &keys(), NOW), Err(PassError::BadFormat(_))),
                "{bad:?}: {:?}",
                verify(&bad, &keys(), NOW)
            );
        }
        // Signed with the right key, but not a pass: refused after the signature.
        let header = json!({"alg": "HS256", "typ": "JWT", "kid": "k1"});
        for claims in [
            json!({"sub": "u-42", "exp": NOW + 900}),
            json!({"order_id": "o", "goods_id": "g", "sub": "u", "quantity": -1,
                   "iat": NOW, "exp": NOW + 900}),
            json!({"order_id": "o", "goods_id": "g", "sub": "u", "quantity": 1,
                   "iat": NOW, "exp": "tomorrow"}),
            json!("a string"),
        ] {
            let token = forge(&header, &claims, SECRET);
            assert!(
                matches!(verify(&token, &keys(), NOW), Err(PassError::BadClaims(_))),
                "{claims}"
            );
        }
        // Claims a later signer may add are tolerated.
        let mut more = decode(&p[1]);
        more["epoch"] = json!(3);
        let token = forge(&header, &more, SECRET);
        assert_eq!(verify(&token, &keys(), NOW), Ok(pass()));
    }

    #[test]
    fn rotation_verifies_old_and_new_keys_side_by_side() {
        let old = key("2024-a", SECRET);
        let new = key("2024-b", OTHER_SECRET);
        let before = sign(&pass(), &old);
        let after = sign(&pass(), &new);
        // Step 1: verifiers take the new key beside the old one; both passes verify.
        let both = Keys::new([old.clone(), new.clone()]).unwrap();
        assert_eq!(verify(&before, &both, NOW), Ok(pass()));
        assert_eq!(verify(&after, &both, NOW), Ok(pass()));
        // Step 3: the old key removed, its passes are refused by name.
        let only_new = Keys::new([new.clone()]).unwrap();
        assert_eq!(verify(&after, &only_new, NOW), Ok(pass()));
        assert_eq!(
            verify(&before, &only_new, NOW),
            Err(PassError::UnknownKey("2024-a".into()))
        );
        assert_eq!(
            Keys::new([old, new.clone(), new]).unwrap_err(),
            KeyError::DuplicateId("2024-b".into())
        );
    }

    #[test]
    fn keys_are_checked_and_never_shown() {
        let parsed: Key = format!("k-1.a_b={SECRET}=").parse().unwrap();
        assert_eq!(parsed.id(), "k-1.a_b");
        assert_eq!(parsed.secret, format!("{SECRET}=").into_bytes());
        assert!(!format!("{parsed:?}").contains(SECRET));
        assert_eq!("k1".parse::<Key>().unwrap_err(), KeyError::NoSeparator);
        for id in ["", "k 1", "k=1", "k/1", &"k".repeat(KEY_ID_LEN_MAX + 1)] {
            assert_eq!(
                Key::new(id, SECRET.as_bytes()).unwrap_err(),
                KeyError::BadId,
                "{id:?}"
            );
        }
        let short = "k1=0123456789".parse::<Key>().unwrap_err();
        assert_eq!(
            short,
            KeyError::ShortSecret {
                id: "k1".into(),
                len: 10
            }
        );
        assert!(!short.to_string().contains("0123456789"));
        assert!("k1=".parse::<Key>().is_err());
    }

    #[test]
    fn a_standard_jwt_library_agrees() {
        use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
        // What we sign, it verifies and reads (with a live `exp`: it checks the real clock).
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_required_spec_claims(&["exp", "sub"]);
        validation.leeway = 0;
        let mut live = pass();
        live.expires_at_s = 4_000_000_000; // in 2096
        let token = sign(&live, &key("k1", SECRET));
        let read = jsonwebtoken::decode::<Pass>(
            &token,
            &DecodingKey::from_secret(SECRET.as_bytes()),
            &validation,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(read.header.kid.as_deref(), Some("k1"));
        assert_eq!(read.claims, live);
        // What it signs, we verify.
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some("k1".into());
        let theirs = jsonwebtoken::encode(
            &header,
            &pass(),
            &EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap();
        assert_eq!(verify(&theirs, &keys(), NOW), Ok(pass()));
        assert_eq!(
            verify(&theirs, &keys(), NOW + 900),
            Err(PassError::Expired {
                expires_at_s: NOW + 900,
                now_s: NOW + 900
            })
        );
    }
}
