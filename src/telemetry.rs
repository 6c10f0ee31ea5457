//! Logs and traces for a worker in one call: [`init`].
//!
//! Logs go to standard error, filtered by `RUST_LOG` (default `info`). With the `otel`
//! feature and `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`)
//! set, the engine's spans are exported over OTLP (HTTP, protobuf) as well: a
//! `flows.ingest` span per ingest request (a child of the request's `traceparent`), a
//! `flows.batch` span per batch (pipeline, topic, partition, offsets, size; linked to
//! the trace of every traced input message) and `flows.store.read` / `flows.store.write`
//! spans inside it. The exporter reads the standard `OTEL_*` variables too
//! (`OTEL_SERVICE_NAME`, `OTEL_EXPORTER_OTLP_HEADERS`, `OTEL_EXPORTER_OTLP_TIMEOUT`, ...).
//!
//! ```no_run
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // Keep the guard until the worker stops: dropping it sends the spans still buffered.
//! let _telemetry = flows::telemetry::init()?;
//! tracing::info!("worker starting");
//! # Ok(()) }
//! ```

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// Why telemetry could not be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TelemetryError {
    /// `RUST_LOG` (or the filter given) does not parse.
    #[error("invalid log filter: {0}")]
    Filter(String),
    /// A global subscriber is installed already (telemetry initialised twice).
    #[error("a tracing subscriber is already installed: {0}")]
    AlreadyInstalled(String),
    /// The OTLP exporter cannot be built from its configuration.
    #[error("OTLP exporter: {0}")]
    Exporter(String),
}

/// How a worker logs and traces: read from the environment by [`Telemetry::from_env`],
/// adjustable before [`Telemetry::init`].
#[derive(Clone, Debug, Default)]
pub struct Telemetry {
    filter: Option<String>,
    #[cfg(feature = "otel")]
    otlp_traces_endpoint: Option<String>,
    #[cfg(feature = "otel")]
    service_name: Option<String>,
}

impl Telemetry {
    /// The settings in the environment: `RUST_LOG`; with the `otel` feature, export when
    /// `OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is set
    /// (unless `OTEL_SDK_DISABLED=true`).
    pub fn from_env() -> Self {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// [`Telemetry::from_env`] over any source of variables.
    fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Self {
        let set = |name: &str| lookup(name).filter(|v| !v.trim().is_empty());
        #[cfg(not(feature = "otel"))]
        let _ = &set;
        Self {
            filter: set("RUST_LOG"),
            #[cfg(feature = "otel")]
            otlp_traces_endpoint: {
                let disabled = set("OTEL_SDK_DISABLED").is_some_and(|v| v.trim() == "true");
                let configured = set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
                    .or_else(|| set("OTEL_EXPORTER_OTLP_ENDPOINT"))
                    .is_some();
                // Empty: the exporter resolves the endpoint from the same variables.
                (configured && !disabled).then(String::new)
            },
            #[cfg(feature = "otel")]
            service_name: None,
        }
    }

    /// Logs and spans at or above this filter (`RUST_LOG` syntax, e.g. `info,rdkafka=warn`).
    pub fn filter(mut self, filter: impl Into<String>) -> Self {
        self.filter = Some(filter.into());
        self
    }

    /// The filter when neither `RUST_LOG` nor [`Telemetry::filter`] set one (else `info`):
    /// a demo that prints its results might log only problems, `warn`.
    pub fn default_filter(mut self, filter: impl Into<String>) -> Self {
        self.filter.get_or_insert_with(|| filter.into());
        self
    }

    /// Exports spans to the OTLP collector at `endpoint` (its base URL, as in
    /// `OTEL_EXPORTER_OTLP_ENDPOINT`: `http://collector:4318`; `/v1/traces` is added).
    #[cfg(feature = "otel")]
    pub fn otlp_endpoint(mut self, endpoint: impl AsRef<str>) -> Self {
        let base = endpoint.as_ref().trim_end_matches('/');
        self.otlp_traces_endpoint = Some(format!("{base}/v1/traces"));
        self
    }

    /// The `service.name` of the exported spans (default: `OTEL_SERVICE_NAME`, else the
    /// SDK's `unknown_service`).
    #[cfg(feature = "otel")]
    pub fn service_name(mut self, name: impl Into<String>) -> Self {
        self.service_name = Some(name.into());
        self
    }

    /// Whether spans will be exported over OTLP.
    pub fn exports(&self) -> bool {
        #[cfg(feature = "otel")]
        return self.otlp_traces_endpoint.is_some();
        #[cfg(not(feature = "otel"))]
        false
    }

    /// Installs the global subscriber: logs to standard error and, when configured,
    /// the OTLP span exporter. Keep the guard while the worker runs.
    pub fn init(self) -> Result<TelemetryGuard, TelemetryError> {
        let filter = |default: &str| match &self.filter {
            Some(filter) => {
                EnvFilter::try_new(filter).map_err(|e| TelemetryError::Filter(e.to_string()))
            }
            None => Ok(EnvFilter::new(default)),
        };
        let logs = tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_filter(filter("info")?);
        #[cfg(feature = "otel")]
        {
            if let Some(endpoint) = &self.otlp_traces_endpoint {
                let (layer, provider) = otlp::layer(endpoint, self.service_name.as_deref())?;
                tracing_subscriber::registry()
                    .with(logs)
                    .with(layer.with_filter(filter("info")?))
                    .try_init()
                    .map_err(|e| TelemetryError::AlreadyInstalled(e.to_string()))?;
                return Ok(TelemetryGuard {
                    provider: Some(provider),
                });
            }
        }
        tracing_subscriber::registry()
            .with(logs)
            .try_init()
            .map_err(|e| TelemetryError::AlreadyInstalled(e.to_string()))?;
        Ok(TelemetryGuard::default())
    }
}

/// Sets up logs and, when the environment configures it, OTLP trace export:
/// `Telemetry::from_env().init()`.
pub fn init() -> Result<TelemetryGuard, TelemetryError> {
    Telemetry::from_env().init()
}

/// Keeps the exporter running; dropping it (or [`TelemetryGuard::shutdown`]) sends the
/// spans still buffered.
#[derive(Debug, Default)]
#[must_use = "dropping the guard stops the span export"]
pub struct TelemetryGuard {
    #[cfg(feature = "otel")]
    provider: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
}

impl TelemetryGuard {
    /// Sends the spans still buffered and stops exporting.
    pub fn shutdown(mut self) -> Result<(), TelemetryError> {
        self.stop()
    }

    fn stop(&mut self) -> Result<(), TelemetryError> {
        #[cfg(feature = "otel")]
        if let Some(provider) = self.provider.take() {
            provider
                .shutdown()
                .map_err(|e| TelemetryError::Exporter(e.to_string()))?;
        }
        Ok(())
    }
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Err(error) = self.stop() {
            eprintln!("flows telemetry: {error}");
        }
    }
}

#[cfg(feature = "otel")]
mod otlp {
    use opentelemetry::trace::TracerProvider as _;
    use opentelemetry_otlp::WithExportConfig;
    use opentelemetry_sdk::Resource;
    use opentelemetry_sdk::trace::SdkTracerProvider;
    use tracing_subscriber::registry::LookupSpan;

    use super::TelemetryError;

    /// The tracing layer exporting spans to `endpoint` (empty: from the environment),
    /// and its provider.
    pub(super) fn layer<S>(
        endpoint: &str,
        service_name: Option<&str>,
    ) -> Result<
        (
            tracing_opentelemetry::OpenTelemetryLayer<S, opentelemetry_sdk::trace::Tracer>,
            SdkTracerProvider,
        ),
        TelemetryError,
    >
    where
        S: tracing::Subscriber + for<'span> LookupSpan<'span>,
    {
        let mut exporter = opentelemetry_otlp::SpanExporter::builder().with_http();
        if !endpoint.is_empty() {
            exporter = exporter.with_endpoint(endpoint);
        }
        let exporter = exporter
            .build()
            .map_err(|e| TelemetryError::Exporter(e.to_string()))?;
        let mut resource = Resource::builder();
        if let Some(name) = service_name {
            resource = resource.with_service_name(name.to_owned());
        }
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(resource.build())
            .build();
        let tracer = provider.tracer("flows");
        Ok((tracing_opentelemetry::layer().with_tracer(tracer), provider))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(feature = "otel")]
    #[test]
    fn export_follows_the_standard_variables() {
        let from = |vars: &[(&str, &str)]| {
            let vars: Vec<(String, String)> = vars
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            Telemetry::from_lookup(move |name| {
                vars.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
            })
        };
        assert!(!from(&[]).exports());
        assert!(!from(&[("OTEL_EXPORTER_OTLP_ENDPOINT", " ")]).exports());
        assert!(from(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318")]).exports());
        assert!(
            from(&[(
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                "http://c:4318/v1/traces"
            )])
            .exports()
        );
        assert!(
            !from(&[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"),
                ("OTEL_SDK_DISABLED", "true")
            ])
            .exports()
        );
        let explicit = Telemetry::default().otlp_endpoint("http://c:4318/");
        assert_eq!(
            explicit.otlp_traces_endpoint.as_deref(),
            Some("http://c:4318/v1/traces")
        );
    }

    #[test]
    fn a_bad_filter_is_a_typed_error() {
        let error = Telemetry::default().filter("=[").init().err();
        assert!(
            matches!(error, Some(TelemetryError::Filter(_))),
            "{error:?}"
        );
    }
}
