"""Figures of the distance study, drawn from results/distance/*.json only.

rho_by_dataset, rho_vs_m, seed_repro (distance.json, seed_repro.json),
attention_heads, topk (attention.json), end_to_end (end_to_end.json), in
figures/distance/. The seed's numbers, the Base17 axis count, the m sweep and the
top-k sizes are read from each file's ``meta.config``; a quick run's files
(results/distance/quick/) are drawn when the full run's are absent, and the
figures then say so.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from nkattn.figures import COLUMN_WIDTH, PAGE_WIDTH, load_result, save_figure, style
from nkattn.studies.distance import COMMAND, QUICK_DIR, STUDY

PROJ_STYLE = {  # (label, color index, marker)
    ("golden", "i16", "l1"): ("golden i16, L1 (seed)", 1, "s"),
    ("golden", "float", "l2"): ("golden float, L2", 0, "o"),
    ("mean-stride", "float", "l2"): ("mean-stride, L2", 4, "D"),
    ("random", "float", "l2"): ("Gaussian N(0,1/m), L2", 2, "^"),
    ("pca", "float", "l2"): ("PCA, L2", 3, "v"),
}


def _load(results_dir, name):
    data = load_result(results_dir, STUDY, name, command=COMMAND, quick=f"{QUICK_DIR}/{name}")
    return data, data["meta"]["config"], data["records"]


def fig_rho_by_dataset(results_dir: Path, figures_dir: Path) -> list[Path]:
    """rho at m = 17 per dataset and projection (mean and min-max over seeds), with the seed's numbers."""
    data, config, recs = _load(results_dir, "distance.json")
    m, seed = config["base17_axes"], config["seed_numbers"]
    datasets = list(dict.fromkeys(r["dataset"] for r in recs))
    with style():
        fig, ax = plt.subplots(figsize=(PAGE_WIDTH, 3.0))
        width = 0.16
        for j, (key, (label, color, marker)) in enumerate(PROJ_STYLE.items()):
            xs, ys, lo, hi = [], [], [], []
            for i, ds in enumerate(datasets):
                r = [r for r in recs if r["dataset"] == ds and (r["projection"], r["form"], r["metric"]) == key
                     and r["m"] == m]
                if r:
                    xs.append(i + (j - 2) * width)
                    ys.append(r[0]["rho_mean"])
                    lo.append(r[0]["rho_mean"] - r[0]["rho_min"])
                    hi.append(r[0]["rho_max"] - r[0]["rho_mean"])
            ax.errorbar(xs, ys, yerr=[lo, hi], ls="", marker=marker, color=f"C{color}", label=label, capsize=1.5)
        seed_marks = [("images", "golden", "seed: golden / mean-stride"), ("images", "random", "seed: random"),
                      ("gaussian-d256-n50", "golden", None), ("gaussian-d256-n50", "random", None)]
        for ds, proj, label in seed_marks:
            if ds in datasets:
                ax.scatter([datasets.index(ds) - 0.42], [seed[ds][proj]], marker="*", s=40,
                           color="k" if proj == "golden" else "0.55", zorder=5, label=label)
        ax.axhline(seed["claimed"], color="k", ls=":", lw=0.8, label=f"seed: claimed ρ ≈ {seed['claimed']}")
        ax.set_xticks(range(len(datasets)), datasets, rotation=35, ha="right")
        ax.set_ylabel(f"Spearman ρ of pairwise distances\n(m = {m}; mean, min–max over seeds)")
        ax.set_ylim(min(0.0, ax.get_ylim()[0]), 1.02)
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.55), ncol=4, fontsize=6)
        return save_figure(fig, Path(figures_dir) / STUDY, "rho_by_dataset", results=[data])


def fig_rho_vs_m(results_dir: Path, figures_dir: Path) -> list[Path]:
    """rho against m for mean-stride, Gaussian and PCA, one panel per dataset; golden at m = 17."""
    data, config, recs = _load(results_dir, "distance.json")
    datasets = list(dict.fromkeys(r["dataset"] for r in recs))
    cols = 4
    rows = int(np.ceil(len(datasets) / cols))
    with style():
        fig, axes = plt.subplots(rows, cols, figsize=(PAGE_WIDTH, 1.6 * rows + 0.6), sharey=True, squeeze=False,
                                 constrained_layout=True)
        for ax, ds in zip(axes.ravel(), datasets):
            for key, (label, color, marker) in PROJ_STYLE.items():
                r = sorted((r for r in recs if r["dataset"] == ds and (r["projection"], r["form"], r["metric"]) == key),
                           key=lambda r: r["m"])
                if not r:
                    continue
                ms = [x["m"] for x in r]
                ax.plot(ms, [x["rho_mean"] for x in r], marker=marker, color=f"C{color}", label=label,
                        ls="" if len(ms) == 1 else "-")
                if len(ms) > 1:
                    ax.fill_between(ms, [x["rho_min"] for x in r], [x["rho_max"] for x in r], color=f"C{color}",
                                    alpha=0.12, lw=0)
            ax.set_xscale("log", base=2)
            ax.set_title(ds, fontsize=7)
            ax.set_xticks(config["m_sweep"], [str(m) for m in config["m_sweep"]], fontsize=6)
        for ax in axes.ravel()[len(datasets):]:
            ax.axis("off")
        for ax in axes[:, 0]:
            ax.set_ylabel("Spearman ρ")
        for ax in axes[-1]:
            ax.set_xlabel("m")
        handles, labels = axes.ravel()[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="outside lower center", ncol=5, fontsize=6)
        return save_figure(fig, Path(figures_dir) / STUDY, "rho_vs_m", results=[data])


def fig_seed_repro(results_dir: Path, figures_dir: Path) -> list[Path]:
    """Readings of the seed's image experiment: rho of each projection reading per pixel scale, all pairs vs 100."""
    data, config, recs = _load(results_dir, "seed_repro.json")
    seed = config["seed_numbers"]["images"]
    scales = list(dict.fromkeys(r["scale"] for r in recs))
    variants = list(dict.fromkeys(r["variant"] for r in recs))
    with style():
        fig, ax = plt.subplots(figsize=(PAGE_WIDTH, 2.8))
        width = 0.8 / len(scales)
        for j, scale in enumerate(scales):
            rs = [next(r for r in recs if r["scale"] == scale and r["variant"] == v) for v in variants]
            x = np.arange(len(variants)) + (j - (len(scales) - 1) / 2) * width
            ax.bar(x, [r["rho_all_mean"] for r in rs], width * 0.9, color=f"C{j}", label=f"pixels: {scale} (all pairs)")
            ax.errorbar(x, [r["rho_100_mean"] for r in rs],
                        yerr=[[r["rho_100_mean"] - r["rho_100_p5"] for r in rs], [r["rho_100_p95"] - r["rho_100_mean"] for r in rs]],
                        ls="", marker="_", color="k", lw=0.8, capsize=1.5,
                        label="100 random pairs: mean, 5–95th pct." if j == 0 else None)
        ax.axhline(seed["golden"], color="k", ls="--", lw=0.8, label=f"seed: golden {seed['golden']}")
        ax.axhline(seed["random"], color="0.5", ls="--", lw=0.8, label=f"seed: random {seed['random']}")
        ax.set_xticks(range(len(variants)), variants, rotation=20, ha="right")
        ax.set_ylabel(f"Spearman ρ (image patches, {config['base17_axes']} axes)")
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.4), ncol=3, fontsize=6)
        return save_figure(fig, Path(figures_dir) / STUDY, "seed_repro", results=[data])


def fig_attention_heads(results_dir: Path, figures_dir: Path) -> list[Path]:
    """Layer x head maps of per-row score rho and output error, for the dot and the seed table."""
    data, _, recs = _load(results_dir, "attention.json")
    layers = max(r["layer"] for r in recs) + 1
    heads = max(r["head"] for r in recs) + 1
    panels = [("dot", "score_rho_row", "dot table: score ρ per row", (0, 1)),
              ("seed", "score_rho_row", "seed table: score ρ per row", (0, 1)),
              ("dot", "out_rel_err", "dot table: output rel. error", None),
              ("seed", "out_rel_err", "seed table: output rel. error", None)]
    with style():
        fig, axes = plt.subplots(2, 2, figsize=(PAGE_WIDTH, 3.8), constrained_layout=True)
        err_max = max(r["out_rel_err"] for r in recs if r["variant"] in ("dot", "seed"))
        for ax, (variant, key, title, lim) in zip(axes.ravel(), panels):
            grid = np.zeros((layers, heads))
            count = np.zeros((layers, heads))
            for r in recs:
                if r["variant"] == variant and np.isfinite(r[key]):
                    grid[r["layer"], r["head"]] += r[key]
                    count[r["layer"], r["head"]] += 1
            grid /= np.maximum(count, 1)
            vmin, vmax = lim if lim else (0, err_max)
            im = ax.imshow(grid, vmin=vmin, vmax=vmax, aspect="auto")
            for (i, j), val in np.ndenumerate(grid):
                ax.text(j, i, f"{val:.2f}", ha="center", va="center", fontsize=5,
                        color="w" if val < vmin + 0.6 * (vmax - vmin) else "k")
            ax.set_title(title)
            ax.set_xlabel("head")
            ax.set_ylabel("layer")
            ax.grid(False)
            fig.colorbar(im, ax=ax, shrink=0.9)
        return save_figure(fig, Path(figures_dir) / STUDY, "attention_heads", results=[data])


def fig_topk(results_dir: Path, figures_dir: Path) -> list[Path]:
    """Top-k key overlap with exact attention (median, 10–90th pct. over heads x passages), with chance k/N."""
    data, config, recs = _load(results_dir, "attention.json")
    topk = config["topk"]
    variants = list(dict.fromkeys(r["variant"] for r in recs))
    n = recs[0]["n"]
    with style():
        fig, ax = plt.subplots(figsize=(COLUMN_WIDTH, 2.6))
        for i, variant in enumerate(variants):
            vals = [np.array([r[f"top{k}"] for r in recs if r["variant"] == variant]) for k in topk]
            ax.errorbar(np.array(topk) * (1 + 0.06 * (i - 1)), [np.median(v) for v in vals],
                        yerr=[[np.median(v) - np.percentile(v, 10) for v in vals],
                              [np.percentile(v, 90) - np.median(v) for v in vals]],
                        marker="o", capsize=2, color=f"C{i}", label=variant)
        ax.plot(topk, [k / n for k in topk], "k:", label=f"chance k/N (N = {n})")
        ax.set_xscale("log")
        ax.set_xticks(topk, [str(k) for k in topk])
        ax.set_xlabel("k")
        ax.set_ylabel("top-k overlap with exact")
        ax.set_ylim(0, 1)
        ax.legend(fontsize=6)
        return save_figure(fig, Path(figures_dir) / STUDY, "topk", results=[data])


def fig_end_to_end(results_dir: Path, figures_dir: Path) -> list[Path]:
    """Cosine of MiniLM sentence embeddings with table attention in every layer vs the exact model."""
    data, _, recs = _load(results_dir, "end_to_end.json")
    summary = data["meta"]["summary"]
    variants = list(dict.fromkeys(r["variant"] for r in recs))
    with style():
        fig, ax = plt.subplots(figsize=(COLUMN_WIDTH, 2.6))
        rng = np.random.default_rng(0)
        for i, variant in enumerate(variants):
            c = np.array([r["cosine"] for r in recs if r["variant"] == variant])
            ax.scatter(i + rng.uniform(-0.15, 0.15, c.size), c, s=6, color=f"C{i}", alpha=0.7, lw=0)
            ax.plot([i - 0.25, i + 0.25], [np.median(c)] * 2, color="k", lw=1)
        cross = summary.get("exact_cross_cosine_median")
        if cross is not None:
            ax.axhline(cross, color="0.5", ls=":", lw=0.8, label="exact, different passages (median)")
            ax.legend(fontsize=6, loc="lower right")
        ax.set_xticks(range(len(variants)), variants)
        ax.set_ylabel("cosine to exact sentence embedding")
        ax.set_ylim(min(0.0, ax.get_ylim()[0]), 1.01)
        return save_figure(fig, Path(figures_dir) / STUDY, "end_to_end", results=[data])


FIGURES = [fig_rho_by_dataset, fig_rho_vs_m, fig_seed_repro, fig_attention_heads, fig_topk, fig_end_to_end]
