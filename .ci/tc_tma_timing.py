"""The ping-pong kernel with its ring filled by TMA (``tma=True``) against the cp.async ring, beside
torch's FlashAttention-2 and cuDNN backends in the same process: fp16, B = 1, H = 8, N from argv
(default 16384), d = 64, 128 (ping-pong) and 256 (plain schedule), causal and not; TFLOP/s from the median of 10 timed calls after
warm-up, outputs preallocated and NaN-filled (so "written" checks every element), and whether the
TMA kernel's O and lse equal the cp.async kernel's bit for bit. One line per case, and a JSON record
under $OUT (or results/bench/) with device, versions, date and configuration.

    python3 .ci/tc_tma_timing.py [N]

results/bench/tc-tma-h200-n16384.json came from this on an H200 (2026-11-28, tree of 2563fd0 less
the default flip), before the d = 64 two-blocks row and the d = 256 rows were added (not run yet).
"""
import datetime
import json
import os
import sys
from functools import partial

import numba
import numba_cuda
import numpy as np
import torch
from numba import cuda
from torch.nn.attention import SDPBackend, sdpa_kernel

from nkattn.cuda_kernels.exact_tc import TileConfig, tc_attention
from nkattn.timing import attention_flops, cuda_time_ms

B, H = 1, 8
N = int(sys.argv[1]) if len(sys.argv) > 1 else 16384
PINGPONG = {"cp.async": TileConfig(128, 128, pingpong=True), "tma": TileConfig(128, 128, pingpong=True, tma=True)}
CONFIGS = {
    # d = 64 also with two blocks an SM (64-key tiles, 126 registers, no spill): its bits differ from the
    # 128-key tiles' (another summation order), so it is timed and checked for written elements only
    64: dict(PINGPONG, **{"tma-2-blocks": TileConfig(128, 64, pingpong=True, blocks_per_sm=2, tma=True)}),
    128: PINGPONG,
    # d = 256's default, the plain schedule with 32-key tiles
    256: {"cp.async": TileConfig(128, 32), "tma": TileConfig(128, 32, tma=True)},
}
torch.manual_seed(0)
device = torch.cuda.get_device_name()
print(device, flush=True)
records = []
for d, configs in CONFIGS.items():
    q, k, v = (torch.randn(B, H, N, d, device="cuda", dtype=torch.float16) for _ in range(3))
    qa, ka, va = (cuda.as_cuda_array(x.view(torch.int16)) for x in (q, k, v))
    lengths = cuda.to_device(np.full(B, N, np.int32))
    for causal in (False, True):
        flops = attention_flops(B, H, N, N, d, causal)
        row, outs = {}, {}
        for name, config in configs.items():
            o, lse = torch.full_like(q, float("nan")), torch.full((B, H, N), float("nan"), device="cuda")
            od, ld = cuda.as_cuda_array(o.view(torch.int16)), cuda.as_cuda_array(lse)
            call = partial(tc_attention, qa, ka, va, lengths, causal=causal, scale=d ** -0.5, kind="f16", out=od,
                           lse=ld, config=config)
            row[name] = flops / cuda_time_ms(call, warmup=3, repeats=10)["median_ms"] / 1e9
            outs[name] = (o, lse)
        for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
            with sdpa_kernel(backend):
                call = partial(torch.nn.functional.scaled_dot_product_attention, q, k, v, is_causal=causal)
                row[name] = flops / cuda_time_ms(call, warmup=3, repeats=10)["median_ms"] / 1e9
        same = all(torch.equal(a.view(torch.int16) if a.dtype == torch.float16 else a.view(torch.int32),
                               b.view(torch.int16) if b.dtype == torch.float16 else b.view(torch.int32))
                   for a, b in zip(outs["tma"], outs["cp.async"]))
        written = not any(bool(torch.isnan(x).any()) for out in outs.values() for x in out)
        records.append({"d": d, "causal": causal, "tflops": row, "tma_bits_equal_cp_async": same, "all_written": written})
        print(f"d={d:3d} causal={causal!s:5}: tma {row['tma']:6.1f} cp.async {row['cp.async']:6.1f} flash {row['flash']:6.1f} "
              f"cudnn {row['cudnn']:6.1f} TFLOP/s | tma/cp.async {row['tma'] / row['cp.async']:.2f} "
              f"/flash {row['tma'] / row['flash']:.2f} /cudnn {row['tma'] / row['cudnn']:.2f} | bits equal {same} "
              f"| all written {written}" + (f" | tma-2-blocks {row['tma-2-blocks']:6.1f}" if "tma-2-blocks" in row else ""), flush=True)
meta = {"device": device, "date": datetime.date.today().isoformat(), "numba": numba.__version__,
        "numba_cuda": numba_cuda.__version__, "torch": torch.__version__, "B": B, "H": H, "N": N, "dtype": "float16",
        "configs": {d: {name: repr(c) for name, c in configs.items()} for d, configs in CONFIGS.items()}, "timing": "CUDA events, median of 10 after 3 warm-up"}
out_dir = os.environ.get("OUT") or "results/bench"
slug = "h200" if "H200" in device else "h100" if "H100" in device else "gpu"
with open(os.path.join(out_dir, f"tc-tma-{slug}-n{N}.json"), "w") as f:
    json.dump({"meta": meta, "records": records}, f, indent=1)
