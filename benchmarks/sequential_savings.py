"""Sample savings of sequential certification: samples per image and certified accuracy, fixed N vs
``--sequential`` vs ``--target-radius``.

Two modes:

``simulate``: from stored per-image results (the committed CIFAR-10 TSVs). Each row's stored top-class
count over its N is taken as the true probability of its (stored) selected class, and every count is
a binomial draw from it, fed to the library's own code: fixed N = --cap (Cohen's CERTIFY at the
stage's alpha), ``certify_sequential`` with the union-bound schedule, and, for router files,
min-aware dual certification (``min_aware_certify``). Selection is held fixed at the stored guess, so
only the estimation samples are compared (N0 per stage is the same for all and not counted).
Rows that abstained in the file have no known class; they count as not correct in every column.
Use this for the N = 100,000 reference from N = 10,000 runs (it says so in its output).

``run``: real ``dualrs-route certify`` runs, side by side: fixed N, --sequential and --target-radius
(seconds per image and samples per image measured). For timings, run on quiet cores.

Commands (from the repository root):

    python benchmarks/sequential_savings.py simulate benchmarks/results/cifar10/gaussian-zoo/expert-*.tsv \
        benchmarks/results/cifar10/gaussian-zoo/router.tsv --cap 100000 --target-radius 0.5 --seed 0
    python benchmarks/sequential_savings.py run --out /tmp/seq-digits --N 10000 --max -1 --threads 2
    python benchmarks/sequential_savings.py run --out /tmp/seq-cifar --dataset cifar10 --data ../shared/data \
        --skip 20 --N 10000 --threads 2 --router router/zoo/cifar10-router   # the zoo, if present
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from dualrs_route.experts.sequential import StopPolicy, certify_sequential, union_bound_schedule
from dualrs_route.experts.stats import certify_from_counts
from dualrs_route.router.dual import min_aware_certify
from dualrs_route.router.results import DEFAULT_RADII, read_results, summarize

GRID = DEFAULT_RADII


class CountPath:
    """One row's sample stream: C(n) = hits among its first n samples (Bernoulli(p), drawn once up to the
    cap). Every policy reads the same path, so fixed N and each sequential policy see the same samples, as
    real runs with one seed do (a sequential run's samples are a prefix of the fixed run's keyed stream):
    the columns differ by the policies only, not by sampling noise between them, and no result depends
    on which policies run beside it."""

    def __init__(self, rng, p: float, cap: int):
        hits = rng.random(cap) < p
        self.cumulative = np.concatenate([[0], np.cumsum(hits, dtype=np.int64)])

    def count(self, n: int) -> int:
        return int(self.cumulative[n])

    def draw(self, start: int, stop: int) -> int:
        return self.count(stop) - self.count(start)


PREVIOUS_SCHEDULE = {"ratio": 2.0, "final_share": None}
"""The first release's schedule (doubling looks, alpha / J at each), kept as a comparison row."""


def _stage(path: CountPath, sigma: float, cap: int, alpha: float, policy, schedule: dict | None = None):
    """One stage's certificate along ``path``: fixed N = cap (policy None) or sequential
    (``schedule``: keyword arguments of ``union_bound_schedule``, defaults if None)."""
    if policy is None:
        return certify_from_counts(1, path.count(cap), cap, sigma, alpha)
    return certify_sequential(1, path.draw, sigma=sigma, schedule=union_bound_schedule(cap, alpha, **(schedule or {})),
                              policy=policy)


def _accuracy(radius: np.ndarray, correct: np.ndarray) -> list[float]:
    return [float(np.mean(correct & (radius >= r))) for r in GRID]


def simulate_file(path: str, *, cap: int, policies: dict, seed: int) -> list[dict]:
    """Per policy (None = fixed N): mean estimation samples per image and certified accuracy at GRID."""
    table = read_results(path)
    settings = table.metadata.get("settings", {})
    n_file, mode = int(settings["N"]), table.mode
    cols = table.columns
    p_expert = np.array([float(v) / n_file if v != "-" else 0.0 for v in cols["n_expert"]])
    sigma = np.array([float(v) if v != "-" else np.nan for v in cols["sigma"]])
    correct = (table.predict == table.label) & (table.predict != -1)
    out = []
    specs = {name: (spec if isinstance(spec, tuple) else (spec, None)) for name, spec in policies.items()}
    radius = {name: np.zeros(len(table.idx)) for name in specs}
    samples = {name: np.zeros(len(table.idx)) for name in specs}
    for i in range(len(table.idx)):
        # one pair of sample paths per row (router, expert), read by every policy; rows seeded apart
        paths = (CountPath(np.random.default_rng([seed, i, 0]), _router_p(table, settings, i), cap),
                 CountPath(np.random.default_rng([seed, i, 1]), p_expert[i], cap))
        for name, (policy, schedule) in specs.items():
            if mode == "router":
                radius[name][i], samples[name][i] = _simulate_dual_row(paths, table, settings, i, cap, policy, schedule)
            elif not np.isnan(sigma[i]):
                c = _stage(paths[1], sigma[i], cap, float(settings["alpha_expert"]), policy, schedule)
                radius[name][i], samples[name][i] = (0.0 if c.abstained else c.radius), c.n
    for name, (policy, _) in specs.items():
        out.append({"file": Path(path).name, "policy": name, "images": len(table.idx),
                    "target_radius": None if policy is None else policy.target_radius,
                    "samples_per_image": float(samples[name].mean()),
                    "certified_accuracy": _accuracy(radius[name], correct)})
    return out


def _router_p(table, settings, i: int) -> float:
    value = table.columns.get("n_router", ["-"] * len(table.idx))[i]
    return float(value) / int(settings["router_N"]) if value != "-" else 0.0


def _simulate_dual_row(paths, table, settings, i: int, cap: int, policy, schedule: dict | None = None):
    cols = table.columns
    if cols["n_router"][i] == "-" or cols["sigma"][i] == "-":
        return 0.0, 0.0  # the stored router abstained: no routed expert known
    router_path, expert_path = paths
    sigma_e, sigma = _router_sigma(table), float(cols["sigma"][i])
    alpha, beta = float(settings["alpha_expert"]), float(settings["alpha_router"])
    if policy is None:
        rc = _stage(router_path, sigma_e, cap, beta, None)
        ec = _stage(expert_path, sigma, cap, alpha, None)
        ok = not (rc.abstained or ec.abstained)
        return (min(rc.radius, ec.radius) if ok else 0.0), cap * (2 if not rc.abstained else 1)
    reach = union_bound_schedule(cap, alpha, **(schedule or {})).max_radius(sigma)
    result = min_aware_certify(1, lambda p: _stage(router_path, sigma_e, cap, beta, p, schedule),
                               lambda k, p: _stage(expert_path, sigma, cap, alpha, p, schedule), [0.0, reach], policy)
    used = result.router_certificate.n + (result.expert_certificate.n if result.expert_certificate else 0)
    return (0.0 if result.abstained else result.radius), used


def _router_sigma(table) -> float:
    """sigma_e of a router results file: R_sigma / Phi^-1(p_router_lower) of its first certified row."""
    from scipy.stats import norm

    for r, p in zip(table.columns["radius_router"], table.columns["p_router_lower"]):
        if r not in ("-", "0.000000") and p != "-" and float(p) > 0.5:
            return float(r) / float(norm.ppf(float(p)))
    raise SystemExit(f"{table.name}: no certified router row to read sigma_e from")


def markdown(rows: list[dict], note: str) -> str:
    worst = any("worst_loss" in r for r in rows)
    head = (["file", "policy", "images", "est. samples / image", "x fewer"] + [f"r={r:g}" for r in GRID]
            + (["worst loss (points)"] if worst else []))
    lines = [note, "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    fixed = {r["file"]: r["samples_per_image"] for r in rows if r["policy"] == "fixed"}
    for r in rows:
        ratio = fixed.get(r["file"], 0) / r["samples_per_image"] if r["samples_per_image"] else float("nan")
        lines.append("| " + " | ".join([r["file"], r["policy"], str(r["images"]), f"{r['samples_per_image']:,.0f}",
                                        f"{ratio:.1f}"] + [f"{100 * a:.1f}" for a in r["certified_accuracy"]]
                                       + ([f"{r['worst_loss']:.1f}"] if worst else [])) + " |")
    return "\n".join(lines)


def over_seeds(runs: list[list[dict]]) -> list[dict]:
    """Rows averaged over seeds (samples, certified accuracy) plus ``worst_loss``: the largest drop in
    points below fixed N at any grid radius (a target-radius run: at its target), over the seeds (each
    seed against its own fixed run)."""
    out = []
    for k, row in enumerate(runs[0]):
        fixed = [next(r for r in run if r["file"] == row["file"] and r["policy"] == "fixed") for run in runs]
        same = [run[k] for run in runs]
        target = row.get("target_radius")
        keep = [target is None or math.isclose(r, target) for r in GRID]  # a target run answers at its radius only
        loss = max(max(100 * (f - a) for f, a, k in zip(fx["certified_accuracy"], r["certified_accuracy"], keep) if k)
                   for fx, r in zip(fixed, same))
        out.append({**row, "samples_per_image": float(np.mean([r["samples_per_image"] for r in same])),
                    "certified_accuracy": [float(np.mean(col)) for col in zip(*(r["certified_accuracy"] for r in same))],
                    "worst_loss": max(loss, 0.0), "seeds": len(runs)})
    return out


def simulate(args) -> None:
    step, top = args.radius_grid, GRID[-1]
    policies = {"fixed": None, "sequential": StopPolicy(radius_tol=args.radius_tol),
                f"grid {step:g}, max {top:g}, first release (doubling, alpha / J, no projection)": (
                    StopPolicy(radius_grid=step, enough_radius=top, projection_level=None), PREVIOUS_SCHEDULE),
                f"grid {step:g}, no projection": StopPolicy(radius_grid=step, projection_level=None),
                f"grid {step:g}": StopPolicy(radius_grid=step),
                f"grid {step:g}, max {top:g}": StopPolicy(radius_grid=step, enough_radius=top)}
    if args.target_radius is not None:
        policies[f"target {args.target_radius:g}"] = StopPolicy(target_radius=args.target_radius)
    seeds = range(args.seed, args.seed + args.seeds)
    runs = [[row for path in args.files for row in simulate_file(path, cap=args.cap, policies=policies, seed=seed)]
            for seed in seeds]
    rows = runs[0] if args.seeds == 1 else over_seeds(runs)
    seeds_text = f"seed {args.seed}" if args.seeds == 1 else (
        f"means over seeds {args.seed}-{args.seed + args.seeds - 1}; worst loss = the largest drop below fixed N at "
        f"any grid radius in any one seed")
    note = (f"Simulated from stored per-image counts (each row's stored top-class frequency taken as its true "
            f"probability; binomial draws on one sample path per row shared by all policies), cap N = "
            f"{args.cap:,}, {seeds_text}; estimation samples only, selection fixed at the stored guess. "
            f"Certified accuracy in % at each radius.")
    print(markdown(rows, note))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


def fixed_samples_per_image(table, n0: int, n: int) -> float:
    """Noisy samples per row of a fixed-N results file: N0 + N per stage that ran (with a router, the
    expert stage runs unless the router abstained)."""
    stages = [1 + (e != "-1:-") if table.mode == "router" else 1 for e in table.columns["expert"]]
    return float(np.mean(stages)) * (n0 + n)


def _certify(out: Path, name: str, common: list[str], extra: list[str], n: int) -> dict:
    path = out / f"{name}.tsv"
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "from dualrs_route.cli import main; main()", "certify", *common, "--quiet",
                    "--out", str(path), *extra], check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    table = read_results(path)
    s = summarize(table)
    n_used = table.columns.get("n_used")
    if n_used:
        samples = float(np.mean([float(v) for v in n_used]))
    else:
        samples = fixed_samples_per_image(table, 100, n)
    return {"file": name, "policy": name, "images": s["count"], "seconds_per_image": wall / max(s["count"], 1),
            "samples_per_image": samples, "certified_accuracy": [s["certified_accuracy"][float(r)] for r in GRID]}


def run(args) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    models = ["--router", args.router] if args.router else []
    for e in args.expert:
        models += ["--expert", e]
    common = [*models, "--dataset", args.dataset, "--skip", str(args.skip), "--max", str(args.max), "--N",
              str(args.N), "--alpha", str(args.alpha), "--seed", str(args.seed)]
    if args.data:
        common += ["--data", args.data]
    if args.threads:
        common += ["--threads", str(args.threads)]
    rows = [_certify(out, "fixed", common, [], args.N), _certify(out, "sequential", common, ["--sequential"], args.N),
            _certify(out, "sequential-grid", common, ["--sequential", "--radius-grid", str(args.radius_grid),
                                                      "--max-radius", str(GRID[-1])], args.N)]
    if args.target_radius is not None:
        rows.append(_certify(out, f"target-{args.target_radius:g}", common,
                             ["--target-radius", str(args.target_radius)], args.N))
    head = ["run", "images", "samples / image", "x fewer", "s / image"] + [f"r={r:g}" for r in GRID]
    lines = [f"Real certify runs, N = {args.N:,} (cap), samples include selection; results in {out}", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join([r["file"], str(r["images"]), f"{r['samples_per_image']:,.0f}",
                                        f"{rows[0]['samples_per_image'] / r['samples_per_image']:.1f}",
                                        f"{r['seconds_per_image']:.3f}"]
                                       + [f"{100 * a:.1f}" for a in r["certified_accuracy"]]) + " |")
    print("\n".join(lines))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    sim = sub.add_parser("simulate", help="from stored per-image counts")
    sim.add_argument("files", nargs="+")
    sim.add_argument("--cap", type=int, default=100_000)
    sim.add_argument("--target-radius", type=float, default=None)
    sim.add_argument("--radius-tol", type=float, default=0.01)
    sim.add_argument("--radius-grid", type=float, default=0.25)
    sim.add_argument("--seed", type=int, default=0)
    sim.add_argument("--seeds", type=int, default=1, help="average over this many seeds from --seed")
    sim.add_argument("--json", default=None)
    real = sub.add_parser("run", help="real certify runs")
    real.add_argument("--out", required=True)
    real.add_argument("--router", default=None)
    real.add_argument("--expert", action="append", default=[])
    real.add_argument("--dataset", default="digits")
    real.add_argument("--data", default=None)
    real.add_argument("--skip", type=int, default=1)
    real.add_argument("--max", type=int, default=-1)
    real.add_argument("--N", type=int, default=10_000)
    real.add_argument("--alpha", type=float, default=0.001)
    real.add_argument("--target-radius", type=float, default=0.5)
    real.add_argument("--radius-grid", type=float, default=0.25)
    real.add_argument("--threads", type=int, default=None)
    real.add_argument("--seed", type=int, default=0)
    real.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.mode == "run" and not (args.router or args.expert):
        args.router = "builtin:digits-router"
    (simulate if args.mode == "simulate" else run)(args)


if __name__ == "__main__":
    main()
