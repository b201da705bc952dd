"""Matrix-free products with the attention matrix, A·X and Aᵀ·Y, in O(N·l) memory.

A = softmax(scale·QKᵀ + mask) per (batch, query head), with the masks (causal
bottom-right, key_lengths) and grouped-query heads of `nkattn.reference.exact`;
a row that sees no key is a zero row of A and has lse = -inf. These are the two
products a randomized SVD of A needs (issue 11), and neither ever holds A:

* `attention_times(q, k, x, ...) -> (A·X, lse)`: x (B, Hkv, Nk, l) takes the place
  of V, so this *is* the exact kernel, run at value width l (`value_dim`).
* `attention_transpose_times(q, k, y, lse, ...) -> Aᵀ·Y`: y (B, H, Nq, l) and the
  lse of `attention_times`; ``out[b, h, j] = Σ_i exp(scale·q_i·k_j - lse_i)·y[b, h, i]``
  over the rows i that see key j, per query head, (B, H, Nk, l). One block per
  tile of keys walks the query tiles in order and recomputes P from Q, K and the
  stored lse: the structure of FlashAttention's dV = Pᵀ·dO, with no atomics.

Widths: any 1 <= l <= `max_width(dtype, d)`, which is `MAX_WIDTH` except where a
block's shared memory runs out first (float64 at d = 64 on the GPU). The value
columns split over the TX threads of a row (TX = 16 on the GPU, 4 under the
simulator); a width TX divides runs exactly at its size, any other is carried in
shared memory and registers as the next multiple of TX with zero columns (l = 42
runs as 48), which are never read from x or y nor written to the output.

Arithmetic as in the exact kernel (`streaming_primitives`): float64 exactly
rounded, bit-identical to the mirrors in `nkattn.reference.lowrank`; float32
fast (FMA, hardware exp). Both are deterministic: fixed order, no atomics.
"""

from __future__ import annotations

import math
from functools import cache

import numpy as np
from numba import cuda

from nkattn.cuda_kernels.exact import (
    exact_attention,
    exact_attention_kernel,
    tuned_register_cap,
)
from nkattn.cuda_kernels.online_softmax import (
    SIMULATOR,
    launch_with_shared_memory,
    streaming_primitives,
)
from nkattn.reference.exact import KERNEL_HEAD_DIMS

MAX_WIDTH = 256
SHARED_LIMIT = 227 * 1024  # bytes of shared memory a block may use on the H100 / A100


@cache
def attention_transpose_kernel(dtype, head_dim: int, value_dim: int, *, order=None, max_registers: int | None | str = "tuned"):
    """Build the Aᵀ·Y kernel for one dtype, head dim and width.

    Grid ``(ceil(Nk / BM), H, B)``; a block of TY x TX threads owns BM = TY·TM keys
    of one (b, query head) and walks the query tiles of BN = TX·TN rows, in order,
    from the first tile with a row that sees one of its keys::

                   query tile (BN)                    width (l)
                 +---------------+                  +---------------+
        keys     | Sᵀ = K Qᵀ:    |  P = exp(S-lse)  | out += Pᵀ Y:  |
        (BM)     | TM x TN per   |  ------------->  | TM x TD per   |
                 | thread        |   (P shared)     | thread        |
                 +---------------+                  +---------------+

    This is the exact kernel's tile machinery with rows and keys swapped: the
    block's keys sit where the forward keeps Qᵀ (loaded once), each query tile
    where it keeps Kᵀ and V (Qᵀ and Y), and the online softmax becomes a fixed
    one, p = exp(scale·s - lse_i), masked to 0 where row i does not see the key.
    A key's sums run over the rows in increasing order; a tile that none of a
    key's rows sees adds exact zeros, so skipping it leaves the bits unchanged.
    """
    sp = streaming_primitives(np.dtype(dtype), head_dim, order=order, value_dim=value_dim)
    TM, TN, TD, TX, BM, BN, DV = sp.TM, sp.TN, sp.TD, sp.TX, sp.BM, sp.BN, sp.DV
    NB_DTYPE, NEG_INF, ZERO, SHARED_ALIGN = sp.NB_DTYPE, sp.NEG_INF, sp.ZERO, sp.SHARED_ALIGN
    PADDED = sp.LV != DV
    visible_keys, load_q_tile, load_kv_tile = sp.visible_keys, sp.load_q_tile, sp.load_kv_tile
    tile_scores, accumulate_pv, store_p = sp.tile_scores, sp.accumulate_pv, sp.store_p
    mul, add, exp = sp.mul, sp.add, sp.exp
    if max_registers == "tuned":
        max_registers = tuned_register_cap(dtype, max(head_dim, value_dim))
    jit_options = {} if SIMULATOR or max_registers is None else {"max_registers": max_registers}

    @cuda.jit(device=True, inline="always")
    def fixed_softmax(s, lse_j, vis_j, key0, qk_scale, smem, ty, tx):
        # p = exp(scale·s - lse) for the thread's TM keys x TN rows, into P; 0 where the row does not see the key
        for i in range(TM):
            kv_idx = key0 + ty * TM + i
            for j in range(TN):
                x = add(mul(s[i, j], qk_scale), -lse_j[j])
                if kv_idx >= vis_j[j]:
                    x = NEG_INF
                store_p(smem, ty, tx, i, j, exp(x))

    @cuda.jit(**jit_options)
    def attention_transpose_times_kernel(q, k, y, lse, key_lengths, out, qk_scale, causal, group):
        tid = cuda.threadIdx.x
        ty = tid // TX
        tx = tid - ty * TX
        b = cuda.blockIdx.z
        h = cuda.blockIdx.y
        key0 = cuda.blockIdx.x * BM
        nq = q.shape[2]
        nk = k.shape[2]
        kvh = h // group
        nk_b = key_lengths[b]
        smem = cuda.shared.array(0, NB_DTYPE, alignment=SHARED_ALIGN)

        acc = cuda.local.array((TM, TD), NB_DTYPE)
        s = cuda.local.array((TM, TN), NB_DTYPE)
        partial = cuda.local.array((TM, TN), NB_DTYPE)
        k_frag = cuda.local.array(TM, NB_DTYPE)
        q_frag = cuda.local.array(TN, NB_DTYPE)
        y_frag = cuda.local.array(TD, NB_DTYPE)
        lse_j = cuda.local.array(TN, NB_DTYPE)
        vis_j = cuda.local.array(TN, np.int32)
        for i in range(TM):
            for e in range(TD):
                acc[i, e] = ZERO
        # the first row that sees key0 (row i sees key j iff j < visible_keys(i)), on the tile grid
        if key0 >= nk_b:
            first_tile = nq
        elif causal:
            first_tile = max(key0 + nq - nk_b, 0) // BN * BN
        else:
            first_tile = 0

        load_q_tile(k, b, kvh, key0, smem, tid)  # the block's keys, as Kᵀ, where the forward keeps Qᵀ
        for tile_start in range(first_tile, nq, BN):
            for j in range(TN):
                q_idx = tile_start + tx * TN + j
                vis_j[j] = visible_keys(q_idx, nq, nk_b, causal)  # 0 past the last row
                lse_j[j] = lse[b, h, q_idx] if q_idx < nq else ZERO
            cuda.syncthreads()  # Kᵀ is loaded and every read of the previous tile is done
            load_kv_tile(q, y, b, h, tile_start, nq, smem, tid)  # Qᵀ and Y where the forward keeps Kᵀ and V
            cuda.syncthreads()  # the whole Q/Y tile is in shared memory
            tile_scores(smem, ty, tx, s, partial, k_frag, q_frag)
            fixed_softmax(s, lse_j, vis_j, key0, qk_scale, smem, ty, tx)
            cuda.syncthreads()  # every thread's P block is written
            accumulate_pv(smem, ty, tx, acc, k_frag, y_frag)

        for i in range(TM):
            kv_idx = key0 + ty * TM + i
            if kv_idx < nk:
                for e in range(TD):
                    if not PADDED or tx * TD + e < DV:
                        out[b, h, kv_idx, tx * TD + e] = acc[i, e]

    return attention_transpose_times_kernel, sp


def transpose_launch_config(sp, batch: int, heads: int, nk: int):
    """(grid, block, dynamic shared bytes): one block per BM keys of one (b, query head)."""
    return (math.ceil(nk / sp.BM), heads, batch), sp.THREADS, sp.SHARED_BYTES


# --------------------------------------------------------------------------------------
# host side: validation and launch
# --------------------------------------------------------------------------------------


def _on_device(a) -> bool:
    # the simulator's device arrays (FakeCUDAArray) carry no __cuda_array_interface__
    return hasattr(a, "__cuda_array_interface__") or type(a).__name__ == "FakeCUDAArray"


def _device(name, a, stream=0):
    """A device view of `a` (numba device arrays as they are, other __cuda_array_interface__
    objects viewed without a copy, host arrays copied)."""
    if a is None:
        raise TypeError(f"{name} is required")
    if hasattr(a, "copy_to_host"):
        return a
    if _on_device(a):
        return cuda.as_cuda_array(a)
    return cuda.to_device(np.ascontiguousarray(a), stream=stream)


def _check_rank(name, a, rank):
    if len(a.shape) != rank:
        raise ValueError(f"{name} must have {rank} dimensions, got shape {tuple(a.shape)}")


def _validate(q, k, vals, vals_name: str, transpose: bool):
    """Shapes and dtypes of q, k and the operand x (A·X) or y (Aᵀ·Y); returns (B, H, Hkv, Nq, Nk, d, l, dtype)."""
    for name, a in (("q", q), ("k", k), (vals_name, vals)):
        _check_rank(name, a, 4)
    dtype = np.dtype(q.dtype)
    if dtype not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise TypeError(f"q must be float32 or float64, got {dtype}")
    for name, a in (("k", k), (vals_name, vals)):
        if np.dtype(a.dtype) != dtype:
            raise TypeError(f"{name} must have q's dtype {dtype}, got {np.dtype(a.dtype)}")
    batch, heads, nq, head_dim = q.shape
    kb, kv_heads, nk, kd = k.shape
    if kb != batch or kd != head_dim:
        raise ValueError(f"k must be (B={batch}, Hkv, Nk, d={head_dim}) like q {tuple(q.shape)}, got {tuple(k.shape)}")
    if kv_heads < 1 or heads % kv_heads:
        raise ValueError(f"q's heads ({heads}) must be a multiple of k's ({kv_heads})")
    if head_dim not in KERNEL_HEAD_DIMS:
        raise ValueError(f"q's head dim must be one of {KERNEL_HEAD_DIMS}, got {head_dim}")
    width = vals.shape[3]
    expected = (batch, heads, nq) if transpose else (batch, kv_heads, nk)
    if tuple(vals.shape[:3]) != expected:
        layout = "(B, H, Nq, l)" if transpose else "(B, Hkv, Nk, l)"
        raise ValueError(f"{vals_name} must be {layout} = {expected + ('l',)}, got {tuple(vals.shape)}")
    if not 1 <= width <= MAX_WIDTH:
        raise ValueError(f"{vals_name}'s width l must be in [1, {MAX_WIDTH}], got {width}")
    return batch, heads, kv_heads, nq, nk, head_dim, width, dtype


def _key_lengths(key_lengths, batch: int, nk: int, stream):
    """int32 device array of length B: Nk everywhere for None; host values are checked, device ones only by
    shape and dtype (reading them back would synchronize; values past Nk would make the kernels read past k)."""
    if key_lengths is None:
        return cuda.to_device(np.full(batch, nk, dtype=np.int32), stream=stream)
    if _on_device(key_lengths):
        key_lengths = _device("key_lengths", key_lengths)
        if key_lengths.shape != (batch,) or np.dtype(key_lengths.dtype) != np.int32:
            raise ValueError(f"key_lengths on the device must be int32 of shape ({batch},), got {key_lengths.dtype} {key_lengths.shape}")
        return key_lengths
    host = np.asarray(key_lengths)
    if host.shape != (batch,) or not np.issubdtype(host.dtype, np.integer):
        raise ValueError(f"key_lengths must be {batch} integers, got {host.dtype} of shape {host.shape}")
    if (host < 0).any() or (host > nk).any():
        raise ValueError(f"key_lengths must lie in [0, Nk={nk}], got {host.tolist()}")
    return cuda.to_device(host.astype(np.int32), stream=stream)


def _check_scale(scale):
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")


def _output(name, arr, shape, dtype, stream, reads):
    """`arr` as the device array a kernel writes (a new one for None), checked against the
    arrays the kernel reads meanwhile (``reads``: {name: device array})."""
    if arr is None:
        return cuda.device_array(shape, dtype=dtype, stream=stream)
    if not _on_device(arr):
        raise TypeError(f"{name} must be a device array (it is written in place), got {type(arr).__name__}")
    arr = _device(name, arr)
    if tuple(arr.shape) != shape or np.dtype(arr.dtype) != dtype:
        raise ValueError(f"{name} must be {dtype} of shape {shape}, got {np.dtype(arr.dtype)} {tuple(arr.shape)}")
    for other, a in reads.items():
        if _may_overlap(arr, a):
            raise ValueError(f"{name} must not overlap {other}: blocks read {other} while others write {name}")
    return arr


def _byte_span(a) -> tuple[int, int]:
    """[first, last) device addresses an array view can touch."""
    cai = a.__cuda_array_interface__
    itemsize = np.dtype(cai["typestr"]).itemsize
    strides = cai["strides"] or tuple(int(np.prod(cai["shape"][i + 1:], dtype=np.int64)) * itemsize
                                      for i in range(len(cai["shape"])))
    start = cai["data"][0]
    low = start + sum(min(0, (n - 1) * s) for n, s in zip(cai["shape"], strides))
    high = start + sum(max(0, (n - 1) * s) for n, s in zip(cai["shape"], strides)) + itemsize
    return low, high


def _may_overlap(a, b) -> bool:
    """Whether two device arrays may share memory (conservative, like np.may_share_memory: by extent)."""
    if a.size == 0 or b.size == 0:
        return False
    if hasattr(a, "_ary") and hasattr(b, "_ary"):  # the simulator's device arrays wrap NumPy ones
        return bool(np.may_share_memory(a._ary, b._ary))
    (a_low, a_high), (b_low, b_high) = _byte_span(a), _byte_span(b)
    return a_low < b_high and b_low < a_high


@cache
def max_width(dtype, head_dim: int) -> int:
    """The widest l both operators take at this dtype and head dim: `MAX_WIDTH`, or the widest
    whose block fits in `SHARED_LIMIT` bytes of shared memory (on the GPU, float64 at d = 64
    falls short). `nkattn.lowrank` runs wider products in chunks of columns."""
    dtype = np.dtype(dtype)

    def fits(width):
        # the kernels attention_times and attention_transpose_times launch for this width (cached)
        _, times_sp = exact_attention_kernel(dtype, head_dim, **({} if width == head_dim else {"value_dim": width}))
        _, transpose_sp = attention_transpose_kernel(dtype, head_dim, width)
        return max(times_sp.SHARED_BYTES, transpose_sp.SHARED_BYTES) <= SHARED_LIMIT

    if fits(MAX_WIDTH):
        return MAX_WIDTH
    fitting, too_wide = 1, MAX_WIDTH  # shared memory grows with l
    while too_wide - fitting > 1:
        mid = (fitting + too_wide) // 2
        fitting, too_wide = (mid, too_wide) if fits(mid) else (fitting, mid)
    return fitting


def _check_shared(sp, dtype, head_dim, width, arg):
    if sp.SHARED_BYTES > SHARED_LIMIT:
        raise ValueError(
            f"{arg}'s width l = {width} needs {sp.SHARED_BYTES} bytes of shared memory per block at "
            f"{dtype}, d = {head_dim} (at most {SHARED_LIMIT})"
        )


def attention_times(q, k, x, key_lengths=None, *, causal: bool, scale: float, out=None, lse=None, stream=0):
    """(A·X, lse): attention of q over k with x (B, Hkv, Nk, l) as the values.

    Returns device arrays out (B, H, Nq, l) and lse (B, H, Nq) (-inf for a row
    with no visible key, whose output row is zero). `key_lengths`: None (every
    key visible), B integers in [0, Nk], or an int32 device array of length B
    (its values are trusted to lie in [0, Nk]). Host inputs
    are copied to the device; `out` and `lse`, when given, are device arrays
    written in place (reused buffers: neither may overlap q, k, x or the other).
    """
    q, k, x = _device("q", q, stream), _device("k", k, stream), _device("x", x, stream)
    batch, heads, _, nq, nk, head_dim, width, dtype = _validate(q, k, x, "x", transpose=False)
    _check_scale(scale)
    lengths = _key_lengths(key_lengths, batch, nk, stream)
    reads = {"q": q, "k": k, "x": x}
    out = _output("out", out, (batch, heads, nq, width), dtype, stream, reads)
    lse = _output("lse", lse, (batch, heads, nq), dtype, stream, reads | {"out": out})
    # the kernel exact_attention launches for this width (cached)
    _, sp = exact_attention_kernel(dtype, head_dim, **({} if width == head_dim else {"value_dim": width}))
    _check_shared(sp, dtype, head_dim, width, "x")
    if out.size == 0:
        return out, lse
    return exact_attention(q, k, x, lengths, causal=causal, scale=scale, out=out, lse=lse, stream=stream)


def attention_transpose_times(q, k, y, lse, key_lengths=None, *, causal: bool, scale: float, out=None, stream=0):
    """Aᵀ·Y per query head: out (B, H, Nk, l) with ``out[b, h, j] = Σ_i A[b, h, i, j]·y[b, h, i]``.

    y is (B, H, Nq, l); lse (B, H, Nq) is the one `attention_times` returns for
    the same q, k, masks and scale (P is recomputed as exp(scale·q_i·k_j - lse_i)).
    Keys no row sees get zero rows. Returns a device array; `out`, when given, is
    a device array written in place, overlapping none of q, k, y and lse. Host
    inputs are copied to the device.
    """
    q, k, y = _device("q", q, stream), _device("k", k, stream), _device("y", y, stream)
    batch, heads, _, nq, nk, head_dim, width, dtype = _validate(q, k, y, "y", transpose=True)
    lse = _device("lse", lse, stream)
    if tuple(lse.shape) != (batch, heads, nq) or np.dtype(lse.dtype) != dtype:
        raise ValueError(f"lse must be {dtype} of shape (B, H, Nq) = {(batch, heads, nq)}, got {np.dtype(lse.dtype)} {tuple(lse.shape)}")
    _check_scale(scale)
    lengths = _key_lengths(key_lengths, batch, nk, stream)
    out = _output("out", out, (batch, heads, nk, width), dtype, stream, {"q": q, "k": k, "y": y, "lse": lse})
    kernel, sp = attention_transpose_kernel(dtype, head_dim, width)
    _check_shared(sp, dtype, head_dim, width, "y")
    if out.size == 0:
        return out
    grid, block, shared = transpose_launch_config(sp, batch, heads, nk)
    launch_with_shared_memory(
        kernel, grid, block, shared, stream,
        q, k, y, lse, lengths, out, dtype.type(scale), bool(causal), heads // k.shape[1],
    )
    return out
