//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use upscaler::model::{self, Model};

/// Defines one test per scenario and backend: `embedded::NAME` and `real::NAME` (skipped,
/// or failed under CI, without `UPSCALER_TEST_REDIS_URL` and `UPSCALER_TEST_MONGO_URI`),
/// each calling `NAME(place)`. The calling file imports `Place`, `Backend` and `srv`.
#[macro_export]
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod embedded {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Place::new(super::Backend::Embedded)).await;
                }
            )*
        }
        mod real {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    if let Some(b) = super::srv::real_backend(stringify!($name)) {
                        super::$name(super::Place::new(b)).await;
                    }
                }
            )*
        }
    };
}

pub fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

pub fn fixture(name: &str) -> PathBuf {
    root().join("tests/fixtures").join(name)
}

/// Loads a shipped model once per test binary.
pub fn model(name: &str) -> Arc<Model> {
    static CACHE: OnceLock<Mutex<HashMap<String, Arc<Model>>>> = OnceLock::new();
    let mut cache = CACHE.get_or_init(Default::default).lock().unwrap();
    cache
        .entry(name.to_string())
        .or_insert_with(|| {
            let spec = model::find(name).unwrap();
            let path = root().join("weights").join(spec.weights_file_name());
            Arc::new(Model::load(spec, &path, &candle_core::Device::Cpu).unwrap())
        })
        .clone()
}

/// The largest absolute difference between two tensors of one shape.
pub fn max_abs_diff(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Pixel comparison: (max abs difference, fraction of identical values).
pub fn compare(a: &[u8], b: &[u8]) -> (u8, f64) {
    assert_eq!(a.len(), b.len(), "images differ in size");
    let mut max = 0u8;
    let mut same = 0usize;
    for (x, y) in a.iter().zip(b) {
        let d = x.abs_diff(*y);
        max = max.max(d);
        same += (d == 0) as usize;
    }
    (max, same as f64 / a.len() as f64)
}
pub mod cluster;
pub mod http;
pub mod server;

/// The Python named by `UPSCALER_TEST_PYTHON` (with the test packages installed), or `None`
/// after a loud message; under CI its absence is a failure.
pub fn python(test: &str, needs: &str) -> Option<String> {
    match std::env::var("UPSCALER_TEST_PYTHON") {
        Ok(p) => Some(p),
        Err(_) => skip_or_fail(&format!("{test}: needs UPSCALER_TEST_PYTHON ({needs})")),
    }
}

/// Skips a test whose tools are missing, loudly; under CI, fails it instead.
pub fn skip_or_fail<T>(msg: &str) -> Option<T> {
    if std::env::var_os("CI").is_some() {
        panic!("{msg}");
    }
    eprintln!("SKIPPED: {msg}");
    None
}

/// Runs a program off the async executor and returns its output.
pub async fn output(mut command: std::process::Command) -> std::process::Output {
    tokio::task::spawn_blocking(move || command.output().expect("the program runs"))
        .await
        .unwrap()
}

/// PEM files for TLS tests, made with the `openssl` command in a folder of the caller's.
pub struct TestCerts {
    /// A throw-away certificate authority: what clients trust.
    pub ca: PathBuf,
    /// The server's certificate for `localhost`, signed by `ca`, and its key.
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A CA and a `localhost` server certificate signed by it. A real chain rather than one
/// self-signed leaf: OpenSSL (Python's `ssl`) refuses a leaf as its own trust anchor.
pub fn test_certs(dir: &Path) -> TestCerts {
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=DNS:localhost\nbasicConstraints=critical,CA:FALSE\n\
         keyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n\
         authorityKeyIdentifier=keyid,issuer\n",
    )
    .unwrap();
    let ec = "-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes";
    for step in [
        format!("req -x509 {ec} -days 1 -subj /CN=upscaler-test-CA -keyout ca.key -out ca.pem"),
        format!("req {ec} -subj /CN=localhost -keyout key.pem -out server.csr"),
        "x509 -req -days 1 -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial \
         -extfile server.ext -out cert.pem"
            .to_string(),
    ] {
        let made = std::process::Command::new("openssl")
            .args(step.split_whitespace())
            .current_dir(dir)
            .output()
            .expect("openssl runs");
        assert!(
            made.status.success(),
            "openssl {step}: {}",
            String::from_utf8_lossy(&made.stderr)
        );
    }
    TestCerts {
        ca: dir.join("ca.pem"),
        cert: dir.join("cert.pem"),
        key: dir.join("key.pem"),
    }
}
