"""Same seed, same run (docs/design.md §5.1): the replay of the original's random draws gives its
initial prompts and its DataLoader's batch order, leaves the caller's random state alone, and
training follows the original's trajectory, also when resumed or split over 2 gloo processes.

The original's draws are written out here from §5.1 a second time, as the original built them (a
whole CLIP-shaped module tree, parameters of the original's shapes, a real DataLoader), so the
implementation is checked against an independent account, not against itself."""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from glocalclip import GlocalCLIP
from glocalclip.apps.cli import train_main
from glocalclip.datasets import AnomalyDataset, collate
from glocalclip.datasets.synthetic import make_synthetic_dataset
from glocalclip.engine.original_draws import BackboneSizes, OriginalDraws, PromptSizes

from conftest import create_backbone, tiny_config
from test_pipeline import REPO, TINY_FLAGS

SEED = 111
SMALL = BackboneSizes(vision_width=128, vision_layers=3, patch_size=14, grid=4, embed_dim=32, text_width=64,
                      text_layers=2, vocab_size=500, context_length=77)
SMALL_PROMPTS = PromptSizes(n_ctx=5, ab_ctx=3, depth=3, t_n_ctx=2, dpam_layer=3)


# ------------------------------------------------------------------ the original, from §5.1
class _Block(nn.Module):
    """A residual attention block as the original declared it (attention, LN, MLP, LN)."""

    def __init__(self, width: int):
        super().__init__()
        self.attn = nn.MultiheadAttention(width, width // 64)
        self.ln_1 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([("c_fc", nn.Linear(width, width * 4)), ("gelu", nn.GELU()),
                                              ("c_proj", nn.Linear(width * 4, width))]))
        self.ln_2 = nn.LayerNorm(width)


class _OriginalCLIP(nn.Module):
    """The original's CLIP constructor, sizes only: vision tower, text tower, initialize_parameters."""

    def __init__(self, s: BackboneSizes):
        super().__init__()
        scale = s.vision_width ** -0.5
        self.conv1 = nn.Conv2d(3, s.vision_width, kernel_size=s.patch_size, stride=s.patch_size, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(s.vision_width))
        self.visual_positional = nn.Parameter(scale * torch.randn(s.grid ** 2 + 1, s.vision_width))
        self.ln_pre = nn.LayerNorm(s.vision_width)
        self.visual_blocks = nn.ModuleList([_Block(s.vision_width) for _ in range(s.vision_layers)])
        self.ln_post = nn.LayerNorm(s.vision_width)
        self.proj = nn.Parameter(scale * torch.randn(s.vision_width, s.embed_dim))
        self.text_blocks = nn.ModuleList([_Block(s.text_width) for _ in range(s.text_layers)])
        self.token_embedding = nn.Embedding(s.vocab_size, s.text_width)
        self.positional_embedding = nn.Parameter(torch.empty(s.context_length, s.text_width))
        self.ln_final = nn.LayerNorm(s.text_width)
        self.text_projection = nn.Parameter(torch.empty(s.text_width, s.embed_dim))
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        width, layers = s.text_width, s.text_layers
        for block in self.text_blocks:
            nn.init.normal_(block.attn.in_proj_weight, std=width ** -0.5)
            nn.init.normal_(block.attn.out_proj.weight, std=width ** -0.5 * (2 * layers) ** -0.5)
            nn.init.normal_(block.mlp.c_fc.weight, std=(2 * width) ** -0.5)
            nn.init.normal_(block.mlp.c_proj.weight, std=width ** -0.5 * (2 * layers) ** -0.5)
        nn.init.normal_(self.text_projection, std=width ** -0.5)


class _OriginalPromptLearner(nn.Module):
    """The original prompt learner's parameters: [1, 1, n, W] contexts, deep prompts, unused Linear."""

    def __init__(self, width: int, p: PromptSizes):
        super().__init__()
        self.ctx_global_pos = nn.Parameter(torch.empty(1, 1, p.n_ctx, width))
        self.ctx_global_neg = nn.Parameter(torch.empty(1, 1, p.ab_ctx, width))
        self.ctx_local_pos = nn.Parameter(torch.empty(1, 1, p.n_ctx, width))
        self.ctx_local_neg = nn.Parameter(torch.empty(1, 1, p.ab_ctx, width))
        for ctx in (self.ctx_global_pos, self.ctx_global_neg, self.ctx_local_pos, self.ctx_local_neg):
            nn.init.normal_(ctx, std=0.02)
        self.compound_prompts_text = nn.ParameterList([nn.Parameter(torch.empty(p.t_n_ctx, width))
                                                       for _ in range(p.depth - 1)])
        for deep in self.compound_prompts_text:
            nn.init.normal_(deep, std=0.02)
        single = nn.Linear(width, 896)
        self.projections = nn.ModuleList([copy.deepcopy(single) for _ in range(p.depth - 1)])

    def prompts(self) -> dict[str, torch.Tensor]:
        """Our key names and shapes ([n, W]) for the original's tensors."""
        return {k: v.detach().reshape(-1, v.shape[-1]).clone() for k, v in self.state_dict().items()
                if k.startswith(("ctx_", "compound_prompts_text"))}


def _original_setup(s: BackboneSizes, p: PromptSizes) -> dict[str, torch.Tensor]:
    """Everything the original draws before its first epoch, on the global generator (seed it
    first); returns its initial prompts."""
    clip = _OriginalCLIP(s)
    learner = _OriginalPromptLearner(s.text_width, p)
    for _ in range(1, p.dpam_layer):  # the V-V attention of each modified block
        nn.Sequential(nn.Linear(s.vision_width, 3 * s.vision_width, bias=True), nn.Dropout(0.0),
                      nn.Linear(s.vision_width, s.vision_width))
    del clip
    return learner.prompts()


def _sizes_from_state_dict(clip: nn.Module) -> BackboneSizes:
    """The original's build_model: the sizes read from CLIP's state dict."""
    sd = clip.state_dict()
    return BackboneSizes(
        vision_width=sd["visual.conv1.weight"].shape[0],
        vision_layers=len({k for k in sd if k.startswith("visual.") and k.endswith(".attn.in_proj_weight")}),
        patch_size=sd["visual.conv1.weight"].shape[-1],
        grid=round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5),
        embed_dim=sd["text_projection"].shape[1], text_width=sd["ln_final.weight"].shape[0],
        text_layers=len({k.split(".")[2] for k in sd if k.startswith("transformer.resblocks")}),
        vocab_size=sd["token_embedding.weight"].shape[0], context_length=sd["positional_embedding"].shape[0])


# ------------------------------------------------------------------ replay vs the original
def test_replayed_prompts_are_the_originals_bit_for_bit():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        want = _original_setup(SMALL, SMALL_PROMPTS)
    got = OriginalDraws(SEED, SMALL, SMALL_PROMPTS).initial_prompts
    assert list(got) == ["ctx_global_pos", "ctx_global_neg", "ctx_local_pos", "ctx_local_neg",
                         "compound_prompts_text.0", "compound_prompts_text.1"]
    assert got["ctx_global_neg"].shape == (3, 64) and got["compound_prompts_text.1"].shape == (2, 64)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    assert 0.015 < float(torch.cat([v.flatten() for v in got.values()]).std()) < 0.025  # N(0, 0.02²)


@pytest.mark.parametrize("change", [{"vocab_size": 501}, {"vision_layers": 2}, {"grid": 5}, {"embed_dim": 16}])
def test_every_backbone_size_moves_the_draws(change):
    """A size read wrong would silently start elsewhere: each one changes the prompts."""
    base = OriginalDraws(SEED, SMALL, SMALL_PROMPTS).initial_prompts
    sizes = BackboneSizes(**{**SMALL.__dict__, **change})
    other = OriginalDraws(SEED, sizes, SMALL_PROMPTS).initial_prompts
    assert not torch.equal(base["ctx_global_pos"], other["ctx_global_pos"])


def test_batch_order_is_the_original_dataloaders_every_epoch():
    """After the same draws, a real DataLoader(shuffle=True) visits the batches we predict; the
    dpam_layer (drawn after the prompts) only moves the order."""
    n, batch_size, epochs = 14, 4, 4
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        _original_setup(SMALL, SMALL_PROMPTS)
        loader = DataLoader(list(range(n)), batch_size=batch_size, shuffle=True)
        seen = [[b.tolist() for b in loader] for _ in range(epochs)]
    draws = OriginalDraws(SEED, SMALL, SMALL_PROMPTS)
    for epoch in range(epochs):
        assert [b.tolist() for b in draws.epoch_batches(epoch, n, batch_size)] == seen[epoch], epoch
        assert [len(b) for b in seen[epoch]] == [4, 4, 4, 2]
    assert seen[0] != seen[1]
    assert OriginalDraws(SEED, SMALL, SMALL_PROMPTS).epoch_order(3, n).tolist() == sum(seen[3], [])
    moved = PromptSizes(**{**SMALL_PROMPTS.__dict__, "dpam_layer": 4})
    assert OriginalDraws(SEED, SMALL, moved).initial_prompts.keys() == draws.initial_prompts.keys()
    assert OriginalDraws(SEED, SMALL, moved).epoch_order(0, n).tolist() != sum(seen[0], [])


def test_replay_leaves_the_callers_random_state_and_defaults_alone():
    torch.manual_seed(5)
    before = torch.get_rng_state()
    expected_next = torch.rand(3)
    torch.set_rng_state(before)
    draws = OriginalDraws(SEED, SMALL, SMALL_PROMPTS)
    draws.epoch_batches(2, 14, 4)
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(torch.rand(3), expected_next)
    # a caller working in float64 still gets the original's fp32 draws, and keeps float64
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        again = OriginalDraws(SEED, SMALL, SMALL_PROMPTS).initial_prompts
        assert torch.get_default_dtype() == torch.float64
    finally:
        torch.set_default_dtype(previous)
    for k, v in draws.initial_prompts.items():
        assert again[k].dtype == torch.float32 and torch.equal(again[k], v), k


def test_initial_prompts_are_fresh_copies():
    draws = OriginalDraws(SEED, SMALL, SMALL_PROMPTS)
    first = draws.initial_prompts
    first["ctx_local_pos"].zero_()
    assert draws.initial_prompts["ctx_local_pos"].abs().sum() > 0


def test_sizes_of_a_built_clip_match_the_originals_reading(tiny_clip):
    assert BackboneSizes.of_clip(tiny_clip) == _sizes_from_state_dict(tiny_clip)
    assert BackboneSizes.of_clip(tiny_clip) == BackboneSizes(128, 8, 14, 4, 32, 128, 4, 49408, 77)
    assert PromptSizes.of_config(tiny_config()) == PromptSizes(5, 3, 3, 2, 6)


# ------------------------------------------------------------------ training follows the original
BATCH, EPOCHS = 4, 3


@pytest.fixture(scope="module")
def data14(tmp_path_factory) -> Path:
    """14 images (last batch of 4 partial), classes listed in meta.json out of alphabetical order:
    the original indexes the images in meta.json's order."""
    root = make_synthetic_dataset(tmp_path_factory.mktemp("data14"), classes=("checker", "stripes"), n_train=1,
                                  n_test_good=4, n_test_defect=3, size=64, seed=5)
    meta = json.loads((root / "meta.json").read_text())
    meta["test"] = {c: meta["test"][c] for c in ("stripes", "checker")}
    (root / "meta.json").write_text(json.dumps(meta))
    return root


def _flags(image_size: int) -> list[str]:
    flags = list(TINY_FLAGS)
    flags[flags.index("--image_size") + 1] = str(image_size)
    return flags


def _train(data: Path, save: Path, image_size: int, *extra: str) -> Path:
    args = ["--train_data_path", str(data), "--save_path", str(save), "--seed", str(SEED), "--epoch", str(EPOCHS),
            "--batch_size", str(BATCH), "--num_workers", "0", "--no_progress", "--device", "cpu"]
    assert train_main(args + _flags(image_size) + list(extra)) == 0
    return save


def _prompts_at(save: Path, epoch: int) -> dict[str, torch.Tensor]:
    return torch.load(save / f"epoch_{epoch}.pth", weights_only=True)["prompt_learner"]


def _reference_trajectory(data: Path, image_size: int) -> list[dict[str, torch.Tensor]]:
    """The original's run by §5.1, written independently: seed, the original's setup draws, plain
    Adam(betas 0.5, 0.999) on our model's losses over a real DataLoader(shuffle=True) of the images
    in meta.json's order. Returns the prompts after every epoch."""
    clip = create_backbone("tiny", None)  # train.py --pretrained none builds these same weights
    model = GlocalCLIP(tiny_config(image_size=image_size), clip=clip)
    classes = list(json.loads((data / "meta.json").read_text())["test"])
    dataset = AnomalyDataset(data, "test", image_size=image_size, classes=classes)
    trajectory = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model.load_prompts({"prompt_learner": _original_setup(_sizes_from_state_dict(clip), PromptSizes(
            n_ctx=5, ab_ctx=3, depth=3, t_n_ctx=2, dpam_layer=6))})
        optimizer = torch.optim.Adam(model.prompt_parameters(), lr=1e-3, betas=(0.5, 0.999))
        loader = DataLoader(dataset, batch_size=BATCH, shuffle=True, collate_fn=collate)
        model.train()
        for _ in range(EPOCHS):
            for batch in loader:
                total = model.losses(batch["image"], batch["mask"], batch["label"])["total"]
                optimizer.zero_grad()
                total.backward()
                optimizer.step()
            trajectory.append({k: v.detach().clone() for k, v in model.prompt_learner.state_dict().items()})
    return trajectory


def _assert_on_trajectory(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], label: str) -> None:
    """≥ 99% of the prompt values within 1e-4, none more than 5e-3 apart (Adam may flip a near-zero step)."""
    assert got.keys() == want.keys(), label
    diff = torch.cat([(got[k] - want[k]).abs().flatten() for k in want])
    close = float((diff <= 1e-4).double().mean())
    assert close >= 0.99 and float(diff.max()) <= 5e-3, f"{label}: {close:.4f} within 1e-4, max {float(diff.max()):.2e}"


@pytest.mark.parametrize("style", ["glocal", "anomalyclip"])
def test_trainer_starts_from_the_originals_prompts_for_glocal_only(data14, tiny_clip, tmp_path, style):
    from glocalclip.engine.distributed import DistContext
    from glocalclip.engine.training import TrainConfig, Trainer

    cfg = tiny_config(image_size=56, prompt_style=style)
    trainer = Trainer.prepare(cfg, TrainConfig(train_data_path=str(data14), save_path=str(tmp_path), seed=SEED,
                                       device="cpu", num_workers=0, progress=False), DistContext(), clip=tiny_clip)
    got = trainer.model.prompt_learner.state_dict()
    if style == "glocal":
        want = OriginalDraws(SEED, BackboneSizes.of_clip(tiny_clip), PromptSizes.of_config(cfg)).initial_prompts
    else:  # today's init: the prompt learner's own N(0, 0.02²) draws right after seeding
        torch.manual_seed(SEED)
        want = GlocalCLIP(cfg, clip=tiny_clip).prompt_learner.state_dict()
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k
    assert trainer.dataset.classes == ["stripes", "checker"]  # meta.json's order, the original's indices


@pytest.fixture(scope="module")
def straight_run(data14, tmp_path_factory) -> Path:
    return _train(data14, tmp_path_factory.mktemp("straight"), 56)


@pytest.mark.slow
@pytest.mark.parametrize("image_size", [56, 112])  # the tiny weights' own grid (4x4), and 8x8
def test_seed_111_follows_the_originals_trajectory_every_epoch(data14, straight_run, tmp_path, image_size):
    save = straight_run if image_size == 56 else _train(data14, tmp_path / "run", image_size)
    reference = _reference_trajectory(data14, image_size)
    start = OriginalDraws(SEED, BackboneSizes.of_clip(create_backbone("tiny", None)),
                          PromptSizes.of_config(tiny_config())).initial_prompts
    for epoch in range(1, EPOCHS + 1):
        got = _prompts_at(save, epoch)
        _assert_on_trajectory(got, reference[epoch - 1], f"size {image_size}, epoch {epoch}")
        # the run really moved: a start from other prompts or another order would not stay this close
        assert max(float((got[k] - start[k]).abs().max()) for k in got) > 5e-4 * epoch


@pytest.mark.slow
def test_resume_after_two_epochs_equals_three_straight(data14, straight_run, tmp_path):
    part = _train(data14, tmp_path / "part", 56, "--epoch", "2")
    assert not (part / "epoch_3.pth").exists()
    _train(data14, part, 56, "--resume", str(part))
    want, got = _prompts_at(straight_run, 3), _prompts_at(part, 3)
    for k in want:
        assert torch.equal(got[k], want[k]), k


@pytest.mark.slow
def test_two_gloo_processes_follow_the_same_run(data14, straight_run, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "train.py"), "--train_data_path", str(data14), "--save_path", str(tmp_path / "two"),
           "--seed", str(SEED), "--epoch", str(EPOCHS), "--batch_size", str(BATCH), "--num_workers", "0",
           "--no_progress", "--device", "cpu"] + _flags(56)
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    for epoch in range(1, EPOCHS + 1):
        want, got = _prompts_at(straight_run, epoch), _prompts_at(tmp_path / "two", epoch)
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-5, msg=f"epoch {epoch} {k}")
