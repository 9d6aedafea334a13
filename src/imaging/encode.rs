//! Encoding the upscaled image.

use std::io::Cursor;

use image::codecs::jpeg::JpegEncoder;
use image::codecs::png::{CompressionType, FilterType, PngEncoder};
use image::DynamicImage;

use super::ImagingError;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OutputFormat {
    #[default]
    Png,
    /// JPEG at the given quality (1-100); 8-bit, no alpha.
    Jpeg(u8),
}

impl OutputFormat {
    pub fn content_type(self) -> &'static str {
        match self {
            Self::Png => "image/png",
            Self::Jpeg(_) => "image/jpeg",
        }
    }

    pub fn extension(self) -> &'static str {
        match self {
            Self::Png => "png",
            Self::Jpeg(_) => "jpg",
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
            // JPEG is 8-bit only: 16-bit results are reduced with rounding.
            // 8-bit images are encoded as they are, not copied first.
            let reduced;
            let img8 = match img {
                DynamicImage::ImageLuma16(_) => {
                    reduced = DynamicImage::ImageLuma8(img.to_luma8());
                    &reduced
                }
                DynamicImage::ImageRgb16(_) => {
                    reduced = DynamicImage::ImageRgb8(img.to_rgb8());
                    &reduced
                }
                other => other,
            };
            let enc = JpegEncoder::new_with_quality(&mut out, quality.clamp(1, 100));
            img8.write_with_encoder(enc)
                .map_err(|e| ImagingError::Encode(e.to_string()))?;
        }
    }
    Ok(out.into_inner())
}
