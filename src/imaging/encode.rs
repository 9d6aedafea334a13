//! Encoding the upscaled image.

use std::io::Cursor;

use image::codecs::jpeg::JpegEncoder;
use image::codecs::png::{CompressionType, FilterType, PngEncoder};
use image::codecs::webp::WebPEncoder;
use image::DynamicImage;

use super::ImagingError;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OutputFormat {
    #[default]
    Png,
    /// JPEG at the given quality (1-100); 8-bit, no alpha.
    Jpeg(u8),
    /// Lossless WebP; 8-bit, alpha kept.
    WebP,
}

impl OutputFormat {
    pub fn content_type(self) -> &'static str {
        match self {
            Self::Png => "image/png",
            Self::Jpeg(_) => "image/jpeg",
            Self::WebP => "image/webp",
        }
    }

    pub fn extension(self) -> &'static str {
        match self {
            Self::Png => "png",
            Self::Jpeg(_) => "jpg",
            Self::WebP => "webp",
        }
    }
}

/// Refuses a format that cannot hold the image, so callers can check before the costly work.
pub fn ensure_encodable(has_alpha: bool, format: OutputFormat) -> Result<(), ImagingError> {
    if has_alpha && matches!(format, OutputFormat::Jpeg(_)) {
        return Err(ImagingError::Unsupported(
            "JPEG cannot store transparency: ask for PNG output for images with alpha".into(),
        ));
    }
    Ok(())
}

pub fn encode(img: &DynamicImage, format: OutputFormat) -> Result<Vec<u8>, ImagingError> {
    let mut out = Cursor::new(Vec::new());
    match format {
        OutputFormat::Png => {
            let enc =
                PngEncoder::new_with_quality(&mut out, CompressionType::Fast, FilterType::Adaptive);
            img.write_with_encoder(enc)
                .map_err(|e| ImagingError::Encode(e.to_string()))?;
        }
        OutputFormat::Jpeg(quality) => {
            ensure_encodable(img.color().has_alpha(), format)?;
            let mut reduced = None;
            let enc = JpegEncoder::new_with_quality(&mut out, quality.clamp(1, 100));
            eight_bit(img, &mut reduced)
                .write_with_encoder(enc)
                .map_err(|e| ImagingError::Encode(e.to_string()))?;
        }
        OutputFormat::WebP => {
            let mut reduced = None;
            eight_bit(img, &mut reduced)
                .write_with_encoder(WebPEncoder::new_lossless(&mut out))
                .map_err(|e| ImagingError::Encode(e.to_string()))?;
        }
    }
    Ok(out.into_inner())
}

/// JPEG and WebP are 8-bit only: 16-bit and float images are reduced with rounding into
/// `reduced`; 8-bit images are used as they are, not copied first.
fn eight_bit<'a>(img: &'a DynamicImage, reduced: &'a mut Option<DynamicImage>) -> &'a DynamicImage {
    let converted = match img {
        DynamicImage::ImageLuma8(_)
        | DynamicImage::ImageLumaA8(_)
        | DynamicImage::ImageRgb8(_)
        | DynamicImage::ImageRgba8(_) => return img,
        DynamicImage::ImageLuma16(_) => DynamicImage::ImageLuma8(img.to_luma8()),
        DynamicImage::ImageLumaA16(_) => DynamicImage::ImageLumaA8(img.to_luma_alpha8()),
        other if other.color().has_alpha() => DynamicImage::ImageRgba8(img.to_rgba8()),
        _ => DynamicImage::ImageRgb8(img.to_rgb8()),
    };
    reduced.insert(converted)
}
