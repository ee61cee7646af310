#!/usr/bin/env python3
"""Tokenizes strings with llama.cpp's own tokenizer (via llama-cpp-python), reading the GGUF.

Usage: llama_tokenize.py MODEL.gguf < strings.json > ids.json

stdin: a JSON list of strings. stdout: a JSON list with, for each string, the list of token
ids llama.cpp produces for it, without BOS and with special tokens written in the text parsed
as such (`special=True`). Only the vocabulary is loaded (`vocab_only=True`), so this is fast
and needs no weights in memory. Used by kiln's `tokenizer_matches_llama_cpp` test as an
independent peer implementation of the tokenizer.
"""

import json
import sys


def main() -> int:
    if len(sys.argv) != 2:
        print("usage: llama_tokenize.py MODEL.gguf < strings.json", file=sys.stderr)
        return 2
    import llama_cpp

    strings = json.load(sys.stdin)
    if not isinstance(strings, list) or not all(isinstance(s, str) for s in strings):
        print("stdin must be a JSON list of strings", file=sys.stderr)
        return 2
    llm = llama_cpp.Llama(model_path=sys.argv[1], vocab_only=True, verbose=False)
    out = [llm.tokenize(s.encode("utf-8"), add_bos=False, special=True) for s in strings]
    json.dump(out, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
