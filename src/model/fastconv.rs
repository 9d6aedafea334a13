//! A fast 3x3, stride 1, padding 1 convolution for the CPU: channels-last (NHWC) buffers,
//! Winograd F(6x6, 3x3) with the weights transformed and packed once at load, our own GEMM
//! microkernel for the 64 per-position products, and bias, activation, scale and residuals
//! fused into the output transform. Blocks of tiles are spread over rayon's threads.
//!
//! Winograd F(6x6, 3x3) computes a 6x6 output tile from an 8x8 input tile with 64
//! multiplications per channel pair instead of 324; the transforms (Lavin and Gray, 2015,
//! points 0, ±1, ±2, ±1/2 and infinity) cost additions and multiplications by constants.
//!
//! Every loop is written once against the `Simd` trait and compiled three times (AVX-512,
//! AVX2+FMA, SSE2; see `simd`). A block of tiles runs entirely inside one function compiled
//! for the chosen ISA: the input transforms, then for each of the 64 positions a
//! `(tiles x cin) * (cin x cout)` product, then the output transforms. The products are
//! small (K = cin up to 192, N = cout 3..64), so instead of a general GEMM with its packing,
//! the transformed weights are stored at load in 16-column panels (`[p][panel][ci][16]`,
//! zero-padded), and a register-blocked microkernel (6x16 on AVX2, 8x32 on AVX-512)
//! broadcasts each input value against one or two panels. candle's `conv2d` stays the
//! reference: tests compare the two on random tensors, for every ISA the CPU has.

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

pub use super::simd::Isa;
use super::simd::{Avx2, Avx512, Scalar, Simd, Sse};

/// What follows the convolution, applied in the output transform.
#[derive(Debug, Clone)]
pub enum Activation {
    None,
    LeakyRelu(f32),
    /// One slope per output channel.
    PRelu(Vec<f32>),
}

/// A 3x3 convolution (stride 1, zero padding 1) with its weights in the Winograd domain.
#[derive(Debug, Clone)]
pub struct Conv3x3 {
    cin: usize,
    cout: usize,
    /// `cout` rounded up to whole panels.
    cout_pad: usize,
    weights: Weights,
    bias: Vec<f32>,
    act: Activation,
}

/// When a convolution's weights are put in the Winograd domain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Prepare {
    /// Once, at load, and kept (64/9 the memory of the 3x3 weights: 475 MB for x4plus). For
    /// a service, which runs many passes.
    #[default]
    Once,
    /// On every call, into a buffer the calling thread reuses: each pass transforms its
    /// weights again (about 0.2 s of CPU per x4plus pass) but nothing is kept. For one image
    /// of a few tiles, where keeping them costs more (faulting in 475 MB) than it saves.
    PerCall,
}

#[derive(Debug, Clone)]
enum Weights {
    /// `u[p][panel][ci][PANEL]`: the transformed kernel at each of the 64 positions, in
    /// panels of 16 output channels (zeros past `cout`).
    Packed(Vec<f32>),
    /// The OIHW 3x3 weights, packed on each call.
    PerCall(Vec<f32>),
}

thread_local! {
    /// The packed weights of a `Prepare::PerCall` convolution, reused by the thread's calls
    /// (grown to the largest).
    static PACKED: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
}

/// Output tile edge, input tile edge and the number of transform positions.
const OUT: usize = 6;
const IN: usize = 8;
const POS: usize = IN * IN;
/// Output channels per packed weight panel.
const PANEL: usize = 16;

/// Kernel transform `G` (8x3).
#[rustfmt::skip]
const G: [[f64; 3]; IN] = [
    [1.0, 0.0, 0.0],
    [-2.0 / 9.0, -2.0 / 9.0, -2.0 / 9.0],
    [-2.0 / 9.0, 2.0 / 9.0, -2.0 / 9.0],
    [1.0 / 90.0, 1.0 / 45.0, 2.0 / 45.0],
    [1.0 / 90.0, -1.0 / 45.0, 2.0 / 45.0],
    [32.0 / 45.0, 16.0 / 45.0, 8.0 / 45.0],
    [32.0 / 45.0, -16.0 / 45.0, 8.0 / 45.0],
    [0.0, 0.0, 1.0],
];

/// Transformed inputs and products of one block of tiles are kept near this size, so they
/// stay in the core's L2 cache between the transforms and the products.
const BLOCK_BYTES: usize = 512 * 1024;

impl Conv3x3 {
    /// From an OIHW `(cout, cin, 3, 3)` weight and an optional `(cout,)` bias, any float dtype.
    pub fn new(weight: &Tensor, bias: Option<&Tensor>, act: Activation) -> Result<Self> {
        Self::prepared(weight, bias, act, Prepare::Once)
    }

    /// `new`, with the Winograd-domain weights made when `prepare` says.
    pub fn prepared(
        weight: &Tensor,
        bias: Option<&Tensor>,
        act: Activation,
        prepare: Prepare,
    ) -> Result<Self> {
        let (cout, cin, kh, kw) = weight.dims4()?;
        if (kh, kw) != (3, 3) {
            candle_core::bail!("Conv3x3 needs a 3x3 kernel, got {kh}x{kw}");
        }
        let w: Vec<f32> = weight.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        let bias = match bias {
            Some(b) => b.to_dtype(DType::F32)?.to_vec1()?,
            None => vec![0.0; cout],
        };
        if bias.len() != cout {
            candle_core::bail!("bias has {} values for {cout} channels", bias.len());
        }
        if let Activation::PRelu(s) = &act {
            if s.len() != cout {
                candle_core::bail!("PReLU has {} slopes for {cout} channels", s.len());
            }
        }
        let cout_pad = cout.div_ceil(PANEL) * PANEL;
        let weights = match prepare {
            Prepare::Once => {
                let mut u = vec![0f32; POS * cin * cout_pad];
                super::arena::populate(&mut u);
                transform_weights(&w, cin, cout, &mut u);
                Weights::Packed(u)
            }
            Prepare::PerCall => Weights::PerCall(w),
        };
        Ok(Self {
            cin,
            cout,
            cout_pad,
            weights,
            bias,
            act,
        })
    }

    pub fn in_channels(&self) -> usize {
        self.cin
    }

    pub fn out_channels(&self) -> usize {
        self.cout
    }

    /// Applies the convolution to an `(n, h, w, cin)` f32 tensor, giving `(n, h, w, cout)`.
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.forward_isa(xs, Isa::active())
    }

    /// `forward` on a given ISA path (which this CPU must support): for tests.
    pub fn forward_isa(&self, xs: &Tensor, isa: Isa) -> Result<Tensor> {
        xs.apply_op1_no_bwd(&Op {
            conv: self,
            upsample: false,
            isa,
        })
    }

    /// Like `forward`, on the input upsampled 2x (nearest) first: `(n, 2h, 2w, cout)` out.
    pub fn forward_upsampled(&self, xs: &Tensor) -> Result<Tensor> {
        self.forward_upsampled_isa(xs, Isa::active())
    }

    /// `forward_upsampled` on a given ISA path: for tests.
    pub fn forward_upsampled_isa(&self, xs: &Tensor, isa: Isa) -> Result<Tensor> {
        xs.apply_op1_no_bwd(&Op {
            conv: self,
            upsample: true,
            isa,
        })
    }

    /// Tiles per block: a multiple of the microkernel's rows, enough for the products, few
    /// enough to stay in cache, and leaving several blocks per thread so the work balances.
    fn block_tiles(&self, tiles: usize, isa: Isa) -> usize {
        let mr = isa.gemm_rows();
        let per_tile = POS * (self.cin + self.cout_pad) * std::mem::size_of::<f32>();
        let fit = (BLOCK_BYTES / per_tile / mr).clamp(2, 256 / mr) * mr;
        let spread = tiles
            .div_ceil(4 * rayon::current_num_threads())
            .div_ceil(mr)
            * mr;
        fit.min(spread.max(mr))
    }

    /// The convolution between two contiguous channels-last buffers of one image: `src`
    /// holds `h x w` pixels of `cin` channels (`h/2 x w/2` if `upsample`), `dst` receives
    /// `h x w` pixels of `cout`.
    pub fn run_into(
        &self,
        src: &[f32],
        dst: &mut [f32],
        h: usize,
        w: usize,
        upsample: bool,
        isa: Isa,
    ) {
        self.run_images(src, dst, 1, h, w, upsample, isa)
    }

    /// `run_into` on a batch of `n` images, one after the other in both buffers.
    #[allow(clippy::too_many_arguments)]
    fn run_images(
        &self,
        src: &[f32],
        dst: &mut [f32],
        n: usize,
        h: usize,
        w: usize,
        upsample: bool,
        isa: Isa,
    ) {
        let src_px = if upsample { (h / 2) * (w / 2) } else { h * w };
        assert!(
            !upsample || (h.is_multiple_of(2) && w.is_multiple_of(2)),
            "upsampled size is even"
        );
        assert_eq!(src.len(), n * src_px * self.cin, "input size");
        assert_eq!(dst.len(), n * h * w * self.cout, "output size");
        let io = Io {
            src: src.as_ptr(),
            src_stride: self.cin,
            dst: dst.as_mut_ptr(),
            dst_stride: self.cout,
            epilogue: Epilogue::default(),
            upsample,
        };
        // SAFETY: two separate buffers of the sizes asserted above.
        unsafe { self.run_raw_isa(io, n, h, w, isa) };
    }

    /// The convolution between channels-last buffers with any pixel strides, for networks
    /// that keep several tensors in one buffer (RRDBNet's dense blocks).
    ///
    /// # Safety
    /// `io.src` and `io.dst` (and every residual) address `n * h * w` pixels of their stride.
    /// The `cin` channels read at `io.src` are not written by this call. A residual may alias
    /// the output channels (it is read at a pixel just before that pixel is written).
    pub unsafe fn run_raw(&self, io: Io, n: usize, h: usize, w: usize) {
        self.run_raw_isa(io, n, h, w, Isa::active())
    }

    /// `run_raw` on a given ISA path.
    ///
    /// # Safety
    /// As `run_raw`. Panics if this CPU lacks `isa`.
    pub unsafe fn run_raw_isa(&self, io: Io, n: usize, h: usize, w: usize, isa: Isa) {
        assert!(
            isa.supported(),
            "this CPU cannot run the {} path",
            isa.name()
        );
        let (cin, cout_pad) = (self.cin, self.cout_pad);
        if n * h * w == 0 {
            return;
        }
        self.with_packed(|u| {
            let (th, tw) = (h.div_ceil(OUT), w.div_ceil(OUT));
            let tiles = th * tw;
            let block = self.block_tiles(tiles, isa);
            let blocks = tiles.div_ceil(block);
            let u = SharedPtr(u.as_ptr());
            (0..n * blocks).into_par_iter().for_each(|job| {
                Scratch::with(block, cin, cout_pad, |scratch| {
                    let (img, b) = (job / blocks, job % blocks);
                    let first = b * block;
                    let work = Block {
                        io: io.image(img * h * w),
                        geom: Geometry { h, w, tw },
                        first,
                        count: block.min(tiles - first),
                        block,
                        u: u.get(),
                    };
                    dispatch(isa, self, work, scratch);
                })
            });
        })
    }

    /// Runs `f` with the packed Winograd-domain weights: the kept ones, or (`PerCall`) ones
    /// packed now into this thread's buffer. A nested call on the same thread finds the
    /// buffer taken and packs into a new one.
    fn with_packed<R>(&self, f: impl FnOnce(&[f32]) -> R) -> R {
        match &self.weights {
            Weights::Packed(u) => f(u),
            Weights::PerCall(w) => {
                let mut u = PACKED.take();
                let len = POS * self.cin * self.cout_pad;
                if u.len() < len {
                    u = Vec::new();
                    u.resize(len, 0.0);
                }
                transform_weights(w, self.cin, self.cout, &mut u[..len]);
                let out = f(&u[..len]);
                PACKED.set(u);
                out
            }
        }
    }

    /// Transforms, multiplies and writes one block of tiles. Inlined into one copy per
    /// instruction set (see `dispatch`).
    #[inline(always)]
    unsafe fn process<S: Simd>(&self, work: Block, s: &mut Scratch, multiply: Multiply) {
        for t in 0..work.count {
            self.input_tile::<S>(&work, work.first + t, t, s);
        }
        multiply(self, &work, s);
        for t in 0..work.count {
            self.output_tile::<S>(&work, work.first + t, t, s);
        }
    }

    /// Gathers the 8x8 input patch of tile `tile` (zeros outside the image) and writes its
    /// transform `B^T d B` to `v[p][slot][ci]`.
    #[inline(always)]
    unsafe fn input_tile<S: Simd>(&self, work: &Block, tile: usize, slot: usize, s: &mut Scratch) {
        let (cin, geom, io) = (self.cin, &work.geom, &work.io);
        let (y0, x0) = (
            (tile / geom.tw * OUT) as isize - 1,
            (tile % geom.tw * OUT) as isize - 1,
        );
        // The `cin` channels of pixel (y, x); the caller of `run_raw` keeps them unwritten.
        let shift = io.upsample as usize;
        let src_w = geom.w >> shift;
        let pixel = |y: usize, x: usize| {
            io.src
                .add(((y >> shift) * src_w + (x >> shift)) * io.src_stride)
        };
        let tmp = s.tmp_in.as_mut_ptr();
        let inside = y0 >= 0 && x0 >= 0 && y0 as usize + IN <= geom.h && x0 as usize + IN <= geom.w;
        if inside {
            // Columns straight from the image: tmp[i][j] = sum_k BT[i][k] d[k][j].
            let (y0, x0) = (y0 as usize, x0 as usize);
            for j in 0..IN {
                bt8::<S>(
                    std::array::from_fn(|k| pixel(y0 + k, x0 + j)),
                    std::array::from_fn(|i| tmp.add((i * IN + j) * cin)),
                    cin,
                );
            }
        } else {
            let patch = s.patch.as_mut_ptr();
            for i in 0..IN {
                let y = y0 + i as isize;
                for j in 0..IN {
                    let x = x0 + j as isize;
                    let dst = patch.add((i * IN + j) * cin);
                    if y >= 0 && (y as usize) < geom.h && x >= 0 && (x as usize) < geom.w {
                        std::ptr::copy_nonoverlapping(pixel(y as usize, x as usize), dst, cin);
                    } else {
                        std::ptr::write_bytes(dst, 0, cin);
                    }
                }
            }
            for j in 0..IN {
                bt8::<S>(
                    std::array::from_fn(|k| patch.add((k * IN + j) * cin) as *const f32),
                    std::array::from_fn(|i| tmp.add((i * IN + j) * cin)),
                    cin,
                );
            }
        }
        // Rows: v[i][j] = sum_k tmp[i][k] BT[j][k].
        let v = s.v.as_mut_ptr();
        for i in 0..IN {
            bt8::<S>(
                std::array::from_fn(|k| tmp.add((i * IN + k) * cin) as *const f32),
                std::array::from_fn(|j| v.add(((i * IN + j) * work.block + slot) * cin)),
                cin,
            );
        }
    }

    /// `m[p] = v[p] x u[p]` for the 64 positions: (count x cin) times (cin x cout_pad).
    #[inline(always)]
    unsafe fn multiply<S: Simd>(&self, work: &Block, s: &mut Scratch) {
        let (count, block) = (work.count, work.block);
        let (cin, cpad) = (self.cin, self.cout_pad);
        let (v, m, u) = (s.v.as_ptr(), s.m.as_mut_ptr(), work.u);
        for p in 0..POS {
            gemm::<S>(
                count,
                cpad / PANEL,
                cin,
                v.add(p * block * cin),
                u.add(p * cin * cpad),
                m.add(p * block * cpad),
                cpad,
            );
        }
    }

    /// `A^T m A` for tile `tile`, then the epilogue, written to its output pixels.
    #[inline(always)]
    unsafe fn output_tile<S: Simd>(&self, work: &Block, tile: usize, slot: usize, s: &mut Scratch) {
        let (cpad, geom, io, block) = (self.cout_pad, &work.geom, &work.io, work.block);
        let (m, tmp, y) = (s.m.as_ptr(), s.tmp_out.as_mut_ptr(), s.y.as_mut_ptr());
        // Columns: tmp[a][j] = sum_i AT[a][i] m[i][j]. Padded channels are computed too:
        // whole vectors, and the padding is never stored.
        for j in 0..IN {
            at8::<S>(
                std::array::from_fn(|i| m.add(((i * IN + j) * block + slot) * cpad)),
                std::array::from_fn(|a| tmp.add((a * IN + j) * cpad)),
                cpad,
            );
        }
        // Rows: y[a][b] = sum_j tmp[a][j] AT[b][j].
        for a in 0..OUT {
            at8::<S>(
                std::array::from_fn(|j| tmp.add((a * IN + j) * cpad) as *const f32),
                std::array::from_fn(|b| y.add((a * OUT + b) * cpad)),
                cpad,
            );
        }
        let (ty, tx) = (tile / geom.tw * OUT, tile % geom.tw * OUT);
        for a in 0..OUT.min(geom.h - ty) {
            for b in 0..OUT.min(geom.w - tx) {
                let at = (ty + a) * geom.w + tx + b;
                self.finish::<S>(
                    y.add((a * OUT + b) * cpad),
                    &io.epilogue,
                    at,
                    io.dst.add(at * io.dst_stride),
                );
            }
        }
    }

    /// Bias, activation, scale and residuals on one pixel's `cout` values at `y`, written
    /// to `out`: whole vectors, then single lanes for the channels left over.
    #[inline(always)]
    unsafe fn finish<S: Simd>(&self, y: *const f32, epi: &Epilogue, pixel: usize, out: *mut f32) {
        let cout = self.cout;
        let whole = cout / S::LANES * S::LANES;
        let mut c = 0;
        while c < whole {
            self.finish_at::<S>(y, epi, pixel, out, c);
            c += S::LANES;
        }
        while c < cout {
            self.finish_at::<Scalar>(y, epi, pixel, out, c);
            c += 1;
        }
    }

    #[inline(always)]
    unsafe fn finish_at<S: Simd>(
        &self,
        y: *const f32,
        epi: &Epilogue,
        pixel: usize,
        out: *mut f32,
        c: usize,
    ) {
        let mut v = S::add(S::load(y.add(c)), S::load(self.bias.as_ptr().add(c)));
        match &self.act {
            Activation::None => {}
            // x >= 0 ? x : x * slope, as max(x, 0) + slope * min(x, 0): exact either way.
            Activation::LeakyRelu(slope) => {
                v = S::fma(S::splat(*slope), S::min(v, S::zero()), S::max(v, S::zero()));
            }
            Activation::PRelu(slopes) => {
                let slope = S::load(slopes.as_ptr().add(c));
                v = S::fma(slope, S::min(v, S::zero()), S::max(v, S::zero()));
            }
        }
        if epi.scale != 1.0 {
            v = S::mul(v, S::splat(epi.scale));
        }
        for r in epi.residuals.iter().flatten() {
            // SAFETY: `run_raw`'s contract: the residual holds this pixel, and nothing
            // writes it until this thread writes the output below.
            let add = S::load(r.ptr.add(pixel * r.stride + c));
            v = S::fma(S::splat(r.scale), add, v);
        }
        S::store(out.add(c), v);
    }
}

/// The kernel in the Winograd domain, `u[p][panel][ci][PANEL]` (zeros past `cout`), from OIHW
/// 3x3 weights `w`: `U = G g G^T` per (co, ci), computed in f64 as `(G g) G^T` and rounded
/// once. One panel of 16 output channels at a time, as 16 lanes (which vectorise), so each
/// thread writes its own part of every position. Every value of `u` is written.
fn transform_weights(w: &[f32], cin: usize, cout: usize, u: &mut [f32]) {
    let panels = u.len() / (POS * cin * PANEL);
    // Every (position, panel) row of `cin * PANEL` values, grouped by panel.
    let mut rows: Vec<Vec<&mut [f32]>> = (0..panels).map(|_| Vec::with_capacity(POS)).collect();
    for (i, row) in u.chunks_mut(cin * PANEL).enumerate() {
        rows[i % panels].push(row);
    }
    rows.into_par_iter()
        .enumerate()
        .for_each(|(panel, mut rows)| {
            for ci in 0..cin {
                // g[k][l][lane]: the taps of output channel panel * 16 + lane.
                let mut g = [[[0f64; PANEL]; 3]; 3];
                for lane in 0..PANEL.min(cout - panel * PANEL) {
                    let taps = &w[((panel * PANEL + lane) * cin + ci) * 9..][..9];
                    for (kl, &t) in taps.iter().enumerate() {
                        g[kl / 3][kl % 3][lane] = f64::from(t);
                    }
                }
                // t = G g (8x3), then U = t G^T (8x8), lane by lane.
                let mut t = [[[0f64; PANEL]; 3]; IN];
                for (ti, gi) in t.iter_mut().zip(&G) {
                    for (l, tl) in ti.iter_mut().enumerate() {
                        for lane in 0..PANEL {
                            tl[lane] = gi[0] * g[0][l][lane]
                                + gi[1] * g[1][l][lane]
                                + gi[2] * g[2][l][lane];
                        }
                    }
                }
                for i in 0..IN {
                    for (j, gj) in G.iter().enumerate() {
                        let dst = &mut rows[i * IN + j][ci * PANEL..][..PANEL];
                        for (lane, d) in dst.iter_mut().enumerate() {
                            let v = t[i][0][lane] * gj[0]
                                + t[i][1][lane] * gj[1]
                                + t[i][2][lane] * gj[2];
                            *d = v as f32;
                        }
                    }
                }
            }
        });
}

/// Runs one block on `isa`'s copy of `process`.
fn dispatch(isa: Isa, conv: &Conv3x3, work: Block, scratch: &mut Scratch) {
    // SAFETY: `run_raw_isa` asserted that this CPU supports `isa`; the buffers are the
    // caller's contract.
    unsafe {
        match isa {
            Isa::Baseline => process_baseline(conv, work, scratch),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => process_avx2(conv, work, scratch),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => process_avx512(conv, work, scratch),
            #[cfg(not(target_arch = "x86_64"))]
            _ => unreachable!("no such path off x86-64"),
        }
    }
}

/// The products of one block, compiled per ISA as its own function (so profiles show the
/// transforms and the products apart).
type Multiply = unsafe fn(&Conv3x3, &Block, &mut Scratch);

#[inline(never)]
unsafe fn process_baseline(conv: &Conv3x3, work: Block, scratch: &mut Scratch) {
    conv.process::<Sse>(work, scratch, multiply_baseline)
}

#[inline(never)]
unsafe fn multiply_baseline(conv: &Conv3x3, work: &Block, s: &mut Scratch) {
    conv.multiply::<Sse>(work, s)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn process_avx2(conv: &Conv3x3, work: Block, scratch: &mut Scratch) {
    conv.process::<Avx2>(work, scratch, multiply_avx2)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline(never)]
unsafe fn multiply_avx2(conv: &Conv3x3, work: &Block, s: &mut Scratch) {
    conv.multiply::<Avx2>(work, s)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn process_avx512(conv: &Conv3x3, work: Block, scratch: &mut Scratch) {
    conv.process::<Avx512>(work, scratch, multiply_avx512)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
#[inline(never)]
unsafe fn multiply_avx512(conv: &Conv3x3, work: &Block, s: &mut Scratch) {
    conv.multiply::<Avx512>(work, s)
}

/// The per-position product `c = a * b` of `rows x k` by `k x (panels * 16)`: `a` row-major
/// with rows `k` apart (the transformed inputs), `b` in packed panels (`[panel][k][16]`),
/// `c` row-major with rows `ldc` apart.
#[inline(always)]
unsafe fn gemm<S: Simd>(
    rows: usize,
    panels: usize,
    k: usize,
    a: *const f32,
    b: *const f32,
    c: *mut f32,
    ldc: usize,
) {
    // Panels a full-width microkernel covers: one on SSE2 and AVX2, two on AVX-512.
    let wide = S::NV * S::LANES / PANEL;
    let pstride = k * PANEL;
    let mut j = 0;
    while j < panels {
        let (bj, cj) = (b.add(j * pstride), c.add(j * PANEL));
        if j + wide <= panels {
            rows_of::<S>(rows, k, a, bj, pstride, cj, ldc, S::NV);
            j += wide;
        } else {
            // AVX-512 with an odd panel left: one vector per row.
            rows_of::<S>(rows, k, a, bj, pstride, cj, ldc, PANEL / S::LANES);
            j += 1;
        }
    }
}

/// All `rows` of one column strip of `nv` vectors: blocks of the microkernel's `MR` rows,
/// then one call for the rows left over.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn rows_of<S: Simd>(
    rows: usize,
    k: usize,
    a: *const f32,
    b: *const f32,
    pstride: usize,
    c: *mut f32,
    ldc: usize,
    nv: usize,
) {
    macro_rules! strip {
        ($nv:literal) => {{
            let mut r = 0;
            while r + S::MR <= rows {
                match S::MR {
                    8 => kernel::<S, 8, $nv>(k, a.add(r * k), b, pstride, c.add(r * ldc), ldc),
                    6 => kernel::<S, 6, $nv>(k, a.add(r * k), b, pstride, c.add(r * ldc), ldc),
                    3 => kernel::<S, 3, $nv>(k, a.add(r * k), b, pstride, c.add(r * ldc), ldc),
                    _ => unreachable!("microkernel rows"),
                }
                r += S::MR;
            }
            let (a, c) = (a.add(r * k), c.add(r * ldc));
            match rows - r {
                0 => {}
                1 => kernel::<S, 1, $nv>(k, a, b, pstride, c, ldc),
                2 => kernel::<S, 2, $nv>(k, a, b, pstride, c, ldc),
                3 => kernel::<S, 3, $nv>(k, a, b, pstride, c, ldc),
                4 => kernel::<S, 4, $nv>(k, a, b, pstride, c, ldc),
                5 => kernel::<S, 5, $nv>(k, a, b, pstride, c, ldc),
                6 => kernel::<S, 6, $nv>(k, a, b, pstride, c, ldc),
                7 => kernel::<S, 7, $nv>(k, a, b, pstride, c, ldc),
                _ => unreachable!("fewer rows than the microkernel's"),
            }
        }};
    }
    match nv {
        1 => strip!(1),
        2 => strip!(2),
        4 => strip!(4),
        _ => unreachable!("vectors per row"),
    }
}

/// The microkernel: an `MR x (NV * LANES)` block of `c` kept in registers over the whole
/// `k`, each step loading `NV` weight vectors and broadcasting `MR` inputs.
#[inline(always)]
unsafe fn kernel<S: Simd, const MR: usize, const NV: usize>(
    k: usize,
    a: *const f32,
    b: *const f32,
    pstride: usize,
    c: *mut f32,
    ldc: usize,
) {
    // Vector v of a row lies in panel v * LANES / 16, at lane offset v * LANES % 16.
    let boff: [usize; NV] =
        std::array::from_fn(|v| v * S::LANES / PANEL * pstride + v * S::LANES % PANEL);
    let mut acc = [[S::zero(); NV]; MR];
    let (mut ap, mut bp) = (a, b);
    for _ in 0..k {
        let bv: [S::V; NV] = std::array::from_fn(|v| S::load(bp.add(boff[v])));
        for (r, row) in acc.iter_mut().enumerate() {
            let x = S::splat(*ap.add(r * k));
            for (acc, &bv) in row.iter_mut().zip(&bv) {
                *acc = S::fma(x, bv, *acc);
            }
        }
        ap = ap.add(1);
        bp = bp.add(PANEL);
    }
    for (r, row) in acc.iter().enumerate() {
        for (v, &acc) in row.iter().enumerate() {
            S::store(c.add(r * ldc + v * S::LANES), acc);
        }
    }
}

/// `d = B^T s` along the eight rows, element-wise over `n` channels: whole vectors, then
/// single lanes for what is left (only the 3-channel first convolution has any).
#[inline(always)]
unsafe fn bt8<S: Simd>(s: [*const f32; IN], d: [*mut f32; IN], n: usize) {
    let whole = n / S::LANES * S::LANES;
    let mut c = 0;
    while c < whole {
        bt8_at::<S>(&s, &d, c);
        c += S::LANES;
    }
    while c < n {
        bt8_at::<Scalar>(&s, &d, c);
        c += 1;
    }
}

#[inline(always)]
unsafe fn bt8_at<S: Simd>(s: &[*const f32; IN], d: &[*mut f32; IN], c: usize) {
    let a: [S::V; IN] = std::array::from_fn(|k| S::load(s[k].add(c)));
    let k = S::splat;
    // d0 = a0 - a6 + 5.25 (a4 - a2); d7 = a7 - a1 + 5.25 (a3 - a5)
    S::store(
        d[0].add(c),
        S::fma(k(5.25), S::sub(a[4], a[2]), S::sub(a[0], a[6])),
    );
    S::store(
        d[7].add(c),
        S::fma(k(5.25), S::sub(a[3], a[5]), S::sub(a[7], a[1])),
    );
    // d1, d2 = (a2 + a6 - 4.25 a4) ± (a1 + a5 - 4.25 a3)
    let e = S::fma(k(-4.25), a[4], S::add(a[2], a[6]));
    let o = S::fma(k(-4.25), a[3], S::add(a[1], a[5]));
    S::store(d[1].add(c), S::add(e, o));
    S::store(d[2].add(c), S::sub(e, o));
    // d3, d4 = (a6 + 0.25 a2 - 1.25 a4) ± (0.5 a1 - 2.5 a3 + 2 a5)
    let e = S::fma(k(-1.25), a[4], S::fma(k(0.25), a[2], a[6]));
    let o = S::fma(k(2.0), a[5], S::fma(k(-2.5), a[3], S::mul(k(0.5), a[1])));
    S::store(d[3].add(c), S::add(e, o));
    S::store(d[4].add(c), S::sub(e, o));
    // d5, d6 = (a6 + 4 a2 - 5 a4) ± (2 a1 - 2.5 a3 + 0.5 a5)
    let e = S::fma(k(-5.0), a[4], S::fma(k(4.0), a[2], a[6]));
    let o = S::fma(k(0.5), a[5], S::fma(k(-2.5), a[3], S::mul(k(2.0), a[1])));
    S::store(d[5].add(c), S::add(e, o));
    S::store(d[6].add(c), S::sub(e, o));
}

/// `d = A^T s` along the eight rows, element-wise over `n` channels (a multiple of the
/// panel width, so whole vectors only).
#[inline(always)]
unsafe fn at8<S: Simd>(s: [*const f32; IN], d: [*mut f32; OUT], n: usize) {
    debug_assert_eq!(n % S::LANES, 0);
    let mut c = 0;
    while c < n {
        at8_at::<S>(&s, &d, c);
        c += S::LANES;
    }
}

#[inline(always)]
unsafe fn at8_at<S: Simd>(s: &[*const f32; IN], d: &[*mut f32; OUT], c: usize) {
    let a: [S::V; IN] = std::array::from_fn(|k| S::load(s[k].add(c)));
    let k = S::splat;
    let (p12, m12) = (S::add(a[1], a[2]), S::sub(a[1], a[2]));
    let (p34, m34) = (S::add(a[3], a[4]), S::sub(a[3], a[4]));
    let (p56, m56) = (S::add(a[5], a[6]), S::sub(a[5], a[6]));
    S::store(d[0].add(c), S::add(S::add(a[0], p12), S::add(p34, p56)));
    S::store(d[1].add(c), S::fma(k(0.5), m56, S::fma(k(2.0), m34, m12)));
    S::store(d[2].add(c), S::fma(k(0.25), p56, S::fma(k(4.0), p34, p12)));
    S::store(d[3].add(c), S::fma(k(0.125), m56, S::fma(k(8.0), m34, m12)));
    S::store(
        d[4].add(c),
        S::fma(k(0.0625), p56, S::fma(k(16.0), p34, p12)),
    );
    S::store(
        d[5].add(c),
        S::add(S::fma(k(0.03125), m56, S::fma(k(32.0), m34, m12)), a[7]),
    );
}

/// Where `run_raw` reads and writes: channels-last buffers, `*_stride` floats per pixel.
/// The input is the first `cin` channels at `src`; the output the `cout` channels at `dst`.
#[derive(Debug, Clone, Copy)]
pub struct Io {
    pub src: *const f32,
    pub src_stride: usize,
    pub dst: *mut f32,
    pub dst_stride: usize,
    pub epilogue: Epilogue,
    /// The input is the image at half the output's height and width, read through a
    /// nearest-neighbour 2x upsampling (so the upsampled image is never stored).
    pub upsample: bool,
}

// SAFETY: `run_raw`'s contract makes the threads' accesses disjoint.
unsafe impl Send for Io {}
unsafe impl Sync for Io {}

impl Io {
    /// The same buffers, `pixels` further on (the next image of a batch).
    unsafe fn image(&self, pixels: usize) -> Self {
        let mut io = *self;
        let src_pixels = if io.upsample { pixels / 4 } else { pixels };
        io.src = io.src.add(src_pixels * io.src_stride);
        io.dst = io.dst.add(pixels * io.dst_stride);
        for r in io.epilogue.residuals.iter_mut().flatten() {
            r.ptr = r.ptr.add(pixels * r.stride);
        }
        io
    }
}

/// A tensor added to the output: `scale` times the `cout` channels at `ptr`, `stride` apart.
#[derive(Debug, Clone, Copy)]
pub struct Residual {
    pub ptr: *const f32,
    pub stride: usize,
    pub scale: f32,
}

/// `output = scale * act(conv + bias) + sum of residuals`, fused into the output transform.
#[derive(Debug, Clone, Copy)]
pub struct Epilogue {
    pub scale: f32,
    pub residuals: [Option<Residual>; 2],
}

impl Default for Epilogue {
    fn default() -> Self {
        Self {
            scale: 1.0,
            residuals: [None, None],
        }
    }
}

/// One block of tiles of one image.
struct Block {
    io: Io,
    geom: Geometry,
    /// Index of the first tile, and how many follow (at most `block`).
    first: usize,
    count: usize,
    block: usize,
    /// The packed weights (`Conv3x3::with_packed`).
    u: *const f32,
}

/// A pointer read by every thread of one call.
#[derive(Clone, Copy)]
struct SharedPtr(*const f32);
// SAFETY: only read, while the call that made it waits for its threads.
unsafe impl Send for SharedPtr {}
unsafe impl Sync for SharedPtr {}

impl SharedPtr {
    fn get(self) -> *const f32 {
        self.0
    }
}

struct Geometry {
    h: usize,
    w: usize,
    /// Tiles per row.
    tw: usize,
}

/// Per-thread buffers for one block of tiles.
struct Scratch {
    patch: Vec<f32>,
    tmp_in: Vec<f32>,
    v: Vec<f32>,
    m: Vec<f32>,
    tmp_out: Vec<f32>,
    y: Vec<f32>,
}

thread_local! {
    /// Each thread's scratch, kept between calls: a network makes hundreds of calls per
    /// pass, and the buffers only grow (to the widest convolution's block).
    static SCRATCH: std::cell::RefCell<Scratch> = const {
        std::cell::RefCell::new(Scratch {
            patch: Vec::new(),
            tmp_in: Vec::new(),
            v: Vec::new(),
            m: Vec::new(),
            tmp_out: Vec::new(),
            y: Vec::new(),
        })
    };
}

impl Scratch {
    /// Runs `f` with this thread's scratch, grown to fit `block` tiles of `cin -> cout_pad`.
    fn with<R>(block: usize, cin: usize, cout_pad: usize, f: impl FnOnce(&mut Self) -> R) -> R {
        SCRATCH.with(|cell| {
            let mut guard = cell.borrow_mut();
            let s = &mut *guard;
            for (buf, len) in [
                (&mut s.patch, POS * cin),
                (&mut s.tmp_in, POS * cin),
                (&mut s.v, POS * block * cin),
                (&mut s.m, POS * block * cout_pad),
                (&mut s.tmp_out, OUT * IN * cout_pad),
                (&mut s.y, OUT * OUT * cout_pad),
            ] {
                if buf.len() < len {
                    buf.resize(len, 0.0);
                }
            }
            f(s)
        })
    }
}

/// The convolution as a candle op on an NHWC tensor, optionally of the 2x nearest-upsampled
/// input (`Conv3x3::forward_upsampled`).
struct Op<'a> {
    conv: &'a Conv3x3,
    upsample: bool,
    isa: Isa,
}

impl CustomOp1 for Op<'_> {
    fn name(&self) -> &'static str {
        "winograd-conv3x3"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let conv = self.conv;
        let (n, h, w, c) = layout.shape().dims4()?;
        if c != conv.cin {
            candle_core::bail!("Conv3x3: input has {c} channels, expected {}", conv.cin);
        }
        let CpuStorage::F32(data) = storage else {
            candle_core::bail!("Conv3x3 takes f32 input");
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("Conv3x3 takes a contiguous input");
        };
        if !self.isa.supported() {
            candle_core::bail!("this CPU cannot run the {} path", self.isa.name());
        }
        let (h, w) = if self.upsample {
            (2 * h, 2 * w)
        } else {
            (h, w)
        };
        let mut out = vec![0f32; n * h * w * conv.cout];
        conv.run_images(
            &data[start..end],
            &mut out,
            n,
            h,
            w,
            self.upsample,
            self.isa,
        );
        Ok((CpuStorage::F32(out), Shape::from((n, h, w, conv.cout))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Module};

    /// Input transform `B^T` (8x8) of F(6x6, 3x3).
    #[rustfmt::skip]
    const BT: [[f64; IN]; IN] = [
        [1.0, 0.0, -5.25, 0.0, 5.25, 0.0, -1.0, 0.0],
        [0.0, 1.0, 1.0, -4.25, -4.25, 1.0, 1.0, 0.0],
        [0.0, -1.0, 1.0, 4.25, -4.25, -1.0, 1.0, 0.0],
        [0.0, 0.5, 0.25, -2.5, -1.25, 2.0, 1.0, 0.0],
        [0.0, -0.5, 0.25, 2.5, -1.25, -2.0, 1.0, 0.0],
        [0.0, 2.0, 4.0, -2.5, -5.0, 0.5, 1.0, 0.0],
        [0.0, -2.0, 4.0, 2.5, -5.0, -0.5, 1.0, 0.0],
        [0.0, -1.0, 0.0, 5.25, 0.0, -5.25, 0.0, 1.0],
    ];

    /// Output transform `A^T` (6x8).
    #[rustfmt::skip]
    const AT: [[f64; IN]; OUT] = [
        [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0],
        [0.0, 1.0, -1.0, 2.0, -2.0, 0.5, -0.5, 0.0],
        [0.0, 1.0, 1.0, 4.0, 4.0, 0.25, 0.25, 0.0],
        [0.0, 1.0, -1.0, 8.0, -8.0, 0.125, -0.125, 0.0],
        [0.0, 1.0, 1.0, 16.0, 16.0, 0.0625, 0.0625, 0.0],
        [0.0, 1.0, -1.0, 32.0, -32.0, 0.03125, -0.03125, 1.0],
    ];

    #[test]
    fn packed_weights_are_g_g_gt_rounded_once_with_zero_padding() {
        // 20 output channels: one whole panel and one with 4 channels and 12 of padding.
        let (cin, cout) = (3, 20);
        let w: Vec<f32> = (0..cout * cin * 9)
            .map(|i| ((i * 7919 % 101) as f32 - 50.0) / 37.0)
            .collect();
        let cout_pad = 32;
        // Stale values in the buffer must all be overwritten.
        let mut u = vec![f32::NAN; POS * cin * cout_pad];
        transform_weights(&w, cin, cout, &mut u);
        for p in 0..POS {
            let (i, j) = (p / IN, p % IN);
            for co in 0..cout_pad {
                for ci in 0..cin {
                    let got =
                        u[((p * cout_pad / PANEL + co / PANEL) * cin + ci) * PANEL + co % PANEL];
                    if co >= cout {
                        assert_eq!(got, 0.0, "padding at p {p}, co {co}");
                        continue;
                    }
                    let g = &w[(co * cin + ci) * 9..][..9];
                    let want: f64 = (0..9)
                        .map(|kl| G[i][kl / 3] * G[j][kl % 3] * f64::from(g[kl]))
                        .sum();
                    // One f32 rounding, plus f64 rounding that differs with the order of
                    // the sums (seen where the terms cancel).
                    let scale: f64 = g.iter().map(|&t| f64::from(t).abs()).sum();
                    let ulp = f64::from((want as f32).abs() * f32::EPSILON);
                    assert!(
                        (f64::from(got) - want).abs() <= ulp + 1e-15 * scale,
                        "p {p}, co {co}, ci {ci}: {got} vs {want}"
                    );
                }
            }
        }
    }

    #[test]
    fn weights_packed_per_call_match_weights_packed_once() {
        // A wide convolution, then a narrower one, so the reused buffer holds stale values.
        for (cin, cout, h, w) in [(96, 40, 13, 17), (5, 7, 9, 8), (96, 40, 13, 17)] {
            let (once, weight, bias) = random_conv(cin, cout, Activation::LeakyRelu(0.2));
            let per_call = Conv3x3::prepared(
                &weight,
                Some(&bias),
                Activation::LeakyRelu(0.2),
                Prepare::PerCall,
            )
            .unwrap();
            let x = noise((1, h, w, cin), 1.0, 7);
            for isa in Isa::available() {
                let want = once.forward_isa(&x, isa).unwrap();
                let got = per_call.forward_isa(&x, isa).unwrap();
                assert_eq!(close(&got, &want), 0.0, "{isa:?} {cin}->{cout}");
            }
        }
    }

    #[test]
    fn unrolled_transforms_match_their_matrices() {
        // Six channels: one SSE vector and two single lanes.
        let s: Vec<Vec<f32>> = (0..IN)
            .map(|k| {
                (0..6)
                    .map(|c| (k * k) as f32 * 0.37 - 1.1 + c as f32)
                    .collect()
            })
            .collect();
        let want =
            |row: &[f64; IN], c: usize| -> f64 { (0..IN).map(|k| row[k] * s[k][c] as f64).sum() };
        let rows: [*const f32; IN] = std::array::from_fn(|k| s[k].as_ptr());
        let mut d = vec![vec![0f32; 6]; IN];
        let dst: [*mut f32; IN] = std::array::from_fn(|k| d[k].as_mut_ptr());
        unsafe { bt8::<Sse>(rows, dst, 6) };
        for (i, (row, got)) in BT.iter().zip(&d).enumerate() {
            for (c, &v) in got.iter().enumerate() {
                assert!((v as f64 - want(row, c)).abs() < 1e-4, "B^T row {i}");
            }
        }
        let mut d = vec![vec![0f32; 8]; OUT];
        let dst: [*mut f32; OUT] = std::array::from_fn(|k| d[k].as_mut_ptr());
        let s8: Vec<Vec<f32>> = s.iter().map(|r| [&r[..], &r[..2]].concat()).collect();
        let rows: [*const f32; IN] = std::array::from_fn(|k| s8[k].as_ptr());
        unsafe { at8::<Sse>(rows, dst, 8) };
        for (a, (row, got)) in AT.iter().zip(&d).enumerate() {
            for (c, &v) in got.iter().take(6).enumerate() {
                assert!((v as f64 - want(row, c)).abs() < 1e-3, "A^T row {a}");
            }
        }
    }

    /// The kernel, input and output transforms together compute a 3x3 correlation.
    #[test]
    fn transform_matrices_compute_a_correlation() {
        let d: Vec<f64> = (0..IN * IN)
            .map(|i| ((i * 37 % 11) as f64 - 5.0) / 3.0)
            .collect();
        let g: Vec<f64> = (0..9).map(|i| ((i * 5 % 7) as f64 - 3.0) / 2.0).collect();
        let mul = |a: &dyn Fn(usize, usize) -> f64, b: &dyn Fn(usize, usize) -> f64, n, k, m| {
            let mut out = vec![vec![0f64; m]; n];
            for (i, row) in out.iter_mut().enumerate() {
                for (j, v) in row.iter_mut().enumerate() {
                    *v = (0..k).map(|x| a(i, x) * b(x, j)).sum();
                }
            }
            out
        };
        let gg = mul(&|i, k| G[i][k], &|k, j| g[k * 3 + j], IN, 3, 3);
        let u = mul(&|i, k| gg[i][k], &|k, j| G[j][k], IN, 3, IN);
        let bd = mul(&|i, k| BT[i][k], &|k, j| d[k * IN + j], IN, IN, IN);
        let v = mul(&|i, k| bd[i][k], &|k, j| BT[j][k], IN, IN, IN);
        let m = |i: usize, j: usize| u[i][j] * v[i][j];
        let am = mul(&|a, i| AT[a][i], &m, OUT, IN, IN);
        let y = mul(&|a, j| am[a][j], &|j, b| AT[b][j], OUT, IN, OUT);
        for a in 0..OUT {
            for b in 0..OUT {
                let direct: f64 = (0..9).map(|k| d[(a + k / 3) * IN + b + k % 3] * g[k]).sum();
                assert!((y[a][b] - direct).abs() < 1e-9, "({a}, {b})");
            }
        }
    }

    /// The reference: candle's direct convolution on NCHW, then the same activation.
    fn reference(
        x_nhwc: &Tensor,
        weight: &Tensor,
        bias: &Tensor,
        act: &Activation,
    ) -> Result<Tensor> {
        let conv = candle_nn::Conv2d::new(
            weight.clone(),
            Some(bias.clone()),
            candle_nn::Conv2dConfig {
                padding: 1,
                ..Default::default()
            },
        );
        let y = conv.forward(&x_nhwc.permute((0, 3, 1, 2))?.contiguous()?)?;
        let y = match act {
            Activation::None => y,
            Activation::LeakyRelu(s) => candle_nn::ops::leaky_relu(&y, *s as f64)?,
            Activation::PRelu(s) => {
                let slopes = Tensor::new(s.as_slice(), y.device())?;
                candle_nn::PReLU::new(slopes, false).forward(&y)?
            }
        };
        y.permute((0, 2, 3, 1))?.contiguous()
    }

    /// Largest relative difference that still counts as f32 rounding. Outputs are O(1);
    /// Winograd's transforms scale values by up to ~100 before combining them again, so its
    /// rounding is a few times candle's: around 1e-5 typically, and up to 7e-5 was seen on
    /// 192 input channels over many random draws. A wrong coefficient or a misplaced tile
    /// shows as 1e-2 or more.
    const TOLERANCE: f32 = 1e-4;

    /// Deterministic normal noise (xorshift and Box-Muller), so a test sees the same values
    /// on every run.
    fn noise(shape: impl Into<candle_core::Shape>, std: f32, seed: u64) -> Tensor {
        let shape = shape.into();
        let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let mut uniform = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            ((state >> 11) as f64 + 0.5) / (1u64 << 53) as f64
        };
        let values: Vec<f32> = (0..shape.elem_count())
            .map(|_| {
                let (a, b) = (uniform(), uniform());
                ((-2.0 * a.ln()).sqrt() * (std::f64::consts::TAU * b).cos()) as f32 * std
            })
            .collect();
        Tensor::from_vec(values, shape, &Device::Cpu).unwrap()
    }

    /// Compares every ISA path this CPU has with candle on one random convolution.
    fn check(n: usize, h: usize, w: usize, cin: usize, cout: usize, act: Activation) {
        let x = noise(
            (n, h, w, cin),
            1.0,
            (n * 1000 + h * 100 + w * 10 + cin + cout) as u64,
        );
        let (conv, weight, bias) = random_conv(cin, cout, act.clone());
        let want = reference(&x, &weight, &bias, &act).unwrap();
        for isa in Isa::available() {
            let worst = close(&conv.forward_isa(&x, isa).unwrap(), &want);
            assert!(
                worst < TOLERANCE,
                "{isa:?} n{n} {h}x{w} {cin}->{cout} {act:?}: worst relative difference {worst}"
            );
        }
    }

    #[test]
    fn matches_candle_on_odd_sizes_and_channel_counts() {
        for (h, w) in [
            (1, 1),
            (1, 7),
            (5, 1),
            (3, 3),
            (4, 4),
            (5, 9),
            (13, 6),
            (17, 23),
        ] {
            for (cin, cout) in [(1, 1), (3, 5), (7, 2), (16, 16)] {
                check(1, h, w, cin, cout, Activation::None);
            }
        }
    }

    #[test]
    fn fuses_bias_and_activations() {
        check(1, 9, 11, 8, 6, Activation::LeakyRelu(0.2));
        let slopes = (0..6).map(|i| 0.05 * i as f32 - 0.1).collect();
        check(1, 10, 7, 5, 6, Activation::PRelu(slopes));
    }

    #[test]
    fn batches_wide_channels_and_many_blocks() {
        check(2, 6, 5, 3, 4, Activation::None);
        check(1, 21, 19, 64, 32, Activation::LeakyRelu(0.2));
        check(1, 67, 70, 4, 3, Activation::None);
    }

    /// The networks' shapes: RRDBNet's widest dense convolution, SRVGGNet's last (three
    /// panels: an odd one left for the two-panel AVX-512 kernel), the 3-channel output.
    #[test]
    fn network_shapes_on_every_isa() {
        check(1, 25, 31, 192, 32, Activation::LeakyRelu(0.2));
        let slopes = (0..64).map(|i| 0.01 * i as f32 - 0.3).collect();
        check(1, 14, 13, 64, 64, Activation::PRelu(slopes));
        check(1, 13, 14, 64, 48, Activation::None);
        check(1, 19, 8, 64, 3, Activation::None);
        check(1, 7, 11, 3, 64, Activation::None);
    }

    /// The ISA paths agree with each other to rounding on the same convolution.
    #[test]
    fn isa_paths_agree() {
        let x = noise((1, 37, 29, 96), 1.0, 1);
        let (conv, _, _) = random_conv(96, 32, Activation::LeakyRelu(0.2));
        let outs: Vec<(Isa, Tensor)> = Isa::available()
            .into_iter()
            .map(|isa| (isa, conv.forward_isa(&x, isa).unwrap()))
            .collect();
        for (isa, out) in &outs[1..] {
            let diff = close(out, &outs[0].1);
            assert!(diff < TOLERANCE, "{isa:?} against {:?}: {diff}", outs[0].0);
        }
        assert!(Isa::available().contains(&Isa::Baseline));
        assert!(Isa::available().contains(&Isa::detect()));
    }

    fn close(a: &Tensor, b: &Tensor) -> f32 {
        assert_eq!(a.dims(), b.dims());
        let a: Vec<f32> = a.flatten_all().unwrap().to_vec1().unwrap();
        let b: Vec<f32> = b.flatten_all().unwrap().to_vec1().unwrap();
        a.iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs() / (1.0 + y.abs()))
            .fold(0f32, f32::max)
    }

    fn random_conv(cin: usize, cout: usize, act: Activation) -> (Conv3x3, Tensor, Tensor) {
        let scale = (1.0 / (9.0 * cin as f64)).sqrt();
        let seed = (cin * 1000 + cout) as u64;
        let weight = (noise((cout, cin, 3, 3), 1.0, seed) * scale).unwrap();
        let bias = noise(cout, 0.1, seed + 1);
        let conv = Conv3x3::new(&weight, Some(&bias), act).unwrap();
        (conv, weight, bias)
    }

    #[test]
    fn upsampled_input_matches_upsample_then_convolve() {
        for (h, w) in [(1, 1), (3, 5), (6, 7)] {
            let (conv, weight, bias) = random_conv(5, 4, Activation::LeakyRelu(0.2));
            let x = noise((2, h, w, 5), 1.0, (h * 100 + w) as u64);
            let up = x
                .permute((0, 3, 1, 2))
                .unwrap()
                .upsample_nearest2d(2 * h, 2 * w)
                .unwrap()
                .permute((0, 2, 3, 1))
                .unwrap()
                .contiguous()
                .unwrap();
            let want = reference(&up, &weight, &bias, &Activation::LeakyRelu(0.2)).unwrap();
            for isa in Isa::available() {
                let got = conv.forward_upsampled_isa(&x, isa).unwrap();
                assert!(close(&got, &want) < TOLERANCE, "{isa:?} {h}x{w}");
            }
        }
    }

    /// Strided input and output inside wider buffers, a scale and two residuals, one of them
    /// the output itself (as RRDBNet's trunk uses them).
    #[test]
    fn strided_io_and_residual_epilogue() {
        for isa in Isa::available() {
            strided_io_and_residual_epilogue_on(isa);
        }
    }

    fn strided_io_and_residual_epilogue_on(isa: Isa) {
        let (n, h, w, stride) = (2, 7, 9, 12);
        let (conv, weight, bias) = random_conv(5, 4, Activation::None);
        let dev = Device::Cpu;
        let buf = noise((n, h, w, stride), 1.0, 2);
        let other = noise((n, h, w, 4), 1.0, 3);
        let mut data: Vec<f32> = buf.flatten_all().unwrap().to_vec1().unwrap();
        let other_data: Vec<f32> = other.flatten_all().unwrap().to_vec1().unwrap();
        let input = buf.narrow(3, 0, 5).unwrap().contiguous().unwrap();
        let old_out = buf.narrow(3, 6, 4).unwrap();
        let conv_ref = reference(&input, &weight, &bias, &Activation::None).unwrap();
        // Written at channels 6..10: 0.5 * conv + 2 * (old channels 6..10) - other.
        let want = ((conv_ref * 0.5).unwrap() + (old_out * 2.0).unwrap() - &other).unwrap();
        let base = data.as_mut_ptr();
        let io = Io {
            src: base,
            src_stride: stride,
            dst: unsafe { base.add(6) },
            dst_stride: stride,
            epilogue: Epilogue {
                scale: 0.5,
                residuals: [
                    Some(Residual {
                        ptr: unsafe { base.add(6) },
                        stride,
                        scale: 2.0,
                    }),
                    Some(Residual {
                        ptr: other_data.as_ptr(),
                        stride: 4,
                        scale: -1.0,
                    }),
                ],
            },
            upsample: false,
        };
        // SAFETY: reads channels 0..5, writes 6..10 of the same buffer; residuals per pixel.
        unsafe { conv.run_raw_isa(io, n, h, w, isa) };
        let after = Tensor::from_vec(data, (n, h, w, stride), &dev).unwrap();
        let got = after.narrow(3, 6, 4).unwrap();
        assert!(close(&got, &want) < TOLERANCE, "{isa:?}");
        // Channels outside the output are untouched.
        let untouched = |t: &Tensor| {
            Tensor::cat(
                &[t.narrow(3, 0, 6).unwrap(), t.narrow(3, 10, 2).unwrap()],
                3,
            )
            .unwrap()
        };
        assert_eq!(close(&untouched(&after), &untouched(&buf)), 0.0);
    }

    #[test]
    fn refuses_wrong_inputs() {
        let dev = Device::Cpu;
        let weight = Tensor::zeros((2, 3, 3, 3), DType::F32, &dev).unwrap();
        let conv = Conv3x3::new(&weight, None, Activation::None).unwrap();
        let bad = Tensor::zeros((1, 4, 4, 2), DType::F32, &dev).unwrap();
        assert!(conv.forward(&bad).is_err());
        let wrong_kernel = Tensor::zeros((2, 3, 1, 1), DType::F32, &dev).unwrap();
        assert!(Conv3x3::new(&wrong_kernel, None, Activation::None).is_err());
    }
}
