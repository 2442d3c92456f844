"""CLI commands of router calibration: ``router-scores``, ``calibrate-router`` and ``compose``.

Registered in :mod:`router.cli` through ``_PLUGIN_COMMANDS``. See :mod:`router.calibrate`.
"""

from __future__ import annotations

import time
from pathlib import Path

import click

from dualrs_route.export.engines import ENGINES

from .common import command_line as _command_line, progress
from .scale import chunk_source, with_scale_options


@click.command("router-scores")
@click.option("--router", required=True, metavar="REF", help="Router folder (its raw logits are stored).")
@click.option("--dataset", default="digits", show_default=True, help="digits, cifar10 (with --data) or npz:PATH.")
@click.option("--data", default=None, metavar="PATH", help="Data location for --dataset cifar10.")
@click.option("--split", type=click.Choice(["train", "test"]), default="test", show_default=True)
@click.option("--skip", type=click.IntRange(min=1), default=1, show_default=True, help="Use every skip-th example.")
@click.option("--max", "max_index", type=int, default=-1, show_default=True, help="Stop before this index (-1: all).")
@click.option("--router-N0", "n0", type=click.IntRange(min=1), default=100, show_default=True,
              help="Router selection samples (as certify's --router-N0).")
@click.option("--router-N", "n", type=click.IntRange(min=1), default=10_000, show_default=True,
              help="Router estimation samples (as certify's --router-N).")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="The certify --seed whose noise streams to replay.")
@click.option("--batch", type=click.IntRange(min=1), default=400, show_default=True)
@click.option("--chunk", type=click.IntRange(min=1), default=10, show_default=True,
              help="Images per saved part (resume granularity).")
@click.option("--device", default="cpu", show_default=True)
@click.option("--engine", type=click.Choice([e for e in ENGINES if e != "tensorrt"]), default="auto",
              show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="torch/ORT intra-op threads (with --ray: per worker, default 1).")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Scores file (.npz) to write or resume.")
@with_scale_options
@click.option("--quiet", is_flag=True, help="No progress bar.")
def router_scores_command(router, dataset, data, split, skip, max_index, n0, n, seed, batch, chunk, device, engine,
                          threads, out, shard, ray_address, workers, gpus_per_worker, quiet):
    """Store a router's logits on every noisy copy that dual CERTIFY would draw for it.

    The file feeds `calibrate-router` (held-out images) and `compose` (evaluation images).
    Logits are raw: a router's own logit_offsets are not applied. Resumable: parts are saved
    every --chunk images in OUT.parts/. The file holds float32 logits, images x (N0 + N) x
    experts x 4 bytes (500 images at N = 10,000 with 3 experts: 61 MB), assembled in memory at
    the end. With --shard K/N it scores the K-th of N round-robin parts of the selected
    images; join the parts with `dualrs-route merge`. With --ray the chunks go to Ray workers
    (each loads the router once) and this process writes them in order: the file of a
    one-process run.
    """
    from dualrs_route.experts.data import check_images, load_dataset, select_indices
    from dualrs_route.experts.folders import load_folder

    from dualrs_route.router.calibrate import ScoresJob, collect_scores
    from dualrs_route.router.labels import LocalChunks

    pool = chunk_source(ray_address, workers, gpus_per_worker, threads)
    if threads and pool is None:
        import torch

        torch.set_num_threads(threads)
    folder = load_folder(router, expected_kind="router")
    ds = load_dataset(dataset, split=split, data=data)
    indices = select_indices(len(ds), skip, max_index)
    if shard:
        indices = shard.select(indices)
    check_images(ds, indices, folder.config.input_shape)
    job = ScoresJob(folder, n0=n0, n=n, seed=seed, batch=batch, engine=engine, device=device,
                    threads=threads if pool is None else threads or 1)
    source = pool(job) if pool else LocalChunks(job.build())
    try:
        engine_info = source.engines
        settings = {"router": folder.fingerprint(engine_info["engine"], engine_info.get("precision", "fp32"))["sha256"],
                    "split": split, "data": data, "skip": skip, "max": max_index, "dataset_size": len(ds),
                    **({"shard": str(shard)} if shard else {}),
                    "engine": {k: engine_info.get(k) for k in ("engine", "precision", "noise")}}
        collect_scores(None, ds.batch, [int(ds.labels[i]) for i in indices], indices, sigma=folder.config.sigma,
                       n0=n0, n=n, seed=seed, out=out, settings=settings, chunk=chunk,
                       progress=progress("router scores", quiet), source=source)
    finally:
        source.close()
    click.echo(f"router scores: {out} ({len(indices)} images, N0 = {n0}, N = {n}, sigma_e = {folder.config.sigma})",
               err=True)


def _grid_option(value: str) -> tuple[float, float, float]:
    try:
        start, stop, step = (float(v) for v in value.split(":"))
    except ValueError:
        raise click.BadParameter(f"expected START:STOP:STEP, got {value!r}") from None
    if not (step > 0 and stop >= start):
        raise click.BadParameter(f"needs START <= STOP and STEP > 0, got {value!r}")
    return start, stop, step


def _load_stages(router, scores_path, expert_results):
    from dualrs_route.router.dual import load_router_set

    from dualrs_route.router.calibrate import check_expert_order, check_scores_router, load_expert_stage, load_scores

    folder, experts = load_router_set(router)
    scores = load_scores(scores_path)
    check_scores_router(scores, folder)
    if len(expert_results) != len(experts):
        raise click.BadParameter(f"{folder.reference} routes to {len(experts)} experts; give one --expert-results "
                                 f"file per expert, in its order ({len(expert_results)} given)",
                                 param_hint="--expert-results")
    stages = [load_expert_stage(path, scores) for path in expert_results]
    check_expert_order(stages, experts)
    return folder, experts, scores, stages


def _summary_line(name: str, result: dict, num_experts: int, radii=(0.0, 0.5, 1.0)) -> str:
    import numpy as np

    from dualrs_route.router.calibrate import acr

    good = result["correct"] == 1
    accs = " ".join(f"r={r:g}: {100 * np.mean(good & (result['radius'] >= r)):.1f}%" for r in radii)
    routes = np.bincount(result["expert"] + 1, minlength=num_experts + 1)
    return (f"{name}: ACR {acr(result):.4f}, {accs}, abstain {100 * np.mean(result['predict'] == -1):.1f}%, "
            f"router abstains {int(routes[0])}, routes {routes[1:].tolist()}")


def _replay_options(router_help: str, scores_help: str):
    """The options shared by calibrate-router and compose: router, scores, expert results, alpha split."""
    options = [
        click.option("--router", required=True, metavar="REF", help=router_help),
        click.option("--scores", "scores_path", required=True, type=click.Path(exists=True, dir_okay=False),
                     help=scores_help),
        click.option("--expert-results", multiple=True, required=True, type=click.Path(exists=True, dir_okay=False),
                     help="`certify --expert` TSV of each router expert on the same images, same seed, in the "
                          "router's order."),
        click.option("--alpha", type=float, default=0.001, show_default=True,
                     help="Total failure probability (as certify)."),
        click.option("--alpha-router", type=float, default=None, help="Router's share beta (default: alpha / 2)."),
    ]

    def wrap(f):
        for option in reversed(options):
            f = option(f)
        return f

    return wrap


@click.command("calibrate-router")
@_replay_options("Trained router folder (no offsets yet).",
                 "`router-scores` of this router on held-out images (never the evaluation images).")
@click.option("--grid", default="-3:3:0.25", show_default=True, help="Offset grid START:STOP:STEP (refined by 5x).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Calibrated router folder to write.")
@click.option("--force", is_flag=True, help="Replace an existing folder.")
@click.option("--quiet", is_flag=True)
def calibrate_router_command(router, scores_path, expert_results, alpha, alpha_router, grid, out, force, quiet):
    """Choose per-expert logit offsets for a router by its simulated dual ACR on held-out images.

    Writes a copy of the router whose config.json carries `logit_offsets` (added to its logits
    before the argmax, by every engine) and a `calibration` record. Prints the held-out ACR
    before and after, and a split-half check (offsets fitted on one half, scored on the other).
    """
    import hashlib

    import numpy as np

    from dualrs_route.router.dual import split_alpha

    from dualrs_route.router.calibrate import acr, constant_routers, fit_offsets, simulate, write_calibrated_router

    grid_values = _grid_option(grid)
    folder, experts, scores, stages = _load_stages(router, scores_path, expert_results)
    if folder.config.logit_offsets is not None:
        raise click.UsageError(f"{folder.reference} already has logit_offsets {list(folder.config.logit_offsets)}; "
                               "calibrate the uncalibrated router")
    a, beta = split_alpha(alpha, alpha_router)
    started = time.time()
    offsets, ranked = fit_offsets(scores, stages, alpha=a, beta=beta, grid=grid_values,
                                  progress=progress("offsets", quiet))
    zero = simulate(scores, stages, np.zeros(len(stages)), alpha=a, beta=beta)
    best = simulate(scores, stages, offsets, alpha=a, beta=beta)
    halves = {}
    for name, fit_rows, test_rows in (("even->odd", slice(0, None, 2), slice(1, None, 2)),
                                      ("odd->even", slice(1, None, 2), slice(0, None, 2))):
        rows_fit = np.arange(len(scores.idx))[fit_rows]
        rows_test = np.arange(len(scores.idx))[test_rows]
        half_offsets, _ = fit_offsets(scores, stages, alpha=a, beta=beta, grid=grid_values, rows=rows_fit)
        zero_t = acr({k: v[rows_test] for k, v in zero.items()})
        fitted_t = acr({k: v[rows_test] for k, v in simulate(scores, stages, half_offsets, alpha=a, beta=beta).items()})
        halves[name] = {"offsets": [round(float(v), 6) for v in half_offsets], "acr_zero": round(zero_t, 6),
                        "acr_fitted": round(fitted_t, 6)}
    singles = {name: acr(result) for name, result in constant_routers(scores, stages, alpha=a, beta=beta).items()}
    digest = hashlib.sha256(Path(scores_path).read_bytes()).hexdigest()
    record = {
        "command": _command_line(), "method": "grid search of per-expert logit offsets on the simulated dual ACR "
        "(router.calibrate)", "scores": {"file": str(scores_path), "sha256": digest, "images": int(len(scores.idx)),
                                       "router_N0": int(scores.select.shape[1]), "router_N": int(scores.estimate.shape[1]),
                                       "dataset": scores.meta.get("dataset"), "split": scores.meta.get("split")},
        "expert_results": [s.path for s in stages], "alpha_expert": a, "alpha_router": beta,
        "grid": list(grid_values), "evaluated": len(ranked),
        "heldout_acr": {"zero_offsets": round(acr(zero), 6), "calibrated": round(acr(best), 6),
                        "constant_router": {k: round(v, 6) for k, v in singles.items()}},
        "split_half": halves, "seconds": round(time.time() - started, 1)}
    path = write_calibrated_router(folder, experts, out, offsets, record, overwrite=force)
    click.echo(_summary_line("held-out, offsets 0", zero, len(stages)))
    click.echo(_summary_line(f"held-out, offsets {[round(float(v), 3) for v in offsets]}", best, len(stages)))
    for name, s in singles.items():
        click.echo(f"held-out, constant router -> {name}: ACR {s:.4f}")
    for name, h in halves.items():
        click.echo(f"split half {name}: offsets {h['offsets']}: ACR {h['acr_zero']:.4f} -> {h['acr_fitted']:.4f}")
    click.echo(f"calibrated router: {path}", err=True)


@click.command("compose")
@_replay_options("Router folder (its logit_offsets are applied).",
                 "`router-scores` of this router's network on the evaluation images.")
@click.option("--router-sets", "set_tau", type=float, default=None, metavar="TAU",
              help="Set-valued router certificates (as certify --router-sets): the top expert plus every expert "
                   "with at least TAU of the router's selection samples.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Results TSV to write (+ .json).")
@click.option("--force", is_flag=True, help="Replace an existing --out.")
def compose_command(router, scores_path, expert_results, alpha, alpha_router, set_tau, out, force):
    """Dual CERTIFY results from stored router scores and the experts' own certificates.

    Gives the rows `certify --router REF --seed S` would write with these noise streams: the
    router stage from the scores (with the router's logit_offsets), the expert stage re-derived
    at alpha from each expert's certificate counts (same seed, so the same expert noise).
    """
    import numpy as np

    from dualrs_route.router.dual import split_alpha

    from dualrs_route.router.calibrate import simulate, write_composed_results

    folder, experts, scores, stages = _load_stages(router, scores_path, expert_results)
    a, beta = split_alpha(alpha, alpha_router)
    offsets = np.asarray(folder.config.logit_offsets or [0.0] * len(stages), dtype=np.float32)
    if set_tau is None:
        result = simulate(scores, stages, offsets, alpha=a, beta=beta)
    else:
        from dualrs_route.router.calibrate import simulate_sets
        from dualrs_route.router.sets import check_tau

        try:
            set_tau = check_tau(set_tau)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--router-sets") from None
        result = simulate_sets(scores, stages, offsets, alpha=a, beta=beta, tau=set_tau)
    write_composed_results(out, scores, result, router=folder, experts=experts, stages=stages, alpha=a, beta=beta,
                           command=_command_line(), overwrite=force, set_tau=set_tau)
    click.echo(_summary_line(f"{out}", result, len(stages)))


@click.command("compose-cascade")
@click.option("--expert-results", multiple=True, required=True, type=click.Path(exists=True, dir_okay=False),
              help="Fixed-N `certify --expert` TSV of each cascade expert (same images, seed, N0 and N); repeat "
                   "it, in the order `certify --expert ... --select cascade` would take the experts.")
@click.option("--alpha", type=float, default=0.001, show_default=True,
              help="Total failure probability of the cascade (any level: the stored counts do not depend on it).")
@click.option("--cascade-p0", "p0", type=float, default=0.5, show_default=True,
              help="Cascade threshold p0 in [0.5, 1).")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Results TSV to write (+ .json).")
@click.option("--force", is_flag=True, help="Replace an existing --out.")
def compose_cascade_command(expert_results, alpha, p0, out, force):
    """Multiscale cascade results from the experts' own certificates, with no new samples.

    Gives the rows `certify --expert A --expert B ... --select cascade --seed S` would write: every
    stage reads the guess and counts its expert's single-expert run drew from the same noise streams
    (router/cascade.py). Only `time` differs: here it sums the stored rows' times over the stages
    that ran.
    """
    from dualrs_route.router.cascade_replay import compose_cascade, load_expert_counts, write_cascade_results

    files = [load_expert_counts(path) for path in expert_results]
    rows = compose_cascade(files, alpha=alpha, p0=p0)
    write_cascade_results(out, files, rows, alpha=alpha, p0=p0, command=_command_line(), overwrite=force)
    certified = [r for r in rows if r["correct"] == 1]
    acr = sum(r["radius"] for r in certified) / max(len(rows), 1)
    stages = [sum(1 for r in rows if r["stage"] == k) for k in range(len(files))]
    click.echo(f"{out}: {len(rows)} images, ACR {acr:.4f}, certified accuracy at r=0 "
               f"{100 * len(certified) / max(len(rows), 1):.1f}%, "
               f"stopping stage counts {stages}")
