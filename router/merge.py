"""Merge the shards of a run (``--shard K/N``) into the file the unsharded run would have written.

:func:`merge_results` reads result TSVs (``certify``/``predict`` parts), :func:`merge_label_shards`
labels files and :func:`merge_score_shards` router-scores files. Each refuses, with one line
naming the offending file(s), parts that

(a) were written with other settings or models (every setting but the shard must match);
(b) are incomplete: the run did not finish, or the rows are not exactly its shard's examples;
(c) overlap: two parts hold the same example;
(d) leave a gap: the union is not exactly the unsharded run's selection (a shard is missing).

The merged result file holds the rows in index order, byte for byte as the parts wrote them,
so it equals an unsharded run's file except for the ``time`` column; its sidecar has the
unsharded settings (an unsharded ``certify --out MERGED`` finds it complete) and lists the
parts under ``merged_from``. Every row of every part must pass the checks a resume applies
(:class:`~.results.RowChecker`). The merge holds ``--out``'s lock (:func:`~.results.acquire_lock`,
as a certify run on it would) and writes the sidecar, then the TSV, each atomically, so a merged
TSV never exists without its sidecar; if the TSV cannot be written the new sidecar is removed, so
that the merge can simply be run again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from dualrs_route.experts.atomic import atomic_write_text
from dualrs_route.experts.data import select_indices
from dualrs_route.experts.errors import DataError

from .results import RowChecker, acquire_lock, diff_settings, release_lock, sidecar_path, write_json_atomic
from .shards import parse_shard

# --- checks shared by every kind of part ---


def _unsharded(settings: dict, keys: Sequence[str] = ("shard",)) -> dict:
    return {k: v for k, v in settings.items() if k not in keys}


def check_same_settings(settings: Sequence[dict], names: Sequence[str]) -> None:
    """(a): DataError naming the first part whose settings differ from the first part's."""
    for other, name in zip(settings[1:], names[1:]):
        diffs = diff_settings(settings[0], other)
        if diffs:
            raise DataError(f"{name} was written with other settings than {names[0]} and cannot be merged: "
                            + "; ".join(diffs))


def check_partition(parts: Sequence[Sequence[int]], names: Sequence[str], expected: Sequence[Sequence[int]],
                    selection: Sequence[int], shards: Sequence[str | None]) -> None:
    """(b) each part holds exactly ``expected[i]``, (c) no example is in two parts, (d) together
    they hold exactly ``selection``. DataError (one line, naming the file(s)) for the first failure."""
    for rows, name, want in zip(parts, names, expected):
        if sorted(rows) != sorted(want) or len(set(rows)) != len(rows):
            missing = sorted(set(want) - set(rows))
            extra = sorted(set(rows) - set(want))
            raise DataError(f"{name} is incomplete: it holds {len(rows)} of its {len(want)} examples"
                            + (f" (missing idx {missing[:5]})" if missing else "")
                            + (f" (unexpected idx {extra[:5]})" if extra else "")
                            + "; re-run its command to finish it")
    owner: dict[int, str] = {}
    for rows, name in zip(parts, names):
        for i in rows:
            if i in owner:
                raise DataError(f"{owner[i]} and {name} overlap (both hold example {i}); merge each shard once")
            owner[i] = name
    missing = [i for i in selection if i not in owner]
    if missing or len(owner) != len(selection):
        have = sorted({s for s in shards if s})
        raise DataError(f"the parts leave a gap: {len(missing)} of the {len(selection)} selected examples are in no "
                        f"part (first: idx {missing[0] if missing else '?'}); parts given: shards {', '.join(have)}")


def _check_out(out: Path, parts: Sequence[Path]) -> None:
    if out.exists() or sidecar_path(out).exists():
        raise FileExistsError(f"{out} exists; delete it or choose another --out")
    if any(out.resolve() == p.resolve() for p in parts):
        raise DataError(f"--out {out} is one of the parts")


# --- result TSVs ---


ROW_KEYS = ("idx", "label", "predict", "correct")  # the columns every results file has (predict's too)


@dataclass
class ResultPart:
    path: Path
    metadata: dict
    header: str
    lines: list[str]  # data rows, exactly as written, without the newline
    idx: list[int]  # each row's idx


def read_part(path: str | os.PathLike) -> ResultPart:
    """A result TSV and its sidecar, for merging; DataError if either is missing or damaged, or if
    a row fails the checks of a resume (:class:`~.results.RowChecker`, naming the file and line)."""
    path = Path(path)
    side = sidecar_path(path)
    if not side.is_file():
        raise DataError(f"{path} has no sidecar {side.name}; only files written by dualrs-route can be merged")
    try:
        metadata = json.loads(side.read_text())
        raw = path.read_text()
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"cannot read {path} or its sidecar: {exc}") from None
    if not raw.endswith("\n"):
        raise DataError(f"{path} is incomplete: its last row is cut off; re-run its command to finish it")
    header, *lines = raw[:-1].split("\n")
    columns = header.split("\t")
    if not set(ROW_KEYS) <= set(columns):
        raise DataError(f"{path}: not a results file (its header lacks {[c for c in ROW_KEYS if c not in columns]})")
    checker = RowChecker(path, columns, columns)
    idx = [checker.check(line, number)[1]["idx"] for number, line in enumerate(lines, start=2)]
    return ResultPart(path, metadata, header, lines, idx)


def merge_results(paths: Sequence[str | os.PathLike], out: str | os.PathLike, *, command: str = "") -> dict:
    """Check the result parts ``paths`` (see the module docstring) and write ``out`` and its sidecar.
    Returns the merged sidecar."""
    paths = [Path(p) for p in paths]
    out = Path(out)
    lock = acquire_lock(out)
    try:
        return _merge_results(paths, out, command)
    finally:
        release_lock(lock, out)


def _merge_results(paths: list[Path], out: Path, command: str) -> dict:
    """:func:`merge_results` under ``out``'s lock."""
    _check_out(out, paths)
    parts = [read_part(p) for p in paths]
    names = [str(p) for p in paths]
    settings = [p.metadata.get("settings", {}) for p in parts]
    check_same_settings([_unsharded(s) for s in settings], names)
    for part, name in zip(parts, names):
        if part.header != parts[0].header:
            raise DataError(f"{name} has other columns than {names[0]}")
        if part.metadata.get("complete") is not True:
            raise DataError(f"{name} is incomplete: its run did not finish; re-run its command to finish it")
    size = _one_size([p.metadata.get("selection", {}).get("dataset_size") for p in parts], names)
    base = settings[0]
    selection = select_indices(size, int(base["skip"]), int(base["max"]))
    shards = [parse_shard(s.get("shard")) for s in settings]
    expected = [s.select(selection) if s else selection for s in shards]
    check_partition([p.idx for p in parts], names, expected, selection, [str(s) if s else None for s in shards])
    rows = sorted((i, line) for p in parts for i, line in zip(p.idx, p.lines))
    metadata = merged_metadata(parts[0].metadata, [p.metadata for p in parts], names, command)
    metadata["selection"] = dict(parts[0].metadata["selection"], selected=len(selection), shard=None)
    write_json_atomic(sidecar_path(out), metadata)
    try:
        atomic_write_text(out, parts[0].header + "\n" + "".join(line + "\n" for _, line in rows))
    except BaseException:
        with contextlib.suppress(OSError):  # no sidecar without its TSV: a retry finds --out free
            sidecar_path(out).unlink()
        raise
    return metadata


def merged_metadata(first: dict, metas: Sequence[dict], names: Sequence[str], command: str) -> dict:
    """The first part's metadata with the unsharded settings, the parts listed and per-session fields folded."""
    meta = json.loads(json.dumps(first))
    meta["settings"] = _unsharded(meta.get("settings", {}))
    for key in ("resumed", "last_session_seconds"):
        meta.pop(key, None)
    meta.update(argv=command, complete=True, merged=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                started=min(str(m.get("started", "")) for m in metas),
                finished=max(str(m.get("finished", "")) for m in metas),
                merged_from=[{"file": name, "shard": m.get("settings", {}).get("shard"), "argv": m.get("argv"),
                              "started": m.get("started"), "finished": m.get("finished")}
                             for m, name in zip(metas, names)])
    return meta


# --- labels and router scores (.npz) ---


def _labels_base(settings: dict) -> dict:
    """Labels settings without what differs between shards (the shard and the images it holds)."""
    base = _unsharded(settings, ("images", "indices_sha256"))
    base["selection"] = _unsharded(dict(base.get("selection", {})))
    return base


def merge_label_shards(paths: Sequence[str | os.PathLike], out: str | os.PathLike, *, command: str = ""):
    """Check labels parts (see the module docstring) and write the labels file of the unsharded run."""
    from .labels import load_labels, merge_labels, save_labels, select_label_indices

    paths, out = [Path(p) for p in paths], Path(out)
    _check_out(out, paths)
    names = [str(p) for p in paths]
    sets = [load_labels(p) for p in paths]
    settings = [s.meta.get("settings", {}) for s in sets]
    check_same_settings([_labels_base(s) for s in settings], names)
    for labels, name in zip(sets, names):
        if not labels.complete:
            raise DataError(f"{name} is incomplete: its run did not finish; re-run its command to finish it")
    size = _one_size([s.meta.get("dataset_size") for s in sets], names)
    base = _labels_base(settings[0])
    chosen = base["selection"]
    selection = select_label_indices(size, max_images=chosen.get("max"), fraction=chosen.get("fraction"),
                                     seed=base["seed"], start=chosen.get("start", 0)).tolist()
    shards = [parse_shard(s.get("selection", {}).get("shard")) for s in settings]
    check_partition([s.indices.tolist() for s in sets], names, [k.select(selection) if k else selection for k in shards],
                    selection, [str(k) if k else None for k in shards])
    merged = merge_labels(sets, names)
    indices = np.asarray(selection, dtype=np.int64)
    merged.meta["settings"] = dict(base, images=len(indices), indices_sha256=hashlib.sha256(indices.tobytes()).hexdigest())
    merged.meta.update(command=command, dataset_size=size, updated=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    save_labels(out, merged)
    return merged


def merge_score_shards(paths: Sequence[str | os.PathLike], out: str | os.PathLike, *, command: str = ""):
    """Check router-scores parts (see the module docstring) and write the scores file of the unsharded run.
    A scores file exists only once its run finished, so (b) is about its rows."""
    from .calibrate import load_scores
    from .labels import save_npz_atomic

    paths, out = [Path(p) for p in paths], Path(out)
    _check_out(out, paths)
    names = [str(p) for p in paths]
    parts = [load_scores(p) for p in paths]
    check_same_settings([_unsharded(s.meta, ("shard", "indices")) for s in parts], names)
    base = parts[0].meta
    size = _one_size([s.meta.get("dataset_size") for s in parts], names)
    selection = select_indices(size, int(base["skip"]), int(base["max"]))
    shards = [parse_shard(s.meta.get("shard")) for s in parts]
    check_partition([s.idx.tolist() for s in parts], names, [k.select(selection) if k else selection for k in shards],
                    selection, [str(k) if k else None for k in shards])
    order = np.argsort(np.concatenate([s.idx for s in parts]), kind="stable")

    def stack(name):
        return np.concatenate([getattr(s, name) for s in parts])[order]

    meta = dict(_unsharded(base, ("shard", "indices")), indices=[int(i) for i in selection])
    save_npz_atomic(out, idx=stack("idx"), label=stack("label"), select=stack("select"), estimate=stack("estimate"),
                    meta=np.asarray(json.dumps(meta)))
    return meta


def _one_size(sizes: Sequence, names: Sequence[str]) -> int:
    if len(set(sizes)) != 1 or sizes[0] is None:
        raise DataError(f"{names[0]}: the parts do not record one data set size (written by an older version?); "
                        "re-run the shards with this version")
    return int(sizes[0])


def merge_files(paths: Sequence[str | os.PathLike], out: str | os.PathLike, *, command: str = "") -> str:
    """Merge shards of any kind: result TSVs, labels or router-scores .npz files (by the first part's
    format). Returns a short summary for the log."""
    first = Path(paths[0])
    if first.suffix != ".npz":
        meta = merge_results(paths, out, command=command)
        return f"{meta['selection']['selected']} rows"
    try:
        with np.load(first, allow_pickle=False) as archive:
            fmt = json.loads(str(archive["meta"])).get("format")
    except (OSError, KeyError, ValueError) as exc:
        raise DataError(f"{first}: not a labels or router-scores file ({exc})") from None
    from .calibrate import SCORES_FORMAT
    from .labels import FORMAT

    if fmt == FORMAT:
        return f"{len(merge_label_shards(paths, out, command=command).indices)} labelled images"
    if fmt == SCORES_FORMAT:
        return f"{len(merge_score_shards(paths, out, command=command)['indices'])} scored images"
    raise DataError(f"{first}: format {fmt!r} is neither labels nor router scores")
