//! Recognising an ESRGAN-family network from its state dict alone: which architecture, in
//! which of the key layouts its trainers wrote, and its configuration (channels, features,
//! blocks, growth channels, scale), from the tensors' names and shapes alone. `Layout::rename`
//! then gives the tensors the names our networks read (BasicSR's), and
//! `weights::build_checked` checks every shape.
//!
//! RRDBNet layouts:
//! - BasicSR / Real-ESRGAN: `conv_first`, `body.N.rdbK.convJ`, `conv_body`, `conv_upM`,
//!   `conv_hr`, `conv_last`;
//! - old ESRGAN (2018): one `nn.Sequential`, `model.0` (first conv), `model.1.sub.N.RDBK.convJ.0`
//!   and `model.1.sub.NB` (the trunk conv), then three entries per 2x upsampling step with
//!   its conv at `model.3M`, the HR conv at `model.(3U+2)` and the last at `model.(3U+4)`;
//! - ESRGAN+: the old layout with a bias-free `RDBK.conv1x1` in every dense block;
//! - ESRGAN 2019 / BSRGAN / RealSR: `conv_first`, `RRDB_trunk.N.RDBK.convJ`, `trunk_conv`,
//!   `upconvM`, `HRconv`, `conv_last`.
//!
//! The scale is 2 to the number of upsampling convs, divided by the pixel unshuffle that
//! BasicSR's 2x and 1x models apply first (seen as a first conv taking 4x or 16x the output
//! channels). SRVGGNetCompact (`body.N` convolutions at even N) is told by its PReLU slopes at
//! odd N; its ReLU and LeakyReLU variants carry no weights to tell them apart, so they need
//! the activation named (a sidecar `<model>.json`).

use std::collections::{BTreeMap, BTreeSet};

use super::registry::Arch;
use super::weights::StateDict;
use super::{rrdbnet, srvgg};

/// Tensor names and shapes: all recognition needs, so a file is recognised from its header
/// or pickle without reading its weights.
pub type Shapes = BTreeMap<String, Vec<usize>>;

/// A recognised network.
#[derive(Debug, Clone, PartialEq)]
pub struct Detected {
    pub arch: Arch,
    /// Which key layout the file uses.
    pub layout: Layout,
    /// Parameters in the file.
    pub parameters: u64,
}

/// The key layouts of the files we read.
#[derive(Debug, Clone, PartialEq)]
pub enum Layout {
    /// BasicSR / Real-ESRGAN RRDBNet names, and SRVGGNetCompact's `body.N`: our own.
    BasicSr,
    Compact,
    /// Old ESRGAN or ESRGAN+ (`model.*`): upsampling convs and the trunk conv's index.
    Old {
        upsample: usize,
        trunk: usize,
        plus: bool,
    },
    /// ESRGAN 2019 / BSRGAN / RealSR.
    Trunk,
}

impl Layout {
    pub fn name(&self) -> &'static str {
        match self {
            Self::BasicSr => "BasicSR",
            Self::Compact => "Compact",
            Self::Old { plus: true, .. } => "ESRGAN+",
            Self::Old { .. } => "old ESRGAN",
            Self::Trunk => "ESRGAN 2019 / BSRGAN",
        }
    }

    /// The tensors under the names our networks read.
    pub fn rename(&self, tensors: StateDict) -> Result<StateDict, String> {
        tensors
            .into_iter()
            .map(|(k, t)| Ok((self.rename_key(&k)?, t)))
            .collect()
    }

    fn rename_key(&self, key: &str) -> Result<String, String> {
        Ok(match self {
            Self::BasicSr | Self::Compact => key.to_string(),
            Self::Trunk => rename_trunk(key),
            &Self::Old {
                upsample, trunk, ..
            } => rename_old(key, upsample, trunk)?,
        })
    }
}

/// What a sidecar `<model>.json` may say about a model its weights cannot tell.
#[derive(Debug, Clone, Default, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sidecar {
    /// SRVGGNetCompact's activation: `prelu`, `relu` or `leakyrelu`.
    pub activation: Option<String>,
    /// Shown in model lists.
    pub description: Option<String>,
}

/// Recognises a state dict from its tensor shapes; the error says why they fit no
/// supported network.
pub fn detect(shapes: &Shapes, sidecar: &Sidecar) -> Result<Detected, String> {
    if shapes.is_empty() {
        return Err("the state dict holds no tensors".into());
    }
    let has = |k: &str| shapes.contains_key(k);
    // Any dense block of the trunk tells the layout (a missing one is reported below).
    let any = |prefix: &str, part: &str| {
        shapes.keys().any(|k| {
            k.strip_prefix(prefix)
                .is_some_and(|rest| rest.contains(part))
        })
    };
    let layout = if has("model.0.weight") && any("model.1.sub.", ".RDB1.") {
        old_layout(shapes)?
    } else if has("conv_first.weight") && any("RRDB_trunk.", ".RDB1.") {
        Layout::Trunk
    } else if has("conv_first.weight") && any("body.", ".rdb1.") {
        Layout::BasicSr
    } else if has("body.0.weight") && !has("conv_first.weight") {
        return detect_srvgg(shapes, sidecar);
    } else {
        return Err(format!(
            "an unknown architecture (not RRDBNet/ESRGAN or SRVGGNetCompact): its tensors \
             include {}",
            sample_keys(shapes)
        ));
    };
    let renamed: Shapes = shapes
        .iter()
        .map(|(k, v)| Ok((layout.rename_key(k)?, v.clone())))
        .collect::<Result<_, String>>()?;
    let cfg = rrdb_config(&renamed)?;
    Ok(Detected {
        arch: Arch::RrdbNet(cfg),
        layout,
        parameters: parameter_count(shapes),
    })
}

/// Parameters of all tensors.
pub fn parameter_count(shapes: &Shapes) -> u64 {
    shapes
        .values()
        .map(|d| d.iter().product::<usize>() as u64)
        .sum()
}

/// The shapes of a state dict's tensors.
pub fn shapes_of(tensors: &StateDict) -> Shapes {
    tensors
        .iter()
        .map(|(k, t)| (k.clone(), t.dims().to_vec()))
        .collect()
}

fn sample_keys(shapes: &Shapes) -> String {
    let keys: Vec<&String> = shapes.keys().collect();
    let mut shown: Vec<&str> = keys.iter().take(5).map(|k| k.as_str()).collect();
    if keys.len() > 5 {
        shown.push("...");
    }
    shown.join(", ")
}

/// The output and input channels of a convolution weight.
fn conv_dims(shapes: &Shapes, key: &str) -> Result<(usize, usize), String> {
    let dims = shapes
        .get(key)
        .ok_or_else(|| format!("the tensor `{key}` is missing"))?;
    match dims.as_slice() {
        &[o, i, _, _] => Ok((o, i)),
        other => Err(format!("`{key}` has shape {other:?}, not a convolution's")),
    }
}

/// The upsampling steps and trunk index of an old ESRGAN or ESRGAN+ (`model.*`) file.
fn old_layout(shapes: &Shapes) -> Result<Layout, String> {
    // The top-level Sequential indices with weights, other than 0 and 1 (first conv, trunk).
    let tail: BTreeSet<usize> = shapes
        .keys()
        .filter_map(|k| k.strip_prefix("model.")?.split('.').next()?.parse().ok())
        .filter(|&i| i >= 2)
        .collect();
    let last = *tail
        .iter()
        .max()
        .ok_or("an old-layout ESRGAN without its last convolution")?;
    // Upsampling convs at 3, 6, ..., 3U; HR conv at 3U + 2; last conv at 3U + 4.
    let upsample = last
        .checked_sub(4)
        .filter(|d| d % 3 == 0)
        .map(|d| d / 3)
        .ok_or_else(|| old_layout_error(&tail))?;
    let expected: BTreeSet<usize> = (1..=upsample)
        .map(|m| 3 * m)
        .chain([3 * upsample + 2, 3 * upsample + 4])
        .collect();
    if tail != expected {
        return Err(old_layout_error(&tail));
    }
    let trunks: Vec<usize> = shapes
        .keys()
        .filter_map(|k| {
            let (i, rest) = k.strip_prefix("model.1.sub.")?.split_once('.')?;
            (!rest.starts_with("RDB")).then(|| i.parse().ok())?
        })
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let [trunk] = trunks[..] else {
        return Err("an old-layout ESRGAN without exactly one trunk convolution".into());
    };
    Ok(Layout::Old {
        upsample,
        trunk,
        plus: shapes.keys().any(|k| k.contains(".conv1x1.")),
    })
}

/// An old ESRGAN / ESRGAN+ key in BasicSR names.
fn rename_old(key: &str, upsample: usize, trunk: usize) -> Result<String, String> {
    if let Some(rest) = key.strip_prefix("model.1.sub.") {
        let (i, rest) = rest.split_once('.').ok_or_else(|| unknown(key))?;
        if i == trunk.to_string() {
            return Ok(format!("conv_body.{rest}"));
        }
        // RDBk.convj.0.weight -> rdbk.convj.weight; RDBk.conv1x1.weight keeps its name.
        let rest = rest
            .strip_prefix("RDB")
            .ok_or_else(|| unknown(key))?
            .replacen(".0.", ".", 1);
        return Ok(format!("body.{i}.rdb{rest}"));
    }
    let rest = key.strip_prefix("model.").ok_or_else(|| unknown(key))?;
    let (i, param) = rest.split_once('.').ok_or_else(|| unknown(key))?;
    let i: usize = i.parse().map_err(|_| unknown(key))?;
    let name = match i {
        0 => "conv_first".to_string(),
        i if i == 3 * upsample + 2 => "conv_hr".to_string(),
        i if i == 3 * upsample + 4 => "conv_last".to_string(),
        i if i % 3 == 0 && i / 3 <= upsample => format!("conv_up{}", i / 3),
        _ => return Err(unknown(key)),
    };
    Ok(format!("{name}.{param}"))
}

fn old_layout_error(indices: &BTreeSet<usize>) -> String {
    format!(
        "an old-layout ESRGAN whose layers sit at model.{{{}}}, which fits no number of \
         upsampling steps (expected 3, 6, ..., then the HR and last convs 2 and 4 after)",
        indices
            .iter()
            .map(usize::to_string)
            .collect::<Vec<_>>()
            .join(",")
    )
}

fn unknown(key: &str) -> String {
    format!("an unexpected tensor `{key}` for this layout")
}

/// An ESRGAN 2019 / BSRGAN / RealSR key in BasicSR names.
fn rename_trunk(key: &str) -> String {
    if let Some(rest) = key.strip_prefix("RRDB_trunk.") {
        format!("body.{}", rest.replacen(".RDB", ".rdb", 1))
    } else if let Some(rest) = key.strip_prefix("trunk_conv.") {
        format!("conv_body.{rest}")
    } else if let Some(rest) = key.strip_prefix("HRconv.") {
        format!("conv_hr.{rest}")
    } else if let Some(rest) = key.strip_prefix("upconv") {
        format!("conv_up{rest}")
    } else {
        key.to_string()
    }
}

/// The configuration of an RRDBNet in BasicSR names.
fn rrdb_config(shapes: &Shapes) -> Result<rrdbnet::Config, String> {
    let (nf, first_in) = conv_dims(shapes, "conv_first.weight")?;
    let (out_nc, _) = conv_dims(shapes, "conv_last.weight")?;
    let blocks: BTreeSet<usize> = shapes
        .keys()
        .filter_map(|k| k.strip_prefix("body.")?.split('.').next()?.parse().ok())
        .collect();
    let nb = blocks.len();
    if blocks.iter().copied().ne(0..nb) {
        return Err(format!(
            "RRDB blocks numbered {:?}: block {} is missing",
            blocks,
            (0..).find(|i| !blocks.contains(i)).unwrap_or(0)
        ));
    }
    let (gc, _) = conv_dims(shapes, "body.0.rdb1.conv1.weight")?;
    let ups: BTreeSet<usize> = shapes
        .keys()
        .filter_map(|k| k.strip_prefix("conv_up")?.split('.').next()?.parse().ok())
        .collect();
    let num_upsample = ups.len();
    if ups.iter().copied().ne(1..=num_upsample) {
        return Err(format!(
            "upsampling convs numbered {ups:?}, not 1 to {num_upsample}"
        ));
    }
    // BasicSR's 2x and 1x models pixel-unshuffle the input by 2 or 4 first.
    let unshuffle = if first_in == 16 * out_nc && num_upsample >= 2 {
        4
    } else if first_in == 4 * out_nc && num_upsample >= 1 {
        2
    } else {
        1
    };
    let cfg = rrdbnet::Config {
        num_in_ch: first_in / (unshuffle * unshuffle),
        num_out_ch: out_nc,
        num_feat: nf,
        num_block: nb,
        num_grow_ch: gc,
        num_upsample,
        unshuffle,
        plus: shapes.keys().any(|k| k.ends_with(".conv1x1.weight")),
    };
    cfg.check()?;
    image_channels(cfg.num_in_ch, cfg.num_out_ch)?;
    Ok(cfg)
}

/// Images give and take 1 (gray), 3 (RGB) or 4 (RGBA) channels.
fn image_channels(input: usize, output: usize) -> Result<(), String> {
    for (what, n) in [("input", input), ("output", output)] {
        if !matches!(n, 1 | 3 | 4) {
            return Err(format!(
                "{n} {what} channels: an image has 1 (gray), 3 (RGB) or 4 (RGBA)"
            ));
        }
    }
    Ok(())
}

fn detect_srvgg(shapes: &Shapes, sidecar: &Sidecar) -> Result<Detected, String> {
    let mut indices: BTreeMap<usize, usize> = BTreeMap::new(); // index -> rank of weight
    for (key, dims) in shapes {
        let Some(rest) = key.strip_prefix("body.") else {
            return Err(format!(
                "an unknown architecture: `{key}` is not part of an SRVGGNetCompact body"
            ));
        };
        let (i, param) = rest.split_once('.').ok_or_else(|| unknown(key))?;
        let i: usize = i.parse().map_err(|_| unknown(key))?;
        if param == "weight" {
            indices.insert(i, dims.len());
        }
    }
    let highest = *indices.keys().max().expect("not empty");
    if !highest.is_multiple_of(2) || highest < 2 {
        return Err(format!(
            "an SRVGGNetCompact whose last layer is body.{highest}: convolutions sit at even \
             indices, from body.0 to at least body.2"
        ));
    }
    let (nf, in_nc) = conv_dims(shapes, "body.0.weight")?;
    let last_key = format!("body.{highest}.weight");
    let (last_out, _) = conv_dims(shapes, &last_key)?;
    let prelu = indices.get(&1) == Some(&1);
    let named = sidecar.activation.as_deref();
    let act = match (prelu, named) {
        (true, None) => srvgg::Act::PRelu,
        (_, Some(name)) => srvgg::Act::from_name(name).ok_or_else(|| {
            format!("the sidecar names the activation `{name}`: use prelu, relu or leakyrelu")
        })?,
        (false, None) => {
            return Err(
                "an SRVGGNetCompact without PReLU weights: its activation (ReLU or \
                 LeakyReLU) cannot be told from the weights. Name it in a sidecar \
                 <model>.json: {\"activation\": \"relu\"} or {\"activation\": \"leakyrelu\"}"
                    .into(),
            )
        }
    };
    if prelu && act != srvgg::Act::PRelu {
        return Err(format!(
            "the sidecar names the activation `{}`, but the file has PReLU slopes",
            named.unwrap_or_default()
        ));
    }
    // The output is the pixel shuffle of the last conv plus the upsampled input, so the
    // last conv gives in_nc * scale^2 channels.
    let scale = (1..=16)
        .find(|s| s * s * in_nc == last_out)
        .ok_or_else(|| {
            format!(
                "an SRVGGNetCompact whose last conv gives {last_out} channels for {in_nc} \
                 input channels: not {in_nc} x scale^2 for any scale"
            )
        })?;
    let cfg = srvgg::Config {
        num_in_ch: in_nc,
        num_out_ch: in_nc,
        num_feat: nf,
        num_conv: highest / 2 - 1,
        upscale: scale,
        act,
    };
    cfg.check()?;
    image_channels(in_nc, in_nc)?;
    Ok(Detected {
        arch: Arch::SrVgg(cfg),
        layout: Layout::Compact,
        parameters: parameter_count(shapes),
    })
}
