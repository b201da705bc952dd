"""Figures are made from stored results only, a missing result is named, and drawing twice gives the same bytes."""

from __future__ import annotations

import numpy as np
import pytest

from nkattn import figures
from nkattn.results import make_meta, write_results
from nkattn.studies import STUDIES
from nkattn.studies import rank_entropy as re
from nkattn.studies import rank_entropy_plots as rp


def _synthetic_result(results_dir, filename):
    """A small rank-entropy result (random q, k, v; 2 layers x 3 heads, 3 passages, 2 lengths)."""
    rng = np.random.default_rng(0)
    collector = re.Collector()
    for passage in range(3):
        for n in (64, 128):
            for layer in range(2):
                k, v = rng.normal(size=(2, 3, n, 32))
                q = rng.normal(size=(3, n, 32)) * np.array([0.3, 1.0, 3.0])[:, None, None]  # diffuse to sharp heads
                collector.add(layer, q, k, v, passage=passage, n=n)
    config = re.study_config(
        model="synthetic", layers=2, heads=3, head_dim=32, lengths=(64, 128), n_passages=3, n_boot=20,
        quick=filename == re.QUICK_RESULT,
    )
    meta = make_meta(config=config, command="pytest")
    meta["summary"] = re.summarize(collector.records, collector.spectra(), n_boot=20)
    write_results(results_dir / re.STUDY / filename, meta, collector.records)
    return results_dir


@pytest.fixture(scope="module")
def stored_result(tmp_path_factory):
    return _synthetic_result(tmp_path_factory.mktemp("results"), re.FULL_RESULT)


def test_build_all_draws_every_figure_from_stored_results_only(stored_result, tmp_path, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("a figure ran the study")

    for name in ("run", "head_metrics", "sweep", "summarize"):
        monkeypatch.setattr(re, name, forbidden)
    assert STUDIES["rank-entropy"].plots == rp.__name__
    paths = figures.build_all(stored_result, tmp_path, studies=["rank-entropy"])
    assert len(paths) == 2 * len(rp.FIGURES)
    for pdf, png in zip(paths[::2], paths[1::2]):
        assert pdf.parent == png.parent == tmp_path / "rank-entropy" and pdf.stem == png.stem
        assert pdf.read_bytes()[:5] == b"%PDF-" and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_build_all_rejects_an_unknown_study(tmp_path):
    with pytest.raises(ValueError, match="unknown studies"):
        figures.build_all(tmp_path, tmp_path, studies=["no-such-study"])


def test_drawing_twice_writes_the_same_bytes(stored_result, tmp_path):
    """No creation date in the PDF, no software or time chunk in the PNG: files change only with the results."""
    first = [p.read_bytes() for p in rp.fig_spectra(stored_result, tmp_path / "first")]
    second = [p.read_bytes() for p in rp.fig_spectra(stored_result, tmp_path / "second")]
    assert first == second
    assert b"CreationDate" not in first[0] and b"Matplotlib" not in first[0]
    assert b"tEXt" not in first[1] and b"tIME" not in first[1]  # PNG text and time chunks


def test_a_quick_run_is_drawn_when_the_full_result_is_missing_and_says_so(tmp_path):
    import matplotlib.pyplot as plt

    quick_dir = _synthetic_result(tmp_path / "results", re.QUICK_RESULT)
    data = figures.load_result(quick_dir, re.STUDY, re.FULL_RESULT, quick=re.QUICK_RESULT)
    assert data["quick_run"] and data["path"] == quick_dir / re.STUDY / re.QUICK_RESULT
    assert not figures.load_result(quick_dir, re.STUDY, re.QUICK_RESULT)["quick_run"]
    assert len(rp.fig_spectra(quick_dir, tmp_path / "figures")) == 2
    fig = plt.figure()
    figures.save_figure(fig, tmp_path / "figures", "note", results=[data])
    assert [t.get_text() for t in fig.texts] == [
        "quick run (`pytest`): a small configuration, not the study's results"
    ]


@pytest.mark.parametrize("studies", [None, ["rank-entropy"]], ids=["all-studies", "rank-entropy"])
def test_missing_result_names_the_file_and_the_command(tmp_path, studies):
    with pytest.raises(figures.MissingResultError) as info:
        figures.build_all(tmp_path / "empty", tmp_path / "figures", studies=studies)
    message = str(info.value)
    assert str(tmp_path / "empty" / "rank-entropy" / "minilm.json") in message
    assert "`nkattn study rank-entropy`" in message
    assert message.count(str(tmp_path / "empty" / "rank-entropy" / "minilm.json")) == 1  # six figures need it, it is reported once
    assert isinstance(info.value, FileNotFoundError)


def test_save_figure_and_style(tmp_path):
    import matplotlib.pyplot as plt

    with figures.style():
        fig, ax = plt.subplots(figsize=(figures.COLUMN_WIDTH, 2))
        ax.plot([1, 2], [3, 4])
        assert plt.rcParams["pdf.fonttype"] == 42
    paths = figures.save_figure(fig, tmp_path / "sub", "line")
    assert paths == [tmp_path / "sub" / "line.pdf", tmp_path / "sub" / "line.png"]
    assert all(p.exists() for p in paths)
    assert not plt.get_fignums()  # closed after saving


def test_every_plot_module_draws_inside_the_house_style():
    """A figure function that forgets `style()` comes out in matplotlib's defaults: every one
    opens it (checked on the source, since most need results this test does not have)."""
    import importlib
    import inspect

    for name, info in STUDIES.items():
        if info.plots is None:
            continue
        module = importlib.import_module(info.plots)
        assert module.FIGURES, name
        for make in module.FIGURES:
            source = inspect.getsource(make)
            assert "with style():" in source and "plt.subplots" in source.split("with style():", 1)[1], make.__name__
