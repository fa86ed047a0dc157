//! Test hook: `SECKILL_CRASH_AT=<name>` makes the process abort (as a kill -9 would stop it)
//! the first time it reaches the crash point of that name. The crash tests use it to stop the
//! relay, the writer, a preheat or MySQL's decider at the one moment that matters (after
//! Kafka delivered, before the outbox ack; after the MySQL commit, before the offset commit;
//! between a preheat's epoch and its load; after MySQL decided a batch, before its buyers
//! heard), which a kill from outside can only hit by luck. Unset, it costs one comparison.

use std::sync::OnceLock;

pub const RELAY_AFTER_PUBLISH: &str = "relay-after-publish";
pub const WRITER_AFTER_DB_COMMIT: &str = "writer-after-db-commit";
/// A preheat stops after MySQL handed out its epoch, before Redis was loaded with it.
pub const PREHEAT_AFTER_EPOCH: &str = "preheat-after-epoch";
/// MySQL decided a batch (the db tier, the fallback) and committed it; nobody was answered.
pub const DB_DECIDE_AFTER_COMMIT: &str = "db-decide-after-commit";
/// A move of units between two shards stops after the donor gave them up, before the
/// receiving shard got them (`shard.rs`).
pub const SHARD_AFTER_TAKE: &str = "shard-after-take";
/// An operator's control (pause, resume, stop, add stock) was committed in MySQL; Redis was
/// not written yet (`control/`).
pub const CONTROL_AFTER_MYSQL: &str = "control-after-mysql";

static CRASH_AT: OnceLock<Option<String>> = OnceLock::new();

pub fn crashpoint(name: &str) {
    let armed = CRASH_AT.get_or_init(|| std::env::var("SECKILL_CRASH_AT").ok());
    if armed.as_deref() == Some(name) {
        eprintln!("crash point {name} reached: aborting (SECKILL_CRASH_AT)");
        std::process::abort();
    }
}
