"""`gpt3 plots`: DVC's loss plot rendered to a page that works offline (no CDN)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.plots import dvc_plot_specs, render_html, render_svg

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture()
def plot_repo(tmp_path: Path) -> Path:
    """A git + DVC repo with this project's top-level loss plot and two small curves."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run(["dvc", "init", "-q"], cwd=tmp_path, check=True, env=env)
    curves = tmp_path / "experiments" / "run" / "plots"
    curves.mkdir(parents=True)
    (curves / "train_loss.csv").write_text("step,train_loss\n1,8.3\n2,7.1\n3,6.4\n4,5.9\n")
    (curves / "val_loss.csv").write_text("step,val_loss\n2,7.4\n4,6.2\n")
    (tmp_path / "dvc.yaml").write_text(
        "plots:\n  - loss:\n      x: step\n      y:\n"
        "        experiments/run/plots/train_loss.csv: train_loss\n"
        "        experiments/run/plots/val_loss.csv: val_loss\n"
    )
    return tmp_path


def test_loss_plot_renders_offline(plot_repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    specs = dvc_plot_specs([], cwd=plot_repo)
    assert list(specs) == ["loss"]
    index = render_html(specs, plot_repo / "dvc_plots")
    page = (index.parent / "loss.html").read_text()
    assert not re.search(r"<script[^>]+src=\"https?://", page), (
        "the page loads scripts from the web"
    )
    svg = render_svg(specs["loss"])
    assert svg.count("<path") >= 2, "expected line marks for both curves"
    assert "train_loss" in svg and "val_loss" in svg


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian's chromium is not installed")
def test_loss_plot_draws_in_headless_chromium(
    plot_repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    index = render_html(dvc_plot_specs([], cwd=plot_repo), plot_repo / "dvc_plots")
    dom = subprocess.run(
        [
            "chromium",
            *CHROMIUM_FLAGS,
            f"--user-data-dir={plot_repo / 'chromium-profile'}",
            "--virtual-time-budget=10000",
            "--dump-dom",
            (index.parent / "loss.html").as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    assert 'class="marks"' in dom, "vega did not draw the chart"
    assert "train_loss" in dom
