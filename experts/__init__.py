"""Expert RS classifiers: statistics, noise, the torch engine, smoothing, model folders and data."""
