//! Task life outside the workers: recovery at start, lock renewal, watching, expiry of old
//! records and the release of everything at shutdown.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use futures::stream::BoxStream;
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use super::types::{now_ms, TaskRecord, TaskState};
use super::{not_found_task, Error, Inner, Job};
use crate::locks::Acquire;

/// How often a watcher re-reads a task that runs in another process.
const REMOTE_POLL: Duration = Duration::from_millis(500);
const JANITOR_EVERY: Duration = Duration::from_secs(60);

/// Requeues the tasks a previous run left PENDING/STARTED whose upload is still on disk;
/// the others end as FAILURE ("interrupted"). Leftover temp files are removed.
pub(super) async fn recover(inner: &Arc<Inner>) -> Result<(), Error> {
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
                if inner
                    .queue
                    .send(Job {
                        task_id: task.id.clone(),
                    })
                    .await
                    .is_err()
                {
                    break;
                }
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

/// Keeps a task's file-name lock alive until `lease` is cancelled.
pub(super) async fn renew_lock(
    inner: Arc<Inner>,
    file_name: String,
    task_id: String,
    lease: CancellationToken,
) {
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
            Ok(false) => {
                tracing::warn!(task_id, file_name, "lost the file-name lock");
                return;
            }
            Err(e) => tracing::warn!(task_id, error = %e, "cannot renew the file-name lock"),
        }
    }
}

/// Deletes expired task records now and then (a no-op for stores that expire by themselves).
pub(super) async fn janitor(inner: Arc<Inner>) {
    loop {
        match inner.tasks.purge_expired(now_ms()).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(deleted = n, "expired task records removed"),
            Err(e) => tracing::warn!(error = %e, "cannot remove expired task records"),
        }
        tokio::select! {
            _ = inner.shutdown.cancelled() => return,
            _ = tokio::time::sleep(JANITOR_EVERY) => {}
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
    Ok(async_stream::stream! {
        // Runs in another process (or waits for one): follow the store.
        let mut last = first;
        yield last.clone();
        while !last.state.is_terminal() {
            tokio::select! {
                _ = inner.shutdown.cancelled() => break,
                _ = tokio::time::sleep(REMOTE_POLL) => {}
            }
            match inner.tasks.get(&id).await {
                Ok(Some(t)) if t != last => {
                    last = t;
                    yield last.clone();
                }
                Ok(Some(_)) => {}
                _ => break,
            }
        }
    }
    .boxed())
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
        if let Err(e) = inner.locks.release(&file_name, &id).await {
            tracing::warn!(task_id = id, error = %e, "cannot release the lock at shutdown; it will expire");
        }
    }
}
