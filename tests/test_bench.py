"""bench/'s clocks on a test run (through evaluate()'s hooks): start-up is the wait for the first
batch, a slow loader shows as loader wait after it, slow metrics as metrics wait; the parts add up
to less than the whole."""
from __future__ import annotations

import time

import pytest
import torch

from bench.common import TimingHooks
from conftest import tiny_config
from glocalclip import GlocalCLIP
from glocalclip.datasets import AnomalyDataset
from glocalclip.datasets.synthetic import make_synthetic_dataset
from glocalclip.inference import evaluation
from glocalclip.engine.distributed import DistContext

pytestmark = pytest.mark.slow  # end to end: timed evaluate() runs with injected delays

ITEM_DELAY = 0.03  # seconds added to reading each image
METRICS_DELAY = 0.4  # seconds added to each class's metrics


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_synthetic_dataset(tmp_path_factory.mktemp("bench"), n_train=1, n_test_good=3, n_test_defect=4,
                                  size=64, seed=5)


def _timed_run(data, tiny_clip) -> tuple[dict, TimingHooks]:
    """evaluate() in-process (no loader workers) on 3 classes of 7 images, batches of 3, clocked."""
    torch.manual_seed(3)
    model = GlocalCLIP(tiny_config(image_size=56), clip=tiny_clip)
    clock = TimingHooks()
    res = evaluation.evaluate(model, str(data), None, DistContext(device=torch.device("cpu")),
                              mode="image-pixel-level", sigma=4, batch_size=3, num_workers=0, progress=False,
                              hooks=clock)
    return res, clock


def test_timing_hooks_split_a_run_into_startup_and_waits(data, tiny_clip):
    t0 = time.perf_counter()
    res, clock = _timed_run(data, tiny_clip)
    outside = time.perf_counter() - t0
    s = clock.summary()
    assert clock.counts == {"loader": 9, "device": 3, "metrics": 3}  # 3 classes x 3 batches
    assert 0 < s["startup_s"] < s["wall_s"] <= outside
    waits = [s["loader_wait_s"], s["device_wait_s"], s["metrics_wait_s"]]
    assert all(w >= 0 for w in waits) and s["startup_s"] + sum(waits) < s["wall_s"]
    assert res["n_images"] == 21


def test_timing_hooks_see_a_slow_loader_and_slow_metrics(data, tiny_clip, monkeypatch):
    read = AnomalyDataset.__getitem__
    measure = evaluation.class_metrics

    def slow_read(self, i):
        time.sleep(ITEM_DELAY)
        return read(self, i)

    def slow_metrics(scores, mode):
        time.sleep(METRICS_DELAY)
        return measure(scores, mode)

    monkeypatch.setattr(AnomalyDataset, "__getitem__", slow_read)
    monkeypatch.setattr(evaluation, "class_metrics", slow_metrics)
    _, clock = _timed_run(data, tiny_clip)
    s = clock.summary()
    assert s["startup_s"] >= 3 * ITEM_DELAY  # the first batch: 3 images
    assert s["loader_wait_s"] >= 18 * ITEM_DELAY  # the other 18 images, read in the loop (no workers)
    # the last class's metrics run after everything else is scored: the host waits for all of them
    assert s["metrics_wait_s"] >= 0.9 * METRICS_DELAY
    assert s["startup_s"] + s["loader_wait_s"] + s["metrics_wait_s"] < s["wall_s"]


def test_cpu_limit_quick_mode_prints_every_path_with_the_deviations(tmp_path, capsys):
    """``python -m bench.cpu_limit --quick`` (what the coordinator re-runs, here on the tiny config
    alone): every path timed, the GEMM peaks measured, the fp32 features equal to the original
    encoder's re-run, bf16 within a few percent, the int8 ONNX graph within its rounding."""
    from bench import cpu_limit

    report = cpu_limit.main(["--quick", "--configs", "tiny", "--repeats", "1", "--json", str(tmp_path / "r.json")])
    assert (tmp_path / "r.json").is_file()
    assert report["gemm_gflops"]["fp32"] > 0 and report["gemm_gflops"]["bf16"] > 0
    assert {(r["dtype"], r["kernel"]) for r in report["attention"]} == {
        (d, k) for d in ("float32", "bfloat16") for k in ("sdpa", "blocked", "matmul+softmax")}
    (tiny,) = report["models"]
    assert [p["path"] for p in tiny["paths"]] == ["original code's encoder, fp32", "ours, fp32", "ours, bf16",
                                                  "onnx fp32", "onnx int8 (export --int8)"]
    assert all(p["s_per_image"] > 0 for p in tiny["paths"])
    dev = tiny["deviation"]
    assert dev["fp32_vs_original_patch"] < 1e-4 * dev["patch_scale"] and dev["fp32_vs_original_global"] < 1e-4
    assert 0 < dev["bf16_vs_fp32_patch_relative"] < 0.03
    assert 0 < dev["onnx_int8_vs_fp32_map"] < 0.1 * dev["onnx_map_range"]
    split = tiny["bf16_time_split"]
    assert set(split) == {"matrix products", "softmax", "other"} and split["matrix products"] > 0 < split["softmax"]
    out = capsys.readouterr().out
    assert "original code's encoder, fp32" in out and "% of bf16" in out and "bound: the matrix products alone" in out


@pytest.mark.parametrize("kind", ["tiny", "mid"])
def test_the_bench_flop_count_is_what_the_forward_multiplies(kind):
    """``cpu_limit``'s "of peak" column divides the model's FLOPs by the time: its count must be the
    matrix products the forward really runs. PyTorch's FLOP counter sees every product of the bf16
    forward (its blocked attention is ``bmm``; the counter skips the CPU's fused SDPA): the count
    agrees within the one class-row attention of the last block, which is SDPA."""
    from torch.utils.flop_counter import FlopCounterMode

    from bench.common import model_config
    from bench.cpu_limit import encoder_flops
    from glocalclip import GlocalCLIP

    model = GlocalCLIP(model_config(kind, "bf16").replace(image_size=112)).eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.visual(torch.zeros(1, 3, 112, 112))
    counted = counter.get_total_flops()
    assert counted == pytest.approx(encoder_flops(model), rel=1e-3)
    assert "aten.bmm" in {str(op) for op in counter.get_flop_counts()["Global"]}


def test_few_shot_cost_bench_times_the_term_beside_the_zero_shot_forward():
    """bench/few_shot.py cost: a row per (K, layers) with the bank's size as the design computes it
    (K × grid² rows per layer, float32) and both per-image costs measured."""
    import argparse

    from bench.few_shot import cost

    report = cost(argparse.Namespace(kind="tiny", image_size=56, shots=[1, 3], batch=2, repeat=1, device="cpu"))
    assert [(r["shots"], r["layers"]) for r in report["rows"]] == [
        (1, "selected"), (1, "blocks"), (3, "selected"), (3, "blocks")]
    for r in report["rows"]:
        assert r["bank_rows"] == r["shots"] * 4 * 4  # 56 px / patch 14 = a 4 × 4 grid
        layers = 2 if r["layers"] == "selected" else 4  # reference: block 2 and the shared V-V tensor
        assert r["bank_mib"] == pytest.approx(layers * r["bank_rows"] * 32 * 4 / 2**20)
        assert r["zero_shot_ms_per_image"] > 0 and r["few_shot_term_ms_per_image"] > 0


def test_int8_variants_bench_measures_the_file_export_int8_writes(tmp_path):
    """``python -m bench.int8_variants`` on the tiny config, two variants: its 'export --int8' row is
    the shipped file (the bench raises if its own copy of the choice differs), and quantizing every
    MatMul per tensor moves the maps more than the chosen variant."""
    from bench import int8_variants

    chosen, first = "blocks but out-proj, per channel (= export --int8)", "every MatMul, per tensor (issue 20's first try)"
    report = int8_variants.main(["--configs", "tiny", "--images", "4", "--repeats", "1", "--variants", chosen, first,
                                 "--json", str(tmp_path / "r.json")])
    rows = {r["variant"]: r for r in report["models"][0]["rows"]}
    assert list(rows) == ["float32", "export --int8", first, chosen]
    assert rows[chosen]["map_max_diff_of_range"] == rows["export --int8"]["map_max_diff_of_range"] > 0
    assert rows[first]["map_max_diff_of_range"] > 1.5 * rows[chosen]["map_max_diff_of_range"]
    assert rows["export --int8"]["mb"] < 0.45 * rows["float32"]["mb"]
