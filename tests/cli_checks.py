"""Assertions on CLI results, and CLI steps, shared by the test folders (importable: tests/ is on sys.path via its
conftest)."""

from __future__ import annotations

from pathlib import Path


def one_error_line(result, mentions: str | None = None, *, exit_codes=(1, 2)) -> str:
    """Assert an exit code in ``exit_codes``, no traceback and exactly one 'Error:' line (click's usage
    lines and warnings aside); return that line."""
    assert result.exit_code in exit_codes, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert not any("Traceback" in line for line in lines), result.output
    errors = [line for line in lines if line.startswith("Error:")]
    others = [line for line in lines if not line.startswith(("Error:", "Usage:", "Try ", "warning:"))]
    assert len(errors) == 1 and not others, result.output
    if mentions:
        assert mentions.lower() in errors[0].lower(), errors[0]
    return errors[0]


def certify_experts(tmp_path, experts, data, *, n0: int, n: int, alpha: float, seed: int = 3) -> list[Path]:
    """``certify --expert`` of each expert on the npz ``data`` (torch engine): tmp_path/expert-K.tsv, in order."""
    from click.testing import CliRunner

    from dualrs_route.cli import main

    paths = []
    for k, e in enumerate(experts):
        out = Path(tmp_path) / f"expert-{k}.tsv"
        r = CliRunner().invoke(main, [str(a) for a in ("certify", "--expert", e, "--dataset", f"npz:{data}", "--N0", n0,
                                                       "--N", n, "--alpha", alpha, "--seed", seed, "--engine", "torch",
                                                       "--quiet", "--out", out)])
        assert r.exit_code == 0, r.output
        paths.append(out)
    return paths
