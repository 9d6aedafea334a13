//! A resize after the network, as some ncnn model graphs end with one: the x2 and x3
//! `realesr-animevideov3` graphs of the Real-ESRGAN ncnn releases are the x4 network
//! followed by `Interp` (bicubic) by 0.5 and 0.75.
//!
//! This is ncnn's bicubic `Interp` (`resize_type` 3, `align_corner` 0), in f32 as ncnn
//! computes it: for output column `dx`, the source position `(dx + 0.5) * in / out - 0.5`,
//! Keys' cubic with A = -0.75 on the four neighbours (the fourth weight as one minus the
//! other three), weights folded onto the inner taps at the first and last columns instead of
//! clamping indices; rows first, then columns, with f32 intermediate rows.
//!
//! Applied to each tile's padded output, it gives the same values as on the whole image
//! wherever the tile's context reaches two source pixels past the kept part (tile padding
//! keeps far more), because every output pixel's source position is the same either way.

use rayon::prelude::*;

use super::tiling::TileView;

/// Bicubic resize by `num / den` (`num < den`: 2/4 and 3/4 for the x2 and x3 graphs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resize {
    pub num: usize,
    pub den: usize,
}

impl Resize {
    /// Output pixels for `n` input pixels (ncnn truncates `n * scale`).
    pub fn out_len(&self, n: usize) -> usize {
        n * self.num / self.den
    }
}

/// Source index and four weights of every output position along one axis.
fn taps(n_in: usize, n_out: usize) -> Vec<(usize, [f32; 4])> {
    const A: f32 = -0.75;
    let scale = n_in as f64 / n_out as f64;
    (0..n_out)
        .map(|dx| {
            let f = ((dx as f64 + 0.5) * scale - 0.5) as f32;
            let mut sx = f.floor() as isize;
            let fx = f - sx as f32;
            let (x0, x1, x2) = (fx + 1.0, fx, 1.0 - fx);
            let c0 = A * x0 * x0 * x0 - 5.0 * A * x0 * x0 + 8.0 * A * x0 - 4.0 * A;
            let c1 = (A + 2.0) * x1 * x1 * x1 - (A + 3.0) * x1 * x1 + 1.0;
            let c2 = (A + 2.0) * x2 * x2 * x2 - (A + 3.0) * x2 * x2 + 1.0;
            let c3 = 1.0 - c0 - c1 - c2;
            let mut c = [c0, c1, c2, c3];
            let n = n_in as isize;
            if sx <= -1 {
                sx = 1;
                c = [1.0 - c3, c3, 0.0, 0.0];
            }
            if sx == 0 {
                sx = 1;
                c = [c[0] + c[1], c[2], c[3], 0.0];
            }
            if sx == n - 2 {
                sx = n - 3;
                c = [0.0, c[0], c[1], c[2] + c[3]];
            }
            if sx >= n - 1 {
                sx = n - 3;
                c = [0.0, 0.0, c[0], 1.0 - c[0]];
            }
            // The taps are sx - 1 .. sx + 2.
            ((sx - 1).max(0) as usize, c)
        })
        .collect()
}

/// Resizes `src` (planes of any size of at least 4x4) to `(channels, oh, ow)` planes in `dst`.
pub(crate) fn bicubic(src: &TileView<'_>, oh: usize, ow: usize, dst: &mut [f32]) {
    let (h, w) = (src.height(), src.width());
    assert!(h >= 4 && w >= 4, "bicubic resize needs at least 4x4 pixels");
    assert_eq!(dst.len(), src.channels() * oh * ow);
    let (xs, ys) = (taps(w, ow), taps(h, oh));
    dst.par_chunks_mut(ow).enumerate().for_each(|(row, out)| {
        let (c, dy) = (row / oh, row % oh);
        let (sy, b) = ys[dy];
        let rows: [&[f32]; 4] = std::array::from_fn(|k| src.row(c, sy + k));
        // The four source rows resampled horizontally, then combined vertically, each sum
        // left to right as ncnn adds them.
        for (o, &(sx, a)) in out.iter_mut().zip(&xs) {
            let mut acc = 0f32;
            for (r, bk) in rows.iter().zip(b) {
                let v = r[sx] * a[0] + r[sx + 1] * a[1] + r[sx + 2] * a[2] + r[sx + 3] * a[3];
                acc += v * bk;
            }
            *o = acc;
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn halving_uses_the_exact_weights_and_folds_the_edges() {
        let t = taps(8, 4);
        assert_eq!(t[1], (1, [-0.09375, 0.59375, 0.59375, -0.09375]));
        assert_eq!(t[0], (0, [0.5, 0.59375, -0.09375, 0.0]));
        assert_eq!(t[3], (4, [0.0, -0.09375, 0.59375, 0.5]));
        for (_, c) in taps(40, 30) {
            assert!((c.iter().sum::<f32>() - 1.0).abs() < 1e-6, "{c:?}");
        }
    }

    /// Keys' cubic kernel with A = -0.75, in f64.
    fn keys(d: f64) -> f64 {
        let (a, d) = (-0.75, d.abs());
        if d <= 1.0 {
            (a + 2.0) * d * d * d - (a + 3.0) * d * d + 1.0
        } else if d < 2.0 {
            a * d * d * d - 5.0 * a * d * d + 8.0 * a * d - 4.0 * a
        } else {
            0.0
        }
    }

    #[test]
    fn inner_pixels_are_the_cubic_convolution_and_a_constant_stays_constant() {
        let (h, w, oh, ow) = (12, 16, 9, 12);
        let src: Vec<f32> = (0..h * w)
            .map(|i| ((i * 37) % 101) as f32 / 101.0)
            .collect();
        let mut dst = vec![0.0; oh * ow];
        bicubic(&TileView::whole(&src, 1, h, w), oh, ow, &mut dst);
        let pos = |o: usize, n_in: usize, n_out: usize| {
            (o as f64 + 0.5) * n_in as f64 / n_out as f64 - 0.5
        };
        // Away from the edges, where ncnn folds the weights.
        for y in 1..oh - 1 {
            for x in 1..ow - 1 {
                let (fy, fx) = (pos(y, h, oh), pos(x, w, ow));
                let mut want = 0.0;
                for sy in 0..h {
                    for sx in 0..w {
                        let k = keys(fy - sy as f64) * keys(fx - sx as f64);
                        want += k * src[sy * w + sx] as f64;
                    }
                }
                let got = dst[y * ow + x] as f64;
                assert!(
                    (got - want).abs() < 1e-5,
                    "({y}, {x}): {got} against {want}"
                );
            }
        }
        let flat = vec![0.25f32; h * w];
        bicubic(&TileView::whole(&flat, 1, h, w), 6, 8, &mut dst[..48]);
        assert!(dst[..48].iter().all(|v| (v - 0.25).abs() < 1e-6));
    }
}
