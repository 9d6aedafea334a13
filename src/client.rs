//! Client commands: `upload`, `status`, `watch`, `fetch`, `cancel` and `delete` against a
//! running server. A server that is still starting (or not yet listening) is waited for, up
//! to `--wait-ready` seconds, as gRPC's wait-for-ready does for connections.
//!
//! Everything here speaks to the server through the generated gRPC client; `main` only
//! formats. Failures carry the exit code they deserve (see `ClientError::exit_code`).

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use futures::StreamExt;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;
use tonic::transport::Channel;
use tonic::Code;

use crate::api::pb::{self, upscaler_client::UpscalerClient};

/// Upload chunks: well under gRPC's default 4 MiB message limit.
const CHUNK: usize = 1 << 20;

pub type Client = UpscalerClient<InterceptedService<Channel, Token>>;

/// Adds `authorization: Bearer <token>` to every call, when a token is given.
#[derive(Clone)]
pub struct Token(Option<MetadataValue<Ascii>>);

impl Interceptor for Token {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server cannot be reached or says it is unavailable.
    #[error("server unavailable: {0}")]
    Unavailable(String),
    /// The request was refused: bad input, unknown name, limits, credentials.
    #[error("{0}")]
    Refused(String),
    /// A local file problem or a bad argument.
    #[error("{0}")]
    Input(String),
    /// The task ended in FAILURE.
    #[error("task {task_id} failed: {error}")]
    TaskFailed { task_id: String, error: String },
    /// Anything else (a broken stream, a result that fails its checksum, a local write).
    #[error("{0}")]
    Other(String),
    /// Stopped by Ctrl-C.
    #[error("{0}")]
    Interrupted(String),
}

impl ClientError {
    /// 0 success, 1 task failed or other failure, 2 bad usage or input, 3 server
    /// unreachable or unavailable, 130 interrupted (Ctrl-C).
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::TaskFailed { .. } | Self::Other(_) => 1,
            Self::Refused(_) | Self::Input(_) => 2,
            Self::Unavailable(_) => 3,
            Self::Interrupted(_) => 130,
        }
    }

    fn from_status(what: &str, s: tonic::Status) -> Self {
        let msg = format!("{what}: {} ({:?})", s.message(), s.code());
        // A connection that breaks (e.g. plaintext to a TLS server) arrives as UNKNOWN with a
        // transport error behind it: the server is not usable from here.
        let transport = std::error::Error::source(&s)
            .is_some_and(|e| e.is::<tonic::transport::Error>())
            || s.message() == "transport error";
        if s.code() == Code::Unknown && transport {
            return Self::Unavailable(msg);
        }
        match s.code() {
            Code::Unavailable | Code::DeadlineExceeded => Self::Unavailable(msg),
            Code::InvalidArgument
            | Code::NotFound
            | Code::AlreadyExists
            | Code::ResourceExhausted
            | Code::FailedPrecondition
            | Code::OutOfRange
            | Code::Unauthenticated
            | Code::PermissionDenied => Self::Refused(msg),
            _ => Self::Other(msg),
        }
    }
}

/// Connects to `addr` (e.g. `http://127.0.0.1:50051`), failing within a few seconds; every
/// call then carries `token` as a bearer token.
/// An `https://` address uses TLS, trusting `ca` (a PEM file) if given, else the public web
/// roots.
pub async fn connect(
    addr: &str,
    token: Option<&str>,
    ca: Option<&Path>,
) -> Result<Client, ClientError> {
    let token = token
        .map(|t| {
            MetadataValue::try_from(format!("Bearer {t}"))
                .map_err(|_| ClientError::Input("the token must be printable ASCII".into()))
        })
        .transpose()?;
    Ok(UpscalerClient::with_interceptor(
        channel(addr, ca).await?,
        Token(token),
    ))
}

/// A connection to `addr`, as `connect` makes it, for any service.
async fn channel(addr: &str, ca: Option<&Path>) -> Result<Channel, ClientError> {
    let endpoint = Channel::from_shared(addr.to_string())
        .map_err(|e| ClientError::Input(format!("bad server address `{addr}`: {e}")))?
        .connect_timeout(Duration::from_secs(5));
    let endpoint = if addr.starts_with("https://") {
        let mut tls = tonic::transport::ClientTlsConfig::new().with_webpki_roots();
        if let Some(ca) = ca {
            let pem = std::fs::read(ca)
                .map_err(|e| ClientError::Input(format!("cannot read {}: {e}", ca.display())))?;
            tls = tls.ca_certificate(tonic::transport::Certificate::from_pem(pem));
        }
        endpoint
            .tls_config(tls)
            .map_err(|e| ClientError::Input(format!("TLS: {e}")))?
    } else {
        endpoint
    };
    endpoint
        .connect()
        .await
        .map_err(|e| ClientError::Unavailable(format!("cannot connect to {addr}: {}", cause(&e))))
}

/// The `grpc.health.v1` status of `service` ("" for the whole server) at `addr`, within
/// `timeout`. Health needs no token.
pub async fn health(
    addr: &str,
    ca: Option<&Path>,
    service: &str,
    timeout: Duration,
) -> Result<tonic_health::pb::health_check_response::ServingStatus, ClientError> {
    use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};
    let check = async {
        let mut client = HealthClient::new(channel(addr, ca).await?);
        let reply = client
            .check(HealthCheckRequest {
                service: service.to_string(),
            })
            .await
            .map_err(|s| ClientError::from_status("health check", s))?;
        Ok(reply.into_inner().status())
    };
    tokio::time::timeout(timeout, check)
        .await
        .unwrap_or_else(|_| {
            Err(ClientError::Unavailable(format!(
                "{addr} did not answer within {}s",
                timeout.as_secs_f64()
            )))
        })
}

/// Runs `attempt` (a connection and the first call on it) until it gets anything but
/// UNAVAILABLE, for at most `wait`: a server still loading its model, or not listening yet,
/// is ridden out with backoff. Says once on stderr that it waits. With `wait` zero, one try.
pub async fn when_ready<T, F, Fut>(wait: Duration, mut attempt: F) -> Result<T, ClientError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, ClientError>>,
{
    let deadline = Instant::now() + wait;
    let mut delay = Duration::from_millis(100);
    let mut said = false;
    loop {
        match attempt().await {
            Err(ClientError::Unavailable(why)) => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(ClientError::Unavailable(if said {
                        format!("{why} (still unavailable after {}s)", wait.as_secs())
                    } else {
                        why
                    }));
                }
                if !said {
                    eprintln!(
                        "waiting for the server to become ready (up to {}s): {why}",
                        wait.as_secs()
                    );
                    said = true;
                }
                tokio::time::sleep(delay.min(left)).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
            other => return other,
        }
    }
}

/// The innermost cause of an error, which is the one a user can act on.
fn cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut e = e;
    while let Some(next) = e.source() {
        e = next;
    }
    e.to_string()
}

#[derive(Debug, Clone, Default)]
pub struct UploadOptions {
    pub model: Option<String>,
    pub outscale: Option<f64>,
    pub overwrite: bool,
    pub format: pb::OutputFormat,
}

/// Streams `path` to the server under its file name.
pub async fn upload(
    client: &mut Client,
    path: &Path,
    opts: &UploadOptions,
) -> Result<pb::UploadImageResponse, ClientError> {
    let file_name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| ClientError::Input(format!("{}: not a file name", path.display())))?
        .to_string();
    let mut file = tokio::fs::File::open(path)
        .await
        .map_err(|e| ClientError::Input(format!("cannot read {}: {e}", path.display())))?;
    let metadata = pb::UploadMetadata {
        file_name,
        model: opts.model.clone().unwrap_or_default(),
        outscale: opts.outscale,
        overwrite: opts.overwrite,
        output_format: opts.format.into(),
        ..Default::default()
    };
    let shown = path.display().to_string();
    let requests = async_stream::stream! {
        use pb::upload_image_request::Payload;
        yield pb::UploadImageRequest { payload: Some(Payload::Metadata(metadata)) };
        loop {
            let mut chunk = vec![0u8; CHUNK];
            match file.read(&mut chunk).await {
                Ok(0) => break,
                Ok(n) => {
                    chunk.truncate(n);
                    yield pb::UploadImageRequest { payload: Some(Payload::Chunk(chunk)) };
                }
                Err(e) => {
                    // Ending the stream early makes the server refuse an incomplete image.
                    tracing::error!("reading {shown}: {e}");
                    break;
                }
            }
        }
    };
    client
        .upload_image(requests)
        .await
        .map(|r| r.into_inner())
        .map_err(|s| ClientError::from_status("upload refused", s))
}

pub async fn get_task(client: &mut Client, task_id: &str) -> Result<pb::Task, ClientError> {
    client
        .get_task(pb::GetTaskRequest {
            task_id: task_id.into(),
        })
        .await
        .map(|r| r.into_inner())
        .map_err(|s| ClientError::from_status("status", s))
}

/// Cancels a task; the answer is its state after (CANCELLED, or STARTED with
/// `cancel_requested` while its worker has not stopped yet).
pub async fn cancel(client: &mut Client, task_id: &str) -> Result<pb::Task, ClientError> {
    client
        .cancel_task(pb::CancelTaskRequest {
            task_id: task_id.into(),
        })
        .await
        .map(|r| r.into_inner())
        .map_err(|s| ClientError::from_status("cancel", s))
}

/// Deletes the stored result `name`.
pub async fn delete(
    client: &mut Client,
    name: &str,
) -> Result<pb::DeleteProcessedResponse, ClientError> {
    client
        .delete_processed(pb::DeleteProcessedRequest {
            file_name: name.into(),
        })
        .await
        .map(|r| r.into_inner())
        .map_err(|s| ClientError::from_status("delete", s))
}

/// Follows a task until it ends, calling `on_update` with every state; returns the last.
pub async fn watch(
    client: &mut Client,
    task_id: &str,
    mut on_update: impl FnMut(&pb::Task),
) -> Result<pb::Task, ClientError> {
    let mut stream = client
        .watch_task(pb::WatchTaskRequest {
            task_id: task_id.into(),
        })
        .await
        .map_err(|s| ClientError::from_status("watch", s))?
        .into_inner();
    let mut last = None;
    while let Some(update) = stream.next().await {
        let task = update.map_err(|s| ClientError::from_status("watch", s))?;
        on_update(&task);
        last = Some(task);
    }
    let task = last.ok_or_else(|| ClientError::Other("watch: the server sent nothing".into()))?;
    if !is_terminal(&task) {
        return Err(ClientError::Unavailable(format!(
            "watch: the stream ended while task {task_id} was {}",
            state_name(&task)
        )));
    }
    Ok(task)
}

pub fn is_terminal(task: &pb::Task) -> bool {
    matches!(
        task.state(),
        pb::TaskState::Success | pb::TaskState::Failure | pb::TaskState::Cancelled
    )
}

/// `SUCCESS`, `FAILURE`, ...
pub fn state_name(task: &pb::Task) -> &'static str {
    match task.state() {
        pb::TaskState::Pending => "PENDING",
        pb::TaskState::Started => "STARTED",
        pb::TaskState::Success => "SUCCESS",
        pb::TaskState::Failure => "FAILURE",
        pb::TaskState::Cancelled => "CANCELLED",
        pb::TaskState::Unspecified => "UNKNOWN",
    }
}

/// `QUEUED`, `IN_PROGRESS`, `ALREADY_PROCESSED`.
pub fn outcome_name(r: &pb::UploadImageResponse) -> &'static str {
    match r.outcome() {
        pb::UploadOutcome::Queued => "QUEUED",
        pb::UploadOutcome::InProgress => "IN_PROGRESS",
        pb::UploadOutcome::AlreadyProcessed => "ALREADY_PROCESSED",
        pb::UploadOutcome::Unspecified => "UNKNOWN",
    }
}

/// Downloads the result stored under `name` to the path `choose` picks from its metadata
/// (written to a temporary file beside it, checked against the announced size and sha256,
/// then renamed into place).
pub async fn fetch(
    client: &mut Client,
    name: &str,
    choose: impl FnOnce(&pb::ResultMetadata) -> PathBuf,
) -> Result<(pb::ResultMetadata, PathBuf), ClientError> {
    use pb::fetch_processed_response::Payload;
    let mut stream = client
        .fetch_processed(pb::FetchProcessedRequest {
            file_name: name.into(),
        })
        .await
        .map_err(|s| ClientError::from_status("fetch", s))?
        .into_inner();
    let meta = match stream.next().await {
        Some(Ok(pb::FetchProcessedResponse {
            payload: Some(Payload::Metadata(m)),
        })) => m,
        Some(Err(s)) => return Err(ClientError::from_status("fetch", s)),
        _ => return Err(ClientError::Other("fetch: no metadata first".into())),
    };
    let out = choose(&meta);
    let out = out.as_path();
    let dir = match out.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let local =
        |e: std::io::Error| ClientError::Input(format!("cannot write {}: {e}", out.display()));
    let tmp = tempfile::Builder::new()
        .prefix(".upscaler-fetch-")
        .tempfile_in(&dir)
        .map_err(local)?;
    let mut file = tokio::fs::File::from_std(tmp.reopen().map_err(local)?);
    let mut hasher = Sha256::new();
    let mut size = 0u64;
    while let Some(msg) = stream.next().await {
        match msg
            .map_err(|s| ClientError::from_status("fetch", s))?
            .payload
        {
            Some(Payload::Chunk(bytes)) => {
                hasher.update(&bytes);
                size += bytes.len() as u64;
                file.write_all(&bytes).await.map_err(local)?;
            }
            _ => return Err(ClientError::Other("fetch: unexpected message".into())),
        }
    }
    file.flush().await.map_err(local)?;
    drop(file);
    let sha = crate::tasks::types::hex(&hasher.finalize());
    if size != meta.size || sha != meta.sha256 {
        return Err(ClientError::Other(format!(
            "fetch: received {size} bytes with sha256 {sha}, the server announced {} bytes with {}",
            meta.size, meta.sha256
        )));
    }
    tmp.persist(out).map_err(|e| local(e.error))?;
    Ok((meta, out.to_path_buf()))
}

/// Where `upload --wait` saves a result by default: `<stem>_x<scale>.<ext>` beside the input.
pub fn default_output(input: &Path, scale: &str, content_type: &str) -> PathBuf {
    let stem = input
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "result".into());
    let ext = match content_type {
        "image/jpeg" => "jpg",
        "image/webp" => "webp",
        _ => "png",
    };
    input.with_file_name(format!("{stem}_x{scale}.{ext}"))
}
