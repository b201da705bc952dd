"""Benchmark: the exact kernels (FFMA float32, wgmma tensor-core) beside torch SDPA on one GPU.

Question: how fast are nkattn's exact kernels against the peers a user would
otherwise call, at the same input precision: the float16/bfloat16 wgmma kernel
against torch SDPA's flash (FlashAttention-2), cuDNN and memory-efficient backends;
the float32 kernels (FFMA; 3xTF32 and TF32 on the tensor cores) against SDPA's fp32
memory-efficient and math backends; and does memory stay O(N)?

Data: random normal q, k, v (never zeros), B = 1, H = 8. FFMA float32: N in {1K, 4K,
16K, 64K}, d in {64, 128}, causal and not, plus N = 1M, d = 64, H = 1 for memory.
Tensor cores (`TC_CONFIGS`): float16 at N in {4K, 16K} x d in {64, 128, 256} and
N in {64K, 128K} at d = 128; bfloat16 at N = 16K x d in {64, 128}; 3xTF32 and TF32 at
N = 16K, d = 64; causal and not. Energy: joules per call from NVML over
>= 10 s of back-to-back calls at N = 16K, d = 128, float16, for ours, flash and cuDNN.

Method: CUDA events around each call after warm-up, median of >= 20 runs (3 at
N = 1M, where one call takes seconds); TFLOP/s = 4·B·H·Nq·Nk·d / time, halved
for causal; peak device memory from torch's allocator (inputs and outputs are
torch tensors, the kernel allocates nothing else) and from the driver's free
memory. Every output is poisoned with NaN first and checked fully written, and
sampled rows are compared with the float64 reference.

Results: results/bench/exact-<device>.json, one record per (impl, dtype, shape);
figures exact_throughput and exact_memory in figures/bench/ (`exact_bench_plots`).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from tqdm import tqdm

from nkattn.reference.exact import attention_ref
from nkattn.results import RESULTS_DIR, make_meta, write_results
from nkattn.studies._common import peak_device_bytes
from nkattn.testing import relative_error
from nkattn.timing import attention_flops, cuda_time_ms, device_name, device_slug

SEQ_LENS = (1024, 4096, 16384, 65536)
HEAD_DIMS = (64, 128)
# every (kind, d) is a compilation (20-60 s for d = 256 and for 3xTF32 at d = 128), so the grid
# keeps one run under the device tool's 10 minutes
TC_CONFIGS = (
    [("f16", n, d) for n in (4096, 16384) for d in (64, 128, 256)] + [("f16", 65536, 128), ("f16", 131072, 128)]
    + [("bf16", 16384, d) for d in (64, 128)]
    + [(kind, 16384, 64) for kind in ("tf32x3", "tf32")]
)
ENERGY_SECONDS = 10.0
LONG_N = 1 << 20
CHECK_ROWS = 8
MATH_BACKEND_MAX_SCORE_BYTES = 40e9  # the math backend materialises B·H·N² scores


def _record(impl, dtype, batch, heads, n, d, causal, timing, peak_bytes, **extra):
    tflops = attention_flops(batch, heads, n, n, d, causal) / (timing["median_ms"] * 1e-3) / 1e12
    return {
        "impl": impl,
        "dtype": dtype,
        "B": batch,
        "H": heads,
        "N": n,
        "d": d,
        "causal": causal,
        "median_ms": timing["median_ms"],
        "min_ms": timing["min_ms"],
        "p90_ms": timing["p90_ms"],
        "repeats": timing["repeats"],
        "tflops": tflops,
        "peak_bytes": peak_bytes,
        **extra,
    }


def _check_rows(torch, q, k, v, out, causal, rows):
    """max relative error of sampled rows against the float64 oracle; NaN means unwritten."""
    if torch.isnan(out).any().item():
        raise AssertionError("output has NaN: some element was not written")
    n = q.shape[2]
    idx = np.linspace(0, n - 1, rows).astype(int)
    qh = q[:, :, idx].double().cpu().numpy()
    kh, vh = k.double().cpu().numpy(), v.double().cpu().numpy()
    ref_rows = []
    for r, i in enumerate(idx):
        # a single query row i of a causal problem sees keys [0, i]
        o_ref, _ = attention_ref(qh[:, :, r : r + 1], kh[:, :, : i + 1] if causal else kh, vh[:, :, : i + 1] if causal else vh)
        ref_rows.append(o_ref)
    ref = np.concatenate(ref_rows, axis=2)
    got = out[:, :, idx].double().cpu().numpy()
    return relative_error(got, ref)


def _run_nkattn(torch, cuda, q, k, v, causal):
    from nkattn.cuda_kernels.exact import exact_attention

    batch, heads, n, d = q.shape
    out = torch.full_like(q, float("nan"))
    lse = torch.full((batch, heads, n), float("nan"), dtype=q.dtype, device=q.device)
    qd, kd, vd, od, ld = (cuda.as_cuda_array(t) for t in (q, k, v, out, lse))
    lengths = cuda.to_device(np.full(batch, n, dtype=np.int32))
    scale = 1.0 / math.sqrt(d)

    def call():
        exact_attention(qd, kd, vd, lengths, causal=causal, scale=scale, out=od, lse=ld)

    return out, call


def _nbytes(*tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


def _peak_bytes(fn, resident):
    """Peak device memory of one call: its resident inputs/outputs plus what it allocates.

    Returns (peak bytes from torch's allocator, driver-level used-memory growth).
    """
    torch_extra, driver_extra = peak_device_bytes(fn)
    return _nbytes(*resident) + torch_extra, driver_extra


def run(*, quick: bool = False, results_dir: Path = RESULTS_DIR, repeats: int = 20, seq_lens=None, long_sequence=None) -> list[Path]:
    import torch
    import torch.nn.functional as F
    from numba import cuda
    from numba.core import config
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if config.ENABLE_CUDASIM or not cuda.is_available():
        raise RuntimeError("the benchmark needs a CUDA GPU (the simulator is on or no GPU was found)")
    name = device_name()
    if seq_lens is None:
        seq_lens = (1024, 4096) if quick else SEQ_LENS
    partial = quick or tuple(seq_lens) != SEQ_LENS
    long_sequence = not partial if long_sequence is None else long_sequence
    records = []
    gen = torch.Generator(device="cuda").manual_seed(0)
    configs = [(n, d, c) for n in seq_lens for d in HEAD_DIMS for c in (False, True)]
    for n, d, causal in tqdm(configs, desc="exact bench"):
        batch, heads = 1, 8
        shape = (batch, heads, n, d)
        q, k, v = (torch.randn(shape, device="cuda", generator=gen, dtype=torch.float32) for _ in range(3))
        out, call = _run_nkattn(torch, cuda, q, k, v, causal)
        peak_total, _ = _peak_bytes(call, (q, k, v, out))
        peak_total += batch * heads * n * 4  # lse
        err = _check_rows(torch, q, k, v, out, causal, CHECK_ROWS)
        timing = cuda_time_ms(call, repeats=repeats)
        records.append(_record("nkattn-exact", "float32", batch, heads, n, d, causal, timing, peak_total, max_rel_err_sampled=err))
        del out

        peers = [("torch-sdpa-efficient", SDPBackend.EFFICIENT_ATTENTION, torch.float32)]
        if batch * heads * n * n * 4 <= MATH_BACKEND_MAX_SCORE_BYTES:
            peers.append(("torch-sdpa-math", SDPBackend.MATH, torch.float32))
        else:
            records.append({"impl": "torch-sdpa-math", "dtype": "float32", "B": batch, "H": heads, "N": n, "d": d, "causal": causal,
                            "skipped": f"not run: its B·H·N² float32 scores ({batch * heads * n * n * 4 / 1e9:.0f} GB) exceed {MATH_BACKEND_MAX_SCORE_BYTES / 1e9:.0f} GB"})
        peers += [("torch-sdpa-flash", SDPBackend.FLASH_ATTENTION, torch.float16), ("torch-sdpa-cudnn", SDPBackend.CUDNN_ATTENTION, torch.float16)]
        for impl, backend, tdtype in peers:
            qt, kt, vt = (x.to(tdtype) for x in (q, k, v))

            def peer_call(qt=qt, kt=kt, vt=vt, backend=backend):
                with sdpa_kernel(backend):
                    return F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)

            try:
                peak_total, _ = _peak_bytes(peer_call, (qt, kt, vt))
                timing = cuda_time_ms(peer_call, repeats=repeats)
            except (RuntimeError, torch.OutOfMemoryError) as exc:
                records.append({"impl": impl, "dtype": str(tdtype).removeprefix("torch."), "B": batch, "H": heads, "N": n, "d": d, "causal": causal, "skipped": str(exc).splitlines()[0][:200]})
                continue
            # error against float64 attention of the float32 inputs (for fp16 peers it includes rounding the inputs)
            err = _check_rows(torch, q, k, v, peer_call().float(), causal, CHECK_ROWS)
            records.append(_record(impl, str(tdtype).removeprefix("torch."), batch, heads, n, d, causal, timing, peak_total,
                                   max_rel_err_sampled=err))
            del qt, kt, vt
        del q, k, v
        torch.cuda.empty_cache()

    path = Path(results_dir) / "bench" / f"exact-{device_slug(name)}{'-partial' if partial else ''}.json"
    meta = make_meta(
        device=name,
        config={"seq_lens": list(seq_lens), "head_dims": list(HEAD_DIMS), "B": 1, "H": 8, "repeats": repeats, "long_N": LONG_N,
                "tensor_core_configs": [list(c) for c in TC_CONFIGS], "energy_seconds": ENERGY_SECONDS, "quick": quick},
        command="nkattn bench exact" + (" --quick" if quick else ""),
    )
    # written after every part, so that a run cut short keeps what it measured
    write_results(path, meta, records)
    records += _tensor_core_rows(torch, cuda, quick=quick, repeats=repeats)
    write_results(path, meta, records)
    if not quick:
        records += _energy_rows(torch, cuda)
    if long_sequence:
        records.append(_long_sequence(torch, cuda))
    return [write_results(path, meta, records)]


TORCH_DTYPE = {"f16": "float16", "bf16": "bfloat16", "tf32x3": "float32", "tf32": "float32"}


def _tensor_core_call(torch, cuda, q, k, v, causal, kind):
    """The wgmma kernel on torch tensors (outputs poisoned with NaN), as `_run_nkattn`."""
    from nkattn import arrays
    from nkattn.cuda_kernels.exact_tc import tc_attention

    batch, heads, n, d = q.shape
    dtype = np.dtype(arrays.dtype_of(q, "q"))
    out = torch.full_like(q, float("nan"))
    lse = torch.full((batch, heads, n), float("nan"), dtype=torch.float32, device=q.device)
    qd, kd, vd = (arrays.kernel_view(t, dtype) for t in (q, k, v))
    od = arrays.bits_view(out, dtype)
    ld = cuda.as_cuda_array(lse)
    lengths = cuda.to_device(np.full(batch, n, dtype=np.int32))
    scale = 1.0 / math.sqrt(d)

    def call():
        tc_attention(qd, kd, vd, lengths, causal=causal, scale=scale, kind=kind, out=od, lse=ld)

    return out, call


def _sdpa_call(torch, q, k, v, causal, backend, allow_tf32=False):
    import torch.nn.functional as F
    from torch.nn.attention import sdpa_kernel

    def call():
        with sdpa_kernel(backend):
            torch.backends.cuda.matmul.allow_tf32 = allow_tf32
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    return call


def _tensor_core_rows(torch, cuda, *, quick, repeats):
    """The wgmma kernel and SDPA's backends at the same input dtype, with sampled accuracy."""
    from torch.nn.attention import SDPBackend

    records = []
    gen = torch.Generator(device="cuda").manual_seed(2)
    configs = [c for c in TC_CONFIGS if not quick or c[1] <= 4096]
    for kind, n, d in tqdm(configs, desc="tensor-core bench"):
        tdtype = getattr(torch, TORCH_DTYPE[kind])
        for causal in (False, True):
            batch, heads = 1, 8
            q, k, v = (torch.randn((batch, heads, n, d), device="cuda", generator=gen).to(tdtype) for _ in range(3))
            reps = repeats if n <= 16384 else max(5, repeats // 4)
            out, call = _tensor_core_call(torch, cuda, q, k, v, causal, kind)
            peak, _ = _peak_bytes(call, (q, k, v, out))
            err = _check_rows(torch, q, k, v, out, causal, CHECK_ROWS)
            records.append(_record("nkattn-tc", TORCH_DTYPE[kind], batch, heads, n, d, causal, cuda_time_ms(call, repeats=reps),
                                   peak + batch * heads * n * 4, precision=kind, max_rel_err_sampled=err))
            del out
            if kind in ("f16", "bf16"):
                peers = [("torch-sdpa-flash", SDPBackend.FLASH_ATTENTION, False),
                         ("torch-sdpa-cudnn", SDPBackend.CUDNN_ATTENTION, False),
                         ("torch-sdpa-efficient", SDPBackend.EFFICIENT_ATTENTION, False)]
            else:
                peers = [("torch-sdpa-efficient", SDPBackend.EFFICIENT_ATTENTION, kind == "tf32")]
            for impl, backend, tf32 in peers:
                peer = _sdpa_call(torch, q, k, v, causal, backend, allow_tf32=tf32)
                try:
                    peak, _ = _peak_bytes(peer, (q, k, v))
                    timing = cuda_time_ms(peer, repeats=reps)
                    err = _check_rows(torch, q, k, v, peer(), causal, CHECK_ROWS)
                except (RuntimeError, torch.OutOfMemoryError) as exc:
                    records.append({"impl": impl, "dtype": TORCH_DTYPE[kind], "B": batch, "H": heads, "N": n, "d": d,
                                    "causal": causal, "skipped": str(exc).splitlines()[0][:200]})
                    continue
                records.append(_record(impl, TORCH_DTYPE[kind], batch, heads, n, d, causal, timing, peak,
                                       precision="tf32" if tf32 else ("fp32" if kind in ("tf32x3",) else kind),
                                       max_rel_err_sampled=err))
            torch.backends.cuda.matmul.allow_tf32 = False
            del q, k, v
            torch.cuda.empty_cache()
    return records


def _energy_rows(torch, cuda, n=16384, d=128):
    """Joules per call (NVML's energy counter) over >= ENERGY_SECONDS of back-to-back calls."""
    import time

    import pynvml
    from torch.nn.attention import SDPBackend

    pynvml.nvmlInit()
    handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
    gen = torch.Generator(device="cuda").manual_seed(3)
    q, k, v = (torch.randn((1, 8, n, d), device="cuda", generator=gen).half() for _ in range(3))
    calls = {"nkattn-tc": _tensor_core_call(torch, cuda, q, k, v, False, "f16")[1],
             "torch-sdpa-flash": _sdpa_call(torch, q, k, v, False, SDPBackend.FLASH_ATTENTION),
             "torch-sdpa-cudnn": _sdpa_call(torch, q, k, v, False, SDPBackend.CUDNN_ATTENTION)}
    records = []
    for impl, call in calls.items():
        for _ in range(3):
            call()
        torch.cuda.synchronize()
        start_mj = pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)
        start, count = time.perf_counter(), 0
        while time.perf_counter() - start < ENERGY_SECONDS:
            for _ in range(20):
                call()
            count += 20
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        joules = (pynvml.nvmlDeviceGetTotalEnergyConsumption(handle) - start_mj) / 1e3
        tokens = 8 * n * count  # query rows (B·H·N) processed
        records.append({"impl": impl, "dtype": "float16", "B": 1, "H": 8, "N": n, "d": d, "causal": False,
                        "energy_calls": count, "energy_seconds": seconds, "joules_per_call": joules / count,
                        "tokens_per_joule": tokens / joules, "mean_watts": joules / seconds})
    return records


def _long_sequence(torch, cuda):
    """N = 1M, d = 64, H = 1, float32: peak device memory against Q+K+V+O+lse."""
    n, d = LONG_N, 64
    gen = torch.Generator(device="cuda").manual_seed(1)
    torch.cuda.empty_cache()
    q, k, v = (torch.randn((1, 1, n, d), device="cuda", generator=gen) for _ in range(3))
    out, call = _run_nkattn(torch, cuda, q, k, v, False)
    io_bytes = _nbytes(q, k, v, out) + n * 4  # Q + K + V + O + lse
    peak, driver_delta = _peak_bytes(call, (q, k, v, out))
    peak += n * 4
    err = _check_rows(torch, q, k, v, out, False, 4)
    timing = cuda_time_ms(call, warmup=1, repeats=3)
    return _record(
        "nkattn-exact", "float32", 1, 1, n, d, False, timing, peak,
        io_bytes=io_bytes, peak_over_io=peak / io_bytes, driver_used_delta=driver_delta, max_rel_err_sampled=err,
    )
