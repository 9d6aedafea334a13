//! The service core: upload validation, deduplication by file name, locks, the task
//! lifecycle, the worker pool, restart recovery and shutdown.
//!
//! Owns the rules ("a name being processed means wait, a name processed from the same bytes
//! means fetch"); the backends behind `store` and `locks` own durability. Knows nothing of
//! gRPC: `api` converts to and from these types.

mod lifecycle;
mod models;
pub mod names;
pub mod types;
mod upload;
mod worker;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::stream::BoxStream;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::config::Settings;
use crate::locks::{LockError, LockManager};
use crate::pipeline::{AlphaMode, EnhanceOptions, TileSize};
use crate::store::{ChunkStream, ResultStore, StoreError, TaskStore};
pub use models::ModelCache;
use types::{ResultFormat, ResultMeta, TaskRecord};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    TooLarge(String),
    #[error("the task queue is full ({0} waiting); try again later")]
    QueueFull(usize),
    /// Temporarily unable to serve, for a reason the client may read.
    #[error("{0}")]
    Unavailable(String),
    /// A backend (store, locks) failed; the cause is for the logs only.
    #[error("backend unavailable: {0}")]
    Backend(String),
    /// The client went away or broke the stream.
    #[error("upload aborted: {0}")]
    Aborted(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<StoreError> for Error {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Unavailable(m) => Self::Backend(m),
            other => Self::Internal(other.to_string()),
        }
    }
}

impl From<LockError> for Error {
    fn from(e: LockError) -> Self {
        match e {
            LockError::Unavailable(m) => Self::Backend(m),
        }
    }
}

/// The first message of an upload, already decoded from the wire.
#[derive(Debug, Clone, PartialEq)]
pub struct UploadMeta {
    pub file_name: String,
    /// Empty for the server's default model.
    pub model: String,
    pub outscale: Option<f64>,
    pub tile: Option<u32>,
    pub format: ResultFormat,
    pub overwrite: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutcomeKind {
    Queued,
    InProgress,
    AlreadyProcessed,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UploadOutcome {
    pub task_id: String,
    pub file_name: String,
    pub kind: OutcomeKind,
}

/// What a worker needs to run a task; the record itself lives in the task store.
struct Job {
    task_id: String,
}

/// Per-task state held only while the task lives in this process.
struct Live {
    updates: watch::Sender<TaskRecord>,
    /// Stops the lock renewal.
    lease: CancellationToken,
}

pub(crate) struct Inner {
    settings: Settings,
    tasks: Arc<dyn TaskStore>,
    results: Arc<dyn ResultStore>,
    locks: Arc<dyn LockManager>,
    models: ModelCache,
    queue: mpsc::Sender<Job>,
    live: Mutex<HashMap<String, Live>>,
    accepting: AtomicBool,
    shutdown: CancellationToken,
}

/// The task service. Cheap to clone.
#[derive(Clone)]
pub struct TaskService {
    inner: Arc<Inner>,
    workers: Arc<tokio::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>>,
}

impl TaskService {
    /// Builds the service, recovers the tasks a previous run left unfinished and starts the
    /// workers. The default model is loaded before this returns, so the caller can report
    /// itself healthy afterwards.
    pub async fn start(
        settings: Settings,
        tasks: Arc<dyn TaskStore>,
        results: Arc<dyn ResultStore>,
        locks: Arc<dyn LockManager>,
    ) -> Result<Self, Error> {
        tokio::fs::create_dir_all(&settings.temp_dir)
            .await
            .map_err(|e| Error::Internal(format!("cannot create TEMP_DIR: {e}")))?;
        let models = ModelCache::new(settings.weights_dir.clone());
        models
            .get(&settings.default_model)
            .await
            .map_err(|e| Error::Internal(format!("cannot load the default model: {e}")))?;
        let (queue, rx) = mpsc::channel(settings.queue_capacity);
        let inner = Arc::new(Inner {
            settings,
            tasks,
            results,
            locks,
            models,
            queue,
            live: Mutex::default(),
            accepting: AtomicBool::new(true),
            shutdown: CancellationToken::new(),
        });
        let rx = Arc::new(tokio::sync::Mutex::new(rx));
        let handles = (0..inner.settings.workers)
            .map(|i| tokio::spawn(worker::run(inner.clone(), rx.clone(), i)))
            .collect();
        let service = Self {
            inner,
            workers: Arc::new(tokio::sync::Mutex::new(handles)),
        };
        lifecycle::recover(&service.inner).await?;
        tokio::spawn(lifecycle::janitor(service.inner.clone()));
        Ok(service)
    }

    /// Accepts an upload: `chunks` are the file's bytes, in order.
    pub async fn upload(
        &self,
        meta: UploadMeta,
        chunks: BoxStream<'_, Result<Vec<u8>, Error>>,
    ) -> Result<UploadOutcome, Error> {
        upload::accept(&self.inner, meta, chunks).await
    }

    pub async fn get(&self, task_id: &str) -> Result<TaskRecord, Error> {
        match self.inner.live_state(task_id) {
            Some(t) => Ok(t),
            None => self
                .inner
                .tasks
                .get(task_id)
                .await?
                .ok_or_else(|| not_found_task(task_id)),
        }
    }

    /// The task's current state, then each change, ending after a terminal state (or when
    /// the server shuts down). A slow reader skips to the latest state.
    pub async fn watch(&self, task_id: &str) -> Result<BoxStream<'static, TaskRecord>, Error> {
        lifecycle::watch(&self.inner, task_id).await
    }

    pub async fn fetch(&self, file_name: &str) -> Result<(ResultMeta, ChunkStream), Error> {
        self.inner
            .results
            .open(file_name)
            .await?
            .ok_or_else(|| Error::NotFound(format!("no processed result named `{file_name}`")))
    }

    /// Stops taking uploads, interrupts running tasks between tiles (they go back to PENDING
    /// and run again on the next start), waits for the workers and releases their locks.
    pub async fn shutdown(&self) {
        self.inner.accepting.store(false, Ordering::SeqCst);
        self.inner.shutdown.cancel();
        let handles: Vec<_> = std::mem::take(&mut *self.workers.lock().await);
        for h in handles {
            let _ = h.await;
        }
        lifecycle::release_all(&self.inner).await;
    }

    pub fn settings(&self) -> &Settings {
        &self.inner.settings
    }

    /// The lock backend (exposed for operational tools and tests).
    pub fn locks(&self) -> Arc<dyn LockManager> {
        self.inner.locks.clone()
    }
}

fn not_found_task(id: &str) -> Error {
    Error::NotFound(format!("no task with id `{id}`"))
}

impl Inner {
    fn enhance_options(
        &self,
        tile: Option<u32>,
        outscale: Option<f64>,
    ) -> Result<EnhanceOptions, Error> {
        let default_tile = self
            .settings
            .tile_size()
            .map_err(|e| Error::Internal(e.to_string()))?;
        Ok(EnhanceOptions {
            tile: tile
                .map(|t| TileSize::Fixed(t as usize))
                .unwrap_or(default_tile),
            tile_pad: self.settings.tile_pad,
            pre_pad: 0,
            outscale,
            alpha: AlphaMode::Network,
            max_pixels: self.settings.max_pixels,
        })
    }

    fn source_path(&self, task_id: &str) -> PathBuf {
        self.settings.temp_dir.join(format!("{task_id}.src"))
    }

    fn lock_ttl(&self) -> Duration {
        self.settings.lock_ttl()
    }

    /// Shows a new state to watchers in this process.
    fn publish(&self, task: &TaskRecord) {
        if let Some(live) = self.live.lock().expect("poisoned").get(&task.id) {
            live.updates.send_replace(task.clone());
        }
    }

    /// Publishes a new state and persists it.
    async fn save(&self, task: &TaskRecord) -> Result<(), Error> {
        self.publish(task);
        self.tasks.put(task).await?;
        Ok(())
    }

    /// Publishes how many tasks wait in the queue.
    fn note_queue_depth(&self) {
        let depth = self.queue.max_capacity() - self.queue.capacity();
        metrics::gauge!(crate::metrics::QUEUE_DEPTH).set(depth as f64);
    }

    /// The state of a task this process is running, if it is.
    fn live_state(&self, task_id: &str) -> Option<TaskRecord> {
        let live = self.live.lock().expect("poisoned");
        live.get(task_id).map(|l| l.updates.borrow().clone())
    }

    /// The freshest state of a task: the live one if it runs here, else the stored one.
    async fn current(&self, task_id: &str) -> Option<TaskRecord> {
        match self.live_state(task_id) {
            Some(t) => Some(t),
            None => self.tasks.get(task_id).await.ok().flatten(),
        }
    }

    /// Stops tracking a task here and frees its file name.
    async fn release(&self, task: &TaskRecord) {
        self.retire(&task.id);
        match self.locks.release(&task.file_name, &task.id).await {
            Ok(true) => {}
            Ok(false) => tracing::warn!(
                task_id = task.id,
                "the lock had already expired or changed hands"
            ),
            Err(e) => {
                tracing::warn!(task_id = task.id, error = %e, "cannot release the lock; it will expire")
            }
        }
    }

    /// Registers a task as live here and starts renewing its lock.
    fn go_live(self: &Arc<Self>, task: &TaskRecord) {
        let (updates, _) = watch::channel(task.clone());
        let lease = self.shutdown.child_token();
        let live = Live {
            updates,
            lease: lease.clone(),
        };
        self.live
            .lock()
            .expect("poisoned")
            .insert(task.id.clone(), live);
        tokio::spawn(lifecycle::renew_lock(
            self.clone(),
            task.file_name.clone(),
            task.id.clone(),
            lease,
        ));
    }

    /// Forgets a live task: watchers see its last state and end; the lock renewal stops.
    fn retire(&self, task_id: &str) {
        if let Some(live) = self.live.lock().expect("poisoned").remove(task_id) {
            live.lease.cancel();
        }
    }
}
