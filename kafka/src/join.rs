//! Joins: several source topics, one shared state per persistence id.
//!
//! As in the seed (its "option 2"), a join is two pipelines:
//! 1. a stateless *re-key* pipeline copies every message of every source topic into one
//!    intermediate topic, keyed by the message's persistence id (so all messages of one
//!    state meet in one partition, in one order) and tagged with its source topic and
//!    original key;
//! 2. a stateful pipeline over the intermediate topic restores each message as it was
//!    on its source topic and applies the handler registered for that topic, all
//!    handlers sharing one state.
//!
//! No transaction spans the sources, and the intermediate topic may have more
//! partitions than the sources. [`Join::rekey_pipeline`] is the standard mapper; a
//! custom one writes its records with [`intermediate_record`].
//!
//! # Exactly once across re-key replays
//! A re-key step that crashes after publishing and before committing publishes the
//! same source messages again. Every intermediate record therefore carries its source
//! message's topic, partition and offset, and the stateful half records progress and
//! last results under those coordinates ([`StatefulProcessor::origin`]): a copy of a
//! source message already applied is skipped, or re-emits the stored outputs byte for
//! byte if the last write applied it, however many copies there are and whichever
//! intermediate partition they land in.
//!
//! This relies on each producer session writing one intermediate partition without
//! gaps (the idempotent producer's guarantee, which the re-key pipeline strengthens by
//! never timing a record out: see [`Join::rekey_pipeline_with`]). A record the broker
//! refuses for good (larger than the topic's `max.message.bytes`, say) goes through the
//! re-key pipeline's error policy; with the stop policy, a later fix on the broker lets
//! that record through after later ones of its state, which the stateful half would
//! take for a copy: dead-letter it instead, and replay it from the dead-letter topic.
//!
//! Do not add partitions to the intermediate topic while a join runs: a state's
//! messages would then be split between two partitions, as with any keyed Kafka topic.
//!
//! Upgrading from a version of flows whose intermediate records had no source partition
//! and offset: let the stateful half drain the intermediate topic first, then upgrade
//! both halves. Such records carry no origin, so the upgraded stateful half sends them
//! through its error policy, and states keep the progress they recorded under the
//! intermediate topic's offsets, which copies under source offsets would not match.

use std::sync::Arc;

use flows_core::function::stateful::Applied;
use flows_core::function::{Origin, StatefulProcessor, StatelessProcessor};
use flows_core::{
    EncodedRecord, Headers, InvalidPersistenceId, PersistenceId, ProcessError, RawMessage,
    SingleStateRepository, TopicPartition,
};

use crate::pipeline::Pipeline;

/// Header carrying the source topic of an intermediate message.
pub const SOURCE_TOPIC_HEADER: &str = "flows.join.source-topic";
/// Header carrying the original key of an intermediate message (absent value: null key).
pub const SOURCE_KEY_HEADER: &str = "flows.join.source-key";
/// Header carrying the source partition of an intermediate message (decimal text).
pub const SOURCE_PARTITION_HEADER: &str = "flows.join.source-partition";
/// Header carrying the source offset of an intermediate message (decimal text).
pub const SOURCE_OFFSET_HEADER: &str = "flows.join.source-offset";

/// A join of the source topics of a multi-handler
/// [`StatefulFunction`](flows_core::function::StatefulFunction) through an intermediate
/// topic.
///
/// ```
/// use flows_core::function::{PersistenceIdFn, StatefulFunction};
/// use flows_core::{Json, MemoryStateRepository, Record, Topic, Utf8};
/// use flows_kafka::Join;
///
/// let output = Topic::new("totals", Utf8, Json::<i64>::new());
/// let total = StatefulFunction::new(Json::<i64>::new())
///     .one_to_one(Topic::new("credits", Utf8, Json::<i64>::new()), output.clone(),
///         PersistenceIdFn::key(), |t: Option<&i64>, m| {
///             let t = t.copied().unwrap_or(0) + m.value;
///             Ok((t, Record::new(m.key, t)))
///         })
///     .one_to_one(Topic::new("debits", Utf8, Json::<i64>::new()), output,
///         PersistenceIdFn::key(), |t: Option<&i64>, m| {
///             let t = t.copied().unwrap_or(0) - m.value;
///             Ok((t, Record::new(m.key, t)))
///         });
/// let join = Join::new("balance", "balance-intermediate", total);
/// let rekey = join.rekey_pipeline();
/// let apply = join.stateful_pipeline(MemoryStateRepository::new());
/// assert_eq!(rekey.input_topics(), vec!["credits".to_owned(), "debits".to_owned()]);
/// assert_eq!(apply.input_topics(), vec!["balance-intermediate".to_owned()]);
/// ```
#[derive(Clone)]
pub struct Join {
    name: String,
    intermediate: Arc<str>,
    function: Arc<dyn StatefulProcessor>,
}

impl std::fmt::Debug for Join {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Join")
            .field("name", &self.name)
            .field("intermediate", &self.intermediate)
            .field("sources", &self.function.input_topics())
            .finish()
    }
}

impl Join {
    /// A join named `name` (the stateful pipeline's name; the re-key pipeline is
    /// `{name}-rekey`) of `function`'s input topics through `intermediate_topic`.
    pub fn new(
        name: impl Into<String>,
        intermediate_topic: impl Into<Arc<str>>,
        function: impl StatefulProcessor + 'static,
    ) -> Self {
        Self {
            name: name.into(),
            intermediate: intermediate_topic.into(),
            function: Arc::new(function),
        }
    }

    /// The intermediate topic.
    pub fn intermediate_topic(&self) -> &str {
        &self.intermediate
    }

    /// The standard re-key pipeline: each source message, bytes unchanged, keyed by the
    /// persistence id the function's handler for its topic computes.
    pub fn rekey_pipeline(&self) -> Pipeline {
        self.rekey_pipeline_with(StandardMapper {
            intermediate: Arc::clone(&self.intermediate),
            function: Arc::clone(&self.function),
        })
    }

    /// A re-key pipeline with a custom mapper, which must write to the intermediate
    /// topic with [`intermediate_record`], at most one record per state for each source
    /// message.
    ///
    /// Its producer never times a record out (`message.timeout.ms=0`): a record that
    /// timed out while a later one of its partition got through would reach the
    /// intermediate topic only after it, when republished, and look to the stateful half
    /// like a message already applied. While the broker is unreachable the step waits,
    /// as every pipeline does.
    pub fn rekey_pipeline_with(&self, mapper: impl StatelessProcessor + 'static) -> Pipeline {
        Pipeline::stateless(format!("{}-rekey", self.name), mapper)
            .producer_property("message.timeout.ms", "0")
    }

    /// The stateful pipeline over the intermediate topic, with its states in `store`.
    pub fn stateful_pipeline(&self, store: impl SingleStateRepository + 'static) -> Pipeline {
        Pipeline::stateful(
            self.name.clone(),
            Joined {
                intermediate: Arc::clone(&self.intermediate),
                function: Arc::clone(&self.function),
            },
            store,
        )
    }
}

/// The intermediate record of `message` for the state `id`: value, headers and
/// timestamp unchanged, key = `id`, the source topic, key, partition and offset in
/// headers (the stateful half restores the message from them, and recognises copies of
/// one source message by its coordinates).
pub fn intermediate_record(
    intermediate_topic: impl Into<Arc<str>>,
    id: &PersistenceId,
    message: &RawMessage,
) -> EncodedRecord {
    let headers = message
        .headers
        .clone()
        .with(SOURCE_TOPIC_HEADER, message.topic.as_bytes().to_vec())
        .with(SOURCE_KEY_HEADER, message.key.clone())
        .with(
            SOURCE_PARTITION_HEADER,
            message.partition.to_string().into_bytes(),
        )
        .with(
            SOURCE_OFFSET_HEADER,
            message.offset.to_string().into_bytes(),
        );
    EncodedRecord {
        topic: intermediate_topic.into(),
        partition: None,
        key: Some(id.as_str().as_bytes().to_vec()),
        value: message.value.clone(),
        headers,
        timestamp: message.timestamp,
    }
}

struct StandardMapper {
    intermediate: Arc<str>,
    function: Arc<dyn StatefulProcessor>,
}

impl StatelessProcessor for StandardMapper {
    fn input_topics(&self) -> Vec<Arc<str>> {
        self.function.input_topics()
    }

    fn output_topics(&self) -> Vec<Arc<str>> {
        vec![Arc::clone(&self.intermediate)]
    }

    fn process(&self, message: &RawMessage) -> Result<Vec<EncodedRecord>, ProcessError> {
        let id = self.function.persistence_id(message)?;
        Ok(vec![intermediate_record(
            Arc::clone(&self.intermediate),
            &id,
            message,
        )])
    }
}

/// The stateful half: reads the intermediate topic, applies each message as it was on
/// its source topic, and records it under its source coordinates.
struct Joined {
    intermediate: Arc<str>,
    function: Arc<dyn StatefulProcessor>,
}

/// Why an intermediate message cannot be restored.
fn invalid(intermediate: &str, header: &str) -> ProcessError {
    ProcessError::Origin(format!(
        "{intermediate} message without a valid {header} header (was it written with intermediate_record?)"
    ))
}

impl Joined {
    fn header<'m>(&self, message: &'m RawMessage, name: &str) -> Result<&'m str, ProcessError> {
        message
            .headers
            .first(name)
            .flatten()
            .and_then(|value| std::str::from_utf8(value).ok())
            .ok_or_else(|| invalid(&self.intermediate, name))
    }

    fn number<T: std::str::FromStr>(
        &self,
        message: &RawMessage,
        name: &str,
    ) -> Result<T, ProcessError> {
        self.header(message, name)?
            .parse()
            .map_err(|_| invalid(&self.intermediate, name))
    }

    /// The source message's coordinates.
    fn source(&self, message: &RawMessage) -> Result<Origin, ProcessError> {
        let topic = self.header(message, SOURCE_TOPIC_HEADER)?;
        let partition: i32 = self.number(message, SOURCE_PARTITION_HEADER)?;
        let offset: i64 = self.number(message, SOURCE_OFFSET_HEADER)?;
        if partition < 0 || offset < 0 {
            return Err(invalid(&self.intermediate, SOURCE_OFFSET_HEADER));
        }
        Ok(Origin {
            topic_partition: TopicPartition::new(topic, partition),
            offset,
        })
    }

    /// The message as it was on its source topic.
    fn restore(&self, message: &RawMessage) -> Result<RawMessage, ProcessError> {
        let origin = self.source(message)?;
        let key = message
            .headers
            .first(SOURCE_KEY_HEADER)
            .and_then(|k| k.map(<[u8]>::to_vec));
        let headers: Headers = message
            .headers
            .iter()
            .filter(|h| !JOIN_HEADERS.contains(&h.key.as_str()))
            .cloned()
            .collect::<Vec<_>>()
            .into();
        Ok(RawMessage {
            topic: origin.topic_partition.topic,
            partition: origin.topic_partition.partition,
            offset: origin.offset,
            key,
            value: message.value.clone(),
            headers,
            timestamp: message.timestamp,
        })
    }
}

/// The headers a join adds to an intermediate record.
const JOIN_HEADERS: [&str; 4] = [
    SOURCE_TOPIC_HEADER,
    SOURCE_KEY_HEADER,
    SOURCE_PARTITION_HEADER,
    SOURCE_OFFSET_HEADER,
];

impl StatefulProcessor for Joined {
    fn input_topics(&self) -> Vec<Arc<str>> {
        vec![Arc::clone(&self.intermediate)]
    }

    fn output_topics(&self) -> Vec<Arc<str>> {
        self.function.output_topics()
    }

    fn persistence_id(&self, message: &RawMessage) -> Result<PersistenceId, ProcessError> {
        let key = message.key.as_deref().ok_or(InvalidPersistenceId::Empty)?;
        Ok(PersistenceId::from_utf8(key)?)
    }

    fn id_is_key<'m>(&self, message: &'m RawMessage) -> Option<&'m [u8]> {
        message.key.as_deref()
    }

    fn origin(&self, message: &RawMessage) -> Result<Option<Origin>, ProcessError> {
        self.source(message).map(Some)
    }

    fn apply(
        &self,
        id: &PersistenceId,
        content: Option<&[u8]>,
        messages: &[&RawMessage],
        outputs: &mut Vec<EncodedRecord>,
    ) -> Result<Applied, ProcessError> {
        // A message that cannot be restored fails alone; the others are applied. (The
        // fold passes only messages whose origin is valid, so this is a safety net.)
        let mut restored = Vec::with_capacity(messages.len());
        let mut failures = Vec::new();
        for (index, message) in messages.iter().enumerate() {
            match self.restore(message) {
                Ok(m) => restored.push(m),
                Err(error) => failures.push((index, error)),
            }
        }
        let refs: Vec<&RawMessage> = restored.iter().collect();
        let mut applied = if refs.is_empty() {
            Applied {
                content: None,
                outcomes: Vec::new(),
            }
        } else {
            self.function.apply(id, content, &refs, outputs)?
        };
        for (index, error) in failures {
            applied.outcomes.insert(index, Err(error));
        }
        Ok(applied)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flows_core::function::{PersistenceIdFn, StatefulFunction};
    use flows_core::{Json, Message, Record, Topic, Utf8};

    fn balance() -> StatefulFunction<i64> {
        let output = Topic::new("totals", Utf8, Json::<i64>::new());
        let by_account = || {
            PersistenceIdFn::from_fn(|m: &Message<String, i64>| {
                Ok(PersistenceId::new(format!("acct-{}", m.key))?)
            })
        };
        StatefulFunction::new(Json::<i64>::new())
            .one_to_one(
                Topic::new("credits", Utf8, Json::<i64>::new()),
                output.clone(),
                by_account(),
                |t: Option<&i64>, m| {
                    let t = t.copied().unwrap_or(0) + m.value;
                    Ok((t, Record::new(m.key, t)))
                },
            )
            .one_to_one(
                Topic::new("debits", Utf8, Json::<i64>::new()),
                output,
                by_account(),
                |t: Option<&i64>, m| {
                    let t = t.copied().unwrap_or(0) - m.value;
                    Ok((t, Record::new(m.key, t)))
                },
            )
    }

    #[test]
    fn rekeyed_messages_are_restored_and_share_one_state() {
        let join = Join::new("b", "b-mid", balance());
        let mapper = StandardMapper {
            intermediate: Arc::clone(&join.intermediate),
            function: Arc::clone(&join.function),
        };
        let mut credit = RawMessage::raw("credits", 2, 10, Some(b"7"), Some(b"50"));
        credit.headers.append("trace", Some(b"t1".to_vec()));
        credit.timestamp = Some(42);
        let debit = RawMessage::raw("debits", 0, 3, Some(b"7"), Some(b"20"));
        let mid: Vec<EncodedRecord> = [credit.clone(), debit]
            .iter()
            .flat_map(|m| mapper.process(m).unwrap())
            .collect();
        assert!(mid.iter().all(|r| r.key.as_deref() == Some(&b"acct-7"[..])));
        assert!(mid.iter().all(|r| &*r.topic == "b-mid"));

        // As consumed from the intermediate topic.
        let consumed: Vec<RawMessage> = mid
            .iter()
            .enumerate()
            .map(|(i, r)| RawMessage {
                topic: Arc::from("b-mid"),
                partition: 1,
                offset: i as i64,
                key: r.key.clone(),
                value: r.value.clone(),
                headers: r.headers.clone(),
                timestamp: r.timestamp,
            })
            .collect();
        let joined = Joined {
            intermediate: Arc::clone(&join.intermediate),
            function: Arc::clone(&join.function),
        };
        let restored = joined.restore(&consumed[0]).unwrap();
        assert_eq!(restored.topic.as_ref(), "credits");
        assert_eq!((restored.partition, restored.offset), (2, 10));
        assert_eq!(restored.key, credit.key);
        assert_eq!(restored.headers, credit.headers);
        assert_eq!(restored.timestamp, Some(42));

        let id = joined.persistence_id(&consumed[0]).unwrap();
        let refs: Vec<&RawMessage> = consumed.iter().collect();
        let applied = joined.apply(&id, None, &refs, &mut Vec::new()).unwrap();
        assert_eq!(applied.content.as_deref(), Some(&b"30"[..]));
        assert_eq!(applied.outcomes.len(), 2);

        let mut broken = consumed[1].clone();
        broken.headers = Headers::new();
        let mut outputs = Vec::new();
        let applied = joined
            .apply(&id, None, &[&consumed[0], &broken], &mut outputs)
            .unwrap();
        assert_eq!(applied.content.as_deref(), Some(&b"50"[..]));
        assert_eq!(applied.outcomes[0].as_ref().ok(), Some(&outputs.len()));
        assert_eq!(applied.outcomes[1].as_ref().unwrap_err().kind(), "origin");
    }
}
