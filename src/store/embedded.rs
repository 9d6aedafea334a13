//! The embedded store: task records and results as plain files under one directory, for a
//! single service instance without MongoDB.
//!
//! Layout (every name is a hex sha256, so no user string ever reaches the file system):
//! - `tasks/<sha256(id)>.json`: one `TaskRecord`.
//! - `results/<sha256(file_name)>.json`: the `ResultMeta` plus the id of its blob.
//! - `results/<sha256(file_name)>.<blob id>.blob`: the bytes, a fresh file per `put`.
//!
//! Every file is written to a temp file in the same directory, fsynced and renamed, so a
//! crash leaves the old or the new version, never a torn one. A result is replaced by
//! writing the new blob, then atomically swapping the meta file that points at it, then
//! deleting the old blob: a reader sees one complete result or the other. The directory
//! must belong to one process; `open` sweeps what a crashed predecessor left behind.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::Mutex;
use tokio_util::compat::TokioAsyncReadCompatExt;

use super::{
    check_size, may_replace, read_chunks, ChunkStream, Fence, ResultStore, StoreError, TaskStore,
};
use crate::tasks::types::{hex, Replaces, ResultMeta, TaskRecord, TaskState};

const TMP_PREFIX: &str = ".tmp-";

pub struct EmbeddedStore {
    tasks: PathBuf,
    results: PathBuf,
    /// Serialises task writes so `insert`'s existence check and rename are one step, and a
    /// purge cannot delete a record that a concurrent `put` just revived.
    task_writes: Mutex<()>,
    /// Serialises swaps of result meta files so two `put`s of one name cannot both think
    /// they replaced the same old blob and leak the other's.
    result_writes: Mutex<()>,
}

/// The meta file of a result: what the caller stored plus which blob holds the bytes.
#[derive(Serialize, Deserialize)]
struct StoredResult {
    meta: ResultMeta,
    blob: uuid::Uuid,
}

impl EmbeddedStore {
    /// Opens (creating if needed) the store under `dir`. Blocks briefly to sweep temp files
    /// and unreferenced blobs, so call it at start-up.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let tasks = dir.join("tasks");
        let results = dir.join("results");
        for sub in [&tasks, &results] {
            std::fs::create_dir_all(sub).map_err(|e| {
                StoreError::Unavailable(format!("cannot create {}: {e}", sub.display()))
            })?;
        }
        sweep(&tasks, &results)?;
        Ok(Self {
            tasks,
            results,
            task_writes: Mutex::new(()),
            result_writes: Mutex::new(()),
        })
    }

    fn task_path(&self, id: &str) -> PathBuf {
        self.tasks.join(format!("{}.json", sha_hex(id)))
    }

    async fn read_task(&self, path: &Path) -> Result<Option<TaskRecord>, StoreError> {
        let Some(bytes) = read_if_exists(path).await? else {
            return Ok(None);
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| StoreError::Corrupt(format!("{}: {e}", path.display())))
    }

    async fn write_task(&self, task: &TaskRecord) -> Result<(), StoreError> {
        let json = serde_json::to_vec(task)
            .map_err(|e| StoreError::Corrupt(format!("task {}: {e}", task.id)))?;
        let name = format!("{}.json", sha_hex(&task.id));
        let dir = self.tasks.clone();
        blocking(move || write_atomic(&dir, &name, &json)).await
    }

    /// Every readable task record with its path.
    async fn all_tasks(&self) -> Result<Vec<(PathBuf, TaskRecord)>, StoreError> {
        read_all(&self.tasks).await
    }

    fn meta_name(file_name: &str) -> String {
        format!("{}.json", sha_hex(file_name))
    }

    fn blob_path(&self, file_name: &str, blob: uuid::Uuid) -> PathBuf {
        self.results.join(blob_name(&sha_hex(file_name), blob))
    }

    async fn read_result(&self, file_name: &str) -> Result<Option<StoredResult>, StoreError> {
        let path = self.results.join(Self::meta_name(file_name));
        let Some(bytes) = read_if_exists(&path).await? else {
            return Ok(None);
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| StoreError::Corrupt(format!("result {file_name}: {e}")))
    }
}

#[async_trait::async_trait]
impl TaskStore for EmbeddedStore {
    async fn insert(&self, task: &TaskRecord) -> Result<(), StoreError> {
        let _guard = self.task_writes.lock().await;
        if tokio::fs::try_exists(self.task_path(&task.id)).await? {
            return Err(StoreError::Duplicate(task.id.clone()));
        }
        self.write_task(task).await
    }

    async fn put(&self, task: &TaskRecord) -> Result<(), StoreError> {
        let _guard = self.task_writes.lock().await;
        self.write_task(task).await
    }

    async fn get(&self, id: &str) -> Result<Option<TaskRecord>, StoreError> {
        let task = self.read_task(&self.task_path(id)).await?;
        match task {
            Some(task) if task.id != id => Err(StoreError::Corrupt(format!(
                "record for task {id} holds task {}",
                task.id
            ))),
            other => Ok(other),
        }
    }

    async fn delete(&self, id: &str) -> Result<(), StoreError> {
        let _guard = self.task_writes.lock().await;
        remove_if_exists(&self.task_path(id)).await
    }

    async fn unfinished(&self) -> Result<Vec<TaskRecord>, StoreError> {
        Ok(self
            .all_tasks()
            .await?
            .into_iter()
            .map(|(_, task)| task)
            .filter(|task| matches!(task.state, TaskState::Pending | TaskState::Started))
            .collect())
    }

    async fn purge_expired(&self, now_ms: i64) -> Result<u64, StoreError> {
        let expired = |task: &TaskRecord| task.expires_at_ms.is_some_and(|at| at < now_ms);
        let mut purged = 0;
        // Scan without the lock (it may be long), then re-check each candidate under it.
        for (path, task) in self.all_tasks().await? {
            if !expired(&task) {
                continue;
            }
            let _guard = self.task_writes.lock().await;
            if self.read_task(&path).await?.is_some_and(|t| expired(&t)) {
                remove_if_exists(&path).await?;
                purged += 1;
            }
        }
        Ok(purged)
    }
}

#[async_trait::async_trait]
impl ResultStore for EmbeddedStore {
    async fn meta(&self, file_name: &str) -> Result<Option<ResultMeta>, StoreError> {
        Ok(self.read_result(file_name).await?.map(|stored| stored.meta))
    }

    async fn put(
        &self,
        meta: &ResultMeta,
        bytes: Vec<u8>,
        replaces: &Replaces,
        fence: &Fence,
    ) -> Result<(), StoreError> {
        check_size(meta, bytes.len())?;
        let hash = sha_hex(&meta.file_name);
        let stored = StoredResult {
            meta: meta.clone(),
            blob: uuid::Uuid::new_v4(),
        };
        let json = serde_json::to_vec(&stored)
            .map_err(|e| StoreError::Corrupt(format!("result {}: {e}", meta.file_name)))?;

        // The slow part, the blob, is written before taking the lock.
        let dir = self.results.clone();
        let new_blob = blob_name(&hash, stored.blob);
        let name = new_blob.clone();
        blocking(move || write_atomic(&dir, &name, &bytes)).await?;

        let swapped = {
            let _guard = self.result_writes.lock().await;
            if let Err(e) = fence.check().await {
                let _ = tokio::fs::remove_file(self.results.join(&new_blob)).await;
                return Err(e);
            }
            let old = self.read_result(&meta.file_name).await;
            if let Ok(Some(old)) = &old {
                let (task, run) = (&old.meta.task_id, old.meta.run);
                if !may_replace(replaces, &meta.task_id, meta.run, task, run) {
                    let _ = tokio::fs::remove_file(self.results.join(&new_blob)).await;
                    return Err(StoreError::Conflict(format!(
                        "a newer result is stored under `{}`",
                        meta.file_name
                    )));
                }
            }
            let dir = self.results.clone();
            let meta_name = Self::meta_name(&meta.file_name);
            blocking(move || write_atomic(&dir, &meta_name, &json))
                .await
                .map(|()| old)
        };
        let old = match swapped {
            Ok(old) => old,
            Err(e) => {
                let _ = tokio::fs::remove_file(self.results.join(&new_blob)).await;
                return Err(e);
            }
        };
        // An unreadable old meta only costs a leaked blob, which the next `open` sweeps.
        if let Ok(Some(old)) = old {
            let old_blob = self.blob_path(&meta.file_name, old.blob);
            if let Err(e) = remove_if_exists(&old_blob).await {
                tracing::warn!("cannot delete replaced blob {}: {e}", old_blob.display());
            }
        }
        Ok(())
    }

    async fn open(&self, file_name: &str) -> Result<Option<(ResultMeta, ChunkStream)>, StoreError> {
        // A concurrent `put` may delete the blob between our meta read and the open; the
        // meta read again then names the new blob. Once open, the file outlives the delete.
        for attempt in 0..2 {
            let Some(stored) = self.read_result(file_name).await? else {
                return Ok(None);
            };
            let path = self.blob_path(file_name, stored.blob);
            let file = match tokio::fs::File::open(&path).await {
                Ok(file) => file,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && attempt == 0 => continue,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    return Err(StoreError::Corrupt(format!(
                        "result {file_name}: blob {} is missing",
                        stored.blob
                    )))
                }
                Err(e) => return Err(e.into()),
            };
            let chunks = read_chunks(file.compat(), stored.meta.size, file_name, StoreError::Io);
            return Ok(Some((stored.meta, chunks)));
        }
        Err(StoreError::Corrupt(format!(
            "result {file_name} kept being replaced while opening it"
        )))
    }

    async fn delete(
        &self,
        file_name: &str,
        made_by: Option<&str>,
    ) -> Result<Option<ResultMeta>, StoreError> {
        let _guard = self.result_writes.lock().await;
        let Some(stored) = self.read_result(file_name).await? else {
            return Ok(None);
        };
        if made_by.is_some_and(|task| task != stored.meta.task_id) {
            return Ok(None);
        }
        // The meta file first: once it is gone the result is gone for every reader; a blob
        // left by a crash right after is swept at the next open.
        remove_if_exists(&self.results.join(Self::meta_name(file_name))).await?;
        let blob = self.blob_path(file_name, stored.blob);
        if let Err(e) = remove_if_exists(&blob).await {
            tracing::warn!("cannot delete blob {}: {e}", blob.display());
        }
        Ok(Some(stored.meta))
    }

    async fn stored_before(
        &self,
        cutoff_ms: i64,
        limit: usize,
    ) -> Result<Vec<ResultMeta>, StoreError> {
        let mut old: Vec<ResultMeta> = self
            .all_results()
            .await?
            .into_iter()
            .filter(|m| m.created_at_ms < cutoff_ms)
            .collect();
        old.sort_by_key(|m| m.created_at_ms);
        old.truncate(limit);
        Ok(old)
    }

    async fn usage(&self) -> Result<(u64, u64), StoreError> {
        let all = self.all_results().await?;
        Ok((all.len() as u64, all.iter().map(|m| m.size).sum()))
    }
}

impl EmbeddedStore {
    /// Every readable result description.
    async fn all_results(&self) -> Result<Vec<ResultMeta>, StoreError> {
        let all: Vec<(PathBuf, StoredResult)> = read_all(&self.results).await?;
        Ok(all.into_iter().map(|(_, stored)| stored.meta).collect())
    }
}

/// Every readable JSON record in `dir` with its path. Files that vanish while we list are
/// skipped, and so are files that fail to parse (with a warning): one bad record must not
/// stop start-up recovery, the sweeper or the metrics for the others.
async fn read_all<T: serde::de::DeserializeOwned>(
    dir: &Path,
) -> Result<Vec<(PathBuf, T)>, StoreError> {
    let mut out = Vec::new();
    let mut entries = tokio::fs::read_dir(dir).await?;
    while let Some(entry) = entries.next_entry().await? {
        let path = entry.path();
        if !is_record_file(&path) {
            continue;
        }
        let Some(bytes) = read_if_exists(&path).await? else {
            continue;
        };
        match serde_json::from_slice(&bytes) {
            Ok(record) => out.push((path, record)),
            Err(e) => tracing::warn!("skipping record {}: {e}", path.display()),
        }
    }
    Ok(out)
}

fn sha_hex(text: &str) -> String {
    hex(&Sha256::digest(text.as_bytes()))
}

fn blob_name(hash: &str, blob: uuid::Uuid) -> String {
    format!("{hash}.{blob}.blob")
}

fn is_record_file(path: &Path) -> bool {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    !name.starts_with(TMP_PREFIX) && name.ends_with(".json")
}

async fn read_if_exists(path: &Path) -> Result<Option<Vec<u8>>, StoreError> {
    match tokio::fs::read(path).await {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e.into()),
    }
}

async fn remove_if_exists(path: &Path) -> Result<(), StoreError> {
    match tokio::fs::remove_file(path).await {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.into()),
        _ => Ok(()),
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StoreError::Io(std::io::Error::other(format!("file task failed: {e}"))))?
        .map_err(StoreError::from)
}

/// Writes `dir/name` so that it holds the old or the new bytes even across a crash.
fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = dir.join(format!("{TMP_PREFIX}{}", uuid::Uuid::new_v4()));
    let written = (|| {
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&tmp, dir.join(name))
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written?;
    // The rename is only durable once the directory entry is; not every platform can
    // fsync a directory, and the data itself is already safe, so failure is not an error.
    if let Ok(dir) = std::fs::File::open(dir) {
        let _ = dir.sync_all();
    }
    Ok(())
}

/// Deletes temp files left by interrupted writes and blobs no meta file points at (a crash
/// between swapping a result's meta and deleting its old blob).
fn sweep(tasks: &Path, results: &Path) -> Result<(), StoreError> {
    for dir in [tasks, results] {
        for entry in std::fs::read_dir(dir)? {
            let path = entry?.path();
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default();
            if name.starts_with(TMP_PREFIX) {
                let _ = std::fs::remove_file(&path);
                continue;
            }
            let Some((hash, blob)) = name
                .strip_suffix(".blob")
                .and_then(|stem| stem.split_once('.'))
            else {
                continue;
            };
            // Only a blob that is provably unreferenced goes: if the meta file cannot be
            // read or parsed, keep the blob for whoever investigates.
            let orphan = match std::fs::read(results.join(format!("{hash}.json"))) {
                Ok(json) => serde_json::from_slice::<StoredResult>(&json)
                    .is_ok_and(|stored| stored.blob.to_string() != blob),
                Err(e) => e.kind() == std::io::ErrorKind::NotFound,
            };
            if orphan {
                let _ = std::fs::remove_file(&path);
            }
        }
    }
    Ok(())
}
