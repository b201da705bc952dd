"""The method registry: entries, option rules (each written once), and that one entry is all a method needs."""

import importlib
from dataclasses import replace

import numpy as np
import pytest

import nkattn
from nkattn import methods
from nkattn.api import plan
from nkattn.cli import main
from nkattn.methods import METHODS, Backend, Method, method_options, on_reference
from nkattn.reference.exact import attention_ref
from nkattn.reference.table import fit_dot_codebook, fit_seed_codebook, pad_table


def rows(n=8, d=32, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((1, 1, n, d))


@pytest.mark.parametrize("method", list(METHODS))
def test_every_entry_is_complete(method):
    entry = METHODS[method]
    assert entry.name == method
    assert "Semantics" in importlib.import_module(entry.semantics).__doc__
    assert [b.name for b in entry.backends][-1] == "reference", "the float64 reference is the last resort"
    assert {b.name for b in entry.backends} <= set(methods.BACKENDS)
    for name, option in entry.options.items():
        assert option.check(name, option.default) == option.default
    assert set(entry.demo_options) <= set(entry.options)


FOREIGN_OPTIONS = [
    pytest.param("exact", {"lsh_bits": 4}, ValueError, "method='exact' takes no option lsh_bits: lsh_bits, lsh_tables and "
                 "lsh_shared_qk only apply to method='lsh'", id="exact-lsh_bits"),
    pytest.param("table", {"lsh_tables": 4}, ValueError, "only apply to method='lsh'", id="table-lsh_tables"),
    pytest.param("exact", {"table": "dot"}, ValueError, "table only applies to method='table'", id="exact-table"),
    pytest.param("lsh", {"table": "dot"}, ValueError, "table only applies to method='table'", id="lsh-table"),
    pytest.param("exact", {"seed": 1}, ValueError, "seed only applies to method='lsh' or method='table' or method='lowrank'",
                 id="exact-seed"),
    pytest.param("lsh", {"rank": 4}, ValueError, "method='lsh' takes no option rank: rank, oversample, power_iters and "
                 "energy only apply to method='lowrank'", id="lsh-rank"),
    pytest.param("lsh", {"tolerance": 0.01}, ValueError, "method='lsh' takes no option tolerance: tolerance only applies "
                 "to method='exact' or method='lowrank'", id="lsh-tolerance"),
    pytest.param("lsh", {"rnak": 4}, TypeError, "unexpected keyword argument 'rnak'", id="unknown"),
]


@pytest.mark.parametrize("method, given, exc, message", FOREIGN_OPTIONS)
def test_an_option_of_another_method_is_an_error(method, given, exc, message):
    with pytest.raises(exc, match=message):
        method_options(method, given)


BAD_OPTIONS = [
    pytest.param("lsh", {"lsh_bits": 0}, "lsh_bits must be an integer in", id="bits-0"),
    pytest.param("lsh", {"lsh_bits": 17}, "lsh_bits must be an integer in", id="bits-17"),
    pytest.param("lsh", {"lsh_bits": True}, "lsh_bits must be an integer in", id="bits-bool"),
    pytest.param("lsh", {"lsh_tables": 0}, "lsh_tables must be an integer >= 1", id="tables-0"),
    pytest.param("lsh", {"lsh_tables": 2.0}, "lsh_tables must be an integer >= 1", id="tables-float"),
    pytest.param("lsh", {"seed": -1}, "seed must be a non-negative integer", id="lsh-seed-negative"),
    pytest.param("table", {"seed": 1.5}, "seed must be a non-negative integer", id="table-seed-float"),
    pytest.param("lsh", {"lsh_shared_qk": "yes"}, "lsh_shared_qk must be True or False, got 'yes'", id="shared-qk-string"),
    pytest.param("table", {"table": "fft"}, r"table must be one of \('dot', 'seed'\) or a fitted TableCodebook, got 'fft'", id="table-name"),
    pytest.param("table", {"table": np.zeros((256, 256), np.uint16)},
                 r"got a numpy.ndarray of shape \(256, 256\) and dtype uint16$", id="table-array"),
]


@pytest.mark.parametrize("method, given, message", BAD_OPTIONS)
def test_bad_options_are_named(method, given, message):
    with pytest.raises((ValueError, TypeError), match=message):
        nkattn.attention(*(rows() for _ in range(3)), method=method, **given)


def test_lsh_defaults_and_the_shared_qk_rule():
    assert method_options("lsh", {}) == {"lsh_bits": 8, "lsh_tables": 4, "seed": 0, "lsh_shared_qk": False}
    q = rows(d=16)
    with pytest.raises(ValueError, match=r"lsh_shared_qk=True derives the keys from q \(Reformer\): pass k=None"):
        nkattn.attention(q, q, q, method="lsh", lsh_shared_qk=True)
    with pytest.raises(ValueError, match=r"lsh_shared_qk=True derives the keys from q, so v must be \(B, H, Nq, dv\)"):
        nkattn.attention(q, None, rows(n=5, d=16), method="lsh", lsh_shared_qk=True)


def test_more_lsh_tables_than_the_kernel_holds_is_a_cuda_reason():
    q = rows(d=16)
    assert plan(q, q, q, method="lsh", lsh_tables=65)[1].name == "reference"
    with pytest.raises(ValueError, match="cuda \\(LSH kernel\\): the LSH kernel supports lsh_tables <= 64, got 65"):
        nkattn.attention(q, q, q, method="lsh", lsh_tables=65, backend="cuda")


# --------------------------------------------------------------------------------------
# table: options it does not use are errors, codebooks are checked before use
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dot_book():
    return fit_dot_codebook(rows(n=40, d=16)[0, 0], rows(n=40, d=16, seed=1)[0, 0], scale=0.25, size=8)


IGNORED = [
    pytest.param({"table": "seed", "scale": 0.5}, "scale does not apply to table='seed'", id="scale-seed-table"),
    pytest.param({"table": "book", "scale": 0.5}, "scale does not apply to a fitted TableCodebook: it carries its own score_scale", id="scale-codebook"),
    pytest.param({"table": "seed", "seed": 3}, "seed does not apply to table='seed'", id="seed-seed-table"),
    pytest.param({"table": "book", "seed": 0}, "seed does not apply to a fitted TableCodebook", id="seed-codebook"),
]


@pytest.mark.parametrize("given, message", IGNORED)
def test_options_the_table_would_ignore_are_errors(given, message):
    q = rows(d=32)
    if given["table"] == "book":
        given = {**given, "table": fit_seed_codebook(q[0, 0], q[0, 0], size=4)}
    with pytest.raises(ValueError, match=message):
        nkattn.attention(q, q, q, method="table", **given)


def test_a_codebook_fitted_at_another_d_is_refused_clearly(dot_book):
    q = rows(d=32)
    with pytest.raises(ValueError, match="this TableCodebook was fitted on rows of d = 16; q and k have d = 32"):
        nkattn.attention(q, q, q, method="table", table=dot_book)
    with pytest.raises(ValueError, match="fitted on rows of d = 16; the rows have d = 32"):
        dot_book.encode_q(q)


@pytest.mark.parametrize("table_u16", [np.zeros((128, 128), np.uint16), np.zeros((256, 256), np.float32)], ids=["128x128", "float32"])
def test_a_codebook_with_a_table_the_kernel_cannot_read_is_refused_everywhere(dot_book, table_u16):
    with pytest.raises(ValueError, match=r"table_u16 must be a \(256, 256\) uint16 table"):
        replace(dot_book, table_u16=table_u16)


def test_a_codebook_runs_on_both_backends(dot_book):
    q, k, v = (rows(n=12, d=16, seed=s) for s in range(3))
    a = nkattn.attention(q, k, v, method="table", table=dot_book, backend="cuda")
    b = nkattn.attention(q, k, v, method="table", table=dot_book, backend="reference")
    assert np.abs(a - b).max() <= 1e-12
    assert pad_table(dot_book.table_u16).shape == (256, 256)


def test_the_table_kernel_tiles_only_dv():
    """q and k are encoded on the host: any d works on the GPU, dv must be a kernel head dim."""
    rng = np.random.default_rng(3)
    q, k = rng.standard_normal((2, 1, 2, 12, 48))
    v = rng.standard_normal((1, 2, 12, 32))
    a = nkattn.attention(q, k, v, method="table", backend="cuda")
    b = nkattn.attention(q, k, v, method="table", backend="reference")
    assert a.shape == (1, 2, 12, 32) and np.abs(a - b).max() <= 1e-12


# --------------------------------------------------------------------------------------
# a new method is one entry
# --------------------------------------------------------------------------------------


def test_a_registered_method_is_served_and_listed(monkeypatch, capsys):
    """What a low-rank method would do: an entry with its options, check and backends, nothing else."""

    def scaled(call, q, k, v):
        return attention_ref(q, k, v, scale=call.scale * call.request.options["gain"], causal=call.request.causal)

    def check_gain(name, x):
        if not x > 0:
            raise ValueError(f"{name} must be > 0, got {x!r}")
        return float(x)

    entry = Method(
        name="sharp", summary="exact attention at a higher temperature", semantics="nkattn.reference.exact",
        approximate=True, options={"gain": methods.Option(2.0, check_gain, "score multiplier")},
        backends=(Backend("reference", "reference (test)", methods.reference_reasons, on_reference(scaled), "float64"),),
    )
    monkeypatch.setitem(METHODS, "sharp", entry)
    q, k, v = (rows(d=16, seed=s) for s in range(3))
    np.testing.assert_array_equal(nkattn.attention(q, k, v, method="sharp", gain=3.0), attention_ref(q, k, v, scale=0.75)[0])
    with pytest.raises(ValueError, match="gain must be > 0"):
        nkattn.attention(q, k, v, method="sharp", gain=-1)
    with pytest.raises(ValueError, match="gain only applies to method='sharp'"):
        nkattn.attention(q, k, v, gain=3.0)
    with pytest.raises(ValueError, match=r"no backend can run method='sharp'.*\n  reference \(test\):"):
        nkattn.attention(*(x.astype(np.float32) for x in (q, k, v)), method="sharp", precision="tf32")
    assert main(["info"]) == 0
    listed = capsys.readouterr().out
    assert "sharp: exact attention at a higher temperature [approximate" in listed
    assert "option gain=2.0: score multiplier" in listed
