#!/usr/bin/env python3
"""Requests/s and tokens/s of `moelab serve` against client concurrency, with the server's own overhead.

Starts `moelab serve` (a free loopback port; the bundled model and engine ref unless told otherwise), then for
each concurrency C sends N completion requests from C client threads (keep-alive connections, greedy,
max_tokens tokens each) and reports: requests/s and generated tokens/s over the wall time, client latency
(p50, p95), and from the server's /metrics over the same interval the engine's time per request and the
server's own time per request outside the engine and the queue (moelab_request_overhead_seconds: reading
and parsing, tokenizing, checking, building the answer). Requests run one at a time on the engine
(batching is a later step), so throughput stays flat as concurrency grows and latency grows with the queue.

Python's standard library only (no .venv needed):
  python3 scripts/bench_serve.py [--moelab build/moelab] [--model DIR] [--engine ref] [--concurrency 1,2,4,8]
                                 [--requests 64] [--max-tokens 32] [--json out.json] [-- extra serve options]
"""
import argparse
import http.client
import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ["int main(", "The license", "Subject:", "#!/bin/sh", "def parse(", "The quick brown fox"]


def metrics(port):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    c.request("GET", "/metrics")
    text = c.getresponse().read().decode()
    c.close()
    def value(name):
        m = re.search(r"^" + re.escape(name) + r" ([0-9.e+-]+)$", text, re.M)
        return float(m.group(1)) if m else 0.0
    return {k: value(k) for k in ["moelab_engine_seconds_total", "moelab_request_overhead_seconds_sum",
                                  "moelab_request_overhead_seconds_count", "moelab_queue_wait_seconds_sum",
                                  "moelab_queue_wait_seconds_count", "moelab_generated_tokens_total"]}


def run_level(port, concurrency, requests, max_tokens):
    latencies, tokens, errors = [], [0], [0]
    lock = threading.Lock()
    per = [requests // concurrency + (1 if i < requests % concurrency else 0) for i in range(concurrency)]

    def client(i):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        for k in range(per[i]):
            body = json.dumps({"prompt": PROMPTS[(i + k) % len(PROMPTS)], "max_tokens": max_tokens,
                               "temperature": 0})
            t0 = time.perf_counter()
            conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
            r = conn.getresponse()
            data = r.read()
            dt = time.perf_counter() - t0
            with lock:
                if r.status != 200:
                    errors[0] += 1
                    continue
                latencies.append(dt)
                tokens[0] += json.loads(data)["usage"]["completion_tokens"]
        conn.close()

    before = metrics(port)
    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    after = metrics(port)
    d = {k: after[k] - before[k] for k in after}
    n = max(1.0, d["moelab_request_overhead_seconds_count"])
    lat = sorted(latencies)
    return {
        "concurrency": concurrency, "requests": len(latencies), "errors": errors[0], "wall_s": wall,
        "requests_per_s": len(latencies) / wall, "tokens_per_s": tokens[0] / wall,
        "latency_p50_ms": 1e3 * statistics.median(lat) if lat else 0,
        "latency_p95_ms": 1e3 * lat[min(len(lat) - 1, int(0.95 * len(lat)))] if lat else 0,
        "engine_ms_per_request": 1e3 * d["moelab_engine_seconds_total"] / n,
        "queue_wait_ms_per_request": 1e3 * d["moelab_queue_wait_seconds_sum"] / max(1.0, d["moelab_queue_wait_seconds_count"]),
        "server_overhead_ms_per_request": 1e3 * d["moelab_request_overhead_seconds_sum"] / n,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--moelab", default=os.path.join(ROOT, "build/moelab"))
    ap.add_argument("--model", default=None)
    ap.add_argument("--engine", default="ref")
    ap.add_argument("--concurrency", default="1,2,4,8")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--json", default=None)
    ap.add_argument("serve_args", nargs="*", help="more `moelab serve` options (after --)")
    a = ap.parse_args()
    cmd = [a.moelab, "serve", "--port", "0", "--quiet", "--max-queue", "1024", "--engine", a.engine] + a.serve_args
    if a.model:
        cmd += ["--model", a.model]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    m = re.search(r"listening on http://127\.0\.0\.1:(\d+)/v1 \((.*)\)", line)
    if not m:
        proc.kill()
        raise SystemExit(f"moelab serve did not start: {line!r} {proc.stderr.read()!r}")
    port, what = int(m.group(1)), m.group(2)
    try:
        run_level(port, 1, 4, a.max_tokens)  # warm-up
        rows = [run_level(port, int(c), a.requests, a.max_tokens) for c in a.concurrency.split(",")]
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    print(f"moelab serve: {what}; {a.requests} requests per level, max_tokens {a.max_tokens}, greedy")
    print("| clients | requests/s | tokens/s | latency p50 ms | p95 ms | engine ms/req | queue wait ms/req | server overhead ms/req | errors |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['concurrency']} | {r['requests_per_s']:.1f} | {r['tokens_per_s']:.0f} | {r['latency_p50_ms']:.1f} | "
              f"{r['latency_p95_ms']:.1f} | {r['engine_ms_per_request']:.2f} | {r['queue_wait_ms_per_request']:.1f} | "
              f"{r['server_overhead_ms_per_request']:.3f} | {r['errors']} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"server": what, "max_tokens": a.max_tokens, "levels": rows}, f, indent=1)
    return 1 if any(r["errors"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
