"""Head-only routers on a frozen expert, at any sigma_e: features once, then heads in seconds.

A ``confidence_head`` router whose base is a frozen expert computes
``head(sort(softmax(base(x + delta))))``. So the base's logits on the noisy copies decide
everything, and they do not depend on the head. This script stores them once per
(expert, sigma_e):

* ``features``: the base's logits
  * on M fixed noisy copies of every labelled training image (for fitting heads), and
  * on the router-stage noise streams of dual CERTIFY (seed, index, ROUTER_SELECT / ROUTER_ESTIMATE)
    for the 500 held-out training images (for judging heads);
* ``fit``: fits heads (10 -> hidden -> K MLPs, the router loss of ``router.training``:
  soft labels, 1/q_k weights, consistency over the M copies), turns the held-out logits into
  router scores and replays dual CERTIFY with the experts' held-out certificates
  (``router.calibrate.simulate``, the code behind ``dualrs-route compose``). Held-out
  images only: no test image is looked at.

Usage (CIFAR-10 zoo; ../shared/data needed):
  python benchmarks/router_heads.py features --base experts/zoo/cifar10-resnet20-sigma0.5 --sigma-e 0.5 \
      --work runs/heads/se0.5
  python benchmarks/router_heads.py fit --work runs/heads/se0.5
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np

from dualrs_route.experts.data import load_dataset
from dualrs_route.experts.folders import load_folder
from dualrs_route.experts.noise import NoiseKey, Stage
from dualrs_route.export.engines import make_counter
from dualrs_route.router import calibrate
from dualrs_route.router.labels import load_labels, merge_labels

ROOT = Path(__file__).resolve().parent.parent
LABELS = [ROOT / "benchmarks/results/zoo-labels/labels-train-2000.npz",
          ROOT / "benchmarks/results/zoo-labels/labels-train-2000-8000.npz"]
HOLDOUT_EXPERTS = [ROOT / f"benchmarks/results/router-sweep/holdout-expert-{s}.tsv" for s in ("0.25", "0.5", "1.0")]
HOLDOUT_START = 49500
FEATURE_SEED = 12345  # training copies: a stream of their own (never the held-out router streams)


def features(args) -> None:
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    data = args.data
    train = load_dataset("cifar10", split="train", data=data)
    counter = make_counter(load_folder(args.base), engine=args.engine, threads=args.threads, batch_size=args.batch)
    labels = merge_labels([load_labels(p) for p in LABELS], [str(p) for p in LABELS])
    feats = work / "train-features.npz"
    if not feats.exists():
        t0 = time.time()
        out = np.empty((len(labels.indices), args.copies, counter.num_classes), dtype=np.float32)
        chunk = 50
        for s in range(0, len(labels.indices), chunk):
            idx = [int(i) for i in labels.indices[s:s + chunk]]
            out[s:s + len(idx)] = counter.logits_many(train.batch(idx), args.sigma_e, args.copies,
                                                      keys=[NoiseKey(FEATURE_SEED, i, Stage.ROUTER_SELECT) for i in idx])
            print(f"train features {s + len(idx)}/{len(labels.indices)} {time.time() - t0:.0f}s", flush=True)
        np.savez(feats, logits=out, indices=labels.indices, radii=labels.radii,
                 meta=json.dumps({"base": args.base, "sigma_e": args.sigma_e, "copies": args.copies}))
    scores = work / "holdout-scores.npz"
    if not scores.exists():
        holdout_y = np.asarray(train.labels[HOLDOUT_START:])
        calibrate.collect_scores(counter, lambda idx: train.batch([HOLDOUT_START + i for i in idx]), holdout_y.tolist(),
                                 list(range(len(holdout_y))),
                                 sigma=args.sigma_e, n0=args.n0, n=args.n, seed=0, out=scores,
                                 settings={"base": args.base, "note": "base logits, not router scores"},
                                 progress=lambda it, total: _count(it, total))
    print("features done", work)


def _count(items, total):
    t0 = time.time()
    for j, item in enumerate(items):
        yield item
        print(f"holdout chunk {j + 1}/{total} {time.time() - t0:.0f}s", flush=True)


def _sorted_probs(logits):
    import torch

    p = torch.softmax(torch.as_tensor(logits, dtype=torch.float32), dim=-1)
    return torch.sort(p, dim=-1, descending=True).values


def fit_head(logits, radii, *, hidden, lam, eta, temperature, balance, epochs, lr, seed):
    """MLP head on sorted probabilities, the router loss over the M stored copies per image."""
    import torch
    from torch import nn

    from dualrs_route.router.labels import best_expert, routable
    from dualrs_route.router.training import class_weights, router_loss, soft_labels

    torch.manual_seed(seed)
    keep = routable(radii)
    x = _sorted_probs(logits[keep])                       # [n, M, C]
    r = radii[keep]
    targets = torch.as_tensor(soft_labels(r, temperature), dtype=torch.float32)
    weights = torch.as_tensor(class_weights(best_expert(r), r.shape[1])[0] if balance else np.ones(len(r)),
                              dtype=torch.float32)
    head = nn.Sequential(nn.Linear(x.shape[-1], hidden), nn.ReLU(), nn.Linear(hidden, r.shape[1]))
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=0.01)
    n, m = x.shape[:2]
    gen = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        order = torch.randperm(n, generator=gen)
        for s in range(0, n, 256):
            b = order[s:s + 256]
            pair = torch.randint(0, m, (len(b), 2), generator=gen)  # two of the M copies, as training draws two
            xb = torch.stack([x[b, pair[:, 0]], x[b, pair[:, 1]]], dim=1)
            out = head(xb.reshape(-1, x.shape[-1])).reshape(len(b), 2, -1).transpose(0, 1)  # [M, B, K]
            loss, _ = router_loss(out, targets[b], weights[b], lam=lam, eta=eta)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return head


def head_scores(head, scores):
    import torch

    with torch.no_grad():
        def apply(z):
            return head(_sorted_probs(z).reshape(-1, z.shape[-1])).reshape(*z.shape[:2], -1).numpy()
        return calibrate.RouterScores(scores.idx, scores.label, apply(scores.select), apply(scores.estimate),
                                      scores.meta)


def fit(args) -> None:
    work = Path(args.work)
    with np.load(work / "train-features.npz") as f:
        logits, radii = f["logits"], f["radii"]
    base = calibrate.load_scores(work / "holdout-scores.npz")
    experts = [calibrate.load_expert_stage(p, base) for p in HOLDOUT_EXPERTS]
    grid = list(itertools.product(args.hidden, args.lam, args.temperature, args.balance))
    print(f"sigma_e {base.sigma}, router N {base.estimate.shape[1]}, {len(grid)} heads")
    print("| hidden | lambda | T | balance | choices: ACR without the min | ACR | routed 0.25/0.5/1.0 | abstain |")
    print("|---|---|---|---|---|---|---|---|")
    for hidden, lam, temperature, balance in grid:
        head = fit_head(logits, radii, hidden=hidden, lam=lam, eta=0.5, temperature=temperature,
                        balance=bool(balance), epochs=args.epochs, lr=args.lr, seed=0)
        sc = head_scores(head, base)
        res = calibrate.simulate(sc, experts, np.zeros(len(experts)), alpha=args.alpha / 2, beta=args.alpha / 2)
        rexp = np.nan_to_num(res["radius_expert"])
        choice_acr = float(np.mean(np.where(res["predict"] >= 0, rexp, 0) * res["correct"]))
        shares = [float(np.mean(res["expert"] == k)) * 100 for k in range(len(experts))]
        print(f"| {hidden} | {lam} | {temperature} | {balance} | {choice_acr:.3f} | {calibrate.acr(res):.3f} | "
              f"{'/'.join(f'{s:.0f}' for s in shares)} | {np.mean(res['expert'] < 0) * 100:.1f}% |", flush=True)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("features")
    f.add_argument("--base", required=True)
    f.add_argument("--sigma-e", type=float, required=True)
    f.add_argument("--work", required=True)
    f.add_argument("--data", default=str(ROOT.parent / "shared/data"))
    f.add_argument("--copies", type=int, default=8)
    f.add_argument("--n0", type=int, default=100)
    f.add_argument("--n", type=int, default=1000)
    f.add_argument("--engine", default="onnxruntime")
    f.add_argument("--threads", type=int, default=2)
    f.add_argument("--batch", type=int, default=400)
    g = sub.add_parser("fit")
    g.add_argument("--work", required=True)
    g.add_argument("--hidden", type=int, nargs="+", default=[32])
    g.add_argument("--lam", type=float, nargs="+", default=[20.0])
    g.add_argument("--temperature", type=float, nargs="+", default=[0.1])
    g.add_argument("--balance", type=int, nargs="+", default=[1])
    g.add_argument("--epochs", type=int, default=30)
    g.add_argument("--lr", type=float, default=3e-3)
    g.add_argument("--alpha", type=float, default=0.001)
    args = p.parse_args(argv)
    if not (Path(getattr(args, "data", ROOT.parent / "shared/data")) / "cifar10_train.npz").exists():
        sys.exit("skip: ../shared/data/cifar10_train.npz not found")
    {"features": features, "fit": fit}[args.cmd](args)


if __name__ == "__main__":
    main()
