//! The conformance suite against a DynamoDB API server.
//!
//! The server is found through `FLOWS_TEST_DYNAMODB_ENDPOINT` (default
//! `http://127.0.0.1:8000`); `eval "$(scripts/servers start dynamodb)"` installs and
//! starts DynamoDB Local and exports it. A missing server fails every test loudly:
//! these tests never skip. Every store gets a table of its own.

use std::sync::atomic::{AtomicUsize, Ordering};

use flows_conformance::ConformanceRow;
use flows_dynamodb::{DynamoDbStateRepository, DynamoDbStore, DynamoDbUpsertRepository};

/// The `dynamodb://` URL of the test endpoint.
fn url() -> String {
    let endpoint = std::env::var("FLOWS_TEST_DYNAMODB_ENDPOINT")
        .unwrap_or_else(|_| "http://127.0.0.1:8000".to_owned());
    let (tls, host) = match endpoint.split_once("://") {
        Some(("https", host)) => ("true", host),
        Some((_, host)) => ("false", host),
        None => ("false", endpoint.as_str()),
    };
    format!(
        "dynamodb://{}?region=us-east-1&tls={tls}",
        host.trim_end_matches('/')
    )
}

fn unreachable(e: impl std::fmt::Display) -> ! {
    panic!(
        "cannot use the test DynamoDB server ({e}); start it with \
         `eval \"$(scripts/servers start dynamodb)\"` or point FLOWS_TEST_DYNAMODB_ENDPOINT \
         at one"
    )
}

async fn store() -> DynamoDbStore {
    DynamoDbStore::connect(&url())
        .await
        .unwrap_or_else(|e| unreachable(e))
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

    flows_conformance::state_repository_suite!(dynamodb, || async {
        DynamoDbStateRepository::new(store().await, &unique_table("states"))
            .await
            .unwrap_or_else(|e| unreachable(e))
    });

    flows_conformance::state_repository_suite!(dynamodb_conditional_puts, || async {
        DynamoDbStateRepository::new(store().await, &unique_table("states"))
            .await
            .unwrap_or_else(|e| unreachable(e))
            .with_write_mode(flows_dynamodb::WriteMode::ConditionalPuts)
    });

    flows_conformance::upsert_repository_suite!(dynamodb_rows, || async {
        DynamoDbUpsertRepository::<ConformanceRow>::with_table(store().await, &unique_table("rows"))
            .await
            .unwrap_or_else(|e| unreachable(e))
    });
}

/// What DynamoDB refuses, refused alone: rows over its 400 KB item limit.
#[tokio::test]
async fn dynamodb_refuses_rows_over_its_item_limit_alone() {
    let table: flows_conformance::RowStore = std::sync::Arc::new(
        DynamoDbUpsertRepository::<ConformanceRow>::with_table(
            store().await,
            &unique_table("refused"),
        )
        .await
        .unwrap_or_else(|e| unreachable(e)),
    );
    assert_eq!(
        flows_conformance::refused_rows(&table).await,
        ["450-kb", "17-mb"]
    );
}

/// `TableMode::RequireExisting` refuses a missing table; opens an existing one.
#[tokio::test]
async fn table_modes() {
    flows_conformance::assert_table_modes(&store().await, &unique_table("modes")).await;
}
