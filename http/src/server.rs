//! The server: routes, authentication, ingest producing, and its lifecycle beside the
//! engine's pipelines.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use flows_core::EncodedRecord;
use flows_kafka::rdkafka::ClientConfig;
use flows_kafka::rdkafka::error::{KafkaError, RDKafkaErrorCode};
use flows_kafka::rdkafka::producer::{FutureProducer, FutureRecord};
use flows_kafka::{Engine, EngineError, KafkaConfig, Pipeline, PipelineHandle, RunningPipeline};
use serde_json::json;
use tokio::sync::oneshot;
use tracing::Instrument;

use crate::metrics::{RequestLabels, ServerMetrics};
use crate::topology::Topology;
use crate::{IngestError, IngestRoute};

/// Default most bytes of a request body (1 MiB).
const DEFAULT_BODY_LIMIT: usize = 1024 * 1024;
/// How long an ingest request may wait for the broker before it is answered 503: the
/// ingest producer's `message.timeout.ms`, unless the configuration sets its own.
const INGEST_DELIVERY_TIMEOUT_MS: &str = "10000";

/// Why the HTTP face could not start or serve.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HttpError {
    /// The address cannot be bound, or serving failed.
    #[error("http: {0}")]
    Io(#[from] std::io::Error),
    /// The engine failed (a pipeline could not start, or stopped with an error).
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// The configuration is wrong (`FLOWS_HTTP_ADDR`, say).
    #[error("invalid http configuration: {0}")]
    Configuration(String),
}

/// The HTTP face of a worker: build it with its ingest routes and options, then
/// [`start`](Self::start) it beside running pipelines or let
/// [`run_until_signal`](Self::run_until_signal) run both.
#[derive(Clone, Debug)]
pub struct HttpServer {
    routes: Vec<IngestRoute>,
    token: Option<String>,
    body_limit: usize,
    extra: Option<Router>,
}

impl Default for HttpServer {
    fn default() -> Self {
        Self::new()
    }
}

impl HttpServer {
    /// A server with no ingest route, no token and a 1 MiB body limit.
    pub fn new() -> Self {
        Self {
            routes: Vec::new(),
            token: None,
            body_limit: DEFAULT_BODY_LIMIT,
            extra: None,
        }
    }

    /// The address from `FLOWS_HTTP_ADDR` (`None` when unset: no HTTP face), and the
    /// token from `FLOWS_HTTP_TOKEN`.
    pub fn from_env(self) -> Result<Option<(Self, SocketAddr)>, HttpError> {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
        let Some(addr) = var("FLOWS_HTTP_ADDR") else {
            return Ok(None);
        };
        let addr: SocketAddr = addr.trim().parse().map_err(|_| {
            HttpError::Configuration(format!(
                "FLOWS_HTTP_ADDR must be host:port (e.g. 127.0.0.1:8081), not {addr:?}"
            ))
        })?;
        let server = match var("FLOWS_HTTP_TOKEN") {
            Some(token) => self.token(token),
            None => self,
        };
        Ok(Some((server, addr)))
    }

    /// Requires `Authorization: Bearer {token}` on every route but the health probes.
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// Most bytes of a request body (default 1 MiB); larger requests get 413.
    pub fn body_limit(mut self, bytes: usize) -> Self {
        self.body_limit = bytes;
        self
    }

    /// Adds an ingest route.
    pub fn ingest(mut self, route: IngestRoute) -> Self {
        self.routes.push(route);
        self
    }

    /// Adds routes of your own (behind the token, if one is set).
    pub fn routes(mut self, router: Router) -> Self {
        self.extra = Some(match self.extra.take() {
            Some(extra) => extra.merge(router),
            None => router,
        });
        self
    }

    /// Serves on `addr` for `pipelines`, producing ingested records with `config`'s
    /// producer settings, until [`RunningServer::shutdown`].
    pub async fn start(
        self,
        addr: SocketAddr,
        config: &KafkaConfig,
        pipelines: Vec<PipelineHandle>,
    ) -> Result<RunningServer, HttpError> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let local_addr = listener.local_addr()?;
        let mut properties = config.producer_properties();
        let timeout_set = config
            .get_producer_overrides()
            .iter()
            .any(|(k, _)| k == "message.timeout.ms" || k == "delivery.timeout.ms");
        if !timeout_set {
            properties.retain(|(k, _)| k != "message.timeout.ms");
            properties.push((
                "message.timeout.ms".into(),
                INGEST_DELIVERY_TIMEOUT_MS.into(),
            ));
        }
        let mut client = ClientConfig::new();
        for (key, value) in &properties {
            client.set(key, value);
        }
        let producer: FutureProducer = client.create().map_err(EngineError::from)?;
        let state = Arc::new(AppState {
            routes: self
                .routes
                .iter()
                .map(|r| (r.name().to_owned(), r.clone()))
                .collect(),
            metrics: ServerMetrics::new(pipelines.clone()),
            pipelines,
            producer,
            token: self.token.clone(),
        });
        let router = self.router(Arc::clone(&state));
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            axum::serve(listener, router)
                .with_graceful_shutdown(async {
                    let _ = stop_rx.await;
                })
                .await
        });
        tracing::info!(%local_addr, "http face listening");
        Ok(RunningServer {
            local_addr,
            stop: Some(stop_tx),
            task,
        })
    }

    fn router(self, state: Arc<AppState>) -> Router {
        let protected = Router::new()
            .route("/metrics", get(metrics))
            .route("/topology", get(topology))
            .route("/state/{pipeline}/{id}", get(state_of))
            .route("/{route}", post(ingest))
            .with_state(Arc::clone(&state));
        let protected = match self.extra {
            Some(extra) => protected.merge(extra),
            None => protected,
        };
        let protected = protected.layer(middleware::from_fn_with_state(
            Arc::clone(&state),
            authenticate,
        ));
        Router::new()
            .route("/health/live", get(live))
            .route("/health/ready", get(ready))
            .with_state(state)
            .merge(protected)
            .layer(DefaultBodyLimit::max(self.body_limit))
    }

    /// Starts `pipelines` on `engine` and this server on `addr`, runs until SIGINT or
    /// SIGTERM (or until a pipeline stops), then stops the server first (requests in
    /// flight are answered) and the pipelines after it. Returns the first failure.
    pub async fn run_until_signal(
        self,
        addr: SocketAddr,
        engine: &Engine,
        pipelines: &[Pipeline],
    ) -> Result<(), HttpError> {
        let mut running: Vec<RunningPipeline> = Vec::with_capacity(pipelines.len());
        for pipeline in pipelines {
            running.push(engine.start(pipeline)?);
        }
        let handles = running.iter().map(RunningPipeline::handle).collect();
        let server = self.start(addr, engine.config(), handles).await?;
        // Resolves when any pipeline stops (a wait for a condition that never holds
        // returns only then), without polling.
        let stopped = async {
            let mut waits: Vec<_> = running
                .iter()
                .map(|pipeline| Box::pin(pipeline.wait_for(|_| false)))
                .collect();
            std::future::poll_fn(|cx| {
                let any = waits
                    .iter_mut()
                    .any(|wait| wait.as_mut().poll(cx).is_ready());
                if any {
                    std::task::Poll::Ready(())
                } else {
                    std::task::Poll::Pending
                }
            })
            .await
        };
        tokio::select! {
            () = flows_kafka::shutdown_signal() => tracing::info!("shutdown requested"),
            () = stopped => {}
        }
        server.shutdown().await?;
        let mut first_error = None;
        for pipeline in running {
            if let Err(error) = pipeline.shutdown().await {
                first_error.get_or_insert(error);
            }
        }
        first_error.map_or(Ok(()), |e| Err(e.into()))
    }
}

/// A server started by [`HttpServer::start`].
#[derive(Debug)]
pub struct RunningServer {
    local_addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl RunningServer {
    /// The address it listens on (the port chosen when started on port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Stops accepting connections, answers the requests in flight, and returns.
    pub async fn shutdown(mut self) -> Result<(), HttpError> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match (&mut self.task).await {
            Ok(result) => Ok(result?),
            Err(error) => Err(HttpError::Configuration(format!(
                "the http server task failed: {error}"
            ))),
        }
    }
}

/// What the handlers share.
struct AppState {
    routes: BTreeMap<String, IngestRoute>,
    pipelines: Vec<PipelineHandle>,
    producer: FutureProducer,
    token: Option<String>,
    metrics: ServerMetrics,
}

impl AppState {
    fn count(&self, route: &str, status: StatusCode) {
        self.metrics
            .requests
            .get_or_create(&RequestLabels {
                route: route.to_owned(),
                status: status.as_u16(),
            })
            .inc();
    }
}

async fn authenticate(
    State(state): State<Arc<AppState>>,
    request: Request,
    next: Next,
) -> Response {
    let Some(token) = &state.token else {
        return next.run(request).await;
    };
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if presented.is_some_and(|p| constant_time_eq(p.as_bytes(), token.as_bytes())) {
        next.run(request).await
    } else {
        let mut response = error(StatusCode::UNAUTHORIZED, "a bearer token is required");
        response
            .headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        response
    }
}

/// Compares without stopping at the first difference, so the time taken does not tell
/// how much of a guessed token was right.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn error(status: StatusCode, message: impl std::fmt::Display) -> Response {
    (status, axum::Json(json!({ "error": message.to_string() }))).into_response()
}

async fn live() -> Response {
    axum::Json(json!({ "status": "live" })).into_response()
}

/// The state id a readiness probe reads (one read: a missing state is an answer too).
const PROBE_ID: &str = "flows-readiness-probe";
/// How long a readiness probe waits for a store.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Ready when every pipeline has joined its group (received an assignment), is not
/// stopping, has no partition stalled on its store or broker, and, if it keeps state,
/// its store answers a read now.
async fn ready(State(state): State<Arc<AppState>>) -> Response {
    let mut reasons = Vec::new();
    for pipeline in &state.pipelines {
        if let Ok(probe) = flows_core::PersistenceId::new(PROBE_ID) {
            match tokio::time::timeout(PROBE_TIMEOUT, pipeline.read_state(&probe)).await {
                Err(_) => reasons.push(format!(
                    "{}: the state store did not answer within {PROBE_TIMEOUT:?}",
                    pipeline.name()
                )),
                Ok(Some(Err(failure))) => reasons.push(format!(
                    "{}: the state store failed: {failure}",
                    pipeline.name()
                )),
                Ok(None | Some(Ok(_))) => {}
            }
        }
        let metrics = pipeline.metrics().snapshot();
        let name = pipeline.name();
        if pipeline.is_stopping() {
            reasons.push(format!("{name}: stopped or stopping"));
        } else if metrics.rebalances == 0 {
            reasons.push(format!("{name}: not joined its consumer group yet"));
        } else if metrics.stalled_partitions > 0 {
            reasons.push(format!(
                "{name}: {} partition(s) waiting for the store or the broker",
                metrics.stalled_partitions
            ));
        }
    }
    if reasons.is_empty() {
        axum::Json(json!({ "status": "ready" })).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({ "status": "not ready", "reasons": reasons })),
        )
            .into_response()
    }
}

/// The metrics as OpenMetrics when the scraper asks for it (Prometheus does), else in
/// the Prometheus text format.
async fn metrics(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    let openmetrics = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("application/openmetrics-text"));
    let (content_type, text) = if openmetrics {
        (
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            state.metrics.openmetrics(),
        )
    } else {
        (
            "text/plain; version=0.0.4; charset=utf-8",
            state.metrics.prometheus(),
        )
    };
    match text {
        Ok(text) => ([(header::CONTENT_TYPE, content_type)], text).into_response(),
        Err(_) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "metrics could not be encoded",
        ),
    }
}

async fn topology(
    State(state): State<Arc<AppState>>,
    Query(query): Query<BTreeMap<String, String>>,
) -> Response {
    let routes: Vec<IngestRoute> = state.routes.values().cloned().collect();
    let topology = Topology::of(&routes, &state.pipelines);
    match query.get("format").map(String::as_str) {
        Some("mermaid") => topology.to_mermaid().into_response(),
        None | Some("json") => axum::Json(topology).into_response(),
        Some(other) => error(
            StatusCode::BAD_REQUEST,
            format!("unknown format {other:?} (json or mermaid)"),
        ),
    }
}

/// `GET /state/{pipeline}/{id}`: one state as the store holds it now. The content is
/// shown as JSON when it is JSON, else as base64; the version is the `ETag`.
async fn state_of(
    State(state): State<Arc<AppState>>,
    Path((pipeline, id)): Path<(String, String)>,
) -> Response {
    use base64::Engine as _;
    let Some(handle) = state.pipelines.iter().find(|p| p.name() == pipeline) else {
        return error(StatusCode::NOT_FOUND, format!("no pipeline {pipeline:?}"));
    };
    let id = match flows_core::PersistenceId::new(id) {
        Ok(id) => id,
        Err(invalid) => return error(StatusCode::BAD_REQUEST, invalid),
    };
    let stored = match handle.read_state(&id).await {
        None => {
            return error(
                StatusCode::NOT_FOUND,
                format!("pipeline {pipeline:?} keeps no state"),
            );
        }
        Some(Err(failure)) if failure.is_transient() => {
            let mut response = error(StatusCode::SERVICE_UNAVAILABLE, failure);
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            return response;
        }
        Some(Err(failure)) => return error(StatusCode::INTERNAL_SERVER_ERROR, failure),
        Some(Ok(stored)) => stored,
    };
    if !stored.exists() {
        return error(
            StatusCode::NOT_FOUND,
            format!("no state for {:?}", id.as_str()),
        );
    }
    let content = stored.content.as_deref().map(|bytes| {
        serde_json::from_slice::<serde_json::Value>(bytes).unwrap_or_else(
            |_| json!({ "base64": base64::engine::general_purpose::STANDARD.encode(bytes) }),
        )
    });
    let progress: Vec<serde_json::Value> = stored
        .progress
        .iter()
        .map(|(tp, offset)| json!({ "topic": tp.topic.as_ref(), "partition": tp.partition, "offset": offset }))
        .collect();
    let body = json!({
        "pipeline": pipeline,
        "id": id.as_str(),
        "version": stored.version,
        "content": content,
        "progress": progress,
        "created_at": stored.created_at.map(|t| t.to_rfc3339()),
        "updated_at": stored.updated_at.map(|t| t.to_rfc3339()),
    });
    let mut response = axum::Json(body).into_response();
    if let Ok(etag) = HeaderValue::from_str(&format!("\"{}\"", stored.version)) {
        response.headers_mut().insert(header::ETAG, etag);
    }
    response
}

async fn ingest(
    State(state): State<Arc<AppState>>,
    Path(route): Path<String>,
    Query(query): Query<Vec<(String, String)>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let Some(ingest) = state.routes.get(&route) else {
        return error(StatusCode::NOT_FOUND, format!("no ingest route /{route}"));
    };
    let span = tracing::info_span!(
        "flows.ingest",
        http.route = %route,
        messaging.destination.name = ingest.topic(),
        http.response.status_code = tracing::field::Empty,
    );
    #[cfg(feature = "otel")]
    otel::continue_trace(&span, &headers);
    let response = async {
        match ingest.records(&body, &headers, &query) {
            Ok(records) => {
                #[cfg(feature = "otel")]
                let records = otel::hand_on_context(&span, &headers, records);
                produce(&state.producer, records, ingest.many()).await
            }
            Err(refused) => refused_request(&refused),
        }
    }
    .instrument(span.clone())
    .await;
    span.record(
        "http.response.status_code",
        i64::from(response.status().as_u16()),
    );
    state.count(&route, response.status());
    response
}

/// The ingest span in an OpenTelemetry trace: a child of the request's `traceparent`,
/// and the parent of the messages it produces.
#[cfg(feature = "otel")]
mod otel {
    use axum::http::HeaderMap;
    use flows_core::EncodedRecord;
    use opentelemetry::trace::TraceContextExt;
    use tracing_opentelemetry::OpenTelemetrySpanExt;

    /// Makes `span` a child of the request's trace context, if it has one.
    pub(super) fn continue_trace(span: &tracing::Span, headers: &HeaderMap) {
        let remote = headers
            .get("traceparent")
            .and_then(|v| flows_kafka::remote_span_context(v.as_bytes()));
        if let Some(remote) = remote {
            let parent = opentelemetry::Context::new().with_remote_span_context(remote);
            // Fails only without an OpenTelemetry layer: then there is nothing to join.
            let _ = span.set_parent(parent);
        }
    }

    /// Gives each record the ingest span's `traceparent` in place of the request's, so
    /// the pipelines' spans link to the ingest span; records whose mapping set a trace
    /// context of its own keep it.
    pub(super) fn hand_on_context(
        span: &tracing::Span,
        headers: &HeaderMap,
        mut records: Vec<EncodedRecord>,
    ) -> Vec<EncodedRecord> {
        let context = span.context();
        let own = context.span().span_context().clone();
        if !own.is_valid() {
            return records;
        }
        let request = headers.get("traceparent").map(|v| v.as_bytes());
        let traceparent = flows_kafka::traceparent(&own).into_bytes();
        for record in &mut records {
            let current = record.headers.first("traceparent").flatten();
            if current.is_none() || current == request {
                record.headers.set("traceparent", traceparent.clone());
            }
        }
        records
    }
}

fn refused_request(refused: &IngestError) -> Response {
    error(StatusCode::BAD_REQUEST, refused)
}

/// Produces `records` in order and answers once the broker acknowledged every one: 201
/// with where they landed (one object, or a list for routes that make `many`); 503
/// with `Retry-After` when the broker is unreachable or the queue is full; 413 when the
/// broker refuses one as too large; 400 or 502 for other refusals. Records of a failed
/// request may have been produced in part; a client retrying with the same
/// `Idempotency-Key` lets consumers drop the repeats.
async fn produce(producer: &FutureProducer, records: Vec<EncodedRecord>, many: bool) -> Response {
    let mut pending = Vec::with_capacity(records.len());
    for record in &records {
        let mut future = FutureRecord::<[u8], [u8]>::to(&record.topic);
        if let Some(key) = &record.key {
            future = future.key(key.as_slice());
        }
        if let Some(value) = &record.value {
            future = future.payload(value.as_slice());
        }
        if let Some(partition) = record.partition {
            future = future.partition(partition);
        }
        if let Some(timestamp) = record.timestamp {
            future = future.timestamp(timestamp);
        }
        if let Some(headers) = flows_kafka::kafka_headers(&record.headers) {
            future = future.headers(headers);
        }
        // Enqueued now, in order; acknowledged below.
        match producer.send_result(future) {
            Ok(delivery) => pending.push(delivery),
            Err((failure, _)) => return delivery_failure(&failure),
        }
    }
    let mut landed = Vec::with_capacity(pending.len());
    for (record, delivery) in records.iter().zip(pending) {
        match delivery.await {
            Ok(Ok(delivery)) => landed.push(json!({
                "topic": record.topic.as_ref(),
                "partition": delivery.partition,
                "offset": delivery.offset,
            })),
            Ok(Err((failure, _))) => return delivery_failure(&failure),
            Err(_) => {
                return delivery_failure(&KafkaError::Canceled);
            }
        }
    }
    let body = match (many, landed.len()) {
        (false, 1) => landed.remove(0),
        _ => json!({ "messages": landed }),
    };
    (StatusCode::CREATED, axum::Json(body)).into_response()
}

fn delivery_failure(failure: &KafkaError) -> Response {
    use RDKafkaErrorCode::*;
    match failure.rdkafka_error_code() {
        Some(MessageSizeTooLarge | InvalidMessageSize | MessageBatchTooLarge) => {
            error(StatusCode::PAYLOAD_TOO_LARGE, failure)
        }
        Some(UnknownTopic | UnknownTopicOrPartition | TopicAuthorizationFailed | InvalidTopic) => {
            tracing::error!(error = %failure, "ingest cannot produce: configuration");
            error(StatusCode::BAD_GATEWAY, failure)
        }
        Some(InvalidRecord | InvalidTimestamp | PolicyViolation | UnknownPartition) => {
            error(StatusCode::BAD_REQUEST, failure)
        }
        // Unreachable, busy, timed out, queue full: come back later.
        _ => {
            tracing::warn!(error = %failure, "ingest: the broker did not acknowledge");
            let mut response = error(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("the broker did not acknowledge the message: {failure}"),
            );
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            response
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_compare_whole() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
    }

    #[test]
    fn an_unreachable_broker_is_503_with_retry_after() {
        let response = delivery_failure(&KafkaError::MessageProduction(
            RDKafkaErrorCode::MessageTimedOut,
        ));
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(response.headers().contains_key(header::RETRY_AFTER));
        let too_large = delivery_failure(&KafkaError::MessageProduction(
            RDKafkaErrorCode::MessageSizeTooLarge,
        ));
        assert_eq!(too_large.status(), StatusCode::PAYLOAD_TOO_LARGE);
    }
}
