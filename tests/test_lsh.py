"""LSH attention: references against each other and theory, kernel against the references.

The kernel must reproduce the reference's candidate sets exactly (same codes,
same stable bucket order) and its outputs within the float32 budget computed over
those candidates; float64 within 1e-12. Under the simulator the grids are tiny.
"""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numba import cuda
from scipy import stats

import nkattn
from nkattn.cuda_kernels.lsh import lsh_attention
from nkattn.reference.exact import attention_ref
from nkattn.reference.lsh import (
    MAX_BITS,
    collision_probability,
    hyperplanes,
    lsh_attention_mirror,
    lsh_attention_ref,
    simhash,
)
from nkattn.testing import (
    assert_bit_identical,
    assert_within_budget,
    float32_floor,
    nan_padded_device_view,
    relative_error,
)

from .conftest import REAL_GPU, SIMULATOR


def case(b, h, hkv, nq, nk, d, bits, tables, causal=False, dtype=np.float32, key_lengths=None, shared_qk=False):
    cid = (
        f"B{b}-H{h}-Hkv{hkv}-Nq{nq}-Nk{nk}-d{d}-b{bits}-L{tables}{'-causal' if causal else ''}"
        f"{'-kl' if key_lengths else ''}{'-sharedqk' if shared_qk else ''}-f{np.dtype(dtype).itemsize * 8}"
    )
    c = dict(b=b, h=h, hkv=hkv, nq=nq, nk=nk, d=d, bits=bits, tables=tables, causal=causal, dtype=dtype,
             key_lengths=key_lengths, shared_qk=shared_qk)
    return pytest.param(c, id=cid)


# the simulator's kernel tiles are 8 x 8 and its sort tiles 4 elements: these cross both
SIM_GRID = [
    case(1, 1, 1, 19, 23, 16, bits=2, tables=2, causal=True, key_lengths=(20,)),
    case(1, 2, 1, 9, 17, 16, bits=3, tables=3, dtype=np.float64),
    case(1, 1, 1, 17, 17, 16, bits=2, tables=2, shared_qk=True, causal=True),
]

GPU_GRID = [
    case(b, h, hkv, nq, nk, d, bits, tables, causal, dtype)
    for dtype in (np.float32, np.float64)
    for d in (16, 64, 128)
    for (nq, nk) in [(1, 1), (17, 17), (113, 203), (203, 113), (1000, 1000)]
    for (bits, tables) in [(1, 1), (3, 4), (9, 2)]
    for causal in (False, True)
    for (b, h, hkv) in [(2, 2, 1)]
] + [
    case(3, 4, 2, 257, 300, 64, 4, 3, True, key_lengths=(300, 0, 77)),
    case(2, 2, 2, 300, 300, 64, 3, 3, True, shared_qk=True),
    case(1, 2, 2, 513, 513, 32, 2, 5, False, np.float64, shared_qk=True),
    case(1, 1, 1, 4097, 5000, 64, 16, 8),
    case(1, 1, 1, 3000, 3000, 64, 10, 64),
]

GRID = GPU_GRID if REAL_GPU else SIM_GRID


def make_inputs(c, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((c["b"], c["h"], c["nq"], c["d"])).astype(c["dtype"])
    k = None if c["shared_qk"] else rng.standard_normal((c["b"], c["hkv"], c["nk"], c["d"])).astype(c["dtype"])
    nv, hv = (c["nq"], c["h"]) if c["shared_qk"] else (c["nk"], c["hkv"])
    v = rng.standard_normal((c["b"], hv, nv, c["d"])).astype(c["dtype"])
    return q, k, v


def lsh_kwargs(c, seed=0):
    return dict(lsh_bits=c["bits"], lsh_tables=c["tables"], seed=seed, lsh_shared_qk=c["shared_qk"] or None)


def ref_kwargs(c, seed=0):
    return dict(bits=c["bits"], tables=c["tables"], seed=seed, causal=c["causal"], key_lengths=c["key_lengths"],
                shared_qk=c["shared_qk"])


# --------------------------------------------------------------------------------------
# references
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("shared_qk", [False, True], ids=["separate-qk", "shared-qk"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_mirror_matches_oracle(causal, shared_qk):
    rng = np.random.default_rng(4)
    b, h, n, d = 2, 4, 37, 16
    hkv, nk = (h, n) if shared_qk else (2, 45)
    q = rng.standard_normal((b, h, n, d))
    k = None if shared_qk else rng.standard_normal((b, hkv, nk, d))
    v = rng.standard_normal((b, hkv, nk, d))
    for bits, tables in [(1, 1), (3, 3), (5, 8)]:
        kw = dict(bits=bits, tables=tables, seed=5, causal=causal, key_lengths=(nk, 20), shared_qk=shared_qk)
        o_ref, lse_ref, _ = lsh_attention_ref(q, k, v, **kw)
        o, lse = lsh_attention_mirror(q, k, v, **kw)
        assert relative_error(o, o_ref) <= 1e-12
        assert relative_error(lse, lse_ref) <= 1e-12


def test_one_bucket_for_everything_is_exact_attention():
    # positive multiples of one direction hash identically: every visible key is a candidate
    rng = np.random.default_rng(6)
    u = rng.standard_normal(32)
    q = rng.uniform(0.5, 2.0, (1, 2, 20, 1)) * u
    k = rng.uniform(0.5, 2.0, (1, 2, 25, 1)) * u
    v = rng.standard_normal((1, 2, 25, 32))
    # bottom-right causal with Nq = 20, Nk = 25: query i sees keys 0..i + 5
    visible = {False: np.ones((20, 25), bool), True: np.tri(20, 25, 5, dtype=bool)}
    for causal in (False, True):
        o, lse, cand = lsh_attention_ref(q, k, v, bits=MAX_BITS, tables=3, seed=1, causal=causal)
        o_ref, lse_ref = attention_ref(q, k, v, causal=causal)
        assert np.array_equal(cand, np.broadcast_to(visible[causal], cand.shape)), causal
        assert relative_error(o, o_ref) <= 1e-14 and relative_error(lse, lse_ref) <= 1e-14


def test_query_with_empty_buckets_gives_zero_output_and_minus_inf_lse():
    rng = np.random.default_rng(7)
    q, k, v = rng.standard_normal((3, 1, 1, 40, 16))
    o, lse, cand = lsh_attention_ref(q, k, v, bits=12, tables=1, seed=0)
    empty = ~cand.any(-1)
    assert empty.sum() >= 10  # 4096 buckets, 40 keys: most queries find nothing
    assert not np.isnan(o).any() and not np.isnan(lse).any()
    assert (o[empty] == 0).all() and np.isneginf(lse[empty]).all()
    assert np.isfinite(lse[~empty]).all()


@pytest.mark.parametrize("seed", range(5))
def test_collision_rate_matches_simhash_theory(seed):
    # per pair, one table of one bit collides with probability 1 - θ/π; over many
    # independent hyperplanes the count is binomial
    rng = np.random.default_rng(100 + seed)
    d, n_planes = 64, 4000
    x = rng.standard_normal(d)
    for cos in (0.9, 0.5, 0.0, -0.7):
        ortho = rng.standard_normal(d)
        ortho -= ortho @ x / (x @ x) * x
        y = cos * x / np.linalg.norm(x) + np.sqrt(1 - cos**2) * ortho / np.linalg.norm(ortho)
        planes = hyperplanes(d, 1, n_planes, seed)
        same = (simhash(x[None], planes) == simhash(y[None], planes)).sum()
        p = float(collision_probability(cos, 1, 1))
        lo, hi = stats.binom.interval(0.9999, n_planes, p)
        assert lo <= same <= hi, (cos, same / n_planes, p)


def test_collision_probability_formula():
    assert collision_probability(1.0, 16, 1) == 1.0
    assert collision_probability(-1.0, 1, 5) == 0.0
    assert np.isclose(collision_probability(0.0, 2, 1), 0.25)
    assert np.isclose(collision_probability(0.0, 1, 2), 0.75)


# --------------------------------------------------------------------------------------
# bad parameters
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(lsh_bits=0), "lsh_bits"),
        (dict(lsh_bits=MAX_BITS + 1), "lsh_bits"),
        (dict(lsh_bits=2.5), "lsh_bits"),
        (dict(lsh_tables=0), "lsh_tables"),
        (dict(lsh_tables=True), "lsh_tables"),
        (dict(seed=-1), "seed"),
    ],
)
def test_bad_lsh_parameters_raise_clear_errors(kwargs, message):
    q = np.zeros((1, 1, 4, 16), np.float32)
    with pytest.raises(ValueError, match=message):
        nkattn.attention(q, q, q, method="lsh", **kwargs)


def test_lsh_options_rejected_for_other_methods_and_shared_qk_needs_no_k():
    q = np.zeros((1, 1, 4, 16), np.float32)
    with pytest.raises(ValueError, match="only apply to method='lsh'"):
        nkattn.attention(q, q, q, lsh_bits=4)
    with pytest.raises(ValueError, match="pass k=None"):
        nkattn.attention(q, q, q, method="lsh", lsh_shared_qk=True)
    with pytest.raises(ValueError, match="lsh_shared_qk"):
        nkattn.attention(q, None, np.zeros((1, 1, 5, 16), np.float32), method="lsh", lsh_shared_qk=True)


def test_reference_backend_serves_lsh():
    rng = np.random.default_rng(8)
    q, k, v = rng.standard_normal((3, 1, 2, 12, 16))
    o = nkattn.attention(q, k, v, method="lsh", lsh_bits=3, lsh_tables=2, seed=4, backend="reference")
    o_ref, _, _ = lsh_attention_ref(q, k, v, bits=3, tables=2, seed=4)
    assert np.array_equal(o, o_ref)


# --------------------------------------------------------------------------------------
# kernel
# --------------------------------------------------------------------------------------


def check_float32(name, got, ref64, naive):
    if SIMULATOR:  # float32 precision is only meaningful on a GPU (see test_exact)
        assert relative_error(got, ref64) <= 1e-3, name
    else:
        assert_within_budget(name, got, ref64, naive, floor=float32_floor(ref64))


@pytest.mark.parametrize("c", GRID)
def test_kernel_matches_reference(c):
    q, k, v = make_inputs(c)
    o, lse = nkattn.attention(q, k, v, method="lsh", causal=c["causal"], key_lengths=c["key_lengths"],
                              return_lse=True, backend="cuda", **lsh_kwargs(c))
    o_ref, lse_ref, _ = lsh_attention_ref(q, k, v, **ref_kwargs(c))
    if c["dtype"] == np.float64:
        assert relative_error(o, o_ref) <= 1e-12
        assert relative_error(lse, lse_ref) <= 1e-12
    else:
        o_naive, lse_naive, _ = lsh_attention_ref(q, k, v, **ref_kwargs(c), compute_dtype=np.float32)
        check_float32("O", o, o_ref, o_naive)
        check_float32("lse", lse, lse_ref, lse_naive)


@pytest.mark.parametrize("c", GRID[:1] if SIMULATOR else GRID[-6:])
def test_kernel_candidate_sets_equal_reference(c):
    # same codes, the same stable bucket order, the same bucket bounds
    q, k, v = make_inputs(c)
    kd = None if k is None else cuda.to_device(k)
    lengths = cuda.to_device(np.full(c["b"], c["nk"], np.int32))
    *_, buckets = lsh_attention(cuda.to_device(q), kd, cuda.to_device(v), lengths, bits=c["bits"], tables=c["tables"],
                                seed=2, causal=False, scale=0.25, shared_qk=c["shared_qk"], return_buckets=True)
    planes = hyperplanes(c["d"], c["bits"], c["tables"], 2)
    q_codes = simhash(q, planes)
    assert np.array_equal(buckets.q_codes.copy_to_host(), np.swapaxes(q_codes, -1, -2))
    order = np.argsort(q_codes, axis=-1, kind="stable")
    assert np.array_equal(buckets.q_perm.copy_to_host(), order)
    assert np.array_equal(buckets.q_sorted.copy_to_host(), np.take_along_axis(q_codes, order, -1))
    k_codes = np.swapaxes(buckets.k_codes.copy_to_host(), -1, -2)
    start, end = buckets.k_start.copy_to_host(), buckets.k_end.copy_to_host()
    for bucket in range(min(1 << c["bits"], 64)):
        assert np.array_equal(end[..., bucket] - start[..., bucket], (k_codes == bucket).sum(-1))


def test_kernel_rows_with_empty_buckets():
    c = dict(b=1, h=1, hkv=1, nq=24, nk=9, d=16, dtype=np.float32, shared_qk=False)
    q, k, v = make_inputs(c, seed=9)
    o, lse = nkattn.attention(q, k, v, method="lsh", lsh_bits=10, lsh_tables=1, return_lse=True, backend="cuda")
    _, _, cand = lsh_attention_ref(q, k, v, bits=10, tables=1)
    empty = ~cand.any(-1)
    assert empty.sum() >= 10
    assert (o[empty] == 0).all() and np.isneginf(lse[empty]).all()
    assert not np.isnan(o).any()


def test_kernel_repeated_runs_are_bit_identical():
    n = 3000 if REAL_GPU else 12
    c = dict(b=1, h=2 if REAL_GPU else 1, hkv=1, nq=n, nk=n, d=64 if REAL_GPU else 16, dtype=np.float32, shared_qk=False)
    q, k, v = make_inputs(c, seed=10)
    runs = [nkattn.attention(q, k, v, method="lsh", lsh_bits=6, lsh_tables=4, causal=True, return_lse=True, backend="cuda")
            for _ in range(10 if REAL_GPU else 2)]
    for o, lse in runs[1:]:
        assert_bit_identical("O", o, runs[0][0])
        assert_bit_identical("lse", lse, runs[0][1])


@pytest.mark.gpu
def test_kernel_on_nan_padded_views_reads_nothing_outside():
    c = dict(b=2, h=2, hkv=1, nq=700, nk=650, d=64, dtype=np.float32, shared_qk=False)
    q, k, v = make_inputs(c, seed=11)
    lengths = cuda.to_device(np.array([650, 600], np.int32))
    kw = dict(bits=5, tables=3, causal=True, scale=0.125)
    o_view, lse_view = lsh_attention(*(nan_padded_device_view(x) for x in (q, k, v)), lengths, **kw)
    o_cont, lse_cont = lsh_attention(*(cuda.to_device(x) for x in (q, k, v)), lengths, **kw)
    o_view, lse_view = o_view.copy_to_host(), lse_view.copy_to_host()
    assert not np.isnan(o_view).any() and not np.isnan(lse_view).any()
    assert_bit_identical("O", o_view, o_cont.copy_to_host())
    assert_bit_identical("lse", lse_view, lse_cont.copy_to_host())


# No deadline: one example launches about a dozen kernels, seconds each under the simulator.
# The simulator stops at 10 bits: its bucket bookkeeping runs a simulated thread per
# bucket, 7 s an example at 12 bits and over a minute at 16 (the sort's 16-bit keys are
# covered by tests/test_radix_sort.py); the GPU draws up to MAX_BITS.
@settings(max_examples=40 if REAL_GPU else 10, deadline=None)
@given(
    nq=st.integers(1, 300 if REAL_GPU else 12),
    nk=st.integers(1, 300 if REAL_GPU else 12),
    bits=st.integers(1, MAX_BITS if REAL_GPU else 10),
    tables=st.integers(1, 6 if REAL_GPU else 2),
    causal=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_kernel_property_any_shape_and_parameters(nq, nk, bits, tables, causal, seed):
    c = dict(b=1, h=1, hkv=1, nq=nq, nk=nk, d=16, dtype=np.float64, shared_qk=False)
    q, k, v = make_inputs(c, seed=seed)
    o, lse = nkattn.attention(q, k, v, method="lsh", lsh_bits=bits, lsh_tables=tables, seed=seed, causal=causal,
                              return_lse=True, backend="cuda")
    o_ref, lse_ref, _ = lsh_attention_ref(q, k, v, bits=bits, tables=tables, seed=seed, causal=causal)
    assert relative_error(o, o_ref) <= 1e-12
    assert relative_error(lse, lse_ref) <= 1e-12
