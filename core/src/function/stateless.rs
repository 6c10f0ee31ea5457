//! Stateless functions: filter, map (one-to-one), one-to-two, explode (one-to-many), and
//! merging several input topics into one function.
//!
//! ```
//! use flows_core::{Record, RawMessage, Topic, Utf8};
//! use flows_core::function::{StatelessFunction, StatelessProcessor};
//!
//! let lines = Topic::new("lines", Utf8, Utf8);
//! let words = Topic::new("words", Utf8, Utf8);
//! let split = StatelessFunction::explode(lines, words, |m| {
//!     Ok(m.value.split_whitespace().map(|w| Record::new(w.to_owned(), w.to_owned())).collect())
//! });
//! let out = split.process(&RawMessage::raw("lines", 0, 0, Some(b"k"), Some(b"a b"))).unwrap();
//! assert_eq!(out.len(), 2);
//! ```

use std::sync::Arc;

use crate::function::{FunctionError, ProcessError};
use crate::message::{Message, RawMessage, Record};
use crate::state::EncodedRecord;
use crate::topic::Topic;

/// A stateless function over raw messages: what an engine runs.
pub trait StatelessProcessor: Send + Sync {
    /// Topics this function reads.
    fn input_topics(&self) -> Vec<Arc<str>>;

    /// The topics it writes, as declared (for describing the dataflow; the dead-letter
    /// topic is the pipeline's). Empty when unknown.
    fn output_topics(&self) -> Vec<Arc<str>> {
        Vec::new()
    }

    /// Processes one message into zero or more encoded outputs, in order.
    fn process(&self, message: &RawMessage) -> Result<Vec<EncodedRecord>, ProcessError>;
}

type ErasedStateless =
    dyn Fn(&RawMessage) -> Result<Vec<EncodedRecord>, ProcessError> + Send + Sync;

/// A typed stateless function wrapped into a [`StatelessProcessor`], routing each input
/// topic to its handler.
pub struct StatelessFunction {
    /// Each input topic's handler. A list, as a stateful function's: a function reads
    /// one topic or a few, and comparing a message's topic name costs less than hashing it.
    handlers: Vec<(Arc<str>, Arc<ErasedStateless>)>,
    /// The output topics declared by the constructors.
    outputs: Vec<Arc<str>>,
}

impl StatelessFunction {
    fn single(topic: Arc<str>, outputs: Vec<Arc<str>>, handler: Arc<ErasedStateless>) -> Self {
        Self {
            handlers: vec![(topic, handler)],
            outputs,
        }
    }

    /// Passes through the messages of `input` for which `predicate` holds, unchanged
    /// (same key, value, headers and timestamp bytes), to the topic named `output`.
    pub fn filter<K: 'static, V: 'static>(
        input: Topic<K, V>,
        output: impl Into<Arc<str>>,
        predicate: impl Fn(&Message<K, V>) -> bool + Send + Sync + 'static,
    ) -> Self {
        let output: Arc<str> = output.into();
        let decoder = input.clone();
        Self::single(
            input.shared_name(),
            vec![Arc::clone(&output)],
            Arc::new(move |raw: &RawMessage| {
                let message = decoder.decode(raw)?;
                Ok(if predicate(&message) {
                    vec![EncodedRecord {
                        topic: Arc::clone(&output),
                        partition: None,
                        key: raw.key.clone(),
                        value: raw.value.clone(),
                        headers: raw.headers.clone(),
                        timestamp: raw.timestamp,
                    }]
                } else {
                    Vec::new()
                })
            }),
        )
    }

    /// Maps every message of `input` to exactly one record on `output`.
    pub fn one_to_one<IK: 'static, IV: 'static, OK: 'static, OV: 'static>(
        input: Topic<IK, IV>,
        output: Topic<OK, OV>,
        f: impl Fn(Message<IK, IV>) -> Result<Record<OK, OV>, FunctionError> + Send + Sync + 'static,
    ) -> Self {
        Self::explode(input, output, move |m| f(m).map(|r| vec![r]))
    }

    /// Maps every message of `input` to at most one record on each of two outputs.
    #[allow(clippy::type_complexity)]
    pub fn one_to_two<
        IK: 'static,
        IV: 'static,
        OK1: 'static,
        OV1: 'static,
        OK2: 'static,
        OV2: 'static,
    >(
        input: Topic<IK, IV>,
        first: Topic<OK1, OV1>,
        second: Topic<OK2, OV2>,
        f: impl Fn(
            Message<IK, IV>,
        )
            -> Result<(Option<Record<OK1, OV1>>, Option<Record<OK2, OV2>>), FunctionError>
        + Send
        + Sync
        + 'static,
    ) -> Self {
        let decoder = input.clone();
        Self::single(
            input.shared_name(),
            vec![first.shared_name(), second.shared_name()],
            Arc::new(move |raw: &RawMessage| {
                let (a, b) = f(decoder.decode(raw)?)?;
                let mut out = Vec::with_capacity(2);
                if let Some(a) = a {
                    out.push(first.encode(a, raw.timestamp)?);
                }
                if let Some(b) = b {
                    out.push(second.encode(b, raw.timestamp)?);
                }
                Ok(out)
            }),
        )
    }

    /// Explodes every message of `input` into any number of records on `output`.
    pub fn explode<IK: 'static, IV: 'static, OK: 'static, OV: 'static>(
        input: Topic<IK, IV>,
        output: Topic<OK, OV>,
        f: impl Fn(Message<IK, IV>) -> Result<Vec<Record<OK, OV>>, FunctionError>
        + Send
        + Sync
        + 'static,
    ) -> Self {
        let decoder = input.clone();
        Self::single(
            input.shared_name(),
            vec![output.shared_name()],
            Arc::new(move |raw: &RawMessage| {
                f(decoder.decode(raw)?)?
                    .into_iter()
                    .map(|r| output.encode(r, raw.timestamp).map_err(ProcessError::from))
                    .collect()
            }),
        )
    }

    /// Runs `f` on every message of `input` for its side effects (calling an external
    /// party, printing), publishing nothing. Like every stateless function it runs at
    /// least once per message: after a crash, a message may be seen again.
    ///
    /// ```
    /// use flows_core::{Topic, Utf8};
    /// use flows_core::function::{StatelessFunction, StatelessProcessor};
    ///
    /// let print = StatelessFunction::for_each(Topic::new("word-counts", Utf8, Utf8), |m| {
    ///     println!("{} {}", m.key, m.value);
    ///     Ok(())
    /// });
    /// assert!(print.output_topics().is_empty());
    /// ```
    pub fn for_each<K: 'static, V: 'static>(
        input: Topic<K, V>,
        f: impl Fn(Message<K, V>) -> Result<(), FunctionError> + Send + Sync + 'static,
    ) -> Self {
        let decoder = input.clone();
        Self::single(
            input.shared_name(),
            Vec::new(),
            Arc::new(move |raw: &RawMessage| {
                f(decoder.decode(raw)?)?;
                Ok(Vec::new())
            }),
        )
    }

    /// Merges several input topics of the same types into one function.
    pub fn merge<IK: 'static, IV: 'static, OK: 'static, OV: 'static>(
        inputs: Vec<Topic<IK, IV>>,
        output: Topic<OK, OV>,
        f: impl Fn(Message<IK, IV>) -> Result<Vec<Record<OK, OV>>, FunctionError>
        + Send
        + Sync
        + 'static,
    ) -> Self {
        let f = Arc::new(f);
        let mut merged = Self {
            handlers: Vec::new(),
            outputs: Vec::new(),
        };
        for input in inputs {
            let f = Arc::clone(&f);
            merged = merged.and(Self::explode(input, output.clone(), move |m| f(m)));
        }
        merged
    }

    /// Combines two functions into one that routes each message by its topic, e.g. to
    /// merge topics of different types into one output.
    ///
    /// # Panics
    ///
    /// When both handle the same topic: each input topic takes one handler.
    pub fn and(mut self, other: StatelessFunction) -> Self {
        for (topic, _) in &other.handlers {
            assert!(
                !self.handlers.iter().any(|(known, _)| known == topic),
                "StatelessFunction: topic {topic:?} has two handlers; each input topic takes one"
            );
        }
        self.handlers.extend(other.handlers);
        self.outputs.extend(other.outputs);
        self
    }
}

impl StatelessProcessor for StatelessFunction {
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

    fn process(&self, message: &RawMessage) -> Result<Vec<EncodedRecord>, ProcessError> {
        let (_, handler) = self
            .handlers
            .iter()
            .find(|(topic, _)| *topic == message.topic)
            .ok_or_else(|| ProcessError::UnknownTopic(message.topic.to_string()))?;
        handler(message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[should_panic(expected = "has two handlers")]
    fn combining_two_handlers_of_one_topic_is_refused() {
        let words = Topic::new("words", Utf8, Utf8);
        let echo = || {
            StatelessFunction::one_to_one(words.clone(), Topic::new("out", Utf8, Utf8), |m| {
                Ok(Record::new(m.key, m.value))
            })
        };
        let _ = echo().and(echo());
    }
    use crate::format::{Json, Utf8};

    fn raw(topic: &str, offset: i64, key: &str, value: &[u8]) -> RawMessage {
        let mut m = RawMessage::raw(topic, 0, offset, Some(key.as_bytes()), Some(value));
        m.timestamp = Some(1_000 + offset);
        m.headers.append("h", Some(b"1".to_vec()));
        m
    }

    #[test]
    fn filter_passes_matching_messages_through_byte_for_byte() {
        let f =
            StatelessFunction::filter(Topic::new("in", Utf8, Utf8), "out", |m| m.value.len() > 2);
        let kept = raw("in", 1, "k", b"long");
        let out = f.process(&kept).unwrap();
        assert_eq!(out.len(), 1);
        assert_eq!(&*out[0].topic, "out");
        assert_eq!(out[0].value, kept.value);
        assert_eq!(out[0].headers, kept.headers);
        assert_eq!(out[0].timestamp, Some(1_001));
        assert!(f.process(&raw("in", 2, "k", b"no")).unwrap().is_empty());
    }

    #[test]
    fn one_to_one_encodes_with_the_output_formats() {
        let f = StatelessFunction::one_to_one(
            Topic::new("in", Utf8, Utf8),
            Topic::new("lengths", Utf8, Json::<usize>::new()),
            |m| Ok(Record::new(m.key, m.value.len())),
        );
        let out = f.process(&raw("in", 0, "k", b"abc")).unwrap();
        assert_eq!(out[0].value.as_deref(), Some(&b"3"[..]));
        assert_eq!(out[0].key.as_deref(), Some(&b"k"[..]));
    }

    #[test]
    fn one_to_two_emits_each_side_optionally() {
        let f = StatelessFunction::one_to_two(
            Topic::new("in", Utf8, Utf8),
            Topic::new("even", Utf8, Utf8),
            Topic::new("odd", Utf8, Utf8),
            |m| {
                let even = m.value.len() % 2 == 0;
                let r = Record::new(m.key, m.value);
                Ok(if even {
                    (Some(r), None)
                } else {
                    (None, Some(r))
                })
            },
        );
        assert_eq!(
            f.process(&raw("in", 0, "k", b"ab")).unwrap()[0]
                .topic
                .as_ref(),
            "even"
        );
        assert_eq!(
            f.process(&raw("in", 0, "k", b"abc")).unwrap()[0]
                .topic
                .as_ref(),
            "odd"
        );
    }

    #[test]
    fn undecodable_input_and_failing_functions_are_typed_errors() {
        let f = StatelessFunction::one_to_one(
            Topic::new("in", Utf8, Json::<i64>::new()),
            Topic::new("out", Utf8, Json::<i64>::new()),
            |m| {
                if m.value < 0 {
                    Err(FunctionError::new("negative"))
                } else {
                    Ok(Record::new(m.key, m.value))
                }
            },
        );
        let err = f.process(&raw("in", 0, "k", b"{")).unwrap_err();
        assert_eq!(err.kind(), "decode");
        let err = f.process(&raw("in", 0, "k", b"-1")).unwrap_err();
        assert_eq!(err.kind(), "function");
        let err = f.process(&raw("elsewhere", 0, "k", b"1")).unwrap_err();
        assert_eq!(err.kind(), "unknown-topic");
    }

    #[test]
    fn merge_routes_every_input_topic_to_the_function() {
        let f = StatelessFunction::merge(
            vec![Topic::new("a", Utf8, Utf8), Topic::new("b", Utf8, Utf8)],
            Topic::new("all", Utf8, Utf8),
            |m| Ok(vec![Record::new(m.key, format!("{}:{}", m.topic, m.value))]),
        );
        assert_eq!(
            f.input_topics(),
            vec![Arc::<str>::from("a"), Arc::from("b")]
        );
        let out = f.process(&raw("b", 0, "k", b"x")).unwrap();
        assert_eq!(out[0].value.as_deref(), Some(&b"b:x"[..]));
    }
}
