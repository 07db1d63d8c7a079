#!/usr/bin/env python3
"""Routing figures from a moelab trace (HDF5): PNGs in the style of the Mixtral paper's section 5.

Usage:
    scripts/plot_routing.py TRACE.h5 OUTDIR [--layers 0,15,31] [--coselection-layer L]
    scripts/plot_routing.py --selftest [OUTDIR]

Figures (OUTDIR/...):
    expert_load_by_domain.png  for the chosen layers (default first, middle, last): bars per expert, one per
                               domain, height = the expert's share of the N·k expert choices in that domain
                               (the paper's Figure 7, "first or second choice"), dashed line at 1/E
    load_heatmap.png           layer × expert load share over the whole trace, colour centred on 1/E
    coselection_layerL.png     for one layer: fraction of tokens whose top-k holds both experts i and j
                               (diagonal, in brackets: fraction of tokens choosing the expert)
    repetition.png             per layer: consecutive tokens of a sequence with the same first choice, and
                               with overlapping top-k sets, overall and per domain, beside the random
                               baselines 1/E and 1 − C(E−k,k)/C(E,k) (the paper's Table 5 quantities)

The statistics follow docs/stats-json.md exactly (`moelab stats` computes the same numbers in C++); pairs of
consecutive tokens never cross a sequence boundary.

Trace layout read: /tokens int32 [N], /sequence_offsets int64 [S+1], /sequence_domain int32 [S] with
attribute domain_names, /experts uint8 [N, L, k], root attributes num_layers, top_k, num_experts (shapes are
used when an attribute is missing). Rows past the last sequence offset (left by a writer that died) are
ignored, and a file still marked open by such a writer is opened in SWMR-read mode. --selftest writes a synthetic trace with known statistics, checks the
computed numbers against their closed forms, and draws the figures from it.

Needs only h5py, numpy and matplotlib (the light tier).
"""
from __future__ import annotations

import argparse
import math
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import h5py
import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import TwoSlopeNorm  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402


# ---- reading ---------------------------------------------------------------------------------------

@dataclass
class Trace:
    experts: np.ndarray           # [N, L, k] uint8, rank order
    offsets: np.ndarray           # [S + 1] int64
    seq_domain: np.ndarray        # [S] int32; negative = unlabeled
    domain_names: list[str]
    num_experts: int

    @property
    def num_layers(self) -> int:
        return self.experts.shape[1]

    @property
    def top_k(self) -> int:
        return self.experts.shape[2]


def _names(attr) -> list[str]:
    """An HDF5 string-array attribute as str (h5py gives bytes or str depending on how it was written)."""
    if attr is None:
        return []
    if isinstance(attr, (str, bytes)):
        attr = [attr]
    return [a.decode("utf-8") if isinstance(a, bytes) else str(a) for a in np.asarray(attr).ravel()]


def _open(path: str | Path) -> h5py.File:
    """A trace whose writer died is still marked open for SWMR writing; HDF5 then refuses a plain
    read-only open, but an SWMR-read open works (analysis/trace.hpp)."""
    try:
        return h5py.File(path, "r")
    except OSError:
        return h5py.File(path, "r", swmr=True)


def read_trace(path: str | Path) -> Trace:
    with _open(path) as f:
        offsets = f["sequence_offsets"][...].astype(np.int64)
        n = int(offsets[-1]) if len(offsets) else 0
        if n > f["experts"].shape[0]:
            raise SystemExit(f"{path}: sequence_offsets end at {n}, past the {f['experts'].shape[0]} rows of /experts")
        experts = f["experts"][:n]  # rows past the last offset were never committed (a crashed writer)
        if "sequence_domain" in f:
            seq_domain = f["sequence_domain"][...].astype(np.int32)
            names = _names(f["sequence_domain"].attrs.get("domain_names", f.attrs.get("domain_names")))
        else:
            seq_domain, names = np.full(len(offsets) - 1, -1, np.int32), []
        if "num_experts" in f.attrs:
            e = int(f.attrs["num_experts"])
        elif "router_logits" in f:
            e = int(f["router_logits"].shape[2])
        else:
            e = int(experts.max()) + 1
    if len(offsets) == 0 or offsets[0] != 0 or np.any(np.diff(offsets) < 0):
        raise SystemExit(f"{path}: sequence_offsets must start at 0 and never decrease")
    return Trace(experts, offsets, seq_domain, names, e)


# ---- statistics (definitions: docs/stats-json.md) ----------------------------------------------------

def load_share(experts: np.ndarray, num_experts: int) -> np.ndarray:
    """[L, E]: each expert's share of the N·k choices per layer."""
    n, layers, k = experts.shape
    out = np.zeros((layers, num_experts))
    for l in range(layers):
        out[l] = np.bincount(experts[:, l, :].ravel(), minlength=num_experts)[:num_experts] / max(n * k, 1)
    return out


def coselection(experts: np.ndarray, layer: int, num_experts: int) -> np.ndarray:
    """[E, E]: tokens whose top-k contains both i and j (diagonal: tokens choosing i)."""
    mask = np.zeros((experts.shape[0], num_experts), np.int64)
    np.put_along_axis(mask, experts[:, layer, :].astype(np.int64), 1, axis=1)
    return mask.T @ mask


def pair_mask(offsets: np.ndarray, n: int) -> np.ndarray:
    """[N-1] bool: token t and t+1 are in the same sequence."""
    starts = np.zeros(n, bool)
    starts[offsets[:-1][offsets[:-1] < n]] = True
    return ~starts[1:]


def repetition(experts: np.ndarray, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per layer: (pairs, first-choice repeats, top-k overlaps) over consecutive pairs in one sequence."""
    n, layers, k = experts.shape
    if n < 2:
        z = np.zeros(layers, np.int64)
        return z, z, z
    same_seq = pair_mask(offsets, n)
    a, b = experts[:-1][same_seq], experts[1:][same_seq]          # [P, L, k]
    first = (a[:, :, 0] == b[:, :, 0]).sum(axis=0)
    overlap = (a[:, :, :, None] == b[:, :, None, :]).any(axis=(2, 3)).sum(axis=0)
    return np.full(layers, a.shape[0], np.int64), first, overlap


def baselines(e: int, k: int) -> tuple[float, float]:
    return 1.0 / e, 1.0 - math.comb(e - k, k) / math.comb(e, k)


def domain_groups(tr: Trace) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(name, experts, offsets) per domain with tokens, in domain-id order, unlabeled last."""
    groups = []
    ids = sorted(set(int(d) for d in tr.seq_domain if d >= 0)) + ([-1] if np.any(tr.seq_domain < 0) else [])
    for d in ids:
        seqs = np.flatnonzero(tr.seq_domain == d) if d >= 0 else np.flatnonzero(tr.seq_domain < 0)
        lengths = tr.offsets[seqs + 1] - tr.offsets[seqs]
        if lengths.sum() == 0:
            continue
        idx = np.concatenate([np.arange(tr.offsets[s], tr.offsets[s + 1]) for s in seqs])
        offs = np.concatenate([[0], np.cumsum(lengths)])
        name = tr.domain_names[d] if 0 <= d < len(tr.domain_names) else ("(unlabeled)" if d < 0 else f"domain {d}")
        groups.append((name, tr.experts[idx], offs))
    return groups


# ---- figures -----------------------------------------------------------------------------------------

def plot_load_by_domain(tr: Trace, layers: list[int], out: Path) -> None:
    groups = domain_groups(tr) or [("all", tr.experts, tr.offsets)]
    e = tr.num_experts
    fig, axes = plt.subplots(len(layers), 1, figsize=(max(8, 0.9 * e + 2), 2.6 * len(layers) + 0.8),
                             sharex=True, squeeze=False)
    width = 0.8 / len(groups)
    colors = plt.get_cmap("tab10" if len(groups) <= 10 else "tab20")
    for ax, layer in zip(axes[:, 0], layers):
        for g, (name, ex, _) in enumerate(groups):
            share = load_share(ex, e)[layer]
            ax.bar(np.arange(e) - 0.4 + width * (g + 0.5), share, width, label=name, color=colors(g % colors.N))
        ax.axhline(1 / e, color="black", linestyle="--", linewidth=1)
        ax.set_title(f"layer {layer}")
        ax.set_ylabel("selection proportion")
    axes[-1, 0].set_xticks(np.arange(e))
    axes[-1, 0].set_xlabel("expert id")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.suptitle(f"Expert load per domain: share of all top-{tr.top_k} choices (dashed: uniform 1/{e})")
    fig.legend(handles, labels, ncol=min(6, len(groups)), fontsize=8, loc="upper center", bbox_to_anchor=(0.5, 0.955))
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    fig.savefig(out, dpi=120)
    plt.close(fig)


def plot_heatmap(tr: Trace, out: Path) -> None:
    share = load_share(tr.experts, tr.num_experts)
    e, layers = tr.num_experts, tr.num_layers
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * e + 2.5), max(4, 0.28 * layers + 1.5)))
    hi = max(share.max(), 1 / e + 1e-9)
    im = ax.imshow(share, aspect="auto", cmap="RdBu_r", norm=TwoSlopeNorm(vmin=0, vcenter=1 / e, vmax=hi))
    fig.colorbar(im, ax=ax, label="load share (uniform = 1/E, white)")
    if e * layers <= 400:
        for l in range(layers):
            for i in range(e):
                dark = share[l, i] > 1 / e + 0.6 * (hi - 1 / e) or share[l, i] < 0.4 / e
                ax.text(i, l, f"{100 * share[l, i]:.1f}", ha="center", va="center", fontsize=7,
                        color="white" if dark else "black")
    ax.set_xlabel("expert id")
    ax.set_ylabel("layer")
    ax.set_xticks(np.arange(e))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title("Load share per layer and expert, % (all tokens)")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def plot_coselection(tr: Trace, layer: int, out: Path) -> None:
    e, k, n = tr.num_experts, tr.top_k, tr.experts.shape[0]
    frac = coselection(tr.experts, layer, e) / max(n, 1)
    off = np.ma.masked_array(frac, mask=np.eye(e, dtype=bool))
    fig, ax = plt.subplots(figsize=(max(5.5, 0.6 * e + 2.5), max(4.5, 0.6 * e + 1.5)))
    im = ax.imshow(off, cmap="viridis")
    fig.colorbar(im, ax=ax, label="fraction of tokens choosing both")
    if e <= 16:
        for i in range(e):
            for j in range(e):
                dark = i != j and frac[i, j] < off.min() + 0.6 * (off.max() - off.min())  # viridis is dark low
                ax.text(j, i, f"{frac[i, j]:.2f}" if i != j else f"[{frac[i, i]:.2f}]", ha="center", va="center",
                        fontsize=7, color="white" if dark else "black")
    pair = k * (k - 1) / (e * (e - 1)) if e > 1 else 0
    ax.set_title(f"Co-selection, layer {layer}: fraction of tokens choosing both (random {pair:.3f})\n"
                 f"[diagonal]: fraction of tokens choosing the expert (random {k / e:.3f})", fontsize=9)
    ax.set_xlabel("expert id")
    ax.set_ylabel("expert id")
    ax.set_xticks(np.arange(e))
    ax.set_yticks(np.arange(e))
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def plot_repetition(tr: Trace, out: Path) -> None:
    b1, b2 = baselines(tr.num_experts, tr.top_k)
    layers = np.arange(tr.num_layers)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), sharey=False)
    groups = domain_groups(tr)
    series = [("all", tr.experts, tr.offsets)] + (groups if len(groups) > 1 else [])
    for idx, (name, ex, offs) in enumerate(series):
        pairs, first, overlap = repetition(ex, offs)
        with np.errstate(invalid="ignore", divide="ignore"):
            style = dict(linewidth=2.2, color="black") if idx == 0 else dict(linewidth=1, alpha=0.8)
            axes[0].plot(layers, 100 * first / pairs, marker="o", markersize=3, label=name, **style)
            axes[1].plot(layers, 100 * overlap / pairs, marker="o", markersize=3, label=name, **style)
    second = "first or second choice" if tr.top_k == 2 else f"top-{tr.top_k} sets share an expert"
    for ax, base, title in ((axes[0], b1, "first choice"), (axes[1], b2, second)):
        ax.axhline(100 * base, color="grey", linestyle="--")
        ax.annotate(f"random {100 * base:.1f}%", (1, 100 * base), xycoords=("axes fraction", "data"),
                    xytext=(-4, 3), textcoords="offset points", ha="right", va="bottom", fontsize=8, color="grey")
        ax.set_title(title)
        ax.set_xlabel("layer")
        ax.set_ylabel("% of consecutive token pairs")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylim(bottom=min(ax.get_ylim()[0], 100 * base - 3))
    # one legend outside the panels, so it never hides a line
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, loc="center right")
    fig.suptitle("Same expert for consecutive tokens of a sequence")
    fig.tight_layout(rect=(0, 0, 0.86, 1))
    fig.savefig(out, dpi=120)
    plt.close(fig)


def make_plots(trace_path: str | Path, outdir: Path, layers: list[int] | None, cosel_layer: int | None) -> list[Path]:
    tr = read_trace(trace_path)
    if tr.experts.shape[0] == 0:
        raise SystemExit(f"{trace_path}: no tokens")
    L = tr.num_layers
    layers = layers if layers else sorted({0, (L - 1) // 2, L - 1})
    cosel_layer = (L - 1) // 2 if cosel_layer is None else cosel_layer
    for l in layers + [cosel_layer]:
        if not 0 <= l < L:
            raise SystemExit(f"layer {l} out of range 0..{L - 1}")
    outdir.mkdir(parents=True, exist_ok=True)
    outs = [outdir / "expert_load_by_domain.png", outdir / "load_heatmap.png",
            outdir / f"coselection_layer{cosel_layer}.png", outdir / "repetition.png"]
    plot_load_by_domain(tr, layers, outs[0])
    plot_heatmap(tr, outs[1])
    plot_coselection(tr, cosel_layer, outs[2])
    plot_repetition(tr, outs[3])
    return outs


# ---- self-test ------------------------------------------------------------------------------------------

def write_synthetic_trace(path: Path, seed: int = 0) -> None:
    """E=8, k=2, L=4, three domains. Layer 0: uniformly random; layer 1: round robin {t, t+1} (first-choice
    repetition 0, overlap 1, perfectly balanced); layer 2: sticky (the previous top-k kept with prob. 0.5);
    layer 3: domain d prefers experts {2d, 2d+1}."""
    rng = np.random.default_rng(seed)
    e, k, layers = 8, 2, 4
    names = ["code", "legal", "arith"]
    lengths = rng.integers(50, 300, size=30)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    seq_domain = (np.arange(len(lengths)) % 3).astype(np.int32)
    n = int(offsets[-1])
    ex = np.zeros((n, layers, k), np.uint8)
    for t in range(n):
        ex[t, 0] = rng.permutation(e)[:k]
        ex[t, 1] = [t % e, (t + 1) % e]
        ex[t, 2] = ex[t - 1, 2] if t > 0 and rng.random() < 0.5 else rng.permutation(e)[:k]
    for s in range(len(lengths)):
        d = seq_domain[s]
        for t in range(offsets[s], offsets[s + 1]):
            ex[t, 3] = [2 * d, 2 * d + 1] if rng.random() < 0.6 else rng.permutation(e)[:k]
    logits = rng.normal(size=(n, layers, e)).astype(np.float16)
    with h5py.File(path, "w") as f:
        f.create_dataset("tokens", data=np.arange(n, dtype=np.int32))
        f.create_dataset("sequence_offsets", data=offsets)
        ds = f.create_dataset("sequence_domain", data=seq_domain)
        ds.attrs["domain_names"] = names
        f.create_dataset("experts", data=ex, chunks=(256, layers, k), compression="gzip")
        f.create_dataset("gates", data=np.full((n, layers, k), 0.5, np.float32))
        f.create_dataset("router_logits", data=logits)
        f.attrs["num_layers"], f.attrs["top_k"], f.attrs["num_experts"] = layers, k, e


def selftest(outdir: Path | None) -> int:
    tmp = None
    if outdir is None:
        tmp = tempfile.TemporaryDirectory()
        outdir = Path(tmp.name)
    outdir.mkdir(parents=True, exist_ok=True)
    path = outdir / "synthetic_trace.h5"
    write_synthetic_trace(path)
    tr = read_trace(path)
    e, k = tr.num_experts, tr.top_k
    share = load_share(tr.experts, e)
    pairs, first, overlap = repetition(tr.experts, tr.offsets)
    n, s = tr.experts.shape[0], len(tr.offsets) - 1
    b1, b2 = baselines(e, k)
    checks = [
        ("baselines 1/8 and 1-(6/8)(5/7)", abs(b1 - 0.125) < 1e-15 and abs(b2 - (1 - 6 / 8 * 5 / 7)) < 1e-15),
        ("pairs exclude sequence boundaries", int(pairs[0]) == n - s),
        ("round robin: balanced", np.allclose(share[1], 1 / e, atol=2 / n)),
        ("round robin: first choice never repeats", int(first[1]) == 0),
        ("round robin: top-k sets always meet", int(overlap[1]) == int(pairs[1])),
        ("random layer near baselines (5 SE)",
         abs(first[0] / pairs[0] - b1) < 5 * math.sqrt(b1 * (1 - b1) / pairs[0])
         and abs(overlap[0] / pairs[0] - b2) < 5 * math.sqrt(b2 * (1 - b2) / pairs[0])),
        ("sticky layer above baseline", first[2] / pairs[2] > 0.4),
        ("co-selection diagonal = counts", np.array_equal(np.diag(coselection(tr.experts, 0, e)),
                                                          np.bincount(tr.experts[:, 0, :].ravel(), minlength=e))),
        ("shares sum to 1", np.allclose(share.sum(axis=1), 1.0)),
        ("domain split covers all tokens", sum(g[1].shape[0] for g in domain_groups(tr)) == n),
        ("layer 3 domain 'legal' prefers experts 2, 3",
         load_share(domain_groups(tr)[1][1], e)[3][2:4].sum() > 0.5),
    ]
    failed = [name for name, ok in checks if not ok]
    for name, ok in checks:
        print(f"{'ok  ' if ok else 'FAIL'} {name}")
    outs = make_plots(path, outdir, None, None)
    for o in outs:
        if not o.exists() or o.stat().st_size < 5000:
            failed.append(f"figure {o.name} missing or empty")
    print("\n".join(f"wrote {o}" for o in outs) if tmp is None else "figures drawn (temporary directory)")
    if tmp is not None:
        tmp.cleanup()
    if failed:
        print("selftest FAILED: " + "; ".join(failed), file=sys.stderr)
        return 1
    print("selftest passed")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Routing figures from a moelab trace (Mixtral paper style).")
    ap.add_argument("trace", nargs="?", help="trace file (HDF5) written by `moelab trace`")
    ap.add_argument("outdir", nargs="?", type=Path, help="folder for the PNGs")
    ap.add_argument("--layers", default="", help="layers for the per-domain load figure (default: first, middle, last)")
    ap.add_argument("--coselection-layer", type=int, default=None, help="layer of the co-selection matrix (default: middle)")
    ap.add_argument("--selftest", action="store_true",
                    help="write a synthetic trace, check the statistics, draw the figures (into OUTDIR if given)")
    args = ap.parse_args(argv)
    if args.selftest:
        # `--selftest OUTDIR`: the one positional given is the output folder
        out = args.outdir if args.outdir is not None else (Path(args.trace) if args.trace else None)
        return selftest(out)
    if not args.trace or args.outdir is None:
        ap.error("give TRACE.h5 and OUTDIR (or --selftest)")
    layers = [int(x) for x in args.layers.split(",") if x.strip()]
    for o in make_plots(args.trace, args.outdir, layers, args.coselection_layer):
        print(f"wrote {o}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
