"""dualrs-route: certified-robust inference with Dual Randomized Smoothing."""
