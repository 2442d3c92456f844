"""Shared pieces of the CLI: the group class that turns library errors into one-line
messages, the progress bar, the recorded command line and option validators."""

from __future__ import annotations

import math
import os
import shlex
import sys
import warnings

import click

from dualrs_route.experts.errors import DualRSError, output_error


def command_line() -> str:
    """The command as typed, for run records: ``dualrs-route ARGS...``."""
    return "dualrs-route " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def positive_float(name: str, value: float | None, *, allow_zero: bool = False) -> None:
    """Raise BadParameter unless ``value`` is None or a finite number > 0 (>= 0 with ``allow_zero``)."""
    if value is None:
        return
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        raise click.BadParameter(f"must be a finite number {'>= 0' if allow_zero else '> 0'}, got {value}",
                                 param_hint=name)


def _fail(exc: Exception):
    raise click.ClickException(" ".join(str(exc).split("\n")[0].split()) if not isinstance(exc, DualRSError)
                               else str(exc)) from None


class Group(click.Group):
    """Turns library errors into clean messages (no tracebacks) for every sub-command: a
    :class:`DualRSError` or an OSError (disk full, read-only, ...) is one line and exit code 1,
    a ValueError from a library check is a usage error (exit code 2)."""

    def invoke(self, ctx):
        if os.environ.get("DUALRS_ROUTE_DEBUG"):  # full tracebacks, for bug reports
            return super().invoke(ctx)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("default")
                warnings.showwarning = _show_warning
                return super().invoke(ctx)
        except DualRSError as exc:
            _fail(exc)
        except ValueError as exc:  # option values rejected by library checks
            raise click.UsageError(str(exc)) from None
        except FileExistsError as exc:
            _fail(exc)
        except OSError as exc:  # an output the library did not wrap (e.g. a model folder's mkdir)
            _fail(output_error(exc.filename2 or exc.filename or "an output", exc))


def _show_warning(message, category, filename, lineno, file=None, line=None):
    click.echo(f"warning: {message}", err=True)


def parse_radii(value: str) -> tuple[float, ...]:
    try:
        radii = tuple(float(v) for v in value.replace(" ", ",").split(",") if v)
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers, got {value!r}") from None
    if not radii or not all(math.isfinite(r) and r >= 0 for r in radii):
        raise click.BadParameter(f"radii must be finite numbers >= 0, got {value!r}")
    return radii


def progress(label: str, quiet: bool):
    if quiet:
        return None

    def wrap(items, length):
        bar = click.progressbar(items, length=length, label=label, file=sys.stderr, show_pos=True, show_eta=True)
        return _BarIterator(bar)

    return wrap


class _BarIterator:
    def __init__(self, bar):
        self.bar = bar

    def __iter__(self):
        with self.bar as items:
            yield from items



def radii_option(ctx, param, value):
    """click callback: comma-separated radii."""
    return parse_radii(value)
