"""Error budgets for kernels, shared by tests and studies.

A kernel in dtype T passes when ``max|kernel - ref64| <= 2 * max|naive_T - ref64| + floor``:
`naive_T` is the plain formula computed in T (FlashAttention's rule), `floor` the
rounding noise of the float64 reference itself.
"""

from __future__ import annotations

import numpy as np

FLOAT64_FLOOR = 1e-13


def float32_floor(ref64) -> float:
    """One float32 ulp at the reference's largest magnitude: storing the exact answer
    in float32 already costs up to half of it, so 2x the naive error of a handful of
    elements (a single dot product at N = 1) can fall below what any float32 kernel
    reaches."""
    ref64 = np.asarray(ref64, dtype=np.float64)
    return float(np.finfo(np.float32).eps * np.abs(ref64[np.isfinite(ref64)]).max(initial=0.0))


def relative_error(x, ref) -> float:
    """max|x - ref| / max|ref| (max|ref| floored at the smallest normal, so empty outputs compare)."""
    x = np.asarray(x, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    if x.shape != ref.shape:
        raise ValueError(f"shape mismatch: {x.shape} vs {ref.shape}")
    if np.isnan(x).any():
        return float("inf")
    finite = np.isfinite(ref)
    if not np.array_equal(np.isfinite(x), finite) or not np.array_equal(x[~finite], ref[~finite]):
        return float("inf")
    diff = np.abs(x[finite] - ref[finite])
    scale = max(float(np.abs(ref[finite]).max(initial=0.0)), np.finfo(np.float64).tiny)
    return float(diff.max(initial=0.0) / scale)


def assert_within_budget(name: str, got, ref64, naive=None, floor: float = FLOAT64_FLOOR) -> None:
    """Fail with the tensor's name, the worst index, both values and the share of failing elements.

    Non-finite reference entries (lse = -inf of an empty row) must be matched exactly.
    """
    got = np.asarray(got, dtype=np.float64)
    ref64 = np.asarray(ref64, dtype=np.float64)
    if got.shape != ref64.shape:
        raise AssertionError(f"{name}: shape {got.shape} != reference shape {ref64.shape}")
    finite = np.isfinite(ref64)
    mismatch = ~finite & (got != ref64)
    if mismatch.any() or np.isnan(got).any():
        bad = np.argwhere(mismatch | np.isnan(got))[0]
        raise AssertionError(f"{name}: at {tuple(bad)} got {got[tuple(bad)]}, reference {ref64[tuple(bad)]}")
    budget = floor
    if naive is not None:
        naive = np.asarray(naive, dtype=np.float64)
        budget += 2.0 * float(np.abs(naive - ref64)[finite].max(initial=0.0))
    err = np.where(finite, np.abs(got - np.where(finite, ref64, 0.0)), 0.0)
    failing = err > budget
    if failing.any():
        worst = np.unravel_index(np.argmax(err), err.shape)
        raise AssertionError(
            f"{name}: max error {err[worst]:.3e} at {tuple(int(i) for i in worst)} exceeds budget {budget:.3e} "
            f"(got {got[worst]!r}, reference {ref64[worst]!r}); {failing.mean():.2%} of elements fail"
        )


def assert_bit_identical(name: str, got, expected) -> None:
    # contiguous copies: strided views (a column of a padded buffer) cannot be reinterpreted as bytes
    got = np.ascontiguousarray(np.atleast_1d(np.asarray(got)))
    expected = np.ascontiguousarray(np.atleast_1d(np.asarray(expected)))
    if got.shape != expected.shape or got.dtype != expected.dtype:
        raise AssertionError(f"{name}: {got.shape} {got.dtype} vs {expected.shape} {expected.dtype}")
    same = (got.view(np.uint8).reshape(*got.shape, -1) == expected.view(np.uint8).reshape(*expected.shape, -1)).all(-1)
    if not same.all():
        bad = tuple(int(i) for i in np.argwhere(~same)[0])
        raise AssertionError(
            f"{name}: {np.mean(~same):.2%} of elements differ in bits; first at {bad}: "
            f"{got[bad]!r} vs {expected[bad]!r}"
        )


def nan_padded_device_view(x, pad=3):
    """x placed inside a NaN-filled buffer, as a strided device view: a kernel that reads
    outside its inputs, or assumes contiguity, turns the output NaN or changes its bits."""
    from numba import cuda

    b, h, n, d = x.shape
    buf = np.full((b + 1, h + 2, n + 2 * pad, 2 * d), np.nan, dtype=x.dtype)
    buf[1:, 1 : h + 1, pad : pad + n, d:] = x
    return cuda.to_device(buf)[1:, 1 : h + 1, pad : pad + n, d:]
