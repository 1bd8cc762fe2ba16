"""The MoE operator set as ``torch.library`` custom ops in namespace ``moe_ascend``, and the error types.

Importing this package registers the ops: ``torch.ops.moe_ascend.topk_softmax``, ``topk_sigmoid``,
``capacity_dispatch``, ``capacity_slots``, ``capacity_combine``, ``permute``, ``unpermute``,
``grouped_mm_batched``, ``grouped_mm_filled`` and ``grouped_mm``. Each has a fake implementation (for
compile), autograd, and a reference implementation in plain torch ops that runs
on any device.
"""

import sys

if __name__ == "kernels":  # the repository root is on sys.path and someone asked for Hugging Face's `kernels`
    from importlib.machinery import PathFinder
    from importlib.util import module_from_spec
    from pathlib import Path

    _root = Path(__file__).resolve().parents[1]
    _spec = PathFinder.find_spec("kernels", [p for p in sys.path if Path(p or ".").resolve() != _root])
    if _spec is None:
        del sys.modules[__name__]
        raise ModuleNotFoundError("No module named 'kernels' (this folder is moe_ascend.kernels)", name="kernels")
    # the import system hands out what sys.modules holds once this body ends: the package asked for
    sys.modules[__name__] = module_from_spec(_spec)
    _spec.loader.exec_module(sys.modules[__name__])

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
from moe_ascend.kernels.routing import topk_sigmoid, topk_softmax  # noqa: F401
