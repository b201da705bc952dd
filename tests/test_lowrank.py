"""Low-rank path: the mirrors of A·X and Aᵀ·Y against the dense A, the GPU operators against
both (bit for bit in float64), the randomized SVD against sklearn and Eckart–Young, the
error estimate against the true error, rank="auto", the peers on hand-checkable cases, the
public driver on both backends, method="lowrank" in the registry, and every bad input.

Kernel tests run a tiny grid under the simulator (8 x 8 tiles, TX = 4) and the full grid
on a GPU, plus the `gpu`-marked ones (many repeats).
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from numba import cuda
from scipy import stats
from sklearn.utils.extmath import randomized_svd

import nkattn
from nkattn import figures
from nkattn import lowrank as lowrank_driver
from nkattn.api import plan
from nkattn.cuda_kernels import lowrank as kernels
from nkattn.cuda_kernels.exact import exact_attention
from nkattn.cuda_kernels.lowrank import (
    MAX_WIDTH,
    attention_times,
    attention_transpose_times,
    max_width,
)
from nkattn.cuda_kernels.online_softmax import SIMULATOR_ORDER, kernel_order
from nkattn.lowrank import LowRankFactors, lowrank_attention, lowrank_factors
from nkattn.methods import METHODS
from nkattn.reference import bert
from nkattn.reference import lowrank as lr
from nkattn.reference import lowrank_peers as peers
from nkattn.reference.exact import attention_ref, streaming_order, visible_key_counts
from nkattn.results import read_results
from nkattn.studies import lowrank as study
from nkattn.studies import lowrank_plots as plots
from nkattn.testing import (
    assert_bit_identical,
    nan_padded_device_view,
    relative_error,
)

from .conftest import REAL_GPU, SIMULATOR, check_float32

# --------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------


def case(b, h, hkv, nq, nk, d, l, causal=False, dtype=np.float64, key_lengths=None):
    cid = (
        f"B{b}-H{h}-Hkv{hkv}-Nq{nq}-Nk{nk}-d{d}-l{l}{'-causal' if causal else ''}{'-kl' if key_lengths else ''}"
        f"-f{np.dtype(dtype).itemsize * 8}"
    )
    params = {"b": b, "h": h, "hkv": hkv, "nq": nq, "nk": nk, "d": d, "l": l, "causal": causal, "dtype": dtype,
              "key_lengths": key_lengths}
    return pytest.param(params, id=cid)


# references (float64, on the host): the float64 order at d <= 64 has 64-row and 64-key tiles;
# these cross them, leave tails, hide whole batches (key length 0), leave empty causal rows
# (Nq > Nk) and run the kernels' widest chunked dot (d = 64) at a padded width (l = 42)
REFERENCE_GRID = [
    case(1, 1, 1, 1, 1, 16, 1),
    case(2, 4, 2, 37, 70, 16, 5, causal=True, key_lengths=(70, 30)),
    case(1, 2, 1, 130, 17, 32, 3, causal=True),
    case(2, 2, 2, 17, 129, 16, 9, key_lengths=(129, 0)),
    case(2, 4, 2, 37, 153, 64, 42, causal=True, key_lengths=(153, 20)),
]

# kernels under the simulator: 8 x 8 tiles with TX = 4, so widths 4 and 8 run as they are, 1, 6, 10 and 13
# padded (13 to 16 = d: V's rows are narrower than K's though the tiles are as wide)
SIM_GRID = [
    case(1, 1, 1, 1, 1, 16, 1),
    case(1, 2, 1, 9, 10, 16, 13, causal=True),
    case(2, 2, 1, 9, 12, 16, 6, causal=True, key_lengths=(12, 5)),
    case(1, 2, 2, 17, 7, 16, 4, causal=True),
    case(1, 1, 1, 8, 16, 32, 10),
    case(1, 2, 1, 7, 9, 16, 8, causal=True, dtype=np.float32),
    case(2, 1, 1, 9, 8, 16, 5, dtype=np.float32, key_lengths=(0, 8)),
]

# kernels on the GPU: tiles of float32 128 keys (rows) x 64, float64 64 x 64; TX = 16, so l = 42 runs as 48,
# and l = 50 at d = 64 and l = 5 at d = 16 as wide as d
GPU_SIZES = [(1, 1), (63, 63), (64, 64), (65, 65), (127, 129), (129, 127), (113, 203), (203, 113)]
GPU_GRID = [
    case(2, 3, 1, nq, nk, d, l, causal, dtype)
    for dtype in (np.float64, np.float32)
    for d in (32, 64, 128)
    for n, (nq, nk) in enumerate(GPU_SIZES)
    for causal in (False, True)
    for l in [(42, 16, d, 1)[n % 4] if d == 64 else 42]
] + [
    case(3, 4, 2, 257, 300, 64, 42, True, np.float32, key_lengths=(300, 0, 77)),
    case(3, 4, 2, 300, 257, 64, 100, True, np.float64, key_lengths=(1, 150, 257)),
    case(1, 2, 1, 130, 70, 16, 42, False, np.float64),
    case(1, 2, 1, 70, 130, 256, 42, True, np.float32),
    case(2, 2, 1, 129, 70, 64, 50, True, np.float64, key_lengths=(70, 33)),
    case(1, 2, 1, 70, 129, 16, 5, False, np.float32),
]

KERNEL_GRID = GPU_GRID if REAL_GPU else SIM_GRID


def make_inputs(c, seed=0):
    """q, k, x (B, Hkv, Nk, l) and y (B, H, Nq, l) in the case's dtype."""
    rng = np.random.default_rng(seed)
    dtype = c["dtype"]
    q = rng.standard_normal((c["b"], c["h"], c["nq"], c["d"])).astype(dtype)
    k = rng.standard_normal((c["b"], c["hkv"], c["nk"], c["d"])).astype(dtype)
    x = rng.standard_normal((c["b"], c["hkv"], c["nk"], c["l"])).astype(dtype)
    y = rng.standard_normal((c["b"], c["h"], c["nq"], c["l"])).astype(dtype)
    return q, k, x, y


def random_qk(b, h, hkv, nq, nk, d, *, seed=0, spread=1.0):
    rng = np.random.default_rng(seed)
    return spread * rng.standard_normal((b, h, nq, d)), spread * rng.standard_normal((b, hkv, nk, d))


def make_qk(c, seed=0, spread=1.0):
    return random_qk(c["b"], c["h"], c["hkv"], c["nq"], c["nk"], c["d"], seed=seed, spread=spread)


def masks(c):
    return {"causal": c["causal"], "key_lengths": c["key_lengths"]}


def scale_of(c):
    return 1.0 / np.sqrt(c["d"])


def planted(classes=8, n=96, d=16, strength=2.0, heads=1):
    """q = k = strength · e_{i mod classes}: A = α P + γ 11ᵀ with σ = (1, λ, ..., λ, 0, ...),
    λ = (t - 1) / (t + classes - 1), t = exp(strength² / sqrt(d)) (P: same-class indicator)."""
    x = np.zeros((1, heads, n, d))
    x[..., np.arange(n), np.arange(n) % classes] = strength
    t = np.exp(strength**2 / np.sqrt(d))
    return x, x.copy(), (t - 1) / (t + classes - 1)


# --------------------------------------------------------------------------------------
# references: the mirrors of A·X and Aᵀ·Y against the dense oracle
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("canonical", [True, False], ids=["canonical-order", "simulator-order"])
@pytest.mark.parametrize("c", REFERENCE_GRID)
def test_mirrors_match_dense_products(c, canonical):
    q, k, x, y = make_inputs(c)
    order = streaming_order(np.float64, c["d"]) if canonical else SIMULATOR_ORDER
    a, lse_dense = lr.attention_matrix(q, k, **masks(c), return_lse=True)
    group = c["h"] // c["hkv"]

    ax, lse = lr.attention_times_ref(q, k, x, c["key_lengths"], causal=c["causal"], order=order)
    assert relative_error(ax, a @ np.repeat(x, group, axis=1)) <= 1e-14
    assert relative_error(lse, attention_ref(q, k, k, **masks(c))[1]) <= 1e-14
    assert relative_error(lse, lse_dense) <= 1e-14

    aty = lr.attention_transpose_times_ref(q, k, y, lse, c["key_lengths"], causal=c["causal"], order=order)
    assert relative_error(aty, np.swapaxes(a, -1, -2) @ y) <= 1e-14
    # a key's bits depend on nothing else: a sample of keys (for checks at large N) is exact
    keys = np.unique([0, c["nk"] // 2, c["nk"] - 1])
    sample = lr.attention_transpose_times_ref(q, k, y, lse, c["key_lengths"], causal=c["causal"], order=order,
                                              keys=keys)
    assert_bit_identical("AᵀY[keys]", sample, aty[:, :, keys])

    # an X per query head, through the per-key-head operator in G calls
    x_heads = np.random.default_rng(1).standard_normal((c["b"], c["h"], c["nk"], c["l"]))
    ax_heads, _ = lr.times_per_query_head(lr.attention_times_ref, q, k, x_heads, order=order, **masks(c))
    assert relative_error(ax_heads, a @ x_heads) <= 1e-14

    empty = ~np.isfinite(lse)
    assert np.array_equal(empty, (a == 0).all(axis=-1))
    assert (ax[empty] == 0).all() and (ax_heads[empty] == 0).all()


def test_operator_shapes_are_checked():
    q, k = np.zeros((1, 2, 5, 16)), np.zeros((1, 1, 7, 16))
    with pytest.raises(ValueError, match="x must have shape"):
        lr.attention_times_ref(q, k, np.zeros((1, 2, 7, 3)))  # X is per key head
    with pytest.raises(ValueError, match="y must have shape"):
        lr.attention_transpose_times_ref(q, k, np.zeros((1, 1, 5, 3)), np.zeros((1, 2, 5)))
    with pytest.raises(ValueError, match="lse must have shape"):
        lr.attention_transpose_times_ref(q, k, np.zeros((1, 2, 5, 3)), np.zeros((1, 1, 5)))


# --------------------------------------------------------------------------------------
# GPU operators (nkattn.cuda_kernels.lowrank) against the dense float64 A and the mirrors
# --------------------------------------------------------------------------------------


def attention_matrix32(q, k, *, causal, scale, key_lengths):
    """A computed in float32, the naive formula of the float32 error budget: exact attention's
    oracle in float32 with the identity as values (row i of A is O_i for V = I)."""
    batch, kv_heads, nk, _ = k.shape
    eye = np.broadcast_to(np.eye(nk, dtype=np.float32), (batch, kv_heads, nk, nk))
    a, _ = attention_ref(q, k, eye, causal=causal, scale=scale, key_lengths=key_lengths, compute_dtype=np.float32)
    return a


def transpose_formula(q, k, y, lse, *, causal, scale, key_lengths, compute_dtype):
    """Aᵀ·Y from the operator's definition with a given lse, computed in `compute_dtype`."""
    q, k, y, lse = (np.asarray(a, dtype=compute_dtype) for a in (q, k, y, lse))
    k = np.repeat(k, q.shape[1] // k.shape[1], axis=1)
    s = np.einsum("bhqd,bhkd->bhqk", q, k) * compute_dtype(scale)
    counts = visible_key_counts(q.shape[0], q.shape[2], k.shape[2], causal, key_lengths)
    visible = np.arange(k.shape[2])[None, None, None, :] < counts[:, None, :, None]
    with np.errstate(invalid="ignore", over="ignore"):
        p = np.where(visible, np.exp(np.where(visible, s - lse[..., None], -np.inf)), compute_dtype(0))
    return np.einsum("bhqk,bhql->bhkl", p, y)


def run_times(q, k, x, c):
    o, lse = attention_times(q, k, x, c["key_lengths"], causal=c["causal"], scale=scale_of(c))
    return o.copy_to_host(), lse.copy_to_host()


def run_transpose(q, k, y, lse, c):
    return attention_transpose_times(q, k, y, lse, c["key_lengths"], causal=c["causal"], scale=scale_of(c)).copy_to_host()


@pytest.mark.parametrize("c", KERNEL_GRID)
def test_products_against_dense_float64_and_mirror(c):
    q, k, x, y = make_inputs(c)
    masks_ = {"causal": c["causal"], "scale": scale_of(c), "key_lengths": c["key_lengths"]}
    ax, lse = run_times(q, k, x, c)
    aty = run_transpose(q, k, y, lse, c)

    group = c["h"] // c["hkv"]
    a, lse_ref = lr.attention_matrix(q, k, return_lse=True, **masks_)
    ax_ref = np.einsum("bhqk,bhkl->bhql", a, np.repeat(x, group, axis=1).astype(np.float64))
    aty_ref = np.einsum("bhqk,bhql->bhkl", a, y.astype(np.float64))
    if c["dtype"] == np.float64:
        assert relative_error(ax, ax_ref) <= 1e-12, "A·X"
        assert relative_error(lse, lse_ref) <= 1e-12, "lse"
        assert relative_error(aty, aty_ref) <= 1e-12, "AᵀY"
        # the kernels' exact order: bit for bit
        order = kernel_order(np.float64, c["d"])
        ax_mirror, lse_mirror = lr.attention_times_ref(q, k, x, order=order, **masks_)
        assert_bit_identical("A·X", ax, ax_mirror)
        assert_bit_identical("lse", lse, lse_mirror)
        assert_bit_identical("AᵀY", aty, lr.attention_transpose_times_ref(q, k, y, lse, order=order, **masks_))
    else:
        a32 = attention_matrix32(q, k, **masks_)
        _, lse32 = attention_ref(q, k, x, compute_dtype=np.float32, **masks_)
        check_float32("A·X", ax, ax_ref, a32 @ np.repeat(x, group, axis=1))
        check_float32("lse", lse, lse_ref, lse32)
        check_float32("AᵀY", aty, aty_ref, np.einsum("bhqk,bhql->bhkl", a32, y))
        # the operator alone, given the float32 lse it was handed
        given_lse = dict(lse=lse, **masks_)
        check_float32(
            "AᵀY (given lse)", aty,
            transpose_formula(q, k, y, compute_dtype=np.float64, **given_lse),
            transpose_formula(q, k, y, compute_dtype=np.float32, **given_lse),
        )


def test_adjoint_identity_and_width_d_is_the_exact_kernel():
    # <A X, Y> = <X, Aᵀ Y> summed over a kv head's query heads; and at l = d, A·X is exact attention
    c = {"b": 1, "h": 2, "hkv": 1, "nq": 5, "nk": 9, "d": 16, "l": 16, "causal": True, "dtype": np.float64, "key_lengths": None}
    q, k, x, y = make_inputs(c, seed=3)
    ax, lse = run_times(q, k, x, c)
    aty = run_transpose(q, k, y, lse, c)
    lhs = np.sum(ax * y)
    rhs = np.sum(x[:, 0] * aty.sum(axis=1))
    assert abs(lhs - rhs) <= 1e-13 * (np.abs(ax * y).sum())
    lengths = cuda.to_device(np.array([c["nk"]], dtype=np.int32))
    o, lse_exact = exact_attention(*(cuda.to_device(a) for a in (q, k, x)), lengths, causal=True, scale=scale_of(c))
    assert_bit_identical("A·X", ax, o.copy_to_host())
    assert_bit_identical("lse", lse, lse_exact.copy_to_host())


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_empty_rows_and_unseen_keys_are_zero_and_every_element_is_written(dtype):
    # causal with Nq > Nk: the first Nq - Nk rows see nothing; batch 1 has no keys at all;
    # keys past key_lengths are seen by no row
    c = {"b": 2, "h": 2, "hkv": 1, "nq": 12, "nk": 6, "d": 16, "l": 6, "causal": True, "dtype": dtype, "key_lengths": (4, 0)}
    q, k, x, y = make_inputs(c, seed=4)
    out = cuda.to_device(np.full((2, 2, 12, 6), np.nan, dtype=dtype))
    lse = cuda.to_device(np.full((2, 2, 12), np.nan, dtype=dtype))
    out_t = cuda.to_device(np.full((2, 2, 6, 6), np.nan, dtype=dtype))
    attention_times(q, k, x, c["key_lengths"], causal=True, scale=0.25, out=out, lse=lse)
    attention_transpose_times(q, k, y, lse, c["key_lengths"], causal=True, scale=0.25, out=out_t)
    ax, lse, aty = out.copy_to_host(), lse.copy_to_host(), out_t.copy_to_host()
    assert not np.isnan(ax).any() and not np.isnan(lse).any() and not np.isnan(aty).any()
    # batch 0 sees 4 keys: rows i see keys j <= i - 8, so rows 0..7 are empty
    assert (ax[0, :, :8] == 0).all() and (lse[0, :, :8] == -np.inf).all() and np.isfinite(lse[0, :, 8:]).all()
    assert (ax[1] == 0).all() and (lse[1] == -np.inf).all()
    assert (aty[0, :, 4:] == 0).all() and (aty[0, :, :4] != 0).all()
    assert (aty[1] == 0).all()


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_repeated_runs_are_bit_identical(dtype):
    if REAL_GPU:
        size = {"b": 2, "h": 2, "nq": 300, "nk": 517, "d": 64, "l": 42}
    else:
        size = {"b": 1, "h": 1, "nq": 9, "nk": 10, "d": 16, "l": 6}
    c = dict(hkv=1, causal=True, dtype=dtype, key_lengths=None, **size)
    q, k, x, y = make_inputs(c, seed=5)
    runs = []
    for _ in range(10 if REAL_GPU else 3):
        ax, lse = run_times(q, k, x, c)
        runs.append((ax, lse, run_transpose(q, k, y, lse, c)))
    for ax, lse, aty in runs[1:]:
        assert_bit_identical("A·X", ax, runs[0][0])
        assert_bit_identical("lse", lse, runs[0][1])
        assert_bit_identical("AᵀY", aty, runs[0][2])


def nan_padded_output(shape, dtype, pad=3):
    """(buffer, view): a NaN-filled device buffer and a strided view into its interior."""
    buf = cuda.to_device(np.full((shape[0] + 1, shape[1] + 2, shape[2] + 2 * pad, 2 * shape[3]), np.nan, dtype=dtype))
    return buf, buf[1:, 1 : shape[1] + 1, pad : pad + shape[2], shape[3] :]


def outside_view_is_nan(buf, shape, pad=3):
    host = buf.copy_to_host()
    host[1:, 1 : shape[1] + 1, pad : pad + shape[2], shape[3] :] = np.nan
    return np.isnan(host).all()


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_views_into_nan_padded_buffers(dtype):
    size = {"h": 2, "nq": 130, "nk": 203, "d": 32, "l": 42} if REAL_GPU else {"h": 1, "nq": 5, "nk": 12, "d": 16, "l": 6}
    c = dict(b=2, hkv=1, causal=True, dtype=dtype, key_lengths=(size["nk"], size["nk"] - 7), **size)
    q, k, x, y = make_inputs(c, seed=6)
    ax, lse = run_times(q, k, x, c)
    aty = run_transpose(q, k, y, lse, c)

    ax_shape, aty_shape = ax.shape, aty.shape
    ax_buf, ax_view = nan_padded_output(ax_shape, dtype)
    aty_buf, aty_view = nan_padded_output(aty_shape, dtype)
    lse_buf, lse_view = nan_padded_output(lse.shape + (1,), dtype)
    views = [nan_padded_device_view(a) for a in (q, k, x, y)]
    attention_times(views[0], views[1], views[2], c["key_lengths"], causal=True, scale=scale_of(c), out=ax_view, lse=lse_view[:, :, :, 0])
    lse_in = nan_padded_device_view(lse[..., None])[:, :, :, 0]
    attention_transpose_times(views[0], views[1], views[3], lse_in, c["key_lengths"], causal=True, scale=scale_of(c), out=aty_view)
    assert_bit_identical("A·X", ax_view.copy_to_host(), ax)
    assert_bit_identical("lse", lse_view.copy_to_host()[..., 0], lse)
    assert_bit_identical("AᵀY", aty_view.copy_to_host(), aty)
    assert outside_view_is_nan(ax_buf, ax_shape), "A·X wrote outside its output"
    assert outside_view_is_nan(lse_buf, lse.shape + (1,)), "A·X wrote outside its lse"
    assert outside_view_is_nan(aty_buf, aty_shape), "AᵀY wrote outside its output"
    for name, view, a in zip("qkxy", views, (q, k, x, y), strict=True):
        assert_bit_identical(f"{name} after the calls", view.copy_to_host(), a)
    assert_bit_identical("lse after the call", lse_in.copy_to_host(), lse)


@settings(max_examples=3 if SIMULATOR else 40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    b=st.integers(1, 2),
    hkv=st.integers(1, 2),
    group=st.integers(1, 2),
    nq=st.integers(1, 12 if SIMULATOR else 300),
    nk=st.integers(1, 12 if SIMULATOR else 300),
    # on the GPU every (d, l) is a compilation: a few widths, most shared with the grid
    d=st.sampled_from([16] if SIMULATOR else [16, 64]),
    l=st.integers(1, 10) if SIMULATOR else st.sampled_from([1, 42, 64]),
    causal=st.booleans(),
    masked=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_float64_products_match_mirrors_and_dense(b, hkv, group, nq, nk, d, l, causal, masked, seed):
    rng = np.random.default_rng(seed)
    key_lengths = tuple(int(n) for n in rng.integers(0, nk + 1, size=b)) if masked else None
    c = {"b": b, "h": hkv * group, "hkv": hkv, "nq": nq, "nk": nk, "d": d, "l": l, "causal": causal,
         "dtype": np.float64, "key_lengths": key_lengths}
    q, k, x, y = make_inputs(c, seed=seed)
    ax, lse = run_times(q, k, x, c)
    aty = run_transpose(q, k, y, lse, c)
    masks = {"causal": causal, "scale": scale_of(c), "key_lengths": key_lengths}
    order = kernel_order(np.float64, d)
    ax_mirror, lse_mirror = lr.attention_times_ref(q, k, x, order=order, **masks)
    assert_bit_identical("A·X", ax, ax_mirror)
    assert_bit_identical("lse", lse, lse_mirror)
    assert_bit_identical("AᵀY", aty, lr.attention_transpose_times_ref(q, k, y, lse, order=order, **masks))
    a = lr.attention_matrix(q, k, **masks)
    assert relative_error(ax, np.einsum("bhqk,bhkl->bhql", a, np.repeat(x, group, axis=1))) <= 1e-12
    assert relative_error(aty, np.einsum("bhqk,bhql->bhkl", a, y)) <= 1e-12


def test_bad_inputs_are_refused_with_the_argument_named():
    rng = np.random.default_rng(7)
    q = rng.standard_normal((2, 4, 5, 16))
    k = rng.standard_normal((2, 2, 7, 16))
    x = rng.standard_normal((2, 2, 7, 3))
    y = rng.standard_normal((2, 4, 5, 3))
    lse = np.zeros((2, 4, 5))
    times = {"causal": False, "scale": 0.25}

    def refuses_times(error, match, **change):
        args = {"q": q, "k": k, "x": x, "key_lengths": None} | change
        with pytest.raises(error, match=match):
            attention_times(args["q"], args["k"], args["x"], args["key_lengths"], **(times | args.get("kw", {})))

    def refuses_transpose(error, match, **change):
        args = {"q": q, "k": k, "y": y, "lse": lse, "key_lengths": None} | change
        with pytest.raises(error, match=match):
            attention_transpose_times(args["q"], args["k"], args["y"], args["lse"], args["key_lengths"], **(times | args.get("kw", {})))

    refuses_times(ValueError, "^x must be", x=x[:, :, :6])
    refuses_times(ValueError, "^x must be", x=rng.standard_normal((2, 4, 7, 3)))
    refuses_times(ValueError, "^x's width", x=np.zeros((2, 2, 7, 0)))
    refuses_times(ValueError, "^x's width", x=np.zeros((2, 2, 7, MAX_WIDTH + 1)))
    refuses_times(ValueError, "^k must be", k=k[..., :8])
    refuses_times(ValueError, "^k must be", k=k[:1])
    refuses_times(ValueError, "heads", k=rng.standard_normal((2, 3, 7, 16)), x=rng.standard_normal((2, 3, 7, 3)))
    refuses_times(ValueError, "^q must have 4", q=q[0])
    refuses_times(ValueError, "head dim", q=q[..., :8], k=k[..., :8])
    refuses_times(TypeError, "^x must have q's dtype", x=x.astype(np.float32))
    refuses_times(TypeError, "^q must be float32 or float64", q=q.astype(np.float16), k=k.astype(np.float16), x=x.astype(np.float16))
    refuses_times(ValueError, "^key_lengths must lie", key_lengths=[7, 8])
    refuses_times(ValueError, "^key_lengths must be 2", key_lengths=[7])
    refuses_times(ValueError, "^scale", kw={"scale": float("nan")})
    refuses_times(TypeError, "^out must be a device array", kw={"out": np.zeros((2, 4, 5, 3))})
    refuses_times(ValueError, "^out must be", kw={"out": cuda.to_device(np.zeros((2, 4, 5, 4)))})
    refuses_times(ValueError, "^lse must be", kw={"lse": cuda.to_device(np.zeros((2, 4, 6)))})

    refuses_transpose(ValueError, "^y must be", y=y[:, :2])
    refuses_transpose(ValueError, "^y must be", y=y[:, :, :4])
    refuses_transpose(ValueError, "^y's width", y=np.zeros((2, 4, 5, MAX_WIDTH + 1)))
    refuses_transpose(ValueError, "^lse must be", lse=lse[:, :, :4])
    refuses_transpose(ValueError, "^lse must be", lse=lse[..., None])
    refuses_transpose(ValueError, "^lse must be", lse=lse.astype(np.float32))
    refuses_transpose(TypeError, "^y must have q's dtype", y=y.astype(np.float32))
    refuses_transpose(ValueError, "^out must be", kw={"out": cuda.to_device(np.zeros((2, 4, 5, 3)))})


def test_outputs_written_in_place_are_checked():
    """out= and lse= (the buffers the low-rank driver reuses across passes): device arrays of the
    right shape and dtype that overlap nothing the kernel reads; views into a larger buffer are fine."""
    rng = np.random.default_rng(7)
    q, k = (cuda.to_device(rng.standard_normal(s)) for s in ((1, 2, 5, 16), (1, 1, 7, 16)))
    times = {"causal": False, "scale": 0.25}
    buf = cuda.to_device(rng.standard_normal((2, 1, 2, 7, 3)))  # two slots, as the driver holds them
    x, ax = buf[0][:, :1], buf[1][:, :, :5]
    _, lse = attention_times(q, k, x, **times, out=ax)
    attention_transpose_times(q, k, ax, lse, **times, out=buf[0])

    def refuses(error, match, fn, *args, **kw):
        with pytest.raises(error, match=match):
            fn(q, k, *args, **times, **kw)

    refuses(TypeError, "^out must be a device array", attention_times, x, out=np.zeros((1, 2, 5, 3)))
    refuses(TypeError, "^lse must be a device array", attention_times, x, lse=np.zeros((1, 2, 5)))
    refuses(ValueError, r"^out must be float64 of shape \(1, 2, 5, 3\), got float32 \(1, 2, 5, 3\)",
            attention_times, x, out=cuda.device_array((1, 2, 5, 3), dtype=np.float32))
    refuses(ValueError, "^out must not overlap x", attention_times, x, out=buf[0][:, :, :5])
    refuses(ValueError, "^out must not overlap q", attention_times, x, out=q.reshape(-1)[:30].reshape((1, 2, 5, 3)))
    refuses(ValueError, "^lse must not overlap out", attention_times, x, out=ax, lse=ax[..., 0])
    refuses(ValueError, "^out must not overlap y", attention_transpose_times, ax, lse, out=buf[1])
    refuses(ValueError, "^out must not overlap k", attention_transpose_times, ax, lse,
            out=k.reshape(-1)[:42].reshape((1, 2, 7, 3)))


class DeviceViewStub:
    """What the GPU's overlap check reads of an array: its __cuda_array_interface__ (a NumPy
    view's, so the answer can be checked against np.may_share_memory)."""

    def __init__(self, view):
        self.view, self.size = view, view.size
        interface = view.__array_interface__
        self.__cuda_array_interface__ = {key: interface[key] for key in ("shape", "strides", "typestr", "data")}


def test_overlap_by_extent_on_the_gpu_path():
    base = np.zeros((2, 6, 8))
    views = [base[0], base[1], base[0, :, :4], base[0, :, 4:], base[:, ::2], base[0, ::-1], base[1, 5:, 7:], base[:0]]
    for a in views:
        for b in views:
            assert kernels._may_overlap(DeviceViewStub(a), DeviceViewStub(b)) == np.may_share_memory(a, b)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_max_width_is_the_widest_product_the_operators_take(dtype):
    # d = 64: on the GPU float64 runs out of shared memory below MAX_WIDTH
    width = max_width(dtype, 64)
    assert 1 <= width <= MAX_WIDTH
    rng = np.random.default_rng(9)
    q, k = (rng.standard_normal((1, 1, n, 64)).astype(dtype) for n in (1, 2))
    x = rng.standard_normal((1, 1, 2, width + 1)).astype(dtype)
    y = rng.standard_normal((1, 1, 1, width + 1)).astype(dtype)
    _, lse = attention_times(q, k, x[..., :width], causal=False, scale=0.125)
    attention_transpose_times(q, k, y[..., :width], lse, causal=False, scale=0.125)
    with pytest.raises(ValueError, match="^x's width"):
        attention_times(q, k, x, causal=False, scale=0.125)
    with pytest.raises(ValueError, match="^y's width"):
        attention_transpose_times(q, k, y, lse, causal=False, scale=0.125)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_many_repeated_gpu_runs_are_bit_identical(dtype):
    c = {"b": 2, "h": 8, "hkv": 2, "nq": 1000, "nk": 1531, "d": 64, "l": 42, "dtype": dtype}
    q, k, x, y = (cuda.to_device(a) for a in make_inputs(c, seed=8))
    lengths = cuda.to_device(np.array([1531, 900], dtype=np.int32))
    ax, lse = attention_times(q, k, x, lengths, causal=True, scale=0.125)
    first = [ax.copy_to_host(), lse.copy_to_host(), attention_transpose_times(q, k, y, lse, lengths, causal=True, scale=0.125).copy_to_host()]
    for _ in range(100):
        ax, lse = attention_times(q, k, x, lengths, causal=True, scale=0.125)
        aty = attention_transpose_times(q, k, y, lse, lengths, causal=True, scale=0.125)
        assert_bit_identical("A·X", ax.copy_to_host(), first[0])
        assert_bit_identical("lse", lse.copy_to_host(), first[1])
        assert_bit_identical("AᵀY", aty.copy_to_host(), first[2])


# --------------------------------------------------------------------------------------
# randomized SVD
# --------------------------------------------------------------------------------------


def product(u, s, vt):
    return u @ (s[..., :, None] * vt)


def on_host(x):
    """A factor as NumPy: `LowRankFactors` holds CuPy arrays where the linear algebra ran on the GPU
    (device inputs with CuPy installed, as on the GPU machine)."""
    return x.get() if type(x).__module__.startswith("cupy") else np.asarray(x)


@pytest.mark.parametrize("power_iters", [0, 2])
def test_mirror_equals_dense_rsvd_for_the_same_seed(power_iters):
    c = REFERENCE_GRID[1].values[0]
    q, k = make_qk(c, seed=3, spread=0.7)
    a = lr.attention_matrix(q, k, **masks(c))
    u, s, vt, _ = lr.randomized_svd_mirror(q, k, 6, oversample=4, power_iters=power_iters, seed=11, **masks(c))
    u_d, s_d, vt_d = lr.randomized_svd_ref(a, 6, oversample=4, power_iters=power_iters, seed=11)
    assert relative_error(s, s_d) <= 1e-12
    assert relative_error(product(u, s, vt), product(u_d, s_d, vt_d)) <= 1e-11


def test_full_width_rsvd_is_the_exact_svd():
    q, k = random_qk(1, 2, 2, 30, 20, 16)
    a = lr.attention_matrix(q, k)
    u, s, vt = lr.randomized_svd_ref(a, 20, power_iters=0)
    _, s_exact, _ = lr.attention_svd(q, k)
    assert relative_error(s, s_exact) <= 1e-12
    assert relative_error(product(u, s, vt), a) <= 1e-12


def slow_decay_matrix():
    """One attention head with a slowly decaying spectrum, where rSVD errors sit visibly above Eckart–Young."""
    q, k = random_qk(1, 1, 1, 120, 100, 16, seed=5, spread=0.6)
    return lr.attention_matrix(q, k)[0, 0]


@pytest.mark.parametrize("power_iters", [0, 1])
def test_rsvd_matches_sklearn_statistically_against_eckart_young(power_iters):
    """Frobenius error / Eckart–Young optimum over seeds 0-99: ours and sklearn's (QR
    normaliser, same oversampling and iterations, no transpose) come from one distribution."""
    a = slow_decay_matrix()
    rank, oversample = 10, 5
    sv = np.linalg.svd(a, compute_uv=False)
    optimum = np.sqrt((sv[rank:] ** 2).sum())
    ours, theirs = [], []
    for seed in range(100):
        u, s, vt = lr.randomized_svd_ref(a, rank, oversample=oversample, power_iters=power_iters, seed=seed)
        ours.append(np.linalg.norm(a - product(u, s, vt)) / optimum)
        u, s, vt = randomized_svd(a, rank, n_oversamples=oversample, n_iter=power_iters,
                                  power_iteration_normalizer="QR", transpose=False, flip_sign=False,
                                  random_state=seed)
        theirs.append(np.linalg.norm(a - product(u, s, vt)) / optimum)
    ours, theirs = np.array(ours), np.array(theirs)
    assert ours.min() >= 1 - 1e-12 and theirs.min() >= 1 - 1e-12  # nobody beats Eckart–Young
    assert ours.mean() > 1.001  # the case is not trivial: the errors are above the optimum
    z = (ours.mean() - theirs.mean()) / np.sqrt(ours.var(ddof=1) / 100 + theirs.var(ddof=1) / 100)
    assert abs(z) < 4, (ours.mean(), theirs.mean(), z)
    assert stats.ks_2samp(ours, theirs).pvalue > 1e-3


def test_power_iterations_reduce_the_error():
    a = slow_decay_matrix()
    errors = [
        np.mean([np.linalg.norm(a - product(*lr.randomized_svd_ref(a, 10, oversample=5, power_iters=it, seed=s)))
                 for s in range(20)])
        for it in (0, 1, 2)
    ]
    assert errors[0] > errors[1] > errors[2]


def test_driver_matches_the_mirror():
    c = REFERENCE_GRID[1].values[0]
    q, k = make_qk(c, seed=3, spread=0.7)
    f = lowrank_factors(q, k, rank=6, oversample=4, power_iters=1, seed=11, backend="reference", **masks(c))
    u, s, vt, lse = lr.randomized_svd_mirror(q, k, 6, oversample=4, power_iters=1, seed=11, **masks(c))
    assert isinstance(f, LowRankFactors) and (f.rank == 6).all()
    assert relative_error(f.sigma, s) <= 1e-12
    assert relative_error(product(f.U, f.sigma, f.Vt), product(u, s, vt)) <= 1e-11
    assert relative_error(f.lse, lse) <= 1e-12


@pytest.mark.parametrize("c", REFERENCE_GRID[1:])
def test_full_rank_reproduces_exact_attention(c):
    q, k = make_qk(c)
    v = np.random.default_rng(2).standard_normal((c["b"], c["hkv"], c["nk"], 24))  # dv != d is allowed
    out, lse = lowrank_attention(q, k, v, rank=min(c["nq"], c["nk"]), **masks(c))
    out_ref, lse_ref = attention_ref(q, k, v, **masks(c))
    assert relative_error(out, out_ref) <= 1e-12
    assert relative_error(lse, lse_ref) <= 1e-12
    assert (out[~np.isfinite(lse_ref)] == 0).all()


def test_outputs_keep_the_input_dtype():
    q, k = make_qk(REFERENCE_GRID[1].values[0])
    v = np.ones((2, 2, 70, 16))
    out, lse = lowrank_attention(q.astype(np.float32), k.astype(np.float32), v.astype(np.float32), rank=4)
    assert out.dtype == np.float32 and lse.dtype == np.float32 and out.shape == (2, 4, 37, 16)


# --------------------------------------------------------------------------------------
# error estimate and rank="auto"
# --------------------------------------------------------------------------------------


def test_error_estimate_is_unbiased_and_the_bound_holds():
    """Over seeds 0-99: estimate² / ‖E‖_F² has mean 1 (z-test with the exact variance
    2 Σs⁴ / (r (Σs²)²) of each seed's E), and ‖E‖₂ <= bound every time."""
    q, k = random_qk(1, 1, 1, 60, 50, 16, seed=5, spread=0.6)
    a = lr.attention_matrix(q, k)[0, 0]
    ratios, variances = [], []
    for seed in range(100):
        f = lowrank_factors(q, k, rank=5, oversample=3, power_iters=0, seed=seed, backend="reference")
        s = np.linalg.svd(a - product(f.U, f.sigma, f.Vt)[0, 0], compute_uv=False)
        ratios.append(f.error_estimate[0, 0] ** 2 / (s**2).sum())
        variances.append(2 * (s**4).sum() / (lr.ERROR_PROBES * (s**2).sum() ** 2))
        assert f.error_bound[0, 0] >= s[0]
    z = (np.sum(ratios) - 100) / np.sqrt(np.sum(variances))
    assert abs(z) < 4, z


def test_auto_rank_on_a_planted_spectrum():
    """σ = (1, λ x 7, 0, ...): the energy rule's rank is known in closed form, and rank 8 is exact."""
    q, k, lam = planted(classes=8)
    v = np.random.default_rng(0).standard_normal((1, 1, 96, 16))
    total = 1 + 7 * lam**2
    for energy in (0.3, 0.6, 0.8, 0.95):
        expected = 1 + int(np.ceil(max(energy * total - 1, 0) / lam**2))
        assert lowrank_factors(q, k, rank="auto", energy=energy).rank[0, 0] == expected
    f = lowrank_factors(q, k, v, rank="auto", tolerance=1e-9)
    assert f.rank[0, 0] <= 8 and f.output_error[0, 0] <= 1e-9


def test_auto_rank_meets_the_tolerance_across_doublings():
    """Heads that need ranks on both sides of the first trial (16): each meets the budget,
    checked against dense A·V from the returned factors (so the assembly is checked too)."""
    rng = np.random.default_rng(4)
    n, d = 80, 16
    low, _, _ = planted(classes=4, n=n, d=d, heads=1)  # rank 4
    q = np.concatenate([low, rng.standard_normal((1, 2, n, d)) * np.array([1.0, 3.0])[:, None, None]], axis=1)
    k = np.concatenate([low, rng.standard_normal((1, 2, n, d))], axis=1)
    v = rng.standard_normal((1, 3, n, d))
    a = lr.attention_matrix(q, k)
    exact = a @ v
    for tolerance in (0.1, 0.01):
        f = lowrank_factors(q, k, v, rank="auto", tolerance=tolerance)
        assert f.rank[0, 0] < 16 < f.rank[0, 2]  # decided by different sketches
        approx = product(f.U, f.sigma, f.Vt) @ v
        error = np.linalg.norm(approx - exact, axis=(-2, -1)) / np.linalg.norm(exact, axis=(-2, -1))
        assert (error <= tolerance).all() and np.allclose(error, f.output_error, rtol=1e-9)
        for h in range(3):  # components beyond a head's rank are zero
            assert (f.sigma[0, h, f.rank[0, h]:] == 0).all() and (f.U[0, h, :, f.rank[0, h]:] == 0).all()
    out, _ = lowrank_attention(q, k, v, rank="auto")
    assert relative_error(out, exact) <= 0.05  # the default 1% budget is per head, in the Frobenius norm


def test_energy_rule_counts_squared_singular_values():
    sv = np.array([3.0, 2.0, 1.0, 1.0, 1.0])  # energies 9, 4, 1, 1, 1 of 16
    ranks = [int(lr.first_rank_meeting(lr.energy_met(sv, 16.0, t))) for t in (0.5, 0.8, 0.85, 0.9, 0.95, 1.0)]
    assert ranks == [1, 2, 3, 4, 5, 5]
    assert lr.first_rank_meeting(lr.budget_met([0.5, 0.2, 0.0], 1.0, 0.1)) == 3
    assert lr.first_rank_meeting(lr.budget_met([0.5, 0.2], 1.0, 0.1)) == 0  # none meets
    assert lr.first_rank_meeting(lr.budget_met([0.0], 0.0, 0.1)) == 1  # zero output meets any budget


# --------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------

Q, K, V = np.zeros((1, 2, 6, 16)), np.zeros((1, 1, 5, 16)), np.zeros((1, 1, 5, 8))

BAD = [
    ({"rank": 0}, "rank"),
    ({"rank": 6}, "rank"),  # > min(Nq, Nk) = 5
    ({"rank": 2.5}, "rank"),
    ({"rank": True}, "rank"),
    ({"rank": "full"}, "rank"),
    ({"rank": 2, "oversample": -1}, "oversample"),
    ({"rank": 2, "oversample": 1.0}, "oversample"),
    ({"rank": 2, "power_iters": -1}, "power_iters"),
    ({"rank": 2, "seed": 1.5}, "seed"),
    ({"rank": 2, "seed": -1}, "seed"),
    ({"rank": 2, "seed": "0"}, "seed"),
    ({"rank": "auto", "energy": 0.0}, "energy"),
    ({"rank": "auto", "energy": 1.5}, "energy"),
    ({"rank": "auto", "energy": float("nan")}, "energy"),
    ({"rank": "auto", "tolerance": 0}, "tolerance"),
    ({"rank": "auto", "tolerance": -0.1}, "tolerance"),
    ({"rank": "auto", "tolerance": 2}, "tolerance"),
    ({"rank": 2, "energy": 0.9}, "energy"),  # a rule without rank="auto"
    ({"rank": 2, "backend": "gpu"}, "backend"),
    ({"rank": 2, "scale": -1.0}, "scale"),
    ({"rank": 2, "key_lengths": np.array([6])}, "key_lengths"),
    ({"rank": 2, "key_lengths": np.array([1, 2])}, "key_lengths"),
]


@pytest.mark.parametrize("kwargs, name", BAD, ids=[f"{n}={list(kw.values())[-1]!r}" for kw, n in BAD])
@pytest.mark.parametrize("fn", [lowrank_attention, lowrank_factors], ids=["attention", "factors"])
def test_bad_parameters_name_the_argument(fn, kwargs, name):
    with pytest.raises(ValueError, match=name):
        fn(Q, K, V, **kwargs)


@pytest.mark.parametrize(
    "q, k, v, match",
    [
        (Q, np.zeros((1, 3, 5, 16)), np.zeros((1, 3, 5, 8)), "multiple"),
        (Q, np.zeros((2, 1, 5, 16)), V, "batch"),
        (Q, K, np.zeros((1, 1, 4, 8)), "v must have shape"),
        (Q[0], K, V, "q must have rank 4"),
    ],
    ids=["heads", "batch", "v-length", "q-rank"],
)
def test_bad_shapes(q, k, v, match):
    with pytest.raises(ValueError, match=match):
        lowrank_attention(q, k, v, rank=2)


def test_bad_types_and_the_default_rule_without_v():
    with pytest.raises(TypeError, match="dtype"):
        lowrank_attention(Q.astype(np.int64), K, V, rank=2)
    with pytest.raises(TypeError, match="share one dtype"):
        lowrank_attention(Q.astype(np.float32), K, V, rank=2)
    with pytest.raises(TypeError, match="q must be a NumPy array"):
        lowrank_attention(Q.tolist(), K, V, rank=2)
    with pytest.raises(ValueError, match="needs v"):
        lowrank_factors(Q, K, rank="auto")


# --------------------------------------------------------------------------------------
# peers
# --------------------------------------------------------------------------------------


def test_linformer_with_permutation_projections_is_exact():
    """E = F = a permutation (k = N): softmax(q (Pk)ᵀ) P v = A Pᵀ P v = A v."""
    q, k = random_qk(2, 2, 1, 9, 12, 16)
    v = np.random.default_rng(1).standard_normal((2, 1, 12, 5))
    perm = np.eye(12)[np.random.default_rng(2).permutation(12)]
    left, right = peers.linformer_factors(q, k, 9, projections=(perm, perm))
    assert relative_error(peers.peer_output(left, right, v), attention_ref(q, k, v)[0]) <= 1e-13


def test_linformer_projections_are_seeded_jl_matrices():
    e, f = peers.linformer_projections(40, 500, seed=3)
    e2, _ = peers.linformer_projections(40, 500, seed=3)
    assert np.array_equal(e, e2) and not np.allclose(e, f)
    # 20,000 iid N(0, 1/k) entries each: k · mean square is 1 within 5 standard errors (sqrt(2 / n))
    for m in (e, f):
        assert abs(40 * (m**2).mean() - 1) < 5 * np.sqrt(2 / m.size)


def test_nystrom_with_every_key_a_landmark_is_exact():
    """k = N: the landmarks are q and k themselves, and F̃ A⁺ B̃ = A A⁺ A = A."""
    q, k = random_qk(1, 2, 2, 10, 10, 16, spread=0.5)
    left, right = peers.nystrom_factors(q, k, 10)
    assert relative_error(left @ right, lr.attention_matrix(q, k)) <= 1e-10


def test_nystrom_iterative_pinv_converges_to_the_inverse():
    q, k = random_qk(1, 1, 1, 8, 8, 16, spread=0.3)
    m = lr.attention_matrix(q, k)  # diffuse: well conditioned
    assert relative_error(peers.iterative_pinv(m, 30), np.linalg.inv(m)) <= 1e-10
    assert relative_error(peers.iterative_pinv(m, 2), np.linalg.inv(m)) > 1e-3  # not already there


def test_segment_means():
    x = np.arange(10.0)[:, None]
    np.testing.assert_array_equal(peers.segment_means(x, 3)[:, 0], [1.5, 5.0, 8.0])  # sizes 4, 3, 3


def test_performer_features_are_unbiased_for_the_softmax_kernel():
    """E[φ(x)·φ(y)] = exp(x·y) with orthogonal features: z-test of the mean over seeds 0-99."""
    rng = np.random.default_rng(0)
    x, y = 0.5 * rng.standard_normal((2, 16))
    estimates = []
    for seed in range(100):
        w = peers.orthogonal_gaussian(16, 16, np.random.default_rng(seed))
        estimates.append(peers.favor_features(x[None], w)[0] @ peers.favor_features(y[None], w)[0])
    estimates = np.array(estimates)
    z = (estimates.mean() - np.exp(x @ y)) / (estimates.std(ddof=1) / 10)
    assert abs(z) < 4, z
    assert estimates.std() > 0.01  # a random estimate, not a constant


def test_performer_is_a_positive_row_stochastic_approximation():
    q, k = random_qk(1, 2, 1, 20, 30, 16)
    left, right = peers.performer_factors(q, k, 8, seed=1)
    approx = left @ right
    assert approx.shape == (1, 2, 20, 30) and (approx > 0).all()
    np.testing.assert_allclose(approx.sum(axis=-1), 1.0, rtol=1e-12)
    # averaged over draws, the estimate approaches softmax (law of large numbers)
    left, right = peers.performer_factors(q * 0.3, k * 0.3, 20, seed=1)
    many = [peers.performer_factors(q * 0.3, k * 0.3, 20, seed=s) for s in range(40)]
    mean = np.mean([a @ b for a, b in many], axis=0)
    exact = lr.attention_matrix(q * 0.3, k * 0.3)
    assert relative_error(mean, exact) < relative_error(left @ right, exact) / 2


def test_peers_refuse_bad_rank_and_pinv():
    q, k = random_qk(1, 1, 1, 5, 6, 16)
    for factors in (peers.linformer_factors, peers.nystrom_factors, peers.performer_factors):
        with pytest.raises(ValueError, match="rank"):
            factors(q, k, 6)
    with pytest.raises(ValueError, match="pinv"):
        peers.nystrom_factors(q, k, 3, pinv="newton")


# --------------------------------------------------------------------------------------
# backend="cuda"
# --------------------------------------------------------------------------------------


def test_cuda_backend_matches_the_reference(monkeypatch):
    """Device inputs, GQA through strided views, an empty causal row, lse kept on the device:
    same factors and output as the reference backend (float64 on both). Sizes for the
    simulator: one batch, two query heads of one key head, 9 x 11."""
    c = {"b": 1, "h": 2, "hkv": 1, "nq": 9, "nk": 11, "d": 16, "causal": True, "key_lengths": (8,)}
    q, k = make_qk(c, spread=0.7)
    v = np.random.default_rng(1).standard_normal((c["b"], c["hkv"], c["nk"], 8))
    kw = dict(rank=4, oversample=3, power_iters=1, seed=2, **masks(c))
    qd, kd, vd = (cuda.to_device(x) for x in (q, k, v))
    out, lse = lowrank_attention(qd, kd, vd, **kw)
    out_ref, lse_ref = lowrank_attention(q, k, v, backend="reference", **kw)
    assert relative_error(out.copy_to_host(), out_ref) <= 1e-11
    assert relative_error(lse.copy_to_host(), lse_ref) <= 1e-12
    # rank="auto" from rank 2 (not 16: N is 9 here) doubling up: sketches of several widths,
    # V riding along the first pass; no power iteration keeps the simulator quick
    monkeypatch.setattr(lowrank_driver, "AUTO_FIRST_RANK", 2)
    auto = {"rank": "auto", "tolerance": 1e-3, "power_iters": 0, **masks(c)}
    f = lowrank_factors(qd, kd, vd, backend="cuda", **auto)
    f_ref = lowrank_factors(q, k, v, backend="reference", **auto)
    assert np.array_equal(f.rank, f_ref.rank) and f.rank.max() > 2
    assert relative_error(on_host(product(f.U, f.sigma, f.Vt)), product(f_ref.U, f_ref.sigma, f_ref.Vt)) <= 1e-11


def test_cuda_backend_runs_wide_products_in_column_chunks(monkeypatch):
    """Products wider than the kernels take run in chunks of columns; a column's arithmetic
    ignores the others, so in float64 the factors are those of whole products, bit for bit."""
    q, k = (cuda.to_device(x) for x in random_qk(1, 1, 1, 8, 8, 16, spread=0.7))  # one tile each
    kw = {"rank": 2, "oversample": 1, "power_iters": 0, "seed": 3, "backend": "cuda"}
    whole = lowrank_factors(q, k, **kw)
    # the first pass is 3 + 5 probes wide: chunks of 3, 3 and 2 columns
    monkeypatch.setattr(kernels, "max_width", lambda dtype, head_dim: 3)
    chunked = lowrank_factors(q, k, **kw)
    for name in ("U", "sigma", "Vt", "lse", "error_estimate"):
        assert_bit_identical(name, on_host(getattr(chunked, name)), on_host(getattr(whole, name)))


GQA_CASE = {"b": 1, "h": 2, "hkv": 1, "nq": 17, "nk": 12, "d": 16, "causal": True, "key_lengths": (11,)}
GQA_RSVD = {"rank": 4, "oversample": 2, "seed": 5, **masks(GQA_CASE)}  # width 6


def gqa_inputs(dtype, device=True):
    """q, k, v of GQA_CASE (an empty causal row, hidden keys) in `dtype`, on the device by default."""
    q, k = make_qk(GQA_CASE, spread=0.7)
    v = np.random.default_rng(1).standard_normal((1, 1, GQA_CASE["nk"], 8))
    arrays = [x.astype(dtype) for x in (q, k, v)]
    return [cuda.to_device(x) for x in arrays] if device else arrays


def test_float64_driver_is_the_mirror_bit_for_bit():
    """The float64 cuda driver (one row block) is the mirror's randomized SVD in the kernels' order,
    its passes written into two reused work arrays: the same factors and output, bit for bit (to
    rounding where CuPy's cuSOLVER, not LAPACK, does the linear algebra)."""
    qd, kd, vd = gqa_inputs(np.float64)
    q, k, v = gqa_inputs(np.float64, device=False)
    kw = {"power_iters": 1, **GQA_RSVD}
    f = lowrank_factors(qd, kd, **kw)
    out, lse = lowrank_attention(qd, kd, vd, **kw)
    u, s, vt, lse_m = lr.randomized_svd_mirror(q, k, order=kernel_order(np.float64, 16), **kw)
    u[~np.isfinite(lse_m)] = 0.0  # the driver's rows that see no key
    out_m = product(u, s, vt) @ np.repeat(v, 2, axis=1)
    on_gpu_linalg = type(f.U).__module__.startswith("cupy")
    for name, got, want in (("U", f.U, u), ("sigma", f.sigma, s), ("Vt", f.Vt, vt), ("lse", f.lse, lse_m),
                            ("out", out.copy_to_host(), u @ (s[..., :, None] * (vt @ np.repeat(v, 2, axis=1)))),
                            ("lse out", lse.copy_to_host(), lse_m)):
        if on_gpu_linalg:
            assert relative_error(on_host(got), want) <= 1e-12, name
        else:
            assert_bit_identical(name, on_host(got), want)
    assert relative_error(out.copy_to_host(), out_m) <= 1e-12


@pytest.mark.parametrize("dtype, blocks", [(np.float64, "one-block"), (np.float32, "row-blocks")],
                         ids=["f64-one-block", "f32-row-blocks"])
def test_repeated_calls_are_bit_identical(monkeypatch, dtype, blocks):
    """Work arrays are allocated per call and written before they are read: a second call (after
    one of another shape) gives the same bits, with one row block or several: the factors with
    probes and V riding along (float64), the output (float32)."""
    if blocks == "row-blocks":
        monkeypatch.setattr(lowrank_driver, "LA_MIN_ROWS", 4)
        assert len(lowrank_driver._row_blocks(GQA_CASE["nk"], 6)) == 2
    inputs = gqa_inputs(dtype)
    kw = {"power_iters": 0, **GQA_RSVD}

    def run():
        if dtype == np.float64:
            f = lowrank_factors(*inputs, **kw)
            return [on_host(getattr(f, name)) for name in ("U", "sigma", "Vt", "lse", "error_estimate", "output_error")]
        return [x.copy_to_host() for x in lowrank_attention(*inputs, **kw)]

    first = run()
    lowrank_attention(*gqa_inputs(dtype)[:2], cuda.to_device(np.ones((1, 1, GQA_CASE["nk"], 3), dtype=dtype)),
                      rank=2, oversample=1, power_iters=0)
    for i, (a, b) in enumerate(zip(first, run())):
        assert_bit_identical(f"result {i}", a, b)


def test_row_blocks_agree_with_one_block(monkeypatch):
    """The blocked linear algebra (TSQR, the SVD through it, blocked products and residuals) gives the
    one-block factors, estimates and output to float64 rounding, on a planted spectrum whose rank (8)
    is below the sketch's width (14): blocks and columns with nothing in them. The driver's code is
    the same on both backends (the cuda one runs in blocks in the test above): the reference's dense
    products keep the simulator out of it."""
    q, k, _ = planted(classes=8, n=96, d=16)
    v = np.random.default_rng(0).standard_normal((1, 1, 96, 16))
    inputs = (q, k, v)
    kw = {"rank": 10, "oversample": 4, "power_iters": 1, "seed": 3, "causal": True, "key_lengths": [90],
          "backend": "reference"}
    one = lowrank_factors(*inputs, **kw)
    out_one, _ = lowrank_attention(*inputs, **kw)
    monkeypatch.setattr(lowrank_driver, "LA_MIN_ROWS", 8)
    assert len(lowrank_driver._row_blocks(96, 14)) == 6
    many = lowrank_factors(*inputs, **kw)
    out_many, _ = lowrank_attention(*inputs, **kw)
    assert relative_error(product(many.U, many.sigma, many.Vt), product(one.U, one.sigma, one.Vt)) <= 1e-13
    for name in ("sigma", "error_estimate", "error_bound", "output_error"):
        assert relative_error(getattr(many, name), getattr(one, name)) <= 1e-12, name
    assert relative_error(out_many, out_one) <= 1e-13


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("rank_deficient", [False, True], ids=["full-rank", "rank-5-zero-blocks"])
def test_blocked_qr_and_svd(monkeypatch, dtype, rank_deficient):
    """`_qr_into` (TSQR over 12 blocks) and `_svd_rows`: Q orthonormal to the storage dtype's
    rounding, Q R = Y, and Yᵀ = Ũ Σ Vᵀ with σ those of NumPy's float64 SVD of the stored Y."""
    monkeypatch.setattr(lowrank_driver, "LA_MIN_ROWS", 16)
    rng = np.random.default_rng(0)
    y = rng.standard_normal((2, 3, 200, 12))
    if rank_deficient:
        y = y[..., :5] @ rng.standard_normal((2, 3, 5, 12))
        y[..., 40:70, :] = 0.0
    y = y.astype(dtype)
    assert len(lowrank_driver._row_blocks(200, 12)) == 12
    eps = np.finfo(dtype).eps
    q = np.empty_like(y)
    r = lowrank_driver._qr_into(y, q, np)
    q64 = q.astype(np.float64)
    assert np.abs(np.swapaxes(q64, -1, -2) @ q64 - np.eye(12)).max() <= 10 * eps
    assert relative_error(q64 @ r, y) <= 10 * eps
    u_small, sigma, vt = lowrank_driver._svd_rows(y.copy(), np)
    assert vt.dtype == dtype and sigma.dtype == np.float64
    sv = np.linalg.svd(y.astype(np.float64), compute_uv=False)
    assert np.abs(sigma - sv).max() <= 1e-14 * sv.max()
    # sums of 12 products with σ₁ ≈ 5 max|Y|: a few dozen ulps
    assert relative_error(u_small @ (sigma[..., :, None] * vt.astype(np.float64)), np.swapaxes(y, -1, -2)) <= 100 * eps


def _cupy_like_qr(a):
    """np.linalg.qr with R returned as CuPy's QR returns it: a view of the factored matrix, which is
    the size of `a`, so whoever keeps R keeps a's size in float64."""
    q, r = np.linalg.qr(a)
    factored = np.zeros_like(a, dtype=np.float64)
    factored[..., : r.shape[-2], :] = r
    return q, factored[..., : r.shape[-2], :]


def test_tsqr_holds_a_few_blocks_not_every_block(monkeypatch):
    """`_qr_into` over 32 row blocks with a QR whose R views a block-sized array (as CuPy's does):
    the most NumPy bytes live during the call (tracemalloc's peak) stay within the stacked R
    factors and eight blocks' float64 temporaries. Keeping every block's R, as the driver once did,
    kept every block's factored matrix, 2 · N × l float32 in all (issue 11's excess on the GPU)."""
    import tracemalloc
    from types import SimpleNamespace

    monkeypatch.setattr(lowrank_driver, "LA_MIN_ROWS", 256)
    n, width = 8192, 16
    blocks = len(lowrank_driver._row_blocks(n, width))
    assert blocks == 32
    y = np.random.default_rng(0).standard_normal((1, 1, n, width)).astype(np.float32)
    q = np.empty_like(y)
    xp = SimpleNamespace(linalg=SimpleNamespace(qr=_cupy_like_qr), empty=np.empty)
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        r = lowrank_driver._qr_into(y, q, xp)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    stacked_r, block64 = blocks * width * width * 8, (n // blocks) * width * 8
    assert peak <= stacked_r + 8 * block64, f"peak {peak} B, {peak / y.nbytes:.2f} N x l float32 arrays"
    assert peak < y.nbytes
    expected = np.empty_like(y)
    assert np.array_equal(r, lowrank_driver._qr_into(y, expected, np)) and np.array_equal(q, expected)


def test_rows_that_see_no_key_are_positive_zero_rows_of_u():
    """U's rows of queries with no visible key are +0.0, as an assignment writes them (a product
    with a 0/1 mask would leave -0.0 where U was negative)."""
    q, k, _ = planted(classes=8, n=32, d=16)
    f = lowrank_factors(q, k, rank=4, oversample=2, power_iters=1, causal=True, key_lengths=[30],
                        backend="reference")
    empty = ~np.isfinite(f.lse[0, 0])
    assert empty.sum() == 2
    assert (f.U[0, 0, empty] == 0).all() and not np.signbit(f.U[0, 0, empty]).any()
    assert (f.U[0, 0, ~empty] != 0).any(axis=-1).all()


def test_the_device_holds_two_work_arrays(monkeypatch):
    """Every device allocation of a fixed-rank lowrank_attention on device inputs, with the linear
    algebra on the host: two work arrays of N·l values (no probes: the output needs none), the
    lse and the key lengths, and the output and its lse; nothing per pass."""
    monkeypatch.setattr(lowrank_driver, "_cupy_or_none", lambda p: None)
    inputs = gqa_inputs(np.float32)
    sizes = []
    for name in ("device_array", "to_device"):
        original = getattr(cuda, name)

        def counted(shape_or_array, *args, _original=original, **kw):
            array = _original(shape_or_array, *args, **kw)
            sizes.append(int(np.prod(array.shape)))
            return array

        monkeypatch.setattr(cuda, name, counted)
    out, _ = lowrank_attention(*inputs, power_iters=1, **GQA_RSVD)
    b, h, nq, nk, width = 1, 2, GQA_CASE["nq"], GQA_CASE["nk"], 6
    assert sorted(sizes) == sorted([b * h * max(nq, nk) * width] * 2 + [b * h * nq, b] + [out.size, b * h * nq])


def test_factors_are_stored_in_the_input_dtype():
    f = lowrank_factors(*gqa_inputs(np.float32)[:2], power_iters=0, **GQA_RSVD)
    assert [on_host(x).dtype for x in (f.U, f.Vt, f.lse)] == [np.float32] * 3
    assert [on_host(x).dtype for x in (f.sigma, f.error_estimate, f.error_bound)] == [np.float64] * 3


@pytest.mark.gpu
def test_cuda_float32_meets_the_spectral_target():
    """float32 operators, float64 linear algebra: ‖A - Â_32‖₂ <= 1.5 σ₃₃ on a MiniLM-like head."""
    q, k, _ = planted(classes=16, n=1024, d=64, strength=1.5, heads=2)
    q = q + 0.3 * np.random.default_rng(0).standard_normal(q.shape)
    f = lowrank_factors(q.astype(np.float32), k.astype(np.float32), rank=32, backend="cuda")
    a = lr.attention_matrix(q.astype(np.float32), k.astype(np.float32))
    sv = np.linalg.svd(a, compute_uv=False)
    err = np.linalg.norm(a - product(f.U, f.sigma, f.Vt), ord=2, axis=(-2, -1))
    assert (err <= 1.5 * sv[..., 32] + 1e-5).all(), err / sv[..., 32]


# --------------------------------------------------------------------------------------
# method="lowrank" in nkattn.attention
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend, device", [("reference", False), ("cuda", False), ("cuda", True)],
                         ids=["reference", "cuda", "cuda-device-inputs"])
def test_method_lowrank_at_full_rank_is_exact_attention(backend, device):
    """rank = min(Nq, Nk) reproduces exact attention through the registry, on both backends
    (GQA, causal with an empty row, dv != d; no power iteration: at full width the sketch
    spans A's column space whatever the iterations)."""
    q, k = random_qk(1, 2, 1, 9, 11, 16, seed=4, spread=0.7)
    v = np.random.default_rng(5).standard_normal((1, 1, 11, 8))
    kw = {"method": "lowrank", "rank": 9, "power_iters": 0, "causal": True, "key_lengths": [8], "backend": backend}
    out_ref, lse_ref = attention_ref(q, k, v, causal=True, key_lengths=[8])
    inputs = [cuda.to_device(x) for x in (q, k, v)] if device else (q, k, v)
    out, lse = nkattn.attention(*inputs, return_lse=True, **kw)
    if device:
        out, lse = out.copy_to_host(), lse.copy_to_host()
    assert relative_error(out, out_ref) <= 1e-12
    assert relative_error(lse, lse_ref) <= 1e-12
    assert (out[0, :, 0] == 0).all() and (lse[0, :, 0] == -np.inf).all()  # row 0 sees no key


BAD_OPTIONS = [
    ({"rank": 0}, ValueError, r"rank must be an integer >= 1 or 'auto', got 0"),
    ({"rank": 2.5}, ValueError, r"rank must be an integer >= 1 or 'auto', got 2.5"),
    ({"rank": "full"}, ValueError, r"rank must be an integer >= 1 or 'auto', got 'full'"),
    ({"rank": 6}, ValueError, r"rank must be an integer in \[1, min\(Nq, Nk\) = 5\] or 'auto', got 6"),
    ({"oversample": -1}, ValueError, r"oversample must be an integer >= 0, got -1"),
    ({"power_iters": 1.0}, ValueError, r"power_iters must be an integer >= 0, got 1.0"),
    ({"seed": -1}, ValueError, r"seed must be a non-negative integer, got -1"),
    ({"energy": 1.5}, ValueError, r"energy must be a number in \(0, 1\], got 1.5"),
    ({"tolerance": 0}, ValueError, r"tolerance must be a number in \(0, 1\], got 0"),
    ({"rank": 2, "energy": 0.9}, ValueError, r"energy only applies to rank='auto', got rank=2 and energy=0.9"),
]


@pytest.mark.parametrize("options, error, message", BAD_OPTIONS, ids=[str(o) for o, _, _ in BAD_OPTIONS])
def test_method_lowrank_names_a_bad_option(options, error, message):
    with pytest.raises(error, match=message):
        nkattn.attention(Q, K, V, method="lowrank", **options)


def test_method_lowrank_backends():
    """cuda takes float32/float64 at the kernels' head dims, any dv; the reference takes the rest."""
    q, k, v = (x.astype(np.float32) for x in (Q, K, V))  # d = 16, dv = 8
    assert plan(q, k, v, method="lowrank", rank=2)[1].label == "cuda (low-rank operators)"
    assert plan(*(x.astype(np.float16) for x in (q, k, v)), method="lowrank", rank=2)[1].name == "reference"
    q48, k48 = np.zeros((1, 2, 6, 48)), np.zeros((1, 1, 5, 48))
    with pytest.raises(ValueError, match=r"cuda \(low-rank operators\): the FFMA kernels support d in"):
        plan(q48, k48, V, method="lowrank", rank=2, backend="cuda")
    assert METHODS["lowrank"].approximate and "lowrank" in METHODS


def test_method_lowrank_needs_finite_q_and_k_whatever_check_finite_says():
    q = Q.copy()
    q[0, 1, 2, 3] = np.nan
    with pytest.raises(ValueError, match=r"q holds nan at index \(0, 1, 2, 3\); method='lowrank' needs finite q"):
        nkattn.attention(q, K, V, method="lowrank", rank=2, check_finite=False)


# --------------------------------------------------------------------------------------
# the lowrank study
# --------------------------------------------------------------------------------------


def test_svd_output_errors_are_those_of_the_explicit_truncation():
    q, k = random_qk(1, 1, 1, 30, 30, 16, spread=0.5)
    a = lr.attention_matrix(q, k)[0, 0]
    v = np.random.default_rng(3).standard_normal((30, 5))
    u, sv, vt = np.linalg.svd(a)
    errors = study.svd_output_errors(sv, vt, v)
    for rank in (0, 1, 7, 30):
        a_k = (u[:, :rank] * sv[:rank]) @ vt[:rank]
        expected = np.linalg.norm((a - a_k) @ v) / np.linalg.norm(a @ v)
        assert errors[rank] == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_layer_metrics_are_consistent_with_theory():
    rng = np.random.default_rng(7)
    q, k, v = rng.standard_normal((3, 2, 40, 16)) * np.array([0.3, 1.0, 1.0])[:, None, None, None]
    fixed, auto, spectra = study.layer_metrics(q, k, v, ranks=(4, 8), rules=(("energy", 0.9), ("tolerance", 0.1)),
                                               matrix_free_rank=8)
    for rows in fixed.values():
        for row in rows:
            assert row["rsvd_spec_ratio"] >= 1 - 1e-3 and row["rsvd_fro_ratio"] >= 1 - 1e-3  # Eckart–Young (4 digits)
            assert row["best_out"] <= row["svd_out"]
    assert all(row["mf_vs_dense"] < 1e-10 for row in fixed[8])
    assert all(1 <= row["k"] <= 40 and row["out_err"] <= 0.1 for row in auto["tolerance=0.1"])
    assert spectra["exact"].shape == (2, 40) and spectra["matrix_free"].shape == (2, 8)


@pytest.fixture(scope="module")
def quick_results(tmp_path_factory):
    if not bert.model_available():
        pytest.skip(f"MiniLM weights not installed: {bert.INSTALL_HINT}")
    results_dir = tmp_path_factory.mktemp("results")
    paths = study.run(quick=True, results_dir=results_dir, progress=False)
    assert paths == [results_dir / "lowrank" / name for name in ("quick.json", "quick-auto.json",
                                                                 "quick-long-context.json")]
    return results_dir


def test_quick_run_writes_tidy_records_with_metadata(quick_results):
    fixed = read_results(quick_results / "lowrank" / "quick.json")
    auto = read_results(quick_results / "lowrank" / "quick-auto.json")
    assert fixed["meta"]["command"] == "nkattn study lowrank --quick" and fixed["meta"]["config"]["quick"]
    assert len(fixed["records"]) == 2 * 12 * 3  # layers x heads x ranks
    assert len(auto["records"]) == 2 * 12 * len(study.RULES)
    assert fixed["meta"]["summary"]["by_rank"]["32"]["mf_spec_ratio"]["max"] <= study.SPEC_TARGET
    assert auto["meta"]["summary"]["by_rule"]["tolerance=0.01"]["share_over_budget"] == 0
    assert fixed["meta"]["provenance"]["passages"]
    long = read_results(quick_results / "lowrank" / "quick-long-context.json")
    assert long["meta"]["config"]["quick"] and long["meta"]["command"] == "nkattn study lowrank --quick"
    minilm = [r for r in long["records"] if r["data"] == "minilm"]
    # MiniLM pooled over the corpus: the 12 heads at both quick lengths, each record naming its head
    assert {(r["n"], r["layer"], r["head"]) for r in minilm} == {
        (n, layer, head) for n in study.QUICK_LONG_LENGTHS for layer in range(6) for head in (0, 6)}
    assert long["meta"]["provenance"]["minilm"]["pool"] == max(study.QUICK_LONG_LENGTHS)


def test_figures_come_from_results_only_and_are_byte_reproducible(quick_results, tmp_path, monkeypatch):
    import shutil

    results = tmp_path / "results"
    shutil.copytree(quick_results, results)
    for quick, full in ((study.QUICK_RESULT, study.FULL_RESULT), (study.QUICK_AUTO, study.FULL_AUTO)):
        (results / "lowrank" / quick).rename(results / "lowrank" / full)

    def forbidden(*args, **kwargs):
        raise AssertionError("a figure ran the study")

    monkeypatch.setattr(study, "layer_metrics", forbidden)
    paths = [p for make in plots.FIGURES for p in make(results, tmp_path / "a")]
    assert [p.suffix for p in paths] == [".pdf", ".png"] * len(plots.FIGURES)
    # no date or random id in the files: rebuilding gives the same bytes (one figure stands for all)
    again = plots.FIGURES[2](results, tmp_path / "b")
    assert [p.read_bytes() for p in again] == [p.read_bytes() for p in paths[4:6]]
    with pytest.raises(figures.MissingResultError, match="nkattn study lowrank"):
        plots.FIGURES[0](tmp_path / "empty", tmp_path / "c")


class FakeMemoryManager:
    """numba's memory manager as `live_device_peak` reads it: a table of live allocations that an
    allocation adds to and the last view's finalizer removes from (the device copy may linger,
    deferred)."""

    class Allocation:
        def __init__(self, size):
            self.size = size

    def __init__(self):
        self.allocations = {}

    def memalloc(self, size):
        key = object()
        self.allocations[key] = self.Allocation(size)
        return key

    def free(self, key):
        del self.allocations[key]


def test_live_device_peak_samples_every_allocation(monkeypatch):
    import types

    from nkattn.studies._common import live_device_peak

    manager = FakeMemoryManager()
    monkeypatch.setattr(cuda, "current_context", lambda: types.SimpleNamespace(memory_manager=manager))
    resident = manager.memalloc(100)

    def call():
        a = manager.memalloc(10)
        b = manager.memalloc(1000)  # a transient: freed before anything else happens
        manager.free(b)
        c = manager.memalloc(50)
        manager.free(a)
        return c

    result, peak = live_device_peak(call)
    assert peak == 1010 and result in manager.allocations and resident in manager.allocations
    assert "memalloc" not in vars(manager)  # the manager's own method again
    # nested: each sees its own call's peak, and the outer sampler is back in place afterwards
    outer = live_device_peak(lambda: (manager.memalloc(7), live_device_peak(call), vars(manager)["memalloc"]))
    (_, (_, inner_peak), outer_sampler), outer_peak = outer
    assert inner_peak == 1010 and outer_peak == 7 + 1010 and "memalloc" not in vars(manager)
    assert outer_sampler.__qualname__ == "live_device_peak.<locals>.memalloc"


@pytest.mark.gpu
def test_live_device_peak_on_the_gpu():
    """A transient device array and the result allocated while it lives: the peak is both, and
    the transient is not live in the next call, whatever numba defers."""
    from nkattn.studies._common import live_device_peak

    def call():
        transient = cuda.device_array(1 << 20, dtype=np.float32)
        kept = cuda.device_array(1 << 18, dtype=np.float32)
        del transient
        return kept

    _, peak = live_device_peak(call)
    assert peak == 4 * ((1 << 20) + (1 << 18))
    _, peak = live_device_peak(call)  # numba may still hold the first call's transient: it is not live
    assert peak == 4 * ((1 << 20) + (1 << 18))


def test_long_context_pipeline_on_the_cpu(tmp_path):
    """The GPU part's code path with the CPU bench: the planted spectrum is recovered exactly."""
    if not REAL_GPU:  # without a GPU (or with the simulator) the real run refuses in one line
        with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
            study.run_long_context(results_dir=tmp_path)
    paths = study.run_long_context(results_dir=tmp_path, data=("planted",), lengths=(64,), repeats=2,
                                   progress=False, bench=study.HostBench())
    records = read_results(paths[0])["records"]
    factors = [r for r in records if r["kind"] == "factors"]
    assert {r["dtype"] for r in factors} == {"float32", "float64"}
    for r in factors:
        assert r["sv_rel_err"] < 1e-6 and r["zero_floor"] < 1e-12  # float32 inputs: β itself is rounded
        assert r["erank_95"] == 31 and r["stable_rank"] == pytest.approx(8.75, rel=1e-3)  # 1 + 31 λ², λ = 1/2
        assert r["bits_identical"]
    attention = [r for r in records if r["kind"] == "attention"]
    assert len(attention) == 2 and all(r["bits_identical"] and r["budget_bytes"] > 0 for r in attention)


def test_float64_runs_only_at_the_smallest_planted_length_up_to_16k():
    f32, f64 = np.dtype(np.float32), np.dtype(np.float64)
    assert study.planted_cases((16384, 65536)) == [(16384, f32), (65536, f32), (16384, f64)]
    # a call for 1M alone must not run the (much slower) float64 kernels at 1M
    assert study.planted_cases((1048576,)) == [(1048576, f32)]


def _pooled_vectors(rows_by_head, seed=0):
    """Random {(layer, head): (q, k)} standing in for `minilm_long_inputs` (no MiniLM needed)."""
    rng = np.random.default_rng(seed)
    return {h: tuple(rng.standard_normal((rows, 32)).astype(np.float32) for _ in range(2))
            for h, rows in rows_by_head.items()}


def test_minilm_vectors_file_round_trips_bit_for_bit(tmp_path):
    import hashlib

    vectors = _pooled_vectors({(0, 0): 96, (5, 6): 64})
    path = study.save_minilm_vectors(tmp_path / "v.npz", vectors, {"pool": 96}, {(0, 0): 96, (5, 6): 32},
                                     command="pytest")
    loaded, prov = study.load_minilm_vectors(path)
    assert sorted(loaded) == [(0, 0), (5, 6)]
    assert loaded[(0, 0)][0].tobytes() == vectors[(0, 0)][0].tobytes()
    assert loaded[(5, 6)][1].tobytes() == vectors[(5, 6)][1][:32].tobytes()  # the first rows, as a case takes them
    assert prov["heads"] == [[0, 0, 96], [5, 6, 32]] and prov["pool"] == 96 and prov["made"]["command"] == "pytest"
    assert prov["vectors_file"] == {"name": "v.npz", "bytes": path.stat().st_size,
                                    "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    with pytest.raises(ValueError, match="head 5.6 has 64 pooled rows, asked for 65"):
        study.save_minilm_vectors(tmp_path / "w.npz", vectors, {}, {(5, 6): 65})
    assert study.parse_head_rows("5.0:65536") == ((5, 0), 65536) and study.parse_head_rows("1.6") == ((1, 6), None)
    with pytest.raises(ValueError, match=r"LAYER.HEAD\[:ROWS\]"):
        study.parse_head_rows("5:0")


def test_long_context_reads_minilm_from_a_file_and_calls_extend_one_results_file(tmp_path):
    """Each case at N takes the heads the file holds at N rows; a second call adds its cases."""
    vectors = _pooled_vectors({(0, 0): 128, (5, 0): 64})
    path = study.save_minilm_vectors(tmp_path / "v.npz", vectors, {"pool": 128})
    results = tmp_path / "results"
    study.run_long_context(results_dir=results, data=("minilm",), lengths=(64, 128, 256), repeats=2,
                           minilm_vectors=path, command="first", progress=False, bench=study.HostBench())
    (written,) = study.run_long_context(results_dir=results, data=("planted",), lengths=(64,), kinds=("factors",),
                                        repeats=2, command="second", progress=False, bench=study.HostBench())
    assert written == results / "lowrank" / "long-context-cpu.json"
    data = read_results(written)
    minilm = [r for r in data["records"] if r["data"] == "minilm"]
    assert sorted((r["n"], r["layer"], r["head"]) for r in minilm) == [(64, 0, 0), (64, 5, 0), (128, 0, 0)]
    assert all(r["heads"] == (2 if r["n"] == 64 else 1) and r["bits_identical"] for r in minilm)
    assert {(r["data"], r["dtype"]) for r in data["records"] if r["data"] == "planted"} == {
        ("planted", "float32"), ("planted", "float64")}
    calls = data["meta"]["calls"]
    assert [c["command"] for c in calls] == ["first", "second"]
    assert calls[0]["cases"] == [["minilm", 64, "float32", "factors"], ["minilm", 128, "float32", "factors"]]
    assert data["meta"]["provenance"]["minilm"]["vectors_file"]["sha256"] == study.load_minilm_vectors(path)[1][
        "vectors_file"]["sha256"]
    with pytest.raises(ValueError, match=r"unknown data or kinds \['lsh'\]"):
        study.run_long_context(results_dir=results, data=("lsh",), bench=study.HostBench())


def test_long_context_command_line(tmp_path, monkeypatch):
    for misplaced in (["--lengths", "16384"], ["--kinds", "factors"], ["--heads", "5.0:65536"]):
        with pytest.raises(SystemExit):  # an option of one mode in another
            study.main(misplaced)
    saved = []
    monkeypatch.setattr(study, "save_vectors_command", lambda path, heads: saved.append((path, heads)) or path)
    assert study.main(["--save-minilm-vectors", str(tmp_path / "v.npz"), "--heads", "5.0:65536", "1.6:16384"]) == 0
    assert saved == [(tmp_path / "v.npz", ["5.0:65536", "1.6:16384"])]
    calls = []
    monkeypatch.setattr(study, "run_long_context", lambda **kw: calls.append(kw) or [])
    study.main(["--long-context", "--lengths", "1048576", "--kinds", "attention", "--minilm-vectors", "v.npz"])
    assert calls[0]["data"] == study.LONG_DATA and calls[0]["kinds"] == ["attention"]
    assert calls[0]["lengths"] == [1048576] and str(calls[0]["minilm_vectors"]) == "v.npz"
    assert calls[0]["command"] == ("python -m nkattn.studies.lowrank --long-context --lengths 1048576 --kinds "
                                   "attention --minilm-vectors v.npz")


class FakeGpuBench(study.HostBench):
    """The CPU bench with what only the GPU bench measures made up: single-pass times (a fixed
    share of the call) and device memory (1 MiB a call). Logs the passes it was asked for."""

    device = "NVIDIA H100 80GB HBM3"

    def __init__(self):
        self.pass_calls = []

    def timed_runs(self, fn, repeats):
        timing, kept, _ = super().timed_runs(fn, repeats)
        self.last_ms = timing["median_ms"]
        return timing, kept, 1 << 20

    def pass_ms(self, q, k, width, repeats, small, exact=True):
        self.pass_calls.append((q.shape[2], width, repeats, exact))
        names = ("times", "transpose_times") + (("exact_attention_d",) if exact else ())
        return {name: {"median_ms": self.last_ms / 6, "repeats": repeats} for name in names}


def test_long_context_times_each_pass_once_per_case_and_the_exact_pass_once(tmp_path):
    bench = FakeGpuBench()
    study.run_long_context(results_dir=tmp_path, data=("planted",), lengths=(64,), repeats=3, progress=False,
                           bench=bench)
    # factors at l = 64 (capped at N), attention at l = 42 reusing the factors' exact pass; float32, then float64
    assert bench.pass_calls == [(64, 64, 3, True), (64, 42, 3, False)] * 2
    assert study.pass_repeats(1048576, 2) == 1 and study.pass_repeats(262144, 3) == 3
    records = read_results(tmp_path / "lowrank" / "long-context-h100.json")["records"]
    for dtype in ("float32", "float64"):
        factors, attention = (next(r for r in records if r["kind"] == kind and r["dtype"] == dtype)
                              for kind in ("factors", "attention"))
        assert attention["passes"]["exact_attention_d"] == factors["passes"]["exact_attention_d"]
        assert attention["time_over_exact"] > 0 and attention["peak_over_budget"] > 0


def _gpu_like_long_results(results_dir, tmp_path):
    """Long-context results with GPU-only fields (`FakeGpuBench`), MiniLM from a file of two heads."""
    vectors = _pooled_vectors({(1, 6): 64, (5, 0): 128})
    path = study.save_minilm_vectors(tmp_path / "v.npz", vectors, {"pool": 128})
    (written,) = study.run_long_context(results_dir=results_dir, lengths=(64, 128), repeats=2, minilm_vectors=path,
                                        progress=False, bench=FakeGpuBench())
    assert written.name == "long-context-h100.json"
    return written


def test_long_context_figures_draw_from_the_gpu_results_only(tmp_path, monkeypatch):
    results = tmp_path / "results"
    _gpu_like_long_results(results, tmp_path)

    def forbidden(*args, **kwargs):
        raise AssertionError("a figure ran the study")

    monkeypatch.setattr(study, "long_context_case", forbidden)
    long_figures = [plots.fig_long_spectra, plots.fig_long_rank, plots.fig_long_cost]
    assert all(make in plots.FIGURES for make in long_figures)
    paths = [p for make in long_figures for p in make(results, tmp_path / "figures")]
    assert [p.name for p in paths] == [f"{name}.{ext}" for name in ("long_spectra", "long_rank", "long_cost")
                                       for ext in ("pdf", "png")]
    again = plots.fig_long_cost(results, tmp_path / "again")
    assert [p.read_bytes() for p in again] == [p.read_bytes() for p in paths[4:]]
    with pytest.raises(figures.MissingResultError, match=r"long-context-<device>\.json is missing: make it with "
                                                          r"`python -m nkattn.studies.lowrank --long-context"):
        plots.fig_long_rank(tmp_path / "empty", tmp_path / "c")


def test_long_context_files_of_parallel_calls_merge_into_one(tmp_path):
    """Calls on several GPUs at once write separate files; --merge joins them and the stored one."""
    runs = {}
    for name, data, kinds in (("a", ("planted",), ("factors",)), ("b", ("planted",), ("attention",))):
        (runs[name],) = study.run_long_context(results_dir=tmp_path / name, data=data, lengths=(64,), kinds=kinds,
                                                repeats=2, command=name, progress=False, bench=study.HostBench())
    stored = tmp_path / "results"
    study.run_long_context(results_dir=stored, data=("planted",), lengths=(128,), kinds=("factors",), repeats=2,
                           command="stored", progress=False, bench=study.HostBench())
    assert study.main(["--results-dir", str(stored), "--merge", str(runs["a"]), str(runs["b"])]) == 0
    merged = read_results(stored / "lowrank" / "long-context-cpu.json")
    assert [c["command"] for c in merged["meta"]["calls"]] == ["stored", "a", "b"]
    assert merged["meta"]["merged"] == [str(runs["a"]), str(runs["b"])]
    cases = sorted({(r["n"], r["dtype"], r["kind"]) for r in merged["records"]})
    assert cases == [(64, "float32", "attention"), (64, "float32", "factors"), (64, "float64", "attention"),
                     (64, "float64", "factors"), (128, "float32", "factors"), (128, "float64", "factors")]
    with pytest.raises(SystemExit):
        study.main(["--merge", str(runs["a"]), "--long-context"])
