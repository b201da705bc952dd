"""The method registry: every attention method, its options and the backends that run it.

A `Method` holds its options (defaults and checks), the module whose docstring
defines its semantics, and its backends in priority order. A `Backend` answers,
for a `Request` (what a call asks for, without its data), why it cannot run it
(``supports(request)`` -> human-readable reasons, [] when it can), and runs a
validated `Call`. `nkattn.attention` checks what all methods share, then this
module's `method_options` and the method's own `check`, then takes the first
backend without a reason to refuse; when none fits, the error lists every
backend's reasons. `nkattn info`, `nkattn run` and `nkattn bench` list the same
registry.

Adding a method: its float64 reference (``reference/<stem>.py``) and kernel
(``cuda_kernels/<stem>.py``), then a `Method` below (options, check, backends
built with `on_reference` and `on_cuda` from the two) and its name in `METHODS`.
Adding a backend to a method, e.g. a tensor-core kernel for "exact": a `Backend`
with its own ``supports`` and ``run``, placed in the method's ``backends`` before
the one it should be preferred to.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from nkattn import arrays
from nkattn.reference import lowrank as lowrank_ref
from nkattn.reference import lsh as lsh_ref
from nkattn.reference.exact import KERNEL_HEAD_DIMS


@dataclass(frozen=True)
class HeadFormats:
    """What precision='auto' chose from the data, before dispatch: the format of every head."""

    decisions: Any  # nkattn.reference.precision.Decisions: formats (B, H), tolerance, predicted errors
    sees_keys: np.ndarray  # (B, H): heads with a visible key; the others are O = 0, lse = -inf in every format

    def formats(self) -> list[str]:
        """The formats chosen for heads that see a key, cheapest first."""
        from nkattn.reference.precision import BY_COST

        return [f for f in BY_COST if (self.heads(f)[0]).size]

    def heads(self, fmt: str) -> tuple[np.ndarray, np.ndarray]:
        """(b, h) indices, in C order, of the heads that chose `fmt` and see a key."""
        return np.nonzero((self.decisions.formats == fmt) & self.sees_keys)

    def summary(self) -> str:
        """One line: every format chosen and its heads (those that see no key included)."""
        from nkattn.reference.precision import BY_COST

        formats = self.decisions.formats
        return "; ".join(f"{f} on {heads_text(*np.nonzero(formats == f), formats.size)}"
                         for f in BY_COST if (formats == f).any())


def heads_text(bs, hs, total: int, shown: int = 8) -> str:
    """'2 of 12 heads, (b, h) = (0, 1), (1, 4)', the first `shown` heads listed."""
    pairs = [f"({b}, {h})" for b, h in zip(bs.tolist(), hs.tolist())]
    more = f", ... ({len(pairs) - shown} more)" if len(pairs) > shown else ""
    return f"{len(pairs)} of {total} heads, (b, h) = {', '.join(pairs[:shown])}{more}"


@dataclass(frozen=True)
class Request:
    """What a call asks for, without its data: enough for a backend to accept or refuse it
    (precision='auto' adds the formats it chose per head from the data)."""

    method: str
    dtype: np.dtype  # of q, k and v: float16, bfloat16, float32 or float64
    batch: int
    heads: int  # H, query heads
    kv_heads: int  # Hkv, key/value heads; H is a multiple
    nq: int
    nk: int
    head_dim: int  # d, of q and k
    value_dim: int  # dv, of v
    causal: bool
    key_lengths: bool  # a key_lengths mask was given
    on_device: bool  # device arrays in, device arrays of the same framework out
    scale: float | None  # as the caller gave it; None: the method's default
    precision: str | None  # float32 arithmetic asked for, or "auto" (a format per head); None: the backend's own
    options: Mapping[str, Any] = field(default_factory=dict)  # the method's, checked, defaults filled in
    head_formats: HeadFormats | None = None  # precision="auto" only
    entropy: bool = False  # the row entropy asked for (return_entropy=True)


@dataclass(frozen=True)
class Call:
    """A validated call: its request and the caller's arrays."""

    request: Request
    q: Any
    k: Any  # None when the method derives the keys from q
    v: Any
    key_lengths: np.ndarray | None  # int32 (B,), on the host
    scale: float  # the default resolved


@dataclass(frozen=True)
class Backend:
    name: str  # what ``backend=`` selects: "cuda" or "reference"
    label: str  # how errors and `nkattn info` name it
    supports: Callable[[Request], list[str]]  # why it cannot run a request ([]: it can)
    run: Callable[[Call], tuple]  # (O, lse), then the row entropy if asked for, as arrays of the caller's kind
    arithmetic: str  # how it computes, for `nkattn info`
    deterministic: bool = True  # repeated calls give identical bits
    # a float64 function (q, k, v, *, causal, scale, key_lengths) -> (O, lse) whose bits
    # this backend's float64 output equals, if it claims that
    bit_reference: Callable | None = None


@dataclass(frozen=True)
class Option:
    default: Any
    check: Callable[[str, Any], Any]  # (name, value) -> value; raises naming `name`
    doc: str


def _no_check(request: Request, given: frozenset) -> None:
    return None


def _keys_given(options: Mapping) -> str | None:
    return None


@dataclass(frozen=True)
class Method:
    name: str
    summary: str
    semantics: str  # the module whose docstring defines the method
    approximate: bool  # an approximation of softmax attention: its error vs exact is its cost
    options: Mapping[str, Option]
    backends: tuple[Backend, ...]  # in priority order
    # rules between options, shapes and scale; `given` names the options the caller passed
    check: Callable[[Request, frozenset], None] = _no_check
    # the option setting ("lsh_shared_qk=True") under which keys are derived from q and k must be None
    keys_from_q: Callable[[Mapping], str | None] = _keys_given
    # inputs checked for NaN/inf even with check_finite=False, and why
    needs_finite: Mapping[str, str] = field(default_factory=dict)
    demo_options: Mapping[str, Any] = field(default_factory=dict)  # what `nkattn run` passes on its sample
    bench: str | None = None  # the study `nkattn bench <name>` runs
    # precisions beyond PRECISIONS that pick a format per head ("auto"), which this method's backends run
    precision_policies: tuple[str, ...] = ()


# --------------------------------------------------------------------------------------
# option checks, each written once
# --------------------------------------------------------------------------------------


def check_seed(name: str, value) -> int:
    if not isinstance(value, (int, np.integer)) or isinstance(value, (bool, np.bool_)) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {arrays.describe_value(value)}")
    return int(value)


def check_flag(name: str, value) -> bool:
    """True or False, not any truthy object: ``causal="no"`` would otherwise read as True."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {arrays.describe_value(value)}")
    return bool(value)


TABLE_VARIANTS = ("dot", "seed")


def _check_table(name: str, value):
    from nkattn.reference.table import TableCodebook

    if isinstance(value, TableCodebook) or (isinstance(value, str) and value in TABLE_VARIANTS):
        return value
    raise ValueError(f"{name} must be one of {TABLE_VARIANTS} or a fitted TableCodebook, got {arrays.describe_value(value)}")


def _join(names) -> str:
    names = list(names)
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def method_options(method: str, given: Mapping[str, Any]) -> dict:
    """`method`'s options: the given ones checked, the rest at their defaults.

    An option of another method is a ValueError naming the methods it applies to;
    a name no method knows is a TypeError, as Python's for an unknown keyword.
    """
    entry = METHODS[method]
    for name in given:
        if name in entry.options:
            continue
        owners = [m for m in METHODS.values() if name in m.options]
        if not owners:
            raise TypeError(f"attention() got an unexpected keyword argument {name!r}")
        if len(owners) > 1:
            where = " or ".join(f"method={m.name!r}" for m in owners)
            raise ValueError(f"method={method!r} takes no option {name}: {name} only applies to {where}")
        owner = owners[0]
        own = [n for n in owner.options if all(n not in m.options for m in METHODS.values() if m is not owner)]
        verb = "applies" if len(own) == 1 else "apply"
        raise ValueError(f"method={method!r} takes no option {name}: {_join(own)} only {verb} to method={owner.name!r}")
    return {name: opt.check(name, given[name]) if name in given else opt.default for name, opt in entry.options.items()}


# --------------------------------------------------------------------------------------
# backends: what every reference and every FFMA kernel shares
# --------------------------------------------------------------------------------------

FP32_PRECISIONS = (None, "fp32")
TENSOR_CORE_PRECISIONS = ("tf32x3", "tf32")
PRECISIONS = ("fp32", *TENSOR_CORE_PRECISIONS)  # every precision a float32 call may ask for
PRECISION_POLICIES = ("auto",)  # a format per head, for the methods that list it


def cuda_available() -> bool:
    from numba import cuda

    try:
        return bool(cuda.is_available())
    except Exception:  # noqa: BLE001 (a broken driver install of any kind reads as "no GPU")
        return False


def _no_device() -> list[str]:
    if cuda_available():
        return []
    return ["no CUDA GPU found and the CUDA simulator is off (set NUMBA_ENABLE_CUDASIM=1 before importing nkattn)"]


def ffma_reasons(request: Request, **dims: int) -> list[str]:
    """Why the float32/float64 CUDA-core kernels cannot run `request`; `dims` names the head dims
    the kernel tiles (d for q·k, dv for P·V)."""
    reasons = _no_device()
    if request.dtype in arrays.HALF_DTYPES:
        reasons.append("float16/bfloat16 need the tensor-core kernel (the FFMA kernels take float32 and float64)")
    if request.precision in PRECISION_POLICIES:
        reasons.append(_per_head_reason(request))
    elif request.precision not in FP32_PRECISIONS:
        reasons.append(f"precision={request.precision!r} needs the tensor-core kernel (the FFMA kernels compute in fp32)")
    for label, dim in dims.items():
        if dim not in KERNEL_HEAD_DIMS:
            reasons.append(f"the FFMA kernels support {label} in {KERNEL_HEAD_DIMS}, got {label}={dim}")
    return reasons


def _same_dims(request: Request) -> list[str]:
    if request.value_dim != request.head_dim:
        return [f"the FFMA kernels need dv == d, got d={request.head_dim}, dv={request.value_dim}"]
    return []


def _per_head_reason(request: Request) -> str:
    return f"precision={request.precision!r} runs each head in its own format: the 'format per head' backends run it"


def reference_reasons(request: Request) -> list[str]:
    if request.precision in PRECISION_POLICIES:
        return [_per_head_reason(request)]
    if request.precision not in FP32_PRECISIONS:
        return [f"precision={request.precision!r} is a kernel's arithmetic; the reference computes in float64"]
    return []


def no_entropy(request: Request) -> list[str]:
    """The reason of a backend that does not compute the row entropy, when a call asks for it."""
    if request.entropy:
        return [("no row entropy here (return_entropy=True): only method='exact' computes it, on the FFMA kernel "
                 "(float32, float64) or the reference")]
    return []


def on_reference(compute: Callable) -> Callable[[Call], tuple]:
    """A reference backend's ``run`` from ``compute(call, q, k, v) -> (O, lse)`` on float64
    host arrays (k None when derived from q), ``(O, lse, entropy)`` when the call asks for
    the row entropy.

    The result is rounded once to the input dtype (lse and entropy to float32 for float16
    and bfloat16 inputs, as FlashAttention returns lse) and given back in the input's kind.
    """

    def run(call: Call):
        req = call.request
        q, k, v = (None if x is None else np.asarray(arrays.to_host(x, req.dtype), dtype=np.float64)
                   for x in (call.q, call.k, call.v))
        out, *per_row = compute(call, q, k, v)
        row_dtype = np.dtype(np.float32) if req.dtype in arrays.HALF_DTYPES else req.dtype
        return (arrays.from_host(call.q, arrays.round_to(out, req.dtype)),
                *(arrays.from_host(call.q, arrays.round_to(x, row_dtype)) for x in per_row))

    return run


def on_cuda(launch: Callable) -> Callable[[Call], tuple]:
    """A CUDA backend's ``run`` from ``launch(call, q, k, v, key_lengths, out, lse)`` on numba
    device arrays (k None when derived from q), which fills out and lse, and also
    ``entropy`` (shaped as lse), passed after lse, when the call asks for the row entropy.

    Device inputs are used in place and the outputs allocated in their framework;
    host inputs are copied to the device and the outputs back.
    """

    def run(call: Call):
        from numba import cuda

        req = call.request
        lengths = np.full(req.batch, req.nk, np.int32) if call.key_lengths is None else call.key_lengths
        out_shape = (req.batch, req.heads, req.nq, req.value_dim)
        shapes = (out_shape, out_shape[:3], out_shape[:3]) if req.entropy else (out_shape, out_shape[:3])
        if req.on_device:
            q, k, v = (None if x is None else arrays.numba_view(x) for x in (call.q, call.k, call.v))
            outputs = [arrays.empty_like_framework(call.q, shape, req.dtype) for shape in shapes]
            launch(call, q, k, v, cuda.to_device(lengths), *(view for _, view in outputs))
            return tuple(result for result, _ in outputs)
        q, k, v = (None if x is None else cuda.to_device(np.ascontiguousarray(x)) for x in (call.q, call.k, call.v))
        outputs = [cuda.device_array(shape, dtype=req.dtype) for shape in shapes]
        launch(call, q, k, v, cuda.to_device(lengths), *outputs)
        return tuple(x.copy_to_host() for x in outputs)

    return run


def _reference_backend(compute: Callable, *, entropy: bool = False) -> Backend:
    """`entropy`: compute returns the row entropy when the call asks for it."""
    reasons = reference_reasons if entropy else (lambda req: reference_reasons(req) + no_entropy(req))
    return Backend("reference", "reference (NumPy float64)", reasons, on_reference(compute),
                   arithmetic="float64 on the host, rounded once to the input dtype")


# --------------------------------------------------------------------------------------
# exact
# --------------------------------------------------------------------------------------


def _exact_reference(call: Call, q, k, v):
    from nkattn.reference.exact import attention_ref

    req = call.request
    return attention_ref(q, k, v, causal=req.causal, scale=call.scale, key_lengths=call.key_lengths,
                         return_entropy=req.entropy)


def _exact_launch(call: Call, q, k, v, key_lengths, out, lse, entropy=None):
    from nkattn.cuda_kernels.exact import exact_attention

    exact_attention(q, k, v, key_lengths, causal=call.request.causal, scale=call.scale, out=out, lse=lse,
                    return_entropy=entropy is not None, entropy=entropy)


def _exact_kernel_bits(q, k, v, *, causal, scale, key_lengths):
    from nkattn.cuda_kernels.online_softmax import kernel_order
    from nkattn.reference.exact import streaming_attention_ref

    order = kernel_order(np.float64, q.shape[-1])
    return streaming_attention_ref(q, k, v, causal=causal, scale=scale, key_lengths=key_lengths, order=order)


def tensor_core_kind(req: Request) -> str | None:
    """The wgmma kernel's kind for a request: f16/bf16 from the dtype, tf32x3/tf32 from the precision."""
    if req.dtype == np.float16:
        return "f16"
    if arrays.BFLOAT16 is not None and req.dtype == arrays.BFLOAT16:
        return "bf16"
    if req.dtype == np.float32 and req.precision in TENSOR_CORE_PRECISIONS:
        return req.precision
    return None


def tensor_core_reasons(kind: str = "f16") -> list[str]:
    """Why this machine cannot run the tensor-core kernel of ``kind``: wgmma on Hopper, mma.sync
    (float16/bfloat16 only) on the other GPUs from compute capability 8.0 on."""
    reasons = _no_device()
    if reasons:
        return reasons
    from nkattn.cuda_kernels.exact_tc import compute_capability, device_reasons

    return device_reasons(kind, compute_capability())


def _exact_tc_reasons(req: Request) -> list[str]:
    from nkattn.cuda_kernels.exact_tc import MAX_HEAD_DIM

    kind = tensor_core_kind(req)
    reasons = tensor_core_reasons(kind or "f16") + no_entropy(req)
    if kind is None:
        if req.dtype == np.float32:
            reasons.append(f"float32 takes the tensor-core kernel with precision in {TENSOR_CORE_PRECISIONS}, "
                           f"got precision={req.precision!r}")
        else:
            reasons.append(f"the tensor-core kernel takes float16, bfloat16 and float32, got {req.dtype}")
    for label, dim in (("d", req.head_dim), ("dv", req.value_dim)):
        if dim % 8 or dim > MAX_HEAD_DIM:
            reasons.append(f"the tensor-core kernel supports {label} a multiple of 8 up to {MAX_HEAD_DIM}, got {dim}")
    return reasons


def _exact_tc_run(call: Call):
    """Run the tensor-core kernel (wgmma on Hopper, mma.sync elsewhere): half inputs as their 16-bit
    patterns, lse in float32 (as FlashAttention)."""
    from numba import cuda

    from nkattn.cuda_kernels.exact_tc import tc_attention

    req = call.request
    kind = tensor_core_kind(req)
    lengths = np.full(req.batch, req.nk, np.int32) if call.key_lengths is None else call.key_lengths
    out_shape = (req.batch, req.heads, req.nq, req.value_dim)
    if req.on_device:
        q, k, v = (arrays.kernel_view(x, req.dtype) for x in (call.q, call.k, call.v))
        out, _ = arrays.empty_like_framework(call.q, out_shape, req.dtype)
        lse, lse_view = arrays.empty_like_framework(call.q, out_shape[:3], np.float32)
        tc_attention(q, k, v, cuda.to_device(lengths), causal=req.causal, scale=call.scale, kind=kind,
                     out=arrays.bits_view(out, req.dtype), lse=lse_view)
        return out, lse
    q, k, v = (cuda.to_device(arrays.kernel_host(x, req.dtype)) for x in (call.q, call.k, call.v))
    out, lse = tc_attention(q, k, v, cuda.to_device(lengths), causal=req.causal, scale=call.scale, kind=kind)
    return out.copy_to_host().view(req.dtype), lse.copy_to_host()


def _quantized_reasons(req: Request, kernel: str, wgmma: str, fmt: str) -> list[str]:
    """Why the Hopper-only quantized ``kernel`` (its ``wgmma`` operands) cannot run this request."""
    from nkattn.cuda_kernels.exact_tc import compute_capability
    from nkattn.cuda_kernels.fp8 import MAX_HEAD_DIM

    reasons = _no_device()
    if reasons:
        return reasons
    cc = compute_capability()
    if cc[0] != 9:
        reasons.append(f"the {kernel} kernel uses Hopper's {wgmma} wgmma (compute capability 9.x), this GPU is "
                       f"{cc[0]}.{cc[1]} (backend='reference' emulates {fmt})")
    for label, dim in (("d", req.head_dim), ("dv", req.value_dim)):
        if dim % 16 or dim > MAX_HEAD_DIM:
            reasons.append(f"the {kernel} kernel supports {label} a multiple of 16 up to {MAX_HEAD_DIM}, got {dim}")
    return reasons


def _fp8_reasons(req: Request) -> list[str]:
    return _quantized_reasons(req, "FP8", "e4m3", "fp8")


def _fp8_run(call: Call):
    """bf16 heads (rounded on the host) through the GPU quantizer and the FP8 kernel: bf16 O, float32 lse."""
    from numba import cuda

    from nkattn.cuda_kernels.fp8 import fp8_attention

    req = call.request
    lengths = np.full(req.batch, req.nk, np.int32) if call.key_lengths is None else call.key_lengths
    q, k, v = (cuda.to_device(arrays.kernel_host(x, arrays.BFLOAT16)) for x in (call.q, call.k, call.v))
    out, lse = fp8_attention(q, k, v, cuda.to_device(lengths), causal=req.causal, scale=call.scale)
    return out.copy_to_host().view(arrays.BFLOAT16), lse.copy_to_host()


def _int8_reasons(req: Request) -> list[str]:
    return _quantized_reasons(req, "INT8", "s8", "int8-fp16")


def _int8_run(call: Call):
    """f16 heads (rounded on the host) through the GPU quantizer and the INT8 kernel: f16 O, float32 lse."""
    from numba import cuda

    from nkattn.cuda_kernels.int8 import int8_attention

    req = call.request
    lengths = np.full(req.batch, req.nk, np.int32) if call.key_lengths is None else call.key_lengths
    q, k, v = (cuda.to_device(arrays.kernel_host(x, np.dtype(np.float16))) for x in (call.q, call.k, call.v))
    out, lse = int8_attention(q, k, v, cuda.to_device(lengths), causal=req.causal, scale=call.scale)
    return out.copy_to_host().view(np.float16), lse.copy_to_host()


# compute the fp8 and int8-fp16 formats only, for precision="auto" (a plain call in bf16 or f16 means that format)
FP8_BACKEND = Backend(
    "cuda", "cuda (FP8 kernel)", _fp8_reasons, _fp8_run,
    arithmetic="fp8 format: e4m3 Q, K, V with per-128 block scales quantized on the GPU, P·2^8 in e4m3, float32 "
               "accumulation and softmax, bf16 O (nkattn.cuda_kernels.fp8)",
)
INT8_BACKEND = Backend(
    "cuda", "cuda (INT8 kernel)", _int8_reasons, _int8_run,
    arithmetic="int8-fp16 format: K smoothed, int8 Q (128-row scales) and K (64-key scales) quantized on the GPU, "
               "int32 Q·Kᵀ, float32 softmax, fp16 P·V with float32 accumulation, fp16 O (nkattn.cuda_kernels.int8)",
)


# --------------------------------------------------------------------------------------
# exact with precision="auto": a format per head
# --------------------------------------------------------------------------------------

# the formats a CUDA kernel computes, and the dtype their heads are rounded to first: fp32, fp16 and
# bf16 use the inputs as operands, so a plain call of that dtype computes them (fp32 on the FFMA
# kernel, fp16 and bf16 on the tensor-core kernel); fp8 quantizes bf16 inputs on the FP8 kernel and
# int8-fp16 f16 inputs on the INT8 kernel (`FORMAT_BACKENDS`); int8-fp8 has no CUDA kernel yet
KERNEL_FORMATS = {name: dtype for name, dtype in (("fp32", np.dtype(np.float32)), ("fp16", np.dtype(np.float16)),
                                                  ("bf16", arrays.BFLOAT16), ("fp8", arrays.BFLOAT16),
                                                  ("int8-fp16", np.dtype(np.float16)))
                  if dtype is not None}
FORMAT_BACKENDS = {"fp8": FP8_BACKEND, "int8-fp16": INT8_BACKEND}  # formats with a kernel of their own
AUTO_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))  # each head is rounded down from these to its format


def _check_tolerance(name: str, value):
    from nkattn.reference.precision import check_tolerance

    return None if value is None else check_tolerance("auto", value)


def _exact_check(req: Request, given: frozenset) -> None:
    from nkattn.reference.precision import check_tolerance

    tolerance = req.options["tolerance"]
    if req.precision in PRECISION_POLICIES:
        check_tolerance(req.precision, tolerance)
    elif tolerance is not None:
        raise ValueError(f"tolerance applies to precision in {PRECISION_POLICIES} only (the error budget of each "
                         f"head), got tolerance={tolerance!r} with precision={req.precision!r}")


def gpu_analyzers(req: Request, backend: str) -> bool:
    """Whether precision='auto' analyzes the call's data on the GPU (`nkattn.precision`: one streaming
    pass, O(N) memory) rather than on the host from dense float64 scores (O(N²)): wherever the call
    may run on CUDA, a GPU (or the simulator) is there and the streaming kernels tile d."""
    return backend != "reference" and req.head_dim in KERNEL_HEAD_DIMS and cuda_available()


def choose_head_formats(req: Request, q, k, v, key_lengths, scale: float, *, on_gpu: bool) -> HeadFormats:
    """The policy `req.precision` with ``tolerance`` on the analyzers of every head: those of the
    GPU (`nkattn.precision.device_head_stats`, device inputs read in place) with `on_gpu`, else
    `nkattn.reference.precision.choose` on the call's data copied to the host in float64."""
    from nkattn.reference.exact import visible_key_counts
    from nkattn.reference.precision import auto_decisions, choose

    tolerance = req.options["tolerance"]
    if on_gpu:
        from nkattn.precision import device_head_stats

        stats = device_head_stats(q, k, v, key_lengths, causal=req.causal, scale=scale)
        decisions = auto_decisions(stats, tolerance)
    else:
        q, k, v = (np.asarray(arrays.to_host(x, req.dtype), dtype=np.float64) for x in (q, k, v))
        decisions = choose(q, k, v, req.precision, tolerance=tolerance, causal=req.causal, scale=scale,
                           key_lengths=key_lengths)
    sees = (visible_key_counts(req.batch, req.nq, req.nk, req.causal, key_lengths) > 0).any(axis=-1)
    return HeadFormats(decisions, np.broadcast_to(sees[:, None], (req.batch, req.heads)))


def _per_head(call: Call, compute: Callable) -> tuple:
    """(O, lse) with every format's heads computed together as a batch of one-head sequences:
    ``compute(fmt, q, k, v, key_lengths)`` on float64 host arrays (n, 1, N, d) -> (O, lse) of any
    float dtype. Heads that see no key are O = 0, lse = -inf, as in every format."""
    req, plan = call.request, call.request.head_formats
    q, k, v = (np.asarray(arrays.to_host(x, req.dtype), dtype=np.float64) for x in (call.q, call.k, call.v))
    lengths = np.full(req.batch, req.nk, np.int32) if call.key_lengths is None else call.key_lengths
    group = req.heads // req.kv_heads
    out = np.zeros((req.batch, req.heads, req.nq, req.value_dim), dtype=req.dtype)
    lse = np.full((req.batch, req.heads, req.nq), -np.inf, dtype=req.dtype)
    for fmt in plan.formats():
        bs, hs = plan.heads(fmt)
        o_f, lse_f = compute(fmt, q[bs, hs][:, None], k[bs, hs // group][:, None], v[bs, hs // group][:, None],
                             lengths[bs])
        out[bs, hs] = o_f[:, 0]
        lse[bs, hs] = lse_f[:, 0]
    return arrays.from_host(call.q, out), arrays.from_host(call.q, lse)


def _single_format_request(req: Request, fmt: str, heads: int) -> Request:
    """The request of a plain call in `fmt`'s dtype on `heads` one-head sequences, on the host."""
    return replace(req, dtype=KERNEL_FORMATS[fmt], batch=heads, heads=1, kv_heads=1, key_lengths=True,
                   on_device=False, precision=None, options={**req.options, "tolerance": None}, head_formats=None)


def _single_format_kernels(fmt: str) -> list[Backend]:
    """The CUDA backends that may compute `fmt`'s heads: its own kernel, or those of a plain call in its dtype."""
    if fmt in FORMAT_BACKENDS:
        return [FORMAT_BACKENDS[fmt]]
    return [b for b in EXACT.backends if b.name == "cuda" and b.run is not _auto_cuda_run]


def _kernel_input(fmt: str) -> str:
    return fmt if fmt in FORMAT_BACKENDS else str(KERNEL_FORMATS[fmt])


def _policy_only(req: Request) -> list[str]:
    if req.precision in PRECISION_POLICIES:
        return []
    return [f"runs precision in {PRECISION_POLICIES} only (a format per head), got precision={req.precision!r}"]


def _auto_cuda_reasons(req: Request) -> list[str]:
    """Each format's heads go where a plain call of that format's dtype goes with backend='cuda';
    a format no kernel computes is a reason, never another format."""
    if req.precision not in PRECISION_POLICIES:
        return _policy_only(req)
    reasons = []
    plan = req.head_formats
    for fmt in plan.formats():
        bs, hs = plan.heads(fmt)
        chose = f"precision={req.precision!r} chose {fmt} for {heads_text(bs, hs, req.batch * req.heads)}"
        if fmt not in KERNEL_FORMATS:
            reasons.append(f"{chose}: no CUDA kernel computes {fmt} yet (backend='reference' emulates it)")
            continue
        sub = _single_format_request(req, fmt, bs.size)
        refusals = [(b, b.supports(sub)) for b in _single_format_kernels(fmt)]
        if all(r for _, r in refusals):
            reasons.append(f"{chose}, and no kernel takes {_kernel_input(fmt)} here: "
                           + "; ".join(f"{b.label}: {'; '.join(r)}" for b, r in refusals))
    return reasons


def _auto_cuda_run(call: Call):
    """Every format's heads rounded once from the caller's data to its dtype, on the host, and run
    by the kernel a plain call of that dtype takes, or the format's own (fp8, int8-fp16) (batch invariance:
    the bits of the full call)."""

    def launch(fmt, q, k, v, key_lengths):
        dtype = KERNEL_FORMATS[fmt]
        req = _single_format_request(call.request, fmt, q.shape[0])
        backend = next(b for b in _single_format_kernels(fmt) if not b.supports(req))
        sub = Call(req, *(arrays.round_to(x, dtype) for x in (q, k, v)), key_lengths, call.scale)
        return backend.run(sub)

    return _per_head(call, launch)


def _auto_reference_run(call: Call):
    from nkattn.reference.precision import emulate

    def emulated(fmt, q, k, v, key_lengths):
        return emulate(q, k, v, fmt, causal=call.request.causal, scale=call.scale, key_lengths=key_lengths)

    return _per_head(call, emulated)


EXACT = Method(
    name="exact",
    summary="softmax attention",
    semantics="nkattn.reference.exact",
    approximate=False,
    options={
        "tolerance": Option(None, _check_tolerance,
                            "precision='auto': the largest predicted ‖O_f - O‖_F / ‖O‖_F of each head's format f"),
    },
    backends=(
        Backend(
            "cuda", "cuda (format per head)", lambda req: _auto_cuda_reasons(req) + no_entropy(req), _auto_cuda_run,
            arithmetic="precision='auto': each head on the kernel a call in its format's dtype takes (fp32: FFMA, "
                       "fp16/bf16: tensor cores), on the FP8 kernel (fp8) or the INT8 kernel (int8-fp16), heads rounded on "
                       "the host, analyzers on the GPU (nkattn.precision); no kernel for int8-fp8 yet",
        ),
        Backend(
            "cuda", "cuda (tensor-core kernel)", _exact_tc_reasons, _exact_tc_run,
            arithmetic="wgmma (Hopper; mma.sync on other GPUs from sm_80, float16/bfloat16 only) with float32 "
                       "accumulation and softmax: float16/bfloat16 operands; float32 as "
                       "3xTF32 (precision='tf32x3') or TF32 (precision='tf32')",
        ),
        Backend(
            "cuda", "cuda (FFMA kernel)",
            lambda req: ffma_reasons(req, d=req.head_dim) + _same_dims(req),
            on_cuda(_exact_launch),
            arithmetic="float32: FMA and hardware exp; float64: one rounding per operation, portable exp/log",
            bit_reference=_exact_kernel_bits,
        ),
        Backend(
            "reference", "reference (format per head)", lambda req: _policy_only(req) + no_entropy(req),
            _auto_reference_run,
            arithmetic="precision='auto': each head in its format's rounding, emulated in float64 "
                       "(nkattn.reference.precision.emulate)",
        ),
        _reference_backend(_exact_reference, entropy=True),
    ),
    check=_exact_check,
    bench="exact-bench",
    precision_policies=PRECISION_POLICIES,
)


# --------------------------------------------------------------------------------------
# lsh
# --------------------------------------------------------------------------------------


def _lsh_cuda_reasons(req: Request) -> list[str]:
    from nkattn.cuda_kernels.lsh import MAX_TABLES

    reasons = ffma_reasons(req, d=req.head_dim) + _same_dims(req) + no_entropy(req)
    if req.options["lsh_tables"] > MAX_TABLES:
        reasons.append(f"the LSH kernel supports lsh_tables <= {MAX_TABLES}, got {req.options['lsh_tables']}")
    return reasons


def _lsh_reference(call: Call, q, k, v):
    req, opts = call.request, call.request.options
    out, lse, _ = lsh_ref.lsh_attention_ref(
        q, k, v, bits=opts["lsh_bits"], tables=opts["lsh_tables"], seed=opts["seed"], causal=req.causal,
        scale=call.scale, key_lengths=call.key_lengths, shared_qk=opts["lsh_shared_qk"],
    )
    return out, lse


def _lsh_launch(call: Call, q, k, v, key_lengths, out, lse):
    from nkattn.cuda_kernels.lsh import lsh_attention

    opts = call.request.options
    lsh_attention(
        q, k, v, key_lengths, bits=opts["lsh_bits"], tables=opts["lsh_tables"], seed=opts["seed"],
        shared_qk=opts["lsh_shared_qk"], causal=call.request.causal, scale=call.scale, out=out, lse=lse,
    )


LSH = Method(
    name="lsh",
    summary="softmax over the keys that share a SimHash bucket with the query in some table",
    semantics="nkattn.reference.lsh",
    approximate=True,
    options={
        "lsh_bits": Option(8, lambda name, x: lsh_ref.check_bits(x, name), "hyperplanes (bits) per table"),
        "lsh_tables": Option(4, lambda name, x: lsh_ref.check_tables(x, name), "hash tables"),
        "seed": Option(0, check_seed, "seed of the hyperplanes"),
        "lsh_shared_qk": Option(False, check_flag, "Reformer's shared-QK: keys are q's rows at unit length (k=None)"),
    },
    backends=(
        Backend("cuda", "cuda (LSH kernel)", _lsh_cuda_reasons, on_cuda(_lsh_launch),
                arithmetic="hashing in float64; attention as the exact FFMA kernel"),
        _reference_backend(_lsh_reference),
    ),
    keys_from_q=lambda opts: "lsh_shared_qk=True" if opts["lsh_shared_qk"] else None,
    # 3-bit buckets keep the candidate sets of the sample's short sequences non-trivial
    demo_options={"lsh_bits": 3, "lsh_tables": 2, "seed": 0},
    bench="lsh-bench",
)


# --------------------------------------------------------------------------------------
# table
# --------------------------------------------------------------------------------------


def _table_check(req: Request, given: frozenset) -> None:
    table = req.options["table"]
    if table == "dot":
        return
    described = f"table={table!r}" if isinstance(table, str) else "a fitted TableCodebook"
    if req.scale is not None:
        why = "its scores are -table / 1000, the seed's" if isinstance(table, str) else "it carries its own score_scale"
        raise ValueError(f"scale does not apply to {described}: {why} (scale is used by table='dot' only)")
    if "seed" in given:
        raise ValueError(f"seed does not apply to {described}: nothing is fitted at random (seed is used by table='dot' only)")
    if isinstance(table, str):
        from nkattn.reference.table import BASE

        if req.head_dim < BASE:
            raise ValueError(f"table='seed' projects rows onto {BASE} Base17 axes: it needs d >= {BASE}, got d={req.head_dim}")
    else:
        table.check_rows(req.head_dim)


def table_inputs(call: Call, q, k):
    """Palette codes and the uint16 table of a table call, fitted and encoded on the host from q, k."""
    from nkattn.reference.table import TableCodebook, dot_table, seed_table

    table = call.request.options["table"]
    if isinstance(table, TableCodebook):
        return table.encode_q(q), table.encode_k(k), table.table_u16, table.score_scale, table.score_offset
    fitted = dot_table(q, k, call.scale, seed=call.request.options["seed"]) if table == "dot" else seed_table(q, k)
    return fitted.q_codes, fitted.k_codes, fitted.table_u16, fitted.score_scale, fitted.score_offset


def _table_reference(call: Call, q, k, v):
    from nkattn.reference.table import table_attention_ref

    q_codes, k_codes, table_u16, score_scale, score_offset = table_inputs(call, q, k)
    return table_attention_ref(q_codes, k_codes, table_u16, v, score_scale=score_scale, score_offset=score_offset,
                               causal=call.request.causal, key_lengths=call.key_lengths)


def _table_launch(call: Call, q, k, v, key_lengths, out, lse):
    from numba import cuda

    from nkattn.cuda_kernels.table import table_attention

    dtype = call.request.dtype
    q_host, k_host = (np.asarray(arrays.to_host(x, dtype), dtype=np.float64) for x in (call.q, call.k))
    q_codes, k_codes, table_u16, score_scale, score_offset = table_inputs(call, q_host, k_host)
    table_attention(cuda.to_device(q_codes), cuda.to_device(k_codes), table_u16, v, key_lengths,
                    score_scale=score_scale, score_offset=score_offset, causal=call.request.causal, out=out, lse=lse)


TABLE = Method(
    name="table",
    summary="scores read from a 256 x 256 table indexed by per-row palette codes",
    semantics="nkattn.reference.table",
    approximate=True,
    options={
        "table": Option("dot", _check_table, "'dot' (k-means palettes), 'seed' (seed 004's Base17 table) or a TableCodebook"),
        "seed": Option(0, check_seed, "seed of the k-means fit (table='dot')"),
    },
    backends=(
        # q and k are encoded on the host: the kernel tiles only dv
        Backend("cuda", "cuda (lookup kernel)", lambda req: ffma_reasons(req, dv=req.value_dim) + no_entropy(req),
                on_cuda(_table_launch), arithmetic="table lookups; softmax and P·V as the exact FFMA kernel"),
        _reference_backend(_table_reference),
    ),
    check=_table_check,
    needs_finite={"q": "q and k are encoded into palette codes", "k": "q and k are encoded into palette codes"},
    demo_options={"table": "dot", "seed": 0},
    bench="table-bench",
)


# --------------------------------------------------------------------------------------
# lowrank
# --------------------------------------------------------------------------------------


def _lowrank_check(req: Request, given: frozenset) -> None:
    opts = req.options
    lowrank_ref.validate_lowrank_params(opts["rank"], req.nq, req.nk, oversample=opts["oversample"],
                                        power_iters=opts["power_iters"], seed=opts["seed"], energy=opts["energy"],
                                        tolerance=opts["tolerance"])


def _lowrank_compute(backend: str) -> Callable:
    """``compute(call, q, k, v) -> (O, lse)``: the driver `nkattn.lowrank.lowrank_attention` on `backend`."""

    def compute(call: Call, q, k, v):
        from nkattn.lowrank import lowrank_attention

        return lowrank_attention(q, k, v, backend=backend, causal=call.request.causal, scale=call.scale,
                                 key_lengths=call.key_lengths, **call.request.options)

    return compute


def _lowrank_launch(call: Call, q, k, v, key_lengths, out, lse):
    # the driver takes the host key_lengths of the call (it checks and copies them itself)
    # and returns device arrays of the inputs' dtype, copied into the outputs on_cuda allocated
    result, result_lse = _lowrank_compute("cuda")(call, q, k, v)
    out.copy_to_device(result)
    lse.copy_to_device(result_lse)


LOWRANK = Method(
    name="lowrank",
    summary="softmax attention through a rank-k randomized SVD of every head's attention matrix",
    semantics="nkattn.reference.lowrank",
    approximate=True,
    options={
        "rank": Option("auto", lowrank_ref.check_rank,
                       "k in [1, min(Nq, Nk)], or 'auto': per head the smallest k meeting energy/tolerance"),
        "oversample": Option(10, lowrank_ref.check_count, "extra columns p of the sketch (width l = k + p)"),
        "power_iters": Option(2, lowrank_ref.check_count, "power iterations q (2q + 2 passes over A)"),
        "seed": Option(0, check_seed, "seed of the Gaussian test matrix and the error probes"),
        "energy": Option(None, lowrank_ref.check_fraction,
                         "rank='auto': keep this share of ‖A‖_F² (seed 001's rule, on σ²)"),
        "tolerance": Option(None, lowrank_ref.check_fraction,
                            "rank='auto': ‖(A - Â_k)V‖_F <= tolerance·‖AV‖_F (0.01 when energy is None too)"),
    },
    backends=(
        # V never enters a kernel's tiles (it is applied in float64, or rides along A·X in chunks
        # of columns), so only d is the kernels'
        Backend("cuda", "cuda (low-rank operators)", lambda req: ffma_reasons(req, d=req.head_dim) + no_entropy(req),
                on_cuda(_lowrank_launch),
                arithmetic="A·X and Aᵀ·Y as the exact FFMA kernel, and every N × l array, in the input dtype; "
                           "QR, SVD and small products in float64 arithmetic by row blocks (CuPy on the GPU when "
                           "installed, else NumPy on the host)"),
        _reference_backend(_lowrank_compute("reference")),
    ),
    check=_lowrank_check,
    needs_finite={"q": "the SVD of A needs finite scores (LAPACK's does not converge on NaN)",
                  "k": "the SVD of A needs finite scores (LAPACK's does not converge on NaN)"},
    # rank 1: past σ₁ the sample's heads have clusters of near-equal singular values (its first
    # head's are 1.41, 1, 1, ...), where rounding, not the kernels, decides which directions a
    # truncation keeps; no power iteration: 2 passes instead of 6 keep the simulator's run short
    demo_options={"rank": 1, "power_iters": 0, "seed": 0},
)


METHODS: dict[str, Method] = {m.name: m for m in (EXACT, LSH, TABLE, LOWRANK)}
BACKENDS = ("cuda", "reference")
