"""Results of a test run: the printed table, results.json, results.csv, and the paper's numbers."""
from __future__ import annotations

import math
import platform
from pathlib import Path
from typing import Any, Optional

from tabulate import tabulate

from .. import __version__
from ..files import write_csv, write_json, write_text
from .flags import shown

#: GlocalCLIP, paper Table 1 (docs/design.md §8), in percent: (image AUROC, image AP), (pixel AUROC, PRO).
PAPER_TABLE1: dict[str, dict[str, float]] = {
    "mvtec": {"image_auroc": 91.7, "image_ap": 96.4, "pixel_auroc": 91.4, "pixel_aupro": 82.8},
    "visa": {"image_auroc": 83.7, "image_ap": 86.1, "pixel_auroc": 95.9, "pixel_aupro": 87.2},
    "mpdd": {"image_auroc": 79.6, "image_ap": 83.9, "pixel_auroc": 96.8, "pixel_aupro": 89.5},
    "btad": {"image_auroc": 89.1, "image_ap": 91.7, "pixel_auroc": 96.2, "pixel_aupro": 78.2},
    "SDD": {"image_auroc": 86.6, "image_ap": 84.7, "pixel_auroc": 93.1, "pixel_aupro": 72.8},
    "DTD": {"image_auroc": 93.8, "image_ap": 97.4, "pixel_auroc": 98.2, "pixel_aupro": 92.9},
    "headct": {"image_auroc": 91.3, "image_ap": 92.6},
    "brain_mri": {"image_auroc": 95.8, "image_ap": 96.2},
    "br35h": {"image_auroc": 97.6, "image_ap": 97.3},
    "ISIC": {"pixel_auroc": 88.9, "pixel_aupro": 76.3},
    "colondb": {"pixel_auroc": 89.5, "pixel_aupro": 82.2},
    "clinicdb": {"pixel_auroc": 93.5, "pixel_aupro": 84.2},
    "kvasir": {"pixel_auroc": 94.2, "pixel_aupro": 65.6},
    "endo": {"pixel_auroc": 95.1, "pixel_aupro": 89.2},
    "tn3k": {"pixel_auroc": 81.0, "pixel_aupro": 53.6},
}

TABLE_KEYS = ("pixel_auroc", "pixel_aupro", "image_auroc", "image_ap")
HEADERS = {"pixel_auroc": "pixel AUROC", "pixel_aupro": "pixel AUPRO", "pixel_aupro_exact": "AUPRO (exact)",
           "pixel_f1max": "pixel F1-max", "image_auroc": "image AUROC", "image_ap": "image AP",
           "image_f1max": "image F1-max"}


def pct(v: Optional[float]) -> str:
    """×100 with one decimal; "n/a" where a metric is not defined for the class."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return f"{100 * v:.1f}"


def results_table(results: dict[str, Any], keys: Optional[list[str]] = None, fmt: str = "github") -> str:
    keys = keys or list(results["metric_keys"])
    rows = [[cls] + [pct(m.get(k)) for k in keys] for cls, m in results["classes"].items()]
    rows.append(["mean"] + [pct(results["mean"].get(k)) for k in keys])
    return tabulate(rows, headers=["class"] + [HEADERS.get(k, k) for k in keys], tablefmt=fmt,
                    disable_numparse=True)


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def software_versions() -> dict[str, str]:
    import numpy
    import open_clip
    import sklearn
    import torch

    return {"glocalclip": __version__, "torch": torch.__version__, "open_clip": open_clip.__version__,
            "numpy": numpy.__version__, "scikit-learn": sklearn.__version__,
            "python": platform.python_version(),
            "cuda": torch.version.cuda or "none",
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"}


def write_results(results: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """results.json (all values, NaN as null), results.csv (one row per class + mean, ×100),
    results.md (table with the paper's numbers beside ours). Returns the paths."""
    out = Path(out_dir)
    keys = list(results["metric_keys"])
    paths = {"json": out / "results.json", "csv": out / "results.csv", "md": out / "results.md"}
    write_json(paths["json"], _json_safe(results))
    rows = [[cls] + [pct(m.get(k)) for k in keys]
            for cls, m in list(results["classes"].items()) + [("mean", results["mean"])]]
    write_csv(paths["csv"], ["class"] + keys, rows)
    write_text(paths["md"], results_markdown(results))
    return paths


RUN_FACTS = (("checkpoint", "checkpoint"), ("dataset", "dataset"), ("data_path", "data"),
             ("metrics_mode", "metrics"), ("sigma", "sigma"), ("n_images", "images"),
             ("image_threshold", "image-score threshold (best F1 over all classes' images)"), ("batch_size", "batch size"),
             ("num_workers", "loader workers per process"), ("world_size", "processes"),
             ("shots", "few-shot: normal shots per class (0: zero-shot)"), ("shot_seed", "shot seed"))
RUN_DURATIONS = (("wall_time_s", "wall time, scoring and metrics"), ("total_wall_time_s", "wall time, total"))


def results_markdown(results: dict[str, Any]) -> str:
    """results.md: the per-class table, the mean beside the paper's number (datasets of docs/design.md §8),
    and the run: checkpoint, data, sigma, wall time, the model config and the software versions."""
    name = results.get("dataset") or results.get("data_path")
    lines = [f"# Results: {name}", "", results_table(results, list(results["metric_keys"]), fmt="github")]
    lines += ["", "## Beside the paper (GlocalCLIP, Table 1)", "", paper_comparison(results, name)]
    lines += ["", "## Run", ""] + run_facts(results)
    if results.get("shot_paths"):
        lines += ["", "### Shots (meta.json's train split)", "",
                  tabulate([[c, ", ".join(p)] for c, p in results["shot_paths"].items()], headers=["class", "images"],
                           tablefmt="github", disable_numparse=True)]
        if results.get("few_shot"):
            lines += ["", "few-shot settings: " + ", ".join(f"{k} {v}" for k, v in results["few_shot"].items())]
    for title, key, headers, show in (("Config", "config", ["field", "value"], shown),
                                      ("Software", "versions", ["package", "version"], str)):
        if results.get(key):
            lines += ["", f"### {title}", ""]
            lines.append(tabulate([[k, show(v)] for k, v in results[key].items()], headers=headers,
                                  tablefmt="github", disable_numparse=True))
    return "\n".join(lines) + "\n"


def paper_comparison(results: dict[str, Any], name: str) -> str:
    """Our mean of each Table-1 metric beside the paper's, or a line saying the paper has none."""
    paper = PAPER_TABLE1.get(results.get("dataset") or "")
    if not paper:
        return (f"The paper reports no number for {name!r} (its Table 1 covers: "
                f"{', '.join(PAPER_TABLE1)}).")
    rows = []
    for k in (k for k in TABLE_KEYS if k in paper):
        ours = results["mean"].get(k)
        ok = ours is not None and not (isinstance(ours, float) and math.isnan(ours))
        rows.append([HEADERS[k], pct(ours), f"{paper[k]:.1f}", f"{100 * ours - paper[k]:+.1f}" if ok else "n/a"])
    return tabulate(rows, headers=["metric (mean over classes)", "yours", "paper", "yours − paper"],
                    tablefmt="github", disable_numparse=True)


def run_facts(results: dict[str, Any]) -> list[str]:
    """The run's settings and wall times as markdown list items (those the results carry)."""
    lines = []
    for k, label in RUN_FACTS:
        v = results.get(k)
        if v is not None:
            lines.append(f"- {label}: {v:.4g}" if k == "image_threshold" else f"- {label}: {v}")
    for k, label in RUN_DURATIONS:
        if results.get(k) is not None:
            lines.append(f"- {label}: {_duration(float(results[k]))}")
    return lines


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}h {m:02d}m {s:02d}s" if h else f"{m}m {s:02d}s"
