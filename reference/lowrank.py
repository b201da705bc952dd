"""float64 references for the low-rank path: the attention matrix, its SVD, and the randomized SVD.

Semantics (written once, here; the GPU operators and `nkattn.lowrank` follow them):

* **The matrix.** For every (batch b, query head h), ``A = softmax(scale · q kᵀ + mask)``
  is the (Nq, Nk) matrix of attention probabilities, with the masks and grouped-query
  heads of `nkattn.reference.exact`: query head h reads key head ``h // (H // Hkv)``,
  ``key_lengths[b]`` hides keys ``j >= key_lengths[b]``, ``causal`` is bottom-right
  aligned. A row with no visible key is a zero row of A, and its lse is -inf.
* **A·X** (`attention_times_ref`) is attention with the values replaced by X of shape
  (B, Hkv, Nk, l), any width l (independent of d). X is indexed by the key/value head,
  exactly like V, so the query heads of a group share one X; the result is
  (B, H, Nq, l), with the lse of every row (B, H, Nq).
* **Aᵀ·Y** (`attention_transpose_times_ref`) takes Y of shape (B, H, Nq, l), one per
  *query* head, and returns (B, H, Nk, l), again per query head: ``(Aᵀ Y)_j = Σ_i
  exp(s_ij - lse_i) · Y_i`` over the queries i that see key j, computed from the stored
  lse of the A·X pass. A is never materialised. The query heads of a group are not
  summed: each has its own A.
* **Per-query-head right-hand sides.** The randomized SVD needs A_h X_h with a
  different X_h for every query head. With H = G · Hkv, the query heads ``j, j + G,
  j + 2G, ...`` belong to distinct groups, so one A·X call with ``q[:, j::G]`` and
  ``X[:, j::G]`` (Hkv heads, no grouping) computes their products; G calls cover all
  heads without copying K (`times_per_query_head`).
* **Randomized SVD** (Halko, Martinsson & Tropp 2011, Algorithms 4.4 and 5.1): with
  ``l = min(k + p, Nq, Nk)``, Ω = ``default_rng(seed).standard_normal((B, H, Nk, l))``;
  ``Q = qr(A Ω)``; then q times ``Q = qr(A · qr(Aᵀ Q))`` (re-orthonormalised after
  every product); ``B = Qᵀ A = (Aᵀ Q)ᵀ``; ``B = Ũ Σ Vᵀ``; ``U = Q Ũ``; keep the first k.
  That is 2q + 2 operator passes. Â_k = U_k Σ_k V_kᵀ; the low-rank output is Â_k V.

Equivalent NumPy for one (b, h), no mask::

    s = scale * q @ k.T
    a = np.exp(s - s.max(-1, keepdims=True)); a /= a.sum(-1, keepdims=True)   # A
    lse = s.max(-1) + np.log(np.exp(s - s.max(-1, keepdims=True)).sum(-1))
    a @ x  ==  attention with values x                                       # A·X
    a.T @ y  ==  (np.exp(s - lse[:, None]).T @ y)                             # Aᵀ·Y

Two references, as for every algorithm: the oracle is dense (`attention_matrix`, its
exact SVD `attention_svd`, and `randomized_svd_ref`, HMT on the explicit A); the mirror
(`attention_times_ref`, `attention_transpose_times_ref`, `randomized_svd_mirror`) runs
the same algorithm matrix-free, in the GPU operators' order of operations:

* A·X is `nkattn.reference.exact.streaming_attention_ref` with X for V: key tiles of
  ``order.block_n`` in order, online softmax, chunked dot products.
* Aᵀ·Y follows its kernel (one GPU block owns a tile of keys and walks the queries):
  query tiles of ``order.block_n`` rows in increasing order, zero-padded past Nq like the
  kernel's shared-memory copy; for every key j, ``s = q_i·k_j`` by the exact kernel's
  chunked dot (bit-identical s_ij), ``x = s·scale + (-lse_i)``, ``p = exp(x)`` with the
  portable exp (0 where row i does not see key j), and ``acc_j += p·Y_i`` row by row,
  one rounding per multiply and per add. Tiles the kernel skips for a block of keys add
  exact zeros here.

The float64 kernels of `nkattn.cuda_kernels.lowrank` reproduce these two mirrors bit for
bit when given the kernels' order (``nkattn.cuda_kernels.online_softmax.kernel_order``).

A-posteriori error (`probe_residual_norms`, `error_estimates`): r Gaussian probes ω_i,
independent of Ω, go through the first A·X pass. With E = A - Â_k, ``‖E ω‖²`` has mean
``‖E‖_F²``, so ``sqrt(mean_i ‖E ω_i‖²)`` estimates the Frobenius error (unbiased for its
square; relative standard deviation of the square ``sqrt(2 Σ s_j⁴ / r) / Σ s_j²`` over
the singular values s_j of E). And HMT's Lemma 4.1 (their eq. 4.3): ``‖E‖₂ <= 10 ·
sqrt(2/π) · max_i ‖E ω_i‖`` with probability at least ``1 - 10^-r``.
"""

from __future__ import annotations

import math

import numpy as np

from nkattn.reference.exact import (
    _expand_kv_heads,
    default_scale,
    exp_nonpositive,
    streaming_attention_ref,
    streaming_order,
    visible_key_counts,
)

ERROR_PROBES = 5  # the spectral bound fails with probability <= 10^-5 per head
BOUND_FACTOR = 10.0 * math.sqrt(2.0 / math.pi)  # HMT eq. 4.3 with alpha = 10
ENERGY_SLACK = 1e-12  # absorbs the rounding of cumulative sums (the identity has rank ceil(tau N))


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _is_real(x) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, (bool, np.bool_))


def check_rank(name: str, rank, kmax: int | None = None):
    """`rank` if it is "auto" or an integer >= 1 (and <= kmax = min(Nq, Nk) when given); else ValueError naming it."""
    if isinstance(rank, str) and rank == "auto":
        return rank
    if _is_int(rank) and rank >= 1 and (kmax is None or rank <= kmax):
        return int(rank)
    bound = "an integer >= 1" if kmax is None else f"an integer in [1, min(Nq, Nk) = {kmax}]"
    raise ValueError(f"{name} must be {bound} or 'auto', got {rank!r}")


def check_count(name: str, value) -> int:
    """`value` if it is an integer >= 0 (oversample, power_iters); else ValueError naming it."""
    if not _is_int(value) or value < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    return int(value)


def check_fraction(name: str, value):
    """`value` if it is None or a number in (0, 1] (energy, tolerance); else ValueError naming it."""
    if value is not None and (not _is_real(value) or not 0.0 < float(value) <= 1.0):
        raise ValueError(f"{name} must be a number in (0, 1], got {value!r}")
    return value


def validate_lowrank_params(rank, nq, nk, *, oversample, power_iters, seed, energy=None, tolerance=None) -> None:
    """ValueError naming the argument for anything the randomized SVD cannot take.

    rank is an integer in [1, min(Nq, Nk)] or "auto"; oversample and power_iters are
    integers >= 0; seed an integer >= 0; energy and tolerance (rank="auto" only) lie in (0, 1].
    """
    check_rank("rank", rank, min(nq, nk))
    check_count("oversample", oversample)
    check_count("power_iters", power_iters)
    if not _is_int(seed) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    for name, value in (("energy", energy), ("tolerance", tolerance)):
        if value is not None and rank != "auto":
            raise ValueError(f"{name} only applies to rank='auto', got rank={rank!r} and {name}={value!r}")
        check_fraction(name, value)


# --------------------------------------------------------------------------------------
# Oracle: the dense matrix
# --------------------------------------------------------------------------------------


def attention_matrix(q, k, *, causal=False, scale=None, key_lengths=None, return_lse=False):
    """Dense A = softmax(scale · q kᵀ + mask) per (b, query head), float64 (B, H, Nq, Nk).

    Rows with no visible key are zero (their lse is -inf). With ``return_lse`` returns (A, lse).
    """
    q = np.asarray(q, dtype=np.float64)
    k = _expand_kv_heads(np.asarray(k, dtype=np.float64), q.shape[1])
    batch, _, nq, head_dim = q.shape
    nk = k.shape[2]
    scale = default_scale(head_dim) if scale is None else float(scale)
    s = np.einsum("bhqd,bhkd->bhqk", q, k) * scale
    counts = visible_key_counts(batch, nq, nk, causal, key_lengths)
    visible = np.arange(nk)[None, None, None, :] < counts[:, None, :, None]
    s = np.where(visible, s, -np.inf)
    m = s.max(axis=-1, keepdims=True)
    has_keys = np.isfinite(m)
    p = np.where(visible, np.exp(s - np.where(has_keys, m, 0.0)), 0.0)
    total = p.sum(axis=-1, keepdims=True)
    a = p / np.where(has_keys, total, 1.0)
    if not return_lse:
        return a
    lse = np.where(has_keys, m + np.log(np.where(has_keys, total, 1.0)), -np.inf)
    return a, lse[..., 0]


def attention_svd(q, k, *, causal=False, scale=None, key_lengths=None):
    """Exact thin SVD of A: (U (B, H, Nq, r), sigma (B, H, r), Vt (B, H, r, Nk)), r = min(Nq, Nk)."""
    a = attention_matrix(q, k, causal=causal, scale=scale, key_lengths=key_lengths)
    return np.linalg.svd(a, full_matrices=False)


def randomized_svd_ref(a, rank, *, oversample=10, power_iters=2, seed=0):
    """HMT randomized SVD of a dense stack a (..., m, n): (U (..., m, k), sigma (..., k), Vt (..., k, n)).

    Gaussian test matrix from ``default_rng(seed).standard_normal((..., n, l))``,
    ``l = min(rank + oversample, m, n)``, QR after every product (see the module docstring).
    Like ``sklearn.utils.extmath.randomized_svd(a, rank, n_oversamples=oversample,
    n_iter=power_iters, power_iteration_normalizer="QR", transpose=False)`` except for
    the generator (sklearn draws Ω from a legacy ``RandomState``).
    """
    a = np.asarray(a, dtype=np.float64)
    m, n = a.shape[-2:]
    validate_lowrank_params(rank, m, n, oversample=oversample, power_iters=power_iters, seed=seed)
    width = min(rank + oversample, m, n)
    omega = np.random.default_rng(seed).standard_normal((*a.shape[:-2], n, width))
    at = np.swapaxes(a, -1, -2)
    basis, _ = np.linalg.qr(a @ omega)
    for _ in range(power_iters):
        z, _ = np.linalg.qr(at @ basis)
        basis, _ = np.linalg.qr(a @ z)
    u_small, sigma, vt = np.linalg.svd(np.swapaxes(basis, -1, -2) @ a, full_matrices=False)
    return (basis @ u_small)[..., :rank], sigma[..., :rank], vt[..., :rank, :]


# --------------------------------------------------------------------------------------
# Mirror: the matrix-free operators in the GPU order, and the rSVD through them
# --------------------------------------------------------------------------------------


def _check_operator_shapes(q, k, rhs, rhs_name, rhs_rows, rhs_heads):
    if q.ndim != 4 or k.ndim != 4 or rhs.ndim != 4:
        raise ValueError(f"q, k and {rhs_name} must have rank 4, got {q.shape}, {k.shape}, {rhs.shape}")
    batch, heads, _, head_dim = q.shape
    if k.shape[0] != batch or k.shape[3] != head_dim or heads % k.shape[1]:
        raise ValueError(f"k {k.shape} does not match q {q.shape} (same B and d, H a multiple of Hkv)")
    if rhs.shape[:3] != (batch, rhs_heads, rhs_rows):
        raise ValueError(f"{rhs_name} must have shape ({batch}, {rhs_heads}, {rhs_rows}, l), got {rhs.shape}")


def attention_times_ref(q, k, x, key_lengths=None, *, causal=False, scale=None, order=None):
    """Mirror of A·X: (A X (B, H, Nq, l), lse (B, H, Nq)), float64, in the kernel's order.

    x is (B, Hkv, Nk, l), indexed by key head like V. This is the exact path's streaming
    attention with X for the values (`nkattn.reference.exact.streaming_attention_ref`,
    `order` defaulting to the float64 kernel's).
    """
    q, k, x = (np.asarray(t, dtype=np.float64) for t in (q, k, x))
    _check_operator_shapes(q, k, x, "x", k.shape[2], k.shape[1])
    return streaming_attention_ref(q, k, x, causal=causal, scale=scale, key_lengths=key_lengths, order=order)


def attention_transpose_times_ref(q, k, y, lse, key_lengths=None, *, causal=False, scale=None, order=None, keys=None):
    """Mirror of Aᵀ·Y: (B, H, Nk, l) float64 from y (B, H, Nq, l) and the A·X pass's lse (B, H, Nq).

    Per query head (not summed over a group). Order of operations in the module docstring;
    `order` defaults to the float64 kernel's (only its ``block_n`` and ``dot_chunk``
    matter). `keys` (indices into Nk, default all) returns only those keys' rows: a key's
    bits depend on nothing else, so large problems can be checked on a sample.
    """
    q, k, y = (np.asarray(t, dtype=np.float64) for t in (q, k, y))
    lse = np.asarray(lse, dtype=np.float64)
    _check_operator_shapes(q, k, y, "y", q.shape[2], q.shape[1])
    if lse.shape != q.shape[:3]:
        raise ValueError(f"lse must have shape {q.shape[:3]}, got {lse.shape}")
    batch, heads, nq, head_dim = q.shape
    k = _expand_kv_heads(k, heads)
    nk, width = k.shape[2], y.shape[3]
    scale = default_scale(head_dim) if scale is None else float(scale)
    order = streaming_order(np.float64, head_dim) if order is None else order
    bn, chunk = order.block_n, order.dot_chunk
    key_idx = np.arange(nk) if keys is None else np.asarray(keys)
    k = k[:, :, key_idx]

    counts = visible_key_counts(batch, nq, nk, causal, key_lengths)  # (B, Nq)
    acc = np.zeros((batch, heads, len(key_idx), width))
    with np.errstate(invalid="ignore", over="ignore"):
        for tile_start in range(0, nq, bn):
            # the tile, zero-padded past Nq like the kernel's shared-memory copy; padding rows see no key
            rows = slice(tile_start, min(tile_start + bn, nq))
            n_rows = rows.stop - rows.start
            q_tile = np.zeros((batch, heads, bn, head_dim))
            y_tile = np.zeros((batch, heads, bn, width))
            lse_tile = np.zeros((batch, heads, bn))
            count_tile = np.zeros((batch, bn), dtype=np.int64)
            q_tile[:, :, :n_rows] = q[:, :, rows]
            y_tile[:, :, :n_rows] = y[:, :, rows]
            lse_tile[:, :, :n_rows] = lse[:, :, rows]
            count_tile[:, :n_rows] = counts[:, rows]

            # scores (keys x rows): the chunked dot over d, then scale and lse
            dot = None
            for c0 in range(0, head_dim, chunk):
                part = k[:, :, :, None, c0] * q_tile[:, :, None, :, c0]
                for c in range(c0 + 1, c0 + chunk):
                    part = part + k[:, :, :, None, c] * q_tile[:, :, None, :, c]
                dot = part if dot is None else dot + part
            x = dot * scale + (-lse_tile[:, :, None, :])
            visible = key_idx[None, None, :, None] < count_tile[:, None, None, :]
            p = exp_nonpositive(np.where(visible, x, -np.inf))

            for i in range(bn):
                acc = acc + p[..., i, None] * y_tile[:, :, None, i, :]
    return acc


def times_per_query_head(times, q, k, x, **kwargs):
    """A_h X_h for an X per *query* head (B, H, Nk, l), with an A·X operator whose X is per
    key head: G = H / Hkv calls, call j on query heads ``j::G`` (one per group). Returns (AX, lse)."""
    heads, kv_heads = q.shape[1], k.shape[1]
    group = heads // kv_heads
    if group == 1:
        return times(q, k, x, **kwargs)
    out = np.empty((*q.shape[:3], x.shape[-1]))
    lse = np.empty(q.shape[:3])
    for j in range(group):
        out[:, j::group], lse[:, j::group] = times(q[:, j::group], k, x[:, j::group], **kwargs)
    return out, lse


def randomized_svd_mirror(q, k, rank, *, oversample=10, power_iters=2, seed=0, causal=False, scale=None,
                          key_lengths=None, order=None):
    """The randomized SVD of A through `attention_times_ref` and `attention_transpose_times_ref`.

    Same Ω, steps and truncation as `randomized_svd_ref` on ``attention_matrix(q, k)``,
    so the two agree up to rounding. Returns (U (B, H, Nq, k), sigma (B, H, k),
    Vt (B, H, k, Nk), lse (B, H, Nq)).
    """
    q = np.asarray(q, dtype=np.float64)
    k = np.asarray(k, dtype=np.float64)
    batch, heads, nq, _ = q.shape
    nk = k.shape[2]
    validate_lowrank_params(rank, nq, nk, oversample=oversample, power_iters=power_iters, seed=seed)
    width = min(rank + oversample, nq, nk)
    omega = np.random.default_rng(seed).standard_normal((batch, heads, nk, width))
    masks = {"key_lengths": key_lengths, "causal": causal, "scale": scale, "order": order}
    y, lse = times_per_query_head(attention_times_ref, q, k, omega, **masks)
    basis, _ = np.linalg.qr(y)
    for _ in range(power_iters):
        z, _ = np.linalg.qr(attention_transpose_times_ref(q, k, basis, lse, **masks))
        basis, _ = np.linalg.qr(times_per_query_head(attention_times_ref, q, k, z, **masks)[0])
    b = np.swapaxes(attention_transpose_times_ref(q, k, basis, lse, **masks), -1, -2)
    u_small, sigma, vt = np.linalg.svd(b, full_matrices=False)
    return (basis @ u_small)[..., :rank], sigma[..., :rank], vt[..., :rank, :], lse


# --------------------------------------------------------------------------------------
# Error estimates and rank selection (array-method code: NumPy or CuPy arrays alike)
# --------------------------------------------------------------------------------------


def residual_norms(target, u, coeffs, upto: int):
    """Squared column norms of ``target - U_k coeffs_k`` for k = 0 .. upto: (..., upto + 1, w).

    target (..., m, w), u (..., m, >= upto), coeffs (..., >= upto, w).
    The residual is formed by subtraction, one component at a time, never from a difference
    of squared norms, so small errors keep their relative accuracy.
    """
    residual = target.copy()
    norms = [(residual * residual).sum(axis=-2)]
    for i in range(upto):
        residual -= u[..., :, i : i + 1] * coeffs[..., i : i + 1, :]
        norms.append((residual * residual).sum(axis=-2))
    return _stack(norms, axis=-2, like=target)


def _stack(arrays, axis, like):
    """np.stack or cupy.stack, whichever `like` belongs to."""
    module = type(like).__module__.split(".")[0]
    if module == "cupy":
        import cupy

        return cupy.stack(arrays, axis=axis)
    return np.stack(arrays, axis=axis)


def error_estimates(probe_norms2):
    """(Frobenius estimate, spectral bound) of E from the squared norms ``‖E ω_i‖²`` (..., r).

    ``sqrt(mean_i ‖E ω_i‖²)`` has ``E[estimate²] = ‖E‖_F²``; ``10 sqrt(2/π) max_i ‖E ω_i‖``
    bounds ``‖E‖₂`` except with probability <= 10^-r (HMT Lemma 4.1).
    """
    return probe_norms2.mean(axis=-1) ** 0.5, BOUND_FACTOR * probe_norms2.max(axis=-1) ** 0.5


def first_rank_meeting(ok):
    """Smallest k >= 1 with ok[..., k - 1] True, 0 where none: ok (..., K) bool -> (...) int."""
    ok = np.asarray(ok)
    return np.where(ok.any(axis=-1), ok.argmax(axis=-1) + 1, 0)


def energy_met(sigma, total_energy, energy):
    """Where ``Σ_{i<=k} σ_i² >= energy · total_energy``, for k = 1 .. K: sigma (..., K) -> bool (..., K).

    The energy is the squared (Frobenius) one of A. Seed 001's rule normalises by Σσ
    before squaring and applies it to the scores S, whose rank is at most d; this is
    the rule on A's squared singular values, as it intends.
    """
    sigma = np.asarray(sigma, dtype=np.float64)
    total = np.asarray(total_energy, dtype=np.float64)[..., None]
    return np.cumsum(sigma**2, axis=-1) >= (energy - ENERGY_SLACK) * total


def budget_met(output_error, output_norm, tolerance):
    """Where ``‖(A - Â_k) V‖_F <= tolerance · ‖A V‖_F``: output_error (..., K), output_norm (...) -> bool.

    No division: a zero output (every key hidden) meets any tolerance.
    """
    output_norm = np.asarray(output_norm, dtype=np.float64)[..., None]
    return np.asarray(output_error, dtype=np.float64) <= tolerance * output_norm
