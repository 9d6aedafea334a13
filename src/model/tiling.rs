//! Tiled inference with the exact semantics of Real-ESRGAN's `RealESRGANer`:
//! `pre_pad` (reflect right/bottom), the reflect "mod pad" that 2x and 1x RRDBNet need,
//! `tile_process` (tiles of `tile` pixels read with `tile_pad` pixels of context, clamped at
//! the image edge, only the centre kept, no blending) and the final crop.
//!
//! Output tiles go to a sink as they are produced, so the caller never has to hold the whole
//! float output: memory stays bounded by one tile's working set plus what the sink keeps.

use std::ops::ControlFlow;

use candle_core::{Device, Tensor};

use super::{Arch, Model, ModelError, Stop};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TileOptions {
    /// Tile edge in input pixels; 0 runs the whole image at once.
    pub tile: usize,
    /// Context read around each tile, in input pixels.
    pub tile_pad: usize,
    /// Reflect padding added to the right and bottom before inference and cropped after.
    pub pre_pad: usize,
}

impl Default for TileOptions {
    fn default() -> Self {
        Self {
            tile: 0,
            tile_pad: 10,
            pre_pad: 0,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    pub done: usize,
    pub total: usize,
}

/// Where finished output tiles go. `x`/`y` are the tile's top-left corner in the final
/// (cropped) output; `tile` lies entirely inside the output.
pub trait TileSink {
    fn put(&mut self, x: usize, y: usize, tile: &TileView<'_>) -> Result<(), ModelError>;
}

/// A window of `(C, H, W)` f32 planes: a network's output, or the part of it a tile keeps.
#[derive(Debug, Clone, Copy)]
pub struct TileView<'a> {
    data: &'a [f32],
    channels: usize,
    height: usize,
    width: usize,
    /// Of the planes the window lies in.
    full_height: usize,
    full_width: usize,
    /// Top-left corner of the window.
    y: usize,
    x: usize,
}

impl<'a> TileView<'a> {
    /// All of `(channels, height, width)` planes.
    pub fn whole(data: &'a [f32], channels: usize, height: usize, width: usize) -> Self {
        assert_eq!(data.len(), channels * height * width, "planes' size");
        Self {
            data,
            channels,
            height,
            width,
            full_height: height,
            full_width: width,
            y: 0,
            x: 0,
        }
    }

    /// The `height x width` window at (`y`, `x`) of this one.
    pub fn crop(&self, y: usize, x: usize, height: usize, width: usize) -> Self {
        assert!(
            y + height <= self.height && x + width <= self.width,
            "crop inside"
        );
        Self {
            height,
            width,
            y: self.y + y,
            x: self.x + x,
            ..*self
        }
    }

    pub fn channels(&self) -> usize {
        self.channels
    }

    pub fn height(&self) -> usize {
        self.height
    }

    pub fn width(&self) -> usize {
        self.width
    }

    /// Row `row` of channel `c`: `width` values.
    pub fn row(&self, c: usize, row: usize) -> &'a [f32] {
        assert!(c < self.channels && row < self.height, "row inside");
        let at = (c * self.full_height + self.y + row) * self.full_width + self.x;
        &self.data[at..at + self.width]
    }

    /// A copy as a `(1, C, H, W)` tensor.
    pub fn to_tensor(&self, device: &Device) -> Result<Tensor, ModelError> {
        let mut data = Vec::with_capacity(self.channels * self.height * self.width);
        for c in 0..self.channels {
            for row in 0..self.height {
                data.extend_from_slice(self.row(c, row));
            }
        }
        Ok(Tensor::from_vec(
            data,
            (1, self.channels, self.height, self.width),
            device,
        )?)
    }
}

/// Size of the network input after `pre_pad` and the mod pad (RealESRGANer's, so that 2x
/// and 1x RRDBNet can pixel-unshuffle the input by `unshuffle`), for an `h` x `w` image.
fn padded_size(unshuffle: usize, h: usize, w: usize, pre_pad: usize) -> (usize, usize) {
    let up = |v: usize| (v + pre_pad).div_ceil(unshuffle) * unshuffle;
    (up(h), up(w))
}

/// Number of forward passes a run with `opts` makes on an `h` x `w` image, for a network
/// that pixel-unshuffles its input by `unshuffle` (see `Arch::unshuffle`).
pub fn tile_count(unshuffle: usize, h: usize, w: usize, opts: &TileOptions) -> usize {
    if opts.tile == 0 {
        return 1;
    }
    let (ph, pw) = padded_size(unshuffle, h, w, opts.pre_pad);
    ph.div_ceil(opts.tile) * pw.div_ceil(opts.tile)
}

/// A tile whose forward pass fits in `budget_bytes`, or 0 (no tiling) when the whole image
/// does. Tiles are multiples of 8 and at least 16 pixels.
///
/// The tile makes as few passes as the largest tile that fits, but no larger than those
/// passes need: a 1024-pixel side under a 704-pixel limit gets two tiles of 512, not 704
/// and a sliver of 320. The padded area computed is the same, and the working memory (which
/// each worker keeps, see `arena`) is sized by the largest tile, so it shrinks.
pub fn auto_tile(arch: &Arch, budget_bytes: u64, tile_pad: usize, h: usize, w: usize) -> usize {
    let per_px = arch.peak_bytes_per_input_pixel();
    if (h * w) as u64 * per_px <= budget_bytes {
        return 0;
    }
    let side = ((budget_bytes / per_px) as f64).sqrt() as usize;
    let largest = (side.saturating_sub(2 * tile_pad) / 8 * 8).max(16);
    // The same number of tiles along each side as `largest` gives, each as short as that
    // allows; `largest` is a multiple of 8, so rounding up stays within it.
    let even = |d: usize| d.div_ceil(d.div_ceil(largest).max(1));
    even(h).max(even(w)).next_multiple_of(8).clamp(16, largest)
}

/// Reflect-pads a `(1, C, H, W)` tensor on the bottom and right (PyTorch `F.pad(.., 'reflect')`).
fn reflect_pad_br(x: &Tensor, pad_h: usize, pad_w: usize) -> Result<Tensor, ModelError> {
    let (_, _, h, w) = x.dims4()?;
    if pad_h >= h.max(1) || pad_w >= w.max(1) {
        return Err(ModelError::Tiling(format!(
            "image of {w}x{h} is too small for a reflect padding of {pad_w}x{pad_h}"
        )));
    }
    let reflect = |n: usize, pad: usize| -> Vec<u32> {
        (0..n + pad)
            .map(|i| if i < n { i } else { 2 * (n - 1) - i } as u32)
            .collect()
    };
    let mut x = x.clone();
    if pad_h > 0 {
        let idx = Tensor::new(reflect(h, pad_h).as_slice(), x.device())?;
        x = x.index_select(&idx, 2)?;
    }
    if pad_w > 0 {
        let idx = Tensor::new(reflect(w, pad_w).as_slice(), x.device())?;
        x = x.index_select(&idx, 3)?;
    }
    Ok(x)
}

/// Runs `model` over `img` (`(1, 3, H, W)`, values in `[0, 1]`) tile by tile, handing each
/// output tile to `sink`. `on_progress` is told before the first tile and after each one;
/// returning `Break` stops the run between tiles with `ModelError::Cancelled`. `stop` is
/// asked between the layers of each pass (fast path) and ends the run the same way, without
/// waiting for the tile to finish.
pub fn run(
    model: &Model,
    img: &Tensor,
    opts: &TileOptions,
    sink: &mut dyn TileSink,
    on_progress: &mut dyn FnMut(Progress) -> ControlFlow<()>,
    stop: Stop<'_>,
) -> Result<(), ModelError> {
    let scale = model.scale();
    let unshuffle = model.spec().arch.unshuffle();
    let (_, _, h, w) = img.dims4()?;
    let (ph, pw) = padded_size(unshuffle, h, w, opts.pre_pad);
    let padded = reflect_pad_br(&img.to_device(model.device())?, ph - h, pw - w)?;
    let (out_h, out_w) = (h * scale, w * scale);
    let total = tile_count(unshuffle, h, w, opts);
    let mut report = |done: usize| match on_progress(Progress { done, total }) {
        ControlFlow::Continue(()) => Ok(()),
        ControlFlow::Break(()) => Err(ModelError::Cancelled),
    };
    report(0)?;

    // Time in the network alone, so the overhead around it can be measured (debug log).
    // (It includes handing the output to the sink, which reads it where the pass left it.)
    let mut network = std::time::Duration::ZERO;
    let mut forward = |x: &Tensor, f: &mut dyn FnMut(TileView<'_>) -> Result<(), ModelError>| {
        let start = std::time::Instant::now();
        let out = model.forward_until(x, stop, f);
        network += start.elapsed();
        out
    };
    let started = std::time::Instant::now();
    let log_split = |network: std::time::Duration| {
        tracing::debug!(
            passes = total,
            network_s = network.as_secs_f64(),
            total_s = started.elapsed().as_secs_f64(),
            "tiled run finished"
        );
    };

    if opts.tile == 0 {
        forward(&padded, &mut |out| {
            sink.put(0, 0, &out.crop(0, 0, out_h, out_w))
        })?;
        report(1)?;
        log_split(network);
        return Ok(());
    }
    if !opts.tile.is_multiple_of(unshuffle) {
        return Err(ModelError::Tiling(format!(
            "tile {} must be a multiple of {unshuffle} for a model that pixel-unshuffles \
             its input by {unshuffle}",
            opts.tile,
        )));
    }

    let (t, pad) = (opts.tile, opts.tile_pad);
    let mut done = 0;
    for y0 in (0..ph).step_by(t) {
        for x0 in (0..pw).step_by(t) {
            let (y1, x1) = ((y0 + t).min(ph), (x0 + t).min(pw));
            let (py0, px0) = (y0.saturating_sub(pad), x0.saturating_sub(pad));
            let (py1, px1) = ((y1 + pad).min(ph), (x1 + pad).min(pw));
            let input = padded
                .narrow(2, py0, py1 - py0)?
                .narrow(3, px0, px1 - px0)?
                .contiguous()?;
            // The centre of the tile, clipped to the final output (pre/mod pad is dropped).
            let (oy, ox) = (y0 * scale, x0 * scale);
            let (oh, ow) = ((y1 - y0) * scale, (x1 - x0) * scale);
            let (oh, ow) = (
                oh.min(out_h.saturating_sub(oy)),
                ow.min(out_w.saturating_sub(ox)),
            );
            forward(&input, &mut |out| {
                if oh > 0 && ow > 0 {
                    let centre = out.crop((y0 - py0) * scale, (x0 - px0) * scale, oh, ow);
                    sink.put(ox, oy, &centre)?;
                }
                Ok(())
            })?;
            done += 1;
            report(done)?;
        }
    }
    log_split(network);
    Ok(())
}

/// A sink that assembles the whole output as one `(C, H, W)` f32 buffer on the CPU.
pub struct AssembleSink {
    channels: usize,
    height: usize,
    width: usize,
    data: Vec<f32>,
}

impl AssembleSink {
    pub fn new(channels: usize, height: usize, width: usize) -> Self {
        Self {
            channels,
            height,
            width,
            data: vec![0.0; channels * height * width],
        }
    }

    pub fn into_tensor(self) -> Result<Tensor, ModelError> {
        Ok(Tensor::from_vec(
            self.data,
            (1, self.channels, self.height, self.width),
            &Device::Cpu,
        )?)
    }
}

impl TileSink for AssembleSink {
    fn put(&mut self, x: usize, y: usize, tile: &TileView<'_>) -> Result<(), ModelError> {
        let w = tile.width();
        for ch in 0..tile.channels().min(self.channels) {
            for row in 0..tile.height() {
                let dst = (ch * self.height + y + row) * self.width + x;
                self.data[dst..dst + w].copy_from_slice(tile.row(ch, row));
            }
        }
        Ok(())
    }
}

/// Runs the model and returns the whole `(1, 3, H*s, W*s)` output (unclamped).
pub fn run_to_tensor(
    model: &Model,
    img: &Tensor,
    opts: &TileOptions,
) -> Result<Tensor, ModelError> {
    let (_, c, h, w) = img.dims4()?;
    let s = model.scale();
    let mut sink = AssembleSink::new(c, h * s, w * s);
    run(
        model,
        img,
        opts,
        &mut sink,
        &mut |_| ControlFlow::Continue(()),
        &|| false,
    )?;
    sink.into_tensor()
}
