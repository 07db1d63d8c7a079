#!/usr/bin/env python3
"""Build a small multi-domain text corpus from files every Debian system has, plus synthetic arithmetic.

Usage:
    scripts/make_domain_corpus.py OUTDIR [--seed 0] [--train-bytes 200000] [--heldout-bytes 20000]
                                         [--max-doc-bytes 4000] [--domains code-c,legal,...]

Writes
    OUTDIR/corpus.jsonl    training split
    OUTDIR/heldout.jsonl   held-out split (no source file is in both)
    OUTDIR/manifest.json   counts and bytes per domain and split, sha256 of both JSONL files, the
                           settings, the Debian release, and every source path used
    OUTDIR/README.md       the same in words
Each JSONL line is {"text": ..., "domain": ..., "source": ...}; `source` is the file path (with
"#topic" for Python documentation topics) or "synthetic:arithmetic/...". Lines interleave the domains
round-robin, so reading only the start of a file (`moelab trace --max-tokens`) still covers every domain.
`moelab trace --input OUTDIR/corpus.jsonl` reads the `domain` field as the label.

Domains, in the spirit of the Pile subsets the Mixtral paper routes (its DM Mathematics is synthetic too).
Sources are taken from dpkg's file lists (/var/lib/dpkg/info/PKG.list) of fixed packages, not from
directory scans, so other installed software cannot change the corpus:
    code-c       C headers (*.h) of libc6-dev and linux-libc-dev (there whenever a C compiler is)
    code-python  Python standard library modules (*.py) of libpython3.X-stdlib / -minimal
    code-shell   sh/bash scripts (by #! line) owned by the Essential packages (dpkg status "Essential: yes")
    legal        license texts in /usr/share/common-licenses (base-files) and the Essential packages'
                 /usr/share/doc/PKG/copyright files
    prose-docs   English documentation prose: the Python reference/library topics in
                 pydoc_data/topics.py (libpython3.X-stdlib), one document per topic
    manpages     manual pages (sections 1, 5, 7, 8; English) of the Essential packages, roff markup
                 stripped to plain text. Minimal container images often omit /usr/share/man; the domain
                 is then empty, reported, and left out.
    arithmetic   synthetic question/answer drill ("What is 37 + 85?\\nAnswer: 122") from a seeded RNG:
                 addition, subtraction, multiplication, exact division, remainders, linear equations,
                 powers, gcd, primality, sorting
A leading comment block that mentions a copyright or license is dropped from code files (otherwise
every glibc header would start with LGPL text and blur code with legal). A source's text is cut at
line boundaries into consecutive documents of at most --max-doc-bytes, at most --max-docs-per-source
of them (so no long file dominates a domain); documents shorter than 200 bytes are dropped; files
that are not UTF-8 or contain NUL are skipped; a document whose text occurred before is kept once.

Split and caps: per domain, the sources (sorted by path) are shuffled with random.Random(f"{seed}/
{domain}"); walking that order, every 10th source goes to held-out while it is under --heldout-bytes,
the others to train while it is under --train-bytes (a source that would find its split full goes to
the other one), until both are full or the sources run out. All documents of one source go to the same
split, so train and held-out share no file. Each split ends at most one source past its cap; domains
with little text on the system (code-shell, legal) may end below it.

Determinism: the same OUTDIR contents (byte for byte; compare the sha256 in manifest.json) for the same
seed and options on the same Debian release with the same versions of these packages. Another release
(or a point update of one of these packages) has different file contents, hence a different corpus;
manifest.json records /etc/debian_version and each domain's package versions to tell. Only the Python
standard library is used; no network.
"""
from __future__ import annotations

import argparse
import ast
import glob
import gzip
import hashlib
import json
import math
import os
import random
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

DPKG = Path("/var/lib/dpkg")
MIN_DOC_BYTES = 200
HELDOUT_EVERY = 10


# ---- dpkg: which files belong to which package ----------------------------------------------------

def dpkg_status() -> list[dict[str, str]]:
    """Paragraphs of /var/lib/dpkg/status as dicts (first line of each field only)."""
    text = (DPKG / "status").read_text(encoding="utf-8", errors="replace")
    return [dict(re.findall(r"^([A-Za-z-]+): (.*)$", para, re.M)) for para in text.split("\n\n") if para.strip()]


def installed(status: list[dict[str, str]]) -> dict[str, str]:
    """Installed package name -> version."""
    return {p["Package"]: p.get("Version", "") for p in status
            if p.get("Status", "").endswith(" installed") and "Package" in p}


def essential_packages(status: list[dict[str, str]]) -> list[str]:
    return sorted(p["Package"] for p in status
                  if p.get("Essential") == "yes" and p.get("Status", "").endswith(" installed"))


def package_files(pkg: str) -> list[str]:
    """Regular files (not links, not directories) listed for an installed package, sorted."""
    files: set[str] = set()
    for lst in sorted(glob.glob(str(DPKG / "info" / f"{pkg}.list")) + glob.glob(str(DPKG / "info" / f"{pkg}:*.list"))):
        for line in Path(lst).read_text(encoding="utf-8", errors="replace").splitlines():
            if line and os.path.isfile(line) and not os.path.islink(line):
                files.add(line)
    return sorted(files)


def python_stdlib_packages(have: dict[str, str]) -> list[str]:
    return sorted(p for p in have if re.fullmatch(r"libpython3\.\d+-(stdlib|minimal)", p))


# ---- text cleaning ---------------------------------------------------------------------------------

def read_text(path: str) -> str | None:
    """UTF-8 text of a file (gunzipped when .gz), or None for binary / undecodable files."""
    try:
        raw = Path(path).read_bytes()
        if path.endswith(".gz"):
            raw = gzip.decompress(raw)
        if b"\0" in raw:
            return None
        return raw.decode("utf-8").replace("\r\n", "\n")
    except (OSError, UnicodeDecodeError, EOFError, gzip.BadGzipFile):
        return None


_LICENSE_WORDS = re.compile(r"copyright|license|licence", re.I)


def drop_license_header(text: str) -> str:
    """Drops a leading comment block (/* ... */, or # lines after an optional #! line) that mentions
    a copyright or license."""
    stripped = text.lstrip()
    if stripped.startswith("/*"):
        end = stripped.find("*/")
        if end > 0 and _LICENSE_WORDS.search(stripped[:end]):
            return stripped[end + 2:].lstrip("\n")
        return text
    lines = text.split("\n")
    start = 1 if lines and lines[0].startswith("#!") else 0
    end = start
    while end < len(lines) and (lines[end].startswith("#") or not lines[end].strip()):
        end += 1
    if end > start and _LICENSE_WORDS.search("\n".join(lines[start:end])):
        return "\n".join(lines[:start] + lines[end:])
    return text


def cut(text: str, max_bytes: int) -> str:
    """The longest prefix of whole lines within max_bytes (a hard cut when the first line is longer)."""
    data = text.encode("utf-8")
    if len(data) <= max_bytes:
        return text
    head = data[:max_bytes]
    nl = head.rfind(b"\n")
    if nl > 0:
        head = head[:nl + 1]
    return head.decode("utf-8", errors="ignore")


def chunks(text: str, max_bytes: int, max_count: int) -> list[str]:
    """Consecutive line-boundary pieces of at most max_bytes each, at most max_count of them."""
    out = []
    while text and len(out) < max_count:
        piece = cut(text, max_bytes)
        if not piece:  # a character wider than max_bytes: give up on the rest
            break
        out.append(piece)
        text = text[len(piece):]
    return out


# Roff requests that only format; their arguments are not text.
_ROFF_DROP = set("""TH Dd Dt Os de ds nr if ie el so sp br nf fi in ti ft ps ne na ad hy nh ll RS RE PD UC ta tr
cs bp ig rm cc ec eo mso vs ss fam ev ft HP PP P LP TP TQ EX EE ME UE SY YS OP ns rs""".split())
_ROFF_ALTERNATING = {"BR", "IR", "RB", "RI", "BI", "IB"}
_ROFF_CHARS = {"em": "--", "en": "-", "aq": "'", "dq": '"', "bu": "*", "lq": '"', "rq": '"', "oq": "'", "cq": "'",
               "ha": "^", "ti": "~", "rs": "\\", "co": "(C)", "mi": "-", "pl": "+", "mu": "x", "<=": "<=", ">=": ">="}


def roff_inline(s: str) -> str:
    s = re.sub(r"\\f(\[[^\]]*\]|\(..|.)", "", s)            # font changes
    s = re.sub(r"\\s[+-]?\d", "", s)                         # size changes
    s = re.sub(r"\\\((..)", lambda m: _ROFF_CHARS.get(m.group(1), ""), s)
    s = re.sub(r"\\\[(\w+)\]", lambda m: _ROFF_CHARS.get(m.group(1), ""), s)
    s = re.sub(r"\\\*(\(..|\[[^\]]*\]|.)", "", s)          # predefined strings
    s = s.replace("\\-", "-").replace("\\e", "\\").replace("\\ ", " ").replace("\\~", " ")
    s = re.sub(r"\\[&|^%:c]", "", s)
    return s


def roff_args(rest: str) -> list[str]:
    return [a[1:-1] if len(a) >= 2 and a[0] == a[-1] == '"' else a for a in re.findall(r'"[^"]*"|\S+', rest)]


def man_to_text(src: str) -> str:
    """Plain text of a man page: comments and formatting requests dropped, font escapes removed,
    macro arguments (headings, bold/italic words) kept as text."""
    out: list[str] = []
    for line in src.split("\n"):
        if line.startswith(('.\\"', "'\\\"", '.\\#')) or line.strip() in (".", "'"):
            continue
        if line.startswith((".", "'")):
            m = re.match(r"[.'](\S+)\s*(.*)", line)
            if not m:
                continue
            name, rest = m.group(1), m.group(2)
            if name in _ROFF_DROP or name.islower():
                if name in ("PP", "P", "LP", "TP", "sp", "HP"):
                    out.append("")
                continue
            sep = "" if name in _ROFF_ALTERNATING else " "
            text = sep.join(roff_args(rest))
            if name in ("SH", "SS"):
                out.extend(["", text.upper() if name == "SH" else text])
            elif text:
                out.append(roff_inline(text))
            continue
        out.append(roff_inline(line))
    text = "\n".join(out)
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


# ---- domains ---------------------------------------------------------------------------------------

@dataclass
class Doc:
    source: str
    text: str


@dataclass
class Source:
    """One file (or documentation topic) and the documents cut from it; the unit of the split."""
    name: str
    docs: list[str]

    def nbytes(self) -> int:
        return sum(len(d.encode("utf-8")) for d in self.docs)


@dataclass
class Domain:
    name: str
    packages: Callable[[list[dict[str, str]]], list[str]]  # which packages' files to consider
    select: Callable[[str], bool]                           # which of their files
    read: Callable[[str], Iterable[Doc]]                    # a file's documents
    what: str = ""
    package_versions: dict[str, str] = field(default_factory=dict)


def read_code(path: str) -> Iterable[Doc]:
    text = read_text(path)
    if text is not None:
        yield Doc(path, drop_license_header(text))


def read_plain(path: str) -> Iterable[Doc]:
    text = read_text(path)
    if text is not None:
        yield Doc(path, text)


def read_man(path: str) -> Iterable[Doc]:
    text = read_text(path)
    if text is not None and not text.lstrip().startswith(".so "):  # ".so" pages only include another page
        yield Doc(path, man_to_text(text))


def read_pydoc_topics(path: str) -> Iterable[Doc]:
    """pydoc_data/topics.py is `topics = {name: text, ...}`: one document per topic, in key order."""
    tree = ast.parse(Path(path).read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "topics" for t in node.targets):
            topics = ast.literal_eval(node.value)
            for key in sorted(topics):
                yield Doc(f"{path}#{key}", topics[key])


_SHELL_SHEBANG = re.compile(rb"#!\s*/(usr/)?bin/(env\s+)?(ba|da)?sh\b")


def is_shell_script(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return bool(_SHELL_SHEBANG.match(f.read(64)))
    except OSError:
        return False


def domains() -> list[Domain]:
    stdlib = lambda st: python_stdlib_packages(installed(st))  # noqa: E731
    return [
        Domain("code-c", lambda st: ["libc6-dev", "linux-libc-dev"],
               lambda p: p.startswith("/usr/include/") and p.endswith(".h"), read_code,
               "C headers of libc6-dev and linux-libc-dev"),
        Domain("code-python", stdlib,
               lambda p: p.endswith(".py") and "/pydoc_data/" not in p, read_code,
               "Python standard library modules"),
        Domain("code-shell", essential_packages, is_shell_script, read_code,
               "sh/bash scripts of the Essential packages"),
        Domain("legal", lambda st: sorted(set(essential_packages(st)) | {"base-files"}),
               lambda p: p.startswith("/usr/share/common-licenses/")
               or re.fullmatch(r"/usr/share/doc/[^/]+/copyright", p) is not None, read_plain,
               "license texts in /usr/share/common-licenses and the Essential packages' copyright files"),
        Domain("prose-docs", stdlib,
               lambda p: p.endswith("/pydoc_data/topics.py"), read_pydoc_topics,
               "Python reference and library documentation topics (pydoc_data/topics.py)"),
        Domain("manpages", essential_packages,
               lambda p: re.match(r"/usr/share/man/man[1578]/", p) is not None, read_man,
               "manual pages (sections 1, 5, 7, 8) of the Essential packages, as plain text"),
    ]


def file_sources(domain: Domain, status: list[dict[str, str]], max_doc_bytes: int, max_docs: int) -> list[Source]:
    """Every usable source of a domain with its documents, sorted by name; a document text seen
    before (in this domain) is dropped."""
    have = installed(status)
    files: set[str] = set()
    for pkg in domain.packages(status):
        if pkg in have:
            domain.package_versions[pkg] = have[pkg]
            files.update(f for f in package_files(pkg) if domain.select(f))
    sources, seen = [], set()
    for path in sorted(files):
        for doc in domain.read(path):
            kept = []
            for text in chunks(doc.text, max_doc_bytes, max_docs):
                digest = hashlib.sha256(text.encode("utf-8")).digest()
                if len(text.encode("utf-8")) >= MIN_DOC_BYTES and digest not in seen:
                    seen.add(digest)
                    kept.append(text)
            if kept:
                sources.append(Source(doc.source, kept))
    return sorted(sources, key=lambda s: s.name)


# ---- synthetic arithmetic --------------------------------------------------------------------------

def is_prime(n: int) -> bool:
    return n >= 2 and all(n % d for d in range(2, int(n ** 0.5) + 1))


def arithmetic_question(rng: random.Random) -> tuple[str, str]:
    """One question and its exact answer."""
    kind = rng.randrange(10)
    a, b = rng.randint(-999, 999), rng.randint(-999, 999)
    if kind == 0:
        return f"What is {a} + {b}?", str(a + b)
    if kind == 1:
        return f"Calculate {a} - {b}.", str(a - b)
    if kind == 2:
        x, y = rng.randint(-99, 99), rng.randint(-99, 99)
        return f"What is {x} times {y}?", str(x * y)
    if kind == 3:
        q, d = rng.randint(-200, 200), rng.choice([x for x in range(-25, 26) if x])
        return f"Divide {q * d} by {d}.", str(q)
    if kind == 4:
        n, d = rng.randint(10, 9999), rng.randint(2, 97)
        return f"What is the remainder when {n} is divided by {d}?", str(n % d)
    if kind == 5:
        c, x = rng.choice([x for x in range(-12, 13) if x]), rng.randint(-50, 50)
        k = rng.randint(-99, 99)
        return f"Solve {c}*x {'+' if k >= 0 else '-'} {abs(k)} = {c * x + k} for x.", str(x)
    if kind == 6:
        base, e = rng.randint(2, 12), rng.randint(2, 6)
        return f"What is {base} to the power of {e}?", str(base ** e)
    if kind == 7:
        g = rng.randint(1, 30)
        x, y = g * rng.randint(1, 40), g * rng.randint(1, 40)
        return f"What is the greatest common divisor of {x} and {y}?", str(math.gcd(x, y))
    if kind == 8:
        n = rng.randint(2, 2000)
        return f"Is {n} a prime number?", str(is_prime(n))
    xs = [rng.randint(-99, 99) for _ in range(rng.randint(3, 6))]
    return f"Sort {', '.join(map(str, xs))} in increasing order.", ", ".join(map(str, sorted(xs)))


def arithmetic_sources(seed: int, total_bytes: int, max_doc_bytes: int) -> list[Source]:
    """Documents of question/answer pairs until total_bytes, each up to max_doc_bytes, one per source."""
    rng = random.Random(f"{seed}/arithmetic")
    docs: list[Source] = []
    size = 0
    while size < total_bytes:
        lines: list[str] = []
        target = rng.randint(max_doc_bytes // 4, max_doc_bytes)
        while sum(len(l) + 1 for l in lines) < target:
            q, a = arithmetic_question(rng)
            lines.append(f"{q}\nAnswer: {a}\n")
        text = cut("\n".join(lines), max_doc_bytes)
        docs.append(Source(f"synthetic:arithmetic/seed={seed}/doc={len(docs)}", [text]))
        size += len(text.encode("utf-8"))
    return docs


# ---- split and write -------------------------------------------------------------------------------

def split(sources: list[Source], seed: int, domain: str, train_cap: int,
          heldout_cap: int) -> tuple[list[Source], list[Source]]:
    """Shuffled walk: every 10th source to held-out, the rest to train, each until its cap."""
    order = list(sources)
    random.Random(f"{seed}/{domain}").shuffle(order)
    train: list[Source] = []
    heldout: list[Source] = []
    tb = hb = 0
    for i, src in enumerate(order):
        want_heldout = i % HELDOUT_EVERY == HELDOUT_EVERY - 1
        if (want_heldout or tb >= train_cap) and hb < heldout_cap:
            heldout.append(src)
            hb += src.nbytes()
        elif tb < train_cap:
            train.append(src)
            tb += src.nbytes()
        else:  # both full
            break
    return train, heldout


def documents(sources: list[Source]) -> list[Doc]:
    return [Doc(s.name, text) for s in sources for text in s.docs]


def interleave(per_domain: list[tuple[str, list[Doc]]]) -> list[dict[str, str]]:
    """Round-robin over domains, so any prefix of the file covers every domain."""
    records = []
    for i in range(max((len(d) for _, d in per_domain), default=0)):
        for name, docs in per_domain:
            if i < len(docs):
                records.append({"text": docs[i].text, "domain": name, "source": docs[i].source})
    return records


def write_jsonl(path: Path, records: list[dict[str, str]]) -> str:
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
    return hashlib.sha256(data).hexdigest()


def debian_release() -> str:
    try:
        return Path("/etc/debian_version").read_text().strip()
    except OSError:
        return "unknown (not Debian?)"


def readme(manifest: dict) -> str:
    lines = [
        "# Multi-domain corpus",
        "",
        "Made by `scripts/make_domain_corpus.py` (see its docstring for every source and rule) with seed "
        f"{manifest['settings']['seed']} on Debian {manifest['debian_version']}.",
        "",
        "| domain | train docs | train bytes | held-out docs | held-out bytes | source |",
        "|---|---|---|---|---|---|",
    ]
    for name, d in manifest["domains"].items():
        lines.append(f"| {name} | {d['train']['records']} | {d['train']['bytes']} | {d['heldout']['records']} | "
                     f"{d['heldout']['bytes']} | {d['what']} |")
    lines += ["", "| file | sha256 |", "|---|---|"]
    lines += [f"| {f} | {h} |" for f, h in manifest["sha256"].items()]
    if manifest["empty_domains"]:
        lines += ["", "Empty on this system, left out: " + ", ".join(manifest["empty_domains"]) + "."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("outdir", type=Path)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--train-bytes", type=int, default=200_000, help="cap per domain, train split (UTF-8 bytes)")
    ap.add_argument("--heldout-bytes", type=int, default=20_000, help="cap per domain, held-out split")
    ap.add_argument("--max-doc-bytes", type=int, default=4000, help="documents are at most this many bytes")
    ap.add_argument("--max-docs-per-source", type=int, default=4, help="documents cut from one file at most")
    ap.add_argument("--domains", default="", help="comma-separated subset of the domains (default: all)")
    args = ap.parse_args(argv)
    if not (DPKG / "status").exists():
        print("make_domain_corpus: no dpkg database at /var/lib/dpkg; this script needs a Debian system",
              file=sys.stderr)
        return 1
    all_names = [d.name for d in domains()] + ["arithmetic"]
    wanted = [w for w in args.domains.split(",") if w] or all_names
    unknown = sorted(set(wanted) - set(all_names))
    if unknown:
        print(f"make_domain_corpus: unknown domains {unknown}; known: {all_names}", file=sys.stderr)
        return 1

    status = dpkg_status()
    train_by, heldout_by = [], []
    manifest: dict = {
        "format": "moelab-domain-corpus-v1",
        "debian_version": debian_release(),
        "settings": {"seed": args.seed, "train_bytes": args.train_bytes, "heldout_bytes": args.heldout_bytes,
                     "max_doc_bytes": args.max_doc_bytes, "heldout_every": HELDOUT_EVERY,
                     "max_docs_per_source": args.max_docs_per_source,
                     "min_doc_bytes": MIN_DOC_BYTES},
        "domains": {},
        "empty_domains": [],
    }
    for name in all_names:
        if name not in wanted:
            continue
        if name == "arithmetic":
            dom = None
            sources = arithmetic_sources(args.seed, args.train_bytes + args.heldout_bytes + 2 * args.max_doc_bytes,
                                         args.max_doc_bytes)
        else:
            dom = next(d for d in domains() if d.name == name)
            sources = file_sources(dom, status, args.max_doc_bytes, args.max_docs_per_source)
        train_src, heldout_src = split(sources, args.seed, name, args.train_bytes, args.heldout_bytes)
        train, heldout = documents(train_src), documents(heldout_src)
        if not train and not heldout:
            print(f"make_domain_corpus: domain {name}: no documents on this system, left out", file=sys.stderr)
            manifest["empty_domains"].append(name)
            continue
        train_by.append((name, train))
        heldout_by.append((name, heldout))
        manifest["domains"][name] = {
            "what": dom.what if dom else "synthetic question/answer arithmetic (seeded)",
            "packages": dom.package_versions if dom else {},
            "candidate_sources": len(sources),
            "train": {"records": len(train), "bytes": sum(s.nbytes() for s in train_src),
                      "sources": [s.name for s in train_src]},
            "heldout": {"records": len(heldout), "bytes": sum(s.nbytes() for s in heldout_src),
                        "sources": [s.name for s in heldout_src]},
        }
        print(f"{name:12} train {len(train):4} docs {manifest['domains'][name]['train']['bytes']:7} B   "
              f"held-out {len(heldout):3} docs {manifest['domains'][name]['heldout']['bytes']:6} B")

    args.outdir.mkdir(parents=True, exist_ok=True)
    manifest["sha256"] = {
        "corpus.jsonl": write_jsonl(args.outdir / "corpus.jsonl", interleave(train_by)),
        "heldout.jsonl": write_jsonl(args.outdir / "heldout.jsonl", interleave(heldout_by)),
    }
    (args.outdir / "manifest.json").write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n",
                                               encoding="utf-8")
    (args.outdir / "README.md").write_text(readme(manifest), encoding="utf-8")
    print(f"wrote {args.outdir}/corpus.jsonl ({manifest['sha256']['corpus.jsonl'][:12]}), "
          f"heldout.jsonl ({manifest['sha256']['heldout.jsonl'][:12]}), manifest.json, README.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
