"""``--shard K/N`` and ``dualrs-route merge``: the merged file equals the unsharded run's (but for time),
and merge refuses mismatched, incomplete, overlapping and gapped parts with one line each."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from dualrs_route.cli import main
from dualrs_route.router.shards import Shard, parse_shard


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def sidecar(path) -> Path:
    return Path(str(path) + ".json")


def without_time(path) -> list[str]:
    """The file's lines with the time column blanked: the only column a merge may change."""
    lines = Path(path).read_text().split("\n")
    t = lines[0].split("\t").index("time")
    return ["\t".join(c if k != t else "" for k, c in enumerate(line.split("\t"))) for line in lines]


def one_error(result, mentions: str) -> str:
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error:") and "Traceback" not in result.output, result.output
    assert mentions in lines[0], lines[0]
    return lines[0]


def certify(expert, data, out, *extra):
    result = invoke("certify", "--expert", expert, "--dataset", f"npz:{data}", "--N0", 10, "--N", 100,
                    "--alpha", 0.01, "--seed", 3, "--skip", 2, "--max", 21, "--quiet", "--out", out, *extra)
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture
def runs(cli_expert, tmp_path):
    """An unsharded run and its three shards (selection: idx 0, 2, ..., 20)."""
    folder, data, _, _ = cli_expert
    full = certify(folder, data, tmp_path / "full.tsv")
    parts = [certify(folder, data, tmp_path / f"part{k}.tsv", "--shard", f"{k}/3") for k in (1, 2, 3)]
    return folder, data, full, parts


# --- shards ---


def test_shards_are_round_robin_disjoint_and_cover_the_selection():
    selection = list(range(0, 21, 2))
    shards = [Shard(k, 3).select(selection) for k in (1, 2, 3)]
    assert shards[0] == [0, 6, 12, 18] and shards[1] == [2, 8, 14, 20] and shards[2] == [4, 10, 16]
    assert sorted(sum(shards, [])) == selection
    assert parse_shard(" 2 / 3 ") == Shard(2, 3) and str(Shard(2, 3)) == "2/3" and parse_shard(None) is None


@pytest.mark.parametrize("bad", ["0/3", "4/3", "3", "a/b", "1/0", "-1/2"])
def test_bad_shard_is_one_clear_line(cli_expert, tmp_path, bad):
    folder, data, _, _ = cli_expert
    result = invoke("certify", "--expert", folder, "--dataset", f"npz:{data}", "--N", 10, "--quiet",
                    "--out", tmp_path / "x.tsv", "--shard", bad)
    assert result.exit_code == 2 and "Invalid value for '--shard'" in result.output and "K/N" in result.output
    assert not (tmp_path / "x.tsv").exists()


def test_a_shard_holds_its_rows_and_records_the_shard(runs):
    _, _, full, parts = runs
    rows = [line.split("\t")[0] for line in Path(parts[1]).read_text().splitlines()[1:]]
    assert rows == ["2", "8", "14", "20"]
    meta = json.loads(sidecar(parts[1]).read_text())
    assert meta["settings"]["shard"] == "2/3" and meta["complete"] is True
    assert meta["selection"] == {"dataset_size": 24, "selected": 4, "shard": "2/3"}
    assert "shard" not in json.loads(sidecar(full).read_text())["settings"]


def test_a_shard_resumes_only_with_the_same_shard(runs):
    folder, data, _, parts = runs
    result = invoke("certify", "--expert", folder, "--dataset", f"npz:{data}", "--N0", 10, "--N", 100,
                    "--alpha", 0.01, "--seed", 3, "--skip", 2, "--max", 21, "--quiet", "--out", parts[0],
                    "--shard", "2/3")
    one_error(result, "shard: file has '1/3', now '2/3'")


# --- merge ---


def test_merge_equals_the_unsharded_file_except_time(runs, tmp_path):
    _, _, full, parts = runs
    out = tmp_path / "merged.tsv"
    result = invoke("merge", "--out", out, parts[2], parts[0], parts[1])  # any order
    assert result.exit_code == 0, result.output
    assert without_time(out) == without_time(full)
    assert Path(out).read_text() != Path(full).read_text()  # the time column did differ: the check is real
    merged, unsharded = json.loads(sidecar(out).read_text()), json.loads(sidecar(full).read_text())
    assert merged["settings"] == unsharded["settings"] and merged["complete"] is True
    assert [p["shard"] for p in merged["merged_from"]] == ["3/3", "1/3", "2/3"]


def test_the_merged_file_resumes_as_the_complete_unsharded_run(runs, tmp_path):
    folder, data, _, parts = runs
    out = tmp_path / "merged.tsv"
    assert invoke("merge", "--out", out, *parts).exit_code == 0
    before = Path(out).read_text()
    certify(folder, data, out)
    assert Path(out).read_text() == before


def test_merge_refuses_other_settings(runs, tmp_path):
    folder, data, _, parts = runs
    other = certify(folder, data, tmp_path / "other.tsv", "--shard", "3/3", "--seed", 4)
    one_error(invoke("merge", "--out", tmp_path / "m.tsv", parts[0], parts[1], other),
              f"{other} was written with other settings than {parts[0]}")
    assert not (tmp_path / "m.tsv").exists()


def test_merge_refuses_other_models(runs, tmp_path, linear_folder):
    import numpy as np

    _, data, _, parts = runs
    other_expert = linear_folder("lin3b", weight=np.ones((3, 16), np.float32), bias=np.zeros(3, np.float32),
                                 sigma=0.25, input_shape=(1, 4, 4))
    other = certify(other_expert, data, tmp_path / "other.tsv", "--shard", "3/3")
    line = one_error(invoke("merge", "--out", tmp_path / "m.tsv", parts[0], parts[1], other), str(other))
    assert "sha256" in line


def test_merge_refuses_overlapping_parts(runs, tmp_path):
    folder, data, _, parts = runs
    again = certify(folder, data, tmp_path / "again.tsv", "--shard", "2/3")
    one_error(invoke("merge", "--out", tmp_path / "m.tsv", *parts, again),
              f"{parts[1]} and {again} overlap (both hold example 2)")


def test_merge_refuses_a_gap(runs, tmp_path):
    _, _, _, parts = runs
    line = one_error(invoke("merge", "--out", tmp_path / "m.tsv", parts[0], parts[2]), "the parts leave a gap")
    assert "first: idx 2" in line and "shards 1/3, 3/3" in line


def test_merge_refuses_an_unfinished_part(runs, tmp_path):
    _, _, _, parts = runs
    side = sidecar(parts[1])
    meta = json.loads(side.read_text())
    meta["complete"] = False  # as a run killed before close()
    side.write_text(json.dumps(meta))
    one_error(invoke("merge", "--out", tmp_path / "m.tsv", *parts), f"{parts[1]} is incomplete: its run did not finish")


def test_merge_refuses_a_part_with_missing_rows(runs, tmp_path):
    _, _, _, parts = runs
    lines = Path(parts[2]).read_text().splitlines(keepends=True)
    Path(parts[2]).write_text("".join(lines[:-1]))  # finished, but a row was lost
    one_error(invoke("merge", "--out", tmp_path / "m.tsv", *parts),
              f"{parts[2]} is incomplete: it holds 2 of its 3 examples (missing idx [16])")


def test_merge_refuses_a_cut_off_row(runs, tmp_path):
    _, _, _, parts = runs
    Path(parts[0]).write_text(Path(parts[0]).read_text()[:-3])
    one_error(invoke("merge", "--out", tmp_path / "m.tsv", *parts), f"{parts[0]} is incomplete: its last row is cut off")


def test_merge_refuses_an_existing_out(runs):
    _, _, full, parts = runs
    before = Path(full).read_text()
    one_error(invoke("merge", "--out", full, *parts), "exists")
    assert Path(full).read_text() == before


def test_merge_refuses_a_bad_row_in_a_complete_part_naming_file_and_line(runs, tmp_path):
    _, _, _, parts = runs
    lines = Path(parts[1]).read_text().split("\n")
    cells = lines[2].split("\t")  # line 3 of the file (idx 8): its first column is fine
    cells[4] = str(1 - int(cells[4]))  # 'correct' now disagrees with predict and label
    lines[2] = "\t".join(cells)
    Path(parts[1]).write_text("\n".join(lines))
    line = one_error(invoke("merge", "--out", tmp_path / "m.tsv", *parts), f"{parts[1]}, line 3: correct = ")
    assert "disagrees with predict" in line
    assert not (tmp_path / "m.tsv").exists() and not sidecar(tmp_path / "m.tsv").exists()


def test_a_merge_whose_tsv_cannot_be_written_leaves_nothing_behind_and_can_be_retried(runs, tmp_path, monkeypatch):
    from dualrs_route.experts.errors import OutputError
    from dualrs_route.router import merge
    from dualrs_route.router.results import lock_path

    _, _, full, parts = runs
    out = tmp_path / "m.tsv"

    def disk_full(path, text):
        raise OutputError(f"cannot write {path}: No space left on device; the disk is full")

    monkeypatch.setattr(merge, "atomic_write_text", disk_full)
    one_error(invoke("merge", "--out", out, *parts), "the disk is full")
    assert not out.exists() and not sidecar(out).exists() and not lock_path(out).exists()
    monkeypatch.undo()
    result = invoke("merge", "--out", out, *parts)
    assert result.exit_code == 0, result.output
    assert without_time(out) == without_time(full)


def test_merge_holds_the_lock_of_its_out(runs, tmp_path):
    import os

    from dualrs_route.router.results import acquire_lock, release_lock

    _, _, _, parts = runs
    out = tmp_path / "m.tsv"
    lock = acquire_lock(out)  # as a certify run writing that file holds it
    try:
        one_error(invoke("merge", "--out", out, *parts), f"is being written by another process (PID {os.getpid()}")
        assert not out.exists() and not sidecar(out).exists()
    finally:
        release_lock(lock, out)
    assert invoke("merge", "--out", out, *parts).exit_code == 0


def test_predict_shards_merge_too(cli_expert, tmp_path):
    folder, data, _, _ = cli_expert
    common = ["predict", "--expert", folder, "--dataset", f"npz:{data}", "--N", 100, "--alpha", 0.01, "--quiet"]
    assert invoke(*common, "--out", tmp_path / "full.tsv").exit_code == 0
    for k in (1, 2):
        assert invoke(*common, "--out", tmp_path / f"p{k}.tsv", "--shard", f"{k}/2").exit_code == 0
    assert invoke("merge", "--out", tmp_path / "m.tsv", tmp_path / "p1.tsv", tmp_path / "p2.tsv").exit_code == 0
    assert without_time(tmp_path / "m.tsv") == without_time(tmp_path / "full.tsv")


# --- labels and router scores ---

LABELS = ["labels", "--expert", "builtin:digits-sigma0.25", "--expert", "builtin:digits-sigma0.5", "--max", 11,
          "--N0", 5, "--N", 20, "--chunk", 4, "--quiet"]
SCORES = ["router-scores", "--router", "builtin:digits-router", "--max", 11, "--skip", 2, "--router-N0", 5,
          "--router-N", 20, "--chunk", 2, "--quiet"]


def npz(path) -> dict:
    import numpy as np

    with np.load(path, allow_pickle=False) as archive:
        return {k: archive[k] for k in archive.files}


@pytest.mark.parametrize("command", [LABELS, SCORES], ids=["labels", "router-scores"])
def test_label_and_score_shards_merge_to_the_unsharded_file(command, tmp_path):
    import numpy as np

    assert invoke(*command, "--out", tmp_path / "full.npz").exit_code == 0
    parts = [tmp_path / f"p{k}.npz" for k in (1, 2)]
    for k, part in enumerate(parts, 1):
        result = invoke(*command, "--shard", f"{k}/2", "--out", part)
        assert result.exit_code == 0, result.output
    # labels: images 0..10, so shard 1/2 holds 0, 2, ..., 10; scores: 0, 2, ..., 10, so 0, 4, 8
    want = [0, 2, 4, 6, 8, 10] if command is LABELS else [0, 4, 8]
    assert npz(parts[0])["indices" if command is LABELS else "idx"].tolist() == want
    result = invoke("merge", "--out", tmp_path / "m.npz", parts[1], parts[0])
    assert result.exit_code == 0, result.output
    merged, full = npz(tmp_path / "m.npz"), npz(tmp_path / "full.npz")
    assert set(merged) == set(full)
    for key in set(full) - {"meta"}:
        if command is SCORES and key in ("select", "estimate"):
            # float logits: on an Intel Xeon (AVX-512, no AMX; 2026-12-02) oneDNN gives rows of other batch shapes
            # last-bit differences (1 ulp on a quarter of the select logits); their votes must agree exactly
            assert np.array_equal(merged[key].argmax(-1), full[key].argmax(-1)), key
            assert np.allclose(merged[key], full[key], rtol=0, atol=1e-6), key
        else:
            assert np.array_equal(merged[key], full[key]), key
    merged_meta, full_meta = json.loads(str(merged["meta"])), json.loads(str(full["meta"]))
    if command is LABELS:
        assert merged_meta["settings"] == full_meta["settings"] and merged_meta["complete"]
        again = invoke(*command, "--out", tmp_path / "m.npz")  # the unsharded command finds it complete
        assert again.exit_code == 0 and np.array_equal(npz(tmp_path / "m.npz")["radii"], full["radii"])
    else:
        assert merged_meta == full_meta
    one_error(invoke("merge", "--out", tmp_path / "gap.npz", parts[0]), "the parts leave a gap")
    one_error(invoke("merge", "--out", tmp_path / "twice.npz", parts[0], parts[1], parts[0]), "overlap")


def test_label_merge_refuses_other_settings_and_unfinished_parts(tmp_path):
    from dualrs_route.router.labels import load_labels, save_labels

    parts = [tmp_path / f"p{k}.npz" for k in (1, 2)]
    assert invoke(*LABELS, "--shard", "1/2", "--out", parts[0]).exit_code == 0
    assert invoke(*LABELS, "--shard", "2/2", "--N", 30, "--out", parts[1]).exit_code == 0
    one_error(invoke("merge", "--out", tmp_path / "m.npz", *parts), f"{parts[1]} was written with other settings")
    assert invoke(*LABELS, "--shard", "2/2", "--out", tmp_path / "p2b.npz").exit_code == 0
    unfinished = load_labels(tmp_path / "p2b.npz")
    unfinished.meta["complete"] = False
    save_labels(tmp_path / "p2b.npz", unfinished)
    one_error(invoke("merge", "--out", tmp_path / "m.npz", parts[0], tmp_path / "p2b.npz"), "is incomplete")
