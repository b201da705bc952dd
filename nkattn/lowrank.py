"""Low-rank attention: a randomized SVD of A = softmax(scale · q kᵀ + mask) per (batch, head).

`lowrank_factors` returns U, σ, Vᵀ of a rank-k approximation Â_k of every head's
attention matrix, with an a-posteriori error estimate; `lowrank_attention` returns its
output Â_k · V and the lse of exact attention. Semantics (masks, grouped-query heads,
the operators A·X and Aᵀ·Y, the algorithm) are written once in
`nkattn.reference.lowrank`.

The algorithm needs only products with A and Aᵀ, 2q + 2 of them for q power
iterations, each an attention-like pass of width l = k + p:

* ``backend="cuda"``: the GPU operators ``nkattn.cuda_kernels.lowrank.attention_times``
  and ``attention_transpose_times`` stream A without materialising it, in the input
  dtype. The linear algebra runs with CuPy (cuSOLVER) on the GPU when CuPy is
  installed and the inputs are device arrays, otherwise with NumPy on the host (the
  N × l products cross PCIe each pass).
* ``backend="reference"``: float64 products with the explicit A of
  `nkattn.reference.lowrank.attention_matrix` (O(Nq·Nk) memory: the oracle of the
  operators, for tests and studies at N <= a few thousand).
* ``backend="auto"``: "cuda" for device arrays, "reference" for NumPy arrays.

Memory and precision: every N × l array (the operands and products of the passes, the
basis, U and V) is stored in the input dtype (float64 on the reference backend), in two
work arrays that one randomized SVD reuses for all its passes; the factors are views of
them. The arithmetic of the linear algebra is float64 (Householder QR, the SVD, products
with small matrices), on a block of rows at a time: a QR over several blocks is a TSQR
(Demmel et al. 2012), so its temporaries are a block's (`LA_BLOCKS`). Orthonormalising
in the working precision would do for the range finder; float64 costs only a block's
temporaries here, and keeps σ (from a float64 R factor) free of float32 rounding in the
linear algebra. On the GPU a call holds the two work arrays, the lse and block
temporaries; `lowrank_attention` frees V's work array before it allocates its output,
so its peak is about Q, K, V, lse, one N × l array and the output (N × dv).

Randomness: Ω (B, H, Nk, l) and then the error probes (B, H, Nk, r) are drawn, in that
order, from ``np.random.default_rng(seed)`` on the host, in float64 (the probes only where
they are used: by `lowrank_factors` and the energy rule); a fixed seed gives fixed factors
on either backend, up to the rounding of its operators.

**rank="auto"** picks, per head, the smallest k that meets the rule, starting with the
randomized SVD at k = 16 and doubling it (a fresh rSVD each time) for the heads that
need more, up to min(Nq, Nk), where every rule is met:

* ``tolerance=τ`` (the default, τ = 0.01): ``‖(A - Â_k) V‖_F <= τ ‖A V‖_F``, measured
  exactly: V rides along the first A·X pass (width l + d instead of l), so the exact
  output A·V is known and the output error of every k is computed, not estimated.
* ``energy=ε``: ``Σ_{i<=k} σ̂_i² >= ε ‖A‖_F²``, with ``‖A‖_F² = ‖QᵀA‖_F² + ‖(I - QQᵀ)A‖_F²``
  and the second term estimated from the probes (unbiased, and small, so its noise is).
  Seed 001's rule intends this; its code sums σ instead of σ² and applies it to the
  scores S (rank <= d), where it always reports low rank.
* both given: both must hold.

Why the output budget is the default: the energy of A flatters it. The leading singular
direction of a softmax matrix (the row average) carries most of its energy, so an
energy threshold is met at ranks that still leave a large error in what attention
returns. On MiniLM (study `lowrank`, 720 heads at N = 512, results/lowrank/
minilm-auto.json), seed 001's 95% energy picks a median k of 18.5 and leaves a median
output error of 19% (up to 91%; 79% of heads above 10%); even 99% energy leaves 7.3%
(99.6% of heads above 1%). The 1% budget picks a median k of 134.5 (26% of N, 49-411
for the 10-90th percentile) and holds on every head, measured. Its cost is V's d extra
columns in one of the 2q + 2 passes.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise

import numpy as np

from nkattn import arrays
from nkattn.reference.exact import KERNEL_HEAD_DIMS, _expand_kv_heads, default_scale
from nkattn.reference.lowrank import (
    ERROR_PROBES,
    attention_matrix,
    budget_met,
    energy_met,
    error_estimates,
    first_rank_meeting,
    residual_norms,
    validate_lowrank_params,
)

BACKENDS = ("reference", "cuda")
DEFAULT_TOLERANCE = 0.01
AUTO_FIRST_RANK = 16
SUPPORTED_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
# The N × l linear algebra runs on row blocks, so that its float64 temporaries (a block cast
# to float64, cuSOLVER's copy of it, Q: ~6 blocks' worth of float32) stay near 0.05 of one
# N × l array at 128 blocks. At N = 1M, d = 64, l = 42 float32, lowrank_attention's last
# step (Q, K, V, lse, U and the output) sits 24 MB under issue 11's 1.1x budget; its block
# temporaries take 14 MB of that at 64 blocks, 7 MB at 128. Below 2 · LA_MIN_ROWS rows the
# whole array is factored at once.
LA_BLOCKS = 128
LA_MIN_ROWS = 4096


@dataclass(frozen=True)
class LowRankFactors:
    """Â_k = U diag(sigma) Vt per (batch, query head), and what is known about its error.

    U (B, H, Nq, K), sigma (B, H, K), Vt (B, H, K, Nk) with K = max(rank): head (b, h)
    uses its first ``rank[b, h]`` components, the rest are zero. Rows of U whose query
    sees no key are zero. Arrays are NumPy, or CuPy when the linear algebra ran on the GPU;
    U, Vt and lse in the input dtype on the cuda backend (float64 on the reference), the
    rest float64. At a fixed rank, U and Vt are views into the randomized SVD's work arrays
    (Vt possibly a transposed one).

    * error_estimate (B, H): estimate of ``‖A - Â_k‖_F`` (absolute; its square is unbiased).
    * error_bound (B, H): ``‖A - Â_k‖₂ <= error_bound`` except with probability <= 10^-5.
    * output_error (B, H) or None: ``‖(A - Â_k) V‖_F / ‖A V‖_F``, exact, when v was given.
    * lse (B, H, Nq): log-sum-exp of every row of exact attention (-inf for empty rows).
    """

    U: object
    sigma: object
    Vt: object
    rank: np.ndarray
    error_estimate: object
    error_bound: object
    output_error: object
    lse: object


# --------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Problem:
    batch: int
    heads: int
    kv_heads: int
    nq: int
    nk: int
    head_dim: int
    dtype: np.dtype
    on_device: bool
    scale: float
    causal: bool
    key_lengths: np.ndarray | None


def _validate(q, k, v, *, rank, oversample, power_iters, seed, causal, scale, key_lengths, backend, energy,
              tolerance) -> _Problem:
    if backend not in (*BACKENDS, "auto"):
        raise ValueError(f"backend must be one of {(*BACKENDS, 'auto')}, got {backend!r}")
    inputs = {"q": q, "k": k} if v is None else {"q": q, "k": k, "v": v}
    on_device = arrays.inputs_on_device(inputs)
    shapes, dtypes = {}, {}
    for name, x in inputs.items():
        shapes[name], dtypes[name] = arrays.shape_of(x), arrays.dtype_of(x, name)
        if len(shapes[name]) != 4:
            raise ValueError(f"{name} must have rank 4 (B, H, N, d), got shape {shapes[name]}")
        if dtypes[name] not in SUPPORTED_DTYPES:
            raise TypeError(f"{name} has dtype {dtypes[name]}; supported: float32, float64")
    if len(set(dtypes.values())) > 1:
        raise TypeError(f"q, k and v must share one dtype, got {', '.join(f'{n} {d}' for n, d in dtypes.items())}")
    (batch, heads, nq, head_dim), (batch_k, kv_heads, nk, head_dim_k) = shapes["q"], shapes["k"]
    if batch_k != batch or head_dim_k != head_dim:
        raise ValueError(f"k {shapes['k']} must match q {shapes['q']} in batch size and head dim")
    if v is not None and shapes["v"][:3] != shapes["k"][:3]:
        raise ValueError(f"v must have shape (B, Hkv, Nk, dv) = {shapes['k'][:3]} + (dv,), got {shapes['v']}")
    if min(batch, heads, kv_heads, head_dim) < 1 or nq < 1 or nk < 1:
        raise ValueError(f"every dimension must be >= 1, got q {shapes['q']}, k {shapes['k']}")
    if heads % kv_heads:
        raise ValueError(f"q heads must be a multiple of k heads (grouped-query attention), got H={heads}, Hkv={kv_heads}")
    chosen = backend if backend != "auto" else ("cuda" if on_device else "reference")
    if chosen == "cuda" and head_dim not in KERNEL_HEAD_DIMS:
        raise ValueError(f"head dim d={head_dim} is not supported by the cuda backend; supported: {KERNEL_HEAD_DIMS}")
    validate_lowrank_params(rank, nq, nk, oversample=oversample, power_iters=power_iters, seed=seed, energy=energy,
                            tolerance=tolerance)
    scale = arrays.check_scale(scale)
    if scale is None:
        scale = default_scale(head_dim)
    lengths = arrays.host_key_lengths(key_lengths, batch, nk)
    problem = _Problem(batch, heads, kv_heads, nq, nk, head_dim, dtypes["q"], on_device, scale, bool(causal),
                       lengths)
    return problem, chosen


# --------------------------------------------------------------------------------------
# Operators: A·X and Aᵀ·Y between two reused work arrays
# --------------------------------------------------------------------------------------


class _Operators:
    """Products with A between two work arrays ("slots") that one randomized SVD reuses for
    every pass: a pass reads one slot and writes the other, and the linear algebra works on
    them in place, so a sketch of width l holds 2·N·l values however many passes it makes.

    A slot is one flat array viewed as the contiguous (B, H, rows, width) the pass needs:
    the first pass is wider (the error probes and V ride along), the others l wide.
    Subclasses set ``xp`` (the array module of the slots) and ``dtype`` (their storage
    dtype) and implement ``times(src, dst, width)`` (slot dst = A · slot src) and
    ``transpose_times``.
    """

    def __init__(self, p: _Problem):
        self.p = p
        self._slots = None

    def allocate(self, width: int) -> None:
        """Two slots for passes up to `width` wide (those of an earlier sketch stay with its factors)."""
        p = self.p
        size = p.batch * p.heads * max(p.nq, p.nk) * width
        self._slots = [self.xp.empty(size, dtype=self.dtype) for _ in range(2)]

    def slot(self, i: int, rows: int, width: int):
        p = self.p
        return self._slots[i][: p.batch * p.heads * rows * width].reshape(p.batch, p.heads, rows, width)

    def fill(self, i: int, host: np.ndarray) -> None:
        """Slot i, viewed as `host`'s shape, set to `host` (NumPy, float64) in the storage dtype."""
        view = self.slot(i, *host.shape[-2:])
        if self.xp is np:
            view[...] = host
        else:
            view.set(host.astype(self.dtype))


class _DenseOperators(_Operators):
    """backend="reference": float64 products with the explicit A (the oracle)."""

    xp = np
    dtype = np.dtype(np.float64)

    def __init__(self, q, k, p: _Problem):
        super().__init__(p)
        q, k = (arrays.to_host(x, p.dtype) for x in (q, k))
        self.a, self.lse = attention_matrix(q, k, causal=p.causal, scale=p.scale, key_lengths=p.key_lengths,
                                            return_lse=True)

    def times(self, src, dst, width):
        np.matmul(self.a, self.slot(src, self.p.nk, width), out=self.slot(dst, self.p.nq, width))

    def transpose_times(self, src, dst, width):
        np.matmul(np.swapaxes(self.a, -1, -2), self.slot(src, self.p.nq, width), out=self.slot(dst, self.p.nk, width))


def _cupy_or_none(p: _Problem):
    if not p.on_device:
        return None
    try:
        import cupy
    except ImportError:
        return None
    return cupy


class _CudaOperators(_Operators):
    """backend="cuda": the GPU operators of `nkattn.cuda_kernels.lowrank`, in the input dtype.

    With CuPy the slots are device arrays that the kernels and the linear algebra share;
    without it they live on the host, and two device slots of the same size take each pass's
    operand and product across PCIe. Either way the device holds two N × l slots, and with
    CuPy the temporaries of one block of rows.

    Their A·X takes X per key head (like V); an X per query head is applied in G = H / Hkv
    calls on the query heads ``j::G`` (see `nkattn.reference.lowrank`), writing into views
    of one output. The lse of the first pass stays on the device for every Aᵀ·Y pass.
    Products wider than the kernels take (``max_width``: 256 columns, fewer where shared
    memory runs out) run in chunks of columns; a column's arithmetic does not depend on
    the others, so chunking leaves the float64 bits unchanged.
    """

    def __init__(self, q, k, p: _Problem):
        from numba import cuda

        from nkattn.cuda_kernels import lowrank as kernels

        super().__init__(p)
        self.cuda, self.kernels = cuda, kernels
        self.max_width = kernels.max_width(p.dtype, p.head_dim)
        self.xp = _cupy_or_none(p) or np
        self.dtype = p.dtype
        self.q, self.k = (self._device(x) for x in (q, k))
        lengths = np.full(p.batch, p.nk, dtype=np.int32) if p.key_lengths is None else p.key_lengths
        self.key_lengths = cuda.to_device(lengths)
        self._lse_device = cuda.device_array((p.batch, p.heads, p.nq), dtype=p.dtype)
        self.lse = None  # xp, set by the first A·X pass
        self._device_slots = None

    def _device(self, x):
        """A numba view of a device input, or a device copy of a host one."""
        if arrays.is_device_array(x):
            return arrays.numba_view(x)
        return self.cuda.to_device(np.ascontiguousarray(x))

    def allocate(self, width):
        super().allocate(width)
        if self.xp is np:
            self._device_slots = [self.cuda.device_array(slot.size, dtype=self.dtype) for slot in self._slots]

    def _device_slot(self, i, rows, width):
        if self.xp is not np:
            return self.cuda.as_cuda_array(self.slot(i, rows, width))
        p = self.p
        return self._device_slots[i][: p.batch * p.heads * rows * width].reshape((p.batch, p.heads, rows, width))

    def _pass(self, product, src, dst, src_rows, dst_rows, width):
        x = self._device_slot(src, src_rows, width)
        out = self._device_slot(dst, dst_rows, width)
        if self.xp is np:
            x.copy_to_device(self.slot(src, src_rows, width))
        for c in range(0, width, self.max_width):
            cols = slice(c, c + self.max_width)
            product(x[:, :, :, cols], out[:, :, :, cols])
        if self.xp is np:
            out.copy_to_host(self.slot(dst, dst_rows, width))

    def times(self, src, dst, width):
        self._pass(self._times, src, dst, self.p.nk, self.p.nq, width)
        if self.lse is None:
            self.lse = self._lse_device.copy_to_host() if self.xp is np else self.xp.asarray(self._lse_device)

    def transpose_times(self, src, dst, width):
        self._pass(self._transpose_times, src, dst, self.p.nq, self.p.nk, width)

    def _times(self, x, out):
        p = self.p
        group = p.heads // p.kv_heads
        for j in range(group):
            heads = slice(None) if group == 1 else slice(j, None, group)
            self.kernels.attention_times(self.q[:, heads], self.k, x[:, heads], self.key_lengths, causal=p.causal,
                                         scale=p.scale, out=out[:, heads], lse=self._lse_device[:, heads])

    def _transpose_times(self, y, out):
        p = self.p
        self.kernels.attention_transpose_times(self.q, self.k, y, self._lse_device, self.key_lengths,
                                               causal=p.causal, scale=p.scale, out=out)


# --------------------------------------------------------------------------------------
# Linear algebra on N × l arrays: float64 arithmetic, a block of rows at a time
# --------------------------------------------------------------------------------------


def _row_blocks(n: int, width: int) -> list[slice]:
    """The row blocks the N × l linear algebra works on: at most `LA_BLOCKS`, each of at least
    `LA_MIN_ROWS` and `width` rows; one block (the whole array) below that."""
    count = min(LA_BLOCKS, n // max(LA_MIN_ROWS, width))
    if count <= 1:
        return [slice(0, n)]
    bounds = [n * i // count for i in range(count + 1)]
    return [slice(a, b) for a, b in pairwise(bounds)]


def _qr_into(src, dst, xp):
    """Write Q of ``src = Q R`` (..., N, l) into dst (which may be src) and return R (float64).

    One block: Householder QR of the whole array (LAPACK or cuSOLVER), as HMT prescribe.
    Several: TSQR (Demmel et al. 2012), equally stable: Q_i R_i of every block, then
    ``[R_1; ...; R_m] = Q_r R`` and ``Q = diag(Q_i) Q_r``; its temporaries are a block's, not
    the array's. The arithmetic is float64 either way; Q is stored in dst's dtype.
    """
    blocks = _row_blocks(*src.shape[-2:])
    if len(blocks) == 1:
        q, r = xp.linalg.qr(src.astype(np.float64, copy=False))
        dst[...] = q
        return r
    width = src.shape[-1]
    # the R factors are copied out: CuPy's R is a view of its block-sized factored matrix, so
    # keeping the views kept every block's float64 temporary alive (2 · N × l float32 in all)
    stacked = xp.empty(src.shape[:-2] + (len(blocks) * width, width), dtype=np.float64)
    for i, rows in enumerate(blocks):
        q, r = xp.linalg.qr(src[..., rows, :].astype(np.float64))
        dst[..., rows, :] = q
        stacked[..., i * width : (i + 1) * width, :] = r
        del q, r  # before the next block's QR allocates its own
    q_r, r = xp.linalg.qr(stacked)
    del stacked
    for i, rows in enumerate(blocks):
        dst[..., rows, :] = dst[..., rows, :].astype(np.float64) @ q_r[..., i * width : (i + 1) * width, :]
    return r


def _times_small_into(x, m, xp) -> None:
    """x = x · m in place, for x (..., N, l) and a small float64 m (..., l, l)."""
    for rows in _row_blocks(*x.shape[-2:]):
        x[..., rows, :] = x[..., rows, :].astype(np.float64, copy=False) @ m


def _times_small(x, m, dtype, xp):
    """x · m (..., N, w) as a new array of `dtype`, for x (..., N, l) and a small float64 m (..., l, w)."""
    out = xp.empty(x.shape[:-1] + m.shape[-1:], dtype=dtype)
    for rows in _row_blocks(*x.shape[-2:]):
        out[..., rows, :] = x[..., rows, :].astype(np.float64, copy=False) @ m
    return out


def _svd_rows(b, xp):
    """``Bᵀ = Ũ diag(σ) Vᵀ`` for b = B (..., N, l): (Ũ, σ, Vᵀ), Ũ and σ float64, Vᵀ (..., l, N) in b's dtype.

    One block: the SVD of Bᵀ itself. Several: ``B = Q_b R`` by TSQR, ``Rᵀ = Ũ Σ Wᵀ``, so
    ``Vᵀ = (Q_b W)ᵀ``, written over b and returned as a transposed view of it.
    """
    if len(_row_blocks(*b.shape[-2:])) == 1:
        u_small, sigma, vt = xp.linalg.svd(xp.swapaxes(b.astype(np.float64, copy=False), -1, -2), full_matrices=False)
        return u_small, sigma, vt.astype(b.dtype, copy=False)
    r = _qr_into(b, b, xp)
    u_small, sigma, wt = xp.linalg.svd(xp.swapaxes(r, -1, -2))
    _times_small_into(b, xp.swapaxes(wt, -1, -2), xp)
    return u_small, sigma, xp.swapaxes(b, -1, -2)


def _project(vt, rhs: np.ndarray, xp):
    """Vᵀ · rhs (..., l, w) float64, for vt (..., l, N) and a host float64 rhs (..., N, w)."""
    total = None
    for rows in _row_blocks(vt.shape[-1], vt.shape[-2]):
        part = vt[..., :, rows].astype(np.float64, copy=False) @ xp.asarray(rhs[..., rows, :])
        total = part if total is None else total + part
    return total


def _residual_norms(target, u, coeffs, upto: int):
    """`residual_norms` of target (..., N, w) against U (..., N, l), summed over row blocks, in float64."""
    total = None
    for rows in _row_blocks(*u.shape[-2:]):
        part = residual_norms(target[..., rows, :].astype(np.float64, copy=False),
                              u[..., rows, :].astype(np.float64, copy=False), coeffs, upto)
        total = part if total is None else total + part
    return total


# --------------------------------------------------------------------------------------
# The randomized SVD and rank selection
# --------------------------------------------------------------------------------------


@dataclass
class _Sketch:
    """One randomized SVD with l = min(rank + p, Nq, Nk) columns, and its error curves."""

    U: object  # (B, H, Nq, l), a view of a slot
    sigma: object  # (B, H, l)
    Vt: object  # (B, H, l, Nk)
    probe_norms2: object  # (B, H, l + 1, r) or None: ‖(A - Â_k) ω_i‖² for k = 0 .. l
    output_norms2: object  # (B, H, rank + 1) or None: ‖(A - Â_k) V‖_F² for k = 0 .. rank
    output_norm2: object  # (B, H) or None: ‖A V‖_F²


def _sketch(ops, p: _Problem, rank, oversample, power_iters, seed, v_rows, probes: bool) -> _Sketch:
    xp = ops.xp
    width = min(rank + oversample, p.nq, p.nk)
    rng = np.random.default_rng(seed)
    first = [rng.standard_normal((p.batch, p.heads, p.nk, width))]
    if probes:
        probe_rows = rng.standard_normal((p.batch, p.heads, p.nk, ERROR_PROBES))
        first.append(probe_rows)
    if v_rows is not None:
        first.append(v_rows)
    first = np.concatenate(first, axis=-1)
    ops.allocate(first.shape[-1])
    ops.fill(0, first)
    # probes and V ride along the first pass: their columns do not change Ω's (column-independent)
    ops.times(0, 1, first.shape[-1])
    y = ops.slot(1, p.nq, first.shape[-1])
    riders = y[..., width:].copy()  # A·probes and A·V, before slot 1 is reused
    basis = ops.slot(0, p.nq, width)
    _qr_into(y[..., :width], basis, xp)
    for _ in range(power_iters):
        ops.transpose_times(0, 1, width)
        _qr_into(ops.slot(1, p.nk, width), ops.slot(1, p.nk, width), xp)
        ops.times(1, 0, width)
        _qr_into(basis, basis, xp)
    ops.transpose_times(0, 1, width)
    u_small, sigma, vt = _svd_rows(ops.slot(1, p.nk, width), xp)
    _times_small_into(basis, u_small, xp)
    u = basis
    empty = ~xp.isfinite(ops.lse)  # rows that see no key are zero rows of A and of Â_k
    # not u[empty] = 0: CuPy's boolean-mask assignment broadcasts the mask to u's shape and
    # scans it, an N × l copy of the mask and an int32 N × l prefix sum
    xp.copyto(u, u.dtype.type(0), where=empty[..., None])
    probe_norms2 = output_norms2 = output_norm2 = None
    if probes:
        probe_coeffs = sigma[..., :, None] * _project(vt, probe_rows, xp)
        probe_norms2 = _residual_norms(riders[..., :ERROR_PROBES], u, probe_coeffs, width)
    if v_rows is not None:
        output_coeffs = sigma[..., :, None] * _project(vt, v_rows, xp)
        output_norms2 = _residual_norms(riders[..., -v_rows.shape[-1] :], u, output_coeffs, rank).sum(axis=-1)
        output_norm2 = output_norms2[..., 0]
    return _Sketch(u, sigma, vt, probe_norms2, output_norms2, output_norm2)


def _host(x):
    """A small per-head array as NumPy (from NumPy or CuPy)."""
    return x.get() if hasattr(x, "get") else np.asarray(x)


def _ranks_meeting(s: _Sketch, upto: int, energy, tolerance) -> np.ndarray:
    """Per head, the smallest k <= upto that meets every given rule, 0 where none: (B, H)."""
    ok = np.ones(s.sigma.shape[:-1] + (upto,), dtype=bool)
    if energy is not None:
        sigma = _host(s.sigma)
        # ‖A‖_F² = ‖QᵀA‖_F² + ‖(I - QQᵀ)A‖_F²; the second term from the probes (k = l)
        total = (sigma**2).sum(axis=-1) + _host(s.probe_norms2[..., -1, :]).mean(axis=-1)
        ok &= energy_met(sigma[..., :upto], total, energy)
    if tolerance is not None:
        ok &= budget_met(_host(s.output_norms2[..., 1 : upto + 1]) ** 0.5, _host(s.output_norm2) ** 0.5, tolerance)
    return first_rank_meeting(ok)


def _fit(x, size: int, axis: int, xp):
    """x cut or zero-padded to `size` along `axis`."""
    axis = axis % x.ndim
    if x.shape[axis] >= size:
        return x[(slice(None),) * axis + (slice(0, size),)]
    pad = list(x.shape)
    pad[axis] = size - x.shape[axis]
    return xp.concatenate([x, xp.zeros(pad, dtype=x.dtype)], axis=axis)


def _assemble(parts, ranks: np.ndarray, xp) -> dict:
    """Factors of every head from the sketch that decided it: parts is [(sketch, heads mask)]."""
    size = int(ranks.max())
    # one sketch and one rank (a fixed rank): its leading components are every head's, as
    # views, so the N × l factors are not copied
    uniform = len(parts) == 1 and (ranks == size).all()
    keep = xp.asarray(np.arange(size) < ranks[..., None])  # (B, H, K)
    out = {}
    for sketch, heads in parts:
        if uniform:
            pieces = {"U": sketch.U[..., :size], "sigma": sketch.sigma[..., :size], "Vt": sketch.Vt[..., :size, :]}
        else:
            # heads decided by another sketch may need more components than this one has: their
            # (clipped) entries are masked out below
            pieces = {
                "U": _fit(sketch.U, size, -1, xp) * keep[..., None, :],
                "sigma": _fit(sketch.sigma, size, -1, xp) * keep,
                "Vt": _fit(sketch.Vt, size, -2, xp) * keep[..., :, None],
            }
        if sketch.probe_norms2 is not None:
            at = np.minimum(ranks, sketch.sigma.shape[-1])
            index = xp.asarray(np.broadcast_to(at[..., None, None], (*ranks.shape, 1, ERROR_PROBES)))
            pieces["error_estimate"], pieces["error_bound"] = error_estimates(
                xp.take_along_axis(sketch.probe_norms2, index, axis=-2)[..., 0, :])
        if sketch.output_norms2 is not None:
            at = xp.asarray(np.minimum(ranks, sketch.output_norms2.shape[-1] - 1)[..., None])
            error2 = xp.take_along_axis(sketch.output_norms2, at, axis=-1)[..., 0]
            norm2 = sketch.output_norm2
            pieces["output_error"] = xp.sqrt(error2 / xp.where(norm2 > 0, norm2, 1.0))
        mask = xp.asarray(heads)
        for name, value in pieces.items():
            where = mask.reshape(mask.shape + (1,) * (value.ndim - mask.ndim))
            out[name] = value if name not in out else xp.where(where, value, out[name])
    return out


def _factors(q, k, v, p: _Problem, backend, *, rank, oversample, power_iters, seed, energy, tolerance,
             report) -> tuple[LowRankFactors, object]:
    """The factors and the array module they live in. ``report``: the caller returns the factors, with
    their error estimates and (given v) output error; otherwise probes and V join the first pass
    only where the rule of rank="auto" needs them (energy, tolerance)."""
    ops = _CudaOperators(q, k, p) if backend == "cuda" else _DenseOperators(q, k, p)
    xp = ops.xp
    probes = report or energy is not None
    v_rows = None
    if v is not None and (report or tolerance is not None):
        v_rows = _expand_kv_heads(np.asarray(arrays.to_host(v, p.dtype), dtype=np.float64), p.heads)
    kmax = min(p.nq, p.nk)
    if rank != "auto":
        sketch = _sketch(ops, p, rank, oversample, power_iters, seed, v_rows, probes)
        ranks = np.full((p.batch, p.heads), rank)
        parts = [(sketch, np.ones_like(ranks, dtype=bool))]
    else:
        ranks = np.zeros((p.batch, p.heads), dtype=np.int64)
        parts, trial = [], min(AUTO_FIRST_RANK, kmax)
        while True:
            sketch = _sketch(ops, p, trial, oversample, power_iters, seed, v_rows, probes)
            met = _ranks_meeting(sketch, trial, energy, tolerance)
            if trial == kmax:  # the full rank is exact: no rule can ask for more
                met = np.where(met > 0, met, kmax)
            decided = (ranks == 0) & (met > 0)
            if decided.any():
                ranks[decided] = met[decided]
                parts.append((sketch, decided))
            if (ranks > 0).all():
                break
            trial = min(2 * trial, kmax)
    f = _assemble(parts, ranks, xp)
    factors = LowRankFactors(f["U"], f["sigma"], f["Vt"], ranks, f.get("error_estimate"), f.get("error_bound"),
                             f.get("output_error"), ops.lse)
    return factors, xp


def _resolve_rule(rank, v, energy, tolerance, caller):
    """rank='auto' with neither rule given means the output budget, which needs v."""
    if rank == "auto" and energy is None and tolerance is None:
        tolerance = DEFAULT_TOLERANCE
    if tolerance is not None and v is None:
        raise ValueError(f"{caller}: rank='auto' with an output tolerance needs v (pass v, or energy= instead)")
    return tolerance


def lowrank_factors(q, k, v=None, *, rank, oversample=10, power_iters=2, seed=0, causal=False, scale=None,
                    key_lengths=None, backend="auto", energy=None, tolerance=None) -> LowRankFactors:
    """Rank-k factors U, σ, Vᵀ of every head's attention matrix A, with error estimates.

    q is (B, H, Nq, d), k (B, Hkv, Nk, d), H a multiple of Hkv; v (B, Hkv, Nk, dv) is
    optional: given, the exact relative output error ``‖(A - Â_k) V‖_F / ‖A V‖_F`` of
    every head is measured (V joins the first pass). NumPy or device arrays, float32
    or float64. ``rank`` is an integer in [1, min(Nq, Nk)] or "auto" (module
    docstring; the default rule, ``tolerance=0.01``, needs v). ``oversample`` p and
    ``power_iters`` q as in Halko–Martinsson–Tropp; ``seed`` fixes Ω. ``causal``,
    ``scale`` and ``key_lengths`` as in `nkattn.attention`. Returns `LowRankFactors`.
    """
    p, backend = _validate(q, k, v, rank=rank, oversample=oversample, power_iters=power_iters, seed=seed,
                           causal=causal, scale=scale, key_lengths=key_lengths, backend=backend, energy=energy,
                           tolerance=tolerance)
    tolerance = _resolve_rule(rank, v, energy, tolerance, "lowrank_factors")
    factors, _ = _factors(q, k, v, p, backend, rank=rank, oversample=oversample, power_iters=power_iters, seed=seed,
                          energy=energy, tolerance=tolerance, report=True)
    return factors


def lowrank_attention(q, k, v, *, rank, oversample=10, power_iters=2, seed=0, causal=False, scale=None,
                      key_lengths=None, backend="auto", energy=None, tolerance=None):
    """Attention through a rank-k approximation of A: returns (Â_k · V, lse).

    Arguments as `lowrank_factors`. ``rank = min(Nq, Nk)`` reproduces exact attention
    (up to rounding). lse is that of exact attention (-inf for rows with no visible key,
    whose output is 0). Returns arrays of the inputs' kind and dtype.
    """
    p, backend = _validate(q, k, v, rank=rank, oversample=oversample, power_iters=power_iters, seed=seed,
                           causal=causal, scale=scale, key_lengths=key_lengths, backend=backend, energy=energy,
                           tolerance=tolerance)
    tolerance = _resolve_rule(rank, v, energy, tolerance, "lowrank_attention")
    f, xp = _factors(q, k, v, p, backend, rank=rank, oversample=oversample, power_iters=power_iters, seed=seed,
                     energy=energy, tolerance=tolerance, report=False)
    values = _expand_kv_heads(np.asarray(arrays.to_host(v, p.dtype), dtype=np.float64), p.heads)
    weights = f.sigma[..., :, None] * _project(f.Vt, values, xp)  # (B, H, K, dv)
    u, lse = f.U, f.lse
    del f  # Vᵀ's slot is free before the output is allocated
    return _like_input(q, _times_small(u, weights, p.dtype, xp), p), _like_input(q, lse, p)


def _like_input(template, x, p: _Problem):
    """x (NumPy or CuPy) as the inputs' kind and dtype; a CuPy result stays where it is, viewed
    (not copied) as a torch or numba array."""
    x = x.astype(p.dtype, copy=False)
    kind = arrays.framework(template)
    if hasattr(x, "__cuda_array_interface__") and kind != "numpy":
        if kind == "torch":
            import torch

            return torch.from_dlpack(x)
        return x if kind == "cupy" else arrays.numba_view(x)
    return arrays.from_host(template, _host(x))
