//! Cancelling a task. A task waiting in the queue is ended by the canceller at once; a
//! running one is stopped by the worker running it, here or on another instance, at its next
//! tile. Either way the file name is freed, the upload deleted and no result stored.
//!
//! Alone, the decision "still waiting, so end it here" and a worker's "starting it now" are
//! taken under the same lock (`Inner::begin`). Shared, the store decides: the canceller marks
//! the record, then ends it only if no worker holds a live lease on it
//! (`TaskQueue::cancel_unclaimed`); a worker that holds one learns of the mark from its next
//! save or lease renewal, or at once from a Redis event.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;

use super::types::{TaskRecord, TaskState};
use super::worker::{ended, End};
use super::{lifecycle, not_found_task, Error, Inner, Queue};

/// How long a cancellation waits for the worker running the task to stop it.
const CANCEL_WAIT: Duration = Duration::from_secs(30);

/// A task live in this process, as a cancellation found it.
enum Found {
    /// It was waiting in the queue, and is now ended.
    Waiting(TaskRecord),
    /// A worker runs it; the worker ends it.
    Running(TaskRecord),
}

pub(super) async fn cancel(inner: &Arc<Inner>, id: &str) -> Result<TaskRecord, Error> {
    let running = match &inner.queue {
        Queue::Local(queue) => {
            // Decided under the live-task lock, as a worker's start is (`Inner::begin`).
            let decided = {
                let live = inner.live.lock().expect("poisoned");
                live.get(id).map(|l| {
                    let current = l.updates.borrow().clone();
                    l.stop.cancel();
                    if current.state == TaskState::Pending {
                        let done = ended(inner, current, End::Cancelled);
                        l.updates.send_replace(done.clone());
                        Found::Waiting(done)
                    } else {
                        Found::Running(current)
                    }
                })
            };
            match decided {
                None => {
                    let stored = inner.tasks.get(id).await?;
                    return Err(not_cancellable(stored, id));
                }
                Some(Found::Waiting(done)) => {
                    queue.remove(id);
                    inner.queue_changed();
                    inner.save(&done, None).await?;
                    end_here(inner, &done, TaskState::Pending).await;
                    return Ok(done);
                }
                Some(Found::Running(running)) => running,
            }
        }
        Queue::Shared { store, .. } => {
            let task = store.request_cancel(id).await?;
            let task = task.ok_or_else(|| not_found_task(id))?;
            if task.state.is_terminal() {
                return Err(not_cancellable(Some(task), id));
            }
            // Whoever runs it, stop it now rather than at its next save.
            inner.stop_live(id);
            if let Some(events) = &inner.events {
                events.cancel(id).await;
            }
            let done = ended(inner, task.clone(), End::Cancelled);
            if store.cancel_unclaimed(&done).await? {
                inner.publish(&done).await;
                end_here(inner, &done, task.state).await;
                return Ok(done);
            }
            task
        }
    };
    tracing::info!(
        task_id = id,
        "cancellation asked; waiting for the worker to stop the task"
    );
    wait_stopped(inner, running).await
}

/// The canceller ended the task itself: free its name and delete its upload.
async fn end_here(inner: &Arc<Inner>, done: &TaskRecord, was: TaskState) {
    metrics::counter!(crate::metrics::CANCELLED, "state" => was.name()).increment(1);
    tracing::info!(
        task_id = done.id,
        file_name = done.file_name,
        "task cancelled while it waited"
    );
    inner.retire(&done.id);
    free(inner, done).await;
}

/// Frees a cancelled task's file name (only while this task holds it) and deletes its
/// upload. The worker that stopped a running task does the same; the canceller does it too
/// before it answers, so that a client uploading the same name right after is not told
/// IN_PROGRESS by a lock the worker has not released yet. Both steps may run twice.
async fn free(inner: &Inner, task: &TaskRecord) {
    if let Err(e) = inner.locks.release(&task.file_name, &task.id).await {
        tracing::warn!(task_id = task.id, error = %e, "cannot release a cancelled task's lock; it will expire");
    }
    if let Err(e) = inner.sources.delete_source(&task.id).await {
        tracing::warn!(task_id = task.id, error = %e, "cannot delete a cancelled task's upload");
    }
}

/// Follows a running task until its worker has stopped it, for at most `CANCEL_WAIT`.
async fn wait_stopped(inner: &Arc<Inner>, running: TaskRecord) -> Result<TaskRecord, Error> {
    let mut updates = lifecycle::watch(inner, &running.id).await?;
    let deadline = tokio::time::sleep(CANCEL_WAIT);
    tokio::pin!(deadline);
    let mut last = running;
    loop {
        tokio::select! {
            _ = &mut deadline => break,
            next = updates.next() => match next {
                Some(t) => {
                    last = t;
                    if last.state.is_terminal() {
                        break;
                    }
                }
                None => break,
            },
        }
    }
    match last.state {
        TaskState::Cancelled => {
            metrics::counter!(crate::metrics::CANCELLED, "state" => "STARTED").increment(1);
            free(inner, &last).await;
            Ok(last)
        }
        state if state.is_terminal() => Err(Error::FailedPrecondition(format!(
            "task {} ended {} before the cancellation took effect",
            last.id,
            state.name()
        ))),
        // Its instance has not answered yet (paused, or cut off): it stops when it hears,
        // or whoever takes the task over ends it.
        _ => {
            last.cancel_requested = true;
            Ok(last)
        }
    }
}

fn not_cancellable(stored: Option<TaskRecord>, id: &str) -> Error {
    match stored {
        None => not_found_task(id),
        Some(t) if t.state.is_terminal() => Error::FailedPrecondition(format!(
            "task {id} already ended {}; only a pending or running task can be cancelled",
            t.state.name()
        )),
        Some(_) => Error::FailedPrecondition(format!(
            "task {id} is not queued on this server; cancel it where it was uploaded"
        )),
    }
}
