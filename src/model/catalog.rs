//! The models a server or a command can run: the registry's whose weights are in the weights
//! folder (the shipped ones, and official checkpoints placed there), and every model file in
//! the models folder, recognised from its weights (see `detect`) and named by its file stem.
//!
//! Files of the models folder: `.pth` / `.pt` / `.ckpt` (PyTorch, zip or legacy), `.safetensors`
//! and ncnn `.param` with its `.bin`; a `<stem>.json` beside one may name what the weights
//! cannot tell (see `detect::Sidecar`). A file that cannot be used is reported with the
//! reason, and the others are still listed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::Device;

use super::detect::{self, Detected, Layout, Shapes, Sidecar};
use super::locate::{self, WeightsDirs};
use super::registry::{self, Arch, ModelSpec};
use super::resize::Resize;
use super::{ncnn, weights, Model, ModelError, Prepare};

/// Where a model comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum Origin {
    /// A registry model (fixed configuration) with its weights in a weights folder.
    Registry,
    /// A shipped model whose weights are compiled into the binary (`embed-weights`).
    BuiltIn,
    /// A file of the models folder, recognised from its weights in this layout.
    Folder(Layout),
}

/// A model that can be loaded.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub spec: ModelSpec,
    /// The weights file (for ncnn, the `.param`); for built-in weights, just the name.
    pub file: PathBuf,
    pub origin: Origin,
    /// Parameters in the weights, where known without loading them.
    pub parameters: Option<u64>,
    /// Size of the weights on disk.
    pub bytes: u64,
    /// When the weights file was last changed: a file replaced in place is a new entry.
    pub modified: Option<std::time::SystemTime>,
}

impl Entry {
    /// A registry model with its weights in `file`.
    pub fn registry(spec: &ModelSpec, file: PathBuf) -> Self {
        // Read from the file's header; a damaged file is reported when it is loaded.
        let parameters = shapes(&file)
            .ok()
            .map(|(shapes, _)| detect::parameter_count(&shapes));
        let (bytes, modified) = on_disk(&file);
        Self {
            spec: spec.clone(),
            file,
            origin: Origin::Registry,
            parameters,
            bytes,
            modified,
        }
    }

    /// A shipped model with the weights compiled into the binary, if they are.
    pub fn built_in(spec: &ModelSpec) -> Option<Self> {
        let bytes = locate::built_in(&spec.weights_file_name())?;
        let parameters = safetensors::SafeTensors::read_metadata(bytes)
            .ok()
            .map(|(_, meta)| {
                let shapes: Shapes = meta
                    .tensors()
                    .into_iter()
                    .map(|(name, info)| (name, info.shape.clone()))
                    .collect();
                detect::parameter_count(&shapes)
            });
        Some(Self {
            spec: spec.clone(),
            file: PathBuf::from(spec.weights_file_name()),
            origin: Origin::BuiltIn,
            parameters,
            bytes: bytes.len() as u64,
            modified: None,
        })
    }

    /// Where the weights are read from, for people: the file, or that they are built in.
    pub fn source_text(&self) -> String {
        match self.origin {
            Origin::BuiltIn => format!("{} (built into the binary)", self.file.display()),
            _ => self.file.display().to_string(),
        }
    }

    /// Whether the model runs on the fast CPU path. Every configuration the catalog accepts
    /// is one the fast path builds (tests/models.rs runs them all against the reference), so
    /// until the model is loaded this is true; once loaded, `loaded` says what it does (a
    /// fast path that failed to build, which is logged, leaves the reference convolutions).
    pub fn fast_path(&self, loaded: Option<&Model>) -> bool {
        loaded.is_none_or(Model::is_fast)
    }

    /// The parameter count in short form: `16.70M`, `1.2K`.
    pub fn parameters_text(&self) -> String {
        match self.parameters {
            Some(p) if p >= 1_000_000 => format!("{:.2}M", p as f64 / 1e6),
            Some(p) if p >= 1_000 => format!("{:.1}K", p as f64 / 1e3),
            Some(p) => p.to_string(),
            None => "-".into(),
        }
    }

    /// Reads the weights and builds the model.
    pub fn load(&self, device: &Device, prepare: Prepare) -> Result<Model, ModelError> {
        let tensors = match &self.origin {
            Origin::Registry => weights::read(&self.spec, &self.file)?,
            Origin::BuiltIn => {
                let bytes = locate::built_in(&self.spec.weights_file_name()).ok_or_else(|| {
                    ModelError::format(format!("{} is not built in", self.file.display()))
                })?;
                weights::read_safetensors_bytes(bytes, &self.file)?
            }
            Origin::Folder(layout) => {
                let tensors = weights::read(&self.spec, &self.file)?;
                layout
                    .rename(tensors)
                    .map_err(|why| ModelError::format(format!("{}: {why}", self.file.display())))?
            }
        };
        let net = weights::build_checked(&self.spec.arch, tensors, device)?;
        Model::prepared(self.spec.clone(), net, device.clone(), prepare)
    }

    /// The size of the network in words: features and blocks, or convolutions.
    pub fn size_text(&self) -> String {
        match &self.spec.arch {
            Arch::RrdbNet(c) => format!(
                "nf {} nb {} gc {}{}",
                c.num_feat,
                c.num_block,
                c.num_grow_ch,
                if c.plus { " plus" } else { "" }
            ),
            Arch::SrVgg(c) => format!("nf {} convs {} {}", c.num_feat, c.num_conv, c.act.name()),
        }
    }
}

/// A file of the models folder that cannot be used, and why.
#[derive(Debug, Clone, PartialEq)]
pub struct Problem {
    pub file: PathBuf,
    pub reason: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.file.display(), self.reason)
    }
}

/// The models found by one scan.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Catalog {
    entries: Vec<Entry>,
    problems: Vec<Problem>,
    /// Where the registry's weights were looked for.
    weights: WeightsDirs,
}

/// Extensions of weight files in the models folder, in the order a stem's files are tried.
const EXTENSIONS: [&str; 5] = ["safetensors", "pth", "pt", "ckpt", "param"];

impl Catalog {
    /// The registry's models whose weights are found in `weights` (or built in), then the
    /// models in `models_dir` (if it is given and exists).
    pub fn scan(weights: &WeightsDirs, models_dir: Option<&Path>) -> Self {
        let mut catalog = Self {
            weights: weights.clone(),
            ..Self::default()
        };
        for spec in registry::REGISTRY.iter() {
            let found = match weights.find(&spec.weights_file_name()) {
                Some(file) => Some(Entry::registry(spec, file)),
                None => Entry::built_in(spec),
            };
            catalog.entries.extend(found);
        }
        if let Some(dir) = models_dir {
            catalog.scan_folder(dir);
        }
        catalog
    }

    fn scan_folder(&mut self, dir: &Path) {
        let listing = match std::fs::read_dir(dir) {
            Ok(l) => l,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            Err(e) => {
                self.problems.push(Problem {
                    file: dir.to_path_buf(),
                    reason: format!("cannot list the models folder: {e}"),
                });
                return;
            }
        };
        // Stem -> the weight files of that stem, by extension.
        let mut stems: BTreeMap<String, Vec<(String, PathBuf)>> = BTreeMap::new();
        for item in listing.flatten() {
            let path = item.path();
            let ext = weights::extension(&path);
            let stem = path.file_stem().and_then(|s| s.to_str());
            match (stem, EXTENSIONS.contains(&ext.as_str()) && path.is_file()) {
                (Some(stem), true) => stems.entry(stem.to_string()).or_default().push((ext, path)),
                (None, true) => self.problems.push(Problem {
                    file: path,
                    reason: "the file name is not valid UTF-8".into(),
                }),
                _ => {}
            }
        }
        for (stem, mut files) in stems {
            files.sort_by_key(|(ext, _)| EXTENSIONS.iter().position(|e| e == ext));
            let (_, path) = files.remove(0);
            for (_, other) in files {
                self.problems.push(Problem {
                    file: other,
                    reason: format!(
                        "another file already gives the model `{stem}` ({}); rename one",
                        path.display()
                    ),
                });
            }
            match self.recognise(&stem, &path) {
                Ok(entry) => self.entries.push(entry),
                Err(reason) => self.problems.push(Problem { file: path, reason }),
            }
        }
    }

    fn recognise(&self, stem: &str, path: &Path) -> Result<Entry, String> {
        if let Some(taken) = self.entries.iter().find(|e| e.spec.name == stem) {
            return Err(format!(
                "the name `{stem}` is taken by the {} model {}; rename the file",
                if taken.spec.shipped {
                    "shipped"
                } else {
                    "registry"
                },
                taken.file.display()
            ));
        }
        recognise_file(stem, path)
    }

    /// Every model, registry ones first, then the folder's by name.
    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    /// The files of the models folder that could not be used.
    pub fn problems(&self) -> &[Problem] {
        &self.problems
    }

    /// `find`, where a registry model without weights is a setup problem: the error names
    /// every folder searched (for the command line and the server's default model).
    pub fn require(&self, name: &str) -> Result<&Entry, ModelError> {
        self.find(name).map_err(|e| match e {
            ModelError::NotInstalled(_) => match registry::find(name) {
                Ok(spec) => ModelError::WeightsMissing {
                    model: name.to_string(),
                    file: spec.weights_file_name(),
                    searched: self.weights.searched(),
                },
                Err(e) => e,
            },
            e => e,
        })
    }

    /// Where the registry's weights were looked for.
    pub fn weights_dirs(&self) -> &WeightsDirs {
        &self.weights
    }

    pub fn find(&self, name: &str) -> Result<&Entry, ModelError> {
        self.entries
            .iter()
            .find(|e| e.spec.name == name)
            .ok_or_else(|| {
                if registry::find(name).is_ok() {
                    return ModelError::NotInstalled(name.to_string());
                }
                ModelError::UnknownModelIn {
                    name: name.to_string(),
                    known: self
                        .entries
                        .iter()
                        .map(|e| e.spec.name.clone())
                        .collect::<Vec<_>>()
                        .join(", "),
                }
            })
    }
}

/// The model a weights file holds, named `name`, recognised from its weights; the error says
/// why it cannot be used.
pub fn recognise_file(name: &str, path: &Path) -> Result<Entry, String> {
    check_name(name)?;
    let sidecar = read_sidecar(&path.with_extension("json"))?;
    let (shapes, resize) = shapes(path).map_err(|e| strip_path(e, path))?;
    let Detected {
        arch,
        layout,
        parameters,
    } = detect::detect(&shapes, &sidecar)?;
    if let Some(r) = resize {
        if (arch.scale() * r.num) % r.den != 0 {
            return Err(format!(
                "a {}x network resized by {}/{}: not a whole scale",
                arch.scale(),
                r.num,
                r.den
            ));
        }
    }
    let file_name = path
        .file_name()
        .unwrap_or_default()
        .to_string_lossy()
        .into_owned();
    let mut spec = ModelSpec {
        name: name.to_string(),
        arch,
        description: String::new(),
        shipped: false,
        weights_file: file_name,
        resize,
    };
    spec.description = sidecar.description.unwrap_or_else(|| {
        format!(
            "{}x {} ({} layout), from {}",
            spec.scale(),
            spec.arch.name(),
            layout.name(),
            spec.weights_file
        )
    });
    let (bytes, modified) = on_disk(path);
    Ok(Entry {
        spec,
        file: path.to_path_buf(),
        origin: Origin::Folder(layout),
        parameters: Some(parameters),
        bytes,
        modified,
    })
}

/// The bytes a weights file takes on disk (with an ncnn `.param`, its `.bin` too) and when
/// it was last changed.
fn on_disk(path: &Path) -> (u64, Option<std::time::SystemTime>) {
    let meta = std::fs::metadata(path).ok();
    let mut bytes = meta.as_ref().map_or(0, |m| m.len());
    if weights::extension(path) == "param" {
        bytes += std::fs::metadata(path.with_extension("bin")).map_or(0, |m| m.len());
    }
    (bytes, meta.and_then(|m| m.modified().ok()))
}

/// Model names are used in requests, URLs and file names: keep them plain.
fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 100
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '+'))
        && !name.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "`{name}` cannot be a model name: use letters, digits and - _ . + (at most 100)"
        ))
    }
}

fn read_sidecar(path: &Path) -> Result<Sidecar, String> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map_err(|e| format!("its sidecar {} is not valid: {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Sidecar::default()),
        Err(e) => Err(format!("cannot read its sidecar {}: {e}", path.display())),
    }
}

/// The tensor names and shapes of a weights file, without reading its weights, and the
/// resize an ncnn graph ends with.
fn shapes(path: &Path) -> Result<(Shapes, Option<Resize>), ModelError> {
    match weights::extension(path).as_str() {
        "safetensors" => Ok((weights::safetensors_shapes(path)?, None)),
        "param" => {
            let text = std::fs::read_to_string(path).map_err(|cause| ModelError::Io {
                path: path.display().to_string(),
                cause,
            })?;
            if !path.with_extension("bin").is_file() {
                return Err(ModelError::format(format!(
                    "{}: its weights {} are missing",
                    path.display(),
                    path.with_extension("bin").display()
                )));
            }
            ncnn::recognise(&ncnn::parse_param(&text)?)
        }
        _ => Ok((super::torch::read_shapes(path)?, None)),
    }
}

/// A reason without the file name in front (the problem line names the file already).
fn strip_path(e: ModelError, path: &Path) -> String {
    let text = match e {
        ModelError::Format(msg) => msg,
        other => other.to_string(),
    };
    let prefix = format!("{}: ", path.display());
    text.strip_prefix(&prefix)
        .map(str::to_string)
        .unwrap_or(text)
}
