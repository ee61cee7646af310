"""Renders a chat template the way Hugging Face transformers does (`apply_chat_template`: jinja2's
ImmutableSandboxedEnvironment, trim_blocks and lstrip_blocks, raise_exception), for kiln's
template tests.

usage: python3 render_template.py TEMPLATE.jinja CASES.json
CASES.json: a list of {"messages": [...], "add_generation_prompt": bool, "bos_token": str,
"eos_token": str}; prints a JSON list of the rendered strings (or {"error": message}).
"""

import json
import sys

from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment


def raise_exception(message):
    raise TemplateError(message)


def main():
    source = open(sys.argv[1], encoding="utf-8").read()
    cases = json.load(open(sys.argv[2], encoding="utf-8"))
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    template = env.from_string(source)
    out = []
    for case in cases:
        try:
            out.append(template.render(**case))
        except TemplateError as e:
            out.append({"error": str(e)})
    print(json.dumps(out))


if __name__ == "__main__":
    main()
