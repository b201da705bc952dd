"""Stored measurements: where they live and the metadata every results file carries.

Every study and benchmark writes ``results/<study>/<name>.json`` as
``{"meta": {...}, "records": [{...}, ...]}``: tidy records (one row per
configuration and metric) plus the provenance needed to trust them.
"""

from __future__ import annotations

import datetime as _dt
import json
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "results"
FIGURES_DIR = REPO_ROOT / "figures"

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
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=5)
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def make_meta(*, config: dict, device: str = "cpu", provenance: dict | None = None, command: str | None = None) -> dict:
    """Metadata block for a results file: date, versions, git revision, command, config."""
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
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


def _json_default(obj):
    import numpy as np

    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot store {type(obj).__name__} in a results file")
