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
use flows_kafka::{BatchError, apply_batch};

fn counter() -> StatefulFunction<i64> {
    counter_tagged(None)
}

/// [`counter`] whose outputs each carry a 48-byte header: what they store for replay
/// is more than the key and timestamp they share with their input (left out).
fn tagging_counter() -> StatefulFunction<i64> {
    counter_tagged(Some("counted by the hot-key test, forty-eight bytes."))
}

/// The word count, each output with a `tag` header when `tag` is given.
fn counter_tagged(tag: Option<&'static str>) -> StatefulFunction<i64> {
    StatefulFunction::new(Json::<i64>::new()).one_to_one(
        Topic::new("words", Utf8, Utf8),
        Topic::new("counts", Utf8, Json::<i64>::new()),
        PersistenceIdFn::key(),
        move |count, word| {
            let count = count.copied().unwrap_or(0) + 1;
            let record = Record::new(word.key, count);
            let record = match tag {
                Some(tag) => record.with_header("tag", tag),
                None => record,
            };
            Ok((count, record))
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

/// [`apply_batch`] of a batch that must be processed whole (no state nears the store's
/// limit here): its outputs.
async fn apply_whole(
    f: &(impl StatefulProcessor + ?Sized),
    store: &(impl SingleStateRepository + ?Sized),
    batch: &[RawMessage],
    on_error: &(dyn Fn(&RawMessage, &ProcessError) -> ErrorAction + Send + Sync),
) -> Result<Vec<EncodedRecord>, BatchError> {
    let output = apply_batch(f, store, batch, on_error).await?;
    assert_eq!(
        output.processed,
        batch.len(),
        "the whole batch is processed"
    );
    Ok(output.outputs)
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
    let out = apply_whole(&f, &store, &batch, &abort).await.unwrap();
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
    let first = apply_whole(&f, &store, &batch, &abort).await.unwrap();
    // The process died before publishing: the same batch comes again, then more.
    let replay = apply_whole(&f, &store, &batch, &abort).await.unwrap();
    assert_eq!(replay, first);
    assert_eq!(count_of(&store, "x").await, 2);
    let mut overlapping = batch[1..].to_vec();
    overlapping.extend(words(0, 13, &["x"]));
    let next = apply_whole(&f, &store, &overlapping, &abort).await.unwrap();
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
    let (out, parts) = apply_in_parts(&f, &store, &words(0, 0, &["a", "b", "a"]), &abort)
        .await
        .unwrap();
    // The conflict halved the batch: the first "a" alone, then the rest.
    assert_eq!(parts, 2);
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
    let err = apply_whole(&f, &store, &batch, &abort).await.unwrap_err();
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
    let out = apply_whole(&f, &store, &batch, &dead_letter).await.unwrap();
    let topics: Vec<_> = out.iter().map(|r| &*r.topic).collect();
    assert_eq!(topics, vec!["counts", "words-dlq", "counts"]);
    assert_eq!(count_of(&store, "a").await, 2);
}

/// DynamoDB's state limit (the `flows-dynamodb` crate's `DEFAULT_MAX_STATE_SIZE`).
const DYNAMODB_MAX_STATE_SIZE: usize = 400 * 1024 - 4 * 1024;

fn dead_letter(m: &RawMessage, e: &ProcessError) -> ErrorAction {
    ErrorAction::DeadLetter(vec![EncodedRecord {
        topic: "words-dlq".into(),
        partition: None,
        key: m.key.clone(),
        value: m.value.clone(),
        headers: Headers::new().with("flows.error.kind", e.kind().as_bytes().to_vec()),
        timestamp: m.timestamp,
    }])
}

/// Applies `batch` part after part, as the engine does (publishing each part's outputs
/// before the next); returns every output and the number of parts.
async fn apply_in_parts(
    f: &(impl StatefulProcessor + ?Sized),
    store: &(impl SingleStateRepository + ?Sized),
    batch: &[RawMessage],
    on_error: &(dyn Fn(&RawMessage, &ProcessError) -> ErrorAction + Send + Sync),
) -> Result<(Vec<EncodedRecord>, usize), BatchError> {
    let (mut outputs, mut parts, mut rest) = (Vec::new(), 0, batch);
    while !rest.is_empty() {
        let part = apply_batch(f, store, rest, on_error).await?;
        assert!(part.processed >= 1, "every part makes progress");
        outputs.extend(part.outputs);
        rest = &rest[part.processed..];
        parts += 1;
    }
    Ok((outputs, parts))
}

/// 10,000 messages of one key in one batch keep 10,000 outputs (of ~65 bytes stored)
/// for replay: ~650 KB, over DynamoDB's limit. The batch is written in parts that each
/// fit, the count is exact, and a part replayed after a crash re-emits its outputs.
#[tokio::test]
async fn a_hot_key_is_written_in_parts_that_fit_the_store() {
    let f = tagging_counter();
    let store = MemoryStateRepository::with_max_state_size(DYNAMODB_MAX_STATE_SIZE);
    const HOT: &str = "a-hot-key-whose-name-is-thirty-six-by";
    let hot: Vec<&str> = vec![HOT; 10_000];
    let mut batch = words(0, 0, &hot);
    batch.extend(words(0, 10_000, &["cold", HOT, "cold"]));

    let first = apply_batch(&f, &store, &batch, &abort).await.unwrap();
    assert!(
        first.processed < batch.len(),
        "one part cannot hold them all"
    );
    let state = store.get(&PersistenceId::new(HOT).unwrap()).await.unwrap();
    assert!(state.stored_size() <= DYNAMODB_MAX_STATE_SIZE);
    // A crash before the part's outputs were published: the part replays identically.
    let replay = apply_batch(&f, &store, &batch, &abort).await.unwrap();
    assert_eq!(replay.processed, first.processed);
    assert_eq!(replay.outputs, first.outputs, "replayed byte for byte");

    let (rest, parts) = apply_in_parts(&f, &store, &batch[first.processed..], &abort)
        .await
        .unwrap();
    assert!(parts >= 1);
    let counts: Vec<i64> = first
        .outputs
        .iter()
        .chain(&rest)
        .filter(|r| r.key.as_deref() == Some(HOT.as_bytes()))
        .map(|r| serde_json::from_slice(r.value.as_deref().unwrap()).unwrap())
        .collect();
    assert_eq!(
        counts,
        (1..=10_001).collect::<Vec<i64>>(),
        "every count, in order"
    );
    assert_eq!(count_of(&store, HOT).await, 10_001);
    assert_eq!(count_of(&store, "cold").await, 2);
}

/// A state that grows with every message (the user's content) eventually does not fit:
/// the message that would make it too large goes through the error policy, named in
/// its dead letter, the state stays as it was, and the batch goes on.
#[tokio::test]
async fn a_message_that_makes_its_state_too_large_follows_the_error_policy() {
    let f = StatefulFunction::new(Utf8).one_to_one(
        Topic::new("words", Utf8, Utf8),
        Topic::new("counts", Utf8, Json::<i64>::new()),
        PersistenceIdFn::key(),
        |text: Option<&String>, word| {
            let text = format!("{}{}", text.map_or("", String::as_str), word.value);
            let length = text.len() as i64;
            Ok((text, Record::new(word.key, length)))
        },
    );
    const MAX: usize = 3584;
    let store = MemoryStateRepository::with_max_state_size(MAX);
    let long = "x".repeat(1000);
    let batch: Vec<RawMessage> = (0..8)
        .map(|i| {
            let key = if i == 6 { "other" } else { "grows" };
            RawMessage::raw("words", 0, i, Some(key.as_bytes()), Some(long.as_bytes()))
        })
        .collect();

    // The stop policy: the batch stops at the message, with a typed error.
    let error = apply_in_parts(&f, &store, &batch, &abort)
        .await
        .unwrap_err();
    assert!(
        error.to_string().contains("would be") && error.to_string().contains("3584"),
        "{error}"
    );

    let store = MemoryStateRepository::with_max_state_size(MAX);
    let (outputs, parts) = apply_in_parts(&f, &store, &batch, &dead_letter)
        .await
        .unwrap();
    assert!(parts > 1, "the batch went on after the refused message");
    let kinds: Vec<String> = outputs
        .iter()
        .map(|r| match &*r.topic {
            "words-dlq" => {
                String::from_utf8_lossy(r.headers.first("flows.error.kind").flatten().unwrap())
                    .into_owned()
            }
            _ => String::from_utf8_lossy(r.key.as_deref().unwrap()).into_owned(),
        })
        .collect();
    // Three 1,000-byte texts fit in 3.5 KiB with their outputs; the fourth does not, nor
    // do the ones after it; "other" is unaffected.
    assert_eq!(
        kinds,
        [
            "grows",
            "grows",
            "grows",
            "state-too-large",
            "state-too-large",
            "state-too-large",
            "other",
            "state-too-large"
        ]
    );
    let state = store
        .get(&PersistenceId::new("grows").unwrap())
        .await
        .unwrap();
    assert_eq!(state.content.map(|c| c.len()), Some(3000), "left as it was");
    // Replayed after a crash, the last write's dead letter (message 7's, stored
    // without the message's bytes) is re-emitted byte for byte; nothing is applied.
    let (replayed, parts) = apply_in_parts(&f, &store, &batch, &dead_letter)
        .await
        .unwrap();
    assert_eq!(parts, 1, "nothing left to write");
    let dead: Vec<&EncodedRecord> = replayed
        .iter()
        .filter(|r| &*r.topic == "words-dlq")
        .collect();
    assert_eq!(dead, [&outputs[7]], "re-emitted as first published");
    assert_eq!(
        store
            .get(&PersistenceId::new("grows").unwrap())
            .await
            .unwrap()
            .content
            .map(|c| c.len()),
        Some(3000)
    );
}

/// A dead letter too large to keep beside its state even without the message's bytes
/// (here: 500 bytes of headers, with 100 bytes to spare): the message is still recorded
/// as handled, never applied later, and its dead letter is published once.
#[tokio::test]
async fn a_dead_letter_that_cannot_be_kept_is_published_once_and_the_message_stays_handled() {
    let f = StatefulFunction::new(Utf8).one_to_one(
        Topic::new("words", Utf8, Utf8),
        Topic::new("counts", Utf8, Json::<i64>::new()),
        PersistenceIdFn::key(),
        |text: Option<&String>, word| {
            let text = format!("{}{}", text.map_or("", String::as_str), word.value);
            let length = text.len() as i64;
            Ok((text, Record::new(word.key, length)))
        },
    );
    let verbose = |m: &RawMessage, e: &ProcessError| {
        let ErrorAction::DeadLetter(mut records) = dead_letter(m, e) else {
            unreachable!()
        };
        records[0]
            .headers
            .append("explanation", Some(vec![b'.'; 500]));
        ErrorAction::DeadLetter(records)
    };
    let long = "x".repeat(1000);
    let batch: Vec<RawMessage> = (0..4)
        .map(|i| RawMessage::raw("words", 0, i, Some(b"grows"), Some(long.as_bytes())))
        .collect();
    // How large three texts are, stored.
    let roomy = MemoryStateRepository::new();
    apply_whole(&f, &roomy, &batch[..3], &abort).await.unwrap();
    let three = roomy
        .get(&PersistenceId::new("grows").unwrap())
        .await
        .unwrap();

    let store = MemoryStateRepository::with_max_state_size(three.stored_size() + 100);
    let (outputs, _) = apply_in_parts(&f, &store, &batch, &verbose).await.unwrap();
    assert_eq!(outputs.len(), 4);
    assert_eq!(&*outputs[3].topic, "words-dlq", "published once");
    let state = store
        .get(&PersistenceId::new("grows").unwrap())
        .await
        .unwrap();
    assert_eq!(state.content.map(|c| c.len()), Some(3000));
    assert_eq!(
        state.progress.get(&batch[3].topic_partition()),
        Some(3),
        "handled"
    );
    // Replayed, it is neither applied nor failed again.
    let (replayed, _) = apply_in_parts(&f, &store, &batch, &verbose).await.unwrap();
    assert!(replayed.is_empty(), "{replayed:?}");
}
