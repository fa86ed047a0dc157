//! Who may call what: one credential per role, each sent in `x-seckill-secret` (Prometheus's
//! `Authorization` for metrics).
//!
//! Why roles: the gate's credential sits in every Envoy of the fleet, the most exposed place
//! the project has. It may deduct, claim and release (what the gate does) and nothing else: a
//! leaked edge credential cannot define a sale, re-preheat one or confirm an order. The shop
//! confirms and cancels with its own; operators use the admin one; a scraper reads metrics.
//!
//! Why two values per role: rotation without downtime. The syncer accepts the old and the new
//! value while the callers move over, then only the new one. With `--secrets-dir` the values
//! are re-read while the syncer runs (a Kubernetes secret volume updates its files in place),
//! so no restart is needed on this side either.
//!
//! Why no value may serve two roles: a shared value would make the weaker role the stronger.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// What a caller may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// The gate (the wasm filter): deduct, claim, release.
    Edge,
    /// The shop: confirm and cancel orders.
    Shop,
    /// Operators: the admin API (define, preheat, reseed, pause, stop, add stock).
    Admin,
    /// A metrics scraper or a dashboard viewer: `/metrics` and `/dashboard`. Optional.
    Metrics,
}

impl Role {
    pub const ALL: [Role; 4] = [Role::Edge, Role::Shop, Role::Admin, Role::Metrics];

    /// The role's name: its flag (`--{name}-secret`), its file in `--secrets-dir`, its label.
    pub fn name(self) -> &'static str {
        match self {
            Role::Edge => "edge",
            Role::Shop => "shop",
            Role::Admin => "admin",
            Role::Metrics => "metrics",
        }
    }

    /// Whether a syncer cannot serve without this role's credential.
    fn required(self) -> bool {
        self != Role::Metrics
    }
}

/// Values one role accepts at once: the current one and, while rotating, the next.
pub const VALUES_MAX: usize = 2;
/// Shortest value accepted: a guessable credential is no credential.
pub const VALUE_LEN_MIN: usize = 16;
/// Longest value accepted (a header value, compared on every call).
pub const VALUE_LEN_MAX: usize = 256;

/// Every role's accepted values.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    values: HashMap<Role, Vec<Vec<u8>>>,
}

// Never print a value, not even in a debug log.
impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut debug = f.debug_struct("Credentials");
        for role in Role::ALL {
            debug.field(role.name(), &self.count(role));
        }
        debug.finish()
    }
}

impl Credentials {
    /// Builds the set from each role's text (`None`: not given). A text holds one or two
    /// values, separated by commas or newlines (a file may end with a newline).
    pub fn parse(texts: &[(Role, Option<&str>)]) -> Result<Credentials, String> {
        let mut values = HashMap::new();
        for &(role, text) in texts {
            let parsed = match text {
                Some(text) => parse_values(role, text)?,
                None => Vec::new(),
            };
            if parsed.is_empty() && role.required() {
                return Err(format!(
                    "no {0} credential: give --{0}-secret (or SECKILL_{1}_SECRET, or a file \
                     `{0}` in --secrets-dir)",
                    role.name(),
                    role.name().to_uppercase()
                ));
            }
            values.insert(role, parsed);
        }
        for role in Role::ALL {
            if role.required() && !values.contains_key(&role) {
                return Err(format!("no {} credential given", role.name()));
            }
        }
        let credentials = Credentials { values };
        credentials.check_roles_apart()?;
        Ok(credentials)
    }

    fn check_roles_apart(&self) -> Result<(), String> {
        for (i, a) in Role::ALL.iter().enumerate() {
            for b in &Role::ALL[i + 1..] {
                let shared = self
                    .values_of(*a)
                    .iter()
                    .any(|v| self.values_of(*b).contains(v));
                if shared {
                    return Err(format!(
                        "the {} and {} credentials share a value: each role needs its own, \
                         or the weaker role could do what the stronger one does",
                        a.name(),
                        b.name()
                    ));
                }
            }
        }
        Ok(())
    }

    fn values_of(&self, role: Role) -> &[Vec<u8>] {
        self.values
            .get(&role)
            .map(Vec::as_slice)
            .unwrap_or_default()
    }

    /// How many values `role` accepts now (0 for an optional role not configured).
    pub fn count(&self, role: Role) -> usize {
        self.values_of(role).len()
    }

    /// Whether `given` is one of `role`'s values. Every value is compared whole, so the time
    /// taken does not tell which value, or how much of one, matched.
    pub fn allows(&self, role: Role, given: &[u8]) -> bool {
        self.values_of(role)
            .iter()
            .fold(false, |any, value| any | constant_time_eq(given, value))
    }
}

fn parse_values(role: Role, text: &str) -> Result<Vec<Vec<u8>>, String> {
    let values: Vec<&str> = text
        .split([',', '\n'])
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .collect();
    if values.len() > VALUES_MAX {
        return Err(format!(
            "the {} credential has {} values; at most {VALUES_MAX} (the current one and, while \
             rotating, the next)",
            role.name(),
            values.len()
        ));
    }
    let mut parsed = Vec::with_capacity(values.len());
    for value in values {
        if !(VALUE_LEN_MIN..=VALUE_LEN_MAX).contains(&value.len()) {
            return Err(format!(
                "a {} credential value is {} bytes long; it must be {VALUE_LEN_MIN} to \
                 {VALUE_LEN_MAX}",
                role.name(),
                value.len()
            ));
        }
        if !value.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(format!(
                "a {} credential value holds a character that is not printable ASCII (it is \
                 sent as an HTTP header)",
                role.name()
            ));
        }
        parsed.push(value.as_bytes().to_vec());
    }
    Ok(parsed)
}

/// Compares without leaking through timing how many leading bytes matched.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Where the credentials come from.
#[derive(Debug, Clone)]
pub enum Source {
    /// Given at start (flags or environment): fixed for the process's life.
    Fixed(Credentials),
    /// A directory with a file per role (`edge`, `shop`, `admin`, optionally `metrics`),
    /// re-read every `every`.
    Dir { path: PathBuf, every: Duration },
}

/// Reads `dir`'s files into a set (a missing optional file: that role is not configured).
pub fn read_dir(dir: &Path) -> Result<Credentials, String> {
    let mut texts = Vec::new();
    for role in Role::ALL {
        let path = dir.join(role.name());
        match std::fs::read_to_string(&path) {
            Ok(text) => texts.push((role, Some(text))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !role.required() => {
                texts.push((role, None))
            }
            Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
        }
    }
    let borrowed: Vec<(Role, Option<&str>)> =
        texts.iter().map(|(r, t)| (*r, t.as_deref())).collect();
    Credentials::parse(&borrowed)
}

/// The credentials in force, shared by every request and swapped whole on a reload.
#[derive(Debug, Clone)]
pub struct Keyring {
    current: Arc<RwLock<Arc<Credentials>>>,
}

impl Keyring {
    pub fn new(credentials: Credentials) -> Keyring {
        Keyring {
            current: Arc::new(RwLock::new(Arc::new(credentials))),
        }
    }

    /// The set in force now.
    pub fn current(&self) -> Arc<Credentials> {
        match self.current.read() {
            Ok(guard) => guard.clone(),
            // A panic while swapping cannot leave a half-written Arc: the value is whole.
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Whether `given` is one of `role`'s values now.
    pub fn allows(&self, role: Role, given: &[u8]) -> bool {
        self.current().allows(role, given)
    }

    fn replace(&self, credentials: Credentials) {
        let mut guard = match self.current.write() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        *guard = Arc::new(credentials);
    }

    /// Puts a freshly read set in force (counted and logged when it differs); a set that did
    /// not parse changes nothing and its error is returned.
    fn take(&self, read: Result<Credentials, String>) -> Result<(), String> {
        let credentials = read?;
        if *self.current() != credentials {
            tracing::info!(counts = ?credentials, "credentials reloaded");
            metrics::counter!("seckill_credential_reloads_total", "result" => "applied")
                .increment(1);
            self.replace(credentials);
        }
        Ok(())
    }

    /// With a [`Source::Dir`], re-reads the directory every `every` until `shutdown`. A set
    /// that does not parse is refused whole and the one in force stays (logged once per
    /// distinct error): a half-written rotation never locks every caller out.
    pub async fn reload_from(self, dir: PathBuf, every: Duration, shutdown: CancellationToken) {
        let mut last_error: Option<String> = None;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
            let read = {
                let dir = dir.clone();
                tokio::task::spawn_blocking(move || read_dir(&dir)).await
            };
            match read {
                Ok(read) => {
                    if let Err(error) = self.take(read) {
                        if last_error.as_deref() != Some(error.as_str()) {
                            tracing::error!(%error, "credentials not reloaded; the ones in force stay");
                            metrics::counter!("seckill_credential_reloads_total", "result" => "refused")
                                .increment(1);
                            last_error = Some(error);
                        }
                    } else {
                        last_error = None;
                    }
                }
                Err(e) => tracing::error!(error = %e, "credential reload task failed"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EDGE: &str = "edge-value-0123456789";
    const SHOP: &str = "shop-value-0123456789";
    const ADMIN: &str = "admin-value-0123456789";

    fn parse(
        edge: &str,
        shop: &str,
        admin: &str,
        metrics: Option<&str>,
    ) -> Result<Credentials, String> {
        Credentials::parse(&[
            (Role::Edge, Some(edge)),
            (Role::Shop, Some(shop)),
            (Role::Admin, Some(admin)),
            (Role::Metrics, metrics),
        ])
    }

    #[test]
    fn each_role_accepts_only_its_own_values() {
        let c = parse(EDGE, SHOP, ADMIN, None).unwrap();
        assert!(c.allows(Role::Edge, EDGE.as_bytes()));
        assert!(!c.allows(Role::Admin, EDGE.as_bytes()));
        assert!(!c.allows(Role::Shop, EDGE.as_bytes()));
        assert!(c.allows(Role::Admin, ADMIN.as_bytes()));
        assert!(!c.allows(Role::Edge, ADMIN.as_bytes()));
        assert!(c.allows(Role::Shop, SHOP.as_bytes()));
        // No metrics credential configured: nothing is a metrics credential.
        assert!(!c.allows(Role::Metrics, b""));
        assert!(!c.allows(Role::Metrics, EDGE.as_bytes()));
        assert_eq!(c.count(Role::Metrics), 0);
        // A prefix or an extension of a value is not the value.
        assert!(!c.allows(Role::Edge, &EDGE.as_bytes()[..EDGE.len() - 1]));
        assert!(!c.allows(Role::Edge, format!("{EDGE}x").as_bytes()));
    }

    #[test]
    fn two_values_are_accepted_while_rotating() {
        let next = "edge-next-0123456789";
        let c = parse(&format!("{EDGE},{next}"), SHOP, ADMIN, None).unwrap();
        assert!(c.allows(Role::Edge, EDGE.as_bytes()));
        assert!(c.allows(Role::Edge, next.as_bytes()));
        // A file's layout: one per line, a trailing newline.
        let c = parse(&format!("{next}\n{EDGE}\n"), SHOP, ADMIN, None).unwrap();
        assert_eq!(c.count(Role::Edge), 2);
    }

    #[test]
    fn bad_sets_are_refused_with_the_reason() {
        let three = format!("{EDGE},edge-b-0123456789abc,edge-c-0123456789abc");
        let cases: Vec<(Result<Credentials, String>, &str)> = vec![
            (parse("", SHOP, ADMIN, None), "no edge credential"),
            (parse(EDGE, " \n", ADMIN, None), "no shop credential"),
            (parse(&three, SHOP, ADMIN, None), "at most 2"),
            (parse("short", SHOP, ADMIN, None), "16 to 256"),
            (parse(&"x".repeat(257), SHOP, ADMIN, None), "16 to 256"),
            (
                parse("edge-value 0123456789", SHOP, ADMIN, None),
                "printable ASCII",
            ),
            (
                parse("edge-valué-0123456789", SHOP, ADMIN, None),
                "printable ASCII",
            ),
            (
                parse(EDGE, SHOP, EDGE, None),
                "edge and admin credentials share",
            ),
            (
                parse(EDGE, SHOP, ADMIN, Some(SHOP)),
                "shop and metrics credentials share",
            ),
            (
                Credentials::parse(&[(Role::Edge, Some(EDGE)), (Role::Shop, Some(SHOP))]),
                "no admin credential",
            ),
        ];
        for (result, expected) in cases {
            let error = result.expect_err(expected);
            assert!(error.contains(expected), "{error} (expected {expected})");
            assert!(
                !error.contains("0123456789"),
                "a value leaked into: {error}"
            );
        }
    }

    #[test]
    fn values_compare_exactly() {
        assert!(constant_time_eq(b"s3cret", b"s3cret"));
        assert!(!constant_time_eq(b"s3cret", b"s3creT"));
        assert!(!constant_time_eq(b"s3cret", b"s3cre"));
        assert!(!constant_time_eq(b"", b"s3cret"));
    }

    #[test]
    fn debug_never_prints_a_value() {
        let c = parse(EDGE, SHOP, ADMIN, None).unwrap();
        let printed = format!("{c:?}");
        assert!(!printed.contains("value"), "{printed}");
        assert!(printed.contains("edge: 1"), "{printed}");
    }

    #[test]
    fn a_directory_is_read_with_an_optional_metrics_file() {
        let dir = std::env::temp_dir().join(format!("seckill-creds-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("edge"), format!("{EDGE}\n")).unwrap();
        std::fs::write(dir.join("shop"), SHOP).unwrap();
        let missing = read_dir(&dir).unwrap_err();
        assert!(missing.contains("admin"), "{missing}");
        std::fs::write(dir.join("admin"), ADMIN).unwrap();
        let c = read_dir(&dir).unwrap();
        assert_eq!(c.count(Role::Metrics), 0);
        std::fs::write(dir.join("metrics"), "metrics-value-0123456789").unwrap();
        let c = read_dir(&dir).unwrap();
        assert!(c.allows(Role::Metrics, b"metrics-value-0123456789"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn a_reload_swaps_a_good_set_and_keeps_the_old_one_on_a_bad_set() {
        let dir = std::env::temp_dir().join(format!("seckill-reload-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for (name, value) in [("edge", EDGE), ("shop", SHOP), ("admin", ADMIN)] {
            std::fs::write(dir.join(name), value).unwrap();
        }
        let keyring = Keyring::new(read_dir(&dir).unwrap());
        let stop = CancellationToken::new();
        let task = tokio::spawn(keyring.clone().reload_from(
            dir.clone(),
            Duration::from_millis(10),
            stop.clone(),
        ));
        let wait = |want: bool, role: Role, value: &'static str| {
            let keyring = keyring.clone();
            async move {
                // Polls the reloader (every 10 ms) for at most 5 s.
                for _ in 0..500 {
                    if keyring.allows(role, value.as_bytes()) == want {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                panic!("{value} never became {want}");
            }
        };
        let next = "edge-next-0123456789";
        std::fs::write(dir.join("edge"), format!("{EDGE}\n{next}\n")).unwrap();
        wait(true, Role::Edge, next).await;
        assert!(keyring.allows(Role::Edge, EDGE.as_bytes()));
        // A bad set (the new edge value is also the admin's) is refused whole: read as the
        // reloader reads it, it is not taken, and the set in force stays.
        std::fs::write(dir.join("edge"), ADMIN).unwrap();
        std::fs::write(dir.join("shop"), "shop-next-0123456789").unwrap();
        let refused = keyring.take(read_dir(&dir)).unwrap_err();
        assert!(refused.contains("edge and admin"), "{refused}");
        assert!(keyring.allows(Role::Edge, next.as_bytes()));
        assert!(keyring.allows(Role::Shop, SHOP.as_bytes()));
        assert!(!keyring.allows(Role::Shop, b"shop-next-0123456789"));
        std::fs::write(dir.join("edge"), next).unwrap();
        wait(false, Role::Edge, EDGE).await;
        assert!(keyring.allows(Role::Shop, b"shop-next-0123456789"));
        stop.cancel();
        task.await.unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
