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

import errno
import os
import shutil
import signal
import threading
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

from .. import __version__
from ..engine.checkpoint import file_sha256, load_model_and_checkpoint, sigma_for, stored_test_record, threshold_for
from ..engine.few_shot import load_reference
from ..files import (make_dirs, make_temp_dir, output_error, remove_leftovers, removed_if_left_empty, sync_folder,
                     translated)
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
    zero-shot threshold does not fit its scores, so only ``threshold`` labels. An earlier export at
    ``out`` is replaced (as always), but only once the new one is complete: everything is written in a
    scratch folder beside ``out`` and renamed into place at the end (:func:`_publish`), so a failure
    (a full disk: one :class:`~glocalclip.files.OutputError` naming ``out``) or Ctrl-C leaves it as it
    was. Returns the metadata."""
    weights = weights_kind(half, int8)
    _require_exporter()
    out = Path(out)
    if image_size is not None:
        overrides["image_size"] = int(image_size)
    if save_reference is not None:
        check_bank_target(save_reference, overwrite_reference)  # before minutes of bank building
    with removed_if_left_empty(out.parent), _staging(out) as staging:  # a folder that cannot take it fails here
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
                              config=model.cfg.to_dict(), version=__version__,
                              checkpoint_sha256=file_sha256(checkpoint), weights=weights,
                              threshold_source=detector.threshold_source,
                              reference=detector.bank.describe() if detector.bank is not None else None)
        program = _export_program(detector, meta.image_size)
        if half:
            store_weights_half(program.model)
        _strip_export_traces(program.model)
        program.model.metadata_props.update(meta.to_props())
        staged = staging / out.name  # its external data, if any, is staged / OUT.data: the final name
        if not int8:
            with translated(out):
                program.save(os.fspath(staged), external_data=_needs_external_data(_weight_bytes(program.model)))
        else:
            width, mlp_width = _block_widths(model)
            del model, detector, bank  # the quantizer holds the float32 graph and its int8 copy: ~2.5x the weights
            work = staging / "int8"
            with translated(out):
                work.mkdir()
                fp32, quantized = work / "fp32.onnx", work / "int8.onnx"
                program.save(os.fspath(fp32), external_data=True)
                del program
                quantize_int8(fp32, quantized, width, mlp_width)
                proto = _with_props(quantized, meta.to_props())  # weights in memory: the quantizer's files can go
                shutil.rmtree(work)
                _save_proto(proto, staged)
        _publish(staged, out)
    return meta


def _block_widths(model) -> tuple[int, int]:
    """The vision tower's width and MLP width, read without holding the tower (whose ~1.2 GB at
    ViT-L must be freed before quantization)."""
    blocks = model.clip.visual.transformer
    return blocks.width, blocks.resblocks[0].mlp.c_fc.out_features


@contextmanager
def _staging(out: Path) -> Iterator[Path]:
    """A scratch folder beside ``out`` (same file system, so its files can be renamed into place),
    removed when the export ends however it ends; one a killed export left is cleared by the next
    (``files.remove_leftovers``). Everything is written there first, so that a failed or interrupted
    export (a full disk, Ctrl-C during quantization) leaves an earlier export at ``out`` as it was."""
    if out.is_dir():
        raise output_error(IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR)), out)
    make_dirs(out.parent)
    remove_leftovers(out.parent)
    folder = make_temp_dir(out.parent, "export")
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _publish(staged: Path, out: Path) -> None:
    """Move the finished ``staged`` file (and ``staged.data`` beside it, if any) to ``out``, over an
    earlier export there (``export`` replaces its output, as it always has).

    Order: the new ``OUT.data`` first, then ``OUT``, then a stale ``OUT.data`` of an earlier export
    that had one when the new one has none. Each rename is atomic, so an earlier export stays whole
    except in one case: an earlier export with ``OUT.data`` replaced by a new one with ``OUT.data``
    (weights over 2 GB, both times). Between the two renames the old graph sits beside the new weights;
    a crash or SIGKILL in that instant leaves a broken pair (export again). Two names cannot change in
    one atomic step; Ctrl-C at least waits until both are in place. An earlier single-file export is
    never broken: the new ``OUT.data`` is not read by it, and a stale one is removed only after the
    new ``OUT`` is in place."""
    new_data, data = _data_of(staged), _data_of(out)
    external = new_data.is_file()
    with translated(out), _interrupts_deferred():
        if external:
            os.replace(new_data, data)
        os.replace(staged, out)
        if not external:
            with suppress(FileNotFoundError):
                data.unlink()
    sync_folder(out.parent)


@contextmanager
def _interrupts_deferred() -> Iterator[None]:
    """Ctrl-C (SIGINT) inside is acted on only when the block has finished (main thread only: signal
    handlers can be set there alone; elsewhere no SIGINT arrives as KeyboardInterrupt anyway)."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) is None:
        yield  # None: a handler set outside Python, which could not be put back
        return
    caught: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if caught and callable(previous):
            previous(signal.SIGINT, None)  # Python's default handler raises KeyboardInterrupt


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

    external = _needs_external_data(sum(len(t.raw_data) for t in proto.graph.initializer))
    onnx.save(proto, os.fspath(out), save_as_external_data=external, all_tensors_to_one_file=True,
              location=Path(out).name + ".data")


def _needs_external_data(weight_bytes: int) -> bool:
    """The one rule for both writers: weights that one protobuf (with room for the graph) cannot hold
    go to ``OUT.data``."""
    return weight_bytes > PROTOBUF_LIMIT - GRAPH_HEADROOM


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
    data = _data_of(Path(out))
    return [Path(out), data] if data.is_file() else [Path(out)]


def _data_of(out: Path) -> Path:
    """Where the external weights of the ONNX file ``out`` are (the name the exporters give them)."""
    return out.with_name(out.name + ".data")


def _weight_bytes(ir_model) -> int:
    return sum(v.const_value.nbytes for v in ir_model.graph.initializers.values() if v.const_value is not None)
