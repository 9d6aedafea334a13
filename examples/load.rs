//! A load generator for the upscaler service, meant for loopback runs against one or more
//! instances that share their Redis and Mongo backends (see `scripts/load-test`).
//!
//! It sends a bounded flood of `--uploads` uploads, `--concurrency` at a time, spread
//! round-robin over the `--addr` list, then follows every task it was given until the task
//! ends, and prints a summary (or one JSON object with `--json`).
//!
//! The flood mixes three kinds of upload:
//! - fresh: a small random PNG (`--min-size`..`--max-size` pixels a side, one in eight with
//!   alpha) under a name unique to this run; must be answered QUEUED;
//! - duplicates (`--dup-percent`): the same bytes under a name already accepted in this run
//!   (a fresh upload instead while none is); must be answered QUEUED, IN_PROGRESS or
//!   ALREADY_PROCESSED, with the id of a task made for that name unless QUEUED;
//! - bad (`--bad-percent`): garbage under a .png name, a PNG under a .jpg or a .gif name, or a
//!   truncated PNG; must be refused with INVALID_ARGUMENT.
//!
//! RESOURCE_EXHAUSTED (queue full) is a legitimate answer under load: it is counted, and with
//! `--retry-full N` the upload is tried again up to N times after a growing backoff.
//!
//! The run fails (exit status 1) when an invariant does not hold: an RPC answered with any
//! other code, a bad upload accepted, a fresh upload not answered QUEUED, a duplicate answered
//! with a task unknown for its name, a task of a valid image that ended in FAILURE, or a task
//! still unfinished when `--timeout-secs` runs out. Exit status 2: bad arguments, or a server
//! that could not be reached (or did not become ready within `--wait-ready`).
//!
//! ```text
//! cargo build --release --example load
//! target/release/examples/load --addr http://127.0.0.1:50051,http://127.0.0.1:50052 \
//!     --uploads 500 --concurrency 32 --dup-percent 10 --bad-percent 5
//! ```
//!
//! Timing notes: upload latency is the client-side time of each UploadImage RPC, from the
//! call to its answer, streaming the bytes included, for every RPC sent (retries and refusals
//! included). "Finished per minute" spans the first upload to the last terminal state; the
//! terminal time of a task is its server `finished_at`, which assumes the server shares this
//! machine's clock (true on loopback), bounded by the time the state was seen.

use std::collections::{BTreeMap, HashMap};
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use clap::Parser;
use futures::StreamExt;
use serde::Serialize;
use tonic::Code;
use upscaler::api::pb;
use upscaler::client::{self, Client};

/// Upload chunk size: tiny images fit in one chunk, as most real clients would send them.
const CHUNK: usize = 64 * 1024;
/// Longest wait for one GetTask answer.
const POLL_TIMEOUT: Duration = Duration::from_secs(10);
/// Problems keep one example message each; this many distinct kinds are listed at most.
const MAX_PROBLEM_KINDS: usize = 50;

#[derive(Parser, Debug)]
#[command(
    name = "load",
    about = "Flood an upscaler service with uploads and check every answer",
    // A later value wins, so wrapper scripts can put presets before the user's options.
    args_override_self = true
)]
struct Args {
    /// Server addresses, comma-separated; uploads go round-robin over them. A bare
    /// host:port means http://host:port.
    #[arg(
        long,
        env = "UPSCALER_ADDR",
        value_delimiter = ',',
        default_value = "http://127.0.0.1:50051"
    )]
    addr: Vec<String>,
    /// Uploads to send in all (retries not counted). 0: only connect (and --wait-ready).
    #[arg(long, default_value_t = 200)]
    uploads: usize,
    /// Uploads in flight at once.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    concurrency: u64,
    /// Share of uploads that re-send a name already accepted, with the same bytes.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u8).range(0..=100))]
    dup_percent: u8,
    /// Share of uploads that are invalid and must be refused with INVALID_ARGUMENT.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u8).range(0..=100))]
    bad_percent: u8,
    /// Model named in every upload.
    #[arg(long, default_value = "realesr-animevideov3")]
    model: String,
    /// Smallest side of a generated image, in pixels.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=4096))]
    min_size: u32,
    /// Largest side of a generated image, in pixels.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=4096))]
    max_size: u32,
    /// Retries of an upload refused with RESOURCE_EXHAUSTED (queue full), after a backoff
    /// of 100 ms doubling up to 2 s. 0: count the refusal and move on.
    #[arg(long, default_value_t = 0)]
    retry_full: u32,
    /// How often each unfinished task is polled with GetTask after the flood, in ms.
    #[arg(long, default_value_t = 250, value_parser = clap::value_parser!(u64).range(10..))]
    poll_ms: u64,
    /// Limit on the whole run (flood and waiting for tasks), in seconds.
    #[arg(long, default_value_t = 300)]
    timeout_secs: u64,
    /// First wait up to this many seconds for every server to be ready (a GetTask of an
    /// unknown id answered NOT_FOUND); without it, an unreachable server is an error at once.
    #[arg(long, value_name = "SECS")]
    wait_ready: Option<u64>,
    /// Bearer token, for servers started with AUTH_TOKEN.
    #[arg(long, env = "UPSCALER_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Seed of the image contents and the upload mix (default: from the clock). File names
    /// are unique per run whatever the seed, so reruns never collide with stored results.
    #[arg(long)]
    seed: Option<u64>,
    /// Print the summary as one JSON object on stdout.
    #[arg(long)]
    json: bool,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    if let Err(e) = check_args(&args) {
        eprintln!("load: {e}");
        return ExitCode::from(2);
    }
    let addrs: Vec<String> = args.addr.iter().map(|a| with_scheme(a.trim())).collect();
    let clients = match connect_all(&addrs, &args).await {
        Ok(c) => c,
        Err(e) => {
            eprintln!("load: {e}");
            return ExitCode::from(2);
        }
    };
    if args.uploads == 0 {
        eprintln!("load: {} server(s) ready", clients.len());
        return ExitCode::SUCCESS;
    }

    let seed = args.seed.unwrap_or_else(|| {
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
    });
    let run = Arc::new(Run::new(&args, addrs, clients, seed));
    let deadline = run.start + Duration::from_secs(args.timeout_secs);

    let flood = flood(run.clone());
    if tokio::time::timeout_at(deadline.into(), flood)
        .await
        .is_err()
    {
        run.problem(
            "flood unfinished",
            format!("uploads still in flight after {} s", args.timeout_secs),
        );
    }
    wait_for_tasks(&run, deadline).await;

    let summary = summarize(&run, seed);
    if args.json {
        println!(
            "{}",
            serde_json::to_string(&summary).expect("the summary serializes")
        );
    } else {
        print_text(&summary);
    }
    if summary.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

fn check_args(args: &Args) -> Result<(), String> {
    if args.addr.iter().all(|a| a.trim().is_empty()) {
        return Err("--addr names no server".into());
    }
    if args.dup_percent as u32 + args.bad_percent as u32 > 100 {
        return Err("--dup-percent and --bad-percent add up to more than 100".into());
    }
    if args.min_size > args.max_size {
        return Err("--min-size is larger than --max-size".into());
    }
    Ok(())
}

fn with_scheme(addr: &str) -> String {
    if addr.contains("://") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    }
}

// ---------------------------------------------------------------------------------------------
// Connecting and waiting for readiness

/// One client per address, in order. With `--wait-ready`, retries each until the server
/// answers a GetTask of an unknown id with NOT_FOUND, which means it listens, has finished
/// starting (loading weights, recovering tasks) and accepts the token.
async fn connect_all(addrs: &[String], args: &Args) -> Result<Vec<Client>, String> {
    let patience = args.wait_ready.map(Duration::from_secs);
    let started = Instant::now();
    let mut clients = Vec::with_capacity(addrs.len());
    for addr in addrs.iter().filter(|a| !a.ends_with("://")) {
        let mut last_error;
        loop {
            match ready(addr, args.token.as_deref()).await {
                Ok(client) => {
                    clients.push(client);
                    break;
                }
                // A refused token will not get better by waiting.
                Err((Some(Code::Unauthenticated), e)) => return Err(e),
                Err((_, e)) => last_error = e,
            }
            match patience {
                Some(p) if started.elapsed() < p => {
                    tokio::time::sleep(Duration::from_millis(250)).await
                }
                Some(p) => {
                    return Err(format!(
                        "{addr} not ready after {} s: {last_error}",
                        p.as_secs()
                    ))
                }
                None => return Err(last_error),
            }
        }
    }
    Ok(clients)
}

/// Connects to `addr` and checks that it is ready; on failure, the gRPC code (if any) and a
/// message.
async fn ready(addr: &str, token: Option<&str>) -> Result<Client, (Option<Code>, String)> {
    let mut client = client::connect(addr, token, None)
        .await
        .map_err(|e| (None, e.to_string()))?;
    let probe = pb::GetTaskRequest {
        task_id: uuid::Uuid::new_v4().to_string(),
    };
    match client.get_task(probe).await {
        Err(s) if s.code() == Code::NotFound => Ok(client),
        Err(s) => Err((
            Some(s.code()),
            format!(
                "{addr}: GetTask answered {}: {}",
                code_name(s.code()),
                s.message()
            ),
        )),
        Ok(_) => Err((None, format!("{addr}: GetTask of a random id found a task"))),
    }
}

// ---------------------------------------------------------------------------------------------
// The run's shared state

/// What one upload is meant to test.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Fresh,
    Duplicate,
    Bad(Bad),
}

/// Ways an upload can be invalid; each must be refused with INVALID_ARGUMENT.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Bad {
    /// Random bytes under a .png name: no known magic bytes.
    Garbage,
    /// A valid PNG under a .jpg name: the bytes do not match the extension.
    Mismatch,
    /// A valid PNG under a .gif name: refused by the name check before any byte is read.
    WrongExtension,
    /// The first half of a valid PNG: the header passes, decoding fails.
    Truncated,
}

/// A task id this run was given, and what became of it.
struct Tracked {
    /// Index of the client that answered the upload; the task is polled there, so the
    /// generator also works against instances that do not share their store.
    client: usize,
    /// False for a bad upload that was wrongly accepted: its FAILURE is no extra problem.
    valid: bool,
    file_name: String,
    /// Set once SUCCESS or FAILURE is seen.
    end: Option<Ended>,
}

struct Ended {
    success: bool,
    /// When the task ended, relative to `Run::start`.
    at: Duration,
    /// Server-side time from created_at to finished_at, when both are known.
    server_ms: Option<f64>,
}

/// Counters and records, behind one mutex: updates are tiny next to an RPC.
#[derive(Default)]
struct Tally {
    /// UploadImage RPCs sent, retries included.
    rpcs: u64,
    retries: u64,
    /// Latency of every UploadImage RPC, in ms.
    latencies_ms: Vec<f64>,
    /// Final answer per upload kind: "QUEUED", "IN_PROGRESS", ... or a gRPC code name.
    fresh: BTreeMap<String, u64>,
    duplicate: BTreeMap<String, u64>,
    bad: BTreeMap<String, u64>,
    /// Every refused RPC by code (retried ones included).
    refused: BTreeMap<String, u64>,
    /// Uploads answered with a task id (any outcome), and new tasks (QUEUED).
    accepted: u64,
    queued: u64,
    /// Uploads still refused as queue full after all retries.
    gave_up_full: u64,
    /// Accepted valid names with the upload index their bytes came from: duplicate sources.
    names: Vec<(String, u64)>,
    /// Every task id given for a name.
    name_tasks: HashMap<String, Vec<String>>,
    tasks: HashMap<String, Tracked>,
    /// When the last upload was answered, relative to `Run::start`.
    last_answer: Duration,
    /// Broken invariants: kind -> (count, first message).
    problems: BTreeMap<String, (u64, String)>,
}

struct Run {
    addrs: Vec<String>,
    clients: Vec<Client>,
    /// Round-robin position: every RPC takes the next client.
    next: AtomicUsize,
    /// Prefix that makes this run's file names unique.
    run_id: String,
    seed: u64,
    model: String,
    uploads: usize,
    concurrency: usize,
    dup_percent: u64,
    bad_percent: u64,
    min_size: u32,
    max_size: u32,
    retry_full: u32,
    poll: Duration,
    /// Wall-clock twin of `start`, to place the servers' timestamps on the same scale.
    start_wall: SystemTime,
    start: Instant,
    tally: Mutex<Tally>,
}

impl Run {
    fn new(args: &Args, addrs: Vec<String>, clients: Vec<Client>, seed: u64) -> Self {
        Self {
            addrs,
            clients,
            next: AtomicUsize::new(0),
            run_id: uuid::Uuid::new_v4().simple().to_string()[..8].to_string(),
            seed,
            model: args.model.clone(),
            uploads: args.uploads,
            concurrency: args.concurrency as usize,
            dup_percent: args.dup_percent.into(),
            bad_percent: args.bad_percent.into(),
            min_size: args.min_size,
            max_size: args.max_size,
            retry_full: args.retry_full,
            poll: Duration::from_millis(args.poll_ms),
            start_wall: SystemTime::now(),
            start: Instant::now(),
            tally: Mutex::new(Tally::default()),
        }
    }

    fn tally(&self) -> std::sync::MutexGuard<'_, Tally> {
        self.tally.lock().expect("tally lock poisoned")
    }

    fn problem(&self, kind: &str, message: String) {
        self.tally().problem(kind, message);
    }

    /// Tasks not seen ending yet, with the client to ask about each.
    fn pending(&self) -> Vec<(String, usize)> {
        self.tally()
            .tasks
            .iter()
            .filter(|(_, t)| t.end.is_none())
            .map(|(id, t)| (id.clone(), t.client))
            .collect()
    }

    fn next_client(&self) -> (usize, Client) {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.clients.len();
        (i, self.clients[i].clone())
    }

    /// The kind of upload `index`, fixed by the seed.
    fn kind(&self, index: u64) -> Kind {
        let mut rng = Rng::new(self.seed, Stream::Kind, index);
        let roll = rng.below(100);
        if roll < self.bad_percent {
            Kind::Bad(match rng.below(4) {
                0 => Bad::Garbage,
                1 => Bad::Mismatch,
                2 => Bad::WrongExtension,
                _ => Bad::Truncated,
            })
        } else if roll < self.bad_percent + self.dup_percent {
            Kind::Duplicate
        } else {
            Kind::Fresh
        }
    }

    fn fresh_name(&self, index: u64) -> String {
        format!("load-{}-{index:06}.png", self.run_id)
    }

    /// The PNG of upload `index`: the same bytes every time, so duplicates can resend it.
    fn png(&self, index: u64) -> Vec<u8> {
        tiny_png(
            &mut Rng::new(self.seed, Stream::Image, index),
            self.min_size,
            self.max_size,
        )
    }
}

impl Tally {
    fn problem(&mut self, kind: &str, message: String) {
        if let Some((count, _)) = self.problems.get_mut(kind) {
            *count += 1;
        } else if self.problems.len() < MAX_PROBLEM_KINDS {
            self.problems.insert(kind.to_string(), (1, message));
        }
    }

    fn track(&mut self, task_id: &str, client: usize, valid: bool, file_name: &str) {
        self.tasks
            .entry(task_id.to_string())
            .or_insert_with(|| Tracked {
                client,
                valid,
                file_name: file_name.to_string(),
                end: None,
            });
        let ids = self.name_tasks.entry(file_name.to_string()).or_default();
        if !ids.iter().any(|id| id == task_id) {
            ids.push(task_id.to_string());
        }
    }

    /// Records the final answer to one upload and checks it against what its kind expects.
    fn answer(
        &mut self,
        kind: Kind,
        file_name: &str,
        source: u64,
        client: usize,
        answer: &Result<pb::UploadImageResponse, tonic::Status>,
    ) {
        let label = match answer {
            Ok(r) => client::outcome_name(r).to_string(),
            Err(s) => code_name(s.code()),
        };
        let per_kind = match kind {
            Kind::Fresh => &mut self.fresh,
            Kind::Duplicate => &mut self.duplicate,
            Kind::Bad(_) => &mut self.bad,
        };
        *per_kind.entry(label.clone()).or_default() += 1;

        let response = match answer {
            Ok(r) => r,
            Err(s) => {
                self.refused(kind, file_name, s);
                return;
            }
        };
        self.accepted += 1;
        let outcome = response.outcome();
        if outcome == pb::UploadOutcome::Queued {
            self.queued += 1;
        }
        let task_id = response.task_id.as_str();
        match kind {
            Kind::Bad(how) => {
                self.problem(
                    &format!("bad upload accepted ({how:?})"),
                    format!("{file_name} answered {label} with task {task_id}"),
                );
                self.track(task_id, client, false, file_name);
            }
            Kind::Fresh => {
                if outcome != pb::UploadOutcome::Queued {
                    self.problem(
                        &format!("fresh upload answered {label}"),
                        format!(
                            "{file_name}: a name new to this run was answered {label} ({task_id})"
                        ),
                    );
                }
                self.track(task_id, client, true, file_name);
                self.names.push((file_name.to_string(), source));
            }
            Kind::Duplicate => {
                // IN_PROGRESS and ALREADY_PROCESSED must point at a task made for this name.
                let known = self
                    .name_tasks
                    .get(file_name)
                    .is_some_and(|ids| ids.iter().any(|id| id == task_id));
                if outcome != pb::UploadOutcome::Queued && !known {
                    self.problem(
                        "duplicate answered with an unknown task",
                        format!(
                            "{file_name} answered {label} with task {task_id}, not one made for it"
                        ),
                    );
                }
                if outcome == pb::UploadOutcome::Unspecified {
                    self.problem(
                        "upload answered without an outcome",
                        format!("{file_name}: outcome UNSPECIFIED"),
                    );
                }
                self.track(task_id, client, true, file_name);
            }
        }
    }

    fn refused(&mut self, kind: Kind, file_name: &str, status: &tonic::Status) {
        let code = status.code();
        match (kind, code) {
            (Kind::Bad(_), Code::InvalidArgument) => {}
            (Kind::Fresh | Kind::Duplicate, Code::ResourceExhausted) => self.gave_up_full += 1,
            (Kind::Bad(how), _) => self.problem(
                &format!("bad upload ({how:?}) answered {}", code_name(code)),
                format!("{file_name}: {}", status.message()),
            ),
            (Kind::Fresh, _) => self.problem(
                &format!("fresh upload answered {}", code_name(code)),
                format!("{file_name}: {}", status.message()),
            ),
            (Kind::Duplicate, _) => self.problem(
                &format!("duplicate upload answered {}", code_name(code)),
                format!("{file_name}: {}", status.message()),
            ),
        }
    }
}

/// `INVALID_ARGUMENT`, `RESOURCE_EXHAUSTED`, ... as in the gRPC spec.
fn code_name(code: Code) -> String {
    let camel = format!("{code:?}");
    let mut out = String::with_capacity(camel.len() + 4);
    for (i, c) in camel.chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(c.to_ascii_uppercase());
    }
    out
}

// ---------------------------------------------------------------------------------------------
// The flood

async fn flood(run: Arc<Run>) {
    futures::stream::iter(0..run.uploads as u64)
        .map(|index| upload_one(run.clone(), index))
        .buffer_unordered(run.concurrency)
        .collect::<()>()
        .await;
}

/// Builds upload `index` according to its kind, sends it (retrying queue-full refusals when
/// asked to) and records the final answer.
async fn upload_one(run: Arc<Run>, index: u64) {
    let mut kind = run.kind(index);
    // A duplicate resends an accepted name; until one exists, it is a fresh upload instead.
    let duplicate_of = if kind == Kind::Duplicate {
        let tally = run.tally();
        let mut rng = Rng::new(run.seed, Stream::Duplicate, index);
        match tally.names.len() {
            0 => None,
            n => Some(tally.names[rng.below(n as u64) as usize].clone()),
        }
    } else {
        None
    };
    if kind == Kind::Duplicate && duplicate_of.is_none() {
        kind = Kind::Fresh;
    }
    let (file_name, bytes, source) = match (kind, duplicate_of) {
        (Kind::Duplicate, Some((name, source))) => (name, run.png(source), source),
        (Kind::Bad(how), _) => bad_upload(&run, index, how),
        _ => (run.fresh_name(index), run.png(index), index),
    };

    let mut backoff = Rng::new(run.seed, Stream::Backoff, index);
    let mut attempt = 0;
    loop {
        let (client_index, mut client) = run.next_client();
        let meta = pb::UploadMetadata {
            file_name: file_name.clone(),
            model: run.model.clone(),
            ..Default::default()
        };
        let sent = Instant::now();
        let answer = send(&mut client, meta, &bytes).await;
        let ms = sent.elapsed().as_secs_f64() * 1e3;

        let retry = matches!(&answer, Err(s) if s.code() == Code::ResourceExhausted)
            && !matches!(kind, Kind::Bad(_))
            && attempt < run.retry_full;
        {
            let mut tally = run.tally();
            tally.rpcs += 1;
            tally.latencies_ms.push(ms);
            tally.last_answer = tally.last_answer.max(run.start.elapsed());
            if let Err(s) = &answer {
                *tally.refused.entry(code_name(s.code())).or_default() += 1;
            }
            if retry {
                tally.retries += 1;
            } else {
                tally.answer(kind, &file_name, source, client_index, &answer);
            }
        }
        if !retry {
            return;
        }
        // 100 ms, 200 ms, ... up to 2 s, with jitter so retries do not arrive in step.
        let base = 100u64 << attempt.min(5);
        let jitter = backoff.below(base / 2 + 1);
        tokio::time::sleep(Duration::from_millis((base + jitter).min(2000))).await;
        attempt += 1;
    }
}

/// An invalid upload: (file name, bytes, source index).
fn bad_upload(run: &Run, index: u64, how: Bad) -> (String, Vec<u8>, u64) {
    let stem = format!("load-{}-{index:06}-bad", run.run_id);
    match how {
        Bad::Garbage => {
            let mut rng = Rng::new(run.seed, Stream::Garbage, index);
            let len = 64 + rng.below(2048) as usize;
            // Never starting with a PNG or JPEG signature (0x89 'P' / 0xFF 0xD8).
            let bytes = (0..len).map(|_| (rng.below(0x7f) as u8) | 0x01).collect();
            (format!("{stem}.png"), bytes, index)
        }
        Bad::Mismatch => (format!("{stem}.jpg"), run.png(index), index),
        Bad::WrongExtension => (format!("{stem}.gif"), run.png(index), index),
        Bad::Truncated => {
            let mut png = run.png(index);
            png.truncate(png.len() / 2);
            (format!("{stem}.png"), png, index)
        }
    }
}

/// One UploadImage RPC: the metadata, then the bytes in chunks.
async fn send(
    client: &mut Client,
    meta: pb::UploadMetadata,
    bytes: &[u8],
) -> Result<pb::UploadImageResponse, tonic::Status> {
    use pb::upload_image_request::Payload;
    let mut messages = vec![pb::UploadImageRequest {
        payload: Some(Payload::Metadata(meta)),
    }];
    messages.extend(bytes.chunks(CHUNK).map(|c| pb::UploadImageRequest {
        payload: Some(Payload::Chunk(c.to_vec())),
    }));
    client
        .upload_image(futures::stream::iter(messages))
        .await
        .map(|r| r.into_inner())
}

// ---------------------------------------------------------------------------------------------
// Following the tasks

/// Polls every unfinished task with GetTask once per `run.poll` (at most `run.concurrency`
/// calls at a time) until all have ended or `deadline` passes. There is always one round, even
/// past the deadline, so tasks that ended during a flood that ran out of time are still seen.
async fn wait_for_tasks(run: &Run, deadline: Instant) {
    loop {
        let round = Instant::now();
        let pending = run.pending();
        futures::stream::iter(pending)
            .map(|(id, client)| poll_one(run, id, client))
            .buffer_unordered(run.concurrency)
            .collect::<()>()
            .await;
        let pending = run.pending();
        if pending.is_empty() {
            return;
        }
        if Instant::now() >= deadline {
            let mut tally = run.tally();
            for (id, _) in pending {
                let name = tally.tasks[&id].file_name.clone();
                tally.problem(
                    "task unfinished at the timeout",
                    format!("task {id} ({name}) had not ended"),
                );
            }
            return;
        }
        let next = (round + run.poll).min(deadline);
        tokio::time::sleep_until(next.into()).await;
    }
}

async fn poll_one(run: &Run, task_id: String, client: usize) {
    let request = pb::GetTaskRequest {
        task_id: task_id.clone(),
    };
    let mut grpc = run.clients[client].clone();
    let answer = tokio::time::timeout(POLL_TIMEOUT, grpc.get_task(request)).await;
    let seen = run.start.elapsed();
    let mut tally = run.tally();
    let task = match answer {
        Ok(Ok(r)) => r.into_inner(),
        Err(_) => {
            tally.problem(
                "GetTask timed out",
                format!(
                    "task {task_id} on {}: no answer in {} s",
                    run.addrs[client],
                    POLL_TIMEOUT.as_secs()
                ),
            );
            return;
        }
        Ok(Err(s)) => {
            tally.problem(
                &format!("GetTask answered {}", code_name(s.code())),
                format!("task {task_id} on {}: {}", run.addrs[client], s.message()),
            );
            return;
        }
    };
    if !client::is_terminal(&task) {
        return;
    }
    let success = task.state() == pb::TaskState::Success;
    let finished = task.finished_at.and_then(|t| SystemTime::try_from(t).ok());
    let created = task.created_at.and_then(|t| SystemTime::try_from(t).ok());
    // The server's finish time on this run's clock, never later than when it was seen.
    let at = finished
        .and_then(|f| f.duration_since(run.start_wall).ok())
        .map_or(seen, |d| d.min(seen));
    let server_ms = match (created, finished) {
        (Some(c), Some(f)) => f.duration_since(c).ok().map(|d| d.as_secs_f64() * 1e3),
        _ => None,
    };
    let tracked = tally
        .tasks
        .get_mut(&task_id)
        .expect("polled tasks are tracked");
    tracked.end = Some(Ended {
        success,
        at,
        server_ms,
    });
    if !success && tracked.valid {
        let name = tracked.file_name.clone();
        tally.problem(
            "task of a valid image ended in FAILURE",
            format!("task {task_id} ({name}): {}", task.error),
        );
    }
}

// ---------------------------------------------------------------------------------------------
// The summary

#[derive(Serialize)]
struct Summary {
    /// True when every invariant held.
    ok: bool,
    addrs: Vec<String>,
    concurrency: usize,
    model: String,
    seed: u64,
    run_id: String,
    /// Uploads asked for with --uploads; more than `uploads` when the run ran out of time.
    planned: u64,
    /// Uploads sent and answered (retries not counted), and how they split by kind.
    uploads: u64,
    fresh: u64,
    duplicates: u64,
    bad: u64,
    /// UploadImage RPCs, retries included.
    rpcs: u64,
    retries: u64,
    /// Uploads answered with a task id (any outcome), and those that made a new task.
    accepted: u64,
    queued: u64,
    /// Final answers per kind, by outcome or gRPC code.
    fresh_answers: BTreeMap<String, u64>,
    duplicate_answers: BTreeMap<String, u64>,
    bad_answers: BTreeMap<String, u64>,
    /// Refused RPCs by gRPC code, retried ones included.
    refused: BTreeMap<String, u64>,
    /// Uploads given up as queue full after all retries.
    gave_up_queue_full: u64,
    upload_latency_ms: Percentiles,
    /// First upload sent to last upload answered.
    flood_secs: f64,
    accepted_per_sec: f64,
    tasks: u64,
    success: u64,
    failure: u64,
    unfinished: u64,
    /// First upload sent to the last task's terminal state.
    tasks_secs: f64,
    tasks_per_minute: f64,
    /// Server-side created_at to finished_at of the tasks that ended.
    task_time_ms: Percentiles,
    problems: Vec<Problem>,
}

#[derive(Serialize, Default)]
struct Percentiles {
    count: usize,
    p50: f64,
    p90: f64,
    p99: f64,
    max: f64,
}

#[derive(Serialize)]
struct Problem {
    kind: String,
    count: u64,
    example: String,
}

/// Nearest-rank percentiles.
fn percentiles(mut values: Vec<f64>) -> Percentiles {
    if values.is_empty() {
        return Percentiles::default();
    }
    values.sort_by(f64::total_cmp);
    let rank = |p: f64| {
        let i = ((p / 100.0) * values.len() as f64).ceil() as usize;
        values[i.clamp(1, values.len()) - 1]
    };
    Percentiles {
        count: values.len(),
        p50: rank(50.0),
        p90: rank(90.0),
        p99: rank(99.0),
        max: values[values.len() - 1],
    }
}

fn summarize(run: &Run, seed: u64) -> Summary {
    let tally = run.tally();
    let sum = |m: &BTreeMap<String, u64>| m.values().sum::<u64>();
    let ended: Vec<&Ended> = tally
        .tasks
        .values()
        .filter_map(|t| t.end.as_ref())
        .collect();
    let success = ended.iter().filter(|e| e.success).count() as u64;
    let failure = ended.len() as u64 - success;
    let tasks = tally.tasks.len() as u64;
    let flood_secs = tally.last_answer.as_secs_f64();
    let tasks_secs = ended
        .iter()
        .map(|e| e.at)
        .max()
        .unwrap_or_default()
        .as_secs_f64();
    let rate = |n: u64, secs: f64| if secs > 0.0 { n as f64 / secs } else { 0.0 };
    let problems: Vec<Problem> = tally
        .problems
        .iter()
        .map(|(kind, (count, example))| Problem {
            kind: kind.clone(),
            count: *count,
            example: example.clone(),
        })
        .collect();
    Summary {
        ok: problems.is_empty(),
        addrs: run.addrs.clone(),
        concurrency: run.concurrency,
        model: run.model.clone(),
        seed,
        run_id: run.run_id.clone(),
        planned: run.uploads as u64,
        uploads: sum(&tally.fresh) + sum(&tally.duplicate) + sum(&tally.bad),
        fresh: sum(&tally.fresh),
        duplicates: sum(&tally.duplicate),
        bad: sum(&tally.bad),
        rpcs: tally.rpcs,
        retries: tally.retries,
        accepted: tally.accepted,
        queued: tally.queued,
        fresh_answers: tally.fresh.clone(),
        duplicate_answers: tally.duplicate.clone(),
        bad_answers: tally.bad.clone(),
        refused: tally.refused.clone(),
        gave_up_queue_full: tally.gave_up_full,
        upload_latency_ms: percentiles(tally.latencies_ms.clone()),
        flood_secs,
        accepted_per_sec: rate(tally.accepted, flood_secs),
        tasks,
        success,
        failure,
        unfinished: tasks - ended.len() as u64,
        tasks_secs,
        tasks_per_minute: rate(ended.len() as u64, tasks_secs) * 60.0,
        task_time_ms: percentiles(ended.iter().filter_map(|e| e.server_ms).collect()),
        problems,
    }
}

fn print_text(s: &Summary) {
    let counts = |m: &BTreeMap<String, u64>| {
        if m.is_empty() {
            return "-".to_string();
        }
        m.iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let pct = |p: &Percentiles| {
        if p.count == 0 {
            return "-".to_string();
        }
        format!(
            "p50 {:.1}  p90 {:.1}  p99 {:.1}  max {:.1}  ({} samples)",
            p.p50, p.p90, p.p99, p.max, p.count
        )
    };
    println!(
        "load run {} against {} server(s): {}",
        s.run_id,
        s.addrs.len(),
        s.addrs.join(", ")
    );
    println!(
        "  model {}, concurrency {}, seed {}",
        s.model, s.concurrency, s.seed
    );
    let planned = if s.planned == s.uploads {
        String::new()
    } else {
        format!(" of {} planned", s.planned)
    };
    println!(
        "uploads sent          {}{planned} ({} RPCs, {} retries)",
        s.uploads, s.rpcs, s.retries
    );
    println!(
        "  fresh               {}: {}",
        s.fresh,
        counts(&s.fresh_answers)
    );
    println!(
        "  duplicates          {}: {}",
        s.duplicates,
        counts(&s.duplicate_answers)
    );
    println!(
        "  bad                 {}: {}",
        s.bad,
        counts(&s.bad_answers)
    );
    println!(
        "accepted              {} ({} new tasks)",
        s.accepted, s.queued
    );
    println!(
        "refused RPCs          {} (gave up as queue full: {})",
        counts(&s.refused),
        s.gave_up_queue_full
    );
    println!("upload latency ms     {}", pct(&s.upload_latency_ms));
    println!(
        "accepted uploads/s    {:.1} (flood {:.2} s)",
        s.accepted_per_sec, s.flood_secs
    );
    println!(
        "tasks                 {}: SUCCESS {}, FAILURE {}, unfinished {}",
        s.tasks, s.success, s.failure, s.unfinished
    );
    println!(
        "tasks finished/min    {:.1} (first upload to last terminal state {:.2} s)",
        s.tasks_per_minute, s.tasks_secs
    );
    println!("task time ms (server) {}", pct(&s.task_time_ms));
    if s.ok {
        println!("result                OK");
    } else {
        println!("result                FAILED");
        for p in &s.problems {
            println!("  {} x{}: e.g. {}", p.kind, p.count, p.example);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Test images

/// A small PNG of random pixels, `min..=max` pixels a side; one in eight has an alpha channel
/// (which the service runs as a second pass).
fn tiny_png(rng: &mut Rng, min: u32, max: u32) -> Vec<u8> {
    let span = u64::from(max - min) + 1;
    let width = min + rng.below(span) as u32;
    let height = min + rng.below(span) as u32;
    let rgba = rng.below(8) == 0;
    let channels = if rgba { 4 } else { 3 };
    let pixels: Vec<u8> = (0..width * height * channels)
        .map(|_| rng.next() as u8)
        .collect();
    let image: image::DynamicImage = if rgba {
        image::RgbaImage::from_raw(width, height, pixels)
            .expect("buffer size matches")
            .into()
    } else {
        image::RgbImage::from_raw(width, height, pixels)
            .expect("buffer size matches")
            .into()
    };
    let mut out = std::io::Cursor::new(Vec::new());
    image
        .write_to(&mut out, image::ImageFormat::Png)
        .expect("PNG encoding to memory");
    out.into_inner()
}

/// What a random draw is for: each purpose has its own stream per upload, so that, for one
/// seed, an upload's image does not change with the mix or with the order of answers.
#[derive(Clone, Copy)]
enum Stream {
    Image = 1,
    Kind,
    Duplicate,
    Garbage,
    Backoff,
}

/// SplitMix64: small, fast and reproducible; more than enough for test pixels and dice.
struct Rng(u64);

impl Rng {
    /// The generator for upload `index` in `stream`, under `seed`.
    fn new(seed: u64, stream: Stream, index: u64) -> Self {
        let mut rng = Self(
            seed ^ (stream as u64).wrapping_mul(0xD6E8_FEB8_6659_FD93)
                ^ index.wrapping_mul(0x9E37_79B9_7F4A_7C15),
        );
        rng.next();
        rng
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform enough in `0..n` for n far below 2^64.
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}
