"""The ping-pong schedule (the half kinds' default up to d = 128) against the plain two-warpgroup
schedule on the same TileConfig(128, 128) tiles (B = 1, H = 8), outputs preallocated, beside torch
SDPA flash and cuDNN in the same process; checks that the ping-pong output and lse equal the plain
schedule's bit for bit. One line per case, also appended to $OUT/pp-<kind>-<N>.txt.

    python3 .ci/pingpong_check.py                                  # fp16, N = 16K, d = 128 and 64, 20 runs
    PP_KIND=bf16 python3 .ci/pingpong_check.py
    PP_N=131072 PP_D=128 PP_WARMUP=2 PP_REPEATS=5 python3 .ci/pingpong_check.py

Each output file starts with the device, date and versions. results/bench/pingpong-h100-16k.txt and
-128k.txt are this script's earlier form's output (fp16 only, the plain schedule labelled "default",
no header line; H100 80GB HBM3, 2026-11-28, numba 0.68, numba-cuda 0.30.4, torch 2.11), unchanged.
"""
import datetime
import os

import numba
import numba_cuda
import numpy as np
import torch
from numba import cuda
from torch.nn.attention import SDPBackend, sdpa_kernel

from nkattn.cuda_kernels.exact_tc import TileConfig, tc_attention
from nkattn.timing import attention_flops, cuda_time_ms

B, H, N = 1, 8, int(os.environ.get("PP_N", "16384"))
KIND = os.environ.get("PP_KIND", "f16")
DTYPE = {"f16": torch.float16, "bf16": torch.bfloat16}[KIND]
D = tuple(int(x) for x in os.environ.get("PP_D", "128,64").split(","))
TIMING = {"warmup": int(os.environ.get("PP_WARMUP", "3")), "repeats": int(os.environ.get("PP_REPEATS", "20"))}
log = open(os.path.join(os.environ.get("OUT", "/tmp"), f"pp-{KIND}-{N // 1024}k.txt"), "a")


def say(s):
    print(s, flush=True)
    log.write(s + "\n")
    log.flush()


say(f"{torch.cuda.get_device_name()}, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, numba {numba.__version__}, "
    f"numba-cuda {numba_cuda.__version__}, torch {torch.__version__}; {KIND} B={B} H={H} N={N}, CUDA-event medians of {TIMING}")
torch.manual_seed(0)
for d in D:
    q, k, v = (torch.randn(B, H, N, d, device="cuda", dtype=DTYPE) for _ in range(3))
    qa, ka, va = (cuda.as_cuda_array(x.view(torch.int16)) for x in (q, k, v))
    lengths = cuda.to_device(np.full(B, N, np.int32))
    outs = {n: (torch.full_like(q, float("nan")), torch.empty(B, H, N, device="cuda")) for n in ("plain", "pingpong")}
    for causal in (False, True):
        fl = attention_flops(B, H, N, N, d, causal)
        row = {}
        for name, cfg in (("plain", TileConfig(128, 128)), ("pingpong", TileConfig(128, 128, pingpong=True))):
            o, l = outs[name]
            od, ld = cuda.as_cuda_array(o.view(torch.int16)), cuda.as_cuda_array(l)
            f = lambda: tc_attention(qa, ka, va, lengths, causal=causal, scale=d ** -0.5, kind=KIND, out=od, lse=ld, config=cfg)  # noqa: E731
            row[name] = fl / cuda_time_ms(f, **TIMING)["median_ms"] / 1e9
        same = bool(torch.equal(outs["plain"][0].view(torch.int16), outs["pingpong"][0].view(torch.int16))) and bool(torch.equal(outs["plain"][1], outs["pingpong"][1]))
        nan = bool(torch.isnan(outs["pingpong"][0]).any())
        for name, be in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
            with sdpa_kernel(be):
                row[name] = fl / cuda_time_ms(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal), **TIMING)["median_ms"] / 1e9
        say(f"d={d} causal={causal}: plain {row['plain']:.1f} pingpong {row['pingpong']:.1f} flash {row['flash']:.1f} cudnn {row['cudnn']:.1f} TFLOP/s; "
            f"pingpong/plain {row['pingpong']/row['plain']:.2f} /flash {row['pingpong']/row['flash']:.2f} /cudnn {row['pingpong']/row['cudnn']:.2f}; bits equal {same}; nan {nan}")
