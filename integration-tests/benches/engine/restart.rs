//! Restart: how long a word-count worker on PostgreSQL takes from its start to its first
//! processed batch, with an empty state table and with one of 1,000,000 states. flows
//! keeps state in the database, so a worker restores nothing before it works: the two
//! should not differ (a store kept in Kafka changelogs would replay them first).

use std::time::Instant;

use flows::kafka::Engine;
use flows::{PersistenceId, RawState, SingleStateRepository};

use super::{Broker, Report, bench_config, feed, postgres_url};

/// States in the large table (`FLOWS_BENCH_RESTART_STATES`, default 1,000,000).
fn large() -> u64 {
    std::env::var("FLOWS_BENCH_RESTART_STATES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000)
}

/// Fills tables of no states and of `large()` states, then starts a worker on each.
pub fn measure(fresh_broker: &dyn Fn() -> Broker) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let mut rows = Vec::new();
    for states in [0, large()] {
        let table = format!("bench_restart_{}_{states}", std::process::id());
        let filling = Instant::now();
        runtime.block_on(fill(&table, states));
        let fill_seconds = filling.elapsed().as_secs_f64();
        let broker = fresh_broker();
        feed(&broker.bootstrap, 10_000);
        match super::run_program(&broker, &format!("restart:{table}")) {
            Some((report, _)) => rows.push((states, fill_seconds, report)),
            None => eprintln!("restart with {states} states: failed"),
        }
    }
    println!("\nRestart: a word-count worker on PostgreSQL, from its start to its first batch");
    println!(
        "| states in the table | store connected ms | partitions assigned ms | first batch done ms | filling the table s |"
    );
    println!("|---:|---:|---:|---:|---:|");
    for (states, fill_seconds, report) in rows {
        let [connected, assigned, first] = report.extra[..] else {
            continue;
        };
        println!("| {states} | {connected:.0} | {assigned:.0} | {first:.0} | {fill_seconds:.1} |");
    }
}

/// Writes `states` word-count states (`word0`…) into `table`, in chunks.
async fn fill(table: &str, states: u64) {
    let store = flows::open_state_store(&postgres_url(), table)
        .await
        .unwrap();
    let chunk = 10_000;
    for start in (0..states).step_by(chunk as usize) {
        let batch: Vec<RawState> = (start..(start + chunk).min(states))
            .map(|i| {
                let id = PersistenceId::new(format!("word{i}")).unwrap();
                RawState::fresh(id).with_content(b"1".to_vec())
            })
            .collect();
        store.write_all(batch).await.unwrap();
    }
}

/// One worker: `restart:<table>`. Extras: milliseconds from its start to the store
/// connected, to its partitions assigned, to its first batch done.
pub async fn child(spec: &str, brokers: &str) -> Report {
    let started = Instant::now();
    let table = spec.trim_start_matches("restart:");
    let store = flows::open_state_store(&postgres_url(), table)
        .await
        .unwrap();
    let connected = started.elapsed();
    let name = format!("bench-restart-{}", std::process::id());
    let pipeline = super::word_count(&name, store);
    let running = Engine::new(bench_config(brokers)).start(&pipeline).unwrap();
    running
        .wait_for(|m| m.rebalances > 0)
        .await
        .expect("partitions assigned");
    let assigned = started.elapsed();
    let done = running
        .wait_for(|m| m.batches > 0)
        .await
        .expect("a batch done");
    let first = started.elapsed();
    running.shutdown().await.unwrap();
    let mut report = Report::measure(done.committed, first.as_secs_f64());
    report.extra = [connected, assigned, first]
        .iter()
        .map(|d| d.as_secs_f64() * 1000.0)
        .collect();
    report
}
