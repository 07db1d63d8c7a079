#!/usr/bin/env python3
"""Python's own text forms, as the oracle for evals/python_format.cpp (tests/test_python_format.cpp):
repr(float) for tricky and random doubles, json.dumps(obj, indent=2 / None, ensure_ascii=False) of JSON
documents (keys in their order), str() of scalars and lm-eval's sanitize_model_name.

  .venv/bin/python scripts/make_python_format_fixture.py   # writes tests/fixtures/evals/python_format.json
"""
import json
import os
import random
import re
import struct
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests/fixtures/evals/python_format.json")


def bits(x):
    return struct.pack(">d", x).hex()


def main():
    rnd = random.Random(1234)
    values = [0.0, -0.0, 1.0, -1.0, 0.1, 0.5, 1e-4, 1.5e-4, 1e-5, 9.999e-5, 0.0001234, 123.456, 1e15, 1e16,
              1.5e15, 9.999999999999998e15, 2.0 ** 53, 2.0 ** 53 + 2, 123456789012345678.0, 1e22, 1e23, 1.7976931348623157e308,
              5e-324, 2.2250738585072014e-308, float("inf"), float("-inf"), float("nan"),
              -11.511795043945312, -95.64395904541016, 0.210818510677892, 72775833.11899546, 1 / 3, 2 / 3]
    for _ in range(300):  # wide exponents
        values.append(rnd.uniform(-1, 1) * 10.0 ** rnd.randint(-30, 30))
    for _ in range(200):  # float32 values as float(tensor.item()) gives them (log-likelihoods)
        values.append(struct.unpack("f", struct.pack("f", rnd.uniform(-200, 0)))[0])
    for _ in range(100):  # any bit pattern that is a finite double
        x = struct.unpack(">d", rnd.getrandbits(64).to_bytes(8, "big"))[0]
        if x == x and abs(x) != float("inf"):
            values.append(x)
    floats = [{"bits": bits(x), "repr": repr(x)} for x in values]

    docs = [
        '{"query": "You may copy the", "choices": ["software", "license"], "gold": 0}',
        '{"b": 1, "a": [], "c": {}, "d": [[], {}], "e": null, "f": true, "g": false}',
        '{"x": 1.0, "y": 100.0, "z": 1e-05, "w": 1e16, "v": -0.0, "u": 12345678901234567890}',
        '{"text": "tab\\tnew\\nline\\rcr \\"quote\\" back\\\\slash \\u0001\\u001f\\u007f /slash"}',
        '{"unicode": "Janet\\u2019s \\u00e9t\\u00e9 \\u4e2d\\u6587 \\ud83d\\ude00 \\u2028 \\u00a0", "nested": {"k": [1, [2, [3, {"d": "e"}]]]}}',
        '[1, 2.5, "three", [4], {"five": 5}]',
        '"a bare string"',
        '{"question": "Q?", "answer": "A.\\n#### 18", "ind": 24, "label": "3", "endings": ["a", "b"]}',
    ]
    dumps = []
    for text in docs:
        obj = json.loads(text)
        dumps.append({"json": text, "indent2": json.dumps(obj, indent=2, ensure_ascii=False),
                      "compact": json.dumps(obj, ensure_ascii=False)})

    scalars = [{"json": t, "str": str(json.loads(t))} for t in
               ['"text"', '1', '-42', '18446744073709551615', '1.0', '-11.511795043945312', 'true', 'false', 'null', '1e-07']]

    # lm_eval.utils.sanitize_model_name (the regex copied here is the oracle's, not moelab's code)
    names = ["models/default", "/work/main/models/default", "org/model:rev", 'a"b<c>d|e\\f?g*h[i]j', "plain-name_1.0",
             "//double//slash", "x:/:y"]
    sanitized = [{"model": n, "sanitized": re.sub(r"[\"<>:/\|\\?\*\[\]]+", "__", n)} for n in names]

    doc = {"generated_by": "scripts/make_python_format_fixture.py",
           "python": sys.version.split()[0],
           "floats": floats, "dumps": dumps, "scalars": scalars, "model_names": sanitized}
    with open(OUT, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=1, ensure_ascii=False)
        f.write("\n")
    print(f"wrote {OUT}: {len(floats)} floats, {len(dumps)} documents")


if __name__ == "__main__":
    sys.exit(main())
