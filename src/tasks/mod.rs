//! The service core: upload validation, deduplication by file name, locks, the task
//! lifecycle, the worker pool, restart recovery and shutdown.
//!
//! Two queue modes. Alone (no MongoDB), tasks wait in an in-process channel and their
//! sources in the temp dir. With a `TaskQueue` (MongoDB), the task records are the queue,
//! shared by every instance: workers claim tasks under a lease, sources live in the shared
//! store, and task events travel between instances over Redis pub/sub.
//!
//! Owns the rules ("a name being processed means wait, a name processed from the same bytes
//! means fetch"); the backends behind `store` and `locks` own durability. Knows nothing of
//! gRPC: `api` converts to and from these types.

mod cancel;
mod lifecycle;
mod models;
pub mod names;
mod queue;
mod sweep;
pub mod types;
mod upload;
mod workdir;
mod worker;

pub use workdir::work_dir;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::stream::BoxStream;
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;

use crate::config::Settings;
use crate::events::{Event, RedisEvents};
use crate::locks::{LockError, LockManager};
use crate::model::locate::WeightsDirs;
use crate::pipeline::{AlphaMode, EnhanceOptions, TileSize};
use crate::store::{
    ChunkStream, Lease, LocalSources, ResultStore, SourceStore, StoreError, TaskQueue, TaskStore,
};
pub use models::{ModelCache, ModelCatalog, ModelInfo};
use queue::LocalQueue;
use types::{ResultFormat, ResultMeta, TaskRecord, TaskState};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    /// The request is valid but not in the current state (a finished task cannot be
    /// cancelled, a result being made cannot be deleted).
    #[error("{0}")]
    FailedPrecondition(String),
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
    /// The service is not set up to start (its default model's weights are missing): the
    /// message says what to fix. Only `start` returns it.
    #[error("{0}")]
    Setup(String),
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

/// Where queued tasks wait.
enum Queue {
    /// This process only.
    Local(LocalQueue),
    /// The shared store; `wake` tells idle workers that a task may be waiting.
    Shared {
        store: Arc<dyn TaskQueue>,
        wake: Notify,
    },
}

/// The backends a service runs on. `queue` set means shared mode (several instances).
pub struct Backends {
    pub tasks: Arc<dyn TaskStore>,
    pub results: Arc<dyn ResultStore>,
    pub locks: Arc<dyn LockManager>,
    pub sources: Arc<dyn SourceStore>,
    pub queue: Option<Arc<dyn TaskQueue>>,
    pub events: Option<Arc<RedisEvents>>,
    /// This instance's name in leases and events.
    pub instance: String,
}

impl Backends {
    /// One instance on its own: in-process queue, sources in the temp dir.
    pub fn single(
        settings: &Settings,
        tasks: Arc<dyn TaskStore>,
        results: Arc<dyn ResultStore>,
        locks: Arc<dyn LockManager>,
    ) -> Self {
        Self {
            tasks,
            results,
            locks,
            sources: Arc::new(LocalSources::new(work_dir(settings, None))),
            queue: None,
            events: None,
            instance: new_instance_id(),
        }
    }
}

/// A short random name for this process, for leases and logs.
pub fn new_instance_id() -> String {
    let host = std::env::var("HOSTNAME").unwrap_or_default();
    let id = uuid::Uuid::new_v4().simple().to_string();
    if host.is_empty() {
        id[..12].to_string()
    } else {
        format!("{host}-{}", &id[..8])
    }
}

/// Per-task state held only while the task lives in this process.
struct Live {
    updates: watch::Sender<TaskRecord>,
    /// Stops the lock renewal.
    lease: CancellationToken,
    /// Cancelled when a client cancels the task: a queued task is then never started, a
    /// running one stops between the layers of its tile.
    stop: CancellationToken,
    /// Cancelled when another task took the file-name lock: a running task then stops with
    /// nothing stored.
    lock_lost: CancellationToken,
}

/// What a worker that starts a task listens to.
pub(crate) struct Begun {
    /// Tripped by a client's cancellation.
    pub cancelled: CancellationToken,
    /// Tripped when the file-name lock went to another task.
    pub lock_lost: CancellationToken,
}

pub(crate) struct Inner {
    settings: Settings,
    tasks: Arc<dyn TaskStore>,
    results: Arc<dyn ResultStore>,
    locks: Arc<dyn LockManager>,
    sources: Arc<dyn SourceStore>,
    events: Option<Arc<RedisEvents>>,
    instance: String,
    models: ModelCache,
    queue: Queue,
    /// Tasks queued or running in this process.
    live: Mutex<HashMap<String, Live>>,
    /// Tasks running elsewhere that someone here watches, fed by task events.
    followed: Mutex<HashMap<String, watch::Sender<TaskRecord>>>,
    /// False while a backend does not answer: calls then fail at once.
    backends_up: watch::Sender<bool>,
    accepting: AtomicBool,
    shutdown: CancellationToken,
    /// Shared mode: held while this instance lives, so others leave its TEMP_DIR folder be.
    _work_dir_lock: Option<std::fs::File>,
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
        let backends = Backends::single(&settings, tasks, results, locks);
        Self::start_with(settings, backends).await
    }

    /// `start` on any backends, shared mode included.
    pub async fn start_with(mut settings: Settings, backends: Backends) -> Result<Self, Error> {
        // This instance's own folder under TEMP_DIR; everything below uses it as TEMP_DIR.
        let shared = backends.queue.is_some();
        let dir = work_dir(&settings, shared.then_some(backends.instance.as_str()));
        let work_dir_lock = if shared {
            let dir = dir.clone();
            let claimed = tokio::task::spawn_blocking(move || workdir::claim_shared(&dir))
                .await
                .map_err(|e| Error::Internal(format!("TEMP_DIR: {e}")))?;
            Some(claimed.map_err(|e| Error::Internal(format!("cannot set up TEMP_DIR: {e}")))?)
        } else {
            tokio::fs::create_dir_all(&dir)
                .await
                .map_err(|e| Error::Internal(format!("cannot create TEMP_DIR: {e}")))?;
            None
        };
        settings.temp_dir = dir;
        let models = ModelCache::new(
            WeightsDirs::search(settings.weights_dir.as_deref()),
            settings.models_dir(),
        );
        models
            .load_required(&settings.default_model)
            .await
            .map_err(|e| Error::Setup(format!("cannot load the default model: {e}")))?;
        let queue = match backends.queue {
            Some(store) => Queue::Shared {
                store,
                wake: Notify::new(),
            },
            None => Queue::Local(LocalQueue::new(settings.queue_capacity)),
        };
        let inner = Arc::new(Inner {
            settings,
            tasks: backends.tasks,
            results: backends.results,
            locks: backends.locks,
            sources: backends.sources,
            events: backends.events,
            instance: backends.instance,
            models,
            queue,
            live: Mutex::default(),
            followed: Mutex::default(),
            backends_up: watch::Sender::new(true),
            accepting: AtomicBool::new(true),
            shutdown: CancellationToken::new(),
            _work_dir_lock: work_dir_lock,
        });
        tracing::info!(
            instance = inner.instance,
            shared_queue = inner.is_shared(),
            "task service starting"
        );
        let handles = (0..inner.settings.workers)
            .map(|i| tokio::spawn(worker::run(inner.clone(), i)))
            .collect();
        let service = Self {
            inner,
            workers: Arc::new(tokio::sync::Mutex::new(handles)),
        };
        lifecycle::recover(&service.inner).await?;
        tokio::spawn(sweep::sweeper(service.inner.clone()));
        tokio::spawn(lifecycle::monitor_backends(service.inner.clone()));
        if service.inner.is_shared() {
            tokio::spawn(lifecycle::track_queue_depth(service.inner.clone()));
        }
        if let Some(events) = &service.inner.events {
            tokio::spawn(lifecycle::dispatch_events(
                service.inner.clone(),
                events.subscribe(),
            ));
        }
        Ok(service)
    }

    /// Accepts an upload: `chunks` are the file's bytes, in order.
    ///
    /// The upload runs in a task of its own, so a caller that is dropped half-way (its client
    /// disconnected) never cuts it between taking the file-name lock and queueing: the broken
    /// chunk stream ends it cleanly instead.
    pub async fn upload(
        &self,
        meta: UploadMeta,
        chunks: BoxStream<'static, Result<Vec<u8>, Error>>,
    ) -> Result<UploadOutcome, Error> {
        self.inner.check_backends()?;
        let inner = self.inner.clone();
        // The caller's span (method, request id) goes along, so the upload's lines keep it.
        let accept = async move { upload::accept(&inner, meta, chunks).await };
        tokio::spawn(tracing::Instrument::in_current_span(accept))
            .await
            .map_err(|e| Error::Internal(format!("upload task failed: {e}")))?
    }

    pub async fn get(&self, task_id: &str) -> Result<TaskRecord, Error> {
        self.inner.check_backends()?;
        match self.inner.live_state(task_id) {
            Some(t) => Ok(t),
            None => {
                let task = self.inner.tasks.get(task_id).await?;
                let task = task.ok_or_else(|| not_found_task(task_id))?;
                Ok(self.inner.with_position(task).await)
            }
        }
    }

    /// Cancels an unfinished task (see `cancel`): its final record, or the record as it is
    /// while the instance running it has not stopped yet.
    pub async fn cancel(&self, task_id: &str) -> Result<TaskRecord, Error> {
        self.inner.check_backends()?;
        cancel::cancel(&self.inner, task_id).await
    }

    /// Deletes the stored result for `file_name` and frees the name; refused while a task
    /// for that name is pending or running.
    pub async fn delete_result(&self, file_name: &str) -> Result<ResultMeta, Error> {
        self.inner.check_backends()?;
        names::validate(file_name).map_err(Error::InvalidArgument)?;
        if let Some(holder) = self.inner.locks.holder(file_name).await? {
            return Err(Error::FailedPrecondition(format!(
                "task {holder} for `{file_name}` is pending or running; wait for it to end or cancel it first"
            )));
        }
        let deleted = self.inner.results.delete(file_name, None).await?;
        let meta = deleted.ok_or_else(|| not_found_result(file_name))?;
        tracing::info!(file_name, bytes = meta.size, "result deleted");
        Ok(meta)
    }

    /// The task's current state, then each change, ending after a terminal state (or when
    /// the server shuts down). A slow reader skips to the latest state.
    pub async fn watch(&self, task_id: &str) -> Result<BoxStream<'static, TaskRecord>, Error> {
        self.inner.check_backends()?;
        lifecycle::watch(&self.inner, task_id).await
    }

    /// The stored result for `file_name` and its bytes. Names are checked as at upload, so
    /// one that could never have been stored is refused rather than looked up.
    pub async fn fetch(&self, file_name: &str) -> Result<(ResultMeta, ChunkStream), Error> {
        self.inner.check_backends()?;
        names::validate(file_name).map_err(Error::InvalidArgument)?;
        self.inner
            .results
            .open(file_name)
            .await?
            .ok_or_else(|| not_found_result(file_name))
    }

    /// The description of the stored result for `file_name`, without its bytes.
    pub async fn result_meta(&self, file_name: &str) -> Result<ResultMeta, Error> {
        self.inner.check_backends()?;
        names::validate(file_name).map_err(Error::InvalidArgument)?;
        self.inner
            .results
            .meta(file_name)
            .await?
            .ok_or_else(|| not_found_result(file_name))
    }

    /// The models installed here.
    pub async fn models(&self) -> ModelCatalog {
        ModelCatalog {
            models: self.inner.models.installed().await,
            default_model: self.inner.settings.default_model.clone(),
        }
    }

    /// Scans the weights and models folders again (on SIGHUP); returns the model count.
    pub async fn rescan_models(&self) -> usize {
        self.inner.models.rescan().await
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

    /// True while every backend answers; changes as they go down and come back.
    pub fn backends_up(&self) -> watch::Receiver<bool> {
        self.inner.backends_up.subscribe()
    }
}

fn not_found_task(id: &str) -> Error {
    Error::NotFound(format!("no task with id `{id}`"))
}

fn not_found_result(file_name: &str) -> Error {
    Error::NotFound(format!("no processed result named `{file_name}`"))
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

    fn is_shared(&self) -> bool {
        matches!(self.queue, Queue::Shared { .. })
    }

    fn check_backends(&self) -> Result<(), Error> {
        if *self.backends_up.borrow() {
            Ok(())
        } else {
            Err(Error::Unavailable(
                "a storage or lock backend is unreachable; retry shortly".into(),
            ))
        }
    }

    /// Shows a new state to watchers in this process and, in shared mode, in the others.
    async fn publish(&self, task: &TaskRecord) {
        if let Some(live) = self.live.lock().expect("poisoned").get(&task.id) {
            live.updates.send_replace(task.clone());
        }
        // Watchers here that started following before the task went live here.
        if let Some(followers) = self.followed.lock().expect("poisoned").get(&task.id) {
            followers.send_replace(task.clone());
        }
        if let Some(events) = &self.events {
            events.task(task).await;
        }
    }

    /// Publishes a new state and persists it. In shared mode only while the record still
    /// holds run `run` (Some there): `Lease::Lost` means another instance took the task over
    /// (and nothing was saved), `Lease::CancelRequested` that a client asked to cancel it.
    async fn save(&self, task: &TaskRecord, run: Option<u64>) -> Result<Lease, Error> {
        let lease = match (&self.queue, run) {
            (Queue::Shared { store, .. }, Some(run)) => store.put_leased(task, run).await?,
            _ => {
                self.tasks.put(task).await?;
                Lease::Held
            }
        };
        if lease != Lease::Lost {
            self.publish(task).await;
        }
        Ok(lease)
    }

    /// After the local queue changed: publishes its depth, and to each waiting task's
    /// watchers its new place. (The shared queue's depth is kept by `track_queue_depth`.)
    fn queue_changed(&self) {
        let Queue::Local(queue) = &self.queue else {
            return;
        };
        let waiting = queue.snapshot();
        metrics::gauge!(crate::metrics::QUEUE_DEPTH).set(waiting.len() as f64);
        let live = self.live.lock().expect("poisoned");
        for (i, id) in waiting.iter().enumerate() {
            if let Some(l) = live.get(id) {
                let position = i as u32 + 1;
                l.updates.send_if_modified(|t| {
                    let moved = t.state == TaskState::Pending && t.queue_position != position;
                    if moved {
                        t.queue_position = position;
                    }
                    moved
                });
            }
        }
    }

    /// A stored record with its queue position filled in (PENDING tasks of the shared queue;
    /// the local queue's live tasks carry theirs already).
    async fn with_position(&self, mut task: TaskRecord) -> TaskRecord {
        if task.state != TaskState::Pending {
            task.queue_position = 0;
            return task;
        }
        if let Queue::Shared { store, .. } = &self.queue {
            match store.position(&task).await {
                Ok(p) => task.queue_position = p,
                Err(e) => {
                    tracing::debug!(task_id = task.id, error = %e, "cannot work out a queue position")
                }
            }
        }
        task
    }

    /// Tells idle workers, here and elsewhere, that a task waits.
    async fn wake_workers(&self) {
        if let Queue::Shared { wake, .. } = &self.queue {
            wake.notify_waiters();
        }
        if let Some(events) = &self.events {
            events.wake().await;
        }
    }

    /// The state of a task this process is running, if it is.
    fn live_state(&self, task_id: &str) -> Option<TaskRecord> {
        let live = self.live.lock().expect("poisoned");
        live.get(task_id).map(|l| l.updates.borrow().clone())
    }

    /// An unfinished task of `file_name` live here (queued or running), if there is one.
    fn live_named(&self, file_name: &str) -> Option<String> {
        let live = self.live.lock().expect("poisoned");
        live.values().find_map(|l| {
            let t = l.updates.borrow();
            (t.file_name == file_name && !t.state.is_terminal()).then(|| t.id.clone())
        })
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
            // Its canceller may have freed the name first.
            Ok(false) if task.state == TaskState::Cancelled => {}
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
    /// A task already live here (queued here, now running) keeps its watchers and renewal.
    fn go_live(self: &Arc<Self>, task: &TaskRecord) {
        let mut live = self.live.lock().expect("poisoned");
        match live.get(&task.id) {
            Some(existing) if !existing.stop.is_cancelled() => {
                existing.updates.send_replace(task.clone());
            }
            Some(_) => {}
            None => self.insert_live(&mut live, task, None),
        }
    }

    /// Marks a task STARTED for a worker about to run it (live from now on, if it was not),
    /// and gives the token that a cancellation trips. `None`: it was cancelled while it
    /// waited. One step under the live-task lock, so a cancellation sees it either still
    /// waiting (and ends it itself) or started (and leaves the ending to the worker).
    ///
    /// `run` is the shared queue's run (fencing token) that starts it: the lock renewal
    /// takes a vanished lock back only while the task's record still holds that run.
    fn begin(self: &Arc<Self>, task: &TaskRecord, run: Option<u64>) -> Option<Begun> {
        let mut live = self.live.lock().expect("poisoned");
        if !live.contains_key(&task.id) {
            self.insert_live(&mut live, task, run);
        }
        let l = live.get(&task.id)?;
        if l.stop.is_cancelled() {
            return None;
        }
        l.updates.send_replace(task.clone());
        Some(Begun {
            cancelled: l.stop.clone(),
            lock_lost: l.lock_lost.clone(),
        })
    }

    fn insert_live(
        self: &Arc<Self>,
        live: &mut HashMap<String, Live>,
        task: &TaskRecord,
        run: Option<u64>,
    ) {
        let lease = self.shutdown.child_token();
        let lock_lost = CancellationToken::new();
        let (updates, _) = watch::channel(task.clone());
        live.insert(
            task.id.clone(),
            Live {
                updates,
                lease: lease.clone(),
                stop: CancellationToken::new(),
                lock_lost: lock_lost.clone(),
            },
        );
        tokio::spawn(lifecycle::renew_lock(
            self.clone(),
            lifecycle::Held {
                file_name: task.file_name.clone(),
                task_id: task.id.clone(),
                run,
            },
            lease,
            lock_lost,
        ));
    }

    /// Trips the cancellation of a task live here; false if it is not live here.
    fn stop_live(&self, task_id: &str) -> bool {
        match self.live.lock().expect("poisoned").get(task_id) {
            Some(l) => {
                l.stop.cancel();
                true
            }
            None => false,
        }
    }

    /// Forgets a live task: watchers see its last state and end; the lock renewal stops.
    fn retire(&self, task_id: &str) {
        if let Some(live) = self.live.lock().expect("poisoned").remove(task_id) {
            live.lease.cancel();
        }
    }
}
