"""Hardening case 5: a resume validates every row before it trusts it.

A torn or unparsable last row (with or without its newline, or a line of NULs as a crash can
leave) is dropped and recomputed: the file ends identical to a clean run. A bad row before the
last one is refused with one line naming the file and the line number; the file is left as it was.
"""

from __future__ import annotations

import json

import pytest

from dualrs_route.router.results import sidecar_path
from hostile import certify_args, invoke, one_error_line, rows_without_time


@pytest.fixture
def partial_run(cli_expert, tmp_path):
    """A clean full run and a run cut after 10 rows whose sidecar says it is the same run."""
    folder, data, _, _ = cli_expert
    full, cut = tmp_path / "full.tsv", tmp_path / "cut.tsv"
    assert invoke(*certify_args(folder, data, full)).exit_code == 0
    assert invoke(*certify_args(folder, data, cut, "--max", 10)).exit_code == 0
    meta = json.loads(sidecar_path(cut).read_text())
    meta["settings"]["max"] = -1
    sidecar_path(cut).write_text(json.dumps(meta))
    return folder, data, full, cut


TORN_LAST_ROWS = {
    "torn, with newline": b"10\t2\t2\t0.1\n",
    "NULs, with newline": b"\0" * 40 + b"\n",
    "NULs, no newline": b"\0" * 40,
    "unparsable radius": b"10\t2\t2\tx\t1\t0.1\t0:a\t0.25\t-\t0.1\t-\t0.9\t-\t200\n",
    "torn, no newline": b"10\t2\t2\t0.12",
}


@pytest.mark.parametrize("tail", TORN_LAST_ROWS.values(), ids=TORN_LAST_ROWS.keys())
def test_a_torn_or_unparsable_last_row_is_dropped_and_recomputed(partial_run, tail):
    folder, data, full, cut = partial_run
    with open(cut, "ab") as handle:
        handle.write(tail)
    result = invoke(*certify_args(folder, data, cut))
    assert result.exit_code == 0, result.output
    assert rows_without_time(cut) == rows_without_time(full)


def replace_line(path, number: int, text: bytes) -> bytes:
    lines = path.read_bytes().split(b"\n")
    lines[number - 1] = text
    path.write_bytes(b"\n".join(lines))
    return path.read_bytes()


BAD_MIDDLE_ROWS = {
    "torn": (b"4\t1\t1\t0.1", "fields"),
    "NULs": (b"\0" * 30, "fields"),
    "not a number": (None, "radius"),
    "duplicate idx": (None, "appears twice"),
}


@pytest.mark.parametrize("case", BAD_MIDDLE_ROWS, ids=BAD_MIDDLE_ROWS.keys())
def test_a_bad_row_in_the_middle_is_refused_naming_file_and_line(partial_run, case):
    folder, data, _, cut = partial_run
    lines = cut.read_bytes().split(b"\n")
    text, mentions = BAD_MIDDLE_ROWS[case]
    if case == "not a number":
        cells = lines[5].split(b"\t")
        cells[3] = b"0.1.2"
        text = b"\t".join(cells)
    elif case == "duplicate idx":
        text = lines[3]  # the row of line 4 (idx 2) again, at line 6
    before = replace_line(cut, 6, text)
    line = one_error_line(invoke(*certify_args(folder, data, cut)), mentions=f"{cut}, line 6")
    assert mentions in line
    assert cut.read_bytes() == before  # nothing dropped, nothing appended


def test_rows_outside_the_selection_never_make_a_run_complete(cli_expert, tmp_path):
    """A file holding as many rows as selected examples, some of them for other indices, is not
    complete: a resume that fails part-way must record complete = false (a count would say true)."""
    from dualrs_route.experts.data import load_dataset
    from dualrs_route.experts.errors import DualRSError
    from dualrs_route.router.run import LocalRows, execute, plan_run

    class StopsAfterOneRow(LocalRows):
        def rows(self, *args):
            yield next(super().rows(*args))
            raise DualRSError("stopped part-way")

    folder, data, _, _ = cli_expert
    full, out = tmp_path / "full.tsv", tmp_path / "out.tsv"
    assert invoke(*certify_args(folder, data, full)).exit_code == 0  # idx 0..23
    assert invoke(*certify_args(folder, data, out, "--max", 6)).exit_code == 0  # idx 0..5
    kept = out.read_text().splitlines(keepends=True)[:3] + full.read_text().splitlines(keepends=True)[-4:]
    out.write_text("".join(kept))  # idx 0, 1 and 20..23: six rows, but only two of the six selected
    plan = plan_run(experts=[str(folder)], n0=20, n=200, alpha=0.01, seed=3)
    with pytest.raises(DualRSError, match="stopped part-way"):
        execute(plan, load_dataset(f"npz:{data}"), skip=1, max_index=6, out_path=out, data=None, command="certify",
                rows=StopsAfterOneRow)
    assert [line.split("\t")[0] for line in out.read_text().splitlines()[1:]] == ["0", "1", "20", "21", "22", "23",
                                                                                 "2"]
    assert json.loads(sidecar_path(out).read_text())["complete"] is False
    assert invoke(*certify_args(folder, data, out, "--max", 6)).exit_code == 0  # the resume certifies 3, 4, 5
    assert json.loads(sidecar_path(out).read_text())["complete"] is True
