"""Assertions on CLI results shared by the test folders (importable: tests/ is on sys.path via its conftest)."""

from __future__ import annotations


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
