"""Few-shot benchmark (docs/design.md §11, docs/usage.md): what K normal shots add, and what they cost.

    python -m bench.few_shot quality [--sizes 112 224 --shots 1 2 4 --seeds 0 1 2]
    python -m bench.few_shot cost [--kind tiny --image_size 224 --shots 4 16]

``quality``: tiny prompts trained on one synthetic dataset (seed 0), scored on another (seed 1) that
they never saw, zero-shot and with K shots drawn from its train split as ``test.py --shots`` draws
them, for every few-shot variant (weight, layers, image term); pixel and image AUROC, mean over
classes, under the test protocol (σ-smoothed maps). The test images and shots are encoded once per
size; the variants only change how their features are scored.

``cost``: seconds per image of the zero-shot forward and of the few-shot term alone (the bank's
search and the map) at K shots, on random weights (speed does not depend on them).
Writes bench/results/few_shot_{quality,cost}_<device>.json.
"""
from __future__ import annotations

import argparse
import itertools
import statistics
import tempfile
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from tabulate import tabulate

from bench.common import RESULTS_DIR, device_name, model_config, timed, write_report
from glocalclip import GlocalCLIP
from glocalclip.datasets import AnomalyDataset, load_meta, normalize_image
from glocalclip.datasets.synthetic import make_synthetic_dataset
from glocalclip.engine.few_shot import draw_shots
from glocalclip.engine.smoothing import GaussianSmoothing, smoothed_scores
from glocalclip.model.config import FewShotSettings
from glocalclip.model.few_shot import bank_from_features, few_shot_map, join_scores

WEIGHTS = (1.0, 2.0, 4.0, 8.0, 16.0)
LAYER_CHOICES = ("selected", "blocks")
IMAGE_TERMS = ("max", "mean")
TINY_FLAGS = ["--backbone", "tiny", "--features_list", "2", "4", "6", "8", "--dpam", "6", "--n_ctx", "5",
              "--ab_ctx", "3", "--depth", "3", "--t_n_ctx", "2"]


# ---------------------------------------------------------------------------- data and prompts
def train_tiny_prompts(root: Path, image_size: int, epochs: int = 1) -> tuple[Path, Path]:
    """(checkpoint, backbone weights): tiny prompts trained as tests/conftest.py's ``trained`` fixture
    trains them (one epoch on 18 synthetic images of seed 0, 64 px), on a seeded random tiny backbone
    saved to a file so every rebuild is the same model. Weak prompts on purpose: well-trained ones
    leave the synthetic pixel AUROC near 99 % and nothing to measure."""
    from glocalclip.apps import cli
    from glocalclip.model.backbone_record import BackboneRecord

    root.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(1234)
    weights = root / "tiny_clip.pt"
    torch.save(BackboneRecord.resolve("tiny", None).build().state_dict(), weights)
    data = make_synthetic_dataset(root / "train_data", n_train=1, n_test_good=3, n_test_defect=3, size=64, seed=0)
    cli.train_main(["--train_data_path", str(data), "--save_path", str(root / "ckpt"), "--epoch", str(epochs),
                    "--batch_size", "8", "--num_workers", "0", "--device", "cpu", "--no_progress",
                    "--pretrained", str(weights), "--image_size", str(image_size)] + TINY_FLAGS)
    return root / "ckpt" / f"epoch_{epochs}.pth", weights


def held_out_dataset(root: Path, seed: int = 1, n_train: int = 8, n_test: int = 8) -> Path:
    """Synthetic data the prompts never saw: another seed, with train normals to draw shots from."""
    return make_synthetic_dataset(root, n_train=n_train, n_test_good=n_test, n_test_defect=n_test, size=128,
                                  seed=seed)


def load_split(data: Path, split: str, image_size: int) -> dict[str, Any]:
    ds = AnomalyDataset(str(data), split=split, image_size=image_size, as_uint8=True)
    items = [ds[i] for i in range(len(ds))]
    return {"x": normalize_image(torch.stack([it["image"] for it in items])),
            "masks": torch.stack([it["mask"] for it in items]).numpy() > 0,
            "labels": np.array([it["label"] for it in items]), "cls": [it["cls_name"] for it in items],
            "paths": [e["img_path"] for e in ds.entries]}


def encode(model: GlocalCLIP, x: torch.Tensor, batch: int = 8) -> list[tuple]:
    """Per batch: (global feature, selected layers, each block's layers)."""
    return [model.encode_image_blocks(x[s:s + batch]) for s in range(0, len(x), batch)]


# ---------------------------------------------------------------------------- scoring
def class_aurocs(labels: np.ndarray, masks: np.ndarray, scores: np.ndarray, maps: np.ndarray,
                 cls: list[str]) -> tuple[float, float]:
    """(pixel AUROC, image AUROC), each the mean over classes, in percent."""
    pix, img = [], []
    for c in sorted(set(cls)):
        sel = np.array([k == c for k in cls])
        pix.append(roc_auc_score(masks[sel].ravel(), maps[sel].ravel()))
        img.append(roc_auc_score(labels[sel], scores[sel]))
    return 100 * float(np.mean(pix)), 100 * float(np.mean(img))


def score_run(model: GlocalCLIP, text, test_feats: list[tuple], test: dict, banks: Optional[dict],
              settings: Optional[FewShotSettings], smoothing: GaussianSmoothing) -> tuple[float, float]:
    scores, maps, start = [], [], 0
    for g, layers, blocks in test_feats:
        out = model.score_features(g, layers, text)
        n = g.shape[0]
        if banks is not None:
            cls = test["cls"][start:start + n]
            assert len(set(cls)) == 1, "a batch mixes classes"
            bank = banks[(cls[0], settings.layers)]
            fs = few_shot_map(blocks if settings.layers == "blocks" else layers, bank, model.cfg.image_size)
            out = join_scores(out, fs, settings)
        s, m = smoothed_scores(out, smoothing, model.cfg.image_score)
        scores.append(s.numpy())
        maps.append(m.numpy())
        start += n
    return class_aurocs(test["labels"], test["masks"], np.concatenate(scores), np.concatenate(maps), test["cls"])


def class_batches(test: dict, batch: int = 8) -> list[list[int]]:
    """Indices in batches that never mix classes (as test.py batches)."""
    out = []
    for c in sorted(set(test["cls"])):
        idx = [i for i, k in enumerate(test["cls"]) if k == c]
        out += [idx[i:i + batch] for i in range(0, len(idx), batch)]
    return out


def quality(args: argparse.Namespace) -> dict[str, Any]:
    rows, report = [], {"sizes": {}, "variants": []}
    variants = [FewShotSettings(weight=w, layers=l, image_term=t)
                for w, l, t in itertools.product(args.weights, LAYER_CHOICES, IMAGE_TERMS)]
    with tempfile.TemporaryDirectory(prefix="glocalclip-fewshot-") as tmp:
        tmp = Path(tmp)
        data = held_out_dataset(tmp / "held_out")
        meta = load_meta(str(data))
        for size in args.sizes:
            ckpt, weights = train_tiny_prompts(tmp / f"train{size}", size, args.epochs)
            model = GlocalCLIP.from_checkpoint(ckpt, pretrained=str(weights)).eval()
            with torch.no_grad():
                text = model.encode_text()
            smoothing = GaussianSmoothing(args.sigma)
            test = load_split(data, "test", size)
            order = [i for b in class_batches(test) for i in b]
            test = {k: (v[order] if isinstance(v, (np.ndarray, torch.Tensor)) else [v[i] for i in order])
                    for k, v in test.items()}
            feats = encode(model, test["x"])
            train = load_split(data, "train", size)
            where = {p: i for i, p in enumerate(train["paths"])}
            zero = score_run(model, text, feats, test, None, None, smoothing)
            per_size = {"zero_shot": zero, "few_shot": {}}
            print(f"size {size}: zero-shot pixel {zero[0]:.1f} image {zero[1]:.1f}")
            for k, seed in itertools.product(args.shots, args.seeds):
                drawn = draw_shots(meta["train"], sorted(meta["train"]), k, seed)
                banks = {}
                for c, paths in drawn.items():
                    _, layers, blocks = model.encode_image_blocks(train["x"][[where[p] for p in paths]])
                    banks[(c, "selected")] = bank_from_features(layers)
                    banks[(c, "blocks")] = bank_from_features(blocks)
                for v in variants:
                    pix, img = score_run(model, text, feats, test, banks, v, smoothing)
                    per_size["few_shot"].setdefault(_name(v), {}).setdefault(str(k), []).append([pix, img])
            report["sizes"][str(size)] = per_size
    report["variants"] = [v.to_dict() for v in variants]
    for v in variants:
        row = [_name(v)]
        for size in args.sizes:
            per = report["sizes"][str(size)]
            for k in args.shots:
                vals = np.array(per["few_shot"][_name(v)][str(k)])
                row.append(f"{vals[:, 0].mean() - per['zero_shot'][0]:+.1f} / {vals[:, 1].mean() - per['zero_shot'][1]:+.1f}")
        rows.append(row)
    headers = ["variant"] + [f"{s}px K={k}" for s in args.sizes for k in args.shots]
    print("\nlift over zero-shot, pixel / image AUROC (mean over shot seeds):")
    print(tabulate(rows, headers=headers, disable_numparse=True))
    for s in args.sizes:
        z = report["sizes"][str(s)]["zero_shot"]
        print(f"zero-shot at {s}px: pixel {z[0]:.1f}, image {z[1]:.1f}")
    return report


def _name(v: FewShotSettings) -> str:
    return f"w{v.weight:g}-{v.layers}-{v.image_term}"


def summary(report: dict[str, Any], settings: FewShotSettings) -> list[list[str]]:
    """Rows (size, K, pixel mean ± std, image mean ± std) of one variant, zero-shot as K = 0."""
    rows = []
    for size, per in report["sizes"].items():
        rows.append([size, "0", f"{per['zero_shot'][0]:.1f}", f"{per['zero_shot'][1]:.1f}"])
        for k, vals in per["few_shot"][_name(settings)].items():
            vals = np.array(vals)
            sd = (lambda a: statistics.stdev(a) if len(a) > 1 else 0.0)
            rows.append([size, k, f"{vals[:, 0].mean():.1f} ± {sd(vals[:, 0]):.1f}",
                         f"{vals[:, 1].mean():.1f} ± {sd(vals[:, 1]):.1f}"])
    return rows


# ---------------------------------------------------------------------------- cost
def cost(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    cfg = model_config(args.kind).replace(image_size=args.image_size)
    torch.manual_seed(0)
    model = GlocalCLIP(cfg).to(device).eval()
    with torch.no_grad():
        text = model.encode_text()
    x = torch.randn(args.batch, 3, args.image_size, args.image_size, device=device)
    rows, report = [], {"device": device_name(device), "kind": args.kind, "image_size": args.image_size,
                        "batch": args.batch, "rows": []}
    with torch.no_grad():
        t_zero, _ = timed(lambda: model(x, text=text), args.repeat, device)
        _, layers, blocks = model.encode_image_blocks(x)
        for k, layer_choice in itertools.product(args.shots, LAYER_CHOICES):
            feats = blocks if layer_choice == "blocks" else layers
            shots = torch.randn(k, 3, args.image_size, args.image_size, device=device)
            bank = model.reference_bank(shots, FewShotSettings(layers=layer_choice)).layers
            t_fs, _ = timed(lambda: few_shot_map(feats, bank, cfg.image_size), args.repeat, device)
            t_bank, _ = timed(lambda: model.reference_bank(shots, FewShotSettings(layers=layer_choice)), 1, device)
            entry = {"shots": k, "layers": layer_choice, "bank_rows": int(bank.tensors[0].shape[0]),
                     "bank_mib": sum(t.numel() * 4 for t in bank.tensors) / 2**20,
                     "zero_shot_ms_per_image": 1000 * t_zero / args.batch,
                     "few_shot_term_ms_per_image": 1000 * t_fs / args.batch, "bank_build_s": t_bank}
            report["rows"].append(entry)
            rows.append([k, layer_choice, entry["bank_rows"], f"{entry['bank_mib']:.1f}",
                         f"{entry['zero_shot_ms_per_image']:.1f}", f"{entry['few_shot_term_ms_per_image']:.2f}",
                         f"{t_bank:.2f}"])
    print(f"{args.kind} at {args.image_size}px on {report['device']}, batch {args.batch}:")
    print(tabulate(rows, headers=["K", "layers", "bank rows/layer", "bank MiB", "zero-shot ms/img",
                                  "few-shot term ms/img", "bank build s"], disable_numparse=True))
    return report


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.few_shot", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    q = sub.add_parser("quality", help="AUROC lift of every few-shot variant on held-out synthetic data")
    q.add_argument("--sizes", type=int, nargs="+", default=[112], help="image sizes (each trains its prompts)")
    q.add_argument("--shots", type=int, nargs="+", default=[1, 2, 4], help="K values")
    q.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="shot seeds")
    q.add_argument("--weights", type=float, nargs="+", default=list(WEIGHTS), help="few-shot weights to compare")
    q.add_argument("--epochs", type=int, default=1, help="training epochs of the tiny prompts")
    q.add_argument("--sigma", type=float, default=4.0, help="σ of the test protocol's smoothing")
    q.add_argument("--out", default=None, help="report path (default bench/results/few_shot_quality_cpu.json)")
    c = sub.add_parser("cost", help="seconds per image of the few-shot term beside the zero-shot forward")
    c.add_argument("--kind", default="tiny", choices=["tiny", "mid", "vitl"], help="model size (bench/common.py)")
    c.add_argument("--image_size", type=int, default=224, help="input side in pixels")
    c.add_argument("--shots", type=int, nargs="+", default=[4, 16], help="K values")
    c.add_argument("--batch", type=int, default=8, help="test images per batch")
    c.add_argument("--repeat", type=int, default=3, help="best of N timings")
    c.add_argument("--device", default="cpu", help="cpu or cuda")
    c.add_argument("--out", default=None, help="report path (default bench/results/few_shot_cost_<device>.json)")
    args = p.parse_args(argv)
    if args.what == "quality":
        report = quality(args)
        write_report(report, args.out or RESULTS_DIR / "few_shot_quality_cpu.json")
    else:
        report = cost(args)
        tag = "cpu" if args.device == "cpu" else "gpu"
        write_report(report, args.out or RESULTS_DIR / f"few_shot_cost_{args.kind}_{tag}.json")


if __name__ == "__main__":
    main()
