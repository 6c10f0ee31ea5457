//! The connection, what the deployment supports, and the bulk-write cycle shared by
//! both repositories.

use flows_core::backend::{TableMode, missing_table};
use std::time::Duration;

use flows_core::RepositoryError;
use mongodb::bson::doc;
use mongodb::error::{ErrorKind, PartialBulkWriteResult, UNKNOWN_TRANSACTION_COMMIT_RESULT};
use mongodb::options::{ClientOptions, WriteModel};
use mongodb::results::VerboseBulkWriteResult;
use mongodb::{Client, ClientSession, Database};

use crate::MAX_BATCH_SIZE;
use crate::error::{DUPLICATE_KEY, is_transient, map_err};

/// Attempts of a transaction that keeps failing with a transient error (a write
/// conflict with a concurrent transaction, a failover) before giving up as unavailable.
const TRANSACTION_ATTEMPTS: u32 = 5;

/// Database used when the URL names none.
pub const DEFAULT_DATABASE: &str = "flows";

/// A MongoDB client bound to one database, shared by the repositories built on it.
#[derive(Clone, Debug)]
pub struct MongoStore {
    client: Client,
    database: Database,
    supports_transactions: bool,
    transactions: bool,
}

impl MongoStore {
    /// Connects with a `mongodb://` or `mongodb+srv://` URL (credentials, TLS, replica
    /// set and pool options come from the URL; the database from its path, default
    /// [`DEFAULT_DATABASE`]) and asks the server whether it supports transactions.
    pub async fn connect(url: &str) -> Result<Self, RepositoryError> {
        let options = ClientOptions::parse(url)
            .await
            .map_err(|e| RepositoryError::Configuration(format!("MongoDB URL: {e}")))?;
        let name = options
            .default_database
            .clone()
            .unwrap_or_else(|| DEFAULT_DATABASE.to_owned());
        let client = Client::with_options(options)
            .map_err(|e| RepositoryError::Configuration(format!("MongoDB client: {e}")))?;
        let database = client.database(&name);
        let hello = database
            .run_command(doc! { "hello": 1 })
            .await
            .map_err(map_err)?;
        // Transactions need a replica set member (`setName`) or a mongos router.
        let supports_transactions =
            hello.contains_key("setName") || hello.get_str("msg").is_ok_and(|m| m == "isdbgrid");
        tracing::debug!(database = %name, supports_transactions, "connected to MongoDB");
        Ok(Self {
            client,
            database,
            supports_transactions,
            transactions: supports_transactions,
        })
    }

    /// Turns multi-document transactions off (or back on where the server supports
    /// them). Without them batch writes are not atomic; see the crate documentation.
    pub fn with_transactions(mut self, enabled: bool) -> Self {
        self.transactions = enabled && self.supports_transactions;
        self
    }

    /// Whether batch writes run in transactions.
    pub fn transactions(&self) -> bool {
        self.transactions
    }

    /// The driver's client.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The database holding the collections.
    pub fn database(&self) -> &Database {
        &self.database
    }

    /// Creates `name` if it does not exist (collections cannot be created implicitly
    /// inside a transaction on every server version).
    pub(crate) async fn create_collection(&self, name: &str) -> Result<(), RepositoryError> {
        match self.database.create_collection(name).await {
            Ok(()) => Ok(()),
            // NamespaceExists: another worker (or an earlier start) created it.
            Err(e) if matches!(e.kind.as_ref(), ErrorKind::Command(c) if c.code == 48) => Ok(()),
            Err(e) => Err(map_err(e)),
        }
    }

    /// Whether the collection `name` exists, under [`TableMode::RequireExisting`];
    /// otherwise creates it if missing.
    pub(crate) async fn prepare_collection(
        &self,
        name: &str,
        mode: TableMode,
    ) -> Result<(), RepositoryError> {
        if mode == TableMode::CreateIfMissing {
            return self.create_collection(name).await;
        }
        let found = self
            .database
            .list_collection_names()
            .filter(doc! { "name": name })
            .await
            .map_err(map_err)?;
        match found.is_empty() {
            false => Ok(()),
            true => Err(missing_table("MongoDB", name)),
        }
    }

    /// Runs `models` (in order, in chunks of [`MAX_BATCH_SIZE`]) in one transaction if
    /// transactions are on, otherwise as unordered bulk writes. In a transaction, a
    /// rejected write (an update that matched nothing when `unmatched_is_rejection`, or
    /// an insert of an existing `_id`) aborts everything and is reported; without one,
    /// the other writes still apply.
    pub(crate) async fn bulk_write(
        &self,
        models: Vec<WriteModel>,
        unmatched_is_rejection: bool,
    ) -> Result<Rejections, RepositoryError> {
        if models.is_empty() {
            return Ok(Rejections::default());
        }
        if !self.transactions {
            return self
                .bulk_write_unordered(models, unmatched_is_rejection)
                .await;
        }
        let mut attempt = 0;
        loop {
            let mut session = self.client.start_session().await.map_err(map_err)?;
            match self
                .in_transaction(&mut session, &models, unmatched_is_rejection)
                .await
            {
                Ok(rejections) => return Ok(rejections),
                Err(error) if is_transient(&error) && attempt + 1 < TRANSACTION_ATTEMPTS => {
                    attempt += 1;
                    tracing::debug!(%error, attempt, "transaction failed transiently; retrying");
                    tokio::time::sleep(Duration::from_millis(10 << attempt)).await;
                }
                Err(error) => return Err(map_err(error)),
            }
        }
    }

    async fn in_transaction(
        &self,
        session: &mut ClientSession,
        models: &[WriteModel],
        unmatched_is_rejection: bool,
    ) -> Result<Rejections, mongodb::error::Error> {
        session.start_transaction().await?;
        let mut rejections = Rejections::default();
        for (chunk_index, chunk) in models.chunks(MAX_BATCH_SIZE).enumerate() {
            let base = chunk_index * MAX_BATCH_SIZE;
            let written = self
                .client
                .bulk_write(chunk.to_vec())
                .ordered(true)
                .verbose_results()
                .session(&mut *session)
                .await;
            if let Err(error) = rejections.record(base, written, unmatched_is_rejection) {
                let _ = session.abort_transaction().await;
                return Err(error);
            }
            if !rejections.is_empty() {
                // The server may already have aborted it (a write error does); either
                // way nothing of the batch is applied.
                let _ = session.abort_transaction().await;
                return Ok(rejections);
            }
        }
        let mut commit_attempts = 0;
        loop {
            match session.commit_transaction().await {
                Ok(()) => return Ok(rejections),
                // Committing again is safe and the only way to learn the outcome.
                Err(e)
                    if e.contains_label(UNKNOWN_TRANSACTION_COMMIT_RESULT)
                        && commit_attempts < 3 =>
                {
                    commit_attempts += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn bulk_write_unordered(
        &self,
        models: Vec<WriteModel>,
        unmatched_is_rejection: bool,
    ) -> Result<Rejections, RepositoryError> {
        let mut rejections = Rejections::default();
        // Owned chunks: nothing is retried here, so the models need no copies.
        let mut models = models.into_iter();
        let mut base = 0;
        loop {
            let chunk: Vec<WriteModel> = models.by_ref().take(MAX_BATCH_SIZE).collect();
            if chunk.is_empty() {
                return Ok(rejections);
            }
            let len = chunk.len();
            let written = self
                .client
                .bulk_write(chunk)
                .ordered(false)
                .verbose_results()
                .await;
            rejections
                .record(base, written, unmatched_is_rejection)
                .map_err(map_err)?;
            base += len;
        }
    }
}

/// Indices (into the models passed to [`MongoStore::bulk_write`]) of rejected writes.
#[derive(Debug, Default)]
pub(crate) struct Rejections(Vec<usize>);

impl Rejections {
    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The rejected indices, ascending.
    pub(crate) fn into_sorted(mut self) -> Vec<usize> {
        self.0.sort_unstable();
        self.0.dedup();
        self.0
    }

    /// Records the rejected writes of one chunk's bulk write (its first model is at
    /// `base`), including those of a partially applied one; any other failure is handed
    /// back.
    fn record(
        &mut self,
        base: usize,
        written: mongodb::error::Result<VerboseBulkWriteResult>,
        unmatched_is_rejection: bool,
    ) -> Result<(), mongodb::error::Error> {
        match written {
            Ok(result) => self.add_unmatched(base, &result, unmatched_is_rejection),
            Err(error) => {
                if !self.add_duplicates(base, &error) {
                    return Err(error);
                }
                if let ErrorKind::BulkWrite(bulk) = error.kind.as_ref()
                    && let Some(PartialBulkWriteResult::Verbose(result)) = &bulk.partial_result
                {
                    self.add_unmatched(base, result, unmatched_is_rejection);
                }
            }
        }
        Ok(())
    }

    fn add_unmatched(&mut self, base: usize, result: &VerboseBulkWriteResult, enabled: bool) {
        if enabled {
            let unmatched = result
                .update_results
                .iter()
                .filter(|(_, r)| r.matched_count == 0);
            self.0.extend(unmatched.map(|(i, _)| base + i));
        }
    }

    /// Records duplicate-key write errors; false if `error` is anything else.
    fn add_duplicates(&mut self, base: usize, error: &mongodb::error::Error) -> bool {
        let ErrorKind::BulkWrite(bulk) = error.kind.as_ref() else {
            return false;
        };
        if !bulk.write_concern_errors.is_empty()
            || bulk.write_errors.values().any(|e| e.code != DUPLICATE_KEY)
        {
            return false;
        }
        self.0.extend(bulk.write_errors.keys().map(|i| base + i));
        true
    }
}
