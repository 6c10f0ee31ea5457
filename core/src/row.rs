//! Materialisation: user rows ([`Row`]) upserted into a table by primary key through an
//! [`UpsertRepository`].
//!
//! A row type describes its table once ([`TableSchema`]) and converts to and from a list
//! of [`Value`]s; backends generate all SQL (or documents, or items) from that, with
//! every name validated, so user code never holds a SQL string.
//!
//! ```
//! use flows_core::{ColumnType, Row, Value};
//!
//! #[derive(Row)]
//! #[flows(table = "word_counts")]
//! struct WordCount {
//!     #[flows(key)]
//!     word: String,
//!     count: i64,
//! }
//!
//! let schema = WordCount::schema();
//! assert_eq!(schema.columns()[1].column_type, ColumnType::Int64);
//! let row = WordCount { word: "fox".into(), count: 3 };
//! assert_eq!(row.to_values()?, [Value::Text("fox".into()), Value::Int64(3)]);
//! # Ok::<(), flows_core::RowError>(())
//! ```
//!
//! `#[derive(Row)]` is the way to write a row type (its attributes are in
//! [`flows_macros`]); implementing [`Row`] by hand is possible, with the values in the
//! schema's column order.

use std::collections::HashMap;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, SubsecRound, Utc};

use crate::id::{InvalidName, TableName};
use crate::repository::{Capabilities, RepositoryError};

/// Why a row or schema was rejected.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum RowError {
    /// The schema itself is invalid.
    #[error("invalid schema for table {table}: {reason}")]
    Schema {
        /// Table name.
        table: String,
        /// What is wrong.
        reason: String,
    },
    /// A table or column name is not a safe identifier.
    #[error(transparent)]
    Name(#[from] InvalidName),
    /// A row had the wrong number of values.
    #[error("table {table} has {expected} columns but a row has {got} values")]
    Arity {
        /// Table name.
        table: String,
        /// Column count.
        expected: usize,
        /// Value count.
        got: usize,
    },
    /// A value does not fit its column.
    #[error("column {column}: expected {expected}, found {found}")]
    Type {
        /// Column name.
        column: String,
        /// The column's type (with nullability).
        expected: String,
        /// What was found.
        found: String,
    },
    /// A value is of the right type but out of range.
    #[error("column {column}: {message}")]
    Invalid {
        /// Column name.
        column: String,
        /// What is wrong.
        message: String,
    },
}

/// The type of a column; each backend maps it to its closest native type.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ColumnType {
    /// Boolean.
    Bool,
    /// 64-bit signed integer.
    Int64,
    /// 64-bit float.
    Float64,
    /// UTF-8 text.
    Text,
    /// Binary.
    Bytes,
    /// UTC timestamp with microsecond precision.
    Timestamp,
    /// A JSON document.
    Json,
}

impl ColumnType {
    fn name(self) -> &'static str {
        match self {
            ColumnType::Bool => "bool",
            ColumnType::Int64 => "int64",
            ColumnType::Float64 => "float64",
            ColumnType::Text => "text",
            ColumnType::Bytes => "bytes",
            ColumnType::Timestamp => "timestamp",
            ColumnType::Json => "json",
        }
    }

    /// Whether a column of this type may be part of a primary key (exact equality).
    pub const fn can_be_key(self) -> bool {
        !matches!(self, ColumnType::Float64 | ColumnType::Json)
    }
}

impl fmt::Display for ColumnType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One column of a table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Column {
    /// Column name (validated like a [`TableName`]).
    pub name: TableName,
    /// Column type.
    pub column_type: ColumnType,
    /// Whether the column accepts [`Value::Null`].
    pub nullable: bool,
    /// Whether the column is part of the primary key.
    pub primary_key: bool,
}

/// A table: its default name and its columns, primary key columns first in key order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TableSchema {
    table: TableName,
    columns: Arc<[Column]>,
    key_indices: Arc<[usize]>,
}

/// Builds a [`TableSchema`].
#[derive(Debug)]
pub struct TableSchemaBuilder {
    table: String,
    columns: Vec<(String, ColumnType, bool, bool)>,
}

impl TableSchemaBuilder {
    /// Adds a primary key column (key columns form the key in the order added).
    pub fn key(mut self, name: &str, column_type: ColumnType) -> Self {
        self.columns
            .push((name.to_owned(), column_type, false, true));
        self
    }

    /// Adds a non-null column.
    pub fn column(mut self, name: &str, column_type: ColumnType) -> Self {
        self.columns
            .push((name.to_owned(), column_type, false, false));
        self
    }

    /// Adds a nullable column.
    pub fn nullable(mut self, name: &str, column_type: ColumnType) -> Self {
        self.columns
            .push((name.to_owned(), column_type, true, false));
        self
    }

    /// Adds a primary key column whose type comes from a Rust type.
    pub fn key_of<T: ColumnValue>(self, name: &str) -> Self {
        self.key(name, T::COLUMN_TYPE)
    }

    /// Adds a column whose type and nullability come from a Rust type.
    pub fn column_of<T: ColumnValue>(self, name: &str) -> Self {
        if T::NULLABLE {
            self.nullable(name, T::COLUMN_TYPE)
        } else {
            self.column(name, T::COLUMN_TYPE)
        }
    }

    /// Validates the schema: safe names, no duplicates, at least one key column, key
    /// columns of exact types.
    pub fn build(self) -> Result<TableSchema, RowError> {
        let table = TableName::new(&self.table)?;
        let schema_error = |reason: String| RowError::Schema {
            table: self.table.clone(),
            reason,
        };
        let mut columns = Vec::with_capacity(self.columns.len());
        for (name, column_type, nullable, primary_key) in &self.columns {
            let name = TableName::new(name)?;
            if columns
                .iter()
                .any(|c: &Column| c.name.as_str().eq_ignore_ascii_case(name.as_str()))
            {
                return Err(schema_error(format!("column {name} appears twice")));
            }
            if *primary_key && !column_type.can_be_key() {
                return Err(schema_error(format!(
                    "column {name} of type {column_type} cannot be part of a primary key"
                )));
            }
            columns.push(Column {
                name,
                column_type: *column_type,
                nullable: *nullable,
                primary_key: *primary_key,
            });
        }
        let key_indices: Vec<usize> = columns
            .iter()
            .enumerate()
            .filter(|(_, c)| c.primary_key)
            .map(|(i, _)| i)
            .collect();
        if key_indices.is_empty() {
            return Err(schema_error("a table needs at least one key column".into()));
        }
        Ok(TableSchema {
            table,
            columns: columns.into(),
            key_indices: key_indices.into(),
        })
    }
}

impl TableSchema {
    /// Starts a schema for a table named `table`.
    pub fn builder(table: &str) -> TableSchemaBuilder {
        TableSchemaBuilder {
            table: table.to_owned(),
            columns: Vec::new(),
        }
    }

    /// The table name.
    pub fn table(&self) -> &TableName {
        &self.table
    }

    /// The same schema under another table name.
    pub fn with_table(mut self, table: TableName) -> Self {
        self.table = table;
        self
    }

    /// All columns in row order.
    pub fn columns(&self) -> &[Column] {
        &self.columns
    }

    /// Positions of the primary key columns in row order.
    pub fn key_indices(&self) -> &[usize] {
        &self.key_indices
    }

    /// The primary key columns in key order.
    pub fn key_columns(&self) -> impl Iterator<Item = &Column> + Clone {
        self.key_indices.iter().map(|&i| &self.columns[i])
    }

    /// Checks that `values` fit this table.
    pub fn check_row(&self, values: &[Value]) -> Result<(), RowError> {
        if values.len() != self.columns.len() {
            return Err(RowError::Arity {
                table: self.table.to_string(),
                expected: self.columns.len(),
                got: values.len(),
            });
        }
        for (column, value) in self.columns.iter().zip(values) {
            check_value(column, value)?;
        }
        Ok(())
    }

    /// Checks that `key` fits this table's primary key.
    pub fn check_key(&self, key: &PrimaryKey) -> Result<(), RowError> {
        if key.0.len() != self.key_indices.len() {
            return Err(RowError::Arity {
                table: format!("{} (primary key)", self.table),
                expected: self.key_indices.len(),
                got: key.0.len(),
            });
        }
        for (column, value) in self.key_columns().zip(key.values()) {
            check_value(column, value)?;
        }
        Ok(())
    }

    /// The primary key of a row (already checked).
    pub fn key_of(&self, values: &[Value]) -> PrimaryKey {
        PrimaryKey(
            self.key_indices
                .iter()
                .map(|&i| values[i].clone())
                .collect(),
        )
    }
}

fn check_value(column: &Column, value: &Value) -> Result<(), RowError> {
    let fits = match value {
        Value::Null => column.nullable,
        other => other.column_type() == Some(column.column_type),
    };
    if fits {
        if let Value::Float64(f) = value
            && !f.is_finite()
        {
            return Err(RowError::Invalid {
                column: column.name.to_string(),
                message: format!("{f} is not a finite number"),
            });
        }
        Ok(())
    } else {
        Err(RowError::Type {
            column: column.name.to_string(),
            expected: format!(
                "{}{}",
                column.column_type,
                if column.nullable { " or null" } else { "" }
            ),
            found: value.type_name().to_owned(),
        })
    }
}

/// One cell value.
#[derive(Clone, Debug)]
pub enum Value {
    /// SQL NULL / absent attribute.
    Null,
    /// Boolean.
    Bool(bool),
    /// 64-bit integer.
    Int64(i64),
    /// Finite 64-bit float.
    Float64(f64),
    /// Text.
    Text(String),
    /// Binary.
    Bytes(Vec<u8>),
    /// UTC timestamp; stores keep microseconds.
    Timestamp(DateTime<Utc>),
    /// JSON document.
    Json(serde_json::Value),
}

impl Value {
    /// The column type this value fits (`None` for null, which fits any nullable column).
    pub fn column_type(&self) -> Option<ColumnType> {
        Some(match self {
            Value::Null => return None,
            Value::Bool(_) => ColumnType::Bool,
            Value::Int64(_) => ColumnType::Int64,
            Value::Float64(_) => ColumnType::Float64,
            Value::Text(_) => ColumnType::Text,
            Value::Bytes(_) => ColumnType::Bytes,
            Value::Timestamp(_) => ColumnType::Timestamp,
            Value::Json(_) => ColumnType::Json,
        })
    }

    fn type_name(&self) -> &'static str {
        self.column_type().map_or("null", ColumnType::name)
    }
}

// Equality is exact: floats compare by bit pattern so that `Value` can be a map key.
impl PartialEq for Value {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Value::Null, Value::Null) => true,
            (Value::Bool(a), Value::Bool(b)) => a == b,
            (Value::Int64(a), Value::Int64(b)) => a == b,
            (Value::Float64(a), Value::Float64(b)) => a.to_bits() == b.to_bits(),
            (Value::Text(a), Value::Text(b)) => a == b,
            (Value::Bytes(a), Value::Bytes(b)) => a == b,
            (Value::Timestamp(a), Value::Timestamp(b)) => a == b,
            (Value::Json(a), Value::Json(b)) => a == b,
            _ => false,
        }
    }
}

impl Eq for Value {}

impl Hash for Value {
    fn hash<H: Hasher>(&self, state: &mut H) {
        std::mem::discriminant(self).hash(state);
        match self {
            Value::Null => {}
            Value::Bool(b) => b.hash(state),
            Value::Int64(i) => i.hash(state),
            Value::Float64(f) => f.to_bits().hash(state),
            Value::Text(s) => s.hash(state),
            Value::Bytes(b) => b.hash(state),
            Value::Timestamp(t) => t.hash(state),
            Value::Json(j) => j.to_string().hash(state),
        }
    }
}

/// A Rust type that maps to one column.
pub trait ColumnValue: Sized {
    /// The column type.
    const COLUMN_TYPE: ColumnType;
    /// Whether the column is nullable (true for `Option<T>`).
    const NULLABLE: bool = false;

    /// Converts to a cell value.
    fn to_value(&self) -> Value;

    /// Converts from a cell value.
    fn from_value(value: Value) -> Result<Self, Value>;

    /// Converts the next value of a row, naming `column` in the error.
    fn from_column(value: Option<Value>, column: &str) -> Result<Self, RowError> {
        let value = value.ok_or_else(|| RowError::Invalid {
            column: column.to_owned(),
            message: "missing value".into(),
        })?;
        Self::from_value(value).map_err(|found| RowError::Type {
            column: column.to_owned(),
            expected: Self::COLUMN_TYPE.name().to_owned(),
            found: found.type_name().to_owned(),
        })
    }
}

macro_rules! column_value {
    ($rust:ty, $variant:ident) => {
        impl ColumnValue for $rust {
            const COLUMN_TYPE: ColumnType = ColumnType::$variant;
            fn to_value(&self) -> Value {
                Value::$variant(self.clone())
            }
            fn from_value(value: Value) -> Result<Self, Value> {
                match value {
                    Value::$variant(v) => Ok(v),
                    other => Err(other),
                }
            }
        }
    };
}

column_value!(bool, Bool);
column_value!(i64, Int64);
column_value!(f64, Float64);
column_value!(String, Text);
column_value!(Vec<u8>, Bytes);
column_value!(DateTime<Utc>, Timestamp);
column_value!(serde_json::Value, Json);

impl ColumnValue for i32 {
    const COLUMN_TYPE: ColumnType = ColumnType::Int64;
    fn to_value(&self) -> Value {
        Value::Int64(i64::from(*self))
    }
    fn from_value(value: Value) -> Result<Self, Value> {
        match value {
            Value::Int64(v) => i32::try_from(v).map_err(|_| Value::Int64(v)),
            other => Err(other),
        }
    }
}

impl<T: ColumnValue> ColumnValue for Option<T> {
    const COLUMN_TYPE: ColumnType = T::COLUMN_TYPE;
    const NULLABLE: bool = true;
    fn to_value(&self) -> Value {
        self.as_ref().map_or(Value::Null, T::to_value)
    }
    fn from_value(value: Value) -> Result<Self, Value> {
        match value {
            Value::Null => Ok(None),
            other => T::from_value(other).map(Some),
        }
    }
}

/// A user type stored as one row of a table.
pub trait Row: Sized + Send + Sync + 'static {
    /// The table: default name, columns, primary key.
    fn schema() -> TableSchema;

    /// The row's values, in column order; an error when a value cannot be represented
    /// (a JSON column whose value does not serialise).
    fn to_values(&self) -> Result<Vec<Value>, RowError>;

    /// Rebuilds a row from values in column order.
    fn from_values(values: Vec<Value>) -> Result<Self, RowError>;
}

/// The primary key of a row: its key columns' values, in key order.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PrimaryKey(Vec<Value>);

impl PrimaryKey {
    /// A key from values in key-column order.
    pub fn new(values: Vec<Value>) -> Self {
        Self(values)
    }

    /// The key's values.
    pub fn values(&self) -> &[Value] {
        &self.0
    }

    /// Consumes the key into its values.
    pub fn into_values(self) -> Vec<Value> {
        self.0
    }
}

impl<T: ColumnValue> From<T> for PrimaryKey {
    fn from(value: T) -> Self {
        Self(vec![value.to_value()])
    }
}

/// One change to a materialised table.
#[derive(Clone, Debug, PartialEq)]
pub enum RowChange<T> {
    /// Insert the row, or replace the row with the same primary key.
    Upsert(T),
    /// Delete the row with this primary key, if any.
    Delete(PrimaryKey),
}

/// A validated, compacted batch of changes: at most one change per primary key (the
/// last one given wins), so upserts and deletes never touch the same row.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ChangeBatch {
    /// Rows to insert or replace, as values in column order.
    pub upserts: Vec<Vec<Value>>,
    /// Keys to delete.
    pub deletes: Vec<PrimaryKey>,
}

impl ChangeBatch {
    /// Validates and compacts `changes` (in order) against `schema`.
    pub fn compact<'a, T: Row>(
        schema: &TableSchema,
        changes: impl IntoIterator<Item = RowChangeRef<'a, T>>,
    ) -> Result<Self, RowError> {
        let mut builder = ChangeBatchBuilder::default();
        for change in changes {
            builder.push(ValidChange::new(schema, change)?);
        }
        Ok(builder.build())
    }

    /// Whether the batch changes nothing.
    pub fn is_empty(&self) -> bool {
        self.upserts.is_empty() && self.deletes.is_empty()
    }
}

/// One change checked against a table's schema: its primary key and, for an upsert,
/// the row's values. Checking changes one by one lets a caller reject a single bad
/// change (one message, say) and still write the rest.
#[derive(Clone, Debug, PartialEq)]
pub struct ValidChange {
    key: PrimaryKey,
    values: Option<Vec<Value>>,
}

impl ValidChange {
    /// Checks `change` against `schema`. Timestamps are cut to microseconds, the
    /// precision every store keeps, so that two keys equal once stored are equal here
    /// too (and the later change to them wins, as within any batch).
    pub fn new<T: Row>(
        schema: &TableSchema,
        change: RowChangeRef<'_, T>,
    ) -> Result<Self, RowError> {
        match change {
            RowChangeRef::Upsert(row) => {
                let mut values = row.to_values()?;
                schema.check_row(&values)?;
                values.iter_mut().for_each(to_stored_precision);
                Ok(Self {
                    key: schema.key_of(&values),
                    values: Some(values),
                })
            }
            RowChangeRef::Delete(key) => {
                schema.check_key(key)?;
                let mut key = key.clone();
                key.0.iter_mut().for_each(to_stored_precision);
                Ok(Self { key, values: None })
            }
        }
    }

    /// The primary key the change applies to.
    pub fn key(&self) -> &PrimaryKey {
        &self.key
    }

    /// The row's values in column order, for an upsert; `None` for a delete.
    pub fn values(&self) -> Option<&[Value]> {
        self.values.as_deref()
    }
}

/// Cuts a timestamp to microseconds, the precision stores keep.
fn to_stored_precision(value: &mut Value) {
    if let Value::Timestamp(t) = value {
        *t = t.trunc_subsecs(6);
    }
}

/// Compacts [`ValidChange`]s, in order, into a [`ChangeBatch`]: the last change to a key
/// wins.
#[derive(Debug, Default)]
pub struct ChangeBatchBuilder {
    // key -> (position of the last change, Some(values) for upsert / None for delete)
    last: HashMap<PrimaryKey, (usize, Option<Vec<Value>>)>,
    next: usize,
}

impl ChangeBatchBuilder {
    /// An empty builder.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a change after all earlier ones.
    pub fn push(&mut self, change: ValidChange) {
        self.last.insert(change.key, (self.next, change.values));
        self.next += 1;
    }

    /// The compacted batch, changes in the order of their last occurrence.
    pub fn build(self) -> ChangeBatch {
        let mut ordered: Vec<_> = self.last.into_iter().collect();
        ordered.sort_by_key(|(_, (position, _))| *position);
        let mut batch = ChangeBatch::default();
        for (key, (_, values)) in ordered {
            match values {
                Some(values) => batch.upserts.push(values),
                None => batch.deletes.push(key),
            }
        }
        batch
    }
}

/// A borrowed [`RowChange`], so batches can be built without cloning rows.
#[derive(Debug)]
pub enum RowChangeRef<'a, T> {
    /// Upsert this row.
    Upsert(&'a T),
    /// Delete by this key.
    Delete(&'a PrimaryKey),
}

impl<'a, T> From<&'a RowChange<T>> for RowChangeRef<'a, T> {
    fn from(change: &'a RowChange<T>) -> Self {
        match change {
            RowChange::Upsert(row) => RowChangeRef::Upsert(row),
            RowChange::Delete(key) => RowChangeRef::Delete(key),
        }
    }
}

/// Idempotent batch upserts and deletes of user rows by primary key: the
/// materialisation store.
///
/// Applying the same batch twice leaves the table as applying it once; within a batch the
/// last change to a key wins. Backends implement [`write`](Self::write) and
/// [`get_all`](Self::get_all); the typed methods are provided.
#[async_trait]
pub trait UpsertRepository<T: Row>: Send + Sync {
    /// What this store can do (`atomic_batch_write`: a batch applies fully or not at all).
    fn capabilities(&self) -> Capabilities;

    /// The table this repository writes.
    fn schema(&self) -> &TableSchema;

    /// Checks one change against what this store can hold beyond the schema (text
    /// with NUL in PostgreSQL, an empty Cassandra partition key, a DynamoDB item over
    /// 400 KB, ...). An engine writing many messages' changes rejects such a change
    /// alone, through its error policy, before writing the rest; `write` must still
    /// refuse it (as [`RepositoryError::Row`] or [`RepositoryError::Rejected`]) if it
    /// gets it. The default accepts everything.
    fn check(&self, change: &ValidChange) -> Result<(), RowError> {
        let _ = change;
        Ok(())
    }

    /// Applies a validated batch.
    async fn write(&self, batch: ChangeBatch) -> Result<(), RepositoryError>;

    /// Reads rows by primary key, in request order (`None` where absent).
    async fn get_all(&self, keys: &[PrimaryKey]) -> Result<Vec<Option<T>>, RepositoryError>;

    /// Applies changes in order (last change per key wins).
    async fn apply(&self, changes: &[RowChange<T>]) -> Result<(), RepositoryError> {
        let batch = ChangeBatch::compact(self.schema(), changes.iter().map(RowChangeRef::from))?;
        self.write(batch).await
    }

    /// Inserts or replaces rows by primary key.
    async fn upsert_all(&self, rows: &[T]) -> Result<(), RepositoryError> {
        let batch = ChangeBatch::compact(self.schema(), rows.iter().map(RowChangeRef::Upsert))?;
        self.write(batch).await
    }

    /// Deletes rows by primary key; absent keys are ignored.
    async fn delete_all(&self, keys: &[PrimaryKey]) -> Result<(), RepositoryError> {
        let batch =
            ChangeBatch::compact::<T>(self.schema(), keys.iter().map(RowChangeRef::Delete))?;
        self.write(batch).await
    }
}

#[async_trait]
impl<T: Row, R: UpsertRepository<T> + ?Sized> UpsertRepository<T> for Arc<R> {
    fn capabilities(&self) -> Capabilities {
        (**self).capabilities()
    }

    fn schema(&self) -> &TableSchema {
        (**self).schema()
    }

    fn check(&self, change: &ValidChange) -> Result<(), RowError> {
        (**self).check(change)
    }

    async fn write(&self, batch: ChangeBatch) -> Result<(), RepositoryError> {
        (**self).write(batch).await
    }

    async fn get_all(&self, keys: &[PrimaryKey]) -> Result<Vec<Option<T>>, RepositoryError> {
        (**self).get_all(keys).await
    }
}

/// Writes the changes of many sources (messages, in order) so that what the store
/// refuses is charged to the sources that produced it and the rest is written: each
/// source's changes are first [checked](UpsertRepository::check); the others are
/// written as one batch (compacted: the last change per key wins) and, if the store
/// refuses it ([`RepositoryError::is_rejection`]), as two halves in order, down to
/// single sources.
///
/// Returns the refused sources (by index into `sources`) with the store's reasons.
/// Any other error (an unavailable store, say) is returned as is: part of the changes
/// may have been written, and writing them all again is idempotent.
///
/// On a store without atomic batches
/// ([`Capabilities::atomic_batch_write`]), a refused batch may have written its other
/// rows, a refused source's among them. Every key a source refused by the store
/// touched is therefore written once more at the end with its last accepted change;
/// a key only refused sources touched may keep what they wrote to it.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// use flows_core::row::{RowChangeRef, ValidChange, write_isolating};
/// use flows_core::{MemoryUpsertRepository, Row};
/// # #[derive(Row)]
/// # #[flows(table = "items")]
/// # struct Item { #[flows(key)] id: i64 }
/// let table = MemoryUpsertRepository::<Item>::new();
/// let schema = Item::schema();
/// let sources: Vec<Vec<ValidChange>> = (0..3)
///     .map(|id| vec![ValidChange::new(&schema, RowChangeRef::Upsert(&Item { id })).unwrap()])
///     .collect();
/// let refused = write_isolating(&table, &sources).await.unwrap();
/// assert!(refused.is_empty());
/// # }
/// ```
pub async fn write_isolating<T: Row, R: UpsertRepository<T> + ?Sized>(
    repository: &R,
    sources: &[Vec<ValidChange>],
) -> Result<Vec<(usize, RepositoryError)>, RepositoryError> {
    let mut refused: Vec<(usize, RepositoryError)> = Vec::new();
    for (index, changes) in sources.iter().enumerate() {
        if let Some(error) = changes.iter().find_map(|c| repository.check(c).err()) {
            refused.push((index, RepositoryError::Row(error)));
        }
    }
    let is_refused = |index: usize, refused: &[(usize, RepositoryError)]| {
        refused.iter().any(|(i, _)| *i == index)
    };
    // Ranges of sources still to write, the next one last; a range is written whole or
    // split in two, left before right, so changes keep their order.
    let mut ranges = vec![(0, sources.len())];
    while let Some((start, end)) = ranges.pop() {
        let mut batch = ChangeBatchBuilder::new();
        for (index, changes) in sources.iter().enumerate().take(end).skip(start) {
            if !is_refused(index, &refused) {
                changes.iter().cloned().for_each(|c| batch.push(c));
            }
        }
        let batch = batch.build();
        if batch.is_empty() {
            continue;
        }
        match repository.write(batch).await {
            Ok(()) => {}
            Err(error) if error.is_rejection() => {
                let live: Vec<usize> = (start..end).filter(|i| !is_refused(*i, &refused)).collect();
                if let [only] = live[..] {
                    refused.push((only, error));
                } else {
                    let middle = live[live.len() / 2];
                    ranges.push((middle, end));
                    ranges.push((start, middle));
                }
            }
            Err(other) => return Err(other),
        }
    }
    refused.sort_by_key(|(index, _)| *index);
    let server_refused = refused
        .iter()
        .any(|(_, error)| !matches!(error, RepositoryError::Row(_)));
    if server_refused && !repository.capabilities().atomic_batch_write {
        restore_last_accepted(repository, sources, &refused).await?;
    }
    Ok(refused)
}

/// Writes, for every key that a refused source changes, its last change by an
/// accepted source: what the key must end with, whatever partial writes of refused
/// batches left there.
async fn restore_last_accepted<T: Row, R: UpsertRepository<T> + ?Sized>(
    repository: &R,
    sources: &[Vec<ValidChange>],
    refused: &[(usize, RepositoryError)],
) -> Result<(), RepositoryError> {
    let is_refused = |index: usize| refused.iter().any(|(i, _)| *i == index);
    let touched: std::collections::HashSet<&PrimaryKey> = refused
        .iter()
        .flat_map(|(index, _)| sources[*index].iter().map(ValidChange::key))
        .collect();
    let mut batch = ChangeBatchBuilder::new();
    for (index, changes) in sources.iter().enumerate() {
        if !is_refused(index) {
            changes
                .iter()
                .filter(|c| touched.contains(c.key()))
                .cloned()
                .for_each(|c| batch.push(c));
        }
    }
    let batch = batch.build();
    if batch.is_empty() {
        return Ok(());
    }
    repository.write(batch).await
}

/// Rebuilds rows from the values a backend found, in request order.
pub fn rows_in_request_order<T: Row>(
    keys: &[PrimaryKey],
    found: &HashMap<PrimaryKey, Vec<Value>>,
) -> Result<Vec<Option<T>>, RepositoryError> {
    keys.iter()
        .map(|key| {
            found
                .get(key)
                .map(|values| T::from_values(values.clone()))
                .transpose()
                .map_err(RepositoryError::from)
        })
        .collect()
}

/// What `#[derive(Row)]` generates code against; not for hand-written code.
#[doc(hidden)]
pub mod __derive {
    use serde::Serialize;
    use serde::de::DeserializeOwned;

    use super::{ColumnValue, RowError, TableSchema, Value};
    use crate::TableName;

    /// Fails compilation (the derive calls it in a `const`) for an unsafe name, saying
    /// `message`.
    pub const fn check_name(name: &str, message: &'static str) {
        if TableName::problem(name).is_some() {
            panic!("{}", message);
        }
    }

    /// Fails compilation for a key column that could be null or is not compared exactly.
    pub const fn check_key<T: ColumnValue>() {
        assert!(
            !T::NULLABLE,
            "a key column cannot be an Option: keys are never null"
        );
        assert!(
            T::COLUMN_TYPE.can_be_key(),
            "a key column must compare exactly: floats and JSON cannot be keys"
        );
    }

    /// A schema the compile-time checks let through but the builder refused: a bug in
    /// the derive, reported as one.
    #[cold]
    pub fn invalid_schema(error: RowError) -> TableSchema {
        panic!("derive(Row) generated an invalid schema ({error}); please report it")
    }

    fn json_error(column: &str, error: serde_json::Error) -> RowError {
        RowError::Invalid {
            column: column.to_owned(),
            message: format!("not representable as JSON: {error}"),
        }
    }

    /// A `#[flows(json)]` field's value.
    pub fn json_to_value<T: Serialize>(value: &T, column: &str) -> Result<Value, RowError> {
        serde_json::to_value(value)
            .map(Value::Json)
            .map_err(|e| json_error(column, e))
    }

    /// An optional `#[flows(json)]` field's value (`None`: null).
    pub fn json_option_to_value<T: Serialize>(
        value: &Option<T>,
        column: &str,
    ) -> Result<Value, RowError> {
        match value {
            Some(value) => json_to_value(value, column),
            None => Ok(Value::Null),
        }
    }

    /// A `#[flows(json)]` field read back.
    pub fn json_from_column<T: DeserializeOwned>(
        value: Option<Value>,
        column: &str,
    ) -> Result<T, RowError> {
        let json = serde_json::Value::from_column(value, column)?;
        serde_json::from_value(json).map_err(|e| json_error(column, e))
    }

    /// An optional `#[flows(json)]` field read back (null: `None`).
    pub fn json_option_from_column<T: DeserializeOwned>(
        value: Option<Value>,
        column: &str,
    ) -> Result<Option<T>, RowError> {
        match Option::<serde_json::Value>::from_column(value, column)? {
            Some(json) => serde_json::from_value(json)
                .map(Some)
                .map_err(|e| json_error(column, e)),
            None => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flows_macros::Row;

    #[derive(Debug, Clone, PartialEq, Row)]
    #[flows(table = "items")]
    struct Item {
        #[flows(key)]
        id: String,
        qty: i64,
        note: Option<String>,
    }

    fn item(id: &str, qty: i64) -> Item {
        Item {
            id: id.into(),
            qty,
            note: None,
        }
    }

    #[test]
    fn schema_rejects_unsafe_names_missing_keys_and_float_keys() {
        assert!(matches!(
            TableSchema::builder("x; drop")
                .key("id", ColumnType::Text)
                .build(),
            Err(RowError::Name(_))
        ));
        assert!(
            TableSchema::builder("t")
                .column("a", ColumnType::Text)
                .build()
                .is_err()
        );
        assert!(
            TableSchema::builder("t")
                .key("a", ColumnType::Float64)
                .build()
                .is_err()
        );
        assert!(
            TableSchema::builder("t")
                .key("a", ColumnType::Text)
                .column("A", ColumnType::Text)
                .build()
                .is_err()
        );
    }

    #[test]
    fn compaction_keeps_the_last_change_per_key() {
        let schema = Item::schema();
        let changes = [
            RowChange::Upsert(item("a", 1)),
            RowChange::Upsert(item("b", 1)),
            RowChange::Delete(PrimaryKey::from("a".to_owned())),
            RowChange::Upsert(item("b", 2)),
            RowChange::Delete(PrimaryKey::from("c".to_owned())),
            RowChange::Upsert(item("c", 3)),
        ];
        let batch = ChangeBatch::compact(&schema, changes.iter().map(RowChangeRef::from)).unwrap();
        assert_eq!(batch.deletes, vec![PrimaryKey::from("a".to_owned())]);
        assert_eq!(
            batch.upserts,
            vec![
                item("b", 2).to_values().unwrap(),
                item("c", 3).to_values().unwrap()
            ]
        );
    }

    #[test]
    fn rows_are_checked_against_the_schema() {
        let schema = Item::schema();
        let err = schema
            .check_row(&[Value::Int64(1), Value::Int64(1), Value::Null])
            .unwrap_err();
        assert!(
            matches!(err, RowError::Type { ref column, .. } if column == "id"),
            "{err}"
        );
        assert!(schema.check_row(&[Value::Null]).is_err());
        assert!(
            schema
                .check_row(&[Value::Text("a".into()), Value::Null, Value::Null])
                .is_err()
        );
        assert!(schema.check_key(&PrimaryKey::from(3i64)).is_err());
    }

    #[test]
    fn option_and_i32_conversions() {
        assert_eq!(Option::<i64>::from_value(Value::Null), Ok(None));
        assert_eq!(
            i32::from_value(Value::Int64(1 << 40)),
            Err(Value::Int64(1 << 40))
        );
        assert!(i64::from_column(Some(Value::Text("x".into())), "n").is_err());
    }

    /// The in-memory table, refusing any row whose note is "bad" (as a database
    /// constraint would: nothing of the refused batch is written, unless `partial`:
    /// then, like a store without atomic batches, the other rows of a refused batch
    /// are written), counting writes.
    struct Picky {
        inner: crate::MemoryUpsertRepository<Item>,
        writes: std::sync::atomic::AtomicUsize,
        partial: bool,
    }

    #[async_trait]
    impl UpsertRepository<Item> for Picky {
        fn capabilities(&self) -> Capabilities {
            self.inner
                .capabilities()
                .with_atomic_batch_write(!self.partial)
        }
        fn schema(&self) -> &TableSchema {
            self.inner.schema()
        }
        fn check(&self, change: &ValidChange) -> Result<(), RowError> {
            match change.values().map(|v| &v[2]) {
                Some(Value::Text(note)) if note == "unstorable" => Err(RowError::Invalid {
                    column: "note".into(),
                    message: "refused before writing".into(),
                }),
                _ => Ok(()),
            }
        }
        async fn write(&self, batch: ChangeBatch) -> Result<(), RepositoryError> {
            self.writes
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let bad = |row: &Vec<Value>| row[2] == Value::Text("bad".into());
            if batch.upserts.iter().any(bad) {
                if self.partial {
                    let accepted = ChangeBatch {
                        upserts: batch.upserts.iter().filter(|r| !bad(r)).cloned().collect(),
                        deletes: batch.deletes.clone(),
                    };
                    self.inner.write(accepted).await?;
                }
                return Err(RepositoryError::Rejected("a bad note".into()));
            }
            self.inner.write(batch).await
        }
        async fn get_all(&self, keys: &[PrimaryKey]) -> Result<Vec<Option<Item>>, RepositoryError> {
            self.inner.get_all(keys).await
        }
    }

    #[tokio::test]
    async fn isolated_writes_charge_refusals_to_their_sources_and_keep_order() {
        let table = Picky {
            inner: crate::MemoryUpsertRepository::new(),
            writes: Default::default(),
            partial: false,
        };
        let schema = Item::schema();
        let noted = |id: &str, qty: i64, note: &str| Item {
            note: Some(note.into()),
            ..item(id, qty)
        };
        // Sixteen sources; "x" is changed by several, in order, around the refused ones.
        let mut rows: Vec<Item> = (0..16).map(|i| item(&format!("k{i}"), i)).collect();
        rows[2] = item("x", 1);
        rows[5] = noted("k5", 5, "bad");
        rows[9] = item("x", 2);
        rows[11] = noted("k11", 11, "unstorable");
        rows[12] = noted("x", 3, "bad");
        let sources: Vec<Vec<ValidChange>> = rows
            .iter()
            .map(|row| vec![ValidChange::new(&schema, RowChangeRef::Upsert(row)).unwrap()])
            .collect();
        let refused = write_isolating(&table, &sources).await.unwrap();
        let indices: Vec<usize> = refused.iter().map(|(i, _)| *i).collect();
        assert_eq!(indices, [5, 11, 12]);
        assert!(
            matches!(refused[1].1, RepositoryError::Row(_)),
            "checked first"
        );
        let keys: Vec<PrimaryKey> = ["x", "k4", "k5", "k6", "k15"]
            .iter()
            .map(|k| PrimaryKey::from((*k).to_owned()))
            .collect();
        let stored = table.get_all(&keys).await.unwrap();
        assert_eq!(
            stored,
            [
                Some(item("x", 2)),
                Some(item("k4", 4)),
                None,
                Some(item("k6", 6)),
                Some(item("k15", 15))
            ],
            "the rest is written, the last accepted change of x wins"
        );
        // Each refusal costs two writes per halving: at most 1 + 2 * 2 * log2(16).
        let writes = table.writes.load(std::sync::atomic::Ordering::Relaxed);
        assert!(writes <= 17, "{writes} writes");
    }

    /// On a store that writes the accepted rows of a refused batch, the rows of a
    /// refused message that were accepted stick, but every key keeps its last accepted
    /// change: a refused message's change to a key does not outlive a later split.
    #[tokio::test]
    async fn without_atomic_batches_each_key_keeps_its_last_accepted_change() {
        let table = Picky {
            inner: crate::MemoryUpsertRepository::new(),
            writes: Default::default(),
            partial: true,
        };
        let schema = Item::schema();
        let noted = |id: &str, qty: i64, note: &str| Item {
            note: Some(note.into()),
            ..item(id, qty)
        };
        let mut rows: Vec<Vec<Item>> = (0..8).map(|i| vec![item(&format!("k{i}"), i)]).collect();
        rows[3] = vec![item("x", 1)];
        // Refused: its change to x must not be what x ends with.
        rows[5] = vec![item("x", 2), noted("k5", 5, "bad")];
        let sources: Vec<Vec<ValidChange>> = rows
            .iter()
            .map(|changes| {
                changes
                    .iter()
                    .map(|row| ValidChange::new(&schema, RowChangeRef::Upsert(row)).unwrap())
                    .collect()
            })
            .collect();
        let refused = write_isolating(&table, &sources).await.unwrap();
        assert_eq!(refused.iter().map(|(i, _)| *i).collect::<Vec<_>>(), [5]);
        let stored = table
            .get_all(&[
                PrimaryKey::from("x".to_owned()),
                PrimaryKey::from("k6".to_owned()),
            ])
            .await
            .unwrap();
        assert_eq!(stored, [Some(item("x", 1)), Some(item("k6", 6))]);
    }

    #[test]
    fn timestamps_are_cut_to_what_stores_keep() {
        let schema = TableSchema::builder("events")
            .key("at", ColumnType::Timestamp)
            .build()
            .unwrap();
        let at = |nanos: i64| Value::Timestamp(DateTime::from_timestamp_nanos(nanos));
        let key = |nanos| PrimaryKey::new(vec![at(nanos)]);
        let a =
            ValidChange::new::<Item>(&schema, RowChangeRef::Delete(&key(1_000_000_500))).unwrap();
        let b =
            ValidChange::new::<Item>(&schema, RowChangeRef::Delete(&key(1_000_000_999))).unwrap();
        assert_eq!(a.key(), b.key(), "equal once stored");
        assert_eq!(a.key(), &key(1_000_000_000));
    }
}
