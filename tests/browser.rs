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

use common::server::{Backend, Place, Server};
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

/// Runs the page test against `server`; returns the screenshot's path.
async fn page_test(python: &str, server: &Server, token: Option<&str>, out: &Path) -> String {
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
    let o = common::output(command).await;
    let (stdout, stderr) = (
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr),
    );
    assert!(o.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("PASS"), "{stdout}");
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
