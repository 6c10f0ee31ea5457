//! Outputs that cannot be published, on librdkafka's in-process mock cluster: a record
//! refused for good charges its input, which goes through the error policy (its dead
//! letter names the output and the error), and a stateful pipeline stores that dead
//! letter in place of the refused output, so a replay never meets the same refusal.
//! Transient failures are retried and a waiting partition shows in the metrics.
//! Configuration errors stop the pipeline.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::sync::Arc;
use std::time::Duration;

use flows::function::{PersistenceIdFn, StatefulFunction, StatelessFunction};
use flows::kafka::policy::headers;
use flows::kafka::rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use flows::kafka::{EmbeddedKafka, Engine, ErrorPolicy, Pipeline};
use flows::{Json, MemoryStateRepository, Record, Topic, Utf8};
use flows_integration_tests::{
    FaultyStore, init_tracing, produce, read_topic, stored_counts, test_config, text_record,
    wait_until,
};

const WAIT: Duration = Duration::from_secs(60);

fn cluster(topics: &[(&str, i32)]) -> EmbeddedKafka {
    init_tracing();
    let kafka = EmbeddedKafka::start(1).unwrap();
    for (topic, partitions) in topics {
        kafka.create_topic(topic, *partitions, 1).unwrap();
    }
    kafka
}

/// Copies each word to `out`; the word "astray" goes to partition 99, which `out`
/// does not have.
fn astray() -> StatelessFunction {
    StatelessFunction::one_to_one(
        Topic::new("words", Utf8, Utf8),
        Topic::new("out", Utf8, Utf8),
        |m| {
            let record = Record::new(m.key, m.value.clone());
            Ok(if m.value == "astray" {
                record.with_partition(99)
            } else {
                record
            })
        },
    )
}

fn inputs(words: &[&str]) -> Vec<flows::EncodedRecord> {
    words
        .iter()
        .enumerate()
        .map(|(i, w)| text_record("words", Some(0), &format!("k{i}"), w))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_output_to_a_missing_partition_dead_letters_its_input_alone() {
    let kafka = cluster(&[("words", 1), ("out", 2), ("dlq", 1)]);
    let brokers = kafka.bootstrap_servers();
    let words = ["a", "b", "astray", "c", "d"];
    produce(&brokers, &inputs(&words)).await;
    let pipeline = Pipeline::stateless("copy", astray()).on_error(ErrorPolicy::dead_letter("dlq"));
    let running = Engine::new(test_config(&brokers)).start(&pipeline).unwrap();
    assert!(wait_until(WAIT, || running.metrics().snapshot().committed >= 5).await);
    let metrics = running.metrics().snapshot();
    running.shutdown().await.unwrap();

    assert_eq!(metrics.unpublishable, 1);
    assert_eq!(metrics.dead_lettered, 1);
    let out: Vec<String> = read_topic(&brokers, "out", 4, WAIT)
        .iter()
        .map(|r| r.value_str())
        .collect();
    let mut sorted = out.clone();
    sorted.sort();
    assert_eq!(
        sorted,
        ["a", "b", "c", "d"],
        "the other outputs are published"
    );
    let dead = read_topic(&brokers, "dlq", 1, WAIT);
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].value_str(), "astray", "the input, byte for byte");
    assert_eq!(
        dead[0].header(headers::ERROR_KIND).as_deref(),
        Some("unpublishable")
    );
    let message = dead[0].header(headers::ERROR_MESSAGE).unwrap();
    assert!(message.contains("output to out"), "{message}");
    assert_eq!(dead[0].header(headers::SOURCE_OFFSET).as_deref(), Some("2"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_the_stop_policy_a_refused_output_stops_the_pipeline_uncommitted() {
    let kafka = cluster(&[("words", 1), ("out", 2)]);
    let brokers = kafka.bootstrap_servers();
    produce(&brokers, &inputs(&["a", "astray", "b"])).await;
    let running = Engine::new(test_config(&brokers))
        .start(&Pipeline::stateless("copy", astray()))
        .unwrap();
    assert!(wait_until(WAIT, || running.is_stopping()).await);
    let committed = running.metrics().snapshot().committed;
    let error = running.wait().await.unwrap_err();
    assert!(error.to_string().contains("cannot be published"), "{error}");
    assert_eq!(
        committed, 0,
        "the batch with the refused output is not committed"
    );
}

/// Word count whose output for the word "huge" is 20 KB, over the producer's 10 KB
/// `message.max.bytes`.
fn counter_with_a_huge_output() -> StatefulFunction<i64> {
    StatefulFunction::new(Json::<i64>::new()).one_to_one(
        Topic::new("words", Utf8, Utf8),
        Topic::new("counts", Utf8, Utf8),
        PersistenceIdFn::from_fn(|m: &flows::Message<String, String>| {
            Ok(flows::PersistenceId::new(&m.value)?)
        }),
        |count: Option<&i64>, word| {
            let count = count.copied().unwrap_or(0) + 1;
            let value = if word.value == "huge" {
                "x".repeat(20_000)
            } else {
                count.to_string()
            };
            Ok((count, Record::new(word.value, value)))
        },
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stateful_output_too_large_is_dead_lettered_and_never_replayed_into_the_same_refusal() {
    let kafka = cluster(&[("words", 1), ("counts", 1), ("dlq", 1)]);
    let brokers = kafka.bootstrap_servers();
    let words = ["a", "huge", "a", "b", "huge"];
    produce(&brokers, &inputs(&words)).await;
    let store = Arc::new(MemoryStateRepository::new());
    let pipeline = || {
        Pipeline::stateful("count", counter_with_a_huge_output(), Arc::clone(&store))
            .on_error(ErrorPolicy::dead_letter("dlq"))
    };
    let config = |prefix: &str| {
        test_config(&brokers)
            .group_prefix(prefix)
            .producer_property("message.max.bytes", "10000")
    };
    let running = Engine::new(config("")).start(&pipeline()).unwrap();
    assert!(wait_until(WAIT, || running.metrics().snapshot().committed >= 5).await);
    let first = running.metrics().snapshot();
    running.shutdown().await.unwrap();
    assert_eq!(first.unpublishable, 2);
    // The messages were applied: only their outputs could not be published.
    let counts = stored_counts(store.as_ref(), ["a", "b", "huge"].map(String::from)).await;
    assert_eq!(counts["huge"], 2);
    assert_eq!(counts["a"], 2);
    let dead = read_topic(&brokers, "dlq", 2, WAIT);
    assert_eq!(dead.len(), 2);
    assert!(dead.iter().all(|d| d.value_str() == "huge"));

    // Every message again (a new consumer group), as after a crash before the commit:
    // the last write's stored outputs replay, and for "huge" that is now its dead
    // letter, byte for byte, not the output the producer refuses.
    let running = Engine::new(config("again.")).start(&pipeline()).unwrap();
    assert!(wait_until(WAIT, || running.metrics().snapshot().committed >= 5).await);
    let second = running.metrics().snapshot();
    running.shutdown().await.unwrap();
    assert_eq!(second.unpublishable, 0, "no refusal on replay");
    let dead_again = read_topic(&brokers, "dlq", 4, WAIT);
    assert_eq!(dead_again.len(), 4, "both dead letters replayed once");
    for (replayed, first) in dead_again[2..].iter().zip(&dead) {
        assert_eq!(replayed.value, first.value);
        assert_eq!(replayed.headers, first.headers, "replayed byte for byte");
    }
    let counts = stored_counts(store.as_ref(), ["a", "b", "huge"].map(String::from)).await;
    assert_eq!(counts["huge"], 2, "nothing applied twice");
}

/// A broker refuses a whole request batch for one bad record. The records of a refused
/// batch are sent again one per batch, and only those refused alone are charged to
/// their inputs: here the broker refuses the next three produce requests, the first of
/// which holds the batch of 50 records; of the records then sent alone, the next two
/// are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_records_the_broker_refuses_alone_dead_letter_their_inputs() {
    let kafka = cluster(&[("words", 1), ("out", 1), ("dlq", 1)]);
    let brokers = kafka.bootstrap_servers();
    let copy = StatelessFunction::one_to_one(
        Topic::new("words", Utf8, Utf8),
        Topic::new("out", Utf8, Utf8),
        |m| Ok(Record::new(m.key, m.value)),
    );
    let pipeline = Pipeline::stateless("copy", copy).on_error(ErrorPolicy::dead_letter("dlq"));
    let words: Vec<String> = (0..50).map(|i| format!("w{i}")).collect();
    let refs: Vec<&str> = words.iter().map(String::as_str).collect();
    produce(&brokers, &inputs(&refs)).await;
    kafka.mock().request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_POLICY_VIOLATION; 3],
    );
    let running = Engine::new(test_config(&brokers)).start(&pipeline).unwrap();
    assert!(wait_until(WAIT, || running.metrics().snapshot().committed >= 50).await);
    let metrics = running.metrics().snapshot();
    running.shutdown().await.unwrap();

    let out = read_topic(&brokers, "out", 0, WAIT);
    let dead = read_topic(&brokers, "dlq", 0, WAIT);
    assert!(
        (1..=2).contains(&dead.len()),
        "only records refused alone are charged: {} dead letters",
        dead.len()
    );
    assert_eq!(dead.len() as u64, metrics.unpublishable);
    let mut all: Vec<String> = out.iter().chain(&dead).map(|r| r.value_str()).collect();
    all.sort();
    let mut expected = words.clone();
    expected.sort();
    assert_eq!(
        all, expected,
        "every input published or dead-lettered, once"
    );
    assert!(
        dead.iter()
            .all(|d| d.header(headers::ERROR_KIND).as_deref() == Some("unpublishable"))
    );
}

/// A refused output's dead letter replaces it among the outputs kept for replay; when
/// that would make the state larger than the store accepts, the dead letter is
/// published once without being kept, and the pipeline goes on (it used to stop on
/// every restart).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_too_large_to_keep_beside_its_state_does_not_stop_the_pipeline() {
    let kafka = cluster(&[("words", 1), ("counts", 1), ("dlq", 1)]);
    let brokers = kafka.bootstrap_servers();
    let count = || {
        StatefulFunction::new(Json::<i64>::new()).one_to_one(
            Topic::new("words", Utf8, Utf8),
            Topic::new("counts", Utf8, Utf8),
            PersistenceIdFn::key(),
            |count: Option<&i64>, word| {
                let count = count.copied().unwrap_or(0) + 1;
                let record = Record::new(word.key, count.to_string());
                Ok((
                    count,
                    if word.value == "astray" {
                        record.with_partition(99)
                    } else {
                        record
                    },
                ))
            },
        )
    };
    // One message: one batch, whose state the test can measure beforehand.
    let batch = vec![text_record("words", Some(0), "k", "astray")];
    // The state's size once the message is applied, with its output kept.
    let scratch = MemoryStateRepository::new();
    let as_read: Vec<flows::RawMessage> = batch
        .iter()
        .enumerate()
        .map(|(i, r)| {
            flows::RawMessage::raw("words", 0, i as i64, r.key.as_deref(), r.value.as_deref())
        })
        .collect();
    let abort =
        |_: &flows::RawMessage, _: &flows::ProcessError| flows::function::ErrorAction::Abort;
    flows::kafka::apply_batch(&count(), &scratch, &as_read, &abort)
        .await
        .unwrap();
    let size =
        flows::SingleStateRepository::get(&scratch, &flows::PersistenceId::new("k").unwrap())
            .await
            .unwrap()
            .stored_size();

    produce(&brokers, &batch).await;
    let store = Arc::new(MemoryStateRepository::with_max_state_size(size + 40));
    let pipeline = Pipeline::stateful("count", count(), Arc::clone(&store))
        .on_error(ErrorPolicy::dead_letter("dlq"));
    let running = Engine::new(test_config(&brokers)).start(&pipeline).unwrap();
    assert!(
        wait_until(WAIT, || running.metrics().snapshot().committed >= 1
            || running.is_stopping())
        .await
    );
    assert!(!running.is_stopping(), "the pipeline went on");
    running.shutdown().await.unwrap();
    let dead = read_topic(&brokers, "dlq", 1, WAIT);
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].value_str(), "astray");
    let counts = stored_counts(store.as_ref(), ["k".to_owned()]).await;
    assert_eq!(counts["k"], 1, "applied once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_permission_stops_the_pipeline_with_a_clear_error() {
    let kafka = cluster(&[("words", 1), ("out", 1)]);
    let brokers = kafka.bootstrap_servers();
    let copy = StatelessFunction::one_to_one(
        Topic::new("words", Utf8, Utf8),
        Topic::new("out", Utf8, Utf8),
        |m| Ok(Record::new(m.key, m.value)),
    );
    // Even with a dead-letter policy: no record of the pipeline can be published.
    let pipeline = Pipeline::stateless("copy", copy).on_error(ErrorPolicy::dead_letter("dlq"));
    produce(&brokers, &inputs(&["a", "b"])).await;
    kafka.mock().request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED; 20],
    );
    let running = Engine::new(test_config(&brokers)).start(&pipeline).unwrap();
    assert!(wait_until(WAIT, || running.is_stopping()).await);
    let metrics = running.metrics().snapshot();
    let error = running.wait().await.unwrap_err();
    assert!(
        error.to_string().to_lowercase().contains("authoriz"),
        "{error}"
    );
    assert_eq!(metrics.committed, 0);
    assert_eq!(
        metrics.dead_lettered, 0,
        "not dead-lettered: a configuration error"
    );
}

/// The broker is unreachable while a batch waits to publish: the partition shows as
/// stalled (and the wait is logged) until the broker is back, then the batch
/// completes with nothing lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_broker_shows_as_a_stalled_partition_until_it_is_back() {
    let kafka = cluster(&[("words", 1), ("counts", 1)]);
    let brokers = kafka.bootstrap_servers();
    let store = Arc::new(FaultyStore::new(MemoryStateRepository::new()));
    let count = counter_with_a_huge_output();
    // Records time out after 1 s: each timeout is a transient failure the engine
    // retries.
    let config = test_config(&brokers).producer_property("message.timeout.ms", "1000");
    let running = Engine::new(config)
        .start(&Pipeline::stateful("count", count, Arc::clone(&store)))
        .unwrap();
    store.hold_writes();
    produce(&brokers, &inputs(&["a", "b", "a"])).await;
    assert!(wait_until(WAIT, || store.held() >= 1).await);
    kafka.mock().broker_down(1).unwrap();
    store.release_writes();
    let stalled = wait_until(WAIT, || {
        running.metrics().snapshot().stalled_partitions >= 1
    })
    .await;
    assert!(stalled, "{:?}", running.metrics().snapshot());
    kafka.mock().broker_up(1).unwrap();
    assert!(wait_until(WAIT, || running.metrics().snapshot().committed >= 3).await);
    assert!(
        wait_until(WAIT, || running.metrics().snapshot().stalled_partitions
            == 0)
        .await
    );
    let metrics = running.metrics().snapshot();
    running.shutdown().await.unwrap();
    assert!(metrics.transient_retries >= 1, "{metrics:?}");
    let counts = stored_counts(store.as_ref(), ["a", "b"].map(String::from)).await;
    assert_eq!((counts["a"], counts["b"]), (2, 1));
}
