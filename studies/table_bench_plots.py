"""Figure of the table benchmark, drawn from results/bench/table-h100.json only.

speed (figures/table/): score production (lookups against q·k, same kernel
skeleton) and whole attention calls (lookup against exact), per head dim. Device,
dtype and shapes come from the results; legends sit under the axes, clear of the
bars. A quick run's ``table-*-partial.json`` is drawn when the full file is
absent, and the figure then says so.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from nkattn.figures import PAGE_WIDTH, load_result, save_figure, style

BENCH_FILE = "table-h100.json"
COMMAND = "nkattn bench table (on a GPU)"
QUICK_FILES = "table-*-partial.json"
PANELS = (  # kind, field, scale, (impl, label) pairs, y label, title
    ("scores", "scores_per_s", 1e-12, (("lookup", "table lookup"), ("dot", "q·k dot product")),
     "scores per second (× 10¹²)", "score production"),
    ("attention", "median_ms", 1.0, (("nkattn-table", "lookup attention"), ("nkattn-exact", "exact attention")),
     "time per call (ms)", "fused attention (palette encoding excluded)"),
)


def fig_speed(results_dir: Path, figures_dir: Path) -> list[Path]:
    """Scores per second and attention time per head dim, two bars each, values on the bars."""
    data = load_result(results_dir, "bench", BENCH_FILE, command=COMMAND, quick=QUICK_FILES)
    records = data["records"]
    dims = sorted({r["d"] for r in records})
    shape = ", ".join(f"{key} = {'/'.join(f'{v:,}' for v in sorted({r[key] for r in records}))}" for key in ("B", "H", "N"))
    dtypes = ", ".join(sorted({r["dtype"] for r in records}))
    width = 0.38
    with style():
        fig, axes = plt.subplots(1, 2, figsize=(PAGE_WIDTH, 2.6), constrained_layout=True)
        for ax, (kind, field, scale, impls, ylabel, title) in zip(axes, PANELS):
            for i, (impl, label) in enumerate(impls):
                by_d = {r["d"]: r[field] * scale for r in records if r["kind"] == kind and r["impl"] == impl}
                bars = ax.bar(np.arange(len(dims)) + (i - 0.5) * width, [by_d.get(d, np.nan) for d in dims], width,
                              color=f"C{i}", label=label)
                ax.bar_label(bars, fmt="%.3g", fontsize=6, padding=1)
            ax.set_xticks(np.arange(len(dims)), [f"d = {d}" for d in dims])
            ax.set_ylabel(ylabel)
            ax.set_title(title)
            ax.margins(y=0.12)  # room for the values on the tallest bar
            ax.grid(axis="x", visible=False)
            ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2)
        fig.suptitle(f"{data['meta']['device']}, {dtypes}, {shape}", fontsize=8)
        return save_figure(fig, Path(figures_dir) / "table", "speed", results=[data])


FIGURES = [fig_speed]
