//! Cases for [`UpsertRepository`] implementations, over [`ConformanceRow`]: a row with a
//! composite primary key and a column of every [`ColumnType`].

use chrono::{DateTime, TimeZone, Utc};
use flows_core::{
    Column, ColumnType, ColumnValue, MemoryUpsertRepository, PrimaryKey, RepositoryError, Row,
    RowChange, TableName, UpsertRepository, Value,
};
use proptest::prelude::*;

use crate::{RowFactory, RowStore};

/// The row type of the upsert cases: composite key `(tenant, id)` and one column of every
/// type, nullable and not, derived (so every backend's suite round-trips every column
/// type through `#[derive(Row)]`).
#[derive(Clone, Debug, PartialEq, Row)]
#[flows(table = "conformance_rows")]
pub struct ConformanceRow {
    /// Key part 1.
    #[flows(key)]
    pub tenant: String,
    /// Key part 2.
    #[flows(key)]
    pub id: i64,
    /// Bool column.
    pub active: bool,
    /// Float column.
    pub amount: f64,
    /// Nullable text column.
    pub note: Option<String>,
    /// Binary column.
    pub payload: Vec<u8>,
    /// Timestamp column.
    pub at: DateTime<Utc>,
    /// Nullable JSON column.
    pub doc: Option<serde_json::Value>,
    /// Nullable integer column.
    pub score: Option<i64>,
}

impl ConformanceRow {
    /// A row with deterministic contents derived from its key and `n`.
    pub fn sample(tenant: &str, id: i64, n: i64) -> Self {
        Self {
            tenant: tenant.to_owned(),
            id,
            active: n.rem_euclid(2) == 0,
            amount: n as f64 * 1.25 - 3.5,
            note: (n % 3 != 0).then(|| format!("note {n}")),
            payload: n.to_be_bytes().to_vec(),
            at: Utc
                .timestamp_micros(1_700_000_000_000_000 + n * 1_000_003)
                .single()
                .expect("valid timestamp"),
            doc: (n % 4 != 0)
                .then(|| serde_json::json!({"n": n, "tags": ["a", "b"], "nested": {"ok": true}})),
            score: (n % 5 != 0).then_some(n * 7),
        }
    }

    /// This row's primary key.
    pub fn key(&self) -> PrimaryKey {
        PrimaryKey::new(vec![self.tenant.to_value(), self.id.to_value()])
    }
}

fn key(tenant: &str, id: i64) -> PrimaryKey {
    PrimaryKey::new(vec![Value::Text(tenant.to_owned()), Value::Int64(id)])
}

/// A nullable column of each type with an awkward value of it (NUL in text, the
/// extreme integer, a JSON number beyond `i64`, a `$` key), for backends' unit tests of
/// their value mapping.
pub fn one_value_of_each_type() -> Vec<(Column, Value)> {
    let column = |column_type| Column {
        name: TableName::new("c").expect("a valid column name"),
        column_type,
        nullable: true,
        primary_key: false,
    };
    vec![
        (column(ColumnType::Bool), Value::Bool(true)),
        (column(ColumnType::Int64), Value::Int64(i64::MIN)),
        (column(ColumnType::Float64), Value::Float64(-0.5)),
        (column(ColumnType::Text), Value::Text("a\0b ü".into())),
        (column(ColumnType::Bytes), Value::Bytes(vec![0, 255])),
        (
            column(ColumnType::Timestamp),
            Value::Timestamp(flows_core::state::now()),
        ),
        (
            column(ColumnType::Json),
            Value::Json(serde_json::json!({"$n": u64::MAX, "x": [1.5, null]})),
        ),
    ]
}

async fn read(store: &RowStore, keys: &[PrimaryKey]) -> Vec<Option<ConformanceRow>> {
    store.get_all(keys).await.expect("get_all")
}

/// Every column type, with and without nulls, extreme values included, round trips.
pub async fn rows_round_trip_every_column_type(factory: RowFactory) {
    let store = factory.create().await;
    let mut extreme = ConformanceRow::sample("extreme", i64::MIN, 0);
    extreme.amount = f64::MAX;
    extreme.payload = (0..=255).collect();
    extreme.at = Utc
        .timestamp_micros(-62_135_596_800_000_000 + 1)
        .single()
        .expect("valid timestamp");
    extreme.doc = Some(
        serde_json::json!({"quote": "'\"", "unicode": "日本", "null": null, "big": 12345678901234i64}),
    );
    extreme.score = Some(i64::MAX);
    let mut empty = ConformanceRow::sample("", 0, 3);
    empty.note = Some(String::new());
    empty.payload = Vec::new();
    empty.amount = -0.5;
    let rows = vec![
        ConformanceRow::sample("t", 1, 1),
        ConformanceRow::sample("t", 2, 12),
        ConformanceRow::sample("t", 3, 60),
        extreme,
        empty,
    ];
    store.upsert_all(&rows).await.expect("upsert");
    let keys: Vec<_> = rows.iter().map(ConformanceRow::key).collect();
    let got = read(&store, &keys).await;
    for (row, back) in rows.iter().zip(got) {
        assert_eq!(back.as_ref(), Some(row));
    }
}

/// Absent keys read as `None`, in request order, duplicates repeated.
pub async fn missing_rows_are_none_in_request_order(factory: RowFactory) {
    let store = factory.create().await;
    let a = ConformanceRow::sample("t", 1, 1);
    store
        .upsert_all(std::slice::from_ref(&a))
        .await
        .expect("upsert");
    let got = read(&store, &[key("t", 2), a.key(), key("u", 1), a.key()]).await;
    assert_eq!(got, vec![None, Some(a.clone()), None, Some(a)]);
    assert!(read(&store, &[]).await.is_empty());
}

/// A second upsert with the same key replaces every column.
pub async fn upsert_replaces_by_primary_key(factory: RowFactory) {
    let store = factory.create().await;
    store
        .upsert_all(&[ConformanceRow::sample("t", 1, 1)])
        .await
        .expect("upsert");
    let replacement = ConformanceRow::sample("t", 1, 60); // note, doc, score become null
    store
        .upsert_all(std::slice::from_ref(&replacement))
        .await
        .expect("upsert");
    assert_eq!(read(&store, &[key("t", 1)]).await, vec![Some(replacement)]);
}

/// Applying the same batch twice leaves the table as applying it once.
pub async fn upserting_twice_is_idempotent(factory: RowFactory) {
    let store = factory.create().await;
    let rows: Vec<_> = (0..50).map(|i| ConformanceRow::sample("t", i, i)).collect();
    store.upsert_all(&rows).await.expect("first");
    store.upsert_all(&rows).await.expect("second");
    let keys: Vec<_> = rows.iter().map(ConformanceRow::key).collect();
    let got = read(&store, &keys).await;
    assert_eq!(got, rows.into_iter().map(Some).collect::<Vec<_>>());
}

/// Within one batch the last change to a key wins, whether upsert or delete.
pub async fn last_change_per_key_in_a_batch_wins(factory: RowFactory) {
    let store = factory.create().await;
    store
        .upsert_all(&[ConformanceRow::sample("t", 9, 9)])
        .await
        .expect("seed");
    let changes = vec![
        RowChange::Upsert(ConformanceRow::sample("t", 1, 1)),
        RowChange::Upsert(ConformanceRow::sample("t", 1, 2)),
        RowChange::Upsert(ConformanceRow::sample("t", 2, 1)),
        RowChange::Delete(key("t", 2)),
        RowChange::Delete(key("t", 9)),
        RowChange::Upsert(ConformanceRow::sample("t", 9, 10)),
        RowChange::Delete(key("t", 3)),
    ];
    store.apply(&changes).await.expect("apply");
    let got = read(
        &store,
        &[key("t", 1), key("t", 2), key("t", 9), key("t", 3)],
    )
    .await;
    assert_eq!(
        got,
        vec![
            Some(ConformanceRow::sample("t", 1, 2)),
            None,
            Some(ConformanceRow::sample("t", 9, 10)),
            None
        ]
    );
}

/// Deletes remove rows by key; absent keys are ignored; other rows stay.
pub async fn delete_removes_rows_and_ignores_absent_keys(factory: RowFactory) {
    let store = factory.create().await;
    let rows: Vec<_> = (0..5).map(|i| ConformanceRow::sample("t", i, i)).collect();
    store.upsert_all(&rows).await.expect("upsert");
    store
        .delete_all(&[key("t", 1), key("t", 3), key("t", 99), key("other", 1)])
        .await
        .expect("delete");
    let keys: Vec<_> = rows.iter().map(ConformanceRow::key).collect();
    let present: Vec<bool> = read(&store, &keys)
        .await
        .iter()
        .map(Option::is_some)
        .collect();
    assert_eq!(present, vec![true, false, true, false, true]);
    store.delete_all(&[]).await.expect("empty delete");
}

/// 5,000 rows in one call (more than any native batch): all written, all deleted.
pub async fn row_batch_larger_than_native_limit(factory: RowFactory) {
    let store = factory.create().await;
    let n = 5_000.max(2 * store.capabilities().max_batch_size.min(50_000) as i64 + 1);
    let rows: Vec<_> = (0..n)
        .map(|i| ConformanceRow::sample("bulk", i, i))
        .collect();
    store.upsert_all(&rows).await.expect("bulk upsert");
    let keys: Vec<_> = rows.iter().map(ConformanceRow::key).collect();
    let got = read(&store, &keys).await;
    assert_eq!(got.iter().filter(|r| r.is_some()).count(), n as usize);
    assert_eq!(got[n as usize - 1].as_ref(), rows.last());
    store.delete_all(&keys).await.expect("bulk delete");
    assert!(read(&store, &keys).await.iter().all(Option::is_none));
}

/// Text keys and values with quotes, backslashes, SQL and JSON metacharacters and
/// unicode round trip. Text containing NUL either round trips or is rejected with a
/// typed [`RowError`](flows_core::RowError) that writes nothing (PostgreSQL's `text` cannot hold NUL).
pub async fn hostile_text_round_trips_or_is_rejected(factory: RowFactory) {
    let store = factory.create().await;
    let texts = [
        "'",
        "\"",
        "\\",
        "'; DROP TABLE conformance_rows; --",
        "{\"$set\": 1}",
        "%_",
        "日本語 🦀",
        " padded ",
        "line\nbreak",
    ];
    let rows: Vec<_> = texts
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let mut row = ConformanceRow::sample(t, i as i64, i as i64);
            row.note = Some((*t).to_owned());
            row
        })
        .collect();
    store.upsert_all(&rows).await.expect("hostile text upsert");
    let keys: Vec<_> = rows.iter().map(ConformanceRow::key).collect();
    assert_eq!(
        read(&store, &keys).await,
        rows.into_iter().map(Some).collect::<Vec<_>>()
    );

    let mut nul = ConformanceRow::sample("nul\0key", 1, 1);
    nul.note = Some("nul\0value".into());
    let good = ConformanceRow::sample("good", 1, 1);
    match store.upsert_all(&[good.clone(), nul.clone()]).await {
        Ok(()) => assert_eq!(read(&store, &[nul.key()]).await, vec![Some(nul)]),
        Err(RepositoryError::Row(_)) => {
            assert_eq!(
                read(&store, &[good.key()]).await,
                vec![None],
                "a rejected batch wrote rows"
            );
        }
        Err(other) => panic!("NUL in text must round trip or be a RowError, got {other}"),
    }
}

/// Rows a store may refuse, each named: text and JSON with NUL (PostgreSQL), a
/// timestamp before 4713 BC (PostgreSQL), a 450 KB row (DynamoDB's 400 KB items), a
/// 17 MB row (MongoDB's 16 MiB documents, and DynamoDB), an empty key text and an
/// extreme float (which every store should hold).
pub fn rows_a_store_may_refuse() -> Vec<(&'static str, ConformanceRow)> {
    let row = |name: &str, change: &dyn Fn(&mut ConformanceRow)| {
        let mut row = ConformanceRow::sample(name, 7, 7);
        change(&mut row);
        row
    };
    vec![
        (
            "nul-text",
            row("nul-text", &|r| r.note = Some("a\0b".into())),
        ),
        (
            "nul-json",
            row("nul-json", &|r| {
                r.doc = Some(serde_json::json!({"text": "a\u{0}b"}))
            }),
        ),
        (
            "ancient",
            row("ancient", &|r| {
                r.at = Utc
                    .with_ymd_and_hms(-5000, 1, 1, 0, 0, 0)
                    .single()
                    .expect("a valid date")
            }),
        ),
        (
            "450-kb",
            row("450-kb", &|r| r.payload = vec![7; 450 * 1024]),
        ),
        (
            "17-mb",
            row("17-mb", &|r| r.payload = vec![8; 17 * 1024 * 1024]),
        ),
        ("", row("", &|_| ())),
        (
            "extreme-float",
            row("extreme-float", &|r| r.amount = -1e300),
        ),
    ]
}

/// The names of the rows of [`rows_a_store_may_refuse`] that `store` refuses, checking
/// that [`write_isolating`](flows_core::row::write_isolating) wrote every other row of
/// the batch (good rows around them included, read back exactly) and none it refused.
pub async fn refused_rows(store: &RowStore) -> Vec<&'static str> {
    use flows_core::backend::{RowChangeRef, ValidChange, write_isolating};
    let schema = store.schema().clone();
    let mut rows: Vec<(&'static str, ConformanceRow)> = Vec::new();
    for (i, awkward) in rows_a_store_may_refuse().into_iter().enumerate() {
        rows.push(("good", ConformanceRow::sample("good", i as i64, i as i64)));
        rows.push(awkward);
    }
    rows.push(("good", ConformanceRow::sample("good", 99, 99)));
    let sources: Vec<Vec<ValidChange>> = rows
        .iter()
        .map(|(_, row)| {
            vec![ValidChange::new(&schema, RowChangeRef::Upsert(row)).expect("fits the schema")]
        })
        .collect();
    let refused = write_isolating(store.as_ref(), &sources)
        .await
        .expect("the store stays available");
    let names: Vec<&'static str> = refused.iter().map(|(i, _)| rows[*i].0).collect();
    assert!(!names.contains(&"good"), "good rows refused: {refused:?}");
    for (_, error) in &refused {
        assert!(error.is_rejection(), "a refusal is typed: {error}");
    }
    let keys: Vec<PrimaryKey> = rows.iter().map(|(_, row)| row.key()).collect();
    let stored = read(store, &keys).await;
    for (index, ((name, row), stored)) in rows.iter().zip(stored).enumerate() {
        if refused.iter().any(|(i, _)| *i == index) {
            assert_eq!(stored, None, "{name:?} was refused but written");
        } else {
            assert_eq!(
                stored.as_ref(),
                Some(row),
                "{name:?} was accepted but differs"
            );
        }
    }
    names
}

/// Rows a store cannot hold are refused alone, typed, and the rest of their batch is
/// written: what a materialising pipeline relies on to dead-letter exactly the messages
/// whose rows were refused. (Each backend's own tests name which rows it refuses.)
pub async fn refused_rows_are_isolated_and_the_rest_written(factory: RowFactory) {
    let store = factory.create().await;
    let refused = refused_rows(&store).await;
    assert!(!refused.contains(&"extreme-float"), "{refused:?}");
}

/// Two stores from the factory (different tables) do not see each other's rows.
pub async fn row_tables_are_isolated(factory: RowFactory) {
    let first = factory.create().await;
    let second = factory.create().await;
    let row = ConformanceRow::sample("t", 1, 1);
    first
        .upsert_all(std::slice::from_ref(&row))
        .await
        .expect("upsert");
    assert_eq!(read(&second, &[row.key()]).await, vec![None]);
    second.delete_all(&[row.key()]).await.expect("delete");
    assert_eq!(read(&first, &[row.key()]).await, vec![Some(row)]);
}

#[derive(Clone, Debug)]
enum RowOp {
    Apply(Vec<(usize, Option<i64>)>),
}

/// Random batches of upserts and deletes over a small key pool leave the store equal to
/// the in-memory model after every batch.
pub fn rows_state_machine_matches_in_memory_model(factory: RowFactory) {
    const POOL: i64 = 6;
    let op = proptest::collection::vec((0..POOL as usize, proptest::option::of(0i64..100)), 0..10)
        .prop_map(RowOp::Apply);
    crate::run_property(
        24,
        proptest::collection::vec(op, 1..12),
        move |ops: Vec<RowOp>| {
            let factory = factory.clone();
            Box::pin(async move {
                let store = factory.create().await;
                let model = MemoryUpsertRepository::<ConformanceRow>::new();
                let keys: Vec<_> = (0..POOL).map(|i| key("sm", i)).collect();
                for (step, RowOp::Apply(changes)) in ops.iter().enumerate() {
                    let changes: Vec<_> = changes
                        .iter()
                        .map(|(k, n)| match n {
                            Some(n) => {
                                RowChange::Upsert(ConformanceRow::sample("sm", *k as i64, *n))
                            }
                            None => RowChange::Delete(key("sm", *k as i64)),
                        })
                        .collect();
                    model.apply(&changes).await.expect("model apply");
                    store.apply(&changes).await.expect("store apply");
                    let expected = model.get_all(&keys).await.expect("model read");
                    let actual = store.get_all(&keys).await.expect("store read");
                    prop_assert_eq!(actual, expected, "step {} diverged", step);
                }
                Ok(())
            })
        },
    );
}
