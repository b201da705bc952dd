"""`nkattn.attention`: input validation, backend registry and dispatch.

Backends declare what they support and give human-readable reasons when they
cannot take a request; `attention` walks them in priority order and, when none
fits, raises with every backend's reasons. All validation happens on the host
before any launch (numba.cuda kernels cannot raise).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from nkattn.reference.exact import SUPPORTED_HEAD_DIMS, attention_ref, default_scale
from nkattn.reference.lsh import lsh_attention_ref, validate_lsh_params

METHODS = ("exact", "lsh", "table")
LSH_DEFAULTS = {"lsh_bits": 8, "lsh_tables": 4, "seed": 0, "lsh_shared_qk": False}
TABLE_VARIANTS = ("dot", "seed")
BACKENDS = ("cuda", "reference")
SUPPORTED_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


@dataclass(frozen=True)
class Request:
    method: str
    dtype: np.dtype
    head_dim: int
    on_device: bool
    options: dict = field(default_factory=dict)


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
    if req.method not in METHODS:
        reasons.append(f"no CUDA kernel for method {req.method!r}")
    if req.method == "lsh":
        from nkattn.cuda_kernels.lsh import MAX_TABLES

        if req.options["lsh_tables"] > MAX_TABLES:
            reasons.append(f"the LSH kernel supports lsh_tables <= {MAX_TABLES}, got {req.options['lsh_tables']}")
    return reasons


def _reference_reasons(req: Request) -> list[str]:
    if req.method not in METHODS:
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


def _check_seed(seed):
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    return seed


def _method_options(method, options):
    """The method's keyword options with defaults; options of another method are an error."""
    given = {name: value for name, value in options.items() if value is not None}
    table = given.pop("table", None)
    if table is not None and method != "table":
        raise ValueError(f"table only applies to method='table', not method={method!r}")
    if method == "table":
        from nkattn.reference.table import TableCodebook

        table = "dot" if table is None else table
        if not (isinstance(table, TableCodebook) or (isinstance(table, str) and table in TABLE_VARIANTS)):
            raise ValueError(f"table must be one of {TABLE_VARIANTS} or a fitted TableCodebook, got {table!r}")
        seed = _check_seed(given.pop("seed", 0))
        if given:
            raise ValueError(f"{', '.join(sorted(given))} only apply to method='lsh', not method={method!r}")
        return {"table": table, "seed": seed}
    if method != "lsh":
        if given:
            raise ValueError(f"{', '.join(sorted(given))} only apply to method='lsh', not method={method!r}")
        return {}
    merged = {**LSH_DEFAULTS, **given}
    validate_lsh_params(merged["lsh_bits"], merged["lsh_tables"])
    _check_seed(merged["seed"])
    merged["lsh_shared_qk"] = bool(merged["lsh_shared_qk"])
    return merged


def _validate(q, k, v, scale, key_lengths, method, backend, options):
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if backend not in (*BACKENDS, "auto"):
        raise ValueError(f"backend must be one of {(*BACKENDS, 'auto')}, got {backend!r}")
    options = _method_options(method, options)
    shared_qk = options.get("lsh_shared_qk", False)
    if shared_qk:
        if k is not None:
            raise ValueError("lsh_shared_qk=True derives the keys from q (Reformer): pass k=None")
        k = q
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
    if shared_qk and shapes["v"] != shapes["q"]:
        raise ValueError(f"lsh_shared_qk=True needs v of q's shape {shapes['q']}, got {shapes['v']}")
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
    req = Request(method=method, dtype=dtypes["q"], head_dim=dq, on_device=on_device["q"], options=options)
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
    lsh_bits: int | None = None,
    lsh_tables: int | None = None,
    seed: int | None = None,
    lsh_shared_qk: bool | None = None,
    table=None,
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

    method="exact" is softmax attention; method="lsh" restricts every query to the
    keys that share a SimHash bucket with it in at least one of ``lsh_tables``
    tables of ``lsh_bits`` bits (default 8 bits, 4 tables; hyperplanes from
    ``seed``); ``lsh_shared_qk=True`` is Reformer's shared-QK mode (pass k=None).
    Semantics in `nkattn.reference.lsh`.

    method="table" reads every score from a 256 x 256 uint16 table indexed by
    per-row palette codes: ``table="dot"`` (default) fits k-means palettes to the
    rows of q and of k (seeded by ``seed``) with ``table ≈ scale · c_q c_kᵀ``;
    ``table="seed"`` is seed 004's Base17 L1-distance table with scores
    ``-table / 1000``; a fitted `nkattn.reference.table.TableCodebook` encodes
    q and k with its palettes. Fitting and encoding run on the host (q and k are
    copied there). Semantics in `nkattn.reference.table`.
    """
    options = dict(lsh_bits=lsh_bits, lsh_tables=lsh_tables, seed=seed, lsh_shared_qk=lsh_shared_qk, table=table)
    req, scale, lengths = _validate(q, k, v, scale, key_lengths, method, backend, options)
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


def _table_inputs(q, k, req, scale):
    """Palette codes and the uint16 table for method="table", fitted and encoded on the host."""
    from nkattn.reference.table import TableCodebook, dot_table, seed_table

    table = req.options["table"]
    qh, kh = _to_host(q), _to_host(k)
    if isinstance(table, TableCodebook):
        return table.encode_q(qh), table.encode_k(kh), table.table_u16, table.score_scale, table.score_offset
    fitted = dot_table(qh, kh, scale, seed=req.options["seed"]) if table == "dot" else seed_table(qh, kh)
    return fitted.q_codes, fitted.k_codes, fitted.table_u16, fitted.score_scale, fitted.score_offset


def _run_reference(q, k, v, req, causal, scale, lengths):
    if req.method == "table":
        from nkattn.reference.table import table_attention_ref

        q_codes, k_codes, table_u16, score_scale, score_offset = _table_inputs(q, k, req, scale)
        out, lse = table_attention_ref(q_codes, k_codes, table_u16, _to_host(v), score_scale=score_scale,
                                       score_offset=score_offset, causal=causal, key_lengths=lengths)
    elif req.method == "lsh":
        opts = req.options
        out, lse, _ = lsh_attention_ref(
            _to_host(q), None if k is None else _to_host(k), _to_host(v), bits=opts["lsh_bits"],
            tables=opts["lsh_tables"], seed=opts["seed"], causal=causal, scale=scale, key_lengths=lengths,
            shared_qk=opts["lsh_shared_qk"],
        )
    else:
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


def _cuda_launcher(req, q, k, scale):
    """The kernel launcher of a method, with the method's options bound."""
    if req.method == "table":
        from numba import cuda

        from nkattn.cuda_kernels.table import table_attention

        q_codes, k_codes, table_u16, score_scale, score_offset = _table_inputs(q, k, req, scale)

        def launch(qd, kd, vd, key_lengths, *, scale, **kw):
            return table_attention(cuda.to_device(q_codes), cuda.to_device(k_codes), table_u16, vd, key_lengths,
                                   score_scale=score_scale, score_offset=score_offset, **kw)

        return launch
    if req.method == "lsh":
        from nkattn.cuda_kernels.lsh import lsh_attention

        opts = req.options

        def launch(qd, kd, vd, key_lengths, **kw):
            return lsh_attention(
                qd, kd, vd, key_lengths, bits=opts["lsh_bits"], tables=opts["lsh_tables"], seed=opts["seed"],
                shared_qk=opts["lsh_shared_qk"], **kw,
            )

        return launch
    from nkattn.cuda_kernels.exact import exact_attention

    return exact_attention


def _run_cuda(q, k, v, req, causal, scale, lengths):
    from numba import cuda

    launch = _cuda_launcher(req, q, k, scale)
    batch, heads, nq, head_dim = _shape_dtype(q)[0]
    nk = nq if k is None else _shape_dtype(k)[0][2]
    key_lengths = np.full(batch, nk, dtype=np.int32) if lengths is None else lengths
    if req.on_device:
        qd, vd = _numba_view(q), _numba_view(v)
        kd = None if k is None else _numba_view(k)
        out, out_view = _empty_like_framework(q, (batch, heads, nq, head_dim), req.dtype)
        lse, lse_view = _empty_like_framework(q, (batch, heads, nq), req.dtype)
        launch(qd, kd, vd, cuda.to_device(key_lengths), causal=causal, scale=scale, out=out_view, lse=lse_view)
        return out, lse
    qd, vd = (cuda.to_device(np.ascontiguousarray(x)) for x in (q, v))
    kd = None if k is None else cuda.to_device(np.ascontiguousarray(k))
    out, lse = launch(qd, kd, vd, cuda.to_device(key_lengths), causal=causal, scale=scale)
    return out.copy_to_host(), lse.copy_to_host()
