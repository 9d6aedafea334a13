//! The JSON bodies of the HTTP routes, converted from the core types. Field names follow the
//! Flask service these routes replace (`task_id`, Celery-style state names).

use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use serde::Serialize;

use crate::tasks::types::{TaskRecord, TaskState};
use crate::tasks::{ModelCatalog, ModelInfo, OutcomeKind, UploadOutcome};

/// Everything but the unreserved characters of RFC 3986 is escaped in a path segment.
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

pub fn task_url(task_id: &str) -> String {
    format!("/tasks/{}", utf8_percent_encode(task_id, SEGMENT))
}

pub fn events_url(task_id: &str) -> String {
    format!("{}/events", task_url(task_id))
}

pub fn result_url(file_name: &str) -> String {
    format!("/processed/{}", utf8_percent_encode(file_name, SEGMENT))
}

#[derive(Debug, Serialize)]
pub struct UploadAnswer {
    pub task_id: String,
    pub file_name: String,
    /// `queued`, `in_progress` or `already_processed`.
    pub outcome: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status_url: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub events_url: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub result_url: Option<String>,
}

impl From<UploadOutcome> for UploadAnswer {
    fn from(o: UploadOutcome) -> Self {
        let done = o.kind == OutcomeKind::AlreadyProcessed;
        Self {
            outcome: match o.kind {
                OutcomeKind::Queued => "queued",
                OutcomeKind::InProgress => "in_progress",
                OutcomeKind::AlreadyProcessed => "already_processed",
            },
            status_url: (!done).then(|| task_url(&o.task_id)),
            events_url: (!done).then(|| events_url(&o.task_id)),
            result_url: done.then(|| result_url(&o.file_name)),
            task_id: o.task_id,
            file_name: o.file_name,
        }
    }
}

#[derive(Debug, Serialize)]
pub struct Size {
    pub width: u32,
    pub height: u32,
}

#[derive(Debug, Serialize)]
pub struct Progress {
    /// Network passes done and planned (tiles; two per tile for images with alpha).
    pub done: u32,
    pub total: u32,
}

#[derive(Debug, Serialize)]
pub struct Task {
    pub task_id: String,
    pub state: TaskState,
    /// The same as `state`, under the name Celery clients read.
    pub status: TaskState,
    pub file_name: String,
    pub model: String,
    pub progress: Progress,
    /// For a PENDING task, its place in the queue (1 = next).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queue_position: Option<u32>,
    /// A cancellation was asked for and the task has not stopped yet.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub cancel_requested: bool,
    pub input: Size,
    /// Known once the task succeeded.
    pub output: Option<Size>,
    pub error: Option<String>,
    pub created_at: String,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    /// Where the result is, once the task succeeded.
    pub result_url: Option<String>,
}

impl From<TaskRecord> for Task {
    fn from(t: TaskRecord) -> Self {
        let success = t.state == TaskState::Success;
        Self {
            task_id: t.id,
            state: t.state,
            status: t.state,
            model: t.options.model,
            queue_position: (t.queue_position > 0).then_some(t.queue_position),
            cancel_requested: t.cancel_requested && !t.state.is_terminal(),
            progress: Progress {
                done: t.tiles_done,
                total: t.tiles_total,
            },
            input: Size {
                width: t.input_width,
                height: t.input_height,
            },
            output: success.then_some(Size {
                width: t.output_width,
                height: t.output_height,
            }),
            error: t.error,
            created_at: rfc3339(t.created_at_ms),
            started_at: t.started_at_ms.map(rfc3339),
            finished_at: t.finished_at_ms.map(rfc3339),
            result_url: success.then(|| result_url(&t.file_name)),
            file_name: t.file_name,
        }
    }
}

/// Milliseconds since the epoch as an RFC 3339 UTC time.
fn rfc3339(ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(ms as i128 * 1_000_000)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

#[derive(Debug, Serialize)]
pub struct Models {
    /// The model used when an upload names none.
    pub default: String,
    pub models: Vec<ModelInfo>,
}

impl From<ModelCatalog> for Models {
    fn from(c: ModelCatalog) -> Self {
        Self {
            default: c.default_model,
            models: c.models,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_escape_names() {
        assert_eq!(result_url("cat 1#.png"), "/processed/cat%201%23.png");
        assert_eq!(result_url("été.jpg"), "/processed/%C3%A9t%C3%A9.jpg");
        assert_eq!(task_url("a-b_c.d~e"), "/tasks/a-b_c.d~e");
    }

    #[test]
    fn times_are_rfc3339_utc() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_764_000_000_123), "2025-11-24T16:00:00.123Z");
    }
}
