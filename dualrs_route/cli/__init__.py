"""The ``dualrs-route`` command line: one click group of thin commands over the library.

Library errors become one-line messages with exit code 1; bad option values exit with code 2
(:class:`dualrs_route.cli.common.Group`). ``DUALRS_ROUTE_DEBUG=1`` shows full tracebacks.
"""

from __future__ import annotations

from .calibrate import calibrate_router_command, compose_cascade_command, compose_command, router_scores_command
from .export import bench_command, export_command
from .main import main
from .scale import merge_command
from .training import labels_command, router_report_command, train_router_command

for _command in (labels_command, train_router_command, router_report_command, router_scores_command,
                 calibrate_router_command, compose_command, compose_cascade_command, export_command,
                 bench_command, merge_command):
    main.add_command(_command)

__all__ = ["main"]
