//! `POST /upscale`: the Flask service's upload, a multipart form with the picture in the
//! field `image`, plus optional `model`, `outscale`, `tile`, `format` and `overwrite` fields
//! that must come before it. The picture is streamed into the core's upload as it arrives,
//! never held whole; the core validates, deduplicates and locks exactly as for gRPC.

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::StreamExt;
use tokio::sync::mpsc;

use super::error::ApiError;
use super::json::{self, UploadAnswer};
use super::HttpState;
use crate::metrics;
use crate::tasks::types::ResultFormat;
use crate::tasks::{Error, OutcomeKind, UploadMeta};

/// The fields besides `image`; each holds a short value.
const OPTIONS: [&str; 5] = ["model", "outscale", "tile", "format", "overwrite"];
const MAX_OPTION_BYTES: usize = 1024;
/// Room for the form's own framing and option fields beyond the image's byte limit, so the
/// core's own size check is the one that answers for the image.
const FORM_OVERHEAD: u64 = 64 * 1024;

pub(super) async fn upscale(
    State(state): State<HttpState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let core = state.core.get()?;
    let boundary = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|ct| multer::parse_boundary(ct).ok())
        .ok_or_else(|| {
            Error::InvalidArgument(
                "send a multipart/form-data body with the picture in the field `image`".into(),
            )
        })?;
    let limit = core
        .settings()
        .max_upload_bytes
        .saturating_add(FORM_OVERHEAD);
    let constraints =
        multer::Constraints::new().size_limit(multer::SizeLimit::new().whole_stream(limit));
    let mut form =
        multer::Multipart::with_constraints(body.into_data_stream(), boundary, constraints);

    let mut options = FormOptions::default();
    let image = match read_options(&mut form, &mut options).await {
        Ok(image) => image,
        Err(e) => {
            // Answer after the whole body, for the reason given at `feed`.
            let _ = drain_form(&mut form).await;
            return Err(e.into());
        }
    };
    let meta = image
        .file_name()
        .map(str::to_string)
        .ok_or_else(|| {
            Error::InvalidArgument(
                "the field `image` must be a file upload with a file name".into(),
            )
        })
        .and_then(|file_name| options.into_meta(file_name));

    // `feed` reads the body and hands the image to the core through a small channel, so it
    // is streamed, never held whole. Should the core answer before the end (a name still in
    // progress, a refused header), `feed` reads the rest and drops it: an HTTP/1.1 client
    // still sending would otherwise see the connection reset instead of the answer.
    let (tx, mut rx) = mpsc::channel::<Piece>(2);
    let chunks = async_stream::stream! {
        while let Some(piece) = rx.recv().await {
            match piece {
                Piece::Chunk(bytes) => yield Ok(bytes),
                Piece::Failed(e) => {
                    yield Err(e);
                    return;
                }
                Piece::End => return,
            }
        }
        // `feed` went away without reaching the end of the body.
        yield Err(Error::Aborted("the request ended before its body did".into()));
    };
    // A refused option is answered like any refusal of the core: after the body is drained.
    let accept = async { core.upload(meta?, chunks.boxed()).await };
    let (outcome, ()) = tokio::join!(accept, feed(image, form, tx));
    let outcome = outcome?;
    let (status, location) = match outcome.kind {
        OutcomeKind::Queued | OutcomeKind::InProgress => {
            (StatusCode::ACCEPTED, json::task_url(&outcome.task_id))
        }
        OutcomeKind::AlreadyProcessed => (StatusCode::OK, json::result_url(&outcome.file_name)),
    };
    let mut response = (status, Json(UploadAnswer::from(outcome))).into_response();
    if let Ok(location) = HeaderValue::try_from(location) {
        response.headers_mut().insert(header::LOCATION, location);
    }
    Ok(response)
}

/// Reads the option fields up to the `image` field, which it returns. Unknown fields are
/// ignored, as the Flask service did.
async fn read_options(
    form: &mut multer::Multipart<'static>,
    options: &mut FormOptions,
) -> Result<multer::Field<'static>, Error> {
    loop {
        let field = form
            .next_field()
            .await
            .map_err(form_error)?
            .ok_or_else(|| {
                Error::InvalidArgument(
                    "the form has no field `image`: send the picture as a file in it".into(),
                )
            })?;
        match field.name() {
            Some("image") => return Ok(field),
            Some(name) if OPTIONS.contains(&name) => {
                let name = name.to_string();
                let value = option_value(field, &name).await?;
                options.set(&name, value)?;
            }
            _ => drain(field).await?,
        }
    }
}

/// Reads the rest of the form, keeping nothing.
async fn drain_form(form: &mut multer::Multipart<'static>) -> Result<(), Error> {
    while let Some(field) = form.next_field().await.map_err(form_error)? {
        drain(field).await?;
    }
    Ok(())
}

/// What `feed` passes on: the image's bytes, then how the body ended.
enum Piece {
    Chunk(Vec<u8>),
    Failed(Error),
    End,
}

/// Sends the image's chunks, checks that no option or second image follows it, then says how
/// the body ended. Once the core stops listening, the rest of the body is read and dropped
/// (the form's size limit still applies).
async fn feed(
    mut image: multer::Field<'static>,
    mut form: multer::Multipart<'static>,
    tx: mpsc::Sender<Piece>,
) {
    let read = async {
        while let Some(bytes) = image.chunk().await.map_err(form_error)? {
            ::metrics::counter!(metrics::UPLOADED_BYTES).increment(bytes.len() as u64);
            // A closed channel means the core has answered: go on reading, to drain.
            let _ = tx.send(Piece::Chunk(Vec::from(bytes))).await;
        }
        drop(image);
        // The options were read before the image; one after it would be silently lost.
        let mut late = None;
        while let Some(field) = form.next_field().await.map_err(form_error)? {
            let name = field.name().unwrap_or_default().to_string();
            if late.is_none() && (name == "image" || OPTIONS.contains(&name.as_str())) {
                late = Some(name);
            }
            drain(field).await?;
        }
        match late {
            Some(name) => Err(Error::InvalidArgument(format!(
                "the field `{name}` comes after `image`: send one image, as the last field, after the options"
            ))),
            None => Ok(()),
        }
    };
    let last = match read.await {
        Ok(()) => Piece::End,
        Err(e) => Piece::Failed(e),
    };
    let _ = tx.send(last).await;
}

/// The option fields as sent, each at most once.
#[derive(Default)]
struct FormOptions {
    model: Option<String>,
    outscale: Option<String>,
    tile: Option<String>,
    format: Option<String>,
    overwrite: Option<String>,
}

impl FormOptions {
    fn set(&mut self, name: &str, value: String) -> Result<(), Error> {
        let slot = match name {
            "model" => &mut self.model,
            "outscale" => &mut self.outscale,
            "tile" => &mut self.tile,
            "format" => &mut self.format,
            _ => &mut self.overwrite,
        };
        if slot.replace(value).is_some() {
            return Err(Error::InvalidArgument(format!(
                "the field `{name}` is given twice"
            )));
        }
        Ok(())
    }

    /// The upload metadata, as gRPC clients would send it. Empty fields mean "not set", as
    /// an HTML form sends an empty input. Ranges are the core's to check.
    fn into_meta(self, file_name: String) -> Result<UploadMeta, Error> {
        let given = |v: Option<String>| v.map(|s| s.trim().to_string()).filter(|s| !s.is_empty());
        let outscale = given(self.outscale)
            .map(|s| {
                s.parse::<f64>()
                    .map_err(|_| Error::InvalidArgument(format!("outscale `{s}` is not a number")))
            })
            .transpose()?;
        let tile = given(self.tile)
            .map(|s| {
                s.parse::<u32>().map_err(|_| {
                    Error::InvalidArgument(format!("tile `{s}` is not a whole number"))
                })
            })
            .transpose()?;
        let format = match given(self.format)
            .map(|s| s.to_ascii_lowercase())
            .as_deref()
        {
            None | Some("png") => ResultFormat::Png,
            Some("jpeg" | "jpg") => ResultFormat::Jpeg,
            Some("webp") => ResultFormat::Webp,
            Some(other) => {
                return Err(Error::InvalidArgument(format!(
                    "format `{other}` must be png, jpeg or webp"
                )))
            }
        };
        let overwrite = match given(self.overwrite)
            .map(|s| s.to_ascii_lowercase())
            .as_deref()
        {
            None | Some("false" | "0" | "no" | "off") => false,
            Some("true" | "1" | "yes" | "on") => true,
            Some(other) => {
                return Err(Error::InvalidArgument(format!(
                    "overwrite `{other}` must be true or false"
                )))
            }
        };
        Ok(UploadMeta {
            file_name,
            model: given(self.model).unwrap_or_default(),
            outscale,
            tile,
            format,
            overwrite,
        })
    }
}

/// A short text field, refused if it is long.
async fn option_value(mut field: multer::Field<'static>, name: &str) -> Result<String, Error> {
    let mut value = Vec::new();
    while let Some(chunk) = field.chunk().await.map_err(form_error)? {
        value.extend_from_slice(&chunk);
        if value.len() > MAX_OPTION_BYTES {
            return Err(Error::InvalidArgument(format!(
                "the field `{name}` is longer than {MAX_OPTION_BYTES} bytes"
            )));
        }
    }
    String::from_utf8(value)
        .map_err(|_| Error::InvalidArgument(format!("the field `{name}` is not UTF-8 text")))
}

/// Reads a field to its end, keeping nothing.
async fn drain(mut field: multer::Field<'static>) -> Result<(), Error> {
    while field.chunk().await.map_err(form_error)?.is_some() {}
    Ok(())
}

fn form_error(e: multer::Error) -> Error {
    use multer::Error as E;
    match e {
        // The form's limit is MAX_UPLOAD_BYTES plus the overhead: name the setting's value,
        // as the core does when it sees the image itself go over.
        E::StreamSizeExceeded { limit } | E::FieldSizeExceeded { limit, .. } => {
            Error::TooLarge(format!(
                "upload is over the limit of {} bytes",
                limit.saturating_sub(FORM_OVERHEAD)
            ))
        }
        // The connection broke, or the body ended before the form did.
        E::StreamReadFailed(cause) => Error::Aborted(cause.to_string()),
        E::IncompleteStream | E::IncompleteFieldData { .. } => {
            Error::Aborted("the body ended before the form did".into())
        }
        other => Error::InvalidArgument(format!("malformed multipart form: {other}")),
    }
}
