//! Engine throughput against a plain rdkafka passthrough, on one broker, in one run.
//!
//! `cargo bench -p flows-integration-tests --bench engine` (PostgreSQL needed for the
//! PostgreSQL row; `FLOWS_TEST_POSTGRES_URL`, default the `flows_test` database).
//!
//! The driver starts the broker (`embedded-kafka`, librdkafka's mock cluster, in its
//! own process, or an external one: `FLOWS_BENCH_BROKERS`), fills topic `words` with
//! `FLOWS_BENCH_MESSAGES` messages (default 1,000,000) over 10,000 distinct words and 8
//! partitions, then runs each program as its own process, one after the other, each
//! reading the whole topic in its own consumer group:
//! - (a) `passthrough`, `passthrough-batched`, `passthrough-one-thread`,
//!   `passthrough-handoff`, `passthrough-split-handoff`: consume-and-produce written
//!   directly against rdkafka with flows' tuned client settings: a thread per partition
//!   queue taking one message at a time or what is queued at once, one thread on the
//!   consumer's queue, one thread on the consumer's queue handing copied batches to a
//!   thread per partition, or one thread on the partition queues doing so (flows'
//!   layout); the fastest is the baseline (the ceiling);
//! - (b) `stateless`: a flows stateless one-to-one;
//! - (c) `count-memory`, `count-sqlite`, `count-postgres`: flows word count;
//! - (d) `count-by-hand`, `count-by-hand-postgres`: the least any word count does,
//!   written by hand against rdkafka (in memory; with a batched upsert per partition
//!   batch into PostgreSQL), without flows' guarantees: the ceiling for (c);
//! - (e) `quix-at-least-once`, `quix-exactly-once`: the same word count in Quix Streams
//!   (pinned, from PyPI into a cached venv by `scripts/quix-venv`), first round only.
//!
//! Then, in the same run: `latency` (end-to-end latency at 10/50/90% of the word
//! counts' measured rates, default and low-latency batching, [`latency`]),
//! `scale-out` (one and two worker processes in one group, [`scale_out`]) and
//! `restart` (start to first batch with 0 and 1,000,000 states, [`restart`]).
//!
//! Each program reports its own numbers: messages per second from the assignment of its
//! partitions to its last acknowledged output (group join excluded), CPU seconds and peak
//! resident memory (from `/proc/self`). The driver adds the CPU the broker (when its PID
//! is known) and local PostgreSQL processes used meanwhile. The programs run in
//! `FLOWS_BENCH_ROUNDS` interleaved rounds (default 3); each row is a program's median
//! run. `FLOWS_BENCH_ONLY=mode,mode` picks programs and measurements. Default engine
//! settings throughout. `FLOWS_BENCH_PHASES=1` logs where each flows run's batches spent
//! their time (sums over partitions of processing, publishing, fold, store read, store
//! write), and `FLOWS_BENCH_WRAPPER` runs each program under a profiler. The table names
//! the machine (processor, cores, caches), and two fixed loops on one thread, in
//! registers and over 64 MiB of memory, are timed before each program: their spread is
//! the machine's own drift during the run. After the table, the ratios to Quix Streams
//! and the project's performance targets, each computed from this run and marked met or
//! not met.

#![allow(clippy::unwrap_used)] // a benchmark: a panic is the failure report

mod latency;
mod restart;
mod scale_out;

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use flows::function::{PersistenceIdFn, StatefulFunction, StatelessFunction};
use flows::kafka::rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use flows::kafka::rdkafka::client::DefaultClientContext;
use flows::kafka::rdkafka::config::ClientConfig;
use flows::kafka::rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use flows::kafka::rdkafka::error::KafkaResult;
use flows::kafka::rdkafka::error::{KafkaError, RDKafkaErrorCode};
use flows::kafka::rdkafka::message::{BorrowedMessage, Message as _};
use flows::kafka::rdkafka::producer::{
    BaseRecord, DefaultProducerContext, Producer, ThreadedProducer,
};
use flows::kafka::rdkafka::{Offset, TopicPartitionList};
use flows::kafka::{Engine, KafkaConfig, OutputProducer, Pipeline};
use flows::{EncodedRecord, Headers, Json, Record, Topic, Utf8};

// Every program here, the passthrough included, allocates through mimalloc, as a
// production deployment of a Rust service would; glibc malloc spends a third of a
// stateful pipeline's CPU time under this load (see the README's performance notes).
// Built without transparent huge pages (the `no_thp` feature, see Cargo.toml).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const DISTINCT: usize = 10_000;
const PARTITIONS: i32 = 8;

fn messages() -> u64 {
    std::env::var("FLOWS_BENCH_MESSAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000)
}

fn postgres_url() -> String {
    std::env::var("FLOWS_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/flows_test".into())
}

/// What a program reports on its last line of output.
#[derive(Debug)]
struct Report {
    messages: u64,
    seconds: f64,
    cpu_seconds: f64,
    peak_rss_mb: f64,
    /// What a measurement adds (latency percentiles, timings), in its own order.
    extra: Vec<f64>,
}

impl Report {
    fn measure(messages: u64, seconds: f64) -> Self {
        let cpu_seconds = cpu_seconds_of(std::process::id());
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        if std::env::var("FLOWS_BENCH_DEBUG").is_ok() {
            for line in status
                .lines()
                .filter(|l| l.starts_with("Rss") || l.starts_with("Vm"))
            {
                eprintln!("  {line}");
            }
            let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
            eprintln!(
                "  minor page faults {}; CPU s by thread name (user, system): {}",
                stat_ticks(&stat, &[7]),
                cpu_by_thread()
            );
        }
        let peak_kb = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            .unwrap_or(0.0);
        Self {
            messages,
            seconds,
            cpu_seconds,
            peak_rss_mb: peak_kb / 1024.0,
            extra: Vec::new(),
        }
    }

    /// Messages per second.
    fn rate(&self) -> f64 {
        self.messages as f64 / self.seconds
    }

    fn line(&self) -> String {
        let mut line = format!(
            "REPORT {} {:.3} {:.2} {:.1}",
            self.messages, self.seconds, self.cpu_seconds, self.peak_rss_mb
        );
        for value in &self.extra {
            write!(line, " {value}").unwrap();
        }
        line
    }

    fn parse(line: &str) -> Option<Self> {
        let mut parts = line.strip_prefix("REPORT ")?.split_whitespace();
        Some(Self {
            messages: parts.next()?.parse().ok()?,
            seconds: parts.next()?.parse().ok()?,
            cpu_seconds: parts.next()?.parse().ok()?,
            peak_rss_mb: parts.next()?.parse().ok()?,
            extra: parts.filter_map(|v| v.parse().ok()).collect(),
        })
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(position) = args.iter().position(|a| a == "--child") {
        let mode = args[position + 1].clone();
        let brokers = args[position + 2].clone();
        flows_integration_tests::init_tracing();
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let report = runtime.block_on(child(&mode, &brokers));
        println!("{}", report.line());
        return;
    }
    // `cargo bench` passes `--bench`; `cargo test` runs benches only with `--benches`.
    if args.iter().any(|a| a == "--list") {
        return;
    }
    driver();
}

/// The broker under test: an external one (`FLOWS_BENCH_BROKERS`), or the mock cluster
/// in a process of its own.
struct Broker {
    bootstrap: String,
    process: Option<Child>,
}

impl Broker {
    fn start() -> Self {
        if let Ok(bootstrap) = std::env::var("FLOWS_BENCH_BROKERS") {
            create_topics(&bootstrap, &[("words", PARTITIONS)]);
            return Self {
                bootstrap,
                process: None,
            };
        }
        Self::start_mock(&[("words", PARTITIONS)])
    }

    /// librdkafka's mock cluster in a process of its own, with `topics` (name,
    /// partitions).
    fn start_mock(topics: &[(&str, i32)]) -> Self {
        let mut process = Command::new(env!("CARGO_BIN_EXE_embedded-kafka"))
            .args(
                topics
                    .iter()
                    .map(|(name, partitions)| format!("{name}:{partitions}")),
            )
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(process.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let bootstrap = line.trim().strip_prefix("BOOTSTRAP=").unwrap().to_owned();
        Self {
            bootstrap,
            process: Some(process),
        }
    }

    /// CPU seconds used by the broker so far: our own process, or the one whose PID is
    /// in `FLOWS_BENCH_BROKER_PIDFILE` (scripts/bench-engine's Tansu).
    fn cpu_seconds(&self) -> Option<f64> {
        let pid = match &self.process {
            Some(process) => process.id(),
            None => std::env::var("FLOWS_BENCH_BROKER_PIDFILE")
                .ok()
                .and_then(|file| std::fs::read_to_string(file).ok())
                .and_then(|pid| pid.trim().parse().ok())?,
        };
        Some(cpu_seconds_of(pid))
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(process) = &mut self.process {
            drop(process.stdin.take());
            let _ = process.kill();
            let _ = process.wait();
        }
    }
}

/// Creates `topics` (name, partitions) on the broker at `brokers`.
fn create_topics(brokers: &str, topics: &[(&str, i32)]) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .unwrap();
    let new: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|(name, partitions)| NewTopic::new(name, *partitions, TopicReplication::Fixed(1)))
        .collect();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let created = runtime
        .block_on(admin.create_topics(&new, &AdminOptions::new()))
        .unwrap();
    for result in created {
        if let Err((name, code)) = result
            && code != RDKafkaErrorCode::TopicAlreadyExists
        {
            panic!("create topic {name}: {code}");
        }
    }
}

/// The `i`th input word into `out` (cleared first): a deterministic, skewed choice
/// among `DISTINCT` words.
fn write_word(i: u64, out: &mut String) {
    out.clear();
    write!(
        out,
        "word{}",
        i.wrapping_mul(2_654_435_761) % DISTINCT as u64
    )
    .unwrap();
}

/// Now, in milliseconds since the Unix epoch (as Kafka timestamps are).
fn unix_millis() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// Fills topic `words` of the broker at `brokers` with `total` messages.
fn feed(brokers: &str, total: u64) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let producer = OutputProducer::new(&KafkaConfig::new(brokers)).unwrap();
        let chunk = 50_000u64;
        let mut sent = 0u64;
        while sent < total {
            let records: Vec<EncodedRecord> = (sent..(sent + chunk).min(total))
                .map(|i| {
                    let mut word = String::new();
                    write_word(i, &mut word);
                    EncodedRecord {
                        topic: "words".into(),
                        partition: None,
                        key: Some(word.clone().into_bytes()),
                        value: Some(word.into_bytes()),
                        headers: Headers::new(),
                        timestamp: None,
                    }
                })
                .collect();
            producer.send_all(&records).await.unwrap();
            sent += records.len() as u64;
        }
    });
    eprintln!("fed {total} messages ({DISTINCT} words, {PARTITIONS} partitions)");
}

/// The programs, in the order each round runs them: label and `--child` mode.
const PROGRAMS: [(&str, &str); 13] = [
    (
        "(a) passthrough, a thread per partition queue",
        "passthrough",
    ),
    (
        "(a) passthrough, a thread per partition queue, batches of what is queued",
        "passthrough-batched",
    ),
    ("(a) passthrough, one thread", "passthrough-one-thread"),
    (
        "(a) passthrough, one thread handing copies to a thread per partition",
        "passthrough-handoff",
    ),
    (
        "(a) passthrough, one thread on the partition queues handing copies to a thread per partition",
        "passthrough-split-handoff",
    ),
    ("(b) flows stateless one-to-one", "stateless"),
    ("(c) flows word count, in memory", "count-memory"),
    ("(c) flows word count, SQLite", "count-sqlite"),
    ("(c) flows word count, PostgreSQL", "count-postgres"),
    ("(d) word count by hand, in memory", "count-by-hand"),
    (
        "(d) word count by hand, PostgreSQL",
        "count-by-hand-postgres",
    ),
    (
        "(e) Quix Streams 3.28.1 word count, at least once",
        "quix-at-least-once",
    ),
    (
        "(e) Quix Streams 3.28.1 word count, exactly once",
        "quix-exactly-once",
    ),
];

/// Whether `mode` runs in `round`: Quix Streams, some 40 times slower, runs in the first
/// round only (a million messages take it over a minute).
fn runs_in_round(mode: &str, round: usize) -> bool {
    !mode.starts_with("quix") || round == 1
}

/// One run of a program: its label, its report, and the CPU others used meanwhile.
type Run<'a> = (&'a str, Report, OtherCpu);

/// How many times each program runs (`FLOWS_BENCH_ROUNDS`, default 3), the programs
/// interleaved: a shared machine's speed drifts over minutes, and a program run once,
/// minutes after its baseline, can be 20% off.
fn rounds() -> usize {
    std::env::var("FLOWS_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or(3)
}

fn driver() {
    let total = messages();
    // With a restart command (scripts/bench-engine gives one for its Tansu), or with
    // our own mock cluster, every program gets a fresh broker holding just the feed:
    // a broker that keeps earlier programs' outputs slows the later ones.
    let restart = std::env::var("FLOWS_BENCH_BROKER_RESTART").ok();
    let fresh_per_program = restart.is_some() || std::env::var("FLOWS_BENCH_BROKERS").is_err();
    let mut broker: Option<Broker> = None;
    let mut runs: Vec<Run<'_>> = Vec::new();
    let mut controls: Vec<(f64, f64)> = Vec::new();
    let rounds = rounds();
    for round in 1..=rounds {
        for (label, mode) in PROGRAMS {
            if !selected(mode) || !runs_in_round(mode, round) {
                continue;
            }
            if broker.is_none() || fresh_per_program {
                if broker.take().is_some()
                    && let Some(command) = &restart
                {
                    let status = Command::new("sh").args(["-c", command]).status().unwrap();
                    assert!(status.success(), "broker restart failed: {status}");
                }
                let fresh = Broker::start();
                feed(&fresh.bootstrap, total);
                broker = Some(fresh);
            }
            let Some(broker) = &broker else {
                unreachable!("a broker was just started")
            };
            let control = control_seconds();
            controls.push(control);
            match run_program(broker, mode) {
                Some((report, others)) => {
                    eprintln!(
                        "round {round}/{rounds}: {label}: {report:?}, {others:?}, control {:.3} / {:.3} s",
                        control.0, control.1
                    );
                    runs.push((label, report, others));
                }
                None => eprintln!("round {round}/{rounds}: {label}: failed"),
            }
        }
    }
    drop(broker);
    print_table(total, rounds, &runs);
    print_control(&controls);
    print_quix_ratios(&runs);
    print_targets(&runs);
    let median_rate = |mode: &str| median_run(&runs, mode).map(Report::rate);
    let fresh_broker = || {
        if let Some(command) = &restart {
            let status = Command::new("sh").args(["-c", command]).status().unwrap();
            assert!(status.success(), "broker restart failed: {status}");
        }
        Broker::start()
    };
    if selected("latency") {
        latency::measure(&fresh_broker, &median_rate);
    }
    if selected("scale-out") {
        scale_out::measure(&fresh_broker, total);
    }
    if selected("restart") {
        restart::measure(&fresh_broker);
    }
}

/// The median run (by rate) of the program run as `mode`, if it ran.
fn median_run<'a>(runs: &'a [Run<'_>], mode: &str) -> Option<&'a Report> {
    let label = PROGRAMS.iter().find(|(_, m)| *m == mode)?.0;
    let mut of_mode: Vec<&Report> = runs
        .iter()
        .filter(|(l, ..)| *l == label)
        .map(|(_, r, _)| r)
        .collect();
    of_mode.sort_by(|a, b| a.rate().total_cmp(&b.rate()));
    (!of_mode.is_empty()).then(|| median(&of_mode))
}

/// How fast the machine itself ran just before a program: seconds a fixed loop on one
/// thread takes, in registers and then in random reads over 64 MiB (memory). On a
/// shared host both drift by tens of percent within minutes, the memory one most, and
/// every CPU-seconds column drifts with them.
fn control_seconds() -> (f64, f64) {
    let mut x = 0x9e37_79b9_7f4a_7c15_u64;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let started = Instant::now();
    for _ in 0..100_000_000 {
        std::hint::black_box(next());
    }
    let compute = started.elapsed().as_secs_f64();
    // 64 MiB, a power of two so that a mask picks an index.
    let words: Vec<u64> = (0..(8u64 << 20)).collect();
    let started = Instant::now();
    let mut sum = 0u64;
    for _ in 0..16_000_000 {
        sum = sum.wrapping_add(words[(next() as usize) & (words.len() - 1)]);
    }
    std::hint::black_box(sum);
    (compute, started.elapsed().as_secs_f64())
}

/// Prints the control loops' times over the run (see [`control_seconds`]).
fn print_control(controls: &[(f64, f64)]) {
    let spread = |of: &dyn Fn(&(f64, f64)) -> f64| {
        let low = controls.iter().map(of).reduce(f64::min)?;
        let high = controls.iter().map(of).reduce(f64::max)?;
        Some(format!(
            "{low:.3}–{high:.3} s (spread {:.0}%)",
            (high / low - 1.0) * 100.0
        ))
    };
    if let (Some(compute), Some(memory)) = (spread(&|c| c.0), spread(&|c| c.1)) {
        println!(
            "control, timed before each program on one thread: compute {compute}, memory \
             {memory}: how much the machine's own speed drifted over the run"
        );
    }
}

/// The processor, its cores and caches (Linux): the same code's CPU seconds differ by a
/// quarter between machines of one kind, so every table says which it ran on.
fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map_or("unknown processor", |m| {
            m.trim_start_matches([' ', '\t', ':'])
        });
    let cores = std::thread::available_parallelism().map_or(0, usize::from);
    let caches: Vec<String> = (0..8)
        .filter_map(|i| {
            let dir = format!("/sys/devices/system/cpu/cpu0/cache/index{i}");
            let level = std::fs::read_to_string(format!("{dir}/level")).ok()?;
            let kind = std::fs::read_to_string(format!("{dir}/type")).ok()?;
            let size = std::fs::read_to_string(format!("{dir}/size")).ok()?;
            (kind.trim() != "Instruction").then(|| format!("L{} {}", level.trim(), size.trim()))
        })
        .collect();
    format!("{model}, {cores} cores, {}", caches.join(" "))
}

/// Whether `FLOWS_BENCH_ONLY` (a comma-separated list of modes and of `latency`,
/// `scale-out`, `restart`) selects `name`; everything runs without it.
fn selected(name: &str) -> bool {
    let only = std::env::var("FLOWS_BENCH_ONLY").unwrap_or_default();
    only.is_empty() || only.split(',').any(|m| m.trim() == name)
}

/// flows' word count on PostgreSQL against Quix Streams' (median runs): the rate and
/// the CPU seconds per million messages.
fn print_quix_ratios(runs: &[Run<'_>]) {
    let median_of = |mode: &str| median_run(runs, mode);
    let Some(flows) = median_of("count-postgres") else {
        return;
    };
    let rate = Report::rate;
    let per_million = |r: &Report| r.cpu_seconds * 1e6 / r.messages as f64;
    for mode in ["quix-at-least-once", "quix-exactly-once"] {
        if let Some(quix) = median_of(mode) {
            println!(
                "flows word count on PostgreSQL / Quix Streams ({}): {:.1}x the rate, \
                 {:.1} vs {:.1} CPU-s per million messages",
                mode.trim_start_matches("quix-"),
                rate(flows) / rate(quix),
                per_million(flows),
                per_million(quix),
            );
        }
    }
}

/// The CPU seconds of every run of the program run as `mode`, lowest first.
fn cpu_seconds_of_runs(runs: &[Run<'_>], mode: &str) -> Vec<f64> {
    let Some((label, _)) = PROGRAMS.iter().find(|(_, m)| *m == mode) else {
        return Vec::new();
    };
    let mut seconds: Vec<f64> = runs
        .iter()
        .filter(|(l, ..)| l == label)
        .map(|(_, report, _)| report.cpu_seconds)
        .collect();
    seconds.sort_by(f64::total_cmp);
    seconds
}

/// The performance targets (issue 17 of the project), each computed from this run: the
/// word count against the hand-written one in rate and in CPU seconds (each program's
/// median over the rounds), SQLite against the fastest passthrough, PostgreSQL against
/// Quix Streams, flows' peak RSS, and the in-memory word count's CPU spread over the
/// rounds against the hand-written count's.
/// Rows whose programs did not run are left out.
fn print_targets(runs: &[Run<'_>]) {
    let rate = |mode: &str| median_run(runs, mode).map(Report::rate);
    let cpu = |mode: &str| {
        let seconds = cpu_seconds_of_runs(runs, mode);
        let sorted: Vec<&f64> = seconds.iter().collect();
        (!sorted.is_empty()).then(|| *median(&sorted))
    };
    let spread = |mode: &str| match cpu_seconds_of_runs(runs, mode)[..] {
        [low, .., high] if low > 0.0 => Some((low, high, (high - low) / low)),
        _ => None,
    };
    let fastest_passthrough = PROGRAMS
        .iter()
        .filter(|(label, _)| label.starts_with("(a)"))
        .filter_map(|(_, mode)| rate(mode))
        .reduce(f64::max);
    let verdict = |met: bool| if met { "met" } else { "not met" };
    let mut rows: Vec<String> = Vec::new();
    for (store, flows, by_hand, target) in [
        ("in memory", "count-memory", "count-by-hand", 0.85),
        (
            "PostgreSQL",
            "count-postgres",
            "count-by-hand-postgres",
            0.75,
        ),
    ] {
        if let (Some(f), Some(h)) = (rate(flows), rate(by_hand)) {
            let ratio = f / h;
            rows.push(format!(
                "| word count / by hand, {store}, rate (≥ {target}) | {ratio:.2} | {} |",
                verdict(ratio >= target)
            ));
        }
        if let (Some(f), Some(h)) = (cpu(flows), cpu(by_hand)) {
            let ratio = h / f;
            rows.push(format!(
                "| the same in CPU seconds (≥ {target}) | {ratio:.2} ({h:.2} / {f:.2} s) | {} |",
                verdict(ratio >= target)
            ));
        }
    }
    if let (Some(sqlite), Some(fastest)) = (rate("count-sqlite"), fastest_passthrough) {
        let ratio = sqlite / fastest;
        rows.push(format!(
            "| SQLite / the fastest passthrough (≥ 0.45) | {ratio:.2} | {} |",
            verdict(ratio >= 0.45)
        ));
    }
    if let (Some(flows), Some(quix)) = (rate("count-postgres"), rate("quix-at-least-once")) {
        let ratio = flows / quix;
        rows.push(format!(
            "| flows on PostgreSQL / Quix Streams, at least once (≥ 20×) | {ratio:.1}× | {} |",
            verdict(ratio >= 20.0)
        ));
    }
    let flows_rss = runs
        .iter()
        .filter(|(label, ..)| label.starts_with("(b)") || label.starts_with("(c)"))
        .map(|(_, report, _)| report.peak_rss_mb)
        .reduce(f64::max);
    if let Some(rss) = flows_rss {
        rows.push(format!(
            "| peak RSS of flows' programs (< 256 MB) | {rss:.0} MB | {} |",
            verdict(rss < 256.0)
        ));
    }
    if let (Some((fl, fh, f)), Some((hl, hh, h))) =
        (spread("count-memory"), spread("count-by-hand"))
    {
        rows.push(format!(
            "| in-memory CPU over the rounds, spread (≤ by hand's) | {fl:.2}–{fh:.2} s ({:.0}%) against {hl:.2}–{hh:.2} s ({:.0}%) | {} |",
            f * 100.0,
            h * 100.0,
            verdict(f <= h)
        ));
    }
    if rows.is_empty() {
        return;
    }
    println!("\nTargets (issue 17), from this run");
    println!("| target | this run | |");
    println!("|---|---:|---|");
    for row in rows {
        println!("{row}");
    }
}

/// Runs one program against `broker`: its report and the CPU others used meanwhile.
fn run_program(broker: &Broker, mode: &str) -> Option<(Report, OtherCpu)> {
    let broker_cpu_before = broker.cpu_seconds();
    let postgres_cpu_before = local_postgres_cpu_seconds();
    // FLOWS_BENCH_WRAPPER runs each program under a profiler (e.g. perf record).
    let wrapper = std::env::var("FLOWS_BENCH_WRAPPER").unwrap_or_default();
    let mut command: Vec<String> = wrapper.split_whitespace().map(String::from).collect();
    command.push(std::env::current_exe().unwrap().display().to_string());
    let output = Command::new(&command[0])
        .args(&command[1..])
        .args(["--child", mode, &broker.bootstrap])
        .stderr(Stdio::inherit())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    // Anything else the program printed (logs with RUST_LOG) goes to stderr.
    for line in stdout.lines().filter(|l| !l.starts_with("REPORT ")) {
        eprintln!("{line}");
    }
    let Some(report) = stdout.lines().find_map(Report::parse) else {
        eprintln!("{mode}: no report ({:?})", output.status);
        return None;
    };
    let others = OtherCpu {
        broker: broker
            .cpu_seconds()
            .zip(broker_cpu_before)
            .map(|(after, before)| after - before),
        postgres: local_postgres_cpu_seconds() - postgres_cpu_before,
    };
    Some((report, others))
}

/// The median of runs sorted by rate; of an even count, the slower of the middle two.
fn median<'a, T>(sorted: &[&'a T]) -> &'a T {
    sorted[(sorted.len() - 1) / 2]
}

/// One row per program: its median run (rate, CPU, other processes' CPU), the range of
/// its rates and its largest peak RSS over the rounds; ratios to the faster
/// passthrough's median.
fn print_table(total: u64, rounds: usize, runs: &[Run<'_>]) {
    let rate = Report::rate;
    let rows: Vec<(&str, Vec<&Run<'_>>)> = PROGRAMS
        .iter()
        .map(|(label, _)| {
            let mut of_program: Vec<_> = runs.iter().filter(|(l, ..)| l == label).collect();
            of_program.sort_by(|a, b| rate(&a.1).total_cmp(&rate(&b.1)));
            (*label, of_program)
        })
        .filter(|(_, of_program)| !of_program.is_empty())
        .collect();
    let baseline = rows
        .iter()
        .filter(|(label, _)| label.starts_with("(a)"))
        .map(|(_, of_program)| rate(&median(of_program).1))
        .fold(f64::NAN, f64::max);
    let baseline = if baseline.is_nan() { 1.0 } else { baseline };
    let broker_name = std::env::var("FLOWS_BENCH_BROKERS").map_or_else(
        |_| "the mock cluster in its own process".to_owned(),
        |b| format!("the broker at {b}"),
    );
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "\n{total} messages, {DISTINCT} distinct words, {PARTITIONS} partitions, \
         {broker_name}; median of {rounds} interleaved round(s); {}",
        machine()
    )
    .unwrap();
    writeln!(
        out,
        "| program | msgs/s | range | ratio to (a) | CPU s | peak RSS MB | broker CPU s | PostgreSQL CPU s |"
    )
    .unwrap();
    writeln!(out, "|---|---:|---:|---:|---:|---:|---:|---:|").unwrap();
    let thousands = |r: f64| format!("{:.0}k", r / 1000.0);
    for (label, of_program) in &rows {
        let (_, report, others) = median(of_program);
        let (slowest, fastest) = (&of_program[0].1, &of_program[of_program.len() - 1].1);
        let peak_rss = of_program
            .iter()
            .map(|(_, r, _)| r.peak_rss_mb)
            .fold(0.0, f64::max);
        writeln!(
            out,
            "| {label} | {:.0} | {}–{} | {:.2} | {:.1} | {:.0} | {} | {:.1} |",
            rate(report),
            thousands(rate(slowest)),
            thousands(rate(fastest)),
            rate(report) / baseline,
            report.cpu_seconds,
            peak_rss,
            others
                .broker
                .map_or_else(|| "?".to_owned(), |s| format!("{s:.1}")),
            others.postgres,
        )
        .unwrap();
    }
}

/// CPU used during one program by the processes it works with on the same machine:
/// on two shared cores, their time is time the program did not get.
#[derive(Debug)]
struct OtherCpu {
    /// The broker's CPU seconds, when its process is known.
    broker: Option<f64>,
    /// Every local PostgreSQL process's (0 when the server is elsewhere).
    postgres: f64,
}

/// CPU seconds used so far by every local process named `postgres`, including its
/// reaped children (a connection's backend exits with its program, and its time moves
/// to the postmaster's children's time).
fn local_postgres_cpu_seconds() -> f64 {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0.0;
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|entry| std::fs::read_to_string(entry.path().join("stat")).ok())
        .filter(|stat| stat.contains("(postgres)"))
        .map(|stat| stat_ticks(&stat, &[11, 12, 13, 14]) / 100.0)
        .sum()
}

/// This process's CPU seconds so far per thread name (user, system), largest first.
fn cpu_by_thread() -> String {
    let mut by_name: HashMap<String, (f64, f64)> = HashMap::new();
    let tasks = std::fs::read_dir("/proc/self/task").into_iter().flatten();
    for task in tasks.filter_map(Result::ok) {
        let stat = std::fs::read_to_string(task.path().join("stat")).unwrap_or_default();
        let name = stat
            .split_once('(')
            .and_then(|(_, rest)| rest.rsplit_once(')'))
            .map_or("?", |(name, _)| name)
            .trim_end_matches(|c: char| c.is_ascii_digit() || c == '-' || c == '#');
        let entry = by_name.entry(name.to_owned()).or_default();
        entry.0 += stat_ticks(&stat, &[11]) / 100.0;
        entry.1 += stat_ticks(&stat, &[12]) / 100.0;
    }
    let mut names: Vec<_> = by_name.into_iter().collect();
    names.sort_by(|a, b| (b.1.0 + b.1.1).total_cmp(&(a.1.0 + a.1.1)));
    names
        .iter()
        .map(|(name, (user, system))| format!("{name} {user:.2}/{system:.2}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// CPU seconds (user + system) used so far by process `pid`.
fn cpu_seconds_of(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    stat_ticks(&stat, &[11, 12]) / 100.0
}

/// The sum of the given fields of a `/proc/<pid>/stat` line, counted after the
/// parenthesised command name (11, 12: user and system ticks; 13, 14: those of its
/// reaped children).
fn stat_ticks(stat: &str, fields: &[usize]) -> f64 {
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let values: Vec<&str> = after.split_whitespace().collect();
    fields
        .iter()
        .filter_map(|&i| values.get(i).and_then(|v| v.parse::<f64>().ok()))
        .sum()
}

async fn child(mode: &str, brokers: &str) -> Report {
    let total = messages();
    match mode {
        "passthrough" => by_hand_mode(|| passthrough(brokers, total, Threads::PerPartition)),
        "passthrough-batched" => by_hand_mode(|| passthrough(brokers, total, Threads::Batched)),
        "passthrough-one-thread" => by_hand_mode(|| passthrough(brokers, total, Threads::One)),
        "passthrough-handoff" => by_hand_mode(|| passthrough(brokers, total, Threads::Handoff)),
        "passthrough-split-handoff" => {
            by_hand_mode(|| passthrough(brokers, total, Threads::SplitHandoff))
        }
        "count-by-hand" => by_hand_mode(|| count_by_hand(brokers, total)),
        "count-by-hand-postgres" => by_hand_mode(|| count_by_hand_postgres(brokers, total)),
        "quix-at-least-once" | "quix-exactly-once" => {
            by_hand_mode(|| quix(brokers, total, mode.trim_start_matches("quix-")))
        }
        latency if latency.starts_with("latency:") => latency::child(latency, brokers).await,
        load if load.starts_with("latency-load:") => by_hand_mode(|| latency::load(load, brokers)),
        scale if scale.starts_with("scale-out:") => scale_out::child(scale, brokers).await,
        restart if restart.starts_with("restart:") => restart::child(restart, brokers).await,
        "stateless" => {
            let copy = StatelessFunction::one_to_one(
                Topic::new("words", Utf8, Utf8),
                Topic::new("bench-stateless-out", Utf8, Utf8),
                |m| Ok(Record::new(m.key, m.value)),
            );
            run_flows(brokers, Pipeline::stateless("bench-stateless", copy), total).await
        }
        "count-memory" => {
            let store = flows::open_state_store("memory://", "bench").await.unwrap();
            run_flows(brokers, word_count("bench-count-memory", store), total).await
        }
        "count-sqlite" => {
            let dir = std::env::temp_dir().join(format!("flows-bench-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            let url = format!("sqlite://{}", dir.join("bench.sqlite").display());
            let store = flows::open_state_store(&url, "bench_counts").await.unwrap();
            let report = run_flows(brokers, word_count("bench-count-sqlite", store), total).await;
            let _ = std::fs::remove_dir_all(&dir);
            report
        }
        "count-postgres" => {
            let table = format!("bench_counts_{}", std::process::id());
            let store = flows::open_state_store(&postgres_url(), &table)
                .await
                .unwrap();
            run_flows(brokers, word_count("bench-count-postgres", store), total).await
        }
        other => panic!("unknown mode {other}"),
    }
}

/// Quix Streams' word count (`quix_word_count.py`, in the venv of `scripts/quix-venv`)
/// in `mode` (`at-least-once`, `exactly-once`): its own report.
fn quix(brokers: &str, total: u64, mode: &str) -> Report {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let venv = Command::new(format!("{root}/scripts/quix-venv"))
        .stderr(Stdio::inherit())
        .output()
        .unwrap();
    assert!(venv.status.success(), "scripts/quix-venv failed");
    let python = String::from_utf8(venv.stdout).unwrap();
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/benches/engine/quix_word_count.py"
    );
    let output = Command::new(python.trim())
        .args([script, brokers, &total.to_string(), mode])
        .stderr(Stdio::inherit())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    stdout
        .lines()
        .find_map(Report::parse)
        .unwrap_or_else(|| panic!("Quix Streams ({mode}) gave no report: {:?}", output.status))
}

/// Runs a hand-written (blocking) program from the runtime.
fn by_hand_mode(program: impl FnOnce() -> Report) -> Report {
    tokio::task::block_in_place(program)
}

fn word_count(name: &str, store: Arc<dyn flows::SingleStateRepository>) -> Pipeline {
    word_count_from("words", name, store)
}

/// The word count of `input` into `<name>-out`.
fn word_count_from(
    input: &str,
    name: &str,
    store: Arc<dyn flows::SingleStateRepository>,
) -> Pipeline {
    let count = StatefulFunction::new(Json::<i64>::new()).one_to_one(
        Topic::new(input, Utf8, Utf8),
        Topic::new(format!("{name}-out"), Utf8, Json::<i64>::new()),
        PersistenceIdFn::key(),
        |count: Option<&i64>, word| {
            let count = count.copied().unwrap_or(0) + 1;
            Ok((count, Record::new(word.key, count)))
        },
    );
    Pipeline::stateful(name, count, store)
}

/// Defaults, unless FLOWS_* variables (see `KafkaConfig::from_env`) say otherwise.
fn bench_config(brokers: &str) -> KafkaConfig {
    KafkaConfig::from_env()
        .unwrap()
        .map_or_else(|| KafkaConfig::new(brokers), |c| c.brokers(brokers))
}

async fn run_flows(brokers: &str, pipeline: Pipeline, total: u64) -> Report {
    let config = bench_config(brokers);
    let running = Engine::new(config).start(&pipeline).unwrap();
    // The clock starts when the group has assigned the partitions (join excluded), as
    // the passthrough's starts when it assigns them itself.
    running
        .wait_for(|m| m.rebalances > 0)
        .await
        .expect("partitions assigned");
    let started = Instant::now();
    let done = running
        .wait_for(|m| m.committed >= total)
        .await
        .expect("every message processed");
    let seconds = started.elapsed().as_secs_f64();
    if std::env::var("FLOWS_BENCH_PHASES").is_ok() {
        // Sums over partitions, which work side by side: waits show as long phases.
        let h = running.metrics().histograms();
        eprintln!(
            "phases: batches {} process {:.3} publish {:.3} fold {:.3} read {:.3} write {:.3} (sums, s)",
            h.process_seconds.count,
            h.process_seconds.sum,
            h.publish_seconds.sum,
            h.fold_seconds.sum,
            h.store_read_seconds.sum,
            h.store_write_seconds.sum
        );
    }
    running.shutdown().await.unwrap();
    let mut report = Report::measure(total, seconds);
    // For the log: how the work was cut (batches, states read from the store and from
    // the cache), which explains a run's CPU time.
    report.extra = [done.batches, done.states_read, done.state_cache_hits]
        .map(|n| n as f64)
        .to_vec();
    report
}

/// The ceiling: consume-and-produce written directly against rdkafka.
fn passthrough(brokers: &str, total: u64, threads: Threads) -> Report {
    // The poller of `Handoff` takes what is queued, up to a batch, in one go.
    let max_batch = match threads {
        Threads::Batched | Threads::Handoff | Threads::SplitHandoff => {
            bench_config(brokers).get_batch().max_messages
        }
        Threads::PerPartition | Threads::One => 1,
    };
    by_hand(
        brokers,
        total,
        "bench-passthrough",
        threads,
        max_batch,
        || {
            |batch: &[BorrowedMessage<'_>], send: &mut Produce<'_>| {
                for message in batch {
                    send(message.key(), message.payload());
                }
            }
        },
    )
}

/// The least any word count does, written by hand against rdkafka: a count per word in
/// a hash map, its new value published per message; nothing durable, no replay
/// records, offsets committed without waiting for the outputs. No correct word count
/// (flows' included) can be faster on the same machine: its ratio to (a) is the
/// ceiling for the word-count rows. Each thread takes what its queue holds, up to a
/// batch, in one go, as flows' workers do (one poll per message made it about a seventh
/// slower).
fn count_by_hand(brokers: &str, total: u64) -> Report {
    by_hand(
        brokers,
        total,
        "bench-count-by-hand",
        Threads::Batched,
        bench_config(brokers).get_batch().max_messages,
        || {
            let mut counts: HashMap<String, i64> = HashMap::new();
            let mut value = String::new();
            move |batch: &[BorrowedMessage<'_>], send: &mut Produce<'_>| {
                for message in batch {
                    let word = std::str::from_utf8(message.key().unwrap_or_default()).unwrap();
                    let count = bump(&mut counts, word);
                    value.clear();
                    write!(value, "{count}").unwrap();
                    send(message.key(), Some(value.as_bytes()));
                }
            }
        },
    )
}

/// The least a durable word count on PostgreSQL does, by hand: per partition, batches
/// of up to flows' batch size (10,000 messages by default), counts kept in memory and read from the
/// table only for words not seen before, one `INSERT … ON CONFLICT DO UPDATE` of every
/// changed count per batch (a table of word and count, no version, no replay records,
/// fill factor 50 as flows'), then the outputs. It neither checks versions nor waits for
/// acknowledgements before committing: a ceiling, not a correct pipeline.
fn count_by_hand_postgres(brokers: &str, total: u64) -> Report {
    let runtime = tokio::runtime::Handle::current();
    let table = format!("bench_hand_{}", std::process::id());
    let pool = runtime.block_on(async {
        let pool = sqlx::PgPool::connect(&postgres_url()).await.unwrap();
        let create = format!(
            "CREATE TABLE {table} (word text PRIMARY KEY, count bigint NOT NULL) \
             WITH (fillfactor = 50)"
        );
        sqlx::query(sqlx::AssertSqlSafe(create))
            .execute(&pool)
            .await
            .unwrap();
        pool
    });
    let select = format!("SELECT word, count FROM {table} WHERE word = ANY($1)");
    let upsert = format!(
        "INSERT INTO {table} (word, count) SELECT * FROM UNNEST($1::text[], $2::bigint[]) \
         ON CONFLICT (word) DO UPDATE SET count = EXCLUDED.count"
    );
    let batch = bench_config(brokers).get_batch().max_messages;
    by_hand(
        brokers,
        total,
        "bench-count-by-hand-pg",
        Threads::PerPartition,
        batch,
        || {
            let (runtime, pool) = (runtime.clone(), pool.clone());
            let (select, upsert) = (select.clone(), upsert.clone());
            let mut counts: HashMap<String, i64> = HashMap::new();
            let mut outputs: Vec<String> = Vec::new();
            move |batch: &[BorrowedMessage<'_>], send: &mut Produce<'_>| {
                let words: Vec<&str> = batch
                    .iter()
                    .map(|m| std::str::from_utf8(m.key().unwrap_or_default()).unwrap())
                    .collect();
                let mut unseen: Vec<&str> = words
                    .iter()
                    .copied()
                    .filter(|w| !counts.contains_key(*w))
                    .collect();
                unseen.sort_unstable();
                unseen.dedup();
                if !unseen.is_empty() {
                    let stored: Vec<(String, i64)> = runtime
                        .block_on(
                            sqlx::query_as(sqlx::AssertSqlSafe(select.clone()))
                                .bind(&unseen)
                                .fetch_all(&pool),
                        )
                        .unwrap();
                    counts.extend(stored);
                }
                let mut changed: HashMap<&str, i64> = HashMap::new();
                outputs.clear();
                for word in &words {
                    let count = bump(&mut counts, word);
                    changed.insert(word, count);
                    outputs.push(count.to_string());
                }
                let (names, values): (Vec<&str>, Vec<i64>) = changed.into_iter().unzip();
                runtime
                    .block_on(
                        sqlx::query(sqlx::AssertSqlSafe(upsert.clone()))
                            .bind(&names)
                            .bind(&values)
                            .execute(&pool),
                    )
                    .unwrap();
                for (message, value) in batch.iter().zip(&outputs) {
                    send(message.key(), Some(value.as_bytes()));
                }
            }
        },
    )
}

/// Adds one to `word`'s count, allocating its key only the first time.
fn bump(counts: &mut HashMap<String, i64>, word: &str) -> i64 {
    let count = match counts.get_mut(word) {
        Some(count) => count,
        None => counts.entry(word.to_owned()).or_insert(0),
    };
    *count += 1;
    *count
}

/// What a hand-written program's handler calls to produce a record (key, value).
type Produce<'a> = dyn FnMut(Option<&[u8]>, Option<&[u8]>) + 'a;

/// One thread's loop of a hand-written program (each thread has a clone).
#[derive(Clone)]
struct Taker {
    consumer: Arc<BaseConsumer>,
    producer: Arc<ThreadedProducer<DefaultProducerContext>>,
    output_topic: Arc<str>,
    /// Messages seen by all threads together.
    seen: Arc<AtomicU64>,
    total: u64,
    max_batch: usize,
}

impl Taker {
    /// Takes batches from `poll` until all threads together have seen `total`
    /// messages, hands each batch to `handle`, produces what it sends, stores the
    /// batch's offsets; calls `between` before each batch.
    fn run<'m, H>(
        &self,
        mut poll: impl FnMut(Duration) -> Option<KafkaResult<BorrowedMessage<'m>>>,
        handle: &mut H,
        between: &mut dyn FnMut(),
    ) where
        H: FnMut(&[BorrowedMessage<'_>], &mut Produce<'_>),
    {
        let mut batch = Vec::with_capacity(self.max_batch);
        while self.seen.load(Ordering::Relaxed) < self.total {
            between();
            let Some(first) = poll(Duration::from_millis(100)) else {
                continue;
            };
            batch.push(first.unwrap());
            while batch.len() < self.max_batch {
                match poll(Duration::ZERO) {
                    Some(message) => batch.push(message.unwrap()),
                    None => break,
                }
            }
            handle(&batch, &mut |key, payload| self.send(key, payload));
            for message in &batch {
                self.consumer.store_offset_from_message(message).unwrap();
            }
            self.seen.fetch_add(batch.len() as u64, Ordering::Relaxed);
            batch.clear();
        }
    }

    /// Produces one record, waiting while the producer's queue is full.
    fn send(&self, key: Option<&[u8]>, payload: Option<&[u8]>) {
        let mut record = BaseRecord::<[u8], [u8]>::to(&self.output_topic);
        if let Some(key) = key {
            record = record.key(key);
        }
        if let Some(payload) = payload {
            record = record.payload(payload);
        }
        loop {
            match self.producer.send(record) {
                Ok(()) => return,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    record = back;
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err((error, _)) => panic!("produce failed: {error}"),
            }
        }
    }
}

/// How a hand-written program's threads take messages from the consumer.
#[derive(Debug, Clone, Copy)]
enum Threads {
    /// One thread per partition, each on its own partition queue (as flows works).
    PerPartition,
    /// As `PerPartition`, each thread taking what is queued, up to a batch, in one go
    /// (as flows' partition workers do).
    Batched,
    /// One thread on the consumer's own queue, the partitions interleaved.
    One,
    /// One thread on the consumer's own queue handing copies to a thread per partition,
    /// which sends them unchanged (a passthrough: the handler is not called).
    Handoff,
    /// As `Handoff`, but the one thread reads every partition's own queue in turn,
    /// skipping a partition whose thread has enough to do (librdkafka then stops
    /// fetching it, as with a thread per queue).
    SplitHandoff,
}

/// A message's key and value, copied.
type Copied = (Option<Vec<u8>>, Option<Vec<u8>>);

/// The channels to a thread per partition, and the threads.
type PartitionSenders = (
    Vec<std::sync::mpsc::SyncSender<Vec<Copied>>>,
    Vec<std::thread::JoinHandle<()>>,
);

/// A thread per partition sending the copied batches it receives (a passthrough), and
/// the channels to them, each holding up to four batches; each thread wakes `poller`, if
/// given, when it takes a batch.
fn partition_senders(taker: &Taker, poller: Option<&std::thread::Thread>) -> PartitionSenders {
    (0..PARTITIONS)
        .map(|_| {
            let (send, receive) = std::sync::mpsc::sync_channel::<Vec<Copied>>(4);
            let taker = taker.clone();
            let waker = poller.cloned();
            let thread = std::thread::spawn(move || {
                for batch in receive {
                    if let Some(waker) = &waker {
                        waker.unpark();
                    }
                    for (key, value) in &batch {
                        taker.send(key.as_deref(), value.as_deref());
                    }
                    taker.seen.fetch_add(batch.len() as u64, Ordering::Relaxed);
                }
            });
            (send, thread)
        })
        .unzip()
}

/// A hand-written program against rdkafka, with flows' tuned client settings: its
/// threads hand batches of up to `max_batch` messages (what is queued, without waiting
/// for more) to their handler, which sends records to topic `<group>-out`; every
/// message's offset is stored after its batch and offsets are committed
/// asynchronously every second.
fn by_hand<H>(
    brokers: &str,
    total: u64,
    group: &str,
    threads: Threads,
    max_batch: usize,
    handler: impl Fn() -> H,
) -> Report
where
    H: FnMut(&[BorrowedMessage<'_>], &mut Produce<'_>) + Send + 'static,
{
    let config = bench_config(brokers);
    let mut consumer_config = ClientConfig::new();
    for (k, v) in config.consumer_properties(group) {
        consumer_config.set(k, v);
    }
    let consumer: Arc<BaseConsumer> = Arc::new(consumer_config.create().unwrap());
    let mut producer_config = ClientConfig::new();
    for (k, v) in config.producer_properties() {
        producer_config.set(k, v);
    }
    let producer: Arc<ThreadedProducer<DefaultProducerContext>> =
        Arc::new(producer_config.create().unwrap());

    // Connect and learn the partition leaders first, as a group member has by the time
    // its partitions are assigned, so both clocks start from the same point.
    consumer
        .fetch_metadata(Some("words"), Duration::from_secs(10))
        .unwrap();
    // Partition queues must be split before the first poll, so assign explicitly.
    let mut assignment = TopicPartitionList::new();
    for partition in 0..PARTITIONS {
        assignment
            .add_partition_offset("words", partition, Offset::Beginning)
            .unwrap();
    }
    consumer.assign(&assignment).unwrap();
    let started = Instant::now();
    let seen = Arc::new(AtomicU64::new(0));
    let mut last_commit = Instant::now();
    let mut commit_every_second = || {
        if last_commit.elapsed() > Duration::from_secs(1) {
            let _ = consumer.commit_consumer_state(CommitMode::Async);
            last_commit = Instant::now();
        }
    };
    let taker = Taker {
        consumer: Arc::clone(&consumer),
        producer: Arc::clone(&producer),
        output_topic: format!("{group}-out").into(),
        seen: Arc::clone(&seen),
        total,
        max_batch,
    };
    match threads {
        Threads::One => taker.run(
            |timeout| consumer.poll(timeout),
            &mut handler(),
            &mut commit_every_second,
        ),
        Threads::PerPartition | Threads::Batched => {
            let threads: Vec<_> = (0..PARTITIONS)
                .map(|partition| {
                    let queue = consumer.split_partition_queue("words", partition).unwrap();
                    let (taker, mut handle) = (taker.clone(), handler());
                    std::thread::spawn(move || {
                        taker.run(|timeout| queue.poll(timeout), &mut handle, &mut || {});
                    })
                })
                .collect();
            while seen.load(Ordering::Relaxed) < total {
                // Serves the consumer's events; messages all go to the partition queues.
                let _ = consumer.poll(Duration::from_millis(20));
                commit_every_second();
            }
            for thread in threads {
                thread.join().unwrap();
            }
        }
        Threads::Handoff => {
            // Passthrough only (the handler is not called): this thread takes messages
            // from the consumer's own queue and hands each partition's share, copied,
            // to that partition's thread, as an engine with one poller would.
            let (senders, threads) = partition_senders(&taker, None);
            let mut shares: Vec<Vec<Copied>> = vec![Vec::new(); PARTITIONS as usize];
            while seen.load(Ordering::Relaxed) < total {
                commit_every_second();
                let mut taken = 0;
                let mut next = consumer.poll(Duration::from_millis(100));
                while let Some(message) = next {
                    let message = message.unwrap();
                    shares[message.partition() as usize].push((
                        message.key().map(<[u8]>::to_vec),
                        message.payload().map(<[u8]>::to_vec),
                    ));
                    consumer.store_offset_from_message(&message).unwrap();
                    taken += 1;
                    next = if taken < max_batch {
                        consumer.poll(Duration::ZERO)
                    } else {
                        None
                    };
                }
                for (share, sender) in shares.iter_mut().zip(&senders) {
                    if !share.is_empty() {
                        sender.send(std::mem::take(share)).unwrap();
                    }
                }
            }
            drop(senders);
            for thread in threads {
                thread.join().unwrap();
            }
        }
        Threads::SplitHandoff => {
            // Passthrough only, like `Handoff`; a partition whose channel is full is not
            // read this turn. The poller parks when nothing moved, until a queue turns
            // non-empty or a partition thread takes a batch.
            let poller = std::thread::current();
            let queues: Vec<_> = (0..PARTITIONS)
                .map(|partition| {
                    let mut queue = consumer.split_partition_queue("words", partition).unwrap();
                    let waker = poller.clone();
                    queue.set_nonempty_callback(move || waker.unpark());
                    queue
                })
                .collect();
            let (senders, threads) = partition_senders(&taker, Some(&poller));
            // Per partition, a share its thread had no room for yet.
            let mut shares: Vec<Vec<Copied>> = vec![Vec::new(); PARTITIONS as usize];
            while seen.load(Ordering::Relaxed) < total {
                commit_every_second();
                let _ = consumer.poll(Duration::ZERO);
                let mut moved = false;
                for ((queue, sender), share) in queues.iter().zip(&senders).zip(&mut shares) {
                    while share.len() < max_batch {
                        let Some(message) = queue.poll(Duration::ZERO) else {
                            break;
                        };
                        let message = message.unwrap();
                        share.push((
                            message.key().map(<[u8]>::to_vec),
                            message.payload().map(<[u8]>::to_vec),
                        ));
                        consumer.store_offset_from_message(&message).unwrap();
                    }
                    if share.is_empty() {
                        continue;
                    }
                    match sender.try_send(std::mem::take(share)) {
                        Ok(()) => moved = true,
                        Err(std::sync::mpsc::TrySendError::Full(back)) => *share = back,
                        Err(error) => panic!("partition thread gone: {error}"),
                    }
                }
                if !moved {
                    std::thread::park_timeout(Duration::from_millis(20));
                }
            }
            drop(senders);
            for thread in threads {
                thread.join().unwrap();
            }
        }
    }
    producer.flush(Duration::from_secs(60)).unwrap();
    let seconds = started.elapsed().as_secs_f64();
    let _ = consumer.commit_consumer_state(CommitMode::Sync);
    Report::measure(total, seconds)
}
