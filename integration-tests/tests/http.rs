//! The worker's HTTP face, with real HTTP requests against a running server beside a
//! word count on the in-process mock cluster: ingest (201, 400, 401, 413, 503),
//! readiness flipping with the store, metrics matching the engine's counts, topology.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use flows::function::{PersistenceIdFn, StatefulFunction};
use flows::http::{HttpServer, IngestRoute};
use flows::kafka::{EmbeddedKafka, Engine, ErrorPolicy, Pipeline, RunningPipeline};
use flows::{FunctionError, Json, MemoryStateRepository, Record, Topic, Utf8};
use flows_integration_tests::{FaultyStore, init_tracing, read_topic, test_config, wait_until};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const WAIT: Duration = Duration::from_secs(60);
const TOKEN: &str = "s3cret-token";
const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

/// One HTTP/1.1 request over a fresh connection: the status, the headers (lower-cased
/// names) and the body.
async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, Vec<(String, String)>, String) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(body).await.unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await.unwrap();
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_lowercase(), v.trim().to_owned()))
        .collect();
    (status, headers, body.to_owned())
}

fn bearer() -> (&'static str, String) {
    ("Authorization", format!("Bearer {TOKEN}"))
}

/// Word count from `words` (the key) into `counts`.
fn count_pipeline(store: Arc<FaultyStore<Arc<MemoryStateRepository>>>) -> Pipeline {
    let counter = StatefulFunction::new(Json::<i64>::new()).one_to_one(
        Topic::new("words", Utf8, Utf8),
        Topic::new("counts", Utf8, Utf8),
        PersistenceIdFn::key(),
        |count: Option<&i64>, word| {
            let count = count.copied().unwrap_or(0) + 1;
            Ok((count, Record::new(word.key, count.to_string())))
        },
    );
    Pipeline::stateful("count", counter, store).on_error(ErrorPolicy::dead_letter("words-dlq"))
}

/// `POST /words`: the body's words, one message each would need a many-record route;
/// this one takes one word (trimmed), refuses blanks, keys it by itself.
fn words_route() -> IngestRoute {
    IngestRoute::new("words", Utf8, Topic::new("words", Utf8, Utf8), |request| {
        let word = request.body.trim().to_owned();
        if word.is_empty() {
            return Err(FunctionError::new("an empty word"));
        }
        Ok(Record::new(word.clone(), word))
    })
}

/// `POST /numbers`: a JSON number, for the undecodable-body case.
fn numbers_route() -> IngestRoute {
    IngestRoute::new(
        "numbers",
        Json::<i64>::new(),
        Topic::new("numbers", Utf8, Utf8),
        |request| Ok(Record::new("n".to_owned(), request.body.to_string())),
    )
}

struct Worker {
    kafka: EmbeddedKafka,
    store: Arc<FaultyStore<Arc<MemoryStateRepository>>>,
    running: RunningPipeline,
    server: flows::http::RunningServer,
}

async fn worker() -> Worker {
    init_tracing();
    let kafka = EmbeddedKafka::start(1).unwrap();
    for (topic, partitions) in [
        ("words", 2),
        ("counts", 2),
        ("words-dlq", 1),
        ("numbers", 1),
    ] {
        kafka.create_topic(topic, partitions, 1).unwrap();
    }
    let brokers = kafka.bootstrap_servers();
    let store = Arc::new(FaultyStore::new(Arc::new(MemoryStateRepository::new())));
    let config = test_config(&brokers).producer_property("message.timeout.ms", "3000");
    let running = Engine::new(config.clone())
        .start(&count_pipeline(Arc::clone(&store)))
        .unwrap();
    let server = HttpServer::new()
        .token(TOKEN)
        .body_limit(1024)
        .ingest(words_route())
        .ingest(numbers_route())
        .routes(flows::http::axum::Router::new().route(
            "/hello",
            flows::http::axum::routing::get(|| async { "hello from the user's route" }),
        ))
        .start(
            "127.0.0.1:0".parse().unwrap(),
            &config,
            vec![running.handle()],
        )
        .await
        .unwrap();
    Worker {
        kafka,
        store,
        running,
        server,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ingested_request_is_produced_counted_and_described() {
    let w = worker().await;
    let addr = w.server.local_addr();
    let auth = bearer();
    let auth = (auth.0, auth.1.as_str());

    // Not ready until the pipeline joined its group; live at once.
    assert_eq!(request(addr, "GET", "/health/live", &[], b"").await.0, 200);
    let ready = wait_until(WAIT, || w.running.metrics().snapshot().rebalances > 0).await;
    assert!(ready);
    let (status, _, body) = request(addr, "GET", "/health/ready", &[], b"").await;
    assert_eq!(status, 200, "{body}");

    // 201 once acknowledged, with where the message landed.
    let mut landed = Vec::new();
    for word in ["times", "best", "times"] {
        let (status, _, body) = request(
            addr,
            "POST",
            "/words?source=test",
            &[
                auth,
                ("Idempotency-Key", "req-1"),
                ("Content-Type", "text/plain"),
                ("traceparent", TRACEPARENT),
            ],
            word.as_bytes(),
        )
        .await;
        assert_eq!(status, 201, "{body}");
        let answer: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(answer["topic"], "words");
        landed.push((
            answer["partition"].as_i64().unwrap(),
            answer["offset"].as_i64().unwrap(),
        ));
    }
    let brokers = w.kafka.bootstrap_servers();
    let messages = read_topic(&brokers, "words", 3, WAIT);
    assert_eq!(messages.len(), 3);
    for (partition, offset) in &landed {
        let message = messages
            .iter()
            .find(|m| i64::from(m.partition) == *partition && m.offset == *offset)
            .expect("the answered partition and offset hold the message");
        assert_eq!(message.header("HTTP_PARAM_SOURCE").as_deref(), Some("test"));
        assert_eq!(
            message.header("HTTP_HEADER_CONTENT_TYPE").as_deref(),
            Some("text/plain")
        );
        assert_eq!(
            message.header("flows.idempotency-key").as_deref(),
            Some("req-1")
        );
        assert_eq!(message.header("HTTP_HEADER_AUTHORIZATION"), None);
    }
    assert!(wait_until(WAIT, || w.running.metrics().snapshot().committed >= 3).await);

    // The request's trace context is on the message and on the outputs it caused.
    for message in &messages {
        assert_eq!(message.header("traceparent").as_deref(), Some(TRACEPARENT));
    }
    let counts = read_topic(&brokers, "counts", 3, WAIT);
    assert_eq!(counts.len(), 3);
    for output in &counts {
        assert_eq!(
            output.header("traceparent").as_deref(),
            Some(TRACEPARENT),
            "the output of {} carries its input's trace",
            output.key_str()
        );
    }

    // Per-partition committed offsets and lag, from librdkafka's statistics.
    let mut lags = Vec::new();
    for _ in 0..150 {
        let (_, _, text) = request(addr, "GET", "/metrics", &[auth], b"").await;
        lags = text
            .lines()
            .filter(|l| l.starts_with("flows_partition_lag{pipeline=\"count\",topic=\"words\""))
            .map(str::to_owned)
            .collect();
        if lags.len() == 2 && lags.iter().all(|l| l.ends_with(" 0")) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(lags.len(), 2, "one lag per partition of words: {lags:?}");
    assert!(
        lags.iter().all(|l| l.ends_with(" 0")),
        "everything committed: {lags:?}"
    );

    // Metrics: the engine's counts and the ingest requests.
    let (status, _, text) = request(addr, "GET", "/metrics", &[auth], b"").await;
    assert_eq!(status, 200);
    let committed = w.running.metrics().snapshot().committed;
    assert!(
        text.contains(&format!(
            "flows_messages_committed_total{{pipeline=\"count\"}} {committed}"
        )),
        "{text}"
    );
    assert!(
        text.contains("flows_http_ingest_requests_total{route=\"words\",status=\"201\"} 3"),
        "{text}"
    );
    assert_eq!(
        text.matches("# TYPE flows_batches_total counter").count(),
        1
    );
    // Batch histograms: every completed part observed once.
    let batches = w.running.metrics().snapshot().batches;
    assert!(
        text.contains(&format!(
            "flows_batch_process_seconds_count{{pipeline=\"count\"}} {batches}"
        )),
        "{text}"
    );
    assert!(
        text.contains("flows_batch_messages_bucket{pipeline=\"count\",le=\"+Inf\"}"),
        "{text}"
    );
    // Where a part's time went: every stateful part reads and writes the store once,
    // and runs the function.
    for histogram in [
        "flows_batch_fold_seconds",
        "flows_store_read_seconds",
        "flows_store_write_seconds",
    ] {
        assert!(
            text.contains(&format!(
                "{histogram}_count{{pipeline=\"count\"}} {batches}"
            )),
            "{histogram}: {text}"
        );
    }
    // OpenMetrics for scrapers that ask for it (Prometheus does).
    let accept = (
        "Accept",
        "application/openmetrics-text;version=1.0.0,text/plain;q=0.5".to_owned(),
    );
    let (status, headers, text) = request(
        addr,
        "GET",
        "/metrics",
        &[auth, (accept.0, accept.1.as_str())],
        b"",
    )
    .await;
    assert_eq!(status, 200);
    assert!(
        headers
            .iter()
            .any(|(n, v)| n == "content-type" && v.starts_with("application/openmetrics-text")),
        "{headers:?}"
    );
    assert!(text.trim_end().ends_with("# EOF"), "{text}");
    assert!(
        text.contains(&format!(
            "flows_messages_committed_total{{pipeline=\"count\"}} {committed}"
        )),
        "{text}"
    );

    // One state as the store holds it: content, version as ETag, progress.
    let (status, headers, body) = request(addr, "GET", "/state/count/times", &[auth], b"").await;
    assert_eq!(status, 200, "{body}");
    let state: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(state["content"], 2, "{body}");
    let version = state["version"].as_u64().unwrap();
    assert!(
        headers
            .iter()
            .any(|(n, v)| n == "etag" && *v == format!("\"{version}\"")),
        "{headers:?}"
    );
    assert_eq!(state["progress"][0]["topic"], "words", "{body}");
    let (status, _, body) = request(addr, "GET", "/state/count/never-seen", &[auth], b"").await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(
        request(addr, "GET", "/state/nothing/times", &[auth], b"")
            .await
            .0,
        404
    );
    let too_long = format!("/state/count/{}", "a".repeat(1_100));
    let (status, _, body) = request(addr, "GET", &too_long, &[auth], b"").await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("maximum"), "{body}");

    // Topology, as JSON and as a diagram.
    let (status, _, body) = request(addr, "GET", "/topology", &[auth], b"").await;
    assert_eq!(status, 200);
    let topology: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(topology["pipelines"][0]["name"], "count");
    assert_eq!(topology["pipelines"][0]["kind"], "stateful");
    assert_eq!(topology["pipelines"][0]["inputs"][0], "words");
    assert_eq!(topology["pipelines"][0]["dead_letter_topic"], "words-dlq");
    assert_eq!(topology["ingest"][1]["route"], "/words");
    let (_, _, mermaid) = request(addr, "GET", "/topology?format=mermaid", &[auth], b"").await;
    assert!(mermaid.starts_with("flowchart LR"), "{mermaid}");
    assert!(
        mermaid.contains("ingest__words --> topic_words"),
        "{mermaid}"
    );
    assert!(
        mermaid.contains("topic_words --> pipeline_count"),
        "{mermaid}"
    );
    assert!(
        mermaid.contains("pipeline_count --> topic_counts"),
        "{mermaid}"
    );
    assert_eq!(topology["pipelines"][0]["outputs"][0], "counts");

    w.server.shutdown().await.unwrap();
    w.running.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_their_status_codes() {
    let w = worker().await;
    let addr = w.server.local_addr();
    let auth = bearer();
    let auth = (auth.0, auth.1.as_str());

    // 401 without the token (health needs none), with WWW-Authenticate.
    let (status, headers, _) = request(addr, "POST", "/words", &[], b"x").await;
    assert_eq!(status, 401);
    assert!(headers.iter().any(|(n, _)| n == "www-authenticate"));
    let wrong = [("Authorization", "Bearer nope")];
    assert_eq!(request(addr, "GET", "/metrics", &wrong, b"").await.0, 401);
    assert_eq!(request(addr, "GET", "/health/live", &[], b"").await.0, 200);

    // The user's own route, behind the token like the rest.
    assert_eq!(request(addr, "GET", "/hello", &[], b"").await.0, 401);
    let (status, _, body) = request(addr, "GET", "/hello", &[auth], b"").await;
    assert_eq!(
        (status, body.as_str()),
        (200, "hello from the user's route")
    );

    // 400: undecodable body, refused by the function; 404: no such route; 413: too big.
    let (status, _, body) = request(addr, "POST", "/numbers", &[auth], b"twelve").await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("json"), "{body}");
    let (status, _, body) = request(addr, "POST", "/words", &[auth], b"   ").await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("an empty word"), "{body}");
    assert_eq!(
        request(addr, "POST", "/nowhere", &[auth], b"x").await.0,
        404
    );
    let big = vec![b'a'; 4096];
    assert_eq!(request(addr, "POST", "/words", &[auth], &big).await.0, 413);

    // 503 with Retry-After while the broker is down; 201 again once it is back.
    w.kafka.mock().broker_down(1).unwrap();
    let (status, headers, body) = request(addr, "POST", "/words", &[auth], b"down").await;
    assert_eq!(status, 503, "{body}");
    assert!(headers.iter().any(|(n, _)| n == "retry-after"));
    w.kafka.mock().broker_up(1).unwrap();
    let mut created = false;
    for _ in 0..20 {
        if request(addr, "POST", "/words", &[auth], b"up").await.0 == 201 {
            created = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(created, "accepted again once the broker is back");

    let (_, _, text) = request(addr, "GET", "/metrics", &[auth], b"").await;
    for line in [
        "flows_http_ingest_requests_total{route=\"numbers\",status=\"400\"} 1",
        "flows_http_ingest_requests_total{route=\"words\",status=\"503\"} 1",
    ] {
        assert!(text.contains(line), "{line} in {text}");
    }
    w.server.shutdown().await.unwrap();
    w.running.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_follows_the_store() {
    let w = worker().await;
    let addr = w.server.local_addr();
    let auth = bearer();
    let auth = (auth.0, auth.1.as_str());
    assert!(wait_until(WAIT, || w.running.metrics().snapshot().rebalances > 0).await);
    assert_eq!(request(addr, "GET", "/health/ready", &[], b"").await.0, 200);

    w.store.set_failing(true);
    assert_eq!(
        request(addr, "POST", "/words", &[auth], b"stuck").await.0,
        201,
        "ingest does not need the store"
    );
    let mut not_ready = None;
    for _ in 0..100 {
        let (status, _, body) = request(addr, "GET", "/health/ready", &[], b"").await;
        if status == 503 {
            not_ready = Some(body);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let body = not_ready.expect("not ready while the store is down");
    assert!(body.contains("the state store failed"), "{body}");

    w.store.set_failing(false);
    assert!(wait_until(WAIT, || w.running.metrics().snapshot().committed >= 1).await);
    let mut ready = false;
    for _ in 0..100 {
        if request(addr, "GET", "/health/ready", &[], b"").await.0 == 200 {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ready, "ready again once the store is back");
    w.server.shutdown().await.unwrap();
    w.running.shutdown().await.unwrap();
}
