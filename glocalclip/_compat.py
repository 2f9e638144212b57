"""The module paths of versions before the package was split into model/engine/apps keep working:
``import glocalclip.vv_attention`` gives ``glocalclip.model.vision``, and so on. Where an old module
was split (``scoring`` into the model's scoring and the engine's smoothing, for one), the old path
is a small module that finds each name in the new ones, in order. Names removed on purpose (dead
code, replaced helpers) stay removed."""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import types
from typing import Any

#: old module (directly under glocalclip) -> the module(s) that hold its code now
OLD_MODULE_PATHS: dict[str, tuple[str, ...]] = {
    "config": ("model.config",), "backbone": ("model.backbone",), "vv_attention": ("model.vision",),
    "text_encoder": ("model.text",), "prompts": ("model.prompts",), "losses": ("model.losses",),
    "scoring": ("model.scoring", "engine.smoothing"),
    "checkpoint": ("model.checkpoint_format", "engine.checkpoint"),
    "training": ("engine.training", "engine.settings", "engine.runs"), "feature_cache": ("engine.feature_cache",),
    "evaluation": ("inference.evaluation",), "metrics": ("engine.metrics",), "distributed": ("engine.distributed",),
    "resources": ("engine.loaders",), "cli": ("apps.cli", "apps.flags", "apps.demo"),
    "predict": ("inference.predictor", "inference.images", "apps.predict_cli"), "report": ("apps.report",),
    "results": ("apps.results",), "convert": ("apps.convert",), "visualize": ("inference.visualize",),
    "synthetic": ("datasets.synthetic",),
}


def _forwarding_module(name: str, targets: tuple[str, ...]) -> types.ModuleType:
    """A module whose names are looked up in ``targets`` (imported on first use), first hit wins."""
    module = types.ModuleType(name, f"Old path of {', '.join('glocalclip.' + t for t in targets)}.")

    def lookup(attr: str) -> Any:
        for target in targets:
            found = importlib.import_module(f"glocalclip.{target}")
            if hasattr(found, attr):
                return getattr(found, attr)
        raise AttributeError(f"module {name!r} has no attribute {attr!r}")

    module.__getattr__ = lookup
    return module


class _OldPathFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Answers ``glocalclip.<old>`` with the module that now holds that code."""

    def __init__(self) -> None:
        self._real_specs: dict[str, Any] = {}  # old name -> the new module's own spec, put back on exec

    def find_spec(self, fullname, path=None, target=None):
        pkg, _, name = fullname.rpartition(".")
        if pkg != "glocalclip" or name not in OLD_MODULE_PATHS:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        targets = OLD_MODULE_PATHS[spec.name.rpartition(".")[2]]
        if len(targets) > 1:
            return _forwarding_module(spec.name, targets)
        module = importlib.import_module(f"glocalclip.{targets[0]}")
        self._real_specs[spec.name] = module.__spec__
        return module

    def exec_module(self, module):
        # the import machinery stamped the old path's spec on the module: give it back its own
        real = self._real_specs.pop(getattr(module.__spec__, "name", None), None)
        if real is not None:
            module.__spec__ = real


def install_old_module_paths() -> None:
    if not any(isinstance(f, _OldPathFinder) for f in sys.meta_path):
        sys.meta_path.append(_OldPathFinder())
