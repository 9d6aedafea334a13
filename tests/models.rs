//! Bring-your-own models: files of the models folder recognised from their weights alone, in
//! every ESRGAN-family layout, and run as PyTorch runs them.
//!
//! `tests/fixtures/models/` holds tiny networks that PyTorch itself saved (zip and legacy
//! formats, wrappers, prefixes, fp16/bf16; `scripts/make-model-fixtures.py`), each with an
//! input and PyTorch's output for it. The synthetic tests write random weights in each key
//! layout for many scales and channel counts and check the recognised configuration, the
//! same output whatever the layout, and the fast path against candle's convolutions.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use upscaler::model::catalog::{self, Catalog, Origin};
use upscaler::model::detect::Layout;
use upscaler::model::locate::WeightsDirs;
use upscaler::model::{rrdbnet, srvgg, weights, Arch, Prepare};

fn fixture(name: &str) -> PathBuf {
    common::fixture(&format!("models/{name}"))
}

/// What a fixture must be recognised as.
struct Expect {
    layout: &'static str,
    scale: usize,
    channels: usize,
    /// RRDBNet: unshuffle and ESRGAN+; SRVGGNetCompact: convolutions and activation.
    arch: Kind,
}

enum Kind {
    Rrdb { unshuffle: usize, plus: bool },
    Compact { convs: usize, act: srvgg::Act },
}

fn rrdb(
    layout: &'static str,
    scale: usize,
    channels: usize,
    unshuffle: usize,
    plus: bool,
) -> Expect {
    Expect {
        layout,
        scale,
        channels,
        arch: Kind::Rrdb { unshuffle, plus },
    }
}

fn compact(scale: usize, channels: usize, convs: usize, act: srvgg::Act) -> Expect {
    Expect {
        layout: "Compact",
        scale,
        channels,
        arch: Kind::Compact { convs, act },
    }
}

fn pytorch_fixtures() -> Vec<(&'static str, Expect)> {
    use srvgg::Act::*;
    vec![
        ("basicsr_x4_params_ema", rrdb("BasicSR", 4, 3, 1, false)),
        ("basicsr_x8_state_dict", rrdb("BasicSR", 8, 3, 1, false)),
        ("basicsr_x2_unshuffle_gray", rrdb("BasicSR", 2, 1, 2, false)),
        ("basicsr_x1_unshuffle_netg", rrdb("BasicSR", 1, 3, 4, false)),
        ("old_x4_legacy", rrdb("old ESRGAN", 4, 3, 1, false)),
        ("old_x2_fp16", rrdb("old ESRGAN", 2, 3, 1, false)),
        ("old_x1_rgba", rrdb("old ESRGAN", 1, 4, 1, false)),
        ("esrganplus_x4_legacy", rrdb("ESRGAN+", 4, 3, 1, true)),
        ("esrganplus_x8_zip", rrdb("ESRGAN+", 8, 3, 1, true)),
        (
            "trunk_x4_legacy",
            rrdb("ESRGAN 2019 / BSRGAN", 4, 3, 1, false),
        ),
        (
            "trunk_x2_gray",
            rrdb("ESRGAN 2019 / BSRGAN", 2, 1, 1, false),
        ),
        ("compact_x4_1conv", compact(4, 3, 1, PRelu)),
        ("compact_x2_3conv_legacy", compact(2, 3, 3, PRelu)),
        ("compact_x1_gray", compact(1, 1, 2, PRelu)),
        ("compact_x3_rgba_bf16", compact(3, 4, 2, PRelu)),
        ("compact_x2_relu", compact(2, 3, 2, Relu)),
        ("compact_x4_leakyrelu", compact(4, 3, 1, LeakyRelu)),
    ]
}

fn check_arch(name: &str, arch: &Arch, want: &Expect) {
    assert_eq!(arch.scale(), want.scale, "{name}: scale");
    assert_eq!(
        arch.channels(),
        (want.channels, want.channels),
        "{name}: channels"
    );
    match (arch, &want.arch) {
        (Arch::RrdbNet(c), Kind::Rrdb { unshuffle, plus }) => {
            assert_eq!(
                (c.num_feat, c.num_block, c.num_grow_ch),
                (8, 1, 4),
                "{name}: nf/nb/gc"
            );
            assert_eq!((c.unshuffle, c.plus), (*unshuffle, *plus), "{name}");
        }
        (Arch::SrVgg(c), Kind::Compact { convs, act }) => {
            assert_eq!((c.num_feat, c.num_conv, c.act), (8, *convs, *act), "{name}");
        }
        _ => panic!("{name}: recognised as {}", arch.name()),
    }
}

#[test]
fn pytorch_saved_models_are_recognised_and_match_pytorch() {
    for (name, want) in pytorch_fixtures() {
        let entry = catalog::recognise_file(name, &fixture(&format!("{name}.pth")))
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        check_arch(name, &entry.spec.arch, &want);
        match &entry.origin {
            Origin::Folder(layout) => assert_eq!(layout.name(), want.layout, "{name}"),
            other => panic!("{name}: {other:?}"),
        }
        let io = candle_core::safetensors::load(
            fixture(&format!("{name}.io.safetensors")),
            &Device::Cpu,
        )
        .unwrap();
        let model = entry.load(&Device::Cpu, Prepare::Once).unwrap();
        assert!(model.is_fast(), "{name}: runs on the fast path");
        let expected = &io["output"];
        let zeros = expected.zeros_like().unwrap();
        let scale = common::max_abs_diff(expected, &zeros).max(1.0);
        for (path, m) in [("fast", model.clone()), ("reference", model.reference())] {
            let got = m.forward(&io["input"]).unwrap();
            let diff = common::max_abs_diff(&got, expected);
            assert!(
                diff <= 2e-4 * scale,
                "{name} ({path}): max |ours - PyTorch| = {diff} (outputs up to {scale})"
            );
        }
    }
}

#[test]
fn files_that_cannot_be_used_are_refused_with_the_reason() {
    for (file, reason) in [
        ("refused_truncated_zip.pth", "truncated"),
        ("refused_truncated_legacy.pth", "truncated"),
        ("refused_not_a_state_dict.pth", "not a state dict"),
        ("refused_foreign_arch.pth", "unknown architecture"),
        ("refused_torchscript.pt", "TorchScript"),
        ("refused_compact_without_sidecar.pth", "sidecar"),
    ] {
        let err = catalog::recognise_file("m", &fixture(file)).unwrap_err();
        assert!(err.contains(reason), "{file}: {err}");
    }
}

#[test]
fn a_models_folder_lists_what_it_can_use_and_names_what_it_cannot() {
    let dir = tempfile::tempdir().unwrap();
    let copy = |from: &str, to: &str| {
        std::fs::copy(fixture(from), dir.path().join(to)).unwrap();
    };
    copy("old_x2_fp16.pth", "4x-Old.pth");
    copy("compact_x2_relu.pth", "compact.pth");
    copy("compact_x2_relu.json", "compact.json");
    copy("refused_foreign_arch.pth", "broken.pth");
    // A shipped model's name, and a second file for one stem.
    copy("compact_x4_1conv.pth", "realesr-animevideov3.pth");
    copy("compact_x4_1conv.pth", "compact.ckpt");
    std::fs::write(dir.path().join("notes.txt"), "not a model").unwrap();
    let weights = WeightsDirs::search(Some(&common::root().join("weights")));
    let found = Catalog::scan(&weights, Some(dir.path()));
    let names: Vec<&str> = found
        .entries()
        .iter()
        .map(|e| e.spec.name.as_str())
        .collect();
    assert!(names.contains(&"realesrgan-x4plus"), "{names:?}");
    assert!(names.contains(&"realesr-animevideov3-x3"), "{names:?}");
    let old = found.find("4x-Old").unwrap();
    assert_eq!(old.spec.arch.scale(), 2);
    assert!(old.parameters.unwrap() > 10_000, "{:?}", old.parameters);
    assert_eq!(
        found.find("compact").unwrap().spec.arch.name(),
        "SRVGGNetCompact"
    );
    let problems: Vec<String> = found.problems().iter().map(|p| p.to_string()).collect();
    assert_eq!(problems.len(), 3, "{problems:#?}");
    let has = |file: &str, why: &str| problems.iter().any(|p| p.contains(file) && p.contains(why));
    assert!(has("broken.pth", "unknown architecture"), "{problems:#?}");
    assert!(
        has("realesr-animevideov3.pth", "taken by the shipped model"),
        "{problems:#?}"
    );
    assert!(
        has("compact.ckpt", "already gives the model `compact`"),
        "{problems:#?}"
    );
    let err = found.find("nope").unwrap_err().to_string();
    assert!(err.contains("4x-Old") && err.contains("compact"), "{err}");
}

// ---------------------------------------------------------------- synthetic state dicts

/// Seeded values in [-0.15, 0.15): a small xorshift, so every run writes the same weights.
fn noise(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.3
        })
        .collect()
}

/// Random weights for `arch` under our (BasicSR) names.
fn random_weights(arch: &Arch, seed: u64) -> HashMap<String, Tensor> {
    arch.tensor_layout()
        .unwrap()
        .into_iter()
        .enumerate()
        .map(|(i, (name, shape))| {
            let n = shape.iter().product();
            let t = Tensor::from_vec(noise(n, seed + i as u64), shape, &Device::Cpu).unwrap();
            // Convolution weights as fp16, as checkpoints usually keep them.
            let t = if t.rank() == 4 {
                t.to_dtype(DType::F16).unwrap()
            } else {
                t
            };
            (name, t)
        })
        .collect()
}

/// A BasicSR key in another layout, as the trainers of those models wrote it.
fn in_layout(key: &str, layout: &Layout, nb: usize, ups: usize) -> String {
    let parts: Vec<&str> = key.split('.').collect();
    match layout {
        Layout::Old { .. } => match parts[0] {
            "conv_first" => format!("model.0.{}", parts[1]),
            "body" => {
                let rdb = format!("RDB{}", &parts[2][3..]);
                match parts[3] {
                    "conv1x1" => format!("model.1.sub.{}.{rdb}.conv1x1.{}", parts[1], parts[4]),
                    c => format!("model.1.sub.{}.{rdb}.{c}.0.{}", parts[1], parts[4]),
                }
            }
            "conv_body" => format!("model.1.sub.{nb}.{}", parts[1]),
            "conv_hr" => format!("model.{}.{}", 3 * ups + 2, parts[1]),
            "conv_last" => format!("model.{}.{}", 3 * ups + 4, parts[1]),
            up => format!(
                "model.{}.{}",
                3 * up[7..].parse::<usize>().unwrap(),
                parts[1]
            ),
        },
        Layout::Trunk => match parts[0] {
            "body" => format!(
                "RRDB_trunk.{}.RDB{}.{}",
                parts[1],
                &parts[2][3..],
                parts[3..].join(".")
            ),
            "conv_body" => format!("trunk_conv.{}", parts[1]),
            "conv_hr" => format!("HRconv.{}", parts[1]),
            up if up.starts_with("conv_up") => format!("upconv{}.{}", &up[7..], parts[1]),
            _ => key.to_string(),
        },
        Layout::BasicSr | Layout::Compact => key.to_string(),
    }
}

fn write(dir: &Path, name: &str, tensors: &HashMap<String, Tensor>) -> PathBuf {
    let path = dir.join(format!("{name}.safetensors"));
    weights::write_safetensors(tensors, &path).unwrap();
    path
}

fn input(channels: usize, h: usize, w: usize, seed: u64) -> Tensor {
    let v: Vec<f32> = noise(channels * h * w, seed)
        .iter()
        .map(|x| x + 0.5)
        .collect();
    Tensor::from_vec(v, (1, channels, h, w), &Device::Cpu).unwrap()
}

/// Recognises `tensors` written in `layout`, and returns its output for `x` on the fast
/// path, after checking the fast path against the reference.
fn run_in_layout(
    dir: &Path,
    name: &str,
    tensors: &HashMap<String, Tensor>,
    expected: &Arch,
    x: &Tensor,
) -> Tensor {
    let path = write(dir, name, tensors);
    let entry = catalog::recognise_file(name, &path).unwrap_or_else(|e| panic!("{name}: {e}"));
    assert_eq!(
        &entry.spec.arch, expected,
        "{name}: recognised configuration"
    );
    let model = entry.load(&Device::Cpu, Prepare::Once).unwrap();
    let fast = model.forward(x).unwrap();
    let reference = model.reference().forward(x).unwrap();
    let diff = common::max_abs_diff(&fast, &reference);
    assert!(
        diff < 2e-4,
        "{name}: fast path differs from the reference by {diff}"
    );
    fast
}

#[test]
fn rrdbnet_in_every_layout_scale_and_channel_count() {
    let dir = tempfile::tempdir().unwrap();
    let mut checked = 0;
    for scale in [1usize, 2, 4, 8] {
        for channels in [1usize, 3, 4] {
            // BasicSR makes 1x and 2x by unshuffling the input of a 4x network; the other
            // layouts by having fewer upsampling stages.
            let ups = scale.trailing_zeros() as usize;
            let basicsr_unshuffle: usize = match scale {
                1 => 4,
                2 => 2,
                _ => 1,
            };
            let layouts = [
                (Layout::BasicSr, false),
                (
                    Layout::Old {
                        upsample: ups,
                        trunk: 1,
                        plus: false,
                    },
                    false,
                ),
                (
                    Layout::Old {
                        upsample: ups,
                        trunk: 1,
                        plus: true,
                    },
                    true,
                ),
                (Layout::Trunk, false),
            ];
            let mut outputs = Vec::new();
            for (layout, plus) in layouts {
                let (unshuffle, num_upsample) = match layout {
                    Layout::BasicSr => (
                        basicsr_unshuffle,
                        ups + basicsr_unshuffle.trailing_zeros() as usize,
                    ),
                    _ => (1, ups),
                };
                let cfg = rrdbnet::Config {
                    num_in_ch: channels,
                    num_out_ch: channels,
                    num_feat: 8,
                    num_block: 1,
                    num_grow_ch: 4,
                    num_upsample,
                    unshuffle,
                    plus,
                };
                let arch = Arch::RrdbNet(cfg.clone());
                assert_eq!(arch.scale(), scale);
                let ours = random_weights(&arch, 7);
                let theirs: HashMap<String, Tensor> = ours
                    .iter()
                    .map(|(k, v)| (in_layout(k, &layout, 1, num_upsample), v.clone()))
                    .collect();
                let x = input(channels, 8, 12, 3);
                let name = format!(
                    "{}-x{scale}-c{channels}",
                    layout.name().replace([' ', '/', '+'], "_")
                );
                let out = run_in_layout(dir.path(), &format!("{name}-theirs"), &theirs, &arch, &x);
                assert_eq!(out.dims(), [1, channels, 8 * scale, 12 * scale], "{name}");
                // The same weights under our own names give exactly the same output.
                let same = run_in_layout(dir.path(), &format!("{name}-ours"), &ours, &arch, &x);
                assert_eq!(
                    common::max_abs_diff(&out, &same),
                    0.0,
                    "{name}: layouts disagree"
                );
                outputs.push((plus, num_upsample, out));
                checked += 1;
            }
            // Layouts of one configuration with the same weights are one network.
            let plain: Vec<&Tensor> = outputs
                .iter()
                .filter(|(plus, up, _)| !plus && *up == ups)
                .map(|(_, _, o)| o)
                .collect();
            assert_eq!(plain.len(), if basicsr_unshuffle == 1 { 3 } else { 2 });
            for other in &plain[1..] {
                assert_eq!(
                    common::max_abs_diff(plain[0], other),
                    0.0,
                    "x{scale} c{channels}"
                );
            }
        }
    }
    assert_eq!(checked, 48);
}

#[test]
fn srvgg_compact_with_one_to_three_convs_at_scales_one_to_four() {
    let dir = tempfile::tempdir().unwrap();
    for convs in 1..=3 {
        for scale in 1..=4 {
            for channels in [1, 3, 4] {
                let arch = Arch::SrVgg(srvgg::Config {
                    num_in_ch: channels,
                    num_out_ch: channels,
                    num_feat: 8,
                    num_conv: convs,
                    upscale: scale,
                    act: srvgg::Act::PRelu,
                });
                let x = input(channels, 7, 9, 11);
                let name = format!("compact-{convs}-x{scale}-c{channels}");
                let out = run_in_layout(dir.path(), &name, &random_weights(&arch, 5), &arch, &x);
                assert_eq!(out.dims(), [1, channels, 7 * scale, 9 * scale], "{name}");
            }
        }
    }
}

#[test]
fn impossible_layouts_are_refused_with_a_reason() {
    let dir = tempfile::tempdir().unwrap();
    let arch = Arch::RrdbNet(rrdbnet::Config {
        num_feat: 8,
        num_block: 2,
        num_grow_ch: 4,
        ..rrdbnet::Config::x4plus()
    });
    let ours = random_weights(&arch, 1);
    let old = Layout::Old {
        upsample: 2,
        trunk: 2,
        plus: false,
    };
    let theirs: HashMap<String, Tensor> = ours
        .iter()
        .map(|(k, v)| (in_layout(k, &old, 2, 2), v.clone()))
        .collect();
    // The HR conv moved to where no number of upsampling steps puts it.
    let mut shifted = theirs.clone();
    let hr = shifted.remove("model.8.weight").unwrap();
    shifted.insert("model.9.weight".into(), hr);
    let err = catalog::recognise_file("m", &write(dir.path(), "shifted", &shifted)).unwrap_err();
    assert!(err.contains("fits no number of upsampling steps"), "{err}");
    // A block missing from the middle of the trunk.
    let gap: HashMap<String, Tensor> = ours
        .iter()
        .filter(|(k, _)| !k.starts_with("body.0."))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let err = catalog::recognise_file("m", &write(dir.path(), "gap", &gap)).unwrap_err();
    assert!(err.contains("missing") || err.contains("numbered"), "{err}");
    // A 2-channel network has no image to run on.
    let two = Arch::SrVgg(srvgg::Config {
        num_in_ch: 2,
        num_out_ch: 2,
        num_feat: 8,
        num_conv: 1,
        upscale: 2,
        act: srvgg::Act::PRelu,
    });
    let err = catalog::recognise_file("m", &write(dir.path(), "two", &random_weights(&two, 2)))
        .unwrap_err();
    assert!(err.contains("2 input channels"), "{err}");
    // A misshapen tensor is named when the model loads.
    let mut bad = ours.clone();
    bad.insert(
        "body.1.rdb2.conv3.weight".into(),
        Tensor::zeros((4, 15, 3, 3), DType::F16, &Device::Cpu).unwrap(),
    );
    let entry = catalog::recognise_file("m", &write(dir.path(), "bad", &bad)).unwrap();
    let err = entry
        .load(&Device::Cpu, Prepare::Once)
        .unwrap_err()
        .to_string();
    assert!(err.contains("body.1.rdb2.conv3.weight"), "{err}");
}

/// An image's planes as a `(1, channels, h, w)` tensor in [0, 1].
fn planes_of(img: &image::DynamicImage, channels: usize) -> Tensor {
    let rgba = img.to_rgba8();
    let (w, h) = (rgba.width() as usize, rgba.height() as usize);
    let mut data = vec![0f32; channels * h * w];
    for (i, p) in rgba.pixels().enumerate() {
        for c in 0..channels {
            data[c * h * w + i] = p.0[c] as f32 / 255.0;
        }
    }
    Tensor::from_vec(data, (1, channels, h, w), &Device::Cpu).unwrap()
}

/// The 8-bit image a network output tensor stands for, interleaved as `image` keeps it.
fn quantized(t: &Tensor) -> Vec<u8> {
    let (_, c, h, w) = t.dims4().unwrap();
    let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let mut out = vec![0u8; c * h * w];
    for ch in 0..c {
        for i in 0..h * w {
            out[i * c + ch] = (v[ch * h * w + i].clamp(0.0, 1.0) * 255.0).round() as u8;
        }
    }
    out
}

fn run_pipeline(model: &upscaler::model::Model, img: &image::DynamicImage) -> image::DynamicImage {
    upscaler::pipeline::enhance(model, img, &Default::default(), &mut |_| {
        std::ops::ControlFlow::Continue(())
    })
    .unwrap()
}

fn fixture_model(name: &str) -> upscaler::model::Model {
    catalog::recognise_file(name, &fixture(&format!("{name}.pth")))
        .unwrap()
        .load(&Device::Cpu, Prepare::Once)
        .unwrap()
}

fn pixels(w: u32, h: u32, seed: u32) -> image::RgbaImage {
    image::RgbaImage::from_fn(w, h, |x, y| {
        let v = |k: u32| ((x * (7 + k) + y * (13 + 2 * k) + seed * 31) % 256) as u8;
        image::Rgba([v(0), v(1), v(2), v(3).max(16)])
    })
}

/// A 1-channel model gives gray images: from gray input as it is, from colour input through
/// the luma, with an alpha channel kept (run through the network as its own pass).
#[test]
fn gray_models_turn_any_image_into_a_gray_one() {
    for name in [
        "compact_x1_gray",
        "trunk_x2_gray",
        "basicsr_x2_unshuffle_gray",
    ] {
        let model = fixture_model(name);
        let s = model.scale() as u32;
        let gray = image::DynamicImage::ImageRgba8(pixels(12, 10, 1)).to_luma8();
        let gray_img = image::DynamicImage::ImageLuma8(gray.clone());
        let want = quantized(&model.forward(&planes_of(&gray_img, 1)).unwrap());

        let out = run_pipeline(&model, &gray_img);
        assert_eq!(out.color(), image::ColorType::L8, "{name}");
        assert_eq!((out.width(), out.height()), (12 * s, 10 * s), "{name}");
        let (max, _) = common::compare(out.as_bytes(), &want);
        assert!(max <= 1, "{name}: gray input, max diff {max}");

        // Colour input whose channels are equal has that gray as its luma.
        let rgb = image::DynamicImage::ImageLuma8(gray.clone()).to_rgb8();
        let out = run_pipeline(&model, &image::DynamicImage::ImageRgb8(rgb));
        assert_eq!(out.color(), image::ColorType::L8, "{name}");
        let (max, _) = common::compare(out.as_bytes(), &want);
        assert!(max <= 1, "{name}: colour input, max diff {max}");

        // Gray with alpha: the alpha is upscaled by the same network.
        let alpha = image::DynamicImage::ImageRgba8(pixels(12, 10, 2)).to_luma8();
        let ga = image::ImageBuffer::from_fn(12, 10, |x, y| {
            image::LumaA([gray.get_pixel(x, y).0[0], alpha.get_pixel(x, y).0[0]])
        });
        let out = run_pipeline(&model, &image::DynamicImage::ImageLumaA8(ga));
        assert_eq!(out.color(), image::ColorType::La8, "{name}");
        let alpha_img = image::DynamicImage::ImageLuma8(alpha);
        let want_alpha = quantized(&model.forward(&planes_of(&alpha_img, 1)).unwrap());
        let out = out.to_luma_alpha8();
        let got_gray: Vec<u8> = out.pixels().map(|p| p.0[0]).collect();
        let got_alpha: Vec<u8> = out.pixels().map(|p| p.0[1]).collect();
        assert!(
            common::compare(&got_gray, &want).0 <= 1,
            "{name}: gray of gray+alpha"
        );
        assert!(
            common::compare(&got_alpha, &want_alpha).0 <= 1,
            "{name}: alpha"
        );
    }
}

/// A 4-channel model takes colour and alpha together; an image without alpha is given an
/// opaque one, and comes back without.
#[test]
fn rgba_models_take_colour_and_alpha_together() {
    for name in ["compact_x3_rgba_bf16", "old_x1_rgba"] {
        let model = fixture_model(name);
        let s = model.scale() as u32;
        let rgba = image::DynamicImage::ImageRgba8(pixels(10, 7, 3));
        let want = quantized(&model.forward(&planes_of(&rgba, 4)).unwrap());
        let out = run_pipeline(&model, &rgba);
        assert_eq!(out.color(), image::ColorType::Rgba8, "{name}");
        assert_eq!((out.width(), out.height()), (10 * s, 7 * s), "{name}");
        let (max, _) = common::compare(out.as_bytes(), &want);
        assert!(max <= 1, "{name}: RGBA input, max diff {max}");

        let opaque = image::DynamicImage::ImageRgb8(rgba.to_rgb8());
        let full = quantized(
            &model
                .forward(&planes_of(&opaque.to_rgba8().into(), 4))
                .unwrap(),
        );
        let want_rgb: Vec<u8> = full.chunks(4).flat_map(|p| p[..3].to_vec()).collect();
        let out = run_pipeline(&model, &opaque);
        assert_eq!(out.color(), image::ColorType::Rgb8, "{name}");
        let (max, _) = common::compare(out.as_bytes(), &want_rgb);
        assert!(max <= 1, "{name}: RGB input, max diff {max}");
    }
}

/// BasicSR's x1/x2 models pixel-unshuffle their input, so a side that is not a multiple of
/// the factor is reflect-padded on the right and bottom, and the padding cropped off after.
#[test]
fn unshuffling_models_pad_odd_sizes_by_reflection_and_crop_after() {
    for (name, channels) in [
        ("basicsr_x1_unshuffle_netg", 3),
        ("basicsr_x2_unshuffle_gray", 1),
    ] {
        let model = fixture_model(name);
        let (s, f) = (model.scale(), model.spec().arch.unshuffle());
        let (w, h) = (13usize, 10usize);
        let img = pixels(w as u32, h as u32, 4);
        let img = match channels {
            1 => image::DynamicImage::ImageLuma8(image::DynamicImage::ImageRgba8(img).to_luma8()),
            _ => image::DynamicImage::ImageRgb8(image::DynamicImage::ImageRgba8(img).to_rgb8()),
        };
        let (pw, ph) = (w.div_ceil(f) * f, h.div_ceil(f) * f);
        assert!(pw > w, "{name}: the test needs padding");
        let reflect = |i: usize, n: usize| if i < n { i } else { 2 * (n - 1) - i };
        let rgba = img.to_rgba8();
        let padded = image::RgbaImage::from_fn(pw as u32, ph as u32, |x, y| {
            *rgba.get_pixel(reflect(x as usize, w) as u32, reflect(y as usize, h) as u32)
        });
        let full = model
            .forward(&planes_of(&padded.into(), channels))
            .unwrap()
            .narrow(2, 0, h * s)
            .unwrap()
            .narrow(3, 0, w * s)
            .unwrap();
        let out = run_pipeline(&model, &img);
        assert_eq!(
            (out.width() as usize, out.height() as usize),
            (w * s, h * s),
            "{name}"
        );
        let (max, _) = common::compare(out.as_bytes(), &quantized(&full));
        assert!(max <= 1, "{name}: max diff {max}");
    }
}
