"""Tiling sweep for the float32 exact kernel (which register/shared-memory blocking is fastest).

Question: the kernel's thread layout (TY x TX threads, TM x TN scores per thread)
trades shared-memory loads per FMA against registers and occupancy. Which layout
is fastest on this GPU for d = 64 and d = 128?

Data: random normal q, k, v, B = 1, H = 8, N = 16384, non-causal, float32.
Method: CUDA events, median of 10 runs after warm-up; sampled rows checked against
the float64 oracle. Results: results/bench/exact-tune-<device>.json, read by hand
to choose the float32 orders in `nkattn.reference.exact.streaming_order`.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from nkattn.reference.exact import StreamingOrder, attention_ref
from nkattn.results import RESULTS_DIR, make_meta, write_results
from nkattn.testing import relative_error
from nkattn.timing import attention_flops, cuda_time_ms, device_name, device_slug

LAYOUTS = {
    "16x16 thr, 4x4": (16, 16, 4, 4),
    "16x16 thr, 8x4": (16, 16, 8, 4),
    "8x16 thr, 4x4": (8, 16, 4, 4),
    "16x8 thr, 4x4": (16, 8, 4, 4),
}
# (layout, prefetch next tile into registers, register cap); every candidate is
# timed twice, in two passes, so the spread between passes shows the noise
CANDIDATES = {
    f"{name}{', prefetch' if prefetch else ''}{f', regs<={regs}' if regs else ''}": (layout, prefetch, regs)
    for name, layout in LAYOUTS.items()
    for prefetch, regs in ((False, None), (False, 128), (True, None))
}
PASSES = 2


def run(*, quick: bool = False, results_dir: Path = RESULTS_DIR) -> list[Path]:
    from numba import cuda

    from nkattn.cuda_kernels.exact import exact_attention

    n = 4096 if quick else 16384
    batch, heads = 1, 8
    records = []
    rng = np.random.default_rng(0)
    for d in (64, 128):
        q, k, v = (rng.standard_normal((batch, heads, n, d)).astype(np.float32) for _ in range(3))
        qd, kd, vd = (cuda.to_device(x) for x in (q, k, v))
        lengths = cuda.to_device(np.full(batch, n, dtype=np.int32))
        rows = np.linspace(0, n - 1, 8).astype(int)
        o_ref, _ = attention_ref(q[:, :, rows], k, v)
        for pass_, (name, (layout, prefetch, regs)) in ((p, c) for p in range(PASSES) for c in CANDIDATES.items()):
            order = StreamingOrder(*layout)
            variant = dict(order=order, prefetch=prefetch, max_registers=regs)  # regs None: no cap
            out = cuda.to_device(np.full(q.shape, np.nan, dtype=np.float32))
            lse = cuda.device_array(q.shape[:3], dtype=np.float32)

            def call(variant=variant, out=out, lse=lse):
                exact_attention(qd, kd, vd, lengths, causal=False, scale=1 / math.sqrt(d), out=out, lse=lse, **variant)

            try:
                call()
            except Exception as exc:  # a layout the device cannot launch is a result too
                records.append({"variant": name, "pass": pass_, "layout": layout, "prefetch": prefetch, "max_registers": regs, "d": d, "N": n, "error": str(exc)[:200]})
                continue
            got = out.copy_to_host()
            err = relative_error(got[:, :, rows], o_ref)
            timing = cuda_time_ms(call, repeats=10)
            tflops = attention_flops(batch, heads, n, n, d, False) / (timing["median_ms"] * 1e-3) / 1e12
            records.append({
                "variant": name, "pass": pass_, "layout": layout, "prefetch": prefetch, "max_registers": regs, "d": d, "N": n, "B": batch, "H": heads, **timing, "tflops": tflops,
                "all_written": bool(not np.isnan(got).any()), "max_rel_err_sampled": err,
            })
            print(f"d={d:4d} pass {pass_} {name:38s} {timing['median_ms']:8.2f} ms {tflops:6.1f} TFLOP/s err {err:.1e}")
    name = device_name()
    meta = make_meta(device=name, config={"N": n, "B": batch, "H": heads, "candidates": {k: list(v) for k, v in CANDIDATES.items()},
                                          "quick": quick},
                     command="nkattn study exact-tune" + (" --quick" if quick else ""))
    # a quick run must not overwrite the full sweep's file (nor match the exact bench's "exact-*-partial.json")
    path = Path(results_dir) / "bench" / f"exact-tune-{device_slug(name)}{'-quick' if quick else ''}.json"
    return [write_results(path, meta, records)]

