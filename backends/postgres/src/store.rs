//! The connection pool shared by the repositories of one database.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use flows_core::backend::{TableMode, missing_table};
use flows_core::{RepositoryError, TableName};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};

use crate::error::map_err;

/// A PostgreSQL database opened for flows. Cheap to clone.
///
/// Its `Debug` output names host, port and database only: credentials from the URL are
/// never printed or logged.
#[derive(Clone)]
pub struct PostgresStore {
    pool: PgPool,
    display: String,
}

impl fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresStore")
            .field("server", &self.display)
            .finish()
    }
}

impl PostgresStore {
    /// Connects to `url` (`postgres://user:password@host:port/database?sslmode=...`)
    /// with a pool of up to 16 connections.
    pub async fn connect(url: &str) -> Result<Self, RepositoryError> {
        Self::connect_with_pool_size(url, 16).await
    }

    /// Connects with a pool of at most `max_connections` connections.
    pub async fn connect_with_pool_size(
        url: &str,
        max_connections: u32,
    ) -> Result<Self, RepositoryError> {
        // URL parse errors are generic messages that do not repeat the URL (or password).
        let options = PgConnectOptions::from_str(url)
            .map_err(|e| RepositoryError::Configuration(format!("invalid PostgreSQL URL: {e}")))?
            .application_name("flows");
        let server = format!(
            "{}:{}/{}",
            options.get_host(),
            options.get_port(),
            options.get_database().unwrap_or("")
        );
        let pool = PgPoolOptions::new()
            .max_connections(max_connections.max(1))
            .acquire_timeout(Duration::from_secs(30))
            .idle_timeout(Some(Duration::from_secs(600)))
            .connect_with(options)
            .await
            .map_err(map_err)?;
        tracing::debug!(%server, "connected to PostgreSQL");
        Ok(Self {
            pool,
            display: server,
        })
    }

    /// Wraps an existing pool (the caller chose its options).
    pub fn from_pool(pool: PgPool) -> Self {
        Self {
            pool,
            display: "(external pool)".into(),
        }
    }

    /// The underlying pool.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Runs `ddl` (a `CREATE ... IF NOT EXISTS`) under a transaction-scoped advisory lock
    /// keyed by the table name, so workers starting together do not race on the catalog.
    pub(crate) async fn create_table(
        &self,
        table: &TableName,
        ddl: String,
    ) -> Result<(), RepositoryError> {
        let mut tx = self.pool.begin().await.map_err(map_err)?;
        sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1))")
            .bind(format!("flows:{table}"))
            .execute(&mut *tx)
            .await
            .map_err(map_err)?;
        sqlx::query(sqlx::AssertSqlSafe(ddl))
            .execute(&mut *tx)
            .await
            .map_err(map_err)?;
        tx.commit().await.map_err(map_err)
    }

    /// Creates the table with `ddl` or, under [`TableMode::RequireExisting`], checks that
    /// it exists (in the search path).
    pub(crate) async fn prepare_table(
        &self,
        table: &TableName,
        ddl: String,
        mode: TableMode,
    ) -> Result<(), RepositoryError> {
        if mode == TableMode::CreateIfMissing {
            return self.create_table(table, ddl).await;
        }
        let exists: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
            .bind(format!("\"{table}\""))
            .fetch_one(&self.pool)
            .await
            .map_err(map_err)?;
        match exists {
            true => Ok(()),
            false => Err(missing_table("PostgreSQL", table.as_str())),
        }
    }
}
