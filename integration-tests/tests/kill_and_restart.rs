//! Crash safety end to end: the word-count worker runs as a separate process against a
//! broker in another process (`embedded-kafka`, librdkafka's mock cluster) and the real
//! PostgreSQL; it is killed with SIGKILL while it works, at least five times, and
//! restarted. Afterwards every stored count must be exact (G1), and the output topic
//! must hold every count of every word, first appearances in ascending order, any
//! repeat a byte-identical replay (G2, G3).
//!
//! It runs twice: with `examples/word-count.rs` as shipped, and with a worker that
//! stamps every output with a random header, so a recomputation (instead of a replay)
//! would show up as a duplicate with different bytes.
//!
//! Needs PostgreSQL at `FLOWS_TEST_POSTGRES_URL` (default
//! `postgres://postgres@127.0.0.1:5432/flows_test`; `scripts/test` starts it), and the
//! example binary, which `cargo test` builds.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use flows::SingleStateRepository;
use flows_integration_tests::{
    check_word_count_outputs, example_binary, produce, read_topic, stored_counts, tally,
    text_record,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const WORDS: usize = 50_000;
const DISTINCT: usize = 2_000;
const PHASES: usize = 6;

fn postgres_url() -> String {
    std::env::var("FLOWS_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/flows_test".into())
}

/// The broker process; closing its stdin (on drop) ends it.
struct Broker {
    child: Child,
    bootstrap: String,
}

impl Broker {
    fn start() -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_embedded-kafka"))
            .args(["words:4", "word-counts:4", "words-dead-letter:1"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start the broker process");
        let stdout = child.stdout.take().unwrap();
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).unwrap();
        let bootstrap = line
            .trim()
            .strip_prefix("BOOTSTRAP=")
            .unwrap_or_else(|| panic!("unexpected broker output {line:?}"))
            .to_owned();
        Self { child, bootstrap }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn_worker(binary: &PathBuf, brokers: &str, table: &str) -> Child {
    Command::new(binary)
        .env("FLOWS_BROKERS", brokers)
        .env("FLOWS_STORE", postgres_url())
        .env("FLOWS_STATE_TABLE", table)
        .env("FLOWS_BATCH_MAX_MESSAGES", "200")
        .env(
            "FLOWS_CONSUMER_PROPERTIES",
            "session.timeout.ms=6000,heartbeat.interval.ms=500",
        )
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .spawn()
        .expect("start the worker")
}

async fn total(store: &dyn SingleStateRepository, words: &[String]) -> i64 {
    stored_counts(store, words.iter().cloned())
        .await
        .values()
        .sum()
}

async fn wait_for_total(
    store: &dyn SingleStateRepository,
    words: &[String],
    condition: impl Fn(i64) -> bool,
    timeout: Duration,
) -> Option<i64> {
    let deadline = Instant::now() + timeout;
    loop {
        let now = total(store, words).await;
        if condition(now) {
            return Some(now);
        }
        if Instant::now() > deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
}

async fn kill_and_restart(binary: PathBuf, seed: u64) {
    let broker = Broker::start();
    let brokers = broker.bootstrap.clone();
    let table = format!("word_counts_kill_{seed}_{}", std::process::id());
    let store = flows::open_state_store(&postgres_url(), &table)
        .await
        .unwrap_or_else(|e| panic!("PostgreSQL at {} is required: {e}", postgres_url()));

    let mut rng = StdRng::seed_from_u64(seed);
    // A skewed multiset: a few words are very frequent, most are rare.
    let input: Vec<String> = (0..WORDS)
        .map(|_| {
            let r: f64 = rng.random();
            format!("word{}", (r * r * DISTINCT as f64) as usize)
        })
        .collect();
    let distinct: Vec<String> = {
        let mut d = input.clone();
        d.sort();
        d.dedup();
        d
    };

    let mut fed = 0usize;
    let mut kills_while_working = 0;
    for phase in 0..PHASES {
        let end = WORDS * (phase + 1) / PHASES;
        let records: Vec<_> = input[fed..end]
            .iter()
            .map(|w| text_record("words", None, w, w))
            .collect();
        produce(&brokers, &records).await;
        fed = end;

        let before = total(store.as_ref(), &distinct).await;
        let mut worker = spawn_worker(&binary, &brokers, &table);
        let progressed = wait_for_total(
            store.as_ref(),
            &distinct,
            |t| t > before,
            Duration::from_secs(90),
        )
        .await;
        assert!(
            progressed.is_some(),
            "phase {phase}: the worker made no progress"
        );
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..400))).await;
        worker.kill().unwrap(); // SIGKILL
        worker.wait().unwrap();
        let at_kill = total(store.as_ref(), &distinct).await;
        if at_kill < fed as i64 {
            kills_while_working += 1;
        }
        eprintln!("phase {phase}: killed with {at_kill} of {fed} fed words counted");
    }
    assert!(
        kills_while_working >= 5,
        "only {kills_while_working} kills happened while work remained"
    );

    // The last run finishes the work and stops gracefully on SIGTERM.
    let mut worker = spawn_worker(&binary, &brokers, &table);
    let finished = wait_for_total(
        store.as_ref(),
        &distinct,
        |t| t >= WORDS as i64,
        Duration::from_secs(180),
    )
    .await;
    let status = Command::new("kill")
        .args(["-TERM", &worker.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let exit = worker.wait().unwrap();
    assert!(finished.is_some(), "the work never completed");
    assert!(exit.success(), "graceful shutdown on SIGTERM: {exit:?}");

    let expected = tally(input.iter().map(String::as_str));
    let stored = stored_counts(store.as_ref(), distinct.iter().cloned()).await;
    assert_eq!(stored, expected, "G1: every stored count is exact");
    let outputs = read_topic(&brokers, "word-counts", WORDS, Duration::from_secs(120));
    let duplicates = check_word_count_outputs(&outputs, &expected).unwrap();
    eprintln!(
        "{} outputs for {WORDS} words: {duplicates} byte-identical replays",
        outputs.len()
    );
    drop(broker);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shipped_word_count_survives_sigkill_with_exact_counts() {
    kill_and_restart(example_binary("word-count"), 11).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outputs_are_replayed_not_recomputed_after_sigkill() {
    kill_and_restart(PathBuf::from(env!("CARGO_BIN_EXE_stamped-word-count")), 23).await;
}
