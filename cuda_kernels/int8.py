"""INT8 attention on Hopper tensor cores: the ``int8-fp16`` format of `nkattn.reference.precision`
(SageAttention v1: int8 Q·Kᵀ with K smoothing, fp16 P·V), whose float64 mirror is
``emulate(q, k, v, "int8-fp16")``. Not run on a GPU yet: tested in the simulator, compiled by ptxas.

Three steps, all on the GPU:

1. `quantize`: f16 q and k become int8, as `nkattn.reference.precision.operands` makes them:
   the mean of K over the valid keys (`key_mean_kernel`: an exact fixed-point sum, one float64
   division and one rounding to f16, the mirror's float64 sum and ``round_input``), K minus it
   rounded once to f16, then ``trunc(fl32(fl32(x / s) ± 0.5))`` with ``s = fl32(absmax / 127)``
   per 64 keys of K and per 128 rows of Q, Q first multiplied by ``fl32(scale · log2 e)``
   (`quantize_kernel`). Row-major, head dim padded with zeros to 32. V stays f16.
2. `int8_attention_kernel`: the FP8 kernel's structure (`nkattn.cuda_kernels.fp8`, plain
   two-warpgroup schedule, a ring of three K/V slots by cp.async) with s8 wgmma (k32, int32
   accumulators) for S and the half kernel's f16 P·V from registers::

        Q8 (BM x d) --wgmma s8 SS--> S_{j+1} = Q8 K8_{j+1}ᵀ (int32, exact)
                                    | t = fl32(fl32(S) · c), c = fl32(s_q · s_k) per 64 keys
                                    | mask, running max m, p = 2^(t - m), l += Σ p
                                    v
        P_j = f16(p) (registers) --wgmma f16 RS--> O = O · alpha + P_j V_j (float32)

   t is rounded on its own (`ptx.mul_rn`) because a 128-key tile holds two K scales: the
   softmax then runs with a scale of 1, so ``t - m`` is the mirror's subtraction, not an FMA.
   Kernel and mirror differ by ex2.approx and the order of the row sum (within `error_bound`).
3. `add_shift_kernel`: lse gets smoothing's shift back, ``fl32(lse + scale · q · mean(k))``
   with the shift in float64 (the mirror adds it in float64 to its float32 lse).

O comes back in f16 (SageAttention's inputs and outputs are f16), lse in float32. Head dims
are multiples of 16 up to `MAX_HEAD_DIM` (128), as for the FP8 kernel.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import numpy as np
from numba import cuda, float32, float64, from_dtype, int32, int64, uint8, uint64

from nkattn.cuda_kernels import ptx
from nkattn.cuda_kernels.exact_tc import (
    F32_ONE,
    F32_ZERO,
    LOG2E,
    NEG_INF,
    STAGES,
    TileConfig,
    _half_fragments,
    _ring_functions,
    _row_functions,
    block_functions,
    launch_config,
    padded,
    ring_slot,
)
from nkattn.cuda_kernels.fp8 import MAX_HEAD_DIM, QUANTIZE_THREADS
from nkattn.cuda_kernels.online_softmax import SIMULATOR, launch_with_shared_memory
from nkattn.cuda_kernels.tensor_core import TILE_ALIGN, TileLayout, tile_functions

Q_BLOCK = 128  # rows of Q per scale (the int8-fp16 Format's q_block)
K_BLOCK = 64  # keys of K per scale (k_block): two per key tile
TILE_N = 128  # keys per tile (the mirror's BLOCK_N)
K_STEP = ptx.K_STEP["s8"]  # 32
INT8_MAX = np.float32(127.0)
F32_HALF = np.float32(0.5)
TWO_24 = 2.0**24  # f16 values are multiples of 2^-24: times this, integers below 2^40
TWO_M24 = 2.0**-24


def check_head_dims(head_dim: int, value_dim: int) -> None:
    for name, dim in (("d", head_dim), ("dv", value_dim)):
        if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim % 16 or not 16 <= dim <= MAX_HEAD_DIM:
            raise ValueError(f"the int8 kernel takes {name} a multiple of 16 from 16 to {MAX_HEAD_DIM}, got {name}={dim}")


def default_config() -> TileConfig:
    """Two warpgroups of 64 rows on the GPU (one Q scale block), one in the simulator; 128-key tiles."""
    return TileConfig(64 if SIMULATOR else 128, TILE_N)


# --------------------------------------------------------------------------------------
# quantization
# --------------------------------------------------------------------------------------


@cuda.jit
def key_mean_kernel(k, lengths, center):
    """``center[b, h, c]``: f16 bits of the mean of ``k[b, h, :lengths[b], c]`` (0 with no key).

    Grid ``(Hkv, B)``, a thread per column. The sum is exact (int64 of the values times 2^24), as
    the mirror's float64 sum is below 2^13 keys; past that the mirror's sum may round where this
    one does not."""
    h = cuda.blockIdx.x
    b = cuda.blockIdx.y
    n_valid = min(lengths[b], k.shape[2])
    for col in range(cuda.threadIdx.x, k.shape[3], cuda.blockDim.x):
        total = int64(0)
        for key in range(n_valid):
            total += int64(float64(ptx.f16_value(k[b, h, key, col])) * TWO_24)
        center[b, h, col] = ptx.f16_bits_f64(float64(total) * TWO_M24 / float64(max(n_valid, 1)))


@cache
def quantize_kernel(cols: int, padded_cols: int, block: int, smooth: bool):
    """int8 of one (B, H, N, cols) f16 tensor, scaled per ``block`` rows.

    Grid ``(blocks, H, B)``: block x reads rows [block·x, block·x + block) of ``x[b, h]`` as
    ``f16(x - center[b, h])`` (``smooth``, rows at or past ``lengths[b]`` as zeros) or
    ``fl32(x · pre_scale)``, reduces max |x| in shared memory (exact in any order), writes
    ``scales[b, h, x] = fl32(absmax / 127)`` (1 for a zero block) and the values
    ``trunc(fl32(fl32(x / s) ± 0.5))`` row-major with ``padded_cols`` columns (zero past ``cols``).
    Every operation is rounded to float32 explicitly: on the GPU the casts cost nothing, in the
    simulator (float64 scalars) they give the mirror's bits.
    """
    THREADS = QUANTIZE_THREADS

    @cuda.jit(device=True, inline="always")
    def value(x, center, pre_scale, b, h, row, col, n_valid):
        if row < n_valid and col < cols:
            if smooth:
                # the difference of two f16 is exact in float64: one rounding, the mirror's
                moved = float64(ptx.f16_value(x[b, h, row, col])) - float64(ptx.f16_value(center[b, h, col]))
                return ptx.f16_value(ptx.f16_bits_f64(moved))
            return ptx.mul_rn(ptx.f16_value(x[b, h, row, col]), pre_scale)
        return F32_ZERO

    @cuda.jit
    def quantize(x, center, pre_scale, lengths, out, scales):
        tid = cuda.threadIdx.x
        blk = cuda.blockIdx.x
        h = cuda.blockIdx.y
        b = cuda.blockIdx.z
        row0 = blk * block
        n_valid = min(lengths[b], x.shape[2]) if smooth else x.shape[2]
        partial = cuda.shared.array(THREADS, np.float32)
        amax = F32_ZERO
        for idx in range(tid, block * cols, THREADS):
            r = idx // cols
            amax = max(amax, abs(value(x, center, pre_scale, b, h, row0 + r, idx - r * cols, n_valid)))
        partial[tid] = amax
        cuda.syncthreads()  # every thread's share of the block's max is in shared memory
        for i in range(THREADS):
            amax = max(amax, partial[i])
        descale = float32(amax / INT8_MAX) if amax > F32_ZERO else F32_ONE
        if tid == 0:
            scales[b, h, blk] = descale
        for idx in range(tid, block * padded_cols, THREADS):
            r = idx // padded_cols
            c = idx - r * padded_cols
            row = row0 + r
            if row < x.shape[2]:
                ratio = float32(value(x, center, pre_scale, b, h, row, c, n_valid) / descale)
                half = F32_HALF if ratio > F32_ZERO else (-F32_HALF if ratio < F32_ZERO else F32_ZERO)
                out[b, h, row, c] = uint8(int32(float32(ratio + half)) & 0xFF)

    return quantize


@dataclass(frozen=True)
class Int8Operands:
    """What `quantize` gives the attention kernel: int8 Q and K (as uint8), float32 scales, K's mean."""

    q: object  # (B, H, Nq, DP), DP = d padded to 32
    k: object  # (B, Hkv, Nk, DP)
    q_scale: object  # (B, H, ceil(Nq / 128))
    k_scale: object  # (B, Hkv, 2 · tiles): two 64-key scales per 128-key tile (1 past Nk)
    center: object  # (B, Hkv, d) f16 bits: the mean smoothing subtracted from K


def quantize(q, k, key_lengths, *, scale: float, stream=0) -> Int8Operands:
    """int8 Q and smoothed K with their block scales from f16 device arrays (uint16 bit patterns,
    (B, H, N, d)); `key_lengths` an int32 device array of B lengths."""
    batch, heads, nq, head_dim = q.shape
    kv_heads, nk = k.shape[1], k.shape[2]
    dp = padded(head_dim, K_STEP)
    q_blocks, k_blocks = -(-nq // Q_BLOCK), 2 * -(-nk // TILE_N)
    ops = Int8Operands(
        q=cuda.device_array((batch, heads, nq, dp), dtype=np.uint8, stream=stream),
        k=cuda.device_array((batch, kv_heads, nk, dp), dtype=np.uint8, stream=stream),
        q_scale=cuda.device_array((batch, heads, q_blocks), dtype=np.float32, stream=stream),
        k_scale=cuda.device_array((batch, kv_heads, k_blocks), dtype=np.float32, stream=stream),
        center=cuda.device_array((batch, kv_heads, head_dim), dtype=np.uint16, stream=stream),
    )
    threads = QUANTIZE_THREADS
    key_mean_kernel[(kv_heads, batch), min(threads, padded(head_dim, 32)), stream](k, key_lengths, ops.center)
    quantize_kernel(head_dim, dp, K_BLOCK, True)[(k_blocks, kv_heads, batch), threads, stream](
        k, ops.center, F32_ONE, key_lengths, ops.k, ops.k_scale)
    quantize_kernel(head_dim, dp, Q_BLOCK, False)[(q_blocks, heads, batch), threads, stream](
        q, ops.center, np.float32(scale * LOG2E), key_lengths, ops.q, ops.q_scale)
    return ops


@cuda.jit
def add_shift_kernel(q, center, lse, scale, group):
    """lse += scale · q · center for rows that saw a key: grid ``(ceil(Nq / threads), H, B)``."""
    row = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    h = cuda.blockIdx.y
    b = cuda.blockIdx.z
    if row < q.shape[2]:
        value = lse[b, h, row]
        if value != NEG_INF:
            shift = float64(0.0)
            for c in range(q.shape[3]):
                shift += float64(ptx.f16_value(q[b, h, row, c])) * float64(ptx.f16_value(center[b, h // group, c]))
            lse[b, h, row] = float32(float64(value) + scale * shift)


# --------------------------------------------------------------------------------------
# attention
# --------------------------------------------------------------------------------------


@cache
def int8_attention_kernel(head_dim: int, value_dim: int, config: TileConfig):
    """Build the fused forward kernel for one (d, dv, tile shape): (kernel, shared bytes).

    Grid ``(ceil(Nq / BM), H, B)``, BM / 64 warpgroups a block, as the FP8 kernel (the half
    kernel's `block_start`, softmax and epilogue); per tile j it issues S_{j+1} (s8) and
    P_j·V_j (f16, into O) back to back, waits for both, converts and scales S_{j+1}, computes
    its softmax and rescales O: `emulate`'s order (O · alpha, then the next tile's P·V).
    """
    check_head_dims(head_dim, value_dim)
    if config.block_n != TILE_N or config.block_m not in (64, 128):
        raise ValueError(f"the int8 kernel takes tiles of {TILE_N} keys (two K scales each) and 64 or 128 rows "
                         f"(a warpgroup's rows in one Q scale block), got {config}")
    if config.overlap or config.pingpong or config.mma_sync or config.blocks_per_sm != 1 or config.tma:
        raise ValueError(f"the int8 kernel has the plain wgmma schedule only, uncapped, its ring filled by cp.async, "
                         f"got {config}")
    BM, BN = config.block_m, config.block_n
    NWG = BM // 64
    THREADS = 128 * NWG
    DP, DVP = padded(head_dim, K_STEP), value_dim
    q_tile = TileLayout(BM, DP, 1, 0)
    k_tile = TileLayout(BN, DP, 1, q_tile.end)
    v_tile = TileLayout(BN, DVP, 2, k_tile.end)  # f16 V as the half kernel reads it (MN-major)
    SLOT = v_tile.end - k_tile.offset  # one ring slot: a K and a V tile, in bytes
    SHARED_BYTES = k_tile.offset + STAGES * SLOT + TILE_ALIGN  # + slack to align the buffer at run time
    SLOT_UNITS = SLOT >> 4

    _, load_q = tile_functions(q_tile, 1, THREADS)
    _, load_k = tile_functions(k_tile, 1, THREADS)
    _, load_v = tile_functions(v_tile, 1, THREADS)
    mma_s = ptx.wgmma("s8", BN, "desc")
    mma_o = ptx.wgmma("f16", DVP, "regs", transpose_b=True)
    wait_mma_all = ptx.wgmma_wait(0)
    QK_STEPS, PV_STEPS = DP // K_STEP, BN // 16
    Q_DELTAS = tuple(np.uint64((q_tile.k_major_start(0, s * K_STEP) - q_tile.offset) >> 4) for s in range(QK_STEPS))
    K_DELTAS = tuple(np.uint64((k_tile.k_major_start(0, s * K_STEP) - k_tile.offset) >> 4) for s in range(QK_STEPS))
    V_DELTAS = tuple(np.uint64((v_tile.mn_major_start(s * 16) - v_tile.offset) >> 4) for s in range(PV_STEPS))
    NS, NO, NP = BN // 2, DVP // 2, BN // 4
    FIRST_HALF = NS // 2  # accumulator registers of keys 0-63 of the tile: chunks 0-7
    MAX_REGISTERS = min(255, 65536 // THREADS // 8 * 8)
    softmax, online_update, rescale, empty_rows = _row_functions(BN, DVP)
    pack_p, store_rows = _half_fragments("f16", BN, DVP)
    block_start = block_functions(BM, BN, 1, from_dtype(np.dtype(np.uint8)), q_tile.offset, k_tile.offset,
                                  v_tile.offset, q_tile.k_major_bits(), k_tile.k_major_bits(), v_tile.mn_major_bits(),
                                  64 * q_tile.width)

    @cuda.jit(device=True, inline="always")
    def load_tile(smem, base, k8, v, b, kvh, j, nk_b, tid):
        slot = base + ring_slot(j) * SLOT
        load_k(smem, slot, k8, b, kvh, j * BN, nk_b, DP, tid)
        load_v(smem, slot, v, b, kvh, j * BN, nk_b, v.shape[3], tid)

    @cuda.jit(device=True, inline="always")
    def issue_pv(smem, acc_o, p_regs, v_desc, j):
        slot = uint64(ring_slot(j) * SLOT_UNITS)
        for s in range(PV_STEPS):
            mma_o(acc_o, p_regs, 4 * s, v_desc + slot + V_DELTAS[s], 1, smem)

    _, _, ring_start, ring_step = _ring_functions(SLOT_UNITS, mma_s, Q_DELTAS, K_DELTAS, load_q, load_tile, issue_pv)

    @cuda.jit(device=True, inline="always")
    def scaled_scores(acc_s, acc_t, s_q, k_scale, b, kvh, j):
        # emulate's t = fl32(S · c), c = fl32(s_q · s_k) of each key's 64-key block (S < 2^24: exact in float32)
        c0 = ptx.mul_rn(s_q, k_scale[b, kvh, 2 * j])
        c1 = ptx.mul_rn(s_q, k_scale[b, kvh, 2 * j + 1])
        for i in range(NS):
            acc_t[i] = ptx.mul_rn(float32(acc_s[i]), c0 if i < FIRST_HALF else c1)

    @cuda.jit(**({} if SIMULATOR else {"max_registers": MAX_REGISTERS}))
    def int8_attention_fwd(q8, k8, v, q_scale, k_scale, key_lengths, o, lse, causal, group):
        (tid, wg, tq, b, h, kvh, nq, row0, nk_b, smem, base, q_desc, k_desc, v_desc, r0, kv_end0, kv_end1,
         block_kv_min, n_tiles) = block_start(q8, key_lengths, causal, group)
        s_q = q_scale[b, h, (row0 + 64 * wg) // Q_BLOCK]  # a warpgroup's 64 rows lie in one Q block

        acc_s = cuda.local.array(NS, np.int32)
        acc_t = cuda.local.array(NS, np.float32)
        acc_o = cuda.local.array(NO, np.float32)
        p_regs = cuda.local.array(NP, np.uint32)
        m0, m1, l0, l1 = empty_rows(acc_o)

        # prologue: S_0 and its softmax (k8 twice in place of TMA maps: this ring fills by cp.async)
        ring_start(smem, base, q8, k8, v, b, h, kvh, row0, nq, DP, nk_b, tid, acc_s, q_desc, k_desc, n_tiles, k8, k8)
        if n_tiles > 0:
            scaled_scores(acc_s, acc_t, s_q, k_scale, b, kvh, 0)
            m0, m1, alpha0, alpha1, ps0, ps1 = softmax(acc_t, 0, BN > block_kv_min, kv_end0, kv_end1, m0, m1, tq, tid,
                                                       F32_ONE)
            l0 = ps0
            l1 = ps1
            pack_p(acc_t, p_regs)

        for j in range(n_tiles):
            # acc_o was rescaled and p_regs packed by ordinary instructions: ring_step fences first
            more = ring_step(smem, base, k8, v, b, kvh, nk_b, tid, acc_s, acc_o, p_regs, q_desc, k_desc, v_desc, j,
                             n_tiles, k8, k8)
            wait_mma_all()
            if more:
                tile_start = (j + 1) * BN
                scaled_scores(acc_s, acc_t, s_q, k_scale, b, kvh, j + 1)
                m0, m1, l0, l1, alpha0, alpha1 = online_update(acc_t, tile_start, tile_start + BN > block_kv_min,
                                                               kv_end0, kv_end1, m0, m1, l0, l1, tq, tid, F32_ONE)
                rescale(acc_o, alpha0, alpha1)
                pack_p(acc_t, p_regs)

        store_rows(o, lse, b, h, r0, nq, tq, tid, acc_o, l0, l1, m0, m1)

    return int8_attention_fwd, SHARED_BYTES


def int8_attention_quantized(ops: Int8Operands, v, q, key_lengths, *, causal: bool, scale: float, out=None, lse=None,
                             stream=0, config: TileConfig | None = None):
    """The INT8 kernel and the lse shift on operands `quantize` made (the attention alone, as a
    benchmark times it; ``q`` is the f16 input the shift reads); returns (O, lse)."""
    batch, heads, nq, dp = ops.q.shape
    value_dim = v.shape[3]
    config = default_config() if config is None else config
    kernel, shared_bytes = int8_attention_kernel(dp, value_dim, config)  # zero columns: one kernel per padded d
    if out is None:
        out = cuda.device_array((batch, heads, nq, value_dim), dtype=np.uint16, stream=stream)
    if lse is None:
        lse = cuda.device_array((batch, heads, nq), dtype=np.float32, stream=stream)
    group = heads // ops.k.shape[1]
    grid, block = launch_config(config, batch, heads, nq)
    launch_with_shared_memory(kernel, grid, block, shared_bytes, stream, ops.q, ops.k, v, ops.q_scale, ops.k_scale,
                              key_lengths, out, lse, bool(causal), group)
    threads = QUANTIZE_THREADS
    add_shift_kernel[(-(-nq // threads), heads, batch), threads, stream](q, ops.center, lse, float(scale), group)
    return out, lse


def int8_attention(q, k, v, key_lengths, *, causal: bool, scale: float, out=None, lse=None, stream=0,
                   config: TileConfig | None = None):
    """`quantize`, then the INT8 kernel on device arrays; returns (O, lse).

    q (B, H, Nq, d), k (B, Hkv, Nk, d), v (B, Hkv, Nk, dv): uint16 arrays of f16 patterns; d and dv
    multiples of 16 up to `MAX_HEAD_DIM`. O (B, H, Nq, dv) as uint16 patterns of f16, lse (B, H, Nq)
    float32. `key_lengths` is an int32 device array of B lengths. Inputs are assumed finite.
    """
    check_head_dims(q.shape[3], v.shape[3])
    ops = quantize(q, k, key_lengths, scale=scale, stream=stream)
    return int8_attention_quantized(ops, v, q, key_lengths, causal=causal, scale=scale, out=out, lse=lse,
                                    stream=stream, config=config)
