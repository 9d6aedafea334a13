//! The task and result records shared by the task service and the stores.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum TaskState {
    Pending,
    Started,
    Success,
    Failure,
    /// Cancelled by a client before it finished: no result was stored.
    Cancelled,
}

impl TaskState {
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Success | Self::Failure | Self::Cancelled)
    }

    /// `PENDING`, `STARTED`, ...: the name clients see, as the records store it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Pending => "PENDING",
            Self::Started => "STARTED",
            Self::Success => "SUCCESS",
            Self::Failure => "FAILURE",
            Self::Cancelled => "CANCELLED",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ResultFormat {
    #[default]
    Png,
    Jpeg,
    /// Lossless WebP.
    Webp,
}

/// What the client asked for, besides the bytes. Together with the source hash it decides
/// whether a stored result can be reused.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobOptions {
    pub model: String,
    pub outscale: Option<f64>,
    /// Tile size in input pixels; `None` uses the server's setting.
    pub tile: Option<u32>,
    pub format: ResultFormat,
}

impl JobOptions {
    /// Hex sha256 over the source hash and every option that changes the output pixels.
    pub fn fingerprint(&self, source_sha256: &str) -> String {
        let text = format!(
            "v1|{source_sha256}|{}|{:?}|{:?}|{:?}",
            self.model, self.outscale, self.tile, self.format
        );
        hex(&Sha256::digest(text.as_bytes()))
    }
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskRecord {
    pub id: String,
    pub state: TaskState,
    pub file_name: String,
    pub options: JobOptions,
    pub source_sha256: String,
    pub tiles_done: u32,
    pub tiles_total: u32,
    pub error: Option<String>,
    pub input_width: u32,
    pub input_height: u32,
    pub output_width: u32,
    pub output_height: u32,
    pub created_at_ms: i64,
    pub started_at_ms: Option<i64>,
    pub finished_at_ms: Option<i64>,
    /// When a finished task's record may be deleted.
    pub expires_at_ms: Option<i64>,
    /// Shared mode: a client asked to cancel the task and the instance that runs it has not
    /// acted on it yet. Written by the store's cancel request only, never from a record, so
    /// saving a record cannot clear it.
    #[serde(default, skip_serializing)]
    pub cancel_requested: bool,
    /// For a PENDING task, its place in the queue (1 = next); 0 otherwise. Worked out when
    /// the task is read, never stored.
    #[serde(default, skip_serializing)]
    pub queue_position: u32,
    /// Shared mode: the fencing token of the task's current run, raised by one at each
    /// claim (so it also counts the runs). A run saves progress, its end and its result only
    /// while the record still holds its token. Written by the store's claim only.
    #[serde(default, skip_serializing)]
    pub run: u64,
    /// The result this task may replace: what was stored under its name when the upload was
    /// accepted, read under the name's lock.
    #[serde(default)]
    pub replaces: Replaces,
}

/// The stored result a task may replace when it stores its own.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Replaces {
    /// Nothing was stored under the name.
    Nothing,
    /// The result made by this task id.
    Result(String),
    /// Whatever is stored (records written before this field existed).
    #[default]
    Any,
}

/// Description of a stored result. One per file name.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResultMeta {
    pub file_name: String,
    pub content_type: String,
    pub size: u64,
    pub width: u32,
    pub height: u32,
    /// Hex sha256 of the result bytes.
    pub sha256: String,
    /// `JobOptions::fingerprint` of the upload that produced it.
    pub fingerprint: String,
    pub model: String,
    pub task_id: String,
    pub created_at_ms: i64,
    /// The run of `task_id` that stored it (its fencing token; 0 on a single instance).
    #[serde(default)]
    pub run: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_names_are_the_stored_names() {
        use TaskState::*;
        for state in [Pending, Started, Success, Failure, Cancelled] {
            let stored = serde_json::to_string(&state).unwrap();
            assert_eq!(stored, format!("\"{}\"", state.name()));
        }
    }
}
