"""Figures from stored results: one style, PDF + PNG, never a recomputation.

Every study with figures names a plot module in its `nkattn.studies.StudyInfo`;
that module lists its figure functions in ``FIGURES``, each
``f(results_dir, figures_dir) -> list[Path]``: it reads ``results/<study>/...``
with `load_result`, draws inside `style()` and writes with `save_figure`.
`build_all` (``nkattn figures``) runs them all; a missing results file stops it
with `MissingResultError`, which names the file and the command that makes it.

Written files depend on the results only: PDFs carry no creation date and PNGs no
software chunk, so drawing twice gives the same bytes (with the same matplotlib).
A figure drawn from a quick run's results (when the full run's file is absent)
says so under the plot.
"""

from __future__ import annotations

import contextlib
import importlib
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display, identical output everywhere
import matplotlib.pyplot as plt

from nkattn.results import FIGURES_DIR, RESULTS_DIR, read_results

# Paper sizes in inches: one column and the full text width of a two-column paper.
COLUMN_WIDTH = 3.4
PAGE_WIDTH = 7.0
PNG_DPI = 200
# Fixed file metadata: no creation date, no matplotlib version, so that a figure's
# bytes change only when what it shows changes. None drops a field.
PDF_METADATA = {"Creator": "nkattn figures", "Producer": None, "CreationDate": None}
PNG_METADATA = {"Software": None}

STYLE = {
    "font.size": 8,
    "axes.titlesize": 8,
    "axes.labelsize": 8,
    "legend.fontsize": 7,
    "xtick.labelsize": 7,
    "ytick.labelsize": 7,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "grid.linewidth": 0.5,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "lines.linewidth": 1.3,
    "lines.markersize": 4,
    "legend.frameon": False,
    "figure.dpi": 100,
    "savefig.bbox": "tight",
    "savefig.pad_inches": 0.03,
    "pdf.fonttype": 42,  # TrueType in PDFs: editable text, accepted by publishers
    "ps.fonttype": 42,
    "image.cmap": "viridis",
    "axes.prop_cycle": matplotlib.cycler(
        color=["#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000"]
    ),  # Okabe-Ito: readable for colour-blind readers and in grey
}


class MissingResultError(FileNotFoundError):
    """A figure needs a results file that has not been written yet."""

    def __init__(self, missing: list[tuple[Path, str]]):
        self.missing = list(dict.fromkeys((Path(p), c) for p, c in missing))
        lines = [f"result file {p} is missing: make it with `{c}`" for p, c in self.missing]
        super().__init__("\n".join(lines) + "\n(then run `nkattn figures` again)")


@contextlib.contextmanager
def style():
    """The nkattn figure style; wrap the whole body of a figure function in it."""
    with plt.rc_context(STYLE):
        yield


def load_result(
    results_dir: Path, study: str, filename: str, *, command: str | None = None, quick: str | None = None
) -> dict:
    """Read ``results_dir/study/filename``; raise `MissingResultError` naming it (and `command`) if absent.

    `quick` names the file a quick run writes instead (a glob pattern relative to
    ``results_dir/study``); it is read only when the full file is missing, and the
    returned dict then has ``"quick_run": True`` so that `save_figure` can say so.
    """
    path = Path(results_dir) / study / filename
    if not path.exists() and quick is not None:
        found = sorted(path.parent.glob(quick))
        if found:
            return {**read_results(found[0]), "path": found[0], "quick_run": True}
    if not path.exists():
        raise MissingResultError([(path, command or f"nkattn study {study}")])
    return {**read_results(path), "path": path, "quick_run": False}


def save_figure(fig, figures_dir: Path, name: str, *, results=()) -> list[Path]:
    """Write ``figures_dir/name.pdf`` (vector) and ``.png``, close the figure, return both paths.

    `results` are the loaded results the figure shows; if one came from a quick run,
    a note under the plot names its command.
    """
    quick = [r for r in results if r.get("quick_run")]
    if quick:
        commands = ", ".join(dict.fromkeys(f"`{r['meta']['command']}`" for r in quick))
        fig.text(0.5, 0, f"quick run ({commands}): a small configuration, not the study's results",
                 ha="center", va="top", fontsize=6, color="0.4")
    figures_dir = Path(figures_dir)
    figures_dir.mkdir(parents=True, exist_ok=True)
    paths = [figures_dir / f"{name}.pdf", figures_dir / f"{name}.png"]
    fig.savefig(paths[0], metadata=PDF_METADATA)
    fig.savefig(paths[1], dpi=PNG_DPI, metadata=PNG_METADATA)
    plt.close(fig)
    return paths


def build_all(results_dir: Path = RESULTS_DIR, figures_dir: Path = FIGURES_DIR, studies=None) -> list[Path]:
    """Run the figure functions of every study (or of the named `studies`); return the files written.

    Figures whose results exist are written even when others are missing; the
    missing ones are then reported together in one `MissingResultError`.
    """
    from nkattn.studies import STUDIES

    names = list(STUDIES) if studies is None else list(studies)
    unknown = [name for name in names if name not in STUDIES]
    if unknown:
        raise ValueError(f"unknown studies {unknown}; known: {sorted(STUDIES)}")
    written, missing = [], []
    for name in names:
        if STUDIES[name].plots is None:
            continue
        for make in importlib.import_module(STUDIES[name].plots).FIGURES:
            try:
                written.extend(make(Path(results_dir), Path(figures_dir)))
            except MissingResultError as exc:
                missing.extend(exc.missing)
    if missing:
        raise MissingResultError(missing)
    return written
