//! Durable state: task records and results, behind two small traits with an embedded
//! (files on disk) and a MongoDB implementation.
//!
//! Knows nothing of gRPC, locks or the model.

pub mod embedded;
pub mod mongo;

use std::path::{Path, PathBuf};
use std::time::Duration;

use futures::future::BoxFuture;
use futures::io::{AsyncRead, AsyncReadExt};
use futures::stream::BoxStream;

use crate::tasks::types::{Replaces, ResultMeta, TaskRecord};

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
    /// A conditional write found something else in place (a newer result, another run).
    #[error("{0}")]
    Conflict(String),
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
    /// Fails if the backend cannot be reached now (for health checks).
    async fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }
}

#[async_trait::async_trait]
pub trait ResultStore: Send + Sync {
    async fn meta(&self, file_name: &str) -> Result<Option<ResultMeta>, StoreError>;
    /// Stores `bytes` under `meta.file_name` if what is stored there now is what `replaces`
    /// allows, or a result of an earlier (or the same) run of the same task; otherwise
    /// nothing changes and the answer is `Conflict`. `fence` is asked after the bytes are
    /// written and right before the swap; its error is returned and nothing is stored.
    /// Readers see the old result or the new one, never a mix.
    async fn put(
        &self,
        meta: &ResultMeta,
        bytes: Vec<u8>,
        replaces: &Replaces,
        fence: &Fence,
    ) -> Result<(), StoreError>;
    /// The result and its bytes as chunks of at most `CHUNK_SIZE`.
    async fn open(&self, file_name: &str) -> Result<Option<(ResultMeta, ChunkStream)>, StoreError>;
    /// Deletes the result stored under `file_name` and its bytes; with `made_by`, only while
    /// the stored result is still the one that task made (a conditional delete, so that of
    /// several instances sweeping at once exactly one deletes it, and a newer result of the
    /// same name is kept). The deleted result's description, or `None` if nothing matched.
    async fn delete(
        &self,
        file_name: &str,
        made_by: Option<&str>,
    ) -> Result<Option<ResultMeta>, StoreError>;
    /// Results stored before `cutoff_ms`, at most `limit` of them, oldest first.
    async fn stored_before(
        &self,
        cutoff_ms: i64,
        limit: usize,
    ) -> Result<Vec<ResultMeta>, StoreError>;
    /// How many results are stored, and their total size in bytes.
    async fn usage(&self) -> Result<(u64, u64), StoreError>;
    /// Deletes the bytes of results replaced or deleted more than `grace` ago (kept that
    /// long for reads that opened them before), and bytes that no result ever came to use;
    /// how many blobs went. Stores whose readers keep deleted bytes readable do nothing.
    async fn sweep_blobs(&self, _grace: Duration) -> Result<u64, StoreError> {
        Ok(0)
    }
}

/// A writer's last check before a result swap: whether it may still write (in shared mode,
/// whether its run still holds the task).
pub struct Fence(Option<FenceCheck>);

type FenceCheck = Box<dyn Fn() -> BoxFuture<'static, Result<(), StoreError>> + Send + Sync>;

impl Fence {
    /// No check: the writer may always write.
    pub const NONE: Fence = Fence(None);

    pub fn new(
        check: impl Fn() -> BoxFuture<'static, Result<(), StoreError>> + Send + Sync + 'static,
    ) -> Self {
        Self(Some(Box::new(check)))
    }

    pub async fn check(&self) -> Result<(), StoreError> {
        match &self.0 {
            Some(check) => check().await,
            None => Ok(()),
        }
    }
}

/// Whether a result made by `task_id` in run `run` may replace `stored` (made by
/// `stored_task` in run `stored_run`), given what the task was allowed to replace.
pub fn may_replace(
    replaces: &Replaces,
    task_id: &str,
    run: u64,
    stored_task: &str,
    stored_run: u64,
) -> bool {
    (stored_task == task_id && stored_run <= run)
        || match replaces {
            Replaces::Nothing => false,
            Replaces::Result(id) => id == stored_task,
            Replaces::Any => true,
        }
}

/// What a worker learns when it renews its lease or saves under it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lease {
    /// Still this worker's.
    Held,
    /// Still this worker's, and a client asked to cancel the task: stop and end it CANCELLED.
    CancelRequested,
    /// Another worker holds it now (or the task is gone): stop, and record nothing.
    Lost,
}

/// The work queue shared by several instances: the task records themselves, each claimed by
/// one worker under a lease that the worker keeps renewing. A task whose lease runs out (its
/// worker died or stalled) can be claimed again, so no task is lost with an instance. Each
/// claim raises the record's `run`, the fencing token: a run writes only while the record
/// still holds its token, so a run that was taken over writes nothing. Leases are dated by
/// the store's clock, never an instance's.
#[async_trait::async_trait]
pub trait TaskQueue: Send + Sync {
    /// Claims the oldest task that is PENDING and not leased, or whose lease has run out,
    /// for `owner` until `lease` from now, raising its `run`. The record comes back as stored.
    async fn claim(&self, owner: &str, lease: Duration) -> Result<Option<TaskRecord>, StoreError>;
    /// Extends the lease if the record still holds run `run`.
    async fn renew_lease(&self, id: &str, run: u64, lease: Duration) -> Result<Lease, StoreError>;
    /// Saves the record if it still holds run `run`, leaving the lease as it is.
    async fn put_leased(&self, task: &TaskRecord, run: u64) -> Result<Lease, StoreError>;
    /// Saves the record and gives the task back to the queue, if it still holds run `run`.
    async fn unlease(&self, task: &TaskRecord, run: u64) -> Result<bool, StoreError>;
    /// An unfinished (PENDING or STARTED) task for `file_name`, if there is one.
    async fn unfinished_named(&self, file_name: &str) -> Result<Option<TaskRecord>, StoreError>;
    /// How many tasks wait for a worker (PENDING, unclaimed, not being cancelled).
    async fn waiting(&self) -> Result<u64, StoreError>;
    /// The place of a PENDING task in the queue: 1 + the unclaimed PENDING tasks queued
    /// before it.
    async fn position(&self, task: &TaskRecord) -> Result<u32, StoreError>;
    /// Marks an unfinished task as to be cancelled and returns it as stored then (finished
    /// tasks come back unchanged; `None` if there is no such task).
    async fn request_cancel(&self, id: &str) -> Result<Option<TaskRecord>, StoreError>;
    /// Saves `task` (its final, CANCELLED state) if no worker holds a live lease on it, so
    /// the canceller ends it itself; false if a worker holds it (that worker ends it).
    async fn cancel_unclaimed(&self, task: &TaskRecord) -> Result<bool, StoreError>;
}

/// Uploaded images between upload and the end of their task.
#[async_trait::async_trait]
pub trait SourceStore: Send + Sync {
    /// Takes the finished upload at `path` (which may be moved or deleted).
    async fn put_source(&self, task_id: &str, path: &Path) -> Result<(), StoreError>;
    async fn source(&self, task_id: &str) -> Result<Option<Vec<u8>>, StoreError>;
    /// Deleting a missing source is not an error; true if this call deleted it.
    async fn delete_source(&self, task_id: &str) -> Result<bool, StoreError>;
    /// The task ids of sources stored before `cutoff_ms` (at most `limit`), for the sweeper
    /// to check against their tasks.
    async fn sources_before(&self, cutoff_ms: i64, limit: usize)
        -> Result<Vec<String>, StoreError>;
}

/// Sources as files in the local temp dir: for a single instance.
pub struct LocalSources {
    dir: PathBuf,
}

impl LocalSources {
    pub fn new(dir: PathBuf) -> Self {
        Self { dir }
    }

    pub fn path(&self, task_id: &str) -> PathBuf {
        self.dir.join(format!("{task_id}.src"))
    }
}

#[async_trait::async_trait]
impl SourceStore for LocalSources {
    async fn put_source(&self, task_id: &str, path: &Path) -> Result<(), StoreError> {
        tokio::fs::rename(path, self.path(task_id)).await?;
        Ok(())
    }

    async fn source(&self, task_id: &str) -> Result<Option<Vec<u8>>, StoreError> {
        match tokio::fs::read(self.path(task_id)).await {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    async fn delete_source(&self, task_id: &str) -> Result<bool, StoreError> {
        match tokio::fs::remove_file(self.path(task_id)).await {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    async fn sources_before(
        &self,
        cutoff_ms: i64,
        limit: usize,
    ) -> Result<Vec<String>, StoreError> {
        let mut ids = Vec::new();
        let mut dir = match tokio::fs::read_dir(&self.dir).await {
            Ok(dir) => dir,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(ids),
            Err(e) => return Err(e.into()),
        };
        while let Some(entry) = dir.next_entry().await? {
            if ids.len() >= limit {
                break;
            }
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(id) = name.strip_suffix(".src") else {
                continue;
            };
            let modified = entry.metadata().await.and_then(|m| m.modified());
            let modified_ms = match modified {
                Ok(t) => t
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as i64),
                // Gone meanwhile (its task ended).
                Err(_) => continue,
            };
            if modified_ms < cutoff_ms {
                ids.push(id.to_owned());
            }
        }
        Ok(ids)
    }
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
