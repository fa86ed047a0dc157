//! Command line of the syncer. Thin: parse flags, set up logging, call the library.

use std::net::SocketAddr;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use seckill_syncer::{db, keys::KeySpace, preheat, ServeConfig, StoreConfig};

#[derive(Parser)]
#[command(
    name = "seckill-syncer",
    version,
    about = "Companion service of the seckill gate"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Clone)]
struct StoreArgs {
    /// Redis holding the live sale counters.
    #[arg(
        long,
        env = "SECKILL_REDIS_URL",
        default_value = "redis://127.0.0.1:6379"
    )]
    redis_url: String,
    /// MySQL (or MariaDB) holding sale definitions and orders.
    #[arg(
        long,
        env = "SECKILL_MYSQL_URL",
        default_value = "mysql://seckill:seckill@127.0.0.1:3306/seckill"
    )]
    mysql_url: String,
    /// Prefix of every Redis key, so several gates or tests can share one Redis.
    #[arg(long, env = "SECKILL_KEY_PREFIX", default_value = "seckill")]
    key_prefix: String,
}

impl StoreArgs {
    fn config(&self) -> StoreConfig {
        StoreConfig {
            redis_url: self.redis_url.clone(),
            mysql_url: self.mysql_url.clone(),
            key_prefix: self.key_prefix.clone(),
        }
    }
}

#[derive(Subcommand)]
enum Command {
    /// Serve the deduct endpoint, the admin API, /healthz and /metrics.
    Serve {
        #[command(flatten)]
        stores: StoreArgs,
        /// Address to listen on.
        #[arg(long, env = "SECKILL_LISTEN", default_value = "127.0.0.1:8081")]
        listen: SocketAddr,
        /// Shared secret the filter and admin callers send in x-seckill-secret.
        #[arg(long, env = "SECKILL_SECRET", hide_env_values = true)]
        secret: String,
    },
    /// Create or update the MySQL schema and exit.
    Migrate {
        #[command(flatten)]
        stores: StoreArgs,
    },
    /// Load a sale defined in MySQL into Redis with its full stock.
    Preheat {
        #[command(flatten)]
        stores: StoreArgs,
        /// Goods id of the sale.
        #[arg(long)]
        goods: String,
        /// Replace a sale that has not ended yet (its buyers and reservations are forgotten).
        #[arg(long)]
        force: bool,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Serve {
            stores,
            listen,
            secret,
        } => {
            let metrics = metrics_exporter_prometheus::PrometheusBuilder::new()
                .install_recorder()
                .map_err(|e| anyhow::anyhow!("cannot install the metrics recorder: {e}"))?;
            let config = ServeConfig {
                stores: stores.config(),
                listen,
                secret,
            };
            seckill_syncer::serve(config, Some(metrics), shutdown_signal()).await
        }
        Command::Migrate { stores } => {
            db::connect(&stores.mysql_url).await?;
            println!("schema is up to date");
            Ok(())
        }
        Command::Preheat {
            stores,
            goods,
            force,
        } => {
            seckill_api::validate_id(&goods, seckill_api::ID_LEN_MAX)
                .map_err(|e| anyhow::anyhow!("--goods {e}"))?;
            let mysql = db::connect(&stores.mysql_url).await?;
            let redis = seckill_syncer::connect_redis(&stores.redis_url).await?;
            let keys = KeySpace::new(stores.key_prefix);
            let stored = db::load_sale(&mysql, &goods)
                .await?
                .ok_or_else(|| anyhow::anyhow!("no sale is defined for goods {goods}"))?;
            let epoch = preheat::preheat(&redis, &keys, &stored.sale, force).await?;
            println!(
                "preheated {goods}: {} units, per-user limit {}, epoch {epoch}",
                stored.sale.total_stock, stored.sale.per_user_limit
            );
            Ok(())
        }
    }
}

/// Resolves on SIGTERM or Ctrl-C.
async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!("cannot listen for Ctrl-C: {e}");
            std::future::pending::<()>().await;
        }
    };
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(e) => {
                tracing::error!("cannot listen for SIGTERM: {e}");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
    tracing::info!("shutdown requested");
}
