"""CLI commands of the training side: ``labels``, ``train-router`` and ``router-report``.

Registered in :mod:`router.cli` through ``_PLUGIN_COMMANDS``; the group turns library
errors (DualRSError) into one-line messages with exit code 1 and bad values into exit code 2.
"""

from __future__ import annotations

import contextlib
import json
import sys

import click

from dualrs_route.export.engines import ENGINES

from .common import command_line as _command_line, positive_float as _positive_float
from .scale import chunk_source, with_scale_options

from dualrs_route.router.labels import DEFAULT_ALPHA, DEFAULT_CHUNK, DEFAULT_N, DEFAULT_N0


@click.command("labels")
@click.option("--expert", "experts", multiple=True, required=True, metavar="REF",
              help="Expert folder, hf://org/repo[@rev] or builtin:NAME; repeat for each of the K >= 2 experts, in "
                   "router-class order.")
@click.option("--dataset", default="digits", show_default=True, help="digits, cifar10 (with --data) or npz:PATH.")
@click.option("--data", default=None, metavar="PATH", help="Data location for --dataset cifar10.")
@click.option("--split", type=click.Choice(["train", "test"]), default="train", show_default=True)
@click.option("--N0", "n0", type=click.IntRange(min=1), default=DEFAULT_N0, show_default=True,
              help="Selection samples per image and expert.")
@click.option("--N", "n", type=click.IntRange(min=1), default=DEFAULT_N, show_default=True,
              help="Estimation samples per image and expert (the paper uses 100 for labels).")
@click.option("--alpha", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=DEFAULT_ALPHA,
              show_default=True, help="Failure probability of each expert's label certificate.")
@click.option("--max", "max_images", type=click.IntRange(min=1), default=None,
              help="Label only the first MAX images of the split.")
@click.option("--fraction", type=click.FloatRange(0, 1, min_open=True), default=None,
              help="Label a fixed random fraction of the split (chosen with --seed); the paper: 0.2 loses little.")
@click.option("--start", type=click.IntRange(min=0), default=0, show_default=True,
              help="Skip the images before this index (e.g. to label held-out images the training labels omit).")
@click.option("--batch", type=click.IntRange(min=1), default=400, show_default=True,
              help="Noisy samples per forward pass (does not change results).")
@click.option("--chunk", type=click.IntRange(min=1), default=DEFAULT_CHUNK, show_default=True,
              help="Images packed together per expert call and per checkpoint (does not change results).")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:1, ...")
@click.option("--engine", type=click.Choice(ENGINES), default="auto", show_default=True)
@click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16"]), default="fp32", show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="torch intra-op threads (with --ray: per worker, default 1).")
@click.option("--compile", "compile_", is_flag=True,
              help="torch engine: run the experts through torch.compile (fastest CPU path with --precision bf16).")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Labels file (.npz) to write or resume.")
@with_scale_options
@click.option("--quiet", is_flag=True, help="No progress bar.")
def labels_command(experts, dataset, data, split, n0, n, alpha, max_images, fraction, start, batch, chunk, seed, device,
                   engine, precision, threads, compile_, out, shard, ray_address, workers, gpus_per_worker, quiet):
    """Router labels: certify every image with every expert on a cheap budget.

    For each image and expert k: Cohen's CERTIFY with N0/N samples gives R_k, set to 0 when the
    expert abstains or certifies a wrong class. Writes an .npz with indices, labels, radii [n, K],
    predictions [n, K], p_lower [n, K], the experts and the settings. The file is rewritten
    atomically after every chunk; re-running the same command resumes a killed run. With
    --shard K/N it labels the K-th of N round-robin parts of the selected images; join the
    parts with `dualrs-route merge`. With --ray the chunks go to Ray workers (each loads the
    experts once) and this process writes them in order: the file of a one-process run.
    """
    from dualrs_route.experts.data import load_dataset
    from dualrs_route.experts.folders import load_folder

    from dualrs_route.router.labels import compute_labels, label_summary, select_label_indices

    if max_images is not None and fraction is not None:
        raise click.UsageError("pass either --max or --fraction, not both")
    if len(experts) < 2:
        raise click.BadParameter("router labels need at least two experts (repeat --expert)", param_hint="--expert")
    pool = chunk_source(ray_address, workers, gpus_per_worker, threads)
    if threads and pool is None:
        import torch

        torch.set_num_threads(threads)
    folders = [load_folder(ref, expected_kind="expert") for ref in experts]
    ds = load_dataset(dataset, split=split, data=data)
    indices = select_label_indices(len(ds), max_images=max_images, fraction=fraction, seed=seed, start=start)
    selection = {"max": max_images, "fraction": fraction, "start": start}
    if shard:
        indices = shard.select(indices)
        selection["shard"] = str(shard)
    bar = None if quiet else click.progressbar(length=len(indices), label="labels", file=sys.stderr, show_pos=True,
                                               show_eta=True)
    log = None if quiet else (lambda message: click.echo(message, err=True))
    with bar if bar is not None else contextlib.nullcontext():
        result = compute_labels(folders, ds, indices, out=out, n0=n0, n=n, alpha=alpha, seed=seed, batch=batch,
                                chunk=chunk, engine=engine, device=device, precision=precision, compile=compile_,
                                data=data, selection=selection, command=_command_line(),
                                progress=bar.update if bar is not None else None, log=log, workers=pool)
    summary = label_summary(result)
    click.echo(json.dumps(summary, indent=2))
    click.echo(f"labels: {out} ({summary['images']} images, {result.meta.get('seconds', 0):.0f} s)", err=True)


@click.command("train-router")
@click.option("--labels", "labels_files", required=True, multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="Labels file from `dualrs-route labels`; repeat to train on several files of disjoint images.")
@click.option("--expert", "experts", multiple=True, required=True, metavar="REF",
              help="The labels file's experts, in the same order (checked by weight hash and sigma).")
@click.option("--arch", default=None, help="Router architecture (default: small_cnn).")
@click.option("--arch-args", default=None,
              help="JSON dict of architecture arguments (default for 32x32 inputs: "
                   "{\"channels\": [32, 64, 128], \"hidden\": 128}).")
@click.option("--init", default=None, metavar="REF",
              help="Start from this model's weights (e.g. the largest-sigma expert): every layer but the last, or "
                   "all of it as the base of --arch confidence_head; --arch defaults to its architecture.")
@click.option("--sigma-e", "sigma_e", type=float, default=None,
              help="Router noise level sigma_e (default: the largest expert sigma).")
@click.option("--epochs", type=click.IntRange(min=1), default=90, show_default=True)
@click.option("--batch", type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--lr", type=float, default=0.01, show_default=True, help="AdamW learning rate (halved at 1/3 and 2/3).")
@click.option("--weight-decay", type=float, default=0.01, show_default=True)
@click.option("--lambda", "lam", type=float, default=40.0, show_default=True, help="Consistency (KL) weight.")
@click.option("--eta", type=float, default=0.5, show_default=True, help="Entropy weight.")
@click.option("--temperature", type=float, default=1.0, show_default=True,
              help="Soft labels softmax(R / T); T = 1 is the paper's exp(R_k) rule, smaller T is sharper.")
@click.option("--class-balance/--no-class-balance", "balance", default=True, show_default=True,
              help="Weight each image by 1/q_k of its best expert k (the paper's rule).")
@click.option("--regret-weights", "regret", is_flag=True,
              help="Also weight each image by its radius spread max_k R_k - min_k R_k (normalised to mean 1): "
                   "the radius a wrong choice can lose there.")
@click.option("--augment/--no-augment", default=None, help="Random crop + flip (default: on for 32x32 RGB).")
@click.option("--data", default=None, metavar="PATH", help="Data location (default: the one in the labels file).")
@click.option("--holdout", default=None, type=click.Path(exists=True, dir_okay=False),
              help="Labels file of held-out images: report routing accuracy and dR on it after training.")
@click.option("--report-N", "report_n", type=click.IntRange(min=1), default=100, show_default=True,
              help="Noisy samples per held-out image for the router's choice in the report.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=None)
@click.option("--device", default="cpu", show_default=True,
              help="Where the router trains: cpu, cuda, cuda:1, ... (GPU noise differs from CPU noise for a seed).")
@click.option("--precision", type=click.Choice(["fp32", "bf16"]), default="fp32", show_default=True,
              help="bf16: CPU autocast with fp32 master weights (fast where the CPU has avx512_bf16 or AMX).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Router folder to write.")
@click.option("--force", is_flag=True, help="Replace an existing model folder.")
@click.option("--quiet", is_flag=True)
def train_router_command(labels_files, experts, arch, arch_args, init, sigma_e, epochs, batch, lr, weight_decay, lam, eta,
                         temperature, balance, regret, augment, data, holdout, report_n, seed, threads, device, precision,
                         out, force, quiet):
    """Train a Dual RS router on a labels file and write a router folder.

    Soft labels softmax(R), class weights 1/q_k, and the consistency loss
    lambda * KL(mean || copy) + eta * H(mean) over two Gaussian copies at sigma_e; AdamW.
    Checkpoints every epoch to OUT/checkpoint.pt; re-running the same command resumes.
    """
    from dualrs_route.router.training import train_router

    _positive_float("--sigma-e", sigma_e)
    _positive_float("--lr", lr)
    _positive_float("--weight-decay", weight_decay, allow_zero=True)
    _positive_float("--lambda", lam, allow_zero=True)
    _positive_float("--eta", eta, allow_zero=True)
    _positive_float("--temperature", temperature)
    parsed = None
    if arch_args is not None:
        try:
            parsed = json.loads(arch_args)
        except json.JSONDecodeError as exc:
            raise click.BadParameter(f"not JSON: {exc}", param_hint="--arch-args") from None
        if not isinstance(parsed, dict):
            raise click.BadParameter("must be a JSON object", param_hint="--arch-args")
    path = train_router(labels=list(labels_files), experts=experts, out=out, arch=arch, arch_args=parsed, init=init,
                        sigma_e=sigma_e,
                        epochs=epochs, batch=batch, lr=lr, weight_decay=weight_decay, lam=lam, eta=eta,
                        temperature=temperature, balance=balance, seed=seed,
                        data=data, augment=augment, threads=threads, holdout=holdout, report_n=report_n,
                        overwrite=force, command=_command_line(), device=device, precision=precision, regret=regret,
                        log=None if quiet else click.echo)
    click.echo(f"wrote {path}")


@click.command("router-report")
@click.option("--router", default=None, metavar="REF", help="Router folder to evaluate on --holdout.")
@click.option("--holdout", default=None, type=click.Path(exists=True, dir_okay=False),
              help="Labels file of held-out images (same experts as the router).")
@click.option("--results", default=None, type=click.Path(exists=True, dir_okay=False),
              help="Results TSV of `certify --router`: how often R_sigma < R_c.")
@click.option("--N", "n", type=click.IntRange(min=1), default=100, show_default=True,
              help="Noisy samples per image for the router's choice.")
@click.option("--data", default=None, metavar="PATH", help="Data location (default: the one in the labels file).")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True)
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:1, ...")
def router_report_command(router, holdout, results, n, data, seed, fmt, device):
    """Routing diagnostics: radius lost to routing (dR = R* - R_routed) and the router bottleneck.

    With --router and --holdout: routing accuracy against the best expert and quantiles/ECDF of dR
    at the labels' budget. With --results: the share of examples where R_sigma < R_c.
    """
    from dualrs_route.router.labels import load_labels
    from dualrs_route.router.training import bottleneck_report, format_report, routing_report_for_folder

    if (router is None) != (holdout is None):
        raise click.UsageError("--router and --holdout go together")
    if router is None and results is None:
        raise click.UsageError("nothing to report: pass --router with --holdout, and/or --results")
    report = {}
    if router is not None:
        report["routing"] = routing_report_for_folder(router, load_labels(holdout, require_complete=True), n=n,
                                                      seed=seed, data=data, device=device)
    if results is not None:
        report["bottleneck"] = bottleneck_report(results)
    click.echo(json.dumps(report, indent=2) if fmt == "json" else format_report(report))
