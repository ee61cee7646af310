"""What the fixture writers gguf_to_hf.py and gguf_to_onnx.py share: Hugging Face Llama tensor
names, llama.cpp's q/k row permutation and its inverse, and GGUF metadata reading (gguf-py).
Independent of kiln, like the scripts that import it.
"""

import os
import re
import sys

import gguf
import numpy as np

PER_LAYER = {
    "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm", "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
GLOBAL = {"token_embd.weight": "model.embed_tokens.weight",
          "output_norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"}


def die(msg, code=1):
    """Exits with `msg` on stderr, prefixed with the running script's name."""
    print(f"{os.path.basename(sys.argv[0]).removesuffix('.py')}: {msg}", file=sys.stderr)
    sys.exit(code)


def hf_name(name):
    if name in GLOBAL:
        return GLOBAL[name]
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight", name)
    if m and m.group(2) in PER_LAYER:
        return f"model.layers.{m.group(1)}.{PER_LAYER[m.group(2)]}.weight"
    die(f"unsupported tensor {name!r}")


def permute(w, n_head):
    """llama.cpp's convert_hf_to_gguf.py permutation of q/k rows (HF -> GGUF)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute(w, n_head):
    """Inverse of `permute` (GGUF -> HF rotary order)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def self_check_permute():
    x = np.random.default_rng(0).standard_normal((3 * 2 * 8, 5)).astype(np.float32)
    for n_head in (1, 2, 3):
        assert np.array_equal(permute(unpermute(x, n_head), n_head), x), "permute round trip"
        assert np.array_equal(unpermute(permute(x, n_head), n_head), x), "unpermute round trip"
    assert not np.array_equal(unpermute(x, 3), x), "unpermute must move rows"


def meta(reader, key, default=KeyError):
    """A scalar or string GGUF metadata value as a Python int/float/str."""
    f = reader.fields.get(key)
    if f is None:
        if default is KeyError:
            die(f"GGUF metadata {key!r} missing")
        return default
    if f.types and f.types[0] == gguf.GGUFValueType.STRING:
        return bytes(f.parts[f.data[0]]).decode("utf-8")
    if len(f.data) != 1 or (f.types and f.types[0] == gguf.GGUFValueType.ARRAY):
        die(f"GGUF metadata {key!r} is not a scalar")
    return f.parts[f.data[0]][0].item()
