//! Credentials by role, tried as an attacker and as an operator: the filter's credential stays
//! out of Envoy's `/config_dump`; a credential rotates under load with no failed request; a bad
//! rotation is refused whole; `/metrics` and the dashboard take their own credential or a
//! listener of their own. (Which call takes which role's credential: `syncer_api.rs`.)

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use seckill_e2e::mysql_db::TestDatabase;
use seckill_e2e::process::{free_port, unique_suffix, wait_for, Scratch};
use seckill_e2e::redis_server::RedisServer;
use seckill_e2e::stack::{
    Stack, StackOptions, ADMIN_SECRET, EDGE_SECRET, METRICS_SECRET, SHOP_SECRET,
};
use seckill_e2e::syncer::{Role, SyncerArgs, SyncerProcess};

const DEADLINE: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_edge_credential_never_shows_in_envoys_config_dump() {
    let stack = Stack::start(StackOptions::new("creds-dump")).await.unwrap();
    stack.open_sale("g", 5, 1).await.unwrap();
    // The filter did read it: a purchase went through the syncer, which checks it.
    let won = stack.buy("g", "u1", 1, "r1").await.unwrap();
    assert_eq!(
        (won.status, won.outcome.as_str()),
        (200, "won"),
        "{:?}",
        won.body
    );
    let admin = format!("http://127.0.0.1:{}", stack.envoy.admin_port);
    for page in [
        "/config_dump",
        "/config_dump?include_eds",
        "/stats",
        "/clusters",
    ] {
        let text = reqwest::get(format!("{admin}{page}"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(text.len() > 100, "{page} answered almost nothing: {text}");
        assert!(
            !text.contains(EDGE_SECRET),
            "{page} shows the edge credential"
        );
    }
    let dump = reqwest::get(format!("{admin}/config_dump"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    // What the dump does show: the variable's name, in the plugin configuration and vm_config.
    assert!(
        dump.contains("secret_env"),
        "the plugin configuration is missing"
    );
    assert!(
        dump.contains("SECKILL_EDGE_SECRET"),
        "the variable's name is missing"
    );
    assert!(
        !stack.envoy.log().contains(EDGE_SECRET),
        "Envoy's log shows it"
    );
}

/// The files of a `--secrets-dir`, written whole (a rename, as a Kubernetes volume swaps them).
fn write_secret(dir: &Path, role: &str, text: &str) {
    let temporary = dir.join(format!(".{role}.new"));
    std::fs::write(&temporary, text).unwrap();
    std::fs::rename(&temporary, dir.join(role)).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_shop_credential_rotates_under_load_and_no_request_fails() {
    const OLD: &str = "shop-credential-old-0001";
    const NEW: &str = "shop-credential-new-0002";
    let secrets = Scratch::new("creds-rotate-dir").unwrap();
    for (role, value) in [
        ("edge", EDGE_SECRET),
        ("shop", OLD),
        ("admin", ADMIN_SECRET),
        ("metrics", METRICS_SECRET),
    ] {
        write_secret(&secrets.path, role, value);
    }
    let mut options = StackOptions::new("creds-rotate");
    options.syncer_args = vec![
        "--secrets-dir".into(),
        secrets.path.display().to_string(),
        "--secrets-reload-ms".into(),
        "100".into(),
    ];
    let stack = Arc::new(Stack::start(options).await.unwrap());
    stack.open_sale("g", 1_000_000, 1).await.unwrap();
    let syncer_url = stack.syncer().unwrap().url();

    // Buyers through Envoy (the edge credential, read from the directory too) and the shop
    // confirming each winner with whatever shop credential it holds now.
    let shop_value = Arc::new(Mutex::new(OLD));
    let (failures, confirmed, bought) = (
        Arc::new(Mutex::new(Vec::<String>::new())),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    );
    let stop = Arc::new(AtomicBool::new(false));
    let (orders, mut to_confirm) = tokio::sync::mpsc::channel::<String>(10_000);
    let mut load = tokio::task::JoinSet::new();
    for buyer in 0..4 {
        let (stack, failures, bought, stop, orders) = (
            stack.clone(),
            failures.clone(),
            bought.clone(),
            stop.clone(),
            orders.clone(),
        );
        load.spawn(async move {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let (user, request) = (format!("b{buyer}-{i}"), format!("r{buyer}-{i}"));
                match stack.buy("g", &user, 1, &request).await {
                    Ok(r) if r.status == 200 && r.order_id.is_some() => {
                        bought.fetch_add(1, Ordering::Relaxed);
                        let _ = orders.send(r.order_id.unwrap_or_default()).await;
                    }
                    Ok(r) => failures
                        .lock()
                        .unwrap()
                        .push(format!("buy {user}: {} {}", r.status, r.body)),
                    Err(e) => failures.lock().unwrap().push(format!("buy {user}: {e}")),
                }
            }
        });
    }
    drop(orders);
    {
        let (shop_value, failures, confirmed, url, http) = (
            shop_value.clone(),
            failures.clone(),
            confirmed.clone(),
            syncer_url.clone(),
            stack.http.clone(),
        );
        load.spawn(async move {
            while let Some(order) = to_confirm.recv().await {
                let value = *shop_value.lock().unwrap();
                let response = http
                    .post(format!("{url}/v1/orders/{order}/confirm"))
                    .header(seckill_api::SECRET_HEADER, value)
                    .send()
                    .await;
                match response {
                    Ok(r) if r.status() == 200 => {
                        confirmed.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(r) => failures
                        .lock()
                        .unwrap()
                        .push(format!("confirm {order} with {value}: {}", r.status())),
                    Err(e) => failures
                        .lock()
                        .unwrap()
                        .push(format!("confirm {order}: {e}")),
                }
            }
        });
    }
    let confirms_reach = |target: u64| {
        let confirmed = confirmed.clone();
        async move {
            wait_for("confirms under load", DEADLINE, || {
                let done = confirmed.load(Ordering::Relaxed);
                async move { Ok((done >= target).then_some(())) }
            })
            .await
            .unwrap();
        }
    };
    // Whether the syncer takes `value` as the shop's now: a confirm of an order that does not
    // exist is refused for the credential (401) or for the order (404), and changes nothing.
    let takes = |value: &'static str| {
        let (http, url) = (stack.http.clone(), syncer_url.clone());
        async move {
            let response = http
                .post(format!("{url}/v1/orders/g.0.0/confirm"))
                .header(seckill_api::SECRET_HEADER, value)
                .send()
                .await
                .unwrap();
            response.status() != 401
        }
    };
    let until_taken = |value: &'static str, want: bool| {
        let takes = &takes;
        async move {
            wait_for(
                "the syncer to reload its credentials",
                DEADLINE,
                || async move { Ok((takes(value).await == want).then_some(())) },
            )
            .await
            .unwrap();
        }
    };

    confirms_reach(30).await;
    // 1. Both values, while the shop moves over.
    write_secret(&secrets.path, "shop", &format!("{OLD}\n{NEW}\n"));
    until_taken(NEW, true).await;
    assert!(
        takes(OLD).await,
        "the old value must still work while rotating"
    );
    let at_switch = confirmed.load(Ordering::Relaxed);
    *shop_value.lock().unwrap() = NEW;
    confirms_reach(at_switch + 30).await;

    // 2. A botched rotation (the shop's file given the admin's value) is refused whole: the
    // set in force stays, so nobody is locked out and the admin value is no shop credential.
    write_secret(&secrets.path, "shop", ADMIN_SECRET);
    let syncer = stack.syncer().unwrap();
    wait_for("the refused reload to be counted", DEADLINE, || async {
        let metrics = syncer.metrics().await?;
        let refused = seckill_e2e::syncer::sum_metric(
            &metrics
                .lines()
                .filter(|l| l.contains("result=\"refused\""))
                .collect::<Vec<_>>()
                .join("\n"),
            "seckill_credential_reloads_total",
        );
        Ok((refused >= 1).then_some(()))
    })
    .await
    .unwrap();
    assert!(takes(NEW).await && takes(OLD).await);
    assert!(
        !takes(ADMIN_SECRET).await,
        "the admin value became a shop credential"
    );

    // 3. Only the new value.
    write_secret(&secrets.path, "shop", NEW);
    until_taken(OLD, false).await;
    let at_end = confirmed.load(Ordering::Relaxed);
    confirms_reach(at_end + 30).await;

    stop.store(true, Ordering::Relaxed);
    while let Some(joined) = load.join_next().await {
        joined.unwrap();
    }
    let failures = failures.lock().unwrap().clone();
    assert!(
        failures.is_empty(),
        "{} failed: {failures:?}",
        failures.len()
    );
    let (bought, confirmed) = (
        bought.load(Ordering::Relaxed),
        confirmed.load(Ordering::Relaxed),
    );
    assert_eq!(bought, confirmed, "every winner was confirmed");
    assert_eq!(stack.shop.accepted_order_ids().len() as u64, bought);
    let live = stack.live("g").await.unwrap();
    assert_eq!(live["sold"], confirmed, "{live}");
    assert_eq!(live["reserved"], 0, "{live}");
}

/// A syncer `serve` on a private Redis and database, with `env` and `cli` after the harness's.
struct Lone {
    syncer: SyncerProcess,
    _redis: RedisServer,
    _db: TestDatabase,
    scratch: Scratch,
}

impl Lone {
    async fn start(label: &str, env: &[(&str, &str)], cli: &[&str]) -> Lone {
        let scratch = Scratch::new(label).unwrap();
        let redis = RedisServer::start(&scratch.path).await.unwrap();
        let db = TestDatabase::create(label).await.unwrap();
        let prefix = format!("t{}", unique_suffix());
        let args = SyncerArgs {
            redis_url: &redis.url(),
            mysql_url: &db.url(),
            key_prefix: &prefix,
            kafka: None,
        };
        let role = Role::Serve { pipeline: false };
        let syncer = SyncerProcess::start_role_with(&scratch.path, &args, role, env, cli)
            .await
            .unwrap();
        Lone {
            syncer,
            _redis: redis,
            _db: db,
            scratch,
        }
    }
}

async fn get(url: &str, auth: Option<(&str, &str)>) -> (u16, String, Option<String>) {
    let mut request = reqwest::Client::new().get(url);
    if let Some((name, value)) = auth {
        request = request.header(name, value);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let challenge = response
        .headers()
        .get("www-authenticate")
        .map(|v| v.to_str().unwrap().to_owned());
    (status, response.text().await.unwrap(), challenge)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_take_their_own_credential() {
    let lone = Lone::start("creds-metrics", &[], &[]).await;
    let base = lone.syncer.url();
    let bearer = format!("Bearer {METRICS_SECRET}");
    use base64::Engine as _;
    let basic = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("prometheus:{METRICS_SECRET}"))
    );
    for path in ["/metrics", "/dashboard", "/dashboard/data"] {
        let url = format!("{base}{path}");
        let (status, body, challenge) = get(&url, None).await;
        assert_eq!(status, 401, "{path} without a credential: {body}");
        // A browser asks for it.
        assert!(challenge.is_some_and(|c| c.starts_with("Basic")), "{path}");
        for wrong in [EDGE_SECRET, SHOP_SECRET, ADMIN_SECRET] {
            let (status, _, _) =
                get(&url, Some(("authorization", &format!("Bearer {wrong}")))).await;
            assert_eq!(status, 401, "{path} took another role's credential");
        }
        for auth in [bearer.as_str(), basic.as_str()] {
            let (status, body, _) = get(&url, Some(("authorization", auth))).await;
            assert_eq!(status, 200, "{path} with {auth}: {body}");
        }
    }
    let (_, metrics, _) = get(&format!("{base}/metrics"), Some(("authorization", &bearer))).await;
    assert!(metrics.contains("seckill_"), "{metrics}");
    // Health stays open: load balancers probe it.
    assert_eq!(get(&format!("{base}/healthz"), None).await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_can_have_a_listener_of_their_own_and_a_choice_is_required() {
    let port = free_port().unwrap();
    let address = format!("127.0.0.1:{port}");
    // No metrics credential (empty: the role is not configured), a listener of their own.
    let lone = Lone::start(
        "creds-listener",
        &[("SECKILL_METRICS_SECRET", "")],
        &["--metrics-listen", &address],
    )
    .await;
    let (main, metrics) = (lone.syncer.url(), format!("http://{address}"));
    wait_for("the metrics listener", DEADLINE, || async {
        Ok(reqwest::get(format!("{metrics}/healthz"))
            .await
            .ok()
            .map(|_| ()))
    })
    .await
    .unwrap();
    for path in ["/metrics", "/dashboard", "/dashboard/data"] {
        assert_eq!(
            get(&format!("{metrics}{path}"), None).await.0,
            200,
            "{path}"
        );
        assert_eq!(
            get(&format!("{main}{path}"), None).await.0,
            404,
            "{path} on --listen"
        );
    }
    // The API is not on the metrics listener.
    let deduct = reqwest::Client::new()
        .post(format!("{metrics}{}", seckill_api::DEDUCT_PATH))
        .header(seckill_api::SECRET_HEADER, EDGE_SECRET)
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(deduct.status(), 404);

    // Neither a listener nor a credential, nor --metrics-open: refused at start, with the way
    // out in the message.
    let args = SyncerArgs {
        redis_url: "redis://127.0.0.1:1",
        mysql_url: "mysql://nobody@127.0.0.1:1/none",
        key_prefix: "unused",
        kafka: None,
    };
    let (status, log) =
        SyncerProcess::start_refused(&lone.scratch.path, &args, &[("SECKILL_METRICS_SECRET", "")])
            .await
            .unwrap();
    assert!(!status.success());
    assert!(
        log.contains("--metrics-listen") && log.contains("--metrics-open"),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_or_weak_credential_is_refused_at_start() {
    let scratch = Scratch::new("creds-refused").unwrap();
    let args = SyncerArgs {
        redis_url: "redis://127.0.0.1:1",
        mysql_url: "mysql://nobody@127.0.0.1:1/none",
        key_prefix: "unused",
        kafka: None,
    };
    for (env, expected) in [
        (
            ("SECKILL_ADMIN_SECRET", EDGE_SECRET),
            "edge and admin credentials share a value",
        ),
        (("SECKILL_SHOP_SECRET", "short"), "16 to 256"),
        (("SECKILL_EDGE_SECRET", ""), "no edge credential"),
        (
            (
                "SECKILL_EDGE_SECRET",
                "edge-one-0123456789,edge-two-0123456789,edge-3-0123456789",
            ),
            "at most 2",
        ),
    ] {
        let (status, log) = SyncerProcess::start_refused(&scratch.path, &args, &[env])
            .await
            .unwrap();
        assert!(!status.success(), "{env:?}");
        assert!(log.contains(expected), "{env:?}: {log}");
        assert!(
            !log.contains(EDGE_SECRET),
            "a value leaked into the log: {log}"
        );
    }
}
