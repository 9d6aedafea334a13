//! Real-ESRGAN networks on candle: architectures, the registry of named models, weight
//! loading and tiled inference.
//!
//! This module knows candle and the weight formats only; it never decodes images or talks to
//! the network. Inputs and outputs are `(1, 3, H, W)` tensors with values in `[0, 1]`.

pub mod fastconv;
pub mod ncnn;
pub mod registry;
pub mod rrdbnet;
pub mod srvgg;
pub mod tiling;
pub mod weights;

use candle_core::{Device, Module, Tensor};

pub use registry::{find, Arch, ModelSpec, REGISTRY};
pub use tiling::{Progress, TileOptions};

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("unknown model `{0}` (known: {known})", known = registry::names().join(", "))]
    UnknownModel(String),
    #[error("weights for `{model}` not found at {path}")]
    WeightsNotFound { model: String, path: String },
    #[error("cannot read {path}: {cause}")]
    Io { path: String, cause: std::io::Error },
    #[error("invalid weights: {0}")]
    Format(String),
    #[error("weights lack tensor `{0}`")]
    MissingTensor(String),
    #[error("weights have unexpected tensor(s): {}", .0.join(", "))]
    UnexpectedTensors(Vec<String>),
    #[error("tensor `{name}` has shape {got:?}, expected {expected:?}")]
    ShapeMismatch {
        name: String,
        expected: Vec<usize>,
        got: Vec<usize>,
    },
    #[error("invalid tiling: {0}")]
    Tiling(String),
    #[error("cancelled")]
    Cancelled,
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl ModelError {
    pub(crate) fn format(msg: impl Into<String>) -> Self {
        Self::Format(msg.into())
    }
}

/// One of the supported architectures with its weights loaded.
#[derive(Debug, Clone)]
pub enum Network {
    RrdbNet(Box<rrdbnet::RrdbNet>),
    SrVgg(srvgg::SrVggNetCompact),
}

impl Network {
    pub fn new(arch: &Arch, vb: candle_nn::VarBuilder) -> candle_core::Result<Self> {
        Ok(match arch {
            Arch::RrdbNet(cfg) => Self::RrdbNet(Box::new(rrdbnet::RrdbNet::new(cfg, vb)?)),
            Arch::SrVgg(cfg) => Self::SrVgg(srvgg::SrVggNetCompact::new(cfg, vb)?),
        })
    }
}

impl Module for Network {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::RrdbNet(n) => n.forward(xs),
            Self::SrVgg(n) => n.forward(xs),
        }
    }
}

/// A network on the fast CPU path (`fastconv`): same results as `Network` to f32 rounding.
#[derive(Debug, Clone)]
pub enum FastNetwork {
    RrdbNet(Box<rrdbnet::FastRrdbNet>),
    SrVgg(srvgg::FastSrVgg),
}

impl FastNetwork {
    pub fn new(net: &Network) -> candle_core::Result<Self> {
        Ok(match net {
            Network::RrdbNet(n) => Self::RrdbNet(Box::new(rrdbnet::FastRrdbNet::new(n)?)),
            Network::SrVgg(n) => Self::SrVgg(srvgg::FastSrVgg::new(n)?),
        })
    }
}

impl Module for FastNetwork {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::RrdbNet(n) => n.forward(xs),
            Self::SrVgg(n) => n.forward(xs),
        }
    }
}

/// A registry model ready to run.
#[derive(Debug, Clone)]
pub struct Model {
    spec: ModelSpec,
    net: Network,
    /// Used instead of `net` when present (on the CPU).
    fast: Option<FastNetwork>,
    device: Device,
}

impl Model {
    /// On the CPU, also prepares the fast path (Winograd-domain weights, made once here).
    pub fn new(spec: ModelSpec, net: Network, device: Device) -> Result<Self, ModelError> {
        let fast = match device {
            Device::Cpu => Some(FastNetwork::new(&net)?),
            _ => None,
        };
        Ok(Self {
            spec,
            net,
            fast,
            device,
        })
    }

    /// The same model on candle's own operations only: the reference the fast path is
    /// tested against.
    pub fn reference(&self) -> Self {
        Self {
            fast: None,
            ..self.clone()
        }
    }

    /// Whether forward passes take the fast path.
    pub fn is_fast(&self) -> bool {
        self.fast.is_some()
    }

    /// Loads `spec` from a weights file (safetensors, `.pth`, or an ncnn `.param` with its `.bin`).
    pub fn load(
        spec: &ModelSpec,
        path: &std::path::Path,
        device: &Device,
    ) -> Result<Self, ModelError> {
        let tensors = weights::read(spec, path)?;
        let net = weights::build_checked(&spec.arch, tensors, device)?;
        Self::new(spec.clone(), net, device.clone())
    }

    pub fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    pub fn scale(&self) -> usize {
        self.spec.arch.scale()
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn network(&self) -> &Network {
        &self.net
    }

    /// Runs the network on a `(1, 3, H, W)` input without tiling.
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor, ModelError> {
        Ok(match &self.fast {
            Some(fast) => fast.forward(xs)?,
            None => self.net.forward(xs)?,
        })
    }
}
