//! DynamoDB-specific behaviour beyond the conformance suite, against the same server
//! (`FLOWS_TEST_DYNAMODB_ENDPOINT`, default `http://127.0.0.1:8000`; start it with
//! `eval "$(scripts/servers start dynamodb)"`). Never skipped.

use flows_core::{PersistenceId, RawState, RepositoryError, SingleStateRepository, State};
use flows_dynamodb::{
    DEFAULT_MAX_STATE_SIZE, DynamoDbStateRepository, DynamoDbStore, TableMode, WriteMode,
};

fn url() -> String {
    let endpoint = std::env::var("FLOWS_TEST_DYNAMODB_ENDPOINT")
        .unwrap_or_else(|_| "http://127.0.0.1:8000".to_owned());
    let host = endpoint
        .split_once("://")
        .map_or(endpoint.as_str(), |(_, h)| h);
    format!("dynamodb://{}?tls=false", host.trim_end_matches('/'))
}

fn table() -> String {
    format!("dyn_{}_{}", std::process::id(), rand::random::<u32>())
}

async fn repository(mode: WriteMode) -> DynamoDbStateRepository {
    let store = DynamoDbStore::connect(&url()).await.expect("connect");
    DynamoDbStateRepository::new(store, &table())
        .await
        .unwrap_or_else(|e| {
            panic!("cannot use the test DynamoDB server ({e}); run scripts/servers start dynamodb")
        })
        .with_write_mode(mode)
}

fn id(s: &str) -> PersistenceId {
    PersistenceId::new(s).expect("id")
}

/// The declared maximum fits the 400 KB item limit even with the longest id.
#[tokio::test]
async fn largest_state_with_longest_id_fits_one_item() {
    let store = repository(WriteMode::Transactional).await;
    let long_id = id(&"é".repeat(PersistenceId::MAX_LEN / 2));
    let mut state: RawState = State::fresh(long_id.clone());
    let internal = state.encode_internal().len();
    state.content = Some(vec![0xAB; DEFAULT_MAX_STATE_SIZE - internal]);
    // Alone (PutItem) and in a transaction with a second state (TransactWriteItems).
    store.upsert(&state).await.expect("largest state alone");
    let mut other = state.clone();
    other.id = id(&"x".repeat(PersistenceId::MAX_LEN));
    let read = store.get(&long_id).await.expect("get");
    store
        .upsert_all(vec![read, other])
        .await
        .expect("largest states in one transaction");
}

/// Without transactions, a batch with a stale state writes every other state and names
/// the stale one.
#[tokio::test]
async fn conditional_puts_write_all_but_the_stale_states() {
    let store = repository(WriteMode::ConditionalPuts).await;
    let old = store
        .upsert(&State::fresh(id("stale")).with_content(b"1".to_vec()))
        .await
        .expect("write");
    store.upsert(&old.clone()).await.expect("bump");
    let batch = vec![
        State::fresh(id("fresh")).with_content(b"x".to_vec()),
        old.with_content(b"lost".to_vec()),
    ];
    match store.upsert_all(batch).await {
        Err(RepositoryError::Conflict { ids }) => assert_eq!(ids, vec![id("stale")]),
        other => panic!("expected a conflict, got {other:?}"),
    }
    let read = store
        .get_all(&[id("fresh"), id("stale")])
        .await
        .expect("get");
    assert_eq!(read[0].version, 1, "the non-stale state is written");
    assert_eq!(
        (read[1].version, read[1].content.as_deref()),
        (2, Some(&b"1"[..]))
    );
}

/// `RequireExisting` on a missing table is a configuration error, not a creation.
#[tokio::test]
async fn require_existing_rejects_a_missing_table() {
    let store = DynamoDbStore::connect(&url()).await.expect("connect");
    let err = DynamoDbStateRepository::open(store, &table(), TableMode::RequireExisting)
        .await
        .expect_err("missing table");
    assert!(matches!(err, RepositoryError::Configuration(_)), "{err}");
}

/// An endpoint where nothing listens is a transient error.
#[tokio::test]
async fn unreachable_endpoint_is_unavailable() {
    let store = DynamoDbStore::connect("dynamodb://127.0.0.1:9?tls=false")
        .await
        .expect("connect sends nothing");
    let err = DynamoDbStateRepository::new(store, "never_created")
        .await
        .expect_err("nothing listens on port 9");
    assert!(err.is_transient(), "{err}");
}
