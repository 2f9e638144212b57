"""The settings of a resumed run (docs/design.md §5, §5.1): which it shares with its checkpoint,
which it may change, and the record of what it changed.

A resumed run is the same run only if everything that shapes the optimisation is the same: the
batch order (seed, batch size), the loss (alpha, margin, the rule for anomalies without masks) and
the images. Those are taken from the checkpoint where no flag gives them, and a flag that contradicts
them is refused. A new learning rate and a larger epoch count are well defined mid-run: they are
applied from the next step on, and the checkpoint records them together with the epoch from which
they hold. Every other setting says where files go or how fast they are made, and is free.
No torch here.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

from ..model.checkpoint_format import is_ours
from ..model.config import GlocalCLIPConfig
from .settings import TrainConfig, unmasked_mode

#: settings that shape the optimisation: a resumed run keeps the checkpoint's
SHARED = ("seed", "batch_size", "alpha", "margin", "dataset", "unmasked_anomalies")
#: settings a resumed run may change from the next step on (the trainer checks that a new
#: train_data_path holds the same images)
CHANGEABLE = ("learning_rate", "epoch", "train_data_path")


def inherit(recorded: Optional[Mapping[str, Any]], given: Mapping[str, Any]) -> dict[str, Any]:
    """The training settings of a resumed run: those ``given`` on the command line, and for each
    shared or changeable setting not given, the checkpoint's ``recorded`` value."""
    inherited = {k: recorded[k] for k in SHARED + CHANGEABLE if recorded and k in recorded and k not in given}
    return {**inherited, **given}


def _effective(name: str, values: Mapping[str, Any]) -> Any:
    """A setting's value as it acts: ``unmasked_anomalies auto`` is skip for folder-mode data, zero
    for a named dataset (settings.unmasked_mode)."""
    value = values.get(name)
    if name == "unmasked_anomalies" and value is not None:
        return unmasked_mode(value, values.get("dataset"))
    return value


def resume_changes(recorded: Optional[Mapping[str, Any]], now: Mapping[str, Any]) -> dict[str, list[Any]]:
    """``{setting: [checkpoint's, now]}`` for the changeable settings that differ. A shared setting
    that differs is refused (ValueError naming each). A checkpoint without a recorded training
    configuration (converted from the original code) has nothing to compare."""
    if not recorded:
        return {}
    clash = [k for k in SHARED if k in recorded and _effective(k, recorded) != _effective(k, now)]
    if clash:
        detail = ", ".join(f"--{k} {now.get(k)} but the checkpoint has {recorded.get(k)}" for k in clash)
        raise ValueError(f"--resume: {detail}; these shape the run (its batch order and loss), so it cannot "
                         f"continue with them: leave the flags out to use the checkpoint's values, or start a new "
                         f"run (--overwrite, or another --save_path)")
    return {k: [recorded[k], now[k]] for k in CHANGEABLE if k in recorded and recorded[k] != now.get(k)}


def resume_entry(at_epoch: int, source: str, changes: Mapping[str, list[Any]]) -> dict[str, Any]:
    """One resume as checkpoints record it: from which epoch on the changed settings hold."""
    return {"at_epoch": int(at_epoch), "from": source, "changed": dict(changes)}


def resumed_configs(ckpt: Mapping[str, Any], given: Mapping[str, Any], model_given: Mapping[str, Any]):
    """(TrainConfig, GlocalCLIPConfig) of ``train.py --resume``: the flags given, the rest from the
    checkpoint (its training settings as :func:`inherit` says, its model settings all). A checkpoint
    that is not ours gives nothing; the trainer then refuses it."""
    if not is_ours(dict(ckpt)):
        return TrainConfig(**given), GlocalCLIPConfig.for_backbone(**model_given)
    train = TrainConfig(**inherit(ckpt.get("train_config"), given))
    return train, GlocalCLIPConfig.from_dict({**ckpt["config"], **model_given})
