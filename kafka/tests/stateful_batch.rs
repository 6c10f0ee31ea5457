//! The store half of a stateful batch, on the in-memory store: exact counts, identical
//! replays, conflicts with another writer resolved by re-reading, bad ids dead-lettered.

#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use async_trait::async_trait;
use flows_core::function::{
    ErrorAction, PersistenceIdFn, StatefulFunction, StatefulProcessor, fold,
};
use flows_core::{
    Capabilities, EncodedRecord, Headers, Json, MemoryStateRepository, PersistenceId, ProcessError,
    RawMessage, RawState, Record, RepositoryError, SingleStateRepository, Topic, Utf8,
};
use flows_kafka::apply_batch;

fn counter() -> StatefulFunction<i64> {
    StatefulFunction::new(Json::<i64>::new()).one_to_one(
        Topic::new("words", Utf8, Utf8),
        Topic::new("counts", Utf8, Json::<i64>::new()),
        PersistenceIdFn::key(),
        |count, word| {
            let count = count.copied().unwrap_or(0) + 1;
            Ok((count, Record::new(word.key, count)))
        },
    )
}

fn words(partition: i32, first_offset: i64, words: &[&str]) -> Vec<RawMessage> {
    words
        .iter()
        .enumerate()
        .map(|(i, w)| {
            let key = (!w.is_empty()).then_some(w.as_bytes());
            RawMessage::raw(
                "words",
                partition,
                first_offset + i as i64,
                key,
                Some(w.as_bytes()),
            )
        })
        .collect()
}

fn abort(_: &RawMessage, _: &ProcessError) -> ErrorAction {
    ErrorAction::Abort
}

fn summary(outputs: &[EncodedRecord]) -> Vec<(String, i64)> {
    outputs
        .iter()
        .map(|r| {
            (
                String::from_utf8(r.key.clone().unwrap_or_default()).unwrap(),
                serde_json::from_slice(r.value.as_deref().unwrap()).unwrap(),
            )
        })
        .collect()
}

async fn count_of(store: &impl SingleStateRepository, word: &str) -> i64 {
    let state = store.get(&PersistenceId::new(word).unwrap()).await.unwrap();
    serde_json::from_slice(&state.content.unwrap()).unwrap()
}

#[tokio::test]
async fn outputs_follow_input_order_and_counts_are_exact() {
    let (f, store) = (counter(), MemoryStateRepository::new());
    let batch = words(0, 0, &["a", "b", "a", "c", "a", "b"]);
    let out = apply_batch(&f, &store, &batch, &abort).await.unwrap();
    let expected: Vec<(String, i64)> = [("a", 1), ("b", 1), ("a", 2), ("c", 1), ("a", 3), ("b", 2)]
        .iter()
        .map(|(w, n)| ((*w).to_owned(), *n))
        .collect();
    assert_eq!(summary(&out), expected);
    assert_eq!(count_of(&store, "a").await, 3);
    assert_eq!(
        store
            .get(&PersistenceId::new("a").unwrap())
            .await
            .unwrap()
            .version,
        1,
        "one write per key per batch"
    );
}

#[tokio::test]
async fn a_replayed_batch_re_emits_identical_outputs_without_counting_again() {
    let (f, store) = (counter(), MemoryStateRepository::new());
    let batch = words(0, 10, &["x", "y", "x"]);
    let first = apply_batch(&f, &store, &batch, &abort).await.unwrap();
    // The process died before publishing: the same batch comes again, then more.
    let replay = apply_batch(&f, &store, &batch, &abort).await.unwrap();
    assert_eq!(replay, first);
    assert_eq!(count_of(&store, "x").await, 2);
    let mut overlapping = batch[1..].to_vec();
    overlapping.extend(words(0, 13, &["x"]));
    let next = apply_batch(&f, &store, &overlapping, &abort).await.unwrap();
    assert_eq!(
        summary(&next),
        vec![
            ("y".to_owned(), 1),
            ("x".to_owned(), 2),
            ("x".to_owned(), 3)
        ]
    );
    assert_eq!(count_of(&store, "x").await, 3);
}

/// A store where another writer (say, another partition's worker) applies a message to
/// the same state between our read and our write, once.
struct RacingStore {
    inner: MemoryStateRepository,
    raced: AtomicBool,
    rival: Mutex<Option<RawMessage>>,
}

#[async_trait]
impl SingleStateRepository for RacingStore {
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }
    async fn get_all(&self, ids: &[PersistenceId]) -> Result<Vec<RawState>, RepositoryError> {
        self.inner.get_all(ids).await
    }
    async fn upsert_all(&self, states: Vec<RawState>) -> Result<Vec<RawState>, RepositoryError> {
        if !self.raced.swap(true, Ordering::SeqCst) {
            let rival = self.rival.lock().unwrap().take().unwrap();
            let f = counter();
            let id = f.persistence_id(&rival).unwrap();
            let current = self.inner.get(&id).await.unwrap();
            let write = fold(&f, current, &[&rival], abort).unwrap().write.unwrap();
            self.inner.upsert(&write).await.unwrap();
        }
        self.inner.upsert_all(states).await
    }
}

#[tokio::test]
async fn a_conflicting_writer_is_re_read_and_nothing_is_lost() {
    let store = RacingStore {
        inner: MemoryStateRepository::new(),
        raced: AtomicBool::new(false),
        rival: Mutex::new(Some(words(7, 100, &["a"]).remove(0))),
    };
    let f = counter();
    let out = apply_batch(&f, &store, &words(0, 0, &["a", "b", "a"]), &abort)
        .await
        .unwrap();
    // The rival's message counted first, so ours see 2 and 3; b was re-applied after the
    // rolled-back attempt and still counts once.
    assert_eq!(
        summary(&out),
        vec![
            ("a".to_owned(), 2),
            ("b".to_owned(), 1),
            ("a".to_owned(), 3)
        ]
    );
    assert_eq!(count_of(&store.inner, "a").await, 3);
    assert_eq!(count_of(&store.inner, "b").await, 1);
}

#[tokio::test]
async fn messages_without_a_valid_id_follow_the_error_policy() {
    let (f, store) = (counter(), MemoryStateRepository::new());
    let batch = words(0, 0, &["a", "", "a"]); // the empty word has a null key
    let err = apply_batch(&f, &store, &batch, &abort).await.unwrap_err();
    assert!(err.to_string().contains("words/0@1"), "{err}");
    assert!(
        !store
            .get(&PersistenceId::new("a").unwrap())
            .await
            .unwrap()
            .exists(),
        "aborted batch wrote"
    );
    let dead_letter = |m: &RawMessage, e: &ProcessError| {
        ErrorAction::DeadLetter(vec![EncodedRecord {
            topic: "words-dlq".into(),
            partition: None,
            key: m.key.clone(),
            value: m.value.clone(),
            headers: Headers::new().with("flows-error", e.to_string().into_bytes()),
            timestamp: m.timestamp,
        }])
    };
    let out = apply_batch(&f, &store, &batch, &dead_letter).await.unwrap();
    let topics: Vec<_> = out.iter().map(|r| &*r.topic).collect();
    assert_eq!(topics, vec!["counts", "words-dlq", "counts"]);
    assert_eq!(count_of(&store, "a").await, 2);
}
