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

/// SQLSTATEs after which the same operation can succeed later, so the engine waits
/// them out with backoff: connection exceptions (class 08); insufficient resources
/// (class 53: too many connections, out of memory, disk full); operator intervention
/// (57P01-57P03, 57P05: shutdown, crash, starting up, idle session timeout) and a
/// cancelled statement (57014: statement timeout); a read-only transaction (25006: a
/// standby after a failover, or `default_transaction_read_only`); an idle-in-transaction
/// timeout (25P03); a lock not available (55P03: lock timeout); serialization failure,
/// deadlock and an unknown statement completion (40001, 40P01, 40003: the transaction
/// was rolled back); an I/O error of the server (58030).
fn is_transient_sqlstate(code: &str) -> bool {
    code.starts_with("08")
        || code.starts_with("53")
        || matches!(
            code,
            "57P01"
                | "57P02"
                | "57P03"
                | "57P05"
                | "57014"
                | "25006"
                | "25P03"
                | "55P03"
                | "40001"
                | "40P01"
                | "40003"
                | "58030"
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
        for code in [
            "08006", "08001", "57P01", "57P02", "57P03", "57014", "25006", "55P03", "40001",
            "40P01", "53300", "53100", "53200",
        ] {
            assert!(is_transient_sqlstate(code), "{code}");
        }
        // Configuration (no such table, no permission) and data errors stop.
        for code in ["23505", "42P01", "42501", "22021", "28P01", "3D000"] {
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
