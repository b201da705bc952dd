"""`nkattn run`: every method on the available backend, checked against float64, as one table."""

from __future__ import annotations

import time

import numpy as np

import nkattn
from nkattn.api import METHODS
from nkattn.reference.exact import attention_ref, streaming_attention_ref
from nkattn.reference.lsh import lsh_attention_ref
from nkattn.testing import relative_error

# The simulator runs each CUDA thread as a Python thread; keep its input small.
SIMULATOR_MAX_N = 32
SIMULATOR_MAX_HEADS = 2
SIMULATOR_REPEATS = 2
# method options for the sample's short sequences (128 tokens, 32 in the simulator): 3-bit buckets
# keep LSH candidate sets non-trivial; the dot table is fitted to the sample's own rows
METHOD_OPTIONS = {"exact": {}, "lsh": {"lsh_bits": 3, "lsh_tables": 2, "seed": 0}, "table": {"table": "dot", "seed": 0}}


def load_default_input(simulator: bool):
    from nkattn.sample import load_sample

    sample = load_sample()
    q, k, v = sample["q"], sample["k"], sample["v"]
    if simulator:
        q, k, v = (x[:, :SIMULATOR_MAX_HEADS, :SIMULATOR_MAX_N] for x in (q, k, v))
    return q, k, v, sample["description"]


def _bit_reference(method, q, k, v, causal):
    if method == "exact":
        from nkattn.cuda_kernels.online_softmax import kernel_order

        return streaming_attention_ref(q, k, v, causal=causal, order=kernel_order(q.dtype, q.shape[-1]))[0]
    return None


def _own_reference(method, q, k, v, causal):
    """The method's float64 oracle on these inputs (for table: the host fit, in float64)."""
    if method == "lsh":
        opts = METHOD_OPTIONS["lsh"]
        return lsh_attention_ref(q, k, v, bits=opts["lsh_bits"], tables=opts["lsh_tables"], seed=opts["seed"], causal=causal)[0]
    if method == "table":
        return nkattn.attention(q, k, v, method="table", causal=causal, backend="reference", **METHOD_OPTIONS["table"])
    return attention_ref(q, k, v, causal=causal)[0]


def run_all(*, simulator: bool, repeats: int | None = None, causal: bool = True) -> int:
    q32, k32, v32, description = load_default_input(simulator)
    if repeats is None:
        repeats = SIMULATOR_REPEATS if simulator else 3
    backend = "reference" if nkattn.backend_status()["cuda"] else "cuda"
    backend_label = "cuda (simulator)" if backend == "cuda" and simulator else backend
    print(f"input: {description}; shape q {q32.shape}, causal={causal}")
    rows = []
    exact = attention_ref(q32, k32, v32, causal=causal)[0]
    for method in METHODS:
        own = _own_reference(method, q32.astype(np.float64), k32.astype(np.float64), v32.astype(np.float64), causal)
        for dtype in (np.float32, np.float64):
            q, k, v = (x.astype(dtype) for x in (q32, k32, v32))
            outs, times = [], []
            for _ in range(repeats):
                start = time.perf_counter()
                outs.append(nkattn.attention(q, k, v, method=method, causal=causal, backend=backend, **METHOD_OPTIONS[method]))
                times.append(time.perf_counter() - start)
            deterministic = all(np.array_equal(outs[0].view(np.uint8), o.view(np.uint8)) for o in outs[1:])
            bits = "n/a"
            if dtype == np.float64:
                expected = _bit_reference(method, q, k, v, causal)
                if expected is not None:
                    bits = "yes" if np.array_equal(outs[0].view(np.uint8), expected.view(np.uint8)) else "no"
            rows.append(
                (method, backend_label, np.dtype(dtype).name, f"{relative_error(outs[0], own):.2e}",
                 f"{relative_error(outs[0], exact):.2e}", bits, "yes" if deterministic else "no",
                 f"{1e3 * float(np.median(times)):.1f}")
            )
    header = ("method", "backend", "dtype", "rel err vs own f64 ref", "rel err vs exact", "bit-identical", "deterministic", "time ms")
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
    print("own f64 ref: the method's float64 oracle (lsh: same hash tables; table: same palettes); "
          "rel err vs exact: what the approximation costs on this input")
    print("bit-identical: float64 output equal, bit for bit, to the float64 streaming reference "
          "(exact only; n/a otherwise); time is wall-clock per call, compilation in the first; "
          f"lsh: {METHOD_OPTIONS['lsh']['lsh_bits']} bits x {METHOD_OPTIONS['lsh']['lsh_tables']} tables, table: dot palettes (fit included)")
    return 0
