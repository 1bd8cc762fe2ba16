"""On every rank: the chunk count ``overlap="auto"`` gives a capacity layer on the link this job runs on.

``auto_chunks.py``: 4 experts over the ranks, top-2, 1024 tokens of width 512, the flat exchange (the two-step
one is not chunked), compiled for one training step; each rank reports what chunk_for_overlap announced.
"""

import json
import logging
import re

import torch
import torch.distributed as dist

import moe_ascend.compiler.backend  # noqa: F401  (registers the backend)
from moe_ascend.runtime import MoELayer
from moe_ascend.runtime.launcher import end_process_group


class Announced(logging.Handler):
    def __init__(self):
        super().__init__()
        self.chunks = 1

    def emit(self, record):
        if found := re.search(r"exchanges its tokens in (\d+) chunks", record.getMessage()):
            self.chunks = int(found[1])


if __name__ == "__main__":
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    announced = Announced()
    logging.getLogger("moe_ascend").addHandler(announced)
    logging.getLogger("moe_ascend").setLevel(logging.INFO)
    torch.manual_seed(0)
    layer = MoELayer(512, 1024, 4, 2, capacity_factor=1.0, ep_group=dist.group.WORLD)
    compiled = torch.compile(layer, backend="moe_ascend",
                             options={"overlap": "auto", "hierarchical_a2a": False, "target": "eager"})
    compiled(torch.randn(1024, 512, requires_grad=True)).sum().backward()
    print("RESULT " + json.dumps({"rank": dist.get_rank(), "chunks": announced.chunks}), flush=True)
    end_process_group()
