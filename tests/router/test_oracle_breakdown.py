"""benchmarks/oracle_breakdown.py: groups, radii and the cascade-first bound against exact Clopper-Pearson answers."""

from __future__ import annotations


import numpy as np
import pytest
from scipy.stats import beta, norm

from dualrs_route.router.cascade_replay import ExpertCounts
from bench_scripts import load_benchmark

ALPHA = 0.001


def _script():
    return load_benchmark("oracle_breakdown")


def _expert(sigma, rows):
    """rows: idx -> (label, guess, counts)"""
    return ExpertCounts("-", f"s{sigma}", sigma, 100, int(sum(next(iter(rows.values()))[2])), {}, {},
                        {i: (lab, g, tuple(c), None) for i, (lab, g, c) in rows.items()})


def cp_lower(k, n, a):
    return beta.ppf(a, k, n - k + 1)


def cp_upper(k, n, a):
    return beta.ppf(1 - a, k + 1, n - k)


# three images, label 0, two classes. The sigma 1.0 expert: right and sure / wrong and sure / undecided.
WIDE = {0: (0, 0, (990, 10)), 1: (0, 1, (100, 900)), 2: (0, 0, (300, 700 - 0))}
NARROW = {0: (0, 0, (999, 1)), 1: (0, 0, (950, 50)), 2: (0, 1, (400, 600))}


def test_groups_radii_and_gains_are_exact():
    module = _script()
    wide, narrow = _expert(1.0, WIDE), _expert(0.5, NARROW)
    b = module.breakdown([narrow, wide], scale=1, alpha=ALPHA, p0=0.5)
    assert b["sigmas"] == [1.0, 0.5]  # largest sigma first, whatever the order given
    r_wide0 = 1.0 * norm.ppf(cp_lower(990, 1000, ALPHA))
    r_narrow0 = 0.5 * norm.ppf(cp_lower(999, 1000, ALPHA))
    r_narrow1 = 0.5 * norm.ppf(cp_lower(950, 1000, ALPHA))
    np.testing.assert_allclose(b["radii"], [[r_wide0, r_narrow0], [0.0, r_narrow1], [0.0, 0.0]], rtol=1e-9)
    assert list(b["group"]) == ["decided right", "decided wrong", "undecided"]
    np.testing.assert_allclose(b["oracle"], [max(r_wide0, r_narrow0), r_narrow1, 0.0], rtol=1e-9)
    table = module.report(b)
    assert f"| decided wrong | 1 | 0.000 | {r_narrow1:.3f} | {r_narrow1 / 3:+.4f} |" in table


def test_cascade_first_bound_by_hand():
    module = _script()
    # image 0: the wide stage is undecided (lower < 1/2 <= ... upper < 1/2 too: moves on); the narrow expert
    # certifies the label; the bound is its radius at alpha / 2 min'ed with the wide stage's cap for class 0
    wide = _expert(1.0, {0: (0, 1, (300, 400, 300)), 1: (0, 0, (990, 5, 5)), 2: (0, 1, (20, 970, 10))})
    narrow = _expert(0.5, {0: (0, 0, (990, 5, 5)), 1: (0, 0, (999, 1, 0)), 2: (0, 0, (999, 1, 0))})
    b = module.breakdown([wide, narrow], scale=1, alpha=ALPHA, p0=0.5)
    share = ALPHA / 2
    cap = 1.0 * (0.0 - norm.ppf(cp_upper(400, 1000, share / 4)))
    own = 0.5 * norm.ppf(cp_lower(990, 1000, share))
    decided = 1.0 * norm.ppf(cp_lower(990, 1000, share / 2))
    np.testing.assert_allclose(b["bound"], [min(own, cap), decided, 0.0], rtol=1e-9)
    assert cap < own  # the cap binds here: the bound is below the narrow expert's own radius


def test_bound_is_at_least_the_cascade_on_every_image(monkeypatch):
    module = _script()
    rng = np.random.default_rng(0)
    rows = [{}, {}, {}]
    for i in range(200):
        for k in range(3):
            p = rng.dirichlet(np.full(4, 0.3))
            rows[k][i] = (0, int(np.argmax(p)), tuple(rng.multinomial(1000, p)))
    files = [_expert(s, r) for s, r in zip((0.25, 0.5, 1.0), rows)]
    b = module.breakdown(files, scale=10, alpha=ALPHA, p0=0.5)
    assert np.all(b["bound"] >= b["cascade"] - 1e-12)
    assert np.all(b["oracle"] >= b["bound"] - 1e-12)  # the bound's radii are at smaller alphas than the oracle's
    assert (b["bound"] > b["cascade"]).any() and (b["cascade"] > 0).any()
    monkeypatch.setattr("sys.argv", ["oracle_breakdown.py", "only-one.tsv"])
    with pytest.raises(SystemExit, match="at least two"):
        module.main()


def test_router_breakdown_rows_add_up_to_the_acr_gap():
    table = load_benchmark("router_breakdown").table
    groups = np.array(["decided right", "decided right", "decided wrong", "undecided"])
    radius = np.array([0.2, 3.0, 0.0, 0.0])
    rows = {"dual": np.array([0.5, 2.0, 0.3, 0.0]), "sets": np.array([0.5, 3.0, 0.3, 0.4]),
            "constant": np.array([0.2, 3.0, 0.0, 0.0])}
    lines = table(groups, radius, rows)
    assert lines[0] == "| decided right | 2 | -0.1750 | +0.0750 |"  # dual: (0.3 - 1.0) / 4; sets: 0.3 / 4
    assert "| - its radius in [0, 0.5) | 1 | +0.0750 | +0.0750 |" in lines
    assert "| - its radius in [2.5, inf) | 1 | -0.2500 | +0.0000 |" in lines
    assert lines[-3:] == ["| decided wrong | 1 | +0.0750 | +0.0750 |", "| undecided | 1 | +0.0000 | +0.1000 |",
                          "| all | 4 | -0.1000 | +0.2500 |"]
