"""The wgmma half kernel's schedules side by side at one head dim, beside torch's FlashAttention-2 and
cuDNN backends in the same process: fp16 (or bf16, KIND=bf16), B = 1, H = 8, N and d from argv, causal and not; TFLOP/s
from the median of 10 timed calls after 3 warm-up, outputs preallocated and NaN-filled (so
"written" checks every element), and whether each schedule's O and lse equal the first schedule's
of the same key tile bit for bit (a different key tile sums in another order). One line per case,
and a JSON record under $OUT (or results/bench/) with device, versions, date and configurations.

    python3 .ci/tc_schedule_timing.py N D [NAME ...]     # names from SCHEDULES; all when none
    KIND=bf16 python3 .ci/tc_schedule_timing.py ...      # bfloat16 inputs (default f16)

results/bench/tc-schedules-h200-n16384-d128.json and -d64.json came from this on an H200 (2026-11-28,
the kernels of the commit that added the producer warpgroup), the d = 128 run first on the same GPU,
while the machine's other GPU ran tests.
"""
import datetime
import json
import os
import sys
from functools import partial

SCHEDULES = {
    "pingpong-tma": "TileConfig(128, 128, pingpong=True, tma=True)",
    "producer": "TileConfig(128, 128, pingpong=True, tma=True, producer=True)",
    "3wg-tma": "TileConfig(192, 128, pingpong=True, tma=True)",
    "3wg-producer": "TileConfig(192, 128, pingpong=True, tma=True, producer=True)",
    "3wg-producer-bn96": "TileConfig(192, 96, pingpong=True, tma=True, producer=True)",
    "3wg-producer-bn112": "TileConfig(192, 112, pingpong=True, tma=True, producer=True)",
    "2-blocks-bn64": "TileConfig(128, 64, pingpong=True, blocks_per_sm=2, tma=True)",
    "producer-bn64": "TileConfig(128, 64, pingpong=True, tma=True, producer=True)",
    "producer-overlap": "TileConfig(128, 128, pingpong=True, tma=True, producer=True, overlap=True)",
    "3wg-overlap": "TileConfig(192, 128, pingpong=True, tma=True, overlap=True)",
    "3wg-producer-overlap": "TileConfig(192, 128, pingpong=True, tma=True, producer=True, overlap=True)",
}


def main():
    import numba
    import numba_cuda
    import numpy as np
    import torch
    from numba import cuda
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from nkattn.cuda_kernels.exact_tc import TileConfig, tc_attention  # noqa: F401
    from nkattn.timing import attention_flops, cuda_time_ms

    B, H = 1, 8
    N, D = int(sys.argv[1]), int(sys.argv[2])
    kind = os.environ.get("KIND", "f16")
    dtype = {"f16": torch.float16, "bf16": torch.bfloat16}[kind]
    names = sys.argv[3:] or list(SCHEDULES)
    torch.manual_seed(0)
    device = torch.cuda.get_device_name()
    print(device, flush=True)
    q, k, v = (torch.randn(B, H, N, D, device="cuda", dtype=dtype) for _ in range(3))
    qa, ka, va = (cuda.as_cuda_array(x.view(torch.int16)) for x in (q, k, v))
    lengths = cuda.to_device(np.full(B, N, np.int32))
    records = []
    for causal in (False, True):
        flops = attention_flops(B, H, N, N, D, causal)
        row, outs = {}, {}
        for name in names:
            config = eval(SCHEDULES[name])
            o, lse = torch.full_like(q, float("nan")), torch.full((B, H, N), float("nan"), device="cuda")
            od, ld = cuda.as_cuda_array(o.view(torch.int16)), cuda.as_cuda_array(lse)
            call = partial(tc_attention, qa, ka, va, lengths, causal=causal, scale=D ** -0.5, kind=kind, out=od,
                           lse=ld, config=config)
            row[name] = flops / cuda_time_ms(call, warmup=3, repeats=10)["median_ms"] / 1e9
            outs[name] = (config.block_n, o, lse)
        for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
            with sdpa_kernel(backend):
                call = partial(torch.nn.functional.scaled_dot_product_attention, q, k, v, is_causal=causal)
                row[name] = flops / cuda_time_ms(call, warmup=3, repeats=10)["median_ms"] / 1e9
        first = {}
        equal = {}
        for name, (block_n, o, lse) in outs.items():
            if block_n in first:
                o0, lse0 = first[block_n]
                equal[name] = bool(torch.equal(o.view(torch.int16), o0.view(torch.int16))
                                   and torch.equal(lse.view(torch.int32), lse0.view(torch.int32)))
            else:
                first[block_n] = (o, lse)
                equal[name] = True
        written = {name: not (bool(torch.isnan(o).any()) or bool(torch.isnan(lse).any()))
                   for name, (_, o, lse) in outs.items()}
        records.append({"d": D, "causal": causal, "tflops": row, "bits_equal_first_of_tile": equal,
                        "all_written": written})
        for name in names:
            print(f"d={D:3d} causal={causal!s:5} {name:18s} {row[name]:6.1f} TFLOP/s  /cudnn {row[name] / row['cudnn']:.2f}"
                  f"  /flash {row[name] / row['flash']:.2f}  bits {equal[name]}  written {written[name]}", flush=True)
        print(f"d={D:3d} causal={causal!s:5} flash {row['flash']:6.1f} cudnn {row['cudnn']:6.1f}", flush=True)
    meta = {"device": device, "date": datetime.date.today().isoformat(), "numba": numba.__version__,
            "numba_cuda": numba_cuda.__version__, "torch": torch.__version__, "B": B, "H": H, "N": N, "d": D,
            "dtype": str(dtype).removeprefix("torch."), "configs": {name: SCHEDULES[name] for name in names},
            "timing": "CUDA events, median of 10 after 3 warm-up"}
    out_dir = os.environ.get("OUT") or "results/bench"
    slug = "h200" if "H200" in device else "h100" if "H100" in device else "gpu"
    suffix = "" if kind == "f16" else f"-{kind}"
    with open(os.path.join(out_dir, f"tc-schedules-{slug}-n{N}-d{D}{suffix}.json"), "w") as f:
        json.dump({"meta": meta, "records": records}, f, indent=1)


if __name__ == "__main__":
    main()
