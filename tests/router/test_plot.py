"""``analyze --plot``: certified-accuracy curves as an image, the envelope and oracle lines, the
missing-matplotlib hint, the suffix check and the atomic write."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from dualrs_route.cli import main
from dualrs_route.router.results import load_tables, sidecar_path

pytest.importorskip("matplotlib")

from dualrs_route.router.plot import GRID_POINTS, curve_data, plot_tables  # noqa: E402

HEAD = "idx\tlabel\tpredict\tradius\tcorrect\ttime\n"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def write_tsv(path: Path, rows, *, metadata: dict | None = None) -> Path:
    """A results TSV in Cohen's columns; with ``metadata``, a sidecar as ResultsWriter writes it."""
    path.write_text(HEAD + "".join(f"{i}\t{y}\t{p}\t{r:.6f}\t{int(p == y)}\t0.01\n" for i, y, p, r in rows))
    if metadata is not None:
        sidecar_path(path).write_text(json.dumps(metadata))
    return path


def two_experts(tmp_path: Path) -> tuple[Path, Path]:
    rng = np.random.default_rng(0)
    a_rows, b_rows = [], []
    for i in range(40):
        y = int(rng.integers(10))
        a_rows.append((i, y, y if rng.random() < 0.8 else -1, float(rng.uniform(0, 0.8))))
        b_rows.append((i, y, y if rng.random() < 0.5 else (y + 1) % 10, float(rng.uniform(0, 2.0))))
    a = write_tsv(tmp_path / "expert-0.25.tsv", a_rows,
                  metadata={"description": "sigma 0.25 expert", "settings": {"mode": "single", "dataset": "toy"}})
    b = write_tsv(tmp_path / "expert-1.0.tsv", b_rows)  # Cohen's file: no sidecar, mode single
    return a, b


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_plot_png_from_two_results_files(tmp_path):
    a, b = two_experts(tmp_path)
    out = tmp_path / "figs" / "curves.png"  # a missing folder is created
    result = invoke("analyze", a, b, "--plot", out)
    assert result.exit_code == 0, result.output
    assert "| expert-1.0 | 40 |" in result.output and f"wrote {out}" in result.output
    data = out.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert 10_000 < len(data) < 5_000_000
    import matplotlib.image

    image = matplotlib.image.imread(out)
    assert image.ndim == 3 and image.shape[0] > 300 and image.shape[1] > 500
    colours = np.unique(image.reshape(-1, image.shape[-1]), axis=0)
    assert len(colours) > 10  # lines, text and grid, not a blank canvas
    assert sorted(p.name for p in out.parent.iterdir()) == ["curves.png"]  # no temporary file left


@pytest.mark.parametrize("suffix, magic", [(".pdf", b"%PDF"), (".SVG", b"<?xml")])
def test_plot_format_follows_the_suffix(tmp_path, suffix, magic):
    a, b = two_experts(tmp_path)
    out = tmp_path / f"curves{suffix}"
    result = invoke("analyze", a, b, "--plot", out, "--format", "json")
    assert result.exit_code == 0, result.output
    assert out.read_bytes().startswith(magic)


def test_curves_have_labels_envelope_and_oracle(tmp_path):
    a, b = two_experts(tmp_path)
    tables = load_tables([str(a), str(b)])
    data = curve_data(tables)
    radii = data["radii"]
    assert len(radii) == GRID_POINTS and radii[0] == 0.0
    rmax = max(float(t.radius[t.correct == 1].max()) for t in tables)
    assert radii[-1] == pytest.approx(rmax)
    curves = {c["mode"] if c["mode"] in ("envelope", "oracle") else c["label"]: c["accuracy"] for c in data["curves"]}
    assert set(curves) == {"sigma 0.25 expert", "expert-1.0", "envelope", "oracle"}  # description, else stem
    expected = [100 * np.mean((tables[1].correct == 1) & (tables[1].radius >= r)) for r in radii]
    assert np.allclose(curves["expert-1.0"], expected)
    assert np.allclose(curves["envelope"], np.maximum(curves["sigma 0.25 expert"], curves["expert-1.0"]))
    assert np.all(curves["oracle"] >= curves["envelope"] - 1e-9)
    assert np.all(np.diff(curves["expert-1.0"]) <= 0)
    assert {c["mode"] for c in curve_data(tables, oracle=False)["curves"]} == {"single", "envelope"}


def assert_one_error_line(result, mentions: str):
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert not any("Traceback" in line for line in lines), result.output
    assert len(lines) == 1 and lines[0].startswith("Error:"), result.output
    assert mentions in lines[0], lines[0]


def test_missing_matplotlib_gives_the_install_hint(tmp_path, monkeypatch):
    a, b = two_experts(tmp_path)
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    out = tmp_path / "curves.png"
    result = invoke("analyze", a, b, "--plot", out)
    assert result.exit_code == 1
    assert_one_error_line(result, "pip install 'dualrs-route[plot]'")
    assert not out.exists()


@pytest.mark.parametrize("name", ["curves.jpg", "curves", "curves.png.txt"])
def test_bad_suffix_is_a_usage_error(tmp_path, name):
    a, b = two_experts(tmp_path)
    result = invoke("analyze", a, b, "--plot", tmp_path / name)
    assert result.exit_code == 2, result.output
    assert "--plot" in result.output and ".png, .pdf, .svg" in result.output
    assert not (tmp_path / name).exists()


def test_failed_write_keeps_the_old_image_and_leaves_no_temp_file(tmp_path, monkeypatch):
    a, b = two_experts(tmp_path)
    out = tmp_path / "plots" / "curves.png"
    out.parent.mkdir()
    out.write_bytes(b"old image")
    from matplotlib.figure import Figure

    def broken(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(Figure, "savefig", broken)
    from dualrs_route.experts.errors import OutputError

    with pytest.raises(OutputError, match=f"cannot write {out}: disk full"):  # one line naming the image
        plot_tables(load_tables([str(a), str(b)]), out)
    assert out.read_bytes() == b"old image"
    assert [p.name for p in out.parent.iterdir()] == ["curves.png"]
