#!/usr/bin/env python3
"""Regenerate GSM8K's bundled few-shot slice and the fixture that checks it, from the full split files.

    python3 scripts/make_gsm8k_fewshot_slice.py [--train TRAIN.jsonl] [--test TEST.jsonl]
                                                [--test-docs 100] [--fixture-docs 20]

Standard library only. Defaults read ../shared/data/evals/gsm8k-{train,test}.jsonl (the full files of
openai/grade-school-math, grade_school_math/data/; the same records, in the same order, as Hugging
Face's gsm8k "main" config that lm-evaluation-harness loads).

lm-evaluation-harness 0.4.9.2's gsm8k task (fewshot_split: train, num_fewshot 5, the default sampler)
draws, for each evaluated test doc in order, `rnd.sample(train_docs, 5)` from one random.Random(1234)
per task. The draw depends only on len(train_docs) (7,473) and the generator's state, so the docs a
run of the first N test docs needs are known in advance. This script writes:

* evals/data/gsm8k-train-fewshot.jsonl: the sparse slice of the train split. Line 1 is a header,
      {"split": "train", "total": 7473, "source": ..., "sha256": <of the full train file>,
       "drawn_for": {"task": "gsm8k", "test_docs": N, "shots": 5, "seed": 1234}}
  then one {"index": i, "question": ..., "answer": ...} per train doc those draws use, by index (the
  record exactly as in the train file, plus its 0-based index in it). moelab places them at their
  indices in a split of `total` docs; a draw that reaches a missing index is an error.
* tests/fixtures/evals/gsm8k-fewshot-draws.json: for each of the first N test docs, the 5 train
  indices drawn and the SHA-256 of the few-shot block (description + examples, as the harness's
  fewshot_context builds it) made from the FULL train file; for the first `--fixture-docs` test docs
  (those in evals/data/gsm8k-test-20.jsonl) also the SHA-256 of the whole prompt. The C++ test
  (EvalGsm8kFewshot) builds the same prompts from the bundled slice and compares.
"""
import argparse
import hashlib
import json
import os
import random
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEED, SHOTS = 1234, 5
SOURCE = "openai/grade-school-math, grade_school_math/data/train.jsonl (MIT)"


def read_jsonl(path):
    with open(path, "rb") as f:
        raw = f.read()
    docs = [json.loads(line) for line in raw.decode("utf-8").splitlines() if line.strip()]
    return raw, docs


def text(doc):  # gsm8k.yaml doc_to_text
    return "Question: " + doc["question"] + "\nAnswer:"


def example(doc):  # text + target_delimiter + doc_to_target + fewshot_delimiter
    return text(doc) + " " + doc["answer"] + "\n\n"


def sha(s):
    return hashlib.sha256(s.encode("utf-8")).hexdigest()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    shared = os.path.join(ROOT, "..", "shared", "data", "evals")
    p.add_argument("--train", default=os.path.join(shared, "gsm8k-train.jsonl"))
    p.add_argument("--test", default=os.path.join(shared, "gsm8k-test.jsonl"))
    p.add_argument("--test-docs", type=int, default=100, help="test docs whose draws the slice holds (README: --limit 100)")
    p.add_argument("--fixture-docs", type=int, default=20, help="test docs whose whole prompt hash the fixture holds")
    p.add_argument("--slice-out", default=os.path.join(ROOT, "evals", "data", "gsm8k-train-fewshot.jsonl"))
    p.add_argument("--fixture-out", default=os.path.join(ROOT, "tests", "fixtures", "evals", "gsm8k-fewshot-draws.json"))
    a = p.parse_args()

    train_raw, train = read_jsonl(a.train)
    _, test = read_jsonl(a.test)
    if len(train) != 7473 or len(test) != 1319:
        sys.exit(f"expected 7,473 train and 1,319 test docs, got {len(train)} and {len(test)}")

    # The harness: one random.Random(seed) per task, rnd.sample(fewshot_docs, num_fewshot) per doc, in doc
    # order (the few-shot split is not the test split, so no extra draw). random.sample picks positions
    # the same way whatever the population holds, so sampling range(len(train)) gives the same indices.
    rnd = random.Random(SEED)
    draws = [rnd.sample(range(len(train)), SHOTS) for _ in range(a.test_docs)]
    needed = sorted({i for d in draws for i in d})

    header = {"split": "train", "total": len(train), "source": SOURCE,
              "sha256": hashlib.sha256(train_raw).hexdigest(),
              "drawn_for": {"task": "gsm8k", "test_docs": a.test_docs, "shots": SHOTS, "seed": SEED},
              "made_by": "scripts/make_gsm8k_fewshot_slice.py"}
    lines = [json.dumps(header, ensure_ascii=False)]
    for i in needed:
        lines.append(json.dumps({"index": i, **train[i]}, ensure_ascii=False))
    with open(a.slice_out, "w", encoding="utf-8", newline="\n") as f:
        f.write("\n".join(lines) + "\n")

    docs = []
    for k, d in enumerate(draws):
        block = "".join(example(train[i]) for i in d)  # description is "" for gsm8k
        rec = {"doc": k, "indices": d, "fewshot_sha256": sha(block)}
        if k < a.fixture_docs:
            rec["prompt_sha256"] = sha(block + text(test[k]))
        docs.append(rec)
    fixture = {"made_by": "scripts/make_gsm8k_fewshot_slice.py from the full gsm8k train and test files",
               "train_sha256": header["sha256"], "total": len(train), "seed": SEED, "shots": SHOTS, "docs": docs}
    with open(a.fixture_out, "w", encoding="utf-8", newline="\n") as f:
        json.dump(fixture, f, indent=1)
        f.write("\n")
    print(f"wrote {a.slice_out} ({len(needed)} of {len(train)} train docs, for {a.test_docs} test docs) "
          f"and {a.fixture_out}")


if __name__ == "__main__":
    main()
