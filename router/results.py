"""Result files: a TSV with one flushed row per example, a JSON sidecar, resume, and analysis.

The TSV's first columns are exactly Cohen et al.'s ``idx label predict radius correct
time`` (time in seconds), so existing analysis scripts keep working; routing columns
follow. ``FILE.tsv.json`` holds the run's metadata: settings, models (revision and
sha256 of every weight file), package versions.

Resume: re-running with the same ``--out`` validates every row, keeps the good ones, drops
a torn or unparsable last row (a run killed mid-write), and continues with the next
example; a bad row before the last is refused, naming its line. Settings that change
results (models, data, budgets, alpha, seed, engine, precision) must match the sidecar,
or the run is refused. A writer holds ``FILE.tsv.lock`` (flock; removed at the end) while it
runs, so a second run on the same file is refused with the first one's PID.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from dualrs_route.experts.atomic import atomic_write_json
from dualrs_route.experts.errors import (DataError, DualRSError, LockedError, OutputError, ResumeMismatchError,
                                        output_error)

COHEN_COLUMNS = ("idx", "label", "predict", "radius", "correct", "time")
ROUTING_COLUMNS = ("expert", "sigma", "radius_router", "radius_expert", "p_router_lower", "p_expert_lower",
                   "n_router", "n_expert")
COLUMNS = COHEN_COLUMNS + ROUTING_COLUMNS
SEQUENTIAL_COLUMNS = COLUMNS + ("n_used", "n_router_used", "n_expert_used", "stop")
"""Rows of ``certify --sequential``/``--target-radius``: ``n_used`` is every noisy sample the row drew
(selection and estimation, router and expert); ``n_router_used``/``n_expert_used`` each stage's
estimation samples; ``stop`` the stop rule of each stage (``router/expert`` with a router)."""
SET_COLUMNS = COLUMNS + ("members", "proof")
"""Rows of ``certify --router --router-sets TAU`` (router/sets.py): ``members`` is the set S of experts
the router's selection gave (indices joined by '+', the top one first; one index on a plain row);
``proof`` is ``dual`` on a plain row (dual CERTIFY's), else the proof that gave the radius: ``single``
(the top expert alone) or ``set``. ``expert``/``sigma``/``*_expert`` are the reported member's (the top
one, or for ``set`` the member with the smallest radius), ``*_router`` that proof's radius, bound and count."""
SINGLE_COLUMNS = COLUMNS + ("guess", "counts")
"""Rows of fixed-N ``certify --expert REF``: ``guess`` is the selection stage's class (kept when the
row abstains) and ``counts`` the estimation counts of every class, comma-joined. These are all the
row's random draws, so its certificate at any alpha, and a Multiscale cascade over several experts'
files (``dualrs-route compose-cascade``), can be re-derived from the file."""
DEFAULT_RADII = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5)


def format_counts(counts) -> str:
    """The ``counts`` cell: the per-class counts, comma-joined."""
    return ",".join(str(int(v)) for v in counts)


def parse_counts(text: str) -> tuple[int, ...]:
    """The per-class counts of a ``counts`` cell; ValueError unless it is comma-joined integers >= 0."""
    values = tuple(int(v) for v in text.split(","))
    if not values or min(values) < 0:
        raise ValueError("counts must be integers >= 0")
    return values


def sidecar_path(path: str | os.PathLike) -> Path:
    return Path(str(path) + ".json")


def refuse_existing(out: str | os.PathLike, overwrite: bool) -> None:
    """FileExistsError unless ``overwrite`` when the results file ``out`` or its sidecar exists (a
    replayed file must not silently replace one that may hold hours of certification)."""
    for path in (Path(out), sidecar_path(out)):
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} exists; pass --force to replace it")


def write_json_atomic(path: Path, data: dict) -> None:
    atomic_write_json(path, data, sort_keys=True, default=str)


def format_value(value) -> str:
    """Fixed text form of a cell: floats with 6 decimals, None as '-'."""
    if value is None:
        return "-"
    if isinstance(value, (float, np.floating)):
        return "inf" if math.isinf(value) else f"{float(value):.6f}"
    return str(value)


def diff_settings(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Every setting that differs, as 'key: file has OLD, now NEW' (nested dicts as key.sub)."""
    diffs = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += diff_settings(a, b, f"{prefix}{key}.")
        elif a != b:
            diffs.append(f"{prefix}{key}: file has {a!r}, now {b!r}")
    return diffs


INT_COLUMNS = frozenset({"idx", "label", "predict", "correct", "n_router", "n_expert", "stage", "samples", "guess"})
FLOAT_COLUMNS = frozenset({"radius", "time", "sigma", "radius_router", "radius_expert", "p_router_lower",
                           "p_expert_lower", "radius_skipped"})
REQUIRED_COLUMNS = frozenset({"idx", "label", "predict", "correct", "radius"})  # never '-'


def _cell(column: str, text: str):
    """The value of one cell of ``column`` (None for '-' where a column may be empty); ValueError if invalid."""
    if text == "-" and column not in REQUIRED_COLUMNS:
        return None
    if column in INT_COLUMNS:
        return int(text)
    if column == "counts":
        return parse_counts(text)
    if column in FLOAT_COLUMNS:
        value = float(text)
        if math.isnan(value):
            raise ValueError("NaN")
        return value
    return text


def _row_problem(values: dict) -> str | None:
    """What is wrong with a row's parsed Cohen columns, or None."""
    if values["idx"] < 0 or values["label"] < 0 or values["predict"] < -1:
        return "idx and label must be >= 0 and predict >= -1 (abstain)"
    if values.get("radius") is not None and values["radius"] < 0:
        return f"radius {values['radius']:g} is negative"
    if values["correct"] not in (0, 1):
        return "'correct' must be 0 or 1 (a running total is a known bug of some scripts)"
    if values["correct"] != int(values["predict"] == values["label"]):
        return f"correct = {values['correct']} disagrees with predict {values['predict']} and label {values['label']}"
    return None


class RowChecker:
    """Validates the rows of one results file in order: the field count, every cell of ``check``
    (integers, non-NaN floats, '-' only where a column may be empty), the agreement of
    ``correct`` with ``predict`` and ``label``, and that no ``idx`` repeats. Each problem is a
    :class:`DataError` naming the file and the line."""

    def __init__(self, path: Path, header: Sequence[str], check: Iterable[str]):
        self.path, self.header = path, list(header)
        self.check_columns = [c for c in check if c in INT_COLUMNS | FLOAT_COLUMNS | {"counts"}]
        self.seen: set[int] = set()

    def check(self, line: bytes | str, number: int) -> tuple[dict, dict]:
        """``(cells, values)`` of ``line`` (line ``number`` of the file, counting the header as 1):
        every cell as text by column, and the parsed values of the checked columns."""
        try:
            text = line.decode() if isinstance(line, bytes) else line
        except UnicodeDecodeError:
            raise DataError(f"{self.path}, line {number}: not UTF-8 text") from None
        fields = text.split("\t")
        if len(fields) != len(self.header):
            raise DataError(f"{self.path}, line {number}: {len(fields)} fields, the header has {len(self.header)}")
        cells = dict(zip(self.header, fields))
        values = {}
        for column in self.check_columns:
            try:
                values[column] = _cell(column, cells[column])
            except ValueError:
                kind = ("integer" if column in INT_COLUMNS else "number" if column in FLOAT_COLUMNS else
                        "list of counts (integers >= 0, comma-joined)")
                raise DataError(f"{self.path}, line {number}: {column} = {cells[column][:40]!r} is not a valid "
                                f"{kind}") from None
        problem = _row_problem(values)
        if problem is None and values["idx"] in self.seen:
            problem = f"idx {values['idx']} appears twice (two runs wrote to this file?)"
        if problem:
            raise DataError(f"{self.path}, line {number}: {problem}")
        self.seen.add(values["idx"])
        return cells, values


def lock_path(path: str | os.PathLike) -> Path:
    return Path(str(path) + ".lock")


def acquire_lock(path: Path) -> int:
    """Take the exclusive lock of results file ``path`` (``fcntl.flock`` on ``PATH.lock``, which then
    holds this process's PID) and return its descriptor. The OS releases the lock when the process
    ends, however it ends (kill -9 included); a stale lock file is simply locked again. A second
    writer gets :class:`LockedError` naming the holder's PID."""
    lock = lock_path(path)
    while True:
        try:
            lock.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as exc:
            raise output_error(lock, exc) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise LockedError(f"{path} is being written by another process (PID {holder}, lock {lock.name}); "
                              "wait for it to finish, stop it, or choose another --out") from None
        if _same_file(fd, lock):  # not a lock file that its holder removed while we opened it
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _same_file(fd: int, path: Path) -> bool:
    try:
        there = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    here = os.fstat(fd)
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def release_lock(fd: int, path: Path) -> None:
    """Remove ``PATH.lock`` and release the lock from :func:`acquire_lock` (removed while held, so a
    waiting writer sees a new file and locks that one instead)."""
    with contextlib.suppress(OSError):
        os.unlink(lock_path(path))
    os.close(fd)


def read_sidecar(path: Path, error: type[DualRSError]) -> dict:
    """The sidecar's metadata; ``error`` naming the file if it is not a JSON object with a
    ``settings`` object."""
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise error(f"{path} is not valid JSON ({exc}); delete the results to start over") from None
    if not isinstance(data, dict) or not isinstance(data.get("settings", {}), dict):
        raise error(f"{path} is not a dualrs-route sidecar (expected a JSON object with a 'settings' object, got "
                    f"{type(data).__name__}); delete the results to start over")
    return data


class ResultsWriter:
    """Appends one flushed TSV row per example; resumes an existing file written with the same settings.

    Create it only after every input has been validated: it creates the output file. It holds
    the file's lock (:func:`acquire_lock`) until :meth:`close`, so two runs never write one file.
    Each row goes to the file in unbuffered writes; a failed write (disk full, ...) raises
    :class:`OutputError` and leaves at most a torn last line, which a resume drops.
    """

    def __init__(self, path: str | os.PathLike, *, settings: dict, metadata: dict, columns: Sequence[str] = COLUMNS,
                 replace: bool = False):
        """``replace``: remove an existing file and its sidecar (under the lock) and start afresh."""
        self.path = Path(path)
        self.columns = tuple(columns)
        self.done: set[int] = set()
        self._pending_resume: list = []  # a resume's start, until it writes a row
        self._lock = acquire_lock(self.path)
        try:
            if replace:
                for old in (self.path, sidecar_path(self.path)):
                    old.unlink(missing_ok=True)
            self._open(json.loads(json.dumps(settings, default=str)), metadata)
        except BaseException:
            release_lock(self._lock, self.path)
            raise

    def _open(self, settings: dict, metadata: dict) -> None:
        side = sidecar_path(self.path)
        if self.path.exists():
            if not side.is_file():
                raise ResumeMismatchError(f"{self.path} exists but has no {side.name}; it was not written by "
                                          "dualrs-route. Choose another --out or delete it")
            old = read_sidecar(side, ResumeMismatchError)
            diffs = diff_settings(old.get("settings", {}), settings)
            if diffs:
                raise ResumeMismatchError(f"{self.path} was written with other settings; use another --out, delete it, "
                                          "or repeat the original options. Differences: " + "; ".join(diffs))
            self.done = self._recover()
            self.metadata = old
            self._pending_resume = [metadata.get("started")]  # recorded with this session's first row
            self._handle = self._open_rows()
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.metadata = dict(metadata, settings=settings, columns=list(self.columns))
            write_json_atomic(side, self.metadata)
            self._handle = self._open_rows()
            self._append("\t".join(self.columns) + "\n")

    def _open_rows(self):
        try:
            return open(self.path, "ab", buffering=0)
        except OSError as exc:
            raise output_error(self.path, exc) from exc

    def _recover(self) -> set[int]:
        """Validate every row; drop a torn or unparsable last row (truncating the file to the last
        good row); refuse a bad row elsewhere, naming its line. Returns the indices already done."""
        raw = self.path.read_bytes()
        lines = raw.split(b"\n")
        tail = lines.pop()  # bytes after the last newline: a row torn by a kill, or nothing
        if not lines or lines[0].decode(errors="replace").split("\t") != list(self.columns):
            raise ResumeMismatchError(f"{self.path}: header is not {' '.join(self.columns)}; delete it to start over")
        rows = RowChecker(self.path, self.columns, self.columns)
        good = len(lines[0]) + 1
        for number, line in enumerate(lines[1:], start=2):
            try:
                rows.check(line, number)
            except DataError as exc:
                if number == len(lines) and not tail:  # the last row: torn but ending in a newline
                    break
                raise ResumeMismatchError(f"{exc}; fix or delete that line, or delete the file to start over") from None
            good += len(line) + 1
        if good != len(raw):
            try:
                with open(self.path, "r+b") as handle:
                    handle.truncate(good)
            except OSError as exc:
                raise output_error(self.path, exc) from exc
        return rows.seen

    def _append(self, text: str) -> None:
        """Write ``text`` completely (an unbuffered file may take it in several writes)."""
        data = memoryview(text.encode())
        try:
            while data:
                data = data[self._handle.write(data):]
        except OSError as exc:
            raise output_error(self.path, exc, kept="rows already written are kept; re-running resumes") from exc

    def _record_resume(self) -> None:
        resumed = self.metadata.get("resumed")
        self.metadata["resumed"] = (resumed if isinstance(resumed, list) else []) + self._pending_resume
        self._pending_resume = []
        write_json_atomic(sidecar_path(self.path), self.metadata)

    def write(self, row: dict) -> None:
        if self._pending_resume:  # now, so that a resume killed later is in the history too
            self._record_resume()
        self._append("\t".join(format_value(row.get(c)) for c in self.columns) + "\n")
        self.done.add(int(row["idx"]))

    def close(self, *, after_error: bool = False, **final) -> None:
        """Close the rows, record ``final`` in the sidecar and release the lock (always). A failed close
        or sidecar write is an :class:`OutputError`; with ``after_error`` (the run is failing already)
        it is not raised and the sidecar is left as it was, so the first error is the one reported."""
        try:
            try:
                self._handle.close()
            except OSError as exc:
                raise output_error(self.path, exc, kept="rows already written are kept; re-running resumes") from exc
            if self._pending_resume and final.get("complete", True) == self.metadata.get("complete", True):
                return  # a resume that wrote nothing and changed nothing leaves the sidecar as it was
            if self._pending_resume:
                self._record_resume()
            self.metadata.update(final)
            write_json_atomic(sidecar_path(self.path), self.metadata)
        except OutputError:
            if not after_error:
                raise
        finally:
            release_lock(self._lock, self.path)


# --- reading and analysis ---


@dataclass
class ResultTable:
    """Cohen's columns of one result file, as arrays, plus its metadata (empty without a sidecar)."""

    name: str
    idx: np.ndarray
    label: np.ndarray
    predict: np.ndarray
    radius: np.ndarray
    correct: np.ndarray
    metadata: dict
    expert: list[str] | None = None
    columns: dict = field(default_factory=dict)  # every column as raw text, by name

    @property
    def mode(self) -> str:
        return self.metadata.get("settings", {}).get("mode", "single")


def read_single_expert_results(path: str | os.PathLike, use: str) -> ResultTable:
    """Read a complete fixed-N ``certify --expert REF`` results file at the expert's own sigma.

    The replays (``compose``, ``compose-cascade``) re-derive certificates from such a file's
    counts; a sequential file's counts come from a data-dependent N, a router or cascade file
    has other rows. ``use`` names the replay in the one-line :class:`DataError` for anything else
    (e.g. "a cascade is replayed")."""
    table = read_results(path)
    meta, columns = table.metadata, table.columns
    settings = meta.get("settings", {})
    if not meta:
        raise DataError(f"{path} has no .json sidecar: expert results must come from `dualrs-route certify`")
    missing = sorted({"n_expert", "sigma"} - set(columns))
    if missing:
        raise DataError(f"{path}: not a dualrs-route certify TSV (columns {missing} missing)")
    if (settings.get("mode") != "single" or settings.get("sequential") or settings.get("command") != "certify"
            or meta.get("certificate") is False):
        raise DataError(f"{path}: {use} from fixed-N `certify --expert REF` results, not from "
                        f"mode {settings.get('mode')!r}{' (sequential)' if settings.get('sequential') else ''}")
    if settings.get("sigma_override") is not None:
        raise DataError(f"{path} was certified with --sigma {settings['sigma_override']}, not the expert's own sigma")
    if not meta.get("complete", False):
        raise DataError(f"{path} is not complete (its run was interrupted); finish it by re-running its command")
    sigmas = set(columns["sigma"])
    if len(sigmas) != 1:
        raise DataError(f"{path}: more than one sigma in the file ({sorted(sigmas)})")
    return table


def read_results(path: str | os.PathLike) -> ResultTable:
    """Read a results TSV: ours or Cohen et al.'s (``idx label predict radius correct time``)."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read results file {path}: {exc}") from None
    if not lines:
        raise DataError(f"{path} is empty")
    header = lines[0].split("\t")
    missing = [c for c in COHEN_COLUMNS[:5] if c not in header]
    if missing:
        raise DataError(f"{path}: not a results TSV (header lacks {missing}); expected columns {' '.join(COHEN_COLUMNS)}")
    checker = RowChecker(path, header, COHEN_COLUMNS[:5])
    rows = [checker.check(line, number) for number, line in enumerate(lines[1:], start=2) if line.strip()]
    idx, label, predict, correct = (np.array([v[c] for _, v in rows], dtype=np.int64)
                                    for c in ("idx", "label", "predict", "correct"))
    radius = np.array([v["radius"] for _, v in rows], dtype=np.float64)
    columns = {c: [cells[c] for cells, _ in rows] for c in header}
    expert = columns.get("expert")
    side = sidecar_path(path)
    metadata = read_sidecar(side, DataError) if side.is_file() else {}
    return ResultTable(path.stem, idx, label, predict, radius, correct, metadata, expert, columns)


def certified_accuracy(table: ResultTable, radii: Iterable[float]) -> list[float]:
    """Fraction of rows with correct = 1 and radius >= r, for each r."""
    n = max(len(table.idx), 1)
    good = table.correct == 1
    return [float(np.sum(good & (table.radius >= r)) / n) for r in radii]


def summarize(table: ResultTable, radii: Sequence[float] = DEFAULT_RADII) -> dict:
    """Certified accuracy per radius, abstain rate, ACR (mean of radius * correct) and, for sequential
    files (an ``n_used`` column), the mean noisy samples per row (else None)."""
    n = len(table.idx)
    finite = np.where(np.isfinite(table.radius), table.radius, 0.0)
    used = table.columns.get("n_used")
    return {
        "name": table.name,
        "mode": table.mode,
        "count": n,
        "certified_accuracy": dict(zip([float(r) for r in radii], certified_accuracy(table, radii))),
        "abstain_rate": float(np.mean(table.predict == -1)) if n else 0.0,
        "acr": float(np.mean(finite * (table.correct == 1))) if n else 0.0,
        "samples_per_row": float(np.mean([float(v) for v in used])) if used and n else None,  # sequential runs
    }


def oracle_table(tables: Sequence[ResultTable], name: str = "oracle (best expert per example)") -> ResultTable:
    """Per example, the best certified-correct radius over several per-expert files (an upper bound
    on any router over those experts; uses the labels, so it is not a certificate)."""
    if len(tables) < 2:
        raise DataError("the oracle needs at least two per-expert result files")
    common = set(tables[0].idx.tolist())
    for t in tables[1:]:
        common &= set(t.idx.tolist())
    if not common:
        raise DataError("the per-expert result files share no example index")
    order = np.array(sorted(common), dtype=np.int64)
    scores, labels = [], None
    for t in tables:
        where = {int(i): k for k, i in enumerate(t.idx)}
        rows = np.array([where[int(i)] for i in order])
        scores.append(np.where(t.correct[rows] == 1, t.radius[rows], -1.0))
        labels = t.label[rows]
    stacked = np.stack(scores)
    best = np.argmax(stacked, axis=0)
    radius = stacked[best, np.arange(len(order))]
    correct = (radius >= 0).astype(np.int64)
    predict = np.where(correct == 1, labels, -1)
    expert = [tables[b].name for b in best]
    return ResultTable(name, order, labels, predict, np.maximum(radius, 0.0), correct, {"settings": {"mode": "oracle"}},
                       expert)


def stop_radius_note(name: str, settings: dict) -> str | None:
    """For a run with ``--target-radius`` or ``--max-radius`` (rows stop once certified there), the
    note that its certified accuracy above that radius, and its ACR, are understated; else None."""
    sequential = settings.get("sequential")
    if not isinstance(sequential, dict):
        return None
    given = {flag: sequential.get(key) for flag, key in (("--target-radius", "target_radius"),
                                                          ("--max-radius", "max_radius"))
             if isinstance(sequential.get(key), (int, float))}
    if not given:
        return None
    radius = min(given.values())
    return (f"{name} ran with {' and '.join(f'{flag} {value:g}' for flag, value in given.items())}: its rows stop "
            f"once certified at radius {radius:g}, so its certified accuracy above {radius:g} (and its ACR) is "
            "understated")


def format_markdown(summaries: Sequence[dict], radii: Sequence[float] = DEFAULT_RADII) -> str:
    """A markdown table: one row per summary, certified accuracy (%) per radius, ACR, abstain rate."""
    head = ["run", "n"] + [f"r={r:g}" for r in radii] + ["ACR", "abstain"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in summaries:
        accs = [f"{100 * s['certified_accuracy'][float(r)]:.1f}" for r in radii]
        lines.append("| " + " | ".join([s["name"], str(s["count"])] + accs + [f"{s['acr']:.3f}",
                                                                            f"{100 * s['abstain_rate']:.1f}%"]) + " |")
    return "\n".join(lines)


def envelope_summary(summaries: Sequence[dict], radii: Sequence[float]) -> dict:
    """Best single expert at each radius (per-radius max of certified accuracy; max ACR)."""
    return {
        "name": "envelope (best single expert at each radius)", "mode": "envelope",
        "count": max(s["count"] for s in summaries),
        "certified_accuracy": {float(r): max(s["certified_accuracy"][float(r)] for s in summaries) for r in radii},
        "abstain_rate": min(s["abstain_rate"] for s in summaries),
        "acr": max(s["acr"] for s in summaries),
    }


def load_tables(paths: Sequence[str]) -> list[ResultTable]:
    """Read several result files; names are the file stems, or the paths when two stems collide."""
    tables = [read_results(p) for p in paths]
    names = [t.name for t in tables]
    if len(set(names)) != len(names):
        for t, p in zip(tables, paths):
            t.name = str(p)
    return tables


def analysis_report(paths: Sequence[str], radii: Sequence[float] = DEFAULT_RADII, *, oracle: bool | None = None) -> dict:
    """Summaries of several result files side by side, plus envelope, oracle and captured gain.

    Single-expert files (mode ``single``, or Cohen's files without a sidecar) feed the
    envelope and the oracle; for each router or cascade file the report gives the share of the
    oracle's ACR gain over the best single expert's ACR that it captures.
    """
    return report_from_tables(load_tables(paths), radii, oracle=oracle)


def report_from_tables(tables: Sequence[ResultTable], radii: Sequence[float] = DEFAULT_RADII, *,
                       oracle: bool | None = None) -> dict:
    """:func:`analysis_report` on tables already read (see :func:`load_tables`)."""
    summaries = [summarize(t, radii) for t in tables]
    singles = [t for t in tables if t.mode == "single"]
    single_summaries = [s for s, t in zip(summaries, tables) if t.mode == "single"]
    extra = []
    if len(singles) >= 2:
        extra.append(envelope_summary(single_summaries, radii))
        if oracle is None or oracle:
            extra.append(summarize(oracle_table(singles), radii))
    elif oracle:
        raise DataError("--oracle needs at least two single-expert result files")
    counts = {s["count"] for s in summaries}
    notes = []
    if len(counts) > 1:
        notes.append(f"files cover different numbers of examples ({sorted(counts)}): compare with care")
    captured = {}
    oracle_row = next((s for s in extra if s["mode"] == "oracle"), None)
    envelope = next((s for s in extra if s["mode"] == "envelope"), None)
    if oracle_row and envelope:
        gap = oracle_row["acr"] - envelope["acr"]
        for s in summaries:
            if s["mode"] not in ("single", "best-radius") and gap > 0:  # routers and cascades
                captured[s["name"]] = (s["acr"] - envelope["acr"]) / gap
                notes.append(f"{s['name']} captures {100 * captured[s['name']]:.0f}% of the oracle's ACR gain over the "
                             f"best single expert ({s['acr']:.3f} vs {envelope['acr']:.3f}; oracle {oracle_row['acr']:.3f})")
    for s, t in zip(summaries, tables):
        stopped = stop_radius_note(s["name"], t.metadata.get("settings", {}))
        if stopped:
            notes.append(stopped)
        if s["samples_per_row"] is not None:
            notes.append(f"{s['name']} (sequential) drew {s['samples_per_row']:.0f} noisy samples per row on average")
        if t.mode == "best-radius":
            notes.append(f"{s['name']} used --select best-radius: an oracle, not a certificate")
    markdown = format_markdown(summaries + extra, radii)
    if notes:
        markdown += "\n\n" + "\n".join(f"- {n}" for n in notes)
    return {"rows": summaries + extra, "captured_acr_gain": captured, "notes": notes, "markdown": markdown}
