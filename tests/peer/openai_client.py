"""Talks to an OpenAI-compatible server with the official `openai` client (pinned in
xtask's PYTHON_PEERS) and prints what it got as one JSON object.

usage: openai_client.py BASE_URL   (e.g. http://127.0.0.1:8080)
"""
import json
import sys

import openai

base = sys.argv[1]
client = openai.OpenAI(base_url=base + "/v1", api_key="not-needed", max_retries=0, timeout=300)
question = [{"role": "user", "content": "What is the capital of France?"}]
out = {}

models = client.models.list()
model = models.data[0].id
out["models"] = [m.id for m in models.data]

r = client.chat.completions.create(
    model=model, messages=question, max_tokens=24, temperature=0, logprobs=True, top_logprobs=2
)
choice = r.choices[0]
out["chat"] = {
    "content": choice.message.content,
    "role": choice.message.role,
    "finish_reason": choice.finish_reason,
    "usage": r.usage.model_dump(),
    "logprobs": [c.logprob for c in choice.logprobs.content],
    "tokens": [c.token for c in choice.logprobs.content],
    "top": [[t.logprob for t in c.top_logprobs] for c in choice.logprobs.content],
}

pieces, usage, finish = [], None, None
stream = client.chat.completions.create(
    model=model,
    messages=question,
    max_tokens=24,
    temperature=0,
    stream=True,
    stream_options={"include_usage": True},
)
for chunk in stream:
    if chunk.usage is not None:
        usage = chunk.usage.model_dump()
    for c in chunk.choices:
        if c.delta.content:
            pieces.append(c.delta.content)
        if c.finish_reason:
            finish = c.finish_reason
out["stream"] = {"pieces": len(pieces), "content": "".join(pieces), "usage": usage, "finish_reason": finish}

c = client.completions.create(model=model, prompt="The capital of France is", max_tokens=8, temperature=0, stop=["."])
out["completion"] = {"text": c.choices[0].text, "finish_reason": c.choices[0].finish_reason}

for name, call, kind in [
    ("unknown_model", lambda: client.chat.completions.create(model="no-such-model", messages=question), openai.NotFoundError),
    ("bad_top_p", lambda: client.chat.completions.create(model=model, messages=question, top_p=0), openai.BadRequestError),
]:
    try:
        call()
        out[name] = {"accepted": True}
    except kind as e:
        out[name] = {"status": e.status_code, "message": e.message}

print(json.dumps(out))
