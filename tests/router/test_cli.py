"""``dualrs-route`` end to end: output format, resume after SIGKILL, bad input, analyze, predict, import-cohen."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from dualrs_route.cli import main
from dualrs_route.router.results import COLUMNS
from cli_checks import one_error_line
from rs_oracle import write_linear_folder

REPO = Path(__file__).resolve().parents[2]


def invoke(*args, env=None):
    return CliRunner().invoke(main, [str(a) for a in args], env=env)


def sidecar(path) -> Path:
    return Path(str(path) + ".json")


def rows_of(path) -> list[list[str]]:
    return [line.split("\t") for line in Path(path).read_text().splitlines()]


def without_time(rows):
    t = rows[0].index("time")
    return [r[:t] + r[t + 1:] for r in rows]


def assert_clean_failure(result, out: Path | None = None, mentions: str | None = None):
    """Non-zero exit, exactly one error line (click's usage lines aside), no traceback, no output files."""
    line = one_error_line(result, mentions, exit_codes=range(1, 256))
    if out is not None:
        assert not Path(out).exists() and not sidecar(out).exists()
    return line


def certify_args(expert, data, out, *extra):
    return ["certify", "--expert", expert, "--dataset", f"npz:{data}", "--N0", 20, "--N", 200, "--alpha", 0.01,
            "--seed", 3, "--quiet", "--out", out, *extra]


# --- output format ---


def test_certify_writes_cohen_columns_then_routing_columns_and_sidecar(cli_expert, tmp_path):
    folder, data, _, _ = cli_expert
    out = tmp_path / "res.tsv"
    result = invoke(*certify_args(folder, data, out))
    assert result.exit_code == 0, result.output
    rows = rows_of(out)
    assert rows[0][:6] == ["idx", "label", "predict", "radius", "correct", "time"]
    assert tuple(rows[0]) == COLUMNS + ("guess", "counts")
    assert [int(r[0]) for r in rows[1:]] == list(range(24))
    for r in rows[1:]:
        predict, radius, correct = int(r[2]), float(r[3]), int(r[4])
        assert correct == int(predict == int(r[1])) and correct in (0, 1)
        assert radius >= 0 and (predict != -1 or radius == 0)
        float(r[5])  # time in seconds
    meta = json.loads(sidecar(out).read_text())
    (model,) = meta["models"]
    from dualrs_route.experts.folders import sha256_file

    assert model["sha256"] == {"model.safetensors": sha256_file(folder / "model.safetensors")}
    assert model["revision"] == "local"
    assert meta["settings"]["N"] == 200 and meta["settings"]["seed"] == 3 and meta["complete"] is True
    assert "r=0.25" in result.output  # the summary table


def test_certify_is_a_pure_function_of_seed(cli_expert, tmp_path):
    folder, data, _, _ = cli_expert
    a, b, c = tmp_path / "a.tsv", tmp_path / "b.tsv", tmp_path / "c.tsv"
    assert invoke(*certify_args(folder, data, a)).exit_code == 0
    assert invoke(*certify_args(folder, data, b, "--batch", 7)).exit_code == 0
    assert invoke(*certify_args(folder, data, c, "--skip", 3)).exit_code == 0
    assert without_time(rows_of(a)) == without_time(rows_of(b))
    # sharding by --skip gives the same rows for the examples it keeps
    kept = {r[0]: r for r in without_time(rows_of(a))[1:]}
    assert all(kept[r[0]] == r for r in without_time(rows_of(c))[1:])
    assert [int(r[0]) for r in rows_of(c)[1:]] == list(range(0, 24, 3))


# --- resume ---


def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path):
    rng = np.random.default_rng(0)
    weight = rng.normal(size=(3, 16)).astype(np.float32)
    folder = write_linear_folder(tmp_path / "m", weight=weight, bias=np.zeros(3), sigma=0.5, input_shape=(1, 4, 4))
    count = 60
    x = rng.uniform(size=(count, 1, 4, 4)).astype(np.float32)
    data = tmp_path / "d.npz"
    np.savez(data, x=x, y=np.argmax(x.reshape(count, -1) @ weight.T, axis=1))
    killed = tmp_path / "killed.tsv"
    args = ["certify", "--expert", str(folder), "--dataset", f"npz:{data}", "--N0", "100", "--N", "10000",
            "--alpha", "0.001", "--seed", "2", "--quiet", "--batch", "400"]
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "dualrs_route", *args, "--out", str(killed)], cwd=tmp_path,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if killed.exists() and killed.read_bytes().count(b"\n") >= 6:  # header + >= 5 rows
                break
            if proc.poll() is not None:
                break
            time.sleep(0.005)
        assert proc.poll() is None, "the run ended before it could be killed; give it more work"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    partial = rows_of(killed)
    assert 6 <= len(partial) < count + 1, f"killed with {len(partial) - 1} rows"
    # resume (in-process) and an uninterrupted reference run
    result = invoke(*args, "--out", killed)
    assert result.exit_code == 0, result.output
    reference = tmp_path / "reference.tsv"
    assert invoke(*args, "--out", reference).exit_code == 0
    resumed_rows, ref_rows = rows_of(killed), rows_of(reference)
    assert [int(r[0]) for r in resumed_rows[1:]] == list(range(count))  # no lost or duplicate rows
    assert without_time(resumed_rows) == without_time(ref_rows)
    meta = json.loads(sidecar(killed).read_text())
    assert meta["complete"] is True and len(meta["resumed"]) == 1


def test_resume_drops_a_partial_last_line(cli_expert, tmp_path):
    folder, data, _, _ = cli_expert
    full, cut = tmp_path / "full.tsv", tmp_path / "cut.tsv"
    assert invoke(*certify_args(folder, data, full)).exit_code == 0
    assert invoke(*certify_args(folder, data, cut, "--max", 10)).exit_code == 0
    # simulate a kill in the middle of writing row 10, with settings identical to the full run
    meta = json.loads(sidecar(cut).read_text())
    meta["settings"]["max"] = -1
    sidecar(cut).write_text(json.dumps(meta))
    with open(cut, "a") as handle:
        handle.write("10\t3\t1\t0.12")
    assert invoke(*certify_args(folder, data, cut)).exit_code == 0
    assert without_time(rows_of(cut)) == without_time(rows_of(full))


@pytest.mark.parametrize("change", [("--seed", 4), ("--N", 300), ("--alpha", 0.02), ("--N0", 21)])
def test_resume_refuses_mismatched_settings(cli_expert, tmp_path, change):
    folder, data, _, _ = cli_expert
    out = tmp_path / "r.tsv"
    assert invoke(*certify_args(folder, data, out, "--max", 5)).exit_code == 0
    before = out.read_bytes(), sidecar(out).read_bytes()
    args = certify_args(folder, data, out, "--max", 5)
    i = args.index(change[0])
    args[i + 1] = change[1]
    result = invoke(*args)
    assert result.exit_code == 1
    assert "other settings" in result.output and "Traceback" not in result.output
    assert (out.read_bytes(), sidecar(out).read_bytes()) == before


def test_resume_refuses_changed_model(cli_expert, tmp_path):
    folder, data, weight, bias = cli_expert
    out = tmp_path / "r.tsv"
    assert invoke(*certify_args(folder, data, out, "--max", 5)).exit_code == 0
    write_linear_folder(tmp_path / "other", weight=weight * 2, bias=bias, sigma=0.25, input_shape=(1, 4, 4))
    result = invoke(*certify_args(tmp_path / "other", data, out, "--max", 5))
    assert result.exit_code == 1 and "sha256" in result.output


def test_resume_still_works_after_an_onnx_export_of_the_folder(cli_expert, tmp_path):
    """Only the network file that runs is hashed: exporting model.onnx beside model.safetensors
    does not change a torch run's identity."""
    pytest.importorskip("onnx")
    folder, data, _, _ = cli_expert
    out, full = tmp_path / "r.tsv", tmp_path / "full.tsv"
    assert invoke(*certify_args(folder, data, out, "--max", 5)).exit_code == 0
    assert invoke("export", folder, "--to", "onnx").exit_code == 0
    assert (Path(folder) / "model.onnx").is_file()
    lines = out.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:3]))  # header + 2 rows: the resume must certify the other 3
    result = invoke(*certify_args(folder, data, out, "--max", 5))
    assert result.exit_code == 0, result.output
    assert invoke(*certify_args(folder, data, full, "--max", 5)).exit_code == 0
    assert without_time(rows_of(out)) == without_time(rows_of(full))


@pytest.mark.parametrize("edit", [("sigma", 0.5), ("mean", [0.1]), ("std", [2.0]), ("logit_offsets", [0.0, 1.0, 0.0])])
def test_resume_refuses_an_edited_config(cli_expert, tmp_path, edit):
    folder, data, _, _ = cli_expert
    out = tmp_path / "r.tsv"
    assert invoke(*certify_args(folder, data, out, "--max", 5)).exit_code == 0
    before = out.read_bytes()
    config = Path(folder) / "config.json"
    cfg = json.loads(config.read_text())
    cfg[edit[0]] = edit[1]
    config.write_text(json.dumps(cfg))
    result = invoke(*certify_args(folder, data, out, "--max", 8))
    assert result.exit_code == 1 and "other settings" in result.output, result.output
    assert out.read_bytes() == before


def test_resume_accepts_an_edited_name_in_the_config(cli_expert, tmp_path):
    folder, data, _, _ = cli_expert
    out = tmp_path / "r.tsv"
    assert invoke(*certify_args(folder, data, out, "--max", 5)).exit_code == 0
    config = Path(folder) / "config.json"
    cfg = json.loads(config.read_text())
    cfg["name"] = "renamed"
    config.write_text(json.dumps(cfg))
    assert invoke(*certify_args(folder, data, out, "--max", 5)).exit_code == 0


# --- bad input: clear one-line error, non-zero exit, no traceback, no output file ---


@pytest.mark.parametrize("extra,mentions", [
    (["--sigma", "0"], "--sigma"), (["--sigma", "-0.5"], "--sigma"),
    (["--N0", "0"], "--N0"), (["--N", "0"], "--N"),
    (["--alpha", "0"], "--alpha"), (["--alpha", "1"], "--alpha"), (["--alpha", "1.5"], "--alpha"),
    (["--alpha", "-0.1"], "--alpha"), (["--alpha", "nan"], "--alpha"),
])
def test_bad_option_values(cli_expert, tmp_path, extra, mentions):
    folder, data, _, _ = cli_expert
    out = tmp_path / "o.tsv"
    args = certify_args(folder, data, out)
    for flag, value in zip(extra[::2], extra[1::2]):
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
    assert_clean_failure(invoke(*args), out, mentions)


def _broken_folders(tmp_path, weight, bias):
    """name -> (folder, text the error should mention)."""
    shape = (1, 4, 4)
    out = {}
    bad_sigma = write_linear_folder(tmp_path / "bad_sigma", weight=weight, bias=bias, sigma=0.25, input_shape=shape)
    cfg = json.loads((bad_sigma / "config.json").read_text())
    for value, name in ((0, "sigma_zero"), (-0.25, "sigma_negative")):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "model.safetensors").write_bytes((bad_sigma / "model.safetensors").read_bytes())
        (folder / "config.json").write_text(json.dumps(dict(cfg, sigma=value)))
        out[name] = (folder, "sigma")
    out["missing"] = (tmp_path / "does-not-exist", "no such folder")
    corrupt = write_linear_folder(tmp_path / "corrupt", weight=weight, bias=bias, sigma=0.25, input_shape=shape)
    (corrupt / "model.safetensors").write_bytes(b"\x00garbage, not safetensors" * 10)
    out["corrupt"] = (corrupt, "corrupt")
    truncated = write_linear_folder(tmp_path / "truncated", weight=weight, bias=bias, sigma=0.25, input_shape=shape)
    blob = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(blob[: len(blob) // 2])
    out["truncated"] = (truncated, "corrupt")
    nomodel = tmp_path / "nomodel"
    nomodel.mkdir()
    (nomodel / "config.json").write_text(json.dumps(cfg))
    out["no_weights"] = (nomodel, "neither")
    mismatch = write_linear_folder(tmp_path / "mismatch", weight=weight, bias=bias, sigma=0.25, input_shape=shape)
    (mismatch / "config.json").write_text(json.dumps(dict(cfg, num_classes=4)))
    out["config_vs_weights"] = (mismatch, "does not match the weights")
    arch = write_linear_folder(tmp_path / "arch", weight=weight, bias=bias, sigma=0.25, input_shape=shape)
    (arch / "config.json").write_text(json.dumps(dict(cfg, architecture="small_cnn")))
    out["wrong_architecture"] = (arch, "does not match the weights")
    badjson = write_linear_folder(tmp_path / "badjson", weight=weight, bias=bias, sigma=0.25, input_shape=shape)
    (badjson / "config.json").write_text("{not json")
    out["config_not_json"] = (badjson, "not valid JSON")
    return out


@pytest.mark.parametrize("case", ["sigma_zero", "sigma_negative", "missing", "corrupt", "truncated", "no_weights",
                                  "config_vs_weights", "wrong_architecture", "config_not_json"])
def test_bad_models(cli_expert, tmp_path, case):
    _, data, weight, bias = cli_expert
    folder, mentions = _broken_folders(tmp_path, weight, bias)[case]
    out = tmp_path / "o.tsv"
    assert_clean_failure(invoke(*certify_args(folder, data, out)), out, mentions)


def test_image_shape_differs_from_input_shape(cli_expert, tmp_path, npz_dataset):
    folder, _, _, _ = cli_expert
    data = npz_dataset(np.random.default_rng(0).uniform(size=(4, 1, 5, 5)).astype(np.float32), np.zeros(4, int))
    out = tmp_path / "o.tsv"
    assert_clean_failure(invoke(*certify_args(folder, data, out)), out, "input_shape")
    rgb = npz_dataset(np.zeros((4, 4, 4, 3), np.uint8), np.zeros(4, int), name="rgb.npz")  # uint8 NHWC, 3 channels
    assert_clean_failure(invoke(*certify_args(folder, rgb, out)), out, "input_shape")


@pytest.mark.parametrize("value", [np.nan, np.inf, 1.5, -0.1])
def test_bad_pixels(cli_expert, tmp_path, npz_dataset, value):
    folder, data, _, _ = cli_expert
    with np.load(data) as archive:
        x, y = archive["x"].copy(), archive["y"]
    x[5, 0, 2, 1] = value
    out = tmp_path / "o.tsv"
    mentions = "NaN" if not np.isfinite(value) else "[0, 1]"
    assert_clean_failure(invoke(*certify_args(folder, npz_dataset(x, y, "bad.npz"), out)), out, mentions)


def test_bad_labels_and_missing_dataset(cli_expert, tmp_path, npz_dataset):
    folder, data, _, _ = cli_expert
    with np.load(data) as archive:
        x, y = archive["x"], archive["y"].copy()
    y[3] = 7
    out = tmp_path / "o.tsv"
    assert_clean_failure(invoke(*certify_args(folder, npz_dataset(x, y, "lab.npz"), out)), out, "label")
    assert_clean_failure(invoke(*certify_args(folder, tmp_path / "nope.npz", out)), out, "no such file")


def test_hub_reference_offline_fails_cleanly(cli_expert, tmp_path, monkeypatch):
    import huggingface_hub.constants

    _, data, _, _ = cli_expert
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "o.tsv"
    start = time.monotonic()
    error = assert_clean_failure(invoke(*certify_args("hf://nobody/no-such-expert", data, out)), out, "HF_HUB_OFFLINE")
    assert "hf://nobody/no-such-expert" in error
    assert time.monotonic() - start < 20  # no network retries


def test_inconsistent_router_refused_before_output(tmp_path, cli_expert):
    folder, data, weight, bias = cli_expert
    write_linear_folder(tmp_path / "e2", weight=weight[:2], bias=bias[:2], sigma=0.5, input_shape=(1, 4, 4))
    router = write_linear_folder(tmp_path / "router", weight=np.zeros((2, 16)), bias=np.zeros(2), sigma=0.5,
                                 kind="router", experts=["../lin3", "../e2"], input_shape=(1, 4, 4))
    out = tmp_path / "o.tsv"
    assert_clean_failure(invoke("certify", "--router", router, "--dataset", f"npz:{data}", "--N", 50, "--quiet",
                                "--out", out), out, "num_classes")


def test_router_with_wrong_number_of_outputs_refused_before_output(tmp_path, cli_expert):
    folder, data, weight, bias = cli_expert
    write_linear_folder(tmp_path / "e2", weight=weight, bias=bias, sigma=0.5, input_shape=(1, 4, 4))
    router = write_linear_folder(tmp_path / "router", weight=np.zeros((3, 16)), bias=np.zeros(3), sigma=0.5,
                                 kind="router", experts=["../lin3", "../e2"], input_shape=(1, 4, 4))
    out = tmp_path / "o.tsv"
    common = ["--dataset", f"npz:{data}", "--N", 50, "--quiet", "--out", out]
    assert_clean_failure(invoke("certify", "--router", router, *common), out, "num_classes=3")
    cfg = json.loads((router / "config.json").read_text())
    (router / "config.json").write_text(json.dumps(dict(cfg, num_classes=2)))  # config fits, weights do not
    assert_clean_failure(invoke("certify", "--router", router, *common), out, "does not match the weights")


def test_several_experts_need_an_explicit_select(cli_expert, tmp_path):
    folder, data, _, _ = cli_expert
    out = tmp_path / "o.tsv"
    assert_clean_failure(invoke(*certify_args(folder, data, out, "--expert", folder)), out, "best-radius")


# --- routing through the CLI ---


def _router_setup(tmp_path, cli_expert, k=2):
    folder, data, weight, bias = cli_expert
    rng = np.random.default_rng(5)
    names = ["../lin3"]
    if k == 2:
        write_linear_folder(tmp_path / "lin3b", weight=weight[::-1].copy(), bias=bias, sigma=0.5, input_shape=(1, 4, 4))
        names.append("../lin3b")
    router = write_linear_folder(tmp_path / f"router{k}", weight=rng.normal(size=(k, 16)), bias=np.zeros(k), sigma=0.5,
                                 kind="router", experts=names, input_shape=(1, 4, 4))
    return router, data


def test_router_certify_fills_routing_columns_and_metadata(tmp_path, cli_expert):
    router, data = _router_setup(tmp_path, cli_expert)
    out = tmp_path / "routed.tsv"
    result = invoke("certify", "--router", router, "--dataset", f"npz:{data}", "--N0", 20, "--N", 300,
                    "--router-N", 200, "--alpha", 0.01, "--quiet", "--out", out)
    assert result.exit_code == 0, result.output
    rows = rows_of(out)
    assert tuple(rows[0]) == COLUMNS
    for r in rows[1:]:
        row = dict(zip(rows[0], r))
        if row["expert"] != "-1:-":
            assert row["expert"].split(":")[1] in ("lin3", "lin3b") and row["radius_router"] != "-"
            if row["predict"] != "-1":
                assert float(row["radius"]) == pytest.approx(min(float(row["radius_router"]),
                                                                 float(row["radius_expert"])), abs=2e-6)
    meta = json.loads(sidecar(out).read_text())
    s = meta["settings"]
    assert (s["alpha_expert"], s["alpha_router"], s["router_N"], s["N"], s["router_N0"]) == (0.005, 0.005, 200, 300, 20)
    assert len(meta["models"]) == 3 and all(len(m["sha256"]["model.safetensors"]) == 64 for m in meta["models"])


def test_cli_router_with_one_expert_matches_single_expert_run(tmp_path, cli_expert):
    router, data = _router_setup(tmp_path, cli_expert, k=1)
    folder = cli_expert[0]
    single, routed = tmp_path / "single.tsv", tmp_path / "routed.tsv"
    common = ["--dataset", f"npz:{data}", "--N0", 30, "--N", 400, "--seed", 9, "--quiet"]
    assert invoke("certify", "--expert", folder, *common, "--alpha", 0.001, "--out", single).exit_code == 0
    assert invoke("certify", "--router", router, *common, "--alpha", 0.002, "--out", routed).exit_code == 0
    s_rows, r_rows = rows_of(single), rows_of(routed)
    cols = ["idx", "label", "radius_expert", "p_expert_lower", "n_expert"]
    pick = lambda rows: [[dict(zip(rows[0], r))[c] for c in cols] for r in rows[1:]]
    assert pick(s_rows) == pick(r_rows)


def test_best_radius_is_marked_not_a_certificate(tmp_path, cli_expert):
    folder, data, weight, bias = cli_expert
    other = write_linear_folder(tmp_path / "wide", weight=weight, bias=bias, sigma=0.5, input_shape=(1, 4, 4))
    out = tmp_path / "oracle.tsv"
    result = invoke("certify", "--expert", folder, "--expert", other, "--select", "best-radius",
                    "--dataset", f"npz:{data}", "--N0", 20, "--N", 200, "--quiet", "--out", out)
    assert result.exit_code == 0, result.output
    meta = json.loads(sidecar(out).read_text())
    assert meta["certificate"] is False and "NOT a certificate" in meta["guarantee"]


def test_predict_runs(cli_expert, tmp_path):
    folder, data, _, _ = cli_expert
    out = tmp_path / "p.tsv"
    result = invoke("predict", "--expert", folder, "--dataset", f"npz:{data}", "--N", 300, "--alpha", 0.01,
                    "--quiet", "--format", "json", "--out", out)
    assert result.exit_code == 0, result.output
    rows = rows_of(out)
    assert rows[0] == ["idx", "label", "predict", "correct", "time", "expert"] and len(rows) == 25
    summary = json.loads(result.output[result.output.index("{"): result.output.rindex("}") + 1])
    assert summary["count"] == 24 and 0.5 <= summary["accuracy"] <= 1.0


# --- analyze on files in Cohen's format ---


COHEN_A = [(0, 3, 3, 0.5, 1), (1, 2, 2, 0.1, 1), (2, 5, -1, 0.0, 0), (3, 1, 7, 0.9, 0)]
COHEN_B = [(0, 3, 3, 0.2, 1), (1, 2, 2, 0.8, 1), (2, 5, 5, 0.3, 1), (3, 1, -1, 0.0, 0)]


def write_cohen(path, rows):
    lines = ["idx\tlabel\tpredict\tradius\tcorrect\ttime"]
    lines += [f"{i}\t{label}\t{p}\t{r:.3f}\t{c}\t0:00:01.{234 + i}" for i, label, p, r, c in rows]
    Path(path).write_text("\n".join(lines) + "\n")
    return path


def test_analyze_cohen_files_exact_numbers(tmp_path):
    a = write_cohen(tmp_path / "expert_a.tsv", COHEN_A)
    b = write_cohen(tmp_path / "expert_b.tsv", COHEN_B)
    result = invoke("analyze", a, b, "--radii", "0,0.25,0.5,0.75", "--format", "json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    rows = {r["name"]: r for r in report["rows"]}
    acc = lambda name: [rows[name]["certified_accuracy"][k] for k in ("0.0", "0.25", "0.5", "0.75")]
    assert acc("expert_a") == [0.5, 0.25, 0.25, 0.0]
    assert rows["expert_a"]["acr"] == pytest.approx(0.15) and rows["expert_a"]["abstain_rate"] == 0.25
    assert acc("expert_b") == [0.75, 0.5, 0.25, 0.25]
    assert rows["expert_b"]["acr"] == pytest.approx(0.325)
    oracle = next(r for r in report["rows"] if r["mode"] == "oracle")
    assert [oracle["certified_accuracy"][k] for k in ("0.0", "0.25", "0.5", "0.75")] == [0.75, 0.75, 0.5, 0.25]
    assert oracle["acr"] == pytest.approx(0.4)
    envelope = next(r for r in report["rows"] if r["mode"] == "envelope")
    assert [envelope["certified_accuracy"][k] for k in ("0.0", "0.25", "0.5", "0.75")] == [0.75, 0.5, 0.25, 0.25]
    md = invoke("analyze", a, b, "--radii", "0,0.25,0.5,0.75")
    assert md.exit_code == 0 and "| expert_a | 4 | 50.0 | 25.0 | 25.0 | 0.0 | 0.150 | 25.0% |" in md.output
    assert "oracle" in md.output


def test_analyze_rejects_running_total_correct_and_non_results(tmp_path):
    bad = write_cohen(tmp_path / "bad.tsv", [(0, 1, 1, 0.3, 1), (1, 1, 1, 0.3, 2)])
    assert_clean_failure(invoke("analyze", bad), None, "correct")
    other = tmp_path / "other.tsv"
    other.write_text("a\tb\n1\t2\n")
    assert_clean_failure(invoke("analyze", other), None, "not a results TSV")


# --- import-cohen ---




def test_import_cohen_checkpoint_gives_same_logits(tmp_path):
    import torch
    from torch import nn

    from dualrs_route.experts.architectures import CifarResNet
    from dualrs_route.experts.folders import load_folder

    class Normalize(nn.Module):  # like Cohen's: plain tensor attributes, no state-dict entries
        def __init__(self, means, sds):
            super().__init__()
            self.means, self.sds = torch.tensor(means).view(1, 3, 1, 1), torch.tensor(sds).view(1, 3, 1, 1)

        def forward(self, x):
            return (x - self.means) / self.sds

    torch.manual_seed(0)
    net = CifarResNet(20, 10, 3, "basic")
    with torch.no_grad():  # non-trivial BN statistics so a wrong key or normalisation shows in the logits
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.1, 0.1)
    # Cohen et al.'s CIFAR-10 normalisation constants (locuslab/smoothing code/datasets.py)
    source = nn.Sequential(Normalize([0.4914, 0.4822, 0.4465], [0.2023, 0.1994, 0.2010]), net).eval()
    state = source.state_dict()
    expected_keys = {"1.conv1.weight", "1.bn1.running_var", "1.layer1.2.conv2.weight", "1.layer2.0.downsample.0.weight",
                     "1.layer3.0.downsample.1.num_batches_tracked", "1.fc.weight", "1.fc.bias"}
    assert expected_keys <= set(state) and all(k.startswith("1.") for k in state)
    assert tuple(state["1.fc.weight"].shape) == (10, 64)
    optimizer = torch.optim.SGD(source.parameters(), lr=0.1, momentum=0.9)
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        want = source(x)
    for prefix in ("", "module."):
        ckpt = tmp_path / f"checkpoint{prefix or '_'}.pth.tar"
        torch.save({"epoch": 90, "arch": "cifar_resnet20", "state_dict": {prefix + k: v for k, v in state.items()},
                    "optimizer": optimizer.state_dict()}, ckpt)
        out = tmp_path / f"imported{prefix or '_'}"
        result = invoke("experts", "import-cohen", ckpt, out, "--sigma", 0.25)
        assert result.exit_code == 0, result.output
        folder = load_folder(str(out))
        assert folder.config.sigma == 0.25 and folder.config.architecture == "cifar_resnet20"
        with torch.no_grad():
            got = folder.load_torch_model()(x)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_import_cohen_refuses_foreign_layouts(tmp_path):
    import torch

    ckpt = tmp_path / "bad.pth.tar"
    torch.save({"arch": "cifar_resnet20", "state_dict": {"conv1.weight": torch.zeros(16, 3, 3, 3)}}, ckpt)
    out = tmp_path / "o"
    assert_clean_failure(invoke("experts", "import-cohen", ckpt, out, "--sigma", 0.25), None, "layout")
    assert not (out / "config.json").exists()
    ckpt2 = tmp_path / "arch.pth.tar"
    torch.save({"arch": "resnet50", "state_dict": {"1.conv1.weight": torch.zeros(1)}}, ckpt2)
    assert_clean_failure(invoke("experts", "import-cohen", ckpt2, out, "--sigma", 0.25), None, "architecture")
    assert_clean_failure(invoke("experts", "import-cohen", ckpt, out, "--sigma", 0), None, "--sigma")


def test_compile_is_recorded_and_a_resume_without_it_is_refused(cli_expert, tmp_path, monkeypatch):
    """--compile reaches the torch engine, is in the metadata, and counts for resume (like --precision).

    torch.compile itself is replaced by the eager network here (a real compile takes tens of
    seconds; the slow test in tests/experts/test_noise_engine.py runs one)."""
    from dualrs_route.experts import engine

    built = []

    def fake_compile(model, dtype, channels_last):
        built.append(dtype)
        return lambda batch: model(batch.to(dtype))

    monkeypatch.setattr(engine, "_compile_model", fake_compile)
    folder, data, _, _ = cli_expert
    out, plain = tmp_path / "c.tsv", tmp_path / "p.tsv"
    assert invoke(*certify_args(folder, data, out, "--max", 5, "--engine", "torch", "--compile")).exit_code == 0
    assert built and invoke(*certify_args(folder, data, plain, "--max", 5, "--engine", "torch")).exit_code == 0
    meta = json.loads(sidecar(out).read_text())
    assert meta["settings"]["engines"] == [{"engine": "torch", "precision": "fp32", "noise": "torch-cpu",
                                            "compiled": True}]
    assert meta["engines"][0]["compiled"] is True
    assert "compiled" not in json.loads(sidecar(plain).read_text())["settings"]["engines"][0]
    assert without_time(rows_of(out)) == without_time(rows_of(plain))  # same network, same noise
    before = out.read_bytes()
    result = invoke(*certify_args(folder, data, out, "--max", 5, "--engine", "torch"))
    assert result.exit_code == 1 and "other settings" in result.output and out.read_bytes() == before
    result = invoke(*certify_args(folder, data, tmp_path / "o.tsv", "--engine", "onnxruntime", "--compile"))
    assert result.exit_code != 0 and "needs the torch engine" in result.output


def test_demo_prints_each_expert_the_cascade_and_the_router_side_by_side(tmp_path):
    pytest.importorskip("sklearn")
    result = invoke("demo", "--N0", 10, "--N", 50, "--max", 12, "--quiet", "--out-dir", tmp_path / "demo")
    assert result.exit_code == 0, result.output
    for row in ("| expert-0.25 |", "| expert-0.5 |", "| expert-1 |", "| cascade |", "| router |", "envelope",
                "oracle"):
        assert row in result.output, (row, result.output)
    assert sorted(p.name for p in (tmp_path / "demo").glob("*.tsv")) == [
        "cascade.tsv", "expert-0.25.tsv", "expert-0.5.tsv", "expert-1.tsv", "router.tsv"]
