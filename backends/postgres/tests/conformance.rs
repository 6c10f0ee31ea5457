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

/// What PostgreSQL refuses, refused alone: the rest of each batch is written.
mod refusals {
    use std::sync::Arc;

    use chrono::{TimeZone, Utc};
    use flows_conformance::RowStore;
    use flows_core::backend::{RowChangeRef, ValidChange, write_isolating};
    use flows_core::{Row, UpsertRepository};

    use super::*;

    async fn rows(prefix: &str) -> PostgresUpsertRepository<ConformanceRow> {
        PostgresUpsertRepository::<ConformanceRow>::with_table(store().await, &unique_table(prefix))
            .await
            .expect("row table")
    }

    #[tokio::test]
    async fn postgresql_refuses_nul_and_timestamps_before_4713_bc() {
        let table: RowStore = Arc::new(rows("refused").await);
        let refused = flows_conformance::refused_rows(&table).await;
        assert_eq!(refused, ["nul-text", "nul-json", "ancient"]);
    }

    /// A constraint of the table (added by its owner, not by flows) refuses one row
    /// on the server; the batch is split until that row alone is left.
    #[tokio::test]
    async fn a_table_constraint_refuses_one_row_and_the_rest_is_written() {
        let table = rows("constrained").await;
        let name = table.schema().table().to_string();
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "ALTER TABLE \"{name}\" ADD CONSTRAINT score_not_negative CHECK (score >= 0)"
        )))
        .execute(store().await.pool())
        .await
        .expect("add the constraint");
        let mut batch: Vec<ConformanceRow> = (0..20)
            .map(|i| ConformanceRow::sample("t", i, i + 1))
            .collect();
        batch[13].score = Some(-1);
        let schema = table.schema().clone();
        let sources: Vec<Vec<ValidChange>> = batch
            .iter()
            .map(|row| vec![ValidChange::new(&schema, RowChangeRef::Upsert(row)).unwrap()])
            .collect();
        let refused = write_isolating(&table, &sources).await.expect("available");
        assert_eq!(refused.len(), 1, "{refused:?}");
        assert_eq!(refused[0].0, 13);
        assert!(
            refused[0].1.to_string().contains("score_not_negative"),
            "{}",
            refused[0].1
        );
        let keys: Vec<_> = batch.iter().map(ConformanceRow::key).collect();
        let stored = table.get_all(&keys).await.unwrap();
        for (i, (row, stored)) in batch.iter().zip(stored).enumerate() {
            let expected = (i != 13).then(|| row.clone());
            assert_eq!(stored, expected, "row {i}");
        }
    }

    /// An event keyed by its time.
    #[derive(Debug, PartialEq, Row)]
    #[flows(table = "events")]
    struct Event {
        #[flows(key)]
        at: chrono::DateTime<Utc>,
        n: i64,
    }

    /// Two times 500 ns apart are one key once stored (microseconds): in one batch the
    /// later change wins, instead of PostgreSQL refusing an upsert that touches one row
    /// twice.
    #[tokio::test]
    async fn keys_equal_once_stored_are_one_key_within_a_batch() {
        let table =
            PostgresUpsertRepository::<Event>::with_table(store().await, &unique_table("events"))
                .await
                .unwrap();
        let at = Utc.timestamp_nanos(1_700_000_000_123_456_000);
        let events = [
            Event { at, n: 1 },
            Event {
                at: at + chrono::Duration::nanoseconds(500),
                n: 2,
            },
        ];
        table.upsert_all(&events).await.expect("one row");
        let stored = table
            .get_all(&[flows_core::PrimaryKey::from(at)])
            .await
            .unwrap();
        assert_eq!(stored, [Some(Event { at, n: 2 })]);
    }
}

/// `TableMode::RequireExisting` refuses a missing table; opens an existing one.
#[tokio::test]
async fn table_modes() {
    flows_conformance::assert_table_modes(&store().await, &unique_table("modes")).await;
}
