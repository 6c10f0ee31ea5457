//! Function types and the pure processing logic, testable without Kafka.
//!
//! Users write plain functions over typed [`Message`](crate::Message)s and
//! [`Record`](crate::Record)s; the constructors in [`stateless`] and [`stateful`] wrap
//! them, with their topics' formats, into byte-level processors
//! ([`StatelessProcessor`], [`StatefulProcessor`]) that an engine drives. [`fold()`]
//! applies a batch of messages of one key to its state with replay deduplication.

pub mod fold;
pub mod stateful;
pub mod stateless;

use std::fmt;

use crate::format::FormatError;
use crate::id::{InvalidPersistenceId, PersistenceId};
use crate::repository::BoxError;
use crate::topic::TopicFormatError;

pub use fold::{
    ErrorAction, FoldError, FoldOutcome, INPUT_PAYLOAD_HEADER, MessageOutcome, OutcomeKind, fold,
    replace_outputs,
};
pub use stateful::{Origin, PersistenceIdFn, StatefulFunction, StatefulProcessor};
pub use stateless::{StatelessFunction, StatelessProcessor};

/// An error returned by a user function.
///
/// ```
/// use flows_core::FunctionError;
/// let parse = |s: &str| s.parse::<i64>().map_err(FunctionError::from_error);
/// assert!(parse("x").is_err());
/// let rejected = FunctionError::new("amount must be positive");
/// assert_eq!(rejected.to_string(), "amount must be positive");
/// ```
#[derive(Debug)]
pub struct FunctionError {
    message: String,
    source: Option<BoxError>,
}

impl FunctionError {
    /// An error with a message.
    pub fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            source: None,
        }
    }

    /// Wraps another error.
    pub fn from_error(error: impl Into<BoxError>) -> Self {
        let source = error.into();
        Self {
            message: source.to_string(),
            source: Some(source),
        }
    }
}

impl fmt::Display for FunctionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for FunctionError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

impl From<&str> for FunctionError {
    fn from(message: &str) -> Self {
        Self::new(message)
    }
}

impl From<String> for FunctionError {
    fn from(message: String) -> Self {
        Self::new(message)
    }
}

impl From<InvalidPersistenceId> for FunctionError {
    fn from(error: InvalidPersistenceId) -> Self {
        Self::from_error(error)
    }
}

impl From<FormatError> for FunctionError {
    fn from(error: FormatError) -> Self {
        Self::from_error(error)
    }
}

/// Why processing one message failed. The engine's error policy (retry, dead-letter,
/// stop) decides what happens next; nothing is dropped silently.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProcessError {
    /// The input could not be decoded, or an output could not be encoded.
    #[error(transparent)]
    Format(#[from] TopicFormatError),
    /// The persistence id function gave an invalid id.
    #[error("invalid persistence id: {0}")]
    PersistenceId(#[from] InvalidPersistenceId),
    /// The stored state content could not be decoded, or the new one encoded.
    #[error("state {id}: {source}")]
    StateFormat {
        /// The state's id.
        id: PersistenceId,
        /// The state format's error.
        #[source]
        source: FormatError,
    },
    /// No function handles messages from this topic.
    #[error("no function is registered for topic {0:?}")]
    UnknownTopic(String),
    /// The user function returned an error.
    #[error("function failed: {0}")]
    Function(#[from] FunctionError),
    /// A copy of another message (a join's intermediate message) does not say which
    /// message it is a copy of.
    #[error("no valid origin: {0}")]
    Origin(String),
    /// The store refused the rows the message maps to (a value it cannot hold, a
    /// constraint of its table).
    #[error("the table refused its rows: {0}")]
    Rejected(String),
    /// An output of the message can never be published (the broker or client refused
    /// it for good: too large, a partition that does not exist, a timestamp or policy
    /// the broker rejects).
    #[error("output to {topic} cannot be published: {reason}")]
    Unpublishable {
        /// The output's topic.
        topic: String,
        /// The producer's error.
        reason: String,
    },
    /// Applying the message would make its state larger than the store accepts; the
    /// state is left as it was.
    #[error(
        "state {id} would be {size} bytes with this message; the store accepts at most {max} bytes"
    )]
    StateTooLarge {
        /// The state's id.
        id: PersistenceId,
        /// Content plus bookkeeping, in bytes, had the message been applied.
        size: usize,
        /// The store's limit.
        max: usize,
    },
}

impl ProcessError {
    /// A short, stable name of the error kind, used in dead-letter headers and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            ProcessError::Format(e) if e.action == "decode" => "decode",
            ProcessError::Format(_) => "encode",
            ProcessError::PersistenceId(_) => "persistence-id",
            ProcessError::StateFormat { .. } => "state-format",
            ProcessError::UnknownTopic(_) => "unknown-topic",
            ProcessError::Function(_) => "function",
            ProcessError::Origin(_) => "origin",
            ProcessError::StateTooLarge { .. } => "state-too-large",
            ProcessError::Unpublishable { .. } => "unpublishable",
            ProcessError::Rejected(_) => "rejected",
        }
    }
}
