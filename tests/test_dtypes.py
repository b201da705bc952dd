"""float16 and bfloat16 inputs: the reference takes them (float64 inside, one rounding out), the tensor-core
kernel runs them (Hopper, or the simulator), the FFMA kernels refuse them with a reason."""

from fractions import Fraction

import numpy as np
import pytest
from numba import cuda

ml_dtypes = pytest.importorskip("ml_dtypes", reason="bfloat16 needs ml_dtypes, a dependency missing from this install")

import nkattn
from nkattn import arrays
from nkattn.arrays import BFLOAT16, round_to
from nkattn.reference.exact import attention_ref
from tests.conftest import SIMULATOR

HALVES = [pytest.param(np.dtype(np.float16), id="f16"), pytest.param(BFLOAT16, id="bf16")]


def half_inputs(dtype, d=32, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((2, 2, 9, d)).astype(dtype) for _ in range(3)]


@pytest.mark.parametrize("dtype", HALVES)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_half_inputs_run_on_the_reference_rounded_once(dtype, causal):
    q, k, v = half_inputs(dtype)
    out, lse = nkattn.attention(q, k, v, causal=causal, return_lse=True, backend="reference")
    o64, lse64 = attention_ref(*(x.astype(np.float64) for x in (q, k, v)), causal=causal)
    assert out.dtype == dtype and lse.dtype == np.float32
    np.testing.assert_array_equal(out.view(np.uint16), round_to(o64, dtype).view(np.uint16))
    np.testing.assert_array_equal(lse, lse64.astype(np.float32))


@pytest.mark.parametrize("dtype", HALVES)
def test_half_inputs_no_kernel_takes_are_refused_with_every_reason(dtype):
    q, k, v = half_inputs(dtype, d=20)
    with pytest.raises(ValueError) as err:
        nkattn.attention(q, k, v, backend="cuda")
    assert "cuda (FFMA kernel): float16/bfloat16 need the tensor-core kernel" in str(err.value)
    assert "the tensor-core kernel supports d a multiple of 8 up to 256, got 20" in str(err.value)


def _device_half(x):
    """A device array of x's half dtype: numba's for float16; torch's for bfloat16 on a GPU (numba
    cannot copy a bfloat16 NumPy array to a real device: the buffer protocol has no bfloat16)."""
    if x.dtype == np.float16 or SIMULATOR:
        return cuda.to_device(x)
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("bfloat16 device arrays come from torch here, and torch has no CUDA")
    return torch.from_numpy(x.view(np.int16)).view(torch.bfloat16).cuda()


@pytest.mark.parametrize("dtype", HALVES)
def test_half_device_arrays_run_on_the_tensor_core_kernel_and_come_back_as_device_arrays(dtype):
    q, k, v = half_inputs(dtype, d=16)
    out, lse = nkattn.attention(*(_device_half(x) for x in (q, k, v)), causal=True, return_lse=True)
    host_out = arrays.to_host(out, dtype)
    assert host_out.dtype == dtype and arrays.is_device_array(out) and arrays.dtype_of(lse, "lse") == np.float32
    o64, lse64 = attention_ref(*(x.astype(np.float64) for x in (q, k, v)), causal=True)
    # a format-sized error: tests/test_exact_tc.py holds the kernel to FlashAttention's rule; this
    # checks the dispatch, the 16-bit views and the framework round trip
    np.testing.assert_allclose(host_out.astype(np.float64), o64, atol=2e-2)
    np.testing.assert_allclose(arrays.to_host(lse, np.dtype(np.float32)), lse64, atol=1e-3)


def _nearest_bfloat16(x: float) -> int:
    """The bits of the bfloat16 nearest to x (ties to even), by exact rational arithmetic."""
    below = np.array([x], np.float64).astype(np.float32).astype(BFLOAT16)  # any nearby bfloat16
    bits = int(below.view(np.uint16)[0])
    candidates = [(bits + step) & 0xFFFF for step in (-2, -1, 0, 1, 2)]
    values = {c: Fraction(float(np.array([c], np.uint16).view(BFLOAT16)[0])) for c in candidates}
    target = Fraction(x)
    best = min(values, key=lambda c: (abs(values[c] - target), c & 1))
    return best


def test_bfloat16_rounding_is_single_and_correct():
    tie_after_float32 = 1 + 2**-8 + 2**-30  # float32 rounds it onto the tie 1 + 2^-8, which then goes to even (1.0)
    assert np.array([tie_after_float32]).astype(BFLOAT16)[0] == 1.0, "ml_dtypes rounds twice (why round_to exists)"
    assert round_to(np.array([tie_after_float32, -tie_after_float32]), BFLOAT16).tolist() == [1.0078125, -1.0078125]
    rng = np.random.default_rng(5)
    x = np.concatenate([rng.standard_normal(2000) * 10.0 ** rng.integers(-30, 30, 2000),
                        1 + rng.integers(0, 2**8, 500) * 2.0**-8 + rng.choice([-1, 1], 500) * 2.0**-40])
    got = round_to(x, BFLOAT16).view(np.uint16)
    expected = np.array([_nearest_bfloat16(float(v)) for v in x], np.uint16)
    np.testing.assert_array_equal(got, expected)
    special = round_to(np.array([np.nan, np.inf, -np.inf, 0.0]), BFLOAT16).astype(np.float64)
    assert np.isnan(special[0]) and special[1:].tolist() == [np.inf, -np.inf, 0.0]


def test_torch_dtypes_are_read_from_torch():
    torch = pytest.importorskip("torch")
    assert arrays.dtype_of(torch.zeros(2, dtype=torch.bfloat16), "q") == BFLOAT16
    assert arrays.dtype_of(torch.zeros(2, dtype=torch.float16), "q") == np.float16
    assert arrays.dtype_of(torch.zeros(2, dtype=torch.float8_e4m3fn), "q") == ml_dtypes.float8_e4m3fn
    quantized = type("Tensor", (), {"__module__": "torch", "dtype": torch.qint8})()  # NumPy has no qint8
    with pytest.raises(TypeError, match="q has dtype torch.qint8; supported: float16, bfloat16"):
        arrays.dtype_of(quantized, "q")


def test_bfloat16_bits_cross_into_torch_and_its_nonfinite_check():
    torch = pytest.importorskip("torch")
    host = np.array([1.0078125, -2.5, np.inf], dtype=ml_dtypes.bfloat16)
    template = torch.zeros(1, dtype=torch.bfloat16)
    moved = arrays.from_host(template, host)
    assert moved.dtype == torch.bfloat16 and moved.tolist() == [1.0078125, -2.5, float("inf")]
    assert arrays.first_nonfinite(moved.reshape(1, 1, 1, 3), BFLOAT16) == ((0, 0, 0, 2), np.inf)
    assert arrays.first_nonfinite(moved[:2].reshape(1, 1, 1, 2), BFLOAT16) is None
