"""Benchmark: context-parallel exact attention (`nkattn.distributed`) on P GPUs against one.

Question: how close do the two strategies come to P times the speed of one GPU
(scaling efficiency T₁ / (P·T_P)), at bits equal to the one-GPU kernel's, and
beside PyTorch's own context parallelism (`context_parallel` with SDPA)?

Data: random normal q, k, v, B = 1, d = 64, H = 8 (H = 4 at N = 1M, where one float32
call on one GPU takes tens of seconds), float32 (the FFMA kernel) or, with ``dtype``,
float16/bfloat16 (the tensor-core kernel); N in {64K, 256K} (quick: 16K), causal and not;
P in {1, 2, 4, 8} up to the processes launched; at 1M and in the memory run H = 4, or P
when more GPUs are launched ("heads" needs H divisible by P).

Method: one process per GPU under torchrun (`nkattn bench distributed` launches it
over min(8, GPUs) when started without it); P ranks take part in a run, the others
wait at a barrier. T₁ is the one-GPU kernel (`exact_attention`, or `tc_attention` for the
half dtypes) on rank 0. A call is timed with CUDA events on every rank after a barrier;
its time is the slowest rank's; median of >= 20 calls (3 at N = 1M). ``bit_identical``:
every rank's O and lse gathered on rank 0 and compared, every element, with the one-GPU
result. ``peak_bytes``: per GPU, the largest over ranks of torch's allocator peak during
a call (O and lse are allocated by it) plus the shards of q, k and v (the first 4-GPU
run, results/bench/distributed-h200-float16.json, added the O and lse shards a second
time: README). The inputs are finite, so the calls pass check_finite=False (the check
is a pass over q, k and v that one GPU does not pay in T₁). Runs: README, "Several GPUs".

Results: results/bench/distributed-<device>.json (-<dtype> before .json for the half
dtypes; -partial for a run of chosen lengths or quick), one record per (impl, strategy, P, N,
causal): gpus, strategy, N, d, dtype, causal, median_ms, scaling_efficiency,
bit_identical, peak_bytes; written after every (N, causal), with ``meta.complete`` false
until the last, and each record printed as it lands. Rank 0 prints each stage as it starts
(kernel compilation on first use takes tens of seconds and would otherwise look like a hang).

Memory (``memory_n``, the issue's N = 4M on 4 GPUs): after the grid, one non-causal call of
each strategy at that N on every launched GPU ("sequence" also with ``query_passes=8``), no
warm-up beyond the grid's and no one-GPU reference (one GPU would take minutes): records
with ``peak_bytes`` against ``budget_bytes``,
the shards of q, k, v, O and lse plus the strategy's communication buffers (`comm_bytes`:
"sequence" its K/V slots; "heads" the send and receive buffers of its all-to-all of q, k
and v, whose receive side is the full-sequence q, k, v of its heads).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from nkattn.results import RESULTS_DIR, make_meta, write_results

SEQ_LENS = (65536, 262144)
QUICK_SEQ_LENS = (16384,)
LONG_N, LONG_HEADS = 1 << 20, 4
HEADS, HEAD_DIM = 8, 64
GPU_COUNTS = (1, 2, 4, 8)
DTYPES = ("float32", "float16", "bfloat16")
MAX_PROCESSES = 8
MEMORY_QUERY_PASSES = 8  # the memory run's second "sequence" call: an eighth of the carried state
_T0 = time.perf_counter()


def torchrun_command(*, gpus: int, quick: bool, results_dir, repeats: int | None, seq_lens, long_sequence,
                     dtype: str = "float32", memory_n: int | None = None) -> list[str]:
    """The command that reruns this bench under torchrun, one process per GPU (`main` parses it)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={gpus}",
           "-m", "nkattn.studies.distributed_bench", "--results-dir", str(results_dir)]
    if quick:
        cmd.append("--quick")
    if repeats is not None:
        cmd += ["--repeats", str(repeats)]
    if seq_lens is not None:
        cmd += ["--seq-lens", *map(str, seq_lens)]
    if long_sequence is not None:
        cmd.append("--long" if long_sequence else "--no-long")
    if dtype != "float32":
        cmd += ["--dtype", dtype]
    if memory_n is not None:
        cmd += ["--memory-n", str(memory_n)]
    return cmd


def main(argv=None) -> None:
    """Entry point of each torchrun process: `torchrun_command`'s options, as `nkattn bench` spells them."""
    import argparse

    parser = argparse.ArgumentParser(prog="nkattn.studies.distributed_bench")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--seq-lens", type=int, nargs="+", default=None)
    parser.add_argument("--long", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--dtype", choices=DTYPES, default="float32")
    parser.add_argument("--memory-n", type=int, default=None)
    args = parser.parse_args(argv)
    run(quick=args.quick, results_dir=args.results_dir, repeats=args.repeats, seq_lens=args.seq_lens,
        long_sequence=args.long, dtype=args.dtype, memory_n=args.memory_n)


def results_path(results_dir, device: str, partial: bool, dtype: str = "float32", world: int = 4) -> Path:
    """distributed-<device>[-x<world> past 4 GPUs][-<half dtype>][-partial].json"""
    from nkattn.timing import device_slug

    machine = device_slug(device) + (f"-x{world}" if world > 4 else "")
    name = f"distributed-{machine}{'' if dtype == 'float32' else '-' + dtype}{'-partial' if partial else ''}"
    return Path(results_dir) / "bench" / f"{name}.json"


def configs(*, quick: bool, seq_lens, long_sequence, long_heads: int = LONG_HEADS) -> list[tuple[int, int, bool]]:
    """(N, H, causal) in the order they run; N = 1M (H = `long_heads`) only with `long_sequence`
    (default: the full grid)."""
    lens = tuple(seq_lens) if seq_lens is not None else (QUICK_SEQ_LENS if quick else SEQ_LENS)
    long_sequence = (not quick and seq_lens is None) if long_sequence is None else long_sequence
    grid = [(n, HEADS, causal) for n in lens for causal in (False, True)]
    return grid + ([(LONG_N, long_heads, causal) for causal in (False, True)] if long_sequence else [])


def scaling_efficiency(t1_ms: float, gpus: int, tp_ms: float) -> float:
    """T₁ / (P·T_P): 1 is perfect scaling."""
    return t1_ms / (gpus * tp_ms)


def run(*, quick: bool = False, results_dir: Path = RESULTS_DIR, repeats: int | None = None, seq_lens=None,
        long_sequence=None, dtype: str = "float32", memory_n: int | None = None) -> list[Path]:
    import torch

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if memory_n is not None and (memory_n <= 0 or memory_n % (2 * MAX_PROCESSES * 128)):
        raise ValueError(f"memory_n must be a positive multiple of {2 * MAX_PROCESSES * 128} (zigzag chunks of whole "
                         f"key tiles on up to {MAX_PROCESSES} GPUs), got {memory_n}")
    if "RANK" not in os.environ:  # not under torchrun: launch it, rank 0 writes the file
        gpus = min(MAX_PROCESSES, torch.cuda.device_count())
        if gpus < 1:
            raise RuntimeError("the distributed bench needs CUDA GPUs")
        cmd = torchrun_command(gpus=gpus, quick=quick, results_dir=results_dir, repeats=repeats, seq_lens=seq_lens,
                               long_sequence=long_sequence, dtype=dtype, memory_n=memory_n)
        subprocess.run(cmd, check=True)
        return [results_path(results_dir, torch.cuda.get_device_name(), quick or seq_lens is not None, dtype, gpus)]
    return _run_rank(quick=quick, results_dir=results_dir, repeats=20 if repeats is None else repeats,
                     seq_lens=seq_lens, long_sequence=long_sequence, dtype=dtype, memory_n=memory_n)


def _run_rank(*, quick, results_dir, repeats, seq_lens, long_sequence, dtype, memory_n) -> list[Path]:
    import datetime

    import torch
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl", timeout=datetime.timedelta(minutes=10), device_id=torch.device("cuda", local_rank))
    rank, world = dist.get_rank(), dist.get_world_size()
    counts = [p for p in GPU_COUNTS if p <= world]
    groups = {p: dist.new_group(list(range(p))) for p in counts}  # every rank creates every group
    long_heads = max(LONG_HEADS, counts[-1])
    records = []
    name = torch.cuda.get_device_name()
    path = results_path(results_dir, name, quick or seq_lens is not None, dtype, world)
    meta = make_meta(device=name, command="nkattn bench distributed" + (" --quick" if quick else ""),
                     config={"gpus": counts, "world": world, "B": 1, "d": HEAD_DIM, "dtype": dtype,
                             "repeats": repeats, "quick": quick, "long_N": LONG_N, "long_H": long_heads,
                             "memory_N": memory_n, "memory_H": long_heads})
    grid = configs(quick=quick, seq_lens=seq_lens, long_sequence=long_sequence, long_heads=long_heads)
    stages = [(i, _one_config, (n, heads, causal, 3 if n >= LONG_N else repeats))
              for i, (n, heads, causal) in enumerate(grid)]
    if memory_n is not None:
        stages.append((len(grid), _memory_config, (memory_n, long_heads)))
    for i, stage, args in stages:
        new = stage(torch, dist, rank, groups, *args, dtype)
        records += new
        if rank == 0:  # after every configuration, so a run cut short keeps what it measured
            meta["complete"] = i == len(stages) - 1
            write_results(path, meta, records)
            for r in new:
                print(_progress_line(r), flush=True)
    dist.barrier()
    dist.destroy_process_group()
    return [path] if rank == 0 else []


def _progress_line(record: dict) -> str:
    """One record as the bench prints it while it runs."""
    if "skipped" in record:
        return f"{record['impl']} P={record['gpus']} N={record['N']} causal={record['causal']}: skipped ({record['skipped']})"
    passes = f" query_passes={record['query_passes']}" if record.get("query_passes", 1) > 1 else ""
    head = f"{record['impl']} {record['strategy']}{passes} P={record['gpus']} N={record['N']} causal={record['causal']}: "
    if "budget_bytes" in record:
        return head + (f"{record['ms']:.1f} ms (one call), peak {record['peak_bytes'] / 2**30:.2f} GiB = "
                       f"{record['peak_over_budget']:.3f} x budget {record['budget_bytes'] / 2**30:.2f} GiB")
    return (head + f"{record['median_ms']:.1f} ms, efficiency {record['scaling_efficiency']:.3f}"
            + (f", bit_identical {record['bit_identical']}" if "bit_identical" in record else ""))


def _stage(rank: int, what: str) -> None:
    """Rank 0 says what starts now, with the time since the bench module was loaded."""
    if rank == 0:
        print(f"[{time.perf_counter() - _T0:7.1f} s] {what}", flush=True)


def _timed(torch, dist, group, fn, repeats) -> float:
    """Median over calls of the slowest rank's CUDA-event time, in ms."""
    times = []
    for i in range(repeats + 2):
        dist.barrier(group)
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        slowest = torch.tensor([start.elapsed_time(stop)], device="cuda")
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX, group=group)
        if i >= 2:  # two warm-up calls (compilation, NCCL set-up)
            times.append(slowest.item())
    return float(np.median(times))


def _peak(torch, dist, group, fn, input_bytes) -> int:
    """Per GPU, the largest over ranks: torch's allocator peak during `fn` (O and lse are allocated
    there) plus the input shards allocated before it."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    peak = torch.tensor([torch.cuda.max_memory_allocated() - base + input_bytes], device="cuda")
    dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=group)
    return int(peak.item())


def _one_config(torch, dist, rank, groups, n, heads, causal, repeats, dtype) -> list[dict]:
    from numba import cuda

    from nkattn import arrays, distributed
    from nkattn.cuda_kernels.exact import exact_attention
    from nkattn.cuda_kernels.exact_tc import tc_attention

    gen = torch.Generator(device="cuda").manual_seed(n + causal)
    shape = (1, heads, n, HEAD_DIM)
    full = [torch.randn(shape, device="cuda", generator=gen).to(getattr(torch, dtype)) for _ in range(3)]
    scale = HEAD_DIM ** -0.5
    base = {"N": n, "H": heads, "d": HEAD_DIM, "dtype": dtype, "causal": causal}
    t1, reference = None, None
    _stage(rank, f"N={n} H={heads} causal={causal}: one GPU")
    if rank == 0:
        out, lse = torch.empty_like(full[0]), torch.empty(shape[:3], device="cuda")
        np_dtype = arrays.dtype_of(full[0], "q")
        views = [arrays.kernel_view(t, np_dtype) for t in full] + [arrays.bits_view(out, np_dtype), cuda.as_cuda_array(lse)]
        lengths = cuda.to_device(np.full(1, n, np.int32))

        def one_gpu():
            if dtype == "float32":
                exact_attention(*views[:3], lengths, causal=causal, scale=scale, out=views[3], lse=views[4])
            else:
                tc_attention(*views[:3], lengths, causal=causal, scale=scale, kind="f16" if dtype == "float16" else "bf16",
                             out=views[3], lse=views[4])

        t1 = _timed(torch, dist, groups[1], one_gpu, repeats)
        reference = (out, lse)
    t1 = _broadcast_float(torch, dist, t1)
    records = [{"impl": "nkattn-exact", "gpus": 1, "strategy": "one-gpu", **base, "median_ms": t1,
                "scaling_efficiency": 1.0, "bit_identical": True}]
    for p, group in groups.items():
        if rank >= p:
            dist.barrier()
            continue
        shards = [distributed.shard(t, rank, p, zigzag=causal) for t in full]
        inputs = sum(t.numel() * t.element_size() for t in shards)
        for strategy in distributed.STRATEGIES:
            _stage(rank, f"N={n} H={heads} causal={causal}: {strategy} on {p} GPUs")

            def call(strategy=strategy, shards=shards, group=group):
                return distributed.attention(*shards, group=group, strategy=strategy, causal=causal, return_lse=True,
                                             check_finite=False)

            tp = _timed(torch, dist, group, call, repeats)
            same = _same_bits(torch, dist, group, call(), reference, p, causal)
            slots = {"kv_slots": distributed.kv_slot_count(p, causal=causal)} if strategy == "sequence" else {}
            records.append({"impl": "nkattn-distributed", "gpus": p, "strategy": strategy, **base, **slots, "median_ms": tp,
                            "scaling_efficiency": scaling_efficiency(t1, p, tp), "bit_identical": same,
                            "peak_bytes": _peak(torch, dist, group, call, inputs)})
        _stage(rank, f"N={n} H={heads} causal={causal}: torch context_parallel on {p} GPUs")
        records.append(_torch_context_parallel(torch, dist, group, p, full, causal, repeats, t1, base, dtype))
        dist.barrier()
    return records


def _memory_config(torch, dist, rank, groups, n, heads, dtype) -> list[dict]:
    """One non-causal call of each strategy at N on every launched GPU: time and per-GPU peak
    memory against the shards plus the strategy's communication buffers (module docstring)."""
    from nkattn import distributed

    p = max(groups)
    group = groups[p]
    if rank >= p:
        dist.barrier()
        return []
    gen = torch.Generator(device="cuda").manual_seed(n + rank)
    shape = (1, heads, n // p, HEAD_DIM)  # this rank's shard only: the full inputs need not fit one GPU
    shards = [torch.randn(shape, device="cuda", generator=gen).to(getattr(torch, dtype)) for _ in range(3)]
    one = shards[0].numel() * shards[0].element_size()
    lse_bytes = shards[0][..., 0].numel() * 4
    resident = 4 * one + lse_bytes  # q, k, v and O shards, and lse
    slot_count = distributed.kv_slot_count(p, causal=False)
    comm = {"sequence": 2 * slot_count * one,  # slots of a K and a V chunk, a chunk being the shard (non-causal)
            "heads": 2 * 3 * one}  # q, k, v sent (stacked) and received (the full sequence of H/P heads)
    records = []
    # "sequence" once as it runs by default, once with the carried state in MEMORY_QUERY_PASSES passes
    runs = [("sequence", {}), ("sequence", {"query_passes": MEMORY_QUERY_PASSES}), ("heads", {})]
    for strategy, options in runs:
        _stage(rank, f"memory: N={n} H={heads} {strategy} {options or ''} on {p} GPUs (one call)")
        dist.barrier(group)
        start = time.perf_counter()
        peak = _peak(torch, dist, group, lambda strategy=strategy, options=options: distributed.attention(
            *shards, group=group, strategy=strategy, return_lse=True, check_finite=False, **options), 3 * one)
        slowest = torch.tensor([(time.perf_counter() - start) * 1e3], device="cuda")
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX, group=group)
        budget = resident + comm[strategy]
        slots = {"kv_slots": slot_count, "query_passes": options.get("query_passes", 1)} if strategy == "sequence" else {}
        records.append({"impl": "nkattn-distributed", "gpus": p, "strategy": strategy, "N": n, "H": heads, "d": HEAD_DIM,
                        "dtype": dtype, "causal": False, **slots, "ms": slowest.item(), "peak_bytes": peak,
                        "resident_bytes": resident, "comm_bytes": comm[strategy], "budget_bytes": budget,
                        "peak_over_budget": peak / budget})
    dist.barrier()
    return records


def _broadcast_float(torch, dist, value) -> float:
    t = torch.tensor([0.0 if value is None else value], device="cuda")
    dist.broadcast(t, src=0)
    return float(t.item())


def _same_bits(torch, dist, group, result, reference, p, causal) -> bool:
    """Every rank's rows gathered on every rank of `group`; rank 0 compares with one GPU's, then tells the rest."""
    from nkattn import distributed

    same = torch.zeros(1, device="cuda")
    for got, ref in zip(result, (reference or (None, None)), strict=True):
        parts = [torch.empty_like(got) for _ in range(p)]
        dist.all_gather(parts, got.contiguous(), group=group)
        if reference is not None:
            same += float(not torch.equal(distributed.unshard(parts, zigzag=causal).contiguous().view(torch.uint8),
                                          ref.contiguous().view(torch.uint8)))
    dist.broadcast(same, src=0, group=group)
    return bool(same.item() == 0)


def _torch_context_parallel(torch, dist, group, p, full, causal, repeats, t1, base, dtype) -> dict:
    """PyTorch's context parallelism (ring attention over SDPA: the memory-efficient kernel in float32,
    FlashAttention-2 in the half dtypes), where it runs."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    record = {"impl": "torch-context-parallel", "gpus": p, "strategy": "ring", **base}
    try:
        from torch.distributed.device_mesh import DeviceMesh
        from torch.distributed.tensor.experimental import context_parallel

        mesh = DeviceMesh.from_group(group, "cuda")
        backend = SDPBackend.EFFICIENT_ATTENTION if dtype == "float32" else SDPBackend.FLASH_ATTENTION
        buffers = [t.clone() for t in full]  # context_parallel shards its buffers in place

        def call():
            with sdpa_kernel(backend), context_parallel(mesh, buffers=buffers, buffer_seq_dims=[2, 2, 2]):
                return F.scaled_dot_product_attention(*buffers, is_causal=causal)

        tp = _timed(torch, dist, group, call, repeats)
    except Exception as exc:  # noqa: BLE001 (an experimental API: whatever stops it is recorded, not fatal)
        return {**record, "skipped": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"}
    # its bits are not compared: it merges blocks by log-sum-exp, which no one-GPU kernel reproduces
    return {**record, "median_ms": tp, "scaling_efficiency": scaling_efficiency(t1, p, tp)}


if __name__ == "__main__":
    main()
