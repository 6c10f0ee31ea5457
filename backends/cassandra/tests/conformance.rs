//! The conformance suite against a Cassandra-compatible server, in both fencing modes,
//! and the row suite.
//!
//! By default the server is **kassandra, an in-memory imitation** started inside the
//! test process (see `common/mod.rs`): hence the `kassandra_imitation_` module names.
//! It ignores lightweight transactions, write timestamps, `IN` and null bindings (which
//! Cassandra stores as tombstones), so the cases that depend on them are generated as
//! ignored ("real-server-only"); they never count as passed here. Against a real cluster every case runs:
//!
//! ```text
//! FLOWS_TEST_CASSANDRA_URL=cassandra://127.0.0.1:9042/flows_test \
//!     cargo test -p flows-cassandra -- --include-ignored
//! ```
//!
//! (the docker-compose ScyllaDB; the modules keep their names, the server is the URL's).

mod common;

use common::{store, unique_table};
use flows_cassandra::{CassandraStateRepository, CassandraUpsertRepository, Fencing};
use flows_conformance::ConformanceRow;

mod conformance {
    use super::*;

    // Lightweight transactions: every conflict case needs Paxos, which kassandra does
    // not implement (it applies `IF` statements unconditionally).
    flows_conformance::state_repository_suite!(
        kassandra_imitation_lwt,
        || async {
            CassandraStateRepository::with_fencing(
                store().await,
                &unique_table("states"),
                Fencing::LightweightTransactions,
            )
            .await
            .expect("state table")
        },
        fencing: conditional,
        real_server_only("real-server-only: needs a real Cassandra/ScyllaDB (set FLOWS_TEST_CASSANDRA_URL)"): [
            stale_version_rejected,
            stale_insert_rejected,
            stale_write_all_rejected,
            stale_batch_rejected_and_nothing_changed,
            conflict_names_every_stale_id,
            concurrent_increments_lose_no_update,
            state_machine_matches_in_memory_model,
        ],
    );

    // Write timestamps: every case where last-write-wins decides needs a server that
    // honours write timestamps; kassandra keeps whichever write arrives last.
    flows_conformance::state_repository_suite!(
        kassandra_imitation_timestamps,
        || async {
            CassandraStateRepository::with_fencing(
                store().await,
                &unique_table("states"),
                Fencing::WriteTimestamps,
            )
            .await
            .expect("state table")
        },
        fencing: last_write_wins,
        real_server_only("real-server-only: needs a real Cassandra/ScyllaDB (set FLOWS_TEST_CASSANDRA_URL)"): [
            stale_write_never_becomes_visible_after_newer_write,
            stale_writes_in_a_batch_leave_newer_states_and_write_the_rest,
            replaying_a_write_is_idempotent,
            state_machine_matches_last_write_wins_model,
        ],
    );

    // An upsert binds every column, nulls included: on Cassandra a bound null is a cell
    // tombstone, so the upsert replaces the whole row. kassandra skips null bindings
    // and keeps the old value, so the cases that replace a value with null need a real
    // server.
    flows_conformance::upsert_repository_suite!(
        kassandra_imitation_rows,
        || async {
            CassandraUpsertRepository::<ConformanceRow>::with_table(
                store().await,
                &unique_table("rows"),
            )
            .await
            .expect("row table")
        },
        real_server_only("real-server-only: needs a real Cassandra/ScyllaDB (set FLOWS_TEST_CASSANDRA_URL)"): [
            upsert_replaces_by_primary_key,
            last_change_per_key_in_a_batch_wins,
            rows_state_machine_matches_in_memory_model,
        ],
    );
}

/// What Cassandra refuses, refused alone: an empty partition key (checked before
/// sending, so the kassandra imitation, which would take it, refuses it too).
mod refusals {
    use flows_core::backend::{RowChangeRef, ValidChange, write_isolating};
    use flows_core::{Row, UpsertRepository};

    use super::*;

    #[tokio::test]
    async fn cassandra_holds_every_awkward_row_with_a_composite_key() {
        let table: flows_conformance::RowStore = std::sync::Arc::new(
            CassandraUpsertRepository::<ConformanceRow>::with_table(
                store().await,
                &unique_table("refused"),
            )
            .await
            .expect("row table"),
        );
        assert!(flows_conformance::refused_rows(&table).await.is_empty());
    }

    /// A row keyed by one text column.
    #[derive(Debug, PartialEq, Row)]
    #[flows(table = "tags")]
    struct Tag {
        #[flows(key)]
        name: String,
        uses: i64,
    }

    #[tokio::test]
    async fn an_empty_partition_key_is_refused_alone() {
        let table =
            CassandraUpsertRepository::<Tag>::with_table(store().await, &unique_table("tags"))
                .await
                .expect("row table");
        let tags: Vec<Tag> = ["a", "", "b"]
            .iter()
            .map(|name| Tag {
                name: (*name).to_owned(),
                uses: 1,
            })
            .collect();
        let schema = table.schema().clone();
        let sources: Vec<Vec<ValidChange>> = tags
            .iter()
            .map(|tag| vec![ValidChange::new(&schema, RowChangeRef::Upsert(tag)).unwrap()])
            .collect();
        let refused = write_isolating(&table, &sources).await.expect("available");
        assert_eq!(refused.len(), 1);
        assert_eq!(refused[0].0, 1);
        assert!(
            refused[0].1.to_string().contains("empty partition key"),
            "{}",
            refused[0].1
        );
        let stored = table
            .get_all(&[
                flows_core::PrimaryKey::from("a".to_owned()),
                flows_core::PrimaryKey::from("b".to_owned()),
            ])
            .await
            .unwrap();
        assert!(stored.iter().all(Option::is_some), "{stored:?}");
    }
}

/// `TableMode::RequireExisting` refuses a missing table (the server's "unconfigured
/// table" when preparing on it); opens an existing one.
#[tokio::test]
async fn table_modes() {
    flows_conformance::assert_table_modes(&store().await, &unique_table("modes")).await;
}
