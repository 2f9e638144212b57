"""Which predictor a :class:`ModelSettings` opens: a checkpoint the PyTorch ``Predictor``, an ONNX
file the ``OnnxPredictor``. Like the command table, this table imports a backend only when it is
chosen, so that ``predict --model`` and ``serve --model`` run without torch."""
from __future__ import annotations

import importlib
from typing import Any

from ..inference.interface import ImagePredictor
from ..inference.settings import ModelSettings
from ..settings import SettingError

#: source field -> (module, class) of the predictor that scores with it
BACKENDS = {"checkpoint": ("glocalclip.inference.predictor", "Predictor"),
            "model": ("glocalclip.deploy.runtime", "OnnxPredictor")}
DEFAULT_BATCH = 8


def open_predictor(settings: ModelSettings, use: str, threshold: Any = None,
                   overrides: dict[str, Any] | None = None, trust: bool = False,
                   reference: Any = None, few_shot: Any = None) -> ImagePredictor:
    """The predictor of ``settings`` (one of checkpoint / model), σ by ``sigma_for``'s rule; model
    ``overrides`` (and ``precision``) apply to a checkpoint (an ONNX file fixes its model); ``trust``:
    load a checkpoint that could run code (``--trust_checkpoint``). ``reference`` (ReferenceSettings)
    and ``few_shot``: a checkpoint scores few-shot; an ONNX file holds its bank from export."""
    settings.one_source(use)
    batch = settings.batch_size or DEFAULT_BATCH
    overrides = {**(overrides or {}), **({} if settings.precision is None else {"precision": settings.precision})}
    if settings.checkpoint is not None:
        module, name = BACKENDS["checkpoint"]
        predictor_class = getattr(importlib.import_module(module), name)
        few = {} if reference is None or reference.reference is None else {
            "reference": reference.reference, "save_reference": reference.save_reference,
            "overwrite_reference": reference.overwrite_reference, "few_shot": few_shot}
        return predictor_class.from_checkpoint(settings.checkpoint, device=settings.device, threshold=threshold,
                                               sigma=settings.sigma, batch_size=batch, trust=trust, **few,
                                               **overrides)
    if reference is not None and reference.reference is not None:
        raise SettingError("reference", f"{settings.model} is an exported file: it scores with the bank it was "
                                        "exported with, if any; export the checkpoint with `glocalclip export ... "
                                        "--reference DIR` for another {reference}")
    if overrides:
        raise ValueError(f"model settings ({', '.join(sorted(overrides))}) set up a checkpoint's model; an ONNX "
                         f"file fixes its model: export it again with the settings you want")
    module, name = BACKENDS["model"]
    predictor = getattr(importlib.import_module(module), name)(settings.model, threshold=threshold,
                                                               batch_size=batch, device=settings.device)
    if settings.sigma is not None and settings.sigma != predictor.sigma:
        raise SettingError("sigma", f"{settings.model} smooths its maps with σ={predictor.sigma:g}, built into the "
                                    f"file; export it again with `glocalclip export ... --sigma {settings.sigma:g}` "
                                    f"for another {{sigma}}")
    return predictor
