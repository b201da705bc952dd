"""Figures of the LSH benchmark, drawn from results/bench/lsh-h100.json only.

time_vs_n and memory_vs_n (figures/lsh/): one line per implementation, the LSH
configurations coloured by bits. Device, dtype, head dim and batch shape come from
the results (meta and records); seed 003's claim is drawn when the results store
it (``meta.config.seed_claim``). A quick run's ``lsh-*-partial.json`` is drawn when
the full file is absent, and the figures then say so.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from nkattn.figures import PAGE_WIDTH, load_result, save_figure, style

BENCH_FILE = "lsh-h100.json"
COMMAND = "nkattn bench lsh (on a GPU)"
QUICK_FILES = "lsh-*-partial.json"
PEERS = {  # impl -> (label, line style)
    "nkattn-exact": ("nkattn exact", {"color": "k", "lw": 1.8}),
    "torch-sdpa-efficient": ("torch SDPA efficient", {"color": "0.5", "lw": 1.5, "ls": "--"}),
}


def _load(results_dir):
    return load_result(results_dir, "bench", BENCH_FILE, command=COMMAND, quick=QUICK_FILES)


def _setup(records, meta) -> str:
    """What every point shares: device, dtype, head dim and batch shape, from the records."""
    fields = [sorted({str(r[key]) for r in records}) for key in ("dtype", "d", "B", "H")]
    dtype, d, b, h = (", ".join(values) for values in fields)
    return f"{meta['device']}, {dtype}, d = {d}, B = {b}, H = {h}"


def _lines(ax, records, field, scale=1.0):
    """One line per implementation: the peers first, then LSH configurations by bits (viridis)."""
    lsh = sorted({(r["bits"], r["tables"]) for r in records if r["impl"] == "nkattn-lsh"})
    colors = dict(zip(lsh, plt.get_cmap("viridis")(np.linspace(0, 0.9, len(lsh)))))
    series = [(impl, label, kw, [r for r in records if r["impl"] == impl]) for impl, (label, kw) in PEERS.items()]
    for bits, tables in lsh:
        rows = [r for r in records if r["impl"] == "nkattn-lsh" and (r["bits"], r["tables"]) == (bits, tables)]
        kw = {"color": colors[bits, tables], "marker": "o", "ms": 3}
        series.append(("nkattn-lsh", f"LSH {bits} bits × {tables} tables", kw, rows))
    for _, label, kw, rows in series:
        points = sorted((r["N"], r[field] * scale) for r in rows if field in r)
        if points:
            ax.plot(*zip(*points), label=label, **kw)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length N (keys = queries)")


def _legend(ax):
    ax.legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=6)


def fig_time_vs_n(results_dir: Path, figures_dir: Path) -> list[Path]:
    """Time per call against N; LSH includes hashing and sorting. Seed 003's claim as a marker at its N."""
    data = _load(results_dir)
    records, config = data["records"], data["meta"]["config"]
    with style():
        fig, ax = plt.subplots(figsize=(0.72 * PAGE_WIDTH, 2.8))
        _lines(ax, records, "median_ms")
        claim = config.get("seed_claim")
        if claim:
            label = f"seed 003's claim: {claim['n']:,} tokens in < {claim['ms']:g} ms"
            ax.plot([claim["n"]], [claim["ms"]], ls="", marker="v", ms=7, mfc="none", color="C1", mew=1.2, label=label)
        ax.set_ylabel("time per call (ms; LSH: hashing and\nsorting included)")
        ax.set_title(f"LSH vs exact attention: {_setup(records, data['meta'])}")
        _legend(ax)
        return save_figure(fig, Path(figures_dir) / "lsh", "time_vs_n", results=[data])


def fig_memory_vs_n(results_dir: Path, figures_dir: Path) -> list[Path]:
    """Peak device memory against N: O(N) for exact, O(N·L) more for LSH's codes and sort scratch."""
    data = _load(results_dir)
    records = data["records"]
    with style():
        fig, ax = plt.subplots(figsize=(0.72 * PAGE_WIDTH, 2.8))
        _lines(ax, records, "peak_bytes", scale=1e-9)
        ax.set_ylabel("peak device memory (GB, inputs + allocations)")
        ax.set_title(f"Memory vs N: {_setup(records, data['meta'])}")
        _legend(ax)
        return save_figure(fig, Path(figures_dir) / "lsh", "memory_vs_n", results=[data])


FIGURES = [fig_time_vs_n, fig_memory_vs_n]
