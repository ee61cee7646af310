#!/usr/bin/env python3
"""Convert a Llama-family GGUF file into a Hugging Face checkpoint directory.

Fixture generator for kiln's safetensors-source tests ("the same weights give the same
model"): kiln compiles the GGUF and the directory written here, and the two must agree.
Independent of kiln: the `gguf` package reads and dequantizes, numpy permutes and converts,
and this script writes the safetensors files (checked by loading them back with the
`safetensors` package where it can read the dtype).

  gguf_to_hf.py MODEL.gguf OUT_DIR --tokenizer-json PATH --manifest PATH
                [--dtype f32|f16|bf16] [--shards N] [--untie]

OUT_DIR must not exist or be empty (exit 2 otherwise). Writes config.json,
generation_config.json, tokenizer.json (a byte copy), tokenizer_config.json (from the bundle
manifest's "tokenizer"), and model.safetensors, or with --shards N>1 model-0000i-of-0000N
.safetensors plus model.safetensors.index.json. Tensors are dequantized to float32, then
stored as --dtype (bf16: round to nearest even). --untie writes lm_head.weight for a tied model.
"""

import argparse
import json
import os
import shutil
import struct

import gguf
import numpy as np

from llama_layout import PER_LAYER, die, hf_name, meta, self_check_permute, unpermute

DTYPES = {"f32": ("F32", "float32"), "f16": ("F16", "float16"), "bf16": ("BF16", "bfloat16")}


def to_bf16_bits(a):
    """float32 -> bfloat16 bit patterns (uint16), round to nearest even, NaN stays NaN."""
    u = a.astype("<f4").view(np.uint32).astype(np.uint64)
    r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    return np.where(np.isnan(a), np.uint16(0x7FC0), r)


def encode(a, dtype):
    if dtype == "f32":
        return a.astype("<f4")
    if dtype == "f16":
        b = a.astype("<f2")
        if not np.isfinite(b).all() and np.isfinite(a).all():
            die("a value overflows float16")
        return b
    return to_bf16_bits(a).astype("<u2")


def write_safetensors(path, tensors, st_dtype):
    """tensors: sorted list of (name, array). Data contiguous in that order."""
    header, off = {}, 0
    for name, a in tensors:
        header[name] = {"dtype": st_dtype, "shape": list(a.shape), "data_offsets": [off, off + a.nbytes]}
        off += a.nbytes
    header["__metadata__"] = {"format": "pt"}
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h)
        for _, a in tensors:
            f.write(np.ascontiguousarray(a).tobytes())


def check_file(path, tensors, st_dtype):
    """Read a written file back: our own header parse always, safetensors for f32/f16."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
    assert n % 8 == 0 and header.pop("__metadata__") == {"format": "pt"}
    end = 0
    for name, a in tensors:
        e = header.pop(name)
        assert e["dtype"] == st_dtype and e["shape"] == list(a.shape)
        assert e["data_offsets"] == [end, end + a.nbytes]
        end += a.nbytes
    assert not header and os.path.getsize(path) == 8 + n + end, f"{path}: bad size"
    if st_dtype != "BF16":
        from safetensors.numpy import load_file
        back = load_file(path)
        assert sorted(back) == [name for name, _ in tensors]
        for name, a in tensors:
            assert back[name].dtype == a.dtype and np.array_equal(back[name], a), name


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("gguf")
    p.add_argument("out_dir")
    p.add_argument("--tokenizer-json", required=True)
    p.add_argument("--manifest", required=True)
    p.add_argument("--dtype", choices=DTYPES, default="f32")
    p.add_argument("--shards", type=int, default=1)
    p.add_argument("--untie", action="store_true")
    args = p.parse_args()
    if args.shards < 1:
        die("--shards must be >= 1", 2)
    if os.path.exists(args.out_dir) and (not os.path.isdir(args.out_dir) or os.listdir(args.out_dir)):
        die(f"{args.out_dir} exists and is not an empty directory", 2)
    self_check_permute()

    r = gguf.GGUFReader(args.gguf)
    arch = meta(r, "general.architecture")
    if arch != "llama":
        die(f"architecture {arch!r} is not llama")
    hidden = meta(r, f"{arch}.embedding_length")
    n_layers = meta(r, f"{arch}.block_count")
    n_head = meta(r, f"{arch}.attention.head_count")
    n_kv = meta(r, f"{arch}.attention.head_count_kv", n_head)

    weights = {}
    for t in r.tensors:
        name = hf_name(t.name)
        ne = [int(x) for x in t.shape]  # GGUF order: ne0 (contiguous) first
        a = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        # The reader's numpy arrays are row-major with the GGUF dims reversed: (ne1, ne0).
        want = tuple(reversed(ne))
        if a.size != int(np.prod(ne)):
            die(f"{t.name}: {a.size} values for dims {ne}")
        a = a.reshape(want)
        if ".q_proj." in name:
            a = unpermute(a, n_head)
        elif ".k_proj." in name:
            a = unpermute(a, n_kv)
        if weights.setdefault(name, a) is not a:
            die(f"duplicate tensor {t.name}")
    expected = {"model.embed_tokens.weight", "model.norm.weight"} | {
        f"model.layers.{l}.{v}.weight" for l in range(n_layers) for v in PER_LAYER.values()}
    if expected - set(weights) or set(weights) - expected - {"lm_head.weight"}:
        die(f"tensors do not match {n_layers} layers: {sorted(expected ^ set(weights))[:5]}")
    embed = weights["model.embed_tokens.weight"]
    if embed.shape[1] != hidden:
        die(f"embedding shape {embed.shape} does not match hidden size {hidden}")
    tied = "lm_head.weight" not in weights
    if tied and args.untie:
        weights["lm_head.weight"] = embed.copy()
        tied = False

    st_dtype, torch_dtype = DTYPES[args.dtype]
    tensors = [(name, encode(weights[name], args.dtype)) for name in sorted(weights)]
    total = sum(a.nbytes for _, a in tensors)
    shards = [[] for _ in range(args.shards)]
    cum = 0
    for item in tensors:  # sorted order; each tensor goes to the shard holding its middle byte
        shards[min(args.shards - 1, (2 * cum + item[1].nbytes) * args.shards // (2 * total))].append(item)
        cum += item[1].nbytes
    if any(not s for s in shards):
        die(f"cannot split {len(tensors)} tensors into {args.shards} non-empty shards", 2)

    with open(args.manifest) as f:
        tok = json.load(f)["tokenizer"]
    max_pos = meta(r, f"{arch}.context_length")
    bos, eos = meta(r, "tokenizer.ggml.bos_token_id", None), meta(r, "tokenizer.ggml.eos_token_id", None)
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": hidden, "intermediate_size": meta(r, f"{arch}.feed_forward_length"),
        "num_hidden_layers": n_layers, "num_attention_heads": n_head, "num_key_value_heads": n_kv,
        "rms_norm_eps": float(meta(r, f"{arch}.attention.layer_norm_rms_epsilon")),
        "rope_theta": float(meta(r, f"{arch}.rope.freq_base", 10000.0)),
        "max_position_embeddings": max_pos, "vocab_size": int(embed.shape[0]),
        "tie_word_embeddings": tied, "bos_token_id": bos, "eos_token_id": eos,
        "torch_dtype": torch_dtype, "hidden_act": "silu", "attention_bias": False,
        "mlp_bias": False, "head_dim": hidden // n_head,
    }
    tok_config = {"bos_token": tok["bos_token"], "eos_token": tok["eos_token"],
                  "add_bos_token": tok["add_bos"]}
    if tok.get("chat_template") is not None:
        tok_config["chat_template"] = tok["chat_template"]
    tok_config.update({"model_max_length": max_pos, "tokenizer_class": "GPT2Tokenizer",
                       "clean_up_tokenization_spaces": False})

    os.makedirs(args.out_dir, exist_ok=True)
    out = lambda n: os.path.join(args.out_dir, n)
    def write_json(name, obj):
        with open(out(name), "w") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")

    files = [f"model-{i + 1:05d}-of-{args.shards:05d}.safetensors" for i in range(args.shards)]
    if args.shards == 1:
        files = ["model.safetensors"]
    else:
        write_json("model.safetensors.index.json", {
            "metadata": {"total_size": total},
            "weight_map": {name: files[i] for i, s in enumerate(shards) for name, _ in s}})
    for fname, s in zip(files, shards):
        write_safetensors(out(fname), s, st_dtype)
        check_file(out(fname), s, st_dtype)
    write_json("config.json", config)
    write_json("generation_config.json", {"bos_token_id": bos, "eos_token_id": eos})
    write_json("tokenizer_config.json", tok_config)
    shutil.copyfile(args.tokenizer_json, out("tokenizer.json"))
    print(f"wrote {len(tensors)} tensors ({args.dtype}), {total} bytes, files: {', '.join(files)}")


if __name__ == "__main__":
    main()
