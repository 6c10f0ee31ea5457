//! The conformance suite against SQLite: file databases in WAL mode (what production
//! uses) and private in-memory databases.

use std::sync::atomic::{AtomicUsize, Ordering};

use flows_conformance::ConformanceRow;
use flows_sqlite::{SqliteStateRepository, SqliteStore, SqliteUpsertRepository};

/// One database file per test binary run, in a temporary directory removed at exit.
async fn file_store() -> SqliteStore {
    static DIR: std::sync::OnceLock<tempfile::TempDir> = std::sync::OnceLock::new();
    let dir = DIR.get_or_init(|| tempfile::tempdir().expect("temporary directory"));
    let url = format!("sqlite://{}", dir.path().join("conformance.db").display());
    SqliteStore::connect(&url).await.expect("open SQLite file")
}

/// A table name no other test of this run uses.
fn unique_table(prefix: &str) -> String {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    format!("{prefix}_{}", NEXT.fetch_add(1, Ordering::Relaxed))
}

mod conformance {
    use super::*;

    flows_conformance::state_repository_suite!(sqlite, || async {
        SqliteStateRepository::new(file_store().await, &unique_table("states"))
            .await
            .expect("state table")
    });

    flows_conformance::state_repository_suite!(sqlite_memory, || async {
        let store = SqliteStore::in_memory().await.expect("in-memory SQLite");
        SqliteStateRepository::new(store, "states")
            .await
            .expect("state table")
    });

    flows_conformance::upsert_repository_suite!(sqlite_rows, || async {
        SqliteUpsertRepository::<ConformanceRow>::with_table(
            file_store().await,
            &unique_table("rows"),
        )
        .await
        .expect("row table")
    });
}
