//! Measures how long a SIGKILLed worker takes, once restarted, to commit again: with
//! dynamic group membership (the restarted worker is a new member; the dead one's
//! partitions wait for its session to expire) and with static membership
//! (`FLOWS_INSTANCE_ID`: the restarted worker takes its place at once).
//!
//! `restart-latency <bootstrap servers> [rounds]` runs the `chaos-stateless` pipeline of
//! `chaos-worker` with Kafka's default session timeout (45 s) and prints one line per
//! round and mode. `scripts/measure-restart` runs it against Tansu.

use std::time::{Duration, Instant};

use flows_integration_tests::{WorkerProcess, binary, committed_total, produce, text_record};

const TOPICS: [(&str, i32); 1] = [("chaos-events", 4)];
const SESSION: &str = "session.timeout.ms=45000,heartbeat.interval.ms=3000";

/// Produces `n` events numbered from `from`.
async fn feed(brokers: &str, from: usize, n: usize) {
    let records: Vec<_> = (from..from + n)
        .map(|i| {
            text_record(
                "chaos-events",
                None,
                &format!("k{}", i % 97),
                &i.to_string(),
            )
        })
        .collect();
    produce(brokers, &records).await;
}

/// Waits until `group` has committed more than `than` in total; how long that took.
fn wait_for_commit(brokers: &str, group: &str, than: i64, limit: Duration) -> Option<Duration> {
    let started = Instant::now();
    while started.elapsed() < limit {
        if committed_total(brokers, group, &TOPICS) > than {
            return Some(started.elapsed());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    None
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let brokers = args
        .next()
        .ok_or("usage: restart-latency <bootstrap servers> [rounds]")?;
    let rounds: usize = args.next().map_or(Ok(1), |r| r.parse())?;
    let worker = binary("chaos-worker");
    let mut fed = 0;
    println!("| round | membership | SIGKILL → restarted worker's first commit |");
    println!("|---|---|---|");
    for round in 1..=rounds {
        for (mode, instance_id) in [("dynamic", None), ("static", Some("restart-worker-1"))] {
            let prefix = format!("restart-{mode}-{round}-{}.", std::process::id());
            let group = format!("{prefix}chaos-stateless");
            let mut env = vec![
                ("FLOWS_INSTANCE", "chaos-stateless"),
                ("FLOWS_GROUP_PREFIX", prefix.as_str()),
                ("FLOWS_CONSUMER_PROPERTIES", SESSION),
            ];
            if let Some(id) = instance_id {
                env.push(("FLOWS_INSTANCE_ID", id));
            }
            feed(&brokers, fed, 1_000).await;
            fed += 1_000;
            let first = WorkerProcess::start(&worker, &brokers, &env);
            wait_for_commit(&brokers, &group, 0, Duration::from_secs(180))
                .ok_or("the first worker never committed")?;
            let before = committed_total(&brokers, &group, &TOPICS);
            first.kill();
            feed(&brokers, fed, 1_000).await;
            fed += 1_000;
            let killed = Instant::now();
            let second = WorkerProcess::start(&worker, &brokers, &env);
            let took = wait_for_commit(&brokers, &group, before, Duration::from_secs(300))
                .map(|_| killed.elapsed());
            second.terminate();
            match took {
                Some(took) => println!("| {round} | {mode} | {:.1} s |", took.as_secs_f64()),
                None => println!("| {round} | {mode} | no commit within 300 s |"),
            }
        }
    }
    Ok(())
}
