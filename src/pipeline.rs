//! `RealESRGANer.enhance` in Rust: decoded image -> float planes -> tiled network -> integer
//! image, with gray, alpha, 16-bit and `outscale` handled as Real-ESRGAN does.
//!
//! Joins `model` and `imaging`; knows nothing of files, the network or storage.

use std::ops::ControlFlow;

use candle_core::Tensor;
use image::DynamicImage;

use crate::imaging::{
    self, ColorMode, ImagingError, OutputFormat, PixelWriter, Planes, Target, GRAY_WEIGHTS,
};
use crate::model::tiling::{self, TileSink, TileView};
use crate::model::{Arch, Model, ModelError, Progress, Stop, TileOptions};

/// Default working-memory budget for one forward pass when the tile size is automatic.
pub const DEFAULT_TILE_MEMORY: u64 = 1 << 30;

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error(transparent)]
    Imaging(#[from] ImagingError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("invalid option: {0}")]
    InvalidOption(String),
}

impl From<candle_core::Error> for PipelineError {
    fn from(e: candle_core::Error) -> Self {
        Self::Model(ModelError::Candle(e))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TileSize {
    /// The largest tile that fits this many bytes of working memory (no tiling if the whole
    /// image fits).
    Auto { memory_budget: u64 },
    /// Tiles of this many input pixels; 0 runs the whole image at once.
    Fixed(usize),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AlphaMode {
    /// Replicate alpha to three channels and run it through the network (Real-ESRGAN's default).
    Network,
    /// Resize alpha bilinearly: faster, softer edges.
    Bilinear,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EnhanceOptions {
    pub tile: TileSize,
    pub tile_pad: usize,
    pub pre_pad: usize,
    /// Final scale relative to the input; `None` keeps the model's own scale.
    pub outscale: Option<f64>,
    pub alpha: AlphaMode,
    pub max_pixels: u64,
}

impl Default for EnhanceOptions {
    fn default() -> Self {
        Self {
            tile: TileSize::Auto {
                memory_budget: DEFAULT_TILE_MEMORY,
            },
            tile_pad: 10,
            pre_pad: 0,
            outscale: None,
            alpha: AlphaMode::Network,
            max_pixels: imaging::DEFAULT_MAX_PIXELS,
        }
    }
}

impl EnhanceOptions {
    /// The tiling a run on an `h` x `w` image will use.
    pub fn tile_options(&self, arch: &Arch, h: usize, w: usize) -> TileOptions {
        let tile = match self.tile {
            TileSize::Fixed(t) => t,
            TileSize::Auto { memory_budget } => tiling::auto_tile(
                arch,
                memory_budget,
                self.tile_pad,
                h + self.pre_pad,
                w + self.pre_pad,
            ),
        };
        TileOptions {
            tile,
            tile_pad: self.tile_pad,
            pre_pad: self.pre_pad,
        }
    }

    pub fn output_size(
        &self,
        scale: usize,
        w: usize,
        h: usize,
    ) -> Result<Option<(u32, u32)>, PipelineError> {
        let Some(s) = self.outscale else {
            return Ok(None);
        };
        if !(s.is_finite() && s > 0.0 && s <= 16.0) {
            return Err(PipelineError::InvalidOption(format!(
                "outscale {s} must be in (0, 16]"
            )));
        }
        if s == scale as f64 {
            return Ok(None);
        }
        // Truncation, as Real-ESRGAN's `int(w_input * outscale)`.
        let (nw, nh) = ((w as f64 * s) as u32, (h as f64 * s) as u32);
        if nw == 0 || nh == 0 {
            return Err(PipelineError::InvalidOption(format!(
                "outscale {s} makes a {w}x{h} image empty"
            )));
        }
        Ok(Some((nw, nh)))
    }
}

/// Forward passes `enhance` makes on a `w` x `h` image: the tiles of one pass, twice when
/// alpha goes through the network.
pub fn planned_passes(
    arch: &Arch,
    opts: &EnhanceOptions,
    w: usize,
    h: usize,
    has_alpha: bool,
) -> usize {
    let per_pass = tiling::tile_count(arch.unshuffle(), h, w, &opts.tile_options(arch, h, w));
    per_pass
        * if alpha_pass(arch, opts, has_alpha) {
            2
        } else {
            1
        }
}

/// Whether a 4-channel network takes alpha with the colour.
fn alpha_in_net(arch: &Arch) -> bool {
    arch.channels() == (4, 4)
}

/// Whether an image's alpha gets a network pass of its own (else it is resized, or goes
/// through a 4-channel network with the colour).
fn alpha_pass(arch: &Arch, opts: &EnhanceOptions, has_alpha: bool) -> bool {
    has_alpha && opts.alpha == AlphaMode::Network && !alpha_in_net(arch)
}

struct WriterSink<'a> {
    writer: &'a mut PixelWriter,
    target: Target,
}

impl TileSink for WriterSink<'_> {
    fn put(&mut self, x: usize, y: usize, tile: &TileView<'_>) -> Result<(), ModelError> {
        let (w, h) = (tile.width(), tile.height());
        self.writer.put_rows(
            x,
            y,
            w,
            h,
            tile.channels(),
            |c, row| tile.row(c, row),
            self.target,
        );
        Ok(())
    }
}

/// The colour mode of the output: the input's, but gray for a network that gives one
/// channel (a colour input's colour is gone), and with the input's alpha kept.
fn output_mode(input: ColorMode, net_out: usize) -> ColorMode {
    match (net_out, input.has_alpha()) {
        (1, false) => ColorMode::Gray,
        (1, true) => ColorMode::GrayAlpha,
        _ => input,
    }
}

/// The network's input planes, `(channels, h, w)`, from an image's: gray as the BT.601 luma
/// (exactly the gray value for a gray image), RGBA with opaque alpha when it has none.
fn network_input(planes: &Planes, channels: usize) -> Vec<f32> {
    let n = planes.width * planes.height;
    let rgb = &planes.rgb;
    match channels {
        1 if planes.mode.is_gray() => rgb[..n].to_vec(),
        1 => (0..n)
            .map(|i| {
                GRAY_WEIGHTS[0] * rgb[i]
                    + GRAY_WEIGHTS[1] * rgb[n + i]
                    + GRAY_WEIGHTS[2] * rgb[2 * n + i]
            })
            .collect(),
        4 => {
            let mut v = rgb.clone();
            match &planes.alpha {
                Some(a) => v.extend_from_slice(a),
                None => v.resize(4 * n, 1.0),
            }
            v
        }
        _ => rgb.clone(),
    }
}

/// Upscales a decoded image. `on_progress` sees every network pass (the alpha pass counts
/// too) and may cancel between tiles.
///
/// A 3-channel network gets RGB (gray replicated), a 1-channel one gray, a 4-channel one
/// RGBA. The alpha of an image goes through the network as its own pass (replicated to the
/// network's channels, as Real-ESRGAN does), or is resized bilinearly, except with a
/// 4-channel network, which takes it with the colour.
pub fn enhance(
    model: &Model,
    img: &DynamicImage,
    opts: &EnhanceOptions,
    on_progress: &mut dyn FnMut(Progress) -> ControlFlow<()>,
) -> Result<DynamicImage, PipelineError> {
    enhance_until(model, img, opts, on_progress, &|| false)
}

/// `enhance` that also ends (with `ModelError::Cancelled`) once `stop` says true, asked
/// between the layers of each pass: a cancelled task stops within a fraction of a tile.
pub fn enhance_until(
    model: &Model,
    img: &DynamicImage,
    opts: &EnhanceOptions,
    on_progress: &mut dyn FnMut(Progress) -> ControlFlow<()>,
    stop: Stop<'_>,
) -> Result<DynamicImage, PipelineError> {
    let scale = model.scale();
    let arch = &model.spec().arch;
    let (cin, cout) = arch.channels();
    let planes = Planes::from_image(img);
    let (w, h) = (planes.width, planes.height);
    let resize_to = opts.output_size(scale, w, h)?;
    let tiles = opts.tile_options(arch, h, w);
    let per_pass = tiling::tile_count(arch.unshuffle(), h, w, &tiles);
    let alpha_in_net = alpha_in_net(arch);
    let alpha_pass = alpha_pass(arch, opts, planes.alpha.is_some());
    let total = planned_passes(arch, opts, w, h, planes.alpha.is_some());

    let mode = output_mode(planes.mode, cout);
    let mut writer = PixelWriter::new(w * scale, h * scale, mode, planes.depth);
    let to_tensor = |data: Vec<f32>| Tensor::from_vec(data, (1, cin, h, w), model.device());
    let mut pass = |input: &Tensor, writer: &mut PixelWriter, target: Target, offset: usize| {
        let mut sink = WriterSink { writer, target };
        tiling::run(
            model,
            input,
            &tiles,
            &mut sink,
            &mut |p| {
                on_progress(Progress {
                    done: offset + p.done,
                    total,
                })
            },
            stop,
        )
    };
    let color = to_tensor(network_input(&planes, cin))?;
    let target = if alpha_in_net {
        Target::ColorAndAlpha
    } else {
        Target::Color
    };
    pass(&color, &mut writer, target, 0)?;
    drop(color);
    if let Some(alpha) = planes.alpha.filter(|_| !alpha_in_net) {
        if alpha_pass {
            let alpha_planes = to_tensor(alpha.repeat(cin))?;
            pass(&alpha_planes, &mut writer, Target::Alpha, per_pass)?;
        } else {
            writer.put_alpha_plane(&imaging::resize_plane_bilinear(
                &alpha,
                w,
                h,
                w * scale,
                h * scale,
            ));
        }
    }
    let out = writer.finish();
    Ok(match resize_to {
        Some((nw, nh)) => imaging::resize_lanczos(&out, nw, nh),
        None => out,
    })
}

/// Decodes `bytes`, upscales and encodes the result.
pub fn enhance_bytes(
    model: &Model,
    bytes: &[u8],
    opts: &EnhanceOptions,
    format: OutputFormat,
    on_progress: &mut dyn FnMut(Progress) -> ControlFlow<()>,
) -> Result<Vec<u8>, PipelineError> {
    let img = imaging::decode(bytes, opts.max_pixels)?;
    // Refuse before spending minutes on the network.
    imaging::ensure_encodable(img.color().has_alpha(), format)?;
    let out = enhance(model, &img, opts, on_progress)?;
    Ok(imaging::encode(&out, format)?)
}
