"""llama.cpp (through llama-cpp-python) measured the way `chat bench` measures kiln.

Prefill: evaluate N pseudo-random tokens from an empty cache (logits of the last one).
Decode: after one token, evaluate D tokens one at a time. Medians over runs; one JSON object
per measurement on stdout. Usage: llama_cpp_bench.py GGUF THREADS PREFILL,LIST DECODE RUNS
"""
import json
import statistics
import sys
import time

from llama_cpp import Llama


def tokens(n, vocab):
    # The same xorshift sequence as examples/chat's bench_tokens.
    x = 0x243F6A8885A308D3
    out = []
    mask = (1 << 64) - 1
    for _ in range(n):
        x ^= (x << 13) & mask
        x ^= x >> 7
        x ^= (x << 17) & mask
        out.append(100 + x % (vocab - 100))
    return out


def main():
    path, threads, prefill, decode, runs = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
    sizes = [int(s) for s in prefill.split(",") if s]
    llm = Llama(model_path=path, n_ctx=2048, n_batch=512, n_ubatch=512, n_threads=threads,
                n_threads_batch=threads, logits_all=False, verbose=False)
    vocab = llm.n_vocab()

    def report(test, n, secs):
        rates = [n / s for s in secs]
        print(json.dumps({"engine": "llama.cpp", "test": test, "threads": threads, "tokens": n,
                          "runs": len(rates), "median_tok_s": round(statistics.median(rates), 2)}), flush=True)

    for n in sizes:
        toks = tokens(n, vocab)
        llm.reset(); llm.eval(toks)
        secs = []
        for _ in range(runs):
            llm.reset()
            t = time.perf_counter(); llm.eval(toks); secs.append(time.perf_counter() - t)
        report(f"pp{n}", n, secs)
    if decode > 0:
        toks = tokens(decode + 1, vocab)
        secs = []
        for run in range(runs + 1):
            llm.reset(); llm.eval(toks[:1])
            t = time.perf_counter()
            for tok in toks[1:]:
                llm.eval([tok])
            if run > 0:
                secs.append(time.perf_counter() - t)
        report(f"tg{decode}", decode, secs)


if __name__ == "__main__":
    main()
