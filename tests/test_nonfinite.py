"""NaN and inf: refused by default (check_finite), propagated alike by every backend when allowed.

The policy is written in `nkattn.reference.exact`'s docstring. Only its
well-defined cases are tested across backends: a row's fate is fixed by the
scores it sees and the values of the keys it sees; what NaN in v does to rows
that do not see its key depends on the path (0 * NaN), and is not compared.
"""

import numpy as np
import pytest
from numba import cuda

import nkattn
from nkattn.arrays import BFLOAT16, first_nonfinite
from nkattn.reference.exact import (
    attention_ref,
    exp_nonpositive,
    streaming_attention_ref,
)
from nkattn.reference.lsh import lsh_attention_ref
from nkattn.testing import nan_padded_device_view

from .conftest import REAL_GPU

B, H, N, D = 1, 2, (203 if REAL_GPU else 13), 16  # 13 crosses the simulator's 8-key tiles
DTYPES = [pytest.param(np.float32, id="f32"), pytest.param(np.float64, id="f64")]


def inputs(dtype, seed=0, b=B, h=H):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((b, h, N, D)).astype(dtype) for _ in range(3)]


def both(q, k, v, **kw):
    """(O, lse) of the CUDA backend and of the reference, NaN and inf allowed."""
    kw = dict(check_finite=False, return_lse=True, **kw)
    with np.errstate(invalid="ignore", over="ignore"):
        return nkattn.attention(q, k, v, backend="cuda", **kw), nkattn.attention(q, k, v, backend="reference", **kw)


def nonfinite_rows(o):
    return ~np.isfinite(o).all(axis=-1)


# --------------------------------------------------------------------------------------
# check_finite=True (default): an error naming the tensor, the index and the value
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["q", "k", "v"])
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("where", ["host", "device"])
def test_nonfinite_inputs_are_refused_by_default(name, value, where):
    arrays = dict(zip("qkv", inputs(np.float32)))
    arrays[name][0, 0, 7, 3] = value
    arrays[name][0, 1, 2, 0] = value  # later in C order: the first one is named
    if where == "device":
        arrays = {n: cuda.to_device(x) for n, x in arrays.items()}
    with pytest.raises(ValueError, match=rf"^{name} holds {value} at index \(0, 0, 7, 3\); pass check_finite=False"):
        nkattn.attention(arrays["q"], arrays["k"], arrays["v"])


NO_ML_DTYPES = pytest.mark.skipif(BFLOAT16 is None, reason="bfloat16 needs ml_dtypes, which is not installed")


# numba holds a bfloat16 device array only in the simulator: on a GPU, cuda.to_device refuses the
# dtype ("cannot include dtype 'E' in a buffer"), and bfloat16 device inputs come as torch or CuPy tensors
NUMBA_BF16 = pytest.mark.skipif(REAL_GPU, reason="numba cannot hold a bfloat16 device array on a real GPU")


@pytest.mark.parametrize("dtype", [pytest.param(np.float16, id="f16"),
                                   pytest.param(BFLOAT16, id="bf16", marks=[NO_ML_DTYPES, NUMBA_BF16]),
                                   pytest.param(np.float32, id="f32"), pytest.param(np.float64, id="f64")])
def test_the_device_check_reads_only_the_view(dtype):
    """A view into a NaN-filled buffer is finite: the device check must not see the buffer around it."""
    x = inputs(np.float32)[0].astype(dtype)
    view = nan_padded_device_view(x)
    assert first_nonfinite(view, np.dtype(dtype)) is None
    x[0, 1, 4, 2] = np.inf
    assert first_nonfinite(nan_padded_device_view(x), np.dtype(dtype)) == ((0, 1, 4, 2), np.inf)


@pytest.mark.parametrize("dtype", DTYPES)
def test_padding_past_key_lengths_is_checked_but_never_read(dtype):
    q, k, v = inputs(dtype, b=2, h=1)
    lengths = np.array([N, 5], np.int32)
    clean = both(q, k, v, key_lengths=lengths, causal=True)
    k[1, :, 5:] = np.nan
    v[1, :, 5:] = np.inf
    with pytest.raises(ValueError, match=r"k holds nan at index \(1, 0, 5, 0\)"):
        nkattn.attention(q, k, v, key_lengths=lengths)
    # exact attention never reads keys past key_lengths: the outputs keep their bits
    for got, expected in zip(both(q, k, v, key_lengths=lengths, causal=True), clean):
        for a, b in zip(got, expected):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name", ["q", "k"])
def test_the_table_method_needs_finite_q_and_k_whatever_check_finite_says(name):
    arrays = dict(zip("qkv", inputs(np.float64)))
    arrays[name][0, 1, 2, 3] = np.nan
    with pytest.raises(ValueError, match=rf"{name} holds nan at index \(0, 1, 2, 3\); method='table' needs finite {name}"):
        nkattn.attention(arrays["q"], arrays["k"], arrays["v"], method="table", check_finite=False)


# --------------------------------------------------------------------------------------
# check_finite=False: propagation, the same in every backend
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_nan_in_q_poisons_its_row_only(dtype, causal):
    q, k, v = inputs(dtype)
    q[0, 1, 9, 4] = np.nan
    (o, lse), (o_ref, lse_ref) = both(q, k, v, causal=causal)
    expected = np.zeros((B, H, N), bool)
    expected[0, 1, 9] = True
    for name, got in (("O", o), ("lse", lse), ("O ref", o_ref), ("lse ref", lse_ref)):
        rows = nonfinite_rows(got) if got.ndim == 4 else ~np.isfinite(got)
        np.testing.assert_array_equal(rows, expected, err_msg=name)
    assert np.isnan(o[0, 1, 9]).all() and np.isnan(lse[0, 1, 9])


@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_in_k_poisons_the_rows_that_see_that_key(dtype):
    q, k, v = inputs(dtype)
    k[0, 0, 6, 2] = np.nan
    clean = both(*inputs(dtype), causal=True)
    (o, lse), (o_ref, lse_ref) = both(q, k, v, causal=True)
    sees = np.zeros((B, H, N), bool)
    sees[0, 0, 6:] = True  # causal with Nq == Nk: rows 6.. of head 0 see key 6
    for got, ref, name in ((o, clean[0][0], "O"), (o_ref, clean[1][0], "O ref")):
        np.testing.assert_array_equal(nonfinite_rows(got), sees, err_msg=name)
        np.testing.assert_array_equal(got[~sees], ref[~sees], err_msg=f"{name}: rows that do not see the key keep their bits")
    np.testing.assert_array_equal(np.isnan(lse), sees)
    np.testing.assert_array_equal(np.isnan(lse_ref), sees)


@pytest.mark.parametrize("dtype", DTYPES)
def test_plus_inf_scores_give_nan_and_only_minus_inf_scores_an_empty_row(dtype):
    q, k, v = inputs(dtype)
    k[..., 0] = -1.0
    k[0, 0, 4, 0] = 1.0  # the one key whose score with q[.., 0] = +inf is +inf
    q[0, 0, 2] = 0.0
    q[0, 0, 2, 0] = np.inf  # row 2 sees keys 0..2 only (causal): every score -inf
    q[0, 0, 10] = 0.0
    q[0, 0, 10, 0] = np.inf  # row 10 sees key 4: a +inf score
    for o, lse in both(q, k, v, causal=True):
        np.testing.assert_array_equal(o[0, 0, 2], 0.0)
        assert lse[0, 0, 2] == -np.inf
        assert np.isnan(o[0, 0, 10]).all() and np.isnan(lse[0, 0, 10])
        assert np.isfinite(np.delete(o[0, 0], [2, 10], axis=0)).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_minus_inf_score_is_a_key_of_weight_zero(dtype):
    q, k, v = inputs(dtype)
    q[..., 0] = np.abs(q[..., 0]) + 0.5
    k[:, :, 5, 0] = -np.inf
    dropped = attention_ref(*(np.delete(x, 5, axis=2) if x is not q else x for x in (q, k, v)))[0]
    for o, _ in both(q, k, v):
        np.testing.assert_allclose(o, dropped, rtol=0, atol=1e-6 if dtype == np.float32 else 1e-13)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("value", [np.nan, np.inf], ids=["nan", "inf"])
def test_nonfinite_v_reaches_every_row_that_sees_the_key(dtype, value):
    q, k, v = inputs(dtype)
    v[0, 1, 3, 5] = value
    (o, lse), (o_ref, lse_ref) = both(q, k, v, causal=True)
    for got in (o, o_ref):
        assert not np.isfinite(got[0, 1, 3:, 5]).any()  # rows 3.. see key 3
        assert np.isfinite(np.delete(got, 5, axis=-1)).all()  # only that column of v
    for got in (lse, lse_ref):
        assert np.isfinite(got).all()  # lse does not read v


@pytest.mark.parametrize("dtype", DTYPES)
def test_entropy_is_nan_where_lse_is_and_never_reads_v(dtype):
    q, k, v = inputs(dtype)
    k[..., 0] = -1.0
    k[0, 0, 4, 0] = 1.0
    q[0, 0, 2] = 0.0
    q[0, 0, 2, 0] = np.inf  # every score of row 2 is -inf: a row with no key, entropy 0
    q[0, 0, 10] = 0.0
    q[0, 0, 10, 0] = np.inf  # row 10 sees key 4: a +inf score
    q[0, 1, 7, 3] = np.nan
    v[0, 1, 3, 5] = np.nan
    nan_rows = np.zeros((B, H, N), bool)
    nan_rows[0, 0, 10] = nan_rows[0, 1, 7] = True
    for _, lse, h in both(q, k, v, causal=True, return_entropy=True):
        np.testing.assert_array_equal(np.isnan(h), nan_rows)
        np.testing.assert_array_equal(np.isnan(lse), nan_rows)
        assert h[0, 0, 2] == 0.0 and lse[0, 0, 2] == -np.inf
        assert (h[~nan_rows] >= 0).all()


@pytest.mark.parametrize("where", ["q", "k", "v"])
def test_float64_kernel_keeps_its_mirror_on_nan(where):
    """NaN where the float64 kernel and its mirror visit the same tiles: same NaN places, other bits equal."""
    q, k, v = inputs(np.float64)
    {"q": q, "k": k, "v": v}[where][0, 1, 11, 1] = np.nan
    (o, lse), _ = both(q, k, v)
    from nkattn.cuda_kernels.online_softmax import kernel_order

    with np.errstate(invalid="ignore"):
        o_m, lse_m = streaming_attention_ref(q, k, v, order=kernel_order(np.float64, D))
    for got, mirror in ((o, o_m), (lse, lse_m)):
        np.testing.assert_array_equal(np.isnan(got), np.isnan(mirror))
        np.testing.assert_array_equal(got[~np.isnan(got)], mirror[~np.isnan(mirror)])


def test_portable_exp_carries_nan_and_drops_what_underflows():
    got = exp_nonpositive(np.array([np.nan, -np.inf, -746.0, 0.0]))
    assert np.isnan(got[0]) and got[1] == 0.0 and got[2] == 0.0 and got[3] == 1.0


@pytest.mark.parametrize("where", ["q", "k", "v"])
def test_lsh_propagates_within_the_candidates(where):
    """float64 only: NaN takes the float32 path's steps in the exact tests above; what is LSH's own is
    the hashing (float64 for both dtypes) and the hiding of non-candidates."""
    q, k, v = inputs(np.float64, h=1)
    {"q": q, "k": k, "v": v}[where][0, 0, 6, 1] = np.nan
    (o, lse), (o_ref, lse_ref) = both(q, k, v, method="lsh", lsh_bits=2, lsh_tables=2, causal=True)
    with np.errstate(invalid="ignore"):
        cand = lsh_attention_ref(q, k, v, bits=2, tables=2, causal=True)[2]
    if where == "q":
        poisoned = np.zeros(cand.shape[:3], bool)
        poisoned[0, 0, 6] = cand[0, 0, 6].any()
    else:  # NaN hashes to bucket 0 in every table: the rows that have key 6 as a candidate
        poisoned = cand[..., 6]
    assert poisoned.any(), "the case must poison some row"
    # rows without key 6 may or may not meet its value (0 * NaN): only the rows with it are compared
    compared = poisoned if where == "v" else np.ones_like(poisoned)
    for got in (o, o_ref):
        np.testing.assert_array_equal(nonfinite_rows(got)[compared], poisoned[compared])
    if where != "v":
        np.testing.assert_array_equal(np.isnan(lse), poisoned)
        np.testing.assert_array_equal(np.isnan(lse_ref), poisoned)
