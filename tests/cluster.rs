//! Several `upscaler serve` processes on one Redis and one Mongo-wire server, with real
//! processes and real signals: any instance answers any RPC and work spreads over all of
//! them; an instance killed with SIGKILL mid-task loses nothing; Redis or MongoDB stopped and
//! started again while the service runs turns health to NOT_SERVING, fails calls fast with
//! UNAVAILABLE, and everything recovers by itself.
//!
//! Each test starts its own Redis (`redis-server` on PATH) and Mongo-wire server (the
//! `secantusd-py` named by `UPSCALER_TEST_SECANTUSD`) so that it can stop and restart them.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::server::{self as srv, connect, free_port};
use futures::StreamExt;
use mongodb::bson::doc;
use tonic::transport::Channel;
use tonic_health::pb::{
    health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest,
};
use upscaler::api::pb;

/// Lock and lease TTL of the test instances: a dead instance's task is claimable this soon.
const TTL_SECS: &str = "3";
const DB: &str = "upscaler_cluster";

/// A child process killed when dropped (tests stop what they start, by PID).
struct Proc(Child);

impl Proc {
    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .arg(sig)
            .arg(self.0.id().to_string())
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill {sig} {} failed", self.0.id());
    }

    /// SIGTERM (or SIGKILL), then reap.
    fn stop(mut self, sig: &str) {
        self.signal(sig);
        let _ = self.0.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_port(port: u16, what: &str) {
    for _ in 0..200 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("{what} did not open port {port}");
}

/// The path of the Mongo-wire server, or `None` (loudly) when this machine lacks one; under
/// CI a missing server fails the test.
fn secantusd(test: &str) -> Option<PathBuf> {
    let found = std::env::var_os("UPSCALER_TEST_SECANTUSD").map(PathBuf::from);
    let redis = Command::new("redis-server")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    match found {
        Some(p) if p.exists() && redis => Some(p),
        _ => common::skip_or_fail(&format!(
            "{test}: needs redis-server on PATH and UPSCALER_TEST_SECANTUSD (a Mongo-wire server); scripts/test-with-services sets both"
        )),
    }
}

/// Held by the cluster that runs now. Each cluster's instances use every core, so clusters
/// started side by side (the test harness runs tests in parallel) slow each other down past
/// the tests' time limits on a small machine; they take turns instead.
static ONE_CLUSTER_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// One Redis, one Mongo-wire server and N service instances, all on loopback.
struct Cluster {
    dir: tempfile::TempDir,
    secantusd: PathBuf,
    redis_port: u16,
    mongo_port: u16,
    redis: Option<Proc>,
    mongo: Option<Proc>,
    instances: Vec<Instance>,
    /// Last, so it is released after every process above has been stopped.
    _turn: std::sync::MutexGuard<'static, ()>,
}

struct Instance {
    port: u16,
    log: PathBuf,
    proc: Option<Proc>,
}

impl Cluster {
    async fn start(test: &str, instances: usize) -> Option<Self> {
        let secantusd = secantusd(test)?;
        // A test that failed while holding the turn poisons the lock; the next may go on.
        let turn = ONE_CLUSTER_AT_A_TIME
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut c = Self {
            dir: tempfile::tempdir().unwrap(),
            secantusd,
            redis_port: free_port(),
            mongo_port: free_port(),
            redis: None,
            mongo: None,
            instances: Vec::new(),
            _turn: turn,
        };
        c.start_redis();
        c.start_mongo();
        for i in 0..instances {
            let port = free_port();
            let log = c.dir.path().join(format!("instance-{i}.log"));
            let proc = c.spawn_instance(i, port, &log);
            c.instances.push(Instance {
                port,
                log,
                proc: Some(proc),
            });
        }
        for i in &c.instances {
            connect(i.port).await;
        }
        Some(c)
    }

    fn start_redis(&mut self) {
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(["--port", &self.redis_port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server starts");
        self.redis = Some(Proc(child));
        wait_port(self.redis_port, "redis-server");
    }

    fn start_mongo(&mut self) {
        let storage = self.dir.path().join("mongo");
        let child = Command::new(&self.secantusd)
            .args(["--host", "127.0.0.1", "--cache-size", "1G"])
            .args(["--port", &self.mongo_port.to_string()])
            .arg("--storage-path")
            .arg(&storage)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("the Mongo-wire server starts");
        self.mongo = Some(Proc(child));
        wait_port(self.mongo_port, "the Mongo-wire server");
    }

    fn mongo_uri(&self) -> String {
        format!(
            "mongodb://127.0.0.1:{}/?directConnection=true",
            self.mongo_port
        )
    }

    fn spawn_instance(&self, i: usize, port: u16, log: &Path) -> Proc {
        let root = self.dir.path().join(format!("instance-{i}"));
        let log = std::fs::File::create(log).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_upscaler"))
            .arg("serve")
            .current_dir(common::root())
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("LISTEN_ADDR", format!("127.0.0.1:{port}"))
            .env("DATA_DIR", root.join("data"))
            .env("TEMP_DIR", root.join("tmp"))
            .env("DEFAULT_MODEL", "realesrgan-x4plus")
            .env(
                "REDIS_URL",
                format!("redis://127.0.0.1:{}", self.redis_port),
            )
            .env("MONGO_URI", self.mongo_uri())
            .env("MONGO_DATABASE", DB)
            .env("LOCK_TTL_SECS", TTL_SECS)
            .env("LOG_LEVEL", "info")
            .env("LOG_FORMAT", "json")
            .env("HOSTNAME", format!("instance-{i}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        Proc(child)
    }

    async fn client(&self, i: usize) -> srv::Client {
        connect(self.instances[i].port).await
    }

    fn log(&self, i: usize) -> String {
        std::fs::read_to_string(&self.instances[i].log).unwrap_or_default()
    }

    /// The instance whose log says it started `task_id` most recently, if any.
    fn runner(&self, task_id: &str) -> Option<usize> {
        (0..self.instances.len()).find(|&i| {
            self.instances[i].proc.is_some()
                && self
                    .log(i)
                    .lines()
                    .any(|l| l.contains(task_id) && l.contains("task started"))
        })
    }

    async fn health(&self, i: usize) -> Option<ServingStatus> {
        let url = format!("http://127.0.0.1:{}", self.instances[i].port);
        let channel = Channel::from_shared(url).unwrap().connect().await.ok()?;
        let req = HealthCheckRequest {
            service: "upscaler.v1.Upscaler".into(),
        };
        let status = HealthClient::new(channel).check(req).await.ok()?;
        ServingStatus::try_from(status.into_inner().status).ok()
    }

    /// Waits until every live instance reports `want`.
    async fn wait_health(&self, want: ServingStatus, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let mut all = true;
            for i in 0..self.instances.len() {
                if self.instances[i].proc.is_some() && self.health(i).await != Some(want) {
                    all = false;
                }
            }
            if all {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "health never became {want:?} within {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn mongo(&self) -> mongodb::Database {
        mongodb::Client::with_uri_str(self.mongo_uri())
            .await
            .unwrap()
            .database(DB)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for i in 0..self.instances.len() {
                eprintln!("---- instance {i} log ----\n{}", self.log(i));
            }
        }
    }
}

fn get(id: &str) -> pb::GetTaskRequest {
    pb::GetTaskRequest { task_id: id.into() }
}

/// Uploads a small x4plus job (about `tiles` tiles of 16 px) through `client`.
async fn upload(client: &mut srv::Client, name: &str, side: u32, seed: u8) -> String {
    let meta = pb::UploadMetadata {
        tile: Some(16),
        ..srv::meta(name)
    };
    let r = srv::upload(client, meta, &srv::png(side, side, seed))
        .await
        .unwrap();
    assert_eq!(srv::outcome(&r), pb::UploadOutcome::Queued, "{r:?}");
    r.task_id
}

/// Follows a task with WatchTask until it ends; returns the states seen.
async fn watch_to_end(client: &mut srv::Client, id: &str) -> Vec<pb::Task> {
    let mut stream = client
        .watch_task(pb::WatchTaskRequest { task_id: id.into() })
        .await
        .unwrap()
        .into_inner();
    let mut seen = Vec::new();
    let limit = srv::wait_limit() * 2;
    while let Ok(Some(msg)) = tokio::time::timeout(limit, stream.next()).await {
        seen.push(msg.unwrap());
    }
    seen
}

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
    let victim = cluster.runner(&id).expect("some instance runs the task");
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
    let taker = cluster.runner(&id).expect("a survivor ran the task");
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
    // Exactly one result: one record and one blob for the name, no source left behind.
    let db = cluster.mongo().await;
    let count = |coll: &str, filter| {
        let coll = db.collection::<mongodb::bson::Document>(coll);
        async move { coll.count_documents(filter).await.unwrap() }
    };
    assert_eq!(count("results", doc! { "_id": "takeover.png" }).await, 1);
    assert_eq!(
        count("results.files", doc! { "filename": "takeover.png" }).await,
        1
    );
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
    let (meta, _, _) = srv::fetch(&mut a, "outage.png").await.unwrap();
    assert_eq!((meta.width, meta.height), (512, 512));
    // And new work is accepted again.
    let id2 = upload(&mut b, "after.png", 32, 3).await;
    let done = srv::wait_done(&mut a, &id2).await;
    assert_eq!(srv::state(&done), pb::TaskState::Success, "{done:?}");
}

impl Cluster {
    /// A client of instance `i` without waiting for its core to answer.
    async fn client_unchecked(&self, i: usize) -> srv::Client {
        let url = format!("http://127.0.0.1:{}", self.instances[i].port);
        let channel = Channel::from_shared(url).unwrap().connect().await.unwrap();
        pb::upscaler_client::UpscalerClient::new(channel)
    }
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
    let runner = cluster.runner(&id).expect("some instance runs the task");
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
