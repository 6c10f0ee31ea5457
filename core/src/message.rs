//! Messages flowing in ([`Message`]) and out ([`Record`]) of functions.

use std::fmt;
use std::sync::Arc;

/// A Kafka topic name and partition number: the unit of ordering and of offset progress.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TopicPartition {
    /// Topic name.
    pub topic: Arc<str>,
    /// Partition number within the topic.
    pub partition: i32,
}

impl TopicPartition {
    /// Creates a topic-partition pair.
    pub fn new(topic: impl Into<Arc<str>>, partition: i32) -> Self {
        Self {
            topic: topic.into(),
            partition,
        }
    }
}

impl fmt::Display for TopicPartition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.topic, self.partition)
    }
}

/// One header of a message. Kafka allows a key to repeat and a value to be null.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Header {
    /// Header name.
    pub key: String,
    /// Header value; `None` is a null header value, distinct from an empty one.
    pub value: Option<Vec<u8>>,
}

/// Ordered message headers; the same key may appear several times.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Headers(Vec<Header>);

impl Headers {
    /// No headers.
    pub fn new() -> Self {
        Self(Vec::new())
    }

    /// Appends a header, keeping any earlier header with the same key.
    pub fn append(&mut self, key: impl Into<String>, value: impl Into<Option<Vec<u8>>>) {
        self.0.push(Header {
            key: key.into(),
            value: value.into(),
        });
    }

    /// Sets the header `key` to `value`: every earlier header with that key is removed and
    /// the new one appended.
    ///
    /// ```
    /// let mut headers = flows_core::Headers::new().with("a", b"1".to_vec()).with("a", b"2".to_vec());
    /// headers.set("a", b"3".to_vec());
    /// assert_eq!(headers.all("a").collect::<Vec<_>>(), [Some(&b"3"[..])]);
    /// ```
    pub fn set(&mut self, key: impl Into<String>, value: impl Into<Option<Vec<u8>>>) {
        let key = key.into();
        self.0.retain(|h| h.key != key);
        self.append(key, value);
    }

    /// Builder form of [`Headers::append`].
    pub fn with(mut self, key: impl Into<String>, value: impl Into<Option<Vec<u8>>>) -> Self {
        self.append(key, value);
        self
    }

    /// The value of the first header named `key`, if any (`Some(None)` for a null value).
    pub fn first(&self, key: &str) -> Option<Option<&[u8]>> {
        self.0
            .iter()
            .find(|h| h.key == key)
            .map(|h| h.value.as_deref())
    }

    /// The values of every header named `key`, in order.
    pub fn all<'a>(&'a self, key: &'a str) -> impl Iterator<Item = Option<&'a [u8]>> + 'a {
        self.0
            .iter()
            .filter(move |h| h.key == key)
            .map(|h| h.value.as_deref())
    }

    /// Iterates over all headers in order.
    pub fn iter(&self) -> std::slice::Iter<'_, Header> {
        self.0.iter()
    }

    /// Number of headers.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are no headers.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl From<Vec<Header>> for Headers {
    fn from(headers: Vec<Header>) -> Self {
        Self(headers)
    }
}

impl IntoIterator for Headers {
    type Item = Header;
    type IntoIter = std::vec::IntoIter<Header>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter()
    }
}

impl<'a> IntoIterator for &'a Headers {
    type Item = &'a Header;
    type IntoIter = std::slice::Iter<'a, Header>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

/// A message read from Kafka, with its key and value decoded to `K` and `V`.
#[derive(Clone, Debug, PartialEq)]
pub struct Message<K, V> {
    /// Topic the message was read from.
    pub topic: Arc<str>,
    /// Partition the message was read from.
    pub partition: i32,
    /// Offset of the message in its partition.
    pub offset: i64,
    /// Decoded key.
    pub key: K,
    /// Decoded value.
    pub value: V,
    /// Headers, in order.
    pub headers: Headers,
    /// Kafka timestamp in milliseconds since the Unix epoch, if the broker gave one.
    pub timestamp: Option<i64>,
}

/// A message as it comes off the wire: key and value are raw, possibly null, bytes.
pub type RawMessage = Message<Option<Vec<u8>>, Option<Vec<u8>>>;

impl<K, V> Message<K, V> {
    /// The topic-partition this message was read from.
    pub fn topic_partition(&self) -> TopicPartition {
        TopicPartition {
            topic: Arc::clone(&self.topic),
            partition: self.partition,
        }
    }
}

impl RawMessage {
    /// A raw message with the given coordinates and payload, no headers and no timestamp.
    /// Mostly useful in tests.
    pub fn raw(
        topic: impl Into<Arc<str>>,
        partition: i32,
        offset: i64,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
    ) -> Self {
        Self {
            topic: topic.into(),
            partition,
            offset,
            key: key.map(<[u8]>::to_vec),
            value: value.map(<[u8]>::to_vec),
            headers: Headers::new(),
            timestamp: None,
        }
    }
}

/// A message a function emits: the engine encodes it with the output topic's formats.
#[derive(Clone, Debug, PartialEq)]
pub struct Record<K, V> {
    /// Key to encode.
    pub key: K,
    /// Value to encode.
    pub value: V,
    /// Headers to send.
    pub headers: Headers,
    /// Explicit timestamp in milliseconds; when `None` the input message's timestamp is
    /// used, so a replayed output is identical to the first attempt.
    pub timestamp: Option<i64>,
    /// Explicit partition; when `None` the producer partitions by key.
    pub partition: Option<i32>,
}

impl<K, V> Record<K, V> {
    /// A record with a key and a value, no headers, inherited timestamp, key partitioning.
    pub fn new(key: K, value: V) -> Self {
        Self {
            key,
            value,
            headers: Headers::new(),
            timestamp: None,
            partition: None,
        }
    }

    /// Adds a header.
    pub fn with_header(mut self, key: impl Into<String>, value: impl Into<Vec<u8>>) -> Self {
        self.headers.append(key, Some(value.into()));
        self
    }

    /// Sets an explicit timestamp (milliseconds since the Unix epoch).
    pub fn with_timestamp(mut self, timestamp: i64) -> Self {
        self.timestamp = Some(timestamp);
        self
    }

    /// Sends the record to an explicit partition instead of partitioning by key.
    pub fn with_partition(mut self, partition: i32) -> Self {
        self.partition = Some(partition);
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_keep_repeated_keys_and_null_values_in_order() {
        let headers = Headers::new()
            .with("trace", b"a".to_vec())
            .with("trace", None)
            .with("other", b"x".to_vec())
            .with("trace", b"c".to_vec());
        assert_eq!(headers.first("trace"), Some(Some(&b"a"[..])));
        let all: Vec<_> = headers.all("trace").collect();
        assert_eq!(all, vec![Some(&b"a"[..]), None, Some(&b"c"[..])]);
        assert_eq!(headers.first("missing"), None);
        assert_eq!(headers.len(), 4);
    }

    #[test]
    fn topic_partition_displays_as_topic_slash_partition() {
        assert_eq!(TopicPartition::new("words", 3).to_string(), "words/3");
    }
}
