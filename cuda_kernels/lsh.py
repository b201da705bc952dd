"""Hyperplane-LSH attention on the GPU: hash, deterministic bucket sort, bucketed streaming attention.

Semantics are `nkattn.reference.lsh`'s (exact union of the buckets a query shares
with keys in any table, each key counted once; empty candidate set -> O = 0,
lse = -inf). One call runs:

1. `simhash_kernel`: every row's bucket in every table (float64 projections,
   bit i = [x · r_i > 0]), as codes (B, Hx, L, N) int32 for sorting and
   (B, Hx, N, L) uint16 for reading a row's codes of all tables at once.
2. A stable radix sort by bucket of every (b, head, table) segment at once
   (`nkattn.cuda_kernels.radix_sort`: no atomics, so the result is the unique
   (bucket, index) order). Then each bucket's [start, end) among the sorted
   rows, and for queries the first work item of each bucket (a scan of
   ceil(bucket size / BM)) and the bucket of each work item.
3. `lsh_attention_kernel`, launched once per table t: a block takes one work
   item, up to BM queries of one bucket, and streams that bucket's keys (index
   order) in tiles of BN through the spine's device code (gathered tile loads,
   tile_scores, online_softmax_update, accumulate_pv). A score is hidden when the
   key is not visible (key_lengths, causal) or the pair already shared a bucket
   in an earlier table (that is what counts each key once). The running
   (m, l, acc) of every query lives in (lse, l, O) between launches; the last
   table writes O = acc / l and lse = m + log l.

Memory beyond Q, K, V, O, lse: codes, permutations and sort scratch, O(N·L)
int32, and bucket bounds O(L·2^bits). Every query is owned by one block per
table and tables run in order, so the bits do not depend on the launch.

Each section below holds its kernels, then their launch geometry
(``*_launch_config``), then the host functions that launch them.
"""

from __future__ import annotations

import math
from functools import cache

import numpy as np
from numba import boolean, cuda, float64, from_dtype, int32, uint32

from nkattn.cuda_kernels.online_softmax import (
    SIMULATOR,
    launch_with_shared_memory,
    streaming_primitives,
)
from nkattn.cuda_kernels.radix_sort import (
    elementwise_launch_config,
    exclusive_scan,
    fill,
    segmented_radix_sort,
)
from nkattn.reference import lsh as ref
from nkattn.reference.exact import StreamingOrder

# Bucket codes of earlier tables are kept in static shared memory (two per uint32)
# for the de-duplication test; the kernel is built once for this many tables.
MAX_TABLES = 64
HASH_BLOCK = 8 if SIMULATOR else 64
# A bucket code has at most ref.MAX_BITS = 16 bits: codes are stored as uint16, and the
# kernel keeps two earlier-table codes per uint32 word (low and high half).
CODE_BITS = 16
CODE_MASK = (1 << CODE_BITS) - 1
# The LSH kernel's tiling: 32 x 32 tiles, 128 threads. Buckets hold tens to hundreds of
# rows and keys, so small tiles waste less on padding; at N = 1M on the H100 this ran
# 14 bits x 48 tables in 374 ms against 429 (32 x 64 tiles), 567 (64 x 64) and 596 ms
# (128 x 64, the exact kernel's); the final bench is in results/bench/lsh-h100.json.
LSH_ORDERS = {np.dtype(np.float32): StreamingOrder(threads_y=8, threads_x=16, rows_per_thread=4, keys_per_thread=2)}


# --------------------------------------------------------------------------------------
# 1. hashing
# --------------------------------------------------------------------------------------


@cache
def simhash_kernel(dtype, head_dim: int, bits: int):
    """codes[b, h, t, n] = sum_i [x[b, h, n] · planes[t, i] > 0] << i (int32, the sort's
    layout) and the same codes row-major, codes_by_row[b, h, n, t] (uint16, for reading
    all tables of one row at once). Launched by `rows_launch_config`.

    The block's rows are staged transposed in shared memory, so thread r reads row r
    with unit stride across the warp, and one table's hyperplanes at a time, read by
    every thread at the same address (a broadcast). Each element of x is converted to
    float64 once per table and feeds all `bits` projections, each summed over
    c = 0..d-1 in order."""
    nb_dtype = from_dtype(np.dtype(dtype))
    D, BITS = head_dim, bits
    LDX = HASH_BLOCK + 1  # an odd row stride keeps the transposing stores off one bank
    PLANES_OFFSET = (LDX * D * np.dtype(dtype).itemsize + 7) // 8  # in float64 elements

    @cuda.jit
    def simhash_fwd(x, planes, codes, codes_by_row):
        r = cuda.threadIdx.x
        n0 = cuda.blockIdx.x * HASH_BLOCK
        h = cuda.blockIdx.y
        b = cuda.blockIdx.z
        nrows = x.shape[2]
        xs = cuda.shared.array(0, nb_dtype)
        ps = cuda.shared.array(0, float64)
        for idx in range(r, HASH_BLOCK * D, HASH_BLOCK):
            row = idx // D
            c = idx - row * D
            xs[c * LDX + row] = x[b, h, n0 + row, c] if n0 + row < nrows else 0
        n = n0 + r
        proj = cuda.local.array(BITS, float64)
        for t in range(planes.shape[0]):
            cuda.syncthreads()  # the rows are staged and the previous table's planes are no longer read
            for idx in range(r, BITS * D, HASH_BLOCK):
                ps[PLANES_OFFSET + idx] = planes[t, idx // D, idx - (idx // D) * D]
            cuda.syncthreads()  # this table's planes are staged
            for i in range(BITS):
                proj[i] = 0.0
            for c in range(D):
                xc = float64(xs[c * LDX + r])
                for i in range(BITS):
                    proj[i] += xc * ps[PLANES_OFFSET + i * D + c]
            code = 0
            for i in range(BITS):
                if proj[i] > 0.0:
                    code |= 1 << i
            if n < nrows:
                codes[b, h, t, n] = code
                codes_by_row[b, h, n, t] = code

    return simhash_fwd, PLANES_OFFSET * 8 + BITS * D * 8


@cuda.jit
def unit_rows_kernel(x, out):
    """out = x / ||x|| row by row (zero rows stay zero): Reformer's shared-QK keys."""
    n = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    h = cuda.blockIdx.y
    b = cuda.blockIdx.z
    if n >= x.shape[2]:
        return
    norm2 = float64(0.0)
    for c in range(x.shape[3]):
        norm2 += float64(x[b, h, n, c]) * float64(x[b, h, n, c])
    inv = 1.0 / math.sqrt(norm2) if norm2 > 0.0 else 0.0
    for c in range(x.shape[3]):
        out[b, h, n, c] = x[b, h, n, c] * inv


def rows_launch_config(n: int, heads: int, batch: int):
    """(grid, block) of the hash and unit-row kernels: a block of HASH_BLOCK threads per
    HASH_BLOCK consecutive rows of one (b, head), thread r on row ``blockIdx.x * HASH_BLOCK + r``."""
    return (math.ceil(n / HASH_BLOCK), heads, batch), HASH_BLOCK


def _hash(x, planes, stream):
    batch, heads, n, head_dim = x.shape
    tables, bits = planes.shape[0], planes.shape[1]
    codes = cuda.device_array((batch, heads, tables, n), dtype=np.int32, stream=stream)
    codes_by_row = cuda.device_array((batch, heads, n, tables), dtype=np.uint16, stream=stream)
    kernel, shared = simhash_kernel(np.dtype(x.dtype), head_dim, bits)
    launch_with_shared_memory(
        kernel, *rows_launch_config(n, heads, batch), shared, stream, x, planes, codes, codes_by_row
    )
    return codes, codes_by_row


def unit_rows(x, stream=0):
    batch, heads, n, _ = x.shape
    out = cuda.device_array_like(x, stream=stream)
    grid, block = rows_launch_config(n, heads, batch)
    unit_rows_kernel[grid, block, stream](x, out)
    return out


# --------------------------------------------------------------------------------------
# 2. buckets: sorted rows, bucket bounds, query work items
# --------------------------------------------------------------------------------------


@cuda.jit
def bucket_bounds_kernel(sorted_codes, start, end):
    """start/end[s, bucket] = the bucket's range among sorted codes (0, 0 when empty)."""
    p = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    seg = cuda.blockIdx.y
    n = sorted_codes.shape[1]
    if p >= n:
        return
    code = sorted_codes[seg, p]
    if p == 0 or sorted_codes[seg, p - 1] != code:
        start[seg, code] = p
    if p == n - 1 or sorted_codes[seg, p + 1] != code:
        end[seg, code] = p + 1


@cuda.jit
def bucket_items_kernel(start, end, rows_per_item, items):
    """items[s, bucket] = ceil(bucket size / rows_per_item): the blocks a bucket's queries need."""
    p = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    seg = cuda.blockIdx.y
    if p < items.shape[1]:
        items[seg, p] = (end[seg, p] - start[seg, p] + rows_per_item - 1) // rows_per_item


@cuda.jit
def item_buckets_kernel(first_item, start, end, rows_per_item, item_bucket):
    """item_bucket[s, first_item[s, bucket] + i] = bucket for each of the bucket's items."""
    p = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    seg = cuda.blockIdx.y
    if p < first_item.shape[1]:
        first = first_item[seg, p]
        for i in range((end[seg, p] - start[seg, p] + rows_per_item - 1) // rows_per_item):
            item_bucket[seg, first + i] = p


def bucket_bounds(sorted_codes, bits: int, stream=0):
    segments, n = sorted_codes.shape
    start = cuda.device_array((segments, 1 << bits), dtype=np.int32, stream=stream)
    end = cuda.device_array((segments, 1 << bits), dtype=np.int32, stream=stream)
    fill(start, 0, stream)
    fill(end, 0, stream)
    grid, block = elementwise_launch_config(n, segments)
    bucket_bounds_kernel[grid, block, stream](sorted_codes, start, end)
    return start, end


class LshBuckets:
    """Device-side hash tables of one call (per (b, head, table) segment):
    codes by row (B, Hx, N, L) uint16, the stable bucket order of rows, and each
    bucket's [start, end) in it, for queries and keys."""

    def __init__(self, q_codes, q_perm, q_sorted, q_start, q_end, k_codes, k_perm, k_start, k_end):
        self.q_codes, self.q_perm, self.q_sorted, self.q_start, self.q_end = q_codes, q_perm, q_sorted, q_start, q_end
        self.k_codes, self.k_perm, self.k_start, self.k_end = k_codes, k_perm, k_start, k_end


def _sort_and_bound(x, planes, bits, stream):
    """Hash, sort and bound the buckets of x's rows; arrays shaped per (b, head, table)."""
    codes, codes_by_row = _hash(x, planes, stream)
    batch, heads, tables, n = codes.shape
    sorted_codes, perm = segmented_radix_sort(codes.reshape(batch * heads * tables, n), bits, stream)
    start, end = bucket_bounds(sorted_codes, bits, stream)
    seg = (batch, heads, tables)
    return (codes_by_row, perm.reshape(seg + (n,)), sorted_codes.reshape(seg + (n,)),
            start.reshape(seg + (1 << bits,)), end.reshape(seg + (1 << bits,)))


def build_buckets(q, k, planes, bits: int, *, shared_qk: bool = False, stream=0) -> LshBuckets:
    """Hash q and k with `planes` (device, (tables, bits, d) float64), sort, find bucket bounds."""
    k_codes, k_perm, k_sorted, k_start, k_end = _sort_and_bound(k, planes, bits, stream)
    if shared_qk:
        return LshBuckets(k_codes, k_perm, k_sorted, k_start, k_end, k_codes, k_perm, k_start, k_end)
    q_parts = _sort_and_bound(q, planes, bits, stream)
    return LshBuckets(*q_parts, k_codes, k_perm, k_start, k_end)


def work_items(buckets: LshBuckets, bits: int, rows_per_item: int, max_items: int, stream=0):
    """The query work items of every (b, head, table): the first item of each bucket
    (B, H, L, 2^bits), an exclusive scan of ceil(bucket size / rows_per_item), and the
    bucket of each item (B, H, L, max_items), -1 past the last."""
    batch, heads, tables, nb = buckets.q_start.shape
    segments = batch * heads * tables
    start, end = buckets.q_start.reshape(segments, nb), buckets.q_end.reshape(segments, nb)
    items = cuda.device_array((segments, nb), dtype=np.int32, stream=stream)
    bucket_grid, bucket_block = elementwise_launch_config(nb, segments)
    bucket_items_kernel[bucket_grid, bucket_block, stream](start, end, rows_per_item, items)
    exclusive_scan(items.reshape(segments, nb, 1), stream)
    item_bucket = cuda.device_array((segments, max_items), dtype=np.int32, stream=stream)
    fill(item_bucket, -1, stream)
    item_buckets_kernel[bucket_grid, bucket_block, stream](items, start, end, rows_per_item, item_bucket)
    return items.reshape(batch, heads, tables, nb), item_bucket.reshape(batch, heads, tables, max_items)


# --------------------------------------------------------------------------------------
# 3. bucketed attention, one launch per table
# --------------------------------------------------------------------------------------


def lsh_order(dtype, head_dim: int):
    """The LSH kernel's tiling (None: the spine's default for this dtype and head dim)."""
    return None if SIMULATOR else LSH_ORDERS.get(np.dtype(dtype))


@cache
def lsh_attention_kernel(dtype, head_dim: int, *, shared_qk: bool = False, order=None):
    """Build the bucketed attention kernel for one dtype and head dim.

    Grid (`launch_config`): one block per *work item*, up to BM queries of one
    bucket of table t (a bucket of c queries has ceil(c / BM) items; blocks past
    the last item return at once)::

        sorted queries  | bucket 5: item 0, item 1 | bucket 9: item 2 | ...
        keys streamed     keys of bucket 5            keys of bucket 9     (tiles of BN)

    Each item streams its bucket's keys (index order) through the spine's tile
    code. A key that already shared a bucket with the row in an earlier table is
    hidden (-inf), so each candidate counts once.
    """
    sp = streaming_primitives(np.dtype(dtype), head_dim, order=order or lsh_order(dtype, head_dim))
    TM, TN, TD, TX, BM, BN = sp.TM, sp.TN, sp.TD, sp.TX, sp.BM, sp.BN
    NB_DTYPE, NEG_INF, ZERO, SHARED_ALIGN = sp.NB_DTYPE, sp.NEG_INF, sp.ZERO, sp.SHARED_ALIGN
    PAIRS = MAX_TABLES // 2
    THREADS = sp.THREADS
    SHARED_QK = shared_qk
    SELF_LOGIT = NB_DTYPE(ref.SELF_LOGIT)
    NO_LIMIT = np.int32(2**31 - 1)
    visible_keys, gather_q_tile, gather_kv_tile = sp.visible_keys, sp.gather_q_tile, sp.gather_kv_tile
    tile_scores, online_softmax_update, accumulate_pv, store_row = (
        sp.tile_scores, sp.online_softmax_update, sp.accumulate_pv, sp.store_row
    )

    @cuda.jit(device=True, inline="always")
    def load_earlier_codes(dst, index, count, codes, b, h, t, unused_half, tid):
        # codes of tables 0..t-1 of rows index[0:count] (-1: none), two per uint32 (table 2p
        # low, 2p + 1 high), the (row, pair) grid shared by all threads; a missing high half
        # is `unused_half`, which differs between queries (0) and keys (1)
        pairs = (t + 1) // 2
        for idx in range(tid, count * pairs, THREADS):
            r = idx // pairs
            p = idx - r * pairs
            j = index[r]
            if j >= 0:
                lo = uint32(codes[b, h, j, 2 * p])
                hi = uint32(codes[b, h, j, 2 * p + 1]) if 2 * p + 1 < t else uint32(unused_half)
                dst[r, p] = lo | (hi << CODE_BITS)

    @cuda.jit(device=True, inline="always")
    def hide_scores(s, t, row_idx, row_vis, key_idx, q_prev, k_prev, self_score, ty, tx, seen, q_pair, k_pair):
        # pairs that shared a bucket in an earlier table (compared two tables per XOR),
        # padding rows and keys and invisible keys get -inf; shared-QK's self score is replaced
        for i in range(TM):
            for j in range(TN):
                seen[i, j] = False
        for p in range((t + 1) // 2):
            for i in range(TM):
                q_pair[i] = q_prev[ty * TM + i, p]
            for j in range(TN):
                k_pair[j] = k_prev[tx * TN + j, p]
            for i in range(TM):
                for j in range(TN):
                    x = q_pair[i] ^ k_pair[j]
                    seen[i, j] = seen[i, j] or (x & CODE_MASK) == 0 or (x >> CODE_BITS) == 0
        for i in range(TM):
            r = ty * TM + i
            for j in range(TN):
                kv_idx = key_idx[tx * TN + j]
                if seen[i, j] or kv_idx < 0 or kv_idx >= row_vis[r]:
                    s[i, j] = NEG_INF
                elif SHARED_QK and kv_idx == row_idx[r]:
                    s[i, j] = self_score

    @cuda.jit
    def lsh_attention_fwd(
        q, k, v, key_lengths, q_perm, q_start, q_end, q_items, item_bucket, q_codes, k_perm, k_start, k_end, k_codes,
        o, lse, l_state, qk_scale, causal, group, t, last,
    ):
        tid = cuda.threadIdx.x
        ty = tid // TX
        tx = tid - ty * TX
        b = cuda.blockIdx.z
        h = cuda.blockIdx.y
        item = cuda.blockIdx.x
        nq = q.shape[2]
        kvh = h // group
        nk_b = key_lengths[b]

        bucket = item_bucket[b, h, t, item]
        if bucket < 0:
            return  # past the last item (uniform over the block)
        row_begin = q_start[b, h, t, bucket] + (item - q_items[b, h, t, bucket]) * BM
        row_end = min(row_begin + BM, q_end[b, h, t, bucket])
        seg_start = k_start[b, kvh, t, bucket]
        seg_end = k_end[b, kvh, t, bucket]
        if seg_start == seg_end and t > 0 and not last:
            return  # no key: the rows' running statistics stay as they are

        smem = cuda.shared.array(0, NB_DTYPE, alignment=SHARED_ALIGN)
        row_idx = cuda.shared.array(BM, int32)
        row_vis = cuda.shared.array(BM, int32)
        key_idx = cuda.shared.array(BN, int32)
        q_prev = cuda.shared.array((BM, PAIRS), uint32)
        k_prev = cuda.shared.array((BN, PAIRS), uint32)

        kv_end = cuda.local.array(TM, np.int32)
        m_i = cuda.local.array(TM, NB_DTYPE)
        l_i = cuda.local.array(TM, NB_DTYPE)
        acc = cuda.local.array((TM, TD), NB_DTYPE)
        s = cuda.local.array((TM, TN), NB_DTYPE)
        partial = cuda.local.array((TM, TN), NB_DTYPE)
        q_frag = cuda.local.array(TM, NB_DTYPE)
        k_frag = cuda.local.array(TN, NB_DTYPE)
        v_frag = cuda.local.array(TD, NB_DTYPE)
        seen = cuda.local.array((TM, TN), boolean)
        q_pair = cuda.local.array(TM, uint32)
        k_pair = cuda.local.array(TN, uint32)

        # the item's rows: original index, visible keys, then their buckets in earlier tables
        for r in range(tid, BM, cuda.blockDim.x):
            if row_begin + r < row_end:
                q_idx = q_perm[b, h, t, row_begin + r]
                row_idx[r] = q_idx
                row_vis[r] = visible_keys(q_idx, nq, nk_b, causal)
            else:
                row_idx[r] = -1
                row_vis[r] = 0
        cuda.syncthreads()  # row indices are known
        load_earlier_codes(q_prev, row_idx, BM, q_codes, b, h, t, 0, tid)

        # running statistics: fresh in the first table, carried over after it
        for i in range(TM):
            q_idx = row_idx[ty * TM + i]
            kv_end[i] = NO_LIMIT  # visibility is applied by hide_scores, by key index
            if t > 0 and q_idx >= 0:
                m_i[i] = lse[b, h, q_idx]
                l_i[i] = l_state[b, h, q_idx]
                for e in range(TD):
                    acc[i, e] = o[b, h, q_idx, tx * TD + e]
            else:
                m_i[i] = NEG_INF
                l_i[i] = ZERO
                for e in range(TD):
                    acc[i, e] = ZERO
        # keys come in index order: no row sees a key at or past the block's largest visibility
        block_vis = 0
        for r in range(BM):
            block_vis = max(block_vis, row_vis[r])
        self_score = SELF_LOGIT / qk_scale

        gather_q_tile(q, b, h, row_idx, smem, tid)
        for tile_start in range(seg_start, seg_end, BN):
            if k_perm[b, kvh, t, tile_start] >= block_vis:
                break
            cuda.syncthreads()  # Q and the rows' codes are loaded; every read of the previous tile is done
            for c in range(tid, BN, cuda.blockDim.x):
                key_idx[c] = k_perm[b, kvh, t, tile_start + c] if tile_start + c < seg_end else -1
            cuda.syncthreads()  # the tile's key indices are known
            gather_kv_tile(k, v, b, kvh, key_idx, smem, tid)
            load_earlier_codes(k_prev, key_idx, BN, k_codes, b, kvh, t, 1, tid)
            cuda.syncthreads()  # K/V tile, the rows' and keys' earlier buckets are in shared memory
            tile_scores(smem, ty, tx, s, partial, q_frag, k_frag)
            hide_scores(s, t, row_idx, row_vis, key_idx, q_prev, k_prev, self_score, ty, tx, seen, q_pair, k_pair)
            online_softmax_update(s, m_i, l_i, acc, kv_end, 0, qk_scale, smem, ty, tx, tid)
            cuda.syncthreads()  # every thread's P block is written
            accumulate_pv(smem, ty, tx, acc, q_frag, v_frag)

        for i in range(TM):
            q_idx = row_idx[ty * TM + i]
            if q_idx >= 0:
                if last:
                    store_row(o, lse, b, h, q_idx, i, tx, acc, m_i, l_i)
                else:
                    for e in range(TD):
                        o[b, h, q_idx, tx * TD + e] = acc[i, e]
                    if tx == 0:
                        lse[b, h, q_idx] = m_i[i]
                        l_state[b, h, q_idx] = l_i[i]

    return lsh_attention_fwd, sp


def launch_config(sp, batch: int, heads: int, nq: int, bits: int):
    """(grid, block, dynamic shared bytes) of the attention kernel: one block per work item
    of one (b, h). The items of a table number sum over buckets of ceil(c / BM)
    <= Nq / BM + (non-empty buckets); blocks past the last item return at once."""
    max_items = math.ceil(nq / sp.BM) + min(1 << bits, nq)
    return (max_items, heads, batch), sp.THREADS, sp.SHARED_BYTES


def lsh_attention(
    q, k, v, key_lengths, *, bits: int, tables: int, seed: int = 0, causal: bool, scale: float,
    shared_qk: bool = False, out=None, lse=None, stream=0, order=None, return_buckets: bool = False,
):
    """Run hashing, sorting and the bucketed kernel on device arrays; returns (O, lse)
    (and the `LshBuckets` with ``return_buckets=True``).

    With ``shared_qk`` `k` must be None: keys are q's rows at unit length. Inputs
    are assumed validated by `nkattn.attention`.
    """
    ref.validate_lsh_params(bits, tables)
    if tables > MAX_TABLES:
        raise ValueError(f"the CUDA LSH kernel supports lsh_tables <= {MAX_TABLES}, got {tables}")
    batch, heads, nq, head_dim = q.shape
    dtype = np.dtype(q.dtype)
    if shared_qk:
        if k is not None:
            raise ValueError("shared_qk=True derives the keys from q: pass k=None")
        k = unit_rows(q, stream)
    planes = cuda.to_device(ref.hyperplanes(head_dim, bits, tables, seed), stream=stream)
    buckets = build_buckets(q, k, planes, bits, shared_qk=shared_qk, stream=stream)
    kernel, sp = lsh_attention_kernel(dtype, head_dim, shared_qk=shared_qk, order=order)
    grid, block, shared = launch_config(sp, batch, heads, nq, bits)
    max_items = grid[0]  # one block per possible work item
    first_item, item_bucket = work_items(buckets, bits, sp.BM, max_items, stream)
    if out is None:
        out = cuda.device_array((batch, heads, nq, head_dim), dtype=dtype, stream=stream)
    if lse is None:
        lse = cuda.device_array((batch, heads, nq), dtype=dtype, stream=stream)
    l_state = cuda.device_array((batch, heads, nq), dtype=dtype, stream=stream) if tables > 1 else lse
    args = (
        q, k, v, key_lengths, buckets.q_perm, buckets.q_start, buckets.q_end, first_item, item_bucket, buckets.q_codes,
        buckets.k_perm, buckets.k_start, buckets.k_end, buckets.k_codes,
        out, lse, l_state, dtype.type(scale), bool(causal), heads // k.shape[1],
    )
    launch_with_shared_memory(kernel, grid, block, shared, stream, *args, 0, tables == 1)
    for t in range(1, tables):
        # the shared-memory opt-in of the first launch holds for the rest
        kernel[grid, block, stream, shared](*args, t, t == tables - 1)
    if return_buckets:
        return out, lse, buckets
    return out, lse
