"""Old module paths (before the model/engine/apps split) still import, with their names."""
from __future__ import annotations

import importlib

import pytest

from glocalclip._compat import OLD_MODULE_PATHS

#: one name each old module had, and still exports from its new home
OLD_NAMES = {"config": "GlocalCLIPConfig", "backbone": "create_backbone", "vv_attention": "DualPathVisionEncoder",
             "text_encoder": "DeepPromptTextEncoder", "prompts": "GlocalPromptLearner", "losses": "local_loss",
             "scoring": "gaussian_smooth", "checkpoint": "atomic_save", "training": "TrainConfig",
             "feature_cache": "FeatureCache", "evaluation": "evaluate", "metrics": "aupro",
             "distributed": "DistContext", "resources": "plan_loader", "cli": "main", "predict": "Predictor",
             "report": "report_main", "results": "write_results", "convert": "convert_main",
             "visualize": "overlay", "synthetic": "make_synthetic_dataset"}


def test_every_old_path_is_covered_here():
    assert set(OLD_NAMES) == set(OLD_MODULE_PATHS)


@pytest.mark.parametrize("old", sorted(OLD_NAMES))
def test_an_old_path_imports_and_gives_its_names(old):
    module = importlib.import_module(f"glocalclip.{old}")
    name = OLD_NAMES[old]
    homes = [importlib.import_module(f"glocalclip.{t}") for t in OLD_MODULE_PATHS[old]]
    assert getattr(module, name) is next(getattr(h, name) for h in homes if hasattr(h, name))
    with pytest.raises(AttributeError):
        getattr(module, "no_such_name_anywhere")


def test_a_split_module_finds_names_in_each_new_home_and_a_moved_module_keeps_its_own_spec():
    scoring = importlib.import_module("glocalclip.scoring")
    assert scoring.anomaly_map is importlib.import_module("glocalclip.model.scoring").anomaly_map
    assert scoring.GaussianSmoothing is importlib.import_module("glocalclip.engine.smoothing").GaussianSmoothing
    vision = importlib.import_module("glocalclip.vv_attention")
    assert vision is importlib.import_module("glocalclip.model.vision")
    assert vision.__spec__.name == "glocalclip.model.vision"
    assert importlib.reload(vision) is vision
