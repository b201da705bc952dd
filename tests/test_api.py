"""Public API: argument validation (every documented error), dispatch, output kinds, no mutation."""

import numpy as np
import pytest
from numba import cuda

import nkattn

from .conftest import REAL_GPU


def qkv(b=1, h=2, hkv=1, nq=8, nk=8, d=16, dtype=np.float32, seed=0):
    rng = np.random.default_rng(seed)
    return (
        rng.standard_normal((b, h, nq, d)).astype(dtype),
        rng.standard_normal((b, hkv, nk, d)).astype(dtype),
        rng.standard_normal((b, hkv, nk, d)).astype(dtype),
    )


BAD_INPUTS = [
    pytest.param(lambda q, k, v: (q[0], k, v), {}, ValueError, "q must have rank 4", id="rank"),
    pytest.param(lambda q, k, v: (q, k[:, :, :5], v), {}, ValueError, "k and v must have the same shape", id="k-v-shape"),
    pytest.param(lambda q, k, v: (np.concatenate([q, q]), k, v), {}, ValueError, "batch size mismatch", id="batch"),
    pytest.param(lambda q, k, v: (q[..., :8].copy(), k, v), {}, ValueError, "head dim mismatch", id="head-dim-mismatch"),
    pytest.param(lambda q, k, v: (q[:, :, :, :8].copy(), k[..., :8].copy(), v[..., :8].copy()), {}, ValueError, "d=8 is not supported", id="head-dim-unsupported"),
    pytest.param(lambda q, k, v: (q[:, :1].copy(), np.concatenate([k, k], 1), np.concatenate([v, v], 1)), {}, ValueError, "multiple of k/v heads", id="gqa-heads"),
    pytest.param(lambda q, k, v: (q.astype(np.float16), k.astype(np.float16), v.astype(np.float16)), {}, TypeError, "dtype float16", id="dtype"),
    pytest.param(lambda q, k, v: (q, k.astype(np.float64), v), {}, TypeError, "share one dtype", id="mixed-dtype"),
    pytest.param(lambda q, k, v: (q[:, :, :0], k, v), {}, ValueError, "Nq=0", id="empty-q"),
    pytest.param(lambda q, k, v: (q, k[:, :, :0], v[:, :, :0]), {}, ValueError, "Nk=0", id="empty-k"),
    pytest.param(lambda q, k, v: (q, k, v), {"scale": float("nan")}, ValueError, "scale must be finite", id="scale-nan"),
    pytest.param(lambda q, k, v: (q, k, v), {"scale": -1.0}, ValueError, "scale must be finite and > 0", id="scale-negative"),
    pytest.param(lambda q, k, v: (q, k, v), {"scale": "1"}, TypeError, "scale must be a real number", id="scale-type"),
    pytest.param(lambda q, k, v: (q.tolist(), k, v), {}, TypeError, "q must be a NumPy array", id="list-input"),
    pytest.param(lambda q, k, v: (q, k, v), {"key_lengths": [9]}, ValueError, "key_lengths must lie in", id="key-lengths-range"),
    pytest.param(lambda q, k, v: (q, k, v), {"key_lengths": [1, 2]}, ValueError, "key_lengths must have shape", id="key-lengths-shape"),
    pytest.param(lambda q, k, v: (q, k, v), {"key_lengths": [1.5]}, TypeError, "key_lengths must be integers", id="key-lengths-dtype"),
    pytest.param(lambda q, k, v: (q, k, v), {"method": "magic"}, ValueError, "method must be one of", id="method"),
    pytest.param(lambda q, k, v: (q, k, v), {"backend": "tpu"}, ValueError, "backend must be one of", id="backend"),
    pytest.param(lambda q, k, v: (cuda.to_device(q), k, v), {}, TypeError, "all be host arrays or all device arrays", id="mixed-host-device"),
]


@pytest.mark.parametrize("make, kwargs, exc, message", BAD_INPUTS)
def test_bad_input_raises_named_error(make, kwargs, exc, message):
    q, k, v = make(*qkv())
    with pytest.raises(exc, match=message):
        nkattn.attention(q, k, v, **kwargs)


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
