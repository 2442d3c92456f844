"""Packaging: the built wheel holds one top-level package with every bundled model file, and
(slow) installs into a fresh venv where `dualrs-route certify` runs outside the repository."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(ROOT)],
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        pytest.skip(f"cannot build the wheel here (pip needs setuptools from the registry): {proc.stderr[-300:]}")
    return next(out.glob("dualrs_route-*.whl"))


def test_the_wheel_has_one_top_level_package_and_every_model_file(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"dualrs_route", wheel.name.split("-py")[0] + ".dist-info"}
    for zoo in ("experts", "router"):
        for folder in (ROOT / zoo / "zoo").iterdir():
            if folder.is_dir() and (folder / "config.json").is_file():
                for f in folder.iterdir():
                    if f.name in ("config.json", "model.safetensors", "model.onnx"):
                        assert f"dualrs_route/{zoo}/zoo/{folder.name}/{f.name}" in names, f


@pytest.mark.slow
def test_fresh_venv_from_the_wheel_certifies_outside_the_repository(wheel, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    subprocess.run([py, "-m", "pip", "install", "-q", "torch==2.13.0"], check=True, timeout=900)
    subprocess.run([py, "-m", "pip", "install", "-q", f"{wheel}[demo]"], check=True, timeout=900)
    outside = tmp_path / "outside"
    outside.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    probe = subprocess.run([py, "-c", "import router"], cwd=outside, capture_output=True, text=True, env=env)
    assert probe.returncode != 0 and "No module named 'router'" in probe.stderr
    run = subprocess.run([venv / "bin" / "dualrs-route", "certify", "--N", "200", "--max", "10", "--quiet"],
                         cwd=outside, capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr
    assert "| router | 10 |" in run.stdout
