"""Figures of the rank-entropy study, drawn from results/rank-entropy/minilm.json only.

heatmaps, rank_vs_length, entropy_vs_rank, lowrank_error, precision_vs_entropy,
spectra (figures/rank-entropy/). The configuration they show (energy levels,
truncation ranks, formats and their unit roundoff, d_head) is read from the
results' ``meta.config``; a quick run's ``quick.json`` is drawn when the full run's
file is absent, and the figures then say so.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from nkattn.figures import COLUMN_WIDTH, PAGE_WIDTH, load_result, save_figure, style
from nkattn.results import columns
from nkattn.studies.rank_entropy import (
    COMMAND,
    FULL_RESULT,
    QUICK_RESULT,
    STUDY,
    head_means,
)


def _load(results_dir):
    data = load_result(results_dir, STUDY, FULL_RESULT, command=COMMAND, quick=QUICK_RESULT)
    return data, data["meta"]["config"], columns(data["records"])


def _layer_colors(num_layers):
    return plt.get_cmap("viridis")(np.linspace(0, 0.9, num_layers))


def fig_heatmaps(results_dir: Path, figures_dir: Path) -> list[Path]:
    """Layer x head maps of mean entropy / ln N and mean effective rank / N at the largest N."""
    data, _, c = _load(results_dir)
    n = int(c["n"].max())
    sel = c["n"] == n
    c = dict(c, erank_frac=c["erank_95"] / c["n"])
    panels = [
        ("entropy_norm", f"row entropy / ln N (N = {n})", "mean entropy / ln N"),
        ("erank_frac", f"effective rank / N at 95% energy (N = {n})", "effective rank / N"),
    ]
    with style():
        fig, axes = plt.subplots(1, 2, figsize=(PAGE_WIDTH, 2.3), constrained_layout=True)
        for ax, (name, title, label) in zip(axes, panels):
            grid = head_means(c, sel, name)
            im = ax.imshow(grid, vmin=0, vmax=max(grid.max(), 1e-9), aspect="auto")
            for (i, j), val in np.ndenumerate(grid):
                ax.text(
                    j,
                    i,
                    f"{val:.2f}",
                    ha="center",
                    va="center",
                    fontsize=5.5,
                    color="w" if val < 0.6 * grid.max() else "k",
                )
            ax.set_xticks(range(grid.shape[1]))
            ax.set_yticks(range(grid.shape[0]))
            ax.set_xlabel("head")
            ax.set_ylabel("layer")
            ax.set_title(title)
            ax.grid(False)
            fig.colorbar(im, ax=ax, label=label, shrink=0.9)
        return save_figure(fig, Path(figures_dir) / STUDY, "heatmaps", results=[data])


def fig_rank_vs_length(results_dir: Path, figures_dir: Path) -> list[Path]:
    """Effective rank / N (median and interquartile band) against N, with seed 001's 10-30% band."""
    data, config, c = _load(results_dir)
    lengths = np.unique(c["n"])
    low, high = config["seed_claims"]["effective_rank_fraction"]
    series = [(f"erank_{round(t * 100)}", f"effective rank, {round(t * 100)}% energy") for t in config["taus"]]
    series += [("stable_rank", "stable rank ‖A‖²_F / ‖A‖²₂")]
    with style():
        fig, ax = plt.subplots(figsize=(COLUMN_WIDTH, 3.3))
        ax.axhspan(low, high, color="0.88", zorder=0, label=f"seed 001 claim: {low * 100:g}–{high * 100:g}% of N")
        for i, (name, label) in enumerate(series):
            fracs = [c[name][c["n"] == n] / n for n in lengths]
            color = f"C{i}"
            ax.plot(lengths, [np.median(f) for f in fracs], marker="o", color=color, label=label)
            low, high = [np.percentile(f, 25) for f in fracs], [np.percentile(f, 75) for f in fracs]
            ax.fill_between(lengths, low, high, color=color, alpha=0.12, lw=0)
        ax.plot(lengths, config["head_dim"] / lengths, "k:", label="d_head / N (rank bound of S)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(lengths, [str(n) for n in lengths])
        ax.set_xlabel("sequence length N (tokens)")
        ax.set_ylabel("rank / N (median; band: 25–75th pct.)")
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, fontsize=6)
        return save_figure(fig, Path(figures_dir) / STUDY, "rank_vs_length", results=[data])


def fig_entropy_vs_rank(results_dir: Path, figures_dir: Path) -> list[Path]:
    """Entropy / ln N against effective rank / N, one point per (head, passage), coloured by layer."""
    from matplotlib.lines import Line2D

    data, _, c = _load(results_dir)
    lengths = np.unique(c["n"])
    colors = _layer_colors(int(c["layer"].max()) + 1)
    with style():
        fig, axes = plt.subplots(1, len(lengths), figsize=(PAGE_WIDTH, 2.2), sharey=True, constrained_layout=True)
        for ax, n in zip(np.atleast_1d(axes), lengths):
            sel = c["n"] == n
            ax.scatter(
                c["entropy_norm"][sel],
                c["erank_95"][sel] / n,
                c=colors[c["layer"][sel]],
                s=2,
                alpha=0.35,
                lw=0,
                rasterized=True,
            )
            sp = data["meta"].get("summary", {}).get("by_length", {}).get(str(n), {}).get("spearman_entropy_erank95")
            ax.set_title(f"N = {n}")
            if sp:
                label = f"ρ = {sp['rho']:.2f}\n[{sp['ci_low']:.2f}, {sp['ci_high']:.2f}]"
                box = {"facecolor": "white", "edgecolor": "0.7", "lw": 0.5}
                ax.text(0.97, 0.97, label, transform=ax.transAxes, ha="right", va="top", fontsize=6.5, bbox=box)
            ax.set_xlabel("row entropy / ln N")
            ax.set_xlim(0, 1)
            ax.set_ylim(0, 1)
        np.atleast_1d(axes)[0].set_ylabel("effective rank / N (95% energy)")
        fig.suptitle(
            "Spearman ρ of entropy vs effective rank over (head, passage), 95% CI by passage bootstrap", fontsize=7
        )
        handles = [Line2D([], [], ls="", marker="o", color=col, label=f"layer {i}") for i, col in enumerate(colors)]
        fig.legend(handles=handles, loc="outside right center", fontsize=6)
        return save_figure(fig, Path(figures_dir) / STUDY, "entropy_vs_rank", results=[data])


def fig_lowrank_error(results_dir: Path, figures_dir: Path) -> list[Path]:
    """Relative error of the attention output A_k V and of A_k, against the rank k."""
    data, config, c = _load(results_dir)
    lengths = np.unique(c["n"])
    ranks = config["ranks"]
    with style():
        fig, ax = plt.subplots(figsize=(COLUMN_WIDTH, 3.4))
        for i, n in enumerate(lengths):
            sel = c["n"] == n
            ks = [k for k in ranks if k < n]  # k = N is exact
            out = [c[f"out_err_{k}"][sel] for k in ks]
            color = f"C{i}"
            ax.plot(ks, [np.median(e) for e in out], marker="o", color=color, label=f"N = {n}: output A_k·V")
            ax.fill_between(
                ks,
                [np.percentile(e, 25) for e in out],
                [np.percentile(e, 75) for e in out],
                color=color,
                alpha=0.1,
                lw=0,
            )
            ax.plot(
                ks,
                [np.median(c[f"attn_err_{k}"][sel]) for k in ks],
                ls="--",
                marker="x",
                color=color,
                label=f"N = {n}: A_k",
            )
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(ranks, [str(k) for k in ranks])
        ax.set_xlabel("rank k of the truncated SVD of A")
        ax.set_ylabel("relative Frobenius error\n(median; band: 25–75th pct. of output error)")
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, fontsize=6)
        return save_figure(fig, Path(figures_dir) / STUDY, "lowrank_error", results=[data])


def fig_precision_vs_entropy(results_dir: Path, figures_dir: Path) -> list[Path]:
    """Output error of fp32 / fp16 / bf16 attention against the head's mean row entropy."""
    data, config, c = _load(results_dir)
    n = int(c["n"].max())
    sel = c["n"] == n
    unit_roundoff = config["unit_roundoff"]
    fp32_rule = config["seed_claims"]["fp32_below_entropy_nats"]
    panels = [
        ("", "q, k, v, S and P rounded to the format"),
        ("_flash", "S and softmax in fp32 (FlashAttention-style)"),
    ]
    with style():
        fig, axes = plt.subplots(1, 2, figsize=(PAGE_WIDTH, 2.6), sharey=True, constrained_layout=True)
        for ax, (suffix, title) in zip(axes, panels):
            for i, dtype in enumerate(("bf16", "fp16", "fp32")):
                name = f"err_{dtype}{suffix}" if dtype != "fp32" else "err_fp32"
                ax.scatter(c["entropy_mean"][sel], c[name][sel], s=2, alpha=0.3, lw=0, color=f"C{i}", rasterized=True)
                ax.axhline(unit_roundoff[dtype], color=f"C{i}", ls="--", lw=0.8)
                ax.plot([], [], ls="", marker="o", color=f"C{i}", label=f"{dtype} (dashed: unit roundoff)")
            ax.axvline(fp32_rule, color="k", ls=":", label=f"seed 001: FP32 below {fp32_rule:g} nat")
            ax.set_yscale("log")
            ax.set_title(title)
            ax.set_xlabel(f"mean row entropy (nats), N = {n}")
        axes[0].set_ylabel("relative output error vs float64")
        axes[1].legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=6)
        return save_figure(fig, Path(figures_dir) / STUDY, "precision_vs_entropy", results=[data])


def fig_spectra(results_dir: Path, figures_dir: Path) -> list[Path]:
    """Mean normalized singular values of S and of A = softmax(S) per layer at the largest N."""
    data, config, c = _load(results_dir)
    n = int(c["n"].max())
    d_head = config["head_dim"]
    spectra = [s for s in data["meta"]["summary"]["spectra"].values() if s["n"] == n]
    colors = _layer_colors(len(spectra))
    with style():
        fig, axes = plt.subplots(1, 2, figsize=(PAGE_WIDTH, 2.4), constrained_layout=True)
        for s, color in zip(sorted(spectra, key=lambda s: s["layer"]), colors):
            for ax, key in zip(axes, ("scores_sv_over_sv1", "attn_sv_over_sv1")):
                sv = np.maximum(np.array(s[key]), 1e-18)
                ax.plot(np.arange(1, sv.size + 1), sv, color=color, label=f"layer {s['layer']}")
        axes[0].axvline(d_head, color="k", ls=":")
        axes[0].text(d_head - 2, 1e-6, f"d_head = {d_head}", ha="right", fontsize=7)
        axes[0].set_title(f"scores S = QKᵀ/√d (N = {n})")
        axes[1].set_title(f"attention A = softmax(S) (N = {n})")
        for ax in axes:
            ax.set_yscale("log")
            ax.set_xscale("log")
            ax.set_xlabel("singular value index i")
            ax.set_ylabel(r"$\sigma_i / \sigma_1$ (mean over heads, passages)")
        axes[1].legend(fontsize=6)
        return save_figure(fig, Path(figures_dir) / STUDY, "spectra", results=[data])


FIGURES = [
    fig_heatmaps,
    fig_rank_vs_length,
    fig_entropy_vs_rank,
    fig_lowrank_error,
    fig_precision_vs_entropy,
    fig_spectra,
]
