"""The flags of ``train``, ``test`` and ``convert``, built from the settings dataclasses without
importing torch: ``glocalclip CMD --help`` and a mistyped flag answer before the command's module
(and with it torch) loads."""
from __future__ import annotations

import argparse

from ..engine.settings import TestConfig, TrainConfig
from ..model.config import FewShotSettings
from ..inference.settings import ModelSettings
from .flags import add_load_flags, add_model_flags, add_settings, new_parser

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
    add_settings(p, TestConfig)
    add_settings(p.add_argument_group("few-shot (with --shots K)"), FewShotSettings)
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
