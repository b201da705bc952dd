"""Experiments that write tidy records under results/ (and only that).

Each study module exposes ``run(*, quick: bool, results_dir: Path) -> list[Path]``
(the results files it wrote) and ``FIGURES``, a list of functions
``f(results_dir: Path, figures_dir: Path) -> list[Path]`` that read stored
results only. `nkattn study NAME` and `nkattn figures` walk this registry.
"""

STUDIES = {
    "exact-bench": "nkattn.studies.exact_bench",
    "exact-bits": "nkattn.studies.exact_bits",
    "exact-tune": "nkattn.studies.exact_tune",
    "distance": "nkattn.studies.distance",
    "lsh": "nkattn.studies.lsh_recall",
    "lsh-bench": "nkattn.studies.lsh_bench",
    "rank-entropy": "nkattn.studies.rank_entropy",
    "lowrank": "nkattn.studies.lowrank",
    "table-bench": "nkattn.studies.table_bench",
}
