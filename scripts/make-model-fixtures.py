#!/usr/bin/env python3
"""Writes the model-file fixtures of tests/models.rs with PyTorch.

PyTorch (from PyPI) is used here only to make fixtures, never by the project at run time. Each
fixture is a tiny network (8 features, 1 block, 4 growth channels) with seeded random weights,
saved as PyTorch itself saves checkpoints: the zip format (torch >= 1.6) or the legacy format
(`_use_new_zipfile_serialization=False`, as most 2018-2020 ESRGAN models are), in one of the
key layouts community models use, sometimes under a wrapper key or a `module.`/`netG.` prefix,
in fp32, fp16 or bf16. Beside each, `<name>.io.safetensors` holds an input and the output
PyTorch's own forward pass gives for it (the reference architectures below: BasicSR's
RRDBNet with ESRGAN+'s dense block, and Real-ESRGAN's SRVGGNetCompact), so the tests check
what we compute, not only what we recognise. A few files are made to be refused: a truncated
checkpoint in each format, a pickle that is not a state dict, a state dict of an unknown
architecture and a TorchScript archive.

Usage: python scripts/make-model-fixtures.py OUT_DIR    (needs torch, numpy and safetensors)
       python scripts/make-model-fixtures.py --bench OUT_DIR

`--bench` writes full-size random-weight networks of the shapes community models have, for
`upscaler bench --models-dir OUT_DIR` (not fixtures; nothing checks their output):
`lite-x4` (old ESRGAN layout, nf 32, nb 12, gc 32) and `restore-x1` (old layout, 1x, nf 64,
nb 23, gc 32, as 1x restoration models are).
"""
import io
import json
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

NF, NB, GC = 8, 1, 4


def conv(i, o, k=3, bias=True):
    return nn.Conv2d(i, o, k, 1, k // 2, bias=bias)


class DenseBlock(nn.Module):
    def __init__(self, plus):
        super().__init__()
        for j in range(1, 6):
            setattr(self, f"conv{j}", conv(NF + (j - 1) * GC, GC if j < 5 else NF))
        if plus:
            self.conv1x1 = conv(NF, GC, 1, bias=False)
        self.plus = plus

    def forward(self, x):
        lrelu = lambda t: F.leaky_relu(t, 0.2)
        x1 = lrelu(self.conv1(x))
        x2 = lrelu(self.conv2(torch.cat((x, x1), 1)))
        if self.plus:
            x2 = x2 + self.conv1x1(x)
        x3 = lrelu(self.conv3(torch.cat((x, x1, x2), 1)))
        x4 = lrelu(self.conv4(torch.cat((x, x1, x2, x3), 1)))
        if self.plus:
            x4 = x4 + x2
        x5 = self.conv5(torch.cat((x, x1, x2, x3, x4), 1))
        return x5 * 0.2 + x


class Rrdb(nn.Module):
    def __init__(self, plus):
        super().__init__()
        self.rdb1, self.rdb2, self.rdb3 = (DenseBlock(plus) for _ in range(3))

    def forward(self, x):
        return self.rdb3(self.rdb2(self.rdb1(x))) * 0.2 + x


class RRDBNet(nn.Module):
    """BasicSR's RRDBNet, with any number of 2x upsampling stages and pixel unshuffle."""

    def __init__(self, in_nc, out_nc, ups, unshuffle=1, plus=False):
        super().__init__()
        self.unshuffle, self.ups = unshuffle, ups
        self.conv_first = conv(in_nc * unshuffle * unshuffle, NF)
        self.body = nn.Sequential(*(Rrdb(plus) for _ in range(NB)))
        self.conv_body = conv(NF, NF)
        for m in range(1, ups + 1):
            setattr(self, f"conv_up{m}", conv(NF, NF))
        self.conv_hr = conv(NF, NF)
        self.conv_last = conv(NF, out_nc)

    def forward(self, x):
        if self.unshuffle > 1:
            x = F.pixel_unshuffle(x, self.unshuffle)
        feat = self.conv_first(x)
        feat = feat + self.conv_body(self.body(feat))
        for m in range(1, self.ups + 1):
            up = getattr(self, f"conv_up{m}")
            feat = F.leaky_relu(up(F.interpolate(feat, scale_factor=2, mode="nearest")), 0.2)
        return self.conv_last(F.leaky_relu(self.conv_hr(feat), 0.2))


class SRVGG(nn.Module):
    """Real-ESRGAN's SRVGGNetCompact."""

    def __init__(self, channels, convs, scale, act):
        super().__init__()
        self.scale = scale
        make_act = {
            "prelu": lambda: nn.PReLU(num_parameters=NF),
            "relu": lambda: nn.ReLU(),
            "leakyrelu": lambda: nn.LeakyReLU(0.1),
        }[act]
        layers = [conv(channels, NF), make_act()]
        for _ in range(convs):
            layers += [conv(NF, NF), make_act()]
        layers.append(conv(NF, channels * scale * scale))
        self.body = nn.ModuleList(layers)

    def forward(self, x):
        out = x
        for layer in self.body:
            out = layer(out)
        out = F.pixel_shuffle(out, self.scale)
        return out + F.interpolate(x, scale_factor=self.scale, mode="nearest")


def old_names(sd, ups):
    """BasicSR names to the old ESRGAN layout (one Sequential, `model.*`)."""
    out = {}
    for k, v in sd.items():
        parts = k.split(".")
        if parts[0] == "conv_first":
            n = "model.0." + parts[1]
        elif parts[0] == "body":
            i, rdb, c, p = parts[1], parts[2], parts[3], parts[4]
            rdb = "RDB" + rdb[3:]
            n = f"model.1.sub.{i}.{rdb}.{c}.{p}" if c == "conv1x1" else f"model.1.sub.{i}.{rdb}.{c}.0.{p}"
        elif parts[0] == "conv_body":
            n = f"model.1.sub.{NB}.{parts[1]}"
        elif parts[0].startswith("conv_up"):
            n = f"model.{3 * int(parts[0][7:])}.{parts[1]}"
        elif parts[0] == "conv_hr":
            n = f"model.{3 * ups + 2}.{parts[1]}"
        elif parts[0] == "conv_last":
            n = f"model.{3 * ups + 4}.{parts[1]}"
        else:
            raise ValueError(k)
        out[n] = v
    return out


def trunk_names(sd):
    """BasicSR names to ESRGAN 2019 / BSRGAN ones."""
    out = {}
    for k, v in sd.items():
        n = k
        if k.startswith("body."):
            p = k.split(".")
            n = ".".join(["RRDB_trunk", p[1], "RDB" + p[2][3:]] + p[3:])
        elif k.startswith("conv_body."):
            n = "trunk_conv." + k.split(".", 1)[1]
        elif k.startswith("conv_hr."):
            n = "HRconv." + k.split(".", 1)[1]
        elif k.startswith("conv_up"):
            n = "upconv" + k[7:]
        out[n] = v
    return out


# name, network, input size (h, w), layout, container, wrapper, prefix, dtype, sidecar
CASES = [
    ("basicsr_x4_params_ema", lambda: RRDBNet(3, 3, 2), (8, 12), "basicsr", "zip", "params_ema", "", torch.float32, None),
    ("basicsr_x8_state_dict", lambda: RRDBNet(3, 3, 3), (6, 5), "basicsr", "legacy", "state_dict", "module.", torch.float32, None),
    ("basicsr_x2_unshuffle_gray", lambda: RRDBNet(1, 1, 2, unshuffle=2), (8, 10), "basicsr", "legacy", "params", "", torch.float16, None),
    ("basicsr_x1_unshuffle_netg", lambda: RRDBNet(3, 3, 2, unshuffle=4), (8, 12), "basicsr", "zip", "model", "netG.", torch.float32, None),
    ("old_x4_legacy", lambda: RRDBNet(3, 3, 2), (7, 9), "old", "legacy", None, "", torch.float32, None),
    ("old_x2_fp16", lambda: RRDBNet(3, 3, 1), (8, 8), "old", "zip", None, "", torch.float16, None),
    ("old_x1_rgba", lambda: RRDBNet(4, 4, 0), (9, 7), "old", "legacy", None, "", torch.float32, None),
    ("esrganplus_x4_legacy", lambda: RRDBNet(3, 3, 2, plus=True), (8, 9), "old", "legacy", None, "", torch.float32, None),
    ("esrganplus_x8_zip", lambda: RRDBNet(3, 3, 3, plus=True), (5, 6), "old", "zip", "params_ema", "", torch.bfloat16, None),
    ("trunk_x4_legacy", lambda: RRDBNet(3, 3, 2), (8, 8), "trunk", "legacy", None, "", torch.float32, None),
    ("trunk_x2_gray", lambda: RRDBNet(1, 1, 1), (6, 9), "trunk", "zip", "params", "module.", torch.float32, None),
    ("compact_x4_1conv", lambda: SRVGG(3, 1, 4, "prelu"), (8, 12), "basicsr", "zip", "params", "", torch.float32, None),
    ("compact_x2_3conv_legacy", lambda: SRVGG(3, 3, 2, "prelu"), (9, 7), "basicsr", "legacy", "params_ema", "", torch.float16, None),
    ("compact_x1_gray", lambda: SRVGG(1, 2, 1, "prelu"), (8, 8), "basicsr", "zip", None, "", torch.float32, None),
    ("compact_x3_rgba_bf16", lambda: SRVGG(4, 2, 3, "prelu"), (6, 6), "basicsr", "zip", None, "", torch.bfloat16, None),
    ("compact_x2_relu", lambda: SRVGG(3, 2, 2, "relu"), (8, 8), "basicsr", "zip", None, "", torch.float32, {"activation": "relu"}),
    ("compact_x4_leakyrelu", lambda: SRVGG(3, 1, 4, "leakyrelu"), (6, 7), "basicsr", "legacy", None, "", torch.float32, {"activation": "leakyrelu"}),
]


def save(obj, path, container):
    torch.save(obj, path, _use_new_zipfile_serialization=(container == "zip"))


def main(out_dir):
    os.makedirs(out_dir, exist_ok=True)
    for i, (name, make, (h, w), layout, container, wrapper, prefix, dtype, sidecar) in enumerate(CASES):
        torch.manual_seed(1000 + i)
        net = make().eval()
        # Weights as the file stores them (fp16/bf16 rounded), computed in f64.
        for p in net.parameters():
            with torch.no_grad():
                p.copy_((p * 0.5).to(dtype).to(torch.float32))
        sd = net.state_dict()
        if layout == "old":
            sd = old_names(sd, net.ups)
        elif layout == "trunk":
            sd = trunk_names(sd)
        sd = {prefix + k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
        obj = sd if wrapper is None else {wrapper: sd, "iter": 1000}
        if wrapper == "params_ema":
            # The EMA weights are the ones to use; a training copy beside them is ignored.
            obj["params"] = {k: torch.zeros_like(v) for k, v in sd.items()}
        save(obj, os.path.join(out_dir, f"{name}.pth"), container)
        if sidecar:
            with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
                json.dump(sidecar, f)
        channels = net.conv_first.in_channels // (net.unshuffle ** 2) if isinstance(net, RRDBNet) else net.body[0].in_channels
        x = torch.rand(1, channels, h, w, dtype=torch.float64)
        with torch.no_grad():
            y = net.double()(x)
        save_file({"input": x.float().contiguous(), "output": y.float().contiguous()},
                  os.path.join(out_dir, f"{name}.io.safetensors"))

    # Refused ones.
    torch.manual_seed(7)
    good = RRDBNet(3, 3, 2).state_dict()
    for container in ("zip", "legacy"):
        buf = io.BytesIO()
        torch.save(good, buf, _use_new_zipfile_serialization=(container == "zip"))
        data = buf.getvalue()
        with open(os.path.join(out_dir, f"refused_truncated_{container}.pth"), "wb") as f:
            f.write(data[: len(data) * 2 // 3])
    save([1, 2, 3], os.path.join(out_dir, "refused_not_a_state_dict.pth"), "zip")
    unknown = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 3, 1))
    save({"encoder": unknown.state_dict()}, os.path.join(out_dir, "refused_foreign_arch.pth"), "zip")
    torch.jit.save(torch.jit.script(nn.Conv2d(3, 3, 3)), os.path.join(out_dir, "refused_torchscript.pt"))
    compact_relu = SRVGG(3, 1, 2, "relu").state_dict()
    save(compact_relu, os.path.join(out_dir, "refused_compact_without_sidecar.pth"), "zip")


def bench(out_dir):
    global NF, NB, GC
    os.makedirs(out_dir, exist_ok=True)
    for name, (nf, nb, gc), ups in [("lite-x4", (32, 12, 32), 2), ("restore-x1", (64, 23, 32), 0)]:
        NF, NB, GC = nf, nb, gc
        torch.manual_seed(nf * 100 + nb)
        net = RRDBNet(3, 3, ups).eval()
        with torch.no_grad():
            for p in net.parameters():
                p.mul_(0.1)
        save(old_names(net.state_dict(), ups), os.path.join(out_dir, f"{name}.pth"), "zip")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--bench":
        bench(sys.argv[2])
    elif len(sys.argv) == 2:
        main(sys.argv[1])
    else:
        sys.exit(__doc__)
