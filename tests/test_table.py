"""Table-lookup attention: the references (reference/table.py) and the lookup kernel (cuda_kernels/table.py).

Sections:
  1. projections (Base17 golden-step, mean-stride, Gaussian, PCA)
  2. palettes and tables (seed: farthest-point L1; dot: k-means)
  3. lookup_scores / table_attention_ref (against dense loops and the exact oracle; masks)
  4. input validation
  5. the lookup kernel and the API's table method (tiny grid under the simulator)

GGUF round trips are in tests/test_gguf.py, the distance study's helpers in
tests/test_distance.py and its quick run in tests/test_studies.py.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numba import cuda

import nkattn
from nkattn.cuda_kernels.table import score_rowmax, table_attention
from nkattn.reference import table as T
from nkattn.reference.exact import attention_ref, visible_key_counts
from nkattn.testing import (
    assert_bit_identical,
    assert_within_budget,
    float32_floor,
    relative_error,
)

from .conftest import REAL_GPU, SIMULATOR

U32 = np.finfo(np.float32).eps / 2  # float32 unit roundoff

# ======================================================================================
# 1. Projections
# ======================================================================================


def test_golden_positions_are_a_permutation_with_step_11():
    pos = T.golden_positions()
    assert T.GOLDEN_STEP == 11 == round(17 / T.PHI)
    assert pos.tolist() == [0, 11, 5, 16, 10, 4, 15, 9, 3, 14, 8, 2, 13, 7, 1, 12, 6]
    assert sorted(pos.tolist()) == list(range(17))


def test_base17_at_d17_picks_one_element_per_axis():
    x = np.random.default_rng(0).normal(size=(5, 17))
    np.testing.assert_array_equal(T.base17_project(x), x[:, T.golden_positions()])
    np.testing.assert_array_equal(T.base17_project(np.eye(17))[T.golden_positions()], np.eye(17))


def test_base17_at_d34_averages_pairs():
    x = np.arange(34, dtype=np.float64)[None]  # residue r holds r and r + 17: mean r + 8.5
    np.testing.assert_array_equal(T.mean_stride_project(x)[0], np.arange(17) + 8.5)
    np.testing.assert_array_equal(T.base17_project(x)[0], T.golden_positions() + 8.5)


def test_mean_stride_uneven_classes():
    x = np.arange(20, dtype=np.float64)[None]  # residues 0..2 hold two elements, 3..16 one
    expected = np.array([(r + r + 17) / 2 if r < 3 else r for r in range(17)], dtype=np.float64)
    np.testing.assert_array_equal(T.mean_stride_project(x)[0], expected)
    np.testing.assert_array_equal(T.mean_stride_project(np.arange(8.0)[None], m=4)[0], [2.0, 3.0, 4.0, 5.0])


@settings(max_examples=30, deadline=None)
@given(n=st.integers(2, 12), d=st.integers(17, 90), seed=st.integers(0, 2**16))
def test_golden_is_mean_stride_permuted_so_distances_are_identical(n, d, seed):
    from scipy.spatial.distance import pdist

    x = np.random.default_rng(seed).normal(size=(n, d)) * 3
    golden, stride = T.base17_project(x), T.mean_stride_project(x)
    np.testing.assert_array_equal(golden, stride[:, T.golden_positions()])
    for metric in ("euclidean", "cityblock"):
        np.testing.assert_allclose(pdist(golden, metric), pdist(stride, metric), rtol=1e-14, atol=0)
    np.testing.assert_array_equal(np.sort(T.base17_i16(x), axis=1), np.sort(T.to_i16(stride), axis=1))


def test_i16_rounds_half_away_from_zero_and_clamps():
    x = np.array([0.5, -0.5, 1.5, 2.5, -2.5, 0.49, 32766.5, 32767.5, -32768.5, 200 * 256, 0.0]) / 256
    np.testing.assert_array_equal(T.to_i16(x), [1, -1, 2, 3, -3, 0, 32767, 32767, -32768, 32767, 0])
    assert T.to_i16(x).dtype == np.int16
    with pytest.raises(ValueError, match="non-finite"):
        T.to_i16(np.array([np.nan]))


def test_projection_errors():
    with pytest.raises(ValueError, match="d >= 17"):
        T.base17_project(np.ones((2, 16)))
    with pytest.raises(ValueError, match="2-D"):
        T.base17_project(np.ones(34))
    with pytest.raises(ValueError, match="golden"):
        T.project(np.ones((3, 40)), "golden", m=8)
    with pytest.raises(ValueError, match="projection must be"):
        T.project(np.ones((3, 40)), "hash")
    with pytest.raises(ValueError, match="PCA needs"):
        T.pca_project(np.ones((3, 40)), m=4)


def test_gaussian_matrix_is_seeded_with_variance_one_over_m():
    r = T.gaussian_matrix(400, 50, seed=3)
    np.testing.assert_array_equal(r, T.gaussian_matrix(400, 50, seed=3))
    # sample variance of 20,000 N(0, 1/m) entries: relative std sqrt(2 / 20000) = 1%; allow 5 sigma
    assert abs(r.var() * 50 - 1) < 5 * np.sqrt(2 / r.size)
    assert abs(r.mean()) < 5 / np.sqrt(50 * r.size)


def test_wide_pca_equals_sklearn_up_to_component_signs():
    from sklearn.decomposition import PCA

    x = np.random.default_rng(18).normal(size=(30, 200)) * np.linspace(3, 0.1, 200)
    ours = T.pca_project(x, 10)  # d > n: the Gram-matrix path
    ref = PCA(n_components=10, svd_solver="full").fit_transform(x)
    signs = np.sign((ours * ref).sum(0))
    np.testing.assert_allclose(ours * signs, ref, rtol=0, atol=1e-9 * np.abs(ref).max())


def test_pca_preserves_distances_of_data_in_an_m_dim_subspace():
    from scipy.spatial.distance import pdist

    rng = np.random.default_rng(1)
    x = rng.normal(size=(60, 3)) @ rng.normal(size=(3, 40)) + 5
    np.testing.assert_allclose(pdist(T.pca_project(x, 3)), pdist(x), rtol=1e-9)


# ======================================================================================
# 2. Palettes and tables
# ======================================================================================


def test_farthest_point_palette_hand_case():
    codes = np.array([[0], [1], [10], [4]], dtype=np.int16)  # mean 3.75: nearest is 4
    assert T.farthest_point_palette(codes).tolist() == [3, 2, 0, 1]
    assert T.farthest_point_palette(codes, 2).tolist() == [3, 2]
    assert T.farthest_point_palette(np.zeros((5, 17), dtype=np.int16)).tolist() == [0]  # one distinct row


def test_farthest_point_palette_is_greedy_max_min():
    codes = np.random.default_rng(2).integers(-300, 300, size=(400, 17)).astype(np.int16)
    pal = T.farthest_point_palette(codes, 256)
    assert len(pal) == len(set(pal.tolist())) == 256
    for i in range(1, 20):  # each entry maximises the L1 distance to the entries before it
        mind = T.l1_distances(codes, codes[pal[:i]]).min(axis=1)
        assert mind[pal[i]] == mind.max() and pal[i] == np.flatnonzero(mind == mind.max())[0]


def test_assignment_is_the_nearest_entry_with_lowest_index_ties():
    rng = np.random.default_rng(3)
    codes = rng.integers(-50, 50, size=(300, 17)).astype(np.int16)
    entries = codes[:40]
    brute = np.array([min(range(40), key=lambda e: (np.abs(c.astype(int) - entries[e]).sum(), e)) for c in codes])
    np.testing.assert_array_equal(T.assign_l1(codes, entries), brute)
    assert T.assign_l1(np.array([[1]]), np.array([[0], [2]])).tolist() == [0]
    rows, cents = rng.normal(size=(200, 8)), rng.normal(size=(30, 8))
    brute2 = ((rows[:, None] - cents[None]) ** 2).sum(-1).argmin(1)
    np.testing.assert_array_equal(T.assign_l2(rows, cents), brute2)


def test_kmeans_assignment_matches_sklearn_predict():
    from sklearn.cluster import KMeans

    rows = np.random.default_rng(4).normal(size=(500, 6))
    km = KMeans(n_clusters=20, n_init=1, random_state=0).fit(rows)
    np.testing.assert_array_equal(T.assign_l2(rows, km.cluster_centers_), km.predict(rows))


def test_seed_table_against_brute_force_and_at_the_int16_extremes():
    entries = np.random.default_rng(5).integers(-32768, 32768, size=(20, 17)).astype(np.int16)
    table = T.seed_distance_table(entries)
    brute = np.array([[np.abs(a.astype(np.int64) - b).sum() // 17 for b in entries] for a in entries])
    np.testing.assert_array_equal(table, brute)
    assert table.dtype == np.uint16
    extremes = np.array([[-32768] * 17, [32767] * 17], dtype=np.int16)
    assert T.seed_distance_table(extremes)[0, 1] == 65535  # 17 * 65535 / 17 fits uint16
    with pytest.raises(TypeError, match="int16"):
        T.seed_distance_table(entries.astype(np.int32))


def test_u16_quantization_is_within_half_a_step():
    table = np.random.default_rng(6).normal(size=(50, 40)) * 7
    q, step, offset = T.quantize_u16(table)
    assert q.dtype == np.uint16 and q.min() == 0 and q.max() == 65535
    # float64 rounding of (table - min) / step adds a few ulps of the range
    assert np.abs(offset + step * q.astype(np.float64) - table).max() <= step / 2 * (1 + 1e-9)
    q, step, offset = T.quantize_u16(np.full((3, 3), 2.5))
    assert (q == 0).all() and offset == 2.5


def test_seed_table_builder():
    rng = np.random.default_rng(7)
    q, k = rng.normal(size=(2, 3, 50, 32)), rng.normal(size=(2, 1, 40, 32))
    ti = T.seed_table(q, k)
    book = ti.codebook
    assert ti.q_codes.shape == (2, 3, 50) and ti.k_codes.shape == (2, 1, 40) and ti.q_codes.dtype == np.uint8
    assert ti.table_u16.shape == (256, 256) and ti.score_scale == -1e-3 and ti.score_offset == 0.0
    codes = T.base17_i16(np.concatenate([q.reshape(-1, 32), k.reshape(-1, 32)]))
    np.testing.assert_array_equal(book.q_entries, codes[T.farthest_point_palette(codes)])
    np.testing.assert_array_equal(ti.q_codes.ravel(), T.assign_l1(T.base17_i16(q.reshape(-1, 32)), book.q_entries))
    np.testing.assert_array_equal(book.quantized_table(), book.table)
    np.testing.assert_array_equal(book.table, -1e-3 * T.seed_distance_table(book.q_entries).astype(np.float64))


def test_dot_table_with_one_entry_per_row_reproduces_the_scores():
    """With at most 256 distinct rows, k-means keeps every row as its own centroid."""
    rng = np.random.default_rng(8)
    q, k = rng.normal(size=(1, 2, 60, 16)), rng.normal(size=(1, 2, 70, 16))
    ti = T.dot_table(q, k, scale=0.25, seed=0)
    book = ti.codebook
    np.testing.assert_allclose(book.q_entries[ti.q_codes], q, rtol=0, atol=1e-12)
    np.testing.assert_allclose(book.k_entries[ti.k_codes], k, rtol=0, atol=1e-12)
    logits = T.lookup_scores(ti.q_codes, ti.k_codes, ti.table_u16, score_scale=ti.score_scale,
                             score_offset=ti.score_offset)
    exact = 0.25 * np.einsum("bhqd,bhkd->bhqk", q, k)
    assert np.abs(logits - exact).max() <= ti.score_scale / 2 * (1 + 1e-6) + 1e-12


# ======================================================================================
# 3. lookup_scores and table_attention_ref
# ======================================================================================


def _dense_loops(q_codes, k_codes, table, v, scale, offset, causal, key_lengths):
    """The obvious loops: per (b, h, i) a softmax over the visible keys."""
    batch, heads, nq = q_codes.shape
    nk = k_codes.shape[2]
    group = heads // k_codes.shape[1]
    o = np.zeros((batch, heads, nq, v.shape[-1]))
    lse = np.full((batch, heads, nq), -np.inf)
    s_all = np.zeros((batch, heads, nq, nk))
    for b in range(batch):
        nk_b = nk if key_lengths is None else key_lengths[b]
        for h in range(heads):
            for i in range(nq):
                limit = min(nk_b, i + 1 + nk_b - nq) if causal else nk_b
                s = np.array([offset + scale * float(table[q_codes[b, h, i], k_codes[b, h // group, j]]) for j in range(nk)])
                s_all[b, h, i] = s
                if limit <= 0:
                    continue
                m = s[:limit].max()
                p = np.exp(s[:limit] - m)
                o[b, h, i] = p @ v[b, h // group, :limit] / p.sum()
                lse[b, h, i] = m + np.log(p.sum())
    return s_all, o, lse


@settings(max_examples=40, deadline=None)
@given(
    batch=st.integers(1, 2), kv_heads=st.integers(1, 2), group=st.integers(1, 3), nq=st.integers(1, 9),
    nk=st.integers(1, 9), d=st.integers(1, 4), pq=st.integers(1, 256), pk=st.integers(1, 256),
    causal=st.booleans(), use_lengths=st.booleans(), seed=st.integers(0, 2**16),
)
def test_oracle_matches_dense_loops(batch, kv_heads, group, nq, nk, d, pq, pk, causal, use_lengths, seed):
    rng = np.random.default_rng(seed)
    q_codes = rng.integers(0, pq, size=(batch, kv_heads * group, nq)).astype(np.uint8)
    k_codes = rng.integers(0, pk, size=(batch, kv_heads, nk)).astype(np.uint8)
    table = rng.integers(0, 65536, size=(pq, pk)).astype(np.uint16)
    v = rng.normal(size=(batch, kv_heads, nk, d))
    lengths = rng.integers(0, nk + 1, size=batch) if use_lengths else None
    scale, offset = float(rng.normal() * 1e-3), float(rng.normal())
    s_ref, o_ref, lse_ref = _dense_loops(q_codes, k_codes, table, v, scale, offset, causal, lengths)
    s = T.lookup_scores(q_codes, k_codes, table, score_scale=scale, score_offset=offset)
    np.testing.assert_array_equal(s, s_ref)
    o, lse = T.table_attention_ref(q_codes, k_codes, table, v, score_scale=scale, score_offset=offset,
                                   causal=causal, key_lengths=lengths)
    np.testing.assert_allclose(o, o_ref, rtol=1e-12, atol=1e-13)
    empty = np.isneginf(lse_ref)
    np.testing.assert_array_equal(np.isneginf(lse), empty)
    np.testing.assert_allclose(lse[~empty], lse_ref[~empty], rtol=1e-13)
    assert (o[empty] == 0).all()


def test_lookup_scores_float32_rounds_product_then_sum():
    rng = np.random.default_rng(9)
    table = rng.normal(size=(7, 5)) * 100  # float64 table: converted to float32 first
    qc, kc = rng.integers(0, 7, (1, 2, 6)).astype(np.uint8), rng.integers(0, 5, (1, 1, 4)).astype(np.uint8)
    s = T.lookup_scores(qc, kc, table, score_scale=0.1, score_offset=-3.3, compute_dtype=np.float32)
    assert s.dtype == np.float32
    t32 = table.astype(np.float32)[qc[0, :, :, None], kc[0, 0][None, None, :]]
    expected = (np.float32(0.1) * t32) + np.float32(-3.3)  # two float32 roundings
    np.testing.assert_array_equal(s[0], expected)


def _exact_table(q, k, scale):
    """Codes and a float64 table that reproduce scale * q . k exactly: every row its own entry."""
    batch, heads, nq, _ = q.shape
    kv_heads, nk = k.shape[1], k.shape[2]
    q_rows, k_rows = q.reshape(-1, q.shape[-1]), k.reshape(-1, k.shape[-1])
    assert len(q_rows) <= 256 and len(k_rows) <= 256
    table = scale * q_rows @ k_rows.T
    q_codes = np.arange(len(q_rows), dtype=np.uint8).reshape(batch, heads, nq)
    k_codes = np.arange(len(k_rows), dtype=np.uint8).reshape(batch, kv_heads, nk)
    return q_codes, k_codes, table


CASES = [
    pytest.param(2, 4, 2, 17, 23, 16, False, None, id="B2-H4-Hkv2-Nq17-Nk23-d16"),
    pytest.param(2, 4, 2, 23, 17, 16, True, None, id="B2-H4-Hkv2-Nq23-Nk17-d16-causal"),
    pytest.param(2, 2, 1, 15, 31, 8, True, [31, 20], id="B2-H2-Hkv1-Nq15-Nk31-d8-causal-lengths"),
    pytest.param(2, 3, 3, 16, 16, 32, False, [0, 9], id="B2-H3-Nq16-Nk16-d32-lengths0"),
    pytest.param(1, 2, 2, 113, 127, 64, True, None, id="B1-H2-Nq113-Nk127-d64-causal"),
]


@pytest.mark.parametrize("batch,heads,kv_heads,nq,nk,d,causal,lengths", CASES)
def test_oracle_equals_exact_attention_when_the_table_is_exact(batch, heads, kv_heads, nq, nk, d, causal, lengths):
    rng = np.random.default_rng(10)
    q, k, v = rng.normal(size=(batch, heads, nq, d)), rng.normal(size=(batch, kv_heads, nk, d)), rng.normal(size=(batch, kv_heads, nk, d))
    scale = 1 / np.sqrt(d)
    # GQA: the table is built over the expanded key rows only once per kv head
    q_codes, k_codes, table = _exact_table(q, k, scale)
    o, lse = T.table_attention_ref(q_codes, k_codes, table, v, causal=causal, key_lengths=lengths)
    o_ref, lse_ref = attention_ref(q, k, v, causal=causal, scale=scale, key_lengths=lengths)
    np.testing.assert_allclose(o, o_ref, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(lse_ref))
    finite = np.isfinite(lse_ref)
    np.testing.assert_allclose(lse[finite], lse_ref[finite], rtol=1e-13)


def test_fully_masked_rows_give_zero_and_minus_inf():
    rng = np.random.default_rng(11)
    qc, kc = rng.integers(0, 4, (2, 2, 6)).astype(np.uint8), rng.integers(0, 4, (2, 1, 3)).astype(np.uint8)
    v = rng.normal(size=(2, 1, 3, 5))
    o, lse = T.table_attention_ref(qc, kc, rng.normal(size=(4, 4)), v, causal=True, key_lengths=[3, 0])
    counts = visible_key_counts(2, 6, 3, True, [3, 0])  # Nq > Nk: the first 3 rows of batch 0 see nothing
    assert counts[0].tolist() == [0, 0, 0, 1, 2, 3] and (counts[1] == 0).all()
    empty = counts[:, None, :] == 0
    assert np.isneginf(lse[np.broadcast_to(empty, lse.shape)]).all()
    assert (o[np.broadcast_to(empty, lse.shape)] == 0).all() and not np.isnan(o).any()
    assert np.isfinite(lse[np.broadcast_to(~empty, lse.shape)]).all()


def test_quantized_dot_table_output_within_the_quantization_step():
    """Logits off by at most eps move every probability by a factor in [e^-2eps, e^2eps]:
    |O_u16 - O_float| <= (e^(2 eps) - 1) max|v|."""
    rng = np.random.default_rng(12)
    q, k, v = rng.normal(size=(1, 2, 40, 16)), rng.normal(size=(1, 2, 50, 16)), rng.normal(size=(1, 2, 50, 16))
    ti = T.dot_table(q, k, scale=0.25, seed=0)
    book = ti.codebook
    o_float, _ = T.table_attention_ref(ti.q_codes, ti.k_codes, book.table, v)
    o_u16, _ = T.table_attention_ref(ti.q_codes, ti.k_codes, ti.table_u16, v, score_scale=ti.score_scale,
                                     score_offset=ti.score_offset)
    eps = ti.score_scale / 2 * (1 + 1e-6)
    assert np.abs(o_u16 - o_float).max() <= np.expm1(2 * eps) * np.abs(v).max()


def test_float32_oracle():
    rng = np.random.default_rng(13)
    qc, kc = rng.integers(0, 256, (1, 2, 33)).astype(np.uint8), rng.integers(0, 256, (1, 2, 65)).astype(np.uint8)
    table = rng.integers(0, 65536, (256, 256)).astype(np.uint16)
    v = rng.normal(size=(1, 2, 65, 16))
    kw = {"score_scale": 1e-4, "score_offset": 0.5, "causal": True}
    o32, lse32 = T.table_attention_ref(qc, kc, table, v, compute_dtype=np.float32, **kw)
    o64, _ = T.table_attention_ref(qc, kc, table, v, **kw)
    assert o32.dtype == lse32.dtype == np.float32
    # float32: the logits are exact to u; a sum of Nk terms loses at most Nk u (Higham), plus exp and divide
    bound = (65 + 8) * U32 * np.abs(v).max()
    assert np.abs(o32 - o64).max() <= bound


# ======================================================================================
# 4. Input validation
# ======================================================================================


def _good():
    rng = np.random.default_rng(14)
    return (rng.integers(0, 256, (2, 4, 5)).astype(np.uint8), rng.integers(0, 256, (2, 2, 7)).astype(np.uint8),
            np.zeros((256, 256), dtype=np.uint16), np.zeros((2, 2, 7, 8), dtype=np.float32))


def test_validation_accepts_good_inputs():
    assert T.validate_table_inputs(*_good(), require_256=True) == (2, 4, 2, 5, 7, 8)


@pytest.mark.parametrize(
    "change,error,match",
    [
        pytest.param(lambda a: (a[0].astype(np.float32), *a[1:]), TypeError, "q_codes must be integer", id="float-codes"),
        pytest.param(lambda a: (a[0], a[1].astype(np.int16), *a[2:]), TypeError, "k_codes must be uint8", id="int16-codes-256"),
        pytest.param(lambda a: (a[0], a[1], np.zeros((255, 256), np.uint16), a[3]), ValueError, "256 x 256", id="palette-255"),
        pytest.param(lambda a: (a[0], a[1], np.zeros((2, 256, 256)), a[3]), ValueError, "table must be 2-D", id="table-3d"),
        pytest.param(lambda a: (a[0], a[1], np.zeros((256, 256), bool), a[3]), TypeError, "numeric", id="table-bool"),
        pytest.param(lambda a: (a[0][:1], *a[1:]), ValueError, "batch mismatch", id="batch"),
        pytest.param(lambda a: (a[0][:, :3], *a[1:]), ValueError, "multiple", id="heads"),
        pytest.param(lambda a: (*a[:3], a[3][:, :, :6]), ValueError, "v must be", id="v-shape"),
        pytest.param(lambda a: (*a[:3], a[3].astype(np.int32)), TypeError, "v must be a float", id="v-int"),
        pytest.param(lambda a: (a[0][0], *a[1:]), ValueError, "q_codes must be 3-D", id="codes-2d"),
    ],
)
def test_validation_errors(change, error, match):
    with pytest.raises(error, match=match):
        T.validate_table_inputs(*change(_good()), require_256=True)


def test_codes_outside_the_palette_are_rejected():
    qc, kc, _, v = _good()
    with pytest.raises(ValueError, match=r"k_codes must lie in \[0, 100\)"):
        T.table_attention_ref(qc, kc, np.zeros((256, 100)), v)
    with pytest.raises(ValueError, match=r"q_codes must lie"):
        T.lookup_scores(qc.astype(np.int64) - 1, kc, np.zeros((256, 256)))
    with pytest.raises(ValueError, match="key_lengths"):
        T.table_attention_ref(qc, kc, np.zeros((256, 256)), v, key_lengths=[7, 8])
    with pytest.raises(TypeError, match="key_lengths"):
        T.table_attention_ref(qc, kc, np.zeros((256, 256)), v, key_lengths=[7.0, 1.0])


# ======================================================================================
# 5. The lookup kernel (cuda_kernels/table.py); tiny grid under the simulator
# ======================================================================================


def kernel_case(b, h, hkv, nq, nk, d, causal=False, dtype=np.float32, key_lengths=None):
    cid = f"B{b}-H{h}-Hkv{hkv}-Nq{nq}-Nk{nk}-d{d}{'-causal' if causal else ''}{'-kl' if key_lengths else ''}-f{np.dtype(dtype).itemsize * 8}"
    return pytest.param(dict(b=b, h=h, hkv=hkv, nq=nq, nk=nk, d=d, causal=causal, dtype=dtype, key_lengths=key_lengths), id=cid)


KERNEL_GRID = [
    kernel_case(b, h, hkv, nq, nk, d, causal, dtype)
    for dtype in (np.float32, np.float64)
    for d in (32, 64, 128)
    for (nq, nk) in [(1, 1), (17, 17), (113, 203), (203, 113), (129, 129)]
    for causal in (False, True)
    for (b, h, hkv) in [(2, 2, 1)]
] + [kernel_case(3, 4, 2, 257, 300, 64, True, key_lengths=(300, 0, 77))] if REAL_GPU else [
    kernel_case(1, 2, 1, 9, 17, 16, causal=True, key_lengths=(13,)),
    kernel_case(1, 1, 1, 17, 9, 16, dtype=np.float64),
]


def kernel_inputs(c, seed=0):
    rng = np.random.default_rng(seed)
    q_codes = rng.integers(0, 256, (c["b"], c["h"], c["nq"])).astype(np.uint8)
    k_codes = rng.integers(0, 256, (c["b"], c["hkv"], c["nk"])).astype(np.uint8)
    table = rng.integers(0, 2**16, (256, 256)).astype(np.uint16)
    v = rng.standard_normal((c["b"], c["hkv"], c["nk"], c["d"])).astype(c["dtype"])
    lengths = np.full(c["b"], c["nk"], np.int32) if c["key_lengths"] is None else np.asarray(c["key_lengths"], np.int32)
    return q_codes, k_codes, table, v, lengths


# a dot-table-like map: logits span about 8, with an offset that only lse sees
SCORE_SCALE, SCORE_OFFSET = 1.25e-4, -3.5


def run_table_kernel(q_codes, k_codes, table, v, lengths, causal):
    o, lse = table_attention(cuda.to_device(q_codes), cuda.to_device(k_codes), table, cuda.to_device(v),
                             cuda.to_device(lengths), score_scale=SCORE_SCALE, score_offset=SCORE_OFFSET, causal=causal)
    return o.copy_to_host(), lse.copy_to_host()


@pytest.mark.parametrize("c", KERNEL_GRID)
def test_table_kernel_matches_oracle(c):
    q_codes, k_codes, table, v, lengths = kernel_inputs(c)
    o, lse = run_table_kernel(q_codes, k_codes, table, v, lengths, c["causal"])
    kw = dict(score_scale=SCORE_SCALE, score_offset=SCORE_OFFSET, causal=c["causal"], key_lengths=lengths)
    o_ref, lse_ref = T.table_attention_ref(q_codes, k_codes, table, v, **kw)
    if c["dtype"] == np.float64:
        assert relative_error(o, o_ref) <= 1e-12 and relative_error(lse, lse_ref) <= 1e-12
    elif SIMULATOR:  # float32 precision is only meaningful on a GPU
        assert relative_error(o, o_ref) <= 1e-3 and relative_error(lse, lse_ref) <= 1e-3
    else:
        o_naive, lse_naive = T.table_attention_ref(q_codes, k_codes, table, v, **kw, compute_dtype=np.float32)
        assert_within_budget("O", o, o_ref, o_naive, floor=float32_floor(o_ref))
        assert_within_budget("lse", lse, lse_ref, lse_naive, floor=float32_floor(lse_ref))


@pytest.mark.parametrize("d", [32, 64, 128] if REAL_GPU else [16])
def test_looked_up_scores_are_bit_identical_to_the_reference_in_float32(d):
    # the row maximum of scale * table[code_q, code_k]: a lookup and one float32 product, exact
    c = dict(b=1, h=2, hkv=2, nq=300 if REAL_GPU else 9, nk=517 if REAL_GPU else 13, d=d, dtype=np.float32, key_lengths=None)
    q_codes, k_codes, table, _, _ = kernel_inputs(c, seed=1)
    q = cuda.to_device(np.zeros((1, 2, c["nq"], d), np.float32))
    got = score_rowmax(q, q, cuda.to_device(q_codes), cuda.to_device(k_codes), table, scale=SCORE_SCALE, lookup=True)
    expected = T.lookup_scores(q_codes, k_codes, table, score_scale=SCORE_SCALE, compute_dtype=np.float32).max(-1)
    assert_bit_identical("row max of looked-up scores", got.copy_to_host(), expected)


def test_dot_score_rowmax_matches_float64_scores():
    rng = np.random.default_rng(2)
    n, d = (300, 64) if REAL_GPU else (11, 16)
    q, k = (rng.standard_normal((1, 1, n, d)).astype(np.float32) for _ in range(2))
    codes = cuda.to_device(np.zeros((1, 1, n), np.uint8))
    got = score_rowmax(cuda.to_device(q), cuda.to_device(k), codes, codes, np.zeros((256, 256), np.uint16), scale=0.125, lookup=False)
    expected = (0.125 * q[0, 0].astype(np.float64) @ k[0, 0].T.astype(np.float64)).max(-1)
    assert relative_error(got.copy_to_host()[0, 0], expected) <= 1e-6


def test_table_kernel_is_deterministic_and_every_element_written():
    c = dict(b=2, h=2, hkv=1, nq=700 if REAL_GPU else 9, nk=900 if REAL_GPU else 11, d=64 if REAL_GPU else 16,
             dtype=np.float32, key_lengths=(900 if REAL_GPU else 11, 0))
    q_codes, k_codes, table, v, lengths = kernel_inputs(c, seed=3)
    out = cuda.to_device(np.full((2, 2, c["nq"], c["d"]), np.nan, np.float32))
    lse = cuda.to_device(np.full((2, 2, c["nq"]), np.nan, np.float32))
    args = (cuda.to_device(q_codes), cuda.to_device(k_codes), table, cuda.to_device(v), cuda.to_device(lengths))
    runs = []
    for _ in range(10 if REAL_GPU else 2):
        table_attention(*args, score_scale=SCORE_SCALE, causal=True, out=out, lse=lse)
        runs.append((out.copy_to_host(), lse.copy_to_host()))
    assert not np.isnan(runs[0][0]).any() and not np.isnan(runs[0][1]).any()
    assert (runs[0][0][1] == 0).all() and np.isneginf(runs[0][1][1]).all()  # batch 1 sees no key
    for o, l in runs[1:]:
        assert_bit_identical("O", o, runs[0][0])
        assert_bit_identical("lse", l, runs[0][1])


@pytest.mark.parametrize("variant", ["dot", "seed"])
def test_api_table_method_cuda_equals_reference(variant):
    rng = np.random.default_rng(4)
    n = 300 if REAL_GPU else 12
    q, k, v = (rng.standard_normal((1, 2, n, 32)) for _ in range(3))
    o_cuda, lse_cuda = nkattn.attention(q, k, v, method="table", table=variant, backend="cuda", return_lse=True)
    o_ref, lse_ref = nkattn.attention(q, k, v, method="table", table=variant, backend="reference", return_lse=True)
    assert relative_error(o_cuda, o_ref) <= 1e-12 and relative_error(lse_cuda, lse_ref) <= 1e-12


def test_api_table_bad_inputs():
    q = np.zeros((1, 1, 4, 32))
    with pytest.raises(ValueError, match="table must be one of"):
        nkattn.attention(q, q, q, method="table", table="fft")
    with pytest.raises(ValueError, match="table only applies"):
        nkattn.attention(q, q, q, table="dot")
    with pytest.raises(ValueError, match="only apply to method='lsh'"):
        nkattn.attention(q, q, q, method="table", lsh_bits=4)
    with pytest.raises(ValueError, match="d >= 17"):
        nkattn.attention(np.zeros((1, 1, 4, 16)), np.zeros((1, 1, 4, 16)), np.zeros((1, 1, 4, 16)), method="table", table="seed")


@pytest.mark.parametrize("table", [np.zeros((128, 128), np.uint16), np.zeros((256, 256), np.float32)], ids=["128x128", "float32"])
def test_table_kernel_rejects_a_table_it_cannot_hold(table):
    codes = cuda.to_device(np.zeros((1, 1, 4), np.uint8))
    v = cuda.to_device(np.zeros((1, 1, 4, 16), np.float32))
    with pytest.raises(ValueError, match="256, 256"):
        table_attention(codes, codes, table, v, cuda.to_device(np.array([4], np.int32)), score_scale=1.0, causal=False)
