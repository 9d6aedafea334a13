//! The Python example client (`examples/python`) against a live server: the proof that a
//! client in another language, built only from `proto/upscale.proto`, can use the service.
//! Needs `UPSCALER_TEST_PYTHON`: a Python with `examples/python/requirements.txt` installed
//! (`scripts/test-with-services` sets it up).

mod common;

use std::process::{Command, Output};

use common::server::{self as srv, Backend, Place, Server};

async fn run(python: &str, args: Vec<String>) -> Output {
    let mut command = Command::new(python);
    command
        .args(args)
        .current_dir(common::root().join("examples/python"));
    common::output(command).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_client_on_embedded_backends() {
    session(Place::new(Backend::Embedded)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_client_on_real_backends() {
    if let Some(b) = srv::real_backend("python_client_on_real_backends") {
        session(Place::new(b)).await;
    }
}

/// The Python stubs, generated once per test binary.
async fn stubs(py: &str) {
    static STUBS: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();
    STUBS
        .get_or_init(|| async {
            let o = run(py, vec!["gen_stubs.py".into()]).await;
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        })
        .await;
}

/// Stubs, then upload, watch and fetch; the same file
/// again; a refused upload.
async fn session(place: Place) {
    let Some(py) = common::python("python_client", "a Python with grpcio and grpcio-tools") else {
        return;
    };
    stubs(&py).await;
    let server = Server::start(&place).await;
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("py.png");
    std::fs::write(&input, srv::png(10, 6, 90)).unwrap();
    let out = dir.path().join("py_x4.png");
    let args = |extra: &[&str]| -> Vec<String> {
        let mut a: Vec<String> = vec![
            "client.py".into(),
            input.to_str().unwrap().into(),
            "-o".into(),
            out.to_str().unwrap().into(),
            "--addr".into(),
            server.addr.to_string(),
        ];
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    let o = run(&py, args(&["--model", "realesr-animevideov3"])).await;
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("UPLOAD_OUTCOME_QUEUED") && err.contains("TASK_STATE_SUCCESS"),
        "{err}"
    );
    let got = image::open(&out).unwrap();
    assert_eq!((got.width(), got.height()), (40, 24));

    // The same file again: already processed, fetched without a new task.
    std::fs::remove_file(&out).unwrap();
    let o = run(&py, args(&["--model", "realesr-animevideov3"])).await;
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(
        o.status.success() && err.contains("ALREADY_PROCESSED"),
        "{err}"
    );
    assert!(out.exists());

    // A refused upload: a status, not a traceback.
    let o = run(&py, args(&["--model", "no-such-model"])).await;
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("INVALID_ARGUMENT") && !err.contains("Traceback"),
        "{err}"
    );
    server.stop().await;
}

/// Started before the server listens, the client retries UNAVAILABLE (saying so once on
/// stderr) until the server is up, then goes on as usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_client_waits_for_the_server() {
    let Some(py) = common::python("python_client", "a Python with grpcio and grpcio-tools") else {
        return;
    };
    stubs(&py).await;
    let place = Place::new(Backend::Embedded);
    let port = srv::free_port();
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("early.png");
    std::fs::write(&input, srv::png(8, 6, 91)).unwrap();
    let out = dir.path().join("early_x4.png");
    let client = Command::new(&py)
        .arg("client.py")
        .arg(&input)
        .arg("-o")
        .arg(&out)
        .args([
            "--addr",
            &format!("127.0.0.1:{port}"),
            "--wait-ready",
            "120",
        ])
        .current_dir(common::root().join("examples/python"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    let server = Server::start_at(place.settings(), port).await;
    let o = tokio::task::spawn_blocking(move || client.wait_with_output().unwrap())
        .await
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("waiting for the server to become ready"),
        "{err}"
    );
    let got = image::open(&out).unwrap();
    assert_eq!((got.width(), got.height()), (32, 24));
    server.stop().await;
}
