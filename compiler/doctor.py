"""``moe-ascend doctor``: what this machine can run, and what to install for the rest."""

from __future__ import annotations

import importlib.util
import os
import platform
import shutil

import torch

from moe_ascend.compiler.targets import ascend_unavailable_reason


def checks() -> list[tuple[str, bool, str]]:
    """``(what, available, detail)`` rows."""
    rows = [
        ("torch", True, f"{torch.__version__} on Python {platform.python_version()}"),
        ("target inductor (CPU)", shutil.which("cc") is not None or shutil.which("gcc") is not None,
         "needs a C++ compiler"),
        ("CUDA", torch.cuda.is_available(),
         f"{torch.cuda.device_count()} device(s)" if torch.cuda.is_available() else "no CUDA device"),
    ]
    reason = ascend_unavailable_reason()
    rows.append(("target ascend (torch_npu + CANN + NPU)", reason is None, reason or "available"))
    cann = os.environ.get("ASCEND_HOME_PATH") or os.environ.get("ASCEND_TOOLKIT_HOME")
    rows.append(("CANN toolkit", bool(cann), cann or "ASCEND_HOME_PATH not set"))
    rows.append(("graphviz dot (region pictures)", shutil.which("dot") is not None, "readable fallback without it"))
    is_root = hasattr(os, "geteuid") and os.geteuid() == 0
    has_ip = shutil.which("ip") is not None and shutil.which("tc") is not None
    rows.append(("emulated cluster with shaped links", is_root and has_ip,
                 "needs root and iproute2 (ip, tc)" if not (is_root and has_ip) else "root, ip and tc present"))
    rows.append(("gloo", torch.distributed.is_available() and torch.distributed.is_gloo_available(),
                 "torch.distributed backend for CPU ranks"))
    rows.append(("matplotlib (plots)", importlib.util.find_spec("matplotlib") is not None,
                 "pip install moe-ascend[plot]"))
    return rows


def report() -> str:
    lines = [f"{'capability':<42}{'':<5}detail"]
    for what, ok, detail in checks():
        lines.append(f"{what:<42}{'yes' if ok else 'no':<5}{detail}")
    return "\n".join(lines)
