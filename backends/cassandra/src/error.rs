//! Mapping of driver errors to repository errors.

use flows_core::RepositoryError;
use scylla::errors::{DbError, ExecutionError, NewSessionError, PrepareError, RequestAttemptError};

/// Server errors after which the same request can succeed later: too few replicas
/// alive, replica timeouts (for a lightweight transaction the outcome is then unknown:
/// the retry re-reads and sees it), overload, a node starting or being truncated.
fn is_transient_db_error(error: &DbError) -> bool {
    matches!(
        error,
        DbError::Unavailable { .. }
            | DbError::ReadTimeout { .. }
            | DbError::WriteTimeout { .. }
            | DbError::ReadFailure { .. }
            | DbError::WriteFailure { .. }
            | DbError::Overloaded
            | DbError::IsBootstrapping
            | DbError::TruncateError
            | DbError::RateLimitReached { .. }
    )
}

fn is_transient_attempt(error: &RequestAttemptError) -> bool {
    match error {
        RequestAttemptError::DbError(db, _) => is_transient_db_error(db),
        RequestAttemptError::BrokenConnectionError(_)
        | RequestAttemptError::UnableToAllocStreamId => true,
        _ => false,
    }
}

/// Whether the server refused the data of a request (an empty partition key, a value
/// too large), as opposed to the request itself.
fn is_data_refusal(error: &ExecutionError) -> bool {
    let ExecutionError::LastAttemptError(RequestAttemptError::DbError(DbError::Invalid, message)) =
        error
    else {
        return false;
    };
    let message = message.to_lowercase();
    ["empty", "too large", "exceed", "length"]
        .iter()
        .any(|word| message.contains(word))
}

pub(crate) fn map_execution(error: ExecutionError) -> RepositoryError {
    if is_data_refusal(&error) {
        return RepositoryError::Rejected(Box::new(error));
    }
    let transient = match &error {
        ExecutionError::ConnectionPoolError(_)
        | ExecutionError::RequestTimeout(_)
        | ExecutionError::EmptyPlan => true,
        ExecutionError::LastAttemptError(attempt) => is_transient_attempt(attempt),
        ExecutionError::PrepareError(prepare) => is_transient_prepare(prepare),
        _ => false,
    };
    if transient {
        RepositoryError::Unavailable(Box::new(error))
    } else {
        RepositoryError::Backend(Box::new(error))
    }
}

fn is_transient_prepare(error: &PrepareError) -> bool {
    match error {
        PrepareError::ConnectionPoolError(_) => true,
        PrepareError::AllAttemptsFailed { first_attempt } => is_transient_attempt(first_attempt),
        _ => false,
    }
}

/// Whether preparing a statement failed because the server found it invalid (`Invalid`:
/// for a statement on a validated table name, the table or keyspace does not exist).
pub(crate) fn is_invalid_prepare(error: &PrepareError) -> bool {
    matches!(
        error,
        PrepareError::AllAttemptsFailed {
            first_attempt: RequestAttemptError::DbError(DbError::Invalid, _)
        }
    )
}

pub(crate) fn map_prepare(error: PrepareError) -> RepositoryError {
    if is_transient_prepare(&error) {
        RepositoryError::Unavailable(Box::new(error))
    } else {
        RepositoryError::Backend(Box::new(error))
    }
}

pub(crate) fn map_new_session(error: NewSessionError) -> RepositoryError {
    match error {
        NewSessionError::EmptyKnownNodesList | NewSessionError::IllegalConfig(_) => {
            RepositoryError::Configuration(error.to_string())
        }
        // Unresolvable hosts and a failed first metadata fetch: the cluster may be down.
        _ => RepositoryError::Unavailable(Box::new(error)),
    }
}

/// A result that does not have the shape the statement promises.
pub(crate) fn malformed(message: impl Into<String>) -> RepositoryError {
    RepositoryError::Backend(message.into().into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overload_and_timeouts_are_transient_syntax_errors_are_not() {
        assert!(is_transient_db_error(&DbError::Overloaded));
        assert!(is_transient_db_error(&DbError::IsBootstrapping));
        assert!(!is_transient_db_error(&DbError::SyntaxError));
        assert!(!is_transient_db_error(&DbError::Invalid));
        let timeout = map_execution(ExecutionError::RequestTimeout(
            std::time::Duration::from_secs(1),
        ));
        assert!(timeout.is_transient());
        let syntax = map_execution(ExecutionError::LastAttemptError(
            RequestAttemptError::DbError(DbError::SyntaxError, "bad".into()),
        ));
        assert!(!syntax.is_transient());
        let empty_key = map_execution(ExecutionError::LastAttemptError(
            RequestAttemptError::DbError(DbError::Invalid, "Key may not be empty".into()),
        ));
        assert!(empty_key.is_rejection(), "{empty_key}");
        let unknown_column = map_execution(ExecutionError::LastAttemptError(
            RequestAttemptError::DbError(DbError::Invalid, "Undefined column name x".into()),
        ));
        assert!(!unknown_column.is_rejection(), "{unknown_column}");
    }
}
