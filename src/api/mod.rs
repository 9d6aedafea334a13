//! The protocol layer: gRPC (`grpc`, the only place that names tonic or prost types besides
//! the server assembly) and the HTTP routes with the built-in page (`http`), side by side over
//! one `TaskService`. Each protocol only converts requests and answers and maps core errors in
//! one place; validation, deduplication and locking stay in `tasks`.
//!
//! `server` puts both on one port: gRPC over HTTP/2, gRPC-Web, and plain HTTP/1.1 or HTTP/2
//! requests, with or without TLS (`tls`).

mod grpc;
mod http;
mod server;
mod tls;

use std::sync::Arc;

use tokio::sync::OnceCell;

use crate::config::Secret;
use crate::tasks::{self, TaskService};
pub use grpc::pb;
pub use server::{run, serve, ServeError};

/// The task service, once it has started (weights loaded, unfinished tasks recovered).
/// Both protocols answer "unavailable" until then.
#[derive(Clone, Default)]
pub(crate) struct Core(Arc<OnceCell<TaskService>>);

impl Core {
    fn get(&self) -> Result<&TaskService, tasks::Error> {
        self.0.get().ok_or_else(|| {
            tasks::Error::Unavailable("the server is starting; retry shortly".into())
        })
    }

    fn set(&self, service: TaskService) {
        let _ = self.0.set(service);
    }

    fn started(&self) -> Option<&TaskService> {
        self.0.get()
    }
}

/// Checks an `authorization` value against the token in constant time, for both protocols.
/// Without a token, everyone is let in.
fn check_bearer(token: Option<&Secret>, given: Option<&[u8]>) -> Result<(), &'static str> {
    let Some(token) = token else {
        return Ok(());
    };
    match given.and_then(|v| v.strip_prefix(b"Bearer ")) {
        Some(t) if token.matches(t) => Ok(()),
        Some(_) => Err("invalid bearer token"),
        None => Err("this server needs `authorization: Bearer <token>`"),
    }
}
