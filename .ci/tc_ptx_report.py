"""What the compiler says of the tensor-core kernels, without a GPU: numba's PTX for sm_90a, then
``ptxas -v`` (the CUDA toolkit's, on PATH). The numbers the README and the commits quote for the
resume entry, the two-blocks-an-SM cap and the FFMA resume kernel's strided arrays come from it.

1. sha256 of each kernel's PTX with its symbol names masked: run it on two trees to see whether a
   change altered a kernel's code. The one-launch kernels (f16/bf16 at their default tiles, fp8,
   tf32) come first: on this tree and on the one before the resume entry (a3cdb1a, where
   block_functions had no ``resume``) every one of them agrees (2026-11-28, numba-cuda 0.30.4,
   ptxas of the CUDA 13 toolkit). Then what those lines leave out: the plain schedule with
   ``overlap``, fp8 with float16 output, the resume entries (part 2's PTX) and the mma.sync
   kernels (for sm_80, the GPUs that run them).
2. Registers and spills of the half kernels' resume entry (`tc_attention_fold`).
3. Registers and spills of the ping-pong kernel at the caps `TileConfig.blocks_per_sm` sets.
4. Registers and spills of the FFMA resume kernel (float32, d = 64, its 128-register cap) with
   contiguous ("C") against strided ("A") q, O, lse and l arrays.
5. ptxas's "wgmma.mma_async instructions are serialized due to ..." of every wgmma kernel: the
   half kernels (cp.async and TMA rings of both schedules, the resume entries; the producer warpgroup,
   three consumer warpgroups and the ping-pong overlap), fp8, int8, tf32. A
   serialized kernel waits after every wgmma; the first TMA ring was (a wait loop on one
   thread, a divergent path), and ran 8 % slower than the cp.async ring instead of 21 % faster.

The 32-bit ring slot (`exact_tc.ring_slot`) and the TMA ring changed the ping-pong, FP8 and INT8
kernels' PTX after the hashes above were compared; the plain schedule's is unchanged.

    python3 .ci/tc_ptx_report.py        # all five parts, about 9 minutes (one core)
    python3 .ci/tc_ptx_report.py 1      # the hashes alone, about 4 minutes (or any parts: 2 3)
"""
import hashlib
import os
import re
import subprocess
import sys
import tempfile
from functools import cache

os.environ["NUMBA_ENABLE_CUDASIM"] = "0"  # compile_ptx needs the real target

import numpy as np
from numba import cuda, types

from nkattn.cuda_kernels.exact import exact_attention_kernel, tuned_register_cap
from nkattn.cuda_kernels.exact_tc import (
    TileConfig,
    mma_sync_config,
    tc_attention_kernel,
)
from nkattn.cuda_kernels.fp8 import default_config as fp8_config
from nkattn.cuda_kernels.fp8 import fp8_attention_kernel
from nkattn.cuda_kernels.int8 import default_config as int8_config
from nkattn.cuda_kernels.int8 import int8_attention_kernel


def arr(dtype, ndim, layout="A"):
    return types.Array(dtype, ndim, layout)


F32, U16, U8 = types.float32, types.uint16, types.uint8
LENGTHS = arr(types.int32, 1, "C")
ONE_LAUNCH = (arr(U16, 4), arr(U16, 4), arr(U16, 4), LENGTHS, arr(U16, 4), arr(F32, 3), F32, types.boolean, types.int64)
RESUME = ONE_LAUNCH + (arr(F32, 4), arr(F32, 4), types.int64, types.int64, types.int64, types.boolean, types.boolean)
F32_ONE_LAUNCH = tuple(arr(F32, 4) if a == arr(U16, 4) else a for a in ONE_LAUNCH)
FP8 = (arr(U8, 4), arr(U8, 4), arr(U8, 4), arr(F32, 3), arr(F32, 3), arr(F32, 3), LENGTHS, arr(U16, 4), arr(F32, 3), F32,
       types.boolean, types.int64)
INT8 = (arr(types.int8, 4), arr(types.int8, 4), arr(U16, 4), arr(F32, 3), arr(F32, 3), LENGTHS, arr(U16, 4), arr(F32, 3),
        types.boolean, types.int64)


@cache
def ptx_of(kernel, signature, cc=(9, 0, "a")):
    return cuda.compile_ptx(kernel.py_func, signature, cc=cc)[0]


def masked_hash(ptx):
    # mangled names and shared-array symbols carry counters that depend on what the process compiled before
    masked = re.sub(r"_cudapy_smem_\d+", "SMEM", re.sub(r"_ZN[0-9A-Za-z_]+", "SYM", ptx))
    return hashlib.sha256(masked.encode()).hexdigest()[:16]


@cache
def ptxas_log(ptx, cap, arch="sm_90a"):
    """What ``ptxas -v`` says of the PTX at a register cap (its stderr)."""
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(ptx)
        f.flush()
        run = subprocess.run(["ptxas", f"-arch={arch}", f"--maxrregcount={cap}", "-v", f.name, "-o", os.devnull],
                             capture_output=True, text=True, check=True)
    return run.stderr


def ptxas(ptx, cap, arch="sm_90a"):
    return " ".join(re.findall(r"(Used \d+ registers|\d+ bytes spill stores|\d+ bytes spill loads)",
                               ptxas_log(ptx, cap, arch)))


HALF = [("f16", 64, TileConfig(128, 128, pingpong=True)), ("f16", 128, TileConfig(128, 128, pingpong=True)),
        ("bf16", 128, TileConfig(128, 128)), ("bf16", 256, TileConfig(128, 32))]


def resume_ptx(kind, d, config):
    return ptx_of(tc_attention_kernel(kind, d, d, config, resume=True)[0], RESUME)


def part1():
    print("1. PTX, sha256 with symbols masked; first the one-launch kernels")
    for kind, d, config in HALF:
        print(f"  {kind} d={d} {config}: {masked_hash(ptx_of(tc_attention_kernel(kind, d, d, config)[0], ONE_LAUNCH))}",
              flush=True)
    for d in (64, 128):
        print(f"  fp8 d={d}: {masked_hash(ptx_of(fp8_attention_kernel(d, d, fp8_config())[0], FP8))}", flush=True)
    for kind, d, dv in (("tf32x3", 64, 64), ("tf32", 96, 96), ("tf32x3", 128, 64)):
        kernel = tc_attention_kernel(kind, d, dv, TileConfig(64, 64))[0]
        print(f"  {kind} d={d} dv={dv}: {masked_hash(ptx_of(kernel, F32_ONE_LAUNCH))}", flush=True)
    config = TileConfig(128, 128, overlap=True)
    print(f"  f16 d=128 {config}: {masked_hash(ptx_of(tc_attention_kernel('f16', 128, 128, config)[0], ONE_LAUNCH))}",
          flush=True)
    print(f"  fp8 d=128 out f16: {masked_hash(ptx_of(fp8_attention_kernel(128, 128, fp8_config(), 'f16')[0], FP8))}",
          flush=True)
    for kind, d, config in HALF:
        print(f"  resume {kind} d={d} {config}: {masked_hash(resume_ptx(kind, d, config))}", flush=True)
    for kind, d in (("f16", 64), ("f16", 128), ("bf16", 256)):
        config = mma_sync_config(d, d)
        kernel = tc_attention_kernel(kind, d, d, config)[0]
        print(f"  sm_80 {kind} d={d} {config}: {masked_hash(ptx_of(kernel, ONE_LAUNCH, cc=(8, 0)))}", flush=True)


def part2():
    print("2. the resume entry, at the one-launch kernel's cap (255)")
    for kind, d, config in HALF:
        print(f"  {kind} d={d} {config}: {ptxas(resume_ptx(kind, d, config), 255)}", flush=True)


def part3():
    print("3. the ping-pong kernel at the caps of blocks_per_sm (65536 registers / (256 threads x blocks))")
    for d, config in ((64, TileConfig(128, 64, pingpong=True)), (128, TileConfig(128, 64, pingpong=True)),
                      (128, TileConfig(128, 32, pingpong=True))):
        ptx = ptx_of(tc_attention_kernel("f16", d, d, config)[0], ONE_LAUNCH)
        for blocks in (1, 2):
            cap = min(255, 65536 // (256 * blocks) // 8 * 8)
            print(f"  f16 d={d} {config} blocks_per_sm={blocks} (cap {cap}): {ptxas(ptx, cap)}", flush=True)


def part4():
    print("4. the FFMA resume kernel, float32 d = 64, contiguous (C) or strided (A) q, O, lse, l")
    kernel, _ = exact_attention_kernel(np.dtype(np.float32), 64, resume=True)
    for layout in ("C", "A"):
        signature = (arr(F32, 4, layout), arr(F32, 4, "C"), arr(F32, 4, "C"), LENGTHS, arr(F32, 4, layout),
                     arr(F32, 3, layout), arr(F32, 3, layout), F32, types.boolean, types.int64, types.int64, types.int64,
                     types.int64, types.boolean, types.boolean)
        cap = tuned_register_cap(np.float32, 64)
        print(f"  {layout}: {ptxas(ptx_of(kernel, signature, cc=(9, 0)), cap, arch='sm_90')} (cap {cap})", flush=True)


def serialized(ptx, cap=255):
    """ptxas's reasons for serializing the wgmmas of the PTX's kernel (empty when it does not)."""
    return sorted(set(re.findall(r"serialized due to (.*?) in the function", ptxas_log(ptx, cap))))


def part5():
    print("5. wgmma serialization (ptxas sm_90a)")
    tma_maps = (arr(types.uint64, 1, "C"),) * 2
    kernels = []
    for kind, d, config in HALF:
        kernels.append((f"{kind} d={d} {config}", tc_attention_kernel(kind, d, d, config)[0], ONE_LAUNCH))
        tma = TileConfig(config.block_m, config.block_n, pingpong=config.pingpong, tma=True)
        kernels.append((f"{kind} d={d} {tma}", tc_attention_kernel(kind, d, d, tma)[0], ONE_LAUNCH + tma_maps))
        kernels.append((f"resume {kind} d={d} {tma}", tc_attention_kernel(kind, d, d, tma, resume=True)[0],
                        RESUME + tma_maps))
    for d, config in ((128, TileConfig(128, 128, pingpong=True, tma=True, producer=True)),
                      (64, TileConfig(192, 128, pingpong=True, tma=True)),
                      (64, TileConfig(192, 96, pingpong=True, tma=True, producer=True)),
                      (128, TileConfig(128, 128, pingpong=True, tma=True, producer=True, overlap=True)),
                      (64, TileConfig(192, 128, pingpong=True, tma=True, overlap=True))):
        kernels.append((f"f16 d={d} {config}", tc_attention_kernel("f16", d, d, config)[0], ONE_LAUNCH + tma_maps))
        kernels.append((f"resume f16 d={d} {config}", tc_attention_kernel("f16", d, d, config, resume=True)[0],
                        RESUME + tma_maps))
    for d in (64, 128):
        kernels.append((f"fp8 d={d}", fp8_attention_kernel(d, d, fp8_config())[0], FP8))
        kernels.append((f"int8 d={d}", int8_attention_kernel(d, d, int8_config())[0], INT8))
    kernels.append(("tf32x3 d=64", tc_attention_kernel("tf32x3", 64, 64, TileConfig(64, 64))[0], F32_ONE_LAUNCH))
    for name, kernel, signature in kernels:
        reasons = serialized(ptx_of(kernel, signature))
        print(f"  {name}: {'SERIALIZED: ' + '; '.join(reasons) if reasons else 'not serialized'}", flush=True)


PARTS = {"1": part1, "2": part2, "3": part3, "4": part4, "5": part5}

if __name__ == "__main__":
    chosen = sys.argv[1:] or list(PARTS)
    unknown = [p for p in chosen if p not in PARTS]
    if unknown:
        sys.exit(f"usage: {sys.argv[0]} [PART ...], parts {' '.join(PARTS)}; got {' '.join(unknown)}")
    for part in chosen:
        PARTS[part]()
