"""Predicting each expert's load a few steps ahead from what it was.

- ``Ema``: the exponential moving average with θ = 0.9 (MindSpeed's choice):
  the next window looks like a smoothed recent past.
- ``Trend``: Holt's linear smoothing, a level and a slope per expert, so a hot
  set that is drifting is extrapolated along its drift rather than chased.

- ``BestRecent``: whichever of the last window, ``Ema`` and ``Trend`` has
  forecast the recent windows best. Recorded training loads are mostly noise
  around a slow level, where extrapolating a slope chases the noise and the
  last window is the best guess; a drifting hot set is the trend's case. The
  load says which it is, so the balancer keeps score instead of assuming.

Each takes one load vector per window (tokens per expert over the last K steps)
and predicts the mean load over the next ``horizon`` windows.
"""

from __future__ import annotations

import torch


class Predictor:
    """What every predictor's checkpoint holds: its attributes (tensors and numbers)."""

    def state_dict(self) -> dict:
        return dict(vars(self))

    def load_state_dict(self, state: dict) -> None:
        vars(self).update(state)


class Ema(Predictor):
    def __init__(self, theta: float = 0.9):
        self.theta, self.level = theta, None

    def update(self, load: torch.Tensor) -> None:
        load = load.double()
        self.level = load.clone() if self.level is None else self.theta * self.level + (1 - self.theta) * load

    def predict(self, horizon: int = 1) -> torch.Tensor:
        return self.level


class Trend(Predictor):
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


class BestRecent(Predictor):
    """Predicts with the candidate whose one-window-ahead forecasts erred least lately: each window first scores
    every candidate's forecast of it (Σ|predicted − actual| / Σ actual, decayed by ``memory`` a window), then
    updates them all. Until a window is scored the last window's load stands."""

    def __init__(self, memory: float = 0.7):
        self.memory = memory
        self.candidates = {"last": Ema(theta=0.0), "ema": Ema(), "trend": Trend()}
        self.errors = dict.fromkeys(self.candidates, 0.0)

    def update(self, load: torch.Tensor) -> None:
        load = load.double()
        total = float(load.sum())
        for name, candidate in self.candidates.items():
            if candidate.level is not None and total:
                error = float((candidate.predict(1) - load).abs().sum()) / total
                self.errors[name] = self.memory * self.errors[name] + (1 - self.memory) * error
            candidate.update(load)

    @property
    def chosen(self) -> str:
        return min(self.errors, key=self.errors.get)  # (a tie: the first, the last window)

    def predict(self, horizon: int = 1) -> torch.Tensor:
        return self.candidates[self.chosen].predict(horizon)

    def state_dict(self) -> dict:
        return {"memory": self.memory, "errors": dict(self.errors),
                "candidates": {name: c.state_dict() for name, c in self.candidates.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.memory, self.errors = state["memory"], dict(state["errors"])
        for name, candidate in self.candidates.items():
            candidate.load_state_dict(state["candidates"][name])


PREDICTORS = {"ema": Ema, "trend": Trend, "best": BestRecent}


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
