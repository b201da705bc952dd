"""Figures of the exact-kernel benchmark, drawn from results/bench/exact-h100.json only.

exact_throughput (TFLOP/s against N per head dim, causal and not) and
exact_memory (peak device memory against N) in figures/bench/. Device, batch
shape, head dims and each implementation's dtype come from the results; a quick
run's ``exact-*-partial.json`` is drawn when the full file is absent, and the
figures then say so.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt

from nkattn.figures import COLUMN_WIDTH, PAGE_WIDTH, load_result, save_figure, style

BENCH_FILE = "exact-h100.json"
COMMAND = "nkattn bench exact (on a GPU)"
QUICK_FILES = "exact-*-partial.json"
IMPL_STYLE = {  # impl -> (name, line style, marker)
    "nkattn-exact": ("nkattn exact", "-", "o"),
    "torch-sdpa-efficient": ("torch SDPA efficient", "-", "s"),
    "torch-sdpa-math": ("torch SDPA math", "-", "^"),
    "torch-sdpa-flash": ("torch SDPA flash", ":", "v"),
    "torch-sdpa-cudnn": ("torch SDPA cuDNN", ":", "D"),
}
SHORT_DTYPE = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "float64": "fp64"}


def _load(results_dir):
    data = load_result(results_dir, "bench", BENCH_FILE, command=COMMAND, quick=QUICK_FILES)
    config = data["meta"]["config"]
    # the grid of the sweep (the N = 1M memory record has H = 1 and is not part of it)
    grid = [r for r in data["records"] if r["B"] == config["B"] and r["H"] == config["H"]]
    return data, config, grid


def _plot_impls(ax, records, field, scale=1.0):
    for impl, (name, line, marker) in IMPL_STYLE.items():
        rows = [r for r in records if r["impl"] == impl and field in r]
        if rows:
            dtypes = ", ".join(SHORT_DTYPE.get(t, t) for t in sorted({r["dtype"] for r in rows}))
            pts = sorted((r["N"], r[field] * scale) for r in rows)
            # nkattn on top: its memory equals SDPA efficient's, which would hide it
            ax.plot(*zip(*pts), line, marker=marker, label=f"{name} ({dtypes})", zorder=3 if impl == "nkattn-exact" else 2)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length N")


def fig_throughput(results_dir: Path, figures_dir: Path) -> list[Path]:
    """TFLOP/s against N for every implementation, one panel per (head dim, causal)."""
    data, config, grid = _load(results_dir)
    panels = [(d, causal) for d in config["head_dims"] for causal in (False, True)]
    with style():
        fig, axes = plt.subplots(1, len(panels), figsize=(PAGE_WIDTH, 2.2), sharey=True, squeeze=False)
        for ax, (d, causal) in zip(axes[0], panels):
            _plot_impls(ax, [r for r in grid if r["d"] == d and r["causal"] == causal], "tflops")
            ax.set_title(f"d = {d}, {'causal' if causal else 'full'}")
        axes[0, 0].set_ylabel("TFLOP/s (4·B·H·N²·d / time)")
        axes[0, -1].legend(loc="center left", bbox_to_anchor=(1.02, 0.5))
        fig.suptitle(f"{data['meta']['device']}, B = {config['B']}, H = {config['H']}", y=1.02)
        return save_figure(fig, Path(figures_dir) / "bench", "exact_throughput", results=[data])


def fig_memory(results_dir: Path, figures_dir: Path) -> list[Path]:
    """Peak device memory against N at the smallest head dim, full attention: the fused kernel stays at its inputs and outputs."""
    data, config, grid = _load(results_dir)
    d = min(config["head_dims"])
    with style():
        fig, ax = plt.subplots(figsize=(COLUMN_WIDTH, 2.4))
        _plot_impls(ax, [r for r in grid if r["d"] == d and not r["causal"]], "peak_bytes", scale=2.0**-30)
        ax.set_ylabel("peak device memory (GiB)")
        ax.set_title(f"{data['meta']['device']}, d = {d}, B = {config['B']}, H = {config['H']}\n"
                     "inputs, outputs, workspace")
        ax.legend()
        return save_figure(fig, Path(figures_dir) / "bench", "exact_memory", results=[data])


FIGURES = [fig_throughput, fig_memory]
