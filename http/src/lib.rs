//! The HTTP face of a flows worker: what operators use to see, probe and feed it
//! without reading its code.
//!
//! | route | what |
//! |---|---|
//! | `GET /health/live` | 200 while the process runs |
//! | `GET /health/ready` | 200 when every pipeline has joined its group, is not stopping and has no stalled partition; 503 with the reasons otherwise |
//! | `GET /metrics` | every pipeline's counters, batch and store latency histograms, per-partition lag and the ingest routes' requests (OpenMetrics when asked for, else the Prometheus text format) |
//! | `GET /topology` | the dataflow as JSON (`?format=mermaid`: a diagram) |
//! | `GET /state/{pipeline}/{id}` | one state as the store holds it now (content as JSON or base64, progress per partition, version as `ETag`) |
//! | `POST /{route}` | an [`IngestRoute`]: the request becomes a Kafka message; 201 with its topic, partition and offset once the broker acknowledged it |
//!
//! Everything but the health routes needs `Authorization: Bearer {token}` when a token
//! is set ([`HttpServer::token`], `FLOWS_HTTP_TOKEN`).
//!
//! ```no_run
//! # async fn run(engine: flows_kafka::Engine, pipelines: Vec<flows_kafka::Pipeline>) -> Result<(), Box<dyn std::error::Error>> {
//! use flows_core::{Record, Topic, Utf8};
//! use flows_http::{HttpServer, IngestRoute};
//!
//! let words = Topic::new("words", Utf8, Utf8);
//! let server = HttpServer::new().ingest(IngestRoute::new("words", Utf8, words, |request| {
//!     let word = request.body.trim().to_owned();
//!     Ok(Record::new(word.clone(), word))
//! }));
//! server.run_until_signal("127.0.0.1:8081".parse()?, &engine, &pipelines).await?;
//! # Ok(()) }
//! ```

mod ingest;
mod metrics;
mod server;
mod topology;

/// The axum this crate serves with, for routes of your own ([`HttpServer::routes`]).
pub use axum;
pub use ingest::{IngestError, IngestRequest, IngestRoute};
pub use server::{HttpError, HttpServer, RunningServer};
pub use topology::{PipelineView, Topology};
