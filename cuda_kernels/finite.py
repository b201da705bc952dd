"""A NaN/inf test for numba device arrays, run where the data is.

`nkattn.attention` refuses non-finite inputs by default (``check_finite=True``).
NumPy, torch and CuPy arrays are checked by their own ``isfinite``; a plain numba
device array gets this kernel, which reads it once on the device instead of
copying all of it to the host (at N = 1M, d = 64 a float32 q is 256 MB: a few ms of
PCIe each way, against well under a millisecond of HBM reads).
"""

from __future__ import annotations

import math

import numpy as np
from numba import cuda

from nkattn.arrays import BFLOAT16
from nkattn.cuda_kernels.online_softmax import SIMULATOR

# an IEEE value is NaN or ±inf exactly when its exponent bits are all ones; testing
# the bits serves every float width, bfloat16 included, with one integer kernel
EXPONENT_BITS = {
    np.dtype(np.float16): (np.uint16, 0x7C00),
    np.dtype(np.float32): (np.uint32, 0x7F800000),
    np.dtype(np.float64): (np.uint64, 0x7FF0000000000000),
}
if BFLOAT16 is not None:
    EXPONENT_BITS[BFLOAT16] = (np.uint16, 0x7F80)
# the simulator runs every thread as a Python thread
THREADS = 32 if SIMULATOR else 256
MAX_BLOCKS = 4 if SIMULATOR else 1024


@cuda.jit
def nonfinite_flag_kernel(bits, exponent, flag):
    """flag[0] = 1 if an element of the 4-D `bits` (x viewed as unsigned integers) is NaN or inf.

    A grid-stride loop over the elements in C order, any strides; every thread that
    finds one writes the same 1, so the unordered writes need no atomics.
    """
    batch, heads, n, d = bits.shape
    for idx in range(cuda.grid(1), batch * heads * n * d, cuda.gridsize(1)):
        c = idx % d
        row = idx // d
        r = row % n
        bh = row // n
        if (bits[bh // heads, bh % heads, r, c] & exponent) == exponent:
            flag[0] = 1


def has_nonfinite(x) -> bool:
    """Whether the 4-D numba device array `x` (float16, bfloat16, float32 or float64) holds NaN or inf."""
    uint, exponent = EXPONENT_BITS[np.dtype(x.dtype)]
    bits = x.view(uint)  # the same item size keeps the strides of a view
    flag = cuda.to_device(np.zeros(1, np.int32))
    blocks = max(1, min(MAX_BLOCKS, math.ceil(x.size / THREADS)))
    nonfinite_flag_kernel[blocks, THREADS](bits, uint(exponent), flag)
    return bool(flag.copy_to_host()[0])
