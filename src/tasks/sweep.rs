//! The sweeper, on every instance: expired results (RESULT_TTL_SECS), uploads that no task
//! needs any more (GridFS `uploads` in shared mode, `*.src` files in TEMP_DIR alone) once
//! older than ORPHAN_GRACE_SECS, and expired task records. Every deletion is conditional
//! (a result only while it is still the one that was found expired; an upload only while its
//! task is missing or finished), so instances sweeping at once delete each item once and
//! never something made meanwhile.

use std::sync::Arc;

use super::types::now_ms;
use super::Inner;

/// Items looked at per kind and pass; the rest wait for the next pass.
const BATCH: usize = 1000;

/// What one pass deleted.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct SweepReport {
    results: u64,
    uploads: u64,
    blobs: u64,
    task_records: u64,
}

pub(super) async fn sweeper(inner: Arc<Inner>) {
    loop {
        sweep_once(&inner).await;
        tokio::select! {
            _ = inner.shutdown.cancelled() => return,
            _ = tokio::time::sleep(inner.settings.sweep_interval()) => {}
        }
    }
}

async fn sweep_once(inner: &Arc<Inner>) -> SweepReport {
    let mut report = SweepReport::default();
    if !*inner.backends_up.borrow() {
        return report;
    }
    report.results = expired_results(inner).await;
    report.uploads = orphaned_uploads(inner).await;
    // Bytes of replaced and deleted results, kept as long as uploads for reads that had
    // opened them, and bytes that no result came to use.
    match inner
        .results
        .sweep_blobs(inner.settings.orphan_grace())
        .await
    {
        Ok(n) => report.blobs = n,
        Err(e) => tracing::warn!(error = %e, "cannot sweep result blobs"),
    }
    match inner.tasks.purge_expired(now_ms()).await {
        Ok(n) => report.task_records = n,
        Err(e) => tracing::warn!(error = %e, "cannot remove expired task records"),
    }
    let swept = |kind: &'static str, n: u64| {
        if n > 0 {
            metrics::counter!(crate::metrics::SWEPT, "kind" => kind).increment(n);
        }
    };
    swept("result", report.results);
    swept(
        if inner.is_shared() {
            "upload"
        } else {
            "source_file"
        },
        report.uploads,
    );
    swept("result_blob", report.blobs);
    swept("task_record", report.task_records);
    if report != SweepReport::default() {
        tracing::info!(
            results = report.results,
            uploads = report.uploads,
            blobs = report.blobs,
            task_records = report.task_records,
            "swept"
        );
    }
    match inner.results.usage().await {
        Ok((count, bytes)) => {
            metrics::gauge!(crate::metrics::RESULTS_STORED).set(count as f64);
            metrics::gauge!(crate::metrics::RESULT_BYTES_STORED).set(bytes as f64);
        }
        Err(e) => tracing::warn!(error = %e, "cannot measure the stored results"),
    }
    report
}

async fn expired_results(inner: &Inner) -> u64 {
    let Some(ttl) = inner.settings.result_ttl() else {
        return 0;
    };
    let cutoff = now_ms().saturating_sub(ttl.as_millis() as i64);
    let old = match inner.results.stored_before(cutoff, BATCH).await {
        Ok(old) => old,
        Err(e) => {
            tracing::warn!(error = %e, "cannot list expired results");
            return 0;
        }
    };
    let mut deleted = 0;
    for meta in old {
        // A task for the name is running: it replaces the result anyway, and an upload
        // answered ALREADY_PROCESSED a moment ago should find it.
        if matches!(
            inner.locks.holder(&meta.file_name).await,
            Ok(Some(_)) | Err(_)
        ) {
            continue;
        }
        match inner
            .results
            .delete(&meta.file_name, Some(&meta.task_id))
            .await
        {
            Ok(Some(gone)) => {
                deleted += 1;
                tracing::info!(
                    file_name = gone.file_name,
                    bytes = gone.size,
                    "expired result deleted"
                );
            }
            // Replaced meanwhile, or another instance deleted it first.
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(file_name = meta.file_name, error = %e, "cannot delete an expired result")
            }
        }
    }
    deleted
}

async fn orphaned_uploads(inner: &Inner) -> u64 {
    let grace = inner.settings.orphan_grace();
    let cutoff = now_ms().saturating_sub(grace.as_millis() as i64);
    let ids = match inner.sources.sources_before(cutoff, BATCH).await {
        Ok(ids) => ids,
        Err(e) => {
            tracing::warn!(error = %e, "cannot list stored uploads");
            return 0;
        }
    };
    let mut deleted = 0;
    for id in ids {
        if inner.live.lock().expect("poisoned").contains_key(&id) {
            continue;
        }
        // Kept while its task may still run: the record exists and is not finished.
        match inner.tasks.get(&id).await {
            Ok(Some(task)) if !task.state.is_terminal() => continue,
            Ok(_) => {}
            Err(e) => {
                tracing::debug!(task_id = id, error = %e, "cannot check an upload's task");
                continue;
            }
        }
        match inner.sources.delete_source(&id).await {
            Ok(true) => {
                deleted += 1;
                tracing::info!(task_id = id, "orphaned upload deleted");
            }
            Ok(false) => {}
            Err(e) => tracing::warn!(task_id = id, error = %e, "cannot delete an orphaned upload"),
        }
    }
    deleted
}
