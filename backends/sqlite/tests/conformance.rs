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

/// What SQLite refuses, refused alone: the rest of each batch is written.
mod refusals {
    use std::sync::Arc;

    use flows_conformance::RowStore;
    use flows_core::UpsertRepository;
    use flows_core::backend::{RowChangeRef, ValidChange, write_isolating};

    use super::*;

    #[tokio::test]
    async fn sqlite_holds_every_awkward_row() {
        let table: RowStore = Arc::new(
            SqliteUpsertRepository::<ConformanceRow>::with_table(
                file_store().await,
                &unique_table("refused"),
            )
            .await
            .expect("row table"),
        );
        assert!(flows_conformance::refused_rows(&table).await.is_empty());
    }

    /// A rule of the database (here a trigger, as an application might add) refuses
    /// one row; the batch is split until that row alone is left.
    #[tokio::test]
    async fn a_rule_of_the_database_refuses_one_row_and_the_rest_is_written() {
        let store = file_store().await;
        let table = SqliteUpsertRepository::<ConformanceRow>::with_table(
            store.clone(),
            &unique_table("guarded"),
        )
        .await
        .expect("row table");
        let name = table.schema().table().to_string();
        for event in ["INSERT", "UPDATE"] {
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "CREATE TRIGGER \"{name}_{event}\" BEFORE {event} ON \"{name}\" \
                 WHEN NEW.score < 0 BEGIN SELECT RAISE(ABORT, 'score must not be negative'); END"
            )))
            .execute(store.pool())
            .await
            .expect("trigger");
        }
        let mut batch: Vec<ConformanceRow> = (0..20)
            .map(|i| ConformanceRow::sample("t", i, i + 1))
            .collect();
        batch[5].score = Some(-1);
        let schema = table.schema().clone();
        let sources: Vec<Vec<ValidChange>> = batch
            .iter()
            .map(|row| vec![ValidChange::new(&schema, RowChangeRef::Upsert(row)).unwrap()])
            .collect();
        let refused = write_isolating(&table, &sources).await.expect("available");
        assert_eq!(refused.len(), 1, "{refused:?}");
        assert_eq!(refused[0].0, 5);
        assert!(refused[0].1.is_rejection(), "{}", refused[0].1);
        let keys: Vec<_> = batch.iter().map(ConformanceRow::key).collect();
        let stored = table.get_all(&keys).await.unwrap();
        for (i, (row, stored)) in batch.iter().zip(stored).enumerate() {
            assert_eq!(stored, (i != 5).then(|| row.clone()), "row {i}");
        }
    }
}

/// `TableMode::RequireExisting` refuses a missing table; opens an existing one.
#[tokio::test]
async fn table_modes() {
    flows_conformance::assert_table_modes(&file_store().await, &unique_table("modes")).await;
}

/// A file database is opened in WAL mode, and savepoints keep their undo pages in memory
/// (`temp_store = MEMORY`), not in a temporary file written page by page.
#[tokio::test]
async fn file_databases_use_wal_and_keep_temporary_data_in_memory() {
    let store = file_store().await;
    let mut connection = store.pool().acquire().await.expect("connection");
    let journal: String = sqlx::query_scalar("PRAGMA journal_mode")
        .fetch_one(&mut *connection)
        .await
        .expect("journal_mode");
    assert_eq!(journal, "wal");
    // 2 is MEMORY (0 DEFAULT, 1 FILE).
    let temp_store: i64 = sqlx::query_scalar("PRAGMA temp_store")
        .fetch_one(&mut *connection)
        .await
        .expect("temp_store");
    assert_eq!(temp_store, 2);
}
