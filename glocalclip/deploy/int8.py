"""``glocalclip export --int8``: the transformer blocks' weight matrices stored as int8 and multiplied
in int8 (ONNX Runtime's dynamic quantization: ``MatMulInteger`` on activations quantized per call by
``DynamicQuantizeLinear``), 1.4-1.7x as fast as the float32 graph on a CPU with VNNI (measured).

Which products are quantized was measured (docs/speed.md, "int8 weights"): each block's qkv
in-projection and both MLP matrices, with one scale per output channel. The attention
out-projection stays float32: in the dual-path blocks its input holds the standard and the V-V
outputs together, whose scales differ, and one dynamic activation scale for both moved the maps
most; it is 1/12 of a block's products. The visual projection and the scoring with the stored text
features stay float32 too (small, and they set the scores directly). The patch convolution and the
attention products (no constant weight) are not touched.

Needs ``onnx`` and ``onnxruntime.quantization`` at export time only; the file runs on the plain
onnxruntime CPU package (standard operators).
"""
from __future__ import annotations

import logging
import os
from collections import Counter
from contextlib import contextmanager
from typing import Iterator

from ..settings import SettingError


def block_weight_shapes(width: int, mlp_width: int) -> set[tuple[int, int]]:
    """The [in, out] shapes of the block matrices that are quantized: qkv [W, 3W], MLP [W, M] and [M, W].
    The out-projection [W, W] and the visual projection [W, E] (E < W in every CLIP) are not among them."""
    return {(width, 3 * width), (width, mlp_width), (mlp_width, width)}


def nodes_to_quantize(model, width: int, mlp_width: int) -> list[str]:
    """Names of the MatMul nodes of ``model`` (an ``onnx.ModelProto``, weights not needed) whose
    second input is a constant of :func:`block_weight_shapes`. Every block has one MatMul of each of
    those shapes; unequal counts mean that another constant (a few-shot bank slice, say) has a block's
    shape, and nothing is quantized rather than the wrong product: a :class:`SettingError` naming
    ``int8`` (one message on the command line), raised before the export's output is touched."""
    dims = {t.name: tuple(t.dims) for t in model.graph.initializer}
    per_block = Counter([(width, 3 * width), (width, mlp_width), (mlp_width, width)])
    found: dict[tuple[int, int], list[str]] = {s: [] for s in per_block}
    for n in model.graph.node:
        if n.op_type == "MatMul" and len(n.input) == 2 and dims.get(n.input[1]) in per_block:
            found[dims[n.input[1]]].append(n.name)
    blocks = len(found[(width, 3 * width)]) // per_block[(width, 3 * width)]
    if not blocks or any(len(found[s]) != blocks * k for s, k in per_block.items()):
        counts = ", ".join(f"{a}x{b}: {len(names)}" for (a, b), names in found.items())
        raise SettingError("int8", f"{{int8}} cannot tell the transformer blocks' matrices in the exported graph: its "
                                   f"constant MatMul weights do not divide into blocks of width {width} and MLP "
                                   f"{mlp_width} (weights per shape {counts}); export without {{int8}}, and please "
                                   f"report it")
    return [name for s in per_block for name in found[s]]


@contextmanager
def _quiet_quantizer() -> Iterator[None]:
    """onnxruntime's quantizer logs advice through the root logger (and would configure it if
    unconfigured); a user of ``export`` gets neither."""
    root = logging.getLogger()
    guard = logging.NullHandler()
    root.addHandler(guard)  # present: logging.warning() does not call basicConfig()
    previous = root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)
        root.removeHandler(guard)


def quantize_int8(fp32_path: str | os.PathLike, out_path: str | os.PathLike, width: int, mlp_width: int) -> int:
    """Write ``out_path`` (weights in ``out_path.data``) from the float32 file ``fp32_path``: the
    block matrices of :func:`block_weight_shapes` in int8, per output channel. Returns how many
    products were quantized."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    names = nodes_to_quantize(onnx.load(os.fspath(fp32_path), load_external_data=False), width, mlp_width)
    with _quiet_quantizer():
        quantize_dynamic(os.fspath(fp32_path), os.fspath(out_path), weight_type=QuantType.QInt8,
                         per_channel=True, reduce_range=False, nodes_to_quantize=names,
                         op_types_to_quantize=["MatMul"], use_external_data_format=True)
    return len(names)
