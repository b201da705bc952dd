"""`nkattn run`: every registered method on the built-in sample, checked against float64, as one table."""

from __future__ import annotations

import time

import numpy as np

from nkattn import arrays
from nkattn.api import plan
from nkattn.methods import METHODS
from nkattn.reference.exact import attention_ref
from nkattn.testing import relative_error

# The simulator runs every CUDA thread as a Python thread (about 0.2 s per kernel
# launch of 16 threads here): one head and 16 tokens still cross the simulator's
# 8 x 8 tiles both ways and keep the whole run near 20 s; 2 heads x 32 tokens took 100 s.
SIMULATOR_HEADS = 1
SIMULATOR_TOKENS = 16
SIMULATOR_REPEATS = 2
GPU_REPEATS = 3


def load_default_input(simulator: bool):
    """(q, k, v, description, cut): the packaged sample; `cut` says what the simulator leaves out ("" if nothing)."""
    from nkattn.sample import load_sample

    sample = load_sample()
    q, k, v = sample["q"], sample["k"], sample["v"]
    cut = ""
    if simulator:
        heads, tokens = q.shape[1], q.shape[2]
        names = [f"L{layer}H{head}" for layer, head in zip(sample["layers"], sample["heads"])][:SIMULATOR_HEADS]
        q, k, v = (x[:, :SIMULATOR_HEADS, :SIMULATOR_TOKENS] for x in (q, k, v))
        cut = (f"the CUDA simulator runs every GPU thread in Python, so this runs {len(names)} of the {heads} heads "
               f"({', '.join(names)}) on the first {SIMULATOR_TOKENS} of the {tokens} tokens; on a GPU all of it runs")
    return q, k, v, sample["description"], cut


def run_all(*, simulator: bool, repeats: int | None = None, causal: bool = True) -> int:
    q32, k32, v32, description, cut = load_default_input(simulator)
    if repeats is None:
        repeats = SIMULATOR_REPEATS if simulator else GPU_REPEATS
    import nkattn

    backend = "reference" if nkattn.backend_status()["cuda"] else "cuda"
    print(f"input: {description}")
    if cut:
        print(f"simulator: {cut}")
    print(f"shape q {q32.shape}, causal={causal}, backend={backend}, {repeats} calls per row")
    rows = []
    q64, k64, v64 = (x.astype(np.float64) for x in (q32, k32, v32))
    exact = attention_ref(q64, k64, v64, causal=causal)[0]
    for method in METHODS.values():
        opts = dict(method.demo_options)
        call, ref_backend = plan(q64, k64, v64, method=method.name, causal=causal, backend="reference", **opts)
        own = ref_backend.run(call)[0]
        for dtype in (*arrays.HALF_DTYPES, np.float32, np.float64):
            q, k, v = (x.astype(dtype) for x in (q32, k32, v32))
            try:
                call, chosen = plan(q, k, v, method=method.name, causal=causal, backend=backend, **opts)
            except ValueError:
                if dtype in arrays.HALF_DTYPES:  # no kernel of this method takes half inputs here: no row
                    continue
                raise
            outs, times = [], []
            for _ in range(repeats):
                start = time.perf_counter()
                outs.append(chosen.run(call)[0])
                times.append(time.perf_counter() - start)
            deterministic = all(np.array_equal(outs[0].view(np.uint8), o.view(np.uint8)) for o in outs[1:])
            bits = "n/a"
            if dtype == np.float64 and chosen.bit_reference is not None:
                expected = chosen.bit_reference(q, k, v, causal=causal, scale=call.scale, key_lengths=None)[0]
                bits = "yes" if np.array_equal(outs[0].view(np.uint8), expected.view(np.uint8)) else "no"
            rows.append(
                (method.name, chosen.label, np.dtype(dtype).name, f"{relative_error(outs[0], own):.2e}",
                 f"{relative_error(outs[0], exact):.2e}" + (" *" if method.approximate else ""), bits,
                 "yes" if deterministic else "no", f"{1e3 * float(np.median(times)):.1f}")
            )
    header = ("method", "backend", "dtype", "rel err vs own f64 ref", "rel err vs exact", "bit-identical", "deterministic", "time ms")
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    demo = "; ".join(f"{m.name}: " + ", ".join(f"{k}={v!r}" for k, v in m.demo_options.items())
                     for m in METHODS.values() if m.demo_options)
    print(
        "\nrel err = max|O - O_ref| / max|O_ref|.\n"
        "  vs own f64 ref: against the method's float64 reference (backend='reference': same hash tables, same\n"
        "    palettes): the kernel's correctness; float32 ~1e-7, float64 ~1e-16, float16 ~1e-3 and\n"
        "    bfloat16 ~1e-2 (the formats' own rounding; half rows only where a kernel takes them). lowrank\n"
        "    in float32 is ~1e-6: rounding in its float32 products turns its singular vectors by ~eps/gap.\n"
        "  vs exact: against float64 softmax attention. * approximate methods: this is what the approximation\n"
        "    costs on this input, not a failure: LSH attends only to the keys that share a bucket with the\n"
        "    query (here a sixth to a third of the keys it sees), so errors near 1 are expected; lowrank keeps\n"
        "    only the leading singular direction of each head's attention matrix.\n"
        "bit-identical: the float64 output equals, bit for bit, the float64 mirror of the kernel's order of\n"
        "  operations (streaming_attention_ref); n/a where a backend claims no mirror.\n"
        "deterministic: repeated calls give identical bits.\n"
        "time ms: median wall-clock per call, host copies included"
        + (" (the simulator's times measure Python, not a GPU)" if simulator else "") + ".\n"
        f"options: {demo}."
    )
    return 0
