"""Device code shared by every attention path: arithmetic, tile loads, the online-softmax update.

Written once and reused by the exact, LSH and table kernels and the low-rank
operators. Everything is built by `streaming_primitives(dtype, head_dim)`, a
cached factory whose device functions close over compile-time constants (tile
sizes, head dim, value width, dtype), so local and shared arrays have static
shapes.

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
from numba import cuda, from_dtype, uint32
from numba.core import config

from nkattn.reference import exact as ref

SIMULATOR = bool(config.ENABLE_CUDASIM)

if not SIMULATOR:
    from llvmlite import ir
    from numba.core import types
    from numba.cuda import cgutils, libdevice
    from numba.cuda.extending import intrinsic


if SIMULATOR:

    def load_vec16(arr, idx):
        """Stand-in: the 16 bytes of `arr` from `idx` as a tuple."""
        width = 16 // arr.dtype.itemsize
        return tuple(arr[idx + t] for t in range(width))

else:

    @intrinsic
    def load_vec16(typingctx, arr, idx):
        """One 16-byte shared-memory load (``ld.shared.v4.f32`` / ``.v2.f64``) as a tuple.

        numba issues one scalar load per element; a vector load moves 4 (2) values per
        instruction, which is what keeps the register-blocked products from being
        bound by load issue. `arr` must be shared memory and ``idx`` 16-byte aligned.
        """
        width = 16 // (arr.dtype.bitwidth // 8)
        sig = types.UniTuple(arr.dtype, width)(arr, idx)

        def codegen(context, builder, sig, args):
            arrty, idxty = sig.args
            ary = context.make_array(arrty)(context, builder, args[0])
            ptr = cgutils.get_item_pointer(context, builder, arrty, ary, [args[1]], wraparound=False)
            elem = context.get_data_type(arrty.dtype)
            vec = ir.VectorType(elem, width)
            shared_ptr = builder.addrspacecast(builder.bitcast(ptr, vec.as_pointer()), vec.as_pointer(3))
            loaded = builder.load(shared_ptr, align=16)
            items = [builder.extract_element(loaded, ir.Constant(ir.IntType(32), t)) for t in range(width)]
            return context.make_tuple(builder, sig.return_type, items)

        return sig, codegen


@cuda.jit(device=True, inline="always")
def visible_keys(q_idx, nq, nk_b, causal):
    """How many keys, [0, count), row ``q_idx`` of ``nq`` sees among the ``nk_b`` valid
    ones; causal is bottom-right aligned. 0 for rows past the end. Every kernel's masks."""
    if q_idx >= nq:
        return 0
    count = nk_b
    if causal:
        count = min(count, q_idx + 1 + nk_b - nq)
    return max(count, 0)


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
        # exp(x) for x <= 0: Cody-Waite reduction, Taylor polynomial, exact scaling.
        # NaN is not below the cut-off and comes out NaN: a NaN score poisons its row
        # instead of dropping its key
        if x < underflow:
            return 0.0
        if SIMULATOR and math.isnan(x):
            return x  # stand-in: Python's floor raises on NaN, the GPU's carries it through
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


# The simulator runs every CUDA thread as a Python thread: it runs a scaled-down
# tiling of the same structure (16 threads, 8 x 8 tiles), which also lets tests
# cross many tile boundaries at N <= 64. The mirror is given the same order.
SIMULATOR_ORDER = ref.StreamingOrder(threads_y=4, threads_x=4, rows_per_thread=2, keys_per_thread=2)


def kernel_order(dtype, head_dim: int) -> ref.StreamingOrder:
    """The tiling the kernels run with: the canonical order, or the simulator's."""
    order = ref.streaming_order(dtype, head_dim)
    return SIMULATOR_ORDER if SIMULATOR else order


@cache
def streaming_primitives(
    dtype, head_dim: int, *, order: ref.StreamingOrder | None = None, contract: bool | None = None, portable_math: bool | None = None,
    qk_tiles: bool = True, value_dim: int | None = None,
):
    """Device functions of the tiled online-softmax loop for one dtype and head dim.

    The block layout is the canonical order's (`nkattn.reference.exact.StreamingOrder`):
    thread ``tid = ty * TX + tx`` owns query rows ``ty * TM + i`` (i < TM) of the
    block and, in a key tile, keys ``tx * TN + j`` (j < TN) for scores and head
    dims ``tx * TD + e`` (e < TD, TD = d / TX) for the accumulator. The TX threads
    of a row are adjacent lanes of one warp, so row reductions are shuffles.

    Values may be narrower or wider than q and k: ``value_dim`` (dv, default d)
    is the width of V, of the accumulator and of O, any dv >= 1. Their columns
    split as above with TD = ceil(dv / TX); where TX does not divide dv, the V
    tile and the accumulator carry LV - dv zero columns (LV = TX·TD) that are
    never read from V nor written to O. With dv = d every device function is the
    one it was before value widths existed (same PTX).

    One dynamic shared buffer holds Qᵀ (d x BM), Kᵀ (d x BN), V (BN x LV), Pᵀ
    (BN x BM) and a scratch row used by the simulator's shuffle stand-in; rows of
    the transposed tiles are padded by 16 bytes, which keeps vector loads aligned
    and spreads the transposing stores over banks.

    A path whose scores come from elsewhere (table lookups) passes
    ``qk_tiles=False``: the Qᵀ and Kᵀ regions then take no space, and
    ``SHARED_BYTES`` covers V, Pᵀ and the scratch row.

    Returns a namespace of those constants and the device functions:

    ``visible_keys(q_idx, nq, nk_b, causal)``      keys [0, count) a row sees
    ``load_q_tile(q, b, h, row0, smem, tid)``        Qᵀ into shared memory
    ``fetch_kv_tile(k, v, b, kvh, tile_start, nk_b, k_buf, v_buf, tid)``  a K/V tile into registers
    ``store_kv_tile(smem, k_buf, v_buf, tid)``       those registers into Kᵀ and V in shared memory
        (these two only where dv = d, None otherwise)
    ``load_kv_tile(k, v, b, kvh, tile_start, nk_b, smem, tid)``  the same, global to shared directly
    ``load_k_tile(k, ...)``, ``load_v_tile(v, ...)``   one of the two, same arguments otherwise
    ``gather_q_tile(q, b, h, row_idx, smem, tid)``   Qᵀ of rows ``row_idx[r]`` (-1: a zero row)
    ``gather_kv_tile(k, v, b, kvh, key_idx, smem, tid)``  Kᵀ and V of keys ``key_idx[j]`` (-1: zero)
    ``tile_scores(smem, ty, tx, s, partial, q_frag, k_frag)``  the thread's TM x TN block of q·k
    ``online_softmax_update(s, m_i, l_i, acc, kv_end, tile_start, qk_scale, smem, ty, tx, tid)``
        mask and scale the scores, update running max and sum, rescale acc, write Pᵀ
    ``online_softmax_entropy_update(s, m_i, l_i, t_i, m_prev, l_prev, acc, kv_end, tile_start, qk_scale, smem, ty, tx, tid)``
        `online_softmax_update`, then the running entropy sum t from the max and sum it
        started from (kept in m_prev, l_prev: the caller's scratch; `nkattn.reference.exact.StreamingOrder`)
    ``accumulate_pv(smem, ty, tx, acc, p_frag, v_frag)``  acc += P·V over the tile
    ``store_p(smem, ty, tx, i, j, p)``               the thread's p[i, j] into Pᵀ
    ``store_row(o, lse, b, h, q_idx, i, tx, acc, m_i, l_i)``
        the thread's row i as query q_idx: O = acc / l, lse = m + log(l); O = 0 and
        lse = -inf for a row with no key (l = 0; a NaN l stores NaN)
    ``store_rows(o, lse, b, h, row0, nq, ty, tx, acc, m_i, l_i)``  every row of the thread, rows from row0
    ``store_entropy_rows(entropy, b, h, row0, nq, ty, tx, l_i, t_i)``
        log(l) - t / l of every row of the thread; 0 for a row with no key
    """
    dtype = np.dtype(dtype)
    order = kernel_order(dtype, head_dim) if order is None else order
    TX, TM, TN = order.threads_x, order.rows_per_thread, order.keys_per_thread
    BM, BN, THREADS, D = order.block_m, order.block_n, order.threads, head_dim
    if D % TX or 32 % TX:
        raise ValueError(f"order {order} does not fit head dim {D}: TX must divide d and 32")
    DV = D if value_dim is None else value_dim
    if DV < 1:
        raise ValueError(f"value_dim must be >= 1, got {DV}")
    TD = -(-DV // TX)
    LV = TX * TD  # value columns of the V tile and the accumulator: DV, then zero padding
    PADDED_V = LV != DV
    PAD = 16 // dtype.itemsize  # keeps rows 16-byte aligned while spreading transposed stores over banks
    LDQ, LDK, LDP = BM + PAD, BN + PAD, BM + PAD
    Q_OFFSET = 0
    K_OFFSET = Q_OFFSET + (D * LDQ if qk_tiles else 0)
    V_OFFSET = K_OFFSET + (D * LDK if qk_tiles else 0)
    P_OFFSET = V_OFFSET + BN * LV
    SCRATCH_OFFSET = P_OFFSET + BN * LDP
    SHARED_BYTES = (SCRATCH_OFFSET + THREADS) * dtype.itemsize
    assert not qk_tiles or SHARED_BYTES == order.shared_elements(D, PAD, LV) * dtype.itemsize
    LOG_TX = int(math.log2(TX))
    NB_DTYPE = from_dtype(dtype)
    NEG_INF = dtype.type(-np.inf)
    ZERO = dtype.type(0)
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
    def load_q_tile(q, b, h, row0, smem, tid):
        nq = q.shape[2]
        for idx in range(tid, BM * D, THREADS):
            r = idx // D
            c = idx - r * D
            if row0 + r < nq:
                smem[Q_OFFSET + c * LDQ + r] = q[b, h, row0 + r, c]
            else:
                smem[Q_OFFSET + c * LDQ + r] = ZERO

    KV_PER_THREAD = BN * D // THREADS
    if BN * D % THREADS:
        raise ValueError(f"order {order}: a {BN} x {D} tile does not split over {THREADS} threads")

    @cuda.jit(device=True, inline="always")
    def fetch_kv_tile(k, v, b, kvh, tile_start, nk_b, k_buf, v_buf, tid):
        # global -> registers, issued before the current tile's arithmetic so that the
        # loads are in flight while it runs; keys past nk_b are zeros: masked scores
        # ignore them and p = 0 times a zero value adds nothing, whatever the caller's
        # buffer holds there
        for t in range(KV_PER_THREAD):
            idx = tid + t * THREADS
            r = idx // D
            c = idx - r * D
            j = tile_start + r
            if j < nk_b:
                k_buf[t] = k[b, kvh, j, c]
                v_buf[t] = v[b, kvh, j, c]
            else:
                k_buf[t] = ZERO
                v_buf[t] = ZERO

    @cuda.jit(device=True, inline="always")
    def load_kv_tile(k, v, b, kvh, tile_start, nk_b, smem, tid):
        # global -> shared directly: no staging registers (see fetch_kv_tile for keys past nk_b)
        for idx in range(tid, BN * D, THREADS):
            r = idx // D
            c = idx - r * D
            j = tile_start + r
            if j < nk_b:
                smem[K_OFFSET + c * LDK + r] = k[b, kvh, j, c]
                smem[V_OFFSET + r * D + c] = v[b, kvh, j, c]
            else:
                smem[K_OFFSET + c * LDK + r] = ZERO
                smem[V_OFFSET + r * D + c] = ZERO

    @cuda.jit(device=True, inline="always")
    def load_k_tile(k, b, kvh, tile_start, nk_b, smem, tid):
        # Kᵀ alone, for paths that need no values (score-only kernels)
        for idx in range(tid, BN * D, THREADS):
            r = idx // D
            c = idx - r * D
            j = tile_start + r
            smem[K_OFFSET + c * LDK + r] = k[b, kvh, j, c] if j < nk_b else ZERO

    @cuda.jit(device=True, inline="always")
    def load_v_tile(v, b, kvh, tile_start, nk_b, smem, tid):
        # V alone, for paths whose scores come from elsewhere (table lookups); columns
        # past DV are the zero padding of the value width
        for idx in range(tid, BN * LV, THREADS):
            r = idx // LV
            c = idx - r * LV
            j = tile_start + r
            smem[V_OFFSET + r * LV + c] = v[b, kvh, j, c] if j < nk_b and (not PADDED_V or c < DV) else ZERO

    @cuda.jit(device=True, inline="always")
    def gather_q_tile(q, b, h, row_idx, smem, tid):
        # rows in the caller's order (a sorted bucket, a palette group); -1 pads the tile
        for idx in range(tid, BM * D, THREADS):
            r = idx // D
            c = idx - r * D
            q_idx = row_idx[r]
            smem[Q_OFFSET + c * LDQ + r] = q[b, h, q_idx, c] if q_idx >= 0 else ZERO

    @cuda.jit(device=True, inline="always")
    def gather_kv_tile(k, v, b, kvh, key_idx, smem, tid):
        # keys in the caller's order; -1 pads the tile with zeros, as past nk_b in load_kv_tile
        for idx in range(tid, BN * D, THREADS):
            r = idx // D
            c = idx - r * D
            j = key_idx[r]
            if j >= 0:
                smem[K_OFFSET + c * LDK + r] = k[b, kvh, j, c]
                smem[V_OFFSET + r * D + c] = v[b, kvh, j, c]
            else:
                smem[K_OFFSET + c * LDK + r] = ZERO
                smem[V_OFFSET + r * D + c] = ZERO

    @cuda.jit(device=True, inline="always")
    def store_kv_tile(smem, k_buf, v_buf, tid):
        # registers -> shared memory: K transposed (Kᵀ, d x BN), V as is
        for t in range(KV_PER_THREAD):
            idx = tid + t * THREADS
            r = idx // D
            c = idx - r * D
            smem[K_OFFSET + c * LDK + r] = k_buf[t]
            smem[V_OFFSET + r * D + c] = v_buf[t]

    if DV != D:
        # K and V rows differ in width: a pass over each instead of the one-pass loaders
        # above, which read d columns of V (past its rows where dv < LV = d, e.g. any dv < 16
        # at d = 16 on the GPU); the register-staged prefetch (fetch/store_kv_tile) is for equal widths
        fetch_kv_tile = store_kv_tile = None

        @cuda.jit(device=True, inline="always")
        def load_kv_tile(k, v, b, kvh, tile_start, nk_b, smem, tid):
            load_k_tile(k, b, kvh, tile_start, nk_b, smem, tid)
            load_v_tile(v, b, kvh, tile_start, nk_b, smem, tid)

        @cuda.jit(device=True, inline="always")
        def gather_kv_tile(k, v, b, kvh, key_idx, smem, tid):
            for idx in range(tid, BN * D, THREADS):
                r = idx // D
                c = idx - r * D
                j = key_idx[r]
                smem[K_OFFSET + c * LDK + r] = k[b, kvh, j, c] if j >= 0 else ZERO
            for idx in range(tid, BN * LV, THREADS):
                r = idx // LV
                c = idx - r * LV
                j = key_idx[r]
                smem[V_OFFSET + r * LV + c] = v[b, kvh, j, c] if j >= 0 and (not PADDED_V or c < DV) else ZERO

    # Hot loops index shared memory with unsigned offsets (a signed index makes numba
    # emit negative-index wraparound arithmetic on every load) and read 16 bytes per
    # load where the layout allows it.
    VEC = 16 // dtype.itemsize
    CHUNK = order.dot_chunk

    @cuda.jit(device=True, inline="always")
    def load_run(smem, base, n, dst):
        # dst[0:n] = smem[base:base + n]
        if n % VEC == 0:
            for t4 in range(n // VEC):
                vec = load_vec16(smem, base + uint32(t4 * VEC))
                for t in range(VEC):
                    dst[t4 * VEC + t] = vec[t]
        else:
            for t in range(n):
                dst[t] = smem[base + uint32(t)]

    @cuda.jit(device=True, inline="always")
    def rank1_update(dst, a, b, rows, cols):
        # dst[i, j] += a[i] * b[j]: the register-blocked step of both products
        for i in range(rows):
            for j in range(cols):
                dst[i, j] = add(dst[i, j], mul(a[i], b[j]))

    @cuda.jit(device=True, inline="always")
    def tile_scores(smem, ty, tx, s, partial, q_frag, k_frag):
        # s = sum over chunks of CHUNK elements of (sequential sum of q·k over the chunk)
        q_col = uint32(Q_OFFSET + ty * TM)
        k_col = uint32(K_OFFSET + tx * TN)
        for c0 in range(0, D, CHUNK):
            load_run(smem, q_col, TM, q_frag)
            load_run(smem, k_col, TN, k_frag)
            for i in range(TM):
                for j in range(TN):
                    partial[i, j] = mul(q_frag[i], k_frag[j])
            for c in range(1, CHUNK):
                q_col += uint32(LDQ)
                k_col += uint32(LDK)
                load_run(smem, q_col, TM, q_frag)
                load_run(smem, k_col, TN, k_frag)
                rank1_update(partial, q_frag, k_frag, TM, TN)
            q_col += uint32(LDQ)
            k_col += uint32(LDK)
            for i in range(TM):
                for j in range(TN):
                    s[i, j] = partial[i, j] if c0 == 0 else add(s[i, j], partial[i, j])

    if SIMULATOR:

        def exchange(x, smem, tid, step):
            # stand-in for shfl_xor: the partner lane's value, through shared memory
            smem[SCRATCH_OFFSET + tid] = x
            cuda.syncthreads()
            other = smem[SCRATCH_OFFSET + (tid ^ (1 << step))]
            cuda.syncthreads()
            return other

        # device functions even here: the simulator swaps in its `cuda` module for
        # the duration of a device function call, which `exchange` relies on
        @cuda.jit(device=True, inline="always")
        def row_max(x, smem, tid):
            for step in range(LOG_TX):
                other = exchange(x, smem, tid, step)
                x = other if other > x else x
            return x

        @cuda.jit(device=True, inline="always")
        def row_sum(x, smem, tid):
            for step in range(LOG_TX):
                x = add(x, exchange(x, smem, tid, step))
            return x

    else:

        @cuda.jit(device=True, inline="always")
        def row_max(x, smem, tid):
            for step in range(LOG_TX):
                other = cuda.shfl_xor_sync(0xFFFFFFFF, x, 1 << step)
                x = other if other > x else x
            return x

        @cuda.jit(device=True, inline="always")
        def row_sum(x, smem, tid):
            # a + b == b + a, so every lane of the butterfly ends with the same bits
            for step in range(LOG_TX):
                x = add(x, cuda.shfl_xor_sync(0xFFFFFFFF, x, 1 << step))
            return x

    @cuda.jit(device=True, inline="always")
    def store_p(smem, ty, tx, i, j, p):
        # Pᵀ (BN x BM): a key's probabilities for the block's rows are contiguous
        smem[P_OFFSET + (tx * TN + j) * LDP + ty * TM + i] = p

    @cuda.jit(device=True, inline="always")
    def online_softmax_update(s, m_i, l_i, acc, kv_end, tile_start, qk_scale, smem, ty, tx, tid):
        key0 = tile_start + tx * TN
        for i in range(TM):
            m_tile = NEG_INF
            for j in range(TN):
                x = mul(s[i, j], qk_scale)
                if key0 + j >= kv_end[i]:
                    x = NEG_INF
                s[i, j] = x
                if x > m_tile:
                    m_tile = x
            m_tile = row_max(m_tile, smem, tid)
            m_new = m_tile if m_tile > m_i[i] else m_i[i]
            # a row that has seen no key yet keeps l = 0 and acc = 0 (never -inf - -inf)
            m_use = ZERO if m_new == NEG_INF else m_new
            alpha = exp(add(m_i[i], -m_use))
            p_row = ZERO
            for j in range(TN):
                p = exp(add(s[i, j], -m_use))
                store_p(smem, ty, tx, i, j, p)
                p_row = p if j == 0 else add(p_row, p)
            l_i[i] = add(mul(l_i[i], alpha), row_sum(p_row, smem, tid))
            m_i[i] = m_new
            for e in range(TD):
                acc[i, e] = mul(acc[i, e], alpha)

    @cuda.jit(device=True, inline="always")
    def entropy_update(s, m_prev, l_prev, m_i, t_i, smem, ty, tx, tid):
        # t = Σ p·(s - m) over the keys seen, kept relative to the running max as l is, so
        # that H = log l - t / l sums two terms >= 0 (lse - Σ p·s cancels when |s| >> H).
        # It reads back what online_softmax_update left: the masked scaled scores in s, the
        # thread's own p in Pᵀ, the new max in m_i; alpha is recomputed, to the same bits
        for i in range(TM):
            m_use = ZERO if m_i[i] == NEG_INF else m_i[i]
            t_row = ZERO
            for j in range(TN):
                p = smem[P_OFFSET + (tx * TN + j) * LDP + ty * TM + i]
                # a key of weight 0 adds 0: p * (s - m) is 0 * -inf = NaN for masked and -inf scores
                term = mul(p, add(s[i, j], -m_use)) if p != ZERO else ZERO
                t_row = term if j == 0 else add(t_row, term)
            shift = add(m_prev[i], -m_use)
            t = t_i[i]
            if l_prev[i] != ZERO:  # else t = 0 and shift may be -inf
                t = add(t, mul(shift, l_prev[i]))
            t_i[i] = add(mul(t, exp(shift)), row_sum(t_row, smem, tid))

    @cuda.jit(device=True, inline="always")
    def online_softmax_entropy_update(s, m_i, l_i, t_i, m_prev, l_prev, acc, kv_end, tile_start, qk_scale, smem,
                                      ty, tx, tid):
        for i in range(TM):
            m_prev[i] = m_i[i]
            l_prev[i] = l_i[i]
        online_softmax_update(s, m_i, l_i, acc, kv_end, tile_start, qk_scale, smem, ty, tx, tid)
        # reads only this thread's own P entries: no barrier before it
        entropy_update(s, m_prev, l_prev, m_i, t_i, smem, ty, tx, tid)

    @cuda.jit(device=True, inline="always")
    def accumulate_pv(smem, ty, tx, acc, p_frag, v_frag):
        p_col = uint32(P_OFFSET + ty * TM)
        v_row = uint32(V_OFFSET + tx * TD)
        for j in range(BN):
            load_run(smem, p_col, TM, p_frag)
            load_run(smem, v_row, TD, v_frag)
            rank1_update(acc, p_frag, v_frag, TM, TD)
            p_col += uint32(LDP)
            v_row += uint32(LV)

    @cuda.jit(device=True, inline="always")
    def store_row(o, lse, b, h, q_idx, i, tx, acc, m_i, l_i):
        # only a row with l = 0 saw no key; l = NaN (a NaN or +inf score) stores NaN
        if l_i[i] != ZERO:
            for e in range(TD):
                if not PADDED_V or tx * TD + e < DV:
                    o[b, h, q_idx, tx * TD + e] = div(acc[i, e], l_i[i])
            if tx == 0:
                lse[b, h, q_idx] = add(m_i[i], log(l_i[i]))
        else:
            for e in range(TD):
                if not PADDED_V or tx * TD + e < DV:
                    o[b, h, q_idx, tx * TD + e] = ZERO
            if tx == 0:
                lse[b, h, q_idx] = NEG_INF

    @cuda.jit(device=True, inline="always")
    def store_rows(o, lse, b, h, row0, nq, ty, tx, acc, m_i, l_i):
        for i in range(TM):
            q_idx = row0 + ty * TM + i
            if q_idx < nq:
                store_row(o, lse, b, h, q_idx, i, tx, acc, m_i, l_i)

    SHARED_ALIGN = None if SIMULATOR else 16

    @cuda.jit(device=True, inline="always")
    def block_place(q, key_lengths, group):
        """Where a thread of the one-launch kernels stands: (tid, ty, tx, b, h, row0, nq, kvh, nk_b,
        smem), the block owning rows ``row0 ..`` of head h (key head kvh) of batch b, which sees
        ``nk_b`` keys, and the block's dynamic shared buffer."""
        tid = cuda.threadIdx.x
        ty = tid // TX
        tx = tid - ty * TX
        b = cuda.blockIdx.z
        h = cuda.blockIdx.y
        row0 = cuda.blockIdx.x * BM
        nq = q.shape[2]
        kvh = h // group
        nk_b = key_lengths[b]
        smem = cuda.shared.array(0, NB_DTYPE, alignment=SHARED_ALIGN)
        return tid, ty, tx, b, h, row0, nq, kvh, nk_b, smem

    @cuda.jit(device=True, inline="always")
    def store_entropy_rows(entropy, b, h, row0, nq, ty, tx, l_i, t_i):
        for i in range(TM):
            q_idx = row0 + ty * TM + i
            if q_idx < nq and tx == 0:
                # l = 0: no key, an empty sum; l = NaN stores NaN, as lse does
                entropy[b, h, q_idx] = add(log(l_i[i]), -div(t_i[i], l_i[i])) if l_i[i] != ZERO else ZERO

    return SimpleNamespace(
        TX=TX, TM=TM, TN=TN, TD=TD, DV=DV, LV=LV, BM=BM, VEC=VEC, SHARED_ALIGN=SHARED_ALIGN, BN=BN, THREADS=THREADS, SHARED_BYTES=SHARED_BYTES,
        NB_DTYPE=NB_DTYPE, NEG_INF=NEG_INF, ZERO=ZERO,
        visible_keys=visible_keys,
        block_place=block_place,
        load_q_tile=load_q_tile,
        KV_PER_THREAD=KV_PER_THREAD,
        fetch_kv_tile=fetch_kv_tile,
        store_kv_tile=store_kv_tile,
        load_kv_tile=load_kv_tile,
        load_k_tile=load_k_tile,
        load_v_tile=load_v_tile,
        gather_q_tile=gather_q_tile,
        gather_kv_tile=gather_kv_tile,
        tile_scores=tile_scores,
        online_softmax_update=online_softmax_update,
        online_softmax_entropy_update=online_softmax_entropy_update,
        accumulate_pv=accumulate_pv,
        store_p=store_p,
        mul=mul, add=add, div=div, exp=exp, log=log,
        store_row=store_row,
        store_rows=store_rows,
        store_entropy_rows=store_entropy_rows,
        row_max=row_max,
    )


STATIC_SHARED_LIMIT = 48 * 1024
_opted_in: set = set()


def launch_with_shared_memory(kernel, grid, block, shared_bytes, stream, *args):
    """Launch `kernel` with `shared_bytes` of dynamic shared memory.

    A block may use more than 48 KB only after the function opts in
    (CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES); numba has no switch for it,
    so the compiled function for these argument types is looked up and set once.
    """
    if shared_bytes > STATIC_SHARED_LIMIT and not SIMULATOR:
        from numba.cuda.cudadrv.driver import binding, driver

        # past the limit the driver's opt-in fails with a bare CUDA_ERROR_INVALID_VALUE
        limit = cuda.get_current_device().MAX_SHARED_MEMORY_PER_BLOCK_OPTIN
        if shared_bytes > limit:
            raise ValueError(f"{kernel.py_func.__name__} needs {shared_bytes} bytes of shared memory a block "
                             f"for this shape and tile configuration; this GPU allows {limit}")

        compiled = kernel.compile(tuple(kernel.typeof_pyval(a) for a in args))
        cufunc = compiled._codelibrary.get_cufunc()
        key = (id(cufunc), shared_bytes)
        if key not in _opted_in:
            attr = binding.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
            driver.cuKernelSetAttribute(attr, shared_bytes, cufunc.handle, cufunc.device.id)
            _opted_in.add(key)
    kernel[grid, block, stream, shared_bytes](*args)
