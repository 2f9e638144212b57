"""``glocalclip export --half``: the weight matrices stored as float16, computed in float32.

Every float32 weight with two or more dimensions (the projections, MLPs and patch embedding: nearly
all the bytes) is rounded to float16 in the file and cast back by a ``Cast`` node in front of its
users. Inputs, outputs and every operation stay float32, so the file runs on any ONNX Runtime
execution provider (the CPU's kernels are float32); small tensors (biases, LayerNorm weights, the
smoothing kernel) stay float32.

Tables of unit vectors stay float32 whatever their size: the text features and a baked-in few-shot
bank, whose rows (or, folded into a transposed constant, columns) are L2-normalised features that
the patch features are compared with by cosine. They are not weights, and rounding them moves the
maps: on the tiny config with a 4-shot bank, a float16 bank alone moved the map by 5.6e-4 and the score
by 2.6e-4 (span 5.2); keeping it float32 cut the whole ``--half`` file's map error from 1.9e-3 to 1.6e-3,
for 2 bytes per bank element more (docs/usage.md, few-shot). A weight matrix's rows and columns are
far from all of norm 1 (0.1 off and more, measured).
"""
from __future__ import annotations

import numpy as np

MIN_ELEMENTS = 1024  # below this, halving saves nothing worth a Cast node
UNIT_NORM_TOLERANCE = 1e-4  # normalised float32 features: |norm - 1| ~ 1e-7; weights: 1e-1 and more


def is_unit_vector_table(array: np.ndarray) -> bool:
    """A 2-D table whose rows, or whose columns, are all unit vectors: normalised features, not weights."""
    if array.ndim != 2:
        return False
    a = array.astype(np.float64)
    return any(bool(np.all(np.abs(np.linalg.norm(a, axis=axis) - 1) < UNIT_NORM_TOLERANCE)) for axis in (0, 1))


def store_weights_half(ir_model) -> int:
    """Rewrite the graph of an ``onnx_ir.Model`` in place; returns how many weights were halved (unit-vector
    tables, the text features and a few-shot bank, are kept float32)."""
    import onnx_ir as ir

    graph = ir_model.graph
    first = next(iter(graph), None)
    halved = 0
    for name, value in list(graph.initializers.items()):
        tensor = value.const_value
        if tensor is None or value.dtype != ir.DataType.FLOAT or len(tensor.shape) < 2 or \
                tensor.size < MIN_ELEMENTS or is_unit_vector_table(tensor.numpy()):
            continue
        stored = ir.Value(name=f"{name}.float16", const_value=ir.tensor(tensor.numpy().astype(np.float16)))
        graph.register_initializer(stored)
        cast = ir.node("Cast", [stored], {"to": ir.DataType.FLOAT}, name=f"{name}.to_float32")
        if first is None:
            graph.append(cast)
        else:
            graph.insert_before(first, cast)
        value.replace_all_uses_with(cast.outputs[0])
        del graph.initializers[name]
        cast.outputs[0].name = name
        halved += 1
    return halved
