"""Building the frozen CLIP backbone on open_clip, and loading its weights.

Why this does not simply call ``open_clip.create_model(name, pretrained=...)``:
- OpenAI weights need QuickGELU; the plain ``ViT-L-14-336`` config builds ``nn.GELU`` and only
  warns, which silently changes every feature. We map the name / force QuickGELU.
- The original code cached OpenAI's TorchScript archive (``ViT-L-14-336px.pt``), which open_clip
  refuses to read with ``weights_only=True``; we detect it and read its state dict. Loading a
  TorchScript archive runs the code inside it, so only the archives OpenAI published are loaded:
  their SHA-256 is checked against the one in OpenAI's download address (open_clip's pretrained
  table lists them); any other archive needs the caller's trust (docs/usage.md, "Security").
- Offline, a hub download retries DNS for about a minute; we look in the cache first and probe the
  network with a short timeout, then fail with a message that says how to get the weights.
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import io
import json
import os
import re
import socket
import warnings
import zipfile
from copy import deepcopy
from importlib import resources
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from .clip_import import import_open_clip

open_clip = import_open_clip()  # one message when torchvision does not fit torch

from .checkpoint_format import TRUST_HINT, CheckpointError, safe_load

TINY_BACKBONE = "tiny"
RANDOM_INIT_SEED = 0
_HUB_HOST = "huggingface.co"


class PretrainedWeightsUnavailable(RuntimeError):
    """The requested pretrained weights are neither cached nor downloadable."""


def _packaged_config(name: str) -> dict[str, Any]:
    text = resources.files("glocalclip.model").joinpath("model_configs", f"{name}.json").read_text()
    return json.loads(text)


def _openai_style_name(name: str) -> str:
    """'ViT-L/14@336px' (OpenAI's spelling) -> 'ViT-L-14-336' (open_clip's)."""
    name = name.replace("@336px", "-336").replace("@", "-")
    return name.replace("/", "-")


def wants_quick_gelu(name: str, pretrained: Optional[str]) -> bool:
    """QuickGELU for OpenAI weights: the ``openai`` tag (or any tag open_clip marks quick_gelu) and
    local weight files, which are OpenAI CLIP checkpoints (``ViT-L-14-336px.pt``) or their state
    dicts. Other open_clip tags keep their model's own activation."""
    if pretrained is None:
        return False
    if os.path.isfile(pretrained):
        return True
    pcfg = open_clip.get_pretrained_cfg(name, pretrained) or {}
    return bool(pcfg.get("quick_gelu", pretrained == "openai"))


def resolve_model_config(backbone: str, pretrained: Optional[str]) -> tuple[dict[str, Any], str]:
    """Return (open_clip model config dict, canonical model name).

    ``backbone`` is ``"tiny"`` (the packaged test config), a path to an open_clip model-config
    JSON (either the bare config or ``{"model_cfg": ...}``), or an open_clip model name (OpenAI's
    ``ViT-L/14@336px`` spelling accepted). With OpenAI weights (see :func:`wants_quick_gelu`) a
    built-in name maps to its ``-quickgelu`` twin: the plain config builds ``nn.GELU`` and open_clip
    only warns, which would silently change every feature.
    """
    if backbone == TINY_BACKBONE:
        return _packaged_config(TINY_BACKBONE), TINY_BACKBONE
    if backbone.endswith(".json") or os.path.isfile(backbone):
        path = Path(backbone)
        if not path.is_file():
            raise FileNotFoundError(
                f"backbone config {path} does not exist; pass an open_clip model name such as "
                f"'ViT-L-14-336' or the path of an existing open_clip model-config JSON")
        cfg = json.loads(path.read_text())
        cfg = cfg.get("model_cfg", cfg)
        if "vision_cfg" not in cfg or "text_cfg" not in cfg:
            raise ValueError(f"{path} is not an open_clip model config (needs vision_cfg and text_cfg)")
        return cfg, str(path)

    name = _openai_style_name(backbone)
    base = name[: -len("-quickgelu")] if name.endswith("-quickgelu") else name
    quick = wants_quick_gelu(base, pretrained)
    if quick and not name.endswith("-quickgelu") and open_clip.get_model_config(name + "-quickgelu"):
        name = name + "-quickgelu"
    cfg = open_clip.get_model_config(name)
    if cfg is None:
        raise ValueError(
            f"unknown backbone {backbone!r}: not an open_clip model name "
            f"(e.g. 'ViT-L-14-336', see open_clip.list_models()), not 'tiny', and not a .json path")
    cfg = deepcopy(cfg)
    if quick:
        cfg["quick_gelu"] = True
    return cfg, name


def build_clip(model_cfg: dict[str, Any]) -> nn.Module:
    """Instantiate an open_clip ``CLIP`` with random weights from a config dict."""
    cfg = deepcopy(model_cfg)
    for key in ("custom_text", "multimodal_cfg"):
        if cfg.get(key):
            raise ValueError(f"backbone configs with {key!r} are not supported (CLIP ViT models only)")
        cfg.pop(key, None)
    if "timm_model_name" in cfg.get("vision_cfg", {}):
        raise ValueError("timm vision towers are not supported; use an open_clip ViT config")
    return open_clip.model.CLIP(**cfg)


# --------------------------------------------------------------------------- weight files


def _is_torchscript_archive(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any(n.endswith("constants.pkl") or "/code/" in n for n in zf.namelist())


#: OpenAI's download addresses hold the SHA-256 of the file: .../clip/models/<sha256>/ViT-L-14-336px.pt
_OPENAI_URL = re.compile(r"openaipublic\.azureedge\.net/clip/models/([0-9a-f]{64})/([^/]+)$")


def published_openai_archives() -> dict[str, str]:
    """SHA-256 -> file name of every TorchScript archive OpenAI published, read off the download
    addresses in open_clip's pretrained table (OpenAI's ``clip`` package checks downloads the same way)."""
    found = {}
    for model, tag in open_clip.list_pretrained():
        match = _OPENAI_URL.search((open_clip.get_pretrained_cfg(model, tag) or {}).get("url") or "")
        if match:
            found[match.group(1)] = match.group(2)
    return found


def _read_torchscript_archive(path: Path, trust: bool) -> bytes:
    """The archive's bytes, read once and checked: refused unless OpenAI published them, or ``trust``
    (loading one runs the code it holds). The bytes checked are the bytes loaded, so the file cannot be
    swapped between the check and the load."""
    data = path.read_bytes()
    if trust or hashlib.sha256(data).hexdigest() in published_openai_archives():
        return data
    raise CheckpointError(f"pretrained weights file {path} refused: it is a TorchScript archive, whose loading runs "
                          f"the code inside it, and its SHA-256 is not that of any archive OpenAI published (as "
                          f"ViT-L-14-336px.pt is); pass a state dict or safetensors file instead, or {TRUST_HINT}",
                          "unsafe")


def read_clip_state_dict(path: str | os.PathLike, trust: bool = False) -> dict[str, torch.Tensor]:
    """Read CLIP weights from a file: OpenAI TorchScript archive, plain state dict (OpenAI or
    open_clip key names — they coincide for ViT models), ``{"state_dict": ...}``, or safetensors.
    Nothing in the file runs unless ``trust`` (see :func:`_read_torchscript_archive` and
    ``checkpoint_format.safe_load``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pretrained weights file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        sd = load_file(str(path), device="cpu")
    elif _is_torchscript_archive(path):
        data = _read_torchscript_archive(path, trust)
        with warnings.catch_warnings():  # torch deprecates jit.load; the archive format is fixed
            warnings.simplefilter("ignore")
            sd = torch.jit.load(io.BytesIO(data), map_location="cpu").state_dict()
    else:
        sd = safe_load(path, "pretrained weights file", trust)
        if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
            sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise ValueError(f"{path} does not hold a CLIP state dict")
    sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}
    # scalars of OpenAI's archive, and a buffer that open_clip rebuilds rather than stores
    for key in ("input_resolution", "context_length", "vocab_size", "attn_mask"):
        sd.pop(key, None)
    return sd


def load_clip_weights(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Copy weights into ``model`` (fp32), refusing missing/unexpected keys or shape mismatches."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    bad_shape = [k for k in own if k in state_dict and own[k].shape != state_dict[k].shape]
    if missing or unexpected or bad_shape:
        raise ValueError(
            f"weights in {source} do not fit the backbone: missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}, shape mismatch {bad_shape[:5]}. Check that --backbone names the "
            f"architecture these weights belong to.")
    # logit_scale may be stored 0-dim or 1-dim; shapes already match here.
    model.load_state_dict({k: v.float() for k, v in state_dict.items()}, strict=True)


def _network_reachable(host: str, timeout: float) -> bool:
    """True if ``host:443`` accepts a TCP connection within ``timeout`` seconds (DNS included)."""
    def connect() -> bool:
        with socket.create_connection((host, 443), timeout=timeout):
            return True

    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    try:
        return pool.submit(connect).result(timeout=timeout)
    except Exception:
        return False
    finally:
        pool.shutdown(wait=False)


def _offline_message(name: str, tag: str, detail: str) -> str:
    return (
        f"cannot get the {tag!r} weights for {name}: {detail}.\n"
        f"Two ways to get them:\n"
        f"  1. run once with network access: open_clip downloads them into its cache "
        f"(~/.cache/huggingface), and later runs work offline;\n"
        f"  2. pass a local file: --pretrained /path/to/ViT-L-14-336px.pt (OpenAI's archive, as cached "
        f"by the original code in ~/.cache/clip) or a state dict in OpenAI/open_clip key names.")


def fetch_pretrained(name: str, tag: str, probe_timeout: float = 4.0) -> str:
    """Return a local path of open_clip's pretrained weights ``tag`` for model ``name``.

    Looks in the hub cache first (no network), then probes the network briefly before letting
    open_clip download, so that offline use fails in seconds with a useful message.
    """
    pcfg = open_clip.get_pretrained_cfg(name, tag)
    if not pcfg:
        known = open_clip.list_pretrained_tags_by_model(name)
        raise ValueError(f"{tag!r} is neither an existing file nor a pretrained tag of {name} "
                         f"(known tags: {known})")
    hub = pcfg.get("hf_hub", "")
    if hub:
        try:
            from huggingface_hub import hf_hub_download

            repo, filename = os.path.split(hub.rstrip("/")) if not hub.endswith("/") else (hub.rstrip("/"), "")
            candidates = [filename] if filename else [
                "open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
            for fn in candidates:
                try:
                    return hf_hub_download(repo_id=repo, filename=fn, local_files_only=True)
                except Exception:
                    continue
        except ImportError:
            pass
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        raise PretrainedWeightsUnavailable(
            _offline_message(name, tag, "they are not in the local cache and HF_HUB_OFFLINE is set"))
    if not _network_reachable(_HUB_HOST, probe_timeout):
        raise PretrainedWeightsUnavailable(
            _offline_message(name, tag, "they are not in the local cache and the network is unreachable"))
    try:
        return open_clip.download_pretrained(pcfg)
    except Exception as e:  # network dropped mid-way, hub error, ...
        raise PretrainedWeightsUnavailable(_offline_message(name, tag, f"download failed ({e})")) from e


def backbone_from_config(model_cfg: dict[str, Any], name: str, pretrained: Optional[str],
                         trust: bool = False) -> nn.Module:
    """The frozen fp32 CLIP of an open_clip model config dict (``name`` is its canonical open_clip
    name, used to look up a ``pretrained`` tag): weights from ``pretrained`` (an open_clip tag, a
    local weights file, or None for a random init that is the same on every call). ``trust``: see
    :func:`read_clip_state_dict`. ``BackboneRecord.build`` calls it."""
    path = source = None
    if pretrained is not None:  # find the weights before spending time on building the model
        if os.path.isfile(pretrained):
            path, source = pretrained, pretrained
        else:
            path = fetch_pretrained(name, pretrained)
            source = f"{name}:{pretrained} ({path})"
    # Random init is seeded, and the caller's RNG left alone: a checkpoint trained on random
    # weights (tests, the demo, benchmarks) then meets the same backbone when it is tested.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)
        model = build_clip(model_cfg)
    if path is not None:
        load_clip_weights(model, read_clip_state_dict(path, trust), source)
    model = model.float().eval()
    model.requires_grad_(False)
    return model
