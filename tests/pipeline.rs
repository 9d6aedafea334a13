//! Pipeline behaviour a user would notice: tiling, padding, gray, alpha, 16-bit, outscale,
//! progress, cancellation and the pixel limit.

mod common;

use std::ops::ControlFlow;

use candle_core::{Device, Tensor};
use image::{DynamicImage, ImageBuffer, Luma, Rgb, RgbImage, Rgba, RgbaImage};
use upscaler::imaging::{self, ImagingError, OutputFormat};
use upscaler::model::tiling::{self, run_to_tensor};
use upscaler::model::{self, Isa, Model, ModelError, Network, Prepare, Progress, TileOptions};
use upscaler::pipeline::{
    enhance, enhance_bytes, enhance_until, AlphaMode, EnhanceOptions, PipelineError, TileSize,
};

const FAST: &str = "realesr-animevideov3";

fn go() -> impl FnMut(Progress) -> ControlFlow<()> {
    |_| ControlFlow::Continue(())
}

/// A deterministic, textured test picture.
fn picture(w: u32, h: u32) -> RgbImage {
    RgbImage::from_fn(w, h, |x, y| {
        Rgb([
            (x * 37 + y * 11) as u8,
            (x * x + 3 * y * y) as u8,
            ((x ^ y) * 29) as u8,
        ])
    })
}

fn input_tensor(img: &RgbImage) -> Tensor {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let mut data = vec![0f32; 3 * w * h];
    for (i, p) in img.pixels().enumerate() {
        for c in 0..3 {
            data[c * w * h + i] = p.0[c] as f32 / 255.0;
        }
    }
    Tensor::from_vec(data, (1, 3, h, w), &Device::Cpu).unwrap()
}

fn opts(tile: usize, tile_pad: usize, pre_pad: usize) -> EnhanceOptions {
    EnhanceOptions {
        tile: TileSize::Fixed(tile),
        tile_pad,
        pre_pad,
        ..Default::default()
    }
}

/// A registry architecture with small random weights (for shapes the shipped files lack).
fn random_model(name: &str) -> Model {
    let spec = model::find(name).unwrap().clone();
    let tensors = spec
        .arch
        .tensor_layout()
        .unwrap()
        .into_iter()
        .map(|(n, s)| (n, Tensor::randn(0f32, 0.02, s, &Device::Cpu).unwrap()))
        .collect();
    let vb = candle_nn::VarBuilder::from_tensors(tensors, candle_core::DType::F32, &Device::Cpu);
    let net = Network::new(&spec.arch, vb).unwrap();
    Model::new(spec, net, Device::Cpu).unwrap()
}

#[test]
fn tiles_with_enough_context_reproduce_the_whole_image() {
    // SRVGGNetCompact sees 18 pixels around each pixel: a pad of 20 hides every seam.
    let model = common::model(FAST);
    let x = input_tensor(&picture(45, 30));
    let whole = run_to_tensor(
        &model,
        &x,
        &TileOptions {
            tile: 0,
            tile_pad: 0,
            pre_pad: 0,
        },
    )
    .unwrap();
    let tiled = run_to_tensor(
        &model,
        &x,
        &TileOptions {
            tile: 16,
            tile_pad: 20,
            pre_pad: 0,
        },
    )
    .unwrap();
    assert_eq!(whole.dims(), &[1, 3, 120, 180]);
    assert!(common::max_abs_diff(&whole, &tiled) < 1e-4);
    // Without context the seams show: the test can tell tiling apart.
    let seamy = run_to_tensor(
        &model,
        &x,
        &TileOptions {
            tile: 16,
            tile_pad: 0,
            pre_pad: 0,
        },
    )
    .unwrap();
    assert!(common::max_abs_diff(&whole, &seamy) > 1e-3);
}

#[test]
fn x2_rrdbnet_unshuffles_and_tiles_consistently() {
    let model = random_model("realesrgan-x2plus");
    // Odd sizes exercise the reflect "mod pad" the pixel unshuffle needs.
    let x = input_tensor(&picture(13, 9));
    let whole = run_to_tensor(&model, &x, &TileOptions::default()).unwrap();
    assert_eq!(whole.dims(), &[1, 3, 18, 26]);
    let tiled = run_to_tensor(
        &model,
        &x,
        &TileOptions {
            tile: 4,
            tile_pad: 16,
            pre_pad: 0,
        },
    )
    .unwrap();
    assert!(common::max_abs_diff(&whole, &tiled) < 1e-4);
    let err = run_to_tensor(
        &model,
        &x,
        &TileOptions {
            tile: 5,
            tile_pad: 2,
            pre_pad: 0,
        },
    )
    .unwrap_err();
    assert!(matches!(err, ModelError::Tiling(_)), "{err}");
}

#[test]
fn pre_pad_keeps_the_size_and_only_touches_the_far_edges() {
    let model = common::model(FAST);
    let x = input_tensor(&picture(40, 32));
    let plain = run_to_tensor(&model, &x, &TileOptions::default()).unwrap();
    let padded = run_to_tensor(
        &model,
        &x,
        &TileOptions {
            tile: 0,
            tile_pad: 0,
            pre_pad: 6,
        },
    )
    .unwrap();
    assert_eq!(plain.dims(), padded.dims());
    // Away from the right and bottom edges (18 px of receptive field, x4) nothing changes...
    let crop = |t: &Tensor| {
        t.narrow(2, 0, 4 * (32 - 19))
            .unwrap()
            .narrow(3, 0, 4 * (40 - 19))
            .unwrap()
    };
    assert!(common::max_abs_diff(&crop(&plain), &crop(&padded)) < 1e-4);
    // ...while the edges do see the reflected context.
    assert!(common::max_abs_diff(&plain, &padded) > 1e-4);
    // A pad as large as the image cannot be reflected.
    let err = run_to_tensor(
        &model,
        &x,
        &TileOptions {
            tile: 0,
            tile_pad: 0,
            pre_pad: 32,
        },
    )
    .unwrap_err();
    assert!(matches!(err, ModelError::Tiling(_)), "{err}");
}

#[test]
fn gray_stays_gray_and_matches_the_luma_of_the_rgb_result() {
    let model = common::model(FAST);
    let gray = ImageBuffer::<Luma<u8>, _>::from_fn(24, 20, |x, y| Luma([(x * 9 + y * 5) as u8]));
    let rgb = DynamicImage::ImageLuma8(gray.clone()).to_rgb8();
    let out_gray = enhance(
        &model,
        &DynamicImage::ImageLuma8(gray),
        &opts(0, 0, 0),
        &mut go(),
    )
    .unwrap();
    let out_rgb = enhance(
        &model,
        &DynamicImage::ImageRgb8(rgb),
        &opts(0, 0, 0),
        &mut go(),
    )
    .unwrap();
    assert!(matches!(out_gray, DynamicImage::ImageLuma8(_)));
    assert_eq!((out_gray.width(), out_gray.height()), (96, 80));
    let luma: Vec<u8> = out_rgb
        .to_rgb8()
        .pixels()
        .map(|p| {
            (0.299 * p.0[0] as f32 + 0.587 * p.0[1] as f32 + 0.114 * p.0[2] as f32).round() as u8
        })
        .collect();
    let (max, _) = common::compare(out_gray.as_bytes(), &luma);
    assert!(
        max <= 1,
        "gray differs from the luma of the RGB result by {max}"
    );
}

#[test]
fn rgba_keeps_alpha_with_either_alpha_mode() {
    let model = common::model(FAST);
    let rgb = picture(20, 16);
    let rgba = RgbaImage::from_fn(20, 16, |x, y| {
        let p = rgb.get_pixel(x, y).0;
        Rgba([p[0], p[1], p[2], 128])
    });
    let rgba = DynamicImage::ImageRgba8(rgba);
    let colour_only = enhance(
        &model,
        &DynamicImage::ImageRgb8(rgb),
        &opts(0, 0, 0),
        &mut go(),
    )
    .unwrap();

    let bilinear = EnhanceOptions {
        alpha: AlphaMode::Bilinear,
        ..opts(0, 0, 0)
    };
    let out = enhance(&model, &rgba, &bilinear, &mut go())
        .unwrap()
        .to_rgba8();
    assert!(
        out.pixels().all(|p| p.0[3] == 128),
        "constant alpha stays constant"
    );
    let rgb_of_out: Vec<u8> = out
        .pixels()
        .flat_map(|p| [p.0[0], p.0[1], p.0[2]])
        .collect();
    assert_eq!(
        rgb_of_out,
        colour_only.as_bytes(),
        "alpha must not change the colours"
    );

    let mut passes = Vec::new();
    let out = enhance(&model, &rgba, &opts(0, 0, 0), &mut |p| {
        passes.push(p);
        ControlFlow::Continue(())
    })
    .unwrap();
    assert!(matches!(out, DynamicImage::ImageRgba8(_)));
    assert_eq!(
        passes.last(),
        Some(&Progress { done: 2, total: 2 }),
        "alpha is a second pass"
    );
    let alpha: Vec<u8> = out.to_rgba8().pixels().map(|p| p.0[3]).collect();
    let mean = alpha.iter().map(|&a| a as f64).sum::<f64>() / alpha.len() as f64;
    assert!(
        (mean - 128.0).abs() < 8.0,
        "network alpha of a flat 128 plane averaged {mean}"
    );
}

#[test]
fn sixteen_bit_input_gives_sixteen_bit_output() {
    let model = common::model(FAST);
    let rgb8 = picture(20, 12);
    let rgb16 = ImageBuffer::<Rgb<u16>, _>::from_fn(20, 12, |x, y| {
        let p = rgb8.get_pixel(x, y).0;
        Rgb([p[0] as u16 * 257, p[1] as u16 * 257, p[2] as u16 * 257])
    });
    let out16 = enhance(
        &model,
        &DynamicImage::ImageRgb16(rgb16),
        &opts(0, 0, 0),
        &mut go(),
    )
    .unwrap();
    let out8 = enhance(
        &model,
        &DynamicImage::ImageRgb8(rgb8),
        &opts(0, 0, 0),
        &mut go(),
    )
    .unwrap();
    let DynamicImage::ImageRgb16(out16) = out16 else {
        panic!("expected 16-bit RGB output")
    };
    // Same network result, finer quantisation: values agree to within one 8-bit step.
    let down: Vec<u8> = out16
        .as_raw()
        .iter()
        .map(|&v| (v as f32 / 257.0).round() as u8)
        .collect();
    let (max, _) = common::compare(&down, out8.as_bytes());
    assert!(max <= 1);
    assert!(
        out16.as_raw().iter().any(|&v| v % 257 != 0),
        "16-bit output uses the extra precision"
    );
    // And it survives PNG encoding as 16-bit.
    let png = imaging::encode(&DynamicImage::ImageRgb16(out16.clone()), OutputFormat::Png).unwrap();
    let back = imaging::decode(&png, imaging::DEFAULT_MAX_PIXELS).unwrap();
    assert_eq!(back, DynamicImage::ImageRgb16(out16));
}

#[test]
fn outscale_resizes_the_network_output() {
    let model = common::model(FAST);
    let img = DynamicImage::ImageRgb8(picture(21, 10));
    let size = |outscale| {
        let o = EnhanceOptions {
            outscale: Some(outscale),
            ..opts(0, 0, 0)
        };
        let out = enhance(&model, &img, &o, &mut go()).unwrap();
        (out.width(), out.height())
    };
    assert_eq!(size(2.0), (42, 20));
    assert_eq!(size(3.5), (73, 35)); // int(21 * 3.5) = 73, as Real-ESRGAN truncates
    assert_eq!(size(4.0), (84, 40));
    let bad = EnhanceOptions {
        outscale: Some(0.0),
        ..opts(0, 0, 0)
    };
    assert!(matches!(
        enhance(&model, &img, &bad, &mut go()),
        Err(PipelineError::InvalidOption(_))
    ));
}

#[test]
fn progress_counts_tiles_and_cancellation_stops_between_tiles() {
    let model = common::model(FAST);
    let img = DynamicImage::ImageRgb8(picture(40, 24));
    let mut seen = Vec::new();
    enhance(&model, &img, &opts(16, 4, 0), &mut |p| {
        seen.push(p);
        ControlFlow::Continue(())
    })
    .unwrap();
    let total = 3 * 2;
    let done: Vec<usize> = seen.iter().map(|p| p.done).collect();
    assert_eq!(done, (0..=total).collect::<Vec<_>>());
    assert!(seen.iter().all(|p| p.total == total));

    let mut calls = 0;
    let err = enhance(&model, &img, &opts(16, 4, 0), &mut |p| {
        calls += 1;
        if p.done >= 2 {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    })
    .unwrap_err();
    assert!(
        matches!(err, PipelineError::Model(ModelError::Cancelled)),
        "{err}"
    );
    assert_eq!(calls, 3, "no tile runs after the cancellation");
}

/// `stop` is asked between the layers of a pass, so a large tile is left part-way: on
/// x4plus, once per RRDB block and per stage after the trunk.
#[test]
fn a_stop_ends_a_pass_between_its_layers() {
    let img = DynamicImage::ImageRgb8(picture(24, 16));
    let whole = opts(0, 10, 0);
    for (name, asks_per_pass) in [("realesrgan-x4plus", 23 + 4), (FAST, 17)] {
        let model = common::model(name);
        let asked = std::cell::Cell::new(0);
        let count = || {
            asked.set(asked.get() + 1);
            false
        };
        enhance_until(&model, &img, &whole, &mut go(), &count).unwrap();
        assert_eq!(asked.get(), asks_per_pass, "{name}: asks in one pass");

        // Says stop at the 5th ask: the pass ends there, before its one tile is done.
        asked.set(0);
        let mut done = Vec::new();
        let stop_at_5 = || {
            asked.set(asked.get() + 1);
            asked.get() >= 5
        };
        let err = enhance_until(
            &model,
            &img,
            &whole,
            &mut |p| {
                done.push(p.done);
                ControlFlow::Continue(())
            },
            &stop_at_5,
        )
        .unwrap_err();
        assert!(
            matches!(err, PipelineError::Model(ModelError::Cancelled)),
            "{name}: {err}"
        );
        assert_eq!(asked.get(), 5, "{name}: nothing is asked after the stop");
        assert_eq!(done, [0], "{name}: no tile was finished");
    }
}

#[test]
fn automatic_tiles_fit_the_budget_and_match_the_whole_image() {
    let model = common::model(FAST);
    let arch = &model.spec().arch;
    assert_eq!(
        tiling::auto_tile(arch, 1 << 30, 10, 64, 64),
        0,
        "small images run whole"
    );
    let tile = tiling::auto_tile(arch, 4 << 20, 10, 500, 500);
    assert!(
        (16..500).contains(&tile) && tile.is_multiple_of(8),
        "tile {tile}"
    );
    let per_px = arch.peak_bytes_per_input_pixel();
    assert!(((tile + 20) * (tile + 20)) as u64 * per_px <= 4 << 20 || tile == 16);
    // 1 GiB allows 704-pixel tiles here (2 KB per pixel, 10 of padding). Tiles are as
    // short as the same number of passes allows: no 704 + 320 split of a 1024 side.
    assert_eq!(
        per_px, 2048,
        "the figures below assume animevideov3's estimate"
    );
    assert_eq!(
        tiling::auto_tile(arch, 1 << 30, 10, 2000, 1300),
        672,
        "3 x 672 >= 2000"
    );
    assert_eq!(tiling::auto_tile(arch, 1 << 30, 10, 1024, 1024), 512);
    assert_eq!(
        tiling::auto_tile(arch, 1 << 30, 10, 1024, 700),
        704,
        "one tile across 700"
    );
    assert_eq!(tiling::auto_tile(arch, 1 << 30, 10, 1400, 1400), 704);
    for (h, w) in [(1024, 1024), (1024, 700), (2000, 700), (1401, 999)] {
        let tile = tiling::auto_tile(arch, 1 << 30, 10, h, w);
        let passes = |t: usize| h.div_ceil(t) * w.div_ceil(t);
        assert_eq!(
            passes(tile),
            passes(704),
            "{h}x{w}: as few passes as 704 tiles"
        );
    }

    let img = DynamicImage::ImageRgb8(picture(48, 40));
    let auto = EnhanceOptions {
        tile: TileSize::Auto {
            memory_budget: 2 << 20,
        },
        tile_pad: 24,
        ..opts(0, 0, 0)
    };
    assert!(
        auto.tile_options(&model.spec().arch, 40, 48).tile > 0,
        "budget forces tiling"
    );
    let tiled = enhance(&model, &img, &auto, &mut go()).unwrap();
    let whole = enhance(&model, &img, &opts(0, 0, 0), &mut go()).unwrap();
    let (max, same) = common::compare(tiled.as_bytes(), whole.as_bytes());
    assert!(max <= 1 && same > 0.999, "max {max}, same {same}");
}

#[test]
fn bad_bytes_are_refused_before_inference() {
    let model = common::model(FAST);
    let png =
        imaging::encode(&DynamicImage::ImageRgb8(picture(30, 20)), OutputFormat::Png).unwrap();
    let small = EnhanceOptions {
        max_pixels: 599,
        ..opts(0, 0, 0)
    };
    let err = enhance_bytes(&model, &png, &small, OutputFormat::Png, &mut go()).unwrap_err();
    assert!(
        matches!(err, PipelineError::Imaging(ImagingError::TooLarge { .. })),
        "{err}"
    );
    let err = enhance_bytes(
        &model,
        &png[..png.len() - 20],
        &opts(0, 0, 0),
        OutputFormat::Png,
        &mut go(),
    )
    .unwrap_err();
    assert!(
        matches!(err, PipelineError::Imaging(ImagingError::Decode(_))),
        "{err}"
    );
    let rgba = imaging::encode(
        &DynamicImage::ImageRgba8(RgbaImage::new(8, 8)),
        OutputFormat::Png,
    )
    .unwrap();
    let mut ran = false;
    let err = enhance_bytes(
        &model,
        &rgba,
        &opts(0, 0, 0),
        OutputFormat::Jpeg(90),
        &mut |_| {
            ran = true;
            ControlFlow::Continue(())
        },
    )
    .unwrap_err();
    assert!(
        matches!(err, PipelineError::Imaging(ImagingError::Unsupported(_))),
        "{err}"
    );
    assert!(!ran, "refused before any tile ran");
}

/// The fast CPU path (Winograd, channels-last) against candle's own convolutions, on every
/// architecture: the shipped weights, random weights for the x2 and 32-conv shapes, and sizes
/// that are not multiples of the 6x6 Winograd output tile (even, for x2's pixel unshuffle).
#[test]
fn fast_path_matches_the_reference_networks() {
    let models = [
        (*common::model("realesrgan-x4plus")).clone(),
        (*common::model("realesrgan-x4plus-anime")).clone(),
        (*common::model(FAST)).clone(),
        random_model("realesrgan-x2plus"),
        random_model("realesr-general-x4v3"),
    ];
    for model in models {
        assert!(
            model.is_fast(),
            "{}: CPU models take the fast path",
            model.spec().name
        );
        let reference = model.reference();
        for (w, h) in [(6, 10), (14, 6)] {
            let x = input_tensor(&picture(w, h));
            let want = reference.forward(&x).unwrap();
            for isa in Isa::available() {
                let fast = model.with_isa(isa).unwrap().forward(&x).unwrap();
                let diff = common::max_abs_diff(&fast, &want);
                // Outputs are in [0, 1]; one 8-bit step is 0.0039.
                assert!(
                    diff < 2e-4,
                    "{} {w}x{h} on {isa:?}: fast and reference differ by {diff}",
                    model.spec().name
                );
            }
        }
    }
}

/// The fast path keeps its working memory between passes: a pass of a size seen before
/// grows nothing, a smaller one reuses it, and only a larger one adds memory.
#[test]
fn passes_reuse_their_working_memory() {
    let model = (*common::model(FAST))
        .clone()
        .with_isa(Isa::detect())
        .unwrap();
    assert_eq!(
        model.arena_bytes(),
        0,
        "a fresh model holds no working memory"
    );
    let pass = |w, h| model.forward(&input_tensor(&picture(w, h))).unwrap();
    let first = pass(24, 20);
    let held = model.arena_bytes();
    assert!(held > 0, "the pass's buffers are kept");
    let again = pass(24, 20);
    assert_eq!(model.arena_bytes(), held, "the same size reuses them");
    assert_eq!(
        common::max_abs_diff(&first, &again),
        0.0,
        "and leaves no trace in the result"
    );
    pass(12, 10);
    assert_eq!(model.arena_bytes(), held, "a smaller pass fits in them");
    pass(40, 36);
    assert!(model.arena_bytes() > held, "a larger pass grows them");
}

/// Weights put in the Winograd domain on every call (`Prepare::PerCall`, what `upscaler
/// upscale` uses for its one image) give the same bits as weights prepared once, on every
/// architecture and ISA path, with the models taking turns so each call finds the reused
/// buffer holding another convolution's weights.
#[test]
fn weights_prepared_per_call_give_the_same_pixels() {
    let models = [
        (*common::model("realesrgan-x4plus")).clone(),
        (*common::model(FAST)).clone(),
        random_model("realesrgan-x2plus"),
        random_model("realesr-general-x4v3"),
    ];
    let per_call: Vec<Model> = models
        .iter()
        .map(|m| {
            let (spec, net) = (m.spec().clone(), m.network().clone());
            Model::prepared(spec, net, Device::Cpu, Prepare::PerCall).unwrap()
        })
        .collect();
    let x = input_tensor(&picture(14, 10));
    for isa in Isa::available() {
        for round in 0..2 {
            for (once, per_call) in models.iter().zip(&per_call) {
                assert!(per_call.is_fast());
                let want = once.with_isa(isa).unwrap().forward(&x).unwrap();
                let got = per_call.with_isa(isa).unwrap().forward(&x).unwrap();
                assert_eq!(
                    common::max_abs_diff(&got, &want),
                    0.0,
                    "{} on {isa:?}, round {round}",
                    once.spec().name
                );
            }
        }
    }
}
