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

use std::sync::Arc;

use flows_core::function::stateful::Applied;
use flows_core::function::{StatefulProcessor, StatelessProcessor};
use flows_core::{
    EncodedRecord, Headers, InvalidPersistenceId, PersistenceId, ProcessError, RawMessage,
    SingleStateRepository,
};

use crate::pipeline::Pipeline;

/// Header carrying the source topic of an intermediate message.
pub const SOURCE_TOPIC_HEADER: &str = "flows.join.source-topic";
/// Header carrying the original key of an intermediate message (absent value: null key).
pub const SOURCE_KEY_HEADER: &str = "flows.join.source-key";

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
    /// topic with [`intermediate_record`].
    pub fn rekey_pipeline_with(&self, mapper: impl StatelessProcessor + 'static) -> Pipeline {
        Pipeline::stateless(format!("{}-rekey", self.name), mapper)
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
/// timestamp unchanged, key = `id`, source topic and key in headers.
pub fn intermediate_record(
    intermediate_topic: impl Into<Arc<str>>,
    id: &PersistenceId,
    message: &RawMessage,
) -> EncodedRecord {
    let headers = message
        .headers
        .clone()
        .with(SOURCE_TOPIC_HEADER, message.topic.as_bytes().to_vec())
        .with(SOURCE_KEY_HEADER, message.key.clone());
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
/// its source topic. Progress is tracked on the intermediate topic's partitions.
struct Joined {
    intermediate: Arc<str>,
    function: Arc<dyn StatefulProcessor>,
}

impl Joined {
    /// The message as it was on its source topic.
    fn restore(&self, message: &RawMessage) -> Result<RawMessage, ProcessError> {
        let source = message
            .headers
            .first(SOURCE_TOPIC_HEADER)
            .flatten()
            .and_then(|t| std::str::from_utf8(t).ok())
            .ok_or_else(|| {
                ProcessError::UnknownTopic(format!(
                    "{} message without a valid {SOURCE_TOPIC_HEADER} header",
                    self.intermediate
                ))
            })?;
        let key = message
            .headers
            .first(SOURCE_KEY_HEADER)
            .and_then(|k| k.map(<[u8]>::to_vec));
        let headers: Headers = message
            .headers
            .iter()
            .filter(|h| h.key != SOURCE_TOPIC_HEADER && h.key != SOURCE_KEY_HEADER)
            .cloned()
            .collect::<Vec<_>>()
            .into();
        Ok(RawMessage {
            topic: Arc::from(source),
            partition: message.partition,
            offset: message.offset,
            key,
            value: message.value.clone(),
            headers,
            timestamp: message.timestamp,
        })
    }
}

impl StatefulProcessor for Joined {
    fn input_topics(&self) -> Vec<Arc<str>> {
        vec![Arc::clone(&self.intermediate)]
    }

    fn persistence_id(&self, message: &RawMessage) -> Result<PersistenceId, ProcessError> {
        let key = message.key.as_deref().ok_or(InvalidPersistenceId::Empty)?;
        Ok(PersistenceId::from_utf8(key)?)
    }

    fn apply(
        &self,
        id: &PersistenceId,
        content: Option<&[u8]>,
        messages: &[&RawMessage],
    ) -> Result<Applied, ProcessError> {
        // A message that cannot be restored fails alone; the others are applied.
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
            self.function.apply(id, content, &refs)?
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
        assert_eq!(restored.key, credit.key);
        assert_eq!(restored.headers, credit.headers);
        assert_eq!(restored.timestamp, Some(42));

        let id = joined.persistence_id(&consumed[0]).unwrap();
        let refs: Vec<&RawMessage> = consumed.iter().collect();
        let applied = joined.apply(&id, None, &refs).unwrap();
        assert_eq!(applied.content.as_deref(), Some(&b"30"[..]));
        assert_eq!(applied.outcomes.len(), 2);

        let mut broken = consumed[1].clone();
        broken.headers = Headers::new();
        let applied = joined.apply(&id, None, &[&consumed[0], &broken]).unwrap();
        assert_eq!(applied.content.as_deref(), Some(&b"50"[..]));
        assert_eq!(
            applied.outcomes[1].as_ref().unwrap_err().kind(),
            "unknown-topic"
        );
    }
}
