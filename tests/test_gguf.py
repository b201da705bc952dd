"""GGUF: MiniLM's attention weights written with gguf's writer and read back within each
format's rounding bound, and the seed's weight-table pipeline (`nkattn.gguf_weights`)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import numpy as np
import pytest

from nkattn.reference import bert
from nkattn.reference import table as T

needs_model = pytest.mark.skipif(
    not bert.model_available(), reason=f"MiniLM weights not installed: {bert.INSTALL_HINT}"
)
needs_gguf = pytest.mark.skipif(importlib.util.find_spec("gguf") is None, reason="the gguf package is not installed")


def _synthetic_tensors():
    rng = np.random.default_rng(15)
    a = rng.normal(0, 0.05, (6, 128)).astype(np.float32)
    a[0, :32] = 0.0  # an all-zero Q8_0 block (d = 0)
    a[1, :5] = [1e-7, -3e-6, 6e-5, 2**-20, -(2**-24)]  # float16 subnormals
    b = (rng.normal(size=(64, 32)) * np.exp(rng.normal(0, 2, (64, 1)))).astype(np.float32)  # wide range of block scales
    return {"blk.0.attn_q.weight": a, "blk.0.attn_k.weight": b}


@needs_gguf
@pytest.mark.parametrize("fmt", ["F32", "F16", "BF16", "Q8_0"])
def test_gguf_roundtrip_within_the_format_bound(tmp_path, fmt):
    from nkattn import gguf_weights as G

    tensors = _synthetic_tensors()
    path = G.write_gguf(tmp_path / f"t-{fmt}.gguf", tensors, fmt)
    back = G.read_gguf(path)
    assert set(back) == set(tensors)
    for name, x in tensors.items():
        t = back[name]
        assert t.format == fmt and t.shape == x.shape and t.values.dtype == np.float32
        ratio = G.roundtrip_check(x, t.values, fmt)
        if fmt == "F32":
            np.testing.assert_array_equal(t.values, x)
        else:
            assert 0.25 < ratio <= 1.0, ratio  # the bound holds and is not vacuous


@needs_gguf
def test_gguf_bound_catches_a_wrong_value(tmp_path):
    from nkattn import gguf_weights as G

    x = _synthetic_tensors()["blk.0.attn_k.weight"]
    bad = x.copy()
    bad[3, 4] *= 1.01
    with pytest.raises(AssertionError, match=r"BF16: error .* at \(3, 4\)"):
        G.roundtrip_check(x, bad, "BF16")
    with pytest.raises(AssertionError, match="not exact"):
        G.roundtrip_check(x, bad, "F32")


@needs_gguf
def test_gguf_errors(tmp_path):
    from nkattn import gguf_weights as G

    with pytest.raises(ValueError, match="multiple of 32"):
        G.write_gguf(tmp_path / "a.gguf", {"w": np.ones((2, 40), np.float32)}, "Q8_0")
    with pytest.raises(ValueError, match="format must be"):
        G.write_gguf(tmp_path / "b.gguf", {"w": np.ones((2, 32), np.float32)}, "Q4_K")
    with pytest.raises(ValueError, match="non-finite"):
        G.write_gguf(tmp_path / "c.gguf", {"w": np.full((2, 32), np.nan, np.float32)}, "F16")
    assert G.gguf_name("encoder.layer.3.attention.self.key.weight") == "blk.3.attn_k.weight"
    assert G.gguf_name("encoder.layer.5.attention.output.dense.weight") == "blk.5.attn_output.weight"
    with pytest.raises(ValueError, match="not a MiniLM attention weight"):
        G.gguf_name("encoder.layer.0.intermediate.dense.weight")


def test_gguf_is_imported_lazily():
    code = "import sys, nkattn.gguf_weights, nkattn.reference.table; assert 'gguf' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


@needs_gguf
def test_weights_table_pipeline(tmp_path):
    from nkattn import gguf_weights as G

    tensors = {"blk.0.attn_q.weight": np.random.default_rng(16).normal(0, 1, (300, 64)).astype(np.float32)}
    path = G.write_gguf(tmp_path / "w.gguf", tensors, "Q8_0")
    wt = G.weights_table(path, "blk.0.attn_q.weight")
    rows = G.read_gguf(path)["blk.0.attn_q.weight"].values
    np.testing.assert_array_equal(wt.rows, rows)
    np.testing.assert_array_equal(wt.codes_i16, T.base17_i16(rows))
    np.testing.assert_array_equal(wt.palette_rows, T.farthest_point_palette(wt.codes_i16))
    np.testing.assert_array_equal(wt.assignment, T.assign_l1(wt.codes_i16, wt.codes_i16[wt.palette_rows]))
    p = len(wt.palette_rows)
    assert wt.table.shape == (256, 256) and wt.assignment.dtype == np.uint8
    np.testing.assert_array_equal(wt.table[:p, :p], T.seed_distance_table(wt.codes_i16[wt.palette_rows]))
    with pytest.raises(KeyError, match="not in"):
        G.weights_table(path, "blk.9.attn_q.weight")


@needs_gguf
@needs_model
def test_minilm_weights_roundtrip_all_formats(tmp_path):
    from nkattn import gguf_weights as G

    weights = G.minilm_attention_weights()
    assert len(weights) == 24 and weights["blk.0.attn_q.weight"].shape == (384, 384)
    records = G.minilm_roundtrips(tmp_path, weights={k: w for k, w in weights.items() if k.startswith("blk.5.")})
    assert {r["format"] for r in records} == set(G.FORMATS) and len(records) == 16
    assert all(r["max_err_over_bound"] <= 1 for r in records)
    assert all(r["max_abs_err"] == 0 for r in records if r["format"] == "F32")


