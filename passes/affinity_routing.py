"""Affinity routing (LocMoE+): the capacity an expert needs when it chooses its tokens by affinity.

LocMoE (arXiv 2401.13920) bounds the capacity from below: when a token's
affinity to its relevant expert exceeds δ, and an unrelated token's cosine with
a gate row is that of a random direction in d dimensions (``δ²`` is Beta(½, (d−1)/2)
distributed), an expert among ``n`` needs at least

    exact:  1 / (n · (1 − I_{δ²}(½, (d−1)/2)))     (I: the regularised incomplete beta)
    exp:    (1/n) · exp(d·δ² / (2 − δ²))           (the paper's closed-form estimate)

slots. ``capacity_lower_bound`` gives both; the routing itself is in
``moe_ascend.kernels.affinity``. The pass that rewrites a recognised router
onto them (``options["routing"] = "affinity"``) is not in this version yet, and
the option says so.
"""

from __future__ import annotations

import math

import mpmath

FORMS = ("exact", "exp")


def capacity_lower_bound(delta: float, d: int, n: int, form: str = "exact") -> float:
    """LocMoE's lower bound on an expert's capacity, for affinity ``delta``, width ``d`` and ``n`` experts."""
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    if not 0 < delta < 1 or d < 2 or n < 1:
        raise ValueError(f"need 0 < delta < 1, d >= 2 and n >= 1; got delta={delta}, d={d}, n={n}")
    if form == "exp":
        return math.exp(d * delta**2 / (2 - delta**2)) / n
    # P(|cos| > δ) for an unrelated token: 1 − I_{δ²}(½, (d−1)/2), computed without cancellation.
    beyond = mpmath.betainc(0.5, (d - 1) / 2, delta**2, 1, regularized=True)
    return float(1 / (n * beyond))
