//! Conversions between the wire types and the core types.

use tonic::Status;

use super::pb;
use crate::tasks::types::{ResultFormat, ResultMeta, TaskRecord, TaskState};
use crate::tasks::{ModelCatalog, OutcomeKind, UploadMeta, UploadOutcome};

impl TryFrom<pb::UploadMetadata> for UploadMeta {
    type Error = Status;

    fn try_from(m: pb::UploadMetadata) -> Result<Self, Status> {
        let format = match pb::OutputFormat::try_from(m.output_format) {
            Ok(pb::OutputFormat::Unspecified | pb::OutputFormat::Png) => ResultFormat::Png,
            Ok(pb::OutputFormat::Jpeg) => ResultFormat::Jpeg,
            Ok(pb::OutputFormat::Webp) => ResultFormat::Webp,
            Err(_) => {
                return Err(Status::invalid_argument(format!(
                    "unknown output_format {}",
                    m.output_format
                )))
            }
        };
        Ok(Self {
            file_name: m.file_name,
            model: m.model,
            outscale: m.outscale,
            tile: m.tile,
            format,
            overwrite: m.overwrite,
        })
    }
}

pub fn task_id(id: &str) -> Result<&str, Status> {
    if id.is_empty() {
        return Err(Status::invalid_argument("task_id is empty"));
    }
    Ok(id)
}

impl From<UploadOutcome> for pb::UploadImageResponse {
    fn from(o: UploadOutcome) -> Self {
        let outcome = match o.kind {
            OutcomeKind::Queued => pb::UploadOutcome::Queued,
            OutcomeKind::InProgress => pb::UploadOutcome::InProgress,
            OutcomeKind::AlreadyProcessed => pb::UploadOutcome::AlreadyProcessed,
        };
        Self {
            task_id: o.task_id,
            file_name: o.file_name,
            outcome: outcome.into(),
        }
    }
}

fn timestamp(ms: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: ms.div_euclid(1000),
        nanos: (ms.rem_euclid(1000) * 1_000_000) as i32,
    }
}

impl From<TaskRecord> for pb::Task {
    fn from(t: TaskRecord) -> Self {
        let state = match t.state {
            TaskState::Pending => pb::TaskState::Pending,
            TaskState::Started => pb::TaskState::Started,
            TaskState::Success => pb::TaskState::Success,
            TaskState::Failure => pb::TaskState::Failure,
            TaskState::Cancelled => pb::TaskState::Cancelled,
        };
        Self {
            task_id: t.id,
            state: state.into(),
            file_name: t.file_name,
            model: t.options.model,
            tiles_done: t.tiles_done,
            tiles_total: t.tiles_total,
            error: t.error.unwrap_or_default(),
            input_width: t.input_width,
            input_height: t.input_height,
            output_width: t.output_width,
            output_height: t.output_height,
            created_at: Some(timestamp(t.created_at_ms)),
            started_at: t.started_at_ms.map(timestamp),
            finished_at: t.finished_at_ms.map(timestamp),
            queue_position: t.queue_position,
            cancel_requested: t.cancel_requested && !t.state.is_terminal(),
        }
    }
}

impl From<ResultMeta> for pb::ResultMetadata {
    fn from(m: ResultMeta) -> Self {
        Self {
            file_name: m.file_name,
            content_type: m.content_type,
            size: m.size,
            width: m.width,
            height: m.height,
            sha256: m.sha256,
            model: m.model,
            task_id: m.task_id,
        }
    }
}

impl From<ModelCatalog> for pb::ListModelsResponse {
    fn from(c: ModelCatalog) -> Self {
        Self {
            models: c
                .models
                .into_iter()
                .map(|m| pb::ModelInfo {
                    name: m.name,
                    architecture: m.architecture,
                    scale: m.scale,
                    shipped: m.shipped,
                    description: m.description,
                    in_channels: m.in_channels,
                    out_channels: m.out_channels,
                    size: m.size,
                    parameters: m.parameters,
                    source: m.source,
                    fast_path: m.fast_path,
                })
                .collect(),
            default_model: c.default_model,
        }
    }
}
