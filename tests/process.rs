//! The `upscaler serve` process under real signals: SIGTERM interrupts a running task, which
//! the next start finishes; after SIGKILL, another instance on the same Redis and MongoDB
//! takes the task over once its lease runs out.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::server::{self as srv, connect, free_port, Backend, Place, Server};
use upscaler::api::pb;

fn spawn_server(place: &Place, port: u16, extra: &[(&str, &str)]) -> Child {
    server_command(place, port, extra).spawn().unwrap()
}

/// `upscaler serve` for `place` on `port` with only the settings the acceptance checks use
/// (plus `extra`), output discarded.
fn server_command(place: &Place, port: u16, extra: &[(&str, &str)]) -> Command {
    let s = place.settings();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_upscaler"));
    cmd.arg("serve")
        .current_dir(common::root())
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("LISTEN_ADDR", format!("127.0.0.1:{port}"))
        .env("DATA_DIR", &s.data_dir)
        .env("TEMP_DIR", &s.temp_dir)
        .env("DEFAULT_MODEL", "realesrgan-x4plus")
        .env("MONGO_DATABASE", &s.mongo_database)
        .env("REDIS_PREFIX", &s.redis_prefix)
        .env("LOG_LEVEL", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if let Some(u) = &s.redis_url {
        cmd.env("REDIS_URL", u);
    }
    if let Some(u) = &s.mongo_uri {
        cmd.env("MONGO_URI", u);
    }
    for (k, v) in extra {
        cmd.env(k, v);
    }
    cmd
}

/// A slow task: x4plus over 16 tiles.
fn slow_upload() -> (pb::UploadMetadata, Vec<u8>) {
    let bytes = srv::png(64, 64, 3);
    (
        pb::UploadMetadata {
            tile: Some(16),
            ..srv::meta("slow.png")
        },
        bytes,
    )
}

fn signal(child: &Child, sig: &str) {
    let ok = Command::new("kill")
        .arg(sig)
        .arg(child.id().to_string())
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill {sig} failed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_exits_cleanly_and_the_next_start_finishes_the_task() {
    let place = Place::new(Backend::Embedded);
    let port = free_port();
    let mut child = spawn_server(&place, port, &[]);
    let mut c = connect(port).await;
    let (meta, bytes) = slow_upload();
    let r = srv::upload(&mut c, meta, &bytes).await.unwrap();
    srv::wait_running(&mut c, &r.task_id).await;
    signal(&child, "-TERM");
    let status = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    assert_eq!(status.code(), Some(0), "exit status after SIGTERM");

    let mut settings = place.settings();
    settings.default_model = "realesrgan-x4plus".into();
    let server = Server::start_with(settings).await;
    let mut c = server.client.clone();
    let t = srv::wait_done(&mut c, &r.task_id).await;
    assert_eq!(srv::state(&t), pb::TaskState::Success, "{}", t.error);
    assert_eq!((t.output_width, t.output_height), (256, 256));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_instances_task_is_finished_by_another() {
    let Some(backend) = srv::real_backend("a_killed_holders_lock_expires") else {
        return;
    };
    let place = Place::new(backend);
    let port = free_port();
    let mut child = spawn_server(&place, port, &[("LOCK_TTL_SECS", "3")]);
    let mut c = connect(port).await;
    let (meta, bytes) = slow_upload();
    let first = srv::upload(&mut c, meta.clone(), &bytes).await.unwrap();
    srv::wait_running(&mut c, &first.task_id).await;
    signal(&child, "-KILL");
    tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();

    // A second instance on the same Redis and Mongo (its own temp dir, as on another host).
    let mut other = place.clone();
    other.temp_dir = place.temp_dir.with_file_name("tmp-other");
    let mut settings = other.settings();
    settings.lock_ttl_secs = 3;
    settings.default_model = "realesrgan-x4plus".into();
    let server = Server::start_with(settings).await;
    let mut c = server.client.clone();
    // The dead instance's lease and lock run out; the new one takes the task over and
    // finishes it, after which the name counts as processed from these bytes.
    let t = srv::wait_done(&mut c, &first.task_id).await;
    assert_eq!(srv::state(&t), pb::TaskState::Success, "{}", t.error);
    let again = srv::upload(&mut c, meta.clone(), &bytes).await.unwrap();
    assert_eq!(srv::outcome(&again), pb::UploadOutcome::AlreadyProcessed);
    assert_eq!(again.task_id, first.task_id);
    server.stop().await;
}

/// LOG_FORMAT=json: every line is a JSON object; a task's lines carry its id and file name,
/// and a call's lines the caller's `x-request-id`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_carry_task_and_request_ids() {
    let place = Place::new(Backend::Embedded);
    let port = free_port();
    let log_path = place.temp_dir.with_file_name("server.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let extra = [
        ("DEFAULT_MODEL", "realesr-animevideov3"),
        ("LOG_FORMAT", "json"),
    ];
    let mut child = server_command(&place, port, &extra)
        .stderr(log)
        .spawn()
        .unwrap();
    let mut c = connect(port).await;
    let bytes = srv::png(8, 8, 7);
    let mut request = tonic::Request::new(futures::stream::iter(vec![
        pb::UploadImageRequest {
            payload: Some(pb::upload_image_request::Payload::Metadata(srv::meta(
                "logged.png",
            ))),
        },
        pb::UploadImageRequest {
            payload: Some(pb::upload_image_request::Payload::Chunk(bytes)),
        },
    ]));
    request
        .metadata_mut()
        .insert("x-request-id", "req-4242".parse().unwrap());
    let r = c.upload_image(request).await.unwrap().into_inner();
    let t = srv::wait_done(&mut c, &r.task_id).await;
    assert_eq!(srv::state(&t), pb::TaskState::Success, "{}", t.error);
    signal(&child, "-TERM");
    tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();

    let text = std::fs::read_to_string(&log_path).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let has = |message: &str, needles: &[&str]| {
        lines.iter().any(|l| {
            let raw = l.to_string();
            l["fields"]["message"] == message && needles.iter().all(|n| raw.contains(n))
        })
    };
    assert!(
        has("upload queued", &["req-4242", "logged.png"]),
        "upload line with the request id: {text}"
    );
    assert!(
        has("task succeeded", &[&r.task_id, "logged.png"]),
        "task line with task id and file name: {text}"
    );
}

/// The models served by `c`, by name.
async fn listed(c: &mut srv::Client) -> Vec<pb::ModelInfo> {
    let r = c.list_models(pb::ListModelsRequest {}).await.unwrap();
    r.into_inner().models
}

/// Waits until `name` is listed (or, with `present` false, no longer listed).
async fn wait_listed(c: &mut srv::Client, name: &str, present: bool) -> Option<pb::ModelInfo> {
    for _ in 0..100 {
        let found = listed(c).await.into_iter().find(|m| m.name == name);
        if found.is_some() == present {
            return found;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!(
        "{name}: still {} after SIGHUP",
        if present { "missing" } else { "listed" }
    );
}

/// Upscales `bytes` as `file_name` with model `my-esrgan` and returns the result's pixels.
async fn upscale_with_my_esrgan(c: &mut srv::Client, file_name: &str, bytes: &[u8]) -> Vec<u8> {
    let meta = pb::UploadMetadata {
        model: "my-esrgan".into(),
        ..srv::meta(file_name)
    };
    let r = srv::upload(c, meta, bytes).await.unwrap();
    let t = srv::wait_done(c, &r.task_id).await;
    assert_eq!(srv::state(&t), pb::TaskState::Success, "{}", t.error);
    assert_eq!(t.model, "my-esrgan");
    let (_, got, _) = srv::fetch(c, &t.file_name).await.unwrap();
    let got = image::load_from_memory(&got).unwrap().to_rgb8();
    assert_eq!(got.dimensions(), (48, 40));
    got.into_raw()
}

/// What the library makes of `bytes` with the model file `path`.
fn library_pixels(path: &std::path::Path, bytes: &[u8]) -> Vec<u8> {
    let entry = upscaler::model::catalog::recognise_file("m", path).unwrap();
    let model = entry
        .load(&candle_core::Device::Cpu, upscaler::model::Prepare::Once)
        .unwrap();
    let input = image::load_from_memory(bytes).unwrap();
    let out = upscaler::pipeline::enhance(&model, &input, &Default::default(), &mut |_| {
        std::ops::ControlFlow::Continue(())
    });
    out.unwrap().to_rgb8().into_raw()
}

/// The models folder is read again on SIGHUP: a model dropped in while the server runs can be
/// used by name, a broken file beside it is skipped without hiding it, a file replaced in
/// place is loaded afresh, and a removed one is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_picks_up_a_model_dropped_in_the_models_folder() {
    let place = Place::new(Backend::Embedded);
    let models_dir = place.temp_dir.with_file_name("models");
    std::fs::create_dir_all(&models_dir).unwrap();
    let port = free_port();
    let models_env = models_dir.to_str().unwrap().to_string();
    let extra = [
        ("DEFAULT_MODEL", "realesr-animevideov3"),
        ("MODELS_DIR", models_env.as_str()),
    ];
    let mut child = spawn_server(&place, port, &extra);
    let mut c = connect(port).await;
    assert!(listed(&mut c).await.iter().all(|m| m.name != "my-esrgan"));
    let bytes = srv::png(12, 10, 5);
    let refused = |name: &str| pb::UploadMetadata {
        model: "my-esrgan".into(),
        ..srv::meta(name)
    };
    let (code, msg) = srv::code(srv::upload(&mut c, refused("before.png"), &bytes).await);
    assert_eq!(code, tonic::Code::InvalidArgument, "{msg}");
    assert!(msg.contains("my-esrgan"), "{msg}");

    // An old-layout ESRGAN in the legacy (pre-1.6) format, and a truncated file beside it.
    let old_layout = common::fixture("models/old_x4_legacy.pth");
    let my_esrgan = models_dir.join("my-esrgan.pth");
    std::fs::copy(&old_layout, &my_esrgan).unwrap();
    let broken = common::fixture("models/refused_truncated_zip.pth");
    std::fs::copy(broken, models_dir.join("broken.pth")).unwrap();
    signal(&child, "-HUP");
    let info = wait_listed(&mut c, "my-esrgan", true).await.unwrap();
    assert_eq!(info.architecture, "RRDBNet");
    assert_eq!((info.scale, info.in_channels, info.out_channels), (4, 3, 3));
    assert!(!info.shipped && info.fast_path, "{info:?}");
    assert_eq!(info.source, "my-esrgan.pth");
    assert!(listed(&mut c).await.iter().all(|m| m.name != "broken"));
    let first = upscale_with_my_esrgan(&mut c, "after.png", &bytes).await;
    assert_eq!(
        first,
        library_pixels(&old_layout, &bytes),
        "served = library pixels"
    );

    // Replaced in place by another network of the same shape (the trunk layout), with a
    // second new file to tell when the scan has run.
    let trunk_layout = common::fixture("models/trunk_x4_legacy.pth");
    std::fs::copy(&trunk_layout, &my_esrgan).unwrap();
    std::fs::copy(&old_layout, models_dir.join("marker.pth")).unwrap();
    signal(&child, "-HUP");
    wait_listed(&mut c, "marker", true).await;
    let second = upscale_with_my_esrgan(&mut c, "replaced.png", &bytes).await;
    assert_eq!(
        second,
        library_pixels(&trunk_layout, &bytes),
        "the new file's pixels"
    );
    assert_ne!(first, second);

    std::fs::remove_file(&my_esrgan).unwrap();
    signal(&child, "-HUP");
    wait_listed(&mut c, "my-esrgan", false).await;
    let (code, msg) = srv::code(srv::upload(&mut c, refused("removed.png"), &bytes).await);
    assert_eq!(code, tonic::Code::InvalidArgument, "{msg}");

    signal(&child, "-TERM");
    let status = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    assert_eq!(status.code(), Some(0));
}

/// `upscaler upload --wait` started before the server (nothing listening yet, then a server
/// still loading its model) rides it out: it says on stderr that it waits, then uploads,
/// follows the task and downloads the result as usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_started_before_the_server_waits_for_it() {
    let place = Place::new(Backend::Embedded);
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("early.png");
    std::fs::write(&input, srv::png(12, 8, 5)).unwrap();
    let client = Command::new(env!("CARGO_BIN_EXE_upscaler"))
        .arg("upload")
        .arg(&input)
        .args(["--wait", "--json", "--wait-ready", "120"])
        .env("UPSCALER_ADDR", format!("http://127.0.0.1:{port}"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut server = spawn_server(&place, port, &[]);
    let out = tokio::task::spawn_blocking(move || client.wait_with_output().unwrap())
        .await
        .unwrap();
    signal(&server, "-TERM");
    tokio::task::spawn_blocking(move || server.wait().unwrap())
        .await
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("waiting for the server to become ready"),
        "{err}"
    );
    let img = image::open(dir.path().join("early_x4.png")).unwrap();
    assert_eq!((img.width(), img.height()), (48, 32));
}
