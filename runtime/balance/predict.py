"""Predicting each expert's load a few steps ahead from what it was.

- ``Ema``: the exponential moving average with θ = 0.9 (MindSpeed's choice):
  the next window looks like a smoothed recent past.
- ``Trend``: Holt's linear smoothing, a level and a slope per expert, so a hot
  set that is drifting is extrapolated along its drift rather than chased.

Both take one load vector per window (tokens per expert over the last K steps)
and predict the mean load over the next ``horizon`` windows.
"""

from __future__ import annotations

import torch


class Ema:
    def __init__(self, theta: float = 0.9):
        self.theta, self.level = theta, None

    def update(self, load: torch.Tensor) -> None:
        load = load.double()
        self.level = load.clone() if self.level is None else self.theta * self.level + (1 - self.theta) * load

    def predict(self, horizon: int = 1) -> torch.Tensor:
        return self.level


class Trend:
    """Holt's method; the slope is damped (φ) so a long horizon does not run away with a short-lived drift."""

    def __init__(self, alpha: float = 0.5, beta: float = 0.3, damping: float = 0.8):
        self.alpha, self.beta, self.damping = alpha, beta, damping
        self.level = self.slope = None

    def update(self, load: torch.Tensor) -> None:
        load = load.double()
        if self.level is None:
            self.level, self.slope = load.clone(), torch.zeros_like(load)
            return
        previous = self.level
        self.level = self.alpha * load + (1 - self.alpha) * (previous + self.damping * self.slope)
        self.slope = self.beta * (self.level - previous) + (1 - self.beta) * self.damping * self.slope

    def predict(self, horizon: int = 1) -> torch.Tensor:
        steps = sum(self.damping**h for h in range(1, horizon + 1)) / horizon  # the mean over the horizon
        return (self.level + steps * self.slope).clamp(min=0)


PREDICTORS = {"ema": Ema, "trend": Trend}


def prediction_error(trace: torch.Tensor, predictor: str, horizon: int = 1) -> float:
    """Mean relative error of ``predictor`` on a recorded ``trace [windows, experts]`` (or
    ``[windows, layers, experts]``): each window predicts the mean of the next ``horizon``, error =
    Σ|predicted − actual| / Σ actual."""
    model = PREDICTORS[predictor]()
    error = total = 0.0
    for window in range(len(trace) - horizon):
        model.update(trace[window])
        actual = trace[window + 1: window + 1 + horizon].double().mean(0)
        error += float((model.predict(horizon) - actual).abs().sum())
        total += float(actual.sum())
    return error / total if total else 0.0
