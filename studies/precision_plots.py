"""Figures of the precision study, drawn from results/precision/minilm.json and
minilm-e2e.json only (a quick run's quick.json and quick-e2e.json when the full run's file is
absent; the figures then say so).

error_by_format, analyzer_spearman, policies (minilm.json), end_to_end (minilm-e2e.json), in
figures/precision/. Formats, tolerances, costs, analyzers and policies are read from the
results' ``meta.config``.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from nkattn.figures import PAGE_WIDTH, load_result, save_figure, style
from nkattn.results import columns
from nkattn.studies.precision import COMMAND, FULL_E2E, FULL_RESULT, QUICK_E2E, QUICK_RESULT, STUDY


def _load(results_dir, e2e=False):
    full, quick = (FULL_E2E, QUICK_E2E) if e2e else (FULL_RESULT, QUICK_RESULT)
    data = load_result(results_dir, STUDY, full, command=COMMAND, quick=quick)
    return data, data["meta"]["config"], columns(data["records"])


def fig_error_by_format(results_dir: Path, figures_dir: Path) -> list[Path]:
    """Distribution of every head's relative output error per format, one box per N, with the tolerances."""
    data, config, c = _load(results_dir)
    formats = list(config["formats"])
    lengths = config["lengths"]
    with style():
        fig, ax = plt.subplots(figsize=(PAGE_WIDTH, 2.6), constrained_layout=True)
        width = 0.8 / len(lengths)
        for i, n in enumerate(lengths):
            sel = c["n"] == n
            pos = np.arange(len(formats)) + (i - (len(lengths) - 1) / 2) * width
            ax.boxplot([c[f"err_{f}"][sel] for f in formats], positions=pos, widths=0.9 * width, whis=(0, 100),
                       patch_artist=True, boxprops={"facecolor": f"C{i}", "alpha": 0.6}, medianprops={"color": "k"})
            ax.plot([], [], ls="", marker="s", color=f"C{i}", alpha=0.6, label=f"N = {n}")
        for tol in config["tolerances"]:
            ax.axhline(tol, color="k", ls=":", lw=0.8)
            ax.text(-0.45, tol, f"tolerance {tol:g}", va="bottom", ha="left", fontsize=6)
        ax.set_xticks(range(len(formats)))
        ax.set_xticklabels(formats)
        ax.set_yscale("log")
        ax.set_ylabel("‖O_format − O‖ / ‖O‖ per head")
        ax.set_title(f"{config['model']}: every head and passage (whiskers: min and max)")
        ax.legend(loc="upper left")
        return save_figure(fig, Path(figures_dir) / STUDY, "error_by_format", results=[data])


def fig_analyzer_spearman(results_dir: Path, figures_dir: Path) -> list[Path]:
    """Spearman's rho of each analyzer (and of auto's prediction, held-out passages) against each format's error."""
    data, config, _ = _load(results_dir)
    spearman = data["meta"]["summary"]["spearman"]
    formats = list(config["formats"])
    names = [*config["analyzers"], "predicted"]
    rho = np.array([[spearman[f][a]["rho"] for a in names] for f in formats])
    with style():
        fig, ax = plt.subplots(figsize=(PAGE_WIDTH, 2.5), constrained_layout=True)
        im = ax.imshow(rho, vmin=-1, vmax=1, cmap="RdBu_r", aspect="auto")
        for (i, j), val in np.ndenumerate(rho):
            s = spearman[formats[i]][names[j]]
            ax.text(j, i, f"{val:.2f}\n[{s['ci_low']:.2f}, {s['ci_high']:.2f}]", ha="center", va="center", fontsize=5)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=20)
        ax.set_yticks(range(len(formats)))
        ax.set_yticklabels(formats)
        ax.grid(False)
        ax.set_title("Spearman ρ with the format's error [95 % CI, bootstrap over passages]")
        fig.colorbar(im, ax=ax, label="ρ", shrink=0.9)
        return save_figure(fig, Path(figures_dir) / STUDY, "analyzer_spearman", results=[data])


def fig_policies(results_dir: Path, figures_dir: Path) -> list[Path]:
    """Per tolerance: each policy's mean cost against the share of held-out heads within the budget."""
    data, config, _ = _load(results_dir)
    policies = data["meta"]["summary"]["policies"]
    tolerances = [f"{t:g}" for t in config["tolerances"]]
    with style():
        fig, axes = plt.subplots(1, len(tolerances), figsize=(PAGE_WIDTH, 2.6), sharey=True, constrained_layout=True)
        for ax, tol in zip(np.atleast_1d(axes), tolerances):
            # coinciding points (fp16 and auto, say) stay apart by marker: a legend, not labels
            for i, (name, p) in enumerate(policies[tol].items()):
                ax.scatter(p["mean_cost"], p["meets_budget"], color=f"C{i % 7}", marker="osv^"[i // 7],
                           s=[40, 25, 14][i // 7 % 3], zorder=3, label=name, alpha=0.85)
            ax.set_xscale("log")
            ax.set_xlabel("mean cost per head (fp16 = 1)")
            ax.set_title(f"tolerance {tol}: held-out heads")
        np.atleast_1d(axes)[0].set_ylabel("share of heads within budget")
        np.atleast_1d(axes)[-1].legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=6)
        return save_figure(fig, Path(figures_dir) / STUDY, "policies", results=[data])


def fig_end_to_end(results_dir: Path, figures_dir: Path) -> list[Path]:
    """1 - cos of each held-out passage's sentence embedding under each policy against float64,
    with the top-1 neighbour agreement and the mean cost under each policy."""
    data, config, _ = _load(results_dir, e2e=True)
    summary = data["meta"]["summary"]
    records = data["records"]
    labels = [p["label"] for p in config["policies"]]
    kinds = list(dict.fromkeys("format" if p["policy"] in config["formats"] else p["policy"]
                               for p in config["policies"]))
    with style():
        fig, ax = plt.subplots(figsize=(PAGE_WIDTH, 2.8), constrained_layout=True)
        rng = np.random.default_rng(0)  # fixed jitter: the same bytes on every redraw
        for i, p in enumerate(config["policies"]):
            y = np.array([r["one_minus_cos"] for r in records
                          if r["policy"] == p["policy"] and r["tolerance"] == p["tolerance"]])
            kind = kinds.index("format" if p["policy"] in config["formats"] else p["policy"])
            ax.scatter(i + rng.uniform(-0.2, 0.2, y.size), y, s=5, lw=0, alpha=0.7, color=f"C{kind}")
            ax.plot([i - 0.3, i + 0.3], [np.median(y)] * 2, color="k", lw=1)
            row = summary[p["label"]]
            agree = y.size - row["top1_disagreements"]
            ax.annotate(f"{agree}/{y.size}\n{row['mean_cost']:.3g}", (i, 1), xycoords=("data", "axes fraction"),
                        ha="center", va="bottom", fontsize=6)
        ax.annotate("top-1 NN as float64\nmean cost", (0, 1), xycoords="axes fraction", xytext=(-4, 0),
                    textcoords="offset points", ha="right", va="bottom", fontsize=6)
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, rotation=25, ha="right")
        ax.set_xlim(-0.6, len(labels) - 0.4)
        ax.set_yscale("log")
        ax.set_ylabel("1 − cos(embedding, float64)")
        first, last = config["passages"]
        ax.set_title(f"{config['model']}, N = {config['n']}: sentence embeddings of passages {first}-{last} "
                     "(held out from auto's fit) under each policy; bar: median", pad=22)
        return save_figure(fig, Path(figures_dir) / STUDY, "end_to_end", results=[data])


FIGURES = [fig_error_by_format, fig_analyzer_spearman, fig_policies, fig_end_to_end]
