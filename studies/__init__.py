"""Experiments that write tidy records under results/ (and only that), and the plots drawn from them.

`STUDIES` maps a study's command name to its `StudyInfo`. The study module exposes
``run(*, quick: bool = False, results_dir: Path = RESULTS_DIR, ...) -> list[Path]``
(the results files it wrote); its plot module, if it has figures, exposes
``FIGURES``, functions ``f(results_dir: Path, figures_dir: Path) -> list[Path]``
that read stored results only. `nkattn study NAME` and `nkattn figures` walk this
registry. Importing this package imports no study (they pull in SciPy, torch, numba).

    rank-entropy   rank_entropy -> rank_entropy_plots                               CPU, MiniLM weights
    lsh            lsh_recall (lsh_data, lsh_engine) -> lsh_recall_plots            CPU
    lsh-bench      lsh_bench -> lsh_bench_plots                                     GPU
    distance       distance (distance_data, distance_engine, distance_attention)
                     -> distance_plots                                              CPU
    lowrank        lowrank (lowrank_check: the GPU operators) -> lowrank_plots     CPU, MiniLM weights
    precision      precision -> precision_plots                                     CPU, MiniLM weights
    exact-bits     exact_bits                                                       simulator or GPU
    exact-tune     exact_tune                                                       GPU
    exact-bench    exact_bench -> exact_bench_plots                                 GPU
    table-bench    table_bench -> table_bench_plots                                 GPU
    distributed-bench  distributed_bench (under torchrun, 1 to 4 GPUs)
                     -> distributed_bench_plots                                     GPU

Shared helpers: `nkattn.studies._common` (Frobenius relative error, peak device
memory, one BLAS thread) and `nkattn.results` (significant digits, selecting records).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StudyInfo:
    """One study: its module, a one-line summary, whether it needs a real GPU, its plot module (or None)."""

    module: str
    summary: str
    needs_gpu: bool
    plots: str | None = None


def _study(stem: str, summary: str, *, needs_gpu: bool, plots: bool) -> StudyInfo:
    return StudyInfo(f"nkattn.studies.{stem}", summary, needs_gpu, f"nkattn.studies.{stem}_plots" if plots else None)


STUDIES = {
    "rank-entropy": _study(
        "rank_entropy", "How low-rank and how peaked is real attention (MiniLM), head by head?", needs_gpu=False,
        plots=True,
    ),
    "lsh": _study(
        "lsh_recall", "Does SimHash keep the signal (needle, top-k, clustered, MiniLM)?", needs_gpu=False, plots=True
    ),
    "lsh-bench": _study(
        "lsh_bench", "LSH speed and memory beside exact and SDPA, 16K to 1M tokens", needs_gpu=True, plots=True
    ),
    "distance": _study(
        "distance", "Do Base17/random/PCA projections and lookup tables preserve distances and attention?",
        needs_gpu=False, plots=True,
    ),
    "lowrank": _study(
        "lowrank", "How well does a randomized SVD of A approximate real attention, and which rank does rank='auto' pick?",
        needs_gpu=False, plots=True,
    ),
    "precision": _study(
        "precision", "How much does each format (fp32 to int8) lose per MiniLM head, what predicts it, which "
        "per-head policy meets a budget, and what each policy does to sentence embeddings?", needs_gpu=False,
        plots=True,
    ),
    "exact-bits": _study(
        "exact_bits", "What breaks float64 bit-exactness of the exact kernel, and what restores it?",
        needs_gpu=False, plots=False,
    ),
    "exact-tune": _study(
        "exact_tune", "Which thread layout of the float32 exact kernel is fastest?", needs_gpu=True, plots=False
    ),
    "exact-bench": _study(
        "exact_bench", "The exact kernel beside torch SDPA: time, TFLOP/s, memory", needs_gpu=True, plots=True
    ),
    "table-bench": _study(
        "table_bench", "Lookup scores vs dot products, lookup attention vs exact", needs_gpu=True, plots=True
    ),
    "distributed-bench": _study(
        "distributed_bench", "Context-parallel exact attention on 1, 2 and 4 GPUs: scaling, bits, memory",
        needs_gpu=True, plots=True,
    ),
}

# `nkattn bench NAME` for the benches that are no one method's (a method names its own in `Method.bench`)
BENCHES = {"distributed": "distributed-bench"}
