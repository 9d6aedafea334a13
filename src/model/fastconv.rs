//! A fast 3x3, stride 1, padding 1 convolution for the CPU: channels-last (NHWC) tensors,
//! Winograd F(6x6, 3x3) with the weights transformed once at load, the 36 per-position
//! products through the `gemm` crate, and bias plus activation fused into the output
//! transform. Blocks of tiles are spread over rayon's threads.
//!
//! Winograd F(6x6, 3x3) computes a 6x6 output tile from an 8x8 input tile with 64
//! multiplications per channel pair instead of 324; the transforms (Lavin and Gray, 2015,
//! points 0, ±1, ±2, ±1/2 and infinity) cost additions and multiplications by constants. candle's `conv2d` stays the reference: tests
//! compare the two on random tensors.

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

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
    /// `u[p][ci][co]`: the transformed kernel at each of the 36 positions.
    u: Vec<f32>,
    bias: Vec<f32>,
    act: Activation,
}

/// Output tile edge, input tile edge and the number of transform positions.
const OUT: usize = 6;
const IN: usize = 8;
const POS: usize = IN * IN;

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

/// Scratch per block of tiles is kept near this size so it stays in the core's L2 cache.
const BLOCK_BYTES: usize = 768 * 1024;

impl Conv3x3 {
    /// From an OIHW `(cout, cin, 3, 3)` weight and an optional `(cout,)` bias, any float dtype.
    pub fn new(weight: &Tensor, bias: Option<&Tensor>, act: Activation) -> Result<Self> {
        let (cout, cin, kh, kw) = weight.dims4()?;
        if (kh, kw) != (3, 3) {
            candle_core::bail!("Conv3x3 needs a 3x3 kernel, got {kh}x{kw}");
        }
        let w: Vec<f64> = weight.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?;
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
        // U = G g G^T per (co, ci), computed in f64 and rounded once. Each position p = (i, j)
        // is a fixed combination of the nine taps: U_p = sum_kl G[i][k] G[j][l] g[k][l].
        let mut taps = vec![0f64; cin * cout * 9];
        for co in 0..cout {
            for ci in 0..cin {
                taps[(ci * cout + co) * 9..][..9].copy_from_slice(&w[(co * cin + ci) * 9..][..9]);
            }
        }
        let mut u = vec![0f32; POS * cin * cout];
        u.par_chunks_mut(cin * cout)
            .enumerate()
            .for_each(|(p, up)| {
                let (i, j) = (p / IN, p % IN);
                let c: [f64; 9] = std::array::from_fn(|kl| G[i][kl / 3] * G[j][kl % 3]);
                for (out, g) in up.iter_mut().zip(taps.chunks_exact(9)) {
                    *out = c.iter().zip(g).map(|(a, b)| a * b).sum::<f64>() as f32;
                }
            });
        Ok(Self {
            cin,
            cout,
            u,
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
        xs.apply_op1_no_bwd(self)
    }

    /// Tiles per block: enough rows for the GEMMs, few enough to stay in cache.
    fn block_tiles(&self, tiles: usize) -> usize {
        let per_tile = POS * (self.cin + self.cout) * std::mem::size_of::<f32>();
        let fit = (BLOCK_BYTES / per_tile).clamp(16, 256);
        // Leave at least a few blocks per thread so the work balances.
        let spread = tiles.div_ceil(4 * rayon::current_num_threads()).max(8);
        fit.min(spread)
    }

    /// Like `forward`, on the input upsampled 2x (nearest) first: `(n, 2h, 2w, cout)` out.
    pub fn forward_upsampled(&self, xs: &Tensor) -> Result<Tensor> {
        xs.apply_op1_no_bwd(&Upsampled(self))
    }

    /// The whole convolution on a contiguous NHWC buffer of `h x w` pixels, or of
    /// `h/2 x w/2` pixels read through a 2x nearest upsampling if `upsample`.
    pub fn run(&self, input: &[f32], n: usize, h: usize, w: usize, upsample: bool) -> Vec<f32> {
        let src_px = if upsample { (h / 2) * (w / 2) } else { h * w };
        assert!(
            !upsample || (h % 2 == 0 && w % 2 == 0),
            "upsampled size is even"
        );
        assert_eq!(input.len(), n * src_px * self.cin, "input size");
        let mut out = vec![0f32; n * h * w * self.cout];
        let io = Io {
            src: input.as_ptr(),
            src_stride: self.cin,
            dst: out.as_mut_ptr(),
            dst_stride: self.cout,
            epilogue: Epilogue::default(),
            upsample,
        };
        // SAFETY: separate buffers of the sizes asserted above.
        unsafe { self.run_raw(io, n, h, w) };
        out
    }

    /// The convolution between channels-last buffers with any pixel strides, for networks
    /// that keep several tensors in one buffer (RRDBNet's dense blocks).
    ///
    /// # Safety
    /// `io.src` and `io.dst` (and every residual) address `n * h * w` pixels of their stride.
    /// The `cin` channels read at `io.src` are not written by this call. A residual may alias
    /// the output channels (it is read at a pixel just before that pixel is written).
    pub unsafe fn run_raw(&self, io: Io, n: usize, h: usize, w: usize) {
        let (cin, cout) = (self.cin, self.cout);
        if n * h * w == 0 {
            return;
        }
        let (th, tw) = (h.div_ceil(OUT), w.div_ceil(OUT));
        let tiles = th * tw;
        let block = self.block_tiles(tiles);
        let blocks = tiles.div_ceil(block);
        let level = SimdLevel::detect();
        (0..n * blocks).into_par_iter().for_each(|job| {
            Scratch::with(block, cin, cout, |scratch| {
                let (img, b) = (job / blocks, job % blocks);
                let first = b * block;
                let work = Block {
                    io: io.image(img * h * w),
                    geom: Geometry { h, w, tw },
                    first,
                    count: block.min(tiles - first),
                    block,
                };
                level.dispatch(self, work, scratch);
            })
        });
    }

    /// Transforms, multiplies and writes one block of tiles. Inlined into a copy per
    /// instruction set (see `SimdLevel`), so the element-wise loops use the widest vectors.
    #[inline(always)]
    fn process(&self, work: Block, scratch: &mut Scratch) {
        for t in 0..work.count {
            self.input_tile(&work, work.first + t, t, scratch);
        }
        self.multiply(work.count, work.block, scratch);
        for t in 0..work.count {
            self.output_tile(&work, work.first + t, t, scratch);
        }
    }

    /// Gathers the 6x6 input patch of tile `tile` (zeros outside the image) and writes its
    /// transform `B^T d B` to `v[p][slot][ci]`.
    #[inline(always)]
    fn input_tile(&self, work: &Block, tile: usize, slot: usize, s: &mut Scratch) {
        let (cin, geom, io) = (self.cin, &work.geom, &work.io);
        let (y0, x0) = (
            (tile / geom.tw * OUT) as isize - 1,
            (tile % geom.tw * OUT) as isize - 1,
        );
        // The `cin` channels of pixel (y, x); the caller of `run_raw` keeps them unwritten.
        let shift = io.upsample as usize;
        let src_w = geom.w >> shift;
        let pixel = |y: usize, x: usize| unsafe {
            let at = (y >> shift) * src_w + (x >> shift);
            std::slice::from_raw_parts(io.src.add(at * io.src_stride), cin)
        };
        let inside = y0 >= 0 && x0 >= 0 && y0 as usize + IN <= geom.h && x0 as usize + IN <= geom.w;
        if inside {
            // Columns straight from the image: tmp[i][j] = sum_k BT[i][k] d[k][j].
            let (y0, x0) = (y0 as usize, x0 as usize);
            for j in 0..IN {
                bt8(
                    std::array::from_fn(|k| pixel(y0 + k, x0 + j)),
                    strided_mut(&mut s.tmp_in, j * cin, IN * cin, cin),
                );
            }
        } else {
            for i in 0..IN {
                let y = y0 + i as isize;
                for j in 0..IN {
                    let x = x0 + j as isize;
                    let dst = &mut s.patch[(i * IN + j) * cin..][..cin];
                    if y >= 0 && (y as usize) < geom.h && x >= 0 && (x as usize) < geom.w {
                        dst.copy_from_slice(pixel(y as usize, x as usize));
                    } else {
                        dst.fill(0.0);
                    }
                }
            }
            for j in 0..IN {
                bt8(
                    strided(&s.patch, j * cin, IN * cin, cin),
                    strided_mut(&mut s.tmp_in, j * cin, IN * cin, cin),
                );
            }
        }
        // Rows: v[i][j] = sum_k tmp[i][k] BT[j][k].
        for i in 0..IN {
            bt8(
                strided(&s.tmp_in, i * IN * cin, cin, cin),
                strided_mut(
                    &mut s.v,
                    (i * IN * work.block + slot) * cin,
                    work.block * cin,
                    cin,
                ),
            );
        }
    }

    /// `m[p] = v[p] x u[p]` for the 36 positions: (count x cin) times (cin x cout).
    fn multiply(&self, count: usize, block: usize, s: &mut Scratch) {
        let (cin, cout) = (self.cin, self.cout);
        for p in 0..POS {
            let v = &s.v[p * block * cin..];
            let u = &self.u[p * cin * cout..][..cin * cout];
            let m = &mut s.m[p * block * cout..][..count * cout];
            // SAFETY: the slices hold count x cin, cin x cout and count x cout row-major
            // matrices with the strides given.
            unsafe {
                gemm::gemm(
                    count,
                    cout,
                    cin,
                    m.as_mut_ptr(),
                    1,
                    cout as isize,
                    false,
                    v.as_ptr(),
                    1,
                    cin as isize,
                    u.as_ptr(),
                    1,
                    cout as isize,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
            }
        }
    }

    /// `A^T m A` for tile `tile`, then the epilogue, written to its output pixels.
    #[inline(always)]
    fn output_tile(&self, work: &Block, tile: usize, slot: usize, s: &mut Scratch) {
        let (cout, geom, io, block) = (self.cout, &work.geom, &work.io, work.block);
        // Columns: tmp[a][j] = sum_i AT[a][i] m[i][j].
        for j in 0..IN {
            at8(
                strided(&s.m, (j * block + slot) * cout, IN * block * cout, cout),
                strided_mut(&mut s.tmp_out, j * cout, IN * cout, cout),
            );
        }
        // Rows: y[a][b] = sum_j tmp[a][j] AT[b][j].
        for a in 0..OUT {
            at8(
                strided(&s.tmp_out, a * IN * cout, cout, cout),
                strided_mut(&mut s.y, a * OUT * cout, cout, cout),
            );
        }
        let (ty, tx) = (tile / geom.tw * OUT, tile % geom.tw * OUT);
        for a in 0..OUT.min(geom.h - ty) {
            for b in 0..OUT.min(geom.w - tx) {
                let y = &mut s.y[(a * OUT + b) * cout..][..cout];
                let at = (ty + a) * geom.w + tx + b;
                self.finish(y, &io.epilogue, at);
                // SAFETY: this thread alone writes this pixel's output channels, and no
                // other reference to them lives (residuals were read in `finish`).
                let out =
                    unsafe { std::slice::from_raw_parts_mut(io.dst.add(at * io.dst_stride), cout) };
                out.copy_from_slice(y);
            }
        }
    }

    /// Bias, activation, scale and residuals, in place on one pixel's `cout` values.
    #[inline(always)]
    fn finish(&self, y: &mut [f32], epi: &Epilogue, pixel: usize) {
        let bias = &self.bias[..y.len()];
        match &self.act {
            Activation::None => {
                for (v, &b) in y.iter_mut().zip(bias) {
                    *v += b;
                }
            }
            Activation::LeakyRelu(slope) => {
                for (v, &b) in y.iter_mut().zip(bias) {
                    let x = *v + b;
                    *v = if x >= 0.0 { x } else { x * slope };
                }
            }
            Activation::PRelu(slopes) => {
                for ((v, &b), &s) in y.iter_mut().zip(bias).zip(&slopes[..]) {
                    let x = *v + b;
                    *v = if x >= 0.0 { x } else { x * s };
                }
            }
        }
        if epi.scale != 1.0 {
            for v in y.iter_mut() {
                *v *= epi.scale;
            }
        }
        for r in epi.residuals.iter().flatten() {
            // SAFETY: `run_raw`'s contract: the residual holds this pixel, and nothing
            // writes it until this thread writes the output below.
            let add = unsafe { std::slice::from_raw_parts(r.ptr.add(pixel * r.stride), y.len()) };
            for (v, &a) in y.iter_mut().zip(add) {
                *v += r.scale * a;
            }
        }
    }
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
}

/// The instruction set the element-wise loops are compiled for, chosen once at run time.
#[derive(Debug, Clone, Copy)]
enum SimdLevel {
    Baseline,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

impl SimdLevel {
    fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("fma") {
                return Self::Avx512;
            }
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                return Self::Avx2;
            }
        }
        Self::Baseline
    }

    fn dispatch(self, conv: &Conv3x3, work: Block, scratch: &mut Scratch) {
        match self {
            Self::Baseline => conv.process(work, scratch),
            // SAFETY: `detect` saw these features on this CPU.
            #[cfg(target_arch = "x86_64")]
            Self::Avx2 => unsafe { process_avx2(conv, work, scratch) },
            #[cfg(target_arch = "x86_64")]
            Self::Avx512 => unsafe { process_avx512(conv, work, scratch) },
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn process_avx2(conv: &Conv3x3, work: Block, scratch: &mut Scratch) {
    conv.process(work, scratch)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
unsafe fn process_avx512(conv: &Conv3x3, work: Block, scratch: &mut Scratch) {
    conv.process(work, scratch)
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
    /// Each thread's scratch, kept between calls: a network makes hundreds of calls per pass.
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
    /// Runs `f` with this thread's scratch, grown to fit `block` tiles of `cin -> cout`.
    fn with<R>(block: usize, cin: usize, cout: usize, f: impl FnOnce(&mut Self) -> R) -> R {
        SCRATCH.with(|cell| {
            let mut guard = cell.borrow_mut();
            let s = &mut *guard;
            for (buf, len) in [
                (&mut s.patch, POS * cin),
                (&mut s.tmp_in, POS * cin),
                (&mut s.v, POS * block * cin),
                (&mut s.m, POS * block * cout),
                (&mut s.tmp_out, OUT * IN * cout),
                (&mut s.y, OUT * OUT * cout),
            ] {
                if buf.len() < len {
                    buf.resize(len, 0.0);
                }
            }
            f(s)
        })
    }
}

/// Six rows of `len` values, `stride` apart, starting at `offset`.
#[inline(always)]
fn strided(buf: &[f32], offset: usize, stride: usize, len: usize) -> [&[f32]; IN] {
    std::array::from_fn(|k| &buf[offset + k * stride..][..len])
}

#[inline(always)]
fn strided_mut<const N: usize>(
    buf: &mut [f32],
    offset: usize,
    stride: usize,
    len: usize,
) -> [&mut [f32]; N] {
    let mut rows = buf[offset..].chunks_mut(stride).map(|c| &mut c[..len]);
    std::array::from_fn(|_| rows.next().expect("buffer holds every row"))
}

/// `d = B^T s` along the eight rows, element-wise over the channels.
#[inline(always)]
fn bt8(s: [&[f32]; IN], d: [&mut [f32]; IN]) {
    let [s0, s1, s2, s3, s4, s5, s6, s7] = s;
    let [d0, d1, d2, d3, d4, d5, d6, d7] = d;
    let n = d0.len();
    let (s0, s1, s2, s3) = (&s0[..n], &s1[..n], &s2[..n], &s3[..n]);
    let (s4, s5, s6, s7) = (&s4[..n], &s5[..n], &s6[..n], &s7[..n]);
    let (d1, d2, d3) = (&mut d1[..n], &mut d2[..n], &mut d3[..n]);
    let (d4, d5, d6, d7) = (&mut d4[..n], &mut d5[..n], &mut d6[..n], &mut d7[..n]);
    for c in 0..n {
        let (a0, a1, a2, a3) = (s0[c], s1[c], s2[c], s3[c]);
        let (a4, a5, a6, a7) = (s4[c], s5[c], s6[c], s7[c]);
        d0[c] = a0 - a6 + 5.25 * (a4 - a2);
        d7[c] = a7 - a1 + 5.25 * (a3 - a5);
        let (e, o) = (a2 + a6 - 4.25 * a4, a1 + a5 - 4.25 * a3);
        d1[c] = e + o;
        d2[c] = e - o;
        let (e, o) = (a6 + 0.25 * a2 - 1.25 * a4, 0.5 * a1 - 2.5 * a3 + 2.0 * a5);
        d3[c] = e + o;
        d4[c] = e - o;
        let (e, o) = (a6 + 4.0 * a2 - 5.0 * a4, 2.0 * a1 - 2.5 * a3 + 0.5 * a5);
        d5[c] = e + o;
        d6[c] = e - o;
    }
}

/// `d = A^T s` along the eight rows, element-wise over the channels.
#[inline(always)]
fn at8(s: [&[f32]; IN], d: [&mut [f32]; OUT]) {
    let [s0, s1, s2, s3, s4, s5, s6, s7] = s;
    let [d0, d1, d2, d3, d4, d5] = d;
    let n = d0.len();
    let (s0, s1, s2, s3) = (&s0[..n], &s1[..n], &s2[..n], &s3[..n]);
    let (s4, s5, s6, s7) = (&s4[..n], &s5[..n], &s6[..n], &s7[..n]);
    let (d1, d2, d3, d4, d5) = (
        &mut d1[..n],
        &mut d2[..n],
        &mut d3[..n],
        &mut d4[..n],
        &mut d5[..n],
    );
    for c in 0..n {
        let (a1, a2, a3, a4, a5, a6) = (s1[c], s2[c], s3[c], s4[c], s5[c], s6[c]);
        let (p12, m12, p34, m34, p56, m56) = (a1 + a2, a1 - a2, a3 + a4, a3 - a4, a5 + a6, a5 - a6);
        d0[c] = s0[c] + p12 + p34 + p56;
        d1[c] = m12 + 2.0 * m34 + 0.5 * m56;
        d2[c] = p12 + 4.0 * p34 + 0.25 * p56;
        d3[c] = m12 + 8.0 * m34 + 0.125 * m56;
        d4[c] = p12 + 16.0 * p34 + 0.0625 * p56;
        d5[c] = m12 + 32.0 * m34 + 0.03125 * m56 + s7[c];
    }
}

impl CustomOp1 for Conv3x3 {
    fn name(&self) -> &'static str {
        "winograd-conv3x3"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        self.apply(storage, layout, false)
    }
}

/// The convolution of the 2x nearest-upsampled input (`Conv3x3::forward_upsampled`).
struct Upsampled<'a>(&'a Conv3x3);

impl CustomOp1 for Upsampled<'_> {
    fn name(&self) -> &'static str {
        "winograd-conv3x3-upsampled"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        self.0.apply(storage, layout, true)
    }
}

impl Conv3x3 {
    fn apply(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
        upsample: bool,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, h, w, c) = layout.shape().dims4()?;
        if c != self.cin {
            candle_core::bail!("Conv3x3: input has {c} channels, expected {}", self.cin);
        }
        let CpuStorage::F32(data) = storage else {
            candle_core::bail!("Conv3x3 takes f32 input");
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("Conv3x3 takes a contiguous input");
        };
        let (h, w) = if upsample { (2 * h, 2 * w) } else { (h, w) };
        let out = self.run(&data[start..end], n, h, w, upsample);
        Ok((CpuStorage::F32(out), Shape::from((n, h, w, self.cout))))
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
    fn unrolled_transforms_match_their_matrices() {
        let s: Vec<Vec<f32>> = (0..IN)
            .map(|k| vec![(k * k) as f32 * 0.37 - 1.1, k as f32])
            .collect();
        let rows: [&[f32]; IN] = std::array::from_fn(|k| s[k].as_slice());
        let want =
            |row: &[f64; IN], c: usize| -> f64 { (0..IN).map(|k| row[k] * s[k][c] as f64).sum() };
        let mut d = vec![vec![0f32; 2]; IN];
        {
            let mut it = d.iter_mut().map(|r| r.as_mut_slice());
            bt8(rows, std::array::from_fn(|_| it.next().unwrap()));
        }
        for (i, (row, got)) in BT.iter().zip(&d).enumerate() {
            for (c, &v) in got.iter().enumerate() {
                assert!((v as f64 - want(row, c)).abs() < 1e-4, "B^T row {i}");
            }
        }
        let mut d = vec![vec![0f32; 2]; OUT];
        {
            let mut it = d.iter_mut().map(|r| r.as_mut_slice());
            at8(rows, std::array::from_fn(|_| it.next().unwrap()));
        }
        for (a, (row, got)) in AT.iter().zip(&d).enumerate() {
            for (c, &v) in got.iter().enumerate() {
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
    /// rounding is a few times candle's, around 1e-5. A wrong coefficient or a misplaced tile
    /// shows as 1e-2 or more.
    const TOLERANCE: f32 = 6e-5;

    fn check(n: usize, h: usize, w: usize, cin: usize, cout: usize, act: Activation) {
        let x = Tensor::randn(0f32, 1.0, (n, h, w, cin), &Device::Cpu).unwrap();
        let (conv, weight, bias) = random_conv(cin, cout, act.clone());
        let worst = close(
            &conv.forward(&x).unwrap(),
            &reference(&x, &weight, &bias, &act).unwrap(),
        );
        assert!(
            worst < TOLERANCE,
            "n{n} {h}x{w} {cin}->{cout} {act:?}: worst relative difference {worst}"
        );
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
        let dev = Device::Cpu;
        let scale = (1.0 / (9.0 * cin as f64)).sqrt();
        let weight = (Tensor::randn(0f32, 1.0, (cout, cin, 3, 3), &dev).unwrap() * scale).unwrap();
        let bias = Tensor::randn(0f32, 0.1, cout, &dev).unwrap();
        let conv = Conv3x3::new(&weight, Some(&bias), act).unwrap();
        (conv, weight, bias)
    }

    #[test]
    fn upsampled_input_matches_upsample_then_convolve() {
        for (h, w) in [(1, 1), (3, 5), (6, 7)] {
            let (conv, weight, bias) = random_conv(5, 4, Activation::LeakyRelu(0.2));
            let x = Tensor::randn(0f32, 1.0, (2, h, w, 5), &Device::Cpu).unwrap();
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
            let got = conv.forward_upsampled(&x).unwrap();
            assert!(close(&got, &want) < TOLERANCE, "{h}x{w}");
        }
    }

    /// Strided input and output inside wider buffers, a scale and two residuals, one of them
    /// the output itself (as RRDBNet's trunk uses them).
    #[test]
    fn strided_io_and_residual_epilogue() {
        let (n, h, w, stride) = (2, 7, 9, 12);
        let (conv, weight, bias) = random_conv(5, 4, Activation::None);
        let dev = Device::Cpu;
        let buf = Tensor::randn(0f32, 1.0, (n, h, w, stride), &dev).unwrap();
        let other = Tensor::randn(0f32, 1.0, (n, h, w, 4), &dev).unwrap();
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
        unsafe { conv.run_raw(io, n, h, w) };
        let after = Tensor::from_vec(data, (n, h, w, stride), &dev).unwrap();
        let got = after.narrow(3, 6, 4).unwrap();
        assert!(close(&got, &want) < TOLERANCE);
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
