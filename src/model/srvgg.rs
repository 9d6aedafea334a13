//! SRVGGNetCompact, the small VGG-style network of Real-ESRGAN (`srvgg_arch.py`), used by
//! `realesr-animevideov3` and `realesr-general-x4v3`.
//!
//! Owns the network structure only. Keys follow the PyTorch `body` Sequential: even indices
//! are convolutions, odd ones PReLU activations (`body.0.weight`, `body.1.weight`, ...).

use candle_core::{Module, Result, Tensor};
use candle_nn::{conv2d, Conv2d, Conv2dConfig, PReLU, VarBuilder};

use super::fastconv::{Activation, Conv3x3};
use super::rrdbnet::to_nhwc;

#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub num_in_ch: usize,
    pub num_out_ch: usize,
    pub num_feat: usize,
    pub num_conv: usize,
    pub upscale: usize,
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
        }
    }

    /// `realesr-general-x4v3`: 32 body convolutions, 4x.
    pub fn general_x4v3() -> Self {
        Self {
            num_conv: 32,
            ..Self::animevideov3()
        }
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
    acts: Vec<PReLU>,
}

impl SrVggNetCompact {
    pub fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        let vb = vb.pp("body");
        let conv_cfg = Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        let mut convs = Vec::with_capacity(cfg.num_conv + 2);
        let mut acts = Vec::with_capacity(cfg.num_conv + 1);
        let mut idx = 0;
        for i in 0..=cfg.num_conv {
            let in_ch = if i == 0 { cfg.num_in_ch } else { cfg.num_feat };
            convs.push(conv2d(in_ch, cfg.num_feat, 3, conv_cfg, vb.pp(idx))?);
            acts.push(candle_nn::prelu(Some(cfg.num_feat), vb.pp(idx + 1))?);
            idx += 2;
        }
        let out_ch = cfg.num_out_ch * cfg.upscale * cfg.upscale;
        convs.push(conv2d(cfg.num_feat, out_ch, 3, conv_cfg, vb.pp(idx))?);
        Ok(Self {
            cfg: cfg.clone(),
            convs,
            acts,
        })
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }
}

impl Module for SrVggNetCompact {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let mut out = xs.clone();
        for (conv, act) in self.convs.iter().zip(&self.acts) {
            out = act.forward(&conv.forward(&out)?)?;
        }
        let last = self.convs.last().expect("at least one convolution");
        let out = candle_nn::ops::pixel_shuffle(&last.forward(&out)?, self.cfg.upscale)?;
        let (_, _, h, w) = xs.dims4()?;
        let base = xs.upsample_nearest2d(h * self.cfg.upscale, w * self.cfg.upscale)?;
        out + base
    }
}

/// The same network on the fast CPU path: channels-last activations and Winograd
/// convolutions with PReLU fused (see `fastconv`). Built from a loaded `SrVggNetCompact`.
#[derive(Debug, Clone)]
pub struct FastSrVgg {
    upscale: usize,
    convs: Vec<Conv3x3>,
}

impl FastSrVgg {
    pub fn new(net: &SrVggNetCompact) -> Result<Self> {
        let mut convs = Vec::with_capacity(net.convs.len());
        for (conv, act) in net.convs.iter().zip(&net.acts) {
            let slopes = act.weight().to_dtype(candle_core::DType::F32)?.to_vec1()?;
            convs.push(Conv3x3::new(
                conv.weight(),
                conv.bias(),
                Activation::PRelu(slopes),
            )?);
        }
        let last = net.convs.last().expect("at least one convolution");
        convs.push(Conv3x3::new(last.weight(), last.bias(), Activation::None)?);
        Ok(Self {
            upscale: net.cfg.upscale,
            convs,
        })
    }
}

impl Module for FastSrVgg {
    /// `(1, C, H, W)` in, `(1, C, H*upscale, W*upscale)` out, like `SrVggNetCompact`.
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let mut out = to_nhwc(xs)?;
        for conv in &self.convs {
            out = conv.forward(&out)?;
        }
        let out = out.permute((0, 3, 1, 2))?.contiguous()?;
        let out = candle_nn::ops::pixel_shuffle(&out, self.upscale)?;
        let (_, _, h, w) = xs.dims4()?;
        let base = xs.upsample_nearest2d(h * self.upscale, w * self.upscale)?;
        out + base
    }
}
