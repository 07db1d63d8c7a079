#!/usr/bin/env python3
"""Write evals/unicode_case_table.cpp: the Unicode data behind Python's str methods, asked of Python itself.

    python3 scripts/make_unicode_case_table.py [--out evals/unicode_case_table.cpp]

Standard library only. lm-evaluation-harness runs its text preprocessing through Python's str methods
and `re` (HellaSwag's ctx_b.capitalize() and preprocess's strip(), numpy's lower() in exact_match,
re.split(r"\\s+") word counts, ...). moelab reproduces them in C++ (evals/unicode_case.*,
evals/unicode_space.*) from the tables this script writes. Every table comes from the running Python's
own answers, code point by code point, not from the Unicode Character Database files:

* lower: chr(c).lower() (the full mapping: U+0130 'İ' becomes two code points, 'i' + U+0307);
* title: chr(c).title() (the full title-case mapping str.capitalize() applies to the first character:
  'ß' -> 'Ss', 'ǆ' -> 'ǅ', 'ﬁ' -> 'Fi');
* the context of the one context-dependent lower-case mapping, capital sigma (CPython's
  handle_capital_sigma: 'Σ' becomes final 'ς' after a cased letter, skipping case-ignorable ones, when no
  cased letter follows, again skipping case-ignorable ones). Python does not expose the Cased and
  Case_Ignorable properties, so each code point c is classified by three probes of str.lower():
      "cΣ"  ends in ς  <=>  c is cased and not case-ignorable
      "AcΣ" ends in ς  <=>  c is case-ignorable or cased
      "AΣc" has ς      <=>  c is case-ignorable or not cased
  which separate the three classes the rule can tell apart: case-ignorable (skipped whether cased or
  not), cased (and not case-ignorable), neither;
* white space: chr(c).isspace(), the set str.strip() / str.split() and re's \\s (str patterns) use; the
  script checks that re.fullmatch(r"\\s", chr(c)) and str.split() agree with it for every code point.

Single code point mappings are stored as runs of code points with the same offset (every code point,
or every other one: upper/lower pairs alternate in many blocks); mappings to several code points as a
list. The script re-derives every code point's lower and title mapping and sigma class from the written
tables and stops if any differs from Python's. The generated file records the Python version and
unicodedata.unidata_version; regenerate it and tests/fixtures/evals/unicode (scripts/make_unicode_fixtures.py)
with the same Python.
"""
import argparse
import os
import platform
import re
import sys
import unicodedata

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_CP = 0x10FFFF
SIGMA = "\u03a3"
FINAL_SIGMA = "\u03c2"


def code_points():
    """Every code point valid UTF-8 can carry (no surrogates)."""
    return (c for c in range(MAX_CP + 1) if not 0xD800 <= c <= 0xDFFF)


def mappings(method):
    """{c: mapped string} for every code point whose str.<method>() differs from itself."""
    out = {}
    for c in code_points():
        m = getattr(chr(c), method)()
        if m != chr(c):
            out[c] = m
    return out


def delta_runs(single):
    """[(first, last, step, delta)] covering {c: c + delta}; each run holds consecutive entries of the
    sorted map, so runs never interleave and a binary search on `first` finds the only candidate."""
    runs = []
    for c in sorted(single):
        d = single[c] - c
        if runs:
            first, last, step, delta = runs[-1]
            gap = c - last
            if delta == d and ((first == last and gap in (1, 2)) or (first != last and gap == step)):
                runs[-1] = (first, c, gap if first == last else step, delta)
                continue
        runs.append((c, c, 1, d))
    return runs


def ranges(cps):
    out = []
    for c in sorted(cps):
        if out and out[-1][1] == c - 1:
            out[-1] = (out[-1][0], c)
        else:
            out.append((c, c))
    return out


def sigma_classes():
    """(case_ignorable, cased_not_ignorable): the classes of the final-sigma rule, probed as above."""
    ignorable, cased = set(), set()
    for c in code_points():
        ch = chr(c)
        t1 = (ch + SIGMA).lower().endswith(FINAL_SIGMA)
        t2 = ("A" + ch + SIGMA).lower().endswith(FINAL_SIGMA)
        t3 = ("A" + SIGMA + ch).lower()[1] == FINAL_SIGMA
        if t2 and t3 and not t1:
            ignorable.add(c)
        elif t1 and t2 and not t3:
            cased.add(c)
        elif not (not t1 and not t2 and t3):
            sys.exit(f"U+{c:04X}: the sigma probes give {t1, t2, t3}, which no class explains")
    return ignorable, cased


def white_space():
    ws = {c for c in code_points() if chr(c).isspace()}
    for c in code_points():
        ch = chr(c)
        if (re.fullmatch(r"\s", ch) is not None) != (c in ws):
            sys.exit(f"U+{c:04X}: re's \\s and str.isspace() disagree")
        if (len(("a" + ch + "b").split()) == 2) != (c in ws):
            sys.exit(f"U+{c:04X}: str.split() and str.isspace() disagree")
    return ws


def lookup(runs, multi, c):
    if c in multi:
        return multi[c]
    for first, last, step, delta in runs:
        if first <= c <= last and (c - first) % step == 0:
            return chr(c + delta)
    return chr(c)


def check(runs, multi, method, expected):
    index = {}
    for r in runs:
        for c in range(r[0], r[1] + 1, r[2]):
            index[c] = r
    for c in code_points():
        got = multi.get(c) or (chr(c + index[c][3]) if c in index else chr(c))
        if got != getattr(chr(c), method)():
            sys.exit(f"U+{c:04X}: the {method} table gives {got!r}, Python {getattr(chr(c), method)()!r}")
    if set(index) | set(multi) != set(expected):
        sys.exit(f"the {method} table covers other code points than Python maps")


def cpp_delta_runs(name, runs):
    rows = [f"    {{0x{a:X}, 0x{b:X}, {s}, {d}}}," for a, b, s, d in runs]
    return f"constexpr DeltaRun k{name}[] = {{\n" + "\n".join(rows) + "\n};\n"


def cpp_expansions(name, multi):
    rows = []
    for c in sorted(multi):
        to = [ord(x) for x in multi[c]]
        if len(to) > 3:
            sys.exit(f"U+{c:04X} maps to {len(to)} code points; Expansion holds 3")
        rows.append(f"    {{0x{c:X}, {{{', '.join(f'0x{t:X}' for t in to + [0] * (3 - len(to)))}}}}},")
    return f"constexpr Expansion k{name}[] = {{\n" + "\n".join(rows) + "\n};\n"


def cpp_ranges(name, rs):
    cells = [f"{{0x{a:X}, 0x{b:X}}}," for a, b in rs]
    lines, line = [], "   "
    for cell in cells:
        if len(line) + 1 + len(cell) > 110:
            lines.append(line)
            line = "   "
        line += " " + cell
    lines.append(line)
    return f"constexpr Range k{name}[] = {{\n" + "\n".join(lines) + "\n};\n"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=os.path.join(ROOT, "evals", "unicode_case_table.cpp"))
    args = p.parse_args()

    tables = {}
    for method in ("lower", "title"):
        mapped = mappings(method)
        single = {c: ord(m) for c, m in mapped.items() if len(m) == 1}
        multi = {c: m for c, m in mapped.items() if len(m) > 1}
        runs = delta_runs(single)
        check(runs, multi, method, mapped)
        tables[method] = (runs, multi)
    ignorable, cased = sigma_classes()
    ws = white_space()

    py, ucd = platform.python_version(), unicodedata.unidata_version
    body = [
        f"// GENERATED by scripts/make_unicode_case_table.py from Python {py} (unicodedata.unidata_version",
        f"// {ucd}); do not edit. Every entry is the running Python's own answer for that code point: see the",
        "// script. Regenerate this file and tests/fixtures/evals/unicode (scripts/make_unicode_fixtures.py) with",
        "// the same Python.",
        '#include "evals/unicode_case_table.hpp"',
        "",
        "namespace moelab::evals::unicode_table {",
        "",
        f'const char* const python_version = "{py}";',
        f'const char* const unicode_version = "{ucd}";',
        "",
        "namespace {",
        "",
        "// chr(c).lower() of one code point: runs {first, last, step, delta} (c = first, first + step, ... <= last",
        "// becomes c + delta), then the mappings to several code points.",
        cpp_delta_runs("LowerRuns", tables["lower"][0]),
        cpp_expansions("LowerExpansions", tables["lower"][1]),
        "// chr(c).title(): the same two forms.",
        cpp_delta_runs("TitleRuns", tables["title"][0]),
        cpp_expansions("TitleExpansions", tables["title"][1]),
        "// chr(c).isspace(): str.strip(), str.split() and re's \\s.",
        cpp_ranges("WhiteSpace", ranges(ws)),
        "// The final-sigma rule's classes: case-ignorable (skipped looking for a cased neighbour), and cased",
        "// but not case-ignorable.",
        cpp_ranges("CaseIgnorable", ranges(ignorable)),
        cpp_ranges("Cased", ranges(cased)),
        "}  // namespace",
        "",
        "const std::span<const DeltaRun> lower_runs = kLowerRuns;",
        "const std::span<const Expansion> lower_expansions = kLowerExpansions;",
        "const std::span<const DeltaRun> title_runs = kTitleRuns;",
        "const std::span<const Expansion> title_expansions = kTitleExpansions;",
        "const std::span<const Range> white_space = kWhiteSpace;",
        "const std::span<const Range> case_ignorable = kCaseIgnorable;",
        "const std::span<const Range> cased = kCased;",
        "",
        "}  // namespace moelab::evals::unicode_table",
        "",
    ]
    with open(args.out, "w", encoding="utf-8", newline="\n") as f:
        f.write("\n".join(body))
    print(f"{args.out}: Python {py}, Unicode {ucd}; lower {len(tables['lower'][0])} runs + "
          f"{len(tables['lower'][1])} expansions, title {len(tables['title'][0])} runs + "
          f"{len(tables['title'][1])} expansions, {len(ranges(ws))} white-space ranges, "
          f"{len(ranges(ignorable))} case-ignorable and {len(ranges(cased))} cased ranges")


if __name__ == "__main__":
    main()
