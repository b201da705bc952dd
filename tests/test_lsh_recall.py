"""The LSH recall study's engine and data: metrics on hand-checkable cases, the needle generator,
collision rates vs theory (its quick run: tests/test_studies.py)."""

from __future__ import annotations

import numpy as np
import pytest

from nkattn.reference import lsh
from nkattn.studies import lsh_data as ld
from nkattn.studies import lsh_engine as le
from nkattn.studies.lsh_recall import BITS, TABLES


def _dense_check(q, k, v, planes, scale):
    """Metrics of one configuration from the dense reference candidate mask (float64)."""
    cand = lsh.candidate_mask_rows(lsh.simhash(q, planes), lsh.simhash(k, planes))
    s = scale * q.astype(np.float64) @ k.T.astype(np.float64)
    e = np.exp(s - s.max(axis=1, keepdims=True))
    exact = e @ v / e.sum(axis=1, keepdims=True)
    ec = np.where(cand, e, 0.0)
    z = ec.sum(axis=1, keepdims=True)
    approx = np.divide(ec @ v, z, out=np.zeros_like(exact), where=z > 0)
    top10 = np.argsort(-s, axis=1)[:, :10]
    return {
        "candidate_fraction": cand.mean(axis=1).mean(),
        "recall_at_10": np.take_along_axis(cand, top10, axis=1).mean(),
        "output_rel_error": (np.linalg.norm(approx - exact, axis=1) / np.linalg.norm(exact, axis=1)).mean(),
    }


def test_every_key_collides():
    """Zero hyperplanes put every vector in bucket 0: all keys are candidates, the output is exact."""
    rng = np.random.default_rng(0)
    q, k, v = rng.standard_normal((1000, 16)), rng.standard_normal((300, 16)), rng.standard_normal((300, 16))
    m = le.retrieval_metrics(q, k, np.zeros((2, 5, 16)), needles=np.arange(1000) % 300, values=v)
    assert m["candidate_fraction"] == 1.0 and m["candidate_fraction_std"] == 0.0
    assert m["needle_recall"] == 1.0
    assert m["recall_at_1"] == m["recall_at_10"] == m["recall_at_50"] == 1.0
    assert m["empty_fraction"] == 0.0
    assert abs(m["amplification"]) < 1e-5  # candidates are the random population itself
    assert m["amplification_seed_median"] == pytest.approx(1.0, rel=1e-5)
    assert m["output_rel_error"] < 1e-5


def test_empty_candidate_queries():
    """Keys in the half-space x0 > 0, queries in x0 < 0, one plane e0: no query has a candidate."""
    rng = np.random.default_rng(1)
    k = rng.standard_normal((200, 8))
    k[:, 0] = np.abs(k[:, 0]) + 0.1
    q = rng.standard_normal((50, 8))
    q[:, 0] = -np.abs(q[:, 0]) - 0.1
    planes = np.zeros((1, 1, 8))
    planes[0, 0, 0] = 1.0
    m = le.retrieval_metrics(q, k, planes, needles=np.arange(50), values=rng.standard_normal((200, 8)))
    assert m["candidate_fraction"] == 0.0 and m["empty_fraction"] == 1.0
    assert m["needle_recall"] == 0.0 and m["recall_at_1"] == 0.0 and m["recall_at_50"] == 0.0
    assert m["output_rel_error"] == pytest.approx(1.0)  # O_lsh = 0 for an empty candidate set
    assert np.isnan(m["amplification"])  # undefined, left out rather than faked


@pytest.mark.parametrize("bits,tables", [(1, 1), (2, 3), (4, 2), (6, 5)])
def test_metrics_match_the_dense_reference(bits, tables):
    rng = np.random.default_rng(bits * 10 + tables)
    q, k, v = rng.standard_normal((60, 12)), rng.standard_normal((400, 12)), rng.standard_normal((400, 12))
    planes = lsh.hyperplanes(12, bits, tables, seed=3)
    m = le.retrieval_metrics(q, k, planes, values=v, scale=0.3)
    ref = _dense_check(q, k, v, planes, 0.3)
    assert m["candidate_fraction"] == pytest.approx(ref["candidate_fraction"], rel=1e-12)
    assert m["recall_at_10"] == pytest.approx(ref["recall_at_10"], rel=1e-12)
    assert m["output_rel_error"] == pytest.approx(ref["output_rel_error"], rel=1e-4)


def test_sub_block_codes_are_masked_full_codes():
    """planes[:T, :b] hashes to the low b bits of the first T tables of the full codes; hash_codes == simhash."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((500, 32)).astype(np.float32)
    planes = lsh.hyperplanes(32, 16, 16, seed=5)
    full = le.hash_codes(x, planes, chunk=128)
    assert np.array_equal(full.T.astype(np.int32), lsh.simhash(x, planes))
    for bits, tables in [(4, 1), (6, 4), (10, 16), (16, 2)]:
        sub = lsh.simhash(x, planes[:tables, :bits])
        assert np.array_equal(sub, (full[:, :tables] & ((1 << bits) - 1)).T)


def test_agreement_levels():
    q = np.array([[0b1011, 0b0000]], dtype=np.uint16)
    k = np.array([[0b0011, 0b0000], [0b1010, 0b0100]], dtype=np.uint16)
    levels = le.agreement_levels(q, k, [1, 2])
    # pair 0: table 0 agrees on 3 low bits, table 1 on all 16; pair 1: 0, then 2
    assert levels.tolist() == [[3, 16], [0, 2]]


@pytest.mark.parametrize("cos", [0.9, 0.5, 0.0, -0.3])
def test_needle_haystack(cos):
    keys, queries, needles = ld.needle_haystack(3000, 64, 1000, cos, seed=4)
    assert keys.dtype == queries.dtype == np.float32 and needles.dtype == np.int64
    assert keys.shape == (3000, 64) and queries.shape == (1000, 64) and needles.shape == (1000,)
    assert np.unique(needles).size == 1000
    k, q = keys[needles].astype(np.float64), queries.astype(np.float64)
    got = (k * q).sum(1) / (np.linalg.norm(k, axis=1) * np.linalg.norm(q, axis=1))
    np.testing.assert_allclose(got, cos, atol=1e-6)
    # needle norms follow the chi_64 law of the other keys (mean ~ sqrt(63.5))
    assert np.linalg.norm(k, axis=1).mean() == pytest.approx(np.sqrt(63.5), rel=0.02)
    # same seed, other cosine: same keys elsewhere, same queries and positions
    keys2, queries2, needles2 = ld.needle_haystack(3000, 64, 1000, 0.95, seed=4)
    others = np.setdiff1d(np.arange(3000), needles)
    assert np.array_equal(needles2, needles) and np.array_equal(queries2, queries)
    assert np.array_equal(keys2[others], keys[others])
    # needles_at replays the same draws: the needles the haystacks planted, before the float32 cast
    planted = ld.needles_at((cos, 0.95), 3000, 64, 1000, seed=4)
    assert np.array_equal(planted[cos].astype(np.float32), keys[needles])
    assert np.array_equal(planted[0.95].astype(np.float32), keys2[needles])


def test_needle_haystack_rejects_bad_sizes():
    with pytest.raises(ValueError, match="n_queries"):
        ld.needle_haystack(10, 8, 11, 0.9, 0)
    with pytest.raises(ValueError, match="cos"):
        ld.needle_haystack(10, 8, 5, 1.5, 0)


@pytest.mark.parametrize("seed", range(6))
def test_collision_rate_matches_simhash_theory(seed):
    """Pairs at fixed cosines, one plane draw per seed: every (cos, bits, tables) rate within a 99.9% binomial interval.

    One plane draw is shared by the pairs, so the events are independent given the
    planes but their probability is the theory only on average over planes; the
    deviation of one draw is a few per cent of p (checked offline at 2e5 pairs),
    well inside the interval at 4,000 pairs.
    """
    n = 4000
    for cos in (0.0, 0.5, 0.8, 0.9, 0.99):
        hits = le.collision_rates(cos, 64, n, seed=seed, bits=BITS, tables=TABLES)
        lo, hi = le.clopper_pearson(hits, n, level=0.999)
        for ti, t in enumerate(TABLES):
            for bi, b in enumerate(BITS):
                p = lsh.collision_probability(cos, b, t)
                assert lo[ti, bi] <= p <= hi[ti, bi], (cos, b, t, hits[ti, bi] / n, p)


def test_binomial_intervals():
    lo, hi = le.wilson(50, 100)
    assert lo < 0.5 < hi and hi - lo == pytest.approx(0.19, abs=0.01)
    lo, hi = le.clopper_pearson(np.array([0, 100]), 100)
    assert lo[0] == 0.0 and hi[1] == 1.0 and hi[0] == pytest.approx(0.0362, abs=1e-3)


def test_isotropic_candidate_fraction_theory():
    # one table, b bits: independent isotropic vectors collide with probability E[(1 - θ/π)^b]; b=1 gives 1/2
    assert le.isotropic_candidate_fraction(64, 1, 1) == pytest.approx(0.5, abs=1e-6)
    # against Monte Carlo over independent Gaussian pairs: E_c[P(c)] is above 2^-b (Jensen)
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((2, 200_000, 64))
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    for bits, tables in [(8, 1), (4, 4), (12, 16)]:
        f = le.isotropic_candidate_fraction(64, bits, tables)
        assert f == pytest.approx(lsh.collision_probability(cos, bits, tables).mean(), rel=0.01)
        assert f > 1 - (1 - 2.0**-bits) ** tables


def test_gini_and_bucket_skew():
    assert le.gini([3, 3, 3, 3]) == 0.0
    assert le.gini([0, 0, 0, 8]) == pytest.approx(0.75)
    codes = np.zeros((100, 2), dtype=np.uint16)  # every key in bucket 0
    row = le.bucket_skew(codes, bits=(4,))[0]
    assert row["largest_bucket_share"] == 1.0 and row["collision_mass"] == 1.0
    assert row["gini"] == pytest.approx(15 / 16)
