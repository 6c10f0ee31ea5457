//! The conformance suite against a real PostgreSQL server.
//!
//! The server is found through `FLOWS_TEST_POSTGRES_URL` (default
//! `postgres://postgres@127.0.0.1:5432/flows_test`, which `scripts/test` creates). A
//! missing server fails every test loudly: these tests never skip.

use std::sync::atomic::{AtomicUsize, Ordering};

use flows_conformance::ConformanceRow;
use flows_postgres::{PostgresStateRepository, PostgresStore, PostgresUpsertRepository};

fn url() -> String {
    std::env::var("FLOWS_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/flows_test".to_owned())
}

async fn store() -> PostgresStore {
    PostgresStore::connect_with_pool_size(&url(), 4)
        .await
        .unwrap_or_else(|e| {
            panic!(
                "cannot reach the test PostgreSQL server ({e}); start it with scripts/test \
                 or point FLOWS_TEST_POSTGRES_URL at one"
            )
        })
}

/// A table name no other test (of this or a concurrent run) uses.
fn unique_table(prefix: &str) -> String {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    format!(
        "{prefix}_{}_{}_{}",
        std::process::id(),
        rand::random::<u32>(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

mod conformance {
    use super::*;

    flows_conformance::state_repository_suite!(postgres, || async {
        PostgresStateRepository::new(store().await, &unique_table("states"))
            .await
            .expect("state table")
    });

    flows_conformance::upsert_repository_suite!(postgres_rows, || async {
        PostgresUpsertRepository::<ConformanceRow>::with_table(store().await, &unique_table("rows"))
            .await
            .expect("row table")
    });
}
