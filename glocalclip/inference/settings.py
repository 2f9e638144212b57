"""Which model and how to run it, declared once for ``predict``, ``serve``, ``test`` and ``export``:
a checkpoint (PyTorch) or an exported ONNX file, σ, device and batch size. Torch-free.

Errors name the fields; the command line shows them as its flags (``apps/flags.py``)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

from ..model.config import BANK_SUFFIXES, PRECISIONS, is_bank_name
from ..settings import SettingError, check_settings, setting, template_literal

SIGMA_RULE = "the σ the checkpoint's threshold was measured with (test.py stores it), else the paper's 8"


@dataclass
class ModelSettings:
    """The model a command runs and how (each a flag; a command takes the fields it uses)."""

    checkpoint: Optional[str] = setting(None, aliases=("checkpoint_path",),
                                        help="our checkpoint (config inside), or an original GlocalCLIP/AnomalyCLIP "
                                             "one (then give its model flags)")
    model: Optional[str] = setting(None, help="an ONNX file from `glocalclip export`, run with ONNX Runtime (torch "
                                              "is not loaded); its σ and threshold are stored in the file")
    sigma: Optional[float] = setting(None, parse=float, minimum=0, help="Gaussian smoothing of the maps",
                                     default_text=SIGMA_RULE + "; an ONNX file has its σ built in")
    device: Optional[str] = setting(None, help="cuda, cuda:1, cpu",
                                    default_text="the GPU if present; an ONNX file: ONNX Runtime's CPU unless cuda "
                                                 "is asked for")
    batch_size: Optional[int] = setting(None, parse=int, minimum=1, help="images per forward pass",
                                        default_text="8; test: 16 on a GPU, 8 on a CPU")
    precision: Optional[str] = setting(None, choices=PRECISIONS,
                                       help="a checkpoint's precision (docs/speed.md: bf16 is faster on CPUs with "
                                            "bf16 units and moves scores by about 1e-2); an ONNX file is float32",
                                       default_text="the checkpoint's, fp32 unless set when training")

    def __post_init__(self) -> None:
        check_settings(self)

    def one_source(self, use: str) -> "ModelSettings":
        """Exactly one of ``checkpoint`` and ``model``; an ONNX file fixes its σ."""
        if (self.checkpoint is None) == (self.model is None):
            raise SettingError("checkpoint", f"give the model to {use}: {{checkpoint}} CKPT (PyTorch) or {{model}} "
                                             f"FILE.onnx (ONNX Runtime), one of the two", also=("model",))
        return self

    def checkpoint_only(self, use: str) -> "ModelSettings":
        """A checkpoint, no ONNX file (``test`` and ``export`` run the PyTorch model)."""
        if self.model is not None:
            raise SettingError("model", f"{use} needs a checkpoint ({{checkpoint}}), not an ONNX file ({{model}})",
                               also=("checkpoint",))
        if not self.checkpoint:
            raise SettingError("checkpoint", f"give the checkpoint to {use}: {{checkpoint}} CKPT")
        return self


@dataclass
class ReferenceSettings:
    """Few-shot for ``predict``, ``serve`` and ``export`` (docs/design.md §11): the normal images whose
    bank every image is scored against. How the bank joins the scores is ``FewShotSettings``'."""

    reference: Optional[str] = setting(None, metavar="DIR|GLOB|BANK",
                                       help="normal images (a folder, searched recursively, or a quoted glob) whose "
                                            "patch features every image is compared with (few-shot); or a bank file "
                                            "saved with --save_reference. The stored zero-shot threshold is then "
                                            "not used: give --threshold",
                                       default_text="none (zero-shot)")
    save_reference: Optional[str] = setting(None, metavar="FILE.pt",
                                            help="save the bank built from --reference images, to reuse it as "
                                                 "--reference FILE.pt (the name ends in .pt, .pth or .bank; an "
                                                 "existing file is kept unless --overwrite_reference)",
                                            default_text="not saved")
    overwrite_reference: bool = setting(False, switch=True, help="replace an existing --save_reference file")

    def __post_init__(self) -> None:
        check_settings(self)
        if self.save_reference is None:
            if self.overwrite_reference:
                raise SettingError("overwrite_reference", "{overwrite_reference} replaces the file of "
                                                          "{save_reference}: give {save_reference} FILE.pt too",
                                   also=("save_reference",))
            return
        if self.reference is None:
            raise SettingError("save_reference", "{save_reference} saves the bank of {reference} images: give "
                                                 "{reference} DIR too", also=("reference",))
        target = template_literal(self.save_reference)
        if not is_bank_name(self.save_reference):
            raise SettingError("save_reference", f"{{save_reference}} {target}: a bank's file name ends in "
                                                 f"{', '.join(BANK_SUFFIXES)}, which {{reference}} reads back as a "
                                                 "bank (any other name is read as an image)", also=("reference",))
        if os.path.lexists(self.save_reference) and not self.overwrite_reference:
            raise SettingError("save_reference", f"{{save_reference}} {target} exists and is kept: give another "
                                                 "name, or {overwrite_reference} to replace it",
                               also=("overwrite_reference",))
