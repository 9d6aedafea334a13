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

use upscaler::imaging::{self, ImagingError, OutputFormat};
use upscaler::model::{self, registry, weights, Model, ModelError, Progress};
use upscaler::pipeline::{self, AlphaMode, EnhanceOptions, PipelineError, TileSize};

#[derive(Parser)]
#[command(name = "upscaler", version, about = "Real-ESRGAN image upscaling")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args, Clone)]
struct ModelArgs {
    /// Model name (see `upscaler models`).
    #[arg(long, short = 'm', env = "UPSCALER_MODEL", default_value = registry::DEFAULT_MODEL)]
    model: String,
    /// Directory holding `<model>.safetensors`.
    #[arg(long, env = "UPSCALER_WEIGHTS_DIR", default_value = "weights")]
    weights_dir: PathBuf,
    /// A weights file to use instead (.safetensors, PyTorch .pth, or ncnn .param/.bin).
    #[arg(long)]
    weights: Option<PathBuf>,
}

impl ModelArgs {
    fn load(&self) -> Result<Model, ModelError> {
        let spec = model::find(&self.model)?;
        let path = match &self.weights {
            Some(p) => p.clone(),
            None => self.weights_dir.join(spec.weights_file_name()),
        };
        Model::load(spec, &path, &candle_core::Device::Cpu)
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum Format {
    Png,
    Jpeg,
}

#[derive(Clone, Copy, ValueEnum)]
enum Alpha {
    /// Run alpha through the network (Real-ESRGAN's default).
    Network,
    /// Resize alpha bilinearly.
    Bilinear,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gRPC service (settings from flags, the environment or a .env file).
    Serve {
        #[command(flatten)]
        settings: Box<upscaler::Settings>,
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
    /// List the models and whether their weights are present.
    Models {
        #[arg(long, env = "UPSCALER_WEIGHTS_DIR", default_value = "weights")]
        weights_dir: PathBuf,
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
    /// Time forward passes: seconds per pass and GFLOP/s per model and input size.
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
        #[arg(long, env = "UPSCALER_WEIGHTS_DIR", default_value = "weights")]
        weights_dir: PathBuf,
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

/// Exit status 2 for bad input or usage, 1 for everything else.
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
                Some(ModelError::UnknownModel(_))
            )
    });
    if bad_input {
        2
    } else {
        1
    }
}

fn main() -> ExitCode {
    // A `.env` file fills in settings the environment does not already set; flags override both.
    let _ = dotenvy::dotenv();
    let cli = Cli::parse();
    let default_level = match &cli.command {
        Command::Serve { settings } => settings.log_level.clone(),
        _ => "warn".to_string(),
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("UPSCALER_LOG")
                .unwrap_or_else(|_| default_level.into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let result = match cli.command {
        Command::Serve { settings } => serve(*settings),
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
        Command::Serve { .. } => unreachable!("handled in main"),
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
        Command::Models { weights_dir } => {
            for spec in registry::REGISTRY.iter() {
                let present = weights_dir.join(spec.weights_file_name()).exists();
                println!(
                    "{:<24} {}x  {:<16} {:<8} {}",
                    spec.name,
                    spec.arch.scale(),
                    spec.arch.name(),
                    if present { "ready" } else { "no weights" },
                    spec.description
                );
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
            weights_dir,
            json,
            reference,
        } => {
            let names: Vec<String> = if models.is_empty() {
                registry::REGISTRY
                    .iter()
                    .filter(|s| s.shipped)
                    .map(|s| s.name.to_string())
                    .collect()
            } else {
                models
            };
            if !json {
                println!(
                    "{:<24} {:>9} {:>9} {:>10} {:>10} {:>9} {:>10}",
                    "model", "path", "input", "s/pass", "GFLOP", "GFLOP/s", "peak RSS"
                );
            }
            for name in names {
                let args = ModelArgs {
                    model: name,
                    weights_dir: weights_dir.clone(),
                    weights: None,
                };
                let model = args.load()?;
                let model = if reference { model.reference() } else { model };
                for &size in &sizes {
                    let r = upscaler::bench::bench_forward(&model, size, runs)?;
                    if json {
                        println!("{}", serde_json::to_string(&r)?);
                    } else {
                        let rss = r
                            .peak_rss_bytes
                            .map(|b| format!("{} MiB", b >> 20))
                            .unwrap_or_default();
                        println!(
                            "{:<24} {:>9} {:>9} {:>10.3} {:>10.1} {:>9.1} {:>10}",
                            r.model,
                            r.path,
                            format!("{}x{}", r.width, r.height),
                            r.seconds,
                            r.gflop,
                            r.gflops_per_s,
                            rss
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
        (None, Some(other)) => {
            return Err(PipelineError::InvalidOption(format!(
                "cannot tell the output format from `.{other}`: use .png or .jpg, or pass --format"
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
    let model = model_args.load()?;
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
