//! The models this server runs, and the loaded ones shared by the workers: the catalog is
//! scanned at start and again on request (SIGHUP), and each model is read from disk once,
//! on first use, off the async executor.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use tokio::sync::Mutex;

use crate::model::catalog::{Catalog, Entry, Origin};
use crate::model::locate::WeightsDirs;
use crate::model::{Model, ModelError, Prepare};

/// A model as clients see it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ModelInfo {
    pub name: String,
    pub architecture: String,
    pub scale: u32,
    pub shipped: bool,
    pub description: String,
    /// Colour channels in and out: 1 gray, 3 RGB, 4 RGBA.
    pub in_channels: u32,
    pub out_channels: u32,
    /// The network's size: features, blocks and growth channels, or convolutions.
    pub size: String,
    /// Parameters of the weights, where known before loading them (0 otherwise).
    pub parameters: u64,
    /// The weights file's name.
    pub source: String,
    /// Whether it runs on the fast CPU path (else on candle's reference convolutions): known
    /// once loaded; every recognised configuration is built for it.
    pub fast_path: bool,
}

impl ModelInfo {
    fn of(entry: &Entry, loaded: Option<&Model>) -> Self {
        let spec = &entry.spec;
        let (cin, cout) = spec.arch.channels();
        Self {
            name: spec.name.clone(),
            architecture: spec.arch.name().to_string(),
            scale: spec.scale() as u32,
            shipped: spec.shipped,
            description: spec.description.clone(),
            in_channels: cin as u32,
            out_channels: cout as u32,
            size: entry.size_text(),
            parameters: entry.parameters.unwrap_or(0),
            source: entry
                .file
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            fast_path: entry.fast_path(loaded),
        }
    }
}

/// The installed models and the default one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelCatalog {
    pub models: Vec<ModelInfo>,
    pub default_model: String,
}

pub struct ModelCache {
    weights: WeightsDirs,
    models_dir: PathBuf,
    catalog: RwLock<Arc<Catalog>>,
    /// Loaded models, with the catalog entry each was loaded from.
    loaded: Mutex<Loaded>,
}

type Loaded = HashMap<String, (Entry, Arc<Model>)>;

/// The model loaded from `entry`, if it is loaded and its file has not changed since.
fn loaded_from<'a>(loaded: &'a Loaded, entry: &Entry) -> Option<&'a Arc<Model>> {
    loaded
        .get(&entry.spec.name)
        .filter(|(from, _)| from == entry)
        .map(|(_, m)| m)
}

impl ModelCache {
    /// Scans the weights folders and `models_dir` (logging each file that cannot be used).
    pub fn new(weights: WeightsDirs, models_dir: PathBuf) -> Self {
        let catalog = Self::scan(&weights, &models_dir);
        for e in catalog.entries() {
            if !matches!(e.origin, Origin::Folder(_)) {
                tracing::info!(
                    model = e.spec.name,
                    weights = e.source_text(),
                    "weights found"
                );
            }
        }
        Self {
            weights,
            models_dir,
            catalog: RwLock::new(Arc::new(catalog)),
            loaded: Mutex::default(),
        }
    }

    fn scan(weights: &WeightsDirs, models_dir: &std::path::Path) -> Catalog {
        let catalog = Catalog::scan(weights, Some(models_dir));
        for p in catalog.problems() {
            tracing::warn!(file = %p.file.display(), reason = p.reason, "model file skipped");
        }
        let folder = catalog
            .entries()
            .iter()
            .filter(|e| matches!(e.origin, Origin::Folder(_)))
            .count();
        tracing::info!(
            models = catalog.entries().len(),
            from_models_dir = folder,
            skipped = catalog.problems().len(),
            models_dir = %models_dir.display(),
            "models scanned"
        );
        catalog
    }

    /// Scans the folders again: new files become models, removed ones go, and a model
    /// whose file changed is loaded afresh on its next use. Returns the number of models.
    pub async fn rescan(&self) -> usize {
        let (w, m) = (self.weights.clone(), self.models_dir.clone());
        let catalog = tokio::task::spawn_blocking(move || Self::scan(&w, &m))
            .await
            .unwrap_or_default();
        let catalog = Arc::new(catalog);
        let mut loaded = self.loaded.lock().await;
        loaded.retain(|name, (entry, _)| catalog.find(name).is_ok_and(|e| e == entry));
        let n = catalog.entries().len();
        *self.catalog.write().unwrap_or_else(|e| e.into_inner()) = catalog;
        n
    }

    fn catalog(&self) -> Arc<Catalog> {
        self.catalog
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The catalog entry of `name`.
    pub fn entry(&self, name: &str) -> Result<Entry, ModelError> {
        self.catalog().find(name).cloned()
    }

    /// Loads the model a server cannot start without: a missing one is a setup problem,
    /// and the error says where the weights were looked for.
    pub async fn load_required(&self, name: &str) -> Result<Arc<Model>, ModelError> {
        self.catalog().require(name)?;
        self.get(name).await
    }

    /// The model `name`, loading its weights on first use.
    pub async fn get(&self, name: &str) -> Result<Arc<Model>, ModelError> {
        let entry = self.entry(name)?;
        // Held across the load so two workers never load the same model twice.
        let mut loaded = self.loaded.lock().await;
        if let Some(m) = loaded_from(&loaded, &entry) {
            return Ok(m.clone());
        }
        let e = entry.clone();
        let m =
            tokio::task::spawn_blocking(move || e.load(&candle_core::Device::Cpu, Prepare::Once))
                .await
                .map_err(|e| ModelError::Format(format!("model loader panicked: {e}")))??;
        let m = Arc::new(m);
        loaded.insert(name.to_string(), (entry, m.clone()));
        Ok(m)
    }

    /// The installed models: the registry's, then the models folder's.
    pub async fn installed(&self) -> Vec<ModelInfo> {
        let loaded = self.loaded.lock().await;
        self.catalog()
            .entries()
            .iter()
            .map(|e| ModelInfo::of(e, loaded_from(&loaded, e).map(|m| &**m)))
            .collect()
    }

    /// Whether `name` is installed (without loading it).
    pub fn available(&self, name: &str) -> bool {
        self.catalog().find(name).is_ok()
    }
}
