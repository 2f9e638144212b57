"""Checkpoint dict formats, as pure functions: ours and the original code's.

Ours: ``{"format": "glocalclip", "version", "config", "prompt_learner", "epoch", "optimizer", ...}``.
The original GlocalCLIP / AnomalyCLIP code saved ``{"prompt_learner": state_dict}`` with contexts of
shape [1, 1, n, W], deep tokens ``compound_prompts_text.{i}`` [t, W], and unused projection weights
and buffers, which we drop. :func:`adapt_checkpoint` turns either layout into (config, prompt state)
at load time, as timm's ``checkpoint_filter_fn`` does. ``read_checkpoint`` is the one file read of
the model layer: the public ``GlocalCLIP.load_prompts(path)`` takes a path.

Loading never runs code (docs/usage.md, "Security: files you load"): :func:`safe_load` unpickles
tensors and plain values only, and a file that holds anything else is refused unless the caller
trusts it (``trust=True``, the ``--trust_checkpoint`` flag). Our checkpoints hold only such values,
and a SHA-256 of their contents (:func:`payload_sha256`), checked at every load.
"""
from __future__ import annotations

import hashlib
import os
import pickle
from pathlib import Path
from typing import Any, Mapping, Optional

import torch

from .config import TRUST_FLAG, GlocalCLIPConfig

FORMAT = "glocalclip"
GLOCAL_KEYS = ("ctx_global_pos", "ctx_global_neg", "ctx_local_pos", "ctx_local_neg")
ANOMALYCLIP_KEYS = ("ctx_pos", "ctx_neg")


#: what a checkpoint file is, said in every message about one that is not
EXPECTED = ("expected a checkpoint written by glocalclip (train.py's epoch_N.pth, or convert) or by the original "
            "GlocalCLIP/AnomalyCLIP code")
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format since PyTorch 1.6
#: the entry of our checkpoints that holds the SHA-256 of everything else in them
INTEGRITY_KEY = "payload_sha256"
#: how to load a refused file anyway, said in every refusal
TRUST_HINT = (f"load it anyway only if you trust the file and where it came from: {TRUST_FLAG} on the command "
              f"line, trust=True in Python (its code then runs with your rights)")


class CheckpointError(ValueError):
    """A file given as a checkpoint is not a readable one. ``kind`` says what it is instead:
    "folder", "empty", "truncated", "not_torch" (random bytes, another kind of file),
    "not_dict" (a tensor or a whole model), "unsafe" (it holds objects whose loading could run code),
    "corrupt" (its contents fail their SHA-256) or "unreadable"."""

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


def file_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _refused_global(error: Exception) -> Optional[str]:
    """What torch's restricted unpickler refused (``GLOBAL posix.system ...``), or None when the
    error is not such a refusal."""
    text = str(error)
    if not isinstance(error, pickle.UnpicklingError) or "weights only load failed" not in text.lower():
        return None
    lines = [ln.strip() for ln in text.splitlines() if "GLOBAL" in ln or "Unsupported" in ln or "unsupported" in ln]
    return (lines[0] if lines else "an object that is not a tensor or a plain value").rstrip(".")


def safe_load(path: str | os.PathLike, what: str = "checkpoint", trust: bool = False) -> Any:
    """``torch.load`` of a user's file that cannot run code: only tensors and plain values (dict,
    list, tuple, str, numbers, None) are unpickled (``weights_only=True``). A file holding anything
    else is refused with CheckpointError (kind "unsafe"), unless ``trust`` (the opt-in flag): then it
    is unpickled in full. ``what`` names the file in the message ("checkpoint", "pretrained weights file")."""
    try:
        return torch.load(os.fspath(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a refusal is told apart from a damaged file below
        refused = _refused_global(e)
        if refused is None:
            raise
        if not trust:
            raise CheckpointError(f"{what} {path} refused: it holds Python objects beyond tensors and plain values "
                                  f"({refused}), and loading them could run code hidden in the file; {TRUST_HINT}",
                                  "unsafe") from None
    return torch.load(os.fspath(path), map_location="cpu", weights_only=False)


def read_checkpoint(source: str | os.PathLike | dict, trust: bool = False) -> dict:
    """The checkpoint dict in ``source`` (a dict is returned as is). A missing file raises
    FileNotFoundError; anything else that is not a checkpoint raises CheckpointError saying what
    the file is and what was expected: a file that could run code when loaded ("unsafe", unless
    ``trust``), and one of ours whose contents fail their recorded SHA-256 ("corrupt") among them."""
    if isinstance(source, dict):
        return source
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    _sniff(path)
    try:
        ckpt = safe_load(path, "checkpoint", trust)
    except CheckpointError:
        raise
    except Exception as e:  # torch.load raises many types: pickle's, zip's, RuntimeError, ...
        cut = isinstance(e, EOFError) or any(w in str(e).lower() for w in ("truncated", "eof", "ran out of input"))
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"cannot read checkpoint {path}: {'it ends early, ' if cut else ''}{first}; "
                              f"{EXPECTED}", "truncated" if cut else "unreadable") from e
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(ckpt).__name__}, not a checkpoint dict; {EXPECTED}",
                              "not_dict")
    check_integrity(ckpt, path)
    return ckpt


# ---------------------------------------------------------------------------- integrity
def _feed(digest: "hashlib._Hash", value: Any, where: str) -> None:
    """Hash ``value`` at ``where`` (its path in the checkpoint) in a fixed order: dict entries
    sorted by ``repr`` of their keys, sequences in order; a tensor by dtype, shape and its bytes in
    row-major order; a plain value by type and ``repr`` (exact for floats)."""
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        digest.update(f"T|{where}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(value, Mapping):
        digest.update(f"D|{where}|{len(value)}|".encode())
        for key in sorted(value, key=repr):
            _feed(digest, value[key], f"{where}/{key!r}")
    elif isinstance(value, (list, tuple)):
        digest.update(f"S|{where}|{len(value)}|".encode())  # a list and a tuple alike
        for i, item in enumerate(value):
            _feed(digest, item, f"{where}/{i}")
    else:
        digest.update(f"V|{where}|{type(value).__name__}|{value!r}|".encode())


def payload_sha256(ckpt: Mapping[str, Any]) -> str:
    """The SHA-256 of a checkpoint's contents: every entry but :data:`INTEGRITY_KEY` itself, walked as
    :func:`_feed` says (tensors by their bytes, so a flipped bit in a prompt or an optimizer moment
    changes it; the config and every other plain value by their exact text)."""
    digest = hashlib.sha256()
    _feed(digest, {k: v for k, v in ckpt.items() if k != INTEGRITY_KEY}, "")
    return digest.hexdigest()


def check_integrity(ckpt: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Refuse one of our checkpoints whose contents differ from the SHA-256 it records (a damaged
    disk or copy, or an edit). Checkpoints of older versions and the original code's record none
    and load as they are."""
    recorded = ckpt.get(INTEGRITY_KEY)
    if recorded is None or not is_ours(ckpt):
        return
    if payload_sha256(ckpt) != recorded:
        raise CheckpointError(f"checkpoint {path} is damaged: its contents do not match the SHA-256 it records "
                              f"({str(recorded)[:12]}...), so some of its bytes changed since it was written (a bad "
                              f"disk or copy, or an edit); copy it again or use an earlier one", "corrupt")


def plain(value: Any, where: str = "checkpoint") -> Any:
    """``value`` made of tensors and plain values only, so that :func:`safe_load` reads it back:
    paths become text, numpy scalars and arrays numbers and tensors, a dataclass its dict. Anything
    else is a bug of the writer, refused by name (``where``)."""
    import dataclasses

    import numpy as np

    if isinstance(value, torch.Tensor) or value is None or type(value) in (bool, int, float, str):
        return value
    if isinstance(value, np.generic):  # np.float64 is a float, yet torch would not read it back safely
        return value.item()
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value))
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return plain(dataclasses.asdict(value), where)
    if isinstance(value, Mapping):
        return {plain(k, where): plain(v, f"{where}[{k!r}]") for k, v in value.items()}
    if isinstance(value, tuple):
        return tuple(plain(v, f"{where}[{i}]") for i, v in enumerate(value))
    if isinstance(value, list):
        return [plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    raise TypeError(f"{where} holds a {type(value).__name__}, which a checkpoint cannot hold (only tensors and "
                    f"plain values load without running code)")


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
    """One of our checkpoint dicts: tensors and plain values only, sealed with :func:`payload_sha256`."""
    from .. import __version__

    ckpt = plain({"format": FORMAT, "version": __version__, "config": config,
                  "prompt_learner": {k: v.detach().cpu() for k, v in prompt_state.items()},
                  "epoch": epoch, "optimizer": optimizer, **extra})
    ckpt[INTEGRITY_KEY] = payload_sha256(ckpt)
    return ckpt
