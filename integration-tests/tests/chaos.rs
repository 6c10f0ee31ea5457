//! The chaos suite: every pipeline shape runs as a worker process against a broker in a
//! process of its own (`embedded-kafka`, librdkafka's mock cluster) and the real
//! PostgreSQL, is killed with SIGKILL at random points while it works, at least five
//! times, is restarted, and finally stops on SIGTERM. Each shape is then checked from
//! its outputs or its table alone:
//!
//! | shape | guarantee | test |
//! |---|---|---|
//! | stateless | at least once: every input's output is published, first appearances per key in input order | `stateless_outputs_survive_sigkill_at_least_once` |
//! | stateful | exactly-once state; every output published, first appearances in order, repeats byte-identical | `the_shipped_word_count_survives_sigkill_with_exact_counts`, `stateful_outputs_are_replayed_not_recomputed_after_sigkill` |
//! | join | the same, with the re-key step and the stateful half in separate processes, either one killed | `a_join_survives_sigkill_of_its_rekey_step`, `a_join_survives_sigkill_of_its_stateful_half`, `a_rewound_rekey_step_changes_no_joined_state_twice` |
//! | materialise | at least once with idempotent upserts: every message's row is written, and the table ends with every key's last value | `materialise_survives_sigkill_with_the_last_value_of_every_key` |
//!
//! Workers are `examples/word-count.rs` and `examples/word-join.rs` as shipped, and
//! `chaos-worker` (one pipeline of every shape; stateful outputs carry a random stamp,
//! so a recomputation instead of a replay would show as a duplicate with other bytes).
//!
//! Needs PostgreSQL at `FLOWS_TEST_POSTGRES_URL` (default
//! `postgres://postgres@127.0.0.1:5432/flows_test`; `scripts/test` starts it), and the
//! example binaries, which `cargo test` builds.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use flows::{EncodedRecord, PrimaryKey, SingleStateRepository, UpsertRepository};
use flows_integration_tests::{
    BrokerProcess, Consumed, WorkerProcess, check_sequenced_outputs, check_word_count_outputs,
    committed_total, example_binary, high_watermark_total, produce, read_topic, rewind_group,
    stored_counts, tally, text_record, wait_until,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Deserialize;

/// Feeds (and kill rounds) per test; the last round of each test finishes the work.
const PHASES: usize = 6;

fn postgres_url() -> String {
    std::env::var("FLOWS_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/flows_test".into())
}

fn chaos_worker() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_chaos-worker"))
}

/// Every topic of `chaos-worker`.
const CHAOS_TOPICS: [(&str, i32); 9] = [
    ("chaos-events", 4),
    ("chaos-events-out", 4),
    ("chaos-words", 4),
    ("chaos-counts", 4),
    ("chaos-definitions", 2),
    // More partitions than either source.
    ("chaos-join-intermediate", 8),
    ("chaos-cards", 4),
    ("chaos-readings", 4),
    ("chaos-dead-letter", 1),
];

/// A table name unique to this test run.
fn table(name: &str) -> String {
    format!("{name}_{}", std::process::id())
}

/// `n` words from a skewed distribution over `distinct` words: a few very frequent,
/// most rare.
fn skewed_words(rng: &mut StdRng, n: usize, distinct: usize) -> Vec<String> {
    (0..n)
        .map(|_| {
            let r: f64 = rng.random();
            format!("word{}", (r * r * distinct as f64) as usize)
        })
        .collect()
}

/// `records` cut into [`PHASES`] consecutive feeds.
fn phases(records: Vec<EncodedRecord>) -> Vec<Vec<EncodedRecord>> {
    let n = records.len();
    let mut records = records.into_iter();
    (0..PHASES)
        .map(|phase| {
            let size = n * (phase + 1) / PHASES - n * phase / PHASES;
            records.by_ref().take(size).collect()
        })
        .collect()
}

/// A pipeline's progress: the offsets its consumer group committed on its input topics,
/// and how many input records those topics hold.
struct Progress<'a> {
    brokers: &'a str,
    group: &'a str,
    inputs: &'a [(&'a str, i32)],
}

impl Progress<'_> {
    fn committed(&self) -> i64 {
        committed_total(self.brokers, self.group, self.inputs)
    }

    fn available(&self) -> i64 {
        self.inputs
            .iter()
            .map(|(topic, partitions)| high_watermark_total(self.brokers, topic, *partitions))
            .sum()
    }

    /// Whether every input record is committed.
    fn done(&self) -> bool {
        let available = self.available();
        available > 0 && self.committed() >= available
    }
}

/// Chunks a phase's feed is produced in.
const CHUNKS: usize = 10;

/// Feeds `feeds` one after another; for each starts a worker with `start`, lets its
/// pipeline commit a random share (5-60%) of the input it has not committed yet, and
/// kills it with SIGKILL. At least five kills must leave work undone.
///
/// A feed arrives in chunks while the worker runs, the next once at most one chunk
/// waits uncommitted: a fast pipeline (a stateless step) would otherwise commit a whole
/// feed in one commit round, and the kill would find nothing left to do.
async fn kill_repeatedly(
    rng: &mut StdRng,
    brokers: &str,
    feeds: Vec<Vec<EncodedRecord>>,
    progress: &Progress<'_>,
    start: &dyn Fn() -> WorkerProcess,
) {
    let mut kills_with_work_left = 0;
    for (phase, records) in feeds.into_iter().enumerate() {
        let before = progress.committed();
        let mut fed = progress.available();
        let share: f64 = rng.random_range(0.05..0.6);
        let to_do = fed + records.len() as i64 - before;
        let target = before + (to_do as f64 * share).max(1.0) as i64;
        let chunk_len = records.len().div_ceil(CHUNKS).max(1);
        let mut chunks = records.chunks(chunk_len);
        let mut worker = start();
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let committed = progress.committed();
            if committed >= target {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "phase {phase}: the worker did not commit {target} inputs in 90 s"
            );
            assert!(!worker.has_exited(), "phase {phase}: the worker stopped");
            if fed - committed <= chunk_len as i64
                && let Some(chunk) = chunks.next()
            {
                produce(brokers, chunk).await;
                fed += chunk.len() as i64;
            } else {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        worker.kill();
        let committed = progress.committed();
        for chunk in chunks {
            produce(brokers, chunk).await;
        }
        let available = progress.available();
        if committed < available {
            kills_with_work_left += 1;
        }
        eprintln!(
            "{} phase {phase}: killed with {committed} of {available} inputs committed",
            progress.group
        );
    }
    assert!(
        kills_with_work_left >= 5,
        "only {kills_with_work_left} kills happened while work remained"
    );
}

/// Waits until every pipeline of `progress` has committed all of its input, the
/// later ones after the earlier ones (a join's stateful half after its re-key step).
async fn wait_for_completion(progress: &[&Progress<'_>], timeout: Duration) {
    let deadline = Instant::now() + timeout;
    for p in progress {
        let left = deadline.saturating_duration_since(Instant::now());
        let done = wait_until(left, || p.done()).await;
        assert!(
            done,
            "{} did not finish: {} of {} inputs committed",
            p.group,
            p.committed(),
            p.available()
        );
    }
}

/// Stops `worker` with SIGTERM; it must exit cleanly.
fn terminate(worker: WorkerProcess) {
    let exit = worker.terminate();
    assert!(exit.success(), "graceful shutdown on SIGTERM: {exit:?}");
}

/// Nothing was dead-lettered: every input of these tests is valid.
fn assert_no_dead_letters(brokers: &str, topic: &str) {
    let dead = read_topic(brokers, topic, 0, Duration::from_secs(10));
    assert!(
        dead.is_empty(),
        "{} dead letters: {:?}",
        dead.len(),
        dead[0]
    );
}

// --- stateful: the word count ---------------------------------------------------------

/// The word count of `binary` (pipeline `group` from `input` to `output`), killed
/// repeatedly; the stored counts must be exact and the outputs complete, in order, and
/// replayed byte for byte.
async fn word_count_under_kills(
    binary: &Path,
    group: &str,
    input: &str,
    output: &str,
    dead_letters: &str,
    seed: u64,
) {
    // 25,000 inputs a phase: after the kill's target is reached, the worker must not
    // finish the phase's other 10,000 or more before the kill lands (with 8,333 a fast
    // run sometimes did, and the kill interrupted nothing).
    const WORDS: usize = 150_000;
    let broker = BrokerProcess::start(&[
        ("words", 4),
        ("word-counts", 4),
        ("words-dead-letter", 1),
        ("chaos-words", 4),
        ("chaos-counts", 4),
        ("chaos-dead-letter", 1),
    ]);
    let brokers = broker.bootstrap.as_str();
    let table = table(&format!("word_counts_{seed}"));
    let url = postgres_url();
    let store = flows::open_state_store(&url, &table)
        .await
        .unwrap_or_else(|e| panic!("PostgreSQL at {url} is required: {e}"));
    let mut rng = StdRng::seed_from_u64(seed);
    let input_words = skewed_words(&mut rng, WORDS, 2_000);
    let records = input_words
        .iter()
        .map(|w| text_record(input, None, w, w))
        .collect();
    let env = [
        ("FLOWS_STORE", url.as_str()),
        ("FLOWS_STATE_TABLE", table.as_str()),
        ("CHAOS_TABLE", table.as_str()),
        ("FLOWS_INSTANCE", group),
    ];
    let start = || WorkerProcess::start(binary, brokers, &env);
    let inputs = [(input, 4)];
    let progress = Progress {
        brokers,
        group,
        inputs: &inputs,
    };
    kill_repeatedly(&mut rng, brokers, phases(records), &progress, &start).await;

    let worker = start();
    wait_for_completion(&[&progress], Duration::from_secs(180)).await;
    terminate(worker);

    let expected = tally(input_words.iter().map(String::as_str));
    let stored = stored_counts(store.as_ref(), expected.keys().cloned()).await;
    assert_eq!(stored, expected, "G1: every stored count is exact");
    let outputs = read_topic(brokers, output, WORDS, Duration::from_secs(120));
    let duplicates = check_word_count_outputs(&outputs, &expected).unwrap();
    eprintln!(
        "{} outputs for {WORDS} words: {duplicates} byte-identical replays",
        outputs.len()
    );
    assert_no_dead_letters(brokers, dead_letters);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shipped_word_count_survives_sigkill_with_exact_counts() {
    let binary = example_binary("word-count");
    word_count_under_kills(
        &binary,
        "word-count",
        "words",
        "word-counts",
        "words-dead-letter",
        11,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stateful_outputs_are_replayed_not_recomputed_after_sigkill() {
    word_count_under_kills(
        chaos_worker(),
        "chaos-count",
        "chaos-words",
        "chaos-counts",
        "chaos-dead-letter",
        23,
    )
    .await;
}

// --- stateless --------------------------------------------------------------------------

/// Records numbered per key (`seq` of each key counts up from 1), keys spread over
/// `keys` keys, on `topic`; returns them with the final number of each key.
fn numbered(topic: &str, n: usize, keys: usize) -> (Vec<EncodedRecord>, HashMap<String, i64>) {
    let mut last: HashMap<String, i64> = HashMap::new();
    let records = (0..n)
        .map(|i| {
            let key = format!("k{}", (i * 7919) % keys);
            let seq = last.entry(key.clone()).or_default();
            *seq += 1;
            text_record(topic, None, &key, &seq.to_string())
        })
        .collect();
    (records, last)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stateless_outputs_survive_sigkill_at_least_once() {
    let broker = BrokerProcess::start(&CHAOS_TOPICS);
    let brokers = broker.bootstrap.as_str();
    let mut rng = StdRng::seed_from_u64(31);
    let (records, expected) = numbered("chaos-events", 30_000, 500);
    // Small batches: a stateless pipeline would otherwise finish a feed before a kill.
    let env = [
        ("FLOWS_INSTANCE", "chaos-stateless"),
        ("FLOWS_BATCH_MAX_MESSAGES", "20"),
    ];
    let start = || WorkerProcess::start(chaos_worker(), brokers, &env);
    let inputs = [("chaos-events", 4)];
    let progress = Progress {
        brokers,
        group: "chaos-stateless",
        inputs: &inputs,
    };
    kill_repeatedly(&mut rng, brokers, phases(records), &progress, &start).await;
    let worker = start();
    wait_for_completion(&[&progress], Duration::from_secs(180)).await;
    terminate(worker);

    // Every input's copy is there, each key's in input order; repeats are copies.
    let outputs = read_topic(brokers, "chaos-events-out", 30_000, Duration::from_secs(60));
    let duplicates = check_sequenced_outputs(&outputs, &expected, |r| {
        r.value_str().parse().map_err(|_| "not a number".into())
    })
    .unwrap();
    eprintln!(
        "{} outputs for 30000 inputs: {duplicates} repeats",
        outputs.len()
    );
    assert_no_dead_letters(brokers, "chaos-dead-letter");
}

// --- join -------------------------------------------------------------------------------

/// What a join card is expected to hold once every input is applied.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
struct Card {
    n: i64,
    count: i64,
    definition: Option<String>,
}

/// The inputs of the chaos join: skewed words on `chaos-words` and, now and then, a
/// new definition of a word on `chaos-definitions`, interleaved; with the final card of
/// every word.
fn join_inputs(rng: &mut StdRng, words: usize) -> (Vec<EncodedRecord>, HashMap<String, Card>) {
    let mut expected: HashMap<String, Card> = HashMap::new();
    let mut records = Vec::new();
    for (i, word) in skewed_words(rng, words, 400).into_iter().enumerate() {
        let card = expected.entry(word.clone()).or_default();
        card.n += 1;
        card.count += 1;
        records.push(text_record("chaos-words", None, &word, &word));
        if i % 7 == 0 {
            let definition = format!("definition {i} of {word}");
            card.n += 1;
            card.definition = Some(definition.clone());
            records.push(text_record("chaos-definitions", None, &word, &definition));
        }
    }
    (records, expected)
}

/// Checks the join's stored cards and its published cards against `expected`.
async fn check_join(brokers: &str, table: &str, expected: &HashMap<String, Card>) {
    let store = flows::open_state_store(&postgres_url(), table)
        .await
        .unwrap();
    let ids: Vec<flows::PersistenceId> = expected
        .keys()
        .map(|w| flows::PersistenceId::new(w).unwrap())
        .collect();
    let stored: HashMap<String, Card> = store
        .get_all(&ids)
        .await
        .unwrap()
        .into_iter()
        .map(|s| {
            let card = serde_json::from_slice(s.content.as_deref().unwrap_or(b"{}")).unwrap();
            (s.id.as_str().to_owned(), card)
        })
        .collect();
    let wrong: Vec<_> = expected
        .iter()
        .filter(|(word, card)| stored.get(*word) != Some(card))
        .take(5)
        .map(|(word, card)| (word, card, stored.get(word)))
        .collect();
    assert!(
        wrong.is_empty(),
        "G1: stored cards differ (word, expected, stored): {wrong:?}"
    );
    let total: i64 = expected.values().map(|c| c.n).sum();
    let outputs = read_topic(
        brokers,
        "chaos-cards",
        total as usize,
        Duration::from_secs(60),
    );
    let last: HashMap<String, i64> = expected.iter().map(|(w, c)| (w.clone(), c.n)).collect();
    let card_number = |r: &Consumed| {
        serde_json::from_slice::<Card>(r.value.as_deref().unwrap_or_default())
            .map(|card| card.n)
            .map_err(|e| e.to_string())
    };
    let duplicates = check_sequenced_outputs(&outputs, &last, card_number).unwrap();
    eprintln!(
        "{} cards for {total} inputs: {duplicates} byte-identical replays",
        outputs.len()
    );
    assert_no_dead_letters(brokers, "chaos-dead-letter");
}

/// The join with its two halves in two processes; the half named `killed` is killed
/// repeatedly while the other runs throughout.
async fn join_under_kills(killed: &str, seed: u64) {
    let broker = BrokerProcess::start(&CHAOS_TOPICS);
    let brokers = broker.bootstrap.as_str();
    let table = table(&format!("chaos_cards_{seed}"));
    let url = postgres_url();
    let mut rng = StdRng::seed_from_u64(seed);
    let (records, expected) = join_inputs(&mut rng, 20_000);
    // The re-key step is stateless and fast: small batches, so that kills land while
    // it works.
    let batch = |instance: &str| {
        if instance == "chaos-join-rekey" {
            "20"
        } else {
            "50"
        }
    };
    let env = |instance: &'static str| {
        [
            ("FLOWS_STORE", url.clone()),
            ("CHAOS_TABLE", table.clone()),
            ("FLOWS_INSTANCE", instance.to_owned()),
            ("FLOWS_BATCH_MAX_MESSAGES", batch(instance).to_owned()),
        ]
    };
    let start = |instance: &'static str| {
        let env = env(instance);
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        WorkerProcess::start(chaos_worker(), brokers, &env)
    };
    let sources = [("chaos-words", 4), ("chaos-definitions", 2)];
    let intermediate = [("chaos-join-intermediate", 8)];
    let rekey = Progress {
        brokers,
        group: "chaos-join-rekey",
        inputs: &sources,
    };
    let apply = Progress {
        brokers,
        group: "chaos-join",
        inputs: &intermediate,
    };
    let (survivor, victim, progress) = if killed == "chaos-join-rekey" {
        ("chaos-join", "chaos-join-rekey", &rekey)
    } else {
        ("chaos-join-rekey", "chaos-join", &apply)
    };
    let other = start(survivor);
    let start_victim = || start(victim);
    kill_repeatedly(&mut rng, brokers, phases(records), progress, &start_victim).await;
    let worker = start(victim);
    wait_for_completion(&[&rekey, &apply], Duration::from_secs(240)).await;
    terminate(worker);
    terminate(other);
    eprintln!(
        "{} intermediate records for {} source messages",
        high_watermark_total(brokers, "chaos-join-intermediate", 8),
        rekey.available()
    );
    check_join(brokers, &table, &expected).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_survives_sigkill_of_its_rekey_step() {
    join_under_kills("chaos-join-rekey", 41).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_survives_sigkill_of_its_stateful_half() {
    join_under_kills("chaos-join", 43).await;
}

/// The reproduction, with `examples/word-join.rs` as shipped: run it until all
/// input is applied, stop it, rewind the re-key step's group to the beginning (what a
/// crash after publishing and before committing leaves behind, at its worst), run it
/// again. Every source message was re-keyed twice; every card must count it once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rewound_rekey_step_changes_no_joined_state_twice() {
    #[derive(Deserialize)]
    struct WordCard {
        count: i64,
        definition: Option<String>,
    }
    let broker = BrokerProcess::start(&[
        ("words", 4),
        ("definitions", 2),
        ("word-join-intermediate", 8),
        ("word-cards", 4),
        ("word-join-dead-letter", 1),
    ]);
    let brokers = broker.bootstrap.as_str();
    let table = table("word_cards_rewind");
    let url = postgres_url();
    let mut rng = StdRng::seed_from_u64(47);
    let words = skewed_words(&mut rng, 4_000, 100);
    let mut records: Vec<EncodedRecord> = words
        .iter()
        .map(|w| text_record("words", None, w, w))
        .collect();
    let mut definitions = HashMap::new();
    for word in words.iter().take(50) {
        let definition = format!("what {word} means");
        definitions.insert(word.clone(), definition.clone());
        records.push(text_record("definitions", None, word, &definition));
    }
    produce(brokers, &records).await;

    let binary = example_binary("word-join");
    let env = [
        ("FLOWS_STORE", url.as_str()),
        ("FLOWS_STATE_TABLE", table.as_str()),
    ];
    let sources = [("words", 4), ("definitions", 2)];
    let intermediate = [("word-join-intermediate", 8)];
    let rekey = Progress {
        brokers,
        group: "word-join-rekey",
        inputs: &sources,
    };
    let apply = Progress {
        brokers,
        group: "word-join",
        inputs: &intermediate,
    };
    for run in ["first run", "after the rewind"] {
        let worker = WorkerProcess::start(&binary, brokers, &env);
        wait_for_completion(&[&rekey, &apply], Duration::from_secs(120)).await;
        terminate(worker);
        eprintln!(
            "{run}: {} intermediate records for {} source messages",
            apply.available(),
            rekey.available()
        );
        if run == "first run" {
            rewind_group(brokers, "word-join-rekey", &sources);
            assert_eq!(rekey.committed(), 0, "the rewind took effect");
        }
    }
    assert_eq!(
        apply.available(),
        2 * rekey.available(),
        "every source message was re-keyed twice"
    );

    let expected = tally(words.iter().map(String::as_str));
    let store = flows::open_state_store(&url, &table).await.unwrap();
    let ids: Vec<flows::PersistenceId> = expected
        .keys()
        .map(|w| flows::PersistenceId::new(w).unwrap())
        .collect();
    for state in store.get_all(&ids).await.unwrap() {
        let card: WordCard = serde_json::from_slice(state.content.as_deref().unwrap()).unwrap();
        let word = state.id.as_str();
        assert_eq!(
            card.count, expected[word],
            "{word}: counted once per source message"
        );
        assert_eq!(
            card.definition.as_ref(),
            definitions.get(word),
            "{word}: definition"
        );
    }
    assert_no_dead_letters(brokers, "word-join-dead-letter");
}

// --- materialise ------------------------------------------------------------------------

/// A row of `chaos-worker`'s materialised table.
#[derive(Debug, PartialEq, flows::Row)]
#[flows(table = "chaos_readings")]
struct Reading {
    #[flows(key)]
    key: String,
    seq: i64,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn materialise_survives_sigkill_with_the_last_value_of_every_key() {
    let broker = BrokerProcess::start(&CHAOS_TOPICS);
    let brokers = broker.bootstrap.as_str();
    let table_name = table("chaos_readings");
    let url = postgres_url();
    let mut rng = StdRng::seed_from_u64(53);
    // Upserts are fast: enough input per feed that a kill lands while work remains.
    let (records, last) = numbered("chaos-readings", 90_000, 300);
    let env = [
        ("FLOWS_STORE", url.as_str()),
        ("CHAOS_TABLE", table_name.as_str()),
        ("FLOWS_INSTANCE", "chaos-materialise"),
        ("FLOWS_BATCH_MAX_MESSAGES", "20"),
    ];
    let start = || WorkerProcess::start(chaos_worker(), brokers, &env);
    let inputs = [("chaos-readings", 4)];
    let progress = Progress {
        brokers,
        group: "chaos-materialise",
        inputs: &inputs,
    };
    kill_repeatedly(&mut rng, brokers, phases(records), &progress, &start).await;
    let worker = start();
    wait_for_completion(&[&progress], Duration::from_secs(180)).await;
    terminate(worker);

    let store = flows::postgres::PostgresStore::connect(&url).await.unwrap();
    let table =
        flows::postgres::PostgresUpsertRepository::<Reading>::with_table(store, &table_name)
            .await
            .unwrap();
    // Every reading's own row (nothing lost), and every sensor's last value.
    let mut expected: Vec<(String, i64)> = Vec::new();
    for (sensor, &n) in &last {
        expected.push((sensor.clone(), n));
        expected.extend((1..=n).map(|seq| (format!("{sensor}#{seq}"), seq)));
    }
    let keys: Vec<PrimaryKey> = expected
        .iter()
        .map(|(key, _)| PrimaryKey::from(key.clone()))
        .collect();
    let rows = table.get_all(&keys).await.unwrap();
    let wrong: Vec<_> = expected
        .iter()
        .zip(&rows)
        .filter(|((_, seq), row)| row.as_ref().map(|r| r.seq) != Some(*seq))
        .take(5)
        .collect();
    assert!(
        wrong.is_empty(),
        "rows missing or wrong (expected, found): {wrong:?}"
    );
    assert_no_dead_letters(brokers, "chaos-dead-letter");
}
