"""Which products an int8 ONNX graph should quantize: the variants behind ``export --int8``'s choice.

    python -m bench.int8_variants                                   # tiny and mid (random weights), 224 px
    python -m bench.int8_variants --checkpoint demo_out/checkpoints/epoch_8.pth --data demo_out/data

Each variant is ``onnxruntime.quantization.quantize_dynamic`` (int8 weights, activations quantized
per call) on ``glocalclip export``'s float32 graph, with a different choice of MatMuls, or ORT's
block-wise 8-bit ``MatMulNBits`` (``nbits``). The row ``export --int8`` is the file the flag writes
(``export_onnx(int8=True)``). Every file scores the same images (the data set's test images, else
synthetic ones, resized to S); the table gives the time per image at ``--batch`` (alternating rounds,
best kept), the file size and the deviation from the float32 graph: largest score difference,
largest map difference over the float32 maps' range, and, where the checkpoint stores a threshold,
how many labels flip. docs/speed.md ("int8 weights") has the numbers. Writes JSON (default
bench/results/int8_variants.json).
"""
from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from tabulate import tabulate

from glocalclip import GlocalCLIP
from glocalclip.deploy.export import export_onnx, exported_files
from glocalclip.deploy.int8 import block_weight_shapes

from .common import RESULTS_DIR, model_config, write_report

#: name -> (which constant-weight MatMuls, quantize_dynamic's options); roles: "qkv", "out", "fc",
#: "mlp_proj" (the blocks'), "other" (visual projection, scoring with the text features)
VARIANTS: dict[str, tuple[set[str], dict[str, Any]]] = {
    "every MatMul, per tensor (issue 20's first try)": ({"qkv", "out", "fc", "mlp_proj", "other"}, {}),
    "every MatMul, per channel": ({"qkv", "out", "fc", "mlp_proj", "other"}, {"per_channel": True}),
    "every MatMul, per channel, reduce_range": ({"qkv", "out", "fc", "mlp_proj", "other"},
                                                 {"per_channel": True, "reduce_range": True}),
    "blocks only, per tensor": ({"qkv", "out", "fc", "mlp_proj"}, {}),
    "blocks only, per channel": ({"qkv", "out", "fc", "mlp_proj"}, {"per_channel": True}),
    "blocks but the first and last, per channel": ({"qkv", "out", "fc", "mlp_proj"},
                                                    {"per_channel": True, "skip_end_blocks": True}),
    "blocks only, per channel, uint8 weights": ({"qkv", "out", "fc", "mlp_proj"}, {"per_channel": True, "uint8": True}),
    "blocks but out-proj, per tensor": ({"qkv", "fc", "mlp_proj"}, {}),
    "blocks but out-proj, per channel (= export --int8)": ({"qkv", "fc", "mlp_proj"}, {"per_channel": True}),
    "blocks only, MatMulNBits 8-bit, blocks of 32, int8 compute": ({"qkv", "out", "fc", "mlp_proj"},
                                                                    {"nbits": 4}),
    "blocks only, MatMulNBits 8-bit, blocks of 32, fp32 compute": ({"qkv", "out", "fc", "mlp_proj"},
                                                                    {"nbits": None}),
}


def matmul_roles(model, width: int, mlp_width: int) -> list[tuple[str, str, int]]:
    """(node name, role, block index) of every MatMul with a constant weight, in graph order."""
    dims = {t.name: tuple(t.dims) for t in model.graph.initializer}
    role_of = {(width, 3 * width): "qkv", (width, width): "out", (width, mlp_width): "fc", (mlp_width, width): "mlp_proj"}
    rows, block = [], -1
    for n in model.graph.node:
        if n.op_type != "MatMul" or len(n.input) != 2 or n.input[1] not in dims:
            continue
        role = role_of.get(dims[n.input[1]], "other")
        block += role == "qkv"
        rows.append((n.name, role, block))
    return rows


def quantize_variant(fp32: Path, out: Path, roles: list[tuple[str, str, int]], chosen: set[str],
                     options: dict[str, Any]) -> None:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    last = max(b for _, _, b in roles)
    names = [n for n, r, b in roles if r in chosen and not (options.get("skip_end_blocks") and r != "other"
                                                            and b in (0, last))]
    logging.disable(logging.WARNING)
    try:
        if "nbits" in options:
            from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

            q = MatMulNBitsQuantizer(onnx.load(str(fp32)), bits=8, block_size=32, is_symmetric=True,
                                     accuracy_level=options["nbits"], op_types_to_quantize=("MatMul",),
                                     nodes_to_exclude=[n for n, _, _ in roles if n not in names])
            q.process()
            q.model.save_model_to_file(str(out), True)
        else:
            quantize_dynamic(str(fp32), str(out), nodes_to_quantize=names, op_types_to_quantize=["MatMul"],
                             per_channel=options.get("per_channel", False), reduce_range=options.get("reduce_range", False),
                             weight_type=QuantType.QUInt8 if options.get("uint8") else QuantType.QInt8,
                             use_external_data_format=True)
    finally:
        logging.disable(logging.NOTSET)


def test_images(data: Optional[str], size: int, count: int) -> np.ndarray:
    """uint8 [N, S, S, 3]: the data set's test images (sorted), else synthetic textures with defects."""
    from PIL import Image

    if data is not None:
        files = sorted(Path(data).glob("*/test/*/*.png"))[:count]
        return np.stack([np.asarray(Image.open(f).convert("RGB").resize((size, size), Image.BICUBIC)) for f in files])
    from glocalclip.datasets.synthetic import SYNTHETIC_CLASSES, make_sample

    rng = np.random.default_rng(0)
    return np.stack([make_sample(SYNTHETIC_CLASSES[i % 3], size, i % 2 == 1, rng)[0] for i in range(count)])


def measure(name: str, checkpoint: Path, workdir: Path, args: argparse.Namespace) -> dict:
    import onnx
    import onnxruntime as ort

    from glocalclip.deploy.metadata import DeployMetadata

    files = {"float32": workdir / "fp32.onnx", "export --int8": workdir / "int8.onnx"}
    export_onnx(checkpoint, files["float32"], sigma=4.0)
    export_onnx(checkpoint, files["export --int8"], sigma=4.0, int8=True)
    proto = onnx.load(str(files["float32"]), load_external_data=False)
    meta = DeployMetadata.from_props({p.key: p.value for p in proto.metadata_props})
    dims = [tuple(t.dims) for t in proto.graph.initializer if len(t.dims) == 2]  # widths from the graph's shapes:
    width = next(a for a, b in dims if b == 3 * a)  # the qkv weight is [W, 3W], the MLP's [W, M] and [M, W]
    mlp_width = next(b for a, b in dims if a == width and b not in (width, 3 * width) and (b, width) in dims)
    assert block_weight_shapes(width, mlp_width) <= set(dims)
    roles = matmul_roles(proto, width, mlp_width)
    for i, (variant, (chosen, options)) in enumerate(VARIANTS.items()):
        if args.variants and variant not in args.variants:
            continue
        files[variant] = workdir / f"v{i}.onnx"
        quantize_variant(files["float32"], files[variant], roles, chosen, options)
    pixels = test_images(args.data, meta.image_size, args.images)
    sessions = {k: ort.InferenceSession(str(f), providers=["CPUExecutionProvider"]) for k, f in files.items()}
    outputs = {}
    for k, s in sessions.items():
        parts = [s.run(None, {"images": pixels[i:i + 1]}) for i in range(len(pixels))]  # one at a time, as shipped
        outputs[k] = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    batch = pixels[:args.batch]
    best = {k: float("inf") for k in sessions}
    for r in range(args.repeats):
        for k, s in sessions.items():
            t0 = time.perf_counter()
            s.run(None, {"images": batch})
            best[k] = min(best[k], time.perf_counter() - t0)
        print(f"{name} round {r + 1}/{args.repeats}", flush=True)
    same = "blocks but out-proj, per channel (= export --int8)"
    if same in outputs and not all(np.array_equal(a, b) for a, b in zip(outputs[same], outputs["export --int8"])):
        raise AssertionError(f"{same!r} is not the file export --int8 writes: change one or the other")
    s32, m32 = outputs["float32"]
    span = float(m32.max() - m32.min())
    rows = []
    for k in sessions:
        s, m = outputs[k]
        row = {"variant": k, "s_per_image": best[k] / len(batch), "speedup": best["float32"] / best[k],
               "mb": sum(f.stat().st_size for f in exported_files(files[k])) / 1e6,
               "score_max_diff": float(np.abs(s - s32).max()), "map_max_diff_of_range": float(np.abs(m - m32).max()) / span}
        if meta.threshold is not None:
            row["label_flips"] = int(((s >= meta.threshold) != (s32 >= meta.threshold)).sum())  # label_of's rule
        rows.append(row)
    return {"model": name, "image_size": meta.image_size, "images": len(pixels), "batch": len(batch),
            "map_range": span, "threshold": meta.threshold, "rows": rows}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", choices=("tiny", "mid"), default=["tiny", "mid"],
                   help="random-weight model sizes (bench/common.py), at --image_size")
    p.add_argument("--image_size", type=int, default=224, help="input side of the random-weight models")
    p.add_argument("--checkpoint", default=None, help="a trained checkpoint instead (e.g. glocalclip demo's), at its size")
    p.add_argument("--data", default=None, help="a data set in the MVTec layout whose test images are scored "
                                                "(default: synthetic textures)")
    p.add_argument("--images", type=int, default=32, help="images scored by every file")
    p.add_argument("--batch", type=int, default=2, help="images per timed run")
    p.add_argument("--repeats", type=int, default=5, help="alternating timing rounds, best kept")
    p.add_argument("--variants", nargs="*", default=None, help="only these variants (names as in the table)")
    p.add_argument("--json", default=str(RESULTS_DIR / "int8_variants.json"), help="where to write the results")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    report = {"load_average": " ".join(f"{x:.2f}" for x in os.getloadavg()), "threads": torch.get_num_threads(),
              "models": []}
    with tempfile.TemporaryDirectory(prefix="int8_variants-") as tmp:
        if args.checkpoint is not None:
            report["models"].append(measure(Path(args.checkpoint).name, Path(args.checkpoint), Path(tmp), args))
        else:
            for kind in args.configs:
                work = Path(tmp) / kind
                work.mkdir()
                torch.manual_seed(0)
                torch.save(GlocalCLIP(model_config(kind).replace(image_size=args.image_size)).checkpoint(0), work / "m.pth")
                report["models"].append(measure(kind, work / "m.pth", work, args))
    report["load_average_after"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    for m in report["models"]:
        print(f"\n{m['model']} at {m['image_size']} px, {m['images']} images, batch {m['batch']}, "
              f"map range {m['map_range']:.3g}, threshold {m['threshold']}")
        print(tabulate([[r["variant"], f"{r['s_per_image']:.4f}", f"{r['speedup']:.2f}x", f"{r['mb']:.1f}",
                         f"{r['score_max_diff']:.2e}", f"{100 * r['map_max_diff_of_range']:.2f} %",
                         r.get("label_flips", "")] for r in m["rows"]],
                       headers=["variant", "s/image", "vs float32", "MB", "score |Δ|", "map |Δ| / range", "flips"],
                       tablefmt="github"))
    write_report(report, args.json)
    return report


if __name__ == "__main__":
    main()
