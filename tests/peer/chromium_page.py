"""Opens a page in headless Chromium, driven over the DevTools protocol on a pipe
(`--remote-debugging-pipe`: NUL-terminated JSON on file descriptors 3 and 4, no extra
packages), waits until the element `#status` reads `done` or `error`, and prints as JSON the
status, the text of every `#log .turn` element (class and text), and the lengths the assistant's
answer had at each poll while it was still being written (evidence that it streamed).

usage: chromium_page.py URL TIMEOUT_SECONDS [BROWSER]
"""
import json
import os
import subprocess
import sys
import time

url, timeout = sys.argv[1], float(sys.argv[2])
browser = sys.argv[3] if len(sys.argv) > 3 else "chromium"

to_chrome_r, to_chrome_w = os.pipe()
from_chrome_r, from_chrome_w = os.pipe()


def child_fds():
    # Copies first: the pipes themselves may be numbered 3 or 4.
    a, b = os.dup(to_chrome_r), os.dup(from_chrome_w)
    os.dup2(a, 3)
    os.dup2(b, 4)
    os.set_inheritable(3, True)
    os.set_inheritable(4, True)


proc = subprocess.Popen(
    [browser, "--headless", "--no-sandbox", "--disable-gpu", "--remote-debugging-pipe", "about:blank"],
    preexec_fn=child_fds,
    close_fds=False,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
)
os.close(to_chrome_r)
os.close(from_chrome_w)
out = os.fdopen(to_chrome_w, "wb", buffering=0)
inp = os.fdopen(from_chrome_r, "rb", buffering=0)
buffered = b""
next_id = 0


def call(method, params=None, session=None):
    global buffered, next_id
    next_id += 1
    msg = {"id": next_id, "method": method, "params": params or {}}
    if session:
        msg["sessionId"] = session
    out.write(json.dumps(msg).encode() + b"\0")
    while True:
        while b"\0" not in buffered:
            chunk = inp.read(65536)
            if not chunk:
                raise SystemExit("chromium closed the pipe")
            buffered += chunk
        raw, buffered = buffered.split(b"\0", 1)
        reply = json.loads(raw)
        if reply.get("id") == next_id:
            if "error" in reply:
                raise SystemExit(f"{method}: {reply['error']}")
            return reply["result"]


try:
    target = call("Target.createTarget", {"url": url})["targetId"]
    session = call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
    probe = (
        "JSON.stringify({status: (document.getElementById('status') || {}).textContent || '',"
        " turns: Array.from(document.querySelectorAll('#log .turn')).map(d => [d.className, d.textContent])})"
    )
    deadline = time.time() + timeout
    partial = []
    state = {"status": "", "turns": []}
    while time.time() < deadline:
        value = call("Runtime.evaluate", {"expression": probe, "returnByValue": True}, session)
        state = json.loads(value["result"].get("value") or "{}")
        if state.get("status") in ("done", "error"):
            break
        answers = [t for c, t in state.get("turns", []) if "assistant" in c]
        if answers and answers[-1]:
            partial.append(len(answers[-1]))
        time.sleep(0.05)
    state["partial_lengths"] = partial
    print(json.dumps(state))
finally:
    try:
        call("Browser.close")
    except BaseException:
        pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
