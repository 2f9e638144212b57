"""The flags of ``train``, ``test``, ``convert`` and ``export``, built from the settings dataclasses without
importing torch: ``glocalclip CMD --help`` and a mistyped flag answer before the command's module
(and with it torch) loads."""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Optional

from ..engine.settings import TestConfig, TrainConfig
from ..model.config import FewShotSettings
from ..inference.settings import ModelSettings
from ..deploy.metadata import weights_kind
from ..settings import check_settings, setting, settings_fields
from .flags import add_load_flags, add_model_flags, add_reference_flags, add_settings, new_parser

CONVERT_SUMMARY = ("an original GlocalCLIP / AnomalyCLIP checkpoint (``{\"prompt_learner\": ...}``, no config) "
                   "to our format, with the config inside.")


def train_parser() -> argparse.ArgumentParser:
    p = new_parser("train.py", "Train GlocalCLIP prompts on an auxiliary dataset's labelled test split "
                               "(the paper's protocol).")
    add_settings(p, TrainConfig)
    add_load_flags(p)
    add_model_flags(p, for_training=True)
    return p


def test_parser() -> argparse.ArgumentParser:
    p = new_parser("test.py", "Zero-shot (or, with --shots, few-shot) test of trained GlocalCLIP prompts.")
    add_settings(p, TestConfig, fields=[f.name for f, _ in settings_fields(TestConfig) if f.name != "shot_seed"])
    # given-only: a few-shot flag given without --shots is refused rather than ignored (cli.test_main)
    few_shot = p.add_argument_group("few-shot (with --shots K)")
    add_settings(few_shot, TestConfig, fields=("shot_seed",), given_only=True)
    add_settings(few_shot, FewShotSettings, given_only=True)
    add_settings(p, ModelSettings, fields=("checkpoint", "sigma", "device", "batch_size"), required=("checkpoint",))
    add_load_flags(p)
    add_model_flags(p, for_training=False)
    return p


def convert_parser() -> argparse.ArgumentParser:
    p = new_parser("glocalclip convert", f"``glocalclip convert OLD.pth NEW.pt``: {CONVERT_SUMMARY}",
                   epilog="AnomalyCLIP's released weights: --prompt_style anomalyclip --n_ctx 12 --depth 9 "
                          "--t_n_ctx 4 (the defaults give features 6 12 18 24, dpam 20, image 518)")
    p.add_argument("source", metavar="OLD.pth", help="original-format checkpoint (or one of ours)")
    p.add_argument("target", metavar="NEW.pt", help="where to write our format")
    add_load_flags(p)
    add_model_flags(p, for_training=False)
    return p


@dataclass
class ExportSettings:
    """``glocalclip export``'s own options (each a flag); the model is :class:`ModelSettings`'."""

    out: str = setting("", required=True, help="the ONNX file to write (weights over 2 GB go beside it, in OUT.data)")
    half: bool = setting(False, switch=True, help="store the weight matrices as float16: about half the file; "
                                                  "computed in float32, so scores move by ~1e-4")
    int8: bool = setting(False, switch=True, help="store the transformer blocks' weight matrices as int8 and multiply "
                                                  "them in int8 (ONNX Runtime's dynamic quantization): on a CPU "
                                                  "1.4-1.75x faster for ViT-B/L-sized backbones (slower for tiny "
                                                  "ones) and a third of the file; maps move "
                                                  "by 0.5-1.2 % of their range, scores by up to ~2e-2 "
                                                  "(docs/speed.md). Not with --half")
    image_size: Optional[int] = setting(None, parse=int, minimum=1, help="input side S fixed in the file; the "
                                        "positional table is resized for it", default_text="the checkpoint's")
    threshold: Optional[float] = setting(None, parse=float, help="label threshold stored in the file",
                                         default_text="the one test.py stored beside the checkpoint, if any")
    pretrained: Optional[str] = setting(None, help="CLIP weights to rebuild the backbone from, when the "
                                                   "checkpoint's are not at hand (an open_clip tag or a file)",
                                        default_text="the checkpoint's")

    def __post_init__(self) -> None:
        check_settings(self)
        weights_kind(self.half, self.int8)


def export_parser() -> argparse.ArgumentParser:
    p = new_parser("glocalclip export", "Export a checkpoint as one ONNX graph: uint8 images [B, S, S, 3] in, "
                   "image score [B] and smoothed anomaly map [B, S, S] out. Needs pip install 'glocalclip[deploy]'.")
    add_settings(p, ModelSettings, fields=("checkpoint", "sigma"), positional=("checkpoint",))
    add_settings(p, ExportSettings)
    add_reference_flags(p)
    add_load_flags(p)
    return p
