//! Faults with real processes: three `upscaler serve` instances on one Redis and one
//! Mongo-wire server, paused with SIGSTOP (at a tile, or at a failpoint between the last
//! tile and the result write), run with a clock 25 s ahead, cut off from Redis or from the
//! store. Each case checks what a user sees: the stored image's sha256, how many runs
//! reached the store (from the instances' logs, so a double write shows), the tasks' states
//! and the name's lock.
//!
//! Needs the failpoints: `cargo test --features failpoints --test faults` (the README's
//! test command builds with them), `redis-server`, `faketime` and the Mongo-wire server
//! named by `UPSCALER_TEST_SECANTUSD` (scripts/test-with-services provides all).

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::cluster::{get, Cluster, Launch};
use common::server::{self as srv, Client};
use mongodb::bson::{doc, Document};
use sha2::{Digest, Sha256};
use upscaler::api::pb;

fn sha(bytes: &[u8]) -> String {
    upscaler::tasks::types::hex(&Sha256::digest(bytes))
}

/// Whether this build has the failpoints; without them a test that needs one skips loudly
/// (or fails under CI).
fn failpoints(test: &str) -> bool {
    cfg!(feature = "failpoints")
        || common::skip_or_fail::<()>(&format!(
            "{test}: needs a build with `--features failpoints` (scripts/test-with-services has it)"
        ))
        .is_some()
}

/// Uploads `png(side, side, seed)` as `name` in tiles of 16; returns the answer.
async fn send(
    client: &mut Client,
    name: &str,
    side: u32,
    seed: u8,
    overwrite: bool,
) -> pb::UploadImageResponse {
    let meta = pb::UploadMetadata {
        tile: Some(16),
        overwrite,
        ..srv::meta(name)
    };
    srv::upload(client, meta, &srv::png(side, side, seed))
        .await
        .unwrap()
}

async fn queued(client: &mut Client, name: &str, side: u32, seed: u8, overwrite: bool) -> String {
    let r = send(client, name, side, seed, overwrite).await;
    assert_eq!(srv::outcome(&r), pb::UploadOutcome::Queued, "{r:?}");
    r.task_id
}

async fn state_of(client: &mut Client, id: &str) -> pb::TaskState {
    srv::state(&client.get_task(get(id)).await.unwrap().into_inner())
}

/// The sha256 of the result stored under `name`, checked against its own metadata.
async fn stored_sha(client: &mut Client, name: &str) -> (String, String) {
    let (meta, bytes, _) = srv::fetch(client, name).await.unwrap();
    assert_eq!(bytes.len() as u64, meta.size);
    let got = sha(&bytes);
    assert_eq!(got, meta.sha256, "the bytes are the ones described");
    (got, meta.task_id)
}

/// The record's run counter (the fencing token: how many runs the task had).
async fn runs(cluster: &Cluster, id: &str) -> i64 {
    let record = cluster.record(id).await.expect("the task's record");
    match record.get("run") {
        Some(mongodb::bson::Bson::Int32(n)) => i64::from(*n),
        Some(mongodb::bson::Bson::Int64(n)) => *n,
        other => panic!("run is {other:?} in {record:?}"),
    }
}

/// libfaketime's multi-threaded library (Debian's `faketime` package), or a loud skip.
fn libfaketime(test: &str) -> Option<std::path::PathBuf> {
    let found = std::fs::read_dir("/usr/lib").ok().and_then(|dirs| {
        dirs.flatten()
            .map(|d| d.path().join("faketime/libfaketimeMT.so.1"))
            .find(|p| p.exists())
    });
    found.or_else(|| {
        common::skip_or_fail(&format!(
            "{test}: needs libfaketime (apt-get install faketime; scripts/test-with-services does)"
        ))
    })
}

/// Who holds the file-name lock of `name` in Redis, if anyone.
fn lock_holder(cluster: &Cluster, name: &str) -> Option<String> {
    let out = Command::new("redis-cli")
        .args(["-p", &cluster.redis_port.to_string(), "--raw", "GET"])
        .arg(format!("upscaler:lock:{name}"))
        .output()
        .expect("redis-cli runs");
    let holder = String::from_utf8_lossy(&out.stdout).trim().to_string();
    (!holder.is_empty()).then_some(holder)
}

/// Waits until some instance's log has a line with all of `parts`; returns that instance.
async fn wait_log(cluster: &Cluster, parts: &[&str], within: Duration) -> usize {
    let deadline = Instant::now() + within;
    loop {
        for i in 0..cluster.instances.len() {
            if cluster
                .log(i)
                .lines()
                .any(|l| parts.iter().all(|p| l.contains(p)))
            {
                return i;
            }
        }
        assert!(
            Instant::now() < deadline,
            "no instance logged {parts:?} within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A task paused on one instance past its lease is taken over and finished elsewhere; an
/// overwrite of the name then finishes too; the paused instance wakes. `at_failpoint`: the
/// pause falls between the last tile and the result write, else during the network pass.
async fn paused_run_is_fenced(test: &str, at_failpoint: bool) {
    if at_failpoint && !failpoints(test) {
        return;
    }
    let env = if at_failpoint {
        // Every instance waits 3 s the first time it reaches the swap of a result, past
        // every check of its run: long enough to be stopped there.
        vec![(
            "FAILPOINTS".to_string(),
            "result-swap=1*return(3000)".to_string(),
        )]
    } else {
        Vec::new()
    };
    let launch = Launch {
        env,
        ..Launch::default()
    };
    let Some(cluster) = Cluster::start_with(test, vec![launch; 3]).await else {
        return;
    };
    let name = "fenced.png";
    let mut a = cluster.client(0).await;
    // Long enough to be caught mid-pass; at the failpoint the length does not matter.
    let side = if at_failpoint { 48 } else { 96 };
    let id = queued(&mut a, name, side, 5, false).await;
    let victim = if at_failpoint {
        wait_log(
            &cluster,
            &[&id, "paused at a failpoint", "result-swap"],
            srv::wait_limit(),
        )
        .await
    } else {
        srv::wait_running(&mut a, &id).await;
        cluster.runner(&id).await.expect("some instance runs it")
    };
    cluster.instances[victim]
        .proc
        .as_ref()
        .unwrap()
        .signal("-STOP");
    let other = (victim + 1) % 3;
    let mut b = cluster.client(other).await;

    // Taken over after the lease runs out, and finished.
    let done = srv::wait_done(&mut b, &id).await;
    assert_eq!(srv::state(&done), pb::TaskState::Success, "{done:?}");
    assert_eq!(runs(&cluster, &id).await, 2, "a second run finished it");
    let (first, made_by) = stored_sha(&mut b, name).await;
    assert_eq!(made_by, id);

    // An overwrite with other bytes finishes too: its image is the newest.
    let newer = queued(&mut b, name, 32, 77, true).await;
    let done = srv::wait_done(&mut b, &newer).await;
    assert_eq!(srv::state(&done), pb::TaskState::Success, "{done:?}");
    let (newest, made_by) = stored_sha(&mut b, name).await;
    assert_eq!(made_by, newer);
    assert_ne!(newest, first);

    // The paused instance wakes with a run that is no longer the task's.
    cluster.instances[victim]
        .proc
        .as_ref()
        .unwrap()
        .signal("-CONT");
    wait_stale_run_ended(&cluster, victim, &id).await;
    // Give its lock renewal a round or two to (wrongly) take the name.
    tokio::time::sleep(Duration::from_secs(3)).await;

    let (after, made_by) = stored_sha(&mut b, name).await;
    assert_eq!(after, newest, "the newest image stays");
    assert_eq!(made_by, newer);
    assert_eq!(
        cluster.stored_runs(&id),
        1,
        "exactly one run of the task stored"
    );
    assert_eq!(cluster.stored_runs(&newer), 1);
    assert_eq!(
        lock_holder(&cluster, name),
        None,
        "the woken run took no lock"
    );
    assert!(
        !cluster
            .log(victim)
            .contains("took the vanished file-name lock back"),
        "{}",
        cluster.log(victim)
    );
    assert_eq!(state_of(&mut b, &id).await, pb::TaskState::Success);
    assert_eq!(state_of(&mut b, &newer).await, pb::TaskState::Success);
    // The same upload as the newest, right after, is recognised as done.
    let mut woken = cluster.client(victim).await;
    let again = send(&mut woken, name, 32, 77, true).await;
    assert_eq!(
        srv::outcome(&again),
        pb::UploadOutcome::AlreadyProcessed,
        "{again:?}"
    );
    assert_eq!(again.task_id, newer);
}

/// Waits until instance `victim` logged that its run of `id` ended without being recorded:
/// its lease or its name went to another run, or the store refused its stale write.
async fn wait_stale_run_ended(cluster: &Cluster, victim: usize, id: &str) {
    let ends = [
        "dropping it here",
        "this one stores nothing",
        "not recording its end",
    ];
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cluster
        .log(victim)
        .lines()
        .any(|l| l.contains(id) && ends.iter().any(|e| l.contains(e)))
    {
        assert!(
            Instant::now() < deadline,
            "the woken instance {victim} did not end its stale run of {id}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_paused_during_the_network_pass_writes_nothing() {
    paused_run_is_fenced("faults: SIGSTOP during the network pass", false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_paused_before_its_result_write_writes_nothing() {
    paused_run_is_fenced("faults: SIGSTOP between the last tile and the write", true).await;
}

/// A running task whose file-name lock another task took (here planted straight into Redis,
/// naming a real task) stops at its next tile and ends FAILURE with nothing stored, instead
/// of storing a second result under the name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_that_loses_its_name_stops_and_stores_nothing() {
    let Some(cluster) = Cluster::start("faults: name lock lost", 3).await else {
        return;
    };
    let mut a = cluster.client(0).await;
    let other = queued(&mut a, "other.png", 16, 60, false).await;
    assert_eq!(
        srv::state(&srv::wait_done(&mut a, &other).await),
        pb::TaskState::Success
    );
    let id = queued(&mut a, "lost.png", 128, 61, false).await;
    srv::wait_running(&mut a, &id).await;
    let set = Command::new("redis-cli")
        .args([
            "-p",
            &cluster.redis_port.to_string(),
            "SET",
            "upscaler:lock:lost.png",
        ])
        .args([other.as_str(), "PX", "60000"])
        .status()
        .unwrap();
    assert!(set.success());
    let done = srv::wait_done(&mut a, &id).await;
    assert_eq!(srv::state(&done), pb::TaskState::Failure, "{done:?}");
    assert!(done.error.contains("taken over"), "{done:?}");
    assert!(
        done.tiles_done < done.tiles_total,
        "it stopped early: {done:?}"
    );
    assert_eq!(cluster.stored_runs(&id), 0);
    let (code, _) = srv::code(srv::fetch(&mut a, "lost.png").await);
    assert_eq!(code, tonic::Code::NotFound, "nothing stored under the name");
    assert_eq!(
        lock_holder(&cluster, "lost.png"),
        Some(other),
        "the other's lock stays"
    );
}

/// An instance whose clock runs 25 s ahead (libfaketime) sees every lease as lapsed by its
/// own clock; leases are dated by the store's clock, so it steals none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_with_its_clock_ahead_steals_no_lease() {
    let test = "faults: clock 25 s ahead";
    let Some(lib) = libfaketime(test) else {
        return;
    };
    // libfaketime preloaded into the server itself (the `faketime` command would stand
    // between the test's signals and the server); its wall clock only, timers keep the
    // real monotonic clock.
    let skewed = Launch {
        env: vec![
            ("LD_PRELOAD".into(), lib.display().to_string()),
            ("FAKETIME".into(), "+25s".into()),
            ("FAKETIME_DONT_FAKE_MONOTONIC".into(), "1".into()),
        ],
        ..Launch::default()
    };
    let launches = vec![Launch::default(), Launch::default(), skewed];
    let Some(mut cluster) = Cluster::start_with(test, launches).await else {
        return;
    };
    // The skewed instance's clock is really ahead: its first log line, written at about the
    // same time as instance 0's, is dated about 25 s later.
    let first_second = |i: usize| -> i64 {
        let log = cluster.log(i);
        let line = log.lines().next().expect("a log line");
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        // "YYYY-MM-DDTHH:MM:SS.ffffffZ": seconds into the day.
        let t = v["timestamp"].as_str().unwrap();
        let hms: Vec<i64> = t[11..19].split(':').map(|n| n.parse().unwrap()).collect();
        hms[0] * 3600 + hms[1] * 60 + hms[2]
    };
    let ahead = (first_second(2) - first_second(0)).rem_euclid(86_400);
    assert!((20..=40).contains(&ahead), "the clock is {ahead} s ahead");

    // Stopped while the others take the task, so that it cannot claim it fairly first.
    cluster.instances[2].proc.as_ref().unwrap().signal("-STOP");
    let mut a = cluster.client(0).await;
    let id = queued(&mut a, "skew.png", 128, 21, false).await;
    srv::wait_running(&mut a, &id).await;
    let runner = cluster.runner(&id).await.expect("some instance runs it");
    assert_ne!(runner, 2);
    cluster.instances[2].proc.as_ref().unwrap().signal("-CONT");

    let done = srv::wait_done(&mut a, &id).await;
    assert_eq!(srv::state(&done), pb::TaskState::Success, "{done:?}");
    assert_eq!(runs(&cluster, &id).await, 1, "nobody took the live lease");
    assert_eq!(cluster.stored_runs(&id), 1);
    assert!(
        !cluster.log(2).contains("\"takeover\":true"),
        "{}",
        cluster.log(2)
    );
    // It still works: a task sent to it alone finishes once.
    for i in [0, 1] {
        cluster.instances[i].proc.as_ref().unwrap().signal("-STOP");
    }
    let mut c = cluster.client(2).await;
    let own = queued(&mut c, "skew-own.png", 32, 3, false).await;
    let done = srv::wait_done(&mut c, &own).await;
    assert_eq!(srv::state(&done), pb::TaskState::Success, "{done:?}");
    for i in [0, 1] {
        cluster.instances[i].proc.as_ref().unwrap().signal("-CONT");
    }
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(
        runs(&cluster, &own).await,
        1,
        "the others did not take it from it"
    );
    assert_eq!(cluster.stored_runs(&own), 1);
    cluster.instances[2].proc.take().unwrap().stop("-TERM");
}

/// Redis restarts (every lock gone) while one task runs and another waits: an upload of
/// either name right after hears IN_PROGRESS, and both tasks end SUCCESS, each stored once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restart_loses_no_name() {
    let Some(mut cluster) = Cluster::start("faults: Redis restart", 3).await else {
        return;
    };
    // Only instance 0 works, so the second task waits behind the first.
    for i in [1, 2] {
        cluster.instances[i].proc.as_ref().unwrap().signal("-STOP");
    }
    let mut a = cluster.client(0).await;
    let running = queued(&mut a, "running.png", 128, 31, false).await;
    srv::wait_running(&mut a, &running).await;
    let waiting = queued(&mut a, "waiting.png", 32, 32, false).await;
    assert_eq!(state_of(&mut a, &waiting).await, pb::TaskState::Pending);
    assert_eq!(lock_holder(&cluster, "waiting.png"), Some(waiting.clone()));

    cluster.redis.take().unwrap().stop("-TERM");
    cluster.start_redis();
    // Right after: instance 0 answers again, and the names are still taken.
    let deadline = Instant::now() + Duration::from_secs(20);
    let answer = loop {
        let meta = pb::UploadMetadata {
            tile: Some(16),
            ..srv::meta("waiting.png")
        };
        match srv::upload(&mut a, meta, &srv::png(40, 40, 99)).await {
            Ok(r) => break r,
            Err(e) if e.code() == tonic::Code::Unavailable && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Err(e) => panic!("{e:?}"),
        }
    };
    assert_eq!(
        srv::outcome(&answer),
        pb::UploadOutcome::InProgress,
        "{answer:?}"
    );
    assert_eq!(answer.task_id, waiting);
    let answer = send(&mut a, "running.png", 40, 98, true).await;
    assert_eq!(
        srv::outcome(&answer),
        pb::UploadOutcome::InProgress,
        "{answer:?}"
    );
    assert_eq!(answer.task_id, running);

    for i in [1, 2] {
        cluster.instances[i].proc.as_ref().unwrap().signal("-CONT");
    }
    for (id, name) in [(&running, "running.png"), (&waiting, "waiting.png")] {
        let done = srv::wait_done(&mut a, id).await;
        assert_eq!(srv::state(&done), pb::TaskState::Success, "{done:?}");
        assert_eq!(cluster.stored_runs(id), 1);
        let (_, made_by) = stored_sha(&mut a, name).await;
        assert_eq!(&made_by, id);
    }
    // Both names are free again.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(lock_holder(&cluster, "running.png"), None);
    assert_eq!(lock_holder(&cluster, "waiting.png"), None);
}

/// The Mongo-wire server is killed (SIGKILL) while an instance writes a result, between the
/// upload of its bytes and the swap, and started again: the result is never a document
/// pointing at missing bytes; the task runs again and is stored once, whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_killed_mid_result_write_leaves_no_broken_result() {
    if !failpoints("faults: store killed") {
        return;
    }
    let launch = Launch {
        env: vec![(
            "FAILPOINTS".to_string(),
            "result-uploaded=1*return(3000)".to_string(),
        )],
        ..Launch::default()
    };
    let Some(mut cluster) = Cluster::start_with("faults: store killed", vec![launch; 3]).await
    else {
        return;
    };
    let mut a = cluster.client(0).await;
    let id = queued(&mut a, "killed.png", 48, 41, false).await;
    wait_log(
        &cluster,
        &[&id, "paused at a failpoint", "result-uploaded"],
        srv::wait_limit(),
    )
    .await;
    cluster.mongo.take().unwrap().stop("-KILL");
    tokio::time::sleep(Duration::from_secs(4)).await;
    cluster.start_mongo();

    let deadline = Instant::now() + srv::wait_limit() * 2;
    let done = loop {
        match a.get_task(get(&id)).await {
            Ok(t)
                if matches!(
                    srv::state(t.get_ref()),
                    pb::TaskState::Success | pb::TaskState::Failure
                ) =>
            {
                break t.into_inner()
            }
            _ => {}
        }
        assert!(Instant::now() < deadline, "the task never ended");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(srv::state(&done), pb::TaskState::Success, "{done:?}");
    assert_eq!(cluster.stored_runs(&id), 1, "one run stored it");
    let (_, made_by) = stored_sha(&mut a, "killed.png").await;
    assert_eq!(made_by, id);
    // Every result document names bytes that exist, whole.
    let db = cluster.mongo().await;
    let results: Vec<Document> = {
        use futures::TryStreamExt;
        db.collection::<Document>("results")
            .find(doc! {})
            .await
            .unwrap()
            .try_collect()
            .await
            .unwrap()
    };
    assert_eq!(results.len(), 1);
    for r in &results {
        let blob = r.get_object_id("blob_id").unwrap();
        let file = db
            .collection::<Document>("results.files")
            .find_one(doc! { "_id": blob })
            .await
            .unwrap()
            .expect("the result's bytes exist");
        let size = r
            .get_i64("size")
            .unwrap_or_else(|_| r.get_i32("size").unwrap().into());
        let length = file
            .get_i64("length")
            .unwrap_or_else(|_| file.get_i32("length").unwrap().into());
        assert_eq!(length, size);
    }
}

/// Two instances on one host, both with the default TEMP_DIR under one `$TMPDIR`: one
/// starting while the other receives an upload leaves that upload alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_sharing_the_default_temp_dir_keep_their_uploads() {
    let tmp = tempfile::tempdir().unwrap();
    let launch = Launch {
        env: vec![("TMPDIR".into(), tmp.path().display().to_string())],
        default_temp_dir: true,
    };
    let Some(mut cluster) =
        Cluster::start_with("faults: one default TEMP_DIR", vec![launch; 3]).await
    else {
        return;
    };
    // A slow upload into instance 0: half its bytes now, the rest later.
    let bytes = srv::png(64, 64, 51);
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    use pb::upload_image_request::Payload;
    let message = |payload| pb::UploadImageRequest {
        payload: Some(payload),
    };
    tx.send(message(Payload::Metadata(pb::UploadMetadata {
        tile: Some(16),
        ..srv::meta("shared-tmp.png")
    })))
    .unwrap();
    let half = bytes.len() / 2;
    tx.send(message(Payload::Chunk(bytes[..half].to_vec())))
        .unwrap();
    let mut a = cluster.client(0).await;
    let call = tokio::spawn(async move {
        a.upload_image(tokio_stream::wrappers::UnboundedReceiverStream::new(rx))
            .await
    });
    let root = tmp.path().join("upscaler");
    let parts = || {
        walk(&root)
            .into_iter()
            .filter(|p| p.ends_with(".part"))
            .collect::<Vec<_>>()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while parts().is_empty() {
        assert!(
            Instant::now() < deadline,
            "the upload never reached TEMP_DIR"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Instance 1 restarts (recovery runs) and instance 2 goes away for good (its folder
    // is then someone else's to clear).
    cluster.instances[1].proc.take().unwrap().stop("-TERM");
    cluster.instances[2].proc.take().unwrap().stop("-KILL");
    cluster.restart(1).await;
    assert_eq!(parts().len(), 1, "the upload in flight is still there");
    tx.send(message(Payload::Chunk(bytes[half..].to_vec())))
        .unwrap();
    drop(tx);
    let r = call.await.unwrap().unwrap().into_inner();
    assert_eq!(srv::outcome(&r), pb::UploadOutcome::Queued, "{r:?}");
    let mut a = cluster.client(0).await;
    let done = srv::wait_done(&mut a, &r.task_id).await;
    assert_eq!(srv::state(&done), pb::TaskState::Success, "{done:?}");
    // Each live instance has its own folder; the dead one's was cleared by the restart.
    let folders: Vec<String> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(folders.len(), 2, "{folders:?}");
    assert!(
        folders.iter().all(|f| f.starts_with("instance-")),
        "{folders:?}"
    );
}

/// Every file under `dir`, as paths relative to nothing (strings).
fn walk(dir: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p.display().to_string());
            }
        }
    }
    out
}

/// The swap of a result document succeeds on the server but its reply is lost (a failpoint
/// turns the reply into an error): the writer reads the document back, sees its own blob
/// and keeps it, rather than deleting bytes that the stored result points to.
#[tokio::test]
async fn a_result_swap_whose_reply_is_lost_keeps_its_bytes() {
    let test = "faults: swap reply lost";
    if !failpoints(test) {
        return;
    }
    let uri = match std::env::var("UPSCALER_TEST_MONGO_URI") {
        Ok(uri) if !uri.is_empty() => uri,
        _ => {
            common::skip_or_fail::<()>(&format!("{test}: needs UPSCALER_TEST_MONGO_URI"));
            return;
        }
    };
    use upscaler::store::{mongo::MongoStore, ResultStore};
    use upscaler::tasks::types::{Replaces, ResultMeta};
    let db_name = format!("upscaler_faults_{}", uuid::Uuid::new_v4().simple());
    let store = MongoStore::connect(&uri, &db_name, Duration::from_secs(3600))
        .await
        .unwrap();
    let result = |bytes: &[u8]| ResultMeta {
        file_name: "lost-reply.png".into(),
        content_type: "image/png".into(),
        size: bytes.len() as u64,
        width: 1,
        height: 1,
        sha256: sha(bytes),
        fingerprint: "f".into(),
        model: "m".into(),
        task_id: sha(bytes),
        created_at_ms: 0,
        run: 1,
    };
    let (old, new) = (vec![1u8; 300_000], vec![2u8; 400_000]);
    store
        .put(
            &result(&old),
            old.clone(),
            &Replaces::Nothing,
            &upscaler::store::Fence::NONE,
        )
        .await
        .unwrap();
    #[cfg(feature = "failpoints")]
    fail::cfg("result-swap-reply-lost", "1*return").unwrap();
    let replaces = Replaces::Result(sha(&old));
    let put = store
        .put(
            &result(&new),
            new.clone(),
            &replaces,
            &upscaler::store::Fence::NONE,
        )
        .await;
    #[cfg(feature = "failpoints")]
    fail::remove("result-swap-reply-lost");
    put.expect("the swap was applied: the write counts as done");
    let (meta, mut chunks) = store.open("lost-reply.png").await.unwrap().unwrap();
    let mut read = Vec::new();
    while let Some(chunk) = futures::StreamExt::next(&mut chunks).await {
        read.extend(chunk.expect("the stored result's bytes exist"));
    }
    assert_eq!(meta.sha256, sha(&new));
    assert!(read == new);
    mongodb::Client::with_uri_str(&uri)
        .await
        .unwrap()
        .database(&db_name)
        .drop()
        .await
        .unwrap();
}
