"""Public API: argument validation (every documented error), dispatch, output kinds, no mutation."""

import warnings

import numpy as np
import pytest
from numba import cuda

import nkattn
from nkattn.api import plan
from nkattn.reference.exact import attention_ref

from .conftest import REAL_GPU


def qkv(b=1, h=2, hkv=1, nq=8, nk=8, d=16, dv=None, dtype=np.float32, seed=0):
    rng = np.random.default_rng(seed)
    return (
        rng.standard_normal((b, h, nq, d)).astype(dtype),
        rng.standard_normal((b, hkv, nk, d)).astype(dtype),
        rng.standard_normal((b, hkv, nk, d if dv is None else dv)).astype(dtype),
    )


class FakeDeviceArray:
    """Only a __cuda_array_interface__: enough for validation, which must fail before any device access."""

    def __init__(self, shape, typestr):
        self.__cuda_array_interface__ = {"shape": shape, "typestr": typestr, "data": (0, False), "version": 2}


BAD_INPUTS = [
    pytest.param(lambda q, k, v: (q[0], k, v), {}, ValueError, "q must have rank 4", id="rank"),
    pytest.param(lambda q, k, v: (q, k[:, :, :5], v), {}, ValueError, r"k and v must agree on \(B, Hkv, Nk\)", id="k-v-shape"),
    pytest.param(lambda q, k, v: (np.concatenate([q, q]), k, v), {}, ValueError, "batch size mismatch", id="batch"),
    pytest.param(lambda q, k, v: (q[..., :8].copy(), k, v), {}, ValueError, "head dim mismatch", id="head-dim-mismatch"),
    pytest.param(lambda q, k, v: (q[..., :0], k[..., :0], v), {}, ValueError, "head dims must be >= 1, got d=0", id="head-dim-0"),
    pytest.param(lambda q, k, v: (q, k, v[..., :0]), {}, ValueError, "head dims must be >= 1, got d=16 .* dv=0", id="value-dim-0"),
    pytest.param(lambda q, k, v: (q[:, :1].copy(), np.concatenate([k, k], 1), np.concatenate([v, v], 1)), {}, ValueError, "multiple of k/v heads", id="gqa-heads"),
    pytest.param(lambda q, k, v: (q.astype(np.int32), k.astype(np.int32), v.astype(np.int32)), {}, TypeError, "dtype int32", id="dtype"),
    pytest.param(lambda q, k, v: (q, k.astype(np.float64), v), {}, TypeError, "share one dtype", id="mixed-dtype"),
    pytest.param(lambda q, k, v: (q[:, :, :0], k, v), {}, ValueError, "Nq=0", id="empty-q"),
    pytest.param(lambda q, k, v: (q, k[:, :, :0], v[:, :, :0]), {}, ValueError, "Nk=0", id="empty-k"),
    pytest.param(lambda q, k, v: (q, None, v), {}, TypeError, "k is None", id="k-none"),
    pytest.param(lambda q, k, v: (q, k, v), {"scale": float("nan")}, ValueError, "scale must be finite", id="scale-nan"),
    pytest.param(lambda q, k, v: (q, k, v), {"scale": -1.0}, ValueError, "scale must be finite and > 0", id="scale-negative"),
    pytest.param(lambda q, k, v: (q, k, v), {"scale": "1"}, TypeError, "scale must be a real number", id="scale-type"),
    pytest.param(lambda q, k, v: (q.tolist(), k, v), {}, TypeError, "q must be a NumPy array", id="list-input"),
    pytest.param(lambda q, k, v: (q, k, v), {"key_lengths": [9]}, ValueError, "key_lengths must lie in", id="key-lengths-range"),
    pytest.param(lambda q, k, v: (q, k, v), {"key_lengths": [1, 2]}, ValueError, "key_lengths must have shape", id="key-lengths-shape"),
    pytest.param(lambda q, k, v: (q, k, v), {"key_lengths": [1.5]}, TypeError, "key_lengths must be integers", id="key-lengths-dtype"),
    pytest.param(lambda q, k, v: (q, k, v), {"causal": "no"}, TypeError, "causal must be True or False, got 'no'", id="causal-string"),
    pytest.param(lambda q, k, v: (q, k, v), {"causal": 1}, TypeError, "causal must be True or False, got 1", id="causal-int"),
    pytest.param(lambda q, k, v: (q, k, v), {"return_lse": "yes"}, TypeError, "return_lse must be True or False", id="return-lse"),
    pytest.param(lambda q, k, v: (q, k, v), {"check_finite": None}, TypeError, "check_finite must be True or False", id="check-finite"),
    pytest.param(lambda q, k, v: (q, k, v), {"precision": 32}, TypeError, "precision must be None or a string", id="precision-type"),
    pytest.param(lambda q, k, v: (q.astype(np.float64), k.astype(np.float64), v.astype(np.float64)), {"precision": "fp32"},
                 ValueError, "precision picks the arithmetic of float32 inputs; these are float64", id="precision-float64"),
    pytest.param(lambda q, k, v: (q, k, v), {"method": "magic"}, ValueError, "method must be one of", id="method"),
    pytest.param(lambda q, k, v: (q, k, v), {"backend": "tpu"}, ValueError, "backend must be one of", id="backend"),
    pytest.param(lambda q, k, v: (q, k, v), {"casual": True}, TypeError, "unexpected keyword argument 'casual'", id="unknown-keyword"),
    pytest.param(lambda q, k, v: (cuda.to_device(q), k, v), {}, TypeError, "all be host arrays or all device arrays", id="mixed-host-device"),
    pytest.param(lambda q, k, v: tuple(FakeDeviceArray(x.shape, "<V2") for x in (q, k, v)), {}, TypeError,
                 "typestr '<V2', which does not say whether it is bfloat16", id="ambiguous-v2-typestr"),
]


@pytest.mark.parametrize("make, kwargs, exc, message", BAD_INPUTS)
def test_bad_input_raises_named_error(make, kwargs, exc, message):
    q, k, v = make(*qkv())
    with pytest.raises(exc, match=message):
        nkattn.attention(q, k, v, **kwargs)


def test_a_cpu_tensor_is_refused_with_a_hint():
    torch = pytest.importorskip("torch")
    q, k, v = (torch.from_numpy(x) for x in qkv())
    with pytest.raises(TypeError, match=r"got Tensor \(convert it with numpy.asarray"):
        nkattn.attention(q, k, v)


@pytest.mark.parametrize("backend", ["reference", "cuda"])
def test_numpy_in_numpy_out_and_inputs_untouched(backend):
    q, k, v = qkv()
    copies = [x.copy() for x in (q, k, v)]
    out, lse = nkattn.attention(q, k, v, causal=True, return_lse=True, backend=backend)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32 and out.shape == q.shape
    assert isinstance(lse, np.ndarray) and lse.shape == q.shape[:3]
    for x, y in zip((q, k, v), copies):
        np.testing.assert_array_equal(x, y)


def test_numba_device_arrays_in_device_arrays_out():
    q, k, v = qkv(dtype=np.float64)
    out = nkattn.attention(*(cuda.to_device(x) for x in (q, k, v)), causal=True)
    assert hasattr(out, "copy_to_host")
    np.testing.assert_array_equal(out.copy_to_host(), nkattn.attention(q, k, v, causal=True, backend="cuda"))


def test_key_lengths_on_the_device_are_accepted():
    q, k, v = qkv(b=2, dtype=np.float64)
    lengths = np.array([8, 3], dtype=np.int32)
    on_device = nkattn.attention(q, k, v, key_lengths=cuda.to_device(lengths), backend="cuda")
    on_host = nkattn.attention(q, k, v, key_lengths=lengths, backend="cuda")
    np.testing.assert_array_equal(on_device, on_host)


def test_reference_and_cuda_backends_agree():
    q, k, v = qkv(dtype=np.float64, nq=13, nk=21)
    a = nkattn.attention(q, k, v, causal=True, backend="reference")
    b = nkattn.attention(q, k, v, causal=True, backend="cuda")
    assert np.abs(a - b).max() <= 1e-13


def test_backend_status_lists_every_backend():
    status = nkattn.backend_status()
    assert set(status) == {"cuda", "reference"}
    assert status["reference"] == []
    if REAL_GPU:
        assert status["cuda"] == []


# --------------------------------------------------------------------------------------
# kernel limits are reasons of the CUDA backend; the reference takes any d, dv >= 1
# --------------------------------------------------------------------------------------

BEYOND_THE_KERNELS = [
    pytest.param({"d": 48}, "the FFMA kernels support d in (16, 32, 64, 128, 256), got d=48", id="d48"),
    pytest.param({"d": 80}, "got d=80", id="d80"),
    pytest.param({"d": 96}, "got d=96", id="d96"),
    pytest.param({"d": 1}, "got d=1", id="d1"),
    pytest.param({"d": 16, "dv": 32}, "the FFMA kernels need dv == d, got d=16, dv=32", id="d16-dv32"),
    pytest.param({"d": 48, "dv": 7}, "need dv == d, got d=48, dv=7", id="d48-dv7"),
]


@pytest.mark.parametrize("dims, reason", BEYOND_THE_KERNELS)
def test_the_reference_runs_what_the_kernels_refuse(dims, reason):
    q, k, v = qkv(b=2, hkv=2, nq=5, nk=9, dtype=np.float64, **dims)
    out, lse = nkattn.attention(q, k, v, causal=True, return_lse=True)  # auto: the reference, no warning for host arrays
    expected, expected_lse = attention_ref(q, k, v, causal=True)
    assert out.shape == (*q.shape[:3], v.shape[3])
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(lse, expected_lse)
    assert plan(q, k, v)[1].name == "reference"
    with pytest.raises(ValueError, match="cuda \\(FFMA kernel\\): .*" + reason.replace("(", "\\(").replace(")", "\\)")):
        nkattn.attention(q, k, v, backend="cuda")


def test_auto_warns_when_device_inputs_fall_back_to_the_host_reference():
    q, k, v = (cuda.to_device(x) for x in qkv(d=16, dv=32, dtype=np.float64))
    with pytest.warns(nkattn.FallbackWarning, match="needs? dv == d.*backend='cuda' to make it an error"):
        out = nkattn.attention(q, k, v)
    assert hasattr(out, "copy_to_host") and out.shape == (1, 2, 8, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        nkattn.attention(q, k, v, backend="reference")  # chosen, not a fallback: no warning


def test_when_nothing_fits_the_error_lists_every_backend_and_its_reasons():
    q, k, v = (x[..., :12].copy() for x in qkv())
    with pytest.raises(ValueError) as info:
        nkattn.attention(q, k, v, precision="tf32")
    message = str(info.value)
    assert "no backend can run method='exact' on float32 inputs with d=12, dv=12 (backend='auto')" in message
    assert "cuda (tensor-core kernel): the tensor-core kernel supports d a multiple of 8 up to 256, got 12" in message
    assert "cuda (FFMA kernel): precision='tf32' needs the tensor-core kernel" in message
    assert "reference (NumPy float64): precision='tf32' is a kernel's arithmetic" in message


def test_an_unknown_precision_is_named_with_the_known_ones():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"precision must be None or one of \('fp32', 'tf32x3', 'tf32', 'auto'\), "
                                         r"got 'bf16x3'"):
        nkattn.attention(q, k, v, precision="bf16x3")


@pytest.mark.parametrize("precision", [None, "fp32"])
def test_fp32_precision_is_what_the_kernels_and_the_reference_do(precision):
    q, k, v = qkv()
    for backend in ("cuda", "reference"):
        out = nkattn.attention(q, k, v, precision=precision, backend=backend)
        np.testing.assert_array_equal(out, nkattn.attention(q, k, v, backend=backend))


def test_plan_names_the_backend_without_running_it():
    q, k, v = qkv()
    call, backend = plan(q, k, v, causal=True, backend="cuda")
    assert backend.label == "cuda (FFMA kernel)" and call.request.causal and call.scale == 0.25
    np.testing.assert_array_equal(backend.run(call)[0], nkattn.attention(q, k, v, causal=True, backend="cuda"))
