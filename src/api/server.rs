//! Server assembly: backends, the task service, health and reflection, and graceful
//! shutdown through one signal. One listener serves every protocol: gRPC (HTTP/2), gRPC-Web
//! and the HTTP routes (HTTP/1.1 or HTTP/2), told apart by path and content type.

use std::future::Future;
use std::sync::Arc;

use tokio::net::TcpListener;
use tonic::server::NamedService;
use tonic::service::interceptor::InterceptedService;
use tonic::service::Routes;
use tower::Layer;

use crate::config::Secret;
use tonic::transport::server::TcpIncoming;
use tonic_health::ServingStatus;

use super::grpc::{pb, pb::upscaler_server::UpscalerServer, UpscalerApi};
use super::{http, tls, Core};
use crate::config::{ConfigError, Settings};
use crate::events::RedisEvents;
use crate::locks::{memory::MemoryLocks, redis::RedisLocks, LockManager};
use crate::store::{embedded::EmbeddedStore, mongo::MongoStore};
use crate::tasks::{Backends, TaskService};

const SERVICE_NAME: &str = "upscaler.v1.Upscaler";

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot listen on {addr}: {cause}")]
    Bind { addr: String, cause: std::io::Error },
    #[error("cannot start: {0}")]
    Startup(String),
    /// A setup problem the message says how to fix (exit status 2).
    #[error("cannot start: {0}")]
    Setup(String),
    #[error("gRPC server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// Binds `settings.listen_addr` and serves until `shutdown` completes.
pub async fn run(
    settings: Settings,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let addr = settings.listen_addr;
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|cause| ServeError::Bind {
            addr: addr.to_string(),
            cause,
        })?;
    serve(settings, listener, shutdown).await
}

/// The backends `settings` name. With MongoDB, tasks are queued in it and shared by every
/// instance on the same database; with Redis too, instances tell each other about task
/// progress and new work over pub/sub.
async fn backends(settings: &Settings) -> Result<Backends, ServeError> {
    let instance = crate::tasks::new_instance_id();
    let redis = match &settings.redis_url {
        Some(url) => {
            let locks = RedisLocks::connect(url, &settings.redis_prefix)
                .await
                .map_err(|e| ServeError::Startup(format!("Redis: {e}")))?;
            tracing::info!("file-name locks in Redis");
            Some((url, locks))
        }
        None => {
            tracing::info!("REDIS_URL unset: in-process file-name locks");
            None
        }
    };
    let Some(uri) = &settings.mongo_uri else {
        // Absolute, so the log says which store this is whatever the current folder.
        let dir = std::path::absolute(&settings.data_dir).unwrap_or(settings.data_dir.clone());
        let store = EmbeddedStore::open(&dir)
            .map_err(|e| ServeError::Startup(format!("DATA_DIR {}: {e}", dir.display())))?;
        tracing::info!(dir = %dir.display(), "MONGO_URI unset: embedded store on local files, in-process queue");
        let store = Arc::new(store);
        let locks: Arc<dyn LockManager> = match redis {
            Some((_, locks)) => Arc::new(locks),
            None => Arc::new(MemoryLocks::new()),
        };
        return Ok(Backends::single(settings, store.clone(), store, locks));
    };
    let store = MongoStore::connect(uri, &settings.mongo_database, settings.task_ttl())
        .await
        .map_err(|e| ServeError::Startup(format!("MongoDB: {e}")))?;
    tracing::info!(
        database = settings.mongo_database,
        "tasks, the shared queue, uploads and results in MongoDB"
    );
    let store = Arc::new(store);
    let (locks, events): (Arc<dyn LockManager>, _) = match redis {
        Some((url, locks)) => {
            let events = RedisEvents::connect(
                url,
                &settings.redis_prefix,
                locks.client().clone(),
                &instance,
            )
            .await
            .map_err(|e| ServeError::Startup(format!("Redis pub/sub: {e}")))?;
            (Arc::new(locks), Some(Arc::new(events)))
        }
        None => {
            tracing::warn!(
                "MONGO_URI without REDIS_URL: file-name locks are per instance, so run only one"
            );
            (Arc::new(MemoryLocks::new()), None)
        }
    };
    Ok(Backends {
        tasks: store.clone(),
        results: store.clone(),
        sources: store.clone(),
        queue: Some(store),
        locks,
        events,
        instance,
    })
}

/// Serves on `listener` until `shutdown` completes. Health reports NOT_SERVING until the
/// backends are connected and the default model is loaded, and again once shutdown begins.
pub async fn serve(
    settings: Settings,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    settings.validate()?;
    let tls = match (&settings.tls_cert, &settings.tls_key) {
        (Some(cert), Some(key)) => {
            tracing::info!(cert = %cert.display(), "TLS on, offering h2 and http/1.1");
            Some(tls::acceptor(cert, key).map_err(ServeError::Startup)?)
        }
        _ => None,
    };
    if let Some(addr) = settings.metrics_addr {
        crate::metrics::install(addr).map_err(ServeError::Startup)?;
        tracing::info!(%addr, "metrics on http://{addr}/metrics");
    }
    let (health, health_service) = tonic_health::server::health_reporter();
    set_health(&health, ServingStatus::NotServing).await;
    // Both reflection versions: v1 for current clients, v1alpha for older ones (grpcurl 1.8).
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection()
        .build_v1()
        .map_err(|e| ServeError::Startup(format!("reflection: {e}")))?;
    let reflection_v1alpha = reflection()
        .build_v1alpha()
        .map_err(|e| ServeError::Startup(format!("reflection: {e}")))?;

    let core = Core::default();
    let (failed_tx, failed_rx) = tokio::sync::oneshot::channel::<ServeError>();
    let starter = {
        let (core, health, settings) = (core.clone(), health.clone(), settings.clone());
        tokio::spawn(async move {
            let started = async {
                let backends = backends(&settings).await?;
                TaskService::start_with(settings, backends)
                    .await
                    .map_err(|e| match e {
                        crate::tasks::Error::Setup(m) => ServeError::Setup(m),
                        e => ServeError::Startup(e.to_string()),
                    })
            };
            match started.await {
                Ok(service) => {
                    let mut up = service.backends_up();
                    rescan_on_sighup(service.clone());
                    core.set(service);
                    tracing::info!("ready");
                    // Health follows the backends until shutdown aborts this task.
                    loop {
                        let status = if *up.borrow_and_update() {
                            ServingStatus::Serving
                        } else {
                            ServingStatus::NotServing
                        };
                        set_health(&health, status).await;
                        if up.changed().await.is_err() {
                            break;
                        }
                    }
                }
                Err(e) => {
                    let _ = failed_tx.send(e);
                }
            }
        })
    };

    let startup_error = Arc::new(std::sync::Mutex::new(None));
    let signal = {
        let (core, health, startup_error) = (core.clone(), health.clone(), startup_error.clone());
        async move {
            tokio::select! {
                _ = shutdown => tracing::info!("shutting down"),
                Ok(e) = failed_rx => {
                    *startup_error.lock().expect("poisoned") = Some(e);
                }
            }
            // Stop the health updates first, so nothing flips it back to SERVING.
            starter.abort();
            set_health(&health, ServingStatus::NotServing).await;
            if let Some(service) = core.started() {
                service.shutdown().await;
            }
        }
    };

    let local = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    // Everything but health and the page answers only to the bearer token, when one is set.
    let auth = BearerAuth(settings.auth_token.clone());
    let grpc = Routes::new(grpc_web(health_service))
        .add_service(grpc_web(InterceptedService::new(
            reflection_v1,
            auth.clone(),
        )))
        .add_service(grpc_web(InterceptedService::new(
            reflection_v1alpha,
            auth.clone(),
        )))
        .add_service(grpc_web(InterceptedService::new(
            UpscalerServer::new(UpscalerApi::new(core.clone())),
            auth,
        )))
        .into_axum_router();
    let app = grpc.merge(http::router(core, &settings)).fallback(fallback);
    let server = tonic::transport::Server::builder()
        // Plain HTTP/1.1 for the routes, the page and gRPC-Web; HTTP/2 is told by its preface.
        .accept_http1(true)
        // One span per call: its method, and the caller's request id when it sends one.
        .trace_fn(|req| {
            let request_id = req
                .headers()
                .get("x-request-id")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            tracing::info_span!("call", method = req.uri().path(), request_id)
        })
        .add_routes(Routes::from(app));
    tracing::info!(addr = local, "listening");
    match tls {
        Some(acceptor) => {
            server
                .serve_with_incoming_shutdown(tls::incoming(listener, acceptor), signal)
                .await?
        }
        None => {
            // No Nagle: a response's head, data and trailers go out at once, not one ACK
            // (up to 40 ms of delayed ACK) apart.
            let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
            server
                .serve_with_incoming_shutdown(incoming, signal)
                .await?
        }
    }
    let failed = startup_error.lock().expect("poisoned").take();
    match failed {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// A gRPC service that also answers gRPC-Web. The layer goes on each service, not on the
/// server: there it would answer 400 to every plain HTTP/1 request, the routes included.
fn grpc_web<S>(service: S) -> tonic_web::GrpcWebService<S>
where
    S: NamedService,
{
    tonic_web::GrpcWebLayer::new().layer(service)
}

/// Sets the overall status and the service's own: clients check either.
async fn set_health(health: &tonic_health::server::HealthReporter, status: ServingStatus) {
    health.set_service_status("", status).await;
    health.set_service_status(SERVICE_NAME, status).await;
}

/// Lets a call through when it carries the bearer token (or none is set).
#[derive(Clone)]
struct BearerAuth(Option<Secret>);

impl tonic::service::Interceptor for BearerAuth {
    fn call(&mut self, req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        let given = req.metadata().get("authorization").map(|v| v.as_bytes());
        super::check_bearer(self.0.as_ref(), given).map_err(tonic::Status::unauthenticated)?;
        Ok(req)
    }
}

/// What no route serves: gRPC calls get UNIMPLEMENTED as gRPC clients expect, anything else
/// a JSON 404.
async fn fallback(request: axum::extract::Request) -> axum::response::Response {
    let grpc = request
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/grpc"));
    if !grpc {
        return http::not_found(&request);
    }
    let status = tonic::Status::unimplemented(format!("no method {}", request.uri().path()));
    let (parts, ()) = status.into_http::<()>().into_parts();
    axum::response::Response::from_parts(parts, axum::body::Body::empty())
}

/// SIGHUP scans the weights and models folders again (see `tasks::ModelCache::rescan`).
fn rescan_on_sighup(service: TaskService) {
    #[cfg(unix)]
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let mut hangups = match signal(SignalKind::hangup()) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGHUP: models are scanned at start only");
                return;
            }
        };
        while hangups.recv().await.is_some() {
            let models = service.rescan_models().await;
            tracing::info!(models, "SIGHUP: models scanned again");
        }
    });
    #[cfg(not(unix))]
    let _ = service;
}
