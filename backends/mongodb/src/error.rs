//! Mapping of driver errors to repository errors.

use flows_core::RepositoryError;
use mongodb::error::{ErrorKind, RETRYABLE_WRITE_ERROR, TRANSIENT_TRANSACTION_ERROR, WriteFailure};

/// Server error codes after which the same operation can succeed later: write conflict
/// between transactions (112), primary stepped down or unreachable (91, 189, 10107,
/// 13435, 13436, 11600, 11602), host unreachable or not found (6, 7), network timeout
/// (89), exceeded time limit (50), lock timeout (24).
const TRANSIENT_CODES: &[i32] = &[
    6, 7, 24, 50, 89, 91, 112, 189, 10107, 11600, 11602, 13435, 13436,
];

/// Duplicate key: an insert found the document already there.
pub(crate) const DUPLICATE_KEY: i32 = 11000;

/// Whether retrying the same operation later may succeed.
pub(crate) fn is_transient(error: &mongodb::error::Error) -> bool {
    if error.contains_label(TRANSIENT_TRANSACTION_ERROR)
        || error.contains_label(RETRYABLE_WRITE_ERROR)
    {
        return true;
    }
    match error.kind.as_ref() {
        ErrorKind::Io(_)
        | ErrorKind::ConnectionPoolCleared { .. }
        | ErrorKind::ServerSelection { .. }
        | ErrorKind::DnsResolve { .. } => true,
        ErrorKind::Command(command) => TRANSIENT_CODES.contains(&command.code),
        ErrorKind::Write(WriteFailure::WriteError(write)) => TRANSIENT_CODES.contains(&write.code),
        _ => false,
    }
}

pub(crate) fn map_err(error: mongodb::error::Error) -> RepositoryError {
    if is_transient(&error) {
        RepositoryError::Unavailable(Box::new(error))
    } else {
        RepositoryError::Backend(Box::new(error))
    }
}

/// A document that does not have the shape this crate writes.
pub(crate) fn malformed(what: impl std::fmt::Display) -> RepositoryError {
    RepositoryError::Backend(format!("malformed document: {what}").into())
}
