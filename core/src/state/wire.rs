//! Protobuf wire encoding by hand, for the parts of a state written on every batch:
//! lengths computed up front so a blob is written into one exactly sized buffer, from
//! borrowed data, without building owned protobuf structs first. Tests check every
//! blob written here against prost's encoding of the `proto` messages.

use prost::bytes::BufMut;
use prost::encoding::{WireType, encode_key, encode_varint, encoded_len_varint, key_len};

/// Length of a length-delimited field holding `len` bytes.
pub(super) fn delimited_len(tag: u32, len: usize) -> usize {
    key_len(tag) + encoded_len_varint(len as u64) + len
}

/// Writes the key and length of a length-delimited field; its `len` bytes follow.
pub(super) fn put_delimited_head(tag: u32, len: usize, buf: &mut impl BufMut) {
    encode_key(tag, WireType::LengthDelimited, buf);
    encode_varint(len as u64, buf);
}

/// Length of a proto3 (implicit presence) string field: nothing when empty.
pub(super) fn implicit_str_len(tag: u32, value: &str) -> usize {
    if value.is_empty() {
        0
    } else {
        str_len(tag, value.as_bytes())
    }
}

/// Length of a proto3 (implicit presence) integer field: nothing when zero.
pub(super) fn implicit_int_len(tag: u32, value: i64) -> usize {
    if value == 0 { 0 } else { int_len(tag, value) }
}

/// Length of a bytes or string field that is written (explicit presence).
pub(super) fn str_len(tag: u32, value: &[u8]) -> usize {
    delimited_len(tag, value.len())
}

/// Writes a proto3 string field (nothing when empty).
pub(super) fn put_str(tag: u32, value: &str, buf: &mut impl BufMut) {
    // proto3: an empty string is the default and is not written.
    if !value.is_empty() {
        put_bytes(tag, value.as_bytes(), buf);
    }
}

/// Writes a bytes field.
pub(super) fn put_bytes(tag: u32, value: &[u8], buf: &mut impl BufMut) {
    put_delimited_head(tag, value.len(), buf);
    buf.put_slice(value);
}

/// Length of an integer field that is written (explicit presence).
pub(super) fn int_len(tag: u32, value: i64) -> usize {
    // Negative int32/int64 values are encoded as ten-byte varints of the i64.
    key_len(tag) + encoded_len_varint(value as u64)
}

/// Writes a proto3 integer field (nothing when zero).
pub(super) fn put_int(tag: u32, value: i64, buf: &mut impl BufMut) {
    if value != 0 {
        put_optional_int(tag, value, buf);
    }
}

/// Writes an integer field (explicit presence).
pub(super) fn put_optional_int(tag: u32, value: i64, buf: &mut impl BufMut) {
    encode_key(tag, WireType::Varint, buf);
    encode_varint(value as u64, buf);
}
