//! The Lua scripts as Redis runs them: each with the shared prelude (`lua/common.lua`: the
//! clock, the `user|quantity|rest` record, the outbox append) in front, put together at compile
//! time so every caller (the syncer, the tests, the benchmark) loads exactly the same text.
//! Each script's KEYS come from [`crate::keys::GoodsKeys`].

/// Decides a batch of purchase attempts (`lua/deduct_batch.lua`).
pub const DEDUCT: &str = concat!(
    include_str!("lua/common.lua"),
    include_str!("lua/deduct_batch.lua")
);

/// Confirms, releases, sweeps and claims reservations (`lua/lifecycle.lua`).
pub const LIFECYCLE: &str = concat!(
    include_str!("lua/common.lua"),
    include_str!("lua/lifecycle.lua")
);

/// Loads one sale into Redis (`lua/preheat.lua`).
pub const PREHEAT: &str = concat!(
    include_str!("lua/common.lua"),
    include_str!("lua/preheat.lua")
);

/// Loads a sale Redis forgot from MySQL's rows (`lua/reseed.lua`).
pub const RESEED: &str = concat!(
    include_str!("lua/common.lua"),
    include_str!("lua/reseed.lua")
);

/// An operator's control of a live sale: pause, resume, stop, add stock (`lua/control.lua`).
pub const CONTROL: &str = concat!(
    include_str!("lua/common.lua"),
    include_str!("lua/control.lua")
);

/// Starts a call of `script` with its KEYS (the caller adds the ARGV).
pub fn invocation<'a>(script: &'a redis::Script, keys: &[&str]) -> redis::ScriptInvocation<'a> {
    let mut invocation = script.prepare_invoke();
    for key in keys {
        invocation.key(*key);
    }
    invocation
}

/// Moves units between two shards of a redis_sharded goods (`lua/transfer.lua`).
pub const TRANSFER: &str = concat!(
    include_str!("lua/common.lua"),
    include_str!("lua/transfer.lua")
);
