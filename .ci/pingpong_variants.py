"""Ping-pong tile variants at N = 16K beside flash/cuDNN: f16/bf16, d = 64/128/256; bits vs the plain schedule.
Prints a json line per case; $OUT/t2.json.

The README's table of plain against ping-pong (d = 64, 128, 256, fp16) is this script's output
on an H100 80GB HBM3, 2026-11-28 (numba 0.68, numba-cuda 0.30.4, torch 2.11), run on the tree of
22ea4e6, whose kernels are today's; the run stopped at its 150 s limit before the bf16 rows. The
(128, 64) ping-pong tiles gave 206.8 / 205.2 (d = 64) and 347.9 / 337.4 TFLOP/s (d = 128), below
(128, 128), and their bits differ from the plain (128, 128) kernel's, as other tiles' do.
"""
import json, os
import numpy as np
import torch
from numba import cuda
from torch.nn.attention import SDPBackend, sdpa_kernel
import nkattn  # noqa: F401
from nkattn.cuda_kernels.exact_tc import TileConfig, tc_attention
from nkattn.timing import attention_flops, cuda_time_ms

B, H, N = 1, 8, 16384
rows = []
plan = [("f16", 64, [TileConfig(128, 128), TileConfig(128, 128, pingpong=True), TileConfig(128, 64, pingpong=True)]),
        ("f16", 128, [TileConfig(128, 128), TileConfig(128, 128, pingpong=True), TileConfig(128, 64, pingpong=True)]),
        ("f16", 256, [TileConfig(128, 32), TileConfig(128, 32, pingpong=True), TileConfig(128, 64, pingpong=True)]),
        ("bf16", 64, [TileConfig(128, 128), TileConfig(128, 128, pingpong=True)]),
        ("bf16", 128, [TileConfig(128, 128), TileConfig(128, 128, pingpong=True)])]
for kind, d, configs in plan:
    tdt = torch.float16 if kind == "f16" else torch.bfloat16
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, H, N, d, device="cuda", dtype=tdt) for _ in range(3))
    qd, kd, vd = (cuda.as_cuda_array(x.view(torch.int16)) for x in (q, k, v))
    lengths = cuda.to_device(np.full(B, N, np.int32))
    for causal in (False, True):
        fl = attention_flops(B, H, N, N, d, causal)
        row = {"kind": kind, "d": d, "causal": causal}
        ref = None
        for cfg in configs:
            out = torch.full_like(q, float("nan")); lse = torch.empty(B, H, N, device="cuda")
            od, ld = cuda.as_cuda_array(out.view(torch.int16)), cuda.as_cuda_array(lse)
            try:
                call = lambda: tc_attention(qd, kd, vd, lengths, causal=causal, scale=d ** -0.5, kind=kind, out=od, lse=ld, config=cfg)
                call(); cuda.synchronize()
                name = f"{cfg.block_m}x{cfg.block_n}{'pp' if cfg.pingpong else ''}"
                row[name] = fl / cuda_time_ms(call, repeats=20)["median_ms"] / 1e9
                if ref is None:
                    ref = (out.clone(), lse.clone())
                else:
                    row[name + "_same"] = bool(torch.equal(out.view(torch.int16), ref[0].view(torch.int16)) and torch.equal(lse, ref[1]))
                row[name + "_nan"] = bool(torch.isnan(out).any())
            except Exception as exc:  # a config that does not fit is reported, not fatal
                row[f"{cfg}"] = str(exc)[:120]
        for name, be in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
            with sdpa_kernel(be):
                row[name] = fl / cuda_time_ms(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal), repeats=20)["median_ms"] / 1e9
        rows.append(row)
        print(json.dumps({k_: (round(v_, 1) if isinstance(v_, float) else v_) for k_, v_ in row.items()}), flush=True)
json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, open(os.path.join(os.environ.get("OUT", "/tmp"), "t2.json"), "w"), indent=1)
