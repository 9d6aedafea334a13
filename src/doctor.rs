//! `upscaler doctor`: what this installation runs with (version, CPU path, weights, models,
//! store and locks), and every problem found, each with a one-line fix.

use std::collections::HashMap;
use std::path::Path;

use sha2::{Digest, Sha256};

use crate::config::Settings;
use crate::model::catalog::{Catalog, Entry, Origin};
use crate::model::locate::{self, WeightsDirs};
use crate::model::{registry, Isa, ModelError};
use crate::tasks::types::hex;

/// One titled part of the report.
#[derive(Debug, Default)]
pub struct Section {
    pub title: &'static str,
    pub lines: Vec<String>,
}

/// Something that stops the service or a model from working, and how to fix it.
#[derive(Debug)]
pub struct Problem {
    pub what: String,
    pub fix: String,
}

#[derive(Debug, Default)]
pub struct Report {
    pub sections: Vec<Section>,
    pub problems: Vec<Problem>,
}

impl Report {
    fn section(&mut self, title: &'static str, lines: Vec<String>) {
        self.sections.push(Section { title, lines });
    }

    fn problem(&mut self, what: impl Into<String>, fix: impl Into<String>) {
        self.problems.push(Problem {
            what: what.into(),
            fix: fix.into(),
        });
    }

    /// The report for people: one block per section, then the problems.
    pub fn text(&self) -> String {
        let mut out = String::new();
        for s in &self.sections {
            out.push_str(s.title);
            out.push('\n');
            for line in &s.lines {
                out.push_str("  ");
                out.push_str(line);
                out.push('\n');
            }
        }
        if self.problems.is_empty() {
            out.push_str("no problems found\n");
        } else {
            out.push_str(&format!("{} problem(s)\n", self.problems.len()));
            for p in &self.problems {
                out.push_str(&format!("  {}\n    fix: {}\n", p.what, p.fix));
            }
        }
        out
    }
}

/// Examines the installation `settings` describe. Reaches Redis and MongoDB when they are
/// configured (a few seconds each at most); changes nothing.
pub async fn examine(settings: &Settings) -> Report {
    let mut report = Report::default();
    report.section("version", vec![version()]);
    report.section("cpu", cpu());
    if let Err(e) = settings.validate() {
        report.problem(
            e.to_string(),
            "correct the setting (see `upscaler serve --help`)",
        );
    }
    let weights = WeightsDirs::search(settings.weights_dir.as_deref());
    if let Some(dir) = weights.setting_not_a_folder() {
        report.problem(
            format!("UPSCALER_WEIGHTS_DIR {} is not a folder", dir.display()),
            "correct UPSCALER_WEIGHTS_DIR, or unset it to use the shipped weights found elsewhere",
        );
    }
    let models_dir = settings.models_dir();
    let catalog = Catalog::scan(&weights, Some(&models_dir));
    weights_section(&mut report, &catalog);
    models_section(&mut report, &catalog, &models_dir, &settings.default_model);
    store_section(&mut report, settings).await;
    locks_section(&mut report, settings).await;
    report
}

fn version() -> String {
    let features: Vec<&str> = [
        (cfg!(feature = "embed-weights"), "embed-weights"),
        (cfg!(feature = "failpoints"), "failpoints"),
    ]
    .into_iter()
    .filter_map(|(on, name)| on.then_some(name))
    .collect();
    format!(
        "upscaler {} (features: {})",
        env!("CARGO_PKG_VERSION"),
        if features.is_empty() {
            "none".to_string()
        } else {
            features.join(", ")
        }
    )
}

fn cpu() -> Vec<String> {
    let name = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|n| n.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string());
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut flags = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        for (on, flag) in [
            (is_x86_feature_detected!("avx2"), "avx2"),
            (is_x86_feature_detected!("fma"), "fma"),
            (is_x86_feature_detected!("avx512f"), "avx512f"),
        ] {
            if on {
                flags.push(flag);
            }
        }
    }
    let isa = Isa::active();
    let chosen = match std::env::var("UPSCALER_ISA") {
        Ok(v) if Isa::parse(&v) == Some(isa) => " (UPSCALER_ISA)",
        _ => " (the widest this CPU runs)",
    };
    vec![
        format!("{name}, {cores} cores available"),
        format!(
            "features: {}",
            if flags.is_empty() {
                "none of avx2, fma, avx512f".to_string()
            } else {
                flags.join(" ")
            }
        ),
        format!("fast convolution path: {}{chosen}", isa.name()),
    ]
}

fn weights_section(report: &mut Report, catalog: &Catalog) {
    let mut lines = vec![format!("searched: {}", catalog.weights_dirs().searched())];
    let manifest = locate::manifest();
    let mut checked_files = HashMap::new();
    for spec in registry::REGISTRY.iter().filter(|s| s.shipped) {
        let file = spec.weights_file_name();
        let expected = manifest.iter().find(|(f, _)| *f == file).map(|(_, s)| *s);
        let entry = catalog
            .entries()
            .iter()
            .find(|e| e.spec.name == spec.name && !matches!(e.origin, Origin::Folder(_)));
        let Some(entry) = entry else {
            lines.push(format!("{}: not found", spec.name));
            continue;
        };
        // The x2/x3 animevideov3 models share the x4 file: read and judge each file once.
        let source = entry.source_text();
        let checked = checked_files
            .entry(source.clone())
            .or_insert_with(|| check_weights_file(report, entry, &file, &source, expected));
        match checked {
            Some((size, sha, verdict)) => lines.push(format!(
                "{}: {source} ({:.1} MB), sha256 {}, {verdict}",
                spec.name,
                *size as f64 / 1e6,
                &sha[..16],
            )),
            None => lines.push(format!("{}: {source} cannot be read", spec.name)),
        }
    }
    report.section("weights", lines);
}

/// Reads one weights file (or its built-in copy), hashes it and compares it with the
/// manifest: its size, sha256 and verdict, or `None` when it cannot be read. Problems go into
/// the report.
fn check_weights_file(
    report: &mut Report,
    entry: &Entry,
    file: &str,
    source: &str,
    expected: Option<&str>,
) -> Option<(usize, String, &'static str)> {
    let bytes = match entry.origin {
        Origin::BuiltIn => locate::built_in(file).map(<[u8]>::to_vec),
        _ => std::fs::read(&entry.file).ok(),
    };
    let Some(bytes) = bytes else {
        report.problem(
            format!("{source} cannot be read"),
            "check the file's permissions",
        );
        return None;
    };
    let sha = hex(&Sha256::digest(&bytes));
    let verdict = match expected {
        Some(e) if e == sha => "matches weights/README.md",
        Some(_) => {
            report.problem(
                format!("{source} is not the shipped file (sha256 {sha})"),
                format!("replace it with {file} from the repository's weights/ folder"),
            );
            "DIFFERS from weights/README.md"
        }
        None => "not in the manifest",
    };
    Some((bytes.len(), sha, verdict))
}

fn models_section(report: &mut Report, catalog: &Catalog, models_dir: &Path, default: &str) {
    let from_folder = catalog
        .entries()
        .iter()
        .filter(|e| matches!(e.origin, Origin::Folder(_)))
        .count();
    let mut lines = vec![format!(
        "models folder: {} ({})",
        absolute(models_dir),
        if models_dir.is_dir() {
            format!("{from_folder} model(s)")
        } else {
            "absent: create it to add your own models".to_string()
        }
    )];
    for p in catalog.problems() {
        lines.push(format!("skipped {p}"));
        report.problem(
            format!("model file skipped: {p}"),
            "fix or remove the file, then rescan (SIGHUP) or restart",
        );
    }
    let installed: Vec<&str> = catalog
        .entries()
        .iter()
        .map(|e| e.spec.name.as_str())
        .collect();
    let installed = if installed.is_empty() {
        "none".to_string()
    } else {
        installed.join(", ")
    };
    lines.push(format!("installed: {installed}"));
    match catalog.require(default) {
        Ok(e) => lines.push(format!("default model: {default} ({})", e.source_text())),
        Err(ModelError::WeightsMissing { file, .. }) => {
            lines.push(format!("default model: {default} (no weights)"));
            report.problem(
                format!(
                    "the default model {default} has no weights: {file} is in none of the \
                     folders searched"
                ),
                format!(
                    "copy {file} from the repository's weights/ into one of them, or set \
                     UPSCALER_WEIGHTS_DIR to a folder that holds it"
                ),
            );
        }
        Err(e) => {
            lines.push(format!("default model: {default} (not installed)"));
            report.problem(
                format!("the default model: {e}"),
                format!("set DEFAULT_MODEL to an installed model (installed: {installed})"),
            );
        }
    }
    report.section("models", lines);
}

async fn store_section(report: &mut Report, settings: &Settings) {
    let mut lines = Vec::new();
    match &settings.mongo_uri {
        Some(uri) => {
            let shown = crate::store::mongo::redact_uri(uri);
            match crate::store::mongo::ping(uri, &settings.mongo_database).await {
                Ok(_) => lines.push(format!(
                    "MongoDB {shown}, database {}: answers",
                    settings.mongo_database
                )),
                Err(e) => {
                    lines.push(format!("MongoDB {shown}: does not answer"));
                    report.problem(e.to_string(), "start MongoDB or correct MONGO_URI");
                }
            }
        }
        None => {
            let dir = &settings.data_dir;
            let state = match writable(dir) {
                Ok(state) => state,
                Err(e) => {
                    report.problem(
                        format!("DATA_DIR {}: {e}", absolute(dir)),
                        "set DATA_DIR to a folder this user can write",
                    );
                    "not writable"
                }
            };
            lines.push(format!("embedded, DATA_DIR {} ({state})", absolute(dir)));
        }
    }
    lines.push(format!("TEMP_DIR {}", absolute(&settings.temp_dir)));
    report.section("store", lines);
}

async fn locks_section(report: &mut Report, settings: &Settings) {
    let line = match &settings.redis_url {
        Some(url) => {
            let shown = crate::locks::redis::redact_url(url);
            match crate::locks::redis::RedisLocks::connect(url, &settings.redis_prefix).await {
                Ok(_) => format!("Redis {shown}: answers"),
                Err(e) => {
                    report.problem(e.to_string(), "start Redis or correct REDIS_URL");
                    format!("Redis {shown}: does not answer")
                }
            }
        }
        None => "in-process (REDIS_URL unset: one instance)".to_string(),
    };
    report.section("locks", vec![line]);
}

fn absolute(p: &Path) -> String {
    std::path::absolute(p)
        .unwrap_or_else(|_| p.to_path_buf())
        .display()
        .to_string()
}

/// Whether the store could be written in `dir`: it, or the nearest folder that exists
/// above it (where it would be created), takes a new file.
fn writable(dir: &Path) -> std::io::Result<&'static str> {
    let abs = std::path::absolute(dir)?;
    let existing = abs
        .ancestors()
        .find(|a| a.is_dir())
        .unwrap_or(Path::new("/"));
    tempfile::tempfile_in(existing)?;
    Ok(if existing == abs {
        "exists, writable"
    } else {
        "will be created"
    })
}
