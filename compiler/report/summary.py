"""A dump's ``summary.json``: the version it is written in, and reading it back.

Its own module so that the dump (which writes it), ``inspect`` and the Ascend coverage check (which read it)
import it without importing each other.
"""

from __future__ import annotations

import json
from pathlib import Path

from moe_ascend.kernels.errors import MoEAscendError

SUMMARY_VERSION = 1


def dump_ranks(folder: str | Path) -> list[int]:
    """The ranks a multi-rank dump holds (a ``rankN`` subfolder each), in order; none for a one-process dump."""
    found = [p.parent.name[len("rank"):] for p in Path(folder).glob("rank*/summary.json")]
    return sorted(int(rank) for rank in found if rank.isdigit())


def load_summary(folder: str | Path, rank: int | None = None) -> dict:
    """The summary of a dump folder, or of one rank's subfolder (the lowest rank unless ``rank`` is given); a clear
    error when there is none."""
    folder = Path(folder)
    ranks = dump_ranks(folder)
    if rank is not None and rank not in ranks:
        raise MoEAscendError(f"{folder} holds no dump of rank {rank}; its ranks: {ranks or 'none (one process)'}")
    path = folder / "summary.json"
    if rank is not None or not path.exists():
        if not ranks:
            raise MoEAscendError(f"{folder} holds no summary.json; "
                                 f"compile with options={{'dump_dir': '{folder}'}} first")
        path = folder / f"rank{ranks[0] if rank is None else rank}" / "summary.json"
    summary = json.loads(path.read_text())
    if summary.get("version") != SUMMARY_VERSION:
        raise MoEAscendError(f"{path} has summary version {summary.get('version')}; "
                             f"this moe_ascend reads {SUMMARY_VERSION}")
    return summary
