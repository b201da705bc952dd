"""The FP8 kernel (`nkattn.cuda_kernels.fp8`) on a Hopper GPU: correctness at N = 16K, then its speed
beside our fp16 kernel and torch SDPA (flash, cuDNN) in fp16. B = 1, H = 8, d = 64 and 128, causal
and not (FP8_N, FP8_D, FP8_WARMUP, FP8_REPEATS override).

Correctness, per case: O and lse preallocated as NaN must come back without NaN (every row sees a
key); on sampled 128-row Q blocks (two heads, first / middle / last block: whole blocks, so their Q
scales are the kernel's; causal takes the keys up to the block's end, the same bottom-right mask),
O against `emulate(..., "fp8")` and float64 attention of the bf16 inputs, as max |error| and as
max |error| / `error_bound` (<= 1 is within the written bound), and our fp16 kernel's error on the
same rows for scale. Speed: CUDA-event medians after warm-up, the FP8 attention alone (operands
quantized once) and with its quantization, our fp16 kernel (default config), SDPA flash and cuDNN
(fp16), in TFLOP/s (`attention_flops`), and the FP8 kernel's ratios to each. Registers and local
memory (spills) of the compiled FP8 kernel are printed too. A table to stdout, the records as json
to $OUT/fp8_check.json.

    python3 .ci/fp8_check.py

results/bench/fp8-check-h100-partial.txt is this script's output on an H100 80GB HBM3, 2026-11-28
(numba 0.68, numba-cuda 0.30.4, torch 2.11), run on the tree of e2511a0 and cut by its 110 s limit
after d = 64 (so no json; its register report printed empty lists).
"""

import json
import os

import ml_dtypes
import numpy as np
import torch
from numba import cuda
from torch.nn.attention import SDPBackend, sdpa_kernel

from nkattn.cuda_kernels.exact_tc import tc_attention
from nkattn.cuda_kernels.fp8 import (
    default_config,
    fp8_attention_kernel,
    fp8_attention_quantized,
    quantize,
)
from nkattn.reference.exact import attention_ref
from nkattn.reference.precision import emulate, error_bound
from nkattn.timing import attention_flops, cuda_time_ms, device_name

OUT = os.environ.get("OUT", "/tmp")
B, H, N = 1, 8, int(os.environ.get("FP8_N", "16384"))
DIMS = tuple(int(x) for x in os.environ.get("FP8_D", "64,128").split(","))
TIMING = {"warmup": int(os.environ.get("FP8_WARMUP", "3")), "repeats": int(os.environ.get("FP8_REPEATS", "20"))}
SAMPLED_HEADS = (0, 5)
BF16_NAN, F16_NAN = 0x7FC0, 0x7E00


def sampled_blocks(n):
    blocks = n // 128
    return sorted({0, blocks // 2, blocks - 1})


def sampled_errors(q, k, v, o_fp8, o_f16, q16, k16, v16, causal):
    """Max errors of the FP8 O (vs emulate, vs float64, each also over error_bound) and of the fp16 O
    (vs float64 of the fp16 inputs) on the sampled Q blocks."""
    worst = {"fp8_vs_emulate": 0.0, "fp8_vs_f64": 0.0, "fp8_vs_emulate_over_bound": 0.0,
             "fp8_vs_f64_over_bound": 0.0, "emulate_vs_f64_over_bound": 0.0, "f16_vs_f64": 0.0}
    for h in SAMPLED_HEADS:
        for blk in sampled_blocks(q.shape[2]):
            rows = slice(128 * blk, 128 * blk + 128)
            keys = slice(0, rows.stop if causal else k.shape[2])
            qs, ks, vs = q[:, h:h + 1, rows], k[:, h:h + 1, keys], v[:, h:h + 1, keys]
            mirror, _ = emulate(qs, ks, vs, "fp8", causal=causal)
            oracle, _ = attention_ref(qs, ks, vs, causal=causal)
            bound = error_bound(qs, ks, vs, "fp8", causal=causal)
            got = o_fp8[:, h:h + 1, rows]
            oracle16, _ = attention_ref(q16[:, h:h + 1, rows], k16[:, h:h + 1, keys], v16[:, h:h + 1, keys],
                                        causal=causal)
            for name, value in (("fp8_vs_emulate", np.abs(got - mirror).max()), ("fp8_vs_f64", np.abs(got - oracle).max()),
                                ("fp8_vs_emulate_over_bound", (np.abs(got - mirror) / bound).max()),
                                ("fp8_vs_f64_over_bound", (np.abs(got - oracle) / bound).max()),
                                ("emulate_vs_f64_over_bound", (np.abs(mirror - oracle) / bound).max()),
                                ("f16_vs_f64", np.abs(o_f16[:, h:h + 1, rows] - oracle16).max())):
                worst[name] = max(worst[name], float(value))
    return worst


def check_case(device, d, causal, lengths, half, bf16):
    """One (d, causal): correctness on NaN-poisoned outputs and sampled blocks, then the timings."""
    (q16, k16, v16), (bits16, host_16) = half
    bits_b, host_b = bf16
    scale = d ** -0.5
    out = cuda.to_device(np.full((B, H, N, d), BF16_NAN, np.uint16))
    lse = cuda.to_device(np.full((B, H, N), np.nan, np.float32))
    ops = quantize(*bits_b, lengths)
    fp8_attention_quantized(ops, lengths, causal=causal, scale=scale, value_dim=d, out=out, lse=lse)
    o_fp8 = out.copy_to_host().view(ml_dtypes.bfloat16).astype(np.float64)
    lse_fp8 = lse.copy_to_host()
    out16 = cuda.to_device(np.full((B, H, N, d), F16_NAN, np.uint16))
    lse16 = cuda.device_array((B, H, N), np.float32)
    tc_attention(*bits16, lengths, causal=causal, scale=scale, kind="f16", out=out16, lse=lse16)
    o_f16 = out16.copy_to_host().view(np.float16).astype(np.float64)
    rec = {"device": device, "B": B, "H": H, "N": N, "d": d, "causal": causal,
           "fp8_all_written": bool(not np.isnan(o_fp8).any() and not np.isnan(lse_fp8).any()),
           **sampled_errors(*host_b, o_fp8, o_f16, *host_16, causal)}

    flops = attention_flops(B, H, N, N, d, causal)

    def tflops(fn):
        return flops / cuda_time_ms(fn, **TIMING)["median_ms"] / 1e9

    rec["fp8_attention_tflops"] = tflops(lambda: fp8_attention_quantized(
        ops, lengths, causal=causal, scale=scale, value_dim=d, out=out, lse=lse))
    rec["fp8_with_quantize_tflops"] = tflops(lambda: fp8_attention_quantized(
        quantize(*bits_b, lengths), lengths, causal=causal, scale=scale, value_dim=d, out=out, lse=lse))
    rec["f16_tflops"] = tflops(lambda: tc_attention(*bits16, lengths, causal=causal, scale=scale, kind="f16",
                                                    out=out16, lse=lse16))
    for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
        with sdpa_kernel(backend):
            rec[f"sdpa_{name}_f16_tflops"] = tflops(
                lambda: torch.nn.functional.scaled_dot_product_attention(q16, k16, v16, is_causal=causal))
    for other in ("f16", "sdpa_flash_f16", "sdpa_cudnn_f16"):
        rec[f"fp8_over_{other}"] = rec["fp8_attention_tflops"] / rec[f"{other}_tflops"]
    kernel, _ = fp8_attention_kernel(ops.q.shape[3], d, default_config())
    rec["registers"] = list(kernel.get_regs_per_thread().values())
    rec["local_bytes_per_thread"] = list(kernel.get_local_mem_per_thread().values())
    return rec


def main():
    device = device_name()
    print(device, flush=True)
    records = []
    torch.manual_seed(0)
    lengths = cuda.to_device(np.full(B, N, np.int32))
    for d in DIMS:
        tensors16 = [torch.randn(B, H, N, d, device="cuda", dtype=torch.float16) for _ in range(3)]
        tensors_b = [x.to(torch.bfloat16) for x in tensors16]

        def bits(xs):
            return [cuda.as_cuda_array(x.view(torch.int16)).view(np.uint16) for x in xs]

        def host(xs):
            return [x.float().cpu().numpy().astype(np.float64) for x in xs]

        half = (tensors16, (bits(tensors16), host(tensors16)))
        bf16 = (bits(tensors_b), host(tensors_b))
        for causal in (False, True):
            rec = check_case(device, d, causal, lengths, half, bf16)
            records.append(rec)
            print(f"d={d:3d} causal={causal!s:5}: fp8 {rec['fp8_attention_tflops']:6.1f} (with quantize "
                  f"{rec['fp8_with_quantize_tflops']:6.1f}) f16 {rec['f16_tflops']:6.1f} flash "
                  f"{rec['sdpa_flash_f16_tflops']:6.1f} cudnn {rec['sdpa_cudnn_f16_tflops']:6.1f} TFLOP/s; fp8/f16 "
                  f"{rec['fp8_over_f16']:.2f} /flash {rec['fp8_over_sdpa_flash_f16']:.2f} /cudnn "
                  f"{rec['fp8_over_sdpa_cudnn_f16']:.2f} | max err fp8-emulate {rec['fp8_vs_emulate']:.2e} "
                  f"({rec['fp8_vs_emulate_over_bound']:.2f} of bound) fp8-f64 {rec['fp8_vs_f64']:.2e} "
                  f"({rec['fp8_vs_f64_over_bound']:.2f} of bound; emulate {rec['emulate_vs_f64_over_bound']:.2f}) "
                  f"f16-f64 {rec['f16_vs_f64']:.2e} | all written {rec['fp8_all_written']} | registers "
                  f"{rec['registers']} local {rec['local_bytes_per_thread']}", flush=True)
    with open(os.path.join(OUT, "fp8_check.json"), "w") as f:
        json.dump(records, f, indent=1)


if __name__ == "__main__":
    main()
