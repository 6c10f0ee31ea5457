//! Group commit: concurrent writers of one database share a write transaction.
//!
//! SQLite has one writer at a time, and each commit appends every page the transaction
//! dirtied to the WAL. Partition workers writing batches of states at once would each
//! rewrite the same pages in a transaction of their own. Here a writer that finds others
//! queued behind it leaves the transaction open for them; the last one commits it for
//! all. Each writer's work sits in a savepoint, so a conflict or a refused row undoes
//! only that writer's part, and a writer returns only once its part is committed.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use flows_core::RepositoryError;
use sqlx::{Sqlite, SqliteConnection, SqlitePool, Transaction};
use tokio::sync::{Mutex, OwnedMutexGuard, oneshot};

use crate::error::map_err;

/// How long a writer waits for the group's commit before committing it itself (when the
/// writer expected to commit was cancelled before its turn).
const COMMIT_WAIT: Duration = Duration::from_millis(50);

/// The outcome of a group's commit, as its members hear it.
type Committed = Result<(), String>;

/// The write transaction shared by the writers of one database.
#[derive(Clone, Debug, Default)]
pub(crate) struct GroupCommit {
    open: Arc<Mutex<OpenGroup>>,
    /// Writers waiting for their turn: while there are any, the transaction stays open.
    queued: Arc<AtomicUsize>,
}

impl GroupCommit {
    /// Transactions committed so far.
    #[cfg(test)]
    async fn commits(&self) -> usize {
        self.open.lock().await.commits
    }
}

#[derive(Debug, Default)]
struct OpenGroup {
    tx: Option<Transaction<'static, Sqlite>>,
    /// Writers whose part is in `tx`, waiting for it to be committed.
    members: Vec<oneshot::Sender<Committed>>,
    /// Set while a writer's part is being written: still set when the next writer comes,
    /// the last one was cancelled halfway and the transaction cannot be trusted.
    writing: bool,
    /// Transactions committed (for tests).
    #[cfg(test)]
    commits: usize,
}

impl OpenGroup {
    /// Rolls the transaction back (by dropping it) and tells its members: their writes
    /// are gone, and they may retry.
    fn abandon(&mut self) {
        self.tx = None;
        self.members.clear();
    }

    /// Commits the transaction and tells its members.
    async fn commit(&mut self) -> Result<(), RepositoryError> {
        let members = std::mem::take(&mut self.members);
        let Some(tx) = self.tx.take() else {
            return Ok(());
        };
        let result = tx.commit().await.map_err(map_err);
        #[cfg(test)]
        {
            self.commits += 1;
        }
        let heard = result.as_ref().map(|_| ()).map_err(ToString::to_string);
        for member in members {
            let _ = member.send(heard.clone());
        }
        result
    }
}

/// Decrements the queue count when a waiting writer gets its turn or is cancelled.
struct Queued(Arc<AtomicUsize>);

impl Drop for Queued {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A writer's turn in the group's transaction: write with
/// [`connection`](Self::connection), then [`finish`](Self::finish).
pub(crate) struct GroupWrite {
    group: OwnedMutexGuard<OpenGroup>,
    open: Arc<Mutex<OpenGroup>>,
    queued: Arc<AtomicUsize>,
}

impl GroupCommit {
    /// Waits for this writer's turn and opens its savepoint (and the transaction, if
    /// none is open).
    pub(crate) async fn join(&self, pool: &SqlitePool) -> Result<GroupWrite, RepositoryError> {
        self.queued.fetch_add(1, Ordering::SeqCst);
        let queued = Queued(Arc::clone(&self.queued));
        let mut group = Arc::clone(&self.open).lock_owned().await;
        drop(queued);
        if group.writing {
            tracing::warn!("a SQLite write was interrupted; rolling back its group's transaction");
            group.abandon();
        }
        if group.tx.is_none() {
            // `BEGIN IMMEDIATE` takes the write lock now, so two connections never both
            // read under a shared lock and then deadlock upgrading it.
            group.tx = Some(pool.begin_with("BEGIN IMMEDIATE").await.map_err(map_err)?);
        }
        let mut write = GroupWrite {
            group,
            open: Arc::clone(&self.open),
            queued: Arc::clone(&self.queued),
        };
        let savepoint = sqlx::query("SAVEPOINT flows_write")
            .execute(write.connection()?)
            .await
            .map_err(map_err);
        if let Err(error) = savepoint {
            write.group.abandon();
            return Err(error);
        }
        write.group.writing = true;
        Ok(write)
    }
}

impl GroupWrite {
    /// The connection, inside this writer's savepoint.
    pub(crate) fn connection(&mut self) -> Result<&mut SqliteConnection, RepositoryError> {
        match self.group.tx.as_mut() {
            Some(tx) => Ok(&mut **tx),
            None => Err(RepositoryError::Unavailable(
                "the SQLite write transaction is gone".into(),
            )),
        }
    }

    /// Ends this writer's part: kept if `outcome` is `Ok` (and then returned once the
    /// group's transaction is committed), undone if it is an error (returned at once).
    pub(crate) async fn finish<T>(
        mut self,
        outcome: Result<T, RepositoryError>,
    ) -> Result<T, RepositoryError> {
        let end = match &outcome {
            Ok(_) => "RELEASE flows_write",
            Err(_) => "ROLLBACK TO flows_write; RELEASE flows_write",
        };
        let ended = match self.connection() {
            Ok(connection) => sqlx::raw_sql(end)
                .execute(connection)
                .await
                .map_err(map_err),
            Err(error) => Err(error),
        };
        self.group.writing = false;
        if let Err(error) = ended {
            self.group.abandon();
            return Err(error);
        }
        let waiting = match &outcome {
            Ok(_) => {
                let (sender, receiver) = oneshot::channel();
                self.group.members.push(sender);
                Some(receiver)
            }
            Err(_) => None,
        };
        // Nobody queued behind: nobody would commit what the group holds.
        if self.queued.load(Ordering::SeqCst) == 0 {
            let committed = self.group.commit().await;
            if waiting.is_some() {
                committed?;
            }
            return outcome;
        }
        let Some(mut receiver) = waiting else {
            return outcome;
        };
        let Self { group, open, .. } = self;
        drop(group);
        loop {
            match tokio::time::timeout(COMMIT_WAIT, &mut receiver).await {
                Ok(Ok(Ok(()))) => return outcome,
                Ok(Ok(Err(error))) => {
                    return Err(RepositoryError::Unavailable(
                        format!("the SQLite commit failed: {error}").into(),
                    ));
                }
                Ok(Err(_)) => {
                    return Err(RepositoryError::Unavailable(
                        "the SQLite write transaction was rolled back (another write in it was interrupted)".into(),
                    ));
                }
                // The writer queued behind may have been cancelled before its turn.
                Err(_) => {
                    let mut group = open.lock().await;
                    if group.writing {
                        // Its last writer was cancelled halfway, and nobody came since.
                        group.abandon();
                    } else if !group.members.is_empty() {
                        group.commit().await?;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SqliteStore;

    async fn store() -> SqliteStore {
        let store = SqliteStore::in_memory().await.unwrap();
        sqlx::query("CREATE TABLE t (id INTEGER PRIMARY KEY)")
            .execute(store.pool())
            .await
            .unwrap();
        store
    }

    async fn insert(write: &mut GroupWrite, id: i64) -> Result<(), RepositoryError> {
        sqlx::query("INSERT INTO t (id) VALUES (?)")
            .bind(id)
            .execute(write.connection()?)
            .await
            .map_err(map_err)?;
        Ok(())
    }

    async fn stored(store: &SqliteStore) -> Vec<i64> {
        sqlx::query_scalar("SELECT id FROM t ORDER BY id")
            .fetch_all(store.pool())
            .await
            .unwrap()
    }

    /// Waits until `count` writers are queued behind the current one.
    async fn queued(store: &SqliteStore, count: usize) {
        while store.group.queued.load(Ordering::SeqCst) < count {
            tokio::task::yield_now().await;
        }
    }

    /// Writes `id` in its own turn, `fail` making its part fail after the insert.
    fn spawn_writer(
        store: &SqliteStore,
        id: i64,
        fail: bool,
    ) -> tokio::task::JoinHandle<Result<(), RepositoryError>> {
        let store = store.clone();
        tokio::spawn(async move {
            let mut write = store.join_write().await?;
            let mut outcome = insert(&mut write, id).await;
            if fail && outcome.is_ok() {
                outcome = Err(RepositoryError::Rejected("refused".into()));
            }
            write.finish(outcome).await
        })
    }

    #[tokio::test]
    async fn queued_writers_share_one_commit_and_each_returns_after_it() {
        let store = store().await;
        let mut first = store.join_write().await.unwrap();
        insert(&mut first, 1).await.unwrap();
        let second = spawn_writer(&store, 2, false);
        let third = spawn_writer(&store, 3, false);
        queued(&store, 2).await;
        let first = tokio::spawn(async move { first.finish(Ok(())).await });
        // The first writer left the transaction open for the others: it returns only
        // with the last one's commit, which holds all three rows.
        for writer in [first, second, third] {
            writer.await.unwrap().unwrap();
        }
        assert_eq!(stored(&store).await, vec![1, 2, 3]);
        assert_eq!(store.group.commits().await, 1);
    }

    #[tokio::test]
    async fn a_failed_part_is_undone_alone() {
        let store = store().await;
        let mut first = store.join_write().await.unwrap();
        insert(&mut first, 1).await.unwrap();
        let refused = spawn_writer(&store, 2, true);
        let third = spawn_writer(&store, 3, false);
        queued(&store, 2).await;
        first.finish(Ok(())).await.unwrap();
        assert!(matches!(
            refused.await.unwrap(),
            Err(RepositoryError::Rejected(_))
        ));
        third.await.unwrap().unwrap();
        assert_eq!(stored(&store).await, vec![1, 3]);
    }

    #[tokio::test]
    async fn a_writer_cancelled_halfway_rolls_its_group_back_and_its_members_retry() {
        let store = store().await;
        let mut first = store.join_write().await.unwrap();
        insert(&mut first, 1).await.unwrap();
        // The second writer queues, so the first leaves its row uncommitted for it.
        let (written, has_written) = oneshot::channel();
        let mut second = {
            let store = store.clone();
            tokio::spawn(async move {
                let mut write = store.join_write().await.unwrap();
                insert(&mut write, 2).await.unwrap();
                let _ = written.send(());
                // Cancelled here: its part is written, not finished.
                std::future::pending::<()>().await;
                drop(write);
            })
        };
        queued(&store, 1).await;
        let first = tokio::spawn(async move { first.finish(Ok(())).await });
        // The second writer's turn comes only after the first left the commit to it: the
        // first waits for a commit that the cancelled one will never make.
        has_written.await.unwrap();
        second.abort();
        let _ = (&mut second).await;
        let error = first.await.unwrap().unwrap_err();
        assert!(matches!(error, RepositoryError::Unavailable(_)), "{error}");
        // Neither row was committed, and the next writer starts afresh.
        spawn_writer(&store, 3, false).await.unwrap().unwrap();
        assert_eq!(stored(&store).await, vec![3]);
    }

    #[tokio::test]
    async fn a_writer_cancelled_before_its_turn_leaves_the_commit_to_the_waiting_ones() {
        let store = store().await;
        let mut first = store.join_write().await.unwrap();
        insert(&mut first, 1).await.unwrap();
        // A writer queued behind the first one (which therefore leaves the commit to
        // it), cancelled before its turn: nobody comes to commit.
        let cancelled = Queued(Arc::clone(&store.group.queued));
        store.group.queued.fetch_add(1, Ordering::SeqCst);
        // Only the waiting writer's own fallback can commit: the queued one never comes.
        let finished = tokio::spawn(async move { first.finish(Ok(())).await });
        tokio::time::timeout(Duration::from_secs(10), finished)
            .await
            .expect("the waiting writer commits by itself")
            .unwrap()
            .unwrap();
        drop(cancelled);
        assert_eq!(stored(&store).await, vec![1]);
    }
}
