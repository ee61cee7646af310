#!/usr/bin/env python3
"""Convert a Llama-family GGUF file into an ONNX model shaped like a torch.onnx.export of HF Llama.

Fixture generator for kiln's ONNX-source tests ("the same weights give the same model"): kiln
compiles the GGUF and the .onnx written here, and the two must agree. torch is not needed: the
`gguf` package reads and dequantizes, numpy permutes and transposes, and the `onnx` package
builds, checks and saves the graph. The graph imitates what the TorchScript exporter
(torch.onnx.export, opset 17, do_constant_folding=True) emits for transformers'
LlamaForCausalLM with eager attention and use_cache=False:
  - decomposed ops only (RMSNorm as Pow/ReduceMean/Add/Sqrt/Div/Mul, SiLU as Sigmoid*x,
    rotate_half as Slice/Neg/Concat, repeat_kv as Unsqueeze/Expand/Reshape, causal mask from
    ConstantOfShape/Trilu, rotary cos/sin computed in-graph from `model.rotary_emb.inv_freq`);
  - torch-style node names ("/model/layers.0/self_attn/q_proj/MatMul") and value names
    ("<node>_output_0"), scalars as Constant nodes, dynamic dims from Shape/Gather;
  - Linear weights constant-folded to [in, out] initializers named `onnx::MatMul_<N>`, the
    lm_head included (a tied model gets a separate transposed copy of the embedding).
q/k rows are un-permuted from GGUF to Hugging Face rotary order exactly as gguf_to_hf.py does.

  gguf_to_onnx.py MODEL.gguf OUT.onnx [--dtype f32|f16] [--external-data] [--opset 17|18]

OUT.onnx must not exist (exit 2), nor OUT.onnx.data with --external-data (all weights go
there). --dtype f16 stores weight initializers as float16, each followed by one Cast to float32.
"""

import argparse
import os

import gguf
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from llama_layout import PER_LAYER, die, hf_name, meta, unpermute


def load(path):
    """(hyperparameters, {hf name: float32 array}) with q/k in HF order, 2-D as [out, in]."""
    r = gguf.GGUFReader(path)
    arch = meta(r, "general.architecture")
    if arch != "llama":
        die(f"architecture {arch!r} is not llama")
    hp = {"d": meta(r, "llama.embedding_length"), "layers": meta(r, "llama.block_count"),
          "heads": meta(r, "llama.attention.head_count"),
          "eps": float(meta(r, "llama.attention.layer_norm_rms_epsilon")),
          "theta": float(meta(r, "llama.rope.freq_base", 10000.0))}
    hp["kv"] = meta(r, "llama.attention.head_count_kv", hp["heads"])
    hp["hd"] = hp["d"] // hp["heads"]
    if meta(r, "llama.attention.key_length", hp["hd"]) != hp["hd"] or hp["heads"] % hp["kv"]:
        die("unsupported head layout (key_length != d/heads, or heads % kv_heads != 0)")
    weights = {}
    for t in r.tensors:
        name = hf_name(t.name)
        ne = [int(x) for x in t.shape]  # GGUF order: ne0 (contiguous) first
        a = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        if a.size != int(np.prod(ne)):
            die(f"{t.name}: {a.size} values for dims {ne}")
        a = a.reshape(tuple(reversed(ne)))  # (ne1, ne0) = HF [out, in]
        if ".q_proj." in name:
            a = unpermute(a, hp["heads"])
        elif ".k_proj." in name:
            a = unpermute(a, hp["kv"])
        if weights.setdefault(name, a) is not a:
            die(f"duplicate tensor {t.name}")
    expected = {"model.embed_tokens.weight", "model.norm.weight"} | {
        f"model.layers.{l}.{v}.weight" for l in range(hp["layers"]) for v in PER_LAYER.values()}
    if expected - set(weights) or set(weights) - expected - {"lm_head.weight"}:
        die(f"tensors do not match {hp['layers']} layers: {sorted(expected ^ set(weights))[:5]}")
    if weights["model.embed_tokens.weight"].shape[1] != hp["d"]:
        die("embedding width does not match llama.embedding_length")
    if "lm_head.weight" not in weights:  # tied: constant folding gives the lm_head its own copy
        weights["lm_head.weight"] = weights["model.embed_tokens.weight"]
    return hp, weights


class Graph:
    """Collects nodes and initializers, naming them the way the TorchScript exporter does."""

    def __init__(self, fp16, opset):
        self.nodes, self.inits, self.counts = [], [], {}
        self.fp16, self.opset, self.next_matmul = fp16, opset, 1000

    def op(self, scope, op_type, inputs, out=None, **attrs):
        i = self.counts.get((scope, op_type), 0)
        self.counts[(scope, op_type)] = i + 1
        name = f"{scope}/{op_type}" + (f"_{i}" if i else "")
        out = out or f"{name}_output_0"
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=name, **attrs))
        return out

    def const(self, scope, value, dtype):
        return self.op(scope, "Constant", [], value=numpy_helper.from_array(np.array(value, dtype)))

    def ints(self, scope, *vals):  # 1-D int64 Constant
        return self.const(scope, list(vals), np.int64)

    def unsqueeze(self, scope, x, *axes):
        return self.op(scope, "Unsqueeze", [x, self.ints(scope, *axes)])

    def weight(self, scope, name, a):
        """Add an initializer; with fp16 it is stored as float16 and cast to float32 once."""
        a = np.ascontiguousarray(a)
        if self.fp16:
            h = a.astype(np.float16)
            if not np.isfinite(h).all() and np.isfinite(a).all():
                die(f"{name}: a value overflows float16")
            a = h
        self.inits.append(numpy_helper.from_array(a, name))
        return self.op(scope, "Cast", [name], to=TensorProto.FLOAT) if self.fp16 else name

    def linear(self, scope, x, w, out=None):  # w: HF [out, in]; stored folded as [in, out]
        name = f"onnx::MatMul_{self.next_matmul}"
        self.next_matmul += 1
        return self.op(scope, "MatMul", [x, self.weight(scope, name, w.T)], out=out)

    def rmsnorm(self, scope, x, wname, w, eps):
        v = self.op(scope, "Pow", [x, self.const(scope, 2.0, np.float32)])
        if self.opset >= 18:
            v = self.op(scope, "ReduceMean", [v, self.ints(scope, -1)], keepdims=1)
        else:
            v = self.op(scope, "ReduceMean", [v], axes=[-1], keepdims=1)
        v = self.op(scope, "Add", [v, self.const(scope, eps, np.float32)])
        v = self.op(scope, "Sqrt", [v])
        v = self.op(scope, "Div", [self.const(scope, 1.0, np.float32), v])
        v = self.op(scope, "Mul", [x, v])
        return self.op(scope, "Mul", [self.weight(scope, wname, w), v])


def build(hp, weights, fp16, opset):
    g = Graph(fp16, opset)
    H, KV, D, eps = hp["heads"], hp["kv"], hp["hd"], hp["eps"]
    vocab = weights["model.embed_tokens.weight"].shape[0]
    m = "/model"

    # Embedding, dynamic dims, position ids.
    e = m + "/embed_tokens"
    x = g.op(e, "Gather", [g.weight(e, "model.embed_tokens.weight", weights["model.embed_tokens.weight"]),
                           "input_ids"], axis=0)
    shape = g.op(m, "Shape", ["input_ids"])
    batch = g.op(m, "Gather", [shape, g.const(m, 0, np.int64)], axis=0)
    seq = g.op(m, "Gather", [shape, g.const(m, 1, np.int64)], axis=0)
    batch_u, seq_u = g.unsqueeze(m, batch, 0), g.unsqueeze(m, seq, 0)
    pos = g.op(m, "Range", [g.const(m, 0, np.int64), seq, g.const(m, 1, np.int64)])
    pos = g.unsqueeze(m, pos, 0)  # [1, S]

    # Rotary cos/sin, computed once (HF LlamaRotaryEmbedding; attention_scaling 1.0).
    r = m + "/rotary_emb"
    inv_freq = (1.0 / (np.float32(hp["theta"]) ** (np.arange(0, D, 2).astype(np.float32) / np.float32(D))))
    g.inits.append(numpy_helper.from_array(inv_freq.astype(np.float32), "model.rotary_emb.inv_freq"))
    inv3 = g.unsqueeze(r, "model.rotary_emb.inv_freq", 0, 2)  # [1, D/2, 1]
    pos3 = g.op(r, "Cast", [g.unsqueeze(r, pos, 1)], to=TensorProto.FLOAT)  # [1, 1, S]
    freqs = g.op(r, "Transpose", [g.op(r, "MatMul", [inv3, pos3])], perm=[0, 2, 1])  # [1, S, D/2]
    emb = g.op(r, "Concat", [freqs, freqs], axis=-1)
    cos = g.op(r, "Mul", [g.op(r, "Cos", [emb]), g.const(r, 1.0, np.float32)])
    sin = g.op(r, "Mul", [g.op(r, "Sin", [emb]), g.const(r, 1.0, np.float32)])
    cos4, sin4 = g.unsqueeze(r, cos, 1), g.unsqueeze(r, sin, 1)  # [1, 1, S, D]

    # Causal mask [1, 1, S, S]: 0 on and below the diagonal, float32 min above.
    fmin = np.finfo(np.float32).min
    full = g.op(m, "ConstantOfShape", [g.op(m, "Concat", [seq_u, seq_u], axis=0)],
                value=numpy_helper.from_array(np.array([fmin], np.float32)))
    mask4 = g.unsqueeze(m, g.op(m, "Trilu", [full, g.const(m, 1, np.int64)], upper=1), 0, 1)

    def dims(sa, *parts):  # a runtime shape: Concat of the [1]-shaped dims and int64 Constants
        return g.op(sa, "Concat", [x if isinstance(x, str) else g.ints(sa, x) for x in parts], axis=0)

    def heads(sa, t, n):  # [B, S, n*D] -> [B, n, S, D]
        t = g.op(sa, "Reshape", [t, dims(sa, batch_u, seq_u, n, D)])
        return g.op(sa, "Transpose", [t], perm=[0, 2, 1, 3])

    def rope(sa, t):
        half = lambda a, b: g.op(sa, "Slice", [t, g.ints(sa, a), g.ints(sa, b), g.ints(sa, 3)])
        rot = g.op(sa, "Concat", [g.op(sa, "Neg", [half(D // 2, 2**63 - 1)]), half(0, D // 2)], axis=-1)
        return g.op(sa, "Add", [g.op(sa, "Mul", [t, cos4]), g.op(sa, "Mul", [rot, sin4])])

    def repeat_kv(sa, t):
        if H == KV:
            return t
        t = g.unsqueeze(sa, t, 2)
        t = g.op(sa, "Expand", [t, dims(sa, batch_u, KV, H // KV, seq_u, D)])
        return g.op(sa, "Reshape", [t, dims(sa, batch_u, H, seq_u, D)])

    for L in range(hp["layers"]):
        ls, sa, mlp = f"{m}/layers.{L}", f"{m}/layers.{L}/self_attn", f"{m}/layers.{L}/mlp"
        p = f"model.layers.{L}."
        h = g.rmsnorm(ls + "/input_layernorm", x, p + "input_layernorm.weight",
                      weights[p + "input_layernorm.weight"], eps)
        q = heads(sa, g.linear(sa + "/q_proj", h, weights[p + "self_attn.q_proj.weight"]), H)
        k = heads(sa, g.linear(sa + "/k_proj", h, weights[p + "self_attn.k_proj.weight"]), KV)
        v = heads(sa, g.linear(sa + "/v_proj", h, weights[p + "self_attn.v_proj.weight"]), KV)
        q, k = rope(sa, q), rope(sa, k)
        k, v = repeat_kv(sa, k), repeat_kv(sa, v)
        s = g.op(sa, "MatMul", [q, g.op(sa, "Transpose", [k], perm=[0, 1, 3, 2])])
        s = g.op(sa, "Add", [g.op(sa, "Mul", [s, g.const(sa, D ** -0.5, np.float32)]), mask4])
        a = g.op(sa, "MatMul", [g.op(sa, "Softmax", [s], axis=-1), v])
        a = g.op(sa, "Transpose", [a], perm=[0, 2, 1, 3])
        a = g.op(sa, "Reshape", [a, dims(sa, batch_u, seq_u, H * D)])
        x = g.op(ls, "Add", [x, g.linear(sa + "/o_proj", a, weights[p + "self_attn.o_proj.weight"])])

        h = g.rmsnorm(ls + "/post_attention_layernorm", x, p + "post_attention_layernorm.weight",
                      weights[p + "post_attention_layernorm.weight"], eps)
        gate = g.linear(mlp + "/gate_proj", h, weights[p + "mlp.gate_proj.weight"])
        silu = g.op(mlp + "/act_fn", "Mul", [gate, g.op(mlp + "/act_fn", "Sigmoid", [gate])])
        up = g.linear(mlp + "/up_proj", h, weights[p + "mlp.up_proj.weight"])
        dn = g.linear(mlp + "/down_proj", g.op(mlp, "Mul", [silu, up]), weights[p + "mlp.down_proj.weight"])
        x = g.op(ls, "Add", [x, dn])

    x = g.rmsnorm(m + "/norm", x, "model.norm.weight", weights["model.norm.weight"], eps)
    g.linear("/lm_head", x, weights["lm_head.weight"], out="logits")

    graph = helper.make_graph(
        g.nodes, "main_graph",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch_size", "sequence_length", vocab])],
        initializer=g.inits)
    model = helper.make_model(graph, producer_name="pytorch", producer_version="2.5.1",
                              opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("gguf")
    p.add_argument("out")
    p.add_argument("--dtype", choices=["f32", "f16"], default="f32")
    p.add_argument("--external-data", action="store_true")
    p.add_argument("--opset", type=int, choices=[17, 18], default=17)
    args = p.parse_args()
    data_name = os.path.basename(args.out) + ".data"
    data_path = os.path.join(os.path.dirname(args.out), data_name)
    if os.path.exists(args.out):
        die(f"{args.out} exists", 2)
    if args.external_data and os.path.exists(data_path):
        die(f"{data_path} exists", 2)

    hp, weights = load(args.gguf)
    model = build(hp, weights, args.dtype == "f16", args.opset)
    del weights
    if args.external_data:  # check by path (works past protobuf's 2 GB limit)
        onnx.save_model(model, args.out, save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data_name, size_threshold=0)
        onnx.checker.check_model(args.out, full_check=True)  # full_check: strict shape inference
    else:
        onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
        onnx.checker.check_model(model)
        onnx.save_model(model, args.out)
    n, n_init = len(model.graph.node), len(model.graph.initializer)
    ext = f", weights in {data_name}" if args.external_data else ""
    print(f"wrote {args.out}: {n} nodes, {n_init} initializers ({args.dtype}), opset {args.opset}, "
          f"{hp['layers']} layers{ext}")


if __name__ == "__main__":
    main()
