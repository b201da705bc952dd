"""float64 references for exact attention.

Two references, as for every algorithm in nkattn:

* `attention_ref` is the oracle: dense scores, explicit -inf masks, written to be
  obviously right.
* `streaming_attention_ref` is the mirror: the same function computed in exactly
  the order of operations of the fused CUDA kernel (key tiles of `block_n` in
  order, running max `m`, running sum `l`, rescaled accumulator, final
  ``O = acc / l`` and ``lse = m + log(l)``), with every step a single correctly
  rounded IEEE operation. The float64 kernel reproduces it to the bit for
  finite inputs.

Semantics (written once, here; every path follows them):

* q is (B, H, Nq, d); k is (B, Hkv, Nk, d) and v is (B, Hkv, Nk, dv) with H a
  multiple of Hkv; dv may differ from d (any d, dv >= 1 here; the kernels have
  their own limits). Query head h reads key/value head ``h // (H // Hkv)``
  (grouped-query attention).
* ``key_lengths[b]`` (optional) makes keys ``j >= key_lengths[b]`` invisible in
  batch b; exact and table attention never read them, so those rows of k and v
  may hold anything (LSH hashes them: `nkattn.reference.lsh`).
* ``causal`` is bottom-right aligned, as in FlashAttention: with
  ``nk_b = key_lengths[b]`` (or Nk), query i sees key j iff ``j <= i + nk_b - Nq``.
* A query row with no visible key returns O = 0 and lse = -inf, never NaN.
* The row entropy (``return_entropy=True``) is ``H_i = -Σ_j p_ij log p_ij =
  lse_i - Σ_j p_ij s_ij`` in nats over the row's visible keys, p the softmax and
  s the scaled scores: 0 for a row with one visible key (or one that takes all
  the weight), ln n for equal scores over n keys, and 0 for a row with no
  visible key (an empty sum, as O = 0 and lse = log 0 = -inf are). It is
  computed as ``log l - Σ_j e^(s_j - m) (s_j - m) / l`` (m the row max, l the
  softmax sum): both terms are >= 0, so H keeps its relative accuracy when
  ``|s| >> H``, where ``lse - Σ p·s`` would cancel. It depends on q and k only:
  non-finite scores act on it as on lse (NaN where lse is NaN, -inf scores are
  keys of weight 0), non-finite v never reaches it.
* Non-finite values propagate, as in torch and FlashAttention (`nkattn.attention`
  refuses them unless ``check_finite=False``); a visible score is
  ``scale * q_i · k_j``:

  - a NaN or +inf among a row's visible scores makes that row's O and lse NaN;
  - a -inf visible score is a key of weight 0; a row whose visible scores are
    all -inf is a row with no visible key (O = 0, lse = -inf);
  - the score of a key a row does not see never matters;
  - NaN or inf in v[j] makes O non-finite in every row that sees key j. Rows
    that do not see key j may get NaN too (0 * NaN is NaN): the dense oracle
    multiplies every p by every v, a kernel the keys of the tiles it visits.

Equivalent NumPy for one (b, h) with no mask::

    s = scale * q @ k.T
    p = np.exp(s - s.max(-1, keepdims=True))
    o = (p @ v) / p.sum(-1, keepdims=True)
    lse = s.max(-1) + np.log(np.exp(s - s.max(-1, keepdims=True)).sum(-1))
    entropy = lse - (np.exp(s - lse[:, None]) * s).sum(-1)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# head dims the kernels' tilings (`streaming_order`) exist for; the oracle takes any d
KERNEL_HEAD_DIMS = (16, 32, 64, 128, 256)

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


def attention_ref(q, k, v, *, causal=False, scale=None, key_lengths=None, compute_dtype=np.float64,
                  return_entropy=False):
    """Oracle: dense attention. Returns (O, lse), or (O, lse, entropy) with `return_entropy`,
    in `compute_dtype`.

    float64 is the reference; ``compute_dtype=np.float32`` is the naive float32
    formula whose error sets a float32 kernel's error budget.
    """
    q = np.asarray(q, dtype=compute_dtype)
    k = _expand_kv_heads(np.asarray(k, dtype=compute_dtype), q.shape[1])
    v = _expand_kv_heads(np.asarray(v, dtype=compute_dtype), q.shape[1])
    batch, _, nq, head_dim = q.shape
    nk = k.shape[2]
    scale = q.dtype.type(default_scale(head_dim) if scale is None else scale)
    zero, one = q.dtype.type(0), q.dtype.type(1)
    v = np.where(_read_keys(batch, nk, key_lengths)[:, None, :, None], v, zero)

    with np.errstate(invalid="ignore"):
        s = np.einsum("bhqd,bhkd->bhqk", q, k) * scale
        counts = visible_key_counts(batch, nq, nk, causal, key_lengths)
        visible = np.arange(nk)[None, None, None, :] < counts[:, None, :, None]
        s = np.where(visible, s, -np.inf)
        m = s.max(axis=-1, keepdims=True)  # NaN if a visible score is NaN
        empty = m == -np.inf  # no visible key, or only -inf scores
        p = np.where(visible, np.exp(s - np.where(empty, zero, m)), zero)
        l = p.sum(axis=-1, keepdims=True)
        o = np.where(empty, zero, (p @ v) / np.where(empty, one, l))
        log_l = np.log(np.where(empty, one, l))
        lse = np.where(empty, q.dtype.type(-np.inf), m + log_l)
        if not return_entropy:
            return o, lse[..., 0]
        # -Σ p log p with -log p = log l - (s - m) >= 0; a key of weight 0 adds 0, not 0 * inf
        neg_log_p = log_l - (s - np.where(empty, zero, m))
        entropy = np.where(p == zero, zero, p / np.where(empty, one, l) * neg_log_p).sum(axis=-1)
    return o, lse[..., 0], entropy


def _read_keys(batch: int, nk: int, key_lengths) -> np.ndarray:
    """(batch, nk) bool: the keys a path may read, ``j < key_lengths[b]``."""
    nk_b = np.full(batch, nk) if key_lengths is None else np.asarray(key_lengths)
    return np.arange(nk)[None, :] < nk_b[:, None]


# --------------------------------------------------------------------------------------
# The canonical streaming order
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StreamingOrder:
    """The operation order shared by the exact kernel and its float64 mirror.

    A block of ``threads_y * threads_x`` threads owns ``block_m`` query rows and
    walks the keys in tiles of ``block_n``. Within a tile:

    * a score is ``dot * scale``: the dot product sums `dot_chunk` consecutive
      elements at a time (in increasing order, each product and sum rounded) and
      adds the chunk sums in order, which keeps float32 rounding error near that of
      a pairwise sum;
    * the tile's row sum of ``p = exp(s - m_new)`` is formed by `threads_x` threads,
      each summing `keys_per_thread` consecutive keys in order, then combined
      pairwise (a butterfly: ``x[0::2] + x[1::2]`` until one is left);
    * the accumulator is rescaled by ``alpha = exp(m_old - m_new)``, then
      ``acc += p_j * v_j`` for every key j of the tile in order (masked keys have
      p = 0 and change nothing);
    * with the row entropy, ``t = Σ p_j (s_j - m)`` over the keys seen so far, relative
      to the running max like l: a thread sums ``p_j * (s_j - m_new)`` over its keys
      with ``p_j != 0`` in order, the partial sums combine as l's do, and
      ``t = (t + (m_old - m_new) * l_old) * alpha + tile sum`` (the correction only
      where ``l_old != 0``: a row that has seen no key has t = 0); finally
      ``entropy = log(l) - t / l``.
    """

    threads_y: int
    threads_x: int
    rows_per_thread: int
    keys_per_thread: int
    dot_chunk: int = 16

    @property
    def block_m(self) -> int:
        return self.threads_y * self.rows_per_thread

    @property
    def block_n(self) -> int:
        return self.threads_x * self.keys_per_thread

    @property
    def threads(self) -> int:
        return self.threads_y * self.threads_x

    def shared_elements(self, head_dim: int, pad: int, value_dim: int | None = None) -> int:
        """Elements of the kernel's shared buffer: Qᵀ, Kᵀ (rows padded by `pad`), V (`value_dim` wide,
        default `head_dim`), Pᵀ (padded) and a scratch row."""
        bm, bn = self.block_m, self.block_n
        dv = head_dim if value_dim is None else value_dim
        return head_dim * (bm + pad) + head_dim * (bn + pad) + bn * dv + bn * (bm + pad) + self.threads


def streaming_order(dtype, head_dim: int) -> StreamingOrder:
    """The canonical order for a dtype and head dim (see `StreamingOrder`).

    256 threads; float32 up to d = 128 runs 128 x 64 tiles, 8 x 4 scores per
    thread (the fastest layout on the H100 in results/bench/exact-tune-h100.json),
    and at d = 256 64 x 64 tiles, 4 x 4 per thread, to fit shared memory; float64
    runs 64 x 64 tiles, 4 x 4 per thread, with narrower key tiles at d >= 128.
    """
    dtype = np.dtype(dtype)
    if head_dim not in KERNEL_HEAD_DIMS:
        raise ValueError(f"head dim must be one of {KERNEL_HEAD_DIMS}, got {head_dim}")
    if dtype not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise TypeError(f"no streaming order for dtype {dtype}")
    if dtype == np.float64 and head_dim == 256:
        return StreamingOrder(threads_y=8, threads_x=16, rows_per_thread=4, keys_per_thread=2)
    if dtype == np.float64 and head_dim == 128:
        return StreamingOrder(threads_y=16, threads_x=16, rows_per_thread=4, keys_per_thread=2)
    if dtype == np.float32 and head_dim <= 128:
        return StreamingOrder(threads_y=16, threads_x=16, rows_per_thread=8, keys_per_thread=4)
    return StreamingOrder(threads_y=16, threads_x=16, rows_per_thread=4, keys_per_thread=4)


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
    """exp(x) for x <= 0 (-inf included; NaN gives NaN), the kernel's float64 exp."""
    x = np.asarray(x, dtype=np.float64)
    live = ~(x < EXP_UNDERFLOW)  # NaN stays live and comes out NaN, as in the kernel
    xs = np.where(live, x, 0.0)
    n = np.floor(xs * LOG2E + 0.5)
    r = (xs - n * LN2_HI) - n * LN2_LO
    p = np.full_like(r, EXP_COEFFS[0])
    for c in EXP_COEFFS[1:]:
        p = p * r + c
    # the GPU converts a NaN n to 0; NumPy's cast would warn and give an arbitrary integer
    return np.where(live, np.ldexp(p, np.where(np.isnan(n), 0.0, n).astype(np.int64)), 0.0)


def log_positive(x: np.ndarray) -> np.ndarray:
    """log(x) for finite x > 0 (NaN gives NaN), the kernel's float64 log."""
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


def _butterfly_sum(x):
    """Pairwise sum over the last axis, in the order of a shuffle butterfly."""
    while x.shape[-1] > 1:
        x = x[..., 0::2] + x[..., 1::2]
    return x[..., 0]


def _thread_then_butterfly_sum(x, order: StreamingOrder):
    """A row sum over a key tile (last axis) as the kernel forms it: each of `threads_x` threads
    sums its `keys_per_thread` consecutive keys in order, then the butterfly."""
    per_thread = x.reshape(*x.shape[:-1], order.threads_x, order.keys_per_thread)
    partial = per_thread[..., 0]
    for j in range(1, order.keys_per_thread):
        partial = partial + per_thread[..., j]
    return _butterfly_sum(partial)


def tile_scores_ref(q, k_tile, scale: float, order):
    """Scores of one key tile as the kernel forms them: the dot over d summed in chunks of
    ``order.dot_chunk`` (a thread's running sum per chunk), then the scale."""
    dot = None
    for c0 in range(0, q.shape[-1], order.dot_chunk):
        part = q[..., None, c0] * k_tile[:, :, None, :, c0]
        for c in range(c0 + 1, c0 + order.dot_chunk):
            part = part + q[..., None, c] * k_tile[:, :, None, :, c]
        dot = part if dot is None else dot + part
    return dot * scale


def online_update_ref(m, l, t, s, order, *, entropy: bool):
    """One tile's online-softmax update of the running max m, sum l and (with `entropy`) the
    entropy sum t = Σ p·(s - m), as the kernel's `online_softmax_entropy_update` does it; returns
    (m, l, t, p, alpha), p the tile's weights and alpha the factor that moved the old state.
    The kernel's max skips NaN (a comparison with NaN is false)."""
    m_new = np.maximum(m, np.fmax.reduce(s, axis=-1, initial=-np.inf))
    m_use = np.where(m_new == -np.inf, 0.0, m_new)
    shift = m - m_use
    alpha = exp_nonpositive(shift)
    x = s - m_use[..., None]
    p = exp_nonpositive(x)
    if entropy:
        terms = np.where(p != 0, p * x, 0.0)
        t = np.where(l != 0, t + shift * l, t) * alpha + _thread_then_butterfly_sum(terms, order)
    l = l * alpha + _thread_then_butterfly_sum(p, order)
    return m_new, l, t, p, alpha


def streaming_attention_ref(q, k, v, *, causal=False, scale=None, key_lengths=None, order=None, return_entropy=False):
    """Mirror: float64 attention in the kernel's exact operation order.

    `order` defaults to ``streaming_order(float64, d)``, the float64 kernel's.
    v may be of any width (the low-rank path's A·X is this function with X for v).
    Returns (O, lse), or (O, lse, entropy) with `return_entropy`, as float64.
    """
    q = np.asarray(q, dtype=np.float64)
    k = _expand_kv_heads(np.asarray(k, dtype=np.float64), q.shape[1])
    v = _expand_kv_heads(np.asarray(v, dtype=np.float64), q.shape[1])
    batch, heads, nq, head_dim = q.shape
    nk, value_dim = k.shape[2], v.shape[3]
    scale = default_scale(head_dim) if scale is None else float(scale)
    order = streaming_order(np.float64, head_dim) if order is None else order
    bn = order.block_n

    counts = visible_key_counts(batch, nq, nk, causal, key_lengths)[:, None, :, None]  # (B, 1, Nq, 1)
    read = _read_keys(batch, nk, key_lengths)[:, None, :, None]  # (B, 1, Nk, 1)
    m = np.full((batch, heads, nq), -np.inf)
    l = np.zeros((batch, heads, nq))
    t = np.zeros((batch, heads, nq))
    acc = np.zeros((batch, heads, nq, value_dim))
    with np.errstate(invalid="ignore", over="ignore"):
        for tile_start in range(0, nk, bn):
            if not (counts > tile_start).any():
                break
            # the tile, zero past Nk and past key_lengths like the kernel's shared-memory copy
            k_tile = np.zeros((batch, heads, bn, head_dim))
            v_tile = np.zeros((batch, heads, bn, value_dim))
            tile_end = min(tile_start + bn, nk)
            tile_read = read[:, :, tile_start:tile_end]
            k_tile[:, :, : tile_end - tile_start] = np.where(tile_read, k[:, :, tile_start:tile_end], 0.0)
            v_tile[:, :, : tile_end - tile_start] = np.where(tile_read, v[:, :, tile_start:tile_end], 0.0)

            visible = (tile_start + np.arange(bn)) < counts
            s = np.where(visible, tile_scores_ref(q, k_tile, scale, order), -np.inf)
            m, l, t, p, alpha = online_update_ref(m, l, t, s, order, entropy=return_entropy)
            acc = acc * alpha[..., None]
            for j in range(bn):
                acc = acc + p[..., j, None] * v_tile[:, :, None, j, :]

        has_keys = l != 0  # l = 0: no key; l = NaN: a NaN or +inf score, stored as NaN
        l_div = np.where(has_keys, l, 1.0)
        o = np.where(has_keys[..., None], acc / l_div[..., None], 0.0)
        log_l = log_positive(l_div)
        lse = np.where(has_keys, m + log_l, -np.inf)
        if return_entropy:
            return o, lse, np.where(has_keys, log_l - t / l_div, 0.0)
    return o, lse
