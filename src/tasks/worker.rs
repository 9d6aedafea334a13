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
use crate::store::{Lease, StoreError};

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

/// A task a worker holds: in shared mode under `owner`'s lease.
struct Claimed {
    task: TaskRecord,
    owner: Option<String>,
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
                return Some(Claimed { task, owner: None });
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
                let claimed = Claimed {
                    task,
                    owner: Some(owner.to_owned()),
                };
                tracing::info!(
                    task_id = claimed.task.id,
                    "claimed a task whose cancellation waits; ending it"
                );
                finish(inner, &claimed, claimed.task.clone(), End::Cancelled).await;
                continue;
            }
            Ok(Some(task)) => {
                let claimed = Claimed {
                    task,
                    owner: Some(owner.to_owned()),
                };
                match inner
                    .locks
                    .acquire(&claimed.task.file_name, &claimed.task.id, inner.lock_ttl())
                    .await
                {
                    Ok(Acquire::Acquired) => return Some(claimed),
                    Ok(Acquire::HeldBy(holder)) if holder == claimed.task.id => {
                        return Some(claimed)
                    }
                    Ok(Acquire::HeldBy(other)) => {
                        let msg = format!("interrupted: file name taken over by task {other}");
                        finish(inner, &claimed, claimed.task.clone(), End::Failure(msg)).await;
                        continue;
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
    let owner = claimed.owner.as_deref();
    let started_before = claimed.task.state == TaskState::Started;
    tracing::info!(
        model = claimed.task.options.model,
        instance = inner.instance,
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
    let Some(user) = inner.begin(&task) else {
        // Cancelled between leaving the queue and now: the cancellation ended it.
        tracing::info!("task cancelled before it started");
        return;
    };
    // In shared mode the lease must outlive the work; losing it stops the work.
    let cancel = inner.shutdown.child_token();
    if let Some(owner) = owner {
        tokio::spawn(lifecycle::keep_lease(
            inner.clone(),
            task.id.clone(),
            owner.to_owned(),
            cancel.clone(),
            user.clone(),
        ));
    }
    match inner.save(&task, owner).await {
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
    let mut outcome = execute(inner, &mut task, &claimed.owner, &cancel, &user).await;
    running.decrement(1.0);
    // A cancellation that arrived during the last tile or the encoding still wins: nothing
    // is stored.
    if user.is_cancelled() && matches!(outcome, Outcome::Interrupted | Outcome::Done(..)) {
        outcome = Outcome::Cancelled;
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
            if let Err(e) = inner.results.put(&meta, bytes).await {
                tracing::error!(error = %e, "cannot store the result");
                if owner.is_some() && matches!(e, StoreError::Unavailable(_)) {
                    // Leave it leased: when the lease runs out, it runs again somewhere.
                    cancel.cancel();
                    inner.retire(&task.id);
                    return;
                }
                cancel.cancel();
                return finish(
                    inner,
                    &claimed,
                    task,
                    End::Failure("the result could not be stored".into()),
                )
                .await;
            }
            task.output_width = meta.width;
            task.output_height = meta.height;
            task.tiles_done = task.tiles_total;
            tracing::info!(
                seconds = started.elapsed().as_secs_f64(),
                bytes = meta.size,
                "task succeeded"
            );
            cancel.cancel();
            finish(inner, &claimed, task, End::Success).await;
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
        Outcome::Interrupted if !inner.shutdown.is_cancelled() => {
            // The lease went to another instance, which runs the task from the start.
            tracing::warn!("lost the task's lease to another instance; dropping it here");
            inner.retire(&task.id);
        }
        Outcome::Interrupted => {
            tracing::info!("task interrupted by shutdown; back to PENDING");
            reset(&mut task);
            if owner.is_some() {
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

fn reset(task: &mut TaskRecord) {
    task.state = TaskState::Pending;
    task.started_at_ms = None;
    task.tiles_done = 0;
}

/// Shared mode: returns the task to the queue for any instance to claim.
async fn give_back(inner: &Arc<Inner>, claimed: &Claimed, task: &TaskRecord) {
    let (Queue::Shared { store, .. }, Some(owner)) = (&inner.queue, &claimed.owner) else {
        return;
    };
    match store.unlease(task, owner).await {
        Ok(_) => {
            inner.publish(task).await;
            inner.wake_workers().await;
        }
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
    let owner = claimed.owner.as_deref();
    let mut attempt = 0;
    loop {
        match inner.save(&task, owner).await {
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
                if owner.is_some() {
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
    owner: &Option<String>,
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
    let owner = owner.as_deref();
    let tiles = metrics::counter!(crate::metrics::TILES, "model" => task.options.model.clone());
    while let Some(p) = rx.recv().await {
        // Progress only moves forward, even if a pass reports a smaller total.
        task.tiles_total = p.total as u32;
        let done = task.tiles_done.max(p.done as u32);
        tiles.increment(u64::from(done - task.tiles_done));
        task.tiles_done = done;
        if last_persist.elapsed() >= PERSIST_EVERY {
            last_persist = Instant::now();
            match inner.save(task, owner).await {
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
