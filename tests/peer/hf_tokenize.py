#!/usr/bin/env python3
"""Tokenizes strings with Hugging Face's `tokenizers` package, reading a `tokenizer.json`.

Usage: hf_tokenize.py TOKENIZER_JSON < strings.json > ids.json

stdin: a JSON list of strings. stdout: a JSON list with, for each string, the token ids the
`tokenizers` package produces for it as transformers calls it by default
(`add_special_tokens=True`: the tokenizer's own post-processor applies; special tokens written
in the text are parsed as such). Used by kiln's checkpoint tests as the reference for a Hugging
Face checkpoint's tokenizer.
"""

import json
import sys


def main() -> int:
    if len(sys.argv) != 2:
        print("usage: hf_tokenize.py TOKENIZER_JSON < strings.json", file=sys.stderr)
        return 2
    from tokenizers import Tokenizer

    strings = json.load(sys.stdin)
    if not isinstance(strings, list) or not all(isinstance(s, str) for s in strings):
        print("stdin must be a JSON list of strings", file=sys.stderr)
        return 2
    tok = Tokenizer.from_file(sys.argv[1])
    out = [tok.encode(s, add_special_tokens=True).ids for s in strings]
    json.dump(out, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
