//! `BatchGetItem` and `BatchWriteItem` in chunks of the service's limits, with the
//! unprocessed part of each answer retried.

use std::collections::HashMap;

use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::types::{AttributeValue, KeysAndAttributes, WriteRequest};
use flows_core::RepositoryError;
use futures::{StreamExt, TryStreamExt, stream};

use crate::error::{Backoff, build_err, map_sdk_err};

/// One DynamoDB item (or key): attribute name to value.
pub(crate) type Item = HashMap<String, AttributeValue>;

/// Keys per `BatchGetItem` (the service's limit).
pub(crate) const GET_CHUNK: usize = 100;

/// Requests per `BatchWriteItem` (the service's limit).
pub(crate) const WRITE_CHUNK: usize = 25;

/// Chunks in flight at once: enough to hide latency, few enough not to throttle a
/// freshly created on-demand table.
const CONCURRENCY: usize = 8;

/// Reads `keys` (distinct) with strongly consistent reads; absent keys are simply not
/// in the answer.
pub(crate) async fn get_items(
    client: &Client,
    table: &str,
    keys: Vec<Item>,
) -> Result<Vec<Item>, RepositoryError> {
    let chunks: Vec<Vec<Item>> = chunked(keys, GET_CHUNK);
    let found: Vec<Vec<Item>> = stream::iter(chunks)
        .map(|chunk| get_chunk(client, table, chunk))
        .buffer_unordered(CONCURRENCY)
        .try_collect()
        .await?;
    Ok(found.into_iter().flatten().collect())
}

async fn get_chunk(
    client: &Client,
    table: &str,
    mut pending: Vec<Item>,
) -> Result<Vec<Item>, RepositoryError> {
    let mut found = Vec::with_capacity(pending.len());
    let mut backoff = Backoff::new("BatchGetItem");
    while !pending.is_empty() {
        let request = KeysAndAttributes::builder()
            .set_keys(Some(pending))
            // The version check of a write is only meaningful against the latest write.
            .consistent_read(true)
            .build()
            .map_err(build_err)?;
        let mut output = client
            .batch_get_item()
            .request_items(table, request)
            .send()
            .await
            .map_err(|e| map_sdk_err("BatchGetItem", e))?;
        let items = output
            .responses
            .as_mut()
            .and_then(|r| r.remove(table))
            .unwrap_or_default();
        let progressed = !items.is_empty();
        found.extend(items);
        pending = output
            .unprocessed_keys
            .as_mut()
            .and_then(|u| u.remove(table))
            .map(|k| k.keys)
            .unwrap_or_default();
        // Keys left over from a large (16 MB) answer are fetched at once; keys left over
        // without any progress mean throttling: back off.
        if !pending.is_empty() && !progressed {
            let left = pending.len();
            backoff
                .wait(|| format!("{left} key(s) still unprocessed"))
                .await?;
        }
    }
    Ok(found)
}

/// Applies `requests` (puts and deletes of distinct keys) unconditionally. Not atomic:
/// on an error some chunks may have been applied.
pub(crate) async fn write_items(
    client: &Client,
    table: &str,
    requests: Vec<WriteRequest>,
) -> Result<(), RepositoryError> {
    stream::iter(chunked(requests, WRITE_CHUNK))
        .map(|chunk| write_chunk(client, table, chunk))
        .buffer_unordered(CONCURRENCY)
        .try_collect::<()>()
        .await
}

async fn write_chunk(
    client: &Client,
    table: &str,
    mut pending: Vec<WriteRequest>,
) -> Result<(), RepositoryError> {
    let mut backoff = Backoff::new("BatchWriteItem");
    while !pending.is_empty() {
        let sent = pending.len();
        let mut output = client
            .batch_write_item()
            .request_items(table, pending)
            .send()
            .await
            .map_err(|e| map_sdk_err("BatchWriteItem", e))?;
        pending = output
            .unprocessed_items
            .as_mut()
            .and_then(|u| u.remove(table))
            .unwrap_or_default();
        if !pending.is_empty() {
            let left = pending.len();
            if left == sent {
                backoff
                    .wait(|| format!("{left} write(s) still unprocessed"))
                    .await?;
            }
        }
    }
    Ok(())
}

/// Splits `items` into vectors of at most `size`.
pub(crate) fn chunked<T>(items: Vec<T>, size: usize) -> Vec<Vec<T>> {
    let mut chunks = Vec::with_capacity(items.len().div_ceil(size));
    let mut items = items.into_iter().peekable();
    while items.peek().is_some() {
        chunks.push(items.by_ref().take(size).collect());
    }
    chunks
}

/// Splits `items` into runs of at most `max_count` items whose `size`s add up to at most
/// `max_bytes` (an item larger than that alone forms a run).
pub(crate) fn chunked_by_size<T>(
    items: &[T],
    max_count: usize,
    max_bytes: usize,
    size: impl Fn(&T) -> usize,
) -> Vec<&[T]> {
    let mut chunks = Vec::new();
    let (mut start, mut bytes) = (0, 0);
    for (i, item) in items.iter().enumerate() {
        let item_bytes = size(item);
        if i > start && (i - start == max_count || bytes + item_bytes > max_bytes) {
            chunks.push(&items[start..i]);
            (start, bytes) = (i, 0);
        }
        bytes += item_bytes;
    }
    if start < items.len() {
        chunks.push(&items[start..]);
    }
    chunks
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_respect_the_count() {
        let chunks = chunked((0..251).collect(), 100);
        let lens: Vec<usize> = chunks.iter().map(Vec::len).collect();
        assert_eq!(lens, vec![100, 100, 51]);
        assert!(chunked(Vec::<u8>::new(), 25).is_empty());
    }

    #[test]
    fn chunks_respect_count_and_bytes() {
        let sizes = [10, 10, 10, 30, 5, 50, 1];
        let chunks = chunked_by_size(&sizes, 3, 40, |s| *s);
        assert_eq!(
            chunks,
            vec![&[10, 10, 10][..], &[30, 5][..], &[50][..], &[1][..]]
        );
        assert!(chunked_by_size(&[] as &[usize], 3, 40, |s| *s).is_empty());
    }
}
