"""The MoE operator set as ``torch.library`` custom ops in namespace ``moe_ascend``, and the error types.

Importing this package registers the ops: ``torch.ops.moe_ascend.topk_softmax``,
``capacity_dispatch``, ``capacity_slots``, ``capacity_combine``, ``permute``, ``unpermute``,
``grouped_mm_batched``, ``grouped_mm_filled`` and ``grouped_mm``. Each has a fake implementation (for
compile), autograd, and a reference implementation in plain torch ops that runs
on any device.
"""

from moe_ascend.kernels.capacity import capacity_combine, capacity_dispatch, capacity_slots  # noqa: F401
from moe_ascend.kernels.dropless import permute, unpermute  # noqa: F401
from moe_ascend.kernels.errors import (  # noqa: F401  (re-exported)
    MoEAscendError,
    OptionError,
    PassContractError,
    PassError,
    PassOrderError,
    PassRegistrationError,
    TargetUnavailableError,
    TopologyError,
)
from moe_ascend.kernels.grouped_mm import grouped_mm, grouped_mm_batched, grouped_mm_filled  # noqa: F401
from moe_ascend.kernels.routing import topk_softmax  # noqa: F401
