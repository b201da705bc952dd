"""Benchmark: table-lookup scores against dot-product scores, and lookup attention against exact.

Question: seed 004 claims that an "O(1) table lookup" beats the O(d) dot product
of matmul. On a GPU, how many scores per second does a 256 x 256 uint16 table in
shared memory deliver, against q·k computed by the same kernel skeleton, and what
does that do to a whole attention call?

Data: B = 1, H = 8, Nq = Nk = 16,384, d in {32, 64, 128}, float32; random q, k,
v, random uint8 codes and a random uint16 table (speed does not depend on what
the codes mean).

Method: `score_rowmax` produces every score of a row tile and reduces it to the
row's maximum, with lookups or with the spine's register-blocked dot product
(same tiling, loop and reduction); scores/s = B·H·Nq·Nk / time. Attention: the
lookup kernel (`table_attention`) against the exact kernel (`exact_attention`),
both fused streaming kernels over the same V. Palette encoding (256 centroids per
row: 256·d operations per row on the host) is not included, which favours the
table. CUDA events after warm-up, median of 20 runs.

Results: results/bench/table-<device>.json; figure figures/table/speed (`table_bench_plots`).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from nkattn.results import RESULTS_DIR, make_meta, write_results
from nkattn.timing import attention_flops, cuda_time_ms, device_name, device_slug

HEAD_DIMS = (32, 64, 128)
SEQ_LEN = 16384
BATCH, HEADS = 1, 8


def run(*, quick: bool = False, results_dir: Path = RESULTS_DIR, repeats: int = 20) -> list[Path]:
    from numba import cuda
    from numba.core import config

    from nkattn.cuda_kernels.exact import exact_attention
    from nkattn.cuda_kernels.table import score_rowmax, table_attention

    if config.ENABLE_CUDASIM or not cuda.is_available():
        raise RuntimeError("the benchmark needs a CUDA GPU (the simulator is on or no GPU was found)")
    name = device_name()
    n = 4096 if quick else SEQ_LEN
    rng = np.random.default_rng(0)
    records = []
    for d in HEAD_DIMS:
        shape = (BATCH, HEADS, n, d)
        q, k, v = (cuda.to_device(rng.standard_normal(shape).astype(np.float32)) for _ in range(3))
        q_codes = cuda.to_device(rng.integers(0, 256, shape[:3]).astype(np.uint8))
        k_codes = cuda.to_device(rng.integers(0, 256, shape[:3]).astype(np.uint8))
        table = rng.integers(0, 2**16, (256, 256)).astype(np.uint16)
        lengths = cuda.to_device(np.full(BATCH, n, np.int32))
        scale = 1.0 / math.sqrt(d)
        base = {"B": BATCH, "H": HEADS, "N": n, "d": d, "dtype": "float32"}
        n_scores = BATCH * HEADS * n * n
        for lookup in (True, False):
            def scores_call(lookup=lookup):
                return score_rowmax(q, k, q_codes, k_codes, table, scale=1e-4 if lookup else scale, lookup=lookup)

            timing = cuda_time_ms(scores_call, repeats=repeats)
            records.append({**base, "kind": "scores", "impl": "lookup" if lookup else "dot", **timing,
                            "scores_per_s": n_scores / (timing["median_ms"] * 1e-3)})

        def table_call():
            return table_attention(q_codes, k_codes, table, v, lengths, score_scale=1e-4, causal=False)

        def exact_call():
            return exact_attention(q, k, v, lengths, causal=False, scale=scale)

        for impl, call in (("nkattn-table", table_call), ("nkattn-exact", exact_call)):
            out, _ = call()
            if np.isnan(out.copy_to_host()).any():
                raise AssertionError(f"{impl} left NaN in its output at d={d}")
            timing = cuda_time_ms(call, repeats=repeats)
            records.append({**base, "kind": "attention", "impl": impl, **timing,
                            "exact_equivalent_tflops": attention_flops(BATCH, HEADS, n, n, d, False) / (timing["median_ms"] * 1e-3) / 1e12})
    meta = make_meta(device=name, config={"B": BATCH, "H": HEADS, "N": n, "head_dims": list(HEAD_DIMS), "dtype": "float32",
                             "repeats": repeats, "quick": quick},
                     command="nkattn bench table" + (" --quick" if quick else ""))
    path = Path(results_dir) / "bench" / f"table-{device_slug(name)}{'-partial' if quick else ''}.json"
    return [write_results(path, meta, records)]
