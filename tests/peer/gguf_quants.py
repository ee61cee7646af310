#!/usr/bin/env python3
"""ggml's block formats through gguf-py, an implementation independent of kiln's.

kiln's `dequant` tests compare `ir::quant` and `compiler::gguf` with this script, which uses
only the `gguf` package (PyPI, the GGUF library of the llama.cpp project) and numpy:

  gguf_quants.py dequantize TYPE BLOCKS.bin OUT.npy
      BLOCKS.bin holds whole blocks of TYPE (f32, f16, bf16, q4_0, q4_1, q5_0, q5_1, q8_0,
      q2_k, q3_k, q4_k, q5_k, q6_k), back to back;
      OUT.npy receives their float32 dequantization (`gguf.quants.dequantize`), 1-D.
      TYPE may also be one of kiln's own formats (q2_g64, q3_g64), which gguf-py does not
      know: they are dequantized by `dequantize_kiln` here, written from the format's
      description (64-value groups: f16 d, f16 m, 16 bytes of 2-bit values where byte j holds
      values j, j+16, j+32, j+48 from the low bits up, then for q3_g64 a little-endian u64
      whose bit i is value i's third bit; x = d * q + m in float32).
  gguf_quants.py quantize TYPE VALUES.f32 OUT.bin
      VALUES.f32 holds little-endian float32 values (whole blocks); OUT.bin receives
      `gguf.quants.quantize` of them as raw blocks (gguf-py 0.19 quantizes the float
      formats and q4_0 ... q8_0, not the K-quants).
  gguf_quants.py model MODEL.gguf
      Reads MODEL.gguf with gguf-py's own `GGUFReader` and streams every tensor's
      dequantization to stdout: for each tensor a header line
      `tensor NAME GGML_TYPE_ID DIM0,DIM1,... N_VALUES\\n` (dims fastest-varying first, as in
      the file)
      followed by N_VALUES little-endian float32 values; then `end N_TENSORS\\n`.

Exits non-zero with a message on stderr on any error (missing package, bad arguments).
"""

import sys


def qtype(name):
    from gguf import GGMLQuantizationType as T

    types = {
        "f32": T.F32,
        "f16": T.F16,
        "bf16": T.BF16,
        "q4_0": T.Q4_0,
        "q4_1": T.Q4_1,
        "q5_0": T.Q5_0,
        "q5_1": T.Q5_1,
        "q8_0": T.Q8_0,
        "q2_k": T.Q2_K,
        "q3_k": T.Q3_K,
        "q4_k": T.Q4_K,
        "q5_k": T.Q5_K,
        "q6_k": T.Q6_K,
    }
    if name not in types:
        raise SystemExit(f"unknown type {name!r}; expected one of {sorted(types)}")
    return types[name]


def block_shape(t):
    from gguf.constants import GGML_QUANT_SIZES

    return GGML_QUANT_SIZES[t]


KILN_FORMATS = {"q2_g64": (20, False), "q3_g64": (28, True)}


def dequantize_kiln(type_name, raw):
    import numpy as np

    size, third = KILN_FORMATS[type_name]
    if raw.size % size != 0:
        raise SystemExit(f"{raw.size} bytes is not a whole number of {size}-byte blocks")
    blocks = raw.reshape((-1, size))
    d = blocks[:, 0:2].copy().view("<f2").astype(np.float32)
    m = blocks[:, 2:4].copy().view("<f2").astype(np.float32)
    crumbs = blocks[:, 4:20]
    # q[:, 16 k + j] = bits 2k..2k+2 of byte j
    q = np.concatenate([(crumbs >> (2 * k)) & 3 for k in range(4)], axis=1).astype(np.uint8)
    if third:
        bits = np.unpackbits(blocks[:, 20:28], axis=1, bitorder="little")
        q = q | (bits << 2)
    with np.errstate(invalid="ignore", over="ignore"):
        values = d * q.astype(np.float32) + m
    return values.astype(np.float32).reshape(-1)


def dequantize(type_name, blocks_path, out_path):
    import numpy as np

    if type_name in KILN_FORMATS:
        raw = np.fromfile(blocks_path, dtype=np.uint8)
        np.save(out_path, np.ascontiguousarray(dequantize_kiln(type_name, raw), dtype=np.float32))
        return
    from gguf.quants import dequantize as dq

    t = qtype(type_name)
    _, type_size = block_shape(t)
    raw = np.fromfile(blocks_path, dtype=np.uint8)
    if raw.size % type_size != 0:
        raise SystemExit(f"{blocks_path}: {raw.size} bytes is not a whole number of {type_size}-byte blocks")
    values = dq(raw.reshape((-1, type_size)), t)
    np.save(out_path, np.ascontiguousarray(values, dtype=np.float32).reshape(-1))


def quantize(type_name, values_path, out_path):
    import numpy as np
    from gguf.quants import quantize as q

    t = qtype(type_name)
    block_size, _ = block_shape(t)
    values = np.fromfile(values_path, dtype="<f4")
    if values.size % block_size != 0:
        raise SystemExit(f"{values_path}: {values.size} values is not a whole number of {block_size}-value blocks")
    out = q(values.reshape((-1, block_size)), t)
    np.ascontiguousarray(out).view(np.uint8).tofile(out_path)


def model(path):
    import numpy as np
    from gguf import GGUFReader
    from gguf.quants import dequantize as dq

    reader = GGUFReader(path)
    out = sys.stdout.buffer
    for tensor in reader.tensors:
        values = np.ascontiguousarray(dq(tensor.data, tensor.tensor_type), dtype="<f4").reshape(-1)
        dims = ",".join(str(int(d)) for d in tensor.shape)
        out.write(f"tensor {tensor.name} {int(tensor.tensor_type.value)} {dims} {values.size}\n".encode())
        out.write(values.tobytes())
    out.write(f"end {len(reader.tensors)}\n".encode())
    out.flush()


def main():
    args = sys.argv[1:]
    if len(args) == 4 and args[0] == "dequantize":
        dequantize(*args[1:])
    elif len(args) == 4 and args[0] == "quantize":
        quantize(*args[1:])
    elif len(args) == 2 and args[0] == "model":
        model(args[1])
    else:
        raise SystemExit(__doc__)
    return 0


if __name__ == "__main__":
    sys.exit(main())
