//! OpenTelemetry export, end to end: an in-process OTLP/HTTP collector receives the
//! spans of an ingest request and of the batches and store calls it caused, all in the
//! request's trace (the batch linked to it, as batch processing is in OpenTelemetry's
//! messaging conventions).
//!
//! One test in its own binary: it installs the process's global subscriber.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flows::function::{PersistenceIdFn, StatefulFunction};
use flows::http::axum::body::Bytes;
use flows::http::axum::routing::post;
use flows::http::axum::{Router, extract::State};
use flows::http::{HttpServer, IngestRoute};
use flows::kafka::{EmbeddedKafka, Engine, Pipeline};
use flows::telemetry::Telemetry;
use flows::{Json, MemoryStateRepository, Record, Topic, Utf8};
use flows_integration_tests::{read_topic, test_config, wait_until};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const WAIT: Duration = Duration::from_secs(60);
const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT_SPAN_ID: &str = "00f067aa0ba902b7";

/// The spans an OTLP/HTTP collector received.
type Received = Arc<Mutex<Vec<Span>>>;

/// Serves `POST /v1/traces` (OTLP over HTTP, protobuf) on a free port.
async fn collector() -> (SocketAddr, Received) {
    let received: Received = Arc::default();
    let app = Router::new()
        .route(
            "/v1/traces",
            post(|State(received): State<Received>, body: Bytes| async move {
                let request = ExportTraceServiceRequest::decode(body).unwrap();
                let spans = request
                    .resource_spans
                    .into_iter()
                    .flat_map(|r| r.scope_spans)
                    .flat_map(|s| s.spans);
                received.lock().unwrap().extend(spans);
                ExportTraceServiceResponse::default().encode_to_vec()
            }),
        )
        .with_state(Arc::clone(&received));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { flows::http::axum::serve(listener, app).await });
    (addr, received)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn attribute(span: &Span, key: &str) -> Option<Value> {
    span.attributes
        .iter()
        .find(|a| a.key == key)
        .and_then(|a| a.value.clone())
        .and_then(|v| v.value)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ingested_request_and_everything_it_changed_are_one_trace() {
    let (collector_addr, received) = collector().await;
    let telemetry = Telemetry::default()
        .filter("info,rdkafka=off")
        .otlp_endpoint(format!("http://{collector_addr}"))
        .service_name("flows-otel-test")
        .init()
        .unwrap();

    let kafka = EmbeddedKafka::start(1).unwrap();
    for topic in ["words", "counts"] {
        kafka.create_topic(topic, 2, 1).unwrap();
    }
    let config = test_config(&kafka.bootstrap_servers());
    let counter = StatefulFunction::new(Json::<i64>::new()).one_to_one(
        Topic::new("words", Utf8, Utf8),
        Topic::new("counts", Utf8, Utf8),
        PersistenceIdFn::key(),
        |count: Option<&i64>, word| {
            let count = count.copied().unwrap_or(0) + 1;
            Ok((count, Record::new(word.key, count.to_string())))
        },
    );
    let store = Arc::new(MemoryStateRepository::new());
    let running = Engine::new(config.clone())
        .start(&Pipeline::stateful("count", counter, store))
        .unwrap();
    let route = IngestRoute::new("words", Utf8, Topic::new("words", Utf8, Utf8), |r| {
        let word = r.body.trim().to_owned();
        Ok(Record::new(word.clone(), word))
    });
    let server = HttpServer::new()
        .ingest(route)
        .start(
            "127.0.0.1:0".parse().unwrap(),
            &config,
            vec![running.handle()],
        )
        .await
        .unwrap();
    assert!(wait_until(WAIT, || running.metrics().snapshot().rebalances > 0).await);

    // POST /words in the caller's trace.
    let mut stream = tokio::net::TcpStream::connect(server.local_addr())
        .await
        .unwrap();
    let request = format!(
        "POST /words HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 3\r\n\
         traceparent: 00-{TRACE_ID}-{PARENT_SPAN_ID}-01\r\n\r\nfox"
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    assert!(response.starts_with("HTTP/1.1 201"), "{response}");
    assert!(wait_until(WAIT, || running.metrics().snapshot().committed >= 1).await);

    // The output carries the request's trace onward.
    let outputs = read_topic(&kafka.bootstrap_servers(), "counts", 1, WAIT);
    let traceparent = outputs[0].header("traceparent").unwrap();
    assert!(
        traceparent.starts_with(&format!("00-{TRACE_ID}-")),
        "{traceparent}"
    );

    server.shutdown().await.unwrap();
    running.shutdown().await.unwrap();
    telemetry.shutdown().unwrap();

    let spans = received.lock().unwrap().clone();
    let named = |name: &'static str| spans.iter().filter(move |s| s.name == name);
    let ingest = named("flows.ingest")
        .find(|s| hex(&s.trace_id) == TRACE_ID)
        .unwrap_or_else(|| panic!("no ingest span in the request's trace: {spans:#?}"));
    assert_eq!(hex(&ingest.parent_span_id), PARENT_SPAN_ID);
    assert_eq!(
        attribute(ingest, "http.response.status_code"),
        Some(Value::IntValue(201))
    );
    // The message's traceparent names the ingest span: its child.
    assert!(traceparent.contains(&hex(&ingest.span_id)), "{traceparent}");

    let batch = named("flows.batch")
        .find(|s| {
            s.links
                .iter()
                .any(|l| hex(&l.trace_id) == TRACE_ID && l.span_id == ingest.span_id)
        })
        .unwrap_or_else(|| panic!("no batch span linked to the request: {spans:#?}"));
    assert_eq!(
        attribute(batch, "pipeline"),
        Some(Value::StringValue("count".into()))
    );
    assert_eq!(
        attribute(batch, "messaging.destination.name"),
        Some(Value::StringValue("words".into()))
    );
    assert_eq!(
        attribute(batch, "messaging.batch.message_count"),
        Some(Value::IntValue(1))
    );
    assert!(attribute(batch, "first_offset").is_some());
    assert!(attribute(batch, "messaging.destination.partition.id").is_some());
    for store_call in ["flows.store.read", "flows.store.write"] {
        assert!(
            named(store_call)
                .any(|s| s.parent_span_id == batch.span_id && s.trace_id == batch.trace_id),
            "no {store_call} span inside the batch: {spans:#?}"
        );
    }
}
