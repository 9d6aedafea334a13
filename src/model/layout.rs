//! Moves between the networks' NCHW inputs and outputs and the fast path's channels-last
//! buffers, in parallel over rows, writing into buffers the caller owns (arena slots).

use candle_core::{Device, Storage, Tensor};
use rayon::prelude::*;

use super::ModelError;

/// Runs `f` on the values of a contiguous f32 CPU tensor without copying them.
pub(crate) fn with_cpu_slice<R>(
    xs: &Tensor,
    f: impl FnOnce(&[f32]) -> Result<R, ModelError>,
) -> Result<R, ModelError> {
    let xs = if xs.is_contiguous() && xs.device().is_cpu() {
        xs.clone()
    } else {
        xs.to_device(&Device::Cpu)?.contiguous()?
    };
    let (storage, layout) = xs.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        unreachable!("moved to the CPU above");
    };
    let data = cpu.as_slice::<f32>()?;
    let start = layout.start_offset();
    f(&data[start..start + xs.elem_count()])
}

/// `(c, h, w)` planes to `(h, w, c)` pixels.
pub(crate) fn nchw_to_nhwc(src: &[f32], c: usize, h: usize, w: usize, dst: &mut [f32]) {
    assert_eq!(src.len(), c * h * w);
    assert_eq!(dst.len(), c * h * w);
    if c * h * w == 0 {
        return;
    }
    dst.par_chunks_mut(w * c).enumerate().for_each(|(y, row)| {
        for (x, px) in row.chunks_exact_mut(c).enumerate() {
            for (ch, v) in px.iter_mut().enumerate() {
                *v = src[(ch * h + y) * w + x];
            }
        }
    });
}

/// `(h, w, c)` pixels to `(c, h, w)` planes.
pub(crate) fn nhwc_to_nchw(src: &[f32], c: usize, h: usize, w: usize, dst: &mut [f32]) {
    assert_eq!(src.len(), c * h * w);
    assert_eq!(dst.len(), c * h * w);
    if c * h * w == 0 {
        return;
    }
    dst.par_chunks_mut(w).enumerate().for_each(|(row, out)| {
        let (ch, y) = (row / h, row % h);
        let src = &src[y * w * c..][..w * c];
        for (x, v) in out.iter_mut().enumerate() {
            *v = src[x * c + ch];
        }
    });
}

/// SRVGGNet's tail: the pixel shuffle of `last` (`(h, w, c * s * s)` channels-last) plus
/// the nearest-neighbour upsampling of the input `base` (`(c, h, w)`), written as
/// `(c, h * s, w * s)` planes. PyTorch's `pixel_shuffle` takes channel `c * s * s + i * s + j`
/// to row offset `i` and column offset `j`.
pub(crate) fn shuffle_add_base(
    last: &[f32],
    base: &[f32],
    c: usize,
    h: usize,
    w: usize,
    s: usize,
    dst: &mut [f32],
) {
    let (oh, ow, per_px) = (h * s, w * s, c * s * s);
    assert_eq!(last.len(), h * w * per_px);
    assert_eq!(base.len(), c * h * w);
    assert_eq!(dst.len(), c * oh * ow);
    if dst.is_empty() {
        return;
    }
    dst.par_chunks_mut(ow).enumerate().for_each(|(row, out)| {
        let (ch, oy) = (row / oh, row % oh);
        let (y, i) = (oy / s, oy % s);
        let src = &last[y * w * per_px..][..w * per_px];
        let base = &base[(ch * h + y) * w..][..w];
        let first = ch * s * s + i * s;
        for (x, (px, b)) in out.chunks_exact_mut(s).zip(base).enumerate() {
            let from = &src[x * per_px + first..][..s];
            for (v, f) in px.iter_mut().zip(from) {
                *v = f + b;
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_round_trip_and_match_candle() {
        let (c, h, w) = (3, 5, 7);
        let src: Vec<f32> = (0..c * h * w).map(|i| i as f32).collect();
        let mut nhwc = vec![0.0; src.len()];
        nchw_to_nhwc(&src, c, h, w, &mut nhwc);
        let want: Vec<f32> = Tensor::from_vec(src.clone(), (c, h, w), &Device::Cpu)
            .unwrap()
            .permute((1, 2, 0))
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(nhwc, want);
        let mut back = vec![0.0; src.len()];
        nhwc_to_nchw(&nhwc, c, h, w, &mut back);
        assert_eq!(back, src);
    }

    #[test]
    fn shuffle_matches_candle_pixel_shuffle_plus_upsample() {
        let (c, h, w, s) = (3, 3, 4, 2);
        let dev = Device::Cpu;
        let conv = Tensor::randn(0f32, 1.0, (1, c * s * s, h, w), &dev).unwrap();
        let base = Tensor::randn(0f32, 1.0, (1, c, h, w), &dev).unwrap();
        let want = (candle_nn::ops::pixel_shuffle(&conv, s).unwrap()
            + base.upsample_nearest2d(h * s, w * s).unwrap())
        .unwrap();
        let last: Vec<f32> = conv
            .permute((0, 2, 3, 1))
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let base: Vec<f32> = base.flatten_all().unwrap().to_vec1().unwrap();
        let mut got = vec![0.0; c * h * s * w * s];
        shuffle_add_base(&last, &base, c, h, w, s, &mut got);
        let want: Vec<f32> = want.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(got, want);
    }
}
