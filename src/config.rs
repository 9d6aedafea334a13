//! Service settings: built-in defaults, overridden by the environment (and a `.env` file,
//! loaded by `main`), overridden by command-line flags. Validated once at start.
//!
//! The only module besides `main` that reads the environment (through clap's `env`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::model::registry;
use crate::pipeline::TileSize;

#[derive(Debug, Clone, clap::Args)]
pub struct Settings {
    /// Address the server listens on: gRPC, gRPC-Web, the HTTP routes and the page.
    #[arg(long, env = "LISTEN_ADDR", default_value = "0.0.0.0:50051")]
    pub listen_addr: SocketAddr,
    /// Redis for file-name locks, e.g. redis://127.0.0.1:6379. Unset: in-process locks.
    #[arg(long, env = "REDIS_URL")]
    pub redis_url: Option<String>,
    /// MongoDB for task records and results, e.g. mongodb://127.0.0.1:27017. Unset: files
    /// under DATA_DIR.
    #[arg(long, env = "MONGO_URI", hide_env_values = true)]
    pub mongo_uri: Option<String>,
    /// MongoDB database name.
    #[arg(long, env = "MONGO_DATABASE", default_value = "upscaler")]
    pub mongo_database: String,
    /// Directory of the embedded store (used when MONGO_URI is unset) and of MODELS_DIR by
    /// default: the user's data folder unless set.
    #[arg(long, env = "DATA_DIR", default_value_os_t = default_data_dir())]
    pub data_dir: PathBuf,
    /// Directory for uploads waiting to be processed.
    #[arg(long, env = "TEMP_DIR", default_value_os_t = std::env::temp_dir().join("upscaler"))]
    pub temp_dir: PathBuf,
    /// Directory holding `<model>.safetensors`, searched before ./weights, `weights/` beside
    /// the executable, `<exe>/../share/upscaler/weights` and the source tree.
    #[arg(long, env = "UPSCALER_WEIGHTS_DIR")]
    pub weights_dir: Option<PathBuf>,
    /// Directory of your own models (`.pth`, `.safetensors`, ncnn `.param` + `.bin`), each
    /// named by its file stem; scanned at start and on SIGHUP [default: DATA_DIR/models]
    #[arg(long, env = "MODELS_DIR")]
    pub models_dir: Option<PathBuf>,
    /// Concurrent inference workers. Each inference already uses every core.
    #[arg(long, env = "WORKERS", default_value_t = 1)]
    pub workers: usize,
    /// Tasks waiting for a worker before uploads are refused with RESOURCE_EXHAUSTED.
    #[arg(long, env = "QUEUE_CAPACITY", default_value_t = 64)]
    pub queue_capacity: usize,
    /// Largest accepted upload, in bytes.
    #[arg(long, env = "MAX_UPLOAD_BYTES", default_value_t = 50 * 1024 * 1024)]
    pub max_upload_bytes: u64,
    /// Largest accepted image, in pixels (width x height).
    #[arg(long, env = "MAX_PIXELS", default_value_t = crate::imaging::DEFAULT_MAX_PIXELS)]
    pub max_pixels: u64,
    /// Model used when an upload names none.
    #[arg(long, env = "DEFAULT_MODEL", default_value = registry::DEFAULT_MODEL)]
    pub default_model: String,
    /// Tile size in input pixels (0 = whole image) or `auto` (fit TILE_MEMORY_MB).
    #[arg(long, env = "TILE", default_value = "auto")]
    pub tile: String,
    /// Working-memory budget of one forward pass for automatic tiles, in MiB.
    #[arg(long, env = "TILE_MEMORY_MB", default_value_t = crate::pipeline::DEFAULT_TILE_MEMORY >> 20)]
    pub tile_memory_mb: u64,
    /// Context read around each tile, in input pixels.
    #[arg(long, env = "TILE_PAD", default_value_t = 10)]
    pub tile_pad: usize,
    /// How long finished task records are kept, in seconds (default 7 days).
    #[arg(long, env = "TASK_TTL_SECS", default_value_t = 7 * 24 * 3600)]
    pub task_ttl_secs: u64,
    /// How long results are kept, in seconds; unset: forever. Older ones are deleted by the
    /// sweeper that runs on every instance.
    #[arg(long, env = "RESULT_TTL_SECS")]
    pub result_ttl_secs: Option<u64>,
    /// Uploads that no unfinished task needs (left by an instance that died between storing
    /// an upload and recording its task) are deleted once older than this, in seconds. The
    /// bytes of a replaced or deleted result are kept this long too, so a fetch that was
    /// already streaming them finishes.
    #[arg(long, env = "ORPHAN_GRACE_SECS", default_value_t = 600)]
    pub orphan_grace_secs: u64,
    /// How often the sweeper looks for expired results, orphaned uploads and expired task
    /// records, in seconds.
    #[arg(long, env = "SWEEP_INTERVAL_SECS", default_value_t = 60)]
    pub sweep_interval_secs: u64,
    /// TTL of a file-name lock, in seconds; renewed every third of it while the task lives.
    #[arg(long, env = "LOCK_TTL_SECS", default_value_t = 30)]
    pub lock_ttl_secs: u64,
    /// Prefix of the Redis keys this service uses.
    #[arg(long, env = "REDIS_PREFIX", default_value = "upscaler")]
    pub redis_prefix: String,
    /// Address of the Prometheus endpoint (`GET /metrics`), e.g. 0.0.0.0:9090; unset: off.
    #[arg(long, env = "METRICS_ADDR")]
    pub metrics_addr: Option<SocketAddr>,
    /// PEM certificate chain for TLS; with TLS_KEY, the server speaks only TLS (ALPN: h2 and
    /// http/1.1).
    #[arg(long, env = "TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for TLS_CERT.
    #[arg(long, env = "TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// Bearer token every RPC but health, and every HTTP route but the page, requires
    /// (`authorization: Bearer <token>`); unset: no authentication.
    #[arg(long, env = "AUTH_TOKEN", hide_env_values = true)]
    pub auth_token: Option<Secret>,
    /// Log format: `text` for people, `json` (one object per line) for log collectors.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Log filter (tracing-subscriber syntax), e.g. `info` or `upscaler=debug`.
    #[arg(long, env = "LOG_LEVEL", default_value = "info")]
    pub log_level: String,
}

#[derive(Debug, thiserror::Error)]
#[error("invalid setting {name}: {reason}")]
pub struct ConfigError {
    pub name: &'static str,
    pub reason: String,
}

fn invalid(name: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError {
        name,
        reason: reason.into(),
    }
}

impl Settings {
    /// Checks the values clap cannot, so a bad setting fails at start with its name.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.workers == 0 {
            return Err(invalid("WORKERS", "must be at least 1"));
        }
        if self.queue_capacity == 0 {
            return Err(invalid("QUEUE_CAPACITY", "must be at least 1"));
        }
        if self.max_upload_bytes == 0 || self.max_pixels == 0 {
            return Err(invalid("MAX_UPLOAD_BYTES/MAX_PIXELS", "must be positive"));
        }
        if self.lock_ttl_secs < 3 {
            return Err(invalid("LOCK_TTL_SECS", "must be at least 3 seconds"));
        }
        // The default model may come from MODELS_DIR: it is looked up when the models are
        // scanned, and a missing one stops the start there.
        if self.default_model.trim().is_empty() {
            return Err(invalid("DEFAULT_MODEL", "must not be empty"));
        }
        if self.result_ttl_secs == Some(0) {
            return Err(invalid(
                "RESULT_TTL_SECS",
                "must be at least 1 second (unset it to keep results forever)",
            ));
        }
        if self.sweep_interval_secs == 0 {
            return Err(invalid("SWEEP_INTERVAL_SECS", "must be at least 1 second"));
        }
        self.tile_size()?;
        if self
            .auth_token
            .as_ref()
            .is_some_and(|t| t.expose().trim().is_empty())
        {
            return Err(invalid("AUTH_TOKEN", "must not be empty when set"));
        }
        Ok(())
    }

    pub fn tile_size(&self) -> Result<TileSize, ConfigError> {
        match self.tile.as_str() {
            "auto" => Ok(TileSize::Auto {
                memory_budget: self.tile_memory_mb << 20,
            }),
            n => n
                .parse()
                .map(TileSize::Fixed)
                .map_err(|_| invalid("TILE", format!("expected a number or `auto`, got `{n}`"))),
        }
    }

    pub fn task_ttl(&self) -> Duration {
        Duration::from_secs(self.task_ttl_secs)
    }

    pub fn result_ttl(&self) -> Option<Duration> {
        self.result_ttl_secs.map(Duration::from_secs)
    }

    pub fn orphan_grace(&self) -> Duration {
        Duration::from_secs(self.orphan_grace_secs)
    }

    pub fn sweep_interval(&self) -> Duration {
        Duration::from_secs(self.sweep_interval_secs)
    }

    pub fn lock_ttl(&self) -> Duration {
        Duration::from_secs(self.lock_ttl_secs)
    }

    /// MODELS_DIR, or `models/` in DATA_DIR.
    pub fn models_dir(&self) -> PathBuf {
        self.models_dir
            .clone()
            .unwrap_or_else(|| default_models_dir(&self.data_dir))
    }

    /// Settings for tests and embedding: defaults with the given directories.
    pub fn for_dirs(data_dir: PathBuf, temp_dir: PathBuf, weights_dir: PathBuf) -> Self {
        #[derive(clap::Parser)]
        struct Wrapper {
            #[command(flatten)]
            settings: Settings,
        }
        let mut s = <Wrapper as clap::Parser>::parse_from(["upscaler"]).settings;
        s.data_dir = data_dir;
        s.temp_dir = temp_dir;
        s.weights_dir = Some(weights_dir);
        s
    }
}

/// DATA_DIR when unset: the user's data folder (`$XDG_DATA_HOME/upscaler`, else
/// `~/.local/share/upscaler` on Linux; the platform's own elsewhere), so every start finds
/// the same store whatever the current folder. Without a home folder: `data`.
pub fn default_data_dir() -> PathBuf {
    directories::ProjectDirs::from("", "", "upscaler")
        .map(|d| d.data_dir().to_path_buf())
        .unwrap_or_else(|| PathBuf::from("data"))
}

/// MODELS_DIR when unset.
pub fn default_models_dir(data_dir: &std::path::Path) -> PathBuf {
    data_dir.join("models")
}

/// A credential: never printed, compared in constant time.
#[derive(Clone)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// Constant-time comparison, so the time taken says nothing about the token.
    pub fn matches(&self, candidate: &[u8]) -> bool {
        use subtle::ConstantTimeEq;
        self.0.as_bytes().ct_eq(candidate).into()
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Self(s.to_string()))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}
