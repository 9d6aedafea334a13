//! Importer for ncnn `.param`/`.bin` model pairs, as shipped by the Real-ESRGAN ncnn ports.
//!
//! ncnn stores no tensor names: weights follow the layer order of the `.param` file, which is
//! the PyTorch module order of the exported network. The caller supplies the expected
//! `(name, shape)` list in that order (see `registry::tensor_layout`) and gets a named
//! state dict back, with every shape checked.
//!
//! `.bin` layout per layer, as ncnn's `ModelBin` reads it: a convolution's weights start with
//! a 4-byte tag (0x01306B47 = fp16, padded to 4 bytes; 0 or 0x0002C056 = fp32), followed by
//! raw fp32 biases with no tag; PReLU slopes are raw fp32.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use half::f16;

use super::detect::Shapes;
use super::resize::Resize;
use super::ModelError;

const PARAM_MAGIC: &str = "7767517";
const TAG_FP16: u32 = 0x0130_6B47;
const TAG_FP32: u32 = 0x0002_C056;

/// Layers that carry no weights in the networks we import.
const WEIGHTLESS: &[&str] = &[
    "Input",
    "Split",
    "Concat",
    "Eltwise",
    "BinaryOp",
    "Interp",
    "PixelShuffle",
    "ReLU",
    "Crop",
    "Padding",
];

#[derive(Debug, Clone, PartialEq)]
pub struct Layer {
    pub kind: String,
    pub name: String,
    params: HashMap<i32, String>,
}

impl Layer {
    fn int(&self, key: i32, default: Option<usize>) -> Result<usize, ModelError> {
        match self.params.get(&key) {
            Some(v) => v.parse().map_err(|_| {
                ModelError::format(format!(
                    "layer {}: parameter {key}={v} is not an integer",
                    self.name
                ))
            }),
            None => default.ok_or_else(|| {
                ModelError::format(format!("layer {}: missing parameter {key}", self.name))
            }),
        }
    }

    /// A Convolution layer's weight shape (OIHW), its weight count as the layer states it,
    /// and whether it has a bias.
    fn conv(&self) -> Result<Conv, ModelError> {
        let num_output = self.int(0, None)?;
        let kw = self.int(1, None)?;
        let kh = self.int(11, Some(kw))?;
        let size = self.int(6, None)?;
        Ok(Conv {
            shape: vec![num_output, size / (num_output * kw * kh).max(1), kh, kw],
            size,
            bias: self.int(5, Some(0))? == 1,
        })
    }
}

struct Conv {
    shape: Vec<usize>,
    size: usize,
    bias: bool,
}

/// Parses the text `.param` file into its layer list.
pub fn parse_param(text: &str) -> Result<Vec<Layer>, ModelError> {
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    if lines.next().map(str::trim) != Some(PARAM_MAGIC) {
        return Err(ModelError::format(
            "not an ncnn .param file (bad magic number)",
        ));
    }
    let counts = lines
        .next()
        .ok_or_else(|| ModelError::format("ncnn .param: missing layer count"))?;
    let layer_count: usize = counts
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| ModelError::format("ncnn .param: bad layer count line"))?;
    let mut layers = Vec::with_capacity(layer_count);
    for line in lines {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let bad = || ModelError::format(format!("ncnn .param: malformed layer line `{line}`"));
        if fields.len() < 4 {
            return Err(bad());
        }
        let bottoms: usize = fields[2].parse().map_err(|_| bad())?;
        let tops: usize = fields[3].parse().map_err(|_| bad())?;
        let first_param = 4 + bottoms + tops;
        if fields.len() < first_param {
            return Err(bad());
        }
        let mut params = HashMap::new();
        for kv in &fields[first_param..] {
            let (k, v) = kv.split_once('=').ok_or_else(bad)?;
            params.insert(k.parse().map_err(|_| bad())?, v.to_string());
        }
        layers.push(Layer {
            kind: fields[0].to_string(),
            name: fields[1].to_string(),
            params,
        });
    }
    if layers.len() != layer_count {
        return Err(ModelError::format(format!(
            "ncnn .param: header announces {layer_count} layers, file has {}",
            layers.len()
        )));
    }
    Ok(layers)
}

struct BinReader<'a> {
    data: &'a [u8],
    pos: usize,
}

impl BinReader<'_> {
    fn take(&mut self, n: usize, what: &str) -> Result<&[u8], ModelError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.data.len())
            .ok_or_else(|| {
                ModelError::format(format!("ncnn .bin is truncated while reading {what}"))
            })?;
        let out = &self.data[self.pos..end];
        self.pos = end;
        Ok(out)
    }

    fn u32(&mut self, what: &str) -> Result<u32, ModelError> {
        let b = self.take(4, what)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn raw_f32(&mut self, n: usize, what: &str) -> Result<Vec<f32>, ModelError> {
        let b = self.take(n * 4, what)?;
        Ok(b.chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect())
    }

    /// A tagged weight blob. fp16 stays fp16 so the weights are kept bit-exact.
    fn tagged(&mut self, n: usize, what: &str) -> Result<Tensor, ModelError> {
        match self.u32(what)? {
            TAG_FP16 => {
                let b = self.take(n * 2, what)?;
                let vals: Vec<f16> =
                    b.chunks_exact(2).map(|c| f16::from_bits(u16::from_le_bytes([c[0], c[1]]))).collect();
                // ncnn pads fp16 blobs to a multiple of 4 bytes.
                if n % 2 == 1 {
                    self.take(2, what)?;
                }
                Ok(Tensor::from_vec(vals, n, &Device::Cpu)?)
            }
            0 | TAG_FP32 => Ok(Tensor::from_vec(self.raw_f32(n, what)?, n, &Device::Cpu)?),
            tag => Err(ModelError::format(format!(
                "ncnn .bin: {what} uses storage tag {tag:#010x}; only fp16 and fp32 weights are supported"
            ))),
        }
    }
}

/// Reads the weights of `layers` from `bin` and names them after `layout`, the expected
/// `(name, shape)` list in module order. Every tensor is checked against its expected shape;
/// any weight left over on either side is an error.
pub fn import(
    layers: &[Layer],
    bin: &[u8],
    layout: &super::weights::Layout,
) -> Result<HashMap<String, Tensor>, ModelError> {
    let mut reader = BinReader { data: bin, pos: 0 };
    let mut expected = layout.iter();
    let mut out = HashMap::new();
    let mut next_slot = |layer: &Layer, what: &str| {
        expected.next().cloned().ok_or_else(|| {
            ModelError::format(format!(
                "ncnn layer {} has a {what} but the architecture expects no more tensors",
                layer.name
            ))
        })
    };
    for layer in layers {
        match layer.kind.as_str() {
            "Convolution" => {
                let Conv {
                    shape: got,
                    size,
                    bias: has_bias,
                } = layer.conv()?;
                let num_output = got[0];
                let (name, shape) = next_slot(layer, "weight")?;
                let what = format!("{} (-> {name})", layer.name);
                if got != shape || got.iter().product::<usize>() != size {
                    return Err(ModelError::ShapeMismatch {
                        name,
                        expected: shape,
                        got,
                    });
                }
                let w = reader.tagged(size, &what)?.reshape(shape.as_slice())?;
                out.insert(name, w);
                if has_bias {
                    let (name, shape) = next_slot(layer, "bias")?;
                    if shape != [num_output] {
                        return Err(ModelError::ShapeMismatch {
                            name,
                            expected: shape,
                            got: vec![num_output],
                        });
                    }
                    let b = reader.raw_f32(num_output, &what)?;
                    out.insert(name, Tensor::from_vec(b, num_output, &Device::Cpu)?);
                }
            }
            "PReLU" => {
                let n = layer.int(0, Some(1))?;
                let (name, shape) = next_slot(layer, "slope")?;
                if shape != [n] {
                    return Err(ModelError::ShapeMismatch {
                        name,
                        expected: shape,
                        got: vec![n],
                    });
                }
                let what = format!("{} (-> {name})", layer.name);
                out.insert(
                    name,
                    Tensor::from_vec(reader.raw_f32(n, &what)?, n, &Device::Cpu)?,
                );
            }
            kind if WEIGHTLESS.contains(&kind) => {}
            kind => {
                return Err(ModelError::format(format!(
                    "ncnn layer {} has unsupported type {kind}",
                    layer.name
                )))
            }
        }
    }
    if let Some((name, _)) = expected.next() {
        return Err(ModelError::MissingTensor(name.clone()));
    }
    if reader.pos != bin.len() {
        return Err(ModelError::format(format!(
            "ncnn .bin has {} bytes left over after the last layer",
            bin.len() - reader.pos
        )));
    }
    debug_assert!(out
        .values()
        .all(|t| matches!(t.dtype(), DType::F16 | DType::F32)));
    Ok(out)
}

/// What an ncnn graph of RRDBNet or SRVGGNetCompact holds: its tensors' shapes under the
/// names our networks read (layers in module order: a PReLU graph is SRVGGNetCompact, whose
/// `body` alternates convolutions and PReLUs; otherwise RRDBNet, whose convolutions are
/// `conv_first`, 15 per RRDB block, `conv_body`, one per upsampling stage, `conv_hr` and
/// `conv_last`), and the resize a graph ends with, if any (ncnn's x2/x3 animevideov3).
pub fn recognise(layers: &[Layer]) -> Result<(Shapes, Option<Resize>), ModelError> {
    let mut convs = Vec::new();
    let mut slopes = Vec::new();
    let mut order = Vec::new();
    for layer in layers {
        match layer.kind.as_str() {
            "Convolution" => {
                let conv = layer.conv()?;
                order.push(true);
                convs.push((conv.shape, conv.bias));
            }
            "PReLU" => {
                order.push(false);
                slopes.push(layer.int(0, Some(1))?);
            }
            _ => {}
        }
    }
    let mut shapes = Shapes::new();
    let put = |shapes: &mut Shapes, name: String, (w, bias): &(Vec<usize>, bool)| {
        if *bias {
            shapes.insert(format!("{name}.bias"), vec![w[0]]);
        }
        shapes.insert(format!("{name}.weight"), w.clone());
    };
    if !slopes.is_empty() {
        let (mut c, mut p) = (convs.iter(), slopes.iter());
        for (i, is_conv) in order.iter().enumerate() {
            if *is_conv {
                put(&mut shapes, format!("body.{i}"), c.next().expect("counted"));
            } else {
                shapes.insert(
                    format!("body.{i}.weight"),
                    vec![*p.next().expect("counted")],
                );
            }
        }
    } else {
        let n = convs.len();
        if n < 4 + 15 {
            return Err(ModelError::format(format!(
                "an ncnn graph of {n} convolutions and no PReLU: neither SRVGGNetCompact nor \
                 RRDBNet"
            )));
        }
        let (blocks, ups) = ((n - 4) / 15, (n - 4) % 15);
        let mut c = convs.iter();
        put(&mut shapes, "conv_first".into(), c.next().expect("counted"));
        for b in 0..blocks {
            for k in 1..=3 {
                for j in 1..=5 {
                    put(
                        &mut shapes,
                        format!("body.{b}.rdb{k}.conv{j}"),
                        c.next().expect("counted"),
                    );
                }
            }
        }
        put(&mut shapes, "conv_body".into(), c.next().expect("counted"));
        for m in 1..=ups {
            put(
                &mut shapes,
                format!("conv_up{m}"),
                c.next().expect("counted"),
            );
        }
        put(&mut shapes, "conv_hr".into(), c.next().expect("counted"));
        put(&mut shapes, "conv_last".into(), c.next().expect("counted"));
    }
    Ok((shapes, trailing_resize(layers)?))
}

/// A bicubic `Interp` by a constant factor as the graph's last layer.
fn trailing_resize(layers: &[Layer]) -> Result<Option<Resize>, ModelError> {
    let Some(last) = layers.last().filter(|l| l.kind == "Interp") else {
        return Ok(None);
    };
    let float = |key: i32| -> Result<f64, ModelError> {
        match last.params.get(&key) {
            Some(v) => v.parse().map_err(|_| {
                ModelError::format(format!(
                    "layer {}: parameter {key}={v} is not a number",
                    last.name
                ))
            }),
            None => Ok(1.0),
        }
    };
    let (kind, hs, ws) = (last.int(0, Some(0))?, float(1)?, float(2)?);
    // Factors of the form n/4 (the x4 network's output made 1x, 2x or 3x).
    let quarters = (ws * 4.0).round();
    if kind != 3
        || hs != ws
        || (ws * 4.0 - quarters).abs() > 1e-6
        || !(1.0..4.0).contains(&quarters)
    {
        return Err(ModelError::format(format!(
            "the graph ends with a resize (`Interp` type {kind}, scale {hs} x {ws}) other than \
             a bicubic one by 1/4, 2/4 or 3/4"
        )));
    }
    Ok(Some(Resize {
        num: quarters as usize,
        den: 4,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> Vec<(String, Vec<usize>)> {
        vec![
            ("c.weight".into(), vec![2, 1, 1, 1]),
            ("c.bias".into(), vec![2]),
            ("p.weight".into(), vec![2]),
        ]
    }

    fn param() -> &'static str {
        "7767517\n3 3\nInput in 0 1 data\nConvolution c 1 1 data x 0=2 1=1 5=1 6=2\nPReLU p 1 1 x out 0=2\n"
    }

    fn bin() -> Vec<u8> {
        let mut b = TAG_FP16.to_le_bytes().to_vec();
        for v in [1.5f32, -0.25] {
            b.extend(f16::from_f32(v).to_bits().to_le_bytes());
        }
        for v in [0.5f32, 2.0, 0.1, 0.2] {
            b.extend(v.to_le_bytes());
        }
        b
    }

    #[test]
    fn imports_fp16_weights_exactly_and_fp32_biases() {
        let t = import(&parse_param(param()).unwrap(), &bin(), &layout()).unwrap();
        assert_eq!(t["c.weight"].dtype(), DType::F16);
        let w: Vec<f32> = t["c.weight"]
            .to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(w, vec![1.5, -0.25]);
        assert_eq!(t["c.bias"].to_vec1::<f32>().unwrap(), vec![0.5, 2.0]);
        assert_eq!(t["p.weight"].to_vec1::<f32>().unwrap(), vec![0.1, 0.2]);
    }

    #[test]
    fn truncated_bin_is_an_error() {
        let b = bin();
        let err = import(&parse_param(param()).unwrap(), &b[..b.len() - 3], &layout()).unwrap_err();
        assert!(err.to_string().contains("truncated"), "{err}");
    }

    #[test]
    fn extra_or_missing_tensors_are_named() {
        let mut short = layout();
        short.pop();
        let err = import(&parse_param(param()).unwrap(), &bin(), &short).unwrap_err();
        assert!(err.to_string().contains("expects no more tensors"), "{err}");
        let mut long = layout();
        long.push(("q.weight".into(), vec![2]));
        let err = import(&parse_param(param()).unwrap(), &bin(), &long).unwrap_err();
        assert!(err.to_string().contains("q.weight"), "{err}");
    }

    #[test]
    fn shape_mismatch_names_the_tensor() {
        let mut l = layout();
        l[0].1 = vec![2, 3, 1, 1];
        let err = import(&parse_param(param()).unwrap(), &bin(), &l).unwrap_err();
        assert!(err.to_string().contains("c.weight"), "{err}");
    }

    #[test]
    fn bad_magic_is_rejected() {
        assert!(parse_param("123\n1 1\n").is_err());
    }
}
