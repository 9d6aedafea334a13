//! The client commands (`upload`, `status`, `watch`, `fetch`) as a user runs them, against a
//! live in-process server on the embedded backends and on real Redis + a Mongo-wire server.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::server::{self as srv, Backend, Place, Server};

/// Runs the binary off the async executor (the server runs on it).
async fn upscaler(addr: &str, args: &[&str]) -> Output {
    let addr = addr.to_string();
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_upscaler"))
            .args(&args)
            .env("UPSCALER_ADDR", addr)
            .output()
            .expect("binary runs")
    })
    .await
    .unwrap()
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn json(o: &Output) -> serde_json::Value {
    let (out, err) = text(o);
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: stdout {out:?}, stderr {err}"))
}

fn write_png(dir: &Path, name: &str, w: u32, h: u32) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, srv::png(w, h, 0)).unwrap();
    path
}

/// Upload with --wait, then the same file again (ALREADY_PROCESSED straight to the
/// download), then status, watch and fetch of what the first run made.
async fn session(place: Place) {
    let server = Server::start(&place).await;
    let addr = format!("http://{}", server.addr);
    let dir = tempfile::tempdir().unwrap();
    let input = write_png(dir.path(), "cat.png", 12, 10);
    let input = input.to_str().unwrap();

    let o = upscaler(&addr, &["upload", input, "--wait", "--json"]).await;
    assert!(o.status.success(), "{:?}", text(&o));
    let first = json(&o);
    let out = dir.path().join("cat_x4.png");
    assert_eq!(first["output"], out.to_str().unwrap());
    let img = image::open(&out).unwrap();
    assert_eq!((img.width(), img.height()), (48, 40));
    let task_id = first["task_id"].as_str().unwrap().to_string();

    let o = upscaler(&addr, &["upload", input, "--json"]).await;
    assert!(o.status.success(), "{:?}", text(&o));
    assert_eq!(json(&o)["outcome"], "ALREADY_PROCESSED");
    let again = dir.path().join("again.png");
    let o = upscaler(
        &addr,
        &["upload", input, "--wait", "-o", again.to_str().unwrap()],
    )
    .await;
    assert!(o.status.success(), "{:?}", text(&o));
    assert_eq!(std::fs::read(&again).unwrap(), std::fs::read(&out).unwrap());

    let o = upscaler(&addr, &["status", &task_id, "--json"]).await;
    assert!(o.status.success(), "{:?}", text(&o));
    let t = json(&o);
    assert_eq!(t["state"], "SUCCESS");
    assert_eq!(
        (t["output_width"].as_u64(), t["input_width"].as_u64()),
        (Some(48), Some(12))
    );
    assert_eq!(t["tiles_done"], t["tiles_total"]);

    let o = upscaler(&addr, &["watch", &task_id]).await;
    assert!(o.status.success(), "{:?}", text(&o));
    assert!(text(&o).0.starts_with("SUCCESS cat.png"), "{:?}", text(&o));

    let fetched = dir.path().join("fetched.png");
    let o = upscaler(
        &addr,
        &[
            "fetch",
            "cat.png",
            "-o",
            fetched.to_str().unwrap(),
            "--json",
        ],
    )
    .await;
    assert!(o.status.success(), "{:?}", text(&o));
    assert_eq!(json(&o)["width"], 48);
    assert_eq!(
        std::fs::read(&fetched).unwrap(),
        std::fs::read(&out).unwrap()
    );
    server.stop().await;
}

/// Exit codes: 2 for a missing file, an unknown name and a refused upload; 1 for a task that
/// fails; 3 for an unreachable server. Each with a one-line message.
async fn exit_codes(place: Place) {
    // Weights: the default model, and a corrupt file for another one, so a task can fail.
    let weights = tempfile::tempdir().unwrap();
    std::fs::copy(
        common::root().join("weights/realesr-animevideov3.safetensors"),
        weights.path().join("realesr-animevideov3.safetensors"),
    )
    .unwrap();
    std::fs::write(
        weights.path().join("realesrgan-x4plus-anime.safetensors"),
        b"not safetensors",
    )
    .unwrap();
    let mut settings = place.settings();
    settings.weights_dir = Some(weights.path().to_path_buf());
    let server = Server::start_with(settings).await;
    let addr = format!("http://{}", server.addr);
    let dir = tempfile::tempdir().unwrap();
    let one_line = |o: &Output| {
        let (_, err) = text(o);
        let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
        assert_eq!(lines.len(), 1, "one error line: {err}");
        lines[0].to_string()
    };

    let missing = dir.path().join("missing.png");
    let o = upscaler(&addr, &["upload", missing.to_str().unwrap()]).await;
    assert_eq!(o.status.code(), Some(2));
    assert!(one_line(&o).contains("no such file"));

    let o = upscaler(
        &addr,
        &[
            "fetch",
            "never-uploaded.png",
            "-o",
            dir.path().join("x.png").to_str().unwrap(),
        ],
    )
    .await;
    assert_eq!(o.status.code(), Some(2));
    assert!(one_line(&o).contains("NotFound"));
    assert!(!dir.path().join("x.png").exists());

    let o = upscaler(&addr, &["status", "no-such-task"]).await;
    assert_eq!(o.status.code(), Some(2));

    let notes = dir.path().join("notes.png");
    std::fs::write(&notes, b"not an image").unwrap();
    let o = upscaler(&addr, &["upload", notes.to_str().unwrap()]).await;
    assert_eq!(o.status.code(), Some(2));
    assert!(one_line(&o).contains("InvalidArgument"));

    // A model whose weights are in no folder searched is refused at upload...
    let input = write_png(dir.path(), "fails.png", 8, 8);
    let input = input.to_str().unwrap();
    let o = upscaler(&addr, &["upload", input, "--model", "realesrgan-x2plus"]).await;
    assert_eq!(o.status.code(), Some(2), "{:?}", text(&o));
    assert!(one_line(&o).contains("not installed"));
    // ...and one whose weights turn out corrupt fails its task.
    let anime = "realesrgan-x4plus-anime";
    let o = upscaler(&addr, &["upload", input, "--model", anime, "--wait"]).await;
    assert_eq!(o.status.code(), Some(1), "{:?}", text(&o));
    assert!(one_line(&o).contains("could not be loaded"));
    server.stop().await;

    // Nothing listens there any more: the client waits --wait-ready seconds for a server,
    // saying so, then gives up.
    let input = write_png(dir.path(), "late.png", 8, 8);
    let began = std::time::Instant::now();
    let o = upscaler(
        &addr,
        &["upload", input.to_str().unwrap(), "--wait-ready", "2"],
    )
    .await;
    let waited = began.elapsed();
    assert_eq!(o.status.code(), Some(3), "{:?}", text(&o));
    let line = one_line(&o);
    assert!(
        line.contains("cannot connect") && line.contains("after 2s"),
        "{line}"
    );
    assert!(text(&o)
        .1
        .contains("waiting for the server to become ready"));
    assert!(
        waited >= std::time::Duration::from_millis(1500)
            && waited < std::time::Duration::from_secs(15),
        "gave up after {waited:?}"
    );
    // --wait-ready 0: one try.
    let o = upscaler(&addr, &["status", "some-task", "--wait-ready", "0"]).await;
    assert_eq!(o.status.code(), Some(3), "{:?}", text(&o));
    assert!(!text(&o).1.contains("waiting for the server"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_session() {
    session(Place::new(Backend::Embedded)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_backends_session() {
    if let Some(b) = srv::real_backend("real_backends_session") {
        session(Place::new(b)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_codes_name_the_cause() {
    exit_codes(Place::new(Backend::Embedded)).await;
}

/// With AUTH_TOKEN set, every RPC but health needs the bearer token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_guards_everything_but_health() {
    let place = Place::new(Backend::Embedded);
    let mut settings = place.settings();
    settings.auth_token = Some(upscaler::config::Secret::new("s3cret-token"));
    let server = Server::start_with(settings).await;
    let addr = format!("http://{}", server.addr);
    let dir = tempfile::tempdir().unwrap();
    let input = write_png(dir.path(), "guarded.png", 8, 8);
    let input = input.to_str().unwrap();

    for token in [None, Some("wrong")] {
        let mut args = vec!["upload", input];
        if let Some(t) = token {
            args.extend(["--token", t]);
        }
        let o = upscaler(&addr, &args).await;
        assert_eq!(o.status.code(), Some(2), "{token:?}: {:?}", text(&o));
        let (_, err) = text(&o);
        assert!(err.contains("Unauthenticated"), "{err}");
        assert!(!err.contains("s3cret"), "the token is never echoed: {err}");
    }
    let o = upscaler(
        &addr,
        &["upload", input, "--token", "s3cret-token", "--wait"],
    )
    .await;
    assert!(o.status.success(), "{:?}", text(&o));

    // Health answers without a token (load balancers and probes have none).
    let channel = tonic::transport::Channel::from_shared(addr.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let health = tonic_health::pb::health_client::HealthClient::new(channel)
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        health.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    server.stop().await;
}

/// With TLS_CERT and TLS_KEY the server speaks TLS: the client commands connect over
/// https:// trusting the private CA given with --ca; a plaintext client cannot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_a_private_ca() {
    let dir = tempfile::tempdir().unwrap();
    let certs = common::test_certs(dir.path());

    let place = Place::new(Backend::Embedded);
    let server = Server::start_tls(place.settings(), &certs).await;
    let port = server.addr.port();

    let input = write_png(dir.path(), "secure.png", 8, 8);
    let input = input.to_str().unwrap();
    let https = format!("https://localhost:{port}");
    let ca = certs.ca.to_str().unwrap();
    let o = upscaler(&https, &["upload", input, "--ca", ca, "--wait", "--json"]).await;
    assert!(o.status.success(), "{:?}", text(&o));
    assert_eq!(json(&o)["width"], 32);

    // Plaintext gets nowhere (the HTTP/2 connection breaks; how it is reported varies).
    // A broken transport may be a server still starting, so tell the client not to wait.
    let o = upscaler(
        &format!("http://127.0.0.1:{port}"),
        &["status", "x", "--wait-ready", "0"],
    )
    .await;
    let (_, err) = text(&o);
    assert!(!o.status.success(), "{err}");
    assert!(
        err.starts_with("error: ") && err.lines().count() == 1,
        "{err}"
    );
    assert!(
        !err.contains("NotFound"),
        "the call never reached the service: {err}"
    );
    server.stop().await;
}

/// `upload --wait` started as a child process whose stderr lines arrive on a channel.
struct Waiting {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
    task_id: String,
}

impl Waiting {
    /// Starts it and waits until it follows its task ("QUEUED <name> task <id>").
    fn start(addr: &str, args: &[&str]) -> Self {
        use std::io::BufRead;
        let mut child = Command::new(env!("CARGO_BIN_EXE_upscaler"))
            .args(args)
            .env("UPSCALER_ADDR", addr)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let line = lines
            .recv_timeout(srv::wait_limit())
            .expect("upload --wait says which task it follows");
        let task_id = line
            .rsplit_once(" task ")
            .unwrap_or_else(|| panic!("no task id in {line:?}"))
            .1
            .to_string();
        // Its Ctrl-C handler is set up as it starts following.
        std::thread::sleep(std::time::Duration::from_millis(500));
        Self {
            child,
            lines,
            task_id,
        }
    }

    fn interrupt(&self) {
        let ok = Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok);
    }

    /// Types `text` on its stdin (read when it asks).
    fn answer(&mut self, text: &str) {
        use std::io::Write;
        let stdin = self.child.stdin.as_mut().unwrap();
        stdin.write_all(text.as_bytes()).unwrap();
        stdin.flush().unwrap();
    }

    /// The exit code and the rest of stderr.
    fn finish(mut self) -> (Option<i32>, String) {
        let status = self.child.wait().unwrap();
        let rest: Vec<String> = self.lines.iter().collect();
        (status.code(), rest.join("\n"))
    }
}

async fn task_state(c: &mut srv::Client, id: &str) -> i32 {
    c.get_task(upscaler::api::pb::GetTaskRequest { task_id: id.into() })
        .await
        .unwrap()
        .into_inner()
        .state
}

/// Ctrl-C during `upload --wait` asks whether to cancel the task on the server: "n" leaves
/// it running, "y" cancels it, and `--cancel-on-interrupt` cancels without asking; the
/// command exits 130. Then `cancel` and `delete` as commands.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interrupt_cancel_and_delete() {
    use upscaler::api::pb::TaskState;
    let place = Place::new(Backend::Embedded);
    let server = Server::start(&place).await;
    let addr = format!("http://{}", server.addr);
    let mut c = server.client.clone();
    let dir = tempfile::tempdir().unwrap();
    let slow = write_png(dir.path(), "slow.png", 128, 128);
    let slow = slow.to_str().unwrap().to_string();
    let waiting = write_png(dir.path(), "waiting.png", 8, 8);
    let waiting = waiting.to_str().unwrap().to_string();
    let other = write_png(dir.path(), "other.png", 8, 6);
    let other = other.to_str().unwrap().to_string();

    // "n": the task goes on.
    let (a, s) = (addr.clone(), slow.clone());
    let mut run = tokio::task::spawn_blocking(move || {
        Waiting::start(
            &a,
            &["upload", &s, "--model", "realesrgan-x4plus", "--wait"],
        )
    })
    .await
    .unwrap();
    let running = run.task_id.clone();
    run.interrupt();
    run.answer("n\n");
    let run = tokio::task::spawn_blocking(move || run.finish())
        .await
        .unwrap();
    assert_eq!(run.0, Some(130), "{}", run.1);
    assert!(run.1.contains("on the server? [y/N]"), "{}", run.1);
    assert!(run.1.contains("goes on on the server"), "{}", run.1);
    let state = task_state(&mut c, &running).await;
    assert!(
        state == TaskState::Started as i32 || state == TaskState::Pending as i32,
        "{state}"
    );

    // "y", on a task waiting behind it: cancelled on the server.
    let (a, w) = (addr.clone(), waiting.clone());
    let mut run =
        tokio::task::spawn_blocking(move || Waiting::start(&a, &["upload", &w, "--wait"]))
            .await
            .unwrap();
    let queued = run.task_id.clone();
    run.interrupt();
    run.answer("y\n");
    let run = tokio::task::spawn_blocking(move || run.finish())
        .await
        .unwrap();
    assert_eq!(run.0, Some(130), "{}", run.1);
    assert!(run.1.contains("is CANCELLED"), "{}", run.1);
    assert_eq!(
        task_state(&mut c, &queued).await,
        TaskState::Cancelled as i32
    );

    // --cancel-on-interrupt: no question.
    let (a, o) = (addr.clone(), other.clone());
    let run = tokio::task::spawn_blocking(move || {
        Waiting::start(&a, &["upload", &o, "--wait", "--cancel-on-interrupt"])
    })
    .await
    .unwrap();
    let third = run.task_id.clone();
    run.interrupt();
    let run = tokio::task::spawn_blocking(move || run.finish())
        .await
        .unwrap();
    assert_eq!(run.0, Some(130), "{}", run.1);
    assert!(
        !run.1.contains("[y/N]") && run.1.contains("is CANCELLED"),
        "{}",
        run.1
    );
    assert_eq!(
        task_state(&mut c, &third).await,
        TaskState::Cancelled as i32
    );

    // `cancel` stops the running task; a second time it has ended.
    let o = upscaler(&addr, &["cancel", &running, "--json"]).await;
    assert!(o.status.success(), "{:?}", text(&o));
    assert_eq!(json(&o)["state"], "CANCELLED");
    let o = upscaler(&addr, &["cancel", &running]).await;
    assert_eq!(o.status.code(), Some(2), "{:?}", text(&o));
    assert!(text(&o).1.contains("FailedPrecondition"), "{:?}", text(&o));

    // `delete` removes a stored result; a second time there is none.
    let o = upscaler(&addr, &["upload", &other, "--wait", "--format", "webp"]).await;
    assert!(o.status.success(), "{:?}", text(&o));
    let webp = dir.path().join("other_x4.webp");
    let size = std::fs::metadata(&webp).unwrap().len();
    let img = image::open(&webp).unwrap();
    assert_eq!((img.width(), img.height()), (32, 24));
    let o = upscaler(&addr, &["delete", "other.png"]).await;
    assert!(o.status.success(), "{:?}", text(&o));
    assert_eq!(
        text(&o).0.trim(),
        format!("DELETED other.png ({size} bytes)")
    );
    let o = upscaler(&addr, &["delete", "other.png", "--json"]).await;
    assert_eq!(o.status.code(), Some(2), "{:?}", text(&o));
    assert!(text(&o).1.contains("NotFound"), "{:?}", text(&o));
    server.stop().await;
}
