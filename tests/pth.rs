//! Loading official-style PyTorch checkpoints (`.pth`), as users bring for the models whose
//! weights are not shipped. The fixtures come from `scripts/make-pth-fixtures.py`.

mod common;

use candle_core::{DType, Device, Tensor};
use upscaler::model::{srvgg, weights, Arch, Model, ModelError, ModelSpec};

fn tiny_spec() -> ModelSpec {
    ModelSpec {
        name: "tiny-srvgg".into(),
        arch: Arch::SrVgg(srvgg::Config {
            num_in_ch: 3,
            num_out_ch: 3,
            num_feat: 4,
            num_conv: 1,
            upscale: 4,
            act: srvgg::Act::PRelu,
        }),
        description: "test network".into(),
        shipped: false,
        weights_file: "tiny.pth".into(),
        resize: None,
    }
}

/// The pattern the fixture script writes for offset 0.
fn expected(i: usize) -> f32 {
    ((i * 7) % 17) as f32 / 64.0 - 8.0 / 64.0
}

fn values(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

#[test]
fn ema_params_plain_checkpoints_all_load_the_same_weights() {
    let spec = tiny_spec();
    let x = Tensor::rand(0f32, 1f32, (1, 3, 5, 4), &Device::Cpu).unwrap();
    let mut outputs = Vec::new();
    for file in [
        "tiny_srvgg_ema.pth",
        "tiny_srvgg_params.pth",
        "tiny_srvgg_plain.pth",
    ] {
        let path = common::fixture(&format!("pth/{file}"));
        let sd = weights::read(&spec, &path).unwrap();
        assert_eq!(sd.len(), 8, "{file}");
        assert_eq!(
            sd["body.4.weight"].dtype(),
            DType::F16,
            "{file}: fp16 weights stay fp16"
        );
        assert_eq!(sd["body.4.bias"].dtype(), DType::F32);
        let w = values(&sd["body.4.weight"]);
        assert_eq!(w.len(), 48 * 4 * 9);
        assert!(
            w.iter().enumerate().all(|(i, v)| *v == expected(i)),
            "{file}: params_ema wins"
        );
        let model = Model::load(&spec, &path, &Device::Cpu).unwrap();
        let y = model.forward(&x).unwrap();
        assert_eq!(y.dims(), &[1, 3, 20, 16]);
        outputs.push(values(&y));
    }
    assert_eq!(outputs[0], outputs[1]);
    assert_eq!(outputs[0], outputs[2]);
}

#[test]
fn checkpoint_for_another_architecture_is_refused_by_name() {
    let mut spec = tiny_spec();
    spec.arch = Arch::SrVgg(srvgg::Config {
        num_conv: 2,
        ..srvgg::Config::animevideov3()
    });
    let err = Model::load(
        &spec,
        &common::fixture("pth/tiny_srvgg_ema.pth"),
        &Device::Cpu,
    )
    .unwrap_err();
    assert!(
        matches!(&err, ModelError::ShapeMismatch { name, .. } if name == "body.0.weight"),
        "{err}"
    );
}

#[test]
fn not_a_checkpoint_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("broken.pth");
    std::fs::write(&path, b"definitely not a zip").unwrap();
    let err = Model::load(&tiny_spec(), &path, &Device::Cpu).unwrap_err();
    assert!(err.to_string().contains("broken.pth"), "{err}");
}
