//! The conformance suite against a MongoDB-wire server, twice: with multi-document
//! transactions (atomic batches) and without them (the standalone-server mode).
//!
//! The server is found through `FLOWS_TEST_MONGODB_URL` (default
//! `mongodb://127.0.0.1:27017/?directConnection=true`, what `scripts/servers start
//! mongodb` starts: SecantusDB, see the README). A missing server fails every test
//! loudly: these tests never skip.

use std::sync::atomic::{AtomicUsize, Ordering};

use flows_conformance::ConformanceRow;
use flows_mongodb::{MongoStateRepository, MongoStore, MongoUpsertRepository};

fn url() -> String {
    let url = std::env::var("FLOWS_TEST_MONGODB_URL")
        .unwrap_or_else(|_| "mongodb://127.0.0.1:27017/?directConnection=true".to_owned());
    // Every run in its own database, so reruns against a long-lived server stay apart.
    url.replacen("/?", &format!("/flows_test_{}?", std::process::id()), 1)
}

async fn store(transactions: bool) -> MongoStore {
    let store = MongoStore::connect(&url()).await.unwrap_or_else(|e| {
        panic!(
            "cannot reach the test MongoDB server ({e}); start it with `scripts/servers start \
             mongodb` (scripts/test does) or point FLOWS_TEST_MONGODB_URL at one"
        )
    });
    if transactions {
        assert!(
            store.transactions(),
            "the test server must support transactions (a replica set)"
        );
    }
    store.with_transactions(transactions)
}

/// A collection name no other test (of this or a concurrent run) uses.
fn unique(prefix: &str) -> String {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    format!(
        "{prefix}_{}_{}",
        rand::random::<u32>(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

mod conformance {
    use super::*;

    flows_conformance::state_repository_suite!(mongodb, || async {
        MongoStateRepository::new(store(true).await, &unique("states"))
            .await
            .expect("state collection")
    });

    flows_conformance::state_repository_suite!(mongodb_without_transactions, || async {
        MongoStateRepository::new(store(false).await, &unique("states"))
            .await
            .expect("state collection")
    });

    flows_conformance::upsert_repository_suite!(mongodb_rows, || async {
        MongoUpsertRepository::<ConformanceRow>::with_table(store(true).await, &unique("rows"))
            .await
            .expect("row collection")
    });

    flows_conformance::upsert_repository_suite!(mongodb_rows_without_transactions, || async {
        MongoUpsertRepository::<ConformanceRow>::with_table(store(false).await, &unique("rows"))
            .await
            .expect("row collection")
    });
}

/// What MongoDB refuses, refused alone: a row over the 16 MiB document limit.
#[tokio::test]
async fn mongodb_refuses_rows_over_its_document_limit_alone() {
    let table: flows_conformance::RowStore = std::sync::Arc::new(
        MongoUpsertRepository::<ConformanceRow>::with_table(store(true).await, &unique("refused"))
            .await
            .expect("row collection"),
    );
    assert_eq!(flows_conformance::refused_rows(&table).await, ["17-mb"]);
}

/// `TableMode::RequireExisting` refuses a missing collection; opens an existing one.
#[tokio::test]
async fn table_modes() {
    flows_conformance::assert_table_modes(&store(true).await, &unique("modes")).await;
}
