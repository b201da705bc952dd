"""Tile-shape sweep of the wgmma kernel beside torch SDPA, in one run on the GPU machine.

results/bench/exact-tc-tune-h100.json is this script's output, unchanged, from
`PROBE=sweep2 python3 .ci/tc_probe.py` on an H100 80GB HBM3 (2026-11-27, numba 0.68,
numba-cuda 0.30.4, torch 2.11): one record per (kind, d, N, causal, [BM, BN, overlap]; a fourth
entry 1 marks the ping-pong schedule, `PROBE=pingpong`, not yet run),
TFLOP/s from CUDA-event medians of 20 runs and the max relative error of 6 sampled
rows against float64. It chose `exact_tc.default_config` (BM = 128, BN = 128 up to
d = 128: 366.7 TFLOP/s at d = 128, and at d = 64 within this run's spread of the best,
BM = 64, BN = 128, 268.8 against 264.7). The modes other than sweep2 are the earlier
probes of the same session.
"""
import json
import os
import sys
import time
import traceback

import numpy as np
import torch
from numba import cuda

import nkattn  # noqa: F401  (row_stack alias)
from nkattn.cuda_kernels.exact_tc import TileConfig, tc_attention
from nkattn.reference.exact import attention_ref
from nkattn.timing import attention_flops, cuda_time_ms

OUT = os.environ.get("OUT", "/tmp")
configs = [a for a in sys.argv[1:] if ":" in a]
rows = []


def sdpa(backend, q, k, v, causal):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    b = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION}[backend]
    with sdpa_kernel(b):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)


def check(q, k, v, out, causal, kind):
    idx = np.linspace(0, q.shape[2] - 1, 6).astype(int)
    qh = q[:, :, idx].double().cpu().numpy()
    kh, vh = k.double().cpu().numpy(), v.double().cpu().numpy()
    # the reference for sampled rows: bottom-right causal means row i sees keys <= i (Nq == Nk)
    errs = []
    for j, i in enumerate(idx):
        ref = attention_ref(qh[:, :, j:j + 1], kh[:, :, : i + 1] if causal else kh, vh[:, :, : i + 1] if causal else vh)[0]
        got = out[:, :, i:i + 1].double().cpu().numpy()
        errs.append(np.abs(got - ref).max() / np.abs(ref).max())
    return float(max(errs))


B, H = 1, 8
SWEEP = {64: [(128, 128), (192, 128), (128, 64), (64, 128), (192, 64)], 128: [(128, 128), (128, 64), (192, 64), (64, 128)],
         256: [(128, 32), (64, 64), (128, 64)]}
MODE = os.environ.get("PROBE", "full")
if MODE == "pingpong":  # the ping-pong schedule against the same tiles without it (TileConfig.pingpong)
    plan = [("f16", d, n, causal, config) for d in (64, 128) for n in (16384, 131072) for causal in (False, True)
            for config in (None, TileConfig(128, 128, pingpong=True))]
    plan += [("bf16", d, 16384, causal, TileConfig(128, 128, pingpong=True)) for d in (64, 128) for causal in (False, True)]
elif MODE == "sweep2":
    grid = {64: [(64, 128, 0), (64, 64, 0), (128, 128, 0), (128, 64, 0), (192, 128, 0)],
            128: [(64, 64, 0), (64, 128, 0), (128, 128, 0), (128, 64, 0), (192, 64, 0)]}
    plan = [("f16", d, 16384, causal, None) for d in (64, 128) for causal in (False, True)]
    plan += [("f16", d, 16384, causal, TileConfig(bm, bn, bool(o))) for d in (64, 128) for (bm, bn, o) in grid[d]
             for causal in (False, True)]
    plan += [(kind, d, 16384, causal, None) for kind in ("tf32x3", "tf32") for d in (64, 128) for causal in (False, True)]
    plan += [("tf32x3", 64, 16384, False, TileConfig(*c)) for c in ((128, 64), (64, 32), (128, 32))]
elif MODE == "sweep":
    grid = {64: [(64, 128, 1), (64, 128, 0), (64, 64, 1), (64, 64, 0), (128, 128, 0), (128, 64, 0)],
            128: [(64, 64, 1), (64, 64, 0), (64, 128, 0), (64, 128, 1), (128, 128, 0), (128, 64, 0)],
            256: [(64, 32, 1), (64, 32, 0), (128, 32, 0), (64, 64, 0)]}
    plan = [("f16", d, 16384, causal, None) for d in (64, 128, 256) for causal in (False, True)]
    plan += [("f16", d, 16384, causal, TileConfig(bm, bn, bool(o))) for d in (64, 128, 256) for (bm, bn, o) in grid[d]
             for causal in (False, True)]
elif MODE == "quick":
    plan = [(kind, d, 16384, causal, None) for kind in ("f16",) for d in (64, 128) for causal in (False, True)]
    plan += [("f16", d, 16384, False, TileConfig(*c, overlap=o)) for d in (64, 128) for c in SWEEP[d][:3] for o in (True, False)]
else:
    plan = [(kind, d, n, causal, None) for kind in ("f16", "bf16") for d in (64, 128, 256) for n in (4096, 16384)
            for causal in (False, True)]
    plan += [("f16", d, 16384, causal, TileConfig(*c)) for d in (64, 128, 256) for c in SWEEP[d] for causal in (False, True)]
for kind, d, n, causal, config in plan:
                tdt = {"f16": torch.float16, "bf16": torch.bfloat16}.get(kind, torch.float32)
                torch.manual_seed(0)
                q, k, v = (torch.randn(B, H, n, d, device="cuda", dtype=tdt) for _ in range(3))
                flops = attention_flops(B, H, n, n, d, causal)
                rec = {"kind": kind, "d": d, "N": n, "causal": causal, "config": None if config is None else [config.block_m, config.block_n, int(config.overlap)]
                       + ([1] if config.pingpong else [])}
                try:
                    bits = (lambda x: x) if tdt == torch.float32 else (lambda x: x.view(torch.int16))
                    qd, kd, vd = (cuda.as_cuda_array(bits(x)) for x in (q, k, v))
                    out = torch.full_like(q, float("nan"))
                    lse = torch.empty(B, H, n, device="cuda", dtype=torch.float32)
                    od, ld = cuda.as_cuda_array(bits(out)), cuda.as_cuda_array(lse)
                    lengths = cuda.to_device(np.full(B, n, np.int32))

                    def ours():
                        tc_attention(qd, kd, vd, lengths, causal=causal, scale=d ** -0.5, kind=kind, out=od, lse=ld, config=config)

                    t0 = time.time()
                    ours()
                    cuda.synchronize()
                    rec["compile_s"] = time.time() - t0
                    rec["nan_out"] = bool(torch.isnan(out).any())
                    rec["err"] = check(q, k, v, out, causal, kind)
                    tm = cuda_time_ms(ours, warmup=3, repeats=20)
                    rec["ours_ms"] = tm["median_ms"]
                    rec["ours_tflops"] = flops / tm["median_ms"] / 1e9
                except Exception as exc:
                    rec["error"] = repr(exc)[:300]
                    traceback.print_exc()
                backends = ("flash", "cudnn") if tdt != torch.float32 else ("efficient",)
                for backend in (backends if config is None else ()):
                    try:
                        ref_out = sdpa(backend, q, k, v, causal)
                        rec[f"{backend}_err"] = check(q, k, v, ref_out, causal, kind)
                        tm = cuda_time_ms(lambda: sdpa(backend, q, k, v, causal), warmup=3, repeats=20)
                        rec[f"{backend}_tflops"] = flops / tm["median_ms"] / 1e9
                    except Exception as exc:
                        rec[f"{backend}_error"] = repr(exc)[:200]
                rows.append(rec)
                print(json.dumps(rec), flush=True)

json.dump(rows, open(os.path.join(OUT, "tc_probe.json"), "w"), indent=1)
print(f"{'kind':5} {'d':>4} {'N':>6} {'c':>2} {'config':>9} {'ours':>7} {'flash':>7} {'cudnn':>7} {'eff':>7} {'err':>8} {'flash err':>9}")
for r in rows:
    print(f"{r['kind']:5} {r['d']:4} {r['N']:6} {int(r['causal']):2} {r['config']!s:>9} {r.get('ours_tflops', float('nan')):7.1f} "
          f"{r.get('flash_tflops', float('nan')):7.1f} {r.get('cudnn_tflops', float('nan')):7.1f} "
          f"{r.get('efficient_tflops', float('nan')):7.1f} {r.get('err', float('nan')):8.1e} {r.get('flash_err', float('nan')):9.1e}")
