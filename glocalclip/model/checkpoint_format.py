"""Checkpoint dict formats, as pure functions: ours and the original code's.

Ours: ``{"format": "glocalclip", "version", "config", "prompt_learner", "epoch", "optimizer", ...}``.
The original GlocalCLIP / AnomalyCLIP code saved ``{"prompt_learner": state_dict}`` with contexts of
shape [1, 1, n, W], deep tokens ``compound_prompts_text.{i}`` [t, W], and unused projection weights
and buffers, which we drop. :func:`adapt_checkpoint` turns either layout into (config, prompt state)
at load time, as timm's ``checkpoint_filter_fn`` does. ``read_checkpoint`` is the one file read of
the model layer: the public ``GlocalCLIP.load_prompts(path)`` takes a path.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Optional

import torch

from .config import GlocalCLIPConfig

FORMAT = "glocalclip"
GLOCAL_KEYS = ("ctx_global_pos", "ctx_global_neg", "ctx_local_pos", "ctx_local_neg")
ANOMALYCLIP_KEYS = ("ctx_pos", "ctx_neg")


#: what a checkpoint file is, said in every message about one that is not
EXPECTED = ("expected a checkpoint written by glocalclip (train.py's epoch_N.pth, or convert) or by the original "
            "GlocalCLIP/AnomalyCLIP code")
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format since PyTorch 1.6


class CheckpointError(ValueError):
    """A file given as a checkpoint is not a readable one. ``kind`` says what it is instead:
    "folder", "empty", "truncated", "not_torch" (random bytes, another kind of file),
    "not_dict" (a tensor or a whole model) or "unreadable"."""

    def __init__(self, message: str, kind: str = "unreadable"):
        super().__init__(message)
        self.kind = kind


def _sniff(path: Path) -> None:
    """Raise CheckpointError for a folder, an empty file, a cut-off zip or bytes that are neither
    of torch.save's formats (a zip archive, or a pickle for the legacy format)."""
    if path.is_dir():
        inside = sorted(path.glob("epoch_*.pth"), key=lambda q: (len(q.name), q.name))  # epoch_9 < epoch_10
        hint = f" such as {inside[-1]}" if inside else ""
        raise CheckpointError(f"checkpoint {path} is a folder; give a checkpoint file inside it{hint}. {EXPECTED}",
                              "folder")
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e.strerror or e}; check its permissions",
                              "unreadable") from None
    if size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes): its writing was cut off; {EXPECTED}", "empty")
    if head == _ZIP_MAGIC:
        import zipfile

        if not zipfile.is_zipfile(path):
            raise CheckpointError(f"checkpoint {path} is truncated ({size} bytes, the end of its zip archive is "
                                  f"missing): an interrupted copy or write; copy it again or use an earlier one",
                                  "truncated")
    elif not (len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5):  # pickle protocol 2..5
        raise CheckpointError(f"checkpoint {path} is not a PyTorch file (it starts with bytes {head.hex(' ')}, "
                              f"neither a zip archive nor a pickle: random data or another kind of file); {EXPECTED}",
                              "not_torch")


def read_checkpoint(source: str | os.PathLike | dict) -> dict:
    """The checkpoint dict in ``source`` (a dict is returned as is). A missing file raises
    FileNotFoundError; anything else that is not a checkpoint raises CheckpointError saying what
    the file is and what was expected."""
    if isinstance(source, dict):
        return source
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    _sniff(path)
    try:
        ckpt = torch.load(str(path), map_location="cpu", weights_only=False)
    except Exception as e:  # torch.load raises many types: pickle's, zip's, RuntimeError, ...
        cut = isinstance(e, EOFError) or any(w in str(e).lower() for w in ("truncated", "eof", "ran out of input"))
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"cannot read checkpoint {path}: {'it ends early, ' if cut else ''}{first}; "
                              f"{EXPECTED}", "truncated" if cut else "unreadable") from e
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(ckpt).__name__}, not a checkpoint dict; {EXPECTED}",
                              "not_dict")
    return ckpt


def is_ours(ckpt: dict) -> bool:
    return ckpt.get("format") == FORMAT


def prompt_style_of(state: dict) -> str:
    if all(k in state for k in GLOCAL_KEYS):
        return "glocal"
    if all(k in state for k in ANOMALYCLIP_KEYS):
        return "anomalyclip"
    raise ValueError(f"prompt state holds neither GlocalCLIP contexts {GLOCAL_KEYS} nor AnomalyCLIP "
                     f"contexts {ANOMALYCLIP_KEYS}; keys: {sorted(state)[:8]}...")


def normalise_prompt_state(state: dict) -> dict[str, torch.Tensor]:
    """Keep only the learnable tensors, contexts flattened to [rows, W], deep tokens [t, W]."""
    style = prompt_style_of(state)
    keys = GLOCAL_KEYS if style == "glocal" else ANOMALYCLIP_KEYS
    out: dict[str, torch.Tensor] = {}
    for k in keys:
        t = state[k]
        out[k] = t.reshape(-1, t.shape[-1]).float()
    deep = sorted((k for k in state if k.startswith("compound_prompts_text.")),
                  key=lambda k: int(k.rsplit(".", 1)[1]))
    for k in deep:
        out[k] = state[k].reshape(-1, state[k].shape[-1]).float()
    return out


def infer_prompt_shape(state: dict) -> dict[str, Any]:
    """n_ctx, ab_ctx, depth, t_n_ctx and prompt_style from a prompt state's tensor shapes."""
    s = normalise_prompt_state(state)
    style = prompt_style_of(s)
    deep = [k for k in s if k.startswith("compound_prompts_text.")]
    t = s[deep[0]].shape[0] if deep else None
    if style == "glocal":
        n, a = s["ctx_global_pos"].shape[0], s["ctx_global_neg"].shape[0]
    else:
        n = a = s["ctx_pos"].shape[0]
    shape = {"prompt_style": style, "n_ctx": n, "ab_ctx": a, "depth": len(deep) + 1}
    if t is not None:
        shape["t_n_ctx"] = t
    return shape


def prompt_state_of(ckpt: dict) -> dict[str, torch.Tensor]:
    if "prompt_learner" not in ckpt:
        raise ValueError("not a GlocalCLIP/AnomalyCLIP checkpoint: it has no 'prompt_learner' entry "
                         f"(keys: {sorted(ckpt)[:8]})")
    return normalise_prompt_state(ckpt["prompt_learner"])


def tensor_settings(state: dict) -> dict[str, Any]:
    """The config fields a prompt state fixes: prompt_style, n_ctx, depth, t_n_ctx, and ab_ctx for
    the glocal layout (AnomalyCLIP's has one context length for both prompts: ab_ctx plays no part)."""
    found = infer_prompt_shape(state)
    if found["prompt_style"] == "anomalyclip":
        found.pop("ab_ctx")
    return found


def adapt_checkpoint(ckpt: dict, overrides: Mapping[str, Any]) -> tuple[GlocalCLIPConfig, dict[str, torch.Tensor]]:
    """Any supported checkpoint dict and config overrides -> (config, prompt state in our layout).

    Ours: its config, then ``overrides``. The original code's (no config inside): the settings of
    the backbone named in ``overrides`` (``GlocalCLIPConfig.for_backbone``), the prompt shape read off
    the tensors, then ``overrides``. An override that contradicts the tensors is refused by name."""
    state = prompt_state_of(ckpt)
    found = tensor_settings(state)
    clash = {k: (overrides[k], v) for k, v in found.items() if k in overrides and overrides[k] != v}
    if clash:
        detail = ", ".join(f"--{k} {a} but the checkpoint has {b}" for k, (a, b) in clash.items())
        raise ValueError(f"the settings do not fit the checkpoint's tensors: {detail}")
    if is_ours(ckpt):
        return GlocalCLIPConfig.from_dict({**ckpt["config"], **overrides}), state
    if found["prompt_style"] == "anomalyclip":
        found["ab_ctx"] = found["n_ctx"]
    return GlocalCLIPConfig.for_backbone(**{**found, **overrides}), state


def make_checkpoint(config: dict, prompt_state: dict, epoch: int, optimizer: Optional[dict] = None,
                    **extra: Any) -> dict:
    from .. import __version__

    return {"format": FORMAT, "version": __version__, "config": config,
            "prompt_learner": {k: v.detach().cpu() for k, v in prompt_state.items()},
            "epoch": epoch, "optimizer": optimizer, **extra}
