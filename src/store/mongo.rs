//! The MongoDB store, for several service instances sharing task records and results.
//!
//! - `tasks`: one document per task, `_id` = task id, the `TaskRecord` fields plus an
//!   `expires_at` date that a TTL index (`expireAfterSeconds: 0`) uses to delete finished
//!   tasks, so no instance has to purge.
//! - `results`: one document per file name, `_id` = file name, the `ResultMeta` fields plus
//!   `blob_id`, the GridFS file holding the bytes.
//! - GridFS bucket `results`: the bytes, because results can exceed the 16 MB document limit.
//! - GridFS bucket `uploads`: each unfinished task's source image, file id = task id, so any
//!   instance can run any task; deleted when the task ends.
//!
//! The `tasks` collection is also the shared work queue (`TaskQueue`): a worker claims a task
//! by setting `lease_owner` and `lease_until` and raising `run` (the fencing token) in one
//! findAndModify, and keeps pushing the deadline forward; a task whose deadline passed is
//! claimable again. Every later write of the run is conditional on `run`, so a run that was
//! taken over (paused, partitioned) writes nothing. Deadlines are dated by the server: set
//! from `$$NOW` in an update pipeline, compared with the server's own `hello.localTime`
//! (read just before; a stale reading only makes a lease look live for longer). A
//! cancellation sets `cancel_requested` on the record; the lease holder learns it from its
//! next renewal or save (one findAndModify each), and a task nobody holds is ended by the
//! canceller.
//!
//! A result is stored by uploading the new blob, then swapping the `results` document in one
//! conditional findAndModify (it must still hold what the task may replace, see
//! `ResultStore::put`; an upsert that finds another document in place fails on the unique
//! `_id`, which is the refusal). The blob it replaced is not deleted at once but marked
//! `metadata.retired_at`, so a fetch that opened it reads on; the sweeper deletes retired
//! blobs, and blobs no document came to use, after the grace period.

use std::path::Path;
use std::time::Duration;

use futures::io::{AsyncReadExt, AsyncWriteExt};
use futures::TryStreamExt;
use mongodb::bson::{self, doc, oid::ObjectId, Bson, Document};
use mongodb::error::{ErrorKind, GridFsErrorKind, WriteFailure};
use mongodb::gridfs::{GridFsBucket, GridFsDownloadStream};
use mongodb::options::{ClientOptions, GridFsBucketOptions, IndexOptions, ReturnDocument};
use mongodb::{Client, Collection, IndexModel};

use super::{
    check_size, read_chunks, ChunkStream, Fence, Lease, ResultStore, SourceStore, StoreError,
    TaskQueue, TaskStore,
};
use crate::tasks::types::{now_ms, Replaces, ResultMeta, TaskRecord};

/// Bounds server selection and connecting, so a dead server fails calls instead of hanging.
const TIMEOUT: Duration = Duration::from_secs(5);
const BUCKET: &str = "results";
const UPLOADS: &str = "uploads";
/// 9999-12-31T23:59:59.999Z.
const MAX_DATE_MS: i64 = 253_402_300_799_999;
/// Blobs looked at per kind and sweep.
const SWEEP_BATCH: i64 = 1000;
/// MongoDB's duplicate-key error code.
const DUPLICATE_KEY: i32 = 11000;

pub struct MongoStore {
    db: mongodb::Database,
    tasks: Collection<Document>,
    results: Collection<Document>,
    /// The files collection of the `results` bucket, where blobs are marked retired.
    result_files: Collection<Document>,
    /// Its chunks, counted to tell whether a blob is stored whole.
    result_chunks: Collection<Document>,
    bucket: GridFsBucket,
    uploads: GridFsBucket,
    /// Keeps a finished task that carries no `expires_at_ms` from living forever.
    task_ttl: Duration,
}

/// A client for `uri` whose server answered a `ping` within a few seconds, on `database`.
pub async fn ping(uri: &str, database: &str) -> Result<mongodb::Database, StoreError> {
    let shown = redact_uri(uri);
    let scrub = |e| scrub_password(uri, e);
    let mut options = ClientOptions::parse(uri).await.map_err(|e| {
        StoreError::Unavailable(format!("invalid MongoDB URI {shown}: {}", scrub(e)))
    })?;
    options.server_selection_timeout.get_or_insert(TIMEOUT);
    options.connect_timeout.get_or_insert(TIMEOUT);
    options
        .app_name
        .get_or_insert_with(|| "upscaler".to_owned());
    let client = Client::with_options(options).map_err(|e| {
        StoreError::Unavailable(format!("MongoDB client for {shown}: {}", scrub(e)))
    })?;
    let db = client.database(database);
    db.run_command(doc! { "ping": 1 }).await.map_err(|e| {
        StoreError::Unavailable(format!("cannot reach MongoDB at {shown}: {}", scrub(e)))
    })?;
    Ok(db)
}

/// A driver error's text with the URI's password masked.
fn scrub_password(uri: &str, e: mongodb::error::Error) -> String {
    match uri_password(uri) {
        Some(pw) if !pw.is_empty() => e.to_string().replace(pw, "***"),
        _ => e.to_string(),
    }
}

impl MongoStore {
    /// Connects, PINGs and creates the indexes, failing within seconds (with the URI's
    /// password masked) if the server is unreachable or the URI is wrong. Timeouts given in
    /// the URI win over the defaults here. `task_ttl` only dates finished records that arrive
    /// without their own `expires_at_ms`.
    pub async fn connect(
        uri: &str,
        database: &str,
        task_ttl: Duration,
    ) -> Result<Self, StoreError> {
        let db = ping(uri, database).await?;
        let scrub = |e| scrub_password(uri, e);

        let tasks = db.collection::<Document>("tasks");
        let indexes = [
            IndexModel::builder()
                .keys(doc! { "expires_at": 1 })
                .options(
                    IndexOptions::builder()
                        .name("expires_at_ttl".to_owned())
                        .expire_after(Duration::ZERO)
                        .build(),
                )
                .build(),
            // Start-up recovery asks for unfinished tasks; without this it scans them all.
            IndexModel::builder().keys(doc! { "state": 1 }).build(),
            // An upload asks whether a task for its name is unfinished.
            IndexModel::builder()
                .keys(doc! { "file_name": 1, "state": 1 })
                .build(),
            // Claiming takes the oldest claimable task.
            IndexModel::builder()
                .keys(doc! { "state": 1, "created_at_ms": 1 })
                .build(),
        ];
        tasks.create_indexes(indexes).await.map_err(|e| {
            StoreError::Unavailable(format!(
                "cannot create the indexes of {database}.tasks: {}",
                scrub(e)
            ))
        })?;

        let results = db.collection::<Document>("results");
        // The expiry sweep asks for the oldest results, the blob sweep which blob is in use.
        let indexes = [
            IndexModel::builder()
                .keys(doc! { "created_at_ms": 1 })
                .build(),
            IndexModel::builder().keys(doc! { "blob_id": 1 }).build(),
        ];
        results.create_indexes(indexes).await.map_err(|e| {
            StoreError::Unavailable(format!(
                "cannot create the indexes of {database}.results: {}",
                scrub(e)
            ))
        })?;

        let bucket = |name: &str| {
            db.gridfs_bucket(
                GridFsBucketOptions::builder()
                    .bucket_name(name.to_owned())
                    .build(),
            )
        };
        let (bucket, uploads) = (bucket(BUCKET), bucket(UPLOADS));
        Ok(Self {
            result_files: db.collection::<Document>(&format!("{BUCKET}.files")),
            result_chunks: db.collection::<Document>(&format!("{BUCKET}.chunks")),
            db,
            tasks,
            results,
            bucket,
            uploads,
            task_ttl,
        })
    }

    fn task_doc(&self, task: &TaskRecord) -> Result<Document, StoreError> {
        let mut doc = bson::to_document(task)
            .map_err(|e| StoreError::Corrupt(format!("task {}: {e}", task.id)))?;
        doc.insert("_id", task.id.as_str());
        let expires_at_ms = task.expires_at_ms.or_else(|| {
            let ttl = i64::try_from(self.task_ttl.as_millis()).unwrap_or(i64::MAX);
            task.state.is_terminal().then(|| {
                task.finished_at_ms
                    .unwrap_or_else(now_ms)
                    .saturating_add(ttl)
            })
        });
        if let Some(ms) = expires_at_ms {
            // Dates past year 9999 are valid BSON but break servers and tools that convert
            // them to calendar dates; that far out is "never" anyway.
            let ms = ms.clamp(0, MAX_DATE_MS);
            doc.insert("expires_at", bson::DateTime::from_millis(ms));
        }
        Ok(doc)
    }

    /// Uploads a result's bytes as a new blob, marked pending until a document uses it: the
    /// sweeper deletes pending blobs left behind by a refused or failed swap, or by an
    /// instance that died before it.
    async fn upload_blob(&self, file_name: &str, bytes: &[u8]) -> Result<ObjectId, StoreError> {
        let mut upload = self
            .bucket
            .open_upload_stream(file_name)
            .metadata(doc! { "pending": true })
            .await
            .map_err(|e| driver_error("uploading a result", e))?;
        let blob = upload.id().as_object_id();
        let uploaded = async {
            upload.write_all(bytes).await?;
            upload.close().await
        }
        .await;
        if let Err(e) = uploaded {
            let _ = upload.abort().await;
            return Err(StoreError::Unavailable(format!(
                "MongoDB, uploading result {file_name}: {e}"
            )));
        }
        blob.ok_or_else(|| StoreError::Corrupt("GridFS gave a non-ObjectId file id".into()))
    }

    /// Whether blob `id` is stored whole: its files document, of `len` bytes, and all its
    /// chunks.
    async fn blob_whole(&self, id: ObjectId, len: usize) -> Result<bool, StoreError> {
        let err = |e| driver_error("checking a result blob", e);
        let Some(file) = self
            .result_files
            .find_one(doc! { "_id": id })
            .await
            .map_err(err)?
        else {
            return Ok(false);
        };
        let number = |key: &str| {
            file.get_i64(key)
                .or_else(|_| file.get_i32(key).map(i64::from))
                .ok()
        };
        let (Some(length), Some(chunk_size)) = (number("length"), number("chunkSize")) else {
            return Ok(false);
        };
        let chunks = self
            .result_chunks
            .count_documents(doc! { "files_id": id })
            .await
            .map_err(err)?;
        let expected = (len as u64).div_ceil(chunk_size.max(1) as u64);
        Ok(length == len as i64 && chunks == expected)
    }

    async fn open_blob(&self, id: ObjectId) -> Result<Option<GridFsDownloadStream>, StoreError> {
        match self.bucket.open_download_stream(Bson::ObjectId(id)).await {
            Ok(stream) => Ok(Some(stream)),
            Err(e) if is_file_not_found(&e) => Ok(None),
            Err(e) => Err(driver_error("opening a result blob", e)),
        }
    }

    /// The task's fields to `$set`, without its id.
    fn task_fields(&self, task: &TaskRecord) -> Result<Document, StoreError> {
        let mut doc = self.task_doc(task)?;
        doc.remove("_id");
        Ok(doc)
    }

    /// Marks a blob no result uses any more; the sweeper deletes it after the grace period,
    /// so reads that opened it finish. Unmarked (the server is away), it is still found by
    /// the sweeper as a blob that no result uses.
    async fn retire_blob(&self, id: ObjectId) {
        let marked = self
            .result_files
            .update_one(
                doc! { "_id": id },
                doc! { "$currentDate": { "metadata.retired_at": true } },
            )
            .await;
        if let Err(e) = marked {
            tracing::warn!("cannot mark result blob {id} for deletion: {e}");
        }
    }

    /// Clears the pending mark of a blob a document now uses. Left set (the server is away),
    /// the sweeper finds the blob in use and clears it then.
    async fn settle_blob(&self, id: ObjectId) {
        let cleared = self
            .result_files
            .update_one(
                doc! { "_id": id },
                doc! { "$unset": { "metadata.pending": "" } },
            )
            .await;
        if let Err(e) = cleared {
            tracing::warn!("cannot clear the pending mark of result blob {id}: {e}");
        }
    }

    async fn delete_blob(&self, id: ObjectId) -> bool {
        match self.bucket.delete(Bson::ObjectId(id)).await {
            Ok(()) => true,
            Err(e) if is_file_not_found(&e) => false,
            Err(e) => {
                tracing::warn!("cannot delete result blob {id}: {e}");
                false
            }
        }
    }
}

/// The driver's errors that mean the data, not the server, is wrong become `Corrupt`;
/// everything else (network, timeouts, server errors) is `Unavailable`.
fn driver_error(what: &str, e: mongodb::error::Error) -> StoreError {
    let corrupt = matches!(
        *e.kind,
        ErrorKind::BsonDeserialization(_)
            | ErrorKind::BsonSerialization(_)
            | ErrorKind::InvalidResponse { .. }
            | ErrorKind::GridFs(
                GridFsErrorKind::MissingChunk { .. }
                    | GridFsErrorKind::WrongSizeChunk { .. }
                    | GridFsErrorKind::WrongNumberOfChunks { .. }
            )
    );
    if corrupt {
        StoreError::Corrupt(format!("{what}: {e}"))
    } else {
        StoreError::Unavailable(format!("MongoDB, {what}: {e}"))
    }
}

/// A duplicate key, as an insert reports it (a write error) or as findAndModify does (a
/// command error).
fn is_duplicate_key(e: &mongodb::error::Error) -> bool {
    match &*e.kind {
        ErrorKind::Write(WriteFailure::WriteError(w)) => w.code == DUPLICATE_KEY,
        ErrorKind::Command(c) => c.code == DUPLICATE_KEY,
        _ => false,
    }
}

fn task_from_doc(doc: Document) -> Result<TaskRecord, StoreError> {
    let id = doc.get("_id").cloned();
    bson::from_document(doc).map_err(|e| StoreError::Corrupt(format!("task {id:?}: {e}")))
}

fn result_from_doc(file_name: &str, doc: &Document) -> Result<(ResultMeta, ObjectId), StoreError> {
    let blob = doc
        .get_object_id("blob_id")
        .map_err(|e| StoreError::Corrupt(format!("result {file_name}: blob_id: {e}")))?;
    let meta = bson::from_document(doc.clone())
        .map_err(|e| StoreError::Corrupt(format!("result {file_name}: {e}")))?;
    Ok((meta, blob))
}

#[async_trait::async_trait]
impl TaskStore for MongoStore {
    async fn insert(&self, task: &TaskRecord) -> Result<(), StoreError> {
        match self.tasks.insert_one(self.task_doc(task)?).await {
            Ok(_) => Ok(()),
            Err(e) if is_duplicate_key(&e) => Err(StoreError::Duplicate(task.id.clone())),
            Err(e) => Err(driver_error("inserting a task", e)),
        }
    }

    async fn put(&self, task: &TaskRecord) -> Result<(), StoreError> {
        self.tasks
            .replace_one(doc! { "_id": task.id.as_str() }, self.task_doc(task)?)
            .upsert(true)
            .await
            .map_err(|e| driver_error("saving a task", e))?;
        Ok(())
    }

    async fn get(&self, id: &str) -> Result<Option<TaskRecord>, StoreError> {
        self.tasks
            .find_one(doc! { "_id": id })
            .await
            .map_err(|e| driver_error("reading a task", e))?
            .map(task_from_doc)
            .transpose()
    }

    async fn delete(&self, id: &str) -> Result<(), StoreError> {
        self.tasks
            .delete_one(doc! { "_id": id })
            .await
            .map_err(|e| driver_error("deleting a task", e))?;
        Ok(())
    }

    async fn unfinished(&self) -> Result<Vec<TaskRecord>, StoreError> {
        let docs: Vec<Document> = self
            .tasks
            .find(doc! { "state": { "$in": ["PENDING", "STARTED"] } })
            .await
            .map_err(|e| driver_error("listing unfinished tasks", e))?
            .try_collect()
            .await
            .map_err(|e| driver_error("listing unfinished tasks", e))?;
        docs.into_iter().map(task_from_doc).collect()
    }

    async fn purge_expired(&self, _now_ms: i64) -> Result<u64, StoreError> {
        // The TTL index on `expires_at` deletes them on the server.
        Ok(0)
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.tasks
            .find_one(doc! { "_id": "" })
            .await
            .map_err(|e| driver_error("ping", e))?;
        Ok(())
    }
}

#[async_trait::async_trait]
impl TaskQueue for MongoStore {
    async fn claim(&self, owner: &str, lease: Duration) -> Result<Option<TaskRecord>, StoreError> {
        let now = self.server_now().await?;
        let mut claimable = lapsed(now);
        claimable.insert("state", doc! { "$in": ["PENDING", "STARTED"] });
        let claimed = self
            .tasks
            .find_one_and_update(
                claimable,
                vec![doc! { "$set": {
                    "lease_owner": owner,
                    "lease_until": { "$add": ["$$NOW", millis(lease)] },
                    "run": { "$add": [{ "$ifNull": ["$run", 0_i64] }, 1_i64] },
                } }],
            )
            .sort(doc! { "created_at_ms": 1, "_id": 1 })
            .return_document(ReturnDocument::After)
            .await
            .map_err(|e| driver_error("claiming a task", e))?;
        claimed.map(task_from_doc).transpose()
    }

    async fn renew_lease(&self, id: &str, run: u64, lease: Duration) -> Result<Lease, StoreError> {
        let update = vec![doc! { "$set": {
            "lease_until": { "$add": ["$$NOW", millis(lease)] },
        } }];
        self.update_leased(id, run, update, "renewing a task lease")
            .await
    }

    async fn put_leased(&self, task: &TaskRecord, run: u64) -> Result<Lease, StoreError> {
        let update = doc! { "$set": self.task_fields(task)? };
        self.update_leased(&task.id, run, update, "saving a task")
            .await
    }

    async fn unlease(&self, task: &TaskRecord, run: u64) -> Result<bool, StoreError> {
        let update = doc! {
            "$set": self.task_fields(task)?,
            "$unset": { "lease_owner": "", "lease_until": "" },
        };
        let lease = self
            .update_leased(&task.id, run, update, "returning a task to the queue")
            .await?;
        Ok(lease != Lease::Lost)
    }

    async fn unfinished_named(&self, file_name: &str) -> Result<Option<TaskRecord>, StoreError> {
        self.tasks
            .find_one(doc! { "file_name": file_name, "state": { "$in": ["PENDING", "STARTED"] } })
            .await
            .map_err(|e| driver_error("looking for a task of the name", e))?
            .map(task_from_doc)
            .transpose()
    }

    async fn waiting(&self) -> Result<u64, StoreError> {
        let now = self.server_now().await?;
        self.tasks
            .count_documents(waiting_filter(now))
            .await
            .map_err(|e| driver_error("counting queued tasks", e))
    }

    async fn position(&self, task: &TaskRecord) -> Result<u32, StoreError> {
        let mut ahead = waiting_filter(self.server_now().await?);
        // The claim order: oldest first, the id breaking ties.
        ahead.insert(
            "$and",
            bson::bson!([{ "$or": [
                { "created_at_ms": { "$lt": task.created_at_ms } },
                { "created_at_ms": task.created_at_ms, "_id": { "$lt": task.id.as_str() } },
            ] }]),
        );
        let ahead = self
            .tasks
            .count_documents(ahead)
            .await
            .map_err(|e| driver_error("counting the tasks ahead", e))?;
        Ok(u32::try_from(ahead).unwrap_or(u32::MAX - 1) + 1)
    }

    async fn request_cancel(&self, id: &str) -> Result<Option<TaskRecord>, StoreError> {
        let marked = self
            .tasks
            .find_one_and_update(
                doc! { "_id": id, "state": { "$in": ["PENDING", "STARTED"] } },
                doc! { "$set": { "cancel_requested": true } },
            )
            .return_document(ReturnDocument::After)
            .await
            .map_err(|e| driver_error("asking to cancel a task", e))?;
        match marked {
            Some(doc) => task_from_doc(doc).map(Some),
            // Finished, or no such task.
            None => self.get(id).await,
        }
    }

    async fn cancel_unclaimed(&self, task: &TaskRecord) -> Result<bool, StoreError> {
        let mut unclaimed = lapsed(self.server_now().await?);
        unclaimed.insert("_id", task.id.as_str());
        unclaimed.insert("state", doc! { "$in": ["PENDING", "STARTED"] });
        let r = self
            .tasks
            .update_one(
                unclaimed,
                doc! {
                    "$set": self.task_fields(task)?,
                    "$unset": { "lease_owner": "", "lease_until": "", "cancel_requested": "" },
                },
            )
            .await
            .map_err(|e| driver_error("cancelling a task", e))?;
        Ok(r.matched_count == 1)
    }
}

/// Records nobody holds under a live lease, by the server's clock `now`.
fn lapsed(now: bson::DateTime) -> Document {
    doc! {
        "$or": [
            { "lease_until": Bson::Null },
            { "lease_until": { "$lt": now } },
        ],
    }
}

/// Tasks that wait for a worker: PENDING, not claimed under a live lease (by the server's
/// clock `now`), and not being cancelled.
fn waiting_filter(now: bson::DateTime) -> Document {
    let mut filter = lapsed(now);
    filter.insert("state", "PENDING");
    filter.insert("cancel_requested", doc! { "$ne": true });
    filter
}

impl MongoStore {
    /// The server's clock, which dates every lease: no instance's clock is trusted.
    async fn server_now(&self) -> Result<bson::DateTime, StoreError> {
        let hello = self
            .db
            .run_command(doc! { "hello": 1 })
            .await
            .map_err(|e| driver_error("reading the server's clock", e))?;
        hello
            .get_datetime("localTime")
            .copied()
            .map_err(|e| StoreError::Corrupt(format!("hello without localTime: {e}")))
    }

    /// Applies `update` to task `id` if the record still holds run `run`, and tells whether
    /// a cancellation waits for it, in one findAndModify.
    async fn update_leased(
        &self,
        id: &str,
        run: u64,
        update: impl Into<mongodb::options::UpdateModifications>,
        what: &str,
    ) -> Result<Lease, StoreError> {
        let found = self
            .tasks
            .find_one_and_update(doc! { "_id": id, "run": run_bson(run) }, update)
            .projection(doc! { "cancel_requested": 1 })
            .return_document(ReturnDocument::After)
            .await
            .map_err(|e| driver_error(what, e))?;
        Ok(match found {
            None => Lease::Lost,
            Some(doc) if doc.get_bool("cancel_requested").unwrap_or(false) => {
                Lease::CancelRequested
            }
            Some(_) => Lease::Held,
        })
    }
}

/// A run number as stored (BSON has no unsigned integers).
fn run_bson(run: u64) -> i64 {
    i64::try_from(run).unwrap_or(i64::MAX)
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX / 2)
}

fn is_file_not_found(e: &mongodb::error::Error) -> bool {
    matches!(
        *e.kind,
        ErrorKind::GridFs(GridFsErrorKind::FileNotFound { .. })
    )
}

#[async_trait::async_trait]
impl SourceStore for MongoStore {
    async fn put_source(&self, task_id: &str, path: &Path) -> Result<(), StoreError> {
        let bytes = tokio::fs::read(path).await?;
        // A retried upload under the same id replaces the earlier one.
        self.delete_source(task_id).await?;
        let mut upload = self
            .uploads
            .open_upload_stream(task_id)
            .id(Bson::String(task_id.to_owned()))
            .await
            .map_err(|e| driver_error("storing an upload", e))?;
        let stored = async {
            upload.write_all(&bytes).await?;
            upload.close().await
        }
        .await;
        if let Err(e) = stored {
            let _ = upload.abort().await;
            return Err(StoreError::Unavailable(format!(
                "MongoDB, storing the upload of task {task_id}: {e}"
            )));
        }
        let _ = tokio::fs::remove_file(path).await;
        Ok(())
    }

    async fn source(&self, task_id: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let mut stream = match self
            .uploads
            .open_download_stream(Bson::String(task_id.to_owned()))
            .await
        {
            Ok(s) => s,
            Err(e) if is_file_not_found(&e) => return Ok(None),
            Err(e) => return Err(driver_error("reading an upload", e)),
        };
        let mut bytes = Vec::new();
        stream.read_to_end(&mut bytes).await.map_err(|e| {
            StoreError::Unavailable(format!("MongoDB, reading the upload of {task_id}: {e}"))
        })?;
        Ok(Some(bytes))
    }

    async fn delete_source(&self, task_id: &str) -> Result<bool, StoreError> {
        match self.uploads.delete(Bson::String(task_id.to_owned())).await {
            Ok(()) => Ok(true),
            Err(e) if is_file_not_found(&e) => Ok(false),
            Err(e) => Err(driver_error("deleting an upload", e)),
        }
    }

    async fn sources_before(
        &self,
        cutoff_ms: i64,
        limit: usize,
    ) -> Result<Vec<String>, StoreError> {
        let files: Vec<_> = self
            .uploads
            .find(doc! { "uploadDate": { "$lt": bson::DateTime::from_millis(cutoff_ms) } })
            .limit(i64::try_from(limit).unwrap_or(i64::MAX))
            .await
            .map_err(|e| driver_error("listing uploads", e))?
            .try_collect()
            .await
            .map_err(|e| driver_error("listing uploads", e))?;
        // Uploads are stored under their task id; anything else is not ours to judge.
        Ok(files
            .into_iter()
            .filter_map(|f| match f.id {
                Bson::String(id) => Some(id),
                _ => None,
            })
            .collect())
    }
}

#[async_trait::async_trait]
impl ResultStore for MongoStore {
    async fn meta(&self, file_name: &str) -> Result<Option<ResultMeta>, StoreError> {
        let doc = self
            .results
            .find_one(doc! { "_id": file_name })
            .await
            .map_err(|e| driver_error("reading a result", e))?;
        doc.map(|doc| result_from_doc(file_name, &doc).map(|(meta, _)| meta))
            .transpose()
    }

    async fn put(
        &self,
        meta: &ResultMeta,
        bytes: Vec<u8>,
        replaces: &Replaces,
        fence: &Fence,
    ) -> Result<(), StoreError> {
        check_size(meta, bytes.len())?;
        let mut blob = self.upload_blob(&meta.file_name, &bytes).await?;
        crate::failpoint::pause_at("result-uploaded").await;
        if let Err(e) = fence.check().await {
            self.retire_blob(blob).await;
            return Err(e);
        }
        // A server that restarted since the upload may have lost it (writes acknowledged
        // but not yet durable): a document must never name bytes that are not there.
        if !self.blob_whole(blob, bytes.len()).await? {
            tracing::warn!(
                file_name = meta.file_name,
                "the result's uploaded bytes are gone (the store restarted?); uploading them again"
            );
            blob = self.upload_blob(&meta.file_name, &bytes).await?;
        }
        // Past every check: what keeps a writer stalled here from replacing a newer result
        // is the swap's own condition.
        crate::failpoint::pause_at("result-swap").await;

        let mut doc = bson::to_document(meta)
            .map_err(|e| StoreError::Corrupt(format!("result {}: {e}", meta.file_name)))?;
        doc.insert("_id", meta.file_name.as_str());
        doc.insert("blob_id", blob);
        // What may be in place: an earlier (or this) run of the same task's result, or what
        // the task may replace. Nothing in place always will do (the upsert inserts).
        let mut allowed = vec![doc! {
            "task_id": meta.task_id.as_str(),
            "run": { "$lte": run_bson(meta.run) },
        }];
        match replaces {
            Replaces::Nothing => {}
            Replaces::Result(task_id) => allowed.push(doc! { "task_id": task_id.as_str() }),
            Replaces::Any => allowed.push(doc! {}),
        }
        // findAndModify swaps and returns the old document in one step, so two concurrent
        // puts each retire exactly the blob they replaced.
        let swapped = self
            .results
            .find_one_and_replace(doc! { "_id": meta.file_name.as_str(), "$or": allowed }, doc)
            .upsert(true)
            .return_document(ReturnDocument::Before)
            .await;
        let swapped = match swapped {
            Ok(_) if crate::failpoint::fires("result-swap-reply-lost") => Err(
                mongodb::error::Error::custom("failpoint: the reply to the swap was lost"),
            ),
            other => other,
        };
        let old = match swapped {
            Ok(old) => old,
            Err(e) if is_duplicate_key(&e) => {
                self.retire_blob(blob).await;
                return Err(StoreError::Conflict(format!(
                    "a newer result is stored under `{}`",
                    meta.file_name
                )));
            }
            Err(e) => {
                // The server may have applied the swap before the error (a lost reply): the
                // document is the judge. Unreadable now, the blob stays for the sweeper,
                // which deletes it if no document came to use it.
                match self
                    .results
                    .find_one(doc! { "_id": meta.file_name.as_str() })
                    .await
                {
                    Ok(Some(now)) if now.get_object_id("blob_id").ok() == Some(blob) => {
                        tracing::info!(
                            file_name = meta.file_name,
                            "the result was stored although the store reported: {e}"
                        );
                        self.settle_blob(blob).await;
                        return Ok(());
                    }
                    Ok(_) => self.retire_blob(blob).await,
                    Err(_) => {}
                }
                return Err(driver_error("saving a result", e));
            }
        };
        self.settle_blob(blob).await;
        if let Some(old_blob) = old.and_then(|old| old.get_object_id("blob_id").ok()) {
            if old_blob != blob {
                self.retire_blob(old_blob).await;
            }
        }
        Ok(())
    }

    async fn open(&self, file_name: &str) -> Result<Option<(ResultMeta, ChunkStream)>, StoreError> {
        // A concurrent `put` may delete the blob between our read of the document and the
        // open; the document read again then names the new blob.
        for attempt in 0..2 {
            let doc = self
                .results
                .find_one(doc! { "_id": file_name })
                .await
                .map_err(|e| driver_error("reading a result", e))?;
            let Some(doc) = doc else {
                return Ok(None);
            };
            let (meta, blob) = result_from_doc(file_name, &doc)?;
            match self.open_blob(blob).await? {
                Some(stream) => {
                    let chunks = read_chunks(stream, meta.size, file_name, move |e| {
                        StoreError::Unavailable(format!("MongoDB, reading result: {e}"))
                    });
                    return Ok(Some((meta, chunks)));
                }
                None if attempt == 0 => continue,
                None => {
                    return Err(StoreError::Corrupt(format!(
                        "result {file_name}: GridFS file {blob} is missing"
                    )))
                }
            }
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
        let mut filter = doc! { "_id": file_name };
        if let Some(task_id) = made_by {
            filter.insert("task_id", task_id);
        }
        // One findAndModify: of several callers, exactly one gets the document and so
        // deletes the blob.
        let deleted = self
            .results
            .find_one_and_delete(filter)
            .await
            .map_err(|e| driver_error("deleting a result", e))?;
        let Some(doc) = deleted else {
            return Ok(None);
        };
        let (meta, blob) = result_from_doc(file_name, &doc)?;
        self.retire_blob(blob).await;
        Ok(Some(meta))
    }

    async fn stored_before(
        &self,
        cutoff_ms: i64,
        limit: usize,
    ) -> Result<Vec<ResultMeta>, StoreError> {
        let docs: Vec<Document> = self
            .results
            .find(doc! { "created_at_ms": { "$lt": cutoff_ms } })
            .sort(doc! { "created_at_ms": 1 })
            .limit(i64::try_from(limit).unwrap_or(i64::MAX))
            .await
            .map_err(|e| driver_error("listing old results", e))?
            .try_collect()
            .await
            .map_err(|e| driver_error("listing old results", e))?;
        docs.iter()
            .map(|doc| {
                let name = doc.get_str("_id").unwrap_or_default();
                result_from_doc(name, doc).map(|(meta, _)| meta)
            })
            .collect()
    }

    async fn usage(&self) -> Result<(u64, u64), StoreError> {
        let pipeline = [doc! { "$group": {
            "_id": Bson::Null,
            "count": { "$sum": 1 },
            "bytes": { "$sum": "$size" },
        } }];
        let groups: Vec<Document> = self
            .results
            .aggregate(pipeline)
            .await
            .map_err(|e| driver_error("summing results", e))?
            .try_collect()
            .await
            .map_err(|e| driver_error("summing results", e))?;
        let number = |doc: &Document, key: &str| match doc.get(key) {
            Some(Bson::Int32(n)) => *n as u64,
            Some(Bson::Int64(n)) => *n as u64,
            Some(Bson::Double(n)) => *n as u64,
            _ => 0,
        };
        Ok(groups
            .first()
            .map_or((0, 0), |g| (number(g, "count"), number(g, "bytes"))))
    }

    async fn sweep_blobs(&self, grace: Duration) -> Result<u64, StoreError> {
        let now = self.server_now().await?;
        let cutoff = bson::DateTime::from_millis(now.timestamp_millis() - millis(grace));
        let ids = |filter: Document| async move {
            let files: Vec<Document> = self
                .result_files
                .find(filter)
                .projection(doc! { "_id": 1 })
                .limit(SWEEP_BATCH)
                .await
                .map_err(|e| driver_error("listing result blobs", e))?
                .try_collect()
                .await
                .map_err(|e| driver_error("listing result blobs", e))?;
            Ok::<_, StoreError>(
                files
                    .iter()
                    .filter_map(|f| f.get_object_id("_id").ok())
                    .collect::<Vec<_>>(),
            )
        };
        let mut deleted = 0;
        // Replaced or deleted results, retired long enough ago.
        for id in ids(doc! { "metadata.retired_at": { "$lt": cutoff } }).await? {
            deleted += u64::from(self.delete_blob(id).await);
        }
        // Blobs still pending long after their upload: the swap was refused or failed, or the
        // instance died before it. One that a document uses after all only lost its mark.
        let pending = doc! { "metadata.pending": true, "uploadDate": { "$lt": cutoff } };
        for id in ids(pending).await? {
            let used = self
                .results
                .find_one(doc! { "blob_id": id })
                .projection(doc! { "_id": 1 })
                .await
                .map_err(|e| driver_error("looking up a result blob", e))?;
            if used.is_some() {
                self.settle_blob(id).await;
            } else {
                deleted += u64::from(self.delete_blob(id).await);
            }
        }
        Ok(deleted)
    }
}

/// The password in a `mongodb://user:password@host` URI, as written there.
fn uri_password(uri: &str) -> Option<&str> {
    let rest = uri.split_once("://")?.1;
    let authority = &rest[..rest.find(['/', '?']).unwrap_or(rest.len())];
    let userinfo = &authority[..authority.rfind('@')?];
    userinfo.split_once(':').map(|(_, password)| password)
}

/// The URI with its password masked, for error messages and logs.
pub(crate) fn redact_uri(uri: &str) -> String {
    match uri_password(uri) {
        Some(password) => {
            // The password sits right before the last '@' of the authority.
            let rest_at = uri.find("://").map_or(0, |i| i + 3);
            let authority_end = uri[rest_at..]
                .find(['/', '?'])
                .map_or(uri.len(), |i| rest_at + i);
            let at = uri[..authority_end].rfind('@').unwrap_or(authority_end);
            format!("{}***{}", &uri[..at - password.len()], &uri[at..])
        }
        None => uri.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redact_masks_only_the_password() {
        assert_eq!(
            redact_uri("mongodb://app:p@ss@h1:27017,h2/db?authSource=admin"),
            "mongodb://app:***@h1:27017,h2/db?authSource=admin"
        );
        assert_eq!(
            redact_uri("mongodb://h1:27017/?directConnection=true"),
            "mongodb://h1:27017/?directConnection=true"
        );
        assert_eq!(redact_uri("mongodb://app@h1"), "mongodb://app@h1");
        assert_eq!(uri_password("mongodb+srv://a:b@c?x=y"), Some("b"));
    }
}
