"""Matrix-free attention products A·X and Aᵀ·Y: kernels vs dense float64 and the bit-level mirrors.

Under the simulator (no GPU) the grids are tiny (8 x 8 tiles, TX = 4); on a GPU
the same tests run the full grid, plus the `gpu`-marked ones (many repeats).
"""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from numba import cuda

from nkattn.cuda_kernels.exact import exact_attention
from nkattn.cuda_kernels.lowrank import (
    MAX_WIDTH,
    attention_times,
    attention_transpose_times,
)
from nkattn.cuda_kernels.online_softmax import SIMULATOR_ORDER, kernel_order
from nkattn.reference.exact import attention_ref, streaming_order, visible_key_counts
from nkattn.reference.lowrank import (
    attention_times_ref,
    attention_transpose_times_ref,
)
from nkattn.testing import (
    assert_bit_identical,
    assert_within_budget,
    float32_floor,
    nan_padded_device_view,
    relative_error,
)

from .conftest import REAL_GPU, SIMULATOR


def case(b, h, hkv, nq, nk, d, l, causal=False, dtype=np.float64, key_lengths=None, marks=()):
    cid = (
        f"B{b}-H{h}-Hkv{hkv}-Nq{nq}-Nk{nk}-d{d}-l{l}{'-causal' if causal else ''}{'-kl' if key_lengths else ''}"
        f"-f{np.dtype(dtype).itemsize * 8}"
    )
    params = dict(b=b, h=h, hkv=hkv, nq=nq, nk=nk, d=d, l=l, causal=causal, dtype=dtype, key_lengths=key_lengths)
    return pytest.param(params, id=cid, marks=marks)


# the simulator runs 8 x 8 tiles with TX = 4: widths 4 and 8 run as they are, 1, 6 and 10 padded
SIM_GRID = [
    case(1, 1, 1, 1, 1, 16, 1),
    case(2, 2, 1, 9, 12, 16, 6, causal=True, key_lengths=(12, 5)),
    case(1, 2, 2, 17, 7, 16, 4, causal=True),
    case(1, 1, 1, 8, 16, 32, 10),
    case(1, 2, 1, 7, 9, 16, 8, causal=True, dtype=np.float32),
    case(2, 1, 1, 9, 8, 16, 5, dtype=np.float32, key_lengths=(0, 8)),
]

# GPU tiles: float32 128 keys (rows) x 64, float64 64 x 64; TX = 16, so l = 42 runs as 48
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
]

GRID = GPU_GRID if REAL_GPU else SIM_GRID


def make_inputs(c, seed=0):
    rng = np.random.default_rng(seed)
    dtype = c["dtype"]
    q = rng.standard_normal((c["b"], c["h"], c["nq"], c["d"])).astype(dtype)
    k = rng.standard_normal((c["b"], c["hkv"], c["nk"], c["d"])).astype(dtype)
    x = rng.standard_normal((c["b"], c["hkv"], c["nk"], c["l"])).astype(dtype)
    y = rng.standard_normal((c["b"], c["h"], c["nq"], c["l"])).astype(dtype)
    return q, k, x, y


def scale_of(c):
    return 1.0 / np.sqrt(c["d"])


def dense_attention_matrix(q, k, *, causal, scale, key_lengths, compute_dtype=np.float64):
    """A (B, H, Nq, Nk): the oracle's output with the identity as values (row i of A is O_i for V = I)."""
    batch, kv_heads, nk, _ = k.shape
    eye = np.broadcast_to(np.eye(nk, dtype=compute_dtype), (batch, kv_heads, nk, nk))
    a, _ = attention_ref(q, k, eye, causal=causal, scale=scale, key_lengths=key_lengths, compute_dtype=compute_dtype)
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


def check_float32(name, got, ref64, naive):
    """The float32 error budget on a GPU; the simulator does float32 math as NumPy
    scalars without FMA, so there it only catches indexing bugs (STYLE: no float32
    precision claims from the simulator)."""
    if SIMULATOR:
        assert relative_error(got, ref64) <= 1e-3, name
    else:
        assert_within_budget(name, got, ref64, naive, floor=float32_floor(ref64))


def run_times(q, k, x, c):
    o, lse = attention_times(q, k, x, c["key_lengths"], causal=c["causal"], scale=scale_of(c))
    return o.copy_to_host(), lse.copy_to_host()


def run_transpose(q, k, y, lse, c):
    return attention_transpose_times(q, k, y, lse, c["key_lengths"], causal=c["causal"], scale=scale_of(c)).copy_to_host()


@pytest.mark.parametrize("c", GRID)
def test_products_against_dense_float64_and_mirror(c):
    q, k, x, y = make_inputs(c)
    masks = dict(causal=c["causal"], scale=scale_of(c), key_lengths=c["key_lengths"])
    ax, lse = run_times(q, k, x, c)
    aty = run_transpose(q, k, y, lse, c)

    group = c["h"] // c["hkv"]
    a = dense_attention_matrix(q, k, **masks)
    ax_ref = np.einsum("bhqk,bhkl->bhql", a, np.repeat(x, group, axis=1).astype(np.float64))
    lse_ref = attention_ref(q, k, x, **masks)[1]
    aty_ref = np.einsum("bhqk,bhql->bhkl", a, y.astype(np.float64))
    if c["dtype"] == np.float64:
        assert relative_error(ax, ax_ref) <= 1e-12, "A·X"
        assert relative_error(lse, lse_ref) <= 1e-12, "lse"
        assert relative_error(aty, aty_ref) <= 1e-12, "AᵀY"
        # the kernels' exact order: bit for bit
        order = kernel_order(np.float64, c["d"])
        ax_mirror, lse_mirror = attention_times_ref(q, k, x, order=order, **masks)
        assert_bit_identical("A·X", ax, ax_mirror)
        assert_bit_identical("lse", lse, lse_mirror)
        assert_bit_identical("AᵀY", aty, attention_transpose_times_ref(q, k, y, lse, order=order, **masks))
    else:
        a32 = dense_attention_matrix(q, k, compute_dtype=np.float32, **masks)
        _, lse32 = attention_ref(q, k, x, compute_dtype=np.float32, **masks)
        check_float32("A·X", ax, ax_ref, a32 @ np.repeat(x, group, axis=1))
        check_float32("lse", lse, lse_ref, lse32)
        check_float32("AᵀY", aty, aty_ref, np.einsum("bhqk,bhql->bhkl", a32, y))
        # the operator alone, given the float32 lse it was handed
        given = dict(lse=lse, **masks)
        check_float32(
            "AᵀY (given lse)", aty,
            transpose_formula(q, k, y, compute_dtype=np.float64, **given),
            transpose_formula(q, k, y, compute_dtype=np.float32, **given),
        )


@pytest.mark.parametrize("canonical", [True, False], ids=["canonical-order", "simulator-order"])
def test_mirrors_match_dense_float64(canonical):
    rng = np.random.default_rng(2)
    for d, l in ((16, 5), (64, 42)):
        q = rng.standard_normal((2, 4, 37, d))
        k = rng.standard_normal((2, 2, 153, d))
        x = rng.standard_normal((2, 2, 153, l))
        y = rng.standard_normal((2, 4, 37, l))
        order = streaming_order(np.float64, d) if canonical else SIMULATOR_ORDER
        for causal in (False, True):
            for key_lengths in (None, (153, 20)):
                masks = dict(causal=causal, scale=0.3, key_lengths=key_lengths)
                a = dense_attention_matrix(q, k, **masks)
                ax, lse = attention_times_ref(q, k, x, order=order, **masks)
                assert relative_error(ax, np.einsum("bhqk,bhkl->bhql", a, np.repeat(x, 2, axis=1))) <= 1e-14
                aty = attention_transpose_times_ref(q, k, y, lse, order=order, **masks)
                assert relative_error(aty, np.einsum("bhqk,bhql->bhkl", a, y)) <= 1e-14
                keys = [0, 19, 20, 152]
                sample = attention_transpose_times_ref(q, k, y, lse, order=order, keys=keys, **masks)
                assert_bit_identical("AᵀY[keys]", sample, aty[:, :, keys])


def test_adjoint_identity_and_width_d_is_the_exact_kernel():
    # <A X, Y> = <X, Aᵀ Y> summed over a kv head's query heads; and at l = d, A·X is exact attention
    c = dict(b=1, h=2, hkv=1, nq=5, nk=9, d=16, l=16, causal=True, dtype=np.float64, key_lengths=None)
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
    c = dict(b=2, h=2, hkv=1, nq=12, nk=6, d=16, l=6, causal=True, dtype=dtype, key_lengths=(4, 0))
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
    size = dict(b=2, h=2, nq=300, nk=517, d=64, l=42) if REAL_GPU else dict(b=1, h=1, nq=9, nk=10, d=16, l=6)
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
    size = dict(h=2, nq=130, nk=203, d=32, l=42) if REAL_GPU else dict(h=1, nq=5, nk=12, d=16, l=6)
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
    c = dict(b=b, h=hkv * group, hkv=hkv, nq=nq, nk=nk, d=d, l=l, causal=causal, dtype=np.float64, key_lengths=key_lengths)
    q, k, x, y = make_inputs(c, seed=seed)
    ax, lse = run_times(q, k, x, c)
    aty = run_transpose(q, k, y, lse, c)
    masks = dict(causal=causal, scale=scale_of(c), key_lengths=key_lengths)
    order = kernel_order(np.float64, d)
    ax_mirror, lse_mirror = attention_times_ref(q, k, x, order=order, **masks)
    assert_bit_identical("A·X", ax, ax_mirror)
    assert_bit_identical("lse", lse, lse_mirror)
    assert_bit_identical("AᵀY", aty, attention_transpose_times_ref(q, k, y, lse, order=order, **masks))
    a = dense_attention_matrix(q, k, **masks)
    assert relative_error(ax, np.einsum("bhqk,bhkl->bhql", a, np.repeat(x, group, axis=1))) <= 1e-12
    assert relative_error(aty, np.einsum("bhqk,bhql->bhkl", a, y)) <= 1e-12


def test_bad_inputs_are_refused_with_the_argument_named():
    rng = np.random.default_rng(7)
    q = rng.standard_normal((2, 4, 5, 16))
    k = rng.standard_normal((2, 2, 7, 16))
    x = rng.standard_normal((2, 2, 7, 3))
    y = rng.standard_normal((2, 4, 5, 3))
    lse = np.zeros((2, 4, 5))
    times = dict(causal=False, scale=0.25)

    def refuses_times(error, match, **change):
        args = dict(q=q, k=k, x=x, key_lengths=None) | change
        with pytest.raises(error, match=match):
            attention_times(args["q"], args["k"], args["x"], args["key_lengths"], **(times | args.get("kw", {})))

    def refuses_transpose(error, match, **change):
        args = dict(q=q, k=k, y=y, lse=lse, key_lengths=None) | change
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
    refuses_times(ValueError, "^scale", kw=dict(scale=float("nan")))
    refuses_times(TypeError, "^out must be a device array", kw=dict(out=np.zeros((2, 4, 5, 3))))
    refuses_times(ValueError, "^out must be", kw=dict(out=cuda.to_device(np.zeros((2, 4, 5, 4)))))
    refuses_times(ValueError, "^lse must be", kw=dict(lse=cuda.to_device(np.zeros((2, 4, 6)))))

    refuses_transpose(ValueError, "^y must be", y=y[:, :2])
    refuses_transpose(ValueError, "^y must be", y=y[:, :, :4])
    refuses_transpose(ValueError, "^y's width", y=np.zeros((2, 4, 5, MAX_WIDTH + 1)))
    refuses_transpose(ValueError, "^lse must be", lse=lse[:, :, :4])
    refuses_transpose(ValueError, "^lse must be", lse=lse[..., None])
    refuses_transpose(ValueError, "^lse must be", lse=lse.astype(np.float32))
    refuses_transpose(TypeError, "^y must have q's dtype", y=y.astype(np.float32))
    refuses_transpose(ValueError, "^out must be", kw=dict(out=cuda.to_device(np.zeros((2, 4, 5, 3)))))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_many_repeated_gpu_runs_are_bit_identical(dtype):
    c = dict(b=2, h=8, hkv=2, nq=1000, nk=1531, d=64, l=42, dtype=dtype)
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
