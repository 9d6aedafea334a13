//! Real-ESRGAN networks on candle: architectures, the registry of named models, weight
//! loading and tiled inference.
//!
//! This module knows candle and the weight formats only; it never decodes images or talks to
//! the network. Inputs and outputs are `(1, 3, H, W)` tensors with values in `[0, 1]`.

pub mod arena;
pub mod catalog;
pub mod detect;
pub mod fastconv;
mod layout;
pub mod locate;
pub mod ncnn;
pub mod registry;
pub mod resize;
pub mod rrdbnet;
pub mod simd;
pub mod srvgg;
pub mod tiling;
pub mod torch;
pub mod weights;

use candle_core::{Device, Module, Tensor};

pub use fastconv::{Isa, Prepare};
pub use registry::{find, Arch, ModelSpec, REGISTRY};
pub use tiling::{Progress, TileOptions, TileView};

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("unknown model `{0}` (known: {known})", known = registry::names().join(", "))]
    UnknownModel(String),
    #[error("unknown model `{name}` (installed: {known})")]
    UnknownModelIn { name: String, known: String },
    #[error(
        "model `{0}` is not installed on this server: its weights are in none of the weights \
         folders (`upscaler doctor` lists them)"
    )]
    NotInstalled(String),
    #[error("weights for `{model}` not found at {path}")]
    WeightsNotFound { model: String, path: String },
    /// A registry model's weights are in none of the folders searched (see `locate`).
    #[error(
        "weights for `{model}` not found: no {file} in {searched}. Put the file in one of these \
         folders or set UPSCALER_WEIGHTS_DIR to a folder that holds it (see weights/README.md)"
    )]
    WeightsMissing {
        model: String,
        file: String,
        searched: String,
    },
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
    #[error("invalid input: {0}")]
    Input(String),
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

/// Asked between the layers of a pass (on the fast path): true ends the pass early with
/// `ModelError::Cancelled`, so a cancelled or interrupted task need not finish a large tile.
pub type Stop<'a> = &'a dyn Fn() -> bool;

/// A network on the fast CPU path (`fastconv`): same results as `Network` to f32 rounding.
#[derive(Debug, Clone)]
pub enum FastNetwork {
    RrdbNet(Box<rrdbnet::FastRrdbNet>),
    SrVgg(srvgg::FastSrVgg),
}

impl FastNetwork {
    pub fn new(net: &Network, prepare: Prepare) -> candle_core::Result<Self> {
        Ok(match net {
            Network::RrdbNet(n) => Self::RrdbNet(Box::new(rrdbnet::FastRrdbNet::new(n, prepare)?)),
            Network::SrVgg(n) => Self::SrVgg(srvgg::FastSrVgg::new(n, prepare)?),
        })
    }

    /// One pass on a `(1, C, H, W)` input in `arena`'s buffers, on the `isa` path; `f` sees
    /// the output planes where the pass left them. `stop` is asked between layers.
    pub fn forward_with<R>(
        &self,
        xs: &Tensor,
        arena: &mut arena::Arena,
        isa: Isa,
        stop: Stop<'_>,
        f: impl FnOnce(TileView<'_>) -> Result<R, ModelError>,
    ) -> Result<R, ModelError> {
        let (n, c, h, w) = xs.dims4()?;
        if n != 1 {
            return Err(ModelError::Input(format!(
                "one image per pass, got a batch of {n}"
            )));
        }
        match self {
            Self::SrVgg(net) => {
                if c != net.channels() {
                    return Err(ModelError::Input(format!(
                        "the model takes {} channels, got {c}",
                        net.channels()
                    )));
                }
                let s = net.upscale();
                layout::with_cpu_slice(xs, |x| {
                    net.run(x, h, w, arena, isa, stop, |out| {
                        f(TileView::whole(out, c, h * s, w * s))
                    })
                    .unwrap_or(Err(ModelError::Cancelled))
                })
            }
            Self::RrdbNet(net) => {
                let xs = match net.unshuffle() {
                    1 => xs.clone(),
                    r => candle_nn::ops::pixel_unshuffle(xs, r)?,
                };
                let (_, cin, bh, bw) = xs.dims4()?;
                if cin != net.in_channels() {
                    return Err(ModelError::Input(format!(
                        "the model takes {} channels, got {c}",
                        net.in_channels() / (net.unshuffle() * net.unshuffle())
                    )));
                }
                let (cout, g) = (net.out_channels(), net.growth());
                layout::with_cpu_slice(&xs, |x| {
                    net.run(x, bh, bw, arena, isa, stop, |out| {
                        f(TileView::whole(out, cout, g * bh, g * bw))
                    })
                    .unwrap_or(Err(ModelError::Cancelled))
                })
            }
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
    /// The fast path's working memory, shared by clones (see `arena`).
    arenas: arena::ArenaPool,
    /// Where a model with a resize after the network puts the resized output.
    resized: arena::ArenaPool,
    /// The instruction-set path of the fast convolutions.
    isa: Isa,
    device: Device,
}

impl Model {
    /// On the CPU, also prepares the fast path (Winograd-domain weights, made once here).
    pub fn new(spec: ModelSpec, net: Network, device: Device) -> Result<Self, ModelError> {
        Self::prepared(spec, net, device, Prepare::Once)
    }

    /// `new`, with the fast path's Winograd-domain weights made when `prepare` says: once
    /// here for a service, on every pass for a single image (see `Prepare`).
    pub fn prepared(
        spec: ModelSpec,
        net: Network,
        device: Device,
        prepare: Prepare,
    ) -> Result<Self, ModelError> {
        let fast = match device {
            Device::Cpu => match FastNetwork::new(&net, prepare) {
                Ok(f) => Some(f),
                Err(e) => {
                    tracing::warn!(
                        model = spec.name,
                        error = %e,
                        "the fast path cannot run this model: using candle's convolutions"
                    );
                    None
                }
            },
            _ => None,
        };
        Ok(Self {
            spec,
            net,
            fast,
            arenas: arena::ArenaPool::default(),
            resized: arena::ArenaPool::default(),
            isa: Isa::active(),
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

    /// The same model on another instruction-set path of the fast convolution (for tests
    /// and measurements); refused if this CPU lacks it.
    pub fn with_isa(&self, isa: Isa) -> Result<Self, ModelError> {
        if !isa.supported() {
            return Err(ModelError::Input(format!(
                "this CPU cannot run the {} path",
                isa.name()
            )));
        }
        Ok(Self {
            isa,
            arenas: arena::ArenaPool::default(),
            resized: arena::ArenaPool::default(),
            ..self.clone()
        })
    }

    /// Whether forward passes take the fast path.
    pub fn is_fast(&self) -> bool {
        self.fast.is_some()
    }

    /// The instruction-set path of the fast convolutions, if the fast path runs.
    pub fn isa(&self) -> Option<Isa> {
        self.fast.as_ref().map(|_| self.isa)
    }

    /// Bytes of working memory the fast path keeps between passes.
    pub fn arena_bytes(&self) -> usize {
        self.arenas.idle_bytes() + self.resized.idle_bytes()
    }
    /// Loads `spec` from a weights file (safetensors, `.pth`, or an ncnn `.param` with its `.bin`).
    pub fn load(
        spec: &ModelSpec,
        path: &std::path::Path,
        device: &Device,
    ) -> Result<Self, ModelError> {
        Self::load_prepared(spec, path, device, Prepare::Once)
    }

    /// `load`, with the fast path's weights prepared as `prepare` says.
    pub fn load_prepared(
        spec: &ModelSpec,
        path: &std::path::Path,
        device: &Device,
        prepare: Prepare,
    ) -> Result<Self, ModelError> {
        let tensors = weights::read(spec, path)?;
        let net = weights::build_checked(&spec.arch, tensors, device)?;
        Self::prepared(spec.clone(), net, device.clone(), prepare)
    }

    pub fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    /// Output pixels per input pixel, per side (after any resize the model ends with).
    pub fn scale(&self) -> usize {
        self.spec.scale()
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn network(&self) -> &Network {
        &self.net
    }

    /// Runs the network on a `(1, 3, H, W)` input without tiling.
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor, ModelError> {
        if self.fast.is_none() && self.spec.resize.is_none() {
            return Ok(self.net.forward(xs)?);
        }
        self.forward_with(xs, |out| out.to_tensor(&self.device))
    }

    /// Runs the network on a `(1, 3, H, W)` input without tiling and hands `f` the output
    /// planes. On the fast path they are read straight from the pass's working memory,
    /// so a steady stream of passes allocates nothing for its activations or output.
    pub fn forward_with<R>(
        &self,
        xs: &Tensor,
        f: impl FnOnce(TileView<'_>) -> Result<R, ModelError>,
    ) -> Result<R, ModelError> {
        self.forward_until(xs, &|| false, f)
    }

    /// `forward_with`, ended early with `ModelError::Cancelled` once `stop` says true: on the
    /// fast path it is asked between layers, so a large tile stops within a fraction of its
    /// time; the reference path runs a pass to its end.
    pub fn forward_until<R>(
        &self,
        xs: &Tensor,
        stop: Stop<'_>,
        f: impl FnOnce(TileView<'_>) -> Result<R, ModelError>,
    ) -> Result<R, ModelError> {
        let f = |out: TileView<'_>| match self.spec.resize {
            None => f(out),
            Some(r) => {
                let (h, w) = (out.height(), out.width());
                if h < 4 || w < 4 {
                    return Err(ModelError::Input(format!(
                        "{} needs an input of at least 4x4 pixels per tile",
                        self.spec.name
                    )));
                }
                let (oh, ow) = (r.out_len(h), r.out_len(w));
                self.resized.with(|a| {
                    let dst = a.slot(0, out.channels() * oh * ow);
                    resize::bicubic(&out, oh, ow, dst);
                    f(TileView::whole(dst, out.channels(), oh, ow))
                })
            }
        };
        match &self.fast {
            Some(fast) => self
                .arenas
                .with(|arena| fast.forward_with(xs, arena, self.isa, stop, f)),
            None => {
                let out = self.net.forward(xs)?;
                let (_, c, h, w) = out.dims4()?;
                let data: Vec<f32> = out.to_device(&Device::Cpu)?.flatten_all()?.to_vec1()?;
                f(TileView::whole(&data, c, h, w))
            }
        }
    }
}
