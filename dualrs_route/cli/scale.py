"""Scaling out on the command line: ``--shard K/N``, ``--ray [ADDRESS]`` / ``--workers`` /
``--gpus-per-worker`` for certify, predict, labels and router-scores, and the ``merge`` command."""

from __future__ import annotations

import functools

import click

from .common import command_line


def _shard_option(ctx, param, value):
    """click callback of --shard: ``K/N`` -> Shard."""
    from dualrs_route.router.shards import parse_shard

    try:
        return parse_shard(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc).removeprefix("--shard ")) from None


def shard_option():
    return click.option("--shard", default=None, metavar="K/N", callback=_shard_option,
                        help="Run only the K-th of N disjoint parts of the selected examples (round-robin: the "
                             "K-th, K+N-th, ... selected example); join the N parts with `dualrs-route merge`.")


def scale_options() -> list:
    """The options of certify, predict, labels and router-scores that split a run: a shard of it, or Ray
    workers."""
    return [
        shard_option(),
        click.option("--ray", "ray_address", is_flag=False, flag_value="local", default=None, metavar="[ADDRESS]",
                     help="Spread the examples over Ray workers: alone, a local Ray cluster started for this run; "
                          "with ADDRESS (auto, HOST:PORT or ray://HOST:PORT) an existing cluster. This process "
                          "writes --out. Needs `pip install 'dualrs-route[distributed]'`."),
        click.option("--workers", type=click.IntRange(min=1), default=None,
                     help="With --ray: number of workers (Ray actors, each loads the models once). Default 2."),
        click.option("--gpus-per-worker", type=click.FloatRange(min=0), default=None,
                     help="With --ray: GPUs per worker (default 1 with --device cuda, else 0; 0.5 puts two "
                          "workers on each GPU)."),
    ]


def row_source(ray_address: str | None, workers: int | None, gpus_per_worker: float | None, threads: int | None):
    """The ``rows`` factory for :func:`dualrs_route.router.run.execute`: None (this process) without
    --ray, else RayRows with the given workers. UsageError for Ray options without --ray."""
    if not _wants_ray(ray_address, workers, gpus_per_worker):
        from dualrs_route.router.run import LocalRows

        return LocalRows
    from dualrs_route.router.distributed import RayRows, import_ray

    import_ray()  # the install hint now, before models load
    return functools.partial(RayRows, address=ray_address, workers=workers or 2, threads=threads or 1,
                             gpus=gpus_per_worker)


def with_scale_options(f):
    """Decorate a command with :func:`scale_options` (parameters shard, ray_address, workers, gpus_per_worker)."""
    for option in reversed(scale_options()):
        f = option(f)
    return f


def _wants_ray(ray_address: str | None, workers: int | None, gpus_per_worker: float | None) -> bool:
    """Whether --ray was given; UsageError for --workers or --gpus-per-worker without it."""
    if ray_address is None and (workers is not None or gpus_per_worker is not None):
        raise click.UsageError("--workers and --gpus-per-worker need --ray")
    return ray_address is not None


def chunk_source(ray_address: str | None, workers: int | None, gpus_per_worker: float | None, threads: int | None):
    """The ``workers`` factory (job -> chunk source) of labels and router-scores: None (this process)
    without --ray, else :class:`~dualrs_route.router.distributed.RayChunks`. UsageError for Ray options
    without --ray; the install hint before any model loads."""
    if not _wants_ray(ray_address, workers, gpus_per_worker):
        return None
    from dualrs_route.router.distributed import RayChunks, import_ray

    import_ray()
    return functools.partial(RayChunks, address=ray_address, workers=workers or 2, threads=threads or 1,
                             gpus=gpus_per_worker)


@click.command("merge")
@click.argument("parts", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--out", required=True, type=click.Path(dir_okay=False),
              help="Merged file to write (must not exist): a results TSV, labels or router-scores .npz.")
def merge_command(parts, out):
    """Join the shards of one run (`certify`/`predict`, `labels` or `router-scores` with --shard K/N).

    Refuses parts with other settings or models, unfinished parts, overlapping parts and a
    missing shard, each with one line naming the file. The merged file has the rows in index
    order, as the unsharded run writes them (result TSVs: identical but for the time column).
    """
    from dualrs_route.router.merge import merge_files

    summary = merge_files(list(parts), out, command=command_line())
    click.echo(f"merged {len(parts)} parts into {out}: {summary}", err=True)
