"""The distance study: its helpers, its quick run and the figures drawn from it."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from nkattn.reference import bert


def test_study_helpers():
    from scipy.stats import spearmanr

    from nkattn.studies import distance as D

    rng = np.random.default_rng(17)
    a, b = rng.normal(size=(6, 30)), rng.normal(size=(6, 30))
    b[2] = 0.0  # a constant row has no rank correlation
    rho = D.rowwise_spearman(a, b)
    assert np.isnan(rho[2])
    np.testing.assert_allclose(np.delete(rho, 2), [spearmanr(a[i], b[i]).statistic for i in (0, 1, 3, 4, 5)])
    assert D.topk_overlap(a, a, 5, rng) == 1.0
    assert D.topk_overlap(a, -a, 5, rng) == 0.0
    # all-tied approximate scores: the random tie-break makes the overlap k/N in expectation
    ties = np.mean([D.topk_overlap(np.tile(np.arange(30.0), (50, 1)), np.zeros((50, 30)), 3, rng) for _ in range(20)])
    assert abs(ties - 0.1) < 5 * np.sqrt(0.1 * 0.9 / 3 / 1000)


@pytest.fixture(scope="module")
def quick_result(tmp_path_factory):
    from nkattn.studies import distance as D

    results_dir = tmp_path_factory.mktemp("results")
    return results_dir, D.run(quick=True, results_dir=results_dir, progress=False)


def test_quick_run_writes_valid_results(quick_result):
    from nkattn.results import read_results
    from nkattn.studies import distance as D

    results_dir, paths = quick_result
    expected = ["gguf.json", "distance.json", "seed_repro.json"]
    if bert.model_available():
        expected += ["attention.json", "end_to_end.json"]
    assert [p.name for p in paths] == expected and all(p.parent == results_dir / "distance" / "quick" for p in paths)
    data = read_results(results_dir / "distance" / "quick" / "distance.json")
    assert data["meta"]["command"] == "nkattn study distance --quick"
    recs = data["records"]
    by = {(r["dataset"], r["projection"], r["m"], r["form"], r["metric"]): r for r in recs}
    for r in recs:
        assert -1 <= r["rho_min"] <= r["rho_mean"] <= r["rho_max"] <= 1 and r["seeds"] == len(D.QUICK_SEEDS)
    for ds in ("images", "digits", "gaussian-d256"):  # golden and mean-stride are the same axes
        assert by[(ds, "golden", 17, "i16", "l1")]["rho"] == by[(ds, "mean-stride", 17, "i16", "l1")]["rho"]
        assert by[(ds, "pca", 32, "float", "l2")]["rho_mean"] > by[(ds, "pca", 4, "float", "l2")]["rho_mean"]
    assert by[("gaussian-d256-n50", "golden", 17, "float", "l2")]["pairs"] == 1225
    repro = read_results(results_dir / "distance" / "quick" / "seed_repro.json")["records"]
    byte = {r["variant"]: r for r in repro if r["scale"] == "byte"}
    assert byte["gaussian N(0,1) i16 (L1)"]["clamped_share"] > 0.5  # saturation: the seed's "random" reading
    if bert.model_available():
        att = read_results(results_dir / "distance" / "quick" / "attention.json")
        assert {r["variant"] for r in att["records"]} == {"seed", "seed-tuned", "dot", "seed-direct"}
        assert len(att["records"]) == 4 * 72 * D.QUICK_TEST
        e2e = read_results(results_dir / "distance" / "quick" / "end_to_end.json")
        assert all(-1 <= r["cosine"] <= 1 + 1e-9 for r in e2e["records"])


def test_figures_from_quick_results(quick_result, tmp_path):
    from nkattn.figures import MissingResultError
    from nkattn.studies import distance as D

    _, paths = quick_result
    staged = tmp_path / "results" / "distance"
    staged.mkdir(parents=True)
    for p in paths:
        shutil.copy(p, staged / p.name)
    for make in D.FIGURES:
        if make in (D.fig_attention_heads, D.fig_topk, D.fig_end_to_end) and not bert.model_available():
            with pytest.raises(MissingResultError):
                make(tmp_path / "results", tmp_path / "figures")
            continue
        out = make(tmp_path / "results", tmp_path / "figures")
        assert [p.suffix for p in out] == [".pdf", ".png"] and out[0].read_bytes()[:5] == b"%PDF-"


