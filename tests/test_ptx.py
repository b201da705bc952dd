"""Each PTX building block alone, against NumPy: on the GPU (real instructions) and in the
simulator (the stand-ins), with the same test functions.

Inputs are small multiples of 1/4, so every product and every partial sum of the
matrix tests is exact in float32: a misplaced element shows as a mismatch, not as
rounding noise.
"""

from __future__ import annotations

from functools import cache

import ml_dtypes
import numpy as np
import pytest
from numba import cuda, from_dtype, uint16, uint32

from nkattn.cuda_kernels import ptx
from nkattn.cuda_kernels.tensor_core import TILE_ALIGN, TileLayout, tile_functions
from tests.conftest import REAL_GPU

HALF_DTYPES = {"f16": np.float16, "bf16": ml_dtypes.bfloat16}


def _exact_values(rng, shape, kind):
    """Multiples of 1/4 in [-2, 2]: exact in f16, bf16, tf32 and e4m3, and their products and sums in float32;
    for s8 every int8 (-128 to 127), whose sums int32 holds exactly."""
    if kind == "s8":
        x = rng.integers(-128, 128, size=shape)
        return x.astype(np.int8).view(np.uint8), x.astype(np.float64)
    x = rng.integers(-8, 9, size=shape) / 4.0
    if kind == "tf32":
        return x.astype(np.float32), x
    if kind == "e4m3":
        return x.astype(ml_dtypes.float8_e4m3fn).view(np.uint8), x
    return x.astype(HALF_DTYPES[kind]).view(np.uint16), x


SMEM_TYPES = {"tf32": np.float32, "e4m3": np.uint8, "s8": np.uint8}  # the others: uint16
ACC_TYPES = {"s8": np.int32}  # the others: float32


@cache
def mma_kernel(kind: str, n: int, k_total: int, a_operand: str, transpose_b: bool):
    """One warpgroup: A (64 x K) and B (N x K, or K x N when transposed) staged by cp.async into
    swizzled tiles, D = A·Bᵀ by K/k wgmma steps, each thread's accumulators written out raw."""
    esize = ptx.ELEMENT_BYTES[kind]
    smem_dtype = np.dtype(SMEM_TYPES.get(kind, np.uint16))
    smem_type = from_dtype(smem_dtype)
    itemsize = smem_dtype.itemsize
    k_step = ptx.K_STEP[kind]
    a_tile = TileLayout(64, k_total, esize, 0)
    # an MN-major tile's rows are padded to whole 32-byte swizzle rows (zero-filled, never multiplied)
    b_tile = (TileLayout(k_total, -(-n // 16) * 16, esize, a_tile.end) if transpose_b
              else TileLayout(n, k_total, esize, a_tile.end))
    _, load_a = tile_functions(a_tile, itemsize, 128)
    _, load_b = tile_functions(b_tile, itemsize, 128)
    mma = ptx.wgmma(kind, n, a_operand, transpose_b)
    wait_copies, wait_mma = ptx.cp_async_wait(0), ptx.wgmma_wait(0)
    a_bits, b_bits = a_tile.k_major_bits(), b_tile.mn_major_bits() if transpose_b else b_tile.k_major_bits()
    nacc, steps = n // 2, k_total // k_step
    a_starts = tuple(a_tile.k_major_start(0, s * k_step) for s in range(steps))
    b_starts = tuple(b_tile.mn_major_start(s * k_step) if transpose_b else b_tile.k_major_start(0, s * k_step)
                     for s in range(steps))
    a_in_regs, is_tf32, is_byte = a_operand == "regs", kind == "tf32", kind in ptx.BYTE_KINDS
    acc_type = ACC_TYPES.get(kind, np.float32)
    reg_type = np.float32 if is_tf32 else np.uint32
    n_regs = 4 * steps
    shared_bytes = b_tile.end + TILE_ALIGN

    @cuda.jit
    def kernel(a, b, out):
        tid = cuda.threadIdx.x
        smem = cuda.shared.array(0, smem_type)
        addr0 = ptx.shared_address(smem, 0)
        base = uint32(((TILE_ALIGN - addr0 % TILE_ALIGN) % TILE_ALIGN) // itemsize)
        aligned = addr0 + base * itemsize
        load_a(smem, base, a, 0, 0, 0, a.shape[2], a.shape[3], tid)
        load_b(smem, base, b, 0, 0, 0, b.shape[2], b.shape[3], tid)
        ptx.cp_async_commit()
        wait_copies()
        ptx.fence_proxy_async()
        cuda.syncthreads()  # every thread's copies are in shared memory, visible to the tensor cores

        acc = cuda.local.array(nacc, acc_type)
        a_regs = cuda.local.array(n_regs, reg_type)
        if a_in_regs:
            w = tid // 32
            g = (tid % 32) // 4
            tq = tid % 4
            for s in range(steps):
                for r in range(4):
                    row = 16 * w + g + 8 * (r & 1)
                    if is_tf32:
                        a_regs[s * 4 + r] = a[0, 0, row, s * k_step + tq + 4 * (r >> 1)]
                    elif is_byte:
                        k0 = s * k_step + 4 * tq + 16 * (r >> 1)
                        a_regs[s * 4 + r] = (uint32(a[0, 0, row, k0]) | (uint32(a[0, 0, row, k0 + 1]) << 8)
                                             | (uint32(a[0, 0, row, k0 + 2]) << 16)
                                             | (uint32(a[0, 0, row, k0 + 3]) << 24))
                    else:
                        k0 = s * k_step + 2 * tq + 8 * (r >> 1)
                        a_regs[s * 4 + r] = uint32(a[0, 0, row, k0]) | (uint32(a[0, 0, row, k0 + 1]) << 16)
        for s in range(steps):
            desc_b = ptx.smem_descriptor(aligned + b_starts[s], b_bits)
            ptx.wgmma_fence()
            if a_in_regs:
                mma(acc, a_regs, s * 4, desc_b, s, smem)
            else:
                mma(acc, ptx.smem_descriptor(aligned + a_starts[s], a_bits), desc_b, s, smem)
            ptx.wgmma_commit()
            wait_mma()
        for i in range(nacc):
            out[tid, i] = acc[i]

    return kernel, shared_bytes


def _expected_fragments(d):
    """D laid out as the accumulator registers: out[t, i] = D[accumulator_coords(t, i)]."""
    n = d.shape[1]
    out = np.empty((128, n // 2))
    for t in range(128):
        for i in range(n // 2):
            out[t, i] = d[ptx.accumulator_coords(t, i)]
    return out


def _mma_case(kind, n, k, a_operand, transpose_b, gpu=True):
    ident = f"{kind}-n{n}-k{k}-{'ss' if a_operand == 'desc' else 'rs'}{'-trans' if transpose_b else ''}"
    return pytest.param(kind, n, k, a_operand, transpose_b, id=ident, marks=[pytest.mark.gpu] if gpu else [])


MMA_CASES = [
    # (kind, N, K, A operand, B transposed): each swizzle width (128/64/32 B rows), one and several
    # column blocks along K (A, B) and along N (transposed B), N not a multiple of 16
    _mma_case("f16", 16, 32, "desc", False, gpu=False),
    _mma_case("bf16", 16, 32, "regs", True, gpu=False),
    _mma_case("tf32", 16, 16, "regs", False, gpu=False),
    _mma_case("e4m3", 16, 64, "desc", False, gpu=False),
    _mma_case("e4m3", 16, 64, "regs", False, gpu=False),
    _mma_case("s8", 16, 64, "desc", False, gpu=False),
    _mma_case("s8", 24, 32, "regs", False, gpu=False),
    *(_mma_case("f16", n, k, op, tb) for n, k in ((64, 64), (128, 128), (80, 96)) for op in ("desc", "regs") for tb in (False, True)),
    _mma_case("f16", 24, 16, "desc", True),
    _mma_case("f16", 256, 64, "desc", False),
    *(_mma_case("bf16", n, k, "regs", True) for n, k in ((64, 64), (112, 112), (256, 32))),
    _mma_case("bf16", 96, 32, "desc", False),
    *(_mma_case("tf32", n, k, op, False) for n, k in ((64, 32), (128, 64), (96, 24)) for op in ("desc", "regs")),
    *(_mma_case("e4m3", n, k, "desc", False) for n, k in ((64, 64), (128, 128), (80, 32), (256, 256))),
    *(_mma_case("e4m3", n, k, "regs", False) for n, k in ((64, 64), (128, 128), (80, 32), (256, 96))),
    *(_mma_case("s8", n, k, "desc", False) for n, k in ((64, 64), (128, 128), (80, 32), (256, 256))),
    _mma_case("s8", 128, 96, "regs", False),
]


@pytest.mark.parametrize("kind, n, k_total, a_operand, transpose_b", MMA_CASES)
def test_wgmma_matches_numpy(kind, n, k_total, a_operand, transpose_b):
    rng = np.random.default_rng(n * 1000 + k_total)
    a_dev, a = _exact_values(rng, (1, 1, 64, k_total), kind)
    b_dev, b = _exact_values(rng, (1, 1, n, k_total), kind)
    if transpose_b:
        b_dev = np.ascontiguousarray(np.swapaxes(b_dev, 2, 3))  # K x N in memory, N contiguous
    kernel, shared_bytes = mma_kernel(kind, n, k_total, a_operand, transpose_b)
    acc_type = ACC_TYPES.get(kind, np.float32)
    out = cuda.device_array((128, n // 2), dtype=acc_type)
    from nkattn.cuda_kernels.online_softmax import launch_with_shared_memory

    launch_with_shared_memory(kernel, 1, 128, shared_bytes, 0, cuda.to_device(a_dev), cuda.to_device(b_dev), out)
    expected = _expected_fragments(a[0, 0] @ b[0, 0].T)
    np.testing.assert_array_equal(out.copy_to_host(), expected.astype(acc_type))


@cache
def mma_sync_kernel(kind: str, transpose_b: bool):
    """Two warps, each with its own A (16 x 16) and B (16 x 16: N x K, or K x N when transposed)
    loaded by ldmatrix.x4 from shared memory; D = A·Bᵀ by two m16n8k16 steps (one per n8 half).
    Writes each lane's accumulators and its raw A and B fragments."""
    mma = ptx.mma_sync(kind)
    load_a, load_b = ptx.ldmatrix_x4(False), ptx.ldmatrix_x4(transpose_b)
    row_align = None if ptx.SIMULATOR else 16  # ldmatrix rows are 16-byte aligned; the simulator refuses the option

    @cuda.jit
    def kernel(a, b, out, fragments):
        tid = cuda.threadIdx.x
        w = tid // 32
        lane = tid % 32
        sa = cuda.shared.array(512, uint16, alignment=row_align)
        sb = cuda.shared.array(512, uint16, alignment=row_align)
        for i in range(lane, 256, 32):
            sa[256 * w + i] = a[w, i // 16, i % 16]
            sb[256 * w + i] = b[w, i // 16, i % 16]
        cuda.syncthreads()  # both tiles are in shared memory
        j = lane // 8
        r = lane % 8
        a_regs = cuda.local.array(4, uint32)
        b_regs = cuda.local.array(4, uint32)
        # matrix j of A: rows 8(j & 1) + r, columns 8(j >> 1), as registers a0-a3 want them
        load_a(a_regs, 0, sa, 256 * w + (r + 8 * (j & 1)) * 16 + 8 * (j >> 1))
        if transpose_b:  # stored K x N: matrix j is keys 8(j & 1) + r of columns 8(j >> 1)
            load_b(b_regs, 0, sb, 256 * w + (r + 8 * (j & 1)) * 16 + 8 * (j >> 1))
        else:  # stored N x K: matrix j is row 8(j >> 1) + r, keys 8(j & 1)
            load_b(b_regs, 0, sb, 256 * w + (r + 8 * (j >> 1)) * 16 + 8 * (j & 1))
        acc = cuda.local.array(8, np.float32)
        for i in range(8):
            acc[i] = 0.0
        mma(acc, 0, a_regs, 0, b_regs, 0)
        mma(acc, 4, a_regs, 0, b_regs, 2)
        for i in range(8):
            out[tid, i] = acc[i]
        for i in range(4):
            fragments[tid, i] = a_regs[i]
            fragments[tid, 4 + i] = b_regs[i]

    return kernel


def _pack(bits, pairs):
    return np.array([int(bits[p0]) | (int(bits[p1]) << 16) for p0, p1 in pairs], dtype=np.uint32)


@pytest.mark.parametrize("kind, transpose_b", [
    pytest.param("f16", False, id="f16"),
    pytest.param("bf16", True, id="bf16-trans"),
    pytest.param("f16", True, id="f16-trans", marks=pytest.mark.gpu),
    pytest.param("bf16", False, id="bf16", marks=pytest.mark.gpu),
])
def test_ldmatrix_and_mma_sync_match_numpy(kind, transpose_b):
    rng = np.random.default_rng(7)
    a_bits, a = _exact_values(rng, (2, 16, 16), kind)
    b_bits, b = _exact_values(rng, (2, 16, 16), kind)  # N x K
    stored_b = np.ascontiguousarray(np.swapaxes(b_bits, 1, 2)) if transpose_b else b_bits
    out = cuda.device_array((64, 8), dtype=np.float32)
    fragments = cuda.device_array((64, 8), dtype=np.uint32)
    mma_sync_kernel(kind, transpose_b)[1, 64](cuda.to_device(a_bits), cuda.to_device(stored_b), out, fragments)
    got, got_fragments = out.copy_to_host(), fragments.copy_to_host()
    for w in range(2):
        d = a[w] @ b[w].T
        for lane in range(32):
            t = 32 * w + lane
            np.testing.assert_array_equal(got[t], [d[ptx.accumulator_coords(lane, i)] for i in range(8)])
            a_words = _pack(a_bits[w], [ptx.a_fragment_coords(kind, lane, r) for r in range(4)])
            b_words = _pack(b_bits[w], [[(n + 8 * half, k) for n, k in ptx.mma_b_coords(lane, r)]
                                        for half in range(2) for r in range(2)])
            np.testing.assert_array_equal(got_fragments[t], np.concatenate([a_words, b_words]))


def test_ldmatrix_coords_transpose_each_other():
    for lane in range(32):
        plain, trans = ptx.ldmatrix_coords(lane, False), ptx.ldmatrix_coords(lane, True)
        assert [(c, r) for r, c in plain] == trans
    with pytest.raises(ValueError, match="mma.sync"):
        ptx.mma_sync("tf32")


@cuda.jit
def _convert_kernel(x, f16, bf16, tf32, two_pow):
    i = cuda.grid(1)
    if 2 * i + 1 < x.size:
        f16[i] = ptx.pack_f16x2(x[2 * i], x[2 * i + 1])
        bf16[i] = ptx.pack_bf16x2(x[2 * i], x[2 * i + 1])
    if i < x.size:
        tf32[i] = ptx.round_tf32(x[i])
        two_pow[i] = ptx.ex2(x[i])


def test_conversions_match_numpy():
    rng = np.random.default_rng(1)
    x = np.concatenate([rng.normal(size=250) * 10.0 ** rng.integers(-3, 4, size=250),
                        [0.0, -0.0, np.inf, -np.inf, np.nan, 65504.0, 70000.0, 1e-8, -126.0, -150.0]]).astype(np.float32)
    n = x.size
    f16, bf16 = (cuda.device_array(n // 2, dtype=np.uint32) for _ in range(2))
    tf32, two_pow = (cuda.device_array(n, dtype=np.float32) for _ in range(2))
    _convert_kernel[(n + 63) // 64, 64](cuda.to_device(x), f16, bf16, tf32, two_pow)

    halves = np.stack([x[0::2], x[1::2]], axis=1)  # low half first
    with np.errstate(over="ignore"):
        # values compared, not bits: NaN patterns differ (the GPU's is 0x7FFF, NumPy's 0x7E00)
        np.testing.assert_array_equal(f16.copy_to_host().view(np.float16).reshape(-1, 2), halves.astype(np.float16))
        np.testing.assert_array_equal(bf16.copy_to_host().view(ml_dtypes.bfloat16).reshape(-1, 2).astype(np.float32),
                                      halves.astype(ml_dtypes.bfloat16).astype(np.float32))
    got_tf32 = tf32.copy_to_host()
    finite = np.isfinite(x)
    # tf32 keeps 10 mantissa bits: the rounding error is at most half a tf32 ulp (2^-11 relative)
    assert np.all(got_tf32.view(np.uint32)[finite] & 0x1FFF == 0)
    assert np.all(np.abs(got_tf32[finite] - x[finite]) <= np.abs(x[finite]) * 2.0**-11)
    np.testing.assert_array_equal(got_tf32[~finite], x[~finite])
    expected = np.exp2(x.astype(np.float64))
    got = two_pow.copy_to_host()
    normal = np.isfinite(expected) & (expected > 2.0**-126) & (expected < 2.0**127)
    if REAL_GPU:  # ex2.approx: 2 ulp in float32 (PTX ISA); the simulator computes in float64
        assert np.all(np.abs(got[normal] - expected[normal]) <= 2 * np.spacing(np.float32(expected[normal])))
    else:
        np.testing.assert_allclose(got[normal], expected[normal], rtol=1e-6)
    assert got[x == -np.inf][0] == 0.0 and np.isnan(got[np.isnan(x)][0])


@cuda.jit
def _e4m3_kernel(x, pairs, quads, bits, values):
    i = cuda.grid(1)
    if 2 * i + 1 < x.size:
        pairs[i] = ptx.pack_e4m3x2(x[2 * i], x[2 * i + 1])
    if 4 * i + 3 < x.size:
        quads[i] = ptx.pack_e4m3x4(x[4 * i], x[4 * i + 1], x[4 * i + 2], x[4 * i + 3])
    if i < bits.size:
        values[i] = ptx.bf16_value(bits[i])


def test_e4m3_packing_is_ml_dtypes_saturated_and_bf16_values_are_exact():
    """cvt.rn.satfinite.e4m3x2.f32 rounds as ml_dtypes' cast from float32 (nearest even) where that is
    finite, and saturates to ±448 beyond it (inf included); bytes in argument order, lowest first.
    A bf16 pattern's value is its float32 with the low half zero."""
    rng = np.random.default_rng(3)
    x = np.concatenate([rng.normal(size=240) * 10.0 ** rng.integers(-4, 3, size=240),
                        [0.0, -0.0, 448.0, 464.0, 470.0, -1e6, np.inf, -np.inf, 2.0**-10, 3 * 2.0**-10, 2.0**-9 * 1.5,
                         1 + 2.0**-4, 1 + 3 * 2.0**-4, 2.0**-6, -(2.0**-7)]]).astype(np.float32)
    x = x[: x.size // 4 * 4]
    pairs = cuda.device_array(x.size // 2, dtype=np.uint32)
    quads = cuda.device_array(x.size // 4, dtype=np.uint32)
    bits = (rng.normal(size=64) * 10.0 ** rng.integers(-30, 30, size=64)).astype(ml_dtypes.bfloat16).view(np.uint16)
    values = cuda.device_array(bits.size, dtype=np.float32)
    _e4m3_kernel[(x.size + 63) // 64, 64](cuda.to_device(x), pairs, quads, cuda.to_device(bits), values)
    expected = np.clip(x, -448.0, 448.0).astype(ml_dtypes.float8_e4m3fn).view(np.uint8).astype(np.uint32)
    got_pairs = pairs.copy_to_host()
    np.testing.assert_array_equal(got_pairs & 0xFF, expected[0::2])
    np.testing.assert_array_equal(got_pairs >> 8, expected[1::2])
    got_quads = quads.copy_to_host()
    for e in range(4):
        np.testing.assert_array_equal((got_quads >> (8 * e)) & 0xFF, expected[e::4])
    np.testing.assert_array_equal(values.copy_to_host(), bits.view(ml_dtypes.bfloat16).astype(np.float32))


@cuda.jit
def _f16_kernel(x64, bits, rounded, values):
    i = cuda.grid(1)
    if i < x64.size:
        rounded[i] = ptx.f16_bits_f64(x64[i])
    if i < bits.size:
        values[i] = ptx.f16_value(bits[i])


def test_f16_from_float64_rounds_once_and_f16_values_are_exact():
    """cvt.rn.f16.f64 is NumPy's float64 -> float16 (one rounding, nearest even, overflow to inf):
    1 + 2^-11 + 2^-40 goes up to 1 + 2^-10, where float32 first would land on the tie and then on 1.
    A float16 pattern's value is its float32, exactly."""
    rng = np.random.default_rng(4)
    x64 = np.concatenate([rng.normal(size=120) * 10.0 ** rng.integers(-8, 5, size=120),
                          [1 + 2.0**-11 + 2.0**-40, -(1 + 2.0**-11 + 2.0**-40), 65504.0, 65520.0, 2.0**-25,
                           2.0**-25 * 1.5, 0.0, -0.0]])
    bits = rng.integers(0, 2**16, size=64).astype(np.uint16)
    bits = bits[np.isfinite(bits.view(np.float16))]
    rounded = cuda.device_array(x64.size, dtype=np.uint16)
    values = cuda.device_array(bits.size, dtype=np.float32)
    _f16_kernel[(x64.size + 63) // 64, 64](cuda.to_device(x64), cuda.to_device(bits), rounded, values)
    with np.errstate(over="ignore"):
        np.testing.assert_array_equal(rounded.copy_to_host(), x64.astype(np.float16).view(np.uint16))
    assert rounded.copy_to_host()[120] == np.float16(1 + 2.0**-10).view(np.uint16)
    np.testing.assert_array_equal(values.copy_to_host(), bits.view(np.float16).astype(np.float32))


@cuda.jit
def _mul_rn_kernel(a, b, product, residual):
    i = cuda.grid(1)
    if i < a.size:
        p = ptx.mul_rn(a[i], b[i])
        product[i] = p
        residual[i] = ptx.mul_rn(a[i], b[i]) - p


def test_mul_rn_rounds_the_product_on_its_own():
    """mul_rn(a, b) is float32's rounded product, and mul_rn(a, b) - p is exactly 0 where
    p = mul_rn(a, b): a multiply fused into the subtraction would give the product's rounding
    error instead (up to 2^11 for products ~5e10, the case `exact_tc.FUSED_EXPONENT_LIMIT` is for)."""
    rng = np.random.default_rng(2)
    a = (rng.normal(size=300) * 10.0 ** rng.integers(-3, 6, size=300)).astype(np.float32)
    b = (rng.normal(size=300) * 10.0 ** rng.integers(-3, 6, size=300)).astype(np.float32)
    a[:3], b[:3] = [65504.0 * 64, 3.0e5, 1.0 + 2.0**-23], [12345.67, 1.1e5, 1.0 - 2.0**-23]
    product, residual = (cuda.device_array(a.size, dtype=np.float32) for _ in range(2))
    _mul_rn_kernel[(a.size + 63) // 64, 64](cuda.to_device(a), cuda.to_device(b), product, residual)
    np.testing.assert_array_equal(product.copy_to_host(), a * b)  # NumPy rounds each float32 product once
    np.testing.assert_array_equal(residual.copy_to_host(), np.zeros_like(a))
    exact = a.astype(np.float64) * b.astype(np.float64)
    assert np.abs(exact - (a * b))[:2].min() > 1.0  # the fused form would have been off by more than 1 there


PIPELINE_ROUNDS = 5  # odd: each slot's barriers complete phases of both parities, and waits span them


@cuda.jit
def _mbarrier_pipeline_kernel(src, out):
    t = cuda.threadIdx.x
    data = cuda.shared.array(64, np.float32)  # two slots of 32
    bars = cuda.shared.array(4, np.uint64)  # full[0], full[1], empty[0], empty[1]
    if t == 0:
        for slot in range(2):
            ptx.mbarrier_init(bars, slot, 32)
            ptx.mbarrier_init(bars, 2 + slot, 96)
    cuda.syncthreads()  # the barriers are set before anyone arrives or waits
    lane = t % 32
    for r in range(PIPELINE_ROUNDS):
        slot = r % 2
        if t < 32:
            if r >= 2:
                ptx.mbarrier_wait(bars, 2 + slot, (r // 2 - 1) & 1)  # the consumers are done with round r - 2
            data[32 * slot + lane] = src[r, lane]
            ptx.mbarrier_arrive(bars, slot)
        else:
            ptx.mbarrier_wait(bars, slot, (r // 2) & 1)
            out[r, t - 32] = data[32 * slot + lane]
            ptx.mbarrier_arrive(bars, 2 + slot)


def test_mbarriers_hand_slots_from_a_producer_warp_to_consumer_warps():
    """Warp 0 writes PIPELINE_ROUNDS rows through two shared slots, warps 1-3 read them: the full and
    empty barriers of each slot, waited on by phase parity, keep every read after its write and
    every overwrite after the reads (a missed wait shows as a row of the wrong round)."""
    src = np.arange(PIPELINE_ROUNDS * 32, dtype=np.float32).reshape(PIPELINE_ROUNDS, 32)
    out = cuda.device_array((PIPELINE_ROUNDS, 96), dtype=np.float32)
    _mbarrier_pipeline_kernel[1, 128](cuda.to_device(src), out)
    np.testing.assert_array_equal(out.copy_to_host(), np.tile(src, (1, 3)))


@cuda.jit
def _cp_async_mbarrier_kernel(src, out):
    t = cuda.threadIdx.x
    data = cuda.shared.array(260, np.float32)  # 256 and room to align to 16 bytes (cp.async)
    bars = cuda.shared.array(1, np.uint64)
    base = ((16 - ptx.shared_address(data, 0) % 16) % 16) // 4
    if t == 0:
        ptx.mbarrier_init(bars, 0, 64)
    cuda.syncthreads()  # the barrier is set before anyone arrives
    ptx.cp_async16(data, base + 4 * t, src, 0, 0, t // 8, 4 * (t % 8), 16)
    ptx.cp_async_commit()
    ptx.cp_async_mbarrier_arrive(bars, 0)
    ptx.mbarrier_wait(bars, 0, 0)
    for e in range(4):
        out[4 * t + e] = data[base + (4 * t + e + 128) % 256]


def test_cp_async_arrives_at_an_mbarrier_when_its_copies_land():
    """64 threads each copy 16 bytes by cp.async and arrive (.noinc) when they land; after the
    phase every thread reads another thread's bytes, half the buffer away."""
    src = np.arange(256, dtype=np.float32).reshape(1, 1, 8, 32)
    out = cuda.device_array(256, dtype=np.float32)
    _cp_async_mbarrier_kernel[1, 64](cuda.to_device(src), out)
    np.testing.assert_array_equal(out.copy_to_host(), np.roll(src.ravel(), -128))


_wait_all_groups = ptx.cp_async_wait(0)


@cuda.jit
def _cp_async_groups_kernel(src, out):
    data = cuda.shared.array(12, np.float32)  # 8 and room to align to 16 bytes (cp.async)
    base = ((16 - ptx.shared_address(data, 0) % 16) % 16) // 4
    for e in range(8):
        data[base + e] = -1.0
    ptx.cp_async16(data, base, src, 0, 0, 0, 0, 16)
    ptx.cp_async_commit()
    ptx.cp_async16(data, base + 4, src, 0, 0, 0, 4, 16)
    _wait_all_groups()  # the first group's; the second copy was never committed
    for e in range(8):
        out[0, e] = data[base + e]
    ptx.cp_async_commit()
    _wait_all_groups()
    for e in range(8):
        out[1, e] = data[base + e]


@pytest.mark.skipif(REAL_GPU, reason="on a GPU an uncommitted copy may land before the read or not")
def test_simulator_copies_land_at_the_wait_that_covers_them():
    """The stand-in's cp.async lands when its thread waits for it: a group wait covers committed
    groups only, so a kernel that reads a copy it never committed fails in the simulator (the GPU
    would give wrong bits only now and then)."""
    src = np.arange(8, dtype=np.float32).reshape(1, 1, 1, 8)
    out = cuda.device_array((2, 8), dtype=np.float32)
    _cp_async_groups_kernel[1, 1](cuda.to_device(src), out)
    np.testing.assert_array_equal(out.copy_to_host(), [[0, 1, 2, 3, -1, -1, -1, -1], np.arange(8)])


def test_setmaxnreg_takes_a_multiple_of_8_from_24_to_256():
    for action, count in (("inc", 240), ("dec", 24)):
        ptx.setmaxnreg(action, count)
    for action, count in (("inc", 20), ("dec", 244), ("add", 64), ("inc", 264)):
        with pytest.raises(ValueError, match="setmaxnreg"):
            ptx.setmaxnreg(action, count)


PINGPONG_ROUNDS = 4
PINGPONG_LOG = 2 * PINGPONG_ROUNDS + 1  # a constant: numba sizes shared arrays from literals only


@cuda.jit
def _named_barrier_pingpong_kernel(log):
    t = cuda.threadIdx.x
    wg = t // 128
    shared_log = cuda.shared.array(PINGPONG_LOG, np.int32)  # [0] is the length
    if t == 0:
        shared_log[0] = 0
    cuda.syncthreads()  # the log is empty before either warpgroup's turn
    if wg == 1:
        ptx.named_barrier_arrive(1, 256)  # warpgroup 0 takes the first turn
    for r in range(PINGPONG_ROUNDS):
        ptx.named_barrier_sync(1 + wg, 256)  # this warpgroup's turn
        if t % 128 == 0:
            n = shared_log[0]
            shared_log[1 + n] = wg
            shared_log[0] = n + 1
        if wg == 0 or r + 1 < PINGPONG_ROUNDS:  # every arrival is matched by a sync
            ptx.named_barrier_arrive(2 - wg, 256)  # the other warpgroup's turn
    cuda.syncthreads()  # both warpgroups' last turns are logged
    if t < PINGPONG_LOG:
        log[t] = shared_log[t]


def test_named_barriers_make_two_warpgroups_take_turns():
    """FlashAttention-3's ping-pong: each warpgroup syncs on its own barrier and arrives on the
    other's, so their turns alternate whatever the warps' speed; each turn appends to a shared
    log, which must read 0, 1, 0, 1, ..."""
    log = cuda.device_array(PINGPONG_LOG, dtype=np.int32)
    _named_barrier_pingpong_kernel[1, 256](log)
    np.testing.assert_array_equal(log.copy_to_host(), [2 * PINGPONG_ROUNDS] + [0, 1] * PINGPONG_ROUNDS)


@cuda.jit
def _quad_kernel(x, mx, sm, packed):
    t = cuda.threadIdx.x
    mx[t] = ptx.quad_max(x[t], t)
    sm[t] = ptx.quad_sum(x[t], t)
    if t < packed.shape[3] // 2:
        ptx.store_b32(packed, 0, 0, 0, 2 * t, uint32(t) | (uint32(t + 1000) << 16))


def test_quad_reductions_and_b32_store():
    x = np.random.default_rng(2).normal(size=128).astype(np.float32)
    mx, sm = (cuda.device_array(128, dtype=np.float32) for _ in range(2))
    packed = cuda.to_device(np.zeros((1, 1, 1, 16), dtype=np.uint16))
    _quad_kernel[1, 128](cuda.to_device(x), mx, sm, packed)
    quads = x.reshape(32, 4)
    np.testing.assert_array_equal(mx.copy_to_host(), np.repeat(quads.max(axis=1), 4))
    # butterfly order: (x0 + x1) + (x2 + x3) on every lane
    pairs = (quads[:, [0, 1, 2, 3]] + quads[:, [1, 0, 3, 2]]).astype(np.float32)
    butterfly = (pairs + pairs[:, [2, 3, 0, 1]]).astype(np.float32)
    got = sm.copy_to_host().reshape(32, 4)
    if REAL_GPU:
        np.testing.assert_array_equal(got, butterfly)
    else:
        np.testing.assert_allclose(got, butterfly, rtol=1e-6)
    assert np.all(got == got[:, :1])
    expected = np.zeros(16, dtype=np.uint16)
    expected[0::2], expected[1::2] = np.arange(8), np.arange(8) + 1000
    np.testing.assert_array_equal(packed.copy_to_host()[0, 0, 0], expected)


@pytest.mark.parametrize("cols, element_bytes", [(64, 2), (128, 2), (96, 2), (80, 2), (32, 4), (24, 4), (16, 2)])
def test_tile_layout_is_a_bijection_and_matches_the_descriptor_decoders(cols, element_bytes):
    """Host layout, device chunk index (its pure-Python form) and the descriptor decoders agree."""
    layout = TileLayout(64, cols, element_bytes, TILE_ALIGN)
    addresses = {layout.byte(r, c) for r in range(64) for c in range(cols)}
    assert len(addresses) == 64 * cols
    assert min(addresses) == TILE_ALIGN and max(addresses) < TILE_ALIGN + layout.nbytes
    k_step = 16 if element_bytes == 2 else 8
    kind = "f16" if element_bytes == 2 else "tf32"
    for k0 in range(0, cols - k_step + 1, k_step):
        if (k0 * element_bytes) % layout.width + k_step * element_bytes > layout.width:
            continue
        desc = ptx.descriptor_host(layout.k_major_start(8, k0), layout.k_major_bits())
        for r in (0, 5, 13, 55):
            for k in range(k_step):
                assert ptx.k_major_offset(desc, r, k, element_bytes) == layout.byte(8 + r, k0 + k)
    if kind == "f16":
        desc = ptx.descriptor_host(layout.mn_major_start(16), layout.mn_major_bits())
        for n in range(cols):
            for k in (0, 7, 8, 15):
                assert ptx.mn_major_offset(desc, n, k, element_bytes) == layout.byte(16 + k, n)


def test_descriptor_fields():
    bits = ptx.descriptor_bits(lbo=4096, sbo=1024, width=128)
    desc = ptx.descriptor_host(0x12340, bits)
    assert desc & 0x3FFF == 0x1234 and (desc >> 16) & 0x3FFF == 256 and (desc >> 32) & 0x3FFF == 64
    assert desc >> 62 == 1
    with pytest.raises(ValueError, match="32 bytes"):
        ptx.swizzle_width(48)
    with pytest.raises(ValueError, match="no wgmma"):
        ptx.wgmma("f16", 12, "desc")
    with pytest.raises(ValueError, match="transpose"):
        ptx.wgmma("tf32", 16, "desc", transpose_b=True)
    with pytest.raises(ValueError, match="transpose"):
        ptx.wgmma("e4m3", 16, "desc", transpose_b=True)
    with pytest.raises(ValueError, match="transpose"):
        ptx.wgmma("s8", 16, "desc", transpose_b=True)
