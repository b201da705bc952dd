"""Tensor maps for the Tensor Memory Accelerator (TMA): host-side encoding of the 2-D view of a device
array that `ptx.cp_async_bulk_tensor_2d` copies boxes of into swizzled shared-memory tiles.

A map is 128 opaque bytes made by the driver (``cuTensorMapEncodeTiled``, cuda-bindings). CUDA C passes
it as a ``const __grid_constant__ CUtensorMap`` kernel parameter (``.param`` space); numba kernels cannot
declare one, so `tensor_map` copies the bytes into a 64-byte aligned device buffer (``.global`` space),
which the PTX ISA also allows ("The operand tensorMap is the generic address of the opaque tensor-map
object which resides in .param space or .const space or .global space", cp.async.bulk.tensor). A map in
global memory is read through the *tensormap proxy*, which is "not acquired from generic-proxy at CUDA
Kernel start and must therefore be acquired explicitly using fence.proxy.tensormap::generic.acquire"
(PTX ISA, "Memory Consistency Model", CUDA API synchronization): every thread that issues TMA copies
runs `ptx.tensormap_acquire` on the map before its first copy.

Box and tile: a box of ``box_rows`` rows x ``box_cols`` elements with ``box_cols * element_bytes`` equal
to the swizzle width W lands as one column block of a `tensor_core.TileLayout` (rows of W bytes, 16-byte
chunks permuted by `ptx.swizzle`), so a tile of ``cols`` elements is filled by ``TileLayout.blocks``
copies, one per column block. Rows and columns outside the array are zero-filled (OOB fill "none");
the 2-D view's rows run on across heads, so a box past the end of one head's N rows reads the next
head's rows instead of zeros, and a box past a key length reads padding. Neither is masked away in
P·V when it holds a NaN or an infinity (0·inf), so the ping-pong ring copies by TMA only the whole
tiles below the key length (`exact_tc.TileConfig.tma`) and the tile across it by zero-filling cp.async.

Under the simulator `TensorMap.buffer` is a `SimulatedMap` (the array's host view and the box), which
the simulator passes to kernels as it is and `ptx.cp_async_bulk_tensor_2d`'s stand-in copies from.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from nkattn.cuda_kernels import ptx

MAX_BOX = 256  # cuTensorMapEncodeTiled: every box dimension is at most 256 elements
MAX_COORDINATE = 2**31 - 1  # a copy's coordinates are .s32
CACHED_MAPS = 256
MAP_BYTES = 128  # the fence's size operand (`ptx.tensormap_acquire`)
MAP_ALIGN = 64  # cuTensorMapEncodeTiled: the map's address is 64-byte aligned
GLOBAL_ALIGN = 16  # the global address and every stride are multiples of 16 bytes
DATA_TYPES = {1: "CU_TENSOR_MAP_DATA_TYPE_UINT8", 2: "CU_TENSOR_MAP_DATA_TYPE_UINT16",
              4: "CU_TENSOR_MAP_DATA_TYPE_UINT32"}  # raw bits: f16/bf16 as uint16, fp8/s8 as uint8
SWIZZLES = {128: "CU_TENSOR_MAP_SWIZZLE_128B", 64: "CU_TENSOR_MAP_SWIZZLE_64B", 32: "CU_TENSOR_MAP_SWIZZLE_32B"}


@dataclass(frozen=True)
class SimulatedMap:
    """What the simulator's TMA stand-in needs of a map: the (rows, cols) host view and the box."""

    view: np.ndarray
    box_rows: int
    box_cols: int
    swizzle_bytes: int


@dataclass(frozen=True)
class TensorMap:
    """A tensor map and what it describes. Kernels take ``buffer``: the 128-byte map in a 64-byte aligned
    device array of 16 uint64 (a `SimulatedMap` under the simulator). ``array`` is held so that the
    memory the map points at lives as long as the map."""

    buffer: object
    array: object
    rows: int
    cols: int
    box_rows: int
    box_cols: int
    swizzle_bytes: int
    element_bytes: int

    @property
    def box_bytes(self) -> int:
        """Bytes one copy delivers, zero-filled ones included: the transaction count to expect."""
        return self.box_rows * self.box_cols * self.element_bytes


def _interface(array) -> dict:
    """The array interface of a device array (CUDA) or, under the simulator, of its host view."""
    if ptx.SIMULATOR:
        return np.asarray(array).__array_interface__
    cai = getattr(array, "__cuda_array_interface__", None)
    if cai is None:
        raise TypeError(f"a tensor map describes device memory: got a {type(array).__name__} without "
                        "__cuda_array_interface__")
    return cai


def _two_d(shape, strides, itemsize) -> tuple[int, int, int]:
    """(rows, cols, row stride in bytes) of the 2-D view: the last axis as columns, the others
    collapsed into rows, which needs them to be one uniform stride apart."""
    if len(shape) < 2:
        raise ValueError(f"a tensor map needs an array of 2 or more dimensions, got shape {tuple(shape)}")
    if strides is None:  # the interface's way of saying C-contiguous
        strides = tuple(int(np.prod(shape[i + 1:])) * itemsize for i in range(len(shape)))
    if strides[-1] != itemsize:
        raise ValueError(f"a tensor map needs contiguous rows (last stride {itemsize} bytes), got strides {strides}")
    row_stride = strides[-2]
    for axis in range(len(shape) - 2):
        if shape[axis] > 1 and strides[axis] != strides[axis + 1] * shape[axis + 1]:
            raise ValueError(f"a tensor map of shape {tuple(shape)} collapses its leading axes into rows: they must be "
                             f"contiguous with each other, got strides {strides}")
    return int(np.prod(shape[:-1])), shape[-1], row_stride


def tensor_map(array, box_rows: int, box_cols: int, swizzle_bytes: int) -> TensorMap:
    """The TMA map of ``array`` seen as (rows, cols) = (prod(shape[:-1]), shape[-1]), e.g. q of shape
    (B, H, N, d) as (B·H·N, d), copied in boxes of ``box_rows`` x ``box_cols`` elements, swizzled as
    `ptx.swizzle` does for width ``swizzle_bytes`` (128, 64 or 32: a `TileLayout`'s ``width``).

    Raises ValueError for what the driver would refuse or the stand-in does not model: rows that are not
    contiguous, a global address or row stride that is not a multiple of 16 bytes, box dimensions outside
    1-256, and a box row of other than ``swizzle_bytes`` bytes (the hardware also takes narrower rows,
    but a TileLayout column block is exactly one swizzle width wide).
    """
    interface = _interface(array)
    itemsize = np.dtype(interface["typestr"]).itemsize
    if itemsize not in DATA_TYPES:
        raise ValueError(f"a tensor map copies 1-, 2- or 4-byte elements, got {itemsize}-byte ones")
    rows, cols, row_stride = _two_d(tuple(interface["shape"]), interface.get("strides"), itemsize)
    address = interface["data"][0]
    if address % GLOBAL_ALIGN:
        raise ValueError(f"a tensor map's global address must be {GLOBAL_ALIGN}-byte aligned, got {address:#x}")
    if row_stride % GLOBAL_ALIGN:
        raise ValueError(f"a tensor map's row stride must be a multiple of {GLOBAL_ALIGN} bytes, got {row_stride}")
    if swizzle_bytes not in SWIZZLES:
        raise ValueError(f"swizzle_bytes must be one of {sorted(SWIZZLES)}, got {swizzle_bytes}")
    for name, extent in (("box_rows", box_rows), ("box_cols", box_cols)):
        if not 1 <= extent <= MAX_BOX:
            raise ValueError(f"{name} must be in 1..{MAX_BOX}, got {extent}")
    if box_cols * itemsize != swizzle_bytes:
        raise ValueError(f"a box row of {box_cols} x {itemsize} bytes must be the swizzle width, {swizzle_bytes} bytes "
                         "(one TileLayout column block)")
    if rows > MAX_COORDINATE:
        raise ValueError(f"a tensor map's rows are addressed by 32-bit signed coordinates: {rows} rows is more than "
                         f"{MAX_COORDINATE}")
    if ptx.SIMULATOR:
        view = np.lib.stride_tricks.as_strided(np.asarray(array), (rows, cols), (row_stride, itemsize))
        buffer = SimulatedMap(view, box_rows, box_cols, swizzle_bytes)
    else:
        buffer = _encode(address, rows, cols, row_stride, itemsize, box_rows, box_cols, swizzle_bytes)
    return TensorMap(buffer, array, rows, cols, box_rows, box_cols, swizzle_bytes, itemsize)


def _encode(address, rows, cols, row_stride, itemsize, box_rows, box_cols, swizzle_bytes):
    """cuTensorMapEncodeTiled, then the 128 bytes into a device buffer the kernels read them from."""
    from cuda.bindings import driver
    from numba import cuda

    u64, u32 = driver.cuuint64_t, driver.cuuint32_t  # the bindings refuse plain ints for these arrays
    result, tmap = driver.cuTensorMapEncodeTiled(
        getattr(driver.CUtensorMapDataType, DATA_TYPES[itemsize]),
        2,
        address,
        [u64(cols), u64(rows)],  # innermost first
        [u64(row_stride)],  # bytes, for every dimension but the innermost
        [u32(box_cols), u32(box_rows)],
        [u32(1), u32(1)],
        driver.CUtensorMapInterleave.CU_TENSOR_MAP_INTERLEAVE_NONE,
        getattr(driver.CUtensorMapSwizzle, SWIZZLES[swizzle_bytes]),
        # 256-byte L2 fills: a box row is a whole 128-byte line or less, and neighbouring rows follow
        driver.CUtensorMapL2promotion.CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
        # "NONE" fills out-of-bounds elements with zeros (the other mode is a NaN)
        driver.CUtensorMapFloatOOBfill.CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
    )
    if result != driver.CUresult.CUDA_SUCCESS:
        raise RuntimeError(f"cuTensorMapEncodeTiled failed: {result!r}")
    buffer = cuda.to_device(np.array([int(w) for w in tmap.opaque], dtype=np.uint64))
    if buffer.device_ctypes_pointer.value % MAP_ALIGN:
        raise RuntimeError(f"the device buffer of a tensor map is not {MAP_ALIGN}-byte aligned (memory manager?)")
    return buffer


_map_buffers: OrderedDict = OrderedDict()


def map_buffer(array, box_rows: int, box_cols: int, swizzle_bytes: int):
    """`tensor_map`'s ``buffer`` for ``array``, kept for the next call with an array of the same address,
    shape, strides and element type on the same device: the map's bytes are a function of those and the
    box alone, so a kept buffer is right for any array they describe, and a kernel called again on the
    same inputs skips the driver's encoding and the copy of the map to the device. The last
    `CACHED_MAPS` are kept (none under the simulator, whose maps hold the array itself). The caller
    keeps ``array`` alive while a kernel reads it."""
    if ptx.SIMULATOR:
        return tensor_map(array, box_rows, box_cols, swizzle_bytes).buffer
    from numba import cuda

    interface = _interface(array)
    # the buffer lives on the device that was current when it was made
    key = (cuda.get_current_device().id, interface["data"][0], tuple(interface["shape"]), interface.get("strides"),
           interface["typestr"], box_rows, box_cols, swizzle_bytes)
    buffer = _map_buffers.get(key)
    if buffer is None:
        buffer = tensor_map(array, box_rows, box_cols, swizzle_bytes).buffer
        _map_buffers[key] = buffer
        if len(_map_buffers) > CACHED_MAPS:
            _map_buffers.popitem(last=False)
    else:
        _map_buffers.move_to_end(key)
    return buffer
