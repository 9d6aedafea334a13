//! Upload throughput over gRPC (`UploadImage`) and HTTP (`POST /upscale`, multipart) for the
//! same small files, on one running server, in interleaved rounds (gRPC, HTTP, gRPC, ...).
//!
//! Every file is uploaded and processed once first; the measured rounds then send the same
//! bytes again, which the server answers ALREADY_PROCESSED after receiving, hashing and
//! decoding the whole file. So the rounds time the upload path of each protocol (transfer,
//! validation, deduplication), not the network model, and leave nothing queued.
//!
//! ```text
//! cargo build --release --example upload_bench
//! DEFAULT_MODEL=realesr-animevideov3 QUEUE_CAPACITY=1000 target/release/upscaler serve &
//! target/release/examples/upload_bench --addr 127.0.0.1:50051 --files 200 --rounds 5
//! ```

use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use futures::StreamExt;
use upscaler::api::pb;
use upscaler::client::{self, Client};

/// gRPC chunk size, as `upscaler upload` sends files.
const CHUNK: usize = 1 << 20;

#[derive(Parser, Debug)]
#[command(
    name = "upload_bench",
    about = "Upload throughput: gRPC against HTTP multipart"
)]
struct Args {
    /// host:port of a running server.
    #[arg(long, default_value = "127.0.0.1:50051")]
    addr: String,
    /// Distinct files per round.
    #[arg(long, default_value_t = 200)]
    files: usize,
    /// Side of each generated PNG, in pixels.
    #[arg(long, default_value_t = 64)]
    size: u32,
    /// Rounds per protocol, interleaved.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Uploads in flight at once.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
}

#[derive(Clone, Copy, Debug)]
enum Protocol {
    Grpc,
    Http,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let grpc = client::connect(&format!("http://{}", args.addr), None, None).await?;
    let http = reqwest::Client::new();
    let run = format!("{:x}", std::process::id());
    let files: Arc<Vec<(String, Vec<u8>)>> = Arc::new(
        (0..args.files)
            .map(|i| {
                (
                    format!("bench-{run}-{i}.png"),
                    noise_png(args.size, i as u64),
                )
            })
            .collect(),
    );
    let bytes: usize = files.iter().map(|(_, b)| b.len()).sum();
    println!(
        "{} files of {}x{} px, {:.1} KiB each on average; concurrency {}",
        files.len(),
        args.size,
        args.size,
        bytes as f64 / files.len() as f64 / 1024.0,
        args.concurrency
    );

    // Process every file once, so the measured uploads are answered from the stored results.
    let ids = upload_all(Protocol::Grpc, &grpc, &http, &args, &files, "queued").await?;
    for id in ids {
        wait_success(&grpc, &id).await?;
    }

    let mut rates = [Vec::new(), Vec::new()];
    for round in 1..=args.rounds {
        for (k, protocol) in [Protocol::Grpc, Protocol::Http].into_iter().enumerate() {
            let start = Instant::now();
            upload_all(protocol, &grpc, &http, &args, &files, "already_processed").await?;
            let took = start.elapsed().as_secs_f64();
            let rate = files.len() as f64 / took;
            println!(
                "round {round} {protocol:?}: {took:.3} s, {rate:.0} uploads/s, {:.1} MiB/s",
                bytes as f64 / took / (1 << 20) as f64
            );
            rates[k].push(rate);
        }
    }
    let (g, h) = (median(&mut rates[0]), median(&mut rates[1]));
    println!(
        "median: gRPC {g:.0} uploads/s, HTTP {h:.0} uploads/s, HTTP/gRPC {:.2}",
        h / g
    );
    Ok(())
}

/// Uploads every file over `protocol`, `concurrency` at a time; each must be answered with
/// `expect`. The task ids in file order.
async fn upload_all(
    protocol: Protocol,
    grpc: &Client,
    http: &reqwest::Client,
    args: &Args,
    files: &Arc<Vec<(String, Vec<u8>)>>,
    expect: &str,
) -> anyhow::Result<Vec<String>> {
    let answers = futures::stream::iter(0..files.len())
        .map(|i| {
            let (grpc, http, files) = (grpc.clone(), http.clone(), files.clone());
            let addr = args.addr.clone();
            async move {
                let (name, bytes) = &files[i];
                match protocol {
                    Protocol::Grpc => upload_grpc(grpc, name, bytes).await,
                    Protocol::Http => upload_http(&http, &addr, name, bytes).await,
                }
            }
        })
        .buffered(args.concurrency)
        .collect::<Vec<_>>()
        .await;
    answers
        .into_iter()
        .map(|a| {
            let (outcome, id) = a?;
            anyhow::ensure!(outcome == expect, "answered {outcome}, expected {expect}");
            Ok(id)
        })
        .collect()
}

async fn upload_grpc(
    mut grpc: Client,
    name: &str,
    bytes: &[u8],
) -> anyhow::Result<(String, String)> {
    use pb::upload_image_request::Payload;
    let meta = pb::UploadImageRequest {
        payload: Some(Payload::Metadata(pb::UploadMetadata {
            file_name: name.into(),
            ..Default::default()
        })),
    };
    let chunks = bytes.chunks(CHUNK).map(|c| pb::UploadImageRequest {
        payload: Some(Payload::Chunk(c.to_vec())),
    });
    let messages: Vec<_> = std::iter::once(meta).chain(chunks).collect();
    let r = grpc
        .upload_image(futures::stream::iter(messages))
        .await?
        .into_inner();
    let outcome = match pb::UploadOutcome::try_from(r.outcome)? {
        pb::UploadOutcome::Queued => "queued",
        pb::UploadOutcome::InProgress => "in_progress",
        pb::UploadOutcome::AlreadyProcessed => "already_processed",
        pb::UploadOutcome::Unspecified => "unspecified",
    };
    Ok((outcome.into(), r.task_id))
}

async fn upload_http(
    http: &reqwest::Client,
    addr: &str,
    name: &str,
    bytes: &[u8],
) -> anyhow::Result<(String, String)> {
    let part = reqwest::multipart::Part::bytes(bytes.to_vec()).file_name(name.to_string());
    let form = reqwest::multipart::Form::new().part("image", part);
    let r = http
        .post(format!("http://{addr}/upscale"))
        .multipart(form)
        .send()
        .await?;
    let body: serde_json::Value = r.json().await?;
    let field = |k: &str| body[k].as_str().map(str::to_string);
    match (field("outcome"), field("task_id")) {
        (Some(o), Some(id)) => Ok((o, id)),
        _ => anyhow::bail!("unexpected answer {body}"),
    }
}

async fn wait_success(grpc: &Client, id: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let t = grpc
            .clone()
            .get_task(pb::GetTaskRequest { task_id: id.into() })
            .await?
            .into_inner();
        match pb::TaskState::try_from(t.state)? {
            pb::TaskState::Success => return Ok(()),
            pb::TaskState::Failure => anyhow::bail!("task {id} failed: {}", t.error),
            _ => {}
        }
        anyhow::ensure!(Instant::now() < deadline, "task {id} not done");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A PNG of noise, which does not compress: the file is about 3 bytes per pixel.
fn noise_png(size: u32, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let img = image::RgbImage::from_fn(size, size, |_, _| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let [a, b, c, ..] = state.to_le_bytes();
        image::Rgb([a, b, c])
    });
    upscaler::imaging::encode(
        &image::DynamicImage::ImageRgb8(img),
        upscaler::imaging::OutputFormat::Png,
    )
    .expect("a PNG")
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}
