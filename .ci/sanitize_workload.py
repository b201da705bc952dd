"""Small workloads of the tensor-core, low-rank, resume, entropy and analyzer kernels for compute-sanitizer:
results/sanitizer/ came from

    for tool in memcheck racecheck synccheck; do compute-sanitizer --tool $tool --print-limit 20 \
        python3 .ci/sanitize_workload.py > results/sanitizer/$tool-<device>.txt; done

The stored -h100 files are this workload on the tree of 22ea4e6 (an H100 80GB HBM3, 2026-11-28,
numba-cuda 0.30.4), where the default half schedule was ping-pong at every d, d = 256 included;
0 errors and 0 hazards. The FP8 kernel (with its quantizer) and the mma.sync kernel were merged
later; their cases are at the end of the workload. The whole workload ran on an NVIDIA H200
(2026-11-28, tree of a3619bd, numba-cuda 0.30.4) under the three tools at once; only what

    grep -E 'ERROR SUMMARY|RACECHECK SUMMARY|^rc|Error' <tool's output>; grep -c '^ran' <tool's output>

printed came back: results/sanitizer/summary-h200.txt (0 errors, 0 hazards, 22 of 22 launches).
The resume entry of the tensor-core kernel (both schedules) was added after that run; on the
tree of 7044736 (an H200, 2026-11-28) racecheck ran the whole workload, 24 of 24 launches, 0
hazards (racecheck-h200.txt); memcheck and synccheck were cut by a 200 s limit after 14 and 21
launches with 0 errors (-h200-cut.txt), and then ran the resume section alone, 0 errors
(-h200-resume.txt). The INT8 kernel's section came later; on the tree of 7c489e6 (an H200, 2026-11-28)
memcheck, synccheck and racecheck ran it alone: 0 errors, 0 hazards. Then the TMA-filled ring's section
(`tma`): on the tree of 7c489e6 with the TMA ring whose thread 0 alone waited for a free slot (an H200,
2026-11-28), 0 errors and 0 hazards under the three tools, every launch; with the wait on every thread
(2563fd0) the tools were cut by the call's limit after the one-launch cases, no error reported. The
producer warpgroup's section (`producer`), on the tree that added it (an H200, 2026-11-28): racecheck
0 hazards, memcheck 0 errors, every launch (results/sanitizer/*-producer-h200.txt); its overlap case
(the last one-launch case) came later and has not run.
The arguments name sections to run (default: all, in this order):

    python3 .ci/sanitize_workload.py tensor_core_resume
"""
import sys

import numpy as np
from numba import cuda

import nkattn  # noqa: F401
from nkattn.cuda_kernels.exact import exact_attention, exact_attention_fold
from nkattn.cuda_kernels.exact_tc import TileConfig, mma_sync_config, tc_attention, tc_attention_fold
from nkattn.cuda_kernels.fp8 import fp8_attention
from nkattn.cuda_kernels.int8 import int8_attention
from nkattn.cuda_kernels.lowrank import attention_times, attention_transpose_times
from nkattn.cuda_kernels.precision import block_absmax, row_analyzers

rng = np.random.default_rng(0)


def dev(shape, kind):
    x = rng.normal(size=shape)
    if kind == "f16":
        return cuda.to_device(x.astype(np.float16).view(np.uint16))
    if kind == "bf16":
        import ml_dtypes
        return cuda.to_device(x.astype(ml_dtypes.bfloat16).view(np.uint16))
    return cuda.to_device(x.astype(np.float32))


def kernel_inputs(kind, d, dv):
    """q (1, 2, 200, d), k and v (1, 1, 333, d / dv) of ``kind`` (two query heads on one key/value head),
    and a key length of 300 that ends inside a key tile."""
    q, k, v = dev((1, 2, 200, d), kind), dev((1, 1, 333, d), kind), dev((1, 1, 333, dv), kind)
    return q, k, v, cuda.to_device(np.array([300], np.int32))


def tensor_core():
    for kind, d, dv, causal, cfg in [("f16", 64, 64, True, None), ("bf16", 128, 128, False, None), ("f16", 80, 48, True, None),
                                     ("f16", 64, 64, True, TileConfig(64, 128)), ("f16", 64, 64, True, TileConfig(128, 128)), ("f16", 64, 48, True, TileConfig(128, 64, pingpong=True)),
                                     ("bf16", 128, 128, False, TileConfig(128, 128, pingpong=True)), ("tf32x3", 64, 64, True, None),
                                     ("tf32", 96, 96, False, None), ("bf16", 256, 256, True, None)]:
        q, k, v, lengths = kernel_inputs(kind, d, dv)
        tc_attention(q, k, v, lengths, causal=causal, scale=d ** -0.5, kind=kind, config=cfg)
        cuda.synchronize()
        print("ran", kind, d, dv, causal, cfg)


def lowrank_ops():
    for dt in (np.float32, np.float64):
        q = cuda.to_device(rng.normal(size=(1, 2, 150, 64)).astype(dt))
        k = cuda.to_device(rng.normal(size=(1, 1, 170, 64)).astype(dt))
        x = cuda.to_device(rng.normal(size=(1, 1, 170, 42)).astype(dt))
        lengths = cuda.to_device(np.array([170], np.int32))
        ax, lse = attention_times(q, k, x, lengths, causal=True, scale=0.125)
        y = cuda.to_device(rng.normal(size=(1, 2, 150, 42)).astype(dt))
        attention_transpose_times(q, k, y, lse, lengths, causal=True, scale=0.125)
        cuda.synchronize()
        print("ran lowrank ops", dt)


def ffma():
    for dt in (np.float32, np.float64):
        q = cuda.to_device(rng.normal(size=(2, 2, 150, 32)).astype(dt))
        k = cuda.to_device(rng.normal(size=(2, 1, 170, 32)).astype(dt))
        v = cuda.to_device(rng.normal(size=(2, 1, 170, 24)).astype(dt))
        lengths = cuda.to_device(np.array([170, 77], np.int32))
        exact_attention(q, k, v, lengths, causal=True, scale=0.2, return_entropy=True)
        row_analyzers(q, k, lengths, causal=False, scale=0.2, row_stride=3)
        row_analyzers(q, k, lengths, causal=True, scale=0.2, row_stride=2, key_splits=3)  # the merge kernel too
        block_absmax(k, lengths, 64)
        # the resume entry: two key chunks of 64 (a multiple of every key tile) folded in order
        out = cuda.device_array((2, 2, 150, 24), dtype=dt)
        lse = cuda.device_array((2, 2, 150), dtype=dt)
        l_state = cuda.device_array((2, 2, 150), dtype=dt)
        for start, stop in ((0, 128), (128, 170)):
            exact_attention_fold(q, k[:, :, start:stop], v[:, :, start:stop], lengths, out, lse, l_state, causal=True,
                                 scale=0.2, row_offset=20, nq_total=170, key_offset=start, first=start == 0,
                                 last=stop == 170)
        cuda.synchronize()
        print("ran entropy, analyzers, absmax, resume", dt)


def mma_sync():
    for kind, d, dv, causal, cfg in [("f16", 64, 64, True, mma_sync_config(64, 64)), ("bf16", 128, 128, False, mma_sync_config(128, 128)),
                                     ("f16", 80, 48, True, mma_sync_config(80, 48)), ("bf16", 256, 256, True, mma_sync_config(256, 256)),
                                     ("f16", 64, 64, True, TileConfig(64, 64, mma_sync=True))]:
        q, k, v, lengths = kernel_inputs(kind, d, dv)
        tc_attention(q, k, v, lengths, causal=causal, scale=d ** -0.5, kind=kind, config=cfg)
        cuda.synchronize()
        print("ran mma.sync", kind, d, dv, causal, cfg)


def fp8():
    for d, dv, causal, out_kind in [(64, 64, True, "bf16"), (128, 128, False, "bf16"), (80, 48, True, "f16")]:
        q, k, v, lengths = kernel_inputs("bf16", d, dv)
        fp8_attention(q, k, v, lengths, causal=causal, scale=d ** -0.5, out_kind=out_kind)
        cuda.synchronize()
        print("ran fp8 (quantize and attention)", d, dv, causal, out_kind)


def int8():
    # key mean, quantizers, attention and the lse shift; dv = 48 and a mask that ends mid-tile
    for d, dv, causal in [(64, 64, True), (128, 128, False), (64, 48, True)]:
        q, k, v, lengths = kernel_inputs("f16", d, dv)
        int8_attention(q, k, v, lengths, causal=causal, scale=d ** -0.5)
        cuda.synchronize()
        print("ran int8 (quantize and attention)", d, dv, causal)


def fold(kind, cfg):
    """The resume entry over two row chunks (the second ends mid-block), each folding key chunks [0, 256)
    and [256, 333)."""
    q, k, v, lengths = kernel_inputs(kind, 64, 48)
    for r0, r1 in ((0, 128), (128, 200)):
        shape = (1, 2, r1 - r0)
        out, lse = cuda.device_array((*shape, 48), np.uint16), cuda.device_array(shape, np.float32)
        acc, l_state = cuda.device_array((*shape, 48), np.float32), cuda.device_array((*shape, 4), np.float32)
        for k0, k1 in ((0, 256), (256, 333)):
            tc_attention_fold(q[:, :, r0:r1], k[:, :, k0:k1], v[:, :, k0:k1], lengths, out, lse, acc, l_state,
                              causal=True, scale=0.125, kind=kind, row_offset=r0, nq_total=200, key_offset=k0,
                              first=k0 == 0, last=k1 == 333, config=cfg)
    cuda.synchronize()


def tensor_core_resume():
    for kind, cfg in (("f16", TileConfig(128, 128, pingpong=True)), ("bf16", TileConfig(128, 128))):
        fold(kind, cfg)
        print("ran tensor-core resume", kind, cfg)


def tma():
    # the ping-pong and plain rings filled by TMA: whole tiles from thread 0, the tile across the key length
    # (300 of 333) by cp.async; one launch (GQA, dv != d, d = 80 of five 32-byte column blocks) and resume
    for kind, d, dv, causal in (("f16", 64, 64, True), ("bf16", 128, 128, False), ("f16", 80, 48, True)):
        q, k, v, lengths = kernel_inputs(kind, d, dv)
        for cfg in (TileConfig(128, 64 if d > 64 else 128, pingpong=True, tma=True), TileConfig(128, 64, tma=True)):
            tc_attention(q, k, v, lengths, causal=causal, scale=d ** -0.5, kind=kind, config=cfg)
            cuda.synchronize()
            print("ran tma", kind, d, dv, causal, cfg)
    for kind, cfg in (("f16", TileConfig(128, 128, pingpong=True, tma=True)), ("bf16", TileConfig(128, 128, tma=True))):
        fold(kind, cfg)
        print("ran tma resume", kind, cfg)


def producer():
    # the producer warpgroup's ring (two and three consumer warpgroups; the tile across the key length by
    # the producer warp's cp.async): one launch and resume
    for kind, d, dv, causal, cfg in (("f16", 64, 64, True, TileConfig(192, 96, pingpong=True, tma=True, producer=True)),
                                     ("bf16", 128, 128, False, TileConfig(128, 128, pingpong=True, tma=True, producer=True)),
                                     ("f16", 128, 128, True,
                                      TileConfig(128, 128, pingpong=True, tma=True, producer=True, overlap=True))):
        q, k, v, lengths = kernel_inputs(kind, d, dv)
        tc_attention(q, k, v, lengths, causal=causal, scale=d ** -0.5, kind=kind, config=cfg)
        cuda.synchronize()
        print("ran producer", kind, d, dv, causal, cfg)
    cfg = TileConfig(128, 128, pingpong=True, tma=True, producer=True)
    fold("f16", cfg)
    print("ran producer resume f16", cfg)


SECTIONS = {f.__name__: f for f in (tensor_core, lowrank_ops, ffma, mma_sync, fp8, tensor_core_resume, int8, tma,
                                    producer)}

if __name__ == "__main__":
    unknown = [name for name in sys.argv[1:] if name not in SECTIONS]
    if unknown:
        sys.exit(f"unknown sections {unknown}; known: {list(SECTIONS)}")
    for name in sys.argv[1:] or SECTIONS:
        SECTIONS[name]()
