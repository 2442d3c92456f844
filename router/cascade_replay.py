"""The Multiscale cascade replayed from stored single-expert results (``dualrs-route compose-cascade``).

A fixed-N ``certify --expert REF`` row keeps its selection guess and its estimation counts
(router/results.py ``SINGLE_COLUMNS``). A cascade stage draws exactly those streams
(router/cascade.py, "Noise streams"), so the cascade over several experts' files is a function
of the files: :func:`compose_cascade` gives the rows ``certify --expert A --expert B ... --select
cascade`` writes, at any alpha and p0, with no new samples. The guarantee is the cascade's.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from dualrs_route.experts.errors import DataError
from dualrs_route.experts.stats import check_alpha

from .cascade import DEFAULT_P0, cascade_from_counts, cascade_guarantee, cascade_row_fields, check_p0
from .results import ResultsWriter, parse_counts, read_single_expert_results, refuse_existing
from .run import CASCADE_COLUMNS, versions


@dataclass(frozen=True)
class ExpertCounts:
    """One ``certify --expert REF`` results file (fixed N), by image: label, guess, estimation counts, time."""

    path: str
    name: str
    sigma: float
    n0: int
    n: int
    settings: dict
    metadata: dict
    rows: dict  # idx -> (label, guess, counts tuple, time or None)


def load_expert_counts(path) -> ExpertCounts:
    """Read a complete fixed-N ``certify --expert`` TSV with its ``guess`` and ``counts`` columns.

    Raises :class:`DataError` (one line) for anything a cascade replay cannot use."""
    table = read_single_expert_results(path, "a cascade is replayed")
    meta, columns = table.metadata, table.columns
    settings = meta["settings"]
    if "counts" not in columns or "guess" not in columns:
        raise DataError(f"{path} has no guess/counts columns (written by an older dualrs-route); certify the expert "
                        "again to a new --out")
    sigmas = set(columns["sigma"])
    n = int(settings["N"])
    rows = {}
    for r, i in enumerate(table.idx):
        try:
            counts, guess = parse_counts(columns["counts"][r]), int(columns["guess"][r])
        except ValueError:
            raise DataError(f"{path}, idx {int(i)}: guess {columns['guess'][r][:20]!r} or counts "
                            f"{columns['counts'][r][:40]!r} is not valid") from None
        if sum(counts) != n or not 0 <= guess < len(counts):
            raise DataError(f"{path}, idx {int(i)}: counts sum to {sum(counts)} with N = {n}, or guess {guess} is "
                            f"not one of the {len(counts)} classes")
        time_text = columns["time"][r] if "time" in columns else "-"
        rows[int(i)] = (int(table.label[r]), guess, counts, None if time_text == "-" else float(time_text))
    name = table.expert[0].partition(":")[2] if table.expert else Path(path).stem
    return ExpertCounts(str(path), name, float(next(iter(sigmas))), int(settings["N0"]), n, settings, meta, rows)


def compose_cascade(files: Sequence[ExpertCounts], *, alpha: float, p0: float = DEFAULT_P0) -> list[dict]:
    """The rows ``certify --expert A --expert B ... --select cascade`` writes for these experts, seed,
    N0 and N, replayed from their single-expert results (``files`` in ``--expert`` order).

    Stage k reads exactly the counts the single-expert run drew (module docstring, "Noise streams"),
    so every column equals the cascade run's except ``time``, which here is the sum of the
    single-expert rows' times over the stages the cascade ran. ``alpha`` may be any level: the
    counts do not depend on it."""
    alpha, p0 = check_alpha(alpha), check_p0(p0)
    if len(files) < 2:
        raise DataError(f"a cascade needs at least two experts' results files ({len(files)} given)")
    first = files[0]
    for f in files[1:]:
        for key in ("seed", "N0", "N", "dataset", "split"):
            if f.settings.get(key) != first.settings.get(key):
                raise DataError(f"{f.path} has {key} = {f.settings.get(key)!r} but {first.path} has "
                                f"{first.settings.get(key)!r}: the cascade's stages share one seed, N0, N and data")
        if set(f.rows) != set(first.rows):
            extra = sorted(set(f.rows) ^ set(first.rows))
            raise DataError(f"{f.path} and {first.path} cover different images (e.g. idx {extra[:3]}); certify the "
                            "same --dataset/--split/--skip/--max/--shard")
    order = sorted(range(len(files)), key=lambda k: (-files[k].sigma, k))
    sigmas = [files[k].sigma for k in order]
    rows = []
    for i in sorted(first.rows):
        label = first.rows[i][0]
        for f in files:
            if f.rows[i][0] != label or len(f.rows[i][2]) != len(first.rows[i][2]):
                raise DataError(f"{f.path}, idx {i}: label or number of classes differs from {first.path}: not the "
                                "same images or experts of different classes")
        draws = [(files[k].rows[i][1], files[k].rows[i][2]) for k in order]
        result = cascade_from_counts(draws, sigmas=sigmas, n0=first.n0, alpha=alpha, p0=p0, experts=order)
        times = [files[order[k]].rows[i][3] for k in range(len(result.stages))]
        row = {"idx": i, "label": label, "radius_router": None, "p_router_lower": None, "n_router": None,
               **cascade_row_fields(result, lambda k: f"{k}:{files[k].name}")}
        row["correct"] = int(row["predict"] == label)
        row["time"] = None if any(t is None for t in times) else sum(times)
        rows.append(row)
    return rows


def write_cascade_results(out, files: Sequence[ExpertCounts], rows: Sequence[dict], *, alpha: float, p0: float,
                          command: str, overwrite: bool = False):
    """Write ``rows`` (from :func:`compose_cascade`) as a ``certify --select cascade`` TSV + sidecar.

    An existing file is replaced only with ``overwrite``. The sidecar's settings are the cascade run's
    (models and engines of every stage in ``--expert`` order), with ``command`` = ``compose-cascade``."""
    out = Path(out)
    refuse_existing(out, overwrite)
    first = files[0].settings
    settings = {key: first.get(key) for key in ("dataset", "data", "split", "skip", "max", "shard", "N0", "N",
                                                 "seed", "engine", "device_type", "precision") if key in first}
    settings.update({"command": "compose-cascade", "mode": "cascade", "cascade_p0": p0, "cascade_alpha_split": "even",
                     "alpha_expert": alpha, "alpha_router": None, "router_N0": None, "router_N": None,
                     "sigma_override": None, "models": [f.settings["models"][0] for f in files],
                     "engines": [(f.settings.get("engines") or [{}])[0] for f in files]})
    metadata = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "argv": command, "versions": versions(),
                "models": [(f.metadata.get("models") or [{}])[0] for f in files], "certificate": True,
                "engines": [{"stage": f"expert {k}", **(f.metadata.get("engines") or [{}])[0], "results": f.path}
                            for k, f in enumerate(files)],
                "guarantee": cascade_guarantee(alpha, len(files), p0),
                "notes": ["composed by `dualrs-route compose-cascade` from the experts' own certify results (their "
                          "guess and counts columns, same seed): the rows the cascade gives with these noise streams; "
                          "time is the sum of the single-expert rows' times over the stages that ran"],
                "selection": {"selected": len(rows)}}
    writer = ResultsWriter(out, settings=settings, metadata=metadata, columns=CASCADE_COLUMNS, replace=True)
    failed = True
    try:
        for row in rows:
            writer.write(row)
        failed = False
    finally:
        writer.close(after_error=failed, finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"), complete=not failed)
    return out
