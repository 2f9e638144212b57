"""Command lines: ``glocalclip {train,test,predict,convert,report,demo}`` and the root scripts
``train.py`` / ``test.py``.

The flags are generated from the settings dataclasses (``TrainConfig``, ``TestConfig``,
``GlocalCLIPConfig``) with the original code's names (``--train_data_path``, ``--n_ctx``,
``--dpam``, ...). ``test`` takes every model setting from the checkpoint unless a flag overrides it.
Nothing here imports torch until a command runs, so ``glocalclip --help`` answers at once.
"""
from __future__ import annotations

import importlib
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional, Sequence

from ..engine.settings import TestConfig, TrainConfig
from ..files import OutputError, prepare_output_dir, removed_if_left_empty
from ..inference.settings import ModelSettings, ReferenceSettings
from ..model.config import FewShotSettings, GlocalCLIPConfig
from ..settings import SettingError
from .flags import (for_command_line, given_settings, model_overrides, parse_given, refuse_few_shot_flags_unused,
                    settings_from_args, trusted)
from .parsers import ExportSettings, test_parser, train_parser

#: the dataclasses whose fields a command-line error message shows as flags
SETTINGS_WITH_FLAGS = (GlocalCLIPConfig, ModelSettings, TrainConfig, TestConfig, FewShotSettings, ReferenceSettings,
                       ExportSettings)


# ---------------------------------------------------------------------------- train
def train_main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_given(train_parser(), TrainConfig, sys.argv[1:] if argv is None else argv)  # --help: no torch yet
    from ..engine.training import train

    trust = trusted(args)
    cfg, model_cfg, resume_point = train_configs(given_settings(TrainConfig, args), model_overrides(args), trust)
    try:
        last = train(model_cfg, cfg, resume_point=resume_point, trust=trust)
    except KeyboardInterrupt:
        return 130
    if last is not None:
        print(f"checkpoint: {last}")
    return 0


def train_configs(given: dict[str, Any], model_given: dict[str, Any], trust: bool = False):
    """(TrainConfig, GlocalCLIPConfig, the resume point or None) from the flags given: with
    ``--resume``, what is not given is the checkpoint's (docs/design.md §5), read once (``trust``:
    ``--trust_checkpoint``) and handed to the trainer; else the defaults, and the backbone's."""
    from ..engine.resume_settings import resumed_configs
    from ..engine.runs import ResumePoint

    if not given.get("resume"):
        return TrainConfig(**given), GlocalCLIPConfig.for_backbone(**model_given), None
    point = ResumePoint.read(given["resume"], trust)
    return (*resumed_configs(point.checkpoint, given, model_given), point)


# ---------------------------------------------------------------------------- test
def test_main(argv: Optional[Sequence[str]] = None) -> int:
    args = test_parser().parse_args(list(sys.argv[1:] if argv is None else argv))  # --help: no torch yet
    few_shot_given = [*given_settings(FewShotSettings, args), *(["shot_seed"] if hasattr(args, "shot_seed") else [])]
    refuse_few_shot_flags_unused(args, few_shot_given, "shots", "K (1 or more)", args.shots > 0)
    from ..datasets import load_meta
    from ..engine.checkpoint import load_model_and_checkpoint, sigma_for
    from ..engine.distributed import init_distributed
    from ..inference.evaluation import evaluate
    from ..inference.visualize import VisualWriter

    from ..engine.few_shot import class_banks, draw_shots

    cfg = settings_from_args(TestConfig, args)
    few_shot = settings_from_args(FewShotSettings, args)
    run = settings_from_args(ModelSettings, args).checkpoint_only("test")
    sigma = sigma_for(None, run.sigma)  # test measures the threshold: no earlier one decides σ
    ctx = init_distributed(run.device)
    t0 = time.time()
    try:
        with removed_if_left_empty(cfg.save_path):  # a failed run leaves no empty folder behind
            meta = load_meta(cfg.data_path, cfg.dataset)  # a wrong data path fails before the weights load
            # and so does a dataset without train normals to draw shots from (the same on every process)
            shots = draw_shots(meta["train"], cfg.classes or [c for c, e in meta["test"].items() if e], cfg.shots,
                               cfg.shot_seed, cfg.data_path) if cfg.shots else None
            prepare_output_dir(cfg.save_path)  # and so does a save folder that cannot take a file
            model, ckpt = load_model_and_checkpoint(run.checkpoint, trust=trusted(args), **model_overrides(args))
            model = model.to(ctx.device)
            banks = class_banks(model, cfg.data_path, cfg.dataset, shots, few_shot) if shots else None
            out_dir = Path(cfg.save_path)
            # folder-mode images were read turned by their EXIF orientation: draw them as the model saw them
            vis = VisualWriter(out_dir / "vis", upright=cfg.dataset is None) if cfg.save_vis else None
            t_eval = time.time()
            results = evaluate(model, cfg.data_path, cfg.dataset, ctx, mode=cfg.metrics, sigma=sigma,
                               batch_size=run.batch_size, num_workers=cfg.num_workers, classes=cfg.classes,
                               hooks=vis, progress=cfg.progress, partial_path=out_dir / "results.partial.json",
                               banks=banks)
            if ctx.is_main:
                results.update({"wall_time_s": time.time() - t_eval, "checkpoint": str(run.checkpoint),
                                "config": model.cfg.to_dict(), "train_config": ckpt.get("train_config"),
                                "shots": cfg.shots, "shot_seed": cfg.shot_seed if cfg.shots else None,
                                "few_shot": few_shot.to_dict() if cfg.shots else None, "shot_paths": shots})
                _finish_test(results, cfg, run.checkpoint, ckpt, t0)
    finally:
        ctx.shutdown()
    return 0


def _finish_test(results: dict[str, Any], cfg: Any, checkpoint: str, ckpt: dict, t0: float) -> None:
    """Print and write the results; store the F1-max threshold beside the checkpoint for predict
    (the checkpoint itself is never rewritten)."""
    from ..engine.checkpoint import threshold_source, write_threshold
    from ..model.checkpoint_format import is_ours
    from .results import results_table, software_versions, write_results
    from ..inference.visualize import threshold_caption

    out_dir = Path(cfg.save_path)
    results.update({"versions": software_versions(), "total_wall_time_s": time.time() - t0})
    print(results_table(results, fmt="simple"))
    paths = write_results(results, out_dir)
    (out_dir / "results.partial.json").unlink(missing_ok=True)
    print(f"results: {paths['json']} {paths['csv']} {paths['md']}")
    thr = results.get("image_threshold")
    if thr is None or not is_ours(ckpt) or not Path(checkpoint).is_file():
        return
    if results.get("shots"):
        # few-shot scores live on another scale: the zero-shot threshold beside the checkpoint stays
        print(f"few-shot image threshold {thr:.4g} (F1-max) in {paths['json']}; the zero-shot threshold beside "
              f"the checkpoint is left as it is (give predict --reference --threshold {thr:.6g} to use it)")
        return
    provenance = {"dataset": results["dataset"], "data_path": str(cfg.data_path), "sigma": results["sigma"],
                  "image_size": results["config"]["image_size"]}
    try:
        side = write_threshold(checkpoint, thr, **provenance)
    except OutputError as e:  # a read-only checkpoint folder: the results are written all the same
        print(f"note: the image threshold was not stored beside the checkpoint ({e}); give it to predict "
              f"as --threshold {thr!r}", file=sys.stderr)
        return
    print(f"{threshold_caption(thr, threshold_source(provenance))} for predict: {side}")


# ---------------------------------------------------------------------------- entry
class Command(NamedTuple):
    """A ``glocalclip`` command: where its function lives (imported when it runs), what it does, and
    where a torch-free parser of its flags lives ("module:function"), so that ``--help`` and a
    mistyped flag answer before the command's module, and torch with it, loads."""

    module: str
    function: str
    summary: str
    parser: Optional[str] = None

    def load(self) -> Callable[[list[str]], Optional[int]]:
        return getattr(importlib.import_module(_qualified(self.module)), self.function)

    def check_flags(self, argv: list[str]) -> None:
        """Parse ``argv`` with the torch-free parser: prints help or a flag error and exits there."""
        if self.parser is not None:
            module, function = self.parser.split(":")
            getattr(importlib.import_module(_qualified(module)), function)().parse_args(argv)


def _qualified(module: str) -> str:
    return module if module.startswith("glocalclip.") else f"glocalclip.apps.{module}"


COMMANDS = {
    "train": Command("cli", "train_main", "train the prompts on a dataset's labelled test split (= train.py)"),
    "test": Command("cli", "test_main", "zero-shot metrics of a checkpoint on a dataset (= test.py)"),
    "predict": Command("predict_cli", "predict_main", "score your own images (a checkpoint or an ONNX file): score, label, heat map"),
    "convert": Command("convert", "convert_main", "an original GlocalCLIP/AnomalyCLIP checkpoint to ours",
                       parser="parsers:convert_parser"),
    "report": Command("report", "report_main", "merge test runs into one table per dataset (mean ± std)"),
    "export": Command("export_cli", "export_main", "one ONNX graph from image to score and map (extra [deploy])",
                      parser="parsers:export_parser"),
    "serve": Command("serve_cli", "serve_main", "a web service and page for a checkpoint or an ONNX file (extra [serve])"),
    "demo": Command("demo", "demo_main", "the whole pipeline in seconds on synthetic data, tiny backbone"),
}


def overview() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: glocalclip COMMAND [options]", "", "commands:"]
    lines += [f"  {name:<{width}}  {c.summary}" for name, c in COMMANDS.items()]
    lines += ["", "glocalclip COMMAND --help lists a command's flags, each with its default."]
    return "\n".join(lines)


def _input_errors() -> tuple[type, ...]:
    """The exception types that are a user's input error (DatasetError and CheckpointError are
    ValueErrors). Taken from the modules only where they are loaded already: an exception of a class
    never imported cannot have been raised, and looking here must not import torch."""
    errors: list[type] = [ValueError, FileNotFoundError, OutputError]
    backbone = sys.modules.get("glocalclip.model.backbone")
    if backbone is not None:
        errors.append(backbone.PretrainedWeightsUnavailable)
    return tuple(errors)


def _missing_package(e: ImportError) -> str:
    """One line for a package that is absent or broken (torch, open_clip, onnxruntime, ...)."""
    name = getattr(e, "name", None) or "a package"
    return (f"this command needs {name}, which cannot be imported here ({e}); install the package "
            f"(README.md, Install: the CPU-only line, or the extra the command names) and run it again")


def run_command(prog: str, command: Callable[[list[str]], Optional[int]],
                argv: Optional[Sequence[str]] = None) -> int:
    """Run a command line as a script does. An input error (a missing path, a bad flag value, data or a
    checkpoint that does not fit) or a package that cannot be imported prints one message, which names
    the fix, without a traceback and exits 2 (``GLOCALCLIP_TRACEBACK=1`` shows the traceback); Ctrl-C
    exits 130. Called as functions, the commands raise instead."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return command(argv) or 0
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - re-raised unless it is an input error or a missing package
        if os.environ.get("GLOCALCLIP_TRACEBACK"):
            raise
        if isinstance(e, ImportError) and not (e.name or "").startswith("glocalclip"):  # ours: a bug
            message = _missing_package(e)
        elif isinstance(e, _input_errors()):
            message = for_command_line(e, *SETTINGS_WITH_FLAGS) if isinstance(e, SettingError) else str(e)
        else:
            raise
        print(f"{prog}: error: {message} (GLOCALCLIP_TRACEBACK=1 shows where it was raised)", file=sys.stderr)
        return 2


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(overview())
        return 0
    command = COMMANDS.get(argv[0])
    if command is None:
        print(f"glocalclip: unknown command {argv[0]!r}; the commands are {', '.join(COMMANDS)} "
              f"(glocalclip --help says what each does)", file=sys.stderr)
        return 2
    prog = f"glocalclip {argv[0]}"
    command.check_flags(argv[1:])
    return run_command(prog, lambda args: command.load()(args), argv[1:])


if __name__ == "__main__":
    sys.exit(main())
