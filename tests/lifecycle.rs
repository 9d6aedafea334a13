//! A task's and a result's whole life, over real gRPC, each scenario on the embedded backends
//! and on real Redis + a Mongo-wire server: cancelling (waiting, running, finished), deleting
//! a result, expiry, the sweep of orphaned uploads, queue positions and WebP results.

mod common;

use std::time::{Duration, Instant};

use common::server::{self as srv, png, Backend, Place, Server};
use futures::StreamExt;
use tonic::Code;
use upscaler::api::pb;
use upscaler::store::SourceStore;

on_both_backends!(
    cancel_while_pending,
    cancel_while_started,
    cancel_after_success,
    delete_then_upload_again,
    results_expire,
    orphaned_uploads_are_swept,
    queue_positions_move,
    webp_round_trip,
);

/// A task of realesrgan-x4plus in tiles of 16: `side`² / 256 tiles of about 0.1 s each on
/// the fast path, so it runs long enough to be seen running and cancelled.
fn slow(name: &str) -> pb::UploadMetadata {
    pb::UploadMetadata {
        model: "realesrgan-x4plus".into(),
        tile: Some(16),
        ..srv::meta(name)
    }
}

async fn queued(c: &mut srv::Client, meta: pb::UploadMetadata, bytes: &[u8]) -> String {
    let r = srv::upload(c, meta, bytes).await.unwrap();
    assert_eq!(srv::outcome(&r), pb::UploadOutcome::Queued, "{r:?}");
    r.task_id
}

async fn get(c: &mut srv::Client, id: &str) -> pb::Task {
    c.get_task(pb::GetTaskRequest { task_id: id.into() })
        .await
        .unwrap()
        .into_inner()
}

/// Collects a WatchTask stream until the server ends it.
fn watch_all(c: &srv::Client, id: &str) -> tokio::task::JoinHandle<Vec<pb::Task>> {
    let mut c = c.clone();
    let id = id.to_owned();
    tokio::spawn(async move {
        let mut stream = c
            .watch_task(pb::WatchTaskRequest { task_id: id })
            .await
            .unwrap()
            .into_inner();
        let mut seen = Vec::new();
        while let Some(t) = tokio::time::timeout(srv::wait_limit(), stream.next())
            .await
            .expect("the watch stream ends by itself")
        {
            seen.push(t.unwrap());
        }
        seen
    })
}

/// Whether the upload of task `id` is still stored (a file in TEMP_DIR, or GridFS `uploads`).
async fn has_source(place: &Place, id: &str) -> bool {
    match &place.backend {
        Backend::Embedded => place.work_dir().join(format!("{id}.src")).exists(),
        Backend::Real { mongo_uri, .. } => mongo(place, mongo_uri)
            .await
            .source(id)
            .await
            .unwrap()
            .is_some(),
    }
}

async fn mongo(place: &Place, uri: &str) -> upscaler::store::mongo::MongoStore {
    upscaler::store::mongo::MongoStore::connect(uri, &place.namespace, Duration::from_secs(3600))
        .await
        .unwrap()
}

/// The name is free again: the same bytes and options are QUEUED as new work.
async fn name_is_free(c: &mut srv::Client, meta: pb::UploadMetadata, bytes: &[u8]) -> String {
    queued(c, meta, bytes).await
}

async fn cancel_while_pending(place: Place) {
    let server = Server::start(&place).await;
    let mut c = server.client.clone();
    let runner = queued(&mut c, slow("first.png"), &png(128, 128, 1)).await;
    srv::wait_running(&mut c, &runner).await;
    let bytes = png(24, 16, 2);
    let waiting = queued(&mut c, srv::meta("second.png"), &bytes).await;
    let t = get(&mut c, &waiting).await;
    assert_eq!(srv::state(&t), pb::TaskState::Pending);
    assert_eq!(t.queue_position, 1, "{t:?}");
    let watcher = watch_all(&c, &waiting);
    tokio::time::sleep(Duration::from_millis(200)).await;

    let asked = Instant::now();
    let cancelled = srv::cancel(&mut c, &waiting).await.unwrap();
    assert!(
        asked.elapsed() < Duration::from_secs(5),
        "a waiting task is cancelled at once, not after {:?}",
        asked.elapsed()
    );
    assert_eq!(srv::state(&cancelled), pb::TaskState::Cancelled);
    assert_eq!(cancelled.queue_position, 0);
    assert!(cancelled.finished_at.is_some());
    let seen = watcher.await.unwrap();
    assert_eq!(
        srv::state(seen.last().unwrap()),
        pb::TaskState::Cancelled,
        "{seen:?}"
    );
    assert_eq!(
        srv::state(&get(&mut c, &waiting).await),
        pb::TaskState::Cancelled
    );
    assert!(!has_source(&place, &waiting).await, "the upload was kept");
    let (code, _) = srv::code(srv::fetch(&mut c, "second.png").await);
    assert_eq!(code, Code::NotFound, "a cancelled task stores nothing");
    let (code, msg) = srv::code(srv::cancel(&mut c, &waiting).await);
    assert_eq!(code, Code::FailedPrecondition, "{msg}");

    // The name is free, and the running task was not disturbed.
    let again = name_is_free(&mut c, srv::meta("second.png"), &bytes).await;
    assert_ne!(again, waiting);
    srv::cancel(&mut c, &runner).await.unwrap();
    assert_eq!(
        srv::state(&srv::wait_done(&mut c, &again).await),
        pb::TaskState::Success
    );
    server.stop().await;
}

async fn cancel_while_started(place: Place) {
    let server = Server::start(&place).await;
    let mut c = server.client.clone();
    let bytes = png(128, 128, 3);
    let id = queued(&mut c, slow("running.png"), &bytes).await;
    let watcher = watch_all(&c, &id);
    srv::wait_running(&mut c, &id).await;

    let asked = Instant::now();
    let t = srv::cancel(&mut c, &id).await.unwrap();
    let took = asked.elapsed();
    eprintln!("cancel latency, STARTED task (x4plus, tiles of 16): {took:?}");
    assert_eq!(srv::state(&t), pb::TaskState::Cancelled, "{t:?}");
    assert!(t.tiles_done < t.tiles_total, "it stopped early: {t:?}");
    let seen = watcher.await.unwrap();
    assert_eq!(srv::state(seen.last().unwrap()), pb::TaskState::Cancelled);
    assert!(seen.iter().any(|t| srv::state(t) == pb::TaskState::Started));
    assert!(!has_source(&place, &id).await, "the upload was kept");
    let (code, _) = srv::code(srv::fetch(&mut c, "running.png").await);
    assert_eq!(code, Code::NotFound, "a cancelled task stores nothing");
    // Nothing else is written later either (a run that went on would store within seconds).
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (code, _) = srv::code(srv::fetch(&mut c, "running.png").await);
    assert_eq!(code, Code::NotFound);
    assert_eq!(
        srv::state(&get(&mut c, &id).await),
        pb::TaskState::Cancelled
    );

    let again = name_is_free(&mut c, srv::meta("running.png"), &png(16, 16, 3)).await;
    assert_eq!(
        srv::state(&srv::wait_done(&mut c, &again).await),
        pb::TaskState::Success
    );
    server.stop().await;
}

async fn cancel_after_success(place: Place) {
    let server = Server::start(&place).await;
    let mut c = server.client.clone();
    let id = queued(&mut c, srv::meta("done.png"), &png(16, 16, 4)).await;
    assert_eq!(
        srv::state(&srv::wait_done(&mut c, &id).await),
        pb::TaskState::Success
    );
    let (code, msg) = srv::code(srv::cancel(&mut c, &id).await);
    assert_eq!(code, Code::FailedPrecondition, "{msg}");
    assert!(msg.contains("SUCCESS"), "{msg}");
    srv::fetch(&mut c, "done.png")
        .await
        .expect("the result stays");
    let (code, _) = srv::code(srv::cancel(&mut c, "no-such-task").await);
    assert_eq!(code, Code::NotFound);
    let (code, _) = srv::code(srv::cancel(&mut c, "").await);
    assert_eq!(code, Code::InvalidArgument);
    server.stop().await;
}

async fn delete(
    c: &mut srv::Client,
    name: &str,
) -> Result<pb::DeleteProcessedResponse, tonic::Status> {
    c.delete_processed(pb::DeleteProcessedRequest {
        file_name: name.into(),
    })
    .await
    .map(|r| r.into_inner())
}

async fn delete_then_upload_again(place: Place) {
    let server = Server::start(&place).await;
    let mut c = server.client.clone();
    let bytes = png(20, 12, 5);
    let first = queued(&mut c, srv::meta("del.png"), &bytes).await;
    srv::wait_done(&mut c, &first).await;
    let (meta, _, _) = srv::fetch(&mut c, "del.png").await.unwrap();
    let again = srv::upload(&mut c, srv::meta("del.png"), &bytes)
        .await
        .unwrap();
    assert_eq!(srv::outcome(&again), pb::UploadOutcome::AlreadyProcessed);

    let deleted = delete(&mut c, "del.png").await.unwrap();
    assert_eq!(
        (deleted.file_name.as_str(), deleted.size),
        ("del.png", meta.size)
    );
    let (code, _) = srv::code(srv::fetch(&mut c, "del.png").await);
    assert_eq!(code, Code::NotFound);
    let (code, _) = srv::code(delete(&mut c, "del.png").await);
    assert_eq!(code, Code::NotFound);
    let (code, _) = srv::code(delete(&mut c, "../etc/passwd").await);
    assert_eq!(code, Code::InvalidArgument);

    // The same bytes again are new work, not "already processed".
    let second = name_is_free(&mut c, srv::meta("del.png"), &bytes).await;
    assert_ne!(second, first);
    assert_eq!(
        srv::state(&srv::wait_done(&mut c, &second).await),
        pb::TaskState::Success
    );
    // While a task for the name waits or runs, its result cannot be deleted.
    let busy = queued(
        &mut c,
        pb::UploadMetadata {
            overwrite: true,
            ..slow("del.png")
        },
        &png(96, 96, 6),
    )
    .await;
    let (code, msg) = srv::code(delete(&mut c, "del.png").await);
    assert_eq!(code, Code::FailedPrecondition, "{msg}");
    assert!(msg.contains(&busy), "{msg}");
    srv::cancel(&mut c, &busy).await.unwrap();
    srv::fetch(&mut c, "del.png")
        .await
        .expect("the older result stays");
    delete(&mut c, "del.png").await.unwrap();
    server.stop().await;
}

async fn results_expire(place: Place) {
    let mut settings = place.settings();
    settings.result_ttl_secs = Some(2);
    settings.sweep_interval_secs = 1;
    let server = Server::start_with(settings).await;
    let mut c = server.client.clone();
    let bytes = png(16, 16, 7);
    let id = queued(&mut c, srv::meta("short.png"), &bytes).await;
    srv::wait_done(&mut c, &id).await;
    srv::fetch(&mut c, "short.png")
        .await
        .expect("fresh results are kept");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match srv::fetch(&mut c, "short.png").await {
            Err(s) if s.code() == Code::NotFound => break,
            Err(s) => panic!("{s:?}"),
            Ok(_) => {}
        }
        assert!(Instant::now() < deadline, "the result never expired");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let again = name_is_free(&mut c, srv::meta("short.png"), &bytes).await;
    assert_ne!(again, id);
    server.stop().await;
}

async fn orphaned_uploads_are_swept(place: Place) {
    let mut settings = place.settings();
    settings.orphan_grace_secs = 1;
    settings.sweep_interval_secs = 1;
    let server = Server::start_with(settings).await;
    let mut c = server.client.clone();
    // A live upload that will be older than the grace period: a task waiting behind a
    // long one.
    let runner = queued(&mut c, slow("long.png"), &png(128, 128, 9)).await;
    srv::wait_running(&mut c, &runner).await;
    let waiting = queued(&mut c, srv::meta("kept.png"), &png(16, 16, 9)).await;

    // An upload whose task was never recorded (its instance died in between), planted
    // straight in the store while the server runs.
    let orphan = uuid::Uuid::new_v4().to_string();
    let planted = place.temp_dir.with_file_name("planted.png");
    std::fs::write(&planted, png(8, 8, 8)).unwrap();
    match &place.backend {
        Backend::Embedded => {
            let path = place.work_dir().join(format!("{orphan}.src"));
            std::fs::copy(&planted, &path).unwrap();
            let an_hour_ago = std::time::SystemTime::now() - Duration::from_secs(3600);
            std::fs::File::options()
                .write(true)
                .open(&path)
                .unwrap()
                .set_modified(an_hour_ago)
                .unwrap();
        }
        Backend::Real { mongo_uri, .. } => {
            mongo(&place, mongo_uri)
                .await
                .put_source(&orphan, &planted)
                .await
                .unwrap();
        }
    }
    assert!(has_source(&place, &orphan).await);
    let deadline = Instant::now() + Duration::from_secs(20);
    while has_source(&place, &orphan).await {
        assert!(
            Instant::now() < deadline,
            "the orphaned upload was never swept"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // Several sweeps later, the live one is still there and its task runs to the end.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(
        has_source(&place, &waiting).await,
        "a live upload was swept"
    );
    srv::cancel(&mut c, &runner).await.unwrap();
    assert_eq!(
        srv::state(&srv::wait_done(&mut c, &waiting).await),
        pb::TaskState::Success
    );
    server.stop().await;
}

async fn queue_positions_move(place: Place) {
    let server = Server::start(&place).await;
    let mut c = server.client.clone();
    let runner = queued(&mut c, slow("head.png"), &png(128, 128, 10)).await;
    srv::wait_running(&mut c, &runner).await;
    assert_eq!(
        get(&mut c, &runner).await.queue_position,
        0,
        "running: no place"
    );
    let mut ids = Vec::new();
    for i in 0..3u8 {
        let name = format!("q{i}.png");
        ids.push(queued(&mut c, srv::meta(&name), &png(16, 16, 20 + i)).await);
    }
    let positions = |c: srv::Client, ids: Vec<String>| async move {
        let mut c = c;
        let mut out = Vec::new();
        for id in &ids {
            out.push(get(&mut c, id).await.queue_position);
        }
        out
    };
    assert_eq!(positions(c.clone(), ids.clone()).await, [1, 2, 3]);
    let watcher = watch_all(&c, &ids[2]);
    tokio::time::sleep(Duration::from_millis(300)).await;

    // The first waiting task leaves: the others move up.
    srv::cancel(&mut c, &ids[0]).await.unwrap();
    assert_eq!(positions(c.clone(), ids[1..].to_vec()).await, [1, 2]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while get(&mut c, &ids[2]).await.queue_position != 2 {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // The head ends: the rest run in order.
    srv::cancel(&mut c, &runner).await.unwrap();
    for id in &ids[1..] {
        assert_eq!(
            srv::state(&srv::wait_done(&mut c, id).await),
            pb::TaskState::Success
        );
    }
    let seen = watcher.await.unwrap();
    let places: Vec<u32> = seen
        .iter()
        .filter(|t| srv::state(t) == pb::TaskState::Pending)
        .map(|t| t.queue_position)
        .collect();
    let mut distinct = places.clone();
    distinct.dedup();
    assert_eq!(distinct.first(), Some(&3), "{places:?}");
    assert!(distinct.contains(&2), "the watcher saw it move: {places:?}");
    assert!(
        distinct.windows(2).all(|w| w[0] > w[1]),
        "places only go down: {places:?}"
    );
    assert_eq!(srv::state(seen.last().unwrap()), pb::TaskState::Success);
    server.stop().await;
}

async fn webp_round_trip(place: Place) {
    let server = Server::start(&place).await;
    let mut c = server.client.clone();
    let bytes = png(18, 14, 11);
    let webp = queued(
        &mut c,
        pb::UploadMetadata {
            output_format: pb::OutputFormat::Webp as i32,
            ..srv::meta("lossless.png")
        },
        &bytes,
    )
    .await;
    let reference = queued(&mut c, srv::meta("reference.png"), &bytes).await;
    srv::wait_done(&mut c, &webp).await;
    srv::wait_done(&mut c, &reference).await;
    let (meta, got, _) = srv::fetch(&mut c, "lossless.png").await.unwrap();
    assert_eq!(meta.content_type, "image/webp");
    assert_eq!(&got[..4], b"RIFF");
    assert_eq!(&got[8..12], b"WEBP");
    let decoded = image::load_from_memory_with_format(&got, image::ImageFormat::WebP).unwrap();
    let (_, png_bytes, _) = srv::fetch(&mut c, "reference.png").await.unwrap();
    let expected = image::load_from_memory(&png_bytes).unwrap();
    assert_eq!((decoded.width(), decoded.height()), (72, 56));
    assert_eq!(
        decoded.to_rgb8().into_raw(),
        expected.to_rgb8().into_raw(),
        "WebP output is lossless"
    );
    // The format is part of the work: the PNG options do not match the WebP result.
    let (code, _) = srv::code(srv::upload(&mut c, srv::meta("lossless.png"), &bytes).await);
    assert_eq!(code, Code::AlreadyExists);
    server.stop().await;
}

/// A task is seen SUCCESS a moment before it frees its name (its end is recorded, then the
/// lock released). The same upload in that moment waits for the name and is told
/// ALREADY_PROCESSED, not IN_PROGRESS for a task that has ended. The moment is held open here
/// by taking the ended task's lock in Redis, as it still held it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_right_after_success_is_already_processed() {
    use upscaler::locks::{redis::RedisLocks, Acquire, LockManager};
    let Some(backend) = srv::real_backend("an_upload_right_after_success_is_already_processed")
    else {
        return;
    };
    let place = Place::new(backend);
    let server = Server::start(&place).await;
    let mut c = server.client.clone();
    let bytes = png(16, 16, 9);
    let id = queued(&mut c, srv::meta("again.png"), &bytes).await;
    assert_eq!(
        srv::state(&srv::wait_done(&mut c, &id).await),
        pb::TaskState::Success
    );
    let settings = place.settings();
    let locks = RedisLocks::connect(
        settings.redis_url.as_deref().unwrap(),
        &settings.redis_prefix,
    )
    .await
    .unwrap();
    let ttl = Duration::from_secs(30);
    assert_eq!(
        locks.acquire("again.png", &id, ttl).await.unwrap(),
        Acquire::Acquired
    );
    let started = Instant::now();
    let again = tokio::spawn({
        let mut c = c.clone();
        let bytes = bytes.clone();
        async move { srv::upload(&mut c, srv::meta("again.png"), &bytes).await }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !again.is_finished(),
        "the upload waits while the ended task holds the name"
    );
    assert!(locks.release("again.png", &id).await.unwrap());
    let again = again.await.unwrap().unwrap();
    assert_eq!(
        srv::outcome(&again),
        pb::UploadOutcome::AlreadyProcessed,
        "{again:?}"
    );
    assert_eq!(again.task_id, id);
    assert!(started.elapsed() < Duration::from_secs(5));
    server.stop().await;
}
