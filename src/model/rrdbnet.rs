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
use super::layout;

/// Shape of an RRDBNet. `scale` is the overall upscaling factor (1, 2 or 4); for 1 and 2 the
/// input is pixel-unshuffled first, exactly as BasicSR does, so the body always works at a
/// quarter of the output resolution.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub num_in_ch: usize,
    pub num_out_ch: usize,
    pub scale: usize,
    pub num_feat: usize,
    pub num_block: usize,
    pub num_grow_ch: usize,
}

impl Config {
    /// `RealESRGAN_x4plus`: 23 RRDB blocks, 4x.
    pub fn x4plus() -> Self {
        Self {
            num_in_ch: 3,
            num_out_ch: 3,
            scale: 4,
            num_feat: 64,
            num_block: 23,
            num_grow_ch: 32,
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
            scale: 2,
            ..Self::x4plus()
        }
    }

    /// The pixel-unshuffle factor applied to the input before the first convolution (as
    /// BasicSR does for scales 2 and 1), so the body works at a quarter of the output size.
    pub fn unshuffle(&self) -> usize {
        match self.scale {
            2 => 2,
            1 => 4,
            _ => 1,
        }
    }

    /// Channels the first convolution sees after the pixel unshuffle.
    fn first_conv_in_ch(&self) -> usize {
        self.num_in_ch * self.unshuffle() * self.unshuffle()
    }

    /// Multiply-adds per input pixel, counting every convolution.
    pub fn macs_per_input_pixel(&self) -> u64 {
        let k = 9u64;
        let (f, g) = (self.num_feat as u64, self.num_grow_ch as u64);
        let body_px = (self.unshuffle() * self.unshuffle()) as u64;
        // The body runs at input / unshuffle resolution: count per body pixel, then rescale.
        let first = self.first_conv_in_ch() as u64 * f * k;
        let rdb: u64 = (0..4).map(|i| (f + i * g) * g * k).sum::<u64>() + (f + 4 * g) * f * k;
        let body = rdb * 3 * self.num_block as u64 + f * f * k;
        let per_body_px = first + body;
        // Upsampling convs run at 2x and 4x of the body resolution (4 and 16 pixels each).
        let up = f * f * k * 4 + f * f * k * 16;
        let tail = f * f * k * 16 + f * self.num_out_ch as u64 * k * 16;
        (per_body_px + up + tail) / body_px
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
/// and every earlier output.
#[derive(Debug, Clone)]
struct ResidualDenseBlock {
    convs: [Conv2d; 5],
}

impl ResidualDenseBlock {
    fn new(num_feat: usize, num_grow_ch: usize, vb: VarBuilder) -> Result<Self> {
        let conv = |i: usize, out: usize| {
            conv3x3(
                num_feat + (i - 1) * num_grow_ch,
                out,
                vb.pp(format!("conv{i}")),
            )
        };
        Ok(Self {
            convs: [
                conv(1, num_grow_ch)?,
                conv(2, num_grow_ch)?,
                conv(3, num_grow_ch)?,
                conv(4, num_grow_ch)?,
                conv(5, num_feat)?,
            ],
        })
    }
}

impl Module for ResidualDenseBlock {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut feats = vec![x.clone()];
        for conv in &self.convs[..4] {
            let input = Tensor::cat(&feats, 1)?;
            feats.push(lrelu(&conv.forward(&input)?)?);
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
    fn new(num_feat: usize, num_grow_ch: usize, vb: VarBuilder) -> Result<Self> {
        let rdb =
            |i: usize| ResidualDenseBlock::new(num_feat, num_grow_ch, vb.pp(format!("rdb{i}")));
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
    conv_up1: Conv2d,
    conv_up2: Conv2d,
    conv_hr: Conv2d,
    conv_last: Conv2d,
}

impl RrdbNet {
    pub fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        let f = cfg.num_feat;
        let conv_first = conv3x3(cfg.first_conv_in_ch(), f, vb.pp("conv_first"))?;
        let vb_body = vb.pp("body");
        let body = (0..cfg.num_block)
            .map(|i| Rrdb::new(f, cfg.num_grow_ch, vb_body.pp(i)))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            cfg: cfg.clone(),
            conv_first,
            body,
            conv_body: conv3x3(f, f, vb.pp("conv_body"))?,
            conv_up1: conv3x3(f, f, vb.pp("conv_up1"))?,
            conv_up2: conv3x3(f, f, vb.pp("conv_up2"))?,
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
        let feat = match self.cfg.unshuffle() {
            1 => xs.clone(),
            r => candle_nn::ops::pixel_unshuffle(xs, r)?,
        };
        let feat = self.conv_first.forward(&feat)?;
        let mut body = feat.clone();
        for block in &self.body {
            body = block.forward(&body)?;
        }
        let feat = (feat + self.conv_body.forward(&body)?)?;
        let feat = lrelu(&self.conv_up1.forward(&upsample2x(&feat)?)?)?;
        let feat = lrelu(&self.conv_up2.forward(&upsample2x(&feat)?)?)?;
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
    /// Per RRDB, per dense block, the five convolutions.
    body: Vec<[[Conv3x3; 5]; 3]>,
    conv_body: Conv3x3,
    conv_up1: Conv3x3,
    conv_up2: Conv3x3,
    conv_hr: Conv3x3,
    conv_last: Conv3x3,
}

fn fast(conv: &Conv2d, act: Activation, prepare: Prepare) -> Result<Conv3x3> {
    Conv3x3::prepared(conv.weight(), conv.bias(), act, prepare)
}

impl FastRrdbNet {
    pub fn new(net: &RrdbNet, prepare: Prepare) -> Result<Self> {
        let lrelu = || Activation::LeakyRelu(0.2);
        let body = net
            .body
            .iter()
            .map(|rrdb| {
                let block = |rdb: &ResidualDenseBlock| -> Result<[Conv3x3; 5]> {
                    let c = &rdb.convs;
                    Ok([
                        fast(&c[0], lrelu(), prepare)?,
                        fast(&c[1], lrelu(), prepare)?,
                        fast(&c[2], lrelu(), prepare)?,
                        fast(&c[3], lrelu(), prepare)?,
                        fast(&c[4], Activation::None, prepare)?,
                    ])
                };
                Ok([
                    block(&rrdb.rdbs[0])?,
                    block(&rrdb.rdbs[1])?,
                    block(&rrdb.rdbs[2])?,
                ])
            })
            .collect::<Result<Vec<_>>>()?;
        let stride = net.cfg.num_feat + 4 * net.cfg.num_grow_ch;
        for block in body.iter().flatten() {
            for conv in &block[..4] {
                if conv.in_channels() + conv.out_channels() > stride {
                    candle_core::bail!("dense convolution wider than the trunk buffer");
                }
            }
        }
        Ok(Self {
            unshuffle: net.cfg.unshuffle(),
            stride,
            conv_first: fast(&net.conv_first, Activation::None, prepare)?,
            body,
            conv_body: fast(&net.conv_body, Activation::None, prepare)?,
            conv_up1: fast(&net.conv_up1, lrelu(), prepare)?,
            conv_up2: fast(&net.conv_up2, lrelu(), prepare)?,
            conv_hr: fast(&net.conv_hr, lrelu(), prepare)?,
            conv_last: fast(&net.conv_last, Activation::None, prepare)?,
        })
    }

    /// The pixel-unshuffle factor applied to the input before the first convolution.
    pub fn unshuffle(&self) -> usize {
        self.unshuffle
    }

    /// Channels the first convolution takes (after the unshuffle).
    pub fn in_channels(&self) -> usize {
        self.conv_first.in_channels()
    }

    pub fn out_channels(&self) -> usize {
        self.conv_last.out_channels()
    }

    /// One pass on `x`, the `(cin, h, w)` input planes (pixel-unshuffled already for
    /// scales 1 and 2), in `arena`; `f` sees the `(out_ch, 4h, 4w)` output planes.
    pub(crate) fn run<R>(
        &self,
        x: &[f32],
        h: usize,
        w: usize,
        arena: &mut Arena,
        isa: Isa,
        f: impl FnOnce(&[f32]) -> R,
    ) -> R {
        let (cin, nf, stride) = (
            self.conv_first.in_channels(),
            self.conv_first.out_channels(),
            self.stride,
        );
        let cout = self.conv_last.out_channels();
        let px = h * w;
        let [input, feat, x0, t1, t2, up1, up2, hr] = arena.slots([
            px * cin,
            px * nf,
            px * stride,
            px * stride,
            px * stride,
            4 * px * nf.max(4 * cout),
            16 * px * nf.max(cout),
            16 * px * nf,
        ]);
        layout::nchw_to_nhwc(x, cin, h, w, input);
        self.conv_first.run_into(input, feat, h, w, false, isa);
        self.trunk(feat, [x0, t1, t2], h, w, isa);
        let up1 = &mut up1[..4 * px * nf.max(4 * cout)];
        self.conv_up1
            .run_into(feat, &mut up1[..4 * px * nf], 2 * h, 2 * w, true, isa);
        self.conv_up2.run_into(
            &up1[..4 * px * nf],
            &mut up2[..16 * px * nf],
            4 * h,
            4 * w,
            true,
            isa,
        );
        self.conv_hr
            .run_into(&up2[..16 * px * nf], hr, 4 * h, 4 * w, false, isa);
        // The 4x output goes through the first upsampled buffer, free again by now.
        let last = &mut up1[..16 * px * cout];
        self.conv_last.run_into(hr, last, 4 * h, 4 * w, false, isa);
        // And the planes through the second, free since `conv_hr` read it.
        let out = &mut up2[..16 * px * cout];
        layout::nhwc_to_nchw(last, cout, 4 * h, 4 * w, out);
        f(out)
    }

    /// The trunk: the RRDB blocks and `conv_body`, with the skip from `conv_first`, on
    /// three channels-last buffers of `num_feat + 4 * num_grow_ch` channels per pixel. Each
    /// dense convolution reads the channel prefix it needs and writes its own slice, so
    /// nothing is concatenated, and the residual sums are fused into the last convolution of
    /// each dense block. `feat` (`h x w x num_feat`) is the input and receives the output.
    fn trunk(&self, feat: &mut [f32], bufs: [&mut [f32]; 3], h: usize, w: usize, isa: Isa) {
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
        let res = |ptr: *mut f32, scale: f32| Some(Residual { ptr, stride, scale });
        let dense = |convs: &[Conv3x3; 5], src: *mut f32, dst: *mut f32, epilogue: Epilogue| {
            for conv in &convs[..4] {
                let io = Io {
                    src,
                    src_stride: stride,
                    // SAFETY: in + out channels <= stride, checked in `new`.
                    dst: unsafe { src.add(conv.in_channels()) },
                    dst_stride: stride,
                    epilogue: Epilogue::default(),
                    upsample: false,
                };
                // SAFETY: reads channels [0, c), writes [c, c + grow) of the same buffer.
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
            // A dense block: 0.2 * conv5 + its input.
            let rdb = |src| Epilogue {
                scale: 0.2,
                residuals: [res(src, 1.0), None],
            };
            dense(&rrdb[0], x, t1, rdb(x));
            dense(&rrdb[1], t1, t2, rdb(t1));
            // The RRDB: 0.2 * (0.2 * conv5 + t2) + x, written over x.
            let last = Epilogue {
                scale: 0.04,
                residuals: [res(t2, 0.2), res(x, 1.0)],
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
                residuals: [
                    Some(Residual {
                        ptr: feat,
                        stride: nf,
                        scale: 1.0,
                    }),
                    None,
                ],
            },
            upsample: false,
        };
        // SAFETY: `x` and `feat` are separate buffers of `h * w` pixels each.
        unsafe { self.conv_body.run_raw_isa(io, 1, h, w, isa) };
    }
}
