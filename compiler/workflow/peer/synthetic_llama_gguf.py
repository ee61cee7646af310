"""Writes a Llama-shaped GGUF with random weights, for `cargo xtask bench-large`: the shape of
Llama-3.1-8B by default (32 blocks, width 4096, feed-forward 14336, 32 query and 8 key/value
heads, rope base 500000, RMS epsilon 1e-5, untied output), Q4_0 matrices drawn from a normal
distribution of standard deviation 0.02 and quantized by gguf-py, f32 norms of 1.0, and the
tokenizer (every `tokenizer.*` key) of another GGUF, so that llama.cpp and kiln both have a
working tokenizer and the vocabulary size is that GGUF's.

The file is written tensor by tensor (the header first, then each tensor's bytes as it is
made, its rows generated and quantized in chunks), so memory stays at a few hundred MB for
any shape. The same arguments give the same bytes: each tensor has its own generator, seeded
by (--seed, the tensor's index).

usage: python3 synthetic_llama_gguf.py --out OUT.gguf --tokenizer-from SOURCE.gguf
           [--layers 32] [--width 4096] [--ffn 14336] [--heads 32] [--kv-heads 8] [--seed 0]
"""

import argparse
import sys
import time

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter, LlamaFileType
from gguf.quants import quant_shape_to_byte_shape, quantize

# Rows generated (float32) and quantized at once: bounds the memory of the widest matrices.
CHUNK_VALUES = 1 << 24
WEIGHT_STD = 0.02


def copy_tokenizer(writer, source):
    """Every `tokenizer.*` key of `source`, with its type, and the vocabulary size."""
    reader = GGUFReader(source)
    vocab = None
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        value = field.contents()
        sub_type = field.types[1] if field.types[0] == GGUFValueType.ARRAY else None
        writer.add_key_value(key, value, field.types[0], sub_type=sub_type)
        if key == "tokenizer.ggml.tokens":
            vocab = len(value)
    if vocab is None:
        sys.exit(f"{source} has no tokenizer.ggml.tokens")
    return vocab


def tensors(args, vocab):
    """(name, numpy shape: rows, row length) of every tensor, in file order."""
    head_dim = args.width // args.heads
    kv_width = head_dim * args.kv_heads
    yield "token_embd.weight", (vocab, args.width)
    for block in range(args.layers):
        p = f"blk.{block}."
        yield p + "attn_norm.weight", (args.width,)
        yield p + "attn_q.weight", (args.width, args.width)
        yield p + "attn_k.weight", (kv_width, args.width)
        yield p + "attn_v.weight", (kv_width, args.width)
        yield p + "attn_output.weight", (args.width, args.width)
        yield p + "ffn_norm.weight", (args.width,)
        yield p + "ffn_gate.weight", (args.ffn, args.width)
        yield p + "ffn_up.weight", (args.ffn, args.width)
        yield p + "ffn_down.weight", (args.width, args.ffn)
    yield "output_norm.weight", (args.width,)
    yield "output.weight", (vocab, args.width)


def q4_0_matrix(shape, seed, index):
    """A (rows, row length) matrix of N(0, 0.02) values quantized to Q4_0, as raw bytes."""
    rows, cols = shape
    rng = np.random.default_rng([seed, index])
    out = np.empty(quant_shape_to_byte_shape(shape, GGMLQuantizationType.Q4_0), dtype=np.uint8)
    step = max(1, CHUNK_VALUES // cols)
    for start in range(0, rows, step):
        n = min(step, rows - start)
        values = rng.standard_normal((n, cols), dtype=np.float32)
        values *= WEIGHT_STD
        out[start:start + n] = quantize(values, GGMLQuantizationType.Q4_0)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--tokenizer-from", required=True)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--width", type=int, default=4096)
    ap.add_argument("--ffn", type=int, default=14336)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--context-length", type=int, default=131072)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.width % args.heads or args.heads % args.kv_heads or args.width % 32 or args.ffn % 32:
        sys.exit("the width must be a multiple of 32 and of --heads, --heads of --kv-heads, --ffn of 32")

    writer = GGUFWriter(args.out, "llama")
    writer.add_name(f"Llama-3.1-8B-shaped, random weights ({args.layers}x{args.width}, seed {args.seed})")
    writer.add_type("model")
    writer.add_block_count(args.layers)
    writer.add_context_length(args.context_length)
    writer.add_embedding_length(args.width)
    writer.add_feed_forward_length(args.ffn)
    writer.add_head_count(args.heads)
    writer.add_head_count_kv(args.kv_heads)
    writer.add_rope_freq_base(500000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(args.width // args.heads)
    writer.add_file_type(LlamaFileType.MOSTLY_Q4_0)
    writer.add_quantization_version(2)
    vocab = copy_tokenizer(writer, args.tokenizer_from)
    writer.add_vocab_size(vocab)

    plan = list(tensors(args, vocab))
    for name, shape in plan:
        if len(shape) == 1:
            writer.add_tensor_info(name, shape, np.dtype(np.float32), shape[0] * 4)
        else:
            byte_shape = quant_shape_to_byte_shape(shape, GGMLQuantizationType.Q4_0)
            writer.add_tensor_info(name, byte_shape, np.dtype(np.uint8), byte_shape[0] * byte_shape[1],
                                   raw_dtype=GGMLQuantizationType.Q4_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    start = time.time()
    for index, (name, shape) in enumerate(plan):
        if len(shape) == 1:
            writer.write_tensor_data(np.ones(shape, dtype=np.float32))
        else:
            writer.write_tensor_data(q4_0_matrix(shape, args.seed, index))
        if name.endswith("ffn_down.weight"):
            print(f"  {int(name.split('.')[1]) + 1}/{args.layers} blocks written ({time.time() - start:.0f} s)",
                  file=sys.stderr, flush=True)
    writer.close()


if __name__ == "__main__":
    main()
