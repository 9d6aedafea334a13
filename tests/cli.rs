//! The `upscaler` binary as a user runs it.

mod common;

use std::path::Path;
use std::process::{Command, Output};

fn upscaler(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_upscaler"))
        .args(args)
        .current_dir(common::root())
        .env_remove("UPSCALER_MODEL")
        .output()
        .expect("binary runs")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn dir_is_empty(dir: &Path) -> bool {
    std::fs::read_dir(dir).unwrap().next().is_none()
}

#[test]
fn upscale_reproduces_a_parity_case_with_default_options() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("cat.png");
    let input = common::fixture("parity/chelsea_64x48.png");
    let o = upscaler(&[
        "upscale",
        input.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--model",
        "realesr-animevideov3",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let got = image::open(&out).unwrap();
    let expected = image::open(common::fixture(
        "parity/chelsea_64x48.realesr-animevideov3.png",
    ))
    .unwrap();
    assert_eq!((got.width(), got.height()), (256, 192));
    let (max, same) = common::compare(got.as_bytes(), expected.as_bytes());
    assert!(max <= 1 && same >= 0.995, "max {max}, same {same}");
    assert!(
        stderr(&o).contains("tile 1/1"),
        "progress on stderr: {}",
        stderr(&o)
    );
}

#[test]
fn jpeg_output_and_outscale() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("coffee.jpg");
    let input = common::fixture("parity/coffee_80x60.png");
    let o = upscaler(&[
        "upscale",
        input.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "-m",
        "realesr-animevideov3",
        "--outscale",
        "2",
        "--tile",
        "32",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let bytes = std::fs::read(&out).unwrap();
    assert_eq!(&bytes[..3], &[0xFF, 0xD8, 0xFF], "JPEG magic");
    let img = image::load_from_memory(&bytes).unwrap();
    assert_eq!((img.width(), img.height()), (160, 120));
}

/// A `.webp` output is lossless WebP: the same pixels as the PNG output.
#[test]
fn webp_output_is_lossless() {
    let dir = tempfile::tempdir().unwrap();
    let input = common::fixture("parity/coffee_80x60.png");
    let run = |out: &Path| {
        let o = upscaler(&[
            "upscale",
            input.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
            "-m",
            "realesr-animevideov3",
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
        std::fs::read(out).unwrap()
    };
    let webp = run(&dir.path().join("coffee.webp"));
    assert_eq!((&webp[..4], &webp[8..12]), (&b"RIFF"[..], &b"WEBP"[..]));
    let png = run(&dir.path().join("coffee.png"));
    let (a, b) = (
        image::load_from_memory(&webp).unwrap(),
        image::load_from_memory(&png).unwrap(),
    );
    assert_eq!((a.width(), a.height()), (320, 240));
    assert!(a.to_rgb8() == b.to_rgb8(), "WebP pixels differ from PNG's");
}

#[test]
fn bad_inputs_exit_non_zero_with_one_line_and_leave_no_output() {
    let dir = tempfile::tempdir().unwrap();
    let out_dir = tempfile::tempdir().unwrap();
    let out = out_dir.path().join("out.png");
    let png = std::fs::read(common::fixture("parity/coffee_80x60.png")).unwrap();
    let truncated = dir.path().join("truncated.png");
    std::fs::write(&truncated, &png[..png.len() / 2]).unwrap();
    let text = dir.path().join("notes.png");
    std::fs::write(&text, "this is not an image").unwrap();
    let rgba = common::fixture("parity/logo_48x48_rgba.png");
    let input = common::fixture("parity/coffee_80x60.png");
    let o_ = out.to_str().unwrap();
    let (jpg, gif) = (out_dir.path().join("x.jpg"), out_dir.path().join("x.gif"));
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec![truncated.to_str().unwrap(), "-o", o_],
            "cannot decode image",
        ),
        (
            vec![text.to_str().unwrap(), "-o", o_],
            "unsupported image format",
        ),
        (
            vec!["/nonexistent/in.png", "-o", o_],
            "cannot read /nonexistent/in.png",
        ),
        (
            vec![input.to_str().unwrap(), "-o", o_, "--max-pixels", "100"],
            "over the limit",
        ),
        (
            vec![input.to_str().unwrap(), "-o", o_, "-m", "nope"],
            "unknown model `nope`",
        ),
        (
            vec![rgba.to_str().unwrap(), "-o", jpg.to_str().unwrap()],
            "JPEG cannot store",
        ),
        (
            vec![input.to_str().unwrap(), "-o", gif.to_str().unwrap()],
            "output format",
        ),
    ];
    for (args, reason) in cases {
        let mut full = vec!["upscale"];
        full.extend(args);
        let o = upscaler(&full);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "{full:?}: {err}");
        assert!(
            err.starts_with("error: ") && err.contains(reason),
            "{full:?}: {err}"
        );
        assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
        assert!(
            err.matches("os error").count() <= 1,
            "cause repeated: {err}"
        );
        assert!(dir_is_empty(out_dir.path()), "{full:?} left a file behind");
    }
}

/// `--weights-dir` is the first place searched: a folder without the file is named in the
/// error with the others, and the command exits 2 (setup) having written nothing.
#[cfg(not(feature = "embed-weights"))]
#[test]
fn missing_weights_name_the_folders_searched() {
    let dir = tempfile::tempdir().unwrap();
    let input = common::fixture("parity/coffee_80x60.png");
    let out = dir.path().join("o.png");
    let o = Command::new(env!("CARGO_BIN_EXE_upscaler"))
        .args([
            "upscale",
            input.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
        ])
        .args(["--weights-dir", dir.path().to_str().unwrap()])
        .current_dir(dir.path())
        .env_remove("UPSCALER_MODEL")
        .env_remove("UPSCALER_WEIGHTS_DIR")
        .env("UPSCALER_SOURCE_WEIGHTS", "0")
        .output()
        .expect("binary runs");
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("realesrgan-x4plus.safetensors"), "{err}");
    assert!(err.contains(&dir.path().display().to_string()), "{err}");
    assert!(
        err.contains(&dir.path().join("weights").display().to_string()),
        "{err}"
    );
    assert!(!out.exists());
}

/// A `--weights-dir` that is not a folder (a typo) is said on stderr; the search goes on.
#[test]
fn a_weights_dir_that_is_not_a_folder_is_warned_about() {
    let dir = tempfile::tempdir().unwrap();
    let typo = dir.path().join("weigths");
    let input = dir.path().join("in.png");
    std::fs::write(&input, common::server::png(8, 6, 1)).unwrap();
    let out = dir.path().join("o.png");
    let o = upscaler(&[
        "upscale",
        input.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "-m",
        "realesr-animevideov3",
        "--weights-dir",
        typo.to_str().unwrap(),
    ]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(0), "{err}");
    assert!(
        err.contains("UPSCALER_WEIGHTS_DIR is not a folder") && err.contains("weigths"),
        "{err}"
    );
    assert!(out.is_file());
}

#[test]
fn convert_ncnn_rejects_mismatched_architecture() {
    // The converter writes nothing when the files do not fit the named architecture.
    let dir = tempfile::tempdir().unwrap();
    let param = dir.path().join("m.param");
    std::fs::write(
        &param,
        "7767517\n2 2\nInput in 0 1 data\nConvolution c 1 1 data out 0=8 1=3 5=1 6=216\n",
    )
    .unwrap();
    std::fs::write(dir.path().join("m.bin"), [0u8; 8]).unwrap();
    let out = dir.path().join("m.safetensors");
    let o = upscaler(&[
        "convert-ncnn",
        "-m",
        "realesr-animevideov3",
        param.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("body.0.weight"), "{}", stderr(&o));
    assert!(!out.exists());
}

/// `upscaler models` lists the shipped models and the models folder's, and names each file it
/// skipped with the reason; `--json` gives one object per model. A model of the folder is
/// also usable by `upscale --model`.
#[test]
fn models_lists_the_folder_and_names_what_it_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let models = dir.path().join("models");
    std::fs::create_dir(&models).unwrap();
    std::fs::copy(
        common::fixture("models/trunk_x2_gray.pth"),
        models.join("gray-x2.pth"),
    )
    .unwrap();
    std::fs::write(models.join("notes.pth"), b"not a checkpoint").unwrap();
    let models_arg = models.to_str().unwrap();

    let o = upscaler(&["models", "--models-dir", models_arg]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = String::from_utf8(o.stdout.clone()).unwrap();
    let mut lines = text.lines();
    assert!(
        lines.next().unwrap().starts_with("name "),
        "a header: {text}"
    );
    let row = |name: &str| {
        text.lines()
            .find(|l| l.split_whitespace().next() == Some(name))
            .unwrap_or_else(|| panic!("no {name} in {text}"))
            .split_whitespace()
            .collect::<Vec<_>>()
    };
    let gray = row("gray-x2");
    assert_eq!(gray[1..4], ["2x", "RRDBNet", "1->1"], "{gray:?}");
    assert!(
        gray.contains(&"gray-x2.pth") && gray.contains(&"fast"),
        "{gray:?}"
    );
    assert!(row("realesrgan-x4plus").contains(&"16.70M"), "{text}");
    assert_eq!(row("realesr-animevideov3-x3")[1], "3x");
    let err = stderr(&o);
    assert!(
        err.contains("notes.pth") && err.lines().count() == 1,
        "one line for the skipped file: {err}"
    );

    let o = upscaler(&["models", "--models-dir", models_arg, "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let rows: Vec<serde_json::Value> = String::from_utf8(o.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let gray = rows.iter().find(|r| r["name"] == "gray-x2").unwrap();
    assert_eq!(gray["scale"], 2);
    assert_eq!(
        (&gray["in_channels"], &gray["out_channels"]),
        (&1.into(), &1.into())
    );
    assert_eq!(gray["shipped"], false);
    assert!(gray["parameters"].as_u64().unwrap() > 1000, "{gray}");

    let out = dir.path().join("out.png");
    let o = upscaler(&[
        "upscale",
        common::fixture("parity/chelsea_64x48.png")
            .to_str()
            .unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--models-dir",
        models_arg,
        "--model",
        "gray-x2",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let got = image::open(&out).unwrap();
    assert_eq!(
        (got.width(), got.height(), got.color()),
        (128, 96, image::ColorType::L8)
    );
}
