#!/usr/bin/env python3
"""Writes the seed corpora of the fuzz harnesses (tests/fuzz/corpus/<harness>/) from the fixtures, plus the
crash and hang reproducers of issue 13 that fit. Standard library only (h5py optional: without it the
trace corpus keeps the traces passed with --trace). Run from the repository root:

    python3 tests/fuzz/make_corpus.py [--trace TRACE.h5 ...]

Names: seed-* come from fixtures, repro-* reproduce a bug that was fixed (the issue item in the name).
Inputs found by scripts/fuzz.sh are committed as they came (trace/repro-hdf5-open-leak*); this script
writes its own files only and deletes nothing."""
import argparse, bz2, gzip, json, os, pathlib, struct, sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
OUT = ROOT / "tests/fuzz/corpus"
FIX = ROOT / "tests/fixtures"
TASKS = ["hellaswag", "arc_easy", "arc_challenge", "mmlu", "winogrande", "piqa", "gsm8k", "humaneval",
         "wikitext", "multiple_choice", "generate", "rolling"]


def put(harness, name, data):
    d = OUT / harness
    d.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    (d / name).write_bytes(data)


def safetensors(tensors, metadata=None, pad=b"", raw_header=None):
    header, buf = {}, b""
    for name, (dtype, shape, data) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(buf), len(buf) + len(data)]}
        buf += data
    if metadata is not None:
        header["__metadata__"] = metadata
    h = raw_header if raw_header is not None else json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + pad + buf


def corpus_safetensors():
    f32 = struct.pack("<4f", 1.0, -2.5, 0.0, 3.25)
    put("safetensors", "seed-small-f32", safetensors({"w": ("F32", [2, 2], f32)}, {"format": "pt"}))
    put("safetensors", "seed-dtypes", safetensors({
        "a": ("BF16", [3], b"\x80\x3f\x00\x40\xc0\x7f"), "b": ("F16", [2], b"\x00\x3c\x00\x7c"),
        "c": ("U8", [4], b"\x01\x02\x03\x04"), "d": ("I64", [1], struct.pack("<q", -5)),
        "e": ("F64", [1], struct.pack("<d", 0.5)), "empty": ("F32", [0, 3], b""), "scalar": ("F32", [], f32[:4])}))
    put("safetensors", "seed-nan", safetensors({"w": ("F32", [2], struct.pack("<2f", float("nan"), float("inf")))}))
    # Bad files of the kinds validation must refuse.
    put("safetensors", "seed-bad-offsets", safetensors({}, raw_header=b'{"w":{"dtype":"F32","shape":[4],"data_offsets":[0,1000]}}'))
    put("safetensors", "seed-bad-overlap", safetensors({}, raw_header=b'{"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},"b":{"dtype":"U8","shape":[2],"data_offsets":[1,3]}}', pad=b"", ) + b"xyz")
    put("safetensors", "seed-bad-shape-overflow", safetensors({}, raw_header=b'{"w":{"dtype":"F32","shape":[4294967296,4294967296,16],"data_offsets":[0,0]}}'))
    put("safetensors", "seed-bad-header-size", struct.pack("<Q", 1 << 62) + b"{}")
    put("safetensors", "seed-bad-truncated", b"\x10\x00\x00")
    # Fixture checkpoints: the header with the first bytes of the data (the rest is cut: validation refuses).
    for p in sorted(FIX.glob("models/*/model*.safetensors"))[:3]:
        raw = p.read_bytes()
        n = struct.unpack("<Q", raw[:8])[0]
        put("safetensors", f"seed-{p.parent.name}-{p.stem}-cut", raw[: 8 + n + 256])
    # A whole small fixture file (valid): a checkpoint with its data.
    small = min(FIX.glob("models/*/expected.safetensors"), key=lambda p: p.stat().st_size)
    if small.stat().st_size < 100_000:
        put("safetensors", f"seed-{small.parent.name}-expected", small.read_bytes())


def corpus_config():
    for p in sorted(FIX.glob("models/*/config.json")) + [FIX / "configs/mixtral-8x7b-v0.1.json", ROOT / "models/tiny-mixtral/config.json"]:
        put("config", f"seed-{p.parent.name}-{p.stem}", p.read_bytes())
    base = json.loads((ROOT / "models/tiny-mixtral/config.json").read_text())
    for name, patch in [("repro-13-8-layers-10000000", {"num_hidden_layers": 10000000}),
                        ("repro-13-8-int64-overflow", {"vocab_size": 2**31 - 1, "hidden_size": 2**31 - 1,
                                                       "intermediate_size": 2**31 - 1, "num_local_experts": 2**31 - 1}),
                        ("seed-negative-heads", {"num_attention_heads": -8}),
                        ("seed-float-sizes", {"hidden_size": 64.5}),
                        ("seed-string-sizes", {"hidden_size": "64"}),
                        ("seed-topk-gt-experts", {"num_experts_per_tok": 9}),
                        ("seed-nan-eps", {"rms_norm_eps": None}),
                        ("seed-quant-fp4", {"quantization_config": {"load_in_4bit": True, "bnb_4bit_quant_type": "fp4"}})]:
        c = dict(base)
        c.update(patch)
        put("config", name, json.dumps(c))
    put("config", "seed-not-object", "[1,2,3]")


def corpus_tokenizer():
    put("tokenizer", "seed-bytes-ascii", b"\x00Hello world, this is moelab.\n  Two spaces and a tab\t.")
    put("tokenizer", "seed-bytes-utf8", b"\x00" + "naïve café — 日本語 🙂 ▁underscore".encode())
    put("tokenizer", "seed-bytes-invalid-utf8", b"\x00\xff\xfe\xc3(\xe2\x82 \xf0\x9f\x98")
    put("tokenizer", "seed-ids-in-range", b"\x01" + struct.pack("<8i", 1, 2, 3, 100, 200, 259, 300, 0))
    put("tokenizer", "repro-piece-id-out-of-range", b"\x01" + struct.pack("<5i", -1, -2147483648, 2147483647, 32000, 1 << 20))
    put("tokenizer", "seed-ids-folded-bytes", b"\x02" + struct.pack("<10i", 1, 3, 4, 5, 200, 201, 202, 203, 2, 0))


def eval_input(task, container, content):
    if isinstance(content, str):
        content = content.encode()
    return bytes([TASKS.index(task), container]) + content


def corpus_eval_docs():
    tasks = FIX / "evals/tasks"
    for f, task in [("mc_test.jsonl", "multiple_choice"), ("mc_train.jsonl", "hellaswag"), ("gen_test.jsonl", "generate"),
                    ("rolling_test.jsonl", "rolling"), ("wino_test.jsonl", "winogrande")]:
        put("eval_docs", f"seed-{task}-{f}", eval_input(task, 0, (tasks / f).read_bytes()))
    comp = FIX / "evals/compressed"
    for f in sorted(comp.iterdir()):
        container = 2 if f.name.endswith(".gz") else 3 if f.name.endswith(".bz2") else 0
        put("eval_docs", f"seed-mc-{f.name}", eval_input("multiple_choice", container, f.read_bytes()))
    put("eval_docs", "seed-mc-compress-gz", eval_input("multiple_choice", 4, (comp / "mc.jsonl").read_bytes()))
    put("eval_docs", "seed-mc-compress-bz2", eval_input("multiple_choice", 5, (comp / "mc.jsonl").read_bytes()))
    # Public forms, one record each.
    recs = {
        "hellaswag": {"ctx": "A man is sitting on a roof.", "activity_label": "Roof shingle removal", "ctx_a": "A man", "ctx_b": "is sitting",
                      "endings": ["he starts.", "he stops [title] x.", "he is.", "he was."], "label": "1"},
        "arc_easy": {"question": "Which is a gas?", "choices": {"text": ["ice", "steam", "rock"], "label": ["A", "B", "C"]}, "answerKey": "B"},
        "arc_challenge": {"question": "Q?", "choices": {"text": ["a", "b", "c", "d"], "label": ["1", "2", "3", "4"]}, "answerKey": "4"},
        "mmlu": {"question": "2+2?", "subject": "elementary_mathematics", "choices": ["3", "4", "5", "6"], "answer": 1},
        "winogrande": {"sentence": "The trophy does not fit in the suitcase because _ is too big.", "option1": "the trophy", "option2": "the suitcase", "answer": "1"},
        "piqa": {"goal": "Open a jar.", "sol1": "Twist the lid.", "sol2": "Eat the lid.", "label": 0},
        "gsm8k": {"question": "1+1?", "answer": "One and one.\n#### 2"},
        "humaneval": {"task_id": "HumanEval/0", "prompt": "def f():\n", "test": "def check(c):\n  pass\n", "entry_point": "f", "canonical_solution": "  return 1\n"},
        "wikitext": {"page": " = Title = \n Some text @-@ here ( with , parentheses ) . \n"},
    }
    for task, r in recs.items():
        put("eval_docs", f"seed-{task}-public", eval_input(task, 0, json.dumps(r) + "\n"))
        put("eval_docs", f"seed-{task}-converters", eval_input(task, 7, json.dumps(r) + "\n"))
    put("eval_docs", "seed-hellaswag-text", eval_input("hellaswag", 1, "A man is on a roof.\n0\nend a\nend b\nend c\nend d\n"))
    put("eval_docs", "seed-wikitext-text", eval_input("wikitext", 1, " = Valkyria = \n\n Senjō no Valkyria @-@ 3 : ( unrecorded ) \" quoted \" .\n = = Section = = \n text .\n"))
    put("eval_docs", "seed-wikitext-text-gz", eval_input("wikitext", 6, " = A = \n b @,@ c .\n"))
    # Issue 13 item 3: the recursive std::regex overflowed the stack on long spans.
    put("eval_docs", "repro-13-3-hellaswag-50k-brackets", eval_input("hellaswag", 0, json.dumps(dict(recs["hellaswag"], ctx="[" + "x " * 25000 + "]")) + "\n"))
    put("eval_docs", "repro-13-3-wikitext-unmatched-paren", eval_input("wikitext", 1, " = Long = \n ( " + "word " * 12000 + "\n"))
    put("eval_docs", "repro-13-3-wikitext-50k-paren", eval_input("wikitext", 7, " ( " + "a " * 25000 + ") \n"))
    # Issue 13 item 10: mis-scored fields.
    for name, task, r in [("gold-2pow40", "multiple_choice", {"query": "q", "choices": ["a", "b"], "gold": 2**40}),
                          ("gold-7", "multiple_choice", {"query": "q", "choices": ["a", "b"], "gold": 7}),
                          ("gold-neg", "multiple_choice", {"query": "q", "choices": ["a", "b"], "gold": -3}),
                          ("gold-float", "multiple_choice", {"query": "q", "choices": ["a", "b"], "gold": 1.7}),
                          ("mmlu-answer-empty", "mmlu", dict(recs["mmlu"], answer="")),
                          ("wino-answer-3", "winogrande", dict(recs["winogrande"], answer="3")),
                          ("hellaswag-label-nonnumeric", "hellaswag", dict(recs["hellaswag"], label="x"))]:
        put("eval_docs", f"repro-13-10-{name}", eval_input(task, 0, json.dumps(r) + "\n"))
    put("eval_docs", "seed-invalid-utf8-line", eval_input("multiple_choice", 0, b'{"query": "\xff", "choices": ["a"], "gold": 0}\n'))


def corpus_trace(traces):
    for i, t in enumerate(traces):
        raw = pathlib.Path(t).read_bytes()
        put("trace", f"seed-trace-{i}", raw)
        put("trace", f"seed-trace-{i}-cut-half", raw[: len(raw) // 2])
        put("trace", f"seed-trace-{i}-cut-4k", raw[:4096])
    put("trace", "seed-not-hdf5", b"not an HDF5 file\n")
    put("trace", "seed-empty", b"")


def vlen_trace(src, dst):
    """Issue 13 item 5: a trace whose string attributes are variable-length (global heap), as before."""
    import h5py
    import shutil
    shutil.copy(src, dst)
    with h5py.File(dst, "r+") as f:
        for k in list(f.attrs.keys()):
            v = f.attrs[k]
            if isinstance(v, bytes):
                del f.attrs[k]
                f.attrs.create(k, v.decode(), dtype=h5py.string_dtype("utf-8"))
    return pathlib.Path(dst).read_bytes()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--trace", nargs="*", default=[], help="small traces written by moelab trace")
    a = ap.parse_args()
    corpus_safetensors()
    corpus_config()
    corpus_tokenizer()
    corpus_eval_docs()
    corpus_trace(a.trace)
    if a.trace:
        try:
            raw = bytearray(vlen_trace(a.trace[0], str(OUT / "trace" / ".vlen.tmp")))
            os.unlink(OUT / "trace" / ".vlen.tmp")
        except ImportError:
            print("no h5py: the variable-length-string reproducers are not written", file=sys.stderr)
            return
        put("trace", "seed-trace-vlen-strings", bytes(raw))
        heap = raw.find(b"GCOL")
        if heap >= 0:
            def damaged(edit):
                b = bytearray(raw)
                edit(b)
                return bytes(b)
            put("trace", "repro-13-5-heap-object-zeroed", damaged(lambda b: b.__setitem__(slice(heap + 16, heap + 32), b"\0" * 16)))
            put("trace", "repro-13-5-heap-object-size-huge", damaged(lambda b: b.__setitem__(slice(heap + 24, heap + 32), struct.pack("<Q", 1 << 40))))
            put("trace", "repro-13-5-heap-size-17", damaged(lambda b: b.__setitem__(slice(heap + 8, heap + 16), struct.pack("<Q", 17))))
            put("trace", "repro-13-5-heap-size-huge", damaged(lambda b: b.__setitem__(slice(heap + 8, heap + 16), struct.pack("<Q", 1 << 40))))


if __name__ == "__main__":
    main()
