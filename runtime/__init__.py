"""What runs beside the compiled graph: topology, the reference MoE layer, balancing, the launcher."""

from moe_ascend.kernels.affinity import add_routing_state  # noqa: F401  (a gate's affinity-routing state)
from moe_ascend.runtime import traffic  # noqa: F401  (counts every eager exchange from now on)
from moe_ascend.runtime.moe_layer import MoELayer  # noqa: F401
from moe_ascend.runtime.topology import Topology  # noqa: F401
