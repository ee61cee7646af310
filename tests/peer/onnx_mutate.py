#!/usr/bin/env python3
"""Writes a copy of an ONNX model with one change that makes it a model kiln must refuse.

Usage: onnx_mutate.py IN.onnx OUT.onnx KIND, KIND one of:
  tanh      the first Sigmoid (SiLU's) becomes a Tanh: an unknown MLP
  scale     the first attention score scale is halved: not 1/sqrt(head_dim)
  mask      the first Trilu keeps the lower triangle: not a causal mask
  rope      inv_freq halved: rotary frequencies that are not theta^(-2i/D) (rope scaling)
  eps       the first RMSNorm's epsilon Add gets a non-constant second input
Used by kiln's ONNX-source tests (tests/it/sources.rs); IN's weights must be inline.
"""

import sys

import numpy as np
import onnx
from onnx import numpy_helper


def main() -> int:
    if len(sys.argv) != 4:
        print(__doc__, file=sys.stderr)
        return 2
    src, dst, kind = sys.argv[1:]
    m = onnx.load(src)
    g = m.graph
    producers = {o: n for n in g.node for o in n.output}
    if kind == "tanh":
        next(n for n in g.node if n.op_type == "Sigmoid").op_type = "Tanh"
    elif kind == "scale":
        n = next(n for n in g.node if n.op_type == "Mul" and "self_attn" in n.name and any(
            producers.get(i) is not None and producers[i].op_type == "MatMul" for i in n.input))
        c = producers[n.input[1]]
        t = c.attribute[0].t
        c.attribute[0].t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * 0.5, t.name))
    elif kind == "mask":
        n = next(n for n in g.node if n.op_type == "Trilu")
        next(a for a in n.attribute if a.name == "upper").i = 0
    elif kind == "rope":
        t = next(t for t in g.initializer if t.name == "model.rotary_emb.inv_freq")
        t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * np.float32(0.5), t.name))
    elif kind == "eps":
        n = next(n for n in g.node if n.op_type == "ReduceMean")
        add = next(a for a in g.node if a.op_type == "Add" and n.output[0] in a.input)
        add.input[1] = n.output[0]
    else:
        print(f"unknown kind {kind!r}", file=sys.stderr)
        return 2
    onnx.save(m, dst)
    return 0


if __name__ == "__main__":
    sys.exit(main())
