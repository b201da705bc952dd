"""TMA building blocks alone: the host map's checks, and a box copied by `ptx.cp_async_bulk_tensor_2d`
landing where `TileLayout` (and so the wgmma descriptors) expects it, byte for byte the same as the
cp.async path's tile. The same test functions run the stand-ins under the simulator and the real
instructions on the GPU.
"""

from __future__ import annotations

from functools import cache

import numpy as np
import pytest
from numba import cuda, from_dtype, uint32

from nkattn.cuda_kernels import ptx
from nkattn.cuda_kernels.online_softmax import launch_with_shared_memory
from nkattn.cuda_kernels.tensor_core import TILE_ALIGN, TileLayout, tile_functions
from nkattn.cuda_kernels.tma import tensor_map

BITS = {2: np.uint16, 4: np.uint32}


@cache
def tma_tile_kernel(rows: int, cols: int, element_bytes: int):
    """One block of 128 threads: thread 0 fills tile T by one TMA copy per column block, every thread
    fills tile C with the same rows by cp.async; both tiles' shared-memory bytes are written out."""
    smem_type = from_dtype(np.dtype(BITS[element_bytes]))
    tma_tile = TileLayout(rows, cols, element_bytes, 0)
    copy_tile = TileLayout(rows, cols, element_bytes, tma_tile.end)
    _, load_rows = tile_functions(copy_tile, element_bytes, 128)
    width, blocks, block_bytes = tma_tile.width, tma_tile.blocks, tma_tile.block_bytes
    block_cols = width // element_bytes
    tile_elems = tma_tile.nbytes // element_bytes
    copy_start = copy_tile.offset // element_bytes
    wait_copies = ptx.cp_async_wait(0)
    expected_tx = blocks * rows * width
    shared_bytes = copy_tile.end + TILE_ALIGN

    @cuda.jit
    def kernel(tmap, src, row0, out_tma, out_copy):
        tid = cuda.threadIdx.x
        smem = cuda.shared.array(0, smem_type)
        bars = cuda.shared.array(1, np.uint64)
        addr0 = ptx.shared_address(smem, 0)
        base = uint32(((TILE_ALIGN - addr0 % TILE_ALIGN) % TILE_ALIGN) // element_bytes)
        if tid == 0:
            ptx.mbarrier_init(bars, 0, 1)
        cuda.syncthreads()  # the barrier is set before the copies complete bytes on it
        if tid == 0:
            ptx.tensormap_acquire(tmap)
            ptx.mbarrier_arrive_expect_tx(bars, 0, expected_tx)
            for b in range(blocks):
                ptx.cp_async_bulk_tensor_2d(smem, base + b * block_bytes // element_bytes, tmap, b * block_cols, row0,
                                            bars, 0)
        load_rows(smem, base, src, 0, 0, row0, src.shape[2], src.shape[3], tid)
        ptx.cp_async_commit()
        wait_copies()
        ptx.mbarrier_wait(bars, 0, 0)
        cuda.syncthreads()  # every thread's cp.async chunks have landed
        for i in range(tid, tile_elems, 128):
            out_tma[i] = smem[base + i]
            out_copy[i] = smem[base + copy_start + i]

    return kernel, tma_tile, shared_bytes


def _numpy_tile(layout: TileLayout, block: np.ndarray) -> np.ndarray:
    """The tile's bytes as `TileLayout.byte` places ``block`` (rows x cols; rows past its end zero)."""
    out = np.zeros(layout.nbytes // layout.element_bytes, dtype=block.dtype)
    for r in range(layout.rows):
        for c in range(layout.cols):
            if r < block.shape[0]:
                out[(layout.byte(r, c) - layout.offset) // layout.element_bytes] = block[r, c]
    return out


def test_swizzle_is_the_tma_128_byte_pattern():
    """TMA's 128-byte swizzle as CUTLASS models it (Swizzle<3,4,3>): in each 1024-byte atom of eight
    128-byte rows, 16-byte chunk c of row r is stored at chunk c ^ (r % 8). `ptx.swizzle`, which TileLayout
    and the stand-in use, is that; the GPU runs of the tile test check it against the hardware."""
    for atom in range(3):
        for r in range(8):
            for c in range(8):
                at = 1024 * atom + 128 * r
                assert ptx.swizzle(at + 16 * c, 128) == at + 16 * (c ^ r)


def _tma_case(rows, cols, element_bytes, n, row0, gpu=False):
    ident = f"{rows}x{cols}x{element_bytes}B-n{n}-row{row0}"
    return pytest.param(rows, cols, element_bytes, n, row0, id=ident, marks=[pytest.mark.gpu] if gpu else [])


TMA_CASES = [
    # each swizzle width (128 B: d 64 f16 and d 32 tf32; 64 B: d 96; 32 B: d 80), one and several column
    # blocks, a box past the array's last row (zero-filled)
    _tma_case(16, 64, 2, 40, 32),
    _tma_case(16, 128, 2, 16, 0),
    _tma_case(8, 96, 2, 20, 16),
    _tma_case(8, 80, 2, 8, 0),
    _tma_case(16, 32, 4, 24, 16),
    # the kernel's tiles: 128 keys of d = 128 and 64 of d = 256, the last one partial
    _tma_case(128, 128, 2, 1000, 896, gpu=True),
    _tma_case(64, 256, 2, 100, 64, gpu=True),
]


@pytest.mark.parametrize("rows, cols, element_bytes, n, row0", TMA_CASES)
def test_tma_box_lands_as_the_cp_async_tile(rows, cols, element_bytes, n, row0):
    rng = np.random.default_rng(rows * 1000 + cols)
    dtype = BITS[element_bytes]
    src = rng.integers(1, np.iinfo(dtype).max, size=(1, 1, n, cols), dtype=dtype)  # no zeros: a zero fill shows
    kernel, layout, shared_bytes = tma_tile_kernel(rows, cols, element_bytes)
    src_dev = cuda.to_device(src)
    tmap = tensor_map(src_dev, rows, layout.width // element_bytes, layout.width)
    elems = layout.nbytes // element_bytes
    out_tma, out_copy = (cuda.device_array(elems, dtype=dtype) for _ in range(2))
    launch_with_shared_memory(kernel, 1, 128, shared_bytes, 0, tmap.buffer, src_dev, row0, out_tma, out_copy)
    expected = _numpy_tile(layout, src[0, 0, row0 : row0 + rows])
    np.testing.assert_array_equal(out_copy.copy_to_host(), expected)
    np.testing.assert_array_equal(out_tma.copy_to_host(), expected)


def test_tensor_map_views_leading_axes_as_rows_and_counts_box_bytes():
    src = cuda.to_device(np.zeros((2, 3, 40, 64), dtype=np.uint16))
    tmap = tensor_map(src, 64, 64, 128)
    assert (tmap.rows, tmap.cols, tmap.box_bytes) == (240, 64, 64 * 128)
    padded = cuda.to_device(np.zeros((50, 72), dtype=np.uint16))[:, :64]  # rows 144 bytes apart
    assert tensor_map(padded, 8, 32, 64).rows == 50


@pytest.mark.parametrize("shape, dtype, view, box, message", [
    ((64, 128), np.uint16, lambda a: a[:, ::2], (8, 64, 128), "contiguous rows"),
    ((4, 64, 128), np.uint16, lambda a: a[:, :32], (8, 64, 128), "collapses its leading axes"),
    ((8 * 64 + 8,), np.uint16, lambda a: a[1 : 8 * 64 + 1].reshape(8, 64), (8, 64, 128), "16-byte aligned"),
    ((16, 68), np.uint16, lambda a: a[:, :64], (8, 64, 128), "row stride"),
    ((64,), np.uint16, lambda a: a, (8, 64, 128), "2 or more dimensions"),
    ((16, 64), np.float64, lambda a: a, (8, 16, 128), "1-, 2- or 4-byte"),
    ((512, 64), np.uint16, lambda a: a, (257, 64, 128), "box_rows must be in 1..256"),
    ((16, 64), np.uint16, lambda a: a, (0, 64, 128), "box_rows"),
    ((16, 64), np.uint16, lambda a: a, (8, 32, 128), "must be the swizzle width"),
    ((16, 64), np.uint16, lambda a: a, (8, 64, 96), "swizzle_bytes must be one of"),
])
def test_tensor_map_refuses_what_tma_cannot_copy(shape, dtype, view, box, message):
    array = view(cuda.to_device(np.zeros(shape, dtype=dtype)))
    with pytest.raises(ValueError, match=message):
        tensor_map(array, *box)
