"""One tensor-core kernel launch to profile (after one unprofiled warm-up launch): `kind` (f16/bf16),
d, N from argv, B = 1, H = 8, non-causal unless a later argument says "causal"; default tiles, or a
`TileConfig(...)` given as a later argument (e.g. "TileConfig(128, 128, pingpong=True, tma=True)", which
results/bench/ncu-h200-d128-pingpong-tma-serialized.txt profiled, then asked for by a "tma" argument).

results/bench/ncu-pingpong-h100-d64.txt and -d128.txt (the README's profile of the ping-pong kernel)
came from this, on an H100 80GB HBM3, 2026-11-28 (ncu of the device image, numba-cuda 0.30.4), on the
tree of 22ea4e6, whose wgmma kernels' PTX equals today's:

    M=sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_active,\
sm__inst_executed_pipe_alu.avg.pct_of_peak_sustained_active,\
sm__inst_executed_pipe_fma.avg.pct_of_peak_sustained_active,\
sm__inst_executed_pipe_xu.avg.pct_of_peak_sustained_active,\
l1tex__data_bank_conflicts_pipe_lsu_mem_shared.sum
    ncu --clock-control none -k regex:tc_attention --launch-skip 1 --launch-count 1 --section SpeedOfLight \
        --section WarpStateStats --section SchedulerStats --section LaunchStats --metrics $M \
        python3 .ci/ncu_tc_workload.py f16 64 16384        # and 128
"""
import sys

import numpy as np
import torch
from numba import cuda

import nkattn  # noqa: F401
from nkattn.cuda_kernels.exact_tc import TileConfig, tc_attention  # noqa: F401 (TileConfig: for the eval below)

kind, d, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
causal = "causal" in sys.argv[4:]
configs = [eval(a) for a in sys.argv[4:] if a.startswith("TileConfig(")]
config = configs[0] if configs else None
tdt = torch.float16 if kind == "f16" else torch.bfloat16
q, k, v = (torch.randn(1, 8, n, d, device="cuda", dtype=tdt) for _ in range(3))
qd, kd, vd = (cuda.as_cuda_array(x.view(torch.int16)) for x in (q, k, v))
lengths = cuda.to_device(np.full(1, n, np.int32))
for _ in range(2):
    tc_attention(qd, kd, vd, lengths, causal=causal, scale=d ** -0.5, kind=kind, config=config)
cuda.synchronize()
