#!/usr/bin/env python3
"""Write the fixtures that check moelab's Python string semantics against Python and the harness itself.

    .venv/bin/pip download --no-deps lm-eval==0.4.9.2 -d /tmp/lm
    .venv/bin/pip install --target /tmp/pydeps jinja2        # the harness's templates (MMLU's strip)
    .venv/bin/python scripts/make_unicode_fixtures.py --lm-eval-wheel /tmp/lm/lm_eval-0.4.9.2-py3-none-any.whl \\
        --pydeps /tmp/pydeps [--hellaswag ../shared/data/evals/hellaswag_val_full.txt.bz2]

numpy (light tier) and jinja2; run it with the Python that made evals/unicode_case_table.cpp
(scripts/make_unicode_case_table.py), since both record Python's Unicode version. It writes, under
tests/fixtures/evals/unicode/:

* python-str.json: strings and what Python's own str methods return for them: capitalize(), lower(),
  strip(), rstrip(), split(), and re.split(r"\\s+", s); and every code point for which str.isspace() holds.
  The strings: hand-picked cases (ASCII, Latin-1 and Latin Extended capitals, Greek with final sigma,
  Turkish dotted I, ß, ligatures, title-case digraphs, Cherokee, Georgian, Deseret and other 4-byte
  scripts, combining marks, every white-space character), seeded random strings over an alphabet of the
  characters the final-sigma rule and the full mappings depend on, every code point that lower() or
  title() changes (in runs of 12, and each one first in a string, for capitalize), and each white-space
  code point between and around words. And byte strings that are not UTF-8, with the methods' results
  through Python's "surrogateescape" (moelab keeps each stray byte as it is, as that does).
* harness.json: what lm-evaluation-harness 0.4.9.2's own code returns, run from the wheel (nothing of
  it is copied here), for
  - hellaswag: records in the public HellaSwag JSON form -> lm_eval/tasks/hellaswag/utils.py's
    process_docs (query, choices, gold). utils.py imports `datasets` only to annotate process_docs and
    call dataset.map, so it runs with a stand-in `datasets` module whose Dataset.map applies the
    function to a list. The records: a few real validation items whose text has non-ASCII letters
    (from the 6-line text form, `--hellaswag`; HellaSwag is MIT, rowanz/hellaswag) rebuilt in the JSON
    form, and constructed records (see hellaswag_records below for how each is made);
  - hellaswag_preprocess: preprocess() on strings with Unicode white space and '\\r' inside brackets;
  - wikitext: preprocess_wikitext.py's wikitext_detokenizer and process_results' word count;
  - winogrande: preprocess_winogrande.py's doc_to_target and doc_to_choice;
  - mmlu: the default template's doc_to_text (mmlu/default/_default_template_yaml) rendered by the
    harness's jinja2 environment (its `env = Environment(...)` statement, taken from lm_eval/utils.py);
  - gsm8k_exact_match: api/metrics.py's exact_match_hf_evaluate with gsm8k.yaml's options (the
    function's source taken from the file, run with numpy, re and string);
  - encode_pair: api/model.py's TemplateLM._encode_pair (its source, run with a tokenizer that maps
    each character to its code point), which moves the context's trailing white space (str.rstrip) to
    the continuation.
"""
import argparse
import ast
import bz2
import json
import os
import platform
import random
import re
import string
import sys
import types
import unicodedata
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "fixtures", "evals", "unicode")
MAX_CP = 0x10FFFF

WHITE_SPACE_NAMES = "\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f \x85\xa0\u1680" + "".join(map(chr, range(0x2000, 0x200B))) + \
    "\u2028\u2029\u202f\u205f\u3000"

HAND_PICKED = [
    "", "a", "A", "hello world", "HELLO WORLD", "hELLO wORLD", "123 abc", "1st PLACE", " leading", "trailing ",
    "  both  ", "!?", "x", "Mixed Case Words Here",
    # Latin-1 and Latin Extended
    "ÀÉÎÕÜ ÇÑ Ÿ", "éCOLE", "ÉCOLE", "straße", "STRASSE", "ßtraße", "ß", "ŉ", "ŉOT", "ǰ", "ÿ", "Ÿ",
    "ĀĂĄĆĈĊČĎĐĒ", "ĲSSELMEER", "ĳsselmeer", "ǄEMAL", "ǅemal", "ǆemal", "Ǳ", "ǲ", "ǳ", "ǉubljana", "ǇUBLJANA",
    "ȺȾ", "ɐɑɒ", "ẞ", "ẞIG", "ṠẞṨ",
    # Greek: final sigma and its context (case-ignorable marks and punctuation between)
    "ΟΔΥΣΣΕΥΣ", "ΣΑΣ", "Σ", "ΑΣ", "ΑΣ.", "ΑΣ'Α", "Α'Σ", "ΑΣ\u0301", "ΑΣ\u0301Α", "ΑΣ Β", "ΣΑ", "ΌΣΟΣ ΌΣΟΣ",
    "ΑΣ\u00ad", "Α\u00adΣ", "ΑΣ:Β", "ΑΣ1", "1Σ", "ΑΣΣ", "ΣΣ", "σΣ", "ςΣ", "Α\u02b0Σ", "ΑΣ\u02b0", "\u0345Σ",
    "ΐ", "ΰ", "ᾼ", "ᾳ", "ᾈ", "ᾀ", "ὒ", "ΆΛΦΑ", "ἀΣ", "ΣΌΦΟΣ ΚΑΙ ΣΟΦΊΑ.",
    # Turkish dotted and dotless I
    "İSTANBUL", "İ", "iİ", "ı", "DİYARBAKIR", "İİ", "ıI",
    # ligatures and other multi-code-point title mappings
    "ﬁnd", "ﬂow", "ﬀ", "ﬃx", "ﬆ", "ﬓ", "և", "ﬁ ﬂ", "ﬄ",
    # Cherokee (capitals lower to the small letters of U+AB70..), Georgian (Mkhedruli, Mtavruli, Asomtavruli)
    "ᏣᎳᎩ", "ꮳꮃꭹ", "Ᏸ", "ᏸ", "ქართული", "ᲥᲐᲠᲗᲣᲚᲘ", "Ⴀ", "ⴀ", "ა",
    # 4-byte UTF-8: Deseret, Osage, Adlam, Warang Citi, Medefaidrin, mathematical letters
    "𐐔𐐯𐑅𐐨𐑉𐐯𐐻", "𐐼𐐯𐑅𐐨𐑉𐐯𐐻", "𐓀𐓘", "𞤀𞤢", "𑢠𑣀", "𖹀𖹠", "𝐀𝐁", "𐐀Σ",
    # combining marks, letters with no case, symbols with case mappings
    "e\u0301COLE", "\u0301abc", "A\u0308", "i\u0307", "I\u0307", "ⅠⅡⅲ", "ⒶⓑⒸ", "ＡＢＣｄ", "中文 ABC", "👍🏽 OK",
    "ǅ", "ǅǅ", "Ａ", "ͅ", "ͅΑ",
    # white space of every kind, and characters that are not white space in Python
    "\u00a0Hello\u3000World\u2029", "\x1c\x1d\x1e\x1fa\x1fb", "a\x85b", "\t\n\x0b\x0c\r x \r\n", "\u200b", "\u180e",
    "\ufeff", "\u2060", "a\u200bb", "\u1680x\u1680", "x\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200ay",
    "\u2028\u2029", "\u202fa\u205f", "\x00", "a\x00", " \x00 ", "\x1b", "\x7f",
]

# Characters the final-sigma rule, the full mappings and white space depend on, for random strings.
RANDOM_ALPHABET = ["Σ", "σ", "ς", "A", "a", "'", ".", ":", "\u0301", "\u00ad", "\u02b0", "\u0345", "İ", "ß", "ǅ", "ǆ",
                   " ", "\u00a0", "\u2028", "\u3000", "\x1f", "\x85", "1", "Ω", "ﬁ", "𐐀", "𐐨", "ᏸ", "Ᏸ", "ΐ", "ẞ",
                   "\u200b", "\u2019", "ᾼ", "x"]


def python_str_cases():
    rng = random.Random(20261201)
    strings = list(HAND_PICKED)
    strings += ["".join(rng.choice(RANDOM_ALPHABET) for _ in range(rng.randrange(0, 11))) for _ in range(400)]
    for ws in WHITE_SPACE_NAMES:
        strings += [ws, f"a{ws}b", f"{ws}a{ws}", f"{ws}{ws}a b{ws}{ws}c{ws}"]
    changed = [chr(c) for c in range(MAX_CP + 1)
               if not 0xD800 <= c <= 0xDFFF and (chr(c).lower() != chr(c) or chr(c).title() != chr(c))]
    strings += ["".join(changed[i:i + 12]) for i in range(0, len(changed), 12)]
    seen, cases = set(), []
    for s in strings:
        if s in seen:
            continue
        seen.add(s)
        cases.append({"input": s, "capitalize": s.capitalize(), "lower": s.lower(), "strip": s.strip(),
                      "rstrip": s.rstrip(), "split": s.split(), "re_split_whitespace": re.split(r"\s+", s)})
    # Each mapped code point first in a string, for capitalize's title case: [input, capitalize()].
    first = [[c + "XY", (c + "XY").capitalize()] for c in changed]
    return cases, first


# Byte strings that are not UTF-8 (stray continuation bytes, truncated and overlong sequences, encoded
# surrogates, values past U+10FFFF) around text the methods change.
INVALID_UTF8 = [b"\xff", b"\x80ABC", b"\xc3", b"\xc3(\xc9COLE", b"\xe2\x82 \xce\xa3", b"\xce\xb1\xce\xa3\xff",
                b"\xce\xb1\xff\xce\xa3", b"\xed\xa0\x80X", b"\xc0\x80Y", b"\xf4\x90\x80\x80Z", b"\xf0\x90\x90",
                b"\xc2\xa0\xfe\xc2\xa0", b"\xc4\xb0\xfe\xc4\xb0", b"\xfe\xc3\x9f"]


def invalid_utf8_cases():
    """Python's methods on the bytes decoded with "surrogateescape" (each stray byte becomes one lone
    surrogate, which no method changes and which is neither cased, case-ignorable nor white space),
    encoded back the same way."""
    def run(b, method):
        return method(b.decode("utf-8", "surrogateescape")).encode("utf-8", "surrogateescape").hex(" ")
    return [{"input_hex": b.hex(" "), "capitalize_hex": run(b, str.capitalize), "lower_hex": run(b, str.lower),
             "strip_hex": run(b, str.strip),
             "re_split_whitespace_count": len(re.split(r"\s+", b.decode("utf-8", "surrogateescape")))}
            for b in INVALID_UTF8]


# ---- the harness's code, from the wheel ----

class Wheel:
    def __init__(self, path):
        self.zip = zipfile.ZipFile(path)

    def source(self, name):
        return self.zip.read(name).decode("utf-8")

    def module(self, name, stubs=None):
        """Runs lm_eval's file `name` as a module, with `stubs` ({module name: module}) importable."""
        saved = {k: sys.modules.get(k) for k in (stubs or {})}
        sys.modules.update(stubs or {})
        try:
            mod = types.ModuleType(name)
            exec(compile(self.source(name), name, "exec"), mod.__dict__)
            return mod
        finally:
            for k, v in saved.items():
                if v is None:
                    sys.modules.pop(k, None)
                else:
                    sys.modules[k] = v

    def definition(self, name, qualname, namespace):
        """Runs one top-level function, method (Class.method) or assignment of file `name` in `namespace`."""
        tree = ast.parse(self.source(name))
        parts = qualname.split(".")
        body = tree.body
        for part in parts[:-1]:
            body = next(n for n in body if isinstance(n, ast.ClassDef) and n.name == part).body
        node = next(n for n in body
                    if (isinstance(n, ast.FunctionDef) and n.name == parts[-1])
                    or (isinstance(n, ast.Assign) and any(getattr(t, "id", None) == parts[-1] for t in n.targets)))
        if isinstance(node, ast.FunctionDef):
            node.decorator_list = []
        exec(compile(ast.Module(body=[node], type_ignores=[]), name, "exec"), namespace)
        return namespace[parts[-1]]


def stub_datasets():
    """Stands in for `datasets` in hellaswag/utils.py: Dataset for the annotation, map over a list."""
    mod = types.ModuleType("datasets")

    class Dataset(list):
        def map(self, fn):
            return [fn(doc) for doc in self]

    mod.Dataset = Dataset
    return mod


def text_form_items(path, items):
    with bz2.open(path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    return {k: lines[6 * k:6 * k + 6] for k in items}


# Real validation items whose text has non-ASCII letters (0-based item numbers in the 6-line text form).
REAL_ITEMS = [393, 3497, 3501, 4019, 4585, 5643]


def hellaswag_records(text_items):
    """Public-form records. The text form keeps "activity_label: ctx" already preprocessed, with ctx_a and
    ctx_b joined, and none of its 10,042 items has a non-ASCII capital letter, so each real item is
    rebuilt twice: ctx split before the sentence holding its first non-ASCII letter (or before its last
    sentence), ctx_b as it is and ctx_b upper-cased (str.upper(), so that it holds non-ASCII capitals
    that capitalize() must lower-case). Then constructed records for scripts and mappings no item has."""
    records = []
    for k, lines in text_items.items():
        label, ctx = lines[0].split(": ", 1)
        cut = next((i for i, ch in enumerate(ctx) if ord(ch) > 127 and ch.isalpha()), len(ctx))
        split_at = ctx.rfind(". ", 0, cut)
        split_at = split_at + 1 if split_at >= 0 else ctx.rfind(" ")
        ctx_a, ctx_b = ctx[:split_at], ctx[split_at + 1:]
        for b, how in ((ctx_b, "as in the text form"), (ctx_b.upper(), "ctx_b upper-cased")):
            records.append({"note": f"HellaSwag validation item {k} (text form), {how}",
                            "activity_label": label, "ctx_a": ctx_a, "ctx_b": b, "ctx": ctx_a + " " + b,
                            "endings": lines[2:6], "label": int(lines[1])})
    constructed = [
        ("Ιστορία", "Ο Οδυσσέας φτάνει στην Ιθάκη.", "ΤΟΝ ΠΕΡΙΜΕΝΕΙ Η ΠΗΝΕΛΟΠΗ ΚΑΙ Ο ΤΗΛΕΜΑΧΟΣ",
         ["ΤΟ ΤΌΞΟ ΤΟΥ ΟΔΥΣΣΈΑ.", "[title] Ο χορός ", "ΟΣΟΣ [step] ΣΑΣ", "ΑΣ\u0301 Σ"]),
        ("Seyahat", "Bir adam havaalanında bekliyor.", "İSTANBUL'DA İNİYOR VE DİYARBAKIR'A GİDİYOR.",
         ["İstanbul'a varıyor.", "Iğdır'a gidiyor.", "\u00a0İzmir\u3000", "ıI İi"]),
        ("Straßenbau", "Die Arbeiter stehen auf der Straße.", "ßIE BAUEN EINE NEUE STRASSE",
         ["Groß", "\u2003STRAẞE\u2003", "[header] Maß [title] halten", "ẞ"]),
        ("Ǆemal's kitchen", "A cook opens a jar.", "ǆEMAL ADDS THE ǅUVEČ SPICES.",
         ["ǳ", "Ǳ", "ǈ", "ǉubljana"]),
        ("Ligatures", "The sign reads:", "ﬁND THE ﬂOOR ﬀ",
         ["ﬁnd", " ﬂow ", "ﬃ\u2029", "ﬆ [x\ry] z"]),
        ("𐐔𐐯𐑅𐐨𐑉𐐯𐐻", "A page in the Deseret alphabet.", "𐐨𐐯𐑅 𐐔𐐯𐑅𐐨𐑉𐐯𐐻",
         ["𐐼𐐯𐑅𐐨𐑉𐐯𐐻", "𐐔𐐯𐑅", "\u205f𐐀\u205f", "𐐨"]),
        ("ᏣᎳᎩ", "A lesson in the Cherokee syllabary.", "ꮳꮃꭹ ᏣᎳᎩ ᎦᏬᏂᎯᏍᏗ",
         ["ᏣᎳᎩ", "ꮳꮃꭹ", "ᏸ", "Ᏸ"]),
        ("ქართული", "A Georgian lesson.", "ᲥᲐᲠᲗᲣᲚᲘ ᲔᲜᲐ ქართული",
         ["ქართული", "Ⴀⴀ", "ა", "Ა"]),
        ("\u3000Éclairs\u00a0", "The chef pipes the dough.", "élan and ÉCLAT, [step] THEN BAKES IT\u2028",
         ["\x1cÉCLAIR\x1f", "\x85crème\x85", "\u1680 done \u2000", "[a\rb] c"]),
        ("Empty", "Nothing follows.", "", ["a", "b", "c", "d"]),
    ]
    for label, ctx_a, ctx_b, endings in constructed:
        records.append({"note": "constructed", "activity_label": label, "ctx_a": ctx_a, "ctx_b": ctx_b,
                        "ctx": ctx_a + " " + ctx_b, "endings": endings, "label": 0})
    return records


PREPROCESS_INPUTS = [
    "\u00a0a [b] c\u3000", "x [line\rbreak] y", "x [line\nbreak] y", "\u2028[title]\u2029", "a\u00a0 [b]  c",
    "\x1c\x1d text \x1e\x1f", "\x85[x]\x85", "\u200bkept\u200b", "[\r]", "a [b\r\nc] d",
]

WIKITEXT_PAGES = [
    " = Title = \n\n ( a\u00a0b\u3000) and [\u2003x\u2003] { \u2028y\u2029 } \" \u205fq\u205f \" ' \u1680r\u1680 ' \n",
    " = Ünïcödé = \n\n Words\u00a0separated\u3000by\u2003odd\u2009spaces , and @-@ more . \n",
    "\u00a0lead and trail\u00a0",
    "a\x1cb\x1dc\x1ed\x1fe\x85f",
    "( \x1f )",
    "zero\u200bwidth is not space",
]

WINOGRANDE_RECORDS = [
    {"sentence": "The trophy doesn't fit into the suitcase because _ is too large.\u00a0", "option1": "trophy",
     "option2": "suitcase", "answer": "1"},
    {"sentence": "Σοφία gave Ελένη a book because _\u3000is kind.\u2029", "option1": "Σοφία", "option2": "Ελένη",
     "answer": "2"},
    {"sentence": "İpek met Ayşe, and _\x85\x1f", "option1": "İpek", "option2": "Ayşe", "answer": "1"},
]

MMLU_RECORDS = [
    {"question": "\u00a0Which word is Greek?\u3000", "choices": ["λόγος", "word", "mot", "Wort"], "answer": 0,
     "subject": "test"},
    {"question": "\x1c\u2028İ or I?\u2029\x1f", "choices": ["İ", "I", "ı", "i"], "answer": 0, "subject": "test"},
    {"question": "\u200bzero width stays\u200b", "choices": ["a", "b", "c", "d"], "answer": 3, "subject": "test"},
]

GSM8K_PAIRS = [
    ("ΟΔΟΣ", "Steps.\n#### οδος"), ("ΑΣ.", "#### ας"), ("ΑΣ", "#### ασ"), ("İ", "#### i\u0307"), ("İx", "#### i\u0307"),
    ("İx", "#### i\u0307x"), ("ẞ", "#### ß"), ("5.\x00", "#### 5"), ("5\x00", "#### 5"), ("$1,000.", "#### 1000"),
    ("ǅ", "#### ǆ"), ("Ⅻ", "#### ⅻ"), ("𐐀", "#### 𐐨"), ("\u00a05", "#### 5"), ("A\x00B", "#### a\x00b"),
]

ENCODE_PAIRS = [
    ("Question: x\nAnswer:\u00a0", "42"), ("ctx\u3000\u2028", " cont"), ("ctx\x1f", "x"), ("ctx \u200b", "y"),
    ("ctx\x85", "z"), ("a\u2003 \t", "b"), ("plain", " word"),
]


def harness_cases(wheel, text_items):
    import jinja2
    import numpy as np

    out = {}
    hs = wheel.module("lm_eval/tasks/hellaswag/utils.py", {"datasets": stub_datasets()})
    records = hellaswag_records(text_items)
    docs = hs.process_docs(stub_datasets().Dataset(records))
    out["hellaswag"] = [{"record": r, "query": d["query"], "choices": d["choices"], "gold": d["gold"]}
                        for r, d in zip(records, docs)]
    out["hellaswag_preprocess"] = [{"input": s, "output": hs.preprocess(s)} for s in PREPROCESS_INPUTS]

    wt = wheel.module("lm_eval/tasks/wikitext/preprocess_wikitext.py")
    out["wikitext"] = [{"page": p, "detokenized": wt.wikitext_detokenizer({"page": p}),
                        "words": wt.process_results({"page": p}, (0.0,))["word_perplexity"][1]}
                       for p in WIKITEXT_PAGES]

    wg = wheel.module("lm_eval/tasks/winogrande/preprocess_winogrande.py")
    out["winogrande"] = [{"record": r, "contexts": wg.doc_to_choice(r), "continuation": wg.doc_to_target(r)}
                         for r in WINOGRANDE_RECORDS]

    env = wheel.definition("lm_eval/utils.py", "env", {"Environment": jinja2.Environment,
                                                       "BaseLoader": jinja2.BaseLoader,
                                                       "StrictUndefined": jinja2.StrictUndefined})
    template_line = next(line for line in wheel.source("lm_eval/tasks/mmlu/default/_default_template_yaml").splitlines()
                         if line.startswith("doc_to_text: "))
    template = json.loads(template_line[len("doc_to_text: "):])  # a YAML double-quoted scalar; \n as in JSON
    out["mmlu"] = [{"record": r, "query": env.from_string(template).render(**r)} for r in MMLU_RECORDS]

    gsm8k_yaml = wheel.source("lm_eval/tasks/gsm8k/gsm8k.yaml")
    options = {"regexes_to_ignore": [",", "\\$", "(?s).*#### ", "\\.$"], "ignore_case": True,
               "ignore_punctuation": False}
    for rx in options["regexes_to_ignore"]:  # gsm8k.yaml's metric_list, written as YAML double-quoted strings
        assert json.dumps(rx) in gsm8k_yaml, rx
    assert "ignore_case: true" in gsm8k_yaml and "ignore_punctuation: false" in gsm8k_yaml
    exact_match = wheel.definition("lm_eval/api/metrics.py", "exact_match_hf_evaluate",
                                   {"np": np, "re": re, "string": string})
    out["gsm8k_exact_match"] = [
        {"prediction": p, "reference": r,
         "exact_match": float(exact_match(predictions=[p], references=[r], **options)["exact_match"])}
        for p, r in GSM8K_PAIRS]

    encode_pair = wheel.definition("lm_eval/api/model.py", "TemplateLM._encode_pair", {})
    codepoints = types.SimpleNamespace(backend="causal", tok_encode=lambda s: [ord(c) for c in s])
    out["encode_pair"] = []
    for ctx, cont in ENCODE_PAIRS:
        c, k = encode_pair(codepoints, ctx, cont)
        out["encode_pair"].append({"context": ctx, "continuation": cont, "context_tokens": c,
                                   "continuation_tokens": k})
    return out, np.__version__, jinja2.__version__


def write(name, obj):
    """JSON with one list entry per line (readable diffs, a few hundred kilobytes)."""
    def dump(v):
        return json.dumps(v, ensure_ascii=False)

    lines = ["{"]
    for i, (k, v) in enumerate(obj.items()):
        end = "," if i + 1 < len(obj) else ""
        if isinstance(v, list) and v and isinstance(v[0], (dict, list)):
            lines.append(f" {dump(k)}: [")
            lines += [f"  {dump(x)}{',' if j + 1 < len(v) else ''}" for j, x in enumerate(v)]
            lines.append(f" ]{end}")
        else:
            lines.append(f" {dump(k)}: {dump(v)}{end}")
    lines.append("}")
    path = os.path.join(OUT, name)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write("\n".join(lines) + "\n")
    print(f"{path}: {os.path.getsize(path)} bytes")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lm-eval-wheel", required=True, help="lm_eval-0.4.9.2-py3-none-any.whl (pip download)")
    p.add_argument("--pydeps", help="a folder holding jinja2 (pip install --target)")
    p.add_argument("--hellaswag", default=os.path.join(ROOT, "..", "shared", "data", "evals",
                                                        "hellaswag_val_full.txt.bz2"))
    args = p.parse_args()
    if args.pydeps:
        sys.path.insert(0, args.pydeps)
    if not os.path.basename(args.lm_eval_wheel).startswith("lm_eval-0.4.9.2-"):
        sys.exit("expected the lm-eval 0.4.9.2 wheel")
    os.makedirs(OUT, exist_ok=True)
    versions = {"python": platform.python_version(), "unicode": unicodedata.unidata_version}

    cases, first_letter = python_str_cases()
    write("python-str.json", {
        "generated_by": "scripts/make_unicode_fixtures.py", **versions,
        "isspace": [c for c in range(MAX_CP + 1) if chr(c).isspace()],
        "cases": cases, "capitalize_first_letter": first_letter, "invalid_utf8": invalid_utf8_cases()})

    cases, numpy_version, jinja2_version = harness_cases(Wheel(args.lm_eval_wheel),
                                                         text_form_items(args.hellaswag, REAL_ITEMS))
    write("harness.json", {
        "generated_by": "scripts/make_unicode_fixtures.py", "lm_eval": "0.4.9.2", **versions,
        "numpy": numpy_version, "jinja2": jinja2_version,
        "hellaswag_source": "real items: klosax/hellaswag_text_data hellaswag_val_full.txt.bz2 (from rowanz/hellaswag "
                            "data/hellaswag_val.jsonl), MIT; each record's note says how it was made",
        **cases})


if __name__ == "__main__":
    main()
