"""Exact attention: kernel vs float64 oracle and bit-level mirror, determinism, invariance, extremes,
the row entropy.

Under the simulator (no GPU) the grids are tiny; on a GPU the same tests run the
full grid, plus the `gpu`-marked ones (float32 precision, many repeats).
"""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from numba import cuda

import nkattn
from nkattn.api import plan
from nkattn.cuda_kernels.exact import exact_attention, exact_attention_fold
from nkattn.cuda_kernels.online_softmax import SIMULATOR_ORDER, kernel_order
from nkattn.methods import METHODS, Request, method_options
from nkattn.reference.exact import (
    attention_ref,
    default_scale,
    streaming_attention_ref,
    streaming_order,
    visible_key_counts,
)
from nkattn.testing import (
    assert_bit_identical,
    assert_within_budget,
    float32_floor,
    nan_padded_device_view,
    relative_error,
)

from .conftest import REAL_GPU, SIMULATOR, check_float32


def case(b, h, hkv, nq, nk, d, causal=False, dtype=np.float64, key_lengths=None, marks=()):
    cid = f"B{b}-H{h}-Hkv{hkv}-Nq{nq}-Nk{nk}-d{d}{'-causal' if causal else ''}{'-kl' if key_lengths else ''}-f{np.dtype(dtype).itemsize * 8}"
    return pytest.param(dict(b=b, h=h, hkv=hkv, nq=nq, nk=nk, d=d, causal=causal, dtype=dtype, key_lengths=key_lengths), id=cid, marks=marks)


# the simulator's tiles are 8 x 8, so these cross tile edges (7, 8, 9, 17, ...) both ways
SIM_GRID = [
    case(1, 1, 1, 1, 1, 16),
    case(2, 2, 1, 9, 17, 16, causal=True),
    case(1, 2, 2, 17, 9, 16, causal=True),
    case(2, 1, 1, 7, 30, 16, key_lengths=(30, 5)),
    case(1, 1, 1, 15, 16, 32, causal=True, key_lengths=(11,)),
    case(1, 1, 1, 8, 9, 64),
    case(1, 1, 1, 5, 9, 128, causal=True),
    case(1, 1, 1, 3, 9, 256),
    case(1, 2, 1, 17, 9, 16, causal=True, dtype=np.float32),
    case(1, 1, 1, 9, 20, 64, dtype=np.float32),
]

GPU_GRID = [
    case(b, h, hkv, nq, nk, d, causal, dtype)
    for dtype in (np.float64, np.float32)
    for d in (16, 32, 64, 128, 256)
    for (nq, nk) in [(1, 1), (15, 15), (16, 16), (17, 17), (63, 63), (113, 203), (203, 113), (127, 128), (129, 129)]
    for causal in (False, True)
    for (b, h, hkv) in [(2, 3, 1)]
] + [case(3, 4, 2, 257, 300, 64, True, np.float32, key_lengths=(300, 0, 77)), case(3, 4, 2, 257, 300, 64, False, np.float64, key_lengths=(1, 150, 300))]

GRID = GPU_GRID if REAL_GPU else SIM_GRID


def make_inputs(c, seed=0, logit_scale=1.0):
    rng = np.random.default_rng(seed)
    q = (rng.standard_normal((c["b"], c["h"], c["nq"], c["d"])) * logit_scale).astype(c["dtype"])
    k = rng.standard_normal((c["b"], c["hkv"], c["nk"], c["d"])).astype(c["dtype"])
    v = rng.standard_normal((c["b"], c["hkv"], c["nk"], c["d"])).astype(c["dtype"])
    return q, k, v


def run_kernel(q, k, v, causal=False, key_lengths=None, scale=None):
    return nkattn.attention(q, k, v, causal=causal, key_lengths=key_lengths, scale=scale, return_lse=True, backend="cuda")


@pytest.mark.parametrize("c", GRID)
def test_kernel_within_error_budget_of_float64_oracle(c):
    q, k, v = make_inputs(c)
    o, lse = run_kernel(q, k, v, c["causal"], c["key_lengths"])
    o_ref, lse_ref = attention_ref(q, k, v, causal=c["causal"], key_lengths=c["key_lengths"])
    if c["dtype"] == np.float64:
        assert relative_error(o, o_ref) <= 1e-12
        assert relative_error(lse, lse_ref) <= 1e-12
    else:
        o_naive, lse_naive = attention_ref(q, k, v, causal=c["causal"], key_lengths=c["key_lengths"], compute_dtype=np.float32)
        check_float32("O", o, o_ref, o_naive)
        check_float32("lse", lse, lse_ref, lse_naive)


@pytest.mark.parametrize("c", [p for p in GRID if p.values[0]["dtype"] == np.float64])
def test_float64_kernel_bit_identical_to_streaming_reference(c):
    q, k, v = make_inputs(c, seed=1)
    o, lse = run_kernel(q, k, v, c["causal"], c["key_lengths"])
    order = kernel_order(np.float64, c["d"])
    o_ref, lse_ref = streaming_attention_ref(q, k, v, causal=c["causal"], key_lengths=c["key_lengths"], order=order)
    assert_bit_identical("O", o, o_ref)
    assert_bit_identical("lse", lse, lse_ref)


@pytest.mark.parametrize("canonical", [True, False], ids=["canonical-order", "simulator-order"])
def test_streaming_mirror_matches_oracle(canonical):
    rng = np.random.default_rng(2)
    for d in (16, 64, 256):
        q = rng.standard_normal((2, 4, 37, d))
        k, v = rng.standard_normal((2, 2, 2, 153, d))
        order = streaming_order(np.float64, d) if canonical else SIMULATOR_ORDER
        for causal in (False, True):
            for key_lengths in (None, (153, 20)):
                o_ref, lse_ref = attention_ref(q, k, v, causal=causal, key_lengths=key_lengths)
                o, lse = streaming_attention_ref(q, k, v, causal=causal, key_lengths=key_lengths, order=order)
                assert relative_error(o, o_ref) <= 1e-14
                assert relative_error(lse, lse_ref) <= 1e-14


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_repeated_runs_are_bit_identical(dtype):
    c = dict(b=2 if REAL_GPU else 1, h=2 if REAL_GPU else 1, hkv=1, nq=300 if REAL_GPU else 5, nk=517 if REAL_GPU else 9, d=64 if REAL_GPU else 16, dtype=dtype)
    q, k, v = make_inputs(c, seed=3)
    runs = [run_kernel(q, k, v, causal=True) for _ in range(10)]
    for o, lse in runs[1:]:
        assert_bit_identical("O", o, runs[0][0])
        assert_bit_identical("lse", lse, runs[0][1])


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("causal", [False, True])
def test_row_alone_equals_row_in_large_batch(dtype, causal):
    c = dict(b=3 if REAL_GPU else 2, h=4, hkv=2, nq=200 if REAL_GPU else 10, nk=200 if REAL_GPU else 10, d=64 if REAL_GPU else 16, dtype=dtype)
    q, k, v = make_inputs(c, seed=4)
    o_all, lse_all = run_kernel(q, k, v, causal=causal)
    for b, h, i in [(0, 0, 0), (c["b"] - 1, 3, c["nq"] - 1), (1, 2, c["nq"] // 2 + 1)]:
        kvh = h // 2
        keys = slice(0, i + 1) if causal else slice(None)
        o_one, lse_one = run_kernel(q[b : b + 1, h : h + 1, i : i + 1], k[b : b + 1, kvh : kvh + 1, keys], v[b : b + 1, kvh : kvh + 1, keys])
        assert_bit_identical(f"O[{b},{h},{i}]", o_one[0, 0, 0], o_all[b, h, i])
        assert_bit_identical(f"lse[{b},{h},{i}]", lse_one[0, 0, 0], lse_all[b, h, i])


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("logit", [1e4, -1e4])
def test_huge_logits_stay_finite_and_accurate(dtype, logit):
    c = dict(b=1, h=2, hkv=1, nq=9, nk=20, d=16, dtype=dtype)
    q, k, v = make_inputs(c, seed=5)
    # scores of magnitude ~1e4: plain exp would overflow, the running max must not
    q = (q / np.abs(q).max() * logit).astype(dtype)
    k = np.abs(k).astype(dtype)
    o, lse = run_kernel(q, k, v, causal=True)
    o_ref, lse_ref = attention_ref(q, k, v, causal=True)
    assert np.isfinite(o).all() and np.isfinite(lse).all()
    if dtype == np.float64:
        assert relative_error(o, o_ref) <= 1e-12
        assert relative_error(lse, lse_ref) <= 1e-12
    else:
        # scores of 1e4 carry an absolute float32 error of ~1e-3: judge against the naive float32 formula
        o_naive, lse_naive = attention_ref(q, k, v, causal=True, compute_dtype=np.float32)
        check_float32("O", o, o_ref, o_naive)
        check_float32("lse", lse, lse_ref, lse_naive)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_fully_masked_rows_give_zero_and_minus_inf(dtype):
    c = dict(b=2, h=1, hkv=1, nq=20, nk=6, d=16, dtype=dtype)
    q, k, v = make_inputs(c, seed=6)
    # causal with Nq > Nk: the first Nq - Nk rows see nothing; batch 1 has no keys at all
    o, lse = run_kernel(q, k, v, causal=True, key_lengths=np.array([6, 0]))
    assert not np.isnan(o).any() and not np.isnan(lse).any()
    assert (o[0, :, :14] == 0).all() and (lse[0, :, :14] == -np.inf).all()
    assert (o[1] == 0).all() and (lse[1] == -np.inf).all()
    assert np.isfinite(lse[0, :, 14:]).all()


def test_single_key_returns_its_value():
    q = np.random.default_rng(7).standard_normal((1, 1, 5, 16))
    k = np.ones((1, 1, 1, 16))
    v = np.arange(16, dtype=np.float64).reshape(1, 1, 1, 16)
    o, lse = run_kernel(q, k, v)
    assert_bit_identical("O", o, np.broadcast_to(v, o.shape).copy())
    np.testing.assert_allclose(lse, q.sum(-1) / 4.0, rtol=1e-13)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_views_into_nan_padded_buffers(dtype):
    c = dict(b=2, h=2, hkv=1, nq=130 if REAL_GPU else 9, nk=203 if REAL_GPU else 17, d=32 if REAL_GPU else 16, dtype=dtype)
    q, k, v = make_inputs(c, seed=8)
    lengths = cuda.to_device(np.array([c["nk"], c["nk"] - 7], dtype=np.int32))
    o_view, lse_view = exact_attention(*(nan_padded_device_view(x) for x in (q, k, v)), lengths, causal=True, scale=0.25)
    o_cont, lse_cont = exact_attention(*(cuda.to_device(x) for x in (q, k, v)), lengths, causal=True, scale=0.25)
    o_view, lse_view = o_view.copy_to_host(), lse_view.copy_to_host()
    assert not np.isnan(o_view).any() and not np.isnan(lse_view).any()
    assert_bit_identical("O", o_view, o_cont.copy_to_host())
    assert_bit_identical("lse", lse_view, lse_cont.copy_to_host())


@pytest.mark.parametrize("dtype", [np.float64, np.float32] if REAL_GPU else [np.float64])
def test_folding_key_chunks_in_order_gives_the_one_launch_bits(dtype):
    # the resume entry on query runs that start and end inside a row block, keys in chunks of whole
    # key tiles: causal with Nq < Nk, a key mask, GQA (the simulator: float64 only; the arithmetic
    # of the two flavours is the same Python there)
    bn = kernel_order(dtype, 16).block_n
    c = {"b": 2 if REAL_GPU else 1, "h": 2, "hkv": 1, "nq": bn + 1, "nk": 3 * bn if REAL_GPU else 2 * bn, "d": 16, "dtype": dtype}
    q, k, v = make_inputs(c, seed=12)
    lengths = np.array([c["nk"] - 3, bn + 2][: c["b"]], dtype=np.int32)
    o_ref, lse_ref = (x.copy_to_host() for x in exact_attention(*(cuda.to_device(x) for x in (q, k, v)), cuda.to_device(lengths),
                                                                 causal=True, scale=0.25))
    chunks = range(0, c["nk"], bn)
    for rows in (slice(0, bn // 2), slice(bn // 2, c["nq"])):
        n = rows.stop - rows.start
        out, lse, l_state = cuda.device_array((c["b"], 2, n, 16), dtype), cuda.device_array((c["b"], 2, n), dtype), cuda.device_array((c["b"], 2, n), dtype)
        for i, k0 in enumerate(chunks):
            keys = slice(k0, k0 + bn)
            exact_attention_fold(
                *(cuda.to_device(np.ascontiguousarray(x)) for x in (q[:, :, rows], k[:, :, keys], v[:, :, keys])), cuda.to_device(lengths),
                out, lse, l_state, causal=True, scale=0.25, row_offset=rows.start, nq_total=c["nq"], key_offset=k0,
                first=i == 0, last=i == len(chunks) - 1,
            )
        assert_bit_identical(f"O[{rows}]", out.copy_to_host(), o_ref[:, :, rows])
        assert_bit_identical(f"lse[{rows}]", lse.copy_to_host(), lse_ref[:, :, rows])


def test_every_output_element_is_written():
    c = dict(b=2, h=3, hkv=3, nq=9, nk=11, d=16, dtype=np.float32)
    q, k, v = make_inputs(c, seed=9)
    out = cuda.to_device(np.full(q.shape, np.nan, dtype=np.float32))
    lse = cuda.to_device(np.full(q.shape[:3], np.nan, dtype=np.float32))
    lengths = cuda.to_device(np.array([11, 0], dtype=np.int32))
    exact_attention(*(cuda.to_device(x) for x in (q, k, v)), lengths, causal=False, scale=0.25, out=out, lse=lse)
    assert not np.isnan(out.copy_to_host()).any()
    assert not np.isnan(lse.copy_to_host()).any()


@settings(max_examples=6 if SIMULATOR else 60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    b=st.integers(1, 2),
    hkv=st.integers(1, 2),
    group=st.integers(1, 2),
    nq=st.integers(1, 20 if SIMULATOR else 300),
    nk=st.integers(1, 20 if SIMULATOR else 300),
    d=st.sampled_from([16] if SIMULATOR else [16, 32, 64, 128, 256]),
    causal=st.booleans(),
    masked=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_float64_kernel_matches_mirror_and_oracle(b, hkv, group, nq, nk, d, causal, masked, seed):
    rng = np.random.default_rng(seed)
    c = dict(b=b, h=hkv * group, hkv=hkv, nq=nq, nk=nk, d=d, dtype=np.float64)
    q, k, v = make_inputs(c, seed=seed)
    key_lengths = rng.integers(0, nk + 1, size=b) if masked else None
    o, lse = run_kernel(q, k, v, causal, key_lengths)
    o_mirror, lse_mirror = streaming_attention_ref(q, k, v, causal=causal, key_lengths=key_lengths, order=kernel_order(np.float64, d))
    assert_bit_identical("O", o, o_mirror)
    assert_bit_identical("lse", lse, lse_mirror)
    o_ref, lse_ref = attention_ref(q, k, v, causal=causal, key_lengths=key_lengths)
    assert relative_error(o, o_ref) <= 1e-12
    assert relative_error(lse, lse_ref) <= 1e-12


def test_canonical_order_fits_one_block():
    for dtype in (np.float32, np.float64):
        for d in (16, 32, 64, 128, 256):
            order = streaming_order(dtype, d)
            assert d % order.threads_x == 0, "head dims split evenly over a row's threads"
            assert order.threads_x <= 32 and 32 % order.threads_x == 0, "a row's threads are lanes of one warp"
            assert order.threads <= 1024
            # H100 / A100: at most 227 KB of shared memory per block
            assert order.shared_elements(d, 16 // np.dtype(dtype).itemsize) * np.dtype(dtype).itemsize <= 227 * 1024


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_many_repeated_gpu_runs_are_bit_identical(dtype):
    c = dict(b=2, h=8, hkv=2, nq=1000, nk=1531, d=64, dtype=dtype)
    q, k, v = (cuda.to_device(x) for x in make_inputs(c, seed=10))
    lengths = cuda.to_device(np.array([1531, 900], dtype=np.int32))
    first = [x.copy_to_host() for x in exact_attention(q, k, v, lengths, causal=True, scale=0.125)]
    for _ in range(100):
        again = [x.copy_to_host() for x in exact_attention(q, k, v, lengths, causal=True, scale=0.125)]
        assert_bit_identical("O", again[0], first[0])
        assert_bit_identical("lse", again[1], first[1])


@pytest.mark.gpu
@pytest.mark.parametrize("framework", ["torch", "cupy"])
def test_device_tensors_in_device_tensors_out(framework):
    lib = pytest.importorskip(framework)
    rng = np.random.default_rng(11)
    host = [rng.standard_normal((1, 4, 100, 64)).astype(np.float32) for _ in range(3)]
    if framework == "torch":
        dev = [lib.from_numpy(x).cuda() for x in host]
        before = [x.clone() for x in dev]
    else:
        dev = [lib.asarray(x) for x in host]
        before = [x.copy() for x in dev]
    out = nkattn.attention(*dev, causal=True)
    assert type(out) is type(dev[0])
    got = out.cpu().numpy() if framework == "torch" else lib.asnumpy(out)
    np.testing.assert_array_equal(got, nkattn.attention(*host, causal=True))
    for x, y in zip(dev, before):
        assert bool((x == y).all())


# --------------------------------------------------------------------------------------
# row entropy (return_entropy=True): the oracle, the mirror, the kernel's compile-time variant
# --------------------------------------------------------------------------------------


def entropy_by_definition(q, k, causal=False, key_lengths=None):
    """-Σ p log p from the oracle's probabilities, written independently of its entropy."""
    identity = np.broadcast_to(np.eye(k.shape[2]), (*k.shape[:2], k.shape[2], k.shape[2]))
    p = attention_ref(q, k, identity, causal=causal, key_lengths=key_lengths)[0]  # O with v = I: the rows of P
    with np.errstate(divide="ignore", invalid="ignore"):
        return -np.where(p > 0, p * np.log(p), 0.0).sum(-1)


@pytest.mark.parametrize("canonical", [True, False], ids=["canonical-order", "simulator-order"])
def test_entropy_of_mirror_and_oracle_match_the_definition(canonical):
    rng = np.random.default_rng(14)
    for d, logit_scale in ((16, 1.0), (64, 6.0)):
        q = rng.standard_normal((2, 4, 37, d)) * logit_scale
        k, v = rng.standard_normal((2, 2, 2, 41, d))
        order = streaming_order(np.float64, d) if canonical else SIMULATOR_ORDER
        for causal in (False, True):
            for key_lengths in (None, (41, 0)):
                o_ref, lse_ref, h_ref = attention_ref(q, k, v, causal=causal, key_lengths=key_lengths, return_entropy=True)
                o, lse, h = streaming_attention_ref(q, k, v, causal=causal, key_lengths=key_lengths, order=order,
                                                    return_entropy=True)
                assert relative_error(h_ref, entropy_by_definition(q, k, causal, key_lengths)) <= 1e-14
                assert relative_error(h, h_ref) <= 1e-14
                # asking for the entropy changes nothing else, to the bit
                without = (*attention_ref(q, k, v, causal=causal, key_lengths=key_lengths),
                           *streaming_attention_ref(q, k, v, causal=causal, key_lengths=key_lengths, order=order))
                for name, got, expected in zip(("O", "lse", "O mirror", "lse mirror"), (o_ref, lse_ref, o, lse), without):
                    assert_bit_identical(name, got, expected)


ENTROPY_SIM_GRID = [
    case(1, 2, 1, 9, 17, 16, causal=True),
    case(2, 1, 1, 7, 12, 32, key_lengths=(12, 0)),
    case(1, 2, 2, 11, 6, 16, causal=True, dtype=np.float32),
    case(2, 2, 1, 5, 9, 32, key_lengths=(9, 4), dtype=np.float32),
]

ENTROPY_GRID = GPU_GRID if REAL_GPU else ENTROPY_SIM_GRID


def run_kernel_entropy(q, k, v, causal=False, key_lengths=None):
    """(O, lse, entropy) from the FFMA kernel's entropy variant, at the default scale."""
    lengths = np.full(q.shape[0], k.shape[2], np.int32) if key_lengths is None else np.asarray(key_lengths, np.int32)
    results = exact_attention(*(cuda.to_device(x) for x in (q, k, v)), cuda.to_device(lengths), causal=causal,
                              scale=default_scale(q.shape[-1]), return_entropy=True)
    return tuple(x.copy_to_host() for x in results)


@pytest.mark.parametrize("c", ENTROPY_GRID)
def test_entropy_kernel_within_budget_and_float64_bit_identical_to_mirror(c):
    q, k, v = make_inputs(c, seed=15, logit_scale=3.0)
    o, lse, h = run_kernel_entropy(q, k, v, c["causal"], c["key_lengths"])
    _, _, h_ref = attention_ref(q, k, v, causal=c["causal"], key_lengths=c["key_lengths"], return_entropy=True)
    if c["dtype"] == np.float64:
        mirror = streaming_attention_ref(q, k, v, causal=c["causal"], key_lengths=c["key_lengths"],
                                         order=kernel_order(np.float64, c["d"]), return_entropy=True)
        for name, got, expected in zip(("O", "lse", "entropy"), (o, lse, h), mirror):
            assert_bit_identical(name, got, expected)
        assert relative_error(h, h_ref) <= 1e-12
    else:
        _, _, h_naive = attention_ref(q, k, v, causal=c["causal"], key_lengths=c["key_lengths"], return_entropy=True,
                                      compute_dtype=np.float32)
        check_float32("entropy", h, h_ref, h_naive)


@settings(max_examples=4 if SIMULATOR else 60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    b=st.integers(1, 2),
    hkv=st.integers(1, 2),
    group=st.integers(1, 2),
    nq=st.integers(1, 12 if SIMULATOR else 300),
    nk=st.integers(1, 20 if SIMULATOR else 300),
    d=st.sampled_from([16] if SIMULATOR else [16, 32, 64, 128, 256]),
    causal=st.booleans(),
    masked=st.booleans(),
    logit_scale=st.sampled_from([0.0, 1.0, 30.0]),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_float64_entropy_matches_mirror_and_oracle(b, hkv, group, nq, nk, d, causal, masked, logit_scale, seed):
    rng = np.random.default_rng(seed)
    c = {"b": b, "h": hkv * group, "hkv": hkv, "nq": nq, "nk": nk, "d": d, "dtype": np.float64}
    q, k, v = make_inputs(c, seed=seed, logit_scale=logit_scale)
    key_lengths = rng.integers(0, nk + 1, size=b) if masked else None
    _, _, h = run_kernel_entropy(q, k, v, causal, key_lengths)
    _, _, h_mirror = streaming_attention_ref(q, k, v, causal=causal, key_lengths=key_lengths,
                                             order=kernel_order(np.float64, d), return_entropy=True)
    assert_bit_identical("entropy", h, h_mirror)
    _, _, h_ref = attention_ref(q, k, v, causal=causal, key_lengths=key_lengths, return_entropy=True)
    assert relative_error(h, h_ref) <= 1e-12
    # two terms >= 0 make H >= 0 exactly; at most ln n over n visible keys, up to log's rounding
    n_visible = np.maximum(visible_key_counts(b, nq, nk, causal, key_lengths), 1)[:, None]
    assert (h >= 0).all() and (h <= np.log(n_visible) * (1 + 4 * np.finfo(np.float64).eps)).all()


@pytest.mark.gpu
@pytest.mark.parametrize("logit_scale", [0.2, 1.0, 8.0], ids=["flat", "plain", "sharp"])
def test_float32_entropy_within_error_budget_on_gpu(logit_scale):
    # rows of high entropy (flat), plain and near one-hot (sharp) against float64, with the budget
    # set by the naive float32 formula; O and lse of the entropy kernel are held to the same rule
    c = {"b": 2, "h": 8, "hkv": 2, "nq": 1000, "nk": 1531, "d": 64, "dtype": np.float32}
    q, k, v = make_inputs(c, seed=18, logit_scale=logit_scale)
    key_lengths = np.array([1531, 900])
    got = run_kernel_entropy(q, k, v, True, key_lengths)
    ref = attention_ref(q, k, v, causal=True, key_lengths=key_lengths, return_entropy=True)
    naive = attention_ref(q, k, v, causal=True, key_lengths=key_lengths, return_entropy=True, compute_dtype=np.float32)
    for name, g, r, n in zip(("O", "lse", "entropy"), got, ref, naive):
        assert_within_budget(name, g, r, n, floor=float32_floor(r))


def extreme_rows(dtype):
    """Batch 0 one-hot rows, batch 1 uniform rows over up to 3 keys, batch 2 no key at all; causal
    with Nq = 6 > Nk = 4 hides every key from rows 0 and 1."""
    b, nq, nk, d = 3, 6, 4, 16
    q = np.zeros((b, 1, nq, d))
    k = np.zeros((b, 1, nk, d))
    k[0, 0, :, :nk] = np.eye(nk)
    for i in range(2, nq):
        q[0, 0, i, min(i - 2, nk - 1)] = 4e4  # a score of 1e4 on the row's last visible key, 0 elsewhere
    v = np.random.default_rng(16).standard_normal((b, 1, nk, d))
    key_lengths = np.array([nk, 3, 0])
    visible = visible_key_counts(b, nq, nk, True, key_lengths)[:, None, :]
    return (q.astype(dtype), k.astype(dtype), v.astype(dtype)), key_lengths, visible


@pytest.mark.parametrize("backend", ["cuda", "reference"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_entropy_of_one_hot_uniform_and_empty_rows(backend, dtype):
    (q, k, v), key_lengths, visible = extreme_rows(dtype)
    o, lse, h = nkattn.attention(q, k, v, causal=True, key_lengths=key_lengths, return_lse=True, return_entropy=True,
                                 backend=backend)
    assert h.dtype == dtype and not np.isnan(h).any()
    seen = visible > 0
    assert (h[0] == 0).all(), "one-hot rows (and rows that see nothing) have entropy 0"
    np.testing.assert_allclose(h[1][seen[1]], np.log(visible[1][seen[1]]), rtol=4 * np.finfo(dtype).eps)
    assert (h[~seen] == 0).all() and (o[~seen] == 0).all() and (lse[~seen] == -np.inf).all()


def test_return_entropy_composes_with_return_lse_and_device_arrays():
    c = {"b": 1, "h": 1, "hkv": 1, "nq": 5, "nk": 9, "d": 16, "dtype": np.float64}
    q, k, v = make_inputs(c, seed=17)
    o, lse = nkattn.attention(q, k, v, causal=True, return_lse=True, backend="cuda")
    o_h, h = nkattn.attention(q, k, v, causal=True, return_entropy=True, backend="cuda")
    o_dev, lse_dev, h_dev = nkattn.attention(*(cuda.to_device(x) for x in (q, k, v)), causal=True, return_lse=True,
                                             return_entropy=True, backend="cuda")
    assert all(hasattr(x, "copy_to_host") for x in (o_dev, lse_dev, h_dev)) and h_dev.shape == lse.shape
    for name, got, expected in (("O", o_h, o), ("O", o_dev.copy_to_host(), o), ("lse", lse_dev.copy_to_host(), lse),
                                ("entropy", h_dev.copy_to_host(), h)):
        assert_bit_identical(name, got, expected)
    with pytest.raises(TypeError, match="return_entropy must be True or False, got 'yes'"):
        nkattn.attention(q, k, v, return_entropy="yes")


@pytest.mark.parametrize("method, options", [("lsh", {}), ("table", {}), ("lowrank", {"rank": 2})])
def test_methods_other_than_exact_refuse_return_entropy_with_a_reason(method, options):
    q, k, v = make_inputs({"b": 1, "h": 1, "hkv": 1, "nq": 8, "nk": 8, "d": 16, "dtype": np.float64})
    with pytest.raises(ValueError) as info:
        nkattn.attention(q, k, v, method=method, return_entropy=True, **options)
    message = str(info.value)
    assert f"no backend can run method={method!r}" in message
    for backend in METHODS[method].backends:
        assert f"{backend.label}: no row entropy here (return_entropy=True): only method='exact' computes it" in message
    assert plan(q, k, v, method=method, **options)[1].name == "cuda"  # the same call without it is taken


def test_only_the_ffma_kernel_and_the_float64_reference_take_return_entropy():
    # a backend added later must say whether it computes the entropy, or it would drop it
    computes = {("exact", "cuda (FFMA kernel)"), ("exact", "reference (NumPy float64)")}
    for method, entry in METHODS.items():
        req = Request(method=method, dtype=np.dtype(np.float32), batch=1, heads=1, kv_heads=1, nq=8, nk=8, head_dim=16,
                      value_dim=16, causal=False, key_lengths=False, on_device=False, scale=None, precision=None,
                      options=method_options(method, {}), entropy=True)
        for backend in entry.backends:
            refuses = any("return_entropy=True" in reason for reason in backend.supports(req))
            assert refuses != ((method, backend.label) in computes), f"{method}: {backend.label}"


def test_the_tensor_core_kernel_refuses_return_entropy_and_the_reference_takes_it():
    c = {"b": 1, "h": 1, "hkv": 1, "nq": 8, "nk": 8, "d": 16, "dtype": np.float16}
    q, k, v = make_inputs(c)
    assert plan(q, k, v, return_entropy=True)[1].label == "reference (NumPy float64)"
    o, lse, h = nkattn.attention(q, k, v, return_lse=True, return_entropy=True)
    assert o.dtype == np.float16 and lse.dtype == h.dtype == np.float32
    with pytest.raises(ValueError, match=r"cuda \(tensor-core kernel\): [^\n]*no row entropy here \(return_entropy=True\)"):
        nkattn.attention(q, k, v, return_entropy=True, backend="cuda")
