"""Device code shared by every attention path: arithmetic, tile loads, the online-softmax update.

Written once and reused by the exact, LSH and table kernels. Everything is built
by `streaming_primitives(dtype, head_dim)`, a cached factory whose device
functions close over compile-time constants (tile sizes, head dim, dtype), so
local and shared arrays have static shapes.

Two arithmetic flavours:

* float64 is *exactly rounded*: every multiply, add and divide is a single IEEE
  operation (``mul.rn``/``add.rn``, which ptxas never contracts into an FMA) and
  exp/log are the portable polynomials of `nkattn.reference.exact`, so the kernel
  reproduces the float64 streaming reference to the bit.
* float32 is *fast*: plain operators (the compiler may contract them into FMAs)
  and the hardware-backed ``math.exp``/``math.log``. Its claims are determinism
  and batch invariance, not bit-equality with a reference.

Under the CUDA simulator (pure Python, float64 scalar math) libdevice and warp
shuffles do not exist; their stand-ins below have the same semantics.
"""

from __future__ import annotations

import math
from functools import cache
from types import SimpleNamespace

import numpy as np
from numba import cuda, from_dtype
from numba.core import config

from nkattn.reference import exact as ref

SIMULATOR = bool(config.ENABLE_CUDASIM)

if not SIMULATOR:
    from numba.cuda import libdevice


def _arithmetic(contract: bool):
    """(mul, add, div): plain operators that the compiler may contract into FMAs, or
    float64 operations that are each one correctly rounded IEEE operation
    (``mul.rn``/``add.rn``/``div.rn``, which ptxas never contracts)."""
    if contract or SIMULATOR:
        # Python float arithmetic is IEEE double and never fused: the simulator's
        # plain operators are already the rounded ones.
        @cuda.jit(device=True, inline="always")
        def mul(a, b):
            return a * b

        @cuda.jit(device=True, inline="always")
        def add(a, b):
            return a + b

        @cuda.jit(device=True, inline="always")
        def div(a, b):
            return a / b

        return mul, add, div

    @cuda.jit(device=True, inline="always")
    def mul(a, b):
        return libdevice.dmul_rn(a, b)

    @cuda.jit(device=True, inline="always")
    def add(a, b):
        return libdevice.dadd_rn(a, b)

    @cuda.jit(device=True, inline="always")
    def div(a, b):
        return libdevice.ddiv_rn(a, b)

    return mul, add, div


def _library_math():
    @cuda.jit(device=True, inline="always")
    def exp(x):
        return math.exp(x)

    @cuda.jit(device=True, inline="always")
    def log(x):
        return math.log(x)

    return exp, log


def _portable_math(mul, add, div):
    """float64 (exp, log) from +, *, /, floor and ldexp: the reference's polynomials, op for op."""
    exp_head, exp_tail = ref.EXP_COEFFS[0], ref.EXP_COEFFS[1:]
    log_head, log_tail = ref.LOG_COEFFS[0], ref.LOG_COEFFS[1:]
    log2e, ln2_hi, ln2_lo = ref.LOG2E, ref.LN2_HI, ref.LN2_LO
    underflow, sqrt_half = ref.EXP_UNDERFLOW, ref.SQRT_HALF

    @cuda.jit(device=True, inline="always")
    def exp(x):
        # exp(x) for x <= 0: Cody-Waite reduction, Taylor polynomial, exact scaling
        if not x >= underflow:
            return 0.0
        n = math.floor(add(mul(x, log2e), 0.5))
        r = add(add(x, -mul(n, ln2_hi)), -mul(n, ln2_lo))
        p = exp_head
        for c in exp_tail:
            p = add(mul(p, r), c)
        return math.ldexp(p, int(n))

    @cuda.jit(device=True, inline="always")
    def log(x):
        f, e = math.frexp(x)
        if f < sqrt_half:
            f = f * 2.0
            e -= 1
        ef = float(e)
        s = div(add(f, -1.0), add(f, 1.0))
        z = mul(s, s)
        t = log_head
        for c in log_tail:
            t = add(mul(t, z), c)
        return add(mul(ef, ln2_hi), add(mul(ef, ln2_lo), mul(t, s)))

    return exp, log


@cache
def streaming_primitives(dtype, head_dim: int, *, contract: bool | None = None, portable_math: bool | None = None):
    """Device functions of the tiled online-softmax loop for one dtype and head dim.

    Returns a namespace with the constants of the canonical order (`BLOCK_M`,
    `BLOCK_N`, `DOT_SPLIT`, `ELEMS`, `THREADS`, `NB_DTYPE`, `NEG_INF`, `ZERO`)
    and the device functions:

    ``visible_keys(q_idx, nq, nk_b, causal)``
        keys [0, count) a query row sees (bottom-right causal, key_lengths).
    ``load_q_row(q, b, h, q_idx, part, q_reg)``
        this thread's share of a query row into registers (zeros past Nq).
    ``load_kv_tile(k, v, b, kvh, tile_start, k_tile, v_tile, tid)``
        a K and a V tile into shared memory, zeros past Nk.
    ``row_score(q_reg, k_tile, jj, part, qk_scale, scratch, tid)``
        one query-key score in the canonical dot order (every thread of the block must call it).
    ``online_softmax_rescale(m_i, l_i, m_tile, acc)``
        new running max, rescaled sum and accumulator.
    ``online_softmax_accumulate(acc, l_i, s, m_new, v_tile, jj, part)``
        add one key's exp(s - m) to the sum and its P·V term to the accumulator.
    ``store_row(o, lse, b, h, q_idx, part, acc, m_i, l_i)``
        O = acc / l and lse = m + log(l) (O = 0, lse = -inf for a row with no key).
    """
    dtype = np.dtype(dtype)
    order = ref.streaming_order(dtype, head_dim)
    BLOCK_N = order.block_n
    DOT_SPLIT = order.dot_split
    VEC = order.vec
    ELEMS = order.elements_per_thread(head_dim)
    THREADS = ref.THREADS_PER_BLOCK
    BLOCK_M = order.block_m()
    NB_DTYPE = from_dtype(dtype)
    NEG_INF = dtype.type(-np.inf)
    ZERO = dtype.type(0)
    HEAD_DIM = head_dim
    LOG_SPLIT = int(math.log2(DOT_SPLIT))
    if dtype not in (np.float32, np.float64):
        raise TypeError(f"streaming kernels support float32 and float64, not {dtype}")
    # float64 defaults to the bit-exact flavour, float32 to the fast one; the other
    # float64 combinations exist to measure what breaks bit-exactness
    exact = dtype == np.float64
    mul, add, div = _arithmetic(contract=not exact if contract is None else contract)
    portable = exact if portable_math is None else portable_math
    if portable and dtype != np.float64:
        raise ValueError("the portable exp/log are float64 only")
    exp, log = _portable_math(mul, add, div) if portable else _library_math()

    @cuda.jit(device=True, inline="always")
    def element(c, part):
        # thread `part` owns VEC-wide chunks part, part + DOT_SPLIT, ... of the row
        return (c // VEC) * (VEC * DOT_SPLIT) + part * VEC + (c % VEC)

    @cuda.jit(device=True, inline="always")
    def visible_keys(q_idx, nq, nk_b, causal):
        if q_idx >= nq:
            return 0
        count = nk_b
        if causal:
            count = min(count, q_idx + 1 + nk_b - nq)
        return max(count, 0)

    @cuda.jit(device=True, inline="always")
    def load_q_row(q, b, h, q_idx, part, q_reg):
        if q_idx < q.shape[2]:
            for c in range(ELEMS):
                q_reg[c] = q[b, h, q_idx, element(c, part)]
        else:
            for c in range(ELEMS):
                q_reg[c] = ZERO

    @cuda.jit(device=True, inline="always")
    def load_kv_tile(k, v, b, kvh, tile_start, k_tile, v_tile, tid):
        nk = k.shape[2]
        for idx in range(tid, BLOCK_N * HEAD_DIM, THREADS):
            r = idx // HEAD_DIM
            c = idx - r * HEAD_DIM
            j = tile_start + r
            if j < nk:
                k_tile[r, c] = k[b, kvh, j, c]
                v_tile[r, c] = v[b, kvh, j, c]
            else:
                k_tile[r, c] = ZERO
                v_tile[r, c] = ZERO

    if SIMULATOR:

        def row_group_sum(x, scratch, tid):
            # stand-in for the shuffle butterfly: same pairing, through shared memory
            for step in range(LOG_SPLIT):
                scratch[tid] = x
                cuda.syncthreads()
                x = add(x, scratch[tid ^ (1 << step)])
                cuda.syncthreads()
            return x

    else:

        @cuda.jit(device=True, inline="always")
        def row_group_sum(x, scratch, tid):
            # butterfly over the DOT_SPLIT adjacent lanes of one row; a + b == b + a,
            # so every lane ends with the same bits
            for step in range(LOG_SPLIT):
                x = add(x, cuda.shfl_xor_sync(0xFFFFFFFF, x, 1 << step))
            return x

    @cuda.jit(device=True, inline="always")
    def row_score(q_reg, k_tile, jj, part, qk_scale, scratch, tid):
        partial = mul(q_reg[0], k_tile[jj, element(0, part)])
        for c in range(1, ELEMS):
            partial = add(partial, mul(q_reg[c], k_tile[jj, element(c, part)]))
        return mul(row_group_sum(partial, scratch, tid), qk_scale)

    @cuda.jit(device=True, inline="always")
    def online_softmax_rescale(m_i, l_i, m_tile, acc):
        m_new = m_tile if m_tile > m_i else m_i
        alpha = exp(add(m_i, -m_new))
        for c in range(ELEMS):
            acc[c] = mul(acc[c], alpha)
        return m_new, mul(l_i, alpha)

    @cuda.jit(device=True, inline="always")
    def online_softmax_accumulate(acc, l_i, s, m_new, v_tile, jj, part):
        p = exp(add(s, -m_new))
        for c in range(ELEMS):
            acc[c] = add(acc[c], mul(p, v_tile[jj, element(c, part)]))
        return add(l_i, p)

    @cuda.jit(device=True, inline="always")
    def store_row(o, lse, b, h, q_idx, part, acc, m_i, l_i):
        if l_i > ZERO:
            for c in range(ELEMS):
                o[b, h, q_idx, element(c, part)] = div(acc[c], l_i)
            if part == 0:
                lse[b, h, q_idx] = add(m_i, log(l_i))
        else:
            for c in range(ELEMS):
                o[b, h, q_idx, element(c, part)] = ZERO
            if part == 0:
                lse[b, h, q_idx] = NEG_INF

    return SimpleNamespace(
        BLOCK_M=BLOCK_M,
        BLOCK_N=BLOCK_N,
        DOT_SPLIT=DOT_SPLIT,
        ELEMS=ELEMS,
        THREADS=THREADS,
        HEAD_DIM=HEAD_DIM,
        NB_DTYPE=NB_DTYPE,
        NEG_INF=NEG_INF,
        ZERO=ZERO,
        visible_keys=visible_keys,
        load_q_row=load_q_row,
        load_kv_tile=load_kv_tile,
        row_score=row_score,
        online_softmax_rescale=online_softmax_rescale,
        online_softmax_accumulate=online_softmax_accumulate,
        store_row=store_row,
    )
