//! The worker pool: each worker takes a queued task, runs the model on a blocking thread
//! (never on the async executor), publishes progress per tile, stores the result and ends
//! the task as SUCCESS or FAILURE; on shutdown the task goes back to PENDING instead, and on
//! a client's cancellation it stops (between the layers of its tile) and ends CANCELLED with
//! nothing stored.

use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::types::{hex, now_ms, ResultMeta, TaskRecord, TaskState};
use super::{lifecycle, Inner, Queue};
use crate::imaging;
use crate::locks::Acquire;
use crate::model::{ModelError, Progress};
use crate::pipeline::{self, PipelineError};
use crate::store::{Fence, Lease, StoreError};

/// Progress is persisted at most this often; watchers in this process see every tile.
const PERSIST_EVERY: Duration = Duration::from_millis(500);

enum Outcome {
    Done(ResultMeta, Vec<u8>),
    /// Stopped by shutdown, or by the loss of the lease (`cancel` tells which).
    Interrupted,
    /// Stopped because a client cancelled the task.
    Cancelled,
    /// A backend failed before the work began: try again later.
    Requeue(String),
    Failed(String),
}

/// A task a worker holds: in shared mode as run `run` (its fencing token) under a lease.
struct Claimed {
    task: TaskRecord,
    run: Option<u64>,
}

/// How long an idle worker of the shared queue waits before looking again by itself (a
/// wake-up from an upload anywhere comes sooner), and after a backend error.
const CLAIM_POLL: Duration = Duration::from_secs(1);

pub(super) async fn run(inner: Arc<Inner>, worker: usize) {
    let owner = format!("{}/{worker}", inner.instance);
    loop {
        let next = match &inner.queue {
            Queue::Local(queue) => next_local(&inner, queue).await,
            Queue::Shared { .. } => next_shared(&inner, &owner).await,
        };
        let Some(claimed) = next else { break };
        let span = tracing::info_span!(
            "task",
            worker,
            task_id = %claimed.task.id,
            file_name = %claimed.task.file_name,
        );
        run_job(&inner, claimed).instrument(span).await;
    }
}

async fn next_local(inner: &Arc<Inner>, queue: &super::LocalQueue) -> Option<Claimed> {
    loop {
        let task_id = queue.pop(&inner.shutdown).await?;
        inner.queue_changed();
        if let Some(task) = inner.current(&task_id).await {
            if !task.state.is_terminal() {
                return Some(Claimed { task, run: None });
            }
        }
    }
}

/// Claims the next task from the shared queue and takes its file-name lock (same token as the
/// uploader's, so a lock left by a dead instance is simply taken over).
async fn next_shared(inner: &Arc<Inner>, owner: &str) -> Option<Claimed> {
    let Queue::Shared { store, wake } = &inner.queue else {
        return None;
    };
    loop {
        if inner.shutdown.is_cancelled() {
            return None;
        }
        // Register for wake-ups before looking, so one sent in between is not missed.
        let woken = wake.notified();
        let claimed = if *inner.backends_up.borrow() {
            store.claim(owner, inner.lock_ttl()).await
        } else {
            Ok(None)
        };
        if matches!(claimed, Ok(Some(_))) {
            lifecycle::refresh_queue_depth(inner).await;
        }
        match claimed {
            Ok(Some(task)) if task.state.is_terminal() => continue,
            Ok(Some(task)) if task.cancel_requested => {
                // Cancelled while it waited, or while an instance that since died ran it.
                let run = Some(task.run);
                let claimed = Claimed { task, run };
                tracing::info!(
                    task_id = claimed.task.id,
                    "claimed a task whose cancellation waits; ending it"
                );
                finish(inner, &claimed, claimed.task.clone(), End::Cancelled).await;
                continue;
            }
            Ok(Some(task)) => {
                let run = Some(task.run);
                let claimed = Claimed { task, run };
                match inner
                    .locks
                    .acquire(&claimed.task.file_name, &claimed.task.id, inner.lock_ttl())
                    .await
                {
                    Ok(Acquire::Acquired) => return Some(claimed),
                    Ok(Acquire::HeldBy(holder)) if holder == claimed.task.id => {
                        return Some(claimed)
                    }
                    // Another task was admitted under the name: this one cannot run.
                    Ok(Acquire::HeldBy(other))
                        if matches!(inner.tasks.get(&other).await, Ok(Some(_))) =>
                    {
                        let msg = format!("interrupted: file name taken over by task {other}");
                        finish(inner, &claimed, claimed.task.clone(), End::Failure(msg)).await;
                        continue;
                    }
                    // An upload checking the name holds it for a moment (it finds this task
                    // and lets go), or the store cannot say: try again shortly.
                    Ok(Acquire::HeldBy(_)) => {
                        tracing::info!(
                            task_id = claimed.task.id,
                            "the name of a claimed task is held for a moment; giving it back"
                        );
                        give_back(inner, &claimed, &claimed.task).await;
                    }
                    Err(e) => {
                        tracing::warn!(task_id = claimed.task.id, error = %e, "cannot lock a claimed task; giving it back");
                        give_back(inner, &claimed, &claimed.task).await;
                    }
                }
            }
            Ok(None) => {
                tokio::select! {
                    _ = inner.shutdown.cancelled() => return None,
                    _ = woken => {}
                    _ = tokio::time::sleep(CLAIM_POLL) => {}
                }
                continue;
            }
            Err(e) => tracing::warn!(error = %e, "cannot claim from the task queue"),
        }
        tokio::select! {
            _ = inner.shutdown.cancelled() => return None,
            _ = tokio::time::sleep(CLAIM_POLL) => {}
        }
    }
}

async fn run_job(inner: &Arc<Inner>, claimed: Claimed) {
    let run = claimed.run;
    let started_before = claimed.task.state == TaskState::Started;
    tracing::info!(
        model = claimed.task.options.model,
        instance = inner.instance,
        run,
        takeover = started_before,
        "task started"
    );
    let mut task = TaskRecord {
        state: TaskState::Started,
        started_at_ms: Some(now_ms()),
        tiles_done: 0,
        queue_position: 0,
        ..claimed.task.clone()
    };
    let Some(tokens) = inner.begin(&task, run) else {
        // Cancelled between leaving the queue and now: the cancellation ended it.
        tracing::info!("task cancelled before it started");
        return;
    };
    let user = tokens.cancelled;
    // In shared mode the lease must outlive the work; losing it stops the work, and so does
    // losing the file-name lock to another task.
    let cancel = inner.shutdown.child_token();
    tokio::spawn(stop_on(tokens.lock_lost.clone(), cancel.clone()));
    if let Some(run) = run {
        tokio::spawn(lifecycle::keep_lease(
            inner.clone(),
            task.id.clone(),
            run,
            cancel.clone(),
            user.clone(),
        ));
    }
    match inner.save(&task, run).await {
        Ok(Lease::Held) => {}
        Ok(Lease::CancelRequested) => user.cancel(),
        Ok(Lease::Lost) => {
            tracing::warn!("lost the task before it started");
            cancel.cancel();
            inner.retire(&task.id);
            return;
        }
        Err(e) => tracing::warn!(error = %e, "cannot record the task start"),
    }
    let started = Instant::now();
    let running = metrics::gauge!(crate::metrics::RUNNING_TASKS);
    running.increment(1.0);
    let mut outcome = execute(inner, &mut task, run, &cancel, &user).await;
    running.decrement(1.0);
    // A cancellation that arrived during the last tile or the encoding still wins: nothing
    // is stored.
    if user.is_cancelled() && matches!(outcome, Outcome::Interrupted | Outcome::Done(..)) {
        outcome = Outcome::Cancelled;
    }
    // So does the loss of the name to another task.
    if tokens.lock_lost.is_cancelled() && matches!(outcome, Outcome::Done(..)) {
        outcome = Outcome::Interrupted;
    }
    let state = match &outcome {
        Outcome::Done(..) => "SUCCESS",
        Outcome::Failed(_) => "FAILURE",
        Outcome::Cancelled => "CANCELLED",
        Outcome::Interrupted | Outcome::Requeue(_) => "INTERRUPTED",
    };
    metrics::histogram!(
        crate::metrics::TASK_SECONDS,
        "model" => task.options.model.clone(),
        "state" => state
    )
    .record(started.elapsed().as_secs_f64());
    match outcome {
        Outcome::Done(meta, bytes) => {
            let stored = store_result(inner, &task, run, &meta, bytes, &user).await;
            cancel.cancel();
            match stored {
                Stored::Yes => {
                    task.output_width = meta.width;
                    task.output_height = meta.height;
                    task.tiles_done = task.tiles_total;
                    tracing::info!(
                        seconds = started.elapsed().as_secs_f64(),
                        bytes = meta.size,
                        "task succeeded"
                    );
                    finish(inner, &claimed, task, End::Success).await;
                }
                Stored::Cancelled => finish(inner, &claimed, task, End::Cancelled).await,
                Stored::Failed(msg) => finish(inner, &claimed, task, End::Failure(msg)).await,
                Stored::NotOurs => inner.retire(&task.id),
            }
        }
        Outcome::Failed(msg) => {
            tracing::warn!(error = msg, "task failed");
            cancel.cancel();
            finish(inner, &claimed, task, End::Failure(msg)).await;
        }
        Outcome::Cancelled => {
            tracing::info!(
                tiles_done = task.tiles_done,
                tiles_total = task.tiles_total,
                "task cancelled"
            );
            cancel.cancel();
            finish(inner, &claimed, task, End::Cancelled).await;
        }
        Outcome::Requeue(msg) => {
            tracing::warn!(error = msg, "cannot run the task now; back to the queue");
            cancel.cancel();
            reset(&mut task);
            give_back(inner, &claimed, &task).await;
            inner.retire(&task.id);
        }
        Outcome::Interrupted if tokens.lock_lost.is_cancelled() => {
            // Another task holds the name now: this one ends, storing nothing (and records
            // its end only while its run is still the task's current one).
            tracing::warn!("lost the file-name lock to another task; stopped with nothing stored");
            cancel.cancel();
            let msg = "interrupted: file name taken over by another task".to_string();
            finish(inner, &claimed, task, End::Failure(msg)).await;
        }
        Outcome::Interrupted if !inner.shutdown.is_cancelled() => {
            // The lease went to another instance, which runs the task from the start.
            tracing::warn!("lost the task's lease to another instance; dropping it here");
            inner.retire(&task.id);
        }
        Outcome::Interrupted => {
            tracing::info!("task interrupted by shutdown; back to PENDING");
            reset(&mut task);
            if run.is_some() {
                // Another instance may take it now; the file-name lock stays with the task
                // (its token is the task id) until that instance renews it.
                give_back(inner, &claimed, &task).await;
                inner.retire(&task.id);
            } else {
                // Keep the source: the next start runs the task again.
                if let Err(e) = inner.save(&task, None).await {
                    tracing::warn!(error = %e, "cannot record the interruption");
                }
                inner.release(&task).await;
            }
        }
    }
}

/// Cancels `stop` when `trigger` trips (until `stop` is cancelled anyway).
async fn stop_on(trigger: CancellationToken, stop: CancellationToken) {
    tokio::select! {
        _ = trigger.cancelled() => stop.cancel(),
        _ = stop.cancelled() => {}
    }
}

/// What became of a finished run's result.
enum Stored {
    Yes,
    /// Not stored: a client cancelled the task meanwhile.
    Cancelled,
    /// Not stored; the task ends FAILURE with this message.
    Failed(String),
    /// Not stored, and the task is not this run's any more (another run holds it, or the
    /// store is away and the lease will lapse): record nothing.
    NotOurs,
}

/// Stores a run's result, fenced twice: the store asks whether the run is still the task's
/// current one after writing the bytes and right before the swap, and the swap itself
/// replaces only what the task may replace (a compare-and-swap), so a run that stalls
/// between the two still cannot put an old image over a newer one.
async fn store_result(
    inner: &Arc<Inner>,
    task: &TaskRecord,
    run: Option<u64>,
    meta: &ResultMeta,
    bytes: Vec<u8>,
    user: &CancellationToken,
) -> Stored {
    let fence = match (&inner.queue, run) {
        (Queue::Shared { store, .. }, Some(run)) => {
            let (store, id, ttl) = (store.clone(), task.id.clone(), inner.lock_ttl());
            Fence::new(move || {
                let (store, id) = (store.clone(), id.clone());
                Box::pin(async move {
                    match store.renew_lease(&id, run, ttl).await? {
                        Lease::Held => Ok(()),
                        Lease::CancelRequested | Lease::Lost => Err(StoreError::Conflict(
                            "the run no longer holds the task".into(),
                        )),
                    }
                })
            })
        }
        _ => Fence::NONE,
    };
    match inner.results.put(meta, bytes, &task.replaces, &fence).await {
        Ok(()) => {
            tracing::info!(run = meta.run, sha256 = meta.sha256, "result stored");
            Stored::Yes
        }
        Err(StoreError::Conflict(why)) => {
            tracing::warn!(reason = why, "nothing stored");
            match still_held(inner, task, run).await {
                Some(other) => other,
                None if user.is_cancelled() => Stored::Cancelled,
                None => Stored::Failed(format!(
                    "superseded: another result was stored under `{}` while this task ran",
                    task.file_name
                )),
            }
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot store the result");
            if run.is_some() && matches!(e, StoreError::Unavailable(_)) {
                // Leave it leased: when the lease runs out, it runs again somewhere.
                return Stored::NotOurs;
            }
            Stored::Failed("the result could not be stored".into())
        }
    }
}

/// Shared mode: `None` while run `run` still holds the task (so it may write), else what to
/// do instead of writing.
async fn still_held(inner: &Arc<Inner>, task: &TaskRecord, run: Option<u64>) -> Option<Stored> {
    let (Queue::Shared { store, .. }, Some(run)) = (&inner.queue, run) else {
        return None;
    };
    match store.renew_lease(&task.id, run, inner.lock_ttl()).await {
        Ok(Lease::Held) => None,
        Ok(Lease::CancelRequested) => Some(Stored::Cancelled),
        Ok(Lease::Lost) => {
            tracing::warn!(
                run,
                "another run holds the task now; this one stores nothing"
            );
            Some(Stored::NotOurs)
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot check the task's lease; storing nothing, it runs again");
            Some(Stored::NotOurs)
        }
    }
}

fn reset(task: &mut TaskRecord) {
    task.state = TaskState::Pending;
    task.started_at_ms = None;
    task.tiles_done = 0;
}

/// Shared mode: returns the task to the queue for any instance to claim.
async fn give_back(inner: &Arc<Inner>, claimed: &Claimed, task: &TaskRecord) {
    let (Queue::Shared { store, .. }, Some(run)) = (&inner.queue, claimed.run) else {
        return;
    };
    match store.unlease(task, run).await {
        Ok(true) => {
            inner.publish(task).await;
            // It waits again: its file-name lock must outlive the wait.
            tokio::spawn(lifecycle::keep_queued_lock(
                inner.clone(),
                task.file_name.clone(),
                task.id.clone(),
            ));
            inner.wake_workers().await;
        }
        Ok(false) => tracing::warn!("another run holds the task now; not giving it back"),
        // The lease runs out by itself and the task is claimed again then.
        Err(e) => tracing::warn!(error = %e, "cannot give the task back; its lease will expire"),
    }
}

/// How often, and how long, recording the end of a task is retried while a backend is down.
const FINISH_RETRY: Duration = Duration::from_millis(500);
const FINISH_ATTEMPTS: u32 = 60;

/// How a task ends.
pub(super) enum End {
    Success,
    Failure(String),
    Cancelled,
}

/// The record of a task ended now as `end`.
pub(super) fn ended(inner: &Inner, mut task: TaskRecord, end: End) -> TaskRecord {
    let now = now_ms();
    task.finished_at_ms = Some(now);
    task.expires_at_ms = Some(now + inner.settings.task_ttl().as_millis() as i64);
    task.queue_position = 0;
    task.cancel_requested = false;
    match end {
        End::Success => task.state = TaskState::Success,
        End::Failure(msg) => {
            task.state = TaskState::Failure;
            task.error = Some(msg);
        }
        End::Cancelled => task.state = TaskState::Cancelled,
    }
    task
}

/// Ends a task: records the terminal state, then frees the name and the source.
async fn finish(inner: &Arc<Inner>, claimed: &Claimed, task: TaskRecord, end: End) {
    let task = ended(inner, task, end);
    let run = claimed.run;
    let mut attempt = 0;
    loop {
        match inner.save(&task, run).await {
            Ok(Lease::Held | Lease::CancelRequested) => break,
            Ok(Lease::Lost) => {
                tracing::warn!("another instance took the task over; not recording its end");
                inner.retire(&task.id);
                return;
            }
            Err(e) if attempt + 1 < FINISH_ATTEMPTS && !inner.shutdown.is_cancelled() => {
                if attempt == 0 {
                    tracing::warn!(error = %e, "cannot record the end of the task; retrying");
                }
                attempt += 1;
                tokio::time::sleep(FINISH_RETRY).await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot record the end of the task");
                if run.is_some() {
                    // Unrecorded: the lease runs out and the task runs again.
                    inner.retire(&task.id);
                    return;
                }
                break;
            }
        }
    }
    inner.release(&task).await;
    if let Err(e) = inner.sources.delete_source(&task.id).await {
        tracing::warn!(error = %e, "cannot delete the task's source");
    }
}

/// Runs the model on a blocking thread, forwarding tile progress to watchers and the store.
async fn execute(
    inner: &Arc<Inner>,
    task: &mut TaskRecord,
    run: Option<u64>,
    cancel: &CancellationToken,
    user: &CancellationToken,
) -> Outcome {
    let model = match inner.models.get(&task.options.model).await {
        Ok(m) => m,
        Err(e) => {
            tracing::error!(error = %e, "cannot load the model");
            return Outcome::Failed(format!(
                "model `{}` could not be loaded",
                task.options.model
            ));
        }
    };
    let opts = match inner.enhance_options(task.options.tile, task.options.outscale) {
        Ok(o) => o,
        Err(e) => return Outcome::Failed(e.to_string()),
    };
    let bytes = match inner.sources.source(&task.id).await {
        Ok(Some(bytes)) => bytes,
        Ok(None) => {
            return Outcome::Failed("interrupted: the upload is gone; upload it again".to_string())
        }
        Err(StoreError::Unavailable(e)) => return Outcome::Requeue(e),
        Err(e) => return Outcome::Failed(format!("source unreadable: {e}")),
    };
    let format = task.options.format.output();
    let (stop, cancelled) = (cancel.clone(), user.clone());
    let (tx, mut rx) = mpsc::unbounded_channel::<Progress>();
    let blocking = tokio::task::spawn_blocking(move || {
        let img = imaging::decode(&bytes, opts.max_pixels)?;
        drop(bytes);
        // Asked between tiles and, on the fast path, between the layers of a tile: a
        // large x4plus tile takes many seconds.
        let stopped = || stop.is_cancelled() || cancelled.is_cancelled();
        let on_progress = &mut |p| {
            // A closed channel only means nobody listens any more; keep going.
            let _ = tx.send(p);
            if stopped() {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        };
        let out = pipeline::enhance_until(&model, &img, &opts, on_progress, &stopped)?;
        let encoded = imaging::encode(&out, format)?;
        Ok::<_, PipelineError>((encoded, out.width(), out.height()))
    });
    let mut last_persist = Instant::now();
    let tiles = metrics::counter!(crate::metrics::TILES, "model" => task.options.model.clone());
    while let Some(p) = rx.recv().await {
        // Progress only moves forward, even if a pass reports a smaller total.
        task.tiles_total = p.total as u32;
        let done = task.tiles_done.max(p.done as u32);
        tiles.increment(u64::from(done - task.tiles_done));
        task.tiles_done = done;
        if last_persist.elapsed() >= PERSIST_EVERY {
            last_persist = Instant::now();
            match inner.save(task, run).await {
                Ok(Lease::Held) => {}
                Ok(Lease::CancelRequested) => user.cancel(),
                // Another instance took the task over: stop now.
                Ok(Lease::Lost) => cancel.cancel(),
                Err(e) => tracing::warn!(error = %e, "cannot persist progress"),
            }
        } else {
            inner.publish(task).await;
        }
    }
    match blocking.await {
        Ok(Ok((bytes, width, height))) => {
            let meta = ResultMeta {
                file_name: task.file_name.clone(),
                content_type: format.content_type().to_string(),
                size: bytes.len() as u64,
                width,
                height,
                sha256: hex(&Sha256::digest(&bytes)),
                fingerprint: task.options.fingerprint(&task.source_sha256),
                model: task.options.model.clone(),
                task_id: task.id.clone(),
                created_at_ms: now_ms(),
                run: run.unwrap_or(0),
            };
            Outcome::Done(meta, bytes)
        }
        Ok(Err(PipelineError::Model(ModelError::Cancelled))) => Outcome::Interrupted,
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "upscaling failed");
            Outcome::Failed(format!("upscaling failed: {e}"))
        }
        Err(e) => {
            tracing::error!(error = %e, "the upscaling thread panicked");
            Outcome::Failed("upscaling failed: internal error".into())
        }
    }
}
