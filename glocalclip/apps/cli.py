"""Command lines: ``glocalclip {train,test,demo}`` and the root scripts ``train.py`` / ``test.py``.

The flag names are the original code's (``--train_data_path``, ``--n_ctx``, ``--dpam``, ...)
plus ours (``--backbone``, ``--pretrained``, ``--precision``, ``--multilayer``, ``--resume``,
``--feature_cache``, ...). ``test`` takes every model setting from the checkpoint unless a
flag overrides it.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from ..model.config import GlocalCLIPConfig, MULTILAYER_MODES, PRECISIONS

#: flag name -> GlocalCLIPConfig field
MODEL_FLAGS = {"backbone": "backbone", "pretrained": "pretrained", "image_size": "image_size",
               "features_list": "features_list", "dpam": "dpam_layer", "n_ctx": "n_ctx", "ab_ctx": "ab_ctx",
               "depth": "depth", "t_n_ctx": "t_n_ctx", "multilayer": "multilayer", "precision": "precision",
               "cls_ln_post": "cls_ln_post", "image_score": "image_score", "prompt_style": "prompt_style"}


def _pretrained(value: str) -> Optional[str]:
    return None if value.lower() in ("none", "random", "") else value


def positive_int(value: str) -> int:
    """argparse type: an integer >= 1."""
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {value}")
    return n


def non_negative_int(value: str) -> int:
    """argparse type: an integer >= 0 (0 workers = load in the main process)."""
    n = int(value)
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {value}")
    return n


def add_model_args(p: argparse.ArgumentParser, defaults: bool) -> None:
    """Model flags; with ``defaults=False`` they default to None (= take from the checkpoint)."""
    d = GlocalCLIPConfig() if defaults else None

    def dflt(name: str):
        return getattr(d, name) if d is not None else None

    g = p.add_argument_group("model (saved in every checkpoint)")
    g.add_argument("--backbone", default=dflt("backbone"),
                   help="open_clip model name, 'tiny', or an open_clip model-config JSON (default ViT-L-14-336)")
    g.add_argument("--pretrained", type=_pretrained, default=dflt("pretrained"),
                   help="open_clip tag ('openai'), a local weights file (e.g. ViT-L-14-336px.pt), or 'none'")
    g.add_argument("--image_size", type=int, default=dflt("image_size"))
    g.add_argument("--features_list", type=int, nargs="+", default=list(dflt("features_list") or []) or None)
    g.add_argument("--dpam", type=int, default=dflt("dpam_layer"), help="V-V attention in the last dpam-1 blocks")
    g.add_argument("--n_ctx", type=int, default=dflt("n_ctx"))
    g.add_argument("--ab_ctx", type=int, default=dflt("ab_ctx"))
    g.add_argument("--depth", type=int, default=dflt("depth"))
    g.add_argument("--t_n_ctx", type=int, default=dflt("t_n_ctx"))
    g.add_argument("--multilayer", choices=MULTILAYER_MODES, default=dflt("multilayer"))
    g.add_argument("--precision", choices=PRECISIONS, default=dflt("precision"),
                   help="autocast for the frozen encoders; fp32 reproduces the paper")
    g.add_argument("--cls_ln_post", action="store_true", default=None if not defaults else False,
                   help="apply ln_post to the global feature (the original code did not)")
    g.add_argument("--image_score", choices=("global", "global+max"), default=dflt("image_score"))
    g.add_argument("--prompt_style", choices=("glocal", "anomalyclip"), default=dflt("prompt_style"))


def _flag_given(argv: Sequence[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in argv)


def model_overrides(args: argparse.Namespace, argv: Sequence[str]) -> dict[str, Any]:
    """Config fields given on a command line whose model flags default to None (test, predict,
    convert): the checkpoint's config is used for everything else. ``--pretrained none`` counts."""
    overrides = _model_fields(args, defaults=False)
    if _flag_given(argv, "--pretrained"):
        overrides["pretrained"] = args.pretrained
    if "features_list" in overrides:
        overrides["features_list"] = tuple(overrides["features_list"])
    return overrides


# ---------------------------------------------------------------------------- train
def train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="train.py", description="Train GlocalCLIP prompts on an auxiliary "
                                "dataset's labelled test split (the paper's protocol).")
    p.add_argument("--train_data_path", required=True, help="dataset root holding meta.json")
    p.add_argument("--dataset", default=None, help="dataset name (mvtec, visa, ...); omit for folder-mode data")
    p.add_argument("--save_path", default="./checkpoints/run")
    p.add_argument("--batch_size", type=positive_int, default=8)
    p.add_argument("--epoch", type=positive_int, default=15)
    p.add_argument("--learning_rate", type=float, default=1e-3)
    p.add_argument("--alpha", type=float, default=1.0, help="weight of the glocal contrastive loss")
    p.add_argument("--margin", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=111)
    p.add_argument("--print_freq", type=int, default=1)
    p.add_argument("--save_freq", type=int, default=1)
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: GPU if present)")
    p.add_argument("--feature_cache", choices=("auto", "device", "host", "disk", "off"), default="auto")
    p.add_argument("--num_workers", type=non_negative_int, default=None,
                   help="loader worker processes (default: from the device and the CPU cores: on a GPU the "
                        "cores minus 2, at most 12; on a CPU 1)")
    p.add_argument("--resume", default=None, help="a checkpoint, or a save folder (its latest epoch)")
    p.add_argument("--unmasked_anomalies", choices=("auto", "skip", "zero"), default="auto",
                   help="anomalous images without a mask: zero = all-normal target (original), skip = no "
                        "local loss for them; auto = zero for a named --dataset, skip for folder-mode data")
    p.add_argument("--no_progress", action="store_true")
    add_model_args(p, defaults=True)
    return p


def train_main(argv: Optional[Sequence[str]] = None) -> int:
    from ..engine.training import TrainConfig, train

    argv = list(sys.argv[1:] if argv is None else argv)
    args = train_parser().parse_args(argv)
    model_cfg = GlocalCLIPConfig(**{f: (tuple(v) if f == "features_list" else v)
                                    for f, v in _model_fields(args, defaults=True).items()})
    cfg = TrainConfig(train_data_path=args.train_data_path, dataset=_dataset(args.dataset),
                      save_path=args.save_path, batch_size=args.batch_size, epoch=args.epoch,
                      learning_rate=args.learning_rate, alpha=args.alpha, margin=args.margin, seed=args.seed,
                      print_freq=args.print_freq, save_freq=args.save_freq, device=args.device,
                      feature_cache=args.feature_cache, num_workers=args.num_workers, resume=args.resume,
                      progress=not args.no_progress, unmasked_anomalies=args.unmasked_anomalies)
    try:
        last = train(model_cfg, cfg)
    except KeyboardInterrupt:
        return 130
    if last is not None:
        print(f"checkpoint: {last}")
    return 0


def _model_fields(args: argparse.Namespace, defaults: bool) -> dict[str, Any]:
    out = {}
    for flag, field in MODEL_FLAGS.items():
        v = getattr(args, flag)
        if v is None and not (flag == "pretrained" and defaults):
            continue
        out[field] = v
    return out


def _dataset(name: Optional[str]) -> Optional[str]:
    if name is None:
        return None
    from ..datasets import resolve_dataset_name

    return resolve_dataset_name(name)


# ---------------------------------------------------------------------------- test
def test_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="test.py", description="Zero-shot test of trained GlocalCLIP prompts.")
    p.add_argument("--data_path", required=True, help="dataset root holding meta.json")
    p.add_argument("--dataset", default=None, help="dataset name (mvtec, visa, ...); omit for folder-mode data")
    p.add_argument("--checkpoint_path", required=True,
                   help="our checkpoint (config inside) or an original GlocalCLIP/AnomalyCLIP one")
    p.add_argument("--save_path", default="./results/run")
    p.add_argument("--sigma", type=float, default=8.0, help="Gaussian smoothing of the maps (paper: 8)")
    p.add_argument("--metrics", choices=("image-level", "pixel-level", "image-pixel-level"), default=None,
                   help="default: per dataset as in the paper")
    p.add_argument("--batch_size", type=positive_int, default=None,
                   help="images per batch; metrics do not depend on it (default: 16 on a GPU, 8 on a CPU)")
    p.add_argument("--num_workers", type=non_negative_int, default=None,
                   help="loader worker processes (default: from the device and the CPU cores: on a GPU the "
                        "cores minus 2, at most 12; on a CPU 1)")
    p.add_argument("--device", default=None)
    p.add_argument("--classes", nargs="+", default=None, help="test only these classes")
    p.add_argument("--save_vis", action="store_true", help="write heat-map overlays")
    p.add_argument("--no_progress", action="store_true")
    add_model_args(p, defaults=False)
    return p


def build_test_model(checkpoint_path: str, overrides: dict[str, Any]):
    """Our checkpoint: its config, then ``overrides``. An original-format checkpoint: defaults,
    prompt shapes read off its tensors, then ``overrides``."""
    from ..model.checkpoint_format import infer_prompt_shape, is_ours, prompt_state_of, read_checkpoint
    from ..model.glocalclip import GlocalCLIP

    ckpt = read_checkpoint(checkpoint_path)
    if is_ours(ckpt):
        base = dict(ckpt["config"])
    else:
        base = GlocalCLIPConfig().to_dict()
        base.update(infer_prompt_shape(prompt_state_of(ckpt)))
    base.update(overrides)
    model = GlocalCLIP(GlocalCLIPConfig.from_dict(base))
    model.load_prompts(ckpt)
    return model, ckpt


def test_main(argv: Optional[Sequence[str]] = None) -> int:
    import torch

    from ..engine.checkpoint import atomic_save
    from ..model.checkpoint_format import is_ours
    from ..datasets import load_meta
    from ..engine.distributed import init_distributed
    from ..engine.evaluation import evaluate
    from .results import results_table, software_versions, write_results

    argv = list(sys.argv[1:] if argv is None else argv)
    args = test_parser().parse_args(argv)
    overrides = model_overrides(args, argv)
    ctx = init_distributed(args.device)
    t0 = time.time()
    try:
        load_meta(args.data_path, _dataset(args.dataset))  # a wrong data path fails before the weights load
        model, ckpt = build_test_model(args.checkpoint_path, overrides)
        model = model.to(ctx.device)
        out_dir = Path(args.save_path)
        results = evaluate(model, args.data_path, _dataset(args.dataset), ctx, mode=args.metrics,
                           sigma=args.sigma, batch_size=args.batch_size, num_workers=args.num_workers,
                           classes=args.classes, vis_dir=out_dir / "vis" if args.save_vis else None,
                           progress=not args.no_progress, partial_path=out_dir / "results.partial.json")
        if ctx.is_main:
            results.update({"checkpoint": str(args.checkpoint_path), "config": model.cfg.to_dict(),
                            "train_config": ckpt.get("train_config"),
                            "versions": software_versions(), "total_wall_time_s": time.time() - t0})
            print(results_table(results, fmt="simple"))
            paths = write_results(results, out_dir)
            (out_dir / "results.partial.json").unlink(missing_ok=True)
            print(f"results: {paths['json']} {paths['csv']} {paths['md']}")
            thr = results.get("image_threshold")
            if thr is not None and is_ours(ckpt) and Path(args.checkpoint_path).is_file():
                ckpt["threshold"] = {"image_score": thr, "dataset": results["dataset"],
                                     "data_path": str(args.data_path), "sigma": args.sigma}
                atomic_save(ckpt, args.checkpoint_path)
    finally:
        ctx.shutdown()
    return 0


# ---------------------------------------------------------------------------- entry
def _lazy(module: str, func: str):
    def run(argv: Sequence[str]) -> int:
        import importlib

        name = module if module.startswith("glocalclip.") else f"glocalclip.apps.{module}"
        return getattr(importlib.import_module(name), func)(list(argv))
    return run


COMMANDS = {"train": train_main, "test": test_main, "demo": _lazy("demo", "demo_main"),
            "predict": _lazy("predict_cli", "predict_main"), "convert": _lazy("convert", "convert_main"),
            "report": _lazy("report", "report_main"), "export": _lazy("glocalclip.deploy.export", "export_main"),
            "serve": _lazy("glocalclip.deploy.serve", "serve_main")}


def _input_errors() -> tuple[type, ...]:
    from ..model.backbone import PretrainedWeightsUnavailable

    return (ValueError, FileNotFoundError, PretrainedWeightsUnavailable)  # DatasetError is a ValueError


def run_command(prog: str, command: Callable[[list[str]], Optional[int]],
                argv: Optional[Sequence[str]] = None) -> int:
    """Run a command line as a script does. An input error (a missing path, a bad flag value, data or a
    checkpoint that does not fit) prints its message, which names the fix, without a traceback and
    exits 2 (``GLOCALCLIP_TRACEBACK=1`` shows the traceback); Ctrl-C exits 130. Called as functions,
    the commands raise instead."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return command(argv) or 0
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - re-raised unless it is an input error
        if os.environ.get("GLOCALCLIP_TRACEBACK") or not isinstance(e, _input_errors()):
            raise
        print(f"{prog}: error: {e}\n(GLOCALCLIP_TRACEBACK=1 shows where it was raised)", file=sys.stderr)
        return 2


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print("usage: glocalclip {" + ",".join(COMMANDS) + "} [options]  (glocalclip CMD --help for each)")
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    return run_command(f"glocalclip {argv[0]}", COMMANDS[argv[0]], argv[1:])


if __name__ == "__main__":
    sys.exit(main())
