"""The command line: listings from the registries, one-line refusals, the simulator chosen first."""

import re
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from nkattn import cli, runner
from nkattn.cli import main
from nkattn.methods import METHODS, tensor_core_reasons
from nkattn.studies import BENCHES, STUDIES

from .conftest import SIMULATOR

CALLS = []


def run(*, quick: bool, results_dir: Path) -> list[Path]:
    """A stand-in study (this module is its `module`): records how it was called."""
    CALLS.append(("run", quick, results_dir))
    return [results_dir / "fake.json"]


@pytest.fixture
def fake_study(monkeypatch):
    CALLS.clear()

    def choose():
        CALLS.append(("choose_simulator",))
        return True

    monkeypatch.setattr(cli, "_choose_simulator", choose)

    def register(needs_gpu):
        monkeypatch.setitem(STUDIES, "fake", SimpleNamespace(module=__name__, summary="a stand-in", needs_gpu=needs_gpu))

    return register


def test_study_help_lists_every_study_with_its_summary(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["study", "--help"])
    assert exit_info.value.code == 0
    listed = capsys.readouterr().out
    for name in STUDIES:
        assert f"  {name} " in listed
    assert STUDIES["rank-entropy"].summary in listed


def test_bench_lists_the_methods_with_a_bench_then_the_others(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    listed = capsys.readouterr().out
    assert "{" + ",".join([*(m.name for m in METHODS.values() if m.bench), *BENCHES]) + "}" in listed


def test_a_study_chooses_the_simulator_first_and_gets_a_results_dir(fake_study, capsys):
    fake_study(needs_gpu=False)
    assert main(["study", "fake", "--quick"]) == 0
    from nkattn.results import RESULTS_DIR

    assert CALLS == [("choose_simulator",), ("run", True, RESULTS_DIR)]
    assert f"wrote {RESULTS_DIR / 'fake.json'}" in capsys.readouterr().out


@pytest.mark.parametrize("argv, command", [(["study", "fake"], "study fake"), (["bench", "exact"], "bench exact"),
                                           (["bench", "distributed", "--quick"], "bench distributed")],
                         ids=["gpu-study", "bench", "bench-distributed"])
def test_gpu_commands_without_a_gpu_end_in_one_line(fake_study, monkeypatch, capsys, argv, command):
    fake_study(needs_gpu=True)
    monkeypatch.setattr(cli, "_gpu_present", lambda: False)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err == f"error: `nkattn {command}` needs a CUDA GPU (none found; the simulator cannot time kernels)\n"
    assert ("run", False, None) not in CALLS


def test_an_option_a_bench_does_not_take_is_an_error(capsys):
    assert main(["bench", "lsh", "--repeats", "5"]) == 2
    assert capsys.readouterr().err == "error: `nkattn bench lsh` takes no --repeats\n"
    assert main(["bench", "exact", "--dtype", "float16"]) == 2
    assert capsys.readouterr().err == "error: `nkattn bench exact` takes no --dtype\n"


def test_figures_without_the_studies_extra_says_which_extra(monkeypatch, capsys):
    monkeypatch.delitem(sys.modules, "nkattn.figures", raising=False)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    assert main(["figures"]) == 2
    assert "needs the studies extra (missing matplotlib): pip install -e '.[studies]'" in capsys.readouterr().err


def test_run_says_what_the_simulator_cuts_and_what_the_columns_mean(monkeypatch, capsys):
    monkeypatch.setattr(runner, "SIMULATOR_TOKENS", 8)
    assert main(["run"]) == 0
    out = capsys.readouterr().out
    cut = ("simulator: the CUDA simulator runs every GPU thread in Python, so this runs 1 of the 4 heads (L0H2) "
           "on the first 8 of the 128 tokens; on a GPU all of it runs")
    assert (cut in out) == SIMULATOR
    assert ("shape q (1, 1, 8, 32)" if SIMULATOR else "shape q (1, 4, 128, 32)") in out
    rows = [re.split(r"\s{2,}", line) for line in out.splitlines() if line.split()[:1] and line.split()[0] in METHODS]
    # half rows where a kernel takes half inputs: the tensor-core kernel of "exact" (simulator, sm_80 and up)
    halves = ("float16", "bfloat16") if not tensor_core_reasons() else ()
    expected = [(m, dt) for m in METHODS for dt in ((*halves, "float32", "float64") if m == "exact" else ("float32", "float64"))]
    assert [(r[0], r[2]) for r in rows] == expected
    bounds = {"float16": 2e-3, "bfloat16": 2e-2, "float32": 1e-6, "float64": 1e-14}
    # float32 rounding in the products turns lowrank's singular vectors by ~eps32 / spectral gap
    # (1.9e-6 on the H100, 2026-11-27; the simulator computes float32 in float64)
    # float64: the GPU factorizes with cuSOLVER, the reference with LAPACK (1.9e-14 on the H100, 2026-11-28)
    bounds_of = {("lowrank", "float32"): 1e-5, ("lowrank", "float64"): 1e-13}
    for method, backend, dtype, own, vs_exact, bits, deterministic, ms in rows:
        assert float(own) < bounds_of.get((method, dtype), bounds[dtype]), (method, dtype)
        assert vs_exact.endswith(" *") == METHODS[method].approximate
        assert deterministic == "yes"
        assert bits == ("yes" if (method, dtype) == ("exact", "float64") else "n/a")
    assert "approximate methods: this is what the approximation\n    costs on this input, not a failure" in out
