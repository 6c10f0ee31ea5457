//! Mapping of driver errors to repository errors.

use flows_core::RepositoryError;
use mongodb::error::{ErrorKind, RETRYABLE_WRITE_ERROR, TRANSIENT_TRANSACTION_ERROR, WriteFailure};

/// Server error codes after which the same operation can succeed later: write conflict
/// between transactions (112), primary stepped down, shutting down or unreachable (91,
/// 189, 10107, 13435, 13436, 11600, 11602), host unreachable or not found (6, 7),
/// network timeout and socket errors (89, 9001), exceeded time limit (50, 262), lock
/// timeout or busy (24, 46), interrupted (11601), majority read concern not available
/// yet (134), write concern timeout (64), no such transaction after a failover (251).
const TRANSIENT_CODES: &[i32] = &[
    6, 7, 24, 46, 50, 64, 89, 91, 112, 134, 189, 251, 262, 9001, 10107, 11600, 11601, 11602, 13435,
    13436,
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
        ErrorKind::Write(WriteFailure::WriteConcernError(concern)) => {
            TRANSIENT_CODES.contains(&concern.code)
        }
        ErrorKind::BulkWrite(bulk) => {
            bulk.write_errors.is_empty()
                && !bulk.write_concern_errors.is_empty()
                && bulk
                    .write_concern_errors
                    .iter()
                    .all(|e| TRANSIENT_CODES.contains(&e.code))
        }
        _ => false,
    }
}

/// Server error codes of data the server refuses: bad value (2), failed to parse (9),
/// type mismatch (14), invalid length (16), document validation failure (121), a
/// document or index key too large (10334, 17280, 17419), field names it cannot store
/// (52, 56, 57).
const REJECTION_CODES: &[i32] = &[2, 9, 14, 16, 52, 56, 57, 121, 10334, 17280, 17419];

/// Whether the server refused the data of a write (the same data fails again).
pub(crate) fn is_rejection(error: &mongodb::error::Error) -> bool {
    match error.kind.as_ref() {
        ErrorKind::Command(command) => REJECTION_CODES.contains(&command.code),
        ErrorKind::Write(WriteFailure::WriteError(write)) => REJECTION_CODES.contains(&write.code),
        ErrorKind::BulkWrite(bulk) => {
            bulk.write_concern_errors.is_empty()
                && !bulk.write_errors.is_empty()
                && bulk
                    .write_errors
                    .values()
                    .all(|e| REJECTION_CODES.contains(&e.code))
        }
        _ => false,
    }
}

pub(crate) fn map_err(error: mongodb::error::Error) -> RepositoryError {
    if is_transient(&error) {
        RepositoryError::Unavailable(Box::new(error))
    } else if is_rejection(&error) {
        RepositoryError::Rejected(Box::new(error))
    } else {
        RepositoryError::Backend(Box::new(error))
    }
}

/// A document that does not have the shape this crate writes.
pub(crate) fn malformed(what: impl std::fmt::Display) -> RepositoryError {
    RepositoryError::Backend(format!("malformed document: {what}").into())
}
