"""Figures are made from stored results only, and a missing result is named."""

from __future__ import annotations

import numpy as np
import pytest

from nkattn import figures
from nkattn.results import make_meta, write_results
from nkattn.studies import STUDIES
from nkattn.studies import rank_entropy as re


@pytest.fixture(scope="module")
def stored_result(tmp_path_factory):
    """A small rank-entropy result (random q, k, v; 2 layers x 3 heads, 3 passages, 2 lengths)."""
    results_dir = tmp_path_factory.mktemp("results")
    rng = np.random.default_rng(0)
    collector = re.Collector()
    for passage in range(3):
        for n in (64, 128):
            for layer in range(2):
                k, v = rng.normal(size=(2, 3, n, 32))
                q = rng.normal(size=(3, n, 32)) * np.array([0.3, 1.0, 3.0])[:, None, None]  # diffuse to sharp heads
                collector.add(layer, q, k, v, passage=passage, n=n)
    meta = make_meta(config={"synthetic": True}, command="pytest")
    meta["summary"] = re.summarize(collector.records, collector.spectra(), n_boot=20)
    write_results(results_dir / re.STUDY / re.FULL_RESULT, meta, collector.records)
    return results_dir


def test_every_figure_function_writes_pdf_and_png(stored_result, tmp_path):
    for make in re.FIGURES:
        paths = make(stored_result, tmp_path)
        assert [p.suffix for p in paths] == [".pdf", ".png"], make.__name__
        assert paths[0].read_bytes()[:5] == b"%PDF-"
        assert paths[1].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert paths[0].parent == tmp_path / "rank-entropy"


def test_build_all_walks_the_registry(stored_result, tmp_path):
    assert "rank-entropy" in STUDIES
    paths = figures.build_all(stored_result, tmp_path, studies=["rank-entropy"])
    assert len(paths) == 2 * len(re.FIGURES)
    assert all(p.exists() and p.stat().st_size > 1000 for p in paths)
    with pytest.raises(ValueError, match="unknown studies"):
        figures.build_all(stored_result, tmp_path, studies=["no-such-study"])


def test_figures_do_not_recompute(stored_result, tmp_path, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("a figure ran the study")

    monkeypatch.setattr(re, "run", forbidden)
    monkeypatch.setattr(re, "head_metrics", forbidden)
    monkeypatch.setattr(re, "sweep", forbidden)
    assert len(figures.build_all(stored_result, tmp_path, studies=["rank-entropy"])) == 2 * len(re.FIGURES)


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
