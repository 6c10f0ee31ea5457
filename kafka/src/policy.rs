//! What happens to a message that cannot be processed: retry, dead-letter, or stop.
//!
//! A message fails when its bytes cannot be decoded, its persistence id cannot be
//! computed, or the user function returns an error. Nothing is ever dropped silently:
//! the policy either parks the message in a dead-letter topic (its original bytes plus
//! headers saying why) or stops the pipeline with a typed error, after optional retries.

use std::time::Duration;

use flows_core::function::ErrorAction;
use flows_core::{EncodedRecord, ProcessError, RawMessage};

/// Header names on dead-letter records.
pub mod headers {
    /// The error kind ([`ProcessError::kind`](flows_core::ProcessError::kind)).
    pub const ERROR_KIND: &str = "flows.error.kind";
    /// The error message.
    pub const ERROR_MESSAGE: &str = "flows.error.message";
    /// The pipeline that failed.
    pub const PIPELINE: &str = "flows.pipeline";
    /// Source topic of the failed message.
    pub const SOURCE_TOPIC: &str = "flows.source.topic";
    /// Source partition of the failed message (decimal).
    pub const SOURCE_PARTITION: &str = "flows.source.partition";
    /// Source offset of the failed message (decimal).
    pub const SOURCE_OFFSET: &str = "flows.source.offset";
}

/// The final action of an [`ErrorPolicy`] once retries are exhausted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fallback {
    /// Stop the pipeline with an error; the failed batch is not committed, so the
    /// message is processed again when the pipeline restarts.
    Stop,
    /// Publish the message, byte for byte, to this topic with error headers, and go on.
    DeadLetter(String),
}

/// How failed messages are handled: `retries` re-runs of the batch `retry_delay` apart
/// (useful when a function calls an external party), then the [`Fallback`].
///
/// The default stops the pipeline: losing nothing and saying so loudly.
///
/// ```
/// use std::time::Duration;
/// use flows_kafka::ErrorPolicy;
/// let policy = ErrorPolicy::dead_letter("orders-dlq").with_retries(3, Duration::from_millis(200));
/// assert_eq!(policy.retries, 3);
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ErrorPolicy {
    /// How many times a batch with a failed message is re-run before the fallback.
    pub retries: u32,
    /// Wait between those re-runs.
    pub retry_delay: Duration,
    /// What happens after the last retry.
    pub fallback: Fallback,
}

impl Default for ErrorPolicy {
    fn default() -> Self {
        Self::stop()
    }
}

impl ErrorPolicy {
    /// Stop the pipeline at the first failed message.
    pub fn stop() -> Self {
        Self {
            retries: 0,
            retry_delay: Duration::from_secs(1),
            fallback: Fallback::Stop,
        }
    }

    /// Send failed messages to the dead-letter topic `topic` and go on.
    pub fn dead_letter(topic: impl Into<String>) -> Self {
        Self {
            fallback: Fallback::DeadLetter(topic.into()),
            ..Self::stop()
        }
    }

    /// Re-runs a failing batch `retries` times, `delay` apart, before the fallback.
    pub fn with_retries(mut self, retries: u32, delay: Duration) -> Self {
        self.retries = retries;
        self.retry_delay = delay;
        self
    }

    /// The action for a failed message on attempt `attempt` (0-based) of a batch.
    /// Before the last attempt a failure aborts the batch so that it is re-run.
    pub(crate) fn action(
        &self,
        attempt: u32,
        pipeline: &str,
        message: &RawMessage,
        error: &ProcessError,
    ) -> ErrorAction {
        if attempt < self.retries {
            return ErrorAction::Abort;
        }
        match &self.fallback {
            Fallback::Stop => ErrorAction::Abort,
            Fallback::DeadLetter(topic) => {
                ErrorAction::DeadLetter(vec![dead_letter_record(topic, pipeline, message, error)])
            }
        }
    }
}

/// The dead-letter record of `message`: its key, value, headers and timestamp unchanged,
/// plus the `flows.*` headers of [`headers`]. It depends only on the message and the
/// error, so a replay produces the same bytes.
pub fn dead_letter_record(
    topic: &str,
    pipeline: &str,
    message: &RawMessage,
    error: &ProcessError,
) -> EncodedRecord {
    let headers = message
        .headers
        .clone()
        .with(headers::ERROR_KIND, error.kind().as_bytes().to_vec())
        .with(headers::ERROR_MESSAGE, error.to_string().into_bytes())
        .with(headers::PIPELINE, pipeline.as_bytes().to_vec())
        .with(headers::SOURCE_TOPIC, message.topic.as_bytes().to_vec())
        .with(
            headers::SOURCE_PARTITION,
            message.partition.to_string().into_bytes(),
        )
        .with(
            headers::SOURCE_OFFSET,
            message.offset.to_string().into_bytes(),
        );
    EncodedRecord {
        topic: topic.into(),
        partition: None,
        key: message.key.clone(),
        value: message.value.clone(),
        headers,
        timestamp: message.timestamp,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flows_core::FunctionError;

    #[test]
    fn retries_abort_until_the_fallback() {
        let policy = ErrorPolicy::dead_letter("dlq").with_retries(2, Duration::ZERO);
        let message = RawMessage::raw("in", 3, 7, Some(b"k"), Some(b"\xff"));
        let error = ProcessError::Function(FunctionError::new("boom"));
        assert_eq!(policy.action(0, "p", &message, &error), ErrorAction::Abort);
        assert_eq!(policy.action(1, "p", &message, &error), ErrorAction::Abort);
        let ErrorAction::DeadLetter(records) = policy.action(2, "p", &message, &error) else {
            panic!("expected a dead letter");
        };
        let record = &records[0];
        assert_eq!(&*record.topic, "dlq");
        assert_eq!(record.value.as_deref(), Some(&b"\xff"[..]));
        assert_eq!(record.key.as_deref(), Some(&b"k"[..]));
        let header = |k| record.headers.first(k).flatten();
        assert_eq!(header(headers::ERROR_KIND), Some(&b"function"[..]));
        assert_eq!(
            header(headers::ERROR_MESSAGE),
            Some(&b"function failed: boom"[..])
        );
        assert_eq!(header(headers::SOURCE_TOPIC), Some(&b"in"[..]));
        assert_eq!(header(headers::SOURCE_PARTITION), Some(&b"3"[..]));
        assert_eq!(header(headers::SOURCE_OFFSET), Some(&b"7"[..]));
        assert_eq!(header(headers::PIPELINE), Some(&b"p"[..]));
        assert_eq!(
            ErrorPolicy::stop().action(0, "p", &message, &error),
            ErrorAction::Abort
        );
    }
}
