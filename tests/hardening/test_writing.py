"""Hardening cases 2, 4, 10 and 11: the lock on --out, write failures, temporary files, the run history.

* Case 2: two writers on one --out. The second is refused with one line naming the first's PID;
  the file stays as the first left it; after the holder is killed with SIGKILL a new run resumes.
* Case 4: disk full (a tiny tmpfs), a read-only filesystem, a sidecar path that is a folder:
  one line naming the path and what to do; rows already written stay intact and resume.
* Case 10: a symlink planted at the old fixed name ``OUT.json.tmp`` is neither followed nor removed.
* Case 11: the sidecar's ``resumed`` history keeps runs that were killed.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest

from dualrs_route.experts.errors import OutputError
from dualrs_route.router.results import ResultsWriter, RowChecker, lock_path, sidecar_path
from hostile import certify_args, invoke, one_error_line, rows_without_time, start_writer
from rs_oracle import write_linear_folder


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    proc.stdout.close()
    proc.stderr.close()


# --- case 2: one writer per file ---


def test_second_writer_is_refused_with_the_holders_pid_and_a_killed_holder_frees_the_file(cli_expert, tmp_path):
    folder, data, _, _ = cli_expert
    out = tmp_path / "r.tsv"
    args = certify_args(folder, data, out)
    holder = start_writer(args, rows=3, after="pause")
    try:
        assert holder.stdout.readline().strip() == "paused", holder.stderr.read()
        before = out.read_bytes()
        assert lock_path(out).read_text().strip() == str(holder.pid)
        second = invoke(*args)
        line = one_error_line(second, mentions=f"PID {holder.pid}")
        assert str(out) in line and second.exit_code == 1
        assert out.read_bytes() == before  # the refused run wrote nothing
        assert before.count(b"\n") == 4  # header + the holder's 3 rows
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    finally:
        stop(holder)
    assert invoke(*args).exit_code == 0  # the OS released the killed holder's lock
    reference = tmp_path / "reference.tsv"
    assert invoke(*certify_args(folder, data, reference)).exit_code == 0
    assert rows_without_time(out) == rows_without_time(reference)  # nothing lost or twice
    assert not lock_path(out).exists()  # a finished writer removes its lock file


def test_lock_file_that_is_a_symlink_is_refused(cli_expert, tmp_path):
    folder, data, _, _ = cli_expert
    out = tmp_path / "r.tsv"
    victim = tmp_path / "victim"
    victim.write_text("keep")
    lock_path(out).symlink_to(victim)
    line = one_error_line(invoke(*certify_args(folder, data, out)), mentions=str(lock_path(out)))
    assert "symbolic link" in line
    assert victim.read_text() == "keep" and not out.exists()


# --- case 4: write failures ---


def big_dataset(tmp_path, count: int):
    """A linear 3-class expert on 1x4x4 inputs and ``count`` images for it."""
    rng = np.random.default_rng(1)
    weight = rng.normal(size=(3, 16)).astype(np.float32)
    folder = write_linear_folder(tmp_path / "m", weight=weight, bias=np.zeros(3), sigma=0.25, input_shape=(1, 4, 4))
    x = rng.uniform(size=(count, 1, 4, 4)).astype(np.float32)
    data = tmp_path / "d.npz"
    np.savez(data, x=x, y=np.argmax(x.reshape(count, -1) @ weight.T, axis=1))
    return folder, data


def fast_args(folder, data, out, *extra):
    return ["certify", "--expert", folder, "--dataset", f"npz:{data}", "--N0", 10, "--N", 20, "--alpha", 0.01,
            "--seed", 1, "--quiet", "--out", out, *extra]


def assert_rows_intact(path: Path, columns) -> int:
    """Every complete row is valid; at most a torn last line follows. Returns the number of good rows."""
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    lines.pop()  # a torn row, or nothing
    checker = RowChecker(path, columns, columns)
    for number, line in enumerate(lines[1:], start=2):
        checker.check(line, number)
    return len(lines) - 1


def test_disk_full_is_one_line_and_the_rows_written_resume(tmp_path, tmpfs):
    folder, data = big_dataset(tmp_path, 400)
    disk = tmpfs("64k")
    free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
    filler = disk / "filler"
    filler.write_bytes(b"\0" * (free - 5 * 4096))  # room for the lock, the sidecar and ~150 of the 400 rows
    out = disk / "r.tsv"
    result = invoke(*fast_args(folder, data, out))
    line = one_error_line(result, mentions="disk is full")
    assert result.exit_code == 1 and str(out) in line and "rows already written are kept" in line
    header = out.read_text().splitlines()[0].split("\t")
    written = assert_rows_intact(out, header)
    assert 5 < written < 400, written  # it did fill up part-way
    assert not [p.name for p in disk.iterdir() if p.name.endswith(".tmp")]
    filler.unlink()
    assert invoke(*fast_args(folder, data, out)).exit_code == 0
    reference = tmp_path / "reference.tsv"
    assert invoke(*fast_args(folder, data, reference)).exit_code == 0
    assert rows_without_time(out) == rows_without_time(reference)


def test_read_only_filesystem_is_one_line_and_leaves_the_file_as_it_was(tmp_path, tmpfs, cli_expert):
    folder, data, _, _ = cli_expert
    disk = tmpfs("1m")
    out = disk / "r.tsv"
    assert invoke(*certify_args(folder, data, out)).exit_code == 0
    before = out.read_bytes(), sidecar_path(out).read_bytes()
    subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
    line = one_error_line(invoke(*certify_args(folder, data, out)), mentions="read-only")
    assert str(disk) in line
    assert (out.read_bytes(), sidecar_path(out).read_bytes()) == before
    fresh = disk / "new.tsv"
    one_error_line(invoke(*certify_args(folder, data, fresh)), mentions="read-only")
    assert not fresh.exists() and not sidecar_path(fresh).exists()
    model = disk / "model"
    one_error_line(invoke("train-expert", "--sigma", 0.25, "--epochs", 1, "--fraction", 0.05, "--quiet",
                          "--out", model), mentions="read-only")


def test_sidecar_path_that_is_a_folder_is_one_line_and_leaves_no_temporary_file(cli_expert, tmp_path):
    folder, data, _, _ = cli_expert
    out = tmp_path / "r.tsv"
    sidecar_path(out).mkdir()
    line = one_error_line(invoke(*certify_args(folder, data, out)), mentions="folder")
    assert str(sidecar_path(out)) in line
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["r.tsv.json", "data.npz", "lin3"])
    with pytest.raises(OutputError, match=f"cannot write {sidecar_path(out)}: .*it is a folder"):
        ResultsWriter(out, settings={}, metadata={})  # the library's own error, not only the CLI's


class FailingClose:
    """A rows handle whose close reports a deferred write error (as NFS or a full disk can at close)."""

    def __init__(self, handle):
        self.handle = handle

    def close(self):
        self.handle.close()
        raise OSError(errno.ENOSPC, "No space left on device")


def test_a_failed_close_is_one_output_error_that_never_masks_an_earlier_one(tmp_path):
    out = tmp_path / "r.tsv"
    writer = ResultsWriter(out, settings={}, metadata={})
    writer._handle = FailingClose(writer._handle)
    with pytest.raises(OutputError, match=f"^cannot write {out}: No space left on device; the disk is full"):
        writer.close(complete=True)
    assert not lock_path(out).exists()  # released all the same
    writer = ResultsWriter(out, settings={}, metadata={})  # and the file resumes
    writer._handle = FailingClose(writer._handle)
    with pytest.raises(ValueError, match="^the first error$"):
        try:
            raise ValueError("the first error")
        finally:
            writer.close(after_error=True, complete=False)
    assert not lock_path(out).exists()


# --- case 10: no fixed temporary name ---


def test_a_symlink_at_the_old_temporary_name_is_not_followed(cli_expert, tmp_path):
    folder, data, _, _ = cli_expert
    out = tmp_path / "r.tsv"
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    planted = Path(str(sidecar_path(out)) + ".tmp")
    planted.symlink_to(victim)
    assert invoke(*certify_args(folder, data, out)).exit_code == 0
    lines = out.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:-1]))  # drop the last row, so the resume writes one and rewrites the sidecar
    assert invoke(*certify_args(folder, data, out)).exit_code == 0
    assert len(json.loads(sidecar_path(out).read_text())["resumed"]) == 1
    assert victim.read_text() == "precious"
    assert planted.is_symlink() and os.readlink(planted) == str(victim)
    assert json.loads(sidecar_path(out).read_text())["complete"] is True


# --- case 11: killed runs stay in the history ---


def test_resumed_history_keeps_killed_runs(cli_expert, tmp_path):
    folder, data, _, _ = cli_expert
    out = tmp_path / "r.tsv"
    args = certify_args(folder, data, out)
    for _ in range(2):  # the first run and one resume, both killed after 3 rows (no close)
        proc = start_writer(args, rows=3, after="die")
        try:
            assert proc.wait(timeout=120) == 9, proc.stderr.read()
        finally:
            stop(proc)
    killed_resume = json.loads(sidecar_path(out).read_text())["resumed"]
    assert len(killed_resume) == 1  # recorded at its start, although it never closed
    assert invoke(*args).exit_code == 0
    meta = json.loads(sidecar_path(out).read_text())
    assert len(meta["resumed"]) == 2 and meta["resumed"][0] == killed_resume[0] and meta["complete"] is True
    reference = tmp_path / "reference.tsv"
    assert invoke(*certify_args(folder, data, reference)).exit_code == 0
    assert rows_without_time(out) == rows_without_time(reference)


def test_resuming_a_complete_file_leaves_its_sidecar_as_it_was(cli_expert, tmp_path):
    """Re-running a finished command (as a pipeline does) must not restamp "finished" or zero the session time."""
    folder, data, _, _ = cli_expert
    out = tmp_path / "r.tsv"
    assert invoke(*certify_args(folder, data, out)).exit_code == 0
    before = sidecar_path(out).read_bytes()
    assert json.loads(before)["last_session_seconds"] > 0
    assert invoke(*certify_args(folder, data, out)).exit_code == 0
    assert sidecar_path(out).read_bytes() == before


def test_replacing_writer_compose_force_never_removes_a_file_another_run_is_writing(cli_expert, tmp_path):
    """``compose --force`` replaces its --out through ResultsWriter(replace=True): the lock comes first."""
    from dualrs_route.experts.errors import LockedError

    folder, data, _, _ = cli_expert
    out = tmp_path / "r.tsv"
    holder = start_writer(certify_args(folder, data, out), rows=2, after="pause")
    try:
        assert holder.stdout.readline().strip() == "paused", holder.stderr.read()
        before = out.read_bytes(), sidecar_path(out).read_bytes()
        with pytest.raises(LockedError, match=f"PID {holder.pid}"):
            ResultsWriter(out, settings={}, metadata={}, replace=True)
        assert (out.read_bytes(), sidecar_path(out).read_bytes()) == before
    finally:
        stop(holder)
