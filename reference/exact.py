"""float64 references for exact attention.

Two references, as for every algorithm in nkattn:

* `attention_ref` is the oracle: dense scores, explicit -inf masks, written to be
  obviously right.
* `streaming_attention_ref` is the mirror: the same function computed in exactly
  the order of operations of the fused CUDA kernel (key tiles of `block_n` in
  order, running max `m`, running sum `l`, rescaled accumulator, final
  ``O = acc / l`` and ``lse = m + log(l)``), with every step a single correctly
  rounded IEEE operation. The float64 kernel reproduces it to the bit.

Semantics (written once, here; every path follows them):

* q is (B, H, Nq, d); k and v are (B, Hkv, Nk, d) with H a multiple of Hkv.
  Query head h reads key/value head ``h // (H // Hkv)`` (grouped-query attention).
* ``key_lengths[b]`` (optional) makes keys ``j >= key_lengths[b]`` invisible in batch b.
* ``causal`` is bottom-right aligned, as in FlashAttention: with
  ``nk_b = key_lengths[b]`` (or Nk), query i sees key j iff ``j <= i + nk_b - Nq``.
* A query row with no visible key returns O = 0 and lse = -inf, never NaN.

Equivalent NumPy for one (b, h) with no mask::

    s = scale * q @ k.T
    p = np.exp(s - s.max(-1, keepdims=True))
    o = (p @ v) / p.sum(-1, keepdims=True)
    lse = s.max(-1) + np.log(np.exp(s - s.max(-1, keepdims=True)).sum(-1))
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SUPPORTED_HEAD_DIMS = (16, 32, 64, 128, 256)

# Threads per block of the exact kernel; part of the canonical order because the
# shared-memory budget that fixes `block_n` depends on it.
THREADS_PER_BLOCK = 128
SHARED_MEMORY_BUDGET = 48 * 1024


def visible_key_counts(batch: int, nq: int, nk: int, causal: bool, key_lengths=None) -> np.ndarray:
    """Number of visible keys of every query row, shape (batch, nq).

    Visibility is always a prefix ``[0, count)`` of the keys, which is what lets
    the kernels skip whole tiles.
    """
    nk_b = np.full(batch, nk, dtype=np.int64) if key_lengths is None else np.asarray(key_lengths, dtype=np.int64)
    counts = np.broadcast_to(nk_b[:, None], (batch, nq)).copy()
    if causal:
        rows = np.arange(nq, dtype=np.int64)[None, :]
        counts = np.minimum(counts, rows + 1 + nk_b[:, None] - nq)
    return np.clip(counts, 0, nk)


def _expand_kv_heads(x: np.ndarray, num_q_heads: int) -> np.ndarray:
    return np.repeat(x, num_q_heads // x.shape[1], axis=1)


def default_scale(head_dim: int) -> float:
    return 1.0 / float(np.sqrt(head_dim))


def attention_ref(q, k, v, *, causal=False, scale=None, key_lengths=None, compute_dtype=np.float64):
    """Oracle: dense attention. Returns (O, lse) in `compute_dtype`.

    float64 is the reference; ``compute_dtype=np.float32`` is the naive float32
    formula whose error sets a float32 kernel's error budget.
    """
    q = np.asarray(q, dtype=compute_dtype)
    k = _expand_kv_heads(np.asarray(k, dtype=compute_dtype), q.shape[1])
    v = _expand_kv_heads(np.asarray(v, dtype=compute_dtype), q.shape[1])
    batch, _, nq, head_dim = q.shape
    nk = k.shape[2]
    scale = q.dtype.type(default_scale(head_dim) if scale is None else scale)

    s = np.einsum("bhqd,bhkd->bhqk", q, k) * scale
    counts = visible_key_counts(batch, nq, nk, causal, key_lengths)
    visible = np.arange(nk)[None, None, None, :] < counts[:, None, :, None]
    s = np.where(visible, s, -np.inf)
    m = s.max(axis=-1, keepdims=True)
    has_keys = np.isfinite(m)
    zero, one = q.dtype.type(0), q.dtype.type(1)
    p = np.where(visible, np.exp(s - np.where(has_keys, m, zero)), zero)
    l = p.sum(axis=-1, keepdims=True)
    o = np.where(has_keys, (p @ v) / np.where(has_keys, l, one), zero)
    lse = np.where(has_keys, m + np.log(np.where(has_keys, l, one)), q.dtype.type(-np.inf))
    return o, lse[..., 0]


# --------------------------------------------------------------------------------------
# The canonical streaming order
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StreamingOrder:
    """The operation order shared by the exact kernel and its float64 mirror.

    A query row's dot product is split among `dot_split` threads; thread `part`
    owns the elements ``(c // vec) * vec * dot_split + part * vec + c % vec``, sums
    its products in increasing c (starting from the first product), and the partial sums are
    combined pairwise (a butterfly: ``x[0::2] + x[1::2]`` until one is left).
    Keys are visited in tiles of `block_n`.
    """

    block_n: int
    dot_split: int
    vec: int

    def elements_per_thread(self, head_dim: int) -> int:
        return head_dim // self.dot_split

    def block_m(self) -> int:
        return THREADS_PER_BLOCK // self.dot_split

    def owned_elements(self, head_dim: int) -> np.ndarray:
        """(dot_split, elements_per_thread) element indices owned by each part."""
        ept = self.elements_per_thread(head_dim)
        c = np.arange(ept)
        parts = np.arange(self.dot_split)[:, None]
        return (c // self.vec) * self.vec * self.dot_split + parts * self.vec + (c % self.vec)


def streaming_order(dtype, head_dim: int) -> StreamingOrder:
    """The canonical order for a dtype and head dim (see `StreamingOrder`).

    float32 threads hold 32 elements of q and of the accumulator, float64 threads
    16, so both stay in registers; the key tile is the largest power of two up to
    64 whose K, V and score tiles fit the static shared-memory budget.
    """
    dtype = np.dtype(dtype)
    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head dim must be one of {SUPPORTED_HEAD_DIMS}, got {head_dim}")
    per_thread = {np.dtype(np.float32): 32, np.dtype(np.float64): 16}[dtype]
    dot_split = max(1, head_dim // per_thread)
    vec = 16 // dtype.itemsize
    block_m = THREADS_PER_BLOCK // dot_split
    block_n = 64
    while (2 * head_dim + block_m) * block_n * dtype.itemsize > SHARED_MEMORY_BUDGET:
        block_n //= 2
    return StreamingOrder(block_n=block_n, dot_split=dot_split, vec=min(vec, head_dim // dot_split))


# Portable exp and log: built from +, *, /, floor and ldexp only, each correctly
# rounded in IEEE arithmetic, so NumPy and the GPU produce the same bits.
LOG2E = 1.4426950408889634
LN2_HI = 6.93147180369123816490e-01  # 32 trailing zero bits: n * LN2_HI is exact
LN2_LO = 1.90821492927058770002e-10
EXP_UNDERFLOW = -745.2
EXP_COEFFS = tuple(1.0 / float(np.prod(np.arange(1, i + 1, dtype=np.float64))) for i in range(13, -1, -1))
LOG_COEFFS = tuple(2.0 / (2 * i + 1) for i in range(11, -1, -1))
SQRT_HALF = 0.7071067811865476


def exp_nonpositive(x: np.ndarray) -> np.ndarray:
    """exp(x) for x <= 0 (-inf included), the kernel's float64 exp."""
    x = np.asarray(x, dtype=np.float64)
    live = x >= EXP_UNDERFLOW
    xs = np.where(live, x, 0.0)
    n = np.floor(xs * LOG2E + 0.5)
    r = (xs - n * LN2_HI) - n * LN2_LO
    p = np.full_like(r, EXP_COEFFS[0])
    for c in EXP_COEFFS[1:]:
        p = p * r + c
    return np.where(live, np.ldexp(p, n.astype(np.int64)), 0.0)


def log_positive(x: np.ndarray) -> np.ndarray:
    """log(x) for finite x > 0, the kernel's float64 log."""
    f, e = np.frexp(np.asarray(x, dtype=np.float64))
    small = f < SQRT_HALF
    f = np.where(small, f * 2.0, f)
    e = (e - small).astype(np.float64)
    s = (f - 1.0) / (f + 1.0)
    z = s * s
    t = np.full_like(z, LOG_COEFFS[0])
    for c in LOG_COEFFS[1:]:
        t = t * z + c
    return e * LN2_HI + (e * LN2_LO + t * s)


def _canonical_scores(q_parts, k_parts, scale):
    """Scores of every query against one key in the canonical dot order.

    q_parts (..., split, ept), k_parts (..., split, ept) broadcastable.
    """
    partial = q_parts[..., 0] * k_parts[..., 0]
    for c in range(1, q_parts.shape[-1]):
        partial = partial + q_parts[..., c] * k_parts[..., c]
    while partial.shape[-1] > 1:
        partial = partial[..., 0::2] + partial[..., 1::2]
    return partial[..., 0] * scale


def streaming_attention_ref(q, k, v, *, causal=False, scale=None, key_lengths=None, order=None):
    """Mirror: float64 attention in the kernel's exact operation order.

    `order` defaults to ``streaming_order(float64, d)``, the float64 kernel's.
    Returns (O, lse) as float64.
    """
    q = np.asarray(q, dtype=np.float64)
    k = _expand_kv_heads(np.asarray(k, dtype=np.float64), q.shape[1])
    v = _expand_kv_heads(np.asarray(v, dtype=np.float64), q.shape[1])
    batch, heads, nq, head_dim = q.shape
    nk = k.shape[2]
    scale = default_scale(head_dim) if scale is None else float(scale)
    order = streaming_order(np.float64, head_dim) if order is None else order
    owned = order.owned_elements(head_dim)
    q_parts = q[..., owned]  # (B, H, Nq, split, ept)
    k_parts = k[..., owned]  # (B, H, Nk, split, ept)

    counts = visible_key_counts(batch, nq, nk, causal, key_lengths)[:, None, :]  # (B, 1, Nq)
    m = np.full((batch, heads, nq), -np.inf)
    l = np.zeros((batch, heads, nq))
    acc = np.zeros((batch, heads, nq, head_dim))
    with np.errstate(invalid="ignore", over="ignore"):
        for tile_start in range(0, nk, order.block_n):
            tile_end = min(tile_start + order.block_n, nk)
            active = counts > tile_start  # rows that see a key of this tile
            if not active.any():
                break
            s = np.stack(
                [_canonical_scores(q_parts, k_parts[:, :, j, None], scale) for j in range(tile_start, tile_end)],
                axis=-1,
            )
            visible = np.arange(tile_start, tile_end) < counts[..., None]
            m_tile = np.where(visible, s, -np.inf).max(axis=-1)
            # online-softmax update: rescale the running sum and accumulator
            m_new = np.maximum(m, m_tile)
            alpha = exp_nonpositive(m - np.where(active, m_new, 0.0))
            l_new = l * alpha
            acc_new = acc * alpha[..., None]
            for jj, j in enumerate(range(tile_start, tile_end)):
                see = visible[..., jj]
                p = exp_nonpositive(np.where(see, s[..., jj] - m_new, -np.inf))
                l_new = np.where(see, l_new + p, l_new)
                acc_new = np.where(see[..., None], acc_new + p[..., None] * v[:, :, j, None, :], acc_new)
            m = np.where(active, m_new, m)
            l = np.where(active, l_new, l)
            acc = np.where(active[..., None], acc_new, acc)

    has_keys = l > 0
    o = np.where(has_keys[..., None], acc / np.where(has_keys, l, 1.0)[..., None], 0.0)
    lse = np.where(has_keys, m + log_positive(np.where(has_keys, l, 1.0)), -np.inf)
    return o, lse
