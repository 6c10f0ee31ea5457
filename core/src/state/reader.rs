//! States read back typed: decoded with the state's own format, for tests, tools and
//! query routes, so no caller decodes raw content by hand.

use crate::format::{Format, FormatError};
use crate::id::{InvalidPersistenceId, PersistenceId};
use crate::repository::{RepositoryError, SingleStateRepository};
use crate::state::{RawState, State};

/// Why a typed state could not be read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReadStateError {
    /// The id is not a valid persistence id.
    #[error(transparent)]
    Id(#[from] InvalidPersistenceId),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] RepositoryError),
    /// The stored content does not decode with the format.
    #[error("state {id}: {source}")]
    Decode {
        /// The state's id.
        id: PersistenceId,
        /// The format's error.
        #[source]
        source: FormatError,
    },
}

/// Reads a store's states decoded with `format`, the format the stateful function
/// writes them with.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use flows_core::{Json, MemoryStateRepository, SingleStateRepository, StateReader, State};
///
/// let store = MemoryStateRepository::new();
/// let fox = flows_core::PersistenceId::new("fox")?;
/// store.upsert(&State::fresh(fox).with_content(b"3".to_vec())).await?;
/// let counts = StateReader::new(store, Json::<i64>::new());
/// assert_eq!(counts.content("fox").await?, Some(3));
/// assert_eq!(counts.content("hen").await?, None);
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct StateReader<R, F> {
    store: R,
    format: F,
}

impl<R: SingleStateRepository, F> StateReader<R, F> {
    /// A reader of `store`'s states in `format`.
    pub fn new(store: R, format: F) -> Self {
        Self { store, format }
    }

    /// The state of `id`, its content decoded (`None` before its first write).
    pub async fn get<S>(&self, id: &PersistenceId) -> Result<State<S>, ReadStateError>
    where
        F: Format<S>,
    {
        decode(&self.format, self.store.get(id).await?)
    }

    /// The states of `ids`, in order, their contents decoded.
    pub async fn get_all<S>(&self, ids: &[PersistenceId]) -> Result<Vec<State<S>>, ReadStateError>
    where
        F: Format<S>,
    {
        let raw = self.store.get_all(ids).await?;
        raw.into_iter().map(|s| decode(&self.format, s)).collect()
    }

    /// Just the content of the state named `id` (`None` before its first write).
    pub async fn content<S>(&self, id: impl AsRef<str>) -> Result<Option<S>, ReadStateError>
    where
        F: Format<S>,
    {
        let id = PersistenceId::new(id.as_ref())?;
        Ok(self.get(&id).await?.content)
    }
}

fn decode<S>(format: &impl Format<S>, raw: RawState) -> Result<State<S>, ReadStateError> {
    let content = match &raw.content {
        Some(bytes) => Some(
            format
                .decode(bytes)
                .map_err(|source| ReadStateError::Decode {
                    id: raw.id.clone(),
                    source,
                })?,
        ),
        None => None,
    };
    let state = raw.map_content(|_| ());
    Ok(State {
        id: state.id,
        content,
        progress: state.progress,
        results: state.results,
        version: state.version,
        created_at: state.created_at,
        updated_at: state.updated_at,
    })
}
