//! The local parts a benchmark starts without the whole stack: a syncer serving the deduct
//! endpoint in front of a private Redis and a database, no pipeline, no Envoy.

use std::path::Path;

use seckill_e2e::process::unique_suffix;
use seckill_e2e::syncer::{Role, SyncerArgs, SyncerProcess};

/// Starts `syncer serve` (no pipeline) on `redis_url` and `mysql_url` with a key prefix of its
/// own and extra environment `env`; gives the process and its key prefix.
pub async fn start_syncer(
    dir: &Path,
    redis_url: &str,
    mysql_url: &str,
    env: &[(&str, &str)],
) -> anyhow::Result<(SyncerProcess, String)> {
    let prefix = format!("b{}", unique_suffix());
    let syncer_args = SyncerArgs {
        redis_url,
        mysql_url,
        key_prefix: &prefix,
        kafka: None,
    };
    let role = Role::Serve { pipeline: false };
    let syncer = SyncerProcess::start_role(dir, &syncer_args, role, env).await?;
    Ok((syncer, prefix))
}
