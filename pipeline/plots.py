"""Offline rendering of `dvc plots show|diff`: one self-contained HTML page per plot.

DVC's own HTML template loads vega from a CDN, so its pages are blank without a network. DVC's
`--json` output already holds each plot as a filled Vega-Lite spec; `vl-convert` renders such a
spec into HTML with the vega libraries bundled in (and into SVG/PNG for MLflow or a README).
"""

from __future__ import annotations

import html
import json
import subprocess
from pathlib import Path
from typing import Any

from pipeline.errors import UserError


def dvc_plot_specs(revisions: list[str], cwd: Path | None = None) -> dict[str, dict[str, Any]]:
    """Plot id -> filled Vega-Lite spec, from `dvc plots show --json` (or `diff` with revisions)."""
    command = ["dvc", "plots", "diff", *revisions] if revisions else ["dvc", "plots", "show"]
    proc = subprocess.run([*command, "--json"], cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise UserError(f"{' '.join(command)} failed: {proc.stderr.strip() or proc.stdout.strip()}")
    payload = json.loads(proc.stdout)
    specs: dict[str, dict[str, Any]] = {}
    for plot_id, entries in payload.get("data", {}).items():
        for entry in entries:
            if entry.get("type") == "vega":
                specs[plot_id] = entry["content"]
    if not specs:
        errors = payload.get("errors") or "no plots defined"
        raise UserError(f"{' '.join(command)}: nothing to render ({errors})")
    return specs


def _file_name(plot_id: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in plot_id) + ".html"


def render_html(specs: dict[str, dict[str, Any]], out_dir: Path) -> Path:
    """Write `<plot>.html` (vega bundled in, works offline) per plot and an `index.html`."""
    import vl_convert

    out_dir.mkdir(parents=True, exist_ok=True)
    frames = []
    for plot_id, spec in specs.items():
        name = _file_name(plot_id)
        (out_dir / name).write_text(vl_convert.vegalite_to_html(spec, bundle=True))
        frames.append(
            f'<h2>{html.escape(plot_id)}</h2><iframe src="{name}" width="720" height="460" '
            'style="border:0"></iframe>'
        )
    index = out_dir / "index.html"
    index.write_text(
        "<!doctype html><html><head><meta charset='utf-8'><title>DVC plots</title></head>"
        "<body>" + "\n".join(frames) + "</body></html>\n"
    )
    return index


def render_svg(spec: dict[str, Any]) -> str:
    """The plot as an SVG string (for tests, MLflow artifacts and documents)."""
    import vl_convert

    return vl_convert.vegalite_to_svg(spec)
