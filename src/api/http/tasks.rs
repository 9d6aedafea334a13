//! `GET /tasks/{id}` and `GET /tasks/{id}/events`: a task's state as JSON, once or as
//! Server-Sent Events following the same stream as `WatchTask` (across instances too).

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, HeaderValue};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::StreamExt;

use super::error::ApiError;
use super::json;
use super::{HttpState, Param};

/// Proxies and browsers drop connections that stay silent; a comment line keeps it open.
const KEEP_ALIVE: Duration = Duration::from_secs(15);

pub(super) async fn task(
    State(state): State<HttpState>,
    Param(id): Param,
) -> Result<Json<json::Task>, ApiError> {
    let task = state.core.get()?.get(&id).await?;
    Ok(Json(task.into()))
}

/// `DELETE /tasks/{id}`: cancels the task (as `CancelTask`); answers its state after.
pub(super) async fn cancel(
    State(state): State<HttpState>,
    Param(id): Param,
) -> Result<Json<json::Task>, ApiError> {
    let task = state.core.get()?.cancel(&id).await?;
    Ok(Json(task.into()))
}

/// One `task` event per change, the current state first; the stream ends after a terminal
/// state, or when the server shuts down.
pub(super) async fn events(
    State(state): State<HttpState>,
    Param(id): Param,
) -> Result<Response, ApiError> {
    let updates = state.core.get()?.watch(&id).await?;
    let events = updates.map(|task| {
        let event = Event::default()
            .event("task")
            .json_data(json::Task::from(task))
            .unwrap_or_else(|_| Event::default().comment("unserialisable task"));
        Ok::<_, Infallible>(event)
    });
    let mut response = Sse::new(events)
        .keep_alive(KeepAlive::new().interval(KEEP_ALIVE))
        .into_response();
    // Tells nginx-style proxies to pass events on at once instead of buffering them.
    response
        .headers_mut()
        .insert("x-accel-buffering", HeaderValue::from_static("no"));
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(response)
}
