"""The analyzers of `nkattn.reference.precision` on the GPU, at O(N) memory.

`row_analyzers(q, k, key_lengths, ...)` streams the scores once, as the exact kernel
does, and writes per query row (or every `row_stride`-th) the lse, the entropy and the
largest and smallest scaled visible score; the keys of a row may be shared among several
blocks (flash-decoding's split), whose partial results a second kernel merges in a fixed
order, so that a pass over few rows still fills the GPU. `block_absmax(x, lengths, block)`
writes max |x| per block of rows.
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
from nkattn.reference.precision import key_split_chunk

# the simulator runs every thread as a Python thread: fewer of them there
MERGE_THREADS = 32 if SIMULATOR else 128
ABSMAX_THREADS = 32 if SIMULATOR else 256


@cache
def row_analyzers_kernel(dtype, head_dim: int):
    """The exact kernel's score loop without values, over a range of keys, and the merge of the ranges.

    `row_analyzers`: grid ``(S · ceil(R / BM), H, B)`` over the R sampled rows and S key ranges of
    ``chunk`` keys (whole key tiles); block x is range ``x // ceil(R / BM)`` of row block
    ``x % ceil(R / BM)``, so that neighbouring blocks read the same key tiles. A block of TY x TX threads
    owns BM rows and streams the key tiles (BN) of its range that its rows see
    (`exact_attention_kernel`)::

                    range 0          range 1        ...  range S-1
                 +------+------+ +------+------+       +------+
        rows     | S = Q Kᵀ: TM x TN per thread  |  ...  |      |  -> per row and range:
        (BM)     | (Pᵀ in shared memory for t)   |       |      |     m (max), l, t, n (min)
                 +------+------+ +------+------+       +------+

    Scores, m, l and t are the entropy kernel's operations in its order (float64: the bits of the
    mirror, `nkattn.reference.exact`); the row minimum n is one more running value over the
    visible scaled scores. ``q_rows`` holds the sampled rows only (row i is query row
    ``i · row_stride`` of ``nq``): partials are indexed by i, masks by the query row, so each
    sampled row sees exactly the keys it sees in the full attention.

    `merge_splits`: grid ``(ceil(R / MERGE_THREADS), H, B)``, a thread per row folds its S partials
    in range order into lse, entropy, max and min (`nkattn.reference.precision.row_analyzers_ref`
    has the formula). A single range stores what the unsplit loop would: one kernel for every S.
    """
    # no values here: one value column shrinks the V region and the accumulator to nothing
    sp = streaming_primitives(np.dtype(dtype), head_dim, value_dim=1)
    TM, TN, TD, TX, BM, BN = sp.TM, sp.TN, sp.TD, sp.TX, sp.BM, sp.BN
    NB_DTYPE, NEG_INF, ZERO, SHARED_ALIGN = sp.NB_DTYPE, sp.NEG_INF, sp.ZERO, sp.SHARED_ALIGN
    POS_INF = -NEG_INF
    visible_keys, load_q_tile, load_k_tile, tile_scores = sp.visible_keys, sp.load_q_tile, sp.load_k_tile, sp.tile_scores
    online_softmax_entropy_update, row_max = sp.online_softmax_entropy_update, sp.row_max
    mul, add, div, exp, log = sp.mul, sp.add, sp.div, sp.exp, sp.log

    @cuda.jit
    def row_analyzers(q_rows, k, key_lengths, m_part, l_part, t_part, n_part, qk_scale, causal, group,
                      row_stride, nq, chunk):
        tid = cuda.threadIdx.x
        ty = tid // TX
        tx = tid - ty * TX
        b = cuda.blockIdx.z
        h = cuda.blockIdx.y
        rows = q_rows.shape[2]
        row_blocks = (rows + BM - 1) // BM
        split = cuda.blockIdx.x // row_blocks
        row0 = (cuda.blockIdx.x - split * row_blocks) * BM
        key_lo = split * chunk
        key_hi = key_lo + chunk
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
            # rows past the sample map past nq, where visible_keys gives 0; keys below key_lo
            # are in no tile of this block, keys from key_hi on are masked as invisible
            kv_end[i] = min(visible_keys((row0 + ty * TM + i) * row_stride, nq, nk_b, causal), key_hi)
            m_i[i] = NEG_INF
            n_i[i] = POS_INF
            l_i[i] = ZERO
            t_i[i] = ZERO
            for e in range(TD):
                acc[i, e] = ZERO
        block_kv_end = min(visible_keys((min(row0 + BM, rows) - 1) * row_stride, nq, nk_b, causal), key_hi)

        if key_lo < block_kv_end:  # else the range is past every key of the block's rows (causal, key_lengths)
            load_q_tile(q_rows, b, h, row0, smem, tid)
        for tile_start in range(key_lo, block_kv_end, BN):
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
                m_part[b, h, split, row] = m_i[i]
                l_part[b, h, split, row] = l_i[i]
                t_part[b, h, split, row] = t_i[i]
                n_part[b, h, split, row] = n_i[i]

    @cuda.jit
    def merge_splits(m_part, l_part, t_part, n_part, lse, entropy, score_max, score_min):
        b = cuda.blockIdx.z
        h = cuda.blockIdx.y
        row = cuda.blockIdx.x * MERGE_THREADS + cuda.threadIdx.x
        if row >= lse.shape[2]:
            return
        splits = m_part.shape[2]
        m = NEG_INF
        n = POS_INF
        for j in range(splits):
            m = max(m, m_part[b, h, j, row])
            n = min(n, n_part[b, h, j, row])
        l = ZERO
        t = ZERO
        for j in range(splits):
            l_j = l_part[b, h, j, row]
            # l = 0: the range held none of the row's keys (m = -inf, never subtracted from -inf)
            if l_j != ZERO:
                t_j = t_part[b, h, j, row]
                m_j = m_part[b, h, j, row]
                if m_j != m:
                    # to the row's max, as a tile's update moves l and t to a new max
                    shift = add(m_j, -m)
                    alpha = exp(shift)
                    t_j = mul(add(t_j, mul(shift, l_j)), alpha)
                    l_j = mul(l_j, alpha)
                l = add(l, l_j)
                t = add(t, t_j)
        # as the exact kernel's store_row and store_entropy_rows: l = 0 is a row with no key
        lse[b, h, row] = add(m, log(l)) if l != ZERO else NEG_INF
        entropy[b, h, row] = add(log(l), -div(t, l)) if l != ZERO else ZERO
        score_max[b, h, row] = m
        score_min[b, h, row] = n

    return row_analyzers, merge_splits, sp


# The row pass has B·H·ceil(R / BM) blocks each walking every key its rows see; sampled
# (R <= 1024 rows per head) that is 64 blocks at B = 1, H = 8 for 132 SMs on the H100 and
# the pass is latency-bound (README). Ranges of a fixed number of key tiles multiply the blocks
# by Nk / (SPLIT_TILES · BN): 8 at Nk = 16K with 64-key tiles, 512 blocks there. The number of
# ranges, which sets the rounding, follows from the head's own shape (Nk, and the rows
# analyzed), never from B·H or the GPU, so a head's statistics have the same bits in any batch.
# Not tuned on a GPU. The simulator splits at every tile so that tiny test shapes cross ranges.
SPLIT_TILES = 1 if SIMULATOR else 32
# partials are 4 arrays of (B, H, ranges, rows): at most this many (range, row) pairs per head
MAX_SPLIT_PARTIALS = 16384


def default_key_splits(tiles: int, rows: int) -> int:
    """Key ranges of `SPLIT_TILES` tiles each for a head of `rows` analyzed rows and `tiles` key
    tiles, fewer where the partials would pass `MAX_SPLIT_PARTIALS` (many rows make enough blocks
    unsplit)."""
    return max(1, min(-(-tiles // SPLIT_TILES), MAX_SPLIT_PARTIALS // max(rows, 1)))


def row_analyzers(q, k, key_lengths, *, causal: bool, scale: float, row_stride: int = 1, key_splits: int | None = None,
                  stream=0):
    """(lse, entropy, score_max, score_min) of query rows ``0, s, 2s, ...`` (s = `row_stride`),
    device arrays (B, H, ceil(Nq / s)) of q's dtype, from device arrays q (B, H, Nq, d),
    k (B, Hkv, Nk, d) and int32 `key_lengths` (B,).

    The scores are ``scale · q·k`` over the keys each row sees in the full (B, H, Nq) attention;
    a row with no key has lse = -inf, entropy 0, max -inf and min +inf. The keys are cut into
    `key_splits` ranges of whole key tiles (`nkattn.reference.precision.key_split_chunk`), each
    streamed by its own blocks, and the ranges merged per row; by default
    (`default_key_splits`) ranges of a fixed number of tiles, which fill the GPU when few rows
    are analyzed. The bits depend on the ranges, so on the head's shape only (not on B·H or the
    GPU); a single range gives the unsplit loop's bits; in float64 those of
    `nkattn.reference.precision.row_analyzers_ref`. Inputs are assumed validated
    (`nkattn.attention`).
    """
    if isinstance(row_stride, bool) or not isinstance(row_stride, (int, np.integer)) or row_stride < 1:
        raise ValueError(f"row_stride must be an integer >= 1, got {row_stride!r}")
    batch, heads, nq, head_dim = q.shape
    nk = k.shape[2]
    rows = -(-nq // row_stride)
    dtype = np.dtype(q.dtype)
    kernel, merge, sp = row_analyzers_kernel(dtype, head_dim)
    row_blocks = math.ceil(rows / sp.BM)
    if key_splits is None:
        key_splits = default_key_splits(max(1, math.ceil(nk / sp.BN)), rows)
    chunk = key_split_chunk(nk, sp.BN, key_splits)
    splits = math.ceil(max(nk, 1) / chunk)
    partials = tuple(cuda.device_array((batch, heads, splits, rows), dtype=dtype, stream=stream) for _ in range(4))
    # a strided view, no copy: the kernel's Q tile loads read the sampled rows in place
    launch_with_shared_memory(kernel, (splits * row_blocks, heads, batch), sp.THREADS, sp.SHARED_BYTES, stream,
                              q[:, :, ::row_stride], k, key_lengths, *partials, dtype.type(scale), bool(causal),
                              heads // k.shape[1], np.int64(row_stride), np.int64(nq), np.int64(chunk))
    outputs = tuple(cuda.device_array((batch, heads, rows), dtype=dtype, stream=stream) for _ in range(4))
    merge[(math.ceil(rows / MERGE_THREADS), heads, batch), MERGE_THREADS, stream](*partials, *outputs)
    return outputs


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
