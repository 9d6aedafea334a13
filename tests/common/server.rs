//! An in-process server on 127.0.0.1:0 for end-to-end tests, on the embedded backends or on
//! the real Redis and Mongo-wire servers named by `UPSCALER_TEST_REDIS_URL` and
//! `UPSCALER_TEST_MONGO_URI`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::oneshot;
use tonic::transport::Channel;
use tonic::Code;
use upscaler::api::pb::{self, upscaler_client::UpscalerClient};
use upscaler::Settings;

pub type Client = UpscalerClient<Channel>;

#[derive(Debug, Clone, PartialEq)]
pub enum Backend {
    Embedded,
    Real {
        redis_url: String,
        mongo_uri: String,
    },
}

/// The real servers, or `None` (after a loud message) when they are not configured. Under CI
/// a missing server is a failure, not a skip.
pub fn real_backend(test: &str) -> Option<Backend> {
    let redis = std::env::var("UPSCALER_TEST_REDIS_URL").ok();
    let mongo = std::env::var("UPSCALER_TEST_MONGO_URI").ok();
    match (redis, mongo) {
        (Some(redis_url), Some(mongo_uri)) => Some(Backend::Real {
            redis_url,
            mongo_uri,
        }),
        _ => super::skip_or_fail(&format!(
            "{test}: needs UPSCALER_TEST_REDIS_URL and UPSCALER_TEST_MONGO_URI (real Redis and a Mongo-wire server)"
        )),
    }
}

/// Directories and names that survive a server restart.
#[derive(Clone)]
pub struct Place {
    pub backend: Backend,
    pub data_dir: PathBuf,
    pub temp_dir: PathBuf,
    /// Unique per test: the Mongo database and the Redis key prefix.
    pub namespace: String,
    _root: Arc<tempfile::TempDir>,
}

impl Place {
    pub fn new(backend: Backend) -> Self {
        let root = tempfile::tempdir().unwrap();
        Self {
            backend,
            data_dir: root.path().join("data"),
            temp_dir: root.path().join("tmp"),
            namespace: format!("upscaler_test_{}", uuid::Uuid::new_v4().simple()),
            _root: Arc::new(root),
        }
    }

    pub fn settings(&self) -> Settings {
        let mut s = Settings::for_dirs(
            self.data_dir.clone(),
            self.temp_dir.clone(),
            super::root().join("weights"),
        );
        s.default_model = "realesr-animevideov3".into();
        s.mongo_database = self.namespace.clone();
        s.redis_prefix = self.namespace.clone();
        s.log_level = "warn".into();
        match &self.backend {
            Backend::Embedded => {
                s.redis_url = None;
                s.mongo_uri = None;
            }
            Backend::Real {
                redis_url,
                mongo_uri,
            } => {
                s.redis_url = Some(redis_url.clone());
                s.mongo_uri = Some(mongo_uri.clone());
            }
        }
        s
    }

    /// The folder under TEMP_DIR where a single instance of this place keeps its files.
    pub fn work_dir(&self) -> PathBuf {
        upscaler::tasks::work_dir(&self.settings(), None)
    }

    /// Files left under the temp dir, in any instance's folder (uploads in flight or
    /// sources of live tasks; not the folders' own lock files).
    pub fn temp_files(&self) -> Vec<String> {
        fn walk(dir: &std::path::Path, out: &mut Vec<String>) {
            let Ok(entries) = std::fs::read_dir(dir) else {
                return;
            };
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if e.path().is_dir() {
                    walk(&e.path(), out);
                } else if name != ".owner" {
                    out.push(name);
                }
            }
        }
        let mut out = Vec::new();
        walk(&self.temp_dir, &mut out);
        out
    }
}

pub struct Server {
    pub addr: std::net::SocketAddr,
    pub client: Client,
    stop: Option<oneshot::Sender<()>>,
    handle: ServeHandle,
}

impl Server {
    pub async fn start(place: &Place) -> Self {
        Self::start_with(place.settings()).await
    }

    pub async fn start_with(settings: Settings) -> Self {
        Self::start_at(settings, 0).await
    }

    /// A server on 127.0.0.1:`port` (0: any free port), once SERVING.
    pub async fn start_at(settings: Settings, port: u16) -> Self {
        let (addr, stop, handle) = spawn(settings, port).await;
        let channel = Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        Self::ready(addr, channel, stop, handle).await
    }

    /// A server speaking TLS with `certs`, once SERVING; its client trusts their CA and
    /// connects to `localhost:<port>`.
    pub async fn start_tls(mut settings: Settings, certs: &super::TestCerts) -> Self {
        settings.tls_cert = Some(certs.cert.clone());
        settings.tls_key = Some(certs.key.clone());
        let (addr, stop, handle) = spawn(settings, 0).await;
        let pem = std::fs::read(&certs.ca).unwrap();
        let tls = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(pem))
            .domain_name("localhost");
        let channel = Channel::from_shared(format!("https://localhost:{}", addr.port()))
            .unwrap()
            .tls_config(tls)
            .unwrap()
            .connect()
            .await
            .unwrap();
        Self::ready(addr, channel, stop, handle).await
    }

    async fn ready(
        addr: std::net::SocketAddr,
        channel: Channel,
        stop: oneshot::Sender<()>,
        handle: ServeHandle,
    ) -> Self {
        wait_serving(channel.clone()).await;
        Self {
            addr,
            client: UpscalerClient::new(channel),
            stop: Some(stop),
            handle,
        }
    }

    /// Graceful shutdown, as on SIGTERM.
    pub async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(Duration::from_secs(60), self.handle)
            .await
            .expect("server stops within a minute")
            .unwrap()
            .unwrap();
    }
}

/// A server that stays starting for `selection_ms`: its store waits for a MongoDB that is not
/// there, then the start fails.
pub struct Starting {
    pub addr: std::net::SocketAddr,
    _stop: oneshot::Sender<()>,
    handle: ServeHandle,
}

impl Starting {
    pub async fn begin(place: &Place, selection_ms: u64) -> Self {
        let mut settings = place.settings();
        settings.mongo_uri = Some(format!(
            "mongodb://127.0.0.1:{}/?directConnection=true&serverSelectionTimeoutMS={selection_ms}",
            free_port()
        ));
        let (addr, _stop, handle) = spawn(settings, 0).await;
        Self {
            addr,
            _stop,
            handle,
        }
    }

    /// Waits for the start to give up, and asserts that it did. The stop sender lives until
    /// then, so the server is never asked to stop.
    pub async fn fails(self) {
        let Self { handle, _stop, .. } = self;
        let failed = tokio::time::timeout(Duration::from_secs(60), handle)
            .await
            .expect("the start gives up within a minute")
            .unwrap();
        assert!(failed.is_err(), "the start cannot succeed without MongoDB");
    }
}

type ServeHandle = tokio::task::JoinHandle<Result<(), upscaler::api::ServeError>>;

/// `upscaler::serve` on 127.0.0.1:`port` until the sender is used.
async fn spawn(
    settings: Settings,
    port: u16,
) -> (std::net::SocketAddr, oneshot::Sender<()>, ServeHandle) {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let handle = tokio::spawn(upscaler::serve(settings, listener, async {
        let _ = stopped.await;
    }));
    (addr, stop, handle)
}

async fn wait_serving(channel: Channel) {
    use tonic_health::pb::{
        health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest,
    };
    let mut health = HealthClient::new(channel);
    for _ in 0..300 {
        let req = HealthCheckRequest {
            service: "upscaler.v1.Upscaler".into(),
        };
        if let Ok(r) = health.check(req).await {
            if r.into_inner().status == ServingStatus::Serving as i32 {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("server never reported SERVING");
}

pub fn wait_limit() -> Duration {
    let secs = std::env::var("TEST_DEFAULT_TIMEOUT_WAITING")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(60);
    Duration::from_secs(secs)
}

pub fn meta(file_name: &str) -> pb::UploadMetadata {
    pb::UploadMetadata {
        file_name: file_name.into(),
        ..Default::default()
    }
}

/// Sends an upload: the metadata (if any), then the bytes in chunks of `chunk` bytes.
pub async fn upload_parts(
    client: &mut Client,
    metadata: Option<pb::UploadMetadata>,
    bytes: &[u8],
    chunk: usize,
) -> Result<pb::UploadImageResponse, tonic::Status> {
    use pb::upload_image_request::Payload;
    let mut msgs = Vec::new();
    if let Some(m) = metadata {
        msgs.push(pb::UploadImageRequest {
            payload: Some(Payload::Metadata(m)),
        });
    }
    for c in bytes.chunks(chunk.max(1)) {
        msgs.push(pb::UploadImageRequest {
            payload: Some(Payload::Chunk(c.to_vec())),
        });
    }
    client
        .upload_image(futures::stream::iter(msgs))
        .await
        .map(|r| r.into_inner())
}

pub async fn upload(
    client: &mut Client,
    metadata: pb::UploadMetadata,
    bytes: &[u8],
) -> Result<pb::UploadImageResponse, tonic::Status> {
    upload_parts(client, Some(metadata), bytes, 64 * 1024).await
}

pub fn outcome(r: &pb::UploadImageResponse) -> pb::UploadOutcome {
    pb::UploadOutcome::try_from(r.outcome).unwrap()
}

pub fn state(t: &pb::Task) -> pb::TaskState {
    pb::TaskState::try_from(t.state).unwrap()
}

/// CancelTask.
pub async fn cancel(client: &mut Client, task_id: &str) -> Result<pb::Task, tonic::Status> {
    client
        .cancel_task(pb::CancelTaskRequest {
            task_id: task_id.into(),
        })
        .await
        .map(|r| r.into_inner())
}

/// Polls GetTask until the task is STARTED with at least one tile done.
pub async fn wait_running(client: &mut Client, task_id: &str) -> pb::Task {
    poll_task(client, task_id, "running", |t| {
        state(t) == pb::TaskState::Started && t.tiles_done >= 1
    })
    .await
}

/// Polls GetTask until the task has ended (SUCCESS, FAILURE or CANCELLED).
pub async fn wait_done(client: &mut Client, task_id: &str) -> pb::Task {
    poll_task(client, task_id, "done", |t| {
        matches!(
            state(t),
            pb::TaskState::Success | pb::TaskState::Failure | pb::TaskState::Cancelled
        )
    })
    .await
}

/// Polls GetTask every 50 ms until `ready` holds, for at most `wait_limit()`.
async fn poll_task(
    client: &mut Client,
    task_id: &str,
    what: &str,
    ready: impl Fn(&pb::Task) -> bool,
) -> pb::Task {
    let deadline = tokio::time::Instant::now() + wait_limit();
    loop {
        let t = client
            .get_task(pb::GetTaskRequest {
                task_id: task_id.into(),
            })
            .await
            .unwrap()
            .into_inner();
        if ready(&t) {
            return t;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "task {task_id} not {what} in {:?}: {t:?}",
            wait_limit()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Downloads a result: (metadata, bytes, largest chunk).
pub async fn fetch(
    client: &mut Client,
    name: &str,
) -> Result<(pb::ResultMetadata, Vec<u8>, usize), tonic::Status> {
    use pb::fetch_processed_response::Payload;
    let mut stream = client
        .fetch_processed(pb::FetchProcessedRequest {
            file_name: name.into(),
        })
        .await?
        .into_inner();
    let first = stream.next().await.expect("a first message")?;
    let Some(Payload::Metadata(meta)) = first.payload else {
        panic!("first message is not metadata")
    };
    let (mut bytes, mut largest) = (Vec::new(), 0);
    while let Some(msg) = stream.next().await {
        match msg?.payload {
            Some(Payload::Chunk(c)) => {
                largest = largest.max(c.len());
                bytes.extend(c);
            }
            other => panic!("unexpected message {other:?}"),
        }
    }
    Ok((meta, bytes, largest))
}

pub fn code<T: std::fmt::Debug>(r: Result<T, tonic::Status>) -> (Code, String) {
    let s = r.expect_err("expected an error status");
    (s.code(), s.message().to_string())
}

/// Opens the place's store the way the server does, from outside the server.
async fn open_store(place: &Place) -> std::sync::Arc<dyn StoreBoth> {
    use upscaler::store::{embedded::EmbeddedStore, mongo::MongoStore};
    match &place.backend {
        Backend::Embedded => std::sync::Arc::new(EmbeddedStore::open(&place.data_dir).unwrap()),
        Backend::Real { mongo_uri, .. } => std::sync::Arc::new(
            MongoStore::connect(mongo_uri, &place.namespace, Duration::from_secs(3600))
                .await
                .unwrap(),
        ),
    }
}

pub trait StoreBoth: upscaler::store::TaskStore + upscaler::store::ResultStore {}
impl<T: upscaler::store::TaskStore + upscaler::store::ResultStore> StoreBoth for T {}

/// Task records still PENDING or STARTED.
pub async fn unfinished_tasks(place: &Place) -> Vec<String> {
    let store = open_store(place).await;
    store
        .unfinished()
        .await
        .unwrap()
        .into_iter()
        .map(|t| format!("{} {:?}", t.file_name, t.state))
        .collect()
}

/// Puts a result straight into the place's store.
pub async fn store_result(place: &Place, name: &str, bytes: Vec<u8>) {
    use sha2::Digest;
    let meta = upscaler::tasks::types::ResultMeta {
        file_name: name.into(),
        content_type: "image/png".into(),
        size: bytes.len() as u64,
        width: 1,
        height: 1,
        sha256: upscaler::tasks::types::hex(&sha2::Sha256::digest(&bytes)),
        fingerprint: "test".into(),
        model: "realesr-animevideov3".into(),
        task_id: "stored-by-test".into(),
        created_at_ms: 0,
        run: 0,
    };
    let store = open_store(place).await;
    let any = upscaler::tasks::types::Replaces::Any;
    upscaler::store::ResultStore::put(&*store, &meta, bytes, &any, &upscaler::store::Fence::NONE)
        .await
        .unwrap();
}

/// A small textured RGB PNG; `seed` varies the pixels (and so the sha256).
pub fn png(w: u32, h: u32, seed: u8) -> Vec<u8> {
    use image::{DynamicImage, Rgb, RgbImage};
    use upscaler::imaging::{self, OutputFormat};
    let img = RgbImage::from_fn(w, h, |x, y| {
        Rgb([(x * 7) as u8 ^ seed, (y * 5) as u8, (x + y) as u8 ^ seed])
    });
    imaging::encode(&DynamicImage::ImageRgb8(img), OutputFormat::Png).unwrap()
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A client of the server process on `port`, once its core answers (NOT_FOUND for an unknown
/// task, rather than UNAVAILABLE).
pub async fn connect(port: u16) -> Client {
    let url = format!("http://127.0.0.1:{port}");
    for _ in 0..600 {
        if let Ok(ch) = Channel::from_shared(url.clone()).unwrap().connect().await {
            let mut c = UpscalerClient::new(ch);
            match c
                .get_task(pb::GetTaskRequest {
                    task_id: "probe".into(),
                })
                .await
            {
                Err(s) if s.code() == Code::NotFound => return c,
                _ => {}
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("server on port {port} never became ready");
}
