//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use upscaler::model::{self, Model};

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
pub mod server;
