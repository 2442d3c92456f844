"""A confidence-threshold router (issue 12 lever): no training, two thresholds chosen on held-out images.

The learned routers never route to sigma 0.25 and lose their certificate to R_sigma. This lever asks
whether a *hand-set* router does better: its base classifier runs the sigma 1.0 expert's network on the
noisy copy x + N(0, sigma_e^2 I) and reads one confidence score s of its sorted class probabilities
(``p1``: the top probability, or ``margin``: p1 - p2); it routes to the first expert where s < t1, to
the second where t1 <= s < t2 and to the third where s >= t2. Smoothed at sigma_e, it is a router
like any other (a ``confidence_head`` folder with set weights), certified by dual CERTIFY.

Steps (each writes one file; the expensive one is the router-scores run of the probe):

  probe  --expert E --sigma-e S --experts A B C --out DIR
         a router folder whose three "logits" are the features (p1, p2, p3) of E's sorted probabilities,
         so `dualrs-route router-scores` stores every noisy copy's features
  fit    --scores SCORES --expert-results A.tsv B.tsv C.tsv [--taus 2,0.05]
         replays dual CERTIFY (``router.calibrate.simulate``, the code behind ``compose``) for every
         threshold pair on a grid, per feature and router-sets TAU; prints the best rows and a split-half
         check, and writes the best rule as JSON
  write  --rule RULE.json --expert E --experts A B C --out DIR
         the rule as a router folder (the same network, a head whose logits are
         (0, s - t1, 2 s - t1 - t2)), then ``dualrs-route export DIR`` for ONNX Runtime

The rule router's own certificate comes from its own `router-scores` run and `compose`; a run of it on a
few held-out images checks that it reproduces the replay.

Usage: see benchmarks/rule_router.sh.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np

from dualrs_route.experts.folders import ModelConfig, load_folder, save_folder
from dualrs_route.router.calibrate import (acr, constant_routers, load_expert_stage, load_scores, scaled, simulate,
                                           simulate_sets)
from dualrs_route.router.dual import split_alpha
from dualrs_route.router.training import init_from_folder, portable_reference

FEATURES = ("p1", "margin")


def feature(values: np.ndarray, name: str) -> np.ndarray:
    """s from the probe's stored (p1, p2, p3) per noisy copy."""
    if name == "p1":
        return values[..., 0]
    if name == "margin":
        return values[..., 0] - values[..., 1]
    raise ValueError(f"unknown feature {name!r}; known: {', '.join(FEATURES)}")


def rule_logits(values: np.ndarray, name: str, t1: float, t2: float) -> np.ndarray:
    """float32 [..., 3]: (0, s - t1, 2 s - t1 - t2), whose argmax is 0 below t1, 1 in [t1, t2), 2 from t2
    (t1 <= t2). Computed in float32, as the router's head computes it."""
    s = feature(values.astype(np.float32), name)
    t1, t2 = np.float32(t1), np.float32(t2)
    return np.stack([np.zeros_like(s), s - t1, (s + s) - (t1 + t2)], axis=-1).astype(np.float32)


def _head_weights(name: str, t1: float, t2: float, base_classes: int, hidden: int):
    """The confidence head's weights: hidden unit 0 = s (s >= 0, so the ReLU keeps it), and 1..2 = p2, p3
    for the probe. Returns (w1, b1, w2, b2) for the rule (t1, t2) or, with name None, the probe."""
    import torch

    w1 = torch.zeros(hidden, base_classes)
    b1 = torch.zeros(hidden)
    w2 = torch.zeros(3, hidden)
    b2 = torch.zeros(3)
    if name is None:  # probe: logits = (p1, p2, p3)
        for j in range(3):
            w1[j, j] = 1.0
            w2[j, j] = 1.0
        return w1, b1, w2, b2
    w1[0, 0] = 1.0
    if name == "margin":
        w1[0, 1] = -1.0
    w2[1, 0], w2[2, 0] = 1.0, 2.0
    b2[1], b2[2] = -t1, -(t1 + t2)
    return w1, b1, w2, b2


def write_router(expert: str, experts: list[str], sigma_e: float, out: str, rule: dict | None) -> Path:
    import torch

    from dualrs_route.experts.architectures import build_model

    source = load_folder(expert)
    folders = [load_folder(e) for e in experts]
    args = {"base": source.config.architecture, "base_args": dict(source.config.architecture_args),
            "base_classes": int(source.config.num_classes), "hidden": 4}
    cfg = source.config
    model = build_model("confidence_head", num_classes=3, input_shape=tuple(cfg.input_shape), mean=cfg.mean,
                        std=cfg.std, **args)
    fresh = init_from_folder(model, source)  # the expert's network becomes base.*, every tensor copied
    assert all(".head." in name for name in fresh), fresh
    head = model[1].head
    w1, b1, w2, b2 = _head_weights(None if rule is None else rule["feature"],
                                   0.0 if rule is None else rule["t1"], 0.0 if rule is None else rule["t2"],
                                   args["base_classes"], args["hidden"])
    with torch.no_grad():
        head[0].weight.copy_(w1), head[0].bias.copy_(b1)
        head[2].weight.copy_(w2), head[2].bias.copy_(b2)
    out_dir = Path(out)
    record = {"command": "python " + " ".join(sys.argv), "base": portable_reference(source, out_dir),
              "kind": "probe: logits are the base's sorted probabilities p1, p2, p3" if rule is None else
              "confidence-threshold rule: logits (0, s - t1, 2 s - t1 - t2)", "rule": rule}
    config = ModelConfig(kind="router", sigma=float(sigma_e), num_classes=3, input_shape=tuple(source.config.input_shape),
                         mean=tuple(source.config.mean), std=tuple(source.config.std), architecture="confidence_head",
                         architecture_args=args, class_names=tuple(f.name for f in folders),
                         experts=tuple(portable_reference(f, out_dir) for f in folders), name=out_dir.name,
                         extra={"rule_router": record})
    save_folder(out_dir, config, model.eval(), overwrite=True)
    return out_dir


def half_acr(result: dict, rows: np.ndarray) -> float:
    """ACR of ``result`` on some images (each image's replayed row depends on that image alone)."""
    return acr({"radius": result["radius"][rows], "correct": result["correct"][rows]})


def replay(scores, stages, counts, name, t1, t2, tau, alpha):
    """Dual CERTIFY (router sets at ``tau`` <= 1) of the rule router from the probe's scores. ``counts``: its
    votes, from :func:`below_counts`, for the grid search; without them the rule's float32 logits vote."""
    if counts is None:
        scores = dataclasses.replace(scores, select=rule_logits(scores.select, name, t1, t2),
                                     estimate=rule_logits(scores.estimate, name, t1, t2))
    a, beta = split_alpha(alpha)
    if tau > 1:
        return simulate(scores, stages, np.zeros(3), alpha=a, beta=beta, counts=counts)
    return simulate_sets(scores, stages, np.zeros(3), alpha=a, beta=beta, tau=tau, counts=counts)


def below_counts(values: np.ndarray, name: str, grid: np.ndarray) -> np.ndarray:
    """int64 [m, G]: per image, how many noisy copies have s < grid[g]."""
    s = feature(values.astype(np.float32), name)
    return np.stack([(s < np.float32(t)).sum(axis=1) for t in grid], axis=1).astype(np.int64)


def rule_counts(below: np.ndarray, n: int, i1: int, i2: int) -> np.ndarray:
    """int64 [m, 3]: the rule's votes for thresholds grid[i1] <= grid[i2] (s < t1, t1 <= s < t2, s >= t2)."""
    return np.stack([below[:, i1], below[:, i2] - below[:, i1], n - below[:, i2]], axis=1)


def fit(args) -> None:
    scores = load_scores(args.scores)
    stages = [load_expert_stage(p, scores) for p in args.expert_results]
    grid = np.round(np.arange(0.0, 1.0 + 1e-9, args.step), 6)
    taus = [float(t) for t in args.taus.split(",")]
    pairs = [(i, j) for i in range(len(grid)) for j in range(i, len(grid))]
    a, beta = split_alpha(args.alpha)
    constants = constant_routers(scores, stages, alpha=a, beta=beta, scale=args.scale)
    constant = {name: acr(result) for name, result in constants.items()}
    print(f"# {len(scores.idx)} images, router N {scores.estimate.shape[1]}, replayed at x{args.scale}; constant routers: "
          + ", ".join(f"{k} {v:.4f}" for k, v in constant.items()), flush=True)
    table = []
    started = time.perf_counter()
    halves = [np.arange(len(scores.idx)) % 2 == h for h in (0, 1)]
    n0, n = scores.select.shape[1], scores.estimate.shape[1]
    for name in FEATURES:
        below = below_counts(scores.select, name, grid), below_counts(scores.estimate, name, grid)
        for tau in taus:
            for i1, i2 in pairs:
                t1, t2 = grid[i1], grid[i2]
                counts = rule_counts(below[0], n0, i1, i2), rule_counts(below[1], n, i1, i2)
                result = replay(*scaled(scores, stages, counts, args.scale), name, t1, t2, tau, args.alpha)
                routes = np.bincount(result["expert"][result["expert"] >= 0], minlength=3)
                table.append({"feature": name, "tau": tau, "t1": float(t1), "t2": float(t2), "acr": acr(result),
                              "halves": [half_acr(result, h) for h in halves], "routes": routes.tolist()})
        print(f"# {name}: {len(pairs) * len(taus)} rules in {time.perf_counter() - started:.0f} s", flush=True)
    table.sort(key=lambda r: -r["acr"])
    for r in table[:args.top]:
        print(f"{r['feature']:7s} tau {r['tau']:<5g} t1 {r['t1']:.3f} t2 {r['t2']:.3f}: ACR {r['acr']:.4f} "
              f"(halves {r['halves'][0]:.4f} / {r['halves'][1]:.4f}), routes {r['routes']}")
    for name in FEATURES:
        for tau in taus:
            r = max((r for r in table if r["feature"] == name and r["tau"] == tau), key=lambda r: r["acr"])
            print(f"best {name}, tau {tau:g}: t1 {r['t1']:.3f} t2 {r['t2']:.3f}: ACR {r['acr']:.4f}, routes {r['routes']}")
    # split-half: choose on one half, report on the other
    checks = []
    for h in (0, 1):
        best = max(table, key=lambda r: r["halves"][h])
        checks.append({"chosen_on": ["even", "odd"][h], "rule": {k: best[k] for k in ("feature", "tau", "t1", "t2")},
                       "acr_chosen_half": best["halves"][h], "acr_other_half": best["halves"][1 - h],
                       "best_constant_other_half": max(half_acr(r, halves[1 - h]) for r in constants.values())})
        c = checks[-1]
        print(f"split half {c['chosen_on']} -> other: {c['rule']}: ACR {c['acr_chosen_half']:.4f} -> "
              f"{c['acr_other_half']:.4f} (best constant router there {c['best_constant_other_half']:.4f})")
    best = table[0]
    exact = replay(scores, stages, None, best["feature"], best["t1"], best["t2"], best["tau"], args.alpha)
    exact_acr = acr(exact)  # the rule's own float32 logits vote, at the stored N
    if args.scale == 1:
        print(f"best rule replayed with its float32 logits: ACR {exact_acr:.4f} (search {best['acr']:.4f})")
    else:
        print(f"best rule replayed with its float32 logits at the stored N: ACR {exact_acr:.4f} (search at "
              f"x{args.scale}: {best['acr']:.4f})")
    record = {"feature": best["feature"], "t1": best["t1"], "t2": best["t2"], "tau": best["tau"],
              "heldout_acr": exact_acr, "search_acr": best["acr"], "scale": args.scale, "routes": best["routes"], "constant_routers": constant,
              "split_half": checks, "scores": str(args.scores), "expert_results": [str(p) for p in args.expert_results],
              "grid_step": args.step, "taus": taus, "command": "python " + " ".join(sys.argv)}
    Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    print(f"best: {best['feature']} t1 {best['t1']} t2 {best['t2']} tau {best['tau']}: ACR {best['acr']:.4f} -> {args.out}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="step", required=True)
    a = sub.add_parser("probe")
    a.add_argument("--expert", required=True)
    a.add_argument("--sigma-e", type=float, required=True)
    a.add_argument("--experts", nargs=3, required=True)
    a.add_argument("--out", required=True)
    b = sub.add_parser("fit")
    b.add_argument("--scores", required=True)
    b.add_argument("--expert-results", nargs=3, required=True)
    b.add_argument("--alpha", type=float, default=0.001)
    b.add_argument("--step", type=float, default=0.05)
    b.add_argument("--taus", default="2,0.05")
    b.add_argument("--top", type=int, default=15)
    b.add_argument("--scale", type=int, default=1, help="replay at this many times the stored N (counts scaled; "
                   "router.calibrate.scaled): to choose for a run at a larger N")
    b.add_argument("--out", required=True)
    c = sub.add_parser("write")
    c.add_argument("--rule", required=True)
    c.add_argument("--expert", required=True)
    c.add_argument("--sigma-e", type=float, required=True)
    c.add_argument("--experts", nargs=3, required=True)
    c.add_argument("--out", required=True)
    args = p.parse_args(argv)
    if args.step == "probe":
        print(write_router(args.expert, args.experts, args.sigma_e, args.out, None))
    elif args.step == "write":
        print(write_router(args.expert, args.experts, args.sigma_e, args.out, json.loads(Path(args.rule).read_text())))
    else:
        fit(args)


if __name__ == "__main__":
    main()
