"""The rank-entropy study's metrics on hand-checkable inputs (its quick run: tests/test_studies.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from nkattn.reference import bert
from nkattn.studies import rank_entropy as re
from nkattn.studies._common import relative_frobenius_error


def _svd(a):
    return np.linalg.svd(a, full_matrices=False)


@pytest.mark.parametrize("n", [1, 7, 16, 20, 33])
def test_identity_attention(n):
    a = np.eye(n)
    _, sv, _ = _svd(a)
    assert re.row_entropy(a).max() == 0.0
    for tau in (0.9, 0.95, 0.99, 1.0):
        assert re.energy_rank(sv, tau) == math.ceil(tau * n)
    assert re.energy_rank(sv, 0.95, power=1) == math.ceil(0.95 * n)
    assert re.stable_rank(sv) == pytest.approx(n, rel=1e-12)


@pytest.mark.parametrize("n", [2, 16, 100])
def test_uniform_attention(n):
    a = np.full((n, n), 1.0 / n)
    _, sv, _ = _svd(a)
    np.testing.assert_allclose(re.row_entropy(a), np.log(n), rtol=1e-12)
    assert re.energy_rank(sv, 0.99) == 1 and re.numerical_rank(sv, n) == 1
    assert re.stable_rank(sv) == pytest.approx(1.0, rel=1e-12)


def test_entropy_of_a_known_row():
    p = np.array([[0.5, 0.25, 0.25, 0.0]])
    assert re.row_entropy(p)[0] == pytest.approx(1.5 * np.log(2), rel=1e-14)


def test_energy_rank_counts_squared_singular_values():
    sv = np.array([3.0, 2.0, 1.0, 1.0, 1.0])  # energies 9, 4, 1, 1, 1 of 16
    # cumulative energy 9/16, 13/16, 14/16, 15/16, 1
    assert [int(re.energy_rank(sv, t)) for t in (0.5, 0.8, 0.85, 0.9, 0.95, 1.0)] == [1, 2, 3, 4, 5, 5]
    assert [int(re.energy_rank(sv, t, power=1)) for t in (0.375, 0.6, 0.7)] == [1, 2, 3]  # sigma sums 3, 5, 6 of 8
    assert re.stable_rank(sv) == pytest.approx(16 / 9)


@pytest.mark.parametrize("seed", range(5))
def test_truncation_errors_are_the_eckart_young_tails(seed):
    """A with a chosen spectrum: ||A - A_k|| is the tail energy, and the output error matches A_k built explicitly."""
    rng = np.random.default_rng(seed)
    n, d = 80, 6
    u, _ = np.linalg.qr(rng.normal(size=(n, n)))
    w, _ = np.linalg.qr(rng.normal(size=(n, n)))
    sv = np.sort(rng.uniform(0.01, 1.0, n))[::-1] ** 3
    a = (u * sv) @ w.T
    v = rng.normal(size=(n, d))
    uu, ss, vt = _svd(a)
    attn, out = re.truncation_errors(ss, vt, v, ranks=(1, 8, 30, 64))
    for k in (1, 8, 30, 64):
        tail = np.sqrt((sv[k:] ** 2).sum() / (sv**2).sum())
        assert attn[k] == pytest.approx(tail, rel=1e-9)
        a_k = (uu[:, :k] * ss[:k]) @ vt[:k]
        assert np.linalg.norm(a - a_k) / np.linalg.norm(a) == pytest.approx(tail, rel=1e-9)
        expected = np.linalg.norm((a - a_k) @ v) / np.linalg.norm(a @ v)
        assert out[k] == pytest.approx(expected, rel=1e-9)
    # Eckart-Young: no other rank-8 matrix does better, e.g. a random projection of A
    q, _ = np.linalg.qr(rng.normal(size=(n, 8)))
    assert np.linalg.norm(a - q @ (q.T @ a)) / np.linalg.norm(a) > attn[8]


def test_score_rank_is_head_dim():
    rng = np.random.default_rng(0)
    q, k, v = rng.normal(size=(3, 2, 40, 4))
    m = re.head_metrics(q, k, v)
    assert list(m["score_rank"]) == [4, 4]
    assert (m["erank_99"] > 4).all()  # softmax of a rank-4 S is not rank 4
    for name in ("entropy_mean", "erank_95", "err_bf16", "out_err_8"):
        assert m[name].shape == (2,)


def test_head_metrics_match_the_oracle_entropy_and_rank():
    """Peaked heads (large scores) have low entropy; q = 0 gives uniform attention."""
    rng = np.random.default_rng(1)
    k = rng.normal(size=(1, 32, 8))
    v = rng.normal(size=(1, 32, 8))
    flat = re.head_metrics(np.zeros((1, 32, 8)), k, v)
    assert flat["entropy_norm"][0] == pytest.approx(1.0, rel=1e-12)
    assert flat["score_rank"][0] == 0 and flat["score_erank_95"][0] == 0  # S = 0
    assert flat["erank_99"][0] == 1 and flat["err_fp32"][0] < 1e-6
    sharp = re.head_metrics(30 * k, k, v)  # each query matches its own key
    assert sharp["entropy_norm"][0] < 0.1 and sharp["erank_95"][0] > 10


def test_bf16_rounding():
    # nearest, ties to even, on the top 16 bits of the float32 pattern: bfloat16 keeps 7
    # fraction bits, its largest value is 1.9921875 * 2^127, and from half an ulp above
    # it (1.99609375 * 2^127 = 3.3961e38) values round to inf
    big = 2.0**127
    x = np.array(
        [1.0, 1 + 2**-8, 1 + 3 * 2**-8, 1 + 2**-7 + 2**-9, -2.5, 3.0e38, 3.39e38, 3.4e38, -np.inf, 0.0], dtype=np.float32
    )
    expected = np.array(
        [1.0, 1.0, 1 + 2**-6, 1 + 2**-7, -2.5, 1.765625 * big, 1.9921875 * big, np.inf, -np.inf, 0.0], dtype=np.float32
    )
    np.testing.assert_array_equal(re.round_bf16(x), expected)
    assert re.round_to(np.array([1 + 2**-12]), "fp16")[0] == 1.0
    with pytest.raises(ValueError, match="dtype"):
        re.round_to(x, "fp8")


def test_precision_errors_are_ordered_by_format():
    rng = np.random.default_rng(2)
    q, k, v = rng.normal(size=(3, 4, 64, 32))
    exact = bert.scores_and_probs(q[None], k[None])[1][0] @ v
    errs = {t: relative_frobenius_error(re.low_precision_attention(q, k, v, t), exact) for t in re.DTYPES}
    assert (errs["fp32"] < 1e-6).all()
    assert (errs["fp32"] < errs["fp16"]).all() and (errs["fp16"] < errs["bf16"]).all()
    assert (errs["bf16"] < 2**-8 * 10).all()
    flash = relative_frobenius_error(re.low_precision_attention(q, k, v, "bf16", round_scores=False), exact)
    assert (flash < errs["bf16"]).all()


def test_spearman_ci():
    x = np.arange(60.0)
    clusters = np.repeat(np.arange(6), 10)
    perfect = re.spearman_ci(x, 2 * x + 1, clusters, n_boot=50)
    assert perfect["rho"] == pytest.approx(1.0) and perfect["ci_low"] == pytest.approx(1.0)
    y = -x + np.random.default_rng(0).normal(0, 20, 60)
    noisy = re.spearman_ci(x, y, np.arange(60) % 10, n_boot=200)  # clusters spanning the range
    assert -1 < noisy["ci_low"] <= noisy["rho"] <= noisy["ci_high"] < 0
    # resampling 6 contiguous blocks of x leaves far fewer independent units: a wider interval
    blocks = re.spearman_ci(x, y, clusters, n_boot=200)
    assert blocks["ci_high"] - blocks["ci_low"] > noisy["ci_high"] - noisy["ci_low"]
