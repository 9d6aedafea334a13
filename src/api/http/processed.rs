//! `GET` and `HEAD /processed/{file_name}`: a stored result, streamed from the store
//! (GridFS included) with its length, type and sha256 as the entity tag.

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::Response;
use futures::StreamExt;

use super::error::ApiError;
use super::{HttpState, Param};
use crate::metrics;
use crate::tasks::types::ResultMeta;

pub(super) async fn processed(
    State(state): State<HttpState>,
    method: Method,
    Param(name): Param,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let core = state.core.get()?;
    // HEAD and a matching If-None-Match need only the description, not the bytes.
    if method == Method::HEAD || headers.contains_key(header::IF_NONE_MATCH) {
        let meta = core.result_meta(&name).await?;
        if etag_matches(&headers, &meta) {
            return Ok(answer(
                StatusCode::NOT_MODIFIED,
                &meta,
                Body::empty(),
                false,
            ));
        }
        if method == Method::HEAD {
            return Ok(answer(StatusCode::OK, &meta, Body::empty(), true));
        }
    }
    let (meta, chunks) = core.fetch(&name).await?;
    let body = Body::from_stream(chunks.map(|chunk| {
        chunk.inspect(|c| {
            ::metrics::counter!(metrics::SERVED_BYTES).increment(c.len() as u64);
        })
    }));
    Ok(answer(StatusCode::OK, &meta, body, true))
}

/// `DELETE /processed/{file_name}`: deletes the result and frees the name (as
/// `DeleteProcessed`).
pub(super) async fn delete(
    State(state): State<HttpState>,
    Param(name): Param,
) -> Result<axum::Json<serde_json::Value>, ApiError> {
    let meta = state.core.get()?.delete_result(&name).await?;
    Ok(axum::Json(serde_json::json!({
        "file_name": meta.file_name,
        "deleted": true,
        "size": meta.size,
    })))
}

fn etag(meta: &ResultMeta) -> String {
    format!("\"{}\"", meta.sha256)
}

/// RFC 9110 weak comparison: any listed tag (weak or not) equal to ours, or `*`.
fn etag_matches(headers: &HeaderMap, meta: &ResultMeta) -> bool {
    let ours = etag(meta);
    headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .any(|tag| tag == "*" || tag.strip_prefix("W/").unwrap_or(tag) == ours)
}

fn answer(status: StatusCode, meta: &ResultMeta, body: Body, with_entity: bool) -> Response {
    let mut response = Response::new(body);
    *response.status_mut() = status;
    let headers = response.headers_mut();
    if let Ok(tag) = HeaderValue::try_from(etag(meta)) {
        headers.insert(header::ETAG, tag);
    }
    // A result can be replaced (overwrite), so caches must ask again; the ETag makes that cheap.
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    if with_entity {
        if let Ok(ct) = HeaderValue::try_from(meta.content_type.as_str()) {
            headers.insert(header::CONTENT_TYPE, ct);
        }
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(meta.size));
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(sha256: &str) -> ResultMeta {
        ResultMeta {
            file_name: "a.png".into(),
            content_type: "image/png".into(),
            size: 1,
            width: 1,
            height: 1,
            sha256: sha256.into(),
            fingerprint: String::new(),
            model: String::new(),
            task_id: String::new(),
            created_at_ms: 0,
            run: 0,
        }
    }

    fn if_none_match(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::IF_NONE_MATCH, HeaderValue::from_str(v).unwrap());
        h
    }

    #[test]
    fn if_none_match_compares_weakly_and_in_lists() {
        let m = meta("abc");
        assert!(etag_matches(&if_none_match("\"abc\""), &m));
        assert!(etag_matches(&if_none_match("W/\"abc\""), &m));
        assert!(etag_matches(&if_none_match("\"x\", \"abc\""), &m));
        assert!(etag_matches(&if_none_match("*"), &m));
        assert!(!etag_matches(&if_none_match("\"abcd\""), &m));
        assert!(!etag_matches(&if_none_match("abc"), &m));
        assert!(!etag_matches(&HeaderMap::new(), &m));
    }
}
