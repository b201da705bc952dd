"""Every study through its command: `nkattn study NAME --quick --results-dir R` writes its
results, and `nkattn figures --results-dir R` then draws that study's figures from them.

The CLI runs in this process, so the simulator choice of tests/conftest.py holds for it.
GPU-only studies are marked `gpu`. The quick runs' records are checked per study below.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import inspect
import io
import subprocess
import sys

import numpy as np
import pytest

from nkattn import cli
from nkattn.reference import bert
from nkattn.results import RESULTS_DIR, read_results, round_sig, select
from nkattn.studies import STUDIES, StudyInfo
from nkattn.studies._common import relative_frobenius_error

needs_model = pytest.mark.skipif(not bert.model_available(), reason=f"MiniLM weights not installed: {bert.INSTALL_HINT}")
# rank-entropy, lowrank and precision need MiniLM; distance runs without it but then has no attention figures to draw
NEEDS_MODEL = {"rank-entropy", "lowrank", "precision", "distance"}
# distance writes MiniLM's weights through gguf (the `studies` extra; not on the GPU machine's image)
needs_gguf = pytest.mark.skipif(importlib.util.find_spec("gguf") is None, reason="the gguf package is not installed")
NEEDS_GGUF = {"distance"}


def _study_params():
    for name, info in STUDIES.items():
        marks = [pytest.mark.gpu] if info.needs_gpu else []
        if name in NEEDS_MODEL:
            marks.append(needs_model)
        if name in NEEDS_GGUF:
            marks.append(needs_gguf)
        yield pytest.param(name, marks=marks, id=name)


def _main(argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(argv)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """`quick_run(name)` -> (exit code, stdout, results dir) of `nkattn study NAME --quick`, run once per module."""
    runs = {}

    def run(name):
        if name not in runs:
            results = tmp_path_factory.mktemp(f"results-{name}")
            code, out, _ = _main(["study", name, "--quick", "--results-dir", str(results)])
            runs[name] = (code, out, results)
        return runs[name]

    return run


@pytest.mark.parametrize("name", list(_study_params()))
def test_study_command_writes_results_and_figures_draws_them(name, quick_run, tmp_path):
    code, out, results = quick_run(name)
    assert code == 0, out
    written = [line.removeprefix("wrote ") for line in out.splitlines() if line.startswith("wrote ")]
    assert written and all(read_results(path)["meta"]["config"]["quick"] for path in written)
    assert {str(p) for p in results.rglob("*.json")} == set(written)

    # only this study's results exist in `results`: the command reports the others
    # missing, and must have drawn every figure of this study's plot module
    code, _, err = _main(["figures", "--results-dir", str(results), "--figures-dir", str(tmp_path)])
    plots = STUDIES[name].plots
    expected = 2 * len(importlib.import_module(plots).FIGURES) if plots else 0
    drawn = sorted(tmp_path.rglob("*.p[dn][fg]"))
    assert len(drawn) == expected, (drawn, err)
    assert f"`nkattn study {name}`" not in err and code == 1, err


@pytest.mark.parametrize("name", list(STUDIES))
def test_run_takes_quick_and_results_dir_with_defaults(name):
    info = STUDIES[name]
    assert isinstance(info, StudyInfo) and info.summary and isinstance(info.needs_gpu, bool)
    params = inspect.signature(importlib.import_module(info.module).run).parameters
    assert params["quick"].default is False and params["results_dir"].default == RESULTS_DIR
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params.values())


def test_importing_the_registry_imports_no_study():
    code = (
        "import sys, nkattn.studies; "
        "loaded = [m for m in sys.modules if m.startswith('nkattn.studies.') or m in ('matplotlib', 'torch')]; "
        "assert not loaded, loaded"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_shared_helpers():
    assert round_sig(123456.0) == 123500.0 and round_sig(-0.000123456, 2) == -0.00012
    assert np.isinf(round_sig(float("inf"))) and np.isnan(round_sig(float("nan")))
    records = [{"a": 1, "b": 2}, {"a": 1}, {"a": 2, "b": 2}]
    assert select(records, a=1) == records[:2] and select(records, a=1, b=2) == records[:1]
    x = np.arange(12.0).reshape(2, 2, 3)
    np.testing.assert_allclose(relative_frobenius_error(x + 1, x), np.sqrt(6) / np.linalg.norm(x, axis=(1, 2)))
    # the mean row broadcast against the rows (2 x 3): every element is 1.5 off
    row_mean = x[0].mean(axis=0, keepdims=True)
    assert relative_frobenius_error(row_mean, x[0], axis=None) == pytest.approx(1.5 * np.sqrt(6) / np.linalg.norm(x[0]))


# --------------------------------------------------------------------------------------
# what each quick run wrote
# --------------------------------------------------------------------------------------


def _result(quick_run, name, relative):
    _, _, results = quick_run(name)
    return read_results(results / relative)


@needs_model
def test_rank_entropy_quick_records(quick_run):
    from nkattn.studies import rank_entropy as re

    data = _result(quick_run, "rank-entropy", "rank-entropy/quick.json")
    meta, records = data["meta"], data["records"]
    assert meta["command"] == "nkattn study rank-entropy --quick"
    assert len(meta["provenance"]["passages"]) == re.QUICK_PASSAGES
    assert len(records) == re.QUICK_PASSAGES * len(re.QUICK_LENGTHS) * 6 * 12
    assert {(r["layer"], r["head"]) for r in records} == {(layer, h) for layer in range(6) for h in range(12)}
    assert meta["config"]["head_dim"] == 32 and meta["config"]["unit_roundoff"] == re.UNIT_ROUNDOFF
    for r in records:
        n = r["n"]
        assert 0 <= r["entropy_min"] <= r["entropy_mean"] <= np.log(n) * (1 + 1e-3)
        assert 1 <= r["erank_90"] <= r["erank_95"] <= r["erank_99"] <= n
        assert r["score_rank"] <= 32 and 1 <= r["stable_rank"] <= n
        assert r["attn_err_8"] >= r["attn_err_16"] >= r["attn_err_32"] >= r["attn_err_64"] >= 0
    summary = meta["summary"]["by_length"]
    assert set(summary) == {str(n) for n in re.QUICK_LENGTHS}
    sp = summary["64"]["spearman_entropy_erank95"]
    assert sp["ci_low"] <= sp["rho"] <= sp["ci_high"]


@needs_model
def test_precision_quick_records(quick_run):
    from nkattn.reference import precision as pr
    from nkattn.studies import precision as ps

    data = _result(quick_run, "precision", "precision/quick.json")
    meta, records = data["meta"], data["records"]
    assert meta["command"] == "nkattn study precision --quick"
    assert len(records) == ps.QUICK_PASSAGES * len(ps.QUICK_LENGTHS) * 6 * 12
    fit = ps.QUICK_PASSAGES // 2
    assert all(r["split"] == ("fit" if r["passage"] < fit else "held-out") for r in records)
    for r in records:
        # every format's error is finite; fp32 is the most accurate, as its unit roundoff says
        assert 0 <= r["err_fp32"] <= min(r[f"err_{f}"] for f in ps.FORMATS)
        for tol in ps.TOLERANCES:
            oracle = r[ps.policy_field("oracle", tol)]
            assert oracle == "fp32" or r[f"err_{oracle}"] <= tol
            assert r[ps.policy_field("auto", tol)] in pr.FORMATS
    # auto's predictor bounds every head it was fitted on
    assert all(r[f"pred_{f}"] >= r[f"err_{f}"] * (1 - 2e-3) for r in records if r["split"] == "fit" for f in ps.FORMATS)
    policies = meta["summary"]["policies"]
    for tol in ps.TOLERANCES:
        assert policies[f"{tol:g}"]["oracle"]["meets_budget"] == 1.0 or policies[f"{tol:g}"]["oracle"]["formats"].get("fp32")
        assert policies[f"{tol:g}"]["fp32"]["meets_budget"] == 1.0
    sp = meta["summary"]["spearman"]["bf16"]["entropy_norm"]
    assert sp["ci_low"] <= sp["rho"] <= sp["ci_high"]


@needs_model
def test_precision_e2e_quick_records(quick_run):
    from nkattn.studies import precision as ps

    heads = _result(quick_run, "precision", "precision/quick.json")["meta"]
    data = _result(quick_run, "precision", "precision/quick-e2e.json")
    meta, records = data["meta"], data["records"]
    config, summary = meta["config"], meta["summary"]
    assert meta["command"] == "nkattn study precision --quick" and config["quick"]
    # held out from the predictor's fit, in the same passage numbering as quick.json
    fit, (first, last) = ps.QUICK_PASSAGES // 2, config["passages"]
    assert config["fit_passages"] == [0, fit - 1] and (first, last) == (fit, fit + ps.QUICK_E2E_PASSAGES - 1)
    assert meta["provenance"]["passages"][: ps.QUICK_PASSAGES] == heads["provenance"]["passages"]
    assert config["predictor"] == heads["config"]["predictor"]
    # what the end_to_end figure reads
    assert config["n"] == max(ps.QUICK_LENGTHS) and config["model"]
    labels = [p["label"] for p in config["policies"]]
    assert labels == [ps.policy_label(p, t) for p, t in ps.E2E_POLICIES] == list(summary)
    assert len(records) == len(labels) * ps.QUICK_E2E_PASSAGES
    for p in config["policies"]:
        rows = [r for r in records if r["policy"] == p["policy"] and r["tolerance"] == p["tolerance"]]
        assert sorted(r["passage"] for r in rows) == list(range(first, last + 1))
        s = summary[p["label"]]
        assert s["top1_disagreements"] == sum(not r["top1_agrees"] for r in rows)
        assert s["one_minus_cos"]["min"] <= s["one_minus_cos"]["median"] <= s["one_minus_cos"]["max"]
        assert s["mean_cost"] > 0 and sum(s["formats"].values()) == pytest.approx(1, abs=1e-3)
    for r in records:
        assert 0 <= r["one_minus_cos"] <= 2 and 0 <= r["top5_overlap"] <= 1 and r["top1_gap_float64"] >= 0
        assert sum(r[f"heads_{f}"] for f in ps.FORMATS) == 6 * 12
        if r["tolerance"] is None and r["policy"] in ps.FORMATS:
            assert r[f"heads_{r['policy']}"] == 6 * 12
    assert summary["fp32"]["one_minus_cos"]["max"] < 1e-12 and summary["fp32"]["top1_agreement"] == 1


def test_lsh_quick_records(quick_run):
    from nkattn.studies import lsh_recall as lr

    data = _result(quick_run, "lsh", "lsh/quick.json")
    meta, records = data["meta"], data["records"]
    assert meta["command"] == "nkattn study lsh --quick" and meta["config"]["quick"]
    needle = select(records, experiment="needle")
    assert len(needle) == len(lr.QUICK["needle_ns"]) * len(lr.BITS) * len(lr.TABLES)
    for r in needle:
        assert r["n_queries"] >= 1000
        assert 0 <= r["candidate_fraction"] <= 1 and 0 <= r["needle_recall"] <= 1
        assert r["needle_recall_lo"] <= r["needle_recall"] <= r["needle_recall_hi"]
    cal = select(records, experiment="calibration")
    assert np.mean([r["theory_in_interval"] for r in cal]) > 0.85
    experiments = {"calibration", "needle", "structured", "binned", "buckets"}
    assert {r["experiment"] for r in records} == experiments
    assert bert.model_available() == any(r["data"] == "MiniLM" for r in select(records, experiment="structured"))


@needs_model
@needs_gguf
def test_distance_quick_records(quick_run):
    from nkattn.studies import distance as D

    paths = [p.name for p in sorted((quick_run("distance")[2] / "distance" / "quick").iterdir())]
    assert paths == ["attention.json", "distance.json", "end_to_end.json", "gguf.json", "seed_repro.json"]
    data = _result(quick_run, "distance", "distance/quick/distance.json")
    assert data["meta"]["command"] == "nkattn study distance --quick"
    recs = data["records"]
    by = {(r["dataset"], r["projection"], r["m"], r["form"], r["metric"]): r for r in recs}
    for r in recs:
        assert -1 <= r["rho_min"] <= r["rho_mean"] <= r["rho_max"] <= 1 and r["seeds"] == len(D.QUICK_SEEDS)
    for ds in ("images", "digits", "gaussian-d256"):  # golden and mean-stride are the same axes
        assert by[(ds, "golden", 17, "i16", "l1")]["rho"] == by[(ds, "mean-stride", 17, "i16", "l1")]["rho"]
        assert by[(ds, "pca", 32, "float", "l2")]["rho_mean"] > by[(ds, "pca", 4, "float", "l2")]["rho_mean"]
    assert by[("gaussian-d256-n50", "golden", 17, "float", "l2")]["pairs"] == 1225
    repro = _result(quick_run, "distance", "distance/quick/seed_repro.json")["records"]
    byte = {r["variant"]: r for r in repro if r["scale"] == "byte"}
    assert byte["gaussian N(0,1) i16 (L1)"]["clamped_share"] > 0.5  # saturation: the seed's "random" reading
    att = _result(quick_run, "distance", "distance/quick/attention.json")
    assert {r["variant"] for r in att["records"]} == {"seed", "seed-tuned", "dot", "seed-direct"}
    assert len(att["records"]) == 4 * 72 * D.QUICK_TEST
    e2e = _result(quick_run, "distance", "distance/quick/end_to_end.json")
    assert all(-1 <= r["cosine"] <= 1 + 1e-9 for r in e2e["records"])


def test_exact_bits_quick_records(quick_run):
    from nkattn.studies import exact_bits as eb

    data = read_results(next(quick_run("exact-bits")[2].rglob("*.json")))
    batch, heads, n, head_dims = eb.QUICK
    records = data["records"]
    assert len(records) == len(eb.FLAVOURS) * 2 * len(head_dims)
    assert {(r["B"], r["H"], r["N"], r["d"]) for r in records} == {(batch, heads, n, d) for d in head_dims}
    # the kernel's default flavour reproduces the float64 streaming reference bit for bit, anywhere
    default = select(records, flavour="rn+portable (default)")
    assert [r["bit_identical_share"] for r in default] == [1.0] * len(default)
