//! Mapping of AWS SDK errors to repository errors, and the bounded retry of partial
//! batch results.

use std::time::Duration;

use aws_sdk_dynamodb::config::http::HttpResponse;
use aws_sdk_dynamodb::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use flows_core::RepositoryError;

/// A DynamoDB call failed; the message carries the service's error code and text.
#[derive(Debug, thiserror::Error)]
#[error("DynamoDB {operation}: {message}")]
pub struct DynamoDbError {
    /// The API operation, e.g. `PutItem`.
    pub operation: &'static str,
    /// The error code (`ValidationException`, ...) if the service sent one.
    pub code: Option<String>,
    /// What went wrong, with the SDK's error context.
    pub message: String,
}

impl DynamoDbError {
    pub(crate) fn new(operation: &'static str, message: impl Into<String>) -> Self {
        Self {
            operation,
            code: None,
            message: message.into(),
        }
    }
}

/// Error codes after which the same request can succeed later: throttling, capacity,
/// server-side failures, and an item locked by another transaction.
fn is_transient_code(code: &str) -> bool {
    matches!(
        code,
        "ThrottlingException"
            | "ProvisionedThroughputExceededException"
            | "RequestLimitExceeded"
            | "InternalServerError"
            | "ServiceUnavailable"
            | "LimitExceededException"
            | "TransactionInProgressException"
            | "TransactionConflictException"
    )
}

/// Maps an SDK error of `operation`: connection failures, time-outs, throttling and
/// 5xx answers are [`Unavailable`](RepositoryError::Unavailable); a missing table is a
/// [`Configuration`](RepositoryError::Configuration) error; anything else (validation
/// errors above all) is [`Backend`](RepositoryError::Backend).
pub(crate) fn map_sdk_err<E>(
    operation: &'static str,
    error: SdkError<E, HttpResponse>,
) -> RepositoryError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    let (code, status, message) = match &error {
        // The service's own code and message; the SDK's full context would dump the
        // raw HTTP response.
        SdkError::ServiceError(e) => (
            e.err().code().map(str::to_owned),
            Some(e.raw().status().as_u16()),
            format!(
                "{}: {}",
                e.err().code().unwrap_or("error"),
                e.err().message().unwrap_or("(no message)")
            ),
        ),
        _ => (None, None, DisplayErrorContext(&error).to_string()),
    };
    let transient = match &error {
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => {
            true
        }
        SdkError::ServiceError(_) => {
            code.as_deref().is_some_and(is_transient_code) || status.is_some_and(|s| s >= 500)
        }
        _ => false,
    };
    let wrapped = DynamoDbError {
        operation,
        message,
        code,
    };
    if transient {
        RepositoryError::Unavailable(Box::new(wrapped))
    } else if wrapped.code.as_deref() == Some("ResourceNotFoundException") {
        RepositoryError::Configuration(wrapped.to_string())
    } else if is_data_refusal(&wrapped) {
        RepositoryError::Rejected(Box::new(wrapped))
    } else {
        RepositoryError::Backend(Box::new(wrapped))
    }
}

/// Whether a validation error is about the data (an item too large, an empty or
/// out-of-range value) rather than the request or table (a key schema that does not
/// match, which every write would meet).
fn is_data_refusal(error: &DynamoDbError) -> bool {
    error.code.as_deref() == Some("ValidationException")
        && ["size", "empty", "number", "overflow", "underflow"]
            .iter()
            .any(|word| error.message.to_lowercase().contains(word))
}

/// A builder rejected a request (a required field was missing): a bug, not an outage.
pub(crate) fn build_err(error: aws_sdk_dynamodb::error::BuildError) -> RepositoryError {
    RepositoryError::Backend(Box::new(DynamoDbError::new("request", error.to_string())))
}

/// What a cancelled `TransactWriteItems` means, from its per-item cancellation codes.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Cancellation {
    /// These items (indices into the transaction) failed their version condition.
    Conflict(Vec<usize>),
    /// Contention or throttling: nothing was written and the same transaction may pass.
    Transient,
    /// Anything else (a validation error, an unknown code): a failure to report.
    Failed,
}

/// Classifies the cancellation reasons of a transaction, one code per item in request
/// order (`None` or `"None"` for items that were fine). A validation failure wins over
/// everything (retrying cannot fix it); then contention, since a retry gives a complete
/// picture of which conditions fail; then the version conditions that failed.
pub(crate) fn classify_cancellation<'a>(
    codes: impl IntoIterator<Item = Option<&'a str>>,
) -> Cancellation {
    let mut conflicts = Vec::new();
    let mut transient = false;
    let mut failed = false;
    let mut any = false;
    for (index, code) in codes.into_iter().enumerate() {
        any = true;
        match code {
            None | Some("None") => {}
            Some("ConditionalCheckFailed") => conflicts.push(index),
            Some(
                "TransactionConflict"
                | "ThrottlingError"
                | "ProvisionedThroughputExceeded"
                | "RequestLimitExceeded",
            ) => transient = true,
            Some(_) => failed = true,
        }
    }
    if failed || !any {
        Cancellation::Failed
    } else if transient {
        Cancellation::Transient
    } else if conflicts.is_empty() {
        Cancellation::Failed
    } else {
        Cancellation::Conflict(conflicts)
    }
}

/// Exponential back-off with jitter for partial batch results and contended
/// transactions, bounded so that a store that never catches up becomes
/// [`Unavailable`](RepositoryError::Unavailable) instead of a hang.
#[derive(Debug)]
pub(crate) struct Backoff {
    attempt: u32,
    operation: &'static str,
}

impl Backoff {
    /// Waits before retry number `attempt`: 25 ms doubling up to 2 s (about 9 s in all).
    pub(crate) const MAX_ATTEMPTS: u32 = 10;

    pub(crate) fn new(operation: &'static str) -> Self {
        Self {
            attempt: 0,
            operation,
        }
    }

    /// The delay before the next attempt, or `None` once the attempts are used up.
    fn next_delay(&mut self) -> Option<Duration> {
        if self.attempt >= Self::MAX_ATTEMPTS {
            return None;
        }
        let base = 25u64.saturating_mul(1 << self.attempt.min(16)).min(2_000);
        self.attempt += 1;
        // Half fixed, half random: concurrent writers that collided spread out.
        Some(Duration::from_millis(
            base / 2 + rand::random_range(0..=base / 2),
        ))
    }

    /// Sleeps before the next attempt; `what` says what is still pending when giving up.
    pub(crate) async fn wait(
        &mut self,
        what: impl FnOnce() -> String,
    ) -> Result<(), RepositoryError> {
        match self.next_delay() {
            Some(delay) => {
                tokio::time::sleep(delay).await;
                Ok(())
            }
            None => Err(RepositoryError::Unavailable(Box::new(DynamoDbError::new(
                self.operation,
                format!("{} after {} attempts", what(), Self::MAX_ATTEMPTS + 1),
            )))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn throttling_and_server_errors_are_transient() {
        for code in [
            "ThrottlingException",
            "ProvisionedThroughputExceededException",
            "RequestLimitExceeded",
            "InternalServerError",
            "TransactionConflictException",
        ] {
            assert!(is_transient_code(code), "{code}");
        }
        for code in [
            "ValidationException",
            "ConditionalCheckFailedException",
            "AccessDeniedException",
        ] {
            assert!(!is_transient_code(code), "{code}");
        }
    }

    #[test]
    fn cancellation_names_exactly_the_failed_conditions() {
        let codes = [
            Some("None"),
            Some("ConditionalCheckFailed"),
            None,
            Some("ConditionalCheckFailed"),
        ];
        assert_eq!(
            classify_cancellation(codes),
            Cancellation::Conflict(vec![1, 3])
        );
    }

    #[test]
    fn contention_is_retried_and_validation_is_reported() {
        assert_eq!(
            classify_cancellation([Some("ConditionalCheckFailed"), Some("TransactionConflict")]),
            Cancellation::Transient
        );
        assert_eq!(
            classify_cancellation([Some("ThrottlingError"), Some("None")]),
            Cancellation::Transient
        );
        assert_eq!(
            classify_cancellation([Some("ValidationError"), Some("ConditionalCheckFailed")]),
            Cancellation::Failed
        );
        assert_eq!(classify_cancellation([Some("None")]), Cancellation::Failed);
        assert_eq!(
            classify_cancellation(std::iter::empty()),
            Cancellation::Failed
        );
    }

    #[test]
    fn backoff_is_bounded_and_grows() {
        let mut backoff = Backoff::new("BatchGetItem");
        let delays: Vec<Duration> = std::iter::from_fn(|| backoff.next_delay()).collect();
        assert_eq!(delays.len(), Backoff::MAX_ATTEMPTS as usize);
        assert!(delays[0] <= Duration::from_millis(25));
        assert!(delays.iter().all(|d| *d <= Duration::from_secs(2)));
        assert!(delays.last().is_some_and(|d| *d >= Duration::from_secs(1)));
    }
}
