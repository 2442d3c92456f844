"""Exact references for tests: linear model folders and closed-form smoothed classifiers.

For a 2-class linear model with logits W x + b, class 1 wins iff m(x) = dw.x + db > 0 with
dw = W[1] - W[0], db = b[1] - b[0]. Under x + N(0, sigma^2 I) the margin is N(m(x), sigma^2 |dw|^2),
so the smoothed probability of class 1 is p1 = Phi(m(x) / (sigma |dw|)), the smoothed
classifier is sign(m(x)) (the base classifier itself) and its exact L2 robustness radius is
|m(x)| / |dw| = sigma * Phi^-1(max(p1, 1 - p1)).

``certify_outcomes`` gives the exact distribution of Cohen's CERTIFY output for such a p1,
including the N0 selection step (argmax over 2 counts, ties to class 0 as numpy's argmax).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy.stats import beta as beta_dist
from scipy.stats import binom, norm


def write_linear_folder(path, *, weight, bias, sigma, kind="expert", experts=None, input_shape=(1, 1, 4),
                        name=None, mean=None, std=None) -> Path:
    """Write a ``linear``-architecture folder whose logits are exactly ``weight @ x.flatten() + bias``."""
    import torch

    from dualrs_route.experts.architectures import build_model
    from dualrs_route.experts.folders import ModelConfig, save_folder

    weight = np.asarray(weight, dtype=np.float32)
    bias = np.asarray(bias, dtype=np.float32)
    channels = int(input_shape[0])
    mean = [0.0] * channels if mean is None else list(mean)
    std = [1.0] * channels if std is None else list(std)
    k = weight.shape[0]
    config = ModelConfig(kind=kind, sigma=float(sigma), num_classes=k, input_shape=tuple(input_shape),
                         mean=tuple(mean), std=tuple(std), architecture="linear", architecture_args={},
                         experts=tuple(experts) if experts is not None else None, name=name)
    model = build_model("linear", num_classes=k, input_shape=input_shape, mean=mean, std=std)
    with torch.no_grad():
        model[1][1].weight.copy_(torch.from_numpy(weight))
        model[1][1].bias.copy_(torch.from_numpy(bias))
    return save_folder(path, config, model)


def linear_model(weight, bias, input_shape=(1, 1, 4)):
    """The in-memory ``linear`` network (Sequential(NormalizeLayer, Flatten+Linear)) with given weights."""
    import torch

    from dualrs_route.experts.architectures import build_model

    weight = np.asarray(weight, dtype=np.float32)
    model = build_model("linear", num_classes=weight.shape[0], input_shape=input_shape,
                        mean=[0.0] * input_shape[0], std=[1.0] * input_shape[0])
    with torch.no_grad():
        model[1][1].weight.copy_(torch.from_numpy(weight))
        model[1][1].bias.copy_(torch.from_numpy(np.asarray(bias, dtype=np.float32)))
    return model.eval()


class BinaryLinear:
    """Closed form of a 2-class linear model (weights as stored in float32, maths in float64)."""

    def __init__(self, weight, bias):
        w = np.asarray(weight, dtype=np.float32).astype(np.float64)
        b = np.asarray(bias, dtype=np.float32).astype(np.float64)
        self.dw = w[1] - w[0]
        self.db = b[1] - b[0]
        self.norm = float(np.linalg.norm(self.dw))
        self.unit = self.dw / self.norm

    def margin(self, x) -> np.ndarray:
        """m(x): a float for one input (any shape with D values), or [B] for inputs [B, ...]."""
        x = np.asarray(x, dtype=np.float64)
        d = len(self.dw)
        if x.size == d:
            return float(x.reshape(d) @ self.dw + self.db)
        return x.reshape(-1, d) @ self.dw + self.db

    def smoothed_class(self, x) -> np.ndarray:
        """g(x): 1 where m(x) > 0, else 0."""
        return np.asarray(self.margin(x) > 0).astype(np.int64)

    def p1(self, x, sigma: float) -> np.ndarray:
        return norm.cdf(self.margin(x) / (sigma * self.norm))

    def radius(self, x) -> np.ndarray:
        """Exact L2 distance to the decision boundary: |m(x)| / |dw|."""
        return np.abs(self.margin(x)) / self.norm


def cp_lower_all(n: int, alpha: float) -> np.ndarray:
    """One-sided Clopper-Pearson lower bounds for n_a = 0..n (reference, from scipy's beta quantile)."""
    k = np.arange(n + 1)
    out = np.zeros(n + 1)
    inner = (k > 0) & (k < n)
    out[inner] = beta_dist.ppf(alpha, k[inner], n - k[inner] + 1)
    out[n] = alpha ** (1.0 / n)
    return out


def radius_all(n: int, alpha: float, sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """(certifies, radius) for n_a = 0..n: certifies iff the lower bound is >= 1/2."""
    lower = cp_lower_all(n, alpha)
    ok = lower >= 0.5
    radius = np.where(ok, sigma * norm.ppf(np.clip(lower, 0.5, 1.0)), 0.0)
    return ok, radius


def selection_prob_class1(p1: float, n0: int) -> float:
    """P[guess = 1] when the guess is argmax of 2 counts with ties to class 0: P[Bin(n0, p1) > n0 / 2]."""
    return float(binom.sf(n0 // 2, n0, p1))  # count1 > n0/2  <=>  count1 >= floor(n0/2) + 1


def certify_outcomes(p1: float, *, n0: int, n: int, alpha: float, sigma: float):
    """Exact distribution of CERTIFY's non-abstaining outcomes for a 2-class smoothed classifier.

    Returns arrays (cls, radius, prob): every (class, radius) the procedure can return without
    abstaining and its probability. 1 - prob.sum() is the abstain probability.
    """
    ok, rad = radius_all(n, alpha, sigma)
    k = np.arange(n + 1)
    q1 = selection_prob_class1(p1, n0)
    classes, radii, probs = [], [], []
    for cls, p_guess, p_c in ((0, 1.0 - q1, 1.0 - p1), (1, q1, p1)):
        pmf = binom.pmf(k, n, p_c) * p_guess
        classes.append(np.full(int(ok.sum()), cls))
        radii.append(rad[ok])
        probs.append(pmf[ok])
    return np.concatenate(classes), np.concatenate(radii), np.concatenate(probs)
