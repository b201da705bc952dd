"""Table-lookup attention on the GPU: scores read from a 256 x 256 table in shared memory.

Semantics are `nkattn.reference.table.table_attention_ref`'s: the logit of
(query i, key j) is ``score_offset + score_scale * table[q_codes[i], k_codes[j]]``
with uint8 palette codes and a uint16 table; softmax and P·V as in exact
attention (masks, fully masked rows -> O = 0, lse = -inf).

The kernel runs the spine's streaming loop with the dot product replaced by a
lookup: a block copies the whole table (128 KB) into shared memory once, then for
every key tile reads each score as ``table[code_q * 256 + code_k]`` (exact: a
uint16 is exactly representable), and hands the tile to the shared
`online_softmax_update` and `accumulate_pv` with ``qk_scale = score_scale``.
Softmax is shift invariant, so ``score_offset`` only enters lse, added once at the
end. Shared memory holds no Q or K tiles (``qk_tiles=False``): V, Pᵀ and the table.

`score_rowmax` runs score production alone (lookups, or q·k through the spine's
`tile_scores`) and reduces each row to its maximum, which is what the
scores-per-second comparison times.
"""

from __future__ import annotations

import math
from functools import cache

import numpy as np
from numba import cuda, int32, uint16, uint32

from nkattn.cuda_kernels.online_softmax import (
    launch_with_shared_memory,
    streaming_primitives,
)

PALETTE = 256
TABLE_WORDS = PALETTE * PALETTE // 2  # the uint16 table copied as uint32 words


def _table_offset(sp) -> int:
    """Byte offset of the table in the dynamic shared buffer: past the spine's region, 16-byte aligned."""
    return (sp.SHARED_BYTES + 15) // 16 * 16


def table_words(table_u16) -> np.ndarray:
    """The (256, 256) uint16 table as the 32,768 uint32 words the kernel copies."""
    table_u16 = np.asarray(table_u16)
    if table_u16.shape != (PALETTE, PALETTE) or table_u16.dtype != np.uint16:
        raise ValueError(
            f"the lookup kernel needs a ({PALETTE}, {PALETTE}) uint16 table (pad smaller palettes with "
            f"nkattn.reference.table.pad_table), got {table_u16.shape} {table_u16.dtype}"
        )
    return np.ascontiguousarray(table_u16).reshape(-1).view(np.uint32)


@cache
def lookup_device_code(dtype, head_dim: int, order=None):
    """The spine without Q/K tiles, and the lookup steps both table kernels share::

        copy_table(words, table_words, tid)                     the table into shared memory
        load_row_codes(row_code, q_codes, b, h, row0, nq, tid)  the rows' codes, premultiplied by 256
        load_key_codes(key_code, k_codes, b, kvh, tile_start, nk_b, tid)  the key tile's codes
        lookup_tile_scores(entries, row_code, key_code, s, ty, tx)  s[i, j] = table[code_i, code_j]
    """
    sp = streaming_primitives(np.dtype(dtype), head_dim, order=order, qk_tiles=False)
    TM, TN, BM, BN, THREADS, NB_DTYPE = sp.TM, sp.TN, sp.BM, sp.BN, sp.THREADS, sp.NB_DTYPE
    TABLE_OFFSET = _table_offset(sp)
    TABLE16, TABLE32 = TABLE_OFFSET // 2, TABLE_OFFSET // 4

    @cuda.jit(device=True, inline="always")
    def copy_table(words, table_words, tid):
        for idx in range(tid, TABLE_WORDS, THREADS):
            words[TABLE32 + idx] = table_words[idx]

    @cuda.jit(device=True, inline="always")
    def load_row_codes(row_code, q_codes, b, h, row0, nq, tid):
        for r in range(tid, BM, THREADS):
            row_code[r] = int32(q_codes[b, h, row0 + r]) * PALETTE if row0 + r < nq else 0

    @cuda.jit(device=True, inline="always")
    def load_key_codes(key_code, k_codes, b, kvh, tile_start, nk_b, tid):
        for c in range(tid, BN, THREADS):
            key_code[c] = int32(k_codes[b, kvh, tile_start + c]) if tile_start + c < nk_b else 0

    @cuda.jit(device=True, inline="always")
    def lookup_tile_scores(entries, row_code, key_code, s, ty, tx):
        for i in range(TM):
            base = TABLE16 + row_code[ty * TM + i]
            for j in range(TN):
                s[i, j] = NB_DTYPE(entries[base + key_code[tx * TN + j]])

    return sp, TABLE_OFFSET + PALETTE * PALETTE * 2, copy_table, load_row_codes, load_key_codes, lookup_tile_scores


def launch_config(sp, shared_bytes: int, batch: int, heads: int, nq: int):
    """(grid, block, dynamic shared bytes) of both table kernels, which tile like the exact
    kernel: one block of sp.THREADS per BM query rows of one (b, h)."""
    return (math.ceil(nq / sp.BM), heads, batch), sp.THREADS, shared_bytes


@cache
def table_attention_kernel(dtype, head_dim: int, *, order=None):
    """Build the lookup attention kernel for one dtype and head dim.

    Grid (`launch_config`) as the exact kernel; the block's first step is the
    table copy::

        shared memory:  [ V tile | Pᵀ | scratch ][ table, 256 x 256 uint16 ]
        per key tile:   s[i, j] = table[code_q[i] * 256 + code_k[j]]  -> online softmax -> acc += P V
    """
    sp, shared_bytes, copy_table, load_row_codes, load_key_codes, lookup_tile_scores = lookup_device_code(
        dtype, head_dim, order
    )
    TM, TN, TD, BM, BN = sp.TM, sp.TN, sp.TD, sp.BM, sp.BN
    NB_DTYPE, NEG_INF, ZERO, block_place = sp.NB_DTYPE, sp.NEG_INF, sp.ZERO, sp.block_place
    visible_keys, load_v_tile = sp.visible_keys, sp.load_v_tile
    online_softmax_update, accumulate_pv, store_row = sp.online_softmax_update, sp.accumulate_pv, sp.store_row

    @cuda.jit
    def table_attention_fwd(q_codes, k_codes, table_words, v, key_lengths, o, lse, score_scale, score_offset, causal, group):
        tid, ty, tx, b, h, row0, nq, kvh, nk_b, smem = block_place(q_codes, key_lengths, group)
        # the same dynamic buffer seen as uint32 words (to copy) and uint16 entries (to read)
        words = cuda.shared.array(0, uint32)
        entries = cuda.shared.array(0, uint16)
        row_code = cuda.shared.array(BM, int32)
        key_code = cuda.shared.array(BN, int32)

        kv_end = cuda.local.array(TM, np.int32)
        m_i = cuda.local.array(TM, NB_DTYPE)
        l_i = cuda.local.array(TM, NB_DTYPE)
        acc = cuda.local.array((TM, TD), NB_DTYPE)
        s = cuda.local.array((TM, TN), NB_DTYPE)
        p_frag = cuda.local.array(TM, NB_DTYPE)
        v_frag = cuda.local.array(TD, NB_DTYPE)

        copy_table(words, table_words, tid)
        load_row_codes(row_code, q_codes, b, h, row0, nq, tid)
        for i in range(TM):
            kv_end[i] = visible_keys(row0 + ty * TM + i, nq, nk_b, causal)
            m_i[i] = NEG_INF
            l_i[i] = ZERO
            for e in range(TD):
                acc[i, e] = ZERO
        block_kv_end = visible_keys(min(row0 + BM, nq) - 1, nq, nk_b, causal)

        for tile_start in range(0, block_kv_end, BN):
            cuda.syncthreads()  # the table and row codes are in place; the previous tile is read
            load_v_tile(v, b, kvh, tile_start, nk_b, smem, tid)
            load_key_codes(key_code, k_codes, b, kvh, tile_start, nk_b, tid)
            cuda.syncthreads()  # V tile and key codes are in shared memory
            lookup_tile_scores(entries, row_code, key_code, s, ty, tx)
            online_softmax_update(s, m_i, l_i, acc, kv_end, tile_start, score_scale, smem, ty, tx, tid)
            cuda.syncthreads()  # every thread's P block is written
            accumulate_pv(smem, ty, tx, acc, p_frag, v_frag)

        for i in range(TM):
            q_idx = row0 + ty * TM + i
            if q_idx < nq:
                m_i[i] = m_i[i] + score_offset  # shift invariance: the offset only moves lse
                store_row(o, lse, b, h, q_idx, i, tx, acc, m_i, l_i)

    return table_attention_fwd, sp, shared_bytes


def table_attention(
    q_codes, k_codes, table_u16, v, key_lengths, *, score_scale: float, score_offset: float = 0.0, causal: bool,
    out=None, lse=None, stream=0, order=None,
):
    """Lookup attention on device arrays; returns device arrays (O, lse).

    q_codes (B, H, Nq) and k_codes (B, Hkv, Nk) uint8, `table_u16` a host (256, 256)
    uint16 table, v (B, Hkv, Nk, d). Inputs are assumed validated
    (`nkattn.reference.table.validate_table_inputs(..., require_256=True)`).
    """
    batch, heads, nq = q_codes.shape
    head_dim = v.shape[3]
    dtype = np.dtype(v.dtype)
    if out is None:
        out = cuda.device_array((batch, heads, nq, head_dim), dtype=dtype, stream=stream)
    if lse is None:
        lse = cuda.device_array((batch, heads, nq), dtype=dtype, stream=stream)
    kernel, sp, shared = table_attention_kernel(dtype, head_dim, order=order)
    words = cuda.to_device(table_words(table_u16), stream=stream)
    launch_with_shared_memory(
        kernel, *launch_config(sp, shared, batch, heads, nq), stream,
        q_codes, k_codes, words, v, key_lengths, out, lse, dtype.type(score_scale), dtype.type(score_offset),
        bool(causal), heads // v.shape[1],
    )
    return out, lse


# --------------------------------------------------------------------------------------
# score production alone: lookups against q·k
# --------------------------------------------------------------------------------------


@cache
def score_rowmax_kernel(dtype, head_dim: int, lookup: bool, *, order=None):
    """Scores of every (row, key) reduced to each row's maximum: lookups or q·k.

    Both variants share the tiling, the loop and the reduction; only score
    production differs (one shared-memory lookup, or a d-long dot product through
    the spine's `tile_scores`). The maximum makes every score count.
    """
    lookup_sp, lookup_shared, copy_table, load_row_codes, load_key_codes, lookup_tile_scores = lookup_device_code(
        dtype, head_dim, order
    )
    sp = lookup_sp if lookup else streaming_primitives(np.dtype(dtype), head_dim, order=order)
    shared = lookup_shared if lookup else sp.SHARED_BYTES
    TM, TN, TX, BM, BN = sp.TM, sp.TN, sp.TX, sp.BM, sp.BN
    NB_DTYPE, NEG_INF, SHARED_ALIGN = sp.NB_DTYPE, sp.NEG_INF, sp.SHARED_ALIGN
    LOOKUP = lookup
    tile_scores, load_q_tile, load_k_tile = sp.tile_scores, sp.load_q_tile, sp.load_k_tile
    row_max = sp.row_max

    @cuda.jit
    def score_rowmax(q, k, q_codes, k_codes, table_words, scale, out):
        tid = cuda.threadIdx.x
        ty = tid // TX
        tx = tid - ty * TX
        b = cuda.blockIdx.z
        h = cuda.blockIdx.y
        row0 = cuda.blockIdx.x * BM
        nq = q_codes.shape[2]
        nk = k_codes.shape[2]
        smem = cuda.shared.array(0, NB_DTYPE, alignment=SHARED_ALIGN)
        words = cuda.shared.array(0, uint32)
        entries = cuda.shared.array(0, uint16)
        row_code = cuda.shared.array(BM, int32)
        key_code = cuda.shared.array(BN, int32)
        best = cuda.local.array(TM, NB_DTYPE)
        s = cuda.local.array((TM, TN), NB_DTYPE)
        partial = cuda.local.array((TM, TN), NB_DTYPE)
        q_frag = cuda.local.array(TM, NB_DTYPE)
        k_frag = cuda.local.array(TN, NB_DTYPE)
        for i in range(TM):
            best[i] = NEG_INF
        if LOOKUP:
            copy_table(words, table_words, tid)
            load_row_codes(row_code, q_codes, b, h, row0, nq, tid)
        else:
            load_q_tile(q, b, h, row0, smem, tid)
        for tile_start in range(0, nk, BN):
            cuda.syncthreads()  # the previous tile is read
            if LOOKUP:
                load_key_codes(key_code, k_codes, b, h, tile_start, nk, tid)
            else:
                load_k_tile(k, b, h, tile_start, nk, smem, tid)
            cuda.syncthreads()  # the tile's codes or Kᵀ are in shared memory
            if LOOKUP:
                lookup_tile_scores(entries, row_code, key_code, s, ty, tx)
            else:
                tile_scores(smem, ty, tx, s, partial, q_frag, k_frag)
            for i in range(TM):
                for j in range(TN):
                    x = s[i, j] * scale
                    if tile_start + tx * TN + j < nk and x > best[i]:
                        best[i] = x
        cuda.syncthreads()  # the scratch row of the shuffle stand-in is free
        for i in range(TM):
            m = row_max(best[i], smem, tid)
            if tx == 0 and row0 + ty * TM + i < nq:
                out[b, h, row0 + ty * TM + i] = m

    return score_rowmax, sp, shared


def score_rowmax(q, k, q_codes, k_codes, table_u16, *, scale: float, lookup: bool, out=None, stream=0):
    """Each row's largest score, (B, H, Nq): lookups (codes, table) or q·k (q, k; H = Hkv)."""
    batch, heads, nq = q_codes.shape
    head_dim = q.shape[3]
    dtype = np.dtype(q.dtype)
    if out is None:
        out = cuda.device_array((batch, heads, nq), dtype=dtype, stream=stream)
    kernel, sp, shared = score_rowmax_kernel(dtype, head_dim, lookup)
    words = cuda.to_device(table_words(table_u16), stream=stream)
    launch_with_shared_memory(
        kernel, *launch_config(sp, shared, batch, heads, nq), stream,
        q, k, q_codes, k_codes, words, dtype.type(scale), out,
    )
    return out
