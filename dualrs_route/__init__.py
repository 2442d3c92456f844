"""dualrs-route: certified-robust inference with Dual Randomized Smoothing.

A smoothed router picks one expert randomized-smoothing (RS) classifier per input; the expert
is certified with standard RS (Cohen et al. 2019); the certificate is
min(R_router, R_expert) at confidence 1 - (alpha + beta) (Sun, Mao and Vechev, ICLR 2026).

    >>> import dualrs_route as d
    >>> model = d.load("builtin:digits-router")
    >>> cert = d.certify(model, image, n=10_000, alpha=0.001)   # image: float32 [C, H, W] in [0, 1]
    >>> cert.prediction, cert.radius, cert.abstained

Public names: :func:`load`, :func:`certify`, :func:`predict`, :func:`run_dataset`,
:class:`Model`, :class:`Certification`, :class:`Prediction`, :data:`ABSTAIN`, :class:`DualRSError`.
The command line is ``dualrs-route`` (or ``python -m dualrs_route``).
"""

from dualrs_route.api import (
    ABSTAIN,
    Certification,
    Model,
    Prediction,
    certify,
    load,
    predict,
    run_dataset,
)
from dualrs_route.experts.errors import DualRSError

__all__ = ["ABSTAIN", "Certification", "DualRSError", "Model", "Prediction", "certify", "load", "predict",
           "run_dataset"]
