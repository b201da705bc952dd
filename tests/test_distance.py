"""The distance study's measuring helpers on hand-checkable inputs (its quick run: tests/test_studies.py)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import spearmanr

from nkattn.reference import table as T
from nkattn.studies import distance_attention as DA
from nkattn.studies import distance_engine as DE


def test_rowwise_spearman_and_topk_overlap():
    rng = np.random.default_rng(17)
    a, b = rng.normal(size=(6, 30)), rng.normal(size=(6, 30))
    b[2] = 0.0  # a constant row has no rank correlation
    rho = DA.rowwise_spearman(a, b)
    assert np.isnan(rho[2])
    np.testing.assert_allclose(np.delete(rho, 2), [spearmanr(a[i], b[i]).statistic for i in (0, 1, 3, 4, 5)])
    assert DA.topk_overlap(a, a, 5, rng) == 1.0
    assert DA.topk_overlap(a, -a, 5, rng) == 0.0
    # all-tied approximate scores: the random tie-break makes the overlap k/N in expectation
    ties = np.mean([DA.topk_overlap(np.tile(np.arange(30.0), (50, 1)), np.zeros((50, 30)), 3, rng) for _ in range(20)])
    assert abs(ties - 0.1) < 5 * np.sqrt(0.1 * 0.9 / 3 / 1000)


def test_point_set_rhos_golden_equals_mean_stride_and_pca_is_exact_in_its_subspace():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(60, 8)) @ rng.normal(size=(8, 40))  # rank 8
    rows = DE.point_set_rhos(x, seed=0, ms=(4, 8, T.BASE))
    rho = {(r["projection"], r["m"], r["form"], r["metric"]): r["rho"] for r in rows}
    # Base17 is mean-stride with its axes permuted: the same distances in every metric
    assert rho["golden", T.BASE, "i16", "l1"] == rho["mean-stride", T.BASE, "i16", "l1"]
    assert rho["pca", 8, "float", "l2"] == pytest.approx(1.0)  # an 8-dim subspace loses nothing
    assert rho["pca", 4, "float", "l2"] < rho["pca", 8, "float", "l2"]
    assert {r["projection"] for r in rows} == {"golden", "mean-stride", "random", "pca"}
