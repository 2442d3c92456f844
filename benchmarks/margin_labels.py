"""Router labels from the sigma 1.0 expert's smoothed confidence (issue 12, eighth session lever).

Why: on the sel images the learned routers rank images poorly. Take the decision "sigma 1.0 or sigma 0.5" and
weight each image by the radius a wrong choice loses there (|R_1.0 - R_0.5|): the learned router's score ranks
the images with a weighted AUC of 0.75, while the sigma 1.0 expert's own softmax margin p1 - p2 on ONE noisy copy
reaches 0.875, and its mean over 10 copies 0.92. The routers learn from the N = 100 radius labels, which are
noisy, and their consistency term keeps little of that margin. This script gives them a denoised target
instead, computed on the label images only (never on sel or test images):

1. per image, the mean over noisy copies of the probe's sorted probabilities (p1, p2, p3) of the sigma 1.0
   expert (``benchmarks/rule_router.py probe``, then ``dualrs-route router-scores`` on the label images);
2. a logistic regression of "sigma 1.0 certifies at least as far as sigma 0.5" on (mean p1, mean p1 - p2),
   each image weighted by |R_1.0 - R_0.5| of the labels file. Its probability y is then >= 1/2 exactly where the
   expected radius of sigma 1.0 beats sigma 0.5's given those features (the regret-weighted Bayes rule);
3. a labels file whose radii are replaced by pseudo-radii T (0, c, c + logit(y)): ``train-router
   --temperature T`` turns them into the soft labels (~0, 1 - y, y). sigma 0.25 gets no weight (no image has it
   best), so the router chooses between sigma 0.5 and 1.0, as the learned routers did in practice.

Everything else in the labels file (images, experts, hashes) is kept, so ``train-router`` checks it as usual.
The pseudo-radii are not radii: the file's meta says so, and only train-router should read it.

Usage:
  python benchmarks/margin_labels.py --labels LABELS.npz --probe PROBE_SCORES.npz --out OUT.npz [--temperature 0.1]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
from scipy.optimize import minimize
from scipy.special import expit, logit

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dualrs_route.experts.errors import DataError  # noqa: E402
from dualrs_route.router.calibrate import load_scores  # noqa: E402
from dualrs_route.router.labels import LabelSet, load_labels, save_labels  # noqa: E402


def mean_features(select: np.ndarray, estimate: np.ndarray) -> np.ndarray:
    """float [m, 2]: per image, the mean p1 and the mean margin p1 - p2 over every stored noisy copy (the probe's
    ``select`` [m, n0, 3] and ``estimate`` [m, n, 3] sorted probabilities)."""
    values = np.concatenate([select, estimate], axis=1).astype(np.float64)
    return np.stack([values[..., 0].mean(1), (values[..., 0] - values[..., 1]).mean(1)], axis=1)


def fit_weighted_logistic(x: np.ndarray, y: np.ndarray, w: np.ndarray, l2: float = 1e-3) -> np.ndarray:
    """Coefficients (bias first) of the logistic regression of y in {0, 1} on x, each row weighted by w >= 0,
    with a small ridge term on the slopes; standardised inside, returned on x's own scale."""
    mu, sd = x.mean(0), x.std(0) + 1e-12
    z = np.column_stack([np.ones(len(x)), (x - mu) / sd])
    w = w / w.sum()

    def loss(beta):
        t = z @ beta
        nll = np.sum(w * (np.logaddexp(0.0, t) - y * t))
        grad = z.T @ (w * (expit(t) - y))
        return nll + l2 * beta[1:] @ beta[1:], grad + np.r_[0.0, 2 * l2 * beta[1:]]

    beta = minimize(loss, np.zeros(z.shape[1]), jac=True, method="L-BFGS-B").x
    slopes = beta[1:] / sd
    return np.r_[beta[0] - slopes @ mu, slopes]


def probability(coef: np.ndarray, x: np.ndarray) -> np.ndarray:
    return expit(coef[0] + x @ coef[1:])


def pseudo_radii(y: np.ndarray, temperature: float, c: float = 30.0) -> np.ndarray:
    """float32 [m, 3]: T (0, c, c + logit(y)), whose softmax at temperature T is (e^-c ~ 0, 1 - y, y); every entry
    but the first is positive (y is clipped to [1e-6, 1 - 1e-6]), so train-router keeps every image."""
    y = np.clip(y, 1e-6, 1 - 1e-6)
    return (temperature * np.stack([np.zeros_like(y), np.full_like(y, c), c + logit(y)], axis=1)).astype(np.float32)


def margin_labels(labels: LabelSet, select: np.ndarray, estimate: np.ndarray, temperature: float):
    """(labels with pseudo-radii, summary dict): steps 2 and 3 of the module docstring."""
    if labels.num_experts != 3 or [float(v) for v in labels.sigmas] != [0.25, 0.5, 1.0]:
        raise DataError("the labels file must hold the sigma 0.25 / 0.5 / 1.0 experts, in that order")
    x = mean_features(select, estimate)
    r05, r10 = labels.radii[:, 1].astype(np.float64), labels.radii[:, 2].astype(np.float64)
    coef = fit_weighted_logistic(x, (r10 >= r05).astype(np.float64), np.abs(r10 - r05))
    y = probability(coef, x)
    summary = {"coef (bias, mean p1, mean margin)": [round(float(v), 4) for v in coef],
               "images": int(len(y)), "share routed to sigma 1.0": round(float(np.mean(y >= 0.5)), 4),
               "label images' mean radius, routed by y": round(float(np.where(y >= 0.5, r10, r05).mean()), 4),
               "sigma 1.0 / 0.5 alone": [round(float(r10.mean()), 4), round(float(r05.mean()), 4)],
               "oracle of the two": round(float(np.maximum(r10, r05).mean()), 4)}
    meta = dict(labels.meta, pseudo_radii={
        "note": "NOT radii: T (0, c, c + logit(y)) for train-router's soft labels; y from benchmarks/margin_labels.py",
        "temperature": temperature, **summary})
    return dataclasses.replace(labels, radii=pseudo_radii(y, temperature), meta=meta), summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--labels", required=True, help="labels file (the label images' radii, three experts)")
    parser.add_argument("--probe", required=True, help="router-scores of the sigma 1.0 probe on the same images")
    parser.add_argument("--out", required=True)
    parser.add_argument("--temperature", type=float, default=0.1, help="train-router's --temperature")
    args = parser.parse_args()
    if Path(args.out).exists():
        sys.exit(f"error: {args.out} exists")
    try:
        labels = load_labels(args.labels, require_complete=True)
        probe = load_scores(args.probe)
        if not np.array_equal(np.asarray(labels.indices), np.asarray(probe.idx)):
            raise DataError("the probe's images are not the labels file's images (their indices differ)")
        out, summary = margin_labels(labels, probe.select, probe.estimate, args.temperature)
    except DataError as exc:
        sys.exit(f"error: {exc}")
    save_labels(args.out, out)
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
