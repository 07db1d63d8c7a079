#!/usr/bin/env python3
"""Parity oracle for moelab's eval scoring (heavy tier: needs .venv with lm-eval 0.4.9.2).

Runs lm-evaluation-harness (python API, model "hf", float32, CPU) on the fixture model
tests/fixtures/models/mixtral-4e-gqa-f32 over the local-file tasks in tests/fixtures/evals/tasks
(nothing from a hub), and writes, per task, every request's arguments, the per-request results
(log-likelihood and is_greedy, rolling log-likelihood, generated text), the filtered responses,
the per-sample metrics and the aggregated metrics to tests/fixtures/evals/parity/<task>.json.
tests/test_evals.cpp replays them with moelab's reference engine.

Run from the repository root:  .venv/bin/python scripts/eval_parity.py
"""
import json
import os
import shutil
import sys
import tempfile

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = os.path.join(ROOT, "tests/fixtures/models/mixtral-4e-gqa-f32")
TASKS_DIR = os.path.join(ROOT, "tests/fixtures/evals/tasks")
OUT_DIR = os.path.join(ROOT, "tests/fixtures/evals/parity")
TASKS = ["parity_mc", "parity_mc_fewshot", "parity_wino", "parity_rolling", "parity_gen"]


def model_copy(tmp):
    """The fixture folder has only tokenizer.model; AutoTokenizer would pick mistral-common's
    tokenizer for model_type mixtral. A temporary copy with a tokenizer_config.json selects the
    slow LlamaTokenizer (legacy, BOS added, no EOS), which is sentencepiece's encoding exactly
    (the script checks this)."""
    d = os.path.join(tmp, "model")
    shutil.copytree(MODEL, d)
    with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "LlamaTokenizer", "legacy": True, "add_bos_token": True,
                   "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>",
                   "unk_token": "<unk>", "clean_up_tokenization_spaces": False}, f)
    return d


def check_tokenizer(model_dir):
    import sentencepiece as spm
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(model_dir, use_fast=False)
    sp = spm.SentencePieceProcessor(model_file=os.path.join(model_dir, "tokenizer.model"))
    assert type(tok).__name__ == "LlamaTokenizer", type(tok).__name__
    for s in ["The license grants permission to copy.", " free", "Question: a?\nAnswer:", "  x  y"]:
        assert tok.encode(s) == [sp.bos_id()] + sp.encode(s), s


def patch_task_logging(lm_eval_tasks):
    """0.4.9.2 logs each selected task's YAML path relative to its own tasks folder and raises
    ValueError for a task from include_path; log the absolute path instead."""
    import pathlib

    class _Path(type(pathlib.Path())):
        def relative_to(self, *other, **kw):
            try:
                return super().relative_to(*other, **kw)
            except ValueError:
                return self

    lm_eval_tasks.Path = _Path


def save_lm_eval_output(tracker, out, tmp):
    """The harness's files as `lm_eval --output_path DIR --log_samples` writes them, copied to
    tests/fixtures/evals/lm_eval_output/ (the folder named after the model is the temporary copy's path,
    sanitized; it is renamed to "fixture-model"). scripts/check_lm_eval_format.py compares moelab's files
    with these, field by field."""
    import copy
    import glob
    results = {k: v for k, v in out.items() if k != "samples"}
    samples = copy.deepcopy(out["samples"])  # save_results_samples rewrites records in place
    tracker.save_results_aggregated(results=copy.deepcopy(results), samples=samples)
    for task in results["configs"]:
        tracker.save_results_samples(task_name=task, samples=copy.deepcopy(samples[task]))
    dest = os.path.join(ROOT, "tests/fixtures/evals/lm_eval_output/fixture-model")
    shutil.rmtree(dest, ignore_errors=True)
    os.makedirs(dest)
    for f in glob.glob(os.path.join(tmp, "lm_eval_output", "*", "*.json*")):
        shutil.copy(f, dest)


def main():
    import lm_eval
    import lm_eval.tasks
    patch_task_logging(lm_eval.tasks)
    os.chdir(ROOT)  # the task YAMLs name their data files relative to the repository root
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = model_copy(tmp)
        check_tokenizer(model_dir)
        tm = lm_eval.tasks.TaskManager(include_path=TASKS_DIR, include_defaults=False)
        # The tracker is what `lm_eval --output_path DIR --log_samples` uses: it writes the harness's own
        # results_<date>.json and samples_<task>_<date>.jsonl, kept as the reference for moelab's files.
        from lm_eval.loggers import EvaluationTracker
        tracker = EvaluationTracker(output_path=os.path.join(tmp, "lm_eval_output"))
        out = lm_eval.simple_evaluate(
            model="hf",
            model_args=f"pretrained={model_dir},dtype=float32,use_fast_tokenizer=False",
            tasks=TASKS, task_manager=tm, device="cpu", batch_size=1, log_samples=True,
            evaluation_tracker=tracker,
            random_seed=0, numpy_random_seed=1234, torch_random_seed=1234, fewshot_random_seed=1234,
            bootstrap_iters=1000)  # mean: closed-form stderr; nothing here is bootstrapped
        save_lm_eval_output(tracker, out, tmp)
    os.makedirs(OUT_DIR, exist_ok=True)
    for task in TASKS:
        samples = []
        for s in out["samples"][task]:
            samples.append({
                "doc_id": s["doc_id"],
                "doc": s["doc"],
                "target": s["target"],
                "arguments": [list(a) if not isinstance(a, dict) else a for a in
                              [x for x in s["arguments"]]],
                "resps": s["resps"],
                "filtered_resps": s["filtered_resps"],
                "filter": s.get("filter", "none"),
                "metrics": {m: s[m] for m in s.get("metrics", []) if m in s},
                # lm-eval's own hashes (evaluator.evaluate): moelab's records must carry the same
                "doc_hash": s["doc_hash"],
                "prompt_hash": s["prompt_hash"],
                "target_hash": s["target_hash"],
            })
        res = {k: v for k, v in out["results"][task].items() if k != "alias"}
        doc = {
            "generated_by": "scripts/eval_parity.py",
            "lm_eval_version": lm_eval.__version__ if hasattr(lm_eval, "__version__") else "0.4.9.2",
            "model": "tests/fixtures/models/mixtral-4e-gqa-f32 (hf, float32, cpu, batch_size 1)",
            "task": task,
            "n-shot": out["n-shot"][task],
            "results": res,
            "samples": samples,
        }
        with open(os.path.join(OUT_DIR, task + ".json"), "w") as f:
            json.dump(doc, f, indent=1, ensure_ascii=False, default=str)
            f.write("\n")
        print(task, json.dumps(res))


if __name__ == "__main__":
    sys.exit(main())
