"""The ``dualrs-route`` group and its inference commands: certify, predict, analyze, list, import-cohen,
train-expert. The other commands live beside it (training, calibrate, export) and are added in
:mod:`dualrs_route.cli`."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import click

from dualrs_route.export.engines import ENGINES

from .common import Group, command_line, progress, radii_option
from .scale import row_source, scale_options

DEFAULT_ROUTER = "builtin:digits-router"


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="dualrs-route", message="%(prog)s %(version)s")
def main():
    """Certified-robust inference with Dual Randomized Smoothing.

    A smoothed router picks one expert RS classifier per input; the expert is certified with
    standard RS; the final radius is min(R_router, R_expert) at confidence 1 - (alpha + beta).
    """


def _model_options(f):
    options = [
        click.option("--expert", "experts", multiple=True, metavar="REF",
                     help="Expert folder, hf://org/repo[@rev] or builtin:NAME. Repeat with --select best-radius."),
        click.option("--router", default=None, metavar="REF",
                     help=f"Router folder (lists its experts). Default when no --expert: {DEFAULT_ROUTER}."),
        click.option("--dataset", default="digits", show_default=True,
                     help="digits, cifar10 (with --data) or npz:PATH."),
        click.option("--data", default=None, metavar="PATH", help="Data location for --dataset cifar10."),
        click.option("--split", type=click.Choice(["train", "test"]), default="test", show_default=True),
        click.option("--skip", type=click.IntRange(min=1), default=1, show_default=True,
                     help="Certify every SKIP-th example (Cohen's --skip)."),
        click.option("--max", "max_index", type=int, default=-1, show_default=True,
                     help="Stop before this example index; -1 for all (Cohen's --max)."),
        click.option("--alpha", type=float, default=0.001, show_default=True,
                     help="Total failure probability (split evenly between router and expert, or over the "
                          "stages of --select cascade)."),
        click.option("--alpha-router", type=float, default=None,
                     help="Router's share beta of --alpha; the expert gets the rest."),
        click.option("--router-N", "router_n", type=int, default=None, help="Router's N (default: --N; at most 10^9)."),
        click.option("--batch", type=click.IntRange(min=1), default=400, show_default=True,
                     help="Noisy samples per forward pass (does not change results). At most 4 GiB of float32 noise "
                          "(batch x C x H x W x 4 bytes)."),
        click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True),
        click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:1, ..."),
        click.option("--engine", type=click.Choice(ENGINES), default="auto", show_default=True),
        click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16", "int8"]), default="fp32",
                     show_default=True, help="Precision the networks run in (certificates hold for that network)."),
        click.option("--threads", type=click.IntRange(min=1), default=None,
                     help="torch/ORT intra-op threads (with --ray: per worker, default 1)."),
        click.option("--compile", "compile_", is_flag=True,
                     help="torch engine: run the networks through torch.compile (inductor; compiles once, tens of "
                          "seconds; fastest CPU path with --precision bf16)."),
        click.option("--sigma", type=float, default=None,
                     help="Override a single expert's noise level (default: its config's sigma)."),
        click.option("--out", type=click.Path(dir_okay=False), default=None,
                     help="Results TSV (+ .json sidecar). Re-running with the same --out resumes."),
        *scale_options(),
        click.option("--format", "fmt", type=click.Choice(["markdown", "json"]), default="markdown",
                     show_default=True, help="Format of the summary printed at the end."),
        click.option("--quiet", is_flag=True, help="No progress bar."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _run(task: str, *, experts, router, select, dataset, data, split, skip, max_index, n0, n, alpha, alpha_router,
         router_n0, router_n, batch, seed, device, engine, precision, threads, compile_, sigma, out, fmt, quiet,
         shard, ray_address, workers, gpus_per_worker, cascade_p0=None, sequential=False, target_radius=None,
         radius_tol=None, first_look=None, radius_grid=None, max_radius=None, look_ratio=None, final_share=None,
         projection_level=None, share_noise=False, router_sets=None):
    from dualrs_route.experts.data import load_dataset

    from dualrs_route.router.results import read_results, summarize, format_markdown
    from dualrs_route.router.run import execute, plan_run

    if sigma is not None and sigma <= 0:
        raise click.BadParameter(f"must be > 0, got {sigma}", param_hint="--sigma")
    if not (0.0 < alpha < 1.0):
        raise click.BadParameter(f"must be in (0, 1), got {alpha}", param_hint="--alpha")
    if n0 is not None and n0 < 1:
        raise click.BadParameter(f"must be >= 1, got {n0}", param_hint="--N0")
    if n < 1:
        raise click.BadParameter(f"must be >= 1, got {n}", param_hint="--N")
    rows = row_source(ray_address, workers, gpus_per_worker, threads)  # checks the options before any work
    if threads and ray_address is None:
        import torch

        torch.set_num_threads(threads)
    if not experts and not router:
        router = DEFAULT_ROUTER
    plan = plan_run(experts=experts, router=router, select=select, n0=n0 or 1, n=n, alpha=alpha,
                    alpha_router=alpha_router, router_n0=router_n0, router_n=router_n, seed=seed, engine=engine,
                    precision=precision, device=device, batch=batch, sigma=sigma, cascade_p0=cascade_p0,
                    sequential=sequential, target_radius=target_radius, radius_tol=radius_tol, first_look=first_look,
                    radius_grid=radius_grid, max_radius=max_radius, look_ratio=look_ratio, final_share=final_share,
                    projection_level=projection_level, share_noise=share_noise, router_sets=router_sets)
    plan.threads = threads
    plan.compile = compile_
    if task == "predict" and plan.mode == "best-radius":
        raise click.UsageError("predict supports --router or a single --expert, not --select best-radius")
    for note in plan.notes:
        click.echo(f"warning: {note}", err=True)
    ds = load_dataset(dataset, split=split, data=data)
    command = command_line()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(out) if out else Path(tmp) / "results.tsv"
        if out and Path(out).is_dir():
            raise click.BadParameter(f"{out} is a folder; give a file name", param_hint="--out")
        execute(plan, ds, skip=skip, max_index=max_index, out_path=path, data=data, command=command, task=task,
                progress=progress(task, quiet), shard=shard, rows=rows)
        if task == "certify":
            table = read_results(path)
            table.name = Path(out).name if out else plan.mode
            summary = summarize(table)
            if fmt == "json":
                click.echo(json.dumps(summary, indent=2))
            else:
                click.echo(format_markdown([summary]))
                if summary["samples_per_row"] is not None:
                    click.echo(f"\n{summary['samples_per_row']:.0f} noisy samples per row on average (sequential)")
        else:
            lines = path.read_text().splitlines()[1:]
            rows = [line.split("\t") for line in lines]
            correct = sum(int(r[3]) for r in rows)
            abstain = sum(r[2] == "-1" for r in rows)
            summary = {"count": len(rows), "accuracy": correct / max(len(rows), 1),
                       "abstain_rate": abstain / max(len(rows), 1)}
            click.echo(json.dumps(summary, indent=2) if fmt == "json" else
                       f"predicted {len(rows)} examples: accuracy {100 * summary['accuracy']:.1f}%, "
                       f"abstained {100 * summary['abstain_rate']:.1f}%")
        if out:
            click.echo(f"results: {out} (metadata: {out}.json)", err=True)


@main.command()
@_model_options
@click.option("--select", type=click.Choice(["router", "best-radius", "cascade"]), default=None,
              help="best-radius: certify every --expert and keep the best correct one per example. Uses the "
                   "label: an oracle upper bound for analysis, NOT a certificate. cascade: Multiscale cascaded "
                   "smoothing (Jeong and Shin 2023) over the --expert options from the largest sigma down, "
                   "alpha/K per stage.")
@click.option("--cascade-p0", "cascade_p0", type=float, default=None,
              help="Cascade threshold p0 in [0.5, 1) (default 0.5): a stage decides once its class's lower "
                   "bound reaches p0.")
@click.option("--N0", "n0", type=int, default=100, show_default=True,
              help="Selection samples per stage (at most 10^9).")
@click.option("--N", "n", type=int, default=100_000, show_default=True,
              help="Estimation samples per stage (at most 10^9).")
@click.option("--router-N0", "router_n0", type=int, default=None, help="Router's N0 (default: --N0).")
@click.option("--sequential", is_flag=True,
              help="Draw the estimation samples in rounds (looks growing by --look-ratio from --first-look up to "
                   "--N; --final-share of alpha at the cap, the rest split evenly over the earlier looks) and stop "
                   "once more samples cannot change the answer: abstain "
                   "once the upper bound is below 1/2, stop at --target-radius, or once the radius reachable "
                   "within --N is within --radius-tol (or passes no multiple of --radius-grid). With --router: "
                   "min-aware (the expert stops at R_sigma, the router at the expert's reachable radius).")
@click.option("--target-radius", type=float, default=None, metavar="R",
              help="Decide 'certified at radius R or not' with the fewest samples (implies --sequential).")
@click.option("--radius-tol", type=float, default=None,
              help="Sequential: stop once the radius reachable within --N is at most this much above the "
                   "current one (pixel L2 units; default 0.01; refused with --target-radius).")
@click.option("--radius-grid", type=float, default=None, metavar="STEP",
              help="Sequential, instead of --radius-tol: stop once no multiple of STEP (e.g. 0.25) lies between "
                   "the current radius and the one reachable within --N (refused with --target-radius). "
                   "Certified accuracy at the multiples of STEP stays as if run to the cap up to what "
                   "--projection-level costs (at most 0.4 points in the simulations of benchmarks/RESULTS.md).")
@click.option("--max-radius", type=float, default=None, metavar="R",
              help="Sequential: radii above R are worth nothing to you (e.g. the largest radius you analyse); "
                   "a row stops once certified at R.")
@click.option("--first-look", type=int, default=None, help="Sequential: samples at the first look (default 100).")
@click.option("--share-noise", is_flag=True,
              help="With --router: an expert whose sigma equals the router's sigma_e reads the router stage's noisy "
                   "inputs (selection and estimation streams) instead of drawing its own; same guarantee (union "
                   "bound), fewer noise draws, other rows than without it.")
@click.option("--router-sets", type=float, default=None, metavar="TAU",
              help="With --router: set-valued router certificates for the same routed classifier (router/sets.py). "
                   "Where another expert has at least TAU of the router's selection samples, the row is certified "
                   "with the set S of them: min(R_S, each member's radius), members at alpha/|S|, all agreeing on "
                   "the class; other rows are dual CERTIFY's. Costs |S| expert certifications on such rows.")
@click.option("--look-ratio", type=float, default=None,
              help="Sequential: each look has this many times the previous look's samples (default 1.2; 2 doubles).")
@click.option("--final-share", type=float, default=None,
              help="Sequential: share of each stage's alpha kept for its last look, the cap (default 0.7; 0 splits "
                   "alpha evenly over the looks).")
@click.option("--projection-level", type=float, default=None,
              help="With --radius-grid: a row stops once the cap, with the remaining samples hitting at the "
                   "(1 - LEVEL) upper confidence bound, could not reach the next grid radius (default 0.05; 0 "
                   "turns it off: then a grid stop costs a row's accuracy with probability <= 2 alpha). A sampling "
                   "rule only: the certificate's guarantee does not depend on it.")
def certify(**options):
    """Certify examples with a router (Dual RS), a single expert (Cohen's CERTIFY) or a Multiscale cascade.

    Writes one TSV row per example (idx label predict radius correct time, then routing
    columns; with --sequential also n_used n_router_used n_expert_used stop), resumes an
    interrupted --out, and prints a certified-accuracy table.
    With no --expert/--router it certifies the digits test split with the bundled demo router.
    """
    _run("certify", **options)


@main.command()
@_model_options
@click.option("--N", "n", type=int, default=100_000, show_default=True, help="Samples per stage (at most 10^9).")
def predict(**options):
    """Cohen's PREDICT (abstains unless a binomial test separates the top two classes).

    With a router: route with PREDICT at beta (default alpha/2), then predict with the expert at alpha/2.
    """
    _run("predict", select=None, n0=None, router_n0=None, **options)


def _plot_path_option(ctx, param, value):
    """click callback of analyze --plot: the suffix names the image format."""
    if value is None:
        return None
    from dualrs_route.router.plot import check_plot_path

    try:
        return check_plot_path(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


@main.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--radii", default="0,0.25,0.5,0.75,1.0,1.25,1.5", show_default=True, callback=radii_option,
              help="Comma-separated radii.")
@click.option("--oracle/--no-oracle", default=None,
              help="Add the best-expert-per-example row (default: when two or more single-expert files are given).")
@click.option("--format", "fmt", type=click.Choice(["markdown", "json"]), default="markdown", show_default=True)
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None, callback=_plot_path_option,
              metavar="IMAGE", help="Also draw certified accuracy against radius into IMAGE (.png, .pdf or .svg): "
                                    "one line per file, plus the envelope and oracle. Needs "
                                    "`pip install 'dualrs-route[plot]'`.")
def analyze(files, radii, oracle, fmt, plot_path):
    """Certified accuracy at each radius, abstain rate and ACR of result TSVs (ours or Cohen et al.'s).

    Certified accuracy at r is the fraction of rows with correct = 1 and radius >= r.
    Given several single-expert files it adds the envelope (best single expert at each
    radius) and the oracle (best expert per example), and for router files the share of
    the oracle's gain over the envelope that the router captures.
    """
    from dualrs_route.router.results import load_tables, report_from_tables

    tables = load_tables(list(files))
    report = report_from_tables(tables, radii, oracle=oracle)
    if plot_path is not None:  # before printing, so a missing matplotlib leaves one error line
        from dualrs_route.router.plot import plot_tables

        plot_tables(tables, plot_path, oracle=oracle)
    click.echo(json.dumps(report, indent=2) if fmt == "json" else report["markdown"])
    if plot_path is not None:
        click.echo(f"wrote {plot_path}", err=True)


@main.group("experts")
def experts_group():
    """Manage expert folders."""


@experts_group.command("list")
def experts_list():
    """List the built-in demo models (use them as builtin:NAME)."""
    from dualrs_route.experts.folders import builtin_names, load_folder

    for name in builtin_names():
        cfg = load_folder("builtin:" + name).config
        click.echo(f"builtin:{name}\t{cfg.kind}\tsigma={cfg.sigma}\t{cfg.architecture}")


@experts_group.command("import-cohen")
@click.argument("checkpoint", type=click.Path(exists=True, dir_okay=False))
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--sigma", type=float, required=True, help="Noise level the checkpoint was trained with.")
@click.option("--dataset", type=click.Choice(["cifar10"]), default="cifar10", show_default=True)
@click.option("--arch", default=None, help="Architecture (default: the checkpoint's 'arch' entry).")
@click.option("--force", is_flag=True, help="Replace an existing folder.")
def import_cohen(checkpoint, out_dir, sigma, dataset, arch, force):
    """Convert a Cohen et al. checkpoint (checkpoint.pth.tar) into a safetensors expert folder.

    The pickle is loaded with torch.load(weights_only=True): no code from it runs.
    """
    from dualrs_route.experts.cohen import import_cohen_checkpoint

    if sigma <= 0:
        raise click.BadParameter(f"must be > 0, got {sigma}", param_hint="--sigma")
    path = import_cohen_checkpoint(checkpoint, out_dir, sigma=sigma, dataset=dataset, arch=arch, overwrite=force)
    click.echo(f"wrote {path}")


@main.command("train-expert")
@click.option("--dataset", default="digits", show_default=True)
@click.option("--data", default=None)
@click.option("--sigma", type=float, required=True, help="Gaussian augmentation noise level.")
@click.option("--arch", default=None, help="Architecture (default: small_cnn for digits, cifar_resnet20 for cifar10).")
@click.option("--arch-args", default="{}", help="JSON dict of architecture arguments.")
@click.option("--epochs", type=click.IntRange(min=1), default=30, show_default=True)
@click.option("--batch", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--lr", type=float, default=0.1, show_default=True)
@click.option("--weight-decay", type=float, default=5e-4, show_default=True)
@click.option("--fraction", type=click.FloatRange(0, 1, min_open=True), default=1.0, show_default=True,
              help="Train on this fraction of the training split (a fixed random subset).")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=None)
@click.option("--precision", type=click.Choice(["fp32", "bf16"]), default="fp32", show_default=True,
              help="bf16: torch.autocast on the CPU with fp32 master weights (fast only where the CPU has "
                   "AVX-512 BF16 or AMX).")
@click.option("--consistency", type=click.FloatRange(min=0), default=0.0, show_default=True, metavar="LAMBDA",
              help="Consistency regularisation (Jeong and Shin 2020) with this lambda (paper: 10-20); 0: plain "
                   "Gaussian augmentation.")
@click.option("--eta", type=click.FloatRange(min=0), default=0.5, show_default=True,
              help="Entropy weight of the consistency loss.")
@click.option("--copies", type=click.IntRange(min=2), default=2, show_default=True,
              help="Noisy copies per image for the consistency loss (m).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Expert folder to write.")
@click.option("--force", is_flag=True, help="Replace an existing model folder.")
@click.option("--quiet", is_flag=True)
def train_expert(dataset, data, sigma, arch, arch_args, epochs, batch, lr, weight_decay, fraction, seed, threads,
                 precision, consistency, eta, copies, out, force, quiet):
    """Train an expert at noise level --sigma.

    Gaussian data augmentation (Cohen et al.) by default; --consistency LAMBDA adds Jeong and
    Shin's consistency regularisation over --copies noisy copies. Checkpoints every epoch to
    OUT/checkpoint.pt; re-running the same command resumes.
    """
    from dualrs_route.experts.training import train_expert as run_training

    if sigma <= 0:
        raise click.BadParameter(f"must be > 0, got {sigma}", param_hint="--sigma")
    try:
        parsed_args = json.loads(arch_args)
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"not JSON: {exc}", param_hint="--arch-args") from None
    command = command_line()
    path = run_training(dataset=dataset, data=data, sigma=sigma, arch=arch, arch_args=parsed_args, epochs=epochs,
                        batch=batch, lr=lr, weight_decay=weight_decay, fraction=fraction, seed=seed, threads=threads,
                        precision=precision, consistency=consistency, eta=eta, copies=copies,
                        out=out, overwrite=force, command=command, log=None if quiet else click.echo)
    click.echo(f"wrote {path}")


@main.command("demo")
@click.option("--router", default=DEFAULT_ROUTER, show_default=True, metavar="REF",
              help="Router whose experts are compared (each alone, as a cascade, and routed).")
@click.option("--dataset", default="digits", show_default=True, help="digits, cifar10 (with --data) or npz:PATH.")
@click.option("--data", default=None, metavar="PATH", help="Data location for --dataset cifar10.")
@click.option("--skip", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--max", "max_index", type=int, default=-1, show_default=True)
@click.option("--N0", "n0", type=click.IntRange(min=1), default=100, show_default=True)
@click.option("--N", "n", type=click.IntRange(min=1), default=2000, show_default=True)
@click.option("--alpha", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.001, show_default=True,
              help="Total failure probability of every row.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--out-dir", type=click.Path(file_okay=False), default="runs/demo", show_default=True,
              help="One results TSV per row; re-running resumes them.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def demo(router, dataset, data, skip, max_index, n0, n, alpha, seed, out_dir, quiet):
    """Certify a dataset with each expert alone, the Multiscale cascade over them and the router,
    and print their certified accuracy side by side, with the envelope of the single experts and
    the oracle (best expert per example: an upper bound, not a certificate)."""
    from dualrs_route.api import run_dataset
    from dualrs_route.router.dual import load_router_set
    from dualrs_route.router.results import load_tables, report_from_tables

    _, experts = load_router_set(router)
    out = Path(out_dir)
    common = dict(dataset=dataset, data=data, skip=skip, max_index=max_index, n0=n0, n=n, alpha=alpha, seed=seed,
                  command=command_line())
    refs = [str(f.path) for f in experts]  # the router lists them relative to its own folder
    runs = [(f"expert-{f.config.sigma:g}", dict(experts=[ref])) for f, ref in zip(experts, refs)]
    runs += [("cascade", dict(experts=refs, select="cascade")),
             ("router", dict(router=router))]
    paths = []
    for name, spec in runs:
        path = out / f"{name}.tsv"
        run_dataset(out=path, progress=progress(name, quiet), **spec, **common)
        paths.append(str(path))
    report = report_from_tables(load_tables(paths))
    click.echo(report["markdown"])
