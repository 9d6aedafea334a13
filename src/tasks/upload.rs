//! Accepting an upload: validate the metadata, stream the bytes to a temp file while checking
//! size, format and dimensions, then take the name's lock and, under it, decide QUEUED /
//! IN_PROGRESS / ALREADY_PROCESSED, and queue.
//!
//! Every early return leaves nothing behind: the temp file is removed by its guard, and once
//! the lock is taken, `Admission::abandon` undoes the lock and the record.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use futures::stream::BoxStream;
use futures::StreamExt;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use super::names::{self, Declared};
use super::types::{hex, now_ms, JobOptions, Replaces, ResultFormat, TaskRecord, TaskState};
use super::{lifecycle, Error, Inner, OutcomeKind, Queue, UploadMeta, UploadOutcome};
use crate::imaging::{self, ImagingError};
use crate::locks::Acquire;

/// How much of the file is kept in memory to read its header (JPEG headers can sit behind
/// large EXIF blocks).
const HEADER_PREFIX: usize = 1 << 20;

/// Deletes the file on drop unless `keep` was called.
struct TempFile {
    path: Option<PathBuf>,
}

impl TempFile {
    fn path(&self) -> &Path {
        self.path.as_deref().expect("live temp file")
    }

    fn keep(mut self) -> PathBuf {
        self.path.take().expect("live temp file")
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if let Some(p) = self.path.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// What the streamed bytes turned out to be.
struct Received {
    file: TempFile,
    sha256: String,
    has_alpha: bool,
    width: u32,
    height: u32,
}

pub(super) async fn accept(
    inner: &Arc<Inner>,
    meta: UploadMeta,
    chunks: BoxStream<'_, Result<Vec<u8>, Error>>,
) -> Result<UploadOutcome, Error> {
    if !inner.accepting.load(Ordering::SeqCst) {
        return Err(Error::Unavailable("the server is shutting down".into()));
    }
    let declared = names::validate(&meta.file_name).map_err(Error::InvalidArgument)?;
    let options = job_options(inner, &meta)?;
    let outcome = |task_id: String, kind| UploadOutcome {
        task_id,
        file_name: meta.file_name.clone(),
        kind,
    };

    // A name being processed means "wait": answer before reading the bytes.
    if let Some(holder) = inner.locks.holder(&meta.file_name).await? {
        if !ended(inner, &holder).await {
            return Ok(outcome(holder, OutcomeKind::InProgress));
        }
    }
    let received = receive(inner, declared, chunks).await?;
    if received.has_alpha && options.format == ResultFormat::Jpeg {
        return Err(Error::InvalidArgument(
            "the image has transparency, which JPEG output cannot store: ask for PNG".into(),
        ));
    }
    let passes = plan(inner, &options, &received)?;
    let fingerprint = options.fingerprint(&received.sha256);

    let task_id = uuid::Uuid::new_v4().to_string();
    if let Some(holder) = lock_name(inner, &meta.file_name, &task_id).await? {
        return Ok(outcome(holder, OutcomeKind::InProgress));
    }
    // Decided under the lock, on what is true now: the bytes may have taken long to come,
    // and a lock can vanish (a Redis restart) while its task still runs.
    let decided = match decide(inner, &meta, &fingerprint).await {
        Ok(Decision::Admit(replaces)) => {
            admit(inner, &meta, options, received, passes, &task_id, replaces).await
        }
        Ok(Decision::Answer(other, kind)) => {
            release(inner, &meta.file_name, &task_id).await;
            return Ok(outcome(other, kind));
        }
        Err(e) => Err(e),
    };
    if let Err(e) = &decided {
        tracing::info!(task_id, file_name = meta.file_name, error = %e, "upload refused after locking");
        abandon(inner, &meta.file_name, &task_id).await;
    }
    if decided.is_ok() {
        tracing::info!(task_id, file_name = meta.file_name, "upload queued");
    }
    decided.map(|()| outcome(task_id, OutcomeKind::Queued))
}

/// Whether `task_id`'s task has ended. An ended task still holds its name for the moment
/// between recording its end (which its watchers see) and releasing the lock.
async fn ended(inner: &Inner, task_id: &str) -> bool {
    inner
        .current(task_id)
        .await
        .is_some_and(|t| t.state.is_terminal())
}

/// Takes the name's lock for `task_id`, or gives the task that holds it. A holder that has
/// ended is waited for (it is releasing the name, or its lock expires within the TTL), so a
/// client that saw a task end and uploads again is not told the name is in progress.
async fn lock_name(inner: &Inner, file_name: &str, task_id: &str) -> Result<Option<String>, Error> {
    let deadline = tokio::time::Instant::now() + inner.lock_ttl();
    let mut pause = Duration::from_millis(10);
    loop {
        match inner
            .locks
            .acquire(file_name, task_id, inner.lock_ttl())
            .await?
        {
            Acquire::Acquired => return Ok(None),
            Acquire::HeldBy(holder) => {
                if !ended(inner, &holder).await || tokio::time::Instant::now() >= deadline {
                    return Ok(Some(holder));
                }
            }
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(500));
    }
}

/// What an upload holding the name's lock does.
enum Decision {
    /// Queue it; its result may replace this.
    Admit(Replaces),
    /// Answer with another task's id instead.
    Answer(String, OutcomeKind),
}

/// With the name's lock held: a task of the name still unfinished means IN_PROGRESS (its
/// lock vanished, but it runs or waits); a stored result of the same bytes and options
/// means ALREADY_PROCESSED, of others ALREADY_EXISTS unless `overwrite`.
async fn decide(inner: &Inner, meta: &UploadMeta, fingerprint: &str) -> Result<Decision, Error> {
    let unfinished = match &inner.queue {
        Queue::Shared { store, .. } => store.unfinished_named(&meta.file_name).await?.map(|t| t.id),
        Queue::Local(_) => inner.live_named(&meta.file_name),
    };
    if let Some(other) = unfinished {
        return Ok(Decision::Answer(other, OutcomeKind::InProgress));
    }
    let Some(existing) = inner.results.meta(&meta.file_name).await? else {
        return Ok(Decision::Admit(Replaces::Nothing));
    };
    if existing.fingerprint == fingerprint {
        return Ok(Decision::Answer(
            existing.task_id,
            OutcomeKind::AlreadyProcessed,
        ));
    }
    if !meta.overwrite {
        return Err(Error::AlreadyExists(format!(
            "a result named `{}` was made from other bytes or options; set overwrite to replace it",
            meta.file_name
        )));
    }
    Ok(Decision::Admit(Replaces::Result(existing.task_id)))
}

fn job_options(inner: &Inner, meta: &UploadMeta) -> Result<JobOptions, Error> {
    let model = if meta.model.is_empty() {
        inner.settings.default_model.clone()
    } else {
        meta.model.clone()
    };
    inner
        .models
        .entry(&model)
        .map_err(|e| Error::InvalidArgument(e.to_string()))?;
    if let Some(s) = meta.outscale {
        if !(s.is_finite() && s > 0.0 && s <= 16.0) {
            return Err(Error::InvalidArgument(format!(
                "outscale {s} must be in (0, 16]"
            )));
        }
    }
    if let Some(t) = meta.tile {
        if t != 0 && (t < 16 || t % 8 != 0) {
            return Err(Error::InvalidArgument(format!(
                "tile {t} must be 0 or a multiple of 8 of at least 16"
            )));
        }
    }
    Ok(JobOptions {
        model,
        outscale: meta.outscale,
        tile: meta.tile,
        format: meta.format,
    })
}

/// Streams the bytes to a temp file, refusing as soon as the size, format or dimensions are
/// known to be wrong, then checks that the whole image decodes.
async fn receive(
    inner: &Inner,
    declared: Declared,
    mut chunks: BoxStream<'_, Result<Vec<u8>, Error>>,
) -> Result<Received, Error> {
    let limits = &inner.settings;
    let path = limits
        .temp_dir
        .join(format!("upload-{}.part", uuid::Uuid::new_v4()));
    let mut out = tokio::fs::File::create(&path)
        .await
        .map_err(|e| Error::Internal(format!("cannot create a temp file: {e}")))?;
    let file = TempFile { path: Some(path) };
    let write_err = |e: std::io::Error| Error::Internal(format!("cannot write the upload: {e}"));
    let mut hasher = Sha256::new();
    let mut size = 0u64;
    let mut prefix = Vec::new();
    let mut header: Option<imaging::ImageInfo> = None;
    while let Some(chunk) = chunks.next().await {
        let chunk = chunk?;
        size += chunk.len() as u64;
        if size > limits.max_upload_bytes {
            return Err(Error::TooLarge(format!(
                "upload is over the limit of {} bytes",
                limits.max_upload_bytes
            )));
        }
        hasher.update(&chunk);
        out.write_all(&chunk).await.map_err(write_err)?;
        if header.is_none() && prefix.len() < HEADER_PREFIX {
            prefix.extend_from_slice(&chunk);
            header = check_header(&prefix, declared, limits.max_pixels, false)?;
        }
    }
    if size == 0 {
        return Err(Error::InvalidArgument(
            "the upload carried no image bytes".into(),
        ));
    }
    out.flush().await.map_err(write_err)?;
    drop(out);
    if header.is_none() {
        check_header(&prefix, declared, limits.max_pixels, true)?;
    }
    let (max_pixels, p) = (limits.max_pixels, file.path().to_path_buf());
    let decoded = tokio::task::spawn_blocking(move || -> Result<_, ImagingError> {
        // Read through a buffer: a large upload is never held whole in memory.
        let file = std::fs::File::open(&p).map_err(|e| ImagingError::Decode(e.to_string()))?;
        let img = imaging::decode_from(std::io::BufReader::new(file), max_pixels)?;
        Ok((img.color().has_alpha(), img.width(), img.height()))
    })
    .await
    .map_err(|e| Error::Internal(format!("decoder panicked: {e}")))?;
    let (has_alpha, width, height) = decoded.map_err(imaging_error)?;
    Ok(Received {
        file,
        sha256: hex(&hasher.finalize()),
        has_alpha,
        width,
        height,
    })
}

/// Reads format and size from the bytes seen so far. `Ok(None)`: not enough bytes yet.
fn check_header(
    prefix: &[u8],
    declared: Declared,
    max_pixels: u64,
    complete: bool,
) -> Result<Option<imaging::ImageInfo>, Error> {
    if prefix.len() < 12 && !complete {
        return Ok(None);
    }
    let format = imaging::sniff_format(prefix).map_err(imaging_error)?;
    if !declared.matches(format) {
        return Err(Error::InvalidArgument(format!(
            "the file name says {} but the bytes are {format:?}",
            declared.describe()
        )));
    }
    match imaging::probe(prefix, max_pixels) {
        Ok(info) => Ok(Some(info)),
        // The header may still be incomplete: wait for more bytes.
        Err(ImagingError::Decode(_)) if !complete && prefix.len() < HEADER_PREFIX => Ok(None),
        Err(e) => Err(imaging_error(e)),
    }
}

fn imaging_error(e: ImagingError) -> Error {
    match e {
        ImagingError::TooLarge { .. } => Error::TooLarge(e.to_string()),
        // The service takes only the two formats the old one did (WebP is for the CLI).
        ImagingError::UnsupportedFormat => {
            Error::InvalidArgument("not a PNG or JPEG image (by its magic bytes)".into())
        }
        other => Error::InvalidArgument(other.to_string()),
    }
}

/// With the lock held: move the source into place, record the task and queue it.
/// The network passes the task will take. The image's size is known now, so an outscale
/// that leaves no pixel on a side is refused here, whatever is stored under the name,
/// rather than failing in the worker.
fn plan(inner: &Inner, options: &JobOptions, received: &Received) -> Result<usize, Error> {
    let spec = inner
        .models
        .entry(&options.model)
        .map_err(|e| Error::InvalidArgument(e.to_string()))?
        .spec;
    let enhance = inner.enhance_options(options.tile, options.outscale)?;
    let (w, h) = (received.width as usize, received.height as usize);
    enhance
        .output_size(spec.scale(), w, h)
        .map_err(|e| Error::InvalidArgument(e.to_string()))?;
    Ok(crate::pipeline::planned_passes(
        &spec.arch,
        &enhance,
        w,
        h,
        received.has_alpha,
    ))
}

async fn admit(
    inner: &Arc<Inner>,
    meta: &UploadMeta,
    options: JobOptions,
    received: Received,
    passes: usize,
    task_id: &str,
    replaces: Replaces,
) -> Result<(), Error> {
    if let Queue::Shared { store, .. } = &inner.queue {
        let waiting = store.waiting().await?;
        if waiting >= inner.settings.queue_capacity as u64 {
            return Err(Error::QueueFull(waiting as usize));
        }
        metrics::gauge!(crate::metrics::QUEUE_DEPTH).set(waiting as f64 + 1.0);
    }
    inner
        .sources
        .put_source(task_id, received.file.path())
        .await?;
    received.file.keep();
    let task = TaskRecord {
        id: task_id.to_string(),
        state: TaskState::Pending,
        file_name: meta.file_name.clone(),
        options,
        source_sha256: received.sha256,
        tiles_done: 0,
        tiles_total: passes as u32,
        error: None,
        input_width: received.width,
        input_height: received.height,
        output_width: 0,
        output_height: 0,
        created_at_ms: now_ms(),
        started_at_ms: None,
        finished_at_ms: None,
        expires_at_ms: None,
        cancel_requested: false,
        queue_position: 0,
        run: 0,
        replaces,
    };
    inner.tasks.insert(&task).await?;
    match &inner.queue {
        Queue::Local(queue) => {
            inner.go_live(&task);
            queue.push(task_id).map_err(Error::QueueFull)?;
            inner.queue_changed();
        }
        Queue::Shared { .. } => {
            tokio::spawn(lifecycle::keep_queued_lock(
                inner.clone(),
                meta.file_name.clone(),
                task_id.to_string(),
            ));
            inner.wake_workers().await;
        }
    }
    tracing::info!(
        task_id,
        file_name = meta.file_name,
        model = task.options.model,
        "task queued"
    );
    Ok(())
}

/// Undoes a half-made admission: no record, no source, no lock.
async fn abandon(inner: &Arc<Inner>, file_name: &str, task_id: &str) {
    inner.retire(task_id);
    if let Err(e) = inner.tasks.delete(task_id).await {
        tracing::warn!(task_id, error = %e, "cannot delete the record of a refused upload");
    }
    if let Err(e) = inner.sources.delete_source(task_id).await {
        tracing::warn!(task_id, error = %e, "cannot delete the source of a refused upload");
    }
    release(inner, file_name, task_id).await;
}

async fn release(inner: &Inner, file_name: &str, task_id: &str) {
    if let Err(e) = inner.locks.release(file_name, task_id).await {
        tracing::warn!(task_id, error = %e, "cannot release the lock of an upload not queued");
    }
}
