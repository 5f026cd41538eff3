"""Antidote: post-fine-tuning safety re-alignment by one-shot pruning of harmful weights.

The one entry point for the method is `realign` (in memory) or `realign_to_disk` (the CLI's path):

    from antidote_llm import ModelSource, RealignConfig, load_model, load_pairs, realign
    loaded = load_model(ModelSource("base-model", adapters=("finetune-adapter",)), keep_adapter=True)
    result = realign(loaded.model, loaded.tokenizer, RealignConfig(ratio=0.05), load_pairs("harmful.json"))

The decision after a customer's fine-tune (safe, repaired within an accuracy budget, or rejected) is
`run_guard` (in memory) or `guard_to_disk` (`antidote guard`'s path).
"""

from antidote_llm.core.pipeline import apply_mask_to_disk, realign_to_disk
from antidote_llm.core.realign import RealignConfig, RealignResult, apply_masks, realign
from antidote_llm.data.records import Pair, PairSet, load_pairs
from antidote_llm.data.spec import DataSpec
from antidote_llm.errors import AntidoteError
from antidote_llm.frontier.guard import GuardConfig, GuardResult, run_guard
from antidote_llm.frontier.guard_disk import guard_to_disk
from antidote_llm.runtime.loading import ModelSource, load_model
from antidote_llm.runtime.quiet import quiet_library_warnings
from antidote_llm.runtime.version import __version__

quiet_library_warnings()  # once, for every entry point: the CLI and library use

__all__ = [
    "AntidoteError",
    "DataSpec",
    "GuardConfig",
    "GuardResult",
    "ModelSource",
    "Pair",
    "PairSet",
    "RealignConfig",
    "RealignResult",
    "apply_mask_to_disk",
    "apply_masks",
    "guard_to_disk",
    "load_model",
    "load_pairs",
    "realign",
    "realign_to_disk",
    "run_guard",
    "__version__",
]
