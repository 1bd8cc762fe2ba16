"""Capture the graphs the passes see, and build pass contexts, for specification-style tests."""

import logging
import re

import torch

from moe_ascend.compiler.options import Options
from moe_ascend.compiler.pipeline import _fill_val_from_example_value
from moe_ascend.passes import PassContext
from moe_ascend.passes.infra import PASS_LOGGER


def dynamo_graph(fn, *inputs):
    """The FX graph Dynamo hands a backend (torch IR), with ``meta["val"]`` filled as the pre_grad stage does."""
    captured = []

    def capture(gm, example_inputs):
        captured.append(gm)
        return gm.forward

    torch.compile(fn, backend=capture, fullgraph=True)(*inputs)
    (gm,) = captured
    _fill_val_from_example_value(gm)
    return gm


def context(stage="pre_grad", role="dynamo", options=None, **kwargs):
    return PassContext(
        options=Options.from_user(options), stage=stage, role=role, graph_name="graph_t",
        logger=logging.getLogger(PASS_LOGGER), **kwargs,
    )


def code_lines(gm):
    """The graph's Python code, one stripped line per statement, without the ``= None`` frees."""
    lines = []
    for line in gm.code.strip().splitlines()[1:]:
        line = line.split(";")[0].strip()
        if line and not re.match(r"return\b", line):
            lines.append(line)
    return lines
