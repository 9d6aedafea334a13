//! Conversion between decoded images and the float planes the network works on, with the
//! colour handling of `RealESRGANer.enhance`: gray is replicated to RGB and reduced back with
//! BT.601 weights, alpha travels separately, 16-bit stays 16-bit.

use image::{DynamicImage, ImageBuffer, Luma, LumaA, Rgb, Rgba};

/// BT.601 luma weights (R, G, B), as OpenCV's `COLOR_BGR2GRAY`.
pub const GRAY_WEIGHTS: [f32; 3] = [0.299, 0.587, 0.114];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColorMode {
    Gray,
    GrayAlpha,
    Rgb,
    Rgba,
}

impl ColorMode {
    pub fn has_alpha(self) -> bool {
        matches!(self, Self::GrayAlpha | Self::Rgba)
    }

    pub fn is_gray(self) -> bool {
        matches!(self, Self::Gray | Self::GrayAlpha)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Depth {
    Eight,
    Sixteen,
}

impl Depth {
    pub fn max_value(self) -> f32 {
        match self {
            Self::Eight => 255.0,
            Self::Sixteen => 65535.0,
        }
    }
}

/// An image as planar floats in `[0, 1]`: `rgb` is `(3, H, W)` (gray replicated to three
/// planes), `alpha` is `(H, W)` when the image has one.
#[derive(Debug, Clone, PartialEq)]
pub struct Planes {
    pub width: usize,
    pub height: usize,
    pub mode: ColorMode,
    pub depth: Depth,
    pub rgb: Vec<f32>,
    pub alpha: Option<Vec<f32>>,
}

impl Planes {
    pub fn from_image(img: &DynamicImage) -> Self {
        let (width, height) = (img.width() as usize, img.height() as usize);
        let depth = match img {
            DynamicImage::ImageLuma16(_)
            | DynamicImage::ImageLumaA16(_)
            | DynamicImage::ImageRgb16(_)
            | DynamicImage::ImageRgba16(_) => Depth::Sixteen,
            _ => Depth::Eight,
        };
        let color = img.color();
        let mode = match (color.has_color(), color.has_alpha()) {
            (false, false) => ColorMode::Gray,
            (false, true) => ColorMode::GrayAlpha,
            (true, false) => ColorMode::Rgb,
            (true, true) => ColorMode::Rgba,
        };
        let n = width * height;
        let mut rgb = vec![0f32; 3 * n];
        let mut alpha = mode.has_alpha().then(|| vec![0f32; n]);
        let max = depth.max_value();
        // Going through 16-bit RGBA keeps 8-bit values exact (v * 257 / 65535 == v / 255).
        let px = img.to_rgba16();
        let scale = 65535.0 / max;
        for (i, p) in px.pixels().enumerate() {
            for c in 0..3 {
                rgb[c * n + i] = (p.0[c] as f32 / scale).round() / max;
            }
            if let Some(a) = alpha.as_mut() {
                a[i] = (p.0[3] as f32 / scale).round() / max;
            }
        }
        Self {
            width,
            height,
            mode,
            depth,
            rgb,
            alpha,
        }
    }
}

/// Which output channels a tile gives to `PixelWriter::put_rows`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// The colour (or gray) channels.
    Color,
    /// The alpha channel, from a pass of the alpha plane through the network.
    Alpha,
    /// Colour and, from a 4-channel network's fourth channel, alpha.
    ColorAndAlpha,
}

/// Collects network output tiles into the final integer image.
///
/// Values are clamped to `[0, 1]`, reduced to gray where the input was gray, and rounded half
/// to even as NumPy's `round` does: `round(clamp(v, 0, 1) * max)`.
pub struct PixelWriter {
    width: usize,
    height: usize,
    mode: ColorMode,
    depth: Depth,
    channels: usize,
    data: Samples,
}

/// The output samples at their final depth, so an 8-bit result costs one byte per sample.
enum Samples {
    U8(Vec<u8>),
    U16(Vec<u16>),
}

impl Samples {
    fn set(&mut self, i: usize, v: u16) {
        match self {
            Self::U8(d) => d[i] = v as u8,
            Self::U16(d) => d[i] = v,
        }
    }
}

impl PixelWriter {
    pub fn new(width: usize, height: usize, mode: ColorMode, depth: Depth) -> Self {
        let channels = match mode {
            ColorMode::Gray => 1,
            ColorMode::GrayAlpha => 2,
            ColorMode::Rgb => 3,
            ColorMode::Rgba => 4,
        };
        let n = width * height * channels;
        let data = match depth {
            Depth::Eight => Samples::U8(vec![0; n]),
            Depth::Sixteen => Samples::U16(vec![0; n]),
        };
        Self {
            width,
            height,
            mode,
            depth,
            channels,
            data,
        }
    }

    fn quantize(&self, v: f32) -> u16 {
        (v.clamp(0.0, 1.0) * self.depth.max_value()).round_ties_even() as u16
    }

    fn gray(r: f32, g: f32, b: f32) -> f32 {
        let c = |v: f32| v.clamp(0.0, 1.0);
        GRAY_WEIGHTS[0] * c(r) + GRAY_WEIGHTS[1] * c(g) + GRAY_WEIGHTS[2] * c(b)
    }

    /// Writes a `(3, h, w)` planar tile at `(x, y)`: the colour channels, or the alpha
    /// channel (reduced to gray) when `is_alpha`.
    pub fn put_tile(
        &mut self,
        x: usize,
        y: usize,
        w: usize,
        h: usize,
        planes: &[f32],
        is_alpha: bool,
    ) {
        assert_eq!(planes.len(), 3 * w * h, "tile is not (3, {h}, {w})");
        let row_of = |c: usize, row: usize| &planes[(c * h + row) * w..][..w];
        let target = if is_alpha {
            Target::Alpha
        } else {
            Target::Color
        };
        self.put_rows(x, y, w, h, 3, row_of, target);
    }

    /// Writes a planar tile of `channels` (1 gray, 3 RGB or 4 RGBA) read a row at a time:
    /// `rows(c, row)` gives the `w` values of channel `c` at `row`. Colour is reduced to
    /// gray, or gray replicated, as the output needs; `target` says which output channels
    /// the tile gives.
    #[allow(clippy::too_many_arguments)]
    pub fn put_rows<'a>(
        &mut self,
        x: usize,
        y: usize,
        w: usize,
        h: usize,
        channels: usize,
        rows: impl Fn(usize, usize) -> &'a [f32],
        target: Target,
    ) {
        assert!(
            matches!(channels, 1 | 3 | 4),
            "tiles have 1, 3 or 4 channels"
        );
        let alpha_at = self.channels - 1;
        for row in 0..h {
            let planes: [&[f32]; 4] = std::array::from_fn(|c| rows(c.min(channels - 1), row));
            assert!(planes.iter().all(|p| p.len() == w), "rows of {w}");
            for col in 0..w {
                let v: [f32; 4] = planes.map(|p| p[col]);
                // A gray tile's one value stands for all three colours.
                let (r, g, b) = if channels == 1 {
                    (v[0], v[0], v[0])
                } else {
                    (v[0], v[1], v[2])
                };
                let luma = || {
                    if channels == 1 {
                        v[0]
                    } else {
                        Self::gray(r, g, b)
                    }
                };
                let base = ((y + row) * self.width + x + col) * self.channels;
                if target == Target::Alpha {
                    let q = self.quantize(luma());
                    self.data.set(base + alpha_at, q);
                    continue;
                }
                if self.mode.is_gray() {
                    let q = self.quantize(luma());
                    self.data.set(base, q);
                } else {
                    for (c, v) in [r, g, b].into_iter().enumerate() {
                        let q = self.quantize(v);
                        self.data.set(base + c, q);
                    }
                }
                if target == Target::ColorAndAlpha && self.mode.has_alpha() {
                    let q = self.quantize(v[3]);
                    self.data.set(base + alpha_at, q);
                }
            }
        }
    }

    /// Writes an alpha plane that was upscaled outside the network (already full size).
    pub fn put_alpha_plane(&mut self, alpha: &[f32]) {
        assert_eq!(alpha.len(), self.width * self.height);
        for (i, a) in alpha.iter().enumerate() {
            let q = self.quantize(*a);
            self.data.set(i * self.channels + self.channels - 1, q);
        }
    }

    pub fn finish(self) -> DynamicImage {
        let (w, h) = (self.width as u32, self.height as u32);
        macro_rules! build {
            ($px:ident, $variant:ident, $ty:ty, $data:expr) => {
                DynamicImage::$variant(
                    ImageBuffer::<$px<$ty>, Vec<$ty>>::from_raw(w, h, $data)
                        .expect("sized at construction"),
                )
            };
        }
        match self.data {
            Samples::U8(d) => match self.mode {
                ColorMode::Gray => build!(Luma, ImageLuma8, u8, d),
                ColorMode::GrayAlpha => build!(LumaA, ImageLumaA8, u8, d),
                ColorMode::Rgb => build!(Rgb, ImageRgb8, u8, d),
                ColorMode::Rgba => build!(Rgba, ImageRgba8, u8, d),
            },
            Samples::U16(d) => match self.mode {
                ColorMode::Gray => build!(Luma, ImageLuma16, u16, d),
                ColorMode::GrayAlpha => build!(LumaA, ImageLumaA16, u16, d),
                ColorMode::Rgb => build!(Rgb, ImageRgb16, u16, d),
                ColorMode::Rgba => build!(Rgba, ImageRgba16, u16, d),
            },
        }
    }
}

/// Resizes one float plane bilinearly (the alpha path of `RealESRGANer` when alpha is not
/// run through the network).
pub fn resize_plane_bilinear(
    plane: &[f32],
    w: usize,
    h: usize,
    new_w: usize,
    new_h: usize,
) -> Vec<f32> {
    let buf = ImageBuffer::<Luma<f32>, Vec<f32>>::from_raw(w as u32, h as u32, plane.to_vec())
        .expect("plane matches its size");
    image::imageops::resize(
        &buf,
        new_w as u32,
        new_h as u32,
        image::imageops::FilterType::Triangle,
    )
    .into_raw()
}
