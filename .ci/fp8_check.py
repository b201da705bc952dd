"""The low-precision kernels on a Hopper GPU, one format after another: the FP8 kernel
(`nkattn.cuda_kernels.fp8`, format ``fp8``: bf16 inputs, bf16 O) and the INT8 kernel
(`nkattn.cuda_kernels.int8`, format ``int8-fp16``: fp16 inputs, fp16 O). Per format, correctness at
N = 16K, then its speed beside our fp16 kernel and torch SDPA (flash, cuDNN) in fp16. B = 1, H = 8,
d = 64 and 128, causal and not.

Environment: CHECK_FORMATS (comma-separated names of `nkattn.reference.precision.FORMATS` that have a
kernel here, default ``fp8,int8-fp16``: both, FP8 first as before; ``CHECK_FORMATS=fp8`` is the old
check alone); FP8_N, FP8_D, FP8_WARMUP, FP8_REPEATS (names kept from the FP8-only version) set N, the
head dims, warm-up and repeats for every format.

Correctness, per (format, d, causal): O and lse preallocated as NaN must come back without NaN
(every row sees a key); on sampled 128-row Q blocks (two heads, first / middle / last block: whole
blocks, so their Q scales are the kernel's; causal takes the keys up to the block's end, the same
bottom-right mask), O against `emulate(..., format)` and float64 attention of the format's inputs
(bf16 for fp8, fp16 for int8-fp16), as max |error| and as max |error| / `error_bound` (<= 1 is
within the written bound), and our fp16 kernel's error on the same rows for scale.

int8-fp16 smooths K by its mean over all N keys; a causal block's key slice has another mean, so
the slice alone would not be what the kernel computed. `mirror_inputs` appends to the slice a few
f16 keys whose sum makes the slice's mean exactly the full one (their values and V zeros seen by
no sampled row) and as many zero Q rows after the block, which keeps the bottom-right diagonal: the
emulation and the bound then quantize the slice's keys as the kernel did.

Speed: CUDA-event medians after warm-up, the kernel's attention alone (operands quantized once;
for int8-fp16 with its lse shift) and with its quantization, our fp16 kernel (default config),
SDPA flash and cuDNN (fp16), in TFLOP/s (`attention_flops`), and the kernel's ratios to each.
Registers and local memory (spills) of the compiled kernel are recorded too. A line per case to
stdout (the FP8 line as the FP8-only version printed it; INT8's reads "int8" for "fp8"), the
records as json to $OUT/<format>_check.json (fp8_check.json as before, int8-fp16_check.json).
Record keys are format-neutral (``vs_emulate``, ``attention_tflops``, ``over_f16``, ...) with the
record's ``format``; the FP8-only version's keys were the same with an ``fp8_`` prefix.

    python3 .ci/fp8_check.py                      # both formats
    CHECK_FORMATS=int8-fp16 python3 .ci/fp8_check.py

The stored outputs came from the FP8-only version of this script (its text at 53f505b, the same
check since 739d7c8): results/bench/fp8-check-h100-partial.txt is its output on an H100 80GB HBM3,
2026-11-28 (numba 0.68, numba-cuda 0.30.4, torch 2.11), run on the tree of e2511a0 and cut by its
110 s limit after d = 64 (so no json; its register report printed empty lists);
results/bench/fp8-check-h200-d128.txt/.json its d = 128 run on an H200 (2026-11-28), with that
version's ``fp8_`` keys. This version has not been run on a GPU yet.
"""

import json
import os
from collections.abc import Callable
from dataclasses import dataclass

import ml_dtypes
import numpy as np

try:  # the host-side helpers (sampled_errors, mirror_inputs) need neither torch nor a GPU
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
except ImportError:  # pragma: no cover - the GPU machine has torch
    torch = None
from numba import cuda

from nkattn.reference.exact import attention_ref
from nkattn.reference.precision import emulate, error_bound, get_format, round_input

OUT = os.environ.get("OUT", "/tmp")
B, H, N = 1, 8, int(os.environ.get("FP8_N", "16384"))
DIMS = tuple(int(x) for x in os.environ.get("FP8_D", "64,128").split(","))
TIMING = {"warmup": int(os.environ.get("FP8_WARMUP", "3")), "repeats": int(os.environ.get("FP8_REPEATS", "20"))}
CHECK_FORMATS = tuple(x.strip() for x in os.environ.get("CHECK_FORMATS", "fp8,int8-fp16").split(",") if x.strip())
SAMPLED_HEADS = (0, 5)
BF16_NAN, F16_NAN = 0x7FC0, 0x7E00
F16_MAX = float(np.finfo(np.float16).max)
EXTRA_KEYS = 8  # keys `mirror_inputs` may append (4 suffice below 2^15 of sum to move)


@dataclass(frozen=True)
class Kernel:
    """One format's kernel as the check drives it: inputs in ``input`` ("bf16" or "fp16"), O in
    ``out_dtype`` (its NaN pattern ``out_nan``); ``quantize(q, k, v, lengths, scale)`` gives the
    operands, ``attend(ops, q, k, v, lengths, causal, scale, d, out, lse)`` runs the attention on
    them, ``compiled(ops, d)`` the kernel object whose registers are read."""

    label: str  # the printed name ("fp8", "int8")
    input: str
    out_dtype: object
    out_nan: int
    quantize: Callable
    attend: Callable
    compiled: Callable


def kernels():
    """The formats with a kernel here (imported on first use: the GPU modules)."""
    from nkattn.cuda_kernels import fp8, int8

    return {
        "fp8": Kernel(
            "fp8", "bf16", ml_dtypes.bfloat16, BF16_NAN,
            lambda q, k, v, lengths, scale: fp8.quantize(q, k, v, lengths),
            lambda ops, q, k, v, lengths, causal, scale, d, out, lse: fp8.fp8_attention_quantized(
                ops, lengths, causal=causal, scale=scale, value_dim=d, out=out, lse=lse),
            lambda ops, d: fp8.fp8_attention_kernel(ops.q.shape[3], d, fp8.default_config())[0]),
        "int8-fp16": Kernel(
            "int8", "fp16", np.float16, F16_NAN,
            lambda q, k, v, lengths, scale: int8.quantize(q, k, lengths, scale=scale),
            lambda ops, q, k, v, lengths, causal, scale, d, out, lse: int8.int8_attention_quantized(
                ops, v, q, lengths, causal=causal, scale=scale, out=out, lse=lse),
            lambda ops, d: int8.int8_attention_kernel(ops.q.shape[3], d, int8.default_config())[0]),
    }


def sampled_blocks(n):
    blocks = n // 128
    return sorted({0, blocks // 2, blocks - 1})


def f16_terms(target, count):
    """``count`` f16 arrays (as float64) summing to ``target`` exactly (a multiple of 2^-24 per element,
    as sums and differences of f16 values are): greedy, each term the residual rounded to f16."""
    terms, residual = [], np.asarray(target, dtype=np.float64)
    for _ in range(count):
        term = round_input(np.clip(residual, -F16_MAX, F16_MAX), "fp16")
        terms.append(term)
        residual = residual - term
    if np.any(residual != 0):
        raise ValueError(f"cannot write the smoothing correction as {count} f16 keys (left {np.abs(residual).max()})")
    return terms


def mirror_inputs(fmt, qs, ks, vs, k_all):
    """The sampled block's q, k, v as `emulate` / `error_bound` must see them to mirror the kernel.

    Only formats that smooth K (subtract its mean over the valid keys) and only a shorter key slice
    than the kernel's (causal) need anything: then `EXTRA_KEYS` f16 keys are appended whose sum makes
    the slice's mean exactly the full keys' f16 mean (the float64 sum of f16 values is exact, and
    ``center · n / n`` is ``center``), with zero V, and as many zero Q rows after the block so that
    the bottom-right diagonal does not move: no row of the block sees an appended key. The appended
    keys are a K scale block of their own (the slice ends on a 128 boundary) and the zero rows a Q
    scale block of their own. The caller keeps the first ``qs.shape[2]`` rows of what it computes."""
    f = get_format(fmt)
    if not f.smooth_k or ks.shape[2] == k_all.shape[2]:
        return qs, ks, vs
    center = round_input(k_all.sum(axis=2, keepdims=True) / k_all.shape[2], f.input)  # operands()'s mean
    n = ks.shape[2] + EXTRA_KEYS
    extra = np.concatenate(f16_terms(center * n - ks.sum(axis=2, keepdims=True), EXTRA_KEYS), axis=2)
    pad_q = np.zeros((*qs.shape[:2], EXTRA_KEYS, qs.shape[3]))
    pad_v = np.zeros((*vs.shape[:2], EXTRA_KEYS, vs.shape[3]))
    return np.concatenate([qs, pad_q], axis=2), np.concatenate([ks, extra], axis=2), np.concatenate([vs, pad_v], axis=2)


def sampled_errors(fmt, q, k, v, o_got, o_f16, q16, k16, v16, causal, scale=None):
    """Max errors of the format's O (vs emulate, vs float64, each also over error_bound) and of the fp16 O
    (vs float64 of the fp16 inputs) on the sampled Q blocks; q, k, v float64 of the format's inputs."""
    worst = {"vs_emulate": 0.0, "vs_f64": 0.0, "vs_emulate_over_bound": 0.0,
             "vs_f64_over_bound": 0.0, "emulate_vs_f64_over_bound": 0.0, "f16_vs_f64": 0.0}
    for h in SAMPLED_HEADS:
        for blk in sampled_blocks(q.shape[2]):
            rows = slice(128 * blk, 128 * blk + 128)
            keys = slice(0, rows.stop if causal else k.shape[2])
            qs, ks, vs = q[:, h:h + 1, rows], k[:, h:h + 1, keys], v[:, h:h + 1, keys]
            qm, km, vm = mirror_inputs(fmt, qs, ks, vs, k[:, h:h + 1])
            mirror = emulate(qm, km, vm, fmt, causal=causal, scale=scale)[0][:, :, :128]
            bound = error_bound(qm, km, vm, fmt, causal=causal, scale=scale)[:, :, :128]
            oracle, _ = attention_ref(qs, ks, vs, causal=causal, scale=scale)
            got = o_got[:, h:h + 1, rows]
            oracle16, _ = attention_ref(q16[:, h:h + 1, rows], k16[:, h:h + 1, keys], v16[:, h:h + 1, keys],
                                        causal=causal, scale=scale)
            for name, value in (("vs_emulate", np.abs(got - mirror).max()), ("vs_f64", np.abs(got - oracle).max()),
                                ("vs_emulate_over_bound", (np.abs(got - mirror) / bound).max()),
                                ("vs_f64_over_bound", (np.abs(got - oracle) / bound).max()),
                                ("emulate_vs_f64_over_bound", (np.abs(mirror - oracle) / bound).max()),
                                ("f16_vs_f64", np.abs(o_f16[:, h:h + 1, rows] - oracle16).max())):
                worst[name] = max(worst[name], float(value))
    return worst


def check_case(fmt, device, d, causal, lengths, half, bf16):
    """One (format, d, causal): correctness on NaN-poisoned outputs and sampled blocks, then the timings."""
    from nkattn.cuda_kernels.exact_tc import tc_attention
    from nkattn.timing import attention_flops, cuda_time_ms

    kern = kernels()[fmt]
    (q16, k16, v16), (bits16, host_16) = half
    bits_in, host_in = {"bf16": bf16, "fp16": (bits16, host_16)}[kern.input]
    scale = d ** -0.5
    out = cuda.to_device(np.full((B, H, N, d), kern.out_nan, np.uint16))
    lse = cuda.to_device(np.full((B, H, N), np.nan, np.float32))
    ops = kern.quantize(*bits_in, lengths, scale)
    kern.attend(ops, *bits_in, lengths, causal, scale, d, out, lse)
    o_got = out.copy_to_host().view(kern.out_dtype).astype(np.float64)
    lse_got = lse.copy_to_host()
    out16 = cuda.to_device(np.full((B, H, N, d), F16_NAN, np.uint16))
    lse16 = cuda.device_array((B, H, N), np.float32)
    tc_attention(*bits16, lengths, causal=causal, scale=scale, kind="f16", out=out16, lse=lse16)
    o_f16 = out16.copy_to_host().view(np.float16).astype(np.float64)
    rec = {"format": fmt, "device": device, "B": B, "H": H, "N": N, "d": d, "causal": causal,
           "all_written": bool(not np.isnan(o_got).any() and not np.isnan(lse_got).any()),
           **sampled_errors(fmt, *host_in, o_got, o_f16, *host_16, causal, scale)}

    flops = attention_flops(B, H, N, N, d, causal)

    def tflops(fn):
        return flops / cuda_time_ms(fn, **TIMING)["median_ms"] / 1e9

    rec["attention_tflops"] = tflops(lambda: kern.attend(ops, *bits_in, lengths, causal, scale, d, out, lse))
    rec["with_quantize_tflops"] = tflops(lambda: kern.attend(
        kern.quantize(*bits_in, lengths, scale), *bits_in, lengths, causal, scale, d, out, lse))
    rec["f16_tflops"] = tflops(lambda: tc_attention(*bits16, lengths, causal=causal, scale=scale, kind="f16",
                                                    out=out16, lse=lse16))
    for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
        with sdpa_kernel(backend):
            rec[f"sdpa_{name}_f16_tflops"] = tflops(
                lambda: torch.nn.functional.scaled_dot_product_attention(q16, k16, v16, is_causal=causal))
    for other in ("f16", "sdpa_flash_f16", "sdpa_cudnn_f16"):
        rec[f"over_{other}"] = rec["attention_tflops"] / rec[f"{other}_tflops"]
    kernel = kern.compiled(ops, d)
    rec["registers"] = list(kernel.get_regs_per_thread().values())
    rec["local_bytes_per_thread"] = list(kernel.get_local_mem_per_thread().values())
    return rec


def line(rec, label):
    """The printed line of a record (the FP8-only version's, its "fp8" the format's label)."""
    return (f"d={rec['d']:3d} causal={rec['causal']!s:5}: {label} {rec['attention_tflops']:6.1f} (with quantize "
            f"{rec['with_quantize_tflops']:6.1f}) f16 {rec['f16_tflops']:6.1f} flash "
            f"{rec['sdpa_flash_f16_tflops']:6.1f} cudnn {rec['sdpa_cudnn_f16_tflops']:6.1f} TFLOP/s; {label}/f16 "
            f"{rec['over_f16']:.2f} /flash {rec['over_sdpa_flash_f16']:.2f} /cudnn "
            f"{rec['over_sdpa_cudnn_f16']:.2f} | max err {label}-emulate {rec['vs_emulate']:.2e} "
            f"({rec['vs_emulate_over_bound']:.2f} of bound) {label}-f64 {rec['vs_f64']:.2e} "
            f"({rec['vs_f64_over_bound']:.2f} of bound; emulate {rec['emulate_vs_f64_over_bound']:.2f}) "
            f"f16-f64 {rec['f16_vs_f64']:.2e} | all written {rec['all_written']} | registers "
            f"{rec['registers']} local {rec['local_bytes_per_thread']}")


def main():
    from nkattn.timing import device_name

    table = kernels()
    unknown = [f for f in CHECK_FORMATS if f not in table]
    if unknown or not CHECK_FORMATS:
        raise SystemExit(f"CHECK_FORMATS={','.join(CHECK_FORMATS)}: choose among {', '.join(table)}")
    device = device_name()
    print(device, flush=True)
    lengths = cuda.to_device(np.full(B, N, np.int32))
    for fmt in CHECK_FORMATS:
        if len(CHECK_FORMATS) > 1:
            print(f"format {fmt}", flush=True)
        records = []
        torch.manual_seed(0)  # the same inputs for every format (and the FP8-only version's)
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
                rec = check_case(fmt, device, d, causal, lengths, half, bf16)
                records.append(rec)
                print(line(rec, table[fmt].label), flush=True)
        with open(os.path.join(OUT, f"{fmt}_check.json"), "w") as f:
            json.dump(records, f, indent=1)


if __name__ == "__main__":
    main()
