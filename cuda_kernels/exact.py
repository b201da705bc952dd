"""Exact attention in one fused numba.cuda launch (streaming softmax, O(N) memory).

`exact_attention(q, k, v, ...)` takes numba device arrays and returns device
arrays (O, lse); `nkattn.attention` is the public entry point that validates and
converts inputs.
"""

from __future__ import annotations

import math
from functools import cache

import numpy as np
from numba import cuda

from nkattn.cuda_kernels.online_softmax import streaming_primitives


@cache
def exact_attention_kernel(dtype, head_dim: int, *, contract: bool | None = None, portable_math: bool | None = None):
    """Build the fused forward kernel for one dtype and head dim.

    Grid ``(ceil(Nq / BLOCK_M), H, B)``; a block of THREADS threads owns BLOCK_M
    query rows, DOT_SPLIT adjacent threads per row, each holding ELEMS elements of
    q and of the accumulator in registers::

                 keys ->  tile 0     tile 1     ...   (BLOCK_N keys, K and V in shared memory)
        rows     +----------+----------+
        BLOCK_M  | S = q·kᵀ  |          |   scores of a tile go to shared memory, then
        of this  | m, l, acc |  ...     |   exp(s - m) and P·V update the registers
        block    +----------+----------+

    Key tiles are visited in order up to the last key any row of the block sees;
    a row skips tiles it sees nothing of, so its bits do not depend on which other
    rows share its block (batch invariance). No atomics, fixed reduction order.

    `contract` and `portable_math` select the arithmetic (see
    `streaming_primitives`); the defaults are the float64 bit-exact and the float32
    fast flavours.
    """
    sp = streaming_primitives(np.dtype(dtype), head_dim, contract=contract, portable_math=portable_math)
    BLOCK_M, BLOCK_N, DOT_SPLIT, ELEMS, THREADS = sp.BLOCK_M, sp.BLOCK_N, sp.DOT_SPLIT, sp.ELEMS, sp.THREADS
    HEAD_DIM = sp.HEAD_DIM
    NB_DTYPE, NEG_INF, ZERO = sp.NB_DTYPE, sp.NEG_INF, sp.ZERO
    visible_keys, load_q_row, load_kv_tile = sp.visible_keys, sp.load_q_row, sp.load_kv_tile
    row_score, store_row = sp.row_score, sp.store_row
    online_softmax_rescale, online_softmax_accumulate = sp.online_softmax_rescale, sp.online_softmax_accumulate

    @cuda.jit
    def exact_attention_fwd(q, k, v, key_lengths, o, lse, qk_scale, causal, group):
        tid = cuda.threadIdx.x
        part = tid % DOT_SPLIT
        row = tid // DOT_SPLIT
        b = cuda.blockIdx.z
        h = cuda.blockIdx.y
        first_row = cuda.blockIdx.x * BLOCK_M
        q_idx = first_row + row
        nq = q.shape[2]
        kvh = h // group
        nk_b = key_lengths[b]
        kv_end = visible_keys(q_idx, nq, nk_b, causal)
        # causal visibility grows with the row: the block's last row sees the most
        block_kv_end = visible_keys(min(first_row + BLOCK_M, nq) - 1, nq, nk_b, causal)

        k_tile = cuda.shared.array((BLOCK_N, HEAD_DIM), NB_DTYPE)
        v_tile = cuda.shared.array((BLOCK_N, HEAD_DIM), NB_DTYPE)
        s_tile = cuda.shared.array((BLOCK_N, BLOCK_M), NB_DTYPE)
        scratch = cuda.shared.array(THREADS, NB_DTYPE)
        q_reg = cuda.local.array(ELEMS, NB_DTYPE)
        acc = cuda.local.array(ELEMS, NB_DTYPE)

        load_q_row(q, b, h, q_idx, part, q_reg)
        for c in range(ELEMS):
            acc[c] = ZERO
        m_i = NEG_INF
        l_i = ZERO

        for tile_start in range(0, block_kv_end, BLOCK_N):
            cuda.syncthreads()  # all reads of the previous tile are done before it is overwritten
            load_kv_tile(k, v, b, kvh, tile_start, k_tile, v_tile, tid)
            cuda.syncthreads()  # the whole tile is in shared memory before anyone reads it
            tile_len = min(BLOCK_N, block_kv_end - tile_start)
            row_len = min(tile_len, kv_end - tile_start)

            # scores of the tile; every thread runs every key (the dot product's reduction is collective)
            m_tile = NEG_INF
            for jj in range(tile_len):
                s = row_score(q_reg, k_tile, jj, part, qk_scale, scratch, tid)
                if jj < row_len and s > m_tile:
                    m_tile = s
                if part == 0:
                    s_tile[jj, row] = s
            cuda.syncthreads()  # part 0's scores are visible to the row's other threads

            if row_len > 0:
                m_new, l_i = online_softmax_rescale(m_i, l_i, m_tile, acc)
                for jj in range(row_len):
                    l_i = online_softmax_accumulate(acc, l_i, s_tile[jj, row], m_new, v_tile, jj, part)
                m_i = m_new

        if q_idx < nq:
            store_row(o, lse, b, h, q_idx, part, acc, m_i, l_i)

    return exact_attention_fwd


def launch_config(dtype, head_dim: int, batch: int, heads: int, nq: int):
    """(grid, block) of the exact kernel: one block per BLOCK_M query rows of one (b, h)."""
    sp = streaming_primitives(np.dtype(dtype), head_dim)
    return (math.ceil(nq / sp.BLOCK_M), heads, batch), sp.THREADS


def exact_attention(
    q, k, v, key_lengths, *, causal: bool, scale: float, out=None, lse=None, stream=0, contract=None, portable_math=None
):
    """Run the fused kernel on device arrays; returns device arrays (O, lse).

    `key_lengths` is an int32 device array of length B (Nk for every batch when
    there is no key mask). Inputs are assumed validated by `nkattn.attention`.
    """
    batch, heads, nq, head_dim = q.shape
    dtype = np.dtype(q.dtype)
    if out is None:
        out = cuda.device_array((batch, heads, nq, head_dim), dtype=dtype, stream=stream)
    if lse is None:
        lse = cuda.device_array((batch, heads, nq), dtype=dtype, stream=stream)
    kernel = exact_attention_kernel(dtype, head_dim, contract=contract, portable_math=portable_math)
    grid, block = launch_config(dtype, head_dim, batch, heads, nq)
    kernel[grid, block, stream](
        q, k, v, key_lengths, out, lse, dtype.type(scale), bool(causal), heads // k.shape[1]
    )
    return out, lse
