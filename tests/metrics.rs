//! The Prometheus endpoint: scraped before and after a task, the counters move. Its own test
//! binary, because the exporter is installed once per process.

mod common;

use common::server::{self as srv, Backend, Place, Server};
use upscaler::api::pb;

fn scrape(addr: std::net::SocketAddr) -> String {
    let (status, text) = common::http::raw_get(addr, "/metrics");
    assert_eq!(status, 200, "{text}");
    text
}

/// The value of the sample whose line starts with `series` (name and labels), or 0.
fn value(text: &str, series: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_move_after_a_task() {
    let place = Place::new(Backend::Embedded);
    let metrics_addr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let mut settings = place.settings();
    settings.metrics_addr = Some(metrics_addr);
    settings.sweep_interval_secs = 1;
    settings.orphan_grace_secs = 60;
    let server = Server::start_with(settings).await;
    let mut c = server.client.clone();
    let scrape_now = || tokio::task::spawn_blocking(move || scrape(metrics_addr));

    let before = scrape_now().await.unwrap();
    let bytes = srv::png(12, 12, 1);
    let r = srv::upload(&mut c, srv::meta("metered.png"), &bytes)
        .await
        .unwrap();
    let t = srv::wait_done(&mut c, &r.task_id).await;
    assert_eq!(srv::state(&t), pb::TaskState::Success, "{}", t.error);
    let (_, result, _) = srv::fetch(&mut c, "metered.png").await.unwrap();
    let missing = c
        .get_task(pb::GetTaskRequest {
            task_id: "no-such-task".into(),
        })
        .await;
    assert!(missing.is_err());
    let web = common::http::Http::new(server.addr);
    for (path, status) in [
        ("/tasks/no-such-task", 404),
        ("/models", 200),
        ("/nowhere", 404),
    ] {
        let r = web.get(path).send().await.unwrap();
        assert_eq!(r.status().as_u16(), status, "{path}");
    }
    let after = scrape_now().await.unwrap();

    let moved = |series: &str| value(&after, series) - value(&before, series);
    assert_eq!(
        moved(r#"upscaler_requests_total{method="UploadImage",code="Ok"}"#),
        1.0,
        "{after}"
    );
    assert_eq!(
        moved(r#"upscaler_requests_total{method="GetTask",code="NotFound"}"#),
        1.0
    );
    assert!(moved(r#"upscaler_requests_total{method="GetTask",code="Ok"}"#) >= 1.0);
    // HTTP calls, by route pattern and status.
    for series in [
        r#"upscaler_http_requests_total{route="/tasks/{id}",status="404"}"#,
        r#"upscaler_http_requests_total{route="/models",status="200"}"#,
        r#"upscaler_http_requests_total{route="unmatched",status="404"}"#,
    ] {
        assert_eq!(moved(series), 1.0, "{series}: {after}");
    }
    assert_eq!(
        moved(r#"upscaler_tiles_total{model="realesr-animevideov3"}"#),
        f64::from(t.tiles_total)
    );
    assert_eq!(moved("upscaler_uploaded_bytes_total"), bytes.len() as f64);
    assert_eq!(moved("upscaler_served_bytes_total"), result.len() as f64);
    assert_eq!(
        moved(
            r#"upscaler_task_duration_seconds_count{model="realesr-animevideov3",state="SUCCESS"}"#
        ),
        1.0
    );
    assert!(after.contains("upscaler_request_duration_seconds_bucket{method=\"UploadImage\""));
    assert_eq!(value(&after, "upscaler_queue_depth"), 0.0);
    assert_eq!(value(&after, "upscaler_running_tasks"), 0.0);
    assert!(after.contains("upscaler_running_tasks"));

    // The sweeper's view of the store, and what it swept: an upload left in TEMP_DIR by a
    // crash, an hour old.
    let orphan = place
        .work_dir()
        .join(format!("{}.src", uuid::Uuid::new_v4()));
    std::fs::write(&orphan, &bytes).unwrap();
    std::fs::File::options()
        .write(true)
        .open(&orphan)
        .unwrap()
        .set_modified(std::time::SystemTime::now() - std::time::Duration::from_secs(3600))
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let swept = loop {
        let now = scrape_now().await.unwrap();
        if value(&now, r#"upscaler_swept_total{kind="source_file"}"#) >= 1.0 {
            break now;
        }
        assert!(std::time::Instant::now() < deadline, "never swept: {now}");
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    };
    assert!(!orphan.exists());
    assert_eq!(
        value(&swept, r#"upscaler_swept_total{kind="source_file"}"#),
        1.0
    );
    assert_eq!(value(&swept, "upscaler_results_stored"), 1.0, "{swept}");
    assert_eq!(
        value(&swept, "upscaler_result_bytes_stored"),
        result.len() as f64
    );

    // Cancelling: a waiting task, then the running one.
    let slow = pb::UploadMetadata {
        model: "realesrgan-x4plus".into(),
        tile: Some(16),
        ..srv::meta("slow.png")
    };
    let running = srv::upload(&mut c, slow, &srv::png(128, 128, 2))
        .await
        .unwrap()
        .task_id;
    srv::wait_running(&mut c, &running).await;
    let waiting = srv::upload(&mut c, srv::meta("waiting.png"), &srv::png(8, 8, 3))
        .await
        .unwrap()
        .task_id;
    assert_eq!(
        value(&scrape_now().await.unwrap(), "upscaler_queue_depth"),
        1.0
    );
    for id in [&waiting, &running] {
        let t = srv::cancel(&mut c, id).await.unwrap();
        assert_eq!(srv::state(&t), pb::TaskState::Cancelled);
    }
    let end = scrape_now().await.unwrap();
    let moved = |series: &str| value(&end, series) - value(&swept, series);
    assert_eq!(
        moved(r#"upscaler_cancelled_tasks_total{state="PENDING"}"#),
        1.0,
        "{end}"
    );
    assert_eq!(
        moved(r#"upscaler_cancelled_tasks_total{state="STARTED"}"#),
        1.0,
        "{end}"
    );
    assert_eq!(
        moved(
            r#"upscaler_task_duration_seconds_count{model="realesrgan-x4plus",state="CANCELLED"}"#
        ),
        1.0,
        "{end}"
    );
    assert_eq!(value(&end, "upscaler_queue_depth"), 0.0);
    server.stop().await;
}
