"""`nkattn.attention`: input validation, backend registry and dispatch.

Backends declare what they support and give human-readable reasons when they
cannot take a request; `attention` walks them in priority order and, when none
fits, raises with every backend's reasons. All validation happens on the host
before any launch (numba.cuda kernels cannot raise).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from nkattn.reference.exact import SUPPORTED_HEAD_DIMS, attention_ref, default_scale

METHODS = ("exact",)
BACKENDS = ("cuda", "reference")
SUPPORTED_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


@dataclass(frozen=True)
class Request:
    method: str
    dtype: np.dtype
    head_dim: int
    on_device: bool


def _is_device_array(x) -> bool:
    # the simulator's device arrays (FakeCUDAArray) carry no __cuda_array_interface__
    return hasattr(x, "__cuda_array_interface__") or type(x).__name__ == "FakeCUDAArray"


def _numba_view(x):
    """A numba device array over `x`'s memory, without a copy."""
    if hasattr(x, "copy_to_host"):  # already a numba (or simulator) device array
        return x
    from numba import cuda

    return cuda.as_cuda_array(x)


def _framework(x) -> str:
    module = type(x).__module__.split(".")[0]
    if module in ("torch", "cupy"):
        return module
    return "numba"


def _cuda_available() -> bool:
    from numba import cuda

    try:
        return bool(cuda.is_available())
    except Exception:  # a broken driver install reads as "no GPU", with the reason in backend_status
        return False


def _cuda_reasons(req: Request) -> list[str]:
    reasons = []
    if not _cuda_available():
        reasons.append("no CUDA GPU found and the CUDA simulator is off (set NUMBA_ENABLE_CUDASIM=1 to use it)")
    if req.method not in ("exact",):
        reasons.append(f"no CUDA kernel for method {req.method!r}")
    return reasons


def _reference_reasons(req: Request) -> list[str]:
    if req.method != "exact":
        return [f"no reference for method {req.method!r}"]
    return []


_BACKEND_REASONS = {"cuda": _cuda_reasons, "reference": _reference_reasons}


def backend_status() -> dict[str, list[str]]:
    """Each backend's reasons for refusing a float32 exact request ([] = usable)."""
    req = Request(method="exact", dtype=np.dtype(np.float32), head_dim=64, on_device=False)
    return {name: _BACKEND_REASONS[name](req) for name in BACKENDS}


def _shape_dtype(x):
    if hasattr(x, "__cuda_array_interface__"):
        cai = x.__cuda_array_interface__
        return tuple(cai["shape"]), np.dtype(cai["typestr"])
    return x.shape, x.dtype


def _validate(q, k, v, scale, key_lengths, method, backend):
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if backend not in (*BACKENDS, "auto"):
        raise ValueError(f"backend must be one of {(*BACKENDS, 'auto')}, got {backend!r}")
    arrays = {"q": q, "k": k, "v": v}
    on_device = {name: _is_device_array(x) for name, x in arrays.items()}
    for name, x in arrays.items():
        if not on_device[name] and not isinstance(x, np.ndarray):
            raise TypeError(
                f"{name} must be a NumPy array or a device array with __cuda_array_interface__, got {type(x).__name__}"
            )
    if len(set(on_device.values())) > 1:
        where = ", ".join(f"{n} on {'device' if d else 'host'}" for n, d in on_device.items())
        raise TypeError(f"q, k and v must all be host arrays or all device arrays, got {where}")
    shapes, dtypes = {}, {}
    for name, x in arrays.items():
        shapes[name], dtypes[name] = _shape_dtype(x)
    for name, shape in shapes.items():
        if len(shape) != 4:
            raise ValueError(f"{name} must have rank 4 (B, H, N, d), got shape {shape}")
    for name, dt in dtypes.items():
        if dt not in SUPPORTED_DTYPES:
            raise TypeError(f"{name} has dtype {dt}; supported: float32, float64")
    if len(set(dtypes.values())) > 1:
        raise TypeError(f"q, k, v must share one dtype, got q {dtypes['q']}, k {dtypes['k']}, v {dtypes['v']}")
    (bq, hq, nq, dq), (bk, hk, nk, dk) = shapes["q"], shapes["k"]
    if shapes["k"] != shapes["v"]:
        raise ValueError(f"k and v must have the same shape, got k {shapes['k']} and v {shapes['v']}")
    if bq != bk:
        raise ValueError(f"batch size mismatch: q {shapes['q']} has B={bq}, k {shapes['k']} has B={bk}")
    if dq != dk:
        raise ValueError(f"head dim mismatch: q {shapes['q']} has d={dq}, k {shapes['k']} has d={dk}")
    if min(bq, hq, hk) < 1:
        raise ValueError(f"B and H must be >= 1, got q {shapes['q']}, k {shapes['k']}")
    if nq < 1 or nk < 1:
        raise ValueError(f"sequence lengths must be >= 1, got Nq={nq} (q {shapes['q']}) and Nk={nk} (k {shapes['k']})")
    if hq % hk != 0:
        raise ValueError(f"q heads must be a multiple of k/v heads (grouped-query attention), got H={hq}, Hkv={hk}")
    if dq not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head dim d={dq} is not supported; supported: {SUPPORTED_HEAD_DIMS}")
    if scale is None:
        scale = default_scale(dq)
    else:
        if isinstance(scale, bool) or not isinstance(scale, (int, float, np.floating, np.integer)):
            raise TypeError(f"scale must be a real number, got {type(scale).__name__}")
        scale = float(scale)
        if not math.isfinite(scale) or scale <= 0:
            raise ValueError(f"scale must be finite and > 0, got {scale}")
    lengths = None
    if key_lengths is not None:
        # B integers: reading them to the host to validate costs one tiny copy
        lengths = np.asarray(_to_host(key_lengths))
        if lengths.ndim != 1 or lengths.shape[0] != bq:
            raise ValueError(f"key_lengths must have shape (B,) = ({bq},), got {lengths.shape}")
        if not np.issubdtype(lengths.dtype, np.integer):
            raise TypeError(f"key_lengths must be integers, got dtype {lengths.dtype}")
        if lengths.min() < 0 or lengths.max() > nk:
            raise ValueError(f"key_lengths must lie in [0, Nk={nk}], got min {lengths.min()} max {lengths.max()}")
        lengths = lengths.astype(np.int32)
    req = Request(method=method, dtype=dtypes["q"], head_dim=dq, on_device=on_device["q"])
    return req, scale, lengths


def _pick_backend(req: Request, backend: str) -> str:
    candidates = BACKENDS if backend == "auto" else (backend,)
    refusals = {}
    for name in candidates:
        reasons = _BACKEND_REASONS[name](req)
        if not reasons:
            return name
        refusals[name] = reasons
    lines = "; ".join(f"{name}: {', '.join(r)}" for name, r in refusals.items())
    raise ValueError(f"no backend can run method={req.method!r} dtype={req.dtype} d={req.head_dim}: {lines}")


def attention(
    q,
    k,
    v,
    *,
    method: str = "exact",
    causal: bool = False,
    scale: float | None = None,
    key_lengths=None,
    return_lse: bool = False,
    backend: str = "auto",
):
    """Attention ``softmax(scale · q kᵀ + mask) · v``; semantics in `nkattn.reference.exact`.

    q is (B, H, Nq, d); k and v are (B, Hkv, Nk, d) with H a multiple of Hkv. Inputs
    are NumPy arrays or device arrays (numba, CuPy, torch CUDA tensors, anything with
    ``__cuda_array_interface__``); the result is the same kind, same dtype, and inputs
    are never modified. ``scale`` defaults to 1/sqrt(d). ``key_lengths`` (B,) hides keys
    ``j >= key_lengths[b]``; ``causal`` is bottom-right aligned when Nq != Nk. Rows with
    no visible key give O = 0 and lse = -inf. Returns O, or (O, lse) with ``return_lse``.

    backend: "cuda" (a GPU, or the CUDA simulator when NUMBA_ENABLE_CUDASIM=1),
    "reference" (NumPy float64), or "auto" (the first that can run the request).
    """
    req, scale, lengths = _validate(q, k, v, scale, key_lengths, method, backend)
    chosen = _pick_backend(req, backend)
    causal = bool(causal)
    if chosen == "reference":
        out, lse = _run_reference(q, k, v, req, causal, scale, lengths)
    else:
        out, lse = _run_cuda(q, k, v, req, causal, scale, lengths)
    return (out, lse) if return_lse else out


def _to_host(x):
    if not _is_device_array(x):
        return x
    return _numba_view(x).copy_to_host()


def _run_reference(q, k, v, req, causal, scale, lengths):
    out, lse = attention_ref(_to_host(q), _to_host(k), _to_host(v), causal=causal, scale=scale, key_lengths=lengths)
    out, lse = out.astype(req.dtype), lse.astype(req.dtype)
    if req.on_device:
        return _like_input(q, out), _like_input(q, lse)
    return out, lse


def _like_input(template, host_array):
    """A device array of `template`'s framework holding `host_array`."""
    from numba import cuda

    fw = _framework(template)
    if fw == "torch":
        import torch

        return torch.from_numpy(host_array).to(template.device)
    if fw == "cupy":
        import cupy

        return cupy.asarray(host_array)
    return cuda.to_device(host_array)


def _empty_like_framework(template, shape, dtype):
    """Uninitialised device output in `template`'s framework and its numba view."""
    from numba import cuda

    fw = _framework(template)
    if fw == "torch":
        import torch

        t = torch.empty(shape, dtype=getattr(torch, np.dtype(dtype).name), device=template.device)
        return t, _numba_view(t)
    if fw == "cupy":
        import cupy

        c = cupy.empty(shape, dtype=dtype)
        return c, _numba_view(c)
    d = cuda.device_array(shape, dtype=dtype)
    return d, d


def _run_cuda(q, k, v, req, causal, scale, lengths):
    from numba import cuda

    from nkattn.cuda_kernels.exact import exact_attention

    batch, heads, nq, head_dim = _shape_dtype(q)[0]
    nk = _shape_dtype(k)[0][2]
    key_lengths = np.full(batch, nk, dtype=np.int32) if lengths is None else lengths
    if req.on_device:
        qd, kd, vd = (_numba_view(x) for x in (q, k, v))
        out, out_view = _empty_like_framework(q, (batch, heads, nq, head_dim), req.dtype)
        lse, lse_view = _empty_like_framework(q, (batch, heads, nq), req.dtype)
        exact_attention(qd, kd, vd, cuda.to_device(key_lengths), causal=causal, scale=scale, out=out_view, lse=lse_view)
        return out, lse
    qd, kd, vd = (cuda.to_device(np.ascontiguousarray(x)) for x in (q, k, v))
    out, lse = exact_attention(qd, kd, vd, cuda.to_device(key_lengths), causal=causal, scale=scale)
    return out.copy_to_host(), lse.copy_to_host()
