"""Figures of the LSH recall study, drawn from results/lsh/recall.json only.

recall_vs_fraction, needle_vs_n, amplification, frontier, bucket_skew,
collision_curve (figures/lsh/). The configuration they show (bits and tables
swept, the needle's cosine, the seed's claims) is read from the results'
``meta.config``; a quick run's ``quick.json`` is drawn when the full run's file is
absent, and the figures then say so.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from nkattn.figures import PAGE_WIDTH, load_result, save_figure, style
from nkattn.reference.lsh import collision_probability
from nkattn.results import select
from nkattn.studies.lsh_recall import COMMAND, FULL_RESULT, QUICK_RESULT, STUDY

# configurations drawn in needle_vs_n and collision_curve (a choice of the figure, not of the study)
NEEDLE_FIG_CONFIGS = ((6, 4), (8, 8), (10, 16), (12, 16), (16, 16))
CURVE_CONFIGS = ((4, 1), (8, 1), (16, 1), (8, 4), (16, 16))


def _load(results_dir):
    data = load_result(results_dir, STUDY, FULL_RESULT, command=COMMAND, quick=QUICK_RESULT)
    return data, data["meta"]["config"], data["records"]


def _mean_over(rows, name):
    """Mean of a metric over rows that share (bits, tables) (e.g. MiniLM heads): {(bits, tables): value}."""
    acc = {}
    for r in rows:
        acc.setdefault((r["bits"], r["tables"]), []).append(r[name])
    return {cfg: float(np.nanmean(v)) for cfg, v in acc.items()}


def _table_colors(tables):
    return dict(zip(tables, plt.get_cmap("viridis")(np.linspace(0, 0.85, len(tables)))))


def _largest(records, config):
    """(N, d, records) of the largest needle haystack at the smallest head dim swept."""
    d = min(config["needle"]["dims"])
    rows = select(records, experiment="needle", d=d)
    n = max(r["n_keys"] for r in rows)
    return n, d, select(rows, n_keys=n)


def _short(n: int) -> str:
    """1048576 -> '1M', 65536 -> '64K' (other sizes with thousands separators)."""
    for unit, size in (("M", 1 << 20), ("K", 1 << 10)):
        if n % size == 0:
            return f"{n // size}{unit}"
    return f"{n:,}"


def fig_recall_vs_fraction(results_dir: Path, figures_dir: Path) -> list[Path]:
    """Needle recall (cos 0.9) and recall@50 against candidate fraction, per (bits, tables), theory dashed."""
    data, config, records = _load(results_dir)
    n, d, rows = _largest(records, config)
    tables, bits = config["tables"], config["bits"]
    colors = _table_colors(tables)
    with style():
        fig, axes = plt.subplots(1, 2, figsize=(PAGE_WIDTH, 2.7), sharey=True, constrained_layout=True)
        panels = [
            ("needle_recall", "theory_needle_recall", f"needle at cosine {config['needle']['cos']}"),
            ("recall_at_50", "theory_recall_at_50", "true top-50 keys (recall@50)"),
        ]
        for ax, (name, theory, title) in zip(axes, panels):
            for t in tables:
                sel = sorted(select(rows, tables=t), key=lambda r: r["bits"])
                x = [r["candidate_fraction"] for r in sel]
                ax.plot(x, [r[name] for r in sel], "o-", color=colors[t], label=f"{t} table{'s' * (t > 1)}")
                ax.plot(
                    [r["theory_candidate_fraction"] for r in sel],
                    [r[theory] for r in sel],
                    "--",
                    color=colors[t],
                    lw=0.8,
                )
                if t == tables[-1]:
                    for r in sel:
                        ax.annotate(
                            f"{r['bits']}b",
                            (r["candidate_fraction"], r[name]),
                            fontsize=5.5,
                            xytext=(3, -7),
                            textcoords="offset points",
                        )
            ax.set_xscale("log")
            ax.set_xlabel("candidate fraction |candidates| / N (exact, mean over queries)")
            ax.set_title(title)
            ax.axhline(0.9, color="0.5", ls=":", lw=0.8)
        axes[0].set_ylabel(f"recall (mean over {rows[0]['n_queries']} queries)")
        axes[1].legend(loc="lower right", fontsize=6)
        fig.suptitle(
            f"Isotropic keys, N = {n:,}, d = {d}; points: bits {min(bits)}-{max(bits)} per table count; "
            "dashed: SimHash theory "
            "(needle: 1-(1-(1-θ/π)^b)^T; top-50: at each query's measured top-50 cosines)",
            fontsize=6.5,
        )
        return save_figure(fig, Path(figures_dir) / STUDY, "recall_vs_fraction", results=[data])


def fig_needle_vs_n(results_dir: Path, figures_dir: Path) -> list[Path]:
    """Needle recall against N (Wilson 95% intervals) for a few configurations; theory does not depend on N."""
    data, config, records = _load(results_dir)
    records = select(records, experiment="needle")
    dims = sorted({r["d"] for r in records})
    with style():
        fig, axes = plt.subplots(
            1, len(dims), figsize=(PAGE_WIDTH, 2.5), sharey=True, constrained_layout=True, squeeze=False
        )
        for ax, d in zip(axes[0], dims):
            for i, (b, t) in enumerate(NEEDLE_FIG_CONFIGS):
                sel = sorted(select(records, d=d, bits=b, tables=t), key=lambda r: r["n_keys"])
                if not sel:
                    continue
                ns = np.array([r["n_keys"] for r in sel])
                y = np.array([r["needle_recall"] for r in sel])
                err = [y - [r["needle_recall_lo"] for r in sel], [r["needle_recall_hi"] for r in sel] - y]
                ax.errorbar(ns, y, yerr=err, marker="o", color=f"C{i}", capsize=2, label=f"{b} bits x {t} tables")
                ax.axhline(sel[0]["theory_needle_recall"], color=f"C{i}", ls="--", lw=0.8)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("keys N")
            ax.set_title(f"d = {d}, needle at cosine {config['needle']['cos']}")
        axes[0, 0].set_ylabel("needle recall (95% Wilson interval)")
        axes[0, -1].legend(fontsize=6, loc="lower left")
        fig.suptitle("Dashed: SimHash theory (independent of N); one plane draw per N", fontsize=7)
        return save_figure(fig, Path(figures_dir) / STUDY, "needle_vs_n", results=[data])


def fig_amplification(results_dir: Path, figures_dir: Path) -> list[Path]:
    """Our amplification (z-score of the candidates' mean) vs the seed's reading (ratio of means)."""
    data, config, records = _load(results_dir)
    n, d, rows = _largest(records, config)
    colors = _table_colors(config["tables"])
    claim_low, claim_high = config["seed_claims"]["amplification"]
    with style():
        fig, axes = plt.subplots(1, 2, figsize=(PAGE_WIDTH, 2.6), constrained_layout=True)
        for t in config["tables"]:
            sel = sorted(select(rows, tables=t), key=lambda r: r["bits"])
            b = [r["bits"] for r in sel]
            axes[0].errorbar(
                b,
                [r["amplification"] for r in sel],
                yerr=[r["amplification_std"] for r in sel],
                marker="o",
                color=colors[t],
                capsize=2,
                label=f"T = {t}",
            )
            axes[1].plot(
                b, [r["amplification_seed_median"] for r in sel], "o-", color=colors[t], label=f"T = {t}: median"
            )
            axes[1].plot(b, [r["amplification_seed"] for r in sel], "x:", color=colors[t], lw=0.8)
        axes[0].set_title("ours: (mean cand. score − mean random) / std random")
        axes[0].set_ylabel("amplification (mean ± std over queries)")
        axes[1].set_title("seed's reading: mean cand. score / mean random score")
        axes[1].set_yscale("symlog", linthresh=10)
        axes[1].set_ylabel("ratio (o: median, x: mean over queries)")
        for ax in axes:
            ax.set_xlabel("bits per table")
            ax.set_xticks(config["bits"])
        axes[0].legend(fontsize=6)
        axes[1].axhspan(claim_low, claim_high, color="0.85", zorder=0)
        axes[1].text(min(config["bits"]), 1.3 * claim_low, f"seed: {claim_low}–{claim_high}×", fontsize=6)
        fig.suptitle(f"Isotropic keys with a planted needle, N = {n:,}, d = {d}", fontsize=7)
        return save_figure(fig, Path(figures_dir) / STUDY, "amplification", results=[data])


def _frontier_panels(records, config):
    """Isotropic keys at the mixtures' N and d (the largest haystack if not swept), then each structured data set."""
    mixtures = config["mixtures"]
    iso = select(records, experiment="needle", d=mixtures["d"], n_keys=mixtures["n_keys"]) or _largest(records, config)[2]
    panels = []
    panels.append((f"isotropic\nN = {iso[0]['n_keys']:,}, d = {iso[0]['d']}", iso))
    structured = select(records, experiment="structured")
    for name in dict.fromkeys(r["data"] for r in structured):
        rows = select(structured, data=name)
        label = name if "MiniLM" not in name else f"{name} ({len({(r['layer'], r['head']) for r in rows})} heads)"
        panels.append((f"{label}\nN = {rows[0]['n_keys']:,}, d = {rows[0]['d']}", rows))
    return panels


def fig_frontier(results_dir: Path, figures_dir: Path) -> list[Path]:
    """recall@50 against candidate fraction on isotropic, clustered and MiniLM data; theory hollow."""
    data, config, records = _load(results_dir)
    panels = _frontier_panels(records, config)
    colors = _table_colors(config["tables"])
    cols = 4
    rows_n = -(-len(panels) // cols)
    with style():
        fig, axes = plt.subplots(
            rows_n,
            cols,
            figsize=(PAGE_WIDTH, 1.9 * rows_n + 0.4),
            sharex=True,
            sharey=True,
            constrained_layout=True,
            squeeze=False,
        )
        for ax, (title, rows) in zip(axes.flat, panels):
            rec, frac, theo = (
                _mean_over(rows, k) for k in ("recall_at_50", "candidate_fraction", "theory_recall_at_50")
            )
            for t in config["tables"]:
                cfgs = sorted((b, t) for b in config["bits"] if (b, t) in rec)
                ax.plot([frac[c] for c in cfgs], [rec[c] for c in cfgs], "o-", color=colors[t], ms=3, label=f"T = {t}")
                ax.plot(
                    [frac[c] for c in cfgs], [theo[c] for c in cfgs], "o--", mfc="none", color=colors[t], ms=3, lw=0.6
                )
            ax.axhline(0.9, color="0.5", ls=":", lw=0.8)
            ax.set_xscale("log")
            ax.set_title(title, fontsize=6.5)
        for ax in axes.flat[len(panels) :]:
            ax.set_visible(False)
        for ax in axes[:, 0]:
            ax.set_ylabel("recall@50")
        for ax in axes[-1]:
            ax.set_xlabel("candidate fraction")
        axes.flat[0].legend(fontsize=5.5, loc="upper left")
        fig.suptitle(
            f"recall@50 of the true top-50 vs candidate fraction, bits {min(config['bits'])}-{max(config['bits'])} "
            "along each line; "
            "hollow dashed: theory at the measured top-50 cosines",
            fontsize=7,
        )
        return save_figure(fig, Path(figures_dir) / STUDY, "frontier", results=[data])


def fig_bucket_skew(results_dir: Path, figures_dir: Path) -> list[Path]:
    """Largest bucket's share and collision mass / uniform of the keys' buckets, per data set."""
    data, config, records = _load(results_dir)
    rows = select(records, experiment="buckets")
    mixtures = config["mixtures"]
    iso = select(rows, data="isotropic", n_keys=mixtures["n_keys"], d=mixtures["d"]) or select(rows, data="isotropic")
    datasets = [("isotropic", iso)]
    datasets += [
        (name, select(rows, data=name)) for name in dict.fromkeys(r["data"] for r in rows) if name != "isotropic"
    ]
    with style():
        fig, axes = plt.subplots(1, 3, figsize=(PAGE_WIDTH, 2.5), constrained_layout=True)
        for i, (name, sel) in enumerate(datasets):
            for ax, key in zip(axes, ("largest_bucket_share", "mass_ratio", "gini")):
                vals = {}
                for r in sel:
                    v = r["collision_mass"] / r["collision_mass_uniform"] if key == "mass_ratio" else r[key]
                    vals.setdefault(r["bits"], []).append(v)
                b = sorted(vals)
                med = [np.median(vals[x]) for x in b]
                ax.plot(b, med, "o-", color=f"C{i % 7}", ms=3, label=name)
                if max(len(v) for v in vals.values()) > 1:
                    ax.fill_between(
                        b, [min(vals[x]) for x in b], [max(vals[x]) for x in b], color=f"C{i % 7}", alpha=0.12, lw=0
                    )
        axes[0].set_ylabel("largest bucket's share of the keys")
        axes[1].set_ylabel("collision mass Σ p_b² / 2^-bits")
        axes[2].set_ylabel("Gini of the 2^bits bucket sizes")
        for ax in axes[:2]:
            ax.set_yscale("log")
        for ax in axes:
            ax.set_xlabel("bits per table")
            ax.set_xticks(config["bits"])
        axes[2].legend(fontsize=5.5)
        fig.suptitle(
            f"Bucket occupancy of the keys, one table (mean over {config['plane_tables']} tables; "
            "MiniLM: median over heads, band min-max)",
            fontsize=7,
        )
        return save_figure(fig, Path(figures_dir) / STUDY, "bucket_skew", results=[data])


def fig_collision_curve(results_dir: Path, figures_dir: Path) -> list[Path]:
    """Collision rate vs cosine: controlled pairs (Clopper-Pearson 95%) and binned top-50 pairs, theory solid."""
    data, config, records = _load(results_dir)
    n_iso, d_iso, _ = _largest(records, config)
    cal = select(records, experiment="calibration")
    binned = select(records, experiment="binned")
    c = np.linspace(0, 1, 201)
    with style():
        fig, axes = plt.subplots(1, 2, figsize=(PAGE_WIDTH, 2.6), constrained_layout=True)
        for i, (b, t) in enumerate(CURVE_CONFIGS):
            color = f"C{i}"
            for ax in axes:
                ax.plot(c, collision_probability(c, b, t), color=color, lw=0.9, label=f"{b} bits x {t} tables")
            sel = sorted(select(cal, bits=b, tables=t), key=lambda r: r["cos"])
            y = np.array([r["rate"] for r in sel])
            axes[0].errorbar(
                [r["cos"] for r in sel],
                y,
                yerr=[y - [r["lo"] for r in sel], [r["hi"] for r in sel] - y],
                ls="",
                marker="o",
                ms=3,
                color=color,
                capsize=2,
            )
            for name, marker in (("isotropic", "s"), ("MiniLM", "^")):
                rows = select(binned, data=name, bits=b, tables=t)
                if name == "isotropic":
                    rows = select(rows, n_keys=n_iso, d=d_iso)
                agg = {}
                for r in rows:
                    a = agg.setdefault(r["cos_lo"], [0, 0, 0.0])
                    a[0] += r["hits"]
                    a[1] += r["pairs"]
                    a[2] += r["cos_mean"] * r["pairs"]
                pts = [(a[2] / a[1], a[0] / a[1]) for a in agg.values() if a[1] >= 200]
                if pts:
                    axes[1].plot(*zip(*sorted(pts)), ls="", marker=marker, ms=3, mfc="none", color=color)
        axes[0].set_title(f"pairs at set cosines, d = {cal[0]['d']} ({cal[0]['pairs']:,} pairs per point)")
        axes[1].set_title(f"top-50 pairs binned by cosine (□ isotropic {_short(n_iso)}, d = {d_iso}; △ MiniLM)")
        for ax in axes:
            ax.set_xlabel("cosine(query, key)")
            ax.set_ylabel("collision rate (≥ 1 shared bucket)")
            ax.set_yscale("log")
            ax.set_ylim(1e-5, 1.5)
        axes[0].legend(fontsize=5.5, loc="lower right")
        return save_figure(fig, Path(figures_dir) / STUDY, "collision_curve", results=[data])


FIGURES = [
    fig_recall_vs_fraction,
    fig_needle_vs_n,
    fig_amplification,
    fig_frontier,
    fig_bucket_skew,
    fig_collision_curve,
]
