"""The segmented radix sort against NumPy's stable argsort, and its scan and fill.

Under the simulator a thread sorts tiles of 4 elements in blocks of 4 threads and
the scan runs on 8 threads: the sizes below cross all three. On a GPU (tiles of
1024, scans of 1024 threads) the grid is larger.
"""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numba import cuda

from nkattn.cuda_kernels.radix_sort import (
    SORT_BLOCK,
    SORT_TILE,
    exclusive_scan,
    fill,
    segmented_radix_sort,
)

from .conftest import REAL_GPU


def check_sort(keys: np.ndarray, key_bits: int):
    device_keys = cuda.to_device(keys)
    sorted_keys, positions = segmented_radix_sort(device_keys, key_bits)
    expected = np.argsort(keys, axis=-1, kind="stable")
    np.testing.assert_array_equal(positions.copy_to_host(), expected)
    np.testing.assert_array_equal(sorted_keys.copy_to_host(), np.take_along_axis(keys, expected, -1))
    np.testing.assert_array_equal(device_keys.copy_to_host(), keys)  # the input is left as it was


def sort_case(segments, n, key_bits, distinct):
    return pytest.param(segments, n, key_bits, distinct, id=f"S{segments}-N{n}-bits{key_bits}-distinct{distinct}")


# n crosses a tile, a block of tiles and a scan chunk; few distinct keys make long runs of ties
SIM_GRID = [
    sort_case(1, 1, 1, 2),
    sort_case(1, SORT_TILE, 3, 8),
    sort_case(3, SORT_TILE * SORT_BLOCK + 1, 9, 5),  # two passes; the second digit decides
    sort_case(2, 67, 16, 3),
    sort_case(2, 67, 16, 1 << 16),
]
GPU_GRID = [
    sort_case(s, n, bits, distinct)
    for s, n in [(1, 1), (4, 1023), (4, 1025), (3, 32 * 1024 + 1), (2, 300_000)]
    for bits, distinct in [(1, 2), (8, 256), (12, 7), (16, 1 << 16)]
]


@pytest.mark.parametrize("segments,n,key_bits,distinct", GPU_GRID if REAL_GPU else SIM_GRID)
def test_sort_equals_stable_argsort(segments, n, key_bits, distinct):
    rng = np.random.default_rng(n + key_bits)
    # few distinct values spread over the whole key range, so every pass has digits to sort
    values = rng.choice(1 << key_bits, size=min(distinct, 1 << key_bits), replace=False)
    check_sort(rng.choice(values, size=(segments, n)).astype(np.int32), key_bits)


def test_sorted_and_reversed_inputs():
    n = 3000 if REAL_GPU else 37
    ramp = np.arange(n, dtype=np.int32) % 256
    check_sort(np.stack([np.sort(ramp), np.sort(ramp)[::-1].copy(), np.zeros(n, np.int32)]), 8)


@settings(max_examples=25, deadline=None)
@given(
    segments=st.integers(1, 3),
    n=st.integers(1, 4000 if REAL_GPU else 40),
    key_bits=st.integers(1, 16),
    seed=st.integers(0, 2**16),
)
def test_property_any_shape_and_key_width(segments, n, key_bits, seed):
    keys = np.random.default_rng(seed).integers(0, 1 << key_bits, (segments, n)).astype(np.int32)
    check_sort(keys, key_bits)


def test_exclusive_scan_runs_per_segment_in_row_major_order():
    rng = np.random.default_rng(1)
    counts = rng.integers(0, 5, (3, 4, 7 if not REAL_GPU else 700)).astype(np.int32)
    device = cuda.to_device(counts)
    exclusive_scan(device)
    flat = counts.reshape(3, -1)
    expected = np.cumsum(flat, axis=1) - flat
    np.testing.assert_array_equal(device.copy_to_host().reshape(3, -1), expected)


def test_fill():
    a = cuda.to_device(np.zeros((2, 45), np.int32))
    fill(a, -1)
    assert (a.copy_to_host() == -1).all()
