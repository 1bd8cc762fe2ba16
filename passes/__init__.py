"""Graph passes and the pass API.

Write a pass::

    from moe_ascend.passes import PassResult, register_pass

    @register_pass(name="count_matmuls", stage="post_grad", after=("find_moe",))
    def count_matmuls(gm, ctx):
        ...
        return PassResult(gm, modified=False)
"""

from moe_ascend.passes.infra import (  # noqa: F401  (the public pass API)
    STAGES,
    CostModel,
    Pass,
    PassContext,
    PassResult,
    infer_meta,
    inherit_meta,
    join_layer,
    ordered_passes,
    register_pass,
    registered_passes,
    unregister_pass,
)

# Built-in passes register themselves on import; their order comes from after=/before=.
from moe_ascend.passes import (  # noqa: F401,E402
    affinity_routing, canonicalise, chunk_for_overlap, find_moe, functionalise, hierarchical_a2a, mc2_dispatch,
    node_limited_routing, normalise, schedule_overlap, skip_empty_slots, token_groups, verify_collectives,
)
