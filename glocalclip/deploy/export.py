"""``glocalclip export``: the whole detector as one ONNX graph, from uint8 pixels to score and map.

After training the text features are constants, so the detector is the vision tower plus a few
matrix products and a blur (docs/design.md §4). The file is the very :class:`~glocalclip.inference.
detector.Detector` that testing and ``predict`` run, built ``traceable``: it normalises the pixels,
runs the dual-path vision tower with the positional table already resized for S (§2.2), scores with
the stored text features (no text tower in the file), and smooths the map with σ (scipy's "reflect"
padding by index gathers, then two 1-D convolutions, float32). σ and the threshold follow the one
rule of ``engine.checkpoint.sigma_for``. PyTorch's own exporter writes it
(``torch.onnx.export(dynamo=True)``, which needs ``onnxscript``), with an example batch of 2 so that
the batch dimension stays dynamic. ``half`` and ``int8`` change only how the weights are stored
(``deploy/half.py``, ``deploy/int8.py``).
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch

from .. import __version__
from ..engine.checkpoint import file_sha256, load_model_and_checkpoint, sigma_for, stored_test_record, threshold_for
from ..engine.few_shot import load_reference
from ..inference.detector import Detector
from ..model.few_shot import check_bank_target
from .half import store_weights_half
from .int8 import quantize_int8
from .metadata import INPUT_NAME, OUTPUT_NAMES, DeployMetadata, weights_kind

PROTOBUF_LIMIT = 2 ** 31  # one ONNX protobuf holds at most 2 GiB: larger weights go to external data
GRAPH_HEADROOM = 2 ** 27  # room left for the graph itself beside the weights
EXPORT_EXTRA_HINT = "exporting needs the deploy extra: pip install 'glocalclip[deploy]' (onnx, onnxscript, onnxruntime)"


def export_onnx(checkpoint: str | os.PathLike, out: str | os.PathLike, sigma: Optional[float] = None,
                half: bool = False, int8: bool = False, image_size: Optional[int] = None, threshold: Optional[float] = None,
                trust: bool = False, reference: Optional[str] = None, few_shot: Optional[Any] = None,
                save_reference: Optional[str] = None, overwrite_reference: bool = False,
                **overrides: Any) -> DeployMetadata:
    """Write ``out`` (and ``out.data`` when the weights pass 2 GB): one ONNX graph from uint8 images
    [B, S, S, 3] to ``pred_score`` [B] and ``anomaly_map`` [B, S, S]. ``sigma`` defaults to the σ the
    checkpoint was tested with, ``image_size`` to its config's, ``threshold`` to its stored one.
    ``half`` stores the weight matrices as float16 (computed in float32); ``int8`` stores the
    transformer blocks' matrices as int8 and multiplies them in int8 (1.4-1.7x faster on a CPU,
    maps within ~1.2 % of their range: docs/speed.md); not both. ``trust``: load a checkpoint
    that could run code (``--trust_checkpoint``). ``reference``: normal images (a folder or glob) or a
    saved bank, baked into the graph as constants (few-shot, docs/design.md §11); the checkpoint's
    zero-shot threshold does not fit its scores, so only ``threshold`` labels. Returns the metadata."""
    weights = weights_kind(half, int8)
    _require_exporter()
    if image_size is not None:
        overrides["image_size"] = int(image_size)
    if save_reference is not None:
        check_bank_target(save_reference, overwrite_reference)  # before minutes of bank building
    model, ckpt = load_model_and_checkpoint(checkpoint, trust=trust, **{**overrides, "precision": "fp32"})
    record = stored_test_record(checkpoint, ckpt)
    sigma = sigma_for(record, sigma)
    threshold, source = threshold_for(record, threshold, few_shot=reference is not None, sigma=sigma,
                                      image_size=model.cfg.image_size, given_source="given at export")
    bank = None
    if reference is not None:
        bank = load_reference(model.eval(), os.fspath(reference), few_shot)
        if save_reference is not None:
            bank.save(save_reference, overwrite=overwrite_reference)
    detector = Detector(model.eval(), sigma, threshold, source, traceable=True, reference=bank).eval()
    meta = DeployMetadata(image_size=detector.image_size, sigma=sigma, threshold=detector.threshold,
                          config=model.cfg.to_dict(), version=__version__, checkpoint_sha256=file_sha256(checkpoint),
                          weights=weights,
                          threshold_source=detector.threshold_source,
                          reference=detector.bank.describe() if detector.bank is not None else None)
    program = _export_program(detector, meta.image_size)
    if half:
        store_weights_half(program.model)
    _strip_export_traces(program.model)
    program.model.metadata_props.update(meta.to_props())
    for old in exported_files(out)[1:]:  # external data of an earlier export to this name
        old.unlink()
    if not int8:
        program.save(os.fspath(out), external_data=_weight_bytes(program.model) > PROTOBUF_LIMIT - GRAPH_HEADROOM)
        return meta
    vis = model.clip.visual
    width, mlp_width = vis.transformer.width, vis.transformer.resblocks[0].mlp.c_fc.out_features
    del model, detector  # the quantizer holds the float32 graph and its int8 copy: ~2.5x the weights
    with tempfile.TemporaryDirectory(prefix="glocalclip-int8-") as tmp:
        fp32, quantized = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        program.save(os.fspath(fp32), external_data=True)
        del program
        quantize_int8(fp32, quantized, width, mlp_width)
        _save_proto(_with_props(quantized, meta.to_props()), out)
    return meta


def _with_props(path: Path, props: dict[str, str]):
    """The ONNX file at ``path``, weights loaded, its metadata exactly ``props`` (the quantizer adds its own)."""
    import onnx

    proto = onnx.load(os.fspath(path))
    del proto.metadata_props[:]
    onnx.helper.set_model_props(proto, props)
    return proto


def _save_proto(proto, out: str | os.PathLike) -> None:
    """``onnx.save`` with the weights in ``OUT.data`` only when one protobuf cannot hold them."""
    import onnx

    weights = sum(len(t.raw_data) for t in proto.graph.initializer)
    external = weights > PROTOBUF_LIMIT - GRAPH_HEADROOM
    onnx.save(proto, os.fspath(out), save_as_external_data=external, all_tensors_to_one_file=True,
              location=Path(out).name + ".data")


def _require_exporter() -> None:
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise ImportError(f"{EXPORT_EXTRA_HINT} ({e})") from e


def _export_program(detector: Detector, image_size: int):
    """torch.onnx's dynamo exporter on an example batch of 2 (a batch of 1 would fix the batch
    dimension at 1), with the batch dimension declared dynamic."""
    example = torch.randint(0, 256, (2, image_size, image_size, 3), dtype=torch.uint8,
                            generator=torch.Generator().manual_seed(0))
    batch = torch.export.Dim("batch", min=1, max=4096)
    with torch.no_grad():
        return torch.onnx.export(detector, (example,), dynamo=True, input_names=[INPUT_NAME],
                                 output_names=list(OUTPUT_NAMES), dynamic_shapes={"images": {0: batch}},
                                 optimize=True, verbose=False)


def _strip_export_traces(ir_model) -> None:
    """Drop the exporter's per-node notes (Python stack traces with this machine's paths, FX names):
    a deployed file should not carry them, and they are most of a small model's graph bytes."""
    for node in ir_model.graph.all_nodes():
        node.metadata_props.clear()
        for value in node.outputs:
            value.metadata_props.clear()


def exported_files(out: str | os.PathLike) -> list[Path]:
    """The ONNX file and, when its weights went to external data, ``OUT.data`` beside it."""
    out = Path(out)
    data = out.with_name(out.name + ".data")
    return [out, data] if data.is_file() else [out]


def _weight_bytes(ir_model) -> int:
    return sum(v.const_value.nbytes for v in ir_model.graph.initializers.values() if v.const_value is not None)
