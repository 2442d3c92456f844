"""``certify --sequential`` / ``--target-radius`` end to end: columns, samples used, the one-look
identity with fixed-N rows, batch-size independence, resume, refusals and analyze."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from dualrs_route.cli import main
from dualrs_route.experts.sequential import STOP_RULES, look_schedule
from dualrs_route.router.results import COLUMNS, SEQUENTIAL_COLUMNS, read_results
from rs_oracle import write_linear_folder


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def rows_of(path) -> list[dict]:
    lines = Path(path).read_text().splitlines()
    head = lines[0].split("\t")
    return [dict(zip(head, line.split("\t"))) for line in lines[1:]]


def args(expert, data, out, *extra, n=800):
    return ["certify", "--expert", expert, "--dataset", f"npz:{data}", "--N0", 20, "--N", n, "--alpha", 0.01,
            "--seed", 3, "--quiet", "--out", out, *extra]


def test_sequential_rows_have_the_new_columns_and_save_samples(cli_expert, tmp_path):
    folder, data, _, _ = cli_expert
    out = tmp_path / "seq.tsv"
    result = invoke(*args(folder, data, out, "--sequential", "--first-look", 50))
    assert result.exit_code == 0, result.output
    assert tuple(Path(out).read_text().splitlines()[0].split("\t")) == SEQUENTIAL_COLUMNS
    assert SEQUENTIAL_COLUMNS[:len(COLUMNS)] == COLUMNS
    rows = rows_of(out)
    looks = look_schedule(800, 50)  # default ratio 1.2: 50, 60, 72, ..., 660, 800
    assert len(looks) == 16
    for row in rows:
        assert int(row["n_expert_used"]) in looks and int(row["n_used"]) == 20 + int(row["n_expert_used"])
        assert row["stop"] in STOP_RULES and row["n_router_used"] == "-"
    assert "noisy samples per row" in result.output
    meta = json.loads(Path(str(out) + ".json").read_text())
    assert meta["settings"]["sequential"]["first_look"] == 50 and "union bound" in meta["guarantee"]
    table = read_results(out)  # analyze reads the extra columns
    assert len(table.idx) == 24
    report = invoke("analyze", out)
    assert report.exit_code == 0 and "noisy samples per row" in report.output
    assert "understated" not in report.output  # no target or max radius: rows run to their stop rules


def test_one_look_sequential_rows_equal_fixed_n_rows(cli_expert, tmp_path):
    folder, data, _, _ = cli_expert
    fixed, seq = tmp_path / "fixed.tsv", tmp_path / "seq.tsv"
    assert invoke(*args(folder, data, fixed, n=300)).exit_code == 0
    assert invoke(*args(folder, data, seq, "--sequential", "--first-look", 300, n=300)).exit_code == 0
    keep = [c for c in COLUMNS if c != "time"]
    assert [{c: r[c] for c in keep} for r in rows_of(seq)] == [{c: r[c] for c in keep} for r in rows_of(fixed)]


def test_target_radius_rows_do_not_depend_on_batch_size_and_resume(cli_expert, tmp_path):
    folder, data, _, _ = cli_expert
    a, b = tmp_path / "a.tsv", tmp_path / "b.tsv"
    assert invoke(*args(folder, data, a, "--target-radius", 0.1, "--batch", 7)).exit_code == 0
    assert invoke(*args(folder, data, b, "--target-radius", 0.1, "--batch", 400)).exit_code == 0
    lines = b.read_text().splitlines(keepends=True)
    b.write_text("".join(lines[:10]) + lines[10][:7])  # as if killed while writing row 10
    assert invoke(*args(folder, data, b, "--target-radius", 0.1, "--batch", 400)).exit_code == 0  # resumes
    strip = lambda rows: [{k: v for k, v in r.items() if k != "time"} for r in rows]  # noqa: E731
    assert strip(rows_of(a)) == strip(rows_of(b))
    rows = rows_of(a)
    assert all(r["stop"] in STOP_RULES for r in rows)
    certified = [r for r in rows if r["stop"] == "target"]
    assert certified and all(float(r["radius"]) >= 0.1 for r in certified)
    # a changed target is another run: resume refused
    result = invoke(*args(folder, data, a, "--target-radius", 0.2))
    assert result.exit_code == 1 and "other settings" in result.output


def test_grid_and_max_radius_runs_record_their_settings(cli_expert, tmp_path):
    folder, data, _, _ = cli_expert
    out = tmp_path / "grid.tsv"
    result = invoke(*args(folder, data, out, "--sequential", "--radius-grid", 0.1, "--max-radius", 0.3))
    assert result.exit_code == 0, result.output
    rows = rows_of(out)
    assert all(r["stop"] in STOP_RULES for r in rows) and any(r["stop"] in ("grid", "target") for r in rows)
    assert all(r["stop"] != "target" or float(r["radius"]) >= 0.3 for r in rows)
    seq = json.loads(Path(str(out) + ".json").read_text())["settings"]["sequential"]
    assert (seq["radius_grid"], seq["max_radius"]) == (0.1, 0.3)
    assert (seq["look_ratio"], seq["final_share"], seq["projection_level"]) == (1.2, 0.7, 0.05)
    report = invoke("analyze", out)
    assert report.exit_code == 0, report.output
    assert ("grid ran with --max-radius 0.3: its rows stop once certified at radius 0.3, so its certified "
            "accuracy above 0.3 (and its ACR) is understated") in report.output


def test_schedule_options_change_the_looks_and_are_part_of_the_run(cli_expert, tmp_path):
    folder, data, _, _ = cli_expert
    out = tmp_path / "doubling.tsv"
    extra = ("--sequential", "--radius-grid", 0.1, "--first-look", 50, "--look-ratio", 2, "--final-share", 0,
             "--projection-level", 0)
    result = invoke(*args(folder, data, out, *extra))
    assert result.exit_code == 0, result.output
    assert all(int(r["n_expert_used"]) in (50, 100, 200, 400, 800) for r in rows_of(out))
    meta = json.loads(Path(str(out) + ".json").read_text())
    seq = meta["settings"]["sequential"]
    assert (seq["look_ratio"], seq["final_share"], seq["projection_level"]) == (2.0, None, None)
    assert "alpha / (number of looks)" in meta["guarantee"]
    # resuming with another schedule is another run: refused, file untouched
    before = out.read_text()
    again = invoke(*args(folder, data, out, "--sequential", "--radius-grid", 0.1, "--first-look", 50))
    assert again.exit_code != 0 and "Traceback" not in again.output and out.read_text() == before


def test_analyze_notes_that_a_target_radius_run_understates_larger_radii(cli_expert, tmp_path):
    folder, data, _, _ = cli_expert
    out = tmp_path / "target.tsv"
    assert invoke(*args(folder, data, out, "--target-radius", 0.2, "--max-radius", 0.5, n=400)).exit_code == 0
    report = invoke("analyze", "--format", "json", out)
    assert report.exit_code == 0, report.output
    assert ("target ran with --target-radius 0.2 and --max-radius 0.5: its rows stop once certified at radius 0.2, "
            "so its certified accuracy above 0.2 (and its ACR) is understated") in json.loads(report.output)["notes"]


def linear_router(tmp_path, cli_expert):
    """A linear router over the fixture's expert and a second one (sigma 0.5); returns (router, data)."""
    _, data, weight, bias = cli_expert
    write_linear_folder(tmp_path / "lin3b", weight=weight[::-1].copy(), bias=bias, sigma=0.5, input_shape=(1, 4, 4))
    router = write_linear_folder(tmp_path / "router", weight=np.random.default_rng(5).normal(size=(2, 16)),
                                 bias=np.zeros(2), sigma=0.5, kind="router", experts=["../lin3", "../lin3b"],
                                 input_shape=(1, 4, 4))
    return router, data


def test_min_aware_router_rows(tmp_path, cli_expert):
    router, data = linear_router(tmp_path, cli_expert)
    out = tmp_path / "routed.tsv"
    result = invoke("certify", "--router", router, "--dataset", f"npz:{data}", "--N0", 20, "--N", 400,
                    "--router-N", 400, "--alpha", 0.02, "--quiet", "--out", out, "--sequential")
    assert result.exit_code == 0, result.output
    for row in rows_of(out):
        router_stop, expert_stop = row["stop"].split("/")
        assert router_stop in STOP_RULES and (expert_stop in STOP_RULES or expert_stop == "-")
        used = 20 + int(row["n_router_used"]) + (20 + int(row["n_expert_used"]) if expert_stop != "-" else 0)
        assert int(row["n_used"]) == used
        if row["predict"] != "-1":
            assert float(row["radius"]) == pytest.approx(min(float(row["radius_router"]),
                                                             float(row["radius_expert"])), abs=2e-6)


def test_one_look_min_aware_rows_equal_fixed_n_dual_rows_with_unequal_alpha_and_beta(tmp_path, cli_expert):
    """The router's share (--alpha-router 0.001) differs from the expert's (0.019) and --router-N from --N,
    so a swap of alpha and beta (or of the two budgets) in the sequential dual wiring changes the bounds."""
    router, data = linear_router(tmp_path, cli_expert)
    fixed, seq = tmp_path / "fixed.tsv", tmp_path / "seq.tsv"
    common = ["certify", "--router", router, "--dataset", f"npz:{data}", "--N0", 20, "--N", 400, "--router-N", 300,
              "--alpha", 0.02, "--alpha-router", 0.001, "--seed", 3, "--quiet"]
    assert invoke(*common, "--out", fixed).exit_code == 0
    result = invoke(*common, "--out", seq, "--sequential", "--first-look", 400)  # one look per stage: 400, 300
    assert result.exit_code == 0, result.output
    keep = [c for c in COLUMNS if c != "time"]
    seq_rows, fixed_rows = rows_of(seq), rows_of(fixed)
    assert [{c: r[c] for c in keep} for r in seq_rows] == [{c: r[c] for c in keep} for r in fixed_rows]
    assert all(r["n_router_used"] == "300" for r in seq_rows)
    routed = [r for r in seq_rows if r["p_expert_lower"] != "-"]
    assert len(routed) > 12 and all(r["n_expert_used"] == "400" for r in routed)  # the expert stage ran
    meta = json.loads(Path(str(seq) + ".json").read_text())
    assert meta["settings"]["alpha_expert"] == pytest.approx(0.019) and meta["settings"]["alpha_router"] == 0.001


@pytest.mark.parametrize("extra, mentions", [
    (("--radius-tol", 0.1), "--sequential"),
    (("--first-look", 10), "--sequential"),
    (("--sequential", "--radius-tol", -1), "radius"),
    (("--target-radius", -0.5), "radius"),
    (("--sequential", "--select", "cascade"), "cascade"),
    (("--radius-grid", 0.25), "--sequential"),
    (("--max-radius", 1.0), "--sequential"),
    (("--sequential", "--radius-grid", 0.25, "--radius-tol", 0.01), "not both"),
    (("--sequential", "--radius-grid", 0), "grid"),
    (("--target-radius", 0.1, "--radius-tol", 0.05), "do not apply with --target-radius"),
    (("--target-radius", 0.1, "--radius-grid", 0.25), "do not apply with --target-radius"),
    (("--look-ratio", 1.5), "--sequential"),
    (("--final-share", 0.5), "--sequential"),
    (("--sequential", "--projection-level", 0.05), "only with --radius-grid"),
    (("--sequential", "--look-ratio", 1.0), "look ratio"),
    (("--sequential", "--final-share", 1.0), "final share"),
    (("--sequential", "--radius-grid", 0.25, "--projection-level", 0.5), "projection level"),
])
def test_bad_sequential_options_fail_cleanly(cli_expert, tmp_path, extra, mentions):
    folder, data, _, _ = cli_expert
    out = tmp_path / "bad.tsv"
    cmd = args(folder, data, out, *extra)
    if "cascade" in extra:
        cmd += ["--expert", folder]
    result = invoke(*cmd)
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert mentions in result.output and not out.exists()
