#!/usr/bin/env python3
"""lm-evaluation-harness as a client of `moelab serve` (heavy tier: lm-eval 0.4.9.2 with its API extras).

Starts `moelab serve` on the fixture model tests/fixtures/models/mixtral-4e-gqa-f32 (engine ref, a free
loopback port) and runs the local-file parity tasks of tests/fixtures/evals/tasks (multiple choice 0- and
2-shot, WinoGrande partial scoring, rolling perplexity, greedy generation with GSM8K's filters) through
lm-eval's `local-completions` model against it, and through lm-eval's `hf` model on the same checkpoint.
Writes, per task, both runs' per-sample arguments, responses, filtered responses and metrics, and the
aggregated metrics, to tests/fixtures/serve/lm_eval/<task>.json. tests/test_serve_lm_eval.cpp scores the
same tasks with moelab's own evals and checks all three agree (ctest ServeLmEvalParity.*).

Settings that make the three comparable (every one is recorded in the output):
- Tokenization: local-completions with tokenizer_backend=huggingface on the same slow LlamaTokenizer as
  the hf run (a temporary copy of the model folder with a tokenizer_config.json, as scripts/eval_parity.py
  does), add_bos_token=True (the hf model's default for this tokenizer, and moelab's), and
  tokenized_requests=True: the server receives the harness's token ids. (tokenizer_backend=None cannot
  run loglikelihood tasks: lm-eval asserts a tokenizer to find the context length.)
- Context: local-completions always asks for one generated token after an echoed prompt, so with
  max_length=64 (the model's context) it sends at most 63 prompt tokens and windows rolling documents at
  62 predicted tokens. The hf run gets max_length=62 and moelab's evals a 62-token context, which give the
  same truncation and the same windows.

Run from the repository root:  /tmp/hv/bin/python scripts/serve_lm_eval_parity.py [--moelab build/moelab]
"""
import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import eval_parity  # noqa: E402  (model_copy, check_tokenizer, patch_task_logging, TASKS)

MODEL = eval_parity.MODEL
TASKS_DIR = eval_parity.TASKS_DIR
OUT_DIR = os.path.join(ROOT, "tests/fixtures/serve/lm_eval")
TASKS = eval_parity.TASKS
MODEL_NAME = "mixtral-4e-gqa-f32"
SERVER_MAX_LENGTH = 64  # local-completions' max_length: the server's context
EVAL_CONTEXT = 62       # what the hf run and moelab's evals get (see the docstring)


def start_server(moelab):
    proc = subprocess.Popen([moelab, "serve", "--model", MODEL, "--port", "0", "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    m = re.search(r"listening on (http://127\.0\.0\.1:\d+)/v1", line)
    if not m:
        proc.kill()
        raise SystemExit(f"moelab serve did not start: {line!r} {proc.stderr.read()!r}")
    return proc, m.group(1)


def stop_server(proc):
    proc.terminate()
    try:
        out, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise SystemExit("moelab serve did not stop within 30 s of SIGTERM")
    if proc.returncode != 0:
        raise SystemExit(f"moelab serve exited {proc.returncode}: {err}")
    return err


def evaluate(model, model_args, tm):
    import lm_eval
    return lm_eval.simple_evaluate(
        model=model, model_args=model_args, tasks=TASKS, task_manager=tm, device="cpu", batch_size=1,
        log_samples=True, random_seed=0, numpy_random_seed=1234, torch_random_seed=1234,
        fewshot_random_seed=1234, bootstrap_iters=1000)


def task_record(out, task):
    samples = []
    for s in out["samples"][task]:
        samples.append({
            "doc_id": s["doc_id"],
            "arguments": [list(a) if not isinstance(a, dict) else a for a in s["arguments"]],
            "resps": s["resps"],
            "filtered_resps": s["filtered_resps"],
            "filter": s.get("filter", "none"),
            "metrics": {m: s[m] for m in s.get("metrics", []) if m in s},
            "doc_hash": s["doc_hash"],
            "prompt_hash": s["prompt_hash"],
            "target_hash": s["target_hash"],
        })
    return {"results": {k: v for k, v in out["results"][task].items() if k != "alias"},
            "n-shot": out["n-shot"][task], "samples": samples}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--moelab", default=os.path.join(ROOT, "build/moelab"))
    args = ap.parse_args()
    import lm_eval
    import lm_eval.tasks
    eval_parity.patch_task_logging(lm_eval.tasks)
    os.chdir(ROOT)  # the task YAMLs name their data files relative to the repository root
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = eval_parity.model_copy(tmp)
        eval_parity.check_tokenizer(model_dir)
        tm = lm_eval.tasks.TaskManager(include_path=TASKS_DIR, include_defaults=False)
        proc, base = start_server(args.moelab)
        try:
            served_args = (f"model={MODEL_NAME},base_url={base}/v1/completions,tokenizer_backend=huggingface,"
                           f"tokenizer={model_dir},use_fast_tokenizer=False,add_bos_token=True,"
                           f"tokenized_requests=True,max_length={SERVER_MAX_LENGTH},num_concurrent=1,"
                           f"max_retries=1,timeout=120")
            served = evaluate("local-completions", served_args, tm)
            metrics = subprocess.run(["curl", "-s", f"{base}/metrics"], capture_output=True, text=True).stdout
        finally:
            server_log = stop_server(proc)
        hf_args = f"pretrained={model_dir},dtype=float32,use_fast_tokenizer=False,max_length={EVAL_CONTEXT}"
        hf = evaluate("hf", hf_args, tm)
    requests = {m.group(1): int(m.group(2)) for m in re.finditer(
        r'moelab_requests_total\{endpoint="([^"]+)",status="200"\} (\d+)', metrics)}
    os.makedirs(OUT_DIR, exist_ok=True)
    for task in TASKS:
        doc = {
            "generated_by": "scripts/serve_lm_eval_parity.py",
            "lm_eval_version": lm_eval.__version__ if hasattr(lm_eval, "__version__") else "0.4.9.2",
            "task": task,
            "local-completions": {"model_args": re.sub(r"base_url=[^,]+", "base_url=http://127.0.0.1:PORT/v1/completions",
                                                       served_args).replace(model_dir, "MODEL_COPY"),
                                  "server": f"moelab serve --model tests/fixtures/models/{MODEL_NAME} (engine ref)",
                                  **task_record(served, task)},
            "hf": {"model_args": hf_args.replace(model_dir, "MODEL_COPY"), **task_record(hf, task)},
            "moelab_context": EVAL_CONTEXT,
        }
        with open(os.path.join(OUT_DIR, task + ".json"), "w") as f:
            json.dump(doc, f, indent=1, ensure_ascii=False, default=str)
            f.write("\n")
        print(task, "local-completions", json.dumps(doc["local-completions"]["results"]))
        print(task, "hf               ", json.dumps(doc["hf"]["results"]))
    print("server requests answered with 200:", requests)
    if not requests.get("/v1/completions"):
        raise SystemExit("the server answered no completion request")
    return 0


if __name__ == "__main__":
    sys.exit(main())
