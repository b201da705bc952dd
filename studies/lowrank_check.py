"""GPU check of the matrix-free attention products A·X and Aᵀ·Y at realistic size.

Not a study (it writes nothing under results/): a script for the device,

    python -m nkattn.studies.lowrank_check            # N = 16K, d = 64, l = 42, float32 and float64

1. Correctness, the GPU tests' key cases at N = 16K: every output element written
   (outputs poisoned with NaN first); sampled rows of A·X and lse and sampled
   keys of Aᵀ·Y against dense float64 (<= 1e-12 relative in float64; in float32
   within 2x the naive float32 formula's error + the float32 floor); the float64
   kernels bit-identical to the mirrors of `nkattn.reference.lowrank` (on the
   last rows, whose bottom-right causal alignment survives dropping the rows
   before them, and on sampled keys); two runs bit-identical.
2. Timing, B = 1, H = 8, N = 16K, d = 64: CUDA events, median of >= 20 runs
   after warm-up, of the exact kernel (dv = d, the baseline), A·X and Aᵀ·Y at
   l = 42, non-causal and causal. FLOP counts: an exact pass is 4·N²·d, a
   product at width l is 2·N²·(d + l), so the prediction is (d + l) / (2d) = 0.83
   of an exact pass (0.875 counting the l = 48 the kernels carry, TX = 16);
   the P·V loop then reads 3 values per step with scalar loads instead of one
   16-byte load of 4, so somewhat more than that, ~0.9.
3. Registers and local memory per thread of each kernel as compiled on this device.

The last thing printed is the table; the exit status is 1 if a check failed.
"""

from __future__ import annotations

import argparse
import math
import sys

import numpy as np

from nkattn.reference.exact import visible_key_counts
from nkattn.testing import (
    assert_bit_identical,
    assert_within_budget,
    float32_floor,
    relative_error,
)

D, WIDTH = 64, 42
SAMPLE = 96  # rows / keys checked against dense float64, per (b, h)
MIRROR_ROWS = 128  # trailing rows checked bit for bit (float64)


class Checks:
    def __init__(self):
        self.rows = []

    def run(self, name, fn):
        try:
            detail = fn()
            self.rows.append((name, "ok", detail or ""))
        except AssertionError as err:
            self.rows.append((name, "FAIL", str(err).splitlines()[0][:160]))
        print(f"  {self.rows[-1][1]:4s} {name} {self.rows[-1][2]}", flush=True)

    @property
    def failed(self):
        return [r for r in self.rows if r[1] != "ok"]


# --------------------------------------------------------------------------------------
# dense float64 (and naive float32) rows and columns of A, one (b, h) at a time
# --------------------------------------------------------------------------------------


def _scores(q_rows, k, scale, dtype):
    return (q_rows.astype(dtype) @ k.astype(dtype).T) * dtype(scale)


def dense_rows(q, k, x, rows, counts, scale, dtype):
    """(A[rows] @ x, lse[rows]) computed in `dtype` (one (b, h); counts: visible keys per row)."""
    s = _scores(q[rows], k, scale, dtype)
    visible = np.arange(k.shape[0])[None, :] < counts[rows, None]
    s = np.where(visible, s, -np.inf)
    m = s.max(axis=1, keepdims=True)
    has = np.isfinite(m)
    with np.errstate(invalid="ignore"):
        p = np.where(visible, np.exp(s - np.where(has, m, 0)), dtype(0))
    l = p.sum(axis=1, keepdims=True)
    o = np.where(has, (p @ x.astype(dtype)) / np.where(has, l, 1), dtype(0))
    lse = np.where(has, m + np.log(np.where(has, l, 1)), -np.inf)[:, 0]
    return o, lse


def dense_columns(q, k, keys, counts, scale, dtype, chunk=2048):
    """A[:, keys] computed in `dtype`: each row normalised over all its visible keys."""
    nq, nk = q.shape[0], k.shape[0]
    cols = np.zeros((nq, len(keys)), dtype=dtype)
    for r0 in range(0, nq, chunk):
        rows = np.arange(r0, min(r0 + chunk, nq))
        s = _scores(q[rows], k, scale, dtype)
        visible = np.arange(nk)[None, :] < counts[rows, None]
        s = np.where(visible, s, -np.inf)
        m = s.max(axis=1, keepdims=True)
        has = np.isfinite(m)
        with np.errstate(invalid="ignore"):
            p = np.where(visible, np.exp(s - np.where(has, m, 0)), dtype(0))
        l = np.where(has, p.sum(axis=1, keepdims=True), 1)
        cols[rows] = p[:, keys] / l
    return cols


# --------------------------------------------------------------------------------------
# correctness at realistic size
# --------------------------------------------------------------------------------------


def make(rng, b, h, hkv, nq, nk, dtype):
    q = rng.standard_normal((b, h, nq, D)).astype(dtype)
    k = rng.standard_normal((b, hkv, nk, D)).astype(dtype)
    x = rng.standard_normal((b, hkv, nk, WIDTH)).astype(dtype)
    y = rng.standard_normal((b, h, nq, WIDTH)).astype(dtype)
    return q, k, x, y


def check_case(checks, name, dtype, b, h, hkv, nq, nk, causal, key_lengths, seed):
    from numba import cuda

    from nkattn.cuda_kernels.lowrank import (
        attention_times,
        attention_transpose_times,
    )
    from nkattn.cuda_kernels.online_softmax import kernel_order
    from nkattn.reference.lowrank import (
        attention_times_ref,
        attention_transpose_times_ref,
    )

    tag = f"{name} f{np.dtype(dtype).itemsize * 8}"
    rng = np.random.default_rng(seed)
    q, k, x, y = make(rng, b, h, hkv, nq, nk, dtype)
    scale = 1.0 / math.sqrt(D)
    qd, kd, xd, yd = (cuda.to_device(a) for a in (q, k, x, y))
    lengths = cuda.to_device(np.asarray(key_lengths, dtype=np.int32))

    def run_once():
        ax = cuda.to_device(np.full((b, h, nq, WIDTH), np.nan, dtype=dtype))
        lse = cuda.to_device(np.full((b, h, nq), np.nan, dtype=dtype))
        aty = cuda.to_device(np.full((b, h, nk, WIDTH), np.nan, dtype=dtype))
        attention_times(qd, kd, xd, lengths, causal=causal, scale=scale, out=ax, lse=lse)
        attention_transpose_times(qd, kd, yd, lse, lengths, causal=causal, scale=scale, out=aty)
        return ax.copy_to_host(), lse.copy_to_host(), aty.copy_to_host()

    ax, lse, aty = run_once()

    def written():
        for nm, a in (("A·X", ax), ("lse", lse), ("AᵀY", aty)):
            assert not np.isnan(a).any(), f"{nm}: {np.isnan(a).mean():.2%} of elements unwritten or NaN"

    def repeat():
        again = run_once()
        for nm, a, a2 in zip(("A·X", "lse", "AᵀY"), (ax, lse, aty), again, strict=True):
            assert_bit_identical(nm, a2, a)

    checks.run(f"{tag}: every element written", written)
    checks.run(f"{tag}: second run bit-identical", repeat)

    counts_all = visible_key_counts(b, nq, nk, causal, key_lengths)
    group = h // hkv
    picks = [(0, 0), (b - 1, h - 1)]
    # edges of the row and key tiles, the middle, and a random sample
    sample_rows = np.unique(np.concatenate([[0, 1, nq // 2, nq - 2, nq - 1], rng.choice(nq, min(SAMPLE, nq), replace=False)]))
    sample_keys = np.unique(np.concatenate([[0, 63, 64, 127, 128, nk // 2, nk - 1], rng.choice(nk, min(SAMPLE, nk), replace=False)]))
    sample_rows, sample_keys = sample_rows[sample_rows < nq], sample_keys[sample_keys < nk]

    def against_dense():
        worst = []
        for bb, hh in picks:
            qh, kh, xh, yh = q[bb, hh], k[bb, hh // group], x[bb, hh // group], y[bb, hh]
            counts = counts_all[bb]
            o64, lse64 = dense_rows(qh, kh, xh, sample_rows, counts, scale, np.float64)
            cols64 = dense_columns(qh, kh, sample_keys, counts, scale, np.float64)
            t64 = cols64.T @ yh.astype(np.float64)
            got_o, got_lse, got_t = ax[bb, hh, sample_rows], lse[bb, hh, sample_rows], aty[bb, hh, sample_keys]
            if dtype == np.float64:
                for nm, got, ref in (("A·X", got_o, o64), ("lse", got_lse, lse64), ("AᵀY", got_t, t64)):
                    err = relative_error(got, ref)
                    assert err <= 1e-12, f"{nm}[{bb},{hh}]: relative error {err:.2e} > 1e-12"
                    worst.append(err)
            else:
                o32, lse32 = dense_rows(qh, kh, xh, sample_rows, counts, scale, np.float32)
                t32 = dense_columns(qh, kh, sample_keys, counts, scale, np.float32).T @ yh
                for nm, got, ref, naive in (("A·X", got_o, o64, o32), ("lse", got_lse, lse64, lse32), ("AᵀY", got_t, t64, t32)):
                    assert_within_budget(f"{nm}[{bb},{hh}]", got, ref, naive, floor=float32_floor(ref))
                    worst.append(relative_error(got, ref))
        return f"max relative error {max(worst):.1e}"

    with np.errstate(invalid="ignore"):  # -inf - -inf of empty rows' lse, masked by the budget helper
        checks.run(f"{tag}: sampled rows and keys vs dense float64", against_dense)

    if dtype == np.float64:

        def mirror():
            for bb, hh in picks:
                one = {"causal": causal, "scale": scale, "key_lengths": [key_lengths[bb]], "order": kernel_order(np.float64, D)}
                sel = (slice(bb, bb + 1), slice(hh, hh + 1))
                kv = (slice(bb, bb + 1), slice(hh // group, hh // group + 1))
                # bottom-right causal alignment is unchanged by dropping leading rows
                o_m, lse_m = attention_times_ref(q[sel][:, :, -MIRROR_ROWS:], k[kv], x[kv], **one)
                assert_bit_identical(f"A·X[{bb},{hh}, last rows]", ax[sel][:, :, -MIRROR_ROWS:], o_m)
                assert_bit_identical(f"lse[{bb},{hh}, last rows]", lse[sel][:, :, -MIRROR_ROWS:], lse_m)
                t_m = attention_transpose_times_ref(q[sel], k[kv], y[sel], lse[sel], keys=sample_keys, **one)
                assert_bit_identical(f"AᵀY[{bb},{hh}, sampled keys]", aty[sel][:, :, sample_keys], t_m)

        checks.run(f"{tag}: bit-identical to the float64 mirrors", mirror)


# --------------------------------------------------------------------------------------
# timing
# --------------------------------------------------------------------------------------


def _wall_time_ms(fn, *, warmup, repeats):
    """The simulator has no timing events: wall clock, for the smoke test only."""
    import time

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return {"median_ms": float(np.median(times)), "p90_ms": float(np.percentile(times, 90))}


def time_kernels(dtype, n, heads, repeats, causal):
    from numba import cuda

    from nkattn.cuda_kernels.exact import exact_attention, exact_attention_kernel
    from nkattn.cuda_kernels.lowrank import (
        attention_times,
        attention_transpose_kernel,
        attention_transpose_times,
    )
    from nkattn.cuda_kernels.online_softmax import SIMULATOR
    from nkattn.timing import attention_flops, cuda_time_ms

    rng = np.random.default_rng(1)
    q, k, x, y = make(rng, 1, heads, heads, n, n, dtype)
    v = rng.standard_normal((1, heads, n, D)).astype(dtype)
    qd, kd, vd, xd, yd = (cuda.to_device(a) for a in (q, k, v, x, y))
    lengths = cuda.to_device(np.array([n], dtype=np.int32))
    scale = 1.0 / math.sqrt(D)
    o = cuda.device_array((1, heads, n, D), dtype=dtype)
    ax = cuda.device_array((1, heads, n, WIDTH), dtype=dtype)
    lse = cuda.device_array((1, heads, n), dtype=dtype)
    lse_x = cuda.device_array((1, heads, n), dtype=dtype)
    aty = cuda.device_array((1, heads, n, WIDTH), dtype=dtype)
    attention_times(qd, kd, xd, lengths, causal=causal, scale=scale, out=ax, lse=lse)

    def resources(kernel):
        ov = list(getattr(kernel, "overloads", {}).values())  # none under the simulator
        return max((o.regs_per_thread for o in ov), default=-1), max((o.local_mem_per_thread for o in ov), default=-1)

    uncapped, _ = attention_transpose_kernel(dtype, D, WIDTH, max_registers=None)
    sp_t = attention_transpose_kernel(dtype, D, WIDTH)[1]

    def transpose_uncapped():
        from nkattn.cuda_kernels.lowrank import transpose_launch_config
        from nkattn.cuda_kernels.online_softmax import launch_with_shared_memory

        grid, block, shared = transpose_launch_config(sp_t, 1, heads, n)
        launch_with_shared_memory(uncapped, grid, block, shared, 0, qd, kd, yd, lse, lengths, aty, dtype.type(scale), bool(causal), 1)

    exact_flops = attention_flops(1, heads, n, n, D, causal)  # 4·H·N²·d, halved for causal
    product_flops = exact_flops * (D + WIDTH) / (2 * D)  # 2·H·N²·(d + l)
    kernels = [
        ("exact, dv = d = 64", exact_flops, lambda: exact_attention(qd, kd, vd, lengths, causal=causal, scale=scale, out=o, lse=lse_x),
         lambda: exact_attention_kernel(dtype, D)[0]),
        (f"A·X, l = {WIDTH}", product_flops, lambda: attention_times(qd, kd, xd, lengths, causal=causal, scale=scale, out=ax, lse=lse_x),
         lambda: exact_attention_kernel(dtype, D, value_dim=WIDTH)[0]),
        (f"AᵀY, l = {WIDTH}", product_flops, lambda: attention_transpose_times(qd, kd, yd, lse, lengths, causal=causal, scale=scale, out=aty),
         lambda: attention_transpose_kernel(dtype, D, WIDTH)[0]),
    ]
    if dtype == np.float32:
        kernels.append((f"AᵀY, l = {WIDTH}, no reg cap", product_flops, transpose_uncapped, lambda: uncapped))
    rows = []
    for name, flops, fn, kernel in kernels:
        timing = (_wall_time_ms if SIMULATOR else cuda_time_ms)(fn, warmup=3, repeats=repeats)
        regs, local = resources(kernel())
        rows.append({"name": name, "ms": timing["median_ms"], "p90": timing["p90_ms"], "tflops": flops / timing["median_ms"] / 1e9, "regs": regs, "local": local})
    base = rows[0]["ms"]
    for r in rows:
        r["vs_exact"] = r["ms"] / base
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=16384, help="sequence length (default 16384)")
    parser.add_argument("--heads", type=int, default=8, help="heads of the timing runs (default 8)")
    parser.add_argument("--repeats", type=int, default=20, help="timed runs per kernel (default 20)")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "float64"])
    parser.add_argument("--skip-checks", action="store_true")
    args = parser.parse_args(argv)

    from numba import cuda

    from nkattn.timing import device_name

    if not cuda.is_available():
        print("no CUDA GPU: this script runs on the device", file=sys.stderr)
        return 2
    n = args.n
    from numba.core import config

    device = "CUDA simulator (a smoke test only: tiles, timings and precision are not the GPU's)" if config.ENABLE_CUDASIM else device_name()
    print(f"device: {device}   N = {n}, d = {D}, l = {WIDTH}", flush=True)
    checks = Checks()
    table = []
    for dt in args.dtypes:
        dtype = np.dtype(dt).type
        if not args.skip_checks:
            print(f"checks, {dt}:", flush=True)
            m = n - (37 if n > 1000 else 3)  # Nq != Nk both ways, off the tile grid
            check_case(checks, f"B1 H8 N{n}", dtype, 1, 8, 8, n, n, False, (n,), seed=10)
            check_case(checks, f"B2 H4 Hkv2 Nq{n} Nk{m} causal key_lengths", dtype, 2, 4, 2, n, m, True, (m, m * 5 // 9), seed=11)
            check_case(checks, f"B1 H2 Hkv1 Nq{m} Nk{n} causal", dtype, 1, 2, 1, m, n, True, (n,), seed=12)
        for causal in (False, True):
            print(f"timing, {dt}, {'causal' if causal else 'non-causal'} ...", flush=True)
            for r in time_kernels(np.dtype(dt), n, args.heads, args.repeats, causal):
                table.append(dict(dtype=dt, causal=causal, **r))

    print()
    if checks.rows:
        print(f"checks: {len(checks.rows) - len(checks.failed)} of {len(checks.rows)} passed")
        for name, _, detail in checks.failed:
            print(f"  FAIL {name}: {detail}")
    pred = (D + WIDTH) / (2 * D)
    print(f"B = 1, H = {args.heads}, N = {n}, d = {D}; median of {args.repeats} (CUDA events); "
          f"FLOP prediction for a product vs exact: {pred:.2f} ({(D + 48) / (2 * D):.3f} at the carried l = 48)")
    print(f"{'dtype':8s} {'mask':7s} {'kernel':28s} {'ms':>9s} {'p90 ms':>9s} {'TFLOP/s':>8s} {'vs exact':>8s} {'regs':>5s} {'local B':>8s}")
    for r in table:
        print(f"{r['dtype']:8s} {'causal' if r['causal'] else 'full':7s} {r['name']:28s} {r['ms']:9.2f} {r['p90']:9.2f} "
              f"{r['tflops']:8.2f} {r['vs_exact']:8.3f} {r['regs']:5d} {r['local']:8d}")
    return 1 if checks.failed else 0


if __name__ == "__main__":
    sys.exit(main())
