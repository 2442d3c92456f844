"""Held-out table of the consistency zoo's router variants (issue 12): dual CERTIFY replayed at router N 2,000 and
1,000, the routed experts' own radii ("choices alone", not a certificate), the router-bottleneck share, routes,
and the same router with set-valued certificates (router/sets.py, TAU 0.05), on the 500 held-out training images.

Usage (after bash benchmarks/zoo2_levers.sh): python benchmarks/zoo2_heldout_table.py se1.0 se0.75 se0.5 se1.0-l5 se1.0-l80
"""
import sys, os, numpy as np, warnings
warnings.simplefilter("ignore")
from dualrs_route.router.calibrate import simulate_sets
from dualrs_route.cli.calibrate import _load_stages
from dualrs_route.router.calibrate import acr, simulate
from dualrs_route.router.results import read_results
H="benchmarks/results/zoo2-levers"
E=[f"{H}/holdout-expert-{k}.tsv" for k in ("0.25","0.5","1.0")]
t=[read_results(e) for e in E]
Rk=[np.where(x.correct==1, x.radius, 0.0) for x in t]
radii=(0,0.25,0.5,0.75,1.0,1.25,1.5)
def row(name,res):
    acc=" | ".join(f"{100*np.mean((res['correct']==1)&(res['radius']>=r)):.1f}" for r in radii)
    return f"| {name} | {acc} | {acr(res):.4f} |"
print("| router (held-out) | " + " | ".join(f"r={r:g}" for r in radii) + " | ACR | choices alone | R_sigma < R_c | routes 0.25/0.5/1.0/abstain |")
print("|---|" + "---|"*(len(radii)+4))
for v in sys.argv[1:]:
    R="router/zoo/cifar10-router-cr" if v=="se1.0" else f"router/zoo/cifar10-router-cr-{v}"
    S=f"runs/zoo2-levers/scores-{v}.npz"
    if not os.path.exists(S): continue
    f,_,sc,st=_load_stages(R,S,E)
    for n in (2000,1000):
        scn = sc if n==2000 else __import__("dataclasses").replace(sc, estimate=sc.estimate[:,:1000])
        d=simulate(scn,st,[0,0,0],alpha=0.0005,beta=0.0005)
        routed=d["expert"]
        choice=np.array([Rk[k][i] if k>=0 else 0.0 for i,k in enumerate(routed)])
        both=(d["predict"]>=0)
        bott=np.mean(d["radius_router"][both] < d["radius_expert"][both])*100
        routes=np.bincount(routed+1,minlength=4)
        print(row(f"{v}, router N {n}", d) + f" {choice.mean():.4f} | {bott:.1f}% of {both.sum()} | {routes[1]}/{routes[2]}/{routes[3]}/{routes[0]} |")
        s=simulate_sets(scn,st,[0,0,0],alpha=0.0005,beta=0.0005,tau=0.05)
        print(row(f"{v}, router N {n}, router sets tau 0.05", s) + " - | - | - |")
