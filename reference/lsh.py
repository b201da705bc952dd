"""float64 references for hyperplane-LSH attention (SimHash buckets, exact union of candidates).

Semantics (written once, here; the CUDA kernel follows them):

* **Hashing.** `hyperplanes(d, bits, tables, seed)` draws ``tables x bits`` Gaussian
  hyperplanes from ``np.random.default_rng(seed)``. In table t, a row x gets the
  bucket ``sum_i [x · r_{t,i} > 0] << i`` (a zero projection gives bit 0). Queries
  are hashed per query head, keys per key/value head, with the same hyperplanes.
* **Candidates.** Query i attends to the *union* of keys that share its bucket in
  at least one table, each key counted once however many tables it collides in,
  intersected with the usual visibility (``key_lengths``, bottom-right causal; see
  `nkattn.reference.exact`). Within the candidates attention is exact softmax.
* **Empty candidate sets.** A query whose buckets hold no visible key returns
  O = 0 and lse = -inf, exactly like a fully masked row of exact attention: never
  NaN, never a silent fallback to other keys.
* **Non-finite values** follow `nkattn.reference.exact`, applied to the
  candidates: a NaN projection gives bit 0, so a row with NaN lands in bucket 0 of
  every table. Keys past ``key_lengths`` are hashed and sorted with the others
  (their scores are hidden), so NaN or inf in their rows of v can reach rows of the
  same bucket through 0 * NaN.
* **Shared-QK (Reformer).** With ``shared_qk=True`` there is no separate k: keys
  are the queries normalised to unit length (a zero query stays zero), so query
  and key buckets coincide, and a token's score with itself is replaced by
  `SELF_LOGIT` (after scaling), so it attends to itself only when no other
  candidate is visible. Requires Nq == Nk and one key head per query head.

Equivalent NumPy for one (b, h), no mask::

    cq, ck = simhash(q, planes), simhash(k, planes)           # (tables, N)
    cand = (cq[:, :, None] == ck[:, None, :]).any(0)           # union over tables
    s = np.where(cand, scale * q @ k.T, -np.inf)               # then exact softmax

Two references, as for every algorithm: `lsh_attention_ref` is the dense oracle
above; `lsh_attention_mirror` follows the kernel (hash -> stable sort by bucket ->
per table, per bucket, the bucket's keys in index order, skipping keys already
seen in an earlier table -> online-softmax merge across tables).
"""

from __future__ import annotations

import numpy as np

from nkattn.reference.exact import _expand_kv_heads, default_scale, visible_key_counts

MAX_BITS = 16
SELF_LOGIT = -1.0e5


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def check_bits(bits, name: str = "lsh_bits") -> int:
    """Bucket ids are stored in 16 bits (and 2^16 buckets already leave most empty at 1M keys)."""
    if not _is_int(bits) or not 1 <= bits <= MAX_BITS:
        raise ValueError(f"{name} must be an integer in [1, {MAX_BITS}], got {bits!r}")
    return int(bits)


def check_tables(tables, name: str = "lsh_tables") -> int:
    if not _is_int(tables) or tables < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {tables!r}")
    return int(tables)


def validate_lsh_params(bits, tables) -> None:
    check_bits(bits)
    check_tables(tables)


def check_no_keys(k, flag: str = "shared_qk=True") -> None:
    """Shared-QK derives the keys from q: a k passed beside it would be silently ignored."""
    if k is not None:
        raise ValueError(f"{flag} derives the keys from q (Reformer): pass k=None")


def hyperplanes(head_dim: int, bits: int, tables: int, seed: int = 0) -> np.ndarray:
    """Gaussian hyperplanes, shape (tables, bits, head_dim), float64."""
    validate_lsh_params(bits, tables)
    return np.random.default_rng(seed).standard_normal((tables, bits, head_dim))


def simhash(x, planes) -> np.ndarray:
    """Bucket ids of the rows of x: (..., N, d) -> (..., tables, N) int32."""
    x = np.asarray(x, dtype=np.float64)
    proj = np.einsum("...nd,tbd->...tnb", x, planes)
    weights = (1 << np.arange(planes.shape[1], dtype=np.int64))
    return ((proj > 0).astype(np.int64) @ weights).astype(np.int32)


def collision_probability(cos_angle, bits: int, tables: int) -> np.ndarray:
    """SimHash theory: probability that two vectors at cosine `cos_angle` share a
    bucket in at least one of `tables` tables of `bits` bits: 1 - (1 - (1 - θ/π)^bits)^tables."""
    theta = np.arccos(np.clip(np.asarray(cos_angle, dtype=np.float64), -1.0, 1.0))
    return 1.0 - (1.0 - (1.0 - theta / np.pi) ** bits) ** tables


def candidate_mask_rows(q_codes, k_codes) -> np.ndarray:
    """Union candidates of a set of queries: codes (tables, nq), (tables, nk) -> bool (nq, nk)."""
    q_codes, k_codes = np.asarray(q_codes), np.asarray(k_codes)
    mask = np.zeros((q_codes.shape[1], k_codes.shape[1]), dtype=bool)
    for t in range(q_codes.shape[0]):
        mask |= q_codes[t][:, None] == k_codes[t][None, :]
    return mask


def shared_qk_keys(q) -> np.ndarray:
    """Reformer's shared-QK keys: queries normalised to unit length (zero rows stay zero)."""
    q = np.asarray(q, dtype=np.float64)
    norm = np.linalg.norm(q, axis=-1, keepdims=True)
    # `norm != 0`, not `norm > 0`: a NaN row stays NaN (the kernel's x * 0 is NaN too)
    with np.errstate(invalid="ignore"):
        return np.divide(q, norm, out=np.zeros_like(q), where=norm != 0)


def _prepare(q, k, v, bits, tables, seed, shared_qk):
    validate_lsh_params(bits, tables)
    q = np.asarray(q, dtype=np.float64)
    if shared_qk:
        check_no_keys(k)
        k = shared_qk_keys(q)
    k = np.asarray(k, dtype=np.float64)
    planes = hyperplanes(q.shape[-1], bits, tables, seed)
    k_codes = simhash(k, planes)
    q_codes = k_codes if shared_qk else simhash(q, planes)
    return q, k, np.asarray(v, dtype=np.float64), q_codes, k_codes


def lsh_candidates(q_codes, k_codes, *, causal=False, key_lengths=None) -> np.ndarray:
    """Candidate mask (B, H, Nq, Nk): bucket shared in some table, and visible."""
    batch, heads, _, nq = q_codes.shape
    nk = k_codes.shape[-1]
    k_codes = _expand_kv_heads(k_codes, heads)
    collide = (q_codes[..., :, None] == k_codes[..., None, :]).any(axis=2)
    counts = visible_key_counts(batch, nq, nk, causal, key_lengths)
    visible = np.arange(nk)[None, None, None, :] < counts[:, None, :, None]
    return collide & visible


def lsh_attention_ref(
    q, k, v, *, bits, tables, seed=0, causal=False, scale=None, key_lengths=None, shared_qk=False,
    compute_dtype=np.float64,
):
    """Oracle: dense scores restricted to the LSH candidate sets. Returns (O, lse, candidates).

    ``compute_dtype=np.float32`` gives the naive float32 formula over the same
    candidates (hashing stays float64), which sets a float32 kernel's error budget.
    """
    q, k, v, q_codes, k_codes = _prepare(q, k, v, bits, tables, seed, shared_qk)
    cand = lsh_candidates(q_codes, k_codes, causal=causal, key_lengths=key_lengths)
    dt = np.dtype(compute_dtype).type
    qc = q.astype(dt)
    kc = _expand_kv_heads(k, q.shape[1]).astype(dt)
    vc = _expand_kv_heads(v, q.shape[1]).astype(dt)
    scale = dt(default_scale(q.shape[-1]) if scale is None else scale)
    s = np.einsum("bhqd,bhkd->bhqk", qc, kc) * scale
    if shared_qk:
        eye = np.eye(q.shape[2], dtype=bool)[None, None]
        s = np.where(eye, dt(SELF_LOGIT), s)
    s = np.where(cand, s, -np.inf)
    zero, one = dt(0), dt(1)
    with np.errstate(invalid="ignore"):
        m = s.max(axis=-1, keepdims=True)  # NaN if a candidate's score is NaN
        empty = m == -np.inf
        p = np.where(cand, np.exp(s - np.where(empty, zero, m)), zero)
        l = p.sum(axis=-1, keepdims=True)
        o = np.where(empty, zero, (p @ vc) / np.where(empty, one, l))
        lse = np.where(empty, dt(-np.inf), m + np.log(np.where(empty, one, l)))
    return o, lse[..., 0], cand


def lsh_attention_mirror(q, k, v, *, bits, tables, seed=0, causal=False, scale=None, key_lengths=None, shared_qk=False):
    """Mirror: the kernel's structure in float64. Returns (O, lse).

    Per table t, queries and keys are stably sorted by bucket; each bucket's queries
    attend to the bucket's keys in index order, skipping a key whose bucket matched
    the query's in an earlier table (so each candidate counts once); the per-table
    result is merged into running (m, l, acc) statistics, tables in order.
    """
    q, k, v, q_codes, k_codes = _prepare(q, k, v, bits, tables, seed, shared_qk)
    batch, heads, nq, d = q.shape
    nk = k.shape[2]
    group = heads // k.shape[1]
    scale = default_scale(d) if scale is None else float(scale)
    counts = visible_key_counts(batch, nq, nk, causal, key_lengths)
    m = np.full((batch, heads, nq), -np.inf)
    l = np.zeros((batch, heads, nq))
    acc = np.zeros((batch, heads, nq, d))
    for b in range(batch):
        for h in range(heads):
            kvh = h // group
            for t in range(tables):
                q_order = np.argsort(q_codes[b, h, t], kind="stable")
                k_order = np.argsort(k_codes[b, kvh, t], kind="stable")
                k_sorted = k_codes[b, kvh, t, k_order]
                for bucket in np.unique(q_codes[b, h, t]):
                    rows = q_order[q_codes[b, h, t, q_order] == bucket]
                    keys = k_order[k_sorted == bucket]
                    if keys.size == 0:
                        continue
                    s = scale * q[b, h, rows] @ k[b, kvh, keys].T
                    if shared_qk:
                        s = np.where(rows[:, None] == keys[None, :], SELF_LOGIT, s)
                    earlier_q = q_codes[b, h, :t][:, rows]  # (t, rows)
                    earlier_k = k_codes[b, kvh, :t][:, keys]
                    seen = (earlier_q[:, :, None] == earlier_k[:, None, :]).any(axis=0)
                    hidden = (keys[None, :] >= counts[b, rows][:, None]) | seen
                    s = np.where(hidden, -np.inf, s)
                    m_new = np.maximum(m[b, h, rows], s.max(axis=1))
                    m_use = np.where(m_new == -np.inf, 0.0, m_new)
                    alpha = np.exp(m[b, h, rows] - m_use)
                    p = np.exp(s - m_use[:, None])
                    l[b, h, rows] = l[b, h, rows] * alpha + p.sum(axis=1)
                    acc[b, h, rows] = acc[b, h, rows] * alpha[:, None] + p @ v[b, kvh, keys]
                    m[b, h, rows] = m_new
    has_keys = l != 0  # l = NaN (a NaN or +inf score) stores NaN
    o = np.where(has_keys[..., None], acc / np.where(has_keys, l, 1.0)[..., None], 0.0)
    lse = np.where(has_keys, m + np.log(np.where(has_keys, l, 1.0)), -np.inf)
    return o, lse
