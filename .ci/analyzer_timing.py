"""The analysis pass of precision='auto' (row_analyzers every row and every 16th, and the whole
device_head_stats, float32) beside one fp16 tensor-core attention of the same heads, N = 16K,
B = 1, H = 8; also the fp16 kernel beside torch flash/cuDNN. Prints a line per case; json to $OUT.

The README's analyzer times (24.6 / 18.7 / 22.4 ms at d = 64, 41.0 / 19.6 / 32.7 ms at d = 128,
against 2.4 / 3.5 ms) are this script's output on an H100 80GB HBM3, 2026-11-27 (numba 0.68,
numba-cuda 0.30.4, torch 2.11), run on the tree of 33766c6 plus an early form of the exponent fix
(s·c rounded on its own in every row): the analyzers there are those before the key split (8bcb36e),
which this script now times split. Every call allocates its outputs inside the timed region.
The README's split times (8.3 / 9.6 ms every 16th row, 10.2 / 11.3 ms device_head_stats, against
2.2 / 2.9 ms) are its output on an H100 80GB HBM3, 2026-11-28 (same versions), on the tree of 22ea4e6.
"""
import json, os, sys
import numpy as np
import torch
from numba import cuda
from torch.nn.attention import SDPBackend, sdpa_kernel
import nkattn
from nkattn.cuda_kernels.exact_tc import tc_attention
from nkattn.cuda_kernels.precision import row_analyzers
from nkattn.precision import device_head_stats
from nkattn.timing import attention_flops, cuda_time_ms

out = {"device": torch.cuda.get_device_name(), "rows": []}
B, H, N = 1, 8, 16384
torch.manual_seed(0)
for d in (64, 128):
    q, k, v = (torch.randn(B, H, N, d, device="cuda", dtype=torch.float16) for _ in range(3))
    qa, ka, va = (cuda.as_cuda_array(x.view(torch.int16)).view(np.uint16) if False else cuda.as_cuda_array(x.view(torch.uint16)) for x in (q, k, v))
    lengths = cuda.to_device(np.full(B, N, np.int32))
    for causal in (False, True):
        fl = attention_flops(B, H, N, N, d, causal)
        row = {"d": d, "causal": causal}
        t = cuda_time_ms(lambda: tc_attention(qa, ka, va, lengths, causal=causal, scale=d ** -0.5, kind="f16"))
        row["nkattn"] = fl / t["median_ms"] / 1e9
        for name, be in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
            with sdpa_kernel(be):
                t = cuda_time_ms(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal))
            row[name] = fl / t["median_ms"] / 1e9
        # sampled error of our output against float64
        o, _ = tc_attention(qa, ka, va, lengths, causal=causal, scale=d ** -0.5, kind="f16")
        rows = torch.arange(0, N, 997, device="cuda")
        qs = q[:, :, rows].double(); s = qs @ k.double().transpose(-1, -2) * d ** -0.5
        if causal:
            s = s.masked_fill(torch.arange(N, device="cuda")[None, :] > rows[:, None], float("-inf"))
        ref = torch.softmax(s, -1) @ v.double()
        ours = torch.as_tensor(o.copy_to_host().view(np.float16), device="cuda")[:, :, rows].double()
        row["max_rel_err"] = float(((ours - ref).abs().max() / ref.abs().max()).item())
        out["rows"].append(row)
        print(f"fp16 d={d} causal={causal}: nkattn {row['nkattn']:.1f} flash {row['flash']:.1f} cudnn {row['cudnn']:.1f} "
              f"TFLOP/s  vs flash {row['nkattn']/row['flash']:.2f}x vs cudnn {row['nkattn']/row['cudnn']:.2f}x err {row['max_rel_err']:.2e}", flush=True)
    # the analysis pass of precision='auto' (float32 inputs) beside one fp16 attention
    q32, k32, v32 = (x.float() for x in (q, k, v))
    qd, kd = cuda.as_cuda_array(q32), cuda.as_cuda_array(k32)
    t_att = cuda_time_ms(lambda: tc_attention(qa, ka, va, lengths, causal=False, scale=d ** -0.5, kind="f16"))["median_ms"]
    for stride in (1, 16):
        t = cuda_time_ms(lambda: row_analyzers(qd, kd, lengths, causal=False, scale=d ** -0.5, row_stride=stride), repeats=5 if stride == 1 else 20)
        out["rows"].append({"d": d, "analyzers_stride": stride, "ms": t["median_ms"], "fp16_attention_ms": t_att})
        print(f"row_analyzers d={d} stride={stride}: {t['median_ms']:.3f} ms vs fp16 attention {t_att:.3f} ms ({t['median_ms']/t_att:.2f}x)", flush=True)
    t = cuda_time_ms(lambda: device_head_stats(q32, k32, v32, causal=False, scale=d ** -0.5), warmup=1, repeats=5)
    out["rows"].append({"d": d, "device_head_stats_ms": t["median_ms"], "fp16_attention_ms": t_att})
    print(f"device_head_stats d={d} (default stride): {t['median_ms']:.3f} ms vs fp16 attention {t_att:.3f} ms ({t['median_ms']/t_att:.2f}x)", flush=True)
json.dump(out, open(os.path.join(os.environ.get("OUT", "/tmp"), "time1.json"), "w"), indent=1)
