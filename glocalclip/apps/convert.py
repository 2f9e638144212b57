"""``glocalclip convert OLD.pth NEW.pt``: an original GlocalCLIP / AnomalyCLIP checkpoint
(``{"prompt_learner": ...}``, no config) to our format, with the config inside.

The prompt shapes (n_ctx, ab_ctx, depth, t_n_ctx, prompt style) are read off the tensors; any of
them given as a flag must agree. Everything else the tensors cannot tell (backbone, image size,
feature layers, V-V attention depth, ...) comes from the flags, else from the backbone's defaults
(for ViT-L-14-336 the original code's). The backbone's open_clip config and the weights' identity are
recorded inside, as train.py's checkpoints do. Unused projection weights and buffers are dropped. The
converted file scores exactly as loading the original with the same flags.
"""
from __future__ import annotations

import re
import sys
from typing import Any, Optional, Sequence

from ..engine.checkpoint import atomic_save
from ..model.backbone_record import BackboneRecord, checkpoint_entry
from ..model.checkpoint_format import adapt_checkpoint, is_ours, make_checkpoint, read_checkpoint, tensor_settings
from .flags import model_overrides, trusted
from .parsers import convert_parser


def convert_checkpoint(source: Any, overrides: dict[str, Any],
                       trust: bool = False) -> tuple[dict, dict[str, Any], list[str]]:
    """(our checkpoint dict, the prompt shape read off the tensors, dropped keys). ``trust``: read a
    source that could run code (``--trust_checkpoint``); what is written holds tensors and plain values only."""
    ckpt = read_checkpoint(source, trust)
    cfg, state = adapt_checkpoint(ckpt, overrides)
    raw = ckpt["prompt_learner"]
    dropped = sorted(k for k in raw if k not in state)
    extra = {"converted_from": str(source) if not isinstance(source, dict) else "<dict>"}
    if is_ours(ckpt) and ckpt.get("threshold") is not None:
        extra["threshold"] = ckpt["threshold"]
    epoch = ckpt.get("epoch")
    new = make_checkpoint(cfg.to_dict(), state, int(epoch) if isinstance(epoch, int) else 0, None,
                          **checkpoint_entry(_backbone_of(ckpt, cfg, overrides)), **extra)
    return new, tensor_settings(state), dropped


def _backbone_of(ckpt: dict, cfg: Any, overrides: dict[str, Any]) -> BackboneRecord:
    """The backbone the converted checkpoint records (docs/design.md §2.1): the source's own record
    where it has one and the weights are unchanged, else the one the settings name, weights hashed."""
    recorded = BackboneRecord.of_checkpoint(ckpt, overrides)
    if recorded is not None and recorded.pretrained == cfg.pretrained:
        return recorded
    return BackboneRecord.wanted(cfg.backbone, cfg.pretrained, recorded).hashed()


def convert_main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = convert_parser().parse_args(argv)
    try:
        new, found, dropped = convert_checkpoint(args.source, model_overrides(args), trusted(args))
    except (ValueError, FileNotFoundError) as e:
        print(f"convert: {e}", file=sys.stderr)
        return 2
    atomic_save(new, args.target)
    shape = ", ".join(f"{k} {v}" for k, v in found.items())
    groups: dict[str, int] = {}
    for k in dropped:
        g = re.sub(r"\.\d+(?=\.|$)", ".*", k)
        groups[g] = groups.get(g, 0) + 1
    drop = ", ".join(f"{k} ({n})" for k, n in groups.items()) or "nothing"
    print(f"converted {args.source} -> {args.target}: {shape}; dropped {drop}")
    print("config: " + " ".join(f"{k}={v}" for k, v in new["config"].items()))
    return 0
