"""`nkattn.attention`: the checks every method shares, then dispatch through the method registry.

`plan` validates a call on the host before any launch (numba.cuda kernels cannot
raise): arrays, shapes, dtypes, masks, scale and flags here, the method's options
and rules in `nkattn.methods`; then it walks the method's backends in priority
order and, when none fits, raises with every backend's reasons. With precision="auto" it
first checks the data and chooses a format per head from it, then walks the backends.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import replace

import numpy as np

from nkattn import arrays
from nkattn.methods import (
    AUTO_DTYPES,
    BACKENDS,
    METHODS,
    PRECISION_POLICIES,
    PRECISIONS,
    Backend,
    Call,
    Request,
    check_flag,
    choose_head_formats,
    gpu_analyzers,
    method_options,
)
from nkattn.reference.exact import default_scale
from nkattn.reference.lsh import check_no_keys

logger = logging.getLogger(__name__)


class FallbackWarning(UserWarning):
    """backend="auto" ran device inputs on a host backend because no CUDA backend could take them."""


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
    return_entropy: bool = False,
    backend: str = "auto",
    lsh_bits: int | None = None,
    lsh_tables: int | None = None,
    seed: int | None = None,
    lsh_shared_qk: bool | None = None,
    table=None,
    check_finite: bool = True,
    precision: str | None = None,
    tolerance: float | None = None,
    return_decisions: bool = False,
    **options,
):
    """Attention ``softmax(scale · q kᵀ + mask) · v``; semantics in `nkattn.reference.exact`.

    q is (B, H, Nq, d); k is (B, Hkv, Nk, d) and v is (B, Hkv, Nk, dv) with H a
    multiple of Hkv. Inputs are NumPy arrays or device arrays (numba, CuPy, torch
    CUDA tensors, anything with ``__cuda_array_interface__``) of float16, bfloat16,
    float32 or float64; the result is the same kind and dtype (lse is float32 for
    float16 and bfloat16), and inputs are never modified. ``scale`` defaults to
    1/sqrt(d). ``key_lengths`` (B,) hides keys ``j >= key_lengths[b]``; ``causal`` is
    bottom-right aligned when Nq != Nk. Rows with no visible key give O = 0 and
    lse = -inf. Returns O, or (O, lse) with ``return_lse``; ``return_decisions`` appends what
    precision="auto" chose: (O, decisions) or (O, lse, decisions).

    return_entropy: also return each row's entropy ``H = lse - Σ p·s`` in nats (shape,
    dtype and kind of lse; 0 for a row with no visible key), after O and lse: (O, H),
    or (O, lse, H) with ``return_lse``. method="exact" only, on the FFMA kernel or the
    reference; every other backend refuses it with a reason.

    check_finite: True (default) raises ValueError, naming the tensor and the index,
    if q, k or v holds NaN or inf (checked where the data lives). False promises
    finite inputs; NaN and inf then propagate as `nkattn.reference.exact` says.

    backend: "cuda" (a GPU, or the CUDA simulator when NUMBA_ENABLE_CUDASIM=1),
    "reference" (NumPy float64 on the host), or "auto": the first of the method's
    backends that can run the call. For "exact", float16 and bfloat16 (and float32
    with a TF32 ``precision``, Hopper only) run on the tensor-core kernel (wgmma on Hopper,
    FlashAttention-2's mma.sync on the other GPUs from sm_80; any d and dv that
    are multiples of 8 up to 256); float32 and float64 on the FFMA kernel (d in
    (16, 32, 64, 128, 256), dv == d). Other calls run on the reference (device inputs
    then warn with `FallbackWarning`; pass backend="cuda" to get an error).

    precision: the arithmetic for float32 inputs. None or "fp32": float32 arithmetic (the FFMA
    kernel on a GPU); "tf32x3": the tensor-core kernel with each product split into three
    TF32 products (near float32 accuracy, see `nkattn.cuda_kernels.exact_tc`); "tf32": one
    TF32 product, like torch's allow_tf32 (about 1e-3 relative error).

    precision="auto" (method "exact", float32 or float64 inputs, finite whatever ``check_finite``
    says) with ``tolerance`` (a finite number > 0): per (batch, head) the cheapest format whose
    predicted relative error ‖O_f - O‖_F / ‖O‖_F is within tolerance, fp32 where none is
    (`nkattn.reference.precision`'s policy). Its analyzers run on the GPU, one streaming pass at
    O(N) memory (`nkattn.precision`), wherever the call may run on CUDA; otherwise on the host,
    in float64, from the dense scores. Each head runs in its format, rounded once from the
    input: on the reference, that format's float64 emulation (`nkattn.reference.precision.emulate`);
    on "cuda", the kernel a call in the format's dtype takes (fp32: FFMA; fp16, bf16: tensor
    cores), fp8 heads the FP8 kernel (`nkattn.cuda_kernels.fp8`, Hopper only: bf16-rounded heads
    quantized to e4m3 on the GPU), int8-fp16 heads the INT8 kernel (`nkattn.cuda_kernels.int8`,
    Hopper only, not run on a GPU yet: f16-rounded heads quantized to int8 on the GPU), and a
    reason naming the format and the heads for int8-fp8, which has no kernel yet. O and lse come back in the input dtype. The choice is logged at INFO (logger
    "nkattn.api", one line per call) and returned with ``return_decisions=True``: a
    `nkattn.reference.precision.Decisions`, with ``formats`` (B, H) and ``predicted``
    (B, H, len(FORMATS)), the predicted error of every format.

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
    q and k with its palettes (neither takes ``scale`` or ``seed``). Fitting and
    encoding run on the host (q and k are copied there) and need finite q and k.
    Semantics in `nkattn.reference.table`.

    method="lowrank" multiplies V by a rank-k approximation of every head's attention
    matrix, from a randomized SVD that never forms A (`nkattn.lowrank.lowrank_attention`):
    ``rank`` (an integer in [1, min(Nq, Nk)], or "auto", the default: per head the
    smallest k meeting ``tolerance``, 0.01 of the output, or ``energy``), ``oversample``
    (10), ``power_iters`` (2), ``seed`` (0); lse is exact attention's. Semantics in
    `nkattn.reference.lowrank`.

    ``**options`` passes the options of methods registered in `nkattn.methods`.
    """
    named = {"lsh_bits": lsh_bits, "lsh_tables": lsh_tables, "seed": seed, "lsh_shared_qk": lsh_shared_qk, "table": table,
             "tolerance": tolerance}
    options.update({name: value for name, value in named.items() if value is not None})
    return_lse = check_flag("return_lse", return_lse)
    return_decisions = check_flag("return_decisions", return_decisions)
    if return_decisions and precision not in PRECISION_POLICIES:
        raise ValueError(f"return_decisions=True returns the formats a precision in {PRECISION_POLICIES} chose per "
                         f"head, got precision={precision!r}")
    call, chosen = plan(q, k, v, method=method, causal=causal, scale=scale, key_lengths=key_lengths, backend=backend,
                        check_finite=check_finite, precision=precision, return_entropy=return_entropy, **options)
    head_formats = call.request.head_formats
    if head_formats is not None:
        logger.info("precision=%r, tolerance=%g, %s: %s", precision, head_formats.decisions.tolerance, chosen.label,
                    head_formats.summary())
    out, lse, *entropy = chosen.run(call)  # entropy: [H] when asked for
    result = ((out, lse) if return_lse else (out,)) + tuple(entropy)
    if return_decisions:
        result += (head_formats.decisions,)
    return result if len(result) > 1 else out


def plan(q, k, v, *, method="exact", causal=False, scale=None, key_lengths=None, backend="auto", check_finite=True,
         precision=None, return_entropy=False, **options) -> tuple[Call, Backend]:
    """Validate a call and choose its backend without running it: ``backend.run(call)`` runs it.

    Takes `attention`'s arguments (method options as keywords); raises what it raises.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {tuple(METHODS)}, got {arrays.describe_value(method)}")
    if backend not in (*BACKENDS, "auto"):
        raise ValueError(f"backend must be one of {(*BACKENDS, 'auto')}, got {arrays.describe_value(backend)}")
    entry = METHODS[method]
    opts = method_options(method, options)
    causal = check_flag("causal", causal)
    check_finite = check_flag("check_finite", check_finite)
    return_entropy = check_flag("return_entropy", return_entropy)
    derived = entry.keys_from_q(opts)
    if derived:
        check_no_keys(k, derived)
    elif k is None:
        raise TypeError("k is None: only a method that derives the keys from q takes k=None (method='lsh', lsh_shared_qk=True)")

    inputs = {"q": q, "k": k, "v": v} if not derived else {"q": q, "v": v}
    on_device = arrays.inputs_on_device(inputs)
    shapes = {name: arrays.shape_of(x) for name, x in inputs.items()}
    for name, shape in shapes.items():
        if len(shape) != 4:
            raise ValueError(f"{name} must have rank 4 (B, H, N, d), got shape {shape}")
    dtypes = {name: arrays.dtype_of(x, name) for name, x in inputs.items()}
    for name, dt in dtypes.items():
        if dt not in arrays.FLOAT_DTYPES:
            raise TypeError(f"{name} has dtype {dt}; supported: float16, bfloat16, float32, float64")
    if len(set(dtypes.values())) > 1:
        seen = ", ".join(f"{n} {dt}" for n, dt in dtypes.items())
        raise TypeError(f"q, k and v must share one dtype, got {seen}")
    dtype = dtypes["q"]

    batch, heads, nq, head_dim = shapes["q"]
    if derived:
        if shapes["v"][:3] != shapes["q"][:3]:
            raise ValueError(f"{derived} derives the keys from q, so v must be (B, H, Nq, dv) with q's "
                             f"{shapes['q'][:3]}, got v {shapes['v']}")
        shapes["k"] = shapes["q"]
    kb, kv_heads, nk, kd = shapes["k"]
    value_dim = shapes["v"][3]
    if shapes["v"][:3] != shapes["k"][:3]:
        raise ValueError(f"k and v must agree on (B, Hkv, Nk), got k {shapes['k']} and v {shapes['v']}")
    if kb != batch:
        raise ValueError(f"batch size mismatch: q {shapes['q']} has B={batch}, k {shapes['k']} has B={kb}")
    if kd != head_dim:
        raise ValueError(f"head dim mismatch: q {shapes['q']} has d={head_dim}, k {shapes['k']} has d={kd}")
    if min(batch, heads, kv_heads) < 1:
        raise ValueError(f"B and H must be >= 1, got q {shapes['q']}, k {shapes['k']}")
    if nq < 1 or nk < 1:
        raise ValueError(f"sequence lengths must be >= 1, got Nq={nq} (q {shapes['q']}) and Nk={nk} (k {shapes['k']})")
    if head_dim < 1 or value_dim < 1:
        raise ValueError(f"head dims must be >= 1, got d={head_dim} (q {shapes['q']}) and dv={value_dim} (v {shapes['v']})")
    if heads % kv_heads != 0:
        raise ValueError(f"q heads must be a multiple of k/v heads (grouped-query attention), got H={heads}, Hkv={kv_heads}")

    scale = arrays.check_scale(scale)
    lengths = arrays.host_key_lengths(key_lengths, batch, nk)
    if precision is not None:
        if not isinstance(precision, str):
            raise TypeError(f"precision must be None or a string such as 'fp32', got {arrays.describe_value(precision)}")
        if precision not in (*PRECISIONS, *PRECISION_POLICIES):
            raise ValueError(f"precision must be None or one of {(*PRECISIONS, *PRECISION_POLICIES)}, got {precision!r}")
        if precision in PRECISION_POLICIES:
            if precision not in entry.precision_policies:
                takers = " or ".join(f"method={m.name!r}" for m in METHODS.values() if precision in m.precision_policies)
                raise ValueError(f"precision={precision!r} applies to {takers} only; method={method!r} takes precision "
                                 f"None or one of {PRECISIONS}")
            if dtype not in AUTO_DTYPES:
                raise ValueError(f"precision={precision!r} rounds each head from the input down to its format, so it "
                                 f"takes float32 or float64 inputs; these are {dtype}")
        elif dtype != np.float32:
            raise ValueError(f"precision picks the arithmetic of float32 inputs; these are {dtype}")

    req = Request(
        method=method, dtype=dtype, batch=batch, heads=heads, kv_heads=kv_heads, nq=nq, nk=nk, head_dim=head_dim,
        value_dim=value_dim, causal=causal, key_lengths=lengths is not None, on_device=on_device, scale=scale,
        precision=precision, options=opts, entropy=return_entropy,
    )
    entry.check(req, frozenset(options))
    resolved_scale = default_scale(head_dim) if scale is None else scale
    needs = {name: f"method={entry.name!r} needs finite {name} whatever check_finite says: {why}"
             for name, why in entry.needs_finite.items() if name in inputs}
    if precision in PRECISION_POLICIES:
        # the policy reads the data, so the data is checked before any backend is asked
        needs = {name: f"precision={precision!r} needs finite {name} whatever check_finite says: its analyzers and "
                       "formats are defined on finite numbers" for name in inputs}
        _check_finite(inputs, dtype, check_finite, needs)
        on_gpu = gpu_analyzers(req, backend)
        req = replace(req, head_formats=choose_head_formats(req, q, k, v, lengths, resolved_scale, on_gpu=on_gpu))
        chosen = _pick_backend(entry.backends, req, backend)
    else:
        chosen = _pick_backend(entry.backends, req, backend)
        _check_finite(inputs, dtype, check_finite, needs)
    return Call(req, q, None if derived else k, v, lengths, resolved_scale), chosen


def _check_finite(inputs: dict, dtype, check_finite: bool, needs: dict[str, str]) -> None:
    """NaN or inf in an input is an error if check_finite, or if `needs` (name -> why) names it."""
    names = tuple(inputs) if check_finite else tuple(needs)
    for name in names:
        found = arrays.first_nonfinite(inputs[name], dtype)
        if found is None:
            continue
        index, value = found
        if name in needs:
            raise ValueError(f"{name} holds {value} at index {index}; {needs[name]}")
        raise ValueError(f"{name} holds {value} at index {index}; pass check_finite=False to let NaN and inf "
                         "propagate (semantics in nkattn.reference.exact)")


def _pick_backend(backends: tuple[Backend, ...], req: Request, backend: str) -> Backend:
    candidates = [b for b in backends if backend in ("auto", b.name)]
    refusals = []
    for candidate in candidates:
        reasons = candidate.supports(req)
        if not reasons:
            # device inputs leaving the GPU warn; another host backend's refusal is no reason to
            cuda_refusals = [(b, r) for b, r in refusals if b.name == "cuda"]
            if cuda_refusals and req.on_device and candidate.name == "reference":
                warnings.warn(
                    f"no CUDA backend can run this call ({_refusal_lines(cuda_refusals, '; ')}); running it on the "
                    "float64 reference on the host, device inputs copied there and back. Pass backend='reference' "
                    "to choose that, or backend='cuda' to make it an error.",
                    FallbackWarning, stacklevel=4,
                )
            return candidate
        refusals.append((candidate, reasons))
    what = f"method={req.method!r} on {req.dtype} inputs with d={req.head_dim}, dv={req.value_dim}"
    raise ValueError(f"no backend can run {what} (backend={backend!r}):\n  {_refusal_lines(refusals, chr(10) + '  ')}")


def _refusal_lines(refusals, separator: str) -> str:
    return separator.join(f"{b.label}: {'; '.join(reasons)}" for b, reasons in refusals)


def backend_status() -> dict[str, list[str]]:
    """Each backend's reasons for refusing a float32 exact call with d = 64 ([] = usable)."""
    families: dict[str, list[list[str]]] = {}
    for candidate, reasons in method_status("exact").items():
        families.setdefault(candidate.name, []).append(reasons)
    return {name: [] if any(not r for r in found) else [x for r in found for x in r] for name, found in families.items()}


def method_status(method: str, dtype=np.float32, head_dim: int = 64) -> dict[Backend, list[str]]:
    """Every backend of `method` and its reasons to refuse a plain call of `dtype` and `head_dim`."""
    entry = METHODS[method]
    req = Request(method=method, dtype=np.dtype(dtype), batch=1, heads=1, kv_heads=1, nq=128, nk=128,
                  head_dim=head_dim, value_dim=head_dim, causal=False, key_lengths=False, on_device=False,
                  scale=None, precision=None, options=method_options(method, {}))
    return {b: b.supports(req) for b in entry.backends}
