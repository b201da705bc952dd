"""Exact attention in one fused numba.cuda launch (streaming softmax, O(N) memory).

`exact_attention(q, k, v, ...)` takes numba device arrays and returns device
arrays (O, lse), and the row entropy with ``return_entropy=True``;
`nkattn.attention` is the public entry point that validates and converts inputs.
`exact_attention_fold` runs the same loop over one chunk of the keys, resuming
from and leaving a carried state: folding the chunks of a key sequence in order
gives the bits of one `exact_attention` call (context parallelism,
`nkattn.distributed`).
"""

from __future__ import annotations

import math
from functools import cache

import numpy as np
from numba import cuda

from nkattn.cuda_kernels.online_softmax import SIMULATOR, launch_with_shared_memory, streaming_primitives


def tuned_register_cap(dtype, head_dim: int) -> int | None:
    """Register cap of the fastest float32 variant on the H100 (results/bench/exact-tune-h100.json).

    At d <= 64 a cap of 128 lets two 256-thread blocks share an SM (21 against 17
    TFLOP/s at d = 64); at d = 128 the cap spills and halves the speed.
    """
    return 128 if np.dtype(dtype) == np.float32 and head_dim <= 64 else None


@cache
def exact_attention_kernel(
    dtype,
    head_dim: int,
    *,
    value_dim: int | None = None,
    order=None,
    contract: bool | None = None,
    portable_math: bool | None = None,
    prefetch: bool = False,
    max_registers: int | None | str = "tuned",
    resume: bool = False,
    entropy: bool = False,
):
    """Build the fused forward kernel for one dtype and head dim.

    Grid ``(ceil(Nq / BM), H, B)``; a block of TY x TX threads owns BM = TY·TM query
    rows and streams key tiles of BN = TX·TN through shared memory::

                   key tile (BN)                      value width (dv)
                 +---------------+                  +---------------+
        rows     | S = Q Kᵀ:     |   P = exp(S-m)   | O += P V:     |
        (BM)     | TM x TN per   |  ------------->  | TM x TD per   |
                 | thread        |   (Pᵀ shared)    | thread        |
                 +---------------+                  +---------------+

    The value width dv (`value_dim`, default d) may differ from d: O is
    (BM x dv) per block, V tiles BN x dv (see `streaming_primitives` for widths
    that TX does not divide).

    Running max, sum and the accumulator stay in registers across tiles. Tiles
    are visited in order up to the last key any row of the block sees; a tile a
    row sees nothing of leaves it bit-for-bit unchanged, so a row's bits do not
    depend on which rows share its block (batch invariance). No atomics, fixed
    reduction order.

    `contract` and `portable_math` select the arithmetic (see
    `streaming_primitives`); the defaults are the float64 bit-exact and the float32
    fast flavours. `prefetch` loads the next K/V tile into registers while the
    current one is computed (off: the staging registers cost more occupancy than
    the overlap gains on the H100); `max_registers` caps registers per thread
    ("tuned": `tuned_register_cap`). Neither changes the bits.

    `resume` builds the chunked entry instead (`exact_attention_fold`): the same
    tile loop over the key tiles of one chunk, with rows and keys at global
    positions (``row_offset``, ``key_offset``) for the masks, the running
    (m, l, acc) read from and written to (lse, l_state, O) between launches, and
    O = acc / l, lse = m + log l on the ``last`` chunk. A row folds the tiles it
    sees in the order of the one-launch kernel, through the same device code, so
    it ends with the same bits as long as every chunk starts on a key tile (BN)
    boundary; which rows share a block does not matter (batch invariance). The
    resume kernel is a separate function: the one-launch kernel's code is untouched.

    `entropy` builds the one-launch kernel that also writes the row entropy
    (`nkattn.reference.exact`) into an extra (B, H, Nq) argument after lse: one more
    running sum per row, updated after each tile's softmax step. It too is a separate
    function, so the kernel without it compiles to the same code as before it existed.
    """
    if max_registers == "tuned":
        max_registers = tuned_register_cap(dtype, max(head_dim, value_dim or head_dim))
    if prefetch and resume:
        raise ValueError("the resume entry loads key tiles directly: prefetch does not apply")
    if entropy and (prefetch or resume):
        raise ValueError("the entropy kernel is the one-launch kernel without prefetch: "
                         f"got prefetch={prefetch}, resume={resume}")
    if prefetch and value_dim not in (None, head_dim):
        raise ValueError(f"prefetch stages K and V rows of equal width: value_dim {value_dim} != head dim {head_dim}")
    sp = streaming_primitives(
        np.dtype(dtype), head_dim, order=order, contract=contract, portable_math=portable_math, value_dim=value_dim
    )
    TM, TN, TD, BM, BN = sp.TM, sp.TN, sp.TD, sp.BM, sp.BN
    NB_DTYPE, NEG_INF, ZERO, block_place = sp.NB_DTYPE, sp.NEG_INF, sp.ZERO, sp.block_place
    PREFETCH = prefetch
    KV_BUF = sp.KV_PER_THREAD if prefetch else 1  # staging registers only when prefetching
    visible_keys, load_q_tile, fetch_kv_tile, store_kv_tile, load_kv_tile = (
        sp.visible_keys, sp.load_q_tile, sp.fetch_kv_tile, sp.store_kv_tile, sp.load_kv_tile
    )
    tile_scores, online_softmax_update, accumulate_pv, store_rows = (
        sp.tile_scores, sp.online_softmax_update, sp.accumulate_pv, sp.store_rows
    )

    jit_options = {} if SIMULATOR or max_registers is None else {"max_registers": max_registers}
    if resume:
        return _resume_kernel(sp, jit_options), sp
    if entropy:
        return _entropy_kernel(sp, jit_options), sp

    @cuda.jit(**jit_options)
    def exact_attention_fwd(q, k, v, key_lengths, o, lse, qk_scale, causal, group):
        tid, ty, tx, b, h, row0, nq, kvh, nk_b, smem = block_place(q, key_lengths, group)

        kv_end = cuda.local.array(TM, np.int32)
        m_i = cuda.local.array(TM, NB_DTYPE)
        l_i = cuda.local.array(TM, NB_DTYPE)
        acc = cuda.local.array((TM, TD), NB_DTYPE)
        s = cuda.local.array((TM, TN), NB_DTYPE)
        partial = cuda.local.array((TM, TN), NB_DTYPE)
        q_frag = cuda.local.array(TM, NB_DTYPE)
        k_frag = cuda.local.array(TN, NB_DTYPE)
        v_frag = cuda.local.array(TD, NB_DTYPE)
        k_buf = cuda.local.array(KV_BUF, NB_DTYPE)
        v_buf = cuda.local.array(KV_BUF, NB_DTYPE)
        for i in range(TM):
            kv_end[i] = visible_keys(row0 + ty * TM + i, nq, nk_b, causal)
            m_i[i] = NEG_INF
            l_i[i] = ZERO
            for e in range(TD):
                acc[i, e] = ZERO
        # causal visibility grows with the row: the block's last row sees the most
        block_kv_end = visible_keys(min(row0 + BM, nq) - 1, nq, nk_b, causal)

        load_q_tile(q, b, h, row0, smem, tid)
        if PREFETCH:
            fetch_kv_tile(k, v, b, kvh, 0, nk_b, k_buf, v_buf, tid)
        for tile_start in range(0, block_kv_end, BN):
            cuda.syncthreads()  # Q is loaded and every read of the previous tile is done
            if PREFETCH:
                store_kv_tile(smem, k_buf, v_buf, tid)
            else:
                load_kv_tile(k, v, b, kvh, tile_start, nk_b, smem, tid)
            cuda.syncthreads()  # the whole K/V tile is in shared memory
            if PREFETCH and tile_start + BN < block_kv_end:
                fetch_kv_tile(k, v, b, kvh, tile_start + BN, nk_b, k_buf, v_buf, tid)
            tile_scores(smem, ty, tx, s, partial, q_frag, k_frag)
            online_softmax_update(s, m_i, l_i, acc, kv_end, tile_start, qk_scale, smem, ty, tx, tid)
            cuda.syncthreads()  # every thread's P block is written
            accumulate_pv(smem, ty, tx, acc, q_frag, v_frag)

        store_rows(o, lse, b, h, row0, nq, ty, tx, acc, m_i, l_i)

    return exact_attention_fwd, sp


def _resume_kernel(sp, jit_options):
    """The chunked entry of `exact_attention_kernel` (``resume=True``): grid as the one-launch kernel's."""
    TM, TN, TD, BM, BN, DV, LV = sp.TM, sp.TN, sp.TD, sp.BM, sp.BN, sp.DV, sp.LV
    NB_DTYPE, NEG_INF, ZERO, block_place = sp.NB_DTYPE, sp.NEG_INF, sp.ZERO, sp.block_place
    PADDED_V = LV != DV
    visible_keys, load_q_tile, load_kv_tile = sp.visible_keys, sp.load_q_tile, sp.load_kv_tile
    tile_scores, online_softmax_update, accumulate_pv, store_rows = (
        sp.tile_scores, sp.online_softmax_update, sp.accumulate_pv, sp.store_rows
    )

    @cuda.jit(**jit_options)
    def exact_attention_resume(
        q, k, v, key_lengths, o, lse, l_state, qk_scale, causal, group, row_offset, nq_total, key_offset, first, last
    ):
        tid, ty, tx, b, h, row0, nq, kvh, nk_b, smem = block_place(q, key_lengths, group)

        kv_end = cuda.local.array(TM, np.int32)
        m_i = cuda.local.array(TM, NB_DTYPE)
        l_i = cuda.local.array(TM, NB_DTYPE)
        acc = cuda.local.array((TM, TD), NB_DTYPE)
        s = cuda.local.array((TM, TN), NB_DTYPE)
        partial = cuda.local.array((TM, TN), NB_DTYPE)
        q_frag = cuda.local.array(TM, NB_DTYPE)
        k_frag = cuda.local.array(TN, NB_DTYPE)
        v_frag = cuda.local.array(TD, NB_DTYPE)
        for i in range(TM):
            q_idx = row0 + ty * TM + i
            live = q_idx < nq  # rows past the chunk of queries belong to no one here
            kv_end[i] = visible_keys(row_offset + q_idx, nq_total, nk_b, causal) if live else 0
            # running statistics: fresh on the first chunk, carried over after it
            if live and not first:
                m_i[i] = lse[b, h, q_idx]
                l_i[i] = l_state[b, h, q_idx]
                for e in range(TD):
                    acc[i, e] = o[b, h, q_idx, tx * TD + e] if not PADDED_V or tx * TD + e < DV else ZERO
            else:
                m_i[i] = NEG_INF
                l_i[i] = ZERO
                for e in range(TD):
                    acc[i, e] = ZERO
        block_kv_end = visible_keys(row_offset + min(row0 + BM, nq) - 1, nq_total, nk_b, causal)
        chunk_end = min(block_kv_end, key_offset + k.shape[2])
        # the keys a tile load may read, counted from the chunk's first
        chunk_keys = min(nk_b - key_offset, k.shape[2])

        load_q_tile(q, b, h, row0, smem, tid)
        for tile_start in range(key_offset, chunk_end, BN):
            cuda.syncthreads()  # Q is loaded and every read of the previous tile is done
            load_kv_tile(k, v, b, kvh, tile_start - key_offset, chunk_keys, smem, tid)
            cuda.syncthreads()  # the whole K/V tile is in shared memory
            tile_scores(smem, ty, tx, s, partial, q_frag, k_frag)
            online_softmax_update(s, m_i, l_i, acc, kv_end, tile_start, qk_scale, smem, ty, tx, tid)
            cuda.syncthreads()  # every thread's P block is written
            accumulate_pv(smem, ty, tx, acc, q_frag, v_frag)

        if last:
            store_rows(o, lse, b, h, row0, nq, ty, tx, acc, m_i, l_i)
            return
        for i in range(TM):
            q_idx = row0 + ty * TM + i
            if q_idx < nq:
                for e in range(TD):
                    if not PADDED_V or tx * TD + e < DV:
                        o[b, h, q_idx, tx * TD + e] = acc[i, e]
                if tx == 0:
                    lse[b, h, q_idx] = m_i[i]
                    l_state[b, h, q_idx] = l_i[i]

    return exact_attention_resume


def _entropy_kernel(sp, jit_options):
    """The one-launch kernel of `exact_attention_kernel` with the row entropy (``entropy=True``)."""
    TM, TN, TD, BM, BN = sp.TM, sp.TN, sp.TD, sp.BM, sp.BN
    NB_DTYPE, NEG_INF, ZERO, block_place = sp.NB_DTYPE, sp.NEG_INF, sp.ZERO, sp.block_place
    visible_keys, load_q_tile, load_kv_tile = sp.visible_keys, sp.load_q_tile, sp.load_kv_tile
    tile_scores, online_softmax_entropy_update, accumulate_pv = (
        sp.tile_scores, sp.online_softmax_entropy_update, sp.accumulate_pv
    )
    store_rows, store_entropy_rows = sp.store_rows, sp.store_entropy_rows

    @cuda.jit(**jit_options)
    def exact_attention_entropy(q, k, v, key_lengths, o, lse, entropy, qk_scale, causal, group):
        tid, ty, tx, b, h, row0, nq, kvh, nk_b, smem = block_place(q, key_lengths, group)

        kv_end = cuda.local.array(TM, np.int32)
        m_i = cuda.local.array(TM, NB_DTYPE)
        l_i = cuda.local.array(TM, NB_DTYPE)
        t_i = cuda.local.array(TM, NB_DTYPE)
        m_prev = cuda.local.array(TM, NB_DTYPE)
        l_prev = cuda.local.array(TM, NB_DTYPE)
        acc = cuda.local.array((TM, TD), NB_DTYPE)
        s = cuda.local.array((TM, TN), NB_DTYPE)
        partial = cuda.local.array((TM, TN), NB_DTYPE)
        q_frag = cuda.local.array(TM, NB_DTYPE)
        k_frag = cuda.local.array(TN, NB_DTYPE)
        v_frag = cuda.local.array(TD, NB_DTYPE)
        for i in range(TM):
            kv_end[i] = visible_keys(row0 + ty * TM + i, nq, nk_b, causal)
            m_i[i] = NEG_INF
            l_i[i] = ZERO
            t_i[i] = ZERO
            for e in range(TD):
                acc[i, e] = ZERO
        block_kv_end = visible_keys(min(row0 + BM, nq) - 1, nq, nk_b, causal)

        load_q_tile(q, b, h, row0, smem, tid)
        for tile_start in range(0, block_kv_end, BN):
            cuda.syncthreads()  # Q is loaded and every read of the previous tile is done
            load_kv_tile(k, v, b, kvh, tile_start, nk_b, smem, tid)
            cuda.syncthreads()  # the whole K/V tile is in shared memory
            tile_scores(smem, ty, tx, s, partial, q_frag, k_frag)
            online_softmax_entropy_update(s, m_i, l_i, t_i, m_prev, l_prev, acc, kv_end, tile_start, qk_scale, smem,
                                          ty, tx, tid)
            cuda.syncthreads()  # every thread's P block is written
            accumulate_pv(smem, ty, tx, acc, q_frag, v_frag)

        store_rows(o, lse, b, h, row0, nq, ty, tx, acc, m_i, l_i)
        store_entropy_rows(entropy, b, h, row0, nq, ty, tx, l_i, t_i)

    return exact_attention_entropy


def launch_config(sp, batch: int, heads: int, nq: int):
    """(grid, block, dynamic shared bytes): one block per BM query rows of one (b, h)."""
    return (math.ceil(nq / sp.BM), heads, batch), sp.THREADS, sp.SHARED_BYTES


def exact_attention(
    q, k, v, key_lengths, *, causal: bool, scale: float, out=None, lse=None, return_entropy: bool = False,
    entropy=None, stream=0, **variant
):
    """Run the fused kernel on device arrays; returns device arrays (O, lse), or
    (O, lse, entropy) with `return_entropy` (into `entropy` when given, shaped as lse).

    `key_lengths` is an int32 device array of length B (Nk for every batch when
    there is no key mask). v may be narrower or wider than q and k (O takes v's
    width). Inputs are assumed validated by `nkattn.attention`. `variant` passes
    kernel options through to `exact_attention_kernel`.
    """
    batch, heads, nq, head_dim = q.shape
    value_dim = v.shape[3]
    dtype = np.dtype(q.dtype)
    if out is None:
        out = cuda.device_array((batch, heads, nq, value_dim), dtype=dtype, stream=stream)
    if lse is None:
        lse = cuda.device_array((batch, heads, nq), dtype=dtype, stream=stream)
    if value_dim != head_dim:
        variant = dict(variant, value_dim=value_dim)
    if entropy is not None and not return_entropy:
        raise ValueError("an entropy buffer was passed without return_entropy=True")
    outputs = (out, lse)
    if return_entropy:
        if entropy is None:
            entropy = cuda.device_array((batch, heads, nq), dtype=dtype, stream=stream)
        outputs = (out, lse, entropy)
        variant = dict(variant, entropy=True)
    kernel, sp = exact_attention_kernel(dtype, head_dim, **variant)
    grid, block, shared = launch_config(sp, batch, heads, nq)
    launch_with_shared_memory(
        kernel, grid, block, shared, stream,
        q, k, v, key_lengths, *outputs, dtype.type(scale), bool(causal), heads // k.shape[1],
    )
    return outputs


def exact_attention_fold(
    q, k, v, key_lengths, out, lse, l_state, *, causal: bool, scale: float, row_offset: int, nq_total: int,
    key_offset: int, first: bool, last: bool, stream=0,
):
    """Fold one chunk of keys into the carried state of a run of query rows (device arrays).

    q holds global query rows ``[row_offset, row_offset + q.shape[2])`` of ``nq_total``;
    k and v hold global keys ``[key_offset, key_offset + k.shape[2])``; `key_lengths`
    (int32, B) counts global keys. Between calls out holds the unnormalised
    accumulator, lse the running max and `l_state` the running sum (same shape as
    lse); ``first`` starts from an empty state, ``last`` leaves O and lse as
    `exact_attention` returns them. Folding every chunk of the keys that the rows
    see, in key order, each starting on a multiple of the key tile BN
    (`exact_attention_kernel`'s ``sp.BN``), gives `exact_attention`'s bits for these
    rows. Inputs are assumed validated (`nkattn.distributed` checks them).
    """
    batch, heads, nq, head_dim = q.shape
    dtype = np.dtype(q.dtype)
    variant = {} if v.shape[3] == head_dim else {"value_dim": v.shape[3]}
    kernel, sp = exact_attention_kernel(dtype, head_dim, resume=True, **variant)
    grid, block, shared = launch_config(sp, batch, heads, nq)
    launch_with_shared_memory(
        kernel, grid, block, shared, stream,
        q, k, v, key_lengths, out, lse, l_state, dtype.type(scale), bool(causal), heads // k.shape[1],
        np.int64(row_offset), np.int64(nq_total), np.int64(key_offset), bool(first), bool(last),
    )
    return out, lse
