"""The analyzers of `nkattn.reference.precision` on the GPU, at O(N) memory.

`row_analyzers(q, k, key_lengths, ...)` streams the scores once, as the exact kernel
does, and writes per query row (or every `row_stride`-th) the lse, the entropy and the
largest and smallest scaled visible score; `block_absmax(x, lengths, block)` writes
max |x| per block of rows.
`nkattn.precision` turns them into the reference's head statistics.
"""

from __future__ import annotations

import math
from functools import cache

import numpy as np
from numba import cuda, from_dtype

from nkattn.cuda_kernels.online_softmax import (
    SIMULATOR,
    launch_with_shared_memory,
    streaming_primitives,
)


@cache
def row_analyzers_kernel(dtype, head_dim: int):
    """The exact kernel's score loop without values: grid ``(ceil(R / BM), H, B)`` over the R sampled
    rows, a block of TY x TX threads owns BM of them and streams key tiles of BN
    (`exact_attention_kernel`)::

                   key tile (BN)
                 +---------------+
        rows     | S = Q Kᵀ:     |  -> m (max), n (min), l, t per row
        (BM)     | TM x TN per   |     (Pᵀ in shared memory only for t)
                 | thread        |
                 +---------------+

    Scores, m, l and t are the entropy kernel's operations in its order, so lse and the
    entropy have its bits (float64: the mirror's, `nkattn.reference.exact`). The row
    minimum is one more running value over the visible scaled scores.

    ``q_rows`` holds the sampled rows only (row i is query row ``i · row_stride`` of ``nq``):
    outputs are indexed by i, masks by the query row, so each sampled row sees exactly the
    keys it sees in the full attention.
    """
    # no values here: one value column shrinks the V region and the accumulator to nothing
    sp = streaming_primitives(np.dtype(dtype), head_dim, value_dim=1)
    TM, TN, TD, TX, BM, BN = sp.TM, sp.TN, sp.TD, sp.TX, sp.BM, sp.BN
    NB_DTYPE, NEG_INF, ZERO, SHARED_ALIGN = sp.NB_DTYPE, sp.NEG_INF, sp.ZERO, sp.SHARED_ALIGN
    POS_INF = -NEG_INF
    visible_keys, load_q_tile, load_k_tile, tile_scores = sp.visible_keys, sp.load_q_tile, sp.load_k_tile, sp.tile_scores
    online_softmax_entropy_update, row_max = sp.online_softmax_entropy_update, sp.row_max
    add, log, store_entropy_rows = sp.add, sp.log, sp.store_entropy_rows

    @cuda.jit
    def row_analyzers(q_rows, k, key_lengths, lse, entropy, score_max, score_min, qk_scale, causal, group,
                      row_stride, nq):
        tid = cuda.threadIdx.x
        ty = tid // TX
        tx = tid - ty * TX
        b = cuda.blockIdx.z
        h = cuda.blockIdx.y
        row0 = cuda.blockIdx.x * BM
        rows = q_rows.shape[2]
        kvh = h // group
        nk_b = key_lengths[b]
        smem = cuda.shared.array(0, NB_DTYPE, alignment=SHARED_ALIGN)

        kv_end = cuda.local.array(TM, np.int32)
        m_i = cuda.local.array(TM, NB_DTYPE)
        n_i = cuda.local.array(TM, NB_DTYPE)
        l_i = cuda.local.array(TM, NB_DTYPE)
        t_i = cuda.local.array(TM, NB_DTYPE)
        m_prev = cuda.local.array(TM, NB_DTYPE)
        l_prev = cuda.local.array(TM, NB_DTYPE)
        acc = cuda.local.array((TM, TD), NB_DTYPE)
        s = cuda.local.array((TM, TN), NB_DTYPE)
        partial = cuda.local.array((TM, TN), NB_DTYPE)
        q_frag = cuda.local.array(TM, NB_DTYPE)
        k_frag = cuda.local.array(TN, NB_DTYPE)
        for i in range(TM):
            # rows past the sample map past nq, where visible_keys gives 0
            kv_end[i] = visible_keys((row0 + ty * TM + i) * row_stride, nq, nk_b, causal)
            m_i[i] = NEG_INF
            n_i[i] = POS_INF
            l_i[i] = ZERO
            t_i[i] = ZERO
            for e in range(TD):
                acc[i, e] = ZERO
        block_kv_end = visible_keys((min(row0 + BM, rows) - 1) * row_stride, nq, nk_b, causal)

        load_q_tile(q_rows, b, h, row0, smem, tid)
        for tile_start in range(0, block_kv_end, BN):
            cuda.syncthreads()  # Q is loaded and every read of the previous tile is done
            load_k_tile(k, b, kvh, tile_start, nk_b, smem, tid)
            cuda.syncthreads()  # the whole K tile is in shared memory
            tile_scores(smem, ty, tx, s, partial, q_frag, k_frag)
            online_softmax_entropy_update(s, m_i, l_i, t_i, m_prev, l_prev, acc, kv_end, tile_start, qk_scale, smem,
                                          ty, tx, tid)
            key0 = tile_start + tx * TN
            for i in range(TM):
                # masked scores are -inf in s: the minimum takes the visible ones only, as
                # the negated maximum of their negations (a row reduction that exists)
                low = POS_INF
                for j in range(TN):
                    if key0 + j < kv_end[i] and s[i, j] < low:
                        low = s[i, j]
                low = -row_max(-low, smem, tid)
                n_i[i] = min(n_i[i], low)

        for i in range(TM):
            row = row0 + ty * TM + i
            if row < rows and tx == 0:
                # as the exact kernel's store_row: l = 0 is a row with no key (m = -inf, n = +inf)
                lse[b, h, row] = add(m_i[i], log(l_i[i])) if l_i[i] != ZERO else NEG_INF
                score_max[b, h, row] = m_i[i]
                score_min[b, h, row] = n_i[i]
        store_entropy_rows(entropy, b, h, row0, rows, ty, tx, l_i, t_i)

    return row_analyzers, sp


def row_analyzers(q, k, key_lengths, *, causal: bool, scale: float, row_stride: int = 1, stream=0):
    """(lse, entropy, score_max, score_min) of query rows ``0, s, 2s, ...`` (s = `row_stride`),
    device arrays (B, H, ceil(Nq / s)) of q's dtype, from device arrays q (B, H, Nq, d),
    k (B, Hkv, Nk, d) and int32 `key_lengths` (B,).

    The scores are ``scale · q·k`` over the keys each row sees in the full (B, H, Nq) attention;
    a row with no key has lse = -inf, entropy 0, max -inf and min +inf. Inputs are assumed
    validated (`nkattn.attention`).
    """
    if isinstance(row_stride, bool) or not isinstance(row_stride, (int, np.integer)) or row_stride < 1:
        raise ValueError(f"row_stride must be an integer >= 1, got {row_stride!r}")
    batch, heads, nq, head_dim = q.shape
    rows = -(-nq // row_stride)
    dtype = np.dtype(q.dtype)
    outputs = tuple(cuda.device_array((batch, heads, rows), dtype=dtype, stream=stream) for _ in range(4))
    kernel, sp = row_analyzers_kernel(dtype, head_dim)
    grid = (math.ceil(rows / sp.BM), heads, batch)
    # a strided view, no copy: the kernel's Q tile loads read the sampled rows in place
    launch_with_shared_memory(kernel, grid, sp.THREADS, sp.SHARED_BYTES, stream,
                              q[:, :, ::row_stride], k, key_lengths, *outputs, dtype.type(scale), bool(causal),
                              heads // k.shape[1], np.int64(row_stride), np.int64(nq))
    return outputs


# the simulator runs every thread as a Python thread: fewer of them there
ABSMAX_THREADS = 32 if SIMULATOR else 256


@cache
def block_absmax_kernel(dtype):
    """Grid ``(ceil(N / block), H, B)``: one block of ABSMAX_THREADS threads per block of rows,
    each thread a strided share of its elements, then a tree in shared memory."""
    NB_DTYPE = from_dtype(np.dtype(dtype))
    ZERO = np.dtype(dtype).type(0)
    THREADS = ABSMAX_THREADS

    @cuda.jit
    def block_absmax(x, lengths, block, out):
        tid = cuda.threadIdx.x
        b = cuda.blockIdx.z
        h = cuda.blockIdx.y
        row0 = cuda.blockIdx.x * block
        width = x.shape[3]
        rows = min(row0 + block, lengths[b]) - row0  # rows past lengths[b] are never read
        best = ZERO
        for idx in range(tid, max(rows, 0) * width, THREADS):
            r = idx // width
            best = max(best, abs(x[b, h, row0 + r, idx - r * width]))
        red = cuda.shared.array(THREADS, NB_DTYPE)
        red[tid] = best
        step = THREADS // 2
        while step > 0:
            cuda.syncthreads()  # the previous level is written
            if tid < step and red[tid + step] > red[tid]:
                red[tid] = red[tid + step]
            step //= 2
        if tid == 0:
            out[b, h, cuda.blockIdx.x] = red[0]

    return block_absmax


def block_absmax(x, lengths, block: int, stream=0):
    """max |x| over each block of `block` rows (axis 2) and every column, a device array
    (B, H, ceil(N / block)) of x's dtype, from device array x (B, H, N, w); rows
    ``>= lengths[b]`` (int32 device array (B,)) are left out (a block of none gives 0).
    Exact in any dtype: a maximum rounds nothing."""
    batch, heads, n, _ = x.shape
    dtype = np.dtype(x.dtype)
    blocks = math.ceil(n / block)
    out = cuda.device_array((batch, heads, blocks), dtype=dtype, stream=stream)
    block_absmax_kernel(dtype)[(blocks, heads, batch), ABSMAX_THREADS, stream](x, lengths, np.int64(block), out)
    return out
