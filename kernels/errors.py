"""Every error moe_ascend raises, in one module.

It lives in ``kernels/`` because that is the one folder every other folder may
import (DESIGN.md, layout): ``from moe_ascend.kernels.errors import MoEAscendError``.
"""

from __future__ import annotations


class MoEAscendError(Exception):
    """Base class of every error moe_ascend raises on purpose."""


class OptionError(MoEAscendError, ValueError):
    """An option key or value the backend does not know."""


class TopologyError(MoEAscendError, ValueError):
    """A cluster description that does not match the processes that run."""


class LaunchError(MoEAscendError):
    """The emulated cluster could not be set up, or the launch command line is wrong."""


class CalibrationError(MoEAscendError):
    """A calibration micro-benchmark failed or measured nothing usable (``moe-ascend calibrate``)."""


class TargetUnavailableError(MoEAscendError, RuntimeError):
    """A lowering target asked for that this machine cannot run."""


class PassRegistrationError(MoEAscendError, ValueError):
    """A pass declared wrongly: unknown stage, duplicate name, unknown constraint."""


class PassOrderError(MoEAscendError):
    """The ``after=`` / ``before=`` constraints of the passes form a cycle."""


class PassError(MoEAscendError):
    """A pass failed; the message names the pass, the stage and the graph."""

    def __init__(self, message: str, *, pass_name: str, stage: str, graph: str):
        super().__init__(f"pass {pass_name!r} (stage {stage}, graph {graph}): {message}")
        self.pass_name = pass_name
        self.stage = stage
        self.graph = graph


class PassContractError(PassError):
    """A pass left the graph in a state the pass contract forbids."""
