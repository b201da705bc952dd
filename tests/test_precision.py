"""Low-precision references (`nkattn.reference.precision`): each format's rounding against
ml_dtypes, its error against float64 within its written bound, the analyzers against direct
float64 formulas, the policies' decisions on constructed heads, and bad inputs; then
``nkattn.attention(..., precision="auto", tolerance=...)``: its decisions are the reference
policy's, each head is what a call in its format gives, and what it refuses; the precision
study's end-to-end attention hook and neighbour measures; last, the analyzers on the GPU
(`nkattn.cuda_kernels.precision`, `nkattn.precision`) against the host analysis."""

from __future__ import annotations

import dataclasses
import functools
import logging

import ml_dtypes
import numpy as np
import pytest
from numba import cuda

import nkattn
from nkattn.api import plan
from nkattn.cuda_kernels import precision as kp
from nkattn.cuda_kernels.online_softmax import kernel_order
from nkattn.precision import NOT_MEASURED, device_head_stats
from nkattn.reference import precision as pr
from nkattn.reference.bert import BertConfig, BertEncoder, random_weights
from nkattn.reference.exact import (
    _expand_kv_heads,
    attention_ref,
    streaming_attention_ref,
    visible_key_counts,
)
from nkattn.studies import precision as ps
from nkattn.testing import assert_bit_identical, assert_within_budget, float32_floor
from tests.conftest import REAL_GPU

from .conftest import SIMULATOR

FORMATS = tuple(pr.FORMATS)


def _inputs(seed, b, h, hkv, nq, nk, d, dv, *, temperature=1.0):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(b, h, nq, d)) * temperature, rng.normal(size=(b, hkv, nk, d)),
            rng.normal(size=(b, hkv, nk, dv)))


# --------------------------------------------------------------------------------------
# rounding
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16", "e4m3"])
def test_convert_is_the_ml_dtypes_cast_of_float32(dtype):
    rng = np.random.default_rng(0)
    limit = {"fp32": 1e30, "fp16": 6e4, "bf16": 1e30, "e4m3": 448}[dtype]
    x = np.concatenate([rng.normal(size=2000), rng.uniform(-limit, limit, 200), np.geomspace(1e-12, limit, 200)])
    x32 = x.astype(np.float32)
    expected = x32.astype(pr.DTYPES[dtype]).astype(np.float64)
    np.testing.assert_array_equal(pr.convert(x32.astype(np.float64), dtype), expected)


@pytest.mark.parametrize(("dtype", "x", "rounded"), [
    ("bf16", 1 + 2**-8, 1.0),  # a tie goes to the even neighbour
    ("bf16", 1 + 3 * 2**-8, 1 + 2**-6),
    ("fp16", 1 + 2**-11, 1.0),
    ("e4m3", 1 + 2**-4, 1.0),
    ("e4m3", 1 + 3 * 2**-4, 1.25),
    ("e4m3", 2**-10, 0.0),  # half the smallest subnormal, a tie, to 0
    ("e4m3", 3 * 2**-10, 2**-8),
])
def test_convert_rounds_to_nearest_even(dtype, x, rounded):
    assert pr.convert(np.array([x]), dtype)[0] == rounded
    assert pr.convert(np.array([-x]), dtype)[0] == -rounded


def test_round_input_rounds_float64_to_bf16_once():
    """ml_dtypes goes float64 -> float32 -> bf16: 1 + 2^-8 + 2^-30 would land on the tie, then on 1."""
    x = np.array([1 + 2**-8 + 2**-30])
    assert x.astype(ml_dtypes.bfloat16).astype(np.float64)[0] == 1.0
    assert pr.round_input(x, "bf16")[0] == 1 + 2**-7


@pytest.mark.parametrize("fmt", ["fp8", "int8-fp16", "int8-fp8"])
def test_operands_are_the_format_numbers_with_full_blocks(fmt):
    """Every operand value is representable; each non-zero block reaches the format's largest value;
    the dequantized operand is within its stated error of the input."""
    f = pr.FORMATS[fmt]
    q, k, v = _inputs(1, 1, 2, 2, 300, 300, 32, 16)
    k[0, 1, :, 3] += 30  # an outlier channel
    ops = pr.operands(q, k, v, fmt)
    largest = {"e4m3": pr.E4M3_MAX, "int8": pr.INT8_MAX}
    for name, op, block, kind in (("q", ops.q, f.q_block, f.qk), ("k", ops.k, f.k_block, f.qk)):
        if kind == "int8":
            assert np.array_equal(op.values, np.round(op.values)) and np.abs(op.values).max() <= 127, name
        else:
            np.testing.assert_array_equal(pr.convert(op.values, kind), op.values)
        for start in range(0, 300, block):
            assert np.abs(op.values[0, 0, start:start + block]).max() == largest[kind], (name, start)
    if f.pv == "e4m3":
        np.testing.assert_array_equal(pr.convert(ops.v.values, "e4m3"), ops.v.values)
    q_in = pr.round_input(q, f.input)
    pre = pr.f32(q_in * pr.f32(1 / np.sqrt(32) * pr.LOG2E)) if f.qk == "int8" else q_in
    scale_back = pr.f32(1 / np.sqrt(32) * pr.LOG2E) if f.qk == "int8" else 1.0
    assert (np.abs(ops.q.dequantized() - pre) / scale_back <= ops.q.err).all()


def test_fp8_scales_are_per_block():
    """Changing one key changes the e4m3 values of its own 128-key block of K only."""
    q, k, v = _inputs(2, 1, 1, 1, 4, 300, 16, 16)
    base = pr.operands(q, k, v, "fp8").k.values
    k[0, 0, 130, 0] = 50.0
    moved = pr.operands(q, k, v, "fp8").k.values
    changed = (base != moved).any(axis=-1)[0, 0]
    assert changed[128:256].any() and not changed[:128].any() and not changed[256:].any()


def test_k_smoothing_removes_a_shared_offset():
    """A key offset shared by every key moves every score of a row alike. Smoothed, the int8
    error stays that of the unshifted keys; without smoothing the offset takes the int8 range.
    (int8-fp16: in int8-fp8 the e4m3 P·V error is as large as the unsmoothed QK error.)"""
    fmt = "int8-fp16"
    q, k, v = _inputs(3, 1, 2, 2, 40, 90, 32, 16)
    o64, _ = attention_ref(q, k, v)

    def error(fmt, keys):
        return np.abs(pr.emulate(q, keys, v, fmt)[0] - o64).max()

    plain, shifted = error(fmt, k), error(fmt, k + 20.0)
    unsmoothed = error(dataclasses.replace(pr.FORMATS[fmt], smooth_k=False), k + 20.0)
    assert shifted <= 2 * plain and unsmoothed >= 3 * shifted, (plain, shifted, unsmoothed)
    assert (np.abs(pr.emulate(q, k + 20.0, v, fmt)[0] - o64) <= pr.error_bound(q, k + 20.0, v, fmt)).all()


# --------------------------------------------------------------------------------------
# error against float64 within the written bound
# --------------------------------------------------------------------------------------

GRID = [
    # (b, h, hkv, nq, nk, d, dv, causal, key_lengths)
    pytest.param(1, 2, 2, 1, 1, 16, 16, False, None, id="B1-H2-Nq1-Nk1-d16"),
    pytest.param(1, 2, 1, 17, 129, 32, 32, False, None, id="B1-H2-Hkv1-Nq17-Nk129-d32"),
    pytest.param(2, 4, 2, 113, 203, 64, 48, True, [150, 0], id="B2-H4-Hkv2-Nq113-Nk203-d64-dv48-causal-lengths"),
    pytest.param(1, 2, 2, 203, 127, 16, 16, True, None, id="B1-H2-Nq203-Nk127-d16-causal"),
    pytest.param(1, 1, 1, 128, 256, 32, 8, False, [255], id="B1-H1-Nq128-Nk256-d32-dv8-lengths"),
]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(("b", "h", "hkv", "nq", "nk", "d", "dv", "causal", "key_lengths"), GRID)
@pytest.mark.parametrize("temperature", [1.0, 4.0], ids=["t1", "t4"])
def test_error_within_written_bound(fmt, b, h, hkv, nq, nk, d, dv, causal, key_lengths, temperature):
    q, k, v = _inputs(nq * 7 + nk, b, h, hkv, nq, nk, d, dv, temperature=temperature)
    o, lse = pr.emulate(q, k, v, fmt, causal=causal, key_lengths=key_lengths)
    o64, _ = attention_ref(q, k, v, causal=causal, key_lengths=key_lengths)
    bound = pr.error_bound(q, k, v, fmt, causal=causal, key_lengths=key_lengths)
    err = np.abs(o - o64)
    worst = np.unravel_index(np.argmax(err - bound), err.shape)
    assert (err <= bound).all(), f"{fmt}: error {err[worst]:.3e} > bound {bound[worst]:.3e} at {worst}"
    # the values are the output dtype's, and rows with no key are exactly O = 0, lse = -inf
    np.testing.assert_array_equal(pr.convert(o, pr.FORMATS[fmt].out), o)
    empty = visible_key_counts(b, nq, nk, causal, key_lengths)[:, None, :] == 0
    empty = np.broadcast_to(empty, lse.shape)
    assert (o[empty] == 0).all() and (lse[empty] == -np.inf).all()
    assert np.isfinite(lse[~empty]).all()


def test_fp32_meets_the_float32_budget():
    """The fp32 emulation is a float32 kernel: the repo's rule against naive float32 holds."""
    q, k, v = _inputs(4, 2, 2, 2, 70, 130, 64, 64, temperature=3.0)
    o, _ = pr.emulate(q, k, v, "fp32", causal=True)
    o64, _ = attention_ref(q, k, v, causal=True)
    naive, _ = attention_ref(q, k, v, causal=True, compute_dtype=np.float32)
    assert_within_budget("O", o, o64, naive=naive, floor=float32_floor(o64))


def test_emulation_refuses_non_finite_inputs_and_ignores_unread_keys():
    q, k, v = _inputs(5, 1, 1, 1, 8, 20, 16, 16)
    k_bad = k.copy()
    k_bad[0, 0, 15] = np.inf
    with pytest.raises(ValueError, match="k must be finite"):
        pr.emulate(q, k_bad, v, "fp8")
    # past key_lengths nothing is read: not even into a block's scale
    o_bad, _ = pr.emulate(q, k_bad, v, "fp8", key_lengths=[15])
    o_ok, _ = pr.emulate(q, k, v, "fp8", key_lengths=[15])
    np.testing.assert_array_equal(o_bad, o_ok)


# --------------------------------------------------------------------------------------
# analyzers
# --------------------------------------------------------------------------------------


def test_analyzers_match_direct_float64():
    b, h, hkv, nq, nk, d = 2, 4, 2, 60, 150, 16
    q, k, v = _inputs(6, b, h, hkv, nq, nk, d, d, temperature=2.0)
    lengths = [150, 40]
    a = pr.analyze(q, k, v, causal=True, key_lengths=lengths, block_m=32, block_n=64)
    counts = visible_key_counts(b, nq, nk, True, lengths)
    for bi in range(b):
        for hi in range(h):
            kh = k[bi, hi // 2]
            for i in range(nq):
                n = counts[bi, i]
                if n == 0:
                    assert np.isnan(a.entropy[bi, hi, i]) and np.isnan(a.spread[bi, hi, i])
                    continue
                s = q[bi, hi, i] @ kh[:n].T / np.sqrt(d)
                p = np.exp(s - s.max())
                p /= p.sum()
                assert a.entropy[bi, hi, i] == pytest.approx(-(p * np.log(p)).sum(), rel=1e-10, abs=1e-12)
                assert a.spread[bi, hi, i] == pytest.approx(np.log(p.max()), abs=1e-12)
                assert a.max_abs_score[bi, hi, i] == pytest.approx(np.abs(s).max(), rel=1e-13)
                assert a.min_abs_score[bi, hi, i] == pytest.approx(np.abs(s[s != 0]).min(), rel=1e-13)
            for blk in range(-(-nq // 32)):
                assert a.q_absmax[bi, hi, blk] == np.abs(q[bi, hi, 32 * blk:32 * blk + 32]).max()
        for kv in range(hkv):
            valid = np.arange(nk) < lengths[bi]
            for blk in range(-(-nk // 64)):
                keys = slice(64 * blk, 64 * blk + 64)
                assert a.k_absmax[bi, kv, blk] == np.abs(k[bi, kv, keys][valid[keys]]).max(initial=0.0)
                assert a.v_absmax[bi, kv, blk] == np.abs(v[bi, kv, keys][valid[keys]]).max(initial=0.0)
    stats = pr.head_stats(a)
    assert stats["entropy_mean"].shape == (b, h)
    np.testing.assert_allclose(stats["entropy_mean"], np.nanmean(a.entropy, axis=-1))
    np.testing.assert_allclose(stats["max_p"], np.exp(np.nanmax(a.spread, axis=-1)))
    blocks = pr.block_stats(a)
    np.testing.assert_allclose(blocks["max_abs_score"][..., 0], np.nanmax(a.max_abs_score[..., :32], axis=-1))
    assert blocks["entropy_mean"].shape == (b, h, 2)


# --------------------------------------------------------------------------------------
# policies on constructed heads
# --------------------------------------------------------------------------------------


def _constructed_heads(n=32, d=32):
    """Head 0 one-hot (each query matches one key by a margin of 40), head 1 uniform (every
    score 0.5), head 2 a huge dynamic range (scores from about 1e-7 to about 100)."""
    rng = np.random.default_rng(7)
    q = np.zeros((1, 3, n, d))
    k = np.zeros((1, 3, n, d))
    basis = np.eye(d)[np.arange(n) % d]
    q[0, 0], k[0, 0] = 40 * basis, basis * np.sqrt(d)
    q[0, 1, :, 0] = 0.5 * np.sqrt(d)
    k[0, 1, :, 0] = 1.0
    q[0, 2, :, 0] = np.sqrt(d)
    k[0, 2, :, 0] = np.geomspace(1e-7, 100, n)
    v = rng.normal(size=(1, 3, n, d))
    return q, k, v


def test_policies_on_constructed_heads():
    q, k, v = _constructed_heads()
    stats = pr.head_stats(pr.analyze(q, k, v))
    assert stats["entropy_mean"][0, 0] < 1e-6 and stats["max_p"][0, 0] > 0.999
    assert stats["entropy_norm"][0, 1] == pytest.approx(1.0) and stats["dynamic_range"][0, 1] == pytest.approx(1.0)
    assert stats["dynamic_range"][0, 2] > 1e8
    # seed 001: one-hot -> FP32 (entropy < 1); uniform -> FP16 (range 1, |s| in [6e-5, 65504]); huge range -> FP32
    assert list(pr.choose(q, k, v, "adaattn").formats[0]) == ["fp32", "fp16", "fp32"]
    # the thresholds: max p > 0.95; normalised entropy 1 > 0.8; max score 100 > 50
    assert list(pr.choose(q, k, v, "adaattn-issue").formats[0]) == ["fp32", "fp16", "fp32"]
    assert set(pr.choose(q, k, v, "sage").formats.ravel()) == {"int8-fp8"}
    for name in FORMATS:
        assert set(pr.choose(q, k, v, name).formats.ravel()) == {name}


def test_oracle_takes_the_cheapest_format_within_tolerance():
    q, k, v = _constructed_heads()
    d = pr.choose(q, k, v, "oracle", tolerance=1e-2)
    for h in range(3):
        ok = [f for f in pr.BY_COST if d.measured[0, h, FORMATS.index(f)] <= 1e-2]
        assert d.formats[0, h] == ok[0]
    # below every format's error: the fallback is fp32
    assert set(pr.choose(q, k, v, "oracle", tolerance=1e-300).formats.ravel()) == {"fp32"}


def test_auto_follows_its_predictor_and_is_deterministic():
    q, k, v = _inputs(8, 1, 4, 4, 48, 48, 16, 16, temperature=2.0)
    coef = np.zeros((len(FORMATS), 1 + len(pr.FEATURES)))
    predicted = {"fp32": 1e-7, "fp16": 1e-3, "bf16": 5e-3, "fp8": 5e-2, "int8-fp16": 2e-2, "int8-fp8": 4e-2}
    coef[:, 0] = np.log([predicted[f] for f in FORMATS])
    fixed = pr.Predictor(coef, np.zeros(len(FORMATS)), source="test")
    for tol, expected in ((1e-1, "fp8"), (3e-2, "int8-fp16"), (1e-2, "fp16"), (1e-4, "fp32"), (1e-9, "fp32")):
        d = pr.choose(q, k, v, "auto", tolerance=tol, predictor=fixed)
        assert set(d.formats.ravel()) == {expected}, tol
    again = pr.choose(q, k, v, "auto", tolerance=1e-2, predictor=fixed)
    np.testing.assert_array_equal(again.predicted, d.predicted)


def test_fitted_predictor_bounds_the_heads_it_was_fitted_on():
    q, k, v = pr.calibration_heads(seed=3, heads=24, n=48, d=16)
    stats = pr.head_stats(pr.analyze(q, k, v))
    measured = pr.measured_errors(q, k, v)
    fitted = pr.fit_predictor(stats, measured, source="test")
    assert (fitted.predict(stats) >= measured * (1 - 1e-9)).all()
    auto = pr.choose(q, k, v, "auto", tolerance=1e-2, predictor=fitted)
    picked = np.take_along_axis(measured, np.vectorize(FORMATS.index)(auto.formats)[..., None], -1)[..., 0]
    assert (picked <= 1e-2).all()


def test_precision_attention_emulates_each_head_in_its_format():
    q, k, v = _constructed_heads(n=32, d=16)
    o, lse, d = pr.precision_attention(q, k, v, "adaattn")
    assert len(set(d.formats[0])) == 2
    for h, name in enumerate(d.formats[0]):
        o_f, lse_f = pr.emulate(q, k, v, name)
        np.testing.assert_array_equal(o[0, h], o_f[0, h])
        np.testing.assert_array_equal(lse[0, h], lse_f[0, h])


# --------------------------------------------------------------------------------------
# bad inputs
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("precision", ["fp4", "FP16", None, 16])
def test_unknown_precision_is_named(precision):
    q, k, v = _inputs(9, 1, 1, 1, 4, 4, 16, 16)
    with pytest.raises(ValueError, match="precision must be one of"):
        pr.choose(q, k, v, precision)
    with pytest.raises(ValueError, match="precision must be one of"):
        pr.emulate(q, k, v, precision)


@pytest.mark.parametrize("tolerance", [0, -1e-3, float("nan"), float("inf"), True, "1e-2"])
def test_bad_tolerance_is_named(tolerance):
    q, k, v = _inputs(9, 1, 1, 1, 4, 4, 16, 16)
    with pytest.raises(ValueError, match="tolerance must be a finite number > 0"):
        pr.choose(q, k, v, "auto", tolerance=tolerance)


def test_tolerance_goes_with_auto_and_oracle_only():
    q, k, v = _inputs(9, 1, 1, 1, 4, 4, 16, 16)
    with pytest.raises(ValueError, match="needs tolerance="):
        pr.choose(q, k, v, "auto")
    with pytest.raises(ValueError, match="tolerance applies to precision in"):
        pr.choose(q, k, v, "bf16", tolerance=1e-2)


def test_auto_defaults_to_the_calibrated_predictor():
    q, k, v = _constructed_heads()
    d = pr.choose(q, k, v, "auto", tolerance=1e-2)
    assert pr.default_predictor().source == "calibration_heads(seed=0)"
    assert d.predicted.shape == (1, 3, len(FORMATS)) and set(d.formats.ravel()) <= set(FORMATS)
    np.testing.assert_array_equal(pr.choose(q, k, v, "auto", tolerance=1e-2).formats, d.formats)


# --------------------------------------------------------------------------------------
# precision="auto" in nkattn.attention
# --------------------------------------------------------------------------------------


@functools.cache
def _small_predictor() -> pr.Predictor:
    """Fitted as `default_predictor` is, on fewer and smaller calibration heads (0.2 s; the default
    takes 4 to 16 s on 2 cores); the API must follow whatever `default_predictor` returns."""
    q, k, v = pr.calibration_heads(seed=0, heads=24, n=48, d=16)
    return pr.fit_predictor(pr.head_stats(pr.analyze(q, k, v)), pr.measured_errors(q, k, v), source="test")


@pytest.fixture
def small_predictor(monkeypatch):
    monkeypatch.setattr(pr, "default_predictor", _small_predictor)


@dataclasses.dataclass(frozen=True)
class _Predicts:
    """Predicts `errors` (B, H, len(FORMATS)) whatever the heads."""

    errors: np.ndarray

    def predict(self, stats):
        return self.errors


def _force(monkeypatch, formats):
    """Make precision='auto' choose formats[b][h] for head (b, h) at any tolerance below 1."""
    chosen = np.array(formats, dtype=object)
    errors = np.where(chosen[..., None] == np.array(FORMATS, dtype=object), 0.0, 1.0)
    monkeypatch.setattr(pr, "default_predictor", lambda: _Predicts(errors))


def _as(x, dtype):
    return tuple(np.asarray(a).astype(dtype) for a in x)


@pytest.mark.parametrize("tolerance", [1e-1, 3e-2, 1e-3, 1e-6])
def test_auto_decides_as_the_reference_policy_on_constructed_heads(small_predictor, tolerance):
    q, k, v = _as(_constructed_heads(n=32, d=16), np.float32)
    _, decisions = nkattn.attention(q, k, v, precision="auto", tolerance=tolerance, return_decisions=True,
                                    backend="reference")
    expected = pr.choose(*_as((q, k, v), np.float64), "auto", tolerance=tolerance)
    np.testing.assert_array_equal(decisions.formats, expected.formats)
    np.testing.assert_array_equal(decisions.predicted, expected.predicted)
    assert decisions.precision == "auto" and decisions.tolerance == tolerance
    if tolerance == 1e-3:  # one-hot rows and the huge dynamic range need more bits than uniform rows
        assert list(decisions.formats[0]) == ["fp32", "fp16", "fp32"]
    if tolerance == 1e-6:  # fp32 meets it, or nothing does and fp32 is the fallback
        assert set(decisions.formats.ravel()) == {"fp32"}


def test_auto_passes_masks_and_scale_to_the_policy(small_predictor):
    q, k, v = _inputs(10, 2, 4, 2, 20, 30, 16, 16, temperature=3.0)
    given = {"causal": True, "scale": 0.4, "key_lengths": np.array([30, 11])}
    _, decisions = nkattn.attention(q, k, v, precision="auto", tolerance=3e-2, return_decisions=True,
                                    backend="reference", **given)
    expected = pr.choose(q, k, v, "auto", tolerance=3e-2, **given)
    np.testing.assert_array_equal(decisions.predicted, expected.predicted)
    np.testing.assert_array_equal(decisions.formats, expected.formats)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_auto_on_the_reference_is_each_heads_emulation(small_predictor, dtype):
    """GQA, causal with Nq != Nk, and a batch whose rows see no key (O = 0, lse = -inf)."""
    q, k, v = _as(_inputs(11, 2, 4, 2, 24, 40, 16, 8, temperature=2.0), dtype)
    q[0, 1] *= 0.1  # a diffuse head
    q[0, 3] *= 30.0  # a sharp one
    lengths = np.array([40, 0])
    out, lse, decisions = nkattn.attention(q, k, v, causal=True, key_lengths=lengths, precision="auto",
                                           tolerance=3e-2, return_lse=True, return_decisions=True, backend="reference")
    assert out.dtype == dtype and lse.dtype == dtype
    assert len(set(decisions.formats[0])) >= 3, decisions.formats
    emulated = {f: pr.emulate(*_as((q, k, v), np.float64), f, causal=True, key_lengths=lengths)
                for f in set(decisions.formats.ravel())}
    for (b, h), fmt in np.ndenumerate(decisions.formats):
        o_f, lse_f = emulated[fmt]
        np.testing.assert_array_equal(out[b, h], o_f[b, h].astype(dtype), err_msg=f"O of head {(b, h)} ({fmt})")
        np.testing.assert_array_equal(lse[b, h], lse_f[b, h].astype(dtype), err_msg=f"lse of head {(b, h)} ({fmt})")
    assert (out[1] == 0).all() and (lse[1] == -np.inf).all()


def test_auto_on_cuda_runs_each_head_on_the_kernel_of_its_format(monkeypatch):
    """Each head's bits are those of a plain call in its format's dtype; heads that see no key (batch 1)
    need no kernel, whatever their format."""
    q, k, v = _as(_constructed_heads(n=8, d=16), np.float32)
    q, k, v = (np.concatenate([x, x]) for x in (q, k, v))
    _force(monkeypatch, [["fp32", "fp16", "bf16"], ["fp8", "int8-fp16", "fp16"]])
    lengths = np.array([8, 0])
    out, lse = nkattn.attention(q, k, v, key_lengths=lengths, precision="auto", tolerance=1e-2, return_lse=True,
                                backend="cuda")
    assert out.dtype == np.float32 and lse.dtype == np.float32
    for h, dtype in enumerate((np.float32, np.float16, ml_dtypes.bfloat16)):
        alone, alone_lse = nkattn.attention(*(x[:1, h:h + 1].astype(dtype) for x in (q, k, v)), return_lse=True,
                                            backend="cuda")
        np.testing.assert_array_equal(out[0, h], alone[0, 0].astype(np.float32), err_msg=f"O of head {h}")
        np.testing.assert_array_equal(lse[0, h], alone_lse[0, 0], err_msg=f"lse of head {h}")
    assert (out[1] == 0).all() and (lse[1] == -np.inf).all()


def test_auto_is_deterministic_and_logs_one_line_per_call(small_predictor, caplog):
    q, k, v = _inputs(12, 1, 3, 3, 16, 16, 16, 16, temperature=2.0)
    runs = []
    for _ in range(2):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="nkattn.api"):
            runs.append(nkattn.attention(q, k, v, precision="auto", tolerance=1e-2, return_lse=True,
                                         return_decisions=True, backend="reference"))
        assert len(caplog.records) == 1
        runs[-1] += (caplog.records[0].getMessage(),)
    (out, lse, decisions, line), (out2, lse2, decisions2, line2) = runs
    np.testing.assert_array_equal(out, out2)
    np.testing.assert_array_equal(lse, lse2)
    np.testing.assert_array_equal(decisions.formats, decisions2.formats)
    np.testing.assert_array_equal(decisions.predicted, decisions2.predicted)
    assert line == line2
    assert line.startswith("precision='auto', tolerance=0.01, reference (format per head): ")
    for fmt in set(decisions.formats.ravel()):
        assert f"{fmt} on " in line


def test_formats_without_a_kernel_are_cuda_reasons_naming_format_and_heads(monkeypatch):
    q, k, v = _as(_inputs(13, 1, 3, 3, 8, 8, 16, 16), np.float32)
    _force(monkeypatch, [["fp16", "int8-fp8", "int8-fp16"]])
    with pytest.raises(ValueError) as info:
        nkattn.attention(q, k, v, precision="auto", tolerance=1e-2, backend="cuda")
    message = str(info.value)
    assert ("cuda (format per head): precision='auto' chose int8-fp8 for 1 of 3 heads, (b, h) = (0, 1): no CUDA "
            "kernel computes int8-fp8 yet (backend='reference' emulates it)") in message
    assert "chose int8-fp16" not in message  # int8-fp16 has its kernel (nkattn.cuda_kernels.int8)
    assert "chose fp16" not in message  # fp16 has its kernel
    # backend="auto" takes the emulation: host inputs quietly, device inputs with a warning
    assert plan(q, k, v, precision="auto", tolerance=1e-2)[1].label == "reference (format per head)"
    expected = nkattn.attention(q, k, v, precision="auto", tolerance=1e-2, backend="reference")
    with pytest.warns(nkattn.FallbackWarning, match="no CUDA kernel computes int8-fp8 yet"):
        out = nkattn.attention(*(cuda.to_device(x) for x in (q, k, v)), precision="auto", tolerance=1e-2)
    np.testing.assert_array_equal(out.copy_to_host(), expected)


def test_a_format_whose_kernel_refuses_the_shape_is_a_reason(monkeypatch):
    """fp32 heads go to the FFMA kernel, which tiles d in (16, 32, ...): d = 24 is refused, not run as tf32x3."""
    q, k, v = _as(_inputs(14, 1, 2, 2, 8, 8, 24, 24), np.float32)
    _force(monkeypatch, [["fp32", "fp16"]])
    with pytest.raises(ValueError, match=r"chose fp32 for 1 of 2 heads, \(b, h\) = \(0, 0\), and no kernel takes "
                                         r"float32 here: .*cuda \(FFMA kernel\): the FFMA kernels support d in"):
        nkattn.attention(q, k, v, precision="auto", tolerance=1e-2, backend="cuda")


AUTO_BAD = [
    pytest.param({"precision": "fp4"}, ValueError,
                 r"precision must be None or one of \('fp32', 'tf32x3', 'tf32', 'auto'\), got 'fp4'", id="precision"),
    pytest.param({"precision": "auto"}, ValueError, r"precision='auto' needs tolerance=", id="no-tolerance"),
    *(pytest.param({"precision": "auto", "tolerance": t}, ValueError, "tolerance must be a finite number > 0",
                   id=f"tolerance-{t!r}") for t in (0, -1e-3, float("nan"), float("inf"), True, "1e-3")),
    pytest.param({"tolerance": 1e-3}, ValueError, r"tolerance applies to precision in \('auto',\) only .* "
                 r"got tolerance=0.001 with precision=None", id="tolerance-alone"),
    pytest.param({"precision": "tf32", "tolerance": 1e-3}, ValueError, "tolerance applies to precision in",
                 id="tolerance-tf32"),
    pytest.param({"precision": "auto", "tolerance": 1e-3, "method": "lsh"}, ValueError,
                 "method='lsh' takes no option tolerance: tolerance only applies to method='exact' or method='lowrank'",
                 id="lsh-tolerance"),
    pytest.param({"precision": "auto", "method": "lsh"}, ValueError,
                 r"precision='auto' applies to method='exact' only; method='lsh' takes precision None or one of "
                 r"\('fp32', 'tf32x3', 'tf32'\)", id="lsh"),
    pytest.param({"precision": "auto", "tolerance": 1e-2, "method": "lowrank"}, ValueError,
                 "precision='auto' applies to method='exact' only", id="lowrank"),
    pytest.param({"precision": "auto", "tolerance": 1e-2, "dtype": np.float16}, ValueError,
                 "precision='auto' rounds each head from the input down to its format, so it takes float32 or "
                 "float64 inputs; these are float16", id="float16"),
    pytest.param({"return_decisions": True}, ValueError,
                 r"return_decisions=True returns the formats a precision in \('auto',\) chose per head, got "
                 "precision=None", id="decisions-without-auto"),
    pytest.param({"precision": "auto", "tolerance": 1e-2, "return_decisions": "yes"}, TypeError,
                 "return_decisions must be True or False", id="decisions-flag"),
    pytest.param({"precision": "auto", "tolerance": 1e-2, "check_finite": False, "nan": True}, ValueError,
                 r"q holds nan at index \(0, 0, 1, 2\); precision='auto' needs finite q whatever check_finite says",
                 id="nan"),
]


@pytest.mark.parametrize("given, exc, message", AUTO_BAD)
def test_bad_auto_calls_are_named(given, exc, message):
    given = dict(given)
    q, k, v = _as(_inputs(15, 1, 1, 1, 4, 4, 16, 16), given.pop("dtype", np.float32))
    if given.pop("nan", False):
        q[0, 0, 1, 2] = np.nan
    with pytest.raises(exc, match=message):
        nkattn.attention(q, k, v, **given)


# --------------------------------------------------------------------------------------
# the precision study's end-to-end hook (its quick run: tests/test_studies.py)
# --------------------------------------------------------------------------------------

TINY_BERT = BertConfig(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128, max_position=48,
                       vocab_size=50)


@functools.cache
def _tiny_encoder() -> BertEncoder:
    return BertEncoder(random_weights(TINY_BERT, seed=3), TINY_BERT)


# each gives this encoder's heads two or more formats, so a mix-up between heads shows
@pytest.mark.parametrize(("policy", "tolerance"), [("adaattn", None), ("adaattn-issue", None), ("oracle", 1e-2),
                                                   ("auto", 1e-3)])
def test_policy_hook_chooses_each_layers_heads_as_choose_and_emulates_them(policy, tolerance):
    ids = np.random.default_rng(0).integers(1, TINY_BERT.vocab_size, (2, 40))
    lengths = np.array([40, 29])  # a padded row: the hook must pass key_lengths on
    hook = ps.PolicyAttention(policy, tolerance, _small_predictor())
    out = _tiny_encoder().forward(ids, lengths, attention=hook, trace=True)
    assert len(hook.formats) == TINY_BERT.num_layers
    assert len(set(np.concatenate([f.ravel() for f in hook.formats]))) >= 2
    for layer, formats in zip(out.layers, hook.formats):
        expected = pr.choose(layer.q, layer.k, layer.v, policy, tolerance=tolerance, key_lengths=lengths,
                             predictor=_small_predictor())
        np.testing.assert_array_equal(formats, expected.formats)
        for name in set(formats.ravel()):
            o, _ = pr.emulate(layer.q, layer.k, layer.v, name, key_lengths=lengths)
            np.testing.assert_array_equal(layer.output[formats == name], o[formats == name])


def test_fp32_everywhere_keeps_embeddings_and_neighbours():
    encoder = _tiny_encoder()
    ids = np.random.default_rng(1).integers(1, TINY_BERT.vocab_size, (8, 40))
    exact = encoder.forward(ids).sentence_embeddings()
    fp32 = encoder.forward(ids, attention=ps.PolicyAttention("fp32")).sentence_embeddings()
    assert np.abs(fp32 - exact).max() <= 1e-6
    records = ps.end_to_end(encoder, ids, range(10, 18), _small_predictor(), policies=[("fp32", None)],
                            progress=False)
    assert [r["passage"] for r in records] == list(range(10, 18))
    assert all(r["top1_agrees"] and r["top5_overlap"] == 1 and r["one_minus_cos"] <= 5e-13 for r in records)
    heads = TINY_BERT.num_layers * TINY_BERT.num_heads
    assert all(r["heads_fp32"] == heads and r["mean_cost"] == ps.round_sig(pr.FORMATS["fp32"].cost) for r in records)
    summary = ps.summarize_e2e(records)["fp32"]
    assert summary["top1_agreement"] == 1 and summary["top1_disagreements"] == 0 and summary["formats"] == {"fp32": 1}


def test_neighbour_agreement_and_one_minus_cosine_on_constructed_embeddings():
    angles = np.array([0.0, 0.1, 0.3, 0.31, 1.5, 2.5, 3.7])
    unit = np.stack([np.cos(angles), np.sin(angles)], axis=-1)
    assert list(ps.nearest_neighbours(unit, 2)[0]) == [1, 2]
    np.testing.assert_allclose(ps.top1_gap(unit)[:2], [np.cos(0.1) - np.cos(0.3), np.cos(0.1) - np.cos(0.2)])
    moved = unit.copy()
    moved[0] = [np.cos(0.22), np.sin(0.22)]  # nearest 2 (0.08), then 3 (0.09); 1 is 0.12 away
    top1, overlap = ps.neighbour_agreement(moved, unit, k=2)
    assert list(top1) == [False] + [True] * 6
    # top-2 sets: row 0 {1, 2} -> {2, 3}; rows 2 and 3 now have row 0 second instead of row 1
    assert list(overlap) == [0.5, 1.0, 0.5, 0.5, 1.0, 1.0, 1.0]
    # |a - b|^2 / 2 is 1 - cos, and stays accurate where 1 - a·b is float64 rounding
    np.testing.assert_allclose(ps.one_minus_cosine(unit[0], unit[1:]), 1 - np.cos(angles[1:]), rtol=1e-12)
    tiny = np.array([np.cos(1e-9), np.sin(1e-9)])
    assert ps.one_minus_cosine(unit[0], tiny) == pytest.approx(0.5e-18, rel=1e-6)


# --------------------------------------------------------------------------------------
# the analyzers on the GPU (nkattn.cuda_kernels.precision, nkattn.precision)
# --------------------------------------------------------------------------------------


gpu = pytest.mark.gpu


def _kernel_order_scores(q, k, scale, chunk):
    """scale · q·k summed as the kernel does: chunks of `chunk` elements in order, then the chunk sums."""
    k = _expand_kv_heads(k, q.shape[1])
    dot = None
    for c0 in range(0, q.shape[-1], chunk):
        part = q[..., :, None, c0] * k[..., None, :, c0]
        for c in range(c0 + 1, c0 + chunk):
            part = part + q[..., :, None, c] * k[..., None, :, c]
        dot = part if dot is None else dot + part
    return dot * scale


def _run_row_analyzers(q, k, lengths, *, causal, scale, row_stride=1, key_splits=None):
    out = kp.row_analyzers(cuda.to_device(q), cuda.to_device(k), cuda.to_device(np.asarray(lengths, np.int32)),
                           causal=causal, scale=scale, row_stride=row_stride, key_splits=key_splits)
    return tuple(x.copy_to_host() for x in out)


ROW_GRID = [
    pytest.param(2, 2, 1, 5, 11, [11, 0], True, id="B2-H2-Hkv1-Nq5-Nk11-causal-lengths11,0"),
    pytest.param(1, 1, 1, 12, 6, None, True, id="B1-H1-Nq12-Nk6-causal"),  # rows 0-5 see no key
    pytest.param(1, 2, 2, 9, 7, [5], False, id="B1-H2-Nq9-Nk7-lengths5"),
]


@pytest.mark.parametrize(("b", "h", "hkv", "nq", "nk", "lengths", "causal"), ROW_GRID)
def test_row_analyzers_are_the_mirror_bit_for_bit(b, h, hkv, nq, nk, lengths, causal):
    """float64 in the simulator, one key range: lse and entropy are the mirror's bits; max and min are
    those of the scores summed in the kernel's order; rows with no key (batch 1 of the first case, rows 0-5 of
    the second) have lse -inf, entropy 0, max -inf, min +inf."""
    q, k, v = _inputs(20, b, h, hkv, nq, nk, 16, 16, temperature=2.0)
    lengths = np.full(b, nk) if lengths is None else np.array(lengths)
    scale = 0.3
    lse, entropy, s_max, s_min = _run_row_analyzers(q, k, lengths, causal=causal, scale=scale, key_splits=1)
    order = kernel_order(np.float64, 16)
    _, lse_ref, entropy_ref = streaming_attention_ref(q, k, v, causal=causal, scale=scale, key_lengths=lengths,
                                                      order=order, return_entropy=True)
    np.testing.assert_array_equal(lse, lse_ref)
    np.testing.assert_array_equal(entropy, entropy_ref)
    s = _kernel_order_scores(q, k, scale, order.dot_chunk)
    visible = np.arange(nk) < visible_key_counts(b, nq, nk, causal, lengths)[:, None, :, None]
    np.testing.assert_array_equal(s_max, np.where(visible, s, -np.inf).max(axis=-1))
    np.testing.assert_array_equal(s_min, np.where(visible, s, np.inf).min(axis=-1))


def test_block_absmax_is_numpy_and_skips_rows_past_lengths():
    rng = np.random.default_rng(21)
    x = rng.normal(size=(3, 2, 13, 12)) * rng.uniform(0.1, 10, size=(3, 2, 13, 1))
    lengths = np.array([13, 6, 0], np.int32)
    got = kp.block_absmax(cuda.to_device(x), cuda.to_device(lengths), 4).copy_to_host()
    assert got.shape == (3, 2, 4)
    for bi, n in enumerate(lengths):
        for blk in range(4):
            rows = x[bi, :, 4 * blk:min(4 * blk + 4, n)]
            np.testing.assert_array_equal(got[bi, :, blk], np.abs(rows).max(axis=(-2, -1), initial=0.0))


def _feature_differences(got: dict, expected: dict) -> dict:
    """Per statistic, the largest relative difference over heads (NaN where both are NaN)."""
    out = {}
    for name, ref in expected.items():
        np.testing.assert_array_equal(np.isnan(got[name]), np.isnan(ref), err_msg=name)
        both = ~np.isnan(ref)
        rel = np.abs(got[name][both] - ref[both]) / np.maximum(np.abs(ref[both]), 1e-300)
        out[name] = float(rel.max(initial=0.0))
    return out


DEVICE_STATS_CASES = [
    pytest.param("constructed", id="constructed-one-hot-uniform-huge-range"),
    pytest.param("random", id="random-B1-H4-Hkv2-Nq8-Nk8-causal-lengths5"),
]


@pytest.mark.parametrize("case", DEVICE_STATS_CASES)
def test_device_head_stats_are_the_float64_analysis(case):
    """The statistics agree with the dense float64 analysis to float64 rounding, so the predictions
    do and the decisions agree at every tolerance."""
    if case == "constructed":
        q, k, v = _constructed_heads(n=8, d=16)
        given = {"causal": False, "key_lengths": None, "scale": None}
    else:
        q, k, v = _inputs(22, 1, 4, 2, 8, 8, 16, 8, temperature=3.0)
        q[0, 0] *= 0.05
        q[0, 3] *= 20.0
        given = {"causal": True, "key_lengths": np.array([5]), "scale": None}
    scale = 1 / np.sqrt(16)
    got = device_head_stats(q, k, v, given["key_lengths"], causal=given["causal"], scale=scale)
    expected = pr.head_stats(pr.analyze(q, k, v, **given))
    assert set(got) == set(expected) - set(NOT_MEASURED)
    # the reference's lse - Σ p·s and max s - lse cancel to about eps · max|s| (a one-hot row's
    # entropy of 1e-15 comes out 0 there); every other statistic is a maximum, exact on both sides
    cancels = 16 * np.finfo(np.float64).eps * expected["max_abs_score"]
    for name in got:
        atol = cancels if name in ("entropy_mean", "entropy_norm", "spread_mean") else 0.0
        np.testing.assert_array_equal(np.isnan(got[name]), np.isnan(expected[name]), err_msg=name)
        assert (np.abs(got[name] - expected[name]) <= 1e-13 * np.abs(expected[name]) + atol).all(), \
            (name, _feature_differences(got, {n: expected[n] for n in got}))
    predictor = _small_predictor()
    np.testing.assert_allclose(predictor.predict(got), predictor.predict(expected), rtol=1e-8)
    for tolerance in (1e-1, 3e-2, 1e-2, 1e-3, 1e-5):
        np.testing.assert_array_equal(pr.auto_decisions(got, tolerance, predictor).formats,
                                      pr.choose(q, k, v, "auto", tolerance=tolerance, predictor=predictor,
                                                **given).formats, err_msg=f"tolerance {tolerance}")


def test_auto_on_cuda_decides_as_on_the_reference(small_predictor, monkeypatch):
    """backend='cuda' (device inputs, read in place) and 'auto' analyze on the device, here the
    simulator, and backend='reference' on the host; the decisions agree."""
    calls = []
    monkeypatch.setattr("nkattn.precision.device_head_stats",
                        lambda *a, **kw: calls.append(1) or device_head_stats(*a, **kw))
    q, k, v = _as(_constructed_heads(n=8, d=16), np.float32)
    for tolerance, backend, inputs in ((1e-1, "auto", (q, k, v)), (1e-3, "cuda", tuple(map(cuda.to_device, (q, k, v))))):
        host = plan(q, k, v, precision="auto", tolerance=tolerance, backend="reference")[0].request.head_formats
        device = plan(*inputs, precision="auto", tolerance=tolerance, backend=backend)[0].request.head_formats
        np.testing.assert_array_equal(device.decisions.formats, host.decisions.formats)
        # float32 inputs: the kernel's per-row results are stored in float32
        np.testing.assert_allclose(device.decisions.predicted, host.decisions.predicted, rtol=1e-6)
    assert len(calls) == 2
    assert list(host.decisions.formats[0]) == ["fp32", "fp16", "fp32"]  # at 1e-3: formats with a kernel


def _plain_rows(q, k, dtype, *, causal, scale, key_lengths):
    """lse, entropy (lse - Σ p·s), max s and min s of every row, the plain formulas in `dtype`."""
    f = np.dtype(dtype).type
    s = (q.astype(f) @ np.swapaxes(_expand_kv_heads(k.astype(f), q.shape[1]), -1, -2)) * f(scale)
    nq, nk = q.shape[2], k.shape[2]
    visible = np.arange(nk) < visible_key_counts(q.shape[0], nq, nk, causal, key_lengths)[:, None, :, None]
    s_max = np.where(visible, s, -np.inf).max(axis=-1)
    s_min = np.where(visible, s, np.inf).min(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        p = np.where(visible, np.exp(s - s_max[..., None]), f(0))
        lse = s_max + np.log(p.sum(axis=-1))
        p = np.where(visible, np.exp(s - lse[..., None]), f(0))
        entropy = lse - np.where(visible, p * s, f(0)).sum(axis=-1)
    return lse, entropy, s_max, s_min


@gpu
def test_row_analyzers_float32_within_budget_and_decisions_agree():
    """float32 on the GPU: every row's lse, entropy, max and min within 2x the naive float32 error of
    the float64 oracle, and auto's decisions those of the float64 analysis where no prediction lies
    within 1 % of the tolerance."""
    b, h, hkv, nq, nk, d = 2, 8, 4, 300, 517, 64
    q, k, v = _inputs(23, b, h, hkv, nq, nk, d, d)
    q *= np.geomspace(0.05, 8, h)[None, :, None, None]
    lengths = np.array([517, 200])
    scale = 1 / np.sqrt(d)
    q32, k32, v32 = _as((q, k, v), np.float32)
    q, k, v = _as((q32, k32, v32), np.float64)  # the float64 oracle of the float32 data
    got = _run_row_analyzers(q32, k32, lengths, causal=True, scale=scale)
    naive = _plain_rows(q32, k32, np.float32, causal=True, scale=scale, key_lengths=lengths)
    ref = _plain_rows(q, k, np.float64, causal=True, scale=scale, key_lengths=lengths)
    # the oracle's entropy: lse - Σ p·s cancels in float64 too, by more than float32 errs on small entropies
    _, _, entropy64 = attention_ref(q, k, v, causal=True, scale=scale, key_lengths=lengths, return_entropy=True)
    ref = (ref[0], entropy64, ref[2], ref[3])
    sees = visible_key_counts(b, nq, nk, True, lengths)[:, None, :] > 0
    for name, g, n, r in zip(("lse", "entropy", "max", "min"), got, naive, ref):
        sel = np.broadcast_to(sees, g.shape)
        assert_within_budget(name, g[sel], r[sel], n[sel], floor=float32_floor(r[sel]))
    stats32 = device_head_stats(q32, k32, v32, lengths, causal=True, scale=scale)
    stats64 = pr.head_stats(pr.analyze(q, k, v, causal=True, scale=scale, key_lengths=lengths))
    print("feature relative differences, float32 GPU vs float64 host:",
          _feature_differences(stats32, {name: stats64[name] for name in stats32}))
    predictor = _small_predictor()
    predicted = predictor.predict(stats64)
    for tolerance in (1e-1, 1e-2, 1e-3):
        clear = (np.abs(predicted / tolerance - 1) > 1e-2).all(axis=-1)
        mine = pr.auto_decisions(stats32, tolerance, predictor).formats
        theirs = pr.auto_decisions(stats64, tolerance, predictor).formats
        np.testing.assert_array_equal(mine[clear], theirs[clear], err_msg=f"tolerance {tolerance}")


SAMPLED_GRID = [
    pytest.param(2, 2, 1, 11, 8, [8, 0], True, id="B2-H2-Hkv1-Nq11-Nk8-causal-lengths8,0"),  # rows 0-2 see no key
    pytest.param(1, 2, 2, 7, 12, [5], True, id="B1-H2-Nq7-Nk12-causal-lengths5"),  # rows 0-1 see no key
]


@pytest.mark.parametrize(("b", "h", "hkv", "nq", "nk", "lengths", "causal"), SAMPLED_GRID)
def test_sampled_row_analyzers_are_the_full_rows_bit_for_bit(b, h, hkv, nq, nk, lengths, causal):
    """row_stride r, one key range: rows 0, r, 2r, ... with the masks of the full Nq, each the bits of
    that row at stride 1, which are the mirror's (lse, entropy) and the kernel-order scores' (max, min)."""
    q, k, v = _inputs(24, b, h, hkv, nq, nk, 16, 16, temperature=2.0)
    lengths = np.array(lengths)
    scale = 0.3
    full = _run_row_analyzers(q, k, lengths, causal=causal, scale=scale, key_splits=1)
    order = kernel_order(np.float64, 16)
    _, lse_ref, entropy_ref = streaming_attention_ref(q, k, v, causal=causal, scale=scale, key_lengths=lengths,
                                                      order=order, return_entropy=True)
    s = _kernel_order_scores(q, k, scale, order.dot_chunk)
    visible = np.arange(nk) < visible_key_counts(b, nq, nk, causal, lengths)[:, None, :, None]
    expected = (lse_ref, entropy_ref, np.where(visible, s, -np.inf).max(axis=-1),
                np.where(visible, s, np.inf).min(axis=-1))
    for name, got, ref in zip(("lse", "entropy", "max", "min"), full, expected):
        np.testing.assert_array_equal(got, ref, err_msg=name)
    for stride in (2, 5):
        out = _run_row_analyzers(q, k, lengths, causal=causal, scale=scale, row_stride=stride, key_splits=1)
        for name, got, ref in zip(("lse", "entropy", "max", "min"), out, full):
            assert got.shape == (b, h, -(-nq // stride))
            np.testing.assert_array_equal(got, ref[..., ::stride], err_msg=f"{name}, stride {stride}")


def _sampled(a: pr.Analysis, stride: int) -> pr.Analysis:
    """The host analysis of rows ::stride: taken from the full q's rows, since slicing q would
    change Nq and with it the causal alignment."""
    return dataclasses.replace(a, entropy=a.entropy[..., ::stride], spread=a.spread[..., ::stride],
                               max_abs_score=a.max_abs_score[..., ::stride],
                               min_abs_score=a.min_abs_score[..., ::stride], visible=a.visible[:, ::stride])


@pytest.mark.parametrize(("b", "h", "hkv", "nq", "nk", "lengths", "causal", "stride"),
                         [pytest.param(*case.values, stride, id=f"{case.id}-stride{stride}")
                          for case, stride in zip(SAMPLED_GRID, (3, 4))])
def test_sampled_device_head_stats_are_the_analysis_of_those_rows(b, h, hkv, nq, nk, lengths, causal, stride):
    """Within the rounding of `test_device_head_stats_are_the_float64_analysis`; q's absmax still
    reads every row. Batch 1 of the first case sees no key: NaN on both sides."""
    q, k, v = _inputs(25, b, h, hkv, nq, nk, 16, 8, temperature=3.0)
    q[:, 0] *= 0.05
    scale = 1 / np.sqrt(16)
    got = device_head_stats(q, k, v, lengths, causal=causal, scale=scale, row_stride=stride)
    expected = pr.head_stats(_sampled(pr.analyze(q, k, v, causal=causal, scale=scale, key_lengths=lengths), stride))
    cancels = 16 * np.finfo(np.float64).eps * expected["max_abs_score"]
    for name in got:
        atol = cancels if name in ("entropy_mean", "entropy_norm", "spread_mean") else 0.0
        np.testing.assert_array_equal(np.isnan(got[name]), np.isnan(expected[name]), err_msg=name)
        both = ~np.isnan(expected[name])
        assert (np.abs(got[name] - expected[name]) <= 1e-13 * np.abs(expected[name]) + atol)[both].all(), \
            (name, _feature_differences(got, {n: expected[n] for n in got}))


SPLIT_GRID = [
    # Nq < Nk: row 0 of batch 0 sees 14 keys, none of range 2 of 3; batch 1's rows 0-2 see no key
    # and the others keys of range 0 only
    pytest.param(2, 2, 1, 8, 21, [21, 5], True, 1, id="B2-H2-Hkv1-Nq8-Nk21-causal-lengths21,5"),
    # Nq > Nk, rows 0, 3, ..., 18: row 0 sees no key, none sees key 16 (range 2 of 3 holds only it)
    pytest.param(1, 2, 2, 20, 17, None, True, 3, id="B1-H2-Nq20-Nk17-causal-stride3"),
    pytest.param(1, 1, 1, 6, 23, [19], False, 2, id="B1-H1-Nq6-Nk23-lengths19-stride2"),
]


def _dense_rows(q, k, *, causal, scale, key_lengths, row_stride):
    """lse, entropy, max s and min s of rows ::row_stride from the float64 oracle's dense scores."""
    v = np.zeros(k.shape[:3] + (1,))
    _, lse, entropy = attention_ref(q, k, v, causal=causal, scale=scale, key_lengths=key_lengths,
                                    return_entropy=True)
    _, _, s_max, s_min = _plain_rows(q, k, np.float64, causal=causal, scale=scale, key_lengths=key_lengths)
    return tuple(x[..., ::row_stride] for x in (lse, entropy, s_max, s_min))


@pytest.mark.parametrize(("b", "h", "hkv", "nq", "nk", "lengths", "causal", "stride"), SPLIT_GRID)
def test_row_analyzers_ref_is_the_dense_analysis_for_every_split(b, h, hkv, nq, nk, lengths, causal, stride):
    """The split mirror within float64 rounding of the oracle for any number of key ranges (one
    per tile included, and more ranges asked for than tiles); one range is the streaming mirror
    bit for bit. Rows with no key: lse -inf, entropy 0, max -inf, min +inf."""
    q, k, v = _inputs(27, b, h, hkv, nq, nk, 16, 16, temperature=2.0)
    lengths = np.full(b, nk) if lengths is None else np.array(lengths)
    scale = 0.3
    order = kernel_order(np.float64, 16)
    dense = _dense_rows(q, k, causal=causal, scale=scale, key_lengths=lengths, row_stride=stride)
    empty = visible_key_counts(b, nq, nk, causal, lengths)[:, None, ::stride] == 0
    for splits in (1, 2, 3, 4, 7):
        got = pr.row_analyzers_ref(q, k, causal=causal, scale=scale, key_lengths=lengths, order=order,
                                   row_stride=stride, key_splits=splits)
        for name, g, r, none in zip(("lse", "entropy", "max", "min"), got, dense, (-np.inf, 0.0, -np.inf, np.inf)):
            g, r = np.broadcast_arrays(g, r)
            sees = ~np.broadcast_to(empty, g.shape)
            assert (g[~sees] == none).all(), (name, splits)
            assert (np.abs(g[sees] - r[sees]) <= 1e-12 * np.abs(r[sees]) + 1e-15).all(), (name, splits)
    _, lse_ref, entropy_ref = streaming_attention_ref(q, k, v, causal=causal, scale=scale, key_lengths=lengths,
                                                      order=order, return_entropy=True)
    one = pr.row_analyzers_ref(q, k, causal=causal, scale=scale, key_lengths=lengths, order=order, row_stride=stride)
    np.testing.assert_array_equal(one[0], lse_ref[..., ::stride])
    np.testing.assert_array_equal(one[1], entropy_ref[..., ::stride])


@pytest.mark.parametrize(("b", "h", "hkv", "nq", "nk", "lengths", "causal", "stride"), SPLIT_GRID)
def test_split_row_analyzers_are_the_mirror_bit_for_bit(b, h, hkv, nq, nk, lengths, causal, stride):
    """float64 in the simulator: 1, 2 and 3 key ranges of whole 8-key tiles (three tiles here, so
    three distinct splits), each the split mirror's bits, including ranges that hold none of a
    row's keys and rows that see no key at all."""
    q, k, _ = _inputs(27, b, h, hkv, nq, nk, 16, 16, temperature=2.0)
    lengths = np.full(b, nk) if lengths is None else np.array(lengths)
    scale = 0.3
    order = kernel_order(np.float64, 16)
    if SIMULATOR:  # a GPU's float64 tiles hold every key here: one range whatever is asked
        assert [pr.key_split_chunk(nk, order.block_n, splits) for splits in (1, 2, 3)] == [24, 16, 8]
    for splits in (1, 2, 3):
        got = _run_row_analyzers(q, k, lengths, causal=causal, scale=scale, row_stride=stride, key_splits=splits)
        expected = pr.row_analyzers_ref(q, k, causal=causal, scale=scale, key_lengths=lengths, order=order,
                                        row_stride=stride, key_splits=splits)
        for name, g, r in zip(("lse", "entropy", "max", "min"), got, expected):
            np.testing.assert_array_equal(g, r, err_msg=f"{name}, {splits} key ranges")


@pytest.mark.parametrize("key_splits", [0, -2, 1.5, 2.0, True, "3"])
def test_bad_key_splits_are_named(key_splits):
    q, k = _inputs(28, 1, 1, 1, 4, 5, 16, 16)[:2]
    with pytest.raises(ValueError, match="key_splits"):
        _run_row_analyzers(q, k, [5], causal=False, scale=0.25, key_splits=key_splits)
    with pytest.raises(ValueError, match="key_splits"):
        pr.row_analyzers_ref(q, k, key_splits=key_splits)


def test_default_key_splits_follow_the_head_shape_only(monkeypatch):
    """Ranges of SPLIT_TILES key tiles, capped by the partials' size: at 1,024 sampled float32 rows
    and 16K keys (256 tiles of 64) 8 ranges, 8 x 8 = 64 blocks a head; every row of a 16K head
    makes its own blocks and is not split. Nothing else enters, so a head's bits do not depend on
    its batch or on the GPU. (The simulator splits at every tile, so tiny tests cross ranges.)"""
    monkeypatch.setattr(kp, "SPLIT_TILES", 32)
    assert kp.default_key_splits(256, 1024) == 8
    assert kp.default_key_splits(257, 1024) == 9
    assert kp.default_key_splits(256, 16384) == 1
    assert kp.default_key_splits(4, 3) == 1
    monkeypatch.setattr(kp, "SPLIT_TILES", 1)
    assert kp.default_key_splits(3, 8) == 3
    assert kp.default_key_splits(256, 0) == 256


@gpu
@pytest.mark.parametrize("key_splits", [2, 3, 9])
def test_split_row_analyzers_float32_within_budget(key_splits):
    """float32 on the GPU with the keys in 2, 3 and 9 ranges (9: one 64-key tile each): every row's
    lse, entropy, max and min within 2x the naive float32 error of the float64 oracle, as with the
    default split, and the same bits on a second run."""
    b, h, hkv, nq, nk, d = 2, 8, 4, 300, 517, 64
    q, k, _ = _inputs(29, b, h, hkv, nq, nk, d, d)
    q *= np.geomspace(0.05, 8, h)[None, :, None, None]
    lengths = np.array([517, 200])
    scale = 1 / np.sqrt(d)
    q32, k32 = _as((q, k), np.float32)
    q, k = _as((q32, k32), np.float64)
    got = _run_row_analyzers(q32, k32, lengths, causal=True, scale=scale, key_splits=key_splits)
    naive = _plain_rows(q32, k32, np.float32, causal=True, scale=scale, key_lengths=lengths)
    ref = _dense_rows(q, k, causal=True, scale=scale, key_lengths=lengths, row_stride=1)
    sees = visible_key_counts(b, nq, nk, True, lengths)[:, None, :] > 0
    for name, g, n, r in zip(("lse", "entropy", "max", "min"), got, naive, ref):
        sel = np.broadcast_to(sees, g.shape)
        assert_within_budget(name, g[sel], r[sel], n[sel], floor=float32_floor(r[sel]))
    again = _run_row_analyzers(q32, k32, lengths, causal=True, scale=scale, key_splits=key_splits)
    for name, g, g2 in zip(("lse", "entropy", "max", "min"), got, again):
        np.testing.assert_array_equal(g, g2, err_msg=name)


def test_default_row_stride_caps_the_analyzed_rows():
    from nkattn import precision as npr

    cap = npr.MAX_ANALYZED_ROWS
    assert [npr.default_row_stride(n) for n in (1, cap, cap + 1, 2 * cap, 2 * cap + 1)] == [1, 1, 2, 2, 3]
    for n in (cap + 1, 3 * cap - 1, 10_000):
        assert -(-n // npr.default_row_stride(n)) <= cap


def test_sampled_decisions_are_the_full_analysis_away_from_the_tolerance(monkeypatch):
    """A cap of 8 rows (1024 on a real call) makes the default stride 5 on 40 rows. The rows of each
    head repeat with period 8, which stride 5 visits in full, so the sample's statistics are the
    head's up to rounding: this checks that the default stride reaches the kernel and the statistics
    come from the sampled rows, not how well a sample represents a head (on Gaussian heads, 1024
    rows of 2048 or 3072 move predictions by up to 7 %, 8 of 40 by up to 35 %)."""
    from nkattn import precision as npr

    monkeypatch.setattr(npr, "MAX_ANALYZED_ROWS", 8)
    strides = []
    row_analyzers = kp.row_analyzers
    monkeypatch.setattr(kp, "row_analyzers", lambda *a, **kw: strides.append(kw["row_stride"]) or row_analyzers(*a, **kw))
    b, h, nq, nk, d = 1, 4, 40, 8, 16
    q, k, v = _inputs(26, b, h, 2, 8, nk, d, d)
    q = np.tile(q * np.geomspace(0.1, 8, h)[None, :, None, None], (1, 1, nq // 8, 1))
    lengths = np.array([7])
    scale = 1 / np.sqrt(d)
    sampled = device_head_stats(q, k, v, lengths, causal=False, scale=scale)
    assert strides == [5]
    full = pr.head_stats(pr.analyze(q, k, v, scale=scale, key_lengths=lengths))
    predictor = _small_predictor()
    predicted = predictor.predict(full)
    for tolerance in (1e-1, 3e-2, 1e-2, 1e-3, 1e-5):
        clear = (np.abs(predicted / tolerance - 1) > 1e-2).all(axis=-1)
        mine = pr.auto_decisions(sampled, tolerance, predictor).formats
        theirs = pr.auto_decisions(full, tolerance, predictor).formats
        np.testing.assert_array_equal(mine[clear], theirs[clear], err_msg=f"tolerance {tolerance}")
    print("formats at 1e-1, 1e-3:", pr.auto_decisions(full, 1e-1, predictor).formats,
          pr.auto_decisions(full, 1e-3, predictor).formats)


# --------------------------------------------------------------------------------------
# the FP8 kernel (nkattn.cuda_kernels.fp8) against its mirror, emulate(..., "fp8")
# --------------------------------------------------------------------------------------


def _bf16_inputs(seed, b, h, hkv, nq, nk, d, dv):
    """Gaussian q, k, v rounded to bf16 (the fp8 format's input), as float64; one k outlier gives
    its block a scale of its own."""
    q, k, v = (pr.round_input(x, "bf16") for x in _inputs(seed, b, h, hkv, nq, nk, d, dv))
    k[0, 0, min(3, nk - 1), 0] = 40.0
    return q, k, v


def _bf16_device(x):
    return cuda.to_device(np.ascontiguousarray(x.astype(ml_dtypes.bfloat16)).view(np.uint16))


def _lengths(b, nk, lengths):
    return np.full(b, nk, np.int32) if lengths is None else np.asarray(lengths, np.int32)


def _fp8_run(q, k, v, *, causal, key_lengths=None, config=None, out_kind="bf16", out=None):
    """The FP8 kernel on float64 arrays of bf16 values: (O, lse) as float64 on the host."""
    from nkattn.cuda_kernels.fp8 import fp8_attention

    lengths = _lengths(q.shape[0], k.shape[2], key_lengths)
    o, lse = fp8_attention(*(_bf16_device(x) for x in (q, k, v)), cuda.to_device(lengths), causal=causal,
                           scale=1 / np.sqrt(q.shape[-1]), config=config, out_kind=out_kind, out=out)
    out_dtype = ml_dtypes.bfloat16 if out_kind == "bf16" else np.float16
    return o.copy_to_host().view(out_dtype).astype(np.float64), lse.copy_to_host().astype(np.float64)


def _assert_within_bound(name, got, expected, bound):
    """|got - expected| <= bound elementwise; the message names the worst element and the failing share."""
    err = np.abs(got - expected)
    bad = ~(err <= bound)
    if bad.any():
        worst = tuple(int(i) for i in np.unravel_index(np.argmax(np.where(bad, err / bound, 0)), err.shape))
        raise AssertionError(f"{name}: {bad.mean():.2%} of elements beyond the bound; worst at {worst}: "
                             f"{got[worst]!r} vs {expected[worst]!r} (bound {bound[worst]:.3g})")


FP8_QUANTIZE_CASES = [
    pytest.param(2, 2, 1, 70, 150, 32, 16, [150, 0], id="B2-H2-Hkv1-Nq70-Nk150-d32-dv16-lengths150,0"),
    pytest.param(2, 4, 2, 300, 517, 128, 64, [517, 200], id="B2-H4-Hkv2-Nq300-Nk517-d128-dv64-lengths", marks=gpu),
    pytest.param(1, 2, 2, 129, 128, 80, 48, None, id="B1-H2-Hkv2-Nq129-Nk128-d80-dv48", marks=gpu),
]


@pytest.mark.parametrize(("b", "h", "hkv", "nq", "nk", "d", "dv", "lengths"), FP8_QUANTIZE_CASES)
def test_fp8_quantize_gives_the_mirrors_bits(b, h, hkv, nq, nk, d, dv, lengths):
    """e4m3 Q, K and Vᵀ (keys permuted, zero past key_lengths and past Nk) and their float32 block
    scales are `quantize_e4m3`'s, bit for bit; a block with no key (batch 1 of the first case) has
    scale 1 and zeros. Q and K are padded with zero columns to a multiple of 32."""
    from nkattn.cuda_kernels.fp8 import permuted_key, quantize

    q, k, v = _bf16_inputs(30, b, h, hkv, nq, nk, d, dv)
    lengths = _lengths(b, nk, lengths)
    ops = quantize(*(_bf16_device(x) for x in (q, k, v)), cuda.to_device(lengths))
    read = (np.arange(nk) < lengths[:, None])[:, None, :, None]
    expected = {"q": pr.quantize_e4m3(q, 128), "k": pr.quantize_e4m3(np.where(read, k, 0.0), 128),
                "v": pr.quantize_e4m3(np.where(read, v, 0.0), 128)}

    def e4m3_bits(values):  # the mirror's values are e4m3 numbers, exactly
        return values.astype(np.float32).astype(ml_dtypes.float8_e4m3fn).view(np.uint8)

    tiles = -(-nk // 128)
    vt = ops.vt.copy_to_host().reshape(b, hkv, tiles, dv, 128)
    keys = np.zeros((b, hkv, tiles, 128, dv), np.uint8)
    keys[:, :, :, [permuted_key(p) for p in range(128)], :] = np.swapaxes(vt, -1, -2)
    got = {"q": ops.q.copy_to_host(), "k": ops.k.copy_to_host(), "v": keys.reshape(b, hkv, tiles * 128, dv)}
    for name, width in (("q", d), ("k", d), ("v", dv)):
        assert_bit_identical(f"{name} e4m3", got[name][..., : expected[name].values.shape[2], :width],
                             e4m3_bits(expected[name].values))
        assert not got[name][..., width:].any() and not got[name][..., expected[name].values.shape[2]:, :].any(), name
        scales = getattr(ops, f"{name}_scale").copy_to_host()
        assert_bit_identical(f"{name} scales", scales, expected[name].descale[..., ::128, 0].astype(np.float32))
    if lengths.min() == 0:
        assert (ops.k_scale.copy_to_host()[lengths == 0] == 1).all()


def _fp8_case(b, h, hkv, nq, nk, d, dv, causal, lengths=None, config=None, out_kind="bf16", gpu=False):
    ident = (f"B{b}-H{h}-Hkv{hkv}-Nq{nq}-Nk{nk}-d{d}" + (f"-dv{dv}" if dv != d else "") + ("-causal" if causal else "")
             + (f"-lengths{','.join(map(str, lengths))}" if lengths is not None else "")
             + (f"-BM{config.block_m}" if config is not None else "") + (f"-{out_kind}" if out_kind != "bf16" else ""))
    return pytest.param(b, h, hkv, nq, nk, d, dv, causal, lengths, config, out_kind, id=ident,
                        marks=[pytest.mark.gpu] if gpu else [])


def _fp8_gpu_grid():
    from nkattn.cuda_kernels.exact_tc import TileConfig

    shapes = ((1, 2, 1, 1, 1, None), (2, 4, 2, 129, 129, [129, 0]), (1, 2, 2, 203, 127, None),
              (1, 1, 1, 127, 1000, None), (2, 2, 1, 300, 517, [517, 200]))
    return [_fp8_case(b, h, hkv, nq, nk, d, d, causal, lengths, gpu=True)
            for d in (64, 128) for (b, h, hkv, nq, nk, lengths) in shapes for causal in (False, True)] + [
        _fp8_case(1, 2, 1, 200, 300, d, dv, True, None, gpu=True) for d, dv in ((32, 128), (128, 64), (80, 48))] + [
        _fp8_case(1, 2, 1, 333, 400, 64, 64, True, None, TileConfig(64, 128), gpu=True),
        _fp8_case(1, 2, 1, 333, 400, 64, 64, True, None, TileConfig(192, 128), gpu=True),
        _fp8_case(1, 2, 1, 333, 400, 128, 128, False, None, out_kind="f16", gpu=True)]


def _fp8_sim_grid():
    from nkattn.cuda_kernels.exact_tc import TileConfig

    # two key tiles, tails of both, GQA, a partial and a short batch (causal: its first 20 rows see
    # no key, beside rows that do); then two warpgroups and a second Q scale block
    return [_fp8_case(2, 2, 1, 40, 150, 32, 16, True, [150, 20]),
            _fp8_case(1, 1, 1, 140, 130, 64, 64, False, None, TileConfig(128, 128))]


def _fp8_lse_bound(q, k, v, *, causal, lengths):
    """A bound on |lse - lse64| of the fp8 format: lse moves by at most the largest score error of its
    row (log-sum-exp is 1-Lipschitz in the max norm), here that of the e4m3 operands (`Operand.err`),
    plus 8 float32 roundings of lse. The fp32 sums of S are left out: the e4m3 term is ~2^9 larger
    even with the 14-bit fp8 adder DeepSeek-V3 reports for Hopper (module docstring of the mirror)."""
    ops = pr.operands(q, k, v, "fp8", key_lengths=lengths)
    read = (np.arange(k.shape[2]) < _lengths(q.shape[0], k.shape[2], lengths)[:, None])[:, None, :, None]
    ak = _expand_kv_heads(np.abs(np.where(read, k, 0.0)), q.shape[1])
    eq, ek = ops.q.err, ops.k.err
    delta = (eq @ np.swapaxes(ak, -1, -2) + np.abs(q) @ np.swapaxes(ek, -1, -2) + eq @ np.swapaxes(ek, -1, -2))
    counts = visible_key_counts(q.shape[0], q.shape[2], k.shape[2], causal, lengths)[:, None, :, None]
    row_delta = np.where(np.arange(k.shape[2]) < counts, delta, 0.0).max(axis=-1, initial=0.0) / np.sqrt(q.shape[-1])
    return row_delta + 8 * pr.U32 * np.maximum(1.0, np.abs(attention_ref(q, k, v, causal=causal, key_lengths=lengths)[1]))


@pytest.mark.parametrize(("b", "h", "hkv", "nq", "nk", "d", "dv", "causal", "lengths", "config", "out_kind"),
                         _fp8_sim_grid() + _fp8_gpu_grid())
def test_fp8_kernel_within_the_written_bound(b, h, hkv, nq, nk, d, dv, causal, lengths, config, out_kind):
    """O within `error_bound` of the float64 oracle, and of the mirror (they differ by the GPU's FMA,
    ex2.approx, row-sum order and fp8 adder, each far inside the bound's allowance for e4m3); lse within
    `_fp8_lse_bound` of the oracle's, -inf where a row sees no key (whose O is 0)."""
    q, k, v = _bf16_inputs(31 + nq + nk + d, b, h, hkv, nq, nk, d, dv)
    o, lse = _fp8_run(q, k, v, causal=causal, key_lengths=lengths, config=config, out_kind=out_kind)
    mirror_o, _ = pr.emulate(q, k, v, "fp8", causal=causal, key_lengths=lengths)
    oracle_o, oracle_lse = attention_ref(q, k, v, causal=causal, key_lengths=lengths)
    bound = pr.error_bound(q, k, v, "fp8", causal=causal, key_lengths=lengths)
    _assert_within_bound("O - float64", o, oracle_o, bound)
    _assert_within_bound("O - emulate", o, mirror_o, bound)
    if not REAL_GPU:
        # the stand-ins do the mirror's operations in its order (each wgmma k-step summed, then rounded to
        # float32), but for the row sum's: O is the mirror's to within a bf16 step, and a misplaced P or V
        # element, which the loose bound can miss, shows
        _assert_within_bound("O - emulate (simulator)", o, mirror_o, 2 * pr.UNIT_ROUNDOFF["bf16"] * np.abs(mirror_o))
    empty = oracle_lse == -np.inf
    np.testing.assert_array_equal(lse == -np.inf, empty)
    assert (o[empty] == 0).all()
    lse_bound = _fp8_lse_bound(q, k, v, causal=causal, lengths=lengths)
    _assert_within_bound("lse - float64", lse[~empty], oracle_lse[~empty], lse_bound[~empty])


@gpu
@pytest.mark.parametrize("d", [64, 128])
def test_fp8_kernel_writes_every_output_and_repeats_its_bits(d):
    """O preallocated as bf16 NaN is all written (no NaN left); 50 more runs give the same bits."""
    _assert_writes_every_output_and_repeats(_fp8_run, *_bf16_inputs(32, 2, 4, 2, 700, 900, d, d), nan_bits=0x7FC0)


def _assert_writes_every_output_and_repeats(run, q, k, v, *, nan_bits):
    """``run`` (causal) into an O preallocated as the NaN ``nan_bits`` leaves no NaN, and 50 more runs
    give its O and lse bit for bit."""
    poisoned = cuda.to_device(np.full((*q.shape[:3], v.shape[3]), nan_bits, np.uint16))
    first = run(q, k, v, causal=True, out=poisoned)
    assert not np.isnan(first[0]).any()
    for _ in range(50):
        again = run(q, k, v, causal=True)
        assert_bit_identical("O", again[0], first[0])
        assert_bit_identical("lse", again[1], first[1])


def test_fp8_kernel_refuses_what_it_cannot_run():
    from nkattn.cuda_kernels.exact_tc import TileConfig
    from nkattn.cuda_kernels.fp8 import fp8_attention_kernel

    for d, dv in ((24, 16), (16, 8), (144, 64), (0, 16)):
        with pytest.raises(ValueError, match=r"the fp8 kernel takes d?v? ?a multiple of 16 from 16 to 128"):
            fp8_attention_kernel(d, dv, TileConfig(128, 128))
    with pytest.raises(ValueError, match="tiles of 128 keys"):
        fp8_attention_kernel(64, 64, TileConfig(128, 64))
    for config in (TileConfig(128, 128, pingpong=True), TileConfig(128, 128, blocks_per_sm=2), TileConfig(128, 128, tma=True)):
        with pytest.raises(ValueError, match="plain wgmma schedule only"):
            fp8_attention_kernel(64, 64, config)
    with pytest.raises(ValueError, match="out_kind must be one of"):
        fp8_attention_kernel(64, 64, TileConfig(128, 128), "e4m3")


def test_auto_on_cuda_runs_fp8_heads_on_the_fp8_kernel(monkeypatch):
    """An fp8 head of precision='auto' is the FP8 kernel's output on the head rounded to bf16, bit for bit."""
    from nkattn.cuda_kernels.fp8 import fp8_attention

    q, k, v = _as(_inputs(33, 1, 2, 2, 20, 24, 16, 16), np.float32)
    _force(monkeypatch, [["fp8", "fp16"]])
    out, lse = nkattn.attention(q, k, v, causal=True, precision="auto", tolerance=1e-2, return_lse=True, backend="cuda")
    qb, kb, vb = (pr.round_input(x[:, :1], "bf16") for x in (q, k, v))
    alone, alone_lse = fp8_attention(*(_bf16_device(x) for x in (qb, kb, vb)), cuda.to_device(np.array([24], np.int32)),
                                     causal=True, scale=0.25)
    np.testing.assert_array_equal(out[0, 0], alone.copy_to_host()[0, 0].view(ml_dtypes.bfloat16).astype(np.float32))
    np.testing.assert_array_equal(lse[0, 0], alone_lse.copy_to_host()[0, 0])


def test_auto_on_cuda_runs_int8_heads_on_the_int8_kernel(monkeypatch):
    """An int8-fp16 head of precision='auto' is the INT8 kernel's output on the head rounded to f16, bit for bit."""
    from nkattn.cuda_kernels.int8 import int8_attention

    q, k, v = _as(_inputs(35, 1, 2, 2, 20, 24, 16, 16), np.float32)
    _force(monkeypatch, [["int8-fp16", "fp16"]])
    out, lse = nkattn.attention(q, k, v, causal=True, precision="auto", tolerance=1e-2, return_lse=True, backend="cuda")
    qh, kh, vh = (pr.round_input(x[:, :1], "fp16") for x in (q, k, v))
    alone, alone_lse = int8_attention(*(_f16_device(x) for x in (qh, kh, vh)), cuda.to_device(np.array([24], np.int32)),
                                      causal=True, scale=0.25)
    np.testing.assert_array_equal(out[0, 0], alone.copy_to_host()[0, 0].view(np.float16).astype(np.float32))
    np.testing.assert_array_equal(lse[0, 0], alone_lse.copy_to_host()[0, 0])


def test_int8_heads_on_a_gpu_without_wgmma_are_a_reason(monkeypatch):
    from nkattn.cuda_kernels import exact_tc

    q, k, v = _as(_inputs(36, 1, 2, 2, 8, 8, 16, 16), np.float32)
    _force(monkeypatch, [["int8-fp16", "fp16"]])
    monkeypatch.setattr(exact_tc, "compute_capability", lambda: (8, 0))
    with pytest.raises(ValueError, match=r"chose int8-fp16 for 1 of 2 heads, \(b, h\) = \(0, 0\), and no kernel takes "
                                         r"int8-fp16 here: cuda \(INT8 kernel\): the INT8 kernel uses Hopper's s8 wgmma "
                                         r"\(compute capability 9.x\), this GPU is 8.0"):
        nkattn.attention(q, k, v, precision="auto", tolerance=1e-2, backend="cuda")


def test_fp8_heads_on_a_gpu_without_fp8_are_a_reason(monkeypatch):
    from nkattn.cuda_kernels import exact_tc

    q, k, v = _as(_inputs(34, 1, 2, 2, 8, 8, 16, 16), np.float32)
    _force(monkeypatch, [["fp8", "fp16"]])
    monkeypatch.setattr(exact_tc, "compute_capability", lambda: (8, 0))
    with pytest.raises(ValueError, match=r"chose fp8 for 1 of 2 heads, \(b, h\) = \(0, 0\), and no kernel takes fp8 "
                                         r"here: cuda \(FP8 kernel\): the FP8 kernel uses Hopper's e4m3 wgmma "
                                         r"\(compute capability 9.x\), this GPU is 8.0"):
        nkattn.attention(q, k, v, precision="auto", tolerance=1e-2, backend="cuda")


# --------------------------------------------------------------------------------------
# the INT8 kernel (nkattn.cuda_kernels.int8) against its mirror, emulate(..., "int8-fp16")
# --------------------------------------------------------------------------------------


def _f16_inputs(seed, b, h, hkv, nq, nk, d, dv):
    """Gaussian q, k, v rounded to f16 (the int8-fp16 format's input), as float64; k offset by 3 in
    one channel (what smoothing removes) and one outlier that gives its 64-key block a scale of its own."""
    q, k, v = _inputs(seed, b, h, hkv, nq, nk, d, dv)
    k[..., 1] += 3.0
    k[0, 0, min(3, nk - 1), 0] = 40.0
    return tuple(pr.round_input(x, "fp16") for x in (q, k, v))


def _f16_device(x):
    return cuda.to_device(np.ascontiguousarray(x.astype(np.float16)).view(np.uint16))


def _int8_run(q, k, v, *, causal, key_lengths=None, config=None, out=None):
    """The INT8 kernel on float64 arrays of f16 values: (O, lse) as float64 on the host."""
    from nkattn.cuda_kernels.int8 import int8_attention

    lengths = _lengths(q.shape[0], k.shape[2], key_lengths)
    o, lse = int8_attention(*(_f16_device(x) for x in (q, k, v)), cuda.to_device(lengths), causal=causal,
                            scale=1 / np.sqrt(q.shape[-1]), config=config, out=out)
    return o.copy_to_host().view(np.float16).astype(np.float64), lse.copy_to_host().astype(np.float64)


INT8_QUANTIZE_CASES = [
    pytest.param(2, 2, 1, 70, 150, 32, 16, [150, 0], id="B2-H2-Hkv1-Nq70-Nk150-d32-dv16-lengths150,0"),
    pytest.param(2, 4, 2, 300, 517, 128, 64, [517, 200], id="B2-H4-Hkv2-Nq300-Nk517-d128-dv64-lengths", marks=gpu),
    pytest.param(1, 2, 2, 129, 128, 80, 48, None, id="B1-H2-Hkv2-Nq129-Nk128-d80-dv48", marks=gpu),
]


@pytest.mark.parametrize(("b", "h", "hkv", "nq", "nk", "d", "dv", "lengths"), INT8_QUANTIZE_CASES)
def test_int8_quantize_gives_the_mirrors_bits(b, h, hkv, nq, nk, d, dv, lengths):
    """K's mean (f16), int8 Q and smoothed K (zero past key_lengths, past Nk and past d up to a multiple
    of 32) and their float32 block scales are `operands(..., "int8-fp16")`'s, bit for bit; a K block
    with no key (batch 1 of the first case, and past Nk) has scale 1."""
    from nkattn.cuda_kernels.int8 import quantize

    q, k, v = _f16_inputs(40, b, h, hkv, nq, nk, d, dv)
    lengths = _lengths(b, nk, lengths)
    scale = 1 / np.sqrt(d)
    ops = quantize(_f16_device(q), _f16_device(k), cuda.to_device(lengths), scale=scale)
    ref = pr.operands(q, k, v, "int8-fp16", scale=scale, key_lengths=lengths)
    center = ops.center.copy_to_host().view(np.float16).astype(np.float64)
    assert_bit_identical("mean of k", center, ref.k_center[:, ::h // hkv, 0])
    k_values = ref.k.values[:, ::h // hkv]  # expanded to the query heads: one per KV head
    for name, values, descale, block in (("q", ref.q.values, ref.q.descale, 128),
                                         ("k", k_values, ref.k.descale[:, ::h // hkv], 64)):
        got = getattr(ops, name).copy_to_host().view(np.int8)
        assert_bit_identical(f"{name} int8", got[..., :d].astype(np.float64), values + 0.0)  # int8 has no -0
        assert not got[..., d:].any(), name
        scales = getattr(ops, f"{name}_scale").copy_to_host()
        assert_bit_identical(f"{name} scales", scales[..., : -(-values.shape[2] // block)],
                             descale[..., ::block, 0].astype(np.float32))
    k_scale = ops.k_scale.copy_to_host()
    assert (k_scale[..., -(-nk // 64):] == 1).all()
    if lengths.min() == 0:
        assert (k_scale[lengths == 0] == 1).all()


def _int8_case(b, h, hkv, nq, nk, d, dv, causal, lengths=None, config=None, gpu=False):
    ident = (f"B{b}-H{h}-Hkv{hkv}-Nq{nq}-Nk{nk}-d{d}" + (f"-dv{dv}" if dv != d else "") + ("-causal" if causal else "")
             + (f"-lengths{','.join(map(str, lengths))}" if lengths is not None else "")
             + (f"-BM{config.block_m}" if config is not None else ""))
    return pytest.param(b, h, hkv, nq, nk, d, dv, causal, lengths, config, id=ident,
                        marks=[pytest.mark.gpu] if gpu else [])


def _int8_gpu_grid():
    from nkattn.cuda_kernels.exact_tc import TileConfig

    shapes = ((1, 2, 1, 1, 1, None), (2, 4, 2, 129, 129, [129, 0]), (1, 2, 2, 203, 127, None),
              (1, 1, 1, 127, 1000, None), (2, 2, 1, 300, 517, [517, 200]))
    return [_int8_case(b, h, hkv, nq, nk, d, d, causal, lengths, gpu=True)
            for d in (64, 128) for (b, h, hkv, nq, nk, lengths) in shapes for causal in (False, True)] + [
        _int8_case(1, 2, 1, 200, 300, d, dv, True, None, gpu=True) for d, dv in ((32, 128), (128, 64), (80, 48))] + [
        _int8_case(1, 2, 1, 333, 400, 64, 64, True, None, TileConfig(64, 128), gpu=True)]


def _int8_sim_grid():
    # two key tiles (four K scales), tails of both, GQA, a partial and a short batch (causal: its first
    # 20 rows see no key, beside rows that do)
    return [_int8_case(2, 2, 1, 40, 150, 32, 16, True, [150, 20])]


def _int8_lse_bound(q, k, v, *, causal, lengths):
    """A bound on |lse - lse64| of int8-fp16: the largest score error of the row (log-sum-exp is
    1-Lipschitz in the max norm) from the int8 operands and smoothing's f16 rounding (`Operand.err`,
    against the smoothed k), plus 8 float32 roundings of lse."""
    ops = pr.operands(q, k, v, "int8-fp16", key_lengths=lengths)
    read = (np.arange(k.shape[2]) < _lengths(q.shape[0], k.shape[2], lengths)[:, None])[:, None, :, None]
    k_moved = np.where(read, _expand_kv_heads(k, q.shape[1]) - ops.k_center, 0.0)
    eq, ek = ops.q.err, ops.k.err
    delta = (eq @ np.swapaxes(np.abs(k_moved), -1, -2) + np.abs(q) @ np.swapaxes(ek, -1, -2)
             + eq @ np.swapaxes(ek, -1, -2))
    counts = visible_key_counts(q.shape[0], q.shape[2], k.shape[2], causal, lengths)[:, None, :, None]
    row_delta = np.where(np.arange(k.shape[2]) < counts, delta, 0.0).max(axis=-1, initial=0.0) / np.sqrt(q.shape[-1])
    return row_delta + 8 * pr.U32 * np.maximum(1.0, np.abs(attention_ref(q, k, v, causal=causal, key_lengths=lengths)[1]))


@pytest.mark.parametrize(("b", "h", "hkv", "nq", "nk", "d", "dv", "causal", "lengths", "config"),
                         _int8_sim_grid() + _int8_gpu_grid())
def test_int8_kernel_within_the_written_bound(b, h, hkv, nq, nk, d, dv, causal, lengths, config):
    """O within `error_bound` of the float64 oracle and of the mirror (they differ by ex2.approx and the
    row-sum order); lse within `_int8_lse_bound` of the oracle's, -inf where a row sees no key (whose O is 0).
    In the simulator the stand-ins do the mirror's operations in its order but for the row sum's, so O
    is the mirror's to within an f16 step and lse its float32 rounding."""
    q, k, v = _f16_inputs(41 + nq + nk + d, b, h, hkv, nq, nk, d, dv)
    o, lse = _int8_run(q, k, v, causal=causal, key_lengths=lengths, config=config)
    mirror_o, mirror_lse = pr.emulate(q, k, v, "int8-fp16", causal=causal, key_lengths=lengths)
    oracle_o, oracle_lse = attention_ref(q, k, v, causal=causal, key_lengths=lengths)
    bound = pr.error_bound(q, k, v, "int8-fp16", causal=causal, key_lengths=lengths)
    _assert_within_bound("O - float64", o, oracle_o, bound)
    _assert_within_bound("O - emulate", o, mirror_o, bound)
    empty = oracle_lse == -np.inf
    np.testing.assert_array_equal(lse == -np.inf, empty)
    assert (o[empty] == 0).all()
    if not REAL_GPU:
        _assert_within_bound("O - emulate (simulator)", o, mirror_o, 2 * pr.UNIT_ROUNDOFF["fp16"] * np.abs(mirror_o))
        _assert_within_bound("lse - emulate (simulator)", lse[~empty], mirror_lse[~empty],
                             4 * pr.U32 * np.abs(mirror_lse[~empty]))
    lse_bound = _int8_lse_bound(q, k, v, causal=causal, lengths=lengths)
    _assert_within_bound("lse - float64", lse[~empty], oracle_lse[~empty], lse_bound[~empty])


@gpu
@pytest.mark.parametrize("d", [64, 128])
def test_int8_kernel_writes_every_output_and_repeats_its_bits(d):
    """O preallocated as f16 NaN is all written (no NaN left); 50 more runs give the same bits."""
    _assert_writes_every_output_and_repeats(_int8_run, *_f16_inputs(42, 2, 4, 2, 700, 900, d, d), nan_bits=0x7E00)


def test_int8_kernel_refuses_what_it_cannot_run():
    from nkattn.cuda_kernels.exact_tc import TileConfig
    from nkattn.cuda_kernels.int8 import int8_attention_kernel

    for d, dv in ((24, 16), (16, 8), (144, 64), (0, 16)):
        with pytest.raises(ValueError, match=r"the int8 kernel takes d?v? ?a multiple of 16 from 16 to 128"):
            int8_attention_kernel(d, dv, TileConfig(128, 128))
    for config in (TileConfig(128, 64), TileConfig(192, 128)):
        with pytest.raises(ValueError, match="tiles of 128 keys"):
            int8_attention_kernel(64, 64, config)
    for config in (TileConfig(128, 128, pingpong=True), TileConfig(128, 128, blocks_per_sm=2), TileConfig(128, 128, tma=True)):
        with pytest.raises(ValueError, match="plain wgmma schedule only"):
            int8_attention_kernel(64, 64, config)
