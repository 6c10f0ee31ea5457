//! Group commit: concurrent writers of one database share a write transaction.
//!
//! SQLite has one writer at a time, and each commit appends every page the transaction
//! dirtied to the WAL. Partition workers writing batches of states at once would each
//! rewrite the same pages in a transaction of their own. Here a writer that finds others
//! queued behind it leaves the transaction open for them; the last one commits it for
//! all. Each writer joining an open transaction works in a savepoint, so a conflict or
//! a refused row undoes only that writer's part, and a writer returns only once its part
//! is committed. The writer that opens the transaction needs no savepoint (its part is
//! all the transaction holds, undone by rolling it back): a savepoint makes SQLite copy
//! every page it changes to the sub-journal first, a few percent of a SQLite word
//! count's CPU time when every write had one.

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
    /// Whether this writer opened the transaction: then its part is all the
    /// transaction holds, and it has no savepoint.
    opened: bool,
    /// For a new transaction when an opener undoes its part.
    pool: SqlitePool,
}

impl GroupCommit {
    /// Waits for this writer's turn and opens the transaction, or, if one is open, a
    /// savepoint in it.
    pub(crate) async fn join(&self, pool: &SqlitePool) -> Result<GroupWrite, RepositoryError> {
        self.queued.fetch_add(1, Ordering::SeqCst);
        let queued = Queued(Arc::clone(&self.queued));
        let mut group = Arc::clone(&self.open).lock_owned().await;
        drop(queued);
        if group.writing {
            tracing::warn!("a SQLite write was interrupted; rolling back its group's transaction");
            group.abandon();
        }
        let opened = group.tx.is_none();
        if opened {
            group.tx = Some(begin(pool).await?);
        }
        let mut write = GroupWrite {
            group,
            open: Arc::clone(&self.open),
            queued: Arc::clone(&self.queued),
            opened,
            pool: pool.clone(),
        };
        if !opened {
            let savepoint = sqlx::query("SAVEPOINT flows_write")
                .execute(write.connection()?)
                .await
                .map_err(map_err);
            if let Err(error) = savepoint {
                write.group.abandon();
                return Err(error);
            }
        }
        write.group.writing = true;
        Ok(write)
    }
}

/// A write transaction. `BEGIN IMMEDIATE` takes the write lock now, so two connections
/// never both read under a shared lock and then deadlock upgrading it.
async fn begin(pool: &SqlitePool) -> Result<Transaction<'static, Sqlite>, RepositoryError> {
    pool.begin_with("BEGIN IMMEDIATE").await.map_err(map_err)
}

impl GroupWrite {
    /// The connection, inside this writer's transaction (or savepoint, if it joined an
    /// open one).
    pub(crate) fn connection(&mut self) -> Result<&mut SqliteConnection, RepositoryError> {
        match self.group.tx.as_mut() {
            Some(tx) => Ok(&mut **tx),
            None => Err(RepositoryError::Unavailable(
                "the SQLite write transaction is gone".into(),
            )),
        }
    }

    /// Rolls back the transaction this writer opened: its part is all it holds.
    async fn rollback(&mut self) -> Result<(), RepositoryError> {
        match self.group.tx.take() {
            Some(tx) => tx.rollback().await.map_err(map_err),
            None => Ok(()),
        }
    }

    /// Runs `sql`, which releases this writer's savepoint or rolls back to it.
    async fn end_savepoint(&mut self, sql: &'static str) -> Result<(), RepositoryError> {
        let connection = self.connection()?;
        sqlx::raw_sql(sql)
            .execute(connection)
            .await
            .map(|_| ())
            .map_err(map_err)
    }

    /// Undoes what this writer wrote so far; its turn goes on.
    pub(crate) async fn undo(&mut self) -> Result<(), RepositoryError> {
        let undone = self.undo_part().await;
        if undone.is_err() {
            self.group.abandon();
        }
        undone
    }

    async fn undo_part(&mut self) -> Result<(), RepositoryError> {
        if !self.opened {
            return self.end_savepoint("ROLLBACK TO flows_write").await;
        }
        self.rollback().await?;
        self.group.tx = Some(begin(&self.pool).await?);
        Ok(())
    }

    /// Ends this writer's part: kept if `outcome` is `Ok` (and then returned once the
    /// group's transaction is committed), undone if it is an error (returned at once).
    pub(crate) async fn finish<T>(
        mut self,
        outcome: Result<T, RepositoryError>,
    ) -> Result<T, RepositoryError> {
        let ended = match (&outcome, self.opened) {
            (Ok(_), true) => Ok(()),
            (Err(_), true) => self.rollback().await,
            (Ok(_), false) => self.end_savepoint("RELEASE flows_write").await,
            (Err(_), false) => {
                self.end_savepoint("ROLLBACK TO flows_write; RELEASE flows_write")
                    .await
            }
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

    /// The writer that opens the transaction, having written row 1.
    async fn first_writer(store: &SqliteStore) -> GroupWrite {
        let mut first = store.join_write().await.unwrap();
        insert(&mut first, 1).await.unwrap();
        first
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
        let first = first_writer(&store).await;
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
        let first = first_writer(&store).await;
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
    async fn a_failed_part_of_the_writer_that_opened_the_transaction_is_undone_alone() {
        let store = store().await;
        let first = first_writer(&store).await;
        let second = spawn_writer(&store, 2, false);
        queued(&store, 1).await;
        let refused = first
            .finish::<()>(Err(RepositoryError::Rejected("refused".into())))
            .await;
        assert!(matches!(refused, Err(RepositoryError::Rejected(_))));
        second.await.unwrap().unwrap();
        assert_eq!(stored(&store).await, vec![2]);
    }

    /// Writes `undone`, undoes it, then writes `kept`, in one turn.
    async fn write_undo_write(
        write: &mut GroupWrite,
        undone: i64,
        kept: i64,
    ) -> Result<(), RepositoryError> {
        insert(write, undone).await?;
        write.undo().await?;
        insert(write, kept).await
    }

    #[tokio::test]
    async fn undo_drops_the_part_so_far_and_the_turn_goes_on() {
        let store = store().await;
        // The writer that opens the transaction.
        let mut first = store.join_write().await.unwrap();
        let outcome = write_undo_write(&mut first, 1, 2).await;
        // One that joins it: the other parts stay.
        let second = {
            let store = store.clone();
            tokio::spawn(async move {
                let mut write = store.join_write().await?;
                let outcome = write_undo_write(&mut write, 3, 4).await;
                write.finish(outcome).await
            })
        };
        queued(&store, 1).await;
        let first = tokio::spawn(async move { first.finish(outcome).await });
        first.await.unwrap().unwrap();
        second.await.unwrap().unwrap();
        assert_eq!(stored(&store).await, vec![2, 4]);
        assert_eq!(store.group.commits().await, 1);
    }

    #[tokio::test]
    async fn a_writer_cancelled_halfway_rolls_its_group_back_and_its_members_retry() {
        let store = store().await;
        let first = first_writer(&store).await;
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
        let first = first_writer(&store).await;
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
