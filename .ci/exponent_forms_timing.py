"""fp16 tensor-core kernel at 16K, three forms of p = 2^(s·c - m) (fused always / separate multiply
always / fused below FUSED_EXPONENT_LIMIT), beside torch flash and cuDNN in the same process.

The README's three-form timings (222 / 166 / 299 / 265, 232 / 202 / 313 / 303, 215 / 205 / 296 / 302
TFLOP/s) are this script's output on an H100 80GB HBM3, 2026-11-27 (numba 0.68, numba-cuda 0.30.4,
torch 2.11), on an uncommitted tree on top of 33766c6, before b91b7e5, in which
FUSED_EXPONENT_LIMIT was a per-kind dict (1024 for the half kinds) and _row_functions took the
limit; it does not run against later code. Every call allocates its outputs inside the timed region.
"""
import json, os
import numpy as np
import torch
from numba import cuda
from torch.nn.attention import SDPBackend, sdpa_kernel
from nkattn.cuda_kernels import exact_tc
from nkattn.timing import attention_flops, cuda_time_ms

out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": []}
B, H, N = 1, 8, 16384
torch.manual_seed(0)
default = dict(exact_tc.FUSED_EXPONENT_LIMIT)
variants = {"fused": float("inf"), "mul_rn": 0.0, "cond": default["f16"]}
for d in (64, 128):
    q, k, v = (torch.randn(B, H, N, d, device="cuda", dtype=torch.float16) for _ in range(3))
    qa, ka, va = (cuda.as_cuda_array(x.view(torch.uint16)) for x in (q, k, v))
    lengths = cuda.to_device(np.full(B, N, np.int32))
    for causal in (False, True):
        fl = attention_flops(B, H, N, N, d, causal)
        row = {"d": d, "causal": causal}
        for name, be in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
            with sdpa_kernel(be):
                t = cuda_time_ms(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal))
            row[name] = fl / t["median_ms"] / 1e9
        for vname, limit in variants.items():
            exact_tc.FUSED_EXPONENT_LIMIT["f16"] = limit
            exact_tc._row_functions.cache_clear(); exact_tc.tc_attention_kernel.cache_clear()
            t = cuda_time_ms(lambda: exact_tc.tc_attention(qa, ka, va, lengths, causal=causal, scale=d ** -0.5, kind="f16"))
            row[vname] = fl / t["median_ms"] / 1e9
        out["rows"].append(row)
        print(f"fp16 d={d:3d} causal={causal!s:5}: " + " ".join(f"{kk} {vv:.1f}" for kk, vv in row.items() if isinstance(vv, float))
              + f"  cond/flash {row['cond']/row['flash']:.2f} cond/cudnn {row['cond']/row['cudnn']:.2f}", flush=True)
json.dump(out, open(os.path.join(os.environ.get("OUT", "/tmp"), "time2.json"), "w"), indent=1)
