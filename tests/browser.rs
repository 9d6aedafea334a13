//! The built-in page in a real browser: `tests/browser/page_test.py` drives Debian's
//! Chromium through Selenium against a live server, picks a photo, waits for the result,
//! checks the before/after slider (the result 4x the original) and the download link, and
//! saves a screenshot. Set `UPSCALER_TEST_SCREENSHOT=path.png` to keep a copy of it (the
//! README's `docs/page.png` is made that way).
//! Needs `UPSCALER_TEST_PYTHON` with `tests/browser/requirements.txt`, `/usr/bin/chromium`
//! and `/usr/bin/chromedriver` (`scripts/test-with-services` installs them).

mod common;

use std::path::Path;
use std::process::Command;

use common::server::{self as srv, Backend, Place, Server};
use upscaler::api::pb;
use upscaler::config::Secret;

const NEEDS: &str = "a Python with the packages of tests/browser/requirements.txt";

fn browser(test: &str) -> Option<String> {
    let python = common::python(test, NEEDS)?;
    for tool in ["/usr/bin/chromium", "/usr/bin/chromedriver"] {
        if !Path::new(tool).exists() {
            return common::skip_or_fail(&format!(
                "{test}: needs {tool} (apt-get install chromium chromium-driver)"
            ));
        }
    }
    Some(python)
}

/// Runs the page test against `server` with `extra` arguments; its standard output.
async fn run_page_test(
    python: &str,
    server: &Server,
    token: Option<&str>,
    out: &Path,
    extra: &[&str],
) -> String {
    let image = common::fixture("parity/coffee_80x60.png");
    let mut command = Command::new(python);
    command
        .arg(common::root().join("tests/browser/page_test.py"))
        .args(["--base-url", &format!("http://{}", server.addr)])
        .arg("--image")
        .arg(&image)
        .arg("--out-dir")
        .arg(out);
    if let Some(token) = token {
        command.args(["--token", token]);
    }
    command.args(extra);
    let o = common::output(command).await;
    let (stdout, stderr) = (
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr),
    );
    assert!(o.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("PASS"), "{stdout}");
    stdout.into_owned()
}

/// Runs the page test against `server`; returns the screenshot's path.
async fn page_test(python: &str, server: &Server, token: Option<&str>, out: &Path) -> String {
    run_page_test(python, server, token, out, &[]).await;
    let shot = out.join("page.png");
    let png = std::fs::read(&shot).expect("a screenshot");
    let img = image::load_from_memory(&png).expect("the screenshot is an image");
    assert!(img.width() >= 800, "{}x{}", img.width(), img.height());
    shot.display().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_upscales_a_photo_in_chromium() {
    let Some(python) = browser("the_page_upscales_a_photo_in_chromium") else {
        return;
    };
    let place = Place::new(Backend::Embedded);
    let server = Server::start(&place).await;
    let out = tempfile::tempdir().unwrap();
    let shot = page_test(&python, &server, None, out.path()).await;
    eprintln!("screenshot: {shot}");
    if let Some(keep) = std::env::var_os("UPSCALER_TEST_SCREENSHOT") {
        std::fs::copy(&shot, keep).unwrap();
    }
    server.stop().await;
}

/// With AUTH_TOKEN set, the page asks for the token when the server answers 401, and works
/// once it is given.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_asks_for_the_token() {
    let Some(python) = browser("the_page_asks_for_the_token") else {
        return;
    };
    let place = Place::new(Backend::Embedded);
    let mut settings = place.settings();
    settings.auth_token = Some(Secret::new("page-token"));
    let server = Server::start_with(settings).await;
    let out = tempfile::tempdir().unwrap();
    page_test(&python, &server, Some("page-token"), out.path()).await;
    server.stop().await;
}

/// A file waiting behind another task shows its place in the queue and a Cancel button,
/// which cancels it on the server: the row says so, and nothing is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_cancels_a_queued_upload() {
    let Some(python) = browser("the_page_cancels_a_queued_upload") else {
        return;
    };
    let place = Place::new(Backend::Embedded);
    let server = Server::start(&place).await;
    let mut c = server.client.clone();
    // Keeps the one worker busy: x4plus in 256 tiles of 16 px, many seconds.
    let blocker = srv::upload(
        &mut c,
        pb::UploadMetadata {
            model: "realesrgan-x4plus".into(),
            tile: Some(16),
            ..srv::meta("blocker.png")
        },
        &srv::png(256, 256, 1),
    )
    .await
    .unwrap()
    .task_id;
    let out = tempfile::tempdir().unwrap();
    let stdout = run_page_test(&python, &server, None, out.path(), &["--cancel-queued"]).await;
    assert!(stdout.contains("number 1 in the queue"), "{stdout}");
    let running = c
        .get_task(pb::GetTaskRequest {
            task_id: blocker.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        srv::state(&running),
        pb::TaskState::Started,
        "the page's file really waited behind it"
    );
    let (code, _) = srv::code(srv::fetch(&mut c, "coffee_80x60.png").await);
    assert_eq!(
        code,
        tonic::Code::NotFound,
        "a cancelled upload stores nothing"
    );
    srv::cancel(&mut c, &blocker).await.unwrap();
    assert!(srv::unfinished_tasks(&place).await.is_empty());
    server.stop().await;
}
