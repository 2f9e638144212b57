"""``glocalclip export --half``: the weight matrices stored as float16, computed in float32.

Every float32 weight with two or more dimensions (the projections, MLPs and patch embedding: nearly
all the bytes) is rounded to float16 in the file and cast back by a ``Cast`` node in front of its
users. Inputs, outputs and every operation stay float32, so the file runs on any ONNX Runtime
execution provider (the CPU's kernels are float32); small tensors (biases, LayerNorm weights, the
text features, the smoothing kernel) stay float32.
"""
from __future__ import annotations

import numpy as np

MIN_ELEMENTS = 1024  # below this, halving saves nothing worth a Cast node


def store_weights_half(ir_model) -> int:
    """Rewrite the graph of an ``onnx_ir.Model`` in place; returns how many weights were halved."""
    import onnx_ir as ir

    graph = ir_model.graph
    first = next(iter(graph), None)
    halved = 0
    for name, value in list(graph.initializers.items()):
        tensor = value.const_value
        if tensor is None or value.dtype != ir.DataType.FLOAT or len(tensor.shape) < 2 or \
                tensor.size < MIN_ELEMENTS:
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
