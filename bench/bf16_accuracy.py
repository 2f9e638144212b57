"""What ``precision=bf16`` costs in accuracy against fp32: scores, maps and test metrics.

    python -m bench.bf16_accuracy                                   # tiny and mid (random prompts), ViT-L maps
    python -m bench.bf16_accuracy --configs tiny --checkpoint demo_out/checkpoints/epoch_8.pth --data demo_out/data

For each model the fp32 and the bf16 model share one CLIP and one set of prompts (the bf16 one
casts its own copy of the towers). On a synthetic test set (or ``--data``, e.g. the demo's) both
run ``evaluate()`` exactly as test.py does, and the table gives the largest score and map
differences (unsmoothed maps of the first batch, relative to the map's range) and the metric
deltas (bf16 - fp32, mean and largest over classes, in points). ViT-L (random weights, 518 px) is
too slow on a CPU for a test set: only its scores and maps on ``--vitl_images`` images. With a
checkpoint that ``test.py`` stored a threshold beside, every test image is also scored through
``predict``'s route (``Predictor``) in both precisions, and the labels that change are counted.
Writes JSON (default bench/results/bf16_accuracy.json).
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from tabulate import tabulate

from glocalclip import GlocalCLIP, load_model
from glocalclip.engine.distributed import DistContext
from glocalclip.inference.evaluation import evaluate

from .common import RESULTS_DIR, make_dataset, model_config, write_report


def pair(kind: str, checkpoint: Optional[str], image_size: int) -> tuple[GlocalCLIP, GlocalCLIP]:
    """(fp32 model, bf16 model) on the same CLIP and prompts."""
    if checkpoint:
        fp32 = load_model(checkpoint, precision="fp32")
    else:
        torch.manual_seed(0)
        cfg = model_config(kind)
        fp32 = GlocalCLIP(cfg.replace(image_size=image_size))
        with torch.no_grad():  # prompts away from their init, so that the two classes score apart
            for p in fp32.prompt_learner.parameters():
                p.add_(torch.randn_like(p) * 0.02)
    bf16 = GlocalCLIP(fp32.cfg.replace(precision="bf16"), clip=fp32.clip)
    bf16.prompt_learner.load_state_dict(fp32.prompt_learner.state_dict())
    return fp32.eval(), bf16.eval()


def outputs_delta(fp32: GlocalCLIP, bf16: GlocalCLIP, x: torch.Tensor) -> dict[str, float]:
    with torch.no_grad():
        a, b = fp32(x), bf16(x)
    amap = a["anomaly_map"]
    span = (amap.max() - amap.min()).item()
    return {"score_max_abs": (a["image_score"] - b["image_score"]).abs().max().item(),
            "map_max_abs": (amap - b["anomaly_map"]).abs().max().item(), "map_range": span,
            "map_mean_abs": (amap - b["anomaly_map"]).abs().mean().item()}


def metric_deltas(fp32: GlocalCLIP, bf16: GlocalCLIP, data: Path) -> dict:
    res = {}
    for name, model in (("fp32", fp32), ("bf16", bf16)):
        res[name] = evaluate(model, str(data), None, DistContext(device=torch.device("cpu")), mode="image-pixel-level",
                             sigma=4, batch_size=8, num_workers=0, progress=False)["classes"]
    a, b = res["fp32"], res["bf16"]
    keys = next(iter(a.values())).keys()
    out = {}
    for k in keys:
        d = [100 * (b[c][k] - a[c][k]) for c in a]
        out[k] = {"fp32_mean": 100 * float(np.mean([a[c][k] for c in a])), "delta_mean": float(np.mean(d)),
                  "delta_max_abs": float(np.max(np.abs(d)))}
    return out


def label_changes(checkpoint: str, data: Path) -> Optional[dict]:
    """Every test image of ``data`` through ``Predictor`` (predict's route: the stored threshold and
    σ) in fp32 and bf16: how many labels differ, and the largest score difference."""
    import json

    from glocalclip.inference.predictor import Predictor

    runs = {p: Predictor.from_checkpoint(checkpoint, device="cpu", batch_size=16, precision=p) for p in ("fp32", "bf16")}
    if runs["fp32"].threshold is None:
        return None
    meta = json.loads((data / "meta.json").read_text())
    paths = [str(data / e["img_path"]) for entries in meta["test"].values() for e in entries]
    preds = {p: predictor.predict(paths) for p, predictor in runs.items()}
    scores = {p: np.array([q.pred_score for q in preds[p]]) for p in preds}
    thr = runs["fp32"].threshold
    return {"images": len(paths), "threshold": thr,
            "labels_changed": sum(a.pred_label != b.pred_label for a, b in zip(preds["fp32"], preds["bf16"])),
            "score_max_abs": float(np.abs(scores["bf16"] - scores["fp32"]).max()),
            "within_max_abs_of_threshold": int((np.abs(scores["fp32"] - thr)
                                                <= np.abs(scores["bf16"] - scores["fp32"]).max()).sum())}


def first_images(data: Path, model: GlocalCLIP, n: int) -> torch.Tensor:
    from glocalclip.datasets import AnomalyDataset
    from glocalclip.datasets.preprocess import normalize_image

    ds = AnomalyDataset(str(data), split="test", image_size=model.cfg.image_size, as_uint8=True)
    return normalize_image(torch.stack([ds[i]["image"] for i in range(min(n, len(ds)))]))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", choices=("tiny", "mid", "vitl"), default=["tiny", "mid", "vitl"],
                   help="models measured (vitl: scores and maps only)")
    p.add_argument("--checkpoint", default=None, help="a trained checkpoint (e.g. the demo's) used for 'tiny'")
    p.add_argument("--data", default=None, help="test data (meta.json layout) for tiny/mid; default: synthetic")
    p.add_argument("--images", type=int, default=48, help="synthetic test images when --data is not given")
    p.add_argument("--image_size", type=int, default=224, help="input side for tiny and mid (vitl: 518)")
    p.add_argument("--vitl_images", type=int, default=2, help="images for the ViT-L scores and maps")
    p.add_argument("--json", default=str(RESULTS_DIR / "bf16_accuracy.json"), help="where to write the results")
    args = p.parse_args(argv)
    report: dict = {"models": []}
    with tempfile.TemporaryDirectory(prefix="bf16_accuracy-") as tmp:
        data = Path(args.data) if args.data else make_dataset(Path(tmp) / "data", args.images, 256, 1)
        for kind in args.configs:
            vitl = kind == "vitl"
            fp32, bf16 = pair(kind, args.checkpoint if kind == "tiny" else None, 518 if vitl else args.image_size)
            x = first_images(data, fp32, args.vitl_images if vitl else 8)
            row = {"config": kind + (" (checkpoint)" if kind == "tiny" and args.checkpoint else ""),
                   "image_size": fp32.cfg.image_size, "outputs": outputs_delta(fp32, bf16, x)}
            if not vitl:
                row["metrics"] = metric_deltas(fp32, bf16, data)
            if kind == "tiny" and args.checkpoint:
                row["labels"] = label_changes(args.checkpoint, data)
            report["models"].append(row)
            print(row, flush=True)
            del fp32, bf16
    rows = []
    for m in report["models"]:
        o = m["outputs"]
        metrics = m.get("metrics", {})
        rows.append([m["config"], m["image_size"], f"{o['score_max_abs']:.2g}",
                     f"{o['map_max_abs']:.2g} / {o['map_range']:.2g}",
                     "; ".join(f"{k} {v['fp32_mean']:.1f} {v['delta_mean']:+.2f} (max {v['delta_max_abs']:.2f})"
                               for k, v in metrics.items()) or "-"])
    print(tabulate(rows, headers=["model", "px", "score max |Δ|", "map max |Δ| / range",
                                  "metric: fp32, bf16 - fp32 mean over classes (largest), points"], tablefmt="github"))
    for m in report["models"]:
        if m.get("labels"):
            lab = m["labels"]
            print(f"{m['config']}: {lab['labels_changed']} of {lab['images']} labels change at the stored threshold "
                  f"{lab['threshold']:.4g} (score max |Δ| {lab['score_max_abs']:.2g}; "
                  f"{lab['within_max_abs_of_threshold']} fp32 scores lie that close to it)")
    write_report(report, args.json)
    return report


if __name__ == "__main__":
    main()
