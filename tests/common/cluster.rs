//! A cluster on loopback for the process tests: one Redis, one Mongo-wire server and N
//! `upscaler serve` instances, each of which a test can stop, pause or restart.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures::StreamExt;
use mongodb::bson::{doc, Document};
use tonic::transport::Channel;
use tonic_health::pb::{
    health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest,
};
use upscaler::api::pb;

use super::server::{self as srv, connect, free_port};

/// Lock and lease TTL of the test instances: a dead instance's task is claimable this soon.
pub const TTL_SECS: &str = "3";
pub const DB: &str = "upscaler_cluster";

/// A child process killed when dropped (tests stop what they start, by PID).
pub struct Proc(pub Child);

impl Proc {
    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .arg(sig)
            .arg(self.0.id().to_string())
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill {sig} {} failed", self.0.id());
    }

    /// SIGTERM (or SIGKILL), then reap.
    pub fn stop(mut self, sig: &str) {
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

pub fn wait_port(port: u16, what: &str) {
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
pub fn secantusd(test: &str) -> Option<PathBuf> {
    let found = std::env::var_os("UPSCALER_TEST_SECANTUSD").map(PathBuf::from);
    let redis = Command::new("redis-server")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    match found {
        Some(p) if p.exists() && redis => Some(p),
        _ => super::skip_or_fail(&format!(
            "{test}: needs redis-server on PATH and UPSCALER_TEST_SECANTUSD (a Mongo-wire server); scripts/test-with-services sets both"
        )),
    }
}

/// Held by the cluster that runs now. Each cluster's instances use every core, so clusters
/// started side by side (the test harness runs tests in parallel) slow each other down past
/// the tests' time limits on a small machine; they take turns instead.
static ONE_CLUSTER_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// One Redis, one Mongo-wire server and N service instances, all on loopback.
pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub secantusd: PathBuf,
    pub redis_port: u16,
    pub mongo_port: u16,
    pub redis: Option<Proc>,
    pub mongo: Option<Proc>,
    pub instances: Vec<Instance>,
    /// Last, so it is released after every process above has been stopped.
    _turn: std::sync::MutexGuard<'static, ()>,
}

pub struct Instance {
    pub port: u16,
    pub log: PathBuf,
    pub proc: Option<Proc>,
    pub launch: Launch,
}

/// How an instance is started, beyond the cluster's settings.
#[derive(Clone, Default)]
pub struct Launch {
    /// More environment (FAILPOINTS, TMPDIR, ...).
    pub env: Vec<(String, String)>,
    /// Leave TEMP_DIR unset: the default under `$TMPDIR`.
    pub default_temp_dir: bool,
}

impl Cluster {
    pub async fn start(test: &str, instances: usize) -> Option<Self> {
        Self::start_with(test, vec![Launch::default(); instances]).await
    }

    /// A cluster whose instance `i` is started as `launches[i]` says.
    pub async fn start_with(test: &str, launches: Vec<Launch>) -> Option<Self> {
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
        for (i, launch) in launches.into_iter().enumerate() {
            let port = free_port();
            let log = c.dir.path().join(format!("instance-{i}.log"));
            c.instances.push(Instance {
                port,
                log,
                proc: None,
                launch,
            });
            c.instances[i].proc = Some(c.spawn_instance(i));
        }
        for i in &c.instances {
            connect(i.port).await;
        }
        Some(c)
    }

    /// Starts instance `i` again (after `proc.take()...stop`), appending to its log.
    pub async fn restart(&mut self, i: usize) {
        assert!(self.instances[i].proc.is_none(), "instance {i} still runs");
        self.instances[i].proc = Some(self.spawn_instance(i));
        connect(self.instances[i].port).await;
    }

    pub fn start_redis(&mut self) {
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

    pub fn start_mongo(&mut self) {
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

    pub fn mongo_uri(&self) -> String {
        format!(
            "mongodb://127.0.0.1:{}/?directConnection=true",
            self.mongo_port
        )
    }

    pub fn spawn_instance(&self, i: usize) -> Proc {
        let Instance {
            port, log, launch, ..
        } = &self.instances[i];
        let root = self.dir.path().join(format!("instance-{i}"));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        let mut command = Command::new(env!("CARGO_BIN_EXE_upscaler"));
        command
            .arg("serve")
            .current_dir(super::root())
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("LISTEN_ADDR", format!("127.0.0.1:{port}"))
            .env("DATA_DIR", root.join("data"))
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
            .env("HOSTNAME", format!("instance-{i}"));
        if !launch.default_temp_dir {
            command.env("TEMP_DIR", root.join("tmp"));
        }
        command.envs(launch.env.iter().map(|(k, v)| (k, v)));
        let child = command.stdout(Stdio::null()).stderr(log).spawn().unwrap();
        Proc(child)
    }

    pub async fn client(&self, i: usize) -> srv::Client {
        connect(self.instances[i].port).await
    }

    pub fn log(&self, i: usize) -> String {
        std::fs::read_to_string(&self.instances[i].log).unwrap_or_default()
    }

    /// The instance that holds (or, once the task ended, last held) the task's lease, read
    /// from its record: lease owners are named `instance-{i}-…/{worker}`.
    pub async fn runner(&self, task_id: &str) -> Option<usize> {
        let record = self.record(task_id).await?;
        let owner = record.get_str("lease_owner").ok()?;
        owner
            .strip_prefix("instance-")?
            .split('-')
            .next()?
            .parse()
            .ok()
    }

    /// How many runs of `task_id` stored a result, by every instance's log (those of stopped
    /// instances included).
    pub fn stored_runs(&self, task_id: &str) -> usize {
        (0..self.instances.len())
            .map(|i| {
                self.log(i)
                    .lines()
                    .filter(|l| l.contains(task_id) && l.contains("result stored"))
                    .count()
            })
            .sum()
    }

    /// The task's record as stored.
    pub async fn record(&self, task_id: &str) -> Option<Document> {
        self.mongo()
            .await
            .collection::<Document>("tasks")
            .find_one(doc! { "_id": task_id })
            .await
            .expect("the Mongo-wire server answers")
    }

    pub async fn health(&self, i: usize) -> Option<ServingStatus> {
        let url = format!("http://127.0.0.1:{}", self.instances[i].port);
        let channel = Channel::from_shared(url).unwrap().connect().await.ok()?;
        let req = HealthCheckRequest {
            service: "upscaler.v1.Upscaler".into(),
        };
        let status = HealthClient::new(channel).check(req).await.ok()?;
        ServingStatus::try_from(status.into_inner().status).ok()
    }

    /// Waits until every live instance reports `want`.
    pub async fn wait_health(&self, want: ServingStatus, within: Duration) {
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

    pub async fn mongo(&self) -> mongodb::Database {
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

pub fn get(id: &str) -> pb::GetTaskRequest {
    pb::GetTaskRequest { task_id: id.into() }
}

/// Uploads a small x4plus job (about `tiles` tiles of 16 px) through `client`.
pub async fn upload(client: &mut srv::Client, name: &str, side: u32, seed: u8) -> String {
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
pub async fn watch_to_end(client: &mut srv::Client, id: &str) -> Vec<pb::Task> {
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

impl Cluster {
    /// A client of instance `i` without waiting for its core to answer.
    pub async fn client_unchecked(&self, i: usize) -> srv::Client {
        let url = format!("http://127.0.0.1:{}", self.instances[i].port);
        let channel = Channel::from_shared(url).unwrap().connect().await.unwrap();
        pb::upscaler_client::UpscalerClient::new(channel)
    }
}
