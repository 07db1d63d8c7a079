#!/usr/bin/env python3
"""The lm-eval format test: moelab's results and per-sample files, read by lm-evaluation-harness 0.4.9.2's
own code and compared with the files the harness itself wrote for the same tasks.

  .venv/bin/python scripts/check_lm_eval_format.py --moelab build/moelab

Runs `moelab eval --output_path DIR --log_samples` on the fixture model for four tasks of the three output
types (multiple choice, partial-scoring multiple choice, rolling log-likelihood, generation), then:
  1. lm-eval's file readers (lm_eval.utils: get_results_filenames, get_sample_results_filenames,
     get_file_task_name, get_file_datetime, get_latest_filename) find our files and read their names as they
     read their own;
  2. its make_table renders our results, with the rows (task, filter, n-shot, metric, direction) the
     harness's own results give for the same tasks;
  3. every field of the harness's results file (tests/fixtures/evals/lm_eval_output/, written by
     scripts/eval_parity.py with the pinned heavy tier) is in ours, in the same order, with the same JSON
     type, except the fields listed in DIFFERS below; per task the same result keys, higher_is_better,
     n-shot, n-samples and task_hashes (equal hashes: the same documents, prompts and targets);
  4. every per-sample record has the harness's fields in the harness's order, equal doc, target, prompt,
     filter, metric names and hashes, and responses written as the harness writes them (str() of each value).
Needs only the light tier (lm-eval installed without its dependencies: lm_eval.utils imports numpy, yaml,
jinja2, requests; make_table pytablewriter). Exit 0: all hold; 1: a difference (each printed); 77: lm-eval
is not importable (skipped, with the reason).
"""
import argparse
import copy
import glob
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests/fixtures")
MODEL = os.path.join(FIXTURES, "models/mixtral-4e-gqa-f32")
HARNESS_OUTPUT = os.path.join(FIXTURES, "evals/lm_eval_output/fixture-model")

# moelab task -> (its data, the harness's parity task run on the same documents by scripts/eval_parity.py)
TASKS = {
    "multiple_choice": ("evals/tasks/mc_test.jsonl", "parity_mc"),
    "winogrande": ("evals/tasks/wino_test.jsonl", "parity_wino"),
    "rolling": ("evals/tasks/rolling_test.jsonl", "parity_rolling"),
    "generate": ("evals/tasks/gen_test.jsonl", "parity_gen"),
}

# Top-level fields whose value is the harness's own environment, which a moelab run does not have: null in
# ours where the harness writes a string (docs/evals.md).
DIFFERS = {"transformers_version", "lm_eval_version", "upper_git_hash"}
# config fields only the harness's HF model adds (HFLM.get_model_info).
HF_ONLY_CONFIG = {"model_num_parameters", "model_dtype", "model_revision", "model_sha"}
# Per-sample fields moelab adds after the harness's: the rolling windows, HumanEval's sandbox runs.
OURS_ONLY_SAMPLE = {"windows", "runs"}

failures = []


def check(ok, what):
    if not ok:
        failures.append(what)
        print("FAIL:", what)


def json_type(v):
    return "null" if v is None else type(v).__name__


def leaves(v):
    if isinstance(v, list):
        for x in v:
            yield from leaves(x)
    else:
        yield v


def table_rows(markdown):
    """make_table's rows as (task, filter, n-shot, metric, direction), the task carried down blank cells."""
    rows, task = [], None
    for line in markdown.splitlines()[2:]:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 9:
            continue
        task = cells[0] or task
        rows.append((task, cells[2], cells[3], cells[4], cells[5]))
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--moelab", required=True, help="the moelab binary")
    args = ap.parse_args()
    try:
        import lm_eval
        import lm_eval.utils as U
        import pytablewriter  # noqa: F401  (make_table's)
    except ImportError as e:
        print(f"SKIP: lm-eval's reading code is not importable ({e}); scripts/setup.sh installs it into .venv")
        return 77
    check(lm_eval.__version__ == "0.4.9.2", f"lm-eval {lm_eval.__version__}, pinned 0.4.9.2")

    (theirs_results_path,) = glob.glob(os.path.join(HARNESS_OUTPUT, "results_*.json"))
    theirs = json.load(open(theirs_results_path, encoding="utf-8"))

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "out")
        cmd = [args.moelab, "eval", "--model", MODEL, "--tasks", ",".join(TASKS), "--output_path", out,
               "--log_samples", "--progress", "none"]
        for data, _ in TASKS.values():
            cmd += ["--data", os.path.join(FIXTURES, data)]
        run = subprocess.run(cmd, capture_output=True, text=True)
        if run.returncode != 0:
            print(run.stdout, run.stderr)
            print("FAIL: moelab eval exited", run.returncode)
            return 1
        files = sorted(glob.glob(os.path.join(out, "*", "*")))

        # 1. The harness's readers on our files.
        results_files = U.get_results_filenames(files)
        sample_files = U.get_sample_results_filenames(files)
        check(len(results_files) == 1, f"get_results_filenames found {results_files} in {files}")
        check(len(sample_files) == len(TASKS), f"get_sample_results_filenames found {sample_files}")
        names = {U.get_file_task_name(os.path.basename(f)): f for f in sample_files}
        check(sorted(names) == sorted(TASKS), f"get_file_task_name read {sorted(names)}")
        dates = {U.get_file_datetime(os.path.basename(f)) for f in sample_files}
        check(len(dates) == 1, f"samples files of one run carry one date, got {dates}")
        check(U.get_file_datetime(os.path.basename(results_files[0])) == dates.pop() + ".json",
              "the results file's date is the samples files'")
        check(U.get_latest_filename(sample_files) in sample_files, "get_latest_filename")
        model_folder = os.path.basename(os.path.dirname(results_files[0]))
        check(model_folder == U.sanitize_model_name(MODEL), f"folder {model_folder}: sanitize_model_name(model)")
        ours = json.load(open(results_files[0], encoding="utf-8"))

        # 2. make_table.
        mapped = {h: t for t, (_, h) in TASKS.items()}
        our_rows = table_rows(U.make_table(copy.deepcopy(ours)))
        their_rows = [(mapped[r[0]],) + r[1:] for r in table_rows(U.make_table(copy.deepcopy(theirs)))
                      if r[0] in mapped]
        check(sorted(our_rows) == sorted(their_rows), f"make_table rows\n ours   {sorted(our_rows)}\n theirs {sorted(their_rows)}")
        print(U.make_table(copy.deepcopy(ours)))

        # 3. The results document.
        their_keys = list(theirs)
        our_keys = [k for k in ours if k in theirs]
        check(our_keys == their_keys, f"top-level fields in the harness's order\n ours   {list(ours)}\n theirs {their_keys}")
        check(set(ours) - set(theirs) <= {"reported"}, f"fields only ours: {set(ours) - set(theirs)}")
        for k in their_keys:
            if k in ours and k not in DIFFERS:
                check(json_type(ours[k]) == json_type(theirs[k]),
                      f"{k}: {json_type(ours[k])} in ours, {json_type(theirs[k])} in the harness's")
        check(set(theirs["config"]) - HF_ONLY_CONFIG <= set(ours["config"]),
              f"config fields missing: {set(theirs['config']) - HF_ONLY_CONFIG - set(ours['config'])}")
        for task, (_, h) in TASKS.items():
            for section in ("higher_is_better", "n-shot", "n-samples", "task_hashes", "group_subtasks"):
                check(ours[section].get(task) == theirs[section].get(h),
                      f"{section}[{task}] {ours[section].get(task)} vs the harness's {theirs[section].get(h)}")
            check(sorted(ours["results"][task]) == sorted(theirs["results"][h]),
                  f"results[{task}] keys {sorted(ours['results'][task])} vs {sorted(theirs['results'][h])}")
            extra = set(ours["configs"][task]) - set(theirs["configs"][h]) - {"dataset_name", "fewshot_split", "fewshot_config"}
            check(not extra, f"configs[{task}] fields the harness's task config lacks: {extra}")
        check(list(ours["results"]) == sorted(ours["results"]), "results sorted by task, as the harness's")

        # 4. Per-sample records.
        for task, (_, h) in TASKS.items():
            mine = [json.loads(l) for l in open(names[task], encoding="utf-8")]
            (their_file,) = glob.glob(os.path.join(HARNESS_OUTPUT, f"samples_{h}_2*.jsonl"))
            ref = [json.loads(l) for l in open(their_file, encoding="utf-8")]
            check(len(mine) == len(ref), f"{task}: {len(mine)} records, the harness's {len(ref)}")
            for a, b in zip(mine, ref):
                where = f"{task} doc {b['doc_id']} filter {b['filter']}"
                check([k for k in a if k not in OURS_ONLY_SAMPLE] == list(b), f"{where}: fields {list(a)} vs {list(b)}")
                same = ["doc_id", "doc", "target", "filter", "metrics", "doc_hash", "prompt_hash", "target_hash"]
                for k in same:
                    check(a.get(k) == b.get(k), f"{where}: {k} {a.get(k)!r} vs {b.get(k)!r}")
                # The prompt exactly; the generation settings (arg_1) are the task's own (generate: gsm8k's).
                check(a["arguments"].keys() == b["arguments"].keys(), f"{where}: arguments {list(a['arguments'])}")
                for g in b["arguments"]:
                    check(a["arguments"][g]["arg_0"] == b["arguments"][g]["arg_0"], f"{where}: {g} arg_0")
                    if task != "generate":
                        check(a["arguments"][g] == b["arguments"][g], f"{where}: {g}")
                for k in ("resps", "filtered_resps"):
                    la, lb = list(leaves(a[k])), list(leaves(b[k]))
                    check(all(isinstance(x, str) for x in la), f"{where}: {k} leaves are strings, as str() writes them")
                    check(len(la) == len(lb), f"{where}: {k} shape {a[k]} vs {b[k]}")
                    if task == "generate":
                        continue  # generated text: the task's stop strings and length differ from parity_gen's
                    for x, y in zip(la, lb):
                        try:
                            check(abs(float(x) - float(y)) <= 1e-3, f"{where}: {k} {x} vs {y}")
                        except ValueError:
                            check(x == y, f"{where}: {k} {x!r} vs {y!r}")
    print(f"{len(failures)} difference(s)" if failures else "lm-eval reads moelab's files as its own: all checks hold")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
