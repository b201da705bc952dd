"""Time the 2-blocks-an-SM ping-pong kernel (TileConfig.blocks_per_sm = 2) beside the default
and SDPA's flash and cuDNN backends, in one process: float16, B = 1, H = 8, N = 16K, d = 64 and
128, causal and not. Each line: d, causal, config, median ms (CUDA events, 20 calls after 3),
TFLOP/s, and whether O's bits equal the first config's (False is expected across key tiles:
a 64-key tile sums in another order than a 128-key one).

results/bench/tc-blocks-per-sm-h200.txt is its output on an NVIDIA H200 (2026-11-28, tree of
7044736, numba-cuda 0.30.4, torch 2.11).
"""
import numpy as np
import torch
import torch.nn.functional as F
from numba import cuda
from torch.nn.attention import SDPBackend, sdpa_kernel

from nkattn.cuda_kernels.exact_tc import TileConfig, default_config, tc_attention
from nkattn.timing import attention_flops, cuda_time_ms

N, HEADS = 16384, 8
CONFIGS = (None, TileConfig(128, 128, pingpong=True), TileConfig(128, 64, pingpong=True),
           TileConfig(128, 64, pingpong=True, blocks_per_sm=2))

for d in (64, 128):
    for causal in (False, True):
        q, k, v = (torch.randn(1, HEADS, N, d, device="cuda", dtype=torch.float16) for _ in range(3))
        qd, kd, vd = (cuda.as_cuda_array(x.view(torch.int16)) for x in (q, k, v))
        lengths = cuda.to_device(np.full(1, N, np.int32))
        flops = attention_flops(1, HEADS, N, N, d, causal)
        first_bits = None
        for cfg in CONFIGS:
            try:
                o, lse = tc_attention(qd, kd, vd, lengths, causal=causal, scale=d ** -0.5, kind="f16", config=cfg)
                cuda.synchronize()
                bits = o.copy_to_host().tobytes()
                first_bits = bits if first_bits is None else first_bits
                t = cuda_time_ms(lambda cfg=cfg, o=o, lse=lse: tc_attention(
                    qd, kd, vd, lengths, causal=causal, scale=d ** -0.5, kind="f16", config=cfg, out=o, lse=lse))
                print(d, causal, cfg, f"{t['median_ms']:.3f}", f"{flops / t['median_ms'] / 1e9:.1f}", bits == first_bits,
                      flush=True)
            except Exception as exc:  # noqa: BLE001 (a config this GPU cannot run is a result too)
                print(d, causal, cfg, "ERR", f"{type(exc).__name__}: {str(exc)[:120]}", None, flush=True)
        for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION):
            with sdpa_kernel(backend):
                t = cuda_time_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal))
            print(d, causal, backend.name, f"{t['median_ms']:.3f}", f"{flops / t['median_ms'] / 1e9:.1f}", flush=True)
print("default d64", default_config("f16", 64, 64), "d128", default_config("f16", 128, 128))
