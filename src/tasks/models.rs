//! Loaded models, shared by the workers: each is read from disk once, on first use, off the
//! async executor.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::sync::Mutex;

use crate::model::{self, Model, ModelError};

/// A model as clients see it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ModelInfo {
    pub name: String,
    pub architecture: String,
    pub scale: u32,
    pub shipped: bool,
    pub description: String,
}

/// The installed models and the default one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelCatalog {
    pub models: Vec<ModelInfo>,
    pub default_model: String,
}

pub struct ModelCache {
    dir: PathBuf,
    loaded: Mutex<HashMap<String, Arc<Model>>>,
}

impl ModelCache {
    pub fn new(dir: PathBuf) -> Self {
        Self {
            dir,
            loaded: Mutex::default(),
        }
    }

    /// The registry model `name`, loading its weights on first use.
    pub async fn get(&self, name: &str) -> Result<Arc<Model>, ModelError> {
        // Held across the load so two workers never load the same model twice.
        let mut loaded = self.loaded.lock().await;
        if let Some(m) = loaded.get(name) {
            return Ok(m.clone());
        }
        let spec = model::find(name)?;
        let path = self.dir.join(spec.weights_file_name());
        let m = tokio::task::spawn_blocking(move || {
            Model::load(spec, &path, &candle_core::Device::Cpu)
        })
        .await
        .map_err(|e| ModelError::Format(format!("model loader panicked: {e}")))??;
        let m = Arc::new(m);
        loaded.insert(name.to_string(), m.clone());
        Ok(m)
    }

    /// The registry models whose weights are installed, in registry order.
    pub fn installed(&self) -> Vec<ModelInfo> {
        model::registry::REGISTRY
            .iter()
            .filter(|spec| self.available(spec.name))
            .map(|spec| ModelInfo {
                name: spec.name.to_string(),
                architecture: spec.arch.name().to_string(),
                scale: spec.arch.scale() as u32,
                shipped: spec.shipped,
                description: spec.description.to_string(),
            })
            .collect()
    }

    /// Whether the weights of `name` are installed (without loading them).
    pub fn available(&self, name: &str) -> bool {
        model::find(name)
            .map(|s| self.dir.join(s.weights_file_name()).is_file())
            .unwrap_or(false)
    }
}
