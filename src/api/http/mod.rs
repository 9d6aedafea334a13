//! The HTTP routes, on the gRPC port: the Flask service's API kept for its clients
//! (`POST /upscale`, `GET /tasks/{id}`, `GET /processed/{name}`), cancelling a task
//! (`DELETE /tasks/{id}`) and deleting a result (`DELETE /processed/{name}`), task events as
//! Server-Sent Events, the model list, and the built-in page. Handlers only convert: they call the same
//! `TaskService` as gRPC, and core errors become answers in one place (`error`).
//!
//! `AUTH_TOKEN` guards every route but the page's own files, as it guards every RPC but
//! health.

mod error;
mod json;
mod processed;
mod tasks;
mod upload;
mod web;

use std::time::Instant;

use axum::extract::{FromRequestParts, MatchedPath, Path, Request, State};
use axum::http::header;
use axum::http::request::Parts;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};

use super::Core;
use crate::config::{Secret, Settings};
use crate::metrics;
pub(super) use error::ApiError;

#[derive(Clone)]
pub(super) struct HttpState {
    core: Core,
    auth: Option<Secret>,
}

/// Every HTTP route, counted in the metrics by route and status.
pub(super) fn router(core: Core, settings: &Settings) -> Router {
    let state = HttpState {
        core,
        auth: settings.auth_token.clone(),
    };
    let guarded = Router::new()
        .route("/upscale", post(upload::upscale))
        .route("/tasks/{id}", get(tasks::task).delete(tasks::cancel))
        .route("/tasks/{id}/events", get(tasks::events))
        // `get` answers HEAD too; the handler then sends no body.
        .route(
            "/processed/{name}",
            get(processed::processed).delete(processed::delete),
        )
        .route("/models", get(models))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token));
    let open = Router::new()
        .route("/", get(web::index))
        .route("/app.js", get(web::script))
        .route("/style.css", get(web::style));
    guarded
        .merge(open)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
        .layer(middleware::from_fn(count))
}

async fn models(State(state): State<HttpState>) -> Result<Json<json::Models>, ApiError> {
    Ok(Json(state.core.get()?.models().await.into()))
}

async fn require_token(
    State(state): State<HttpState>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .map(|v| v.as_bytes());
    super::check_bearer(state.auth.as_ref(), given).map_err(ApiError::unauthenticated)?;
    Ok(next.run(request).await)
}

async fn count(request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".into());
    let start = Instant::now();
    let response = next.run(request).await;
    metrics::observe_http(route, response.status().as_u16(), start.elapsed());
    response
}

async fn method_not_allowed(request: Request) -> ApiError {
    ApiError::method_not_allowed(format!(
        "{} is not allowed on {}",
        request.method(),
        request.uri().path()
    ))
}

/// The answer to a path no route serves (gRPC calls to unknown services are answered by the
/// server assembly before this).
pub(super) fn not_found(request: &Request) -> Response {
    let response = ApiError::no_route(format!(
        "nothing at {} {}",
        request.method(),
        request.uri().path()
    ))
    .into_response();
    metrics::observe_http(
        "unmatched".into(),
        response.status().as_u16(),
        std::time::Duration::ZERO,
    );
    response
}

/// A path parameter, percent-decoded; a malformed one is refused in the usual JSON shape.
pub(super) struct Param(pub String);

impl<S: Send + Sync> FromRequestParts<S> for Param {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match Path::<String>::from_request_parts(parts, state).await {
            Ok(Path(p)) => Ok(Self(p)),
            Err(e) => Err(crate::tasks::Error::InvalidArgument(e.body_text()).into()),
        }
    }
}
