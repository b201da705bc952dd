"""The tensor-core tile core: shared-memory tile layouts, async tile loads, wgmma descriptors.

Every tensor-core path (exact attention, the low-rank operators, the quantized
kernels) stages row-major tiles (rows = tokens, columns = head dim, the layout
of q, k and v in global memory) in shared memory with `TileLayout` and feeds
them to wgmma (`nkattn.cuda_kernels.ptx`) through descriptors:

* the same tile serves as a **K-major** operand when its columns are the
  product's K dimension (Q and K in S = Q·Kᵀ) and as an **MN-major** operand
  when its columns are N (V in O = P·V, read with wgmma's transpose flag);
* a row of ``cols`` elements is cut into column blocks of ``W`` bytes (the
  widest swizzle, 128/64/32 B, dividing the row); a block holds the tile's
  rows at W bytes each, its 16-byte chunks permuted by `ptx.swizzle`, so that
  the 8 rows of a core matrix fall in different banks::

         block 0 (W bytes of every row)    block 1              ...
        +------------------------------+  +-----------------+
        | row 0: chunks 0..W/16-1      |  | row 0           |
        | row 1: chunks permuted ^1    |  | ...             |
        | ... 8-row groups 8W apart    |  |                 |
        +------------------------------+  +-----------------+

* every tile starts on a 1024-byte boundary (the 128-byte swizzle repeats every
  1024 bytes and the hardware applies it to absolute address bits).

The layouts are host objects (all sizes are compile-time constants of a kernel
factory); the device functions returned by `tile_functions` close over them.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

from numba import cuda, uint32

from nkattn.cuda_kernels import ptx

TILE_ALIGN = 1024
CHUNK_BYTES = 16  # one cp.async / one swizzle unit


@dataclass(frozen=True)
class TileLayout:
    """A rows x cols tile of ``element_bytes`` elements at byte ``offset`` of the shared buffer."""

    rows: int
    cols: int
    element_bytes: int
    offset: int = 0

    def __post_init__(self):
        if self.rows % 8:
            raise ValueError(f"tile rows must be a multiple of 8, got {self.rows}")
        if self.offset % TILE_ALIGN:
            raise ValueError(f"tile offset must be {TILE_ALIGN}-byte aligned, got {self.offset}")

    @property
    def width(self) -> int:
        """Bytes per row in one column block (the swizzle width)."""
        return ptx.swizzle_width(self.cols * self.element_bytes)

    @property
    def blocks(self) -> int:
        return self.cols * self.element_bytes // self.width

    @property
    def block_bytes(self) -> int:
        return self.rows * self.width

    @property
    def nbytes(self) -> int:
        return self.blocks * self.block_bytes

    @property
    def end(self) -> int:
        """The next 1024-byte aligned offset after this tile."""
        return -(-(self.offset + self.nbytes) // TILE_ALIGN) * TILE_ALIGN

    @property
    def chunks_per_row(self) -> int:
        return self.cols * self.element_bytes // CHUNK_BYTES

    def byte(self, row: int, col: int) -> int:
        """Byte offset of element (row, col) in the shared buffer (host mirror of the device code)."""
        block, inner = divmod(col * self.element_bytes, self.width)
        return self.offset + block * self.block_bytes + ptx.swizzle(row * self.width + inner, self.width)

    def k_major_bits(self):
        """Descriptor bits of this tile as a K-major operand (LBO unused when swizzled: 16)."""
        return ptx.descriptor_bits(16, 8 * self.width, self.width)

    def k_major_start(self, row0: int, k0: int) -> int:
        """Byte offset where the K-major operand of rows [row0, ...) and columns [k0, ...) starts;
        one wgmma's K columns must lie in one column block."""
        block, inner = divmod(k0 * self.element_bytes, self.width)
        return self.offset + block * self.block_bytes + row0 * self.width + inner

    def mn_major_bits(self):
        """Descriptor bits of this tile as an MN-major operand: column blocks ``block_bytes``
        apart (LBO), 8-row groups of K ``8W`` apart (SBO)."""
        return ptx.descriptor_bits(self.block_bytes, 8 * self.width, self.width)

    def mn_major_start(self, k0: int) -> int:
        """Byte offset of the MN-major operand whose K rows start at ``k0`` (a multiple of 8)."""
        return self.offset + k0 * self.width


@cache
def tile_functions(layout: TileLayout, smem_itemsize: int, threads: int):
    """Device functions over one tile layout, indices in elements of a shared array of ``smem_itemsize``.

    ``chunk_index(row, chunk)``   shared-array index of 16-byte chunk ``chunk`` of ``row``
    ``load_rows(smem, base, src, b, h, row0, nrows, ncols, tid)``
        cp.async rows [row0, row0 + rows) of ``src[b, h]`` into the tile (``base``: the
        element index of the aligned buffer start), over ``threads`` threads; rows past
        ``nrows`` and columns past ``ncols`` are zero-filled and never read.

    When ``threads`` is a multiple of the chunks per row, every thread copies the same
    column chunk of rows ``threads / chunks_per_row`` apart, and when that row step is a
    multiple of 8 the swizzle of those rows is the same: the shared-memory index then
    advances by a constant, and the per-chunk index arithmetic (divisions, swizzle) is
    done once per call instead of once per chunk.
    """
    width, block_bytes, offset = layout.width, layout.block_bytes, layout.offset
    chunks_per_block = width // CHUNK_BYTES
    chunks_per_row = layout.chunks_per_row
    rows = layout.rows
    elems_per_chunk = CHUNK_BYTES // layout.element_bytes
    mask = width // CHUNK_BYTES - 1
    n_chunks = rows * chunks_per_row
    row_step = threads // chunks_per_row if threads % chunks_per_row == 0 else 0
    linear = row_step > 0 and row_step % 8 == 0 and rows % row_step == 0
    per_thread = rows // row_step if linear else 0
    step_elems = row_step * width // smem_itemsize

    @cuda.jit(device=True, inline="always")
    def chunk_index(row, chunk):
        block = chunk // chunks_per_block
        inner = chunk - block * chunks_per_block
        byte = row * width + inner * CHUNK_BYTES
        byte ^= ((byte >> 7) & mask) << 4  # ptx.swizzle
        return uint32((offset + block * block_bytes + byte) // smem_itemsize)

    @cuda.jit(device=True, inline="always")
    def copy_chunk(smem, smem_idx, src, b, h, row, col, nrows, ncols):
        valid = row < nrows and col < ncols
        # a zero-filled chunk reads nothing, but its source address must still be valid
        ptx.cp_async16(smem, smem_idx, src, b, h, row if valid else 0, col if valid else 0, CHUNK_BYTES if valid else 0)

    if linear:

        @cuda.jit(device=True, inline="always")
        def load_rows(smem, base, src, b, h, row0, nrows, ncols, tid):
            r = tid // chunks_per_row
            c = tid - r * chunks_per_row
            first = base + chunk_index(r, c)
            for i in range(per_thread):
                copy_chunk(smem, first + i * step_elems, src, b, h, row0 + r + i * row_step, c * elems_per_chunk,
                           nrows, ncols)

    else:

        @cuda.jit(device=True, inline="always")
        def load_rows(smem, base, src, b, h, row0, nrows, ncols, tid):
            for idx in range(tid, n_chunks, threads):
                r = idx // chunks_per_row
                c = idx - r * chunks_per_row
                copy_chunk(smem, base + chunk_index(r, c), src, b, h, row0 + r, c * elems_per_chunk, nrows, ncols)

    return chunk_index, load_rows
