//! Stateful functions: per-key state `S` (reduce, aggregate, validate) read and written
//! through a [`SingleStateRepository`](crate::SingleStateRepository).
//!
//! A user function receives the current state (`None` before the first message of a
//! key) and the message, and returns the new state with its outputs. It must be a pure
//! function of those two: the engine may run it again after a crash only for messages
//! whose state change was never stored.
//!
//! ```
//! use flows_core::{Json, PersistenceId, Record, RawMessage, Topic, Utf8};
//! use flows_core::function::{PersistenceIdFn, StatefulFunction, StatefulProcessor};
//!
//! let words = Topic::new("words", Utf8, Utf8);
//! let counts = Topic::new("word-counts", Utf8, Json::<i64>::new());
//! let count = StatefulFunction::new(Json::<i64>::new()).one_to_one(
//!     words,
//!     counts,
//!     PersistenceIdFn::key(),
//!     |count: Option<&i64>, word| {
//!         let count = count.copied().unwrap_or(0) + 1;
//!         Ok((count, Record::new(word.key, count)))
//!     },
//! );
//! let m = RawMessage::raw("words", 0, 0, Some(b"fox"), Some(b"fox"));
//! let id = count.persistence_id(&m).unwrap();
//! assert_eq!(id.as_str(), "fox");
//! let mut outputs = Vec::new();
//! let applied = count.apply(&id, None, &[&m], &mut outputs).unwrap();
//! assert_eq!(applied.content.as_deref(), Some(&b"1"[..]));
//! assert!(matches!(applied.outcomes[..], [Ok(1)]));
//! assert_eq!(outputs[0].value.as_deref(), Some(&b"1"[..]));
//! ```

use std::marker::PhantomData;
use std::sync::Arc;

use crate::format::Format;
use crate::function::{FunctionError, ProcessError};
use crate::id::{InvalidPersistenceId, PersistenceId};
use crate::message::{Message, RawMessage, Record, TopicPartition};
use crate::state::EncodedRecord;
use crate::topic::Topic;

/// The result of applying new messages of one key to its state content.
#[derive(Debug)]
pub struct Applied {
    /// The new encoded content, or `None` if no message changed the state.
    pub content: Option<Vec<u8>>,
    /// One outcome per message, in order: how many records it appended to the outputs
    /// (its own, right after the previous message's), or why it failed. A failed
    /// message appended nothing and did not change the state.
    pub outcomes: Vec<Result<usize, ProcessError>>,
}

/// The message a copy stands for: its topic-partition and offset
/// ([`StatefulProcessor::origin`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Origin {
    /// The original's topic and partition.
    pub topic_partition: TopicPartition,
    /// The original's offset.
    pub offset: i64,
}

/// A stateful function over raw messages: what an engine runs.
pub trait StatefulProcessor: Send + Sync {
    /// Topics this function reads.
    fn input_topics(&self) -> Vec<Arc<str>>;

    /// The topics it writes, as declared (for describing the dataflow; the dead-letter
    /// topic is the pipeline's). Empty when unknown.
    fn output_topics(&self) -> Vec<Arc<str>> {
        Vec::new()
    }

    /// The key of the state a message belongs to.
    fn persistence_id(&self, message: &RawMessage) -> Result<PersistenceId, ProcessError>;

    /// The message key, when the persistence id of `message` is its key unchanged
    /// ([`PersistenceIdFn::Key`]): lets an engine group a batch by borrowed keys and
    /// call [`persistence_id`](Self::persistence_id) once per distinct key, not once per
    /// message. `None` (the default) means "ask `persistence_id`".
    fn id_is_key<'m>(&self, message: &'m RawMessage) -> Option<&'m [u8]> {
        let _ = message;
        None
    }

    /// Where a state records `message` (its progress and last results): `None`, the
    /// default, means the message's own topic, partition and offset.
    ///
    /// A processor whose messages are copies of messages of other topics (the stateful
    /// half of a join, reading an intermediate topic) returns the original's
    /// coordinates, carried with the copy. Every copy of one original then counts as
    /// that one message: applied once, and re-emitting its stored outputs when it
    /// comes again. Copies may repeat and come back out of order (a re-key step that
    /// crashed publishes them again), so the fold skips a repeated origin within a
    /// batch instead of rejecting it as out of order.
    ///
    /// An error (a copy that carries no valid coordinates) fails the message through
    /// the error policy; such a message is never recorded in a state.
    fn origin(&self, message: &RawMessage) -> Result<Option<Origin>, ProcessError> {
        let _ = message;
        Ok(None)
    }

    /// Applies `messages` (all of state `id`, in offset order, none applied before) to
    /// `content`, decoding it once and encoding the result once.
    ///
    /// The messages' outputs are appended to `outputs`, message after message (one
    /// vector for a whole batch: no allocation per message).
    ///
    /// Returns an error only if the state content itself cannot be decoded or encoded;
    /// errors of single messages are reported per message in [`Applied::outcomes`].
    fn apply(
        &self,
        id: &PersistenceId,
        content: Option<&[u8]>,
        messages: &[&RawMessage],
        outputs: &mut Vec<EncodedRecord>,
    ) -> Result<Applied, ProcessError>;
}

/// A user function computing a persistence id from a decoded message.
pub type IdFunction<K, V> =
    dyn Fn(&Message<K, V>) -> Result<PersistenceId, FunctionError> + Send + Sync;

/// How a message is mapped to the key of its state.
pub enum PersistenceIdFn<K, V> {
    /// The raw message key as UTF-8 (no decoding; a null or non-UTF-8 key is an error).
    Key,
    /// A function of the decoded message.
    Custom(Arc<IdFunction<K, V>>),
}

impl<K, V> Clone for PersistenceIdFn<K, V> {
    fn clone(&self) -> Self {
        match self {
            Self::Key => Self::Key,
            Self::Custom(f) => Self::Custom(Arc::clone(f)),
        }
    }
}

impl<K, V> PersistenceIdFn<K, V> {
    /// The raw message key, as UTF-8.
    pub fn key() -> Self {
        Self::Key
    }

    /// A function of the decoded message.
    pub fn from_fn(
        f: impl Fn(&Message<K, V>) -> Result<PersistenceId, FunctionError> + Send + Sync + 'static,
    ) -> Self {
        Self::Custom(Arc::new(f))
    }

    fn resolve(
        &self,
        topic: &Topic<K, V>,
        raw: &RawMessage,
    ) -> Result<PersistenceId, ProcessError> {
        match self {
            Self::Key => {
                let key = raw.key.as_deref().ok_or(InvalidPersistenceId::Empty)?;
                Ok(PersistenceId::from_utf8(key)?)
            }
            Self::Custom(f) => Ok(f(&topic.decode(raw)?)?),
        }
    }
}

type IdFn = dyn Fn(&RawMessage) -> Result<PersistenceId, ProcessError> + Send + Sync;
/// Applies one message: returns the new state, its outputs appended to the vector (on
/// an error, some may have been appended: the caller drops them).
type ApplyFn<S> = dyn Fn(Option<&S>, &RawMessage, &mut Vec<EncodedRecord>) -> Result<S, ProcessError>
    + Send
    + Sync;

struct Handler<S> {
    id: Box<IdFn>,
    /// Whether `id` is the raw message key ([`PersistenceIdFn::Key`]).
    id_is_key: bool,
    apply: Box<ApplyFn<S>>,
}

/// Typed stateful functions sharing one state type `S`, one per input topic.
///
/// With one input topic this is a plain stateful function; with several (all writing
/// the same states) it is the stateful half of a join.
pub struct StatefulFunction<S, Start = MaybeState> {
    state_format: Arc<dyn Format<S>>,
    /// One handler per input topic, looked up twice a message: a list, not a map, as a
    /// function reads one topic or a few (comparing a short name beats hashing it).
    handlers: Vec<(Arc<str>, Handler<S>)>,
    /// The output topics declared by the handlers.
    outputs: Vec<Arc<str>>,
    /// The state a key starts from, for handlers that take `&S`.
    initial: Option<Arc<InitialFn<S>>>,
    start: PhantomData<fn() -> Start>,
}

type InitialFn<S> = dyn Fn() -> S + Send + Sync;

/// Handlers of a [`StatefulFunction`] built with [`StatefulFunction::new`] receive
/// `Option<&S>`: `None` before a key's first message.
#[derive(Debug)]
pub enum MaybeState {}

/// Handlers of a [`StatefulFunction`] given an initial state
/// ([`StatefulFunction::starting_with`], [`StatefulFunction::starting_from_default`])
/// receive `&S`: the initial state before a key's first message.
#[derive(Debug)]
pub enum InitialState {}

impl<S: Send + Sync + 'static> StatefulFunction<S> {
    /// A function whose state is encoded with `state_format`; add one handler per input
    /// topic with [`one_to_one`](Self::one_to_one), [`one_to_two`](Self::one_to_two) or
    /// [`one_to_many`](Self::one_to_many). Handlers receive `Option<&S>` (`None` before
    /// a key's first message) unless an initial state is given first.
    pub fn new(state_format: impl Format<S> + 'static) -> Self {
        Self {
            state_format: Arc::new(state_format),
            handlers: Vec::new(),
            outputs: Vec::new(),
            initial: None,
            start: PhantomData,
        }
    }

    /// Every key starts from `initial()`: handlers added after this receive `&S`.
    ///
    /// ```
    /// use flows_core::{Json, Record, Topic, Utf8};
    /// use flows_core::function::{PersistenceIdFn, StatefulFunction};
    ///
    /// let count = StatefulFunction::new(Json::<i64>::new())
    ///     .starting_from_default()
    ///     .one_to_one(
    ///         Topic::new("words", Utf8, Utf8),
    ///         Topic::new("word-counts", Utf8, Json::<i64>::new()),
    ///         PersistenceIdFn::key(),
    ///         |count: &i64, word| Ok((count + 1, Record::new(word.key, count + 1))),
    ///     );
    /// ```
    pub fn starting_with(
        self,
        initial: impl Fn() -> S + Send + Sync + 'static,
    ) -> StatefulFunction<S, InitialState> {
        assert!(
            self.handlers.is_empty(),
            "StatefulFunction: give the initial state before adding handlers"
        );
        StatefulFunction {
            initial: Some(Arc::new(initial)),
            ..self.retyped()
        }
    }

    /// Every key starts from `S::default()`: handlers added after this receive `&S`.
    pub fn starting_from_default(self) -> StatefulFunction<S, InitialState>
    where
        S: Default,
    {
        self.starting_with(S::default)
    }
}

impl<S: Send + Sync + 'static, Start> StatefulFunction<S, Start> {
    /// The same function under another handler signature.
    fn retyped<To>(self) -> StatefulFunction<S, To> {
        StatefulFunction {
            state_format: self.state_format,
            handlers: self.handlers,
            outputs: self.outputs,
            initial: self.initial,
            start: PhantomData,
        }
    }

    fn handler<IK: 'static, IV: 'static>(
        mut self,
        outputs: Vec<Arc<str>>,
        input: Topic<IK, IV>,
        id: PersistenceIdFn<IK, IV>,
        apply: impl Fn(
            Option<&S>,
            Message<IK, IV>,
            Option<i64>,
            &mut Vec<EncodedRecord>,
        ) -> Result<S, ProcessError>
        + Send
        + Sync
        + 'static,
    ) -> Self {
        assert!(
            !self
                .handlers
                .iter()
                .any(|(topic, _)| **topic == *input.name()),
            "StatefulFunction: topic {:?} has two handlers; each input topic takes one",
            input.name()
        );
        self.outputs.extend(outputs);
        let id_topic = input.clone();
        let decoder = input.clone();
        let id_is_key = matches!(id, PersistenceIdFn::Key);
        self.handlers.push((
            input.shared_name(),
            Handler {
                id: Box::new(move |raw| id.resolve(&id_topic, raw)),
                id_is_key,
                apply: Box::new(move |state, raw, outputs| {
                    apply(state, decoder.decode(raw)?, raw.timestamp, outputs)
                }),
            },
        ));
        self
    }

    fn handler_for(&self, message: &RawMessage) -> Result<&Handler<S>, ProcessError> {
        self.handlers
            .iter()
            .find(|(topic, _)| *topic == message.topic)
            .map(|(_, handler)| handler)
            .ok_or_else(|| ProcessError::UnknownTopic(message.topic.to_string()))
    }
}

impl<S: Send + Sync + 'static> StatefulFunction<S, MaybeState> {
    /// Handles `input` with a function emitting exactly one record on `output`.
    pub fn one_to_one<IK: 'static, IV: 'static, OK: 'static, OV: 'static>(
        self,
        input: Topic<IK, IV>,
        output: Topic<OK, OV>,
        id: PersistenceIdFn<IK, IV>,
        f: impl Fn(Option<&S>, Message<IK, IV>) -> Result<(S, Record<OK, OV>), FunctionError>
        + Send
        + Sync
        + 'static,
    ) -> Self {
        self.handler(
            vec![output.shared_name()],
            input,
            id,
            move |state, message, ts, outputs| {
                let (state, record) = f(state, message)?;
                outputs.push(output.encode(record, ts)?);
                Ok(state)
            },
        )
    }

    /// Handles `input` with a function emitting at most one record on each of two outputs.
    #[allow(clippy::type_complexity)]
    pub fn one_to_two<
        IK: 'static,
        IV: 'static,
        OK1: 'static,
        OV1: 'static,
        OK2: 'static,
        OV2: 'static,
    >(
        self,
        input: Topic<IK, IV>,
        first: Topic<OK1, OV1>,
        second: Topic<OK2, OV2>,
        id: PersistenceIdFn<IK, IV>,
        f: impl Fn(
            Option<&S>,
            Message<IK, IV>,
        )
            -> Result<(S, Option<Record<OK1, OV1>>, Option<Record<OK2, OV2>>), FunctionError>
        + Send
        + Sync
        + 'static,
    ) -> Self {
        let outputs = vec![first.shared_name(), second.shared_name()];
        self.handler(outputs, input, id, move |state, message, ts, out| {
            let (state, a, b) = f(state, message)?;
            if let Some(a) = a {
                out.push(first.encode(a, ts)?);
            }
            if let Some(b) = b {
                out.push(second.encode(b, ts)?);
            }
            Ok(state)
        })
    }

    /// Handles `input` with a function emitting any number of records on `output`.
    pub fn one_to_many<IK: 'static, IV: 'static, OK: 'static, OV: 'static>(
        self,
        input: Topic<IK, IV>,
        output: Topic<OK, OV>,
        id: PersistenceIdFn<IK, IV>,
        f: impl Fn(Option<&S>, Message<IK, IV>) -> Result<(S, Vec<Record<OK, OV>>), FunctionError>
        + Send
        + Sync
        + 'static,
    ) -> Self {
        self.handler(
            vec![output.shared_name()],
            input,
            id,
            move |state, message, ts, out| {
                let (state, records) = f(state, message)?;
                out.reserve(records.len());
                for record in records {
                    out.push(output.encode(record, ts)?);
                }
                Ok(state)
            },
        )
    }
}

impl<S: Send + Sync + 'static> StatefulFunction<S, InitialState> {
    /// The state a key starts from.
    fn initial(&self) -> Arc<InitialFn<S>> {
        match &self.initial {
            Some(initial) => Arc::clone(initial),
            // Only `starting_with` makes this type, and it sets the initial state.
            None => unreachable!("a StatefulFunction<_, InitialState> has an initial state"),
        }
    }

    /// Handles `input` with a function emitting exactly one record on `output`.
    pub fn one_to_one<IK: 'static, IV: 'static, OK: 'static, OV: 'static>(
        self,
        input: Topic<IK, IV>,
        output: Topic<OK, OV>,
        id: PersistenceIdFn<IK, IV>,
        f: impl Fn(&S, Message<IK, IV>) -> Result<(S, Record<OK, OV>), FunctionError>
        + Send
        + Sync
        + 'static,
    ) -> Self {
        let initial = self.initial();
        self.retyped::<MaybeState>()
            .one_to_one(input, output, id, move |state, message| {
                with_initial(state, &*initial, |state| f(state, message))
            })
            .retyped()
    }

    /// Handles `input` with a function emitting at most one record on each of two outputs.
    #[allow(clippy::type_complexity)]
    pub fn one_to_two<
        IK: 'static,
        IV: 'static,
        OK1: 'static,
        OV1: 'static,
        OK2: 'static,
        OV2: 'static,
    >(
        self,
        input: Topic<IK, IV>,
        first: Topic<OK1, OV1>,
        second: Topic<OK2, OV2>,
        id: PersistenceIdFn<IK, IV>,
        f: impl Fn(
            &S,
            Message<IK, IV>,
        )
            -> Result<(S, Option<Record<OK1, OV1>>, Option<Record<OK2, OV2>>), FunctionError>
        + Send
        + Sync
        + 'static,
    ) -> Self {
        let initial = self.initial();
        self.retyped::<MaybeState>()
            .one_to_two(input, first, second, id, move |state, message| {
                with_initial(state, &*initial, |state| f(state, message))
            })
            .retyped()
    }

    /// Handles `input` with a function emitting any number of records on `output`.
    pub fn one_to_many<IK: 'static, IV: 'static, OK: 'static, OV: 'static>(
        self,
        input: Topic<IK, IV>,
        output: Topic<OK, OV>,
        id: PersistenceIdFn<IK, IV>,
        f: impl Fn(&S, Message<IK, IV>) -> Result<(S, Vec<Record<OK, OV>>), FunctionError>
        + Send
        + Sync
        + 'static,
    ) -> Self {
        let initial = self.initial();
        self.retyped::<MaybeState>()
            .one_to_many(input, output, id, move |state, message| {
                with_initial(state, &*initial, |state| f(state, message))
            })
            .retyped()
    }
}

/// Runs `f` on the stored state, or on a fresh initial one before a key's first message.
fn with_initial<S, T>(state: Option<&S>, initial: &InitialFn<S>, f: impl FnOnce(&S) -> T) -> T {
    match state {
        Some(state) => f(state),
        None => f(&initial()),
    }
}

impl<S: Send + Sync + 'static, Start> StatefulProcessor for StatefulFunction<S, Start> {
    fn input_topics(&self) -> Vec<Arc<str>> {
        let mut topics: Vec<_> = self.handlers.iter().map(|(t, _)| Arc::clone(t)).collect();
        topics.sort();
        topics
    }

    fn output_topics(&self) -> Vec<Arc<str>> {
        let mut topics = self.outputs.clone();
        topics.sort();
        topics.dedup();
        topics
    }

    fn persistence_id(&self, message: &RawMessage) -> Result<PersistenceId, ProcessError> {
        (self.handler_for(message)?.id)(message)
    }

    fn id_is_key<'m>(&self, message: &'m RawMessage) -> Option<&'m [u8]> {
        let handler = self.handler_for(message).ok()?;
        if handler.id_is_key {
            message.key.as_deref()
        } else {
            None
        }
    }

    fn apply(
        &self,
        id: &PersistenceId,
        content: Option<&[u8]>,
        messages: &[&RawMessage],
        outputs: &mut Vec<EncodedRecord>,
    ) -> Result<Applied, ProcessError> {
        let state_error = |source| ProcessError::StateFormat {
            id: id.clone(),
            source,
        };
        let mut state = content
            .map(|bytes| self.state_format.decode(bytes))
            .transpose()
            .map_err(state_error)?;
        let mut changed = false;
        let outcomes = messages
            .iter()
            .map(|message| {
                let before = outputs.len();
                let next = self
                    .handler_for(message)
                    .and_then(|handler| (handler.apply)(state.as_ref(), message, outputs));
                match next {
                    Ok(next) => {
                        state = Some(next);
                        changed = true;
                        Ok(outputs.len() - before)
                    }
                    Err(error) => {
                        // A record encoded before the failure is not an output.
                        outputs.truncate(before);
                        Err(error)
                    }
                }
            })
            .collect();
        let content = match (changed, &state) {
            (true, Some(state)) => Some(self.state_format.encode(state).map_err(state_error)?),
            _ => None,
        };
        Ok(Applied { content, outcomes })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::{Json, Utf8};

    fn counter() -> StatefulFunction<i64> {
        StatefulFunction::new(Json::<i64>::new()).one_to_one(
            Topic::new("words", Utf8, Utf8),
            Topic::new("counts", Utf8, Json::<i64>::new()),
            PersistenceIdFn::key(),
            |count, word| {
                if word.value == "boom" {
                    return Err(FunctionError::new("boom"));
                }
                let count = count.copied().unwrap_or(0) + 1;
                Ok((count, Record::new(word.key, count)))
            },
        )
    }

    fn word(offset: i64, w: &str) -> RawMessage {
        RawMessage::raw("words", 0, offset, Some(w.as_bytes()), Some(w.as_bytes()))
    }

    /// A key's first message meets the initial state; later ones the stored state.
    #[test]
    fn an_initial_state_starts_every_key() {
        let f = StatefulFunction::new(Json::<Vec<String>>::new())
            .starting_with(|| vec!["start".to_owned()])
            .one_to_one(
                Topic::new("words", Utf8, Utf8),
                Topic::new("seen", Utf8, Json::<usize>::new()),
                PersistenceIdFn::key(),
                |seen: &Vec<String>, word| {
                    let mut seen = seen.clone();
                    seen.push(word.value);
                    let n = seen.len();
                    Ok((seen, Record::new(word.key, n)))
                },
            );
        let id = PersistenceId::new("a").unwrap();
        let fresh = f
            .apply(&id, None, &[&word(0, "a")], &mut Vec::new())
            .unwrap();
        assert_eq!(fresh.content.as_deref(), Some(&br#"["start","a"]"#[..]));
        let stored = f
            .apply(&id, Some(br#"["x"]"#), &[&word(1, "a")], &mut Vec::new())
            .unwrap();
        assert_eq!(stored.content.as_deref(), Some(&br#"["x","a"]"#[..]));
        let counted = StatefulFunction::new(Json::<i64>::new())
            .starting_from_default()
            .one_to_many(
                Topic::new("words", Utf8, Utf8),
                Topic::new("counts", Utf8, Json::<i64>::new()),
                PersistenceIdFn::key(),
                |count: &i64, _| Ok((count + 1, Vec::new())),
            );
        let applied = counted
            .apply(&id, None, &[&word(0, "a"), &word(1, "a")], &mut Vec::new())
            .unwrap();
        assert_eq!(applied.content.as_deref(), Some(&b"2"[..]));
    }

    #[test]
    #[should_panic(expected = "topic \"words\" has two handlers")]
    fn two_handlers_for_one_topic_are_refused_when_built() {
        let handle = |count: Option<&i64>, word: Message<String, String>| {
            Ok((count.copied().unwrap_or(0), Record::new(word.key, 0)))
        };
        let words = Topic::new("words", Utf8, Utf8);
        let counts = Topic::new("counts", Utf8, Json::<i64>::new());
        let _ = StatefulFunction::new(Json::<i64>::new())
            .one_to_one(
                words.clone(),
                counts.clone(),
                PersistenceIdFn::key(),
                handle,
            )
            .one_to_one(words, counts, PersistenceIdFn::key(), handle);
    }

    #[test]
    fn folding_decodes_and_encodes_the_state_once_and_skips_failed_messages() {
        let f = counter();
        let id = PersistenceId::new("a").unwrap();
        let (m1, m2, m3) = (word(0, "a"), word(1, "boom"), word(2, "a"));
        let mut outputs = Vec::new();
        let applied = f
            .apply(&id, Some(b"5"), &[&m1, &m2, &m3], &mut outputs)
            .unwrap();
        assert_eq!(applied.content.as_deref(), Some(&b"7"[..]));
        let counts: Vec<_> = applied.outcomes.iter().map(|o| o.as_ref().ok()).collect();
        assert_eq!(counts, [Some(&1), None, Some(&1)]);
        let values: Vec<_> = outputs.iter().map(|r| r.value.as_deref()).collect();
        assert_eq!(values, [Some(&b"6"[..]), Some(&b"7"[..])]);
    }

    /// Text that refuses to encode "unencodable".
    struct Picky;

    impl Format<String> for Picky {
        fn name(&self) -> &'static str {
            "picky"
        }
        fn encode(&self, value: &String) -> Result<Vec<u8>, crate::format::FormatError> {
            if value == "unencodable" {
                return Err(crate::format::FormatError::Custom {
                    format: "picky",
                    message: "refused".into(),
                });
            }
            Ok(value.clone().into_bytes())
        }
        fn decode(&self, bytes: &[u8]) -> Result<String, crate::format::FormatError> {
            Utf8.decode(bytes)
        }
    }

    #[test]
    fn a_message_failing_after_some_outputs_keeps_none_of_them() {
        // The first output of "unencodable" encodes, the second fails: the message must
        // fail with no outputs at all, and the messages around it keep theirs.
        let f = StatefulFunction::new(Json::<i64>::new()).one_to_two(
            Topic::new("words", Utf8, Utf8),
            Topic::new("counts", Utf8, Json::<i64>::new()),
            Topic::new("echo", Utf8, Picky),
            PersistenceIdFn::key(),
            |count: Option<&i64>, word| {
                let count = count.copied().unwrap_or(0) + 1;
                let echo = Record::new(word.key.clone(), word.value);
                Ok((count, Some(Record::new(word.key, count)), Some(echo)))
            },
        );
        let id = PersistenceId::new("a").unwrap();
        let (m1, m2, m3) = (word(0, "a"), word(1, "unencodable"), word(2, "a"));
        let mut outputs = Vec::new();
        let applied = f.apply(&id, None, &[&m1, &m2, &m3], &mut outputs).unwrap();
        let counts: Vec<Option<usize>> = applied
            .outcomes
            .iter()
            .map(|o| o.as_ref().ok().copied())
            .collect();
        assert_eq!(counts, [Some(2), None, Some(2)]);
        assert_eq!(
            outputs.len(),
            4,
            "the failed message's first output is dropped"
        );
        assert_eq!(applied.content.as_deref(), Some(&b"2"[..]));
    }

    #[test]
    fn nothing_applied_means_no_new_content() {
        let f = counter();
        let id = PersistenceId::new("a").unwrap();
        let applied = f
            .apply(&id, Some(b"5"), &[&word(0, "boom")], &mut Vec::new())
            .unwrap();
        assert_eq!(applied.content, None);
    }

    #[test]
    fn corrupt_state_content_is_a_state_format_error() {
        let f = counter();
        let id = PersistenceId::new("a").unwrap();
        let err = f
            .apply(&id, Some(b"not json"), &[&word(0, "a")], &mut Vec::new())
            .unwrap_err();
        assert_eq!(err.kind(), "state-format");
    }

    #[test]
    fn null_or_non_utf8_keys_are_rejected_by_the_key_id_function() {
        let f = counter();
        let null = RawMessage::raw("words", 0, 0, None, Some(b"x"));
        assert_eq!(
            f.persistence_id(&null).unwrap_err().kind(),
            "persistence-id"
        );
        let binary = RawMessage::raw("words", 0, 0, Some(&[0xff]), Some(b"x"));
        assert_eq!(
            f.persistence_id(&binary).unwrap_err().kind(),
            "persistence-id"
        );
    }

    #[test]
    fn only_a_key_id_function_lends_the_key() {
        let by_key = counter();
        assert_eq!(by_key.id_is_key(&word(0, "a")), Some(&b"a"[..]));
        let other_topic = RawMessage::raw("other", 0, 0, Some(b"a"), Some(b"a"));
        assert_eq!(by_key.id_is_key(&other_topic), None);
        let by_value = StatefulFunction::new(Json::<i64>::new()).one_to_one(
            Topic::new("words", Utf8, Utf8),
            Topic::new("counts", Utf8, Json::<i64>::new()),
            PersistenceIdFn::from_fn(|m: &Message<String, String>| {
                Ok(PersistenceId::new(&m.value)?)
            }),
            |count: Option<&i64>, word| {
                Ok((count.copied().unwrap_or(0) + 1, Record::new(word.key, 1)))
            },
        );
        assert_eq!(by_value.id_is_key(&word(0, "a")), None);
    }

    #[test]
    fn a_join_shares_one_state_across_input_topics() {
        let id_fn = || {
            PersistenceIdFn::from_fn(|m: &Message<String, String>| {
                Ok(PersistenceId::new(&m.value)?)
            })
        };
        let out = Topic::new("joined", Utf8, Utf8);
        let f = StatefulFunction::new(Utf8)
            .one_to_one(
                Topic::new("left", Utf8, Utf8),
                out.clone(),
                id_fn(),
                |s, m| {
                    let s = format!("{}L{}", s.map_or("", String::as_str), m.key);
                    Ok((s.clone(), Record::new(m.value, s)))
                },
            )
            .one_to_one(Topic::new("right", Utf8, Utf8), out, id_fn(), |s, m| {
                let s = format!("{}R{}", s.map_or("", String::as_str), m.key);
                Ok((s.clone(), Record::new(m.value, s)))
            });
        let l = RawMessage::raw("left", 0, 0, Some(b"1"), Some(b"x"));
        let r = RawMessage::raw("right", 0, 0, Some(b"2"), Some(b"x"));
        assert_eq!(f.persistence_id(&l).unwrap(), f.persistence_id(&r).unwrap());
        let id = f.persistence_id(&l).unwrap();
        let applied = f.apply(&id, None, &[&l, &r], &mut Vec::new()).unwrap();
        assert_eq!(applied.content.as_deref(), Some(&b"L1R2"[..]));
    }
}
