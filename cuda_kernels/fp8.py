"""FP8 attention on Hopper tensor cores: the ``fp8`` format of `nkattn.reference.precision`
(FlashAttention-3's FP8), whose float64 mirror is ``emulate(q, k, v, "fp8")``.

Two steps, both on the GPU:

1. `quantize`: bf16 q, k, v become e4m3 with one float32 scale ``s = fl32(absmax / 448)`` per
   128 rows of Q, per 128 keys of K and of V (keys past ``key_lengths`` count as zeros), the
   values ``e4m3(fl32(x / s))``: the bits of `nkattn.reference.precision.quantize_e4m3`. Q and K
   stay row-major (K-major for wgmma, head dim padded to 32); V is stored transposed, one
   (dv x 128) block per key tile, with the keys of every 16 permuted (below).
2. `fp8_attention_kernel`: the half kernel's structure (`nkattn.cuda_kernels.exact_tc`, plain
   two-warpgroup schedule, a ring of three K/Vᵀ slots by cp.async) on e4m3 wgmma (k32)::

        Q8 (BM x d)  --wgmma SS-->  S_{j+1} = Q8 K8_{j+1}ᵀ (float32)
                                    | t = S · c_{j+1},  c = fl32(scale·log2 e) · fl32(s_q · s_k)
                                    | mask, running max m, p = 2^(t - m), l += Σ p
                                    v
        P_j = e4m3(p · 2^8) (registers) --wgmma RS--> part = P_j Vᵀ8_jᵀ (from zero)
                                    O = (O + part · s_v,j) · alpha_{j+1}

   and at the end ``O · (1 / (l · 2^8))`` in bf16 (or f16), lse in float32: `emulate`'s steps in
   its order, so kernel and mirror differ only by the GPU's fused multiply-adds, ex2.approx and
   the order of the row sum (both within `error_bound`).

Tiles are 128 keys (the K and V scale blocks: a tile's scale is one number). P goes from the
accumulator to the A operand of P·V without leaving registers: e4m3's A fragment holds
columns ``4tq + {0..3}`` (and ``+16``) where the accumulator holds ``2tq + {0, 1}`` of every
8 (`nkattn.cuda_kernels.ptx`), so the A operand's column ``p`` of every 16 is key ``kappa(p)``
(`permuted_key`) and Vᵀ stores its keys in that order, as the float32 kernel does for tf32.

The accumulator of a tile's P·V is separate from O (d/2 more registers) because the V scale
changes per tile: O cannot be accumulated in place by the tensor cores. Head dims are
multiples of 16 up to `MAX_HEAD_DIM`; beyond 128, O, the tile product and S no longer fit
in registers beside each other (that needs the product split along dv, not built yet).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import numpy as np
from numba import cuda, from_dtype, uint8, uint64

from nkattn.cuda_kernels import ptx
from nkattn.cuda_kernels.exact_tc import (
    F32_ONE,
    F32_ZERO,
    LOG2E,
    STAGES,
    TileConfig,
    _ring_functions,
    _row_functions,
    _row_store,
    block_functions,
    launch_config,
    padded,
    ring_slot,
)
from nkattn.cuda_kernels.online_softmax import SIMULATOR, launch_with_shared_memory
from nkattn.cuda_kernels.tensor_core import TILE_ALIGN, TileLayout, tile_functions

SCALE_BLOCK = 128  # rows of Q, keys of K and V per scale (the fp8 Format's q_block, k_block, BLOCK_N)
K_STEP = ptx.K_STEP["e4m3"]  # 32
MAX_HEAD_DIM = 128
OUT_KINDS = ("bf16", "f16")
P_SCALE = np.float32(2.0**8)  # FlashAttention-3's max offset of 8 in P's exponent
P_DESCALE = np.float32(2.0**-8)
E4M3_MAX = np.float32(ptx.E4M3_MAX)
# the simulator runs every thread as a Python thread: fewer of them there
QUANTIZE_THREADS = 32 if SIMULATOR else 256


def permuted_key(p: int) -> int:
    """The key stored at position p of a Vᵀ tile row: within every 16, position ``4tq + e`` (the
    A fragment's byte e of thread tq) holds key ``8(e >> 1) + 2tq + (e & 1)`` (its accumulator column)."""
    return (p & ~15) | (((p & 3) >> 1) << 3) | (((p >> 2) & 3) << 1) | (p & 1)


permuted_key_device = cuda.jit(device=True, inline="always")(permuted_key)


def check_head_dims(head_dim: int, value_dim: int) -> None:
    for name, dim in (("d", head_dim), ("dv", value_dim)):
        if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim % 16 or not 16 <= dim <= MAX_HEAD_DIM:
            raise ValueError(f"the fp8 kernel takes {name} a multiple of 16 from 16 to {MAX_HEAD_DIM}, got {name}={dim}")


def default_config() -> TileConfig:
    """Two warpgroups of 64 rows on the GPU, one in the simulator; always 128-key tiles (one K and V scale each)."""
    return TileConfig(64 if SIMULATOR else 128, SCALE_BLOCK)


# --------------------------------------------------------------------------------------
# quantization
# --------------------------------------------------------------------------------------


@cache
def quantize_kernel(cols: int, padded_cols: int, transpose: bool):
    """e4m3 of one (B, H, N, cols) bf16 tensor, scaled per 128 rows.

    Grid ``(ceil(N / 128), H, B)``: block x reads rows [128x, 128x + 128) of ``x[b, h]`` (rows at or
    past ``lengths[b]`` as zeros when ``masked``), reduces max |x| in shared memory (max is exact
    in any order), writes ``scales[b, h, x] = fl32(absmax / 448)`` (1 for a zero block) and the
    values ``e4m3(fl32(x / s))``, two a thread at a time: row-major with ``padded_cols`` columns
    (zero past ``cols``), or with ``transpose`` as rows ``x · padded_cols + c`` of a
    (B, H, tiles · padded_cols, 128) array, position p of row c holding key ``permuted_key(p)``'s
    column c.
    """
    THREADS = QUANTIZE_THREADS
    BLOCK = SCALE_BLOCK
    HALF_ROW = padded_cols // 2
    HALF_TILE = BLOCK // 2

    @cuda.jit(device=True, inline="always")
    def value(x, b, h, row, col, n_valid):
        if row < n_valid and col < cols:
            return ptx.bf16_value(x[b, h, row, col])
        return F32_ZERO

    @cuda.jit
    def quantize(x, lengths, masked, out, scales):
        tid = cuda.threadIdx.x
        blk = cuda.blockIdx.x
        h = cuda.blockIdx.y
        b = cuda.blockIdx.z
        row0 = blk * BLOCK
        n_valid = min(lengths[b], x.shape[2]) if masked else x.shape[2]
        partial = cuda.shared.array(THREADS, np.float32)
        amax = F32_ZERO
        for idx in range(tid, BLOCK * cols, THREADS):
            r = idx // cols
            amax = max(amax, abs(value(x, b, h, row0 + r, idx - r * cols, n_valid)))
        partial[tid] = amax
        cuda.syncthreads()  # every thread's share of the block's max is in shared memory
        for i in range(THREADS):
            amax = max(amax, partial[i])
        descale = amax / E4M3_MAX if amax > F32_ZERO else F32_ONE
        if tid == 0:
            scales[b, h, blk] = descale

        if transpose:
            for idx in range(tid, padded_cols * HALF_TILE, THREADS):
                c = idx // HALF_TILE
                p = 2 * (idx - c * HALF_TILE)
                key = row0 + permuted_key_device(p)  # permuted_key(p + 1) = permuted_key(p) + 1 for even p
                bits = ptx.pack_e4m3x2(value(x, b, h, key, c, n_valid) / descale,
                                       value(x, b, h, key + 1, c, n_valid) / descale)
                out[b, h, blk * padded_cols + c, p] = uint8(bits & 0xFF)
                out[b, h, blk * padded_cols + c, p + 1] = uint8(bits >> 8)
        else:
            for idx in range(tid, BLOCK * HALF_ROW, THREADS):
                r = idx // HALF_ROW
                c = 2 * (idx - r * HALF_ROW)
                row = row0 + r
                if row < x.shape[2]:
                    bits = ptx.pack_e4m3x2(value(x, b, h, row, c, n_valid) / descale,
                                           value(x, b, h, row, c + 1, n_valid) / descale)
                    out[b, h, row, c] = uint8(bits & 0xFF)
                    out[b, h, row, c + 1] = uint8(bits >> 8)

    return quantize


@dataclass(frozen=True)
class Fp8Operands:
    """What `quantize` gives the attention kernel: e4m3 bit patterns (uint8) and float32 scales."""

    q: object  # (B, H, Nq, DP), DP = d padded to 32
    k: object  # (B, Hkv, Nk, DP)
    vt: object  # (B, Hkv, tiles · dv, 128): Vᵀ per key tile, keys permuted (`permuted_key`)
    q_scale: object  # (B, H, ceil(Nq / 128))
    k_scale: object  # (B, Hkv, tiles)
    v_scale: object  # (B, Hkv, tiles)


def quantize(q, k, v, key_lengths, *, stream=0) -> Fp8Operands:
    """e4m3 Q, K, Vᵀ and their block scales from bf16 device arrays (uint16 bit patterns, (B, H, N, d)),
    `key_lengths` an int32 device array of B lengths."""
    batch, heads, nq, head_dim = q.shape
    kv_heads, nk, value_dim = k.shape[1], k.shape[2], v.shape[3]
    dp = padded(head_dim, K_STEP)
    q_blocks, tiles = -(-nq // SCALE_BLOCK), -(-nk // SCALE_BLOCK)
    ops = Fp8Operands(
        q=cuda.device_array((batch, heads, nq, dp), dtype=np.uint8, stream=stream),
        k=cuda.device_array((batch, kv_heads, nk, dp), dtype=np.uint8, stream=stream),
        vt=cuda.device_array((batch, kv_heads, tiles * value_dim, SCALE_BLOCK), dtype=np.uint8, stream=stream),
        q_scale=cuda.device_array((batch, heads, q_blocks), dtype=np.float32, stream=stream),
        k_scale=cuda.device_array((batch, kv_heads, tiles), dtype=np.float32, stream=stream),
        v_scale=cuda.device_array((batch, kv_heads, tiles), dtype=np.float32, stream=stream),
    )
    block = QUANTIZE_THREADS
    quantize_kernel(head_dim, dp, False)[(q_blocks, heads, batch), block, stream](q, key_lengths, False, ops.q,
                                                                                  ops.q_scale)
    quantize_kernel(head_dim, dp, False)[(tiles, kv_heads, batch), block, stream](k, key_lengths, True, ops.k,
                                                                                  ops.k_scale)
    quantize_kernel(value_dim, value_dim, True)[(tiles, kv_heads, batch), block, stream](v, key_lengths, True, ops.vt,
                                                                                         ops.v_scale)
    return ops


# --------------------------------------------------------------------------------------
# attention
# --------------------------------------------------------------------------------------


@cache
def fp8_attention_kernel(head_dim: int, value_dim: int, config: TileConfig, out_kind: str = "bf16"):
    """Build the fused forward kernel for one (d, dv, tile shape, output type): (kernel, shared bytes).

    Grid ``(ceil(Nq / BM), H, B)``, BM / 64 warpgroups a block, as the half kernel
    (`nkattn.cuda_kernels.exact_tc._half_kernel`, whose `block_start`, K/V ring, softmax and
    epilogue it shares); per tile j it issues S_{j+1} and P_j·V_j back to back, waits for both,
    computes the softmax of tile j + 1, folds P_j·V_j into O with V_j's scale and rescales O.
    """
    check_head_dims(head_dim, value_dim)
    if out_kind not in OUT_KINDS:
        raise ValueError(f"out_kind must be one of {OUT_KINDS}, got {out_kind!r}")
    if config.block_n != SCALE_BLOCK or config.block_m % 64 or not 64 <= config.block_m <= 192:
        raise ValueError(f"the fp8 kernel takes tiles of {SCALE_BLOCK} keys (one K and V scale each) and 64, 128 or "
                         f"192 rows, got {config}")
    if config.overlap or config.pingpong or config.mma_sync or config.blocks_per_sm != 1 or config.tma:
        raise ValueError(f"the fp8 kernel has the plain wgmma schedule only, uncapped, its ring filled by cp.async, "
                         f"got {config}")
    BM, BN = config.block_m, config.block_n
    NWG = BM // 64
    THREADS = 128 * NWG
    DP, DVP = padded(head_dim, K_STEP), value_dim
    q_tile = TileLayout(BM, DP, 1, 0)
    k_tile = TileLayout(BN, DP, 1, q_tile.end)
    v_tile = TileLayout(DVP, BN, 1, k_tile.end)  # Vᵀ: rows are head dims, columns keys (K-major for P·V)
    SLOT = v_tile.end - k_tile.offset  # one ring slot: a K and a Vᵀ tile
    SHARED_BYTES = k_tile.offset + STAGES * SLOT + TILE_ALIGN  # + slack to align the buffer at run time
    SLOT_UNITS = SLOT >> 4

    _, load_q = tile_functions(q_tile, 1, THREADS)
    _, load_k = tile_functions(k_tile, 1, THREADS)
    _, load_v = tile_functions(v_tile, 1, THREADS)
    mma_s = ptx.wgmma("e4m3", BN, "desc")
    mma_o = ptx.wgmma("e4m3", DVP, "regs")
    pack = ptx.pack_bf16x2 if out_kind == "bf16" else ptx.pack_f16x2
    wait_mma_all = ptx.wgmma_wait(0)
    QK_STEPS, PV_STEPS = DP // K_STEP, BN // K_STEP
    Q_DELTAS = tuple(np.uint64((q_tile.k_major_start(0, s * K_STEP) - q_tile.offset) >> 4) for s in range(QK_STEPS))
    K_DELTAS = tuple(np.uint64((k_tile.k_major_start(0, s * K_STEP) - k_tile.offset) >> 4) for s in range(QK_STEPS))
    V_DELTAS = tuple(np.uint64((v_tile.k_major_start(0, s * K_STEP) - v_tile.offset) >> 4) for s in range(PV_STEPS))
    NS, NO, NP = BN // 2, DVP // 2, BN // 8
    MAX_REGISTERS = min(255, 65536 // THREADS // 8 * 8)
    softmax, online_update, rescale, empty_rows = _row_functions(BN, DVP)
    block_start = block_functions(BM, BN, 1, from_dtype(np.dtype(np.uint8)), q_tile.offset, k_tile.offset,
                                  v_tile.offset, q_tile.k_major_bits(), k_tile.k_major_bits(), v_tile.k_major_bits(),
                                  64 * q_tile.width)

    @cuda.jit(device=True, inline="always")
    def store_pair(o, b, h, row, col, x, y):
        # x = fl32(acc · fl32(1 / l)); emulate's fl32(acc · fl32(1 / fl32(l · 2^8))) is that times 2^-8, exactly
        ptx.store_b32(o, b, h, row, col, pack(x * P_DESCALE, y * P_DESCALE))

    store_rows = _row_store(DVP, store_pair)

    @cuda.jit(device=True, inline="always")
    def load_tile(smem, base, k8, vt8, b, kvh, j, nk_b, tid):
        slot = base + ring_slot(j) * SLOT
        load_k(smem, slot, k8, b, kvh, j * BN, nk_b, DP, tid)
        load_v(smem, slot, vt8, b, kvh, j * DVP, (j + 1) * DVP, BN, tid)

    @cuda.jit(device=True, inline="always")
    def issue_pv(smem, acc_pv, p_regs, v_desc, j):
        # the tile's product starts from zero (scale_d = 0 at its first step): V's scale is the tile's
        slot = uint64(ring_slot(j) * SLOT_UNITS)
        for s in range(PV_STEPS):
            mma_o(acc_pv, p_regs, 4 * s, v_desc + slot + V_DELTAS[s], s, smem)

    _, _, ring_start, ring_step = _ring_functions(SLOT_UNITS, mma_s, Q_DELTAS, K_DELTAS, load_q, load_tile, issue_pv)

    @cuda.jit(device=True, inline="always")
    def pack_p(acc_s, p_regs):
        # byte e of register r of K step s is key 32s + 16(r >> 1) + 8(e >> 1) + 2tq + (e & 1) of row
        # g + 8(r & 1) (`permuted_key`): accumulator elements base, base + 1, base + 4, base + 5
        for s in range(PV_STEPS):
            for r in range(4):
                e = 16 * s + 8 * (r >> 1) + 2 * (r & 1)
                p_regs[4 * s + r] = ptx.pack_e4m3x4(acc_s[e] * P_SCALE, acc_s[e + 1] * P_SCALE,
                                                    acc_s[e + 4] * P_SCALE, acc_s[e + 5] * P_SCALE)

    @cuda.jit(device=True, inline="always")
    def tile_scale(qk_scale_log2, s_q, k_scale, b, kvh, j):
        # emulate's c = fl32(fl32(scale · log2 e) · fl32(s_q · s_k)), K's block being the tile
        return ptx.mul_rn(qk_scale_log2, ptx.mul_rn(s_q, k_scale[b, kvh, j]))

    @cuda.jit(**({} if SIMULATOR else {"max_registers": MAX_REGISTERS}))
    def fp8_attention_fwd(q8, k8, vt8, q_scale, k_scale, v_scale, key_lengths, o, lse, qk_scale_log2, causal, group):
        (tid, wg, tq, b, h, kvh, nq, row0, nk_b, smem, base, q_desc, k_desc, v_desc, r0, kv_end0, kv_end1,
         block_kv_min, n_tiles) = block_start(q8, key_lengths, causal, group)
        s_q = q_scale[b, h, (row0 + 64 * wg) // SCALE_BLOCK]  # a warpgroup's 64 rows lie in one Q block

        acc_s = cuda.local.array(NS, np.float32)
        acc_pv = cuda.local.array(NO, np.float32)
        acc_o = cuda.local.array(NO, np.float32)
        p_regs = cuda.local.array(NP, np.uint32)
        m0, m1, l0, l1 = empty_rows(acc_o)

        # prologue: S_0 and its softmax (k8 twice in place of TMA maps: this ring fills by cp.async)
        ring_start(smem, base, q8, k8, vt8, b, h, kvh, row0, nq, DP, nk_b, tid, acc_s, q_desc, k_desc, n_tiles, k8, k8)
        if n_tiles > 0:
            m0, m1, alpha0, alpha1, ps0, ps1 = softmax(acc_s, 0, BN > block_kv_min, kv_end0, kv_end1, m0, m1, tq, tid,
                                                       tile_scale(qk_scale_log2, s_q, k_scale, b, kvh, 0))
            l0 = ps0
            l1 = ps1
            pack_p(acc_s, p_regs)

        for j in range(n_tiles):
            more = ring_step(smem, base, k8, vt8, b, kvh, nk_b, tid, acc_s, acc_pv, p_regs, q_desc, k_desc, v_desc, j,
                             n_tiles, k8, k8)
            wait_mma_all()
            if more:
                tile_start = (j + 1) * BN
                m0, m1, l0, l1, alpha0, alpha1 = online_update(acc_s, tile_start, tile_start + BN > block_kv_min,
                                                               kv_end0, kv_end1, m0, m1, l0, l1, tq, tid,
                                                               tile_scale(qk_scale_log2, s_q, k_scale, b, kvh, j + 1))
            # O += the tile's product times V_j's scale, then the rescale of tile j + 1 (emulate's order)
            s_v = v_scale[b, kvh, j]
            for i in range(NO):
                acc_o[i] += acc_pv[i] * s_v
            if more:
                rescale(acc_o, alpha0, alpha1)
                pack_p(acc_s, p_regs)

        store_rows(o, lse, b, h, r0, nq, tq, tid, acc_o, l0, l1, m0, m1)

    return fp8_attention_fwd, SHARED_BYTES


def fp8_attention_quantized(ops: Fp8Operands, key_lengths, *, causal: bool, scale: float, value_dim: int, out=None,
                            lse=None, out_kind: str = "bf16", stream=0, config: TileConfig | None = None):
    """The FP8 kernel on operands `quantize` made (the attention alone, as a benchmark times it); returns (O, lse)."""
    batch, heads, nq, dp = ops.q.shape
    head_dim = dp  # the padded columns are zeros: the kernel is the same for every d they pad
    config = default_config() if config is None else config
    kernel, shared_bytes = fp8_attention_kernel(head_dim, value_dim, config, out_kind)
    if out is None:
        out = cuda.device_array((batch, heads, nq, value_dim), dtype=np.uint16, stream=stream)
    if lse is None:
        lse = cuda.device_array((batch, heads, nq), dtype=np.float32, stream=stream)
    grid, block = launch_config(config, batch, heads, nq)
    launch_with_shared_memory(
        kernel, grid, block, shared_bytes, stream,
        ops.q, ops.k, ops.vt, ops.q_scale, ops.k_scale, ops.v_scale, key_lengths, out, lse,
        np.float32(scale * LOG2E), bool(causal), heads // ops.k.shape[1],
    )
    return out, lse


def fp8_attention(q, k, v, key_lengths, *, causal: bool, scale: float, out=None, lse=None, out_kind: str = "bf16",
                  stream=0, config: TileConfig | None = None):
    """`quantize`, then the FP8 kernel on device arrays; returns (O, lse).

    q (B, H, Nq, d), k (B, Hkv, Nk, d), v (B, Hkv, Nk, dv): uint16 arrays of bf16 patterns; d and dv
    multiples of 16 up to `MAX_HEAD_DIM`. O (B, H, Nq, dv) as uint16 patterns of `out_kind` (bf16 as
    FlashAttention-3's FP8 returns it, or f16), lse (B, H, Nq) float32. `key_lengths` is an int32
    device array of B lengths. Inputs are assumed finite (`nkattn.attention` checks them).
    """
    check_head_dims(q.shape[3], v.shape[3])
    ops = quantize(q, k, v, key_lengths, stream=stream)
    return fp8_attention_quantized(ops, key_lengths, causal=causal, scale=scale, value_dim=v.shape[3], out=out, lse=lse,
                                   out_kind=out_kind, stream=stream, config=config)
