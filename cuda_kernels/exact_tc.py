"""Exact attention on tensor cores: float16/bfloat16 (wgmma on Hopper, mma.sync from sm_80), and float32
as 3xTF32 or TF32 (wgmma).

One launch, online softmax, O(N) memory, FlashAttention-3's structure without its
warp specialization: each warpgroup owns 64 query rows; S = Q·Kᵀ and O += P·V are
wgmma products with P kept in registers. Semantics are `nkattn.reference.exact`'s.

* ``kind="f16"`` / ``"bf16"``: Q, K (K-major) and V (MN-major) stream through a ring of
  three swizzled shared-memory slots by cp.async, two tiles ahead.
* ``kind="tf32x3"``: float32 inputs at float32 accuracy. Every operand x is split into
  ``hi = tf32(x)`` and ``lo = tf32(x - hi)`` (hi + lo is x to within 2^-24 |x|),
  and each product is ``hi·hi + hi·lo + lo·hi`` on the tf32 tensor cores (the lo·lo
  term is below float32 rounding). ``kind="tf32"`` is the single ``hi·hi`` product,
  like torch's ``allow_tf32`` (about 1e-3 relative error).
  tf32 wgmma reads both operands K-major, so V is stored transposed (Vᵀ, keys
  contiguous), split while it is loaded; tiles are single-buffered.
* ``TileConfig(..., mma_sync=True)`` (f16/bf16): the same algorithm in FlashAttention-2's form
  on warp-level ``mma.sync`` m16n8k16 (`_mma_sync_kernel`), the kernel of GPUs without wgmma
  (sm_80-sm_89, and 10.x on); `default_config` picks it there, `device_reasons` says what a
  GPU cannot run. It lives here, not in a module of its own, because it is this algorithm
  with this module's softmax, epilogue, tile layouts and dispatch.

`tc_attention(q, k, v, ...)` takes numba device arrays (uint16 bit patterns for the half
kinds, float32 for the tf32 kinds) and returns (O in the input's type, lse float32);
`nkattn.attention` converts framework arrays.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import cache

import numpy as np
from numba import cuda, from_dtype, uint32, uint64

from nkattn.cuda_kernels import ptx, tma
from nkattn.cuda_kernels.online_softmax import (
    SIMULATOR,
    launch_with_shared_memory,
    visible_keys,
)
from nkattn.cuda_kernels.tensor_core import TILE_ALIGN, TileLayout, tile_functions

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
HALF_KINDS = ("f16", "bf16")
FLOAT32_KINDS = ("tf32x3", "tf32")
KINDS = HALF_KINDS + FLOAT32_KINDS
MAX_HEAD_DIM = 256
NEG_INF = np.float32(-np.inf)
F32_ZERO = np.float32(0.0)
F32_ONE = np.float32(1.0)
F32_LN2 = np.float32(LN2)
STAGES = 3  # K/V ring slots of the wgmma kernels: tile j + 2 loads while tile j is computed


@cuda.jit(device=True, inline="always")
def ring_slot(t):
    """The ring slot of tile t: in 32 bits, where a division by 3 is a multiply-high and a shift (on the
    loop's int64 it took 25 instructions, four times a tile)."""
    return uint32(t) % uint32(STAGES)


@cuda.jit(device=True, inline="always")
def ring_parity(t):
    """The parity of the mbarrier phase in which tile t fills its slot (the (t // STAGES)-th fill)."""
    return (uint32(t) // uint32(STAGES)) & uint32(1)


@dataclass(frozen=True)
class TileConfig:
    """Rows per block (64 per warpgroup), keys per tile, and whether the softmax of tile j+1
    runs while P_j·V_j is on the tensor cores (FlashAttention-3's intra-warpgroup overlap).

    The overlap is off by default. In the plain schedule ptxas cannot prove that the softmax reads
    only the finished group's accumulators and serializes every wgmma of the kernel (its C7514
    "wgmma.mma_async instructions are serialized" report); measured on the H100 it is 10 % slower
    (322 against 357 TFLOP/s at N = 16K, d = 128, fp16). The cause is that S_{j+1} is issued
    under a condition (tile j + 1 exists): with S issued unconditionally ptxas serializes nothing.
    The ping-pong schedule with ``overlap`` runs its last tile apart (`turn`), so every wgmma it
    issues in the loop is unconditional: FlashAttention-3's whole schedule (turns and overlap),
    serialized nowhere (ptxas, sm_90a; no spill with a producer at d = 128 or three warpgroups at
    d = 64), same bits in the simulator; it has not run on a GPU.

    ``pingpong`` (half kinds, two or three warpgroups: ``block_m`` 128 or 192): the warpgroups
    take turns on the tensor cores (FlashAttention-3's inter-warpgroup schedule, through named
    barriers, round the warpgroups), so one's softmax runs while another's products do, and the
    K/V ring hands slots over by mbarriers instead of a block-wide barrier per tile, so none
    waits for another's softmax. Measured on the H100 at the default tiles (128, 128), fp16:
    1.01-1.24x the default kernel at N = 16K, 1.07-1.16x at 128K (438 TFLOP/s at d = 128), bits
    equal to the plain schedule's. It is the default for the half kinds up to d = 128
    (`default_config`), with ``tma``: three warpgroups at d <= 64, two and ``producer`` above.

    ``mma_sync`` (half kinds): FlashAttention-2's kernel on warp-level ``mma.sync`` instead of
    wgmma (`_mma_sync_kernel`), the only one for GPUs without wgmma (compute capability 8.x,
    and 10.x and up); on Hopper it runs when asked for. One warp per 16 rows: ``block_m`` is a
    multiple of 16, and ``overlap``/``pingpong`` (wgmma schedules) do not apply.

    ``blocks_per_sm`` (wgmma half kinds): cap registers so that this many blocks fit an SM's
    65536 (the default 1 lets ptxas take up to 255). The ping-pong kernel at d = 64 with 64-key
    tiles takes 148 registers uncapped and 126 with no spill at the cap of 2 blocks (ptxas,
    sm_90a), and 67 KB of shared memory: 16 warps an SM instead of 8. Timed on the H200
    (`results/bench/tc-blocks-per-sm-h200.txt`): 1.12x the default at d = 64 without a mask,
    slower causal and at d = 128, so not the default.

    ``tma`` (the wgmma half kernels, either schedule): thread 0 fills a ring slot with K and V tiles
    by TMA copies (`tma.tensor_map`) in place of every thread's cp.async chunks, whose address
    arithmetic and bounds checks took 378 of the 988 instructions a warp issued per tile (ncu, H200,
    d = 128, ping-pong).
    A tile that runs past the key length still goes by cp.async, which zero-fills the rows past it:
    the rows a TMA box would read there are the next head's or padding, which may hold non-finite
    values that a zero P would not cancel (0·inf). The same bytes land either way, so the bits do
    not change. Measured on the H200 (`.ci/tc_tma_timing.py`, fp16, N = 16K, H = 8): 1.21x the
    cp.async ring at d = 128 (508 TFLOP/s, 0.77x cuDNN; causal 460, 0.81x), 0.97-1.04x at d = 64,
    so the default (`default_config`); arrays a map cannot describe run the cp.async ring. The plain
    schedule's TMA ring (d = 256's default schedule; `_ring_functions`) has not run on a GPU.

    ``producer`` (ping-pong with ``tma``): one more warpgroup, whose first warp fills the ring
    (FlashAttention-3's warp specialization), so a consumer never waits for a free slot: without it
    each warpgroup refills a slot before its turn, which waits until the other warpgroup's products
    of the tile before have finished, and the tensor cores idle from then until this warpgroup's
    products are issued. The producer gives its registers back (``setmaxnreg``) for the consumers.
    """

    block_m: int
    block_n: int
    overlap: bool = False
    pingpong: bool = False
    mma_sync: bool = False
    blocks_per_sm: int = 1
    tma: bool = False
    producer: bool = False


def default_config(kind: str, head_dim: int, value_dim: int, compute_capability=(9, 0)) -> TileConfig:
    """The tile shape for a (kind, d, dv) on a GPU of ``compute_capability``: wgmma on Hopper,
    mma.sync elsewhere; the simulator runs one 64-row warpgroup and 16-key tiles so that tiny
    inputs cross many tile edges."""
    if SIMULATOR:
        return TileConfig(64, 16)
    if compute_capability[0] != 9:
        return mma_sync_config(head_dim, value_dim)
    widest = max(head_dim, value_dim)
    if kind in FLOAT32_KINDS:
        # Q, K and Vᵀ tiles (two each when split) at 4 bytes an element in 227 KB
        return TileConfig(64, 64 if widest <= 128 else 16)
    # three K/V slots must fit beside Q in 227 KB of shared memory. Ping-pong at d = 256 (32-key
    # tiles) ran at 0.63x the plain schedule on the H100 (66 against 105 TFLOP/s at N = 16K): the
    # turn handed over every 32 keys costs more than the overlap it buys
    # Measured on the H200 (`.ci/tc_schedule_timing.py`, fp16, N = 16K, H = 8, results/bench/tc-schedules-*):
    # at d = 128 the producer warpgroup ran at 571 / 494 TFLOP/s (non-causal / causal), 1.27x / 1.15x
    # the ping-pong ring without it; at d = 64 it gained nothing non-causal (303 against 303; causal
    # 307 against 276), and three consumer warpgroups without one did better (336 / 296): at d = 64 a
    # tile's products take about as long as its softmax, so two warpgroups computing softmax keep the
    # tensor cores busier. Every one of these gives the same bits (128-key tiles)
    if widest <= 64:
        return TileConfig(192, 128, pingpong=True, tma=True)
    if widest <= 128:
        return TileConfig(128, 128, pingpong=True, tma=True, producer=True)
    return TileConfig(128, 32)


def mma_sync_config(head_dim: int, value_dim: int) -> TileConfig:
    """The mma.sync kernel's tiles: 8 warps (BM = 128) where Q and two K/V slots fit in 99 KB
    (the most a block of sm_86/sm_89 may take), and 4 (BM = 64) at d > 128. Registers bound
    occupancy to about 8 warps an SM at d = 128 either way (Q fragments, S, P and O of 16
    rows: ~150 a thread), so the 8-warp block, whose K/V tiles serve twice the rows, halves
    the L2 traffic and cp.async issue per row; BN as FlashAttention-2 on sm_80 (128 keys at
    d <= 64, 64 at d <= 128)."""
    widest = max(head_dim, value_dim)
    if widest <= 64:
        return TileConfig(128, 128, mma_sync=True)
    if widest <= 128:
        return TileConfig(128, 64, mma_sync=True)
    return TileConfig(64, 32, mma_sync=True)


def device_reasons(kind: str, compute_capability, config: TileConfig | None = None) -> list[str]:
    """Why a GPU of ``compute_capability`` cannot run ``kind`` (with ``config``, when given);
    empty when it can. wgmma is Hopper's alone (sm_90a); mma.sync m16n8k16 with bf16 and
    cp.async need sm_80."""
    major, minor = compute_capability
    found = f"found compute capability {major}.{minor}"
    if (major, minor) < (8, 0):
        return [f"the tensor-core kernels need compute capability 8.0 or newer (mma.sync, cp.async), {found}"]
    if major == 9:
        return []
    if kind in FLOAT32_KINDS:
        return [f"kind {kind!r} runs on Hopper's wgmma only (compute capability 9.x), {found}"]
    if config is not None and not config.mma_sync:
        return [f"{config} is a wgmma schedule (compute capability 9.x), {found}: use mma_sync=True"]
    return []


def padded(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


# p = 2^(s·c - m) is computed as ex2(fma(s, c, -m)): one rounding, and m (the row's running max,
# rounded) is only a shift that l and lse take back exactly. The true maximum of s·c is within
# half an ulp of m, so the largest p is at most 2^(ulp(m)/2): harmless (< 1.5) while |m| < 2^24,
# but 2^±2048 for logits ~1e10 (float16 inputs near ±65504), where p becomes inf or 0 and the row
# NaN. Rows whose running max is that large round s·c on its own first (`ptx.mul_rn`), so the
# maximum's exponent is exactly 0; the per-score rounding this adds is below the error the
# float32 scores already carry at that size. The test is on the row's own max, so a row's bits
# never depend on its neighbours.
FUSED_EXPONENT_LIMIT = float(2**24)


@cache
def _row_functions(block_n: int, value_width: int):
    """The online softmax of every kernel over one tile of accumulator-layout scores (the thread's rows
    r0 = 16w + g and r0 + 8), and the rows' state it updates: the running max (m0, m1), this thread's
    share of the row sums (l0, l1, quad-reduced at the end) and ``acc_o``, its columns of O (of
    ``value_width``) in the accumulator layout."""
    NS = block_n // 2
    NO = value_width // 2
    FUSED_LIMIT = np.float32(FUSED_EXPONENT_LIMIT)

    @cuda.jit(device=True, inline="always")
    def row_exp(acc_s, half, mu, qk_scale_log2):
        """P = 2^(S·c - mu) over the thread's elements of one row (half 0: r0, 2: r0 + 8), in place;
        returns their sum (`FUSED_EXPONENT_LIMIT`)."""
        ps = F32_ZERO
        if abs(mu) < FUSED_LIMIT:
            for i in range(NS):
                if (i & 2) == half:
                    p = ptx.ex2(acc_s[i] * qk_scale_log2 - mu)
                    ps += p
                    acc_s[i] = p
        else:
            for i in range(NS):
                if (i & 2) == half:
                    p = ptx.ex2(ptx.mul_rn(acc_s[i], qk_scale_log2) - mu)
                    ps += p
                    acc_s[i] = p
        return ps

    @cuda.jit(device=True, inline="always")
    def softmax(acc_s, tile_start, masked, kv_end0, kv_end1, m0, m1, tq, tid, qk_scale_log2):
        """Mask the tile's scores, update the running max; acc_s becomes P (float32).
        Returns (m0, m1, alpha0, alpha1, this thread's row sums of P)."""
        if masked:
            for i in range(NS):
                col = tile_start + 8 * (i // 4) + 2 * tq + (i & 1)
                if col >= (kv_end0 if (i & 2) == 0 else kv_end1):
                    acc_s[i] = NEG_INF
        mt0 = NEG_INF
        mt1 = NEG_INF
        for i in range(NS):
            if (i & 2) == 0:
                mt0 = max(mt0, acc_s[i])
            else:
                mt1 = max(mt1, acc_s[i])
        mt0 = ptx.quad_max(mt0, tid)
        mt1 = ptx.quad_max(mt1, tid)
        # the running max in the scaled log2 domain (scale > 0 and rounding commute with max),
        # rounded as `row_exp`'s separate multiply rounds every score
        mn0 = max(m0, ptx.mul_rn(mt0, qk_scale_log2))
        mn1 = max(m1, ptx.mul_rn(mt1, qk_scale_log2))
        # a row that has seen no key keeps l = 0 and O = 0 (never -inf - -inf)
        mu0 = F32_ZERO if mn0 == NEG_INF else mn0
        mu1 = F32_ZERO if mn1 == NEG_INF else mn1
        ps0 = row_exp(acc_s, 0, mu0, qk_scale_log2)
        ps1 = row_exp(acc_s, 2, mu1, qk_scale_log2)
        return mn0, mn1, ptx.ex2(m0 - mu0), ptx.ex2(m1 - mu1), ps0, ps1

    @cuda.jit(device=True, inline="always")
    def online_update(acc_s, tile_start, masked, kv_end0, kv_end1, m0, m1, l0, l1, tq, tid, qk_scale_log2):
        """`softmax`, its row sums added to the rescaled l. Returns (m0, m1, l0, l1, alpha0, alpha1):
        acc_o is the caller's to `rescale`, once no product writes it."""
        m0, m1, alpha0, alpha1, ps0, ps1 = softmax(acc_s, tile_start, masked, kv_end0, kv_end1, m0, m1, tq, tid,
                                                   qk_scale_log2)
        return m0, m1, l0 * alpha0 + ps0, l1 * alpha1 + ps1, alpha0, alpha1

    @cuda.jit(device=True, inline="always")
    def rescale(acc_o, alpha0, alpha1):
        for i in range(NO):
            acc_o[i] *= alpha0 if (i & 2) == 0 else alpha1

    @cuda.jit(device=True, inline="always")
    def empty_rows(acc_o):
        """Zeroes acc_o; returns (m0, m1, l0, l1) of rows that have seen no key."""
        for i in range(NO):
            acc_o[i] = F32_ZERO
        return NEG_INF, NEG_INF, F32_ZERO, F32_ZERO

    return softmax, online_update, rescale, empty_rows


@cuda.jit(device=True, inline="always")
def finish_row(l_row, m_row):
    """(1 / l, lse) of a row: l == 0 means it saw no key (O = 0, lse = -inf); a NaN l
    (non-finite input) propagates into both."""
    if l_row == F32_ZERO:
        return F32_ZERO, NEG_INF
    return F32_ONE / l_row, (m_row + math.log2(l_row)) * F32_LN2


def _row_store(value_width: int, store_pair):
    """The epilogue of both kernels: the quad's row sums, then O = acc / l for the thread's
    columns of its rows r0 and r0 + 8 through ``store_pair(o, b, h, row, col, x, y)``
    (columns col, col + 1), and lse by one lane of the quad."""

    @cuda.jit(device=True, inline="always")
    def store_rows(o, lse, b, h, r0, nq, tq, tid, acc_o, l0, l1, m0, m1):
        l0 = ptx.quad_sum(l0, tid)
        l1 = ptx.quad_sum(l1, tid)
        dv = o.shape[3]
        for half in range(2):
            row = r0 + 8 * half
            if row < nq:
                inv, row_lse = finish_row(l0 if half == 0 else l1, m0 if half == 0 else m1)
                for c in range(value_width // 8):
                    col = 8 * c + 2 * tq
                    if col < dv:
                        i = 4 * c + 2 * half
                        store_pair(o, b, h, row, col, acc_o[i] * inv, acc_o[i + 1] * inv)
                if tq == 0:
                    lse[b, h, row] = row_lse

    return store_rows


def _state_functions(value_width: int):
    """The resume entry's state between launches, in float32 global memory: the accumulator in
    ``acc_state`` (B, H, Nq, dv), the running max in ``lse``, and each quad lane's share of the row
    sum in ``l_state`` (B, H, Nq, 4), unreduced, so that the last launch's quad sum adds the same
    four numbers as one launch does. ``load_state`` fills ``acc_o`` and returns (m0, m1, l0, l1)."""

    @cuda.jit(device=True, inline="always")
    def load_state(acc_state, lse, l_state, b, h, r0, nq, tq, acc_o):
        dv = acc_state.shape[3]
        m0 = NEG_INF
        m1 = NEG_INF
        l0 = F32_ZERO
        l1 = F32_ZERO
        for half in range(2):
            row = r0 + 8 * half
            if row < nq:
                for c in range(value_width // 8):
                    col = 8 * c + 2 * tq
                    if col < dv:
                        i = 4 * c + 2 * half
                        acc_o[i] = acc_state[b, h, row, col]
                        acc_o[i + 1] = acc_state[b, h, row, col + 1]
                if half == 0:
                    m0 = ptx.register_f32(lse[b, h, row])
                    l0 = l_state[b, h, row, tq]
                else:
                    m1 = ptx.register_f32(lse[b, h, row])
                    l1 = l_state[b, h, row, tq]
        return m0, m1, l0, l1

    @cuda.jit(device=True, inline="always")
    def store_state(acc_state, lse, l_state, b, h, r0, nq, tq, acc_o, l0, l1, m0, m1):
        dv = acc_state.shape[3]
        for half in range(2):
            row = r0 + 8 * half
            if row < nq:
                for c in range(value_width // 8):
                    col = 8 * c + 2 * tq
                    if col < dv:
                        i = 4 * c + 2 * half
                        acc_state[b, h, row, col] = acc_o[i]
                        acc_state[b, h, row, col + 1] = acc_o[i + 1]
                l_state[b, h, row, tq] = l0 if half == 0 else l1
                if tq == 0:
                    lse[b, h, row] = m0 if half == 0 else m1

    return load_state, store_state


def _block_origin(block_m: int, element_bytes: int, smem_type):
    """``block_origin(q, key_lengths, causal, group)`` of every tensor-core kernel: the block's batch,
    head, K/V head, query count, first row and key length, its dynamic shared buffer and that
    buffer's address, and ``base``, the element index where the buffer's aligned part starts."""
    BM, ESIZE, SMEM_TYPE = block_m, element_bytes, smem_type

    @cuda.jit(device=True, inline="always")
    def block_origin(q, key_lengths, causal, group):
        b = cuda.blockIdx.z
        h = cuda.blockIdx.y
        nq = q.shape[2]
        # causal: the heaviest row blocks (most keys) start first, so the last wave is short
        block = cuda.gridDim.x - 1 - cuda.blockIdx.x if causal else cuda.blockIdx.x
        row0 = block * BM
        kvh = h // group
        nk_b = key_lengths[b]
        smem = cuda.shared.array(0, SMEM_TYPE)
        addr0 = ptx.shared_address(smem, 0)
        base = uint32(((TILE_ALIGN - addr0 % TILE_ALIGN) % TILE_ALIGN) // ESIZE)
        return b, h, kvh, nq, row0, nk_b, smem, addr0, base

    return block_origin


@cache
def block_functions(block_m: int, block_n: int, element_bytes: int, smem_type, q_start: int, k_start: int,
                    v_start: int, q_bits, k_bits, v_bits, wg_rows_bytes: int, resume: bool = False,
                    g_last: bool = False):
    """`block_start` of a wgmma kernel of four-byte (tf32), two-byte (half) or one-byte (fp8) operands: BM
    rows a block in warpgroups of 64, BN keys a tile, Q/K/V operand descriptors starting at byte offsets
    ``q_start``, ``k_start``, ``v_start`` of the aligned shared buffer (with their descriptor bits),
    warpgroup wg's Q rows ``wg · wg_rows_bytes`` further.

    ``g_last`` (the tf32 kernel): the lane's row g within its 8 is computed last, inside r0, the
    instruction order that kernel was compiled and measured with (its PTX, byte for byte); the
    others compute it first. The rows are the same either way.

    ``resume``: the block start of the resume entry instead, ``block_start(q, key_lengths, causal,
    group, row_offset, nq_total, key_offset, chunk_len)``, for a launch over one chunk of keys (k
    holds ``chunk_len`` global keys from ``key_offset``) and of rows (q holds global rows from
    ``row_offset`` of ``nq_total``):
    the masks at global positions, the tiles counted within the chunk, and in place of the key
    length the keys of the chunk that tile loads may read."""
    BM, BN, ESIZE = block_m, block_n, element_bytes
    Q_START, K_START, V_START, Q_BITS, K_BITS, V_BITS = q_start, k_start, v_start, q_bits, k_bits, v_bits
    WG_ROWS_BYTES = wg_rows_bytes
    G_LAST = g_last
    block_origin = _block_origin(block_m, element_bytes, smem_type)

    @cuda.jit(device=True, inline="always")
    def block_place(q, key_lengths, causal, group):
        tid = cuda.threadIdx.x
        wg = tid // 128
        t = tid % 128
        g = (t % 32) // 4
        tq = t % 4
        b, h, kvh, nq, row0, nk_b, smem, addr0, base = block_origin(q, key_lengths, causal, group)
        aligned = addr0 + base * ESIZE
        q_desc = ptx.smem_descriptor(aligned + Q_START + wg * WG_ROWS_BYTES, Q_BITS)
        k_desc = ptx.smem_descriptor(aligned + K_START, K_BITS)
        v_desc = ptx.smem_descriptor(aligned + V_START, V_BITS)
        r0 = row0 + 64 * wg + 16 * (t // 32) + ((t % 32) // 4 if G_LAST else g)  # this thread's two rows: r0 and r0 + 8
        return tid, wg, tq, b, h, kvh, nq, row0, nk_b, smem, base, q_desc, k_desc, v_desc, r0

    @cuda.jit(device=True, inline="always")
    def block_start(q, key_lengths, causal, group):
        """Where this thread's block and rows are, the block's shared buffer (aligned at ``base``)
        and the operand descriptors, and how many key tiles the block visits: the half kernels
        and the fp8 kernel start so."""
        tid, wg, tq, b, h, kvh, nq, row0, nk_b, smem, base, q_desc, k_desc, v_desc, r0 = block_place(
            q, key_lengths, causal, group)
        kv_end0 = visible_keys(r0, nq, nk_b, causal)
        kv_end1 = visible_keys(r0 + 8, nq, nk_b, causal)
        block_kv_end = visible_keys(min(row0 + BM, nq) - 1, nq, nk_b, causal)  # causal: the last row sees most
        block_kv_min = visible_keys(row0, nq, nk_b, causal)  # tiles below it need no mask
        n_tiles = (block_kv_end + BN - 1) // BN
        return (tid, wg, tq, b, h, kvh, nq, row0, nk_b, smem, base, q_desc, k_desc, v_desc, r0, kv_end0, kv_end1,
                block_kv_min, n_tiles)

    @cuda.jit(device=True, inline="always")
    def block_start_resume(q, key_lengths, causal, group, row_offset, nq_total, key_offset, chunk_len):
        tid, wg, tq, b, h, kvh, nq, row0, nk_b, smem, base, q_desc, k_desc, v_desc, r0 = block_place(
            q, key_lengths, causal, group)
        kv_end0 = visible_keys(row_offset + r0, nq_total, nk_b, causal)
        kv_end1 = visible_keys(row_offset + r0 + 8, nq_total, nk_b, causal)
        block_kv_end = visible_keys(row_offset + min(row0 + BM, nq) - 1, nq_total, nk_b, causal)
        block_kv_min = visible_keys(row_offset + row0, nq_total, nk_b, causal)
        chunk_keys = max(0, min(nk_b - key_offset, chunk_len))  # the chunk's keys below the key length
        n_tiles = (max(0, min(block_kv_end, key_offset + chunk_len) - key_offset) + BN - 1) // BN
        return (tid, wg, tq, b, h, kvh, nq, row0, chunk_keys, smem, base, q_desc, k_desc, v_desc, r0, kv_end0,
                kv_end1, block_kv_min, n_tiles)

    return block_start_resume if resume else block_start


def _ring_functions(slot_units: int, mma_s, q_deltas, k_deltas, load_q, load_tile, issue_pv, tma=None):
    """The K/V ring of the wgmma kernels that stage Q once and tile j of K and V in slot j % `STAGES`
    (the half kernels, the fp8 kernel), around their ``load_q`` (`tile_functions`), ``load_tile(smem,
    base, k, v, b, kvh, j, nk_b, tid)`` and ``issue_pv(smem, acc_pv, p_regs, v_desc, j)``; a slot is
    ``slot_units`` descriptor units (16 bytes) long, ``mma_s`` the S product, ``q_deltas`` and
    ``k_deltas`` its operands' K steps in descriptor units.

    ``issue_qk(smem, acc_s, q_desc, k_desc, j)``: S = Q K_jᵀ of this warpgroup's 64 rows, issued;
    ``issue_tile(smem, acc_s, acc_pv, p_regs, q_desc, k_desc, v_desc, j, more)``: S_{j+1} (``more``:
    tile j + 1 exists) and P_j V_j issued, each its own commit group.
    The plain schedule's hand-over by cp.async groups and block-wide barriers, which the ping-pong
    schedule does by mbarriers instead:
    ``ring_start(smem, base, q, k, v, b, h, kvh, row0, nq, q_cols, nk_b, tid, acc_s, q_desc, k_desc, n_tiles)``
    loads Q and tiles 0 and 1 and, where the block has a tile, computes S_0;
    ``ring_step(smem, base, k, v, b, kvh, nk_b, tid, acc_s, acc_pv, p_regs, q_desc, k_desc, v_desc, j, n_tiles)``,
    iteration j, waits for tile j + 1, refills tile j - 1's slot with tile j + 2 and issues the tile's
    products (`issue_tile`); returns whether tile j + 1 exists. Both take the TMA maps of k and v
    last (``k_map, v_map``; anything when ``tma`` is None).

    ``tma = (tma_tile, whole_tile, full0, bar_stride)``: thread 0 fills a slot with a whole tile (one
    below the key length: ``whole_tile(t, nk_b)``) by ``tma_tile(smem, base, k, k_map, v_map, b, kvh, t, full)``, which
    expects its bytes on the slot's mbarrier (at shared index ``base + full0 + slot · bar_stride``, one
    arrival a phase: thread 0's), and every thread waits for that mbarrier where it waited for its
    cp.async group; a tile across the key length goes by ``load_tile`` (`TileConfig.tma`). Only
    the tiles before the first such tile fill by TMA, so tile t is the (t // STAGES)-th fill of its
    slot's mbarrier.
    """
    QK_STEPS, Q_DELTAS, K_DELTAS, SLOT_UNITS = len(q_deltas), q_deltas, k_deltas, slot_units
    TMA = tma is not None
    tma_tile, by_tma, FULL0, BAR_STRIDE = tma if TMA else (None, None, 0, 0)
    wait_copies_all, wait_copies_but_one = ptx.cp_async_wait(0), ptx.cp_async_wait(1)
    wait_mma_all = ptx.wgmma_wait(0)

    @cuda.jit(device=True, inline="always")
    def issue_qk(smem, acc_s, q_desc, k_desc, j):
        # asynchronous: commit, then wait before reading; a descriptor holds the address >> 4, so
        # adding a byte offset >> 4 moves it
        slot = uint64(ring_slot(j) * SLOT_UNITS)
        for s in range(QK_STEPS):
            mma_s(acc_s, q_desc + Q_DELTAS[s], k_desc + slot + K_DELTAS[s], s, smem)

    @cuda.jit(device=True, inline="always")
    def issue_tile(smem, acc_s, acc_pv, p_regs, q_desc, k_desc, v_desc, j, more):
        ptx.wgmma_fence()  # acc_pv and p_regs were last written by ordinary instructions
        if more:
            issue_qk(smem, acc_s, q_desc, k_desc, j + 1)
            ptx.wgmma_commit()
        issue_pv(smem, acc_pv, p_regs, v_desc, j)
        ptx.wgmma_commit()

    if TMA:
        @cuda.jit(device=True, inline="always")
        def fill(smem, base, k, v, k_map, v_map, b, kvh, t, nk_b, tid):
            if by_tma(t, nk_b):
                if tid == 0:
                    full = base + FULL0 + ring_slot(t) * BAR_STRIDE
                    tma_tile(smem, base, k, k_map, v_map, b, kvh, t, full)
                    ptx.mbarrier_arrive(smem, full)
            else:
                load_tile(smem, base, k, v, b, kvh, t, nk_b, tid)

        @cuda.jit(device=True, inline="always")
        def wait_tile(smem, base, t, nk_b):
            # every thread, not thread 0 alone: a wait loop on a divergent path serializes every wgmma
            if by_tma(t, nk_b):
                ptx.mbarrier_wait(smem, base + FULL0 + ring_slot(t) * BAR_STRIDE, ring_parity(t))
    else:
        @cuda.jit(device=True, inline="always")
        def fill(smem, base, k, v, k_map, v_map, b, kvh, t, nk_b, tid):
            load_tile(smem, base, k, v, b, kvh, t, nk_b, tid)

        @cuda.jit(device=True, inline="always")
        def wait_tile(smem, base, t, nk_b):
            pass

    @cuda.jit(device=True, inline="always")
    def ring_start(smem, base, q, k, v, b, h, kvh, row0, nq, q_cols, nk_b, tid, acc_s, q_desc, k_desc, n_tiles, k_map,
                   v_map):
        if TMA:
            if tid == 0:
                for slot in range(STAGES):
                    ptx.mbarrier_init(smem, base + FULL0 + slot * BAR_STRIDE, 1)
                ptx.tensormap_acquire(k_map)
                ptx.tensormap_acquire(v_map)
            cuda.syncthreads()  # the mbarriers are set before a copy completes on one or anyone waits
        # Q and tile 0 (one group), tile 1 (the next)
        load_q(smem, base, q, b, h, row0, nq, q_cols, tid)
        if n_tiles > 0:
            fill(smem, base, k, v, k_map, v_map, b, kvh, 0, nk_b, tid)
        ptx.cp_async_commit()
        if n_tiles > 1:
            fill(smem, base, k, v, k_map, v_map, b, kvh, 1, nk_b, tid)
        ptx.cp_async_commit()
        wait_copies_but_one()
        if n_tiles > 0:
            wait_tile(smem, base, 0, nk_b)
        ptx.fence_proxy_async()  # the tensor cores read what cp.async wrote
        cuda.syncthreads()  # Q and tile 0 are in shared memory
        if n_tiles > 0:
            ptx.wgmma_fence()
            issue_qk(smem, acc_s, q_desc, k_desc, 0)
            ptx.wgmma_commit()
            wait_mma_all()

    @cuda.jit(device=True, inline="always")
    def ring_step(smem, base, k, v, b, kvh, nk_b, tid, acc_s, acc_pv, p_regs, q_desc, k_desc, v_desc, j, n_tiles, k_map,
                  v_map):
        wait_copies_all()
        if j + 1 < n_tiles:
            wait_tile(smem, base, j + 1, nk_b)
        ptx.fence_proxy_async()
        cuda.syncthreads()  # tile j + 1 is in shared memory; every warpgroup is done with tile j - 1's slot
        if j + 2 < n_tiles:
            fill(smem, base, k, v, k_map, v_map, b, kvh, j + 2, nk_b, tid)
            ptx.cp_async_commit()
        more = j + 1 < n_tiles
        issue_tile(smem, acc_s, acc_pv, p_regs, q_desc, k_desc, v_desc, j, more)
        return more

    return issue_qk, issue_tile, ring_start, ring_step


def _half_fragments(kind: str, block_n: int, value_width: int):
    """What both float16/bfloat16 kernels do with their accumulators: ``pack_p(acc_s, p_regs)``
    packs P (the accumulator layout of S) into the A fragments of P·V, and ``store_rows``
    (`_row_store`) writes O in ``kind``."""
    pack = ptx.pack_f16x2 if kind == "f16" else ptx.pack_bf16x2
    pv_steps = block_n // 16

    @cuda.jit(device=True, inline="always")
    def pack_p(acc_s, p_regs):
        # register r of K step s holds S chunk 2s + (r >> 1), row g + 8 (r & 1)
        for s in range(pv_steps):
            for r in range(4):
                e = 8 * s + 4 * (r >> 1) + 2 * (r & 1)
                p_regs[4 * s + r] = pack(acc_s[e], acc_s[e + 1])

    @cuda.jit(device=True, inline="always")
    def store_pair(o, b, h, row, col, x, y):
        ptx.store_b32(o, b, h, row, col, pack(x, y))

    return pack_p, _row_store(value_width, store_pair)


@cache
def tc_attention_kernel(kind: str, head_dim: int, value_dim: int, config: TileConfig, resume: bool = False):
    """Build the fused forward kernel for one (kind, d, dv, tile shape): (kernel, shared bytes).

    ``resume`` builds the resume entry of the wgmma half kernels instead (`tc_attention_fold`):
    the same body compiled with the carried state, so the one-launch kernel is unchanged."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if head_dim % 8 or value_dim % 8 or not 8 <= max(head_dim, value_dim) <= MAX_HEAD_DIM:
        raise ValueError(f"head dims must be multiples of 8 up to {MAX_HEAD_DIM}, got d={head_dim}, dv={value_dim}")
    rows_per_group = 16 if config.mma_sync else 64  # a warp's rows, or a warpgroup's
    if (config.block_m % rows_per_group or not 0 < config.block_m <= 512 or config.block_n % 16
            or not 16 <= config.block_n <= 256):
        raise ValueError(f"bad tile config {config}")
    if config.pingpong and (kind not in HALF_KINDS or config.block_m not in (128, 192)):
        raise ValueError(f"pingpong takes a half kind and two or three warpgroups (block_m=128 or 192), got {kind!r}, "
                         f"{config}")
    if config.tma and (kind not in HALF_KINDS or config.mma_sync):
        raise ValueError(f"tma fills the ring of the wgmma half kernels, got {kind!r}, {config}")
    if config.producer and not (config.pingpong and config.tma):
        raise ValueError(f"a producer warpgroup fills the ping-pong schedule's TMA ring (pingpong=True, tma=True), "
                         f"got {config}")
    if config.blocks_per_sm < 1 or (config.blocks_per_sm > 1 and (kind not in HALF_KINDS or config.mma_sync)):
        raise ValueError(f"blocks_per_sm caps the registers of the wgmma half kernels, at least 1, got {kind!r}, {config}")
    if config.mma_sync:
        if kind not in HALF_KINDS or config.overlap or config.pingpong:
            raise ValueError(f"mma_sync takes a half kind and no wgmma schedule (overlap, pingpong), got {kind!r}, {config}")
        if resume:
            raise ValueError("the resume entry is built for the wgmma kernels only, not mma_sync")
        return _mma_sync_kernel(kind, head_dim, value_dim, config)
    if kind in HALF_KINDS:
        return _half_kernel(kind, head_dim, value_dim, config, resume)
    if resume:
        raise ValueError(f"the resume entry is built for the half kinds {HALF_KINDS} only, got {kind!r}")
    return _float32_kernel(kind, head_dim, value_dim, config)


def _half_kernel(kind: str, head_dim: int, value_dim: int, config: TileConfig, resume: bool = False):
    """The float16/bfloat16 kernel.

    Grid ``(ceil(Nq / BM), H, B)``; a block of BM / 64 warpgroups owns BM query rows,
    warpgroup ``wg`` rows ``64 wg .. 64 wg + 63``, and streams BN-key tiles through a
    ring of three shared-memory K/V slots (cp.async, two tiles ahead)::

                      K tile j+1 (BN x d)              V tile j (BN x dv)
        Q (BM x d)  --wgmma SS-->  S_{j+1} (64 x BN per warpgroup, registers)
                                   | mask, running max m,
                                   | P_{j+1} = 2^(S·c - m), running sum l
                                   v
                        P_j (f16/bf16 registers) --wgmma RS--> O += P_j V_j (64 x dv, registers)

    Iteration j issues S_{j+1} = Q K_{j+1}ᵀ and O += P_j V_j back to back (16 wgmmas in
    flight for d = BN = 128), waits, and computes the softmax of tile j+1; with
    ``config.overlap`` it waits for the first product only and computes the softmax while
    the tensor cores run the second. Then O is rescaled and P_{j+1} packed.
    The thread that holds S[r, c] in the accumulator layout also holds P[r, c] as part
    of the A operand of P·V (`ptx` module docstring), so P never leaves registers.

    Rows of the block see keys [0, kv_end); tiles are visited in order up to the last
    key any row sees, and a tile a row sees nothing of leaves its state bit for bit
    unchanged (p = 0, alpha = 1): a row's bits do not depend on its neighbours, the
    batch, or how many rows are launched. No atomics; fixed reduction order (the row
    sum is kept per thread and reduced over the quad once, at the end).

    Each schedule's body is written once (``plain``, ``pingpong``) and compiled as the
    one-launch kernel or, with ``resume`` (`tc_attention_fold`), over one chunk of keys
    from a state carried in memory (`_state_functions`): masks at global positions, and
    the chunk's first tile rescales the carried state as every later tile does.
    """
    BM, BN, OVERLAP, TMA, PRODUCER = config.block_m, config.block_n, config.overlap, config.tma, config.producer
    NWG = BM // 64
    THREADS = 128 * NWG  # the consumers': the producer warpgroup (``config.producer``) comes after them
    BLOCK_THREADS = THREADS + (128 if PRODUCER else 0)
    K_STEP = 16
    DP = padded(head_dim, K_STEP)   # Q/K columns in shared memory (zero-filled past d)
    DVP = padded(value_dim, 16)     # V columns: whole 32-byte swizzle rows
    ESIZE = 2
    q_tile = TileLayout(BM, DP, ESIZE, 0)
    k_tile = TileLayout(BN, DP, ESIZE, q_tile.end)
    v_tile = TileLayout(BN, DVP, ESIZE, k_tile.end)
    SLOT = TileLayout(BN, DVP, ESIZE, v_tile.end).offset - k_tile.offset  # one ring slot: a K and a V tile
    SHARED_BYTES = k_tile.offset + STAGES * SLOT + TILE_ALIGN  # + slack to align the buffer at run time
    SLOT_ELEMS = SLOT // ESIZE
    if q_tile.width < K_STEP * ESIZE:
        raise ValueError(f"d={head_dim}: Q/K tile rows too narrow")

    _, load_q = tile_functions(q_tile, ESIZE, THREADS)
    _, load_k = tile_functions(k_tile, ESIZE, THREADS)
    _, load_v = tile_functions(v_tile, ESIZE, THREADS)
    _, load_k_warp = tile_functions(k_tile, ESIZE, 32)
    _, load_v_warp = tile_functions(v_tile, ESIZE, 32)
    mma_s = ptx.wgmma(kind, BN, "desc")
    # P·V in column chunks of at most 128 (one wgmma of N = 256 with 128 accumulators takes
    # ptxas minutes to schedule, two of N = 128 seconds); the second chunk starts on a column block
    N_O1 = min(DVP, 128)
    SPLIT_O = DVP > N_O1
    mma_o1 = ptx.wgmma(kind, N_O1, "regs", transpose_b=True)
    mma_o2 = ptx.wgmma(kind, DVP - N_O1, "regs", transpose_b=True, acc_offset=N_O1 // 2) if SPLIT_O else mma_o1
    wait_mma_all, wait_mma_but_one = ptx.wgmma_wait(0), ptx.wgmma_wait(1)
    wait_copies_all = ptx.cp_async_wait(0)
    Q_BITS, K_BITS, V_BITS = q_tile.k_major_bits(), k_tile.k_major_bits(), v_tile.mn_major_bits()
    QK_STEPS = DP // K_STEP
    PV_STEPS = BN // K_STEP
    # per K step: the start of Q's (warpgroup 0) and K's (slot 0) operand; the V operand of step j
    Q_STARTS = tuple(q_tile.k_major_start(0, s * K_STEP) for s in range(QK_STEPS))
    K_STARTS = tuple(k_tile.k_major_start(0, s * K_STEP) for s in range(QK_STEPS))
    V_STARTS = tuple(v_tile.mn_major_start(j * K_STEP) for j in range(PV_STEPS))
    WG_ROWS_BYTES = 64 * q_tile.width  # warpgroup wg's rows start 64 wg rows into every column block
    SLOT_UNITS = SLOT >> 4
    Q_DELTAS = tuple(np.uint64((x - Q_STARTS[0]) >> 4) for x in Q_STARTS)
    K_DELTAS = tuple(np.uint64((x - K_STARTS[0]) >> 4) for x in K_STARTS)
    V_DELTAS = tuple(np.uint64((x - V_STARTS[0]) >> 4) for x in V_STARTS)
    V_CHUNK2 = np.uint64((N_O1 * ESIZE // v_tile.width) * v_tile.block_bytes >> 4)
    NS, NO, NP = BN // 2, DVP // 2, BN // 4
    MAX_REGISTERS = min(255, 65536 // (BLOCK_THREADS * config.blocks_per_sm) // 8 * 8)
    # the producer's loop spills at 24 and 32 registers (ptxas, sm_90a); the consumers share the rest of
    # what the launch gave the block: 232 a thread for two warpgroups, 152 for three
    PRODUCER_REGISTERS = 40
    CONSUMER_REGISTERS = (BLOCK_THREADS * MAX_REGISTERS - 128 * PRODUCER_REGISTERS) // THREADS // 8 * 8
    SMEM_TYPE = from_dtype(np.dtype(np.uint16))
    softmax, online_update, rescale, empty_rows = _row_functions(BN, DVP)
    block_start = block_functions(BM, BN, ESIZE, SMEM_TYPE, Q_STARTS[0], K_STARTS[0], V_STARTS[0], Q_BITS, K_BITS,
                                  V_BITS, WG_ROWS_BYTES, resume)
    RESUME = resume
    JIT = {} if SIMULATOR else {"max_registers": MAX_REGISTERS}

    pack_p, store_rows = _half_fragments(kind, BN, DVP)
    load_state, store_state = _state_functions(DVP)

    @cuda.jit(device=True, inline="always")
    def start(q, k, key_lengths, causal, group, row_offset, nq_total, key_offset):
        if RESUME:
            return block_start(q, key_lengths, causal, group, row_offset, nq_total, key_offset, k.shape[2])
        return block_start(q, key_lengths, causal, group)

    @cuda.jit(device=True, inline="always")
    def load_tile(smem, base, k, v, b, kvh, j, nk_b, tid):
        slot = base + ring_slot(j) * SLOT_ELEMS
        load_k(smem, slot, k, b, kvh, j * BN, nk_b, k.shape[3], tid)
        load_v(smem, slot, v, b, kvh, j * BN, nk_b, v.shape[3], tid)

    @cuda.jit(device=True, inline="always")
    def issue_pv(smem, acc_o, p_regs, v_desc, j):
        slot = uint64(ring_slot(j) * SLOT_UNITS)
        for s in range(PV_STEPS):
            desc = v_desc + slot + V_DELTAS[s]
            mma_o1(acc_o, p_regs, 4 * s, desc, 1, smem)
            if SPLIT_O:
                mma_o2(acc_o, p_regs, 4 * s, desc + V_CHUNK2, 1, smem)

    # mbarriers after the ring, 8 bytes each: full[s] (the slot's tile has landed) and, in the
    # ping-pong schedule, empty[s] (every consumer warpgroup is done with it)
    BAR_OFFSET = padded(k_tile.offset + STAGES * SLOT, 8)
    PINGPONG_SHARED_BYTES = BAR_OFFSET + 2 * STAGES * 8 + TILE_ALIGN
    FULL0, EMPTY0, BAR_STRIDE = BAR_OFFSET // ESIZE, BAR_OFFSET // ESIZE + STAGES * 8 // ESIZE, 8 // ESIZE
    if TMA and not config.pingpong:
        SHARED_BYTES = BAR_OFFSET + STAGES * 8 + TILE_ALIGN

    K_COPY0, V_COPY0 = k_tile.offset // ESIZE, v_tile.offset // ESIZE
    K_BLOCK_ELEMS, V_BLOCK_ELEMS = k_tile.block_bytes // ESIZE, v_tile.block_bytes // ESIZE
    K_BOX_COLS, V_BOX_COLS = k_tile.width // ESIZE, v_tile.width // ESIZE
    K_BLOCKS, V_BLOCKS = k_tile.blocks, v_tile.blocks
    TILE_TX = BN * (k_tile.nbytes // k_tile.rows + v_tile.nbytes // v_tile.rows)  # a K and a V box per column block

    @cuda.jit(device=True, inline="always")
    def whole_tile(t, nk_b):
        """Whether key tile t lies below the key length (TMA fills it; the one across goes by cp.async)."""
        return (t + 1) * BN <= nk_b

    @cuda.jit(device=True, inline="always")
    def tma_tile(smem, base, k, k_map, v_map, b, kvh, t, full):
        """Thread 0: tile t of K and V into its slot by TMA, their bytes expected on ``full``; the
        maps view k and v as rows of (b, kv head, key), so tile t of a head is one box a column block."""
        ptx.mbarrier_expect_tx(smem, full, TILE_TX)
        slot = base + ring_slot(t) * SLOT_ELEMS
        row = (b * k.shape[1] + kvh) * k.shape[2] + t * BN
        for c in range(K_BLOCKS):
            ptx.cp_async_bulk_tensor_2d(smem, slot + K_COPY0 + c * K_BLOCK_ELEMS, k_map, c * K_BOX_COLS, row, smem,
                                        full)
        for c in range(V_BLOCKS):
            ptx.cp_async_bulk_tensor_2d(smem, slot + V_COPY0 + c * V_BLOCK_ELEMS, v_map, c * V_BOX_COLS, row, smem,
                                        full)

    issue_qk, issue_tile, ring_start, ring_step = _ring_functions(
        SLOT_UNITS, mma_s, Q_DELTAS, K_DELTAS, load_q, load_tile, issue_pv,
        (tma_tile, whole_tile, FULL0, BAR_STRIDE) if TMA else None)

    @cuda.jit(device=True, inline="always")
    def start_rows(acc_state, lse, l_state, b, h, r0, nq, tq, acc_o, first):
        """The rows' state at a launch's start: empty, or in the resume entry past its first launch the
        carried one."""
        m0, m1, l0, l1 = empty_rows(acc_o)
        if RESUME and not first:
            m0, m1, l0, l1 = load_state(acc_state, lse, l_state, b, h, r0, nq, tq, acc_o)
        return m0, m1, l0, l1

    @cuda.jit(device=True, inline="always")
    def first_tile_sums(acc_o, l0, l1, alpha0, alpha1, ps0, ps1):
        """The row sums after a launch's first tile: P's alone in one launch; in the resume entry the
        carried state rescaled as every later tile rescales it (a fresh state gives the same bits:
        alpha = 2^-inf = 0, l = 0·0 + ps and acc = 0·0)."""
        if RESUME:
            rescale(acc_o, alpha0, alpha1)
            return l0 * alpha0 + ps0, l1 * alpha1 + ps1
        return ps0, ps1

    @cuda.jit(device=True, inline="always")
    def finish(o, lse, acc_state, l_state, b, h, r0, nq, tq, tid, acc_o, l0, l1, m0, m1, last):
        if RESUME:
            if last:
                store_rows(o, lse, b, h, r0, nq, tq, tid, acc_o, l0, l1, m0, m1)
            else:
                store_state(acc_state, lse, l_state, b, h, r0, nq, tq, acc_o, l0, l1, m0, m1)
        else:
            store_rows(o, lse, b, h, r0, nq, tq, tid, acc_o, l0, l1, m0, m1)

    def kernel_entry(body):
        """The kernel around a schedule's body: one launch, or (``resume``) the resume entry; with
        ``config.tma`` each takes the tensor maps of k and v last (`tma.tensor_map` buffers)."""
        if RESUME and TMA:
            @cuda.jit(**JIT)
            def tc_attention_resume_tma(q, k, v, key_lengths, o, lse, qk_scale_log2, causal, group, acc_state,
                                        l_state, row_offset, nq_total, key_offset, first, last, k_map, v_map):
                body(q, k, v, key_lengths, o, lse, qk_scale_log2, causal, group, acc_state, l_state, row_offset,
                     nq_total, key_offset, first, last, k_map, v_map)

            return tc_attention_resume_tma

        if RESUME:
            @cuda.jit(**JIT)
            def tc_attention_resume(q, k, v, key_lengths, o, lse, qk_scale_log2, causal, group, acc_state, l_state,
                                    row_offset, nq_total, key_offset, first, last):
                body(q, k, v, key_lengths, o, lse, qk_scale_log2, causal, group, acc_state, l_state, row_offset,
                     nq_total, key_offset, first, last, lse, lse)

            return tc_attention_resume

        if TMA:
            @cuda.jit(**JIT)
            def tc_attention_tma(q, k, v, key_lengths, o, lse, qk_scale_log2, causal, group, k_map, v_map):
                body(q, k, v, key_lengths, o, lse, qk_scale_log2, causal, group, lse, lse, 0, 0, 0, True, True, k_map,
                     v_map)

            return tc_attention_tma

        @cuda.jit(**JIT)
        def tc_attention_fwd(q, k, v, key_lengths, o, lse, qk_scale_log2, causal, group):
            body(q, k, v, key_lengths, o, lse, qk_scale_log2, causal, group, lse, lse, 0, 0, 0, True, True, lse, lse)

        return tc_attention_fwd

    @cuda.jit(device=True, inline="always")
    def plain(q, k, v, key_lengths, o, lse, qk_scale_log2, causal, group, acc_state, l_state, row_offset, nq_total,
              key_offset, first, last, k_map, v_map):
        (tid, _wg, tq, b, h, kvh, nq, row0, nk_b, smem, base, q_desc, k_desc, v_desc, r0, kv_end0, kv_end1,
         block_kv_min, n_tiles) = start(q, k, key_lengths, causal, group, row_offset, nq_total, key_offset)

        acc_s = cuda.local.array(NS, np.float32)
        acc_o = cuda.local.array(NO, np.float32)
        p_regs = cuda.local.array(NP, np.uint32)
        m0, m1, l0, l1 = start_rows(acc_state, lse, l_state, b, h, r0, nq, tq, acc_o, first)

        # prologue: S_0 and its softmax
        ring_start(smem, base, q, k, v, b, h, kvh, row0, nq, q.shape[3], nk_b, tid, acc_s, q_desc, k_desc, n_tiles,
                   k_map, v_map)
        if n_tiles > 0:
            m0, m1, alpha0, alpha1, ps0, ps1 = softmax(acc_s, key_offset, key_offset + BN > block_kv_min, kv_end0,
                                                       kv_end1, m0, m1, tq, tid, qk_scale_log2)
            l0, l1 = first_tile_sums(acc_o, l0, l1, alpha0, alpha1, ps0, ps1)
            pack_p(acc_s, p_regs)

        for j in range(n_tiles):
            more = ring_step(smem, base, k, v, b, kvh, nk_b, tid, acc_s, acc_o, p_regs, q_desc, k_desc, v_desc, j,
                             n_tiles, k_map, v_map)
            if more:
                if OVERLAP:
                    wait_mma_but_one()  # S_{j+1} is done; P_j V_j may still run during the softmax
                else:
                    wait_mma_all()
                tile_start = key_offset + (j + 1) * BN
                m0, m1, l0, l1, alpha0, alpha1 = online_update(acc_s, tile_start, tile_start + BN > block_kv_min,
                                                               kv_end0, kv_end1, m0, m1, l0, l1, tq, tid, qk_scale_log2)
            wait_mma_all()  # O += P_j V_j is done: acc_o and p_regs are free
            if more:
                rescale(acc_o, alpha0, alpha1)
                pack_p(acc_s, p_regs)

        finish(o, lse, acc_state, l_state, b, h, r0, nq, tq, tid, acc_o, l0, l1, m0, m1, last)

    if not config.pingpong:
        return kernel_entry(plain), SHARED_BYTES

    # named barrier TURN + wg is warpgroup wg's turn (0 is syncthreads); its threads are the warpgroup
    # that hands the turn over (arrives) and the one that takes it (syncs)
    TURN, TURN_THREADS = 1, 2 * 128
    Q_LANDED = TURN + NWG  # named barrier of the consumers (producer schedule): every part of Q has landed
    FULL_ARRIVALS = 32 if PRODUCER else THREADS  # the producer warp's, or every consumer's
    producer_registers = ptx.setmaxnreg("dec", PRODUCER_REGISTERS) if PRODUCER else None
    consumer_registers = ptx.setmaxnreg("inc", CONSUMER_REGISTERS) if PRODUCER else None

    @cuda.jit(device=True, inline="always")
    def wait_free(smem, empty0, t):
        """Wait until the consumers released tile t - STAGES, the last one in tile t's slot."""
        if t >= STAGES:
            ptx.mbarrier_wait(smem, empty0 + ring_slot(t) * BAR_STRIDE, ring_parity(t) ^ 1)

    @cuda.jit(device=True, inline="always")
    def produce(smem, base, k, v, k_map, v_map, b, kvh, nk_b, lane, n_tiles, full0, empty0):
        """The producer warp (``config.producer``): tile t into slot t % STAGES once the consumers
        released its tile t - STAGES, a whole tile by TMA from lane 0 and one across the key length by
        the warp's zero-filling cp.async; each lane arrives once a fill (the full mbarrier's 32)."""
        if lane == 0:
            ptx.tensormap_acquire(k_map)
            ptx.tensormap_acquire(v_map)
        for t in range(n_tiles):
            full = full0 + ring_slot(t) * BAR_STRIDE
            wait_free(smem, empty0, t)
            if whole_tile(t, nk_b):
                if lane == 0:
                    tma_tile(smem, base, k, k_map, v_map, b, kvh, t, full)
                ptx.mbarrier_arrive(smem, full)
            else:
                slot = base + ring_slot(t) * SLOT_ELEMS
                load_k_warp(smem, slot, k, b, kvh, t * BN, nk_b, k.shape[3], lane)
                load_v_warp(smem, slot, v, b, kvh, t * BN, nk_b, v.shape[3], lane)
                ptx.cp_async_mbarrier_arrive(smem, full)
        ptx.cp_async_commit()
        wait_copies_all()  # nothing of this warp's left in flight when it exits

    if TMA:
        @cuda.jit(device=True, inline="always")
        def fill(smem, base, k, v, k_map, v_map, b, kvh, t, nk_b, tid, full0, empty0):
            """Tile t into slot t % STAGES once every warpgroup released its tile t - STAGES (empty
            mbarrier), then this thread's one arrival at the slot's full mbarrier, which also waits
            for its cp.async copies before it (Q, with tile 0). A whole tile by TMA from thread 0; a
            tile past the key length by every thread's zero-filling cp.async.

            Every thread waits for the empty slot, though only thread 0 writes it by TMA: a wait
            loop on thread 0 alone is a divergent path, on which ptxas serializes every wgmma of the
            kernel ("program dependence on compiler-inserted WG.AR in divergent path"; measured on
            the H200 at d = 128: 2.68 ms against the cp.async ring's 2.48, one wgmma wait each)."""
            full = full0 + ring_slot(t) * BAR_STRIDE
            wait_free(smem, empty0, t)
            if whole_tile(t, nk_b):
                if tid == 0:
                    tma_tile(smem, base, k, k_map, v_map, b, kvh, t, full)
            else:
                load_tile(smem, base, k, v, b, kvh, t, nk_b, tid)
            ptx.cp_async_mbarrier_arrive(smem, full)
    else:
        @cuda.jit(device=True, inline="always")
        def fill(smem, base, k, v, k_map, v_map, b, kvh, t, nk_b, tid, full0, empty0):
            wait_free(smem, empty0, t)
            load_tile(smem, base, k, v, b, kvh, t, nk_b, tid)
            ptx.cp_async_mbarrier_arrive(smem, full0 + ring_slot(t) * BAR_STRIDE)

    @cuda.jit(device=True, inline="always")
    def turn(smem, base, k, v, k_map, v_map, b, kvh, tid, wg, next_wg, acc_s, acc_o, p_regs, q_desc, k_desc, v_desc,
             j, more, ring, rows, state):
        """Tile j of the ping-pong schedule (`pingpong`), ``more``: tile j + 1 exists; ``ring`` = (full0,
        empty0, n_tiles, nk_b), ``rows`` = (key_offset, block_kv_min, kv_end0, kv_end1, tq,
        qk_scale_log2), ``state`` = the rows' running (m0, m1, l0, l1), which it returns updated (a
        call of more than 30 arguments is one of *args to numba, which cannot inline it). With
        ``config.overlap`` the softmax of tile j + 1 runs while P_j V_j is still on the tensor cores
        (FlashAttention-3's intra-warpgroup overlap, besides the turns)."""
        full0, empty0, n_tiles, nk_b = ring
        key_offset, block_kv_min, kv_end0, kv_end1, tq, qk_scale_log2 = rows
        m0, m1, l0, l1 = state
        # refill the slot of tile j - 1 with tile j + 2 once every warpgroup released it; here, not
        # while products are in flight, where a wait loop would make ptxas serialize every wgmma (C7520)
        if not PRODUCER and j + 2 < n_tiles:
            fill(smem, base, k, v, k_map, v_map, b, kvh, j + 2, nk_b, tid, full0, empty0)
        if more:
            ptx.mbarrier_wait(smem, full0 + ring_slot(j + 1) * BAR_STRIDE, ring_parity(j + 1))
            ptx.fence_proxy_async()
        ptx.named_barrier_sync(TURN + wg, TURN_THREADS)  # this warpgroup's turn on the tensor cores
        issue_tile(smem, acc_s, acc_o, p_regs, q_desc, k_desc, v_desc, j, more)
        ptx.named_barrier_arrive(TURN + next_wg, TURN_THREADS)  # the next warpgroup's turn
        tile_start = key_offset + (j + 1) * BN
        if OVERLAP and more:
            wait_mma_but_one()  # S_{j+1} is done; P_j V_j may still run during the softmax
            m0, m1, l0, l1, alpha0, alpha1 = online_update(acc_s, tile_start, tile_start + BN > block_kv_min, kv_end0,
                                                           kv_end1, m0, m1, l0, l1, tq, tid, qk_scale_log2)
            wait_mma_all()
            ptx.mbarrier_arrive(smem, empty0 + ring_slot(j) * BAR_STRIDE)  # tile j's slot is free
        else:
            wait_mma_all()  # S_{j+1} and O += P_j V_j are done: tile j's slot is free here
            ptx.mbarrier_arrive(smem, empty0 + ring_slot(j) * BAR_STRIDE)
            if more:
                m0, m1, l0, l1, alpha0, alpha1 = online_update(acc_s, tile_start, tile_start + BN > block_kv_min,
                                                               kv_end0, kv_end1, m0, m1, l0, l1, tq, tid,
                                                               qk_scale_log2)
        if more:
            rescale(acc_o, alpha0, alpha1)
            pack_p(acc_s, p_regs)
        return m0, m1, l0, l1

    @cuda.jit(device=True, inline="always")
    def pingpong(q, k, v, key_lengths, o, lse, qk_scale_log2, causal, group, acc_state, l_state, row_offset, nq_total,
                 key_offset, first, last, k_map, v_map):
        """The same tiles and arithmetic as `tc_attention_fwd`, so the same bits; only the order
        in which the warpgroups reach the tensor cores, and how slots are handed over, differ.

        Per tile j, warpgroup wg refills the slot of tile j - 1 with tile j + 2 once every
        warpgroup has released it (empty mbarrier), waits for tile j + 1 (full mbarrier) and for
        its turn (named barrier TURN + wg), issues S_{j+1} and P_j V_j, passes the turn on to
        warpgroup (wg + 1) % NWG, waits for its products, releases tile j's slot and computes the
        softmax of tile j + 1 while the other warpgroups' products run. Each warpgroup arrives once
        after every turn, so the turns go round and every arrival is consumed. A slot's full
        mbarrier completes when every thread's copies into it have landed (cp.async arrivals);
        tile t is the (t // 3)-th fill of slot t % 3, so phases are waited by the parity of t // 3.

        With ``config.producer`` the consumers load Q alone and never refill: the producer warp
        (`produce`) fills every slot, and a full mbarrier counts its 32 lanes.
        """
        (tid, wg, tq, b, h, kvh, nq, row0, nk_b, smem, base, q_desc, k_desc, v_desc, r0, kv_end0, kv_end1,
         block_kv_min, n_tiles) = start(q, k, key_lengths, causal, group, row_offset, nq_total, key_offset)
        full0 = base + FULL0
        empty0 = base + EMPTY0
        next_wg = (wg + 1) % NWG

        acc_s = cuda.local.array(NS, np.float32)
        acc_o = cuda.local.array(NO, np.float32)
        p_regs = cuda.local.array(NP, np.uint32)
        m0, m1, l0, l1 = start_rows(acc_state, lse, l_state, b, h, r0, nq, tq, acc_o, first)

        if n_tiles > 0:
            if tid == 0:
                for slot in range(STAGES):
                    ptx.mbarrier_init(smem, full0 + slot * BAR_STRIDE, FULL_ARRIVALS)
                    ptx.mbarrier_init(smem, empty0 + slot * BAR_STRIDE, THREADS)
            cuda.syncthreads()  # the mbarriers are set before anyone arrives at them
        if PRODUCER:
            if wg == NWG:
                producer_registers()
                if n_tiles > 0 and tid < THREADS + 32:
                    produce(smem, base, k, v, k_map, v_map, b, kvh, nk_b, tid - THREADS, n_tiles, full0, empty0)
                return
            consumer_registers()
        if n_tiles > 0:
            load_q(smem, base, q, b, h, row0, nq, q.shape[3], tid)
            if PRODUCER:
                ptx.cp_async_commit()  # a group wait covers committed copies only
                wait_copies_all()
                ptx.fence_proxy_async()  # the tensor cores read what cp.async wrote
                ptx.named_barrier_sync(Q_LANDED, THREADS)  # every consumer's part of Q has landed
            else:
                if TMA and tid == 0:
                    ptx.tensormap_acquire(k_map)
                    ptx.tensormap_acquire(v_map)
                # Q rides with tile 0: a thread's arrival covers all its earlier copies
                fill(smem, base, k, v, k_map, v_map, b, kvh, 0, nk_b, tid, full0, empty0)
                if n_tiles > 1:
                    fill(smem, base, k, v, k_map, v_map, b, kvh, 1, nk_b, tid, full0, empty0)
            if wg == NWG - 1:
                ptx.named_barrier_arrive(TURN, TURN_THREADS)  # warpgroup 0 takes the first turn

            ptx.mbarrier_wait(smem, full0, 0)
            ptx.fence_proxy_async()  # the tensor cores read what the other threads' cp.async wrote
            ptx.named_barrier_sync(TURN + wg, TURN_THREADS)
            ptx.wgmma_fence()
            issue_qk(smem, acc_s, q_desc, k_desc, 0)
            ptx.wgmma_commit()
            ptx.named_barrier_arrive(TURN + next_wg, TURN_THREADS)
            wait_mma_all()
            m0, m1, alpha0, alpha1, ps0, ps1 = softmax(acc_s, key_offset, key_offset + BN > block_kv_min, kv_end0,
                                                       kv_end1, m0, m1, tq, tid, qk_scale_log2)
            l0, l1 = first_tile_sums(acc_o, l0, l1, alpha0, alpha1, ps0, ps1)
            pack_p(acc_s, p_regs)

            ring = (full0, empty0, n_tiles, nk_b)
            rows = (key_offset, block_kv_min, kv_end0, kv_end1, tq, qk_scale_log2)
            state = (m0, m1, l0, l1)
            if OVERLAP:
                # the last tile on its own, so that in the loop S_{j+1} is always issued: ptxas cannot
                # tell that a conditionally issued S is retired by the wait for all but one group, and
                # serializes every wgmma (C7514)
                for j in range(n_tiles - 1):
                    state = turn(smem, base, k, v, k_map, v_map, b, kvh, tid, wg, next_wg, acc_s, acc_o, p_regs,
                                 q_desc, k_desc, v_desc, j, True, ring, rows, state)
                state = turn(smem, base, k, v, k_map, v_map, b, kvh, tid, wg, next_wg, acc_s, acc_o, p_regs, q_desc,
                             k_desc, v_desc, n_tiles - 1, False, ring, rows, state)
            else:
                for j in range(n_tiles):
                    state = turn(smem, base, k, v, k_map, v_map, b, kvh, tid, wg, next_wg, acc_s, acc_o, p_regs,
                                 q_desc, k_desc, v_desc, j, j + 1 < n_tiles, ring, rows, state)
            m0, m1, l0, l1 = state
            if wg == 0:
                ptx.named_barrier_sync(TURN, TURN_THREADS)  # the last warpgroup's arrival after its last turn

        finish(o, lse, acc_state, l_state, b, h, r0, nq, tq, tid, acc_o, l0, l1, m0, m1, last)

    return kernel_entry(pingpong), PINGPONG_SHARED_BYTES


def _mma_sync_kernel(kind: str, head_dim: int, value_dim: int, config: TileConfig):
    """The float16/bfloat16 kernel on warp-level mma.sync m16n8k16: FlashAttention-2's structure,
    for GPUs without wgmma.

    Grid ``(ceil(Nq / BM), H, B)`` as the wgmma kernels; a block of BM / 16 warps, warp ``w``
    owning rows ``16 w .. 16 w + 15``. Two shared-memory slots take turns holding a K/V tile
    (the wgmma kernels' swizzled layouts, filled by cp.async): tile j + 1 lands while tile j is
    computed, and one block-wide barrier per tile both publishes it and frees the other slot::

        Q (BM x d) --ldmatrix, once--> Q fragments (16 x d per warp, registers)
        K_j (BN x d) --ldmatrix--> S = Q K_jᵀ (16 x BN per warp, registers)
                                   | mask, running max m, P = 2^(S·c - m), running sum l
                                   v (`_row_functions`, as the wgmma kernels)
        V_j (BN x dv) --ldmatrix.trans--> O += P V_j (16 x dv per warp, registers)

    The accumulators of two adjacent n8 chunks of S are the A fragment of one k16 step of P·V
    (`ptx` module docstring), so P is packed in place, never exchanged between lanes.

    A warp skips the tiles none of its rows sees (causal, key_lengths), which is exact: such a
    tile leaves a row's state bit for bit unchanged (p = 0, alpha = 1), so a row's bits depend
    neither on the block's other rows, nor on BM, the batch or how many rows are launched. The
    products and the softmax are the wgmma kernels' per element (k16 steps in order, the
    same code), so the simulator, whose products are exact float64 dot products, gives the
    wgmma kernel's bits at the same BN; on a GPU the two instructions accumulate in float32
    each their own way, and no bit agreement is claimed (both are held to the float64 budget).
    No atomics; the row sum is kept per thread and reduced over the quad once, at the end.
    """
    BM, BN = config.block_m, config.block_n
    THREADS = 2 * BM  # a warp per 16 rows
    ESIZE = 2
    DP = padded(head_dim, 16)   # Q/K columns in shared memory (zero-filled past d)
    DVP = padded(value_dim, 16)  # V columns: whole k16 steps of ldmatrix.trans
    q_tile = TileLayout(BM, DP, ESIZE, 0)
    k_tile = TileLayout(BN, DP, ESIZE, q_tile.end)
    v_tile = TileLayout(BN, DVP, ESIZE, k_tile.end)
    SLOT = v_tile.end - k_tile.offset  # one slot: a K and a V tile
    SHARED_BYTES = k_tile.offset + 2 * SLOT + TILE_ALIGN  # + slack to align the buffer at run time
    SLOT_ELEMS = SLOT // ESIZE
    q_chunk, load_q = tile_functions(q_tile, ESIZE, THREADS)
    k_chunk, load_k = tile_functions(k_tile, ESIZE, THREADS)
    v_chunk, load_v = tile_functions(v_tile, ESIZE, THREADS)
    # 16 rows further down a tile is 16 rows of bytes further: the swizzle repeats every 8 rows
    K_ROWS16 = 16 * k_tile.width // ESIZE
    V_ROWS16 = 16 * v_tile.width // ESIZE
    QK_STEPS, KEY_PAIRS, DV_PAIRS = DP // 16, BN // 16, DVP // 16
    # Q's fragments stay in registers up to d = 128; at d = 256 they would take 64 registers beside
    # O's 128 and spill (ptxas, sm_80), so there each K step reads its fragment from shared memory
    Q_IN_REGISTERS = DP <= 128
    NS, NO, NQ, NP = BN // 2, DVP // 2, DP // 4 if Q_IN_REGISTERS else 4, BN // 4
    MAX_REGISTERS = min(255, 65536 // THREADS // 8 * 8)
    block_origin = _block_origin(BM, ESIZE, from_dtype(np.dtype(np.uint16)))
    mma = ptx.mma_sync(kind)
    ldmatrix, ldmatrix_trans = ptx.ldmatrix_x4(False), ptx.ldmatrix_x4(True)
    wait_copies_all = ptx.cp_async_wait(0)
    _, online_update, rescale, empty_rows = _row_functions(BN, DVP)
    pack_p, store_rows = _half_fragments(kind, BN, DVP)

    @cuda.jit(device=True, inline="always")
    def load_tile(smem, base, k, v, b, kvh, j, nk_b, tid):
        slot = base + (j % 2) * SLOT_ELEMS
        load_k(smem, slot, k, b, kvh, j * BN, nk_b, k.shape[3], tid)
        load_v(smem, slot, v, b, kvh, j * BN, nk_b, v.shape[3], tid)

    @cuda.jit(device=True, inline="always")
    def load_q_step(smem, base, q_regs, at, s, w, mat, mrow):
        # warp w's A fragment of K step s: matrix `mat` is rows 8 (mat & 1), columns 16 s + 8 (mat >> 1)
        ldmatrix(q_regs, at, smem, base + q_chunk(16 * w + 8 * (mat & 1) + mrow, 2 * s + (mat >> 1)))

    @cuda.jit(**({} if SIMULATOR else {"max_registers": MAX_REGISTERS}))
    def tc_attention_mma_sync(q, k, v, key_lengths, o, lse, qk_scale_log2, causal, group):
        tid = cuda.threadIdx.x
        w = tid // 32
        lane = tid % 32
        g = lane // 4
        tq = lane % 4
        # ldmatrix.x4: this lane addresses row `mrow` of 8 x 8 matrix `mat` (its register `mat`)
        mat = lane // 8
        mrow = lane % 8
        b, h, kvh, nq, row0, nk_b, smem, _, base = block_origin(q, key_lengths, causal, group)

        warp_row0 = row0 + 16 * w
        r0 = warp_row0 + g  # this thread's two rows: r0 and r0 + 8
        kv_end0 = visible_keys(r0, nq, nk_b, causal)
        kv_end1 = visible_keys(r0 + 8, nq, nk_b, causal)
        block_kv_end = visible_keys(min(row0 + BM, nq) - 1, nq, nk_b, causal)  # causal: the last row sees most
        n_tiles = (block_kv_end + BN - 1) // BN
        warp_kv_end = visible_keys(min(warp_row0 + 15, nq - 1), nq, nk_b, causal) if warp_row0 < nq else 0
        warp_tiles = (warp_kv_end + BN - 1) // BN
        warp_kv_min = visible_keys(warp_row0, nq, nk_b, causal)  # tiles below it need no mask

        acc_s = cuda.local.array(NS, np.float32)
        acc_o = cuda.local.array(NO, np.float32)
        q_regs = cuda.local.array(NQ, np.uint32)
        p_regs = cuda.local.array(NP, np.uint32)
        b_regs = cuda.local.array(4, np.uint32)
        m0, m1, l0, l1 = empty_rows(acc_o)

        if n_tiles > 0:
            load_q(smem, base, q, b, h, row0, nq, q.shape[3], tid)
            load_tile(smem, base, k, v, b, kvh, 0, nk_b, tid)
            ptx.cp_async_commit()
            wait_copies_all()
            cuda.syncthreads()  # Q and tile 0 are in shared memory
            if Q_IN_REGISTERS:
                for s in range(QK_STEPS):
                    load_q_step(smem, base, q_regs, 4 * s, s, w, mat, mrow)

        for j in range(n_tiles):
            slot = base + (j % 2) * SLOT_ELEMS
            if j + 1 < n_tiles:
                # into the other slot, which every warp left at the end of iteration j - 1
                load_tile(smem, base, k, v, b, kvh, j + 1, nk_b, tid)
                ptx.cp_async_commit()
            if j < warp_tiles:  # the same for the whole warp, as mma.sync needs
                for i in range(NS):
                    acc_s[i] = F32_ZERO
                # S = Q K_jᵀ, K step s, keys 16 n ...: matrix `mat` is keys 8 (mat >> 1), columns
                # 16 s + 8 (mat & 1); registers (0, 1) are the B fragment of keys 16 n .. 16 n + 7, (2, 3) of the next 8
                for s in range(QK_STEPS):
                    if not Q_IN_REGISTERS:
                        load_q_step(smem, base, q_regs, 0, s, w, mat, mrow)
                    q_at = 4 * s if Q_IN_REGISTERS else 0
                    for n in range(KEY_PAIRS):
                        ldmatrix(b_regs, 0, smem, slot + k_chunk(8 * (mat >> 1) + mrow, 2 * s + (mat & 1)) + n * K_ROWS16)
                        mma(acc_s, 8 * n, q_regs, q_at, b_regs, 0)
                        mma(acc_s, 8 * n + 4, q_regs, q_at, b_regs, 2)
                tile_start = j * BN
                m0, m1, l0, l1, alpha0, alpha1 = online_update(acc_s, tile_start, tile_start + BN > warp_kv_min,
                                                               kv_end0, kv_end1, m0, m1, l0, l1, tq, tid, qk_scale_log2)
                rescale(acc_o, alpha0, alpha1)
                pack_p(acc_s, p_regs)
                # O += P V_j, keys 16 s ...: V is stored keys x dv, so ldmatrix.trans; matrix `mat` is
                # keys 8 (mat & 1), columns 16 n + 8 (mat >> 1)
                for s in range(KEY_PAIRS):
                    for n in range(DV_PAIRS):
                        ldmatrix_trans(b_regs, 0, smem,
                                       slot + v_chunk(8 * (mat & 1) + mrow, 2 * n + (mat >> 1)) + s * V_ROWS16)
                        mma(acc_o, 8 * n, p_regs, 4 * s, b_regs, 0)
                        mma(acc_o, 8 * n + 4, p_regs, 4 * s, b_regs, 2)
            wait_copies_all()
            cuda.syncthreads()  # tile j + 1 has landed for every thread; every warp is done with tile j's slot

        store_rows(o, lse, b, h, r0, nq, tq, tid, acc_o, l0, l1, m0, m1)

    return tc_attention_mma_sync, SHARED_BYTES


def _float32_kernel(kind: str, head_dim: int, value_dim: int, config: TileConfig):
    """The float32 kernel on tf32 tensor cores (3xTF32 or TF32).

    Grid and rows as the half kernel; one 64-row warpgroup per 64 rows. A K/V tile is
    read with ordinary loads, split (``hi = tf32(x)``, ``lo = x - hi``) and stored into
    swizzled K-major tiles, V transposed::

        Q_hi, Q_lo (BM x d)  K_hi, K_lo (BN x d)      Vᵀ_hi, Vᵀ_lo (dv x BN, keys permuted)
              +----- wgmma SS: S = Q_lo K_hiᵀ + Q_hi K_loᵀ + Q_hi K_hiᵀ -----+
                                   | softmax (as the half kernel), P = P_hi + P_lo
                                   v
                 O += P_lo Vᵀ_hiᵀ + P_hi Vᵀ_loᵀ + P_hi Vᵀ_hiᵀ   (wgmma RS)

    The tf32 A fragment holds columns (tq, tq + 4) where the accumulator holds
    (2tq, 2tq + 1); instead of exchanging registers, the keys of every 8-key group of
    Vᵀ are stored in the order (0, 2, 4, 6, 1, 3, 5, 7), which is the same sum.
    The small terms go first, so they are not rounded away against the large one.
    """
    SPLIT = kind == "tf32x3"
    BM, BN = config.block_m, config.block_n
    NWG = BM // 64
    THREADS = 128 * NWG
    K_STEP = 8
    ESIZE = 4
    DP = padded(head_dim, K_STEP)
    DVP = padded(value_dim, K_STEP)
    q_hi = TileLayout(BM, DP, ESIZE, 0)
    q_lo = TileLayout(BM, DP, ESIZE, q_hi.end)
    k_hi = TileLayout(BN, DP, ESIZE, q_lo.end if SPLIT else q_hi.end)
    k_lo = TileLayout(BN, DP, ESIZE, k_hi.end)
    vt_hi = TileLayout(DVP, BN, ESIZE, k_lo.end if SPLIT else k_hi.end)
    vt_lo = TileLayout(DVP, BN, ESIZE, vt_hi.end)
    SHARED_BYTES = (vt_lo.end if SPLIT else vt_hi.end) + TILE_ALIGN
    Q_LO, K_LO, V_LO = ((lo.offset - hi.offset) // ESIZE for hi, lo in ((q_hi, q_lo), (k_hi, k_lo), (vt_hi, vt_lo)))
    vt_chunk, _ = tile_functions(vt_hi, ESIZE, THREADS)
    _, online_update, rescale, empty_rows = _row_functions(BN, DVP)

    @cuda.jit(device=True, inline="always")
    def store_pair(o, b, h, row, col, x, y):
        o[b, h, row, col] = x
        o[b, h, row, col + 1] = y

    store_rows = _row_store(DVP, store_pair)
    mma_s = ptx.wgmma("tf32", BN, "desc")
    N_O1 = min(DVP, 128)  # as the half kernel: wgmmas of at most N = 128
    SPLIT_O = DVP > N_O1
    mma_o1 = ptx.wgmma("tf32", N_O1, "regs")
    mma_o2 = ptx.wgmma("tf32", DVP - N_O1, "regs", acc_offset=N_O1 // 2) if SPLIT_O else mma_o1
    wait_mma_all = ptx.wgmma_wait(0)
    QK_STEPS, PV_STEPS = DP // K_STEP, BN // K_STEP
    Q_DELTAS = tuple(np.uint64((q_hi.k_major_start(0, s * K_STEP) - q_hi.offset) >> 4) for s in range(QK_STEPS))
    K_DELTAS = tuple(np.uint64((k_hi.k_major_start(0, s * K_STEP) - k_hi.offset) >> 4) for s in range(QK_STEPS))
    V_DELTAS = tuple(np.uint64((vt_hi.k_major_start(0, s * K_STEP) - vt_hi.offset) >> 4) for s in range(PV_STEPS))
    V_CHUNK2 = np.uint64((vt_hi.k_major_start(N_O1, 0) - vt_hi.offset) >> 4)  # rows (head dims) N_O1 on
    Q_LO_UNITS, K_LO_UNITS, V_LO_UNITS = (np.uint64(x * ESIZE >> 4) for x in (Q_LO, K_LO, V_LO))
    NS, NO, NP = BN // 2, DVP // 2, BN // 2
    MAX_REGISTERS = min(255, 65536 // THREADS // 8 * 8)
    block_start = block_functions(BM, BN, ESIZE, from_dtype(np.dtype(np.float32)), q_hi.offset, k_hi.offset,
                                  vt_hi.offset, q_hi.k_major_bits(), k_hi.k_major_bits(), vt_hi.k_major_bits(),
                                  64 * q_hi.width, g_last=True)

    @cuda.jit(device=True, inline="always")
    def store_split(smem, idx, x, lo_delta):
        hi = ptx.round_tf32(x)
        smem[idx] = hi
        if SPLIT:
            # lo rounded too: the tensor cores would truncate its 13 significant bits to 11
            # (2^-22 |x|); rounded, hi + lo is within 2^-24 |x|, float32's own rounding
            smem[idx + lo_delta] = ptx.round_tf32(x - hi)

    def split_rows(layout, lo_delta):
        """``load_rows(smem, base, x, b, h, row0, nrows, tid)``: rows [row0, row0 + rows) of x[b, h] into
        ``layout``'s tile and its lo part ``lo_delta`` elements further (`store_split`), zeros past
        ``nrows`` and past x's columns."""
        ROWS, CPR = layout.rows, layout.chunks_per_row
        chunk_index, _ = tile_functions(layout, ESIZE, THREADS)

        @cuda.jit(device=True, inline="always")
        def load_rows(smem, base, x, b, h, row0, nrows, tid):
            for idx in range(tid, ROWS * CPR, THREADS):
                r = idx // CPR
                c = idx - r * CPR
                row = row0 + r
                dst = base + chunk_index(r, c)
                for e in range(4):
                    col = 4 * c + e
                    store_split(smem, dst + e, x[b, h, row, col] if row < nrows and col < x.shape[3] else F32_ZERO,
                                lo_delta)

        return load_rows

    load_q = split_rows(q_hi, Q_LO)
    load_k = split_rows(k_hi, K_LO)

    @cuda.jit(device=True, inline="always")
    def load_kv(smem, base, k, v, b, kvh, kv0, nk_b, tid):
        load_k(smem, base, k, b, kvh, kv0, nk_b, tid)
        # V transposed: consecutive threads read consecutive head dims of one key (coalesced)
        for idx in range(tid, BN * DVP, THREADS):
            j = idx // DVP
            c = idx - j * DVP
            key = kv0 + j
            kappa = (j & ~7) | ((j & 7) >> 1) | ((j & 1) << 2)  # key j's place in its permuted 8-group
            dst = base + vt_chunk(c, kappa // 4) + (kappa & 3)
            store_split(smem, dst, v[b, kvh, key, c] if key < nk_b and c < v.shape[3] else F32_ZERO, V_LO)

    @cuda.jit(device=True, inline="always")
    def split_p(acc_s, p_hi, p_lo):
        # register r of K step s: rows by r & 1, logical column tq + 4 (r >> 1) = accumulator
        # column 2 tq + (r >> 1) (the permutation of Vᵀ's keys)
        for s in range(PV_STEPS):
            for r in range(4):
                p = acc_s[4 * s + 2 * (r & 1) + (r >> 1)]
                hi = ptx.round_tf32(p)
                p_hi[4 * s + r] = hi
                p_lo[4 * s + r] = ptx.round_tf32(p - hi)

    @cuda.jit(device=True, inline="always")
    def issue_pv(smem, acc_o, p, v_desc, s):
        mma_o1(acc_o, p, 4 * s, v_desc, 1, smem)
        if SPLIT_O:
            mma_o2(acc_o, p, 4 * s, v_desc + V_CHUNK2, 1, smem)

    @cuda.jit(**({} if SIMULATOR else {"max_registers": MAX_REGISTERS}))
    def tc_attention_fwd(q, k, v, key_lengths, o, lse, qk_scale_log2, causal, group):
        (tid, _wg, tq, b, h, kvh, nq, row0, nk_b, smem, base, q_desc, k_desc, v_desc, r0, kv_end0, kv_end1,
         block_kv_min, n_tiles) = block_start(q, key_lengths, causal, group)

        acc_s = cuda.local.array(NS, np.float32)
        acc_o = cuda.local.array(NO, np.float32)
        p_hi = cuda.local.array(NP, np.float32)
        p_lo = cuda.local.array(NP, np.float32)
        m0, m1, l0, l1 = empty_rows(acc_o)

        load_q(smem, base, q, b, h, row0, nq, tid)
        for j in range(n_tiles):
            cuda.syncthreads()  # every warpgroup's products of tile j - 1 are done: its tiles may be overwritten
            load_kv(smem, base, k, v, b, kvh, j * BN, nk_b, tid)
            ptx.fence_proxy_async()  # ordinary stores, read next by the tensor cores
            cuda.syncthreads()  # tile j (and Q) are in shared memory

            ptx.wgmma_fence()
            for s in range(QK_STEPS):
                dq = q_desc + Q_DELTAS[s]
                dk = k_desc + K_DELTAS[s]
                if SPLIT:
                    mma_s(acc_s, dq + Q_LO_UNITS, dk, s, smem)
                    mma_s(acc_s, dq, dk + K_LO_UNITS, 1, smem)
                    mma_s(acc_s, dq, dk, 1, smem)
                else:
                    mma_s(acc_s, dq, dk, s, smem)
            ptx.wgmma_commit()
            wait_mma_all()

            tile_start = j * BN
            m0, m1, l0, l1, alpha0, alpha1 = online_update(acc_s, tile_start, tile_start + BN > block_kv_min, kv_end0,
                                                           kv_end1, m0, m1, l0, l1, tq, tid, qk_scale_log2)
            rescale(acc_o, alpha0, alpha1)
            split_p(acc_s, p_hi, p_lo)

            ptx.wgmma_fence()  # acc_o and the P fragments were written by ordinary instructions
            for s in range(PV_STEPS):
                dv_s = v_desc + V_DELTAS[s]
                if SPLIT:
                    issue_pv(smem, acc_o, p_lo, dv_s, s)
                    issue_pv(smem, acc_o, p_hi, dv_s + V_LO_UNITS, s)
                issue_pv(smem, acc_o, p_hi, dv_s, s)
            ptx.wgmma_commit()
            wait_mma_all()

        store_rows(o, lse, b, h, r0, nq, tq, tid, acc_o, l0, l1, m0, m1)

    return tc_attention_fwd, SHARED_BYTES


def launch_config(config: TileConfig, batch: int, heads: int, nq: int):
    """(grid, block): one block per BM query rows of one (b, h); a warp per 16 rows (a
    warpgroup per 64 for wgmma), and the producer warpgroup last (``config.producer``)."""
    return (math.ceil(nq / config.block_m), heads, batch), 2 * config.block_m + (128 if config.producer else 0)


def compute_capability() -> tuple[int, int]:
    """The current GPU's; the simulator runs every kernel, so it passes for a Hopper."""
    return (9, 0) if SIMULATOR else tuple(cuda.get_current_device().compute_capability)


def _runnable_config(kind: str, head_dim: int, value_dim: int, config: TileConfig | None) -> TileConfig:
    """``config``, or `default_config` for this GPU when None; RuntimeError naming why this GPU cannot run it."""
    capability = compute_capability()
    config = default_config(kind, head_dim, value_dim, capability) if config is None else config
    reasons = device_reasons(kind, capability, config)
    if reasons:
        raise RuntimeError("; ".join(reasons))
    return config


def _kv_maps(config: TileConfig, k, v, chosen: bool):
    """(config, the extra kernel arguments): with ``config.tma`` the TMA maps of k and v, boxes of one
    key tile by one column block of the kernel's K and V tiles. Arrays a map cannot describe (leading
    axes not collapsible into rows, an address or row stride off 16 bytes) raise ValueError when the
    caller ``chosen`` TMA, and otherwise run the cp.async ring, which reads the same bytes."""
    if not config.tma:
        return config, ()
    maps = []
    for array in (k, v):
        layout = TileLayout(config.block_n, padded(array.shape[3], 16), 2, 0)
        try:
            maps.append(tma.map_buffer(array, config.block_n, layout.width // 2, layout.width))
        except ValueError as error:
            if chosen:
                raise ValueError(f"{config}: {error}") from None
            return replace(config, tma=False, producer=False), ()
    return config, tuple(maps)


def tc_attention(q, k, v, key_lengths, *, causal: bool, scale: float, kind: str, out=None, lse=None, stream=0,
                 config: TileConfig | None = None):
    """Run the tensor-core kernel on device arrays; returns (O, lse).

    ``config=None`` takes `default_config` for this GPU: wgmma on Hopper, mma.sync on the other
    GPUs from sm_80 on (which take the half kinds only); ``TileConfig(..., mma_sync=True)``
    (`mma_sync_config`) forces the mma.sync kernel on Hopper too.

    q (B, H, Nq, d), k (B, Hkv, Nk, d), v (B, Hkv, Nk, dv): uint16 arrays of f16/bf16 patterns
    for the half kinds (their last dim contiguous, rows 16-byte aligned: cp.async), float32
    for the tf32 kinds. O (B, H, Nq, dv) in the inputs' type, lse (B, H, Nq) float32.
    `key_lengths` is an int32 device array of B lengths.
    """
    batch, heads, nq, head_dim = q.shape
    value_dim = v.shape[3]
    chosen = config is not None
    config = _runnable_config(kind, head_dim, value_dim, config)
    config, maps = _kv_maps(config, k, v, chosen)
    if out is None:
        out_dtype = np.uint16 if kind in HALF_KINDS else np.float32
        out = cuda.device_array((batch, heads, nq, value_dim), dtype=out_dtype, stream=stream)
    if lse is None:
        lse = cuda.device_array((batch, heads, nq), dtype=np.float32, stream=stream)
    kernel, shared_bytes = tc_attention_kernel(kind, head_dim, value_dim, config)
    grid, block = launch_config(config, batch, heads, nq)
    launch_with_shared_memory(
        kernel, grid, block, shared_bytes, stream,
        q, k, v, key_lengths, out, lse, np.float32(scale * LOG2E), bool(causal), heads // k.shape[1], *maps,
    )
    return out, lse


def tc_attention_fold(q, k, v, key_lengths, out, lse, acc_state, l_state, *, causal: bool, scale: float, kind: str,
                      row_offset: int, nq_total: int, key_offset: int, first: bool, last: bool, stream=0,
                      config: TileConfig | None = None):
    """Fold one chunk of keys into the carried state of a run of query rows: the resume entry of the
    wgmma half kernels (`exact_attention_fold`'s counterpart; both schedules).

    q holds global query rows ``[row_offset, row_offset + q.shape[2])`` of ``nq_total``; k and v hold
    global keys ``[key_offset, key_offset + k.shape[2])``; `key_lengths` (int32, B) counts global
    keys. Between calls ``acc_state`` (float32, B x H x Nq x dv) holds the unnormalised accumulator,
    lse the running max and ``l_state`` (float32, B x H x Nq x 4) the row sums by quad lane;
    ``first`` starts from an empty state, ``last`` writes O (the input's type) and lse as
    `tc_attention` returns them. Folding every chunk the rows see, in key order, each starting on a
    multiple of the key tile ``config.block_n``, with the config of the one-launch call, gives
    `tc_attention`'s bits for these rows. Inputs are assumed validated.
    """
    batch, heads, nq, head_dim = q.shape
    chosen = config is not None
    config = _runnable_config(kind, head_dim, v.shape[3], config)
    config, maps = _kv_maps(config, k, v, chosen)
    if key_offset % config.block_n:
        raise ValueError(f"a key chunk must start on a key tile: key_offset {key_offset} is not a multiple of "
                         f"{config.block_n}")
    kernel, shared_bytes = tc_attention_kernel(kind, head_dim, v.shape[3], config, resume=True)
    grid, block = launch_config(config, batch, heads, nq)
    launch_with_shared_memory(
        kernel, grid, block, shared_bytes, stream,
        q, k, v, key_lengths, out, lse, np.float32(scale * LOG2E), bool(causal), heads // k.shape[1], acc_state,
        l_state, np.int64(row_offset), np.int64(nq_total), np.int64(key_offset), bool(first), bool(last), *maps,
    )
    return out, lse
