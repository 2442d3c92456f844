"""Helpers of the hardening tests: CLI calls, the one-line failure check, real writer processes."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from click.testing import CliRunner

from dualrs_route.cli import main

from cli_checks import one_error_line  # noqa: F401  (re-exported for the hardening tests)

REPO = Path(__file__).resolve().parents[2]

# Runs the CLI in a real process whose writer stops after DUALRS_TEST_ROWS rows: with
# DUALRS_TEST_AFTER=die it ends at once with os._exit (as kill -9 would: no close, no cleanup),
# with "pause" it prints "paused" and sleeps, holding the file's lock, until it is killed.
_DRIVER = textwrap.dedent("""
    import os, sys, time
    from dualrs_route.router import results
    write, rows = results.ResultsWriter.write, int(os.environ["DUALRS_TEST_ROWS"])
    def limited(self, row):
        write(self, row)
        if len(self.done) - self.start_done == rows:
            if os.environ["DUALRS_TEST_AFTER"] == "die":
                os._exit(9)
            print("paused", flush=True)
            time.sleep(600)
    init = results.ResultsWriter.__init__
    def counting(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.start_done = len(self.done)
    results.ResultsWriter.__init__, results.ResultsWriter.write = counting, limited
    from dualrs_route.cli import main
    main(sys.argv[1:], prog_name="dualrs-route")
""")


def invoke(*args, env=None):
    return CliRunner().invoke(main, [str(a) for a in args], env=env)


def certify_args(expert, data, out, *extra):
    return ["certify", "--expert", expert, "--dataset", f"npz:{data}", "--N0", 20, "--N", 200, "--alpha", 0.01,
            "--seed", 3, "--quiet", "--out", out, *extra]


def rows_without_time(path) -> list[list[str]]:
    rows = [line.split("\t") for line in Path(path).read_text().splitlines()]
    t = rows[0].index("time")
    return [r[:t] + r[t + 1:] for r in rows]


def start_writer(args, *, rows: int, after: str) -> subprocess.Popen:
    """A real ``dualrs-route`` process whose writer stops after ``rows`` rows (see _DRIVER)."""
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1", DUALRS_TEST_ROWS=str(rows), DUALRS_TEST_AFTER=after)
    return subprocess.Popen([sys.executable, "-c", _DRIVER, *[str(a) for a in args]], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
