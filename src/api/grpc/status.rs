//! The one mapping from core errors to gRPC statuses. Internal causes are logged here and
//! never sent to the client.

use tonic::Status;

use crate::tasks::Error;

pub fn from_core(e: Error) -> Status {
    match e {
        Error::InvalidArgument(m) => Status::invalid_argument(m),
        Error::NotFound(m) => Status::not_found(m),
        Error::AlreadyExists(m) => Status::already_exists(m),
        Error::FailedPrecondition(m) => Status::failed_precondition(m),
        Error::TooLarge(m) => Status::resource_exhausted(m),
        e @ Error::QueueFull(_) => Status::resource_exhausted(e.to_string()),
        Error::Unavailable(m) => Status::unavailable(m),
        Error::Backend(m) => {
            tracing::warn!(cause = m, "request failed: backend unavailable");
            Status::unavailable("a storage or lock backend is unavailable; retry later")
        }
        Error::Aborted(m) => Status::cancelled(format!("upload aborted: {m}")),
        Error::Internal(m) | Error::Setup(m) => {
            tracing::error!(cause = m, "request failed: internal error");
            Status::internal("internal error")
        }
    }
}
