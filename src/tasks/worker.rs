//! The worker pool: each worker takes a queued task, runs the model on a blocking thread
//! (never on the async executor), publishes progress per tile, stores the result and ends
//! the task as SUCCESS or FAILURE; on shutdown the task goes back to PENDING instead.

use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, Mutex};
use tracing::Instrument;

use super::types::{hex, now_ms, ResultMeta, TaskRecord, TaskState};
use super::{Inner, Job};
use crate::imaging;
use crate::model::{ModelError, Progress};
use crate::pipeline::{self, PipelineError};

/// Progress is persisted at most this often; watchers in this process see every tile.
const PERSIST_EVERY: Duration = Duration::from_millis(500);

enum Outcome {
    Done(ResultMeta, Vec<u8>),
    Interrupted,
    Failed(String),
}

pub(super) async fn run(inner: Arc<Inner>, queue: Arc<Mutex<mpsc::Receiver<Job>>>, worker: usize) {
    loop {
        let job = tokio::select! {
            _ = inner.shutdown.cancelled() => break,
            job = async { queue.lock().await.recv().await } => match job {
                Some(job) => job,
                None => break,
            },
        };
        inner.note_queue_depth();
        let span = tracing::info_span!(
            "task",
            worker,
            task_id = %job.task_id,
            file_name = tracing::field::Empty
        );
        run_job(&inner, job).instrument(span).await;
    }
}

async fn run_job(inner: &Arc<Inner>, job: Job) {
    let task = match inner.current(&job.task_id).await {
        Some(t) if !t.state.is_terminal() => t,
        _ => return,
    };
    tracing::Span::current().record("file_name", task.file_name.as_str());
    tracing::info!(model = task.options.model, "task started");
    let mut task = TaskRecord {
        state: TaskState::Started,
        started_at_ms: Some(now_ms()),
        tiles_done: 0,
        ..task
    };
    if let Err(e) = inner.save(&task).await {
        tracing::warn!(error = %e, "cannot record the task start");
    }
    let started = Instant::now();
    let running = metrics::gauge!(crate::metrics::RUNNING_TASKS);
    running.increment(1.0);
    let outcome = execute(inner, &mut task).await;
    running.decrement(1.0);
    let state = match &outcome {
        Outcome::Done(..) => "SUCCESS",
        Outcome::Failed(_) => "FAILURE",
        Outcome::Interrupted => "INTERRUPTED",
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
                return finish(inner, task, Err("the result could not be stored".into())).await;
            }
            task.output_width = meta.width;
            task.output_height = meta.height;
            task.tiles_done = task.tiles_total;
            tracing::info!(
                seconds = started.elapsed().as_secs_f64(),
                bytes = meta.size,
                "task succeeded"
            );
            finish(inner, task, Ok(())).await;
        }
        Outcome::Failed(msg) => {
            tracing::warn!(error = msg, "task failed");
            finish(inner, task, Err(msg)).await;
        }
        Outcome::Interrupted => {
            // Keep the source: the next start runs the task again.
            tracing::info!("task interrupted by shutdown; back to PENDING");
            task.state = TaskState::Pending;
            task.started_at_ms = None;
            task.tiles_done = 0;
            if let Err(e) = inner.save(&task).await {
                tracing::warn!(error = %e, "cannot record the interruption");
            }
            inner.release(&task).await;
        }
    }
}

/// Ends a task: records the terminal state, then frees the name and the source.
async fn finish(inner: &Arc<Inner>, mut task: TaskRecord, result: Result<(), String>) {
    let now = now_ms();
    task.finished_at_ms = Some(now);
    task.expires_at_ms = Some(now + inner.settings.task_ttl().as_millis() as i64);
    match result {
        Ok(()) => task.state = TaskState::Success,
        Err(msg) => {
            task.state = TaskState::Failure;
            task.error = Some(msg);
        }
    }
    if let Err(e) = inner.save(&task).await {
        tracing::error!(error = %e, "cannot record the end of the task");
    }
    inner.release(&task).await;
    let _ = tokio::fs::remove_file(inner.source_path(&task.id)).await;
}

/// Runs the model on a blocking thread, forwarding tile progress to watchers and the store.
async fn execute(inner: &Arc<Inner>, task: &mut TaskRecord) -> Outcome {
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
    let source = inner.source_path(&task.id);
    let format = task.options.format.output();
    let cancel = inner.shutdown.clone();
    let (tx, mut rx) = mpsc::unbounded_channel::<Progress>();
    let blocking = tokio::task::spawn_blocking(move || {
        let bytes = std::fs::read(&source)
            .map_err(|e| PipelineError::InvalidOption(format!("source unreadable: {e}")))?;
        let img = imaging::decode(&bytes, opts.max_pixels)?;
        drop(bytes);
        let out = pipeline::enhance(&model, &img, &opts, &mut |p| {
            // A closed channel only means nobody listens any more; keep going.
            let _ = tx.send(p);
            if cancel.is_cancelled() {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        })?;
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
        inner.publish(task);
        if last_persist.elapsed() >= PERSIST_EVERY {
            last_persist = Instant::now();
            if let Err(e) = inner.tasks.put(task).await {
                tracing::warn!(error = %e, "cannot persist progress");
            }
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
