//! Ingest routes: an HTTP request turned into a Kafka message, as the seed's router
//! adapter did, answered only once the broker acknowledged it.

use std::sync::Arc;

use axum::http::HeaderMap;
use flows_core::{EncodedRecord, Format, FunctionError, Headers, Record, Topic};

/// The header whose value becomes [`IngestRequest::key`] (the seed's convention).
pub const REQUEST_KEY_HEADER: &str = "x-request-key";
/// The request header carried into the message as [`IDEMPOTENCY_KEY_MESSAGE_HEADER`].
pub const IDEMPOTENCY_KEY_HEADER: &str = "idempotency-key";
/// The message header holding a request's `Idempotency-Key`.
pub const IDEMPOTENCY_KEY_MESSAGE_HEADER: &str = "flows.idempotency-key";

/// One ingest request, its body decoded.
#[derive(Clone, Debug)]
pub struct IngestRequest<B> {
    /// The body, decoded by the route's body format.
    pub body: B,
    /// The `X-Request-Key` header, if sent.
    pub key: Option<String>,
    /// The request's headers and query parameters as message headers, named as the
    /// seed named them: `HTTP_HEADER_{NAME}` and `HTTP_PARAM_{NAME}`, upper-cased, `-`
    /// as `_` (`Content-Type` becomes `HTTP_HEADER_CONTENT_TYPE`). They are added to
    /// the message; the mapping function may read them.
    pub headers: Headers,
}

/// Why an ingest request was refused before anything was produced (a 400).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IngestError {
    /// The body is not what the route's format expects.
    #[error("the body is not valid {format}: {message}")]
    Body {
        /// The format's name.
        format: &'static str,
        /// What is wrong.
        message: String,
    },
    /// The mapping function refused the request.
    #[error("the request was refused: {0}")]
    Refused(FunctionError),
    /// The mapped record cannot be encoded for its topic.
    #[error("the record cannot be encoded for topic {topic}: {message}")]
    Encode {
        /// The topic.
        topic: String,
        /// What is wrong.
        message: String,
    },
}

impl From<FunctionError> for IngestError {
    fn from(error: FunctionError) -> Self {
        IngestError::Refused(error)
    }
}

type Handler =
    dyn Fn(&[u8], Option<String>, Headers) -> Result<Vec<EncodedRecord>, IngestError> + Send + Sync;

/// A route `POST /{name}` that decodes the body with a format, maps it with a function
/// to a record of a typed topic, and produces it.
#[derive(Clone)]
pub struct IngestRoute {
    name: String,
    topic: String,
    /// Whether a request may make any number of messages (answered with a list).
    many: bool,
    handler: Arc<Handler>,
}

impl std::fmt::Debug for IngestRoute {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IngestRoute")
            .field("name", &self.name)
            .field("topic", &self.topic)
            .finish()
    }
}

impl IngestRoute {
    /// `POST /{name}`: the body decoded by `body`, mapped by `map` to a record of
    /// `topic`. The request's headers and query parameters travel as message headers
    /// (see [`IngestRequest::headers`]), and so does an `Idempotency-Key`. The answer,
    /// once acknowledged: `201 {"topic", "partition", "offset"}`.
    pub fn new<B, K, V>(
        name: impl Into<String>,
        body: impl Format<B> + 'static,
        topic: Topic<K, V>,
        map: impl Fn(IngestRequest<B>) -> Result<Record<K, V>, FunctionError> + Send + Sync + 'static,
    ) -> Self
    where
        B: 'static,
        K: 'static,
        V: 'static,
    {
        let mut route = Self::explode(name, body, topic, move |request| Ok(vec![map(request)?]));
        route.many = false;
        route
    }

    /// Like [`new`](Self::new), but a request makes any number of messages (a text's
    /// words, say), produced in order; the answer lists where each landed:
    /// `201 {"messages": [{"topic", "partition", "offset"}, ...]}`.
    pub fn explode<B, K, V>(
        name: impl Into<String>,
        body: impl Format<B> + 'static,
        topic: Topic<K, V>,
        map: impl Fn(IngestRequest<B>) -> Result<Vec<Record<K, V>>, FunctionError>
        + Send
        + Sync
        + 'static,
    ) -> Self
    where
        B: 'static,
        K: 'static,
        V: 'static,
    {
        let topic_name = topic.name().to_owned();
        let handler = move |bytes: &[u8], key: Option<String>, headers: Headers| {
            let decoded = body.decode(bytes).map_err(|e| IngestError::Body {
                format: body.name(),
                message: e.to_string(),
            })?;
            let request = IngestRequest {
                body: decoded,
                key,
                headers: headers.clone(),
            };
            map(request)?
                .into_iter()
                .map(|mut record| {
                    for header in headers.iter() {
                        record
                            .headers
                            .append(header.key.clone(), header.value.clone());
                    }
                    topic.encode(record, None).map_err(|e| IngestError::Encode {
                        topic: topic.name().to_owned(),
                        message: e.to_string(),
                    })
                })
                .collect()
        };
        Self {
            name: name.into().trim_matches('/').to_owned(),
            topic: topic_name,
            many: true,
            handler: Arc::new(handler),
        }
    }

    /// The route's name: it answers `POST /{name}`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The topic it produces to.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// Whether a request may make several messages (see [`explode`](Self::explode)).
    pub(crate) fn many(&self) -> bool {
        self.many
    }

    /// The records a request makes.
    pub(crate) fn records(
        &self,
        body: &[u8],
        http_headers: &HeaderMap,
        query: &[(String, String)],
    ) -> Result<Vec<EncodedRecord>, IngestError> {
        let key = http_headers
            .get(REQUEST_KEY_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        (self.handler)(body, key, message_headers(http_headers, query))
    }
}

/// The seed's header naming: `HTTP_HEADER_{NAME}` per request header and
/// `HTTP_PARAM_{NAME}` per query parameter, upper-cased, `-` as `_`; the
/// `Idempotency-Key` also as [`IDEMPOTENCY_KEY_MESSAGE_HEADER`]. `Authorization` is left
/// out: a credential must not end up in a topic.
fn message_headers(http_headers: &HeaderMap, query: &[(String, String)]) -> Headers {
    let name =
        |prefix: &str, key: &str| format!("{prefix}{}", key.to_uppercase().replace('-', "_"));
    let mut headers = Headers::new();
    for (key, value) in http_headers {
        if key == axum::http::header::AUTHORIZATION {
            continue;
        }
        headers.append(
            name("HTTP_HEADER_", key.as_str()),
            Some(value.as_bytes().to_vec()),
        );
    }
    for (key, value) in query {
        headers.append(name("HTTP_PARAM_", key), Some(value.as_bytes().to_vec()));
    }
    // The W3C trace context travels as is, so the pipelines carry it on.
    for name in ["traceparent", "tracestate"] {
        if let Some(value) = http_headers.get(name) {
            headers.append(name, Some(value.as_bytes().to_vec()));
        }
    }
    if let Some(key) = http_headers.get(IDEMPOTENCY_KEY_HEADER) {
        headers.append(
            IDEMPOTENCY_KEY_MESSAGE_HEADER,
            Some(key.as_bytes().to_vec()),
        );
    }
    headers
}

#[cfg(test)]
mod tests {
    use super::*;
    use flows_core::Utf8;

    #[test]
    fn headers_and_parameters_are_named_as_the_seed_named_them() {
        let mut http = HeaderMap::new();
        http.insert("content-type", "text/plain".parse().expect("value"));
        http.insert("x-request-key", "k1".parse().expect("value"));
        http.insert("idempotency-key", "once".parse().expect("value"));
        http.insert("authorization", "Bearer secret".parse().expect("value"));
        let route = IngestRoute::new("words", Utf8, Topic::new("words", Utf8, Utf8), |r| {
            Ok(Record::new(r.key.unwrap_or_default(), r.body))
        });
        let mut records = route
            .records(b"hello", &http, &[("lang".into(), "en".into())])
            .expect("record");
        let record = records.remove(0);
        assert_eq!(record.key.as_deref(), Some(&b"k1"[..]));
        assert_eq!(record.value.as_deref(), Some(&b"hello"[..]));
        let header = |name: &str| {
            record
                .headers
                .iter()
                .find(|h| h.key == name)
                .and_then(|h| h.value.clone())
        };
        assert_eq!(
            header("HTTP_HEADER_CONTENT_TYPE"),
            Some(b"text/plain".to_vec())
        );
        assert_eq!(header("HTTP_PARAM_LANG"), Some(b"en".to_vec()));
        assert_eq!(
            header(IDEMPOTENCY_KEY_MESSAGE_HEADER),
            Some(b"once".to_vec())
        );
        assert_eq!(
            header("HTTP_HEADER_AUTHORIZATION"),
            None,
            "no credential in a topic"
        );
    }

    #[test]
    fn an_undecodable_body_is_a_typed_error() {
        let route = IngestRoute::new(
            "n",
            flows_core::Json::<i64>::new(),
            Topic::new("n", Utf8, Utf8),
            |r| Ok(Record::new("k".to_owned(), r.body.to_string())),
        );
        let error = route
            .records(b"not a number", &HeaderMap::new(), &[])
            .expect_err("refused");
        assert!(
            matches!(error, IngestError::Body { format: "json", .. }),
            "{error}"
        );
    }
}
