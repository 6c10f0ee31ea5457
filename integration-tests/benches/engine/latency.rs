//! End-to-end latency of the word count: from an input's timestamp (set by the feeding
//! producer when it is sent) to its output's arrival at a consumer of the output topic
//! (outputs carry their input's timestamp), p50 / p99 / max, at 10%, 50% and 90% of
//! the pipeline's median rate in the throughput rounds of the same run, with the default
//! batching and with `BatchConfig::low_latency()`, on librdkafka's mock cluster (in a
//! process of its own; see `measure` for why not Tansu).
//!
//! Each point is two child processes: one runs the pipeline (its CPU seconds and peak
//! RSS are the table's), the other the load: a feeder sending at the fixed rate for
//! `FLOWS_BENCH_LATENCY_SECONDS` (default 5), a reader of the outputs and a reader of
//! the inputs (the broker's own latency, feeder and reader included: the baseline). All
//! share the machine's cores with the broker (and PostgreSQL), so near the maximum rate
//! the load takes CPU the pipeline had in the throughput rounds.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use flows::kafka::rdkafka::config::ClientConfig;
use flows::kafka::rdkafka::consumer::{BaseConsumer, Consumer};
use flows::kafka::rdkafka::message::Message as _;
use flows::kafka::rdkafka::producer::{
    BaseRecord, DefaultProducerContext, Producer as _, ThreadedProducer,
};
use flows::kafka::rdkafka::{Offset, TopicPartitionList};
use flows::kafka::{BatchConfig, Engine};

use super::{
    Broker, PARTITIONS, Report, bench_config, create_topics, postgres_url, unix_millis, write_word,
};

const LOADS: [u32; 3] = [10, 50, 90];

/// The loads, in percent of the measured rate (`FLOWS_BENCH_LATENCY_LOADS`, default
/// 10,50,90).
fn loads() -> Vec<u32> {
    std::env::var("FLOWS_BENCH_LATENCY_LOADS")
        .ok()
        .map(|v| v.split(',').filter_map(|l| l.trim().parse().ok()).collect())
        .unwrap_or_else(|| LOADS.to_vec())
}

fn seconds() -> u64 {
    std::env::var("FLOWS_BENCH_LATENCY_SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5)
}

/// Runs every point on a fresh broker each and prints the table. `max_rate(mode)` is a
/// program's median rate in this run (`FLOWS_BENCH_LATENCY_MAX_RATE` when the
/// throughput rounds were skipped); `FLOWS_BENCH_LATENCY_STORES` (`memory,postgres`)
/// picks the stores.
pub fn measure(fresh_broker: &dyn Fn() -> Broker, max_rate: &dyn Fn(&str) -> Option<f64>) {
    let fallback = std::env::var("FLOWS_BENCH_LATENCY_MAX_RATE")
        .ok()
        .and_then(|v| v.parse::<f64>().ok());
    let mut rows = Vec::new();
    let stores = std::env::var("FLOWS_BENCH_LATENCY_STORES").unwrap_or_default();
    // Tansu's own produce-to-fetch latency is seconds under these loads (the input
    // topic alone: p50 1.5 s at 40,000/s), which would hide flows': the mock cluster's
    // is milliseconds. FLOWS_BENCH_LATENCY_BROKER=tansu measures on the run's broker.
    let tansu_latency = std::env::var("FLOWS_BENCH_LATENCY_BROKER").is_ok_and(|b| b == "tansu");
    for (store, mode) in [("memory", "count-memory"), ("postgres", "count-postgres")] {
        if !stores.is_empty() && !stores.split(',').any(|s| s == store) {
            continue;
        }
        let Some(max) = max_rate(mode).or(fallback) else {
            eprintln!("latency: no rate measured for {mode}; skipped");
            continue;
        };
        for preset in ["throughput", "low-latency"] {
            for load in loads() {
                let rate = (max * f64::from(load) / 100.0).max(1.0) as u64;
                let input = format!("live-{store}-{preset}-{load}");
                let output = format!("{input}-out");
                let topics = [(input.as_str(), PARTITIONS), (output.as_str(), PARTITIONS)];
                let broker = if tansu_latency {
                    let broker = fresh_broker();
                    create_topics(&broker.bootstrap, &topics);
                    broker
                } else {
                    Broker::start_mock(&topics)
                };
                let child = format!("latency:{store}:{preset}:{rate}:{input}");
                match super::run_program(&broker, &child) {
                    Some((report, _)) => {
                        eprintln!("latency {store} {preset} {load}%: {report:?}");
                        rows.push((store, preset, load, rate, report));
                    }
                    None => eprintln!("latency {store} {preset} {load}%: failed"),
                }
            }
        }
    }
    println!(
        "\nEnd-to-end latency of the word count (input timestamp → output at a consumer), \
         {} s per point",
        seconds()
    );
    println!(
        "| store | batching | load | msgs/s offered | p50 ms | p99 ms | max ms | input topic alone: p50 / p99 / max ms | pipeline CPU s | pipeline peak RSS MB | load CPU s (feeder, readers) |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (store, preset, load, rate, report) in rows {
        let latency = Latency::from_extra(&report.extra);
        let alone = Latency::from_extra(report.extra.get(3..).unwrap_or_default());
        println!(
            "| {store} | {preset} | {load}% | {rate} | {} | {} | {} | {} / {} / {} | {:.1} | {:.0} | {:.1} |",
            latency.p50,
            latency.p99,
            latency.max,
            alone.p50,
            alone.p99,
            alone.max,
            report.cpu_seconds,
            report.peak_rss_mb,
            report.extra.get(6).copied().unwrap_or_default()
        );
    }
}

/// Latency percentiles in milliseconds.
#[derive(Clone, Copy, Debug, Default)]
struct Latency {
    p50: u64,
    p99: u64,
    max: u64,
}

impl Latency {
    fn extra(&self) -> Vec<f64> {
        vec![self.p50 as f64, self.p99 as f64, self.max as f64]
    }

    fn from_extra(extra: &[f64]) -> Self {
        match extra {
            [p50, p99, max, ..] => Self {
                p50: *p50 as u64,
                p99: *p99 as u64,
                max: *max as u64,
            },
            _ => Self::default(),
        }
    }

    fn of(mut samples: Vec<u64>) -> Self {
        samples.sort_unstable();
        let at = |q: f64| {
            let index = ((samples.len() as f64 * q).ceil() as usize).clamp(1, samples.len());
            samples[index - 1]
        };
        if samples.is_empty() {
            return Self::default();
        }
        Self {
            p50: at(0.50),
            p99: at(0.99),
            max: samples[samples.len() - 1],
        }
    }
}

/// One point: `latency:<store>:<preset>:<rate>:<input topic>`. This process runs the
/// pipeline only; the load (feeder and readers) runs in a process of its own, so that
/// this one's CPU seconds and peak RSS are the pipeline's.
pub async fn child(spec: &str, brokers: &str) -> Report {
    let parts: Vec<&str> = spec.split(':').collect();
    let [_, store, preset, rate, input] = parts[..] else {
        panic!("bad latency spec {spec}");
    };
    let name = input.to_owned();
    let store = match store {
        "memory" => flows::open_state_store("memory://", "bench").await.unwrap(),
        _ => {
            let table = format!("bench_live_{}", std::process::id());
            flows::open_state_store(&postgres_url(), &table)
                .await
                .unwrap()
        }
    };
    let config = bench_config(brokers).batch_config(BatchConfig::preset(preset).unwrap());
    let pipeline = super::word_count_from(input, &name, store);
    let running = Engine::new(config).start(&pipeline).unwrap();
    running
        .wait_for(|m| m.rebalances > 0)
        .await
        .expect("partitions assigned");
    let mut load = Command::new(std::env::current_exe().unwrap());
    load.args(["--child", &format!("latency-load:{rate}:{input}"), brokers])
        .stderr(Stdio::inherit());
    let load = tokio::task::spawn_blocking(move || load.output())
        .await
        .unwrap()
        .unwrap();
    let stdout = String::from_utf8_lossy(&load.stdout);
    let load = stdout
        .lines()
        .find_map(Report::parse)
        .unwrap_or_else(|| panic!("the latency load gave no report: {:?}", load.status));
    running.shutdown().await.unwrap();
    let mut report = Report::measure(load.messages, load.seconds);
    report.extra = load.extra;
    report.extra.push(load.cpu_seconds);
    report
}

/// The load of one point, `latency-load:<rate>:<input topic>`: `rate` words a second
/// into the input topic for `FLOWS_BENCH_LATENCY_SECONDS` plus a second of warm-up
/// (clients connecting, partition leaders found; read but not measured), the outputs'
/// latencies, and the input topic's own (the broker, feeder and reader: the baseline).
pub fn load(spec: &str, brokers: &str) -> Report {
    let parts: Vec<&str> = spec.split(':').collect();
    let [_, rate, input] = parts[..] else {
        panic!("bad latency load spec {spec}");
    };
    let rate: u64 = rate.parse().unwrap();
    let total = rate * (seconds() + 1);
    let measured_from = unix_millis() + 1_000;
    let reader = {
        let (brokers, topic) = (brokers.to_owned(), format!("{input}-out"));
        std::thread::spawn(move || read_latencies(&brokers, &topic, total, measured_from))
    };
    let input_reader = {
        let (brokers, topic) = (brokers.to_owned(), input.to_owned());
        std::thread::spawn(move || read_latencies(&brokers, &topic, total, measured_from))
    };
    let started = Instant::now();
    feed_at(brokers, input, rate, total);
    let samples = reader.join().unwrap();
    let broker_alone = input_reader.join().unwrap();
    let seconds = started.elapsed().as_secs_f64();
    let mut report = Report::measure(samples.len() as u64, seconds);
    report.extra = Latency::of(samples).extra();
    report.extra.extend(Latency::of(broker_alone).extra());
    report
}

/// Sends `total` words to `topic` at `rate` per second (in steps of a millisecond).
fn feed_at(brokers: &str, topic: &str, rate: u64, total: u64) {
    let producer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("linger.ms", "5")
        .set("compression.type", "lz4")
        .set("queue.buffering.max.messages", "1000000")
        .create()
        .unwrap();
    let started = Instant::now();
    let mut sent = 0u64;
    let mut word = String::new();
    while sent < total {
        let due = ((started.elapsed().as_secs_f64() * rate as f64) as u64).min(total);
        while sent < due {
            write_word(sent, &mut word);
            let record = BaseRecord::<str, str>::to(topic).key(&word).payload(&word);
            match producer.send(record) {
                Ok(()) => sent += 1,
                Err(_) => std::thread::sleep(Duration::from_micros(200)),
            }
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    producer
        .flush(Duration::from_secs(30))
        .expect("feed flushed");
}

/// Reads `total` outputs from every partition of `topic`: each one's age on arrival
/// (now minus its timestamp, which is its input's), in milliseconds, of those sent from
/// `measured_from` (Unix milliseconds) on. Gives up 30 s after the last arrival.
fn read_latencies(brokers: &str, topic: &str, total: u64, measured_from: i64) -> Vec<u64> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("{topic}-reader"))
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "5")
        .set("isolation.level", "read_uncommitted")
        .create()
        .unwrap();
    let mut assignment = TopicPartitionList::new();
    for partition in 0..PARTITIONS {
        assignment
            .add_partition_offset(topic, partition, Offset::Beginning)
            .unwrap();
    }
    consumer.assign(&assignment).unwrap();
    let mut samples = Vec::with_capacity(total as usize);
    let (mut read, mut last) = (0, Instant::now());
    while read < total {
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(message)) => {
                let now = unix_millis();
                let sent = message.timestamp().to_millis().unwrap_or(now);
                if sent >= measured_from {
                    samples.push((now - sent).max(0) as u64);
                }
                read += 1;
                last = Instant::now();
            }
            Some(Err(error)) => eprintln!("latency reader: {error}"),
            None if last.elapsed() > Duration::from_secs(30) => break,
            None => {}
        }
    }
    samples
}
