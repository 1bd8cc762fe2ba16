"""verify_collectives (post_grad, last): every collective is waited on, once, by the graph.

The pipeline already checks after every post_grad pass that each process
group's collectives keep their order (``analysis.collectives.order_violations``).
This pass checks what a schedule can break inside one graph: an issued
collective whose ``wait_tensor`` is gone leaves its result unsynchronised (a
wait moved above its collective already fails ``graph.lint``). It changes nothing.

Before / after (unchanged)::

    all_to_all_single = _c10d_functional.all_to_all_single(x, [4], [4], '0')
    wait_tensor = _c10d_functional.wait_tensor(all_to_all_single)
"""

from __future__ import annotations

import torch.fx

from moe_ascend.kernels.errors import PassContractError
from moe_ascend.passes.analysis.ops import is_collective, is_wait
from moe_ascend.passes.infra import PassContext, PassResult, register_pass


@register_pass(name="verify_collectives", stage="post_grad")
def verify_collectives(gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
    problems = []
    for node in gm.graph.nodes:
        if is_collective(node) and not any(is_wait(u) for u in node.users):
            problems.append(f"{node.name} is issued but never waited on")
    if problems:
        raise PassContractError(
            "; ".join(problems), pass_name="verify_collectives", stage=ctx.stage, graph=ctx.graph_name
        )
    return PassResult(gm, modified=False)
