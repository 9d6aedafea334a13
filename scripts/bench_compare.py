"""Compare upscaler's CPU forward-pass speed with onnxruntime on the same networks.

What it measures: for each model and square input size, the median seconds of one forward
pass of `upscaler bench` (candle, this project) and of onnxruntime running the same network,
built here as an ONNX graph from the same weights (weights/<model>.safetensors, fp16
convolution weights widened to f32 exactly as upscaler does). It prints both, their GFLOP/s
(GFLOP as `upscaler bench` counts it: 2 x the multiply-adds of direct convolution) and the
ratio onnxruntime s / upscaler s: above 1 means upscaler is faster.

Before timing, each ONNX network is checked against `upscaler upscale --tile 0` on a small
fixed image: the 8-bit outputs must differ by at most 1 anywhere, else the script stops.

How to run (from anywhere; the wrapper creates .venv-bench on first use):

    cargo build --release
    scripts/bench-compare                                  # x4plus + animevideov3, 128 and 256
    scripts/bench-compare --models realesr-animevideov3 --sizes 64 --runs 1
    scripts/bench-compare --json                           # one JSON object per case
    scripts/bench-compare --whole png --runs 5             # whole `upscaler upscale` runs
    UPSCALER_BIN=path/to/upscaler scripts/bench-compare    # another build

onnxruntime runs with intra_op_num_threads = the number of usable cores, all graph
optimisations and sequential execution. Both sides warm up once and report the median of
--runs passes; the two are run back to back per case so that background load hits both.
Results only mean something on an otherwise idle machine: close other work, and rerun to
see how much the numbers move.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WEIGHTS_DIR = REPO / "weights"

# name -> architecture family; RRDBNet block count and SRVGG conv count come from the file.
MODELS = {
    "realesrgan-x4plus": "rrdb",
    "realesrgan-x4plus-anime": "rrdb",
    "realesr-animevideov3": "srvgg",
}
DEFAULT_MODELS = ["realesrgan-x4plus", "realesr-animevideov3"]
DEFAULT_SIZES = [128, 256]
# Input side for the correctness check (small: upscaler runs it once, in full).
CHECK_SIZES = {"rrdb": 16, "srvgg": 32}
SCALE = 4
OPSET = 17


def fail(msg: str, code: int = 1) -> None:
    print(f"bench-compare: {msg}", file=sys.stderr)
    sys.exit(code)


def find_binary() -> Path:
    env = os.environ.get("UPSCALER_BIN")
    if env:
        found = shutil.which(env) if os.sep not in env else (env if os.path.isfile(env) else None)
        if not found:
            fail(f"UPSCALER_BIN={env} is not an executable file", 2)
        return Path(found).resolve()
    release = REPO / "target" / "release" / "upscaler"
    if release.is_file():
        return release
    fail("no target/release/upscaler: run `cargo build --release` first "
         "(or set UPSCALER_BIN to the binary to measure)", 2)
    raise AssertionError


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


# --------------------------------------------------------------------------- ONNX graphs


class GraphBuilder:
    """Collects nodes and initializers for one NCHW float32 graph."""

    def __init__(self, tensors: dict):
        from onnx import TensorProto, helper, numpy_helper

        self.helper = helper
        self.numpy_helper = numpy_helper
        self.TensorProto = TensorProto
        self.tensors = tensors
        self.used: set[str] = set()
        self.nodes = []
        self.inits = []
        self.count = 0

    def fresh(self, stem: str) -> str:
        self.count += 1
        return f"{stem}_{self.count}"

    def weight(self, key: str):
        import numpy as np

        if key not in self.tensors:
            fail(f"weights file has no tensor {key!r}")
        self.used.add(key)
        return np.ascontiguousarray(self.tensors[key], dtype=np.float32)

    def const(self, name: str, array) -> str:
        self.inits.append(self.numpy_helper.from_array(array, name))
        return name

    def node(self, op: str, inputs: list[str], **attrs) -> str:
        out = self.fresh(op.lower())
        self.nodes.append(self.helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def conv(self, x: str, prefix: str) -> str:
        w = self.const(f"{prefix}.weight", self.weight(f"{prefix}.weight"))
        b = self.const(f"{prefix}.bias", self.weight(f"{prefix}.bias"))
        return self.node("Conv", [x, w, b], kernel_shape=[3, 3], pads=[1, 1, 1, 1],
                         strides=[1, 1], dilations=[1, 1], group=1)

    def lrelu(self, x: str) -> str:
        return self.node("LeakyRelu", [x], alpha=0.2)

    def prelu(self, x: str, key: str) -> str:
        slope = self.weight(key).reshape(-1, 1, 1)
        return self.node("PRelu", [x, self.const(key, slope)])

    def scalar(self, value: float) -> str:
        import numpy as np

        name = f"const_{value}"
        if not any(i.name == name for i in self.inits):
            self.const(name, np.array(value, dtype=np.float32))
        return name

    def mul(self, x: str, value: float) -> str:
        return self.node("Mul", [x, self.scalar(value)])

    def add(self, a: str, b: str) -> str:
        return self.node("Add", [a, b])

    def concat(self, xs: list[str]) -> str:
        return self.node("Concat", xs, axis=1)

    def upsample_nearest(self, x: str, factor: int) -> str:
        import numpy as np

        scales = f"scales_{factor}"
        if not any(i.name == scales for i in self.inits):
            self.const(scales, np.array([1, 1, factor, factor], dtype=np.float32))
        # asymmetric + floor: output pixel (y, x) takes input (y // f, x // f), as PyTorch's
        # F.interpolate(mode="nearest") does.
        return self.node("Resize", [x, "", scales], mode="nearest",
                         coordinate_transformation_mode="asymmetric", nearest_mode="floor")

    def finish(self, x: str, out_name: str, graph_name: str):
        import onnx

        self.nodes.append(self.helper.make_node("Identity", [x], [out_name], name="output_id"))
        left = sorted(set(self.tensors) - self.used)
        if left:
            fail(f"{graph_name}: tensors not used by the graph: {left[:5]}...")
        f = self.TensorProto.FLOAT
        graph = self.helper.make_graph(
            self.nodes, graph_name,
            [self.helper.make_tensor_value_info("input", f, [1, 3, "h", "w"])],
            [self.helper.make_tensor_value_info(out_name, f, [1, 3, "H", "W"])],
            initializer=self.inits,
        )
        model = self.helper.make_model(
            graph, opset_imports=[self.helper.make_opsetid("", OPSET)],
            producer_name="upscaler bench-compare")
        onnx.checker.check_model(model)
        return model


def build_rrdbnet(tensors: dict, name: str):
    """RRDBNet (BasicSR rrdbnet_arch.py), scale 4, num_feat 64, num_grow_ch 32."""
    num_block = 1 + max(int(k.split(".")[1]) for k in tensors if k.startswith("body."))
    g = GraphBuilder(tensors)

    def rdb(x: str, prefix: str) -> str:
        feats = [x]
        for i in range(1, 5):
            inp = feats[0] if len(feats) == 1 else g.concat(feats)
            feats.append(g.lrelu(g.conv(inp, f"{prefix}.conv{i}")))
        x5 = g.conv(g.concat(feats), f"{prefix}.conv5")
        return g.add(g.mul(x5, 0.2), x)

    feat = g.conv("input", "conv_first")
    body = feat
    for i in range(num_block):
        out = body
        for r in (1, 2, 3):
            out = rdb(out, f"body.{i}.rdb{r}")
        body = g.add(g.mul(out, 0.2), body)
    feat = g.add(feat, g.conv(body, "conv_body"))
    feat = g.lrelu(g.conv(g.upsample_nearest(feat, 2), "conv_up1"))
    feat = g.lrelu(g.conv(g.upsample_nearest(feat, 2), "conv_up2"))
    out = g.conv(g.lrelu(g.conv(feat, "conv_hr")), "conv_last")
    return g.finish(out, "output", name)


def build_srvgg(tensors: dict, name: str):
    """SRVGGNetCompact (Real-ESRGAN srvgg_arch.py): convs at body.{2k}, PReLUs at body.{2k+1}."""
    last = max(int(k.split(".")[1]) for k in tensors if k.startswith("body."))
    g = GraphBuilder(tensors)
    x = "input"
    for i in range(0, last + 1, 2):
        x = g.conv(x, f"body.{i}")
        if i + 1 <= last:
            x = g.prelu(x, f"body.{i + 1}.weight")
    x = g.node("DepthToSpace", [x], blocksize=SCALE, mode="CRD")
    x = g.add(x, g.upsample_nearest("input", SCALE))
    return g.finish(x, "output", name)


def load_network(model: str):
    from safetensors.numpy import load_file

    path = WEIGHTS_DIR / f"{model}.safetensors"
    if not path.is_file():
        fail(f"missing weights file {path}")
    tensors = load_file(str(path))
    if MODELS[model] == "rrdb":
        return build_rrdbnet(tensors, model)
    return build_srvgg(tensors, model)


def make_session(onnx_model, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(onnx_model.SerializeToString(), sess_options=opts,
                                providers=["CPUExecutionProvider"])


# --------------------------------------------------------------------------- checks


def check_image(size: int):
    """A fixed, colourful size x size RGB image: smooth gradients plus noise."""
    import numpy as np

    rng = np.random.default_rng(20240611)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1)
    base = np.stack([xx, yy, 1.0 - (xx + yy) / 2], axis=-1) * 200.0
    noise = rng.integers(0, 56, size=(size, size, 3))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def check_model(binary: Path, model: str, session) -> dict:
    import numpy as np
    from PIL import Image

    size = CHECK_SIZES[MODELS[model]]
    img = check_image(size)
    with tempfile.TemporaryDirectory(prefix="bench-compare-") as tmp:
        src, dst = Path(tmp) / "in.png", Path(tmp) / "out.png"
        Image.fromarray(img, "RGB").save(src)
        cmd = [str(binary), "upscale", str(src), "-o", str(dst), "--model", model,
               "--tile", "0", "--weights-dir", str(WEIGHTS_DIR)]
        run = subprocess.run(cmd, capture_output=True, text=True)
        if run.returncode != 0:
            fail(f"{' '.join(cmd)} failed ({run.returncode}):\n{run.stderr}")
        with Image.open(dst) as im:
            if im.mode != "RGB":
                fail(f"{model}: upscaler wrote a {im.mode} PNG, expected 8-bit RGB")
            ours = np.asarray(im, dtype=np.uint8)
    x = img.astype(np.float32).transpose(2, 0, 1)[None] / 255.0
    y = session.run(None, {"input": x})[0][0].transpose(1, 2, 0)
    theirs = np.round(np.clip(y, 0.0, 1.0) * 255.0).astype(np.uint8)
    if ours.shape != theirs.shape:
        fail(f"{model}: output shapes differ: upscaler {ours.shape}, onnxruntime {theirs.shape}")
    diff = np.abs(ours.astype(np.int16) - theirs.astype(np.int16))
    return {
        "model": model,
        "input": f"{size}x{size}",
        "output": f"{ours.shape[1]}x{ours.shape[0]}",
        "max_abs_diff": int(diff.max()),
        "differing_values": int((diff > 0).sum()),
        "values": int(diff.size),
    }


# --------------------------------------------------------------------------- timing


def time_upscaler(binary: Path, model: str, size: int, runs: int) -> dict:
    cmd = [str(binary), "bench", "--models", model, "--sizes", str(size), "--runs", str(runs),
           "--json", "--weights-dir", str(WEIGHTS_DIR)]
    run = subprocess.run(cmd, capture_output=True, text=True)
    if run.returncode != 0:
        fail(f"{' '.join(cmd)} failed ({run.returncode}):\n{run.stderr}")
    rows = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    if len(rows) != 1:
        fail(f"expected one JSON line from {' '.join(cmd)}, got:\n{run.stdout}")
    return rows[0]


def median(values: list[float]) -> float:
    """The same median as `upscaler bench`: the upper middle element."""
    return sorted(values)[len(values) // 2]


def onnxruntime_pass(session, x) -> float:
    start = time.perf_counter()
    session.run(None, {"input": x})
    return time.perf_counter() - start


def random_input(size: int):
    import numpy as np

    return np.random.default_rng(size).random((1, 3, size, size), dtype=np.float32)


def time_onnxruntime(session, size: int, runs: int) -> dict:
    x = random_input(size)
    onnxruntime_pass(session, x)  # warm-up
    times = [onnxruntime_pass(session, x) for _ in range(max(runs, 1))]
    return {"seconds": median(times), "min_seconds": min(times), "runs": len(times)}


def whole_upscale(binary: Path, model: str, src: Path, dst: Path) -> dict:
    """One `upscaler upscale` process, start to exit: wall, user and sys seconds."""
    import resource

    cmd = [str(binary), "upscale", str(src), "-o", str(dst), "--model", model,
           "--weights-dir", str(WEIGHTS_DIR)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    run = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if run.returncode != 0:
        fail(f"{' '.join(cmd)} failed ({run.returncode}):\n{run.stderr}")
    return {"wall": wall, "user": after.ru_utime - before.ru_utime,
            "sys": after.ru_stime - before.ru_stime}


def time_whole(binary: Path, model: str, session, size: int, runs: int, fmt: str) -> dict:
    """The whole `upscaler upscale` of a size x size image (load, decode, network, encode,
    write) against onnxruntime's network alone on the same size, interleaved run by run."""
    from PIL import Image

    x = random_input(size)
    onnxruntime_pass(session, x)  # warm-up
    ort_times, runs_seen = [], []
    with tempfile.TemporaryDirectory(prefix="bench-compare-") as tmp:
        src, dst = Path(tmp) / f"in.{fmt}", Path(tmp) / f"out.{fmt}"
        Image.fromarray(check_image(size), "RGB").save(src, quality=92)
        whole_upscale(binary, model, src, dst)  # warm-up: page cache, CPU frequency
        for _ in range(max(runs, 1)):
            ort_times.append(onnxruntime_pass(session, x))
            runs_seen.append(whole_upscale(binary, model, src, dst))
    walls = [r["wall"] for r in runs_seen]
    mid = sorted(runs_seen, key=lambda r: r["wall"])[len(runs_seen) // 2]
    return {
        "whole_seconds": median(walls),
        "whole_min_seconds": min(walls),
        "whole_user_seconds": mid["user"],
        "whole_sys_seconds": mid["sys"],
        "onnxruntime_seconds": median(ort_times),
        "ratio_ort_network_over_whole": median(ort_times) / median(walls),
    }


# --------------------------------------------------------------------------- main


def int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of integers: {text!r}")
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"sizes must be positive: {text!r}")
    return values


def model_list(text: str) -> list[str]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [n for n in names if n not in MODELS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown model(s) {unknown}; choose from {', '.join(MODELS)}")
    return names


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="scripts/bench-compare",
        description="Forward-pass speed of upscaler vs onnxruntime on the same networks and "
                    "weights, after a pixel check. Needs a quiet machine.")
    parser.add_argument("--models", type=model_list, default=DEFAULT_MODELS,
                        help=f"comma-separated (default: {','.join(DEFAULT_MODELS)}; "
                             f"known: {','.join(MODELS)})")
    parser.add_argument("--sizes", type=int_list, default=DEFAULT_SIZES,
                        help="comma-separated square input sizes (default: 128,256)")
    parser.add_argument("--runs", type=int, default=3,
                        help="timed passes per case after one warm-up; median reported "
                             "(default: 3)")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object per case on stdout (progress on stderr)")
    parser.add_argument("--whole", choices=["png", "jpg"],
                        help="time whole `upscaler upscale` runs of a PNG or JPEG of each "
                             "size (process start to exit) against onnxruntime's network "
                             "alone, interleaved run by run")
    parser.add_argument("--skip-check", action="store_true",
                        help="skip the pixel comparison with `upscaler upscale`")
    args = parser.parse_args()
    if args.runs < 1:
        parser.error("--runs must be at least 1")

    binary = find_binary()
    import onnxruntime as ort

    threads = usable_cores()
    log = sys.stderr if args.json else sys.stdout
    print(f"upscaler: {binary}", file=log)
    print(f"onnxruntime {ort.__version__}: {threads} intra-op threads, sequential, "
          f"all graph optimisations", file=log)

    sessions = {}
    for model in args.models:
        sessions[model] = make_session(load_network(model), threads)

    if not args.skip_check:
        for model in args.models:
            c = check_model(binary, model, sessions[model])
            ok = c["max_abs_diff"] <= 1
            print(f"check {model}: {c['input']} -> {c['output']}, max |diff| "
                  f"{c['max_abs_diff']} (8-bit), {c['differing_values']} of {c['values']} "
                  f"values differ: {'ok' if ok else 'MISMATCH'}", file=log)
            if not ok:
                fail(f"{model}: the ONNX network and upscaler disagree (max |diff| "
                     f"{c['max_abs_diff']} > 1); timings would compare different work")

    if args.whole:
        whole_main(binary, args, sessions, log)
        return

    rows = []
    if not args.json:
        print(f"\n{'model':<24} {'input':>9} {'upscaler s':>11} {'ort s':>9} "
              f"{'upscaler GF/s':>14} {'ort GF/s':>9} {'ort/upscaler':>13}")
    for model in args.models:
        for size in args.sizes:
            ours = time_upscaler(binary, model, size, args.runs)
            theirs = time_onnxruntime(sessions[model], size, args.runs)
            gflop = float(ours["gflop"])
            row = {
                "model": model,
                "width": size,
                "height": size,
                "runs": args.runs,
                "gflop": gflop,
                "upscaler_seconds": ours["seconds"],
                "upscaler_min_seconds": ours["min_seconds"],
                "upscaler_gflops_per_s": gflop / ours["seconds"],
                "upscaler_peak_rss_bytes": ours.get("peak_rss_bytes"),
                "onnxruntime_seconds": theirs["seconds"],
                "onnxruntime_min_seconds": theirs["min_seconds"],
                "onnxruntime_gflops_per_s": gflop / theirs["seconds"],
                "ratio_ort_over_upscaler": theirs["seconds"] / ours["seconds"],
                "onnxruntime_version": ort.__version__,
                "threads": threads,
            }
            rows.append(row)
            if args.json:
                print(json.dumps(row), flush=True)
            else:
                print(f"{model:<24} {f'{size}x{size}':>9} {row['upscaler_seconds']:>11.3f} "
                      f"{row['onnxruntime_seconds']:>9.3f} "
                      f"{row['upscaler_gflops_per_s']:>14.1f} "
                      f"{row['onnxruntime_gflops_per_s']:>9.1f} "
                      f"{row['ratio_ort_over_upscaler']:>12.2f}x", flush=True)
    if not args.json:
        print("\nort/upscaler above 1: upscaler is faster. Medians of "
              f"{args.runs} pass(es) after a warm-up; rerun on a quiet machine to judge noise.")


def whole_main(binary: Path, args, sessions: dict, log) -> None:
    if not args.json:
        print(f"\nwhole `upscaler upscale` of a {args.whole.upper()} against onnxruntime's "
              f"network alone\n{'model':<24} {'input':>9} {'whole s':>8} {'user s':>7} "
              f"{'sys s':>6} {'sys %':>6} {'ort s':>8} {'ort/whole':>10}")
    for model in args.models:
        for size in args.sizes:
            t = time_whole(binary, model, sessions[model], size, args.runs, args.whole)
            row = {"model": model, "width": size, "height": size, "runs": args.runs,
                   "format": args.whole, **t, "onnxruntime_version": ort_version()}
            if args.json:
                print(json.dumps(row), flush=True)
                continue
            sys_share = 100.0 * t["whole_sys_seconds"] / t["whole_seconds"]
            print(f"{model:<24} {f'{size}x{size}':>9} {t['whole_seconds']:>8.3f} "
                  f"{t['whole_user_seconds']:>7.2f} {t['whole_sys_seconds']:>6.2f} "
                  f"{sys_share:>5.1f}% {t['onnxruntime_seconds']:>8.3f} "
                  f"{t['ratio_ort_network_over_whole']:>9.2f}x", flush=True)
    if not args.json:
        print(f"\nMedians of {args.runs} interleaved run(s) after a warm-up; user and sys are "
              "those of the median run.")


def ort_version() -> str:
    import onnxruntime as ort

    return ort.__version__


if __name__ == "__main__":
    main()
