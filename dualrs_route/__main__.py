"""``python -m dualrs_route``: the ``dualrs-route`` command line."""

from dualrs_route.cli import main

if __name__ == "__main__":  # pragma: no branch
    main()
