//! The protobuf schema of a state's internal part (offset progress and last results).
//!
//! Written with prost's derive so no `protoc` is needed. The equivalent `.proto`:
//!
//! ```proto
//! message Internal { oneof version { InternalV1 v1 = 1; } }
//! message InternalV1 { repeated PartitionProgress progress = 1; repeated PartitionResults results = 2; }
//! message PartitionProgress { string topic = 1; int32 partition = 2; int64 offset = 3; }
//! message PartitionResults { string topic = 1; int32 partition = 2; repeated InputResult inputs = 3; }
//! message InputResult { int64 offset = 1; repeated OutputRecord outputs = 2; }
//! message OutputRecord {
//!   optional string topic = 1; optional int32 partition = 2; optional bytes key = 3;
//!   optional bytes value = 4; repeated Header headers = 5; optional int64 timestamp = 6;
//!   uint32 from_input = 7;
//! }
//! message Header { string key = 1; optional bytes value = 2; }
//! ```
//!
//! An `OutputRecord` without a topic goes to the topic of the record before it in the
//! same `PartitionResults`: writers spell a topic out only where it changes (and on the
//! first record). Blobs written when every record had its topic read the same.
//!
//! `from_input` names the fields an `OutputRecord` leaves out because they are its
//! input's (bit 1 the key, 2 the value, 4 the timestamp): a replay restores them from
//! the replayed input. Earlier versions marked a dead letter's key and value so with a
//! `flows.stored.input-payload` header; such blobs read the same.
//!
//! A new layout is added as `v2` in the oneof; readers keep decoding `v1`, so stored
//! states never need a migration.

#![allow(missing_docs)] // generated-style message definitions; documented above

#[derive(Clone, PartialEq, prost::Message)]
pub struct Internal {
    #[prost(oneof = "internal::Version", tags = "1")]
    pub version: Option<internal::Version>,
}

pub mod internal {
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Version {
        #[prost(message, tag = "1")]
        V1(super::InternalV1),
    }
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct InternalV1 {
    #[prost(message, repeated, tag = "1")]
    pub progress: Vec<PartitionProgress>,
    #[prost(message, repeated, tag = "2")]
    pub results: Vec<PartitionResults>,
}

/// `Internal` as it is read and written: each `PartitionResults` kept as its encoded
/// bytes (same wire format: a message field is length-delimited like `bytes`), decoded
/// only when a replay needs it.
#[derive(Clone, PartialEq, prost::Message)]
pub struct StoredInternal {
    #[prost(oneof = "stored_internal::Version", tags = "1")]
    pub version: Option<stored_internal::Version>,
}

pub mod stored_internal {
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Version {
        #[prost(message, tag = "1")]
        V1(super::StoredInternalV1),
    }
}

/// `InternalV1` with undecoded results.
#[derive(Clone, PartialEq, prost::Message)]
pub struct StoredInternalV1 {
    #[prost(message, repeated, tag = "1")]
    pub progress: Vec<PartitionProgress>,
    #[prost(bytes = "bytes", repeated, tag = "2")]
    pub results: Vec<prost::bytes::Bytes>,
}

/// The topic and partition of a `PartitionResults`, its inputs skipped.
#[derive(Clone, PartialEq, prost::Message)]
pub struct PartitionResultsHead {
    #[prost(string, tag = "1")]
    pub topic: String,
    #[prost(int32, tag = "2")]
    pub partition: i32,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct PartitionProgress {
    #[prost(string, tag = "1")]
    pub topic: String,
    #[prost(int32, tag = "2")]
    pub partition: i32,
    #[prost(int64, tag = "3")]
    pub offset: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct PartitionResults {
    #[prost(string, tag = "1")]
    pub topic: String,
    #[prost(int32, tag = "2")]
    pub partition: i32,
    #[prost(message, repeated, tag = "3")]
    pub inputs: Vec<InputResult>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct InputResult {
    #[prost(int64, tag = "1")]
    pub offset: i64,
    #[prost(message, repeated, tag = "2")]
    pub outputs: Vec<OutputRecord>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct OutputRecord {
    /// `None`: the topic of the record before.
    #[prost(string, optional, tag = "1")]
    pub topic: Option<String>,
    #[prost(int32, optional, tag = "2")]
    pub partition: Option<i32>,
    #[prost(bytes = "vec", optional, tag = "3")]
    pub key: Option<Vec<u8>>,
    #[prost(bytes = "vec", optional, tag = "4")]
    pub value: Option<Vec<u8>>,
    #[prost(message, repeated, tag = "5")]
    pub headers: Vec<Header>,
    #[prost(int64, optional, tag = "6")]
    pub timestamp: Option<i64>,
    /// The fields left out because they are the input's (bits: 1 key, 2 value,
    /// 4 timestamp).
    #[prost(uint32, tag = "7")]
    pub from_input: u32,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Header {
    #[prost(string, tag = "1")]
    pub key: String,
    #[prost(bytes = "vec", optional, tag = "2")]
    pub value: Option<Vec<u8>>,
}
