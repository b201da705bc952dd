"""Low-rank attention: a randomized SVD of A = softmax(scale · q kᵀ + mask) per (batch, head).

`lowrank_factors` returns U, σ, Vᵀ of a rank-k approximation Â_k of every head's
attention matrix, with an a-posteriori error estimate; `lowrank_attention` returns its
output Â_k · V and the lse of exact attention. Semantics (masks, grouped-query heads,
the operators A·X and Aᵀ·Y, the algorithm) are written once in
`nkattn.reference.lowrank`.

The algorithm needs only products with A and Aᵀ, 2q + 2 of them for q power
iterations, each an attention-like pass of width l = k + p:

* ``backend="cuda"``: the GPU operators ``nkattn.cuda_kernels.lowrank.attention_times``
  and ``attention_transpose_times`` stream A without materialising it (O(N·l)
  memory), in the input dtype. QR and the small SVD run in float64, with CuPy
  (cuSOLVER) on the GPU when CuPy is installed and the inputs are device arrays,
  otherwise with NumPy on the host (the N × l products cross PCIe each pass).
* ``backend="reference"``: float64 products with the explicit A of
  `nkattn.reference.lowrank.attention_matrix` (O(Nq·Nk) memory: the oracle of the
  operators, for tests and studies at N <= a few thousand).
* ``backend="auto"``: "cuda" for device arrays, "reference" for NumPy arrays.

Randomness: Ω (B, H, Nk, l) and then the error probes (B, H, Nk, r) are drawn, in that
order, from ``np.random.default_rng(seed)`` on the host, in float64; a fixed seed gives
fixed factors on either backend, up to the rounding of its operators.

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


@dataclass(frozen=True)
class LowRankFactors:
    """Â_k = U diag(sigma) Vt per (batch, query head), and what is known about its error.

    U (B, H, Nq, K), sigma (B, H, K), Vt (B, H, K, Nk) with K = max(rank): head (b, h)
    uses its first ``rank[b, h]`` components, the rest are zero. Rows of U whose query
    sees no key are zero. Arrays are NumPy, or CuPy when the linear algebra ran on the GPU.

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
# Operators: A·X and Aᵀ·Y for an X or Y per query head, float64 in and out
# --------------------------------------------------------------------------------------


class _DenseOperators:
    """backend="reference": float64 products with the explicit A (the oracle)."""

    xp = np

    def __init__(self, q, k, p: _Problem):
        q, k = (arrays.to_host(x, p.dtype) for x in (q, k))
        self.a, self.lse = attention_matrix(q, k, causal=p.causal, scale=p.scale, key_lengths=p.key_lengths,
                                            return_lse=True)

    def times(self, x):
        return self.a @ x

    def transpose_times(self, y):
        return np.swapaxes(self.a, -1, -2) @ y


def _cupy_or_none(p: _Problem):
    if not p.on_device:
        return None
    try:
        import cupy
    except ImportError:
        return None
    return cupy


class _CudaOperators:
    """backend="cuda": the GPU operators of `nkattn.cuda_kernels.lowrank`, in the input dtype.

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

        self.cuda, self.kernels, self.p = cuda, kernels, p
        self.max_width = kernels.max_width(p.dtype, p.head_dim)
        self.xp = _cupy_or_none(p) or np
        self.q, self.k = (self._device(x) for x in (q, k))
        lengths = np.full(p.batch, p.nk, dtype=np.int32) if p.key_lengths is None else p.key_lengths
        self.key_lengths = cuda.to_device(lengths)
        self.lse = None  # xp float64, set by the first A·X pass
        self._lse_device = None

    def _device(self, x):
        """A numba view of a device input, or a device copy of a host one."""
        if arrays.is_device_array(x):
            return arrays.numba_view(x)
        return self.cuda.to_device(np.ascontiguousarray(x))

    def _upload(self, x):
        """float64 xp array -> (numba device array in the problem dtype, the object owning its memory)."""
        if self.xp is np:
            device = self.cuda.to_device(np.ascontiguousarray(x, dtype=self.p.dtype))
            return device, device
        owner = self.xp.ascontiguousarray(x.astype(self.p.dtype))
        return self.cuda.as_cuda_array(owner), owner

    def _download(self, device):
        if self.xp is np:
            return device.copy_to_host().astype(np.float64)
        return self.xp.asarray(device).astype(np.float64)

    def _by_columns(self, product, rhs):
        chunks = [product(rhs[..., c : c + self.max_width]) for c in range(0, rhs.shape[-1], self.max_width)]
        return chunks[0] if len(chunks) == 1 else self.xp.concatenate(chunks, axis=-1)

    def times(self, x):
        return self._by_columns(self._times, x)

    def transpose_times(self, y):
        return self._by_columns(self._transpose_times, y)

    def _times(self, x):
        p, cuda = self.p, self.cuda
        xd, _owner = self._upload(x)
        out = cuda.device_array((p.batch, p.heads, p.nq, x.shape[-1]), dtype=p.dtype)
        lse = cuda.device_array((p.batch, p.heads, p.nq), dtype=p.dtype)
        group = p.heads // p.kv_heads
        for j in range(group):
            heads = slice(None) if group == 1 else slice(j, None, group)
            self.kernels.attention_times(self.q[:, heads], self.k, xd[:, heads], self.key_lengths, causal=p.causal,
                                         scale=p.scale, out=out[:, heads], lse=lse[:, heads])
        if self._lse_device is None:
            self._lse_device, self.lse = lse, self._download(lse)
        return self._download(out)

    def _transpose_times(self, y):
        p = self.p
        yd, _owner = self._upload(y)
        out = self.cuda.device_array((p.batch, p.heads, p.nk, y.shape[-1]), dtype=p.dtype)
        self.kernels.attention_transpose_times(self.q, self.k, yd, self._lse_device, self.key_lengths,
                                               causal=p.causal, scale=p.scale, out=out)
        return self._download(out)


# --------------------------------------------------------------------------------------
# The randomized SVD and rank selection
# --------------------------------------------------------------------------------------


@dataclass
class _Sketch:
    """One randomized SVD with l = min(rank + p, Nq, Nk) columns, and its error curves."""

    U: object  # (B, H, Nq, l)
    sigma: object  # (B, H, l)
    Vt: object  # (B, H, l, Nk)
    probe_norms2: object  # (B, H, l + 1, r): ‖(A - Â_k) ω_i‖² for k = 0 .. l
    output_norms2: object  # (B, H, rank + 1) or None: ‖(A - Â_k) V‖_F² for k = 0 .. rank
    output_norm2: object  # (B, H) or None: ‖A V‖_F²


def _sketch(ops, p: _Problem, rank, oversample, power_iters, seed, v_rows) -> _Sketch:
    xp = ops.xp
    width = min(rank + oversample, p.nq, p.nk)
    rng = np.random.default_rng(seed)
    omega = rng.standard_normal((p.batch, p.heads, p.nk, width))
    probes = rng.standard_normal((p.batch, p.heads, p.nk, ERROR_PROBES))
    first = [omega, probes] if v_rows is None else [omega, probes, v_rows]
    # probes and V ride along the first pass: their columns do not change Ω's (column-independent)
    y = ops.times(xp.asarray(np.concatenate(first, axis=-1)))
    y, a_probes, av = y[..., :width], y[..., width : width + ERROR_PROBES], y[..., width + ERROR_PROBES :]
    basis, _ = xp.linalg.qr(y)
    for _ in range(power_iters):
        z, _ = xp.linalg.qr(ops.transpose_times(basis))
        basis, _ = xp.linalg.qr(ops.times(z))
    u_small, sigma, vt = xp.linalg.svd(xp.swapaxes(ops.transpose_times(basis), -1, -2), full_matrices=False)
    u = basis @ u_small
    empty = ~xp.isfinite(ops.lse)  # rows that see no key are zero rows of A and of Â_k
    u[empty] = 0.0
    probe_coeffs = sigma[..., :, None] * (vt @ xp.asarray(probes))
    probe_norms2 = residual_norms(a_probes, u, probe_coeffs, width)
    output_norms2 = output_norm2 = None
    if v_rows is not None:
        output_coeffs = sigma[..., :, None] * (vt @ xp.asarray(v_rows))
        output_norms2 = residual_norms(av, u, output_coeffs, rank).sum(axis=-1)
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
    keep = xp.asarray(np.arange(size) < ranks[..., None])  # (B, H, K)
    out = {}
    for sketch, heads in parts:
        # heads decided by another sketch may need more components than this one has: their
        # (clipped) entries are masked out below
        at = np.minimum(ranks, sketch.sigma.shape[-1])
        index = xp.asarray(np.broadcast_to(at[..., None, None], (*ranks.shape, 1, ERROR_PROBES)))
        estimate, bound = error_estimates(xp.take_along_axis(sketch.probe_norms2, index, axis=-2)[..., 0, :])
        pieces = {
            "U": _fit(sketch.U, size, -1, xp) * keep[..., None, :],
            "sigma": _fit(sketch.sigma, size, -1, xp) * keep,
            "Vt": _fit(sketch.Vt, size, -2, xp) * keep[..., :, None],
            "error_estimate": estimate,
            "error_bound": bound,
        }
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
             measure_output) -> tuple[LowRankFactors, object]:
    ops = _CudaOperators(q, k, p) if backend == "cuda" else _DenseOperators(q, k, p)
    xp = ops.xp
    v_rows = None
    if v is not None and (measure_output or tolerance is not None):
        v_rows = _expand_kv_heads(np.asarray(arrays.to_host(v, p.dtype), dtype=np.float64), p.heads)
    kmax = min(p.nq, p.nk)
    if rank != "auto":
        sketch = _sketch(ops, p, rank, oversample, power_iters, seed, v_rows)
        ranks = np.full((p.batch, p.heads), rank)
        parts = [(sketch, np.ones_like(ranks, dtype=bool))]
    else:
        ranks = np.zeros((p.batch, p.heads), dtype=np.int64)
        parts, trial = [], min(AUTO_FIRST_RANK, kmax)
        while True:
            sketch = _sketch(ops, p, trial, oversample, power_iters, seed, v_rows)
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
    factors = LowRankFactors(f["U"], f["sigma"], f["Vt"], ranks, f["error_estimate"], f["error_bound"],
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
                          energy=energy, tolerance=tolerance, measure_output=True)
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
                     energy=energy, tolerance=tolerance, measure_output=False)
    values = xp.asarray(_expand_kv_heads(np.asarray(arrays.to_host(v, p.dtype), dtype=np.float64), p.heads))
    out = f.U @ (f.sigma[..., :, None] * (f.Vt @ values))
    return _like_input(q, out, p), _like_input(q, f.lse, p)


def _like_input(template, x, p: _Problem):
    """x (NumPy or CuPy, float64) as the inputs' kind and dtype."""
    x = x.astype(p.dtype)
    kind = arrays.framework(template)
    if hasattr(x, "__cuda_array_interface__") and kind in ("torch", "cupy"):  # a CuPy result stays on the device
        if kind == "torch":
            import torch

            return torch.from_dlpack(x)
        return x
    return arrays.from_host(template, _host(x))
