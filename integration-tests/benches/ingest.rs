//! Ingest over HTTP against a direct rdkafka produce of the same records, in one run.
//!
//! `cargo bench -p flows-integration-tests --bench ingest`
//!
//! One in-process broker (librdkafka's mock cluster, or `FLOWS_BENCH_BROKERS`), topic
//! `ingest` with 8 partitions. At each concurrency (1, 16, 64 by default;
//! `FLOWS_BENCH_CONCURRENCY=1,16,64`) the same number of records (500 per connection, at
//! most `FLOWS_BENCH_REQUESTS`, default 20,000) is produced by both paths, alternately,
//! twice each (the better run of each is reported):
//! - `direct`: that many tasks each awaiting one rdkafka `FutureProducer::send` after
//!   the other, with flows' producer settings (the ceiling);
//! - `http`: that many keep-alive HTTP/1.1 connections, each sending `POST /ingest`
//!   requests one after the other to a flows `IngestRoute` (which answers once the
//!   broker acknowledged the record).
//!
//! A stateless pipeline reads what is ingested meanwhile, as in a worker.
//!
//! Reported per row: requests per second, p50 and p99 latency, and the HTTP rate as a
//! ratio of the direct rate measured in the same run. Then the time one scrape of
//! `/metrics` takes the server, and what scraping every second costs at most.

#![allow(clippy::unwrap_used)] // a benchmark: a panic is the failure report

use std::time::{Duration, Instant};

use flows::function::StatelessFunction;
use flows::http::{HttpServer, IngestRoute};
use flows::kafka::rdkafka::ClientConfig;
use flows::kafka::rdkafka::producer::{FutureProducer, FutureRecord};
use flows::kafka::{EmbeddedKafka, Engine, KafkaConfig, Pipeline};
use flows::{Bytes as Bytes_, Record, Topic, Utf8};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;

const PARTITIONS: i32 = 8;

fn env_number(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(default)
}

/// Requests per second, and p50 and p99 latency, of `latencies` over `elapsed`.
fn summary(mut latencies: Vec<Duration>, elapsed: Duration) -> (f64, Duration, Duration) {
    latencies.sort();
    let at = |q: f64| latencies[((latencies.len() as f64 * q) as usize).min(latencies.len() - 1)];
    (
        latencies.len() as f64 / elapsed.as_secs_f64(),
        at(0.50),
        at(0.99),
    )
}

async fn direct(
    producer: &FutureProducer,
    concurrency: usize,
    total: usize,
) -> (f64, Duration, Duration) {
    let per_task = total / concurrency;
    let started = Instant::now();
    let tasks: Vec<_> = (0..concurrency)
        .map(|task| {
            let producer = producer.clone();
            tokio::spawn(async move {
                let mut latencies = Vec::with_capacity(per_task);
                for i in 0..per_task {
                    let key = format!("k{task}-{i}");
                    let sent = Instant::now();
                    producer
                        .send(
                            FutureRecord::to("ingest").key(&key).payload("a word"),
                            Duration::from_secs(5),
                        )
                        .await
                        .unwrap();
                    latencies.push(sent.elapsed());
                }
                latencies
            })
        })
        .collect();
    let mut latencies = Vec::with_capacity(total);
    for task in tasks {
        latencies.extend(task.await.unwrap());
    }
    summary(latencies, started.elapsed())
}

async fn http(
    addr: std::net::SocketAddr,
    concurrency: usize,
    total: usize,
) -> (f64, Duration, Duration) {
    let per_task = total / concurrency;
    let started = Instant::now();
    let tasks: Vec<_> = (0..concurrency)
        .map(|task| {
            tokio::spawn(async move {
                let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
                stream.set_nodelay(true).unwrap();
                let (mut sender, connection) =
                    hyper::client::conn::http1::handshake(TokioIo::new(stream))
                        .await
                        .unwrap();
                tokio::spawn(connection);
                let mut latencies = Vec::with_capacity(per_task);
                for i in 0..per_task {
                    let request = hyper::Request::post("/ingest")
                        .header("host", "bench")
                        .header("x-request-key", format!("k{task}-{i}"))
                        .body(Full::new(Bytes::from_static(b"a word")))
                        .unwrap();
                    sender.ready().await.unwrap();
                    let sent = Instant::now();
                    let response = sender.send_request(request).await.unwrap();
                    assert_eq!(response.status(), 201);
                    response.into_body().collect().await.unwrap();
                    latencies.push(sent.elapsed());
                }
                latencies
            })
        })
        .collect();
    let mut latencies = Vec::with_capacity(total);
    for task in tasks {
        latencies.extend(task.await.unwrap());
    }
    summary(latencies, started.elapsed())
}

#[tokio::main]
async fn main() {
    let total = env_number("FLOWS_BENCH_REQUESTS", 20_000);
    let levels: Vec<usize> = std::env::var("FLOWS_BENCH_CONCURRENCY")
        .unwrap_or_else(|_| "1,16,64".into())
        .split(',')
        .filter_map(|c| c.trim().parse().ok())
        .collect();
    let embedded;
    let brokers = match std::env::var("FLOWS_BENCH_BROKERS") {
        Ok(brokers) => brokers,
        Err(_) => {
            embedded = EmbeddedKafka::start(1).unwrap();
            embedded.create_topic("ingest", PARTITIONS, 1).unwrap();
            embedded.create_topic("ingest-out", PARTITIONS, 1).unwrap();
            embedded.bootstrap_servers()
        }
    };
    let config = KafkaConfig::new(&brokers);
    let mut client = ClientConfig::new();
    for (key, value) in config.producer_properties() {
        client.set(key, value);
    }
    let producer: FutureProducer = client.create().unwrap();
    let route = IngestRoute::new("ingest", Utf8, Topic::new("ingest", Utf8, Utf8), |r| {
        Ok(Record::new(r.key.unwrap_or_default(), r.body))
    });
    // A pipeline beside the server, as in a worker: it reads what is ingested, and its
    // metrics (8 partitions) are what a scrape renders.
    let mirror =
        StatelessFunction::filter(Topic::new("ingest", Bytes_, Bytes_), "ingest-out", |_| true);
    let running = Engine::new(config.clone())
        .start(&Pipeline::stateless("mirror", mirror))
        .unwrap();
    let server = HttpServer::new()
        .ingest(route)
        .start(
            "127.0.0.1:0".parse().unwrap(),
            &config,
            vec![running.handle()],
        )
        .await
        .unwrap();
    let addr = server.local_addr();
    // Warm both paths up (connections, metadata).
    direct(&producer, 4, 400).await;
    http(addr, 4, 400).await;

    println!("| concurrency | path | requests/s | p50 | p99 | http / direct |");
    println!("|---|---|---|---|---|---|");
    for &concurrency in &levels {
        // Each request waits for its acknowledgement: one connection makes few.
        let requests = total.min(concurrency * 500);
        let mut direct_runs = Vec::new();
        let mut http_runs = Vec::new();
        for _ in 0..2 {
            direct_runs.push(direct(&producer, concurrency, requests).await);
            http_runs.push(http(addr, concurrency, requests).await);
        }
        let best = |runs: &[(f64, Duration, Duration)]| {
            *runs.iter().max_by(|a, b| a.0.total_cmp(&b.0)).unwrap()
        };
        let d = best(&direct_runs);
        let h = best(&http_runs);
        println!(
            "| {concurrency} | direct | {:.0} | {:.2?} | {:.2?} | |",
            d.0, d.1, d.2
        );
        println!(
            "| {concurrency} | http | {:.0} | {:.2?} | {:.2?} | {:.2} |",
            h.0,
            h.1,
            h.2,
            h.0 / d.0
        );
    }
    // What one scrape of /metrics costs the worker: the server's time to answer it,
    // with every family rendered (an upper bound of its CPU time).
    let scrapes = 2_000;
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(connection);
    let mut latencies = Vec::with_capacity(scrapes);
    let started = Instant::now();
    for _ in 0..scrapes {
        let request = hyper::Request::get("/metrics")
            .header("host", "bench")
            .body(Full::new(Bytes::new()))
            .unwrap();
        sender.ready().await.unwrap();
        let sent = Instant::now();
        let response = sender.send_request(request).await.unwrap();
        assert_eq!(response.status(), 200);
        response.into_body().collect().await.unwrap();
        latencies.push(sent.elapsed());
    }
    let (_, p50, p99) = summary(latencies, started.elapsed());
    println!(
        "\n/metrics: p50 {p50:.2?}, p99 {p99:.2?} per scrape; scraped every second, {:.4}% of one core at most",
        p50.as_secs_f64() * 100.0
    );
    server.shutdown().await.unwrap();
    running.shutdown().await.unwrap();
}
