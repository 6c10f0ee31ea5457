//! Mapping of sqlx errors to repository errors.

use flows_core::RepositoryError;

/// SQLSTATEs of data the server refuses: cardinality violations (an upsert touching a
/// row twice, class 21), data exceptions (values out of range, bad encodings, class
/// 22), integrity constraint violations (class 23) and program limits (an index row
/// too large, class 54). The same data fails again; other data can be written.
fn is_rejection_sqlstate(code: &str) -> bool {
    ["21", "22", "23", "54"]
        .iter()
        .any(|class| code.starts_with(class))
}

/// SQLSTATEs after which the same operation can succeed later: connection exceptions
/// (class 08), operator intervention (57P01-57P03: shutdown, crash, starting up),
/// too many connections, serialization failure and deadlock (the transaction was rolled
/// back, nothing was written).
fn is_transient_sqlstate(code: &str) -> bool {
    code.starts_with("08")
        || matches!(
            code,
            "57P01" | "57P02" | "57P03" | "53300" | "40001" | "40P01"
        )
}

pub(crate) fn map_err(error: sqlx::Error) -> RepositoryError {
    match &error {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => RepositoryError::Unavailable(Box::new(error)),
        sqlx::Error::Database(db) if db.code().is_some_and(|c| is_transient_sqlstate(&c)) => {
            RepositoryError::Unavailable(Box::new(error))
        }
        sqlx::Error::Database(db) if db.code().is_some_and(|c| is_rejection_sqlstate(&c)) => {
            RepositoryError::Rejected(Box::new(error))
        }
        _ => RepositoryError::Backend(Box::new(error)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_and_concurrency_failures_are_transient() {
        for code in ["08006", "08001", "57P01", "40001", "40P01", "53300"] {
            assert!(is_transient_sqlstate(code), "{code}");
        }
        for code in ["23505", "42P01", "22021"] {
            assert!(!is_transient_sqlstate(code), "{code}");
        }
        for code in [
            "21000", "22003", "22008", "22021", "23505", "23514", "54000",
        ] {
            assert!(is_rejection_sqlstate(code), "{code}");
        }
        for code in ["42P01", "42501", "08006", "40001"] {
            assert!(!is_rejection_sqlstate(code), "{code}");
        }
    }
}
