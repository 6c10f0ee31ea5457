//! `#[derive(Row)]` end to end: the schema it builds, values in that schema's order, and
//! a round trip of every column type, JSON columns, renames and skipped fields through
//! the in-memory table (every backend's conformance suite round-trips the derived
//! `ConformanceRow` through its own store).

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use chrono::{DateTime, TimeZone, Utc};
use flows_core::{
    ColumnType, MemoryUpsertRepository, PrimaryKey, Row, RowChange, RowError, UpsertRepository,
    Value,
};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Origin {
    file: String,
    line: u32,
}

#[derive(Clone, Debug, PartialEq, Row)]
#[flows(table = "every_type")]
struct EveryType {
    #[flows(key)]
    tenant: String,
    #[flows(key)]
    id: i64,
    small: i32,
    active: bool,
    amount: f64,
    payload: Vec<u8>,
    #[flows(rename = "happened_at")]
    at: DateTime<Utc>,
    doc: serde_json::Value,
    note: Option<String>,
    #[flows(json)]
    origin: Origin,
    #[flows(json)]
    history: Option<Vec<Origin>>,
    #[flows(skip)]
    cached: Option<u64>,
}

fn sample(id: i64) -> EveryType {
    EveryType {
        tenant: "t".into(),
        id,
        small: -7,
        active: true,
        amount: 2.5,
        payload: vec![0, 255, 1],
        at: Utc
            .timestamp_micros(1_700_000_000_000_001)
            .single()
            .unwrap(),
        doc: serde_json::json!({"nested": [1, 2]}),
        note: None,
        origin: Origin {
            file: "a.rs".into(),
            line: 3,
        },
        history: Some(vec![Origin {
            file: "b.rs".into(),
            line: 9,
        }]),
        cached: None,
    }
}

#[test]
fn the_schema_follows_the_fields() {
    let schema = EveryType::schema();
    assert_eq!(schema.table().as_str(), "every_type");
    let columns: Vec<_> = schema
        .columns()
        .iter()
        .map(|c| {
            (
                c.name.as_str().to_owned(),
                c.column_type,
                c.nullable,
                c.primary_key,
            )
        })
        .collect();
    use ColumnType::*;
    let expected = [
        ("tenant", Text, false, true),
        ("id", Int64, false, true),
        ("small", Int64, false, false),
        ("active", Bool, false, false),
        ("amount", Float64, false, false),
        ("payload", Bytes, false, false),
        ("happened_at", Timestamp, false, false),
        ("doc", Json, false, false),
        ("note", Text, true, false),
        ("origin", Json, false, false),
        ("history", Json, true, false),
    ];
    let expected: Vec<_> = expected
        .iter()
        .map(|(n, t, null, key)| ((*n).to_owned(), *t, *null, *key))
        .collect();
    assert_eq!(columns, expected);
    assert_eq!(schema.key_indices(), &[0, 1]);
}

#[test]
fn values_are_in_column_order_and_come_back() {
    let row = sample(1);
    let values = row.to_values().unwrap();
    assert_eq!(values.len(), EveryType::schema().columns().len());
    assert_eq!(values[2], Value::Int64(-7));
    assert_eq!(values[8], Value::Null);
    assert_eq!(
        values[9],
        Value::Json(serde_json::json!({"file": "a.rs", "line": 3}))
    );
    assert_eq!(EveryType::from_values(values).unwrap(), row);
}

#[test]
fn a_value_of_the_wrong_type_is_a_typed_error_naming_its_column() {
    let mut values = sample(1).to_values().unwrap();
    values[3] = Value::Text("yes".into());
    match EveryType::from_values(values) {
        Err(RowError::Type { column, .. }) => assert_eq!(column, "active"),
        other => panic!("{other:?}"),
    }
    let mut values = sample(1).to_values().unwrap();
    values[9] = Value::Json(serde_json::json!({"file": 1}));
    match EveryType::from_values(values) {
        Err(RowError::Invalid { column, .. }) => assert_eq!(column, "origin"),
        other => panic!("{other:?}"),
    }
}

/// A JSON field that does not serialise is an error, not a silently empty column.
#[test]
fn an_unserialisable_json_field_is_an_error() {
    #[derive(Row)]
    struct Odd {
        #[flows(key)]
        id: i64,
        #[flows(json)]
        map: std::collections::HashMap<(i32, i32), i32>,
    }
    let odd = Odd {
        id: 1,
        map: [((1, 2), 3)].into_iter().collect(),
    };
    match odd.to_values() {
        Err(RowError::Invalid { column, .. }) => assert_eq!(column, "map"),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        Odd::schema().table().as_str(),
        "odd",
        "snake case by default"
    );
}

#[tokio::test]
async fn rows_round_trip_through_a_table() {
    let table = MemoryUpsertRepository::<EveryType>::new();
    let rows = [sample(1), sample(2)];
    table
        .apply(
            &rows
                .iter()
                .cloned()
                .map(RowChange::Upsert)
                .collect::<Vec<_>>(),
        )
        .await
        .unwrap();
    let key = PrimaryKey::new(vec![Value::Text("t".into()), Value::Int64(2)]);
    let missing = PrimaryKey::new(vec![Value::Text("t".into()), Value::Int64(3)]);
    assert_eq!(
        table.get_all(&[key, missing]).await.unwrap(),
        vec![Some(rows[1].clone()), None]
    );
}
