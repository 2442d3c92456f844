"""Certified-accuracy curves of result files, as a PNG, PDF or SVG image (``analyze --plot``).

One line per results file, plus the envelope (best single expert at each radius) and the
oracle (best expert per example) whenever :func:`~dualrs_route.router.results.report_from_tables`
computes them, evaluated on a fine grid of radii from 0 to the largest certified radius.
matplotlib is optional (``pip install 'dualrs-route[plot]'``) and imported only here.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from dualrs_route.experts.atomic import atomic_write
from dualrs_route.experts.errors import DataError, EngineUnavailableError

from .results import ResultTable, load_tables, report_from_tables

PLOT_SUFFIXES = (".png", ".pdf", ".svg")
INSTALL_HINT = "pip install 'dualrs-route[plot]'"
GRID_POINTS = 200


def check_plot_path(path: str | os.PathLike) -> Path:
    """The image path, or ValueError unless it ends in .png, .pdf or .svg (any case)."""
    path = Path(path)
    if path.suffix.lower() not in PLOT_SUFFIXES:
        raise ValueError(f"the image format comes from the suffix: use one of {', '.join(PLOT_SUFFIXES)}, "
                         f"got {path.name!r}")
    return path


def _import_matplotlib():
    try:
        import matplotlib
        from matplotlib.figure import Figure  # its own Agg canvas; pyplot's global backend is left alone
    except ImportError as exc:
        raise EngineUnavailableError(f"--plot needs matplotlib ({exc}); `{INSTALL_HINT}`") from None
    return matplotlib, Figure


def label_of(table: ResultTable) -> str:
    """The run's description from its sidecar when it has one, else its name (the file stem)."""
    description = table.metadata.get("description")
    if not (isinstance(description, str) and description.strip()):
        description = table.metadata.get("settings", {}).get("description")
    return description.strip() if isinstance(description, str) and description.strip() else table.name


def max_certified_radius(tables: Sequence[ResultTable]) -> float:
    """Largest finite radius of a certified-correct row over the tables (0 when there is none)."""
    best = 0.0
    for t in tables:
        good = (t.correct == 1) & np.isfinite(t.radius)
        if np.any(good):
            best = max(best, float(np.max(t.radius[good])))
    return best


def curve_data(tables: Sequence[ResultTable], *, oracle: bool | None = None, points: int = GRID_POINTS) -> dict:
    """Certified accuracy (%) on ``points`` radii from 0 to the largest certified radius.

    Returns ``{"radii": array, "curves": [{"label", "mode", "acr", "accuracy": array}, ...]}``,
    the files first, then the envelope and the oracle when the analysis adds them.
    """
    rmax = max_certified_radius(tables)
    grid = np.linspace(0.0, rmax if rmax > 0 else 1.0, points)
    report = report_from_tables(tables, [float(r) for r in grid], oracle=oracle)
    labels = [label_of(t) for t in tables] + [None] * (len(report["rows"]) - len(tables))
    curves = []
    for row, label in zip(report["rows"], labels):
        acc = np.array([100.0 * row["certified_accuracy"][float(r)] for r in grid])
        if label is None:
            label = {"envelope": "envelope (best single expert per radius)",
                     "oracle": "oracle (best expert per example)"}.get(row["mode"], row["name"])
        curves.append({"label": label, "mode": row["mode"], "acr": row["acr"], "count": row["count"],
                       "accuracy": acc})
    return {"radii": grid, "curves": curves, "max_radius": rmax}


def _subtitle(tables: Sequence[ResultTable]) -> str:
    """What every file shares (dataset and split, N, total alpha) and how many examples they cover."""
    settings = [t.metadata.get("settings", {}) for t in tables]

    def shared(values):
        return values[0] if values and all(v is not None and v == values[0] for v in values) else None

    parts = []
    dataset, split = shared([s.get("dataset") for s in settings]), shared([s.get("split") for s in settings])
    if isinstance(dataset, str):
        parts.append(f"{dataset} {split}" if isinstance(split, str) else dataset)
    n = shared([s.get("N") for s in settings])
    if isinstance(n, int):
        parts.append(f"N = {n}")
    alpha = shared([None if s.get("alpha_expert") is None
                    else round(s["alpha_expert"] + (s.get("alpha_router") or 0), 12) for s in settings])
    if alpha is not None:
        parts.append(f"\u03b1 = {alpha:g}")
    counts = sorted({len(t.idx) for t in tables})
    parts.append(f"{counts[0]} examples" if len(counts) == 1 else f"{counts[0]}-{counts[-1]} examples")
    return ", ".join(parts)


def draw_curves(data: dict, path: Path, *, title: str = "Certified accuracy against \u2113\u2082 radius",
                subtitle: str = "") -> Path:
    """Draw ``curve_data``'s curves into ``path`` (format from its suffix), atomically."""
    path = check_plot_path(path)
    _, Figure = _import_matplotlib()
    fig = Figure(figsize=(8.0, 5.0), dpi=150, layout="constrained")
    ax = fig.add_subplot()
    radii = data["radii"]
    files = [c for c in data["curves"] if c["mode"] not in ("envelope", "oracle")]
    colors = _colors(len(files))
    for curve, color in zip(files, colors):
        router = curve["mode"] == "router"
        ax.plot(radii, curve["accuracy"], drawstyle="steps-post", color=color, linewidth=2.4 if router else 1.6,
                label=f"{curve['label']}  (ACR {curve['acr']:.3f})", zorder=3 if router else 2)
    for curve in data["curves"]:
        if curve["mode"] == "envelope":
            # a wide pale band behind the files' lines, so the expert it follows stays visible
            ax.plot(radii, curve["accuracy"], drawstyle="steps-post", color="black", alpha=0.16, linewidth=6.0,
                    solid_capstyle="butt", label=curve["label"], zorder=1)
        elif curve["mode"] == "oracle":
            ax.plot(radii, curve["accuracy"], drawstyle="steps-post", color="0.25", linestyle=(0, (1.2, 1.6)),
                    linewidth=1.6, label=f"{curve['label']}  (ACR {curve['acr']:.3f})", zorder=4)
    top = max([float(np.max(c["accuracy"])) for c in data["curves"]] + [1.0])
    ax.set_xlim(0.0, float(radii[-1]))
    ax.set_ylim(0.0, min(100.0, 10.0 * math.ceil(top / 10.0 + 0.05)))  # headroom above the highest curve
    ax.set_xlabel("radius (\u2113\u2082)")
    ax.set_ylabel("certified accuracy (%)")
    ax.set_title(title + (f"\n{subtitle}" if subtitle else ""), fontsize=11)
    ax.grid(True, which="major", alpha=0.35)
    ax.minorticks_on()
    ax.grid(True, which="minor", alpha=0.12)
    ax.legend(loc="upper right", fontsize=8.5, framealpha=0.92)
    _save_atomic(fig, path)
    return path


def _colors(n: int) -> list:
    cycle = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22"]
    return [cycle[i % len(cycle)] for i in range(n)]


def _save_atomic(fig, path: Path) -> None:
    """savefig into a temporary file beside ``path``, then rename; no partial file on failure."""
    with atomic_write(path) as handle:
        fig.savefig(handle, format=path.suffix.lower().lstrip("."))


def plot_tables(tables: Sequence[ResultTable], out: str | os.PathLike, *, oracle: bool | None = None,
                points: int = GRID_POINTS) -> Path:
    """Draw the certified-accuracy curves of tables already read (see ``load_tables``) into ``out``."""
    out = check_plot_path(out)
    _import_matplotlib()  # fail before any work when it is missing
    if not tables:
        raise DataError("--plot needs at least one results file")
    return draw_curves(curve_data(tables, oracle=oracle, points=points), out, subtitle=_subtitle(tables))


def plot_results(paths: Sequence[str], out: str | os.PathLike, *, oracle: bool | None = None,
                 points: int = GRID_POINTS) -> Path:
    """Read the result files and draw their certified-accuracy curves into ``out``."""
    check_plot_path(out)
    _import_matplotlib()
    return plot_tables(load_tables(paths), out, oracle=oracle, points=points)
