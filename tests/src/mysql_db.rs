//! A fresh MariaDB/MySQL database per test on the shared server, dropped afterwards.

use anyhow::Context;
use sqlx::mysql::MySqlPoolOptions;
use sqlx::{Executor, MySqlPool};

use crate::process::unique_suffix;

/// Server the tests create their databases on (no database in the URL).
pub fn server_url() -> String {
    std::env::var("SECKILL_TEST_MYSQL_URL")
        .unwrap_or_else(|_| "mysql://seckill:seckill@127.0.0.1:3306".into())
}

pub struct TestDatabase {
    pub name: String,
    server: String,
    pub pool: MySqlPool,
    keep: bool,
}

impl TestDatabase {
    pub async fn create(label: &str) -> anyhow::Result<Self> {
        let name = format!("seckill_{label}_{}", unique_suffix());
        Self::create_named(&name, false).await
    }

    /// Creates (or recreates) a database by name; `keep` leaves it in place when dropped.
    pub async fn create_named(name: &str, keep: bool) -> anyhow::Result<Self> {
        let server = server_url();
        let admin = MySqlPoolOptions::new()
            .max_connections(1)
            .connect(&server)
            .await
            .with_context(|| {
                format!("cannot reach MySQL at {server}; scripts/setup.sh starts MariaDB")
            })?;
        admin
            .execute(format!("DROP DATABASE IF EXISTS `{name}`").as_str())
            .await?;
        admin
            .execute(format!("CREATE DATABASE `{name}`").as_str())
            .await?;
        admin.close().await;
        let pool = MySqlPoolOptions::new()
            .max_connections(4)
            .connect(&format!("{server}/{name}"))
            .await?;
        Ok(Self {
            name: name.to_owned(),
            server,
            pool,
            keep,
        })
    }

    pub fn url(&self) -> String {
        format!("{}/{}", self.server, self.name)
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        if self.keep {
            return;
        }
        // Drop is synchronous; run the DROP DATABASE on a runtime of its own.
        let server = self.server.clone();
        let name = self.name.clone();
        let dropper = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(async {
                let admin = MySqlPoolOptions::new()
                    .max_connections(1)
                    .connect(&server)
                    .await?;
                admin
                    .execute(format!("DROP DATABASE IF EXISTS `{name}`").as_str())
                    .await?;
                anyhow::Ok(())
            })
        });
        if let Ok(Err(e)) = dropper.join() {
            eprintln!("could not drop test database {}: {e:#}", self.name);
        }
    }
}
