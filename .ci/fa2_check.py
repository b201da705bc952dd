"""FlashAttention-2's mma.sync kernel (exact_tc, forced with TileConfig(..., mma_sync=True)) on a Hopper,
beside our wgmma kernel (its default, ping-pong) and torch SDPA flash, in one process.

fp16, B = 1, H = 8, d = 64 and 128, N = Nq = Nk = 4K and 16K, causal and not. Per case and kernel:
TFLOP/s (`nkattn.timing`: CUDA-event median after warm-up, FLOPs 4·B·H·N²·d, halved for causal), the
max relative error of O (max|O - O64| / max|O64|) and the max absolute error of lse on sampled rows
against float64 (computed on the GPU), whether O and lse, NaN-poisoned before the first run, were
all written, and whether a repeat run gives the same bits. The mma.sync kernel runs at its sm_8x tiles
(`mma_sync_config`: BM = 128) and at BM = 64 (4 warps); a row's bits must not depend on BM
(`bits=BM128` in the table). A short table on stdout; records and metadata in $OUT/fa2_check.json.

    python3 .ci/fa2_check.py

results/bench/fa2-check-h100-partial.txt is this script's stdout with FA2_N=16384 on an H100 80GB
HBM3, 2026-11-28 (numba 0.68, numba-cuda 0.30.4, torch 2.11), run on the tree of e2511a0 and cut by
the session's device limit after the d = 128 non-causal mma.sync rows (so no json).
    FA2_N=4096 FA2_D=64 FA2_REPEATS=5 python3 .ci/fa2_check.py
"""
import json
import os
import platform
import subprocess
import time

import numba_cuda
import numpy as np
import torch
from numba import cuda
from torch.nn.attention import SDPBackend, sdpa_kernel

from nkattn.cuda_kernels.exact_tc import (
    TileConfig,
    default_config,
    mma_sync_config,
    tc_attention,
)
from nkattn.testing import relative_error
from nkattn.timing import attention_flops, cuda_time_ms, device_name

OUT = os.environ.get("OUT", "/tmp")
B, H = 1, 8
NS = [int(x) for x in os.environ.get("FA2_N", "4096,16384").split(",")]
DS = [int(x) for x in os.environ.get("FA2_D", "64,128").split(",")]
TIMING = {"warmup": int(os.environ.get("FA2_WARMUP", "3")), "repeats": int(os.environ.get("FA2_REPEATS", "20"))}
SAMPLED_ROWS = 256


def schedules(d):
    """(name, TileConfig or None for torch) of every kernel timed at head dim d."""
    sm8x = mma_sync_config(d, d)
    return [
        ("mma_sync", sm8x),
        ("mma_sync_bm64", TileConfig(64, sm8x.block_n, mma_sync=True)),
        ("wgmma", default_config("f16", d, d, (9, 0))),
        ("sdpa_flash", None),
    ]


def reference_rows(q, k, v, rows, causal, scale):
    """O and lse of the given query rows in float64 (N = Nq = Nk, so causal is j <= i)."""
    s = torch.einsum("bhqd,bhkd->bhqk", q[:, :, rows].double(), k.double()) * scale
    if causal:
        s = s.masked_fill(torch.arange(k.shape[2], device=q.device)[None, :] > rows[:, None], float("-inf"))
    return torch.softmax(s, -1) @ v.double(), torch.logsumexp(s, -1)


def git_revision():
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def kernel_call(config, q, k, v, lengths, causal, scale):
    """(call, O, lse) for one kernel: ours write into NaN-poisoned O and lse (a row left unwritten
    stays NaN); torch's flash returns O, copied into O (it has no lse to check here)."""
    if config is None:
        out = torch.empty_like(q)

        def call():
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                out.copy_(torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale))

        return call, out, None
    out = torch.full_like(q, float("nan"))
    lse = torch.full(q.shape[:3], float("nan"), device="cuda")
    qa, ka, va, od = (cuda.as_cuda_array(x.view(torch.int16)) for x in (q, k, v, out))
    ld = cuda.as_cuda_array(lse)

    def call():
        tc_attention(qa, ka, va, lengths, causal=causal, scale=scale, kind="f16", out=od, lse=ld, config=config)

    return call, out, lse


def same_bits(a, b):
    return a is None or (bool(torch.equal(a[0].view(torch.int16), b[0].view(torch.int16)))
                         and (a[1] is None or bool(torch.equal(a[1], b[1]))))


def measure(name, config, d, n, causal, q, k, v, lengths, rows, ref_o, ref_lse, bm128):
    """One kernel on one case: a first run (checked against float64 and for unwritten rows), the
    timing, then the repeat's bits; returns (record, the first run's (O, lse))."""
    scale = d ** -0.5
    call, out, lse = kernel_call(config, q, k, v, lengths, causal, scale)
    call()
    torch.cuda.synchronize()
    written = not bool(torch.isnan(out).any()) and (lse is None or not bool(torch.isnan(lse).any()))
    first = out.clone(), (lse.clone() if lse is not None else None)
    err_o = relative_error(out[:, :, rows].double().cpu().numpy(), ref_o)
    err_lse = float(np.abs(lse[:, :, rows].double().cpu().numpy() - ref_lse).max()) if lse is not None else None
    timing = cuda_time_ms(call, **TIMING)
    torch.cuda.synchronize()
    return {
        "d": d, "n": n, "causal": causal, "kernel": name, "config": None if config is None else vars(config),
        "tflops": attention_flops(B, H, n, n, d, causal) / timing["median_ms"] / 1e9, **timing,
        "max_rel_err_o": err_o, "max_abs_err_lse": err_lse, "sampled_rows": SAMPLED_ROWS, "written": written,
        "repeat_bits_equal": same_bits((out, lse), first),
        "bits_equal_bm128": None if bm128 is None else same_bits(first, bm128),
    }, first


records = []
print(device_name(), flush=True)
print(f"{'d':>4} {'N':>6} {'causal':>6}  {'kernel':<14} {'TFLOP/s':>8} {'err O':>9} {'err lse':>9} written repeat bits=BM128",
      flush=True)
torch.manual_seed(0)
for d in DS:
    for n in NS:
        q, k, v = (torch.randn(B, H, n, d, device="cuda", dtype=torch.float16) for _ in range(3))
        lengths = cuda.to_device(np.full(B, n, np.int32))
        rows = torch.cat([torch.tensor([0, n - 1]), torch.randperm(n)[: SAMPLED_ROWS - 2]]).to("cuda")
        for causal in (False, True):
            ref_o, ref_lse = (x.cpu().numpy() for x in reference_rows(q, k, v, rows, causal, d ** -0.5))
            bm128 = None
            for name, config in schedules(d):
                rec, first = measure(name, config, d, n, causal, q, k, v, lengths, rows, ref_o, ref_lse,
                                     bm128 if name == "mma_sync_bm64" else None)
                if name == "mma_sync":
                    bm128 = first
                records.append(rec)
                lse_text = f"{rec['max_abs_err_lse']:9.2e}" if rec["max_abs_err_lse"] is not None else f"{'-':>9}"
                bm_text = "-" if rec["bits_equal_bm128"] is None else str(rec["bits_equal_bm128"])
                print(f"{d:>4} {n:>6} {causal!s:>6}  {name:<14} {rec['tflops']:8.1f} {rec['max_rel_err_o']:9.2e} "
                      f"{lse_text} {rec['written']!s:>7} {rec['repeat_bits_equal']!s:>6} {bm_text}", flush=True)

meta = {
    "device": device_name(), "date": time.strftime("%Y-%m-%d %H:%M:%S"), "git": git_revision(),
    "torch": torch.__version__, "numba_cuda": numba_cuda.__version__, "python": platform.python_version(),
    "command": "python3 .ci/fa2_check.py", "env": {k: v for k, v in os.environ.items() if k.startswith("FA2_")},
    "batch": B, "heads": H, "dtype": "float16",
}
with open(os.path.join(OUT, "fa2_check.json"), "w") as f:
    json.dump({"meta": meta, "records": records}, f, indent=1)
