"""Figure of the distributed bench, drawn from results/bench/distributed-*.json only.

distributed_scaling (figures/bench/): scaling efficiency T₁ / (P·T_P) against the
number of GPUs P, T₁ being the one-GPU nkattn kernel of the same run, one panel per
(dtype, N): full attention on the top row, causal below. Lines: nkattn "sequence",
nkattn "heads" and torch's context_parallel (a ring over SDPA; it refuses
non-causal inputs, and its points are measured against nkattn's T₁, so they fold
torch's one-GPU speed in). Filled markers: bit-identical to one GPU (O and lse,
every element); the title says when every nkattn point is. The issue's targets
(0.90 full, 0.85 causal, at N = 1M on 4 GPUs) are thin lines in the 1M panels.
When the results hold memory records (``--memory-n``), a side panel sets each
strategy's peak memory per GPU against its budget (shards plus communication
buffers).

Every ``distributed-*.json`` of one device is read; where two runs measured the
same (dtype, impl, strategy, P, N, H, causal), the later one (``meta.date``) is
drawn. Quick runs are drawn only when there is no other. Commit b765ad5 changed
two things its records do not say (`B765AD5_FIRST_RUN`): causal "sequence" went
from two K/V slots to max(2, P), and ``peak_bytes`` stopped counting the O and lse
shards twice. The causal "sequence" points of runs before it are drawn as their
own faded, dashed "2 K/V slots" line (beside the newer line where one exists),
and their memory records lose the double-counted O and lse shards. Checked on the
stored runs (tests/test_distributed.py): every grid row that both float16 runs
measured differs by exactly those bytes and the K/V slots b765ad5 added or removed.
"""

from __future__ import annotations

import math
from datetime import datetime
from pathlib import Path

import matplotlib.pyplot as plt
from matplotlib.lines import Line2D

from nkattn.figures import (
    PAGE_WIDTH,
    MissingResultError,
    load_result,
    save_figure,
    style,
)
from nkattn.studies.distributed_bench import LONG_N

BENCH_FILES = "distributed-*.json"
# named when no result exists: the run (4 H200s, float16, N up to 1M, memory at 4M)
MAIN_FILE = "distributed-h200-float16.json"
COMMAND = "nkattn bench distributed --dtype float16 --memory-n 4194304 (on 4 GPUs)"
# The first run of b765ad5's code, which ran on the uncommitted tree (git 7044736-dirty
# in both runs' meta): distributed-h200-float16.json started at 05:43:28 with two K/V
# slots and the double-counted O and lse; its -partial rerun started at 05:52:50 with
# max(2, P) slots. Runs from this date on are the new code.
B765AD5_FIRST_RUN = datetime.fromisoformat("2026-11-28T05:52:50+00:00")
TARGETS = {False: 0.90, True: 0.85}  # the efficiency targets at N = 1M on 4 GPUs, by causal
DTYPE_ORDER = ("float16", "bfloat16", "float32", "float64")
SHORT_DTYPE = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "float64": "fp64"}
SERIES = {  # name -> (label, line style); "sequence-2" is a run before b765ad5, causal only
    "sequence": ('nkattn "sequence"', {"color": "C0", "marker": "o"}),
    "sequence-2": ('nkattn "sequence", run before b765ad5\n(2 K/V slots; now max(2, P))',
                   {"color": "C0", "marker": "o", "ls": "--", "alpha": 0.4}),
    "heads": ('nkattn "heads"', {"color": "C1", "marker": "s"}),
    "ring": ("torch context_parallel (ring over SDPA)", {"color": "C2", "marker": "^"}),
}
Y_TOP = 1.1  # points above it are drawn on the edge with their value


def _run_date(run) -> datetime:
    return datetime.fromisoformat(run["meta"]["date"])


def _load(results_dir):
    """The runs of one device (the one with most records), quick runs only when there is no other."""
    folder = Path(results_dir) / "bench"
    runs = [load_result(results_dir, "bench", p.name) for p in sorted(folder.glob(BENCH_FILES))]
    if not runs:
        raise MissingResultError([(folder / MAIN_FILE, COMMAND)])
    full = [r for r in runs if not r["meta"]["config"].get("quick")]
    runs = full or runs
    devices = {}
    for run in runs:
        devices[run["meta"]["device"]] = devices.get(run["meta"]["device"], 0) + len(run["records"])
    device = max(devices, key=devices.get)
    runs = sorted((r for r in runs if r["meta"]["device"] == device), key=_run_date)
    for run in runs:
        run["quick_run"] = bool(run["meta"]["config"].get("quick"))  # for save_figure's note
    return device, runs


def _series_of(record, run) -> str:
    if record["impl"] == "torch-context-parallel":
        return "ring"
    if record["strategy"] == "sequence" and record["causal"] and _run_date(run) < B765AD5_FIRST_RUN:
        return "sequence-2"
    return record["strategy"]


def _points(runs):
    """{(dtype, N, H, causal): {series: {P: record}}}, the latest run winning; the one-GPU rows stay out."""
    panels = {}
    for run in runs:  # oldest first: a later run overwrites
        for r in run["records"]:
            if r["impl"] == "nkattn-exact" or "budget_bytes" in r:
                continue
            key = (r["dtype"], r["N"], r["H"], r["causal"])
            panels.setdefault(key, {}).setdefault(_series_of(r, run), {})[r["gpus"]] = r
    return panels


def _t1(runs):
    """{(dtype, N, H, causal): the latest run's one-GPU time in ms}."""
    return {(r["dtype"], r["N"], r["H"], r["causal"]): r["median_ms"]
            for run in runs for r in run["records"] if r["impl"] == "nkattn-exact"}


def _tokens(n: int) -> str:
    return f"{n >> 20}M" if n % (1 << 20) == 0 else f"{n >> 10}K" if n % 1024 == 0 else str(n)


def _memory(runs):
    """The memory records (latest run per strategy and number of query passes), each with peak_bytes
    as b765ad5's bench counts it."""
    found = {}
    for run in runs:
        for r in run["records"]:
            if "budget_bytes" not in r:
                continue
            peak = r["peak_bytes"]
            if _run_date(run) < B765AD5_FIRST_RUN:  # O and lse shards counted twice: one q shard and the lse shard
                peak -= r["resident_bytes"] - 3 * _shard_bytes(r)
            found[r["strategy"], r.get("query_passes", 1)] = {**r, "peak_bytes": peak, "corrected": peak != r["peak_bytes"]}
    return [found[key] for key in sorted(found, key=lambda key: (key[0] != "sequence", key[1]))]


def _shard_bytes(record) -> int:
    """Bytes of one rank's q shard (B = 1)."""
    itemsize = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}[record["dtype"]]
    return record["H"] * record["N"] // record["gpus"] * record["d"] * itemsize


def _draw_scaling(ax, series, y_low):
    for name, (_, kw) in SERIES.items():
        rows = series.get(name, {})
        points = sorted((p, r["scaling_efficiency"], r.get("bit_identical")) for p, r in rows.items()
                        if "scaling_efficiency" in r)
        if not points:
            continue
        line_kw = {k: v for k, v in kw.items() if k != "marker"}
        ax.plot([p for p, _, _ in points], [min(y, Y_TOP) for _, y, _ in points], **line_kw, zorder=2)
        for p, y, same in points:
            filled = same is True or name == "ring"  # torch: bits not compared, its own marker
            ax.plot([p], [min(y, Y_TOP)], ls="", marker=kw["marker"], ms=4, color=kw["color"],
                    alpha=kw.get("alpha", 1.0), mfc=kw["color"] if filled else "white", zorder=3, clip_on=False)
            if y > Y_TOP:  # on the edge, with its value
                ax.annotate(f"{y:.2f}", (p, Y_TOP), xytext=(0, 4), textcoords="offset points", ha="center",
                            fontsize=5.5, color=kw["color"])
    ring = series.get("ring", {})
    if ring and all("skipped" in r for r in ring.values()):
        ax.text(0.04, 0.13, "torch: refused", transform=ax.transAxes, fontsize=5.5, color=SERIES["ring"][1]["color"])
    ax.axhline(1.0, color="0.3", lw=0.8, ls=(0, (4, 3)), zorder=1)
    ax.set_xscale("log", base=2)
    top = max([4, *(p for rows in series.values() for p in rows)])  # 8 once an 8-GPU run is stored
    ticks = [2 ** i for i in range(top.bit_length())]
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.minorticks_off()
    ax.set_xlim(0.85, top * 1.175)
    ax.set_ylim(y_low, Y_TOP)


def _draw_memory(ax, records):
    """Per strategy: its budget (shards, then communication buffers) beside its measured peak."""
    gib = 2.0**-30
    for i, r in enumerate(records):
        shards, comm = r["resident_bytes"] * gib, r["comm_bytes"] * gib
        ax.bar(i - 0.21, shards, 0.4, color="0.82")
        ax.bar(i - 0.21, comm, 0.4, bottom=shards, color="0.6")
        for y, height, text in ((0, shards, "shards"), (shards, comm, "buffers")):
            ax.text(i - 0.21, y + height / 2, text, rotation=90, ha="center", va="center", fontsize=5)
        ax.bar(i + 0.21, r["peak_bytes"] * gib, 0.4, color=SERIES[r["strategy"]][1]["color"])
        ax.annotate(f"{r['peak_bytes'] / r['budget_bytes']:.2f}×", (i + 0.21, r["peak_bytes"] * gib),
                    xytext=(0, 2), textcoords="offset points", ha="center", va="bottom", fontsize=5.5)
        passes = r.get("query_passes", 1)
        label = f'"{r["strategy"]}"' + (f"\n{passes} query passes" if passes > 1 else "")
        ax.text(i, -0.17, label, transform=ax.get_xaxis_transform(), ha="center", va="top", fontsize=6.5)
    ax.set_xticks([i + dx for i in range(len(records)) for dx in (-0.21, 0.21)],
                  ["budget", "peak"] * len(records), fontsize=5.5)
    ax.set_ylabel("memory per GPU (GiB)")
    ax.set_ylim(0, 1.3 * max(max(r["peak_bytes"], r["budget_bytes"]) for r in records) * gib)
    ax.grid(axis="x", visible=False)
    r = records[0]
    ax.set_title(f"one call, {SHORT_DTYPE.get(r['dtype'], r['dtype'])}, N = {_tokens(r['N'])},\n"
                 f"H = {r['H']}, P = {r['gpus']}: peak against budget", fontsize=7)


def fig_scaling(results_dir: Path, figures_dir: Path) -> list[Path]:
    """Scaling efficiency against P per (dtype, N), full and causal; the memory records beside them."""
    device, runs = _load(results_dir)
    panels = _points(runs)
    t1 = _t1(runs)
    columns = sorted({(dtype, n, h) for dtype, n, h, _ in panels},
                     key=lambda c: (DTYPE_ORDER.index(c[0]) if c[0] in DTYPE_ORDER else len(DTYPE_ORDER), c[1]))
    rows = sorted({causal for *_, causal in panels})
    memory = _memory(runs)
    drawn = [r for series in panels.values() for pts in series.values() for r in pts.values()]
    nkattn = [r for r in drawn if r["impl"] == "nkattn-distributed"]
    efficiencies = [r["scaling_efficiency"] for r in drawn if "scaling_efficiency" in r]
    y_low = min(0.3, math.floor(10 * min(efficiencies)) / 10 - 0.05) if efficiencies else 0.3
    n_gpus = sorted({r["gpus"] for r in nkattn}) or [0]
    with style():
        # the scaling panels, a gap for the memory panel's axis labels, then memory (top) and the legend (bottom)
        fig, axes = plt.subplots(len(rows), len(columns) + 2, figsize=(PAGE_WIDTH, 1.75 * len(rows) + 0.7),
                                 squeeze=False, gridspec_kw={"width_ratios": [1] * len(columns) + [0.3, 1.3],
                                                             "wspace": 0.12, "hspace": 0.35})
        for ax in axes[:, -2:].flat:
            ax.set_axis_off()
        targets_drawn = False
        for i, causal in enumerate(rows):
            for j, (dtype, n, h) in enumerate(columns):
                ax = axes[i, j]
                series = panels.get((dtype, n, h, causal), {})
                if not series:
                    ax.set_axis_off()
                    continue
                _draw_scaling(ax, series, y_low)
                if n == LONG_N and max(n_gpus) >= 4:
                    ax.axhline(TARGETS[causal], color="C3", lw=0.6, zorder=1)
                    targets_drawn = True
                if (dtype, n, h, causal) in t1:
                    ax.text(0.04, 0.04, f"T₁ = {t1[dtype, n, h, causal]:.4g} ms", transform=ax.transAxes,
                            fontsize=5.5, color="0.35")
                if i == 0:
                    ax.set_title(f"{SHORT_DTYPE.get(dtype, dtype)}, N = {_tokens(n)}\nH = {h}", fontsize=7)
                if j == 0:
                    ax.set_ylabel(f"{'causal' if causal else 'full'}\nT₁ / (P·T$_P$)")
                else:
                    ax.tick_params(labelleft=False)
                if i == len(rows) - 1:
                    ax.set_xlabel("GPUs P")
        if memory:
            axes[0, -1].set_axis_on()
            _draw_memory(axes[0, -1], memory)
        # the legend: the series drawn, perfect scaling, and the targets where a panel has them
        labels = {name: label for name, (label, _) in SERIES.items()}
        skipped = [r for r in drawn if "skipped" in r]
        if skipped:
            when = "without causal " if not any(r["causal"] for r in skipped) else ""
            reasons = "; ".join(sorted({r["skipped"].split(": ", 1)[-1] for r in skipped}))
            labels["ring"] += f"\n(refused {when}with:\n{reasons})"
        present = {name for series in panels.values() for name, pts in series.items() if pts}
        handles = [Line2D([], [], **kw) for name, (_, kw) in SERIES.items() if name in present]
        texts = [labels[name] for name in SERIES if name in present]
        handles.append(Line2D([], [], color="0.3", lw=0.8, ls=(0, (4, 3))))
        texts.append("perfect scaling")
        if targets_drawn:
            handles.append(Line2D([], [], color="C3", lw=0.6))
            texts.append(f"the issue's target at N = 1M, P = 4\n({TARGETS[False]:.2f} full, {TARGETS[True]:.2f} causal)")
        axes[-1, -1].legend(handles, texts, loc="center left", bbox_to_anchor=(-0.25, 0.5), fontsize=5.5,
                            handlelength=2.4)
        same = [r.get("bit_identical") for r in nkattn]
        bits = ("every nkattn point bit-identical to one GPU (O and lse, every element)" if same and all(s is True for s in same) else
                f"{sum(s is True for s in same)} of {len(same)} nkattn points bit-identical to one GPU (filled markers)")
        d = ", ".join(str(v) for v in sorted({r["d"] for r in nkattn}))
        names = ", ".join(f"{run['path'].name} ({run['meta']['date'][11:16]})" for run in runs)
        note = "" if not any(r["corrected"] for r in memory) else (
            "; memory: peaks of a run before b765ad5, less the O and lse shards it counted twice")
        fig.suptitle(f"Context-parallel exact attention on {' / '.join(map(str, n_gpus))} × {device}, B = 1, d = {d}: "
                     f"{bits}\nT₁: nkattn's one-GPU kernel in the same run (torch's points too are measured "
                     f"against it){note}\nruns (later wins where they overlap): {names}", fontsize=6.5, y=1.04)
        return save_figure(fig, Path(figures_dir) / "bench", "distributed_scaling", results=runs)


FIGURES = [fig_scaling]
