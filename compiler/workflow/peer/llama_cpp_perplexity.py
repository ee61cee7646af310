"""llama.cpp's perplexity on a text, computed the way llama-perplexity does, through
llama-cpp-python (which has no llama-perplexity binary): the text is tokenized with the model's
tokenizer (BOS only when the model adds one, then the first token of every chunk becomes BOS),
split into non-overlapping chunks of CTX tokens, each evaluated from an empty cache in one batch,
and the tokens CTX/2+1 .. CTX-1 of each chunk are scored (log-softmax in f64).

usage: python3 llama_cpp_perplexity.py MODEL.gguf TEXT CTX THREADS
prints one JSON object: chunks, scored, perplexity, perplexity_err, text_tokens, seconds.
"""

import json
import sys
import time

import numpy as np
from llama_cpp import Llama


def main():
    model, text, ctx, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    llm = Llama(model_path=model, n_ctx=ctx, n_batch=ctx, n_ubatch=ctx, n_threads=threads,
                n_threads_batch=threads, logits_all=True, flash_attn=False, verbose=False)
    add_bos = llm._model.add_bos_token()
    tokens = llm.tokenize(open(text, "rb").read(), add_bos=add_bos, special=False)
    n_chunks = len(tokens) // ctx
    nll = []
    start = time.time()
    for c in range(n_chunks):
        chunk = list(tokens[c * ctx:(c + 1) * ctx])
        if add_bos:
            chunk[0] = llm.token_bos()
        llm.reset()
        llm.eval(chunk)
        logits = np.asarray(llm.scores[:ctx], dtype=np.float64)  # (ctx, vocab)
        for pos in range(ctx // 2, ctx - 1):
            row = logits[pos]
            m = row.max()
            lse = m + np.log(np.exp(row - m).sum())
            nll.append(lse - row[chunk[pos + 1]])
    seconds = time.time() - start
    nll = np.array(nll)
    mean = nll.mean()
    ppl = float(np.exp(mean))
    err = float(np.sqrt(((nll * nll).mean() - mean * mean) / (len(nll) - 1)) * ppl)
    print(json.dumps({"engine": "llama.cpp", "chunks": n_chunks, "scored": len(nll), "perplexity": ppl,
                      "perplexity_err": err, "text_tokens": len(tokens), "seconds": seconds}))


if __name__ == "__main__":
    main()
