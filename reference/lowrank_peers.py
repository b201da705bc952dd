"""float64 references for the low-rank peers of the randomized SVD: Linformer, Nyströmformer, Performer.

Each replaces A = softmax(scale · q kᵀ) by a rank-k product ``Ã = left @ right`` with
left (B, H, Nq, k) and right (B, H, k, Nk), and its output is ``left @ (right @ V)``
(`peer_output`). At equal k they are compared with the randomized SVD and with the
Eckart–Young optimum in the `lowrank` study. They live in their own module because
they are baselines with their own semantics and no GPU kernel; `reference/lowrank.py`
is the path that has one.

* **Linformer** (Wang et al. 2020): keys and values are projected to k rows,
  ``Ã = softmax(scale · q (E K)ᵀ) F``, with E, F ∈ R^{k×Nk}. Linformer learns E and F;
  here they are seeded random matrices with iid N(0, 1/k) entries (its initialisation
  and the Johnson–Lindenstrauss setting of its Theorem 1), drawn as E then F from
  ``default_rng(seed)`` and shared by all batches and heads.
* **Nyströmformer** (Xiong et al. 2021): k landmarks are the means of k contiguous
  segments of the queries and of the keys (segments of ``np.array_split``: sizes differ
  by at most one when k does not divide N), ``Ã = softmax(q K̃ᵀ) · pinv(softmax(Q̃ K̃ᵀ)) ·
  softmax(Q̃ kᵀ)`` (each softmax scaled by `scale`). ``pinv="exact"`` is the
  Moore–Penrose pseudo-inverse (``np.linalg.pinv``, the method's ideal);
  ``pinv="iterative"`` is the paper's Newton–Schulz-type iteration (6 steps from
  ``Z₀ = Mᵀ / (‖M‖₁ ‖M‖_∞)``), which is what Nyströmformer runs.
* **Performer** (Choromanski et al. 2021), FAVOR+: m = k positive orthogonal random
  features ``φ(x) = exp(W x - ‖x‖²/2) / sqrt(m)`` of ``x = sqrt(scale) · q`` (or k),
  with ``E[φ(q)·φ(k)] = exp(scale · q·k)``; W stacks blocks of d orthonormal rows
  (QR of a Gaussian matrix), each row rescaled to the norm of an independent N(0, I_d)
  draw, so every row is marginally N(0, I_d). ``Ã = diag(φ(Q) φ(K)ᵀ 1)⁻¹ φ(Q) φ(K)ᵀ``.
  A per-query and a per-head constant are subtracted inside the exp for range; both
  cancel in the row normalisation.

All three are defined for unmasked (bidirectional) attention, as in their papers
(Linformer and Nyströmformer have no causal form). Grouped-query heads read their key
head as in `nkattn.reference.exact`.
"""

from __future__ import annotations

import numpy as np

from nkattn.reference.exact import _expand_kv_heads, default_scale

PINV_METHODS = ("exact", "iterative")
NYSTROM_ITERS = 6


def _softmax(s):
    p = np.exp(s - s.max(axis=-1, keepdims=True))
    return p / p.sum(axis=-1, keepdims=True)


def _inputs(q, k, rank, scale):
    q = np.asarray(q, dtype=np.float64)
    k = _expand_kv_heads(np.asarray(k, dtype=np.float64), q.shape[1])
    limit = min(q.shape[2], k.shape[2])
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or not 1 <= rank <= limit:
        raise ValueError(f"rank must be an integer in [1, min(Nq, Nk) = {limit}], got {rank!r}")
    scale = default_scale(q.shape[-1]) if scale is None else float(scale)
    return q, k, scale


def peer_output(left, right, v):
    """``left @ (right @ V)`` with V (B, Hkv, Nk, dv) read by key head: (B, H, Nq, dv)."""
    v = _expand_kv_heads(np.asarray(v, dtype=np.float64), left.shape[1])
    return left @ (right @ v)


def linformer_projections(rank: int, nk: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """E, F (rank, Nk) with iid N(0, 1/rank) entries, E drawn first."""
    rng = np.random.default_rng(seed)
    e = rng.standard_normal((rank, nk)) / np.sqrt(rank)
    f = rng.standard_normal((rank, nk)) / np.sqrt(rank)
    return e, f


def linformer_factors(q, k, rank, *, seed=0, scale=None, projections=None):
    """Linformer's ``Ã = softmax(scale · q (E k)ᵀ) F`` as (left, right); E, F from `seed` unless given."""
    q, k, scale = _inputs(q, k, rank, scale)
    e, f = linformer_projections(rank, k.shape[2], seed) if projections is None else projections
    left = _softmax(scale * q @ np.swapaxes(e @ k, -1, -2))
    return left, np.broadcast_to(f, (*q.shape[:2], *f.shape))


def segment_means(x, segments: int):
    """Means of `segments` contiguous row segments of x (..., N, d) -> (..., segments, d)."""
    return np.stack([part.mean(axis=-2) for part in np.array_split(x, segments, axis=-2)], axis=-2)


def iterative_pinv(m, iters: int = NYSTROM_ITERS):
    """Nyströmformer's iterative pseudo-inverse of a stack of square matrices.

    ``Z₀ = Mᵀ / (‖M‖₁ ‖M‖_∞)``, then ``Z ← ¼ Z (13 I - M Z (15 I - M Z (7 I - M Z)))``.
    """
    m = np.asarray(m, dtype=np.float64)
    eye = np.eye(m.shape[-1])
    norm_1 = np.abs(m).sum(axis=-2).max(axis=-1)[..., None, None]
    norm_inf = np.abs(m).sum(axis=-1).max(axis=-1)[..., None, None]
    z = np.swapaxes(m, -1, -2) / (norm_1 * norm_inf)
    for _ in range(iters):
        mz = m @ z
        z = 0.25 * z @ (13 * eye - mz @ (15 * eye - mz @ (7 * eye - mz)))
    return z


def nystrom_factors(q, k, rank, *, scale=None, pinv="exact", pinv_iters=NYSTROM_ITERS):
    """Nyströmformer with `rank` segment-mean landmarks, as (left, right) = (F̃ pinv(Ã), B̃)."""
    q, k, scale = _inputs(q, k, rank, scale)
    if pinv not in PINV_METHODS:
        raise ValueError(f"pinv must be one of {PINV_METHODS}, got {pinv!r}")
    q_land, k_land = segment_means(q, rank), segment_means(k, rank)
    kernel_1 = _softmax(scale * q @ np.swapaxes(k_land, -1, -2))
    kernel_2 = _softmax(scale * q_land @ np.swapaxes(k_land, -1, -2))
    kernel_3 = _softmax(scale * q_land @ np.swapaxes(k, -1, -2))
    inverse = np.linalg.pinv(kernel_2) if pinv == "exact" else iterative_pinv(kernel_2, pinv_iters)
    return kernel_1 @ inverse, kernel_3


def orthogonal_gaussian(rows: int, dim: int, rng) -> np.ndarray:
    """(rows, dim) with rows marginally N(0, I_dim), orthogonal within blocks of `dim` rows."""
    blocks = []
    for start in range(0, rows, dim):
        basis, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
        blocks.append(basis.T[: min(dim, rows - start)])
    directions = np.concatenate(blocks)
    return directions * np.linalg.norm(rng.standard_normal((rows, dim)), axis=1)[:, None]


def favor_logits(x, w):
    """``W x - ‖x‖²/2`` for the rows of x (..., N, d) and features W (m, d): (..., N, m)."""
    x = np.asarray(x, dtype=np.float64)
    return x @ w.T - 0.5 * (x * x).sum(axis=-1, keepdims=True)


def favor_features(x, w):
    """Positive random features ``φ(x) = exp(W x - ‖x‖²/2) / sqrt(m)``: ``E[φ(x)·φ(y)] = exp(x·y)``."""
    return np.exp(favor_logits(x, w)) / np.sqrt(w.shape[0])


def performer_factors(q, k, rank, *, seed=0, scale=None):
    """FAVOR+ with `rank` positive orthogonal random features, as (left, right)."""
    q, k, scale = _inputs(q, k, rank, scale)
    w = orthogonal_gaussian(rank, q.shape[-1], np.random.default_rng(seed))
    q_logits = favor_logits(np.sqrt(scale) * q, w)
    k_logits = favor_logits(np.sqrt(scale) * k, w)
    # constants per query row and per head, for range: they cancel in the row normalisation
    phi_q = np.exp(q_logits - q_logits.max(axis=-1, keepdims=True)) / np.sqrt(rank)
    phi_k = np.exp(k_logits - k_logits.max(axis=(-2, -1), keepdims=True)) / np.sqrt(rank)
    right = np.swapaxes(phi_k, -1, -2)
    normaliser = phi_q @ right.sum(axis=-1, keepdims=True)
    return phi_q / normaliser, right
