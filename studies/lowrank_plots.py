"""Figures of the `lowrank` study, from results/lowrank/minilm.json, minilm-auto.json and
long-context-<device>.json (the GPU part) only.

One function per figure, each inside `nkattn.figures.style()`; PDF and PNG in figures/lowrank/.
The long-context figures (long_spectra, long_rank, long_cost) draw every device's file, or the
quick run's quick-long-context.json (the same pipeline on the CPU) when there is none.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from nkattn.figures import COLUMN_WIDTH, PAGE_WIDTH, load_result, save_figure, style
from nkattn.results import read_results
from nkattn.studies import lowrank as study

METHODS = (  # (column, label, style) of the output-error frontier
    ("best_out", "best rank-k output (tail of σ(A·V))", {"color": "k", "ls": ":"}),
    ("svd_out", "truncated SVD A_k", {"color": "C0", "marker": "o"}),
    ("rsvd_out", "randomized SVD (p = 10, q = 2)", {"color": "C1", "marker": "x", "ls": "--"}),
    ("nystrom_iter_out", "Nyström, iterative pinv", {"color": "C2", "marker": "s"}),
    ("nystrom_out", "Nyström, exact pinv", {"color": "C5", "marker": "s", "ls": "--"}),
    ("performer_out", "Performer FAVOR+", {"color": "C3", "marker": "^"}),
    ("linformer_out", "Linformer, random E, F", {"color": "C4", "marker": "v"}),
)


def _load(results_dir, auto=False):
    name, quick = (study.FULL_AUTO, study.QUICK_AUTO) if auto else (study.FULL_RESULT, study.QUICK_RESULT)
    data = load_result(results_dir, study.STUDY, name, command=study.COMMAND, quick=quick)
    return data, study.columns(data["records"])


def _save(fig, figures_dir, name, data):
    return save_figure(fig, Path(figures_dir) / study.STUDY, name, results=[data])


def fig_spectra(results_dir: Path, figures_dir: Path) -> list[Path]:
    """Mean σ_i / σ_1 per layer: exact SVD (lines) and the matrix-free randomized SVD (markers)."""
    data, _ = _load(results_dir)
    spectra = data["meta"]["summary"]["spectra"]
    n = max(s["n"] for s in spectra)
    layers = sorted({s["layer"] for s in spectra})
    colors = plt.get_cmap("viridis")(np.linspace(0, 0.9, len(layers)))
    with style():
        fig, ax = plt.subplots(figsize=(COLUMN_WIDTH, 3.0))
        for s in spectra:
            if s["n"] != n:
                continue
            color = colors[layers.index(s["layer"])]
            sv = np.array(s["sv_over_sv1"])
            index = np.arange(1, sv.size + 1)
            if s["source"] == "exact":
                ax.plot(index, sv, color=color, label=f"layer {s['layer']}")
            else:
                ax.plot(index, sv, ls="", marker="x", ms=3, color=color)
        ax.plot([], [], ls="", marker="x", color="0.3",
                label=f"matrix-free rSVD, k = {data['meta']['config']['matrix_free_rank']}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("singular value index i")
        ax.set_ylabel(f"σ_i / σ_1 of A (mean over heads, passages; N = {n})")
        ax.legend(fontsize=6, ncol=2)
        return _save(fig, figures_dir, "spectra", data)


def fig_rsvd_accuracy(results_dir: Path, figures_dir: Path) -> list[Path]:
    """Spectral error of the randomized SVD over σ_{k+1} per k, and principal angle against the gap."""
    data, c = _load(results_dir)
    config = data["meta"]["config"]
    ranks = sorted(set(c["k"].astype(int).tolist()))
    with style():
        fig, axes = plt.subplots(1, 2, figsize=(PAGE_WIDTH, 2.6), constrained_layout=True)
        ax = axes[0]
        groups = [c["rsvd_spec_ratio"][c["k"] == r] for r in ranks]
        labels = [str(r) for r in ranks]
        if "mf_spec_ratio" in c:
            sel = np.isfinite(c["mf_spec_ratio"])
            groups.append(c["mf_spec_ratio"][sel])
            labels.append(f"{config['matrix_free_rank']}\nmatrix-free")
        ax.boxplot(groups, whis=(0, 100), widths=0.5)
        ax.set_xticks(range(1, len(labels) + 1), labels)
        ax.axhline(config["spec_target"], color="C3", ls="--", label=f"target {config['spec_target']}")
        ax.set_xlabel("rank k")
        ax.set_ylabel("‖A − Â_k‖₂ / σ_{k+1}")
        ax.set_title("box: quartiles; whiskers: min to max over heads", fontsize=7)
        ax.legend()
        ax = axes[1]
        for i, r in enumerate(ranks):
            sel = c["k"] == r
            ax.scatter(np.maximum(c["gap"][sel], 1e-8), c["rsvd_angle"][sel], s=3, lw=0, alpha=0.5, color=f"C{i}",
                       label=f"k = {r}", rasterized=True)
        ax.set_xscale("log")
        ax.set_xlabel("relative gap (σ_k − σ_{k+1}) / σ_k")
        ax.set_ylabel("largest principal angle, span U_k vs Û_k (°)")
        ax.legend(markerscale=3)
        return _save(fig, figures_dir, "rsvd_accuracy", data)


def fig_frontier(results_dir: Path, figures_dir: Path) -> list[Path]:
    """Output error ‖(A − Ã) V‖_F / ‖A V‖_F against k for every method (median, 10–90th percentile band)."""
    data, c = _load(results_dir)
    ranks = np.array(sorted(set(c["k"].astype(int).tolist())))
    n = int(c["n"].max())
    heads = int((c["k"] == ranks[0]).sum())
    with style():
        fig, axes = plt.subplots(1, 2, figsize=(PAGE_WIDTH, 2.8), constrained_layout=True)
        for column, label, kw in METHODS:
            values = [c[column][c["k"] == r] for r in ranks]
            median = np.array([np.median(v) for v in values])
            keep = median > 0  # the best output error is exactly 0 from k = d_head on
            axes[0].plot(ranks[keep], median[keep], label=label, **kw)
            axes[0].fill_between(ranks[keep], [np.percentile(v, 10) for v in np.array(values)[keep]],
                                 [np.percentile(v, 90) for v in np.array(values)[keep]], color=kw["color"],
                                 alpha=0.08, lw=0)
        axes[0].set_ylabel("output error ‖(A − Ã)V‖_F / ‖AV‖_F")
        attn = [("ey_fro", "Eckart–Young optimum", {"color": "k", "ls": ":"})] + [
            (col.replace("_out", "_attn"), label, kw) for col, label, kw in METHODS[2:]
        ]
        for column, label, kw in attn:
            axes[1].plot(ranks, [np.median(c[column][c["k"] == r]) for r in ranks], label=label, **kw)
        axes[1].set_ylabel("‖A − Ã‖_F / ‖A‖_F (median)")
        for ax in axes:
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xticks(ranks, [str(r) for r in ranks])
            ax.set_xlabel(f"rank k (N = {n})")
        axes[0].set_title(f"median and 10–90th percentile over {heads} heads", fontsize=7)
        axes[1].legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=6)
        return _save(fig, figures_dir, "frontier", data)


def fig_auto_rank(results_dir: Path, figures_dir: Path) -> list[Path]:
    """rank="auto": the chosen k / N per rule (ECDF) and the output error it leaves."""
    data, c = _load(results_dir, auto=True)
    rules = list(dict.fromkeys(c["rule"].tolist()))
    with style():
        fig, axes = plt.subplots(1, 2, figsize=(PAGE_WIDTH, 2.6), constrained_layout=True)
        axes[0].axvspan(0.1, 0.3, color="0.88", zorder=0, label="seed 001: 10–30% of N")
        for i, rule in enumerate(rules):
            sel = c["rule"] == rule
            frac = np.sort(c["k"][sel] / c["n"][sel])
            axes[0].step(frac, np.arange(1, frac.size + 1) / frac.size, where="post", color=f"C{i}", label=rule)
            axes[1].scatter(np.full(sel.sum(), i) + np.linspace(-0.3, 0.3, sel.sum()), c["out_err"][sel], s=2,
                            lw=0, alpha=0.4, color=f"C{i}", rasterized=True)
            kind, value = rule.split("=")
            if kind == "tolerance":
                axes[1].hlines(float(value), i - 0.4, i + 0.4, color="k", lw=1)
        axes[0].set_xscale("log")
        axes[0].set_xlabel("chosen rank k / N")
        axes[0].set_ylabel("share of heads")
        axes[0].legend(fontsize=6)
        axes[1].set_xticks(range(len(rules)), rules, rotation=20)
        axes[1].set_yscale("log")
        axes[1].set_ylabel("output error ‖(A − Â_k)V‖_F / ‖AV‖_F\n(black: the tolerance)")
        return _save(fig, figures_dir, "auto_rank", data)


def fig_auto_heatmap(results_dir: Path, figures_dir: Path) -> list[Path]:
    """Mean chosen rank per layer x head, for the default output budget and seed 001's energy rule."""
    data, c = _load(results_dir, auto=True)
    n = int(c["n"].max())
    panels = [r for r in ("tolerance=0.01", "energy=0.95") if (c["rule"] == r).any()]
    layers, heads = int(c["layer"].max()) + 1, int(c["head"].max()) + 1
    with style():
        fig, axes = plt.subplots(1, len(panels), figsize=(PAGE_WIDTH, 2.3), constrained_layout=True, squeeze=False)
        for ax, rule in zip(axes[0], panels):
            sel = c["rule"] == rule
            total, count = np.zeros((layers, heads)), np.zeros((layers, heads))
            np.add.at(total, (c["layer"][sel].astype(int), c["head"][sel].astype(int)), c["k"][sel])
            np.add.at(count, (c["layer"][sel].astype(int), c["head"][sel].astype(int)), 1)
            grid = total / np.maximum(count, 1)
            im = ax.imshow(grid, aspect="auto", norm="log", vmin=1, vmax=n)
            for (i, j), val in np.ndenumerate(grid):
                ax.text(j, i, f"{val:.0f}", ha="center", va="center", fontsize=5.5,
                        color="w" if val < np.sqrt(n) else "k")
            ax.set_xticks(range(heads))
            ax.set_yticks(range(layers))
            ax.set_xlabel("head")
            ax.set_ylabel("layer")
            ax.set_title(f"rank='auto', {rule} (mean k, N = {n})")
            ax.grid(False)
            fig.colorbar(im, ax=ax, label="k", shrink=0.9)
        return _save(fig, figures_dir, "auto_heatmap", data)


def fig_estimator(results_dir: Path, figures_dir: Path) -> list[Path]:
    """The a-posteriori estimate over the true Frobenius error, and the bound over the true spectral error."""
    data, c = _load(results_dir)
    with style():
        fig, axes = plt.subplots(1, 2, figsize=(PAGE_WIDTH, 2.3), constrained_layout=True)
        axes[0].hist(c["est_ratio"], bins=60, color="C0")
        axes[0].axvline(1.0, color="k", ls=":")
        axes[0].set_xlabel("error_estimate / ‖A − Â_k‖_F (5 probes)")
        axes[1].hist(c["bound_ratio"], bins=np.geomspace(max(c["bound_ratio"].min(), 0.5), c["bound_ratio"].max(), 60),
                     color="C1")
        axes[1].axvline(1.0, color="C3", ls="--", label="bound = true error")
        axes[1].set_xscale("log")
        axes[1].set_xlabel("error_bound / ‖A − Â_k‖₂ (fails below 1 with prob. ≤ 1e-5)")
        axes[1].legend()
        for ax in axes:
            ax.set_ylabel("heads × ranks")
        return _save(fig, figures_dir, "estimator", data)


# --------------------------------------------------------------------------------------
# The long-context part (results/lowrank/long-context-<device>.json, from the GPU)
# --------------------------------------------------------------------------------------

LONG_DATA_LABEL = {"planted": "planted (d = 64)", "minilm": "MiniLM, pooled (d = 32)"}
TAU_COLOR = {0.9: "C0", 0.95: "C1", 0.99: "C2"}


def _load_long(results_dir):
    """Every device's long-context results, or the quick run's: (loaded files, their records pooled).

    Spectra and effective ranks are properties of the data (devices agree to rounding), so
    they pool the records; times and memory are drawn per device.
    """
    folder = Path(results_dir) / study.STUDY
    found = sorted(folder.glob(study.LONG_RESULTS))
    if found:
        loaded = [{**read_results(path), "path": path, "quick_run": False} for path in found]
    else:
        loaded = [load_result(results_dir, study.STUDY, study.LONG_RESULTS.replace("*", "<device>"),
                              command=f"{study.LONG_COMMAND} (on a GPU)", quick=study.QUICK_LONG_RESULT)]
    return loaded, [r for data in loaded for r in data["records"]]


def _long_save(fig, figures_dir, name, loaded):
    return save_figure(fig, Path(figures_dir) / study.STUDY, name, results=loaded)


def _factors(records, data=None, dtype="float32"):
    return [r for r in records
            if r["kind"] == "factors" and r["dtype"] == dtype and (data is None or r["data"] == data)]


def _by_n(records) -> dict[int, list[dict]]:
    out = {}
    for r in sorted(records, key=lambda r: r["n"]):
        out.setdefault(r["n"], []).append(r)
    return out


def _n_label(n: int) -> str:
    return f"{n // 1048576}M" if n % 1048576 == 0 else f"{n // 1024}K" if n % 1024 == 0 else str(n)


def _length_axis(ax, lengths):
    ns = sorted(set(lengths))
    ax.set_xscale("log", base=2)
    ax.set_xticks(ns, [_n_label(n) for n in ns])
    ax.minorticks_off()
    ax.set_xlabel("sequence length N")


def fig_long_spectra(results_dir: Path, figures_dir: Path) -> list[Path]:
    """σ_i / σ_1 of the top singular values at every N, one line per head: planted (with its exact
    spectrum) and MiniLM (whose heads may differ between N: those the vectors file holds at N rows)."""
    loaded, records = _load_long(results_dir)
    config = loaded[0]["meta"]["config"]
    present = [d for d in study.LONG_DATA if _factors(records, d)]
    with style():
        fig, axes = plt.subplots(1, max(len(present), 1), figsize=(PAGE_WIDTH, 2.6), constrained_layout=True,
                                 squeeze=False)
        for ax, data in zip(axes[0], present):
            groups = _by_n(_factors(records, data))
            colors = plt.get_cmap("viridis")(np.linspace(0, 0.9, len(groups)))
            for color, (n, rows) in zip(colors, groups.items()):
                heads = sorted({(r.get("layer"), r.get("head"), r["head_index"]) for r in rows})
                label = f"N = {_n_label(n)}" + (f", {len(heads)} heads" if len(heads) > 1 else "")
                if data == "minilm" and len(heads) <= 4:
                    label += ": " + ", ".join(f"L{layer}H{head}" for layer, head, _ in heads)
                for i, r in enumerate(rows):
                    sv = np.array(r["sigma"], dtype=float)
                    ax.plot(np.arange(1, sv.size + 1), sv / sv[0], color=color, lw=1.0, alpha=0.8,
                            label=label if i == 0 else None)
            if data == "planted":
                planted = config["planted"]
                exact = np.r_[1.0, np.full(planted["classes"] - 1, planted["lambda"])]
                ax.plot(np.arange(1, exact.size + 1), exact, "k:", label="exact (then 0)")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("singular value index i")
            ax.set_title(LONG_DATA_LABEL[data])
            ax.legend(fontsize=6)
        axes[0, 0].set_ylabel(f"σ_i / σ_1 of A (randomized SVD, k = {config['rank']})")
        return _long_save(fig, figures_dir, "long_spectra", loaded)


def fig_long_rank(results_dir: Path, figures_dir: Path) -> list[Path]:
    """Effective rank / N against N: the smallest k holding τ of ‖A‖_F² (τ = 0.9, 0.95, 0.99), and the
    stable rank; a head whose rank exceeds the computed k is drawn as an open triangle at (k + 1) / N."""
    loaded, records = _load_long(results_dir)
    config = loaded[0]["meta"]["config"]
    rank = config["rank"]
    markers = {"planted": "o", "minilm": "x"}
    with style():
        fig, ax = plt.subplots(figsize=(COLUMN_WIDTH, 2.8))
        low, high = config["seed_rank_band"]
        ax.axhspan(low, high, color="0.88", zorder=0, label=f"seed 001: {low:.0%}–{high:.0%} of N")
        for data in study.LONG_DATA:
            rows = _factors(records, data)
            if not rows:
                continue
            n = np.array([r["n"] for r in rows], dtype=float)
            for tau in config["taus"]:
                key = f"erank_{round(tau * 100)}"
                above = np.array([r[key] is None for r in rows])
                k = np.array([rank + 1 if r[key] is None else r[key] for r in rows], dtype=float)
                color = TAU_COLOR.get(tau, "0.3")
                ax.scatter(n[~above], k[~above] / n[~above], marker=markers[data], s=14, color=color, lw=1,
                           label=f"{data}, τ = {tau}")
                ax.scatter(n[above], k[above] / n[above], marker="^", s=14, facecolors="none", edgecolors=color,
                           lw=0.8)
            stable = np.array([r["stable_rank"] for r in rows], dtype=float)
            ax.scatter(n, stable / n, marker=markers[data], s=14, color="0.4", lw=1, label=f"{data}, stable rank")
        ax.plot([], [], ls="", marker="^", mfc="none", color="0.3", label=f"above k = {rank} (drawn at {rank + 1})")
        _length_axis(ax, [r["n"] for r in records])
        ax.set_yscale("log")
        ax.set_ylabel("effective rank / N")
        ax.legend(fontsize=5.5, loc="center left", bbox_to_anchor=(1.02, 0.5))
        return _long_save(fig, figures_dir, "long_rank", loaded)


def fig_long_cost(results_dir: Path, figures_dir: Path) -> list[Path]:
    """Time of one randomized SVD against 2(q + 1) single passes of width l and one exact pass; device
    memory of one call (``allocated_bytes``, the peak of its live allocations as ``meta.config.memory``
    says, plus the resident inputs) against the issue's budget. Records of calls from before the study
    measured that peak (``meta.calls`` names each call's tree) hold all bytes allocated, an upper bound.
    Colour: the case (data, dtype, kind, rank, device); line style: what was measured."""
    loaded, _ = _load_long(results_dir)
    power_iters = loaded[0]["meta"]["config"]["power_iters"]
    passes = 2 * (power_iters + 1)
    with style():
        fig, (ax_time, ax_mem) = plt.subplots(1, 2, figsize=(PAGE_WIDTH, 3.2), constrained_layout=True)
        cases = {}  # (case label) -> {n: record}: the timings are the whole call's, shared by its heads
        for data in loaded:
            suffix = f", {data['meta']['device']}" if len(loaded) > 1 else ""
            for r in data["records"]:
                label = f"{r['data']} {r['dtype']}, {r['kind']} k = {r['rank']}{suffix}"
                cases.setdefault(label, {}).setdefault(r["n"], r)
        measured_memory = False
        for i, (label, by_n) in enumerate(sorted(cases.items())):
            color = f"C{i % 7}"
            ns = sorted(by_n)
            rows = [by_n[n] for n in ns]
            ax_time.plot(ns, [r["rsvd"]["median_ms"] for r in rows], marker="o", color=color, label=label)
            timed = [(n, r["passes"]) for n, r in zip(ns, rows) if r.get("passes")]
            if timed:
                ax_time.plot([n for n, _ in timed], [passes * 0.5 * (p["times"]["median_ms"]
                                                                     + p["transpose_times"]["median_ms"])
                                                     for _, p in timed], ls="--", color=color)
                ax_time.plot([n for n, _ in timed], [p["exact_attention_d"]["median_ms"] for _, p in timed],
                             ls=":", color=color)
            if rows[0]["allocated_bytes"] is not None:
                measured_memory = True
                ax_mem.plot(ns, [(r["allocated_bytes"] + r["resident_bytes"]) / 2**30 for r in rows], marker="o",
                            color=color)
                if "budget_bytes" in rows[0]:
                    ax_mem.plot(ns, [r["budget_bytes"] / 2**30 for r in rows], ls="--", color=color)
        ax_time.plot([], [], marker="o", color="0.3", label="randomized SVD, whole call")
        ax_time.plot([], [], ls="--", color="0.3", label=f"{passes} single passes of width l = k + p")
        ax_time.plot([], [], ls=":", color="0.3", label="one exact attention pass (width d)")
        ax_time.set_ylabel("time per call (ms, median)")
        ax_mem.set_ylabel("device memory per call (GiB)")
        lengths = [n for by_n in cases.values() for n in by_n]
        _length_axis(ax_time, lengths)
        ax_time.set_yscale("log")
        if measured_memory:
            _length_axis(ax_mem, lengths)
            ax_mem.plot([], [], marker="o", color="0.3", label="peak of live allocations + resident inputs")
            ax_mem.plot([], [], ls="--", color="0.3", label="budget: Q, K, V, lse, N × l factors")
            ax_mem.set_yscale("log")
            ax_mem.legend(fontsize=6)
        else:
            ax_mem.text(0.5, 0.5, "no device memory in these results\n(CPU bench)", ha="center", va="center",
                        transform=ax_mem.transAxes, color="0.4")
            ax_mem.set_xticks([])
            ax_mem.set_yticks([])
        # the cases (colours) under both panels; the line styles in the time panel
        handles, labels = ax_time.get_legend_handles_labels()
        fig.legend(handles[: len(cases)], labels[: len(cases)], loc="outside lower center", ncol=3, fontsize=6)
        ax_time.legend(handles[len(cases):], labels[len(cases):], fontsize=6)
        ax_time.set_title(", ".join(dict.fromkeys(d["meta"]["device"] for d in loaded)), fontsize=7)
        return _long_save(fig, figures_dir, "long_cost", loaded)


FIGURES = [fig_spectra, fig_rsvd_accuracy, fig_frontier, fig_auto_rank, fig_auto_heatmap, fig_estimator,
           fig_long_spectra, fig_long_rank, fig_long_cost]
