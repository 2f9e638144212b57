"""The test loop's contract with the device: per batch, only the images and masks go to the device
and nothing comes back (so a GPU never waits for the host between batches); image normalisation
on the device is bit-identical to the CPU's (ToTensor + Normalize)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from tqdm import tqdm

from conftest import create_backbone, tiny_config
from glocalclip import GlocalCLIP
from glocalclip.datasets import IMAGE_MEAN, IMAGE_STD, AnomalyDataset, normalize_image
from glocalclip.engine.distributed import DistContext
from glocalclip.inference.evaluation import Evaluator, evaluation_loader
from glocalclip.engine.smoothing import GaussianSmoothing, gaussian_smooth, smoothed_scores
from glocalclip.datasets.synthetic import make_synthetic_dataset


class CrossDeviceOps(TorchDispatchMode):
    """Records every operator whose tensors (inputs and outputs) live on more than one device, with
    the storage addresses of its CPU inputs."""

    def __init__(self):
        super().__init__()
        self.seen: list[tuple[str, tuple[str, ...], tuple[str, ...]]] = []
        self.cpu_sources: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        tensors_in = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        ins = tuple(sorted({t.device.type for t in tensors_in}))
        outs = tuple(sorted({t.device.type for t in tree_leaves(out) if isinstance(t, torch.Tensor)}))
        if len(set(ins) | set(outs)) > 1:
            self.seen.append((str(func), ins, outs))
            self.cpu_sources += [t.data_ptr() for t in tensors_in if t.device.type == "cpu"]
        return out


class RecordingLoader:
    """Yields the loader's batches and remembers where their image and mask tensors live."""

    def __init__(self, loader):
        self.loader = iter(loader)
        self.addresses: list[int] = []

    def __iter__(self):
        return self

    def __next__(self):
        batch = next(self.loader)
        self.addresses += [batch["image"].data_ptr(), batch["mask"].data_ptr()]
        return batch


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_synthetic_dataset(tmp_path_factory.mktemp("loop"), n_train=1, n_test_good=3, n_test_defect=4,
                                  size=64, seed=5)


def test_scoring_loop_sends_only_the_batch_and_reads_nothing_back(data):
    """On the "meta" device (shapes only) every host->device copy and every read-back shows up as an
    operator mixing devices; a read-back (``.item()``, ``.cpu()``, ``bool(t)``) would fail outright.
    A constant copied over per batch (the old normalisation and smoothing kernel did that) would show
    as an extra copy."""
    model = GlocalCLIP(tiny_config(image_size=56), clip=create_backbone("tiny", None)).to("meta")  # own copy
    meta = torch.device("meta")
    ev = Evaluator(model, DistContext(device=meta), sigma=4, batch_size=3, num_workers=0, progress=False)
    ds = AnomalyDataset(data, "test", 56, classes=["grain"], as_uint8=True)
    batches = ev._batches(ds, ds.classes)
    assert len(batches) == 3  # 7 images, batches of 3
    loader = RecordingLoader(evaluation_loader(ds, batches, 0, meta))
    with CrossDeviceOps() as watch:
        part = ev._score_batches(loader, len(batches), keep_maps=True, bar=tqdm(disable=True))
    assert watch.seen == [("aten._to_copy.default", ("cpu",), ("meta",))] * (2 * len(batches))  # image, mask
    # and the copies read the loader's own (on a GPU: pinned) tensors, not a CPU-side derivative
    assert watch.cpu_sources == loader.addresses and len(loader.addresses) == 2 * len(batches)
    assert part["maps"].device == meta and part["maps"].shape == (7, 56, 56)
    assert part["scores"].device == meta and part["masks"].dtype == torch.uint8


def test_normalisation_is_correctly_rounded_for_every_byte_value():
    u8 = torch.arange(256, dtype=torch.uint8).view(1, 1, 256).expand(3, 4, 256).contiguous()
    x = np.arange(256, dtype=np.float32) / np.float32(255)  # numpy: true float32 division
    for c in range(3):
        ref = (x - np.float32(IMAGE_MEAN[c])) / np.float32(IMAGE_STD[c])
        assert np.array_equal(normalize_image(u8)[c, 0].numpy(), ref)


def test_smoothing_object_equals_the_function(data):
    maps = torch.rand(2, 40, 33, generator=torch.Generator().manual_seed(0))
    for sigma in (0.0, 4.0, 8.0):
        smooth = GaussianSmoothing(sigma)
        assert torch.equal(smooth(maps), gaussian_smooth(maps, sigma))
    out = {"anomaly_map": maps, "image_score": torch.tensor([0.2, 0.7])}
    a = smoothed_scores(out, 8.0)
    b = smoothed_scores(out, GaussianSmoothing(8.0))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@needs_cuda
def test_cuda_normalisation_equals_cpu_bit_for_bit():
    """CUDA computes x / (CPU scalar) as x * (1 / scalar), one bit off for 126 of 256 byte values;
    the normaliser must not take that path."""
    u8 = torch.arange(256, dtype=torch.uint8).view(1, 1, 256).expand(2, 3, 256).contiguous().view(2, 3, 16, 16)
    assert torch.equal(normalize_image(u8.cuda()).cpu(), normalize_image(u8))


@needs_cuda
def test_cuda_scoring_loop_never_synchronises(data):
    model = GlocalCLIP(tiny_config(image_size=56), clip=create_backbone("tiny", None)).cuda()
    dev = model.device
    ev = Evaluator(model, DistContext(device=dev), sigma=4, batch_size=3, num_workers=0, progress=False)
    ds = AnomalyDataset(data, "test", 56, classes=["grain"], as_uint8=True)
    with torch.no_grad():
        model(torch.zeros(3, 3, 56, 56, device=dev), text=ev.text)  # lazy initialisation outside the check
    batches = ev._batches(ds, ds.classes)
    loader = iter(evaluation_loader(ds, batches, 0, dev))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        part = ev._score_batches(loader, len(batches), keep_maps=True, bar=tqdm(disable=True))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert part["maps"].shape == (7, 56, 56)


@needs_cuda
def test_cuda_smoothing_equals_scipy():
    """cuDNN would run a float32 convolution in TF32 (~1e-3 off); the smoothing convolves in float64,
    rounding each pass to float32 as scipy does. cuDNN sums in its own order, so a near-tie could round
    the other way: allowed, one ulp, on at most 1 in 10⁴ values."""
    from scipy.ndimage import gaussian_filter

    maps = np.random.default_rng(0).random((3, 518, 518)).astype(np.float32) * 4
    ref = np.stack([gaussian_filter(m, sigma=8) for m in maps])
    got = GaussianSmoothing(8, "cuda")(torch.from_numpy(maps).cuda()).cpu().numpy()
    np.testing.assert_allclose(got, ref, rtol=1.2e-7, atol=0)
    assert (got != ref).mean() <= 1e-4


def test_evaluate_measures_the_models_smoothed_maps_and_global_scores(data, tiny_clip):
    """evaluate() against the protocol computed directly (docs/design.md §4, §6): the float images
    (ToTensor + Normalize), one forward of all of a class's images, scipy's gaussian_filter(σ) per map,
    the metric functions on the whole class."""
    from scipy.ndimage import gaussian_filter

    from glocalclip import metrics
    from glocalclip.inference.evaluation import evaluate

    torch.manual_seed(3)
    model = GlocalCLIP(tiny_config(image_size=56), clip=tiny_clip)
    res = evaluate(model, str(data), None, DistContext(device=torch.device("cpu")), mode="image-pixel-level",
                   sigma=4, batch_size=3, num_workers=0, progress=False)
    assert set(res["classes"]) == {"checker", "grain", "stripes"}
    for cls_name, got in res["classes"].items():
        ds = AnomalyDataset(data, "test", 56, classes=[cls_name])  # float images, as the original loader
        items = [ds[i] for i in range(len(ds))]
        with torch.no_grad():
            out = model(torch.stack([it["image"] for it in items]))
        maps = np.stack([gaussian_filter(m, sigma=4) for m in out["anomaly_map"].numpy()])
        masks = torch.stack([it["mask"] for it in items]).numpy()
        labels = np.array([it["label"] for it in items])
        expected = {**metrics.pixel_metrics(masks, maps), **metrics.image_metrics(labels, out["image_score"].numpy())}
        unsmoothed = metrics.pixel_metrics(masks, out["anomaly_map"].numpy())
        assert unsmoothed["pixel_auroc"] != pytest.approx(expected["pixel_auroc"], abs=1e-6)  # σ matters here
        for k, v in expected.items():
            assert got[k] == pytest.approx(v, abs=1e-9, nan_ok=True), (cls_name, k)


def test_f1_threshold_is_the_score_of_the_best_f1():
    """The pooled threshold test.py stores: the lowest score t among those maximising F1 of score >= t."""
    from glocalclip.inference.evaluation import f1_threshold

    rng = np.random.default_rng(8)
    for _ in range(20):
        labels = rng.integers(0, 2, 40)
        scores = np.round(rng.random(40) + 0.3 * labels, 2)  # ties included
        best, best_t = -1.0, None
        for t in np.unique(scores):
            pred = scores >= t
            tp = int((pred & (labels == 1)).sum())
            f1 = 2 * tp / (int(pred.sum()) + int(labels.sum()))
            if f1 > best + 1e-12:
                best, best_t = f1, float(t)
        assert f1_threshold(labels, scores) == best_t
    assert f1_threshold(np.ones(5, dtype=int), np.arange(5.0)) is None


def test_class_means_skip_undefined_metrics():
    from glocalclip.inference.evaluation import mean_metrics

    nan = float("nan")
    per_class = {"a": {"k": 0.5, "j": nan}, "b": {"k": nan, "j": nan}, "c": {"k": 0.8, "j": nan}}
    got = mean_metrics(per_class, ("k", "j"))
    assert got["k"] == pytest.approx(0.65) and np.isnan(got["j"])
