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
    fold_into, replace_outputs,
};
pub use stateful::{
    InitialState, MaybeState, Origin, PersistenceIdFn, StatefulFunction, StatefulProcessor,
};
pub use stateless::{StatelessFunction, StatelessProcessor};

/// An error returned by a user function: `?` works on any error inside one, as with
/// `anyhow`, and the original error stays available ([`FunctionError::downcast_ref`]).
///
/// ```
/// use flows_core::FunctionError;
///
/// let parse = |s: &str| -> Result<i64, FunctionError> {
///     let n: i64 = s.trim().parse()?;                  // std::num::ParseIntError
///     let doc: serde_json::Value = serde_json::from_str("{}")?; // serde_json::Error
///     if n < 0 {
///         return Err(FunctionError::new("amount must be positive"));
///     }
///     Ok(n + doc.as_object().map_or(0, |o| o.len() as i64))
/// };
/// let error = parse("x").unwrap_err();
/// assert!(error.downcast_ref::<std::num::ParseIntError>().is_some());
/// assert_eq!(parse("-1").unwrap_err().to_string(), "amount must be positive");
/// ```
///
/// Like `anyhow::Error`, it does not itself implement `std::error::Error` (that would
/// conflict with converting from every error); [`FunctionError::as_error`] gives it as
/// one, and it converts into a `Box<dyn Error>`.
pub struct FunctionError(Failure);

/// What a [`FunctionError`] holds, as a standard error.
#[derive(Debug)]
struct Failure {
    message: String,
    source: Option<BoxError>,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Failure {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

impl FunctionError {
    /// An error with a message.
    pub fn new(message: impl Into<String>) -> Self {
        Self(Failure {
            message: message.into(),
            source: None,
        })
    }

    /// Wraps another error (what `?` does for any error).
    pub fn from_error(error: impl Into<BoxError>) -> Self {
        let source = error.into();
        Self(Failure {
            message: source.to_string(),
            source: Some(source),
        })
    }

    /// The wrapped error, if it is an `E`.
    pub fn downcast_ref<E: std::error::Error + 'static>(&self) -> Option<&E> {
        self.0.source.as_deref()?.downcast_ref::<E>()
    }

    /// This error as a standard error (its source is the wrapped error, if any).
    pub fn as_error(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
        &self.0
    }
}

impl fmt::Debug for FunctionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl fmt::Display for FunctionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl<E: std::error::Error + Send + Sync + 'static> From<E> for FunctionError {
    fn from(error: E) -> Self {
        Self::from_error(error)
    }
}

impl From<FunctionError> for BoxError {
    fn from(error: FunctionError) -> Self {
        Box::new(error.0)
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
    Function(FunctionError),
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

impl From<FunctionError> for ProcessError {
    fn from(error: FunctionError) -> Self {
        ProcessError::Function(error)
    }
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
