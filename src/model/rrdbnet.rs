//! RRDBNet, the generator of ESRGAN / Real-ESRGAN (BasicSR `rrdbnet_arch.py`).
//!
//! Owns the network structure only: no file or image I/O. The `VarBuilder` prefixes mirror
//! the PyTorch state-dict keys (`conv_first`, `body.{i}.rdb{j}.conv{k}`, `conv_body`,
//! `conv_up1`, `conv_up2`, `conv_hr`, `conv_last`) so official weights load unchanged.

use candle_core::{Module, Result, Tensor};
use candle_nn::{conv2d, Conv2d, Conv2dConfig, VarBuilder};

use rayon::prelude::*;

use super::arena::Arena;
use super::fastconv::{Activation, Conv3x3, Epilogue, Io, Isa, Prepare, Residual};
use super::{layout, Stop};

/// Shape of an RRDBNet, in any of the configurations ESRGAN-family models use.
///
/// The body works at the input resolution divided by `unshuffle` (BasicSR's 2x and 1x models
/// pixel-unshuffle the input by 2 or 4 first); each of the `num_upsample` stages doubles it
/// (nearest neighbour, then a convolution). The overall scale is `2^num_upsample / unshuffle`:
/// 1, 2, 4, 8 or 16.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub num_in_ch: usize,
    pub num_out_ch: usize,
    pub num_feat: usize,
    pub num_block: usize,
    pub num_grow_ch: usize,
    /// 2x upsampling stages (`conv_up1`, `conv_up2`, ...): 0 to 4.
    pub num_upsample: usize,
    /// Pixel-unshuffle factor of the input: 1, 2 or 4.
    pub unshuffle: usize,
    /// ESRGAN+: every dense block adds a bias-free 1x1 convolution of its input to its
    /// second output, and that output to its fourth.
    pub plus: bool,
}

impl Config {
    /// `RealESRGAN_x4plus`: 23 RRDB blocks, 4x.
    pub fn x4plus() -> Self {
        Self {
            num_in_ch: 3,
            num_out_ch: 3,
            num_feat: 64,
            num_block: 23,
            num_grow_ch: 32,
            num_upsample: 2,
            unshuffle: 1,
            plus: false,
        }
    }

    /// `RealESRGAN_x4plus_anime_6B`: 6 RRDB blocks, 4x.
    pub fn x4plus_anime_6b() -> Self {
        Self {
            num_block: 6,
            ..Self::x4plus()
        }
    }

    /// `RealESRGAN_x2plus`: 23 blocks at 2x with a pixel-unshuffled input.
    pub fn x2plus() -> Self {
        Self {
            unshuffle: 2,
            ..Self::x4plus()
        }
    }

    /// Output pixels per input pixel, per side.
    pub fn scale(&self) -> usize {
        (1 << self.num_upsample) / self.unshuffle
    }

    /// Why this configuration cannot be built, if it cannot.
    pub fn check(&self) -> std::result::Result<(), String> {
        if self.num_upsample > 4 {
            return Err(format!(
                "{} upsampling stages (at most 4, for 16x)",
                self.num_upsample
            ));
        }
        if !matches!(self.unshuffle, 1 | 2 | 4) || self.unshuffle > 1 << self.num_upsample {
            return Err(format!(
                "a pixel unshuffle by {} with {} upsampling stages",
                self.unshuffle, self.num_upsample
            ));
        }
        if [
            self.num_in_ch,
            self.num_out_ch,
            self.num_feat,
            self.num_grow_ch,
        ]
        .contains(&0)
        {
            return Err("a layer without channels".into());
        }
        Ok(())
    }

    /// Channels the first convolution sees after the pixel unshuffle.
    pub fn first_conv_in_ch(&self) -> usize {
        self.num_in_ch * self.unshuffle * self.unshuffle
    }

    /// Multiply-adds per input pixel, counting every convolution.
    pub fn macs_per_input_pixel(&self) -> u64 {
        let k = 9u64;
        let (f, g) = (self.num_feat as u64, self.num_grow_ch as u64);
        let body_px = (self.unshuffle * self.unshuffle) as u64;
        // The body runs at input / unshuffle resolution: count per body pixel, then rescale.
        let first = self.first_conv_in_ch() as u64 * f * k;
        let plus = if self.plus { f * g } else { 0 };
        let rdb: u64 =
            (0..4).map(|i| (f + i * g) * g * k).sum::<u64>() + (f + 4 * g) * f * k + plus;
        let body = rdb * 3 * self.num_block as u64 + f * f * k;
        let per_body_px = first + body;
        // Upsampling stage m runs at 4^m body pixels; the last two convolutions at the end.
        let up: u64 = (1..=self.num_upsample as u32)
            .map(|m| f * f * k * 4u64.pow(m))
            .sum();
        let tail =
            (f * f * k + f * self.num_out_ch as u64 * k) * 4u64.pow(self.num_upsample as u32);
        (per_body_px + up + tail) / body_px
    }

    /// f32 values the fast path keeps per body pixel (its arena slots, see `FastRrdbNet::run`).
    pub(crate) fn arena_floats_per_body_pixel(&self) -> usize {
        let stride = self.num_feat + 4 * self.num_grow_ch;
        let wide = self.num_feat.max(self.num_out_ch);
        let plus = if self.plus { self.num_grow_ch } else { 0 };
        self.first_conv_in_ch()
            + self.num_feat
            + 3 * stride
            + plus
            + 2 * (1 << (2 * self.num_upsample)) * wide
    }
}

fn conv3x3(in_ch: usize, out_ch: usize, vb: VarBuilder) -> Result<Conv2d> {
    let cfg = Conv2dConfig {
        padding: 1,
        ..Default::default()
    };
    conv2d(in_ch, out_ch, 3, cfg, vb)
}

fn lrelu(xs: &Tensor) -> Result<Tensor> {
    candle_nn::ops::leaky_relu(xs, 0.2)
}

/// Residual dense block: five convolutions, each seeing the concatenation of the block input
/// and every earlier output; ESRGAN+ adds a 1x1 convolution of the input to the second.
#[derive(Debug, Clone)]
struct ResidualDenseBlock {
    convs: [Conv2d; 5],
    conv1x1: Option<Conv2d>,
}

impl ResidualDenseBlock {
    fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        let (num_feat, num_grow_ch) = (cfg.num_feat, cfg.num_grow_ch);
        let conv = |i: usize, out: usize| {
            conv3x3(
                num_feat + (i - 1) * num_grow_ch,
                out,
                vb.pp(format!("conv{i}")),
            )
        };
        let conv1x1 = match cfg.plus {
            true => Some(candle_nn::conv2d_no_bias(
                num_feat,
                num_grow_ch,
                1,
                Conv2dConfig::default(),
                vb.pp("conv1x1"),
            )?),
            false => None,
        };
        Ok(Self {
            convs: [
                conv(1, num_grow_ch)?,
                conv(2, num_grow_ch)?,
                conv(3, num_grow_ch)?,
                conv(4, num_grow_ch)?,
                conv(5, num_feat)?,
            ],
            conv1x1,
        })
    }
}

impl Module for ResidualDenseBlock {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut feats = vec![x.clone()];
        for (i, conv) in self.convs[..4].iter().enumerate() {
            let input = Tensor::cat(&feats, 1)?;
            let mut out = lrelu(&conv.forward(&input)?)?;
            if let Some(c1) = &self.conv1x1 {
                // ESRGAN+: x2 += conv1x1(x), then x4 += x2 (the amended x2).
                match i {
                    1 => out = (out + c1.forward(x)?)?,
                    3 => out = (out + &feats[2])?,
                    _ => {}
                }
            }
            feats.push(out);
        }
        let x5 = self.convs[4].forward(&Tensor::cat(&feats, 1)?)?;
        (x5 * 0.2)? + x
    }
}

/// Residual in residual dense block: three dense blocks and a scaled skip connection.
#[derive(Debug, Clone)]
struct Rrdb {
    rdbs: [ResidualDenseBlock; 3],
}

impl Rrdb {
    fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        let rdb = |i: usize| ResidualDenseBlock::new(cfg, vb.pp(format!("rdb{i}")));
        Ok(Self {
            rdbs: [rdb(1)?, rdb(2)?, rdb(3)?],
        })
    }
}

impl Module for Rrdb {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut out = x.clone();
        for rdb in &self.rdbs {
            out = rdb.forward(&out)?;
        }
        (out * 0.2)? + x
    }
}

#[derive(Debug, Clone)]
pub struct RrdbNet {
    cfg: Config,
    conv_first: Conv2d,
    body: Vec<Rrdb>,
    conv_body: Conv2d,
    /// `conv_up1`, `conv_up2`, ...: one per upsampling stage.
    conv_ups: Vec<Conv2d>,
    conv_hr: Conv2d,
    conv_last: Conv2d,
}

impl RrdbNet {
    pub fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        cfg.check().map_err(candle_core::Error::msg)?;
        let f = cfg.num_feat;
        let conv_first = conv3x3(cfg.first_conv_in_ch(), f, vb.pp("conv_first"))?;
        let vb_body = vb.pp("body");
        let body = (0..cfg.num_block)
            .map(|i| Rrdb::new(cfg, vb_body.pp(i)))
            .collect::<Result<Vec<_>>>()?;
        let conv_body = conv3x3(f, f, vb.pp("conv_body"))?;
        let conv_ups = (1..=cfg.num_upsample)
            .map(|m| conv3x3(f, f, vb.pp(format!("conv_up{m}"))))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            cfg: cfg.clone(),
            conv_first,
            body,
            conv_body,
            conv_ups,
            conv_hr: conv3x3(f, f, vb.pp("conv_hr"))?,
            conv_last: conv3x3(f, cfg.num_out_ch, vb.pp("conv_last"))?,
        })
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }
}

fn upsample2x(xs: &Tensor) -> Result<Tensor> {
    let (_, _, h, w) = xs.dims4()?;
    xs.upsample_nearest2d(h * 2, w * 2)
}

impl Module for RrdbNet {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let feat = match self.cfg.unshuffle {
            1 => xs.clone(),
            r => candle_nn::ops::pixel_unshuffle(xs, r)?,
        };
        let feat = self.conv_first.forward(&feat)?;
        let mut body = feat.clone();
        for block in &self.body {
            body = block.forward(&body)?;
        }
        let mut feat = (feat + self.conv_body.forward(&body)?)?;
        for up in &self.conv_ups {
            feat = lrelu(&up.forward(&upsample2x(&feat)?)?)?;
        }
        self.conv_last
            .forward(&lrelu(&self.conv_hr.forward(&feat)?)?)
    }
}

/// The same network on the fast CPU path: channels-last activations and Winograd
/// convolutions with LeakyReLU fused (see `fastconv`). Built from a loaded `RrdbNet`.
#[derive(Debug, Clone)]
pub struct FastRrdbNet {
    /// `Config::unshuffle` of the network.
    unshuffle: usize,
    /// Channels per pixel of the trunk's buffers: num_feat + 4 * num_grow_ch.
    stride: usize,
    conv_first: Conv3x3,
    /// Per RRDB, per dense block, its convolutions.
    body: Vec<[Dense; 3]>,
    conv_body: Conv3x3,
    conv_ups: Vec<Conv3x3>,
    conv_hr: Conv3x3,
    conv_last: Conv3x3,
}

/// One dense block's five convolutions, and ESRGAN+'s 1x1 one as a 3x3 convolution whose
/// only non-zero taps are the centre ones (the same cost as `conv1`, a small share of the
/// block).
#[derive(Debug, Clone)]
struct Dense {
    convs: [Conv3x3; 5],
    conv1x1: Option<Conv3x3>,
}

fn fast(conv: &Conv2d, act: Activation, prepare: Prepare) -> Result<Conv3x3> {
    Conv3x3::prepared(conv.weight(), conv.bias(), act, prepare)
}

impl FastRrdbNet {
    pub fn new(net: &RrdbNet, prepare: Prepare) -> Result<Self> {
        let lrelu = || Activation::LeakyRelu(0.2);
        let dense = |rdb: &ResidualDenseBlock| -> Result<Dense> {
            let c = &rdb.convs;
            let conv1x1 = match &rdb.conv1x1 {
                Some(c1) => {
                    let centred = c1
                        .weight()
                        .pad_with_zeros(2, 1, 1)?
                        .pad_with_zeros(3, 1, 1)?;
                    Some(Conv3x3::prepared(
                        &centred,
                        None,
                        Activation::None,
                        prepare,
                    )?)
                }
                None => None,
            };
            Ok(Dense {
                convs: [
                    fast(&c[0], lrelu(), prepare)?,
                    fast(&c[1], lrelu(), prepare)?,
                    fast(&c[2], lrelu(), prepare)?,
                    fast(&c[3], lrelu(), prepare)?,
                    fast(&c[4], Activation::None, prepare)?,
                ],
                conv1x1,
            })
        };
        let body = net
            .body
            .iter()
            .map(|rrdb| {
                Ok([
                    dense(&rrdb.rdbs[0])?,
                    dense(&rrdb.rdbs[1])?,
                    dense(&rrdb.rdbs[2])?,
                ])
            })
            .collect::<Result<Vec<_>>>()?;
        let stride = net.cfg.num_feat + 4 * net.cfg.num_grow_ch;
        for block in body.iter().flatten() {
            for conv in &block.convs[..4] {
                if conv.in_channels() + conv.out_channels() > stride {
                    candle_core::bail!("dense convolution wider than the trunk buffer");
                }
            }
        }
        Ok(Self {
            unshuffle: net.cfg.unshuffle,
            stride,
            conv_first: fast(&net.conv_first, Activation::None, prepare)?,
            body,
            conv_body: fast(&net.conv_body, Activation::None, prepare)?,
            conv_ups: net
                .conv_ups
                .iter()
                .map(|c| fast(c, lrelu(), prepare))
                .collect::<Result<_>>()?,
            conv_hr: fast(&net.conv_hr, lrelu(), prepare)?,
            conv_last: fast(&net.conv_last, Activation::None, prepare)?,
        })
    }

    /// The pixel-unshuffle factor applied to the input before the first convolution.
    pub fn unshuffle(&self) -> usize {
        self.unshuffle
    }

    /// Output pixels per body pixel, per side: 2 to the number of upsampling stages.
    pub fn growth(&self) -> usize {
        1 << self.conv_ups.len()
    }

    /// Channels the first convolution takes (after the unshuffle).
    pub fn in_channels(&self) -> usize {
        self.conv_first.in_channels()
    }

    pub fn out_channels(&self) -> usize {
        self.conv_last.out_channels()
    }

    /// One pass on `x`, the `(cin, h, w)` input planes (pixel-unshuffled already), in
    /// `arena`; `f` sees the `(out_ch, g * h, g * w)` output planes, `g` = `growth()`.
    /// `stop` is asked before each RRDB block and each stage after the trunk; once it says
    /// true the pass ends there and `None` comes back.
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
        let (cin, nf, stride) = (
            self.conv_first.in_channels(),
            self.conv_first.out_channels(),
            self.stride,
        );
        let cout = self.conv_last.out_channels();
        let px = h * w;
        let g = self.growth();
        let big = g * g * px * nf.max(cout);
        let gc = self
            .body
            .first()
            .map_or(0, |b| b[0].convs[0].out_channels());
        let plus = if self.body.iter().flatten().any(|d| d.conv1x1.is_some()) {
            px * gc
        } else {
            0
        };
        let [input, feat, x0, t1, t2, extra, a, b] = arena.slots([
            px * cin,
            px * nf,
            px * stride,
            px * stride,
            px * stride,
            plus,
            big,
            big,
        ]);
        layout::nchw_to_nhwc(x, cin, h, w, input);
        self.conv_first.run_into(input, feat, h, w, false, isa);
        self.trunk(feat, [x0, t1, t2], extra, h, w, isa, stop)?;
        // The upsampling stages, then conv_hr and conv_last, going back and forth between
        // the two large buffers; the output planes go to the one conv_last read from.
        let (mut cur, mut next) = (a, b);
        let (mut ch, mut cw) = (h, w);
        for (i, up) in self.conv_ups.iter().enumerate() {
            if stop() {
                return None;
            }
            let src: &[f32] = if i == 0 { feat } else { &cur[..ch * cw * nf] };
            up.run_into(
                src,
                &mut next[..4 * ch * cw * nf],
                2 * ch,
                2 * cw,
                true,
                isa,
            );
            (ch, cw) = (2 * ch, 2 * cw);
            std::mem::swap(&mut cur, &mut next);
        }
        let n = ch * cw;
        let src: &[f32] = if self.conv_ups.is_empty() {
            feat
        } else {
            &cur[..n * nf]
        };
        if stop() {
            return None;
        }
        self.conv_hr
            .run_into(src, &mut next[..n * nf], ch, cw, false, isa);
        std::mem::swap(&mut cur, &mut next);
        if stop() {
            return None;
        }
        self.conv_last
            .run_into(&cur[..n * nf], &mut next[..n * cout], ch, cw, false, isa);
        let out = &mut cur[..n * cout];
        layout::nhwc_to_nchw(&next[..n * cout], cout, ch, cw, out);
        Some(f(out))
    }

    /// The trunk: the RRDB blocks and `conv_body`, with the skip from `conv_first`, on
    /// three channels-last buffers of `num_feat + 4 * num_grow_ch` channels per pixel. Each
    /// dense convolution reads the channel prefix it needs and writes its own slice, so
    /// nothing is concatenated, and the residual sums are fused into the convolutions'
    /// outputs. `feat` (`h x w x num_feat`) is the input and receives the output; `extra`
    /// (`h x w x num_grow_ch`, ESRGAN+ only) holds each block's 1x1 convolution. `None`:
    /// `stop` said true before a block, and the trunk ended there.
    #[allow(clippy::too_many_arguments)]
    fn trunk(
        &self,
        feat: &mut [f32],
        bufs: [&mut [f32]; 3],
        extra: &mut [f32],
        h: usize,
        w: usize,
        isa: Isa,
        stop: Stop<'_>,
    ) -> Option<()> {
        let nf = self.conv_first.out_channels();
        let stride = self.stride;
        let [x, t1, t2] = bufs;
        // x: each RRDB's input, and its output in channels 0..nf; t1, t2: the inputs of the
        // second and third dense blocks. Channels past nf are the dense blocks' growth, each
        // written before it is read.
        x.par_chunks_mut(stride * w)
            .zip(feat.par_chunks(nf * w))
            .for_each(|(dst, src)| {
                for (d, s) in dst.chunks_exact_mut(stride).zip(src.chunks_exact(nf)) {
                    d[..nf].copy_from_slice(s);
                }
            });
        let (x, t1, t2) = (x.as_mut_ptr(), t1.as_mut_ptr(), t2.as_mut_ptr());
        let extra = extra.as_mut_ptr();
        let res = |ptr: *mut f32, stride: usize, scale: f32| Some(Residual { ptr, stride, scale });
        let dense = |block: &Dense, src: *mut f32, dst: *mut f32, epilogue: Epilogue| {
            let convs = &block.convs;
            if let Some(c1) = &block.conv1x1 {
                let io = Io {
                    src,
                    src_stride: stride,
                    dst: extra,
                    dst_stride: c1.out_channels(),
                    epilogue: Epilogue::default(),
                    upsample: false,
                };
                // SAFETY: reads the block input's channels, writes the separate `extra`.
                unsafe { c1.run_raw_isa(io, 1, h, w, isa) };
            }
            for (i, conv) in convs[..4].iter().enumerate() {
                let mut epilogue = Epilogue::default();
                if block.conv1x1.is_some() {
                    // ESRGAN+: x2 = lrelu(conv2) + conv1x1(x); x4 = lrelu(conv4) + x2.
                    match i {
                        1 => epilogue.residuals[0] = res(extra, convs[0].out_channels(), 1.0),
                        // SAFETY: x2's channels of the same pixels, not written here.
                        3 => {
                            let x2 = unsafe { src.add(convs[1].in_channels()) };
                            epilogue.residuals[0] = res(x2, stride, 1.0);
                        }
                        _ => {}
                    }
                }
                let io = Io {
                    src,
                    src_stride: stride,
                    // SAFETY: in + out channels <= stride, checked in `new`.
                    dst: unsafe { src.add(conv.in_channels()) },
                    dst_stride: stride,
                    epilogue,
                    upsample: false,
                };
                // SAFETY: reads channels [0, c), writes [c, c + grow) of the same buffer; a
                // residual reads channels (or a buffer) this call does not write.
                unsafe { conv.run_raw_isa(io, 1, h, w, isa) };
            }
            let io = Io {
                src,
                src_stride: stride,
                dst,
                dst_stride: stride,
                epilogue,
                upsample: false,
            };
            // SAFETY: reads all of `src`, writes channels [0, nf) of another buffer, whose
            // only other use in this call is as a per-pixel residual.
            unsafe { convs[4].run_raw_isa(io, 1, h, w, isa) };
        };
        for rrdb in &self.body {
            if stop() {
                return None;
            }
            // A dense block: 0.2 * conv5 + its input.
            let rdb = |src| Epilogue {
                scale: 0.2,
                residuals: [res(src, stride, 1.0), None],
            };
            dense(&rrdb[0], x, t1, rdb(x));
            dense(&rrdb[1], t1, t2, rdb(t1));
            // The RRDB: 0.2 * (0.2 * conv5 + t2) + x, written over x.
            let last = Epilogue {
                scale: 0.04,
                residuals: [res(t2, stride, 0.2), res(x, stride, 1.0)],
            };
            dense(&rrdb[2], t2, x, last);
        }
        // feat + conv_body(trunk), written over feat: each pixel's residual is read just
        // before that pixel is written.
        let feat = feat.as_mut_ptr();
        let io = Io {
            src: x,
            src_stride: stride,
            dst: feat,
            dst_stride: nf,
            epilogue: Epilogue {
                scale: 1.0,
                residuals: [res(feat, nf, 1.0), None],
            },
            upsample: false,
        };
        // SAFETY: `x` and `feat` are separate buffers of `h * w` pixels each.
        unsafe { self.conv_body.run_raw_isa(io, 1, h, w, isa) };
        Some(())
    }
}
