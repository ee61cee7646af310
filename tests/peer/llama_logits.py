#!/usr/bin/env python3
"""Evaluates token ids with llama.cpp (via llama-cpp-python) and writes the logits of every
position, reading the GGUF the way llama.cpp does (a peer check of the files kiln writes).

Usage: llama_logits.py MODEL.gguf IDS OUT.f32

IDS: comma-separated token ids, evaluated in one batch from position 0 (no BOS is added).
OUT.f32: len(IDS) * n_vocab little-endian f32, row-major by position. stdout: one JSON line
with n_vocab and n_layer as llama.cpp loaded them. Used by kiln's `optimize` tests.
"""

import json
import sys


def main() -> int:
    if len(sys.argv) != 4:
        print("usage: llama_logits.py MODEL.gguf IDS OUT.f32", file=sys.stderr)
        return 2
    import llama_cpp
    import numpy as np

    ids = [int(t) for t in sys.argv[2].split(",")]
    llm = llama_cpp.Llama(
        model_path=sys.argv[1], n_ctx=max(64, len(ids)), n_batch=len(ids), logits_all=True, verbose=False
    )
    llm.eval(ids)
    scores = np.asarray(llm.scores[: len(ids)], dtype="<f4")
    scores.tofile(sys.argv[3])
    n_layer = llama_cpp.llama_model_n_layer(llm.model) if hasattr(llama_cpp, "llama_model_n_layer") else None
    print(json.dumps({"n_vocab": llm.n_vocab(), "n_layer": n_layer}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
