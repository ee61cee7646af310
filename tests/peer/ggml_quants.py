#!/usr/bin/env python3
"""ggml's own reference quantizers, called in the libggml-base shared library that
llama-cpp-python ships (an implementation independent of kiln's, and the one llama-quantize
uses when it has no importance matrix):

  ggml_quants.py quantize TYPE VALUES.f32 OUT.bin
      VALUES.f32 holds little-endian float32 values (whole blocks of TYPE: q2_k, q3_k, q4_k,
      q5_k, q6_k, q5_0, q5_1); OUT.bin receives `quantize_row_<type>_ref` of them as raw
      blocks.

kiln's `dequant` tests compare the round-trip error of kiln's K-quant quantizers with these.
Exits non-zero with a message on stderr on any error (llama-cpp-python missing, bad arguments).
"""

import ctypes
import importlib.util
import os
import sys

# kiln's name -> (ggml's name, values per block, bytes per block)
TYPES = {
    "q5_0": ("q5_0", 32, 22),
    "q5_1": ("q5_1", 32, 24),
    "q2_k": ("q2_K", 256, 84),
    "q3_k": ("q3_K", 256, 110),
    "q4_k": ("q4_K", 256, 144),
    "q5_k": ("q5_K", 256, 176),
    "q6_k": ("q6_K", 256, 210),
}


def libggml():
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or spec.origin is None:
        raise SystemExit("the llama_cpp package (llama-cpp-python) is not installed")
    path = os.path.join(os.path.dirname(spec.origin), "lib", "libggml-base.so")
    if not os.path.exists(path):
        raise SystemExit(f"{path} is missing: llama-cpp-python does not ship libggml-base here")
    return ctypes.CDLL(path)


def quantize(type_name, values_path, out_path):
    import numpy as np

    if type_name not in TYPES:
        raise SystemExit(f"unknown type {type_name!r}; expected one of {sorted(TYPES)}")
    ggml_name, block_values, block_bytes = TYPES[type_name]
    values = np.ascontiguousarray(np.fromfile(values_path, dtype="<f4"))
    if values.size % block_values != 0:
        raise SystemExit(f"{values_path}: {values.size} values is not a whole number of {block_values}-value blocks")
    out = np.zeros(values.size // block_values * block_bytes, dtype=np.uint8)
    fn = getattr(libggml(), f"quantize_row_{ggml_name}_ref")
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    fn.restype = None
    fn(values.ctypes.data, out.ctypes.data, values.size)
    out.tofile(out_path)


def main():
    args = sys.argv[1:]
    if len(args) == 4 and args[0] == "quantize":
        quantize(*args[1:])
    else:
        raise SystemExit(__doc__)
    return 0


if __name__ == "__main__":
    sys.exit(main())
