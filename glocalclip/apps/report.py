"""``glocalclip report RUN_DIR... [--out FILE.md]``: several test runs merged into one table per dataset.

Every ``results.json`` below the given folders (searched recursively) is one run. Runs are
grouped by dataset and *setting* (everything that changes the numbers except the seed: the model
config, the test's sigma and metric mode, the few-shot K and scoring (not the shot seed), and the
training run's data, alpha, margin, epochs, batch size and learning rate); each group shows mean ±
sample standard deviation (n - 1) over its runs, in percent, with the paper's number (docs/design.md
§8) beside ours. The training settings and seed come from ``results.json`` when it carries them, else
from the checkpoint file it names, else the seed from a ``seed<N>`` in the paths.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from tabulate import tabulate

from ..files import write_text
from .results import HEADERS, PAPER_TABLE1, TABLE_KEYS
from .flags import add_load_flags, new_parser, trusted

#: training settings that change the numbers (the rest — paths, device, logging — do not)
TRAIN_SETTING_KEYS = ("dataset", "alpha", "margin", "epoch", "batch_size", "learning_rate")
_SEED_RE = re.compile(r"seed[_\-=]?(\d+)", re.IGNORECASE)
_EPOCH_RE = re.compile(r"epoch_(\d+)\.pth?$")


def find_results(paths: Sequence[str | Path]) -> list[Path]:
    """``results.json`` files: the paths themselves if files, else searched below each folder."""
    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_file():
            found.append(p)
        elif p.is_dir():
            found += sorted(p.rglob("results.json"))
        else:
            raise FileNotFoundError(f"{p} is neither a results.json nor a folder")
    seen, out = set(), []
    for f in found:
        if f.resolve() not in seen:
            seen.add(f.resolve())
            out.append(f)
    return out


def _checkpoint_info(path: Optional[str], trust: bool = False) -> dict[str, Any]:
    """train_config and epoch of the checkpoint a run tested, if the file is still there and reads. A
    results.json may come from anyone: a checkpoint it names that could run code when loaded is
    refused (CheckpointError) unless ``trust`` (``--trust_checkpoint``), not passed over in silence."""
    if not path or not Path(path).is_file():
        return {}
    from ..model.checkpoint_format import CheckpointError, read_checkpoint

    try:
        ckpt = read_checkpoint(path, trust)
    except CheckpointError as e:
        if e.kind == "unsafe":
            raise
        return {}
    except Exception:  # noqa: BLE001 - a damaged checkpoint only costs the run its training settings
        return {}
    return {"train_config": ckpt.get("train_config") or {}, "epoch": ckpt.get("epoch")}


def load_run(path: Path, trust: bool = False) -> dict[str, Any]:
    """One run: its results plus ``dataset`` name, ``seed`` (or None) and ``setting`` (a dict);
    ``trust``: see :func:`_checkpoint_info`."""
    res = json.loads(Path(path).read_text())
    if "mean" not in res or "classes" not in res:
        raise ValueError(f"{path} is not a glocalclip results.json (no 'mean'/'classes')")
    dataset = res.get("dataset") or Path(str(res.get("data_path", path.parent))).name
    train = res.get("train_config")
    info = {} if train is not None else _checkpoint_info(res.get("checkpoint"), trust)
    train = train if train is not None else info.get("train_config", {})
    seed = train.get("seed")
    if seed is None:
        for text in (str(res.get("checkpoint", "")), str(path)):
            m = _SEED_RE.search(text)
            if m:
                seed = int(m.group(1))
                break
    setting: dict[str, Any] = {f"model.{k}": v for k, v in (res.get("config") or {}).items()
                               if k != "pretrained"}
    setting.update({"sigma": res.get("sigma"), "metrics": res.get("metrics_mode")})
    # few-shot runs group by K and how the shots are scored; their shot seeds are what varies within
    setting["shots"] = int(res.get("shots") or 0)
    for k, v in (res.get("few_shot") or {}).items() if setting["shots"] else ():
        setting[f"shot.{k}"] = v
    for k in TRAIN_SETTING_KEYS:
        if k in train:
            setting[f"train.{k}"] = train[k]
    if train.get("train_data_path") and train.get("dataset") is None:
        setting["train.data"] = Path(train["train_data_path"]).name
    epoch = info.get("epoch")
    m = _EPOCH_RE.search(str(res.get("checkpoint", "")))
    if epoch is None and m:
        epoch = int(m.group(1))
    if epoch is not None:
        setting["tested epoch"] = epoch
    return {"path": Path(path), "results": res, "dataset": dataset, "seed": seed, "setting": setting,
            "shot_seed": res.get("shot_seed") if setting["shots"] else None}


def _key(setting: dict[str, Any]) -> str:
    return json.dumps(setting, sort_keys=True, default=str)


def setting_labels(runs: list[dict[str, Any]]) -> dict[str, str]:
    """A short label per distinct setting: the fields in which the settings differ."""
    settings = {_key(r["setting"]): r["setting"] for r in runs}
    if len(settings) <= 1:
        return {k: "all runs" for k in settings}
    fields = sorted({f for s in settings.values() for f in s})
    varying = [f for f in fields if len({json.dumps(s.get(f), default=str) for s in settings.values()}) > 1]
    labels = {}
    for k, s in settings.items():
        parts = [f"{f.split('.', 1)[-1]}={_short(s.get(f))}" for f in varying]
        labels[k] = ", ".join(parts) or "all runs"
    return labels


def _short(v: Any) -> str:
    if isinstance(v, (list, tuple)):
        return " ".join(map(str, v))
    return str(v)


def mean_std(values: Sequence[Optional[float]]) -> tuple[float, float, int]:
    """(mean, sample std, n) of the defined values (None/NaN skipped); std is nan for n < 2."""
    vals = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return float("nan"), float("nan"), 0
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else float("nan")), len(vals)


def fmt_mean_std(values: Sequence[Optional[float]]) -> str:
    """Percent with one decimal: ``91.7 ± 0.3`` (``91.7`` for one run, ``n/a`` for none)."""
    m, s, n = mean_std(values)
    if n == 0:
        return "n/a"
    return f"{100 * m:.1f}" if n == 1 else f"{100 * m:.1f} ± {100 * s:.1f}"


def _keys_of(runs: list[dict[str, Any]], all_metrics: bool) -> list[str]:
    present = []
    for r in runs:
        for k in r["results"].get("metric_keys") or list(r["results"]["mean"]):
            if k not in present:
                present.append(k)
    if all_metrics:
        return present
    return [k for k in TABLE_KEYS if k in present] or present


def _seed_text(run: dict[str, Any]) -> str:
    """The training seed, and for a few-shot run its shot seed: ``111/shot 2``."""
    text = "?" if run["seed"] is None else str(run["seed"])
    return text if run.get("shot_seed") is None else f"{text}/shot {run['shot_seed']}"


def _seeds(group: list[dict[str, Any]]) -> str:
    return ", ".join(_seed_text(r) for r in group)


def dataset_table(dataset: str, runs: list[dict[str, Any]], labels: dict[str, str],
                  all_metrics: bool = False) -> str:
    keys = _keys_of(runs, all_metrics)
    paper = PAPER_TABLE1.get(dataset, {})
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault(_key(r["setting"]), []).append(r)
    headers = ["setting", "runs", "seeds"]
    for k in keys:
        headers.append(HEADERS.get(k, k))
        if paper:
            headers.append("paper")
    rows = []
    for gk, group in groups.items():
        row = [labels[gk], str(len(group)), _seeds(group)]
        for k in keys:
            row.append(fmt_mean_std([r["results"]["mean"].get(k) for r in group]))
            if paper:
                row.append(f"{paper[k]:.1f}" if k in paper else "–")
        rows.append(row)
    return tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True)


def class_table(runs: list[dict[str, Any]], all_metrics: bool = False) -> str:
    """Per class mean ± std over the runs of one setting."""
    keys = _keys_of(runs, all_metrics)
    classes: list[str] = []
    for r in runs:
        classes += [c for c in r["results"]["classes"] if c not in classes]
    rows = [[c] + [fmt_mean_std([r["results"]["classes"].get(c, {}).get(k) for r in runs]) for k in keys]
            for c in classes]
    return tabulate(rows, headers=["class"] + [HEADERS.get(k, k) for k in keys], tablefmt="github",
                    disable_numparse=True)


def build_report(runs: list[dict[str, Any]], per_class: bool = False, all_metrics: bool = False) -> str:
    labels = setting_labels(runs)
    by_dataset: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        by_dataset.setdefault(r["dataset"], []).append(r)
    lines = ["# glocalclip report", "",
             f"{len(runs)} runs; mean ± sample std over the runs of each setting, in percent; "
             "\"paper\": GlocalCLIP, Table 1.", ""]
    for ds, ds_runs in by_dataset.items():
        lines += [f"## {ds}", "", dataset_table(ds, ds_runs, labels, all_metrics), ""]
        if per_class:
            groups: dict[str, list[dict[str, Any]]] = {}
            for r in ds_runs:
                groups.setdefault(_key(r["setting"]), []).append(r)
            for gk, group in groups.items():
                lines += [f"### {ds}, {labels[gk]}: per class", "", class_table(group, all_metrics), ""]
    lines += ["## Runs", ""]
    for r in runs:
        lines.append(f"- `{r['path']}`: {r['dataset']}, seed {_seed_text(r)}, "
                     f"{labels[_key(r['setting'])]}")
    return "\n".join(lines) + "\n"


def report_parser() -> argparse.ArgumentParser:
    p = new_parser("glocalclip report", "Merge test runs (results.json, searched recursively) into one table "
                                        "per dataset: mean ± std over seeds.")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="folders holding results.json (nested is fine)")
    p.add_argument("--out", default=None, metavar="FILE.md", help="also write the report here (default: "
                                                                    "print it only)")
    p.add_argument("--per_class", action="store_true", help="add a per-class table per setting")
    p.add_argument("--all_metrics", action="store_true",
                   help="every metric of the runs, not only the paper's four")
    add_load_flags(p)
    return p


def report_main(argv: Optional[Sequence[str]] = None) -> int:
    args = report_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        files = find_results(args.runs)
        if not files:
            raise FileNotFoundError(f"no results.json below {' '.join(args.runs)}")

        trust = trusted(args)
        runs = [load_run(f, trust) for f in files]
    except (FileNotFoundError, ValueError, json.JSONDecodeError) as e:
        print(f"report: {e}", file=sys.stderr)
        return 2
    text = build_report(runs, per_class=args.per_class, all_metrics=args.all_metrics)
    print(text, end="")
    if args.out:
        write_text(args.out, text)
        print(f"report: {args.out}")
    return 0
