//! Mapping of sqlx errors to repository errors.

use flows_core::RepositoryError;

/// SQLite result codes that mean "try again": BUSY (5) and LOCKED (6), including their
/// extended codes (low byte).
fn is_transient_code(code: &str) -> bool {
    code.parse::<i32>().is_ok_and(|c| matches!(c & 0xff, 5 | 6))
}

/// SQLite result codes of data it refuses: a constraint of the table (CONSTRAINT, 19,
/// with its extended codes: CHECK, NOT NULL, UNIQUE, ...), a value too big (TOOBIG, 18)
/// or of the wrong type for a strict table (MISMATCH, 20).
fn is_rejection_code(code: &str) -> bool {
    code.parse::<i32>()
        .is_ok_and(|c| matches!(c & 0xff, 18..=20))
}

pub(crate) fn map_err(error: sqlx::Error) -> RepositoryError {
    match &error {
        sqlx::Error::Io(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => RepositoryError::Unavailable(Box::new(error)),
        sqlx::Error::Database(db) if db.code().is_some_and(|c| is_transient_code(&c)) => {
            RepositoryError::Unavailable(Box::new(error))
        }
        sqlx::Error::Database(db) if db.code().is_some_and(|c| is_rejection_code(&c)) => {
            RepositoryError::Rejected(Box::new(error))
        }
        _ => RepositoryError::Backend(Box::new(error)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_and_locked_are_transient() {
        assert!(is_transient_code("5"));
        assert!(is_transient_code("517")); // SQLITE_BUSY_SNAPSHOT
        assert!(is_transient_code("6"));
        assert!(!is_transient_code("19")); // constraint
        assert!(!is_transient_code("x"));
    }

    #[test]
    fn constraint_violations_are_rejections() {
        for code in ["19", "275", "1299", "2067", "18", "20"] {
            assert!(is_rejection_code(code), "{code}");
        }
        for code in ["5", "1", "14", "x"] {
            assert!(!is_rejection_code(code), "{code}");
        }
    }
}
