"""GlocalCLIP: a frozen CLIP with V-V attention surgery and trainable global/local prompts.

Public API (docs/design.md §1): ``encode_image``, ``encode_text``, ``forward``, ``losses``,
``load_prompts``. Training on cached image features goes through ``encode_image_layers`` and
``losses_from_features``.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from . import checkpoint_format as ckpt_io
from .backbone import open_clip  # imported there, with one message for a broken torch/torchvision pair
from ..settings import SettingError
from .backbone_record import BackboneRecord, checkpoint_entry, warn_if_other_weights
from .config import FewShotSettings, GlocalCLIPConfig
from .few_shot import ReferenceBank, bank_from_features, features_key, few_shot_map, join_scores
from .layers import LayerFeatures
from .losses import glocal_contrastive_loss, local_loss
from .precision import cast_frozen_towers, compute_dtype
from .prompts import GlocalPromptLearner
from .scoring import anomaly_map, final_image_score, image_logits, layer_probability_maps
from .text import DeepPromptTextEncoder
from .vision import DualPathVisionEncoder

#: the selected layers' patch features: layer data, or a plain list with one tensor per layer
PatchFeatures = Union[LayerFeatures, Sequence[torch.Tensor]]


class GlocalCLIP(nn.Module):
    """``GlocalCLIP(cfg)`` builds the backbone from ``cfg``; pass ``clip`` to reuse one you built, or
    ``backbone`` (a checkpoint's :class:`BackboneRecord`) to build the architecture it recorded
    rather than the one ``cfg.backbone`` names now (docs/design.md §2.1). ``trust``: load a
    ``pretrained`` weights file even where loading it could run code (see ``checkpoint_format.safe_load``)."""

    def __init__(self, cfg: Optional[GlocalCLIPConfig] = None, clip: Optional[nn.Module] = None,
                 backbone: Optional[BackboneRecord] = None, trust: bool = False):
        super().__init__()
        cfg = cfg if cfg is not None else GlocalCLIPConfig()
        cfg.validate()
        self.cfg = cfg
        #: the backbone as checkpoints record it; None when the caller brought its own CLIP
        self.backbone_record: Optional[BackboneRecord] = None
        if clip is None:
            clip, self.backbone_record = build_backbone(cfg, backbone, trust)
        clip.requires_grad_(False)
        clip.eval()
        # precision is decided here, once: the towers' matrices in the compute dtype, in a copy this
        # model owns (fp32: the CLIP itself); the prompt learner reads the fp32 token embedding
        self.clip = clip = cast_frozen_towers(clip, compute_dtype(cfg.precision))
        self.visual = DualPathVisionEncoder(clip.visual, cfg.features_list, cfg.dpam_layer,
                                            cfg.multilayer, cfg.cls_ln_post)
        self.text_encoder = DeepPromptTextEncoder(clip, cfg.depth, cfg.t_n_ctx)
        self.prompt_learner = GlocalPromptLearner(
            clip.token_embedding, open_clip.tokenize, cfg.n_ctx, cfg.ab_ctx, cfg.depth, cfg.t_n_ctx,
            style=cfg.prompt_style, context_length=int(clip.positional_embedding.shape[0]))
        check_image_size(cfg.image_size, self.visual.patch_size, cfg.backbone)

    # ------------------------------------------------------------------ plumbing
    def train(self, mode: bool = True) -> "GlocalCLIP":
        """Only the prompt learner changes mode: the frozen CLIP stays in eval."""
        self.training = mode
        self.prompt_learner.train(mode)
        self.clip.eval()
        return self

    @property
    def device(self) -> torch.device:
        return self.prompt_learner.token_prefix.device

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype of the frozen towers' matrix products, fixed when the model was built."""
        return self.clip.visual.transformer.resblocks[0].attn.in_proj_weight.dtype

    def _check_precision(self) -> None:
        """``cfg.precision`` was applied when the weights were cast; changing it afterwards would
        leave a config that no longer says what runs."""
        if compute_dtype(self.cfg.precision) != self.compute_dtype:
            raise RuntimeError(f"this model was built with {self.compute_dtype} weights but its config now says "
                               f"precision={self.cfg.precision!r}; precision is fixed at build time: build another "
                               f"model (GlocalCLIP(cfg.replace(precision=...)) or load_model(..., precision=...))")

    def prompt_parameters(self) -> list[nn.Parameter]:
        return list(self.prompt_learner.parameters())

    # ------------------------------------------------------------------ encoders
    def encode_image(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Global image feature [B, E] (not normalised) and per selected layer the patch features
        [B, N, E] with the class row. Runs without autograd: CLIP is frozen."""
        g, layers = self.encode_image_layers(x)
        return g, layers.per_layer()

    def encode_image_layers(self, x: torch.Tensor) -> tuple[torch.Tensor, LayerFeatures]:
        """As :meth:`encode_image`, with the patch features as layer data: the distinct tensors
        and how many selected layers each stands for (docs/design.md §2.4)."""
        g, layers, _ = self.encode_image_blocks(x, blocks=False)
        return g, layers

    def encode_image_blocks(self, x: torch.Tensor, blocks: bool = True
                            ) -> tuple[torch.Tensor, LayerFeatures, Optional[LayerFeatures]]:
        """As :meth:`encode_image_layers`, and with ``blocks`` each selected block's own patch
        features from the same pass (the few-shot bank's ``blocks`` option, docs/design.md §11)."""
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected an image batch [B, 3, H, W], got shape {tuple(x.shape)}")
        self._check_precision()
        with torch.no_grad():
            g, layers, per_block = self.visual.forward_with_blocks(x, blocks=blocks)
        per_block = per_block.map(lambda t: t.float()) if per_block is not None else None
        return g.float(), layers.map(lambda t: t.float()), per_block

    def encode_text(self, prompt_output: Optional[tuple] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised text features from the current prompts: global [2, E] and local [2, E],
        row 0 normal, row 1 anomalous. Differentiable w.r.t. the prompt parameters.

        ``prompt_output`` is the prompt learner's output when it was called through a wrapper
        (DistributedDataParallel); by default the prompt learner is called here."""
        prompts, eot, deep = prompt_output if prompt_output is not None else self.prompt_learner()
        self._check_precision()
        feats = self.text_encoder(prompts, eot, deep).float()
        if self.cfg.prompt_style == "anomalyclip":
            return feats, feats
        return feats[:2], feats[2:]

    # ------------------------------------------------------------------ scoring
    def score_features(self, image_features: torch.Tensor, patch_feats: PatchFeatures,
                       text: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> dict[str, torch.Tensor]:
        """Image score [B] and unsmoothed anomaly map [B, H, W] from encoded features."""
        g_text, l_text = text if text is not None else self.encode_text()
        prob = image_logits(image_features, g_text, self.cfg.temperature).softmax(dim=-1)[:, 1]
        maps = layer_probability_maps(patch_feats, l_text, self.cfg.image_size, self.cfg.temperature)
        amap = anomaly_map(maps)
        out = {"image_score": final_image_score(prob, amap, self.cfg.image_score), "anomaly_map": amap}
        if self.cfg.image_score == "global+max":
            out["global_score"] = prob  # the protocol fuses it again with the smoothed map
        return out

    def forward(self, x: torch.Tensor, text: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
                reference: Optional[ReferenceBank] = None) -> dict[str, torch.Tensor]:
        """``{"image_score": [B], "anomaly_map": [B, H, W]}`` (map unsmoothed); with
        ``image_score="global+max"`` also "global_score", the global branch's probability. Pass
        ``text`` (from ``encode_text``) to reuse text features across batches. With a ``reference``
        bank (:meth:`reference_bank`) the few-shot term is added (docs/design.md §11) and the
        output also holds "few_shot_map", the weighted term alone."""
        self._check_size(x)
        blocks = reference is not None and reference.settings.layers == "blocks"
        img, layers, per_block = self.encode_image_blocks(x, blocks=blocks)
        out = self.score_features(img, layers, text)
        if reference is None:
            return out
        fs = few_shot_map(per_block if blocks else layers, reference.layers, self.cfg.image_size)
        return join_scores(out, fs, reference.settings)

    def reference_bank(self, images: torch.Tensor, settings: Optional[FewShotSettings] = None,
                       sources: Sequence[str] = (), batch_size: int = 8) -> ReferenceBank:
        """The few-shot bank of K normal images [K, 3, S, S] (normalised as for ``forward``),
        encoded ``batch_size`` at a time, on the model's device (docs/design.md §11)."""
        settings = settings if settings is not None else FewShotSettings()
        self._check_size(images)
        if images.shape[0] == 0:
            raise ValueError("a reference bank needs at least one normal image")
        parts = []
        for s in range(0, images.shape[0], batch_size):
            _, layers, per_block = self.encode_image_blocks(images[s:s + batch_size].to(self.device),
                                                            blocks=settings.layers == "blocks")
            parts.append(per_block if settings.layers == "blocks" else layers)
        feats = LayerFeatures(tuple(torch.cat(ts) for ts in zip(*(p.tensors for p in parts))), parts[0].counts)
        return ReferenceBank(bank_from_features(feats), settings, self.cfg.image_size,
                             features_key(self.cfg, settings), tuple(map(str, sources)))

    def _check_size(self, x: torch.Tensor) -> None:
        if x.ndim != 4 or tuple(x.shape[-2:]) != (self.cfg.image_size, self.cfg.image_size):
            raise ValueError(f"expected images [B, 3, {self.cfg.image_size}, {self.cfg.image_size}] "
                             f"(the config's image_size), got {tuple(x.shape)}")

    # ------------------------------------------------------------------ training
    def losses(self, x: torch.Tensor, masks: torch.Tensor, labels: torch.Tensor, alpha: float = 1.0,
               margin: float = 0.0, mask_valid: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
        """``{"global", "local", "contrastive", "total"}`` for one batch (docs/design.md §5).

        ``mask_valid`` [B] (bool, optional) marks images whose mask is known; the local loss skips
        the others (e.g. anomalous images of a folder dataset without masks). Default: all valid.
        """
        self._check_size(x)
        img, layers = self.encode_image_layers(x)
        return self.losses_from_features(img, layers, masks, labels, alpha, margin, mask_valid)

    def losses_from_features(self, image_features: torch.Tensor, patch_feats: PatchFeatures,
                             masks: torch.Tensor, labels: torch.Tensor, alpha: float = 1.0,
                             margin: float = 0.0, mask_valid: Optional[torch.Tensor] = None,
                             text: Optional[tuple[torch.Tensor, torch.Tensor]] = None
                             ) -> dict[str, torch.Tensor]:
        """Losses from (possibly cached) image features; the text side is recomputed unless
        ``text`` (differentiable output of ``encode_text``) is given. ``patch_feats`` as
        :meth:`encode_image_layers` gives them; a plain list counts each entry as its own layer."""
        g_text, l_text = text if text is not None else self.encode_text()
        labels = labels.to(image_features.device).long()
        masks = masks.to(image_features.device).float()
        glob = F.cross_entropy(image_logits(image_features, g_text, self.cfg.temperature), labels)
        if mask_valid is not None and not bool(mask_valid.all()):
            keep = mask_valid.to(image_features.device).bool()
            patch_feats = LayerFeatures.of(patch_feats).map(lambda t: t[keep])
            masks = masks[keep]
        if masks.shape[0] > 0:
            maps = layer_probability_maps(patch_feats, l_text, self.cfg.image_size, self.cfg.temperature)
            loc = local_loss(maps, masks)
        else:
            loc = g_text.new_zeros(())
        con = glocal_contrastive_loss(g_text, l_text, margin)
        total = loc + glob + alpha * con
        return {"global": glob, "local": loc, "contrastive": con, "total": total}

    # ------------------------------------------------------------------ checkpoints
    def load_prompts(self, source: str | os.PathLike | dict, trust: bool = False) -> dict:
        """Load prompts from our checkpoint or the original code's ``{"prompt_learner": ...}``
        (GlocalCLIP or AnomalyCLIP). Returns the checkpoint dict. Shapes must fit this model.
        ``trust``: see ``checkpoint_format.read_checkpoint``."""
        ckpt = ckpt_io.read_checkpoint(source, trust)
        state = ckpt_io.prompt_state_of(ckpt)
        found = ckpt_io.infer_prompt_shape(state)
        want = {"prompt_style": self.cfg.prompt_style, "n_ctx": self.cfg.n_ctx,
                "ab_ctx": self.cfg.ab_ctx if self.cfg.prompt_style == "glocal" else self.cfg.n_ctx,
                "depth": self.cfg.depth, "t_n_ctx": self.cfg.t_n_ctx}
        diff = {k: (found[k], want[k]) for k in found if found[k] != want[k]}
        if diff:
            detail = ", ".join(f"{k}: checkpoint {a} vs model {b}" for k, (a, b) in diff.items())
            raise SettingError("n_ctx", f"the checkpoint's prompts do not fit this model ({detail}); build the model "
                                        f"with the checkpoint's settings (e.g. {{n_ctx}}/{{ab_ctx}}/{{depth}}/{{t_n_ctx}})",
                               also=("ab_ctx", "depth", "t_n_ctx"))
        own = self.prompt_learner.state_dict()
        width = next(iter(own.values())).shape[-1]
        bad = [k for k, v in state.items() if v.shape[-1] != width]
        if bad:
            raise ValueError(f"checkpoint prompt width {state[bad[0]].shape[-1]} != text width {width}: "
                             f"it was trained on another backbone")
        self.prompt_learner.load_state_dict({k: v.to(own[k].device) for k, v in state.items()}, strict=True)
        return ckpt

    def checkpoint(self, epoch: int, optimizer: Optional[dict] = None, **extra) -> dict:
        """A checkpoint dict in our format (config inside)."""
        return ckpt_io.make_checkpoint(self.cfg.to_dict(), self.prompt_learner.state_dict(), epoch,
                                       optimizer, **checkpoint_entry(self.backbone_record), **extra)

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike | dict, clip: Optional[nn.Module] = None,
                        trust: bool = False, **overrides) -> "GlocalCLIP":
        """Rebuild the model stored in one of our checkpoints (``overrides`` change config fields,
        e.g. ``pretrained`` pointing at a local weights file). Original-format checkpoints carry no
        config and are refused here: ``glocalclip.load_model(path, **settings)`` takes them.
        ``trust``: load a file even where loading it could run code (``checkpoint_format.safe_load``)."""
        ckpt = ckpt_io.read_checkpoint(path, trust)
        if not ckpt_io.is_ours(ckpt):
            raise ValueError(f"{path} is not a glocalclip checkpoint (original-format checkpoints carry "
                             f"no config: load it with glocalclip.load_model(path, **settings), or convert "
                             f"it with `glocalclip convert`)")
        return model_from_checkpoint(ckpt, clip, overrides, trust)


def model_from_checkpoint(ckpt: dict, clip: Optional[nn.Module], overrides: dict, trust: bool = False) -> GlocalCLIP:
    """The model of a checkpoint dict (ours or the original code's, see ``adapt_checkpoint``), on
    the backbone it records where it records one (no ``--backbone`` given, no ``clip`` passed);
    ``trust`` goes to the backbone's weights file."""
    cfg, prompts = ckpt_io.adapt_checkpoint(ckpt, overrides)
    recorded = None if clip is not None else BackboneRecord.of_checkpoint(ckpt, overrides)
    model = GlocalCLIP(cfg, clip=clip, backbone=recorded, trust=trust)
    model.load_prompts({"prompt_learner": prompts})
    return model


def build_backbone(cfg: GlocalCLIPConfig, recorded: Optional[BackboneRecord],
                   trust: bool = False) -> tuple[nn.Module, BackboneRecord]:
    """(the frozen CLIP, its record with the weights' hash): the architecture ``recorded`` (a
    checkpoint's) or else ``cfg.backbone``'s, the weights ``cfg.pretrained``. A bad image size is
    refused before the weights are read; weights other than the recorded ones are warned about."""
    wanted = BackboneRecord.wanted(cfg.backbone, cfg.pretrained, recorded)
    check_image_size(cfg.image_size, wanted.patch_size, cfg.backbone)
    loaded = wanted.hashed()
    if recorded is not None:
        warn_if_other_weights(recorded, loaded)
    return loaded.build(trust), loaded


def check_image_size(image_size: int, patch: Optional[int], backbone: str) -> None:
    """Refuse an image size that is not a whole number of patches: the patch convolution would
    silently drop the remainder (the right and bottom edge of every image, docs/design.md §2.2)."""
    if patch is None or (image_size >= patch and image_size % patch == 0):
        return
    lower = image_size // patch * patch
    if lower < patch:
        raise SettingError("image_size", f"{{image_size}} {image_size} is smaller than one patch ({patch} pixels) of "
                                         f"backbone {backbone}; use a multiple of {patch}, e.g. {patch}")
    raise SettingError("image_size", f"{{image_size}} {image_size} is not a multiple of the patch size {patch} of backbone "
                     f"{backbone}: the patch convolution would drop the last {image_size % patch} pixel rows and "
                     f"columns; use {lower} or {lower + patch}")

