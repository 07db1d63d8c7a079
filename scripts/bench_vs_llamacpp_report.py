#!/usr/bin/env python3
"""The table of scripts/bench_vs_llamacpp.sh: reads its raw folder, writes results.json and results.md.

Needs gguf-py (llama.cpp's; the script runs this with its converter venv) to read the GGUF tensor sizes.

Weight bytes read per decoded token (batch 1): every tensor except the experts' and the embedding, top_k /
num_experts of the expert tensors, and one row of the embedding. llama.cpp: the GGUF tensors as stored
(llama.cpp computes on them as stored; on x86 it repacks Q4_0/IQ4_NL into interleaved rows of the same
size). moelab: the NF4 codes as stored, the absmax at --nf4-absmax-bytes per block (the engine's
in-memory form: FP32 today, 1 byte + the nested FP32 scales when kept double-quantized), the lm_head and
embedding at --lm-head-bytes per weight, norms and other float tensors at 4 bytes (FP32 in memory).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import statistics
import struct
import sys


def read_json(path):
    with open(path) as f:
        return json.load(f)


def gnu_time(path):
    """(max RSS bytes, wall seconds) from a `/usr/bin/time -v` report."""
    rss = wall = None
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line.startswith("Maximum resident set size (kbytes):"):
                rss = int(line.rsplit(":", 1)[1]) * 1024
            elif line.startswith("Elapsed (wall clock) time"):
                v = line.split("):", 1)[1].strip()
                parts = [float(p) for p in v.split(":")]
                wall = 0.0
                for p in parts:
                    wall = wall * 60 + p
    return rss, wall


def gguf_bytes_per_token(path):
    from gguf import GGUFReader  # llama.cpp's gguf-py

    r = GGUFReader(path)
    kv = {f.name: f for f in r.fields.values()}

    def field_int(suffix):
        for name, f in kv.items():
            if name.endswith(suffix):
                return int(f.parts[f.data[0]][0])
        raise KeyError(suffix)

    n_exp = field_int(".expert_count")
    top_k = field_int(".expert_used_count")
    total = 0.0
    file_weights = 0
    types = {}
    for t in r.tensors:
        n = int(t.n_bytes)
        file_weights += n
        types.setdefault(t.tensor_type.name, 0)
        types[t.tensor_type.name] += n
        if "_exps" in t.name:
            total += n * top_k / n_exp
        elif t.name.startswith("token_embd"):
            total += n / int(t.shape[-1])  # one row (gguf shapes are [ne0, ne1]: ne1 = rows)
        else:
            total += n
    out_type = next((t.tensor_type.name for t in r.tensors if t.name == "output.weight"), None)
    return {"bytes_per_token": total, "weight_bytes": file_weights, "bytes_by_type": types, "output_type": out_type,
            "file_bytes": os.path.getsize(path)}


def safetensors_headers(folder):
    out = {}
    for p in sorted(glob.glob(os.path.join(folder, "*.safetensors"))):
        with open(p, "rb") as f:
            n = struct.unpack("<Q", f.read(8))[0]
            h = json.loads(f.read(n))
        h.pop("__metadata__", None)
        out.update(h)
    return out


def nf4_bytes_per_token(folder, lm_head_bytes, absmax_bytes):
    cfg = read_json(os.path.join(folder, "config.json"))
    n_exp, top_k = cfg["num_local_experts"], cfg["num_experts_per_tok"]
    hidden, vocab = cfg["hidden_size"], cfg["vocab_size"]
    h = safetensors_headers(folder)
    size = {k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in h.items()}
    quantized = {k[: -len(".absmax")] for k in h if k.endswith(".absmax")}
    mem = stored = 0.0
    for k, v in h.items():
        base = k
        for suffix in (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map", ".quant_state.bitsandbytes__nf4"):
            if k.endswith(suffix):
                base = k[: -len(suffix)]
        share = top_k / n_exp if ".block_sparse_moe.experts." in base else 1.0
        if base.startswith("model.embed_tokens"):
            mem += hidden * lm_head_bytes
            stored += size[k] / vocab
            continue
        if base.startswith("lm_head"):
            mem += vocab * hidden * lm_head_bytes
            stored += size[k]
            continue
        stored += size[k] * share
        if base in quantized:
            if k == base:
                mem += size[k] * share  # the 4-bit codes
            elif k.endswith(".absmax"):
                mem += v["shape"][0] * absmax_bytes * share
            elif k.endswith(".nested_absmax") and absmax_bytes < 4:
                mem += size[k] * share
        else:
            n = 1
            for d in v["shape"]:
                n *= d
            mem += n * 4 * share  # float tensors (norms) in FP32
    return {"bytes_per_token": mem, "bytes_per_token_as_stored": stored,
            "lm_head_bytes_per_weight": lm_head_bytes, "absmax_bytes": absmax_bytes}


def llama_results(raw, fmt):
    rounds = []
    for p in sorted(glob.glob(os.path.join(raw, f"llama-{fmt}-r*.json"))):
        m = re.search(rf"llama-{re.escape(fmt)}-r(\d+)\.json$", p)
        if not m:
            continue
        r = m.group(1)
        entry = {"round": int(r)}
        for t in read_json(p):
            if t["n_prompt"] == 0 and t["n_gen"] > 0:
                entry["decode_tok_s"] = t["avg_ts"]
                entry["decode_samples"] = t.get("samples_ts")
            elif t["n_gen"] == 0:
                entry[f"prefill{t['n_prompt']}_tok_s"] = t["avg_ts"]
                entry[f"prefill{t['n_prompt']}_samples"] = t.get("samples_ts")
        entry["peak_rss"], entry["bench_wall_s"] = gnu_time(p[: -len(".json")] + ".time")
        entry["load_rss"], entry["load_s"] = gnu_time(p[: -len(".json")] + "-load.time")
        rounds.append(entry)
    return sorted(rounds, key=lambda e: e["round"])


def moelab_results(raw):
    runs = []
    for p in sorted(glob.glob(os.path.join(raw, "moelab-nf4-r*-*-p128.json"))):
        m = re.search(r"moelab-nf4-r(\d+)-(\d+)-p128\.json$", p)
        tag = p[: -len("-p128.json")]
        entry = {"round": int(m.group(1)), "index": int(m.group(2))}
        d128 = read_json(p)["phases"]
        entry["prefill128_tok_s"] = d128["prefill"]["tokens"] / d128["prefill"]["wall_seconds"]
        if "decode" in d128:
            entry["decode_tok_s"] = d128["decode"]["tokens"] / d128["decode"]["wall_seconds"]
        d512 = read_json(tag + "-p512.json")["phases"]
        entry["prefill512_tok_s"] = d512["prefill"]["tokens"] / d512["prefill"]["wall_seconds"]
        rss128, w128 = gnu_time(tag + "-p128.time")
        rss512, w512 = gnu_time(tag + "-p512.time")
        entry["peak_rss"] = max(rss128 or 0, rss512 or 0)
        entry["load_rss"], entry["load_s"] = gnu_time(tag + "-load.time")
        runs.append(entry)
    return sorted(runs, key=lambda e: (e["round"], e["index"]))


def moelab_engine_line(raw):
    """What cpu-nf4 says when it loads: '[cpu-nf4] loaded in 1.40s: 1800.5 MiB of weights, avx2 kernels,
    int8 activations[, q8 lm_head], 2 threads' (the first load run's)."""
    for p in sorted(glob.glob(os.path.join(raw, "moelab-nf4-r*-load.txt"))):
        with open(p) as f:
            for line in f:
                if not line.startswith("[cpu-nf4] loaded in"):
                    continue
                out = {"line": line.strip()}
                m = re.search(r"loaded in ([0-9.]+)s", line)
                if m:
                    out["engine_load_s"] = float(m.group(1))
                for key, pat in (("weights_mib", r"([0-9.]+) MiB of weights"), ("kernels", r"(\S+) kernels"),
                                 ("activations", r"(\S+) activations"), ("lm_head", r"(\S+) lm_head")):
                    m = re.search(pat, line)
                    if m:
                        out[key] = float(m.group(1)) if key == "weights_mib" else m.group(1)
                return out
    return {}


def probes(raw):
    out = []
    for p in sorted(glob.glob(os.path.join(raw, "probe-*.json"))):
        label = os.path.basename(p)[len("probe-"): -len(".json")]
        try:
            d = read_json(p)
        except (OSError, ValueError):
            print(f"warning: {p}: not a google-benchmark JSON report, ignored", file=sys.stderr)
            continue
        bw = [b["bytes_per_second"] for b in d.get("benchmarks", [])
              if b.get("name", "").startswith("ReadBandwidth") and "bytes_per_second" in b]
        if bw:
            out.append({"label": label, "bytes_per_second": max(bw)})
    return out


def fmt_vals(vals, f):
    vals = [v for v in vals if v is not None]
    if not vals:
        return "-"
    if len(vals) <= 3:
        return ", ".join(f(v) for v in vals)
    return f"{f(statistics.median(vals))} (median; {f(min(vals))}-{f(max(vals))})"


def med(vals):
    vals = [v for v in vals if v is not None]
    return statistics.median(vals) if vals else None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--raw", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--nf4", required=True, help="moelab's NF4 checkpoint folder")
    ap.add_argument("--gguf", action="append", default=[], help="FORMAT=PATH (repeatable)")
    ap.add_argument("--lm-head-bytes", default="auto",
                    help="bytes per lm_head/embedding weight in moelab's memory, or auto (from the engine's load line: "
                         "q8 1 + 4/hidden, bf16 2, fp32 4; 4 when the line does not say)")
    ap.add_argument("--nf4-absmax-bytes", default="auto",
                    help="bytes per NF4 block scale in memory, or auto (1 with int8 activations, whose kernels decode "
                         "the double-quantized absmax on the fly; 4 otherwise)")
    ap.add_argument("--threads", type=int, required=True)
    ap.add_argument("--layers", type=int, required=True)
    a = ap.parse_args()

    meta = {}
    mp = os.path.join(a.raw, "meta.tsv")
    if os.path.exists(mp):
        with open(mp) as f:
            for line in f:
                k, _, v = line.rstrip("\n").partition("\t")
                meta[k] = v
    steps = []
    sp = os.path.join(a.raw, "steps.tsv")
    if os.path.exists(sp):
        with open(sp) as f:
            for line in f:
                name, secs, what = line.rstrip("\n").split("\t", 2)
                steps.append({"step": name, "seconds": int(secs), "what": what})
    loads = []
    lp = os.path.join(a.raw, "loadavg.tsv")
    if os.path.exists(lp):
        with open(lp) as f:
            for line in f:
                t, label, la = line.rstrip("\n").split("\t", 2)
                loads.append({"time": t, "before": label, "loadavg": " ".join(la.split()[:3])})

    probe = probes(a.raw)
    best_probe = max((p["bytes_per_second"] for p in probe), default=None)

    columns = []  # (label, results list, bytes info)
    for spec in a.gguf:
        fmt, _, path = spec.partition("=")
        columns.append({"name": f"llama.cpp {fmt}", "format": fmt, "runs": llama_results(a.raw, fmt),
                        "bytes": gguf_bytes_per_token(path)})
    engine = moelab_engine_line(a.raw)
    hidden = read_json(os.path.join(a.nf4, "config.json"))["hidden_size"]
    if a.lm_head_bytes != "auto":
        lm_head_bytes = float(a.lm_head_bytes)
    else:
        lm_head_bytes = {"q8": 1 + 4 / hidden, "bf16": 2.0, "fp32": 4.0}.get(engine.get("lm_head"), 4.0)
    if a.nf4_absmax_bytes != "auto":
        absmax_bytes = float(a.nf4_absmax_bytes)
    else:
        absmax_bytes = 1.0 if engine.get("activations") == "int8" else 4.0
    nf4 = {"name": "moelab cpu-nf4", "format": "NF4", "runs": moelab_results(a.raw), "engine": engine,
           "bytes": nf4_bytes_per_token(a.nf4, lm_head_bytes, absmax_bytes)}
    columns.append(nf4)

    for c in columns:
        bpt = c["bytes"]["bytes_per_token"]
        for r in c["runs"]:
            if r.get("decode_tok_s") is not None:
                r["decode_gb_s"] = r["decode_tok_s"] * bpt / 1e9
                r["fraction_of_probe"] = r["decode_gb_s"] * 1e9 / best_probe if best_probe else None

    rows = [
        ("decode tok/s (tg32)", "decode_tok_s", lambda v: f"{v:.2f}", True),
        ("prefill 128 tok/s", "prefill128_tok_s", lambda v: f"{v:.1f}", True),
        ("prefill 512 tok/s", "prefill512_tok_s", lambda v: f"{v:.1f}", True),
        ("weight MB read per decoded token", None, None, False),
        ("decode GB/s (weights)", "decode_gb_s", lambda v: f"{v:.2f}", True),
        ("fraction of the read probe", "fraction_of_probe", lambda v: f"{v:.2f}", True),
        ("peak RSS GiB", "peak_rss", lambda v: f"{v / 2**30:.2f}", False),
        ("load s (1-token run, warm cache)", "load_s", lambda v: f"{v:.2f}", False),
    ]
    llama_cols = columns[:-1]
    header = ["", *[c["name"] for c in columns], *[f"moelab / {c['format']}" for c in llama_cols]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    table = {}
    for label, key, f, _ in rows:
        cells, medians = [], []
        for c in columns:
            if key is None:
                v = c["bytes"]["bytes_per_token"]
                cells.append(f"{v / 1e6:.0f}")
                medians.append(v)
            else:
                vals = [r.get(key) for r in c["runs"]]
                cells.append(fmt_vals(vals, f))
                medians.append(med(vals))
        ratios = []
        for m in medians[:-1]:
            ratios.append(f"{medians[-1] / m:.2f}" if m and medians[-1] is not None else "-")
        table[label] = {"values_median": dict(zip([c["name"] for c in columns], medians)),
                        "ratios": dict(zip([c["format"] for c in llama_cols], ratios))}
        lines.append("| " + " | ".join([label, *cells, *ratios]) + " |")

    md = []
    md.append(f"## moelab cpu-nf4 vs llama.cpp, Mixtral-8x7B-shaped, {a.layers} layer(s), {a.threads} thread(s)\n")
    if meta:
        md.append(f"- command: `{meta.get('command', '')}`")
        md.append(f"- CPU: {meta.get('cpu', '?')} ({meta.get('nproc', '?')} logical); moelab {meta.get('moelab_commit', '?')}; "
                  "llama.cpp from the llama-cpp-python 0.3.36 sdist")
    md.append("")
    md.extend(lines)
    md.append("")
    md.append("Each cell lists one value per run (round order); ratios are moelab / llama.cpp of the medians "
              "(higher is better for speed, lower for bytes, RSS and load time).")
    nb = nf4["bytes"]
    md.append(f"Bytes per token: llama.cpp GGUF tensors as stored (output tensor: "
              + ", ".join(f"{c['format']} {c['bytes']['output_type']}" for c in llama_cols)
              + f"); moelab NF4 with absmax at {nb['absmax_bytes']:g} B/block and lm_head/embedding at "
              f"{nb['lm_head_bytes_per_weight']:.3g} B/weight (as stored on disk: {nb['bytes_per_token_as_stored'] / 1e6:.0f} MB).")
    if engine:
        md.append(f"moelab engine: `{engine['line']}`")
    if probe:
        md.append("Read-bandwidth probe (moelab_bench ReadBandwidth): "
                  + ", ".join(f"{p['label']} {p['bytes_per_second'] / 1e9:.2f} GB/s" for p in probe)
                  + f"; fractions use the best, {best_probe / 1e9:.2f} GB/s.")
    md.append("")
    md.append("Load averages (1, 5, 15 min) before each run:")
    md.append("")
    for l in loads:
        md.append(f"- {l['time']} {l['before']}: {l['loadavg']}")
    if steps:
        md.append("")
        md.append("Steps: " + "; ".join(f"{s['step']} {s['seconds']} s ({s['what']})" for s in steps))
    text = "\n".join(md) + "\n"

    doc = {"format": "moelab-bench-vs-llamacpp-v1", "meta": meta, "layers": a.layers, "threads": a.threads,
           "columns": columns, "probe": probe, "best_probe_bytes_per_second": best_probe, "table": table,
           "loadavg": loads, "steps": steps}
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "results.json"), "w") as f:
        json.dump(doc, f, indent=2)
    with open(os.path.join(a.out, "results.md"), "w") as f:
        f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
