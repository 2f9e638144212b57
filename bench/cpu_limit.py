"""How close each CPU inference path comes to this machine's limit, all measured in one process.

    python -m bench.cpu_limit                      # ViT-L-14-336 (random weights) at 518 px, batch 2 (~10 GB RAM)
    python -m bench.cpu_limit --quick              # tiny and mid configs: the same table in < 1 minute
    python -m bench.cpu_limit --no_onnx --repeats 3

1. GEMM peak: a 4096² matrix product in fp32 and in bf16 (best of ``--repeats``).
2. Attention kernels at the model's token count (1370 at 518 px): every kernel of
   ``glocalclip.model.attention`` and a plain matmul + softmax, fp32 and bf16, in GFLOP/s.
3. The vision forward per image at ``--batch``, timed in alternating rounds, best round kept (a
   shared machine slows some rounds): the original code's encoder re-run (``bench.original_encoder``),
   ours fp32, ours bf16, ONNX Runtime on ``glocalclip export``'s graph in fp32 and on ``export --int8``'s
   (the same ``export_onnx`` with ``int8=True``: the file the flag ships). Each is printed as s/image
   and as the fraction of its peak (fp32 paths: fp32 peak; bf16 and int8: bf16 peak) that the model's
   FLOPs would take.
4. Where the bf16 forward's time goes (``torch.profiler``, one forward): the matrix products (with
   their GFLOP/s against the bf16 peak), softmax, and everything else; and the bound that puts on
   bf16: the products alone, at the measured bf16 peak, as a multiple of the original's speed.
5. Deviations: ours fp32 against the original (global and patch features), ours bf16 against ours
   fp32 (patch features relative to their scale), ONNX int8 against ONNX fp32 (score and map).

Writes JSON (default bench/results/cpu_limit[_quick].json). The ONNX graph also normalises, scores
and smooths, so its time includes a little more than the encoder.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tabulate import tabulate

from glocalclip import GlocalCLIP
from glocalclip.model.attention import KERNELS

from .common import RESULTS_DIR, model_config, write_report
from .original_encoder import OriginalVisionEncoder


def best_of(fn: Callable[[], object], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def gemm_peak(repeats: int, size: int = 4096) -> dict[str, float]:
    """GFLOP/s of one size x size matrix product per dtype, rounds alternating."""
    mats = {name: torch.randn(size, size).to(dtype) for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
    best = {name: float("inf") for name in mats}
    for _ in range(repeats):
        for name, a in mats.items():
            best[name] = min(best[name], best_of(lambda: a @ a, 1))
    return {name: 2 * size ** 3 / s / 1e9 for name, s in best.items()}


def plain_matmul_softmax(pairs, v):
    """The unblocked reference: scores of every head at once, then softmax, then @ V."""
    scale = v.shape[-1] ** -0.5
    return torch.cat([((q * scale) @ k.transpose(-1, -2)).softmax(-1) @ v for q, k in pairs])


def attention_rates(batch: int, heads: int, tokens: int, head_dim: int, repeats: int) -> list[dict]:
    """GFLOP/s of each kernel on one block's standard + V-V pair, fp32 and bf16, rounds alternating."""
    kernels = {**KERNELS, "matmul+softmax": plain_matmul_softmax}
    g = torch.Generator().manual_seed(0)
    rows = []
    flop = 2 * 4 * batch * heads * tokens ** 2 * head_dim  # two pairs, each Q·Kᵀ and P·V
    for dtype in (torch.float32, torch.bfloat16):
        q, k, v = (torch.randn(batch, heads, tokens, head_dim, generator=g).to(dtype) for _ in range(3))
        best = {name: float("inf") for name in kernels}
        with torch.no_grad():
            for kernel in kernels.values():  # warm-up: the first call of a shape sets up its kernels
                kernel([(q, k), (v, v)], v)
            for _ in range(repeats):
                for name, kernel in kernels.items():
                    best[name] = min(best[name], best_of(lambda: kernel([(q, k), (v, v)], v), 1))
        rows += [{"dtype": str(dtype).replace("torch.", ""), "kernel": name, "ms": 1e3 * s, "gflops": flop / s / 1e9}
                 for name, s in best.items()]
    return rows


def encoder_flops(model: GlocalCLIP) -> float:
    """Multiply-adds x 2 of one image through our encoder as it runs: the patch convolution; in each
    standard block the projections, MLP and attention products; in each dual-path block also the V-V
    attention and its out-projection, except that the last block's standard path is computed for
    the class row alone (nothing reads its other rows); the projection of each distinct selected
    layer and of the class token."""
    vis = model.clip.visual
    c = vis.conv1.out_channels
    p = vis.conv1.kernel_size[0]
    grid = model.cfg.image_size // p
    n = grid * grid + 1
    e = vis.proj.shape[1]
    dual = len(model.visual.dual_blocks)
    standard = len(vis.transformer.resblocks) - dual
    mlp = vis.transformer.resblocks[0].mlp[0].out_features
    attention = 4 * n * n * c  # Q·Kᵀ and P·V for every row
    standard_block = 2 * n * c * (3 * c + c + 2 * mlp) + attention
    dual_block = standard_block + 2 * n * c * c + attention  # + V-V attention and its out-projection
    last_block = 2 * n * c * (3 * c + c) + attention + 2 * c * (c + 2 * mlp) + 4 * n * c  # class row: attention, out, MLP
    blocks = standard * standard_block + (dual - 1) * dual_block + last_block if dual else standard * standard_block
    distinct = len(model.visual(torch.zeros(1, 3, model.cfg.image_size, model.cfg.image_size))[1].tensors)
    return 2 * grid * grid * c * 3 * p * p + blocks + 2 * n * c * e * distinct + 2 * c * e


#: the ops that are matrix products in the CPU forward (self time: their own kernels)
MATRIX_OPS = {"aten::addmm", "aten::mm", "aten::bmm", "aten::mkldnn_convolution", "aten::_scaled_dot_product_flash_attention_for_cpu"}


def time_split(fn: Callable[[], object], batch: int) -> dict[str, float]:
    """Profiled seconds per image of one call of ``fn`` by kind of op (self CPU time): matrix
    products, softmax, and the rest (casts, copies, LayerNorm, GELU, additions)."""
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    split = {"matrix products": 0.0, "softmax": 0.0, "other": 0.0}
    for event in prof.key_averages():
        kind = ("matrix products" if event.key in MATRIX_OPS else
                "softmax" if event.key == "aten::_softmax" else "other")
        split[kind] += event.self_cpu_time_total / 1e6 / batch
    return split


def onnx_sessions(model: GlocalCLIP, workdir: Path, int8: bool) -> dict[str, object]:
    """``OnnxPredictor`` on ``glocalclip export``'s graph of ``model``'s checkpoint: fp32, and
    ``export --int8``'s graph (``export_onnx(int8=True)``, the file the flag ships; the predictor runs
    it one image at a time, as predict and serve do) if ``int8``."""
    from glocalclip.deploy import OnnxPredictor
    from glocalclip.deploy.export import export_onnx

    ckpt = workdir / "model.pth"
    torch.save(model.checkpoint(0), ckpt)
    paths = {"onnx fp32": workdir / "model.onnx"}
    if int8:
        paths["onnx int8 (export --int8)"] = workdir / "model.int8.onnx"
    for name, path in paths.items():
        t0 = time.perf_counter()
        export_onnx(ckpt, path, sigma=4.0, int8="int8" in name)
        print(f"{name}: exported in {time.perf_counter() - t0:.1f} s", flush=True)
    return {name: OnnxPredictor(path, device="cpu") for name, path in paths.items()}


def measure(kind: str, batch: int, repeats: int, onnx: bool, int8: bool, image_size: int | None) -> dict:
    """One model size: every path timed in alternating rounds, and the deviations."""
    torch.manual_seed(0)
    cfg = model_config(kind)
    fp32 = GlocalCLIP(cfg.replace(image_size=image_size or cfg.image_size)).eval()
    bf16 = GlocalCLIP(fp32.cfg.replace(precision="bf16"), clip=fp32.clip).eval()
    original = OriginalVisionEncoder(fp32.clip.visual, fp32.cfg.features_list, fp32.cfg.dpam_layer)
    size = fp32.cfg.image_size
    g = torch.Generator().manual_seed(1)
    pixels = torch.randint(0, 256, (batch, size, size, 3), dtype=torch.uint8, generator=g)
    from glocalclip.datasets.preprocess import normalize_image

    x = normalize_image(pixels.permute(0, 3, 1, 2))
    paths: dict[str, Callable[[], object]] = {
        "original code's encoder, fp32": lambda: original(x),
        "ours, fp32": lambda: fp32.encode_image_layers(x),
        "ours, bf16": lambda: bf16.encode_image_layers(x),
    }
    peak_of = {"original code's encoder, fp32": "fp32", "ours, fp32": "fp32", "ours, bf16": "bf16"}
    with tempfile.TemporaryDirectory(prefix="cpu_limit-") as tmp:
        sessions = onnx_sessions(fp32, Path(tmp), int8) if onnx else {}
        for name, predictor in sessions.items():
            paths[name] = (lambda p: lambda: p.run(pixels.numpy()))(predictor)
            peak_of[name] = "fp32" if "fp32" in name else "bf16"
        best = {name: float("inf") for name in paths}
        outputs = {}
        with torch.no_grad():
            for name, fn in paths.items():
                outputs[name] = fn()  # warm-up (and the outputs compared below)
            for r in range(repeats):
                for name, fn in paths.items():
                    best[name] = min(best[name], best_of(fn, 1))
                print(f"round {r + 1}/{repeats}: " + ", ".join(f"{n} {best[n] / batch:.3f}" for n in paths), flush=True)
        split = time_split(paths["ours, bf16"], batch)
        profiled = sum(split.values())  # the profiler's own cost inflates small models: keep its shares only
        split = {kind: s / profiled * best["ours, bf16"] / batch for kind, s in split.items()}
    g_o, p_o = outputs["original code's encoder, fp32"]
    g_32, l_32 = outputs["ours, fp32"]
    g_16, l_16 = outputs["ours, bf16"]
    p_32, p_16 = l_32.per_layer(), l_16.per_layer()
    dev = {
        "fp32_vs_original_global": (g_32 - g_o).abs().max().item(),
        "fp32_vs_original_patch": max((a - b).abs().max().item() for a, b in zip(p_32, p_o)),
        "patch_scale": max(b.abs().max().item() for b in p_o),
        "bf16_vs_fp32_patch_relative": max((a - b).abs().max().item() / b.abs().max().item() for a, b in zip(p_16, p_32)),
        "bf16_vs_fp32_global_relative": (g_16 - g_32).abs().max().item() / g_32.abs().max().item(),
    }
    if "onnx int8 (export --int8)" in outputs:
        (s32, m32), (s8, m8) = outputs["onnx fp32"], outputs["onnx int8 (export --int8)"]
        dev["onnx_int8_vs_fp32_score"] = float(np.abs(s8 - s32).max())
        dev["onnx_int8_vs_fp32_map"] = float(np.abs(m8 - m32).max())
        dev["onnx_map_range"] = float(m32.max() - m32.min())
    flops = encoder_flops(fp32)
    return {"config": kind, "image_size": size, "batch": batch, "repeats": repeats, "gflop_per_image": flops / 1e9,
            "paths": [{"path": n, "s_per_image": best[n] / batch, "peak": peak_of[n]} for n in paths],
            "bf16_time_split": split, "deviation": dev}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="tiny and mid configs at their bench sizes, 2 rounds: the table in under a minute")
    p.add_argument("--configs", nargs="+", choices=("vitl", "mid", "tiny"), default=None,
                   help="model sizes (default: vitl, or tiny and mid with --quick)")
    p.add_argument("--batch", type=int, default=2, help="images per forward")
    p.add_argument("--image_size", type=int, default=None,
                   help="input side in pixels (default 518, the paper's; 224 with --quick)")
    p.add_argument("--repeats", type=int, default=None, help="alternating rounds, best kept (default 2)")
    p.add_argument("--no_onnx", action="store_true", help="skip the ONNX Runtime paths (export needs ~6 GB at ViT-L)")
    p.add_argument("--no_int8", action="store_true", help="skip export --int8's ONNX graph (a second export)")
    p.add_argument("--attention_tokens", type=int, default=None,
                   help="tokens for the attention kernel table (default 1370: ViT-L/14 at 518 px; 257 with --quick)")
    p.add_argument("--json", default=None, help="where to write the results (default bench/results/cpu_limit[_quick].json)")
    return p.parse_args(argv)


def print_report(report: dict) -> None:
    peak = report["gemm_gflops"]
    print(f"\nGEMM peak (4096²): fp32 {peak['fp32']:.0f} GFLOP/s, bf16 {peak['bf16']:.0f} GFLOP/s; "
          f"{report['threads']} threads, load average {report['load_average']}")
    print(tabulate([[r["dtype"], r["kernel"], f"{r['ms']:.1f}", f"{r['gflops']:.0f}"] for r in report["attention"]],
                   headers=[f"attention, {report['attention_tokens']} tokens", "kernel", "ms (std + V-V pair)",
                            "GFLOP/s"], tablefmt="github"))
    for m in report["models"]:
        limit = {k: m["gflop_per_image"] / v for k, v in peak.items()}
        base = m["paths"][0]["s_per_image"]
        print(f"\n{m['config']} at {m['image_size']} px, batch {m['batch']}, {m['gflop_per_image']:.0f} GFLOP/image: "
              f"limit {limit['fp32']:.3f} s/image fp32, {limit['bf16']:.3f} s/image bf16")
        print(tabulate([[p["path"], f"{p['s_per_image']:.3f}", f"{base / p['s_per_image']:.2f}x",
                         f"{100 * limit[p['peak']] / p['s_per_image']:.0f}% of {p['peak']}"] for p in m["paths"]],
                       headers=["path", "s/image", "vs original", "of peak"], tablefmt="github"))
        split = m["bf16_time_split"]
        total = sum(split.values())
        rate = m["gflop_per_image"] / split["matrix products"]
        print(tabulate([[kind, f"{s:.3f}", f"{100 * s / total:.0f}%",
                         f"{rate:.0f} GFLOP/s, {100 * rate / peak['bf16']:.0f}% of bf16" if kind == "matrix products" else ""]
                        for kind, s in split.items()],
                       headers=["ours bf16, by op (profiled shares)", "s/image", "share", "rate"], tablefmt="github"))
        print(f"bound: the matrix products alone at the bf16 peak take {limit['bf16']:.3f} s/image, "
              f"{base / limit['bf16']:.2f}x the original; with softmax and the rest as measured, "
              f"{base / (limit['bf16'] + split['softmax'] + split['other']):.2f}x")
        print("deviation: " + ", ".join(f"{k} {v:.3g}" for k, v in m["deviation"].items()))


def main(argv=None) -> dict:
    args = parse_args(argv)
    configs = args.configs or (["tiny", "mid"] if args.quick else ["vitl"])
    repeats = args.repeats or 2
    tokens = args.attention_tokens or (257 if args.quick else 1370)
    report = {"torch": torch.__version__, "threads": torch.get_num_threads(),
              "load_average": " ".join(f"{x:.2f}" for x in os.getloadavg()),
              "gemm_gflops": gemm_peak(repeats if args.quick else max(repeats, 3), 1024 if args.quick else 4096),
              "attention_tokens": tokens}
    report["attention"] = attention_rates(1 if args.quick else 2, 16, tokens, 64, repeats)
    report["models"] = [measure(kind, args.batch, repeats, not args.no_onnx, not args.no_int8,
                               args.image_size or (224 if args.quick else None)) for kind in configs]
    report["load_average_after"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print_report(report)
    write_report(report, args.json or RESULTS_DIR / f"cpu_limit{'_quick' if args.quick else ''}.json")
    return report


if __name__ == "__main__":
    main()
