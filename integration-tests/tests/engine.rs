//! The engine end to end on librdkafka's in-process mock cluster: every pipeline kind,
//! error policies, store and broker faults, restarts and rebalances. Each test starts
//! its own cluster, so tests run in parallel.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use flows::function::{PersistenceIdFn, StatefulFunction, StatelessFunction};
use flows::kafka::policy::headers;
use flows::kafka::rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use flows::kafka::{EmbeddedKafka, Engine, ErrorPolicy, Join, Pipeline};
use flows::{
    FunctionError, Json, MemoryStateRepository, MemoryUpsertRepository, Record, Row, RowChange,
    RowError, TableSchema, Topic, UpsertRepository, Utf8, Value,
};
use flows_integration_tests::{
    FaultyStore, FaultyTable, TEST_BATCH_DELAY, check_word_count_outputs, init_tracing, produce,
    read_topic, stored_counts, tally, test_config, text_record, wait_until,
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

/// `n` words over `distinct` values, in a scrambled but reproducible order.
fn words(n: usize, distinct: usize, seed: usize) -> Vec<String> {
    (0..n)
        .map(|i| format!("w{}", (i * 7919 + seed * 31 + i / 3) % distinct))
        .collect()
}

fn word_records(topic: &str, words: &[String]) -> Vec<flows::EncodedRecord> {
    words
        .iter()
        .map(|w| text_record(topic, None, w, w))
        .collect()
}

/// Word count with the count as plain text, so outputs are easy to read back.
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
        Topic::new("counts", Utf8, Utf8),
        PersistenceIdFn::key(),
        move |count: Option<&i64>, word| {
            let count = count.copied().unwrap_or(0) + 1;
            let record = Record::new(word.key, count.to_string());
            let record = match tag {
                Some(tag) => record.with_header("tag", tag),
                None => record,
            };
            Ok((count, record))
        },
    )
}

async fn assert_word_count(
    brokers: &str,
    store: &dyn flows::SingleStateRepository,
    expected: &HashMap<String, i64>,
) -> usize {
    let stored = stored_counts(store, expected.keys().cloned()).await;
    assert_eq!(&stored, expected, "stored counts (G1)");
    let total: i64 = expected.values().sum();
    let outputs = read_topic(brokers, "counts", total as usize, WAIT);
    check_word_count_outputs(&outputs, expected).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn word_count_is_exact_and_outputs_follow_input_order() {
    let kafka = cluster(&[("words", 4), ("counts", 4)]);
    let brokers = kafka.bootstrap_servers();
    let input = words(3_000, 40, 1);
    produce(&brokers, &word_records("words", &input)).await;

    let store = Arc::new(MemoryStateRepository::new());
    let engine = Engine::new(test_config(&brokers));
    let running = engine
        .start(&Pipeline::stateful("count", counter(), Arc::clone(&store)))
        .unwrap();
    assert!(wait_until(WAIT, || running.metrics().snapshot().committed >= 3_000).await);
    let metrics = running.metrics().snapshot();
    running.shutdown().await.unwrap();

    let expected = tally(input.iter().map(String::as_str));
    let duplicates = assert_word_count(&brokers, store.as_ref(), &expected).await;
    assert_eq!(
        duplicates, 0,
        "no replay happened, so no duplicate may appear"
    );
    assert_eq!(metrics.published, 3_000);
    // Each word is read from the store once, when first seen; the cache serves it after.
    assert_eq!(metrics.states_read, expected.len() as u64, "{metrics:?}");
    assert!(metrics.state_cache_hits > 0, "{metrics:?}");
    assert!(
        metrics.batches < 3_000,
        "messages are processed in batches ({} batches)",
        metrics.batches
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stateless_merge_explode_and_filter() {
    let kafka = cluster(&[("left", 2), ("right", 3), ("tokens", 2), ("long-tokens", 1)]);
    let brokers = kafka.bootstrap_servers();
    let lines = ["the quick brown fox", "jumps over", "the lazy dog"];
    let mut records = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let topic = if i % 2 == 0 { "left" } else { "right" };
        records.push(text_record(topic, None, &format!("line-{i}"), line));
    }
    produce(&brokers, &records).await;

    let split = StatelessFunction::merge(
        vec![
            Topic::new("left", Utf8, Utf8),
            Topic::new("right", Utf8, Utf8),
        ],
        Topic::new("tokens", Utf8, Utf8),
        |m| {
            Ok(m.value
                .split_whitespace()
                .map(|w| Record::new(w.to_owned(), w.to_owned()))
                .collect())
        },
    );
    let long = StatelessFunction::filter(Topic::new("tokens", Utf8, Utf8), "long-tokens", |m| {
        m.value.len() > 4
    });
    let engine = Engine::new(test_config(&brokers));
    let a = engine.start(&Pipeline::stateless("split", split)).unwrap();
    let b = engine.start(&Pipeline::stateless("long", long)).unwrap();
    assert!(wait_until(WAIT, || b.metrics().snapshot().committed >= 9).await);
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();

    let mut tokens: Vec<String> = read_topic(&brokers, "tokens", 9, WAIT)
        .iter()
        .map(|r| r.value_str())
        .collect();
    tokens.sort();
    let mut expected: Vec<&str> = lines.iter().flat_map(|l| l.split_whitespace()).collect();
    expected.sort();
    assert_eq!(tokens, expected);
    let mut long: Vec<String> = read_topic(&brokers, "long-tokens", 3, WAIT)
        .iter()
        .map(|r| r.value_str())
        .collect();
    long.sort();
    assert_eq!(long, ["brown", "jumps", "quick"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undecodable_messages_go_to_the_dead_letter_topic_with_their_bytes() {
    let kafka = cluster(&[("amounts", 1), ("doubled", 1), ("amounts-dlq", 1)]);
    let brokers = kafka.bootstrap_servers();
    let mut records = vec![
        text_record("amounts", None, "a", "1"),
        text_record("amounts", None, "b", "not json"),
        text_record("amounts", None, "c", "3"),
    ];
    records[1].headers.append("trace", Some(b"t-1".to_vec()));
    produce(&brokers, &records).await;

    let double = StatelessFunction::one_to_one(
        Topic::new("amounts", Utf8, Json::<i64>::new()),
        Topic::new("doubled", Utf8, Json::<i64>::new()),
        |m| Ok(Record::new(m.key, m.value * 2)),
    );
    let running = Engine::new(test_config(&brokers))
        .start(
            &Pipeline::stateless("double", double)
                .on_error(ErrorPolicy::dead_letter("amounts-dlq")),
        )
        .unwrap();
    assert!(wait_until(WAIT, || running.metrics().snapshot().committed >= 3).await);
    let metrics = running.metrics().snapshot();
    running.shutdown().await.unwrap();

    assert_eq!(metrics.dead_lettered, 1);
    let doubled: Vec<String> = read_topic(&brokers, "doubled", 2, WAIT)
        .iter()
        .map(|r| r.value_str())
        .collect();
    assert_eq!(doubled, ["2", "6"]);
    let dead = read_topic(&brokers, "amounts-dlq", 1, WAIT);
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].value_str(), "not json", "original bytes");
    assert_eq!(dead[0].key_str(), "b");
    assert_eq!(
        dead[0].header("trace").as_deref(),
        Some("t-1"),
        "original headers kept"
    );
    assert_eq!(
        dead[0].header(headers::ERROR_KIND).as_deref(),
        Some("decode")
    );
    assert_eq!(dead[0].header(headers::SOURCE_OFFSET).as_deref(), Some("1"));
    assert_eq!(dead[0].header(headers::PIPELINE).as_deref(), Some("double"));
    assert!(
        dead[0]
            .header(headers::ERROR_MESSAGE)
            .unwrap()
            .contains("amounts")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stop_policy_stops_without_committing_the_failed_message() {
    let kafka = cluster(&[("words", 1), ("counts", 1)]);
    let brokers = kafka.bootstrap_servers();
    let input: Vec<String> = ["a", "b", "poison", "c"].map(String::from).to_vec();
    produce(&brokers, &word_records("words", &input)).await;

    let strict = || {
        StatefulFunction::new(Json::<i64>::new()).one_to_one(
            Topic::new("words", Utf8, Utf8),
            Topic::new("counts", Utf8, Utf8),
            PersistenceIdFn::key(),
            |count: Option<&i64>, word| {
                if word.value == "poison" {
                    return Err(FunctionError::new("poisoned word"));
                }
                let count = count.copied().unwrap_or(0) + 1;
                Ok((count, Record::new(word.key, count.to_string())))
            },
        )
    };
    let store = Arc::new(MemoryStateRepository::new());
    // Batches of one, so that "a" and "b" complete before the poison.
    let config = test_config(&brokers).batch(1, TEST_BATCH_DELAY);
    let engine = Engine::new(config);
    let running = engine
        .start(&Pipeline::stateful("count", strict(), Arc::clone(&store)))
        .unwrap();
    let error = running.wait().await.unwrap_err();
    assert!(error.to_string().contains("poisoned word"), "{error}");

    // Restarted with a function that accepts the word, the pipeline resumes at the
    // poison message: it was never committed, and nothing before it is applied twice.
    let running = engine
        .start(&Pipeline::stateful("count", counter(), Arc::clone(&store)))
        .unwrap();
    assert!(wait_until(WAIT, || running.metrics().snapshot().committed >= 2).await);
    running.shutdown().await.unwrap();
    assert_word_count(
        &brokers,
        store.as_ref(),
        &tally(input.iter().map(String::as_str)),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retrying_policy_reruns_a_failing_external_call() {
    let kafka = cluster(&[("orders", 1), ("confirmed", 1)]);
    let brokers = kafka.bootstrap_servers();
    produce(&brokers, &[text_record("orders", None, "o1", "order-1")]).await;

    let calls = Arc::new(AtomicU32::new(0));
    let seen = Arc::clone(&calls);
    // An external party that fails twice, then answers.
    let confirm = StatelessFunction::one_to_one(
        Topic::new("orders", Utf8, Utf8),
        Topic::new("confirmed", Utf8, Utf8),
        move |m| {
            if seen.fetch_add(1, Ordering::SeqCst) < 2 {
                return Err(FunctionError::new("service unavailable"));
            }
            Ok(Record::new(m.key, format!("{} confirmed", m.value)))
        },
    );
    let policy = ErrorPolicy::stop().with_retries(3, Duration::from_millis(50));
    let running = Engine::new(test_config(&brokers))
        .start(&Pipeline::stateless("confirm", confirm).on_error(policy))
        .unwrap();
    assert!(wait_until(WAIT, || running.metrics().snapshot().committed >= 1).await);
    let metrics = running.metrics().snapshot();
    running.shutdown().await.unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    assert_eq!(metrics.function_retries, 2);
    let out = read_topic(&brokers, "confirmed", 1, WAIT);
    assert_eq!(out[0].value_str(), "order-1 confirmed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_outage_is_waited_out_and_nothing_is_lost() {
    let kafka = cluster(&[("words", 3), ("counts", 3)]);
    let brokers = kafka.bootstrap_servers();
    let store = Arc::new(FaultyStore::new(MemoryStateRepository::new()));
    let running = Engine::new(test_config(&brokers))
        .start(&Pipeline::stateful("count", counter(), Arc::clone(&store)))
        .unwrap();
    let first = words(500, 20, 2);
    produce(&brokers, &word_records("words", &first)).await;
    assert!(wait_until(WAIT, || running.metrics().snapshot().committed >= 500).await);

    store.set_failing(true);
    let second = words(500, 20, 3);
    produce(&brokers, &word_records("words", &second)).await;
    assert!(
        wait_until(WAIT, || store.failures() >= 5).await,
        "the engine kept retrying"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        running.metrics().snapshot().committed,
        500,
        "nothing committed while down"
    );
    store.set_failing(false);
    assert!(wait_until(WAIT, || running.metrics().snapshot().committed >= 1_000).await);
    let metrics = running.metrics().snapshot();
    running.shutdown().await.unwrap();

    assert!(metrics.transient_retries >= 5, "{metrics:?}");
    let all = first.iter().chain(&second).map(String::as_str);
    assert_word_count(&brokers, store.as_ref(), &tally(all)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_errors_and_a_broker_outage_are_waited_out() {
    let kafka = cluster(&[("words", 2), ("counts", 2)]);
    let brokers = kafka.bootstrap_servers();
    let store = Arc::new(MemoryStateRepository::new());
    let running = Engine::new(test_config(&brokers))
        .start(&Pipeline::stateful("count", counter(), Arc::clone(&store)))
        .unwrap();
    let first = words(400, 15, 4);
    produce(&brokers, &word_records("words", &first)).await;
    assert!(wait_until(WAIT, || running.metrics().snapshot().committed >= 400).await);

    // Retriable produce errors: the idempotent producer retries them.
    let second = words(400, 15, 5);
    produce(&brokers, &word_records("words", &second)).await;
    kafka.mock().request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS; 6],
    );
    assert!(wait_until(WAIT, || running.metrics().snapshot().committed >= 800).await);

    // The only broker goes down for two seconds while input waits.
    let third = words(400, 15, 6);
    produce(&brokers, &word_records("words", &third)).await;
    kafka.mock().broker_down(1).unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    kafka.mock().broker_up(1).unwrap();
    assert!(wait_until(WAIT, || running.metrics().snapshot().committed >= 1_200).await);
    running.shutdown().await.unwrap();

    let all = first
        .iter()
        .chain(&second)
        .chain(&third)
        .map(String::as_str);
    assert_word_count(&brokers, store.as_ref(), &tally(all)).await;
}

/// A join: per account, credits add and debits subtract; every change publishes the
/// balance as text on `balances`.
fn balance() -> StatefulFunction<i64> {
    let output = Topic::new("balances", Utf8, Utf8);
    StatefulFunction::new(Json::<i64>::new())
        .one_to_one(
            Topic::new("credits", Utf8, Json::<i64>::new()),
            output.clone(),
            PersistenceIdFn::key(),
            |total: Option<&i64>, m| {
                let total = total.copied().unwrap_or(0) + m.value;
                Ok((total, Record::new(m.key, total.to_string())))
            },
        )
        .one_to_one(
            Topic::new("debits", Utf8, Json::<i64>::new()),
            output,
            PersistenceIdFn::key(),
            |total: Option<&i64>, m| {
                let total = total.copied().unwrap_or(0) - m.value;
                Ok((total, Record::new(m.key, total.to_string())))
            },
        )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_applies_both_topics_to_one_state() {
    let kafka = cluster(&[
        ("credits", 2),
        ("debits", 3),
        ("balance-mid", 4),
        ("balances", 2),
    ]);
    let brokers = kafka.bootstrap_servers();
    let join = Join::new("balance", "balance-mid", balance());
    let store = Arc::new(MemoryStateRepository::new());
    let engine = Engine::new(test_config(&brokers));
    let rekey = engine.start(&join.rekey_pipeline()).unwrap();
    let apply = engine
        .start(&join.stateful_pipeline(Arc::clone(&store)))
        .unwrap();

    let mut records = Vec::new();
    let mut expected: HashMap<String, i64> = HashMap::new();
    for i in 0..300i64 {
        let account = format!("acct-{}", i % 7);
        let (topic, delta) = if i % 3 == 0 {
            ("debits", -i)
        } else {
            ("credits", i)
        };
        *expected.entry(account.clone()).or_insert(0) += delta;
        records.push(text_record(topic, None, &account, &delta.abs().to_string()));
    }
    produce(&brokers, &records).await;
    assert!(wait_until(WAIT, || apply.metrics().snapshot().committed >= 300).await);
    rekey.shutdown().await.unwrap();
    apply.shutdown().await.unwrap();

    assert_eq!(
        stored_counts(store.as_ref(), expected.keys().cloned()).await,
        expected
    );
    let outputs = read_topic(&brokers, "balances", 300, WAIT);
    assert_eq!(outputs.len(), 300, "one output per source message");
    // The last output per account is its final balance.
    let mut last: HashMap<String, String> = HashMap::new();
    for record in &outputs {
        last.insert(record.key_str(), record.value_str());
    }
    for (account, total) in &expected {
        assert_eq!(last[account], total.to_string(), "{account}");
    }
}

/// A custom re-key mapper (through `intermediate_record`) that fans each transfer out
/// to two states, the payer's and the payee's, run twice over the same input (a second
/// consumer group: every source message is re-keyed again, as after a crash of the
/// re-key step before its commit). Every transfer moves its amount exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_custom_mapper_fanning_out_is_applied_once_however_often_it_republishes() {
    use flows::function::StatelessProcessor;
    use flows::kafka::intermediate_record;
    use flows::{PersistenceId, ProcessError, RawMessage};

    /// `from,to,amount` → one intermediate record per account, marked with its side.
    struct Transfers;
    impl StatelessProcessor for Transfers {
        fn input_topics(&self) -> Vec<Arc<str>> {
            vec!["transfers".into()]
        }
        fn process(&self, m: &RawMessage) -> Result<Vec<flows::EncodedRecord>, ProcessError> {
            let text = std::str::from_utf8(m.value.as_deref().unwrap_or_default())
                .map_err(|e| ProcessError::Function(FunctionError::from_error(e)))?;
            let parts: Vec<&str> = text.split(',').collect();
            let mut records = Vec::new();
            for (account, side) in [(parts[0], "debit"), (parts[1], "credit")] {
                let mut marked = m.clone();
                marked
                    .headers
                    .append("side", Some(side.as_bytes().to_vec()));
                let id = PersistenceId::new(account)?;
                records.push(intermediate_record("transfers-mid", &id, &marked));
            }
            Ok(records)
        }
    }

    let kafka = cluster(&[("transfers", 2), ("transfers-mid", 6), ("moves", 2)]);
    let brokers = kafka.bootstrap_servers();
    let balance = StatefulFunction::new(Json::<i64>::new()).one_to_one(
        Topic::new("transfers", Utf8, Utf8),
        Topic::new("moves", Utf8, Utf8),
        // Unused: the custom mapper chooses the ids.
        PersistenceIdFn::key(),
        |total: Option<&i64>, m| {
            let amount: i64 = m.value.rsplit(',').next().unwrap().parse().unwrap();
            let debit = m.headers.first("side").flatten() == Some(&b"debit"[..]);
            let total = total.copied().unwrap_or(0) + if debit { -amount } else { amount };
            Ok((total, Record::new(m.key, total.to_string())))
        },
    );
    let join = Join::new("ledger", "transfers-mid", balance);
    let store = Arc::new(MemoryStateRepository::new());
    let engine = Engine::new(test_config(&brokers));
    let apply = engine
        .start(&join.stateful_pipeline(Arc::clone(&store)))
        .unwrap();

    let mut records = Vec::new();
    let mut expected: HashMap<String, i64> = HashMap::new();
    for i in 0..400i64 {
        let (from, to, amount) = (format!("a{}", i % 5), format!("a{}", (i * 3 + 1) % 7), i);
        if from == to {
            continue;
        }
        *expected.entry(from.clone()).or_default() -= amount;
        *expected.entry(to.clone()).or_default() += amount;
        records.push(text_record(
            "transfers",
            None,
            &format!("t{i}"),
            &format!("{from},{to},{amount}"),
        ));
    }
    produce(&brokers, &records).await;
    let copies = 2 * records.len() as u64;
    for (run, prefix) in ["", "again."].into_iter().enumerate() {
        let rekey = Engine::new(test_config(&brokers).group_prefix(prefix))
            .start(&join.rekey_pipeline_with(Transfers))
            .unwrap();
        let done = copies * (run as u64 + 1);
        assert!(wait_until(WAIT, || apply.metrics().snapshot().committed >= done).await);
        rekey.shutdown().await.unwrap();
    }
    apply.shutdown().await.unwrap();
    assert_eq!(
        stored_counts(store.as_ref(), expected.keys().cloned()).await,
        expected,
        "each transfer moved its amount once, though re-keyed twice"
    );
}

/// The latest sentence seen for each word, materialised as a table row.
#[derive(Clone, Debug, PartialEq, Row)]
#[flows(table = "last_seen")]
struct LastSeen {
    #[flows(key)]
    word: String,
    line: String,
}

/// Materialises `topic` into `table` as [`LastSeen`] rows; the value "forget" deletes
/// its word's row.
fn last_seen(
    name: &str,
    topic: &str,
    table: impl UpsertRepository<LastSeen> + 'static,
) -> Pipeline {
    Pipeline::materialise(name, Topic::new(topic, Utf8, Utf8), table, |m| {
        Ok(vec![if m.value == "forget" {
            RowChange::Delete(m.key.into())
        } else {
            RowChange::Upsert(LastSeen {
                word: m.key,
                line: m.value,
            })
        }])
    })
}

/// Publishes `count` sightings ("line i") of `words` in turn to `topic`, then "forget"
/// for `forgotten`; returns the rows the table must end with.
async fn sightings(
    brokers: &str,
    topic: &str,
    words: &[String],
    count: usize,
    forgotten: &str,
) -> HashMap<String, String> {
    let mut records = Vec::new();
    let mut expected = HashMap::new();
    for i in 0..count {
        let word = &words[i % words.len()];
        let line = format!("line {i}");
        expected.insert(word.clone(), line.clone());
        records.push(text_record(topic, None, word, &line));
    }
    records.push(text_record(topic, None, forgotten, "forget"));
    expected.remove(forgotten);
    produce(brokers, &records).await;
    expected
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn materialise_upserts_the_latest_row_per_key_in_batches() {
    let kafka = cluster(&[("sightings", 3)]);
    let brokers = kafka.bootstrap_servers();
    let table = Arc::new(MemoryUpsertRepository::<LastSeen>::new());
    let words: Vec<String> = (0..25).map(|i| format!("w{i}")).collect();
    let expected = sightings(&brokers, "sightings", &words, 600, "w3").await;

    let running = Engine::new(test_config(&brokers))
        .start(&last_seen("last-seen", "sightings", Arc::clone(&table)))
        .unwrap();
    assert!(wait_until(WAIT, || running.metrics().snapshot().committed >= 601).await);
    let metrics = running.metrics().snapshot();
    running.shutdown().await.unwrap();
    assert!(metrics.batches < 601, "written in batches");
    let rows: HashMap<String, String> = table
        .rows()
        .unwrap()
        .into_iter()
        .map(|r| (r.word, r.line))
        .collect();
    assert_eq!(rows, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_pipeline_continues_exactly_where_it_stopped() {
    let kafka = cluster(&[("words", 4), ("counts", 4)]);
    let brokers = kafka.bootstrap_servers();
    let store = Arc::new(MemoryStateRepository::new());
    // Many small batches: a stop lands mid-stream.
    let config = test_config(&brokers).batch(20, TEST_BATCH_DELAY);
    let engine = Engine::new(config);
    let mut input = Vec::new();
    for round in 0..3 {
        let chunk = words(1_500, 30, 7 + round);
        produce(&brokers, &word_records("words", &chunk)).await;
        input.extend(chunk);
        let running = engine
            .start(&Pipeline::stateful("count", counter(), Arc::clone(&store)))
            .unwrap();
        assert!(wait_until(WAIT, || running.metrics().snapshot().committed >= 100).await);
        running.shutdown().await.unwrap();
    }
    let counted: i64 = stored_counts(store.as_ref(), input.iter().cloned())
        .await
        .values()
        .sum();
    assert!(
        (counted as usize) < input.len(),
        "the stops happened mid-stream ({counted} of {} counted)",
        input.len()
    );
    let running = engine
        .start(&Pipeline::stateful("count", counter(), Arc::clone(&store)))
        .unwrap();
    let expected = tally(input.iter().map(String::as_str));
    let done = wait_until(WAIT, || all_counted(&store, &expected)).await;
    running.shutdown().await.unwrap();
    assert!(done, "all words counted");
    assert_word_count(&brokers, store.as_ref(), &expected).await;
}

/// Whether the memory store's counts add up to the expected total (checked without awaiting).
fn all_counted(store: &MemoryStateRepository, expected: &HashMap<String, i64>) -> bool {
    let snapshot = store.snapshot();
    let total: i64 = snapshot
        .iter()
        .filter_map(|s| s.content.as_deref())
        .map(|c| serde_json::from_slice::<i64>(c).unwrap())
        .sum();
    total == expected.values().sum::<i64>()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_in_one_group_share_partitions_without_regressions() {
    let kafka = cluster(&[("words", 6), ("counts", 6)]);
    let brokers = kafka.bootstrap_servers();
    let store = Arc::new(MemoryStateRepository::new());
    let engine = Engine::new(test_config(&brokers));
    let pipeline = Pipeline::stateful("count", counter(), Arc::clone(&store));
    let first = engine.start(&pipeline).unwrap();
    let batch_a = words(3_000, 50, 8);
    produce(&brokers, &word_records("words", &batch_a)).await;
    wait_until(WAIT, || first.metrics().snapshot().committed >= 500).await;

    // A second instance joins mid-stream: partitions move while batches are in flight.
    let second = engine.start(&pipeline).unwrap();
    assert!(
        wait_until(WAIT, || second.metrics().snapshot().assigned_partitions > 0).await,
        "the second instance got partitions"
    );
    let batch_b = words(3_000, 50, 9);
    produce(&brokers, &word_records("words", &batch_b)).await;
    assert!(
        wait_until(WAIT, || second.metrics().snapshot().committed > 0).await,
        "the second instance processed its share"
    );
    // The first leaves mid-stream: its partitions move to the second.
    first.shutdown().await.unwrap();
    let batch_c = words(2_000, 50, 10);
    produce(&brokers, &word_records("words", &batch_c)).await;

    let all: Vec<&str> = batch_a
        .iter()
        .chain(&batch_b)
        .chain(&batch_c)
        .map(String::as_str)
        .collect();
    let expected = tally(all);
    let done = wait_until(WAIT, || all_counted(&store, &expected)).await;
    let metrics = second.metrics().snapshot();
    second.shutdown().await.unwrap();
    assert!(done, "all words counted");
    assert!(metrics.rebalances >= 2, "{metrics:?}");
    assert_word_count(&brokers, store.as_ref(), &expected).await;
}

/// G5: instance A stalls while writing a batch (its store holds the write), as a frozen
/// or cut-off process would; instance B joins and A's revoke blocks on the held write.
/// Then C joins: the group rebalances without A, which cannot rejoin in time and is
/// dropped (a real broker drops it after `max.poll.interval.ms`, the mock cluster after
/// the session timeout), and B and C process the same messages. When A's write is
/// finally let through, the version check rejects it and A drops that batch: nothing of
/// it is published or committed. Final state exact; outputs in order; repeats identical.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_instance_is_fenced_by_the_version_check() {
    let kafka = cluster(&[("words", 2), ("counts", 2)]);
    let brokers = kafka.bootstrap_servers();
    let shared = Arc::new(MemoryStateRepository::new());
    let stalled_store = Arc::new(FaultyStore::new(Arc::clone(&shared)));

    let stalled_config = test_config(&brokers).drain_timeout(Duration::from_secs(60));
    let a = Engine::new(stalled_config)
        .start(&Pipeline::stateful(
            "count",
            counter(),
            Arc::clone(&stalled_store),
        ))
        .unwrap();
    stalled_store.hold_writes();
    let input = words(400, 40, 11);
    produce(&brokers, &word_records("words", &input)).await;
    assert!(
        wait_until(WAIT, || stalled_store.held() >= 2).await,
        "both of A's partition workers are stuck writing"
    );

    let rebalances = a.metrics().snapshot().rebalances;
    let fresh = || Pipeline::stateful("count", counter(), Arc::clone(&shared));
    let b = Engine::new(test_config(&brokers)).start(&fresh()).unwrap();
    assert!(
        wait_until(WAIT, || a.metrics().snapshot().rebalances > rebalances).await,
        "A's revoke began"
    );
    let c = Engine::new(test_config(&brokers)).start(&fresh()).unwrap();
    let expected = tally(input.iter().map(String::as_str));
    assert!(
        wait_until(WAIT, || all_counted(&shared, &expected)).await,
        "B and C processed everything while A was stalled"
    );
    stalled_store.release_writes();
    assert!(
        wait_until(WAIT, || a.metrics().snapshot().conflicts_fenced >= 1).await,
        "A's stale write was rejected and its batch dropped: {:?}, writes {:?}",
        a.metrics().snapshot(),
        stalled_store.write_log()
    );
    assert!(stalled_store.write_log().contains(&"conflict"));
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
    c.shutdown().await.unwrap();
    assert_word_count(&brokers, shared.as_ref(), &expected).await;
}

/// G6 for the other pipeline kinds: a stateless pipeline, a join (both halves) and a
/// materialisation run together while produce requests fail and the broker goes down
/// and up, and while the join's state store and the materialised table are unavailable
/// for a while. Everything completes exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_pipeline_kind_waits_out_broker_and_store_faults() {
    let kafka = cluster(&[
        ("lines", 2),
        ("tokens", 2),
        ("credits", 2),
        ("debits", 2),
        ("balance-mid", 3),
        ("balances", 2),
    ]);
    let brokers = kafka.bootstrap_servers();
    let engine = Engine::new(test_config(&brokers));

    let split = StatelessFunction::explode(
        Topic::new("lines", Utf8, Utf8),
        Topic::new("tokens", Utf8, Utf8),
        |m| {
            Ok(m.value
                .split_whitespace()
                .map(|w| Record::new(w.to_owned(), w.to_owned()))
                .collect())
        },
    );
    let join = Join::new("balance", "balance-mid", balance());
    let states = Arc::new(FaultyStore::new(MemoryStateRepository::new()));
    let table = Arc::new(FaultyTable::new(MemoryUpsertRepository::<LastSeen>::new()));
    let pipelines = [
        Pipeline::stateless("split", split),
        join.rekey_pipeline(),
        join.stateful_pipeline(Arc::clone(&states)),
        last_seen("last-seen", "tokens", Arc::clone(&table)),
    ];
    let running: Vec<_> = pipelines.iter().map(|p| engine.start(p).unwrap()).collect();

    let mut lines = Vec::new();
    let mut money = Vec::new();
    let mut expected: HashMap<String, i64> = HashMap::new();
    for i in 0..200i64 {
        lines.push(text_record(
            "lines",
            None,
            &format!("l{i}"),
            &format!("t{} t{}", i % 13, i % 7),
        ));
        let account = format!("acct-{}", i % 5);
        let (topic, delta) = if i % 4 == 0 {
            ("debits", -i)
        } else {
            ("credits", i)
        };
        *expected.entry(account.clone()).or_insert(0) += delta;
        money.push(text_record(topic, None, &account, &delta.abs().to_string()));
    }
    let half = |v: &Vec<flows::EncodedRecord>, first: bool| -> Vec<flows::EncodedRecord> {
        let (a, b) = v.split_at(v.len() / 2);
        if first { a.to_vec() } else { b.to_vec() }
    };

    // First half with failing produce requests and both stores down.
    states.set_failing(true);
    table.set_failing(true);
    kafka.mock().request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS; 8],
    );
    produce(&brokers, &half(&lines, true)).await;
    produce(&brokers, &half(&money, true)).await;
    assert!(wait_until(WAIT, || states.failures() >= 3 && table.failures() >= 3).await);
    states.set_failing(false);
    table.set_failing(false);

    // Second half across a broker outage.
    produce(&brokers, &half(&lines, false)).await;
    produce(&brokers, &half(&money, false)).await;
    kafka.mock().broker_down(1).unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    kafka.mock().broker_up(1).unwrap();

    let done = wait_until(WAIT, || {
        running[0].metrics().snapshot().committed >= 200
            && running[2].metrics().snapshot().committed >= 200
            && running[3].metrics().snapshot().committed >= 400
    })
    .await;
    let retries: Vec<u64> = running
        .iter()
        .map(|r| r.metrics().snapshot().transient_retries)
        .collect();
    for pipeline in running {
        pipeline.shutdown().await.unwrap();
    }
    assert!(done, "every pipeline finished");
    assert!(
        retries[2] > 0 && retries[3] > 0,
        "store outages were retried: {retries:?}"
    );

    assert_eq!(
        stored_counts(states.as_ref(), expected.keys().cloned()).await,
        expected
    );
    let tokens = read_topic(&brokers, "tokens", 400, WAIT);
    assert_eq!(
        tokens.len(),
        400,
        "each line's two tokens, once (no replays happened)"
    );
    let rows: HashMap<String, String> = table
        .get_all(
            &(0..13)
                .map(|i| flows::PrimaryKey::from(format!("t{i}")))
                .collect::<Vec<_>>(),
        )
        .await
        .unwrap()
        .into_iter()
        .flatten()
        .map(|r| (r.word, r.line))
        .collect();
    assert_eq!(rows.len(), 13, "every token materialised");
    let balances = read_topic(&brokers, "balances", 200, WAIT);
    assert!(balances.len() >= 200, "one output per money message");
}

/// G4: while the broker refuses the outputs (retriable produce errors), the first
/// batch's states are written but no input offset is committed, and the next batch's
/// states stay unwritten: a state's stored outputs are those of its last write, and
/// the unacknowledged ones must stay there for a replay. Once the outputs are
/// acknowledged, everything goes through, nothing lost or counted twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offsets_are_committed_only_after_the_outputs_are_acknowledged() {
    let kafka = cluster(&[("words", 1), ("counts", 1)]);
    let brokers = kafka.bootstrap_servers();
    // Batches hold at most 100 messages (`test_config`): at least two batches.
    let input = words(150, 10, 12);
    produce(&brokers, &word_records("words", &input)).await;
    kafka.mock().request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS; 1_000],
    );

    let store = Arc::new(MemoryStateRepository::new());
    let running = Engine::new(test_config(&brokers))
        .start(&Pipeline::stateful("count", counter(), Arc::clone(&store)))
        .unwrap();
    let counted = |store: &MemoryStateRepository| -> i64 {
        store
            .snapshot()
            .iter()
            .filter_map(|s| s.content.as_deref())
            .map(|c| serde_json::from_slice::<i64>(c).unwrap())
            .sum()
    };
    assert!(
        wait_until(WAIT, || counted(&store) > 0).await,
        "the first batch's states written"
    );
    tokio::time::sleep(Duration::from_secs(2)).await; // several commit intervals
    let written = counted(&store);
    assert!(
        written <= 100,
        "{written} messages counted while the first batch's outputs are refused: the next batch was written"
    );
    assert_eq!(
        running.metrics().snapshot().published,
        0,
        "outputs still refused"
    );
    assert_eq!(
        committed_offset(&brokers, "count", "words"),
        None,
        "nothing committed"
    );

    kafka.mock().clear_request_errors(RDKafkaApiKey::Produce);
    assert!(wait_until(WAIT, || running.metrics().snapshot().committed >= 150).await);
    running.shutdown().await.unwrap();
    assert_eq!(committed_offset(&brokers, "count", "words"), Some(150));
    let expected = tally(input.iter().map(String::as_str));
    assert_word_count(&brokers, store.as_ref(), &expected).await;
}

/// The offset committed by consumer group `group` for partition 0 of `topic`.
fn committed_offset(brokers: &str, group: &str, topic: &str) -> Option<i64> {
    committed_offsets(brokers, group, topic, 1)[0]
}

/// A mapped row that does not fit the table (here: one value too many) fails only its
/// own message: it is dead-lettered, and the rest of the batch is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_that_does_not_fit_the_table_is_dead_lettered_alone() {
    let kafka = cluster(&[("sightings", 1), ("sightings-dlq", 1)]);
    let brokers = kafka.bootstrap_servers();
    produce(
        &brokers,
        &[
            text_record("sightings", None, "w1", "line 1"),
            text_record("sightings", None, "w2", "wrong arity"),
            text_record("sightings", None, "w3", "line 3"),
        ],
    )
    .await;
    let table = Arc::new(MemoryUpsertRepository::<Loose>::new());
    let running = Engine::new(test_config(&brokers))
        .start(
            &Pipeline::materialise(
                "loose",
                Topic::new("sightings", Utf8, Utf8),
                Arc::clone(&table),
                |m| {
                    let mut values = vec![Value::Text(m.key), Value::Text(m.value.clone())];
                    if m.value == "wrong arity" {
                        values.push(Value::Null);
                    }
                    Ok(vec![RowChange::Upsert(Loose(values))])
                },
            )
            .on_error(ErrorPolicy::dead_letter("sightings-dlq")),
        )
        .unwrap();
    assert!(wait_until(WAIT, || running.metrics().snapshot().committed >= 3).await);
    running.shutdown().await.unwrap();
    assert_eq!(table.len(), 2, "the two valid rows are written");
    let dead = read_topic(&brokers, "sightings-dlq", 1, WAIT);
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].key_str(), "w2");
    assert_eq!(
        dead[0].header(headers::ERROR_KIND).as_deref(),
        Some("function")
    );
}

/// A row type whose values are whatever the mapper made (to produce invalid rows).
#[derive(Clone, Debug, PartialEq)]
struct Loose(Vec<Value>);

impl Row for Loose {
    fn schema() -> TableSchema {
        LastSeen::schema()
    }

    fn to_values(&self) -> Result<Vec<Value>, RowError> {
        Ok(self.0.clone())
    }

    fn from_values(values: Vec<Value>) -> Result<Self, RowError> {
        Ok(Self(values))
    }
}

/// A user function that panics stops the pipeline with an error, instead of leaving its
/// partition silently stalled; nothing after the panicking message is committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_function_stops_the_pipeline_loudly() {
    let kafka = cluster(&[("orders", 1), ("confirmed", 1)]);
    let brokers = kafka.bootstrap_servers();
    produce(&brokers, &[text_record("orders", None, "o1", "boom")]).await;
    let confirm = StatelessFunction::one_to_one(
        Topic::new("orders", Utf8, Utf8),
        Topic::new("confirmed", Utf8, Utf8),
        |m| {
            assert!(m.value != "boom", "the function panicked on purpose");
            Ok(Record::new(m.key, m.value))
        },
    );
    let running = Engine::new(test_config(&brokers))
        .start(&Pipeline::stateless("confirm", confirm))
        .unwrap();
    // Waiting for progress that never comes ends when the pipeline stops, not never.
    let progress = tokio::time::timeout(WAIT, running.wait_for(|m| m.committed >= 1))
        .await
        .expect("wait_for returns once the pipeline stops");
    assert_eq!(progress, None);
    let error = tokio::time::timeout(WAIT, running.wait())
        .await
        .expect("the pipeline stopped")
        .unwrap_err();
    assert!(error.to_string().contains("ended unexpectedly"), "{error}");
    assert_eq!(committed_offset(&brokers, "confirm", "orders"), None);
}

/// Materialisation into a real PostgreSQL table (as `examples/word-materialise.rs`
/// does with `FLOWS_STORE=postgres://…`): the latest row per key, deletes applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn materialise_into_postgres() {
    let url = std::env::var("FLOWS_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/flows_test".into());
    let table = flows::open_upsert_repository::<LastSeen>(&url)
        .await
        .unwrap_or_else(|e| panic!("PostgreSQL at {url} is required: {e}"));
    // The table is shared with nothing else; start from a known state.
    let words: Vec<String> = (0..20).map(|i| format!("pg-w{i}")).collect();
    let keys: Vec<flows::PrimaryKey> = words.iter().cloned().map(flows::PrimaryKey::from).collect();
    table.delete_all(&keys).await.unwrap();

    let kafka = cluster(&[("pg-sightings", 2)]);
    let brokers = kafka.bootstrap_servers();
    let expected = sightings(&brokers, "pg-sightings", &words, 300, "pg-w7").await;

    let running = Engine::new(test_config(&brokers))
        .start(&last_seen(
            "pg-last-seen",
            "pg-sightings",
            Arc::clone(&table),
        ))
        .unwrap();
    assert!(wait_until(WAIT, || running.metrics().snapshot().committed >= 301).await);
    running.shutdown().await.unwrap();
    let rows: HashMap<String, String> = table
        .get_all(&keys)
        .await
        .unwrap()
        .into_iter()
        .flatten()
        .map(|r| (r.word, r.line))
        .collect();
    assert_eq!(rows, expected);
}

/// Rows PostgreSQL refuses (text with NUL, checked before writing; a line the table's
/// own constraint refuses, on the server) cost only their messages: each is
/// dead-lettered with the reason, and every other row of the batch is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn materialise_dead_letters_exactly_the_messages_whose_rows_postgresql_refuses() {
    let url = std::env::var("FLOWS_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/flows_test".into());
    let store = flows::postgres::PostgresStore::connect(&url)
        .await
        .unwrap_or_else(|e| panic!("PostgreSQL at {url} is required: {e}"));
    let name = format!("guarded_seen_{}", rand::random::<u32>());
    let table = Arc::new(
        flows::postgres::PostgresUpsertRepository::<LastSeen>::with_table(store.clone(), &name)
            .await
            .unwrap(),
    );
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "ALTER TABLE \"{name}\" ADD CONSTRAINT no_shouting CHECK (line <> upper(line))"
    )))
    .execute(store.pool())
    .await
    .unwrap();

    let kafka = cluster(&[("guarded", 1), ("guarded-dlq", 1)]);
    let brokers = kafka.bootstrap_servers();
    let lines = ["fine", "nul\0here", "calm", "LOUD", "quiet"];
    let records: Vec<_> = lines
        .iter()
        .enumerate()
        .map(|(i, line)| text_record("guarded", None, &format!("w{i}"), line))
        .collect();
    produce(&brokers, &records).await;
    let pipeline = last_seen("guarded-seen", "guarded", Arc::clone(&table))
        .on_error(ErrorPolicy::dead_letter("guarded-dlq"));
    let running = Engine::new(test_config(&brokers)).start(&pipeline).unwrap();
    assert!(wait_until(WAIT, || running.metrics().snapshot().committed >= 5).await);
    running.shutdown().await.unwrap();

    let dead = read_topic(&brokers, "guarded-dlq", 2, WAIT);
    let refused: Vec<(String, Option<String>)> = dead
        .iter()
        .map(|d| (d.key_str(), d.header(headers::ERROR_KIND)))
        .collect();
    assert_eq!(
        refused,
        [
            ("w1".to_owned(), Some("rejected".to_owned())),
            ("w3".to_owned(), Some("rejected".to_owned()))
        ]
    );
    assert!(
        dead[1]
            .header(headers::ERROR_MESSAGE)
            .unwrap()
            .contains("no_shouting")
    );
    let keys: Vec<flows::PrimaryKey> = (0..5).map(|i| format!("w{i}").into()).collect();
    let stored: Vec<Option<String>> = table
        .get_all(&keys)
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.map(|r| r.line))
        .collect();
    assert_eq!(
        stored,
        [
            Some("fine".into()),
            None,
            Some("calm".into()),
            None,
            Some("quiet".into())
        ]
    );
}

/// The word count on a real store named by `url`, stopped halfway and restarted: the
/// stored counts are exact and the outputs complete and in order (G1–G3 on that store).
async fn word_count_on_store(url: &str, name: &str) {
    let table = format!("{name}_{}", rand::random::<u32>());
    let store = flows::open_state_store(url, &table)
        .await
        .unwrap_or_else(|e| {
            panic!("the {name} test server at {url} is required (scripts/test starts it): {e}")
        });
    word_count_with_a_restart(store).await;
}

async fn word_count_with_a_restart(store: Arc<dyn flows::SingleStateRepository>) {
    let kafka = cluster(&[("words", 4), ("counts", 4)]);
    let brokers = kafka.bootstrap_servers();
    let input = words(2_000, 50, 3);
    let (first, second) = input.split_at(1_200);
    let pipeline = Pipeline::stateful("count", counter(), Arc::clone(&store));

    produce(&brokers, &word_records("words", first)).await;
    let running = Engine::new(test_config(&brokers)).start(&pipeline).unwrap();
    assert!(wait_until(WAIT, || running.metrics().snapshot().committed >= 1_200).await);
    running.shutdown().await.unwrap();

    produce(&brokers, &word_records("words", second)).await;
    let running = Engine::new(test_config(&brokers)).start(&pipeline).unwrap();
    assert!(wait_until(WAIT, || running.metrics().snapshot().committed >= 800).await);
    running.shutdown().await.unwrap();

    assert_word_count(
        &brokers,
        store.as_ref(),
        &tally(input.iter().map(String::as_str)),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn word_count_on_postgres() {
    let url = std::env::var("FLOWS_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/flows_test".into());
    word_count_on_store(&url, "postgres").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn word_count_on_mongodb() {
    let url = std::env::var("FLOWS_TEST_MONGODB_URL")
        .unwrap_or_else(|_| "mongodb://127.0.0.1:27017/?directConnection=true".into());
    word_count_on_store(&url, "mongodb").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn word_count_on_dynamodb() {
    let endpoint = std::env::var("FLOWS_TEST_DYNAMODB_ENDPOINT")
        .unwrap_or_else(|_| "http://127.0.0.1:8000".into());
    let address = endpoint.trim_start_matches("http://").trim_end_matches('/');
    word_count_on_store(
        &format!("dynamodb://{address}?region=us-east-1&tls=false"),
        "dynamodb",
    )
    .await;
}

// The Cassandra backend's own test server: the cluster at `FLOWS_TEST_CASSANDRA_URL`, or
// kassandra (an in-memory imitation of a CQL server) in this process.
#[path = "../../backends/cassandra/tests/common/mod.rs"]
mod cassandra_test_server;

/// The word count on Cassandra: the cluster at `FLOWS_TEST_CASSANDRA_URL` when set (the
/// docker-compose ScyllaDB), otherwise the kassandra imitation. The imitation applies
/// lightweight transactions unconditionally (the store is told to accept that); a single
/// instance never conflicts, so counts and outputs still prove the engine works on this
/// backend.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn word_count_on_cassandra_or_its_kassandra_imitation() {
    let table = format!("cassandra_{}", rand::random::<u32>());
    let store = cassandra_test_server::store().await;
    let states = flows::cassandra::CassandraStateRepository::new(store, &table)
        .await
        .unwrap();
    word_count_with_a_restart(Arc::new(states)).await;
}

/// DynamoDB's state limit (`flows::dynamodb::DEFAULT_MAX_STATE_SIZE`).
const DYNAMODB_MAX_STATE_SIZE: usize = flows::dynamodb::DEFAULT_MAX_STATE_SIZE;

/// 10,000 messages of one key in one default-sized batch, each output tagged with a
/// 48-byte header: their outputs, kept for replay, are ~650 KB, over the store's limit.
/// The engine writes the batch in parts that fit, counts exactly, publishes every count
/// in order, and shows the splits in its metrics.
async fn a_hot_key_on(store: Arc<dyn flows::SingleStateRepository>) {
    const HOT: &str = "a-hot-key-whose-name-is-thirty-six-by";
    let kafka = cluster(&[("words", 1), ("counts", 1)]);
    let brokers = kafka.bootstrap_servers();
    let config = test_config(&brokers).batch_config(flows::kafka::BatchConfig::default());
    let hot = vec![HOT.to_owned(); 10_000];
    produce(&brokers, &word_records("words", &hot)).await;
    let pipeline = Pipeline::stateful("count", tagging_counter(), Arc::clone(&store));
    let running = Engine::new(config).start(&pipeline).unwrap();
    assert!(
        wait_until(WAIT, || running.metrics().snapshot().committed >= 10_000
            || running.is_stopping())
        .await
    );
    let metrics = running.metrics().snapshot();
    running.shutdown().await.unwrap();
    assert_eq!(metrics.committed, 10_000);
    assert!(metrics.batches_split >= 1, "{metrics:?}");
    assert_word_count(
        &brokers,
        store.as_ref(),
        &tally(hot.iter().map(String::as_str)),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hot_key_does_not_outgrow_a_store_with_dynamodbs_limit() {
    a_hot_key_on(Arc::new(MemoryStateRepository::with_max_state_size(
        DYNAMODB_MAX_STATE_SIZE,
    )))
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hot_key_does_not_outgrow_dynamodb() {
    let endpoint = std::env::var("FLOWS_TEST_DYNAMODB_ENDPOINT")
        .unwrap_or_else(|_| "http://127.0.0.1:8000".into());
    let address = endpoint.trim_start_matches("http://").trim_end_matches('/');
    let url = format!("dynamodb://{address}?region=us-east-1&tls=false");
    let table = format!("hot_{}", rand::random::<u32>());
    let store = flows::open_state_store(&url, &table)
        .await
        .unwrap_or_else(|e| {
            panic!("DynamoDB Local at {url} is required (scripts/test starts it): {e}")
        });
    a_hot_key_on(store).await;
}

/// A failed offset commit is sent again: with no new input and no restart, the group's
/// offsets reach the end of what was processed although the broker refused commits for
/// a while; the failures are counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_offset_commit_is_retried() {
    let kafka = cluster(&[("words", 1), ("counts", 1)]);
    let brokers = kafka.bootstrap_servers();
    let input = words(100, 10, 13);
    produce(&brokers, &word_records("words", &input)).await;
    kafka.mock().request_errors(
        RDKafkaApiKey::OffsetCommit,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_OFFSET_METADATA_TOO_LARGE; 3],
    );
    let store = Arc::new(MemoryStateRepository::new());
    let running = Engine::new(test_config(&brokers))
        .start(&Pipeline::stateful("count", counter(), Arc::clone(&store)))
        .unwrap();
    assert!(wait_until(WAIT, || running.metrics().snapshot().committed >= 100).await);
    let committed = wait_until(WAIT, || {
        committed_offset(&brokers, "count", "words") == Some(100)
    })
    .await;
    let metrics = running.metrics().snapshot();
    running.shutdown().await.unwrap();
    assert!(committed, "the refused commit was sent again: {metrics:?}");
    assert!(metrics.commit_failures >= 1, "{metrics:?}");
}

/// A shutdown commits synchronously whatever completed and is not confirmed, even when
/// the last asynchronous commits failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_commits_what_failed_commits_left_behind() {
    let kafka = cluster(&[("words", 1), ("counts", 1)]);
    let brokers = kafka.bootstrap_servers();
    let input = words(100, 10, 14);
    produce(&brokers, &word_records("words", &input)).await;
    // Every asynchronous commit fails while the pipeline runs.
    kafka.mock().request_errors(
        RDKafkaApiKey::OffsetCommit,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_OFFSET_METADATA_TOO_LARGE; 1_000],
    );
    let store = Arc::new(MemoryStateRepository::new());
    let running = Engine::new(test_config(&brokers))
        .start(&Pipeline::stateful("count", counter(), Arc::clone(&store)))
        .unwrap();
    assert!(wait_until(WAIT, || running.metrics().snapshot().commit_failures >= 2).await);
    assert!(running.metrics().snapshot().committed >= 100);
    assert_eq!(committed_offset(&brokers, "count", "words"), None);
    kafka
        .mock()
        .clear_request_errors(RDKafkaApiKey::OffsetCommit);
    running.shutdown().await.unwrap();
    assert_eq!(
        committed_offset(&brokers, "count", "words"),
        Some(100),
        "the shutdown committed what the failed commits had not"
    );
}

/// Revoking many stuck partitions abandons them all at once: a shutdown with 50
/// partitions stuck in their store writes takes one drain timeout and one grace, not
/// one per partition.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_stuck_partitions_are_abandoned_together() {
    const PARTITIONS: i32 = 50;
    let kafka = cluster(&[("words", PARTITIONS), ("counts", PARTITIONS)]);
    let brokers = kafka.bootstrap_servers();
    let store = Arc::new(FaultyStore::new(MemoryStateRepository::new()));
    store.hold_writes();
    let records: Vec<_> = (0..PARTITIONS)
        .map(|p| text_record("words", Some(p), &format!("w{p}"), "x"))
        .collect();
    produce(&brokers, &records).await;
    let config = test_config(&brokers).drain_timeout(Duration::from_secs(1));
    let running = Engine::new(config)
        .start(&Pipeline::stateful("count", counter(), Arc::clone(&store)))
        .unwrap();
    assert!(
        wait_until(WAIT, || store.held() >= PARTITIONS as u64).await,
        "every partition is stuck writing ({} held)",
        store.held()
    );
    let started = std::time::Instant::now();
    running.shutdown().await.unwrap();
    let took = started.elapsed();
    // One drain timeout (1 s) and one abandon grace (5 s), with room for a slow
    // machine; one per partition would be over 250 s.
    assert!(took < Duration::from_secs(20), "the shutdown took {took:?}");
    assert_eq!(committed_offset(&brokers, "count", "words"), None);
}

/// An abandoned batch's outputs never land after the next owner's. Instance A's
/// producer holds its records for 20 s (`linger.ms`), so when B joins and takes a
/// partition, A's batch is still unacknowledged when its drain timeout ends. B goes on
/// with newer input for the same keys; A's records must not land after B's: the last
/// output per key equals the stored count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abandoned_batchs_outputs_never_land_after_the_next_owners() {
    let kafka = cluster(&[("words", 2), ("counts", 2)]);
    let brokers = kafka.bootstrap_servers();
    let store = Arc::new(MemoryStateRepository::new());
    let pipeline = Pipeline::stateful("count", counter(), Arc::clone(&store));
    // A revoke that outlasts the group's rebalance timeout gets the member dropped from
    // the group with its outputs still queued (the engine refuses such a configuration
    // for a real broker, whose timeout is max.poll.interval.ms). The mock cluster drops a
    // member that does not rejoin within its session timeout, and waits the session
    // timeout less a second for members to join, so: B joins 11 s after it starts, A's
    // outputs linger 16 s, and A's revoke waits the rest, well within 12 s.
    let session = ("session.timeout.ms", "12000");
    let linger = Duration::from_secs(16);
    // Each partition's input in one batch: the states are written before any ack.
    let slow = test_config(&brokers)
        .consumer_property(session.0, session.1)
        .producer_property("linger.ms", linger.as_millis().to_string())
        .drain_timeout(Duration::from_secs(1))
        .batch(10_000, Duration::from_millis(500));
    let first = words(200, 20, 15);
    produce(&brokers, &word_records("words", &first)).await;
    let a = Engine::new(slow).start(&pipeline).unwrap();
    let first_tally = tally(first.iter().map(String::as_str));
    assert!(
        wait_until(WAIT, || all_counted(&store, &first_tally)).await,
        "A wrote its states"
    );
    let sent = std::time::Instant::now();
    assert_eq!(a.metrics().snapshot().published, 0, "A's outputs linger");

    // B joins and takes a partition while A's batch is unacknowledged, then finds
    // newer input for the same keys waiting.
    let rebalances = a.metrics().snapshot().rebalances;
    let b = Engine::new(test_config(&brokers).consumer_property(session.0, session.1))
        .start(&pipeline)
        .unwrap();
    assert!(
        wait_until(WAIT, || a.metrics().snapshot().rebalances > rebalances).await,
        "B's joining moves partitions"
    );
    assert_eq!(
        a.metrics().snapshot().published,
        0,
        "the group rebalanced while A's outputs were queued (else this test shows nothing)"
    );
    let second = words(200, 20, 16);
    produce(&brokers, &word_records("words", &second)).await;
    let all: Vec<&str> = first.iter().chain(&second).map(String::as_str).collect();
    let expected = tally(all.iter().copied());
    assert!(wait_until(WAIT, || all_counted(&store, &expected)).await);
    assert!(
        wait_until(WAIT, || b.metrics().snapshot().committed > 0).await,
        "B took a partition"
    );
    // Whatever A still holds lands by now.
    tokio::time::sleep((linger + Duration::from_secs(3)).saturating_sub(sent.elapsed())).await;
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();

    let stored = stored_counts(store.as_ref(), expected.keys().cloned()).await;
    assert_eq!(stored, expected, "stored counts");
    let outputs = read_topic(&brokers, "counts", all.len(), WAIT);
    let mut last: HashMap<String, String> = HashMap::new();
    for record in &outputs {
        last.insert(record.key_str(), record.value_str());
    }
    for (word, count) in &expected {
        assert_eq!(
            last.get(word).map(String::as_str),
            Some(count.to_string().as_str()),
            "the last output of {word} is its stored count"
        );
    }
}

/// A PostgreSQL server that turns read-only in the middle of a run (what a failover to
/// a standby looks like: every write fails with SQLSTATE 25006) and whose sessions are
/// terminated (57P01) is waited out: the word count completes exactly once the server
/// accepts writes again, and the retries show in the metrics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_server_turning_read_only_is_waited_out() {
    use sqlx::Connection as _;
    let url = std::env::var("FLOWS_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/flows_test".into());
    let mut admin = sqlx::PgConnection::connect(&url)
        .await
        .unwrap_or_else(|e| panic!("the PostgreSQL test server at {url} is required: {e}"));
    // A database of its own: the other tests' sessions stay writable.
    let database = format!("flows_read_only_{}", rand::random::<u32>());
    // The names are generated here, not input: safe to format into the statements.
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {database}")))
        .execute(&mut admin)
        .await
        .unwrap();
    let (base, _) = url.rsplit_once('/').unwrap();
    let query = url.split_once('?').map_or("", |(_, q)| q);
    let store_url = if query.is_empty() {
        format!("{base}/{database}")
    } else {
        format!("{base}/{database}?{query}")
    };
    let store = flows::open_state_store(&store_url, "read_only_counts")
        .await
        .unwrap();
    // Turns the database read-only (or writable) and ends its sessions, so that every
    // pooled connection reconnects under the new default.
    async fn set_read_only(admin: &mut sqlx::PgConnection, database: &str, on: bool) {
        let setting = if on { "on" } else { "off" };
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "ALTER DATABASE {database} SET default_transaction_read_only = {setting}"
        )))
        .execute(&mut *admin)
        .await
        .unwrap();
        sqlx::query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = $1 AND pid <> pg_backend_pid()",
        )
        .bind(database)
        .execute(&mut *admin)
        .await
        .unwrap();
    }

    let kafka = cluster(&[("words", 4), ("counts", 4)]);
    let brokers = kafka.bootstrap_servers();
    let input = words(3_000, 50, 17);
    let (first, second) = input.split_at(1_000);
    produce(&brokers, &word_records("words", first)).await;
    let running = Engine::new(test_config(&brokers))
        .start(&Pipeline::stateful("count", counter(), Arc::clone(&store)))
        .unwrap();
    assert!(wait_until(WAIT, || running.metrics().snapshot().committed >= 1_000).await);

    set_read_only(&mut admin, &database, true).await;
    produce(&brokers, &word_records("words", second)).await;
    assert!(
        wait_until(WAIT, || running.metrics().snapshot().transient_retries >= 3).await,
        "writes are refused and retried: {:?}",
        running.metrics().snapshot()
    );
    assert!(
        !running.is_stopping(),
        "a read-only server does not stop the pipeline"
    );
    assert!(running.metrics().snapshot().committed < 3_000);
    set_read_only(&mut admin, &database, false).await;

    let done = wait_until(WAIT, || running.metrics().snapshot().committed >= 3_000).await;
    let metrics = running.metrics().snapshot();
    running.shutdown().await.unwrap();
    assert!(done, "the run completed once writable again: {metrics:?}");
    assert_word_count(
        &brokers,
        store.as_ref(),
        &tally(input.iter().map(String::as_str)),
    )
    .await;
    drop(store);
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE {database} WITH (FORCE)"
    )))
    .execute(&mut admin)
    .await
    .unwrap();
}

/// The offsets consumer group `group` committed for each of `topic`'s `partitions`.
fn committed_offsets(brokers: &str, group: &str, topic: &str, partitions: i32) -> Vec<Option<i64>> {
    use flows::kafka::rdkafka::consumer::{BaseConsumer, Consumer};
    use flows::kafka::rdkafka::{ClientConfig, Offset, TopicPartitionList};
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .create()
        .unwrap();
    let mut list = TopicPartitionList::new();
    for partition in 0..partitions {
        list.add_partition(topic, partition);
    }
    let committed = consumer
        .committed_offsets(list, Duration::from_secs(10))
        .unwrap();
    let offsets = committed
        .elements()
        .iter()
        .map(|e| match e.offset() {
            Offset::Offset(offset) => Some(offset),
            _ => None,
        })
        .collect();
    // Drop the list before the consumer (a live list can hang the consumer's drop).
    drop(committed);
    offsets
}

/// The offsets group `totals` committed on both partitions of `totals-in` (0: none).
fn committed_partitions(brokers: &str) -> Vec<i64> {
    committed_offsets(brokers, "totals", "totals-in", 2)
        .into_iter()
        .map(|offset| offset.unwrap_or(0))
        .collect()
}

/// Two partitions write one state (here every message has the key "total"): partition
/// 0 in small batches every few milliseconds, partition 1 in batches of 10,000 whose
/// fold takes some 300 ms. Each of partition 1's writes conflicts with one of partition
/// 0's; retrying whole batches it would never get through while partition 0 runs.
/// Both must advance all along, and the final count is exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_partitions_writing_one_state_both_make_progress() {
    const EACH: usize = 100_000;
    let kafka = cluster(&[("totals-in", 2), ("totals", 1)]);
    let brokers = kafka.bootstrap_servers();
    let slow_backlog: Vec<_> = (0..EACH)
        .map(|_| text_record("totals-in", Some(1), "total", "slow"))
        .collect();
    produce(&brokers, &slow_backlog).await;
    let total = StatefulFunction::new(Json::<i64>::new()).one_to_one(
        Topic::new("totals-in", Utf8, Utf8),
        Topic::new("totals", Utf8, Utf8),
        PersistenceIdFn::key(),
        |total: Option<&i64>, message| {
            if message.value == "slow" {
                // About 30 µs of work per message.
                let started = std::time::Instant::now();
                while started.elapsed() < Duration::from_micros(30) {
                    std::hint::spin_loop();
                }
            }
            let total = total.copied().unwrap_or(0) + 1;
            Ok((total, Record::new(message.key, total.to_string())))
        },
    );
    let store = Arc::new(MemoryStateRepository::new());
    let config = test_config(&brokers).batch(10_000, TEST_BATCH_DELAY);
    let running = Engine::new(config)
        .start(&Pipeline::stateful("totals", total, Arc::clone(&store)))
        .unwrap();

    // Partition 0 is fed while partition 1 works through its backlog.
    assert!(wait_until(WAIT, || running.metrics().snapshot().consumed > 0).await);
    let producer =
        flows::kafka::OutputProducer::new(&flows::kafka::KafkaConfig::new(&brokers)).unwrap();
    let mut samples = Vec::new();
    for round in 0..200 {
        let chunk: Vec<_> = (0..EACH / 200)
            .map(|_| text_record("totals-in", Some(0), "total", "fast"))
            .collect();
        producer.send_all(&chunk).await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        if round % 40 == 39 {
            samples.push(committed_partitions(&brokers));
        }
    }
    let feeding_done = committed_partitions(&brokers);
    eprintln!("committed while partition 0 was fed: {samples:?}, then {feeding_done:?}");
    let done = wait_until(Duration::from_secs(120), || {
        running.metrics().snapshot().committed >= 2 * EACH as u64
    })
    .await;
    let metrics = running.metrics().snapshot();
    running.shutdown().await.unwrap();
    assert!(done, "everything processed: {metrics:?}");
    assert!(
        metrics.state_conflicts > 0,
        "the writers contended: {metrics:?}"
    );
    // While partition 0 was fed, partition 1 advanced between samples (not only after),
    // and got through a good part of its backlog (retrying whole batches, it got 20%
    // in bursts; in parts, some 70%).
    let slow: Vec<i64> = samples.iter().map(|s| s[1]).collect();
    assert!(
        feeding_done[1] >= (EACH * 3 / 10) as i64,
        "partition 1 got through 30% of its backlog while partition 0 was fed \
         (committed over time: {samples:?}, then {feeding_done:?}; {metrics:?})"
    );
    assert!(
        slow.windows(2).filter(|w| w[1] > w[0]).count() >= 3,
        "partition 1 advanced steadily: {samples:?}"
    );
    let stored = stored_counts(store.as_ref(), ["total".to_owned()]).await;
    assert_eq!(stored.get("total"), Some(&(2 * EACH as i64)), "exact total");
}

/// A partition whose batch never completes (its first message fails under a policy
/// that retries it for ever) holds back only itself: the other partition's messages
/// are all processed meanwhile, and a restart or shutdown is still possible.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_partition_holds_back_only_itself() {
    const EACH: usize = 3_000;
    let kafka = cluster(&[("jobs", 2), ("done", 2)]);
    let brokers = kafka.bootstrap_servers();
    let mut records = vec![text_record("jobs", Some(0), "j", "stuck")];
    for i in 0..EACH {
        records.push(text_record("jobs", Some(0), &format!("a{i}"), "ok"));
        records.push(text_record("jobs", Some(1), &format!("b{i}"), "ok"));
    }
    produce(&brokers, &records).await;
    let attempts = Arc::new(AtomicU32::new(0));
    let seen = Arc::clone(&attempts);
    let work = StatelessFunction::one_to_one(
        Topic::new("jobs", Utf8, Utf8),
        Topic::new("done", Utf8, Utf8),
        move |m| {
            if m.value == "stuck" {
                seen.fetch_add(1, Ordering::SeqCst);
                return Err(FunctionError::new("the external party never answers"));
            }
            Ok(Record::new(m.key, m.value))
        },
    );
    let policy = ErrorPolicy::stop().with_retries(u32::MAX, Duration::from_millis(20));
    // Small batches: the stuck partition's backlog is hundreds of batches.
    let config = test_config(&brokers)
        .batch(10, TEST_BATCH_DELAY)
        .drain_timeout(Duration::from_secs(1));
    let running = Engine::new(config)
        .start(&Pipeline::stateless("jobs", work).on_error(policy))
        .unwrap();
    let other_done = wait_until(WAIT, || {
        running.metrics().snapshot().committed >= EACH as u64
    })
    .await;
    // The stuck partition's backlog stays in Kafka while it retries: a batch per
    // partition is taken.
    wait_until(WAIT, || attempts.load(Ordering::SeqCst) >= 10).await;
    let metrics = running.metrics().snapshot();
    let live = running.metrics().clone();
    running.shutdown().await.unwrap();
    assert!(other_done, "partition 1 was processed: {metrics:?}");
    assert_eq!(
        metrics.committed, EACH as u64,
        "partition 0 stayed stuck: {metrics:?}"
    );
    assert!(
        metrics.buffered_messages <= 2 * 10,
        "at most a batch waits per partition: {metrics:?}"
    );
    assert_eq!(
        live.snapshot().buffered_messages,
        0,
        "released with the partitions"
    );
    assert!(
        attempts.load(Ordering::SeqCst) > 1,
        "the stuck message was retried"
    );
    assert_eq!(
        committed_offsets(&brokers, "jobs", "jobs", 2),
        vec![None, Some(EACH as i64)]
    );
}
