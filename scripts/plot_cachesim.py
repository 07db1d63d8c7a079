#!/usr/bin/env python3
"""Figures of an expert-cache simulation: PNGs from the JSON `moelab cachesim -o REPORT.json` writes.

Usage:
    scripts/plot_cachesim.py REPORT.json OUTDIR [--cache-size C]

Figures (OUTDIR/...):
    hit_rate.png           hit rate (all layers) against the cache size C, one line per policy; Belady's
                           optimum drawn thick and dashed: no demand policy is above it (a prefetching one
                           can be, by copying more)
    hit_rate_by_layer.png  per layer, the hit rate of each policy at one cache size (default: the middle one)
    bytes_per_token.png    NF4 bytes copied host->GPU per token (demand misses and prefetches, all layers)
                           against C, per policy, on a log scale (zero traffic is left out)

The layout read is docs/cachesim.md's "moelab-cachesim-v1". Needs only matplotlib (the light tier).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def by_policy(report: dict) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in report["results"]:
        out.setdefault(r["policy"], []).append(r)
    for rows in out.values():
        rows.sort(key=lambda r: r["cache_size"])
    return out


def style(policy: str) -> dict:
    return {"color": "black", "linewidth": 2.5, "linestyle": "--"} if policy == "belady" else {"linewidth": 1.5}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("report")
    ap.add_argument("outdir")
    ap.add_argument("--cache-size", type=int, default=0, help="cache size of the per-layer figure (default: the middle one)")
    a = ap.parse_args()
    report = json.loads(Path(a.report).read_text())
    if report.get("format") != "moelab-cachesim-v1":
        print(f"{a.report}: not a moelab-cachesim-v1 report (moelab cachesim -o writes one)", file=sys.stderr)
        return 1
    out = Path(a.outdir)
    out.mkdir(parents=True, exist_ok=True)
    t = report["trace"]
    what = f'{t["num_layers"]} layers, top-{t["top_k"]} of {t["num_experts"]} experts, batch {report["settings"]["batch"]}'
    rows = by_policy(report)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for policy, rs in rows.items():
        ax.plot([r["cache_size"] for r in rs], [100 * r["hit_rate"] for r in rs], marker="o", markersize=3,
                label=policy + (" (optimum)" if policy == "belady" else ""), **style(policy))
    ax.set(xlabel="experts per layer on the GPU (C)", ylabel="hit rate, %", ylim=(0, 100),
           title=f"Expert cache hit rate ({what})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "hit_rate.png", dpi=120)
    plt.close(fig)

    sizes = report["settings"]["cache_sizes"]
    c = a.cache_size or sizes[len(sizes) // 2]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for policy, rs in rows.items():
        r = next((r for r in rs if r["cache_size"] == c), None)
        if r is None or "layers" not in r:  # --json summaries have no per-layer arrays (-o reports do)
            continue
        ax.plot([l["layer"] for l in r["layers"]], [100 * (l["hit_rate"] or 0) for l in r["layers"]], marker="o",
                markersize=3, label=policy, **style(policy))
    ax.set(xlabel="layer", ylabel="hit rate, %", ylim=(0, 100), title=f"Hit rate per layer at C = {c} ({what})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "hit_rate_by_layer.png", dpi=120)
    plt.close(fig)

    if report.get("expert_bytes"):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for policy, rs in rows.items():
            pts = [(r["cache_size"], r["bytes_per_token"]["nf4"] / 1e6) for r in rs if r["bytes_per_token"]["nf4"]]
            if pts:
                ax.plot(*zip(*pts), marker="o", markersize=3, label=policy, **style(policy))
        ax.set(xlabel="experts per layer on the GPU (C)", ylabel="MB copied per token (NF4)", yscale="log",
               title=f"Host->GPU traffic per token ({what})")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "bytes_per_token.png", dpi=120)
        plt.close(fig)
    print(f"wrote {out}/hit_rate.png, hit_rate_by_layer.png" + (", bytes_per_token.png" if report.get("expert_bytes") else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
