//! SRVGGNetCompact, the small VGG-style network of Real-ESRGAN (`srvgg_arch.py`), used by
//! `realesr-animevideov3` and `realesr-general-x4v3`.
//!
//! Owns the network structure only. Keys follow the PyTorch `body` Sequential: even indices
//! are convolutions, odd ones PReLU activations (`body.0.weight`, `body.1.weight`, ...).

use candle_core::{Module, Result, Tensor};
use candle_nn::{conv2d, Conv2d, Conv2dConfig, PReLU, VarBuilder};

use super::arena::Arena;
use super::fastconv::{Activation, Conv3x3, Isa, Prepare};
use super::{layout, Stop};

#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub num_in_ch: usize,
    pub num_out_ch: usize,
    pub num_feat: usize,
    pub num_conv: usize,
    pub upscale: usize,
    pub act: Act,
}

/// The activation after every convolution but the last (`act_type` in `srvgg_arch.py`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Act {
    /// One learned slope per channel (`body.{2i+1}.weight`): the Real-ESRGAN models.
    #[default]
    PRelu,
    Relu,
    /// Slope 0.1, as `srvgg_arch.py` builds it.
    LeakyRelu,
}

impl Act {
    /// The name a sidecar `.json` uses: `prelu`, `relu` or `leakyrelu`.
    pub fn from_name(name: &str) -> Option<Self> {
        match name.to_ascii_lowercase().replace(['_', '-'], "").as_str() {
            "prelu" => Some(Self::PRelu),
            "relu" => Some(Self::Relu),
            "leakyrelu" | "lrelu" => Some(Self::LeakyRelu),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::PRelu => "PReLU",
            Self::Relu => "ReLU",
            Self::LeakyRelu => "LeakyReLU(0.1)",
        }
    }
}

impl Config {
    /// `realesr-animevideov3`: 16 body convolutions, 4x.
    pub fn animevideov3() -> Self {
        Self {
            num_in_ch: 3,
            num_out_ch: 3,
            num_feat: 64,
            num_conv: 16,
            upscale: 4,
            act: Act::PRelu,
        }
    }

    /// `realesr-general-x4v3`: 32 body convolutions, 4x.
    pub fn general_x4v3() -> Self {
        Self {
            num_conv: 32,
            ..Self::animevideov3()
        }
    }

    /// Why this configuration cannot be built, if it cannot.
    pub fn check(&self) -> std::result::Result<(), String> {
        if self.num_in_ch != self.num_out_ch {
            return Err(format!(
                "{} input and {} output channels: SRVGGNetCompact adds its input to its output",
                self.num_in_ch, self.num_out_ch
            ));
        }
        if [self.num_in_ch, self.num_feat, self.upscale].contains(&0) {
            return Err("a layer without channels, or scale 0".into());
        }
        Ok(())
    }

    /// f32 values the fast path keeps per input pixel (its arena slots, see `FastSrVgg::run`).
    pub(crate) fn arena_floats_per_input_pixel(&self) -> usize {
        let s2 = self.upscale * self.upscale;
        self.num_in_ch + 2 * self.num_feat.max(self.num_out_ch * s2)
    }

    pub fn macs_per_input_pixel(&self) -> u64 {
        let (f, k) = (self.num_feat as u64, 9u64);
        let first = self.num_in_ch as u64 * f * k;
        let body = self.num_conv as u64 * f * f * k;
        let last = f * (self.num_out_ch * self.upscale * self.upscale) as u64 * k;
        first + body + last
    }
}

#[derive(Debug, Clone)]
pub struct SrVggNetCompact {
    cfg: Config,
    convs: Vec<Conv2d>,
    /// The PReLUs after each convolution but the last (empty for ReLU and LeakyReLU).
    prelus: Vec<PReLU>,
}

impl SrVggNetCompact {
    pub fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        cfg.check().map_err(candle_core::Error::msg)?;
        let vb = vb.pp("body");
        let conv_cfg = Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        let mut convs = Vec::with_capacity(cfg.num_conv + 2);
        let mut prelus = Vec::with_capacity(cfg.num_conv + 1);
        let mut idx = 0;
        for i in 0..=cfg.num_conv {
            let in_ch = if i == 0 { cfg.num_in_ch } else { cfg.num_feat };
            convs.push(conv2d(in_ch, cfg.num_feat, 3, conv_cfg, vb.pp(idx))?);
            if cfg.act == Act::PRelu {
                prelus.push(candle_nn::prelu(Some(cfg.num_feat), vb.pp(idx + 1))?);
            }
            idx += 2;
        }
        let out_ch = cfg.num_out_ch * cfg.upscale * cfg.upscale;
        convs.push(conv2d(cfg.num_feat, out_ch, 3, conv_cfg, vb.pp(idx))?);
        Ok(Self {
            cfg: cfg.clone(),
            convs,
            prelus,
        })
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    fn activate(&self, i: usize, xs: &Tensor) -> Result<Tensor> {
        match self.cfg.act {
            Act::PRelu => self.prelus[i].forward(xs),
            Act::Relu => xs.relu(),
            Act::LeakyRelu => candle_nn::ops::leaky_relu(xs, 0.1),
        }
    }
}

impl Module for SrVggNetCompact {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let (last, body) = self.convs.split_last().expect("at least one convolution");
        let mut out = xs.clone();
        for (i, conv) in body.iter().enumerate() {
            out = self.activate(i, &conv.forward(&out)?)?;
        }
        let s = self.cfg.upscale;
        let out = candle_nn::ops::pixel_shuffle(&last.forward(&out)?, s)?;
        let (_, _, h, w) = xs.dims4()?;
        let base = xs.upsample_nearest2d(h * s, w * s)?;
        out + base
    }
}

/// The same network on the fast CPU path: channels-last activations and Winograd
/// convolutions with the activation fused (see `fastconv`), working in an arena's buffers. Built from
/// a loaded `SrVggNetCompact`.
#[derive(Debug, Clone)]
pub struct FastSrVgg {
    channels: usize,
    upscale: usize,
    convs: Vec<Conv3x3>,
}

impl FastSrVgg {
    pub fn new(net: &SrVggNetCompact, prepare: Prepare) -> Result<Self> {
        let mut convs = Vec::with_capacity(net.convs.len());
        let (last, body) = net.convs.split_last().expect("at least one convolution");
        for (i, conv) in body.iter().enumerate() {
            let act = match net.cfg.act {
                Act::PRelu => {
                    let slopes = net.prelus[i].weight();
                    Activation::PRelu(slopes.to_dtype(candle_core::DType::F32)?.to_vec1()?)
                }
                Act::Relu => Activation::LeakyRelu(0.0),
                Act::LeakyRelu => Activation::LeakyRelu(0.1),
            };
            convs.push(Conv3x3::prepared(conv.weight(), conv.bias(), act, prepare)?);
        }
        convs.push(Conv3x3::prepared(
            last.weight(),
            last.bias(),
            Activation::None,
            prepare,
        )?);
        let cfg = &net.cfg;
        if cfg.num_in_ch != cfg.num_out_ch {
            candle_core::bail!("SRVGGNet adds its input to its output: in and out channels differ");
        }
        Ok(Self {
            channels: cfg.num_out_ch,
            upscale: cfg.upscale,
            convs,
        })
    }

    pub fn channels(&self) -> usize {
        self.channels
    }

    pub fn upscale(&self) -> usize {
        self.upscale
    }

    /// One pass on `x`, the `(channels, h, w)` input planes, in `arena`; `f` sees the
    /// `(channels, h * upscale, w * upscale)` output planes.
    /// `stop` is asked before each convolution; once it says true the pass ends there and
    /// `None` comes back.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn run<R>(
        &self,
        x: &[f32],
        h: usize,
        w: usize,
        arena: &mut Arena,
        isa: Isa,
        stop: Stop<'_>,
        f: impl FnOnce(&[f32]) -> R,
    ) -> Option<R> {
        let (c, s, px) = (self.channels, self.upscale, h * w);
        let widest = self
            .convs
            .iter()
            .map(Conv3x3::out_channels)
            .max()
            .unwrap_or(0);
        let widest = widest.max(c * s * s);
        let [input, a, b] = arena.slots([px * c, px * widest, px * widest]);
        layout::nchw_to_nhwc(x, c, h, w, input);
        let (mut cur, mut next) = (a, b);
        let first = &self.convs[0];
        first.run_into(
            input,
            &mut cur[..px * first.out_channels()],
            h,
            w,
            false,
            isa,
        );
        for conv in &self.convs[1..] {
            if stop() {
                return None;
            }
            let (cin, cout) = (conv.in_channels(), conv.out_channels());
            conv.run_into(&cur[..px * cin], &mut next[..px * cout], h, w, false, isa);
            std::mem::swap(&mut cur, &mut next);
        }
        // The output goes into the other buffer, free again by now.
        let out = &mut next[..c * px * s * s];
        layout::shuffle_add_base(&cur[..px * c * s * s], x, c, h, w, s, out);
        Some(f(out))
    }
}
