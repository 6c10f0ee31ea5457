//! Validated identifiers: state keys ([`PersistenceId`]) and storage names ([`TableName`]).
//!
//! Validation lives here, not in the backends, so every backend accepts and rejects
//! exactly the same identifiers.

use std::borrow::Borrow;
use std::fmt;
use std::sync::Arc;

/// Why a persistence id was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidPersistenceId {
    /// The id was empty.
    #[error("persistence id must not be empty")]
    Empty,
    /// The id was longer than [`PersistenceId::MAX_LEN`] bytes.
    #[error("persistence id is {len} bytes long; the maximum is {max} bytes")]
    TooLong {
        /// Length of the rejected id in bytes.
        len: usize,
        /// The maximum, [`PersistenceId::MAX_LEN`].
        max: usize,
    },
    /// The id was not valid UTF-8.
    #[error("persistence id is not valid UTF-8: {0}")]
    NotUtf8(#[from] std::str::Utf8Error),
}

/// The key of one state: a non-empty UTF-8 string of at most 1,024 bytes.
///
/// Any UTF-8 is allowed, including quotes, backslashes, NUL and other control characters;
/// backends must store ids byte for byte. Cloning is cheap (the string is shared).
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PersistenceId(Arc<str>);

impl PersistenceId {
    /// Longest id accepted, in bytes.
    pub const MAX_LEN: usize = 1024;

    /// Validates and wraps an id.
    pub fn new(id: impl AsRef<str>) -> Result<Self, InvalidPersistenceId> {
        let id = id.as_ref();
        if id.is_empty() {
            return Err(InvalidPersistenceId::Empty);
        }
        if id.len() > Self::MAX_LEN {
            return Err(InvalidPersistenceId::TooLong {
                len: id.len(),
                max: Self::MAX_LEN,
            });
        }
        Ok(Self(Arc::from(id)))
    }

    /// Validates bytes (e.g. a Kafka key) as an id.
    pub fn from_utf8(bytes: &[u8]) -> Result<Self, InvalidPersistenceId> {
        Self::new(std::str::from_utf8(bytes)?)
    }

    /// The id as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for PersistenceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl fmt::Display for PersistenceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for PersistenceId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl Borrow<str> for PersistenceId {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl TryFrom<&str> for PersistenceId {
    type Error = InvalidPersistenceId;
    fn try_from(value: &str) -> Result<Self, Self::Error> {
        Self::new(value)
    }
}

impl TryFrom<String> for PersistenceId {
    type Error = InvalidPersistenceId;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        Self::new(value)
    }
}

/// A storage name (table, collection) was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid name {name:?}: {reason}")]
pub struct InvalidName {
    /// The rejected name.
    pub name: String,
    /// Why it was rejected.
    pub reason: &'static str,
}

/// A table or collection name that is safe in every backend: an ASCII letter followed by
/// ASCII letters, digits or underscores, at most 48 characters (Cassandra's limit, the
/// strictest of the supported stores). Backends still quote it; validation is what makes
/// injection impossible rather than merely unlikely.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TableName(Arc<str>);

impl TableName {
    /// Longest name accepted.
    pub const MAX_LEN: usize = 48;

    /// Validates a table name.
    pub fn new(name: impl AsRef<str>) -> Result<Self, InvalidName> {
        let name = name.as_ref();
        match Self::problem(name) {
            Some(reason) => Err(InvalidName {
                name: name.to_owned(),
                reason,
            }),
            None => Ok(Self(Arc::from(name))),
        }
    }

    /// What is wrong with `name` as a table or column name, if anything. A `const fn`, so
    /// that `#[derive(Row)]` checks its names when the program is compiled.
    pub const fn problem(name: &str) -> Option<&'static str> {
        let bytes = name.as_bytes();
        if bytes.is_empty() {
            return Some("must not be empty");
        }
        if !bytes[0].is_ascii_alphabetic() {
            return Some("must start with an ASCII letter");
        }
        let mut i = 1;
        while i < bytes.len() {
            let b = bytes[i];
            if !(b.is_ascii_alphanumeric() || b == b'_') {
                return Some("may contain only ASCII letters, digits and underscores");
            }
            i += 1;
        }
        if bytes.len() > Self::MAX_LEN {
            return Some("must be at most 48 characters long");
        }
        None
    }

    /// The name as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for TableName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl fmt::Display for TableName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for TableName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_and_over_long_ids_are_rejected() {
        assert_eq!(PersistenceId::new(""), Err(InvalidPersistenceId::Empty));
        let max = "é".repeat(512); // 1,024 bytes
        assert!(PersistenceId::new(&max).is_ok());
        let over = format!("{max}x");
        assert_eq!(
            PersistenceId::new(&over),
            Err(InvalidPersistenceId::TooLong {
                len: 1025,
                max: 1024
            })
        );
    }

    #[test]
    fn metacharacters_are_valid_ids() {
        for id in ["'; DROP TABLE x; --", "\\", "\"{}\"", "\0", "日本", "a\nb"] {
            assert_eq!(PersistenceId::new(id).unwrap().as_str(), id);
        }
    }

    #[test]
    fn non_utf8_bytes_are_rejected() {
        assert!(matches!(
            PersistenceId::from_utf8(&[0xc3, 0x28]),
            Err(InvalidPersistenceId::NotUtf8(_))
        ));
    }

    #[test]
    fn table_names_are_restricted_to_safe_identifiers() {
        assert!(TableName::new("flows_state_1").is_ok());
        for bad in [
            "",
            "1abc",
            "_x",
            "a-b",
            "a b",
            "a\"b",
            "x;drop",
            "é",
            &"a".repeat(49),
        ] {
            assert!(TableName::new(bad).is_err(), "{bad:?} accepted");
        }
    }
}
