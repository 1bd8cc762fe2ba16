"""What every benchmark shares: the result JSON (DESIGN.md, Benchmarks), machine facts, medians."""

from __future__ import annotations

import json
import os
import platform
import statistics
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def write_result(name: str, figure: dict, runs: list, config: dict, path: str | None = None, **top_level) -> Path:
    """Write ``{"figure", "runs", "machine", "config", ...}`` to ``path`` (default bench/results/NAME.json)."""
    out = Path(path) if path else RESULTS / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"figure": figure, **top_level, "runs": runs, "machine": machine(), "config": config}, indent=1))
    return out


def median(values) -> float:
    return float(statistics.median(values))
