"""Dual RS routing: the smoothed router, dual certification, result files and the CLI."""
