//! CPU cost of a stateful batch without Kafka: `apply_batch` of word count on the
//! in-memory store against the same counting done by hand (decode the word, bump a
//! `HashMap` counter, encode the output record), in one process, one run.
//!
//! `cargo bench -p flows-kafka --bench stateful_batch`
//!
//! The ratio is what the replay bookkeeping (progress, last results, versions, one
//! read and one write per key per batch) costs on top of the user's own work; the
//! engine benchmark (`integration-tests/benches/engine.rs`) measures it end to end.
//! `FLOWS_BENCH_MESSAGES` (default 1,000,000), `FLOWS_BENCH_BATCH` (default 5,000),
//! `FLOWS_BENCH_ROUNDS` (default 5; the median of each is reported).

#![allow(clippy::unwrap_used)] // a benchmark: a panic is the failure report

use std::collections::HashMap;
use std::hint::black_box;
use std::sync::Arc;
use std::time::Instant;

use flows_core::function::{ErrorAction, PersistenceIdFn, StatefulFunction};
use flows_core::{
    EncodedRecord, Format, Json, MemoryStateRepository, RawMessage, Record, Topic, Utf8,
};
use flows_kafka::apply_batch;

// As in the engine benchmark: allocation is a large part of this path.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const DISTINCT: usize = 10_000;
const PARTITIONS: i32 = 8;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// `total` messages over `DISTINCT` words, spread over partitions by word, as batches of
/// at most `batch` messages of one partition each (what a partition worker sees).
fn batches(total: usize, batch: usize) -> Vec<Vec<RawMessage>> {
    let words: Vec<String> = (0..DISTINCT).map(|i| format!("word{i:05}")).collect();
    let topic: Arc<str> = Arc::from("words");
    let mut partitions: Vec<Vec<RawMessage>> = vec![Vec::new(); PARTITIONS as usize];
    let mut seed = 0x2545_f491_4f6c_dd1d_u64;
    for _ in 0..total {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let word = &words[(seed % DISTINCT as u64) as usize];
        let partition = (seed % DISTINCT as u64) as usize % PARTITIONS as usize;
        let offset = partitions[partition].len() as i64;
        partitions[partition].push(RawMessage::raw(
            Arc::clone(&topic),
            partition as i32,
            offset,
            Some(word.as_bytes()),
            Some(word.as_bytes()),
        ));
    }
    partitions
        .into_iter()
        .flat_map(|p| {
            p.chunks(batch)
                .map(<[RawMessage]>::to_vec)
                .collect::<Vec<_>>()
        })
        .collect()
}

/// The baseline: the same counting and output encoding, with no bookkeeping at all.
fn by_hand(batches: &[Vec<RawMessage>]) -> usize {
    let input = Topic::new("words", Utf8, Utf8);
    let output = Topic::new("counts", Utf8, Json::<i64>::new());
    let format = Json::<i64>::new();
    let mut counts: HashMap<String, Vec<u8>> = HashMap::new();
    let mut published = 0;
    for batch in batches {
        let mut records: Vec<EncodedRecord> = Vec::with_capacity(batch.len());
        for raw in batch {
            let word = input.decode(raw).unwrap();
            let stored = counts.get(&word.key).map(|b| format.decode(b).unwrap());
            let count = stored.unwrap_or(0) + 1;
            counts.insert(word.key.clone(), format.encode(&count).unwrap());
            records.push(
                output
                    .encode(Record::new(word.key, count), raw.timestamp)
                    .unwrap(),
            );
        }
        published += black_box(records).len();
    }
    published
}

async fn with_flows(batches: &[Vec<RawMessage>]) -> usize {
    let count = StatefulFunction::new(Json::<i64>::new()).one_to_one(
        Topic::new("words", Utf8, Utf8),
        Topic::new("counts", Utf8, Json::<i64>::new()),
        PersistenceIdFn::key(),
        |count: Option<&i64>, word| {
            let count = count.copied().unwrap_or(0) + 1;
            Ok((count, Record::new(word.key, count)))
        },
    );
    let store = MemoryStateRepository::new();
    let on_error = |_: &RawMessage, _: &flows_core::ProcessError| ErrorAction::Abort;
    let mut published = 0;
    for batch in batches {
        published += apply_batch(&count, &store, batch, &on_error)
            .await
            .unwrap()
            .outputs
            .len();
    }
    published
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let total = env("FLOWS_BENCH_MESSAGES", 1_000_000);
    let batch = env("FLOWS_BENCH_BATCH", 5_000);
    let batches = batches(total, batch);
    let only = std::env::var("FLOWS_BENCH_ONLY").unwrap_or_default();

    // Rounds alternate the two, and each reports its median: this machine's noise
    // (other tenants, memory scanning) moves a single run by ±30%.
    let rounds = env("FLOWS_BENCH_ROUNDS", 5).max(1);
    let mut by_hand_times = Vec::new();
    let mut flows_times = Vec::new();
    for _ in 0..rounds {
        if only.is_empty() || only == "by-hand" {
            let started = Instant::now();
            assert_eq!(by_hand(&batches), total);
            by_hand_times.push(started.elapsed().as_secs_f64());
        }
        if only.is_empty() || only == "flows" {
            let started = Instant::now();
            assert_eq!(with_flows(&batches).await, total);
            flows_times.push(started.elapsed().as_secs_f64());
        }
    }
    let baseline = median(&mut by_hand_times);
    let flows = median(&mut flows_times);
    println!(
        "stateful batch: {total} messages, {DISTINCT} words, batches of {batch}, median of {rounds} rounds"
    );
    let per_message = |s: f64| s * 1e9 / total as f64;
    if let Some(b) = baseline {
        println!(
            "  by hand (baseline) {:>8.0} ns/message  1.00",
            per_message(b)
        );
    }
    if let Some(f) = flows {
        let ratio = baseline.map_or(String::new(), |b| format!("{:.2}", f / b));
        println!(
            "  flows apply_batch  {:>8.0} ns/message  {ratio}",
            per_message(f)
        );
    }
}

fn median(times: &mut [f64]) -> Option<f64> {
    times.sort_by(f64::total_cmp);
    times.get(times.len() / 2).copied()
}
