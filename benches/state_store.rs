//! Batched versus one-at-a-time state access, per store, in one run.
//!
//! For each store: N states are read and written once as new states and once as updates,
//! (a) in batches of 1,000 with one `get_all` + one `upsert_all` per batch, and
//! (b) one at a time with `get` + `upsert`. Reported: states per second for each and the
//! ratio (a)/(b). Each state looks like a word-count state: small content, progress on
//! one partition, one stored output.
//!
//! ```text
//! cargo bench --bench state_store --features postgres,sqlite
//! FLOWS_BENCH_STATES=20000 FLOWS_BENCH_POSTGRES_URL=postgres://... cargo bench ...
//! ```

use std::sync::Arc;
use std::time::{Duration, Instant};

use flows::postgres::{PostgresStateRepository, PostgresStore};
use flows::sqlite::{SqliteStateRepository, SqliteStore};
use flows::{
    EncodedRecord, Headers, MemoryStateRepository, PersistenceId, RawState, SingleStateRepository,
    TopicPartition,
};

const BATCH: usize = 1_000;

fn next_state(mut state: RawState, offset: i64) -> RawState {
    let count = state.content.as_deref().map_or(0, |c| {
        u64::from_be_bytes(c[..8].try_into().expect("8 bytes"))
    }) + 1;
    let mut content = count.to_be_bytes().to_vec();
    content.extend_from_slice(&[0x5a; 56]);
    let tp = TopicPartition::new("words", 3);
    state.progress.record(tp.clone(), offset);
    let outputs = [EncodedRecord {
        topic: "word-counts".into(),
        partition: None,
        key: Some(state.id.as_str().as_bytes().to_vec()),
        value: Some(count.to_string().into_bytes()),
        headers: Headers::new(),
        timestamp: Some(1_700_000_000_000 + offset),
    }];
    state
        .results
        .replace_partition(tp, [(offset, &outputs[..])]);
    state.content = Some(content);
    state
}

async fn batched(store: &dyn SingleStateRepository, ids: &[PersistenceId], round: i64) -> Duration {
    let start = Instant::now();
    for (n, chunk) in ids.chunks(BATCH).enumerate() {
        let states = store.get_all(chunk).await.expect("get_all");
        let writes: Vec<_> = states
            .into_iter()
            .enumerate()
            .map(|(i, s)| next_state(s, round * 1_000_000 + (n * BATCH + i) as i64))
            .collect();
        store.upsert_all(writes).await.expect("upsert_all");
    }
    start.elapsed()
}

async fn one_at_a_time(
    store: &dyn SingleStateRepository,
    ids: &[PersistenceId],
    round: i64,
) -> Duration {
    let start = Instant::now();
    for (i, id) in ids.iter().enumerate() {
        let state = store.get(id).await.expect("get");
        store
            .upsert(&next_state(state, round * 1_000_000 + i as i64))
            .await
            .expect("upsert");
    }
    start.elapsed()
}

fn rate(n: usize, elapsed: Duration) -> f64 {
    n as f64 / elapsed.as_secs_f64()
}

async fn measure(name: &str, make: impl AsyncFn(&str) -> Arc<dyn SingleStateRepository>, n: usize) {
    let ids = |prefix: &str| -> Vec<PersistenceId> {
        (0..n)
            .map(|i| PersistenceId::new(format!("{prefix}-word-{i}")).expect("id"))
            .collect()
    };
    let (batch_ids, single_ids) = (ids("b"), ids("s"));
    let batch_store = make("bench_batched").await;
    let single_store = make("bench_single").await;
    for (round, phase) in [(1, "insert"), (2, "update")] {
        let b = batched(&*batch_store, &batch_ids, round).await;
        let s = one_at_a_time(&*single_store, &single_ids, round).await;
        let (rb, rs) = (rate(n, b), rate(n, s));
        println!(
            "| {name:<10} | {phase:<6} | {n:>7} | {rb:>12.0} | {rs:>12.0} | {:>7.1}x |",
            rb / rs
        );
    }
}

fn main() {
    let n: usize = std::env::var("FLOWS_BENCH_STATES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5_000);
    let postgres_url = std::env::var("FLOWS_BENCH_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/flows_test".to_owned());
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let dir = std::env::temp_dir().join(format!("flows-bench-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let run = std::process::id();
        println!("states per second, batches of {BATCH} (get_all + upsert_all) vs one at a time (get + upsert)\n");
        println!("| store      | phase  |  states | batched st/s |  single st/s |   ratio |");
        println!("|------------|--------|--------:|-------------:|-------------:|--------:|");
        measure(
            "memory",
            async |_| Arc::new(MemoryStateRepository::new()) as Arc<dyn SingleStateRepository>,
            n,
        )
        .await;
        let sqlite_url = format!("sqlite://{}", dir.join("bench.db").display());
        measure(
            "sqlite",
            async |table| {
                let store = SqliteStore::connect(&sqlite_url).await.expect("sqlite");
                Arc::new(SqliteStateRepository::new(store, table).await.expect("table")) as Arc<dyn SingleStateRepository>
            },
            n,
        )
        .await;
        measure(
            "postgres",
            async |table| {
                let store = PostgresStore::connect(&postgres_url)
                    .await
                    .expect("PostgreSQL (set FLOWS_BENCH_POSTGRES_URL)");
                // A new table per run, so every measurement starts empty.
                let table = format!("{table}_{run}");
                Arc::new(PostgresStateRepository::new(store, &table).await.expect("table"))
                    as Arc<dyn SingleStateRepository>
            },
            n,
        )
        .await;
        std::fs::remove_dir_all(&dir).ok();
    });
}
