//! Cassandra-specific behaviour beyond the conformance suite: the write-timestamp
//! ordering of same-version writes, refusing servers without lightweight
//! transactions, typed errors.
//!
//! Runs against the in-process kassandra imitation unless `FLOWS_TEST_CASSANDRA_URL`
//! is set (see `common/mod.rs`); the tests kassandra cannot honour are ignored as
//! real-server-only (`-- --include-ignored` runs them against the URL's cluster).

mod common;

use common::{imitation_url, real_server_url, store, unique_table};
use flows_cassandra::{
    CassandraStateRepository, CassandraStore, CassandraUpsertRepository, Fencing,
};
use flows_core::{
    PersistenceId, RawState, RepositoryError, Row, RowError, SingleStateRepository, State,
    UpsertRepository,
};

fn run(test: impl std::future::Future<Output = ()>) {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(test)
}

fn id(s: &str) -> PersistenceId {
    PersistenceId::new(s).expect("valid id")
}

async fn timestamped() -> CassandraStateRepository {
    CassandraStateRepository::with_fencing(
        store().await,
        &unique_table("states"),
        Fencing::WriteTimestamps,
    )
    .await
    .expect("state table")
}

/// Two instances read version 1; the new owner writes version 2 first, the stale one
/// afterwards: the owner's write stays, as a lightweight transaction would have
/// decided, and the stale one is not told. The owner's next write stays too.
#[test]
#[ignore = "real-server-only: needs a real Cassandra/ScyllaDB (set FLOWS_TEST_CASSANDRA_URL)"]
fn same_version_race_keeps_the_first_write() {
    run(async {
        let states = timestamped().await;
        let v1 = states
            .upsert(&State::fresh(id("k")).with_content(b"one".to_vec()))
            .await
            .expect("write");
        let owner = states
            .upsert(&v1.clone().with_content(b"owner".to_vec()))
            .await
            .expect("owner write");
        let stale = states
            .upsert(&v1.with_content(b"stale".to_vec()))
            .await
            .expect("the stale write succeeds silently");
        assert_eq!((owner.version, stale.version), (2, 2));
        let read = states.get(&id("k")).await.expect("get");
        assert_eq!(read.content.as_deref(), Some(&b"owner"[..]));
        let next = states
            .upsert(&read.with_content(b"owner again".to_vec()))
            .await
            .expect("owner write");
        assert_eq!(
            states.get(&id("k")).await.expect("get").content,
            next.content
        );
    });
}

/// The timestamp of a write is the derived one (`WRITETIME` of the state cell).
#[test]
#[ignore = "real-server-only: needs a real Cassandra/ScyllaDB (set FLOWS_TEST_CASSANDRA_URL)"]
fn write_timestamps_are_the_derived_ones() {
    run(async {
        let store = store().await;
        let table = unique_table("states");
        let states =
            CassandraStateRepository::with_fencing(store.clone(), &table, Fencing::WriteTimestamps)
                .await
                .expect("state table");
        let v1 = states
            .upsert(&State::fresh(id("w")).with_content(b"x".to_vec()))
            .await
            .expect("write");
        let cql = format!(
            "SELECT WRITETIME(state) FROM {}.{table} WHERE id = 'w'",
            store.keyspace()
        );
        let result = store
            .session()
            .query_unpaged(cql, ())
            .await
            .expect("writetime");
        let (writetime,) = result
            .into_rows_result()
            .expect("rows")
            .single_row::<(i64,)>()
            .expect("one row");
        // Version 1 of a new state: 1 * 2^23 + (2^23 - 1), nothing elapsed.
        assert_eq!(v1.version, 1);
        assert_eq!(writetime, (1 << 23) + (1 << 23) - 1);
    });
}

/// Without `accept_servers_without_lwt`, a server that ignores `IF` clauses is refused
/// in LWT mode (kassandra); a real cluster is accepted.
#[test]
fn lwt_mode_refuses_a_server_without_lightweight_transactions() {
    run(async {
        let strict = match real_server_url() {
            Some(url) => CassandraStore::connect(&url).await,
            None => CassandraStore::connect(&imitation_url()).await,
        }
        .expect("connect");
        let opened = CassandraStateRepository::with_fencing(
            strict,
            &unique_table("states"),
            Fencing::LightweightTransactions,
        )
        .await;
        match (real_server_url(), opened) {
            (None, Err(RepositoryError::Configuration(message))) => {
                assert!(message.contains("lightweight transactions"), "{message}");
            }
            (None, other) => panic!("kassandra must be refused in LWT mode: {other:?}"),
            (Some(_), opened) => {
                opened.expect("a real cluster has lightweight transactions");
            }
        }
    });
}

/// The URL's `fencing` is the default of the store's state repositories, declared in
/// their capabilities.
#[test]
fn url_fencing_selects_the_mode() {
    run(async {
        let url = match real_server_url() {
            Some(url) if url.contains('?') => format!("{url}&fencing=timestamps"),
            Some(url) => format!("{url}?fencing=timestamps"),
            None => format!("{}&fencing=timestamps", imitation_url()),
        };
        let store = CassandraStore::connect(&url).await.expect("connect");
        assert_eq!(store.fencing(), Fencing::WriteTimestamps);
        let states = CassandraStateRepository::new(store, &unique_table("states"))
            .await
            .expect("state table");
        let caps = states.capabilities();
        assert!(!caps.conditional_write && caps.versioned_last_write_wins);
        assert!(!caps.atomic_batch_write);
        let written = states
            .upsert(&State::fresh(id("u")).with_content(b"u".to_vec()))
            .await
            .expect("write");
        let read: RawState = states.get(&id("u")).await.expect("get");
        assert_eq!(read.content, written.content);
        assert_eq!(read.updated_at, written.updated_at);
        assert_eq!(read.created_at, written.created_at);
    });
}

/// An unreachable cluster is a transient error, not a panic or a configuration error.
#[test]
fn unreachable_cluster_is_unavailable() {
    run(async {
        let err = CassandraStore::connect("cassandra://127.0.0.1:1/flows_test")
            .await
            .expect_err("nothing listens on port 1");
        assert!(err.is_transient(), "{err}");
    });
}

#[derive(Clone, Debug, PartialEq, Row)]
#[flows(table = "words")]
struct Word {
    #[flows(key)]
    word: String,
    count: i64,
}

/// Cassandra cannot store an empty partition key: with a one-column key, an empty text
/// key is a typed row error and nothing of the batch is written.
#[test]
fn empty_single_column_key_is_a_row_error_and_writes_nothing() {
    run(async {
        let rows =
            CassandraUpsertRepository::<Word>::with_table(store().await, &unique_table("words"))
                .await
                .expect("row table");
        let good = Word {
            word: "good".into(),
            count: 1,
        };
        let empty = Word {
            word: String::new(),
            count: 2,
        };
        let err = rows
            .upsert_all(&[good.clone(), empty])
            .await
            .expect_err("empty key rejected");
        assert!(
            matches!(err, RepositoryError::Row(RowError::Invalid { .. })),
            "{err}"
        );
        let read = rows
            .get_all(&[good.word.clone().into()])
            .await
            .expect("get_all");
        assert_eq!(read, vec![None]);
        rows.upsert_all(std::slice::from_ref(&good))
            .await
            .expect("upsert");
        assert_eq!(
            rows.get_all(&[good.word.clone().into()])
                .await
                .expect("get_all"),
            vec![Some(good)]
        );
    });
}
