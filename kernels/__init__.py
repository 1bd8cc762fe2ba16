"""The MoE operator set (torch.library custom ops) and the project's error types."""

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
