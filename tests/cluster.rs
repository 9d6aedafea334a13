//! Several `upscaler serve` processes on one Redis and one Mongo-wire server, with real
//! processes and real signals: any instance answers any RPC and work spreads over all of
//! them; an instance killed with SIGKILL mid-task loses nothing; Redis or MongoDB stopped and
//! started again while the service runs turns health to NOT_SERVING, fails calls fast with
//! UNAVAILABLE, and everything recovers by itself.
//!
//! Each test starts its own Redis (`redis-server` on PATH) and Mongo-wire server (the
//! `secantusd-py` named by `UPSCALER_TEST_SECANTUSD`) so that it can stop and restart them.

mod common;

use std::time::{Duration, Instant};

use common::cluster::{get, upload, watch_to_end, Cluster};
use common::server as srv;
use mongodb::bson::doc;
use sha2::Digest;
use tonic_health::pb::health_check_response::ServingStatus;
use upscaler::api::pb;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_instance_answers_any_rpc_and_work_spreads() {
    let Some(cluster) = Cluster::start("cluster: any instance", 3).await else {
        return;
    };
    let (mut a, mut b, mut c) = (
        cluster.client(0).await,
        cluster.client(1).await,
        cluster.client(2).await,
    );
    // Everything goes in through A; A alone could not start them all at once.
    let mut ids = Vec::new();
    for k in 0..6u8 {
        ids.push(upload(&mut a, &format!("spread-{k}.png"), 48, k).await);
    }
    // B follows each task to its end; C answers GetTask and FetchProcessed.
    for (k, id) in ids.iter().enumerate() {
        let seen = watch_to_end(&mut b, id).await;
        let last = seen.last().expect("WatchTask sent something");
        assert_eq!(srv::state(last), pb::TaskState::Success, "{seen:?}");
        let t = c.get_task(get(id)).await.unwrap().into_inner();
        assert_eq!(srv::state(&t), pb::TaskState::Success);
        let (meta, bytes, _) = srv::fetch(&mut c, &format!("spread-{k}.png"))
            .await
            .unwrap();
        assert_eq!((meta.width, meta.height), (192, 192));
        let img = image::load_from_memory(&bytes).unwrap();
        assert_eq!((img.width(), img.height()), (192, 192));
    }
    // The same name and bytes are recognised on any instance.
    let dup = srv::upload(
        &mut c,
        pb::UploadMetadata {
            tile: Some(16),
            ..srv::meta("spread-0.png")
        },
        &srv::png(48, 48, 0),
    )
    .await
    .unwrap();
    assert_eq!(srv::outcome(&dup), pb::UploadOutcome::AlreadyProcessed);
    assert_eq!(dup.task_id, ids[0]);

    let ran: Vec<usize> = (0..3)
        .map(|i| cluster.log(i).matches("task started").count())
        .collect();
    assert_eq!(ran.iter().sum::<usize>(), 6, "each task ran once: {ran:?}");
    assert!(
        ran.iter().filter(|&&n| n > 0).count() >= 2,
        "work stayed on one instance: {ran:?}"
    );
    // No upload is left in the shared store once its task ended.
    let db = cluster.mongo().await;
    let left = db
        .collection::<mongodb::bson::Document>("uploads.files")
        .count_documents(doc! {})
        .await
        .unwrap();
    assert_eq!(left, 0, "sources of finished tasks are deleted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_killed_mid_task_is_taken_over() {
    let Some(mut cluster) = Cluster::start("cluster: SIGKILL takeover", 3).await else {
        return;
    };
    let mut a = cluster.client(0).await;
    // 128x128 in 16 px tiles: 64 tiles, several seconds of work.
    let id = upload(&mut a, "takeover.png", 128, 7).await;
    srv::wait_running(&mut a, &id).await;
    let victim = cluster
        .runner(&id)
        .await
        .expect("some instance runs the task");
    let survivor = (victim + 1) % 3;
    let mut watcher = cluster.client(survivor).await;
    let watch = tokio::spawn({
        let id = id.clone();
        async move { watch_to_end(&mut watcher, &id).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    cluster.instances[victim].proc.take().unwrap().stop("-KILL");

    let seen = watch.await.unwrap();
    let last = seen.last().expect("WatchTask sent something");
    assert_eq!(srv::state(last), pb::TaskState::Success, "{seen:?}");
    let taker = cluster.runner(&id).await.expect("a survivor ran the task");
    assert_ne!(taker, victim);
    assert!(
        cluster.log(taker).contains("\"takeover\":true"),
        "the survivor took a started task over"
    );

    let mut c = cluster.client(survivor).await;
    let (meta, bytes, _) = srv::fetch(&mut c, "takeover.png").await.unwrap();
    assert_eq!(meta.task_id, id);
    assert_eq!((meta.width, meta.height), (512, 512));
    assert_eq!(bytes.len() as u64, meta.size);
    // Two runs (the victim's and the taker's, counted by the record's fencing token), of
    // which exactly one reached the store; no source is left behind.
    let record = cluster.record(&id).await.expect("the task's record");
    assert_eq!(record.get_i64("run").ok(), Some(2), "{record:?}");
    assert_eq!(cluster.stored_runs(&id), 1, "one run stored a result");
    let db = cluster.mongo().await;
    let count = |coll: &str, filter| {
        let coll = db.collection::<mongodb::bson::Document>(coll);
        async move { coll.count_documents(filter).await.unwrap() }
    };
    assert_eq!(count("uploads.files", doc! {}).await, 0);
}

/// Stops one backend while a task runs, checks health and fail-fast, starts it again and
/// checks that everything comes back and the task ends in SUCCESS.
async fn survive_outage(test: &str, which: &str) {
    let Some(mut cluster) = Cluster::start(test, 2).await else {
        return;
    };
    let mut a = cluster.client(0).await;
    let id = upload(&mut a, "outage.png", 128, 9).await;
    srv::wait_running(&mut a, &id).await;

    match which {
        "redis" => cluster.redis.take().unwrap().stop("-TERM"),
        _ => cluster.mongo.take().unwrap().stop("-TERM"),
    }
    cluster
        .wait_health(ServingStatus::NotServing, Duration::from_secs(15))
        .await;
    // Calls fail fast with UNAVAILABLE instead of hanging.
    for i in 0..2 {
        let mut c = cluster.client_unchecked(i).await;
        let began = Instant::now();
        let err = c.get_task(get(&id)).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
        assert!(
            began.elapsed() < Duration::from_secs(2),
            "took {:?}",
            began.elapsed()
        );
        let began = Instant::now();
        let err = srv::upload(&mut c, srv::meta("during.png"), &srv::png(8, 8, 1))
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
        assert!(
            began.elapsed() < Duration::from_secs(2),
            "took {:?}",
            began.elapsed()
        );
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    match which {
        "redis" => cluster.start_redis(),
        _ => cluster.start_mongo(),
    }
    cluster
        .wait_health(ServingStatus::Serving, Duration::from_secs(30))
        .await;

    // The task accepted before the outage ends in SUCCESS, seen from either instance.
    let mut b = cluster.client(1).await;
    let done = srv::wait_done(&mut b, &id).await;
    assert_eq!(srv::state(&done), pb::TaskState::Success, "{done:?}");
    let (meta, bytes, _) = srv::fetch(&mut a, "outage.png").await.unwrap();
    assert_eq!((meta.width, meta.height), (512, 512));
    assert_eq!(meta.task_id, id);
    assert_eq!(
        upscaler::tasks::types::hex(&sha2::Sha256::digest(&bytes)),
        meta.sha256
    );
    // However many runs the outage cost, exactly one reached the store, and the task's
    // upload and name were freed at its end.
    assert_eq!(cluster.stored_runs(&id), 1, "one run stored a result");
    let db = cluster.mongo().await;
    let uploads = db.collection::<mongodb::bson::Document>("uploads.files");
    assert_eq!(uploads.count_documents(doc! {}).await.unwrap(), 0);
    let again = srv::upload(
        &mut b,
        pb::UploadMetadata {
            tile: Some(16),
            ..srv::meta("outage.png")
        },
        &srv::png(128, 128, 9),
    )
    .await
    .unwrap();
    assert_eq!(
        srv::outcome(&again),
        pb::UploadOutcome::AlreadyProcessed,
        "{again:?}"
    );
    // And new work is accepted again.
    let id2 = upload(&mut b, "after.png", 32, 3).await;
    let done = srv::wait_done(&mut a, &id2).await;
    assert_eq!(srv::state(&done), pb::TaskState::Success, "{done:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_stopped_and_started_again() {
    survive_outage("cluster: Redis outage", "redis").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mongo_stopped_and_started_again() {
    survive_outage("cluster: MongoDB outage", "mongo").await;
}

/// A task running on one instance is cancelled through another: it stops at its next tile
/// on the instance that runs it, watchers on a third see CANCELLED, and nothing is left in
/// the shared store (no result, no upload, no lock). A task waiting in the shared queue is
/// cancelled by whichever instance is asked, at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_is_cancelled_through_another_instance() {
    let Some(cluster) = Cluster::start("cluster: cancel", 3).await else {
        return;
    };
    let mut a = cluster.client(0).await;
    let id = upload(&mut a, "cancelled.png", 128, 11).await;
    srv::wait_running(&mut a, &id).await;
    let runner = cluster
        .runner(&id)
        .await
        .expect("some instance runs the task");
    let (asker, watcher) = ((runner + 1) % 3, (runner + 2) % 3);
    let mut w = cluster.client(watcher).await;
    let watch = tokio::spawn({
        let id = id.clone();
        async move { watch_to_end(&mut w, &id).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;

    let mut c = cluster.client(asker).await;
    let asked = Instant::now();
    let t = srv::cancel(&mut c, &id).await.unwrap();
    let took = asked.elapsed();
    eprintln!("cancel latency through another instance (x4plus, tiles of 16): {took:?}");
    assert_eq!(srv::state(&t), pb::TaskState::Cancelled, "{t:?}");
    assert!(!t.cancel_requested);
    assert!(t.tiles_done < t.tiles_total, "it stopped early: {t:?}");
    let seen = watch.await.unwrap();
    assert_eq!(
        srv::state(seen.last().unwrap()),
        pb::TaskState::Cancelled,
        "{seen:?}"
    );
    assert!(
        cluster.log(runner).contains("task cancelled"),
        "the instance running it stopped it"
    );
    // It does not come back: no other instance takes it over and stores a result.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let t = c.get_task(get(&id)).await.unwrap().into_inner();
    assert_eq!(srv::state(&t), pb::TaskState::Cancelled);
    let (code, _) = srv::code(srv::fetch(&mut a, "cancelled.png").await);
    assert_eq!(
        code,
        tonic::Code::NotFound,
        "a cancelled task stores nothing"
    );
    let db = cluster.mongo().await;
    let count = |coll: &str| {
        let coll = db.collection::<mongodb::bson::Document>(coll);
        async move { coll.count_documents(doc! {}).await.unwrap() }
    };
    assert_eq!(count("results").await, 0);
    assert_eq!(count("uploads.files").await, 0, "the upload is deleted");
    let started: usize = (0..3)
        .map(|i| cluster.log(i).matches("task started").count())
        .sum();
    assert_eq!(started, 1, "the task ran once and was not taken over");

    // The name is free at once: the same upload through the third instance is new work.
    let mut b = cluster.client(watcher).await;
    let again = upload(&mut b, "cancelled.png", 32, 11).await;
    assert_ne!(again, id);
    let done = srv::wait_done(&mut b, &again).await;
    assert_eq!(srv::state(&done), pb::TaskState::Success, "{done:?}");
}
