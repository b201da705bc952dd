"""PTX building blocks for the tensor-core kernels, as numba intrinsics, each with a simulator stand-in.

numba has no tensor-core API, so every instruction here is inline PTX emitted
through llvmlite's ``InlineAsm`` from a numba ``@intrinsic`` (the way
`online_softmax.load_vec16` is built). Each building block has a pure-Python
stand-in with the same lane/element semantics, selected when
``NUMBA_ENABLE_CUDASIM=1``, so that the kernels built on them run in CI.

Fragment layouts (PTX ISA, "Asynchronous Warpgroup Level Matrix Multiply";
`accumulator_coords`, `a_fragment_coords` compute them and the tests check
them against NumPy on the GPU). A warpgroup is 128 consecutive threads; thread
``t`` is in warp ``w = t // 32`` with ``g = (t % 32) // 4`` and ``tq = t % 4``:

* **Accumulator D of m64nNk*** (N/2 float32 registers ``d[0:N/2]``): register
  ``4c + e`` holds ``D[16w + g + 8(e >= 2), 8c + 2tq + (e & 1)]``. Rows ``16w + g``
  and ``16w + g + 8`` belong to the 4 lanes of one quad, so row reductions are
  two ``shfl.xor`` steps (1, 2).
* **A from registers, f16/bf16 m64k16** (4 x b32, two halves each, low half
  first): register ``r`` holds ``A[16w + g + 8(r & 1), 2tq + 8(r >> 1) + {0, 1}]``.
  That is the accumulator layout of two adjacent n8 chunks, so P = softmax(S)
  becomes the A operand of P·V without leaving registers.
* **A from registers, tf32 m64k8** (4 x b32): register ``r`` holds
  ``A[16w + g + 8(r & 1), tq + 4(r >> 1)]``.
* **A from registers, e4m3 and s8 m64k32** (4 x b32, four bytes each, lowest byte first): register
  ``r`` holds ``A[16w + g + 8(r & 1), 4tq + 16(r >> 1) + {0, 1, 2, 3}]`` (CUTLASS's
  ``ALayout_64x32``; the PTX ISA gives it as a figure). The accumulator holds columns
  ``2tq + {0, 1}`` of every 8, so a kernel that feeds P from registers permutes its B
  operand's keys to match (`nkattn.cuda_kernels.fp8`).
* **s8** (``.s32.s8.s8``): the accumulator layout above with int32 registers, sums exact
  (integer); no scale immediates (the PTX ISA's integer form takes scale-d alone).
* **Shared-memory operands** are described by a 64-bit matrix descriptor
  (`descriptor_bits`, `smem_descriptor`): start address, leading and stride byte offsets (all
  >> 4) and the swizzle mode. A *K-major* operand (K contiguous: Q, K) is stored
  in column blocks of ``W`` bytes (W = 128, 64 or 32, the swizzle width); a
  block holds rows of W bytes, 8-row groups ``8W`` bytes apart (SBO), and the
  16-byte chunks of row r are permuted by ``chunk ^ (r % 8)`` (`swizzle`). An
  *MN-major* operand (N contiguous: V in P·V, read with the transpose flag) has
  the same physical layout with the roles of rows and columns exchanged: rows
  are K (keys), W-byte blocks run along N (head dim).

Warp-level ``mma.sync.m16n8k16`` (PTX ISA, "Matrix Fragments for mma.m16n8k16";
the FlashAttention-2 instruction, for GPUs without wgmma) uses the same per-warp
layouts as warp 0 of a warpgroup: A (16 x 16, 4 x b32) as `a_fragment_coords`,
D (16 x 8, 4 float32) as `accumulator_coords` with ``i < 4``, and B given as
N x K (8 x 16, 2 x b32): register ``r`` holds ``B[g, 2tq + 8r + {0, 1}]``
(`mma_b_coords`). ``ldmatrix.x4`` fills them from shared memory: lanes 8j to
8j + 7 give the row addresses of 8 x 8 matrix j, and lane ``L`` receives in
register j the elements ``(L // 4, 2(L % 4) + {0, 1})`` of matrix j, or with
``.trans`` the elements ``(2(L % 4) + {0, 1}, L // 4)`` (`ldmatrix_coords`).

Synchronization finer than ``cuda.syncthreads()``, for warp-specialized kernels (a producer
filling shared-memory slots while consumer warpgroups compute; FlashAttention-3's structure):
*mbarriers* (`mbarrier_init`, `mbarrier_arrive`, `mbarrier_wait` by phase parity, and
`cp_async_mbarrier_arrive`, which arrives when the thread's cp.async copies land) hand a slot
from its writers to its readers and back; *named barriers* (`named_barrier_sync`,
`named_barrier_arrive`, hardware barriers 1-15 over a given number of threads) order two
warpgroups' turns without stopping the rest of the block. The stand-ins are Python condition
variables with the same counting; the simulator's cp.async lands when its thread waits for it.

Tensor Memory Accelerator copies (`cp_async_bulk_tensor_2d`, one thread copies a whole box of a
`tma.tensor_map`): the bytes are counted on an mbarrier as *transactions*. A phase completes when its
arrivals have come **and** its transaction count is back to zero: the issuing thread arrives with
`mbarrier_arrive_expect_tx` (the box's bytes, before or after issuing the copies), and each copy
completes its bytes when it lands. The map lives in global memory, read through the tensormap proxy:
`tensormap_acquire` before the first copy (`nkattn.cuda_kernels.tma` gives the ISA's words). The
stand-in copies at once, applying `swizzle` to the destination's byte offsets as the hardware does to
its shared-memory address bits, and then completes the transaction.
"""

from __future__ import annotations

import threading
from functools import cache

import numpy as np
from numba import cuda, uint64
from numba.core import config

SIMULATOR = bool(config.ENABLE_CUDASIM)


def _check_setmaxnreg(action: str, count: int):
    if action not in ("inc", "dec") or count % 8 or not 24 <= count <= 256:
        raise ValueError(f"setmaxnreg takes 'inc' or 'dec' and a multiple of 8 in 24..256, got {action!r}, {count}")


WARPGROUP = 128
SWIZZLE_MODES = {128: 1, 64: 2, 32: 3}  # descriptor bits 62-63 for each swizzle width in bytes
KINDS = ("f16", "bf16", "tf32", "e4m3", "s8")
K_STEP = {"f16": 16, "bf16": 16, "tf32": 8, "e4m3": 32, "s8": 32}  # K of one wgmma instruction
ELEMENT_BYTES = {"f16": 2, "bf16": 2, "tf32": 4, "e4m3": 1, "s8": 1}
# tf32 and the 8-bit formats have no transpose immediates: wgmma reads both operands K-major
K_MAJOR_ONLY = ("tf32", "e4m3", "s8")
BYTE_KINDS = ("e4m3", "s8")  # one-byte operands: the same A fragment layout
INTEGER_KINDS = ("s8",)  # s32 accumulators, integer-exact
E4M3_MAX = 448.0  # the largest finite e4m3 (e4m3fn: no infinities), where .satfinite saturates

if not SIMULATOR:
    from llvmlite import ir
    from numba.core import types
    from numba.cuda import cgutils
    from numba.cuda.extending import intrinsic


# ---------------------------------------------------------------- layouts (host and stand-ins)


def accumulator_coords(t: int, i: int) -> tuple[int, int]:
    """(row, col) of accumulator register ``i`` of warpgroup thread ``t`` (m64nN, float32)."""
    w, lane = divmod(t, 32)
    g, tq = divmod(lane, 4)
    chunk, e = divmod(i, 4)
    return 16 * w + g + 8 * (e >> 1), 8 * chunk + 2 * tq + (e & 1)


def a_fragment_coords(kind: str, t: int, r: int) -> list[tuple[int, int]]:
    """(row, k) of the elements in A register ``r`` of thread ``t`` (low half, or lowest byte, first)."""
    w, lane = divmod(t, 32)
    g, tq = divmod(lane, 4)
    row = 16 * w + g + 8 * (r & 1)
    if kind == "tf32":
        return [(row, tq + 4 * (r >> 1))]
    if kind in BYTE_KINDS:
        return [(row, 4 * tq + 16 * (r >> 1) + e) for e in range(4)]
    k0 = 2 * tq + 8 * (r >> 1)
    return [(row, k0), (row, k0 + 1)]


def mma_b_coords(t: int, r: int) -> list[tuple[int, int]]:
    """(n, k) of the elements in B register ``r`` of lane ``t`` of ``mma.sync.m16n8k16`` (B as N x K)."""
    g, tq = divmod(t % 32, 4)
    k0 = 2 * tq + 8 * r
    return [(g, k0), (g, k0 + 1)]


def ldmatrix_coords(t: int, transpose: bool) -> list[tuple[int, int]]:
    """(row, col) within each 8 x 8 matrix of the two 16-bit elements ``ldmatrix`` gives lane ``t``."""
    g, tq = divmod(t % 32, 4)
    if transpose:
        return [(2 * tq, g), (2 * tq + 1, g)]
    return [(g, 2 * tq), (g, 2 * tq + 1)]


def swizzle(byte_offset: int, width: int) -> int:
    """The swizzled byte offset (Swizzle<b,4,3>): 16-byte chunk bits [4, 4+b) ^= bits [7, 7+b).

    Valid inside a region aligned to ``8 * width`` bytes, which is how every tile is placed.
    """
    mask = width // 16 - 1
    return byte_offset ^ (((byte_offset >> 7) & mask) << 4)


def swizzle_width(row_bytes: int) -> int:
    """The widest swizzle (128, 64 or 32 bytes) that divides a tile row of ``row_bytes``."""
    for width in (128, 64, 32):
        if row_bytes % width == 0:
            return width
    raise ValueError(f"a tile row of {row_bytes} bytes is not a multiple of 32 bytes")


def descriptor_bits(lbo: int, sbo: int, width: int) -> np.uint64:
    """Every field of a 64-bit shared-memory matrix descriptor but the start address: leading
    byte offset (bits 16-29), stride byte offset (32-45), both >> 4, and the swizzle mode
    (62-63). `smem_descriptor` adds the start address (bits 0-13, >> 4) on the device."""
    return np.uint64(((lbo >> 4) << 16) | ((sbo >> 4) << 32) | (SWIZZLE_MODES[width] << 62))


def descriptor_host(address: int, high_bits) -> int:
    """`smem_descriptor` on the host, as a Python int."""
    return int(high_bits) | (address >> 4)


def _decode_descriptor(desc: int) -> tuple[int, int, int, int]:
    start = (desc & 0x3FFF) << 4
    lbo = ((desc >> 16) & 0x3FFF) << 4
    sbo = ((desc >> 32) & 0x3FFF) << 4
    width = {mode: w for w, mode in SWIZZLE_MODES.items()}[(desc >> 62) & 3]
    return start, lbo, sbo, width


def k_major_offset(desc: int, row: int, k: int, element_bytes: int) -> int:
    """Byte address of element (row, k) of a K-major swizzled operand (one wgmma's K fits one block)."""
    start, _, sbo, width = _decode_descriptor(desc)
    return swizzle(start + (row // 8) * sbo + (row % 8) * width + k * element_bytes, width)


def mn_major_offset(desc: int, n: int, k: int, element_bytes: int) -> int:
    """Byte address of element (n, k) of an MN-major swizzled operand: N contiguous in W-byte
    blocks ``lbo`` bytes apart, K rows of W bytes with 8-row groups ``sbo`` apart."""
    start, lbo, sbo, width = _decode_descriptor(desc)
    per_block = width // element_bytes
    return swizzle(start + (n // per_block) * lbo + (n % per_block) * element_bytes + (k // 8) * sbo + (k % 8) * width, width)


def _half_values(bits, kind: str) -> np.ndarray:
    """float64 values of 16-bit patterns (f16 or bf16), of 8-bit e4m3 or s8 patterns, or of tf32 read from
    float32 containers."""
    bits = np.asarray(bits)
    if kind == "s8":
        return bits.astype(np.uint8).view(np.int8).astype(np.float64)
    if kind == "e4m3":
        import ml_dtypes

        return bits.astype(np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float64)
    if kind == "f16":
        return bits.astype(np.uint16).view(np.float16).astype(np.float64)
    if kind == "bf16":
        import ml_dtypes

        return bits.astype(np.uint16).view(ml_dtypes.bfloat16).astype(np.float64)
    # the tensor cores read the top 19 bits of a float32 container (tf32)
    return (np.asarray(bits, dtype=np.float32).view(np.uint32) & np.uint32(0xFFFFE000)).view(np.float32).astype(np.float64)


# ------------------------------------------------------------------------- the intrinsics

if not SIMULATOR:
    _I32, _I64, _F32 = ir.IntType(32), ir.IntType(64), ir.FloatType()

    def _call_asm(builder, asm, constraints, ret, operands):
        fnty = ir.FunctionType(ret, [op.type for op in operands])
        return builder.call(ir.InlineAsm(fnty, asm, constraints, side_effect=True), operands)

    def _element_pointer(context, builder, arrty, array, indices, index_types):
        ary = context.make_array(arrty)(context, builder, array)
        idx = [context.cast(builder, i, t, types.intp) for i, t in zip(indices, index_types)]
        return cgutils.get_item_pointer(context, builder, arrty, ary, idx, wraparound=False)

    def _accumulate(builder, asm, constraints, operands, acc_ptrs, acc_type=None):
        """Run ``asm`` with the accumulators (float32, or ``acc_type``) at ``acc_ptrs`` tied in after
        ``operands``, and store what it returns back into them."""
        out = _call_asm(builder, asm, constraints, ir.LiteralStructType([acc_type or _F32] * len(acc_ptrs)),
                        operands + [builder.load(p) for p in acc_ptrs])
        for i, p in enumerate(acc_ptrs):
            builder.store(builder.extract_value(out, i), p)

    def _shared_u32(builder, ptr):
        shared = builder.addrspacecast(ptr, ir.PointerType(ptr.type.pointee, 3))
        return builder.trunc(builder.ptrtoint(shared, _I64), _I32)

    def _statement(asm):
        """An intrinsic ``f()`` that emits one PTX statement with a memory clobber."""

        @intrinsic
        def statement(typingctx):
            def codegen(context, builder, sig, args):
                _call_asm(builder, asm, "~{memory}", ir.VoidType(), [])
                return context.get_dummy_value()

            return types.void(), codegen

        return statement

    @intrinsic
    def shared_address(typingctx, arr, idx):
        """The 32-bit shared-window address of ``arr[idx]`` (``arr`` in shared memory)."""

        def codegen(context, builder, sig, args):
            ptr = _element_pointer(context, builder, sig.args[0], args[0], [args[1]], [sig.args[1]])
            return _shared_u32(builder, ptr)

        return types.uint32(arr, idx), codegen

    @intrinsic
    def cp_async16(typingctx, smem, smem_idx, src, b, h, row, col, src_bytes):
        """Copy 16 bytes from ``src[b, h, row, col:]`` to ``smem[smem_idx:]`` asynchronously
        (``cp.async.cg``, L2 only), zero-filling from byte ``src_bytes`` on (0: all zeros, and
        nothing is read). Both addresses must be 16-byte aligned."""

        def codegen(context, builder, sig, args):
            dst = _element_pointer(context, builder, sig.args[0], args[0], [args[1]], [sig.args[1]])
            src_ptr = _element_pointer(context, builder, sig.args[2], args[2], args[3:7], sig.args[3:7])
            global_ptr = builder.addrspacecast(src_ptr, ir.PointerType(src_ptr.type.pointee, 1))
            nbytes = context.cast(builder, args[7], sig.args[7], types.int32)
            _call_asm(
                builder, "cp.async.cg.shared.global [$0], [$1], 16, $2;", "r,l,r,~{memory}", ir.VoidType(),
                [_shared_u32(builder, dst), builder.ptrtoint(global_ptr, _I64), nbytes],
            )
            return context.get_dummy_value()

        return types.void(smem, smem_idx, src, b, h, row, col, src_bytes), codegen

    cp_async_commit = _statement("cp.async.commit_group;")
    fence_proxy_async = _statement("fence.proxy.async.shared::cta;")
    wgmma_fence = _statement("wgmma.fence.sync.aligned;")
    wgmma_commit = _statement("wgmma.commit_group.sync.aligned;")

    @cache
    def cp_async_wait(pending: int):
        """Wait until at most ``pending`` of this thread's cp.async groups are in flight."""
        return _statement(f"cp.async.wait_group {pending};")

    @cache
    def wgmma_wait(pending: int):
        """Wait until at most ``pending`` of the warpgroup's wgmma groups are in flight."""
        return _statement(f"wgmma.wait_group.sync.aligned {pending};")

    @cache
    def setmaxnreg(action: str, count: int):
        """``setmaxnreg.{inc,dec}``: this warpgroup's registers a thread become ``count`` (a multiple
        of 8 in 24..256), taken from or given back to the block's pool; every warp of the
        warpgroup runs it. ptxas allocates the code it dominates within ``count``, so a producer
        warpgroup that gives registers back (``"dec"``) lets consumers take more (``"inc"``) than
        the launch's 65536 / threads."""
        _check_setmaxnreg(action, count)
        return _statement(f"setmaxnreg.{action}.sync.aligned.u32 {count};")

    def _on_mbarrier(context, builder, sig, args, asm):
        """Emit ``asm`` with $0 the shared::cta address of the mbarrier at ``args[0][args[1]]``
        and $1... the remaining arguments as 32-bit values; memory is clobbered, since the
        barrier orders the shared-memory accesses around it."""
        ptr = _element_pointer(context, builder, sig.args[0], args[0], [args[1]], [sig.args[1]])
        operands = [_shared_u32(builder, ptr)] + [context.cast(builder, v, t, types.uint32)
                                                  for v, t in zip(args[2:], sig.args[2:])]
        _call_asm(builder, asm, ",".join(["r"] * len(operands)) + ",~{memory}", ir.VoidType(), operands)
        return context.get_dummy_value()

    @intrinsic
    def mbarrier_init(typingctx, smem, idx, count):
        """Set the 8-byte mbarrier at ``smem[idx]`` to expect ``count`` arrivals per phase (one
        thread, then a ``cuda.syncthreads()`` before anyone else uses it)."""
        return types.void(smem, idx, count), lambda c, b, sig, args: _on_mbarrier(
            c, b, sig, args, "mbarrier.init.shared::cta.b64 [$0], $1;")

    @intrinsic
    def mbarrier_arrive(typingctx, smem, idx):
        """One arrival at the mbarrier (release: this thread's earlier shared-memory writes are
        seen by the threads that wait for the phase)."""
        return types.void(smem, idx), lambda c, b, sig, args: _on_mbarrier(
            c, b, sig, args, "mbarrier.arrive.shared::cta.b64 _, [$0];")

    @intrinsic
    def mbarrier_wait(typingctx, smem, idx, parity):
        """Wait until the mbarrier's phase of parity ``parity`` has completed (acquire). Phases
        alternate parity 0, 1, 0, ...: a consumer of round r waits for parity (r // slots) & 1."""
        # PTX labels are local to their { } block, so inlined copies of the loop do not collide
        return types.void(smem, idx, parity), lambda c, b, sig, args: _on_mbarrier(
            c, b, sig, args, "{\n.reg .pred P1;\nLAB_WAIT:\nmbarrier.try_wait.parity.shared::cta.b64 P1, [$0], $1;\n"
                             "@!P1 bra LAB_WAIT;\n}")

    @intrinsic
    def cp_async_mbarrier_arrive(typingctx, smem, idx):
        """One arrival at the mbarrier once every cp.async this thread issued before it has landed
        (``.noinc``: it is one of the ``count`` arrivals given to `mbarrier_init`)."""
        return types.void(smem, idx), lambda c, b, sig, args: _on_mbarrier(
            c, b, sig, args, "cp.async.mbarrier.arrive.noinc.shared::cta.b64 [$0];")

    @intrinsic
    def mbarrier_arrive_expect_tx(typingctx, smem, idx, tx_bytes):
        """One arrival at the mbarrier that also makes its current phase wait for ``tx_bytes`` more
        transaction bytes (``mbarrier.arrive.expect_tx``): the producer's arrival for the TMA copies
        it issues into a slot, ``tx_bytes`` their total (`tma.TensorMap.box_bytes` each)."""
        return types.void(smem, idx, tx_bytes), lambda c, b, sig, args: _on_mbarrier(
            c, b, sig, args, "mbarrier.arrive.expect_tx.shared::cta.b64 _, [$0], $1;")

    @intrinsic
    def mbarrier_expect_tx(typingctx, smem, idx, tx_bytes):
        """Make the mbarrier's current phase wait for ``tx_bytes`` more transaction bytes without
        arriving (``mbarrier.expect_tx``): for a thread whose one arrival of the phase comes later,
        through another instruction, after it issued the TMA copies the bytes are for."""
        return types.void(smem, idx, tx_bytes), lambda c, b, sig, args: _on_mbarrier(
            c, b, sig, args, "mbarrier.expect_tx.relaxed.cta.shared::cta.b64 [$0], $1;")

    def _map_address(context, builder, sig_arg, arg):
        """The generic address of a tensor map held in a device array (its first element)."""
        ptr = _element_pointer(context, builder, sig_arg, arg, [context.get_constant(types.intp, 0)], [types.intp])
        return builder.ptrtoint(ptr, _I64)

    @intrinsic
    def tensormap_acquire(typingctx, tmap):
        """Make the tensor map in ``tmap`` (a `tma.TensorMap.buffer`), written before the launch,
        visible to this thread's TMA copies (``fence.proxy.tensormap::generic.acquire``). System scope:
        the host wrote it (the CUDA programming guide's example for a map copied by cudaMemcpy)."""

        def codegen(context, builder, sig, args):
            address = _map_address(context, builder, sig.args[0], args[0])
            _call_asm(builder, "fence.proxy.tensormap::generic.acquire.sys [$0], 128;", "l,~{memory}", ir.VoidType(),
                      [address])
            return context.get_dummy_value()

        return types.void(tmap), codegen

    @intrinsic
    def cp_async_bulk_tensor_2d(typingctx, smem, smem_idx, tmap, col, row, bars, bar_idx):
        """Copy the box at element (``row``, ``col``) of the tensor map in ``tmap`` into shared memory
        from ``smem[smem_idx]`` on (128-byte aligned), rows of one swizzle width, 16-byte chunks
        permuted by `swizzle` of their shared-memory address; elements outside the array are zeros.
        The copy completes its bytes on the mbarrier ``bars[bar_idx]`` when it lands
        (``cp.async.bulk.tensor.2d ... .mbarrier::complete_tx::bytes``). One thread issues it."""

        def codegen(context, builder, sig, args):
            dst = _element_pointer(context, builder, sig.args[0], args[0], [args[1]], [sig.args[1]])
            bar = _element_pointer(context, builder, sig.args[5], args[5], [args[6]], [sig.args[6]])
            operands = [_shared_u32(builder, dst), _map_address(context, builder, sig.args[2], args[2]),
                        context.cast(builder, args[3], sig.args[3], types.int32),
                        context.cast(builder, args[4], sig.args[4], types.int32), _shared_u32(builder, bar)]
            # a CTA launched without a cluster is a cluster of one: its shared::cta addresses are
            # shared::cluster addresses (the form sm_90 has; .shared::cta needs PTX ISA 8.6)
            _call_asm(builder, "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes "
                      "[$0], [$1, {$2, $3}], [$4];", "r,l,r,r,r,~{memory}", ir.VoidType(), operands)
            return context.get_dummy_value()

        return types.void(smem, smem_idx, tmap, col, row, bars, bar_idx), codegen

    def _on_named_barrier(context, builder, sig, args, asm):
        """Emit ``asm`` with $0 the barrier number and $1 the thread count, as 32-bit values."""
        ops = [context.cast(builder, v, t, types.uint32) for v, t in zip(args, sig.args)]
        _call_asm(builder, asm, "r,r,~{memory}", ir.VoidType(), ops)
        return context.get_dummy_value()

    @intrinsic
    def named_barrier_sync(typingctx, barrier, count):
        """``bar.sync``: wait at hardware barrier ``barrier`` (1-15; 0 is ``cuda.syncthreads()``)
        until ``count`` threads (a multiple of 32) have arrived or synced there; orders the
        shared-memory accesses of the threads involved."""
        return types.void(barrier, count), lambda c, b, sig, args: _on_named_barrier(
            c, b, sig, args, "bar.sync $0, $1;")

    @intrinsic
    def named_barrier_arrive(typingctx, barrier, count):
        """``bar.arrive``: count this thread at ``barrier`` without waiting (the producer side of
        `named_barrier_sync`; its earlier shared-memory writes are seen by the threads that sync)."""
        return types.void(barrier, count), lambda c, b, sig, args: _on_named_barrier(
            c, b, sig, args, "bar.arrive $0, $1;")

    @intrinsic
    def pack_f16x2(typingctx, lo, hi):
        """Two float32 rounded to f16 (nearest even) in one b32, ``lo`` in the low half."""

        def codegen(context, builder, sig, args):
            return _call_asm(builder, "cvt.rn.f16x2.f32 $0, $2, $1;", "=r,f,f", _I32, list(args))

        return types.uint32(types.float32, types.float32), codegen

    @intrinsic
    def pack_bf16x2(typingctx, lo, hi):
        """Two float32 rounded to bf16 (nearest even) in one b32, ``lo`` in the low half."""

        def codegen(context, builder, sig, args):
            return _call_asm(builder, "cvt.rn.bf16x2.f32 $0, $2, $1;", "=r,f,f", _I32, list(args))

        return types.uint32(types.float32, types.float32), codegen

    @intrinsic
    def pack_e4m3x2(typingctx, lo, hi):
        """Two float32 rounded to e4m3 (nearest even, saturated to ±448: ``.satfinite``) in the low
        16 bits of a uint32, ``lo`` in the lowest byte."""

        def codegen(context, builder, sig, args):
            asm = "{\n.reg .b16 t;\ncvt.rn.satfinite.e4m3x2.f32 t, $2, $1;\ncvt.u32.u16 $0, t;\n}"
            return _call_asm(builder, asm, "=r,f,f", _I32, list(args))

        return types.uint32(types.float32, types.float32), codegen

    @intrinsic
    def pack_e4m3x4(typingctx, x0, x1, x2, x3):
        """Four float32 rounded to e4m3 as `pack_e4m3x2` in one uint32, ``x0`` in the lowest byte."""

        def codegen(context, builder, sig, args):
            asm = ("{\n.reg .b16 lo, hi;\ncvt.rn.satfinite.e4m3x2.f32 lo, $2, $1;\n"
                   "cvt.rn.satfinite.e4m3x2.f32 hi, $4, $3;\nmov.b32 $0, {lo, hi};\n}")
            return _call_asm(builder, asm, "=r,f,f,f,f", _I32, list(args))

        return types.uint32(types.float32, types.float32, types.float32, types.float32), codegen

    @intrinsic
    def bf16_value(typingctx, bits):
        """The float32 value of a bfloat16 bit pattern (its 16 bits are float32's top half: exact)."""

        def codegen(context, builder, sig, args):
            wide = builder.zext(context.cast(builder, args[0], sig.args[0], types.uint16), _I32)
            return builder.bitcast(builder.shl(wide, ir.Constant(_I32, 16)), _F32)

        return types.float32(bits), codegen

    @intrinsic
    def f16_value(typingctx, bits):
        """The float32 value of a float16 bit pattern (``cvt.f32.f16``: exact)."""

        def codegen(context, builder, sig, args):
            half = context.cast(builder, args[0], sig.args[0], types.uint16)
            return _call_asm(builder, "cvt.f32.f16 $0, $1;", "=f,h", _F32, [half])

        return types.float32(bits), codegen

    @intrinsic
    def f16_bits_f64(typingctx, x):
        """float64 rounded once to float16 (``cvt.rn.f16.f64``, nearest even), its bit pattern;
        through float32 it would round twice."""

        def codegen(context, builder, sig, args):
            wide = context.cast(builder, args[0], sig.args[0], types.float64)
            return _call_asm(builder, "cvt.rn.f16.f64 $0, $1;", "=h,d", ir.IntType(16), [wide])

        return types.uint16(x), codegen

    @intrinsic
    def round_tf32(typingctx, x):
        """float32 rounded to tf32 (10 mantissa bits, nearest, ties away), low 13 bits zero."""

        def codegen(context, builder, sig, args):
            bits = _call_asm(builder, "cvt.rna.tf32.f32 $0, $1;", "=r,f", _I32, list(args))
            return builder.bitcast(bits, _F32)

        return types.float32(types.float32), codegen

    @cuda.jit(device=True, inline="always")
    def register_f32(x):
        """A float32 read from memory, held as a register that arithmetic wrote: itself (its stand-in
        gives the simulator's form of such a register, so a state carried through memory computes on
        as the register it was)."""
        return x

    @intrinsic
    def mul_rn(typingctx, a, b):
        """a·b rounded to float32 on its own (``mul.rn.f32``): the explicit rounding mode keeps
        ptxas from fusing it into a following add, as it would fuse a plain multiply."""

        def codegen(context, builder, sig, args):
            return _call_asm(builder, "mul.rn.f32 $0, $1, $2;", "=f,f,f", _F32, list(args))

        return types.float32(types.float32, types.float32), codegen

    @intrinsic
    def ex2(typingctx, x):
        """2**x, ``ex2.approx.ftz.f32`` (2 ulp; ex2(-inf) = 0, NaN stays NaN)."""

        def codegen(context, builder, sig, args):
            return _call_asm(builder, "ex2.approx.ftz.f32 $0, $1;", "=f,f", _F32, list(args))

        return types.float32(types.float32), codegen

    @intrinsic
    def store_b32(typingctx, arr, b, h, row, col, value):
        """Store the 32-bit ``value`` at ``arr[b, h, row, col]`` (two 16-bit elements at once)."""

        def codegen(context, builder, sig, args):
            ptr = _element_pointer(context, builder, sig.args[0], args[0], args[1:5], sig.args[1:5])
            builder.store(args[5], builder.bitcast(ptr, _I32.as_pointer()), align=4)
            return context.get_dummy_value()

        return types.void(arr, b, h, row, col, types.uint32), codegen

    def _wgmma_asm(kind, n, a_operand, transpose_b, first_input):
        nacc = n // 2
        dtypes = {"f16": "f32.f16.f16", "bf16": "f32.bf16.bf16", "tf32": "f32.tf32.tf32", "e4m3": "f32.e4m3.e4m3",
                  "s8": "s32.s8.s8"}[kind]
        acc = ",".join(f"${i}" for i in range(nacc))
        scale = f"${first_input + (1 if a_operand == 'desc' else 4) + 1}"
        a = f"${first_input}" if a_operand == "desc" else "{" + ",".join(f"${first_input + r}" for r in range(4)) + "}"
        b = f"${first_input + (1 if a_operand == 'desc' else 4)}"
        if kind in INTEGER_KINDS:
            immediates = ""  # the integer form has no scale or transpose immediates
        elif kind in K_MAJOR_ONLY:
            immediates = ", 1, 1"
        elif a_operand == "desc":
            immediates = f", 1, 1, 0, {int(transpose_b)}"
        else:
            immediates = f", 1, 1, {int(transpose_b)}"
        return (
            "{\n.reg .pred p;\n"
            f"setp.ne.b32 p, {scale}, 0;\n"
            f"wgmma.mma_async.sync.aligned.m64n{n}k{K_STEP[kind]}.{dtypes} {{{acc}}}, {a}, {b}, p{immediates};\n}}"
        )

    @cache
    def wgmma(kind: str, n: int, a_operand: str, transpose_b: bool = False, acc_offset: int = 0):
        """``D (+)= A·Bᵀ`` of one warpgroup, m64 n``n`` k16 (f16/bf16), k8 (tf32) or k32 (e4m3, s8), float32 D
        (int32 for s8).

        Returns an intrinsic ``f(acc, a, desc_b, scale_d, smem)`` updating the local float32 (s8: int32)
        array ``acc[acc_offset:acc_offset + n/2]`` in place (D in the accumulator layout). ``a`` is a shared-memory
        descriptor (``a_operand="desc"``, K-major) or, with ``a_operand="regs"``, a local
        uint32 array followed by an offset: ``f(acc, a_regs, a_offset, desc_b, scale_d, smem)``
        reads ``a_regs[a_offset:a_offset + 4]`` (`a_fragment_coords`). ``smem`` is the block's dynamic shared
        array the descriptors point into (the GPU ignores it; the simulator reads it). B is K-major, or MN-major with
        ``transpose_b`` (f16/bf16 only). ``scale_d = 0`` ignores acc (D = A·Bᵀ).
        Asynchronous: fence before, commit and wait after (`wgmma_fence`, `wgmma_commit`,
        `wgmma_wait`); acc must not be touched in between.
        """
        if kind not in KINDS or n % 8 or not 8 <= n <= 256:
            raise ValueError(f"no wgmma for kind={kind!r} n={n}")
        if transpose_b and kind in K_MAJOR_ONLY:
            raise ValueError(f"{kind} wgmma reads both operands K-major (no transpose)")
        nacc = n // 2
        acc_reg, acc_type = ("=r", _I32) if kind in INTEGER_KINDS else ("=f", _F32)
        if a_operand == "desc":
            asm = _wgmma_asm(kind, n, "desc", transpose_b, nacc)
            constraints = ",".join([acc_reg] * nacc + ["l", "l", "r"] + [str(i) for i in range(nacc)])

            @intrinsic
            def mma(typingctx, acc, desc_a, desc_b, scale_d, smem):
                def codegen(context, builder, sig, args):
                    ptrs = [_element_pointer(context, builder, sig.args[0], args[0],
                                             [context.get_constant(types.intp, acc_offset + i)], [types.intp])
                            for i in range(nacc)]
                    operands = [context.cast(builder, args[1], sig.args[1], types.uint64),
                                context.cast(builder, args[2], sig.args[2], types.uint64),
                                context.cast(builder, args[3], sig.args[3], types.int32)]
                    _accumulate(builder, asm, constraints, operands, ptrs, acc_type)
                    return context.get_dummy_value()

                return types.void(acc, desc_a, desc_b, scale_d, smem), codegen

            return mma
        if a_operand != "regs":
            raise ValueError(f"a_operand must be 'desc' or 'regs', got {a_operand!r}")
        asm = _wgmma_asm(kind, n, "regs", transpose_b, nacc)
        constraints = ",".join([acc_reg] * nacc + ["r"] * 4 + ["l", "r"] + [str(i) for i in range(nacc)])

        @intrinsic
        def mma_rs(typingctx, acc, a_regs, a_offset, desc_b, scale_d, smem):
            def codegen(context, builder, sig, args):
                ptrs = [_element_pointer(context, builder, sig.args[0], args[0],
                                         [context.get_constant(types.intp, acc_offset + i)], [types.intp])
                        for i in range(nacc)]
                base = context.cast(builder, args[2], sig.args[2], types.intp)
                a_vals = []
                for r in range(4):
                    idx = builder.add(base, context.get_constant(types.intp, r))
                    word = builder.load(_element_pointer(context, builder, sig.args[1], args[1], [idx], [types.intp]))
                    # tf32 fragments may be kept as float32: the instruction takes their bits
                    a_vals.append(word if word.type == _I32 else builder.bitcast(word, _I32))
                operands = a_vals + [context.cast(builder, args[3], sig.args[3], types.uint64),
                                     context.cast(builder, args[4], sig.args[4], types.int32)]
                _accumulate(builder, asm, constraints, operands, ptrs, acc_type)
                return context.get_dummy_value()

            return types.void(acc, a_regs, a_offset, desc_b, scale_d, smem), codegen

        return mma_rs

    @cache
    def mma_sync(kind: str):
        """``D += A·Bᵀ`` of one warp, ``mma.sync.aligned.m16n8k16``, f16 or bf16 in, float32 D.

        Returns an intrinsic ``f(acc, acc_offset, a_regs, a_offset, b_regs, b_offset)``:
        ``acc[acc_offset:acc_offset + 4]`` (float32, the D layout) += A·Bᵀ with A in
        ``a_regs[a_offset:a_offset + 4]`` and B (N x K) in ``b_regs[b_offset:b_offset + 2]``
        (uint32, two halves each, low half first). Synchronous: every lane of the warp
        must call it together.
        """
        if kind not in ("f16", "bf16"):
            raise ValueError(f"no mma.sync m16n8k16 for kind={kind!r} (f16 or bf16)")
        asm = (f"mma.sync.aligned.m16n8k16.row.col.f32.{kind}.{kind}.f32 "
               "{$0,$1,$2,$3}, {$4,$5,$6,$7}, {$8,$9}, {$0,$1,$2,$3};")
        constraints = "=f,=f,=f,=f,r,r,r,r,r,r,0,1,2,3"

        @intrinsic
        def mma(typingctx, acc, acc_offset, a_regs, a_offset, b_regs, b_offset):
            def codegen(context, builder, sig, args):
                def words(arr_index, offset_index, count):
                    base = context.cast(builder, args[offset_index], sig.args[offset_index], types.intp)
                    return [_element_pointer(context, builder, sig.args[arr_index], args[arr_index],
                                             [builder.add(base, context.get_constant(types.intp, i))], [types.intp])
                            for i in range(count)]

                operands = [builder.load(p) for p in words(2, 3, 4) + words(4, 5, 2)]
                _accumulate(builder, asm, constraints, operands, words(0, 1, 4))
                return context.get_dummy_value()

            return types.void(acc, acc_offset, a_regs, a_offset, b_regs, b_offset), codegen

        return mma

    @cache
    def ldmatrix_x4(transpose: bool = False):
        """Four 8 x 8 matrices of 16-bit elements from shared memory into one warp's registers.

        Returns an intrinsic ``f(regs, offset, smem, smem_idx)``: this lane gives the address of
        ``smem[smem_idx]``, the start of one 16-byte matrix row (lanes 8j to 8j + 7: rows 0-7 of
        matrix j), and receives ``regs[offset + j]`` (uint32) as in `ldmatrix_coords`.
        """
        asm = f"ldmatrix.sync.aligned.m8n8.x4{'.trans' if transpose else ''}.shared.b16 {{$0,$1,$2,$3}}, [$4];"

        @intrinsic
        def load(typingctx, regs, offset, smem, smem_idx):
            def codegen(context, builder, sig, args):
                src = _element_pointer(context, builder, sig.args[2], args[2], [args[3]], [sig.args[3]])
                out = _call_asm(builder, asm, "=r,=r,=r,=r,r,~{memory}", ir.LiteralStructType([_I32] * 4),
                                [_shared_u32(builder, src)])
                base = context.cast(builder, args[1], sig.args[1], types.intp)
                for j in range(4):
                    idx = builder.add(base, context.get_constant(types.intp, j))
                    builder.store(builder.extract_value(out, j),
                                  _element_pointer(context, builder, sig.args[0], args[0], [idx], [types.intp]))
                return context.get_dummy_value()

            return types.void(regs, offset, smem, smem_idx), codegen

        return load

    @cuda.jit(device=True, inline="always")
    def quad_max(x, tid):
        """max over the 4 lanes of a quad (the lanes that share accumulator rows)."""
        x = max(x, cuda.shfl_xor_sync(0xFFFFFFFF, x, 1))
        return max(x, cuda.shfl_xor_sync(0xFFFFFFFF, x, 2))

    @cuda.jit(device=True, inline="always")
    def quad_sum(x, tid):
        """sum over the 4 lanes of a quad; a butterfly, so every lane holds the same bits."""
        x = x + cuda.shfl_xor_sync(0xFFFFFFFF, x, 1)
        return x + cuda.shfl_xor_sync(0xFFFFFFFF, x, 2)

else:  # ------------------------------------------------------------- simulator stand-ins
    # Cross-lane exchanges (shuffles, wgmma's register operand) go through a per-block
    # scratch dictionary: the simulator runs the threads of one block as Python threads,
    # and `_group_sync` orders the threads of one warp or warpgroup, as the hardware's
    # lockstep does, while the block's other warps run on (a warp-specialized kernel's
    # warpgroups reach their products at different times).
    _scratch: dict = {}
    _scratch_lock = threading.Lock()

    def _block_scratch(name, shape, dtype=np.float64):
        key = (tuple(cuda.blockIdx), name, shape)
        with _scratch_lock:
            if key not in _scratch:
                _scratch[key] = np.zeros(shape, dtype=dtype)
            return _scratch[key]

    # The simulator's shared "address" is the byte offset in the block's dynamic buffer plus this, so
    # that, as on a GPU, the buffer does not start on a 1024-byte boundary: a kernel that indexes a
    # tile, a TMA destination or an mbarrier from the buffer's start instead of its aligned `base`
    # lands off the swizzle atoms the stand-ins check (the stand-ins swizzle absolute addresses).
    SHARED_BASE = 528

    @cuda.jit(device=True)
    def shared_address(arr, idx):
        return int(idx) * arr.dtype.itemsize + SHARED_BASE

    # A thread's cp.async copies land when the thread waits for them, not before: at a group wait
    # (`cp_async_wait`) those of its committed groups the wait covers, at `cp_async_mbarrier_arrive`
    # all of them; a copy never committed is never covered by a group wait (on a GPU it may land in
    # time or not). Each copy keeps the buffer it writes, so one left pending by a thread that
    # ended cannot land in a later launch's.
    _copies = threading.local()

    def _thread_copies():
        if not hasattr(_copies, "groups"):
            _copies.uncommitted, _copies.groups = [], []
        return _copies

    def _land(copies):
        for raw, start, data in copies:
            raw[start : start + 16] = data

    @cuda.jit(device=True)
    def cp_async16(smem, smem_idx, src, b, h, row, col, src_bytes):
        # bytes, as the hardware copies them: the source's elements may be wider than the buffer's
        # (f16 V in the int8 kernel's byte buffer)
        chunk = np.zeros(16 // src.dtype.itemsize, dtype=src.dtype)
        for t in range(int(src_bytes) // src.dtype.itemsize):
            chunk[t] = src[b, h, row, col + t]
        _thread_copies().uncommitted.append((smem.view(np.uint8), int(smem_idx) * smem.dtype.itemsize,
                                             chunk.view(np.uint8)))

    def _no_op():
        pass

    fence_proxy_async = wgmma_fence = wgmma_commit = cuda.jit(device=True)(_no_op)

    @cuda.jit(device=True)
    def cp_async_commit():
        copies = _thread_copies()
        copies.groups.append(copies.uncommitted)
        copies.uncommitted = []

    @cache
    def cp_async_wait(pending: int):
        def wait():
            copies = _thread_copies()
            done = len(copies.groups) - pending
            if done > 0:
                for group in copies.groups[:done]:
                    _land(group)
                copies.groups = copies.groups[done:]

        return cuda.jit(device=True)(wait)

    @cache
    def wgmma_wait(pending: int):
        return cuda.jit(device=True)(_no_op)

    @cache
    def setmaxnreg(action: str, count: int):
        _check_setmaxnreg(action, count)
        return cuda.jit(device=True)(_no_op)  # registers are Python's

    class _MBarrier:
        """A phase counter: each phase completes when ``count`` arrivals have come and its transaction
        count (bytes expected less bytes completed; negative while copies outrun the expectation) is 0."""

        def __init__(self, count):
            self.cond = threading.Condition()
            self.count = self.pending = int(count)
            self.phase = 0
            self.tx = 0

        def _complete_if_done(self):
            if self.pending == 0 and self.tx == 0:
                self.phase += 1
                self.pending = self.count
                self.cond.notify_all()

        def arrive(self, expect_tx=0):
            with self.cond:
                self.tx += int(expect_tx)
                self.pending -= 1
                self._complete_if_done()

        def expect(self, nbytes):
            with self.cond:
                self.tx += int(nbytes)

        def complete_tx(self, nbytes):
            with self.cond:
                self.tx -= int(nbytes)
                self._complete_if_done()

        def wait(self, parity):
            with self.cond:
                self.cond.wait_for(lambda: (self.phase & 1) != int(parity))

    class _NamedBarrier:
        """``bar.sync`` / ``bar.arrive``: a generation completes when ``count`` threads came."""

        def __init__(self):
            self.cond = threading.Condition()
            self.arrived = 0
            self.generation = 0

        def arrive(self, count, wait):
            with self.cond:
                generation = self.generation
                self.arrived += 1
                if self.arrived == int(count):
                    self.arrived = 0
                    self.generation += 1
                    self.cond.notify_all()
                elif wait:
                    self.cond.wait_for(lambda: self.generation != generation)

    _barriers: dict = {}

    def _mbarrier_key(smem, idx):
        # by address: the simulator may hand each thread its own view of the block's shared memory
        return tuple(cuda.blockIdx), "mbarrier", smem.__array_interface__["data"][0] + int(idx) * smem.dtype.itemsize

    # an mbarrier's 8 bytes hold this from its init on: a tile copied over them shows at its next use
    _MBARRIER_STAMP = np.frombuffer(b"mbarrier", dtype=np.uint8)

    def _mbarrier_bytes(smem, idx):
        start = int(idx) * smem.dtype.itemsize
        return smem.view(np.uint8)[start : start + 8]

    def _mbarrier(smem, idx):
        if not np.array_equal(_mbarrier_bytes(smem, idx), _MBARRIER_STAMP):
            raise RuntimeError(f"the 8 bytes of the mbarrier at shared address {shared_address(smem, idx)} were "
                               "overwritten: the shared-memory layout puts it under a tile")
        with _scratch_lock:
            return _barriers[_mbarrier_key(smem, idx)]

    @cuda.jit(device=True)
    def mbarrier_init(smem, idx, count):
        if shared_address(smem, idx) % 8:
            raise ValueError(f"an mbarrier is 8-byte aligned, got shared address {shared_address(smem, idx)}")
        _mbarrier_bytes(smem, idx)[:] = _MBARRIER_STAMP
        with _scratch_lock:
            _barriers[_mbarrier_key(smem, idx)] = _MBarrier(count)

    @cuda.jit(device=True)
    def mbarrier_arrive(smem, idx):
        _mbarrier(smem, idx).arrive()

    @cuda.jit(device=True)
    def mbarrier_wait(smem, idx, parity):
        _mbarrier(smem, idx).wait(parity)

    @cuda.jit(device=True)
    def cp_async_mbarrier_arrive(smem, idx):
        copies = _thread_copies()
        for group in copies.groups:
            _land(group)
        _land(copies.uncommitted)
        copies.uncommitted, copies.groups = [], []
        _mbarrier(smem, idx).arrive()

    @cuda.jit(device=True)
    def mbarrier_arrive_expect_tx(smem, idx, tx_bytes):
        _mbarrier(smem, idx).arrive(tx_bytes)

    @cuda.jit(device=True)
    def mbarrier_expect_tx(smem, idx, tx_bytes):
        _mbarrier(smem, idx).expect(tx_bytes)

    @cuda.jit(device=True)
    def tensormap_acquire(tmap):
        pass  # the stand-in reads the array behind the map when it copies

    TMA_SMEM_ALIGN = 128  # cp.async.bulk.tensor's shared-memory destination

    @cuda.jit(device=True)
    def cp_async_bulk_tensor_2d(smem, smem_idx, tmap, col, row, bars, bar_idx):
        view, width = tmap.view, tmap.swizzle_bytes
        row, col = int(row), int(col)
        box = np.zeros((tmap.box_rows, tmap.box_cols), dtype=view.dtype)
        r0, r1 = max(row, 0), min(row + tmap.box_rows, view.shape[0])
        c0, c1 = max(col, 0), min(col + tmap.box_cols, view.shape[1])
        if r0 < r1 and c0 < c1:
            box[r0 - row : r1 - row, c0 - col : c1 - col] = view[r0:r1, c0:c1]
        start = int(smem_idx) * smem.dtype.itemsize + SHARED_BASE  # the address the hardware sees
        if start % TMA_SMEM_ALIGN:
            raise ValueError(f"a TMA destination must be {TMA_SMEM_ALIGN}-byte aligned, got address {start}")
        chunks = box.view(np.uint8).reshape(tmap.box_rows, width // 16, 16)
        raw = smem.view(np.uint8)
        for r in range(tmap.box_rows):
            for c in range(width // 16):
                at = swizzle(start + r * width + 16 * c, width) - SHARED_BASE
                raw[at : at + 16] = chunks[r, c]
        _mbarrier(bars, bar_idx).complete_tx(box.nbytes)

    def _named_barrier(barrier):
        key = (tuple(cuda.blockIdx), "named", int(barrier))
        with _scratch_lock:
            return _barriers.setdefault(key, _NamedBarrier())

    @cuda.jit(device=True)
    def named_barrier_sync(barrier, count):
        _named_barrier(barrier).arrive(count, True)

    @cuda.jit(device=True)
    def named_barrier_arrive(barrier, count):
        _named_barrier(barrier).arrive(count, False)

    def _group_sync(size):
        """Wait for the other threads of this thread's group of `size` consecutive threads."""
        tid = cuda.threadIdx.x
        group = tid // size
        members = min(size, cuda.blockDim.x - group * size)
        with _scratch_lock:
            barrier = _barriers.setdefault((tuple(cuda.blockIdx), "group", size, group), _NamedBarrier())
        barrier.arrive(members, True)

    def _f16_bits(x) -> int:
        return int(np.array(x, dtype=np.float16).view(np.uint16))

    def _bf16_bits(x) -> int:
        import ml_dtypes

        return int(np.array(x, dtype=ml_dtypes.bfloat16).view(np.uint16))

    @cuda.jit(device=True)
    def pack_f16x2(lo, hi):
        return _f16_bits(lo) | (_f16_bits(hi) << 16)

    @cuda.jit(device=True)
    def pack_bf16x2(lo, hi):
        return _bf16_bits(lo) | (_bf16_bits(hi) << 16)

    def _e4m3_bits(x) -> int:
        import ml_dtypes

        # .satfinite: beyond ±448 (inf included) saturates, NaN stays NaN
        x = np.clip(np.float32(x), -E4M3_MAX, E4M3_MAX)
        return int(np.array(x, dtype=np.float32).astype(ml_dtypes.float8_e4m3fn).view(np.uint8))

    @cuda.jit(device=True)
    def pack_e4m3x2(lo, hi):
        return _e4m3_bits(lo) | (_e4m3_bits(hi) << 8)

    @cuda.jit(device=True)
    def pack_e4m3x4(x0, x1, x2, x3):
        return _e4m3_bits(x0) | (_e4m3_bits(x1) << 8) | (_e4m3_bits(x2) << 16) | (_e4m3_bits(x3) << 24)

    @cuda.jit(device=True)
    def bf16_value(bits):
        return float(_half_values(int(bits), "bf16"))

    @cuda.jit(device=True)
    def f16_value(bits):
        return float(_half_values(int(bits), "f16"))

    @cuda.jit(device=True)
    def f16_bits_f64(x):
        # NumPy rounds float64 to float16 directly (once); beyond 65520 it gives inf, as cvt does
        with np.errstate(over="ignore"):
            return _f16_bits(np.float64(x))

    @cuda.jit(device=True)
    def round_tf32(x):
        # cvt.rna: nearest, ties away from zero, on the float32 bit pattern (NaN and inf kept)
        bits = int(np.array(x, dtype=np.float32).view(np.uint32))
        if (bits & 0x7F800000) != 0x7F800000:
            bits = (bits + 0x1000) & 0xFFFFE000
        return float(np.array(bits, dtype=np.uint32).view(np.float32))

    @cuda.jit(device=True)
    def mul_rn(a, b):
        return float(np.float32(a) * np.float32(b))

    @cuda.jit(device=True)
    def register_f32(x):
        # a NumPy float32 read from an array promotes weakly (NEP 50), so m - mu would round to
        # float32 where the same value left by arithmetic (a Python float here) does not
        return float(x)

    @cuda.jit(device=True)
    def ex2(x):
        with np.errstate(over="ignore"):
            return float(np.exp2(np.float64(x)))

    @cuda.jit(device=True)
    def store_b32(arr, b, h, row, col, value):
        arr[b, h, row, col] = value & 0xFFFF
        arr[b, h, row, col + 1] = value >> 16

    def _quad_exchange(x, tid, step, name):
        lanes = _block_scratch(name, (cuda.blockDim.x,))
        lanes[tid] = x
        _group_sync(32)
        other = lanes[tid ^ step]
        _group_sync(32)
        return other

    @cache
    def mma_sync(kind: str):
        if kind not in ("f16", "bf16"):
            raise ValueError(f"no mma.sync m16n8k16 for kind={kind!r} (f16 or bf16)")

        @cuda.jit(device=True)
        def mma(acc, acc_offset, a_regs, a_offset, b_regs, b_offset):
            tid = cuda.threadIdx.x
            lane = tid % 32
            words = _block_scratch(("mma_sync", tid // 32), (32, 6), np.uint32)
            for r in range(4):
                words[lane, r] = a_regs[a_offset + r]
            for r in range(2):
                words[lane, 4 + r] = b_regs[b_offset + r]
            _group_sync(32)  # every lane's fragments are in the scratch
            a_matrix, b_matrix = np.zeros((16, 16)), np.zeros((8, 16))
            for t in range(32):
                for r in range(4):
                    (row, k0), (_, k1) = a_fragment_coords(kind, t, r)
                    a_matrix[row, k0], a_matrix[row, k1] = _half_values([words[t, r] & 0xFFFF, words[t, r] >> 16], kind)
                for r in range(2):
                    (n, k0), (_, k1) = mma_b_coords(t, r)
                    b_matrix[n, k0], b_matrix[n, k1] = _half_values([words[t, 4 + r] & 0xFFFF, words[t, 4 + r] >> 16],
                                                                    kind)
            _group_sync(32)  # every lane has read the scratch before the next call overwrites it
            for i in range(4):
                row, col = accumulator_coords(lane, i)
                acc[acc_offset + i] = acc[acc_offset + i] + float(np.dot(a_matrix[row], b_matrix[col]))

        return mma

    @cache
    def ldmatrix_x4(transpose: bool = False):
        @cuda.jit(device=True)
        def load(regs, offset, smem, smem_idx):
            tid = cuda.threadIdx.x
            lane = tid % 32
            rows = _block_scratch(("ldmatrix", tid // 32), (32,), np.int64)
            rows[lane] = smem_idx
            _group_sync(32)  # every lane's row address is in the scratch
            for j in range(4):
                (r0, c0), (r1, c1) = ldmatrix_coords(lane, transpose)
                lo = int(smem[rows[8 * j + r0] + c0])
                hi = int(smem[rows[8 * j + r1] + c1])
                regs[offset + j] = lo | (hi << 16)
            _group_sync(32)  # every lane has read the addresses before the next call overwrites them

        return load

    @cuda.jit(device=True)
    def quad_max(x, tid):
        x = max(x, _quad_exchange(x, tid, 1, "quad"))
        return max(x, _quad_exchange(x, tid, 2, "quad"))

    @cuda.jit(device=True)
    def quad_sum(x, tid):
        x = x + _quad_exchange(x, tid, 1, "quad")
        return x + _quad_exchange(x, tid, 2, "quad")

    @cache
    def _operand_index(desc: int, element_bytes: int, itemsize: int, rows: int, k_step: int, mn_major: bool):
        # every thread of a warpgroup reads the same operand: the index arithmetic is done once
        offset = mn_major_offset if mn_major else k_major_offset
        return np.array([[offset(desc, r, k, element_bytes) // itemsize for k in range(k_step)] for r in range(rows)])

    _BITS_TYPES = {1: np.uint8, 2: np.uint16, 4: np.uint32}

    def _operand(smem, kind, desc, rows, k_step, mn_major):
        """The (rows x K) operand a descriptor points at, as float64 values: its bytes read whatever
        the buffer's element type (the int8 kernel keeps s8 and f16 operands in one byte buffer)."""
        esize = ELEMENT_BYTES[kind]
        idx = _operand_index(int(desc), esize, 1, rows, k_step, bool(mn_major)) - SHARED_BASE
        raw = smem.view(np.uint8)[idx[..., None] + np.arange(esize)]
        bits = np.ascontiguousarray(raw).view(_BITS_TYPES[esize])[..., 0]
        return _half_values(bits.view(np.float32) if kind == "tf32" else bits, kind)

    @cache
    def wgmma(kind: str, n: int, a_operand: str, transpose_b: bool = False, acc_offset: int = 0):
        if kind not in KINDS or n % 8 or not 8 <= n <= 256:
            raise ValueError(f"no wgmma for kind={kind!r} n={n}")
        if transpose_b and kind in K_MAJOR_ONLY:
            raise ValueError(f"{kind} wgmma reads both operands K-major (no transpose)")
        k_step = K_STEP[kind]
        # s8: integer sums, exact in float64 (|products| < 2^14, 32 of them) and in int32
        exact = int if kind in INTEGER_KINDS else float

        def accumulate(acc, a_matrix, b_matrix, scale_d, t):
            for i in range(n // 2):
                row, col = accumulator_coords(t, i)
                value = exact(np.dot(a_matrix[row], b_matrix[col]))
                acc[acc_offset + i] = value + (acc[acc_offset + i] if scale_d else 0)

        if a_operand == "desc":

            @cuda.jit(device=True)
            def mma(acc, desc_a, desc_b, scale_d, smem):
                a_matrix = _operand(smem, kind, desc_a, 64, k_step, False)
                b_matrix = _operand(smem, kind, desc_b, n, k_step, transpose_b)
                accumulate(acc, a_matrix, b_matrix, scale_d, cuda.threadIdx.x % WARPGROUP)

            return mma
        if a_operand != "regs":
            raise ValueError(f"a_operand must be 'desc' or 'regs', got {a_operand!r}")

        @cuda.jit(device=True)
        def mma_rs(acc, a_regs, a_offset, desc_b, scale_d, smem):
            tid = cuda.threadIdx.x
            t = tid % WARPGROUP
            a_matrix = _block_scratch(("wgmma_a", tid // WARPGROUP), (64, k_step))
            for r in range(4):
                coords = a_fragment_coords(kind, t, r)
                if kind == "tf32":
                    a_matrix[coords[0]] = _half_values(np.float32(a_regs[a_offset + r]), "tf32")
                elif kind in BYTE_KINDS:
                    word = int(a_regs[a_offset + r])
                    for e, value in enumerate(_half_values([(word >> (8 * e)) & 0xFF for e in range(4)], kind)):
                        a_matrix[coords[e]] = value
                else:
                    word = int(a_regs[a_offset + r])
                    a_matrix[coords[0]], a_matrix[coords[1]] = _half_values([word & 0xFFFF, word >> 16], kind)
            _group_sync(WARPGROUP)  # every lane's A fragment is in the scratch matrix
            b_matrix = _operand(smem, kind, desc_b, n, k_step, transpose_b)
            accumulate(acc, a_matrix, b_matrix, scale_d, t)
            _group_sync(WARPGROUP)  # every lane has read A before the next call overwrites it

        return mma_rs


@cuda.jit(device=True, inline="always")
def smem_descriptor(address, high_bits):
    """The matrix descriptor of the operand at shared ``address``: ``high_bits`` from
    `descriptor_bits` (offsets and swizzle, fixed per tile layout) plus the start address."""
    return high_bits | (uint64(address) >> uint64(4))
