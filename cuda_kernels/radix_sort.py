"""Stable LSD radix sort of many int32 segments at once, and the per-segment scan and fills it uses.

`segmented_radix_sort(keys, key_bits)` sorts every row of a (S, N) int32 device
array (keys in [0, 2^key_bits)) and returns the sorted keys and each element's
original position: ``np.argsort(keys, axis=-1, kind="stable")`` and the keys taken
along it. One pass per RADIX_BITS digits, each three launches::

    histogram:  counts[s, digit, tile]   a thread per tile of SORT_TILE consecutive
                                         elements counts its digits in order
    scan:       exclusive scan of counts per segment, in (digit, tile) order: the
                first slot of each (digit, tile) in the output
    scatter:    the same threads walk the same tiles in order and place each
                element at its digit's next slot

A tile is walked in order and tiles are ranked in order, so equal keys keep their
order (stable) and the result is unique: no atomics, no data-dependent
nondeterminism. Used by the LSH kernel to sort rows by bucket
(`nkattn.cuda_kernels.lsh`); `exclusive_scan_kernel` and `fill_kernel` also serve
its work-item bookkeeping.
"""

from __future__ import annotations

import math

import numpy as np
from numba import cuda, int32

from nkattn.cuda_kernels.online_softmax import SIMULATOR

RADIX_BITS = 8
RADIX = 1 << RADIX_BITS
DIGIT_MASK = RADIX - 1
# elements per sorting thread (a tile of consecutive elements walked in order)
SORT_TILE = 4 if SIMULATOR else 1024
SORT_BLOCK = 4 if SIMULATOR else 32
SCAN_THREADS = 8 if SIMULATOR else 1024
ROW_BLOCK = 32 if SIMULATOR else 256


# --------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------


@cuda.jit
def radix_histogram_kernel(keys, shift, counts):
    """counts[s, digit, tile]: digits of tile `tile` of segment s; a thread per tile."""
    tile = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    seg = cuda.blockIdx.y
    n = keys.shape[1]
    local = cuda.shared.array((SORT_BLOCK, RADIX), int32)
    mine = cuda.threadIdx.x
    for dgt in range(RADIX):
        local[mine, dgt] = 0
    start = tile * SORT_TILE
    if start < n:
        for p in range(start, min(start + SORT_TILE, n)):
            dgt = (keys[seg, p] >> shift) & DIGIT_MASK
            local[mine, dgt] += 1
        for dgt in range(RADIX):
            counts[seg, dgt, tile] = local[mine, dgt]


@cuda.jit
def exclusive_scan_kernel(counts):
    """In place, per segment (block), over the flattened (digit, tile) order: a chunk per
    thread summed in order, the chunk totals scanned by one thread, then written back."""
    seg = cuda.blockIdx.x
    flat = counts[seg]
    tid = cuda.threadIdx.x
    n_digits, n_tiles = flat.shape
    total = n_digits * n_tiles
    chunk = (total + SCAN_THREADS - 1) // SCAN_THREADS
    partial = cuda.shared.array(SCAN_THREADS, int32)
    lo = min(tid * chunk, total)
    hi = min(lo + chunk, total)
    acc = 0
    for f in range(lo, hi):
        dgt = f // n_tiles
        acc += flat[dgt, f - dgt * n_tiles]
    partial[tid] = acc
    cuda.syncthreads()  # every chunk total is in shared memory
    if tid == 0:
        run = 0
        for t in range(SCAN_THREADS):
            c = partial[t]
            partial[t] = run
            run += c
    cuda.syncthreads()  # chunk offsets are ready
    run = partial[tid]
    for f in range(lo, hi):
        dgt = f // n_tiles
        c = flat[dgt, f - dgt * n_tiles]
        flat[dgt, f - dgt * n_tiles] = run
        run += c


@cuda.jit
def radix_scatter_kernel(keys, values, shift, offsets, keys_out, values_out):
    """Each thread walks its tile in order and places every element at its digit's next slot."""
    tile = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    seg = cuda.blockIdx.y
    n = keys.shape[1]
    start = tile * SORT_TILE
    local = cuda.shared.array((SORT_BLOCK, RADIX), int32)
    mine = cuda.threadIdx.x
    if start < n:
        for dgt in range(RADIX):
            local[mine, dgt] = offsets[seg, dgt, tile]
        for p in range(start, min(start + SORT_TILE, n)):
            key = keys[seg, p]
            dgt = (key >> shift) & DIGIT_MASK
            slot = local[mine, dgt]
            local[mine, dgt] = slot + 1
            keys_out[seg, slot] = key
            values_out[seg, slot] = values[seg, p]


@cuda.jit
def iota_kernel(values):
    p = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    seg = cuda.blockIdx.y
    if p < values.shape[1]:
        values[seg, p] = p


@cuda.jit
def fill_kernel(a, value):
    p = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    seg = cuda.blockIdx.y
    if p < a.shape[1]:
        a[seg, p] = value


# --------------------------------------------------------------------------------------
# launch geometry
# --------------------------------------------------------------------------------------


def tile_launch_config(n: int, segments: int):
    """(grid, block) of the histogram and the scatter, which must agree: thread
    ``blockIdx.x * SORT_BLOCK + threadIdx.x`` owns tile that of segment ``blockIdx.y``."""
    return (math.ceil(math.ceil(n / SORT_TILE) / SORT_BLOCK), segments), SORT_BLOCK


def scan_launch_config(segments: int):
    """(grid, block) of the exclusive scan: a block of SCAN_THREADS per segment."""
    return segments, SCAN_THREADS


def elementwise_launch_config(n: int, segments: int):
    """(grid, block) of a kernel with one thread per element p of every segment s:
    ``p = blockIdx.x * ROW_BLOCK + threadIdx.x``, ``s = blockIdx.y`` (iota, fill, and
    the LSH kernel's per-bucket bookkeeping)."""
    return (math.ceil(n / ROW_BLOCK), segments), ROW_BLOCK


# --------------------------------------------------------------------------------------
# host pipelines
# --------------------------------------------------------------------------------------


def exclusive_scan(counts, stream=0):
    """Exclusive scan, in place, of each segment of `counts` (S, rows, cols) int32 in row-major order."""
    grid, block = scan_launch_config(counts.shape[0])
    exclusive_scan_kernel[grid, block, stream](counts)


def fill(a, value, stream=0):
    """a[:, :] = value for a (S, N) device array."""
    grid, block = elementwise_launch_config(a.shape[1], a.shape[0])
    fill_kernel[grid, block, stream](a, value)


def segmented_radix_sort(keys, key_bits: int, stream=0):
    """Sort each row of `keys` (S, N) int32 in [0, 2^key_bits) stably; returns device arrays
    (sorted keys, original positions), both (S, N) int32. `keys` is not modified."""
    segments, n = keys.shape
    n_tiles = math.ceil(n / SORT_TILE)
    tile_grid, tile_block = tile_launch_config(n, segments)
    row_grid, row_block = elementwise_launch_config(n, segments)
    counts = cuda.device_array((segments, RADIX, n_tiles), dtype=np.int32, stream=stream)
    keys_a, keys_b = keys, cuda.device_array_like(keys, stream=stream)
    vals_a = cuda.device_array((segments, n), dtype=np.int32, stream=stream)
    vals_b = cuda.device_array((segments, n), dtype=np.int32, stream=stream)
    iota_kernel[row_grid, row_block, stream](vals_a)
    for shift in range(0, key_bits, RADIX_BITS):
        radix_histogram_kernel[tile_grid, tile_block, stream](keys_a, shift, counts)
        exclusive_scan(counts, stream)
        radix_scatter_kernel[tile_grid, tile_block, stream](keys_a, vals_a, shift, counts, keys_b, vals_b)
        if keys_a is keys:
            keys_a = cuda.device_array_like(keys, stream=stream)  # never overwrite the caller's keys
        keys_a, keys_b = keys_b, keys_a
        vals_a, vals_b = vals_b, vals_a
    return keys_a, vals_a
