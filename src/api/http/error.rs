//! The one mapping from core errors to HTTP answers: a status code and
//! `{"error": {"code": ..., "message": ...}}`. Internal causes are logged here and never sent.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;

use crate::tasks::Error;

/// Seconds a client should wait before retrying a refused call.
const RETRY_QUEUE_FULL: u32 = 5;
const RETRY_UNAVAILABLE: u32 = 2;

#[derive(Debug)]
pub(in crate::api) struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    retry_after: Option<u32>,
}

#[derive(Serialize)]
struct Body<'a> {
    error: Detail<'a>,
}

#[derive(Serialize)]
struct Detail<'a> {
    code: &'a str,
    message: &'a str,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            retry_after: None,
        }
    }

    fn retry_after(mut self, seconds: u32) -> Self {
        self.retry_after = Some(seconds);
        self
    }

    pub fn unauthenticated(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthenticated", message)
    }

    pub fn no_route(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    pub fn method_not_allowed(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            message,
        )
    }
}

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        use StatusCode as S;
        match e {
            Error::InvalidArgument(m) => Self::new(S::BAD_REQUEST, "invalid_argument", m),
            Error::NotFound(m) => Self::new(S::NOT_FOUND, "not_found", m),
            Error::AlreadyExists(m) => Self::new(S::CONFLICT, "already_exists", m),
            Error::FailedPrecondition(m) => Self::new(S::CONFLICT, "failed_precondition", m),
            Error::TooLarge(m) => Self::new(S::PAYLOAD_TOO_LARGE, "too_large", m),
            e @ Error::QueueFull(_) => Self::new(S::TOO_MANY_REQUESTS, "queue_full", e.to_string())
                .retry_after(RETRY_QUEUE_FULL),
            Error::Unavailable(m) => {
                Self::new(S::SERVICE_UNAVAILABLE, "unavailable", m).retry_after(RETRY_UNAVAILABLE)
            }
            Error::Backend(m) => {
                tracing::warn!(cause = m, "request failed: backend unavailable");
                Self::new(
                    S::SERVICE_UNAVAILABLE,
                    "unavailable",
                    "a storage or lock backend is unavailable; retry later",
                )
                .retry_after(RETRY_UNAVAILABLE)
            }
            // The client broke off its own request; it will rarely read this.
            Error::Aborted(m) => {
                Self::new(S::BAD_REQUEST, "aborted", format!("upload aborted: {m}"))
            }
            Error::Internal(m) | Error::Setup(m) => {
                tracing::error!(cause = m, "request failed: internal error");
                Self::new(S::INTERNAL_SERVER_ERROR, "internal", "internal error")
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = Body {
            error: Detail {
                code: self.code,
                message: &self.message,
            },
        };
        let mut response = (self.status, Json(body)).into_response();
        let headers = response.headers_mut();
        if let Some(seconds) = self.retry_after {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(e: Error) -> (StatusCode, &'static str, Option<u32>) {
        let a = ApiError::from(e);
        (a.status, a.code, a.retry_after)
    }

    #[test]
    fn every_core_error_has_its_status() {
        let m = || "m".to_string();
        let cases = [
            (Error::InvalidArgument(m()), 400, "invalid_argument", None),
            (Error::NotFound(m()), 404, "not_found", None),
            (Error::AlreadyExists(m()), 409, "already_exists", None),
            (
                Error::FailedPrecondition(m()),
                409,
                "failed_precondition",
                None,
            ),
            (Error::TooLarge(m()), 413, "too_large", None),
            (
                Error::QueueFull(3),
                429,
                "queue_full",
                Some(RETRY_QUEUE_FULL),
            ),
            (
                Error::Unavailable(m()),
                503,
                "unavailable",
                Some(RETRY_UNAVAILABLE),
            ),
            (
                Error::Backend(m()),
                503,
                "unavailable",
                Some(RETRY_UNAVAILABLE),
            ),
            (Error::Aborted(m()), 400, "aborted", None),
            (Error::Internal(m()), 500, "internal", None),
        ];
        for (e, status, code, retry) in cases {
            let what = format!("{e:?}");
            assert_eq!(
                answer(e),
                (StatusCode::from_u16(status).unwrap(), code, retry),
                "{what}"
            );
        }
    }

    #[test]
    fn internal_causes_stay_in_the_logs() {
        let r = ApiError::from(Error::Internal("/secret/path: EIO".into()));
        assert_eq!(r.message, "internal error");
        let r = ApiError::from(Error::Backend("mongodb://user:pw@host".into()));
        assert!(!r.message.contains("pw"), "{}", r.message);
    }

    #[test]
    fn answers_carry_the_json_shape_and_headers() {
        let r = ApiError::from(Error::QueueFull(2)).into_response();
        assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(r.headers()[header::RETRY_AFTER], "5");
        assert_eq!(r.headers()[header::CONTENT_TYPE], "application/json");
        let r = ApiError::unauthenticated("no").into_response();
        assert_eq!(r.headers()[header::WWW_AUTHENTICATE], "Bearer");
    }
}
