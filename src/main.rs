//! The `upscaler` command line: local upscaling, model listing, weight conversion and the
//! forward-pass benchmark.

use std::io::IsTerminal;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};

use upscaler::api::pb;
use upscaler::client::{self, ClientError};
use upscaler::imaging::{self, ImagingError, OutputFormat};
use upscaler::model::catalog::{self, Catalog};
use upscaler::model::locate::WeightsDirs;
use upscaler::model::{self, registry, weights, Model, ModelError, Prepare, Progress};
use upscaler::pipeline::{self, AlphaMode, EnhanceOptions, PipelineError, TileSize};
use upscaler::ServeError;

#[derive(Parser)]
#[command(name = "upscaler", version, about = "Real-ESRGAN image upscaling")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Where models are found.
#[derive(clap::Args, Clone)]
struct Folders {
    /// Directory holding `<model>.safetensors`, searched before ./weights, the executable's
    /// folder and the source tree.
    #[arg(long, env = "UPSCALER_WEIGHTS_DIR")]
    weights_dir: Option<PathBuf>,
    /// Directory of your own models, each named by its file stem [default: models/ in
    /// DATA_DIR]
    #[arg(long, env = "MODELS_DIR")]
    models_dir: Option<PathBuf>,
}

impl Folders {
    fn catalog(&self) -> Catalog {
        let weights = WeightsDirs::search(self.weights_dir.as_deref());
        let models_dir = self
            .models_dir
            .clone()
            .unwrap_or_else(|| upscaler::config::default_models_dir(&data_dir_setting()));
        Catalog::scan(&weights, Some(&models_dir))
    }
}

/// DATA_DIR as the server would use it, for commands that run without the server's settings.
fn data_dir_setting() -> PathBuf {
    std::env::var_os("DATA_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(upscaler::config::default_data_dir)
}

#[derive(clap::Args, Clone)]
struct ModelArgs {
    /// Model name (see `upscaler models`) [default: realesrgan-x4plus; with --weights, the
    /// file's stem]
    #[arg(long, short = 'm', env = "UPSCALER_MODEL")]
    model: Option<String>,
    #[command(flatten)]
    folders: Folders,
    /// A weights file to use instead (.safetensors, PyTorch .pth, or ncnn .param/.bin): with
    /// --model naming a registry model, its configuration; otherwise recognised from the file.
    #[arg(long)]
    weights: Option<PathBuf>,
}

impl ModelArgs {
    fn entry(&self) -> Result<catalog::Entry, ModelError> {
        match (&self.weights, &self.model) {
            (Some(file), Some(name)) if model::find(name).is_ok() => {
                Ok(catalog::Entry::registry(model::find(name)?, file.clone()))
            }
            (Some(file), name) => {
                let stem = file.file_stem().unwrap_or_default().to_string_lossy();
                let name = name.clone().unwrap_or_else(|| stem.into_owned());
                catalog::recognise_file(&name, file)
                    .map_err(|why| ModelError::Format(format!("{}: {why}", file.display())))
            }
            (None, name) => {
                let name = name.as_deref().unwrap_or(registry::DEFAULT_MODEL);
                self.folders.catalog().require(name).cloned()
            }
        }
    }

    fn load(&self, prepare: Prepare) -> Result<Model, ModelError> {
        self.entry()?.load(&candle_core::Device::Cpu, prepare)
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum Format {
    Png,
    Jpeg,
    /// Lossless WebP.
    Webp,
}

#[derive(Clone, Copy, ValueEnum)]
enum Alpha {
    /// Run alpha through the network (Real-ESRGAN's default).
    Network,
    /// Resize alpha bilinearly.
    Bilinear,
}

/// Where the server is and how to print results.
#[derive(clap::Args, Clone)]
struct ClientArgs {
    /// Server address.
    #[arg(long, env = "UPSCALER_ADDR", default_value = "http://127.0.0.1:50051")]
    addr: String,
    /// Bearer token, for servers started with AUTH_TOKEN.
    #[arg(long, env = "UPSCALER_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// CA certificate (PEM) to trust for an https:// address, e.g. a self-signed server's.
    #[arg(long, env = "UPSCALER_CA")]
    ca: Option<PathBuf>,
    /// Print the result as one JSON object on stdout.
    #[arg(long)]
    json: bool,
    /// While the server is unreachable or still starting (UNAVAILABLE), retry for up to this
    /// many seconds before giving up with exit code 3 (0: try once).
    #[arg(
        long,
        env = "UPSCALER_WAIT_READY",
        default_value_t = 30,
        value_name = "SECS"
    )]
    wait_ready: u64,
}

impl ClientArgs {
    fn wait_ready(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.wait_ready)
    }

    async fn connect(&self) -> Result<client::Client, ClientError> {
        client::connect(&self.addr, self.token.as_deref(), self.ca.as_deref()).await
    }
}

#[derive(Subcommand)]
enum Command {
    /// Run the gRPC service (settings from flags, the environment or a .env file).
    Serve {
        #[command(flatten)]
        settings: Box<upscaler::Settings>,
    },
    /// Upload an image to a running server; with --wait, follow the task and download the result.
    Upload {
        file: PathBuf,
        #[arg(long, short = 'm')]
        model: Option<String>,
        #[arg(long)]
        outscale: Option<f64>,
        /// Replace a stored result of the same name made from other bytes or options.
        #[arg(long)]
        overwrite: bool,
        /// Format of the result (default PNG).
        #[arg(long, value_enum)]
        format: Option<Format>,
        /// Follow the task (progress on stderr) and download the result. Ctrl-C then asks
        /// whether to cancel the task on the server.
        #[arg(long)]
        wait: bool,
        /// With --wait: on Ctrl-C, cancel the task without asking.
        #[arg(long, requires = "wait")]
        cancel_on_interrupt: bool,
        /// Where --wait saves the result (default: <stem>_x<scale>.<ext> beside FILE).
        #[arg(short, long)]
        output: Option<PathBuf>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Show a task's state.
    Status {
        task_id: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Follow a task until it ends (progress on stderr).
    Watch {
        task_id: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Cancel a pending or running task: it leaves the queue, or stops part-way through its
    /// current tile; nothing is stored and its file name is freed.
    Cancel {
        task_id: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Ask a server whether it serves (grpc.health.v1): prints its status; exit 0 when
    /// SERVING, 1 when not (still starting, or a backend is down), 3 when unreachable. For
    /// container health checks.
    Health {
        /// Server address.
        #[arg(long, env = "UPSCALER_ADDR", default_value = "http://127.0.0.1:50051")]
        addr: String,
        /// CA certificate (PEM) to trust for an https:// address.
        #[arg(long, env = "UPSCALER_CA")]
        ca: Option<PathBuf>,
        /// The service to ask about; empty: the whole server.
        #[arg(long, default_value = "")]
        service: String,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 5.0, value_name = "SECS")]
        timeout: f64,
    },
    /// Check this installation: version, CPU path, weights (against weights/README.md),
    /// models, store and locks (reaching Redis and MongoDB when configured). Prints each
    /// problem with its fix; exit 1 when there is one. Reads the same settings as `serve`.
    Doctor {
        #[command(flatten)]
        settings: Box<upscaler::Settings>,
    },
    /// Delete a stored result by file name, freeing the name.
    Delete {
        name: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Download a stored result by file name.
    Fetch {
        name: String,
        /// Where to save it (default: NAME in the current directory).
        #[arg(short, long)]
        output: Option<PathBuf>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Upscale one image file.
    Upscale {
        input: PathBuf,
        #[arg(short, long)]
        output: PathBuf,
        #[command(flatten)]
        model: ModelArgs,
        /// Tile size in input pixels: a number (0 = whole image) or `auto`.
        #[arg(long, env = "UPSCALER_TILE", default_value = "auto")]
        tile: String,
        /// Working-memory budget per forward pass for `--tile auto`, in MiB.
        #[arg(long, env = "UPSCALER_TILE_MEMORY_MB", default_value_t = pipeline::DEFAULT_TILE_MEMORY >> 20)]
        tile_memory_mb: u64,
        #[arg(long, default_value_t = 10)]
        tile_pad: usize,
        #[arg(long, default_value_t = 0)]
        pre_pad: usize,
        /// Final scale relative to the input (default: the model's scale). Other values
        /// resize the network output with a Lanczos (a = 3) filter.
        #[arg(long)]
        outscale: Option<f64>,
        /// Output format (default: from the output extension, else PNG).
        #[arg(long, value_enum)]
        format: Option<Format>,
        #[arg(long, default_value_t = 95, value_parser = clap::value_parser!(u8).range(1..=100))]
        jpeg_quality: u8,
        #[arg(long, value_enum, default_value = "network")]
        alpha: Alpha,
        /// Largest accepted input, in pixels (width x height).
        #[arg(long, env = "UPSCALER_MAX_PIXELS", default_value_t = imaging::DEFAULT_MAX_PIXELS)]
        max_pixels: u64,
    },
    /// List the installed models: the shipped ones and those of the models folder, with
    /// their architecture, scale, channels, size, parameters and source file; files of the
    /// models folder that cannot be used are listed with the reason.
    Models {
        #[command(flatten)]
        folders: Folders,
        /// Print one JSON object per model.
        #[arg(long)]
        json: bool,
    },
    /// Convert an ncnn .param/.bin pair to the project's safetensors format.
    ConvertNcnn {
        /// Model (architecture) the files hold.
        #[arg(long, short = 'm')]
        model: String,
        /// The .param file; the .bin beside it is read too.
        param: PathBuf,
        #[arg(short, long)]
        output: PathBuf,
    },
    /// Time forward passes: seconds per pass and GFLOP/s per model and input size, with
    /// the CPU time, page faults and memory of the timed passes and the instruction set the
    /// fast path uses (`UPSCALER_ISA=avx2|avx512|baseline` picks another).
    Bench {
        /// Models to run (default: the shipped ones).
        #[arg(long, value_delimiter = ',')]
        models: Vec<String>,
        /// Square input sizes.
        #[arg(long, value_delimiter = ',', default_values_t = [64usize, 128])]
        sizes: Vec<usize>,
        /// Timed passes per case (median reported), after one warm-up pass.
        #[arg(long, default_value_t = 3)]
        runs: usize,
        #[command(flatten)]
        folders: Folders,
        /// Print one JSON object per case instead of a table.
        #[arg(long)]
        json: bool,
        /// Time candle's own convolutions (the reference) instead of the fast CPU path.
        #[arg(long)]
        reference: bool,
    },
}

/// An input file that cannot be read: the user's mistake, like a corrupt image.
#[derive(Debug, thiserror::Error)]
#[error("cannot read {path}: {cause}")]
struct UnreadableInput {
    path: String,
    cause: std::io::Error,
}

/// Exit status 2 for bad input, usage or setup (missing weights, a bad setting), 1 for
/// everything else.
fn exit_code(err: &anyhow::Error) -> u8 {
    let bad_input = err.chain().any(|e| {
        e.downcast_ref::<UnreadableInput>().is_some()
            || matches!(
                e.downcast_ref::<PipelineError>(),
                Some(PipelineError::Imaging(_) | PipelineError::InvalidOption(_))
            )
            || e.downcast_ref::<ImagingError>().is_some()
            || matches!(
                e.downcast_ref::<ModelError>(),
                Some(
                    ModelError::UnknownModel(_)
                        | ModelError::UnknownModelIn { .. }
                        | ModelError::WeightsMissing { .. }
                )
            )
            || matches!(
                e.downcast_ref::<ServeError>(),
                Some(ServeError::Setup(_) | ServeError::Config(_))
            )
    });
    if bad_input {
        2
    } else {
        1
    }
}

fn main() -> ExitCode {
    // Test builds only: failpoints named in FAILPOINTS (see tests/faults.rs).
    #[cfg(feature = "failpoints")]
    let _failpoints = fail::FailScenario::setup();
    // A `.env` file fills in settings the environment does not already set; flags override both.
    let _ = dotenvy::dotenv();
    let cli = Cli::parse();
    let (default_level, json) = match &cli.command {
        Command::Serve { settings } => (
            settings.log_level.clone(),
            settings.log_format == upscaler::config::LogFormat::Json,
        ),
        _ => ("warn".to_string(), false),
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("UPSCALER_LOG")
        .unwrap_or_else(|_| default_level.into());
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        logs.json().init();
    } else {
        logs.init();
    }
    let result = match cli.command {
        Command::Serve { settings } => serve(*settings),
        command @ (Command::Upload { .. }
        | Command::Status { .. }
        | Command::Watch { .. }
        | Command::Fetch { .. }
        | Command::Cancel { .. }
        | Command::Health { .. }
        | Command::Delete { .. }) => return client_command(command),
        Command::Doctor { settings } => return doctor(&settings),
        command => run(command),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // One line: the causes joined, no debug dump.
            let msg: Vec<String> = err.chain().map(|e| e.to_string()).collect();
            eprintln!("error: {}", msg.join(": "));
            ExitCode::from(exit_code(&err))
        }
    }
}

/// Runs a client command: results on stdout, progress and errors on stderr, and the exit code
/// of `ClientError::exit_code`.
fn client_command(command: Command) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run_client(command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

/// Prints the installation report; exit 1 when it finds a problem.
fn doctor(settings: &upscaler::Settings) -> ExitCode {
    let report = match tokio::runtime::Runtime::new() {
        Ok(r) => r.block_on(upscaler::doctor::examine(settings)),
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    print!("{}", report.text());
    if report.problems.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

async fn run_client(command: Command) -> Result<(), ClientError> {
    match command {
        Command::Health {
            addr,
            ca,
            service,
            timeout,
        } => {
            let timeout = std::time::Duration::try_from_secs_f64(timeout)
                .map_err(|_| ClientError::Input("--timeout must be a positive number".into()))?;
            let status = client::health(&addr, ca.as_deref(), &service, timeout).await?;
            println!("{}", status.as_str_name());
            match status {
                tonic_health::pb::health_check_response::ServingStatus::Serving => Ok(()),
                _ => Err(ClientError::Other(format!(
                    "{addr} is {}",
                    status.as_str_name()
                ))),
            }
        }
        Command::Upload {
            file,
            model,
            outscale,
            overwrite,
            format,
            wait,
            cancel_on_interrupt,
            output,
            client: args,
        } => {
            if !file.is_file() {
                return Err(ClientError::Input(format!(
                    "{}: no such file",
                    file.display()
                )));
            }
            let opts = client::UploadOptions {
                model,
                outscale,
                overwrite,
                format: match format {
                    None | Some(Format::Png) => pb::OutputFormat::Png,
                    Some(Format::Jpeg) => pb::OutputFormat::Jpeg,
                    Some(Format::Webp) => pb::OutputFormat::Webp,
                },
            };
            let (mut c, r) = client::when_ready(args.wait_ready(), || async {
                let mut c = args.connect().await?;
                let r = client::upload(&mut c, &file, &opts).await?;
                Ok((c, r))
            })
            .await?;
            let outcome = client::outcome_name(&r);
            if !wait {
                return print_result(
                    args.json,
                    serde_json::json!({
                        "task_id": r.task_id,
                        "file_name": r.file_name,
                        "outcome": outcome,
                    }),
                    format!("{outcome} {} task {}", r.file_name, r.task_id),
                );
            }
            eprintln!("{outcome} {} task {}", r.file_name, r.task_id);
            if r.outcome() != pb::UploadOutcome::AlreadyProcessed {
                let mut canceller = c.clone();
                let task = tokio::select! {
                    task = follow(&mut c, &r.task_id) => task?,
                    _ = tokio::signal::ctrl_c() => {
                        return Err(interrupted(&mut canceller, &r.task_id, cancel_on_interrupt).await);
                    }
                };
                ensure_success(&task)?;
            }
            let (meta, out) = client::fetch(&mut c, &r.file_name, |meta| match output {
                Some(o) => o,
                None => {
                    let scale = match outscale {
                        Some(f) => format!("{f}"),
                        None => model::find(&meta.model)
                            .map(|s| s.scale().to_string())
                            .unwrap_or_else(|_| "4".into()),
                    };
                    client::default_output(&file, &scale, &meta.content_type)
                }
            })
            .await?;
            print_fetched(args.json, &r.task_id, &meta, &out)
        }
        Command::Status {
            task_id,
            client: args,
        } => {
            let task = client::when_ready(args.wait_ready(), || async {
                client::get_task(&mut args.connect().await?, &task_id).await
            })
            .await?;
            print_task(args.json, &task)?;
            ensure_not_failed(&task)
        }
        Command::Watch {
            task_id,
            client: args,
        } => {
            let mut c = client::when_ready(args.wait_ready(), || async {
                let mut c = args.connect().await?;
                // A cheap first call, so a starting server is waited for here.
                client::get_task(&mut c, &task_id).await?;
                Ok(c)
            })
            .await?;
            let task = follow(&mut c, &task_id).await?;
            print_task(args.json, &task)?;
            ensure_success(&task)
        }
        Command::Fetch {
            name,
            output,
            client: args,
        } => {
            let (meta, out) = client::when_ready(args.wait_ready(), || async {
                let mut c = args.connect().await?;
                let out = output.clone().unwrap_or_else(|| PathBuf::from(&name));
                client::fetch(&mut c, &name, |_| out).await
            })
            .await?;
            print_fetched(args.json, &meta.task_id, &meta, &out)
        }
        Command::Cancel {
            task_id,
            client: args,
        } => {
            let task = client::when_ready(args.wait_ready(), || async {
                client::cancel(&mut args.connect().await?, &task_id).await
            })
            .await?;
            print_task(args.json, &task)?;
            if task.cancel_requested {
                eprintln!(
                    "the instance running task {task_id} has not stopped it yet; it stops as soon as it hears of it"
                );
            }
            Ok(())
        }
        Command::Delete { name, client: args } => {
            let deleted = client::when_ready(args.wait_ready(), || async {
                client::delete(&mut args.connect().await?, &name).await
            })
            .await?;
            print_result(
                args.json,
                serde_json::json!({
                    "file_name": deleted.file_name,
                    "deleted": true,
                    "size": deleted.size,
                }),
                format!("DELETED {} ({} bytes)", deleted.file_name, deleted.size),
            )
        }
        _ => unreachable!("not a client command"),
    }
}

/// Ctrl-C while `upload --wait` follows a task: cancel it on the server if asked to (or told
/// to with --cancel-on-interrupt); either way the command ends as interrupted.
async fn interrupted(c: &mut client::Client, task_id: &str, without_asking: bool) -> ClientError {
    eprintln!();
    let cancel = without_asking
        || confirm(&format!(
            "interrupted: cancel task {task_id} on the server? [y/N] "
        ))
        .await;
    if !cancel {
        return ClientError::Interrupted(format!(
            "interrupted; task {task_id} goes on on the server (`upscaler watch {task_id}` to follow it, `upscaler cancel {task_id}` to stop it)"
        ));
    }
    match client::cancel(c, task_id).await {
        Ok(t) => ClientError::Interrupted(format!(
            "interrupted; task {task_id} is {}{}",
            client::state_name(&t),
            if t.cancel_requested {
                " (it stops as soon as its instance hears of it)"
            } else {
                ""
            }
        )),
        Err(e) => ClientError::Interrupted(format!(
            "interrupted; cancelling task {task_id} failed: {e}"
        )),
    }
}

/// Asks a yes/no question on stderr and reads the answer from stdin; no answer (end of
/// input, or a second Ctrl-C) is no.
async fn confirm(question: &str) -> bool {
    eprint!("{question}");
    let answer = tokio::task::spawn_blocking(|| {
        let mut line = String::new();
        std::io::stdin().read_line(&mut line).map(|_| line)
    });
    tokio::select! {
        answer = answer => matches!(
            answer,
            Ok(Ok(line)) if matches!(line.trim().to_ascii_lowercase().as_str(), "y" | "yes")
        ),
        _ = tokio::signal::ctrl_c() => false,
    }
}

/// Watches a task with a progress bar on stderr.
async fn follow(c: &mut client::Client, task_id: &str) -> Result<pb::Task, ClientError> {
    let bar = ProgressBar::new(0).with_style(
        ProgressStyle::with_template(
            "{spinner} {msg} [{bar:30}] {pos}/{len} tiles, {elapsed} elapsed, ETA {eta}",
        )
        .expect("valid template"),
    );
    let task = client::watch(c, task_id, |t| {
        bar.set_length(t.tiles_total as u64);
        bar.set_position(t.tiles_done as u64);
        let state = client::state_name(t);
        if t.queue_position > 0 {
            bar.set_message(format!(
                "{state} ({} in the queue)",
                ordinal(t.queue_position)
            ));
        } else {
            bar.set_message(state);
        }
    })
    .await;
    bar.finish_and_clear();
    task
}

fn ensure_not_failed(task: &pb::Task) -> Result<(), ClientError> {
    if task.state() == pb::TaskState::Failure {
        return Err(ClientError::TaskFailed {
            task_id: task.task_id.clone(),
            error: task.error.clone(),
        });
    }
    Ok(())
}

fn ensure_success(task: &pb::Task) -> Result<(), ClientError> {
    ensure_not_failed(task)?;
    if task.state() == pb::TaskState::Success {
        return Ok(());
    }
    Err(ClientError::Other(format!(
        "task {} is {}",
        task.task_id,
        client::state_name(task)
    )))
}

fn print_result(json: bool, value: serde_json::Value, human: String) -> Result<(), ClientError> {
    if json {
        println!("{value}");
    } else {
        println!("{human}");
    }
    Ok(())
}

fn print_task(json: bool, t: &pb::Task) -> Result<(), ClientError> {
    let time = |ts: &Option<prost_types::Timestamp>| {
        ts.as_ref().map(|t| t.seconds as f64 + t.nanos as f64 / 1e9)
    };
    let state = client::state_name(t);
    let mut human = format!(
        "{state} {} task {} ({}, {}/{} tiles, {}x{}",
        t.file_name, t.task_id, t.model, t.tiles_done, t.tiles_total, t.input_width, t.input_height
    );
    if t.output_width > 0 {
        human += &format!(" -> {}x{}", t.output_width, t.output_height);
    }
    if t.queue_position > 0 {
        human += &format!(", {} in the queue", ordinal(t.queue_position));
    }
    human += ")";
    if !t.error.is_empty() {
        human += &format!(": {}", t.error);
    }
    print_result(
        json,
        serde_json::json!({
            "task_id": t.task_id,
            "state": state,
            "file_name": t.file_name,
            "model": t.model,
            "tiles_done": t.tiles_done,
            "tiles_total": t.tiles_total,
            "error": t.error,
            "input_width": t.input_width,
            "input_height": t.input_height,
            "output_width": t.output_width,
            "output_height": t.output_height,
            "created_at": time(&t.created_at),
            "started_at": time(&t.started_at),
            "finished_at": time(&t.finished_at),
            "queue_position": t.queue_position,
            "cancel_requested": t.cancel_requested,
        }),
        human,
    )
}

/// 1st, 2nd, 3rd, 4th, ..., 11th, 12th, 13th, 21st.
fn ordinal(n: u32) -> String {
    let suffix = match (n % 10, n % 100) {
        (_, 11..=13) => "th",
        (1, _) => "st",
        (2, _) => "nd",
        (3, _) => "rd",
        _ => "th",
    };
    format!("{n}{suffix}")
}

fn print_fetched(
    json: bool,
    task_id: &str,
    meta: &pb::ResultMetadata,
    out: &Path,
) -> Result<(), ClientError> {
    print_result(
        json,
        serde_json::json!({
            "task_id": task_id,
            "file_name": meta.file_name,
            "output": out.display().to_string(),
            "content_type": meta.content_type,
            "size": meta.size,
            "width": meta.width,
            "height": meta.height,
            "sha256": meta.sha256,
            "model": meta.model,
        }),
        format!(
            "SUCCESS {} -> {} ({}x{}, {} bytes)",
            meta.file_name,
            out.display(),
            meta.width,
            meta.height,
            meta.size
        ),
    )
}

fn serve(settings: upscaler::Settings) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(upscaler::run(settings, shutdown_signal()))?;
    tracing::info!("stopped");
    Ok(())
}

/// Completes on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}

fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Serve { .. }
        | Command::Upload { .. }
        | Command::Status { .. }
        | Command::Watch { .. }
        | Command::Fetch { .. }
        | Command::Cancel { .. }
        | Command::Health { .. }
        | Command::Doctor { .. }
        | Command::Delete { .. } => unreachable!("handled in main"),
        Command::Upscale {
            input,
            output,
            model,
            tile,
            tile_memory_mb,
            tile_pad,
            pre_pad,
            outscale,
            format,
            jpeg_quality,
            alpha,
            max_pixels,
        } => {
            let tile = match tile.as_str() {
                "auto" => TileSize::Auto {
                    memory_budget: tile_memory_mb << 20,
                },
                n => TileSize::Fixed(n.parse().map_err(|_| {
                    PipelineError::InvalidOption(format!(
                        "--tile must be a number or `auto`, got `{n}`"
                    ))
                })?),
            };
            let opts = EnhanceOptions {
                tile,
                tile_pad,
                pre_pad,
                outscale,
                alpha: match alpha {
                    Alpha::Network => AlphaMode::Network,
                    Alpha::Bilinear => AlphaMode::Bilinear,
                },
                max_pixels,
            };
            let format = output_format(format, &output, jpeg_quality)?;
            upscale_file(&input, &output, &model, &opts, format)
        }
        Command::Models { folders, json } => {
            let found = folders.catalog();
            let mut lines = Vec::new();
            if !json {
                lines.push(format!(
                    "{:<28} {:>5} {:<16} {:<4} {:<26} {:>8} {:<28} {:<9} description",
                    "name", "scale", "architecture", "io", "size", "params", "file", "path"
                ));
            }
            for e in found.entries() {
                let (cin, cout) = e.spec.arch.channels();
                let fast = e.fast_path(None);
                lines.push(if json {
                    serde_json::json!({
                        "name": e.spec.name,
                        "architecture": e.spec.arch.name(),
                        "scale": e.spec.scale(),
                        "in_channels": cin,
                        "out_channels": cout,
                        "size": e.size_text(),
                        "parameters": e.parameters,
                        "source": e.source_text(),
                        "shipped": e.spec.shipped,
                        "fast_path": fast,
                        "description": e.spec.description,
                    })
                    .to_string()
                } else {
                    format!(
                        "{:<28} {:>4}x {:<16} {}->{} {:<26} {:>8} {:<28} {:<9} {}",
                        e.spec.name,
                        e.spec.scale(),
                        e.spec.arch.name(),
                        cin,
                        cout,
                        e.size_text(),
                        e.parameters_text(),
                        e.file.file_name().unwrap_or_default().to_string_lossy(),
                        if fast { "fast" } else { "reference" },
                        e.spec.description
                    )
                });
            }
            print_lines(&lines);
            for p in found.problems() {
                eprintln!("skipped {p}");
            }
            Ok(())
        }
        Command::ConvertNcnn {
            model,
            param,
            output,
        } => {
            let spec = model::find(&model)?;
            let tensors = weights::read_ncnn(&spec.arch, &param, &param.with_extension("bin"))?;
            // Prove the result loads before writing it.
            weights::build_checked(&spec.arch, tensors.clone(), &candle_core::Device::Cpu)?;
            weights::write_safetensors(&tensors, &output)?;
            eprintln!("wrote {} ({} tensors)", output.display(), tensors.len());
            Ok(())
        }
        Command::Bench {
            models,
            sizes,
            runs,
            folders,
            json,
            reference,
        } => {
            let names: Vec<String> = if models.is_empty() {
                registry::REGISTRY
                    .iter()
                    .filter(|s| s.shipped && s.resize.is_none())
                    .map(|s| s.name.to_string())
                    .collect()
            } else {
                models
            };
            if !json {
                println!(
                    "{:<24} {:>9} {:>9} {:>9} {:>9} {:>8} {:>8} {:>9} {:>9} {:>10}",
                    "model",
                    "path",
                    "input",
                    "s/pass",
                    "GFLOP/s",
                    "user s",
                    "sys s",
                    "faults",
                    "peak RSS",
                    "arena"
                );
            }
            for name in names {
                let args = ModelArgs {
                    model: Some(name),
                    folders: folders.clone(),
                    weights: None,
                };
                let model = args.load(Prepare::Once)?;
                let model = if reference { model.reference() } else { model };
                for &size in &sizes {
                    let r = upscaler::bench::bench_forward(&model, size, runs)?;
                    if json {
                        println!("{}", serde_json::to_string(&r)?);
                    } else {
                        let mib = |b: u64| format!("{} MiB", b >> 20);
                        let rss = r.peak_rss_bytes.map(mib).unwrap_or_default();
                        let u = r.usage.unwrap_or_default();
                        println!(
                            "{:<24} {:>9} {:>9} {:>9.3} {:>9.1} {:>8.3} {:>8.3} {:>9} {:>9} {:>10}",
                            r.model,
                            r.isa.unwrap_or(r.path),
                            format!("{}x{}", r.width, r.height),
                            r.seconds,
                            r.gflops_per_s,
                            u.user_seconds,
                            u.sys_seconds,
                            u.minor_faults + u.major_faults,
                            rss,
                            mib(model.arena_bytes() as u64)
                        );
                    }
                }
            }
            Ok(())
        }
    }
}

fn output_format(
    format: Option<Format>,
    output: &Path,
    quality: u8,
) -> Result<OutputFormat, PipelineError> {
    let ext = output
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    Ok(match (format, ext.as_deref()) {
        (Some(Format::Png), _) | (None, Some("png")) | (None, None) => OutputFormat::Png,
        (Some(Format::Jpeg), _) | (None, Some("jpg" | "jpeg")) => OutputFormat::Jpeg(quality),
        (Some(Format::Webp), _) | (None, Some("webp")) => OutputFormat::WebP,
        (None, Some(other)) => {
            return Err(PipelineError::InvalidOption(format!(
                "cannot tell the output format from `.{other}`: use .png, .jpg or .webp, or pass --format"
            )))
        }
    })
}

fn upscale_file(
    input: &Path,
    output: &Path,
    model_args: &ModelArgs,
    opts: &EnhanceOptions,
    format: OutputFormat,
) -> anyhow::Result<()> {
    let bytes = std::fs::read(input).map_err(|cause| UnreadableInput {
        path: input.display().to_string(),
        cause,
    })?;
    // Check the input before the (slow) model load.
    let img = imaging::decode(&bytes, opts.max_pixels).map_err(PipelineError::from)?;
    imaging::ensure_encodable(img.color().has_alpha(), format).map_err(PipelineError::from)?;
    // With one or two passes the weights are put in the Winograd domain pass by pass
    // instead of kept: for x4plus that saves faulting in 475 MB (about 0.25 s and 400 MB of
    // peak RSS) and costs about 0.1 s per pass, so more passes keep them.
    let entry = model_args.entry()?;
    let arch = &entry.spec.arch;
    let (w, h) = (img.width() as usize, img.height() as usize);
    let passes = pipeline::planned_passes(arch, opts, w, h, img.color().has_alpha());
    let prepare = if passes <= 2 {
        Prepare::PerCall
    } else {
        Prepare::Once
    };
    let model = entry.load(&candle_core::Device::Cpu, prepare)?;
    let started = Instant::now();
    let bar = ProgressBar::new(0);
    let interactive = std::io::stderr().is_terminal();
    if interactive {
        bar.set_style(
            ProgressStyle::with_template(
                "{spinner} tiles {pos}/{len} [{bar:30}] {elapsed} (eta {eta})",
            )
            .expect("valid template"),
        );
    } else {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let mut on_progress = |p: Progress| {
        bar.set_length(p.total as u64);
        bar.set_position(p.done as u64);
        if !interactive && p.done > 0 {
            eprintln!(
                "tile {}/{} ({:.1}s)",
                p.done,
                p.total,
                started.elapsed().as_secs_f64()
            );
        }
        ControlFlow::Continue(())
    };
    let out = pipeline::enhance(&model, &img, opts, &mut on_progress)?;
    bar.finish_and_clear();
    let encoded = imaging::encode(&out, format).map_err(PipelineError::from)?;
    write_atomically(output, &encoded)?;
    eprintln!(
        "{} -> {} ({}x{} -> {}x{}, {}, {:.1}s)",
        input.display(),
        output.display(),
        img.width(),
        img.height(),
        out.width(),
        out.height(),
        model.spec().name,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Writes beside the target and renames, so a failed run never leaves a half-written file.
fn write_atomically(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mut builder = tempfile::Builder::new();
    #[cfg(unix)]
    builder.permissions(std::os::unix::fs::PermissionsExt::from_mode(0o644));
    let mut tmp = builder
        .tempfile_in(dir)
        .with_context(|| format!("cannot write in {}", dir.display()))?;
    std::io::Write::write_all(&mut tmp, bytes)?;
    tmp.persist(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

/// Prints `lines` to stdout, stopping quietly when the reader has gone (`upscaler models | head`).
fn print_lines(lines: &[String]) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    for line in lines {
        if writeln!(out, "{line}").is_err() {
            return;
        }
    }
    let _ = out.flush();
}
