"""Figures of the exact-kernel benchmark, drawn from results/bench/exact-h100.json only.

exact_throughput (TFLOP/s against N per head dim, causal and not),
exact_memory (peak device memory against N) and exact_tensor_core (the
tensor-core kernel beside torch's SDPA backends in the same input precision) in
figures/bench/. Device, batch
shape, head dims and each implementation's dtype come from the results; a quick
run's ``exact-*-partial.json`` is drawn when the full file is absent, and the
figures then say so.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt

from nkattn.figures import (
    COLUMN_WIDTH,
    PAGE_WIDTH,
    MissingResultError,
    load_result,
    save_figure,
    style,
)

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


TC_PEERS = {  # impl -> (name, colour) in the tensor-core figure
    "nkattn-tc": ("nkattn tensor-core", "C0"),
    "torch-sdpa-flash": ("torch SDPA flash", "C1"),
    "torch-sdpa-cudnn": ("torch SDPA cuDNN", "C2"),
    "torch-sdpa-efficient": ("torch SDPA efficient", "C3"),
}
FLOAT32_BARS = (  # (impl, precision) -> label of the float32 panel
    (("nkattn-exact", None), "nkattn FFMA"),
    (("nkattn-tc", "tf32x3"), "nkattn 3xTF32"),
    (("nkattn-tc", "tf32"), "nkattn TF32"),
    (("torch-sdpa-efficient", "fp32"), "SDPA efficient"),
)


def _load_tensor_core(results_dir):
    """The full results if they have tensor-core rows, else the first partial run that has them."""
    folder = Path(results_dir) / "bench"
    for name in [BENCH_FILE, *sorted(p.name for p in folder.glob(QUICK_FILES))]:
        if (folder / name).exists():
            data = load_result(results_dir, "bench", name, command=COMMAND)
            if any(r["impl"] == "nkattn-tc" for r in data["records"]):
                return data
    raise MissingResultError([(folder / BENCH_FILE, f"{COMMAND}, with its tensor-core part")])


def _grouped_bars(ax, groups, impls, values):
    width = 0.8 / len(impls)
    for j, impl in enumerate(impls):
        name, color = TC_PEERS[impl]
        xs = [i + (j - (len(impls) - 1) / 2) * width for i in range(len(groups))]
        ax.bar(xs, [values.get((g, impl), 0.0) for g in groups], width, color=color, label=name)
    ax.set_xticks(range(len(groups)), [f"{SHORT_DTYPE[t]}\nd={d}\n{'causal' if c else 'full'}" for t, d, c in groups],
                  fontsize=6)


def fig_tensor_core(results_dir: Path, figures_dir: Path) -> list[Path]:
    """Half precision at the largest N with most configurations, its longest-N sweep, and the float32 modes."""
    data = _load_tensor_core(results_dir)
    config = data["meta"]["config"]
    records = [r for r in data["records"] if "tflops" in r]
    half = [r for r in records if r["dtype"] in ("float16", "bfloat16") and r["impl"] in TC_PEERS]
    counts = {}
    for r in half:
        counts[r["N"]] = counts.get(r["N"], 0) + 1
    n_bars = max(counts, key=lambda n: (counts[n], n))
    groups = sorted({(r["dtype"], r["d"], r["causal"]) for r in half if r["N"] == n_bars},
                    key=lambda g: (g[0] != "float16", g[1], g[2]))
    values = {((r["dtype"], r["d"], r["causal"]), r["impl"]): r["tflops"] for r in half if r["N"] == n_bars}
    sweep_d = max({r["d"] for r in half}, key=lambda d: (len({r["N"] for r in half if r["d"] == d}), d))
    sweep = [r for r in half if r["dtype"] == "float16" and r["d"] == sweep_d]
    f32_d = min(config["head_dims"])
    float32 = {(r["impl"], r.get("precision")): r for r in records
               if r["dtype"] == "float32" and r["N"] == n_bars and r["d"] == f32_d and not r["causal"]}
    with style():
        fig, axes = plt.subplots(1, 3, figsize=(PAGE_WIDTH, 2.6), gridspec_kw={"width_ratios": [3.2, 1.4, 1.4]},
                                 constrained_layout=True)
        ax = axes[0]
        _grouped_bars(ax, groups, list(TC_PEERS), values)
        ax.set_ylabel("TFLOP/s (4·B·H·N²·d / time;\ncausal: half the FLOPs)")
        ax.set_title(f"N = {n_bars}, input precision of each bar's label", fontsize=7)
        ax.set_ylim(0, 1.4 * max(values.values()))  # headroom for the legend
        ax.legend(fontsize=6, ncol=2, loc="upper left")
        ax = axes[1]
        for impl, (name, color) in TC_PEERS.items():
            for causal, line in ((False, "-"), (True, "--")):
                pts = sorted((r["N"], r["tflops"]) for r in sweep if r["impl"] == impl and r["causal"] == causal)
                if pts:
                    ax.plot(*zip(*pts), line, marker="o", ms=3, color=color)
        ax.plot([], [], "k-", label="full")
        ax.plot([], [], "k--", label="causal")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length N")
        ax.set_title(f"fp16, d = {sweep_d}", fontsize=7)
        ax.legend(fontsize=6)
        ax = axes[2]
        bars = [(label, float32[key]) for key, label in FLOAT32_BARS if key in float32]
        ax.bar(range(len(bars)), [r["tflops"] for _, r in bars], color="0.6")
        for i, (_, r) in enumerate(bars):
            ax.annotate(f"err\n{r['max_rel_err_sampled']:.0e}", (i, r["tflops"]), ha="center", va="bottom", fontsize=5)
        ax.set_xticks(range(len(bars)), [label for label, _ in bars], rotation=30, ha="right", fontsize=6)
        ax.set_title(f"float32 inputs, N = {n_bars}, d = {f32_d}, full", fontsize=7)
        ax.margins(y=0.25)
        fig.suptitle(f"{data['meta']['device']}, B = {config['B']}, H = {config['H']}, {data['path'].name} "
                     f"({data['meta']['date'][:10]}); err: sampled max relative error against float64", fontsize=7)
        return save_figure(fig, Path(figures_dir) / "bench", "exact_tensor_core", results=[data])


FIGURES = [fig_throughput, fig_memory, fig_tensor_core]
