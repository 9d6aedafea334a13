//! The named models users can pick, with their architecture and scale.

use candle_core::{DType, Device};

use super::resize::Resize;
use super::{rrdbnet, srvgg, ModelError, Network};

#[derive(Debug, Clone, PartialEq)]
pub enum Arch {
    RrdbNet(rrdbnet::Config),
    SrVgg(srvgg::Config),
}

impl Arch {
    pub fn scale(&self) -> usize {
        match self {
            Arch::RrdbNet(c) => c.scale(),
            Arch::SrVgg(c) => c.upscale,
        }
    }

    /// The pixel-unshuffle factor of the input: image sides are reflect-padded to a
    /// multiple of it before a pass (1 for most models).
    pub fn unshuffle(&self) -> usize {
        match self {
            Arch::RrdbNet(c) => c.unshuffle,
            Arch::SrVgg(_) => 1,
        }
    }

    /// Colour channels the network takes and gives: 1 (gray), 3 (RGB) or 4 (RGBA).
    pub fn channels(&self) -> (usize, usize) {
        match self {
            Arch::RrdbNet(c) => (c.num_in_ch, c.num_out_ch),
            Arch::SrVgg(c) => (c.num_in_ch, c.num_out_ch),
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Arch::RrdbNet(_) => "RRDBNet",
            Arch::SrVgg(_) => "SRVGGNetCompact",
        }
    }

    /// Multiply-adds of all convolutions per input pixel (FLOPs are twice this).
    pub fn macs_per_input_pixel(&self) -> u64 {
        match self {
            Arch::RrdbNet(c) => c.macs_per_input_pixel(),
            Arch::SrVgg(c) => c.macs_per_input_pixel(),
        }
    }

    /// Working memory of one forward pass per input pixel, in bytes, on the fast CPU path.
    /// Used to pick a tile size from a memory budget. Measured with `upscaler bench` as the
    /// growth of peak RSS between input sizes (x4plus 128->256->384 px: 9.7-9.9 KB/px;
    /// animevideov3 128->512 px: 1.0 KB/px) and rounded up with a margin to 12 KiB and
    /// 2 KiB; other configurations scale those by the values their arena holds per input
    /// pixel (see `FastRrdbNet::run`, `FastSrVgg::run`), against x4plus's and
    /// animevideov3's.
    pub fn peak_bytes_per_input_pixel(&self) -> u64 {
        let (measured, floats, reference) = match self {
            Arch::RrdbNet(c) => {
                let per_input = |c: &rrdbnet::Config| {
                    c.arena_floats_per_body_pixel() as f64 / (c.unshuffle * c.unshuffle) as f64
                };
                (
                    12 * 1024,
                    per_input(c),
                    per_input(&rrdbnet::Config::x4plus()),
                )
            }
            Arch::SrVgg(c) => (
                2 * 1024,
                c.arena_floats_per_input_pixel() as f64,
                srvgg::Config::animevideov3().arena_floats_per_input_pixel() as f64,
            ),
        };
        (measured as f64 * floats / reference).ceil() as u64
    }

    /// The `(name, shape)` of every tensor the architecture reads, in PyTorch module order.
    pub fn tensor_layout(&self) -> Result<super::weights::Layout, ModelError> {
        let recorder = super::weights::LayoutRecorder::default();
        let vb = candle_nn::VarBuilder::from_backend(
            Box::new(recorder.clone()),
            DType::F32,
            Device::Cpu,
        );
        Network::new(self, vb)?;
        Ok(recorder.take())
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct ModelSpec {
    pub name: String,
    pub arch: Arch,
    pub description: String,
    /// Whether the weights ship with the project (in `weights/`).
    pub shipped: bool,
    /// The weights file's name in the weights folder (the registry's models).
    pub weights_file: String,
    /// A resize after the network (the x2 and x3 graphs of animevideov3).
    pub resize: Option<Resize>,
}

impl ModelSpec {
    /// A model whose weights are `<name>.safetensors` in the weights folder.
    fn registry(name: &str, arch: Arch, description: &str, shipped: bool) -> Self {
        Self {
            name: name.to_string(),
            arch,
            description: description.to_string(),
            shipped,
            weights_file: format!("{name}.safetensors"),
            resize: None,
        }
    }

    pub fn weights_file_name(&self) -> String {
        self.weights_file.clone()
    }

    /// Output pixels per input pixel, per side: the network's, after the resize.
    pub fn scale(&self) -> usize {
        let s = self.arch.scale();
        self.resize.map_or(s, |r| s * r.num / r.den)
    }
}

pub const DEFAULT_MODEL: &str = "realesrgan-x4plus";

pub static REGISTRY: std::sync::LazyLock<Vec<ModelSpec>> = std::sync::LazyLock::new(|| {
    let v3 = || Arch::SrVgg(srvgg::Config::animevideov3());
    // The x4 network, then ncnn's bicubic resize, as the x2/x3 ncnn graphs of the release.
    let v3_at = |scale: usize| ModelSpec {
        weights_file: "realesr-animevideov3.safetensors".to_string(),
        resize: Some(Resize { num: scale, den: 4 }),
        ..ModelSpec::registry(
            &format!("realesr-animevideov3-x{scale}"),
            v3(),
            &format!(
                "anime video frames, {scale}x: realesr-animevideov3 then a bicubic resize, \
                 as the ncnn release's x{scale} model"
            ),
            true,
        )
    };
    vec![
        ModelSpec::registry(
            "realesrgan-x4plus",
            Arch::RrdbNet(rrdbnet::Config::x4plus()),
            "general photos, 4x (RRDBNet, 23 blocks); best quality, slowest",
            true,
        ),
        ModelSpec::registry(
            "realesrgan-x4plus-anime",
            Arch::RrdbNet(rrdbnet::Config::x4plus_anime_6b()),
            "anime illustrations, 4x (RRDBNet, 6 blocks)",
            true,
        ),
        ModelSpec::registry(
            "realesr-animevideov3",
            v3(),
            "anime video frames, 4x (SRVGGNetCompact, 16 convs); fastest",
            true,
        ),
        v3_at(2),
        v3_at(3),
        ModelSpec::registry(
            "realesrgan-x2plus",
            Arch::RrdbNet(rrdbnet::Config::x2plus()),
            "general photos, 2x (RRDBNet); bring RealESRGAN_x2plus.pth with --weights",
            false,
        ),
        ModelSpec::registry(
            "realesr-general-x4v3",
            Arch::SrVgg(srvgg::Config::general_x4v3()),
            "general photos, 4x (SRVGGNetCompact, 32 convs); bring realesr-general-x4v3.pth with --weights",
            false,
        ),
    ]
});

pub fn names() -> Vec<&'static str> {
    REGISTRY.iter().map(|m| m.name.as_str()).collect()
}

pub fn find(name: &str) -> Result<&'static ModelSpec, ModelError> {
    REGISTRY
        .iter()
        .find(|m| m.name == name)
        .ok_or_else(|| ModelError::UnknownModel(name.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn x4plus_costs_about_36_mflop_per_pixel() {
        let flops = 2 * find("realesrgan-x4plus")
            .unwrap()
            .arch
            .macs_per_input_pixel();
        assert_eq!(flops, 35_853_696);
    }

    #[test]
    fn layouts_follow_pytorch_module_order() {
        let l = find("realesrgan-x4plus")
            .unwrap()
            .arch
            .tensor_layout()
            .unwrap();
        assert_eq!(l.len(), 2 + 23 * 3 * 5 * 2 + 2 * 5);
        assert_eq!(l[0], ("conv_first.weight".to_string(), vec![64, 3, 3, 3]));
        assert_eq!(l[2].0, "body.0.rdb1.conv1.weight");
        assert_eq!(l.last().unwrap(), &("conv_last.bias".to_string(), vec![3]));
        let x2 = find("realesrgan-x2plus")
            .unwrap()
            .arch
            .tensor_layout()
            .unwrap();
        assert_eq!(x2[0].1, vec![64, 12, 3, 3]);
        let v3 = find("realesr-animevideov3")
            .unwrap()
            .arch
            .tensor_layout()
            .unwrap();
        assert_eq!(v3[2], ("body.1.weight".to_string(), vec![64]));
        assert_eq!(v3.last().unwrap(), &("body.34.bias".to_string(), vec![48]));
    }

    #[test]
    fn unknown_model_lists_the_known_ones() {
        let err = find("nope").unwrap_err().to_string();
        assert!(
            err.contains("nope") && err.contains("realesr-animevideov3"),
            "{err}"
        );
    }
}
