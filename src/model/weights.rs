//! Reading weight files into a named state dict and building a network from it with every
//! tensor accounted for.
//!
//! Formats: safetensors (the project's own), PyTorch `.pth` in the zip or the legacy format
//! (see `torch`) and ncnn `.param`/`.bin` pairs.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;

use super::{ncnn, Arch, ModelError, ModelSpec, Network};

pub type StateDict = HashMap<String, Tensor>;

/// Tensor names and shapes in module order.
pub type Layout = Vec<(String, Vec<usize>)>;

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> ModelError + '_ {
    move |cause| ModelError::Io {
        path: path.display().to_string(),
        cause,
    }
}

/// A file's extension in lower case ("" when it has none).
pub(crate) fn extension(path: &Path) -> String {
    path.extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase()
}

/// Reads every tensor of a weights file, choosing the format from the extension.
pub fn read(spec: &ModelSpec, path: &Path) -> Result<StateDict, ModelError> {
    if !path.exists() {
        return Err(ModelError::WeightsNotFound {
            model: spec.name.to_string(),
            path: path.display().to_string(),
        });
    }
    match extension(path).as_str() {
        "safetensors" => read_safetensors_bytes(&std::fs::read(path).map_err(io_err(path))?, path),
        "pth" | "pt" => read_pth(path),
        "param" | "bin" => read_ncnn(
            &spec.arch,
            &path.with_extension("param"),
            &path.with_extension("bin"),
        ),
        _ => Err(ModelError::format(format!(
            "{}: unknown weights format (expected .safetensors, .pth or ncnn .param/.bin)",
            path.display()
        ))),
    }
}

fn read_pth(path: &Path) -> Result<StateDict, ModelError> {
    super::torch::read(path)
}

/// The tensors of a safetensors file's bytes; `path` names it in errors.
pub fn read_safetensors_bytes(bytes: &[u8], path: &Path) -> Result<StateDict, ModelError> {
    candle_core::safetensors::load_buffer(bytes, &Device::Cpu)
        .map_err(|e| ModelError::format(format!("{}: {e}", path.display())))
}

/// The names and shapes of a safetensors file's tensors, from its header alone.
pub fn safetensors_shapes(path: &Path) -> Result<super::detect::Shapes, ModelError> {
    use std::io::Read;
    let bad = |why: String| ModelError::format(format!("{}: {why}", path.display()));
    let mut f = std::fs::File::open(path).map_err(io_err(path))?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len)
        .map_err(|_| bad("too short for a safetensors file".into()))?;
    let len = u64::from_le_bytes(len);
    let file_len = f.metadata().map_err(io_err(path))?.len();
    if len > 100 << 20 || len + 8 > file_len {
        return Err(bad(format!(
            "not a safetensors file (a header of {len} bytes in a file of {file_len})"
        )));
    }
    let mut header = vec![0u8; len as usize];
    f.read_exact(&mut header).map_err(io_err(path))?;
    #[derive(serde::Deserialize)]
    struct Info {
        shape: Vec<usize>,
    }
    let mut map: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&header)
        .map_err(|e| bad(format!("not a safetensors header: {e}")))?;
    map.remove("__metadata__");
    map.into_iter()
        .map(|(name, v)| {
            let info: Info =
                serde_json::from_value(v).map_err(|e| bad(format!("tensor {name}: {e}")))?;
            Ok((name, info.shape))
        })
        .collect()
}

pub fn read_ncnn(arch: &Arch, param: &Path, bin: &Path) -> Result<StateDict, ModelError> {
    let text = std::fs::read_to_string(param).map_err(io_err(param))?;
    let data = std::fs::read(bin).map_err(io_err(bin))?;
    ncnn::import(&ncnn::parse_param(&text)?, &data, &arch.tensor_layout()?)
}

/// Writes a state dict as safetensors, keeping each tensor's dtype (fp16 weights stay fp16).
pub fn write_safetensors(tensors: &StateDict, path: &Path) -> Result<(), ModelError> {
    candle_core::safetensors::save(tensors, path)
        .map_err(|e| ModelError::format(format!("cannot write {}: {e}", path.display())))
}

/// Builds `arch` from `tensors`, failing on a missing tensor, a wrong shape, or a tensor the
/// architecture does not use. Weights are converted to f32 for inference (fp16 -> f32 is exact).
pub fn build_checked(
    arch: &Arch,
    tensors: StateDict,
    device: &Device,
) -> Result<Network, ModelError> {
    let names: BTreeSet<String> = tensors.keys().cloned().collect();
    let backend = CheckedBackend {
        tensors,
        used: Arc::default(),
    };
    let used = backend.used.clone();
    let vb = candle_nn::VarBuilder::from_backend(Box::new(backend), DType::F32, device.clone());
    let net = Network::new(arch, vb).map_err(|e| match e {
        candle_core::Error::WithBacktrace { inner, .. } => classify(*inner),
        other => classify(other),
    })?;
    let used = used.lock().expect("poisoned").clone();
    let unexpected: Vec<String> = names.difference(&used).cloned().collect();
    if !unexpected.is_empty() {
        return Err(ModelError::UnexpectedTensors(unexpected));
    }
    Ok(net)
}

fn classify(e: candle_core::Error) -> ModelError {
    match e {
        candle_core::Error::CannotFindTensor { path } => ModelError::MissingTensor(path),
        candle_core::Error::UnexpectedShape { msg, expected, got } => ModelError::ShapeMismatch {
            name: msg.trim_start_matches("shape mismatch for ").to_string(),
            expected: expected.dims().to_vec(),
            got: got.dims().to_vec(),
        },
        other => ModelError::Candle(other),
    }
}

/// A state-dict backend that remembers which tensors the model asked for.
struct CheckedBackend {
    tensors: StateDict,
    used: Arc<Mutex<BTreeSet<String>>>,
}

impl SimpleBackend for CheckedBackend {
    fn get(
        &self,
        s: Shape,
        name: &str,
        h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        self.used.lock().expect("poisoned").insert(name.to_string());
        SimpleBackend::get(&self.tensors, s, name, h, dtype, dev)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.used.lock().expect("poisoned").insert(name.to_string());
        SimpleBackend::get_unchecked(&self.tensors, name, dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }
}

/// A backend that hands out zeros and records each request, giving an architecture's tensor
/// names and shapes in construction (= PyTorch module) order.
#[derive(Clone, Default)]
pub(crate) struct LayoutRecorder(Arc<Mutex<Layout>>);

impl LayoutRecorder {
    pub(crate) fn take(&self) -> Layout {
        std::mem::take(&mut *self.0.lock().expect("poisoned"))
    }
}

impl SimpleBackend for LayoutRecorder {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        self.0
            .lock()
            .expect("poisoned")
            .push((name.to_string(), s.dims().to_vec()));
        Tensor::zeros(s, dtype, dev)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("layout recorder cannot serve unshaped tensor {name}")
    }

    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::find;

    fn random_state(arch: &Arch) -> StateDict {
        arch.tensor_layout()
            .unwrap()
            .into_iter()
            .map(|(n, s)| (n, Tensor::randn(0f32, 0.05, s, &Device::Cpu).unwrap()))
            .collect()
    }

    #[test]
    fn missing_extra_and_misshapen_tensors_are_named() {
        let arch = &find("realesr-animevideov3").unwrap().arch;
        let mut t = random_state(arch);
        t.remove("body.4.weight");
        let err = build_checked(arch, t, &Device::Cpu).unwrap_err();
        assert!(
            matches!(&err, ModelError::MissingTensor(n) if n == "body.4.weight"),
            "{err}"
        );

        let mut t = random_state(arch);
        t.insert(
            "body.99.weight".into(),
            Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap(),
        );
        let err = build_checked(arch, t, &Device::Cpu).unwrap_err();
        assert!(err.to_string().contains("body.99.weight"), "{err}");

        let mut t = random_state(arch);
        t.insert(
            "body.1.weight".into(),
            Tensor::zeros(63, DType::F32, &Device::Cpu).unwrap(),
        );
        let err = build_checked(arch, t, &Device::Cpu).unwrap_err();
        assert!(
            matches!(&err, ModelError::ShapeMismatch { name, .. } if name == "body.1.weight"),
            "{err}"
        );
    }

    #[test]
    fn safetensors_round_trip_keeps_fp16() {
        let arch = &find("realesr-animevideov3").unwrap().arch;
        let t: StateDict = random_state(arch)
            .into_iter()
            .map(|(n, v)| {
                let v = if v.rank() == 4 {
                    v.to_dtype(DType::F16).unwrap()
                } else {
                    v
                };
                (n, v)
            })
            .collect();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.safetensors");
        write_safetensors(&t, &path).unwrap();
        let spec = find("realesr-animevideov3").unwrap();
        let back = read(spec, &path).unwrap();
        assert_eq!(back["body.0.weight"].dtype(), DType::F16);
        assert_eq!(back["body.0.bias"].dtype(), DType::F32);
        build_checked(arch, back, &Device::Cpu).unwrap();
    }
}
