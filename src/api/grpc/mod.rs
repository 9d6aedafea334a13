//! The gRPC handlers. Every handler has the same shape: validate and convert the request
//! into a core request, call `tasks`, convert the answer back; errors go through the one
//! mapping in `status`.

mod convert;
mod status;

use futures::StreamExt;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::Core;
use crate::metrics;
use crate::tasks::{self, TaskService};

pub mod pb {
    tonic::include_proto!("upscaler.v1");

    /// The encoded descriptors of `upscale.proto`, served by reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("upscaler_descriptor");
}

use pb::upload_image_request::Payload as UploadPayload;

/// Server-stream buffers: small, so a slow client holds little memory and never the workers.
const STREAM_BUFFER: usize = 4;

pub struct UpscalerApi {
    core: Core,
}

impl UpscalerApi {
    pub fn new(core: Core) -> Self {
        Self { core }
    }

    fn core(&self) -> Result<&TaskService, Status> {
        self.core.get().map_err(status::from_core)
    }
}

#[tonic::async_trait]
impl pb::upscaler_server::Upscaler for UpscalerApi {
    async fn upload_image(
        &self,
        request: Request<Streaming<pb::UploadImageRequest>>,
    ) -> Result<Response<pb::UploadImageResponse>, Status> {
        metrics::observe("UploadImage", self.upload(request)).await
    }

    async fn get_task(
        &self,
        request: Request<pb::GetTaskRequest>,
    ) -> Result<Response<pb::Task>, Status> {
        metrics::observe("GetTask", self.task(request)).await
    }

    type WatchTaskStream = ReceiverStream<Result<pb::Task, Status>>;

    async fn watch_task(
        &self,
        request: Request<pb::WatchTaskRequest>,
    ) -> Result<Response<Self::WatchTaskStream>, Status> {
        metrics::observe("WatchTask", self.watch(request)).await
    }

    type FetchProcessedStream = ReceiverStream<Result<pb::FetchProcessedResponse, Status>>;

    async fn fetch_processed(
        &self,
        request: Request<pb::FetchProcessedRequest>,
    ) -> Result<Response<Self::FetchProcessedStream>, Status> {
        metrics::observe("FetchProcessed", self.fetch(request)).await
    }

    async fn list_models(
        &self,
        _request: Request<pb::ListModelsRequest>,
    ) -> Result<Response<pb::ListModelsResponse>, Status> {
        metrics::observe("ListModels", async {
            let catalog = self.core()?.models().await;
            Ok(Response::new(catalog.into()))
        })
        .await
    }

    async fn cancel_task(
        &self,
        request: Request<pb::CancelTaskRequest>,
    ) -> Result<Response<pb::Task>, Status> {
        metrics::observe("CancelTask", async {
            let id = convert::task_id(&request.get_ref().task_id)?;
            let task = self.core()?.cancel(id).await.map_err(status::from_core)?;
            Ok(Response::new(task.into()))
        })
        .await
    }

    async fn delete_processed(
        &self,
        request: Request<pb::DeleteProcessedRequest>,
    ) -> Result<Response<pb::DeleteProcessedResponse>, Status> {
        metrics::observe("DeleteProcessed", async {
            let name = &request.get_ref().file_name;
            let meta = self
                .core()?
                .delete_result(name)
                .await
                .map_err(status::from_core)?;
            Ok(Response::new(pb::DeleteProcessedResponse {
                file_name: meta.file_name,
                size: meta.size,
            }))
        })
        .await
    }
}

/// The handlers themselves; the trait methods above only add metrics.
impl UpscalerApi {
    async fn upload(
        &self,
        request: Request<Streaming<pb::UploadImageRequest>>,
    ) -> Result<Response<pb::UploadImageResponse>, Status> {
        let core = self.core()?;
        let mut stream = request.into_inner();
        let first = stream.message().await?.ok_or_else(|| {
            Status::invalid_argument("empty upload: the first message must carry metadata")
        })?;
        let meta = match first.payload {
            Some(UploadPayload::Metadata(m)) => tasks::UploadMeta::try_from(m)?,
            _ => {
                return Err(Status::invalid_argument(
                    "the first message must carry metadata, not a chunk",
                ))
            }
        };
        let chunks = stream
            .map(|msg| match msg {
                Ok(pb::UploadImageRequest {
                    payload: Some(UploadPayload::Chunk(bytes)),
                }) => {
                    ::metrics::counter!(metrics::UPLOADED_BYTES).increment(bytes.len() as u64);
                    Ok(bytes)
                }
                Ok(_) => Err(tasks::Error::InvalidArgument(
                    "only the first message may carry metadata; later ones carry chunks".into(),
                )),
                Err(status) => Err(tasks::Error::Aborted(status.message().to_string())),
            })
            .boxed();
        let outcome = core.upload(meta, chunks).await.map_err(status::from_core)?;
        Ok(Response::new(outcome.into()))
    }

    async fn task(
        &self,
        request: Request<pb::GetTaskRequest>,
    ) -> Result<Response<pb::Task>, Status> {
        let id = convert::task_id(&request.get_ref().task_id)?;
        let task = self.core()?.get(id).await.map_err(status::from_core)?;
        Ok(Response::new(task.into()))
    }

    async fn watch(
        &self,
        request: Request<pb::WatchTaskRequest>,
    ) -> Result<Response<ReceiverStream<Result<pb::Task, Status>>>, Status> {
        let id = convert::task_id(&request.get_ref().task_id)?;
        let mut updates = self.core()?.watch(id).await.map_err(status::from_core)?;
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        tokio::spawn(async move {
            while let Some(task) = updates.next().await {
                if tx.send(Ok(task.into())).await.is_err() {
                    break; // the client left
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn fetch(
        &self,
        request: Request<pb::FetchProcessedRequest>,
    ) -> Result<Response<ReceiverStream<Result<pb::FetchProcessedResponse, Status>>>, Status> {
        let name = &request.get_ref().file_name;
        let (meta, mut chunks) = self.core()?.fetch(name).await.map_err(status::from_core)?;
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        tokio::spawn(async move {
            use pb::fetch_processed_response::Payload;
            let first = pb::FetchProcessedResponse {
                payload: Some(Payload::Metadata(meta.into())),
            };
            if tx.send(Ok(first)).await.is_err() {
                return;
            }
            while let Some(chunk) = chunks.next().await {
                let msg = chunk
                    .map(|c| {
                        ::metrics::counter!(metrics::SERVED_BYTES).increment(c.len() as u64);
                        pb::FetchProcessedResponse {
                            payload: Some(Payload::Chunk(c)),
                        }
                    })
                    .map_err(|e| status::from_core(e.into()));
                let failed = msg.is_err();
                if tx.send(msg).await.is_err() || failed {
                    return;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}
