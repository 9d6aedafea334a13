//! Task life outside the workers: recovery at start, lock and lease renewal, watching (here
//! and across instances), backend health, expiry of old records and the release of
//! everything at shutdown.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use futures::stream::BoxStream;
use futures::StreamExt;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use super::types::{now_ms, TaskRecord, TaskState};
use super::{not_found_task, Error, Event, Inner, Queue};
use crate::locks::Acquire;
use crate::store::Lease;

/// How often a watcher re-reads a task that runs in another process, without task events
/// and with them (then only to catch a lost message).
const REMOTE_POLL: Duration = Duration::from_millis(500);
const REMOTE_POLL_WITH_EVENTS: Duration = Duration::from_secs(5);
/// How often a watcher of a task waiting in the shared queue re-reads its place.
const POSITION_POLL: Duration = Duration::from_secs(1);
/// How often the shared queue's depth is read from the store for the metrics.
const QUEUE_DEPTH_EVERY: Duration = Duration::from_secs(3);
/// Backend health: how often each is pinged, and how long a ping may take.
const HEALTH_EVERY: Duration = Duration::from_secs(1);
const HEALTH_TIMEOUT: Duration = Duration::from_secs(2);

/// Requeues the tasks a previous run left PENDING/STARTED whose upload is still on disk;
/// the others end as FAILURE ("interrupted"). Leftover temp files are removed. In shared
/// mode unfinished tasks need nothing: their leases run out and any instance claims them.
pub(super) async fn recover(inner: &Arc<Inner>) -> Result<(), Error> {
    if inner.is_shared() {
        remove_stray_files(inner, &HashSet::new()).await;
        return Ok(());
    }
    let Queue::Local(queue) = &inner.queue else {
        return Ok(());
    };
    let unfinished = inner.tasks.unfinished().await?;
    let keep: HashSet<String> = unfinished.iter().map(|t| format!("{}.src", t.id)).collect();
    remove_stray_files(inner, &keep).await;
    for mut task in unfinished {
        let has_source = tokio::fs::try_exists(inner.source_path(&task.id))
            .await
            .unwrap_or(false);
        let outcome = if has_source {
            match inner
                .locks
                .acquire(&task.file_name, &task.id, inner.lock_ttl())
                .await?
            {
                Acquire::Acquired => Ok(()),
                Acquire::HeldBy(holder) if holder == task.id => Ok(()),
                Acquire::HeldBy(other) => {
                    Err(format!("interrupted: file name taken over by task {other}"))
                }
            }
        } else if inner.locks.holder(&task.file_name).await?.as_deref() == Some(task.id.as_str()) {
            // Still held under its own id: another instance runs it, or its holder died
            // recently and the lock has not expired yet. Not ours to judge.
            continue;
        } else {
            Err(
                "interrupted: the server stopped and the upload is gone; upload it again"
                    .to_string(),
            )
        };
        match outcome {
            Ok(()) => {
                task.state = TaskState::Pending;
                task.started_at_ms = None;
                task.tiles_done = 0;
                inner.tasks.put(&task).await?;
                inner.go_live(&task);
                tracing::info!(
                    task_id = task.id,
                    file_name = task.file_name,
                    "requeued after restart"
                );
                queue.push_recovered(&task.id);
            }
            Err(msg) => {
                tracing::info!(
                    task_id = task.id,
                    reason = msg,
                    "unfinished task failed at restart"
                );
                let now = now_ms();
                task.state = TaskState::Failure;
                task.error = Some(msg);
                task.finished_at_ms = Some(now);
                task.expires_at_ms = Some(now + inner.settings.task_ttl().as_millis() as i64);
                inner.tasks.put(&task).await?;
                let _ = tokio::fs::remove_file(inner.source_path(&task.id)).await;
            }
        }
    }
    inner.queue_changed();
    Ok(())
}

/// Uploads cut short by a crash, and sources of tasks that no longer need them.
async fn remove_stray_files(inner: &Inner, keep: &HashSet<String>) {
    let Ok(mut dir) = tokio::fs::read_dir(&inner.settings.temp_dir).await else {
        return;
    };
    while let Ok(Some(entry)) = dir.next_entry().await {
        let name = entry.file_name().to_string_lossy().into_owned();
        let ours =
            (name.starts_with("upload-") && name.ends_with(".part")) || name.ends_with(".src");
        if ours && !keep.contains(&name) {
            tracing::info!(file = name, "removing a leftover temp file");
            let _ = tokio::fs::remove_file(entry.path()).await;
        }
    }
}

/// A file-name lock as a live task holds it.
pub(super) struct Held {
    pub file_name: String,
    pub task_id: String,
    /// Shared mode: the run of the task that holds it here.
    pub run: Option<u64>,
}

/// Keeps a task's file-name lock alive until `lease` is cancelled. A lock that vanished (a
/// Redis restart, or it lapsed while this process was paused) is taken back only while the
/// task still needs it here: its record unfinished and, in shared mode, still on this run.
/// A lock that another task holds now is not taken back: `lost` trips, which stops the run.
pub(super) async fn renew_lock(
    inner: Arc<Inner>,
    held: Held,
    lease: CancellationToken,
    lost: CancellationToken,
) {
    let Held {
        file_name,
        task_id,
        run,
    } = held;
    let every = inner.lock_ttl() / 3;
    loop {
        tokio::select! {
            _ = lease.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        match inner
            .locks
            .renew(&file_name, &task_id, inner.lock_ttl())
            .await
        {
            Ok(true) => {}
            Ok(false) => match still_needed(&inner, &task_id, run).await {
                Some(true) => match take_back(&inner, &file_name, &task_id).await {
                    Retake::Held => {}
                    // An upload checking the name holds it for a moment, and then finds
                    // this task unfinished and lets go; a task that was admitted holds it
                    // for good.
                    Retake::Other(holder) => {
                        if let Ok(Some(_)) = inner.tasks.get(&holder).await {
                            tracing::warn!(
                                task_id,
                                file_name,
                                holder,
                                "lost the file-name lock to another task; stopping"
                            );
                            lost.cancel();
                            return;
                        }
                    }
                },
                Some(false) => {
                    tracing::warn!(
                        task_id,
                        file_name,
                        run,
                        "the file-name lock lapsed and the task has moved on; not taking it back"
                    );
                    lost.cancel();
                    return;
                }
                // Cannot tell now: look again at the next round.
                None => {}
            },
            Err(e) => tracing::warn!(task_id, error = %e, "cannot renew the file-name lock"),
        }
    }
}

/// Whether task `task_id` still needs its file-name lock here: unfinished and, with `run`,
/// still on that run. `None` when the store cannot say now.
async fn still_needed(inner: &Inner, task_id: &str, run: Option<u64>) -> Option<bool> {
    match inner.tasks.get(task_id).await {
        Ok(Some(t)) => Some(!t.state.is_terminal() && run.is_none_or(|r| t.run == r)),
        Ok(None) => Some(false),
        Err(e) => {
            tracing::warn!(task_id, error = %e, "cannot check whether the task still runs");
            None
        }
    }
}

enum Retake {
    /// Held by this task again (or the lock server is away: try again later).
    Held,
    /// Someone else holds it.
    Other(String),
}

/// Takes a vanished lock back for `task_id`.
async fn take_back(inner: &Inner, file_name: &str, task_id: &str) -> Retake {
    match inner
        .locks
        .acquire(file_name, task_id, inner.lock_ttl())
        .await
    {
        Ok(Acquire::Acquired) => {
            tracing::info!(task_id, file_name, "took the vanished file-name lock back");
            Retake::Held
        }
        Ok(Acquire::HeldBy(holder)) if holder == task_id => Retake::Held,
        Ok(Acquire::HeldBy(holder)) => Retake::Other(holder),
        Err(e) => {
            tracing::warn!(task_id, error = %e, "cannot take the file-name lock back");
            Retake::Held
        }
    }
}

/// Shared mode: keeps the lease of run `run` of a task this instance runs until `stop` is
/// cancelled, and cancels `stop` if the lease is lost (another instance then runs the task).
pub(super) async fn keep_lease(
    inner: Arc<Inner>,
    task_id: String,
    run: u64,
    stop: CancellationToken,
    cancelled: CancellationToken,
) {
    let Queue::Shared { store, .. } = &inner.queue else {
        return;
    };
    let every = inner.lock_ttl() / 3;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        match store.renew_lease(&task_id, run, inner.lock_ttl()).await {
            Ok(Lease::Held) => {}
            // Keep the lease while the run stops and records the cancellation.
            Ok(Lease::CancelRequested) => cancelled.cancel(),
            Ok(Lease::Lost) => {
                tracing::warn!(task_id, run, "lost the task lease");
                stop.cancel();
                return;
            }
            // Keep working: if the lease really runs out, the next renewal says so.
            Err(e) => tracing::warn!(task_id, error = %e, "cannot renew the task lease"),
        }
    }
}

/// Shared mode: keeps the file-name lock of a task waiting in the queue (queued here, or
/// given back here) until some worker (which renews it from then on) starts it. A lock that
/// vanished meanwhile (a Redis restart) is taken back, so a same-name upload still hears
/// IN_PROGRESS.
pub(super) async fn keep_queued_lock(inner: Arc<Inner>, file_name: String, task_id: String) {
    let every = inner.lock_ttl() / 3;
    loop {
        tokio::select! {
            _ = inner.shutdown.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        match inner.tasks.get(&task_id).await {
            Ok(Some(t)) if t.state == TaskState::Pending => {}
            Ok(_) => return,
            Err(e) => {
                tracing::debug!(task_id, error = %e, "cannot check a queued task");
                continue;
            }
        }
        match inner
            .locks
            .renew(&file_name, &task_id, inner.lock_ttl())
            .await
        {
            Ok(true) => {}
            Ok(false) => {
                if let Retake::Other(holder) = take_back(&inner, &file_name, &task_id).await {
                    // An upload checking the name: it finds this task waiting and lets go.
                    tracing::debug!(task_id, holder, "the queued task's name is held; retrying");
                    continue;
                }
                // It may have ended between the look above and the take-back: then the
                // lock must not outlive it.
                if still_needed(&inner, &task_id, None).await == Some(false) {
                    let _ = inner.locks.release(&file_name, &task_id).await;
                    return;
                }
            }
            Err(e) => tracing::debug!(task_id, error = %e, "cannot renew a queued task's lock"),
        }
    }
}

/// Pings every backend now and then and publishes whether all answer.
pub(super) async fn monitor_backends(inner: Arc<Inner>) {
    loop {
        let store = tokio::time::timeout(HEALTH_TIMEOUT, inner.tasks.ping()).await;
        let locks = tokio::time::timeout(HEALTH_TIMEOUT, inner.locks.ping()).await;
        let problem = match (store, locks) {
            (Ok(Ok(())), Ok(Ok(()))) => None,
            (Err(_), _) => Some("the task store does not answer".to_string()),
            (Ok(Err(e)), _) => Some(e.to_string()),
            (_, Err(_)) => Some("the lock server does not answer".to_string()),
            (_, Ok(Err(e))) => Some(e.to_string()),
        };
        let up = problem.is_none();
        if up != *inner.backends_up.borrow() {
            match &problem {
                Some(p) => tracing::error!(problem = p, "a backend is down: refusing calls"),
                None => tracing::info!("backends reachable again"),
            }
            inner.backends_up.send_replace(up);
            if up {
                inner.wake_workers().await;
            }
        }
        tokio::select! {
            _ = inner.shutdown.cancelled() => return,
            _ = tokio::time::sleep(HEALTH_EVERY) => {}
        }
    }
}

/// Feeds other instances' task events to watchers here, and their wake-ups to our workers.
pub(super) async fn dispatch_events(inner: Arc<Inner>, mut events: broadcast::Receiver<Event>) {
    loop {
        let event = tokio::select! {
            _ = inner.shutdown.cancelled() => return,
            e = events.recv() => e,
        };
        match event {
            Ok(Event::Wake) => {
                if let Queue::Shared { wake, .. } = &inner.queue {
                    wake.notify_waiters();
                }
            }
            Ok(Event::Cancel(task_id)) => {
                if inner.stop_live(&task_id) {
                    tracing::info!(task_id, "cancellation asked on another instance");
                }
            }
            Ok(Event::Task(task)) => {
                let mut followed = inner.followed.lock().expect("poisoned");
                if let Some(tx) = followed.get(&task.id) {
                    if tx.send(*task.clone()).is_err() {
                        followed.remove(&task.id);
                    }
                }
            }
            Err(broadcast::error::RecvError::Lagged(_)) => {}
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}

/// Shared mode: keeps `upscaler_queue_depth` live, read from the store every few seconds
/// (and at each claim and upload, by their callers).
pub(super) async fn track_queue_depth(inner: Arc<Inner>) {
    loop {
        refresh_queue_depth(&inner).await;
        tokio::select! {
            _ = inner.shutdown.cancelled() => return,
            _ = tokio::time::sleep(QUEUE_DEPTH_EVERY) => {}
        }
    }
}

/// Reads the shared queue's depth into the gauge.
pub(super) async fn refresh_queue_depth(inner: &Inner) {
    if let Queue::Shared { store, .. } = &inner.queue {
        match store.waiting().await {
            Ok(n) => metrics::gauge!(crate::metrics::QUEUE_DEPTH).set(n as f64),
            Err(e) => tracing::debug!(error = %e, "cannot count the queued tasks"),
        }
    }
}

pub(super) async fn watch(
    inner: &Arc<Inner>,
    task_id: &str,
) -> Result<BoxStream<'static, TaskRecord>, Error> {
    let live = inner
        .live
        .lock()
        .expect("poisoned")
        .get(task_id)
        .map(|l| l.updates.subscribe());
    let inner = inner.clone();
    let id = task_id.to_string();
    if let Some(mut rx) = live {
        return Ok(async_stream::stream! {
            loop {
                let task = rx.borrow_and_update().clone();
                let terminal = task.state.is_terminal();
                yield task.clone();
                if terminal {
                    break;
                }
                if rx.changed().await.is_err() {
                    // No longer live here: the final state is in the store.
                    if let Ok(Some(last)) = inner.tasks.get(&id).await {
                        if last != task {
                            yield last;
                        }
                    }
                    break;
                }
            }
        }
        .boxed());
    }
    let first = inner
        .tasks
        .get(task_id)
        .await?
        .ok_or_else(|| not_found_task(task_id))?;
    let first = inner.with_position(first).await;
    // Runs in another process (or waits for one): follow its events, and re-read the store
    // now and then in case one was lost.
    let mut rx = follow(&inner, &first);
    let poll = if inner.events.is_some() {
        REMOTE_POLL_WITH_EVENTS
    } else {
        REMOTE_POLL
    };
    Ok(async_stream::stream! {
        let _following = Following { inner: inner.clone(), id: id.clone() };
        let mut last = first;
        yield last.clone();
        let mut heard = false;
        while !last.state.is_terminal() {
            // A waiting task's place changes without events: look more often.
            let every = if last.state == TaskState::Pending { POSITION_POLL } else { poll };
            let next = tokio::select! {
                _ = inner.shutdown.cancelled() => break,
                changed = rx.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    heard = true;
                    let t = rx.borrow_and_update().clone();
                    inner.with_position(t).await
                }
                _ = tokio::time::sleep(every) => {
                    match inner.tasks.get(&id).await {
                        // The store lags behind events: trust it only for the end, for a
                        // task still waiting (its place), or when no event came since the
                        // last look.
                        Ok(Some(t))
                            if t.state.is_terminal()
                                || !heard
                                || (t.state == TaskState::Pending && last.state == TaskState::Pending) =>
                        {
                            inner.with_position(t).await
                        }
                        Ok(Some(_)) => {
                            heard = false;
                            continue;
                        }
                        Ok(None) => break,
                        Err(_) => continue,
                    }
                }
            };
            if next != last {
                last = next;
                yield last.clone();
            }
        }
    }
    .boxed())
}

/// Registers interest in a task that runs elsewhere; events for it then reach the receiver.
fn follow(inner: &Arc<Inner>, first: &TaskRecord) -> tokio::sync::watch::Receiver<TaskRecord> {
    let mut followed = inner.followed.lock().expect("poisoned");
    followed
        .entry(first.id.clone())
        .or_insert_with(|| tokio::sync::watch::Sender::new(first.clone()))
        .subscribe()
}

/// Drops the task's entry when its last watcher here goes.
struct Following {
    inner: Arc<Inner>,
    id: String,
}

impl Drop for Following {
    fn drop(&mut self) {
        let mut followed = self.inner.followed.lock().expect("poisoned");
        // Our own receiver is still alive while this runs.
        if followed
            .get(&self.id)
            .is_some_and(|tx| tx.receiver_count() <= 1)
        {
            followed.remove(&self.id);
        }
    }
}

/// At shutdown: forget every task still live here and free its file name. Their records
/// stay PENDING, so the next start queues them again.
pub(super) async fn release_all(inner: &Arc<Inner>) {
    let live: Vec<(String, String)> = inner
        .live
        .lock()
        .expect("poisoned")
        .iter()
        .map(|(id, l)| (id.clone(), l.updates.borrow().file_name.clone()))
        .collect();
    for (id, file_name) in live {
        inner.retire(&id);
        if inner.is_shared() {
            // The task goes on elsewhere under the same lock token.
            continue;
        }
        if let Err(e) = inner.locks.release(&file_name, &id).await {
            tracing::warn!(task_id = id, error = %e, "cannot release the lock at shutdown; it will expire");
        }
    }
}
