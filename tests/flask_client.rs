//! The Flask service's clients, unchanged: `tests/flask_client/old_api.py` (Python
//! `requests`) posts, polls, fetches and posts again, over plain HTTP on both backends and
//! over TLS, where `requests` speaks only HTTP/1.1.
//! Needs `UPSCALER_TEST_PYTHON` with `tests/flask_client/requirements.txt` installed
//! (`scripts/test-with-services` sets it up).

mod common;

use std::path::Path;
use std::process::Command;

use common::server::{self as srv, Backend, Place, Server};

const NEEDS: &str = "a Python with the packages of tests/flask_client/requirements.txt";

/// Runs the old client against `base_url`; its output on failure.
async fn old_client(python: &str, base_url: &str, dir: &Path, ca: Option<&Path>) {
    let image = dir.join("flask_client.png");
    std::fs::write(&image, srv::png(12, 10, 42)).unwrap();
    let mut command = Command::new(python);
    command
        .arg(common::root().join("tests/flask_client/old_api.py"))
        .args(["--base-url", base_url, "--image"])
        .arg(&image);
    if let Some(ca) = ca {
        command.arg("--ca").arg(ca);
    }
    let o = common::output(command).await;
    let (out, err) = (
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr),
    );
    assert!(o.status.success(), "{out}\n{err}");
    assert!(out.contains("routed to the stored result"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_client_on_embedded_backends() {
    let Some(py) = common::python("old_client_on_embedded_backends", NEEDS) else {
        return;
    };
    let place = Place::new(Backend::Embedded);
    let server = Server::start(&place).await;
    let dir = tempfile::tempdir().unwrap();
    old_client(&py, &format!("http://{}", server.addr), dir.path(), None).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_client_on_real_backends() {
    let Some(py) = common::python("old_client_on_real_backends", NEEDS) else {
        return;
    };
    let Some(backend) = srv::real_backend("old_client_on_real_backends") else {
        return;
    };
    let place = Place::new(backend);
    let server = Server::start(&place).await;
    let dir = tempfile::tempdir().unwrap();
    old_client(&py, &format!("http://{}", server.addr), dir.path(), None).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_client_over_tls() {
    let Some(py) = common::python("old_client_over_tls", NEEDS) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let certs = common::test_certs(dir.path());
    let place = Place::new(Backend::Embedded);
    let server = Server::start_tls(place.settings(), &certs).await;
    let base_url = format!("https://localhost:{}", server.addr.port());
    old_client(&py, &base_url, dir.path(), Some(&certs.ca)).await;
    server.stop().await;
}
