"""The public Python API, used only through the names ``dualrs_route`` exports."""

from __future__ import annotations

import numpy as np
import pytest

import dualrs_route as d
from rs_oracle import write_linear_folder

pytest.importorskip("sklearn")


def test_public_names_are_documented():
    for name in d.__all__:
        assert getattr(d, name).__doc__, name
    assert "alpha" in d.certify.__doc__ and "total" in d.certify.__doc__


def test_certify_and_predict_a_single_expert_match_the_cli_row(tmp_path):
    rng = np.random.default_rng(1)
    weight = rng.normal(size=(3, 16)).astype(np.float32)
    folder = write_linear_folder(tmp_path / "lin", weight=weight, bias=np.zeros(3, np.float32), sigma=0.25,
                                 input_shape=(1, 4, 4))
    x = rng.uniform(size=(5, 1, 4, 4)).astype(np.float32)
    y = np.argmax(x.reshape(5, -1) @ weight.T, axis=1)
    np.savez(tmp_path / "data.npz", x=x, y=y)
    model = d.load(str(folder))
    assert model.kind == "expert" and model.num_classes == 3
    certs = [d.certify(model, x[i], n0=20, n=300, alpha=0.01, seed=4, index=i) for i in range(5)]
    assert all(isinstance(c, d.Certification) and c.confidence == pytest.approx(0.99) for c in certs)
    table, summary = d.run_dataset(out=tmp_path / "r.tsv", experts=[str(folder)], dataset=f"npz:{tmp_path / 'data.npz'}",
                                   n0=20, n=300, alpha=0.01, seed=4)
    lines = (tmp_path / "r.tsv").read_text().splitlines()[1:]
    for c, line in zip(certs, lines):
        cols = line.split("\t")
        assert int(cols[2]) == c.prediction and float(cols[3]) == pytest.approx(c.radius, abs=1e-6)
    assert summary["count"] == 5
    p = d.predict(model, x[0], n=300, alpha=0.01, seed=4)
    assert p.prediction in (d.ABSTAIN, 0, 1, 2)


def test_router_certificate_is_the_min_of_both_stages_and_abstain_is_a_value():
    from dualrs_route.experts.data import load_dataset

    model = d.load("builtin:digits-router")
    assert model.kind == "router" and len(model.experts) >= 2
    x = load_dataset("digits", split="test").image(0)
    c = d.certify(model, x, n0=20, n=200, alpha=0.001, seed=0, index=0)
    if not c.abstained:
        assert c.radius == pytest.approx(min(c.radius_router, c.radius_expert))
    noise = np.full(model.input_shape, 0.5, np.float32)
    a = d.certify(model, noise, n0=5, n=5, alpha=1e-6)
    assert a.abstained and a.prediction == d.ABSTAIN and a.radius == 0.0


def test_bad_input_shape_is_a_plain_value_error():
    model = d.load("builtin:digits-router")
    with pytest.raises(ValueError, match="shape"):
        d.certify(model, np.zeros((3, 8, 8), np.float32))


def test_the_readme_python_example_runs_as_written(tmp_path, monkeypatch):
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("## Python API", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    assert (tmp_path / "runs" / "api-demo.tsv").is_file()
