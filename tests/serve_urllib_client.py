#!/usr/bin/env python3
"""`moelab serve` spoken to from Python's urllib (ctest ServeUrllib; the light tier's interpreter).

Starts the server on the bundled model on a free loopback port and checks, as a Python client sees them:
/v1/models and /health; a greedy completion, the same one streamed (server-sent events read line by line as
they arrive) with equal text; echo log-probabilities whose count matches usage; a chat completion; bad
requests as urllib.error.HTTPError with OpenAI's JSON error body (400 naming the field, 404, 413); and a
clean exit 0 on SIGTERM. Exit 0 when everything holds, 1 otherwise (each failure printed).

  python3 tests/serve_urllib_client.py --moelab build/moelab --model models/tiny-mixtral
"""
import argparse
import json
import re
import signal
import subprocess
import sys
import urllib.error
import urllib.request

failures = []


def check(cond, what):
    if not cond:
        failures.append(what)
        print("FAIL:", what)


def post(base, path, body, raw=None):
    data = raw if raw is not None else json.dumps(body).encode()
    req = urllib.request.Request(base + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--moelab", required=True)
    ap.add_argument("--model", required=True)
    a = ap.parse_args()
    proc = subprocess.Popen([a.moelab, "serve", "--model", a.model, "--port", "0", "--quiet", "--max-body", "65536"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    m = re.search(r"listening on (http://127\.0\.0\.1:\d+)/v1", line)
    if not m:
        proc.kill()
        print("FAIL: the server did not start:", line, proc.stderr.read())
        return 1
    base = m.group(1)
    try:
        with urllib.request.urlopen(base + "/v1/models", timeout=30) as r:
            models = json.loads(r.read())
        check(models["object"] == "list" and models["data"][0]["id"] == "tiny-mixtral", f"/v1/models: {models}")
        with urllib.request.urlopen(base + "/health", timeout=30) as r:
            check(json.loads(r.read()) == {"status": "ok"}, "/health")

        body = {"prompt": "int main(", "max_tokens": 24, "temperature": 0}
        status, whole = post(base, "/v1/completions", body)
        check(status == 200 and whole["object"] == "text_completion", f"completion: {status} {whole}")
        text = whole["choices"][0]["text"]
        check(whole["usage"]["total_tokens"] == whole["usage"]["prompt_tokens"] + whole["usage"]["completion_tokens"],
              "usage adds up")

        req = urllib.request.Request(base + "/v1/completions", data=json.dumps(dict(body, stream=True)).encode(),
                                     headers={"Content-Type": "application/json"})
        streamed, events, done = "", 0, False
        with urllib.request.urlopen(req, timeout=60) as r:
            check(r.headers.get("Content-Type") == "text/event-stream", "stream content type")
            for raw in r:  # line by line, as events arrive
                line = raw.decode().rstrip("\n")
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    break
                events += 1
                streamed += json.loads(line[6:])["choices"][0]["text"]
        check(done and events >= 2, f"stream ended with [DONE] after {events} events")
        check(streamed == text, f"streamed text {streamed!r} == {text!r}")

        status, echo = post(base, "/v1/completions", {"prompt": "The license", "max_tokens": 0, "echo": True,
                                                     "logprobs": 2})
        lp = echo["choices"][0]["logprobs"]
        check(status == 200 and echo["choices"][0]["text"] == "The license", "echo text")
        check(len(lp["token_logprobs"]) == echo["usage"]["prompt_tokens"] and lp["token_logprobs"][0] is None
              and all(v < 0 for v in lp["token_logprobs"][1:]), f"echo logprobs {lp['token_logprobs']}")

        status, chat = post(base, "/v1/chat/completions",
                            {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8, "temperature": 0})
        check(status == 200 and chat["choices"][0]["message"]["role"] == "assistant", f"chat: {chat}")

        for path, payload, raw, want, param in [
            ("/v1/completions", None, b'{"prompt": ', 400, None),
            ("/v1/completions", {"prompt": "x", "max_tokens": "5"}, None, 400, "max_tokens"),
            ("/v1/completions", {"prompt": [1, 2, 10**9]}, None, 400, "prompt"),
            ("/v1/completions", {"prompt": "x", "max_tokens": 100000}, None, 400, "max_tokens"),
            ("/v1/nothing", {}, None, 404, None),
            ("/v1/completions", None, b" " * 70000, 413, None),
        ]:
            status, err = post(base, path, payload, raw)
            check(status == want, f"{path} {payload if payload is not None else raw[:20]}: status {status}, want {want}")
            e = err.get("error", {})
            check(set(e) == {"message", "type", "param", "code"} and e["message"], f"error body {err}")
            if param:
                check(e["param"] == param, f"param {e.get('param')} want {param}")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            out, err = proc.communicate(timeout=30)
            check(proc.returncode == 0 and "moelab serve: stopped" in out, f"exit {proc.returncode}: {err}")
        except subprocess.TimeoutExpired:
            proc.kill()
            check(False, "no exit within 30 s of SIGTERM")
    print("ServeUrllib:", "ok" if not failures else f"{len(failures)} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
