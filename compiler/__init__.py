"""The backend entry, options, stage pipeline, lowering targets, dumps, cost model and CLI."""

from moe_ascend.kernels import errors  # noqa: F401  (moe_ascend.compiler.errors)
