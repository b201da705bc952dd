"""Benchmark: LSH attention beside our exact kernel and torch SDPA, 16K to 1M tokens.

Question: seed 003 claims 1M tokens in < 0.5 s with the signal kept. How fast is
our GPU LSH path (hashing and sorting included) at N in {16K, 64K, 256K, 1M},
against the exact fp32 kernel and torch SDPA on the same data, and what does each
configuration retrieve?

Data: needle in a haystack, d = 64, B = H = 1, float32. Keys iid N(0, I_d); the
first 1,024 queries each get a planted key at cosine exactly 0.9
(`nkattn.studies.lsh_data.needle_haystack`); the other queries are iid N(0, I_d)
too. Values iid N(0, 1).

Method: every call is timed whole (hash, sort, bucket bounds, work items and one
attention launch per table) with CUDA events after warm-up, median of 20 runs
(5 at 256K, 2 at 1M for the exact peers, whose single call takes seconds).
Retrieval metrics of the timed configuration are computed on the GPU in float64
from the kernel's own bucket codes for the 1,024 needle queries, with the
definitions of `nkattn.studies.lsh_recall` (needle recall, recall@k of the true
top-k by q·k over all keys, candidate fraction, amplification and the seed's
ratio, output relative error against exact attention). Peak memory: inputs plus
every byte the call allocates, measured from the driver's free memory with
deallocation deferred (an upper bound on the true peak; exact and LSH alike).

Results: results/bench/lsh-<device>.json; figures time_vs_n and memory_vs_n in
figures/lsh/ (`lsh_bench_plots`). Numbers and the verdict are in the README.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from tqdm import tqdm

from nkattn.results import RESULTS_DIR, make_meta, write_results
from nkattn.studies._common import peak_device_bytes
from nkattn.timing import cuda_time_ms, device_name, device_slug

SEQ_LENS = (16384, 65536, 262144, 1 << 20)
HEAD_DIM = 64
NEEDLE_QUERIES = 1024
NEEDLE_COS = 0.9
# (bits, tables) whose needle recall at cosine 0.9 is ~0.996 by SimHash theory
CONFIGS = ((8, 16), (10, 24), (12, 32), (13, 40), (14, 48), (15, 56), (16, 64))
KS = (1, 10, 50)
# seed 003: "1M tokens in < 0.5 s", stored with the results and drawn beside them
SEED_CLAIM = {"n": 1 << 20, "ms": 500}


def _repeats(n: int, impl: str) -> int:
    if impl.startswith("nkattn-lsh"):
        return 20
    return 20 if n <= 65536 else (5 if n <= 262144 else 2)


def _peak_bytes(fn, resident_bytes: int) -> int:
    """Inputs plus everything `fn` allocates, nothing freed meanwhile (an upper bound on the peak).

    torch's caching allocator may reuse memory it already holds: the larger of its
    and the driver's view counts.
    """
    torch_extra, driver_extra = peak_device_bytes(fn)
    return resident_bytes + max(driver_extra, torch_extra)


def retrieval_metrics_gpu(queries, keys, values, needles, q_codes, k_codes, out_rows, *, scale, ks=KS) -> dict:
    """Metrics of `nkattn.studies.lsh_recall` for the given queries, from the kernel's codes.

    queries (nq, d), keys/values (N, d): torch float64 on the GPU; q_codes (nq, L) and
    k_codes (N, L) the kernel's bucket codes; out_rows (nq, d) the kernel's output.
    """
    import torch

    per_query = {name: [] for name in ("needle", *(f"r{k}" for k in ks), "fraction", "amp", "amp_seed", "err")}
    for start in range(0, queries.shape[0], 128):
        sl = slice(start, start + 128)
        s = queries[sl] @ keys.T * scale
        cand = torch.zeros_like(s, dtype=torch.bool)
        for t in range(q_codes.shape[1]):
            cand |= q_codes[sl, t, None] == k_codes[None, :, t]
        rows = torch.arange(s.shape[0], device=s.device)
        per_query["needle"].append(cand[rows, needles[sl]].double())
        top = s.topk(max(ks), dim=1).indices
        hit = cand.gather(1, top).double()
        for k in ks:
            per_query[f"r{k}"].append(hit[:, :k].mean(1))
        n_cand = cand.sum(1).double()
        per_query["fraction"].append(n_cand / s.shape[1])
        mean_all, std_all = s.mean(1), s.std(1, unbiased=False)
        mean_cand = torch.where(cand, s, 0).sum(1) / n_cand.clamp(min=1)
        keep = n_cand > 0
        per_query["amp"].append(((mean_cand - mean_all) / std_all)[keep])
        per_query["amp_seed"].append((mean_cand / mean_all)[keep])
        o_exact = torch.softmax(s, dim=1) @ values
        per_query["err"].append((out_rows[sl] - o_exact).norm(dim=1) / o_exact.norm(dim=1))
    cat = {name: torch.cat(parts).cpu().numpy() for name, parts in per_query.items()}
    metrics = {
        "needle_recall": cat["needle"].mean(),
        "candidate_fraction": cat["fraction"].mean(),
        "candidate_fraction_std": cat["fraction"].std(),
        "amplification": cat["amp"].mean(),
        "amplification_std": cat["amp"].std(),
        "amplification_seed": cat["amp_seed"].mean(),
        "amplification_seed_median": float(np.median(cat["amp_seed"])),
        "output_rel_error": cat["err"].mean(),
        "output_rel_error_std": cat["err"].std(),
        "n_queries": int(cat["needle"].size),
    }
    for k in ks:
        metrics[f"recall_at_{k}"] = cat[f"r{k}"].mean()
    return {name: float(value) for name, value in metrics.items()}


def run(*, quick: bool = False, results_dir: Path = RESULTS_DIR, seq_lens=None, configs=None) -> list[Path]:
    import torch
    import torch.nn.functional as F
    from numba import cuda
    from numba.core import config
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from nkattn.cuda_kernels.exact import exact_attention
    from nkattn.cuda_kernels.lsh import build_buckets, lsh_attention
    from nkattn.reference.lsh import hyperplanes
    from nkattn.studies.lsh_data import needle_haystack

    if config.ENABLE_CUDASIM or not cuda.is_available():
        raise RuntimeError("the benchmark needs a CUDA GPU (the simulator is on or no GPU was found)")
    name = device_name()
    seq_lens = tuple(seq_lens or ((16384, 65536) if quick else SEQ_LENS))
    configs = tuple(configs or (CONFIGS[1:3] if quick else CONFIGS))
    partial = quick or seq_lens != SEQ_LENS or configs != CONFIGS
    d, scale = HEAD_DIM, 1.0 / math.sqrt(HEAD_DIM)
    records = []
    for n in tqdm(seq_lens, desc="lsh bench"):
        keys, needle_queries, needles = needle_haystack(n, d, NEEDLE_QUERIES, NEEDLE_COS, seed=n)
        rng = np.random.default_rng(n + 1)
        queries = np.concatenate([needle_queries, rng.standard_normal((n - NEEDLE_QUERIES, d)).astype(np.float32)])
        values = rng.standard_normal((n, d)).astype(np.float32)
        q, k, v = (torch.from_numpy(x)[None, None].cuda() for x in (queries, keys, values))
        qd, kd, vd = (cuda.as_cuda_array(x) for x in (q, k, v))
        lengths = cuda.to_device(np.array([n], np.int32))
        io_bytes = 4 * (q.numel() + k.numel() + v.numel())
        q64, k64, v64 = (x[0, 0, : (NEEDLE_QUERIES if x is q else n)].double() for x in (q, k, v))
        needles_t = torch.from_numpy(needles).cuda()
        base = {"N": n, "d": d, "B": 1, "H": 1, "dtype": "float32", "causal": False}

        def exact_call():
            return exact_attention(qd, kd, vd, lengths, causal=False, scale=scale)

        reps = _repeats(n, "exact")
        timing = cuda_time_ms(exact_call, warmup=1, repeats=reps)
        exact_ms = timing["median_ms"]
        records.append({**base, "impl": "nkattn-exact", **timing, "peak_bytes": _peak_bytes(exact_call, io_bytes)})

        def sdpa_call():
            with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):
                return F.scaled_dot_product_attention(q, k, v)

        timing = cuda_time_ms(sdpa_call, warmup=1, repeats=reps)
        records.append({**base, "impl": "torch-sdpa-efficient", **timing, "peak_bytes": _peak_bytes(sdpa_call, io_bytes)})

        for bits, tables in configs:
            def lsh_call(bits=bits, tables=tables):
                return lsh_attention(qd, kd, vd, lengths, bits=bits, tables=tables, seed=0, causal=False, scale=scale)

            out, _, buckets = lsh_attention(qd, kd, vd, lengths, bits=bits, tables=tables, seed=0, causal=False,
                                            scale=scale, return_buckets=True)
            out_rows = torch.as_tensor(out.copy_to_host()[0, 0, :NEEDLE_QUERIES], device="cuda").double()
            if not torch.isfinite(out_rows).all():
                raise AssertionError(f"LSH output has non-finite values at N={n}, bits={bits}, tables={tables}")
            q_codes = torch.as_tensor(buckets.q_codes.copy_to_host()[0, 0, :NEEDLE_QUERIES].astype(np.int32), device="cuda")
            k_codes = torch.as_tensor(buckets.k_codes.copy_to_host()[0, 0].astype(np.int32), device="cuda")
            metrics = retrieval_metrics_gpu(q64, k64, v64, needles_t, q_codes, k_codes, out_rows, scale=scale)
            del buckets, out
            planes = cuda.to_device(hyperplanes(d, bits, tables, 0))
            build = cuda_time_ms(lambda: build_buckets(qd, kd, planes, bits), warmup=1, repeats=10)
            timing = cuda_time_ms(lsh_call, warmup=2, repeats=_repeats(n, "nkattn-lsh"))
            records.append({
                **base, "impl": "nkattn-lsh", "bits": bits, "tables": tables, **timing, "build_ms": build["median_ms"],
                "peak_bytes": _peak_bytes(lsh_call, io_bytes), "speedup_vs_exact": exact_ms / timing["median_ms"],
                **metrics,
            })
        torch.cuda.empty_cache()
    meta = make_meta(
        device=name,
        config={"seq_lens": list(seq_lens), "head_dim": d, "dtype": "float32", "configs": [list(c) for c in configs],
                "needle_queries": NEEDLE_QUERIES, "needle_cos": NEEDLE_COS, "seed": 0, "seed_claim": SEED_CLAIM,
                "quick": quick},
        command="nkattn bench lsh" + (" --quick" if quick else ""),
    )
    path = Path(results_dir) / "bench" / f"lsh-{device_slug(name)}{'-partial' if partial else ''}.json"
    return [write_results(path, meta, records)]
