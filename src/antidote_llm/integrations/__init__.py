"""Hooks into the tools a fine-tuning pipeline already runs: `GuardCallback` decides on a Trainer's model when
its training ends."""

from antidote_llm.integrations.trainer import GUARD_DIR, INPUT_DIR, GuardCallback, GuardRejected

__all__ = ["GUARD_DIR", "INPUT_DIR", "GuardCallback", "GuardRejected"]
