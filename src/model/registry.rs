//! The named models users can pick, with their architecture and scale.

use candle_core::{DType, Device};

use super::{rrdbnet, srvgg, ModelError, Network};

#[derive(Debug, Clone, PartialEq)]
pub enum Arch {
    RrdbNet(rrdbnet::Config),
    SrVgg(srvgg::Config),
}

impl Arch {
    pub fn scale(&self) -> usize {
        match self {
            Arch::RrdbNet(c) => c.scale,
            Arch::SrVgg(c) => c.upscale,
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
    /// animevideov3 128->512 px: 1.0 KB/px), rounded up with a margin; both scale with the
    /// output pixels per input pixel.
    pub fn peak_bytes_per_input_pixel(&self) -> u64 {
        match self {
            Arch::RrdbNet(c) => 12 * 1024 * (c.scale * c.scale) as u64 / 16,
            Arch::SrVgg(c) => 2 * 1024 * (c.upscale * c.upscale) as u64 / 16,
        }
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
    pub name: &'static str,
    pub arch: Arch,
    pub description: &'static str,
    /// Whether `weights/<name>.safetensors` ships with the project.
    pub shipped: bool,
}

impl ModelSpec {
    pub fn weights_file_name(&self) -> String {
        format!("{}.safetensors", self.name)
    }
}

pub const DEFAULT_MODEL: &str = "realesrgan-x4plus";

pub static REGISTRY: std::sync::LazyLock<Vec<ModelSpec>> = std::sync::LazyLock::new(|| {
    vec![
        ModelSpec {
            name: "realesrgan-x4plus",
            arch: Arch::RrdbNet(rrdbnet::Config::x4plus()),
            description: "general photos, 4x (RRDBNet, 23 blocks); best quality, slowest",
            shipped: true,
        },
        ModelSpec {
            name: "realesrgan-x4plus-anime",
            arch: Arch::RrdbNet(rrdbnet::Config::x4plus_anime_6b()),
            description: "anime illustrations, 4x (RRDBNet, 6 blocks)",
            shipped: true,
        },
        ModelSpec {
            name: "realesr-animevideov3",
            arch: Arch::SrVgg(srvgg::Config::animevideov3()),
            description: "anime video frames, 4x (SRVGGNetCompact, 16 convs); fastest",
            shipped: true,
        },
        ModelSpec {
            name: "realesrgan-x2plus",
            arch: Arch::RrdbNet(rrdbnet::Config::x2plus()),
            description: "general photos, 2x (RRDBNet); bring RealESRGAN_x2plus.pth with --weights",
            shipped: false,
        },
        ModelSpec {
            name: "realesr-general-x4v3",
            arch: Arch::SrVgg(srvgg::Config::general_x4v3()),
            description: "general photos, 4x (SRVGGNetCompact, 32 convs); bring realesr-general-x4v3.pth with --weights",
            shipped: false,
        },
    ]
});

pub fn names() -> Vec<&'static str> {
    REGISTRY.iter().map(|m| m.name).collect()
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
