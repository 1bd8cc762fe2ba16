"""Dynamic expert load balancing (EDPB): track tokens per expert, predict, plan a placement, migrate when it pays."""

from moe_ascend.runtime.balance.placement import Placement, PlacementError, physical_slots  # noqa: F401
from moe_ascend.runtime.balance.balancer import ExpertBalancer, Stopwatch, read_loads  # noqa: F401
from moe_ascend.runtime.balance.migrate import MigrationError, MigrationReport, migrate  # noqa: F401
from moe_ascend.runtime.balance.planner import greedy_placement, imbalance, plan_placement  # noqa: F401
from moe_ascend.runtime.balance.predict import BestRecent, Ema, Trend, prediction_error  # noqa: F401
