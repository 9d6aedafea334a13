//! The HTTP routes on the gRPC port, as the Flask service's clients and browsers use them:
//! uploads (queued, in progress, already processed, conflicts, every refusal), task JSON and
//! events, results with ETag/304/HEAD, the model list, the token, gRPC-Web over HTTP/1.1,
//! TLS for HTTP/1.1-only clients, and uploads that break off half-way.

mod common;

use std::io::Write;
use std::time::Duration;

use common::http::{self, Http};
use common::server::{self as srv, Backend, Place, Server};
use reqwest::StatusCode;
use serde_json::Value;
use sha2::Digest;
use upscaler::api::pb;

fn sha256_hex(bytes: &[u8]) -> String {
    upscaler::tasks::types::hex(&sha2::Sha256::digest(bytes))
}

/// A small PNG padded to more than `size` bytes by a private ancillary chunk after the image
/// data, which decoders skip: a large upload that is quick to upscale.
fn padded_png(w: u32, h: u32, seed: u8, size: usize) -> Vec<u8> {
    let png = srv::png(w, h, seed);
    let iend = png.len() - 12;
    let mut typed = b"upSc".to_vec();
    typed.extend((0..size).map(|i| (i.wrapping_mul(7919) % 251) as u8 ^ seed));
    let mut chunk = (size as u32).to_be_bytes().to_vec();
    chunk.extend(&typed);
    chunk.extend(crc32fast::hash(&typed).to_be_bytes());
    [&png[..iend], &chunk, &png[iend..]].concat()
}

fn dimensions(png: &[u8]) -> (u32, u32) {
    let img = image::load_from_memory(png).expect("the result decodes");
    (img.width(), img.height())
}

fn location(r: &reqwest::Response) -> String {
    r.headers()["location"].to_str().unwrap().to_string()
}

/// Uploads and answers must leave nothing once everything is done.
async fn assert_clean(place: &Place) {
    for _ in 0..100 {
        if place.temp_files().is_empty() && srv::unfinished_tasks(place).await.is_empty() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!(
        "left behind: temp files {:?}, tasks {:?}",
        place.temp_files(),
        srv::unfinished_tasks(place).await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_api_on_embedded_backends() {
    old_api(Place::new(Backend::Embedded)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_api_on_real_backends() {
    if let Some(b) = srv::real_backend("old_api_on_real_backends") {
        old_api(Place::new(b)).await;
    }
}

/// Post, poll, fetch (with ETag, 304 and HEAD), post again and be sent to the result; the
/// same name with other bytes is a conflict until overwrite is asked for.
async fn old_api(place: Place) {
    let server = Server::start(&place).await;
    let web = Http::new(server.addr);
    let input = srv::png(12, 8, 3);

    let r = web.upload("flask.png", input.clone(), &[]).await;
    let queued_at = location(&r);
    let (status, body) = http::json(Ok(r)).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    assert_eq!(body["outcome"], "queued");
    assert_eq!(body["file_name"], "flask.png");
    let id = body["task_id"].as_str().unwrap().to_string();
    assert_eq!(queued_at, format!("/tasks/{id}"));
    assert_eq!(body["status_url"], queued_at);
    assert_eq!(body["events_url"], format!("/tasks/{id}/events"));

    let task = web.wait_done(&id).await;
    assert_eq!(task["state"], "SUCCESS", "{task}");
    assert_eq!(task["status"], "SUCCESS");
    assert_eq!(task["progress"]["done"], task["progress"]["total"]);
    assert_eq!(task["input"], serde_json::json!({"width": 12, "height": 8}));
    assert_eq!(
        task["output"],
        serde_json::json!({"width": 48, "height": 32})
    );
    assert_eq!(task["result_url"], "/processed/flask.png");
    assert_eq!(task["model"], "realesr-animevideov3");
    assert!(task["error"].is_null());
    assert!(task["finished_at"].as_str().unwrap().ends_with('Z'));

    let r = web.get("/processed/flask.png").send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let headers = r.headers().clone();
    let result = r.bytes().await.unwrap().to_vec();
    assert_eq!(dimensions(&result), (48, 32));
    assert_eq!(headers["content-type"], "image/png");
    assert_eq!(headers["content-length"], result.len().to_string().as_str());
    let etag = format!("\"{}\"", sha256_hex(&result));
    assert_eq!(headers["etag"], etag.as_str());

    let r = web
        .get("/processed/flask.png")
        .header("if-none-match", &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_MODIFIED);
    assert_eq!(r.headers()["etag"], etag.as_str());
    assert!(r.bytes().await.unwrap().is_empty());
    let r = web
        .get("/processed/flask.png")
        .header("if-none-match", "\"another\"")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.bytes().await.unwrap(), result);

    let r = web
        .client
        .head(web.url("/processed/flask.png"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(
        r.headers()["content-length"],
        result.len().to_string().as_str()
    );
    assert_eq!(r.headers()["etag"], etag.as_str());
    assert!(r.bytes().await.unwrap().is_empty());

    // The same file again: routed to the stored result.
    let r = web.upload("flask.png", input.clone(), &[]).await;
    assert_eq!(location(&r), "/processed/flask.png");
    let (status, body) = http::json(Ok(r)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["outcome"], "already_processed");
    assert_eq!(body["task_id"], id.as_str());
    assert_eq!(body["result_url"], "/processed/flask.png");

    // Other bytes under the same name: a conflict, then a replacement when asked.
    let other = srv::png(12, 8, 99);
    let (status, body) = http::json(Ok(web.upload("flask.png", other.clone(), &[]).await)).await;
    let (code, message) = http::error(status, &body, StatusCode::CONFLICT);
    assert_eq!(code, "already_exists");
    assert!(message.contains("overwrite"), "{message}");
    let r = web
        .upload("flask.png", other, &[("overwrite", "true")])
        .await;
    let (status, body) = http::json(Ok(r)).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let task = web.wait_done(body["task_id"].as_str().unwrap()).await;
    assert_eq!(task["state"], "SUCCESS", "{task}");
    let replaced = web
        .get("/processed/flask.png")
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_ne!(replaced, result);
    // The old tag no longer matches.
    let r = web
        .get("/processed/flask.png")
        .header("if-none-match", &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);

    assert_clean(&place).await;
    server.stop().await;
}

/// Options in form fields reach the core: model, outscale, JPEG output.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn form_options_shape_the_result() {
    let place = Place::new(Backend::Embedded);
    let server = Server::start(&place).await;
    let web = Http::new(server.addr);
    let options = [
        ("model", "realesr-animevideov3"),
        ("outscale", "2"),
        ("tile", "16"),
        ("format", "jpeg"),
    ];
    let (status, body) = http::json(Ok(web.upload("opts.jpg", jpeg(10, 6), &options).await)).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let task = web.wait_done(body["task_id"].as_str().unwrap()).await;
    assert_eq!(task["state"], "SUCCESS", "{task}");
    assert_eq!(
        task["output"],
        serde_json::json!({"width": 20, "height": 12})
    );
    let r = web.get("/processed/opts.jpg").send().await.unwrap();
    assert_eq!(r.headers()["content-type"], "image/jpeg");
    let bytes = r.bytes().await.unwrap();
    assert_eq!(
        image::guess_format(&bytes).unwrap(),
        image::ImageFormat::Jpeg
    );
    server.stop().await;
}

fn jpeg(w: u32, h: u32) -> Vec<u8> {
    let img = image::load_from_memory(&srv::png(w, h, 5)).unwrap();
    upscaler::imaging::encode(&img, upscaler::imaging::OutputFormat::Jpeg(90)).unwrap()
}

/// Past axum's 2 MB default body limit: the file is streamed, and MAX_UPLOAD_BYTES is the
/// only limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_past_two_megabytes_are_streamed() {
    let place = Place::new(Backend::Embedded);
    let server = Server::start(&place).await;
    let web = Http::new(server.addr);
    let big = padded_png(10, 8, 7, 3 << 20);
    assert!(big.len() > 3 << 20);
    let (status, body) = http::json(Ok(web.upload("big.png", big.clone(), &[]).await)).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let task = web.wait_done(body["task_id"].as_str().unwrap()).await;
    assert_eq!(task["state"], "SUCCESS", "{task}");
    assert_eq!(
        task["output"],
        serde_json::json!({"width": 40, "height": 32})
    );
    assert_clean(&place).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_over_the_limit_is_413_and_leaves_nothing() {
    let place = Place::new(Backend::Embedded);
    let mut settings = place.settings();
    settings.max_upload_bytes = 1 << 20;
    let server = Server::start_with(settings).await;
    let web = Http::new(server.addr);
    let big = padded_png(10, 8, 7, 3 << 19);
    let (status, body) = http::json(Ok(web.upload("huge.png", big, &[]).await)).await;
    let (code, message) = http::error(status, &body, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(code, "too_large");
    assert!(message.contains("1048576"), "{message}");
    assert_clean(&place).await;
    // The name is free.
    let (status, body) = http::json(Ok(web.upload("huge.png", srv::png(4, 4, 1), &[]).await)).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    assert_eq!(body["outcome"], "queued");
    server.stop().await;
}

/// Every refused form gets 400 with the JSON error and leaves no file, task or lock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_forms_are_refused_and_leave_nothing() {
    use reqwest::multipart::{Form, Part};
    let place = Place::new(Backend::Embedded);
    let server = Server::start(&place).await;
    let web = Http::new(server.addr);
    let png = srv::png(8, 8, 1);
    let large = padded_png(8, 8, 1, 8 << 20);
    let image = |name: &str| Part::bytes(png.clone()).file_name(name.to_string());
    let cases: Vec<(&str, Form, &str)> = vec![
        (
            "no image field",
            Form::new().text("model", "realesr-animevideov3"),
            "field `image`",
        ),
        (
            "image that is not a file",
            Form::new().text("image", "cat.png"),
            "file upload",
        ),
        (
            "wrong extension",
            Form::new().part("image", image("cat.gif")),
            ".png",
        ),
        (
            "extension that disagrees with the bytes",
            Form::new().part("image", image("cat.jpg")),
            "JPEG",
        ),
        (
            "bytes that are no image",
            Form::new().part("image", Part::bytes(b"hello".to_vec()).file_name("cat.png")),
            "PNG or JPEG",
        ),
        (
            "empty file",
            Form::new().part("image", Part::bytes(Vec::new()).file_name("cat.png")),
            "no image bytes",
        ),
        (
            "a path as the file name",
            Form::new().part("image", image("../cat.png")),
            "..",
        ),
        (
            "an option after the image",
            Form::new()
                .part("image", image("cat.png"))
                .text("model", "realesr-animevideov3"),
            "after `image`",
        ),
        (
            "two images",
            Form::new()
                .part("image", image("cat.png"))
                .part("image", image("dog.png")),
            "after `image`",
        ),
        (
            "outscale that is not a number",
            Form::new()
                .text("outscale", "big")
                .part("image", image("cat.png")),
            "outscale",
        ),
        (
            "outscale out of range",
            Form::new()
                .text("outscale", "0")
                .part("image", image("cat.png")),
            "outscale",
        ),
        (
            "tile that the core refuses",
            Form::new()
                .text("tile", "7")
                .part("image", image("cat.png")),
            "tile",
        ),
        (
            "unknown model",
            Form::new()
                .text("model", "nope")
                .part("image", image("cat.png")),
            "nope",
        ),
        (
            "unknown format",
            Form::new()
                .text("format", "gif")
                .part("image", image("cat.png")),
            "format",
        ),
        // Refused before the image is read: the rest of the large body is drained first, so
        // the client reads the answer instead of a reset connection.
        (
            "a bad option before a large image",
            Form::new()
                .text("outscale", "big")
                .part("image", Part::bytes(large.clone()).file_name("cat.png")),
            "outscale",
        ),
        (
            "a large image under a wrong name",
            Form::new().part("image", Part::bytes(large.clone()).file_name("cat.gif")),
            ".png",
        ),
        (
            "an option given twice",
            Form::new()
                .text("model", "realesr-animevideov3")
                .text("model", "realesrgan-x4plus")
                .part("image", image("cat.png")),
            "twice",
        ),
    ];
    for (what, form, needle) in cases {
        let (status, body) = http::json(Ok(web.post_form(form).await)).await;
        let (code, message) = http::error(status, &body, StatusCode::BAD_REQUEST);
        assert_eq!(code, "invalid_argument", "{what}: {body}");
        assert!(message.contains(needle), "{what}: {message}");
    }
    // Not a form at all.
    let r = web
        .client
        .post(web.url("/upscale"))
        .json(&serde_json::json!({"image": "cat.png"}))
        .send()
        .await;
    let (status, body) = http::json(r).await;
    let (_, message) = http::error(status, &body, StatusCode::BAD_REQUEST);
    assert!(message.contains("multipart/form-data"), "{message}");

    assert_clean(&place).await;
    let r = web.get("/processed/cat.png").send().await;
    let (status, _) = http::json(r).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    // No lock was left: the name is free.
    let (status, body) = http::json(Ok(web.upload("cat.png", png.clone(), &[]).await)).await;
    assert_eq!(
        (status, &body["outcome"]),
        (StatusCode::ACCEPTED, &Value::from("queued"))
    );
    server.stop().await;
}

/// With one worker busy and room for one waiting task: a second upload of a waiting name is
/// told to wait for it (even while it is still sending a large body), and a third task
/// finds the queue full.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_server_answers_in_progress_and_queue_full() {
    let place = Place::new(Backend::Embedded);
    let mut settings = place.settings();
    settings.workers = 1;
    settings.queue_capacity = 1;
    let server = Server::start_with(settings).await;
    let web = Http::new(server.addr);

    let blocker = srv::png(96, 96, 2);
    let r = web
        .upload("blocker.png", blocker, &[("model", "realesrgan-x4plus")])
        .await;
    let (status, body) = http::json(Ok(r)).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let blocker_id = body["task_id"].as_str().unwrap().to_string();
    for _ in 0..600 {
        let (_, t) = http::json(web.get(&format!("/tasks/{blocker_id}")).send().await).await;
        if t["state"] != "PENDING" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let (status, first) =
        http::json(Ok(web.upload("wait.png", srv::png(8, 8, 1), &[]).await)).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{first}");
    assert_eq!(first["outcome"], "queued");
    // Answered before the bytes are read; the rest of a large body is read and dropped, so
    // the client gets the answer rather than a reset connection.
    let r = web
        .upload("wait.png", padded_png(8, 8, 2, 8 << 20), &[])
        .await;
    assert_eq!(
        location(&r),
        format!("/tasks/{}", first["task_id"].as_str().unwrap())
    );
    let (status, again) = http::json(Ok(r)).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{again}");
    assert_eq!(again["outcome"], "in_progress");
    assert_eq!(again["task_id"], first["task_id"]);

    let r = web.upload("third.png", srv::png(8, 8, 3), &[]).await;
    assert_eq!(r.headers()["retry-after"], "5");
    let (status, body) = http::json(Ok(r)).await;
    let (code, _) = http::error(status, &body, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(code, "queue_full");

    for id in [&blocker_id, first["task_id"].as_str().unwrap()] {
        let t = web.wait_done(id).await;
        assert_eq!(t["state"], "SUCCESS", "{t}");
    }
    assert_clean(&place).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn things_that_do_not_exist_are_404_in_json() {
    let place = Place::new(Backend::Embedded);
    let server = Server::start(&place).await;
    let web = Http::new(server.addr);
    for path in [
        "/tasks/no-such-task",
        "/tasks/no-such-task/events",
        "/processed/none.png",
        "/no/such/route",
    ] {
        let (status, body) = http::json(web.get(path).send().await).await;
        let (code, _) = http::error(status, &body, StatusCode::NOT_FOUND);
        assert_eq!(code, "not_found", "{path}");
    }
    let r = web
        .client
        .head(web.url("/processed/none.png"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    let (status, body) = http::json(web.client.delete(web.url("/models")).send().await).await;
    let (code, _) = http::error(status, &body, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(code, "method_not_allowed");
    server.stop().await;
}

/// Names are checked as at upload: a path is refused, never looked up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traversal_names_are_refused() {
    let place = Place::new(Backend::Embedded);
    let server = Server::start(&place).await;
    let web = Http::new(server.addr);
    for path in [
        "/processed/..%2F..%2FCargo.toml",
        "/processed/%2e%2e%2f%2e%2e%2fetc%2fpasswd",
        "/processed/x%2F..%2F..%2Fweights%2FREADME.md",
        "/processed/README.md",
    ] {
        let (status, body) = http::json(web.get(path).send().await).await;
        let (code, _) = http::error(status, &body, StatusCode::BAD_REQUEST);
        assert_eq!(code, "invalid_argument", "{path}");
    }
    // Sent as written: URL libraries resolve dot segments (%2e too) before sending.
    for path in [
        "/processed/%2e%2e",
        "/processed/../../Cargo.toml",
        "/processed/../../../../etc/passwd",
        "/processed/%2e%2e/%2e%2e/Cargo.toml",
    ] {
        let addr = server.addr;
        let path = path.to_string();
        let (status, text) = tokio::task::spawn_blocking(move || http::raw_get(addr, &path))
            .await
            .unwrap();
        assert!(matches!(status, 400 | 404), "{text}");
        assert!(
            !text.contains("[package]") && !text.contains("root:"),
            "{text}"
        );
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_guards_the_routes_but_not_the_page() {
    let place = Place::new(Backend::Embedded);
    let mut settings = place.settings();
    settings.auth_token = Some(upscaler::config::Secret::new("s3cret"));
    let server = Server::start_with(settings).await;
    let web = Http::new(server.addr);

    for (path, kind) in [
        ("/", "text/html"),
        ("/app.js", "text/javascript"),
        ("/style.css", "text/css"),
    ] {
        let r = web.get(path).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::OK, "{path}");
        let ct = r.headers()["content-type"].to_str().unwrap().to_string();
        assert!(ct.starts_with(kind), "{path}: {ct}");
    }
    let page = web.get("/").send().await.unwrap().text().await.unwrap();
    assert!(page.contains("/app.js") && page.contains("/style.css"));

    for path in ["/models", "/tasks/x", "/tasks/x/events", "/processed/a.png"] {
        let r = web.get(path).send().await.unwrap();
        assert_eq!(r.headers()["www-authenticate"], "Bearer", "{path}");
        let (status, body) = http::json(Ok(r)).await;
        let (code, _) = http::error(status, &body, StatusCode::UNAUTHORIZED);
        assert_eq!(code, "unauthenticated");
        let r = web.get(path).bearer_auth("wrong").send().await;
        let (status, body) = http::json(r).await;
        let (_, message) = http::error(status, &body, StatusCode::UNAUTHORIZED);
        assert!(message.contains("invalid"), "{message}");
    }
    let (status, body) = http::json(Ok(web.upload("t.png", srv::png(4, 4, 1), &[]).await)).await;
    http::error(status, &body, StatusCode::UNAUTHORIZED);
    assert_clean(&place).await;

    let (status, body) = http::json(web.get("/models").bearer_auth("s3cret").send().await).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let form = Http::form("t.png", srv::png(4, 4, 1), &[]);
    let r = web
        .client
        .post(web.url("/upscale"))
        .bearer_auth("s3cret")
        .multipart(form)
        .send()
        .await;
    let (status, body) = http::json(r).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    server.stop().await;
}

/// `GET /models` and `ListModels` list the same installed models.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_over_http_and_grpc() {
    let place = Place::new(Backend::Embedded);
    let server = Server::start(&place).await;
    let web = Http::new(server.addr);
    let (status, body) = http::json(web.get("/models").send().await).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["default"], "realesr-animevideov3");
    let models = body["models"].as_array().unwrap();
    let names: Vec<&str> = models.iter().map(|m| m["name"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        [
            "realesrgan-x4plus",
            "realesrgan-x4plus-anime",
            "realesr-animevideov3",
            "realesr-animevideov3-x2",
            "realesr-animevideov3-x3"
        ]
    );
    let scales: Vec<u64> = models
        .iter()
        .map(|m| m["scale"].as_u64().unwrap())
        .collect();
    assert_eq!(scales, [4, 4, 4, 2, 3]);
    for m in models {
        assert_eq!(m["shipped"], true, "{m}");
        assert_eq!(m["fast_path"], true, "{m}");
        assert_eq!(
            (&m["in_channels"], &m["out_channels"]),
            (&3.into(), &3.into())
        );
    }
    let x4plus = &models[0];
    assert_eq!(x4plus["architecture"], "RRDBNet");
    assert_eq!(x4plus["size"], "nf 64 nb 23 gc 32");
    assert_eq!(x4plus["parameters"], 16_697_987);
    assert_eq!(x4plus["source"], "realesrgan-x4plus.safetensors");
    assert_eq!(models[2]["architecture"], "SRVGGNetCompact");
    assert_eq!(models[2]["parameters"], 621_424);

    // The routes answer plain HTTP/2 (h2c) as well.
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let r = h2.get(web.url("/models")).send().await.unwrap();
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
    let (status, over_h2) = http::json(Ok(r)).await;
    assert_eq!((status, &over_h2), (StatusCode::OK, &body));

    let listed = server
        .client
        .clone()
        .list_models(pb::ListModelsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.default_model, "realesr-animevideov3");
    let rpc_names: Vec<&str> = listed.models.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(rpc_names, names);
    for (rpc, web) in listed.models.iter().zip(models) {
        assert_eq!(rpc.architecture, web["architecture"].as_str().unwrap());
        assert_eq!(u64::from(rpc.scale), web["scale"].as_u64().unwrap());
        assert_eq!(rpc.size, web["size"].as_str().unwrap());
        assert_eq!(rpc.parameters, web["parameters"].as_u64().unwrap());
        assert_eq!(rpc.source, web["source"].as_str().unwrap());
        assert_eq!(rpc.fast_path, web["fast_path"].as_bool().unwrap());
    }
    server.stop().await;
}

/// The event stream: the state now, then each change, ending after the last.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn task_events_follow_a_task_to_its_end() {
    let place = Place::new(Backend::Embedded);
    let server = Server::start(&place).await;
    let web = Http::new(server.addr);
    let options = [("tile", "16")];
    let (_, body) = http::json(Ok(web
        .upload("events.png", srv::png(40, 40, 4), &options)
        .await))
    .await;
    let id = body["task_id"].as_str().unwrap().to_string();
    let events = web.events(&id).await;
    check_events(&events);
    assert!(events.len() >= 2, "{events:?}");
    // A finished task: one event, then the end.
    let again = web.events(&id).await;
    assert_eq!(again.len(), 1);
    assert_eq!(again[0]["state"], "SUCCESS");
    server.stop().await;
}

fn check_events(events: &[Value]) {
    let last = events.last().expect("at least one event");
    assert_eq!(last["state"], "SUCCESS", "{events:?}");
    assert_eq!(last["result_url"], "/processed/events.png");
    let done: Vec<u64> = events
        .iter()
        .map(|e| e["progress"]["done"].as_u64().unwrap())
        .collect();
    assert!(done.windows(2).all(|w| w[0] <= w[1]), "{done:?}");
    assert!(events[..events.len() - 1]
        .iter()
        .all(|e| matches!(e["state"].as_str(), Some("PENDING" | "STARTED"))));
}

/// An instance that does not run the task still streams its events (shared mode).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn task_events_across_instances() {
    let Some(backend) = srv::real_backend("task_events_across_instances") else {
        return;
    };
    let place = Place::new(backend);
    let a = Server::start(&place).await;
    let b = Server::start(&place).await;
    let options = [("tile", "16")];
    let (status, body) = http::json(Ok(Http::new(a.addr)
        .upload("events.png", srv::png(40, 40, 4), &options)
        .await))
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let events = Http::new(b.addr)
        .events(body["task_id"].as_str().unwrap())
        .await;
    check_events(&events);
    a.stop().await;
    b.stop().await;
}

/// A client that disconnects half-way through its upload leaves no temp file, task or lock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_cut_off_half_way_leaves_nothing() {
    let place = Place::new(Backend::Embedded);
    let server = Server::start(&place).await;
    let image = padded_png(8, 8, 1, 2 << 20);
    let boundary = "cut-off-boundary";
    let head = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"cut.png\"\r\nContent-Type: image/png\r\n\r\n"
    );
    let tail = format!("\r\n--{boundary}--\r\n");
    let length = head.len() + image.len() + tail.len();
    let addr = server.addr;
    let sent = image.len() / 2;
    tokio::task::spawn_blocking(move || {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        write!(
            s,
            "POST /upscale HTTP/1.1\r\nHost: localhost\r\nContent-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {length}\r\n\r\n{head}"
        )
        .unwrap();
        s.write_all(&image[..sent]).unwrap();
        s.flush().unwrap();
        std::thread::sleep(Duration::from_millis(300));
        // Dropped here: the connection closes with the body half sent.
    })
    .await
    .unwrap();
    assert_clean(&place).await;
    let web = Http::new(server.addr);
    let (status, body) = http::json(Ok(web.upload("cut.png", srv::png(4, 4, 1), &[]).await)).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    assert_eq!(body["outcome"], "queued", "the name was left locked");
    server.stop().await;
}

/// Until the core has started, every route but the page answers 503 with Retry-After.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_starting_server_answers_503() {
    // Nothing listens for MongoDB: the start waits for the server selection to time out.
    let starting = srv::Starting::begin(&Place::new(Backend::Embedded), 4000).await;
    let addr = starting.addr;
    let web = Http::new(addr);
    let r = web.get("/models").send().await.unwrap();
    assert_eq!(r.headers()["retry-after"], "2");
    let (status, body) = http::json(Ok(r)).await;
    let (code, message) = http::error(status, &body, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(code, "unavailable");
    assert!(message.contains("starting"), "{message}");
    let (status, body) = http::json(Ok(web.upload("s.png", srv::png(4, 4, 1), &[]).await)).await;
    http::error(status, &body, StatusCode::SERVICE_UNAVAILABLE);
    // The page itself is served regardless.
    assert_eq!(web.get("/").send().await.unwrap().status(), StatusCode::OK);
    starting.fails().await;
}

/// gRPC-Web over HTTP/1.1, as a browser sends it: unary and server-streaming calls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_web_over_http1() {
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::TokioExecutor;
    use tower::Layer;
    use upscaler::api::pb::upscaler_client::UpscalerClient;

    let place = Place::new(Backend::Embedded);
    let server = Server::start(&place).await;
    let http1 = Client::builder(TokioExecutor::new()).build_http();
    let service = tonic_web::GrpcWebClientLayer::new().layer(http1);
    let origin = format!("http://{}", server.addr).parse().unwrap();
    let mut web = UpscalerClient::with_origin(service, origin);

    let models = web.list_models(pb::ListModelsRequest {}).await.unwrap();
    assert_eq!(models.into_inner().default_model, "realesr-animevideov3");
    let missing = web
        .get_task(pb::GetTaskRequest {
            task_id: "nope".into(),
        })
        .await;
    assert_eq!(srv::code(missing).0, tonic::Code::NotFound);

    let mut grpc = server.client.clone();
    let up = srv::upload(&mut grpc, srv::meta("web.png"), &srv::png(40, 24, 6))
        .await
        .unwrap();
    let mut updates = web
        .watch_task(pb::WatchTaskRequest {
            task_id: up.task_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut last = None;
    while let Some(t) = updates.message().await.unwrap() {
        last = Some(t);
    }
    let last = last.expect("at least one update");
    assert_eq!(srv::state(&last), pb::TaskState::Success, "{}", last.error);

    let mut parts = web
        .fetch_processed(pb::FetchProcessedRequest {
            file_name: "web.png".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut bytes = Vec::new();
    let mut meta = None;
    while let Some(msg) = parts.message().await.unwrap() {
        match msg.payload {
            Some(pb::fetch_processed_response::Payload::Metadata(m)) => meta = Some(m),
            Some(pb::fetch_processed_response::Payload::Chunk(c)) => bytes.extend(c),
            None => panic!("empty message"),
        }
    }
    let meta = meta.expect("metadata first");
    assert_eq!(meta.sha256, sha256_hex(&bytes));
    assert_eq!(dimensions(&bytes), (160, 96));
    let plain = Http::new(server.addr)
        .get("/processed/web.png")
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(plain, bytes);
    server.stop().await;
}

/// With TLS, an HTTP/1.1-only client still connects (ALPN offers http/1.1), and gRPC keeps
/// HTTP/2 on the same port.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_serves_http1_clients_and_grpc() {
    let dir = tempfile::tempdir().unwrap();
    let certs = common::test_certs(dir.path());
    let place = Place::new(Backend::Embedded);
    let server = Server::start_tls(place.settings(), &certs).await;
    let port = server.addr.port();

    let pem = std::fs::read(&certs.ca).unwrap();
    let client = reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(&pem).unwrap())
        .http1_only()
        .build()
        .unwrap();
    let web = Http::with_client(format!("https://localhost:{port}"), client);
    let r = web.get("/models").send().await.unwrap();
    assert_eq!(r.version(), reqwest::Version::HTTP_11);
    let (status, body) = http::json(Ok(r)).await;
    assert_eq!(status, StatusCode::OK, "{body}");

    // gRPC on the same port, over HTTP/2.
    let listed = server
        .client
        .clone()
        .list_models(pb::ListModelsRequest {})
        .await
        .unwrap();
    assert_eq!(listed.into_inner().models.len(), 5);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_and_delete_on_embedded_backends() {
    cancel_and_delete(Place::new(Backend::Embedded)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_and_delete_on_real_backends() {
    if let Some(b) = srv::real_backend("cancel_and_delete_on_real_backends") {
        cancel_and_delete(Place::new(b)).await;
    }
}

/// `DELETE /tasks/{id}` cancels (a running task, then one that waits behind it, whose place
/// in the queue the task JSON gives), `DELETE /processed/{name}` deletes a result and frees
/// its name; WebP results over the form's `format` field.
async fn cancel_and_delete(place: Place) {
    let server = Server::start(&place).await;
    let web = Http::new(server.addr);
    let slow = [("model", "realesrgan-x4plus"), ("tile", "16")];
    let (status, body) = http::json(Ok(web
        .upload("long.png", srv::png(128, 128, 1), &slow)
        .await))
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let running = body["task_id"].as_str().unwrap().to_string();
    let deadline = tokio::time::Instant::now() + srv::wait_limit();
    loop {
        let (_, t) = http::json(web.get(&format!("/tasks/{running}")).send().await).await;
        if t["state"] == "STARTED" && t["progress"]["done"].as_u64() >= Some(1) {
            assert!(t.get("queue_position").is_none(), "{t}");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "never started: {t}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (_, body) = http::json(Ok(web.upload("next.png", srv::png(8, 8, 2), &[]).await)).await;
    let waiting = body["task_id"].as_str().unwrap().to_string();
    let (_, t) = http::json(web.get(&format!("/tasks/{waiting}")).send().await).await;
    assert_eq!(
        (t["state"].as_str(), t["queue_position"].as_u64()),
        (Some("PENDING"), Some(1)),
        "{t}"
    );

    let (status, t) = http::json(web.delete(&format!("/tasks/{waiting}")).send().await).await;
    assert_eq!(status, StatusCode::OK, "{t}");
    assert_eq!(t["state"], "CANCELLED", "{t}");
    let (status, t) = http::json(web.delete(&format!("/tasks/{running}")).send().await).await;
    assert_eq!(status, StatusCode::OK, "{t}");
    assert_eq!(t["state"], "CANCELLED", "{t}");
    assert!(t["finished_at"].is_string(), "{t}");
    let (status, body) = http::json(web.delete(&format!("/tasks/{running}")).send().await).await;
    let (code, message) = http::error(status, &body, StatusCode::CONFLICT);
    assert_eq!(code, "failed_precondition");
    assert!(message.contains("CANCELLED"), "{message}");
    let (status, body) = http::json(web.delete("/tasks/no-such-task").send().await).await;
    http::error(status, &body, StatusCode::NOT_FOUND);
    let (status, body) = http::json(web.get("/processed/long.png").send().await).await;
    http::error(status, &body, StatusCode::NOT_FOUND);

    // A lossless WebP result, deleted, then made again from the same upload.
    let bytes = srv::png(10, 6, 3);
    let (_, body) = http::json(Ok(web
        .upload("pic.png", bytes.clone(), &[("format", "webp")])
        .await))
    .await;
    let task = web.wait_done(body["task_id"].as_str().unwrap()).await;
    assert_eq!(task["state"], "SUCCESS", "{task}");
    let r = web.get("/processed/pic.png").send().await.unwrap();
    assert_eq!(r.headers()["content-type"], "image/webp");
    let webp = r.bytes().await.unwrap();
    let img = image::load_from_memory_with_format(&webp, image::ImageFormat::WebP).unwrap();
    assert_eq!((img.width(), img.height()), (40, 24));

    let (status, body) = http::json(web.delete("/processed/pic.png").send().await).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["deleted"], true);
    assert_eq!(body["size"].as_u64(), Some(webp.len() as u64));
    let (status, body) = http::json(web.get("/processed/pic.png").send().await).await;
    http::error(status, &body, StatusCode::NOT_FOUND);
    let (status, body) = http::json(web.delete("/processed/pic.png").send().await).await;
    http::error(status, &body, StatusCode::NOT_FOUND);
    for path in ["/processed/..%2F..%2FCargo.toml", "/processed/README.md"] {
        let (status, body) = http::json(web.delete(path).send().await).await;
        let (code, _) = http::error(status, &body, StatusCode::BAD_REQUEST);
        assert_eq!(code, "invalid_argument", "{path}");
    }
    assert!(common::root().join("README.md").exists());
    let (status, body) = http::json(Ok(web
        .upload("pic.png", bytes, &[("format", "webp")])
        .await))
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    assert_eq!(body["outcome"], "queued");
    web.wait_done(body["task_id"].as_str().unwrap()).await;

    assert_clean(&place).await;
    server.stop().await;
}
