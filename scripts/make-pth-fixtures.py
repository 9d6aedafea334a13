#!/usr/bin/env python3
"""Writes tiny PyTorch-format checkpoints (zip + pickle, as torch.save does) for the .pth
loader tests, without needing torch installed.

The network is a 4-feature, 1-conv SRVGGNetCompact (see tests/pth.rs). Conv weights are fp16,
biases and PReLU slopes fp32, as in the official Real-ESRGAN checkpoints. Values follow a
fixed pattern so the tests can check them exactly.

Usage: scripts/make-pth-fixtures.py OUT_DIR
"""
import collections
import io
import pickle
import struct
import sys
import types
import zipfile

# Stand-ins for the torch globals a checkpoint names; pickle records them by module and name.
torch = types.ModuleType("torch")
torch_utils = types.ModuleType("torch._utils")


class FloatStorage:
    pass


class HalfStorage:
    pass


def _rebuild_tensor_v2(*args):
    raise NotImplementedError


for cls in (FloatStorage, HalfStorage):
    cls.__module__ = "torch"
    setattr(torch, cls.__name__, cls)
_rebuild_tensor_v2.__module__ = "torch._utils"
torch_utils._rebuild_tensor_v2 = _rebuild_tensor_v2
sys.modules["torch"] = torch
sys.modules["torch._utils"] = torch_utils


class Storage:
    def __init__(self, key, kind, numel):
        self.key, self.kind, self.numel = key, kind, numel


class Tensor:
    def __init__(self, storage, shape):
        self.storage, self.shape = storage, shape

    def __reduce__(self):
        stride, acc = [], 1
        for d in reversed(self.shape):
            stride.insert(0, acc)
            acc *= d
        return (_rebuild_tensor_v2,
                (self.storage, 0, tuple(self.shape), tuple(stride), False, collections.OrderedDict()))


class Pickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, Storage):
            return ("storage", obj.kind, obj.key, "cpu", obj.numel)
        return None


LAYOUT = [  # name, shape, fp16?
    ("body.0.weight", (4, 3, 3, 3), True), ("body.0.bias", (4,), False),
    ("body.1.weight", (4,), False),
    ("body.2.weight", (4, 4, 3, 3), True), ("body.2.bias", (4,), False),
    ("body.3.weight", (4,), False),
    ("body.4.weight", (48, 4, 3, 3), True), ("body.4.bias", (48,), False),
]


def value(i, offset):
    return ((i * 7 + offset) % 17 - 8) / 64.0


def state_dict(offset, storages):
    sd = collections.OrderedDict()
    for name, shape, half in LAYOUT:
        n = 1
        for d in shape:
            n *= d
        vals = [value(i, offset) for i in range(n)]
        data = struct.pack(f"<{n}e" if half else f"<{n}f", *vals)
        key = str(len(storages))
        storages.append((key, data))
        sd[name] = Tensor(Storage(key, HalfStorage if half else FloatStorage, n), shape)
    return sd


def save(path, make_obj):
    storages = []
    obj = make_obj(storages)
    buf = io.BytesIO()
    Pickler(buf, protocol=2).dump(obj)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", buf.getvalue())
        for key, data in storages:
            z.writestr(f"archive/data/{key}", data)
        z.writestr("archive/version", "3\n")


if __name__ == "__main__":
    out = sys.argv[1]
    # Real-ESRGAN releases: {"params_ema": ...} (sometimes beside "params"); the EMA weights win.
    save(f"{out}/tiny_srvgg_ema.pth",
         lambda s: {"params": state_dict(5, s), "params_ema": state_dict(0, s)})
    save(f"{out}/tiny_srvgg_params.pth", lambda s: {"params": state_dict(0, s)})
    save(f"{out}/tiny_srvgg_plain.pth", lambda s: state_dict(0, s))
