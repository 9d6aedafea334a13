//! Image decoding, encoding and pixel conversions for the upscaler.
//!
//! Knows the image crates only: nothing here runs a network or touches storage. Decoding
//! checks the pixel limit from the header before any pixel is decoded and applies the EXIF
//! orientation, so what the network sees is what a viewer shows.

mod encode;
mod planes;

use std::io::{BufRead, Cursor, Read, Seek};

use image::{DynamicImage, ImageDecoder, ImageFormat, ImageReader, Limits};

pub use encode::{encode, ensure_encodable, OutputFormat};
pub use planes::{
    resize_plane_bilinear, ColorMode, Depth, PixelWriter, Planes, Target, GRAY_WEIGHTS,
};

/// Default input pixel limit: a 5000 x 5000 image.
pub const DEFAULT_MAX_PIXELS: u64 = 5000 * 5000;

#[derive(Debug, thiserror::Error)]
pub enum ImagingError {
    #[error("unsupported image format: expected PNG, JPEG or WebP")]
    UnsupportedFormat,
    #[error("image is {width}x{height} = {} pixels, over the limit of {limit} pixels", *width as u64 * *height as u64)]
    TooLarge { width: u32, height: u32, limit: u64 },
    #[error("image has no pixels")]
    Empty,
    #[error("cannot decode image: {0}")]
    Decode(String),
    #[error("cannot encode image: {0}")]
    Encode(String),
    #[error("{0}")]
    Unsupported(String),
}

impl ImagingError {
    fn decode(e: impl std::fmt::Display) -> Self {
        // One line: the image crate's messages may nest causes over several lines.
        Self::Decode(e.to_string().replace('\n', " "))
    }
}

/// What the header says, before any pixel is decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageInfo {
    pub format: ImageFormat,
    pub width: u32,
    pub height: u32,
}

/// The supported input format, from the magic bytes alone.
pub fn sniff_format(bytes: &[u8]) -> Result<ImageFormat, ImagingError> {
    match image::guess_format(bytes) {
        Ok(f @ (ImageFormat::Png | ImageFormat::Jpeg | ImageFormat::WebP)) => Ok(f),
        _ => Err(ImagingError::UnsupportedFormat),
    }
}

/// The format from the first bytes of `input`, which is rewound after.
fn sniff_from<R: BufRead + Seek>(input: &mut R) -> Result<ImageFormat, ImagingError> {
    let mut magic = Vec::with_capacity(32);
    input
        .by_ref()
        .take(32)
        .read_to_end(&mut magic)
        .map_err(ImagingError::decode)?;
    input.rewind().map_err(ImagingError::decode)?;
    sniff_format(&magic)
}

/// Reads the format and dimensions from the header and enforces the pixel limit.
pub fn probe(bytes: &[u8], max_pixels: u64) -> Result<ImageInfo, ImagingError> {
    probe_from(&mut Cursor::new(bytes), max_pixels)
}

/// `probe` on a reader, which is rewound after.
fn probe_from<R: BufRead + Seek>(
    input: &mut R,
    max_pixels: u64,
) -> Result<ImageInfo, ImagingError> {
    let format = sniff_from(input)?;
    let (width, height) = header_dimensions(input, format)?;
    input.rewind().map_err(ImagingError::decode)?;
    if width == 0 || height == 0 {
        return Err(ImagingError::Empty);
    }
    if width as u64 * height as u64 > max_pixels {
        return Err(ImagingError::TooLarge {
            width,
            height,
            limit: max_pixels,
        });
    }
    Ok(ImageInfo {
        format,
        width,
        height,
    })
}

/// The dimensions a header claims, read so that a large image is never mistaken for a
/// broken one.
fn header_dimensions<R: BufRead + Seek>(
    input: &mut R,
    format: ImageFormat,
) -> Result<(u32, u32), ImagingError> {
    if format == ImageFormat::Png {
        // The IHDR chunk alone. The image crate's PNG decoder reads on to the first IDAT
        // and reserves a row buffer under its memory limit first, so a header whose one row
        // is over the limit would be refused as "memory limit exceeded" rather than by its
        // size; the chunks after IHDR are read when the image is decoded.
        let mut decoder = png::Decoder::new(&mut *input);
        let info = decoder.read_header_info().map_err(ImagingError::decode)?;
        return Ok((info.width, info.height));
    }
    ImageReader::with_format(&mut *input, format)
        .into_dimensions()
        .map_err(ImagingError::decode)
}

/// Room for the largest supported layout (RGBA, 16 bits) of `max_pixels`, plus decoder
/// scratch.
fn memory_limits(max_pixels: u64) -> Limits {
    let mut limits = Limits::default();
    limits.max_alloc = Some(max_pixels.saturating_mul(8).saturating_add(64 << 20));
    limits
}

/// Decodes an image, refusing it from its header when it is over `max_pixels`, and applies
/// its EXIF orientation.
pub fn decode(bytes: &[u8], max_pixels: u64) -> Result<DynamicImage, ImagingError> {
    decode_from(Cursor::new(bytes), max_pixels)
}

/// `decode` from a reader (a buffered file, say), so the encoded bytes are never held whole.
pub fn decode_from<R: BufRead + Seek>(
    mut input: R,
    max_pixels: u64,
) -> Result<DynamicImage, ImagingError> {
    let info = probe_from(&mut input, max_pixels)?;
    let mut reader = ImageReader::with_format(input, info.format);
    let mut limits = memory_limits(max_pixels);
    limits.max_image_width = Some(info.width);
    limits.max_image_height = Some(info.height);
    reader.limits(limits);
    let mut decoder = reader.into_decoder().map_err(ImagingError::decode)?;
    let orientation = decoder.orientation().map_err(ImagingError::decode)?;
    let mut img = DynamicImage::from_decoder(decoder).map_err(ImagingError::decode)?;
    img.apply_orientation(orientation);
    Ok(img)
}

#[cfg(test)]
mod tests;

/// Resizes to exactly `width` x `height` with a Lanczos filter (a = 3), keeping the pixel type.
pub fn resize_lanczos(img: &DynamicImage, width: u32, height: u32) -> DynamicImage {
    img.resize_exact(width, height, image::imageops::FilterType::Lanczos3)
}
