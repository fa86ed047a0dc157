//! The deploy examples a user copies, each checked as shipped: the Envoy configurations in
//! `envoy/` validate by the command their own header gives;
//! production.yaml takes the buyer from a verified token only (jwt_authn); limits change on a
//! live Envoy through the filter's discovered configuration (ECDS); and a `deduct.cluster`
//! that names no cluster of Envoy's is said plainly.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use seckill_e2e::deduct_stub::DeductStub;
use seckill_e2e::envoy::{filter_wasm, Envoy, LOCAL_TEMPLATE};
use seckill_e2e::process::{wait_for, Scratch};
use seckill_e2e::shipped::{self, WITH_ETC_ENVOY};
use seckill_e2e::shop::ShopStub;
use seckill_e2e::stack::{
    default_plugin_config, now_ms, send, BuyResult, Stack, StackOptions, EDGE_SECRET,
};
use serde::Deserialize as _;
use serde_json::json;

/// `envoy --mode validate` on a shipped config, exactly as its header says, from a checkout:
/// the header's `scripts/with-etc-envoy.sh envoy --mode validate -c FILE` line must be its
/// plain `envoy --mode validate -c FILE` line run where `/etc/envoy` is staged.
fn validates_as_its_header_says(path: &str) {
    let validate = ["envoy", "--mode", "validate"];
    let plain = shipped::header_command(path, &validate).unwrap();
    assert_eq!(plain[3..], ["-c".to_owned(), path.to_owned()], "{plain:?}");
    let staged = shipped::header_command(path, &[WITH_ETC_ENVOY]).unwrap();
    assert_eq!(
        staged[1..],
        plain[..],
        "the staged command is the plain one"
    );
    let ran = shipped::run_from_root(&staged).unwrap();
    assert!(
        ran.ok && ran.output.contains(&format!("configuration '{path}' OK")),
        "{path} does not validate as its header says:\n{}",
        ran.output
    );
}

#[test]
fn production_config_validates_as_shipped() {
    validates_as_its_header_says("envoy/production.yaml");
}

#[test]
fn ecds_config_validates_as_shipped() {
    validates_as_its_header_says("envoy/ecds.yaml");
}

#[test]
fn validation_runs_the_filters_own_configuration_check() {
    // A copy with one plugin-config value broken: Envoy's validation loads the filter, whose
    // on_configure must refuse it with its own line.
    let scratch = Scratch::new("validate-broken").unwrap();
    let shipped = shipped::read("envoy/production.yaml").unwrap();
    let broken = shipped::replace_each(&shipped, &[("\"max\": 2", "\"max\": 0".into())]).unwrap();
    let path = scratch.path.join("broken.yaml");
    std::fs::write(&path, broken).unwrap();
    let ran = shipped::validate_staged(&path).unwrap();
    assert!(!ran.ok, "{}", ran.output);
    assert!(
        ran.output
            .contains("seckill-filter: bad plugin configuration: quantity.max: must be from 1"),
        "{}",
        ran.output
    );
}

/// One purchase at the shipped configurations' sale route, with these headers.
async fn buy_at(envoy: &Envoy, goods: &str, headers: &[(&str, &str)]) -> BuyResult {
    let mut request = reqwest::Client::new()
        .post(format!("{}/api/seckill/{goods}/buy", envoy.url()))
        .header(
            "x-request-id",
            format!("r-{}", seckill_e2e::process::unique_suffix()),
        );
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    send(request).await.unwrap()
}

// --- production.yaml's buyer authentication: jwt_authn and the gate, on real Envoy ---

/// The identity provider production.yaml trusts, as its `jwt_authn` provider names it.
const ISSUER: &str = "https://id.shop.example";
const AUDIENCE: &str = "seckill-gate";
/// This test's identity provider: the signing key of every token it makes. The shipped file
/// carries another key, whose private half nobody has; the test puts this one's JWKS there.
const SIGNING_KEY_PEM: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgFxyte1GN2w093bxM
aem8cmMpNbdSZZyF4XAcUaRpsVWhRANCAAQYJ8x9SsG+lkqDIU7Ppumngz5/Uuoc
mhu5W6QWre6p3AoyUYRZnoFrqN6rU5RamQGbGiQFMZQmYGfpHeg5cnTj
-----END PRIVATE KEY-----
";
const KEY_ID: &str = "seckill-test";

struct IdentityProvider {
    key: jsonwebtoken::EncodingKey,
}

impl IdentityProvider {
    fn new() -> Self {
        let key = jsonwebtoken::EncodingKey::from_ec_pem(SIGNING_KEY_PEM.as_bytes()).unwrap();
        IdentityProvider { key }
    }

    /// The public keys, as `local_jwks.inline_string` takes them.
    fn jwks(&self) -> String {
        let algorithm = jsonwebtoken::Algorithm::ES256;
        let mut jwk = jsonwebtoken::jwk::Jwk::from_encoding_key(&self.key, algorithm).unwrap();
        jwk.common.key_id = Some(KEY_ID.to_owned());
        json!({ "keys": [jwk] }).to_string()
    }

    /// A token with these claims (plus issuer, audience and an expiry an hour ahead).
    fn token(&self, claims: serde_json::Value) -> String {
        let mut all = json!({
            "iss": ISSUER,
            "aud": AUDIENCE,
            "exp": now_ms() / 1000 + 3600,
        });
        if let (Some(all), Some(claims)) = (all.as_object_mut(), claims.as_object()) {
            all.extend(claims.clone());
        }
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
        header.kid = Some(KEY_ID.to_owned());
        jsonwebtoken::encode(&header, &all, &self.key).unwrap()
    }

    fn buyer_token(&self, user: &str) -> String {
        self.token(json!({ "sub": user }))
    }
}

/// `envoy/production.yaml` as shipped, but on free ports, with this stack's shop and syncer,
/// the built filter and the test's identity provider (the harness gives Envoy the edge
/// credential in its environment, as production.yaml's host_env_keys expects).
fn production_on(stack: &Stack, idp: &IdentityProvider) -> String {
    let text = shipped::read("envoy/production.yaml").unwrap();
    let jwks_line = text
        .lines()
        .find(|line| line.trim_start().starts_with("inline_string: '{\"keys\""))
        .expect("production.yaml has an inline JWKS");
    let shipped_jwks = jwks_line.trim_start().trim_start_matches("inline_string: ");
    let syncer_port = stack.syncer().unwrap().port;
    let mut replacements = shipped::local_addresses(stack.shop.addr.port(), syncer_port);
    replacements.extend([
        shipped::built_filter().unwrap(),
        (shipped_jwks, format!("'{}'", idp.jwks())),
    ]);
    shipped::replace_each(&text, &replacements).unwrap()
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

/// The deduct calls Envoy made to the syncer (health checks are not requests).
async fn syncer_requests(envoy: &Envoy) -> u64 {
    envoy
        .cluster_stat("seckill_syncer", "envoy_cluster_upstream_rq_total")
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn production_takes_the_buyer_from_a_verified_token_only() {
    let stack = Stack::start(StackOptions::new("jwt")).await.unwrap();
    stack.open_sale("sku-1", 10, 1).await.unwrap();
    let idp = IdentityProvider::new();
    let gate = Envoy::start_config(&stack.scratch.path, &production_on(&stack, &idp), 1)
        .await
        .unwrap();
    let before = stack.redis_snapshot().await.unwrap();

    // No token, or a token whose signature does not hold (alice's, its payload changed to
    // say bob): 401 from jwt_authn, whatever x-user-id says; the syncer is never asked.
    let no_token = buy_at(&gate, "sku-1", &[("x-user-id", "bob")]).await;
    assert_eq!(no_token.status, 401, "{no_token:?}");
    let alice = idp.buyer_token("alice");
    let bob_claims = URL_SAFE_NO_PAD.encode(
        json!({"iss": ISSUER, "aud": AUDIENCE, "sub": "bob", "exp": now_ms() / 1000 + 3600})
            .to_string(),
    );
    let mut parts: Vec<&str> = alice.split('.').collect();
    parts[1] = &bob_claims;
    let forged = parts.join(".");
    let bad_signature = buy_at(&gate, "sku-1", &[("authorization", &bearer(&forged))]).await;
    assert_eq!(bad_signature.status, 401, "{bad_signature:?}");
    // A valid token that names nobody: jwt_authn removed the client's x-user-id all the
    // same, so the gate finds no buyer and says so, without a call.
    let nobody = idp.token(json!({ "email": "someone@example.com" }));
    let no_claim = buy_at(
        &gate,
        "sku-1",
        &[("authorization", &bearer(&nobody)), ("x-user-id", "bob")],
    )
    .await;
    assert_eq!(
        (no_claim.status, no_claim.outcome.as_str()),
        (400, "bad_request"),
        "{no_claim:?}"
    );
    assert_eq!(
        syncer_requests(&gate).await,
        0,
        "the syncer was never called"
    );
    assert_eq!(
        stack.redis_snapshot().await.unwrap(),
        before,
        "nothing was deducted"
    );
    assert!(stack.shop.seen().is_empty(), "nothing reached the shop");

    // A valid token: the buyer is the token's subject, and the shop sees that buyer.
    let won = buy_at(&gate, "sku-1", &[("authorization", &bearer(&alice))]).await;
    assert_eq!((won.status, won.outcome.as_str()), (200, "won"), "{won:?}");
    let seen = stack.shop.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].header("x-seckill-user-id"), Some("alice"));

    // Alice's token with a forged x-user-id of bob: counted as alice, who already holds her
    // one unit (per-buyer limit 1), so she is refused; bob's allowance is untouched.
    let spoofed = buy_at(
        &gate,
        "sku-1",
        &[("authorization", &bearer(&alice)), ("x-user-id", "bob")],
    )
    .await;
    assert_eq!(
        (spoofed.status, spoofed.outcome.as_str()),
        (409, "duplicate"),
        "{spoofed:?}"
    );
    let bob = buy_at(
        &gate,
        "sku-1",
        &[("authorization", &bearer(&idp.buyer_token("bob")))],
    )
    .await;
    assert_eq!((bob.status, bob.outcome.as_str()), (200, "won"), "{bob:?}");
    let users: Vec<Option<String>> = stack
        .shop
        .seen()
        .iter()
        .map(|s| s.header("x-seckill-user-id").map(str::to_owned))
        .collect();
    assert_eq!(users, [Some("alice".to_owned()), Some("bob".to_owned())]);
}

// --- ecds.yaml: the gate's limits changed on a live Envoy ---

const ECDS_RESOURCE: &str = "envoy/ecds/seckill.yaml";
/// The shipped per-goods limit, as an operator edits it in the file.
const SHIPPED_SKU_1_LIMIT: &str = r#""sku-1": { "per_second": 500, "burst": 50 }"#;

/// `envoy/ecds.yaml` on free ports, watching `dir` for its filter configuration.
fn ecds_on(dir: &Path, shop_port: u16, syncer_port: u16) -> String {
    let text = shipped::read("envoy/ecds.yaml").unwrap();
    let resource = dir.join("seckill.yaml");
    let mut replacements = shipped::local_addresses(shop_port, syncer_port);
    replacements.extend([
        (
            "path: /etc/envoy/ecds/seckill.yaml",
            format!("path: {}", resource.display()),
        ),
        (
            "watched_directory: { path: /etc/envoy/ecds }",
            format!("watched_directory: {{ path: {} }}", dir.display()),
        ),
    ]);
    shipped::replace_each(&text, &replacements).unwrap()
}

/// The shipped filter configuration with the built filter and `sku-1`'s limit replaced.
fn ecds_resource(sku_1_limit: &str) -> String {
    let text = shipped::read(ECDS_RESOURCE).unwrap();
    let replacements = [
        shipped::built_filter().unwrap(),
        (SHIPPED_SKU_1_LIMIT, sku_1_limit.to_owned()),
    ];
    shipped::replace_each(&text, &replacements).unwrap()
}

/// As the file's header tells the operator: the whole new file written beside it, then
/// renamed over it.
fn replace_file(path: &Path, text: &str) {
    let next = path.with_file_name(".seckill.yaml.next");
    std::fs::write(&next, text).unwrap();
    std::fs::rename(&next, path).unwrap();
}

/// 30 purchases of `sku-1` at once, by 30 buyers: how many the rate limit refused, and how
/// many won.
async fn crowd(envoy: &Envoy) -> (usize, usize) {
    let results = futures::future::join_all((0..30).map(|i| {
        let user = format!("u{i}-{}", seckill_e2e::process::unique_suffix());
        async move { buy_at(envoy, "sku-1", &[("x-user-id", user.as_str())]).await }
    }))
    .await;
    let refused = results
        .iter()
        .filter(|r| r.outcome == "rate_limited")
        .count();
    let won = results.iter().filter(|r| r.outcome == "won").count();
    assert_eq!(refused + won, results.len(), "{results:?}");
    (refused, won)
}

async fn ecds_stat(envoy: &Envoy, name: &str) -> u64 {
    let family = format!("envoy_extension_config_discovery_http_filter_seckill_{name}");
    envoy.stat(&family).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ecds_changes_a_limit_on_a_live_envoy_and_refuses_a_bad_one() {
    let scratch = Scratch::new("ecds").unwrap();
    let dir = scratch.path.join("ecds");
    std::fs::create_dir_all(&dir).unwrap();
    // Rate limits are the edge's own decision: a stub that lets every attempt win shows
    // them without a stock service in the way.
    let shop = ShopStub::start().await.unwrap();
    let syncer = DeductStub::start().await.unwrap();
    let resource = dir.join("seckill.yaml");
    // The shipped configuration (sku-1 at 500/s): Envoy starts on it, so the filter took it.
    std::fs::write(&resource, ecds_resource(SHIPPED_SKU_1_LIMIT)).unwrap();
    let config = ecds_on(&dir, shop.addr.port(), syncer.addr.port());
    let envoy = Envoy::start_config(&scratch.path, &config, 1)
        .await
        .unwrap();
    assert_eq!(ecds_stat(&envoy, "update_success").await, 1);
    let pid = envoy.pid();

    // Down to 5 a second: most of a crowd of 30 is refused.
    replace_file(
        &resource,
        &ecds_resource(r#""sku-1": { "per_second": 5, "burst": 5 }"#),
    );
    wait_for("the 5/s limit", Duration::from_secs(20), || async {
        let (refused, won) = crowd(&envoy).await;
        Ok((refused >= 20 && won <= 10).then_some(()))
    })
    .await
    .unwrap();
    assert_eq!(ecds_stat(&envoy, "update_success").await, 2);

    // Up to 1000 a second: the whole crowd wins.
    replace_file(
        &resource,
        &ecds_resource(r#""sku-1": { "per_second": 1000, "burst": 1000 }"#),
    );
    wait_for("the 1000/s limit", Duration::from_secs(20), || async {
        let (refused, _) = crowd(&envoy).await;
        Ok((refused == 0).then_some(()))
    })
    .await
    .unwrap();
    assert_eq!(ecds_stat(&envoy, "update_success").await, 3);

    // A configuration the filter refuses (5/s again, with a misspelt field): Envoy keeps the
    // one it has, and its log says why in the filter's own words.
    let bad = ecds_resource(r#""sku-1": { "per_second": 5, "burst": 5, "brust": 5 }"#);
    replace_file(&resource, &bad);
    wait_for(
        "the bad configuration's refusal",
        Duration::from_secs(20),
        || async { Ok((ecds_stat(&envoy, "update_rejected").await == 1).then_some(())) },
    )
    .await
    .unwrap();
    assert!(
        envoy.log().contains(
            "seckill-filter: bad plugin configuration: rate_limit.goods.sku-1.brust: unknown field `brust`"
        ),
        "{}",
        envoy.log()
    );
    assert_eq!(
        crowd(&envoy).await,
        (0, 30),
        "the 1000/s limit stays in force"
    );
    assert_eq!(ecds_stat(&envoy, "update_success").await, 3);
    assert_eq!(
        envoy.pid(),
        pid,
        "one Envoy process throughout, never restarted"
    );
}

// --- deduct.cluster that names no cluster of this Envoy ---

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mistyped_deduct_cluster_is_named_in_the_log_and_buyers_get_a_clear_503() {
    let scratch = Scratch::new("cluster-typo").unwrap();
    let shop = ShopStub::start().await.unwrap();
    let syncer = DeductStub::start().await.unwrap();
    // Envoy's cluster is `seckill_syncer`; the plugin configuration misspells it. Neither
    // `envoy --mode validate` nor the filter's on_configure can tell (proxy-wasm cannot list
    // clusters): Envoy starts, and the first call is where it shows.
    let mut plugin_config = default_plugin_config();
    plugin_config["deduct"]["cluster"] = json!("seckill_syncr");
    let values = HashMap::from([
        ("SHOP_PORT", shop.addr.port().to_string()),
        ("SHOP_TIMEOUT", "5s".to_owned()),
        ("SYNCER_PORT", syncer.addr.port().to_string()),
        ("WASM_PATH", filter_wasm().unwrap().display().to_string()),
        (
            "PLUGIN_CONFIG",
            serde_json::to_string(&plugin_config.to_string()).unwrap(),
        ),
    ]);
    let envoy = Envoy::start(&scratch.path, LOCAL_TEMPLATE, values, 1)
        .await
        .unwrap();
    let client = reqwest::Client::new();
    for i in 0..5 {
        let request = client
            .post(format!("{}/seckill/sku-1/buy", envoy.url()))
            .header("x-user-id", format!("u{i}"))
            .header("x-request-id", format!("r{i}"));
        let r = send(request).await.unwrap();
        assert_eq!(
            (r.status, r.outcome.as_str()),
            (503, "unavailable"),
            "{r:?}"
        );
        assert_eq!(
            r.body["message"],
            "this gateway is misconfigured and cannot reach the stock service; nothing was reserved; try again later"
        );
        assert_eq!(r.body["request_id"], format!("r{i}"));
        assert_eq!(r.retry_after.as_deref(), Some("10"));
    }
    // Said once, at error level, naming the cluster; not once per buyer.
    let log = envoy.log();
    let line = "seckill-filter: deduct.cluster \"seckill_syncr\" is not a cluster of this Envoy";
    let said: Vec<&str> = log.lines().filter(|l| l.contains(line)).collect();
    assert_eq!(said.len(), 1, "{log}");
    assert!(said[0].contains("[error]"), "{}", said[0]);
    assert!(
        said[0].contains("failure mode closed: answering 503"),
        "{}",
        said[0]
    );
    assert_eq!(syncer.attempts(), 0, "no call went anywhere");
    assert!(shop.seen().is_empty(), "nobody reached the shop ungated");
}

// --- deploy/istio: the WasmPlugin example, checked by structure and the filter's parser ---

const ISTIO_EXAMPLE: &str = "deploy/istio/seckill-gate.yaml";

/// Every document of a multi-document YAML file, as JSON values.
fn yaml_documents(text: &str) -> Vec<serde_json::Value> {
    serde_yaml::Deserializer::from_str(text)
        .map(|document| {
            let value = serde_yaml::Value::deserialize(document).unwrap();
            serde_json::to_value(value).unwrap()
        })
        .collect()
}

fn the_one<'a>(documents: &'a [serde_json::Value], kind: &str) -> &'a serde_json::Value {
    let found: Vec<_> = documents.iter().filter(|d| d["kind"] == kind).collect();
    assert_eq!(found.len(), 1, "one {kind} in {ISTIO_EXAMPLE}");
    found[0]
}

#[test]
fn istio_wasm_plugin_example_is_well_formed_and_its_config_is_accepted_by_the_filter() {
    let documents = yaml_documents(&shipped::read(ISTIO_EXAMPLE).unwrap());
    let plugin = the_one(&documents, "WasmPlugin");
    assert_eq!(plugin["apiVersion"], "extensions.istio.io/v1alpha1");
    let spec = &plugin["spec"];
    let url = spec["url"].as_str().unwrap();
    let image = url.strip_prefix("oci://").expect("an OCI image reference");
    assert!(
        image.contains(':') || image.contains("@sha256:"),
        "{url}: a tag or a digest"
    );
    assert_eq!(
        spec["phase"], "STATS",
        "after Istio's authentication and authorization"
    );
    assert_eq!(spec["failStrategy"], "FAIL_CLOSE");
    assert_eq!(spec["type"], "HTTP");

    // Istio hands pluginConfig to the filter as JSON: the filter's own parser must take it.
    let plugin_config = spec["pluginConfig"].to_string();
    // Its credential comes from the gateway's environment (never the WasmPlugin, which
    // anyone who may read the resource reads): the variable it names is the one vmConfig
    // passes on from the host.
    let passed: Vec<&str> = spec["vmConfig"]["env"]
        .as_array()
        .expect("vmConfig.env")
        .iter()
        .filter(|v| v["valueFrom"] == "HOST")
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert!(
        !plugin_config.contains("REPLACE"),
        "a credential placeholder in pluginConfig"
    );
    let env = |name: &str| passed.contains(&name).then(|| EDGE_SECRET.to_owned());
    let config =
        seckill_filter::config::Config::from_json_with_env(Some(plugin_config.as_bytes()), &env)
            .unwrap_or_else(|e| panic!("the filter refuses the example's pluginConfig: {e}"));
    assert_eq!(config.deduct.secret, EDGE_SECRET);
    // Istio's name for a Service port's cluster, for the authority's Service.
    let authority = &config.deduct.authority;
    let cluster = &config.deduct.cluster;
    let port = cluster
        .strip_prefix("outbound|")
        .and_then(|rest| rest.strip_suffix(&format!("||{authority}")))
        .unwrap_or_else(|| panic!("{cluster} is not outbound|<port>||{authority}"));
    assert!(port.parse::<u16>().is_ok(), "{cluster}");

    // The buyer id the filter reads is the header Istio fills from a verified token...
    let authentication = the_one(&documents, "RequestAuthentication");
    let claim_headers: Vec<&str> = authentication["spec"]["jwtRules"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|rule| rule["outputClaimToHeaders"].as_array().unwrap())
        .map(|output| output["header"].as_str().unwrap())
        .collect();
    assert_eq!(
        config.user_id,
        seckill_filter::config::Source::Header(claim_headers[0].to_owned())
    );
    assert_eq!(claim_headers.len(), 1);
    // ...and a request without a token is refused on every path the sale route can take.
    let authorization = the_one(&documents, "AuthorizationPolicy");
    let policy = &authorization["spec"];
    assert_eq!(policy["action"], "DENY");
    let rule = &policy["rules"][0];
    assert_eq!(
        rule["from"][0]["source"]["notRequestPrincipals"],
        json!(["*"])
    );
    let denied = rule["to"][0]["operation"]["paths"][0].as_str().unwrap();
    let prefix = denied.strip_suffix('*').expect("a prefix match");
    let template = config.route.template.as_str();
    assert!(
        template.starts_with(prefix) && !prefix[1..].contains('{'),
        "{denied} does not cover {template}"
    );
    for document in [plugin, authentication, authorization] {
        let selector = &document["spec"]["selector"]["matchLabels"];
        assert_eq!(
            *selector, plugin["spec"]["selector"]["matchLabels"],
            "one gateway"
        );
    }
}
