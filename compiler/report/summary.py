"""A dump's ``summary.json``: the version it is written in, and reading it back.

Its own module so that the dump (which writes it), ``inspect`` and the Ascend coverage check (which read it)
import it without importing each other.
"""

from __future__ import annotations

import json
from pathlib import Path

from moe_ascend.kernels.errors import MoEAscendError

SUMMARY_VERSION = 1


def load_summary(folder: str | Path) -> dict:
    """The summary of a dump folder (or of its single rank subfolder); a clear error when there is none."""
    folder = Path(folder)
    path = folder / "summary.json"
    if not path.exists():
        ranks = sorted(folder.glob("rank*/summary.json"))
        if not ranks:
            raise MoEAscendError(f"{folder} holds no summary.json; "
                                 f"compile with options={{'dump_dir': '{folder}'}} first")
        path = ranks[0]
    summary = json.loads(path.read_text())
    if summary.get("version") != SUMMARY_VERSION:
        raise MoEAscendError(f"{path} has summary version {summary.get('version')}; "
                             f"this moe_ascend reads {SUMMARY_VERSION}")
    return summary
