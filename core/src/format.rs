//! Formats turn typed keys, values and states into bytes and back.
//!
//! Every decode failure is a typed [`FormatError`]; nothing is converted lossily (invalid
//! UTF-8 is an error, not replacement characters). Kafka payloads may be null: a format
//! rejects null unless wrapped in [`Nullable`], so a tombstone never decodes by accident.

use std::fmt;
use std::marker::PhantomData;

use serde::Serialize;
use serde::de::DeserializeOwned;

/// Why a value could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FormatError {
    /// The payload was null but the format needs bytes (wrap it in [`Nullable`] to accept null).
    #[error("payload is null but the {format} format requires a value")]
    Null {
        /// Name of the format that rejected the null payload.
        format: &'static str,
    },
    /// The bytes are not valid UTF-8.
    #[error("payload is not valid UTF-8: {0}")]
    Utf8(#[from] std::str::Utf8Error),
    /// JSON encoding or decoding failed.
    #[error("JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// Protobuf decoding failed.
    #[error("protobuf: {0}")]
    Protobuf(#[from] prost::DecodeError),
    /// A user-defined format failed.
    #[error("{format}: {message}")]
    Custom {
        /// Name of the format.
        format: &'static str,
        /// What went wrong.
        message: String,
    },
}

/// Encodes `T` to bytes and decodes it back.
///
/// Implementations must be pure and deterministic: encoding the same value twice gives the
/// same bytes, which is what lets a replay re-emit byte-identical outputs.
pub trait Format<T>: Send + Sync {
    /// A short name used in error messages (e.g. `"json"`).
    fn name(&self) -> &'static str;

    /// Encodes a value.
    fn encode(&self, value: &T) -> Result<Vec<u8>, FormatError>;

    /// Decodes a value.
    fn decode(&self, bytes: &[u8]) -> Result<T, FormatError>;

    /// Encodes a value as a possibly-null Kafka payload. Only [`Nullable`] ever gives `None`.
    fn encode_payload(&self, value: &T) -> Result<Option<Vec<u8>>, FormatError> {
        self.encode(value).map(Some)
    }

    /// Encodes a value it may consume. Formats whose encoding is the value's own bytes
    /// (bytes, UTF-8) hand them over instead of copying them.
    fn encode_owned(&self, value: T) -> Result<Vec<u8>, FormatError> {
        self.encode(&value)
    }

    /// [`encode_payload`](Self::encode_payload) of a value it may consume.
    fn encode_owned_payload(&self, value: T) -> Result<Option<Vec<u8>>, FormatError> {
        self.encode_owned(value).map(Some)
    }

    /// Decodes a possibly-null Kafka payload; null is an error unless the format accepts it.
    fn decode_payload(&self, bytes: Option<&[u8]>) -> Result<T, FormatError> {
        match bytes {
            Some(bytes) => self.decode(bytes),
            None => Err(FormatError::Null {
                format: self.name(),
            }),
        }
    }
}

/// Raw bytes, unchanged: the default format.
#[derive(Clone, Copy, Debug, Default)]
pub struct Bytes;

impl Format<Vec<u8>> for Bytes {
    fn name(&self) -> &'static str {
        "bytes"
    }
    fn encode(&self, value: &Vec<u8>) -> Result<Vec<u8>, FormatError> {
        Ok(value.clone())
    }
    fn encode_owned(&self, value: Vec<u8>) -> Result<Vec<u8>, FormatError> {
        Ok(value)
    }
    fn decode(&self, bytes: &[u8]) -> Result<Vec<u8>, FormatError> {
        Ok(bytes.to_vec())
    }
}

/// UTF-8 text. Invalid UTF-8 is a [`FormatError::Utf8`], never a lossy conversion.
#[derive(Clone, Copy, Debug, Default)]
pub struct Utf8;

impl Format<String> for Utf8 {
    fn name(&self) -> &'static str {
        "utf8"
    }
    fn encode(&self, value: &String) -> Result<Vec<u8>, FormatError> {
        Ok(value.as_bytes().to_vec())
    }
    fn encode_owned(&self, value: String) -> Result<Vec<u8>, FormatError> {
        Ok(value.into_bytes())
    }
    fn decode(&self, bytes: &[u8]) -> Result<String, FormatError> {
        Ok(std::str::from_utf8(bytes)?.to_owned())
    }
}

thread_local! {
    /// Where [`Json`] encodes before copying the bytes out.
    static JSON_SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The largest scratch buffer kept between encodings (larger ones are freed).
const JSON_SCRATCH_KEPT: usize = 64 * 1024;

/// JSON through serde.
pub struct Json<T>(PhantomData<fn() -> T>);

impl<T> Json<T> {
    /// The JSON format for `T`.
    pub fn new() -> Self {
        Self(PhantomData)
    }
}

impl<T> Default for Json<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T> Clone for Json<T> {
    fn clone(&self) -> Self {
        Self::new()
    }
}

impl<T> fmt::Debug for Json<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Json")
    }
}

impl<T: Serialize + DeserializeOwned + 'static> Format<T> for Json<T> {
    fn name(&self) -> &'static str {
        "json"
    }
    fn encode(&self, value: &T) -> Result<Vec<u8>, FormatError> {
        // serde_json::to_vec starts every value at 128 bytes; an output or state of a
        // few bytes would keep all of them while it waits to be published or written.
        // Writing into a scratch buffer and copying out gives an exactly sized vector.
        JSON_SCRATCH.with_borrow_mut(|scratch| {
            scratch.clear();
            let written = serde_json::to_writer(&mut *scratch, value);
            let encoded = written.map(|()| scratch.as_slice().to_vec());
            if scratch.capacity() > JSON_SCRATCH_KEPT {
                *scratch = Vec::new();
            }
            Ok(encoded?)
        })
    }
    fn decode(&self, bytes: &[u8]) -> Result<T, FormatError> {
        Ok(serde_json::from_slice(bytes)?)
    }
}

/// Protobuf through prost: the primary byte encoding of flows.
pub struct Protobuf<T>(PhantomData<fn() -> T>);

impl<T> Protobuf<T> {
    /// The protobuf format for `T`.
    pub fn new() -> Self {
        Self(PhantomData)
    }
}

impl<T> Default for Protobuf<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T> Clone for Protobuf<T> {
    fn clone(&self) -> Self {
        Self::new()
    }
}

impl<T> fmt::Debug for Protobuf<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Protobuf")
    }
}

impl<T: prost::Message + Default + 'static> Format<T> for Protobuf<T> {
    fn name(&self) -> &'static str {
        "protobuf"
    }
    fn encode(&self, value: &T) -> Result<Vec<u8>, FormatError> {
        Ok(value.encode_to_vec())
    }
    fn decode(&self, bytes: &[u8]) -> Result<T, FormatError> {
        Ok(T::decode(bytes)?)
    }
}

/// Wraps a format so that a null payload decodes to `None` and `None` encodes to null
/// (e.g. Kafka tombstones, or messages without a key).
#[derive(Clone, Copy, Debug, Default)]
pub struct Nullable<F>(pub F);

impl<T, F: Format<T>> Format<Option<T>> for Nullable<F> {
    fn name(&self) -> &'static str {
        self.0.name()
    }
    /// Encoding `None` as bare bytes is impossible; use [`Format::encode_payload`].
    fn encode(&self, value: &Option<T>) -> Result<Vec<u8>, FormatError> {
        match value {
            Some(value) => self.0.encode(value),
            None => Err(FormatError::Null {
                format: self.0.name(),
            }),
        }
    }
    fn decode(&self, bytes: &[u8]) -> Result<Option<T>, FormatError> {
        self.0.decode(bytes).map(Some)
    }
    fn encode_payload(&self, value: &Option<T>) -> Result<Option<Vec<u8>>, FormatError> {
        value.as_ref().map(|v| self.0.encode(v)).transpose()
    }
    fn encode_owned(&self, value: Option<T>) -> Result<Vec<u8>, FormatError> {
        match value {
            Some(value) => self.0.encode_owned(value),
            None => self.encode(&None),
        }
    }
    fn encode_owned_payload(&self, value: Option<T>) -> Result<Option<Vec<u8>>, FormatError> {
        value.map(|v| self.0.encode_owned(v)).transpose()
    }
    fn decode_payload(&self, bytes: Option<&[u8]>) -> Result<Option<T>, FormatError> {
        bytes.map(|b| self.0.decode(b)).transpose()
    }
}

/// The unit format: for keys or values that carry no information. Encodes to empty
/// bytes and accepts any payload, including null.
#[derive(Clone, Copy, Debug, Default)]
pub struct Unit;

impl Format<()> for Unit {
    fn name(&self) -> &'static str {
        "unit"
    }
    fn encode(&self, _value: &()) -> Result<Vec<u8>, FormatError> {
        Ok(Vec::new())
    }
    fn decode(&self, _bytes: &[u8]) -> Result<(), FormatError> {
        Ok(())
    }
    fn decode_payload(&self, _bytes: Option<&[u8]>) -> Result<(), FormatError> {
        Ok(())
    }
}

/// Signed 64-bit integers as 8 big-endian bytes (sorts like the numbers in Kafka tools).
#[derive(Clone, Copy, Debug, Default)]
pub struct I64BigEndian;

impl Format<i64> for I64BigEndian {
    fn name(&self) -> &'static str {
        "i64-big-endian"
    }
    fn encode(&self, value: &i64) -> Result<Vec<u8>, FormatError> {
        Ok(value.to_be_bytes().to_vec())
    }
    fn decode(&self, bytes: &[u8]) -> Result<i64, FormatError> {
        let array: [u8; 8] = bytes.try_into().map_err(|_| FormatError::Custom {
            format: "i64-big-endian",
            message: format!("expected 8 bytes, got {}", bytes.len()),
        })?;
        Ok(i64::from_be_bytes(array))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[derive(Clone, PartialEq, prost::Message)]
    struct Point {
        #[prost(int64, tag = "1")]
        x: i64,
        #[prost(string, tag = "2")]
        label: String,
    }

    #[test]
    fn invalid_utf8_is_an_error_not_a_lossy_conversion() {
        let err = Utf8.decode(&[0x66, 0xff, 0x6f]).unwrap_err();
        assert!(matches!(err, FormatError::Utf8(_)), "{err}");
    }

    #[test]
    fn json_encodes_into_exactly_sized_vectors_and_reports_failures() {
        let small = Json::<i64>::new().encode(&97).unwrap();
        assert_eq!(small, b"97");
        assert_eq!(small.capacity(), small.len());
        // Larger than the scratch buffer kept between encodings, then small again.
        let big = "x".repeat(JSON_SCRATCH_KEPT * 2);
        let encoded = Json::<String>::new().encode(&big).unwrap();
        assert_eq!(encoded.len(), big.len() + 2);
        assert_eq!(Json::<String>::new().decode(&encoded).unwrap(), big);
        assert_eq!(Json::<i64>::new().encode(&-5).unwrap(), b"-5");
        // A map with non-string keys cannot be JSON: an error, and the next encoding
        // starts from a clean buffer.
        let map: std::collections::HashMap<Vec<u8>, i64> = [(vec![1], 1)].into();
        let error = Json::new().encode(&map).unwrap_err();
        assert!(matches!(error, FormatError::Json(_)), "{error}");
        assert_eq!(Json::<i64>::new().encode(&1).unwrap(), b"1");
    }

    #[test]
    fn null_payload_is_rejected_unless_nullable() {
        assert!(matches!(
            Utf8.decode_payload(None),
            Err(FormatError::Null { format: "utf8" })
        ));
        assert_eq!(Nullable(Utf8).decode_payload(None).unwrap(), None);
        assert_eq!(
            Nullable(Utf8).decode_payload(Some(b"hi")).unwrap(),
            Some("hi".to_owned())
        );
        assert_eq!(Nullable(Utf8).encode_payload(&None).unwrap(), None);
    }

    #[test]
    fn json_errors_are_typed() {
        let format = Json::<Vec<u32>>::new();
        assert!(matches!(format.decode(b"[1,"), Err(FormatError::Json(_))));
        assert_eq!(format.decode(b"[1,2]").unwrap(), vec![1, 2]);
    }

    #[test]
    fn protobuf_round_trips_and_rejects_garbage() {
        let format = Protobuf::<Point>::new();
        let point = Point {
            x: -7,
            label: "ünï".into(),
        };
        assert_eq!(
            format.decode(&format.encode(&point).unwrap()).unwrap(),
            point
        );
        assert!(matches!(
            format.decode(&[0x0a, 0xff]),
            Err(FormatError::Protobuf(_))
        ));
    }

    #[test]
    fn i64_rejects_wrong_length() {
        assert!(I64BigEndian.decode(&[1, 2, 3]).is_err());
    }

    proptest! {
        #[test]
        fn utf8_round_trips(s in ".*") {
            prop_assert_eq!(Utf8.decode(&Utf8.encode(&s).unwrap()).unwrap(), s);
        }

        #[test]
        fn bytes_round_trip(b in proptest::collection::vec(any::<u8>(), 0..256)) {
            prop_assert_eq!(Bytes.decode(&Bytes.encode(&b).unwrap()).unwrap(), b);
        }

        #[test]
        fn json_round_trips(v in proptest::collection::btree_map(".*", any::<i64>(), 0..8)) {
            let format = Json::new();
            prop_assert_eq!(format.decode(&format.encode(&v).unwrap()).unwrap(), v);
        }

        #[test]
        fn i64_round_trips(n in any::<i64>()) {
            prop_assert_eq!(I64BigEndian.decode(&I64BigEndian.encode(&n).unwrap()).unwrap(), n);
        }
    }
}
