//! The binary run from anywhere: installed into a folder of its own and started from another,
//! it finds the weights where the README says to put them (or carries them, built with
//! `embed-weights`), says where it looked when it cannot, and answers `health` and `doctor`.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::server::{self as srv, Backend, Place, Server};

const MODEL: &str = "realesr-animevideov3";
const WEIGHTS: &str = "realesr-animevideov3.safetensors";

/// The built binary placed at `<root>/<rel>` (a hard link where possible: it is large).
struct Installed {
    root: tempfile::TempDir,
    exe: PathBuf,
}

fn install(rel: &str) -> Installed {
    let root = tempfile::tempdir().unwrap();
    let exe = root.path().join(rel);
    std::fs::create_dir_all(exe.parent().unwrap()).unwrap();
    let built = env!("CARGO_BIN_EXE_upscaler");
    if std::fs::hard_link(built, &exe).is_err() {
        std::fs::copy(built, &exe).unwrap();
    }
    Installed { root, exe }
}

fn put_weights(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::copy(
        common::root().join("weights").join(WEIGHTS),
        dir.join(WEIGHTS),
    )
    .unwrap();
}

/// Runs the installed binary in `cwd` with a clean environment: a home of its own, nothing
/// pointing at the repository, and the source-tree fallback off unless `source_tree`.
fn run_in(
    exe: &Path,
    cwd: &Path,
    args: &[&str],
    env: &[(&str, &Path)],
    source_tree: bool,
) -> Output {
    let mut cmd = Command::new(exe);
    cmd.args(args)
        .current_dir(cwd)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", cwd.join("home"));
    if !source_tree {
        cmd.env("UPSCALER_SOURCE_WEIGHTS", "0");
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("the binary runs")
}

fn text(o: &Output) -> String {
    format!(
        "status {:?}\nstdout: {}\nstderr: {}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Upscales a small image from a fresh folder and checks the result; returns the folder.
fn upscale_from_elsewhere(
    exe: &Path,
    env: &[(&str, &Path)],
    source_tree: bool,
) -> tempfile::TempDir {
    let cwd = tempfile::tempdir().unwrap();
    std::fs::write(cwd.path().join("in.png"), srv::png(8, 6, 3)).unwrap();
    let o = run_in(
        exe,
        cwd.path(),
        &["upscale", "in.png", "-o", "out.png", "-m", MODEL],
        env,
        source_tree,
    );
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let out = image::open(cwd.path().join("out.png")).unwrap();
    assert_eq!((out.width(), out.height()), (32, 24));
    cwd
}

/// Where `upscaler models --json` says the model's weights come from.
fn source_of(exe: &Path, cwd: &Path, env: &[(&str, &Path)], source_tree: bool) -> String {
    let o = run_in(exe, cwd, &["models", "--json"], env, source_tree);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|m| m["name"] == MODEL)
        .map(|m| m["source"].as_str().unwrap().to_string())
        .unwrap_or_else(|| panic!("{MODEL} not listed: {}", text(&o)))
}

#[test]
fn weights_from_upscaler_weights_dir() {
    let bin = install("bin/upscaler");
    let weights = bin.root.path().join("my-weights");
    put_weights(&weights);
    let env = [("UPSCALER_WEIGHTS_DIR", weights.as_path())];
    let cwd = upscale_from_elsewhere(&bin.exe, &env, false);
    assert_eq!(
        source_of(&bin.exe, cwd.path(), &env, false),
        weights.join(WEIGHTS).display().to_string()
    );
}

#[test]
fn weights_beside_the_executable() {
    let bin = install("upscaler");
    put_weights(&bin.root.path().join("weights"));
    let cwd = upscale_from_elsewhere(&bin.exe, &[], false);
    assert_eq!(
        source_of(&bin.exe, cwd.path(), &[], false),
        bin.root
            .path()
            .join("weights")
            .join(WEIGHTS)
            .display()
            .to_string()
    );
}

#[test]
fn weights_under_the_install_prefix() {
    // As `cargo install --root PREFIX` places the binary, with the weights copied to
    // PREFIX/share/upscaler/weights as the README says.
    let bin = install("bin/upscaler");
    let share = bin.root.path().join("share/upscaler/weights");
    put_weights(&share);
    let cwd = upscale_from_elsewhere(&bin.exe, &[], false);
    assert_eq!(
        source_of(&bin.exe, cwd.path(), &[], false),
        share.join(WEIGHTS).display().to_string()
    );
}

#[test]
fn weights_from_the_source_tree_it_was_built_in() {
    let bin = install("bin/upscaler");
    let cwd = upscale_from_elsewhere(&bin.exe, &[], true);
    assert_eq!(
        source_of(&bin.exe, cwd.path(), &[], true),
        common::root()
            .join("weights")
            .join(WEIGHTS)
            .display()
            .to_string()
    );
}

/// With no weights anywhere, the command line and the server both exit 2 (a setup problem)
/// naming every folder searched and how to fix it.
#[cfg(not(feature = "embed-weights"))]
#[test]
fn no_weights_anywhere_is_a_setup_error_naming_the_places_searched() {
    let bin = install("bin/upscaler");
    let cwd = tempfile::tempdir().unwrap();
    std::fs::write(cwd.path().join("in.png"), srv::png(8, 6, 3)).unwrap();
    let o = run_in(
        &bin.exe,
        cwd.path(),
        &["upscale", "in.png", "-o", "out.png", "-m", MODEL],
        &[],
        false,
    );
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    let searched = [
        cwd.path().join("weights"),
        bin.root.path().join("bin/weights"),
        bin.root.path().join("share/upscaler/weights"),
    ];
    for dir in &searched {
        assert!(err.contains(&dir.display().to_string()), "{dir:?} in {err}");
    }
    assert!(
        err.contains(WEIGHTS) && err.contains("UPSCALER_WEIGHTS_DIR"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(!cwd.path().join("out.png").exists());

    let port = srv::free_port().to_string();
    let data = cwd.path().join("data");
    let o = run_in(
        &bin.exe,
        cwd.path(),
        &["serve", "--listen-addr", &format!("127.0.0.1:{port}")],
        &[("DATA_DIR", &data), ("TEMP_DIR", &cwd.path().join("tmp"))],
        false,
    );
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(err.contains("error: cannot start:"), "{err}");
    assert!(!err.contains("internal error"), "{err}");
    assert!(err.contains("realesrgan-x4plus.safetensors"), "{err}");
    for dir in &searched {
        assert!(err.contains(&dir.display().to_string()), "{dir:?} in {err}");
    }

    // `doctor` says the same, with the fix.
    let o = run_in(
        &bin.exe,
        cwd.path(),
        &["doctor"],
        &[("DATA_DIR", &data)],
        false,
    );
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(out.contains("realesrgan-x4plus: not found"), "{out}");
    assert!(
        out.contains("the default model realesrgan-x4plus has no weights"),
        "{out}"
    );
    assert!(
        out.contains("fix: copy realesrgan-x4plus.safetensors from the repository's weights/"),
        "{out}"
    );
}

/// Built with `embed-weights`, the binary upscales with no weights folder anywhere.
#[cfg(feature = "embed-weights")]
#[test]
fn built_in_weights_need_no_folder() {
    let bin = install("bin/upscaler");
    let cwd = upscale_from_elsewhere(&bin.exe, &[], false);
    assert!(
        source_of(&bin.exe, cwd.path(), &[], false).contains("built into the binary"),
        "the built-in copy was used"
    );
}

/// `upscaler health`: exit 0 and SERVING for a live server, 1 and NOT_SERVING for one still
/// starting, 3 for an address where nothing listens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_of_a_live_a_starting_and_a_dead_server() {
    let health = |addr: String| async move {
        tokio::task::spawn_blocking(move || {
            Command::new(env!("CARGO_BIN_EXE_upscaler"))
                .args(["health", "--addr", &addr, "--timeout", "3"])
                .output()
                .unwrap()
        })
        .await
        .unwrap()
    };
    let place = Place::new(Backend::Embedded);
    let server = Server::start(&place).await;
    let o = health(format!("http://{}", server.addr)).await;
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "SERVING");
    server.stop().await;

    // Starting: the store's server selection waits for a MongoDB that is not there.
    let starting = srv::Starting::begin(&Place::new(Backend::Embedded), 6000).await;
    let o = health(format!("http://{}", starting.addr)).await;
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "NOT_SERVING");
    assert!(String::from_utf8_lossy(&o.stderr).contains("NOT_SERVING"));
    starting.fails().await;

    // Nothing listens: unreachable.
    let o = health(format!("http://127.0.0.1:{}", srv::free_port())).await;
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("cannot connect"),
        "{}",
        text(&o)
    );
}

/// `upscaler doctor` reports every section; a Redis that does not answer is a problem with
/// its fix, and exit status 1.
#[test]
fn doctor_reports_its_sections_and_problems() {
    let cwd = tempfile::tempdir().unwrap();
    let doctor = |env: &[(&str, &str)]| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_upscaler"));
        cmd.arg("doctor")
            .current_dir(cwd.path())
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("HOME", cwd.path())
            .env("DATA_DIR", cwd.path().join("data"));
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.output().unwrap()
    };
    let o = doctor(&[]);
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    for section in ["version", "cpu", "weights", "models", "store", "locks"] {
        assert!(
            out.lines().any(|l| l == section),
            "section {section}: {out}"
        );
    }
    assert!(
        out.contains(&format!("upscaler {}", env!("CARGO_PKG_VERSION"))),
        "{out}"
    );
    assert!(out.contains("fast convolution path: "), "{out}");
    // The shipped weights, found in the source tree and checked against the manifest.
    for spec in upscaler::model::REGISTRY.iter().filter(|s| s.shipped) {
        assert!(
            out.lines().any(|l| l.contains(&format!("{}: ", spec.name))
                && l.contains("matches weights/README.md")),
            "{}: {out}",
            spec.name
        );
    }
    assert!(
        out.contains(&format!("DATA_DIR {}", cwd.path().join("data").display())),
        "{out}"
    );
    assert!(out.contains("no problems found"), "{out}");

    // A weights file that is not the shipped one is one problem, although the three
    // animevideov3 models that share it each show it.
    let changed = cwd.path().join("changed");
    put_weights(&changed);
    let path = changed.join(WEIGHTS);
    let mut bytes = std::fs::read(&path).unwrap();
    *bytes.last_mut().unwrap() ^= 1;
    std::fs::write(&path, bytes).unwrap();
    let o = doctor(&[("UPSCALER_WEIGHTS_DIR", changed.to_str().unwrap())]);
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let sharing: Vec<&str> = out
        .lines()
        .filter(|l| l.contains(&format!(": {} (", path.display())))
        .collect();
    assert_eq!(sharing.len(), 3, "{out}");
    assert!(
        sharing
            .iter()
            .all(|l| l.contains("DIFFERS from weights/README.md")),
        "{out}"
    );
    assert!(out.contains("1 problem(s)"), "{out}");
    assert_eq!(
        out.matches(&format!("{} is not the shipped file", path.display()))
            .count(),
        1,
        "{out}"
    );
    assert!(
        out.contains(&format!(
            "fix: replace it with {WEIGHTS} from the repository's weights/ folder"
        )),
        "{out}"
    );

    let dead = format!("redis://127.0.0.1:{}", srv::free_port());
    let typo = cwd.path().join("weigths");
    let o = doctor(&[
        ("REDIS_URL", &dead),
        ("DEFAULT_MODEL", "no-such-model"),
        ("UPSCALER_WEIGHTS_DIR", typo.to_str().unwrap()),
    ]);
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(out.contains("3 problem(s)"), "{out}");
    assert!(
        out.contains(&format!(
            "UPSCALER_WEIGHTS_DIR {} is not a folder\n    fix: correct UPSCALER_WEIGHTS_DIR",
            typo.display()
        )),
        "{out}"
    );
    assert!(
        out.contains("fix: start Redis or correct REDIS_URL"),
        "{out}"
    );
    assert!(
        out.contains("fix: set DEFAULT_MODEL to an installed model (installed: realesrgan-x4plus,"),
        "{out}"
    );
}
