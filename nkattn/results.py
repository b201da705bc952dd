"""Stored measurements: where they live and the metadata every results file carries.

Every study and benchmark writes ``results/<study>/<name>.json`` as
``{"meta": {...}, "records": [{...}, ...]}``: tidy records (one row per
configuration and metric) plus the provenance needed to trust them. Measured
values are stored to a fixed number of significant digits (`round_sig`), and
`select` / `columns` read records back for summaries and figures.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "results"
FIGURES_DIR = REPO_ROOT / "figures"

SIGNIFICANT_DIGITS = 4  # of every measured value the CPU studies store

_VERSIONED = ("nkattn", "numpy", "numba", "numba-cuda", "scipy", "scikit-learn", "torch", "safetensors", "tokenizers", "gguf")


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in _VERSIONED:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def git_revision() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=5, check=False)
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def make_meta(*, config: dict, device: str = "cpu", provenance: dict | None = None, command: str | None = None) -> dict:
    """Metadata block for a results file: date, versions, git revision, command, config."""
    return {
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "device": device,
        "host": platform.node(),
        "versions": package_versions(),
        "git": git_revision(),
        "command": command if command is not None else " ".join(["nkattn", *sys.argv[1:]]),
        "config": config,
        "provenance": provenance or {},
    }


def write_results(path: Path, meta: dict, records: list[dict]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        json.dump({"meta": meta, "records": records}, fh, indent=1, default=_json_default)
        fh.write("\n")
    return path


def read_results(path: Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"result {path} is missing: run the study that writes it (see `nkattn study --help`) before `nkattn figures`"
        )
    with open(path) as fh:
        return json.load(fh)


def round_sig(x, sig: int = SIGNIFICANT_DIGITS) -> float:
    """`x` to `sig` significant digits, as stored in results files (inf and NaN pass through)."""
    x = float(x)
    return float(f"{x:.{sig}g}") if math.isfinite(x) else x


def select(records: list[dict], **fields) -> list[dict]:
    """The records whose `fields` have the given values (a record lacking a field never matches)."""
    return [r for r in records if all(k in r and r[k] == v for k, v in fields.items())]


def columns(records: list[dict]):
    """Records that share their fields, as a dict of NumPy column arrays."""
    import numpy as np

    return {key: np.array([r[key] for r in records]) for key in records[0]}


def _json_default(obj):
    import numpy as np

    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot store {type(obj).__name__} in a results file")
