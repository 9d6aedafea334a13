use super::*;
use image::{ImageBuffer, Luma, Rgb, RgbImage};

fn png(img: &DynamicImage) -> Vec<u8> {
    encode(img, OutputFormat::Png).unwrap()
}

/// A JPEG whose EXIF says "rotate 90 degrees clockwise to display" (orientation 6).
fn jpeg_with_orientation_6(img: &RgbImage) -> Vec<u8> {
    let jpeg = encode(
        &DynamicImage::ImageRgb8(img.clone()),
        OutputFormat::Jpeg(95),
    )
    .unwrap();
    let mut tiff = b"II*\0".to_vec();
    tiff.extend(8u32.to_le_bytes()); // first IFD offset
    tiff.extend(1u16.to_le_bytes()); // one entry
    tiff.extend(0x0112u16.to_le_bytes()); // Orientation
    tiff.extend(3u16.to_le_bytes()); // SHORT
    tiff.extend(1u32.to_le_bytes());
    tiff.extend(6u16.to_le_bytes());
    tiff.extend([0, 0]);
    tiff.extend(0u32.to_le_bytes()); // no next IFD
    let mut app1 = b"Exif\0\0".to_vec();
    app1.extend(tiff);
    let mut out = jpeg[..2].to_vec(); // SOI
    out.extend([0xFF, 0xE1]);
    out.extend(((app1.len() + 2) as u16).to_be_bytes());
    out.extend(app1);
    out.extend(&jpeg[2..]);
    out
}

#[test]
fn exif_orientation_is_applied() {
    // 16 wide x 8 high: left half red, right half blue.
    let img = RgbImage::from_fn(16, 8, |x, _| {
        if x < 8 {
            Rgb([255, 0, 0])
        } else {
            Rgb([0, 0, 255])
        }
    });
    let decoded = decode(&jpeg_with_orientation_6(&img), DEFAULT_MAX_PIXELS)
        .unwrap()
        .to_rgb8();
    // Turned a quarter clockwise: the left (red) column is now the top row.
    assert_eq!(decoded.dimensions(), (8, 16));
    let top = decoded.get_pixel(4, 2).0;
    let bottom = decoded.get_pixel(4, 13).0;
    assert!(
        top[0] > 200 && top[2] < 60,
        "top should be red, got {top:?}"
    );
    assert!(
        bottom[2] > 200 && bottom[0] < 60,
        "bottom should be blue, got {bottom:?}"
    );
}

#[test]
fn pixel_limit_is_enforced_from_the_header() {
    let img = DynamicImage::ImageRgb8(RgbImage::new(100, 50));
    let bytes = png(&img);
    assert!(decode(&bytes, 5000).is_ok());
    let err = decode(&bytes, 4999).unwrap_err();
    assert!(
        matches!(
            err,
            ImagingError::TooLarge {
                width: 100,
                height: 50,
                limit: 4999
            }
        ),
        "{err}"
    );
    // A header announcing a huge image with no pixel data behind it is refused from the
    // header alone, not with a decode error after allocating.
    let mut huge = bytes.clone();
    huge[16..20].copy_from_slice(&60000u32.to_be_bytes()); // IHDR width
    huge[20..24].copy_from_slice(&60000u32.to_be_bytes()); // IHDR height
    let crc = crc32fast::hash(&huge[12..29]); // chunk type + data
    huge[29..33].copy_from_slice(&crc.to_be_bytes());
    let err = probe(&huge, DEFAULT_MAX_PIXELS).unwrap_err();
    assert!(
        matches!(
            err,
            ImagingError::TooLarge {
                width: 60000,
                height: 60000,
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn corrupt_and_truncated_files_are_clear_errors() {
    let bytes = png(&DynamicImage::ImageRgb8(RgbImage::from_fn(
        32,
        32,
        |x, y| Rgb([x as u8, y as u8, 7]),
    )));
    let err = decode(&bytes[..bytes.len() / 2], DEFAULT_MAX_PIXELS).unwrap_err();
    assert!(matches!(err, ImagingError::Decode(_)), "{err}");
    assert!(!err.to_string().contains('\n'));
    let err = decode(b"GIF89a not supported", DEFAULT_MAX_PIXELS).unwrap_err();
    assert!(matches!(err, ImagingError::UnsupportedFormat), "{err}");
    let err = decode(b"", DEFAULT_MAX_PIXELS).unwrap_err();
    assert!(matches!(err, ImagingError::UnsupportedFormat), "{err}");
    let mut garbage = bytes[..40].to_vec();
    garbage.extend([0xAB; 200]);
    assert!(decode(&garbage, DEFAULT_MAX_PIXELS).is_err());
}

#[test]
fn planes_keep_depth_mode_and_exact_values() {
    let gray16 = ImageBuffer::<Luma<u16>, _>::from_fn(3, 2, |x, y| Luma([(x * 20000 + y) as u16]));
    let p = Planes::from_image(&DynamicImage::ImageLuma16(gray16));
    assert_eq!((p.mode, p.depth), (ColorMode::Gray, Depth::Sixteen));
    assert_eq!(p.rgb[2], 40000.0 / 65535.0);
    assert_eq!(p.rgb[6 + 2], 40000.0 / 65535.0, "gray replicated to G");

    let rgb8 = RgbImage::from_fn(2, 1, |x, _| Rgb([x as u8 * 255, 128, 1]));
    let p = Planes::from_image(&DynamicImage::ImageRgb8(rgb8));
    assert_eq!((p.mode, p.depth), (ColorMode::Rgb, Depth::Eight));
    assert_eq!(
        p.rgb,
        vec![
            0.0,
            1.0,
            128.0 / 255.0,
            128.0 / 255.0,
            1.0 / 255.0,
            1.0 / 255.0
        ]
    );
    assert!(p.alpha.is_none());
}

#[test]
fn writer_rounds_half_to_even_clamps_and_reduces_gray() {
    let mut w = PixelWriter::new(2, 1, ColorMode::Gray, Depth::Eight);
    // Equal channels reduce to themselves; 2.5/255 rounds to 2 (half to even); >1 clamps.
    w.put_tile(
        0,
        0,
        2,
        1,
        &[2.5 / 255.0, 1.5, 2.5 / 255.0, 1.5, 2.5 / 255.0, 1.5],
        false,
    );
    assert_eq!(w.finish().to_luma8().into_raw(), vec![2, 255]);

    let mut w = PixelWriter::new(1, 1, ColorMode::Rgba, Depth::Sixteen);
    w.put_tile(0, 0, 1, 1, &[1.0, 0.0, -0.5], false);
    w.put_tile(0, 0, 1, 1, &[1.0, 0.0, 0.0], true);
    let px = w.finish().to_rgba16().into_raw();
    assert_eq!(px, vec![65535, 0, 0, (0.299f32 * 65535.0).round() as u16]);
}

#[test]
fn jpeg_output_refuses_alpha_and_keeps_16_bit_png() {
    let rgba = DynamicImage::ImageRgba8(image::RgbaImage::new(4, 4));
    assert!(matches!(
        encode(&rgba, OutputFormat::Jpeg(90)),
        Err(ImagingError::Unsupported(_))
    ));
    let rgb16 =
        DynamicImage::ImageRgb16(ImageBuffer::from_pixel(4, 4, Rgb([1000u16, 2000, 65535])));
    let back = decode(&png(&rgb16), DEFAULT_MAX_PIXELS).unwrap();
    assert_eq!(back, rgb16);
    let jpg = encode(&rgb16, OutputFormat::Jpeg(90)).unwrap();
    assert_eq!(sniff_format(&jpg).unwrap(), ImageFormat::Jpeg);
}
