"""Study: what breaks bit-exactness of the float64 kernel, and what restores it.

Question: seeds 000 and 002 claim "bit-exact" attention. Against which reference,
and does it survive the GPU's compiler and math library?

Data: random normal q, k, v, B = 2, H = 4, Nq = Nk = 513, d in {64, 128}, causal.
``--quick``: B = H = 1, N = 17, d = 16 (a smoke test of the pipeline: under the
CUDA simulator, which evaluates in float64 Python, every flavour is bit-identical).

Method: the float64 kernel is built in four arithmetic flavours and compared, bit
for bit, with the float64 streaming reference (NumPy, same operation order):
(1) plain operators, which the compiler contracts into FMAs, with CUDA's libdevice
exp/log; (2) FMA contraction only; (3) libdevice exp/log only; (4) neither:
``mul.rn``/``add.rn`` (never contracted) and exp/log as polynomials of +, *, /,
floor and ldexp, the same ones the reference evaluates. Reported: share of
elements of O and lse that are bit-identical and the largest difference in ulps.

Conclusion (H100 run in results/exact-bits/): see the README; flavour (4) is the
kernel's float64 default and is bit-identical, the others are not.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from nkattn.reference.exact import streaming_attention_ref
from nkattn.results import RESULTS_DIR, make_meta, write_results
from nkattn.testing import relative_error

FLAVOURS = {
    "fma+libdevice": {"contract": True, "portable_math": False},
    "fma+portable": {"contract": True, "portable_math": True},
    "rn+libdevice": {"contract": False, "portable_math": False},
    "rn+portable (default)": {"contract": False, "portable_math": True},
}
# (B, H, N, head dims): N = 513 crosses the GPU's 128-row tiles; 17 the simulator's 8-row tiles
FULL = (2, 4, 513, (64, 128))
QUICK = (1, 1, 17, (16,))


def ulp_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Distance in units in the last place between float64 arrays (finite or equal infinities)."""
    ia = a.view(np.int64)
    ib = b.view(np.int64)
    # map the sign-magnitude bit patterns onto a monotone integer line
    ia = np.where(ia < 0, np.int64(-(2**63)) - ia, ia)
    ib = np.where(ib < 0, np.int64(-(2**63)) - ib, ib)
    return np.abs(ia.astype(np.float64) - ib.astype(np.float64))


def run(*, quick: bool = False, results_dir: Path = RESULTS_DIR) -> list[Path]:
    from numba import cuda

    from nkattn.cuda_kernels.exact import exact_attention
    from nkattn.cuda_kernels.online_softmax import kernel_order
    from nkattn.timing import device_name, device_slug

    batch, heads, n, head_dims = QUICK if quick else FULL
    records = []
    for d in head_dims:
        rng = np.random.default_rng(d)
        q, k, v = (rng.standard_normal((batch, heads, n, d)) for _ in range(3))
        o_ref, lse_ref = streaming_attention_ref(q, k, v, causal=True, order=kernel_order(np.float64, d))
        qd, kd, vd = (cuda.to_device(x) for x in (q, k, v))
        lengths = cuda.to_device(np.full(batch, n, dtype=np.int32))
        for flavour, options in FLAVOURS.items():
            o, lse = exact_attention(qd, kd, vd, lengths, causal=True, scale=1 / np.sqrt(d), **options)
            o, lse = o.copy_to_host(), lse.copy_to_host()
            for name, got, ref in (("O", o, o_ref), ("lse", lse, lse_ref)):
                records.append({
                    "flavour": flavour, **options, "tensor": name, "B": batch, "H": heads, "N": n, "d": d,
                    "causal": True,
                    "bit_identical_share": float(np.mean(got.view(np.int64) == ref.view(np.int64))),
                    "max_ulp": float(ulp_distance(got, ref).max()),
                    "max_rel_err": relative_error(got, ref),
                })
    name = device_name() if not _simulator() else "cuda-simulator"
    meta = make_meta(device=name, config={"B": batch, "H": heads, "N": n, "head_dims": list(head_dims), "causal": True,
                                          "quick": quick},
                     command="nkattn study exact-bits" + (" --quick" if quick else ""))
    path = Path(results_dir) / "exact-bits" / f"{device_slug(name)}{'-quick' if quick else ''}.json"
    return [write_results(path, meta, records)]


def _simulator() -> bool:
    from numba.core import config

    return bool(config.ENABLE_CUDASIM)

