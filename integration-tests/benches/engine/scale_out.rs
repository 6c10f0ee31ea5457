//! Scale-out: the word count on PostgreSQL with one worker process, then with two in one
//! consumer group sharing one state table, over the same million messages: the total
//! rate (from the first assignment to the last processed batch of either), and each
//! process's share and CPU.
//!
//! Each worker reports when it first got partitions and when it last finished a batch;
//! the driver stops the workers once the group has committed every message.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use flows::kafka::Engine;
use flows_integration_tests::committed_total;

use super::{Broker, PARTITIONS, Report, bench_config, feed, postgres_url, unix_millis};

/// Runs one and two workers, each time on a fresh broker fed `total` messages.
pub fn measure(fresh_broker: &dyn Fn() -> Broker, total: u64) {
    let mut rows = Vec::new();
    for workers in [1, 2] {
        let broker = fresh_broker();
        feed(&broker.bootstrap, total);
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let tag = format!("{}_{workers}", std::process::id());
        let table = format!("bench_scale_{tag}");
        // Created once here: workers creating one table at once would race.
        runtime.block_on(async {
            flows::open_state_store(&postgres_url(), &table)
                .await
                .unwrap();
        });
        let group = format!("bench-scale-{tag}");
        let mut children: Vec<Child> = (0..workers)
            .map(|_| spawn(&broker.bootstrap, &group, &table))
            .collect();
        let started = Instant::now();
        while committed_total(&broker.bootstrap, &group, &[("words", PARTITIONS)]) < total as i64 {
            assert!(
                started.elapsed() < Duration::from_secs(600),
                "scale-out: the group did not commit everything within 10 minutes"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        let reports: Vec<Report> = children.iter_mut().map(stop).collect();
        rows.push((workers, reports));
    }
    println!("\nScale-out: the word count on PostgreSQL, one consumer group, {total} messages");
    println!(
        "| workers | msgs/s (total) | ratio to one | per process: messages, CPU s, peak RSS MB |"
    );
    println!("|---:|---:|---:|---|");
    let mut one = None;
    for (workers, reports) in rows {
        // Extra: first assignment and last batch, in Unix milliseconds.
        let first = reports.iter().map(|r| r.extra[0]).fold(f64::MAX, f64::min);
        let last = reports.iter().map(|r| r.extra[1]).fold(0.0, f64::max);
        let messages: u64 = reports.iter().map(|r| r.messages).sum();
        let rate = messages as f64 / ((last - first) / 1000.0);
        let baseline = *one.get_or_insert(rate);
        let each: Vec<String> = reports
            .iter()
            .map(|r| format!("{}, {:.1}, {:.0}", r.messages, r.cpu_seconds, r.peak_rss_mb))
            .collect();
        println!(
            "| {workers} | {rate:.0} | {:.2} | {} |",
            rate / baseline,
            each.join(" / ")
        );
    }
}

/// Starts a worker of `group` on `table`; it runs until told to stop on its stdin.
fn spawn(brokers: &str, group: &str, table: &str) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .args(["--child", &format!("scale-out:{group}:{table}"), brokers])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap()
}

/// Tells a worker to stop and reads its report.
fn stop(child: &mut Child) -> Report {
    let mut stdin = child.stdin.take().unwrap();
    writeln!(stdin, "stop").unwrap();
    drop(stdin);
    let stdout = child.stdout.take().unwrap();
    let report = BufReader::new(stdout)
        .lines()
        .map_while(Result::ok)
        .find_map(|line| Report::parse(&line))
        .expect("a worker's report");
    child.wait().unwrap();
    report
}

/// One worker: `scale-out:<group>:<table>`. Reports the messages it processed, and as
/// extras when it first had partitions and when it last finished a batch.
pub async fn child(spec: &str, brokers: &str) -> Report {
    let parts: Vec<&str> = spec.split(':').collect();
    let [_, group, table] = parts[..] else {
        panic!("bad scale-out spec {spec}");
    };
    let store = flows::open_state_store(&postgres_url(), table)
        .await
        .unwrap();
    let pipeline = super::word_count(group, store);
    let running = Engine::new(bench_config(brokers)).start(&pipeline).unwrap();
    let (stop_tx, mut stop_rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = std::io::stdin().read_line(&mut line);
        let _ = stop_tx.send(());
    });
    let (mut first_assigned, mut last_batch, mut committed) = (None, 0.0, 0);
    let started = Instant::now();
    loop {
        let snapshot = running.metrics().snapshot();
        if first_assigned.is_none() && snapshot.rebalances > 0 {
            first_assigned = Some(unix_millis() as f64);
        }
        if snapshot.committed > committed {
            committed = snapshot.committed;
            last_batch = unix_millis() as f64;
        }
        if stop_rx.try_recv().is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let seconds = started.elapsed().as_secs_f64();
    running.shutdown().await.unwrap();
    let mut report = Report::measure(committed, seconds);
    report.extra = vec![first_assigned.unwrap_or(last_batch), last_batch];
    report
}
