"""The module paths of versions before the package was split into model/engine/apps keep working:
``import glocalclip.scoring`` gives ``glocalclip.model.scoring``, and so on."""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

#: old module (directly under glocalclip) -> its module now
OLD_MODULE_PATHS = {
    "config": "model.config", "backbone": "model.backbone", "vv_attention": "model.vision",
    "text_encoder": "model.text", "prompts": "model.prompts", "scoring": "model.scoring",
    "losses": "model.losses", "checkpoint": "model.checkpoint_format",
    "training": "engine.training", "feature_cache": "engine.feature_cache", "evaluation": "engine.evaluation",
    "metrics": "engine.metrics", "distributed": "engine.distributed", "resources": "engine.loaders",
    "cli": "apps.cli", "predict": "apps.predict", "report": "apps.report", "results": "apps.results",
    "convert": "apps.convert", "visualize": "apps.visualize", "synthetic": "datasets.synthetic",
}


class _OldPathFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Answers ``glocalclip.<old>`` with the module that now holds that code."""

    def find_spec(self, fullname, path=None, target=None):
        pkg, _, name = fullname.rpartition(".")
        if pkg != "glocalclip" or name not in OLD_MODULE_PATHS:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        name = spec.name.rpartition(".")[2]
        return importlib.import_module(f"glocalclip.{OLD_MODULE_PATHS[name]}")

    def exec_module(self, module):
        pass  # already executed under its new name



def install_old_module_paths() -> None:
    if not any(isinstance(f, _OldPathFinder) for f in sys.meta_path):
        sys.meta_path.append(_OldPathFinder())
