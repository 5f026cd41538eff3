"""The safety/accuracy frontier: Antidote at many ratios from one scoring pass, every point evaluated, and
an automatic operating point (the lowest harmful score within an accuracy budget)."""

from antidote_llm.frontier.search import (
    DEFAULT_RATIOS,
    FrontierConfig,
    FrontierPoint,
    FrontierResult,
    pick_operating_point,
    prune_at,
    run_frontier,
)

__all__ = ["DEFAULT_RATIOS", "FrontierConfig", "FrontierPoint", "FrontierResult", "pick_operating_point", "prune_at", "run_frontier"]
