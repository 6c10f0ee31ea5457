//! Typed topics: a name, a key format and a value format.

use std::fmt;
use std::sync::Arc;

use crate::format::{Bytes, Format, FormatError};
use crate::message::{Message, RawMessage, Record};
use crate::state::EncodedRecord;

/// Which part of a message a format error is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Part {
    /// The message key.
    Key,
    /// The message value.
    Value,
}

impl fmt::Display for Part {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Part::Key => "key",
            Part::Value => "value",
        })
    }
}

/// A key or value of a topic could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
#[error("cannot {action} the {part} of a message on topic {topic:?}: {source}")]
pub struct TopicFormatError {
    /// `"decode"` or `"encode"`.
    pub action: &'static str,
    /// The topic.
    pub topic: String,
    /// Key or value.
    pub part: Part,
    /// The format's error.
    #[source]
    pub source: FormatError,
}

/// A Kafka topic with typed keys `K` and values `V`.
///
/// ```
/// use flows_core::{Topic, Utf8, Json};
/// let counts: Topic<String, i64> = Topic::new("word-counts", Utf8, Json::new());
/// assert_eq!(counts.name(), "word-counts");
/// ```
pub struct Topic<K, V> {
    name: Arc<str>,
    key_format: Arc<dyn Format<K>>,
    value_format: Arc<dyn Format<V>>,
}

impl<K, V> Clone for Topic<K, V> {
    fn clone(&self) -> Self {
        Self {
            name: Arc::clone(&self.name),
            key_format: Arc::clone(&self.key_format),
            value_format: Arc::clone(&self.value_format),
        }
    }
}

impl<K, V> fmt::Debug for Topic<K, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Topic")
            .field("name", &self.name)
            .field("key_format", &self.key_format.name())
            .field("value_format", &self.value_format.name())
            .finish()
    }
}

impl Topic<Vec<u8>, Vec<u8>> {
    /// A topic with raw bytes keys and values (the default formats).
    pub fn bytes(name: impl Into<Arc<str>>) -> Self {
        Self::new(name, Bytes, Bytes)
    }
}

impl<K, V> Topic<K, V> {
    /// A topic named `name` with the given key and value formats.
    pub fn new(
        name: impl Into<Arc<str>>,
        key_format: impl Format<K> + 'static,
        value_format: impl Format<V> + 'static,
    ) -> Self {
        Self {
            name: name.into(),
            key_format: Arc::new(key_format),
            value_format: Arc::new(value_format),
        }
    }

    /// The topic name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The topic name, shared.
    pub fn shared_name(&self) -> Arc<str> {
        Arc::clone(&self.name)
    }

    /// The key format.
    pub fn key_format(&self) -> &dyn Format<K> {
        &*self.key_format
    }

    /// The value format.
    pub fn value_format(&self) -> &dyn Format<V> {
        &*self.value_format
    }

    /// Decodes a raw message read from this topic.
    pub fn decode(&self, raw: &RawMessage) -> Result<Message<K, V>, TopicFormatError> {
        let key = self
            .key_format
            .decode_payload(raw.key.as_deref())
            .map_err(|source| self.error("decode", Part::Key, source))?;
        let value = self
            .value_format
            .decode_payload(raw.value.as_deref())
            .map_err(|source| self.error("decode", Part::Value, source))?;
        Ok(Message {
            topic: Arc::clone(&raw.topic),
            partition: raw.partition,
            offset: raw.offset,
            key,
            value,
            headers: raw.headers.clone(),
            timestamp: raw.timestamp,
        })
    }

    /// Encodes a record for this topic. A record without its own timestamp gets
    /// `default_timestamp` (the input's), so re-running a function is deterministic.
    /// The record is consumed: bytes and UTF-8 keys and values become the payload
    /// without a copy.
    pub fn encode(
        &self,
        record: Record<K, V>,
        default_timestamp: Option<i64>,
    ) -> Result<EncodedRecord, TopicFormatError> {
        let key = self
            .key_format
            .encode_owned_payload(record.key)
            .map_err(|source| self.error("encode", Part::Key, source))?;
        let value = self
            .value_format
            .encode_owned_payload(record.value)
            .map_err(|source| self.error("encode", Part::Value, source))?;
        Ok(EncodedRecord {
            topic: Arc::clone(&self.name),
            partition: record.partition,
            key,
            value,
            headers: record.headers,
            timestamp: record.timestamp.or(default_timestamp),
        })
    }

    fn error(&self, action: &'static str, part: Part, source: FormatError) -> TopicFormatError {
        TopicFormatError {
            action,
            topic: self.name.to_string(),
            part,
            source,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::{Json, Nullable, Utf8};

    #[test]
    fn decode_reports_topic_and_part() {
        let topic: Topic<String, i64> = Topic::new("counts", Utf8, Json::new());
        let raw = RawMessage::raw("counts", 0, 5, Some(b"w"), Some(b"not json"));
        let err = topic.decode(&raw).unwrap_err();
        assert_eq!(err.part, Part::Value);
        assert_eq!(err.topic, "counts");
        assert!(err.to_string().contains("counts"), "{err}");
    }

    #[test]
    fn encode_inherits_the_input_timestamp_unless_set() {
        let topic: Topic<String, Option<String>> = Topic::new("t", Utf8, Nullable(Utf8));
        let inherited = topic
            .encode(Record::new("k".to_owned(), None), Some(42))
            .unwrap();
        assert_eq!(inherited.timestamp, Some(42));
        assert_eq!(inherited.value, None);
        let explicit = topic
            .encode(
                Record::new("k".to_owned(), Some("v".to_owned())).with_timestamp(7),
                Some(42),
            )
            .unwrap();
        assert_eq!(explicit.timestamp, Some(7));
        assert_eq!(explicit.value.as_deref(), Some(&b"v"[..]));
    }
}
