"""Result files: a TSV with one flushed row per example, a JSON sidecar, resume, and analysis.

The TSV's first columns are exactly Cohen et al.'s ``idx label predict radius correct
time`` (time in seconds), so existing analysis scripts keep working; routing columns
follow. ``FILE.tsv.json`` holds the run's metadata: settings, models (revision and
sha256 of every weight file), package versions.

Resume: re-running with the same ``--out`` keeps every complete row, drops a partial
last line (a run killed mid-write), and continues with the next example. Settings
that change results (models, data, budgets, alpha, seed, engine, precision) must match
the sidecar, or the run is refused.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from dualrs_route.experts.atomic import atomic_write_json
from dualrs_route.experts.errors import DataError, ResumeMismatchError

COHEN_COLUMNS = ("idx", "label", "predict", "radius", "correct", "time")
ROUTING_COLUMNS = ("expert", "sigma", "radius_router", "radius_expert", "p_router_lower", "p_expert_lower",
                   "n_router", "n_expert")
COLUMNS = COHEN_COLUMNS + ROUTING_COLUMNS
SEQUENTIAL_COLUMNS = COLUMNS + ("n_used", "n_router_used", "n_expert_used", "stop")
"""Rows of ``certify --sequential``/``--target-radius``: ``n_used`` is every noisy sample the row drew
(selection and estimation, router and expert); ``n_router_used``/``n_expert_used`` each stage's
estimation samples; ``stop`` the stop rule of each stage (``router/expert`` with a router)."""
DEFAULT_RADII = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5)


def sidecar_path(path: str | os.PathLike) -> Path:
    return Path(str(path) + ".json")


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


class ResultsWriter:
    """Appends one flushed TSV row per example; resumes an existing file written with the same settings.

    Create it only after every input has been validated: it creates the output file.
    """

    def __init__(self, path: str | os.PathLike, *, settings: dict, metadata: dict, columns: Sequence[str] = COLUMNS):
        self.path = Path(path)
        self.columns = tuple(columns)
        self.done: set[int] = set()
        side = sidecar_path(self.path)
        settings = json.loads(json.dumps(settings, default=str))
        if self.path.exists():
            if not side.is_file():
                raise ResumeMismatchError(f"{self.path} exists but has no {side.name}; it was not written by "
                                          "dualrs-route. Choose another --out or delete it")
            try:
                old = json.loads(side.read_text())
            except json.JSONDecodeError as exc:
                raise ResumeMismatchError(f"{side} is not valid JSON ({exc}); delete the results to start over") from None
            diffs = diff_settings(old.get("settings", {}), settings)
            if diffs:
                raise ResumeMismatchError(f"{self.path} was written with other settings; use another --out, delete it, "
                                          "or repeat the original options. Differences: " + "; ".join(diffs))
            self.done = self._recover()
            self.metadata = old
            self.metadata.setdefault("resumed", []).append(metadata.get("started"))
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.metadata = dict(metadata, settings=settings, columns=list(self.columns))
            write_json_atomic(side, self.metadata)
            with open(self.path, "w") as handle:
                handle.write("\t".join(self.columns) + "\n")
        self._handle = open(self.path, "a")

    def _recover(self) -> set[int]:
        """Read complete rows, truncate a partial last line, return the indices already done."""
        raw = self.path.read_bytes()
        complete = raw[: raw.rfind(b"\n") + 1]
        if len(complete) != len(raw):
            with open(self.path, "r+b") as handle:
                handle.truncate(len(complete))
        lines = complete.decode().splitlines()
        if not lines or tuple(lines[0].split("\t")) != self.columns:
            raise ResumeMismatchError(f"{self.path}: header is not {' '.join(self.columns)}; delete it to start over")
        return {int(line.split("\t", 1)[0]) for line in lines[1:] if line}

    def write(self, row: dict) -> None:
        self._handle.write("\t".join(format_value(row.get(c)) for c in self.columns) + "\n")
        self._handle.flush()
        self.done.add(int(row["idx"]))

    def close(self, **final) -> None:
        self._handle.close()
        self.metadata.update(final)
        write_json_atomic(sidecar_path(self.path), self.metadata)


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
    pos = {c: header.index(c) for c in header}
    rows = [line.split("\t") for line in lines[1:] if line.strip()]
    try:
        idx = np.array([int(r[pos["idx"]]) for r in rows], dtype=np.int64)
        label = np.array([int(r[pos["label"]]) for r in rows], dtype=np.int64)
        predict = np.array([int(r[pos["predict"]]) for r in rows], dtype=np.int64)
        radius = np.array([float(r[pos["radius"]]) for r in rows], dtype=np.float64)
        correct = np.array([int(r[pos["correct"]]) for r in rows], dtype=np.int64)
    except (ValueError, IndexError) as exc:
        raise DataError(f"{path}: malformed row ({exc})") from None
    if np.any((correct != 0) & (correct != 1)):
        raise DataError(f"{path}: 'correct' must be 0 or 1 per row (a running total is a known bug of some scripts)")
    expert = [r[pos["expert"]] for r in rows] if "expert" in pos else None
    side = sidecar_path(path)
    metadata = {}
    if side.is_file():
        try:
            metadata = json.loads(side.read_text())
        except json.JSONDecodeError:
            metadata = {}
    columns = {c: [r[i] for r in rows] for c, i in pos.items()}
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
    envelope and the oracle; for each router file the report gives the share of the
    oracle's ACR gain over the best single expert's ACR that the router captures.
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
            if s["mode"] == "router" and gap > 0:
                captured[s["name"]] = (s["acr"] - envelope["acr"]) / gap
                notes.append(f"{s['name']} captures {100 * captured[s['name']]:.0f}% of the oracle's ACR gain over the "
                             f"best single expert ({s['acr']:.3f} vs {envelope['acr']:.3f}; oracle {oracle_row['acr']:.3f})")
    for s, t in zip(summaries, tables):
        if s["samples_per_row"] is not None:
            notes.append(f"{s['name']} (sequential) drew {s['samples_per_row']:.0f} noisy samples per row on average")
        if t.mode == "best-radius":
            notes.append(f"{s['name']} used --select best-radius: an oracle, not a certificate")
    markdown = format_markdown(summaries + extra, radii)
    if notes:
        markdown += "\n\n" + "\n".join(f"- {n}" for n in notes)
    return {"rows": summaries + extra, "captured_acr_gain": captured, "notes": notes, "markdown": markdown}
