"""The kinds of arrays `nkattn.attention` takes: NumPy on the host, numba/CuPy/torch on the device.

Every question about an input (where it lives, its dtype and shape, whether it
holds NaN or inf) and every conversion (to the host, back into the caller's
framework, rounding a float64 result to the caller's dtype) is answered here,
once, for all methods and backends.
"""

from __future__ import annotations

import math

import numpy as np

try:  # a dependency, but an install without it (pip --no-deps) still serves every other dtype
    import ml_dtypes

    BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
except ImportError:
    BFLOAT16 = None
HALF_DTYPES = tuple(d for d in (np.dtype(np.float16), BFLOAT16) if d is not None)
FLOAT_DTYPES = (*HALF_DTYPES, np.dtype(np.float32), np.dtype(np.float64))


def is_device_array(x) -> bool:
    # the simulator's device arrays (FakeCUDAArray) carry no __cuda_array_interface__
    return hasattr(x, "__cuda_array_interface__") or type(x).__name__ == "FakeCUDAArray"


def inputs_on_device(inputs: dict) -> bool:
    """True when the named inputs are all device arrays, False when all are NumPy arrays;
    TypeError naming an input that is neither, or saying where each lives when they are mixed."""
    on_device = {name: is_device_array(x) for name, x in inputs.items()}
    for name, x in inputs.items():
        if not on_device[name] and not isinstance(x, np.ndarray):
            hint = " (convert it with numpy.asarray, or pass a CUDA tensor)" if hasattr(x, "__array__") else ""
            raise TypeError(
                f"{name} must be a NumPy array or a device array with __cuda_array_interface__, got {type(x).__name__}{hint}"
            )
    if len(set(on_device.values())) > 1:
        where = ", ".join(f"{n} on {'device' if d else 'host'}" for n, d in on_device.items())
        raise TypeError(f"q, k and v must all be host arrays or all device arrays, got {where}")
    return next(iter(on_device.values()))


def host_key_lengths(key_lengths, batch: int, nk: int) -> np.ndarray | None:
    """`key_lengths` (None, B integers, or a device array of them) checked and as int32 on the host.

    Reading device values back costs one tiny copy; it lets every value be checked
    before a kernel trusts it to bound its reads of k.
    """
    if key_lengths is None:
        return None
    lengths = np.asarray(to_host(key_lengths, dtype_of(key_lengths, "key_lengths"))
                         if is_device_array(key_lengths) else key_lengths)
    if lengths.ndim != 1 or lengths.shape[0] != batch:
        raise ValueError(f"key_lengths must have shape (B,) = ({batch},), got {lengths.shape}")
    if not np.issubdtype(lengths.dtype, np.integer):
        raise TypeError(f"key_lengths must be integers, got dtype {lengths.dtype}")
    if lengths.min() < 0 or lengths.max() > nk:
        raise ValueError(f"key_lengths must lie in [0, Nk={nk}], got min {lengths.min()} max {lengths.max()}")
    return lengths.astype(np.int32)


def check_scale(scale) -> float | None:
    """`scale` as a float, None kept (the method's default): TypeError for a non-number,
    ValueError unless finite and > 0."""
    if scale is None:
        return None
    if isinstance(scale, (bool, np.bool_)) or not isinstance(scale, (int, float, np.floating, np.integer)):
        raise TypeError(f"scale must be a real number, got {type(scale).__name__}")
    if not is_finite_number(scale) or scale <= 0:
        raise ValueError(f"scale must be finite and > 0, got {scale}")
    return float(scale)


def framework(x) -> str:
    """"numpy", "torch", "cupy" or "numba" (any other __cuda_array_interface__ array)."""
    if isinstance(x, np.ndarray):
        return "numpy"
    module = type(x).__module__.split(".")[0]
    return module if module in ("torch", "cupy") else "numba"


def dtype_of(x, name: str) -> np.dtype:
    """x's dtype as NumPy describes it (bfloat16 as ml_dtypes').

    A device array's own dtype where it has one: ``__cuda_array_interface__``
    spells bfloat16 "<V2", which any 2-byte record shares, so the typestr alone
    is used only when nothing else says more.
    """
    if framework(x) == "torch":
        torch_name = str(x.dtype).removeprefix("torch.")
        if torch_name == "bfloat16":
            if BFLOAT16 is None:
                raise TypeError(f"{name} is bfloat16, which needs the ml_dtypes package (pip install ml_dtypes)")
            return BFLOAT16
        try:
            return np.dtype(torch_name)
        except TypeError:
            raise TypeError(f"{name} has dtype {x.dtype}; supported: {_names(FLOAT_DTYPES)}") from None
    dtype = getattr(x, "dtype", None)
    if isinstance(dtype, np.dtype):
        return dtype
    typestr = x.__cuda_array_interface__["typestr"]
    if typestr[1:] == "V2":
        raise TypeError(
            f"{name} has __cuda_array_interface__ typestr {typestr!r}, which does not say whether it is bfloat16; "
            "pass a torch or CuPy tensor, or a numba device array with an ml_dtypes.bfloat16 dtype"
        )
    return np.dtype(typestr)


def shape_of(x) -> tuple[int, ...]:
    if hasattr(x, "__cuda_array_interface__"):
        return tuple(x.__cuda_array_interface__["shape"])
    return tuple(x.shape)


def _names(dtypes) -> str:
    return ", ".join(np.dtype(d).name for d in dtypes)


def numba_view(x):
    """A numba device array over `x`'s memory, without a copy."""
    if hasattr(x, "copy_to_host"):  # already a numba (or simulator) device array
        return x
    from numba import cuda

    return cuda.as_cuda_array(x)


def bits_view(x, dtype: np.dtype):
    """A numba device array over device array `x`'s memory, never a copy: the 16-bit patterns (uint16)
    of float16/bfloat16, other types as they are. What a kernel writes (O, lse, carried state) goes
    through this, so that it lands in `x`."""
    if dtype not in HALF_DTYPES:
        return numba_view(x)
    if framework(x) == "torch":
        import torch

        return numba_view(x.view(torch.int16)).view(np.uint16)
    if framework(x) == "cupy":
        import cupy

        return numba_view(x.view(cupy.uint16))
    return numba_view(x).view(np.uint16)


def kernel_view(x, dtype: np.dtype):
    """`bits_view` of device array `x` as the wgmma kernel reads its inputs.

    The kernel's cp.async needs each row's last dim contiguous and 16-byte aligned; an array
    that is not is copied to a contiguous one first (same values, on the device), so an array
    a kernel writes must go through `bits_view` instead.
    """
    view = bits_view(x, dtype)
    shape, strides = tuple(view.shape), tuple(view.strides)  # plain tuples (the simulator's take no negative index)
    last_contiguous = shape[-1] == 1 or strides[-1] == view.dtype.itemsize
    aligned = all(s % 16 == 0 for s in strides[:-1]) and _device_address(view) % 16 == 0
    if last_contiguous and aligned:
        return view
    from numba import cuda

    return cuda.to_device(np.ascontiguousarray(view.copy_to_host()))


def _device_address(view) -> int:
    from numba.core import config

    if config.ENABLE_CUDASIM:  # the simulator's stand-in copies elements: any address does
        return 0
    return view.device_ctypes_pointer.value


def kernel_host(x: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Host array `x` as the wgmma kernel reads it (contiguous; half types as uint16 patterns)."""
    x = np.ascontiguousarray(x)
    return x.view(np.uint16) if dtype in HALF_DTYPES else x


def to_host(x, dtype: np.dtype) -> np.ndarray:
    """x as a NumPy array of `dtype` (device arrays are copied; host arrays are not)."""
    if not is_device_array(x):
        return x
    host = numba_view(x).copy_to_host()
    # a bfloat16 device array arrives as 2-byte records ("<V2"): give the bytes their dtype
    return host if host.dtype == dtype else host.view(dtype)


def round_to(x: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """float64 `x` rounded once to `dtype` (to nearest, ties to even).

    NumPy rounds float64 to float16 and float32 directly, but ml_dtypes (and torch)
    go to bfloat16 through float32, which rounds twice: 1 + 2^-8 + 2^-30 lands on
    the tie 1 + 2^-8 and then on 1.0 instead of 1 + 2^-7. Rounding to float32 *to
    odd* first (an inexact result keeps an odd last bit, which no tie has) makes the
    second rounding the correct one.
    """
    dtype = np.dtype(dtype)
    if dtype != BFLOAT16:
        return x.astype(dtype)
    nearest = x.astype(np.float32)
    with np.errstate(invalid="ignore"):
        inexact = nearest.astype(np.float64) != x
    other = np.nextafter(nearest, np.where(x > nearest, np.float32(np.inf), np.float32(-np.inf)))
    odd = np.where((nearest.view(np.uint32) & 1) == 1, nearest, other)
    return np.where(inexact & np.isfinite(x), odd, nearest).astype(BFLOAT16)


def from_host(template, host: np.ndarray):
    """`host` as an array of `template`'s kind: NumPy, or a device array of its framework."""
    kind = framework(template)
    if kind == "numpy":
        return host
    if kind == "torch":
        import torch

        if host.dtype == BFLOAT16:  # torch.from_numpy knows no ml_dtypes type: move the bits
            return torch.from_numpy(host.view(np.int16)).view(torch.bfloat16).to(template.device)
        return torch.from_numpy(host).to(template.device)
    if kind == "cupy":
        import cupy

        return cupy.asarray(host)
    from numba import cuda

    return cuda.to_device(host)


def empty_like_framework(template, shape, dtype):
    """Uninitialised device output in `template`'s framework, and its numba view."""
    from numba import cuda

    kind = framework(template)
    if kind == "torch":
        import torch

        t = torch.empty(shape, dtype=getattr(torch, np.dtype(dtype).name), device=template.device)
        return t, numba_view(t)
    if kind == "cupy":
        import cupy

        c = cupy.empty(shape, dtype=dtype)
        return c, numba_view(c)
    d = cuda.device_array(shape, dtype=dtype)
    return d, d


def first_nonfinite(x, dtype: np.dtype):
    """(index, value) of x's first NaN or ±inf in C order, or None; checked where x lives.

    NumPy checks host arrays, torch and CuPy their own tensors; a numba device array
    goes through a small kernel (`nkattn.cuda_kernels.finite`) that reads it once
    on the device. Only when something is found is the array copied to the host, to
    name the index.
    """
    kind = framework(x)
    if kind == "numpy":
        return _first_nonfinite_host(x)
    if kind in ("torch", "cupy"):
        lib = __import__(kind)
        bad = ~lib.isfinite(x)
        if not bool(bad.any()):
            return None
        index = tuple(int(i) for i in (lib.nonzero(bad) if kind == "torch" else lib.argwhere(bad))[0].tolist())
        return index, float(x[index])
    from nkattn.cuda_kernels.finite import has_nonfinite

    if not has_nonfinite(numba_view(x)):
        return None
    return _first_nonfinite_host(to_host(x, dtype))


def _first_nonfinite_host(x: np.ndarray):
    finite = np.isfinite(x)
    if finite.all():
        return None
    index = tuple(int(i) for i in np.argwhere(~finite)[0])
    return index, float(x[index])


def describe_value(value) -> str:
    """A short description of `value` for an error message: arrays by type and shape, never by content."""
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        return f"a {type(value).__module__.split('.')[0]}.{type(value).__name__} of shape {tuple(value.shape)} and dtype {value.dtype}"
    text = repr(value)
    return text if len(text) <= 80 else f"a {type(value).__name__}"


def is_finite_number(x) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, (bool, np.bool_)) and math.isfinite(x)
