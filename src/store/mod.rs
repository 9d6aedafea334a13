//! Durable state: task records and results, behind two small traits with an embedded
//! (files on disk) and a MongoDB implementation.
//!
//! Knows nothing of gRPC, locks or the model.

pub mod embedded;
pub mod mongo;

use futures::io::{AsyncRead, AsyncReadExt};
use futures::stream::BoxStream;

use crate::tasks::types::{ResultMeta, TaskRecord};

/// Results are streamed out in chunks of at most this many bytes.
pub const CHUNK_SIZE: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("storage backend unavailable: {0}")]
    Unavailable(String),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    #[error("a task with id {0} already exists")]
    Duplicate(String),
    #[error("storage I/O error: {0}")]
    Io(#[from] std::io::Error),
}

pub type ChunkStream = BoxStream<'static, Result<Vec<u8>, StoreError>>;

#[async_trait::async_trait]
pub trait TaskStore: Send + Sync {
    /// Adds a new record; `Duplicate` if the id exists.
    async fn insert(&self, task: &TaskRecord) -> Result<(), StoreError>;
    /// Replaces the record with the same id (inserting it if absent).
    async fn put(&self, task: &TaskRecord) -> Result<(), StoreError>;
    async fn get(&self, id: &str) -> Result<Option<TaskRecord>, StoreError>;
    async fn delete(&self, id: &str) -> Result<(), StoreError>;
    /// Every record still `PENDING` or `STARTED`.
    async fn unfinished(&self) -> Result<Vec<TaskRecord>, StoreError>;
    /// Deletes records whose `expires_at_ms` is before `now_ms`. Backends with their own
    /// expiry (a MongoDB TTL index) may do nothing.
    async fn purge_expired(&self, now_ms: i64) -> Result<u64, StoreError>;
}

#[async_trait::async_trait]
pub trait ResultStore: Send + Sync {
    async fn meta(&self, file_name: &str) -> Result<Option<ResultMeta>, StoreError>;
    /// Stores `bytes` under `meta.file_name`, replacing any earlier result of that name.
    /// Readers see the old result or the new one, never a mix.
    async fn put(&self, meta: &ResultMeta, bytes: Vec<u8>) -> Result<(), StoreError>;
    /// The result and its bytes as chunks of at most `CHUNK_SIZE`.
    async fn open(&self, file_name: &str) -> Result<Option<(ResultMeta, ChunkStream)>, StoreError>;
}

/// Streams `reader` in chunks of at most `CHUNK_SIZE`, failing unless it holds exactly `size`
/// bytes (a truncated blob must not pass for a complete result).
fn read_chunks(
    mut reader: impl AsyncRead + Unpin + Send + 'static,
    size: u64,
    file_name: &str,
    io_error: impl Fn(std::io::Error) -> StoreError + Send + 'static,
) -> ChunkStream {
    let file_name = file_name.to_owned();
    Box::pin(async_stream::try_stream! {
        let mut total: u64 = 0;
        loop {
            let mut chunk = vec![0u8; CHUNK_SIZE];
            let mut filled = 0;
            while filled < CHUNK_SIZE {
                let n = reader.read(&mut chunk[filled..]).await.map_err(&io_error)?;
                if n == 0 {
                    break;
                }
                filled += n;
            }
            chunk.truncate(filled);
            total += filled as u64;
            if total > size {
                Err(StoreError::Corrupt(format!("result {file_name}: blob longer than {size} bytes")))?;
            }
            if filled == 0 {
                break;
            }
            let last = filled < CHUNK_SIZE;
            yield chunk;
            if last {
                break;
            }
        }
        if total != size {
            Err(StoreError::Corrupt(format!(
                "result {file_name}: blob holds {total} of {size} bytes"
            )))?;
        }
    })
}

/// Both stores refuse a result whose metadata disagrees with its bytes.
fn check_size(meta: &ResultMeta, len: usize) -> Result<(), StoreError> {
    if meta.size != len as u64 {
        return Err(StoreError::Corrupt(format!(
            "result {}: meta says {} bytes but {len} were given",
            meta.file_name, meta.size
        )));
    }
    Ok(())
}
